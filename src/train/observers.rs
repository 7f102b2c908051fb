//! What watches a run and acts on it, each an [`Observer`] of the loop: checkpoints and weights
//! files, the metrics history and its plot, early stopping, and the console (progress bar,
//! epoch lines, summary).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::fit::{Control, EpochEnd, Observer, RunView, Summary};
use crate::checkpoint::{self, RunDir, Snapshot};
use crate::error::Result;
use crate::metrics::{self, EpochRecord};
use crate::plots;
use crate::report::{EpochProgress, Reporter, RunSummary};

/// Writes checkpoints (every N steps if asked, after every epoch, and when the run is
/// interrupted), `last.safetensors` after every epoch and `best.safetensors` after the best.
pub struct Checkpointer<'a> {
    pub run_dir: &'a RunDir,
    pub model: &'a str,
    /// The device trained on, as `device::describe` puts it.
    pub device: String,
    /// What every weights file records besides its epoch (see `classify::weights_metadata`).
    pub metadata: BTreeMap<String, String>,
    /// The data's class names, recorded in checkpoints so a resume can check them.
    pub classes: Vec<String>,
    /// The input normalisation, recorded in checkpoints so a resume keeps it.
    pub stats: crate::data::ChannelStats,
    pub every_steps: Option<u64>,
    /// End-of-epoch checkpoints to keep.
    pub keep: usize,
    /// The newest checkpoint written.
    pub last_written: Option<PathBuf>,
}

impl Checkpointer<'_> {
    fn save(&mut self, run: &RunView) -> Result<()> {
        let path = self.run_dir.checkpoint_path(run.progress);
        checkpoint::save_checkpoint(
            &path,
            Snapshot {
                model: self.model,
                config: run.config,
                device: &self.device,
                progress: run.progress,
                params: &run.state.state(),
                optimizer: run.optimizer.state()?,
                tally: run.tally.state()?,
                tally_seen: run.tally.seen(),
                classes: &self.classes,
                stats: &self.stats,
            },
        )?;
        // Keeps --keep epoch checkpoints, and no mid-epoch one older than this.
        self.run_dir.prune_checkpoints(self.keep)?;
        tracing::info!(path = %path.display(), "checkpoint written");
        self.last_written = Some(path);
        Ok(())
    }
}

impl Observer for Checkpointer<'_> {
    fn step_ended(&mut self, run: &RunView, _: f64) -> Result<()> {
        let due = self
            .every_steps
            .is_some_and(|n| run.progress.global_step.is_multiple_of(n));
        if due {
            self.save(run)?;
        }
        Ok(())
    }

    fn epoch_ended(&mut self, end: &EpochEnd, run: &RunView) -> Result<Control> {
        // Weights first, then the checkpoint that records them: a run killed between the two
        // redoes the epoch and writes the same files.
        let mut metadata = self.metadata.clone();
        metadata.insert("epoch".into(), end.record.epoch.to_string());
        let state = run.state.state();
        checkpoint::save_weights(&self.run_dir.last(), &state, metadata.clone())?;
        if end.best {
            checkpoint::save_weights(&self.run_dir.best(), &state, metadata)?;
        }
        self.save(run)?;
        Ok(Control::Continue)
    }

    fn interrupted(&mut self, run: &RunView) -> Result<()> {
        self.save(run)
    }
}

/// `metrics.csv` (rewritten from the run's history, which checkpoints hold) and `metrics.png`.
pub struct MetricsLog<'a> {
    pub run_dir: &'a RunDir,
}

impl Observer for MetricsLog<'_> {
    fn started(&mut self, run: &RunView) -> Result<Control> {
        if !run.progress.history.is_empty() {
            // The checkpoint's history is the truth: rows written after it was taken are dropped.
            crate::fs::write_atomic(&self.run_dir.metrics(), run.progress.history.as_bytes())?;
        }
        Ok(Control::Continue)
    }

    fn epoch_ended(&mut self, _: &EpochEnd, run: &RunView) -> Result<Control> {
        crate::fs::write_atomic(&self.run_dir.metrics(), run.progress.history.as_bytes())?;
        let history = EpochRecord::parse_history(&run.progress.history);
        let best = run.progress.best.map(|(epoch, _)| epoch);
        if let Err(err) = plots::metrics_png(&self.run_dir.plot(), &history, best) {
            // A picture that cannot be drawn is worth a warning, not the run.
            tracing::warn!("{err}");
        }
        Ok(Control::Continue)
    }
}

/// Ends the run once the test accuracy has not improved for `patience` epochs.
pub struct EarlyStopping {
    pub patience: usize,
}

impl EarlyStopping {
    fn verdict(&self, run: &RunView) -> Control {
        let Some((best_epoch, accuracy)) = run.progress.best else {
            return Control::Continue;
        };
        let since = run.progress.epochs_done.saturating_sub(best_epoch);
        if self.patience > 0 && since >= self.patience {
            Control::Stop(format!(
                "no better test accuracy for {since} epochs (best {accuracy:.4} at epoch {best_epoch}; --early-stop {})",
                self.patience
            ))
        } else {
            Control::Continue
        }
    }
}

impl Observer for EarlyStopping {
    /// A resumed run that had already stopped early stays stopped.
    fn started(&mut self, run: &RunView) -> Result<Control> {
        Ok(self.verdict(run))
    }

    fn epoch_ended(&mut self, _: &EpochEnd, run: &RunView) -> Result<Control> {
        Ok(self.verdict(run))
    }
}

/// How often (in steps) the progress bar reads the running loss back from the device.
const PROGRESS_EVERY: usize = 20;

