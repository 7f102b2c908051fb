// Kernels of src/ops/cross_entropy.rs: part of kiln's one PTX module (src/ops/kernels.cu).
#include "common.cuh"

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
