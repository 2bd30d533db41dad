// FreeKV data-movement kernels (placeholder until the recall kernels land).
extern "C" __global__ void freekv_recall_placeholder() {}
