//! kiln's own optimizers, with PyTorch's maths. candle-nn's keep their state private; ours keep
//! it per parameter so checkpoints can hold it.

pub mod adam;
pub mod sgd;

use candle_core::backprop::GradStore;
use candle_core::Var;

use crate::config::{Config, OptimizerKind};
use crate::error::Result;

pub use adam::Adam;
pub use sgd::Sgd;

pub trait Optimizer {
    /// Applies one update to every parameter that has a gradient in `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    fn learning_rate(&self) -> f64;
}

/// The optimizer that `config` names, over `params` (name, variable).
pub fn build(config: &Config, params: Vec<(String, Var)>) -> Result<Box<dyn Optimizer>> {
    let vars = params.into_iter().map(|(_, v)| v).collect();
    Ok(match config.optimizer {
        OptimizerKind::Adam => Box::new(Adam::new(
            vars,
            adam::Settings {
                lr: config.lr,
                beta1: config.betas[0],
                beta2: config.betas[1],
                eps: config.eps,
                weight_decay: config.weight_decay,
            },
        )?),
        OptimizerKind::Sgd => Box::new(Sgd::new(
            vars,
            sgd::Settings {
                lr: config.lr,
                momentum: config.momentum,
                weight_decay: config.weight_decay,
            },
        )),
    })
}
