// Skinny matrix products for decode steps (T <= 8 token rows) and fused decode-step kernels.
// bf16 storage, fp32 math.
//
// gemv: y[t, o] = sum_i x[t, i] * w[o, i] for t < T; x is [T, k] and w [n, k], both row-major and
// contiguous, k % 8 == 0, x and w 16-byte aligned (checked on the host). One block per R
// consecutive rows of w (R output columns); its threads stride over k in 16-byte chunks, so each
// weight byte is read exactly once for all T token rows. Weights stream through
// ld.global.nc.L1::no_allocate (no reuse: keep L1 for x, which every block reads).
//
// Modes (template MODE):
//   0: plain product; `accumulate` adds the old y (the residual add of a decoder's o / down
//      projection: x += o · Wᵀ in one pass, no separate add kernel).
//   1: RMSNorm prologue: y[t, o] = inv[t] · sum_i x[t, i] g[i] w[o, i] with
//      inv[t] = 1 / sqrt(mean_i x[t, i]² + eps): the norm's per-row scale factors out of the
//      product, so each block accumulates sum x² alongside the dot products (no extra pass, no
//      normalised copy of x).
//   2: RMSNorm prologue + SwiGLU epilogue over a fused [gate | up] weight of n = 2·ff rows: each
//      block owns R/2 gate rows j and the matching up rows ff + j and writes
//      out[t, j] = silu(a) · b (a, b the normalised products), [T, ff].

#define GEMV_MAX_WARPS 8

// Programmatic dependent launch (sm_90). A kernel launched with programmatic stream
// serialization may start before its predecessor in the stream has finished: it reads only
// weights (never written during a step) before pdl_wait(), which returns once the predecessor
// has completed and its memory is visible (at once for a normal launch). pdl_trigger() lets the
// next such kernel start early; it is issued after pdl_wait(), so a dependent's early weight
// reads still come after everything this kernel waited for.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_trigger() {
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

// 16 bytes of weights, read once: bypass L1.
__device__ __forceinline__ uint4 gemv_ld_w(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__host__ __device__ constexpr int gemv_next_pow2(int n) {
    int p = 1;
    while (p < n) p *= 2;
    return p;
}
__host__ __device__ constexpr int gemv_log2(int n) {
    int l = 0;
    while ((1 << l) < n) ++l;
    return l;
}

// Warp "reduce-scatter" of V (a power of two) per-lane values: at each butterfly step a lane keeps
// one half of its values and sends the other half, so the step count is about V + 5 shuffles
// instead of 5·V. Afterwards lane `l` holds the warp-wide sums of the V >> S values starting at
// index (l >> (5 - S)) · (V >> S), S = min(log2 V, 5), in v[0 .. V >> S).
template <int CUR, int O, int V>
__device__ __forceinline__ void gemv_rs_step(float (&v)[V], int lane) {
    if constexpr (O >= 1) {
        if constexpr (CUR > 1) {
            constexpr int H = CUR / 2;
            const bool upper = (lane & O) != 0;
#pragma unroll
            for (int i = 0; i < H; ++i) {
                const float send = upper ? v[i] : v[i + H];
                const float keep = upper ? v[i + H] : v[i];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
            }
            gemv_rs_step<H, O / 2, V>(v, lane);
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], O);
            gemv_rs_step<1, O / 2, V>(v, lane);
        }
    }
}

// One 16-byte chunk c of every row: acc[t][r] += x[t, 8c..8c+8) · w[r, 8c..8c+8) (x scaled by g
// in the norm modes, which also accumulate ss[t] += x²).
template <int T, int R, bool NORM>
__device__ __forceinline__ void gemv_chunk(float (&acc)[T][R], float (&ss)[T], const uint4 (&wv)[R],
                                           const uint4* __restrict__ xr,
                                           const uint4* __restrict__ gr, u32 c, u32 kc, u32 rows) {
    float wf[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) unpack8(wv[r], wf[r]);
    float gf[8];
    if constexpr (NORM) unpack8(__ldg(gr + c), gf);
#pragma unroll
    for (int t = 0; t < T; ++t) {
        float xf[8];
        // Token rows past `rows` (a T-row kernel serving fewer rows) read nothing and add 0.
        const uint4 xv = (u32)t < rows ? __ldg(xr + (u64)t * kc + c) : make_uint4(0, 0, 0, 0);
        unpack8(xv, xf);
        if constexpr (NORM) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                ss[t] = fmaf(xf[e], xf[e], ss[t]);
                xf[e] *= gf[e];
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[t][r] = fmaf(xf[e], wf[r][e], acc[t][r]);
        }
    }
}

