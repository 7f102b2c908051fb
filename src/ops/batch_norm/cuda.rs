//! Launching the BatchNorm kernels of kernels.cu: bn_stats_partial + bn_stats_finish, bn_apply,
//! bn_add_relu, bn_grad_partial + bn_grad_finish, bn_input_grad, bn_blend_running; those that
//! read data for f32, bf16 and f16 (statistics and parameters f32). The partial sums have
//! channels-last versions (`_nhwc`, `_nhwc8`); the rest read either format.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout};

use super::Activation;
use crate::ops::cuda::{
    eights, int, kernel, kernel_for, output, per_item, per_value, view, view_mut, KernelFloat,
    THREADS,
};
use crate::ops::MemoryFormat;

/// (N, C, H*W); channels last as (N*H*W, C, 1) (see `kernel_sizes`).
type Sizes = (usize, usize, usize);

/// Channels a channels-last partial-sum block, or a finishing block, covers (NHWC_CHANNELS in
/// kernels.cu): one warp's worth, so that a warp reads a run of each row.
const NHWC_CHANNELS: usize = 32;

/// How a partial-sum kernel reads the data: channels first (a block per channel and split),
/// channels last a warp across 32 channels of a row (`_nhwc`), or eight channels a thread in
/// 16-byte loads (`_nhwc8`) where C allows it and the operands are aligned.
#[derive(Clone, Copy, PartialEq)]
enum PartialSums {
    Planes,
    Rows,
    Rows8 { across: usize },
}

impl PartialSums {
    fn of(format: MemoryFormat, c: usize, operands: &[&Layout]) -> Self {
        let across = (c / 8).min(NHWC_CHANNELS);
        let eights = c.is_multiple_of(8)
            && across > 0
            && (c / 8 >= NHWC_CHANNELS || NHWC_CHANNELS.is_multiple_of(across));
        match format {
            MemoryFormat::ChannelsFirst => PartialSums::Planes,
            MemoryFormat::ChannelsLast
                if eights && operands.iter().all(|l| l.start_offset() % 8 == 0) =>
            {
                PartialSums::Rows8 { across }
            }
            MemoryFormat::ChannelsLast => PartialSums::Rows,
        }
    }

    /// The grid over data of `sizes`, and its splits: blocks (channel or channel group, split),
    /// each split a run of planes or rows, enough blocks that every SM streams. The eight-wide
    /// kernel keeps 8 rows a thread in flight (bn_partial_nhwc8): about 256 blocks, two an SM,
    /// and at least 32 rows a thread where there are enough, so that streaming, not the lanes'
    /// final sum, takes its time (more blocks of fewer rows streamed slower when measured).
    fn grid(self, (n, c, _): Sizes) -> (LaunchConfig, usize) {
        let (groups, splits) = match self {
            PartialSums::Planes => (c, splits(n, c)),
            PartialSums::Rows => {
                let groups = c.div_ceil(NHWC_CHANNELS);
                (groups, splits(n, groups))
            }
            PartialSums::Rows8 { across } => {
                let groups = c.div_ceil(8 * across);
                let lanes = THREADS as usize / across;
                (groups, (256 / groups).clamp(1, (n / (32 * lanes)).max(1)))
            }
        };
        (per_channel_split(groups, splits), splits)
    }

    /// The kernel `name` for `T` read this way, with `act` compiled in where given.
    fn kernel<T: KernelFloat>(
        self,
        dev: &candle_core::CudaDevice,
        name: &str,
        act: Option<Activation>,
    ) -> candle_core::Result<candle_core::cuda_backend::cudarc::driver::CudaFunction> {
        let layout = match self {
            PartialSums::Planes => "",
            PartialSums::Rows => "_nhwc",
            PartialSums::Rows8 { .. } => "_nhwc8",
        };
        let act = act.map_or(String::new(), |a| format!("_{}", a.kernel_suffix()));
        kernel_for::<T>(dev, &format!("{name}{layout}{act}"))
    }
}

