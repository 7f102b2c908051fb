//! Parameter groups, as PyTorch's `param_groups`: parameters that train at a multiple of the
//! scheduled rate, with their own weight decay, or only for the first epochs. A config asks
//! for them with three keys:
//!
//! - `backbone_lr_scale`: every parameter but the classifier's (`fc.*`) at this share of the
//!   rate (fine-tuning; 0 leaves them out: frozen);
//! - `norm_lr_scale`: BatchNorm's parameters (those of a layer that keeps running statistics)
//!   at this multiple of the rate, their weight decay divided by it, so that the decay itself
//!   (rate times decay) stays as for the rest (airbench's `bias_scaler`);
//! - `train_until`: named parameters trained for the first so many epochs, then left as they
//!   are, as `requires_grad = False` leaves them in PyTorch (airbench's whitening bias).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::{restore, single, Optimizer, OptimizerConfig};
use crate::error::{Error, Result};
use crate::models::{ParamStore, HEAD};

/// The state's name in checkpoints: the steps taken, which `train_until` counts against.
const STEPS: &str = "groups/steps";

/// What sets a group apart.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Terms {
    lr_scale: f64,
    decay_scale: f64,
    /// Trained for steps 0..until only.
    until: Option<u64>,
}

struct Group {
    optimizer: Box<dyn Optimizer>,
    terms: Terms,
}

/// Several optimizers of one kind stepping together, one per group.
pub struct Groups {
    groups: Vec<Group>,
    lr: f64,
    steps: u64,
}

