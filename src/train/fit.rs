//! The training loop for image classifiers: epochs of shuffled, augmented mini-batches, the
//! learning rate from the schedule before each step, gradients clipped if asked, the model in
//! training mode for steps and evaluation mode for the test set after each epoch. The loop
//! drives epochs and steps and nothing else: whatever shows, saves or decides something about
//! the run is an [`Observer`] it calls at named points (Lightning's callbacks, Burn's Learner).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::ModuleT;

use super::{rng, Stream};
use crate::checkpoint::Progress;
use crate::config::Config;
use crate::data::batches::{batch_ranges, epoch_order, BatchBuffer, DeviceSet};
use crate::dist::World;
use crate::error::{Error, Result};
use crate::evaluate::{evaluate_share, EvalSettings, Evaluation};
use crate::metrics::{EpochRecord, Tally};
use crate::models::ParamStore;
use crate::ops::{batch_tally, cross_entropy, Positions};
use crate::optim::Optimizer;
use crate::profile::{Phase, PhaseTimer};

/// What an observer tells the loop after an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// End the run now, for the reason given (early stopping).
    Stop(String),
}

/// The run as observers see it at any of the loop's points.
pub struct RunView<'a> {
    pub config: &'a Config,
    /// Where the run stands: epochs and steps done, best result, metrics history.
    pub progress: &'a Progress,
    /// The current epoch's running loss and accuracy (on the device).
    pub tally: &'a Tally,
    /// The model's parameters and buffers.
    pub state: &'a ParamStore,
    pub optimizer: &'a dyn Optimizer,
}

/// The end of an epoch: its figures (also the last row of the history) and its evaluation.
pub struct EpochEnd<'a> {
    pub record: &'a EpochRecord,
    pub evaluation: &'a Evaluation,
    /// This epoch's test accuracy is the best so far.
    pub best: bool,
    /// Time per phase of the epoch, where its shares are honest (CPU, or a traced GPU run).
    pub phases: Option<&'a PhaseTimer>,
}

/// Called by the loop at named points; each method's default does nothing.
pub trait Observer {
    /// Before the first epoch this process trains; `Stop` ends the run at once (an early stop
    /// that a resumed run had already reached).
    fn started(&mut self, _run: &RunView) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn epoch_started(&mut self, _epoch: usize, _run: &RunView) -> Result<()> {
        Ok(())
    }
    /// After every training step; `seconds` since the epoch began.
    fn step_ended(&mut self, _run: &RunView, _seconds: f64) -> Result<()> {
        Ok(())
    }
    /// After the epoch's evaluation, once the progress (history, best) records the epoch.
    fn epoch_ended(&mut self, _end: &EpochEnd, _run: &RunView) -> Result<Control> {
        Ok(Control::Continue)
    }
    /// The run stops on request (Ctrl-C) after a step: the place to save where it stands.
    fn interrupted(&mut self, _run: &RunView) -> Result<()> {
        Ok(())
    }
    /// The run is over (every epoch done, or stopped early).
    fn finished(&mut self, _summary: &Summary, _run: &RunView) -> Result<()> {
        Ok(())
    }
}

/// How a run ended, with the figures of the epochs this process trained.
pub struct Summary {
    pub epochs_done: usize,
    pub trained_here: std::ops::RangeInclusive<usize>,
    /// Why the run ended before its last epoch, if it did.
    pub stopped_early: Option<String>,
    pub seconds: f64,
    /// Of which the epochs' training steps (evaluations and checkpoints left out).
    pub train_seconds: f64,
    /// The last epoch's evaluation (with test-time augmentation where `tta` is set).
    pub last_evaluation_seconds: f64,
    pub mean_images_per_s: f64,
}

pub enum Outcome {
    Finished(Summary),
    /// The run had already done every epoch asked for.
    AlreadyDone {
        epochs: usize,
    },
    /// Stopped on request; observers saved where it stands.
    Interrupted,
}

/// What a run trains.
pub struct Trainee<'a> {
    pub model: &'a dyn ModuleT,
    pub state: &'a ParamStore,
    pub optimizer: &'a mut dyn Optimizer,
    /// The type the model takes its images in: the run's precision, resolved for the device.
    pub input_dtype: DType,
}

