// kiln's CUDA kernels. f32 data (and bf16 where the ResNets' mixed precision needs it),
// contiguous tensors, row-major (NCHW) layouts.
//
// build.rs compiles this file to PTX with nvcc when the `cuda` feature is on; src/ops/cuda.rs
// loads it through candle's CudaDevice and launches the kernels from candle custom ops. Each
// kernel mirrors a CPU implementation in src/ops or src/optim, which the tests compare against.
#include <stdint.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define NO_WINNER 0xffffffffu
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

// ---- data: u8 images gathered by index, scaled to [0,1] and normalised per channel ----------

struct Normalisation {
    float mean[4];
    float std[4];
};

// The random transforms of one batch (ops/gather.rs: `Augmentation`); on = 0: none.
// alternate: 0 a coin per image and batch; 1, 2 a coin per image from flip_key (as
// `AlternateFlip`), turned over when 2.
struct Augment {
    uint64_t key, flip_key;
    uint32_t on, width, crop_padding, reflect, flip, cutout, resized, alternate;
    // Image i of the batch draws as position first + i * stride (`Positions` in ops/gather.rs).
    uint32_t first, stride;
};

// SplitMix64's finaliser, as ops/gather.rs `mix`.
__device__ uint64_t mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Draw k of image i, uniform in [0, n): as `Augmentation::uniform`.
__device__ uint32_t uniform(const Augment& a, uint64_t i, uint64_t k, uint32_t n) {
    i = a.first + i * a.stride;
    uint64_t h = mix(a.key ^ mix((i << 3) | k));
    return (uint32_t)(((h >> 32) * (uint64_t)n) >> 32);
}

// The source index for padded position p along a side of `size`, or -1 for zero padding.
__device__ int source(const Augment& a, int p, int size) {
    int pad = (int)a.crop_padding;
    if (p >= pad && p - pad < size) return p - pad;
    if (!a.reflect) return -1;
    return p < pad ? pad - p : 2 * (size - 1) - (p - pad);
}

// Output position p of `size` samples a crop of `extent` pixels from *first, with the next
// pixel's weight *weight in 1/256 steps: ops/gather.rs `resize_tap`.
__device__ void resize_tap(uint32_t p, uint32_t size, uint32_t extent, uint32_t* first,
                           uint32_t* weight) {
    uint64_t num = (uint64_t)(2 * p + 1) * extent * 256, off = (uint64_t)size * 256;
    uint64_t at = (num > off ? num - off : 0) / (2 * (uint64_t)size);
    *first = (uint32_t)(at / 256);
    *weight = (uint32_t)(at % 256);
    if (*first + 1 >= extent) {
        *first = extent - 1;
        *weight = 0;
    }
}

// out[i, r] = (images[order[i], r'] / 255 - mean[c]) / std[c], c = r / plane, where r' is r
// itself or, augmented, the cropped, flipped pixel (or padding, byte 0), and cutout zeroes a
// square after normalisation: the CPU's formula, operation for operation (division is
// correctly rounded here too), so batches are bit-identical. With a.resized, boxes holds each
// image's resized crop (top, left, height, width), drawn on the host, and the pixel is their
// bilinear blend in integers, as on the CPU.
extern "C" __global__ void gather_normalise(
    const uint8_t* images, const uint32_t* order, uint32_t n, uint32_t image_bytes,
    uint32_t plane, Normalisation norm, Augment a, const uint32_t* boxes, float* out) {
    size_t total = (size_t)n * image_bytes;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t i = idx / image_bytes, r = idx % image_bytes;
        uint32_t c = r / plane;
        const uint8_t* image = images + (size_t)order[i] * image_bytes;
        if (!a.on) {
            out[idx] = ((float)image[r] / 255.0f - norm.mean[c]) / norm.std[c];
            continue;
        }
        int w = (int)a.width, h = (int)(plane / a.width);
        int y = (int)((r % plane) / a.width), x = (int)((r % plane) % a.width);
        uint32_t side = 2 * a.crop_padding + 1;
        int dy = (int)uniform(a, i, 0, side), dx = (int)uniform(a, i, 1, side);
        bool flip = a.alternate ? ((mix(a.flip_key ^ (uint64_t)order[i]) >> 63) == 1) != (a.alternate == 2)
                                : (a.flip && uniform(a, i, 2, 2) == 1);
        if (a.cutout) {
            int half = (int)(a.cutout / 2);
            int cy = (int)uniform(a, i, 3, (uint32_t)h), cx = (int)uniform(a, i, 4, (uint32_t)w);
            int y0 = cy > half ? cy - half : 0, y1 = cy + half < h ? cy + half : h;
            int x0 = cx > half ? cx - half : 0, x1 = cx + half < w ? cx + half : w;
            if (y >= y0 && y < y1 && x >= x0 && x < x1) {
                out[idx] = 0.0f;
                continue;
            }
        }
        if (a.resized) {
            const uint32_t* box = boxes + 4 * i;
            uint32_t ry, fy, rx, fx;
            resize_tap((uint32_t)y, (uint32_t)h, box[2], &ry, &fy);
            resize_tap((uint32_t)(flip ? w - 1 - x : x), (uint32_t)w, box[3], &rx, &fx);
            const uint8_t* near = image + c * plane + (box[0] + ry) * w + box[1];
            const uint8_t* far = near + (fy > 0 ? w : 0);
            uint32_t x1 = rx + (fx > 0 ? 1 : 0);
            uint32_t top = near[rx] * (256 - fx) + near[x1] * fx;
            uint32_t bottom = far[rx] * (256 - fx) + far[x1] * fx;
            float value = (float)(top * (256 - fy) + bottom * fy);
            out[idx] = (value / 65536.0f / 255.0f - norm.mean[c]) / norm.std[c];
            continue;
        }
        int sy = source(a, y + dy, h);
        int sx = source(a, (flip ? w - 1 - x : x) + dx, w);
        float byte = (sy < 0 || sx < 0) ? 0.0f : (float)image[c * plane + sy * w + sx];
        out[idx] = (byte / 255.0f - norm.mean[c]) / norm.std[c];
    }
}

