//! Checkpoints and resume through the `train` binary: exactness, Ctrl-C, SIGKILL at random moments.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use candle_core::Device;
use common::{fixture_dir, metrics_without_timing, models_dir, run, text, weight_bits};
use kiln::checkpoint::{load_checkpoint, load_weights, RunDir};
use rand::{Rng, SeedableRng};

const EPOCHS: &str = "3";

/// Arguments shared by every run of these tests: fixture data, CPU, 19 steps an epoch.
fn args<'a>(data: &'a str, run_name: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--device",
        "cpu",
        "--data-dir",
        data,
        "--batch-size",
        "32",
        "--run",
        run_name,
    ];
    args.extend_from_slice(extra);
    args
}

fn train_ok(root: &Path, args: &[&str]) -> String {
    let out = run("train", args, root);
    assert!(
        out.status.success(),
        "train {args:?} failed:\n{}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The reference: an uninterrupted run of EPOCHS epochs.
fn straight(root: &Path, data: &str) -> std::path::PathBuf {
    train_ok(root, &args(data, "straight", &["--epochs", EPOCHS]));
    models_dir(root).join("straight")
}

#[test]
fn two_epochs_then_resume_equals_straight_run_bit_for_bit() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let reference = straight(root.path(), &data);

    train_ok(root.path(), &args(&data, "split", &["--epochs", "2"]));
    let out = train_ok(
        root.path(),
        &args(&data, "split", &["--epochs", EPOCHS, "--resume"]),
    );
    assert!(
        out.contains("resume: epochs 2 -> 3"),
        "the harmless change is logged:\n{out}"
    );
    let split = models_dir(root.path()).join("split");
    for file in ["last.safetensors", "best.safetensors"] {
        assert!(
            weight_bits(&split.join(file)) == weight_bits(&reference.join(file)),
            "{file} differs"
        );
    }
    assert_eq!(
        metrics_without_timing(&split),
        metrics_without_timing(&reference)
    );

    // Finished: the same command again says so and succeeds without training.
    let again = train_ok(
        root.path(),
        &args(&data, "split", &["--epochs", EPOCHS, "--resume"]),
    );
    assert!(again.contains("already done 3 of 3 epochs"), "{again}");

    // A binding setting changed: refused, naming it; nothing written.
    let before = std::fs::read(split.join("metrics.csv")).unwrap();
    let out = run(
        "train",
        &args(
            &data,
            "split",
            &["--epochs", "5", "--resume", "--seed", "7"],
        ),
        root.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("seed 42 -> 7"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(split.join("metrics.csv")).unwrap(), before);
}

#[test]
fn ctrl_c_checkpoints_mid_epoch_and_resume_finishes_exactly() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let reference = straight(root.path(), &data);

    let mut child = common::binary("train")
        .args(args(&data, "interrupted", &["--epochs", EPOCHS]))
        .current_dir(root.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt as soon as epoch 1's line is out: it comes after that epoch's checkpoint and
    // plot, so epoch 2's steps (about 0.2 s on two cores) are what runs next. A fixed wait after
    // the checkpoint file appeared once let all of epoch 2 finish first.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap() > 0 && !line.contains("epoch 1/") {
        line.clear();
    }
    assert!(line.contains("epoch 1/"), "no epoch line before the end");
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    std::io::copy(&mut stdout, &mut std::io::sink()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("resume with: train --resume --run interrupted"),
        "{stderr}"
    );

    let run_dir = RunDir::at(&models_dir(root.path()), "interrupted");
    let newest = run_dir.list_checkpoints().unwrap().remove(0).1;
    assert!(
        newest.epochs_done == 1 && newest.steps_into_epoch > 0,
        "stopped mid-epoch: {newest:?}"
    );

    train_ok(
        root.path(),
        &args(&data, "interrupted", &["--epochs", EPOCHS, "--resume"]),
    );
    let resumed = run_dir.path();
    assert!(
        weight_bits(&resumed.join("last.safetensors"))
            == weight_bits(&reference.join("last.safetensors"))
    );
    assert_eq!(
        metrics_without_timing(resumed),
        metrics_without_timing(&reference)
    );
}

/// SIGKILL at random moments (start-up, mid-step, mid-checkpoint-write, evaluation): after each,
/// the newest checkpoint and the weights files load, and `--resume` on a copy of the run directory
/// runs to the end with exactly the straight run's weights and metrics.
#[test]
fn sigkill_at_random_moments_never_loses_a_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let reference = straight(root.path(), &data);
    let run_dir = RunDir::at(&models_dir(root.path()), "killed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
    let kills = 10;
    let (mut with_checkpoint, mut mid_write) = (0, 0);
    for kill in 0..kills {
        let mut child = common::binary("train")
            .args(args(
                &data,
                "killed",
                &["--epochs", EPOCHS, "--resume", "--checkpoint-every", "1"],
            ))
            .current_dir(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if kill % 2 == 0 {
            std::thread::sleep(Duration::from_millis(rng.random_range(20..900)));
        } else {
            // Aim at a checkpoint write: kill as soon as a temporary file shows up.
            let deadline = Instant::now() + Duration::from_millis(rng.random_range(100..1500));
            while Instant::now() < deadline && !has_temp_file(&run_dir) {}
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // A temporary file left behind means the kill landed inside a checkpoint write.
        mid_write += usize::from(has_temp_file(&run_dir));

        if let Some((path, _)) = run_dir.list_checkpoints().unwrap().first() {
            with_checkpoint += 1;
            load_checkpoint(path, &Device::Cpu)
                .unwrap_or_else(|e| panic!("kill {kill}: newest checkpoint: {e}"));
        }
        for file in [run_dir.last(), run_dir.best()] {
            if file.exists() {
                load_weights(&file, &Device::Cpu).unwrap_or_else(|e| panic!("kill {kill}: {e}"));
            }
        }
        let copy = format!("killed-{kill}");
        if run_dir.path().exists() {
            copy_dir(run_dir.path(), &models_dir(root.path()).join(&copy));
        }
        train_ok(
            root.path(),
            &args(&data, &copy, &["--epochs", EPOCHS, "--resume"]),
        );
        let finished = models_dir(root.path()).join(&copy);
        assert!(
            weight_bits(&finished.join("last.safetensors"))
                == weight_bits(&reference.join("last.safetensors")),
            "kill {kill}: resumed run ended with other weights"
        );
        assert_eq!(
            metrics_without_timing(&finished),
            metrics_without_timing(&reference),
            "kill {kill}"
        );
    }
    eprintln!("{kills} kills: {with_checkpoint} after a checkpoint existed, {mid_write} inside a checkpoint write");
    assert!(
        with_checkpoint >= kills / 2,
        "most kills must land once checkpoints exist"
    );
    assert!(mid_write > 0, "no kill landed inside a checkpoint write");
    let leftovers = std::fs::read_dir(
        models_dir(root.path()).join(format!("killed-{}/checkpoints", kills - 1)),
    )
    .unwrap()
    .flatten()
    .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
    .count();
    assert_eq!(
        leftovers, 0,
        "a resumed run clears temporary files left by killed ones"
    );
}

fn has_temp_file(run_dir: &RunDir) -> bool {
    std::fs::read_dir(run_dir.checkpoints())
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        })
        .unwrap_or(false)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
