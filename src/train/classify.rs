//! Image classification: epochs of shuffled mini-batches, cross-entropy, an evaluation on the
//! test set after each epoch; weights, checkpoints and metrics written to the run directory as
//! it goes, so a run can stop at any moment and continue exactly.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Var};

use super::{rng, Stream};
use crate::checkpoint::{self, Checkpoint, Progress, RunDir, Snapshot};
use crate::config::Config;
use crate::data::batches::{batch_ranges, epoch_order, BatchBuffer, DeviceSet};
use crate::data::cifar::{MEAN, STD};
use crate::data::DataSets;
use crate::error::{Error, Result};
use crate::evaluate::evaluate;
use crate::metrics::{self, EpochRecord, Tally};
use crate::models::{self, ModelSpec};
use crate::ops::cross_entropy;
use crate::optim::{self, Optimizer};
use crate::plots;
use crate::profile::{Phase, PhaseTimer};
use crate::report::{Reporter, RunSummary};

/// How often (in steps) the progress bar reads the running loss back from the device.
const PROGRESS_EVERY: usize = 20;

/// Where a run's parameters come from.
pub enum Start {
    /// The model's seeded initialisation.
    Fresh,
    /// A weights file with PyTorch names (`--init-weights`).
    Weights(PathBuf),
    /// A checkpoint: weights, optimizer state and position (`--resume`).
    Resume(PathBuf, Box<Checkpoint>),
}

pub struct Options {
    /// Also checkpoint every N steps within epochs.
    pub checkpoint_every: Option<usize>,
    /// End-of-epoch checkpoints to keep.
    pub keep: usize,
    /// Set (by a signal handler) to stop after the current step, with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// A run not resumed from a checkpoint may replace an earlier run in its directory.
    pub overwrite: bool,
    /// Tracing is recording (`--trace`): phases wait for the device, so spans time real work.
    pub trace: bool,
    pub reporter: Reporter,
}

pub enum Outcome {
    Finished(RunSummary),
    /// The run had already done every epoch asked for.
    AlreadyDone {
        epochs: usize,
    },
    /// Stopped on request; the run continues from `checkpoint`.
    Interrupted {
        checkpoint: PathBuf,
    },
}