// ---- conv2d + bias -> ReLU -> max-pool (kernel = stride = k) ---------------------------------

struct Block {
    int n, c, h, w;      // input
    int co, kh, kw;      // weight
    int stride, pad;     // convolution
    int oh, ow;          // convolution output
    int k, ph, pw;       // pooling window and pooled output
};

__device__ float conv_at(const float* image, const float* kernel, float bias, const Block& b,
                         int oy, int ox) {
    float sum = bias;
    for (int ci = 0; ci < b.c; ++ci) {
        for (int ky = 0; ky < b.kh; ++ky) {
            int iy = oy * b.stride - b.pad + ky;
            if (iy < 0 || iy >= b.h) continue;
            const float* row = image + ((size_t)ci * b.h + iy) * b.w;
            const float* taps = kernel + (ci * b.kh + ky) * b.kw;
            for (int kx = 0; kx < b.kw; ++kx) {
                int ix = ox * b.stride - b.pad + kx;
                if (ix >= 0 && ix < b.w) sum += row[ix] * taps[kx];
            }
        }
    }
    return sum;
}

// One thread per pooled output: the window's conv outputs, their first maximum, ReLU. Keeps the
// winner's index in the image's conv output [CO x OH*OW] for the backward pass (or NO_WINNER
// where the maximum was not positive and ReLU passes no gradient).
extern "C" __global__ void conv_relu_pool_fwd(
    const float* x, const float* weight, const float* bias, Block b, float* out,
    uint32_t* winners) {
    size_t total = (size_t)b.n * b.co * b.ph * b.pw;
    for (size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        int px = idx % b.pw;
        size_t t = idx / b.pw;
        int py = t % b.ph;
        t /= b.ph;
        int co = t % b.co;
        size_t i = t / b.co;
        const float* image = x + i * b.c * b.h * b.w;
        const float* kernel = weight + (size_t)co * b.c * b.kh * b.kw;
        float best = -INFINITY;
        int at = 0;
        for (int dy = 0; dy < b.k; ++dy) {
            for (int dx = 0; dx < b.k; ++dx) {
                int oy = py * b.k + dy, ox = px * b.k + dx;
                float v = conv_at(image, kernel, bias[co], b, oy, ox);
                if (v > best) {
                    best = v;
                    at = oy * b.ow + ox;
                }
            }
        }
        bool passes = best > 0.0f;
        out[idx] = passes ? best : 0.0f;
        winners[idx] = passes ? (uint32_t)(co * b.oh * b.ow + at) : NO_WINNER;
    }
}

#define SLICE 32

// dL/dW and dL/db, per chunk of images: block (co, chunk) sums, over the chunk's pooled outputs
// that had a winner, grad * the input under each weight tap (and grad alone for the bias).
// partial[chunk][co][patch + 1]: the taps, then the bias. `sum_chunks` adds the chunks in order,
// so the result does not depend on scheduling.
extern "C" __global__ void conv_relu_pool_wgrad(
    const float* x, const float* grad, const uint32_t* winners, Block b, int images_per_chunk,
    float* partial) {
    __shared__ float scratch[BLOCK];
    int co = blockIdx.x, chunk = blockIdx.y;
    int taps = b.kh * b.kw, patch = b.c * taps, pooled = b.ph * b.pw;
    int first = chunk * images_per_chunk;
    int count = min(b.n - first, images_per_chunk);
    size_t items = (size_t)max(count, 0) * pooled;
    for (int base = 0; base <= patch; base += SLICE) {
        float acc[SLICE];
#pragma unroll
        for (int j = 0; j < SLICE; ++j) acc[j] = 0.0f;
        for (size_t t = threadIdx.x; t < items; t += BLOCK) {
            size_t i = first + t / pooled;
            size_t at = (i * b.co + co) * pooled + t % pooled;
            uint32_t winner = winners[at];
            if (winner == NO_WINNER) continue;
            float g = grad[at];
            int pos = winner - co * b.oh * b.ow;
            int oy = pos / b.ow, ox = pos % b.ow;
            const float* image = x + i * b.c * b.h * b.w;
#pragma unroll
            for (int j = 0; j < SLICE; ++j) {
                int p = base + j;
                if (p < patch) {
                    int ci = p / taps, ky = (p % taps) / b.kw, kx = p % b.kw;
                    int iy = oy * b.stride - b.pad + ky, ix = ox * b.stride - b.pad + kx;
                    if (iy >= 0 && iy < b.h && ix >= 0 && ix < b.w)
                        acc[j] += g * image[((size_t)ci * b.h + iy) * b.w + ix];
                } else if (p == patch) {
                    acc[j] += g;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < SLICE; ++j) {
            int p = base + j;
            if (p > patch) break;  // uniform across the block: no thread skips the barrier
            float total = block_sum(acc[j], scratch);
            if (threadIdx.x == 0)
                partial[((size_t)chunk * b.co + co) * (patch + 1) + p] = total;
        }
    }
}

// Adds the chunks' partial sums [chunks][co][patch + 1] in chunk order, into the weight gradient
// [co * patch] followed by the bias gradient [co].
extern "C" __global__ void sum_chunks(const float* partial, int chunks, int co, int patch,
                                      float* out) {
    int len = co * (patch + 1);
    for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < len;
         idx += gridDim.x * blockDim.x) {
        float sum = 0.0f;
        for (int chunk = 0; chunk < chunks; ++chunk) sum += partial[(size_t)chunk * len + idx];
        int c = idx / (patch + 1), p = idx % (patch + 1);
        out[p == patch ? co * patch + c : c * patch + p] = sum;
    }
}

// ---- softmax cross-entropy -------------------------------------------------------------------

// A row's maximum (x) and the sum of exp(v - maximum) (y); as cross_entropy.rs says, the
// maximum is never added back to a logarithm, which would round away a confident row's gradient.
__device__ float2 row_max_sum_exp(const float* row, int k) {
    float top = -INFINITY;
    for (int j = 0; j < k; ++j) top = fmaxf(top, row[j]);
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) sum += expf(row[j] - top);
    return make_float2(top, sum);
}

