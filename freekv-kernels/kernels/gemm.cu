// Native tensor-core GEMM for the products beyond decode size (no cuBLAS): bf16 inputs, fp32
// accumulation, bf16 or f32 output.
//
//   y[t, o] (+)= sum_i x[t, i] * w[o, i]
//
// x is [m = tokens][k] row-major, w [n = out_features][k] row-major (as GGUF stores it), y
// [m][n] row-major. Both operands are K-contiguous, so both feed mma.sync m16n8k16 (row.col)
// straight from ldmatrix without transposes.
//
// Block tile BM x 128 x 32 (BM = 128 or 64), 256 threads = 8 warps as 2 (M) x 4 (N), warp tile
// (BM / 2) x 32. Shared memory holds GEMM_STAGES stages of an A tile [BM][32] and a B tile
// [128][32] (dynamic shared memory, gemm_smem_bytes below). Each tile row is 64 bytes = four
// 16-byte chunks; chunk c of row r is stored at chunk position c ^ ((r >> 1) & 3), so the eight
// rows an ldmatrix phase reads fall in eight different bank groups (no conflicts).
//
// Loads. VEC = true (x and w 16-byte aligned, k % 8 == 0, checked on the host): cp.async 16-byte
// copies; a chunk past the last row or past k is zero-filled by the copy itself (src-size 0; its
// source address is clamped to the start of the operand and never read). VEC = false (any
// alignment, any k): each thread reads its eight elements per chunk with guarded scalar loads and
// stores the chunk to shared memory itself. Elements outside [m or n rows] x [k] are zeros in the
// tiles, so they add nothing; the epilogue writes only rows < m and columns < n.
//
// Pipeline (GEMM_STAGES stages, the tile of k-step kt in stage kt % GEMM_STAGES). The prologue
// issues k-steps 0 .. S-2, one commit group each. Iteration kt: wait until at most S-2 groups
// are pending (so k-step kt has landed for this thread), __syncthreads (every thread's copies of
// k-step kt are visible, and every warp is done reading stage (kt-1) % S from iteration kt-1),
// then issue k-step kt+S-1 into stage (kt+S-1) % S = (kt-1) % S, then compute on stage kt % S.
// A stage is thus only rewritten after a barrier that follows every read of it, and only read
// after a barrier that follows the completion of its writes. Groups past the last k-step are
// empty (committed anyway, so the counting stays uniform); all groups are drained before the
// epilogue.
//
// Blocks are ordered in groups of GEMM_GROUP_M block rows (consecutive blocks share x tiles and
// sweep w tiles together), which keeps the operands of the blocks in flight in L2.

#define GEMM_BN 128
#define GEMM_BK 32
#define GEMM_STAGES 4
#define GEMM_THREADS 256
#define GEMM_GROUP_M 8
#define GEMM_ACCUMULATE 1u

// Four 8x8 b16 matrices from shared memory; lane l gives the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void gemm_ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16-byte global -> shared copy; `bytes` = 16 copies, 0 zero-fills the destination (nothing read).
__device__ __forceinline__ void gemm_cp16(u32 smem, const void* gmem, u32 bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
                 "r"(bytes)
                 : "memory");
}

// Element offset of 16-byte chunk c (0..3) of row r in a swizzled [rows][GEMM_BK] tile.
__device__ __forceinline__ u32 gemm_swz(u32 r, u32 c) {
    return r * GEMM_BK + ((c ^ ((r >> 1) & 3u)) << 3);
}

__host__ __device__ constexpr int gemm_smem_bytes(int bm) {
    return GEMM_STAGES * (bm + GEMM_BN) * GEMM_BK * 2;
}

