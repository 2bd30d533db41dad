// Row-wise and element-wise kernels: embedding gather, residual add + RMSNorm, RoPE, SwiGLU,
// KV append into NHD pages. bf16 storage, fp32 math.

// out[r, :] = table[ids[r], :]. One block per row. An id outside the table gives a zero row.
extern "C" __global__ void embedding_bf16(bf16* __restrict__ out, const bf16* __restrict__ table,
                                          const u32* __restrict__ ids, u32 rows, u32 dim, u32 vocab) {
    const u32 r = blockIdx.x;
    if (r >= rows) return;
    const u32 id = ids[r];
    bf16* o = out + (u64)r * dim;
    if (id >= vocab) {
        for (u32 j = threadIdx.x; j < dim; j += blockDim.x) o[j] = f2bf(0.0f);
        return;
    }
    const bf16* t = table + (u64)id * dim;
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x) o[j] = t[j];
}

extern "C" __global__ void embedding_f32(float* __restrict__ out, const bf16* __restrict__ table,
                                         const u32* __restrict__ ids, u32 rows, u32 dim, u32 vocab) {
    const u32 r = blockIdx.x;
    if (r >= rows) return;
    const u32 id = ids[r];
    float* o = out + (u64)r * dim;
    if (id >= vocab) {
        for (u32 j = threadIdx.x; j < dim; j += blockDim.x) o[j] = 0.0f;
        return;
    }
    const bf16* t = table + (u64)id * dim;
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x) o[j] = bf2f(t[j]);
}

// x[r] += residual[r] (stored back rounded to bf16, when residual != null);
// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w. One block per row; the norm is taken over the rounded x.
extern "C" __global__ void add_rmsnorm_bf16(bf16* __restrict__ x, const bf16* __restrict__ residual,
                                            const bf16* __restrict__ w, bf16* __restrict__ y, u32 rows,
                                            u32 dim, float eps) {
    __shared__ float scratch[32];
    const u32 r = blockIdx.x;
    if (r >= rows) return;
    bf16* xr = x + (u64)r * dim;
    const bf16* rr = residual ? residual + (u64)r * dim : nullptr;
    float ss = 0.0f;
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x) {
        float v = bf2f(xr[j]);
        if (rr) {
            bf16 s = f2bf(v + bf2f(rr[j]));
            xr[j] = s;
            v = bf2f(s);
        }
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)dim + eps);
    bf16* yr = y + (u64)r * dim;
    for (u32 j = threadIdx.x; j < dim; j += blockDim.x) {
        yr[j] = f2bf(bf2f(xr[j]) * inv * bf2f(w[j]));
    }
}

// Rotary embedding in place on x[token * row_stride + head * head_dim + ...] for `heads` heads.
// neox = 0: adjacent pairs (2i, 2i+1) (GGUF "normal"); neox = 1: rotate-half pairs (i, i + d/2).
// Frequency of pair i: theta^(-2i/d) / factors[i] (factors may be null). Angle = pos * freq, fp32.
// One block per token.
extern "C" __global__ void rope_bf16(bf16* __restrict__ x, const i32* __restrict__ positions,
                                     const float* __restrict__ factors, u32 tokens, u32 heads,
                                     u32 head_dim, u64 row_stride, float theta, u32 neox) {
    extern __shared__ float cs[];  // [half] cos, then [half] sin
    const u32 t = blockIdx.x;
    if (t >= tokens) return;
    const u32 half = head_dim / 2;
    const float pos = (float)positions[t];
    for (u32 i = threadIdx.x; i < half; i += blockDim.x) {
        float inv_freq = (float)pow((double)theta, -2.0 * (double)i / (double)head_dim);
        if (factors) inv_freq = inv_freq / factors[i];
        const float ang = pos * inv_freq;
        float s, c;
        sincosf(ang, &s, &c);
        cs[i] = c;
        cs[half + i] = s;
    }
    __syncthreads();
    bf16* xt = x + (u64)t * row_stride;
    const u32 pairs = heads * half;
    for (u32 p = threadIdx.x; p < pairs; p += blockDim.x) {
        const u32 h = p / half, i = p % half;
        bf16* xh = xt + (u64)h * head_dim;
        const u32 a = neox ? i : 2 * i;
        const u32 b = neox ? i + half : 2 * i + 1;
        const float x0 = bf2f(xh[a]), x1 = bf2f(xh[b]);
        const float c = cs[i], s = cs[half + i];
        xh[a] = f2bf(x0 * c - x1 * s);
        xh[b] = f2bf(x0 * s + x1 * c);
    }
}

// out[r, j] = silu(gate[r * gate_stride + j]) * up[r * up_stride + j]; out is [rows, cols].
extern "C" __global__ void swiglu_bf16(bf16* __restrict__ out, const bf16* __restrict__ gate,
                                       const bf16* __restrict__ up, u32 rows, u32 cols, u64 gate_stride,
                                       u64 up_stride) {
    const u32 r = blockIdx.y;
    if (r >= rows) return;
    const bf16* g = gate + (u64)r * gate_stride;
    const bf16* u = up + (u64)r * up_stride;
    bf16* o = out + (u64)r * cols;
    for (u32 j = blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += gridDim.x * blockDim.x) {
        const float gv = bf2f(g[j]);
        const float s = gv / (1.0f + expf(-gv));
        o[j] = f2bf(s * bf2f(u[j]));
    }
}

// Writes token t's K and V rows ([kv_heads * head_dim] each, at k + t * k_stride, v + t * v_stride)
// into the NHD page pool pages[num_pages][2][page_size][kv_heads][head_dim] at the page
// page_table[seq * table_stride + pos / page_size], slot pos % page_size, where seq = token_seq[t]
// and pos = positions[t]. A token whose sequence, position or page is out of range is skipped.
extern "C" __global__ void kv_append_bf16(bf16* __restrict__ pages, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, const i32* __restrict__ page_table,
                                          const i32* __restrict__ token_seq, const i32* __restrict__ positions,
                                          u32 tokens, u32 kv_heads, u32 head_dim, u32 page_size,
                                          u32 num_pages, u32 table_stride, u32 num_seqs, u64 k_stride,
                                          u64 v_stride) {
    const u32 t = blockIdx.x;
    if (t >= tokens) return;
    const i32 seq = token_seq[t];
    const i32 pos = positions[t];
    if (seq < 0 || (u32)seq >= num_seqs || pos < 0) return;
    const u32 lp = (u32)pos / page_size;
    if (lp >= table_stride) return;
    const i32 page = page_table[(u64)seq * table_stride + lp];
    if (page < 0 || (u32)page >= num_pages) return;
    const u32 slot = (u32)pos % page_size;
    const u64 row = (u64)kv_heads * head_dim;
    bf16* dk = pages + ((u64)page * 2 * page_size + slot) * row;
    bf16* dv = pages + (((u64)page * 2 + 1) * page_size + slot) * row;
    const bf16* sk = k + (u64)t * k_stride;
    const bf16* sv = v + (u64)t * v_stride;
    for (u32 j = threadIdx.x; j < row; j += blockDim.x) {
        dk[j] = sk[j];
        dv[j] = sv[j];
    }
}
