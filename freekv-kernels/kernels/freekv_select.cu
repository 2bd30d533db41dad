// FreeKV selection kernels (placeholder until the select kernels land).
extern "C" __global__ void freekv_select_placeholder() {}
