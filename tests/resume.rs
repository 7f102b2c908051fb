//! Checkpoints and resume through the `train` binary: exactness, Ctrl-C, SIGKILL at random moments.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use candle_core::Device;
use common::{
    column, cpu_run, fixture_dir, metrics_without_timing, models_dir, relative_difference, run,
    text, train_ok, weight_bits,
};
use kiln::checkpoint::{load_checkpoint, load_weights, RunDir};
use rand::{Rng, SeedableRng};

const EPOCHS: &str = "3";

/// The tests that kill `train` at random moments count on its pace, and the f16 run (candle's
/// generic f16 operations on the CPU) is the heaviest here: they take the two cores one at a time.
static PACED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn paced() -> std::sync::MutexGuard<'static, ()> {
    PACED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Arguments shared by every run of these tests: fixture data, CPU, 19 steps an epoch.
fn args<'a>(data: &'a str, run: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    cpu_run(data, run, "32", extra)
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
    // The resumed run's metrics.csv keeps the times of the epochs trained before the resume
    // (the checkpoint holds none: see below).
    let csv = std::fs::read_to_string(split.join("metrics.csv")).unwrap();
    let seconds = column(&csv, "seconds");
    assert!(
        seconds.len() == 3 && seconds.iter().all(|s| *s > 0.0),
        "{csv}"
    );

    // Two identical runs write identical checkpoints, byte for byte: no wall-clock figure is
    // kept in one.
    let twin = tempfile::tempdir().unwrap();
    train_ok(twin.path(), &args(&data, "straight", &["--epochs", EPOCHS]));
    let files = |run: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let twin_run = models_dir(twin.path()).join("straight");
    assert_eq!(files(&reference), files(&twin_run));
    assert!(!files(&reference).is_empty());
    for name in files(&reference) {
        assert!(
            std::fs::read(reference.join("checkpoints").join(&name)).unwrap()
                == std::fs::read(twin_run.join("checkpoints").join(&name)).unwrap(),
            "{name:?} differs between two identical runs"
        );
    }

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
    assert_eq!(out.status.code(), Some(1));
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

    let out = interrupt_after_epoch_1(
        root.path(),
        &args(&data, "interrupted", &["--epochs", EPOCHS]),
    );
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
    let _alone = paced();
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let reference = straight(root.path(), &data);
    let kills = kill_and_resume(
        root.path(),
        |name| {
            let extra = ["--epochs", EPOCHS, "--resume", "--checkpoint-every", "1"];
            let all: Vec<String> = args(&data, name, &extra)
                .into_iter()
                .map(String::from)
                .collect();
            all
        },
        &reference,
        10,
        2026,
    );
    assert!(
        kills.mid_write > 0,
        "no kill landed inside a checkpoint write"
    );
}

/// `--accumulate 4` at batch 16 takes the steps of batch 64 (the fixture's 600 images: 10 steps
/// an epoch, the last of 16 + 8 images weighted 2:1), 20 optimizer steps in all: the same
/// weights to the order of the sums, and the same steps in metrics.csv. SGD: Adam would hide a
/// wrong scale of the summed gradient.
#[test]
fn accumulating_four_batches_of_16_trains_as_batches_of_64() {
    let _alone = paced();
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let sgd = ["--optimizer", "sgd", "--epochs", "2"];
    let whole = args(&data, "whole", &sgd);
    let whole: Vec<&str> = whole
        .iter()
        .map(|a| if *a == "32" { "64" } else { a })
        .collect();
    train_ok(root.path(), &whole);
    let mut accumulated = args(&data, "accumulated", &sgd);
    accumulated.extend(["--accumulate", "4"]);
    let accumulated: Vec<&str> = accumulated
        .iter()
        .map(|a| if *a == "32" { "16" } else { a })
        .collect();
    train_ok(root.path(), &accumulated);
    let runs = models_dir(root.path());
    let difference = relative_difference(
        &runs.join("accumulated/last.safetensors"),
        &runs.join("whole/last.safetensors"),
    );
    assert!(
        difference <= 1e-5 && difference > 0.0,
        "accumulated steps ended {difference:e} (relative) from whole ones"
    );
    let steps = |run: &str| {
        let text = std::fs::read_to_string(runs.join(run).join("config.toml")).unwrap();
        text.lines()
            .any(|l| l.trim_start().starts_with("accumulate = 4"))
    };
    assert!(steps("accumulated"), "config.toml records accumulate");
    assert_eq!(
        column(
            &std::fs::read_to_string(runs.join("accumulated/metrics.csv")).unwrap(),
            "epoch"
        ),
        [1.0, 2.0]
    );
}

