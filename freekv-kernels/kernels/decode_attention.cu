// Paged decode attention (one query token per sequence) over NHD pages
// pages[num_pages][2][page_size][kv_heads][D], flash-decoding style on the tensor cores:
//   grid = (num_splits, kv_heads * (group / G), batch), 128 threads (4 warps), dynamic shared
//   memory DEC_STAGES * 4 warps * (16 K rows + 16 V rows) * D * 2 bytes (set by the launcher).
// A block handles G (<= 8) query heads of one KV group over one split of the KV length; every K/V
// row it loads serves all G heads. Each warp streams its own 16-token tiles (tiles w, w + 4, ...
// of the split) through a private DEC_STAGES-deep cp.async pipeline, so the main loop has no
// block-wide barrier, and computes with mma.m16n8k16 (bf16 in, fp32 accumulate):
//   S^T[16 tokens][8 heads] = K[16][D] . Q^T[D][8]         (A = K via ldmatrix, B = Q in registers)
//   O^T[D][8 heads]        += V^T[D][16] . P^T[16][8]      (A = V via ldmatrix.trans, B = P)
// P is split into bf16 hi + lo parts (two mma) so the weights keep ~16 bits of mantissa. The four
// warps' (m, l, O) are merged through shared memory at the end. With one split the block writes
// the normalised output directly; otherwise it writes (O, m, l) in fp32 to a workspace and
// `decode_reduce` merges the splits. Scores are kept in the log2 domain (scale * log2(e)).
// Blocks are ordered head-fastest (the grid's linear index is remapped) so that the blocks of
// all KV heads of one split run together and read whole token rows of the pages.

