//! Image classification: epochs of shuffled mini-batches, cross-entropy, an evaluation on the
//! test set after each epoch, metrics and weights written to the run directory as it goes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;

use super::{rng, Stream};
use crate::checkpoint::{self, RunDir};
use crate::config::Config;
use crate::data::cifar::{Cifar10, MEAN, STD};
use crate::error::{Error, Result};
use crate::evaluate::evaluate;
use crate::metrics::{EpochRecord, Tally};
use crate::models::{self, ModelSpec};
use crate::optim;
use crate::progress::{self, EpochProgress};

/// How often (in steps) the progress bar reads the running loss back from the device.
const PROGRESS_EVERY: usize = 20;

pub struct Summary {
    pub epochs: usize,
    pub best_accuracy: f64,
    pub best_epoch: usize,
    pub last: PathBuf,
    pub best: PathBuf,
    pub seconds: f64,
}

/// Trains `spec` on `data` as `config` says, writing into `run_dir`.
pub fn run(
    spec: &ModelSpec,
    config: &Config,
    data: &Cifar10,
    device: &Device,
    run_dir: &RunDir,
) -> Result<Summary> {
    let built = models::build(spec, config.seed, device)?;
    let params = built.params.vars();
    let mut optimizer = optim::build(config, params.clone())?;
    let mut shuffle_rng = rng(config.seed, Stream::Shuffle);
    checkpoint::write_atomic(&run_dir.config(), config.to_toml().as_bytes())?;
    println!(
        "training {} on {} images ({} test), {} epochs, batch {}, {} lr {}; writing to {}",
        spec.name,
        data.train.len(),
        data.test.len(),
        config.epochs,
        config.batch_size,
        config.optimizer,
        config.lr,
        run_dir.path().display()
    );

    let started = Instant::now();
    let mut best: Option<(usize, f64)> = None;
    for epoch in 1..=config.epochs {
        let epoch_start = Instant::now();
        let order = data.train.epoch_order(config.shuffle.then_some(&mut shuffle_rng));
        let progress = EpochProgress::start(epoch, config.epochs, order.len());
        let mut tally = Tally::default();
        for (step, indices) in order.chunks(config.batch_size).enumerate() {
            let (images, labels) = data.train.batch(indices, device)?;
            let logits = built.module.forward(&images)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            let grads = loss.backward()?;
            optimizer.step(&grads)?;
            tally.add(&loss, &logits, &labels)?;
            if progress.is_visible() && (step + 1) % PROGRESS_EVERY == 0 {
                let (loss, _) = tally.read()?;
                let rate = tally.seen() as f64 / epoch_start.elapsed().as_secs_f64();
                progress.update(tally.seen(), loss, rate);
            }
        }
        let (train_loss, train_acc) = tally.read()?;
        if !train_loss.is_finite() {
            return Err(Error::InvalidSetting(format!(
                "training diverged in epoch {epoch} (loss {train_loss}); try a smaller --lr"
            )));
        }
        let train_seconds = epoch_start.elapsed().as_secs_f64();
        progress.finish();

        let eval = evaluate(built.module.as_ref(), &data.test, device, config.eval_batch_size)?;
        let record = EpochRecord {
            epoch,
            train_loss,
            train_acc,
            test_loss: eval.loss,
            test_acc: eval.accuracy(),
            seconds: epoch_start.elapsed().as_secs_f64(),
            images_per_s: order.len() as f64 / train_seconds,
            lr: optimizer.learning_rate(),
        };
        let is_best = best.is_none_or(|(_, acc)| record.test_acc > acc);
        let metadata = weights_metadata(spec, epoch);
        checkpoint::save_weights(&run_dir.last(), &params, metadata.clone())?;
        if is_best {
            checkpoint::save_weights(&run_dir.best(), &params, metadata)?;
            best = Some((epoch, record.test_acc));
        }
        record.append_to(&run_dir.metrics())?;
        println!("{}", progress::epoch_line(&record, config.epochs, is_best));
    }
    let (best_epoch, best_accuracy) = best.unwrap_or((0, f64::NAN));
    Ok(Summary {
        epochs: config.epochs,
        best_accuracy,
        best_epoch,
        last: run_dir.last(),
        best: run_dir.best(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// What a reader of a weights file needs to reproduce kiln's predictions.
fn weights_metadata(spec: &ModelSpec, epoch: usize) -> HashMap<String, String> {
    let list = |v: &[f32]| v.iter().map(f32::to_string).collect::<Vec<_>>().join(",");
    HashMap::from([
        ("model".to_string(), spec.name.to_string()),
        ("epoch".to_string(), epoch.to_string()),
        ("input".to_string(), "float32 [N,3,32,32], RGB scaled to [0,1] then normalised".to_string()),
        ("normalize_mean".to_string(), list(&MEAN)),
        ("normalize_std".to_string(), list(&STD)),
    ])
}
