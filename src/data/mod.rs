//! Files to batches: the CIFAR-10 binary format (and fetching it), the in-memory data set, and
//! synthetic images.

pub mod augment;
pub mod batches;
pub mod cifar;
pub mod download;
pub mod synthetic;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use batches::ImageSet;

use crate::error::{Error, Result};

/// The training and test sets of a run, and the names of their classes in label order.
pub struct DataSets {
    pub train: ImageSet,
    pub test: ImageSet,
    pub classes: Vec<String>,
}

/// Where a run's images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    /// The CIFAR-10 binary files in the data directory (fetched when missing).
    #[default]
    Cifar10,
    /// Generated in memory: ten classes of coloured shapes; needs no files and no network.
    Synthetic,
}

impl FromStr for Dataset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cifar10" | "cifar-10" => Ok(Self::Cifar10),
            "synthetic" => Ok(Self::Synthetic),
            _ => Err(Error::InvalidSetting(format!(
                "unknown data set '{s}': expected cifar10 or synthetic"
            ))),
        }
    }
}

impl fmt::Display for Dataset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cifar10 => "cifar10",
            Self::Synthetic => "synthetic",
        })
    }
}

/// The synthetic test set's size, and the seeds of both sets: fixed, so `evaluate` regenerates
/// exactly the test set that training used, whatever the run's seed.
pub const SYNTHETIC_TEST_IMAGES: usize = 2000;
const SYNTHETIC_TRAIN_SEED: u64 = 1;
const SYNTHETIC_TEST_SEED: u64 = 2;

/// Loads both sets; `fetch` (None with `--no-download`) says where missing CIFAR-10 comes from.
pub fn load(
    dataset: Dataset,
    dir: &Path,
    synthetic_images: usize,
    fetch: Option<&download::Source>,
) -> Result<DataSets> {
    match dataset {
        Dataset::Cifar10 => {
            fetch_if_missing(dir, fetch)?;
            cifar::load(dir)
        }
        Dataset::Synthetic => Ok(DataSets {
            train: synthetic::generate(synthetic_images, SYNTHETIC_TRAIN_SEED),
            test: synthetic_test_set(),
            classes: names(&synthetic::CLASSES),
        }),
    }
}

/// The class names of a data set.
pub fn class_names(dataset: Dataset) -> Vec<String> {
    match dataset {
        Dataset::Cifar10 => names(&cifar::CLASSES),
        Dataset::Synthetic => names(&synthetic::CLASSES),
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Loads only the test set (all that evaluation needs).
pub fn load_test(
    dataset: Dataset,
    dir: &Path,
    fetch: Option<&download::Source>,
) -> Result<ImageSet> {
    match dataset {
        Dataset::Cifar10 => {
            fetch_if_missing(dir, fetch)?;
            cifar::load_test(dir)
        }
        Dataset::Synthetic => Ok(synthetic_test_set()),
    }
}

fn fetch_if_missing(dir: &Path, fetch: Option<&download::Source>) -> Result<()> {
    match fetch {
        Some(source) => download::ensure(dir, source),
        None => Ok(()),
    }
}

fn synthetic_test_set() -> ImageSet {
    synthetic::generate(SYNTHETIC_TEST_IMAGES, SYNTHETIC_TEST_SEED)
}