// The mean over rows of (1 - e) (logsumexp(row) - row[label]) + e (logsumexp(row) - mean(row)),
// e the label smoothing; one block. A label out of range gives NaN.
extern "C" __global__ void cross_entropy_fwd(const float* logits, const uint32_t* labels, int n,
                                             int k, float smoothing, float* loss) {
    __shared__ float scratch[BLOCK];
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += BLOCK) {
        const float* row = logits + (size_t)i * k;
        uint32_t label = labels[i];
        float2 ms = row_max_sum_exp(row, k);
        float nll = label < (uint32_t)k ? (ms.x - row[label]) + logf(ms.y) : NAN;
        if (smoothing != 0.0f) {
            float gap = 0.0f;
            for (int j = 0; j < k; ++j) gap += ms.x - row[j];
            nll = (1.0f - smoothing) * nll + smoothing * (gap / k + logf(ms.y));
        }
        sum += nll;
    }
    float total = block_sum(sum, scratch);
    if (threadIdx.x == 0) loss[0] = total / n;
}

// dL/dlogits = (softmax(row) - target) * dL/dloss / n, target = (1 - e) onehot(label) + e / k;
// dL/dloss stays on the device.
extern "C" __global__ void cross_entropy_bwd(const float* logits, const uint32_t* labels,
                                             const float* grad_loss, int n, int k,
                                             float smoothing, float* grad) {
    float hot = 1.0f - smoothing, cold = smoothing / k;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float* row = logits + (size_t)i * k;
        float2 ms = row_max_sum_exp(row, k);
        float scale = grad_loss[0] / n;
        for (int j = 0; j < k; ++j) {
            float p = expf(row[j] - ms.x) / ms.y;
            float target = j == (int)labels[i] ? hot + cold : cold;
            grad[(size_t)i * k + j] = (p - target) * scale;
        }
    }
}

// A batch's figures for the epoch's running sums: [mean loss * n, rows whose first maximum is
// at the label]; one block.
extern "C" __global__ void batch_tally(const float* logits, const uint32_t* labels,
                                       const float* loss, int n, int k, float* out) {
    __shared__ float scratch[BLOCK];
    float correct = 0.0f;
    for (int i = threadIdx.x; i < n; i += BLOCK) {
        const float* row = logits + (size_t)i * k;
        int best = 0;
        for (int j = 1; j < k; ++j)
            if (row[j] > row[best]) best = j;
        correct += best == (int)labels[i] ? 1.0f : 0.0f;
    }
    float total = block_sum(correct, scratch);
    if (threadIdx.x == 0) {
        out[0] = loss[0] * n;
        out[1] = total;
    }
}

// ---- optimizers: every parameter of a group in one launch (blockIdx.y picks the tensor) -------

#define GROUP 8

struct AdamGroup {
    float* param[GROUP];
    const float* grad[GROUP];
    float* m[GROUP];
    float* v[GROUP];
    uint32_t len[GROUP];
};

struct AdamStep {
    // Each figure computed in f64 on the host, as candle's scalar ops on the CPU have it.
    float beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
    float step_size;                  // lr / (1 - beta1^t)
    float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t)
    float decay;                      // AdamW: 1 - lr * weight_decay; Adam: 1
};

// torch.optim.Adam's update, operation for operation as src/optim/adam.rs computes it on the
// CPU (the _rn intrinsics keep nvcc from fusing multiply-adds), so both give the same bits.
extern "C" __global__ void adam_step(AdamGroup group, AdamStep s) {
    int t = blockIdx.y;
    float *param = group.param[t], *m = group.m[t], *v = group.v[t];
    const float* grad = group.grad[t];
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < group.len[t];
         i += gridDim.x * blockDim.x) {
        float p = param[i];
        float g = grad[i];
        if (s.weight_decay != 0.0f) g = __fadd_rn(g, __fmul_rn(p, s.weight_decay));
        if (s.decay != 1.0f) p = __fmul_rn(p, s.decay);
        float mi = __fadd_rn(__fmul_rn(m[i], s.beta1), __fmul_rn(g, s.one_minus_beta1));
        float vi = __fadd_rn(__fmul_rn(v[i], s.beta2), __fmul_rn(__fmul_rn(g, g), s.one_minus_beta2));
        m[i] = mi;
        v[i] = vi;
        float denom = __fadd_rn(__fmul_rn(sqrtf(vi), s.inv_bias_correction2_sqrt), s.eps);
        param[i] = __fsub_rn(p, __fmul_rn(__fdiv_rn(mi, denom), s.step_size));
    }
}

struct SgdGroup {
    float* param[GROUP];
    const float* grad[GROUP];
    float* velocity[GROUP];  // PyTorch's momentum_buffer; unused without momentum
    uint32_t len[GROUP];
    uint32_t first[GROUP];   // the buffer starts as the first step's direction
};

struct SgdStep {
    float lr, momentum, weight_decay;
    uint32_t nesterov;
};

// torch.optim.SGD's update (no dampening; Nesterov's momentum optional), as src/optim/sgd.rs
// computes it on the CPU.
extern "C" __global__ void sgd_step(SgdGroup group, SgdStep s) {
    int t = blockIdx.y;
    float *param = group.param[t], *velocity = group.velocity[t];
    const float* grad = group.grad[t];
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < group.len[t];
         i += gridDim.x * blockDim.x) {
        float p = param[i];
        float d = grad[i];
        if (s.weight_decay != 0.0f) d = __fadd_rn(d, __fmul_rn(p, s.weight_decay));
        if (s.momentum != 0.0f) {
            float buf = group.first[t] ? d : __fadd_rn(__fmul_rn(velocity[i], s.momentum), d);
            velocity[i] = buf;
            d = s.nesterov ? __fadd_rn(d, __fmul_rn(buf, s.momentum)) : buf;
        }
        param[i] = __fsub_rn(p, __fmul_rn(d, s.lr));
    }
}

