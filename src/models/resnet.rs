//! ResNet-18, -34 and -50 as torchvision builds them (BasicBlock 2-2-2-2 and 3-4-6-3, Bottleneck
//! 3-4-6-3 with the stride on its 3x3 convolution), under torchvision's parameter names
//! (`conv1.weight`, `layer2.0.downsample.0.weight`, `fc.bias`, ...) and with its initialisation,
//! so `torchvision.models.resnet18(num_classes=N)` and kiln load each other's weights. Two stems:
//! torchvision's (7x7 stride-2 convolution, then 3x3 stride-2 max-pool) for photos, and the
//! CIFAR one (3x3 stride-1 convolution, no pool) for small images. `width` scales the stage
//! widths (64 in torchvision) so tests can train the same maths small.

use candle_core::{DType, Tensor};
use candle_nn::{Linear, Module, ModuleT};

use super::init::{self, kaiming_normal_fan_out, Scope};
use super::layers::{eval_detached, BatchNorm2d, Conv2d, Shortcut};
use super::{Architecture, ModelSpec, Stem, Task};
use crate::ops::{self, Activation, ConvParams, MemoryFormat, PoolParams};

pub const RESNET18: ModelSpec = ModelSpec {
    name: "resnet18",
    about: "ResNet-18 (torchvision's; CIFAR stem for small images), BatchNorm, 11M parameters",
    task: Task::ImageClassification,
    has_stem: true,
    mixed_precision: true,
    default_config: include_str!("../../configs/resnet18.toml"),
    build: |arch, scope| {
        Ok(Box::new(ResNet::new(
            Depth::Basic([2, 2, 2, 2]),
            arch,
            scope,
        )?))
    },
    data_init: None,
};

pub const RESNET34: ModelSpec = ModelSpec {
    name: "resnet34",
    about: "ResNet-34 (torchvision's), 21M parameters",
    task: Task::ImageClassification,
    has_stem: true,
    mixed_precision: true,
    default_config: include_str!("../../configs/resnet34.toml"),
    build: |arch, scope| {
        Ok(Box::new(ResNet::new(
            Depth::Basic([3, 4, 6, 3]),
            arch,
            scope,
        )?))
    },
    data_init: None,
};

pub const RESNET50: ModelSpec = ModelSpec {
    name: "resnet50",
    about: "ResNet-50 (torchvision's, Bottleneck blocks), the course's benchmark, 24M parameters",
    task: Task::ImageClassification,
    has_stem: true,
    mixed_precision: true,
    default_config: include_str!("../../configs/resnet50.toml"),
    build: |arch, scope| {
        Ok(Box::new(ResNet::new(
            Depth::Bottleneck([3, 4, 6, 3]),
            arch,
            scope,
        )?))
    },
    data_init: None,
};

/// Blocks per stage, and their kind.
#[derive(Clone, Copy)]
enum Depth {
    Basic([usize; 4]),
    Bottleneck([usize; 4]),
}

/// A bias-free convolution with torchvision's init, over activations in `format`.
fn conv(
    (in_channels, out_channels): (usize, usize),
    kernel: usize,
    stride: usize,
    format: MemoryFormat,
    scope: &Scope,
) -> candle_core::Result<Conv2d> {
    let weight = scope.params.get_with_hints(
        (out_channels, in_channels, kernel, kernel),
        "weight",
        kaiming_normal_fan_out(out_channels, kernel, kernel),
    )?;
    Ok(Conv2d {
        weight,
        bias: None,
        params: ConvParams {
            stride,
            padding: kernel / 2,
        },
        format,
    })
}

/// `downsample`: a 1x1 convolution and a batch norm, where a block changes size or width.
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl Downsample {
    fn new(
        (cin, cout): (usize, usize),
        stride: usize,
        format: MemoryFormat,
        scope: &Scope,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            conv: conv((cin, cout), 1, stride, format, &scope.pp(0))?,
            bn: BatchNorm2d::new(cout, format, &scope.pp(1))?,
        })
    }
}

