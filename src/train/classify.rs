//! An image-classification run put together: the model for the data, its start (fresh, a
//! weights file, or a checkpoint), the run directory, the data on the device, and the loop
//! ([`fit`]) with its observers. Everything is loaded and checked before the run directory is
//! touched, so a bad input never costs an earlier run its files.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::Device;

use super::fit::{self, Data, Driving, Observer, Outcome, Trainee};
use super::observers::{Checkpointer, Console, EarlyStopping, MetricsLog, TensorBoard};
use super::plan::{Plan, Start};
use crate::checkpoint::{self, Progress, RunDir};
use crate::config::Config;
use crate::data::batches::{BatchBuffer, DeviceSet};
use crate::data::{ChannelStats, DataSets};
use crate::dist::World;
use crate::error::{Error, Result};
use crate::metrics::Tally;
use crate::models::{self, Architecture, ModelSpec};
use crate::optim;
use crate::report::Reporter;

pub struct Options<'a> {
    /// Also checkpoint every N steps within epochs.
    pub checkpoint_every: Option<u64>,
    /// End-of-epoch checkpoints to keep.
    pub keep: usize,
    /// Set (by a signal handler) to stop after the current step, with a checkpoint.
    pub stop: &'a AtomicBool,
    /// A run not resumed from a checkpoint may replace an earlier run in its directory
    /// (`--overwrite`; a resume that found nothing to resume owns its directory anyway).
    pub overwrite: bool,
    /// Tracing is recording (`--trace`): phases wait for the device, so spans time real work.
    pub trace: bool,
    pub reporter: Reporter,
    /// The processes training together; rank 0 alone writes the run directory.
    pub world: &'a World,
    /// Where TensorBoard's event files go under `config.tensorboard` (None: the run directory).
    pub tensorboard_dir: Option<PathBuf>,
    /// Run the learning-rate range test instead of training (`--lr-find`).
    pub lr_find: Option<super::lr_find::Sweep>,
}

/// How the run ended, and the checkpoint that continues it if it was interrupted.
pub struct Ended {
    pub outcome: Outcome,
    pub checkpoint: Option<PathBuf>,
}

/// The network `spec` for `data` under `config`.
pub fn architecture(config: &Config, data: &DataSets) -> Result<Architecture> {
    Architecture::new(
        data.classes.len(),
        data.train.side(),
        config.stem,
        config.width,
    )
}