/// Blocks per channel (or channel group) for the per-channel sums, each over a run of whole
/// planes or rows: enough that every SM has work where the channels are few (ResNet's
/// 64-channel stages), never more than the planes.
fn splits(n: usize, groups: usize) -> usize {
    (1024 / groups.max(1)).clamp(1, n.max(1))
}

/// `splits` blocks for each of `c` channels (or channel groups).
fn per_channel_split(c: usize, splits: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.max(1) as u32, splits as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads of a finishing block (FINISH_THREADS in kernels.cu): 32 lanes of splits per channel.
const FINISH_THREADS: u32 = 1024;

/// A block per group of channels, for adding the splits' partial sums (lanes of each channel
/// over the splits, then the lanes in order).
fn per_channel_group(c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(NHWC_CHANNELS).max(1) as u32, 1, 1),
        block_dim: (FINISH_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether the elementwise kernels may take eight values at a time (`vec8` in kernels.cu): every
/// operand starts at a multiple of 8 elements, and a run of 8 stays in one channel's plane
/// (channels first) or covers 8 channels of one pixel (channels last, `hw` 1).
fn vec8((_, c, hw): Sizes, operands: &[&Layout]) -> bool {
    eights(if hw == 1 { c } else { hw }, operands)
}

/// Blocks of the per-channel elementwise kernels at most: a few resident waves of an H100's or
/// H200's 132 SMs, so that a thread takes several runs of the same channels and loads their
/// figures once (`bn_fixed_channels` in kernels.cu): about four blocks an SM for the forward
/// kernels and three for the input gradient, the counts that streamed fastest when measured
/// against half, double and an unbounded grid.
const WAVE_BLOCKS: u32 = 2048;
const INPUT_GRAD_WAVE_BLOCKS: u32 = 1024;

/// [`per_value`] on at most `cap` blocks.
fn per_value_wave(total: usize, vec8: bool, cap: u32) -> LaunchConfig {
    let mut config = per_value(total, vec8);
    config.grid_dim.0 = config.grid_dim.0.min(cap);
    config
}

/// [5, C]: mean; variance; inv_std; scale; shift (bn_stats_finish).
#[allow(clippy::too_many_arguments)]
pub(super) fn stats<T: KernelFloat>(
    xs: &CudaStorage,
    xl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    (n, c, hw): Sizes,
    format: MemoryFormat,
    eps: f32,
) -> candle_core::Result<CudaSlice<f32>> {
    let dev = &xs.device;
    let (x, gamma, beta) = (
        view::<T>(xs, xl, "input")?,
        view::<f32>(gs, gl, "weight")?,
        view::<f32>(bs, bl, "bias")?,
    );
    let sums = PartialSums::of(format, c, &[xl]);
    let (grid, splits) = sums.grid((n, c, hw));
    let partials = output::<f64>(dev, 2 * c * splits)?;
    let stats = output::<f32>(dev, 5 * c)?;
    let stream = dev.cuda_stream();
    let (n32, c32, hw32, splits32) = (
        int(n, "batch_norm")?,
        int(c, "batch_norm")?,
        int(hw, "batch_norm")?,
        int(splits, "batch_norm")?,
    );
    let func = sums.kernel::<T>(dev, "bn_stats_partial", None)?;
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
        .arg(&gamma)
        .arg(&beta)
        .arg(&c32)
        .arg(&splits32)
        .arg(&count)
        .arg(&eps)
        .arg(&stats);
    // SAFETY: as above; block g reads its channels' partials and writes their five figures.
    unsafe { launch.launch(per_channel_group(c)) }.w()?;
    Ok(stats)
}

/// `act(x * scale + shift)`, the scale and shift [C] each (16-byte aligned where C is a multiple
/// of 8: rows of a [5, C] or [2, C] allocation).
pub(super) fn apply<T: KernelFloat>(
    xs: &CudaStorage,
    xl: &Layout,
    scale: &CudaView<'_, f32>,
    shift: &CudaView<'_, f32>,
    (n, c, hw): Sizes,
    act: Activation,
) -> candle_core::Result<CudaSlice<T>> {
    let dev = &xs.device;
    let x = view::<T>(xs, xl, "input")?;
    if scale.len() != c || shift.len() != c {
        candle_core::bail!("batch_norm: {} scales for {c} channels", scale.len());
    }
    let total = n * c * hw;
    let y = output::<T>(dev, total)?;
    let func = kernel_for::<T>(dev, &format!("bn_apply_{}", act.kernel_suffix()))?;
    let stream = dev.cuda_stream();
    let wide = vec8((n, c, hw), &[xl]);
    let (c32, hw32, wide32) = (
        int(c, "batch_norm")?,
        int(hw, "batch_norm")?,
        i32::from(wide),
    );
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&x)
        .arg(scale)
        .arg(shift)
        .arg(&c32)
        .arg(&hw32)
        .arg(&total)
        .arg(&wide32)
        .arg(&y);
    // SAFETY: as above; a grid-stride loop writes all `total` outputs (eight at a time where
    // `vec8` allows it).
    unsafe { launch.launch(per_value_wave(total, wide, WAVE_BLOCKS)) }.w()?;
    Ok(y)
}

/// A channel's scale and shift, [C] each.
pub(super) type ScaleShift<'a> = (CudaView<'a, f32>, CudaView<'a, f32>);

/// The scale and shift rows (3 and 4) of the [5, C] figures `stats` that bn_stats_finish writes.
pub(super) fn scale_and_shift(stats: &CudaSlice<f32>, c: usize) -> ScaleShift<'_> {
    (stats.slice(3 * c..4 * c), stats.slice(4 * c..))
}

