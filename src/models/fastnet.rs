//! `fastnet`: the network of airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a
//! single GPU", arXiv 2404.00498), under the names and shapes of its PyTorch `nn.Sequential`'s
//! state_dict (tested here; CI loads a trained file into airbench's network in PyTorch,
//! `pytorch/fastnet.py`, and holds its logits to kiln's):
//!
//! ```text
//! 0  Conv2d(3, 24, 2, bias)      whitening: frozen weight from the training patches' covariance
//! 1  GELU
//! 2  ConvGroup(24, w)            conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU
//! 3  ConvGroup(w, 4w)
//! 4  ConvGroup(4w, 4w)
//! 5  MaxPool                     over what is left of the plane (3x3 for CIFAR)
//! 7  Linear(4w, classes), no bias, then x 1/9
//! ```
//!
//! with w = `width` (airbench's 64). Convolutions are bias-free with PyTorch's default init and
//! their first input-count filters set to the identity (`dirac_`); BatchNorms have eps 1e-12,
//! momentum 0.4 (airbench's 0.6 in its own convention) and a scale frozen at 1. The whitening
//! weight is not learnt from gradients but set from data before training: [`whiten`]. Each GELU
//! after a BatchNorm runs in the BatchNorm's own passes ([`Activation::Gelu`]; one kernel each
//! way on CUDA, the same bits as the two apart).

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Module, ModuleT};

use super::init::{pytorch_uniform, ParamStore, Scope};
use super::layers::{eval_detached, BatchNorm2d, Conv2d, NormSettings};
use super::{Architecture, ModelSpec, Task};
use crate::error::{Error, Result};
use crate::ops::{self, Activation, ConvParams, MemoryFormat, PoolParams};

pub const SPEC: ModelSpec = ModelSpec {
    name: "fastnet",
    about:
        "airbench94's CIFAR-10 network (whitening conv, three conv-pool-BatchNorm-GELU groups), \
            2M parameters, trained in seconds on a GPU",
    task: Task::ImageClassification,
    has_stem: false,
    mixed_precision: true,
    default_config: include_str!("../../configs/fastnet.toml"),
    build: |arch, scope| Ok(Box::new(FastNet::new(arch, scope)?)),
    data_init: Some(super::DataInit {
        images: WHITENING_IMAGES,
        apply: whiten,
    }),
};

/// The whitening layer's patch side.
const PATCH: usize = 2;
/// The head's output scale (airbench's `scaling_factor`).
/// The head's logits are scaled by this (airbench's `scaling_factor`).
pub const HEAD_SCALE: f64 = 1.0 / 9.0;
/// The BatchNorms' epsilon (airbench's 1e-12).
pub const NORM_EPS: f64 = 1e-12;
/// How many training images the whitening's covariance is estimated from, as airbench's.
pub const WHITENING_IMAGES: usize = 5000;
/// Added to each eigenvalue before dividing by its root: how far the whitening flattens noise.
const WHITENING_EPS: f64 = 5e-4;

fn norm_settings() -> NormSettings {
    NormSettings {
        momentum: 0.4,
        eps: NORM_EPS,
        train_weight: false,
    }
}

/// A bias-free 3x3 'same' convolution with PyTorch's default init, its first `cin` filters the
/// identity (`torch.nn.init.dirac_`): each group starts by passing its input through.
fn identity_conv(
    cin: usize,
    cout: usize,
    format: MemoryFormat,
    scope: &Scope,
) -> candle_core::Result<Conv2d> {
    let weight =
        scope
            .params
            .get_with_hints((cout, cin, 3, 3), "weight", pytorch_uniform(cin * 9))?;
    let kept = cin.min(cout);
    let mut dirac = vec![0f32; kept * cin * 9];
    for i in 0..kept {
        dirac[(i * cin + i) * 9 + 4] = 1.0;
    }
    let dirac =
        Tensor::from_vec(dirac, (kept, cin, 3, 3), &Device::Cpu)?.to_device(weight.device())?;
    // The returned tensor shares the parameter's storage: written in place before any use.
    weight.slice_set(&dirac, 0, 0)?;
    Ok(Conv2d {
        weight,
        bias: None,
        params: ConvParams {
            stride: 1,
            padding: 1,
        },
        format,
    })
}

