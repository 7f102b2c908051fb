//! An image-classification run put together: the model for the data, its start (fresh, a
//! weights file, or a checkpoint), the run directory, the data on the device, and the loop
//! ([`fit`]) with its observers. Everything is loaded and checked before the run directory is
//! touched, so a bad input never costs an earlier run its files.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::Device;

use super::fit::{self, Data, Driving, Observer, Outcome, Trainee};
use super::observers::{Checkpointer, Console, EarlyStopping, MetricsLog};
use crate::checkpoint::{self, Checkpoint, Progress, RunDir};
use crate::config::Config;
use crate::data::batches::DeviceSet;
use crate::data::cifar::{MEAN, SIDE, STD};
use crate::data::DataSets;
use crate::error::Result;
use crate::metrics::Tally;
use crate::models::{self, Architecture, ModelSpec};
use crate::optim;
use crate::report::Reporter;

/// Where a run's parameters come from.
pub enum Start {
    /// The model's seeded initialisation.
    Fresh,
    /// A weights file with PyTorch names (`--init-weights`).
    Weights(PathBuf),
    /// A checkpoint: weights, optimizer state and position (`--resume`).
    Resume(PathBuf, Box<Checkpoint>),
}

pub struct Options<'a> {
    /// Also checkpoint every N steps within epochs.
    pub checkpoint_every: Option<u64>,
    /// End-of-epoch checkpoints to keep.
    pub keep: usize,
    /// Set (by a signal handler) to stop after the current step, with a checkpoint.
    pub stop: &'a AtomicBool,
    /// A run not resumed from a checkpoint may replace an earlier run in its directory.
    pub overwrite: bool,
    /// Tracing is recording (`--trace`): phases wait for the device, so spans time real work.
    pub trace: bool,
    pub reporter: Reporter,
}

/// How the run ended, and the checkpoint that continues it if it was interrupted.
pub struct Ended {
    pub outcome: Outcome,
    pub checkpoint: Option<PathBuf>,
}

/// The network `spec` for `data` under `config`.
pub fn architecture(config: &Config, data: &DataSets) -> Result<Architecture> {
    Architecture::new(data.classes.len(), SIDE, config.stem, config.width)
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
) -> Result<Ended> {
    let arch = architecture(config, &data)?;
    config.augment.validate(SIDE)?;
    let built = models::build(spec, &arch, config.seed, device)?;
    let mut optimizer = optim::build(config, built.params.vars())?;
    let (progress, resumed_tally) = match start {
        Start::Fresh => (Progress::default(), None),
        Start::Weights(path) => {
            let weights = checkpoint::load_weights(&path, device)?;
            if let Some(saved) = weights.metadata.get("model") {
                if !saved.eq_ignore_ascii_case(spec.name) {
                    return Err(crate::error::Error::WeightsInvalid {
                        path,
                        message: format!("it holds a {saved} model, not {}", spec.name),
                    });
                }
            }
            checkpoint::assign(&built.params.state(), &weights.tensors, &path)?;
            (Progress::default(), None)
        }
        Start::Resume(path, saved) => {
            checkpoint::assign(&built.params.state(), &saved.weights, &path)?;
            optimizer.load_state(&saved.optimizer)?;
            let tally = Tally::from_state(&saved.tally, saved.tally_seen, device)?;
            (saved.progress, Some(tally))
        }
    };
    if progress.global_step > 0 && progress.epochs_done >= config.epochs {
        return Ok(Ended {
            outcome: Outcome::AlreadyDone {
                epochs: progress.epochs_done,
            },
            checkpoint: None,
        });
    }
    if progress.global_step == 0 {
        run_dir.start_fresh(options.overwrite)?;
    } else {
        run_dir.create_dirs()?;
    }
    checkpoint::write_atomic(&run_dir.config(), config.to_toml().as_bytes())?;
    let reporter = options.reporter;
    reporter.note(&format!(
        "training {} ({} stem, {} classes) on {} images ({} test), epochs {}..={}, batch {}, {} lr {} ({} schedule); writing to {}",
        spec.name,
        arch.stem,
        arch.num_classes,
        data.train.len(),
        data.test.len(),
        progress.epochs_done + 1,
        config.epochs,
        config.batch_size,
        config.optimizer,
        config.lr,
        config.schedule.kind,
        run_dir.path().display()
    ));

    let train_images = data.train.len();
    let classes = data.classes.clone();
    // The whole data set lives where training runs; batches are cut from it there.
    let train = DeviceSet::new(data.train, device)?;
    let test = DeviceSet::new(data.test, device)?;
    let mut checkpointer = Checkpointer {
        run_dir,
        model: spec.name,
        device: crate::device::describe(device),
        metadata: weights_metadata(spec, &arch, &classes),
        every_steps: options.checkpoint_every,
        keep: options.keep,
        last_written: None,
    };
    let mut metrics = MetricsLog { run_dir };
    let mut early_stopping = EarlyStopping {
        patience: config.early_stop,
    };
    let mut console = Console::new(reporter, run_dir, device, train_images);
    let mut observers: [&mut dyn Observer; 4] = [
        &mut checkpointer,
        &mut metrics,
        &mut early_stopping,
        &mut console,
    ];
    let outcome = fit::fit(
        Trainee {
            model: built.module.as_ref(),
            state: &built.params,
            optimizer: optimizer.as_mut(),
        },
        &Data {
            train: &train,
            test: &test,
            image_width: SIDE,
            num_classes: arch.num_classes,
        },
        config,
        progress,
        resumed_tally,
        &mut observers,
        &Driving {
            device,
            stop: options.stop,
            trace: options.trace,
        },
    )?;
    Ok(Ended {
        outcome,
        checkpoint: checkpointer.last_written,
    })
}

/// What a reader of a weights file needs to rebuild the model and reproduce its predictions.
pub fn weights_metadata(
    spec: &ModelSpec,
    arch: &Architecture,
    classes: &[String],
) -> BTreeMap<String, String> {
    let list = |v: &[f32]| v.iter().map(f32::to_string).collect::<Vec<_>>().join(",");
    let size = arch.image_size;
    BTreeMap::from([
        ("model".to_string(), spec.name.to_string()),
        ("num_classes".to_string(), arch.num_classes.to_string()),
        ("classes".to_string(), classes.join(",")),
        ("stem".to_string(), arch.stem.to_string()),
        ("width".to_string(), arch.width.to_string()),
        ("image_size".to_string(), size.to_string()),
        (
            "input".to_string(),
            format!("float32 [N,3,{size},{size}], RGB scaled to [0,1] then normalised"),
        ),
        ("normalize_mean".to_string(), list(&MEAN)),
        ("normalize_std".to_string(), list(&STD)),
    ])
}
