//! Helpers shared by the integration tests: fixture data, running the binaries, reading results.

#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use kiln::checkpoint::load_weights;
use kiln::data::{cifar, synthetic};

/// A kiln binary. Tests never fetch from the internet: unless a test names its own
/// `--data-url`, a fetch goes to a closed port on the loopback and fails at once.
pub fn binary(name: &str) -> Command {
    let path = match name {
        "train" => env!("CARGO_BIN_EXE_train"),
        "predict" => env!("CARGO_BIN_EXE_predict"),
        "export" => env!("CARGO_BIN_EXE_export"),
        _ => env!("CARGO_BIN_EXE_evaluate"),
    };
    let mut command = Command::new(path);
    command.env(
        "KILN_DATA_URL",
        "http://127.0.0.1:9/tests-never-fetch-from-the-internet",
    );
    command
}

pub fn run(name: &str, args: &[&str], cwd: &Path) -> Output {
    binary(name)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("the binary runs")
}

/// Runs `train` with `args` in `cwd`, which must succeed; its standard output.
pub fn train_ok(cwd: &Path, args: &[&str]) -> String {
    let out = run("train", args, cwd);
    assert!(
        out.status.success(),
        "train {args:?} failed:\n{}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The arguments of a CPU run on the fixture `data` into `--run run`, in batches of `batch`,
/// then `extra`.
pub fn cpu_run<'a>(data: &'a str, run: &'a str, batch: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--device",
        "cpu",
        "--data-dir",
        data,
        "--batch-size",
        batch,
        "--run",
        run,
    ];
    args.extend_from_slice(extra);
    args
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A small synthetic data set in the binary layout under `root/data`: 600 training and 200 test images.
pub fn fixture_dir(root: &Path) -> String {
    let dir = root.join("data");
    cifar::write_dir(
        &dir,
        &synthetic::generate(600, 1),
        &synthetic::generate(200, 2),
    )
    .unwrap();
    dir.display().to_string()
}

/// The values of one column of a CSV text.
pub fn column(csv: &str, name: &str) -> Vec<f64> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let at = header.iter().position(|h| *h == name).unwrap();
    lines
        .map(|l| l.split(',').nth(at).unwrap().parse().unwrap())
        .collect()
}

/// metrics.csv without its timing columns (seconds, images_per_s), which no two runs share.
pub fn metrics_without_timing(run: &Path) -> Vec<String> {
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    csv.lines()
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            [&cells[..5], &cells[7..]].concat().join(",")
        })
        .collect()
}

/// Every tensor of a safetensors file (after its checksum is verified) as its dtype, shape and
/// raw bytes, sorted by name: equal exactly when the weights are bit for bit the same.
pub fn weight_bits(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    load_weights(path, &Device::Cpu).expect("the weights load and verify");
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = format!("{:?}", view.dtype());
            (name, dtype, view.shape().to_vec(), view.data().to_vec())
        })
        .collect();
    tensors.sort();
    tensors
}

pub fn models_dir(root: &Path) -> PathBuf {
    root.join("models")
}

/// Runs `command` to its end, as `Command::output`, but kills it and fails the test once it has
/// run `limit`: a test of something that must not hang never hangs itself.
pub fn output_within(command: &mut Command, limit: std::time::Duration) -> Output {
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary starts");
    wait_within(child, limit)
}

/// Waits for `child` (its output pipes still there are read to the end) at most `limit`, then
/// kills it and fails the test.
pub fn wait_within(mut child: std::process::Child, limit: std::time::Duration) -> Output {
    use std::io::Read;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}: killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// ||a - b|| / ||b|| over every tensor of two weights files (which must hold the same names).
pub fn relative_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (
        load_weights(a, &Device::Cpu).unwrap().tensors,
        load_weights(b, &Device::Cpu).unwrap().tensors,
    );
    assert_eq!(
        a.keys().collect::<std::collections::BTreeSet<_>>(),
        b.keys().collect::<std::collections::BTreeSet<_>>()
    );
    let (mut diff, mut norm) = (0f64, 0f64);
    for (name, tb) in &b {
        let values = |t: &candle_core::Tensor| {
            let t = t.to_dtype(candle_core::DType::F64).unwrap();
            t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
        };
        for (x, y) in values(&a[name]).iter().zip(values(tb)) {
            diff += (x - y) * (x - y);
            norm += y * y;
        }
    }
    (diff / norm).sqrt()
}

/// Starts `command` (a `train`) with its output piped and returns once epoch 1's line is out,
/// its stdout drained from then on in the background (stderr stays for the caller to read).
pub fn spawn_past_epoch_1(command: &mut Command) -> std::process::Child {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut seen = String::new();
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("epoch 1/") {
        seen.push_str(&line);
        line.clear();
    }
    assert!(
        line.contains("epoch 1/"),
        "no epoch line before the end:\n{seen}"
    );
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    child
}
