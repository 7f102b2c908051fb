//! The run configuration: a TOML file (`configs/<model>.toml`, built into the binary as each
//! model's default) with command-line overrides on top, resolved and validated once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::data::augment::Augment;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::models::{self, ModelSpec, Stem};
use crate::optim::loss_scale;
use crate::optim::schedule::Schedule;
use crate::optim::OptimizerConfig;
pub use crate::optim::OptimizerKind;

mod overrides;
pub use overrides::Overrides;

/// The model trained when neither `--model` nor `--config` names one.
pub const DEFAULT_MODEL: &str = "simplecnn";

/// Resolves a run's model and configuration: `file` when given (else the model's built-in
/// `configs/<model>.toml`), then the command-line `overrides`.
pub fn resolve(
    model: Option<&str>,
    file: Option<&Path>,
    overrides: &Overrides,
) -> Result<(&'static ModelSpec, Config)> {
    let config = match file {
        Some(path) => Config::from_file(path)?,
        None => {
            let spec = models::find(model.unwrap_or(DEFAULT_MODEL))?;
            let origin = PathBuf::from(format!("configs/{}.toml", spec.name));
            Config::parse(spec.default_config, &origin)?
        }
    };
    if let (Some(name), Some(path)) = (model, file) {
        if !name.eq_ignore_ascii_case(&config.model) {
            return Err(Error::InvalidSetting(format!(
                "--model {name} conflicts with model = \"{}\" in {}; drop one of them",
                config.model,
                path.display()
            )));
        }
    }
    let spec = models::find(&config.model)?;
    Ok((spec, config.apply(overrides)?))
}

/// The arithmetic of training steps: f32 throughout, or bf16 (or f16) activations and
/// convolutions with f32 master weights, optimizer state and BatchNorm statistics (Lightning's
/// "bf16-mixed" and "16-mixed", PyTorch's autocast); f16, whose range is narrow, multiplies the
/// loss by a dynamic scale ([`crate::optim::LossScaled`], PyTorch's GradScaler). `auto` (the
/// default) is bf16 for models that support it (the ResNets) on CUDA, where tensor cores run it,
/// and f32 elsewhere. Weights files and checkpoints hold f32 either way, so a run may change
/// precision when it resumes; the training loop evaluates in its precision (as under
/// autocast), the `evaluate` binary in f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[value(rename_all = "lower")]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    #[value(alias = "32")]
    F32,
    #[value(alias = "bf16-mixed")]
    Bf16,
    #[value(aliases = ["16", "16-mixed"])]
    F16,
}

impl Precision {
    /// The data type a model's activations take under this setting: `mixed_precision` says
    /// whether the model supports bf16 (its `ModelSpec`), `on_cuda` whether it trains on CUDA.
    pub fn activations(self, mixed_precision: bool, on_cuda: bool) -> DType {
        match self {
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::Auto if mixed_precision && on_cuda => DType::BF16,
            Self::Auto | Self::F32 => DType::F32,
        }
    }
}

