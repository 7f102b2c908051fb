//! kiln's own optimizers, with PyTorch's maths. candle-nn's keep their state private; ours keep
//! it per parameter so checkpoints can hold it.

pub mod adam;
#[cfg(feature = "cuda")]
mod cuda;
pub mod groups;
pub mod lookahead;
pub mod loss_scale;
pub mod schedule;
pub mod sgd;

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::ParamStore;

pub use adam::Adam;
pub use lookahead::Lookahead;
pub use loss_scale::LossScaled;
pub use sgd::Sgd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[value(rename_all = "lower")]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam with `weight_decay` as an L2 term in the gradient (`torch.optim.Adam`).
    Adam,
    /// Adam with decoupled weight decay (`torch.optim.AdamW`).
    AdamW,
    /// SGD with momentum, optionally Nesterov's (`torch.optim.SGD`).
    Sgd,
}

/// What an optimizer is built from: its section of a run's config (`Config::optim`).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// The peak learning rate; the schedule scales it per step.
    pub lr: f64,
    /// SGD momentum (PyTorch's, no dampening), and whether it is Nesterov's.
    pub momentum: f64,
    pub nesterov: bool,
    /// sgd and adam: an L2 term in the gradient; adamw: decoupled decay.
    pub weight_decay: f64,
    /// Adam's (beta1, beta2) and epsilon.
    pub betas: [f64; 2],
    pub eps: f64,
    /// The rates of every layer but the classifier and of BatchNorm's parameters, as shares of
    /// `lr` ([`groups`]).
    pub backbone_lr_scale: f64,
    pub norm_lr_scale: f64,
    /// Parameters trained for the first so many epochs only, by name.
    pub train_until: BTreeMap<String, usize>,
    /// Lookahead averaging, ending on the average after `epochs`.
    pub lookahead: bool,
    pub epochs: usize,
}

pub trait Optimizer {
    /// Applies one update to every parameter that has a gradient in `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    fn learning_rate(&self) -> f64;
    /// The rate for the next steps (a schedule sets it before every step).
    fn set_learning_rate(&mut self, lr: f64);
    /// Everything the optimizer has learnt so far, as named tensors (for checkpoints).
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores what [`Optimizer::state`] returned; names and shapes must match.
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
    /// The factor the loss is multiplied by before the backward pass ([`LossScaled`]), if any.
    fn loss_scale(&self) -> Option<f64> {
        None
    }
    /// The backward pass of `loss`, scaled by [`Optimizer::loss_scale`] where there is one (f16:
    /// small gradients survive); [`Optimizer::unscale`] readies the result for a step. It takes
    /// the loss so that the graph's tensors are freed as the pass goes (keep `loss.detach()` for
    /// its value). The sums and ReLU gates are kiln's kernels ([`crate::ops::GradKernels`]).
    fn backward(&self, loss: Tensor) -> Result<GradStore> {
        let loss = match self.loss_scale() {
            Some(scale) => {
                let scaled = loss.affine(scale, 0.0)?;
                drop(loss);
                scaled
            }
            None => loss,
        };
        Ok(loss.backward_consuming_with(&crate::ops::GradKernels)?)
    }
    /// Readies the backward pass's gradients for [`Optimizer::step`] (divides them by the loss
    /// scale); false where they overflowed, and the step is to be skipped.
    fn unscale(&mut self, _grads: &mut GradStore) -> Result<bool> {
        Ok(true)
    }
}

/// `state[name]`, checked to have `like`'s shape, moved to `like`'s device.
fn restore(state: &HashMap<String, Tensor>, name: &str, like: &Tensor) -> Result<Tensor> {
    let tensor = state
        .get(name)
        .ok_or_else(|| Error::CheckpointMismatch(format!("optimizer state {name} is missing")))?;
    if tensor.shape() != like.shape() {
        return Err(Error::CheckpointMismatch(format!(
            "optimizer state {name} has shape {:?}, the model needs {:?}",
            tensor.dims(),
            like.dims()
        )));
    }
    Ok(tensor.to_device(like.device())?.to_dtype(like.dtype())?)
}

