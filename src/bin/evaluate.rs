//! `evaluate`: test loss, accuracy, per-class accuracy and confusion matrix of saved weights.

// See Cargo.toml: large tensors are allocated and freed every step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use serde_json::json;

use kiln::cli::DataArgs;
use kiln::data;
use kiln::data::batches::{BatchBuffer, DeviceSet};
use kiln::data::cifar;
use kiln::data::folder::FolderOptions;
use kiln::device::{self, DeviceRequest};
use kiln::evaluate::{
    evaluate_into, load_model, write_predictions, EvalSettings, Evaluation, ImageOutputs,
};
use kiln::plots;

const EXAMPLES: &str = "\
Examples:
  evaluate --checkpoint models/simplecnn/best.safetensors
  evaluate --checkpoint models/simplecnn/checkpoints/epoch-0004.safetensors --json
  evaluate --checkpoint models/resnet18/best.safetensors --tta
  evaluate --checkpoint from_pytorch.safetensors --model simplecnn --device cpu
  evaluate --checkpoint models/pets/best.safetensors --data-dir other-photos --dataset folder
  evaluate --checkpoint models/pets/best.safetensors --predictions pets-predictions.csv";

/// Evaluate saved weights on the data they were trained on: CIFAR-10's test set, or a
/// folder's held-out images (its val/ or test/ folder, or the same seeded split).
///
/// Needs nothing but the file: the model, classes, normalisation and data come from its
/// metadata (or --model, --data-dir, --dataset). Works with last/best.safetensors, with
/// checkpoints, and with weights saved by PyTorch under the same parameter names. Draws the
/// confusion matrix to confusion.png next to the file.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    /// Weights file or checkpoint (.safetensors)
    #[arg(long, value_name = "PATH")]
    checkpoint: PathBuf,

    #[command(flatten)]
    data: DataArgs,

    /// auto, cpu, cuda, cuda:N, metal, metal:N
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: DeviceRequest,

    /// The model, for files whose metadata names none
    #[arg(long, value_name = "NAME")]
    model: Option<String>,

    /// Images per evaluation batch
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,

    /// Test-time augmentation: average each image's logits over its mirror image and one-pixel
    /// shifts (airbench's views; six forward passes per image)
    #[arg(long)]
    tta: bool,

    /// Print one JSON object (accuracy, loss, per_class, confusion, ...) instead of tables
    #[arg(long)]
    json: bool,

    /// Also write one CSV row per test picture, in the test set's order: index, path (the
    /// picture's file for folder data, empty for CIFAR-10's records), label, predicted (the
    /// class of the highest logit), logit_0 .. logit_{K-1} (with --tta, the averaged ones).
    /// To see which pictures the model gets wrong, or to compare its logits with another
    /// framework's on the same pictures
    #[arg(long, value_name = "FILE")]
    predictions: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    kiln::cli::exit_code(None, || run(&cli).map(|()| ExitCode::SUCCESS))
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    if let Some(path) = &cli.predictions {
        check_writable_place(path)?;
    }
    device::prepare_cpu_threads(None);
    let device = device::open(cli.device)?;
    let loaded = load_model(
        &cli.checkpoint,
        cli.model.as_deref(),
        cli.data.image_size,
        &device,
    )?;
    // The data the weights were trained on, unless told otherwise; a folder is split as it was.
    let dataset = cli.data.dataset.or(loaded.dataset).unwrap_or_default();
    let trained_on = loaded
        .data_dir
        .clone()
        .filter(|_| dataset == data::Dataset::Folder);
    let dir = cli
        .data
        .data_dir
        .clone()
        .or(trained_on)
        .unwrap_or_else(|| PathBuf::from(cifar::DEFAULT_DIR));
    let fetch = cli.data.source();
    let request = data::Request {
        dataset,
        dir: &dir,
        synthetic_images: 0,
        fetch: fetch.as_ref(),
        folder: FolderOptions {
            image_size: loaded.arch.image_size,
            val_split: cli.data.val_split.or(loaded.val_split).unwrap_or(0.1),
            seed: loaded.split_seed.unwrap_or(42),
            skip_bad_images: cli.data.skip_bad_images,
        },
    };
    let data::TestSet {
        images: test,
        files,
        classes,
        stats: data_stats,
    } = data::load_test(&request, &kiln::cli::decode_bar(!cli.json))?;
    match &loaded.classes {
        Some(trained) if *trained != classes => anyhow::bail!(
            "{} was trained on the classes {}, but the data has {}; evaluate it on that data",
            cli.checkpoint.display(),
            trained.join(", "),
            classes.join(", ")
        ),
        _ if loaded.arch.num_classes != classes.len() => anyhow::bail!(
            "{} holds a model for {} classes, but the {dataset} data has {}",
            cli.checkpoint.display(),
            loaded.arch.num_classes,
            classes.len()
        ),
        _ => {}
    }
    let stats = loaded.input_stats(data_stats);
    let test = DeviceSet::new(test, stats, &device)?;
    let mut buffer = BatchBuffer::default();
    // Each picture's logits are kept, and read back per batch, only for --predictions.
    let mut outputs = cli
        .predictions
        .as_ref()
        .map(|_| ImageOutputs::new(classes.len()));
    let settings = EvalSettings {
        batch_size: cli.batch_size as usize,
        num_classes: classes.len(),
        tta: cli.tta,
        dtype: candle_core::DType::F32,
    };
    let eval = evaluate_into(
        loaded.built.module.as_ref(),
        &test,
        &mut buffer,
        settings,
        outputs.as_mut(),
    )?;
    if let (Some(path), Some(outputs)) = (&cli.predictions, &outputs) {
        write_predictions(path, outputs, test.labels(), files.as_deref())?;
    }
    let picture = cli.checkpoint.with_file_name("confusion.png");
    let name = cli
        .checkpoint
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let title = format!("{name}: test accuracy {:.4}", eval.accuracy());
    plots::confusion_png(&picture, &eval, &classes, &title)?;
    if cli.json {
        let per_class: serde_json::Map<String, serde_json::Value> = classes
            .iter()
            .zip(eval.per_class())
            .map(|(name, acc)| (name.to_string(), json!(acc)))
            .collect();
        let report = json!({
            "checkpoint": cli.checkpoint.display().to_string(),
            "model": loaded.spec.name,
            "epoch": loaded.epoch,
            "device": device::describe(&device),
            "images": eval.total(),
            "tta": cli.tta,
            "loss": eval.loss,
            "accuracy": eval.accuracy(),
            "per_class": per_class,
            "classes": classes,
            "confusion": eval.confusion,
            "confusion_png": picture.display().to_string(),
            "predictions": cli.predictions.as_ref().map(|p| p.display().to_string()),
        });
        println!("{report}");
    } else {
        println!("device: {}", device::describe(&device));
        let epoch = loaded
            .epoch
            .map(|e| format!(", epoch {e}"))
            .unwrap_or_default();
        let views = if cli.tta {
            ", test-time augmentation: mirror and one-pixel shifts"
        } else {
            ""
        };
        println!(
            "{} ({}{epoch}{views})",
            cli.checkpoint.display(),
            loaded.spec.name
        );
        println!("{}", report(&eval, &classes));
        println!("\nconfusion matrix drawn to {}", picture.display());
        if let Some(path) = &cli.predictions {
            println!(
                "each picture's prediction and logits written to {}",
                path.display()
            );
        }
    }
    Ok(())
}