// ---- batch norm (training mode), over [N, C, HW]: one block per channel for the sums ----------

// As block_sum, in double: a channel's sums run over up to millions of values.
__device__ double block_sum_d(double value, double* scratch) {
    scratch[threadIdx.x] = value;
    __syncthreads();
    for (int half = BLOCK / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) scratch[threadIdx.x] += scratch[threadIdx.x + half];
        __syncthreads();
    }
    double total = scratch[0];
    __syncthreads();
    return total;
}

// ---- BatchNorm, add-ReLU, the ReLU gate: f32, bf16 or f16 data (`_f32` / `_bf16` / `_f16`),
// f32 parameters and statistics, f32 arithmetic (as PyTorch's bf16 autocast runs them) --------

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

// BatchNorm's per-channel sums are split over `splits` blocks per channel (blockIdx.y), each
// over a run of whole planes, so that every SM streams (one block per channel left most of the
// GPU idle on ResNet's 64-channel stages); partials [2, splits, C] in double (channels
// innermost, so that the finishing kernel's reads coalesce), added in a fixed order by a
// finishing kernel, so the result is the same every run.

// The planes split `split` of `splits` covers, of `n`.
__device__ int2 bn_planes(int n, int split, int splits) {
    return make_int2((int)((long long)n * split / splits), (int)((long long)n * (split + 1) / splits));
}

// partials: sum(x) and sum(x * x) of each channel's split.
template <typename T>
__device__ void bn_stats_partial(const T* x, int n, int c, int hw, double* partials) {
    __shared__ double scratch[BLOCK];
    int ch = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    int2 planes = bn_planes(n, split, splits);
    unsigned count = (unsigned)(planes.y - planes.x) * (unsigned)hw;
    double sum = 0.0, squares = 0.0;
    for (unsigned k = threadIdx.x; k < count; k += BLOCK) {
        unsigned plane = planes.x + k / hw, pixel = k % hw;
        double v = load(x[((size_t)plane * c + ch) * hw + pixel]);
        sum += v;
        squares += v * v;
    }
    sum = block_sum_d(sum, scratch);
    squares = block_sum_d(squares, scratch);
    if (threadIdx.x == 0) {
        partials[(size_t)split * c + ch] = sum;
        partials[((size_t)splits + split) * c + ch] = squares;
    }
}

// Channel groups: the scalar channels-last partial sums give a block NHWC_CHANNELS channels (a
// warp across them) and NHWC_ROWS lanes of rows each; the finishing kernels take FINISH_THREADS
// threads, NHWC_CHANNELS channels and FINISH_LANES lanes of splits.
#define NHWC_CHANNELS 32
#define NHWC_ROWS (BLOCK / NHWC_CHANNELS)
#define FINISH_THREADS 1024
#define FINISH_LANES (FINISH_THREADS / NHWC_CHANNELS)

// Adds each channel's LANES lane values `a` and `b` in lane order; true (with the totals) in
// lane 0 of a channel that exists. Every thread of the block (NHWC_CHANNELS * LANES) must call it.
template <int LANES>
__device__ bool bn_lane_totals(double a, double b, int c, double* ta, double* tb) {
    __shared__ double as[NHWC_CHANNELS * LANES], bs[NHWC_CHANNELS * LANES];
    int lane = threadIdx.x % NHWC_CHANNELS, row = threadIdx.x / NHWC_CHANNELS;
    int ch = blockIdx.x * NHWC_CHANNELS + lane;
    as[threadIdx.x] = a;
    bs[threadIdx.x] = b;
    __syncthreads();
    if (row != 0 || ch >= c) return false;
    double sa = 0.0, sb = 0.0;
    for (int r = 0; r < LANES; r++) {
        sa += as[r * NHWC_CHANNELS + lane];
        sb += bs[r * NHWC_CHANNELS + lane];
    }
    *ta = sa;
    *tb = sb;
    return true;
}

// Both sums of the block's channels over the splits of `partials` [2, splits, C]: lane r adds
// splits r, r + FINISH_LANES, ... in order, then the lanes are added in order. One thread per
// channel summing every split serially took 85 us a layer on an H100 (1,024 splits).
__device__ bool bn_split_totals(const double* partials, int c, int splits, double* ta,
                                double* tb) {
    int ch = blockIdx.x * NHWC_CHANNELS + threadIdx.x % NHWC_CHANNELS;
    double a = 0.0, b = 0.0;
    if (ch < c) {
        for (int s = threadIdx.x / NHWC_CHANNELS; s < splits; s += FINISH_LANES) {
            a += partials[(size_t)s * c + ch];
            b += partials[((size_t)splits + s) * c + ch];
        }
    }
    return bn_lane_totals<FINISH_LANES>(a, b, c, ta, tb);
}

// The channel's scale and shift: y = x * scale + shift (ops/batch_norm.rs `affine`).
__device__ float2 bn_affine(float mean, float inv_std, float gamma, float beta) {
    float scale = __fmul_rn(inv_std, gamma);
    return make_float2(scale, __fsub_rn(beta, __fmul_rn(mean, scale)));
}