struct ConvGroup {
    conv1: Conv2d,
    norm1: BatchNorm2d,
    conv2: Conv2d,
    norm2: BatchNorm2d,
    format: MemoryFormat,
}

impl ConvGroup {
    fn new(
        cin: usize,
        cout: usize,
        format: MemoryFormat,
        scope: &Scope,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            conv1: identity_conv(cin, cout, format, &scope.pp("conv1"))?,
            norm1: BatchNorm2d::with(cout, format, norm_settings(), &scope.pp("norm1"))?,
            conv2: identity_conv(cout, cout, format, &scope.pp("conv2"))?,
            norm2: BatchNorm2d::with(cout, format, norm_settings(), &scope.pp("norm2"))?,
            format,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward_t(x, train)?;
        let h = ops::max_pool::max_pool2d_in(&h, PoolParams::tiles(2), self.format)?;
        let h = self.norm1.forward(&h, train, Activation::Gelu)?;
        let h = self.conv2.forward_t(&h, train)?;
        self.norm2.forward(&h, train, Activation::Gelu)
    }
}

pub struct FastNet {
    format: MemoryFormat,
    whiten: Conv2d,
    groups: [ConvGroup; 3],
    head: Tensor,
}

impl FastNet {
    pub fn new(arch: &Architecture, scope: &Scope) -> candle_core::Result<Self> {
        // Three pools halve the plane and the whitening takes a pixel: at least 2x2 is left.
        if arch.image_size < 17 {
            candle_core::bail!(
                "fastnet needs images of at least 17x17 pixels, these are {0}x{0}",
                arch.image_size
            );
        }
        let format = arch
            .memory_format
            .unwrap_or_else(|| MemoryFormat::preferred(scope.params.device()));
        let whitened = 2 * 3 * PATCH * PATCH;
        let whiten_scope = scope.pp(0);
        let whiten = Conv2d {
            // Set by `whiten` from data and never trained: a buffer, used detached so that no
            // gradient is computed for it (`whiten` writes the same storage).
            weight: whiten_scope
                .buffers
                .get_with_hints(
                    (whitened, 3, PATCH, PATCH),
                    "weight",
                    pytorch_uniform(3 * PATCH * PATCH),
                )?
                .detach(),
            bias: Some(whiten_scope.params.get_with_hints(
                whitened,
                "bias",
                candle_nn::Init::Const(0.0),
            )?),
            params: ConvParams {
                stride: 1,
                padding: 0,
            },
            format,
        };
        let w = arch.width;
        let groups = [
            ConvGroup::new(whitened, w, format, &scope.pp(2))?,
            ConvGroup::new(w, 4 * w, format, &scope.pp(3))?,
            ConvGroup::new(4 * w, 4 * w, format, &scope.pp(4))?,
        ];
        let head = scope.params.pp(7).get_with_hints(
            (arch.num_classes, 4 * w),
            "weight",
            pytorch_uniform(4 * w),
        )?;
        Ok(Self {
            format,
            whiten,
            groups,
            head,
        })
    }
}

impl ModuleT for FastNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = self.format.from_nchw(x)?;
        let mut h = ops::gelu(&self.whiten.forward_t(&x, train)?)?;
        for group in &self.groups {
            h = group.forward(&h, train)?;
        }
        // airbench's MaxPool2d(3) on its 3x3 maps: one window over the whole (square) plane.
        let (_, channels, side, _) = self.format.nchw_dims(&h)?;
        let pooled = ops::max_pool::max_pool2d_in(&h, PoolParams::tiles(side), self.format)?;
        // The head in f32 whatever the precision, as the ResNets'.
        let features = pooled.to_dtype(DType::F32)?.reshape(((), channels))?;
        let head = candle_nn::Linear::new(eval_detached(&self.head, train), None);
        head.forward(&features)? * HEAD_SCALE
    }
}

