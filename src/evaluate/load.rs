//! A model from nothing but a weights file: the architecture from its metadata or its tensors'
//! shapes, the classes and normalisation it records.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::checkpoint;
use crate::data::{ChannelStats, Dataset};
use crate::error::{Error, Result};
use crate::models::{self, Architecture, Built, ModelSpec, Stem, Task};

/// A model loaded from a weights file (`last`/`best.safetensors`, a PyTorch-saved file with the
/// same names) or a checkpoint. The model is the one named in the file's metadata, or `model`.
pub struct Loaded {
    pub spec: &'static ModelSpec,
    pub built: Built,
    pub arch: Architecture,
    /// The epoch the weights are from, when the file says.
    pub epoch: Option<String>,
    /// The class names the file records, if any.
    pub classes: Option<Vec<String>>,
    /// The input normalisation the file records, if any.
    pub stats: Option<ChannelStats>,
    /// The data set it was trained on, and a folder's held-out split, where the file says.
    pub dataset: Option<Dataset>,
    pub val_split: Option<f64>,
    pub split_seed: Option<u64>,
    /// The folder a folder-trained model learnt from.
    pub data_dir: Option<std::path::PathBuf>,
}

impl Loaded {
    /// The normalisation the model expects: the file's, else ImageNet's for a torchvision-stem
    /// ResNet (what pretrained weights were trained with), else `data`'s.
    pub fn input_stats(&self, data: ChannelStats) -> ChannelStats {
        self.stats.unwrap_or(match self.arch.stem {
            Stem::Imagenet if self.spec.has_stem => ChannelStats::IMAGENET,
            _ => data,
        })
    }

    /// The class names: the file's; for a file that names none, CIFAR-10's when it has ten
    /// classes and no other data set is recorded, else the class numbers.
    pub fn class_names(&self) -> Vec<String> {
        if let Some(names) = &self.classes {
            return names.clone();
        }
        let cifar = matches!(self.dataset, None | Some(Dataset::Cifar10));
        if cifar && self.arch.num_classes == crate::data::cifar::CLASSES.len() {
            return crate::data::cifar::CLASSES.map(String::from).to_vec();
        }
        (0..self.arch.num_classes).map(|c| c.to_string()).collect()
    }
}

/// Loads a weights file or checkpoint into the model it holds. The architecture comes from the
/// file's metadata where kiln wrote it, else from the tensors' shapes (a PyTorch-saved file):
/// the head's rows are the classes, the first convolution's kernel says the stem and its
/// channels the width; the input size is the file's, else `image_size`, else CIFAR's 32.
pub fn load_model(
    path: &Path,
    model: Option<&str>,
    image_size: Option<usize>,
    device: &Device,
) -> Result<Loaded> {
    let file = checkpoint::load_weights(path, device)?;
    let invalid = |message: String| Error::WeightsInvalid {
        path: path.to_path_buf(),
        message,
    };
    let recorded = file.metadata.get("model").map(String::as_str);
    let name = match (model, recorded) {
        (Some(asked), Some(saved)) if !asked.eq_ignore_ascii_case(saved) => {
            return Err(invalid(format!("it holds a {saved} model, not {asked}")))
        }
        (Some(name), _) | (None, Some(name)) => name,
        (None, None) => {
            return Err(invalid(
                "its metadata names no model; pass --model NAME".into(),
            ))
        }
    };
    let spec = models::find(name)?;
    if spec.task != Task::ImageClassification {
        return Err(invalid(format!("{name} is not an image classifier")));
    }
    // A checkpoint keeps the weights under model/...; a weights file has the bare names.
    let is_checkpoint = file.tensors.keys().any(|k| k.starts_with("model/"));
    let tensors: HashMap<String, Tensor> = file
        .tensors
        .into_iter()
        .filter_map(|(k, t)| {
            if is_checkpoint {
                k.strip_prefix("model/").map(|k| (k.to_string(), t))
            } else {
                Some((k, t))
            }
        })
        .collect();
    let arch = recorded_architecture(&file.metadata, &tensors, image_size).map_err(invalid)?;
    let built = models::build(spec, &arch, 0, device)?;
    checkpoint::assign(&built.params.state(), &tensors, path)?;
    let epoch = file
        .metadata
        .get("epoch")
        .or(file.metadata.get("epochs_done"))
        .cloned();
    let classes = match file.metadata.get("classes") {
        Some(list) => Some(serde_json::from_str::<Vec<String>>(list).map_err(|_| {
            invalid(format!(
                "its metadata's classes are not a JSON list of names: {list}"
            ))
        })?),
        None => None,
    };
    let meta = |key: &str| file.metadata.get(key);
    let stats = match (meta("normalize_mean"), meta("normalize_std")) {
        (Some(mean), Some(std)) => Some(ChannelStats::parse(mean, std).ok_or_else(|| {
            invalid(format!(
                "its metadata's normalisation does not read: {mean} / {std}"
            ))
        })?),
        _ => None,
    };
    Ok(Loaded {
        spec,
        built,
        arch,
        epoch,
        classes,
        stats,
        dataset: meta("dataset").and_then(|d| d.parse().ok()),
        val_split: meta("val_split").and_then(|v| v.parse().ok()),
        split_seed: meta("split_seed").and_then(|v| v.parse().ok()),
        data_dir: meta("data_dir").map(std::path::PathBuf::from),
    })
}

/// The architecture a file's metadata records, its tensors' shapes filling what it lacks.
fn recorded_architecture(
    metadata: &HashMap<String, String>,
    tensors: &HashMap<String, Tensor>,
    image_size: Option<usize>,
) -> std::result::Result<Architecture, String> {
    fn number(
        metadata: &HashMap<String, String>,
        key: &str,
    ) -> std::result::Result<Option<usize>, String> {
        metadata
            .get(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("its metadata has a bad {key}: {v:?}"))
            })
            .transpose()
    }
    let dims = |name: &str| tensors.get(name).map(|t| t.dims().to_vec());
    let num_classes = match number(metadata, "num_classes")? {
        Some(n) => n,
        None => dims("fc.weight")
            .map(|d| d[0])
            .ok_or("it has no fc.weight to count the classes from")?,
    };
    let conv1 = dims("conv1.weight");
    let stem = match metadata.get("stem") {
        Some(stem) => stem.parse().map_err(|e: Error| e.to_string())?,
        None => match conv1.as_ref().map(|d| d.get(2).copied()) {
            Some(Some(7)) => Stem::Imagenet,
            _ => Stem::Cifar,
        },
    };
    let width = match number(metadata, "width")? {
        Some(w) => w,
        None => conv1.map_or(64, |d| d[0]),
    };
    let size = match (number(metadata, "image_size")?, image_size) {
        (Some(saved), Some(asked)) if saved != asked => {
            return Err(format!(
                "it was trained on {saved}x{saved} images, not {asked}x{asked}"
            ))
        }
        (Some(size), _) | (None, Some(size)) => size,
        (None, None) => crate::data::cifar::SIDE,
    };
    Architecture::new(num_classes, size, stem, width).map_err(|e| e.to_string())
}
