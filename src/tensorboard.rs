//! TensorBoard event files: the scalars of a run (loss, accuracy, learning rate, images/s) as
//! TensorBoard reads them, so `tensorboard --logdir models/` shows and compares runs.
//!
//! The format (TensorFlow's `tensorflow/core/util/event.proto` and its record framing): a file of
//! records, each `length: u64 LE, masked_crc32c(length): u32 LE, data, masked_crc32c(data): u32
//! LE`, where `data` is an `Event` protobuf: `wall_time` (1, double), `step` (2, int64),
//! `file_version` (3, string: "brain.Event:2" in the first record), `summary` (5: `Summary`, whose
//! `value` (1) entries hold a `tag` (1, string) and a `simple_value` (2, float)) or `session_log`
//! (6: `SessionLog`, `status` (1): START = 1). A SessionLog START at step s tells TensorBoard that
//! a run restarted there: what an earlier process wrote past s is dropped, so a resumed run
//! continues its curves instead of drawing the lost steps twice.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// CRC-32C (Castagnoli), as TFRecord frames its records.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TFRecord's masked CRC: rotated and offset, so that a CRC of data holding CRCs stays strong.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = CRC32C.checksum(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// An event file being written.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (made if missing), named as TensorBoard finds them
    /// (`events.out.tfevents.<seconds>.<host>`), opened by its version record.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(Error::io("cannot create", dir))?;
        let seconds = now().floor() as u64;
        let host = hostname();
        // The process id keeps two files started in one second (a quick resume) apart.
        let name = format!(
            "events.out.tfevents.{seconds}.{host}.{}.kiln",
            std::process::id()
        );
        let path = dir.join(name);
        let file = File::create(&path).map_err(Error::io("cannot create", &path))?;
        let mut writer = Self {
            file: BufWriter::new(file),
            path,
        };
        let mut event = Vec::new();
        put_double(&mut event, 1, now());
        put_bytes(&mut event, 3, b"brain.Event:2");
        writer.record(&event)?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The scalar `value` of `tag` at `step`.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        let mut value_message = Vec::new();
        put_bytes(&mut value_message, 1, tag.as_bytes());
        put_float(&mut value_message, 2, value as f32);
        let mut summary = Vec::new();
        put_bytes(&mut summary, 1, &value_message);
        let mut event = Vec::new();
        put_double(&mut event, 1, now());
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// The run (re)starts at `step`: TensorBoard drops what earlier files hold past it.
    pub fn restart_at(&mut self, step: u64) -> Result<()> {
        let mut session_log = Vec::new();
        put_varint_field(&mut session_log, 1, 1); // SessionLog.START
        let mut event = Vec::new();
        put_double(&mut event, 1, now());
        put_varint_field(&mut event, 2, step);
        put_bytes(&mut event, 6, &session_log);
        self.record(&event)
    }

    /// Hands what is buffered to the file, so a TensorBoard watching it sees it.
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .map_err(Error::io("cannot write", &self.path))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let length = (data.len() as u64).to_le_bytes();
        let mut framed = Vec::with_capacity(data.len() + 16);
        framed.extend_from_slice(&length);
        framed.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.file
            .write_all(&framed)
            .map_err(Error::io("cannot write", &self.path))
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name, for the file name (TensorBoard shows it); "localhost" if unknown.
fn hostname() -> String {
    #[cfg(unix)]
    {
        let mut buffer = [0u8; 256];
        // SAFETY: gethostname writes at most `len` bytes into the buffer it is given.
        let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
        if ok {
            let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
            let name: String = String::from_utf8_lossy(&buffer[..end])
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                .collect();
            if !name.is_empty() {
                return name;
            }
        }
    }
    "localhost".to_string()
}

// Protobuf's wire format, for the few fields above: varints (wire type 0), 64-bit (1),
// length-delimited (2) and 32-bit (5).

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, value: u64) {
    put_key(out, field, 0);
    put_varint(out, value);
}

fn put_double(out: &mut Vec<u8>, field: u64, value: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_float(out: &mut Vec<u8>, field: u64, value: f32) {
    put_key(out, field, 5);
    out.extend_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C's check value from its definition (RFC 3720, appendix B.4: "123456789" ->
    /// 0xE3069283), and the mask TFRecord puts on it.
    #[test]
    fn the_checksum_is_crc32c_masked_as_tfrecord_masks_it() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
        let crc: u32 = 0xE306_9283;
        let masked = crc.rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), masked);
    }

    /// Protobuf's own example (the encoding guide): field 1 = 150 is 08 96 01.
    #[test]
    fn varints_are_protobufs() {
        let mut out = Vec::new();
        put_varint_field(&mut out, 1, 150);
        assert_eq!(out, [0x08, 0x96, 0x01]);
        let mut out = Vec::new();
        put_bytes(&mut out, 2, b"testing");
        assert_eq!(out, [0x12, 0x07, b't', b'e', b's', b't', b'i', b'n', b'g']);
    }
}
