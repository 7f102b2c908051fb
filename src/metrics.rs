//! Per-epoch figures: running sums kept on the device during an epoch, and `metrics.csv`.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Loss and correct predictions summed over an epoch, on the training device, so a step never
/// waits for the device unless a figure is read.
#[derive(Default)]
pub struct Tally {
    loss_sum: Option<Tensor>,
    correct: Option<Tensor>,
    seen: usize,
}

impl Tally {
    /// Adds a batch: its mean `loss`, its `logits` [n, classes] and `labels` [n].
    pub fn add(&mut self, loss: &Tensor, logits: &Tensor, labels: &Tensor) -> Result<()> {
        let n = labels.dim(0)?;
        let loss_sum = (loss.detach() * n as f64)?;
        let correct = logits
            .argmax(1)?
            .eq(labels)?
            .to_dtype(DType::F32)?
            .sum_all()?;
        self.loss_sum = Some(match self.loss_sum.take() {
            Some(sum) => (sum + loss_sum)?,
            None => loss_sum,
        });
        self.correct = Some(match self.correct.take() {
            Some(sum) => (sum + correct)?,
            None => correct,
        });
        self.seen += n;
        Ok(())
    }

    pub fn seen(&self) -> usize {
        self.seen
    }

    /// Mean loss and accuracy so far (reads from the device).
    pub fn read(&self) -> Result<(f64, f64)> {
        let (Some(loss), Some(correct)) = (&self.loss_sum, &self.correct) else {
            return Ok((f64::NAN, f64::NAN));
        };
        let n = self.seen as f64;
        Ok((
            loss.to_scalar::<f32>()? as f64 / n,
            correct.to_scalar::<f32>()? as f64 / n,
        ))
    }
}

/// One row of `metrics.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    /// Wall time of the epoch, evaluation included.
    pub seconds: f64,
    /// Training throughput (evaluation excluded).
    pub images_per_s: f64,
    pub lr: f64,
}

pub const CSV_HEADER: &str = "epoch,train_loss,train_acc,test_loss,test_acc,seconds,images_per_s,lr";

impl EpochRecord {
    pub fn csv_row(&self) -> String {
        format!(
            "{},{:.6},{:.6},{:.6},{:.6},{:.3},{:.1},{}",
            self.epoch,
            self.train_loss,
            self.train_acc,
            self.test_loss,
            self.test_acc,
            self.seconds,
            self.images_per_s,
            self.lr
        )
    }

    /// Appends this row to `path`, writing the header first if the file is new, and syncs it.
    pub fn append_to(&self, path: &Path) -> Result<()> {
        let is_new = !path.exists();
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            let mut text = String::new();
            if is_new {
                text.push_str(CSV_HEADER);
                text.push('\n');
            }
            text.push_str(&self.csv_row());
            text.push('\n');
            file.write_all(text.as_bytes())?;
            file.sync_data()
        };
        write().map_err(Error::io("cannot append to", path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tally_sums_loss_and_correct_predictions() {
        let dev = Device::Cpu;
        let mut tally = Tally::default();
        let logits = Tensor::new(&[[2f32, 1.], [0., 3.], [5., 1.]], &dev).unwrap();
        let labels = Tensor::new(&[0u32, 1, 1], &dev).unwrap();
        tally.add(&Tensor::new(1.5f32, &dev).unwrap(), &logits, &labels).unwrap();
        let labels = Tensor::new(&[1u32], &dev).unwrap();
        let logits = Tensor::new(&[[0f32, 1.]], &dev).unwrap();
        tally.add(&Tensor::new(0.5f32, &dev).unwrap(), &logits, &labels).unwrap();
        let (loss, acc) = tally.read().unwrap();
        assert!((loss - (1.5 * 3. + 0.5) / 4.).abs() < 1e-6);
        assert!((acc - 0.75).abs() < 1e-9);
        assert_eq!(tally.seen(), 4);
    }

    #[test]
    fn csv_gets_one_header_and_a_row_per_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.csv");
        let mut record = EpochRecord {
            epoch: 1,
            train_loss: 2.0,
            train_acc: 0.25,
            test_loss: 1.9,
            test_acc: 0.3,
            seconds: 1.5,
            images_per_s: 1000.0,
            lr: 0.001,
        };
        record.append_to(&path).unwrap();
        record.epoch = 2;
        record.append_to(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], CSV_HEADER);
        assert!(lines[2].starts_with("2,2.000000,0.250000,1.900000,0.300000,1.500,1000.0,0.001"));
    }
}