/// Refuses, before any work, a predictions file that could not be written: its folder missing
/// or not a folder, or the path itself a folder. (Other failures, such as permissions, are
/// reported when the file is written.)
fn check_writable_place(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if path.is_dir() {
        anyhow::bail!(
            "cannot write predictions to {}: it is a folder; name a file",
            path.display()
        );
    }
    if !dir.is_dir() {
        let why = if dir.exists() {
            "is not a folder"
        } else {
            "does not exist"
        };
        anyhow::bail!(
            "cannot write predictions to {}: {} {why}",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

/// The tables a person reads: totals, per-class accuracy, and the confusion matrix.
fn report(eval: &Evaluation, classes: &[String]) -> String {
    let mut out = format!(
        "test images {}: loss {:.4}, accuracy {:.4}\n\nper class:\n",
        eval.total(),
        eval.loss,
        eval.accuracy()
    );
    for (name, acc) in classes.iter().zip(eval.per_class()) {
        out.push_str(&format!("  {name:<11} {acc:.4}\n"));
    }
    out.push_str("\nconfusion matrix (rows: true class, columns: predicted):\n            ");
    for name in classes {
        let short: String = name.chars().take(5).collect();
        out.push_str(&format!("{short:>6}"));
    }
    for (name, row) in classes.iter().zip(&eval.confusion) {
        out.push_str(&format!("\n  {name:<10}"));
        for count in row {
            out.push_str(&format!("{count:>6}"));
        }
    }
    out
}
