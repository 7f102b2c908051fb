//! Lookahead weight averaging as airbench trains with it: every five steps an exponential
//! average of the model's state moves towards the weights and the weights jump back to it, the
//! average's memory growing over the run (its decay 0.95^5 * (step / steps)^3: nothing early,
//! most at the end); after the last step the weights are the average. What is averaged is
//! everything in the model's state that is f32: parameters, frozen ones and BatchNorm's
//! running statistics, as airbench's `state_dict()` loop.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::{restore, Optimizer};
use crate::error::Result;
use crate::models::ParamStore;

/// Steps between averagings.
const EVERY: u64 = 5;
/// The average's decay per step at the run's end (airbench's 0.95, five steps at a time).
const DECAY: f64 = 0.95;
/// The state's names in checkpoints.
const STEPS: &str = "lookahead/steps";
const AVERAGE: &str = "lookahead/";

pub struct Lookahead {
    inner: Box<dyn Optimizer>,
    tensors: Vec<(String, Var)>,
    /// Taken from the weights at the first step (after any loading), then kept.
    average: Option<Vec<Tensor>>,
    steps: u64,
    total: u64,
}

impl Lookahead {
    /// `inner`, with the f32 tensors of `store` averaged over a run of `total` steps.
    pub fn new(inner: Box<dyn Optimizer>, store: &ParamStore, total: u64) -> Result<Self> {
        let tensors = store
            .state()
            .into_iter()
            .filter(|(_, var)| var.dtype() == DType::F32)
            .collect();
        Ok(Self {
            inner,
            tensors,
            average: None,
            steps: 0,
            total: total.max(1),
        })
    }

    /// The average's decay at step `t` (counted from 1).
    fn decay(&self, t: u64) -> f64 {
        let progress = (t as f64 / self.total as f64).min(1.0);
        DECAY.powi(EVERY as i32) * progress.powi(3)
    }
}

impl Optimizer for Lookahead {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        if self.average.is_none() {
            let copies = self
                .tensors
                .iter()
                .map(|(_, var)| var.as_tensor().copy())
                .collect::<candle_core::Result<Vec<_>>>()?;
            self.average = Some(copies);
        }
        self.inner.step(grads)?;
        self.steps += 1;
        let blend = self.steps.is_multiple_of(EVERY);
        let last = self.steps == self.total;
        if !(blend || last) {
            return Ok(());
        }
        let decay = self.decay(self.steps);
        let Some(average) = self.average.as_mut() else {
            return Ok(());
        };
        for ((_, var), mean) in self.tensors.iter().zip(average.iter_mut()) {
            if blend {
                // torch's lerp_: mean + (weight - mean) * (1 - decay).
                *mean = (&*mean + ((var.as_tensor() - &*mean)? * (1.0 - decay))?)?;
            }
            var.set(mean)?;
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.inner.learning_rate()
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.inner.set_learning_rate(lr);
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = self.inner.state()?;
        let steps = Tensor::new(&[self.steps as f64], &candle_core::Device::Cpu)?;
        state.push((STEPS.to_string(), steps));
        if let Some(average) = &self.average {
            for ((name, _), mean) in self.tensors.iter().zip(average) {
                state.push((format!("{AVERAGE}{name}"), mean.clone()));
            }
        }
        Ok(state)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.inner.load_state(state)?;
        let like = Tensor::new(&[0f64], &candle_core::Device::Cpu)?;
        let steps = restore(state, STEPS, &like)?.to_vec1::<f64>()?[0] as u64;
        // Saved before the first step, there is no average yet.
        let average = if self
            .tensors
            .iter()
            .any(|(n, _)| state.contains_key(&format!("{AVERAGE}{n}")))
        {
            let restored = self
                .tensors
                .iter()
                .map(|(name, var)| restore(state, &format!("{AVERAGE}{name}"), var.as_tensor()))
                .collect::<Result<Vec<_>>>()?;
            Some(restored)
        } else {
            None
        };
        self.steps = steps;
        self.average = average;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{sgd, Sgd};
    use candle_core::Device;

    /// One parameter p, SGD at rate 1 with gradient 1 (each step subtracts 1), averaged over a
    /// run of 10 steps: airbench's `LookaheadState` by hand.
    #[test]
    fn averages_every_fifth_step_and_ends_on_the_average() {
        let store = ParamStore::new(0);
        let p = store
            .var_builder(&Device::Cpu)
            .get_with_hints(1, "p", candle_nn::Init::Const(0.0))
            .unwrap();
        let var = store.vars()[0].1.clone();
        let averaged = || {
            let settings = sgd::Settings {
                lr: 1.0,
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
            };
            Lookahead::new(Box::new(Sgd::new(store.vars(), settings)), &store, 10).unwrap()
        };
        let mut lookahead = averaged();
        let mut grads = GradStore::default();
        grads.insert(&p, p.ones_like().unwrap());
        let (mut weight, mut mean) = (0f64, 0f64);
        for t in 1..=10u64 {
            lookahead.step(&grads).unwrap();
            weight -= 1.0;
            if t % 5 == 0 {
                let decay = 0.95f64.powi(5) * (t as f64 / 10.0).powi(3);
                mean += (weight - mean) * (1.0 - decay);
                weight = mean;
            }
            let got = var.as_tensor().to_vec1::<f32>().unwrap()[0] as f64;
            assert!(
                (got - weight).abs() < 1e-5,
                "step {t}: {got} against {weight}"
            );
        }
        // Its state restores into a fresh one: the step count and the average.
        let state: HashMap<String, Tensor> = lookahead.state().unwrap().into_iter().collect();
        let mut resumed = averaged();
        resumed.load_state(&state).unwrap();
        assert_eq!(resumed.steps, 10);
        let kept = resumed.average.as_ref().unwrap()[0]
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        assert!((kept - mean).abs() < 1e-5);
    }
}
