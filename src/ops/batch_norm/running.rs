//! BatchNorm with its running statistics: evaluation mode, and the running statistics'
//! update after each training batch.

#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::Shape;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, Var};

#[cfg(feature = "cuda")]
use super::cuda;
#[cfg(feature = "cuda")]
use super::kernel_sizes;
use super::{as_stored, ours, Activation};
#[cfg(feature = "cuda")]
use crate::ops::cuda::by_float;
use crate::ops::{contiguous_f32, contiguous_f32_mut, MemoryFormat};

/// Evaluation mode: `act((x - running_mean) / sqrt(running_var + eps) * gamma + beta)`, as one
/// scale and shift per channel; `x` in `format`. One kernel on CUDA (kiln's `bn_apply`, which
/// training runs too); candle's composition elsewhere.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
    act: Activation,
    format: MemoryFormat,
) -> candle_core::Result<Tensor> {
    let c = x.dim(format.channel_dim())?;
    let per_channel = format.per_channel(c);
    let scale = (gamma / (running_var + eps)?.sqrt()?)?;
    let shift = (beta - (running_mean * &scale)?)?;
    let f32_figures = scale.dtype() == DType::F32 && shift.dtype() == DType::F32;
    if x.device().is_cuda() && ours(x.device(), x.dtype(), format) && f32_figures && x.rank() == 4 {
        let affine = Tensor::stack(&[&scale, &shift], 0)?;
        return x
            .contiguous()?
            .apply_op2_no_bwd(&affine, &BatchNormEval { act, format });
    }
    // In f32 whatever the data's type, then rounded back (as in training).
    let y = x
        .to_dtype(DType::F32)?
        .broadcast_mul(&scale.reshape(per_channel)?)?
        .broadcast_add(&shift.reshape(per_channel)?)?;
    act.compose(&as_stored(&y, x.dtype())?)?.to_dtype(x.dtype())
}

/// [`batch_norm_eval`]'s kernel: `x` and the affine [2, C] (scale; shift), on CUDA.
struct BatchNormEval {
    // Read by the CUDA launch alone.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    act: Activation,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    format: MemoryFormat,
}

impl candle_core::CustomOp2 for BatchNormEval {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-eval"
    }

    crate::ops::cuda_only_cpu_fwd!(2, "the CPU composes it");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        as_: &candle_core::CudaStorage,
        al: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let sizes = kernel_sizes(xl, self.format)?;
        let c = sizes.1;
        let affine = crate::ops::cuda::view::<f32>(as_, al, "scale and shift")?;
        if affine.len() != 2 * c {
            candle_core::bail!(
                "batch_norm: {} scales and shifts for {c} channels",
                affine.len()
            );
        }
        let (scale, shift) = (affine.slice(..c), affine.slice(c..));
        let y = by_float!(xs.dtype(), T => crate::ops::cuda::storage(
            cuda::apply::<T>(xs, xl, &scale, &shift, sizes, self.act)?,
            &xs.device,
        ));
        Ok((y, xl.shape().clone()))
    }
}

/// `running = running * (1 - momentum) + batch * (momentum * scale)`, in place: how a running
/// statistic follows the batch's (PyTorch's update; `scale` makes a variance unbiased). One
/// kernel on the CPU and CUDA (f32) where candle's composition took three launches and two
/// temporaries per statistic; the same arithmetic either way: both products rounded, then
/// their sum.
pub fn blend_running(
    running: &Var,
    batch: &Tensor,
    momentum: f64,
    scale: f64,
) -> candle_core::Result<()> {
    let (keep, take) = (1.0 - momentum, momentum * scale);
    let batch = batch.to_device(running.device())?;
    let ours = match running.device() {
        Device::Cpu => true,
        Device::Cuda(_) => cfg!(feature = "cuda"),
        Device::Metal(_) => false,
    };
    let f32s = running.dtype() == DType::F32 && batch.dtype() == DType::F32;
    if ours && f32s && running.elem_count() == batch.elem_count() {
        let op = BlendRunning {
            keep: keep as f32,
            take: take as f32,
        };
        return running.as_tensor().inplace_op2(&batch.contiguous()?, &op);
    }
    running.set(&(running.as_tensor().affine(keep, 0.0)? + batch.affine(take, 0.0)?)?)
}

struct BlendRunning {
    keep: f32,
    take: f32,
}

impl InplaceOp2 for BlendRunning {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-running"
    }

    fn cpu_fwd(
        &self,
        rs: &mut CpuStorage,
        rl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        let batch = contiguous_f32(bs, bl, "batch statistic")?;
        let running = contiguous_f32_mut(rs, rl, "running statistic")?;
        for (r, &b) in running.iter_mut().zip(batch) {
            *r = *r * self.keep + b * self.take;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        rs: &mut candle_core::CudaStorage,
        rl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        cuda::blend_running(rs, rl, bs, bl, self.keep, self.take)
    }
}
