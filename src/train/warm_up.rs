//! A dry run of what a classification run's first steps load on a GPU, so that it loads while
//! the data does rather than inside the first epoch.
//!
//! A GPU's libraries load their kernels on first use, and cuDNN makes an execution plan for
//! each convolution shape the first time it runs (timing candidates when no earlier run chose
//! one): that made fastnet's first epoch about three times as long as the others. The same
//! work on a throwaway model of the same shapes, done beside the data's loading, leaves the
//! first epoch as fast as the rest. Its weights are not drawn from the run's seed and nothing it
//! computes is kept; only what the process and the algorithm cache learn stays.

use candle_core::{DType, Device, Tensor};

use super::plan::Plan;
use crate::data::images::CHANNELS;
use crate::data::Dimensions;
use crate::error::Result;
use crate::evaluate::tta_logits;
use crate::models::{self, Architecture};
use crate::ops::{cross_entropy, GradKernels};

/// Runs, on `device`, what the run `plan` resolves runs first on `data`: the
/// set-up from data (fastnet's whitening), a training step's forward and backward at the batch
/// size and an evaluation batch (test-time augmented where `config.tta` is set), on zeros, in
/// the run's precision; returns once the device has done it. Only CUDA loads enough on first
/// use for this to pay: elsewhere it does nothing.
pub fn warm_up(plan: &Plan, data: Dimensions, device: &Device) -> Result<()> {
    if !device.is_cuda() {
        return Ok(());
    }
    let _span = tracing::info_span!("warm up").entered();
    let (spec, config, input_dtype) = (plan.spec, &plan.config, plan.dtype);
    let arch = Architecture::new(data.classes, data.side, config.stem, config.width)?;
    let built = models::build(spec, &arch, 0, device)?;
    let model = built.module.as_ref();
    let images = |n: usize| Tensor::zeros((n, CHANNELS, data.side, data.side), DType::F32, device);
    if let Some(init) = &spec.data_init {
        (init.apply)(&built.params, &images(init.images.min(data.train_images))?)?;
    }
    let batch_size = config.batch_size.min(data.train_images);
    let batch = images(batch_size)?.to_dtype(input_dtype)?;
    let labels = Tensor::zeros(batch_size, DType::U32, device)?;
    let logits = model.forward_t(&batch, true)?;
    let loss = cross_entropy(&logits, &labels, config.label_smoothing as f32)?;
    drop(logits);
    loss.backward_consuming_with(&GradKernels)?;
    let batch = images(config.eval_batch_size.min(data.test_images))?.to_dtype(input_dtype)?;
    match config.tta {
        true => drop(tta_logits(model, &batch)?),
        false => drop(model.forward_t(&batch, false)?),
    }
    device.synchronize()?;
    Ok(())
}
