//! Batch normalisation over the channels of [N, C, H, W] (or channels last, [N, H, W, C]), as
//! `nn.BatchNorm2d` computes it in
//! training mode: each channel normalised by its batch mean and biased variance, then scaled
//! and shifted, optionally followed by an activation in the same pass ([`Activation`]: ResNet's
//! `relu(bn(conv(x)))`, fastnet's `gelu(bn(x))`).
//! The batch mean and variance come back too, for the caller's running statistics.
//!
//! On the CPU (f32, channels first) and CUDA (f32, bf16 or f16 data in either format, f32
//! statistics and parameters), kiln's kernels:
//! a channel's sums in f64 (as PyTorch's CPU kernel accumulates; CUDA's channels-last kernel adds
//! each thread's at most 64 rows in f32 first), on the CPU in a fixed order so
//! that results do not depend on the thread count;
//! the backward pass reads the saved mean and inverse deviation and recomputes the fused
//! activation's input. The CPU kernels fuse ReLU (GELU follows them as candle's `gelu_erf`); CUDA's
//! fuse both. Elsewhere (Metal, other dtypes), candle's composition, which is also the
//! reference for the tests.
//!
//! Here: training mode. `residual_end.rs`: the residual block's end (BatchNorm, add, ReLU) as
//! one node; `running.rs`: evaluation mode and the running statistics' update; `synced.rs`:
//! statistics summed across processes; `cpu.rs`: the CPU kernels' arithmetic; `cuda.rs`: the
//! CUDA kernels' launches.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda::by_float;
use super::{contiguous_f32, par_collect, MemoryFormat};
#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use cpu::{affine, cpu_fuses, cpu_reads, gated, plane_grad_sums, plane_sum, planes};
pub use residual_end::{
    batch_norm_add_relu_train, residual_end_composed, NormInputs, ResidualEndOutput, Shortcut,
};
pub use running::{batch_norm_eval, blend_running};
pub use synced::{batch_norm_train_synced, CrossReplicaSum, SyncedOutput};

/// What follows the normalisation in the same pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    /// The erf form, PyTorch's `nn.GELU()` default.
    Gelu,
}

impl Activation {
    /// The suffix of batch_norm/kernels.cu's entry points with this activation compiled in
    /// (`bn_apply_relu`).
    #[cfg(feature = "cuda")]
    fn kernel_suffix(self) -> &'static str {
        match self {
            Activation::Identity => "identity",
            Activation::Relu => "relu",
            Activation::Gelu => "gelu",
        }
    }

    /// The activation as candle operations.
    fn compose(self, y: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Identity => Ok(y.clone()),
            Activation::Relu => super::residual::relu(y),
            Activation::Gelu => y.gelu_erf(),
        }
    }

    /// What kiln's kernels on `device` fuse of it, and what is left to apply after them.
    fn split_for(self, device: &Device) -> (Activation, Option<Activation>) {
        match (self, device) {
            (Activation::Gelu, Device::Cpu) => (Activation::Identity, Some(Activation::Gelu)),
            _ => (self, None),
        }
    }
}

/// What a training-mode batch norm returns: the output, and the batch's statistics per channel
/// (outside any graph): the mean and the biased variance it normalised with.
pub struct BatchNormOutput {
    pub y: Tensor,
    pub mean: Tensor,
    pub var: Tensor,
}

impl BatchNormOutput {
    /// The output, and the statistics apart (for the running ones).
    pub fn split(self) -> (Tensor, BatchStatistics) {
        let Self { y, mean, var } = self;
        (y, BatchStatistics { mean, var })
    }
}

/// `act((x - mean) / sqrt(var + eps) * gamma + beta)` with the batch's statistics; `x` in
/// `format`.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Activation,
    format: MemoryFormat,
) -> candle_core::Result<BatchNormOutput> {
    if !kernels_take(x, gamma, beta, format) {
        return batch_norm_train_reference(x, gamma, beta, eps, act, format);
    }
    let (fused, after) = act.split_for(x.device());
    let saved = Arc::new(Mutex::new(None));
    let op = BatchNormTrain {
        eps,
        act: fused,
        format,
        saved: Arc::clone(&saved),
    };
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let y = match after {
        Some(act) => act.compose(&y)?,
        None => y,
    };
    with_statistics(y, &saved)
}

/// `y` with the batch's mean and variance that the forward pass kept in `saved`.
fn with_statistics(
    y: Tensor,
    saved: &Mutex<Option<Saved>>,
) -> candle_core::Result<BatchNormOutput> {
    let BatchStatistics { mean, var } = kept_statistics(saved)?;
    Ok(BatchNormOutput { y, mean, var })
}

