//! kiln's own hot operations, as candle custom ops with a forward and a backward. Each keeps
//! candle's plain composition as its reference (the tests hold the kernels to it) and as the
//! path for backends and dtypes it does not cover (CUDA, Metal).

pub mod conv2d;
pub mod conv_block;
mod gemm;
pub mod relu_maxpool;

pub use conv2d::{conv2d, ConvParams};
pub use conv_block::conv_relu_pool;
pub use relu_maxpool::relu_max_pool2d;

use candle_core::{CpuStorage, Layout};

/// The f32 data of a contiguous CPU tensor argument (`what` names it in the error).
fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("kiln op: {what} must be a contiguous f32 tensor"),
    }
}
