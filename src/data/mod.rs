//! Files to batches: the CIFAR-10 binary format (and fetching it), the in-memory data set, and
//! synthetic images.

pub mod augment;
pub mod batches;
pub mod cifar;
pub mod download;
pub mod folder;
pub mod images;
pub mod synthetic;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use images::{ChannelStats, ImageSet};

use crate::error::{Error, Result};

/// The training and test sets of a run, the names of their classes in label order, and the
/// statistics inputs are normalised with.
#[derive(Debug)]
pub struct DataSets {
    pub train: ImageSet,
    pub test: ImageSet,
    /// The file each test image was decoded from, in the test set's order: a folder's; None
    /// for CIFAR-10's records and generated images.
    pub test_files: Option<Vec<PathBuf>>,
    pub classes: Vec<String>,
    pub stats: ChannelStats,
}

/// Where a run's images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[value(rename_all = "lower")]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    /// The CIFAR-10 binary files in the data directory (fetched when missing).
    #[default]
    #[value(alias = "cifar-10")]
    Cifar10,
    /// Generated in memory: ten classes of coloured shapes; needs no files and no network.
    Synthetic,
    /// A folder of pictures in the ImageFolder layout (`DIR/<class>/*.jpg`).
    Folder,
}

/// The synthetic test set's size, and the seeds of both sets: fixed, so `evaluate` regenerates
/// exactly the test set that training used, whatever the run's seed.
pub const SYNTHETIC_TEST_IMAGES: usize = 2000;
const SYNTHETIC_TRAIN_SEED: u64 = 1;
const SYNTHETIC_TEST_SEED: u64 = 2;

/// What to load, and how.
pub struct Request<'a> {
    pub dataset: Dataset,
    /// The CIFAR-10 files' or the image folder's directory.
    pub dir: &'a Path,
    /// Training images generated for `synthetic`.
    pub synthetic_images: usize,
    /// Where missing CIFAR-10 comes from; None with `--no-download`.
    pub fetch: Option<&'a download::Source>,
    /// How a folder is split and decoded.
    pub folder: folder::FolderOptions,
}

/// Both sets, and for a folder what its scan found (ignored files, skipped images, caches).
/// `progress` hears how decoding a folder goes.
pub fn load(
    request: &Request,
    progress: folder::Progress,
) -> Result<(DataSets, Option<folder::FolderReport>)> {
    let _span = tracing::info_span!("load data").entered();
    let size = request.folder.image_size;
    let fixed_size = |name: &str| {
        if size == cifar::SIDE {
            Ok(())
        } else {
            Err(Error::InvalidSetting(format!(
                "{name} images are {0}x{0}; image_size = {size} is for --dataset folder (drop it or set it to {0})",
                cifar::SIDE
            )))
        }
    };
    match request.dataset {
        Dataset::Cifar10 => {
            fixed_size("CIFAR-10")?;
            fetch_if_missing(request.dir, request.fetch)?;
            Ok((cifar::load(request.dir)?, None))
        }
        Dataset::Synthetic => {
            fixed_size("synthetic")?;
            let sets = DataSets {
                train: synthetic::generate(request.synthetic_images, SYNTHETIC_TRAIN_SEED),
                test: synthetic_test_set(),
                test_files: None,
                classes: names(&synthetic::CLASSES),
                stats: ChannelStats::CIFAR10,
            };
            Ok((sets, None))
        }
        Dataset::Folder => {
            let (sets, report) = folder::load(request.dir, &request.folder, progress)?;
            Ok((sets, Some(report)))
        }
    }
}

/// What a request's data holds, as far as shapes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dimensions {
    pub classes: usize,
    /// Image side in pixels.
    pub side: usize,
    pub train_images: usize,
    pub test_images: usize,
}

/// The request's [`Dimensions`] where they are known without loading it: CIFAR-10's from its
/// files' sizes (None while they are missing) and the synthetic set's; a folder's are known
/// only once it is scanned.
pub fn known_dimensions(request: &Request) -> Option<Dimensions> {
    match request.dataset {
        Dataset::Cifar10 => {
            let (train_images, test_images) = cifar::record_counts(request.dir)?;
            Some(Dimensions {
                classes: cifar::CLASSES.len(),
                side: cifar::SIDE,
                train_images,
                test_images,
            })
        }
        Dataset::Synthetic => Some(Dimensions {
            classes: synthetic::CLASSES.len(),
            side: cifar::SIDE,
            train_images: request.synthetic_images,
            test_images: SYNTHETIC_TEST_IMAGES,
        }),
        Dataset::Folder => None,
    }
}

/// The evaluation split alone, what [`load_test`] gives.
#[derive(Debug)]
pub struct TestSet {
    pub images: ImageSet,
    /// The file of each image, for a folder (as [`DataSets::test_files`]).
    pub files: Option<Vec<PathBuf>>,
    pub classes: Vec<String>,
    /// The training split's statistics, which inputs are normalised with.
    pub stats: ChannelStats,
}

/// Only the evaluation split, its class names and the training split's statistics (a folder is
/// scanned and split as training did; its caches make that quick).
pub fn load_test(request: &Request, progress: folder::Progress) -> Result<TestSet> {
    match request.dataset {
        Dataset::Cifar10 => {
            fetch_if_missing(request.dir, request.fetch)?;
            Ok(TestSet {
                images: cifar::load_test(request.dir)?,
                files: None,
                classes: names(&cifar::CLASSES),
                stats: ChannelStats::CIFAR10,
            })
        }
        Dataset::Synthetic => Ok(TestSet {
            images: synthetic_test_set(),
            files: None,
            classes: names(&synthetic::CLASSES),
            stats: ChannelStats::CIFAR10,
        }),
        Dataset::Folder => {
            let (sets, _) = load(request, progress)?;
            Ok(TestSet {
                images: sets.test,
                files: sets.test_files,
                classes: sets.classes,
                stats: sets.stats,
            })
        }
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
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
