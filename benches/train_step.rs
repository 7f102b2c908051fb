//! SimpleCNN training steps per second, kiln against PyTorch, on this machine in one run:
//! one random batch held in memory, Adam lr 1e-3, cross-entropy, warm-up excluded, the median of
//! several repeats at batch 64 and 512.
//!
//!     cargo bench --bench train_step -- [--threads N] [--repeats N]
//!
//! PyTorch's figures come from pytorch/train_step.py (needs `python3` with torch); without it
//! they are skipped with a message.

// See Cargo.toml: large tensors are allocated and freed every step.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::Command;
use std::time::Instant;

use candle_core::{Device, Tensor};
use kiln::config::{resolve, Overrides};
use kiln::{models, optim};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn arg(name: &str) -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1)?.parse().ok()
}

/// kiln's images/s for each repeat of `steps` steps at `batch`.
fn kiln(batch: usize, steps: usize, repeats: usize) -> kiln::Result<Vec<f64>> {
    let device = Device::Cpu;
    let (spec, config) = resolve(Some("simplecnn"), None, &Overrides::default())?;
    let built = models::build(spec, 0, &device)?;
    let mut optimizer = optim::build(&config, built.params.vars())?;
    let images = Tensor::randn(0f32, 1.0, (batch, 3, 32, 32), &device)?;
    let labels = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect(), batch, &device)?;
    let mut run = |n: usize| -> kiln::Result<()> {
        for _ in 0..n {
            let loss = candle_nn::loss::cross_entropy(&built.module.forward(&images)?, &labels)?;
            optimizer.step(&loss.backward()?)?;
        }
        Ok(())
    };
    run((steps / 10).max(10))?;
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let start = Instant::now();
        run(steps)?;
        rates.push((steps * batch) as f64 / start.elapsed().as_secs_f64());
    }
    Ok(rates)
}

/// PyTorch's images/s for each repeat, or why there are none.
fn pytorch(batch: usize, steps: usize, repeats: usize, threads: usize) -> Result<Vec<f64>, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/pytorch/train_step.py");
    let out = Command::new("python3")
        .args([
            script,
            "--batch",
            &batch.to_string(),
            "--steps",
            &steps.to_string(),
        ])
        .args([
            "--repeats",
            &repeats.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("failed").to_string());
    }
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    serde_json::from_value(line["images_per_s"].clone()).map_err(|e| e.to_string())
}

fn main() {
    let threads = arg("--threads")
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // Before candle or rayon start their thread pools, as the binaries do.
    kiln::device::prepare_cpu_threads(Some(threads));
    let repeats = arg("--repeats").unwrap_or(5);
    println!("SimpleCNN training step (Adam, random batch in memory), {threads} threads, median of {repeats} repeats");
    println!(
        "{:>6} {:>12} {:>10} {:>14} {:>10} {:>8}",
        "batch", "kiln img/s", "ms/step", "pytorch img/s", "ms/step", "ratio"
    );
    for (batch, steps) in [(64, 300), (512, 40)] {
        let ours = match kiln(batch, steps, repeats) {
            Ok(rates) => median(rates),
            Err(err) => {
                eprintln!("kiln failed at batch {batch}: {err}");
                std::process::exit(1);
            }
        };
        let ms = |rate: f64| 1000.0 * batch as f64 / rate;
        match pytorch(batch, steps, repeats, threads) {
            Ok(rates) => {
                let theirs = median(rates);
                println!(
                    "{batch:>6} {ours:>12.0} {:>10.2} {theirs:>14.0} {:>10.2} {:>7.2}x",
                    ms(ours),
                    ms(theirs),
                    ours / theirs
                );
            }
            Err(why) => {
                println!(
                    "{batch:>6} {ours:>12.0} {:>10.2} {:>14} {:>10} {:>8}",
                    ms(ours),
                    "-",
                    "-",
                    "-"
                );
                eprintln!("PyTorch reference skipped: {why}");
            }
        }
    }
}