/// The data a run reads, where it trains.
pub struct Data<'a> {
    pub train: &'a DeviceSet,
    pub test: &'a DeviceSet,
    /// Image width, for the augmentation's crops and flips.
    pub image_width: usize,
    pub num_classes: usize,
}

/// How a run is driven, besides its config.
pub struct Driving<'a> {
    pub device: &'a Device,
    /// Set (by a signal handler) to stop after the current step.
    pub stop: &'a AtomicBool,
    /// Phases wait for the device (`--trace`), so their spans time real work.
    pub trace: bool,
    /// The processes training together: each takes its share of every batch, and they average
    /// their gradients before each step.
    pub world: &'a World,
}

/// Trains `trainee` on `data` from `progress` (a resumed run's position, or the start) to
/// `config.epochs`, calling `observers` in their order at each point.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    trainee: Trainee,
    data: &Data,
    config: &Config,
    mut progress: Progress,
    resumed_tally: Option<Tally>,
    observers: &mut [&mut dyn Observer],
    driving: &Driving,
) -> Result<Outcome> {
    let Trainee {
        model,
        state,
        optimizer,
        input_dtype,
    } = trainee;
    if progress.epochs_done >= config.epochs {
        return Ok(Outcome::AlreadyDone {
            epochs: progress.epochs_done,
        });
    }
    let params = state.vars();
    let world = driving.world;
    let steps_per_epoch = steps_per_epoch(config, data.train.len());
    let first_epoch = progress.epochs_done + 1;
    let mut tally = match resumed_tally {
        Some(tally) if progress.steps_into_epoch > 0 => tally,
        _ => Tally::default(),
    };
    let mut stopped_early = None;
    for observer in observers.iter_mut() {
        let run = view(config, &progress, &tally, state, &*optimizer);
        if let Control::Stop(reason) = observer.started(&run)? {
            stopped_early = Some(reason);
        }
    }
    let started = Instant::now();
    let (mut images_trained, mut train_seconds, mut last_evaluation_seconds) = (0usize, 0f64, 0f64);
    let (mut train_buffer, mut test_buffer) = (BatchBuffer::default(), BatchBuffer::default());
    let mut phases = PhaseTimer::new(driving.device, driving.trace);
    let show_phases = driving.trace || driving.device.is_cpu();
    // A rank whose steps stop ends the job (inside a job only; evaluation is not watched).
    let watchdog = crate::dist::watchdog::Watchdog::start(world, crate::dist::watchdog::timeout()?);
    let mut epoch = first_epoch;
    while stopped_early.is_none() && epoch <= config.epochs {
        let _epoch_span = tracing::info_span!("epoch", epoch).entered();
        phases.reset();
        let epoch_start = Instant::now();
        for observer in observers.iter_mut() {
            let run = view(config, &progress, &tally, state, &*optimizer);
            observer.epoch_started(epoch, &run)?;
        }
        let mut order_rng = rng(config.seed, Stream::Shuffle, epoch);
        let order = epoch_order(data.train.len(), config.shuffle.then_some(&mut order_rng));
        let batches: Vec<_> = batch_ranges(data.train.len(), step_images(config))
            .take(steps_per_epoch)
            .collect();
        let (order, shares) = share_epoch(&order, &batches, config.batch_size, world);
        watchdog.iter().for_each(|w| w.alive());
        let order = data.train.order(&order)?;
        let seen_before = tally.seen();
        for (step, micros) in shares
            .into_iter()
            .enumerate()
            .skip(progress.steps_into_epoch)
        {
            let step_images = batches[step].len();
            let _step_span = tracing::info_span!("step", step = progress.global_step + 1).entered();
            let lr = config.schedule.rate(
                config.lr,
                progress.global_step,
                config.epochs,
                steps_per_epoch,
            );
            optimizer.set_learning_rate(lr);
            let augment = config
                .augment
                .for_batch(config.seed, epoch, step, data.image_width);
            // The step's gradients: each micro-batch's (the mean over its images) weighted by
            // its share of the step's images, so that they add up to the mean over the step.
            let mut grads = GradStore::default();
            let mut local_sums = [0f64; 2];
            for micro in micros {
                let augment = augment.map(|augment| crate::ops::Augmentation {
                    positions: Positions {
                        first: micro.first,
                        stride: world.size(),
                    },
                    ..augment
                });
                let weight = micro.range.len() as f64 / step_images as f64;
                let (images, labels) = phases.time(Phase::Data, || {
                    data.train
                        .batch(&order, micro.range, &mut train_buffer, augment.as_ref())
                })?;
                let (logits, loss) = phases.time(Phase::Forward, || {
                    // Data needs no gradient: the cast (a no-op in f32) starts the graph.
                    let images = images.to_dtype(input_dtype)?;
                    let logits = model.forward_t(&images, true)?;
                    let loss = cross_entropy(&logits, &labels, config.label_smoothing as f32)?;
                    Ok((logits, loss))
                })?;
                // The backward pass frees the graph as it goes; the tally keeps only the values.
                let (logits, graph) = (logits.detach(), loss);
                let loss = graph.detach();
                phases.time(Phase::Backward, || {
                    let micro_grads = optimizer.backward(graph)?;
                    add_weighted(&mut grads, micro_grads, weight, &params)
                })?;
                if world.is_distributed() {
                    let sums = batch_tally(&logits, &labels, &loss)?.to_vec1::<f32>()?;
                    local_sums[0] += sums[0] as f64;
                    local_sums[1] += sums[1] as f64;
                } else {
                    tally.add(&loss, &logits, &labels)?;
                }
            }
            phases.time(Phase::Backward, || world.sum_gradients(&mut grads, &params))?;
            phases.time(Phase::Optimizer, || {
                if !optimizer.unscale(&mut grads)? {
                    return Ok(());
                }
                if config.grad_clip_norm > 0.0 {
                    clip_grad_norm(&mut grads, &params, config.grad_clip_norm)?;
                }
                optimizer.step(&grads)
            })?;
            let stop = if world.is_distributed() {
                // The step's tally and whether any rank was asked to stop, in one exchange:
                // every rank then holds the whole step's figures and stops at the same step.
                let stop = driving.stop.load(Ordering::SeqCst);
                let mut shared = [local_sums[0], local_sums[1], f64::from(u8::from(stop))];
                world.sum_f64(&mut shared)?;
                let sums = Tensor::new(&[shared[0] as f32, shared[1] as f32], driving.device)?;
                tally.add_sums(sums, step_images)?;
                shared[2] > 0.0
            } else {
                driving.stop.load(Ordering::SeqCst)
            };
            progress.steps_into_epoch = step + 1;
            progress.global_step += 1;
            watchdog.iter().for_each(|w| w.alive());

            phases.time(Phase::Checkpoint, || {
                for observer in observers.iter_mut() {
                    let run = view(config, &progress, &tally, state, &*optimizer);
                    if stop {
                        observer.interrupted(&run)?;
                    } else {
                        observer.step_ended(&run, epoch_start.elapsed().as_secs_f64())?;
                    }
                }
                Ok(())
            })?;
            if stop {
                return Ok(Outcome::Interrupted);
            }
        }
        let (train_loss, train_acc) = tally.read()?;
        if !train_loss.is_finite() {
            return Err(Error::InvalidSetting(format!(
                "training diverged in epoch {epoch} (loss {train_loss}); try a smaller --lr"
            )));
        }
        let epoch_train_seconds = epoch_start.elapsed().as_secs_f64();
        let trained = tally.seen() - seen_before;
        images_trained += trained;
        train_seconds += epoch_train_seconds;

        watchdog.iter().for_each(|w| w.pause());
        let evaluation_start = Instant::now();
        let evaluation = phases.time(Phase::Evaluate, || {
            // Replicas whose BatchNorm statistics drifted apart evaluate (and save) rank 0's.
            world.broadcast_state(&state.buffers())?;
            let settings = EvalSettings {
                batch_size: config.eval_batch_size,
                num_classes: data.num_classes,
                tta: config.tta && epoch == config.epochs,
                // In the training precision, as under autocast (f32 tripled fastnet's TTA).
                dtype: input_dtype,
            };
            evaluate_share(world, model, data.test, &mut test_buffer, settings)
        })?;
        last_evaluation_seconds = evaluation_start.elapsed().as_secs_f64();
        let record = EpochRecord {
            epoch,
            train_loss,
            train_acc,
            test_loss: evaluation.loss,
            test_acc: evaluation.accuracy(),
            seconds: epoch_start.elapsed().as_secs_f64(),
            images_per_s: trained as f64 / epoch_train_seconds,
            lr: optimizer.learning_rate(),
        };
        let best = progress.best.is_none_or(|(_, acc)| record.test_acc > acc);
        if best {
            progress.best = Some((epoch, record.test_acc));
        }
        record.push_to(&mut progress.history);
        progress.epochs_done = epoch;
        progress.steps_into_epoch = 0;
        tally = Tally::default();
        tracing::info!(epoch, phases = %phases.shares(), "time per phase");
        // Each observer sees the phases so far, the saving done by those before it included.
        for observer in observers.iter_mut() {
            let snapshot = show_phases.then(|| phases.clone());
            let end = EpochEnd {
                record: &record,
                evaluation: &evaluation,
                best,
                phases: snapshot.as_ref(),
            };
            let run = view(config, &progress, &tally, state, &*optimizer);
            if let Control::Stop(reason) =
                phases.time(Phase::Checkpoint, || observer.epoch_ended(&end, &run))?
            {
                stopped_early = Some(reason);
            }
        }
        if any_rank(world, driving.stop.load(Ordering::SeqCst))? && epoch < config.epochs {
            return Ok(Outcome::Interrupted);
        }
        epoch += 1;
    }
    let summary = Summary {
        epochs_done: progress.epochs_done,
        trained_here: first_epoch..=progress.epochs_done,
        stopped_early,
        seconds: started.elapsed().as_secs_f64(),
        train_seconds,
        last_evaluation_seconds,
        mean_images_per_s: images_trained as f64 / train_seconds.max(1e-9),
    };
    for observer in observers.iter_mut() {
        let run = view(config, &progress, &tally, state, &*optimizer);
        observer.finished(&summary, &run)?;
    }
    Ok(Outcome::Finished(summary))
}

