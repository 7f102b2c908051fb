// Kernels of src/ops/max_pool.rs: part of kiln's one PTX module (src/ops/kernels.cu).
#include "common.cuh"

// ---- max-pooling: k x k windows at stride s with `pad` rows and columns of padding that never
// win (nn.MaxPool2d(k, s, pad); fastnet's and SimpleCNN's k x k at stride k, ResNet's 3x3 at
// stride 2 with padding 1), channels first or last. Each window's first maximum in row-major
// order wins, a NaN always (PyTorch's rule). The backward pass gives each window's gradient to
// its winner: without overlap or padding (s == k, pad == 0) a thread per window writes its
// window; otherwise a thread per input pixel sums what the windows that hold it send it, in
// window order, so overlapping windows never race --------------------------------------------

// `vec8`: channels last, C a multiple of 8 and the data aligned to 8 elements: a thread takes a
// window's 8 channels in 16-byte loads and stores (one bf16 channel a thread ran at a third of
// the memory's bandwidth).
struct Pooling {
    int n, c, h, w, k, s, pad, oh, ow, channels_last, vec8;
};

// The offset of (image, channel, row, column) in a tensor of `c` channels, `h` x `w`; in 32
// bits (the host checks sizes), as 64-bit division costs several times more.
__device__ __forceinline__ unsigned pool_at(const Pooling& p, int img, int ch, int y, int x,
                                            int h, int w) {
    return p.channels_last ? (((unsigned)img * h + y) * w + x) * p.c + ch
                           : (((unsigned)img * p.c + ch) * h + y) * w + x;
}

// The taps of window (oy, ox) that lie inside the plane: rows [*y0, *y1), columns [*x0, *x1),
// as offsets from the window's corner (which padding may put outside the plane).
__device__ __forceinline__ void pool_taps(const Pooling& p, int oy, int ox, int* y0, int* y1,
                                          int* x0, int* x1) {
    int top = oy * p.s - p.pad, left = ox * p.s - p.pad;
    *y0 = max(0, -top);
    *y1 = min(p.k, p.h - top);
    *x0 = max(0, -left);
    *x1 = min(p.k, p.w - left);
}

// The window (oy, ox)'s winner as dy * k + dx, and its value; the first tap inside the plane
// where every value is -inf.
template <typename T>
__device__ __forceinline__ int pool_winner(const T* x, const Pooling& p, int img, int ch, int oy,
                                           int ox, float* best) {
    int y0, y1, x0, x1;
    pool_taps(p, oy, ox, &y0, &y1, &x0, &x1);
    int top = oy * p.s - p.pad, left = ox * p.s - p.pad;
    int at = y0 * p.k + x0;
    float most = -INFINITY;
    for (int dy = y0; dy < y1; ++dy) {
        for (int dx = x0; dx < x1; ++dx) {
            float v = load(x[pool_at(p, img, ch, top + dy, left + dx, p.h, p.w)]);
            if (v > most || isnan(v)) {
                most = v;
                at = dy * p.k + dx;
            }
        }
    }
    *best = most;
    return at;
}

// Item i (in memory order) as (image, channel, row, column) of a plane of `rows` x `cols`.
__device__ __forceinline__ void pool_coords(const Pooling& p, unsigned i, int rows, int cols,
                                            int* img, int* ch, int* y, int* x) {
    if (p.channels_last) {
        *ch = (int)(i % p.c);
        i /= p.c;
        *x = (int)(i % cols);
        i /= cols;
        *y = (int)(i % rows);
        *img = (int)(i / rows);
    } else {
        *x = (int)(i % cols);
        i /= cols;
        *y = (int)(i % rows);
        i /= rows;
        *ch = (int)(i % p.c);
        *img = (int)(i / p.c);
    }
}

// The windows that hold input row (or column) `y`: [*lo, *hi], empty where *lo > *hi.
__device__ __forceinline__ void pool_holders(const Pooling& p, int y, int out, int* lo, int* hi) {
    int first = y + p.pad - p.k + 1;
    *lo = first <= 0 ? 0 : (first + p.s - 1) / p.s;
    *hi = min(out - 1, (y + p.pad) / p.s);
}

template <typename T>
__device__ void max_pool_fwd(const T* x, Pooling p, T* y) {
    unsigned total = (unsigned)p.n * p.c * p.oh * p.ow;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int img, ch, oy, ox;
        pool_coords(p, i, p.oh, p.ow, &img, &ch, &oy, &ox);
        float best;
        pool_winner(x, p, img, ch, oy, ox, &best);
        store(y + i, best);
    }
}

