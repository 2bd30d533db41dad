// FreeKV selection kernels: the correction check and the page selection of one sparse layer.
//
// Every result is bit-identical with the CPU reference crate freekv-select (and the slot rules of
// freekv-layout's SlotTable::diff): scores, softmax and group aggregation follow the reference's
// exact operation order with explicitly rounded intrinsics (__fmul_rn / __fadd_rn / __fdiv_rn /
// __fsqrt_rn are never contracted into FMAs, whatever --fmad says), max is `a > b ? a : b`, and
// the top-k is an exact radix select on the reference's rank keys (score key, ties to the lower
// page). Nothing here depends on the order in which threads run.
//
// Layouts (see the GPU FreeKV contract):
//   seq_info   i32 [bs][4]      N, mode (0 skip, 1 first sparse step, 2 sparse), fill slot, page
//   flags      i32 [bs][Hkv]
//   q_prev     f32 [bs][Hq][d]  query heads h*G .. (h+1)*G form KV head h's group
//   summaries  f32 [bs][Hkv][MP][2][d]   U then L of each page
//   mid_page   i32 [bs][Hkv][k]; page_mid i32 [bs][Hkv][MP]
//   recall_count i32 [bs][Hkv]; recall_list i32 [bs][Hkv][k][2]; selected i32 [bs][Hkv][k]
//   scratch    f32 [bs][Hkv][G][MP]  per-head (or group) scores of the candidates, by candidate
//                                     index i (page ns + i)

#define FKS_POLICY_MEAN_SOFTMAX 0
#define FKS_POLICY_MAX_SCORE 1
#define FKS_POLICY_MEAN_SCORE 2
#define FKS_POLICY_MAX_SOFTMAX 3
#define FKS_POLICY_POOLED_MEAN 4
#define FKS_POLICY_POOLED_MAX 5

#define FKS_SCORE_THREADS 256
#define FKS_SOFTMAX_TILE 4096
#define FKS_SELECT_THREADS 512
#define FKS_CORR_THREADS 128

// ---------------------------------------------------------------------------------------------
// Bit-exact scalar helpers (mirrors of freekv-select's CPU code).

// freekv_select::policy::exp_f32, operation by operation.
__device__ __forceinline__ float fks_exp(float x) {
    const float LOG2E = __uint_as_float(0x3fb8aa3bu);
    const float C1 = __uint_as_float(0x3f318000u);
    const float C2 = __uint_as_float(0xb95e8083u);
    const float SHIFTER = __uint_as_float(0x4b400000u);
    const float P0 = __uint_as_float(0x39506968u);
    const float P1 = __uint_as_float(0x3ab743ceu);
    const float P2 = __uint_as_float(0x3c088908u);
    const float P3 = __uint_as_float(0x3d2aa9c1u);
    const float P4 = __uint_as_float(0x3e2aaaaau);
    // Rust's clamp keeps NaN.
    float xc = x;
    if (xc < -87.0f) xc = -87.0f;
    if (xc > 88.0f) xc = 88.0f;
    const float t = __fadd_rn(__fmul_rn(xc, LOG2E), SHIFTER);
    const float n = __fsub_rn(t, SHIFTER);
    const float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, C1)), __fmul_rn(n, C2));
    const float z = __fmul_rn(r, r);
    float p = __fadd_rn(__fmul_rn(P0, r), P1);
    p = __fadd_rn(__fmul_rn(p, r), P2);
    p = __fadd_rn(__fmul_rn(p, r), P3);
    p = __fadd_rn(__fmul_rn(p, r), P4);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fadd_rn(__fmul_rn(p, z), r), 1.0f);
    const u32 ni = (u32)__float_as_int(t) - 0x4B400000u;
    const float scale = __uint_as_float((ni + 127u) << 23);
    return (x < -87.0f) ? 0.0f : __fmul_rn(p, scale);
}

