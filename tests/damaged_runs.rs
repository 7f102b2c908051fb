//! A damaged run is never made worse: `--resume` refuses rather than start over, damaged
//! checkpoints are skipped for older ones, and a changed byte in any weights or checkpoint file
//! is caught by its checksum instead of loading silently.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{
    cpu_run, fixture_dir, metrics_without_timing, models_dir, run, text, train_ok, weight_bits,
};
use rand::{Rng, SeedableRng};

fn args<'a>(data: &'a str, run: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    cpu_run(data, run, "32", extra)
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(snapshot(&path));
        } else {
            files.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    files
}

/// Where a safetensors file's tensor data starts: after the 8-byte length and the header.
fn data_start(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Flips one bit in the middle of `path`'s tensor data.
fn flip_tensor_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = (data_start(&bytes) + bytes.len()) / 2;
    bytes[at] ^= 0x04;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn resume_with_every_checkpoint_truncated_refuses_and_changes_no_file() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    train_ok(root.path(), &args(&data, "r", &["--epochs", "3"]));
    let run_dir = models_dir(root.path()).join("r");
    let checkpoints: Vec<PathBuf> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(checkpoints.len(), 3);
    for path in &checkpoints {
        let bytes = std::fs::read(path).unwrap();
        std::fs::write(path, &bytes[..1000]).unwrap();
    }
    let before = snapshot(&run_dir);

    let out = run(
        "train",
        &args(&data, "r", &["--epochs", "5", "--resume"]),
        root.path(),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot resume"), "{stderr}");
    for path in &checkpoints {
        let name = path.file_name().unwrap().to_string_lossy();
        let line = stderr
            .lines()
            .find(|l| l.contains(&*name))
            .unwrap_or_else(|| panic!("{name} is not named:\n{stderr}"));
        assert!(line.contains("truncated"), "says what is wrong: {line}");
    }
    assert!(
        stderr.contains("--resume PATH") && stderr.contains("--overwrite"),
        "says what to do: {stderr}"
    );
    assert!(!text(&out.stdout).contains("starting from scratch"));
    assert!(before == snapshot(&run_dir), "a file in the run changed");

    // A run directory with results but no checkpoints at all is refused the same way.
    std::fs::remove_dir_all(run_dir.join("checkpoints")).unwrap();
    let out = run(
        "train",
        &args(&data, "r", &["--epochs", "5", "--resume"]),
        root.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("holds no checkpoint file"),
        "{}",
        text(&out.stderr)
    );
    assert!(run_dir.join("metrics.csv").exists() && run_dir.join("best.safetensors").exists());
}

#[test]
fn a_damaged_newest_checkpoint_is_skipped_and_the_run_still_ends_exactly() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    train_ok(root.path(), &args(&data, "straight", &["--epochs", "3"]));
    let reference = models_dir(root.path()).join("straight");

    train_ok(root.path(), &args(&data, "split", &["--epochs", "2"]));
    let split = models_dir(root.path()).join("split");
    flip_tensor_byte(&split.join("checkpoints/epoch-0002.safetensors"));
    let out = run(
        "train",
        &args(&data, "split", &["--epochs", "3", "--resume"]),
        root.path(),
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.contains("epoch-0002.safetensors"))
        .unwrap_or_else(|| panic!("no warning names the damaged file:\n{stderr}"));
    assert!(warning.contains("checksum"), "{warning}");
    assert!(
        text(&out.stdout).contains("epoch-0001.safetensors"),
        "resumes from the older checkpoint:\n{}",
        text(&out.stdout)
    );
    for file in ["last.safetensors", "best.safetensors"] {
        assert!(
            weight_bits(&split.join(file)) == weight_bits(&reference.join(file)),
            "{file} differs from the uninterrupted run's"
        );
    }
    assert_eq!(
        metrics_without_timing(&split),
        metrics_without_timing(&reference)
    );
}

#[test]
fn a_flipped_byte_in_a_weights_file_is_refused_by_evaluate_and_init_weights() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    train_ok(root.path(), &args(&data, "r", &["--epochs", "1"]));
    let damaged = root.path().join("damaged.safetensors");
    std::fs::copy(models_dir(root.path()).join("r/best.safetensors"), &damaged).unwrap();
    flip_tensor_byte(&damaged);
    let damaged = damaged.display().to_string();
    for (binary, args) in [
        (
            "evaluate",
            vec![
                "--checkpoint",
                &damaged,
                "--data-dir",
                &data,
                "--device",
                "cpu",
            ],
        ),
        ("train", args(&data, "fresh", &["--init-weights", &damaged])),
    ] {
        let out = run(binary, &args, root.path());
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{binary}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains("damaged.safetensors")
                && stderr.contains("does not match its checksum"),
            "{binary}: {stderr}"
        );
    }
    assert!(!models_dir(root.path()).join("fresh").exists());
}

