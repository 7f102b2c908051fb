// The memory-bound kernels of a ResNet-50 training step (bf16, channels last, batch 512, CIFAR
// shapes) on their own: each family over the step's shapes, its time and the bandwidth it
// reached, beside a device-to-device copy of the same bytes (the card's practical ceiling).
// kiln's kernels.cu (every kernel, through its includes) is included as built; the grids mirror
// src/ops/batch_norm/cuda.rs (`PartialSums::grid`, `per_value_wave`) and src/ops/cuda.rs
// (`per_value`): change them together.
//
// Build (here, with the CUDA toolkit of ../shared/cuda/README.md) and run (on the GPU):
//   nvcc -O3 -std=c++17 -arch=sm_90 -cudart static -L"$CUDA_LIB" \
//       benches/cuda/batch_norm_kernels.cu -o batch_norm_kernels
//   ./batch_norm_kernels
#include "../../src/ops/kernels.cu"
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>
#include <vector>

#define CHECK(call)                                                                      \
    do {                                                                                 \
        cudaError_t e = (call);                                                          \
        if (e != cudaSuccess) {                                                          \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e));  \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

typedef __nv_bfloat16 bf16;

// Rows (N*H*W) and channels of a BatchNorm input, and how many of the step's 53 have them.
struct Shape {
    int rows, c, count;
};
static const Shape BATCH_NORMS[] = {
    {524288, 64, 7},  {524288, 256, 4}, {524288, 128, 1}, {131072, 128, 7}, {131072, 512, 5},
    {131072, 256, 1}, {32768, 256, 11}, {32768, 1024, 7}, {32768, 512, 1},  {8192, 512, 5},
    {8192, 2048, 4}};
// The 16 residual block ends (3, 4, 6, 3 a stage); the first of each stage has a downsampling
// BatchNorm on its shortcut.
static const Shape BLOCK_ENDS[] = {{524288, 256, 3}, {131072, 512, 4}, {32768, 1024, 6},
                                   {8192, 2048, 3}};

// Inputs are taken in turn from a pool larger than the L2 cache, so each launch reads memory.
static bf16* pool;
static size_t pool_values, cursor;
static bf16* next_tensor(size_t n) {
    if (cursor + n > pool_values) cursor = 0;
    bf16* p = pool + cursor;
    cursor += (n + 255) / 256 * 256;
    return p;
}

__global__ void fill(bf16* p, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = __float2bfloat16((float)((i * 2654435761u) % 1000) / 500.0f - 1.0f);
}
__global__ void fill_figures(float* p, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        p[i] = 0.5f + 0.01f * (i % 7);
}

// PartialSums::grid for the eight-wide channels-last kernels.
static dim3 partial_grid(int rows, int c, int* splits) {
    int across = std::min(c / 8, 32), groups = (c + 8 * across - 1) / (8 * across);
    int lanes = BLOCK / across;
    *splits = std::max(1, std::min(256 / groups, std::max(1, rows / (32 * lanes))));
    return dim3(groups, *splits, 1);
}
static dim3 finish_grid(int c) { return dim3((c + 31) / 32, 1, 1); }
// per_value for eight values a thread, and per_value_wave's caps (WAVE_BLOCKS,
// INPUT_GRAD_WAVE_BLOCKS).
static unsigned per_value(size_t total) {
    return (unsigned)std::min<size_t>(65535, std::max<size_t>(1, (total / 8 + BLOCK - 1) / BLOCK));
}
static unsigned per_value_wave(size_t total, unsigned cap) { return std::min(per_value(total), cap); }

// Median of 15 timed repetitions of `launch_all` (after one untimed), in ms.
template <class F> static float median_ms(F launch_all) {
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    launch_all();
    CHECK(cudaDeviceSynchronize());
    std::vector<float> times;
    for (int r = 0; r < 15; r++) {
        CHECK(cudaEventRecord(start));
        launch_all();
        CHECK(cudaEventRecord(stop));
        CHECK(cudaEventSynchronize(stop));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, start, stop));
        times.push_back(ms);
    }
    CHECK(cudaGetLastError());
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

template <size_t N, class F> static void each(const Shape (&shapes)[N], F f) {
    for (const Shape& s : shapes)
        for (int k = 0; k < s.count; k++) f(s.rows, s.c, (size_t)s.rows * s.c, k);
}

template <size_t N> static double bytes_of(const Shape (&shapes)[N]) {
    double total = 0;
    for (const Shape& s : shapes) total += 2.0 * s.rows * s.c * s.count;
    return total;
}

