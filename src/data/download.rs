//! Fetching CIFAR-10 when `--data-dir` holds none: download (resumable), verify, unpack, check,
//! and only then rename into place, so the data directory is either untouched or complete.
//!
//! The archive is untrusted input: entries that would land outside the target (absolute paths,
//! `..`, links) are refused, and unpacking stops past a size bound (a decompression bomb is an
//! error, not a full disk).

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use md5::Md5;
use sha2::{Digest, Sha256};

use super::cifar::{self, TEST_FILE, TRAIN_FILES};
use crate::error::{Error, Result};

/// The binary version from the data set's home page, and its published MD5.
pub const OFFICIAL_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const OFFICIAL_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// The real archive is 170 MB and unpacks to 185 MB; anything far beyond is not CIFAR-10.
const MAX_DOWNLOAD: u64 = 1 << 30;
const MAX_UNPACKED: u64 = 512 << 20;
const MAX_ENTRIES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    Md5(String),
    Sha256(String),
}

/// Where to fetch from, and what the file must hash to.
#[derive(Debug, Clone)]
pub struct Source {
    pub url: String,
    /// None only for a custom URL given without a checksum: then nothing is verified.
    pub checksum: Option<Checksum>,
}

impl Source {
    /// The official archive unless `url` names another; a given checksum always applies.
    pub fn new(url: Option<String>, md5: Option<String>, sha256: Option<String>) -> Self {
        let given = match (md5, sha256) {
            (Some(m), _) => Some(Checksum::Md5(m.to_ascii_lowercase())),
            (None, Some(s)) => Some(Checksum::Sha256(s.to_ascii_lowercase())),
            (None, None) => None,
        };
        match url {
            Some(url) => Self {
                url,
                checksum: given,
            },
            None => Self {
                url: OFFICIAL_URL.to_string(),
                checksum: given.or(Some(Checksum::Md5(OFFICIAL_MD5.to_string()))),
            },
        }
    }
}

