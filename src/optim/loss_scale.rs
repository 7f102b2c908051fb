//! Dynamic loss scaling for f16 training, as PyTorch's `GradScaler` does it: the loss is
//! multiplied by a scale before the backward pass, so that small gradients survive f16's narrow
//! range; the parameters' gradients are divided by it before the update. Where any gradient
//! overflowed (inf or NaN), the update is skipped and the scale halved; after `growth_interval`
//! good steps in a row it doubles. The scale and the count are optimizer state, so checkpoints
//! keep them and a resumed run continues bit for bit.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::Optimizer;
use crate::error::{Error, Result};

/// The state's name in checkpoints: [scale, good steps in a row].
const STATE: &str = "loss_scale";

/// The `[loss_scale]` table of a config (f16 runs): `GradScaler`'s arguments, under its names,
/// with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The scale of the first step.
    pub init_scale: f64,
    /// The scale's factor after `growth_interval` good steps in a row (above 1).
    pub growth_factor: f64,
    /// The scale's factor after a step whose gradients overflowed (below 1).
    pub backoff_factor: f64,
    pub growth_interval: u32,
}

impl Settings {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.init_scale.is_finite() && self.init_scale > 0.0) {
            return Err(format!(
                "loss_scale.init_scale must be above 0, got {}",
                self.init_scale
            ));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor > 1.0) {
            return Err(format!(
                "loss_scale.growth_factor must be above 1, got {}",
                self.growth_factor
            ));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(format!(
                "loss_scale.backoff_factor must be in (0, 1), got {}",
                self.backoff_factor
            ));
        }
        if self.growth_interval == 0 {
            return Err("loss_scale.growth_interval must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// `inner`, stepped with unscaled gradients, and only where they are finite.
pub struct LossScaled {
    inner: Box<dyn Optimizer>,
    params: Vec<Var>,
    settings: Settings,
    scale: f64,
    good_steps: u32,
}

impl LossScaled {
    pub fn new(inner: Box<dyn Optimizer>, params: Vec<Var>, settings: Settings) -> Self {
        Self {
            inner,
            params,
            scale: settings.init_scale,
            settings,
            good_steps: 0,
        }
    }
}

impl Optimizer for LossScaled {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.inner.step(grads)
    }

    fn loss_scale(&self) -> Option<f64> {
        Some(self.scale)
    }

    fn unscale(&mut self, grads: &mut GradStore) -> Result<bool> {
        let present: Vec<(&Var, Tensor)> = self
            .params
            .iter()
            .filter_map(|var| Some((var, grads.get(var)?.clone())))
            .collect();
        let Some((first, _)) = present.first() else {
            return Ok(true);
        };
        // One sum over every gradient: finite exactly when every element is (an inf or NaN
        // anywhere makes it inf or NaN), one read back to the host a step, as GradScaler's.
        let sums = present
            .iter()
            .map(|(_, g)| g.sum_all()?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let total = Tensor::stack(&sums, 0)?
            .to_device(first.device())?
            .sum_all()?
            .to_scalar::<f32>()?;
        if !total.is_finite() {
            self.scale *= self.settings.backoff_factor;
            self.good_steps = 0;
            tracing::debug!(scale = self.scale, "f16 gradients overflowed: step skipped");
            return Ok(false);
        }
        let inverse = 1.0 / self.scale;
        for (var, grad) in present {
            grads.insert(var, grad.affine(inverse, 0.0)?);
        }
        self.good_steps += 1;
        if self.good_steps >= self.settings.growth_interval {
            self.scale *= self.settings.growth_factor;
            self.good_steps = 0;
        }
        Ok(true)
    }

    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr);
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = self.inner.state()?;
        let scaler = [self.scale as f32, self.good_steps as f32];
        state.push((STATE.to_string(), Tensor::new(&scaler, &Device::Cpu)?));
        Ok(state)
    }

    /// A checkpoint without the scale (written in f32 or bf16) starts from the initial one.
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.inner.load_state(state)?;
        if let Some(saved) = state.get(STATE) {
            let values = saved.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let [scale, good_steps] = values[..] else {
                return Err(Error::CheckpointMismatch(format!(
                    "optimizer state {STATE} holds {} values, not 2",
                    values.len()
                )));
            };
            self.scale = f64::from(scale);
            self.good_steps = good_steps as u32;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{sgd, Sgd};

    /// SGD at lr 0.5 over p = [1, 2], wrapped, with `interval` good steps to grow.
    fn scaled_sgd(interval: u32) -> (Var, LossScaled) {
        let p = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let settings = sgd::Settings {
            lr: 0.5,
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        };
        let inner = Box::new(Sgd::new(vec![("p".into(), p.clone())], settings));
        let scaler = Settings {
            growth_interval: interval,
            ..Settings::default()
        };
        (p.clone(), LossScaled::new(inner, vec![p], scaler))
    }

    /// The gradients of the scaled loss sum(p * slope) * scale.
    fn scaled_grads(p: &Var, slope: [f32; 2], scale: f64) -> GradStore {
        let slope = Tensor::new(&slope, &Device::Cpu).unwrap();
        let loss = (p.as_tensor() * slope).unwrap().sum_all().unwrap();
        loss.affine(scale, 0.0).unwrap().backward().unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_vec1::<f32>().unwrap()
    }

    #[test]
    fn finite_gradients_are_divided_by_the_scale_before_the_step() {
        let (p, mut optimizer) = scaled_sgd(2000);
        let scale = optimizer.loss_scale().unwrap();
        assert_eq!(scale, 65536.0, "GradScaler's initial scale");
        let mut grads = scaled_grads(&p, [3.0, -5.0], scale);
        assert!(optimizer.unscale(&mut grads).unwrap());
        assert_eq!(values(grads.get(&p).unwrap()), [3.0, -5.0]);
        optimizer.step(&grads).unwrap();
        assert_eq!(values(p.as_tensor()), [1.0 - 1.5, 2.0 + 2.5]);
        assert_eq!(
            optimizer.loss_scale(),
            Some(scale),
            "one good step does not grow it"
        );
    }

    #[test]
    fn an_overflow_skips_the_step_and_halves_the_scale() {
        let (p, mut optimizer) = scaled_sgd(2000);
        let mut grads = scaled_grads(&p, [f32::INFINITY, 1.0], 65536.0);
        assert!(!optimizer.unscale(&mut grads).unwrap());
        assert_eq!(optimizer.loss_scale(), Some(32768.0));
        let mut grads = scaled_grads(&p, [f32::NAN, 1.0], 32768.0);
        assert!(!optimizer.unscale(&mut grads).unwrap());
        assert_eq!(optimizer.loss_scale(), Some(16384.0));
        assert_eq!(values(p.as_tensor()), [1.0, 2.0], "no step was taken");
    }

    /// One scaled backward pass of sum(p * slope) and its unscaling: whether it was finite.
    fn unscale_once(p: &Var, optimizer: &mut LossScaled, slope: [f32; 2]) -> bool {
        let scale = optimizer.loss_scale().unwrap();
        let mut grads = scaled_grads(p, slope, scale);
        optimizer.unscale(&mut grads).unwrap()
    }

    #[test]
    fn the_scale_grows_after_good_steps_and_survives_a_checkpoint() {
        let (p, mut optimizer) = scaled_sgd(2);
        assert!(unscale_once(&p, &mut optimizer, [1.0, 1.0]));
        assert!(unscale_once(&p, &mut optimizer, [1.0, 1.0]));
        assert_eq!(
            optimizer.loss_scale(),
            Some(131072.0),
            "doubled after 2 good steps"
        );
        assert!(unscale_once(&p, &mut optimizer, [1.0, 1.0]));
        assert!(!unscale_once(&p, &mut optimizer, [f32::INFINITY, 1.0]));
        assert!(unscale_once(&p, &mut optimizer, [1.0, 1.0]));
        // Scale 65536 with one good step since the overflow: a resumed run continues there.
        let saved: HashMap<String, Tensor> = optimizer.state().unwrap().into_iter().collect();
        let (q, mut resumed) = scaled_sgd(2);
        resumed.load_state(&saved).unwrap();
        assert_eq!(resumed.loss_scale(), Some(65536.0));
        assert!(unscale_once(&q, &mut resumed, [1.0, 1.0]));
        assert_eq!(
            resumed.loss_scale(),
            Some(131072.0),
            "the count came back too"
        );
        // A checkpoint written without loss scaling (f32, bf16) starts from the initial scale.
        let (_, mut fresh) = scaled_sgd(2);
        fresh.load_state(&HashMap::new()).unwrap();
        assert_eq!(fresh.loss_scale(), Some(65536.0));
    }
}