/// One forward and backward pass of an optimizer step: where its images lie in this rank's
/// order, and the position of its first image in the step's whole batch (for the augmentation's
/// draws; the rest follow every world-size positions).
struct Micro {
    range: std::ops::Range<usize>,
    first: usize,
}

/// Images an optimizer step takes, over every rank and micro-batch.
fn step_images(config: &Config) -> usize {
    config.batch_size * config.accumulate
}

/// The epoch `order` as this rank sees it: each step of `steps` cut into micro-batches of
/// `micro` images, and this rank's share of each (every W-th image from its rank), laid end to
/// end. On one process without accumulation: the order and the steps as they are.
fn share_epoch(
    order: &[usize],
    steps: &[std::ops::Range<usize>],
    micro: usize,
    world: &World,
) -> (Vec<usize>, Vec<Vec<Micro>>) {
    let mut local = Vec::with_capacity(order.len() / world.size() + steps.len());
    let mut shares = Vec::with_capacity(steps.len());
    for step in steps {
        let mut micros = Vec::new();
        for micro_start in step.clone().step_by(micro) {
            let start = local.len();
            let micro_range = micro_start..(micro_start + micro).min(step.end);
            local.extend(world.share(micro_range).map(|position| order[position]));
            micros.push(Micro {
                range: start..local.len(),
                first: micro_start - step.start + world.rank(),
            });
        }
        shares.push(micros);
    }
    (local, shares)
}