// freekv_select::topk::score_key: order-preserving u32, -0 == +0, NaN -> 0.
__device__ __forceinline__ u32 fks_score_key(float s) {
    if (s != s) return 0u;
    u32 b = __float_as_uint(s);
    if ((b & 0x7fffffffu) == 0u) b = 0u;  // -0 ties with +0 (done on the bits: no FP shortcut)
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// One score term: max(q*u, q*l) with the reference's `if a > b { a } else { b }`.
__device__ __forceinline__ float fks_term(float q, float u, float l) {
    const float a = __fmul_rn(q, u);
    const float b = __fmul_rn(q, l);
    return a > b ? a : b;
}

__device__ __forceinline__ float fks_max(float acc, float x) { return x > acc ? x : acc; }

// Is (seq, KV head) `row` processed at this step? Mode 1 or 2 with 0 < N <= MP, and the filter
// (0 all, 1 flagged only, 2 unflagged only) passes.
__device__ __forceinline__ bool fks_row_active(int mode, int n_pages, int max_pages, int flag,
                                               int filter) {
    if (mode != 1 && mode != 2) return false;
    if (n_pages <= 0 || n_pages > max_pages) return false;
    if (filter == 1 && flag == 0) return false;
    if (filter == 2 && flag != 0) return false;
    return true;
}

// Exclusive prefix sum over the block (blockDim.x a multiple of 32, <= 1024) of `v`; `total`
// receives the block total. `tmp` holds 32 ints. Contains two __syncthreads: every thread must
// call it.
__device__ __forceinline__ int fks_block_exscan(int v, int* tmp, int& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) tmp[warp] = x;
    __syncthreads();
    int before = 0, tot = 0;
    for (int w = 0; w < nwarps; ++w) {
        const int t = tmp[w];
        if (w < warp) before += t;
        tot += t;
    }
    __syncthreads();
    total = tot;
    return before + x - v;
}

// ---------------------------------------------------------------------------------------------
// Correction: per (seq, KV head) block.