/// A residual block's end, `relu(x * scale + shift + r)`, the shortcut `r` normalised too by
/// `shortcut`'s scale and shift where given, in one pass (`bn_add_relu`); each scale and shift
/// [C], aligned as [`apply`]'s.
pub(super) fn apply_add_relu<T: KernelFloat>(
    xs: &CudaStorage,
    xl: &Layout,
    main: &ScaleShift<'_>,
    rs: &CudaStorage,
    rl: &Layout,
    shortcut: Option<&ScaleShift<'_>>,
    (n, c, hw): Sizes,
) -> candle_core::Result<CudaSlice<T>> {
    let dev = &xs.device;
    let x = view::<T>(xs, xl, "input")?;
    let r = view::<T>(rs, rl, "shortcut")?;
    let total = n * c * hw;
    if x.len() != total || r.len() != total {
        candle_core::bail!(
            "batch_norm_add_relu: {} and {} values, not {total}",
            x.len(),
            r.len()
        );
    }
    let ((scale, shift), (r_scale, r_shift)) = (main, shortcut.unwrap_or(main));
    if [scale, shift, r_scale, r_shift]
        .iter()
        .any(|f| f.len() != c)
    {
        candle_core::bail!("batch_norm_add_relu: a scale or shift is not [{c}]");
    }
    let y = output::<T>(dev, total)?;
    let func = kernel_for::<T>(dev, "bn_add_relu")?;
    let stream = dev.cuda_stream();
    let wide = vec8((n, c, hw), &[xl, rl]);
    let (normalised, c32, hw32, wide32) = (
        i32::from(shortcut.is_some()),
        int(c, "batch_norm")?,
        int(hw, "batch_norm")?,
        i32::from(wide),
    );
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&x)
        .arg(scale)
        .arg(shift)
        .arg(&r)
        .arg(&normalised)
        .arg(r_scale)
        .arg(r_shift)
        .arg(&c32)
        .arg(&hw32)
        .arg(&total)
        .arg(&wide32)
        .arg(&y);
    // SAFETY: as above; a grid-stride loop reads `total` values of x and r and writes all
    // `total` outputs (eight at a time where `vec8` allows it). Without a normalised shortcut
    // the kernel reads r_scale and r_shift not at all.
    unsafe { launch.launch(per_value_wave(total, wide, WAVE_BLOCKS)) }.w()?;
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
    act: Activation,
) -> candle_core::Result<CudaSlice<f32>> {
    let dev = &xs.device;
    let (x, grad, stats) = (
        view::<T>(xs, xl, "input")?,
        view::<T>(gs, gl, "gradient")?,
        view::<f32>(fs, fl, "statistics")?,
    );
    let reads = PartialSums::of(format, c, &[xl, gl]);
    let (grid, splits) = reads.grid((n, c, hw));
    let partials = output::<f64>(dev, 2 * c * splits)?;
    let figures = output::<f32>(dev, 8 * c)?;
    let stream = dev.cuda_stream();
    let (n32, c32, hw32, splits32) = (
        int(n, "batch_norm")?,
        int(c, "batch_norm")?,
        int(hw, "batch_norm")?,
        int(splits, "batch_norm")?,
    );
    let func = reads.kernel::<T>(dev, "bn_grad_partial", Some(act))?;
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&x)
        .arg(&grad)
        .arg(&stats)
        .arg(&n32)
        .arg(&c32)
        .arg(&hw32)
        .arg(&partials);
    // SAFETY: as in `stats`: block (ch, s) writes its channels' two partial sums of split s.
    unsafe { launch.launch(grid) }.w()?;
    let func = kernel(dev, "bn_grad_finish")?;
    let count = (n * hw) as f32;
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&partials)
        .arg(&stats)
        .arg(&c32)
        .arg(&splits32)
        .arg(&count)
        .arg(&figures);
    // SAFETY: as in `stats`: block g writes its channels' eight figures.
    unsafe { launch.launch(per_channel_group(c)) }.w()?;
    Ok(figures)
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
    act: Activation,
) -> candle_core::Result<CudaSlice<T>> {
    let dev = &xs.device;
    let (x, grad, figures) = (
        view::<T>(xs, xl, "input")?,
        view::<T>(gs, gl, "gradient")?,
        view::<f32>(fs, fl, "statistics")?,
    );
    let total = n * c * hw;
    let dx = output::<T>(dev, total)?;
    let func = kernel_for::<T>(dev, &format!("bn_input_grad_{}", act.kernel_suffix()))?;
    let stream = dev.cuda_stream();
    let (c32, hw32) = (int(c, "batch_norm")?, int(hw, "batch_norm")?);
    let wide = vec8((n, c, hw), &[xl, gl, fl]);
    let wide32 = i32::from(wide);
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&x)
        .arg(&grad)
        .arg(&figures)
        .arg(&c32)
        .arg(&hw32)
        .arg(&total)
        .arg(&wide32)
        .arg(&dx);
    // SAFETY: as in `apply`.
    unsafe { launch.launch(per_value_wave(total, wide, INPUT_GRAD_WAVE_BLOCKS)) }.w()?;
    Ok(dx)
}

/// `running = running * keep + batch * take`, in place (f32, `bn_blend_running`).
pub(super) fn blend_running(
    rs: &mut CudaStorage,
    rl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    keep: f32,
    take: f32,
) -> candle_core::Result<()> {
    let dev = rs.device.clone();
    let batch = view::<f32>(bs, bl, "batch statistic")?;
    let total = rl.shape().elem_count();
    if batch.len() != total {
        candle_core::bail!(
            "batch_norm: {} batch statistics for {total} running ones",
            batch.len()
        );
    }
    let mut running = view_mut::<f32>(rs, rl, "running statistic")?;
    let func = kernel(&dev, "bn_blend_running")?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&func);
    launch
        .arg(&mut running)
        .arg(&batch)
        .arg(&total)
        .arg(&keep)
        .arg(&take);
    // SAFETY: both hold `total` contiguous f32 values (checked above); a grid-stride loop
    // updates each running value once.
    unsafe { launch.launch(per_item(total)) }.w()?;
    Ok(())
}
