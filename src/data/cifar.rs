//! The CIFAR-10 binary version: `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`,
//! each a run of 3073-byte records (a label byte, then 1024 red, 1024 green, 1024 blue bytes).
//!
//! Files may hold any whole number of records, so subsets load like the full set.

use std::path::{Path, PathBuf};

use super::images::{ChannelStats, ImageSet, CHANNELS};
use super::DataSets;
use crate::error::{Error, Result};

pub const DEFAULT_DIR: &str = "data/cifar-10-batches-bin";
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const TEST_FILE: &str = "test_batch.bin";
pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
pub const SIDE: usize = 32;
pub const IMAGE_BYTES: usize = CHANNELS * SIDE * SIDE;
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;

/// Loads the training files and the test file from `dir`.
pub fn load(dir: &Path) -> Result<DataSets> {
    let train_paths = TRAIN_FILES
        .iter()
        .map(|name| require(dir, name))
        .collect::<Result<Vec<_>>>()?;
    let test_path = require(dir, TEST_FILE)?;
    // Room for every record at once: grown by doubling instead, the buffer passed through a
    // 240 MB allocation with the 120 MB one still held, which set the run's peak memory.
    let records = record_counts(dir).map_or(0, |(train, _)| train);
    let mut train = ImageSet::with_capacity(records, SIDE);
    for path in &train_paths {
        train.extend(read_records(path)?);
    }
    let test = read_nonempty(&test_path)?;
    if train.is_empty() {
        return Err(Error::DataInvalid {
            path: train_paths[0].clone(),
            message: "the training files hold no records".into(),
        });
    }
    tracing::info!(train = train.len(), test = test.len(), dir = %dir.display(), "loaded CIFAR-10");
    Ok(DataSets {
        train,
        test,
        test_files: None,
        classes: CLASSES.iter().map(|s| s.to_string()).collect(),
        stats: ChannelStats::CIFAR10,
    })
}

/// The training and test records the files in `dir` hold, from their sizes; None where one
/// is missing.
pub fn record_counts(dir: &Path) -> Option<(usize, usize)> {
    let records = |name: &str| {
        std::fs::metadata(dir.join(name))
            .ok()
            .map(|m| m.len() as usize / RECORD_BYTES)
    };
    let train = TRAIN_FILES
        .iter()
        .map(|name| records(name))
        .sum::<Option<usize>>()?;
    Some((train, records(TEST_FILE)?))
}

/// Loads only the test file from `dir` (all that evaluation needs).
pub fn load_test(dir: &Path) -> Result<ImageSet> {
    read_nonempty(&require(dir, TEST_FILE)?)
}

/// The first of the six files that `dir` lacks, if any.
pub fn missing_file(dir: &Path) -> Option<String> {
    TRAIN_FILES
        .iter()
        .chain([&TEST_FILE])
        .find(|name| !dir.join(name).is_file())
        .map(|name| name.to_string())
}

/// `dir/name`, or the error that says where to get the data.
fn require(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::DataMissing {
            dir: dir.to_path_buf(),
            missing: name.to_string(),
        })
    }
}

fn read_nonempty(path: &Path) -> Result<ImageSet> {
    let set = read_records(path)?;
    if set.is_empty() {
        return Err(Error::DataInvalid {
            path: path.to_path_buf(),
            message: "holds no records".into(),
        });
    }
    Ok(set)
}

/// Reads one binary file, checking its size and every label.
pub fn read_records(path: &Path) -> Result<ImageSet> {
    let bytes = std::fs::read(path).map_err(Error::io("cannot read", path))?;
    if bytes.len() % RECORD_BYTES != 0 {
        return Err(Error::DataInvalid {
            path: path.to_path_buf(),
            message: format!(
                "size {} bytes is not a whole number of {RECORD_BYTES}-byte CIFAR-10 records \
                 (truncated download or not a CIFAR-10 binary file?)",
                bytes.len()
            ),
        });
    }
    let count = bytes.len() / RECORD_BYTES;
    let mut set = ImageSet::with_capacity(count, SIDE);
    for (i, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = record[0];
        if label as usize >= CLASSES.len() {
            return Err(Error::DataInvalid {
                path: path.to_path_buf(),
                message: format!("record {i} has label {label}, but CIFAR-10 labels are 0..=9"),
            });
        }
        set.push(&record[1..], u32::from(label));
    }
    Ok(set)
}

/// Writes images in the binary layout (used for fixtures and subsets).
pub fn write_records(path: &Path, set: &ImageSet) -> Result<()> {
    let mut bytes = Vec::with_capacity(set.len() * RECORD_BYTES);
    for i in 0..set.len() {
        let label = set.labels()[i];
        let label = u8::try_from(label).map_err(|_| Error::DataInvalid {
            path: path.to_path_buf(),
            message: format!("label {label} does not fit the binary layout's byte"),
        })?;
        bytes.push(label);
        bytes.extend_from_slice(set.image(i));
    }
    std::fs::write(path, bytes).map_err(Error::io("cannot write", path))
}