/// What a person or a script sees: a progress bar per epoch, a line per epoch, a summary.
pub struct Console<'a> {
    pub reporter: Reporter,
    pub run_dir: &'a RunDir,
    pub device: candle_core::Device,
    pub train_images: usize,
    bar: Option<EpochProgress>,
    /// Images the epoch's tally had seen when this process started it (a resumed epoch's
    /// earlier part was trained by another process).
    seen_before: usize,
}

impl<'a> Console<'a> {
    pub fn new(
        reporter: Reporter,
        run_dir: &'a RunDir,
        device: &candle_core::Device,
        train_images: usize,
    ) -> Self {
        Self {
            reporter,
            run_dir,
            device: device.clone(),
            train_images,
            bar: None,
            seen_before: 0,
        }
    }
}

impl Observer for Console<'_> {
    fn epoch_started(&mut self, epoch: usize, run: &RunView) -> Result<()> {
        self.seen_before = run.tally.seen();
        self.bar = Some(
            self.reporter
                .epoch_bar(epoch, run.config.epochs, self.train_images),
        );
        Ok(())
    }

    fn step_ended(&mut self, run: &RunView, seconds: f64) -> Result<()> {
        let Some(bar) = &self.bar else {
            return Ok(());
        };
        if bar.is_visible() && run.progress.steps_into_epoch.is_multiple_of(PROGRESS_EVERY) {
            let (loss, _) = run.tally.read()?;
            let rate = (run.tally.seen() - self.seen_before) as f64 / seconds.max(1e-9);
            bar.update(run.tally.seen(), loss, rate);
        }
        Ok(())
    }

    fn epoch_ended(&mut self, end: &EpochEnd, run: &RunView) -> Result<Control> {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        self.reporter
            .epoch(end.record, run.config.epochs, end.best, end.phases);
        Ok(Control::Continue)
    }

    fn interrupted(&mut self, _: &RunView) -> Result<()> {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        Ok(())
    }

    fn finished(&mut self, summary: &Summary, run: &RunView) -> Result<()> {
        if let Some(reason) = &summary.stopped_early {
            self.reporter.note(&format!("stopped early: {reason}"));
        }
        let (best_epoch, best_accuracy) = run.progress.best.unwrap_or((0, f64::NAN));
        self.reporter.summary(&RunSummary {
            epochs: summary.epochs_done,
            trained_here: summary.trained_here.clone(),
            stopped_early: summary.stopped_early.clone(),
            best_epoch,
            best_accuracy,
            seconds: summary.seconds,
            train_seconds: summary.train_seconds,
            last_evaluation_seconds: summary.last_evaluation_seconds,
            mean_images_per_s: summary.mean_images_per_s,
            peak_rss_bytes: metrics::peak_rss_bytes(),
            device_memory_bytes: crate::device::peak_memory(&self.device),
            device_in_use_bytes: crate::device::peak_memory_in_use(&self.device),
            last: self.run_dir.last(),
            best: self.run_dir.best(),
            plot: self.run_dir.plot(),
            checkpoints: self.run_dir.checkpoints(),
        });
        Ok(())
    }
}

/// TensorBoard's scalars of the run (`--tensorboard`), on the global step's axis: every
/// [`PROGRESS_EVERY`]-th step the epoch's running loss, accuracy and images/s, every step the
/// learning rate, and after each epoch its figures. A resumed run marks its restart, so the
/// curves continue from the checkpoint instead of repeating the steps lost after it.
pub struct TensorBoard {
    pub writer: crate::tensorboard::EventWriter,
    /// Images the epoch's tally had seen when this process started it.
    seen_before: usize,
}

impl TensorBoard {
    pub fn new(writer: crate::tensorboard::EventWriter) -> Self {
        Self {
            writer,
            seen_before: 0,
        }
    }
}

impl Observer for TensorBoard {
    fn started(&mut self, run: &RunView) -> Result<Control> {
        if run.progress.global_step > 0 {
            self.writer.restart_at(run.progress.global_step)?;
        }
        self.seen_before = run.tally.seen();
        Ok(Control::Continue)
    }

    fn epoch_started(&mut self, _: usize, run: &RunView) -> Result<()> {
        self.seen_before = run.tally.seen();
        Ok(())
    }

    fn step_ended(&mut self, run: &RunView, seconds: f64) -> Result<()> {
        let step = run.progress.global_step;
        self.writer
            .scalar("train/lr", step, run.optimizer.learning_rate())?;
        if step.is_multiple_of(PROGRESS_EVERY as u64) {
            let (loss, accuracy) = run.tally.read()?;
            let images = run.tally.seen().saturating_sub(self.seen_before);
            self.writer.scalar("train/loss", step, loss)?;
            self.writer.scalar("train/accuracy", step, accuracy)?;
            self.writer.scalar(
                "train/images_per_s",
                step,
                images as f64 / seconds.max(1e-9),
            )?;
        }
        Ok(())
    }

    fn epoch_ended(&mut self, end: &EpochEnd, run: &RunView) -> Result<Control> {
        let step = run.progress.global_step;
        let r = end.record;
        for (tag, value) in [
            ("epoch/epoch", r.epoch as f64),
            ("epoch/train_loss", r.train_loss),
            ("epoch/train_accuracy", r.train_acc),
            ("epoch/test_loss", r.test_loss),
            ("epoch/test_accuracy", r.test_acc),
            ("epoch/lr", r.lr),
            ("epoch/images_per_s", r.images_per_s),
            ("epoch/seconds", r.seconds),
        ] {
            self.writer.scalar(tag, step, value)?;
        }
        self.writer.flush()?;
        Ok(Control::Continue)
    }

    fn interrupted(&mut self, _: &RunView) -> Result<()> {
        self.writer.flush()
    }

    fn finished(&mut self, _: &Summary, _: &RunView) -> Result<()> {
        self.writer.flush()
    }
}
