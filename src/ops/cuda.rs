//! Launching kiln's CUDA kernels (src/ops/kernels.cu, compiled to PTX by build.rs) from candle
//! custom ops: loading, argument views, output buffers, launch shapes.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DeviceRepr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Shape, Storage, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kiln.ptx"));

/// Tensors per launch of a group kernel (GROUP in optim/kernels.cu: `AdamGroup`, `SgdGroup`).
pub const GROUP: usize = 8;

/// Threads per block; the kernels' block reductions assume it (BLOCK in common.cuh).
pub const THREADS: u32 = 256;

/// A data type kiln's kernels come in for both f32 and bf16 (BatchNorm, add-ReLU, the ReLU
/// gate): the entry point's name ends in `_` and the suffix.
pub trait KernelFloat: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}

impl KernelFloat for f32 {
    const SUFFIX: &'static str = "f32";
}

impl KernelFloat for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

impl KernelFloat for half::f16 {
    const SUFFIX: &'static str = "f16";
}

/// `name_f32` or `name_bf16`, for data of type `T`.
pub fn kernel_for<T: KernelFloat>(
    device: &CudaDevice,
    name: &str,
) -> candle_core::Result<CudaFunction> {
    kernel(device, &format!("{name}_{}", T::SUFFIX))
}

/// Evaluates `$body` with the type alias `$t` naming the Rust type of `$dtype` (f32, bf16, f16),
/// and fails with a clear error on any other data type.
macro_rules! by_float {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => {
                candle_core::bail!("kiln's CUDA kernels take f32, bf16 or f16 data, not {other:?}")
            }
        }
    };
}
pub(crate) use by_float;

/// A size as the kernels' `int` (`what` names it in the error).
pub fn int(v: usize, what: &str) -> candle_core::Result<i32> {
    i32::try_from(v).map_err(|_| {
        candle_core::Error::Msg(format!("{what}: {v} is too large for the CUDA kernels"))
    })
}

/// A kernel of kiln's module, loaded on first use (candle caches the module per device).
pub fn kernel(device: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    Ok(device
        .get_or_load_custom_func(name, "kiln", PTX)?
        .into_cuda_function())
}

/// Loads kiln's module and the candle modules a training step runs (a module is loaded, its PTX
/// compiled or fetched from the driver's cache, on its first kernel).
pub fn prepare(device: &CudaDevice) -> candle_core::Result<()> {
    use candle_core::cuda_backend::kernels;
    kernel(device, "bn_blend_running")?;
    for (name, module) in [
        ("affine_f32", &kernels::AFFINE),
        ("badd_f32", &kernels::BINARY),
        ("cast_f32_bf16", &kernels::CAST),
        ("fill_f32", &kernels::FILL),
        ("is_u32_f32", &kernels::INDEXING),
        ("fast_sum_f32", &kernels::REDUCE),
        ("where_u8_f32", &kernels::TERNARY),
        ("ucopy_f32", &kernels::UNARY),
    ] {
        device.get_or_load_func(name, module)?;
    }
    Ok(())
}

/// The elements of a contiguous tensor argument (`what` names it in the error).
pub fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("kiln op: {what} must be contiguous");
    };
    Ok(storage.as_cuda_slice::<T>()?.slice(start..end))
}

/// The same, for the tensor an in-place op writes.
pub fn view_mut<'a, T: CudaDType>(
    storage: &'a mut CudaStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<CudaViewMut<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("kiln op: {what} must be contiguous");
    };
    Ok(storage.as_cuda_slice_mut::<T>()?.slice_mut(start..end))
}

/// An uninitialised buffer of `len` elements, which the kernel about to run fills entirely.
pub fn output<T: CudaDType + DeviceRepr>(
    device: &CudaDevice,
    len: usize,
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: callers launch a kernel that writes every element before anything reads them.
    unsafe { device.alloc::<T>(len.max(1)) }
}

pub fn storage<T: CudaDType>(slice: CudaSlice<T>, device: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(slice, device.clone())
}

/// A tensor (outside any graph) over a buffer a kernel wrote, such as the pool's winners.
pub fn tensor<T: CudaDType>(
    slice: CudaSlice<T>,
    device: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(storage(slice, device)),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    )
}

