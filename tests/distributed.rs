//! Data-parallel training on the CPU: `train` under `mpirun`, as a cluster would start it.
//!
//! Built with `--features mpi` only, and run where Open MPI's `mpirun` is installed (CI installs
//! it). The tests compare N processes with one on the same global batch, resume a run on
//! another number of processes, and end a job whose rank dies.

#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    cpu_run, fixture_dir, metrics_without_timing, models_dir, relative_difference, text,
    weight_bits,
};

/// These tests start several processes each on two cores: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// No test waits longer than this for a job to end.
const LIMIT: Duration = Duration::from_secs(240);

/// `train` with `args` as `ranks` processes under mpirun (one process: `train` alone).
fn train(ranks: usize, args: &[&str], cwd: &Path) -> Command {
    if ranks > 1 {
        return under_mpirun(ranks, args, cwd);
    }
    let mut command = common::binary("train");
    command.args(args).current_dir(cwd);
    command
}

/// `train` with `args` as `ranks` processes under mpirun (one process too: a world of one).
fn under_mpirun(ranks: usize, args: &[&str], cwd: &Path) -> Command {
    let mut mpirun = Command::new("mpirun");
    mpirun
        .args(["--oversubscribe", "--bind-to", "none", "-np"])
        .arg(ranks.to_string())
        // The tests never fetch from the internet (see common::binary).
        .args(["-x", "KILN_DATA_URL"])
        // A stalled job ends in a minute, not PyTorch's ten (see the hung-rank test).
        .args(["-x", "KILN_COLLECTIVE_TIMEOUT"])
        .arg(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .current_dir(cwd)
        .env(
            "KILN_DATA_URL",
            "http://127.0.0.1:9/tests-never-fetch-from-the-internet",
        )
        .env("KILN_COLLECTIVE_TIMEOUT", "60")
        // CI runs as root, which Open MPI refuses unless told.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    mpirun
}

/// Waits for `child` at most LIMIT, then kills it and fails.
fn finish(child: Child) -> Output {
    common::wait_within(child, LIMIT)
}

/// Runs `command` to its end (at most LIMIT), its output captured.
fn output(mut command: Command) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun runs (install Open MPI: apt-get install openmpi-bin)");
    finish(child)
}

fn run(ranks: usize, args: &[&str], cwd: &Path) -> Output {
    output(train(ranks, args, cwd))
}

/// `out`'s stdout, once it is checked to have succeeded (else fails, naming `what`).
fn succeeded(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn run_ok(ranks: usize, args: &[&str], cwd: &Path) -> String {
    let what = format!("{ranks} process(es) of train {args:?}");
    succeeded(run(ranks, args, cwd), &what)
}

/// Runs `a` and `b` (in `runs`) ended with the same weights, bit for bit, and the same metrics.
fn assert_same_run(runs: &Path, a: &str, b: &str, why: &str) {
    assert_eq!(
        weight_bits(&runs.join(a).join("last.safetensors")),
        weight_bits(&runs.join(b).join("last.safetensors")),
        "{why}"
    );
    assert_eq!(
        metrics_without_timing(&runs.join(a)),
        metrics_without_timing(&runs.join(b))
    );
}

/// The files a run directory holds, by path within it.
fn files(run: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![run.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path.strip_prefix(run).unwrap().to_path_buf());
            }
        }
    }
    found.sort();
    found
}

/// The runs below: the fixture's 600 training images in global batches of 64 (ten steps an
/// epoch, the last of 24 images), so two epochs are 20 steps.
fn args<'a>(data: &'a str, run: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    cpu_run(data, run, "64", extra)
}

const TOLERANCE: f64 = 1e-5;

/// `mpirun -np 1` is a world of one: every exchange of the data-parallel loop runs (sums of
/// gradients and tallies, broadcasts), and it trains what a plain run trains, bit for bit.
#[test]
fn a_world_of_one_trains_as_a_plain_run() {
    let _paced = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    run_ok(1, &args(&data, "plain", &["--epochs", "1"]), root.path());
    let world = under_mpirun(1, &args(&data, "world", &["--epochs", "1"]), root.path());
    let stdout = succeeded(output(world), "mpirun -np 1 train");
    assert!(
        stdout.contains("data-parallel over 1 process (1 on this machine)"),
        "a world of one runs the data-parallel loop:\n{stdout}"
    );
    assert_same_run(
        &models_dir(root.path()),
        "world",
        "plain",
        "a world of one trained other weights than a plain run",
    );
}

