//! Launching the BatchNorm, add-ReLU and ReLU-gate kernels of kernels.cu: bn_stats_partial +
//! bn_stats_finish, bn_apply, bn_grad_partial + bn_grad_finish, bn_input_grad, add_relu_fwd,
//! relu_gate; those that read data for f32 and bf16 (statistics and parameters f32). The
//! partial sums have a channels-last version each (`_nhwc`); the rest read either format.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout};

use crate::ops::cuda::{int, kernel, kernel_for, output, per_item, view, KernelFloat, THREADS};
use crate::ops::MemoryFormat;

/// (N, C, H*W); channels last as (N*H*W, C, 1) (see `kernel_sizes`).
type Sizes = (usize, usize, usize);

/// Channels a channels-last partial-sum block covers (NHWC_CHANNELS in kernels.cu): one warp's
/// worth, so that a warp reads a run of each row.
const NHWC_CHANNELS: usize = 32;

/// The grid of a partial-sum kernel over data of `sizes` in `format`, and its splits: blocks
/// (channel or channel group, split), each split a run of planes (channels first) or rows
/// (channels last), enough blocks that every SM streams.
fn partial_grid(format: MemoryFormat, (n, c, _): Sizes) -> (LaunchConfig, usize) {
    let groups = match format {
        MemoryFormat::ChannelsFirst => c,
        MemoryFormat::ChannelsLast => c.div_ceil(NHWC_CHANNELS),
    };
    let splits = splits(n, groups);
    (per_channel_split(groups, splits), splits)
}

/// The partial-sum kernel `name` for `T` in `format`.
fn partial_kernel<T: KernelFloat>(
    dev: &candle_core::CudaDevice,
    name: &str,
    format: MemoryFormat,
) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
    match format {
        MemoryFormat::ChannelsFirst => kernel_for::<T>(dev, name),
        MemoryFormat::ChannelsLast => kernel_for::<T>(dev, &format!("{name}_nhwc")),
    }
}

/// Blocks per channel (or channel group) for the per-channel sums, each over a run of whole
/// planes or rows: enough that every SM has work where the channels are few (ResNet's
/// 64-channel stages), never more than the planes.
fn splits(n: usize, groups: usize) -> usize {
    (2048 / groups.max(1)).clamp(1, n.max(1))
}

