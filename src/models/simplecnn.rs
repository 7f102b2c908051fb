//! `simplecnn`, as the tutorials define it:
//! Conv2d(3, 16, 3, padding 1) -> ReLU -> MaxPool2d(2) -> flatten -> Linear(16*16*16, 10).

use candle_core::Tensor;
use candle_nn::{Linear, Module, ModuleT, VarBuilder};

use super::layers::{self, Conv2d};
use super::{init, Architecture, ModelSpec, Scope, Task};
use crate::ops::{self, ConvParams};

pub const SPEC: ModelSpec = ModelSpec {
    name: "simplecnn",
    about: "the tutorials' SimpleCNN for CIFAR-10 (conv 3->16, ReLU, max-pool, linear 4096->10)",
    task: Task::ImageClassification,
    has_stem: false,
    mixed_precision: false,
    default_config: include_str!("../../configs/simplecnn.toml"),
    build,
    data_init: None,
};

pub struct SimpleCnn {
    conv1: Conv2d,
    fc: Linear,
}

impl SimpleCnn {
    /// The tutorials' network for `image_size` x `image_size` images (32 in CIFAR-10) and
    /// `num_classes` classes (10).
    pub fn new(image_size: usize, num_classes: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let same = ConvParams {
            stride: 1,
            padding: 1,
        };
        let pooled = image_size / 2;
        Ok(Self {
            conv1: layers::conv2d(3, 16, 3, same, vb.pp("conv1"))?,
            fc: init::linear(16 * pooled * pooled, num_classes, vb.pp("fc"))?,
        })
    }
}

impl Module for SimpleCnn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let conv = &self.conv1;
        let x = ops::conv_relu_pool(x, &conv.weight, conv.bias.as_ref(), conv.params, 2)?;
        self.fc.forward(&x.flatten_from(1)?)
    }
}

fn build(arch: &Architecture, scope: &Scope) -> candle_core::Result<Box<dyn ModuleT>> {
    Ok(Box::new(SimpleCnn::new(
        arch.image_size,
        arch.num_classes,
        scope.params.clone(),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, Overrides};
    use crate::data::batches::{BatchBuffer, DeviceSet};
    use crate::data::synthetic;
    use crate::models::init::ParamStore;
    use crate::ops::conv::conv2d_reference;
    use crate::ops::relu_maxpool::relu_max_pool2d_reference;
    use crate::optim;
    use candle_core::Device;

    /// The same model through candle's composition of the same maths (the ops' reference).
    fn reference_forward(model: &SimpleCnn, x: &Tensor) -> candle_core::Result<Tensor> {
        let conv = &model.conv1;
        let x = conv2d_reference(x, &conv.weight, conv.bias.as_ref(), conv.params)?;
        let x = relu_max_pool2d_reference(&x, 2)?;
        model.fc.forward(&x.flatten_from(1)?)
    }

    /// Losses of `steps` Adam steps on one batch, from the seed's initial weights.
    fn losses(reference: bool, steps: usize) -> Vec<f32> {
        let (spec, config) = resolve(Some("simplecnn"), None, &Overrides::default()).unwrap();
        assert_eq!(spec.name, "simplecnn");
        let params = ParamStore::new(3);
        let model = SimpleCnn::new(32, 10, params.var_builder(&Device::Cpu)).unwrap();
        let mut optimizer = optim::build(&config.optim(), &params, 1).unwrap();
        let set = DeviceSet::new(
            synthetic::generate(40, 9),
            crate::data::ChannelStats::CIFAR10,
            &Device::Cpu,
        )
        .unwrap();
        let order = set.order(&(0..40).collect::<Vec<_>>()).unwrap();
        let (x, y) = set
            .batch(&order, 0..40, &mut BatchBuffer::default(), None)
            .unwrap();
        (0..steps)
            .map(|_| {
                let (logits, loss) = if reference {
                    let logits = reference_forward(&model, &x).unwrap();
                    (logits.clone(), candle_nn::loss::cross_entropy(&logits, &y))
                } else {
                    let logits = model.forward(&x).unwrap();
                    (logits.clone(), ops::cross_entropy(&logits, &y, 0.0))
                };
                let loss = loss.unwrap();
                assert_eq!(logits.dims(), &[40, 10]);
                optimizer.step(&loss.backward().unwrap()).unwrap();
                loss.to_scalar::<f32>().unwrap()
            })
            .collect()
    }

    /// kiln's ops train the model as candle's composition does: the same loss, step by step.
    #[test]
    fn trains_as_the_reference_composition_does() {
        let (ours, reference) = (losses(false, 8), losses(true, 8));
        for (step, (a, b)) in ours.iter().zip(&reference).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "step {step}: {a} vs {b}"
            );
        }
        assert!(ours[7] < 0.8 * ours[0], "the loss falls: {ours:?}");
    }
}
