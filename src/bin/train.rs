//! `train`: the command line over `kiln::train`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};

use kiln::checkpoint::RunDir;
use kiln::config::{self, OptimizerKind, Overrides};
use kiln::data::cifar;
use kiln::device::{self, DeviceRequest};
use kiln::models::{self, Task};
use kiln::train::{classify, linear_fit};

const EXAMPLES: &str = "\
Examples:
  train --model linear                      check the set-up: fit y = 3x + 2, print weight and bias
  train --model simplecnn --epochs 10       SimpleCNN on CIFAR-10, best device available
  train --device cpu --epochs 1 --run quick one CPU epoch into models/quick/
  train --config configs/simplecnn.toml --lr 0.0005 --optimizer sgd

Each run writes models/<run>/: config.toml (the resolved settings), metrics.csv (one row per
epoch), last.safetensors and best.safetensors (weights with PyTorch parameter names).
Logs: RUST_LOG=info (or debug) for more detail on stderr.";

/// Train a model: the PyTorch tutorials' SimpleCNN on CIFAR-10, or the linear set-up check.
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
    #[arg(long, default_value = "auto", value_name = "DEVICE", help_heading = "Run")]
    device: DeviceRequest,

    /// CPU threads for the CPU backend [default: all cores, or RAYON_NUM_THREADS]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..), help_heading = "Run")]
    threads: Option<u16>,

    /// Directory holding the CIFAR-10 binary files (data_batch_1.bin .. test_batch.bin)
    /// [config default: data/cifar-10-batches-bin]
    #[arg(long, value_name = "DIR", help_heading = "Data")]
    data_dir: Option<PathBuf>,

    /// Keep the training files' order instead of reshuffling every epoch (to compare runs
    /// side by side with other frameworks)
    #[arg(long, help_heading = "Data")]
    no_shuffle: bool,

    /// Passes over the training set
    #[arg(long, value_name = "N", help_heading = "Hyper-parameters")]
    epochs: Option<usize>,

    /// Images per training step
    #[arg(long, value_name = "N", help_heading = "Hyper-parameters")]
    batch_size: Option<usize>,

    /// Learning rate
    #[arg(long, value_name = "LR", help_heading = "Hyper-parameters")]
    lr: Option<f64>,

    /// adam or sgd
    #[arg(long, value_name = "NAME", help_heading = "Hyper-parameters")]
    optimizer: Option<OptimizerKind>,

    /// SGD momentum (0 turns it off)
    #[arg(long, value_name = "M", help_heading = "Hyper-parameters")]
    momentum: Option<f64>,

    /// L2 penalty added to the gradients, as PyTorch's weight_decay
    #[arg(long, value_name = "WD", help_heading = "Hyper-parameters")]
    weight_decay: Option<f64>,

    /// Seed for initial weights and data order; the same seed on the CPU gives the same run
    #[arg(long, value_name = "N", help_heading = "Hyper-parameters")]
    seed: Option<u64>,

    /// Where run directories go
    #[arg(long, default_value = "models", value_name = "DIR", help_heading = "Output")]
    models_dir: PathBuf,

    /// Name of this run's directory under --models-dir [default: the model name]
    #[arg(long, value_name = "NAME", help_heading = "Output")]
    run: Option<String>,

    /// Replace the results of an earlier run in the same directory
    #[arg(long, help_heading = "Output")]
    overwrite: bool,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(n) = cli.threads {
        // candle's CPU backend sizes its thread pool from this variable when first used.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let overrides = Overrides {
        epochs: cli.epochs,
        batch_size: cli.batch_size,
        lr: cli.lr,
        optimizer: cli.optimizer,
        momentum: cli.momentum,
        weight_decay: cli.weight_decay,
        seed: cli.seed,
        data_dir: cli.data_dir,
        no_shuffle: cli.no_shuffle,
    };
    let (spec, config) = config::resolve(cli.model.as_deref(), cli.config.as_deref(), &overrides)?;
    let device = device::open(cli.device)?;
    println!("device: {}", device::describe(&device));

    match spec.task {
        Task::LinearFit => {
            let fit = linear_fit::run(spec, &config, &device)?;
            println!("weight={:.4} bias={:.4} (loss {:.5})", fit.weight, fit.bias, fit.final_loss);
            if fit.looks_right() {
                println!("set-up looks right: kiln trains on this device (expected about weight=3, bias=2)");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("error: expected about weight=3 and bias=2; training on this device is not working as it should");
                Ok(ExitCode::FAILURE)
            }
        }
        Task::ImageClassification => {
            let run_name = cli.run.as_deref().unwrap_or(spec.name);
            let data = cifar::load(&config.data_dir)?;
            let run_dir = RunDir::create(&cli.models_dir, run_name, cli.overwrite)?;
            let summary = classify::run(spec, &config, &data, &device, &run_dir)
                .with_context(|| format!("training {} failed", spec.name))?;
            println!(
                "done: {} epochs in {:.1}s; best test accuracy {:.4} (epoch {})\n  weights: {} (last), {} (best)",
                summary.epochs,
                summary.seconds,
                summary.best_accuracy,
                summary.best_epoch,
                summary.last.display(),
                summary.best.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
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
            assert!(help.contains(spec.name), "{} missing from --help", spec.name);
        }
    }
}
