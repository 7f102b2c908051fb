//! Command-line pieces shared by the binaries.

use std::path::{Path, PathBuf};

use crate::data::download::Source;
use crate::data::Dataset;
use crate::error::{Error, Result};

/// Where the data comes from, and how missing CIFAR-10 is fetched.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Directory holding the CIFAR-10 binary files (data_batch_1.bin .. test_batch.bin);
    /// fetched into it when it holds none [default: data/cifar-10-batches-bin]
    #[arg(long, value_name = "DIR", help_heading = "Data")]
    pub data_dir: Option<PathBuf>,

    /// cifar10, or synthetic: ten classes of generated shapes, no files or network needed
    #[arg(long, value_name = "NAME", help_heading = "Data")]
    pub dataset: Option<Dataset>,

    /// Fetch CIFAR-10 from this URL (a mirror, a file:// URL or a local path to
    /// cifar-10-binary.tar.gz) instead of the official one
    #[arg(long, env = "KILN_DATA_URL", value_name = "URL", help_heading = "Data")]
    pub data_url: Option<String>,

    /// The archive's expected MD5 (the official archive's is built in)
    #[arg(long, value_name = "HEX", help_heading = "Data")]
    pub data_md5: Option<String>,

    /// The archive's expected SHA-256
    #[arg(
        long,
        value_name = "HEX",
        conflicts_with = "data_md5",
        help_heading = "Data"
    )]
    pub data_sha256: Option<String>,

    /// Never fetch: fail if the data is missing
    #[arg(long, help_heading = "Data")]
    pub no_download: bool,
}

impl DataArgs {
    /// Where to fetch missing CIFAR-10 from; None with --no-download.
    pub fn source(&self) -> Option<Source> {
        (!self.no_download).then(|| {
            Source::new(
                self.data_url.clone(),
                self.data_md5.clone(),
                self.data_sha256.clone(),
            )
        })
    }
}

/// Logs to stderr as RUST_LOG says (warnings by default); with `trace`, also every kiln span
/// into a Chrome trace file.
pub fn init_logging(trace: Option<&Path>) -> Result<Option<tracing_chrome::FlushGuard>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let (chrome, guard) = match trace {
        Some(path) => {
            let file =
                std::fs::File::create(path).map_err(Error::io("cannot create trace file", path))?;
            let (layer, guard) = tracing_chrome::ChromeLayerBuilder::new()
                .writer(file)
                .include_args(true)
                .build();
            let only_kiln = tracing_subscriber::filter::Targets::new()
                .with_target("kiln", tracing::Level::TRACE);
            (Some(layer.with_filter(only_kiln)), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(logs)
        .with(chrome)
        .init();
    Ok(guard)
}
