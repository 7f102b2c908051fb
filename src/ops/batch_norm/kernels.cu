// Kernels of src/ops/batch_norm (launched from batch_norm/cuda.rs): part of kiln's one PTX
// module (src/ops/kernels.cu).
#include "../common.cuh"

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
    }

BN_ENTRY_POINTS(float, f32)
BN_ENTRY_POINTS(__nv_bfloat16, bf16)
BN_ENTRY_POINTS(__half, f16)
