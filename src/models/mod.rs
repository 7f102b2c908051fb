//! The model registry: a model is one file here and one line in [`MODELS`].

pub mod fastnet;
pub mod init;
pub mod layers;
pub mod linear;
pub mod resnet;
pub mod simplecnn;

use candle_core::Device;
use candle_nn::ModuleT;
use serde::{Deserialize, Serialize};

pub use init::{ParamStore, Scope};

use crate::error::{Error, Result};
use crate::ops::MemoryFormat;

/// What a model learns from, which decides the training loop that drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Classification of square RGB images (CIFAR-10, synthetic, ...).
    ImageClassification,
    /// The set-up check: regress y = 3x + 2 from generated points.
    LinearFit,
}

pub struct ModelSpec {
    pub name: &'static str,
    /// One line for `--help` and error messages.
    pub about: &'static str,
    pub task: Task,
    /// `stem` and `width` shape the network (ResNets); others ignore them.
    pub has_stem: bool,
    /// Trains in bf16 with f32 master weights when asked (`precision = "bf16"`, or `auto` on
    /// CUDA): its layers take activations of the input's type. Others train in f32 only.
    pub mixed_precision: bool,
    /// The model's `configs/<name>.toml`, built in so the binary works from any directory.
    pub default_config: &'static str,
    pub build: fn(&Architecture, &Scope) -> candle_core::Result<Box<dyn ModuleT>>,
    /// Initialisation from the training images, before a fresh run's first step (fastnet's
    /// whitening layer).
    pub data_init: Option<DataInit>,
}

/// Parameters set from data rather than drawn: `apply` reads the first `images` training
/// images, normalised, [N, 3, H, W] f32 on the model's device.
pub struct DataInit {
    pub images: usize,
    pub apply: fn(&ParamStore, &candle_core::Tensor) -> Result<()>,
}

/// Every image classifier's last layer, named as torchvision's: fine-tuning starts it afresh
/// for the new classes and may train it alone.
pub const HEAD: &str = "fc";

pub const MODELS: &[ModelSpec] = &[
    simplecnn::SPEC,
    resnet::RESNET18,
    resnet::RESNET34,
    resnet::RESNET50,
    fastnet::SPEC,
    linear::SPEC,
];

pub fn find(name: &str) -> Result<&'static ModelSpec> {
    MODELS
        .iter()
        .find(|spec| spec.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| Error::UnknownModel {
            name: name.to_string(),
            available: MODELS.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
        })
}

/// A network's first layers: torchvision's for photos, or the CIFAR variant for small images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[value(rename_all = "lower")]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// `cifar` for images under 64 pixels, `imagenet` from there on.
    #[default]
    Auto,
    /// 3x3 stride-1 convolution, no max-pool: small images keep their resolution.
    Cifar,
    /// torchvision's: 7x7 stride-2 convolution, 3x3 stride-2 max-pool.
    Imagenet,
}

/// Images smaller than this get the CIFAR stem under `stem = "auto"`.
const PHOTO_SIZE: usize = 64;

/// The shape of a network, settled from the data and the config before it is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Architecture {
    /// The head's outputs: the data set's class count.
    pub num_classes: usize,
    /// Input images are `image_size` x `image_size` RGB.
    pub image_size: usize,
    /// Never `Auto` here: see [`Architecture::new`].
    pub stem: Stem,
    /// The first stage's channels (ResNets; torchvision's is 64).
    pub width: usize,
    /// The activations' layout inside the network (ResNets); `None`: the device's fastest,
    /// [`MemoryFormat::preferred`]. Weights and inputs keep PyTorch's layout either way.
    pub memory_format: Option<MemoryFormat>,
}

impl Architecture {
    /// Resolves `Auto` from the image size, and checks that the stem fits it: each stem halves
    /// the image a number of times, and a network must not run out of pixels.
    pub fn new(num_classes: usize, image_size: usize, stem: Stem, width: usize) -> Result<Self> {
        let stem = match stem {
            Stem::Auto if image_size < PHOTO_SIZE => Stem::Cifar,
            Stem::Auto => Stem::Imagenet,
            chosen => chosen,
        };
        // Total downsampling of a ResNet with each stem: 3 stride-2 stages, times the stem's 4.
        let shrink = match stem {
            Stem::Imagenet => 32,
            _ => 8,
        };
        if image_size < shrink {
            return Err(Error::InvalidSetting(format!(
                "stem = \"{stem}\" makes images {shrink} times smaller, and these are \
                 {image_size}x{image_size}: use stem = \"cifar\" (or \"auto\") for small images"
            )));
        }
        if num_classes < 2 {
            return Err(Error::InvalidSetting(format!(
                "a classifier needs at least 2 classes, the data has {num_classes}"
            )));
        }
        if width == 0 {
            return Err(Error::InvalidSetting("width must be at least 1".into()));
        }
        Ok(Self {
            num_classes,
            image_size,
            stem,
            width,
            memory_format: None,
        })
    }
}

