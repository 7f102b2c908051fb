// Kernels of src/ops/max_pool.rs: part of kiln's one PTX module (src/ops/kernels.cu).
#include "common.cuh"

// ---- max-pooling k x k with stride k (no padding; rows and columns past the last whole window
// dropped), channels first or last: each window's first maximum in row-major order wins, a NaN
// always (PyTorch's rule), and the backward pass gives the gradient to that winner alone ------

// `vec8`: channels last, C a multiple of 8 and the data aligned to 8 elements: a thread takes a
// window's 8 channels in 16-byte loads and stores (one bf16 channel a thread ran at a third of
// the memory's bandwidth).
struct Pooling {
    int n, c, h, w, k, oh, ow, channels_last, vec8;
};

// The offset of (image, channel, row, column) in a tensor of `c` channels, `h` x `w`; in 32
// bits (the host checks sizes), as 64-bit division costs several times more.
__device__ __forceinline__ unsigned pool_at(const Pooling& p, int img, int ch, int y, int x,
                                            int h, int w) {
    return p.channels_last ? (((unsigned)img * h + y) * w + x) * p.c + ch
                           : (((unsigned)img * p.c + ch) * h + y) * w + x;
}

// The window (oy, ox)'s winner as dy * k + dx, and its value.
template <typename T>
__device__ __forceinline__ int pool_winner(const T* x, const Pooling& p, int img, int ch, int oy,
                                           int ox, float* best) {
    int at = 0;
    float top = -INFINITY;
    for (int dy = 0; dy < p.k; ++dy) {
        for (int dx = 0; dx < p.k; ++dx) {
            float v = load(x[pool_at(p, img, ch, oy * p.k + dy, ox * p.k + dx, p.h, p.w)]);
            if (v > top || isnan(v)) {
                top = v;
                at = dy * p.k + dx;
            }
        }
    }
    *best = top;
    return at;
}

// Output i (in memory order) as (image, channel, row, column) of the pooled plane.
__device__ __forceinline__ void pool_coords(const Pooling& p, unsigned i, int* img, int* ch,
                                            int* oy, int* ox) {
    if (p.channels_last) {
        *ch = (int)(i % p.c);
        i /= p.c;
        *ox = (int)(i % p.ow);
        i /= p.ow;
        *oy = (int)(i % p.oh);
        *img = (int)(i / p.oh);
    } else {
        *ox = (int)(i % p.ow);
        i /= p.ow;
        *oy = (int)(i % p.oh);
        i /= p.oh;
        *ch = (int)(i % p.c);
        *img = (int)(i / p.c);
    }
}

template <typename T>
__device__ void max_pool_fwd(const T* x, Pooling p, T* y) {
    unsigned total = (unsigned)p.n * p.c * p.oh * p.ow;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int img, ch, oy, ox;
        pool_coords(p, i, &img, &ch, &oy, &ox);
        float best;
        pool_winner(x, p, img, ch, oy, ox, &best);
        store(y + i, best);
    }
}

// One thread per window: its gradient to the winner, 0 to the rest of the window; the last
// window of a row or column also zeroes the pixels past it that no window reads.
template <typename T>
__device__ void max_pool_bwd(const T* x, const T* grad, Pooling p, T* dx) {
    unsigned total = (unsigned)p.n * p.c * p.oh * p.ow;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int img, ch, oy, ox;
        pool_coords(p, i, &img, &ch, &oy, &ox);
        float best;
        int at = pool_winner(x, p, img, ch, oy, ox, &best);
        float g = load(grad[i]);
        int y_end = oy == p.oh - 1 ? p.h : (oy + 1) * p.k;
        int x_end = ox == p.ow - 1 ? p.w : (ox + 1) * p.k;
        for (int yy = oy * p.k; yy < y_end; ++yy) {
            for (int xx = ox * p.k; xx < x_end; ++xx) {
                bool won = yy - oy * p.k < p.k && xx - ox * p.k < p.k &&
                           (yy - oy * p.k) * p.k + (xx - ox * p.k) == at;
                store(dx + pool_at(p, img, ch, yy, xx, p.h, p.w), won ? g : 0.0f);
            }
        }
    }
}