extern "C" __global__ void __launch_bounds__(FKS_CORR_THREADS) freekv_correction(
    const bf16* __restrict__ q, u64 q_stride, float* __restrict__ q_prev,
    const int* __restrict__ seq_info, int always, float tau, int aggregate_max,
    int* __restrict__ flags, float* __restrict__ group_cos, int kv_heads, int group,
    int head_dim) {
    // Dynamic shared memory: q_prev of the group (G*d floats), then q (G*d bf16).
    extern __shared__ float corr_smem[];
    __shared__ float cos_s[64];
    const int row = blockIdx.x;
    const int b = row / kv_heads, h = row % kv_heads;
    const int mode = seq_info[b * 4 + 1];
    if (mode != 1 && mode != 2) {
        if (threadIdx.x == 0) {
            flags[row] = 0;
            if (group_cos) group_cos[row] = __int_as_float(0x7fc00000);
        }
        return;
    }
    const int gd = group * head_dim;
    const bf16* qg = q + (size_t)b * q_stride + (size_t)h * gd;
    float* pg = q_prev + ((size_t)b * kv_heads + h) * gd;
    float* ps = corr_smem;
    bf16* qs = reinterpret_cast<bf16*>(corr_smem + gd);
    for (int e = threadIdx.x; e < gd; e += blockDim.x) {
        ps[e] = pg[e];
        qs[e] = qg[e];
    }
    __syncthreads();
    if (mode == 2 && always && !group_cos) {
        // Every head is flagged and nobody reads the cosine: skip it.
        if (threadIdx.x == 0) flags[row] = 1;
    } else if (mode == 2) {
        // freekv_select::cosine: each of the three sums in 8 lanes (thread 8 j + k holds lane k
        // of head j, a = q_prev, b = q), combined by xor shuffles in the reference's order, then
        // the tail (d % 8 terms, in order). Block-uniform trip count: every lane shuffles.
        const int body = (head_dim / 8) * 8;
        for (int base = 0; base < group * 8; base += blockDim.x) {
            const int t = base + threadIdx.x;
            const int j = min(t >> 3, group - 1), k = t & 7;
            const float* a = ps + j * head_dim;
            const bf16* c = qs + j * head_dim;
            float dot = 0.0f, na = 0.0f, nb = 0.0f;
            for (int i = k; i < body; i += 8) {
                const float x = a[i];
                const float y = bf2f(c[i]);
                dot = __fadd_rn(dot, __fmul_rn(x, y));
                na = __fadd_rn(na, __fmul_rn(x, x));
                nb = __fadd_rn(nb, __fmul_rn(y, y));
            }
#pragma unroll
            for (int o = 4; o > 0; o >>= 1) {
                dot = __fadd_rn(dot, __shfl_xor_sync(0xffffffffu, dot, o, 8));
                na = __fadd_rn(na, __shfl_xor_sync(0xffffffffu, na, o, 8));
                nb = __fadd_rn(nb, __shfl_xor_sync(0xffffffffu, nb, o, 8));
            }
            if (t < group * 8 && k == 0) {
                float td = 0.0f, ta = 0.0f, tb = 0.0f;
                for (int i = body; i < head_dim; ++i) {
                    const float x = a[i];
                    const float y = bf2f(c[i]);
                    td = __fadd_rn(td, __fmul_rn(x, y));
                    ta = __fadd_rn(ta, __fmul_rn(x, x));
                    tb = __fadd_rn(tb, __fmul_rn(y, y));
                }
                dot = __fadd_rn(dot, td);
                na = __fadd_rn(na, ta);
                nb = __fadd_rn(nb, tb);
                const float den =
                    __fadd_rn(__fsqrt_rn(__fmul_rn(na, nb)), __uint_as_float(0x2b8cbcccu));
                cos_s[j] = __fdiv_rn(dot, den);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float c;
            if (aggregate_max) {
                c = cos_s[0];
                for (int j = 1; j < group; ++j) c = fks_max(c, cos_s[j]);
            } else {
                // Rust's f32 `Sum` starts from -0.0, then divides by G.
                c = -0.0f;
                for (int j = 0; j < group; ++j) c = __fadd_rn(c, cos_s[j]);
                c = __fdiv_rn(c, (float)group);
            }
            flags[row] = (always || c != c || c < tau) ? 1 : 0;
            if (group_cos) group_cos[row] = c;
        }
    } else if (threadIdx.x == 0) {
        flags[row] = 1;
        if (group_cos) group_cos[row] = __int_as_float(0x7fc00000);
    }
    for (int e = threadIdx.x; e < gd; e += blockDim.x) pg[e] = bf2f(qs[e]);
}

// ---------------------------------------------------------------------------------------------
// Scoring: grid (rows, candidate chunks). Eight threads score one page: thread `lane` holds the
// reference's lane accumulator `lane` (terms i = lane, lane + 8, ...), the lanes are combined by
// xor shuffles in exactly the reference's order, then the (empty, d % 8 == 0) tail is added.

template <int NC>
__device__ __forceinline__ void fks_score(const float* __restrict__ summaries,
                                          const float* __restrict__ q_prev,
                                          const int* __restrict__ seq_info,
                                          const int* __restrict__ flags, int filter, int policy,
                                          float* __restrict__ scratch, int kv_heads, int group,
                                          int max_pages, int ns, int nw, int pages_per_block) {
    constexpr int D = NC * 8;
    extern __shared__ float qs[];
    const int row = blockIdx.x;
    const int b = row / kv_heads, h = row % kv_heads;
    const int n_pages = seq_info[b * 4 + 0], mode = seq_info[b * 4 + 1];
    if (!fks_row_active(mode, n_pages, max_pages, flags[row], filter)) return;
    const int n = n_pages - nw - ns;
    if (n <= 0) return;
    const int i0 = blockIdx.y * pages_per_block;
    if (i0 >= n) return;
    const int i1 = min(n, i0 + pages_per_block);

    const bool pooled = policy == FKS_POLICY_POOLED_MEAN || policy == FKS_POLICY_POOLED_MAX;
    const bool softmax = policy == FKS_POLICY_MEAN_SOFTMAX || policy == FKS_POLICY_MAX_SOFTMAX;
    const float* qg = q_prev + ((size_t)b * kv_heads + h) * (size_t)group * D;
    if (pooled) {
        // freekv_select::policy::pool_queries: head order, then / G for the mean.
        for (int e = threadIdx.x; e < D; e += blockDim.x) {
            float p = qg[e];
            for (int j = 1; j < group; ++j) {
                const float x = qg[(size_t)j * D + e];
                p = (policy == FKS_POLICY_POOLED_MEAN) ? __fadd_rn(p, x) : fks_max(p, x);
            }
            if (policy == FKS_POLICY_POOLED_MEAN) p = __fdiv_rn(p, (float)group);
            qs[e] = p;
        }
    } else {
        for (int e = threadIdx.x; e < group * D; e += blockDim.x) qs[e] = qg[e];
    }
    __syncthreads();

    const int heads = pooled ? 1 : group;
    const int lane = threadIdx.x & 7;
    const int slot = threadIdx.x >> 3;
    const int per_iter = blockDim.x >> 3;
    float* out = scratch + (size_t)row * group * max_pages;
    const float* base = summaries + (size_t)row * max_pages * 2 * D;
    // Block-uniform trip count: every thread reaches every shuffle.
    for (int it = i0; it < i1; it += per_iter) {
        const int i = it + slot;
        const bool valid = i < i1;
        const int ic = valid ? i : i1 - 1;
        const float* U = base + (size_t)(ns + ic) * 2 * D + lane;
        const float* L = U + D;
        float u[NC], l[NC];
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            u[c] = __ldg(U + 8 * c);
            l[c] = __ldg(L + 8 * c);
        }
        float g = 0.0f;
        for (int j = 0; j < heads; ++j) {
            const float* qj = qs + j * D + lane;
            float acc = 0.0f;
#pragma unroll
            for (int c = 0; c < NC; ++c) acc = __fadd_rn(acc, fks_term(qj[8 * c], u[c], l[c]));
            // ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)); IEEE addition commutes, so every
            // lane ends with the same bits.
            acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 4, 8));
            acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 2, 8));
            acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, 1, 8));
            acc = __fadd_rn(acc, 0.0f);  // + the empty tail (turns -0 into +0, as the reference)
            if (softmax) {
                if (valid && lane == (j & 7)) out[(size_t)j * max_pages + i] = acc;
            } else if (j == 0) {
                g = acc;
            } else if (policy == FKS_POLICY_MAX_SCORE) {
                g = fks_max(g, acc);
            } else {
                g = __fadd_rn(g, acc);
            }
        }
        if (!softmax && valid && lane == 0) {
            if (policy == FKS_POLICY_MEAN_SCORE) g = __fdiv_rn(g, (float)group);
            out[i] = g;
        }
    }
}

