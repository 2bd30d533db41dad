// Seeded pseudo-random initialisation of bf16 buffers on the device (synthetic models for speed
// work: no host-side generation, no host-to-device copy of gigabytes of weights).
//
// out[i] = offset + scale * (2 * u(seed, i) - 1), u in [0, 1) from the top 24 bits of
// splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15). Deterministic for (seed, i), independent of
// the launch shape.

__device__ __forceinline__ u64 fk_splitmix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

extern "C" __global__ void init_uniform_bf16(bf16* __restrict__ out, u64 n, u64 seed, float scale,
                                             float offset) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const u64 h = fk_splitmix64(seed + (i + 1ull) * 0x9E3779B97F4A7C15ull);
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f);
        out[i] = f2bf(offset + scale * (2.0f * u - 1.0f));
    }
}

// out[r * row_len + j] = value for every row r < rows and column j < cols (cols <= row_len): the
// persistent dimensions of a synthetic embedding table (every token's row holds the same values
// there, like the "massive activations" of trained models).
extern "C" __global__ void init_fill_columns_bf16(bf16* __restrict__ out, u64 rows, u64 row_len,
                                                  u32 cols, float value) {
    const u64 n = rows * (u64)cols;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const bf16 v = f2bf(value);
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        out[(i / cols) * row_len + (i % cols)] = v;
    }
}
