//! `export`: every image model as ONNX, run by tract (a pure-Rust ONNX runtime), gives kiln's
//! evaluation logits; BatchNorm folded and kept; class names and normalisation in the metadata;
//! bad input is one line and exit 1.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{output_within, text};
use kiln::data::ChannelStats;
use kiln::evaluate::load_model;
use kiln::models::{self, Architecture, Stem};
use kiln::onnx::{self, Options};
use onnx_protobuf::Message;
use tract_onnx::prelude::*;

/// Deterministic values in [lo, hi) for a tensor of `n` elements.
fn values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            lo + (hi - lo) * ((state >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// A weights file of `model` at `arch`, as training writes it, its BatchNorms given running
/// statistics and affine parameters far from their initial ones (so folding them is tested).
fn weights_file(
    dir: &Path,
    model: &str,
    arch: &Architecture,
    classes: &[&str],
) -> std::path::PathBuf {
    let spec = models::find(model).unwrap();
    let built = models::build(spec, arch, 7, &Device::Cpu).unwrap();
    let mut tensors = Vec::new();
    for (k, (name, var)) in built.params.state().into_iter().enumerate() {
        let t = var.as_tensor();
        let n = t.elem_count();
        let replaced = if name.ends_with("running_var") {
            Some(values(n, k as u64, 0.5, 2.0))
        } else if name.ends_with("running_mean")
            || name.contains("norm") && name.ends_with("bias")
            || name.contains("bn") && name.ends_with("bias")
        {
            Some(values(n, k as u64, -0.5, 0.5))
        } else if (name.contains("bn") || name.contains("norm")) && name.ends_with("weight") {
            Some(values(n, k as u64, 0.5, 1.5))
        } else {
            None
        };
        let t = match replaced {
            Some(v) => Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap(),
            None => t.clone(),
        };
        tensors.push((name, t));
    }
    let stats = ChannelStats::CIFAR10;
    let metadata = BTreeMap::from([
        ("model".to_string(), model.to_string()),
        ("num_classes".to_string(), arch.num_classes.to_string()),
        (
            "classes".to_string(),
            serde_json::to_string(classes).unwrap(),
        ),
        ("stem".to_string(), arch.stem.to_string()),
        ("width".to_string(), arch.width.to_string()),
        ("image_size".to_string(), arch.image_size.to_string()),
        (
            "normalize_mean".to_string(),
            ChannelStats::list(&stats.mean),
        ),
        ("normalize_std".to_string(), ChannelStats::list(&stats.std)),
    ]);
    let path = dir.join(format!(
        "{model}-{}-{}.safetensors",
        arch.stem, arch.image_size
    ));
    kiln::checkpoint::save_tensors(&path, tensors, metadata).unwrap();
    path
}

/// Runs an ONNX model in tract on `values` of `shape` (f32) and returns its first output.
fn run_in_tract(model: TypedRunnable, shape: &[usize], values: Vec<f32>) -> Vec<f32> {
    let input: tract_onnx::prelude::Tensor = tract_ndarray::ArrayD::from_shape_vec(shape, values)
        .unwrap()
        .into();
    let outputs = model.run(tvec!(input.into())).unwrap();
    outputs[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

/// The ONNX model in `bytes`, its input fixed to `shape`, ready to run in tract.
fn tract_model(mut bytes: &[u8], shape: &[usize]) -> TypedRunnable {
    tract_onnx::onnx()
        .model_for_read(&mut bytes)
        .unwrap()
        .with_input_fact(0, f32::fact(shape).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

type TypedRunnable = std::sync::Arc<TypedSimplePlan>;

/// The largest difference between `a` and `b`, relative to the largest magnitude in `b`.
fn relative(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

/// Exports `weights` (folded, then kept) and holds tract's logits on a batch of images in
/// [0, 1] to kiln's evaluation logits on the same images normalised.
fn check(weights: &Path, batch: usize) {
    let loaded = load_model(weights, None, None, &Device::Cpu).unwrap();
    let stats = loaded.input_stats(ChannelStats::CIFAR10);
    let side = loaded.arch.image_size;
    let images = values(batch * 3 * side * side, 99, 0.0, 1.0);
    let x = Tensor::from_vec(images.clone(), (batch, 3, side, side), &Device::Cpu).unwrap();
    let mean = Tensor::new(&stats.mean, &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 1, 1))
        .unwrap();
    let std = Tensor::new(&stats.std, &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 1, 1))
        .unwrap();
    let normalised = x.broadcast_sub(&mean).unwrap().broadcast_div(&std).unwrap();
    let kiln_logits = loaded
        .built
        .module
        .forward_t(&normalised, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for fold in [true, false] {
        let options = Options {
            fold_batch_norm: fold,
            ..Options::default()
        };
        let model = onnx::export(&loaded, stats, &options).unwrap();
        let bytes = onnx::to_bytes(&model).unwrap();
        let shape = [batch, 3, side, side];
        let onnx_logits = run_in_tract(tract_model(&bytes, &shape), &shape, images.clone());
        let gap = relative(&onnx_logits, &kiln_logits);
        assert!(
            gap <= 1e-4,
            "{} ({}): ONNX logits {gap:e} (relative) from kiln's",
            loaded.spec.name,
            if fold { "folded" } else { "BatchNorm kept" }
        );
        let batch_norms = model
            .graph
            .node
            .iter()
            .filter(|n| n.op_type == "BatchNormalization")
            .count();
        if fold && loaded.spec.name.starts_with("resnet") {
            assert_eq!(
                batch_norms, 0,
                "every ResNet BatchNorm follows a convolution"
            );
        }
        if !fold && loaded.spec.name != "simplecnn" {
            assert!(batch_norms > 0, "BatchNorm kept as nodes");
        }
    }
}

#[test]
fn every_model_exports_and_runs_as_kiln_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let classes = ["a", "b", "c", "d", "e"];
    let cases = [
        ("simplecnn", Stem::Auto, 32, 64),
        ("resnet18", Stem::Cifar, 32, 8),
        ("resnet18", Stem::Imagenet, 64, 8),
        ("resnet34", Stem::Cifar, 32, 4),
        ("resnet50", Stem::Cifar, 32, 4),
        ("resnet50", Stem::Imagenet, 64, 4),
        ("fastnet", Stem::Auto, 32, 16),
    ];
    for (model, stem, side, width) in cases {
        let arch = Architecture::new(classes.len(), side, stem, width).unwrap();
        let weights = weights_file(dir.path(), model, &arch, &classes);
        check(&weights, 3);
    }
}

/// The binary: the file it writes is a valid ONNX model for a fixed batch, with the class
/// names, the normalisation and the model in its metadata, and the graph's input and output
/// named as documented.
#[test]
fn the_export_binary_writes_the_model_and_its_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let classes = ["cat", "dog, or wolf", "fish"];
    let arch = Architecture::new(classes.len(), 32, Stem::Cifar, 8).unwrap();
    let weights = weights_file(dir.path(), "resnet18", &arch, &classes);
    let out = dir.path().join("model.onnx");
    let run = output_within(
        common::binary("export")
            .args(["--weights", weights.to_str().unwrap(), "--onnx"])
            .arg(&out)
            .args(["--batch", "2"]),
        std::time::Duration::from_secs(120),
    );
    assert!(run.status.success(), "{}", text(&run.stderr));
    let model = onnx_protobuf::ModelProto::parse_from_bytes(&std::fs::read(&out).unwrap()).unwrap();
    let meta: BTreeMap<&str, &str> = model
        .metadata_props
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()))
        .collect();
    assert_eq!(meta["model"], "resnet18");
    let names: Vec<String> = serde_json::from_str(meta["classes"]).unwrap();
    assert_eq!(names, classes);
    assert_eq!(
        meta["normalize_mean"],
        ChannelStats::list(&ChannelStats::CIFAR10.mean)
    );
    assert_eq!(model.opset_import[0].version, 17);
    let graph = model.graph.as_ref().unwrap();
    assert_eq!(graph.input[0].name, "input");
    assert_eq!(graph.output[0].name, "logits");
    assert_eq!(graph.node[0].op_type, "Sub", "normalisation first");
    let logits = run_in_tract(
        tract_model(&std::fs::read(&out).unwrap(), &[2, 3, 32, 32]),
        &[2, 3, 32, 32],
        vec![0.0; 2 * 3 * 32 * 32],
    );
    assert_eq!(logits.len(), 2 * classes.len());
}

/// A missing or damaged weights file, an unknown model, a batch of 0: one line, exit 1.
#[test]
fn bad_input_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let arch = Architecture::new(3, 32, Stem::Cifar, 8).unwrap();
    let weights = weights_file(dir.path(), "resnet18", &arch, &["a", "b", "c"]);
    let damaged = dir.path().join("damaged.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&damaged, bytes).unwrap();
    let out = dir.path().join("x.onnx");
    let weights = weights.to_str().unwrap();
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--weights", "missing.safetensors"],
            "missing.safetensors",
        ),
        (
            vec!["--weights", damaged.to_str().unwrap()],
            "damaged.safetensors",
        ),
        (
            vec!["--weights", weights, "--model", "resnet99"],
            "resnet99",
        ),
        (vec!["--weights", weights, "--batch", "0"], "--batch 0"),
    ];
    for (args, named) in cases {
        let run = output_within(
            common::binary("export")
                .args(&args)
                .arg("--onnx")
                .arg(&out)
                .current_dir(dir.path()),
            std::time::Duration::from_secs(60),
        );
        let stderr = text(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(!out.exists(), "{args:?} wrote a file");
    }
}

/// The set-up check's Linear(1, 1), as PyTorch saves it (`weight`, `bias`): y = 3x + 2.
#[test]
fn the_linear_set_up_check_exports_too() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("linear.safetensors");
    let tensors = vec![
        (
            "weight".to_string(),
            Tensor::new(&[[3f32]], &Device::Cpu).unwrap(),
        ),
        (
            "bias".to_string(),
            Tensor::new(&[2f32], &Device::Cpu).unwrap(),
        ),
    ];
    kiln::checkpoint::save_tensors(&weights, tensors, BTreeMap::new()).unwrap();
    let out = dir.path().join("linear.onnx");
    let run = output_within(
        common::binary("export")
            .args([
                "--model",
                "linear",
                "--weights",
                weights.to_str().unwrap(),
                "--onnx",
            ])
            .arg(&out),
        std::time::Duration::from_secs(60),
    );
    assert!(run.status.success(), "{}", text(&run.stderr));
    let y = run_in_tract(
        tract_model(&std::fs::read(&out).unwrap(), &[3, 1]),
        &[3, 1],
        vec![0.0, 1.0, -2.0],
    );
    assert_eq!(y, [2.0, 5.0, -4.0]);
}