/// Makes sure `dir` holds the CIFAR-10 binary files, fetching them from `source` when it holds
/// none. A directory with some other files in it is left alone.
pub fn ensure(dir: &Path, source: &Source) -> Result<()> {
    if cifar::missing_file(dir).is_none() {
        return Ok(());
    }
    let occupied = std::fs::read_dir(dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if occupied {
        return Err(Error::DataInvalid {
            path: dir.to_path_buf(),
            message: format!(
                "holds files but not CIFAR-10's six ({} is missing); kiln downloads only into an empty or new directory: empty it, or pass another --data-dir",
                cifar::missing_file(dir).unwrap_or_default()
            ),
        });
    }
    let failed = |message: String| Error::Download {
        url: source.url.clone(),
        dir: dir.to_path_buf(),
        message,
    };
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let made_parent = !parent.exists();
    std::fs::create_dir_all(&parent)
        .map_err(|e| failed(format!("cannot create {}: {e}", parent.display())))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cifar".into());
    let part = parent.join(format!(".{name}.download"));

    if let Err(message) = fetch(&source.url, &part) {
        // A partial download stays to be resumed; with nothing fetched, nothing stays.
        if made_parent && !part.exists() {
            let _ = std::fs::remove_dir(&parent);
        }
        return Err(failed(message));
    }
    let staging = parent.join(format!(".{name}.unpack-{}", std::process::id()));
    let placed = verify(&part, source.checksum.as_ref())
        .and_then(|()| unpack(&part, &staging))
        .and_then(|()| locate(&staging))
        .and_then(|found| {
            // An empty target (say, made by hand) is replaced; a rename needs it gone.
            if dir.exists() {
                std::fs::remove_dir(dir)
                    .map_err(|e| format!("cannot replace empty {}: {e}", dir.display()))?;
            }
            std::fs::rename(&found, dir)
                .map_err(|e| format!("cannot move the data into {}: {e}", dir.display()))
        });
    // Best effort: leftovers here are clutter, not harm. A complete download that proved
    // unusable is removed too, so the next attempt starts over instead of resuming it.
    let _ = std::fs::remove_dir_all(&staging);
    let _ = std::fs::remove_file(&part);
    match placed {
        Ok(()) => {
            eprintln!("CIFAR-10 is ready in {}", dir.display());
            Ok(())
        }
        Err(message) => {
            if made_parent {
                // Only succeeds while empty: the directory we made, and nothing in it.
                let _ = std::fs::remove_dir(&parent);
            }
            Err(Error::ArchiveInvalid {
                url: source.url.clone(),
                message,
            })
        }
    }
}

/// How long a download waits for the server at each stage (connect: half of it): 60 s, or
/// `KILN_DOWNLOAD_TIMEOUT` seconds.
fn patience() -> Duration {
    let seconds = std::env::var("KILN_DOWNLOAD_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(60.0);
    Duration::from_secs_f64(seconds)
}

/// Copies `url` into `part`: a local path or `file://` URL is copied; over HTTP(S) an existing
/// `part` is resumed with a Range request (restarted if the server ignores it).
fn fetch(url: &str, part: &Path) -> std::result::Result<(), String> {
    let local = url
        .strip_prefix("file://")
        .or((!url.contains("://")).then_some(url));
    if let Some(path) = local {
        eprintln!("copying {path}");
        std::fs::copy(path, part).map_err(|e| format!("cannot read {path}: {e}"))?;
        return Ok(());
    }
    let have = part.metadata().map(|m| m.len()).unwrap_or(0);
    let patience = patience();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(patience / 2))
        .timeout_send_request(Some(patience))
        // A server that takes the connection and never answers must not hang the run.
        .timeout_recv_response(Some(patience))
        .timeout_recv_body(Some(patience))
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(url);
    if have > 0 {
        request = request.header("Range", format!("bytes={have}-"));
    }
    let mut response = request
        .call()
        .map_err(|e| format!("{e} (no network, or a wrong URL?)"))?;
    let status = response.status();
    let resuming = status.as_u16() == 206;
    if !status.is_success() {
        return Err(format!("the server answered {status}"));
    }
    let length = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let (start, total) = if resuming {
        (have, length.map(|l| l + have))
    } else {
        (0, length)
    };
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(resuming)
        .truncate(!resuming)
        .open(part)
        .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
    let bar = progress_bar(url, start, total);
    let mut body = response
        .body_mut()
        .with_config()
        .limit(MAX_DOWNLOAD)
        .reader();
    let mut done = start;
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = body.read(&mut buffer).map_err(|e| {
            format!("the download broke off after {done} bytes ({e}); run the same command again to resume it")
        })?;
        if n == 0 {
            break;
        }
        file.write_all(&buffer[..n])
            .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
        done += n as u64;
        if let Some(bar) = &bar {
            bar.set_position(done);
        }
    }
    file.sync_all()
        .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match total {
        Some(total) if done != total => Err(format!(
            "the download broke off after {done} of {total} bytes; run the same command again to resume it"
        )),
        _ => Ok(()),
    }
}

/// A bytes/rate/ETA bar on a terminal; one log line otherwise.
fn progress_bar(url: &str, start: u64, total: Option<u64>) -> Option<ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        let resumed = if start > 0 {
            format!(" (resuming at {start} bytes)")
        } else {
            String::new()
        };
        eprintln!("downloading {url}{resumed}");
        return None;
    }
    let bar = ProgressBar::new(total.unwrap_or(0));
    let style = ProgressStyle::with_template(
        "downloading [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} ({eta} left)",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_position(start);
    Some(bar)
}

fn verify(path: &Path, checksum: Option<&Checksum>) -> std::result::Result<(), String> {
    let Some(checksum) = checksum else {
        tracing::warn!("no checksum given for a custom URL: the archive is not verified");
        return Ok(());
    };
    let mut file = BufReader::new(File::open(path).map_err(|e| e.to_string())?);
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let (kind, expected, actual) = match checksum {
        Checksum::Md5(expected) => {
            let mut hasher = Md5::new();
            std::io::copy(&mut file, &mut hasher).map_err(|e| e.to_string())?;
            ("MD5", expected, hex(&hasher.finalize()))
        }
        Checksum::Sha256(expected) => {
            let mut hasher = Sha256::new();
            std::io::copy(&mut file, &mut hasher).map_err(|e| e.to_string())?;
            ("SHA-256", expected, hex(&hasher.finalize()))
        }
    };
    if &actual == expected {
        Ok(())
    } else {
        Err(format!(
            "{kind} is {actual}, expected {expected}: the download is corrupt or not the CIFAR-10 archive"
        ))
    }
}