#define FKS_SCORE_KERNEL(D)                                                                      \
    extern "C" __global__ void __launch_bounds__(FKS_SCORE_THREADS) freekv_score_d##D(            \
        const float* __restrict__ summaries, const float* __restrict__ q_prev,                   \
        const int* __restrict__ seq_info, const int* __restrict__ flags, int filter, int policy, \
        float* __restrict__ scratch, int kv_heads, int group, int max_pages, int ns, int nw,     \
        int pages_per_block) {                                                                  \
        fks_score<D / 8>(summaries, q_prev, seq_info, flags, filter, policy, scratch, kv_heads, \
                         group, max_pages, ns, nw, pages_per_block);                            \
    }
FKS_SCORE_KERNEL(64)
FKS_SCORE_KERNEL(128)
FKS_SCORE_KERNEL(256)

// ---------------------------------------------------------------------------------------------
// Selection: one block per (seq, KV head): softmax + group combine (softmax policies), exact
// top-k by radix select on the score keys with ties to the lower page, then the slot diff.
//
// Middle slots: `cache` = k + spare per row. Middle index i < k is slot ns + i; the spare slots
// i >= k come after the window ring, slot ns + k + nw + (i - k). A selection makes the `want`
// best pages resident (k <= want <= cache: the speculative selection fills the spare slots with
// the next-ranked pages); the k best are the ones attended. Slots that hold a page not wanted
// are free, but keep their page (still cached) until a missing page overwrites them.
//
// With spare slots the free slots are taken lowest-scored page first (empty slots and pages that
// are no longer candidates before any candidate, ties to the lower slot), so the pages most
// likely to be wanted again stay cached.
//
// Dynamic shared memory (ints): sel[cache], free_slots[cache], res[cache], att[k], fkey[cache],
// ford[cache], hist[512], tmp[32], then floats: head_max[G], parts[G * 9], head_sum[G],
// tile[FKS_SOFTMAX_TILE].

