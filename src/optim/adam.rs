//! Adam (Kingma & Ba), written as `torch.optim.Adam` computes it, L2 `weight_decay` included.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use super::{restore, Optimizer};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    param: Var,
    /// First moment (PyTorch's `exp_avg`).
    m: Tensor,
    /// Second moment (PyTorch's `exp_avg_sq`).
    v: Tensor,
}

pub struct Adam {
    slots: Vec<Slot>,
    settings: Settings,
    step: u64,
}

impl Adam {
    pub fn new(params: Vec<(String, Var)>, settings: Settings) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                let m = param.zeros_like()?;
                let v = param.zeros_like()?;
                Ok(Slot { name, param, m, v })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            settings,
            step: 0,
        })
    }
}

impl Optimizer for Adam {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let Settings {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.settings;
        let t = self.step as i32;
        let step_size = lr / (1.0 - beta1.powi(t));
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        for slot in &mut self.slots {
            let Some(grad) = grads.get(&slot.param) else {
                continue;
            };
            let param = slot.param.as_tensor();
            let grad = if weight_decay != 0.0 {
                (grad + param.affine(weight_decay, 0.0)?)?
            } else {
                grad.clone()
            };
            slot.m = ((&slot.m * beta1)? + (&grad * (1.0 - beta1))?)?;
            slot.v = ((&slot.v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let denom = ((slot.v.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let update = ((&slot.m / denom)? * step_size)?;
            slot.param.set(&(param - update)?)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.settings.lr
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        // f64 holds every step count a run can reach exactly.
        let mut state = vec![(
            STEP.to_string(),
            Tensor::new(self.step as f64, &Device::Cpu)?,
        )];
        for slot in &self.slots {
            state.push((format!("exp_avg/{}", slot.name), slot.m.clone()));
            state.push((format!("exp_avg_sq/{}", slot.name), slot.v.clone()));
        }
        Ok(state)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let step = state.get(STEP).ok_or_else(|| {
            Error::CheckpointMismatch(
                "Adam's step count is missing (a checkpoint of another optimizer?)".into(),
            )
        })?;
        let step = step.to_scalar::<f64>()? as u64;
        let mut restored = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let m = restore(
                state,
                &format!("exp_avg/{}", slot.name),
                slot.param.as_tensor(),
            )?;
            let v = restore(
                state,
                &format!("exp_avg_sq/{}", slot.name),
                slot.param.as_tensor(),
            )?;
            restored.push((m, v));
        }
        // Only once everything checked out: a failed load leaves the optimizer as it was.
        for (slot, (m, v)) in self.slots.iter_mut().zip(restored) {
            slot.m = m;
            slot.v = v;
        }
        self.step = step;
        Ok(())
    }
}

const STEP: &str = "step";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::quadratic_grads;
    use candle_core::Device;

    /// Two steps on f(p) = sum(p^2) against values worked out with torch.optim.Adam's formulas.
    #[test]
    fn matches_pytorch_on_a_quadratic() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let settings = Settings {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut adam = Adam::new(vec![("p".into(), p.clone())], settings).unwrap();
        for _ in 0..2 {
            let grads = quadratic_grads(&p);
            adam.step(&grads).unwrap();
        }
        // Step 1 moves each coordinate by lr against its gradient's sign; step 2 is worked out
        // in f64 below, following PyTorch's update (bias corrections 1 - beta^2).
        let expected: Vec<f32> = [1.0f64, -2.0]
            .iter()
            .map(|&p0| {
                let (b1, b2, lr, eps) = (0.9f64, 0.999f64, 0.1, 1e-8);
                let g1 = 2.0 * p0;
                let p1 = p0 - lr * g1.signum();
                let g2 = 2.0 * p1;
                let m = b1 * (1.0 - b1) * g1 + (1.0 - b1) * g2;
                let v = b2 * (1.0 - b2) * g1 * g1 + (1.0 - b2) * g2 * g2;
                let denom = v.sqrt() / (1.0 - b2 * b2).sqrt() + eps;
                (p1 - lr / (1.0 - b1 * b1) * m / denom) as f32
            })
            .collect();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        for (g, e) in got.iter().zip(&expected) {
            assert!((g - e).abs() < 1e-5, "got {got:?}, expected {expected:?}");
        }
    }

    #[test]
    fn state_round_trips_and_continues_identically() {
        let settings = Settings {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let quadratic_step = |opt: &mut Adam, p: &Var| {
            let grads = quadratic_grads(p);
            opt.step(&grads).unwrap();
        };
        let p = Var::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let mut straight = Adam::new(vec![("p".into(), p.clone())], settings).unwrap();
        for _ in 0..3 {
            quadratic_step(&mut straight, &p);
        }
        let saved: HashMap<String, Tensor> = straight.state().unwrap().into_iter().collect();
        let q = Var::from_tensor(p.as_tensor()).unwrap();
        let mut resumed = Adam::new(vec![("p".into(), q.clone())], settings).unwrap();
        resumed.load_state(&saved).unwrap();
        quadratic_step(&mut straight, &p);
        quadratic_step(&mut resumed, &q);
        let bits = |v: &Var| -> Vec<u32> {
            v.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(bits(&p), bits(&q));

        let mut wrong = Adam::new(vec![("other".into(), q)], settings).unwrap();
        let err = wrong.load_state(&saved).unwrap_err().to_string();
        assert!(err.contains("exp_avg/other"), "{err}");
    }
}