/// Every hyper-parameter of a run. Unknown keys are an error, so a typo never goes unnoticed.
/// Keys added after a run was checkpointed take their defaults when it resumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: String,
    pub epochs: usize,
    pub batch_size: usize,
    /// Micro-batches of `batch_size` whose gradients add up to one optimizer step (Lightning's
    /// `accumulate_grad_batches`): the step sees `batch_size * accumulate` images while memory
    /// holds one micro-batch. The schedule, clipping and loss scaling act per optimizer step.
    #[serde(default = "default_accumulate")]
    pub accumulate: usize,
    /// Batch size for evaluation passes, which keep no gradients and can afford more.
    pub eval_batch_size: usize,
    pub seed: u64,
    /// Reshuffle the training set every epoch; off keeps file order.
    pub shuffle: bool,
    /// cifar10 (from `data_dir`) or synthetic (generated); image models only.
    #[serde(default)]
    pub dataset: Dataset,
    /// Where the CIFAR-10 binary files are; models that generate their data ignore it.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Training images generated for `dataset = "synthetic"`.
    #[serde(default = "default_synthetic_images")]
    pub synthetic_images: usize,
    /// Input images are `image_size` x `image_size` (a folder's pictures are resized and
    /// centre-cropped to it; CIFAR-10's are 32).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// `dataset = "folder"` without train/ and val/ folders: the share of each class held out.
    #[serde(default = "default_val_split")]
    pub val_split: f64,
    /// `dataset = "folder"`: skip (and count) pictures that do not decode instead of stopping.
    #[serde(default)]
    pub skip_bad_images: bool,
    pub optimizer: OptimizerKind,
    /// The peak learning rate; the schedule scales it per step.
    pub lr: f64,
    /// SGD momentum (PyTorch's, no dampening); ignored by Adam.
    pub momentum: f64,
    /// SGD: Nesterov's momentum (PyTorch's `nesterov=True`).
    #[serde(default)]
    pub nesterov: bool,
    /// sgd and adam: an L2 penalty added to the gradient (PyTorch's `weight_decay`); adamw:
    /// decoupled decay.
    pub weight_decay: f64,
    /// Adam's (beta1, beta2).
    pub betas: [f64; 2],
    /// Adam's epsilon.
    pub eps: f64,
    /// Cross-entropy against (1 - e) one-hot + e / classes, as PyTorch's `label_smoothing`.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Rescale the gradients to this global L2 norm when larger (`clip_grad_norm_`); 0 = off.
    #[serde(default)]
    pub grad_clip_norm: f64,
    /// Stop once the test accuracy has not improved for this many epochs; 0 = never.
    #[serde(default)]
    pub early_stop: usize,
    /// The learning rate of every layer but the classifier (`fc`), as a share of `lr`: below
    /// 1 when fine-tuning pretrained weights; 0 freezes them (`--freeze-backbone`).
    #[serde(default = "default_backbone_lr_scale")]
    pub backbone_lr_scale: f64,
    /// BatchNorm's parameters train at this multiple of the rate, their weight decay divided
    /// by it (airbench's `bias_scaler`; `optim::groups`).
    #[serde(default = "default_norm_lr_scale")]
    pub norm_lr_scale: f64,
    /// Parameters trained for the first so many epochs only, by name (fastnet's whitening
    /// bias: `{ "0.bias" = 3 }`).
    #[serde(default)]
    pub train_until: BTreeMap<String, usize>,
    /// Lookahead averaging of the weights every five steps, ending on the average
    /// (`optim::lookahead`, airbench's).
    #[serde(default)]
    pub lookahead: bool,
    /// Leave out each epoch's last batch when it comes out short.
    #[serde(default)]
    pub drop_last: bool,
    /// Data-parallel runs: batch norms take their statistics over the whole global batch
    /// (PyTorch's `SyncBatchNorm`), so W processes compute what one does; off, each process
    /// normalises its own share (DDP's default). No effect on one process.
    #[serde(default)]
    pub sync_bn: bool,
    /// Write TensorBoard event files (into the run directory, or `--tensorboard DIR`).
    #[serde(default)]
    pub tensorboard: bool,
    /// The last epoch's evaluation with test-time augmentation (`evaluate --tta`).
    #[serde(default)]
    pub tta: bool,
    /// The network's first layers (ResNets): auto, cifar or imagenet.
    #[serde(default)]
    pub stem: Stem,
    /// The first stage's width (ResNets; torchvision's is 64).
    #[serde(default = "default_width")]
    pub width: usize,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub augment: Augment,
    /// auto, f32 or bf16 (mixed: f32 master weights), for models that support it (the ResNets).
    #[serde(default)]
    pub precision: Precision,
    /// f16: the dynamic loss scale's start and how it moves (PyTorch's GradScaler arguments).
    #[serde(default)]
    pub loss_scale: loss_scale::Settings,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(crate::data::cifar::DEFAULT_DIR)
}

fn default_synthetic_images() -> usize {
    5000
}

fn default_accumulate() -> usize {
    1
}

fn default_backbone_lr_scale() -> f64 {
    1.0
}

fn default_norm_lr_scale() -> f64 {
    1.0
}

fn default_width() -> usize {
    64
}

fn default_image_size() -> usize {
    32
}

fn default_val_split() -> f64 {
    0.1
}

