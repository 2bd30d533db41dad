// Paged decode attention (one query token per sequence) over NHD pages
// pages[num_pages][2][page_size][kv_heads][D], flash-decoding style:
//   grid = (num_splits, kv_heads * (group / G), batch), 128 threads.
// A block handles G query heads of one KV group (so every K/V row it loads serves G heads) over one
// split of the KV length. With one split it writes the normalised output directly; otherwise it
// writes (acc, m, l) in fp32 to a workspace and `decode_reduce` merges the splits.
// Scores are kept in the log2 domain (q is pre-scaled by scale * log2(e)).

#define DEC_THREADS 128
#define DEC_TILE 64

template <int D, int G>
__device__ __forceinline__ void decode_attn(const bf16* __restrict__ q, u64 q_stride, const bf16* __restrict__ pages,
                                            const i32* __restrict__ page_table, u32 table_stride,
                                            const i32* __restrict__ seq_lens, bf16* __restrict__ out,
                                            float* __restrict__ ws_acc, float* __restrict__ ws_ml, u32 q_heads,
                                            u32 kv_heads, u32 group, u32 page_size, u32 num_pages, u32 chunk,
                                            u32 num_splits, float scale_log2) {
    constexpr int LPT = D / 8;              // lanes per K/V row (8 elements = 16 bytes each)
    constexpr int TPP = DEC_THREADS / LPT;  // rows per pass
    constexpr int PASSES = DEC_TILE / TPP;
    constexpr int GW = (G + 3) / 4;  // heads per warp in the softmax step (4 warps)
    __shared__ float s_p[G][DEC_TILE];
    __shared__ float s_alpha[G];
    __shared__ float s_ml[G][2];
    __shared__ float s_red[TPP][D];

    const u32 split = blockIdx.x;
    const u32 nsub = group / G;
    const u32 kvh = blockIdx.y / nsub;
    const u32 sub = blockIdx.y % nsub;
    const u32 b = blockIdx.z;
    const u32 h0 = kvh * group + sub * G;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int li = tid % LPT;
    const int ri = tid / LPT;

    i32 len = seq_lens[b];
    const i32 cap = (i32)(table_stride * page_size);
    len = len < 0 ? 0 : (len > cap ? cap : len);
    const i32 start = (i32)(split * chunk);
    // The last split takes every remaining token, so lengths above the planned maximum stay exact.
    const i32 end = (split + 1 == num_splits) ? len : min(len, start + (i32)chunk);

    float qf[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        load8(q + (u64)b * q_stride + (u64)(h0 + g) * D + li * 8, qf[g]);
#pragma unroll
        for (int e = 0; e < 8; ++e) qf[g][e] *= scale_log2;
    }
    float acc[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = 0.0f;
    float m_r[GW], l_r[GW];
#pragma unroll
    for (int j = 0; j < GW; ++j) {
        m_r[j] = -FK_INF;
        l_r[j] = 0.0f;
    }

    const i32* table = page_table + (u64)b * table_stride;
    const u64 row = (u64)kv_heads * D;
    const u64 page_elems = 2ull * page_size * row;
    const u64 head_off = (u64)kvh * D + li * 8;

    for (i32 t0 = start; t0 < end; t0 += DEC_TILE) {
        uint4 kr[PASSES], vr[PASSES];
        bool ok[PASSES];
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const i32 pos = t0 + p * TPP + ri;
            ok[p] = false;
            kr[p] = make_uint4(0u, 0u, 0u, 0u);
            vr[p] = make_uint4(0u, 0u, 0u, 0u);
            if (pos < end) {
                const i32 pg = table[(u32)pos / page_size];
                if (pg >= 0 && (u32)pg < num_pages) {
                    ok[p] = true;
                    const bf16* kp = pages + (u64)pg * page_elems + (u64)((u32)pos % page_size) * row + head_off;
                    kr[p] = *reinterpret_cast<const uint4*>(kp);
                    vr[p] = *reinterpret_cast<const uint4*>(kp + (u64)page_size * row);
                }
            }
        }
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            float kf[8];
            unpack8(kr[p], kf);
            float dot[G];
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float d = 0.0f;
#pragma unroll
                for (int e = 0; e < 8; ++e) d = fmaf(qf[g][e], kf[e], d);
                dot[g] = d;
            }
#pragma unroll
            for (int o = LPT / 2; o > 0; o >>= 1)
#pragma unroll
                for (int g = 0; g < G; ++g) dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], o);
            if (li == 0) {
#pragma unroll
                for (int g = 0; g < G; ++g) s_p[g][p * TPP + ri] = ok[p] ? dot[g] : -FK_INF;
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < GW; ++j) {
            const int g = warp + 4 * j;
            if (g < G) {
                const float x0 = s_p[g][lane], x1 = s_p[g][lane + 32];
                const float mt = warp_max(fmaxf(x0, x1));
                const float mn = fmaxf(m_r[j], mt);
                const float base = (mn == -FK_INF) ? 0.0f : mn;
                const float alpha = exp2f(m_r[j] - base);
                const float p0 = exp2f(x0 - base), p1 = exp2f(x1 - base);
                l_r[j] = l_r[j] * alpha + warp_sum(p0 + p1);
                m_r[j] = mn;
                s_p[g][lane] = p0;
                s_p[g][lane + 32] = p1;
                if (lane == 0) s_alpha[g] = alpha;
            }
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float a = s_alpha[g];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] *= a;
        }
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            if (ok[p]) {
                float vf[8];
                unpack8(vr[p], vf);
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    const float pw = s_p[g][p * TPP + ri];
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(pw, vf[e], acc[g][e]);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int j = 0; j < GW; ++j) {
        const int g = warp + 4 * j;
        if (g < G && lane == 0) {
            s_ml[g][0] = m_r[j];
            s_ml[g][1] = l_r[j];
        }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
        __syncthreads();
#pragma unroll
        for (int e = 0; e < 8; ++e) s_red[ri][li * 8 + e] = acc[g][e];
        __syncthreads();
        if (tid < D) {
            float o = 0.0f;
#pragma unroll
            for (int r = 0; r < TPP; ++r) o += s_red[r][tid];
            const float m = s_ml[g][0], l = s_ml[g][1];
            const u32 h = h0 + g;
            if (num_splits == 1) {
                out[((u64)b * q_heads + h) * D + tid] = f2bf(l > 0.0f ? o / l : 0.0f);
            } else {
                const u64 slot = ((u64)b * q_heads + h) * num_splits + split;
                ws_acc[slot * D + tid] = o;
                if (tid == 0) {
                    ws_ml[slot * 2] = m;
                    ws_ml[slot * 2 + 1] = l;
                }
            }
        }
    }
}

