//! The layers models are built from, each holding its parameters under PyTorch's names and
//! calling kiln's ops.

use candle_core::Tensor;
use candle_nn::Module;

use crate::ops::{self, ConvParams};

/// `nn.Conv2d`: `weight` [CO, C, KH, KW] and, unless `bias=False`, `bias` [CO].
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub params: ConvParams,
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::conv2d(x, &self.weight, self.bias.as_ref(), self.params)
    }
}