/// Sets the whitening layer (`0.weight`) of the fastnet in `store` from `images` [N, 3, H, W]
/// (normalised training images; airbench takes the first 5,000): the eigenvectors of the 2x2
/// patches' covariance, each divided by the root of its eigenvalue (plus a little), and their
/// negatives, so the layer's outputs are decorrelated and of unit variance.
pub fn whiten(store: &ParamStore, images: &Tensor) -> Result<()> {
    let Some((_, weight)) = store.buffers().into_iter().find(|(n, _)| n == "0.weight") else {
        return Err(Error::InvalidSetting(
            "whitening needs a fastnet (its layer 0.weight)".into(),
        ));
    };
    let (n, c, h, w) = images.dims4()?;
    let (oh, ow) = (h + 1 - PATCH, w + 1 - PATCH);
    // Every patch as a row of c * 2 * 2 values in the weight's (channel, row, column) order.
    let mut taps = Vec::with_capacity(PATCH * PATCH);
    for dy in 0..PATCH {
        for dx in 0..PATCH {
            taps.push(images.narrow(2, dy, oh)?.narrow(3, dx, ow)?);
        }
    }
    let patches = Tensor::stack(&taps, D::Minus1)? // [N, C, OH, OW, 4]
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1, 4))?
        .reshape((n * oh * ow, c * PATCH * PATCH))?;
    let count = (n * oh * ow) as f64;
    let covariance = (patches.t()?.matmul(&patches)? / count)?
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f64>()?;
    let dim = c * PATCH * PATCH;
    let eigen = nalgebra::SymmetricEigen::new(nalgebra::DMatrix::from_fn(dim, dim, |i, j| {
        covariance[i][j]
    }));
    let mut order: Vec<usize> = (0..dim).collect();
    order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
    let mut filters = vec![0f32; 2 * dim * dim];
    for (k, &e) in order.iter().enumerate() {
        let scale = 1.0 / (eigen.eigenvalues[e].max(0.0) + WHITENING_EPS).sqrt();
        for i in 0..dim {
            let v = (eigen.eigenvectors[(i, e)] * scale) as f32;
            filters[k * dim + i] = v;
            filters[(dim + k) * dim + i] = -v;
        }
    }
    let filters =
        Tensor::from_vec(filters, weight.shape(), &Device::Cpu)?.to_device(weight.device())?;
    weight.set(&filters)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{build, find, Stem};

    fn arch(width: usize) -> Architecture {
        Architecture::new(10, 32, Stem::Auto, width).unwrap()
    }

    /// airbench94's `make_net()` state_dict: names, shapes, and which of them are trained.
    #[test]
    fn names_and_shapes_are_airbenchs() {
        let built = build(find("fastnet").unwrap(), &arch(64), 0, &Device::Cpu).unwrap();
        let trained: Vec<(String, Vec<usize>)> = built
            .params
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.dims().to_vec()))
            .collect();
        let s = |n: &str, d: &[usize]| (n.to_string(), d.to_vec());
        assert_eq!(
            trained,
            [
                s("0.bias", &[24]),
                s("2.conv1.weight", &[64, 24, 3, 3]),
                s("2.norm1.bias", &[64]),
                s("2.conv2.weight", &[64, 64, 3, 3]),
                s("2.norm2.bias", &[64]),
                s("3.conv1.weight", &[256, 64, 3, 3]),
                s("3.norm1.bias", &[256]),
                s("3.conv2.weight", &[256, 256, 3, 3]),
                s("3.norm2.bias", &[256]),
                s("4.conv1.weight", &[256, 256, 3, 3]),
                s("4.norm1.bias", &[256]),
                s("4.conv2.weight", &[256, 256, 3, 3]),
                s("4.norm2.bias", &[256]),
                s("7.weight", &[10, 256]),
            ]
        );
        // sum(p.numel() for p in make_net().parameters()), frozen ones included.
        let all: usize = built
            .params
            .state()
            .iter()
            .filter(|(n, _)| n.ends_with("weight") || n.ends_with("bias"))
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(all, 1_972_792);
        let buffers: Vec<String> = built.params.buffers().into_iter().map(|(n, _)| n).collect();
        for name in ["0.weight", "2.norm1.weight", "4.norm2.running_var"] {
            assert!(buffers.iter().any(|b| b == name), "{name} is not a buffer");
        }
    }

    #[test]
    fn groups_start_as_the_identity_on_their_inputs() {
        let built = build(find("fastnet").unwrap(), &arch(8), 1, &Device::Cpu).unwrap();
        let weight = built
            .params
            .vars()
            .into_iter()
            .find(|(n, _)| n == "3.conv1.weight")
            .unwrap()
            .1;
        let w: Vec<Vec<Vec<Vec<f32>>>> = (0..32)
            .map(|o| weight.as_tensor().get(o).unwrap().to_vec3().unwrap())
            .collect();
        for (o, filter) in w.iter().enumerate() {
            for (i, plane) in filter.iter().enumerate() {
                let centre = plane[1][1];
                if o < 8 {
                    let want = if o == i { 1.0 } else { 0.0 };
                    assert_eq!(centre, want, "filter {o}, input {i}");
                    assert_eq!(plane[0][0], 0.0);
                }
            }
        }
        assert!(w[8..]
            .iter()
            .flatten()
            .flatten()
            .flatten()
            .any(|&v| v != 0.0));
    }

    /// After `whiten`, the layer's 24 outputs on the images it was fitted to are uncorrelated
    /// with unit variance (the first 12; the other 12 are their negatives).
    #[test]
    fn whitening_decorrelates_the_patches() {
        let built = build(find("fastnet").unwrap(), &arch(8), 0, &Device::Cpu).unwrap();
        // Correlated channels: the second and third mostly follow the first.
        let base = crate::ops::random_tensor(&[40, 1, 12, 12], 5);
        let noise = crate::ops::random_tensor(&[40, 2, 12, 12], 6);
        let images = Tensor::cat(
            &[
                base.clone(),
                (base.repeat((1, 2, 1, 1)).unwrap() + (noise * 0.3).unwrap()).unwrap(),
            ],
            1,
        )
        .unwrap();
        whiten(&built.params, &images).unwrap();
        let weight = built.params.buffers()[0].1.as_tensor().clone();
        let out = images.conv2d(&weight, 0, 1, 1, 1).unwrap(); // [40, 24, 11, 11]
        let rows = out
            .narrow(1, 0, 12)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape(((), 12))
            .unwrap();
        let count = rows.dim(0).unwrap() as f64;
        let cov = (rows.t().unwrap().matmul(&rows).unwrap() / count)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in cov.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                // eps 5e-4 shrinks the weakest directions' variance (here ~0.01) below 1.
                let fits = if i == j {
                    (0.9..1.001).contains(&v)
                } else {
                    v.abs() < 0.01
                };
                assert!(fits, "covariance [{i}][{j}] = {v}");
            }
        }
        let negated = (out.narrow(1, 0, 12).unwrap() + out.narrow(1, 12, 12).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(negated < 1e-5);
    }

    #[test]
    fn forward_in_both_modes_and_layouts() {
        for format in [MemoryFormat::ChannelsFirst, MemoryFormat::ChannelsLast] {
            let mut a = Architecture::new(7, 32, Stem::Auto, 8).unwrap();
            a.memory_format = Some(format);
            let built = build(find("fastnet").unwrap(), &a, 0, &Device::Cpu).unwrap();
            let x = crate::ops::random_tensor(&[2, 3, 32, 32], 1);
            for train in [true, false] {
                let y = built.module.forward_t(&x, train).unwrap();
                assert_eq!(y.dims(), &[2, 7]);
            }
        }
        let small = Architecture::new(10, 16, Stem::Auto, 8).unwrap();
        let err = build(find("fastnet").unwrap(), &small, 0, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("at least 17x17"), "{err}");
    }
}
