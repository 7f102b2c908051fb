//! `train`: the command line over `kiln::train`.

// See Cargo.toml: large tensors are allocated and freed every step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};

use candle_core::Device;
use kiln::config::{self, Overrides};
use kiln::data;
use kiln::device::{self, DeviceRequest};
use kiln::dist::{launch, World};
use kiln::models::{self, Task};
use kiln::report::{Output, Reporter};
use kiln::train::classify::{self, Options};
use kiln::train::fit::Outcome;
use kiln::train::linear_fit;
use kiln::train::plan::{Begin, Plan, Request};
use kiln::train::warm_up::warm_up;

const EXAMPLES: &str = "\
Examples:
  train --model linear                      check the set-up: fit y = 3x + 2, print weight and bias
  train --model simplecnn --epochs 10       SimpleCNN on CIFAR-10, best device available
  train --device cpu --epochs 1 --run quick one CPU epoch into models/quick/
  train --config configs/simplecnn.toml --lr 0.0005 --optimizer sgd

  train --resume                            continue models/simplecnn/ where it stopped
  train --dataset synthetic --epochs 2      no data at hand: ten classes of generated images
  train --model resnet18 --lr-find          suggest a learning rate (plot in models/resnet18/)
  train --model resnet18 --tensorboard      also log for: tensorboard --logdir models
  mpirun -np 2 train --device cpu           two processes (a build with --features mpi)

Each run writes models/<run>/: config.toml (the resolved settings), metrics.csv (one row per
epoch), last.safetensors and best.safetensors (weights with PyTorch parameter names), and
checkpoints/ (everything --resume needs). Ctrl-C stops after the current step with a checkpoint
(exit 130); a second Ctrl-C stops at once.
Logs: RUST_LOG=info (or debug) for more detail on stderr.";

/// Train an image classifier (SimpleCNN, ResNet-18/34/50, fastnet) on CIFAR-10 or your own
/// pictures, on Metal, CUDA or the CPU, one process or several; or run the linear set-up check.
///
/// Settings come from the model's config (configs/<model>.toml, built in) or from --config FILE;
/// the flags below override single values.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    /// Model to train [default: simplecnn, or the model named in --config]
    #[arg(long, value_name = "NAME", help_heading = "Run")]
    model: Option<String>,

    /// TOML file with every hyper-parameter (see configs/)
    #[arg(long, value_name = "FILE", help_heading = "Run")]
    config: Option<PathBuf>,

    /// Where to train: auto (Metal, then CUDA, then CPU), cpu, cuda, cuda:N, metal, metal:N
    #[arg(
        long,
        default_value = "auto",
        value_name = "DEVICE",
        help_heading = "Run"
    )]
    device: DeviceRequest,

    /// CPU threads for the CPU backend [default: all cores, or RAYON_NUM_THREADS; under mpirun
    /// or srun, the cores shared among the processes on the machine]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..), help_heading = "Run")]
    threads: Option<u16>,

    /// Train on N GPUs of this machine, one process each, started through mpirun (needs a build
    /// with --features nccl); --batch-size is then the batch of all N together. For
    /// several machines or CPU processes, start kiln under mpirun or srun yourself
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..), help_heading = "Run")]
    gpus: Option<u16>,

    #[command(flatten)]
    overrides: Overrides,

    /// Where run directories go
    #[arg(
        long,
        default_value = "models",
        value_name = "DIR",
        help_heading = "Output"
    )]
    models_dir: PathBuf,

    /// Name of this run's directory under --models-dir [default: the model name]
    #[arg(long, value_name = "NAME", help_heading = "Output")]
    run: Option<String>,

    /// Replace the results of an earlier run in the same directory
    #[arg(long, help_heading = "Output", conflicts_with = "resume")]
    overwrite: bool,

    /// Continue the run in --models-dir/--run from its newest checkpoint that loads and
    /// verifies, or from the checkpoint file PATH. --epochs is the total. A run directory with
    /// no results yet starts from scratch, so the same command can be repeated after any crash;
    /// one with results but no usable checkpoint is refused and left as it is
    #[arg(long, value_name = "PATH", num_args = 0..=1, help_heading = "Checkpoints")]
    resume: Option<Option<PathBuf>>,

    /// Start from a safetensors weights file with PyTorch parameter names (for example one
    /// saved by the tutorial's PyTorch code); names and shapes must match the model
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "resume",
        help_heading = "Checkpoints"
    )]
    init_weights: Option<PathBuf>,

    /// With --init-weights: fine-tune. Take every tensor whose name and shape match (a
    /// torchvision ResNet from pytorch/export_torchvision.py, a run on other classes), start the
    /// rest afresh (the classifier, for a new number of classes) and list them
    #[arg(long, requires = "init_weights", help_heading = "Checkpoints")]
    finetune: bool,

    /// Also checkpoint every N steps (a checkpoint is always written after each epoch)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Checkpoints")]
    checkpoint_every: Option<u64>,

    /// Write a Chrome/Perfetto trace of every step's phases (data, forward, backward,
    /// optimizer, evaluate, checkpoint) to FILE; open it at https://ui.perfetto.dev
    #[arg(long, value_name = "FILE", help_heading = "Output")]
    trace: Option<PathBuf>,

    /// Print nothing but errors
    #[arg(long, conflicts_with = "json_logs", help_heading = "Output")]
    quiet: bool,

    /// Print one JSON object per epoch (and a summary) on stdout, for scripts
    #[arg(long, help_heading = "Output")]
    json_logs: bool,

    /// Instead of training: the learning-rate range test (as Lightning's lr_find). From the
    /// starting weights, one step per rate from 1e-7 to 10, growing exponentially, until the
    /// loss diverges; prints the rate where the smoothed loss falls fastest and plots the curve
    /// to <run>/lr_find.png. Writes nothing else: no weights, checkpoints or metrics
    #[arg(long, conflicts_with = "resume", help_heading = "Run")]
    lr_find: bool,

    /// Steps of the range test [default: 200]
    #[arg(long, value_name = "N", requires = "lr_find", value_parser = clap::value_parser!(u16).range(20..), help_heading = "Run")]
    lr_find_steps: Option<u16>,

    /// End-of-epoch checkpoints to keep in <run>/checkpoints (best.safetensors is always kept)
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..), help_heading = "Checkpoints")]
    keep: u64,
}