#define DEC_THREADS 128
#define DEC_WARPS 4
#define DEC_WTILE 16
#define DEC_STAGES 3

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}
// c += A . B for one m16n8k16 tile (A row-major 16x16, B column-major 16x8, bf16; c fp32).
__device__ __forceinline__ void mma_bf16(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int D, int G>
__device__ __forceinline__ void decode_attn(const bf16* __restrict__ q, u64 q_stride, const bf16* __restrict__ pages,
                                            const i32* __restrict__ page_table, u32 table_stride,
                                            const i32* __restrict__ seq_lens, bf16* __restrict__ out,
                                            float* __restrict__ ws_acc, float* __restrict__ ws_ml, u32 q_heads,
                                            u32 kv_heads, u32 group, u32 page_size, u32 num_pages, u32 chunk,
                                            u32 num_splits, float scale_log2,
                                            const i32* __restrict__ head_flags, u32 head_filter,
                                            const i32* __restrict__ page_mask, u32 compact) {
    static_assert(G >= 1 && G <= 8, "one n8 mma tile holds at most 8 heads");
    static_assert(D == 64 || D == 128, "head dim 64 or 128");
    constexpr int CH = D / 8;         // 16-byte chunks per K/V row
    constexpr int RPI = 32 / CH;      // rows one warp-wide copy covers
    constexpr int ITERS = DEC_WTILE / RPI;
    constexpr int KS = D / 16;        // mma k-steps of Q.K^T and m-tiles of V^T.P^T
    constexpr int WSTAGE = 2 * DEC_WTILE * CH;  // uint4 per warp stage (K then V)
    extern __shared__ uint4 kv_smem[];
    __shared__ __align__(16) unsigned short s_p[DEC_WARPS][2][8][DEC_WTILE];  // P^T hi / lo, [head][token]
    __shared__ u32 s_mask[DEC_WARPS][DEC_STAGES];
    __shared__ float s_m[DEC_WARPS][8], s_l[DEC_WARPS][8];

    const u32 ny = gridDim.y;
    const u32 lin = blockIdx.x + gridDim.x * blockIdx.y;
    const u32 split = lin / ny;
    const u32 hy = lin % ny;
    const u32 nsub = group / G;
    const u32 kvh = hy / nsub;
    const u32 sub = hy % nsub;
    const u32 b = blockIdx.z;
    const u32 h0 = kvh * group + sub * G;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;  // mma fragment row group / column pair
    // Head filter (1: only KV heads whose flag is set, 2: only those whose flag is clear): the
    // other blocks exit before touching anything, so two filtered launches split one attention.
    if (head_filter != 0 && ((head_flags[(u64)b * kv_heads + kvh] != 0) != (head_filter == 1))) return;

    i32 len = seq_lens[b];
    const i32 cap = (i32)(table_stride * page_size);
    len = len < 0 ? 0 : (len > cap ? cap : len);
    const i32* table = page_table + (u64)b * table_stride;
    // Compaction (`compact`, with a page mask): the block first lists in shared memory, in table
    // order, the pages this KV head attends (valid and not masked), and the splits divide those
    // pages' tokens only, so the slots a head skips cost nothing and the plan can be made for
    // the attended length. Every page is full but the sequence's last one (the table's last).
    // Adding the same tokens in the same order as a table without the skipped pages, this gives
    // that table's result bit for bit.
    const i32* cpage = nullptr;
    if (compact != 0u && page_mask != nullptr) {
        i32* list = reinterpret_cast<i32*>(kv_smem + DEC_WARPS * DEC_STAGES * (2 * DEC_WTILE * CH));
        __shared__ int s_wcnt[DEC_WARPS];
        const int np = (len + (i32)page_size - 1) / (i32)page_size;
        int total = 0;
        for (int base = 0; base < np; base += DEC_THREADS) {
            const int pi = base + tid;
            bool keep = false;
            if (pi < np) {
                const i32 pg = table[pi];
                keep = pg >= 0 && (u32)pg < num_pages && page_mask[(u64)pg * kv_heads + kvh] == 0;
            }
            const u32 bal = __ballot_sync(0xffffffffu, keep);
            if (lane == 0) s_wcnt[warp] = __popc(bal);
            __syncthreads();
            int off = total, all = total;
#pragma unroll
            for (int w = 0; w < DEC_WARPS; ++w) {
                off += (w < warp) ? s_wcnt[w] : 0;
                all += s_wcnt[w];
            }
            if (keep) list[off + __popc(bal & ((1u << lane) - 1u))] = pi;
            total = all;
            __syncthreads();
        }
        cpage = list;
        i32 clen = total * (i32)page_size;
        if (total > 0 && list[total - 1] == np - 1) clen -= np * (i32)page_size - len;
        len = clen;
    }
    const i32 start = (i32)(split * chunk);
    // The last split takes every remaining token, so lengths above the planned maximum stay exact.
    const i32 end = (split + 1 == num_splits) ? len : min(len, start + (i32)chunk);
    const int ntiles = end > start ? (end - start + DEC_WTILE - 1) / DEC_WTILE : 0;
    const int nk = ntiles > warp ? (ntiles - warp + DEC_WARPS - 1) / DEC_WARPS : 0;

    const u64 row = (u64)kv_heads * D;
    const u64 page_elems = 2ull * page_size * row;
    uint4* wsm = kv_smem + warp * (DEC_STAGES * WSTAGE);
    const u32 wsm_s = (u32)__cvta_generic_to_shared(wsm);

    const int part = lane % CH, r0 = lane / CH;
    // Copies this warp's k-th tile (tokens start + 16 * (warp + 4k) ..) into stage k % DEC_STAGES;
    // rows past the end or on an invalid page are zero-filled and masked.
    auto issue = [&](int k) {
        const int stage = k % DEC_STAGES;
        uint4* dk = wsm + stage * WSTAGE;
        uint4* dv = dk + DEC_WTILE * CH;
        const i32 pos0 = start + (warp + DEC_WARPS * k) * DEC_WTILE + r0;
        u32 pi = (u32)pos0 / page_size, po = (u32)pos0 % page_size;
        u32 msk = 0;
#pragma unroll
        for (int j = 0; j < ITERS; ++j) {
            const int r = r0 + RPI * j;
            const i32 pos = pos0 + RPI * j;
            if (j > 0) {
                po += RPI;
                while (po >= page_size) {
                    po -= page_size;
                    ++pi;
                }
            }
            const int slot = r * CH + (part ^ (r & 7));
            bool ok = false;
            if (pos < end) {
                const i32 pg = table[cpage != nullptr ? cpage[pi] : (i32)pi];
                // page_mask (optional, [num_pages][kv_heads]): non-zero = this KV head skips
                // the page (a cached page outside its selection), exactly as an invalid page
                // (already left out of a compacted list).
                if (pg >= 0 && (u32)pg < num_pages &&
                    (page_mask == nullptr || cpage != nullptr ||
                     page_mask[(u64)pg * kv_heads + kvh] == 0)) {
                    ok = true;
                    const bf16* kp = pages + (u64)pg * page_elems + (u64)po * row + (u64)kvh * D + part * 8;
                    cp_async16(dk + slot, kp);
                    cp_async16(dv + slot, kp + (u64)page_size * row);
                }
            }
            if (!ok) {
                dk[slot] = make_uint4(0u, 0u, 0u, 0u);
                dv[slot] = make_uint4(0u, 0u, 0u, 0u);
            }
            const u32 bits = __ballot_sync(0xffffffffu, ok);
#pragma unroll
            for (int rr = 0; rr < RPI; ++rr) msk |= ((bits >> (rr * CH)) & 1u) << (rr + RPI * j);
        }
        if (lane == 0) s_mask[warp][stage] = msk;
        cp_async_commit();
    };

#pragma unroll
    for (int st = 0; st < DEC_STAGES - 1; ++st) {
        if (st < nk) issue(st);
        else cp_async_commit();
    }

    // Q^T as the B operand: b0 = dims 16ks + 2tq (+1), b1 = dims 16ks + 2tq + 8 (+9), head gq.
    u32 qf[KS][2];
    {
        const bool has = gq < G;
        const u32* qp = reinterpret_cast<const u32*>(q + (u64)b * q_stride + (u64)(h0 + (has ? gq : 0)) * D);
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            qf[ks][0] = has ? qp[ks * 8 + tq] : 0u;
            qf[ks][1] = has ? qp[ks * 8 + 4 + tq] : 0u;
        }
    }
    float acc[KS][4];
#pragma unroll
    for (int i = 0; i < KS; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][e] = 0.0f;
    // Heads 2tq and 2tq + 1: running max (log2 domain) and this lane's partial sum.
    float m0 = -FK_INF, m1 = -FK_INF, l0 = 0.0f, l1 = 0.0f;

    // ldmatrix row addresses (byte offsets within a stage): lane = 8 * matrix + row.
    const int mi = lane >> 3, rr8 = lane & 7;
    const int krow = rr8 + 8 * (mi & 1), kcol = mi >> 1;   // K: matrices (t0-7,d0-7) (t8-15,d0-7) (t0-7,d8-15) (t8-15,d8-15)
    const int vrow = rr8 + 8 * (mi >> 1), vcol = mi & 1;   // V^T: (t0-7,d0-7) (t0-7,d8-15) (t8-15,d0-7) (t8-15,d8-15)
    unsigned short* sp_hi = &s_p[warp][0][0][0];
    unsigned short* sp_lo = &s_p[warp][1][0][0];

    for (int k = 0; k < nk; ++k) {
        if (k + DEC_STAGES - 1 < nk) issue(k + DEC_STAGES - 1);
        else cp_async_commit();
        cp_async_wait<DEC_STAGES - 1>();
        __syncwarp();
        const int stage = k % DEC_STAGES;
        const u32 kb = wsm_s + (u32)(stage * WSTAGE) * 16u;
        const u32 vb = kb + (u32)(DEC_WTILE * CH) * 16u;
        float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            u32 a0, a1, a2, a3;
            ldsm_x4(kb + (u32)(krow * CH + ((2 * ks + kcol) ^ rr8)) * 16u, a0, a1, a2, a3);
            mma_bf16(sc, a0, a1, a2, a3, qf[ks][0], qf[ks][1]);
        }
        // sc: tokens gq (0, 1) and gq + 8 (2, 3); heads 2tq (0, 2) and 2tq + 1 (1, 3).
        const u32 msk = s_mask[warp][stage];
        const bool okA = (msk >> gq) & 1u, okB = (msk >> (gq + 8)) & 1u;
        const float s0 = okA ? sc[0] * scale_log2 : -FK_INF;
        const float s1 = okA ? sc[1] * scale_log2 : -FK_INF;
        const float s2 = okB ? sc[2] * scale_log2 : -FK_INF;
        const float s3 = okB ? sc[3] * scale_log2 : -FK_INF;
        float x0 = fmaxf(s0, s2), x1 = fmaxf(s1, s3);
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) {
            x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, o));
            x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, o));
        }
        const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
        const float base0 = n0 == -FK_INF ? 0.0f : n0, base1 = n1 == -FK_INF ? 0.0f : n1;
        const float al0 = exp2f(m0 - base0), al1 = exp2f(m1 - base1);
        const float p0 = exp2f(s0 - base0), p1 = exp2f(s1 - base1);
        const float p2 = exp2f(s2 - base0), p3 = exp2f(s3 - base1);
        l0 = l0 * al0 + (p0 + p2);
        l1 = l1 * al1 + (p1 + p3);
        m0 = n0;
        m1 = n1;
        if (!__all_sync(0xffffffffu, al0 == 1.0f && al1 == 1.0f)) {
#pragma unroll
            for (int i = 0; i < KS; ++i) {
                acc[i][0] *= al0;
                acc[i][1] *= al1;
                acc[i][2] *= al0;
                acc[i][3] *= al1;
            }
        }
        // P^T to shared memory as [head][token], hi and lo bf16 parts.
        {
            const float ps[4] = {p0, p1, p2, p3};
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int hh = 2 * tq + (e & 1), tt = gq + 8 * (e >> 1);
                const bf16 hi = f2bf(ps[e]);
                const bf16 lo = f2bf(ps[e] - bf2f(hi));
                sp_hi[hh * DEC_WTILE + tt] = __bfloat16_as_ushort(hi);
                sp_lo[hh * DEC_WTILE + tt] = __bfloat16_as_ushort(lo);
            }
        }
        __syncwarp();
        const u32 bh0 = *reinterpret_cast<const u32*>(sp_hi + gq * DEC_WTILE + 2 * tq);
        const u32 bh1 = *reinterpret_cast<const u32*>(sp_hi + gq * DEC_WTILE + 2 * tq + 8);
        const u32 bl0 = *reinterpret_cast<const u32*>(sp_lo + gq * DEC_WTILE + 2 * tq);
        const u32 bl1 = *reinterpret_cast<const u32*>(sp_lo + gq * DEC_WTILE + 2 * tq + 8);
