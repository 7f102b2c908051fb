//! Safetensors files as kiln writes and reads them: byte-reproducible (the header's keys in
//! sorted order), written atomically, and carrying a checksum of their tensor bytes that every
//! load verifies, since safetensors itself has none and a flipped byte would load silently.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use safetensors::tensor::Metadata;

use crate::error::{Error, Result};
use crate::fs::write_atomic;

/// The header key of the tensor bytes' checksum; files without it (saved by PyTorch, or by
/// kiln before checksums) load unverified.
pub const CHECKSUM_KEY: &str = "kiln.checksum";

/// The checksum's algorithm, named in its value (`crc32:0123abcd`) so it can change later.
const CHECKSUM_ALGORITHM: &str = "crc32";

/// The 8-byte little-endian header length that starts every safetensors file.
const LENGTH_BYTES: usize = 8;

/// `tensors` (moved to the CPU) and `metadata` as safetensors bytes: the same inputs give the
/// same bytes, and the header records the checksum of the tensor bytes.
pub fn serialize(
    tensors: Vec<(String, Tensor)>,
    metadata: BTreeMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>> {
    let invalid = |message: String| Error::WeightsInvalid {
        path: path.to_path_buf(),
        message,
    };
    let tensors = tensors
        .into_iter()
        .map(|(name, t)| Ok((name, t.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    // The crate lays the tensors out (sorted by alignment, then name) but writes the metadata
    // map in a random order; its header is rewritten below with every key sorted.
    let laid_out = safetensors::serialize(tensors, None).map_err(|e| invalid(e.to_string()))?;
    let (header_len, tensor_table) =
        safetensors::SafeTensors::read_metadata(&laid_out).map_err(|e| invalid(e.to_string()))?;
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&laid_out[LENGTH_BYTES..LENGTH_BYTES + header_len])
            .map_err(|e| invalid(e.to_string()))?;
    let data = &laid_out[LENGTH_BYTES + header_len..];
    let mut metadata = metadata;
    metadata.insert(CHECKSUM_KEY.to_string(), checksum(&tensor_table, data));
    header.insert(
        "__metadata__".to_string(),
        serde_json::to_value(metadata).map_err(|e| invalid(e.to_string()))?,
    );
    // serde_json writes a BTreeMap in key order, whatever its own features.
    let mut header = serde_json::to_vec(&header).map_err(|e| invalid(e.to_string()))?;
    header.resize(header.len().next_multiple_of(LENGTH_BYTES), b' ');
    let mut bytes = Vec::with_capacity(LENGTH_BYTES + header.len() + data.len());
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(data);
    Ok(bytes)
}

/// The checksum of a file's tensors: each one's name, dtype, shape and offsets (so that a
/// header change that reinterprets the same bytes is caught too), then the tensor bytes.
fn checksum(table: &Metadata, data: &[u8]) -> String {
    let mut hasher = crc32fast::Hasher::new();
    let mut tensors: Vec<_> = table.tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, info) in tensors {
        let description = format!(
            "{name}\0{:?}{:?}{:?}\n",
            info.dtype, info.shape, info.data_offsets
        );
        hasher.update(description.as_bytes());
    }
    hasher.update(data);
    format!("{CHECKSUM_ALGORITHM}:{:08x}", hasher.finalize())
}

/// A safetensors file's tensors by name, and its header metadata.
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

/// Saves `tensors` (PyTorch names) with `metadata` (model name, input normalisation, ...) as a
/// safetensors file, atomically.
pub fn save_tensors(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    write_atomic(path, &serialize(tensors, metadata, path)?)
}

/// Loads a safetensors file, verifying its checksum where it has one.
pub fn load_weights(path: &Path, device: &Device) -> Result<Weights> {
    let bytes = std::fs::read(path).map_err(Error::io("cannot read", path))?;
    let invalid = |message: String| Error::WeightsInvalid {
        path: path.to_path_buf(),
        message,
    };
    let (header_len, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| invalid(format!("not a safetensors file, or truncated ({e})")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    if let Some(recorded) = metadata.get(CHECKSUM_KEY) {
        let actual = checksum(&header, &bytes[LENGTH_BYTES + header_len..]);
        if *recorded != actual {
            return Err(invalid(format!(
                "its tensor data does not match its checksum ({actual}, recorded {recorded}): \
                 the file is damaged"
            )));
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| invalid(format!("corrupt tensor data ({e})")))?;
    Ok(Weights { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, Tensor)> {
        let dev = Device::Cpu;
        vec![
            (
                "fc.weight".to_string(),
                Tensor::new(&[[0.1f32, -2.5e-8], [3.0, f32::MIN_POSITIVE]], &dev).unwrap(),
            ),
            ("fc.bias".to_string(), Tensor::new(&[7.0f32], &dev).unwrap()),
            (
                "bn.num_batches_tracked".to_string(),
                Tensor::new(12i64, &dev).unwrap(),
            ),
        ]
    }

    fn metadata() -> BTreeMap<String, String> {
        (0..20)
            .map(|i| (format!("key{i}"), format!("value {i}")))
            .collect()
    }

    #[test]
    fn the_same_tensors_give_the_same_bytes_with_sorted_keys() {
        let path = Path::new("w.safetensors");
        let a = serialize(sample(), metadata(), path).unwrap();
        let mut reversed = sample();
        reversed.reverse();
        let b = serialize(reversed, metadata(), path).unwrap();
        assert_eq!(a, b);
        let (len, _) = safetensors::SafeTensors::read_metadata(&a).unwrap();
        let header = std::str::from_utf8(&a[8..8 + len]).unwrap();
        let keys: Vec<usize> = (0..20)
            .map(|i| header.find(&format!("\"key{i}\"")).unwrap())
            .collect();
        let mut sorted_by_name: Vec<(String, usize)> =
            (0..20).map(|i| (format!("key{i}"), keys[i])).collect();
        sorted_by_name.sort();
        assert!(
            sorted_by_name.windows(2).all(|w| w[0].1 < w[1].1),
            "metadata keys in sorted order: {header}"
        );
    }

    #[test]
    fn a_flipped_tensor_byte_is_caught_and_files_without_a_checksum_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        save_tensors(&path, sample(), metadata()).unwrap();
        let loaded = load_weights(&path, &Device::Cpu).unwrap();
        assert_eq!(
            loaded.tensors["bn.num_batches_tracked"]
                .to_scalar::<i64>()
                .unwrap(),
            12
        );
        assert!(loaded.metadata[CHECKSUM_KEY].starts_with("crc32:"));

        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        let err = load_weights(&path, &Device::Cpu).err().unwrap().to_string();
        assert!(
            err.contains("w.safetensors") && err.contains("does not match its checksum"),
            "{err}"
        );

        // As PyTorch's safetensors writes it: no checksum, loaded as it is.
        let plain = safetensors::serialize(sample(), None).unwrap();
        std::fs::write(&path, plain).unwrap();
        let loaded = load_weights(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.tensors.len(), 3);
        assert!(!loaded.metadata.contains_key(CHECKSUM_KEY));
    }
}