/// Adds `micro` (one micro-batch's gradients) times `weight` into the step's `grads`, for the
/// parameters alone: the micro-batch's other gradients are freed with it.
fn add_weighted(
    grads: &mut GradStore,
    mut micro: GradStore,
    weight: f64,
    params: &[(String, Var)],
) -> Result<()> {
    for (_, var) in params {
        let Some(grad) = micro.remove(var) else {
            continue;
        };
        // A weight of 1 (one micro-batch on one process) leaves every bit as it is.
        let grad = if weight == 1.0 {
            grad
        } else {
            (grad * weight)?
        };
        let sum = match grads.remove(var) {
            Some(held) => (held + grad)?,
            None => grad,
        };
        grads.insert(var, sum);
    }
    Ok(())
}

/// Whether `flag` is set on any rank (on every rank's word, so all decide alike).
fn any_rank(world: &World, flag: bool) -> Result<bool> {
    let mut any = [f64::from(u8::from(flag))];
    world.sum_f64(&mut any)?;
    Ok(any[0] > 0.0)
}

/// Training steps an epoch takes under `config` from `images` images: the last, short batch
/// left out under `drop_last`.
pub fn steps_per_epoch(config: &Config, images: usize) -> usize {
    if config.drop_last {
        images / step_images(config)
    } else {
        images.div_ceil(step_images(config))
    }
}