#define GEMV_ACCUMULATE 1u
#define GEMV_F32_OUT 2u

template <int T, int R, int MODE>
__device__ __forceinline__ void gemv_impl(void* __restrict__ y, const bf16* __restrict__ x,
                                          const bf16* __restrict__ w, const bf16* __restrict__ g,
                                          u32 rows, u32 n, u32 k, float eps, u32 flags) {
    constexpr bool NORM = MODE >= 1;
    constexpr bool SWIGLU = MODE == 2;
    constexpr int P = SWIGLU ? R / 2 : R;  // output columns per block
    constexpr int V0 = T * R + (NORM ? T : 0);
    constexpr int V = gemv_next_pow2(V0);
    constexpr int LV = gemv_log2(V);
    constexpr int S = LV < 5 ? LV : 5;
    constexpr int C = V >> S;
    // Chunks whose weights are in flight together per thread: two while registers allow.
    constexpr int U = (T * R <= 8) ? 2 : 1;
    __shared__ float red[GEMV_MAX_WARPS][V];
    __shared__ float tot[V0];

    const u32 nt = blockDim.x;
    const u32 kc = k >> 3;
    const u32 cols = SWIGLU ? n / 2 : n;
    const u32 c0 = blockIdx.x * P;
    const uint4* wr[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const u32 col = c0 + (SWIGLU ? (r % P) : r);
        u32 row = (SWIGLU && r >= P) ? col + cols : col;
        if (col >= cols) row = 0;  // past the end: read row 0 (in bounds), result dropped
        wr[r] = reinterpret_cast<const uint4*>(w + (u64)row * k);
    }
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    const uint4* gr = reinterpret_cast<const uint4*>(g);

    float acc[T][R];
    float ss[T];
#pragma unroll
    for (int t = 0; t < T; ++t) {
        ss[t] = 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) acc[t][r] = 0.0f;
    }

    // Software-pipelined over groups of U chunks per row. The first group's weights are loaded
    // before pdl_wait(): with a programmatic launch they stream in while the predecessor drains.
    u32 c = threadIdx.x;
    uint4 wv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r)
            wv[u][r] = c + u * nt < kc ? gemv_ld_w(wr[r] + c + u * nt) : make_uint4(0, 0, 0, 0);
    pdl_wait();
    pdl_trigger();
    while (true) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (c + u * nt < kc) gemv_chunk<T, R, NORM>(acc, ss, wv[u], xr, gr, c + u * nt, kc, rows);
        }
        c += U * nt;
        if (c >= kc) break;
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int r = 0; r < R; ++r)
                wv[u][r] = c + u * nt < kc ? gemv_ld_w(wr[r] + c + u * nt) : make_uint4(0, 0, 0, 0);
    }

    // Block reduction: warp reduce-scatter, then one thread per value sums over the warps.
    float v[V];
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = 0.0f;
#pragma unroll
    for (int t = 0; t < T; ++t) {
#pragma unroll
        for (int r = 0; r < R; ++r) v[t * R + r] = acc[t][r];
        if constexpr (NORM) v[T * R + t] = ss[t];
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    gemv_rs_step<V, 16, V>(v, lane);
    if ((lane & ((1 << (5 - S)) - 1)) == 0) {
        const int base = (lane >> (5 - S)) * C;
#pragma unroll
        for (int i = 0; i < C; ++i) {
            if (base + i < V0) red[warp][base + i] = v[i];
        }
    }
    __syncthreads();
    const int nw = (int)(nt >> 5);
    for (int i = threadIdx.x; i < V0; i += nt) {
        float s = 0.0f;
        for (int q = 0; q < nw; ++q) s += red[q][i];
        tot[i] = s;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < T * P; i += nt) {
        const int t = i / P, p = i % P;
        const u32 col = c0 + p;
        if (col >= cols || (u32)t >= rows) continue;
        const float inv = NORM ? rsqrtf(tot[T * R + t] / (float)k + eps) : 1.0f;
        float val;
        if constexpr (SWIGLU) {
            const float a = tot[t * R + p] * inv;
            const float b = tot[t * R + P + p] * inv;
            val = a / (1.0f + expf(-a)) * b;
        } else {
            val = tot[t * R + p] * inv;
        }
        const u64 at = (u64)t * cols + col;
        if (flags & GEMV_F32_OUT) {
            float* dst = static_cast<float*>(y) + at;
            if (flags & GEMV_ACCUMULATE) val += *dst;
            *dst = val;
        } else {
            bf16* dst = static_cast<bf16*>(y) + at;
            if (flags & GEMV_ACCUMULATE) val += bf2f(*dst);
            *dst = f2bf(val);
        }
    }
}

