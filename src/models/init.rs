//! Parameters and their initialisation.
//!
//! [`ParamStore`] is a candle-nn `VarBuilder` backend that creates each parameter the first time a
//! model asks for it, drawing from kiln's own seeded RNG (candle cannot seed its CPU RNG), and
//! remembers every parameter in creation order for the optimizer and for checkpoints.
//! The layer constructors initialise like PyTorch's defaults: weights and biases uniform in
//! ±1/sqrt(fan_in), which the tutorials' learning rates assume.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, Linear, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::layers::Conv2d;
use crate::ops::ConvParams;

#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    rng: ChaCha8Rng,
    vars: Vec<(String, Var)>,
}

impl ParamStore {
    pub fn new(seed: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                rng: ChaCha8Rng::seed_from_u64(seed),
                vars: Vec::new(),
            })),
        }
    }

    /// A builder whose `get`s create (or return) parameters in this store, as f32 on `device`.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// Every parameter, in creation order, with its PyTorch-style dotted name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock().vars.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-init; the data is still whole.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SimpleBackend for ParamStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut inner = self.lock();
        if let Some((_, var)) = inner.vars.iter().find(|(n, _)| n == name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "parameter {name} exists with shape {:?}, asked for {shape:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let count = shape.elem_count();
        let values: Vec<f32> = match init {
            Init::Const(v) => vec![v as f32; count],
            Init::Uniform { lo, up } => {
                let (lo, up) = (lo as f32, up as f32);
                (0..count).map(|_| inner.rng.random_range(lo..up)).collect()
            }
            other => candle_core::bail!("kiln initialises {name} with its own RNG and supports only uniform and constant inits, not {other:?}"),
        };
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let var = Var::from_tensor(&tensor)?;
        inner.vars.push((name.to_string(), var.clone()));
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        match self.lock().vars.iter().find(|(n, _)| n == name) {
            Some((_, var)) => Ok(var.as_tensor().clone()),
            None => candle_core::bail!("no parameter named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.lock().vars.iter().any(|(n, _)| n == name)
    }
}

/// PyTorch's default for Linear and Conv2d weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
pub fn pytorch_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `nn.Linear(in_features, out_features)`: `weight` [out, in] and `bias` [out].
pub fn linear(
    in_features: usize,
    out_features: usize,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let init = pytorch_uniform(in_features);
    let weight = vb.get_with_hints((out_features, in_features), "weight", init)?;
    let bias = vb.get_with_hints(out_features, "bias", init)?;
    Ok(Linear::new(weight, Some(bias)))
}

/// `nn.Conv2d(in, out, kernel)` with square kernels and PyTorch's default init: `weight`
/// [out, in, k, k] and `bias` [out].
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    params: ConvParams,
    vb: VarBuilder,
) -> candle_core::Result<Conv2d> {
    let init = pytorch_uniform(in_channels * kernel * kernel);
    let weight = vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", init)?;
    let bias = vb.get_with_hints(out_channels, "bias", init)?;
    Ok(Conv2d {
        weight,
        bias: Some(bias),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_pytorch_bounds_and_shared_parameters() {
        let draw = |seed| {
            let store = ParamStore::new(seed);
            let layer = linear(16, 4, store.var_builder(&Device::Cpu).pp("fc")).unwrap();
            (
                store,
                layer
                    .weight()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        };
        let (store, a) = draw(1);
        assert_eq!(a, draw(1).1, "same seed, same init");
        assert_ne!(a, draw(2).1);
        assert!(a.iter().all(|w| w.abs() <= 0.25), "within 1/sqrt(16)");
        assert!(
            a.iter().any(|w| w.abs() > 0.2),
            "spread over the whole range"
        );
        let names: Vec<String> = store.vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["fc.weight", "fc.bias"]);
        // Asking again returns the same variable, not a new draw.
        let again = store
            .var_builder(&Device::Cpu)
            .pp("fc")
            .get((4, 16), "weight")
            .unwrap();
        assert_eq!(again.flatten_all().unwrap().to_vec1::<f32>().unwrap(), a);
        assert!(store
            .var_builder(&Device::Cpu)
            .pp("fc")
            .get((5, 16), "weight")
            .is_err());
    }
}
