// FreeKV data movement: page offload (NHD device page -> HND host page, plus the page summary),
// zero-copy gather recall (HND host units -> NHD resident slots), the staging scatter of the
// streamed recall, and NHD page copies.
//
// Layouts (see the GPU FreeKV contract):
//   NHD pool / slots : bf16 [pages][2][P][Hkv][d]            (K then V)
//   HND host page    : bf16 [Hkv][2][P][d]; unit (page, h) = 2*P*d contiguous elements at h*2*P*d
//   host_pages       : u64  [bs][MP]  device-visible address of the HND page, 0 = not allocated
//   summaries        : f32  [bs][Hkv][MP][2][d]  ([0] upper, [1] lower)
//   recall_count     : i32  [bs][Hkv];  recall_list: i32 [bs][Hkv][k][2] = (logical page, slot)
//   flags            : i32  [bs][Hkv]   (1 = corrective path this step)
//
// Optional counters (u32 [2], may be null): [0] += units moved, [1] += entries skipped because
// they named something that does not exist (host page 0, page/slot/seq/head out of range,
// misaligned host address). Entries with seq = -1 are padding and are not counted.
//
// Head dims are multiples of 8 so that every row is a whole number of 16-byte vectors; the
// launchers check this and the alignment of every base address.

#define RC_THREADS 256
// 16-byte loads issued back to back per thread before the matching stores (latency hiding for
// reads of mapped host memory over PCIe).
#define RC_UNROLL 8
// Units a gather block copies at once (more bytes in flight per block).
#define RC_BATCH 4

// Summary kinds (match ops::recall's encoding of freekv_select::SummaryKind).
#define SUM_MINMAX 0u
#define SUM_ARKVALE 1u

// Head filters (match ops::select::HeadFilter).
#define FILTER_ALL 0u
#define FILTER_FLAGGED 1u
#define FILTER_UNFLAGGED 2u

__device__ __forceinline__ void rc_count(u32* counters, u32 which) {
    if (counters != nullptr && threadIdx.x == 0) atomicAdd(counters + which, 1u);
}

// ---------------------------------------------------------------------------------------------
// Offload. grid = (n entries, Hkv), block = RC_THREADS.
// entries: i32 [n][3] = (seq, src physical page id, logical page); seq = -1: skip.
// Per (entry, head h): the summary of the page's P keys of head h (exactly
// freekv_select::summarize_block on the bf16 -> f32 keys: MinMax = elementwise max / min over the
// tokens in token order; ArkVale = c = (max + min) / 2, r = (sum over tokens of |k - c|) / P in
// token order, upper = c + r, lower = c - r; every operation rounded separately, no contraction)
// into summaries[seq][h][page], and the HND unit written through host_pages[seq][page]
// (+ h*2*P*d elements). A host page address of 0 skips the whole (entry, head) (nothing written,
// counters[1] incremented).
extern "C" __global__ void __launch_bounds__(RC_THREADS)
    freekv_offload_bf16(const bf16* __restrict__ src, const i32* __restrict__ entries, u32 n,
                        const u64* __restrict__ host_pages, float* __restrict__ summaries,
                        u32* counters, u32 src_pages, u32 bs, u32 hkv, u32 mp, u32 page_size,
                        u32 head_dim, u32 kind) {
    const u32 e = blockIdx.x, h = blockIdx.y;
    if (e >= n || h >= hkv) return;
    const i32 seq = entries[(u64)e * 3 + 0];
    const i32 sp = entries[(u64)e * 3 + 1];
    const i32 page = entries[(u64)e * 3 + 2];
    if (seq == -1) return;
    if (seq < 0 || (u32)seq >= bs || sp < 0 || (u32)sp >= src_pages || page < 0 ||
        (u32)page >= mp) {
        rc_count(counters, 1);
        return;
    }
    const u64 dst_addr = host_pages[(u64)seq * mp + page];
    if (dst_addr == 0 || (dst_addr & 15ull) != 0) {
        rc_count(counters, 1);
        return;
    }
    const u64 row = (u64)hkv * head_dim;  // elements from one NHD token row to the next
    const bf16* sp_base = src + (u64)sp * 2 * page_size * row + (u64)h * head_dim;

    // Summary of the P keys (K rows 0..P of head h).
    float* sum = summaries + (((u64)seq * hkv + h) * mp + page) * 2 * head_dim;
    for (u32 i = threadIdx.x; i < head_dim; i += blockDim.x) {
        float up = bf2f(sp_base[i]);
        float lo = up;
        for (u32 t = 1; t < page_size; ++t) {
            const float k = bf2f(sp_base[(u64)t * row + i]);
            up = fmaxf(up, k);
            lo = fminf(lo, k);
        }
        if (kind == SUM_ARKVALE) {
            const float c = __fdiv_rn(__fadd_rn(up, lo), 2.0f);
            float dev = 0.0f;
            for (u32 t = 0; t < page_size; ++t) {
                const float k = bf2f(sp_base[(u64)t * row + i]);
                dev = __fadd_rn(dev, fabsf(__fsub_rn(k, c)));
            }
            const float r = __fdiv_rn(dev, (float)page_size);
            up = __fadd_rn(c, r);
            lo = __fsub_rn(c, r);
        }
        sum[i] = up;
        sum[head_dim + i] = lo;
    }

    // HND unit: 2*P rows of d, row r of the unit = NHD token row r (K rows then V rows).
    uint4* dst = reinterpret_cast<uint4*>(dst_addr + (u64)h * 2 * page_size * head_dim * 2);
    const u32 vpr = head_dim / 8;
    const u32 nvec = 2 * page_size * vpr;
    for (u32 j = threadIdx.x; j < nvec; j += blockDim.x) {
        const u32 r = j / vpr, c = j - r * vpr;
        dst[j] = *reinterpret_cast<const uint4*>(sp_base + (u64)r * row + c * 8);
    }
    // Make the host writes visible to the host (and to later readers through the mapping).
    __threadfence_system();
    rc_count(counters, 0);
}