// Copies rows row0 .. row0+ROWS-1, columns k0 .. k0+31 of `g` ([nrows][k] row-major) into the
// swizzled tile at shared address `tile` (bf16 elements), zeros outside [nrows] x [k].
template <int ROWS, bool VEC>
__device__ __forceinline__ void gemm_load_tile(u32 tile, const bf16* __restrict__ g, u32 row0,
                                               u32 nrows, u32 k, u32 k0) {
    static_assert((ROWS * 4) % GEMM_THREADS == 0, "tile chunks must split evenly over threads");
#pragma unroll
    for (int i = 0; i < ROWS * 4 / GEMM_THREADS; ++i) {
        const u32 idx = threadIdx.x + (u32)i * GEMM_THREADS;
        const u32 r = idx >> 2, c = idx & 3u;
        const u32 gr = row0 + r;
        const u32 gk = k0 + c * 8;
        const u32 dst = tile + gemm_swz(r, c) * 2;
        if constexpr (VEC) {
            // k % 8 == 0: a chunk is wholly inside or wholly outside the row.
            const bool ok = gr < nrows && gk < k;
            const bf16* src = ok ? g + (u64)gr * k + gk : g;
            gemm_cp16(dst, src, ok ? 16u : 0u);
        } else {
            const unsigned short* row = reinterpret_cast<const unsigned short*>(g) + (u64)gr * k;
            u32 v[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const u32 k_lo = gk + 2 * e, k_hi = gk + 2 * e + 1;
                const u32 lo = (gr < nrows && k_lo < k) ? (u32)row[k_lo] : 0u;
                const u32 hi = (gr < nrows && k_hi < k) ? (u32)row[k_hi] : 0u;
                v[e] = lo | (hi << 16);
            }
            asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(v[0]),
                         "r"(v[1]), "r"(v[2]), "r"(v[3])
                         : "memory");
        }
    }
}

// Output stores: two adjacent columns (pair) or one, optionally adding the old value.
__device__ __forceinline__ void gemm_store1(bf16* p, float v, bool acc) {
    if (acc) v += bf2f(*p);
    *p = f2bf(v);
}
__device__ __forceinline__ void gemm_store1(float* p, float v, bool acc) {
    if (acc) v += *p;
    *p = v;
}
__device__ __forceinline__ void gemm_store2(bf16* p, float v0, float v1, bool acc) {
    u32* q = reinterpret_cast<u32*>(p);
    if (acc) {
        const u32 old = *q;
        v0 += lo_bf(old);
        v1 += hi_bf(old);
    }
    *q = pack_bf2(v0, v1);
}
__device__ __forceinline__ void gemm_store2(float* p, float v0, float v1, bool acc) {
    float2* q = reinterpret_cast<float2*>(p);
    if (acc) {
        const float2 old = *q;
        v0 += old.x;
        v1 += old.y;
    }
    *q = make_float2(v0, v1);
}