/// BasicBlock (two 3x3 convolutions) or Bottleneck (1x1, 3x3, 1x1 at four times the width).
struct Block {
    convs: Vec<Conv2d>,
    bns: Vec<BatchNorm2d>,
    downsample: Option<Downsample>,
}

impl Block {
    fn new(
        bottleneck: bool,
        cin: usize,
        planes: usize,
        stride: usize,
        format: MemoryFormat,
        scope: &Scope,
    ) -> candle_core::Result<Self> {
        // (in, out, kernel, stride) of each convolution, named conv1, conv2 (, conv3).
        let shapes = if bottleneck {
            vec![
                (cin, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, planes * 4, 1, 1),
            ]
        } else {
            vec![(cin, planes, 3, stride), (planes, planes, 3, 1)]
        };
        let cout = shapes[shapes.len() - 1].1;
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        for (i, &(a, b, k, s)) in shapes.iter().enumerate() {
            let name = |layer: &str| scope.pp(format!("{layer}{}", i + 1));
            convs.push(conv((a, b), k, s, format, &name("conv"))?);
            bns.push(BatchNorm2d::new(b, format, &name("bn"))?);
        }
        let downsample = if stride != 1 || cin != cout {
            Some(Downsample::new(
                (cin, cout),
                stride,
                format,
                &scope.pp("downsample"),
            )?)
        } else {
            None
        };
        Ok(Self {
            convs,
            bns,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut h = x.clone();
        // ReLU after each but the last, which the shortcut joins first.
        for (conv, bn) in self.convs[..last].iter().zip(&self.bns) {
            h = bn.forward(&conv.forward_t(&h, train)?, train, Activation::Relu)?;
        }
        let h = self.convs[last].forward_t(&h, train)?;
        // The downsampling batch norm joins the block's end, so its output is never held.
        match &self.downsample {
            Some(downsample) => {
                let r = downsample.conv.forward_t(x, train)?;
                let shortcut = Shortcut::Normalised(&downsample.bn, &r);
                self.bns[last].forward_add_relu(&h, shortcut, train)
            }
            None => self.bns[last].forward_add_relu(&h, Shortcut::Identity(x), train),
        }
    }
}

pub struct ResNet {
    /// The activations' layout; images come in and features go to the head channels first.
    format: MemoryFormat,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    pool: Option<PoolParams>,
    stages: Vec<Vec<Block>>,
    fc: Linear,
}

impl ResNet {
    fn new(depth: Depth, arch: &Architecture, scope: &Scope) -> candle_core::Result<Self> {
        let (bottleneck, counts) = match depth {
            Depth::Basic(counts) => (false, counts),
            Depth::Bottleneck(counts) => (true, counts),
        };
        let expansion = if bottleneck { 4 } else { 1 };
        let base = arch.width;
        let format = arch
            .memory_format
            .unwrap_or_else(|| MemoryFormat::preferred(scope.params.device()));
        let (conv1, pool) = match arch.stem {
            Stem::Imagenet => (
                conv((3, base), 7, 2, format, &scope.pp("conv1"))?,
                Some(PoolParams {
                    kernel: 3,
                    stride: 2,
                    padding: 1,
                }),
            ),
            // `Architecture::new` resolves Auto; built by hand, it means the CIFAR stem.
            Stem::Cifar | Stem::Auto => (conv((3, base), 3, 1, format, &scope.pp("conv1"))?, None),
        };
        let bn1 = BatchNorm2d::new(base, format, &scope.pp("bn1"))?;
        let mut cin = base;
        let mut stages = Vec::new();
        for (i, &count) in counts.iter().enumerate() {
            let planes = base << i;
            let stage_scope = scope.pp(format!("layer{}", i + 1));
            let mut blocks = Vec::new();
            for b in 0..count {
                let stride = if b == 0 && i > 0 { 2 } else { 1 };
                blocks.push(Block::new(
                    bottleneck,
                    cin,
                    planes,
                    stride,
                    format,
                    &stage_scope.pp(b),
                )?);
                cin = planes * expansion;
            }
            stages.push(blocks);
        }
        let fc = init::linear(cin, arch.num_classes, scope.params.pp("fc"))?;
        Ok(Self {
            format,
            conv1,
            bn1,
            pool,
            stages,
            fc,
        })
    }
}

impl ModuleT for ResNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let format = self.format;
        let x = format.from_nchw(x)?;
        let mut h = self
            .bn1
            .forward(&self.conv1.forward_t(&x, train)?, train, Activation::Relu)?;
        if let Some(pool) = self.pool {
            h = ops::max_pool::max_pool2d_in(&h, pool, format)?;
        }
        for block in self.stages.iter().flatten() {
            h = block.forward(&h, train)?;
        }
        let fc = Linear::new(
            eval_detached(self.fc.weight(), train),
            self.fc.bias().map(|b| eval_detached(b, train)),
        );
        // The logits that the loss reads in f32 whatever the precision.
        fc.forward(&global_average(&h, format)?)
    }
}

