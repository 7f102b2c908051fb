//! The model registry: a model is one file here and one line in [`MODELS`].

pub mod init;
pub mod layers;
pub mod linear;
pub mod simplecnn;

use candle_core::Device;
use candle_nn::{Module, VarBuilder};

pub use init::ParamStore;

use crate::error::{Error, Result};

/// What a model learns from, which decides the training loop that drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// 10-way classification of 3x32x32 images (CIFAR-10 or synthetic).
    ImageClassification,
    /// The set-up check: regress y = 3x + 2 from generated points.
    LinearFit,
}

pub struct ModelSpec {
    pub name: &'static str,
    /// One line for `--help` and error messages.
    pub about: &'static str,
    pub task: Task,
    /// The model's `configs/<name>.toml`, built in so the binary works from any directory.
    pub default_config: &'static str,
    pub build: fn(VarBuilder) -> candle_core::Result<Box<dyn Module>>,
}

pub const MODELS: &[ModelSpec] = &[simplecnn::SPEC, linear::SPEC];

pub fn find(name: &str) -> Result<&'static ModelSpec> {
    MODELS
        .iter()
        .find(|spec| spec.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| Error::UnknownModel {
            name: name.to_string(),
            available: MODELS.iter().map(|s| s.name).collect::<Vec<_>>().join(", "),
        })
}

/// A model and the store holding its parameters.
pub struct Built {
    pub module: Box<dyn Module>,
    pub params: ParamStore,
}

/// Builds `spec` on `device`, its parameters initialised from `seed`.
pub fn build(spec: &ModelSpec, seed: u64, device: &Device) -> Result<Built> {
    let params = ParamStore::new(seed);
    let module = (spec.build)(params.var_builder(device))?;
    Ok(Built { module, params })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Tensor};

    fn shapes(name: &str) -> Vec<(String, Vec<usize>)> {
        let built = build(find(name).unwrap(), 0, &Device::Cpu).unwrap();
        built
            .params
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.dims().to_vec()))
            .collect()
    }

    #[test]
    fn parameter_names_and_shapes_are_pytorchs() {
        let s = |n: &str, d: &[usize]| (n.to_string(), d.to_vec());
        assert_eq!(
            shapes("simplecnn"),
            [
                s("conv1.weight", &[16, 3, 3, 3]),
                s("conv1.bias", &[16]),
                s("fc.weight", &[10, 4096]),
                s("fc.bias", &[10]),
            ]
        );
        assert_eq!(shapes("linear"), [s("weight", &[1, 1]), s("bias", &[1])]);
    }

    #[test]
    fn forward_shapes() {
        let cnn = build(find("simplecnn").unwrap(), 0, &Device::Cpu).unwrap();
        let x = Tensor::zeros((5, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cnn.module.forward(&x).unwrap().dims(), &[5, 10]);
        let lin = build(find("linear").unwrap(), 0, &Device::Cpu).unwrap();
        let x = Tensor::zeros((7, 1), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(lin.module.forward(&x).unwrap().dims(), &[7, 1]);
    }

    #[test]
    fn unknown_model_lists_the_known_ones() {
        let err = find("resnet").err().unwrap().to_string();
        assert!(err.contains("simplecnn") && err.contains("linear"), "{err}");
        assert_eq!(find("SimpleCNN").unwrap().name, "simplecnn");
    }
}
