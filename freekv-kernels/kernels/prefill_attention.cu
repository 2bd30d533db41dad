// Causal prefill attention over paged NHD KV, tiled flash-attention style (online softmax) on the
// bf16 tensor cores (mma.sync m16n8k16, fp32 accumulation), K/V tiles double-buffered with cp.async
// in dynamic shared memory (4 * 64 * (D + 8) * 2 bytes, set by the launcher).
//   grid = (ceil(max_q * group / 64), kv_heads, batch), 128 threads (4 warps x 16 rows).
// The rows of a tile are (query token, query head of the KV group) pairs, so one K/V tile load
// serves the whole group. Query i of sequence b (q_start[b] <= i < q_start[b+1]) sits at position
// seq_lens[b] - n_q + i and sees the keys at positions <= its own.

#define PF_BM 64
#define PF_BN 64
#define PF_THREADS 128

__device__ __forceinline__ void ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, const bf16* p) {
    const u32 addr = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, const bf16* p) {
    const u32 addr = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

template <int D>
__device__ __forceinline__ void prefill_attn(const bf16* __restrict__ q, u64 q_stride, const i32* __restrict__ q_start,
                                             const bf16* __restrict__ pages, const i32* __restrict__ page_table,
                                             u32 table_stride, const i32* __restrict__ seq_lens,
                                             bf16* __restrict__ out, u32 q_heads, u32 kv_heads, u32 page_size,
                                             u32 num_pages, u32 total_q, float scale_log2) {
    constexpr int LD = D + 8;  // shared row pitch (bf16): 16-byte aligned rows, no bank conflicts
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    constexpr int NB = D / 8;   // n-blocks of the output
    constexpr int KS = D / 16;  // k-steps of Q K^T
    // Dynamic shared memory: two pipeline stages of [K tile][V tile], 64 x LD each. The Q tile is
    // staged in stage 1 before the pipeline starts.
    extern __shared__ __align__(16) unsigned char pf_smem[];
    bf16* const sm = reinterpret_cast<bf16*>(pf_smem);
    __shared__ unsigned char sm_ok[2][PF_BN];

    const u32 group = q_heads / kv_heads;
    const u32 b = blockIdx.z, kvh = blockIdx.y;
    const i32 qs = q_start[b];
    const i32 nq = q_start[b + 1] - qs;
    if (qs < 0 || nq <= 0 || (u64)qs + (u64)nq > (u64)total_q) return;
    const u32 rows = (u32)nq * group;
    const u32 row0 = blockIdx.x * PF_BM;
    if (row0 >= rows) return;
    i32 kv_len = seq_lens[b];
    const i32 cap = (i32)(table_stride * page_size);
    kv_len = kv_len < 0 ? 0 : (kv_len > cap ? cap : kv_len);
    const i32 pos0 = kv_len - nq;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;

    const u32 rlast = min(row0 + PF_BM, rows) - 1;
    const i32 kv_end = min(kv_len, pos0 + (i32)(rlast / group) + 1);
    const int ntiles = kv_end > 0 ? (kv_end + PF_BN - 1) / PF_BN : 0;
    const i32* table = page_table + (u64)b * table_stride;
    const u64 rowe = (u64)kv_heads * D;
    const u64 page_elems = 2ull * page_size * rowe;

    // Queues the K and V rows of tile t into stage t & 1 (zeros where there is no token).
    auto issue = [&](int t) {
        const int stage = t & 1;
        bf16* ks = sm + (2 * stage) * PF_BN * LD;
        bf16* vs = ks + PF_BN * LD;
        const i32 k0 = t * PF_BN;
        for (int c = tid; c < PF_BN * CPR; c += PF_THREADS) {
            const int r = c / CPR, ch = c % CPR;
            const i32 pos = k0 + r;
            bool ok = false;
            if (pos < kv_end) {
                const i32 pg = table[(u32)pos / page_size];
                if (pg >= 0 && (u32)pg < num_pages) {
                    ok = true;
                    const bf16* kp = pages + (u64)pg * page_elems + (u64)((u32)pos % page_size) * rowe +
                                     (u64)kvh * D + ch * 8;
                    cp_async16(ks + r * LD + ch * 8, kp);
                    cp_async16(vs + r * LD + ch * 8, kp + (u64)page_size * rowe);
                }
            }
            if (!ok) {
                *reinterpret_cast<uint4*>(ks + r * LD + ch * 8) = make_uint4(0u, 0u, 0u, 0u);
                *reinterpret_cast<uint4*>(vs + r * LD + ch * 8) = make_uint4(0u, 0u, 0u, 0u);
            }
            if (ch == 0) sm_ok[stage][r] = ok ? 1 : 0;
        }
        cp_async_commit();
    };

    bf16* const sq = sm + 2 * PF_BN * LD;  // stage 1 holds the Q tile until the pipeline starts
    for (int c = tid; c < PF_BM * CPR; c += PF_THREADS) {
        const int r = c / CPR, ch = c % CPR;
        const u32 R = row0 + r;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (R < rows) {
            const u32 tok = R / group, hh = kvh * group + R % group;
            val = *reinterpret_cast<const uint4*>(q + (u64)(qs + (i32)tok) * q_stride + (u64)hh * D + ch * 8);
        }
        *reinterpret_cast<uint4*>(sq + r * LD + ch * 8) = val;
    }
    if (ntiles > 0) issue(0);
    else cp_async_commit();
    __syncthreads();
    const int wr = warp * 16;
    u32 qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        qa[kk][0] = *reinterpret_cast<const u32*>(sq + (wr + gq) * LD + kk * 16 + 2 * tq);
        qa[kk][1] = *reinterpret_cast<const u32*>(sq + (wr + gq + 8) * LD + kk * 16 + 2 * tq);
        qa[kk][2] = *reinterpret_cast<const u32*>(sq + (wr + gq) * LD + kk * 16 + 8 + 2 * tq);
        qa[kk][3] = *reinterpret_cast<const u32*>(sq + (wr + gq + 8) * LD + kk * 16 + 8 + 2 * tq);
    }
    __syncthreads();

    const u32 R0 = row0 + wr + gq, R1 = R0 + 8;
    const i32 qp0 = (R0 < rows) ? pos0 + (i32)(R0 / group) : -1;
    const i32 qp1 = (R1 < rows) ? pos0 + (i32)(R1 / group) : -1;

    float o[NB][4];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
    float m0 = -FK_INF, m1 = -FK_INF, l0 = 0.0f, l1 = 0.0f;

    for (int t = 0; t < ntiles; ++t) {
        if (t + 1 < ntiles) issue(t + 1);
        else cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const i32 k0 = t * PF_BN;
        const bf16* ks = sm + (2 * (t & 1)) * PF_BN * LD;
        const bf16* vs = ks + PF_BN * LD;
        const unsigned char* okp = sm_ok[t & 1];

        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                u32 b0, b1, b2, b3;
                const int kr = (j + (lane >> 4)) * 8 + (lane & 7);
                const int kc = kk * 16 + ((lane >> 3) & 1) * 8;
                ldsm_x4(b0, b1, b2, b3, ks + kr * LD + kc);
                mma_16816(s[j], qa[kk], b0, b1);
                mma_16816(s[j + 1], qa[kk], b2, b3);
            }
        }
        // mask (causal, length, missing pages) and scale into the log2 domain
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int kl = j * 8 + 2 * tq + (c & 1);
                const i32 kpos = k0 + kl;
                const i32 qp = (c < 2) ? qp0 : qp1;
                const bool vis = kpos <= qp && kpos < kv_end && okp[kl];
                s[j][c] = vis ? s[j][c] * scale_log2 : -FK_INF;
            }
        }
        float mx0 = -FK_INF, mx1 = -FK_INF;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float bs0 = (mn0 == -FK_INF) ? 0.0f : mn0;
        const float bs1 = (mn1 == -FK_INF) ? 0.0f : mn1;
        const float al0 = exp2f(m0 - bs0), al1 = exp2f(m1 - bs1);
        m0 = mn0;
        m1 = mn1;
        float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j][0] = exp2f(s[j][0] - bs0);
            s[j][1] = exp2f(s[j][1] - bs0);
            s[j][2] = exp2f(s[j][2] - bs1);
            s[j][3] = exp2f(s[j][3] - bs1);
            rs0 += s[j][0] + s[j][1];
            rs1 += s[j][2] + s[j][3];
        }
        l0 = l0 * al0 + rs0;
        l1 = l1 * al1 + rs1;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            o[nb][0] *= al0;
            o[nb][1] *= al0;
            o[nb][2] *= al1;
            o[nb][3] *= al1;
        }