/// Each channel's average over the plane, [N, C], in f32. In f32 a mean; in bf16 or f16 a
/// multiply by ones, which sums in f32 and rounds the sum once (as PyTorch's autocast pools), then
/// a division in f32. Casting the activation to f32 first made the graph hold an f32 copy of the
/// last stage's output until the backward pass began, on top of the bf16 one it holds anyway.
fn global_average(h: &Tensor, format: MemoryFormat) -> candle_core::Result<Tensor> {
    if h.dtype() == DType::F32 {
        return h.mean(format.plane_dims());
    }
    let (n, c, height, width) = format.nchw_dims(h)?;
    let plane = height * width;
    let sums = match format {
        MemoryFormat::ChannelsFirst => {
            h.reshape((n * c, plane))?
                .matmul(&Tensor::ones((plane, 1), h.dtype(), h.device())?)?
        }
        MemoryFormat::ChannelsLast => Tensor::ones((n, 1, plane), h.dtype(), h.device())?
            .matmul(&h.reshape((n, plane, c))?)?,
    };
    sums.reshape((n, c))?.to_dtype(DType::F32)? / plane as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// In bf16 and f16, either format: the f32 mean of the values within the one rounding of
    /// their sum, and to each pixel the upstream gradient over the plane, rounded to the type.
    #[test]
    fn global_average_in_half_precision_is_the_mean_rounded_once() {
        let (n, c, h, w) = (3, 5, 7, 4);
        let x = crate::ops::random_tensor(&[n, c, h, w], 9);
        let upstream = crate::ops::random_tensor(&[n, c], 10);
        let values = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        for (dtype, epsilon) in [(DType::BF16, 2f32.powi(-8)), (DType::F16, 2f32.powi(-11))] {
            let rounded = x.to_dtype(dtype).unwrap();
            let exact = values(&rounded.to_dtype(DType::F32).unwrap().mean((2, 3)).unwrap());
            let magnitude = values(
                &rounded
                    .to_dtype(DType::F32)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .mean((2, 3))
                    .unwrap(),
            );
            let want_grad = values(
                &(&upstream / (h * w) as f64)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .unsqueeze(2)
                    .unwrap()
                    .unsqueeze(3)
                    .unwrap()
                    .broadcast_as((n, c, h, w))
                    .unwrap(),
            );
            for format in [MemoryFormat::ChannelsFirst, MemoryFormat::ChannelsLast] {
                let input = Var::from_tensor(&format.from_nchw(&rounded).unwrap()).unwrap();
                let average = global_average(input.as_tensor(), format).unwrap();
                assert_eq!(average.dtype(), DType::F32);
                for ((got, want), size) in values(&average).iter().zip(&exact).zip(&magnitude) {
                    assert!(
                        (got - want).abs() <= epsilon * size,
                        "{dtype:?} {format:?}: {got} against {want}"
                    );
                }
                let grads = (&average * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grad = format.to_nchw(grads.get(&input).unwrap()).unwrap();
                assert_eq!(values(&grad), want_grad, "{dtype:?} {format:?}");
            }
        }
    }
}