template <int BM, typename OUT, bool VEC>
__device__ __forceinline__ void gemm_impl(OUT* __restrict__ y, const bf16* __restrict__ x,
                                          const bf16* __restrict__ w, u32 m, u32 n, u32 k,
                                          u32 flags) {
    constexpr int MI = BM / 32;  // m16 tiles per warp (warp tile BM / 2 rows)
    constexpr int NI = 4;        // n8 tiles per warp (warp tile 32 columns)
    constexpr u32 A_STAGE = BM * GEMM_BK;       // elements
    constexpr u32 B_STAGE = GEMM_BN * GEMM_BK;  // elements
    extern __shared__ uint4 gemm_smem[];
    const u32 sA = (u32)__cvta_generic_to_shared(gemm_smem);
    const u32 sB = sA + GEMM_STAGES * A_STAGE * 2;

    // Grouped block order.
    const u32 mt = (m + BM - 1) / BM;
    const u32 nt = (n + GEMM_BN - 1) / GEMM_BN;
    const u32 pid = blockIdx.x;
    const u32 group = GEMM_GROUP_M * nt;
    const u32 first = (pid / group) * GEMM_GROUP_M;
    const u32 left = mt - first;
    const u32 gsz = left < GEMM_GROUP_M ? left : GEMM_GROUP_M;
    const u32 in_group = pid % group;
    const u32 tm = first + in_group % gsz;
    const u32 tn = in_group / gsz;
    if (tm >= mt || tn >= nt) return;  // never true for the launched grid (mt * nt blocks)
    const u32 m0 = tm * BM, n0 = tn * GEMM_BN;
    const u32 ktiles = (k + GEMM_BK - 1) / GEMM_BK;

    const u32 lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const u32 wm = warp & 1u, wn = warp >> 1;

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // Prologue: k-steps 0 .. S-2.
#pragma unroll
    for (int s = 0; s < GEMM_STAGES - 1; ++s) {
        if ((u32)s < ktiles) {
            gemm_load_tile<BM, VEC>(sA + s * A_STAGE * 2, x, m0, m, k, (u32)s * GEMM_BK);
            gemm_load_tile<GEMM_BN, VEC>(sB + s * B_STAGE * 2, w, n0, n, k, (u32)s * GEMM_BK);
        }
        cp_async_commit();
    }

    // Per-lane ldmatrix offsets within a stage (elements): A rows of this warp, B rows likewise.
    const u32 a_row = wm * (BM / 2) + (lane & 15u);       // + mi * 16
    const u32 a_chunk = lane >> 4;                         // + kk * 2
    const u32 b_row = wn * 32 + (lane & 7u) + ((lane >> 4) << 3);  // + nj * 16
    const u32 b_chunk = (lane >> 3) & 1u;                  // + kk * 2

    for (u32 kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<GEMM_STAGES - 2>();
        __syncthreads();
        {
            const u32 nk = kt + GEMM_STAGES - 1;
            if (nk < ktiles) {
                const u32 st = nk % GEMM_STAGES;
                gemm_load_tile<BM, VEC>(sA + st * A_STAGE * 2, x, m0, m, k, nk * GEMM_BK);
                gemm_load_tile<GEMM_BN, VEC>(sB + st * B_STAGE * 2, w, n0, n, k, nk * GEMM_BK);
            }
            cp_async_commit();
        }
        const u32 st = kt % GEMM_STAGES;
        const u32 a_base = sA + st * A_STAGE * 2;
        const u32 b_base = sB + st * B_STAGE * 2;
#pragma unroll
        for (u32 kk = 0; kk < GEMM_BK / 16; ++kk) {
            u32 af[MI][4];
            u32 bfr[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                gemm_ldsm_x4(af[mi], a_base + gemm_swz(a_row + mi * 16, a_chunk + kk * 2) * 2);
            }
#pragma unroll
            for (int nj = 0; nj < NI / 2; ++nj) {
                u32 r[4];
                gemm_ldsm_x4(r, b_base + gemm_swz(b_row + nj * 16, b_chunk + kk * 2) * 2);
                bfr[2 * nj][0] = r[0];
                bfr[2 * nj][1] = r[1];
                bfr[2 * nj + 1][0] = r[2];
                bfr[2 * nj + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) mma_16816(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
        }
    }
    // Only empty groups can be pending here; drain them anyway before leaving.
    cp_async_wait<0>();

    // Epilogue: lane (g, q) holds rows g and g + 8, columns 2q and 2q + 1 of every m16n8 tile.
    const bool accumulate = (flags & GEMM_ACCUMULATE) != 0;
    const bool pairs = (n % 2u == 0u) && ((u64)y % (2 * sizeof(OUT)) == 0);
    const u32 g = lane >> 2, q = lane & 3u;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 row = m0 + wm * (BM / 2) + mi * 16 + g + h * 8;
            if (row >= m) continue;
            OUT* yr = y + (u64)row * n;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                const u32 col = n0 + wn * 32 + ni * 8 + 2 * q;
                const float v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
                if (pairs) {
                    // n even and col even: col < n implies col + 1 < n.
                    if (col < n) gemm_store2(yr + col, v0, v1, accumulate);
                } else {
                    if (col < n) gemm_store1(yr + col, v0, accumulate);
                    if (col + 1 < n) gemm_store1(yr + col + 1, v1, accumulate);
                }
            }
        }
    }
}

// Every kernel: (y, x, w, m = tokens, n = out_features, k = in_features, flags); grid mt * nt
// blocks of GEMM_THREADS threads, gemm_smem_bytes(BM) bytes of dynamic shared memory.
#define GEMM_KERNEL(NAME, BM, OUT, VEC)                                                             \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2)                                   \
        NAME(OUT* __restrict__ y, const bf16* __restrict__ x, const bf16* __restrict__ w, u32 m,   \
             u32 n, u32 k, u32 flags) {                                                             \
        gemm_impl<BM, OUT, VEC>(y, x, w, m, n, k, flags);                                           \
    }

GEMM_KERNEL(gemm_bf16_m128, 128, bf16, true)
GEMM_KERNEL(gemm_bf16_m64, 64, bf16, true)
GEMM_KERNEL(gemm_f32_m128, 128, float, true)
GEMM_KERNEL(gemm_f32_m64, 64, float, true)
GEMM_KERNEL(gemm_bf16_m128_scalar, 128, bf16, false)
GEMM_KERNEL(gemm_bf16_m64_scalar, 64, bf16, false)
GEMM_KERNEL(gemm_f32_m128_scalar, 128, float, false)
GEMM_KERNEL(gemm_f32_m64_scalar, 64, float, false)
