// Kernels of src/ops/gelu.rs: part of kiln's one PTX module (src/ops/kernels.cu).
#include "common.cuh"

// ---- GELU (erf form, PyTorch's default), forward and backward in one pass each (candle's
// backward composes eight kernels), eight values a thread in 16-byte accesses where `vec8` ---

template <typename T, typename I, int W>
__device__ void gelu_fwd_run(const T* x, I total, T* y) {
    I step = (I)gridDim.x * blockDim.x;
    for (I g = (I)blockIdx.x * blockDim.x + threadIdx.x; g < total / W; g += step) {
        float v[W];
        load_w<W>(x + g * W, v);
#pragma unroll
        for (int k = 0; k < W; k++) v[k] = gelu_value(v[k]);
        store_w<W>(y + g * W, v);
    }
}

template <typename T, typename I, int W>
__device__ void gelu_bwd_run(const T* x, const T* grad, I total, T* dx) {
    I step = (I)gridDim.x * blockDim.x;
    for (I g = (I)blockIdx.x * blockDim.x + threadIdx.x; g < total / W; g += step) {
        float v[W], d[W];
        load_w<W>(x + g * W, v);
        load_w<W>(grad + g * W, d);
#pragma unroll
        for (int k = 0; k < W; k++) d[k] = d[k] * gelu_slope(v[k]);
        store_w<W>(dx + g * W, d);
    }
}

#define GELU_ENTRY_POINTS(T, SUFFIX)                                                           \
    extern "C" __global__ void gelu_fwd_##SUFFIX(const T* x, size_t total, int vec8, T* y) {  \
        BY_SHAPE(total, vec8, (gelu_fwd_run<T, I, W>(x, (I)total, y)))                         \
    }                                                                                          \
    extern "C" __global__ void gelu_bwd_##SUFFIX(const T* x, const T* grad, size_t total,     \
                                                 int vec8, T* dx) {                            \
        BY_SHAPE(total, vec8, (gelu_bwd_run<T, I, W>(x, grad, (I)total, dx)))                  \
    }

GELU_ENTRY_POINTS(float, f32)
GELU_ENTRY_POINTS(__nv_bfloat16, bf16)
GELU_ENTRY_POINTS(__half, f16)
