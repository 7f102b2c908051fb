// Device helpers that several groups of kiln's kernels share: the block size and block sums,
// loads and stores of f32, bf16 and f16 as f32 (one value or eight in 16-byte accesses), the
// activations a kernel may fuse, and BY_SHAPE, which picks a kernel's width and index type.
// Included once by kernels.cu (the one PTX module) and by each group's file, so that each
// reads on its own.
#pragma once

#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define BLOCK 256

// Sums `value` over the block, in a fixed order (the same result every run). All threads must
// call it; thread 0 gets the total. `scratch` holds BLOCK floats.
__device__ float block_sum(float value, float* scratch) {
    scratch[threadIdx.x] = value;
    __syncthreads();
    for (int half = BLOCK / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) scratch[threadIdx.x] += scratch[threadIdx.x + half];
        __syncthreads();
    }
    float total = scratch[0];
    __syncthreads();
    return total;
}

// ---- f32, bf16 or f16 data (`_f32` / `_bf16` / `_f16` entry points), f32 parameters and
// statistics, f32 arithmetic (as PyTorch's bf16 autocast runs them) ---------------------------

__device__ __forceinline__ float load(float v) { return v; }
__device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float load(__half v) { return __half2float(v); }
__device__ __forceinline__ void store(float* at, float v) { *at = v; }
__device__ __forceinline__ void store(__nv_bfloat16* at, float v) { *at = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(__half* at, float v) { *at = __float2half_rn(v); }

// v as T holds it (f32: v itself).
template <typename T> __device__ __forceinline__ float rounded(float v) {
    T t;
    store(&t, v);
    return load(t);
}

// What follows a BatchNorm in its kernels' pass (`act`; ops::Activation on the host side).
#define ACT_IDENTITY 0
#define ACT_RELU 1
#define ACT_GELU 2

// GELU in its erf form (PyTorch's nn.GELU() default), and its slope
// d/dx [x * Phi(x)] = Phi(x) + x * phi(x).
__device__ __forceinline__ float gelu_value(float v) {
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}
__device__ __forceinline__ float gelu_slope(float v) {
    float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
    return cdf + v * pdf;
}

// Eight consecutive values as f32, read and written in 16-byte accesses (the address aligned to
// 8 elements): the elementwise kernels below move bf16 two bytes per thread otherwise, and ran at
// half of what PyTorch's vectorised kernels reach.
__device__ __forceinline__ void load8(const float* p, float* v) {
    float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* v) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
    for (int k = 0; k < 4; k++) {
        float2 f = __bfloat1622float2(h[k]);
        v[2 * k] = f.x;
        v[2 * k + 1] = f.y;
    }
}
__device__ __forceinline__ void load8(const __half* p, float* v) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
    for (int k = 0; k < 4; k++) {
        float2 f = __half22float2(h[k]);
        v[2 * k] = f.x;
        v[2 * k + 1] = f.y;
    }
}
__device__ __forceinline__ void store8(float* p, const float* v) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(__nv_bfloat16* p, const float* v) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
    for (int k = 0; k < 4; k++) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4*>(p) = u;
}
__device__ __forceinline__ void store8(__half* p, const float* v) {
    uint4 u;
    __half2* h = reinterpret_cast<__half2*>(&u);
    for (int k = 0; k < 4; k++) h[k] = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4*>(p) = u;
}

// The elementwise kernels take `vec8` where every operand is aligned to 8 elements and a run of
// 8 never crosses a channel boundary the wrong way: channels first, planes of a multiple of 8
// (one channel per run); channels last (hw = 1), a multiple of 8 channels (channels ch..ch+7).
// Indices are 32-bit where the tensor allows (64-bit division and remainder cost more than
// the arithmetic).
// The width W (8 or 1) and index type I of the instance `call` names.
#define BY_SHAPE(total, vec8, call)                                   \
    if ((total) <= 0xffffffffull) {                                   \
        typedef unsigned I;                                           \
        if (vec8) {                                                   \
            const int W = 8;                                          \
            call;                                                     \
        } else {                                                      \
            const int W = 1;                                          \
            call;                                                     \
        }                                                             \
    } else {                                                          \
        typedef size_t I;                                             \
        if (vec8) {                                                   \
            const int W = 8;                                          \
            call;                                                     \
        } else {                                                      \
            const int W = 1;                                          \
            call;                                                     \
        }                                                             \
    }

// W values at `p` as f32, and back.
template <int W, typename T> __device__ __forceinline__ void load_w(const T* p, float* v) {
    if constexpr (W == 8) load8(p, v); else v[0] = load(*p);
}
template <int W, typename T> __device__ __forceinline__ void store_w(T* p, const float* v) {
    if constexpr (W == 8) store8(p, v); else store(p, v[0]);
}
