//! Per-epoch figures: running sums kept on the device during an epoch, and `metrics.csv`.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::ops::batch_tally;

/// Loss and correct predictions summed over an epoch, on the training device, so a step never
/// waits for the device unless a figure is read.
#[derive(Default)]
pub struct Tally {
    /// [loss sum, correct predictions]
    sums: Option<Tensor>,
    seen: usize,
}

impl Tally {
    /// Adds a batch: its mean `loss`, its `logits` [n, classes] and `labels` [n].
    pub fn add(&mut self, loss: &Tensor, logits: &Tensor, labels: &Tensor) -> Result<()> {
        let batch = batch_tally(logits, labels, loss)?;
        self.add_sums(batch, labels.dim(0)?)
    }

    /// Adds a batch of `images` images already tallied: [loss sum, correct predictions] (f32),
    /// as a data-parallel run sums its ranks' shares of a batch.
    pub fn add_sums(&mut self, batch: Tensor, images: usize) -> Result<()> {
        self.sums = Some(match self.sums.take() {
            Some(sums) => (sums + batch)?,
            None => batch,
        });
        self.seen += images;
        Ok(())
    }

    pub fn seen(&self) -> usize {
        self.seen
    }

    /// The running sums as named tensors, for a checkpoint taken mid-epoch.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let Some(sums) = &self.sums else {
            return Ok(Vec::new());
        };
        Ok(vec![
            (LOSS_SUM.to_string(), sums.get(0)?),
            (CORRECT.to_string(), sums.get(1)?),
        ])
    }

    /// Restores a tally from [`Tally::state`] and the number of images it had seen.
    pub fn from_state(
        state: &std::collections::HashMap<String, Tensor>,
        seen: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let sums = match (state.get(LOSS_SUM), state.get(CORRECT)) {
            (Some(loss), Some(correct)) => {
                let sums = Tensor::stack(&[loss, correct], 0)?;
                Some(sums.to_dtype(DType::F32)?.to_device(device)?)
            }
            _ => None,
        };
        Ok(Self { sums, seen })
    }

    /// Mean loss and accuracy so far (reads from the device).
    pub fn read(&self) -> Result<(f64, f64)> {
        let Some(sums) = &self.sums else {
            return Ok((f64::NAN, f64::NAN));
        };
        let n = self.seen as f64;
        let sums = sums.to_vec1::<f32>()?;
        Ok((sums[0] as f64 / n, sums[1] as f64 / n))
    }
}

const LOSS_SUM: &str = "loss_sum";
const CORRECT: &str = "correct";

/// The process's peak resident memory so far, where the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes a complete rusage into the pointer it is given.
        let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } == 0;
        if !ok {
            return None;
        }
        // SAFETY: initialised by the successful call above.
        let max = unsafe { usage.assume_init() }.ru_maxrss.max(0) as u64;
        // Linux reports KiB, macOS bytes.
        Some(if cfg!(target_os = "macos") {
            max
        } else {
            max * 1024
        })
    }
    #[cfg(not(unix))]
    {
        None
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

pub const CSV_HEADER: &str =
    "epoch,train_loss,train_acc,test_loss,test_acc,seconds,images_per_s,lr";

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

    /// Reads the rows of a metrics.csv text (as written by [`EpochRecord::push_to`]); an empty
    /// cell (a wall-clock figure a checkpoint does not keep) reads as NaN.
    pub fn parse_history(history: &str) -> Vec<EpochRecord> {
        history
            .lines()
            .skip(1)
            .filter_map(|line| {
                let v: Vec<f64> = line
                    .split(',')
                    .map(|c| match c {
                        "" => Some(f64::NAN),
                        c => c.parse().ok(),
                    })
                    .collect::<Option<_>>()?;
                (v.len() == 8).then(|| EpochRecord {
                    epoch: v[0] as usize,
                    train_loss: v[1],
                    train_acc: v[2],
                    test_loss: v[3],
                    test_acc: v[4],
                    seconds: v[5],
                    images_per_s: v[6],
                    lr: v[7],
                })
            })
            .collect()
    }

    /// Adds this row to `history` (the text of metrics.csv), with the header if it is empty.
    pub fn push_to(&self, history: &mut String) {
        if history.is_empty() {
            history.push_str(CSV_HEADER);
            history.push('\n');
        }
        history.push_str(&self.csv_row());
        history.push('\n');
    }
}

/// The columns of metrics.csv that hold wall-clock figures (`seconds`, `images_per_s`): they
/// differ between two runs that compute the same.
const TIMING_COLUMNS: [usize; 2] = [5, 6];

