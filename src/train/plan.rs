//! A run resolved once: from what was asked (a model or config file, command-line overrides, a
//! start: fresh, a weights file, or a checkpoint to resume) and the device, the plain values
//! the rest of a run reads: the model, the merged and validated config, where its parameters
//! start, the run directory and the type its activations take. Nothing here touches the run
//! directory or the data: a plan can be made, and tested, before anything is written.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::resume;
use crate::checkpoint::{self, Checkpoint, RunDir};
use crate::config::{self, Config, Overrides, Precision};
use crate::error::{Error, Result};
use crate::models::{self, ModelSpec};

/// What the command line asks for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `--model`: the model whose built-in config is the base (or the one `config_file` names).
    pub model: Option<String>,
    /// `--config`: a TOML file holding every hyper-parameter.
    pub config_file: Option<PathBuf>,
    pub overrides: Overrides,
    /// Where run directories go, and this run's name (default: the model's name).
    pub models_dir: PathBuf,
    pub run: Option<String>,
    pub start: Begin,
}

/// Where the user asked the parameters to come from.
#[derive(Debug, Clone, Default)]
pub enum Begin {
    #[default]
    Fresh,
    /// `--init-weights PATH [--finetune]`.
    Weights { path: PathBuf, finetune: bool },
    /// `--resume [PATH]`: the given checkpoint, or the run directory's newest that verifies.
    Resume(Option<PathBuf>),
}

/// Where a run's parameters come from, once resolved.
pub enum Start {
    /// The model's seeded initialisation.
    Fresh,
    /// A weights file with PyTorch names (`--init-weights`): every tensor must fit, or, to
    /// fine-tune, those that fit are taken and the rest start afresh.
    Weights { path: PathBuf, finetune: bool },
    /// A checkpoint: weights, optimizer state and position (`--resume`).
    Resume(PathBuf, Box<Checkpoint>),
}

/// A run, resolved.
pub struct Plan {
    pub spec: &'static ModelSpec,
    /// The base config (the model's, the file's, or the resumed run's) with the overrides on
    /// top, validated.
    pub config: Config,
    pub start: Start,
    pub run_dir: RunDir,
    /// The type the model computes in: `config.precision` resolved for the model and device.
    /// Everything that runs the model (the loop, its evaluation, the optimizer's loss scaling,
    /// the warm-up) reads it from here.
    pub dtype: DType,
    /// What resolving decided that the user should hear (a resume's changed settings).
    pub notes: Vec<String>,
    /// Resuming was asked for (found or not): the run owns the directory it was pointed at.
    pub resuming: bool,
}

impl Plan {
    /// Resolves `request` for `device` (a checkpoint to resume is read onto it).
    pub fn resolve(request: &Request, device: &Device) -> Result<Plan> {
        let (spec, config) = config::resolve(
            request.model.as_deref(),
            request.config_file.as_deref(),
            &request.overrides,
        )?;
        if spec.task == models::Task::LinearFit {
            let flag = match request.start {
                Begin::Fresh => None,
                Begin::Weights { .. } => Some("--init-weights"),
                Begin::Resume(_) => Some("--resume"),
            };
            if let Some(flag) = flag {
                return Err(Error::InvalidSetting(format!(
                    "{flag} does not apply to --model {}: the set-up check saves nothing to \
                     resume or start from",
                    spec.name
                )));
            }
        }
        let run_name = request.run.as_deref().unwrap_or(spec.name);
        let run_dir = RunDir::at(&request.models_dir, run_name);
        let mut notes = Vec::new();
        let (spec, config, start) = match &request.start {
            Begin::Fresh => (spec, config, Start::Fresh),
            Begin::Weights { path, finetune } => (
                spec,
                config,
                Start::Weights {
                    path: path.clone(),
                    finetune: *finetune,
                },
            ),
            Begin::Resume(explicit) => {
                let found = match explicit {
                    Some(path) => Some((path.clone(), checkpoint::load_checkpoint(path, device)?)),
                    None => resume::newest(&run_dir, device)?,
                };
                match found {
                    None => {
                        notes.push(format!(
                            "nothing to resume in {} yet (no results): starting from scratch",
                            run_dir.path().display()
                        ));
                        (spec, config, Start::Fresh)
                    }
                    Some((path, saved)) => {
                        let (spec, config) =
                            resumed(request, spec, config, &path, &saved, &mut notes)?;
                        let here = crate::device::describe(device);
                        if !saved.device.is_empty() && saved.device != here {
                            notes.push(format!("resume: device {} -> {here}", saved.device));
                        }
                        let p = &saved.progress;
                        notes.push(format!(
                            "resuming from {} ({} epochs done, {} steps into the next)",
                            path.display(),
                            p.epochs_done,
                            p.steps_into_epoch
                        ));
                        (spec, config, Start::Resume(path, Box::new(saved)))
                    }
                }
            }
        };
        let dtype = activations(spec, config.precision, device)?;
        Ok(Plan {
            spec,
            config,
            start,
            run_dir,
            dtype,
            notes,
            resuming: matches!(request.start, Begin::Resume(_)),
        })
    }
}