// stats [5, C]: each channel's mean, biased variance, 1 / sqrt(variance + eps), and the scale
// and shift the output and both backward kernels apply, from the partial sums (double, as the
// CPU kernel and PyTorch's CPU kernel accumulate) and the layer's gamma and beta.
extern "C" __global__ void bn_stats_finish(const double* partials, const float* gamma,
                                           const float* beta, int c, int splits, double count,
                                           float eps, float* stats) {
    int ch = blockIdx.x * NHWC_CHANNELS + threadIdx.x % NHWC_CHANNELS;
    double sum, squares;
    if (!bn_split_totals(partials, c, splits, &sum, &squares)) return;
    double mean = sum / count;
    double var = fmax(squares / count - mean * mean, 0.0);
    float inv_std = (float)(1.0 / sqrt(var + (double)eps));
    float2 a = bn_affine((float)mean, inv_std, gamma[ch], beta[ch]);
    stats[ch] = (float)mean;
    stats[c + ch] = (float)var;
    stats[2 * c + ch] = inv_std;
    stats[3 * c + ch] = a.x;
    stats[4 * c + ch] = a.y;
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

// The channel of element i of [N, C, hw] (hw = 1: channels last, no division).
template <typename I> __device__ __forceinline__ int bn_channel(I i, int c, int hw) {
    return hw == 1 ? (int)(i % (I)c) : (int)((i / (I)hw) % (I)c);
}

// A per-channel figure (`row`, [C]) for the W values from element of channel `ch`: channels last
// (hw = 1) W channels' own, in 16-byte loads; channels first one channel's for all W.
template <int W> __device__ __forceinline__ void bn_figure(const float* row, int ch, int hw,
                                                           float* v) {
    if constexpr (W == 8) {
        if (hw == 1) {
            load8(row + ch, v);
            return;
        }
    }
    float f = row[ch];
#pragma unroll
    for (int k = 0; k < W; k++) v[k] = f;
}

// Whether every run of W values a thread takes (first, first + step, ...) covers the same
// channels: channels last with a stride of whole rows. The kernels below then load a thread's
// per-channel figures once (launched on a capped grid, a thread takes several runs).
template <typename I, int W> __device__ __forceinline__ bool bn_fixed_channels(int c, int hw) {
    I step = (I)gridDim.x * blockDim.x;
    return hw == 1 && (step * W) % (I)c == 0;
}

// y = act(x * scale + shift), the scale and shift per channel ([C] each: rows 3 and 4 of
// bn_stats_finish's [5, C] in training, from the running statistics in evaluation).
template <typename T, int ACT, typename I, int W>
__device__ void bn_apply_run(const T* x, const float* scale_of, const float* shift_of, int c,
                             int hw, I total, T* y) {
    I step = (I)gridDim.x * blockDim.x, first = (I)blockIdx.x * blockDim.x + threadIdx.x;
    bool fixed = bn_fixed_channels<I, W>(c, hw);
    float scale[W], shift[W];
    for (I g = first; g < total / W; g += step) {
        I i = g * W;
        if (!fixed || g == first) {
            int ch = bn_channel(i, c, hw);
            bn_figure<W>(scale_of, ch, hw, scale);
            bn_figure<W>(shift_of, ch, hw, shift);
        }
        float v[W];
        load_w<W>(x + i, v);
#pragma unroll
        for (int k = 0; k < W; k++) {
            float o = __fadd_rn(__fmul_rn(v[k], scale[k]), shift[k]);
            // GELU reads the normalised value rounded to T, as it would from memory unfused (and
            // in PyTorch): fusing saves the traffic and changes no bit.
            v[k] = ACT == ACT_RELU   ? fmaxf(o, 0.0f)
                   : ACT == ACT_GELU ? gelu_value(rounded<T>(o))
                                     : o;
        }
        store_w<W>(y + i, v);
    }
}

template <typename T, int ACT>
__device__ void bn_apply(const T* x, const float* scale, const float* shift, int c, int hw,
                         size_t total, int vec8, T* y) {
    BY_SHAPE(total, vec8, (bn_apply_run<T, ACT, I, W>(x, scale, shift, c, hw, (I)total, y)))
}

// A residual block's end in one pass: y = relu(x * scale + shift + r), the shortcut r itself
// normalised by (r_scale, r_shift) where `normalised` is set (a downsampling shortcut's
// BatchNorm). Each normalised value is rounded to T first, as bn_apply stores it for
// add_relu_fwd to read: the same bits as those kernels apart, without writing the normalised
// tensors and reading them back.
template <typename T, typename I, int W>
__device__ void bn_add_relu_run(const T* x, const float* scale_of, const float* shift_of,
                                const T* r, int normalised, const float* r_scale_of,
                                const float* r_shift_of, int c, int hw, I total, T* y) {
    I step = (I)gridDim.x * blockDim.x, first = (I)blockIdx.x * blockDim.x + threadIdx.x;
    bool fixed = bn_fixed_channels<I, W>(c, hw);
    float scale[W], shift[W], r_scale[W], r_shift[W];
    for (I g = first; g < total / W; g += step) {
        I i = g * W;
        if (!fixed || g == first) {
            int ch = bn_channel(i, c, hw);
            bn_figure<W>(scale_of, ch, hw, scale);
            bn_figure<W>(shift_of, ch, hw, shift);
            if (normalised) {
                bn_figure<W>(r_scale_of, ch, hw, r_scale);
                bn_figure<W>(r_shift_of, ch, hw, r_shift);
            }
        }
        float v[W], s[W];
        load_w<W>(x + i, v);
        load_w<W>(r + i, s);
#pragma unroll
        for (int k = 0; k < W; k++) {
            float a = rounded<T>(__fadd_rn(__fmul_rn(v[k], scale[k]), shift[k]));
            float b = normalised ? rounded<T>(__fadd_rn(__fmul_rn(s[k], r_scale[k]), r_shift[k]))
                                 : s[k];
            v[k] = fmaxf(__fadd_rn(a, b), 0.0f);
        }
        store_w<W>(y + i, v);
    }
}

template <typename T>
__device__ void bn_add_relu(const T* x, const float* scale, const float* shift, const T* r,
                            int normalised, const float* r_scale, const float* r_shift, int c,
                            int hw, size_t total, int vec8, T* y) {
    BY_SHAPE(total, vec8,
             (bn_add_relu_run<T, I, W>(x, scale, shift, r, normalised, r_scale, r_shift, c, hw,
                                       (I)total, y)))
}

// The upstream gradient through the fused activation ACT, at y = x * scale + shift as bn_apply
// computed it: ReLU passed where y > 0; GELU scales by its slope at y rounded to T, and the
// product is rounded to T, as the unfused gelu_bwd stores it (see bn_apply_run).
template <typename T, int ACT>
__device__ __forceinline__ float bn_gated(float g, float v, float scale, float shift) {
    if (ACT == ACT_IDENTITY) return g;
    float y = __fadd_rn(__fmul_rn(v, scale), shift);
    if (ACT == ACT_RELU) return y > 0.0f ? g : 0.0f;
    return rounded<T>(g * gelu_slope(rounded<T>(y)));
}

// partials: sum(g * (x - mean)) and sum(g) of each channel's split, g gated; stats [5, C] as
// bn_stats_finish writes them.
template <typename T, int ACT>
__device__ void bn_grad_partial(const T* x, const T* grad, const float* stats, int n, int c,
                                int hw, double* partials) {
    __shared__ double scratch[BLOCK];
    int ch = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    float mean = stats[ch], scale = stats[3 * c + ch], shift = stats[4 * c + ch];
    int2 planes = bn_planes(n, split, splits);
    unsigned count = (unsigned)(planes.y - planes.x) * (unsigned)hw;
    double dot = 0.0, total = 0.0;
    for (unsigned k = threadIdx.x; k < count; k += BLOCK) {
        unsigned plane = planes.x + k / hw, pixel = k % hw;
        size_t at = ((size_t)plane * c + ch) * hw + pixel;
        float v = load(x[at]);
        double g = bn_gated<T, ACT>(load(grad[at]), v, scale, shift);
        total += g;
        dot += g * ((double)v - (double)mean);
    }
    dot = block_sum_d(dot, scratch);
    total = block_sum_d(total, scratch);
    if (threadIdx.x == 0) {
        partials[(size_t)split * c + ch] = dot;
        partials[((size_t)splits + split) * c + ch] = total;
    }
}

// figures [8, C]: dgamma = sum(g * x_hat); dbeta = sum(g); then what bn_input_grad reads: mean;
// inv_std; scale; shift; dbeta / M; dgamma / M (M = `count`, the values per channel).
extern "C" __global__ void bn_grad_finish(const double* partials, const float* stats, int c,
                                          int splits, float count, float* figures) {
    int ch = blockIdx.x * NHWC_CHANNELS + threadIdx.x % NHWC_CHANNELS;
    double dot, total;
    if (!bn_split_totals(partials, c, splits, &dot, &total)) return;
    float dgamma = (float)(dot * stats[2 * c + ch]), dbeta = (float)total;
    figures[ch] = dgamma;
    figures[c + ch] = dbeta;
    figures[2 * c + ch] = stats[ch];
    figures[3 * c + ch] = stats[2 * c + ch];
    figures[4 * c + ch] = stats[3 * c + ch];
    figures[5 * c + ch] = stats[4 * c + ch];
    figures[6 * c + ch] = dbeta / count;
    figures[7 * c + ch] = dgamma / count;
}

// Channels last, [rows, C] (rows = N*H*W, the launch's `n`; `hw` is 1): block (group, split)
// sums NHWC_CHANNELS channels over a run of rows, a warp across the channels of NHWC_ROWS rows
// at a time, so that each warp reads a run of a row; then the rows' lanes are added in order.
// Partials as above. For any C; bn_partial_nhwc8 below is the fast path.

// Writes the block's partials from its lanes' sums.
__device__ void bn_nhwc_partials(double a, double b, int c, double* partials) {
    int ch = blockIdx.x * NHWC_CHANNELS + threadIdx.x % NHWC_CHANNELS;
    int split = blockIdx.y, splits = gridDim.y;
    double sa, sb;
    if (!bn_lane_totals<NHWC_ROWS>(a, b, c, &sa, &sb)) return;
    partials[(size_t)split * c + ch] = sa;
    partials[((size_t)splits + split) * c + ch] = sb;
}

template <typename T>
__device__ void bn_stats_partial_nhwc(const T* x, int rows, int c, double* partials) {
    int ch = blockIdx.x * NHWC_CHANNELS + threadIdx.x % NHWC_CHANNELS;
    int2 span = bn_planes(rows, blockIdx.y, gridDim.y);
    double sum = 0.0, squares = 0.0;
    if (ch < c) {
        for (int r = span.x + threadIdx.x / NHWC_CHANNELS; r < span.y; r += NHWC_ROWS) {
            double v = load(x[(size_t)r * c + ch]);
            sum += v;
            squares += v * v;
        }
    }
    bn_nhwc_partials(sum, squares, c, partials);
}

template <typename T, int ACT>
__device__ void bn_grad_partial_nhwc(const T* x, const T* grad, const float* stats, int rows,
                                     int c, double* partials) {
    int ch = blockIdx.x * NHWC_CHANNELS + threadIdx.x % NHWC_CHANNELS;
    int2 span = bn_planes(rows, blockIdx.y, gridDim.y);
    double dot = 0.0, total = 0.0;
    if (ch < c) {
        float mean = stats[ch], scale = stats[3 * c + ch], shift = stats[4 * c + ch];
        for (int r = span.x + threadIdx.x / NHWC_CHANNELS; r < span.y; r += NHWC_ROWS) {
            size_t at = (size_t)r * c + ch;
            float v = load(x[at]);
            double g = bn_gated<T, ACT>(load(grad[at]), v, scale, shift);
            total += g;
            dot += g * ((double)v - (double)mean);
        }
    }
    bn_nhwc_partials(dot, total, c, partials);
}

// Eight consecutive values of T as loaded, 16 bytes for bf16 and f16, 32 for f32: a thread
// issues the loads of all its rows in flight before converting any.
template <typename T> struct Raw8 {
    uint4 u[sizeof(T) / 2];
};
template <typename T> __device__ __forceinline__ Raw8<T> load_raw8(const T* p) {
    Raw8<T> r;
#pragma unroll
    for (int k = 0; k < (int)(sizeof(T) / 2); k++) r.u[k] = reinterpret_cast<const uint4*>(p)[k];
    return r;
}

// Channels last with C a multiple of 8 where C / 8 divides 32 or is at least 32: each
// thread sums 8 channels from 16-byte loads (the scalar kernels above read 2 bytes a thread and
// ran at a third of the memory's bandwidth). A block is `across` = min(32, C / 8) threads across
// 8 * across channels (blockIdx.x's group) times BLOCK / across lanes of rows; the lanes are
// added pairwise in a fixed order. GRAD false: the statistics' sums (x, x * x); true: the
// gradient's (g * (x - mean), g) through ACT, stats [5, C]. Partials as above.
//
// Memory's latency bounds it: a thread loads 8 rows (f32: 4) of each operand before adding any
// (2 rows a thread with a runtime activation held it to 2.0-2.3 TB/s on an H200; 8 rows,
// the activation compiled in, 3.2-3.6), adds each group of rows in f32 and the groups in f64.
template <typename T, bool GRAD, int ACT>
__device__ void bn_partial_nhwc8(const T* __restrict__ x, const T* __restrict__ grad,
                                 const float* __restrict__ stats, int rows, int c,
                                 double* __restrict__ partials) {
    // Rows a thread has in flight: 128 bytes of each operand.
    constexpr int U = 16 / (int)sizeof(T);
    __shared__ double sa[BLOCK * 8], sb[BLOCK * 8];
    int across = min(32, c / 8), lanes = BLOCK / across;
    int lane = threadIdx.x / across, ch = (blockIdx.x * across + threadIdx.x % across) * 8;
    int2 span = bn_planes(rows, blockIdx.y, gridDim.y);
    double da[8] = {0}, db[8] = {0};
    float mean[8], scale[8], shift[8];
    // Adds the values of one row (f32 sums fa, fb).
    auto add = [&](const float* v, const float* g, float* fa, float* fb) {
#pragma unroll
        for (int k = 0; k < 8; k++) {
            if (GRAD) {
                float gated = bn_gated<T, ACT>(g[k], v[k], scale[k], shift[k]);
                fa[k] = fmaf(gated, v[k] - mean[k], fa[k]);
                fb[k] += gated;
            } else {
                fa[k] += v[k];
                fb[k] = fmaf(v[k], v[k], fb[k]);
            }
        }
    };
    if (ch < c) {
        if (GRAD) {
            load8(stats + ch, mean);
            load8(stats + 3 * c + ch, scale);
            load8(stats + 4 * c + ch, shift);
        }
        int r = span.x + lane;
        for (; r + (U - 1) * lanes < span.y; r += U * lanes) {
            Raw8<T> v[U], g[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                size_t at = (size_t)(r + u * lanes) * c + ch;
                v[u] = load_raw8(x + at);
                if (GRAD) g[u] = load_raw8(grad + at);
            }
            float fa[8] = {0}, fb[8] = {0};
#pragma unroll
            for (int u = 0; u < U; u++) {
                float vv[8], gg[8];
                load8(reinterpret_cast<const T*>(v[u].u), vv);
                if (GRAD) load8(reinterpret_cast<const T*>(g[u].u), gg);
                add(vv, gg, fa, fb);
            }
#pragma unroll
            for (int k = 0; k < 8; k++) {
                da[k] += fa[k];
                db[k] += fb[k];
            }
        }
        float fa[8] = {0}, fb[8] = {0};
        for (; r < span.y; r += lanes) {
            float vv[8], gg[8];
            load8(x + (size_t)r * c + ch, vv);
            if (GRAD) load8(grad + (size_t)r * c + ch, gg);
            add(vv, gg, fa, fb);
        }
#pragma unroll
        for (int k = 0; k < 8; k++) {
            da[k] += fa[k];
            db[k] += fb[k];
        }
    }
#pragma unroll
    for (int k = 0; k < 8; k++) {
        sa[k * BLOCK + threadIdx.x] = da[k];
        sb[k * BLOCK + threadIdx.x] = db[k];
    }
    __syncthreads();
    // Lane l adds lane l + half, halving: thread t and t + half * across hold the same channels.
    for (int half = lanes / 2; half > 0; half /= 2) {
        if (lane < half) {
            int other = threadIdx.x + half * across;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                sa[k * BLOCK + threadIdx.x] += sa[k * BLOCK + other];
                sb[k * BLOCK + threadIdx.x] += sb[k * BLOCK + other];
            }
        }
        __syncthreads();
    }
    if (lane == 0 && ch < c) {
        int split = blockIdx.y, splits = gridDim.y;
#pragma unroll
        for (int k = 0; k < 8; k++) {
            partials[(size_t)split * c + ch + k] = sa[k * BLOCK + threadIdx.x];
            partials[((size_t)splits + split) * c + ch + k] = sb[k * BLOCK + threadIdx.x];
        }
    }
}