/// Trains as `plan` says on `data`, writing into its run directory.
pub fn run(plan: Plan, data: DataSets, device: &Device, options: &Options) -> Result<Ended> {
    let Plan {
        spec,
        ref config,
        start,
        ref run_dir,
        dtype: input_dtype,
        resuming,
        ..
    } = plan;
    let arch = architecture(config, &data)?;
    config.augment.validate(arch.image_size)?;
    let batch_sync = options.world.batch_sync().filter(|_| config.sync_bn);
    let built = models::build_synced(spec, &arch, config.seed, device, batch_sync)?;
    let steps_per_epoch = fit::steps_per_epoch(config, data.train.len());
    if steps_per_epoch == 0 {
        return Err(Error::InvalidSetting(format!(
            "drop_last with {} training images and batches of {} leaves no batch to train on; \
             use a smaller batch_size or drop_last = false",
            data.train.len(),
            config.batch_size
        )));
    }
    check_shares(config, data.train.len(), options.world)?;
    let optimizer = optim::build(&config.optim(), &built.params, steps_per_epoch)?;
    let mut optimizer = optim::for_precision(
        optimizer,
        built.params.vars(),
        input_dtype,
        config.loss_scale,
    );
    let fresh = matches!(start, Start::Fresh);
    // Weights trained elsewhere expect the inputs normalised as they were trained.
    let mut weights_stats = None;
    let (progress, resumed_tally) = match start {
        Start::Fresh => (Progress::default(), None),
        Start::Weights { path, finetune } => {
            let weights = checkpoint::load_weights(&path, device)?;
            let meta = |key: &str| weights.metadata.get(key);
            if let (Some(mean), Some(std)) = (meta("normalize_mean"), meta("normalize_std")) {
                weights_stats = ChannelStats::parse(mean, std);
            }
            if let Some(saved) = weights.metadata.get("model") {
                if !saved.eq_ignore_ascii_case(spec.name) {
                    return Err(crate::error::Error::WeightsInvalid {
                        path,
                        message: format!("it holds a {saved} model, not {}", spec.name),
                    });
                }
            }
            if finetune {
                let matched = checkpoint::assign_matching(&built.params.state(), &weights.tensors)?;
                if matched.loaded == 0 {
                    return Err(crate::error::Error::WeightsInvalid {
                        path,
                        message: format!(
                            "none of its tensors fits this {} ({} stem, width {}); was it saved from another model?",
                            spec.name, arch.stem, arch.width
                        ),
                    });
                }
                options.reporter.note(&finetune_note(&path, &matched));
            } else {
                check_classes(&weights.metadata, &data.classes, &path)?;
                checkpoint::assign(&built.params.state(), &weights.tensors, &path)?;
            }
            (Progress::default(), None)
        }
        Start::Resume(path, saved) => {
            weights_stats = saved.stats;
            if let Some(saved_classes) = saved.classes.as_ref().filter(|c| !c.is_empty()) {
                if *saved_classes != data.classes {
                    return Err(crate::error::Error::CheckpointMismatch(format!(
                        "{} was trained on the classes {}, and the data now has {}; resume with that data, or start a new run with --run NAME",
                        path.display(),
                        saved_classes.join(", "),
                        data.classes.join(", ")
                    )));
                }
            }
            checkpoint::assign(&built.params.state(), &saved.weights, &path)?;
            optimizer.load_state(&saved.optimizer)?;
            let tally = Tally::from_state(&saved.tally, saved.tally_seen, device)?;
            // The checkpoint keeps no times; metrics.csv still has those of its epochs.
            let recorded = std::fs::read_to_string(run_dir.metrics()).unwrap_or_default();
            let history = crate::metrics::with_timing_from(&saved.progress.history, &recorded);
            (
                Progress {
                    history,
                    ..saved.progress
                },
                Some(tally),
            )
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
    let world = options.world;
    if let Some(sweep) = &options.lr_find {
        return find_lr(
            spec,
            config,
            data,
            device,
            run_dir,
            built,
            optimizer,
            input_dtype,
            sweep,
            options,
        );
    }
    // Held until the run returns: no second process trains (or resumes) here meanwhile.
    let _lock = world.is_root().then(|| run_dir.lock()).transpose()?;
    if world.is_root() {
        if progress.global_step == 0 {
            run_dir.start_fresh(options.overwrite || resuming)?;
        } else {
            run_dir.create_dirs()?;
        }
        crate::fs::write_atomic(&run_dir.config(), config.to_toml().as_bytes())?;
    }
    let reporter = options.reporter;
    reporter.note(&format!(
        "training {}{} ({} classes) on {} images ({} test), epochs {}..={}, batch {}, {} lr {} ({} schedule); writing to {}",
        spec.name,
        if spec.has_stem {
            format!(" with the {} stem", arch.stem)
        } else {
            String::new()
        },
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
    // torchvision-stem networks see inputs normalised as ImageNet's (what pretrained weights
    // expect) and others the data set's own, unless the weights started from say otherwise.
    let stats = match (weights_stats, arch.stem) {
        (Some(stats), _) => stats,
        (None, crate::models::Stem::Imagenet) if spec.has_stem => ChannelStats::IMAGENET,
        (None, _) => data.stats,
    };
    let classes = data.classes.clone();
    // The whole data set lives where training runs; batches are cut from it there.
    let train = DeviceSet::new(data.train, stats, device)?;
    let test = DeviceSet::new(data.test, stats, device)?;
    let started = std::time::Instant::now();
    if let Some(count) = set_up_from_data(spec, &built, &train, fresh)? {
        reporter.note(&format!(
            "{} set up from the first {count} training images in {:.3} s",
            spec.name,
            started.elapsed().as_secs_f64()
        ));
    }
    let mut checkpointer = Checkpointer {
        run_dir,
        model: spec.name,
        device: crate::device::describe(device),
        metadata: weights_metadata(spec, config, &arch, &classes, &stats),
        classes: classes.clone(),
        stats,
        every_steps: options.checkpoint_every,
        keep: options.keep,
        last_written: None,
    };
    let mut metrics = MetricsLog { run_dir };
    let mut early_stopping = EarlyStopping {
        patience: config.early_stop,
    };
    let mut console = Console::new(reporter, run_dir, device, train_images);
    // Every rank decides early stopping alike (from the same figures); rank 0 alone writes
    // and prints.
    let mut tensorboard = match (config.tensorboard && world.is_root()).then(|| {
        let dir = options
            .tensorboard_dir
            .clone()
            .unwrap_or_else(|| run_dir.path().to_path_buf());
        crate::tensorboard::EventWriter::create(&dir)
    }) {
        Some(writer) => {
            let writer = writer?;
            reporter.note(&format!(
                "TensorBoard: tensorboard --logdir {}",
                writer.path().parent().unwrap_or(run_dir.path()).display()
            ));
            Some(TensorBoard::new(writer))
        }
        None => None,
    };
    let mut observers: Vec<&mut dyn Observer> = if world.is_root() {
        vec![
            &mut checkpointer,
            &mut metrics,
            &mut early_stopping,
            &mut console,
        ]
    } else {
        vec![&mut early_stopping]
    };
    if let Some(tensorboard) = tensorboard.as_mut() {
        observers.push(tensorboard);
    }
    // One start for every replica: rank 0's parameters and buffers (the same seed gives the
    // same weights, but a replica must never train from other weights than the one it saves).
    world.broadcast_state(&built.params.state())?;
    let outcome = fit::fit(
        Trainee {
            model: built.module.as_ref(),
            state: &built.params,
            optimizer: optimizer.as_mut(),
            input_dtype,
        },
        &Data {
            train: &train,
            test: &test,
            image_width: arch.image_size,
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
            world,
        },
    )?;
    Ok(Ended {
        outcome,
        checkpoint: checkpointer.last_written,
    })
}

/// Sets up a `fresh` model that starts from data (fastnet's whitening) from the first training
/// images; how many it took, if it did.
fn set_up_from_data(
    spec: &ModelSpec,
    built: &models::Built,
    train: &DeviceSet,
    fresh: bool,
) -> Result<Option<usize>> {
    let Some(init) = spec.data_init.as_ref().filter(|_| fresh) else {
        return Ok(None);
    };
    let count = init.images.min(train.len());
    let order = train.order(&(0..count).collect::<Vec<_>>())?;
    let (images, _) = train.batch(&order, 0..count, &mut BatchBuffer::default(), None)?;
    (init.apply)(&built.params, &images)?;
    Ok(Some(count))
}

/// `train --lr-find`: the range test from the run's starting weights on its training data;
/// prints the suggestion and writes `lr_find.png` into the run directory, and nothing else.
#[allow(clippy::too_many_arguments)]
fn find_lr(
    spec: &ModelSpec,
    config: &Config,
    data: DataSets,
    device: &Device,
    run_dir: &RunDir,
    built: models::Built,
    mut optimizer: Box<dyn optim::Optimizer>,
    input_dtype: candle_core::DType,
    sweep: &super::lr_find::Sweep,
    options: &Options,
) -> Result<Ended> {
    if options.world.is_distributed() {
        return Err(Error::InvalidSetting(
            "--lr-find runs on one process; start it without mpirun or srun".into(),
        ));
    }
    let reporter = options.reporter;
    let image_width = data.train.side();
    let stats = data.stats;
    let train = DeviceSet::new(data.train, stats, device)?;
    set_up_from_data(spec, &built, &train, true)?;
    reporter.note(&format!(
        "learning-rate range test: {} steps of batch {}, lr {:.0e} to {:.0e}, from {}'s starting weights",
        sweep.steps, config.batch_size, sweep.min_lr, sweep.max_lr, spec.name
    ));
    let human = reporter.output == crate::report::Output::Human;
    let bar = crate::cli::counting_bar(human, "learning-rate range test");
    let found = super::lr_find::sweep(
        built.module.as_ref(),
        optimizer.as_mut(),
        &train,
        image_width,
        config,
        input_dtype,
        sweep,
        |done| bar(done, sweep.steps),
    )?;
    bar(sweep.steps, sweep.steps);
    std::fs::create_dir_all(run_dir.path()).map_err(Error::io("cannot create", run_dir.path()))?;
    let plot = run_dir.lr_find_plot();
    let curve = crate::plots::RangeTest {
        rates: &found.rates,
        losses: &found.losses,
        smoothed: &found.smoothed,
        suggestion: found.suggestion,
    };
    crate::plots::lr_find_png(&plot, &curve)?;
    match found.suggestion {
        // The result itself: printed whatever the output mode.
        Some(rate) if reporter.output == crate::report::Output::Json => println!(
            "{}",
            serde_json::json!({"event": "lr_find", "suggested_lr": rate, "steps": found.rates.len(),
                               "plot": plot.display().to_string()})
        ),
        Some(rate) => println!("suggested learning rate: {rate:.2e}"),
        None => {
            return Err(Error::InvalidSetting(format!(
                "the range test stopped after {} steps, too few to suggest a rate (the loss \
                 diverged at once?); try a smaller starting rate; the curve is in {}",
                found.rates.len(),
                plot.display()
            )))
        }
    }
    reporter.note(&format!("the loss against the rate: {}", plot.display()));
    Ok(Ended {
        outcome: Outcome::AlreadyDone { epochs: 0 },
        checkpoint: None,
    })
}

/// Every rank of a data-parallel run needs at least one image of every batch (a rank with none
/// would have no gradient to add): the batch, and a short last one, at least the world's size.
fn check_shares(config: &Config, images: usize, world: &World) -> Result<()> {
    let ranks = world.size();
    if ranks == 1 {
        return Ok(());
    }
    if config.batch_size < ranks {
        return Err(Error::InvalidSetting(format!(
            "batch_size {} is smaller than the {ranks} processes sharing each batch; the batch \
             size is the global batch, so use at least {ranks}",
            config.batch_size
        )));
    }
    // The epoch's last step, and its last micro-batch under `accumulate`.
    let last = images % (config.batch_size * config.accumulate) % config.batch_size;
    if !config.drop_last && last > 0 && last < ranks {
        return Err(Error::InvalidSetting(format!(
            "the epoch's last batch holds {last} of {images} images, fewer than the {ranks} \
             processes sharing it; set drop_last = true, or a batch size that leaves none or at \
             least {ranks} over"
        )));
    }
    Ok(())
}

/// What fine-tuning took from `path` and what it started afresh.
fn finetune_note(path: &std::path::Path, matched: &checkpoint::Matched) -> String {
    let mut note = format!(
        "fine-tuning from {}: {} tensors loaded",
        path.display(),
        matched.loaded
    );
    if matched.fresh.is_empty() {
        note.push_str(", none started afresh");
    } else {
        note.push_str(&format!("; started afresh: {}", matched.fresh.join(", ")));
    }
    if !matched.unused.is_empty() {
        let shown: Vec<&str> = matched.unused.iter().take(6).map(String::as_str).collect();
        let more = matched.unused.len().saturating_sub(shown.len());
        note.push_str(&format!("; not used from the file: {}", shown.join(", ")));
        if more > 0 {
            note.push_str(&format!(" and {more} more"));
        }
    }
    note
}

/// A weights file that names its classes must name the data's (fine-tuning aside).
fn check_classes(
    metadata: &std::collections::HashMap<String, String>,
    classes: &[String],
    path: &std::path::Path,
) -> Result<()> {
    let Some(list) = metadata.get("classes") else {
        return Ok(());
    };
    let saved: Vec<String> = serde_json::from_str(list).unwrap_or_default();
    if saved.is_empty() || saved == classes {
        return Ok(());
    }
    Err(crate::error::Error::WeightsInvalid {
        path: path.to_path_buf(),
        message: format!(
            "it was trained on the classes {}, and the data has {}; add --finetune to start its classifier afresh for these",
            saved.join(", "),
            classes.join(", ")
        ),
    })
}

/// What a reader of a weights file needs to rebuild the model and reproduce its predictions.
pub fn weights_metadata(
    spec: &ModelSpec,
    config: &Config,
    arch: &Architecture,
    classes: &[String],
    stats: &ChannelStats,
) -> BTreeMap<String, String> {
    let size = arch.image_size;
    let mut metadata = BTreeMap::from([
        ("model".to_string(), spec.name.to_string()),
        ("num_classes".to_string(), arch.num_classes.to_string()),
        // A JSON array: class names are folder names, which may hold commas.
        (
            "classes".to_string(),
            serde_json::to_string(classes).unwrap_or_default(),
        ),
        ("stem".to_string(), arch.stem.to_string()),
        ("width".to_string(), arch.width.to_string()),
        ("image_size".to_string(), size.to_string()),
        (
            "input".to_string(),
            format!("float32 [N,3,{size},{size}], RGB scaled to [0,1] then normalised"),
        ),
        (
            "normalize_mean".to_string(),
            ChannelStats::list(&stats.mean),
        ),
        ("normalize_std".to_string(), ChannelStats::list(&stats.std)),
        ("dataset".to_string(), config.dataset.to_string()),
    ]);
    if config.dataset == crate::data::Dataset::Folder {
        // How evaluate finds the same held-out images in a folder without train/ and val/.
        metadata.insert("val_split".into(), config.val_split.to_string());
        metadata.insert("split_seed".into(), config.seed.to_string());
        // evaluate's default folder: the one trained on, wherever it is run from.
        let dir = std::fs::canonicalize(&config.data_dir).unwrap_or(config.data_dir.clone());
        metadata.insert("data_dir".into(), dir.display().to_string());
    }
    metadata
}
