//! Options held to their effect on the weights, through the command line: `--grad-clip` against
//! the clipped step computed by hand from an unclipped one, `--backbone-lr-scale` against the
//! unscaled step, `--no-shuffle` against the seed. SimpleCNN (conv1, then the classifier fc) on
//! the 600 fixture images with plain SGD (no momentum, no weight decay, a constant rate), so one
//! step moves each weight by exactly -lr times its gradient.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use common::{cpu_run, fixture_dir, models_dir, train_ok};
use kiln::checkpoint::load_weights;

/// Plain SGD at `lr`, one epoch; with a batch of 600, a single step.
fn sgd<'a>(lr: &'a str, seed: &'a str) -> Vec<&'a str> {
    vec![
        "--model",
        "simplecnn",
        "--optimizer",
        "sgd",
        "--momentum",
        "0",
        "--weight-decay",
        "0",
        "--schedule",
        "constant",
        "--epochs",
        "1",
        "--seed",
        seed,
        "--lr",
        lr,
    ]
}

/// Trains run `run` with `args` and returns its final weights, by name, as f64.
fn trained(root: &Path, data: &str, run: &str, batch: &str, args: &[&str]) -> Weights {
    train_ok(root, &cpu_run(data, run, batch, args));
    weights(&models_dir(root).join(run).join("last.safetensors"))
}

type Weights = BTreeMap<String, Vec<f64>>;

fn weights(path: &Path) -> Weights {
    load_weights(path, &Device::Cpu)
        .expect("the weights load")
        .tensors
        .into_iter()
        .map(|(name, t)| {
            let values = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            (name, values.to_vec1::<f64>().unwrap())
        })
        .collect()
}

/// `a - b`, tensor by tensor, for the names `keep` accepts.
fn step(a: &Weights, b: &Weights, keep: impl Fn(&str) -> bool) -> Vec<f64> {
    a.iter()
        .filter(|(name, _)| keep(name))
        .flat_map(|(name, x)| x.iter().zip(&b[name]).map(|(x, y)| x - y))
        .collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// ||a - scale * b|| / ||scale * b||.
fn off_by(a: &[f64], b: &[f64], scale: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - scale * y).collect();
    norm(&diff) / (scale * norm(b))
}

/// The initial weights: a step at a rate so small that no f32 weight moves.
fn initial(root: &Path, data: &str) -> Weights {
    trained(root, data, "initial", "600", &sgd("1e-30", "3"))
}

/// PyTorch's clip_grad_norm_: gradients scaled by max_norm / (||g|| + 1e-6) where that is
/// below one. From an unclipped step, -lr g, the gradient's norm is read off; clipped at half of
/// it, the step is half the unclipped one; clipped at twice it, untouched (bit for bit).
#[test]
fn grad_clip_rescales_the_step_to_the_norm_asked_for() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let start = initial(root.path(), &data);
    let free = trained(root.path(), &data, "free", "600", &sgd("0.5", "3"));
    let free_step = step(&free, &start, |_| true);
    let gradient_norm = norm(&free_step) / 0.5;
    assert!(gradient_norm > 1e-3, "a gradient to clip: {gradient_norm}");

    let half = format!("{}", gradient_norm / 2.0);
    let mut args = sgd("0.5", "3");
    args.extend(["--grad-clip", &half]);
    let clipped = trained(root.path(), &data, "clipped", "600", &args);
    let clipped_step = step(&clipped, &start, |_| true);
    let off = off_by(&clipped_step, &free_step, 0.5);
    assert!(
        off < 1e-4,
        "clipped at half the gradient's norm ({half}), the step is not half the free one: {off}"
    );

    let twice = format!("{}", gradient_norm * 2.0);
    let mut args = sgd("0.5", "3");
    args.extend(["--grad-clip", &twice]);
    let unclipped = trained(root.path(), &data, "loose", "600", &args);
    assert!(unclipped == free, "a clip above the norm changed the step");
}

/// `--backbone-lr-scale 0.25`: the classifier (fc) moves as at full rate, bit for bit, and every
/// other layer a quarter as far.
#[test]
fn backbone_lr_scale_slows_all_but_the_classifier() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let start = initial(root.path(), &data);
    let full = trained(root.path(), &data, "full", "600", &sgd("0.5", "3"));
    let mut args = sgd("0.5", "3");
    args.extend(["--backbone-lr-scale", "0.25"]);
    let scaled = trained(root.path(), &data, "scaled", "600", &args);

    let head = |name: &str| name.starts_with("fc.");
    assert!(full.keys().any(|n| head(n)) && full.keys().any(|n| !head(n)));
    for name in full.keys().filter(|n| head(n)) {
        assert!(full[name] == scaled[name], "{name} moved differently");
    }
    let backbone = |name: &str| !head(name);
    let (full_step, scaled_step) = (
        step(&full, &start, backbone),
        step(&scaled, &start, backbone),
    );
    assert!(norm(&full_step) > 0.0);
    let off = off_by(&scaled_step, &full_step, 0.25);
    assert!(off < 1e-4, "the backbone's step is not a quarter: {off}");
}

/// `--no-shuffle`: from the same weights, runs with different seeds see the batches in the same
/// (the files') order and end bit for bit alike; shuffled, the seed changes the order and the
/// weights.
#[test]
fn no_shuffle_keeps_the_order_whatever_the_seed() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    initial(root.path(), &data);
    let from = models_dir(root.path())
        .join("initial")
        .join("last.safetensors");
    let from = from.to_str().unwrap();
    let run = |name: &str, seed: &str, extra: &[&str]| {
        let mut args = sgd("0.5", seed);
        args.extend(["--init-weights", from]);
        args.extend_from_slice(extra);
        trained(root.path(), &data, name, "100", &args)
    };
    let (a, b) = (
        run("ordered-1", "1", &["--no-shuffle"]),
        run("ordered-2", "2", &["--no-shuffle"]),
    );
    assert!(a == b, "--no-shuffle runs differ with the seed");
    let (c, d) = (run("shuffled-1", "1", &[]), run("shuffled-2", "2", &[]));
    assert!(c != d, "shuffled runs with different seeds are alike");
    assert!(c != a, "a shuffled run matches the files' order");
}