// dx = scale * (g - dbeta / M - x_hat * dgamma / M), from bn_grad_finish's figures [8, C].
template <typename T, int ACT, typename I, int W>
__device__ void bn_input_grad_run(const T* x, const T* grad, const float* f, int c, int hw,
                                  I total, T* dx) {
    I step = (I)gridDim.x * blockDim.x, first = (I)blockIdx.x * blockDim.x + threadIdx.x;
    bool fixed = bn_fixed_channels<I, W>(c, hw);
    float mean[W], inv_std[W], scale[W], shift[W], mean_dbeta[W], mean_dgamma[W];
    for (I g = first; g < total / W; g += step) {
        I i = g * W;
        if (!fixed || g == first) {
            int ch = bn_channel(i, c, hw);
            bn_figure<W>(f + 2 * c, ch, hw, mean);
            bn_figure<W>(f + 3 * c, ch, hw, inv_std);
            bn_figure<W>(f + 4 * c, ch, hw, scale);
            bn_figure<W>(f + 5 * c, ch, hw, shift);
            bn_figure<W>(f + 6 * c, ch, hw, mean_dbeta);
            bn_figure<W>(f + 7 * c, ch, hw, mean_dgamma);
        }
        float v[W], gv[W];
        load_w<W>(x + i, v);
        load_w<W>(grad + i, gv);
#pragma unroll
        for (int k = 0; k < W; k++) {
            float g = bn_gated<T, ACT>(gv[k], v[k], scale[k], shift[k]);
            float x_hat = __fmul_rn(__fsub_rn(v[k], mean[k]), inv_std[k]);
            float rest = __fsub_rn(__fsub_rn(g, mean_dbeta[k]), __fmul_rn(x_hat, mean_dgamma[k]));
            v[k] = __fmul_rn(scale[k], rest);
        }
        store_w<W>(dx + i, v);
    }
}

