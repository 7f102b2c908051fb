//! The flags that replace single keys of a run's config, declared once for clap and applied by
//! [`Config::apply`].

use std::path::PathBuf;

use super::{Config, OptimizerKind, Precision};
use crate::cli::DataArgs;
use crate::error::{Error, Result};
use crate::optim::schedule::ScheduleKind;

/// The hyper-parameters a command line may set, each declared here once: `train`'s flags (clap
/// reads this struct) and the keys they replace in the config ([`Config::apply`]). Data flags
/// are [`DataArgs`], shared with `evaluate` and `predict`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Overrides {
    #[command(flatten)]
    pub data: DataArgs,

    /// Keep the training files' order instead of reshuffling every epoch (to compare runs
    /// side by side with other frameworks)
    #[arg(long, help_heading = "Data")]
    pub no_shuffle: bool,

    /// Under mpirun or srun: batch norms take their statistics over the whole global batch
    /// (PyTorch's SyncBatchNorm), so N processes train as one would; without it each process
    /// normalises its own share, as DDP does by default [config: sync_bn]
    #[arg(long, help_heading = "Run")]
    pub sync_bn: bool,

    /// Passes over the training set
    #[arg(long, value_name = "N", help_heading = "Hyper-parameters")]
    pub epochs: Option<usize>,

    /// Images per training step (with --accumulate, per micro-batch; under mpirun or srun, of
    /// all processes together)
    #[arg(long, value_name = "N", help_heading = "Hyper-parameters")]
    pub batch_size: Option<usize>,

    /// Add up the gradients of N batches before each optimizer step: the step of a batch N
    /// times larger, in the memory of one (Lightning's accumulate_grad_batches) [config:
    /// accumulate, 1]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..), help_heading = "Hyper-parameters")]
    pub accumulate: Option<u16>,

    /// Learning rate
    #[arg(long, value_name = "LR", help_heading = "Hyper-parameters")]
    pub lr: Option<f64>,

    /// adam, adamw or sgd
    #[arg(long, value_name = "NAME", help_heading = "Hyper-parameters")]
    pub optimizer: Option<OptimizerKind>,

    /// Learning-rate schedule, stepped every batch: constant, step, cosine, linear or onecycle
    /// (their settings are in the config's [schedule] table)
    #[arg(long, value_name = "NAME", help_heading = "Hyper-parameters")]
    pub schedule: Option<ScheduleKind>,

    /// Label smoothing of the cross-entropy (0 to 1, PyTorch's label_smoothing)
    #[arg(long, value_name = "E", help_heading = "Hyper-parameters")]
    pub label_smoothing: Option<f64>,

    /// Rescale the gradients to this global L2 norm when they exceed it (0 = off)
    #[arg(
        long = "grad-clip",
        value_name = "NORM",
        help_heading = "Hyper-parameters"
    )]
    pub grad_clip_norm: Option<f64>,

    /// Stop once the test accuracy has not improved for N epochs (0 = never)
    #[arg(long, value_name = "N", help_heading = "Hyper-parameters")]
    pub early_stop: Option<usize>,

    /// SGD momentum (0 turns it off)
    #[arg(long, value_name = "M", help_heading = "Hyper-parameters")]
    pub momentum: Option<f64>,

    /// L2 penalty added to the gradients, as PyTorch's weight_decay
    #[arg(long, value_name = "WD", help_heading = "Hyper-parameters")]
    pub weight_decay: Option<f64>,

    /// Seed for initial weights and data order; the same seed on the CPU gives the same run
    #[arg(long, value_name = "N", help_heading = "Hyper-parameters")]
    pub seed: Option<u64>,

    /// The learning rate of every layer but the classifier, as a share of --lr (0.1 is usual
    /// when fine-tuning) [default: the config's backbone_lr_scale, 1]
    #[arg(long, value_name = "S", help_heading = "Hyper-parameters")]
    pub backbone_lr_scale: Option<f64>,

    /// Train the classifier (fc) alone, every other layer kept as loaded (backbone_lr_scale = 0)
    #[arg(
        long,
        requires = "init_weights",
        conflicts_with = "backbone_lr_scale",
        help_heading = "Checkpoints"
    )]
    pub freeze_backbone: bool,

    /// auto, f32, bf16 or f16: bf16 runs activations and convolutions in bf16 with f32 master
    /// weights, optimizer state and BatchNorm statistics (the ResNets; for CUDA, where tensor
    /// cores run it); f16 the same in f16, the loss scaled dynamically against its narrow
    /// range; auto is bf16 for the ResNets on CUDA and f32 otherwise
    /// [default: the config's precision, auto]
    #[arg(long, value_name = "P", help_heading = "Hyper-parameters")]
    pub precision: Option<Precision>,

    /// Write TensorBoard event files (loss, accuracy, learning rate, images/s; per step and per
    /// epoch) into DIR [default: the run directory]; then: tensorboard --logdir models
    /// [config: tensorboard = true]
    #[arg(long, value_name = "DIR", num_args = 0..=1, help_heading = "Output")]
    pub tensorboard: Option<Option<PathBuf>>,
}

impl Config {
    pub fn apply(mut self, o: &Overrides) -> Result<Self> {
        // A flag given replaces the key of its name.
        macro_rules! replace {
            ($($from:expr => $key:expr),* $(,)?) => {
                $(if let Some(v) = $from.clone() {
                    $key = v.into();
                })*
            };
        }
        replace! {
            o.epochs => self.epochs,
            o.batch_size => self.batch_size,
            o.accumulate => self.accumulate,
            o.lr => self.lr,
            o.optimizer => self.optimizer,
            o.momentum => self.momentum,
            o.weight_decay => self.weight_decay,
            o.seed => self.seed,
            o.schedule => self.schedule.kind,
            o.label_smoothing => self.label_smoothing,
            o.grad_clip_norm => self.grad_clip_norm,
            o.early_stop => self.early_stop,
            o.backbone_lr_scale => self.backbone_lr_scale,
            o.precision => self.precision,
            o.data.data_dir => self.data_dir,
            o.data.dataset => self.dataset,
            o.data.image_size => self.image_size,
            o.data.val_split => self.val_split,
        }
        if o.freeze_backbone {
            self.backbone_lr_scale = 0.0;
        }
        // Switches turn a key on (or, --no-shuffle, off); absent, the config's value stands.
        self.skip_bad_images |= o.data.skip_bad_images;
        self.shuffle &= !o.no_shuffle;
        self.sync_bn |= o.sync_bn;
        self.tensorboard |= o.tensorboard.is_some();
        self.validate().map_err(Error::InvalidSetting)?;
        Ok(self)
    }
}
