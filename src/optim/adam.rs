//! Adam (Kingma & Ba), written as `torch.optim.Adam` computes it, L2 `weight_decay` included.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::Optimizer;
use crate::error::Result;

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

struct Slot {
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
    pub fn new(params: Vec<Var>, settings: Settings) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|param| {
                let m = param.zeros_like()?;
                let v = param.zeros_like()?;
                Ok(Slot { param, m, v })
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps on f(p) = sum(p^2) against values worked out with torch.optim.Adam's formulas.
    #[test]
    fn matches_pytorch_on_a_quadratic() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let settings = Settings { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut adam = Adam::new(vec![p.clone()], settings).unwrap();
        for _ in 0..2 {
            let grads = p.as_tensor().sqr().unwrap().sum_all().unwrap().backward().unwrap();
            adam.step(&grads).unwrap();
        }
        // Step 1 moves each coordinate by lr against its gradient's sign: [0.9, -1.9].
        // Step 2: g = [1.8, -3.8]; m = [0.38, -0.78]/..., worked in f64 below.
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
}