/// Trains `spec` on `data` as `config` says, writing into `run_dir`.
pub fn run(
    spec: &ModelSpec,
    config: &Config,
    data: DataSets,
    device: &Device,
    run_dir: &RunDir,
    start: Start,
    options: &Options,
) -> Result<Outcome> {
    let built = models::build(spec, config.seed, device)?;
    let params = built.params.vars();
    let mut optimizer = optim::build(config, params.clone())?;
    // Everything is loaded and checked before the run directory is touched, so a bad input
    // never costs an earlier run its files.
    let (mut progress, mut resumed_tally) = match start {
        Start::Fresh => (Progress::default(), None),
        Start::Weights(path) => {
            let weights = checkpoint::load_weights(&path, device)?;
            checkpoint::assign(&params, &weights.tensors, &path)?;
            (Progress::default(), None)
        }
        Start::Resume(path, saved) => {
            checkpoint::assign(&params, &saved.weights, &path)?;
            optimizer.load_state(&saved.optimizer)?;
            let tally = Tally::from_state(&saved.tally, saved.tally_seen, device)?;
            (saved.progress, Some(tally))
        }
    };
    if progress.global_step == 0 {
        run_dir.start_fresh(options.overwrite)?;
    } else if progress.epochs_done >= config.epochs {
        return Ok(Outcome::AlreadyDone {
            epochs: progress.epochs_done,
        });
    } else {
        run_dir.create_dirs()?;
    }
    checkpoint::write_atomic(&run_dir.config(), config.to_toml().as_bytes())?;
    if !progress.history.is_empty() {
        // The checkpoint's history is the truth: rows written after it was taken are dropped.
        checkpoint::write_atomic(&run_dir.metrics(), progress.history.as_bytes())?;
    }
    let reporter = options.reporter;
    reporter.note(&format!(
        "training {} on {} images ({} test), epochs {}..={}, batch {}, {} lr {}; writing to {}",
        spec.name,
        data.train.len(),
        data.test.len(),
        progress.epochs_done + 1,
        config.epochs,
        config.batch_size,
        config.optimizer,
        config.lr,
        run_dir.path().display()
    ));

    let trainer = Trainer {
        spec,
        config,
        device,
        run_dir,
        params: &params,
        options,
    };
    // The whole data set lives where training runs; batches are cut from it there.
    let train_set = DeviceSet::new(data.train, device)?;
    let test_set = DeviceSet::new(data.test, device)?;
    let (mut train_buffer, mut test_buffer) = (BatchBuffer::default(), BatchBuffer::default());
    let started = Instant::now();
    let first_epoch = progress.epochs_done + 1;
    let (mut images_trained, mut train_seconds_total) = (0usize, 0f64);
    let mut phases = PhaseTimer::new(device, options.trace);
    // Phase shares are honest on the CPU, or on a GPU when phases wait for it.
    let show_phases = options.trace || device.is_cpu();
    for epoch in first_epoch..=config.epochs {
        let _epoch_span = tracing::info_span!("epoch", epoch).entered();
        phases.reset();
        let epoch_start = Instant::now();
        let mut order_rng = rng(config.seed, Stream::Shuffle, epoch);
        let order = epoch_order(train_set.len(), config.shuffle.then_some(&mut order_rng));
        let order = train_set.order(&order)?;
        let skip = progress.steps_into_epoch;
        let mut tally = match resumed_tally.take() {
            Some(tally) if skip > 0 => tally,
            _ => Tally::default(),
        };
        let seen_before = tally.seen();
        let bar = reporter.epoch_bar(epoch, config.epochs, train_set.len());
        let batches = batch_ranges(train_set.len(), config.batch_size);
        for (step, range) in batches.enumerate().skip(skip) {
            let _step_span = tracing::info_span!("step", step = progress.global_step + 1).entered();
            let (images, labels) = phases.time(Phase::Data, || {
                train_set.batch(&order, range, &mut train_buffer)
            })?;
            let (logits, loss) = phases.time(Phase::Forward, || {
                let logits = built.module.forward(&images)?;
                let loss = cross_entropy(&logits, &labels)?;
                Ok((logits, loss))
            })?;
            let grads = phases.time(Phase::Backward, || Ok(loss.backward()?))?;
            phases.time(Phase::Optimizer, || optimizer.step(&grads))?;
            tally.add(&loss, &logits, &labels)?;
            progress.steps_into_epoch = step + 1;
            progress.global_step += 1;

            let stop = options.stop.load(Ordering::SeqCst);
            let due = options
                .checkpoint_every
                .is_some_and(|n| progress.global_step % n as u64 == 0);
            if stop || due {
                let path = phases.time(Phase::Checkpoint, || {
                    trainer.save_checkpoint(&progress, optimizer.as_ref(), &tally)
                })?;
                if stop {
                    bar.finish();
                    return Ok(Outcome::Interrupted { checkpoint: path });
                }
            }
            if bar.is_visible() && (step + 1) % PROGRESS_EVERY == 0 {
                let (loss, _) = tally.read()?;
                let rate =
                    (tally.seen() - seen_before) as f64 / epoch_start.elapsed().as_secs_f64();
                bar.update(tally.seen(), loss, rate);
            }
        }
        let (train_loss, train_acc) = tally.read()?;
        if !train_loss.is_finite() {
            return Err(Error::InvalidSetting(format!(
                "training diverged in epoch {epoch} (loss {train_loss}); try a smaller --lr"
            )));
        }
        let train_seconds = epoch_start.elapsed().as_secs_f64();
        bar.finish();
        images_trained += tally.seen() - seen_before;
        train_seconds_total += train_seconds;

        let eval = phases.time(Phase::Evaluate, || {
            evaluate(
                built.module.as_ref(),
                &test_set,
                config.eval_batch_size,
                &mut test_buffer,
            )
        })?;
        let record = EpochRecord {
            epoch,
            train_loss,
            train_acc,
            test_loss: eval.loss,
            test_acc: eval.accuracy(),
            seconds: epoch_start.elapsed().as_secs_f64(),
            images_per_s: (tally.seen() - seen_before) as f64 / train_seconds,
            lr: optimizer.learning_rate(),
        };
        let is_best = progress.best.is_none_or(|(_, acc)| record.test_acc > acc);
        // Weights first, then the checkpoint that records them, then the history it holds:
        // a run killed between any two of these redoes the epoch and writes the same files.
        let path = phases.time(Phase::Checkpoint, || {
            let metadata = weights_metadata(spec, epoch);
            checkpoint::save_weights(&run_dir.last(), &params, metadata.clone())?;
            if is_best {
                checkpoint::save_weights(&run_dir.best(), &params, metadata)?;
                progress.best = Some((epoch, record.test_acc));
            }
            record.push_to(&mut progress.history);
            progress.epochs_done = epoch;
            progress.steps_into_epoch = 0;
            let path = trainer.save_checkpoint(&progress, optimizer.as_ref(), &Tally::default())?;
            checkpoint::write_atomic(&run_dir.metrics(), progress.history.as_bytes())?;
            Ok(path)
        })?;
        let history = EpochRecord::parse_history(&progress.history);
        if let Err(err) =
            plots::metrics_png(&run_dir.plot(), &history, progress.best.map(|(e, _)| e))
        {
            // A picture that cannot be drawn is worth a warning, not the run.
            tracing::warn!("{err}");
        }
        tracing::info!(epoch, phases = %phases.shares(), "time per phase");
        reporter.epoch(
            &record,
            config.epochs,
            is_best,
            show_phases.then_some(&phases),
        );
        if options.stop.load(Ordering::SeqCst) && epoch < config.epochs {
            return Ok(Outcome::Interrupted { checkpoint: path });
        }
    }
    let (best_epoch, best_accuracy) = progress.best.unwrap_or((0, f64::NAN));
    Ok(Outcome::Finished(RunSummary {
        epochs: config.epochs,
        trained_here: first_epoch..=config.epochs,
        best_epoch,
        best_accuracy,
        seconds: started.elapsed().as_secs_f64(),
        mean_images_per_s: images_trained as f64 / train_seconds_total.max(1e-9),
        peak_rss_bytes: metrics::peak_rss_bytes(),
        device_memory_bytes: crate::device::peak_memory(device),
        last: run_dir.last(),
        best: run_dir.best(),
        plot: run_dir.plot(),
        checkpoints: run_dir.checkpoints(),
    }))
}

