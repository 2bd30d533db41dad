// Token selection on the device: argmax and temperature / top-k / top-p sampling with a given
// uniform number per row. One block of 1024 threads per row.
//
// Tokens are ordered by (logit desc, index asc) through a unique 64-bit key (common.cuh). Sampling:
//  1. temperature <= 0 or top_k == 1: the argmax (lowest index among equal maxima).
//  2. keep the first k tokens of the order (k = top_k when 0 < top_k < vocab, else all);
//  3. weights w_i = exp((x_i - x_max) / T) in fixed point (2^32 = weight of the maximum), so every
//     sum is an exact, order-independent integer;
//  4. top_p < 1: keep the shortest prefix whose weight reaches ceil(top_p * Z) (at least one token);
//  5. pick the first token of the prefix whose cumulative weight reaches floor(u * Z') + 1.
// When at most 1024 tokens remain after step 2 they are sorted in shared memory; otherwise steps 4-5
// use radix selection over the whole row (exact as well, slower).

#define SMP_THREADS 1024
#define SMP_CAP 1024

struct SelState {
    u64 hist[256];
    u64 prefix;
    u64 above;
};

__device__ __forceinline__ u64 weight_of(float x, float xm, float inv_t) {
    const float e = expf((x - xm) * inv_t);
    if (!(e > 0.0f)) return 0ull;
    return (u64)(e * 4294967296.0f);
}

__device__ __forceinline__ u64 warp_max_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u64 w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}
__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ u64 block_max_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max_u64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    u64 t = (lane < (int)(blockDim.x >> 5)) ? scratch[lane] : 0ull;
    return warp_max_u64(t);
}
__device__ u64 block_sum_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_u64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    u64 t = (lane < (int)(blockDim.x >> 5)) ? scratch[lane] : 0ull;
    return warp_sum_u64(t);
}

// The key tau (>= floor_key) at which the cumulative weight, walking the order from the top,
// first reaches `target` (1 <= target <= total weight above floor_key). Weight = 1 per token or
// its fixed-point probability weight.
__device__ u64 radix_select(const float* __restrict__ x, u32 n, u64 floor_key, u64 target, bool by_weight,
                            float xm, float inv_t, SelState* st) {
    u64 prefix = 0ull, above = 0ull;
    for (int p = 0; p < 8; ++p) {
        const int shift = 56 - 8 * p;
        for (int i = threadIdx.x; i < 256; i += blockDim.x) st->hist[i] = 0ull;
        __syncthreads();
        for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
            const float xv = x[i];
            const u64 key = sort_key(xv, i);
            if (key < floor_key) continue;
            if (p > 0 && (key >> (shift + 8)) != prefix) continue;
            const u64 w = by_weight ? weight_of(xv, xm, inv_t) : 1ull;
            if (w) atomicAdd(&st->hist[(key >> shift) & 255ull], w);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            u64 cum = above;
            int d = 255;
            for (; d > 0; --d) {
                if (cum + st->hist[d] >= target) break;
                cum += st->hist[d];
            }
            st->above = cum;
            st->prefix = (prefix << 8) | (u64)d;
        }
        __syncthreads();
        prefix = st->prefix;
        above = st->above;
    }
    return prefix;
}

