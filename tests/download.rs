//! Fetching CIFAR-10 when it is missing, against an HTTP server on 127.0.0.1 that the test runs
//! itself: a good archive end to end, and every way an archive or a transfer can go wrong.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{run, text};
use kiln::data::{cifar, synthetic};
use sha2::{Digest, Sha256};

/// How the test server answers one request.
#[derive(Clone)]
enum Reply {
    /// 200 with the bytes, or 206 with the tail when the request has a Range.
    Full(Vec<u8>),
    /// Announces every byte, sends half, and closes the connection.
    Truncated(Vec<u8>),
    NotFound,
}

/// How long the server waits for each connection: a binary that fails before it connects must
/// fail the test, not hang it.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);

/// The next connection, or None once ACCEPT_TIMEOUT has passed without one.
fn accept(listener: &TcpListener) -> Option<TcpStream> {
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).ok()?;
                return Some(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return None,
        }
    }
    None
}

/// Serves `replies` to successive connections on a free port; returns the URL prefix, and a
/// handle whose result is each request's Range start (None where it asked for the whole file).
fn serve(replies: Vec<Reply>) -> (String, JoinHandle<Vec<Option<usize>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut ranges = Vec::new();
        for reply in replies {
            let Some(stream) = accept(&listener) else {
                return ranges;
            };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range_start = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(spec) = lower.strip_prefix("range: bytes=") {
                    range_start = spec.trim().trim_end_matches('-').parse::<usize>().ok();
                }
            }
            ranges.push(range_start);
            let mut out = stream;
            let _ = match reply {
                Reply::Full(body) => {
                    match range_start {
                        Some(start) if start < body.len() => {
                            let tail = &body[start..];
                            let head = format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                            tail.len(),
                            body.len() - 1,
                            body.len()
                        );
                            out.write_all(head.as_bytes())
                                .and_then(|()| out.write_all(tail))
                        }
                        _ => {
                            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                            out.write_all(head.as_bytes())
                                .and_then(|()| out.write_all(&body))
                        }
                    }
                }
                Reply::Truncated(body) => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    out.write_all(head.as_bytes())
                        .and_then(|()| out.write_all(&body[..body.len() / 2]))
                }
                Reply::NotFound => out.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
        ranges
    });
    (url, handle)
}

/// A .tar.gz in the real layout (cifar-10-batches-bin/...) with a small synthetic data set.
fn good_archive(scratch: &Path) -> Vec<u8> {
    let dir = scratch.join("cifar-10-batches-bin");
    cifar::write_dir(
        &dir,
        &synthetic::generate(100, 1),
        &synthetic::generate(40, 2),
    )
    .unwrap();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    builder
        .append_dir_all("cifar-10-batches-bin", &dir)
        .unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

/// A .tar.gz with one entry whose raw header names `path` (bypassing the tar crate's own checks),
/// of the given kind.
fn hostile_archive(path: &str, kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    let name = &mut header.as_gnu_mut().unwrap().name;
    name[..path.len()].copy_from_slice(path.as_bytes());
    header.set_entry_type(kind);
    if let Some(target) = link {
        let raw = &mut header.as_gnu_mut().unwrap().linkname;
        raw[..target.len()].copy_from_slice(target.as_bytes());
    }
    let body = b"owned";
    header.set_size(if link.is_some() { 0 } else { body.len() as u64 });
    header.set_mode(0o644);
    header.set_cksum();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let data: &[u8] = if link.is_some() { &[] } else { body };
    builder.append(&header, data).unwrap();
    builder.into_inner().unwrap().finish().unwrap()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Names of everything under `dir` (recursively), sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        names.push(path.strip_prefix(dir).unwrap().display().to_string());
        if path.is_dir() {
            names.extend(
                tree(&path)
                    .into_iter()
                    .map(|n| format!("{}/{n}", entry.file_name().to_string_lossy())),
            );
        }
    }
    names.sort();
    names
}

