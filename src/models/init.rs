//! Parameters and their initialisation.
//!
//! [`ParamStore`] is a candle-nn `VarBuilder` backend that creates each parameter the first time a
//! model asks for it, drawing from kiln's own seeded RNG (candle cannot seed its CPU RNG), and
//! remembers every parameter (and buffer) in creation order for the optimizer and for
//! checkpoints.
//! The layer constructors initialise like PyTorch's defaults: weights and biases uniform in
//! ±1/sqrt(fan_in), which the tutorials' learning rates assume.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, Linear, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::ops::CrossReplicaSum;

/// A model's tensors: its trainable parameters, and its buffers (BatchNorm's running
/// statistics), which are saved and loaded with them but never optimised.
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    /// Which of the two lists this handle's builder adds to.
    buffers: bool,
}

struct Inner {
    rng: ChaCha8Rng,
    params: Vec<(String, Var)>,
    buffers: Vec<(String, Var)>,
}

impl ParamStore {
    pub fn new(seed: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                rng: ChaCha8Rng::seed_from_u64(seed),
                params: Vec::new(),
                buffers: Vec::new(),
            })),
            buffers: false,
        }
    }

    /// A builder whose `get`s create (or return) parameters in this store, as f32 on `device`.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// Builders for a model's parameters and its buffers, under the same names.
    pub fn scope(&self, device: &Device) -> Scope {
        let buffers = Self {
            inner: Arc::clone(&self.inner),
            buffers: true,
        };
        Scope {
            params: self.var_builder(device),
            buffers: VarBuilder::from_backend(Box::new(buffers), DType::F32, device.clone()),
            batch_sync: None,
        }
    }

    /// Every parameter, in creation order, with its PyTorch-style dotted name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.lock().params.clone()
    }

    /// Every buffer, in creation order, with its PyTorch name.
    pub fn buffers(&self) -> Vec<(String, Var)> {
        self.lock().buffers.clone()
    }

    /// Parameters and buffers: everything a weights file holds (PyTorch's `state_dict`).
    pub fn state(&self) -> Vec<(String, Var)> {
        let inner = self.lock();
        inner.params.iter().chain(&inner.buffers).cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-init; the data is still whole.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Where a layer creates its tensors: parameters and buffers, under one name prefix.
#[derive(Clone)]
pub struct Scope {
    pub params: VarBuilder<'static>,
    pub buffers: VarBuilder<'static>,
    /// Batch norms take their statistics over every replica's batch through this (`sync_bn` in
    /// a data-parallel run); None: over this process's batch.
    pub batch_sync: Option<Arc<dyn CrossReplicaSum>>,
}

impl Scope {
    /// The scope of a sub-module (`layer1`, `0`, `bn1`, ...).
    pub fn pp(&self, name: impl ToString) -> Self {
        let name = name.to_string();
        Self {
            params: self.params.pp(&name),
            buffers: self.buffers.pp(name),
            batch_sync: self.batch_sync.clone(),
        }
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
        let existing = inner.params.iter().chain(&inner.buffers);
        if let Some((_, var)) = existing.clone().find(|(n, _)| n == name) {
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
            Init::Randn { mean, stdev } => {
                let normal = Normal::new(mean as f32, stdev as f32).map_err(|e| {
                    candle_core::Error::Msg(format!("{name}: normal({mean}, {stdev}): {e}"))
                })?;
                (0..count).map(|_| normal.sample(&mut inner.rng)).collect()
            }
            other => candle_core::bail!("kiln initialises {name} with its own RNG and supports only uniform, normal and constant inits, not {other:?}"),
        };
        let tensor = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let var = Var::from_tensor(&tensor)?;
        let list = if self.buffers {
            &mut inner.buffers
        } else {
            &mut inner.params
        };
        list.push((name.to_string(), var.clone()));
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        let inner = self.lock();
        match inner
            .params
            .iter()
            .chain(&inner.buffers)
            .find(|(n, _)| n == name)
        {
            Some((_, var)) => Ok(var.as_tensor().clone()),
            None => candle_core::bail!("no parameter named {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        let inner = self.lock();
        inner
            .params
            .iter()
            .chain(&inner.buffers)
            .any(|(n, _)| n == name)
    }
}

/// torchvision's ResNet init for convolutions: `kaiming_normal_(mode="fan_out",
/// nonlinearity="relu")`, a normal of standard deviation sqrt(2 / fan_out).
pub fn kaiming_normal_fan_out(out_channels: usize, kh: usize, kw: usize) -> Init {
    Init::Randn {
        mean: 0.0,
        stdev: (2.0 / (out_channels * kh * kw) as f64).sqrt(),
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