__device__ __forceinline__ u64 clamp_target(double t, u64 total) {
    if (!(t >= 1.0)) return 1ull;
    if (t >= (double)total) return total;
    return (u64)t;
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS)
    argmax_f32(i32* __restrict__ out, const float* __restrict__ logits, u32 vocab, u64 row_stride, u32 rows) {
    __shared__ u64 scratch[32];
    const u32 r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (u64)r * row_stride;
    u64 best = 0ull;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        const u64 k = sort_key(x[i], i);
        best = k > best ? k : best;
    }
    best = block_max_u64(best, scratch);
    if (threadIdx.x == 0) out[r] = (i32)key_index(best);
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS)
    sample_f32(i32* __restrict__ out, const float* __restrict__ logits, u32 vocab, u64 row_stride,
               const float* __restrict__ temps, const i32* __restrict__ top_ks, const float* __restrict__ top_ps,
               const float* __restrict__ uniforms, u32 rows) {
    __shared__ SelState st;
    __shared__ u64 s_key[SMP_CAP];
    __shared__ u64 s_cum[SMP_CAP];
    __shared__ u64 scratch[32];
    __shared__ u32 s_count;
    __shared__ u32 s_pick;
    const u32 r = blockIdx.x;
    if (r >= rows) return;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float* x = logits + (u64)r * row_stride;

    u64 best = 0ull;
    for (u32 i = tid; i < vocab; i += blockDim.x) {
        const u64 k = sort_key(x[i], i);
        best = k > best ? k : best;
    }
    best = block_max_u64(best, scratch);
    const u32 top = key_index(best);
    const float T = temps[r];
    const i32 K = top_ks[r];
    const float P = top_ps[r];
    float u = uniforms[r];
    if (!(u >= 0.0f)) u = 0.0f;
    const float xm = x[top];
    if (!(T > 0.0f) || K == 1 || !(xm > -FK_INF) || xm == FK_INF) {
        if (tid == 0) out[r] = (i32)top;
        return;
    }
    const float inv_t = 1.0f / T;
    const u32 k = (K > 0 && (u32)K < vocab) ? (u32)K : vocab;
    u64 floor_k = 0ull;
    if (k < vocab) floor_k = radix_select(x, vocab, 0ull, (u64)k, false, xm, inv_t, &st);

    if (k <= SMP_CAP) {
        if (tid == 0) s_count = 0u;
        __syncthreads();
        for (u32 i = tid; i < vocab; i += blockDim.x) {
            const u64 key = sort_key(x[i], i);
            if (key >= floor_k) {
                const u32 slot = atomicAdd(&s_count, 1u);
                if (slot < SMP_CAP) s_key[slot] = key;
            }
        }
        __syncthreads();
        const u32 n = min(s_count, (u32)SMP_CAP);
        for (u32 i = n + tid; i < SMP_CAP; i += blockDim.x) s_key[i] = 0ull;
        // bitonic sort, descending
        for (u32 size = 2; size <= SMP_CAP; size <<= 1) {
            for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
                __syncthreads();
                const u32 i = tid, j = tid ^ stride;
                if (j > i) {
                    const u64 a = s_key[i], c = s_key[j];
                    const bool desc = (i & size) == 0;
                    if (desc ? (a < c) : (a > c)) {
                        s_key[i] = c;
                        s_key[j] = a;
                    }
                }
            }
        }
        __syncthreads();
        u64 w = ((u32)tid < n) ? weight_of(x[key_index(s_key[tid])], xm, inv_t) : 0ull;
        // inclusive block scan
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u64 y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        if (lane == 31) scratch[warp] = w;
        __syncthreads();
        if (warp == 0) {
            u64 t = scratch[lane];
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const u64 y = __shfl_up_sync(0xffffffffu, t, o);
                if (lane >= o) t += y;
            }
            scratch[lane] = t;
        }
        __syncthreads();
        if (warp > 0) w += scratch[warp - 1];
        s_cum[tid] = w;
        __syncthreads();
        const u64 z = s_cum[n - 1];
        u32 cut = n - 1;
        if (P < 1.0f) {
            const u64 tp = clamp_target(ceil((double)P * (double)z), z);
            if (tid == 0) s_pick = n - 1;
            __syncthreads();
            if ((u32)tid < n && s_cum[tid] >= tp && (tid == 0 || s_cum[tid - 1] < tp)) s_pick = tid;
            __syncthreads();
            cut = s_pick;
            __syncthreads();
        }
        const u64 zp = s_cum[cut];
        const u64 ts = clamp_target(floor((double)u * (double)zp) + 1.0, zp);
        if (tid == 0) s_pick = cut;
        __syncthreads();
        if ((u32)tid <= cut && s_cum[tid] >= ts && (tid == 0 || s_cum[tid - 1] < ts)) s_pick = tid;
        __syncthreads();
        if (tid == 0) out[r] = (i32)key_index(s_key[s_pick]);
        return;
    }

    // Large candidate set: radix selection by weight over the row.
    u64 z = 0ull;
    for (u32 i = tid; i < vocab; i += blockDim.x) {
        const float xv = x[i];
        if (sort_key(xv, i) >= floor_k) z += weight_of(xv, xm, inv_t);
    }
    z = block_sum_u64(z, scratch);
    u64 floor_p = floor_k, zp = z;
    if (P < 1.0f) {
        const u64 tp = clamp_target(ceil((double)P * (double)z), z);
        floor_p = radix_select(x, vocab, floor_k, tp, true, xm, inv_t, &st);
        u64 s = 0ull;
        for (u32 i = tid; i < vocab; i += blockDim.x) {
            const float xv = x[i];
            if (sort_key(xv, i) >= floor_p) s += weight_of(xv, xm, inv_t);
        }
        zp = block_sum_u64(s, scratch);
    }
    const u64 ts = clamp_target(floor((double)u * (double)zp) + 1.0, zp);
    const u64 pick = radix_select(x, vocab, floor_p, ts, true, xm, inv_t, &st);
    if (tid == 0) out[r] = (i32)key_index(pick);
}