/// Writes a complete directory (five training files and the test file) from two sets; the
/// training set is split as evenly as possible, as `make-cifar10-bin` does.
pub fn write_dir(dir: &Path, train: &ImageSet, test: &ImageSet) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io("cannot create", dir))?;
    let n = train.len();
    for (k, name) in TRAIN_FILES.iter().enumerate() {
        let (start, end) = (k * n / TRAIN_FILES.len(), (k + 1) * n / TRAIN_FILES.len());
        write_records(&dir.join(name), &train.subset(start..end))?;
    }
    write_records(&dir.join(TEST_FILE), test)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;

    /// The binary format as its definition gives it (www.cs.toronto.edu/~kriz/cifar.html):
    /// each record is a label byte, then 1024 red, 1024 green and 1024 blue bytes, each plane
    /// row by row from the top left. A file built byte by byte from that definition (not by
    /// kiln's writer) reads as the images it describes, through to the training batch.
    #[test]
    fn a_file_built_from_the_format_definition_reads_as_the_images_it_describes() {
        use crate::data::batches::{BatchBuffer, DeviceSet};
        use crate::data::images::ChannelStats;
        use candle_core::Device;

        let value = |image: usize, channel: usize, row: usize, col: usize| -> u8 {
            ((image * 97 + channel * 71 + row * 7 + col * 3) % 256) as u8
        };
        let labels = [7u8, 0, 9];
        let mut bytes = Vec::new();
        for (image, label) in labels.iter().enumerate() {
            bytes.push(*label);
            for channel in 0..3 {
                for row in 0..32 {
                    for col in 0..32 {
                        bytes.push(value(image, channel, row, col));
                    }
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data_batch_1.bin");
        std::fs::write(&path, &bytes).unwrap();

        let set = read_records(&path).unwrap();
        assert_eq!(set.labels(), &[7, 0, 9]);
        // Unnormalised (mean 0, std 1): each value is its byte over 255.
        let stats = ChannelStats {
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let images = DeviceSet::new(set, stats, &Device::Cpu).unwrap();
        let order = images.order(&[2, 0, 1]).unwrap();
        let (batch, batch_labels) = images
            .batch(&order, 0..3, &mut BatchBuffer::default(), None)
            .unwrap();
        assert_eq!(batch.dims(), &[3, 3, 32, 32]);
        assert_eq!(batch_labels.to_vec1::<u32>().unwrap(), vec![9, 7, 0]);
        let batch = batch.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (place, image) in [2usize, 0, 1].into_iter().enumerate() {
            for channel in 0..3 {
                for row in 0..32 {
                    for col in 0..32 {
                        let got = batch[((place * 3 + channel) * 32 + row) * 32 + col];
                        let want = f32::from(value(image, channel, row, col)) / 255.0;
                        assert!(
                            (got - want).abs() < 1e-6,
                            "image {image} channel {channel} ({row}, {col}): {got} != {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_directory_of_any_whole_number_of_records_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let train = synthetic::generate(23, 1);
        let test = synthetic::generate(7, 2);
        write_dir(dir.path(), &train, &test).unwrap();
        let loaded = load(dir.path()).unwrap();
        assert_eq!(loaded.train, train);
        assert_eq!(loaded.test, test);
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(
            dir.path(),
            &synthetic::generate(10, 1),
            &synthetic::generate(4, 2),
        )
        .unwrap();
        let victim = dir.path().join("data_batch_3.bin");
        let bytes = std::fs::read(&victim).unwrap();
        std::fs::write(&victim, &bytes[..bytes.len() - 100]).unwrap();
        let err = load(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains("data_batch_3.bin") && err.contains("whole number"),
            "{err}"
        );
    }

    #[test]
    fn a_label_above_nine_is_an_error_naming_file_and_record() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(
            dir.path(),
            &synthetic::generate(10, 1),
            &synthetic::generate(4, 2),
        )
        .unwrap();
        let victim = dir.path().join(TEST_FILE);
        let mut bytes = std::fs::read(&victim).unwrap();
        bytes[2 * RECORD_BYTES] = 10;
        std::fs::write(&victim, bytes).unwrap();
        let err = load(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains(TEST_FILE) && err.contains("record 2 has label 10"),
            "{err}"
        );
    }

    #[test]
    fn missing_data_says_where_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&dir.path().join("nowhere")).err().unwrap().to_string();
        assert!(
            err.contains("data_batch_1.bin") && err.contains("cifar-10-binary.tar.gz"),
            "{err}"
        );
        assert!(err.contains("--data-dir"), "{err}");
    }
}