// The winners (as dy * k + dx) and maxima of 8 channels from `ch` of window (oy, ox), channels
// last: pool_winner's rule for each channel.
template <typename T>
__device__ __forceinline__ void pool_winners8(const T* x, const Pooling& p, int img, int ch,
                                              int oy, int ox, float* best, int* at) {
#pragma unroll
    for (int k = 0; k < 8; k++) {
        best[k] = -INFINITY;
        at[k] = 0;
    }
    for (int dy = 0; dy < p.k; ++dy) {
        for (int dx = 0; dx < p.k; ++dx) {
            float v[8];
            load8(x + pool_at(p, img, ch, oy * p.k + dy, ox * p.k + dx, p.h, p.w), v);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                if (v[k] > best[k] || isnan(v[k])) {
                    best[k] = v[k];
                    at[k] = dy * p.k + dx;
                }
            }
        }
    }
}

// Output run i (8 channels from `ch`) as (image, channel, row, column), channels last.
__device__ __forceinline__ void pool_coords8(const Pooling& p, unsigned i, int* img, int* ch,
                                             int* oy, int* ox) {
    int groups = p.c / 8;
    *ch = (int)(i % groups) * 8;
    i /= groups;
    *ox = (int)(i % p.ow);
    i /= p.ow;
    *oy = (int)(i % p.oh);
    *img = (int)(i / p.oh);
}

template <typename T>
__device__ void max_pool_fwd8(const T* x, Pooling p, T* y) {
    unsigned total = (unsigned)p.n * p.oh * p.ow * (p.c / 8);
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int img, ch, oy, ox, at[8];
        float best[8];
        pool_coords8(p, i, &img, &ch, &oy, &ox);
        pool_winners8(x, p, img, ch, oy, ox, best, at);
        store8(y + (size_t)i * 8, best);
    }
}

// As max_pool_bwd, 8 channels a thread.
template <typename T>
__device__ void max_pool_bwd8(const T* x, const T* grad, Pooling p, T* dx) {
    unsigned total = (unsigned)p.n * p.oh * p.ow * (p.c / 8);
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int img, ch, oy, ox, at[8];
        float best[8], g[8];
        pool_coords8(p, i, &img, &ch, &oy, &ox);
        pool_winners8(x, p, img, ch, oy, ox, best, at);
        load8(grad + (size_t)i * 8, g);
        int y_end = oy == p.oh - 1 ? p.h : (oy + 1) * p.k;
        int x_end = ox == p.ow - 1 ? p.w : (ox + 1) * p.k;
        for (int yy = oy * p.k; yy < y_end; ++yy) {
            for (int xx = ox * p.k; xx < x_end; ++xx) {
                int dy = yy - oy * p.k, dx_ = xx - ox * p.k;
                bool inside = dy < p.k && dx_ < p.k;
                float out[8];
#pragma unroll
                for (int k = 0; k < 8; k++)
                    out[k] = inside && dy * p.k + dx_ == at[k] ? g[k] : 0.0f;
                store8(dx + pool_at(p, img, ch, yy, xx, p.h, p.w), out);
            }
        }
    }
}

#define POOL_ENTRY_POINTS(T, SUFFIX)                                                           \
    extern "C" __global__ void max_pool_fwd_##SUFFIX(const T* x, Pooling p, T* y) {           \
        if (p.vec8)                                                                            \
            max_pool_fwd8(x, p, y);                                                            \
        else                                                                                   \
            max_pool_fwd(x, p, y);                                                             \
    }                                                                                          \
    extern "C" __global__ void max_pool_bwd_##SUFFIX(const T* x, const T* grad, Pooling p,    \
                                                     T* dx) {                                  \
        if (p.vec8)                                                                            \
            max_pool_bwd8(x, grad, p, dx);                                                     \
        else                                                                                   \
            max_pool_bwd(x, grad, p, dx);                                                      \
    }

POOL_ENTRY_POINTS(float, f32)
POOL_ENTRY_POINTS(__nv_bfloat16, bf16)
POOL_ENTRY_POINTS(__half, f16)
