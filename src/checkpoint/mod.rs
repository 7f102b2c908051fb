//! The run directory (`models/<run>/`) and the files in it, each written atomically: a file
//! becomes visible under its name only once complete, so a killed process leaves the previous
//! version intact. Every safetensors file kiln writes is byte-reproducible and carries a
//! checksum of its tensor bytes, verified on every load ([`file`]).
//!
//! Two kinds of safetensors files:
//! - weights (`last.safetensors`, `best.safetensors`): parameters under their PyTorch names, with
//!   the model name and input normalisation in the header, for any reader;
//! - checkpoints (`checkpoints/*.safetensors`): everything needed to continue a run exactly:
//!   weights (`model/<name>`), optimizer state (`optim/...`), the partial epoch's running sums
//!   (`tally/...`), and in the header the position, best result, config and metrics history.
//!   Random streams are derived from the seed and the epoch, so the position restores them.

mod file;
mod run_dir;

use crate::data::ChannelStats;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use candle_core::{Device, Tensor, Var};

pub use file::{load_weights, save_tensors, Weights, CHECKSUM_KEY};
pub use run_dir::{CheckpointScan, RunDir};

use crate::config::Config;
use crate::error::{Error, Result};

/// Saves parameters under their PyTorch names as a weights-only safetensors file, with
/// `metadata` (model name, input normalisation, ...) in its header.
pub fn save_weights(
    path: &Path,
    params: &[(String, Var)],
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    let tensors = params
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect();
    save_tensors(path, tensors, metadata)
}

/// Differences listed in full in an error; past that, a count (a file of another depth differs in
/// dozens of tensors, and one line must stay readable).
const PROBLEMS_LISTED: usize = 6;

/// Copies `tensors` (PyTorch names) into `params`. The names, shapes and dtypes must match
/// exactly; otherwise nothing is changed and the error lists the differences (shapes first: a
/// head of another class count shows as `fc.weight`'s).
pub fn assign(
    params: &[(String, Var)],
    tensors: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<()> {
    let (mut problems, mut missing) = (Vec::new(), Vec::new());
    for (name, var) in params {
        match tensors.get(name) {
            None => missing.push(format!("missing {name} {:?}", var.dims())),
            Some(t) if t.dims() != var.dims() => problems.push(format!(
                "{name} has shape {:?}, the model needs {:?}",
                t.dims(),
                var.dims()
            )),
            Some(t) if t.dtype() != var.dtype() => problems.push(format!(
                "{name} is {:?}, the model needs {:?}",
                t.dtype(),
                var.dtype()
            )),
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !params.iter().any(|(n, _)| n == *k))
        .collect();
    unexpected.sort();
    problems.extend(missing);
    problems.extend(
        unexpected
            .into_iter()
            .map(|name| format!("unexpected {name}")),
    );
    if !problems.is_empty() {
        let more = problems.len().saturating_sub(PROBLEMS_LISTED);
        problems.truncate(PROBLEMS_LISTED);
        if more > 0 {
            problems.push(format!("and {more} more"));
        }
        return Err(Error::WeightsInvalid {
            path: source.to_path_buf(),
            message: format!("its tensors do not fit the model: {}", problems.join("; ")),
        });
    }
    for (name, var) in params {
        var.set(&tensors[name].to_device(var.device())?)?;
    }
    Ok(())
}

/// What [`assign_matching`] did.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Matched {
    /// Tensors taken from the file.
    pub loaded: usize,
    /// The model's tensors the file has no fitting tensor for (kept as initialised), with why.
    pub fresh: Vec<String>,
    /// The file's tensors the model has no place for.
    pub unused: Vec<String>,
}

/// Fine-tuning's loading: every tensor of `tensors` whose name and shape match one of
/// `params` is taken (converted to its dtype); the rest of `params` keep their values.
pub fn assign_matching(
    params: &[(String, Var)],
    tensors: &HashMap<String, Tensor>,
) -> Result<Matched> {
    let mut matched = Matched::default();
    for (name, var) in params {
        match tensors.get(name) {
            Some(t) if t.dims() == var.dims() => {
                var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
                matched.loaded += 1;
            }
            Some(t) => matched.fresh.push(format!(
                "{name} {:?} (the file's is {:?})",
                var.dims(),
                t.dims()
            )),
            None => matched
                .fresh
                .push(format!("{name} {:?} (not in the file)", var.dims())),
        }
    }
    matched.unused = tensors
        .keys()
        .filter(|k| !params.iter().any(|(n, _)| n == *k))
        .cloned()
        .collect();
    matched.unused.sort();
    Ok(matched)
}

/// Where a run stands.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Progress {
    /// Epochs completed, evaluation and all.
    pub epochs_done: usize,
    /// Steps taken in the epoch after those (0 at an epoch boundary).
    pub steps_into_epoch: usize,
    /// Steps taken since the run began.
    pub global_step: u64,
    /// Best test accuracy so far and its epoch.
    pub best: Option<(usize, f64)>,
    /// metrics.csv as it stood, header included: the history is restored from the checkpoint.
    pub history: String,
}