#pragma unroll
        for (int kt = 0; kt < 4; ++kt) {
            u32 a[4];
            a[0] = pack_bf2(s[2 * kt][0], s[2 * kt][1]);
            a[1] = pack_bf2(s[2 * kt][2], s[2 * kt][3]);
            a[2] = pack_bf2(s[2 * kt + 1][0], s[2 * kt + 1][1]);
            a[3] = pack_bf2(s[2 * kt + 1][2], s[2 * kt + 1][3]);
#pragma unroll
            for (int nb = 0; nb < NB; nb += 2) {
                u32 b0, b1, b2, b3;
                const int vr = kt * 16 + (lane & 15);
                const int vc = (nb + (lane >> 4)) * 8;
                ldsm_x4_t(b0, b1, b2, b3, vs + vr * LD + vc);
                mma_16816(o[nb], a, b0, b1);
                mma_16816(o[nb + 1], a, b2, b3);
            }
        }
        __syncthreads();  // stage t & 1 is refilled by the next iteration's issue(t + 2)
    }
    cp_async_wait<0>();

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
    const float inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    if (R0 < rows) {
        const u32 tok = R0 / group, hh = kvh * group + R0 % group;
        bf16* op = out + ((u64)(qs + (i32)tok) * q_heads + hh) * D;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
            *reinterpret_cast<u32*>(op + nb * 8 + 2 * tq) = pack_bf2(o[nb][0] * inv0, o[nb][1] * inv0);
    }
    if (R1 < rows) {
        const u32 tok = R1 / group, hh = kvh * group + R1 % group;
        bf16* op = out + ((u64)(qs + (i32)tok) * q_heads + hh) * D;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb)
            *reinterpret_cast<u32*>(op + nb * 8 + 2 * tq) = pack_bf2(o[nb][2] * inv1, o[nb][3] * inv1);
    }
}

#define PREFILL_ARGS                                                                                  \
    const bf16 *__restrict__ q, u64 q_stride, const i32 *__restrict__ q_start,                          \
        const bf16 *__restrict__ pages, const i32 *__restrict__ page_table, u32 table_stride,           \
        const i32 *__restrict__ seq_lens, bf16 *__restrict__ out, u32 q_heads, u32 kv_heads, u32 page_size, \
        u32 num_pages, u32 total_q, float scale_log2
#define PREFILL_PASS \
    q, q_stride, q_start, pages, page_table, table_stride, seq_lens, out, q_heads, kv_heads, page_size, num_pages, \
        total_q, scale_log2

extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_attn_d64(PREFILL_ARGS) { prefill_attn<64>(PREFILL_PASS); }
extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_attn_d128(PREFILL_ARGS) { prefill_attn<128>(PREFILL_PASS); }