fn train(root: &Path, url: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--data-dir",
        "data/cifar",
        "--data-url",
        url,
    ];
    args.extend_from_slice(extra);
    run("train", &args, root)
}

#[test]
fn a_missing_data_set_is_fetched_verified_unpacked_and_trained_on() {
    let root = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let archive = good_archive(scratch.path());
    let (url, server) = serve(vec![Reply::Full(archive.clone())]);
    let out = train(
        root.path(),
        &format!("{url}/cifar-10-binary.tar.gz"),
        &["--data-sha256", &sha256(&archive)],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("downloading"),
        "a non-interactive run logs the download"
    );
    server.join().unwrap();
    let data = root.path().join("data");
    assert_eq!(
        tree(&data),
        [
            "cifar",
            "cifar/data_batch_1.bin",
            "cifar/data_batch_2.bin",
            "cifar/data_batch_3.bin",
            "cifar/data_batch_4.bin",
            "cifar/data_batch_5.bin",
            "cifar/test_batch.bin"
        ],
        "the six files and nothing else: no partial download, no staging directory"
    );
    let csv = std::fs::read_to_string(root.path().join("models/simplecnn/metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        2,
        "trained one epoch on the fetched data"
    );
}

#[test]
fn a_broken_off_download_resumes_where_it_stopped() {
    let root = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let archive = good_archive(scratch.path());
    let (url, server) = serve(vec![
        Reply::Truncated(archive.clone()),
        Reply::Full(archive.clone()),
    ]);
    let url = format!("{url}/cifar-10-binary.tar.gz");
    let first = train(root.path(), &url, &[]);
    let stderr = text(&first.stderr);
    assert_eq!(first.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("broke off") && stderr.contains("run the same command again"),
        "{stderr}"
    );
    assert_eq!(
        tree(&root.path().join("data")),
        [".cifar.download"],
        "only the resumable part, outside the data directory"
    );

    let second = train(root.path(), &url, &[]);
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(
        text(&second.stderr).contains("resuming at"),
        "{}",
        text(&second.stderr)
    );
    // The server saw the second request ask for the rest: from the half it had sent.
    assert_eq!(server.join().unwrap(), [None, Some(archive.len() / 2)]);
    assert!(cifar::missing_file(&root.path().join("data/cifar")).is_none());
}

#[test]
fn bad_archives_and_failed_transfers_leave_nothing_behind() {
    let scratch = tempfile::tempdir().unwrap();
    let good = good_archive(scratch.path());
    let mut corrupt = good.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle..middle + 64]
        .iter_mut()
        .for_each(|b| *b ^= 0x5a);
    let cases: Vec<(&str, Reply, Vec<String>, &str)> = vec![
        (
            "corrupt",
            Reply::Full(corrupt),
            vec![],
            "not a readable .tar.gz",
        ),
        (
            "wrong checksum",
            Reply::Full(good.clone()),
            vec!["--data-sha256".into(), "00".repeat(32)],
            "SHA-256 is",
        ),
        ("404", Reply::NotFound, vec![], "404 Not Found"),
        (
            "not an archive",
            Reply::Full(b"<html>a login page</html>".to_vec()),
            vec![],
            "not a readable .tar.gz",
        ),
        (
            "escaping entry",
            Reply::Full(hostile_archive(
                "../escaped.bin",
                tar::EntryType::Regular,
                None,
            )),
            vec![],
            "would land outside",
        ),
        (
            "absolute entry",
            Reply::Full(hostile_archive(
                "/tmp/kiln-absolute.bin",
                tar::EntryType::Regular,
                None,
            )),
            vec![],
            "would land outside",
        ),
        (
            "symlink out",
            Reply::Full(hostile_archive(
                "cifar-10-batches-bin/data_batch_1.bin",
                tar::EntryType::Symlink,
                Some("/etc/passwd"),
            )),
            vec![],
            "is a link",
        ),
    ];
    for (name, reply, extra, expected) in cases {
        let root = tempfile::tempdir().unwrap();
        let (url, server) = serve(vec![reply]);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = train(
            root.path(),
            &format!("{url}/cifar-10-binary.tar.gz"),
            &extra,
        );
        server.join().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(
            !root.path().join("data").exists(),
            "{name}: left {:?}",
            tree(&root.path().join("data"))
        );
        assert!(
            !root.path().join("escaped.bin").exists(),
            "{name}: wrote outside the target"
        );
        assert!(
            !root.path().join("models").exists(),
            "{name}: no run directory"
        );
    }
    assert!(!Path::new("/tmp/kiln-absolute.bin").exists());
}

