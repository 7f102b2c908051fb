// Kernels of src/ops/residual.rs (add-ReLU, the ReLU gate, gradient sums): part of kiln's one
// PTX module (src/ops/kernels.cu).
#include "common.cuh"

// Two same-sized operands, elementwise, by `mode`: 0 relu(a + b); 1 a where b > 0 (the ReLU's
// gradient `a` read from its output `b`); 2 a + b (the backward pass's sum of two gradients).
template <typename T, typename I, int W>
__device__ void pair_run(const T* a, const T* b, I total, int mode, T* out) {
    I step = (I)gridDim.x * blockDim.x, first = (I)blockIdx.x * blockDim.x + threadIdx.x;
    for (I g = first; g < total / W; g += step) {
        I i = g * W;
        float va[W], vb[W];
        load_w<W>(a + i, va);
        load_w<W>(b + i, vb);
#pragma unroll
        for (int k = 0; k < W; k++)
            va[k] = mode == 1   ? (vb[k] > 0.0f ? va[k] : 0.0f)
                    : mode == 0 ? fmaxf(va[k] + vb[k], 0.0f)
                                : va[k] + vb[k];
        store_w<W>(out + i, va);
    }
}

template <typename T>
__device__ void pair(const T* a, const T* b, size_t total, int mode, int vec8, T* out) {
    BY_SHAPE(total, vec8, (pair_run<T, I, W>(a, b, (I)total, mode, out)))
}

// The backward pass's sum of two gradients of a ReLU's output y, through that ReLU: a + b where
// y > 0, else 0. add_same then relu_gate in one pass, the same bits: a residual block's output
// feeds the next block's two branches, and its own end gates their summed gradient.
template <typename T, typename I, int W>
__device__ void add_gated_run(const T* a, const T* b, const T* y, I total, T* out) {
    I step = (I)gridDim.x * blockDim.x, first = (I)blockIdx.x * blockDim.x + threadIdx.x;
    for (I g = first; g < total / W; g += step) {
        I i = g * W;
        float va[W], vb[W], vy[W];
        load_w<W>(a + i, va);
        load_w<W>(b + i, vb);
        load_w<W>(y + i, vy);
#pragma unroll
        for (int k = 0; k < W; k++) va[k] = vy[k] > 0.0f ? va[k] + vb[k] : 0.0f;
        store_w<W>(out + i, va);
    }
}

// The entry points, one per data type.
#define RESIDUAL_ENTRY_POINTS(T, SUFFIX)                                                        \
    extern "C" __global__ void add_relu_fwd_##SUFFIX(const T* a, const T* b, size_t total,     \
                                                     int vec8, T* y) {                         \
        pair(a, b, total, 0, vec8, y);                                                         \
    }                                                                                          \
    extern "C" __global__ void relu_gate_##SUFFIX(const T* grad, const T* y, size_t total,     \
                                                  int vec8, T* out) {                          \
        pair(grad, y, total, 1, vec8, out);                                                    \
    }                                                                                          \
    extern "C" __global__ void add_same_##SUFFIX(const T* a, const T* b, size_t total,         \
                                                 int vec8, T* out) {                           \
        pair(a, b, total, 2, vec8, out);                                                       \
    }                                                                                          \
    extern "C" __global__ void add_gated_##SUFFIX(const T* a, const T* b, const T* y,          \
                                                  size_t total, int vec8, T* out) {            \
        BY_SHAPE(total, vec8, (add_gated_run<T, I, W>(a, b, y, (I)total, out)))                 \
    }                                                                                          \
    /* In place, into the held gradient a: each thread reads its values before writing them. */ \
    extern "C" __global__ void add_same_into_##SUFFIX(T* a, const T* b, size_t total,          \
                                                      int vec8) {                              \
        pair(a, b, total, 2, vec8, a);                                                         \
    }                                                                                          \
    extern "C" __global__ void add_gated_into_##SUFFIX(T* a, const T* b, const T* y,           \
                                                       size_t total, int vec8) {               \
        BY_SHAPE(total, vec8, (add_gated_run<T, I, W>(a, b, y, (I)total, a)))                   \
    }

RESIDUAL_ENTRY_POINTS(float, f32)
RESIDUAL_ENTRY_POINTS(__nv_bfloat16, bf16)
RESIDUAL_ENTRY_POINTS(__half, f16)