// Exact top-`kk` of the n keys of sc (ties to the lower index) compacted ascending into out:
// out[j] = ns + i. Every thread must call it. `hist` holds 512 ints (two histograms: a pass
// counts into one while the other is cleared for the next pass).
//
// Radix select on 8-bit digits, most significant first; a pass stops the search early when
// every key of the threshold bucket is taken (the compaction then compares masked keys), so
// typical rows need two or three passes instead of four. Keys of one digit in a warp are
// counted by one atomic (match_any), so clustered scores do not serialise on a shared bin.
__device__ void fks_topk_compact(const float* __restrict__ sc, int n, int kk, int ns,
                                 int* __restrict__ out, int* hist, int* tmp, int* bcast) {
    const int tid = threadIdx.x, lane = tid & 31;
    const bool take_all = kk >= n;
    u32 prefix = 0u, pmask = 0u;
    int rem = kk;
    if (!take_all) {
        for (int t = tid; t < 256; t += blockDim.x) hist[t] = 0;
        __syncthreads();
        int cur = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            int* h = hist + cur * 256;
            int* hn = hist + (cur ^ 1) * 256;
            // Block-uniform trip count: every lane reaches the match_any.
            for (int base = 0; base < n; base += blockDim.x) {
                const int i = base + tid;
                const u32 key = (i < n) ? fks_score_key(sc[i]) : 0u;
                const bool act = i < n && (key & pmask) == prefix;
                const u32 d = act ? ((key >> shift) & 255u) : 256u;
                const u32 peers = __match_any_sync(0xffffffffu, d);
                if (act && lane == __ffs(peers) - 1) atomicAdd(&h[d], __popc(peers));
            }
            for (int t = tid; t < 256; t += blockDim.x) hn[t] = 0;
            __syncthreads();
            // Thread t < 256 owns digit 255 - t: an exclusive scan over t counts the keys whose
            // digit is > 255 - t.
            const int cnt = (tid < 256) ? h[255 - tid] : 0;
            int tot;
            const int excl = fks_block_exscan(cnt, tmp, tot);
            if (tid < 256 && excl < rem && rem <= excl + cnt) {
                bcast[0] = 255 - tid;
                bcast[1] = rem - excl;
                bcast[2] = (rem - excl == cnt) ? 1 : 0;  // the whole bucket is taken
            }
            __syncthreads();
            prefix |= (u32)bcast[0] << shift;
            pmask |= 255u << shift;
            rem = bcast[1];
            const bool done = bcast[2] != 0;
            // bcast is written again only after the next pass's scan (two more barriers).
            cur ^= 1;
            if (done) break;
        }
    }
    // Ordered compaction: selected = masked key > T, plus the first `rem` masked keys equal to
    // T, ascending page. One packed scan per tile: equal count in the high half, greater in the
    // low half.
    int run_eq = 0, run_sel = 0;
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + tid;
        const bool valid = i < n;
        const u32 key = valid ? (fks_score_key(sc[i]) & pmask) : 0u;
        const bool gt = valid && (take_all || key > prefix);
        const bool eq = valid && !take_all && key == prefix;
        int tot;
        const int excl = fks_block_exscan((eq ? 0x10000 : 0) + (gt ? 1 : 0), tmp, tot);
        const int gt_excl = excl & 0xffff, eq_excl = excl >> 16;
        const int gt_tot = tot & 0xffff, eq_tot = tot >> 16;
        const int quota = max(0, rem - run_eq);
        const bool take = gt || (eq && eq_excl < quota);
        if (take) out[run_sel + gt_excl + min(eq_excl, quota)] = ns + i;
        run_eq += eq_tot;
        run_sel += gt_tot + min(eq_tot, quota);
    }
}

