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
// Fast path: the sorted per-thread maxima bound the prefix that can matter (the k-th largest thread
// maximum for top-k; for top-p / plain sampling the shortest run of thread maxima whose weight
// reaches the target), the few tokens above that bound are gathered, sorted and scanned in shared
// memory. When the bound admits more than SMP_CAP tokens (or 1024 < top_k < vocab), radix selection
// over the whole row gives the same answer, more slowly.

#define SMP_THREADS 1024
#define SMP_CAP 2048
#define SMP_UNROLL 8

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

// Adds w to hist[bin] for every lane, one shared atomic per distinct bin of the warp (lanes with
// the same bin are merged first). bin = 256 means "nothing to add". All 32 lanes must call it.
__device__ __forceinline__ void warp_hist_add(u64* hist, u32 bin, u64 w) {
    const u32 peers = __match_any_sync(0xffffffffu, bin);
    // w <= 2^32: sum 16-bit halves so that 32 lanes cannot overflow a 32-bit reduction.
    const u32 lo = __reduce_add_sync(peers, (u32)(w & 0xffffull));
    const u32 hi = __reduce_add_sync(peers, (u32)(w >> 16));
    const int leader = __ffs(peers) - 1;
    if ((int)(threadIdx.x & 31) == leader && bin < 256u) {
        const u64 sum = ((u64)hi << 16) + (u64)lo;
        if (sum) atomicAdd(&hist[bin], sum);
    }
}

