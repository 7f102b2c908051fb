// Kernels of src/optim (adam.rs, sgd.rs; launched through optim/cuda.rs): part of kiln's one
// PTX module (src/ops/kernels.cu).
#include "../ops/common.cuh"

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
