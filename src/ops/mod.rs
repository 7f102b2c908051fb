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
