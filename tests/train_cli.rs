//! The `train` binary end to end, on fixture data written in the CIFAR-10 binary format.

mod common;

use std::path::Path;
use std::process::Output;

use candle_core::Device;
use common::{column, fixture_dir, text, weight_bits};
use kiln::checkpoint::load_weights;

fn train(args: &[&str], cwd: &Path) -> Output {
    common::run("train", args, cwd)
}

#[test]
fn simplecnn_trains_on_fixture_data_and_writes_its_run_directory() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let out = train(
        &[
            "--model",
            "simplecnn",
            "--device",
            "cpu",
            "--data-dir",
            &data,
            "--epochs",
            "3",
            "--batch-size",
            "32",
        ],
        root.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("device: cpu ("), "{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("epoch ")).count(),
        3,
        "one line per epoch:\n{stdout}"
    );

    let run = root.path().join("models/simplecnn");
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    assert!(
        csv.starts_with("epoch,train_loss,train_acc,test_loss,test_acc,seconds,images_per_s,lr\n")
    );
    let loss = column(&csv, "train_loss");
    assert_eq!(loss.len(), 3);
    assert!(loss[2] < loss[0] * 0.7, "loss falls: {loss:?}");
    let test_acc = column(&csv, "test_acc");
    assert!(
        test_acc[2] > 0.5,
        "well above chance (0.1) on learnable fixtures: {test_acc:?}"
    );

    let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        config.contains("epochs = 3") && config.contains("batch_size = 32"),
        "{config}"
    );
    for file in ["last.safetensors", "best.safetensors"] {
        let weights = load_weights(&run.join(file), &Device::Cpu).unwrap();
        let mut names: Vec<&str> = weights.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["conv1.bias", "conv1.weight", "fc.bias", "fc.weight"]
        );
        assert_eq!(weights.metadata["model"], "simplecnn");
        assert_eq!(weights.metadata["normalize_mean"], "0.4914,0.4822,0.4465");
    }

    // Running again into the same directory would mix two histories: refused, files kept.
    let again = train(
        &["--device", "cpu", "--data-dir", &data, "--epochs", "1"],
        root.path(),
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("--overwrite"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.csv")).unwrap(),
        csv
    );
}

#[test]
fn same_seed_same_run_on_the_cpu_and_the_same_bytes() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let run = |name: &str| {
        let args = [
            "--device",
            "cpu",
            "--data-dir",
            &data,
            "--epochs",
            "1",
            "--run",
            name,
            "--seed",
            "9",
        ];
        assert!(train(&args, root.path()).status.success());
        root.path().join("models").join(name)
    };
    let (a, b) = (run("a"), run("b"));
    assert_eq!(weight_bits(&a.join("last.safetensors")).len(), 4);
    for file in ["last.safetensors", "best.safetensors"] {
        assert!(
            std::fs::read(a.join(file)).unwrap() == std::fs::read(b.join(file)).unwrap(),
            "two runs with seed 9 wrote different {file} files"
        );
    }
    // A checkpoint also records the metrics history, whose timings differ from run to run:
    // everything else in it, tensor bytes and header alike, is the same.
    let checkpoint = |run: &Path| {
        let bytes = std::fs::read(run.join("checkpoints/epoch-0001.safetensors")).unwrap();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..header_end]).unwrap();
        let history = header["__metadata__"]["history"]
            .as_str()
            .unwrap()
            .to_string();
        let untimed: Vec<String> = history
            .lines()
            .map(|line| {
                let cells: Vec<&str> = line.split(',').collect();
                [&cells[..5], &cells[7..]].concat().join(",")
            })
            .collect();
        header["__metadata__"]["history"] = untimed.join("\n").into();
        (header, bytes[header_end..].to_vec())
    };
    assert!(
        checkpoint(&a) == checkpoint(&b),
        "checkpoints differ beyond their timings"
    );
}

