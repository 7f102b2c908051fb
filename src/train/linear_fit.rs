//! The set-up check: fit y = 3x + 2 + 0.1·N(0,1) on 100 points x ~ U(0,1) with MSE.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::StandardNormal;

use super::{rng, Stream};
use crate::config::Config;
use crate::error::Result;
use crate::models::{self, ModelSpec};
use crate::optim;

pub const POINTS: usize = 100;
pub const TRUE_WEIGHT: f32 = 3.0;
pub const TRUE_BIAS: f32 = 2.0;

pub struct Fit {
    pub weight: f32,
    pub bias: f32,
    pub final_loss: f32,
}

impl Fit {
    /// The tolerances at which the fit counts as the expected one (PyTorch lands near
    /// w=2.81, b=2.10 with the same recipe, not fully converged).
    pub fn looks_right(&self) -> bool {
        (self.weight - TRUE_WEIGHT).abs() < 0.3 && (self.bias - TRUE_BIAS).abs() < 0.2
    }
}

pub fn run(spec: &ModelSpec, config: &Config, device: &Device) -> Result<Fit> {
    let mut data_rng = rng(config.seed, Stream::Data, 0);
    let xs: Vec<f32> = (0..POINTS).map(|_| data_rng.random::<f32>()).collect();
    let ys: Vec<f32> = xs
        .iter()
        .map(|x| TRUE_WEIGHT * x + TRUE_BIAS + 0.1 * data_rng.sample::<f32, _>(StandardNormal))
        .collect();
    let x = Tensor::from_vec(xs, (POINTS, 1), device)?;
    let y = Tensor::from_vec(ys, (POINTS, 1), device)?;

    // One input, one output: no image size, classes or stem to speak of.
    let arch = models::Architecture {
        num_classes: 1,
        image_size: 1,
        stem: models::Stem::Cifar,
        width: 1,
        memory_format: None,
    };
    let built = models::build(spec, &arch, config.seed, device)?;
    let mut optimizer = optim::build(
        &config.optim(),
        &built.params,
        POINTS.div_ceil(config.batch_size),
    )?;
    let mut shuffle_rng = rng(config.seed, Stream::Shuffle, 0);
    let mut final_loss = f32::NAN;
    for epoch in 1..=config.epochs {
        let mut order: Vec<u32> = (0..POINTS as u32).collect();
        if config.shuffle {
            order.shuffle(&mut shuffle_rng);
        }
        for chunk in order.chunks(config.batch_size) {
            let idx = Tensor::from_slice(chunk, chunk.len(), device)?;
            let prediction = built.module.forward_t(&x.index_select(&idx, 0)?, true)?;
            let loss = candle_nn::loss::mse(&prediction, &y.index_select(&idx, 0)?)?;
            optimizer.step(&loss.backward()?)?;
            final_loss = loss.to_scalar::<f32>()?;
        }
        if epoch % 50 == 0 || epoch == config.epochs {
            tracing::info!(epoch, loss = final_loss, "linear fit");
        }
    }
    let params = built.params.vars();
    let scalar = |name: &str| -> Result<f32> {
        match params.iter().find(|(n, _)| n == name) {
            Some((_, var)) => Ok(var.sum_all()?.to_scalar::<f32>()?),
            None => Err(
                candle_core::Error::Msg(format!("{} has no parameter {name}", spec.name)).into(),
            ),
        }
    };
    Ok(Fit {
        weight: scalar("weight")?,
        bias: scalar("bias")?,
        final_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, Overrides};

    #[test]
    fn lands_near_three_and_two_for_any_seed() {
        for seed in 0..20 {
            let overrides = Overrides {
                seed: Some(seed),
                ..Default::default()
            };
            let (spec, config) = resolve(Some("linear"), None, &overrides).unwrap();
            let fit = run(spec, &config, &Device::Cpu).unwrap();
            assert!(
                fit.looks_right(),
                "seed {seed}: weight {} bias {}",
                fit.weight,
                fit.bias
            );
            assert!(
                fit.final_loss < 0.03,
                "seed {seed}: loss {}",
                fit.final_loss
            );
        }
    }
}
