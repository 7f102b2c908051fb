//! `export`: a trained model as an ONNX file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use candle_core::Device;
use kiln::data::ChannelStats;
use kiln::evaluate::load_model;
use kiln::onnx::{self, Options};

const EXAMPLES: &str = "\
Examples:
  export --weights models/resnet18/best.safetensors --onnx resnet18.onnx
  export --weights models/simplecnn/last.safetensors --onnx simplecnn.onnx --batch 1
  export --weights models/fastnet/best.safetensors --onnx fastnet.onnx --keep-batchnorm

Then, with ONNX Runtime in Python (pip install onnxruntime numpy):
  import numpy as np, onnxruntime as ort
  session = ort.InferenceSession(\"resnet18.onnx\")
  images = np.random.rand(8, 3, 32, 32).astype(np.float32)   # RGB in [0, 1]
  logits = session.run([\"logits\"], {\"input\": images})[0]
  classes = eval(session.get_modelmeta().custom_metadata_map[\"classes\"])";

/// Export a trained model to ONNX, for ONNX Runtime, TensorRT, onnxruntime-web and other
/// runtimes: the network in evaluation mode, taking RGB images scaled to [0, 1] as `input`
/// [N, 3, H, W] (the graph normalises them itself) and giving `logits` [N, classes].
///
/// The model, classes and normalisation come from the weights file's metadata (or --model for a
/// file saved by PyTorch); the class names and normalisation go into the ONNX model's metadata.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = EXAMPLES)]
struct Cli {
    /// Weights file or checkpoint (.safetensors)
    #[arg(long, value_name = "PATH")]
    weights: PathBuf,

    /// Where to write the ONNX model
    #[arg(long, value_name = "FILE")]
    onnx: PathBuf,

    /// The model, for a file whose metadata names none (`linear`: the set-up check's Linear(1, 1),
    /// weight and bias as PyTorch names them)
    #[arg(long, value_name = "NAME")]
    model: Option<String>,

    /// Input image size, for a file whose metadata does not say [default: 32]
    #[arg(long, value_name = "PIXELS")]
    image_size: Option<usize>,

    /// ONNX operator set (13 or newer; ONNX Runtime 1.14 and up read 17)
    #[arg(long, value_name = "N", default_value_t = 17)]
    opset: i64,

    /// The batch size the model takes: dynamic (any) or a number
    #[arg(long, value_name = "N", default_value = "dynamic")]
    batch: String,

    /// Keep BatchNormalization nodes instead of folding each into the convolution before it
    #[arg(long)]
    keep_batchnorm: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    kiln::cli::exit_code(None, || run(&cli))
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let batch = match cli.batch.trim() {
        "dynamic" => None,
        n => match n.parse::<usize>() {
            Ok(0) | Err(_) => {
                anyhow::bail!("--batch {n}: expected dynamic or a batch size of at least 1")
            }
            Ok(n) => Some(n),
        },
    };
    let options = Options {
        opset: cli.opset,
        batch,
        fold_batch_norm: !cli.keep_batchnorm,
    };
    let file = kiln::checkpoint::load_weights(&cli.weights, &Device::Cpu)?;
    let named = cli
        .model
        .as_deref()
        .or(file.metadata.get("model").map(String::as_str));
    if named.is_some_and(|m| m.eq_ignore_ascii_case("linear")) {
        let model = onnx::export_linear(&file.tensors, &options)?;
        kiln::fs::write_atomic(&cli.onnx, &onnx::to_bytes(&model)?)?;
        println!(
            "wrote {} (linear: input [N, 1] -> output [N, 1])",
            cli.onnx.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let loaded = load_model(
        &cli.weights,
        cli.model.as_deref(),
        cli.image_size,
        &Device::Cpu,
    )?;
    let stats = loaded.input_stats(ChannelStats::CIFAR10);
    let model = onnx::export(&loaded, stats, &options)?;
    kiln::fs::write_atomic(&cli.onnx, &onnx::to_bytes(&model)?)?;
    println!(
        "wrote {} ({}, {} classes, input [{}, 3, {side}, {side}], opset {})",
        cli.onnx.display(),
        loaded.spec.name,
        loaded.arch.num_classes,
        batch.map_or("N".to_string(), |n| n.to_string()),
        cli.opset,
        side = loaded.arch.image_size,
    );
    Ok(ExitCode::SUCCESS)
}