/// `splits` blocks for each of `c` channels (or channel groups).
fn per_channel_split(c: usize, splits: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.max(1) as u32, splits as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per channel, for adding the splits' partial sums.
fn per_channel_thread(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(THREADS as usize).max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn stats<T: KernelFloat>(
    xs: &CudaStorage,
    xl: &Layout,
    (n, c, hw): Sizes,
    format: MemoryFormat,
    eps: f32,
) -> candle_core::Result<CudaSlice<f32>> {
    let dev = &xs.device;
    let x = view::<T>(xs, xl, "input")?;
    let (grid, splits) = partial_grid(format, (n, c, hw));
    let partials = output::<f64>(dev, 2 * c * splits)?;
    let stats = output::<f32>(dev, 3 * c)?;
    let stream = dev.cuda_stream();
    let (n32, c32, hw32, splits32) = (
        int(n, "batch_norm")?,
        int(c, "batch_norm")?,
        int(hw, "batch_norm")?,
        int(splits, "batch_norm")?,
    );
    let func = partial_kernel::<T>(dev, "bn_stats_partial", format)?;
    let mut launch = stream.launch_builder(&func);
    launch.arg(&x).arg(&n32).arg(&c32).arg(&hw32).arg(&partials);
    // SAFETY: the arguments match the kernel's signature; block (ch, s) writes its channels'
    // two partial sums of split s, and the grid has one block per channel (group) and split.
    unsafe { launch.launch(grid) }.w()?;
    let func = kernel(dev, "bn_stats_finish")?;
    let count = (n * hw) as f64;
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&partials)
        .arg(&c32)
        .arg(&splits32)
        .arg(&count)
        .arg(&eps)
        .arg(&stats);
    // SAFETY: as above; thread ch reads its channel's partials and writes its three figures.
    unsafe { launch.launch(per_channel_thread(c)) }.w()?;
    Ok(stats)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn apply<T: KernelFloat>(
    xs: &CudaStorage,
    xl: &Layout,
    stats: &CudaSlice<f32>,
    gs: &CudaStorage,
    gl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    (n, c, hw): Sizes,
    relu: bool,
) -> candle_core::Result<CudaSlice<T>> {
    let dev = &xs.device;
    let (x, gamma, beta) = (
        view::<T>(xs, xl, "input")?,
        view::<f32>(gs, gl, "weight")?,
        view::<f32>(bs, bl, "bias")?,
    );
    let total = n * c * hw;
    let y = output::<T>(dev, total)?;
    let func = kernel_for::<T>(dev, "bn_apply")?;
    let stream = dev.cuda_stream();
    let (c32, hw32, relu) = (
        int(c, "batch_norm")?,
        int(hw, "batch_norm")?,
        i32::from(relu),
    );
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&x)
        .arg(stats)
        .arg(&gamma)
        .arg(&beta)
        .arg(&c32)
        .arg(&hw32)
        .arg(&total)
        .arg(&relu)
        .arg(&y);
    // SAFETY: as above; a grid-stride loop writes all `total` outputs.
    unsafe { launch.launch(per_item(total)) }.w()?;
    Ok(y)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn grad_sums<T: KernelFloat>(
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    fs: &CudaStorage,
    fl: &Layout,
    (n, c, hw): Sizes,
    format: MemoryFormat,
    relu: bool,
) -> candle_core::Result<CudaSlice<f32>> {
    let dev = &xs.device;
    let (x, grad, figures) = (
        view::<T>(xs, xl, "input")?,
        view::<T>(gs, gl, "gradient")?,
        view::<f32>(fs, fl, "statistics")?,
    );
    let (grid, splits) = partial_grid(format, (n, c, hw));
    let partials = output::<f64>(dev, 2 * c * splits)?;
    let sums = output::<f32>(dev, 2 * c)?;
    let stream = dev.cuda_stream();
    let (n32, c32, hw32, splits32) = (
        int(n, "batch_norm")?,
        int(c, "batch_norm")?,
        int(hw, "batch_norm")?,
        int(splits, "batch_norm")?,
    );
    let relu = i32::from(relu);
    let func = partial_kernel::<T>(dev, "bn_grad_partial", format)?;
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&x)
        .arg(&grad)
        .arg(&figures)
        .arg(&n32)
        .arg(&c32)
        .arg(&hw32)
        .arg(&relu)
        .arg(&partials);
    // SAFETY: as in `stats`: block (ch, s) writes its channels' two partial sums of split s.
    unsafe { launch.launch(grid) }.w()?;
    let func = kernel(dev, "bn_grad_finish")?;
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&partials)
        .arg(&figures)
        .arg(&c32)
        .arg(&splits32)
        .arg(&sums);
    // SAFETY: as in `stats`: thread ch writes its channel's two sums.
    unsafe { launch.launch(per_channel_thread(c)) }.w()?;
    Ok(sums)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn input_grad<T: KernelFloat>(
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    fs: &CudaStorage,
    fl: &Layout,
    (n, c, hw): Sizes,
    relu: bool,
) -> candle_core::Result<CudaSlice<T>> {
    let dev = &xs.device;
    let (x, grad, figures) = (
        view::<T>(xs, xl, "input")?,
        view::<T>(gs, gl, "gradient")?,
        view::<f32>(fs, fl, "statistics")?,
    );
    let total = n * c * hw;
    let dx = output::<T>(dev, total)?;
    let func = kernel_for::<T>(dev, "bn_input_grad")?;
    let stream = dev.cuda_stream();
    let (n32, c32, hw32) = (
        int(n, "batch_norm")?,
        int(c, "batch_norm")?,
        int(hw, "batch_norm")?,
    );
    let relu = i32::from(relu);
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&x)
        .arg(&grad)
        .arg(&figures)
        .arg(&n32)
        .arg(&c32)
        .arg(&hw32)
        .arg(&total)
        .arg(&relu)
        .arg(&dx);
    // SAFETY: as in `apply`.
    unsafe { launch.launch(per_item(total)) }.w()?;
    Ok(dx)
}

/// A kernel of two same-sized inputs and one output, all `T`: `add_relu_fwd` or
/// `relu_gate`.
pub(super) fn elementwise<T: KernelFloat>(
    name: &str,
    a_s: &CudaStorage,
    al: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
) -> candle_core::Result<CudaSlice<T>> {
    let dev = &a_s.device;
    let (a, b) = (view::<T>(a_s, al, "lhs")?, view::<T>(bs, bl, "rhs")?);
    let total = al.shape().elem_count();
    let out = output::<T>(dev, total)?;
    let func = kernel_for::<T>(dev, name)?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch.arg(&a).arg(&b).arg(&total).arg(&out);
    // SAFETY: both inputs hold `total` contiguous `T` values (same shapes, checked by the
    // callers); a grid-stride loop writes every output.
    unsafe { launch.launch(per_item(total)) }.w()?;
    Ok(out)
}