/// Two processes on the global batch of 64 train what one process trains on batches of 64:
/// the same images, augmentations and mean gradients, summed in another order. Two runs on two
/// processes are the same bit for bit, and only rank 0 writes: the same files as one process.
fn two_processes_train_as_one(model_args: &[&str]) {
    let _paced = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let with = |run: &'static str| {
        let mut a = args(&data, run, &["--epochs", "2"]);
        a.extend_from_slice(model_args);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let (one, two, again) = (with("one"), with("two"), with("again"));
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    run_ok(1, &refs(&one), root.path());
    let out = run_ok(2, &refs(&two), root.path());
    assert!(
        out.contains("data-parallel over 2 processes"),
        "rank 0 names the world:\n{out}"
    );
    assert_eq!(
        out.matches("epoch 2/2").count(),
        1,
        "rank 0 alone prints:\n{out}"
    );
    run_ok(2, &refs(&again), root.path());
    let runs = models_dir(root.path());
    let difference = relative_difference(
        &runs.join("two/last.safetensors"),
        &runs.join("one/last.safetensors"),
    );
    assert!(
        difference <= TOLERANCE,
        "2 processes ended {difference:e} (relative) from 1 process"
    );
    assert!(
        difference > 0.0,
        "the same bits: were the two processes summed at all?"
    );
    assert_same_run(&runs, "two", "again", "two runs on two processes differ");
    assert_eq!(files(&runs.join("two")), files(&runs.join("one")));
    let mut names: Vec<_> = std::fs::read_dir(&runs)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["again", "one", "two"], "nothing but the runs");
}

#[test]
fn simplecnn_on_two_processes_trains_as_on_one() {
    // SGD: Adam would hide a wrong scale of the averaged gradient.
    two_processes_train_as_one(&["--model", "simplecnn", "--optimizer", "sgd"]);
}

/// With `--sync-bn` the batch norms of a ResNet take their statistics over the global batch, so
/// two processes compute what one does.
#[test]
fn resnet18_with_sync_bn_on_two_processes_trains_as_on_one() {
    let config = std::env::temp_dir().join(format!("kiln-resnet18-w8-{}.toml", std::process::id()));
    let text = include_str!("../configs/resnet18.toml").replace("width = 64 ", "width = 8 ");
    assert!(text.contains("width = 8 "));
    std::fs::write(&config, text).unwrap();
    let config = config.display().to_string();
    // A ResNet at initialisation amplifies rounding from step to step (another order of the
    // same sums: 2e-16 after one step, 7e-6 after three at lr 0.1); at this rate twenty steps
    // stay a comparison of the maths. Without --sync-bn the runs end 4e-3 apart.
    two_processes_train_as_one(&["--config", &config, "--sync-bn", "--lr", "0.0001"]);
}

/// Runs `ranks` processes of train with `args` and sends mpirun (or train) SIGINT, Ctrl-C, as
/// soon as epoch 1's line is out; waits for the job to end.
fn interrupted_after_epoch_1(ranks: usize, args: &[&str], cwd: &Path) -> Output {
    let child = common::spawn_past_epoch_1(&mut train(ranks, args, cwd));
    std::thread::sleep(Duration::from_millis(30));
    // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    finish(child)
}

/// A run stopped mid-epoch (Ctrl-C on mpirun: rank 0 writes one checkpoint, every rank stops)
/// resumes on another number of processes, at the same sample, and ends where a straight run
/// ends (to the order of the sums). Generated data, 79 steps an epoch: the stop lands mid-epoch.
#[test]
fn a_run_stopped_mid_epoch_resumes_on_another_number_of_processes() {
    let _paced = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let runs = models_dir(root.path());
    let synthetic = |run: &'static str, extra: &[&'static str]| {
        let mut args = vec![
            "--model",
            "simplecnn",
            "--dataset",
            "synthetic",
            "--device",
            "cpu",
            "--batch-size",
            "64",
            "--epochs",
            "4",
            "--run",
            run,
        ];
        args.extend_from_slice(extra);
        args
    };
    run_ok(1, &synthetic("straight", &[]), root.path());
    for (first, then, run) in [(2, 1, "two-then-one"), (1, 2, "one-then-two")] {
        let out = interrupted_after_epoch_1(first, &synthetic(run, &[]), root.path());
        assert!(!out.status.success(), "the interrupted run exits non-zero");
        let stderr = text(&out.stderr);
        assert_eq!(
            stderr.matches("interrupted: checkpoint saved").count(),
            1,
            "one checkpoint, written by rank 0:\n{stderr}"
        );
        let checkpoints: Vec<_> = std::fs::read_dir(runs.join(run).join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("step-"))
            .collect();
        assert_eq!(
            checkpoints.len(),
            1,
            "one checkpoint mid-epoch: {checkpoints:?}"
        );
        let resumed = run_ok(then, &synthetic(run, &["--resume"]), root.path());
        assert!(resumed.contains("resuming from"), "{resumed}");
        let difference = relative_difference(
            &runs.join(run).join("last.safetensors"),
            &runs.join("straight/last.safetensors"),
        );
        assert!(
            difference <= TOLERANCE,
            "{first} then {then} processes ended {difference:e} (relative) from a straight run"
        );
        let epochs = |r: &str| metrics_without_timing(&runs.join(r)).len();
        assert_eq!(epochs(run), epochs("straight"), "the same epochs, no more");
    }
}

