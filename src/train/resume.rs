//! Continuing a run: its newest checkpoint, and whether today's settings still fit it.

use std::path::PathBuf;

use candle_core::Device;

use crate::checkpoint::{load_checkpoint, Checkpoint, RunDir};
use crate::config::Config;
use crate::error::{Error, Result};

/// Settings that a checkpoint is bound to: another model or optimizer cannot use its state, and
/// another batch size, seed, shuffling or data set would make the continued run differ from a straight one.
pub const BINDING: &[&str] = &[
    "model",
    "optimizer",
    "batch_size",
    "seed",
    "shuffle",
    "dataset",
    "synthetic_images",
    "image_size",
    "val_split",
    "stem",
    "width",
    // Frozen (0) or not decides which parameters the optimizer holds state for.
    "backbone_lr_scale",
    // The average is optimizer state that only a lookahead run keeps.
    "lookahead",
    // Steps per epoch, and so where a checkpoint within an epoch stands.
    "drop_last",
    "accumulate",
];

/// Compares the checkpoint's settings with today's. A change to a [`BINDING`] setting is an
/// error naming each difference; any other change (more epochs, a new learning rate, another
/// data directory) is allowed and returned as a note to log.
pub fn reconcile(saved: &Config, now: &Config) -> Result<Vec<String>> {
    let table = |c: &Config| toml::Table::try_from(c).unwrap_or_default();
    let (saved, now) = (table(saved), table(now));
    let mut refused = Vec::new();
    let mut notes = Vec::new();
    for (key, old) in &saved {
        let Some(new) = now.get(key) else { continue };
        if old == new {
            continue;
        }
        let change = format!("{key} {old} -> {new}");
        if BINDING.contains(&key.as_str()) {
            refused.push(change);
        } else {
            notes.push(change);
        }
    }
    if refused.is_empty() {
        Ok(notes)
    } else {
        Err(Error::CheckpointMismatch(format!(
            "the run was trained with other settings ({}); resume with its settings, or start a new run with --run NAME",
            refused.join(", ")
        )))
    }
}

/// The newest checkpoint in `run_dir` that loads and verifies; a damaged one is skipped with a
/// warning naming it, and the one before it tried. None only where the directory holds no
/// results at all (a new run, or one killed before its first checkpoint); a directory with
/// results but no usable checkpoint is an error listing what is wrong with each file, so that
/// nothing there is replaced by a fresh start.
pub fn newest(run_dir: &RunDir, device: &Device) -> Result<Option<(PathBuf, Checkpoint)>> {
    let scan = run_dir.scan_checkpoints()?;
    let mut problems: Vec<(PathBuf, String)> = scan
        .unreadable
        .into_iter()
        .map(|(path, err)| (path, err.to_string()))
        .collect();
    for (path, _) in scan.readable {
        match load_checkpoint(&path, device) {
            Ok(checkpoint) => {
                for (_, problem) in &problems {
                    tracing::warn!("skipped a damaged checkpoint: {problem}");
                }
                return Ok(Some((path, checkpoint)));
            }
            Err(err) => problems.push((path, err.to_string())),
        }
    }
    if !run_dir.holds_results() {
        return Ok(None);
    }
    problems.sort();
    let mut problems: Vec<String> = problems.into_iter().map(|(_, p)| p).collect();
    if problems.is_empty() {
        problems.push(format!(
            "{} holds no checkpoint file",
            run_dir.checkpoints().display()
        ));
    }
    Err(Error::NothingToResume {
        dir: run_dir.path().to_path_buf(),
        problems,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, Overrides, Precision};

    #[test]
    fn binding_changes_are_refused_and_others_noted() {
        let (_, saved) = resolve(Some("simplecnn"), None, &Overrides::default()).unwrap();
        let more = saved
            .clone()
            .apply(&Overrides {
                epochs: Some(20),
                lr: Some(0.0005),
                ..Default::default()
            })
            .unwrap();
        let notes = reconcile(&saved, &more).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(
            notes.iter().any(|n| n.starts_with("epochs 10 -> 20")),
            "{notes:?}"
        );

        let other = saved
            .clone()
            .apply(&Overrides {
                batch_size: Some(32),
                seed: Some(1),
                ..Default::default()
            })
            .unwrap();
        let err = reconcile(&saved, &other).unwrap_err().to_string();
        assert!(
            err.contains("batch_size 64 -> 32") && err.contains("seed 42 -> 1"),
            "{err}"
        );
        assert!(reconcile(&saved, &saved).unwrap().is_empty());
    }

    /// Weights and optimizer state are f32 in either precision, so a run may switch; a run
    /// saved before the key existed reads as auto (the device decides, as for a new run).
    #[test]
    fn precision_may_change_on_resume_and_defaults_to_auto() {
        let (_, saved) = resolve(Some("resnet18"), None, &Overrides::default()).unwrap();
        assert_eq!(saved.precision, Precision::Auto);
        let bf16 = saved
            .clone()
            .apply(&Overrides {
                precision: Some(Precision::Bf16),
                ..Default::default()
            })
            .unwrap();
        let notes = reconcile(&saved, &bf16).unwrap();
        assert!(notes == ["precision \"auto\" -> \"bf16\""], "{notes:?}");
        let older: String = saved
            .to_toml()
            .lines()
            .filter(|line| !line.starts_with("precision"))
            .map(|line| format!("{line}\n"))
            .collect();
        let parsed = Config::parse(&older, std::path::Path::new("old.toml")).unwrap();
        assert_eq!(parsed.precision, Precision::Auto);
    }
}