/// What the loop needs to write a checkpoint, gathered once.
struct Trainer<'a> {
    spec: &'a ModelSpec,
    config: &'a Config,
    device: &'a Device,
    run_dir: &'a RunDir,
    params: &'a [(String, Var)],
    options: &'a Options,
}

impl Trainer<'_> {
    fn save_checkpoint(
        &self,
        progress: &Progress,
        optimizer: &dyn Optimizer,
        tally: &Tally,
    ) -> Result<PathBuf> {
        let path = self.run_dir.checkpoint_path(progress);
        checkpoint::save_checkpoint(
            &path,
            Snapshot {
                model: self.spec.name,
                config: self.config,
                device: &crate::device::describe(self.device),
                progress,
                params: self.params,
                optimizer: optimizer.state()?,
                tally: tally.state()?,
                tally_seen: tally.seen(),
            },
        )?;
        // Keeps --keep epoch checkpoints, and no mid-epoch one older than this.
        self.run_dir.prune_checkpoints(self.options.keep)?;
        tracing::info!(path = %path.display(), "checkpoint written");
        Ok(path)
    }
}

/// What a reader of a weights file needs to reproduce kiln's predictions.
pub fn weights_metadata(spec: &ModelSpec, epoch: usize) -> BTreeMap<String, String> {
    let list = |v: &[f32]| v.iter().map(f32::to_string).collect::<Vec<_>>().join(",");
    BTreeMap::from([
        ("model".to_string(), spec.name.to_string()),
        ("epoch".to_string(), epoch.to_string()),
        (
            "input".to_string(),
            "float32 [N,3,32,32], RGB scaled to [0,1] then normalised".to_string(),
        ),
        ("normalize_mean".to_string(), list(&MEAN)),
        ("normalize_std".to_string(), list(&STD)),
    ])
}
