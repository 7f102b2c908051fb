//! `predict`: what saved weights see in image files, top-k classes with probabilities.

// See Cargo.toml: large tensors are allocated and freed every step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde_json::json;

use kiln::data::ChannelStats;
use kiln::device::{self, DeviceRequest};
use kiln::evaluate::load_model;
use kiln::predict::{predict, Options, Prediction};

const EXAMPLES: &str = "\
Examples:
  predict --weights models/resnet18/best.safetensors photo.jpg
  predict --weights models/pets/best.safetensors holiday/ --top-k 1
  predict --weights models/pets/best.safetensors holiday/ --json > predictions.jsonl";

/// Predict the classes of image files with saved weights.
///
/// Each image is prepared as evaluation prepares it (turned upright by its EXIF orientation,
/// shorter side resized to the model's input size, centre square, normalised as in training)
/// and run in batches on the best device. Class names come from the weights file.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    /// Weights file or checkpoint (.safetensors)
    #[arg(long, value_name = "PATH")]
    weights: PathBuf,

    /// Image files (jpg, png, bmp, webp) and folders of them (searched recursively)
    #[arg(value_name = "IMAGE|DIR", required = true)]
    inputs: Vec<PathBuf>,

    /// Classes to list per image, most likely first
    #[arg(long, value_name = "K", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    top_k: u64,

    /// Print one JSON object per image (path, top: [{class, index, probability}]) instead of a table
    #[arg(long)]
    json: bool,

    /// auto (Metal, then CUDA, then CPU), cpu, cuda, cuda:N, metal, metal:N
    #[arg(long, value_name = "DEVICE", default_value = "auto")]
    device: DeviceRequest,

    /// Images per batch (decoded together, then run together), as evaluation's
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,

    /// The model, for files whose metadata names none (PyTorch-saved weights)
    #[arg(long, value_name = "NAME")]
    model: Option<String>,

    /// The model's input size, for files that do not record it [default: the file's, or 32]
    #[arg(long, value_name = "N")]
    image_size: Option<usize>,

    /// Skip (and list on stderr) images that do not decode, instead of stopping
    #[arg(long)]
    skip_bad_images: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    kiln::cli::exit_code(None, || run(&cli).map(|()| ExitCode::SUCCESS))
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    device::prepare_cpu_threads(None);
    let device = device::open(cli.device)?;
    let loaded = load_model(&cli.weights, cli.model.as_deref(), cli.image_size, &device)?;
    if loaded.stats.is_none() && !cli.json {
        eprintln!(
            "note: {} records no input normalisation; using {}",
            cli.weights.display(),
            if loaded.input_stats(ChannelStats::CIFAR10) == ChannelStats::IMAGENET {
                "ImageNet's"
            } else {
                "CIFAR-10's"
            }
        );
    }
    let classes = loaded.class_names();
    let (files, ignored) = kiln::data::folder::image_files(&cli.inputs)?;
    if files.is_empty() {
        anyhow::bail!(
            "no image files (jpg, jpeg, png, bmp, webp) in {}{}",
            cli.inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if ignored > 0 {
                format!(" ({ignored} other files)")
            } else {
                String::new()
            }
        );
    }
    let options = Options {
        image_size: loaded.arch.image_size,
        stats: loaded.input_stats(ChannelStats::CIFAR10),
        batch_size: cli.batch_size as usize,
        top_k: cli.top_k as usize,
        skip_bad_images: cli.skip_bad_images,
    };
    let bar = progress_bar(files.len());
    let found = predict(
        loaded.built.module.as_ref(),
        &files,
        &options,
        &device,
        &|done, total| {
            if let Some(bar) = &bar {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            }
        },
    )?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    for (path, reason) in &found.skipped {
        eprintln!("skipped {}: {reason}", path.display());
    }
    let text = if cli.json {
        found
            .predictions
            .iter()
            .map(|p| format!("{}\n", as_json(p, &classes)))
            .collect()
    } else {
        table(&found.predictions, &classes, options.top_k)
    };
    print_out(&text)
}

/// Writes `text` to stdout; a reader that stops early (`| head`) is not an error.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => Ok(written?),
    }
}

/// A bar on stderr for more than one batch's worth of images, when stderr is a terminal.
fn progress_bar(images: usize) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    (images > 500 && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(images as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "predicting {bar:30} {pos}/{len} ({per_sec}, {eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

fn name(classes: &[String], index: usize) -> &str {
    classes.get(index).map_or("?", String::as_str)
}

fn as_json(p: &Prediction, classes: &[String]) -> serde_json::Value {
    let top: Vec<_> = p
        .top
        .iter()
        .map(|&(index, probability)| {
            json!({ "class": name(classes, index), "index": index, "probability": probability })
        })
        .collect();
    json!({ "path": p.path.display().to_string(), "top": top })
}

/// One row per image: its path, then each of its top classes with its probability.
fn table(predictions: &[Prediction], classes: &[String], k: usize) -> String {
    let path_width = predictions
        .iter()
        .map(|p| p.path.display().to_string().chars().count())
        .max()
        .unwrap_or(0)
        .clamp(5, 60);
    let class_width = classes
        .iter()
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(1)
        .clamp(5, 24);
    let k = k.min(classes.len());
    let mut out = format!("{:<path_width$}", "image");
    for rank in 1..=k {
        out.push_str(&format!(
            "  {:<class_width$} {:>6}",
            format!("top-{rank}"),
            "p"
        ));
    }
    out.push('\n');
    for p in predictions {
        out.push_str(&format!("{:<path_width$}", p.path.display().to_string()));
        for &(index, probability) in &p.top {
            out.push_str(&format!(
                "  {:<class_width$} {probability:>6.4}",
                name(classes, index)
            ));
        }
        out.push('\n');
    }
    out
}
