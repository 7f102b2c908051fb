//! cuDNN's algorithm choices kept on disk between runs. Choosing by measurement runs every
//! candidate engine configuration of every new convolution once (loading each one's kernels on
//! first use): a large share of a short run's first epoch, paid again by every process. A
//! choice found once is appended to a text file per device and cuDNN version, one
//! line each:
//!
//! ```text
//! <the convolution, as kiln describes it>\t<the configuration's name, e.g. A3>\t<workspace bytes>
//! ```
//!
//! and read at the next run's start. The file is a cache: a line that does not parse is
//! skipped, a later line for the same convolution wins, an algorithm that no longer runs is
//! chosen afresh, and `KILN_CUDNN_CACHE=off` leaves it alone (`KILN_CUDNN_CACHE=PATH` moves it).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A choice as the file keeps it: the algorithm's name (an engine configuration's, as
/// `cudnn_graph::candidates` names them) and its workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub algorithm: String,
    pub workspace: usize,
}

/// The choices of one device, and the file they live in (None: not kept).
#[derive(Debug, Default)]
pub struct AlgorithmCache {
    path: Option<PathBuf>,
    choices: HashMap<String, Saved>,
}

impl AlgorithmCache {
    /// The cache for a device named `device` with cuDNN `version`, read from its file.
    pub fn open(device: &str, version: usize) -> Self {
        let Some(path) = cache_file(device, version) else {
            return Self::default();
        };
        let choices = std::fs::read_to_string(&path)
            .map(|text| parse(&text))
            .unwrap_or_default();
        Self {
            path: Some(path),
            choices,
        }
    }

    pub fn get(&self, convolution: &str) -> Option<&Saved> {
        self.choices.get(convolution)
    }

    /// Keeps `saved` for `convolution`, appending it to the file (best effort: a cache that
    /// cannot be written only costs the next run its search).
    pub fn insert(&mut self, convolution: &str, saved: Saved) {
        if let Some(path) = &self.path {
            if let Err(e) = append(path, &line(convolution, &saved)) {
                tracing::debug!("cuDNN algorithm cache {}: {e}", path.display());
            }
        }
        self.choices.insert(convolution.to_string(), saved);
    }
}

fn line(convolution: &str, saved: &Saved) -> String {
    format!("{convolution}\t{}\t{}\n", saved.algorithm, saved.workspace)
}

fn parse(text: &str) -> HashMap<String, Saved> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let (convolution, algorithm, workspace) =
                (fields.next()?, fields.next()?, fields.next()?);
            if fields.next().is_some() || convolution.is_empty() || algorithm.is_empty() {
                return None;
            }
            let saved = Saved {
                algorithm: algorithm.to_string(),
                workspace: workspace.parse().ok()?,
            };
            Some((convolution.to_string(), saved))
        })
        .collect()
}

/// One line in one write on a file opened to append: lines of concurrent runs do not interleave.
fn append(path: &Path, line: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(line.as_bytes())
}

/// `$KILN_CUDNN_CACHE` (off: none), else `$XDG_CACHE_HOME/kiln` or `~/.cache/kiln`.
fn cache_file(device: &str, version: usize) -> Option<PathBuf> {
    let name: String = device
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let file = format!("cudnn-{version}-{name}.txt");
    match std::env::var_os("KILN_CUDNN_CACHE") {
        Some(v) if v == "off" => None,
        Some(v) => Some(PathBuf::from(v).join(file)),
        None => {
            let home = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(home.join("kiln").join(file))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_survive_a_restart_and_bad_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.txt");
        let mut cache = AlgorithmCache {
            path: Some(path.clone()),
            choices: HashMap::new(),
        };
        let saved = |algorithm: &str, workspace| Saved {
            algorithm: algorithm.into(),
            workspace,
        };
        cache.insert("Key { x: [1, 2] }", saved("Forward(GEMM)", 0));
        cache.insert("Key { x: [3, 4] }", saved("BackwardData(ALGO_1)", 4096));
        cache.insert("Key { x: [1, 2] }", saved("Forward(WINOGRAD)", 128));
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("torn line without tabs\nKey\tForward(X)\tnot a number\n");
        std::fs::write(&path, text).unwrap();
        let reread = parse(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(reread.len(), 2);
        assert_eq!(reread["Key { x: [1, 2] }"], saved("Forward(WINOGRAD)", 128));
        assert_eq!(
            reread["Key { x: [3, 4] }"],
            saved("BackwardData(ALGO_1)", 4096)
        );
    }

    #[test]
    fn file_names_are_per_device_and_version() {
        let a = cache_file("NVIDIA H200", 91900).unwrap();
        let b = cache_file("NVIDIA H100 80GB HBM3", 91900).unwrap();
        assert_ne!(a, b);
        assert!(
            a.ends_with("cudnn-91900-NVIDIA-H200.txt"),
            "{}",
            a.display()
        );
    }
}
