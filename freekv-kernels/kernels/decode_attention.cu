// Paged decode attention (one query token per sequence) over NHD pages (dynamic shared memory:
// DEC_STAGES * 2 * 64 * D * 2 bytes, set by the launcher)
// pages[num_pages][2][page_size][kv_heads][D], flash-decoding style:
//   grid = (num_splits, kv_heads * (group / G), batch), 128 threads.
// A block handles G query heads of one KV group (so every K/V row it loads serves G heads) over one
// split of the KV length. With one split it writes the normalised output directly; otherwise it
// writes (acc, m, l) in fp32 to a workspace and `decode_reduce` merges the splits.
// Scores are kept in the log2 domain (q is pre-scaled by scale * log2(e)).

#define DEC_THREADS 128
#define DEC_TILE 64
#define DEC_STAGES 3

// K/V tiles of 64 tokens stream through a DEC_STAGES-deep cp.async pipeline in dynamic shared
// memory: [stage][K|V][64 tokens][D/8 chunks of 16 bytes].
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
    static_assert(PASSES * 2 == LPT, "the reduce-scatter needs PASSES = LPT / 2");
    constexpr int CPT = DEC_TILE * LPT / DEC_THREADS;  // 16-byte chunks per thread per K (or V) tile
    constexpr int GW = (G + 3) / 4;  // heads per warp in the softmax step (4 warps)
    extern __shared__ uint4 kv_smem[];
    __shared__ float s_p[G][DEC_TILE];
    __shared__ float s_alpha[G];
    __shared__ float s_ml[G][2];
    __shared__ float s_red[TPP][D];
    __shared__ unsigned char s_ok[DEC_STAGES][DEC_TILE];

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
    const int ntiles = end > start ? (end - start + DEC_TILE - 1) / DEC_TILE : 0;

    const i32* table = page_table + (u64)b * table_stride;
    const u64 row = (u64)kv_heads * D;
    const u64 page_elems = 2ull * page_size * row;

    auto issue = [&](int tile) {
        const int stage = tile % DEC_STAGES;
        const i32 t0 = start + tile * DEC_TILE;
#pragma unroll
        for (int j = 0; j < CPT; ++j) {
            const int c = tid + j * DEC_THREADS;
            const int tok = c / LPT, part = c % LPT;
            const i32 pos = t0 + tok;
            uint4* dk = kv_smem + ((stage * 2 + 0) * DEC_TILE + tok) * LPT + part;
            uint4* dv = kv_smem + ((stage * 2 + 1) * DEC_TILE + tok) * LPT + part;
            bool ok = false;
            if (pos < end) {
                const i32 pg = table[(u32)pos / page_size];
                if (pg >= 0 && (u32)pg < num_pages) {
                    ok = true;
                    const bf16* kp = pages + (u64)pg * page_elems + (u64)((u32)pos % page_size) * row +
                                     (u64)kvh * D + part * 8;
                    cp_async16(dk, kp);
                    cp_async16(dv, kp + (u64)page_size * row);
                }
            }
            if (!ok) {
                *dk = make_uint4(0u, 0u, 0u, 0u);
                *dv = make_uint4(0u, 0u, 0u, 0u);
            }
            if (part == 0) s_ok[stage][tok] = ok ? 1 : 0;
        }
        cp_async_commit();
    };

#pragma unroll
    for (int st = 0; st < DEC_STAGES - 1; ++st) {
        if (st < ntiles) issue(st);
        else cp_async_commit();
    }

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

    for (int tile = 0; tile < ntiles; ++tile) {
        if (tile + DEC_STAGES - 1 < ntiles) issue(tile + DEC_STAGES - 1);
        else cp_async_commit();
        cp_async_wait<DEC_STAGES - 1>();
        __syncthreads();
        const int stage = tile % DEC_STAGES;
        const uint4* ks = kv_smem + (stage * 2 + 0) * DEC_TILE * LPT;
        const uint4* vs = kv_smem + (stage * 2 + 1) * DEC_TILE * LPT;
#pragma unroll
        if constexpr (G * D <= 5 * 128 || G <= 4) {
            float dot[PASSES][G];
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                const int tt = p * TPP + ri;
                float kf[8];
                unpack8(ks[tt * LPT + li], kf);
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    float d = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; ++e) d = fmaf(qf[g][e], kf[e], d);
                    dot[p][g] = d;
                }
            }
            // Reduce-scatter over the LPT lanes of each row group: every stage halves the passes
            // a lane holds (PASSES = LPT / 2), so lane li ends with pass li >> 1; a last exchange
            // with lane li ^ 1 completes the sum. About 2 * PASSES * G shuffles instead of
            // log2(LPT) * PASSES * G.
#pragma unroll
            for (int o = LPT / 2, cnt = PASSES; o >= 2; o >>= 1, cnt >>= 1) {
                const bool up = (li & o) != 0;
#pragma unroll
                for (int k = 0; k < cnt / 2; ++k) {
#pragma unroll
                    for (int g = 0; g < G; ++g) {
                        const float lo = dot[k][g], hi = dot[k + cnt / 2][g];
                        const float sent = __shfl_xor_sync(0xffffffffu, up ? lo : hi, o);
                        dot[k][g] = (up ? hi : lo) + sent;
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < G; ++g) dot[0][g] += __shfl_xor_sync(0xffffffffu, dot[0][g], 1);
            if ((li & 1) == 0) {
                const int tt = (li >> 1) * TPP + ri;
                const bool ok = s_ok[stage][tt] != 0;
#pragma unroll
                for (int g = 0; g < G; ++g) s_p[g][tt] = ok ? dot[0][g] : -FK_INF;
            }
        } else {
            // Large head tiles: a full butterfly per pass keeps the register footprint small.
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                const int tt = p * TPP + ri;
                float kf[8];
                unpack8(ks[tt * LPT + li], kf);
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
                    const bool ok = s_ok[stage][tt] != 0;
#pragma unroll
                    for (int g = 0; g < G; ++g) s_p[g][tt] = ok ? dot[g] : -FK_INF;
                }
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
            const int tt = p * TPP + ri;
            float vf[8];
            unpack8(vs[tt * LPT + li], vf);
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const float pw = s_p[g][tt];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[g][e] = fmaf(pw, vf[e], acc[g][e]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

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
