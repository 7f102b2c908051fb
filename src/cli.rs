//! Command-line pieces shared by the binaries.

use std::path::{Path, PathBuf};

use crate::data::download::Source;
use crate::data::Dataset;
use crate::error::{Error, Result};

/// Where the data comes from, and how missing CIFAR-10 is fetched.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DataArgs {
    /// Directory holding the CIFAR-10 binary files (data_batch_1.bin .. test_batch.bin),
    /// fetched into it when it holds none; or, with --dataset folder, the image folder
    /// [default: data/cifar-10-batches-bin]
    #[arg(long, value_name = "DIR", help_heading = "Data")]
    pub data_dir: Option<PathBuf>,

    /// cifar10; synthetic (ten classes of generated shapes, no files or network needed); or
    /// folder: your own pictures, DIR/<class>/*.jpg|png|bmp|webp, split by DIR/train and
    /// DIR/val (or DIR/test) when they exist
    #[arg(long, value_name = "NAME", help_heading = "Data")]
    pub dataset: Option<Dataset>,

    /// With --dataset folder: pictures are resized (shorter side) and centre-cropped to N x N
    /// [default: the config's image_size, 32]
    #[arg(long, value_name = "N", help_heading = "Data")]
    pub image_size: Option<usize>,

    /// With --dataset folder and no train/val folders: the share of each class held out for
    /// evaluation, chosen by the seed [default: the config's val_split, 0.1]
    #[arg(long, value_name = "SHARE", help_heading = "Data")]
    pub val_split: Option<f64>,

    /// With --dataset folder: skip (and count) pictures that do not decode, instead of stopping
    #[arg(long, help_heading = "Data")]
    pub skip_bad_images: bool,

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

/// A progress bar for decoding a folder's pictures, on a terminal (and `shown`); it finishes
/// itself when the last picture is done.
pub fn decode_bar(shown: bool) -> impl Fn(usize, usize) + Sync {
    counting_bar(shown, "decoding images")
}

/// A bar of `label`'s progress on stderr, when `shown` and stderr is a terminal: call it with
/// (done, total); it clears itself once done reaches total.
pub fn counting_bar(shown: bool, label: &str) -> impl Fn(usize, usize) + Sync {
    use std::io::IsTerminal;
    let bar = (shown && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{label} {{bar:30}} {{pos}}/{{len}} ({{per_sec}}, {{eta}} left)"
            ))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    move |done, total| {
        if let Some(bar) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
            if done >= total {
                bar.finish_and_clear();
            }
        }
    }
}

/// One line on what a folder gave: classes, images per split, what was skipped or ignored,
/// and whether the images came from their cache.
pub fn folder_summary(
    dir: &Path,
    data: &crate::data::DataSets,
    report: &crate::data::folder::FolderReport,
) -> String {
    let mut line = format!(
        "{}: {} classes, {} training and {} evaluation images",
        dir.display(),
        data.classes.len(),
        data.train.len(),
        data.test.len()
    );
    if report.decoded == 0 {
        line.push_str(&format!(
            " (from the decoded cache, {:.2} s)",
            report.seconds
        ));
    } else {
        line.push_str(&format!(
            " ({} decoded now in {:.1} s, {:.0} images/s; cached for next time)",
            report.decoded,
            report.seconds,
            report.decoded as f64 / report.seconds.max(1e-9)
        ));
    }
    if !report.skipped.is_empty() {
        line.push_str(&format!(
            "; skipped {} pictures that do not decode",
            report.skipped.len()
        ));
    }
    if report.ignored > 0 {
        line.push_str(&format!(
            "; ignored {} files that are not pictures",
            report.ignored
        ));
    }
    line
}

/// A command's whole run: logging set up (with a trace file if asked), then `run`, which gives
/// the exit code; any error printed as one `error:` line (with its context chain) and exit code
/// 1. The trace is finished after `run` returns.
pub fn exit_code(
    trace: Option<&Path>,
    run: impl FnOnce() -> anyhow::Result<std::process::ExitCode>,
) -> std::process::ExitCode {
    let outcome = init_logging(trace)
        .map_err(anyhow::Error::from)
        .and_then(|_guard| run());
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
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