fn view<'a>(
    config: &'a Config,
    progress: &'a Progress,
    tally: &'a Tally,
    state: &'a ParamStore,
    optimizer: &'a dyn Optimizer,
) -> RunView<'a> {
    RunView {
        config,
        progress,
        tally,
        state,
        optimizer,
    }
}

/// Scales every gradient by max_norm / (total norm + 1e-6) when that is below 1, as PyTorch's
/// `clip_grad_norm_`, without reading anything back from the device.
pub fn clip_grad_norm(
    grads: &mut GradStore,
    params: &[(String, Var)],
    max_norm: f64,
) -> Result<()> {
    let present: Vec<(&Var, Tensor)> = params
        .iter()
        .filter_map(|(_, var)| Some((var, grads.get(var)?.clone())))
        .collect();
    let Some((first, _)) = present.first() else {
        return Ok(());
    };
    let mut squares = Tensor::zeros((), candle_core::DType::F32, first.device())?;
    for (_, grad) in &present {
        squares = (squares + grad.sqr()?.sum_all()?.to_dtype(candle_core::DType::F32)?)?;
    }
    let scale = (squares.sqrt()? + 1e-6)?
        .recip()?
        .affine(max_norm, 0.0)?
        .clamp(0f32, 1f32)?;
    for (var, grad) in present {
        let clipped = grad.broadcast_mul(&scale.to_dtype(grad.dtype())?)?;
        grads.insert(var, clipped);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two parameters' gradients (3, 4) and (12,): global norm 13. Clipped to 6.5 they are
    /// scaled by 6.5 / (13 + 1e-6), PyTorch's `clip_grad_norm_`, by hand; a bound above the norm
    /// leaves them as they were.
    #[test]
    fn clipping_scales_every_gradient_by_the_bound_over_the_global_norm() {
        let device = Device::Cpu;
        let a = Var::from_slice(&[0f32, 0.0], 2, &device).unwrap();
        let b = Var::from_slice(&[0f32], 1, &device).unwrap();
        let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let grads_of = || {
            let mut grads = GradStore::default();
            grads.insert(&a, Tensor::new(&[3f32, 4.0], &device).unwrap());
            grads.insert(&b, Tensor::new(&[12f32], &device).unwrap());
            grads
        };
        let values = |g: &GradStore, v: &Var| g.get(v).unwrap().to_vec1::<f32>().unwrap();
        let mut grads = grads_of();
        clip_grad_norm(&mut grads, &params, 6.5).unwrap();
        let scale = (6.5 / (13.0 + 1e-6)) as f32;
        for (got, want) in values(&grads, &a)
            .into_iter()
            .chain(values(&grads, &b))
            .zip([3.0 * scale, 4.0 * scale, 12.0 * scale])
        {
            assert!(
                (got - want).abs() <= 1e-6 * want.abs(),
                "{got} against {want}"
            );
        }
        let mut grads = grads_of();
        clip_grad_norm(&mut grads, &params, 100.0).unwrap();
        assert_eq!(values(&grads, &a), [3.0, 4.0]);
        assert_eq!(values(&grads, &b), [12.0]);
    }
}
