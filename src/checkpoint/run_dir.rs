//! `models/<run>/`: the resolved config, the metrics history, the weights and the checkpoints
//! of one run, and which of its checkpoints can be read.

use std::path::{Path, PathBuf};

use super::{read_progress, Progress};
use crate::error::{Error, Result};
use crate::fs::is_temp_file;

#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

/// A process's hold on a run directory while it trains there: an exclusive `flock` on
/// `<run>/.lock`, which the kernel releases however the process ends (SIGKILL included).
pub struct RunLock {
    _file: std::fs::File,
}

/// The checkpoint files of a run directory: those whose header reads, newest first, and those
/// that cannot be read, with what is wrong with each.
pub struct CheckpointScan {
    pub readable: Vec<(PathBuf, Progress)>,
    pub unreadable: Vec<(PathBuf, Error)>,
}

impl RunDir {
    /// The run directory `<models_dir>/<run>`, which may not exist yet.
    pub fn at(models_dir: &Path, run: &str) -> Self {
        Self {
            path: models_dir.join(run),
        }
    }

    /// Whether an earlier run started here (its config is written first).
    pub fn holds_run(&self) -> bool {
        self.config().exists() || self.holds_results()
    }

    /// Whether an earlier run left results here: a history, weights, a plot or any checkpoint
    /// file, readable or not. A run killed before its first checkpoint has none; one that has
    /// some must never be started afresh without `--overwrite`.
    pub fn holds_results(&self) -> bool {
        let any_checkpoint = self.checkpoint_files().is_ok_and(|files| !files.is_empty());
        any_checkpoint
            || [self.metrics(), self.last(), self.best(), self.plot()]
                .iter()
                .any(|p| p.exists())
    }

    /// Prepares the directory for a new run. A directory that already holds one is refused
    /// unless `overwrite`, so no earlier results are replaced by accident; with `overwrite`
    /// its history and checkpoints are removed.
    pub fn start_fresh(&self, overwrite: bool) -> Result<()> {
        if self.holds_run() {
            if !overwrite {
                return Err(Error::RunExists {
                    dir: self.path.clone(),
                });
            }
            for file in [self.metrics(), self.last(), self.best(), self.plot()] {
                if file.exists() {
                    std::fs::remove_file(&file).map_err(Error::io("cannot remove", file))?;
                }
            }
            if self.checkpoints().exists() {
                std::fs::remove_dir_all(self.checkpoints())
                    .map_err(Error::io("cannot remove", self.checkpoints()))?;
            }
        }
        self.create_dirs()
    }

    /// Takes the directory for this process (creating it), or says which process holds it: two
    /// processes writing one run's checkpoints and metrics would ruin both. Readers (evaluate,
    /// predict) take no lock.
    pub fn lock(&self) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        std::fs::create_dir_all(&self.path)
            .map_err(Error::io("cannot create run directory", &self.path))?;
        let path = self.path.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(Error::io("cannot open", &path))?;
        match file.try_lock() {
            Ok(()) => {
                // The holder's pid, for the message another process gives.
                let written = file
                    .set_len(0)
                    .and_then(|()| file.rewind())
                    .and_then(|()| write!(file, "{}", std::process::id()));
                written.map_err(Error::io("cannot write", &path))?;
                Ok(RunLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                Err(Error::RunInUse {
                    dir: self.path.clone(),
                    holder: if holder.is_empty() {
                        "unknown".into()
                    } else {
                        holder.into()
                    },
                })
            }
            Err(std::fs::TryLockError::Error(err)) => Err(Error::io("cannot lock", &path)(err)),
        }
    }

    /// Creates the directories, and removes temporary files that a killed process left
    /// mid-write (only one process trains in a run directory at a time).
    pub fn create_dirs(&self) -> Result<()> {
        std::fs::create_dir_all(self.checkpoints())
            .map_err(Error::io("cannot create run directory", &self.path))?;
        for dir in [self.path.clone(), self.checkpoints()] {
            let entries = std::fs::read_dir(&dir).map_err(Error::io("cannot list", &dir))?;
            for entry in entries.flatten() {
                if is_temp_file(&entry.file_name().to_string_lossy()) {
                    let path = entry.path();
                    std::fs::remove_file(&path).map_err(Error::io("cannot remove", path))?;
                }
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn config(&self) -> PathBuf {
        self.path.join("config.toml")
    }
    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.csv")
    }
    pub fn last(&self) -> PathBuf {
        self.path.join("last.safetensors")
    }
    pub fn best(&self) -> PathBuf {
        self.path.join("best.safetensors")
    }
    pub fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }
    /// The learning-rate range test's plot (`train --lr-find`).
    pub fn lr_find_plot(&self) -> PathBuf {
        self.path.join("lr_find.png")
    }

    pub fn plot(&self) -> PathBuf {
        self.path.join("metrics.png")
    }

    /// The file for a checkpoint at `progress`: `epoch-0003.safetensors` at the end of an epoch,
    /// `step-00001234.safetensors` (the global step) within one.
    pub fn checkpoint_path(&self, progress: &Progress) -> PathBuf {
        let name = if progress.steps_into_epoch == 0 {
            format!("epoch-{:04}.safetensors", progress.epochs_done)
        } else {
            format!("step-{:08}.safetensors", progress.global_step)
        };
        self.checkpoints().join(name)
    }

    /// Every complete checkpoint file here (temporary files excluded), in name order.
    fn checkpoint_files(&self) -> Result<Vec<PathBuf>> {
        let dir = self.checkpoints();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("cannot list", &dir)(e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let path = entry.map_err(Error::io("cannot list", &dir))?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !is_temp_file(&name) && name.ends_with(".safetensors") {
                files.push(path);
            }
        }
        files.sort();
        Ok(files)
    }

    /// Reads the position of every checkpoint here from its header alone (fast enough to run
    /// after every step).
    pub fn scan_checkpoints(&self) -> Result<CheckpointScan> {
        let mut scan = CheckpointScan {
            readable: Vec::new(),
            unreadable: Vec::new(),
        };
        for path in self.checkpoint_files()? {
            match read_progress(&path) {
                Ok(progress) => scan.readable.push((path, progress)),
                Err(err) => scan.unreadable.push((path, err)),
            }
        }
        scan.readable
            .sort_by_key(|(_, progress)| std::cmp::Reverse(progress.global_step));
        Ok(scan)
    }

    /// The checkpoints whose header reads, newest first.
    pub fn list_checkpoints(&self) -> Result<Vec<(PathBuf, Progress)>> {
        Ok(self.scan_checkpoints()?.readable)
    }

    /// Deletes all but the newest `keep` end-of-epoch checkpoints, and every mid-epoch one older
    /// than the newest checkpoint. A file that cannot be read is left alone: it may be all that
    /// remains of a run, and deciding that is its owner's call.
    pub fn prune_checkpoints(&self, keep: usize) -> Result<()> {
        let mut epochs_kept = 0;
        for (i, (path, progress)) in self.list_checkpoints()?.iter().enumerate() {
            let remove = if progress.steps_into_epoch == 0 {
                epochs_kept += 1;
                epochs_kept > keep
            } else {
                i > 0
            };
            if remove {
                std::fs::remove_file(path).map_err(Error::io("cannot remove", path))?;
            }
        }
        Ok(())
    }
}