/// The model and config a resumed run goes on with: the checkpoint's model, and its settings
/// with today's overrides on top (or, with `--config`, that file's), checked against what the
/// checkpoint is bound to.
fn resumed(
    request: &Request,
    spec: &'static ModelSpec,
    config: Config,
    path: &Path,
    saved: &Checkpoint,
    notes: &mut Vec<String>,
) -> Result<(&'static ModelSpec, Config)> {
    let named = request.model.is_some() || request.config_file.is_some();
    if named && saved.model != spec.name {
        return Err(Error::CheckpointMismatch(format!(
            "{} holds a {} checkpoint, but this command trains {}; drop --model/--config to continue it",
            path.display(),
            saved.model,
            spec.name
        )));
    }
    // Without --config, the run goes on with the settings it was started with.
    let config = match &request.config_file {
        Some(_) => config,
        None => saved.config.clone().apply(&request.overrides)?,
    };
    let spec = models::find(&saved.model)?;
    for note in resume::reconcile(&saved.config, &config)? {
        notes.push(format!("resume: {note}"));
    }
    Ok((spec, config))
}

/// The type `spec`'s activations take under `precision` on `device`; half precision is refused
/// for models that train in f32 only.
pub fn activations(spec: &ModelSpec, precision: Precision, device: &Device) -> Result<DType> {
    let half = matches!(precision, Precision::Bf16 | Precision::F16);
    if half && !spec.mixed_precision {
        return Err(Error::InvalidSetting(format!(
            "precision {precision} is for the ResNets and fastnet; {} trains in f32 (use --precision f32)",
            spec.name
        )));
    }
    if half && device.is_cpu() {
        tracing::warn!(
            "precision {precision} on the CPU runs candle's generic operations, slower than kiln's f32 kernels"
        );
    }
    Ok(precision.activations(spec.mixed_precision, device.is_cuda()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(model: &str, edit: impl FnOnce(&mut Request)) -> Request {
        let mut request = Request {
            model: Some(model.into()),
            models_dir: PathBuf::from("models"),
            ..Default::default()
        };
        edit(&mut request);
        request
    }

    #[test]
    fn a_fresh_plan_merges_the_overrides_and_resolves_the_precision_once() {
        let plan = Plan::resolve(
            &request("resnet18", |r| {
                r.overrides.epochs = Some(3);
                r.overrides.precision = Some(Precision::Bf16);
                r.run = Some("mine".into());
            }),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(plan.spec.name, "resnet18");
        assert_eq!(plan.config.epochs, 3);
        assert_eq!(plan.dtype, DType::BF16);
        assert_eq!(plan.run_dir.path(), Path::new("models/mine"));
        assert!(matches!(plan.start, Start::Fresh) && !plan.resuming);

        // auto is f32 off CUDA, and the run directory is named after the model by default.
        let plan = Plan::resolve(&request("resnet18", |_| {}), &Device::Cpu).unwrap();
        assert_eq!(plan.dtype, DType::F32);
        assert_eq!(plan.run_dir.path(), Path::new("models/resnet18"));
    }

    #[test]
    fn half_precision_is_refused_for_a_model_that_trains_in_f32() {
        let err = Plan::resolve(
            &request("simplecnn", |r| {
                r.overrides.precision = Some(Precision::F16)
            }),
            &Device::Cpu,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("--precision f32"), "{err}");
    }

    #[test]
    fn freeze_backbone_sets_the_backbone_rate_to_zero() {
        let plan = Plan::resolve(
            &request("resnet18", |r| r.overrides.freeze_backbone = true),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(plan.config.backbone_lr_scale, 0.0);
    }

    #[test]
    fn resuming_an_empty_run_directory_starts_fresh_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Plan::resolve(
            &request("simplecnn", |r| {
                r.models_dir = dir.path().into();
                r.start = Begin::Resume(None);
            }),
            &Device::Cpu,
        )
        .unwrap();
        assert!(matches!(plan.start, Start::Fresh) && plan.resuming);
        assert!(
            plan.notes[0].contains("nothing to resume"),
            "{:?}",
            plan.notes
        );
    }

    #[test]
    fn the_linear_check_takes_no_start() {
        let err = Plan::resolve(
            &request("linear", |r| r.start = Begin::Resume(None)),
            &Device::Cpu,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("--resume does not apply"), "{err}");
    }

    #[test]
    fn weights_to_start_from_are_kept_as_asked() {
        let plan = Plan::resolve(
            &request("resnet18", |r| {
                r.start = Begin::Weights {
                    path: "w.safetensors".into(),
                    finetune: true,
                }
            }),
            &Device::Cpu,
        )
        .unwrap();
        assert!(matches!(
            plan.start,
            Start::Weights { ref path, finetune: true } if path == Path::new("w.safetensors")
        ));
    }
}
