//! kiln's error type: every message says what went wrong and, where it can, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown device '{0}': expected auto, cpu, cuda, cuda:N, metal or metal:N")]
    BadDeviceName(String),

    #[error("{device} requested, but this kiln was built without {feature} support; rebuild with: cargo build --release --features {feature}")]
    DeviceNotCompiled {
        device: String,
        feature: &'static str,
    },

    #[error("{device} requested, but it is not available on this machine: {reason}")]
    DeviceUnavailable { device: String, reason: String },

    #[error("unknown model '{name}'; available models: {available}")]
    UnknownModel { name: String, available: String },

    // The cause is part of the message, not a `source`: reporters that print the chain would
    // otherwise print it twice.
    #[error("cannot read config {path}: {cause}")]
    ConfigRead {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("invalid config {path}: {message}")]
    ConfigParse { path: PathBuf, message: String },

    #[error("invalid setting: {0}")]
    InvalidSetting(String),

    /// A collective operation between the processes of a data-parallel run failed.
    #[error("rank {rank} of {size}: {message}")]
    Distributed {
        rank: usize,
        size: usize,
        message: String,
    },

    #[error("no CIFAR-10 data in {dir}: {missing} is missing. Let kiln fetch it (drop --no-download), or get the binary version (cifar-10-binary.tar.gz) from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it so that {dir} holds data_batch_1.bin .. data_batch_5.bin and test_batch.bin, or pass --data-dir DIR; to run without it, use --dataset synthetic")]
    DataMissing { dir: PathBuf, missing: String },

    #[error("cannot fetch CIFAR-10 from {url} into {dir}: {message}. To do it by hand: download cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it so that {dir} holds data_batch_1.bin .. data_batch_5.bin and test_batch.bin. To run offline: --dataset synthetic")]
    Download {
        url: String,
        dir: PathBuf,
        message: String,
    },

    #[error("the archive from {url} is not usable: {message}; nothing was written to the data directory")]
    ArchiveInvalid { url: String, message: String },

    #[error("{path}: {message}")]
    DataInvalid { path: PathBuf, message: String },

    #[error("run directory {dir} is in use by another kiln process (pid {holder}); wait for it to end, or pass --run NAME to start a separate run")]
    RunInUse { dir: PathBuf, holder: String },

    #[error("run directory {dir} already holds a run; pass --resume to continue it, --run NAME to start a separate one, or --overwrite to replace it")]
    RunExists { dir: PathBuf },

    #[error("cannot read {path}: {message}")]
    WeightsInvalid { path: PathBuf, message: String },

    #[error(
        "cannot resume {dir}: it holds results but no checkpoint that loads{}\nnothing was changed; resume from a good checkpoint with --resume PATH, or start the run again with --overwrite (its results are then replaced)",
        problems.iter().map(|p| format!("\n  {p}")).collect::<String>()
    )]
    NothingToResume { dir: PathBuf, problems: Vec<String> },

    #[error("checkpoint does not fit: {0}")]
    CheckpointMismatch(String),

    #[error("{action} {path}: {cause}")]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("cannot draw {path}: {message}")]
    Plot { path: PathBuf, message: String },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the operation and the path it concerned.
    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |cause| Error::Io {
            action,
            path,
            cause,
        }
    }
}
