//! `train --tensorboard`: event files read back record by record against the format's
//! definition (TFRecord framing with masked CRC-32C, `Event` protobufs), and a resumed run's.

mod common;

use std::path::{Path, PathBuf};

use common::{column, fixture_dir, models_dir, train_ok};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit from its definition.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's mask: rotate right by 15, add 0xa282ead8.
fn masked(bytes: &[u8]) -> u32 {
    crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One decoded event: its step, and what it holds.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Version(String),
    Scalar { step: u64, tag: String, value: f32 },
    Start { step: u64 },
}

/// A protobuf message's fields: (field number, varint value or bytes).
fn fields(mut bytes: &[u8]) -> Vec<(u64, Result<u64, Vec<u8>>)> {
    fn varint(bytes: &mut &[u8]) -> u64 {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = bytes[0];
            *bytes = &bytes[1..];
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                break;
            }
        }
        value
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let key = varint(&mut bytes);
        let (field, wire) = (key >> 3, key & 7);
        let value = match wire {
            0 => Ok(varint(&mut bytes)),
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                let v = bytes[..n].to_vec();
                bytes = &bytes[n..];
                Err(v)
            }
            2 => {
                let n = varint(&mut bytes) as usize;
                let v = bytes[..n].to_vec();
                bytes = &bytes[n..];
                Err(v)
            }
            other => panic!("wire type {other}"),
        };
        out.push((field, value));
    }
    out
}

/// Every event of a file, each record's framing and checksums verified.
fn read_events(path: &Path) -> Vec<Event> {
    let bytes = std::fs::read(path).unwrap();
    let mut at = 0;
    let mut events = Vec::new();
    while at < bytes.len() {
        let length_bytes = &bytes[at..at + 8];
        let length = u64::from_le_bytes(length_bytes.try_into().unwrap()) as usize;
        let length_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(length_crc, masked(length_bytes), "length checksum at {at}");
        let data = &bytes[at + 12..at + 12 + length];
        let data_crc = u32::from_le_bytes(
            bytes[at + 12 + length..at + 16 + length]
                .try_into()
                .unwrap(),
        );
        assert_eq!(data_crc, masked(data), "data checksum at {at}");
        at += 16 + length;
        let mut step = 0;
        let mut event = None;
        for (field, value) in fields(data) {
            match (field, value) {
                (1, Err(wall)) => assert_eq!(wall.len(), 8, "wall_time is a double"),
                (2, Ok(s)) => step = s,
                (3, Err(version)) => {
                    event = Some(Event::Version(String::from_utf8(version).unwrap()))
                }
                (5, Err(summary)) => {
                    let (tag, value) = summary_value(&summary);
                    event = Some(Event::Scalar { step, tag, value });
                }
                (6, Err(log)) => {
                    assert_eq!(fields(&log), [(1, Ok(1))], "SessionLog START");
                    event = Some(Event::Start { step });
                }
                other => panic!("unexpected field {other:?}"),
            }
        }
        events.push(event.expect("an event holds something"));
    }
    events
}

/// A Summary with one Value: its tag and simple_value.
fn summary_value(summary: &[u8]) -> (String, f32) {
    let values = fields(summary);
    assert_eq!(values.len(), 1, "one value a summary");
    let Err(value) = &values[0].1 else {
        panic!("value is a message")
    };
    let (mut tag, mut number) = (String::new(), f32::NAN);
    for (field, v) in fields(value) {
        match (field, v) {
            (1, Err(t)) => tag = String::from_utf8(t).unwrap(),
            (2, Err(f)) => number = f32::from_le_bytes(f.try_into().unwrap()),
            other => panic!("unexpected value field {other:?}"),
        }
    }
    (tag, number)
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("tfevents")
        })
        .collect();
    files.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
    files
}

/// The fixture's 600 images at batch 32: 19 steps an epoch.
const STEPS: u64 = 19;

/// A run's event file: the version record first, the learning rate every step, the running
/// figures every 20 steps, and each epoch's figures at its last step equal to metrics.csv's.
/// Resumed after epoch 1, the second file marks the restart at step 19 and continues from there.
#[test]
fn event_files_hold_the_runs_scalars_and_a_resume_continues_them() {
    let root = tempfile::tempdir().unwrap();
    let data = fixture_dir(root.path());
    let base = [
        "--device",
        "cpu",
        "--data-dir",
        &data,
        "--batch-size",
        "32",
        "--run",
        "tb",
        "--tensorboard",
    ];
    train_ok(root.path(), &[&base[..], &["--epochs", "1"]].concat());
    let run_dir = models_dir(root.path()).join("tb");
    let files = event_files(&run_dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let first = read_events(&files[0]);
    assert_eq!(first[0], Event::Version("brain.Event:2".into()));
    let scalars = |events: &[Event], wanted: &str| -> Vec<(u64, f32)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Scalar { step, tag, value } if tag == wanted => Some((*step, *value)),
                _ => None,
            })
            .collect()
    };
    let lr_steps: Vec<u64> = scalars(&first, "train/lr").iter().map(|s| s.0).collect();
    assert_eq!(
        lr_steps,
        (1..=STEPS).collect::<Vec<_>>(),
        "the rate every step"
    );
    let running: Vec<u64> = scalars(&first, "train/loss").iter().map(|s| s.0).collect();
    assert!(
        running.is_empty(),
        "19 steps: no 20th step yet: {running:?}"
    );

    // The second epoch in another process: a restart at step 19, then steps 20..=38.
    let resumed = [&base[..], &["--epochs", "2", "--resume"]].concat();
    train_ok(root.path(), &resumed);
    let files = event_files(&run_dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let second = read_events(&files[1]);
    assert_eq!(
        second[1],
        Event::Start { step: STEPS },
        "{:?}",
        &second[..3]
    );
    let lr_steps: Vec<u64> = scalars(&second, "train/lr").iter().map(|s| s.0).collect();
    assert_eq!(lr_steps, (STEPS + 1..=2 * STEPS).collect::<Vec<_>>());
    assert_eq!(
        scalars(&second, "train/loss")
            .iter()
            .map(|s| s.0)
            .collect::<Vec<_>>(),
        [20],
        "the running loss at step 20"
    );
    let csv = std::fs::read_to_string(run_dir.join("metrics.csv")).unwrap();
    let all: Vec<Event> = first.into_iter().chain(second).collect();
    for (tag, name) in [
        ("epoch/test_accuracy", "test_acc"),
        ("epoch/train_loss", "train_loss"),
        ("epoch/test_loss", "test_loss"),
    ] {
        let logged = scalars(&all, tag);
        let expected = column(&csv, name);
        assert_eq!(
            logged.iter().map(|s| s.0).collect::<Vec<_>>(),
            [STEPS, 2 * STEPS],
            "{tag} at each epoch's last step"
        );
        for ((_, value), want) in logged.iter().zip(&expected) {
            // metrics.csv keeps six decimals.
            assert!(
                (f64::from(*value) - want).abs() <= 1e-6 + 1e-6 * want.abs(),
                "{tag}: {value} against metrics.csv's {want}"
            );
        }
    }
}