/// `history` (metrics.csv's text) with its wall-clock cells left empty: what a checkpoint keeps,
/// so that two identical runs write identical checkpoints, byte for byte.
pub fn without_timing(history: &str) -> String {
    let mut out = String::with_capacity(history.len());
    for (i, line) in history.lines().enumerate() {
        match i {
            0 => out.push_str(line),
            _ => out.push_str(&row_without_timing(line)),
        }
        out.push('\n');
    }
    out
}

fn row_without_timing(row: &str) -> String {
    let cells: Vec<&str> = row
        .split(',')
        .enumerate()
        .map(|(c, cell)| {
            if TIMING_COLUMNS.contains(&c) {
                ""
            } else {
                cell
            }
        })
        .collect();
    cells.join(",")
}

/// `history` (a checkpoint's, without wall-clock figures) with them filled in from `recorded`
/// (metrics.csv as the run left it) wherever it holds the same row: a resumed run's metrics.csv
/// keeps the times of the epochs trained before.
pub fn with_timing_from(history: &str, recorded: &str) -> String {
    let mut out = String::with_capacity(history.len());
    for (i, line) in history.lines().enumerate() {
        let timed = (i > 0)
            .then(|| {
                recorded
                    .lines()
                    .skip(1)
                    .find(|row| row_without_timing(row) == line)
            })
            .flatten();
        out.push_str(timed.unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn checkpoints_keep_no_wall_clock_and_a_resume_takes_it_back_from_metrics_csv() {
        let recorded = format!(
            "{CSV_HEADER}\n1,2.000000,0.100000,1.900000,0.200000,12.345,5120.0,0.001\n\
             2,1.500000,0.300000,1.400000,0.400000,11.111,5500.5,0.001\n"
        );
        let kept = without_timing(&recorded);
        assert_eq!(
            kept,
            format!(
                "{CSV_HEADER}\n1,2.000000,0.100000,1.900000,0.200000,,,0.001\n\
                 2,1.500000,0.300000,1.400000,0.400000,,,0.001\n"
            )
        );
        let rows = EpochRecord::parse_history(&kept);
        assert_eq!(rows.len(), 2);
        assert!(rows[1].seconds.is_nan() && rows[1].test_acc == 0.4);
        assert_eq!(with_timing_from(&kept, &recorded), recorded);
        // A row that metrics.csv holds otherwise (written after the checkpoint, then lost to a
        // crash and trained again) stays without times rather than taking another run's.
        let other = recorded.replace("0.400000,11.111", "0.410000,11.111");
        let merged = with_timing_from(&kept, &other);
        assert!(merged.contains("12.345,5120.0") && merged.contains("0.400000,,,"));
        assert_eq!(with_timing_from(&kept, ""), kept);
    }

    #[test]
    fn tally_sums_loss_and_correct_predictions() {
        let dev = Device::Cpu;
        let mut tally = Tally::default();
        let logits = Tensor::new(&[[2f32, 1.], [0., 3.], [5., 1.]], &dev).unwrap();
        let labels = Tensor::new(&[0u32, 1, 1], &dev).unwrap();
        tally
            .add(&Tensor::new(1.5f32, &dev).unwrap(), &logits, &labels)
            .unwrap();
        let labels = Tensor::new(&[1u32], &dev).unwrap();
        let logits = Tensor::new(&[[0f32, 1.]], &dev).unwrap();
        tally
            .add(&Tensor::new(0.5f32, &dev).unwrap(), &logits, &labels)
            .unwrap();
        let (loss, acc) = tally.read().unwrap();
        assert!((loss - (1.5 * 3. + 0.5) / 4.).abs() < 1e-6);
        assert!((acc - 0.75).abs() < 1e-9);
        assert_eq!(tally.seen(), 4);
    }

    #[test]
    fn peak_rss_is_at_least_what_this_test_holds() {
        let held = vec![1u8; 64 << 20];
        let peak = peak_rss_bytes().unwrap();
        // Bytes, not KiB: a unit slip is 1024 times off either way.
        assert!((64 << 20..8 << 30).contains(&peak), "{peak}");
        drop(held);
    }

    #[test]
    fn history_gets_one_header_and_a_row_per_epoch() {
        let mut history = String::new();
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
        record.push_to(&mut history);
        record.epoch = 2;
        record.push_to(&mut history);
        let lines: Vec<&str> = history.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], CSV_HEADER);
        assert!(lines[2].starts_with("2,2.000000,0.250000,1.900000,0.300000,1.500,1000.0,0.001"));
        let parsed = EpochRecord::parse_history(&history);
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1], record);
    }
}
