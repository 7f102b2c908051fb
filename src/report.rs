//! What a run tells whoever watches it: a person (a progress bar per epoch on a terminal, one
//! line per epoch, a summary table), a script (`--json-logs`: one JSON object per line on
//! stdout), or nobody (`--quiet`: errors only).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::metrics::EpochRecord;
use crate::profile::PhaseTimer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Human,
    Quiet,
    Json,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Reporter {
    pub output: Output,
}

/// The end of a run, as the summary shows it.
pub struct RunSummary {
    pub epochs: usize,
    /// The epochs this process trained (a resumed run trained only the last ones).
    pub trained_here: std::ops::RangeInclusive<usize>,
    /// Why the run ended before its last epoch (early stopping), if it did.
    pub stopped_early: Option<String>,
    pub best_epoch: usize,
    pub best_accuracy: f64,
    pub seconds: f64,
    /// Of which training steps, and the last evaluation.
    pub train_seconds: f64,
    pub last_evaluation_seconds: f64,
    pub mean_images_per_s: f64,
    pub peak_rss_bytes: Option<u64>,
    /// Peak device memory of the allocations (see `device::peak_memory`).
    pub device_memory_bytes: Option<u64>,
    /// The most the run's live tensors held on the device at once (see
    /// `device::peak_memory_in_use`; PyTorch's `max_memory_allocated`).
    pub device_in_use_bytes: Option<u64>,
    pub last: PathBuf,
    pub best: PathBuf,
    pub plot: PathBuf,
    pub checkpoints: PathBuf,
}

impl Reporter {
    pub fn new(output: Output) -> Self {
        Self { output }
    }

    /// A line for people: printed in human mode only.
    pub fn note(&self, line: &str) {
        if self.output == Output::Human {
            println!("{line}");
        }
    }

    pub fn epoch_bar(&self, epoch: usize, epochs: usize, images: usize) -> EpochProgress {
        let shown = self.output == Output::Human && std::io::stderr().is_terminal();
        EpochProgress::start(shown, epoch, epochs, images)
    }

    /// The end of an epoch; `phases` when their shares are worth showing.
    pub fn epoch(
        &self,
        record: &EpochRecord,
        epochs: usize,
        best: bool,
        phases: Option<&PhaseTimer>,
    ) {
        match self.output {
            Output::Quiet => {}
            Output::Human => {
                println!("{}", epoch_line(record, epochs, best));
                if let Some(phases) = phases {
                    println!("  time: {}", phases.shares());
                }
            }
            Output::Json => {
                let mut line = json!({
                    "event": "epoch",
                    "epoch": record.epoch,
                    "epochs": epochs,
                    "train_loss": record.train_loss,
                    "train_acc": record.train_acc,
                    "test_loss": record.test_loss,
                    "test_acc": record.test_acc,
                    "seconds": record.seconds,
                    "images_per_s": record.images_per_s,
                    "lr": record.lr,
                    "best": best,
                });
                if let Some(phases) = phases {
                    let shares: serde_json::Map<_, _> = phases
                        .fractions()
                        .iter()
                        .map(|(k, v)| (k.to_string(), json!(v)))
                        .collect();
                    line["phases"] = shares.into();
                }
                println!("{line}");
            }
        }
    }

    pub fn summary(&self, s: &RunSummary) {
        let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
        match self.output {
            Output::Quiet => {}
            Output::Json => println!(
                "{}",
                json!({
                    "event": "summary",
                    "epochs": s.epochs,
                    "trained_epochs": [s.trained_here.start(), s.trained_here.end()],
                    "stopped_early": s.stopped_early,
                    "best_epoch": s.best_epoch,
                    "best_test_acc": s.best_accuracy,
                    "seconds": s.seconds,
                    "train_seconds": s.train_seconds,
                    "last_evaluation_seconds": s.last_evaluation_seconds,
                    "mean_images_per_s": s.mean_images_per_s,
                    "peak_rss_bytes": s.peak_rss_bytes,
                    "device_memory_bytes": s.device_memory_bytes,
                    "device_in_use_bytes": s.device_in_use_bytes,
                    "last": s.last.display().to_string(),
                    "best": s.best.display().to_string(),
                    "plot": s.plot.display().to_string(),
                    "checkpoints": s.checkpoints.display().to_string(),
                })
            ),
            Output::Human => {
                let mut memory = s
                    .peak_rss_bytes
                    .map_or("unknown".to_string(), |b| format!("{} RSS", gib(b)));
                if let Some(b) = s.device_memory_bytes {
                    memory.push_str(&format!(
                        ", {} peak on the device (context not included",
                        gib(b)
                    ));
                    if let Some(live) = s.device_in_use_bytes {
                        memory.push_str(&format!("; {} in live tensors", gib(live)));
                    }
                    memory.push(')');
                }
                let rows = [
                    (
                        "epochs",
                        format!(
                            "{} (trained now: {}..={})",
                            s.epochs,
                            s.trained_here.start(),
                            s.trained_here.end()
                        ),
                    ),
                    (
                        "best test acc",
                        format!("{:.4} (epoch {})", s.best_accuracy, s.best_epoch),
                    ),
                    (
                        "time",
                        format!(
                            "{:.1} s (training steps {:.2} s, last evaluation {:.2} s)",
                            s.seconds, s.train_seconds, s.last_evaluation_seconds
                        ),
                    ),
                    (
                        "images/s",
                        format!(
                            "{:.0} (mean over the epochs trained now)",
                            s.mean_images_per_s
                        ),
                    ),
                    ("peak memory", memory),
                    (
                        "weights",
                        format!("{} (last), {} (best)", s.last.display(), s.best.display()),
                    ),
                    ("plot", s.plot.display().to_string()),
                    ("checkpoints", s.checkpoints.display().to_string()),
                ];
                println!("summary");
                for (key, value) in rows {
                    println!("  {key:<14} {value}");
                }
            }
        }
    }
}

/// The line printed at the end of each epoch.
pub fn epoch_line(record: &EpochRecord, epochs: usize, best: bool) -> String {
    format!(
        "epoch {}/{epochs}: train loss {:.4} acc {:.4} | test loss {:.4} acc {:.4}{} | {:.1}s, {:.0} img/s, lr {:.4e}",
        record.epoch,
        record.train_loss,
        record.train_acc,
        record.test_loss,
        record.test_acc,
        if best { " (best)" } else { "" },
        record.seconds,
        record.images_per_s,
        record.lr,
    )
}

pub struct EpochProgress {
    bar: Option<ProgressBar>,
}

impl EpochProgress {
    fn start(shown: bool, epoch: usize, epochs: usize, images: usize) -> Self {
        let bar = shown.then(|| {
            let bar = ProgressBar::new(images as u64);
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:30.cyan/blue}] {pos}/{len} img {msg} ({eta} left)",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(format!("epoch {epoch}/{epochs}"));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { bar }
    }

    /// Whether updates are shown; callers skip reading figures from the device otherwise.
    pub fn is_visible(&self) -> bool {
        self.bar.is_some()
    }

    pub fn update(&self, images_done: usize, loss: f64, images_per_s: f64) {
        if let Some(bar) = &self.bar {
            bar.set_position(images_done as u64);
            bar.set_message(format!("loss {loss:.4}, {images_per_s:.0} img/s"));
        }
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