// s == k, pad == 0: one thread per window: its gradient to the winner, 0 to the rest of the
// window; the last window of a row or column also zeroes the pixels past it that no window reads.
template <typename T>
__device__ void max_pool_bwd(const T* x, const T* grad, Pooling p, T* dx) {
    unsigned total = (unsigned)p.n * p.c * p.oh * p.ow;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int img, ch, oy, ox;
        pool_coords(p, i, p.oh, p.ow, &img, &ch, &oy, &ox);
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

// Any stride and padding: one thread per input pixel, the gradients of the windows it wins.
template <typename T>
__device__ void max_pool_bwd_gather(const T* x, const T* grad, Pooling p, T* dx) {
    unsigned total = (unsigned)p.n * p.c * p.h * p.w;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int img, ch, y, xx;
        pool_coords(p, i, p.h, p.w, &img, &ch, &y, &xx);
        int oy0, oy1, ox0, ox1;
        pool_holders(p, y, p.oh, &oy0, &oy1);
        pool_holders(p, xx, p.ow, &ox0, &ox1);
        float sum = 0.0f;
        for (int oy = oy0; oy <= oy1; ++oy) {
            for (int ox = ox0; ox <= ox1; ++ox) {
                float best;
                int at = pool_winner(x, p, img, ch, oy, ox, &best);
                int mine = (y - (oy * p.s - p.pad)) * p.k + (xx - (ox * p.s - p.pad));
                if (at == mine) sum += load(grad[pool_at(p, img, ch, oy, ox, p.oh, p.ow)]);
            }
        }
        store(dx + i, sum);
    }
}

// The winners (as dy * k + dx) and maxima of 8 channels from `ch` of window (oy, ox), channels
// last: pool_winner's rule for each channel.
template <typename T>
__device__ __forceinline__ void pool_winners8(const T* x, const Pooling& p, int img, int ch,
                                              int oy, int ox, float* best, int* at) {
    int y0, y1, x0, x1;
    pool_taps(p, oy, ox, &y0, &y1, &x0, &x1);
    int top = oy * p.s - p.pad, left = ox * p.s - p.pad;
#pragma unroll
    for (int k = 0; k < 8; k++) {
        best[k] = -INFINITY;
        at[k] = y0 * p.k + x0;
    }
    for (int dy = y0; dy < y1; ++dy) {
        for (int dx = x0; dx < x1; ++dx) {
            float v[8];
            load8(x + pool_at(p, img, ch, top + dy, left + dx, p.h, p.w), v);
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

// Run i (8 channels from `ch`) as (image, channel, row, column) of a plane of `rows` x `cols`,
// channels last.
__device__ __forceinline__ void pool_coords8(const Pooling& p, unsigned i, int rows, int cols,
                                             int* img, int* ch, int* y, int* x) {
    int groups = p.c / 8;
    *ch = (int)(i % groups) * 8;
    i /= groups;
    *x = (int)(i % cols);
    i /= cols;
    *y = (int)(i % rows);
    *img = (int)(i / rows);
}

template <typename T>
__device__ void max_pool_fwd8(const T* x, Pooling p, T* y) {
    unsigned total = (unsigned)p.n * p.oh * p.ow * (p.c / 8);
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int img, ch, oy, ox, at[8];
        float best[8];
        pool_coords8(p, i, p.oh, p.ow, &img, &ch, &oy, &ox);
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
        pool_coords8(p, i, p.oh, p.ow, &img, &ch, &oy, &ox);
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

// As max_pool_bwd_gather, 8 channels a thread.
template <typename T>
__device__ void max_pool_bwd_gather8(const T* x, const T* grad, Pooling p, T* dx) {
    unsigned total = (unsigned)p.n * p.h * p.w * (p.c / 8);
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int img, ch, y, xx, at[8];
        float best[8], g[8], sum[8];
        pool_coords8(p, i, p.h, p.w, &img, &ch, &y, &xx);
        int oy0, oy1, ox0, ox1;
        pool_holders(p, y, p.oh, &oy0, &oy1);
        pool_holders(p, xx, p.ow, &ox0, &ox1);
#pragma unroll
        for (int k = 0; k < 8; k++) sum[k] = 0.0f;
        for (int oy = oy0; oy <= oy1; ++oy) {
            for (int ox = ox0; ox <= ox1; ++ox) {
                pool_winners8(x, p, img, ch, oy, ox, best, at);
                int mine = (y - (oy * p.s - p.pad)) * p.k + (xx - (ox * p.s - p.pad));
                load8(grad + pool_at(p, img, ch, oy, ox, p.oh, p.ow), g);
#pragma unroll
                for (int k = 0; k < 8; k++)
                    if (at[k] == mine) sum[k] += g[k];
            }
        }
        store8(dx + (size_t)i * 8, sum);
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
        bool tiles = p.s == p.k && p.pad == 0;                                                 \
        if (p.vec8 && tiles)                                                                   \
            max_pool_bwd8(x, grad, p, dx);                                                     \
        else if (p.vec8)                                                                       \
            max_pool_bwd_gather8(x, grad, p, dx);                                              \
        else if (tiles)                                                                        \
            max_pool_bwd(x, grad, p, dx);                                                      \
        else                                                                                   \
            max_pool_bwd_gather(x, grad, p, dx);                                               \
    }

POOL_ENTRY_POINTS(float, f32)
POOL_ENTRY_POINTS(__nv_bfloat16, bf16)
POOL_ENTRY_POINTS(__half, f16)
