// kiln's CUDA kernels, as one PTX module. f32 data (and bf16 and f16 where mixed precision needs
// it), contiguous tensors, row-major (NCHW) or channels-last layouts.
//
// build.rs compiles this file to PTX with nvcc when the `cuda` feature is on; src/ops/cuda.rs
// loads it through candle's CudaDevice and launches the kernels from candle custom ops. Each
// group of kernels lives beside the Rust that launches it and is included here, so that one
// module holds every kernel under its own name; each mirrors a CPU implementation in src/ops
// or src/optim, which the tests compare against.
#include "common.cuh"

#include "gather/kernels.cu"
#include "conv_block.cu"
#include "cross_entropy.cu"
#include "../optim/kernels.cu"
#include "batch_norm/kernels.cu"
#include "residual.cu"
#include "conv/kernels.cu"
#include "max_pool.cu"
#include "gelu.cu"
