//! What a person watching sees: a progress bar per epoch when stderr is a terminal, and one
//! plain line per epoch in every case (so logs of non-interactive runs stay readable).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::metrics::EpochRecord;

pub struct EpochProgress {
    bar: Option<ProgressBar>,
}

impl EpochProgress {
    /// Starts the bar for `epoch` of `epochs`, over `images` training images.
    pub fn start(epoch: usize, epochs: usize, images: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
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

/// The line printed at the end of each epoch.
pub fn epoch_line(record: &EpochRecord, epochs: usize, best: bool) -> String {
    format!(
        "epoch {}/{epochs}: train loss {:.4} acc {:.4} | test loss {:.4} acc {:.4}{} | {:.1}s, {:.0} img/s, lr {}",
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