/// One random change to a safetensors file, of the kinds a disk or a copy inflicts.
fn mutate(bytes: &[u8], rng: &mut impl Rng) -> (String, Vec<u8>) {
    let mut out = bytes.to_vec();
    let start = data_start(bytes);
    match rng.random_range(0..5) {
        0 => {
            let at = rng.random_range(8..start);
            out[at] = rng.random();
            (format!("header byte {at}"), out)
        }
        1 => {
            let at = rng.random_range(0..8);
            out[at] = rng.random();
            (format!("length byte {at}"), out)
        }
        2 => {
            let keep = rng.random_range(0..bytes.len());
            out.truncate(keep);
            (format!("truncated to {keep}"), out)
        }
        3 => {
            let extra = rng.random_range(1..64);
            out.extend((0..extra).map(|_| rng.random::<u8>()));
            (format!("{extra} trailing bytes"), out)
        }
        _ => {
            let at = rng.random_range(start..bytes.len());
            out[at] ^= 1 << rng.random_range(0..8);
            (format!("tensor byte {at}"), out)
        }
    }
}

/// A tensor as stored: dtype, shape, raw bytes.
type RawTensor = (String, Vec<usize>, Vec<u8>);

/// Each tensor of a file by name, as the safetensors crate reads them.
fn raw_tensors(bytes: &[u8]) -> Option<BTreeMap<String, RawTensor>> {
    let file = safetensors::SafeTensors::deserialize(bytes).ok()?;
    Some(
        file.tensors()
            .into_iter()
            .map(|(name, view)| {
                (
                    name,
                    (
                        format!("{:?}", view.dtype()),
                        view.shape().to_vec(),
                        view.data().to_vec(),
                    ),
                )
            })
            .collect(),
    )
}

/// Seeded and bounded: hundreds of mutations of a weights file and a checkpoint through the
/// library (no panic, and a file that loads holds exactly the original tensors), and a few dozen
/// through the binaries (exit code 0 or 1, never a panic).
#[test]
fn fuzzed_weights_and_checkpoints_never_panic_or_load_changed_tensors() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    train_ok(root.path(), &args(&data, "r", &["--epochs", "1"]));
    let run_dir = models_dir(root.path()).join("r");
    let originals = [
        run_dir.join("best.safetensors"),
        run_dir.join("checkpoints/epoch-0001.safetensors"),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(16);
    let target = root.path().join("mutated.safetensors");
    let (mut loaded, mut refused) = (0, 0);
    for original in &originals {
        let bytes = std::fs::read(original).unwrap();
        let want = raw_tensors(&bytes).unwrap();
        for case in 0..200 {
            let (what, mutated) = mutate(&bytes, &mut rng);
            std::fs::write(&target, &mutated).unwrap();
            let result = std::panic::catch_unwind(|| {
                kiln::checkpoint::load_weights(&target, &candle_core::Device::Cpu).is_ok()
            });
            let Ok(ok) = result else {
                panic!("case {case} ({what}) panicked");
            };
            if ok {
                loaded += 1;
                assert!(
                    raw_tensors(&mutated).as_ref() == Some(&want),
                    "case {case} ({what}) loaded changed tensors"
                );
            } else {
                refused += 1;
            }
            if case % 10 == 0 {
                let path = target.display().to_string();
                let out = run(
                    "evaluate",
                    &[
                        "--checkpoint",
                        &path,
                        "--data-dir",
                        &data,
                        "--device",
                        "cpu",
                    ],
                    root.path(),
                );
                let stderr = text(&out.stderr);
                assert!(
                    matches!(out.status.code(), Some(0 | 1)) && !stderr.contains("panicked"),
                    "case {case} ({what}): {:?} {stderr}",
                    out.status
                );
                assert!(
                    ok || !out.status.success(),
                    "case {case} ({what}): evaluate used a file that does not load"
                );
            }
        }
    }
    eprintln!("{loaded} mutated files loaded with their tensors intact, {refused} refused");
    assert!(refused > 200, "most mutations are refused");
}