// Every kernel takes (y, x, w, g, rows, n, k, eps, flags): `rows` <= T token rows, y bf16 or (flag
// GEMV_F32_OUT) f32; g and eps are ignored by the plain mode, GEMV_ACCUMULATE by the SwiGLU mode.
// T = 1, 2, 4, 8 serve every row count up to 8 (rows past `rows` cost registers, not memory).
#define GEMV_KERNEL(NAME, T, R, MODE)                                                               \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        NAME(void* __restrict__ y, const bf16* __restrict__ x, const bf16* __restrict__ w,          \
             const bf16* __restrict__ g, u32 rows, u32 n, u32 k, float eps, u32 flags) {            \
        gemv_impl<T, R, MODE>(y, x, w, g, rows, n, k, eps, flags);                                  \
    }

#define GEMV_ALL_MODES(T, R)                           \
    GEMV_KERNEL(gemv_t##T##_r##R, T, R, 0)             \
    GEMV_KERNEL(gemv_norm_t##T##_r##R, T, R, 1)        \
    GEMV_KERNEL(gemv_swiglu_t##T##_r##R, T, R, 2)

GEMV_ALL_MODES(1, 2)
GEMV_ALL_MODES(1, 4)
GEMV_ALL_MODES(1, 8)
GEMV_ALL_MODES(2, 2)
GEMV_ALL_MODES(2, 4)
GEMV_ALL_MODES(2, 8)
GEMV_ALL_MODES(4, 2)
GEMV_ALL_MODES(4, 4)
GEMV_ALL_MODES(8, 2)
GEMV_ALL_MODES(8, 4)

// Tensor-core variant (mma.sync m16n8k16, bf16 in, fp32 accumulation) for 3 to 8 token rows,
// where the CUDA-core kernel runs out of FMA issue slots. A block owns 16 weight rows (plain /
// norm: output columns c0..c0+15; SwiGLU: gate rows j0..j0+7 as mma rows 0-7 and the matching up
// rows as mma rows 8-15) and its warps split k; the token rows are the mma's N = 8 columns (rows
// past `rows` are zero). Because the products sum over k, A and B may use any common permutation
// of k within an mma: lane (g = lane / 4, q = lane % 4) loads the 16-byte chunk 4·it + q of weight
// rows g and g + 8 and of token row g, and feeds elements 0-3 to one mma and 4-7 to the next, so
// every operand comes straight from one 16-byte load (no shared memory, no shuffles).
#define GEMV_MMA_U 4

__device__ __forceinline__ void gemv_mma(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                         u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int MODE>
__device__ __forceinline__ void gemv_mma_impl(void* __restrict__ y, const bf16* __restrict__ x,
                                              const bf16* __restrict__ w,
                                              const bf16* __restrict__ g, u32 rows, u32 n, u32 k,
                                              float eps, u32 flags) {
    constexpr bool NORM = MODE >= 1;
    constexpr bool SWIGLU = MODE == 2;
    constexpr int U = GEMV_MMA_U;
    __shared__ float red[GEMV_MAX_WARPS][16][9];
    __shared__ float ssr[GEMV_MAX_WARPS][8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nw = (int)(blockDim.x >> 5);
    const int gi = lane >> 2, q = lane & 3;
    const u32 cols = SWIGLU ? n / 2 : n;
    u32 row_a, row_b;
    if constexpr (SWIGLU) {
        const u32 j = blockIdx.x * 8 + gi;
        row_a = j < cols ? j : 0;
        row_b = j < cols ? j + cols : 0;
    } else {
        const u32 c0 = blockIdx.x * 16 + gi;
        row_a = c0 < cols ? c0 : 0;
        row_b = c0 + 8 < cols ? c0 + 8 : 0;
    }
    const uint4* wa = reinterpret_cast<const uint4*>(w + (u64)row_a * k);
    const uint4* wb = reinterpret_cast<const uint4*>(w + (u64)row_b * k);
    const bool xok = (u32)gi < rows;
    const uint4* xr = reinterpret_cast<const uint4*>(x + (u64)(xok ? gi : 0) * k);
    const uint4* gr = reinterpret_cast<const uint4*>(g);
    const u32 kc = k >> 3;
    const u32 nit = (kc + 3) / 4;  // iterations of 4 chunks (32 elements of k)
    const uint4 zero = make_uint4(0, 0, 0, 0);

    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float ss = 0.0f;
    u32 it = (u32)warp;
    uint4 A[U], B[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const u32 c = (it + u * nw) * 4 + q;
        A[u] = c < kc ? gemv_ld_w(wa + c) : zero;
        B[u] = c < kc ? gemv_ld_w(wb + c) : zero;
    }
    pdl_wait();
    pdl_trigger();
    while (true) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u32 c = (it + u * nw) * 4 + q;
            uint4 xv = (c < kc && xok) ? __ldg(xr + c) : zero;
            if constexpr (NORM) {
                const uint4 gv = c < kc ? __ldg(gr + c) : zero;
                float xf[8], gf[8];
                unpack8(xv, xf);
                unpack8(gv, gf);
#pragma unroll
                for (int e = 0; e < 8; ++e) ss = fmaf(xf[e], xf[e], ss);
                xv.x = pack_bf2(xf[0] * gf[0], xf[1] * gf[1]);
                xv.y = pack_bf2(xf[2] * gf[2], xf[3] * gf[3]);
                xv.z = pack_bf2(xf[4] * gf[4], xf[5] * gf[5]);
                xv.w = pack_bf2(xf[6] * gf[6], xf[7] * gf[7]);
            }
            gemv_mma(d, A[u].x, B[u].x, A[u].y, B[u].y, xv.x, xv.y);
            gemv_mma(d, A[u].z, B[u].z, A[u].w, B[u].w, xv.z, xv.w);
        }
        it += U * nw;
        if (it >= nit) break;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u32 c = (it + u * nw) * 4 + q;
            A[u] = c < kc ? gemv_ld_w(wa + c) : zero;
            B[u] = c < kc ? gemv_ld_w(wb + c) : zero;
        }
    }

    // d[0], d[1]: row gi, tokens 2q, 2q+1; d[2], d[3]: row gi + 8.
    red[warp][gi][2 * q] = d[0];
    red[warp][gi][2 * q + 1] = d[1];
    red[warp][gi + 8][2 * q] = d[2];
    red[warp][gi + 8][2 * q + 1] = d[3];
    if constexpr (NORM) {
        ss += __shfl_xor_sync(0xffffffffu, ss, 1);
        ss += __shfl_xor_sync(0xffffffffu, ss, 2);
        if (q == 0) ssr[warp][gi] = ss;
    }
    __syncthreads();
    constexpr int OUTS = SWIGLU ? 64 : 128;
    for (int i = threadIdx.x; i < OUTS; i += blockDim.x) {
        const int r = i >> 3, t = i & 7;
        const u32 col = SWIGLU ? blockIdx.x * 8 + r : blockIdx.x * 16 + r;
        if ((u32)t >= rows || col >= cols) continue;
        float a = 0.0f, b = 0.0f, sq = 0.0f;
        for (int wq = 0; wq < nw; ++wq) {
            a += red[wq][r][t];
            if constexpr (SWIGLU) b += red[wq][r + 8][t];
            if constexpr (NORM) sq += ssr[wq][t];
        }
        float val;
        if constexpr (NORM) {
            const float inv = rsqrtf(sq / (float)k + eps);
            a *= inv;
            b *= inv;
        }
        if constexpr (SWIGLU) {
            val = a / (1.0f + expf(-a)) * b;
        } else {
            val = a;
        }
        const u64 at = (u64)t * cols + col;
        if (flags & GEMV_F32_OUT) {
            float* dst = static_cast<float*>(y) + at;
            if (flags & GEMV_ACCUMULATE) val += *dst;
            *dst = val;
        } else {
            bf16* dst = static_cast<bf16*>(y) + at;
            if (flags & GEMV_ACCUMULATE) val += bf2f(*dst);
            *dst = f2bf(val);
        }
    }
}

#define GEMV_MMA_KERNEL(NAME, MODE)                                                                 \
    extern "C" __global__ void __launch_bounds__(256)                                               \
        NAME(void* __restrict__ y, const bf16* __restrict__ x, const bf16* __restrict__ w,          \
             const bf16* __restrict__ g, u32 rows, u32 n, u32 k, float eps, u32 flags) {            \
        gemv_mma_impl<MODE>(y, x, w, g, rows, n, k, eps, flags);                                    \
    }

GEMV_MMA_KERNEL(gemv_mma, 0)
GEMV_MMA_KERNEL(gemv_norm_mma, 1)
GEMV_MMA_KERNEL(gemv_swiglu_mma, 2)

// Fused RoPE + KV append: one block per token t. First rotates, in place, the q_heads heads at
// element q_off and the kv_heads heads at element k_off of row t of `qkv` (rows `row_stride`
// apart; head_dim elements per head; the same math as rope_bf16, so the results are
// bit-identical), then copies that row's rotated K and its V (kv_heads · head_dim elements at
// v_off) into the NHD page pool exactly as kv_append_bf16 does: a token whose sequence, position
// or page is out of range is rotated but not appended.
extern "C" __global__ void rope_kv_append_bf16(
    bf16* __restrict__ qkv, const i32* __restrict__ positions, const float* __restrict__ factors,
    bf16* __restrict__ pages, const i32* __restrict__ page_table, const i32* __restrict__ token_seq,
    u32 tokens, u32 q_heads, u32 kv_heads, u32 head_dim, u64 row_stride, u64 q_off, u64 k_off,
    u64 v_off, float theta, u32 neox, u32 page_size, u32 num_pages, u32 table_stride,
    u32 num_seqs) {
    extern __shared__ float cs[];  // [half] cos, then [half] sin
    pdl_wait();
    pdl_trigger();
    const u32 t = blockIdx.x;
    if (t >= tokens) return;
    const u32 half = head_dim / 2;
    const i32 pos = positions[t];
    const float posf = (float)pos;
    for (u32 i = threadIdx.x; i < half; i += blockDim.x) {
        float inv_freq = (float)pow((double)theta, -2.0 * (double)i / (double)head_dim);
        if (factors) inv_freq = inv_freq / factors[i];
        const float ang = posf * inv_freq;
        float s, c;
        sincosf(ang, &s, &c);
        cs[i] = c;
        cs[half + i] = s;
    }
    __syncthreads();
    bf16* xt = qkv + (u64)t * row_stride;
    const u32 pairs = (q_heads + kv_heads) * half;
    for (u32 p = threadIdx.x; p < pairs; p += blockDim.x) {
        const u32 h = p / half, i = p % half;
        bf16* xh = h < q_heads ? xt + q_off + (u64)h * head_dim
                               : xt + k_off + (u64)(h - q_heads) * head_dim;
        const u32 a = neox ? i : 2 * i;
        const u32 b = neox ? i + half : 2 * i + 1;
        const float x0 = bf2f(xh[a]), x1 = bf2f(xh[b]);
        const float c = cs[i], s = cs[half + i];
        xh[a] = f2bf(x0 * c - x1 * s);
        xh[b] = f2bf(x0 * s + x1 * c);
    }
    // The rotated K must be visible to every thread of the block before the copy.
    __syncthreads();
    const i32 seq = token_seq[t];
    if (seq < 0 || (u32)seq >= num_seqs || pos < 0) return;
    const u32 lp = (u32)pos / page_size;
    if (lp >= table_stride) return;
    const i32 page = page_table[(u64)seq * table_stride + lp];
    if (page < 0 || (u32)page >= num_pages) return;
    const u32 slot = (u32)pos % page_size;
    const u64 row = (u64)kv_heads * head_dim;
    bf16* dk = pages + ((u64)page * 2 * page_size + slot) * row;
    bf16* dv = pages + (((u64)page * 2 + 1) * page_size + slot) * row;
    const bf16* sk = xt + k_off;
    const bf16* sv = xt + v_off;
    for (u32 j = threadIdx.x; j < row; j += blockDim.x) {
        dk[j] = sk[j];
        dv[j] = sv[j];
    }
}