/// Everything a checkpoint holds.
pub struct Checkpoint {
    pub model: String,
    /// The device it was written on (as `device::describe` puts it).
    pub device: String,
    pub config: Config,
    pub progress: Progress,
    /// Parameters by PyTorch name.
    pub weights: HashMap<String, Tensor>,
    /// Optimizer state by the optimizer's own names.
    pub optimizer: HashMap<String, Tensor>,
    /// The partial epoch's running sums, and the images they cover.
    pub tally: HashMap<String, Tensor>,
    pub tally_seen: usize,
    /// The data's class names (absent from checkpoints of kiln before folders).
    pub classes: Option<Vec<String>>,
    /// The input normalisation trained with (absent from checkpoints of kiln before folders).
    pub stats: Option<ChannelStats>,
}

const FORMAT_KEY: &str = "kiln.format";
const FORMAT: &str = "checkpoint-1";

/// What to write into a checkpoint; borrowed from the live training state.
pub struct Snapshot<'a> {
    pub model: &'a str,
    pub config: &'a Config,
    /// The device it was trained on, for the log of a resume elsewhere.
    pub device: &'a str,
    pub progress: &'a Progress,
    pub params: &'a [(String, Var)],
    pub optimizer: Vec<(String, Tensor)>,
    pub tally: Vec<(String, Tensor)>,
    pub tally_seen: usize,
    pub classes: &'a [String],
    pub stats: &'a ChannelStats,
}

pub fn save_checkpoint(path: &Path, snapshot: Snapshot) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, var) in snapshot.params {
        tensors.push((format!("model/{name}"), var.as_tensor().clone()));
    }
    for (prefix, group) in [("optim", snapshot.optimizer), ("tally", snapshot.tally)] {
        tensors.extend(
            group
                .into_iter()
                .map(|(name, t)| (format!("{prefix}/{name}"), t)),
        );
    }
    let p = snapshot.progress;
    let mut meta = BTreeMap::from([
        (FORMAT_KEY.to_string(), FORMAT.to_string()),
        ("model".to_string(), snapshot.model.to_string()),
        ("config".to_string(), snapshot.config.to_toml()),
        ("device".to_string(), snapshot.device.to_string()),
        ("epochs_done".to_string(), p.epochs_done.to_string()),
        (
            "steps_into_epoch".to_string(),
            p.steps_into_epoch.to_string(),
        ),
        ("global_step".to_string(), p.global_step.to_string()),
        // Without wall-clock figures: two identical runs write identical checkpoints.
        (
            "history".to_string(),
            crate::metrics::without_timing(&p.history),
        ),
        ("tally_seen".to_string(), snapshot.tally_seen.to_string()),
        (
            "classes".to_string(),
            serde_json::to_string(snapshot.classes).unwrap_or_default(),
        ),
        (
            "normalize_mean".to_string(),
            ChannelStats::list(&snapshot.stats.mean),
        ),
        (
            "normalize_std".to_string(),
            ChannelStats::list(&snapshot.stats.std),
        ),
    ]);
    if let Some((epoch, accuracy)) = p.best {
        meta.insert("best_epoch".to_string(), epoch.to_string());
        // Rust prints the shortest decimal that parses back to the same f64.
        meta.insert("best_accuracy".to_string(), accuracy.to_string());
    }
    save_tensors(path, tensors, meta)
}