// The key tau (>= floor_key) at which the cumulative weight, walking the order from the top,
// first reaches `target` (1 <= target <= total weight above floor_key). Weight = 1 per token or
// its fixed-point probability weight. Eight passes of 8-bit digits, most significant first.
__device__ u64 radix_select(const float* __restrict__ x, u32 n, u64 floor_key, u64 target, bool by_weight,
                            float xm, float inv_t, SelState* st) {
    constexpr int U = 4;
    u64 prefix = 0ull, above = 0ull;
    for (int p = 0; p < 8; ++p) {
        const int shift = 56 - 8 * p;
        for (int i = threadIdx.x; i < 256; i += blockDim.x) st->hist[i] = 0ull;
        __syncthreads();
        // Uniform trip count so that every lane of every warp takes part in warp_hist_add.
        for (u32 base = 0; base < n; base += U * blockDim.x) {
            float v[U];
#pragma unroll
            for (int j = 0; j < U; ++j) {
                const u32 i = base + j * blockDim.x + threadIdx.x;
                v[j] = i < n ? x[i] : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < U; ++j) {
                const u32 i = base + j * blockDim.x + threadIdx.x;
                u32 bin = 256u;
                u64 w = 0ull;
                if (i < n) {
                    const u64 key = sort_key(v[j], i);
                    if (key >= floor_key && (p == 0 || (key >> (shift + 8)) == prefix)) {
                        w = by_weight ? weight_of(v[j], xm, inv_t) : 1ull;
                        if (w) bin = (u32)((key >> shift) & 255ull);
                    }
                }
                warp_hist_add(st->hist, bin, w);
            }
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

// Calls f(x[i], i) for every i < n, each thread taking i = threadIdx.x (mod blockDim.x), with
// SMP_UNROLL independent loads in flight.
template <typename F>
__device__ __forceinline__ void for_each_row(const float* __restrict__ x, u32 n, F&& f) {
    const u32 stride = blockDim.x;
    u32 base = 0;
    for (; base + SMP_UNROLL * stride <= n; base += SMP_UNROLL * stride) {
        float v[SMP_UNROLL];
#pragma unroll
        for (int j = 0; j < SMP_UNROLL; ++j) v[j] = x[base + j * stride + threadIdx.x];
#pragma unroll
        for (int j = 0; j < SMP_UNROLL; ++j) f(v[j], base + j * stride + threadIdx.x);
    }
    for (u32 i = base + threadIdx.x; i < n; i += stride) f(x[i], i);
}

// Sorts a[0..n) (n a power of two, <= 2 * blockDim.x) in descending order. Ends with a barrier.
__device__ void bitonic_desc(u64* a, u32 n) {
    for (u32 size = 2; size <= n; size <<= 1) {
        for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (u32 p = threadIdx.x; p < n / 2; p += blockDim.x) {
                const u32 i = (p / stride) * 2 * stride + (p % stride);
                const u32 j = i + stride;
                const u64 x = a[i], y = a[j];
                const bool desc = (i & size) == 0;
                if (desc ? (x < y) : (x > y)) {
                    a[i] = y;
                    a[j] = x;
                }
            }
        }
    }
    __syncthreads();
}

// Inclusive prefix sums over a block of 1024 threads, one value each. Ends with a barrier.
__device__ u64 block_scan_u64(u64 w, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u64 y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
    }
    __syncthreads();
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
    __syncthreads();
    return w;
}

extern "C" __global__ void __launch_bounds__(SMP_THREADS)
    argmax_f32(i32* __restrict__ out, const float* __restrict__ logits, u32 vocab, u64 row_stride, u32 rows) {
    __shared__ u64 scratch[32];
    const u32 r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (u64)r * row_stride;
    u64 best = 0ull;
    for_each_row(x, vocab, [&](float v, u32 i) {
        const u64 k = sort_key(v, i);
        best = k > best ? k : best;
    });
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
    const int tid = threadIdx.x;
    const float* x = logits + (u64)r * row_stride;

    // Pass 1: the maximum of each thread's share and of the row.
    u64 tmax = 0ull;
    for_each_row(x, vocab, [&](float v, u32 i) {
        const u64 k = sort_key(v, i);
        tmax = k > tmax ? k : tmax;
    });
    const u64 best = block_max_u64(tmax, scratch);
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
    const bool k_on = K > 0 && (u32)K < vocab;
    // Fast path unless 1024 < top_k < vocab.
    bool fast = !k_on || K <= SMP_THREADS;
    u64 floor_key = 0ull;
    u64 z_all = 0ull;
    if (fast) {
        s_key[tid] = tmax;
        bitonic_desc(s_key, SMP_THREADS);
        if (k_on) {
            floor_key = s_key[K - 1];  // at least K tokens lie at or above it
        } else {
            u64 zl = 0ull;
            for_each_row(x, vocab, [&](float v, u32 i) { zl += weight_of(v, xm, inv_t); });
            z_all = block_sum_u64(zl, scratch);
            const u64 target = (P < 1.0f) ? clamp_target(ceil((double)P * (double)z_all), z_all)
                                          : clamp_target(floor((double)u * (double)z_all) + 1.0, z_all);
            const u64 mk = s_key[tid];
            const u64 w = mk ? weight_of(x[key_index(mk)], xm, inv_t) : 0ull;
            const u64 c = block_scan_u64(w, scratch);
            if (tid == 0) s_pick = 0xffffffffu;
            __syncthreads();
            const u64 prev = __shfl_up_sync(0xffffffffu, c, 1);
            const bool first_lane_prev = (tid & 31) == 0;
            const u64 before = first_lane_prev ? (tid == 0 ? 0ull : scratch[(tid >> 5) - 1]) : prev;
            if (c >= target && before < target) s_pick = tid;
            __syncthreads();
            const u32 j = s_pick;
            if (j == 0xffffffffu) fast = false;
            else floor_key = s_key[j];
        }
        __syncthreads();
        if (fast) {
            if (tid == 0) s_count = 0u;
            __syncthreads();
            for_each_row(x, vocab, [&](float v, u32 i) {
                const u64 k = sort_key(v, i);
                if (k >= floor_key) {
                    const u32 slot = atomicAdd(&s_count, 1u);
                    if (slot < SMP_CAP) s_key[slot] = k;
                }
            });
            __syncthreads();
            if (s_count > SMP_CAP) fast = false;
        }
    }
    if (fast) {
        const u32 n = s_count;
        u32 np = 2;
        while (np < n) np <<= 1;
        for (u32 i = n + tid; i < np; i += blockDim.x) s_key[i] = 0ull;
        bitonic_desc(s_key, np);
        // Weights and inclusive prefix sums, two consecutive tokens per thread.
        const u32 i0 = 2 * tid, i1 = 2 * tid + 1;
        const u64 w0 = i0 < n ? weight_of(x[key_index(s_key[i0])], xm, inv_t) : 0ull;
        const u64 w1 = i1 < n ? weight_of(x[key_index(s_key[i1])], xm, inv_t) : 0ull;
        const u64 c = block_scan_u64(w0 + w1, scratch);
        if (i0 < SMP_CAP) s_cum[i0] = c - w1;
        if (i1 < SMP_CAP) s_cum[i1] = c;
        __syncthreads();
        const u32 last = k_on ? (u32)K - 1 : n - 1;
        const u64 zb = k_on ? s_cum[last] : z_all;
        u32 cut = last;
        u64 zp = zb;
        if (P < 1.0f) {
            const u64 tp = clamp_target(ceil((double)P * (double)zb), zb);
            if (tid == 0) s_pick = last;
            __syncthreads();
            for (u32 j = tid; j <= last; j += blockDim.x)
                if (s_cum[j] >= tp && (j == 0 || s_cum[j - 1] < tp)) s_pick = j;
            __syncthreads();
            cut = s_pick;
            zp = s_cum[cut];
            __syncthreads();
        }
        const u64 ts = clamp_target(floor((double)u * (double)zp) + 1.0, zp);
        if (tid == 0) s_pick = cut;
        __syncthreads();
        for (u32 j = tid; j <= cut; j += blockDim.x)
            if (s_cum[j] >= ts && (j == 0 || s_cum[j - 1] < ts)) s_pick = j;
        __syncthreads();
        if (tid == 0) out[r] = (i32)key_index(s_key[s_pick]);
        return;
    }

    // Slow path: radix selection over the whole row.
    u64 floor_k = 0ull;
    if (k_on) floor_k = radix_select(x, vocab, 0ull, (u64)K, false, xm, inv_t, &st);
    u64 z = 0ull;
    for_each_row(x, vocab, [&](float v, u32 i) {
        if (sort_key(v, i) >= floor_k) z += weight_of(v, xm, inv_t);
    });
    z = block_sum_u64(z, scratch);
    u64 floor_p = floor_k, zp = z;
    if (P < 1.0f) {
        const u64 tp = clamp_target(ceil((double)P * (double)z), z);
        floor_p = radix_select(x, vocab, floor_k, tp, true, xm, inv_t, &st);
        u64 sum = 0ull;
        for_each_row(x, vocab, [&](float v, u32 i) {
            if (sort_key(v, i) >= floor_p) sum += weight_of(v, xm, inv_t);
        });
        zp = block_sum_u64(sum, scratch);
    }
    const u64 ts = clamp_target(floor((double)u * (double)zp) + 1.0, zp);
    const u64 pick = radix_select(x, vocab, floor_p, ts, true, xm, inv_t, &st);
    if (tid == 0) out[r] = (i32)key_index(pick);
}
