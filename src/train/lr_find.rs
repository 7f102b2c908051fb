//! The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks",
//! 2015; Lightning's `Tuner.lr_find`, fastai's `lr_find`): from the starting weights, one
//! training step per rate, the rate growing exponentially from `min_lr` to `max_lr`; the loss,
//! smoothed, falls, then climbs once the rate is too large. The suggestion is the rate where it
//! falls fastest (Lightning's rule). Nothing is saved: the weights are thrown away after.

use candle_core::DType;
use candle_nn::ModuleT;

use super::{rng, Stream};
use crate::config::Config;
use crate::data::batches::{batch_ranges, epoch_order, BatchBuffer, DeviceSet};
use crate::error::Result;
use crate::ops::cross_entropy;
use crate::optim::Optimizer;

/// The sweep's range and length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sweep {
    pub min_lr: f64,
    pub max_lr: f64,
    pub steps: usize,
}

impl Default for Sweep {
    /// Wide enough for Adam's 1e-3 and SGD's 0.1 alike: 1e-7 to 10 over 200 steps (x1.1 a step).
    fn default() -> Self {
        Self {
            min_lr: 1e-7,
            max_lr: 10.0,
            steps: 200,
        }
    }
}

/// The smoothing of the loss curve: an exponential moving average with this factor, its start
/// debiased (Lightning's and fastai's 0.98).
const BETA: f64 = 0.98;

/// The sweep stops once the smoothed loss passes this multiple of its best (Lightning's 4).
const DIVERGED: f64 = 4.0;

/// Points left out of the suggestion at the start (the average is still settling) and end.
const SKIP_START: usize = 10;
const SKIP_END: usize = 1;

/// What a sweep found.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// The rate of each step taken.
    pub rates: Vec<f64>,
    /// Each step's loss, as computed.
    pub losses: Vec<f64>,
    /// The smoothed loss after each step.
    pub smoothed: Vec<f64>,
    /// The rate where the smoothed loss falls fastest, if the sweep went far enough to tell.
    pub suggestion: Option<f64>,
}

/// The rate of step `k` of `sweep`.
pub fn rate(sweep: &Sweep, k: usize) -> f64 {
    let t = k as f64 / (sweep.steps.max(2) - 1) as f64;
    sweep.min_lr * (sweep.max_lr / sweep.min_lr).powf(t)
}

/// Runs the sweep on `model` (trained in place: pass weights you can throw away) over `train`,
/// in `config`'s batches, order and augmentation; `input_dtype` as the training loop's.
#[allow(clippy::too_many_arguments)]
pub fn sweep(
    model: &dyn ModuleT,
    optimizer: &mut dyn Optimizer,
    train: &DeviceSet,
    image_width: usize,
    config: &Config,
    input_dtype: DType,
    sweep: &Sweep,
    mut progress: impl FnMut(usize),
) -> Result<Found> {
    let mut found = Found::default();
    let mut buffer = BatchBuffer::default();
    let (mut average, mut best) = (0f64, f64::INFINITY);
    let mut epoch = 1;
    'epochs: loop {
        let mut order_rng = rng(config.seed, Stream::Shuffle, epoch);
        let order = epoch_order(train.len(), config.shuffle.then_some(&mut order_rng));
        let order = train.order(&order)?;
        let batches = batch_ranges(train.len(), config.batch_size);
        for (step, range) in batches.enumerate() {
            let k = found.rates.len();
            if k == sweep.steps {
                break 'epochs;
            }
            let lr = rate(sweep, k);
            optimizer.set_learning_rate(lr);
            let augment = config
                .augment
                .for_batch(config.seed, epoch, step, image_width);
            let (images, labels) = train.batch(&order, range, &mut buffer, augment.as_ref())?;
            let logits = model.forward_t(&images.to_dtype(input_dtype)?, true)?;
            let loss = cross_entropy(&logits, &labels, config.label_smoothing as f32)?;
            drop(logits);
            let value = loss.detach();
            let mut grads = optimizer.backward(loss)?;
            if optimizer.unscale(&mut grads)? {
                optimizer.step(&grads)?;
            }
            let loss = f64::from(value.to_dtype(DType::F32)?.to_scalar::<f32>()?);
            progress(k + 1);
            average = BETA * average + (1.0 - BETA) * loss;
            let smoothed = average / (1.0 - BETA.powi(k as i32 + 1));
            found.rates.push(lr);
            found.losses.push(loss);
            found.smoothed.push(smoothed);
            if !smoothed.is_finite() || (k > 1 && smoothed > DIVERGED * best) {
                break 'epochs;
            }
            best = best.min(smoothed);
        }
        epoch += 1;
    }
    found.suggestion = suggest(&found.rates, &found.smoothed);
    Ok(found)
}