/// Enough blocks of [`THREADS`] for one thread per item (grid-stride loops take any excess).
pub fn per_item(items: usize) -> LaunchConfig {
    let blocks = items.div_ceil(THREADS as usize).clamp(1, 65_535);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Whether a kernel may take eight values a thread in 16-byte accesses (`vec8` in the kernels):
/// `run` (the values, or the channels or plane that each eight stay within) a multiple of 8, and
/// every operand starting at a multiple of 8 values.
pub fn eights(run: usize, operands: &[&Layout]) -> bool {
    run.is_multiple_of(8) && operands.iter().all(|l| l.start_offset().is_multiple_of(8))
}

/// The launch for `total` values, eight a thread where `wide`.
pub fn per_value(total: usize, wide: bool) -> LaunchConfig {
    per_item(if wide { total / 8 } else { total })
}

/// A kernel of same-sized inputs and one output, all `T` (the residual ops: `add_relu_fwd`,
/// `relu_gate`, `add_same` of two, `add_gated` of three), eight values a thread where the count
/// and the offsets allow.
pub fn elementwise<T: KernelFloat>(
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
) -> candle_core::Result<CudaSlice<T>> {
    let Some(&(first, first_layout)) = inputs.first() else {
        candle_core::bail!("{name}: no inputs");
    };
    let dev = &first.device;
    let views = inputs
        .iter()
        .map(|&(s, l)| view::<T>(s, l, "input"))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let total = first_layout.shape().elem_count();
    let out = output::<T>(dev, total)?;
    let func = kernel_for::<T>(dev, name)?;
    let stream = dev.cuda_stream();
    let layouts: Vec<&Layout> = inputs.iter().map(|&(_, l)| l).collect();
    let wide = eights(total, &layouts);
    let wide32 = i32::from(wide);
    let mut launch = stream.launch_builder(&func);
    for v in &views {
        launch.arg(v);
    }
    launch.arg(&total).arg(&wide32).arg(&out);
    // SAFETY: every input holds `total` contiguous `T` values (same shapes, checked by the
    // callers), as many as the kernel takes; a grid-stride loop writes every output.
    unsafe { launch.launch(per_value(total, wide)) }.w()?;
    Ok(out)
}

/// The same kernels' in-place forms (`add_same_into`, `add_gated_into`): the first operand,
/// `dst`, is also the output, the others are `inputs`.
pub fn elementwise_into<T: KernelFloat>(
    name: &str,
    dst: (&mut CudaStorage, &Layout),
    inputs: &[(&CudaStorage, &Layout)],
) -> candle_core::Result<()> {
    let (dst, dst_layout) = dst;
    let dev = dst.device.clone();
    let views = inputs
        .iter()
        .map(|&(s, l)| view::<T>(s, l, "input"))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut out = view_mut::<T>(dst, dst_layout, "output")?;
    let total = dst_layout.shape().elem_count();
    let func = kernel_for::<T>(&dev, name)?;
    let stream = dev.cuda_stream();
    let layouts: Vec<&Layout> = std::iter::once(dst_layout)
        .chain(inputs.iter().map(|&(_, l)| l))
        .collect();
    let wide = eights(total, &layouts);
    let wide32 = i32::from(wide);
    let mut launch = stream.launch_builder(&func);
    launch.arg(&mut out);
    for v in &views {
        launch.arg(v);
    }
    launch.arg(&total).arg(&wide32);
    // SAFETY: `dst` and every input hold `total` contiguous `T` values (same shapes, checked by
    // the callers); each thread reads its values of `dst` before it writes them.
    unsafe { launch.launch(per_value(total, wide)) }.w()?;
    Ok(())
}

/// One block: for kernels that reduce a batch to a few numbers.
pub fn one_block() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The device address of a contiguous f32 tensor's first element, for kernels that take many
/// tensors at once (the optimizers' steps); the tensor must outlive the launch.
pub fn address(t: &Tensor, stream: &CudaStream) -> candle_core::Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        candle_core::bail!("kiln op: a tensor is not on the CUDA device");
    };
    let Some((start, _)) = layout.contiguous_offsets() else {
        candle_core::bail!("kiln op: a tensor is not contiguous");
    };
    let (base, _) = storage.as_cuda_slice::<f32>()?.device_ptr(stream);
    Ok(base + (start * std::mem::size_of::<f32>()) as u64)
}

/// Launch shape for a group kernel: `tensors` along y, enough blocks along x for the longest.
pub fn per_tensor(tensors: usize, longest: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            longest.div_ceil(THREADS as usize).clamp(1, 1024) as u32,
            tensors as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