/// SIGKILL at random moments of a run that accumulates 4 micro-batches a step (so most kills
/// land between a step's micro-batches): resumed, it ends bit for bit as a straight run.
#[test]
fn a_run_killed_mid_accumulation_resumes_exactly() {
    let _alone = paced();
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let accumulate = |name: &str, extra: &[&str]| -> Vec<String> {
        let mut all = vec!["--accumulate", "4", "--epochs", EPOCHS];
        all.extend_from_slice(extra);
        args(&data, name, &all)
            .into_iter()
            .map(|a| if a == "32" { "8" } else { a })
            .map(String::from)
            .collect()
    };
    let straight = accumulate("straight", &[]);
    train_ok(
        root.path(),
        &straight.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let reference = models_dir(root.path()).join("straight");
    let kills = kill_and_resume(
        root.path(),
        |name| accumulate(name, &["--resume", "--checkpoint-every", "1"]),
        &reference,
        6,
        2027,
    );
    assert!(
        kills.with_checkpoint > 0,
        "a kill landed after a checkpoint"
    );
}

/// A ResNet with everything that carries state across steps: BatchNorm's running statistics,
/// augmentation drawn per (epoch, step), a one-cycle schedule, gradient clipping and early
/// stopping. Stopped and resumed (at an epoch's end, and by SIGKILL anywhere), it ends
/// bit-identical to a straight run.
#[test]
fn resnet_with_batchnorm_augmentation_schedule_and_early_stopping_resumes_exactly() {
    let _alone = paced();
    let root = tempfile::tempdir().unwrap();
    let resnet_args = resnet_recipe(root.path());
    let train = |name: &str, extra: &[&str]| {
        let all = resnet_args(name, extra);
        train_ok(
            root.path(),
            &all.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let out = train("straight", &[]);
    let reference = models_dir(root.path()).join("straight");
    let epochs = metrics_without_timing(&reference).len() - 1;
    assert!(
        out.contains("stopped early") && epochs < 10,
        "the recipe stops early, so resuming must too ({epochs} epochs):\n{out}"
    );
    // The exact epoch, by the rule applied by hand to the recorded accuracies: the first epoch
    // that is `early_stop` (1) epochs past the best so far, a tie not counting as better.
    let accuracy = column(
        &std::fs::read_to_string(reference.join("metrics.csv")).unwrap(),
        "test_acc",
    );
    let mut best = (0, f64::NEG_INFINITY);
    let mut stop = None;
    for (i, &acc) in accuracy.iter().enumerate() {
        if acc > best.1 {
            best = (i + 1, acc);
        }
        if i + 1 - best.0 >= 1 {
            stop = Some(i + 1);
            break;
        }
    }
    assert_eq!(
        Some(epochs),
        stop,
        "stopped after {epochs} epochs: {accuracy:?}"
    );

    // Stopped by Ctrl-C, not by a smaller --epochs: the schedule spans the run's epochs.
    let interrupted = resnet_args("split", &[]);
    let interrupted: Vec<&str> = interrupted.iter().map(String::as_str).collect();
    let out = interrupt_after_epoch_1(root.path(), &interrupted);
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    train("split", &["--resume"]);
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
    let again = train("split", &["--resume"]);
    assert!(
        again.contains("stopped early"),
        "a finished early stop stays stopped: {again}"
    );

    let kills = kill_and_resume(
        root.path(),
        |name| resnet_args(name, &["--resume", "--checkpoint-every", "3"]),
        &reference,
        4,
        7,
    );
    assert!(
        kills.with_checkpoint > 0,
        "a kill landed after a checkpoint"
    );
}

/// f16 training scales its loss dynamically; the scale and its count of good steps are
/// optimizer state, so a run stopped by Ctrl-C and resumed ends bit-identical to a straight one.
/// The scale starts at 2^24 (f16's gradients overflow at once: steps skipped, the scale halved)
/// and doubles after every 3 good steps, so it moves both ways before the stop (19 good steps
/// alone would have taken it to 2^30; with GradScaler's defaults it stays at 2^16 or below).
#[test]
fn an_f16_run_keeps_its_loss_scale_across_a_resume() {
    let _alone = paced();
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let config = root.path().join("f16.toml");
    let recipe =
        format!("{RESNET_RECIPE}\n[loss_scale]\ninit_scale = 16777216.0\ngrowth_interval = 3\n");
    std::fs::write(&config, recipe).unwrap();
    let config = config.display().to_string();
    let args = |name: &'static str| {
        let mut args = vec!["--config", &config, "--precision", "f16", "--epochs", "2"];
        args.extend(["--early-stop", "0", "--device", "cpu", "--data-dir", &data]);
        args.extend(["--run", name]);
        args
    };
    train_ok(root.path(), &args("straight"));
    let split = args("split");
    let out = interrupt_after_epoch_1(root.path(), &split);
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let run_dir = RunDir::at(&models_dir(root.path()), "split");
    let newest = run_dir.list_checkpoints().unwrap().remove(0).0;
    let saved = load_checkpoint(&newest, &Device::Cpu).unwrap();
    let scale = saved.optimizer["loss_scale"].to_vec1::<f32>().unwrap();
    assert!(
        scale[0] >= 1.0 && scale[0].log2().fract() == 0.0,
        "the loss scale is a power of two: {scale:?}"
    );
    assert!(
        65536.0 < scale[0] && scale[0] < 16777216.0,
        "the scale backed off from its start, staying above GradScaler's default: {scale:?}"
    );
    let mut resumed = split.clone();
    resumed.push("--resume");
    train_ok(root.path(), &resumed);
    let (a, b) = (
        models_dir(root.path()).join("straight"),
        models_dir(root.path()).join("split"),
    );
    assert!(weight_bits(&a.join("last.safetensors")) == weight_bits(&b.join("last.safetensors")));
    assert_eq!(metrics_without_timing(&a), metrics_without_timing(&b));
}

/// fastnet's recipe carries more state than the ResNets': the lookahead average, the groups'
/// step count (the whitening bias stops training after epoch 1 here), flips that turn every
/// other epoch, and the whitening layer set from the data on a fresh start only. Stopped by
/// Ctrl-C after epoch 1 and resumed, it ends bit-identical to a straight run; and it learns.
#[test]
fn fastnet_recipe_resumes_exactly_and_learns() {
    let _alone = paced();
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let recipe = include_str!("../configs/fastnet.toml")
        .replace("epochs = 11", "epochs = 3")
        .replace("batch_size = 1024", "batch_size = 64")
        .replace("eval_batch_size = 2000", "eval_batch_size = 100")
        .replace("width = 64 ", "width = 8 ")
        .replace(r#"{ "0.bias" = 3 }"#, r#"{ "0.bias" = 1 }"#);
    assert!(recipe.contains("epochs = 3") && recipe.contains("width = 8 "));
    assert!(recipe.contains(r#""0.bias" = 1"#));
    let config = root.path().join("fastnet.toml");
    std::fs::write(&config, recipe).unwrap();
    let config = config.display().to_string();
    let args = |name: &'static str| {
        vec![
            "--config",
            &config,
            "--device",
            "cpu",
            "--data-dir",
            &data,
            "--run",
            name,
        ]
    };
    let out = train_ok(root.path(), &args("straight"));
    assert!(
        out.contains("set up from the first 600 training images"),
        "{out}"
    );
    let out = interrupt_after_epoch_1(root.path(), &args("split"));
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let mut resumed = args("split");
    resumed.push("--resume");
    train_ok(root.path(), &resumed);
    let (a, b) = (
        models_dir(root.path()).join("straight"),
        models_dir(root.path()).join("split"),
    );
    assert!(weight_bits(&a.join("last.safetensors")) == weight_bits(&b.join("last.safetensors")));
    assert_eq!(metrics_without_timing(&a), metrics_without_timing(&b));
    let metrics = std::fs::read_to_string(a.join("metrics.csv")).unwrap();
    let accuracy = column(&metrics, "test_acc");
    assert!(
        accuracy[accuracy.len() - 1] > 0.5,
        "fastnet learns the synthetic classes: {accuracy:?}"
    );
}

/// [`RESNET_RECIPE`] written under `root` with the fixture data beside it: the arguments of a
/// CPU run named `name`, `extra` after them.
fn resnet_recipe(root: &Path) -> impl Fn(&str, &[&str]) -> Vec<String> {
    let data = fixture_dir(root);
    let config = root.join("resnet.toml");
    std::fs::write(&config, RESNET_RECIPE).unwrap();
    let config = config.display().to_string();
    move |name, extra| {
        let all = [
            "--config",
            &config,
            "--device",
            "cpu",
            "--data-dir",
            &data,
            "--run",
            name,
        ];
        all.iter().chain(extra).map(|a| a.to_string()).collect()
    }
}

/// ResNet-18 at width 4 on the 600 fixture images: 19 steps an epoch, about a second each.
const RESNET_RECIPE: &str = r#"
model = "resnet18"
epochs = 10
batch_size = 32
eval_batch_size = 100
seed = 7
shuffle = true
optimizer = "sgd"
lr = 0.05
momentum = 0.9
nesterov = true
weight_decay = 5e-4
betas = [0.9, 0.999]
eps = 1e-8
label_smoothing = 0.1
grad_clip_norm = 1.0
early_stop = 1
width = 4

[schedule]
kind = "onecycle"

[augment]
crop_padding = 4
padding_mode = "reflect"
flip = true
cutout = 8
"#;

/// Runs `train` with `args` and sends it SIGINT (Ctrl-C) just after epoch 1's line is out: it
/// comes after that epoch's checkpoint and plot, so epoch 2's steps are what runs next. (A fixed
/// wait after the checkpoint file appeared once let all of epoch 2 finish first.)
fn interrupt_after_epoch_1(root: &Path, args: &[&str]) -> std::process::Output {
    signal_after_epoch_1(root, args, &[libc::SIGINT])
}

/// Runs `train` with `args` and sends it `signals`, one right after the other, just after epoch
/// 1's line is out; waits for it to end.
fn signal_after_epoch_1(root: &Path, args: &[&str], signals: &[i32]) -> std::process::Output {
    let child = common::spawn_past_epoch_1(common::binary("train").args(args).current_dir(root));
    // Past the epoch's end, where the loop also looks for a stop, and into epoch 2's steps.
    std::thread::sleep(Duration::from_millis(30));
    // Straight from this process, microseconds apart (a `kill` command per signal can arrive
    // after the step ends on a loaded machine).
    for &signal in signals {
        // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    }
    child.wait_with_output().unwrap()
}

/// SIGTERM (a job scheduler's stop) is Ctrl-C: a checkpoint, the command that resumes, exit 130.
/// A second signal right after the first exits at once, without finishing the step.
#[test]
fn sigterm_checkpoints_and_a_second_signal_exits_at_once() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let out = signal_after_epoch_1(
        root.path(),
        &args(&data, "term", &["--epochs", "20"]),
        &[libc::SIGTERM],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("checkpoint saved")
            && stderr.contains("resume with: train --resume --run term"),
        "{stderr}"
    );
    let newest = RunDir::at(&models_dir(root.path()), "term")
        .list_checkpoints()
        .unwrap()[0]
        .1
        .clone();
    assert!(
        newest.epochs_done == 1 && newest.steps_into_epoch > 0,
        "{newest:?}"
    );

    let started = Instant::now();
    let out = signal_after_epoch_1(
        root.path(),
        &args(&data, "twice", &["--epochs", "20"]),
        // Two kinds: two pending SIGINTs could merge into one.
        &[libc::SIGINT, libc::SIGTERM],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        !stderr.contains("checkpoint saved"),
        "exited at once: {stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    let newest = RunDir::at(&models_dir(root.path()), "twice")
        .list_checkpoints()
        .unwrap()[0]
        .1
        .clone();
    assert_eq!(
        (newest.epochs_done, newest.steps_into_epoch),
        (1, 0),
        "no checkpoint after the epoch's"
    );
}

struct Kills {
    with_checkpoint: usize,
    mid_write: usize,
}

/// Starts the run `killed` with `args_for("killed")` `kills` times and SIGKILLs it at a random
/// moment each time, only while it still runs; after each kill, checks that its files load, and
/// that a copy of its directory resumed to the end matches `reference` exactly.
fn kill_and_resume<A: AsRef<std::ffi::OsStr>>(
    root: &Path,
    args_for: impl Fn(&str) -> Vec<A>,
    reference: &Path,
    kills: usize,
    seed: u64,
) -> Kills {
    let run_dir = RunDir::at(&models_dir(root), "killed");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut real, mut with_checkpoint, mut mid_write) = (0, 0, 0);
    for kill in 0..kills {
        let mut child = common::binary("train")
            .args(args_for("killed"))
            .current_dir(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if kill % 2 == 0 {
            std::thread::sleep(Duration::from_millis(rng.random_range(20..600)));
        } else {
            // Aim at a checkpoint write: kill as soon as a temporary file shows up.
            let deadline = Instant::now() + Duration::from_millis(rng.random_range(100..1500));
            while Instant::now() < deadline && !has_temp_file(&run_dir) {}
        }
        // Only a run still going is killed; one that already ended is not counted as a kill,
        // and the next start begins afresh so that it has work left to be killed in.
        let running = child.try_wait().unwrap().is_none();
        if running {
            child.kill().unwrap(); // SIGKILL
            real += 1;
        }
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
            copy_dir(run_dir.path(), &models_dir(root).join(&copy));
        }
        if !running {
            std::fs::remove_dir_all(run_dir.path()).unwrap();
        }
        let resume_args = args_for(&copy);
        let out = run(
            "train",
            &resume_args
                .iter()
                .map(|a| a.as_ref().to_str().unwrap())
                .collect::<Vec<_>>(),
            root,
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "kill {kill}: {}",
            text(&out.stderr)
        );
        let finished = models_dir(root).join(&copy);
        assert!(
            weight_bits(&finished.join("last.safetensors"))
                == weight_bits(&reference.join("last.safetensors")),
            "kill {kill}: resumed run ended with other weights"
        );
        assert_eq!(
            metrics_without_timing(&finished),
            metrics_without_timing(reference),
            "kill {kill}"
        );
        let leftovers = std::fs::read_dir(finished.join("checkpoints"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .count();
        assert_eq!(
            leftovers, 0,
            "a resumed run clears temporary files left by killed ones"
        );
    }
    eprintln!("{real} of {kills} starts killed while running: {with_checkpoint} after a checkpoint existed, {mid_write} inside a checkpoint write");
    assert!(
        real >= kills / 2,
        "most kills must land on a running process"
    );
    assert!(
        with_checkpoint >= kills / 2,
        "most kills must land once checkpoints exist"
    );
    Kills {
        with_checkpoint,
        mid_write,
    }
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