/// The rate at which the smoothed loss falls fastest (its most negative gradient by step,
/// which on the exponential sweep is by log rate), leaving out the first [`SKIP_START`] and
/// last [`SKIP_END`] points, and everything past the lowest loss: once the rate is too large
/// the loss jumps about, and a fall from a spike there is no place to train at. None when
/// fewer points remain than it takes to tell.
pub fn suggest(rates: &[f64], smoothed: &[f64]) -> Option<f64> {
    let end = smoothed.len().checked_sub(SKIP_END)?;
    if end < SKIP_START + 3 {
        return None;
    }
    let lowest = (SKIP_START..end)
        .filter(|&i| smoothed[i].is_finite())
        .min_by(|&a, &b| smoothed[a].total_cmp(&smoothed[b]))?;
    let end = (lowest + 2).min(end);
    if end < SKIP_START + 3 {
        return None;
    }
    let losses = &smoothed[SKIP_START..end];
    // NumPy's `gradient`: central differences inside, one-sided at the ends.
    let n = losses.len();
    let gradient = |i: usize| match i {
        0 => losses[1] - losses[0],
        i if i == n - 1 => losses[n - 1] - losses[n - 2],
        i => (losses[i + 1] - losses[i - 1]) / 2.0,
    };
    let steepest = (0..n)
        .filter(|&i| gradient(i).is_finite())
        .min_by(|&a, &b| gradient(a).total_cmp(&gradient(b)))?;
    Some(rates[steepest + SKIP_START])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_grow_exponentially_from_min_to_max() {
        let sweep = Sweep {
            min_lr: 1e-6,
            max_lr: 1.0,
            steps: 7,
        };
        let rates: Vec<f64> = (0..7).map(|k| rate(&sweep, k)).collect();
        for (k, r) in rates.iter().enumerate() {
            let want = 10f64.powi(k as i32 - 6);
            assert!((r / want - 1.0).abs() < 1e-12, "{k}: {r} against {want}");
        }
    }

    /// A loss that falls slowly, then fast around step 42, then climbs: the suggestion is where
    /// it falls fastest, by hand.
    #[test]
    fn the_suggestion_is_where_the_loss_falls_fastest() {
        let rates: Vec<f64> = (0..60).map(|k| 1e-5 * 1.2f64.powi(k)).collect();
        let smoothed: Vec<f64> = (0..60)
            .map(|k| match k {
                0..=40 => 2.3 - 0.001 * k as f64,
                41 => 2.16,
                42 => 1.76,
                43 => 1.26,
                44 => 1.16,
                _ => 1.16 + 0.05 * (k - 44) as f64,
            })
            .collect();
        // Central differences: -0.25 at step 41, -0.45 at 42, -0.30 at 43, -0.025 at 44.
        assert_eq!(suggest(&rates, &smoothed), Some(rates[42]));
        // Past the lowest loss (step 44), a spike and a steeper fall from it are left out.
        let mut diverging = smoothed.clone();
        diverging[50] = 9.0;
        diverging[51] = 3.0;
        assert_eq!(suggest(&rates, &diverging), Some(rates[42]));
        assert_eq!(
            suggest(&rates[..12], &smoothed[..12]),
            None,
            "too short to tell"
        );
    }
}