// ---------------------------------------------------------------------------------------------
// Gather (zero-copy recall). grid = (<= max_blocks), block = RC_THREADS (required: the row scan
// uses one thread per row of a chunk).
// Every block walks the (seq, head) rows in order, 256 at a time: the counts of a chunk (0 for a
// row the filter drops) are scanned in shared memory; unit i of a row whose units start at global
// index s goes to block (s + i) mod gridDim.x. A block copies its units RC_BATCH at a time with
// RC_UNROLL 16-byte loads per thread in flight.
struct GatherUnit {
    const uint4* src;
    bf16* dst;
};

__device__ __forceinline__ void gather_batch(const GatherUnit* batch, u32 nunits, u32 nvec,
                                             u32 vpr, u64 dst_row) {
    const u32 total = nunits * nvec;
    for (u32 j0 = threadIdx.x; j0 < total; j0 += RC_UNROLL * blockDim.x) {
        uint4 v[RC_UNROLL];
#pragma unroll
        for (u32 u = 0; u < RC_UNROLL; ++u) {
            const u32 j = j0 + u * blockDim.x;
            if (j < total) {
                const u32 b = j / nvec, jj = j - b * nvec;
                v[u] = batch[b].src[jj];
            }
        }
#pragma unroll
        for (u32 u = 0; u < RC_UNROLL; ++u) {
            const u32 j = j0 + u * blockDim.x;
            if (j < total) {
                const u32 b = j / nvec, jj = j - b * nvec;
                const u32 r = jj / vpr, c = jj - r * vpr;
                *reinterpret_cast<uint4*>(batch[b].dst + (u64)r * dst_row + c * 8) = v[u];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(RC_THREADS)
    freekv_gather_bf16(const u64* __restrict__ host_pages, const i32* __restrict__ recall_count,
                       const i32* __restrict__ recall_list, const i32* __restrict__ flags,
                       u32 filter, bf16* __restrict__ slots, u32* counters, u32 bs, u32 hkv,
                       u32 k, u32 nb, u32 mp, u32 page_size, u32 head_dim) {
    __shared__ u32 s_cnt[RC_THREADS];
    __shared__ u32 s_pre[RC_THREADS];
    __shared__ u32 s_warp[RC_THREADS / 32];
    const u32 rows = bs * hkv;
    const u32 grid = gridDim.x, me = blockIdx.x;
    const u32 vpr = head_dim / 8;
    const u32 nvec = 2 * page_size * vpr;
    const u64 dst_row = (u64)hkv * head_dim;
    const u64 page_elems = 2 * (u64)page_size * dst_row;
    const u64 unit_bytes = 2 * (u64)page_size * head_dim * 2;
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    GatherUnit batch[RC_BATCH];
    u32 nbatch = 0;
    u32 base = 0;  // units of all earlier chunks (uniform across the block)
    for (u32 r0 = 0; r0 < rows; r0 += RC_THREADS) {
        const u32 r = r0 + threadIdx.x;
        u32 cnt = 0;
        if (r < rows) {
            const i32 c = recall_count[r];
            cnt = c < 0 ? 0u : ((u32)c > k ? k : (u32)c);
            if (cnt != 0 && filter != FILTER_ALL) {
                const bool flagged = flags[r] != 0;
                if ((filter == FILTER_FLAGGED) != flagged) cnt = 0;
            }
        }
        // Block-wide exclusive scan of cnt.
        u32 incl = cnt;
#pragma unroll
        for (u32 o = 1; o < 32; o <<= 1) {
            const u32 y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        if (lane == 31) s_warp[warp] = incl;
        __syncthreads();
        if (warp == 0) {
            const u32 nw = blockDim.x / 32;
            u32 w = lane < nw ? s_warp[lane] : 0u;
            u32 wi = w;
#pragma unroll
            for (u32 o = 1; o < 32; o <<= 1) {
                const u32 y = __shfl_up_sync(0xffffffffu, wi, o);
                if (lane >= o) wi += y;
            }
            if (lane < nw) s_warp[lane] = wi - w;  // exclusive prefix of the warps
        }
        __syncthreads();
        s_cnt[threadIdx.x] = cnt;
        s_pre[threadIdx.x] = s_warp[warp] + incl - cnt;
        __syncthreads();
        const u32 in_chunk = min((u32)RC_THREADS, rows - r0);
        for (u32 j = 0; j < in_chunk; ++j) {
            const u32 c = s_cnt[j];
            if (c == 0) continue;
            const u32 start = base + s_pre[j];
            const u32 row = r0 + j;
            const u32 seq = row / hkv, h = row - seq * hkv;
            for (u32 i = (me + grid - start % grid) % grid; i < c; i += grid) {
                const u64 item = (u64)row * k + i;
                const i32 page = recall_list[item * 2];
                const i32 slot = recall_list[item * 2 + 1];
                u64 addr = 0;
                if (page >= 0 && (u32)page < mp && slot >= 0 && (u32)slot < nb)
                    addr = host_pages[(u64)seq * mp + page];
                if (addr == 0 || (addr & 15ull) != 0) {
                    rc_count(counters, 1);
                    continue;
                }
                batch[nbatch].src = reinterpret_cast<const uint4*>(addr + (u64)h * unit_bytes);
                batch[nbatch].dst = slots + ((u64)seq * nb + slot) * page_elems + (u64)h * head_dim;
                if (++nbatch == RC_BATCH) {
                    gather_batch(batch, nbatch, nvec, vpr, dst_row);
                    if (counters != nullptr && threadIdx.x == 0) atomicAdd(counters, nbatch);
                    nbatch = 0;
                }
            }
        }
        // The last chunk's total: inclusive prefix of its last row.
        base += s_pre[in_chunk - 1] + s_cnt[in_chunk - 1];
        __syncthreads();
    }
    if (nbatch > 0) {
        gather_batch(batch, nbatch, nvec, vpr, dst_row);
        if (counters != nullptr && threadIdx.x == 0) atomicAdd(counters, nbatch);
    }
}

// ---------------------------------------------------------------------------------------------
// Scatter of staged units (streamed recall). grid = n, block = RC_THREADS.
// staging: bf16 [n][2][P][d] (HND units); units: i32 [n][3] = (seq, slot, head); seq = -1: skip.
extern "C" __global__ void __launch_bounds__(RC_THREADS)
    freekv_scatter_bf16(const bf16* __restrict__ staging, const i32* __restrict__ units, u32 n,
                        bf16* __restrict__ slots, u32* counters, u32 bs, u32 hkv, u32 nb,
                        u32 page_size, u32 head_dim) {
    const u32 e = blockIdx.x;
    if (e >= n) return;
    const i32 seq = units[(u64)e * 3 + 0];
    const i32 slot = units[(u64)e * 3 + 1];
    const i32 h = units[(u64)e * 3 + 2];
    if (seq == -1) return;
    if (seq < 0 || (u32)seq >= bs || slot < 0 || (u32)slot >= nb || h < 0 || (u32)h >= hkv) {
        rc_count(counters, 1);
        return;
    }
    const u32 vpr = head_dim / 8;
    const u32 nvec = 2 * page_size * vpr;
    const u64 dst_row = (u64)hkv * head_dim;
    const uint4* src = reinterpret_cast<const uint4*>(staging + (u64)e * 2 * page_size * head_dim);
    bf16* dst = slots + ((u64)seq * nb + slot) * 2 * page_size * dst_row + (u64)h * head_dim;
    for (u32 j = threadIdx.x; j < nvec; j += blockDim.x) {
        const u32 r = j / vpr, c = j - r * vpr;
        *reinterpret_cast<uint4*>(dst + (u64)r * dst_row + c * 8) = src[j];
    }
    rc_count(counters, 0);
}

// ---------------------------------------------------------------------------------------------
// Whole-page copies. grid = (n, chunks), block = RC_THREADS.
// pairs: i32 [n][2] = (src page, dst page); a pair with an id out of range is skipped.
extern "C" __global__ void __launch_bounds__(RC_THREADS)
    copy_pages_bf16(const bf16* __restrict__ src, bf16* __restrict__ dst,
                    const i32* __restrict__ pairs, u32 n, u64 page_elems, u32 src_pages,
                    u32 dst_pages) {
    const u32 e = blockIdx.x;
    if (e >= n) return;
    const i32 s = pairs[(u64)e * 2], d = pairs[(u64)e * 2 + 1];
    if (s < 0 || (u32)s >= src_pages || d < 0 || (u32)d >= dst_pages) return;
    const uint4* sv = reinterpret_cast<const uint4*>(src + (u64)s * page_elems);
    uint4* dv = reinterpret_cast<uint4*>(dst + (u64)d * page_elems);
    const u64 nvec = page_elems / 8;
    for (u64 j = (u64)blockIdx.y * blockDim.x + threadIdx.x; j < nvec;
         j += (u64)gridDim.y * blockDim.x)
        dv[j] = sv[j];
}