template <typename T, int ACT>
__device__ void bn_input_grad(const T* x, const T* grad, const float* f, int c, int hw,
                              size_t total, int vec8, T* dx) {
    BY_SHAPE(total, vec8, (bn_input_grad_run<T, ACT, I, W>(x, grad, f, c, hw, (I)total, dx)))
}

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

// running = running * keep + batch * take (BatchNorm's running statistics, in place), both
// products rounded then added, as candle's composition on the CPU computes it.
extern "C" __global__ void bn_blend_running(float* running, const float* batch, size_t total,
                                            float keep, float take) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        running[i] = __fadd_rn(__fmul_rn(running[i], keep), __fmul_rn(batch[i], take));
}

// The entry points, one per data type (src/ops/batch_norm.rs picks by the tensors' dtype), and
// those with a fused activation one per activation too (`_identity`, `_relu`, `_gelu`): compiled
// in, GELU's registers no longer limit how many threads an SM holds for the others. The launch
// bounds ask for at least 4 blocks an SM of the forward elementwise kernels (their registers
// allow more), 3 of the input gradient (at 4 its registers spilled: 10% slower on an H200) and 2
// of the channels-last partial sums (1 with GELU), the most these allow without spilling.
#define BN_ACT_ENTRY_POINTS(T, SUFFIX, ACT, NAME)                                               \
    extern "C" __global__ void __launch_bounds__(BLOCK, (ACT) == ACT_GELU ? 1 : 2)             \
        bn_grad_partial_nhwc8_##NAME##_##SUFFIX(const T* x, const T* grad, const float* stats, \
                                                int rows, int c, int hw, double* partials) {   \
        bn_partial_nhwc8<T, true, ACT>(x, grad, stats, rows, c, partials);                     \
    }                                                                                          \
    extern "C" __global__ void bn_grad_partial_nhwc_##NAME##_##SUFFIX(                         \
        const T* x, const T* grad, const float* stats, int rows, int c, int hw,                \
        double* partials) {                                                                    \
        bn_grad_partial_nhwc<T, ACT>(x, grad, stats, rows, c, partials);                       \
    }                                                                                          \
    extern "C" __global__ void bn_grad_partial_##NAME##_##SUFFIX(                              \
        const T* x, const T* grad, const float* stats, int n, int c, int hw,                   \
        double* partials) {                                                                    \
        bn_grad_partial<T, ACT>(x, grad, stats, n, c, hw, partials);                           \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK, 4)                                     \
        bn_apply_##NAME##_##SUFFIX(const T* x, const float* scale, const float* shift, int c,  \
                                   int hw, size_t total, int vec8, T* y) {                     \
        bn_apply<T, ACT>(x, scale, shift, c, hw, total, vec8, y);                              \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK, 3)                                     \
        bn_input_grad_##NAME##_##SUFFIX(const T* x, const T* grad, const float* f, int c,      \
                                        int hw, size_t total, int vec8, T* dx) {               \
        bn_input_grad<T, ACT>(x, grad, f, c, hw, total, vec8, dx);                             \
    }