#pragma unroll
        for (int mt = 0; mt < KS; ++mt) {
            u32 a0, a1, a2, a3;
            ldsm_x4_t(vb + (u32)(vrow * CH + ((2 * mt + vcol) ^ rr8)) * 16u, a0, a1, a2, a3);
            mma_bf16(acc[mt], a0, a1, a2, a3, bh0, bh1);
            mma_bf16(acc[mt], a0, a1, a2, a3, bl0, bl1);
        }
        __syncwarp();
    }
    cp_async_wait<0>();

#pragma unroll
    for (int o = 4; o < 32; o <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, o);
        l1 += __shfl_xor_sync(0xffffffffu, l1, o);
    }
    // Merge the warps: every warp's O^T goes to shared memory (reusing the K/V stages).
    __syncthreads();
    float* red = reinterpret_cast<float*>(kv_smem);  // [warp][head 8][D]
    if (gq == 0) {
        s_m[warp][2 * tq] = m0;
        s_m[warp][2 * tq + 1] = m1;
        s_l[warp][2 * tq] = l0;
        s_l[warp][2 * tq + 1] = l1;
    }
    if (2 * tq < G) {
        float* rw = red + (warp * 8 + 2 * tq) * D;
#pragma unroll
        for (int mt = 0; mt < KS; ++mt) {
            rw[16 * mt + gq] = acc[mt][0];
            rw[16 * mt + gq + 8] = acc[mt][2];
            if (2 * tq + 1 < G) {
                rw[D + 16 * mt + gq] = acc[mt][1];
                rw[D + 16 * mt + gq + 8] = acc[mt][3];
            }
        }
    }
    __syncthreads();
    for (int idx = tid; idx < G * D; idx += DEC_THREADS) {
        const int h = idx / D, d = idx % D;
        float mx = -FK_INF;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) mx = fmaxf(mx, s_m[w][h]);
        const float base = mx == -FK_INF ? 0.0f : mx;
        float l = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) {
            const float wt = exp2f(s_m[w][h] - base);
            l = fmaf(wt, s_l[w][h], l);
            o = fmaf(wt, red[(w * 8 + h) * D + d], o);
        }
        const u32 hq = h0 + h;
        if (num_splits == 1) {
            out[((u64)b * q_heads + hq) * D + d] = f2bf(l > 0.0f ? o / l : 0.0f);
        } else {
            const u64 slot = ((u64)b * q_heads + hq) * num_splits + split;
            ws_acc[slot * D + d] = o;
            if (d == 0) {
                ws_ml[slot * 2] = mx;
                ws_ml[slot * 2 + 1] = l;
            }
        }
    }
}

