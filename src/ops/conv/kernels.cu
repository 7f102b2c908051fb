// Kernels of src/ops/conv (filter.rs, bias.rs): part of kiln's one PTX module
// (src/ops/kernels.cu).
#include "../common.cuh"

// ---- convolution filters: the f32 master weight [CO, C, KH, KW] (PyTorch's layout) in the
// activations' type and cuDNN's channels-last filter layout [CO, KH, KW, C], and the filter's
// gradient back, each in one pass (a cast and a strided copy each way took four launches) ------

#define FILTER_ENTRY_POINTS(T, SUFFIX)                                                          \
    extern "C" __global__ void filter_to_last_##SUFFIX(const float* w, unsigned c,            \
                                                       unsigned taps, unsigned total, T* out) { \
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total;                    \
             i += gridDim.x * blockDim.x) {                                                    \
            unsigned ch = i % c, rest = i / c, tap = rest % taps, co = rest / taps;            \
            store(out + i, w[(co * c + ch) * taps + tap]);                                     \
        }                                                                                      \
    }                                                                                          \
    extern "C" __global__ void filter_from_last_##SUFFIX(const T* g, unsigned c,              \
                                                         unsigned taps, unsigned total,        \
                                                         float* out) {                         \
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total;                    \
             i += gridDim.x * blockDim.x) {                                                    \
            unsigned tap = i % taps, rest = i / taps, ch = rest % c, co = rest / c;            \
            out[i] = load(g[(co * taps + tap) * c + ch]);                                      \
        }                                                                                      \
    }

FILTER_ENTRY_POINTS(float, f32)
FILTER_ENTRY_POINTS(__nv_bfloat16, bf16)
FILTER_ENTRY_POINTS(__half, f16)

// ---- a per-channel bias added to channels-last activations (the bias in their type); its
// gradient is a matrix product on the host side (candle's sum over rows took 1.1 ms of a
// fastnet step) ----------------------------------------------------------------------------

// `vec8`: C a multiple of 8 and both operands aligned to 8 elements, eight values a thread.
template <typename T, int W>
__device__ void bias_last_run(const T* y, const T* b, unsigned c, unsigned total, T* out) {
    for (unsigned g = blockIdx.x * blockDim.x + threadIdx.x; g < total / W;
         g += gridDim.x * blockDim.x) {
        unsigned i = g * W;
        float v[W], bias[W];
        load_w<W>(y + i, v);
        load_w<W>(b + i % c, bias);
#pragma unroll
        for (int k = 0; k < W; k++) v[k] = v[k] + bias[k];
        store_w<W>(out + i, v);
    }
}

#define BIAS_ENTRY_POINTS(T, SUFFIX)                                                            \
    extern "C" __global__ void bias_last_##SUFFIX(const T* y, const T* b, unsigned c,         \
                                                  unsigned total, int vec8, T* out) {          \
        if (vec8)                                                                              \
            bias_last_run<T, 8>(y, b, c, total, out);                                          \
        else                                                                                   \
            bias_last_run<T, 1>(y, b, c, total, out);                                          \
    }

BIAS_ENTRY_POINTS(float, f32)
BIAS_ENTRY_POINTS(__nv_bfloat16, bf16)
BIAS_ENTRY_POINTS(__half, f16)