/// The optimizer `config` asks for over the parameters in `store`, in the groups its keys ask for
/// ([`groups`]: `backbone_lr_scale`, `norm_lr_scale`, `train_until`), with lookahead averaging
/// on top where `lookahead` is set. `steps_per_epoch` turns epochs into steps.
pub fn build(
    config: &OptimizerConfig,
    store: &ParamStore,
    steps_per_epoch: usize,
) -> Result<Box<dyn Optimizer>> {
    let grouped = groups::build(config, store, steps_per_epoch)?;
    if !config.lookahead {
        return Ok(grouped);
    }
    let total = (config.epochs * steps_per_epoch) as u64;
    Ok(Box::new(Lookahead::new(grouped, store, total)?))
}

/// `optimizer` as training in `dtype` needs it: with dynamic loss scaling over `params` for f16
/// (PyTorch's GradScaler, its arguments in `scaling`), as it is otherwise.
pub fn for_precision(
    optimizer: Box<dyn Optimizer>,
    params: Vec<(String, Var)>,
    dtype: DType,
    scaling: loss_scale::Settings,
) -> Box<dyn Optimizer> {
    if dtype != DType::F16 {
        return optimizer;
    }
    let params = params.into_iter().map(|(_, var)| var).collect();
    Box::new(LossScaled::new(optimizer, params, scaling))
}

/// One optimizer of `config`'s kind over `params`, at `lr` and `weight_decay` as given.
fn single(
    config: &OptimizerConfig,
    params: Vec<(String, Var)>,
    lr: f64,
    weight_decay: f64,
) -> Result<Box<dyn Optimizer>> {
    Ok(match config.kind {
        OptimizerKind::Adam | OptimizerKind::AdamW => Box::new(Adam::new(
            params,
            adam::Settings {
                lr,
                beta1: config.betas[0],
                beta2: config.betas[1],
                eps: config.eps,
                weight_decay,
                decoupled: config.kind == OptimizerKind::AdamW,
            },
        )?),
        OptimizerKind::Sgd => Box::new(Sgd::new(
            params,
            sgd::Settings {
                lr,
                momentum: config.momentum,
                nesterov: config.nesterov,
                weight_decay,
            },
        )),
    })
}

/// Gradients of f(p) = sum(p^2), that is 2p: a problem whose every step is known in closed form.
#[cfg(test)]
fn quadratic_grads(p: &Var) -> GradStore {
    let f = p.as_tensor().sqr().and_then(|t| t.sum_all());
    f.and_then(|f| f.backward())
        .expect("the gradient of sum(p^2) exists")
}

#[cfg(test)]
mod tests {
    use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// The identity, as a graph node that says when the graph lets go of it.
    struct Marker(Arc<AtomicBool>);

    impl Drop for Marker {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl CustomOp1 for Marker {
        fn name(&self) -> &'static str {
            "marker"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            let values =
                s.as_slice::<f32>()?[l.start_offset()..][..l.shape().elem_count()].to_vec();
            Ok((CpuStorage::F32(values), l.shape().clone()))
        }
        fn bwd(
            &self,
            _: &Tensor,
            _: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<Option<Tensor>> {
            Ok(Some(grad.clone()))
        }
    }

    /// A gradient the pass computes for a constant (here the ones a plane's sum multiplies by, as
    /// the ResNet head does) is computed from the node's saved operand and records it; the walk
    /// never visits the constant, so the store kept it, and with it the whole forward graph,
    /// until the pass returned (resnet50's backward pass held 850 MiB more than PyTorch's).
    #[test]
    fn the_backward_pass_holds_no_forward_node_through_a_constant_s_gradient() {
        let dropped = Arc::new(AtomicBool::new(false));
        let x = Var::from_tensor(&Tensor::arange(0f32, 6.0, &Device::Cpu).unwrap()).unwrap();
        let y = x
            .as_tensor()
            .reshape((3, 2))
            .unwrap()
            .apply_op1(Marker(dropped.clone()))
            .unwrap();
        let ones = Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap();
        let loss = ones.matmul(&y).unwrap().sum_all().unwrap();
        drop(y);
        let grads = loss
            .backward_consuming_with(&crate::ops::GradKernels)
            .unwrap();
        assert!(
            dropped.load(Ordering::SeqCst),
            "a gradient in the store still holds the forward graph"
        );
        // d(sum of ones·y)/dy is 1 everywhere.
        let grad = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(grad, vec![1.0; 6]);
        // The constant's own gradient is kept, detached: each row's sum.
        let to_ones = grads.get(&ones).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(to_ones, vec![vec![1.0, 5.0, 9.0]]);
    }
}