/// The batch's mean and variance that a forward pass kept in `saved`.
fn kept_statistics(saved: &Mutex<Option<Saved>>) -> candle_core::Result<BatchStatistics> {
    let stats = saved
        .lock()
        .map_err(|_| candle_core::Error::Msg("batch_norm: statistics lost".into()))?
        .clone();
    let Some(stats) = stats else {
        candle_core::bail!("batch_norm: the forward pass kept no statistics");
    };
    Ok(BatchStatistics {
        mean: stats.get(0)?,
        var: stats.get(1)?,
    })
}

/// One batch's statistics per channel (outside any graph): the mean and the biased variance.
pub struct BatchStatistics {
    pub mean: Tensor,
    pub var: Tensor,
}

/// Whether kiln's training kernels take `x` [N, C, H, W] (or channels last) with these
/// parameters: [`ours`] for its data, and f32 parameters.
fn kernels_take(x: &Tensor, gamma: &Tensor, beta: &Tensor, format: MemoryFormat) -> bool {
    let f32_parameters = gamma.dtype() == DType::F32 && beta.dtype() == DType::F32;
    f32_parameters && ours(x.device(), x.dtype(), format) && x.rank() == 4
}

/// Whether kiln's kernels run on `device` for data of type `dtype` in `format`: f32 channels
/// first on the CPU, f32, bf16 and f16 in either format on CUDA.
fn ours(device: &Device, dtype: DType, format: MemoryFormat) -> bool {
    match device {
        Device::Cpu => dtype == DType::F32 && format == MemoryFormat::ChannelsFirst,
        Device::Cuda(_) => {
            cfg!(feature = "cuda") && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        }
        Device::Metal(_) => false,
    }
}

/// The same from candle operations: the reference, and the path for other backends and dtypes.
/// Half-precision data is normalised in f32 and the result rounded back, as kiln's CUDA
/// kernels and PyTorch's autocast do; the activation reads the rounded values ([`as_stored`]).
pub fn batch_norm_train_reference(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Activation,
    format: MemoryFormat,
) -> candle_core::Result<BatchNormOutput> {
    let dtype = x.dtype();
    let x = &x.to_dtype(DType::F32)?;
    let (gamma, beta) = (&gamma.to_dtype(DType::F32)?, &beta.to_dtype(DType::F32)?);
    let c = x.dim(format.channel_dim())?;
    let (h, w) = format.plane_dims();
    let mean = x.mean_keepdim((0, h, w))?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((0, h, w))?;
    let per_channel = |t: &Tensor| t.reshape(format.per_channel(c));
    let y = centred
        .broadcast_div(&(var.clone() + eps)?.sqrt()?)?
        .broadcast_mul(&per_channel(gamma)?)?
        .broadcast_add(&per_channel(beta)?)?;
    let y = act.compose(&as_stored(&y, dtype)?)?;
    Ok(BatchNormOutput {
        y: y.to_dtype(dtype)?,
        mean: mean.flatten_all()?.detach(),
        var: var.flatten_all()?.detach(),
    })
}

/// `y` (f32) rounded to `dtype` and back: the activation reads the normalised values as a
/// separate BatchNorm would have stored them (and PyTorch does), which kiln's fused kernels
/// reproduce; its gradient is rounded the same way on the way back.
fn as_stored(y: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    y.to_dtype(dtype)?.to_dtype(DType::F32)
}

/// What the forward pass keeps for the backward pass and the caller: [5, C] on the device,
/// each channel's mean, biased variance, 1 / sqrt(variance + eps), and the scale and shift the
/// output applied ([`cpu::affine`]; the backward pass recomputes the fused activation's input
/// by them).
type Saved = Tensor;