/// A reader that fails once more than `left` bytes come through it.
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(std::io::Error::other(format!(
                "the archive unpacks to more than {} MiB, far beyond CIFAR-10 (a decompression bomb?)",
                MAX_UNPACKED >> 20
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Unpacks a .tar.gz into `into`, refusing unsafe entries.
fn unpack(archive: &Path, into: &Path) -> std::result::Result<(), String> {
    std::fs::create_dir_all(into).map_err(|e| format!("cannot create {}: {e}", into.display()))?;
    let file = File::open(archive).map_err(|e| e.to_string())?;
    let gz = flate2::read::GzDecoder::new(BufReader::new(file));
    let mut tar = tar::Archive::new(Bounded {
        inner: gz,
        left: MAX_UNPACKED,
    });
    let not_archive = |e: std::io::Error| format!("not a readable .tar.gz archive ({e})");
    for (count, entry) in tar.entries().map_err(not_archive)?.enumerate() {
        let mut entry = entry.map_err(not_archive)?;
        if count >= MAX_ENTRIES {
            return Err(format!(
                "more than {MAX_ENTRIES} entries: not the CIFAR-10 archive"
            ));
        }
        let path = entry.path().map_err(not_archive)?.into_owned();
        let kind = entry.header().entry_type();
        let safe_path = path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !safe_path {
            return Err(format!(
                "entry {} would land outside the target: refused",
                path.display()
            ));
        }
        if kind.is_symlink() || kind.is_hard_link() {
            return Err(format!("entry {} is a link: refused", path.display()));
        }
        if kind.is_dir() {
            std::fs::create_dir_all(into.join(&path)).map_err(|e| e.to_string())?;
        } else if kind.is_file() {
            let target = into.join(&path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            let mut out = File::create(&target).map_err(|e| e.to_string())?;
            std::io::copy(&mut entry, &mut out).map_err(not_archive)?;
        }
        // Other entry kinds (pax headers, fifos, devices) are skipped, never created.
    }
    Ok(())
}

/// The directory of the unpacked tree that holds the six files (the root or one folder in it),
/// each checked for whole records and valid labels.
fn locate(root: &Path) -> std::result::Result<PathBuf, String> {
    let mut candidates = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        candidates.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    let found = candidates
        .into_iter()
        .find(|dir| cifar::missing_file(dir).is_none())
        .ok_or_else(|| {
            "the archive does not hold data_batch_1.bin .. data_batch_5.bin and test_batch.bin"
                .to_string()
        })?;
    for name in TRAIN_FILES.iter().chain([&TEST_FILE]) {
        cifar::read_records(&found.join(name)).map_err(|e| e.to_string())?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_stops_an_endless_stream() {
        let mut bounded = Bounded {
            inner: std::io::repeat(0),
            left: 1 << 20,
        };
        let err = std::io::copy(&mut bounded, &mut std::io::sink()).unwrap_err();
        assert!(err.to_string().contains("decompression bomb"), "{err}");
    }

    #[test]
    fn the_official_source_is_verified_and_a_custom_one_only_when_asked() {
        let official = Source::new(None, None, None);
        assert_eq!(official.url, OFFICIAL_URL);
        assert_eq!(official.checksum, Some(Checksum::Md5(OFFICIAL_MD5.into())));
        assert_eq!(
            Source::new(Some("file:///x".into()), None, None).checksum,
            None
        );
        let pinned = Source::new(Some("http://mirror/x".into()), None, Some("ABCD".into()));
        assert_eq!(pinned.checksum, Some(Checksum::Sha256("abcd".into())));
    }
}