int main() {
    pool_values = (size_t)3 << 29;  // 3 GiB of bf16
    CHECK(cudaMalloc(&pool, pool_values * sizeof(bf16)));
    fill<<<4096, 256>>>(pool, pool_values);
    float* figures;
    CHECK(cudaMalloc(&figures, 8 * 2048 * sizeof(float)));
    fill_figures<<<64, 256>>>(figures, 8 * 2048);
    double* partials;
    CHECK(cudaMalloc(&partials, 2 * 2048 * 256 * sizeof(double)));
    float* out_figures;
    CHECK(cudaMalloc(&out_figures, 8 * 2048 * sizeof(float)));
    bf16* out;
    CHECK(cudaMalloc(&out, (size_t)524288 * 256 * sizeof(bf16)));
    const float* scale = figures + 3 * 2048;
    const float* shift = figures + 4 * 2048;

    double norms = bytes_of(BATCH_NORMS), ends = bytes_of(BLOCK_ENDS);
    printf("one pass over the 53 BatchNorm inputs: %.0f MB; over the 16 block ends: %.0f MB\n",
           norms / 1e6, ends / 1e6);
    printf("%-52s %8s %8s %9s\n", "kernels (launches)", "ms", "TB/s", "of copy");
    double copy_rate = 0;
    auto report = [&](const char* name, float ms, double bytes) {
        double rate = bytes / ms / 1e9;
        if (copy_rate == 0) copy_rate = rate;
        printf("%-52s %8.3f %8.2f %8.0f%%\n", name, ms, rate, 100 * rate / copy_rate);
    };

    report("copy, device to device (53)", median_ms([&] {
        each(BATCH_NORMS, [&](int, int, size_t n, int) {
            CHECK(cudaMemcpyAsync(out, next_tensor(n), n * sizeof(bf16), cudaMemcpyDeviceToDevice));
        });
    }), 2 * norms);
    report("statistics: bn_stats_partial_nhwc8 + finish (53)", median_ms([&] {
        each(BATCH_NORMS, [&](int rows, int c, size_t n, int) {
            int splits;
            dim3 grid = partial_grid(rows, c, &splits);
            bn_stats_partial_nhwc8_bf16<<<grid, BLOCK>>>(next_tensor(n), rows, c, 1, partials);
            bn_stats_finish<<<finish_grid(c), 1024>>>(partials, scale, shift, c, splits,
                                                      (double)rows, 1e-5f, out_figures);
        });
    }), norms);
    report("apply with ReLU: bn_apply_relu (53)", median_ms([&] {
        each(BATCH_NORMS, [&](int, int c, size_t n, int) {
            bn_apply_relu_bf16<<<per_value_wave(n, 2048), BLOCK>>>(next_tensor(n), scale, shift, c, 1, n,
                                                            1, out);
        });
    }), 2 * norms);
    report("block ends: bn_add_relu (16)", median_ms([&] {
        each(BLOCK_ENDS, [&](int, int c, size_t n, int k) {
            bn_add_relu_bf16<<<per_value_wave(n, 2048), BLOCK>>>(next_tensor(n), scale, shift,
                                                          next_tensor(n), k == 0, scale, shift,
                                                          c, 1, n, 1, out);
        });
    }), 3 * ends);
    report("gradient sums: bn_grad_partial_nhwc8_relu + finish (53)", median_ms([&] {
        each(BATCH_NORMS, [&](int rows, int c, size_t n, int) {
            int splits;
            dim3 grid = partial_grid(rows, c, &splits);
            bn_grad_partial_nhwc8_relu_bf16<<<grid, BLOCK>>>(next_tensor(n), next_tensor(n),
                                                            figures, rows, c, 1, partials);
            bn_grad_finish<<<finish_grid(c), 1024>>>(partials, figures, c, splits, (float)rows,
                                                     out_figures);
        });
    }), 2 * norms);
    report("input gradient: bn_input_grad_relu (53)", median_ms([&] {
        each(BATCH_NORMS, [&](int, int c, size_t n, int) {
            bn_input_grad_relu_bf16<<<per_value_wave(n, 1024), BLOCK>>>(next_tensor(n), next_tensor(n),
                                                                 figures, c, 1, n, 1, out);
        });
    }), 3 * norms);
    report("ReLU gate: relu_gate (16)", median_ms([&] {
        each(BLOCK_ENDS, [&](int, int, size_t n, int) {
            relu_gate_bf16<<<per_value(n), BLOCK>>>(next_tensor(n), next_tensor(n), n, 1, out);
        });
    }), 3 * ends);
    report("residual gradient sums: add_same (16)", median_ms([&] {
        each(BLOCK_ENDS, [&](int, int, size_t n, int) {
            add_same_bf16<<<per_value(n), BLOCK>>>(next_tensor(n), next_tensor(n), n, 1, out);
        });
    }), 3 * ends);
    report("the same through the ReLU: add_gated (16)", median_ms([&] {
        each(BLOCK_ENDS, [&](int, int, size_t n, int) {
            add_gated_bf16<<<per_value(n), BLOCK>>>(next_tensor(n), next_tensor(n), next_tensor(n),
                                                   n, 1, out);
        });
    }), 4 * ends);
    return 0;
}