struct BatchNormTrain {
    eps: f64,
    act: Activation,
    format: MemoryFormat,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl BatchNormTrain {
    fn keep(&self, stats: Tensor) -> candle_core::Result<()> {
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch_norm: statistics lost".into()))? =
            Some(stats);
        Ok(())
    }

    /// The batch's [5, C] figures of `x` on CUDA ([`Saved`]'s rows), for the caller to apply
    /// and then [`keep`](Self::keep).
    #[cfg(feature = "cuda")]
    fn cuda_statistics(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<CudaSlice<f32>> {
        let sizes = kernel_sizes(xl, self.format)?;
        let (_, c, _) = sizes;
        if gl.shape().elem_count() != c || bl.shape().elem_count() != c {
            candle_core::bail!(
                "batch_norm: {} weights for {c} channels",
                gl.shape().elem_count()
            );
        }
        if sizes.0 * sizes.2 == 0 {
            candle_core::bail!("batch_norm: an empty batch has no statistics");
        }
        let eps = self.eps as f32;
        Ok(by_float!(xs.dtype(), T => {
            cuda::stats::<T>(xs, xl, gs, gl, bs, bl, sizes, self.format, eps)?
        }))
    }
}

/// The CUDA kernels' (N, C, H*W) of a 4-D activation in `format`. Channels last is read as N*H*W
/// one-pixel planes, (N*H*W, C, 1): the elementwise kernels' channel index `(i / hw) % c` is then
/// right, and the per-channel sums have kernels of their own.
#[cfg(feature = "cuda")]
fn kernel_sizes(
    layout: &Layout,
    format: MemoryFormat,
) -> candle_core::Result<(usize, usize, usize)> {
    let (n, c, h, w) = format.to_nchw_order(layout.shape().dims4()?);
    Ok(match format {
        MemoryFormat::ChannelsFirst => (n, c, h * w),
        MemoryFormat::ChannelsLast => (n * h * w, c, 1),
    })
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "kiln-batch-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_reads(self.format)?;
        let (n, c, h, w) = xl.shape().dims4()?;
        let (x, gamma, beta) = (
            contiguous_f32(xs, xl, "input")?,
            contiguous_f32(gs, gl, "weight")?,
            contiguous_f32(bs, bl, "bias")?,
        );
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!("batch_norm: {} weights for {c} channels", gamma.len());
        }
        let (hw, count) = (h * w, (n * h * w) as f64);
        if count == 0.0 {
            candle_core::bail!("batch_norm: an empty batch has no statistics");
        }
        let stats: Vec<(f32, f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let sum: f64 = planes(x, ch, c, hw).map(|p| plane_sum(p, |v| v)).sum();
                let mean = sum / count;
                let squares: f64 = planes(x, ch, c, hw)
                    .map(|p| plane_sum(p, |v| (v - mean) * (v - mean)))
                    .sum();
                let var = squares / count;
                (
                    mean as f32,
                    var as f32,
                    (1.0 / (var + self.eps).sqrt()) as f32,
                )
            })
            .collect();
        let relu = cpu_fuses(self.act)?;
        let y = par_collect(x.len(), hw, |plane| {
            let ch = plane % c;
            let (mean, _, inv_std) = stats[ch];
            let (scale, shift) = affine(mean, inv_std, gamma[ch], beta[ch]);
            x[plane * hw..][..hw].iter().map(move |&v| {
                let y = v * scale + shift;
                if relu {
                    y.max(0.0)
                } else {
                    y
                }
            })
        });
        let affines: Vec<(f32, f32)> = (0..c)
            .map(|ch| affine(stats[ch].0, stats[ch].2, gamma[ch], beta[ch]))
            .collect();
        let rows: Vec<f32> = [
            stats.iter().map(|s| s.0).collect::<Vec<_>>(),
            stats.iter().map(|s| s.1).collect(),
            stats.iter().map(|s| s.2).collect(),
            affines.iter().map(|a| a.0).collect(),
            affines.iter().map(|a| a.1).collect(),
        ]
        .concat();
        self.keep(Tensor::from_vec(rows, (5, c), &Device::Cpu)?)?;
        Ok((CpuStorage::F32(y), Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let sizes = kernel_sizes(xl, self.format)?;
        let c = sizes.1;
        let dev = &xs.device;
        let stats = self.cuda_statistics(xs, xl, gs, gl, bs, bl)?;
        let y = by_float!(xs.dtype(), T => {
            let (scale, shift) = cuda::scale_and_shift(&stats, c);
            super::cuda::storage(cuda::apply::<T>(xs, xl, &scale, &shift, sizes, self.act)?, dev)
        });
        self.keep(super::cuda::tensor(stats, dev, (5, c)))?;
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch_norm: statistics lost".into()))?
            .clone();
        let Some(stats) = saved else {
            candle_core::bail!("batch_norm: backward before forward");
        };
        let grad = grad.contiguous()?;
        let (act, format) = (self.act, self.format);
        // [dgamma; dbeta; what the input gradient reads], then the input gradient from them.
        let figures = x.apply_op3_no_bwd(&grad, &stats, &ChannelSums { act, format })?;
        let grad_x = x.apply_op3_no_bwd(&grad, &figures, &InputGrad { act, format })?;
        Ok((Some(grad_x), Some(figures.get(0)?), Some(figures.get(1)?)))
    }
}

/// Per channel, from x, dL/dy and the forward pass's [`Saved`] statistics: [8, C] =
/// dgamma = sum(dy * x_hat); dbeta = sum(dy) (dy through the fused activation); then what
/// [`InputGrad`] reads: mean; inv_std; scale; shift; dbeta / M; dgamma / M (M the values per
/// channel). One tensor, so that the backward pass assembles nothing between its two kernels.
struct ChannelSums {
    act: Activation,
    format: MemoryFormat,
}

impl CustomOp3 for ChannelSums {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-sums"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        fs: &CpuStorage,
        fl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_reads(self.format)?;
        let (_, c, h, w) = xl.shape().dims4()?;
        let hw = h * w;
        let (x, grad, f) = (
            contiguous_f32(xs, xl, "input")?,
            contiguous_f32(gs, gl, "gradient")?,
            contiguous_f32(fs, fl, "statistics")?,
        );
        let m = (x.len() / c.max(1)) as f32;
        let relu = cpu_fuses(self.act)?;
        let sums: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (mean, inv_std) = (f[ch], f[2 * c + ch]);
                let (scale, shift) = (f[3 * c + ch], f[4 * c + ch]);
                let gate = |g: f32, v: f32| gated(relu, g, v, scale, shift);
                let (mut total, mut dot) = (0f64, 0f64);
                for (xp, gp) in planes(x, ch, c, hw).zip(planes(grad, ch, c, hw)) {
                    let (t, d) = plane_grad_sums(xp, gp, f64::from(mean), gate);
                    total += t;
                    dot += d;
                }
                ((dot * f64::from(inv_std)) as f32, total as f32)
            })
            .collect();
        let row = |k: usize| &f[k * c..][..c];
        let out: Vec<f32> = [
            sums.iter().map(|s| s.0).collect::<Vec<_>>(),
            sums.iter().map(|s| s.1).collect(),
            row(0).to_vec(),
            row(2).to_vec(),
            row(3).to_vec(),
            row(4).to_vec(),
            sums.iter().map(|s| s.1 / m).collect(),
            sums.iter().map(|s| s.0 / m).collect(),
        ]
        .concat();
        Ok((CpuStorage::F32(out), Shape::from((8, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        fs: &candle_core::CudaStorage,
        fl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let sizes = kernel_sizes(xl, self.format)?;
        let c = sizes.1;
        let sums = by_float!(xs.dtype(), T => {
            cuda::grad_sums::<T>(xs, xl, gs, gl, fs, fl, sizes, self.format, self.act)?
        });
        Ok((super::cuda::storage(sums, &xs.device), Shape::from((8, c))))
    }
}

/// dL/dx from x, dL/dy and [`ChannelSums`]' figures:
/// scale * (dy - dbeta / M - x_hat * dgamma / M), M the values per channel (dy through the
/// fused activation).
struct InputGrad {
    act: Activation,
    format: MemoryFormat,
}

impl CustomOp3 for InputGrad {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        fs: &CpuStorage,
        fl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_reads(self.format)?;
        let (n, c, h, w) = xl.shape().dims4()?;
        let hw = h * w;
        let (x, grad, f) = (
            contiguous_f32(xs, xl, "input")?,
            contiguous_f32(gs, gl, "gradient")?,
            contiguous_f32(fs, fl, "statistics")?,
        );
        let relu = cpu_fuses(self.act)?;
        let dx = par_collect(x.len(), hw, |plane| {
            let ch = plane % c;
            let (mean, inv_std) = (f[2 * c + ch], f[3 * c + ch]);
            let (scale, shift) = (f[4 * c + ch], f[5 * c + ch]);
            let (mean_dbeta, mean_dgamma) = (f[6 * c + ch], f[7 * c + ch]);
            let (xp, gp) = (&x[plane * hw..][..hw], &grad[plane * hw..][..hw]);
            xp.iter().zip(gp).map(move |(&v, &g)| {
                let g = gated(relu, g, v, scale, shift);
                let x_hat = (v - mean) * inv_std;
                scale * (g - mean_dbeta - x_hat * mean_dgamma)
            })
        });
        Ok((CpuStorage::F32(dx), Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        fs: &candle_core::CudaStorage,
        fl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let sizes = kernel_sizes(xl, self.format)?;
        let dx = by_float!(xs.dtype(), T => super::cuda::storage(
            cuda::input_grad::<T>(xs, xl, gs, gl, fs, fl, sizes, self.act)?,
            &xs.device,
        ));
        Ok((dx, xl.shape().clone()))
    }
}

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod residual_end;
mod running;
mod synced;

#[cfg(test)]
mod tests;
