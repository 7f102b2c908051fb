//! The run directory (`models/<run>/`) and the files in it, each written atomically: a file
//! becomes visible under its name only once complete, so a killed process leaves the previous
//! version intact.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};

use crate::error::{Error, Result};

/// `models/<run>/`: the resolved config, the metrics history and the weights of one run.
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `<models_dir>/<run>`. A directory that already holds a run is refused unless
    /// `overwrite`, so no earlier results are replaced by accident.
    pub fn create(models_dir: &Path, run: &str, overwrite: bool) -> Result<Self> {
        let dir = Self {
            path: models_dir.join(run),
        };
        let holds_run = [dir.config(), dir.metrics()].iter().any(|p| p.exists());
        if holds_run && !overwrite {
            return Err(Error::RunExists { dir: dir.path });
        }
        std::fs::create_dir_all(&dir.path).map_err(Error::io("cannot create run directory", &dir.path))?;
        if holds_run {
            let metrics = dir.metrics();
            if metrics.exists() {
                std::fs::remove_file(&metrics).map_err(Error::io("cannot remove", metrics))?;
            }
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn config(&self) -> PathBuf {
        self.path.join("config.toml")
    }
    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.csv")
    }
    pub fn last(&self) -> PathBuf {
        self.path.join("last.safetensors")
    }
    pub fn best(&self) -> PathBuf {
        self.path.join("best.safetensors")
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory: write, fsync,
/// rename over the target, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        // Best effort: the error below is what matters; a leftover temp file is only clutter.
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(Error::io("cannot write", path))
}

/// Saves parameters under their PyTorch names as a weights-only safetensors file, with
/// `metadata` (model name, input normalisation, ...) in its header.
pub fn save_weights(path: &Path, params: &[(String, Var)], metadata: HashMap<String, String>) -> Result<()> {
    let tensors = params
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<(String, Tensor)>>>()?;
    let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|e| Error::WeightsInvalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_atomic(path, &bytes)
}

/// A weights file's tensors by name, and its metadata.
pub struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

pub fn load_weights(path: &Path, device: &Device) -> Result<Weights> {
    let bytes = std::fs::read(path).map_err(Error::io("cannot read", path))?;
    let invalid = |message: String| Error::WeightsInvalid {
        path: path.to_path_buf(),
        message,
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| invalid(format!("not a safetensors file ({e})")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| invalid(format!("corrupt tensor data ({e})")))?;
    Ok(Weights {
        tensors,
        metadata: header.metadata().clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_load_back_bit_for_bit_with_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.safetensors");
        let w = Var::new(&[[0.1f32, -2.5e-8], [3.0, f32::MIN_POSITIVE]], &Device::Cpu).unwrap();
        let b = Var::new(&[7.0f32], &Device::Cpu).unwrap();
        let params = vec![("fc.weight".to_string(), w.clone()), ("fc.bias".to_string(), b)];
        let meta = HashMap::from([("model".to_string(), "simplecnn".to_string())]);
        save_weights(&path, &params, meta.clone()).unwrap();
        let loaded = load_weights(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.metadata, meta);
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        assert_eq!(bits(&loaded.tensors["fc.weight"]), bits(w.as_tensor()));
        assert_eq!(loaded.tensors["fc.weight"].dims(), &[2, 2]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_corrupt_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, b"definitely not safetensors").unwrap();
        let err = load_weights(&path, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("bad.safetensors") && err.contains("not a safetensors file"), "{err}");
    }

    #[test]
    fn an_existing_run_is_not_replaced_without_overwrite() {
        let models = tempfile::tempdir().unwrap();
        let run = RunDir::create(models.path(), "r", false).unwrap();
        std::fs::write(run.metrics(), "epoch\n1\n").unwrap();
        let err = RunDir::create(models.path(), "r", false).err().unwrap().to_string();
        assert!(err.contains("--overwrite") && err.contains("--run"), "{err}");
        assert!(run.metrics().exists());
        RunDir::create(models.path(), "r", true).unwrap();
        assert!(!run.metrics().exists(), "overwrite starts a fresh history");
    }
}