#define DECODE_ARGS                                                                                      \
    const bf16 *__restrict__ q, u64 q_stride, const bf16 *__restrict__ pages,                              \
        const i32 *__restrict__ page_table, u32 table_stride, const i32 *__restrict__ seq_lens,            \
        bf16 *__restrict__ out, float *__restrict__ ws_acc, float *__restrict__ ws_ml, u32 q_heads,        \
        u32 kv_heads, u32 group, u32 page_size, u32 num_pages, u32 chunk, u32 num_splits, float scale_log2
#define DECODE_PASS                                                                                      \
    q, q_stride, pages, page_table, table_stride, seq_lens, out, ws_acc, ws_ml, q_heads, kv_heads, group, \
        page_size, num_pages, chunk, num_splits, scale_log2
#define DECODE_INST(D, G)                                                                     \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS) decode_attn_d##D##_g##G(DECODE_ARGS) { \
        decode_attn<D, G>(DECODE_PASS);                                                       \
    }

DECODE_INST(64, 1)
DECODE_INST(64, 2)
DECODE_INST(64, 3)
DECODE_INST(64, 4)
DECODE_INST(64, 5)
DECODE_INST(64, 6)
DECODE_INST(64, 7)
DECODE_INST(64, 8)
DECODE_INST(128, 1)
DECODE_INST(128, 2)
DECODE_INST(128, 3)
DECODE_INST(128, 4)
DECODE_INST(128, 5)
DECODE_INST(128, 6)
DECODE_INST(128, 7)
DECODE_INST(128, 8)

// Merges the per-split partial results: grid = (q_heads, batch), blockDim >= 32.
extern "C" __global__ void decode_reduce(bf16* __restrict__ out, const float* __restrict__ ws_acc,
                                         const float* __restrict__ ws_ml, u32 q_heads, u32 num_splits,
                                         u32 head_dim) {
    const u32 h = blockIdx.x, b = blockIdx.y;
    const u64 base = ((u64)b * q_heads + h) * num_splits;
    float mx = -FK_INF;
    for (u32 s = 0; s < num_splits; ++s) mx = fmaxf(mx, ws_ml[(base + s) * 2]);
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float l = 0.0f, o = 0.0f;
        if (mx != -FK_INF) {
            for (u32 s = 0; s < num_splits; ++s) {
                const float w = exp2f(ws_ml[(base + s) * 2] - mx);
                l = fmaf(w, ws_ml[(base + s) * 2 + 1], l);
                o = fmaf(w, ws_acc[(base + s) * head_dim + d], o);
            }
        }
        out[((u64)b * q_heads + h) * head_dim + d] = f2bf(l > 0.0f ? o / l : 0.0f);
    }
}
