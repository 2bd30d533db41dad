// Shared helpers for every FreeKV kernel module. This text is prepended to each module before NVRTC
// compiles it (see src/compile.rs), so modules need no #include of their own beyond what is here.
#include <cuda_bf16.h>

typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef __nv_bfloat16 bf16;

#define FK_INF __int_as_float(0x7f800000)
#define FK_LOG2E 1.4426950408889634f

// bf16 <-> f32. bf16 is the upper half of an f32, so widening is a shift.
__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float lo_bf(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float hi_bf(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// Packs two floats into two bf16 (round to nearest even): `a` in the low half (lower address).
__device__ __forceinline__ u32 pack_bf2(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<u32*>(&h);
}

// Loads 8 consecutive bf16 (16 bytes, must be 16-byte aligned) as floats.
__device__ __forceinline__ void load8(const bf16* p, float (&o)[8]) {
    uint4 v = *reinterpret_cast<const uint4*>(p);
    o[0] = lo_bf(v.x); o[1] = hi_bf(v.x);
    o[2] = lo_bf(v.y); o[3] = hi_bf(v.y);
    o[4] = lo_bf(v.z); o[5] = hi_bf(v.z);
    o[6] = lo_bf(v.w); o[7] = hi_bf(v.w);
}
__device__ __forceinline__ void unpack8(uint4 v, float (&o)[8]) {
    o[0] = lo_bf(v.x); o[1] = hi_bf(v.x);
    o[2] = lo_bf(v.y); o[3] = hi_bf(v.y);
    o[4] = lo_bf(v.z); o[5] = hi_bf(v.z);
    o[6] = lo_bf(v.w); o[7] = hi_bf(v.w);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32 floats.
// Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = (lane < nwarps) ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

// Asynchronous 16-byte global -> shared copies (sm_80+), grouped and awaited explicitly.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// d += a * b: one m16n8k16 bf16 tensor-core product with fp32 accumulation (a row-major 16x16
// in four registers, b column-major 16x8 in two), as the prefill attention and the GEMM use it.
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Total order on (value desc, index asc) as one unsigned key: larger key = earlier.
// NaN sorts below every number (order value 0).
__device__ __forceinline__ u32 float_order(float x) {
    if (x != x) return 0u;
    u32 b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ u64 sort_key(float x, u32 idx) {
    return ((u64)float_order(x) << 32) | (u64)(~idx);
}
__device__ __forceinline__ u32 key_index(u64 key) { return ~(u32)(key & 0xffffffffull); }
