//! SGD with momentum and L2 weight decay, as `torch.optim.SGD` (no dampening, no Nesterov).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::{restore, Optimizer};
use crate::error::Result;

#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    param: Var,
    /// PyTorch's `momentum_buffer`: absent until the first step, which sets it to the gradient.
    velocity: Option<Tensor>,
}

pub struct Sgd {
    slots: Vec<Slot>,
    settings: Settings,
}

impl Sgd {
    pub fn new(params: Vec<(String, Var)>, settings: Settings) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, param)| Slot {
                name,
                param,
                velocity: None,
            })
            .collect();
        Self { slots, settings }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let Settings {
            lr,
            momentum,
            weight_decay,
        } = self.settings;
        for slot in &mut self.slots {
            let Some(grad) = grads.get(&slot.param) else {
                continue;
            };
            let param = slot.param.as_tensor();
            let mut direction = if weight_decay != 0.0 {
                (grad + param.affine(weight_decay, 0.0)?)?
            } else {
                grad.clone()
            };
            if momentum != 0.0 {
                direction = match &slot.velocity {
                    Some(v) => ((v * momentum)? + direction)?,
                    None => direction,
                };
                slot.velocity = Some(direction.clone());
            }
            slot.param.set(&(param - (direction * lr)?)?)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.settings.lr
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .slots
            .iter()
            .filter_map(|slot| {
                Some((
                    format!("momentum_buffer/{}", slot.name),
                    slot.velocity.clone()?,
                ))
            })
            .collect())
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let mut restored = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let name = format!("momentum_buffer/{}", slot.name);
            // A buffer is absent until the first step with momentum, as in PyTorch.
            let velocity = if state.contains_key(&name) {
                Some(restore(state, &name, slot.param.as_tensor())?)
            } else {
                None
            };
            restored.push(velocity);
        }
        for (slot, velocity) in self.slots.iter_mut().zip(restored) {
            slot.velocity = velocity;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::quadratic_grads;
    use candle_core::Device;

    #[test]
    fn momentum_and_weight_decay_follow_pytorch() {
        // f(p) = p^2 from p = 1, lr 0.1, momentum 0.9, wd 0.5:
        // step 1: d = 2 + 0.5 = 2.5, buf = 2.5, p = 0.75
        // step 2: d = 1.5 + 0.375 = 1.875, buf = 0.9 * 2.5 + 1.875 = 4.125, p = 0.3375
        let p = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let mut sgd = Sgd::new(
            vec![("p".into(), p.clone())],
            Settings {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 0.5,
            },
        );
        for _ in 0..2 {
            let grads = quadratic_grads(&p);
            sgd.step(&grads).unwrap();
        }
        let got = p.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((got - 0.3375).abs() < 1e-6, "{got}");
    }
}