#define DECODE_ARGS                                                                                      \
    const bf16 *__restrict__ q, u64 q_stride, const bf16 *__restrict__ pages,                              \
        const i32 *__restrict__ page_table, u32 table_stride, const i32 *__restrict__ seq_lens,            \
        bf16 *__restrict__ out, float *__restrict__ ws_acc, float *__restrict__ ws_ml, u32 q_heads,        \
        u32 kv_heads, u32 group, u32 page_size, u32 num_pages, u32 chunk, u32 num_splits, float scale_log2, \
        const i32 *__restrict__ head_flags, u32 head_filter, const i32 *__restrict__ page_mask, u32 compact
#define DECODE_PASS                                                                                      \
    q, q_stride, pages, page_table, table_stride, seq_lens, out, ws_acc, ws_ml, q_heads, kv_heads, group, \
        page_size, num_pages, chunk, num_splits, scale_log2, head_flags, head_filter, page_mask, compact
#define DECODE_INST(D, G)                                                                        \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, (D) == 64 ? 4 : 2)                        \
        decode_attn_d##D##_g##G(DECODE_ARGS) {                                                           \
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

// Merges the per-split partial results: grid = (q_heads, batch), blockDim >= 32; the head filter
// as in decode_attn (query head h belongs to KV head h / group).
extern "C" __global__ void decode_reduce(bf16* __restrict__ out, const float* __restrict__ ws_acc,
                                         const float* __restrict__ ws_ml, u32 q_heads, u32 num_splits,
                                         u32 head_dim, const i32* __restrict__ head_flags,
                                         u32 head_filter, u32 kv_heads, u32 group) {
    const u32 h = blockIdx.x, b = blockIdx.y;
    if (head_filter != 0 &&
        ((head_flags[(u64)b * kv_heads + h / group] != 0) != (head_filter == 1)))
        return;
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