#[test]
fn linear_setup_check_prints_weight_and_bias_near_three_and_two() {
    let root = tempfile::tempdir().unwrap();
    let out = train(&["--model", "linear", "--device", "cpu"], root.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let value = |key: &str| -> f64 {
        let start = stdout.find(key).unwrap() + key.len();
        stdout[start..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!((value("weight=") - 3.0).abs() < 0.3, "{stdout}");
    assert!((value("bias=") - 2.0).abs() < 0.2, "{stdout}");
    assert!(stdout.contains("set-up looks right"), "{stdout}");

    // A fit that is off (one step of the 200) is a failure: exit 1, saying what was expected.
    let off = train(
        &["--model", "linear", "--device", "cpu", "--epochs", "1"],
        root.path(),
    );
    let stderr = text(&off.stderr);
    assert_eq!(off.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("expected about weight=3 and bias=2") && stderr.contains("not working"),
        "{stderr}"
    );
}

#[test]
fn user_errors_are_one_clear_line_and_a_failure_exit() {
    let root = tempfile::tempdir().unwrap();
    let config = |name: &str, from: &str, to: &str| {
        let path = root.path().join(name);
        let text = include_str!("../configs/resnet18.toml").replace(from, to);
        assert!(text.contains(to), "{to} is in the edited config");
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let bad_schedule = config(
        "schedule.toml",
        "kind = \"onecycle\"",
        "kind = \"exponential\"",
    );
    let bad_padding = config(
        "padding.toml",
        "padding_mode = \"zero\"",
        "padding_mode = \"mirror\"",
    );
    let bad_reflect = config(
        "reflect.toml",
        "crop_padding = 4           # random",
        "crop_padding = 40          # random",
    );
    let reflect_text = std::fs::read_to_string(&bad_reflect)
        .unwrap()
        .replace("padding_mode = \"zero\"", "padding_mode = \"reflect\"");
    std::fs::write(&bad_reflect, reflect_text).unwrap();
    // Argument errors are clap's: exit code 2. Everything else: 1.
    let mut cases: Vec<(Vec<&str>, &str, i32)> = vec![
        (vec!["--device", "tpu"], "expected auto, cpu, cuda", 2),
        (
            vec!["--device", "cpu", "--data-dir", "missing", "--no-download"],
            "cifar-10-binary.tar.gz",
            1,
        ),
        (
            vec!["--model", "resnet"],
            "available models: simplecnn, resnet18, resnet34, resnet50, fastnet, linear",
            1,
        ),
        (
            vec!["--schedule", "exponential"],
            "[possible values: constant, step, cosine, linear, onecycle]",
            2,
        ),
        (
            vec!["--config", &bad_schedule],
            "unknown variant `exponential`",
            1,
        ),
        (
            vec!["--config", &bad_padding],
            "unknown variant `mirror`",
            1,
        ),
        (
            vec!["--config", &bad_reflect, "--dataset", "synthetic"],
            "crop_padding = 40",
            1,
        ),
        (
            vec!["--label-smoothing", "1.5"],
            "label_smoothing must be in [0, 1)",
            1,
        ),
        (
            vec!["--precision", "fp8"],
            "[possible values: auto, f32, bf16, f16]",
            2,
        ),
        (
            vec![
                "--model",
                "simplecnn",
                "--precision",
                "bf16",
                "--dataset",
                "synthetic",
            ],
            "precision bf16 is for the ResNets",
            1,
        ),
    ];
    // A device the build lacks: the feature that brings it (a build with it would try to open it).
    if !cfg!(feature = "cuda") {
        cases.push((
            vec!["--device", "cuda"],
            "cargo build --release --features cuda",
            1,
        ));
    }
    if !cfg!(kiln_metal) {
        cases.push((
            vec!["--device", "metal:1"],
            "cargo build --release --features metal",
            1,
        ));
    }
    for (args, expected, code) in cases {
        let out = train(&args, root.path());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        let lines = stderr.trim().lines().count();
        // clap adds a usage line and a pointer to --help after its one-line error.
        let most = if code == 2 { 4 } else { 1 };
        assert!(lines <= most, "{args:?}: {lines} lines: {stderr}");
    }
    assert!(
        !root.path().join("models").exists(),
        "failed runs leave no run directory"
    );
}

/// A decodable PNG of a real size that is not one flat colour.
fn assert_picture(path: &Path, min_size: (u32, u32)) {
    let picture = image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8();
    assert!(
        picture.width() >= min_size.0 && picture.height() >= min_size.1,
        "{}",
        path.display()
    );
    let first = picture.get_pixel(0, 0);
    let differing = picture.pixels().filter(|p| *p != first).count();
    assert!(differing > 10_000, "{} is nearly blank", path.display());
}

#[test]
fn plots_trace_and_machine_readable_output() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let trace = root.path().join("trace.json");
    let out = train(
        &[
            "--device",
            "cpu",
            "--data-dir",
            &data,
            "--epochs",
            "2",
            "--json-logs",
            "--trace",
            trace.to_str().unwrap(),
        ],
        root.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // --json-logs: stdout is JSON lines only: one per epoch, then the summary.
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        (lines[0]["event"].as_str(), lines[0]["epoch"].as_u64()),
        (Some("epoch"), Some(1))
    );
    assert!(lines[1]["test_acc"].as_f64().unwrap() > 0.3);
    assert!(lines[1]["phases"]["backward"].as_f64().unwrap() > 0.0);
    assert_eq!(lines[2]["event"], "summary");
    assert!(lines[2]["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);

    let run = root.path().join("models/simplecnn");
    assert_picture(&run.join("metrics.png"), (1000, 800));

    // The trace is a JSON array of events with a span for each phase.
    let events: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    for name in [
        "step",
        "data",
        "forward",
        "backward",
        "optimizer",
        "evaluate",
        "checkpoint",
    ] {
        assert!(
            events.iter().any(|e| e["name"] == name),
            "no {name} span in the trace"
        );
    }

    // evaluate draws the confusion matrix next to the checkpoint.
    let best = run.join("best.safetensors");
    let eval = common::run(
        "evaluate",
        &[
            "--checkpoint",
            best.to_str().unwrap(),
            "--data-dir",
            &data,
            "--device",
            "cpu",
        ],
        root.path(),
    );
    assert!(eval.status.success(), "{}", text(&eval.stderr));
    assert_picture(&run.join("confusion.png"), (800, 800));

    // --quiet: nothing on stdout, the same results on disk as a run that prints.
    let one_epoch = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "--device",
            "cpu",
            "--data-dir",
            &data,
            "--epochs",
            "1",
            "--run",
            name,
        ];
        args.extend_from_slice(extra);
        let out = train(&args, root.path());
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        out
    };
    let quiet = one_epoch("q", &["--quiet"]);
    assert!(quiet.stdout.is_empty(), "{}", text(&quiet.stdout));
    assert!(!one_epoch("loud", &[]).stdout.is_empty());
    let (q, loud) = (
        root.path().join("models/q"),
        root.path().join("models/loud"),
    );
    for file in ["last.safetensors", "best.safetensors", "config.toml"] {
        assert!(
            std::fs::read(q.join(file)).unwrap() == std::fs::read(loud.join(file)).unwrap(),
            "{file} differs"
        );
    }
    assert_eq!(
        common::metrics_without_timing(&q),
        common::metrics_without_timing(&loud)
    );
}

/// The claim that --threads changes speed, not results: the CPU kernels sum in fixed orders.
#[test]
fn results_do_not_depend_on_the_thread_count() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let config = root.path().join("resnet.toml");
    let text_config = include_str!("../configs/resnet18.toml")
        .replace("width = 64 ", "width = 4  ")
        .replace("epochs = 15", "epochs = 1")
        .replace("batch_size = 128", "batch_size = 32");
    std::fs::write(&config, text_config).unwrap();
    let config = config.display().to_string();
    for (model, extra) in [
        ("simplecnn", vec![]),
        ("resnet18", vec!["--config", config.as_str()]),
    ] {
        let runs: Vec<_> = ["1", "2"]
            .iter()
            .map(|threads| {
                let name = format!("{model}-{threads}");
                let mut args = vec!["--device", "cpu", "--data-dir", &data, "--epochs", "1"];
                args.extend(["--threads", threads, "--run", &name]);
                if extra.is_empty() {
                    args.extend(["--model", model]);
                } else {
                    args.extend(extra.iter().copied());
                }
                let out = train(&args, root.path());
                assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
                std::fs::read(
                    root.path()
                        .join("models")
                        .join(&name)
                        .join("last.safetensors"),
                )
                .unwrap()
            })
            .collect();
        assert!(
            runs[0] == runs[1],
            "{model}: 1 and 2 threads wrote different weights"
        );
    }
}

/// `--gpus N` on a build without NCCL, and a launch as one of several processes of a
/// build without MPI: one line that says which build does it, exit 1, nothing written.
#[test]
#[cfg(not(feature = "nccl"))]
fn several_processes_without_the_build_for_them_is_one_clear_line() {
    let root = tempfile::tempdir().unwrap();
    let out = train(
        &["--gpus", "2", "--dataset", "synthetic", "--epochs", "1"],
        root.path(),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--features nccl"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    if cfg!(feature = "mpi") {
        return;
    }
    // As mpirun starts each of its processes (its environment), without mpirun itself.
    let out = common::binary("train")
        .args(["--dataset", "synthetic", "--epochs", "1"])
        .env("OMPI_COMM_WORLD_RANK", "1")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .current_dir(root.path())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("rank 1 of 2 by mpirun") && stderr.contains("--features mpi"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(!root.path().join("models").exists());
}

/// `--lr-find`: the suggestion printed, the curve drawn into the run directory, and nothing
/// else written there: no weights, checkpoints, metrics or config; an existing run's files
/// stay as they were.
#[test]
fn lr_find_suggests_a_rate_and_writes_only_its_plot() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let base = ["--device", "cpu", "--data-dir", &data, "--run", "lr"];
    let out = train(&[&base[..], &["--epochs", "1"]].concat(), root.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run_dir = root.path().join("models/lr");
    let before: Vec<(String, Vec<u8>)> = {
        let mut files: Vec<_> = walk(&run_dir)
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap();
                (p.display().to_string(), bytes)
            })
            .collect();
        files.sort();
        files
    };
    let out = train(
        &[&base[..], &["--lr-find", "--lr-find-steps", "60"]].concat(),
        root.path(),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let line = stdout
        .lines()
        .find(|l| l.starts_with("suggested learning rate: "))
        .unwrap_or_else(|| panic!("no suggestion in:\n{stdout}"));
    let rate: f64 = line["suggested learning rate: ".len()..].parse().unwrap();
    assert!(rate > 1e-7 && rate < 10.0, "{rate}");
    let plot = run_dir.join("lr_find.png");
    assert_picture(&plot, (800, 500));
    let mut after: Vec<(String, Vec<u8>)> = walk(&run_dir)
        .into_iter()
        .filter(|p| *p != plot)
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p.display().to_string(), bytes)
        })
        .collect();
    after.sort();
    assert!(after == before, "the range test changed the run's files");
    // A new run directory holds the plot alone.
    let out = train(
        &[
            "--device",
            "cpu",
            "--data-dir",
            &data,
            "--run",
            "fresh",
            "--lr-find",
            "--lr-find-steps",
            "30",
        ],
        root.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        walk(&root.path().join("models/fresh")),
        [root.path().join("models/fresh/lr_find.png")]
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// One run directory, one writer. Two runs started together: exactly one trains. A second
/// process on a directory still training (fresh or `--resume`) is refused with one line naming
/// the first's pid; once the first is SIGKILLed, `--resume` continues (the kernel dropped its
/// lock).
#[test]
fn a_run_directory_has_one_writer_at_a_time() {
    let root = tempfile::tempdir().unwrap();
    let synthetic = |run: &'static str, extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec!["--dataset", "synthetic", "--device", "cpu", "--run", run];
        args.extend_from_slice(extra);
        args
    };
    let spawn = |args: Vec<&str>| {
        common::binary("train")
            .args(args)
            .current_dir(root.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let racers = [
        spawn(synthetic("race", &["--epochs", "1"])),
        spawn(synthetic("race", &["--epochs", "1"])),
    ];
    let outs: Vec<Output> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "exactly one of two racing runs trains");
    let lost = outs.iter().find(|o| !o.status.success()).unwrap();
    let stderr = text(&lost.stderr);
    assert!(
        stderr.contains("in use by another kiln process") || stderr.contains("already holds a run"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let mut first = spawn(synthetic(
        "busy",
        &["--epochs", "60", "--checkpoint-every", "5"],
    ));
    let checkpoints = root.path().join("models/busy/checkpoints");
    let started = std::time::Instant::now();
    while std::fs::read_dir(&checkpoints).map_or(true, |mut d| d.next().is_none()) {
        assert!(
            started.elapsed().as_secs() < 120,
            "no checkpoint from the first run"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let holder = format!("pid {}", first.id());
    for args in [
        synthetic("busy", &["--epochs", "60", "--resume"]),
        synthetic("busy", &["--epochs", "60", "--overwrite"]),
    ] {
        let out = train(&args, root.path());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(&holder), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let out = train(
        &synthetic("busy", &["--epochs", "2", "--resume"]),
        root.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}