/// The optimizer over `store`'s parameters that `config` asks for: one optimizer when every
/// parameter is alike (its state named as it always was), else [`Groups`].
pub fn build(
    config: &OptimizerConfig,
    store: &ParamStore,
    steps_per_epoch: usize,
) -> Result<Box<dyn Optimizer>> {
    let params = store.vars();
    for name in config.train_until.keys() {
        if !params.iter().any(|(n, _)| n == name) {
            let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
            return Err(Error::InvalidSetting(format!(
                "train_until names {name}, which the model does not have; its parameters are {}",
                names.join(", ")
            )));
        }
    }
    let buffers: Vec<String> = store.buffers().into_iter().map(|(n, _)| n).collect();
    let is_norm = |name: &str| {
        let layer = name.rsplit_once('.').map_or("", |(layer, _)| layer);
        buffers.contains(&format!("{layer}.running_mean"))
    };
    let mut grouped: Vec<(Terms, Vec<(String, Var)>)> = Vec::new();
    for (name, var) in params {
        let head = name.starts_with(&format!("{HEAD}."));
        let mut terms = Terms {
            lr_scale: 1.0,
            decay_scale: 1.0,
            until: config
                .train_until
                .get(&name)
                .map(|&epochs| (epochs * steps_per_epoch) as u64),
        };
        if !head {
            if config.backbone_lr_scale == 0.0 {
                continue;
            }
            terms.lr_scale *= config.backbone_lr_scale;
        }
        if is_norm(&name) {
            terms.lr_scale *= config.norm_lr_scale;
            terms.decay_scale /= config.norm_lr_scale;
        }
        match grouped.iter_mut().find(|(t, _)| *t == terms) {
            Some((_, members)) => members.push((name, var)),
            None => grouped.push((terms, vec![(name, var)])),
        }
    }
    let plain = Terms {
        lr_scale: 1.0,
        decay_scale: 1.0,
        until: None,
    };
    if let [(terms, _)] = grouped.as_slice() {
        if *terms == plain {
            let (_, params) = grouped.remove(0);
            return single(config, params, config.lr, config.weight_decay);
        }
    }
    let groups = grouped
        .into_iter()
        .map(|(terms, params)| {
            let optimizer = single(
                config,
                params,
                config.lr * terms.lr_scale,
                config.weight_decay * terms.decay_scale,
            )?;
            Ok(Group { optimizer, terms })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Box::new(Groups {
        groups,
        lr: config.lr,
        steps: 0,
    }))
}

impl Optimizer for Groups {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        for group in &mut self.groups {
            if group.terms.until.is_none_or(|until| self.steps < until) {
                group.optimizer.step(grads)?;
            }
        }
        self.steps += 1;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
        for group in &mut self.groups {
            group.optimizer.set_learning_rate(lr * group.terms.lr_scale);
        }
    }

    // Parameter names differ between the groups, so their states share one namespace; what
    // several groups hold alike (Adam's step count: they step together) is kept once.
    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut state = vec![(
            STEPS.to_string(),
            Tensor::new(&[self.steps as f64], &candle_core::Device::Cpu)?,
        )];
        for group in &self.groups {
            for (name, tensor) in group.optimizer.state()? {
                if !state.iter().any(|(n, _)| *n == name) {
                    state.push((name, tensor));
                }
            }
        }
        Ok(state)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let like = Tensor::new(&[0f64], &candle_core::Device::Cpu)?;
        // Checkpoints from before the count was kept had no group that stops.
        let steps = match state.get(STEPS) {
            Some(_) => restore(state, STEPS, &like)?.to_vec1::<f64>()?[0] as u64,
            None => 0,
        };
        for group in &mut self.groups {
            group.optimizer.load_state(state)?;
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, Config, Overrides};
    use crate::models::{build as build_model, Architecture, Stem};
    use candle_core::Device;

    /// A fastnet of width 4 and its recipe's optimizer; `edit` adjusts the config first.
    fn fastnet(edit: impl Fn(&mut Config)) -> (ParamStore, Box<dyn Optimizer>) {
        let (spec, mut config) = resolve(Some("fastnet"), None, &Overrides::default()).unwrap();
        config.lookahead = false;
        edit(&mut config);
        let arch = Architecture::new(10, 32, Stem::Auto, 4).unwrap();
        let built = build_model(spec, &arch, 0, &Device::Cpu).unwrap();
        let optimizer = build(&config.optim(), &built.params, 2).unwrap();
        (built.params, optimizer)
    }

    /// One step with every gradient 1: how far each parameter moved.
    fn moves(store: &ParamStore, optimizer: &mut dyn Optimizer) -> HashMap<String, f32> {
        let before: Vec<(String, Vec<f32>)> = store
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        let mut grads = GradStore::default();
        for (_, var) in store.vars() {
            grads.insert(var.as_tensor(), var.as_tensor().ones_like().unwrap());
        }
        optimizer.step(&grads).unwrap();
        before
            .into_iter()
            .zip(store.vars())
            .map(|((name, old), (_, var))| {
                let new: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let moved = old
                    .iter()
                    .zip(&new)
                    .map(|(a, b)| (a - b).abs())
                    .sum::<f32>();
                (name, moved / old.len() as f32)
            })
            .collect()
    }

    #[test]
    fn norm_parameters_step_further_and_train_until_stops_a_parameter() {
        // No momentum or decay: a step moves each parameter by its rate times 1.
        let (store, mut optimizer) = fastnet(|c| {
            c.momentum = 0.0;
            c.nesterov = false;
            c.weight_decay = 0.0;
            c.lr = 0.5;
        });
        optimizer.set_learning_rate(0.01);
        // The recipe trains 0.bias for 3 epochs: 6 steps of 2 per epoch here.
        for step in 0..8 {
            let moved = moves(&store, optimizer.as_mut());
            let near = |name: &str, want: f32| {
                let got = moved[name];
                assert!((got - want).abs() < 1e-6, "step {step}: {name} moved {got}");
            };
            near("2.conv1.weight", 0.01);
            near("7.weight", 0.01);
            near("3.norm2.bias", 0.64);
            near("0.bias", if step < 6 { 0.01 } else { 0.0 });
        }
        let state: HashMap<String, Tensor> = optimizer.state().unwrap().into_iter().collect();
        assert_eq!(state[STEPS].to_vec1::<f64>().unwrap(), [8.0]);
    }

    #[test]
    fn norm_weight_decay_is_divided_by_the_rate_multiple() {
        let (store, mut optimizer) = fastnet(|c| {
            c.momentum = 0.0;
            c.nesterov = false;
            c.weight_decay = 0.5;
            c.train_until.clear();
        });
        optimizer.set_learning_rate(0.1);
        let bias = |store: &ParamStore| {
            let var = store.vars().into_iter().find(|(n, _)| n == "2.norm1.bias");
            var.unwrap().1
        };
        bias(&store)
            .set(&bias(&store).as_tensor().ones_like().unwrap())
            .unwrap();
        let mut grads = GradStore::default();
        let b = bias(&store);
        grads.insert(b.as_tensor(), b.as_tensor().zeros_like().unwrap());
        optimizer.step(&grads).unwrap();
        // p - lr * 64 * (0 + decay / 64 * p): the decay of any other parameter.
        let got = b.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((got - (1.0 - 0.1 * 0.5)).abs() < 1e-6, "{got}");
    }

    #[test]
    fn a_train_until_name_the_model_lacks_is_a_clear_error() {
        let (spec, mut config) = resolve(Some("fastnet"), None, &Overrides::default()).unwrap();
        config.train_until.insert("0.bais".into(), 3);
        let arch = Architecture::new(10, 32, Stem::Auto, 4).unwrap();
        let built = build_model(spec, &arch, 0, &Device::Cpu).unwrap();
        let err = build(&config.optim(), &built.params, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("0.bais") && err.contains("0.bias"), "{err}");
    }

    #[test]
    fn one_plain_group_keeps_the_plain_optimizers_state_names() {
        let (spec, config) = resolve(Some("resnet18"), None, &Overrides::default()).unwrap();
        let arch = Architecture::new(10, 32, Stem::Auto, 4).unwrap();
        let built = build_model(spec, &arch, 0, &Device::Cpu).unwrap();
        let mut optimizer = build(&config.optim(), &built.params, 2).unwrap();
        moves(&built.params, optimizer.as_mut());
        let names: Vec<String> = optimizer
            .state()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert!(!names.iter().any(|n| n == STEPS));
        assert!(names.iter().all(|n| n.starts_with("momentum_buffer/")));
    }
}