/// A server that takes the connection and never answers: the download gives up after its
/// timeout (`KILN_DOWNLOAD_TIMEOUT`, 2 s here) with one line naming the URL, not a hang.
#[test]
fn a_server_that_never_answers_times_out() {
    let root = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/cifar-10-binary.tar.gz",
        listener.local_addr().unwrap()
    );
    // Accepts, then holds every connection open in silence until the test ends.
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(4).flatten() {
            held.push(stream);
        }
        held
    });
    let started = std::time::Instant::now();
    let out = common::output_within(
        common::binary("train")
            .args([
                "--device",
                "cpu",
                "--epochs",
                "1",
                "--data-dir",
                "data/cifar",
                "--data-url",
                &url,
            ])
            .env("KILN_DOWNLOAD_TIMEOUT", "2")
            .current_dir(root.path()),
        std::time::Duration::from_secs(60),
    );
    let took = started.elapsed();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(took.as_secs() < 30, "gave up after {took:?}");
    assert!(
        stderr.contains(&url) && stderr.to_lowercase().contains("timeout"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    drop(holder);
}

#[test]
fn without_network_the_error_names_the_url_the_directory_and_the_ways_out() {
    let root = tempfile::tempdir().unwrap();
    // Port 9 (discard) on the loopback: nothing listens, so the connection is refused at once.
    let out = train(
        root.path(),
        "http://127.0.0.1:9/cifar-10-binary.tar.gz",
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for part in [
        "http://127.0.0.1:9/cifar-10-binary.tar.gz",
        "data/cifar",
        "by hand",
        "--dataset synthetic",
    ] {
        assert!(stderr.contains(part), "{part} missing: {stderr}");
    }
    assert!(!root.path().join("data").exists());

    let offline = run(
        "train",
        &["--device", "cpu", "--epochs", "1", "--no-download"],
        root.path(),
    );
    assert_eq!(offline.status.code(), Some(1));
    assert!(
        text(&offline.stderr).contains("--dataset synthetic"),
        "{}",
        text(&offline.stderr)
    );
}

#[test]
fn synthetic_data_needs_no_files_and_is_learnt_in_seconds() {
    let root = tempfile::tempdir().unwrap();
    let out = run(
        "train",
        &[
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--dataset",
            "synthetic",
            "--json-logs",
        ],
        root.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let epoch: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().next().unwrap()).unwrap();
    assert!(
        epoch["test_acc"].as_f64().unwrap() > 0.5,
        "clearly above chance (0.1): {epoch}"
    );
    assert!(!root.path().join("data").exists(), "nothing fetched");
}

#[test]
fn evaluate_fetches_too_and_a_file_url_works() {
    let root = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let archive = root.path().join("cifar-10-binary.tar.gz");
    std::fs::write(&archive, good_archive(scratch.path())).unwrap();
    let url = format!("file://{}", archive.display());
    let out = train(root.path(), &url, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::remove_dir_all(root.path().join("data")).unwrap();

    let out = run(
        "evaluate",
        &[
            "--checkpoint",
            "models/simplecnn/best.safetensors",
            "--data-dir",
            "data/cifar",
            "--data-url",
            &url,
            "--device",
            "cpu",
            "--json",
        ],
        root.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["images"], 40);
    assert!(cifar::missing_file(&root.path().join("data/cifar")).is_none());
}
