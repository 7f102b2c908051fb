// Kernels of src/ops/conv_block.rs: part of kiln's one PTX module (src/ops/kernels.cu).
#include "common.cuh"

// ---- conv2d + bias -> ReLU -> max-pool (kernel = stride = k) ---------------------------------

#define NO_WINNER 0xffffffffu

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
