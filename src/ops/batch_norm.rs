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

use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, InplaceOp2, Layout, Shape, Tensor, Var,
};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda::by_float;
use super::{contiguous_f32, contiguous_f32_mut, par_collect, MemoryFormat};
#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;

/// What follows the normalisation in the same pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    /// The erf form, PyTorch's `nn.GELU()` default.
    Gelu,
}

impl Activation {
    /// `act` in kernels.cu (ACT_IDENTITY, ACT_RELU, ACT_GELU).
    #[cfg(feature = "cuda")]
    fn code(self) -> i32 {
        match self {
            Activation::Identity => 0,
            Activation::Relu => 1,
            Activation::Gelu => 2,
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

/// A batch norm's training inputs: the data and the layer's scale, shift and epsilon.
#[derive(Clone, Copy)]
pub struct NormInputs<'a> {
    pub x: &'a Tensor,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub eps: f64,
}

/// What joins a residual block's end: the block's input as it is, or a downsampling
/// convolution's output through its own batch norm.
#[derive(Clone, Copy)]
pub enum Shortcut<'a> {
    Identity(&'a Tensor),
    Normalised(NormInputs<'a>),
}

/// One batch's statistics per channel (outside any graph): the mean and the biased variance.
pub struct BatchStatistics {
    pub mean: Tensor,
    pub var: Tensor,
}

/// What a residual block's end returns: its output, and the statistics of its batch norm and
/// of the shortcut's, where it has one.
pub struct ResidualEndOutput {
    pub y: Tensor,
    pub main: BatchStatistics,
    pub shortcut: Option<BatchStatistics>,
}

/// `relu(batch_norm(main) + shortcut)`, a residual block's end, as one node of the graph: the
/// normalised values (the shortcut's too, where it is normalised) live only inside it, so the
/// graph does not hold them until the backward pass (PyTorch does not hold the main ones
/// either: its ReLU overwrites the sum in place). Bit for bit [`batch_norm_train`]s without an
/// activation then [`add_relu`](super::add_relu), which it runs inside (the same kernels), and
/// which it is where kiln's kernels do not run.
pub fn batch_norm_add_relu_train(
    main: NormInputs,
    shortcut: Shortcut,
    format: MemoryFormat,
) -> candle_core::Result<ResidualEndOutput> {
    let joined = match shortcut {
        Shortcut::Identity(r) => r,
        Shortcut::Normalised(n) => n.x,
    };
    let matching = joined.dtype() == main.x.dtype() && joined.shape() == main.x.shape();
    let take = |n: &NormInputs| kernels_take(n.x, n.gamma, n.beta, format);
    let shortcut_taken = match &shortcut {
        Shortcut::Identity(_) => true,
        Shortcut::Normalised(n) => take(n),
    };
    if !(matching && take(&main) && shortcut_taken) {
        return residual_end_composed(main, shortcut, format);
    }
    let norm = |n: &NormInputs| BatchNormTrain {
        eps: n.eps,
        act: Activation::Identity,
        format,
        saved: Arc::new(Mutex::new(None)),
    };
    let op = BatchNormAddRelu {
        norm: norm(&main),
        shortcut_norm: match &shortcut {
            Shortcut::Identity(_) => None,
            Shortcut::Normalised(n) => Some(norm(n)),
        },
    };
    // A custom op takes three tensors: the scales and shifts travel as the rows of one.
    let parameters = match &shortcut {
        Shortcut::Identity(_) => Tensor::stack(&[main.gamma, main.beta], 0)?,
        Shortcut::Normalised(n) => Tensor::stack(&[main.gamma, main.beta, n.gamma, n.beta], 0)?,
    };
    let (main_saved, shortcut_saved) = (
        Arc::clone(&op.norm.saved),
        op.shortcut_norm.as_ref().map(|n| Arc::clone(&n.saved)),
    );
    let y = main
        .x
        .contiguous()?
        .apply_op3(&parameters, &joined.contiguous()?, op)?;
    Ok(ResidualEndOutput {
        y,
        main: kept_statistics(&main_saved)?,
        shortcut: shortcut_saved.map(|s| kept_statistics(&s)).transpose()?,
    })
}

/// [`batch_norm_add_relu_train`] from its parts, [`batch_norm_train`]s and
/// [`add_relu`](super::add_relu): where the fused node does not run, and what the tests hold it
/// to.
pub fn residual_end_composed(
    main: NormInputs,
    shortcut: Shortcut,
    format: MemoryFormat,
) -> candle_core::Result<ResidualEndOutput> {
    let train =
        |n: NormInputs| batch_norm_train(n.x, n.gamma, n.beta, n.eps, Activation::Identity, format);
    let (joined, shortcut) = match shortcut {
        Shortcut::Identity(r) => (r.clone(), None),
        Shortcut::Normalised(n) => {
            let (y, statistics) = train(n)?.split();
            (y, Some(statistics))
        }
    };
    let (y, main) = train(main)?.split();
    Ok(ResidualEndOutput {
        y: super::add_relu(&y, &joined)?,
        main,
        shortcut,
    })
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

/// `y` (f32) rounded to `dtype` and back: the activation reads the normalised values as a
/// separate BatchNorm would have stored them (and PyTorch does), which kiln's fused kernels
/// reproduce; its gradient is rounded the same way on the way back.
fn as_stored(y: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    y.to_dtype(dtype)?.to_dtype(DType::F32)
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

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln-batch-norm-eval: CUDA tensors only (the CPU composes it)")
    }

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
        let affine = super::cuda::view::<f32>(as_, al, "scale and shift")?;
        if affine.len() != 2 * c {
            candle_core::bail!(
                "batch_norm: {} scales and shifts for {c} channels",
                affine.len()
            );
        }
        let (scale, shift) = (affine.slice(..c), affine.slice(c..));
        let y = by_float!(xs.dtype(), T => super::cuda::storage(
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

/// What the forward pass keeps for the backward pass and the caller: [5, C] on the device,
/// each channel's mean, biased variance, 1 / sqrt(variance + eps), and the scale and shift the
/// output applied ([`affine`]; the backward pass recomputes the fused activation's input by them).
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
}

/// Whether a CPU kernel's fused activation is ReLU: GELU is left to candle there
/// ([`Activation::split_for`]).
fn cpu_fuses(act: Activation) -> candle_core::Result<bool> {
    match act {
        Activation::Identity => Ok(false),
        Activation::Relu => Ok(true),
        Activation::Gelu => candle_core::bail!("batch_norm: kiln's CPU kernels fuse ReLU only"),
    }
}

/// kiln's CPU kernels read channels-first data only (`ours` sends channels last elsewhere).
fn cpu_reads(format: MemoryFormat) -> candle_core::Result<()> {
    if format == MemoryFormat::ChannelsLast {
        candle_core::bail!("batch_norm: kiln's CPU kernels read channels-first data only");
    }
    Ok(())
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

/// The planes of channel `c` in an [N, C, HW] buffer.
fn planes(data: &[f32], c: usize, channels: usize, hw: usize) -> impl Iterator<Item = &[f32]> {
    data.chunks_exact(hw.max(1)).skip(c).step_by(channels)
}

/// Independent f64 accumulators per sum, so the compiler can keep them in vector registers
/// instead of waiting on one chain of adds.
const LANES: usize = 8;

/// Sums in f64, as PyTorch's CPU kernel does: a channel's gradient sums are small differences
/// of large terms, and f32 partial sums were seen to move a ResNet-50's step by 1e-3.
fn sum_f64(values: impl Iterator<Item = [f64; LANES]>) -> f64 {
    let mut lanes = [0f64; LANES];
    for chunk in values {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum()
}

/// A plane's sum of `f(value)`, in f64 lanes.
fn plane_sum(plane: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let chunks = plane.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(f64::from(v))).sum();
    sum_f64(chunks.map(|c| std::array::from_fn(|l| f(f64::from(c[l]))))) + tail
}

/// Over a plane of inputs `x` and upstream gradients `g` (gated by the fused ReLU as
/// [`gated`] says): (sum of g, sum of g * (x - mean)), in f64 lanes.
fn plane_grad_sums(x: &[f32], g: &[f32], mean: f64, gate: impl Fn(f32, f32) -> f32) -> (f64, f64) {
    let pairs = x.chunks_exact(LANES).zip(g.chunks_exact(LANES));
    let (mut total, mut dot) = ([0f64; LANES], [0f64; LANES]);
    for (xc, gc) in pairs {
        // The gate first, for the whole chunk: a branch per value mispredicts half the time.
        let gs: [f32; LANES] = std::array::from_fn(|l| gate(gc[l], xc[l]));
        for l in 0..LANES {
            let g = f64::from(gs[l]);
            total[l] += g;
            dot[l] += g * (f64::from(xc[l]) - mean);
        }
    }
    let whole = x.len() / LANES * LANES;
    let (mut t, mut d) = (total.iter().sum::<f64>(), dot.iter().sum::<f64>());
    for (&v, &g) in x[whole..].iter().zip(&g[whole..]) {
        let g = f64::from(gate(g, v));
        t += g;
        d += g * (f64::from(v) - mean);
    }
    (t, d)
}

/// One channel's scale and shift (gamma * inv_std, beta - mean * scale): the output is
/// `x * scale + shift`, and with ReLU fused it passed where that is positive.
fn affine(mean: f32, inv_std: f32, gamma: f32, beta: f32) -> (f32, f32) {
    let scale = inv_std * gamma;
    (scale, beta - mean * scale)
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
        let dev = &xs.device;
        let y = by_float!(xs.dtype(), T => {
            let stats = cuda::stats::<T>(xs, xl, gs, gl, bs, bl, sizes, self.format, self.eps as f32)?;
            let (scale, shift) = (stats.slice(3 * c..4 * c), stats.slice(4 * c..));
            let y = cuda::apply::<T>(xs, xl, &scale, &shift, sizes, self.act)?;
            self.keep(super::cuda::tensor(stats, dev, (5, c)))?;
            super::cuda::storage(y, dev)
        });
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

/// [`batch_norm_add_relu_train`]'s node: arguments x, the parameters' rows [gamma; beta] (and
/// the shortcut's [gamma; beta] where it is normalised) and what joins.
struct BatchNormAddRelu {
    norm: BatchNormTrain,
    shortcut_norm: Option<BatchNormTrain>,
}

impl BatchNormAddRelu {
    /// Layouts of the parameters' rows `first` and `first + 1`: a batch norm's gamma and beta.
    fn rows(&self, pl: &Layout, first: usize) -> candle_core::Result<(Layout, Layout)> {
        let (rows, c) = pl.shape().dims2()?;
        let want = if self.shortcut_norm.is_some() { 4 } else { 2 };
        if rows != want || !pl.is_contiguous() {
            candle_core::bail!("batch_norm_add_relu: parameters must be a contiguous [{want}, C]");
        }
        let at = pl.start_offset() + first * c;
        Ok((
            Layout::contiguous_with_offset(c, at),
            Layout::contiguous_with_offset(c, at + c),
        ))
    }

    /// The forward pass on one backend, given its storage `S`: `normalise(norm, x, layout,
    /// gamma's layout, beta's layout)` runs a [`BatchNormTrain`]'s forward pass there (reading
    /// the parameters' storage), `add_relu` [`AddRelu`](super::residual::AddRelu)'s.
    fn forward<S>(
        &self,
        (xs, xl, pl, rs, rl): (&S, &Layout, &Layout, &S, &Layout),
        normalise: impl Fn(&BatchNormTrain, &S, &Layout, &Layout, &Layout) -> Forward<S>,
        add_relu: impl Fn(&S, &Layout, &S, &Layout) -> Forward<S>,
    ) -> Forward<S> {
        let (gl, bl) = self.rows(pl, 0)?;
        let (normalised, shape) = normalise(&self.norm, xs, xl, &gl, &bl)?;
        let joined = match &self.shortcut_norm {
            None => None,
            Some(norm) => {
                let (gl, bl) = self.rows(pl, 2)?;
                Some(normalise(norm, rs, rl, &gl, &bl)?)
            }
        };
        let (rs, rl) = match &joined {
            None => (rs, rl.clone()),
            Some((storage, shape)) => (storage, Layout::contiguous(shape)),
        };
        add_relu(&normalised, &Layout::contiguous(shape), rs, &rl)
    }
}

/// A custom op's forward result on a backend whose storage is `S`.
type Forward<S> = candle_core::Result<(S, Shape)>;

impl CustomOp3 for BatchNormAddRelu {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-add-relu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(
            (xs, xl, pl, rs, rl),
            |norm, s, l, gl, bl| norm.cpu_fwd(s, l, ps, gl, ps, bl),
            |a, al, b, bl| super::residual::AddRelu.cpu_fwd(a, al, b, bl),
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.forward(
            (xs, xl, pl, rs, rl),
            |norm, s, l, gl, bl| norm.cuda_fwd(s, l, ps, gl, ps, bl),
            |a, al, b, bl| super::residual::AddRelu.cuda_fwd(a, al, b, bl),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        _: &Tensor,
        joined: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gated = super::residual::relu_gate(grad, y)?;
        // BatchNormTrain's backward pass reads only its input and the gradient.
        let norm_grads = |norm: &BatchNormTrain, input: &Tensor| {
            let (grad_input, grad_gamma, grad_beta) = norm.bwd(input, input, input, y, &gated)?;
            match (grad_input, grad_gamma, grad_beta) {
                (Some(i), Some(g), Some(b)) => Ok((i, g, b)),
                _ => candle_core::bail!("batch_norm_add_relu: a gradient is missing"),
            }
        };
        let (grad_x, grad_gamma, grad_beta) = norm_grads(&self.norm, x)?;
        let (grad_parameters, grad_joined) = match &self.shortcut_norm {
            None => (Tensor::stack(&[grad_gamma, grad_beta], 0)?, gated.clone()),
            Some(norm) => {
                let (grad_r, grad_gamma_r, grad_beta_r) = norm_grads(norm, joined)?;
                let rows = [grad_gamma, grad_beta, grad_gamma_r, grad_beta_r];
                (Tensor::stack(&rows, 0)?, grad_r)
            }
        };
        Ok((Some(grad_x), Some(grad_parameters), Some(grad_joined)))
    }
}

/// The upstream gradient `g` at value `v` of a channel with this scale and shift: through
/// ReLU when fused, which passed where `v * scale + shift`, as the forward pass computed it,
/// is positive.
fn gated(relu: bool, g: f32, v: f32, scale: f32, shift: f32) -> f32 {
    // A multiply by 0 or 1 rather than a branch: the pattern is random.
    let passed = !relu || v * scale + shift > 0.0;
    g * f32::from(u8::from(passed))
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

#[cfg(feature = "cuda")]
mod cuda;

#[cfg(test)]
mod tests;