/// Reads a checkpoint's position (used to find and prune checkpoints, as often as every step):
/// only the header, an 8-byte length and that much JSON, not the tensors.
pub fn read_progress(path: &Path) -> Result<Progress> {
    use std::io::Read;
    let invalid = |message: String| Error::WeightsInvalid {
        path: path.to_path_buf(),
        message,
    };
    let mut file = File::open(path).map_err(Error::io("cannot read", path))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|e| invalid(format!("not a safetensors file, or truncated ({e})")))?;
    let mut header = Vec::new();
    let length = u64::from_le_bytes(length);
    let read = file
        .take(length)
        .read_to_end(&mut header)
        .map_err(Error::io("cannot read", path))?;
    if read as u64 != length {
        return Err(invalid(
            "not a safetensors file, or truncated (short header)".into(),
        ));
    }
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| invalid(format!("not a safetensors file ({e})")))?;
    Ok(parse_progress(path, &header.metadata)?.0)
}

fn parse_progress(path: &Path, meta: &HashMap<String, String>) -> Result<(Progress, usize)> {
    let invalid = |message: String| Error::WeightsInvalid {
        path: path.to_path_buf(),
        message,
    };
    if meta.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
        return Err(invalid(
            "not a kiln checkpoint (a weights-only file? use it with --init-weights or evaluate)"
                .into(),
        ));
    }
    let field = |key: &str| -> Result<&String> {
        meta.get(key)
            .ok_or_else(|| invalid(format!("checkpoint header lacks {key}")))
    };
    fn number<T: std::str::FromStr>(key: &str, text: &str, path: &Path) -> Result<T> {
        text.parse().map_err(|_| Error::WeightsInvalid {
            path: path.to_path_buf(),
            message: format!("checkpoint header has a bad {key}: {text:?}"),
        })
    }
    let best = match (meta.get("best_epoch"), meta.get("best_accuracy")) {
        (Some(e), Some(a)) => Some((
            number("best_epoch", e, path)?,
            number("best_accuracy", a, path)?,
        )),
        _ => None,
    };
    let progress = Progress {
        epochs_done: number("epochs_done", field("epochs_done")?, path)?,
        steps_into_epoch: number("steps_into_epoch", field("steps_into_epoch")?, path)?,
        global_step: number("global_step", field("global_step")?, path)?,
        best,
        history: field("history")?.clone(),
    };
    let tally_seen = number("tally_seen", field("tally_seen")?, path)?;
    Ok((progress, tally_seen))
}

pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint> {
    let file = load_weights(path, device)?;
    let (progress, tally_seen) = parse_progress(path, &file.metadata)?;
    let model = file.metadata.get("model").cloned().unwrap_or_default();
    let device = file.metadata.get("device").cloned().unwrap_or_default();
    let config_text = file.metadata.get("config").cloned().unwrap_or_default();
    let config = Config::parse(&config_text, path)?;
    let classes = file
        .metadata
        .get("classes")
        .and_then(|list| serde_json::from_str(list).ok());
    let meta = |key: &str| file.metadata.get(key);
    let stats = match (meta("normalize_mean"), meta("normalize_std")) {
        (Some(mean), Some(std)) => ChannelStats::parse(mean, std),
        _ => None,
    };
    let (mut weights, mut optimizer, mut tally) = (HashMap::new(), HashMap::new(), HashMap::new());
    for (name, tensor) in file.tensors {
        let (group, rest) = match name.split_once('/') {
            Some(("model", rest)) => (&mut weights, rest),
            Some(("optim", rest)) => (&mut optimizer, rest),
            Some(("tally", rest)) => (&mut tally, rest),
            _ => {
                return Err(Error::WeightsInvalid {
                    path: path.to_path_buf(),
                    message: format!("unexpected tensor {name} in a checkpoint"),
                })
            }
        };
        group.insert(rest.to_string(), tensor);
    }
    Ok(Checkpoint {
        model,
        device,
        config,
        progress,
        weights,
        optimizer,
        tally,
        tally_seen,
        classes,
        stats,
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
        let params = vec![
            ("fc.weight".to_string(), w.clone()),
            ("fc.bias".to_string(), b),
        ];
        let meta = BTreeMap::from([("model".to_string(), "simplecnn".to_string())]);
        save_weights(&path, &params, meta).unwrap();
        let mut loaded = load_weights(&path, &Device::Cpu).unwrap();
        assert!(loaded.metadata.remove(CHECKSUM_KEY).is_some());
        assert_eq!(
            loaded.metadata,
            HashMap::from([("model".to_string(), "simplecnn".to_string())])
        );
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
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
        assert!(
            err.contains("bad.safetensors") && err.contains("not a safetensors file"),
            "{err}"
        );
    }

    #[test]
    fn an_existing_run_is_not_replaced_without_overwrite() {
        let models = tempfile::tempdir().unwrap();
        let run = RunDir::at(models.path(), "r");
        run.start_fresh(false).unwrap();
        std::fs::write(run.metrics(), "epoch\n1\n").unwrap();
        let err = run.start_fresh(false).err().unwrap().to_string();
        assert!(
            err.contains("--overwrite") && err.contains("--run"),
            "{err}"
        );
        assert!(run.metrics().exists());
        run.start_fresh(true).unwrap();
        assert!(!run.metrics().exists(), "overwrite starts a fresh history");
    }

    fn snapshot_at<'a>(
        config: &'a Config,
        progress: &'a Progress,
        params: &'a [(String, Var)],
    ) -> Snapshot<'a> {
        Snapshot {
            model: "simplecnn",
            config,
            device: "cpu (2 threads)",
            progress,
            params,
            optimizer: vec![("step".into(), Tensor::new(3f64, &Device::Cpu).unwrap())],
            tally: vec![],
            tally_seen: 0,
            classes: &[],
            stats: &ChannelStats::CIFAR10,
        }
    }

    #[test]
    fn checkpoints_round_trip_and_prune_to_the_newest() {
        let models = tempfile::tempdir().unwrap();
        let run = RunDir::at(models.path(), "r");
        run.start_fresh(false).unwrap();
        let (_, config) = crate::config::resolve(None, None, &Default::default()).unwrap();
        let params = vec![(
            "fc.bias".to_string(),
            Var::new(&[1f32, 2.], &Device::Cpu).unwrap(),
        )];
        let mut progress = Progress {
            best: Some((1, 0.4321)),
            history: "epoch\n1\n".into(),
            ..Default::default()
        };
        for (epoch, step) in [(1, 0), (1, 3), (2, 0), (3, 0), (3, 2), (4, 0)] {
            progress.epochs_done = epoch;
            progress.steps_into_epoch = step;
            progress.global_step = (epoch * 5 + step) as u64;
            save_checkpoint(
                &run.checkpoint_path(&progress),
                snapshot_at(&config, &progress, &params),
            )
            .unwrap();
            run.prune_checkpoints(2).unwrap();
        }
        let left: Vec<String> = run
            .list_checkpoints()
            .unwrap()
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["epoch-0004.safetensors", "epoch-0003.safetensors"]);

        let loaded = load_checkpoint(
            &run.checkpoints().join("epoch-0004.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(loaded.progress, progress);
        assert_eq!(loaded.config, config);
        assert_eq!(
            (loaded.model.as_str(), loaded.device.as_str()),
            ("simplecnn", "cpu (2 threads)")
        );
        assert_eq!(
            loaded.weights["fc.bias"].to_vec1::<f32>().unwrap(),
            [1., 2.]
        );
        assert_eq!(loaded.optimizer["step"].to_scalar::<f64>().unwrap(), 3.0);

        // A weights-only file is not a checkpoint, and says what it is for instead.
        save_weights(&run.last(), &params, BTreeMap::new()).unwrap();
        let err = load_checkpoint(&run.last(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a kiln checkpoint"), "{err}");
    }

    #[test]
    fn assign_lists_every_mismatch_and_changes_nothing() {
        let w = Var::new(&[[1f32, 2.]], &Device::Cpu).unwrap();
        let params = vec![
            ("fc.weight".to_string(), w.clone()),
            (
                "fc.bias".to_string(),
                Var::new(&[0f32], &Device::Cpu).unwrap(),
            ),
        ];
        let tensors = HashMap::from([
            (
                "fc.weight".to_string(),
                Tensor::new(&[[5f32, 6., 7.]], &Device::Cpu).unwrap(),
            ),
            (
                "head.bias".to_string(),
                Tensor::new(&[0f32], &Device::Cpu).unwrap(),
            ),
        ]);
        let err = assign(&params, &tensors, Path::new("torch.safetensors"))
            .unwrap_err()
            .to_string();
        for part in [
            "torch.safetensors",
            "fc.weight has shape [1, 3]",
            "missing fc.bias",
            "unexpected head.bias",
        ] {
            assert!(err.contains(part), "{part} not in: {err}");
        }
        assert_eq!(w.to_vec2::<f32>().unwrap(), [[1., 2.]]);
    }
}