/// The pids of the processes whose environment says they are rank `rank` of an Open MPI job
/// and whose command line holds `marker`.
fn pids_of_rank(rank: usize, marker: &str) -> Vec<i32> {
    let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let read = |file: &str| std::fs::read(entry.path().join(file)).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&read("cmdline")).into_owned();
        let environ = read("environ");
        let is_rank = environ.split(|&b| b == 0).any(|v| v == wanted.as_bytes());
        if is_rank && cmdline.contains(marker) && cmdline.contains("train") {
            pids.push(pid);
        }
    }
    pids
}

/// SIGKILL of rank 1 mid-epoch ends the whole job within 30 s: no process left, a non-zero exit,
/// a line naming rank 1; the run then resumes from its last checkpoint.
#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes() {
    let _paced = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let run = "killed-rank";
    let long = ["--model", "simplecnn", "--epochs", "40"];
    let child = common::spawn_past_epoch_1(&mut train(2, &args(&data, run, &long), root.path()));
    let victims = pids_of_rank(1, run);
    assert_eq!(victims.len(), 1, "rank 1 is one process: {victims:?}");
    let killed = Instant::now();
    // SAFETY: kill(2) on rank 1's pid, read from /proc just now.
    assert_eq!(unsafe { libc::kill(victims[0], libc::SIGKILL) }, 0);
    let out = finish(child);
    let ended = killed.elapsed();
    assert!(
        ended < Duration::from_secs(30),
        "the job took {ended:?} to end"
    );
    assert!(!out.status.success(), "the job exits non-zero");
    let stderr = text(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.contains("rank 1")),
        "a line names rank 1:\n{stderr}"
    );
    assert!(
        pids_of_rank(0, run).is_empty() && pids_of_rank(1, run).is_empty(),
        "a process of the job is left"
    );
    let resumed = run_ok(
        2,
        &args(&data, run, &["--resume", "--epochs", "2"]),
        root.path(),
    );
    assert!(resumed.contains("resuming from"), "{resumed}");
}

/// A rank that stops answering (SIGSTOP: alive, but never in its next collective) ends the job
/// within the collective timeout: the waiting rank says why and aborts, no process is left.
#[test]
fn a_hung_rank_ends_the_job_within_the_timeout() {
    let _paced = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let run = "hung-rank";
    let long = ["--model", "simplecnn", "--epochs", "40"];
    let mut command = train(2, &args(&data, run, &long), root.path());
    let child = common::spawn_past_epoch_1(command.env("KILN_COLLECTIVE_TIMEOUT", "3"));
    let victims = pids_of_rank(1, run);
    assert_eq!(victims.len(), 1, "rank 1 is one process: {victims:?}");
    let stopped = Instant::now();
    // SAFETY: kill(2) on rank 1's pid, read from /proc just now.
    assert_eq!(unsafe { libc::kill(victims[0], libc::SIGSTOP) }, 0);
    let out = finish(child);
    let ended = stopped.elapsed();
    // Whatever happened, leave no stopped process behind.
    // SAFETY: as above; the pid is gone or still rank 1's.
    unsafe { libc::kill(victims[0], libc::SIGKILL) };
    assert!(
        ended < Duration::from_secs(30),
        "the job took {ended:?} to end"
    );
    assert!(!out.status.success(), "the job exits non-zero");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("rank 0 of 2: no training step finished in 3 s"),
        "rank 0 says why:\n{stderr}"
    );
    assert!(
        pids_of_rank(0, run).is_empty(),
        "a process of the job is left"
    );
}

/// A rank that fails (here: every rank, on a batch smaller than the world) says which rank and
/// why, and the job ends non-zero instead of waiting for it.
#[test]
fn a_batch_smaller_than_the_world_is_one_clear_error() {
    let _paced = one_at_a_time();
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let small = [
        "--device",
        "cpu",
        "--data-dir",
        &data,
        "--batch-size",
        "1",
        "--run",
        "small",
    ];
    let out = run(2, &small, root.path());
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("of 2 failed") && stderr.contains("smaller than the 2 processes"),
        "{stderr}"
    );
    assert!(!models_dir(root.path()).join("small").exists());
}