/// A model and the store holding its parameters and buffers.
pub struct Built {
    pub module: Box<dyn ModuleT>,
    pub params: ParamStore,
}

/// Builds `spec` with `arch` on `device`, its parameters initialised from `seed`.
pub fn build(spec: &ModelSpec, arch: &Architecture, seed: u64, device: &Device) -> Result<Built> {
    build_synced(spec, arch, seed, device, None)
}

/// [`build`], with batch norms that take their statistics over every replica's batch through
/// `batch_sync` when it is given (`sync_bn`).
pub fn build_synced(
    spec: &ModelSpec,
    arch: &Architecture,
    seed: u64,
    device: &Device,
    batch_sync: Option<std::sync::Arc<dyn crate::ops::CrossReplicaSum>>,
) -> Result<Built> {
    let params = ParamStore::new(seed);
    let scope = crate::models::init::Scope {
        batch_sync,
        ..params.scope(device)
    };
    let module = (spec.build)(arch, &scope)?;
    Ok(Built { module, params })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Tensor};

    fn cifar(num_classes: usize) -> Architecture {
        Architecture::new(num_classes, 32, Stem::Auto, 64).unwrap()
    }

    fn shapes(name: &str, arch: &Architecture) -> (Vec<(String, Vec<usize>)>, usize) {
        let built = build(find(name).unwrap(), arch, 0, &Device::Cpu).unwrap();
        let shapes: Vec<(String, Vec<usize>)> = built
            .params
            .state()
            .into_iter()
            .map(|(n, v)| (n, v.dims().to_vec()))
            .collect();
        let count = built
            .params
            .vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        (shapes, count)
    }

    fn s(n: &str, d: &[usize]) -> (String, Vec<usize>) {
        (n.to_string(), d.to_vec())
    }

    /// A ResNet-18 of width 8 on a fixed batch: its loss, logits and every parameter's
    /// gradient, with the images cast to `dtype` (the loop's mixed precision) and the
    /// activations in `format`.
    fn resnet_step(dtype: DType, format: MemoryFormat) -> (Tensor, Tensor, Vec<(String, Tensor)>) {
        resnet_step_synced(dtype, format, None)
    }

    fn resnet_step_synced(
        dtype: DType,
        format: MemoryFormat,
        sync: Option<std::sync::Arc<dyn crate::ops::CrossReplicaSum>>,
    ) -> (Tensor, Tensor, Vec<(String, Tensor)>) {
        let mut arch = Architecture::new(10, 32, Stem::Cifar, 8).unwrap();
        arch.memory_format = Some(format);
        let built = build_synced(find("resnet18").unwrap(), &arch, 3, &Device::Cpu, sync).unwrap();
        // At initialisation a ResNet amplifies rounding (tests/cuda.rs): each residual
        // branch's last BatchNorm scaled down makes this a comparison of the maths.
        for (name, var) in built.params.vars() {
            if name.starts_with("layer") && name.ends_with(".bn2.weight") {
                var.set(&(var.as_tensor() * 0.25).unwrap()).unwrap();
            }
        }
        let images = crate::ops::random_tensor(&[6, 3, 32, 32], 11);
        let labels = Tensor::new(&[0u32, 1, 2, 3, 4, 5], &Device::Cpu).unwrap();
        let logits = built
            .module
            .forward_t(&images.to_dtype(dtype).unwrap(), true)
            .unwrap();
        let loss = crate::ops::cross_entropy(&logits, &labels, 0.1).unwrap();
        let grads = loss.backward().unwrap();
        let grads = built
            .params
            .vars()
            .into_iter()
            .map(|(name, var)| (name, grads.get(&var).unwrap().clone()))
            .collect();
        (loss, logits, grads)
    }

    /// One replica alone: synced batch norms (their own composition) train a ResNet as the
    /// kernels do, to rounding, every parameter's gradient included.
    #[test]
    fn synced_batch_norms_of_one_replica_train_as_the_kernels() {
        struct Alone;
        impl crate::ops::CrossReplicaSum for Alone {
            fn sum(&self, _: &mut [f64]) -> std::result::Result<(), String> {
                Ok(())
            }
        }
        let first = MemoryFormat::ChannelsFirst;
        let (loss, logits, grads) = resnet_step(DType::F32, first);
        let (loss_s, logits_s, grads_s) =
            resnet_step_synced(DType::F32, first, Some(std::sync::Arc::new(Alone)));
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let close = |what: &str, a: &Tensor, b: &Tensor| {
            let (a, b) = (values(a), values(b));
            let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-5 * scale, "{what}: {x} vs {y}");
            }
        };
        close("loss", &loss_s, &loss);
        close("logits", &logits_s, &logits);
        for ((name, g), (_, g_s)) in grads.iter().zip(&grads_s) {
            let (a, b) = (values(g_s), values(g));
            let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            eprintln!("{name}: worst {worst:e} of scale {scale:e}");
            close(name, g_s, g);
        }
    }

    /// How far (relative L2) a parameter's gradient from half-precision activations may be from
    /// f32's. bf16's 8-bit significand leaves a BatchNorm bias's gradient (a sum of thousands of
    /// terms that largely cancel at initialisation) up to 28% from f32's here, f16 9%; a wrong
    /// gradient (none, doubled, of the wrong sign) is 100% or more off.
    const PER_PARAMETER: f32 = 0.5;

    /// bf16 or f16 activations with f32 master weights: the logits and every gradient come back
    /// in f32, the numbers are the half type's (not f32's bits) and close to f32's, each
    /// parameter's on its own.
    #[test]
    fn resnets_train_in_half_precision_with_f32_master_weights() {
        let first = MemoryFormat::ChannelsFirst;
        let (loss32, logits32, grads32) = resnet_step(DType::F32, first);
        let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
        let flat = |grads: &[(String, Tensor)]| {
            let parts: Vec<Tensor> = grads
                .iter()
                .map(|(_, g)| g.flatten_all().unwrap())
                .collect();
            Tensor::cat(&parts, 0).unwrap()
        };
        for half in [DType::BF16, DType::F16] {
            let (loss16, logits16, grads16) = resnet_step(half, first);
            assert_eq!(logits16.dtype(), DType::F32, "the head runs in f32");
            let (a, b) = (scalar(&loss32), scalar(&loss16));
            assert!(
                (a - b).abs() < 2e-2 * a.abs(),
                "loss {a} (f32) against {b} ({half:?})"
            );
            let gap = (&logits32 - &logits16)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(scalar(&gap) > 0.0, "the {half:?} step computed in f32");
            for (name, grad) in &grads16 {
                assert_eq!(grad.dtype(), DType::F32, "{name}'s gradient");
            }
            let (g32, g16) = (flat(&grads32), flat(&grads16));
            let dot = scalar(&(&g32 * &g16).unwrap().sum_all().unwrap());
            let norm = |g: &Tensor| scalar(&g.sqr().unwrap().sum_all().unwrap()).sqrt();
            let cosine = dot / (norm(&g32) * norm(&g16));
            assert!(
                cosine > 0.99,
                "{half:?} gradients' cosine similarity {cosine}"
            );
            // Each parameter on its own too: a wrong bias or BatchNorm gradient is a small part
            // of the whole, but far off its own f32 value.
            let mut worst = (0f32, String::new());
            for ((name, g32), (name16, g16)) in grads32.iter().zip(&grads16) {
                assert_eq!(name, name16);
                let off = norm(&(g32 - g16).unwrap()) / norm(g32).max(1e-12);
                if off > worst.0 {
                    worst = (off, name.clone());
                }
            }
            eprintln!(
                "{half:?}: the farthest parameter gradient is {} at {:.4} (relative L2)",
                worst.1, worst.0
            );
            assert!(
                worst.0 < PER_PARAMETER,
                "{half:?}: {}'s gradient is {} (relative L2) from f32's",
                worst.1,
                worst.0
            );
        }
    }

    /// Channels-last activations (CUDA's layout; on the CPU through the reference
    /// compositions) compute the same network: the same logits and gradients, by the same
    /// parameter names and in PyTorch's shapes.
    #[test]
    fn resnets_compute_the_same_channels_last() {
        let (loss_a, logits_a, grads_a) = resnet_step(DType::F32, MemoryFormat::ChannelsFirst);
        let (loss_b, logits_b, grads_b) = resnet_step(DType::F32, MemoryFormat::ChannelsLast);
        let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
        let largest = |t: &Tensor| scalar(&t.abs().unwrap().max_all().unwrap());
        assert!((scalar(&loss_a) - scalar(&loss_b)).abs() < 1e-5);
        assert!(largest(&(&logits_a - &logits_b).unwrap()) < 1e-4 * largest(&logits_a).max(1.0));
        assert_eq!(grads_a.len(), grads_b.len());
        for ((name_a, a), (name_b, b)) in grads_a.iter().zip(&grads_b) {
            assert_eq!(name_a, name_b);
            assert_eq!(a.dims(), b.dims(), "{name_a}");
            let gap = largest(&(a - b).unwrap());
            assert!(gap <= 1e-3 * largest(a).max(1e-6), "{name_a}: off by {gap}");
        }
    }

    #[test]
    fn parameter_names_and_shapes_are_pytorchs() {
        assert_eq!(
            shapes("simplecnn", &cifar(10)).0,
            [
                s("conv1.weight", &[16, 3, 3, 3]),
                s("conv1.bias", &[16]),
                s("fc.weight", &[10, 4096]),
                s("fc.bias", &[10]),
            ]
        );
        assert_eq!(
            shapes("linear", &cifar(10)).0,
            [s("weight", &[1, 1]), s("bias", &[1])]
        );
    }

    /// torchvision's parameter counts (`sum(p.numel() for p in m.parameters())` of
    /// resnet18/50(num_classes=10) with the CIFAR stem swapped in, and of the unchanged models
    /// for 1000 classes) and a sample of their state_dict names and shapes.
    #[test]
    fn resnets_have_torchvisions_names_shapes_and_sizes() {
        let (r18, count) = shapes("resnet18", &cifar(10));
        assert_eq!(count, 11_173_962);
        let imagenet = Architecture::new(1000, 224, Stem::Auto, 64).unwrap();
        assert_eq!(imagenet.stem, Stem::Imagenet);
        assert_eq!(shapes("resnet18", &imagenet).1, 11_689_512);
        assert_eq!(shapes("resnet34", &imagenet).1, 21_797_672);
        assert_eq!(shapes("resnet50", &imagenet).1, 25_557_032);
        let (r50, count) = shapes("resnet50", &cifar(10));
        assert_eq!(count, 23_520_842);
        for want in [
            s("conv1.weight", &[64, 3, 3, 3]),
            s("bn1.running_var", &[64]),
            s("bn1.num_batches_tracked", &[]),
            s("layer1.0.conv2.weight", &[64, 64, 3, 3]),
            s("layer2.0.downsample.0.weight", &[128, 64, 1, 1]),
            s("layer2.0.downsample.1.running_mean", &[128]),
            s("layer4.1.bn2.bias", &[512]),
            s("fc.weight", &[10, 512]),
        ] {
            assert!(r18.contains(&want), "resnet18 lacks {want:?}");
        }
        assert_eq!(
            r18.len(),
            62 + 60,
            "62 parameters and 20 batch norms' 3 buffers"
        );
        for want in [
            s("layer1.0.conv3.weight", &[256, 64, 1, 1]),
            s("layer1.0.downsample.0.weight", &[256, 64, 1, 1]),
            s("layer3.5.bn3.weight", &[1024]),
            s("fc.weight", &[10, 2048]),
        ] {
            assert!(r50.contains(&want), "resnet50 lacks {want:?}");
        }
    }

    #[test]
    fn forward_shapes_in_both_modes() {
        for (name, size, stem) in [
            ("simplecnn", 32, Stem::Auto),
            ("resnet18", 32, Stem::Cifar),
            ("resnet50", 32, Stem::Imagenet),
        ] {
            let arch = Architecture::new(7, size, stem, 8).unwrap();
            let model = build(find(name).unwrap(), &arch, 0, &Device::Cpu).unwrap();
            let x = Tensor::ones((2, 3, size, size), DType::F32, &Device::Cpu).unwrap();
            for train in [true, false] {
                let y = model.module.forward_t(&x, train).unwrap();
                assert_eq!(y.dims(), &[2, 7], "{name}");
            }
        }
        let lin = build(find("linear").unwrap(), &cifar(10), 0, &Device::Cpu).unwrap();
        let x = Tensor::zeros((7, 1), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(lin.module.forward_t(&x, true).unwrap().dims(), &[7, 1]);
    }

    #[test]
    fn a_stem_that_does_not_fit_or_one_class_is_a_clear_error() {
        let err = Architecture::new(10, 16, Stem::Imagenet, 64)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("16x16") && err.contains("stem = \"cifar\""),
            "{err}"
        );
        assert!(Architecture::new(1, 32, Stem::Auto, 64).is_err());
        assert_eq!(
            Architecture::new(10, 16, Stem::Auto, 64).unwrap().stem,
            Stem::Cifar
        );
    }

    #[test]
    fn unknown_model_lists_the_known_ones() {
        let err = find("resnet").err().unwrap().to_string();
        assert!(
            err.contains("simplecnn") && err.contains("resnet50") && err.contains("linear"),
            "{err}"
        );
        assert_eq!(find("SimpleCNN").unwrap().name, "simplecnn");
    }
}
