//! `simplecnn`, as the tutorials define it:
//! Conv2d(3, 16, 3, padding 1) -> ReLU -> MaxPool2d(2) -> flatten -> Linear(16*16*16, 10).

use candle_core::Tensor;
use candle_nn::{Linear, Module, VarBuilder};

use super::{init, ModelSpec, Task};
use crate::ops::{self, conv2d::Conv2d, ConvParams};

pub const SPEC: ModelSpec = ModelSpec {
    name: "simplecnn",
    about: "the tutorials' SimpleCNN for CIFAR-10 (conv 3->16, ReLU, max-pool, linear 4096->10)",
    task: Task::ImageClassification,
    default_config: include_str!("../../configs/simplecnn.toml"),
    build,
};

pub struct SimpleCnn {
    conv1: Conv2d,
    fc: Linear,
}

impl SimpleCnn {
    pub fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let same = ConvParams {
            stride: 1,
            padding: 1,
        };
        Ok(Self {
            conv1: init::conv2d(3, 16, 3, same, vb.pp("conv1"))?,
            fc: init::linear(16 * 16 * 16, 10, vb.pp("fc"))?,
        })
    }
}

impl Module for SimpleCnn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let conv = &self.conv1;
        let x = ops::conv_relu_pool(x, &conv.weight, &conv.bias, conv.params, 2)?;
        self.fc.forward(&x.flatten_from(1)?)
    }
}

fn build(vb: VarBuilder) -> candle_core::Result<Box<dyn Module>> {
    Ok(Box::new(SimpleCnn::new(vb)?))
}