/// The CLI, with the model list filled in from the registry.
fn command() -> clap::Command {
    let models: Vec<String> = models::MODELS
        .iter()
        .map(|m| format!("  {:<10} {}", m.name, m.about))
        .collect();
    Cli::command().mut_arg("model", |arg| {
        arg.long_help(format!(
            "Model to train [default: {}, or the model named in --config]\n{}",
            config::DEFAULT_MODEL,
            models.join("\n")
        ))
    })
}

fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    if let Some(gpus) = cli.gpus {
        return match launch::run_under_mpirun(usize::from(gpus), &without_gpus_flag()) {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let world = match World::start() {
        Ok(world) => world,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let trace = cli.trace.clone();
    kiln::cli::exit_code(trace.as_deref(), || {
        let outcome = run(cli, &world);
        if let (Err(err), true) = (&outcome, world.is_distributed()) {
            // The other ranks would wait for this one in their next exchange: end them all.
            eprintln!(
                "error: rank {} of {} failed: {err:#}",
                world.rank(),
                world.size()
            );
            world.abort(1);
        }
        outcome
    })
}

/// This program's arguments without `--gpus N` (`--gpus=N`), for the processes it starts.
fn without_gpus_flag() -> Vec<std::ffi::OsString> {
    let mut args = Vec::new();
    let mut skip_value = false;
    for arg in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        match arg.to_str() {
            Some("--gpus") => skip_value = true,
            Some(a) if a.starts_with("--gpus=") => {}
            _ => args.push(arg),
        }
    }
    args
}

fn run(cli: Cli, world: &World) -> anyhow::Result<ExitCode> {
    // Processes on one machine share its cores, unless told otherwise.
    let threads = cli.threads.map(usize::from).or_else(|| {
        world.is_distributed().then(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / world.local_size()).max(1)
        })
    });
    device::prepare_cpu_threads(threads);
    let reporter = Reporter::new(if cli.quiet || !world.is_root() {
        Output::Quiet
    } else if cli.json_logs {
        Output::Json
    } else {
        Output::Human
    });
    let device = device::open_for_rank(cli.device, world.local_rank())?;
    let world = &world.with_gpu(&device)?;
    let plan = Plan::resolve(&request(&cli), &device)?;
    reporter.note(&format!("device: {}", device::describe(&device)));
    if world.is_distributed() {
        reporter.note(&format!(
            "data-parallel over {} process{} ({} on this machine); batch {} in all",
            world.size(),
            if world.size() == 1 { "" } else { "es" },
            world.local_size(),
            plan.config.batch_size
        ));
    }
    match plan.spec.task {
        Task::LinearFit => linear_check(&cli, &plan, &device, reporter, world),
        Task::ImageClassification => train_classifier(&cli, plan, &device, reporter, world),
    }
}

/// What the command line asks for, as the run plan takes it.
fn request(cli: &Cli) -> Request {
    Request {
        model: cli.model.clone(),
        config_file: cli.config.clone(),
        overrides: cli.overrides.clone(),
        models_dir: cli.models_dir.clone(),
        run: cli.run.clone(),
        start: match (&cli.resume, &cli.init_weights) {
            (Some(checkpoint), _) => Begin::Resume(checkpoint.clone()),
            (None, Some(path)) => Begin::Weights {
                path: path.clone(),
                finetune: cli.finetune,
            },
            (None, None) => Begin::Fresh,
        },
    }
}