// The top-`kk` of the `kw` pages of `sel` (ascending pages, kw <= blockDim.x), ranked by their
// score keys with ties to the lower page, compacted ascending into out. The same pages as a
// top-`kk` over all candidates: the top-`kw` is a prefix of the same total order. `key` holds
// kw words. Every thread must call it.
__device__ void fks_topk_of_subset(const float* __restrict__ sc, const int* __restrict__ sel,
                                   int kw, int kk, int ns, int* __restrict__ out, u32* key,
                                   int* tmp) {
    const int j = threadIdx.x;
    const bool valid = j < kw;
    if (valid) key[j] = fks_score_key(sc[sel[j] - ns]);
    __syncthreads();
    bool take = false;
    if (valid) {
        const u32 kj = key[j];
        int rank = 0;
        for (int i = 0; i < kw; ++i) {
            const u32 ki = key[i];
            rank += (ki > kj || (ki == kj && i < j)) ? 1 : 0;
        }
        take = rank < kk;
    }
    int tot;
    const int pos = fks_block_exscan(take ? 1 : 0, tmp, tot);
    if (take) out[pos] = sel[j];
}

// Binary search of page p in the ascending list a[0..len).
__device__ __forceinline__ int fks_find(const int* a, int len, int p) {
    int lo = 0, hi = len;
    while (lo < hi) {
        const int m = (lo + hi) >> 1;
        if (a[m] < p) lo = m + 1; else hi = m;
    }
    return (lo < len && a[lo] == p) ? lo : -1;
}