impl Config {
    /// The optimizer's section of this config.
    pub fn optim(&self) -> OptimizerConfig {
        OptimizerConfig {
            kind: self.optimizer,
            lr: self.lr,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            betas: self.betas,
            eps: self.eps,
            backbone_lr_scale: self.backbone_lr_scale,
            norm_lr_scale: self.norm_lr_scale,
            train_until: self.train_until.clone(),
            lookahead: self.lookahead,
            epochs: self.epochs,
        }
    }

    /// How a folder data set is split and decoded under this config.
    pub fn folder_options(&self) -> crate::data::folder::FolderOptions {
        crate::data::folder::FolderOptions {
            image_size: self.image_size,
            val_split: self.val_split,
            seed: self.seed,
            skip_bad_images: self.skip_bad_images,
        }
    }

    /// Parses TOML text; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // toml's own message spans several lines with a snippet; one line says the same.
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            Error::ConfigParse {
                path: origin.to_path_buf(),
                message: match line {
                    Some(line) => format!("line {line}: {}", e.message().trim()),
                    None => e.message().trim().to_string(),
                },
            }
        })?;
        config.validate().map_err(|message| Error::ConfigParse {
            path: origin.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|cause| Error::ConfigRead {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::parse(&text, path)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let unit = |name: &str, v: f64| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be in [0, 1), got {v}"))
            }
        };
        if self.epochs == 0 {
            return Err("epochs must be at least 1".into());
        }
        if self.synthetic_images < 10 {
            return Err(format!(
                "synthetic_images must be at least 10, got {}",
                self.synthetic_images
            ));
        }
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            return Err("batch_size and eval_batch_size must be at least 1".into());
        }
        if self.accumulate == 0 {
            return Err("accumulate must be at least 1 (1: a step a batch)".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(format!("lr must be a positive number, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(format!("eps must be > 0, got {}", self.eps));
        }
        if !(self.grad_clip_norm.is_finite() && self.grad_clip_norm >= 0.0) {
            return Err(format!(
                "grad_clip_norm must be >= 0 (0 = off), got {}",
                self.grad_clip_norm
            ));
        }
        unit("momentum", self.momentum)?;
        unit("betas[0]", self.betas[0])?;
        unit("betas[1]", self.betas[1])?;
        unit("label_smoothing", self.label_smoothing)?;
        if self.nesterov && self.momentum == 0.0 {
            return Err("nesterov needs a momentum above 0".into());
        }
        if !(self.backbone_lr_scale >= 0.0 && self.backbone_lr_scale.is_finite()) {
            return Err(format!(
                "backbone_lr_scale must be 0 (frozen) or more, got {}",
                self.backbone_lr_scale
            ));
        }
        if !(self.norm_lr_scale > 0.0 && self.norm_lr_scale.is_finite()) {
            return Err(format!(
                "norm_lr_scale must be above 0, got {}",
                self.norm_lr_scale
            ));
        }
        if let Some((name, _)) = self.train_until.iter().find(|(_, &epochs)| epochs == 0) {
            return Err(format!(
                "train_until: {name} = 0 would never train it; give at least 1 epoch"
            ));
        }
        if self.width == 0 {
            return Err("width must be at least 1".into());
        }
        if !(4..=4096).contains(&self.image_size) {
            return Err(format!(
                "image_size must be 4 to 4096 pixels, got {}",
                self.image_size
            ));
        }
        if !(self.val_split > 0.0 && self.val_split < 1.0) {
            return Err(format!(
                "val_split must be in (0, 1), got {}",
                self.val_split
            ));
        }
        self.loss_scale.validate()?;
        self.schedule.validate(self.epochs, self.lr)
    }

    pub fn to_toml(&self) -> String {
        // Serialising a struct of plain fields cannot fail.
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each model's config parses and names its model, and an image model's states every key
    /// there is (none left to a default), so the file documents the whole recipe. (The linear
    /// check states the keys it uses; serde requires those.)
    #[test]
    fn every_shipped_config_parses_names_its_model_and_states_every_key() {
        let simplecnn = models::find("simplecnn").unwrap().default_config;
        let config = Config::parse(simplecnn, Path::new("x")).unwrap();
        let all_keys: Vec<String> = toml::Table::try_from(&config)
            .unwrap()
            .keys()
            .cloned()
            .collect();
        for spec in models::MODELS {
            let config = Config::parse(spec.default_config, Path::new(spec.name)).unwrap();
            assert_eq!(config.model, spec.name);
            if spec.task != models::Task::ImageClassification {
                continue;
            }
            let written: toml::Table = toml::from_str(spec.default_config).unwrap();
            for key in &all_keys {
                let shape_key = matches!(key.as_str(), "stem" | "width");
                let half_key = matches!(key.as_str(), "precision" | "loss_scale");
                if (shape_key && !spec.has_stem) || (half_key && !spec.mixed_precision) {
                    continue;
                }
                assert!(
                    written.contains_key(key),
                    "configs/{}.toml lacks {key}",
                    spec.name
                );
            }
        }
    }

    #[test]
    fn auto_precision_is_bf16_only_for_mixed_precision_models_on_cuda() {
        use candle_core::DType::{BF16, F16, F32};
        let cases = [
            (Precision::Auto, true, true, BF16),
            (Precision::Auto, true, false, F32),
            (Precision::Auto, false, true, F32),
            (Precision::F32, true, true, F32),
            (Precision::Bf16, true, false, BF16),
            (Precision::F16, true, true, F16),
        ];
        for (precision, mixed, cuda, want) in cases {
            assert_eq!(
                precision.activations(mixed, cuda),
                want,
                "{precision} mixed {mixed} cuda {cuda}"
            );
        }
        assert_eq!("AUTO".parse::<Precision>().unwrap(), Precision::Auto);
        assert_eq!("16-mixed".parse::<Precision>().unwrap(), Precision::F16);
        assert_eq!(Precision::default().to_string(), "auto");
    }

    #[test]
    fn overrides_replace_values_and_round_trip_through_toml() {
        let base = Config::parse(
            models::find("simplecnn").unwrap().default_config,
            Path::new("x"),
        )
        .unwrap();
        let resolved = base
            .clone()
            .apply(&Overrides {
                epochs: Some(3),
                lr: Some(0.05),
                optimizer: Some(OptimizerKind::Sgd),
                no_shuffle: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            (resolved.epochs, resolved.lr, resolved.optimizer),
            (3, 0.05, OptimizerKind::Sgd)
        );
        assert!(!resolved.shuffle);
        assert_eq!(resolved.batch_size, base.batch_size);
        assert_eq!(
            Config::parse(&resolved.to_toml(), Path::new("x")).unwrap(),
            resolved
        );
    }

    #[test]
    fn bad_values_and_unknown_keys_are_clear_errors() {
        let text = models::find("simplecnn").unwrap().default_config;
        let typo = text.replace("epochs", "epoch");
        let err = Config::parse(&typo, Path::new("my.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("my.toml") && err.contains("epoch"), "{err}");

        let base = Config::parse(text, Path::new("x")).unwrap();
        for bad in [
            Overrides {
                lr: Some(-1.0),
                ..Default::default()
            },
            Overrides {
                epochs: Some(0),
                ..Default::default()
            },
            Overrides {
                momentum: Some(1.5),
                ..Default::default()
            },
        ] {
            assert!(matches!(
                base.clone().apply(&bad),
                Err(Error::InvalidSetting(_))
            ));
        }
        assert!("rmsprop".parse::<OptimizerKind>().is_err());
    }

    #[test]
    fn resolve_picks_the_models_default_or_the_file_and_refuses_a_conflict() {
        let (spec, config) = resolve(None, None, &Overrides::default()).unwrap();
        assert_eq!(
            (spec.name, config.model.as_str()),
            ("simplecnn", "simplecnn")
        );
        let (spec, config) = resolve(Some("linear"), None, &Overrides::default()).unwrap();
        assert_eq!(
            (spec.name, config.optimizer),
            ("linear", OptimizerKind::Sgd)
        );

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mine.toml");
        std::fs::write(
            &file,
            models::find("linear")
                .unwrap()
                .default_config
                .replace("200", "7"),
        )
        .unwrap();
        let (_, config) = resolve(None, Some(&file), &Overrides::default()).unwrap();
        assert_eq!(config.epochs, 7);
        let err = resolve(Some("simplecnn"), Some(&file), &Overrides::default())
            .err()
            .unwrap();
        assert!(err.to_string().contains("conflicts"), "{err}");
        let err = resolve(
            None,
            Some(&dir.path().join("none.toml")),
            &Overrides::default(),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("none.toml"), "{err}");
    }
}