#define BN_ENTRY_POINTS(T, SUFFIX)                                                              \
    BN_ACT_ENTRY_POINTS(T, SUFFIX, ACT_IDENTITY, identity)                                     \
    BN_ACT_ENTRY_POINTS(T, SUFFIX, ACT_RELU, relu)                                             \
    BN_ACT_ENTRY_POINTS(T, SUFFIX, ACT_GELU, gelu)                                             \
    extern "C" __global__ void bn_stats_partial_##SUFFIX(const T* x, int n, int c, int hw,     \
                                                         double* partials) {                   \
        bn_stats_partial(x, n, c, hw, partials);                                               \
    }                                                                                          \
    extern "C" __global__ void bn_stats_partial_nhwc_##SUFFIX(const T* x, int rows, int c,     \
                                                              int hw, double* partials) {      \
        bn_stats_partial_nhwc(x, rows, c, partials);                                           \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK, 2)                                     \
        bn_stats_partial_nhwc8_##SUFFIX(const T* x, int rows, int c, int hw,                   \
                                        double* partials) {                                    \
        bn_partial_nhwc8<T, false, ACT_IDENTITY>(x, nullptr, nullptr, rows, c, partials);      \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(BLOCK, 4) bn_add_relu_##SUFFIX(               \
        const T* x, const float* scale, const float* shift, const T* r, int normalised,        \
        const float* r_scale, const float* r_shift, int c, int hw, size_t total, int vec8,     \
        T* y) {                                                                                \
        bn_add_relu(x, scale, shift, r, normalised, r_scale, r_shift, c, hw, total, vec8, y);  \
    }                                                                                          \
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
    }

BN_ENTRY_POINTS(float, f32)
BN_ENTRY_POINTS(__nv_bfloat16, bf16)
BN_ENTRY_POINTS(__half, f16)

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

#define POOL_GELU_ENTRY_POINTS(T, SUFFIX)                                                      \
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
    }                                                                                          \
    extern "C" __global__ void gelu_fwd_##SUFFIX(const T* x, size_t total, int vec8, T* y) {  \
        BY_SHAPE(total, vec8, (gelu_fwd_run<T, I, W>(x, (I)total, y)))                         \
    }                                                                                          \
    extern "C" __global__ void gelu_bwd_##SUFFIX(const T* x, const T* grad, size_t total,     \
                                                 int vec8, T* dx) {                            \
        BY_SHAPE(total, vec8, (gelu_bwd_run<T, I, W>(x, grad, (I)total, dx)))                  \
    }

POOL_GELU_ENTRY_POINTS(float, f32)
POOL_GELU_ENTRY_POINTS(__nv_bfloat16, bf16)
POOL_GELU_ENTRY_POINTS(__half, f16)

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