extern "C" __global__ void __launch_bounds__(FKS_SELECT_THREADS) freekv_select_rows(
    const int* __restrict__ seq_info, const int* __restrict__ flags, int filter, int policy,
    float* scratch, int* __restrict__ mid_page, int* __restrict__ page_mid,
    int* __restrict__ recall_count, int* __restrict__ recall_list, int* __restrict__ selected,
    int kv_heads, int group, int max_pages, int ns, int top_k, int nw, int cache, int want,
    int slots, int* __restrict__ page_mask) {
    extern __shared__ int smem[];
    int* sel = smem;
    int* free_slots = sel + cache;
    int* res = free_slots + cache;
    int* att = res + cache;
    u32* fkey = reinterpret_cast<u32*>(att + top_k);
    int* ford = reinterpret_cast<int*>(fkey + cache);
    int* hist = ford + cache;
    int* tmp = hist + 512;
    float* head_max = reinterpret_cast<float*>(tmp + 32);
    float* parts = head_max + group;
    float* head_sum = parts + group * 9;
    float* tile = head_sum + group;  // FKS_SOFTMAX_TILE floats
    __shared__ int bcast[3];

    const int tid = threadIdx.x;
    const int row = blockIdx.x;
    const int b = row / kv_heads;
    const int n_pages = seq_info[b * 4 + 0], mode = seq_info[b * 4 + 1];
    if (!fks_row_active(mode, n_pages, max_pages, flags[row], filter)) {
        if (tid == 0) recall_count[row] = 0;
        return;
    }
    int* mid = mid_page + (size_t)row * cache;
    int* pm = page_mid + (size_t)row * max_pages;
    if (mode == 1) {
        // First sparse step: evict the whole middle (and forget any stale page -> slot entry).
        for (int i = tid; i < cache; i += blockDim.x) mid[i] = -1;
        for (int p = tid; p < max_pages; p += blockDim.x) pm[p] = -1;
    }
    const int n = max(0, n_pages - nw - ns);
    float* sc = scratch + (size_t)row * group * max_pages;
    const bool softmax = policy == FKS_POLICY_MEAN_SOFTMAX || policy == FKS_POLICY_MAX_SOFTMAX;
    const int lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;

    if (softmax && n > 0) {
        // Per-head max (NaN ignored; exact, so any order gives the same value): every thread
        // takes a strided part, warps reduce, then one thread per head combines the warps.
        for (int j = 0; j < group; ++j) {
            const float* s = sc + (size_t)j * max_pages;
            float m = -FK_INF;
            for (int i = tid; i < n; i += blockDim.x) m = fks_max(m, s[i]);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) m = fks_max(m, __shfl_xor_sync(0xffffffffu, m, o));
            if (lane == 0) tile[j * nwarps + warp] = m;
        }
        __syncthreads();
        for (int j = tid; j < group; j += blockDim.x) {
            float m = -FK_INF;
            for (int w = 0; w < nwarps; ++w) m = fks_max(m, tile[j * nwarps + w]);
            head_max[j] = m;
        }
        __syncthreads();
        // Sum of e = exp(s - max) in the reference's 8-lane order: chain k < 8 of head j sums
        // i = k, k + 8, ... below 8 * (n / 8) in increasing i, the tail i >= 8 * (n / 8) is summed
        // in order. The exponentials are computed by the whole block into a shared tile (heads
        // `stride` floats apart, padded against bank conflicts); thread 8 j + k runs chain k of
        // head j over the tile.
        const int body = (n / 8) * 8;
        const int tlen = ((FKS_SOFTMAX_TILE / group) - 8) & ~31;  // stride = 8 mod 32
        const int stride = tlen + 8;
        const bool chain = tid < group * 8;
        const int cj = tid >> 3, cl = tid & 7;
        float acc = 0.0f;
        for (int t0 = 0; t0 < body; t0 += tlen) {
            const int len = min(tlen, body - t0);
            for (int x = tid; x < group * len; x += blockDim.x) {
                const int j = x / len, i = x - j * len;
                tile[j * stride + i] =
                    fks_exp(__fsub_rn(sc[(size_t)j * max_pages + t0 + i], head_max[j]));
            }
            __syncthreads();
            if (chain) {
                const float* e = tile + cj * stride + cl;
#pragma unroll 8
                for (int c = 0; c < len; c += 8) acc = __fadd_rn(acc, e[c]);
            }
            __syncthreads();
        }
        if (chain) parts[cj * 9 + cl] = acc;
        for (int j = tid; j < group; j += blockDim.x) {
            const float* s = sc + (size_t)j * max_pages;
            float t = 0.0f;
            for (int i = body; i < n; ++i) t = __fadd_rn(t, fks_exp(__fsub_rn(s[i], head_max[j])));
            parts[j * 9 + 8] = t;
        }
        __syncthreads();
        for (int j = tid; j < group; j += blockDim.x) {
            const float* a = parts + j * 9;
            head_sum[j] = __fadd_rn(__fadd_rn(__fadd_rn(__fadd_rn(a[0], a[4]), __fadd_rn(a[2], a[6])),
                                              __fadd_rn(__fadd_rn(a[1], a[5]), __fadd_rn(a[3], a[7]))),
                                    a[8]);
        }
        __syncthreads();
        // Group score: softmax values e / sum (e recomputed: exp_f32 is deterministic) combined
        // over the heads in head order.
        const bool mean = policy == FKS_POLICY_MEAN_SOFTMAX;
        for (int i = tid; i < n; i += blockDim.x) {
            float g = __fdiv_rn(fks_exp(__fsub_rn(sc[i], head_max[0])), head_sum[0]);
            for (int j = 1; j < group; ++j) {
                const float e = fks_exp(__fsub_rn(sc[(size_t)j * max_pages + i], head_max[j]));
                const float v = __fdiv_rn(e, head_sum[j]);
                g = mean ? __fadd_rn(g, v) : fks_max(g, v);
            }
            if (mean) g = __fdiv_rn(g, (float)group);
            sc[i] = g;
        }
    }
    __syncthreads();

    // The `want` best pages (resident after this selection) and, within them, the k attended.
    const int kw = min(want, n);
    const int kk = min(top_k, n);
    fks_topk_compact(sc, n, kw, ns, sel, hist, tmp, bcast);
    __syncthreads();
    if (kw > kk && kw <= (int)blockDim.x) {
        fks_topk_of_subset(sc, sel, kw, kk, ns, att, fkey, tmp);
    } else if (kw > kk) {
        fks_topk_compact(sc, n, kk, ns, att, hist, tmp, bcast);
    } else {
        for (int j = tid; j < kk; j += blockDim.x) att[j] = sel[j];
    }
    for (int j = tid; j < kw; j += blockDim.x) res[j] = -1;
    __syncthreads();

    // Slot diff (SlotTable::diff, with lazy eviction): middle slots ascending that are empty or
    // hold a page not wanted are free (with spare slots: lowest-scored page first); missing
    // wanted pages ascending take them in order, and only the pages they overwrite are evicted
    // (with cache == k every free slot is taken when the middle is full, as in SlotTable::diff).
    int nfree = 0;
    for (int base = 0; base < cache; base += blockDim.x) {
        const int i = base + tid;
        const bool valid = i < cache;
        const int p = valid ? mid[i] : -1;
        const int lo = (p >= 0) ? fks_find(sel, kw, p) : -1;
        if (lo >= 0) res[lo] = i;
        const bool is_free = valid && lo < 0;
        int tot;
        const int excl = fks_block_exscan(is_free ? 1 : 0, tmp, tot);
        if (is_free) free_slots[nfree + excl] = i;
        nfree += tot;
    }
    __syncthreads();
    if (cache > top_k && nfree > 1) {
        // Spare slots: order the free slots by the score key of the page they hold (ascending,
        // then by slot); a rank by counting (nfree <= cache is small).
        for (int j = tid; j < nfree; j += blockDim.x) {
            const int p = mid[free_slots[j]];
            const int c = p - ns;
            fkey[j] = (p >= 0 && c >= 0 && c < n) ? fks_score_key(sc[c]) : 0u;
        }
        __syncthreads();
        for (int j = tid; j < nfree; j += blockDim.x) {
            const u32 kj = fkey[j];
            int rank = 0;
            for (int i = 0; i < nfree; ++i) {
                const u32 ki = fkey[i];
                rank += (ki < kj || (ki == kj && i < j)) ? 1 : 0;
            }
            ford[rank] = free_slots[j];
        }
        __syncthreads();
        for (int j = tid; j < nfree; j += blockDim.x) free_slots[j] = ford[j];
        __syncthreads();
    }
    int nrec = 0;
    int* rl = recall_list + (size_t)row * cache * 2;
    for (int base = 0; base < kw; base += blockDim.x) {
        const int j = base + tid;
        const bool valid = j < kw;
        const int p = valid ? sel[j] : -1;
        const int r = valid ? res[j] : -1;
        if (valid && r >= 0) pm[p] = r;
        const bool miss = valid && r < 0;
        int tot;
        const int excl = fks_block_exscan(miss ? 1 : 0, tmp, tot);
        const int m = nrec + excl;
        if (miss && m < nfree) {
            const int i = free_slots[m];
            const int old = mid[i];
            if (old >= 0 && old < max_pages) pm[old] = -1;
            mid[i] = p;
            pm[p] = i;
            rl[2 * m] = p;
            rl[2 * m + 1] = (i < top_k) ? ns + i : ns + nw + i;
        }
        nrec += tot;
    }
    if (tid == 0) recall_count[row] = min(nrec, nfree);
    if (selected) {
        int* so = selected + (size_t)row * top_k;
        for (int j = tid; j < top_k; j += blockDim.x) so[j] = (j < kk) ? att[j] : -1;
    }
    if (page_mask) {
        // Which middle slots this head skips (1): those not holding one of the k best pages.
        __syncthreads();
        const int h = row - b * kv_heads;
        for (int i = tid; i < cache; i += blockDim.x) {
            const int p = mid[i];
            const int slot = (i < top_k) ? ns + i : ns + nw + i;
            page_mask[((size_t)b * slots + slot) * kv_heads + h] =
                (p >= 0 && fks_find(att, kk, p) >= 0) ? 0 : 1;
        }
    }
}