/// `train --model linear`: the set-up check, which saves nothing.
fn linear_check(
    cli: &Cli,
    plan: &Plan,
    device: &Device,
    reporter: Reporter,
    world: &World,
) -> anyhow::Result<ExitCode> {
    let name = plan.spec.name;
    if world.size() > 1 {
        anyhow::bail!("--model {name} is a one-process check; run it without mpirun or srun");
    }
    // (--resume and --init-weights: the plan refuses them.)
    if cli.checkpoint_every.is_some() {
        anyhow::bail!("--checkpoint-every does not apply to --model {name}: the set-up check saves nothing to resume or start from");
    }
    let fit = linear_fit::run(plan.spec, &plan.config, device)?;
    let verdict = if fit.looks_right() {
        "set-up looks right: kiln trains on this device (expected about weight=3, bias=2)"
    } else {
        "expected about weight=3 and bias=2: training on this device is not working as it should"
    };
    match reporter.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"event": "linear_fit", "weight": fit.weight, "bias": fit.bias,
                               "loss": fit.final_loss, "looks_right": fit.looks_right()})
        ),
        _ => reporter.note(&format!(
            "weight={:.4} bias={:.4} (loss {:.5})\n{verdict}",
            fit.weight, fit.bias, fit.final_loss
        )),
    }
    if fit.looks_right() {
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!("{verdict} (weight={:.4} bias={:.4})", fit.weight, fit.bias)
    }
}

fn train_classifier(
    cli: &Cli,
    plan: Plan,
    device: &Device,
    reporter: Reporter,
    world: &World,
) -> anyhow::Result<ExitCode> {
    for note in &plan.notes {
        reporter.note(note);
    }
    let config = &plan.config;
    let fetch = cli.overrides.data.source();
    let request = data::Request {
        dataset: config.dataset,
        dir: &config.data_dir,
        synthetic_images: config.synthetic_images,
        fetch: fetch.as_ref(),
        folder: config.folder_options(),
    };
    // The GPU's libraries, kernels and convolution plans load on another thread while the data
    // loads: otherwise the first epoch waits for them.
    let dimensions = data::known_dimensions(&request);
    let (loaded, prepared) = std::thread::scope(|scope| {
        let preparing = scope.spawn(|| -> kiln::Result<()> {
            kiln::ops::prepare(device)?;
            match dimensions {
                Some(dimensions) => warm_up(&plan, dimensions, device),
                None => Ok(()),
            }
        });
        // A download or decoded-image cache is made once per machine, then read by the rest.
        let loaded = world.local_rank_zero_first(|| {
            data::load(
                &request,
                &kiln::cli::decode_bar(reporter.output == Output::Human),
            )
        });
        (loaded, preparing.join())
    });
    let (data, report) = loaded?;
    match prepared {
        Ok(Ok(())) => {}
        // Not fatal: the first step loads what is missing, and reports what fails then.
        Ok(Err(err)) => tracing::warn!("preparing {}: {err}", device::describe(device)),
        Err(_) => anyhow::bail!("preparing {} panicked", device::describe(device)),
    }
    if let Some(report) = report {
        reporter.note(&kiln::cli::folder_summary(&config.data_dir, &data, &report));
    }
    let stop = stop_on_signals()?;
    let options = Options {
        checkpoint_every: cli.checkpoint_every,
        keep: cli.keep as usize,
        stop: &stop,
        trace: cli.trace.is_some(),
        reporter,
        overwrite: cli.overwrite,
        world,
        tensorboard_dir: cli.overrides.tensorboard.clone().flatten(),
        lr_find: cli.lr_find.then(|| {
            let default = kiln::train::lr_find::Sweep::default();
            kiln::train::lr_find::Sweep {
                steps: cli.lr_find_steps.map_or(default.steps, usize::from),
                ..default
            }
        }),
    };
    let (name, epochs, run_dir) = (plan.spec.name, config.epochs, plan.run_dir.clone());
    let ended = classify::run(plan, data, device, &options)
        .with_context(|| format!("training {name} failed"))?;
    if cli.lr_find {
        return Ok(ExitCode::SUCCESS);
    }
    match ended.outcome {
        Outcome::Finished(_) => Ok(ExitCode::SUCCESS),
        Outcome::AlreadyDone { epochs: done } => {
            reporter.note(&format!(
                "run {} has already done {done} of {epochs} epochs; pass a larger --epochs to train on",
                run_dir.path().display(),
            ));
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Interrupted => {
            if let Some(checkpoint) = ended.checkpoint {
                eprintln!("interrupted: checkpoint saved to {}", checkpoint.display());
            }
            if world.is_root() {
                eprintln!("resume with: {}", resume_command(cli));
            }
            Ok(ExitCode::from(130))
        }
    }
}

/// The command that continues this run.
fn resume_command(cli: &Cli) -> String {
    let mut command = String::from("train --resume");
    if let Some(run) = &cli.run {
        command.push_str(&format!(" --run {run}"));
    }
    if cli.models_dir != Path::new("models") {
        command.push_str(&format!(" --models-dir {}", cli.models_dir.display()));
    }
    command
}

/// A flag raised by the first SIGINT (Ctrl-C) or SIGTERM, which training answers by stopping
/// after the current step with a checkpoint; a second signal exits at once.
fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag before the second handler sets it.
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop))
            .context("cannot install the Ctrl-C handler")?;
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install the Ctrl-C handler")?;
    }
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn every_model_is_named_in_help() {
        let help = command().render_long_help().to_string();
        for spec in models::MODELS {
            assert!(
                help.contains(spec.name),
                "{} missing from --help",
                spec.name
            );
        }
    }
}
