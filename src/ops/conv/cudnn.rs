//! cuDNN's convolution on CUDA (the `cudnn` feature): forward, backward-data and backward-filter,
//! f32, bf16 and f16, channels first or last, as candle custom ops.
//!
//! - One cuDNN handle per candle device, created on first use and bound to the device's stream,
//!   so cuDNN's kernels stay ordered with candle's and kiln's.
//! - Each convolution runs an execution plan of cuDNN's graph API ([`super::cudnn_graph`]), made
//!   the first time a (direction, shape, data type, alignment) runs on a device: the engine
//!   configurations cuDNN's heuristics rank first (within [`MAX_WORKSPACE`]) are run and timed,
//!   and the fastest is kept for the rest of the process, and on disk for the next ones
//!   ([`super::algorithm_cache`]).
//! - Each call takes its plan's workspace from the device's memory pool and gives it back once
//!   its kernels are queued (stream-ordered, as PyTorch's caching allocator does): memory held
//!   for the whole run by the largest plan's workspace would count against every moment of it.
//! - f32 convolutions use no tensor cores (exact f32 products, as the CPU's: [`ALLOW_TF32`]);
//!   bf16 and f16 always use tensor cores, with f32 sums.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use candle_core::cuda_backend::cudarc::driver::{
    sys as driver_sys, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr,
    DriverError, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, DeviceId};
use candle_core::{CudaDevice, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};
use cudarc::cudnn::{sys, CudnnDataType, CudnnError};

use super::algorithm_cache::{AlgorithmCache, Saved};
use super::cudnn_graph::{self, Accept, Candidates, Convolution, Direction, Handle, Plan};
use super::geometry::Geometry;
use super::ConvParams;
use crate::ops::memory_format::Dims4;
use crate::ops::MemoryFormat;

/// The most workspace an algorithm may ask for and still be tried.
const MAX_WORKSPACE: usize = 1 << 30;

/// Timed runs of each plan when one is chosen, after one untimed run.
const TIMED_RUNS: usize = 2;

/// Whether f32 convolutions may round their inputs to TF32 on tensor cores (PyTorch's default,
/// `torch.backends.cudnn.allow_tf32 = True`): faster, with about 3 significant digits. Off, so
/// f32 results agree with the CPU's; the plans' key and the algorithm cache keep the choice.
const ALLOW_TF32: bool = false;

/// Whether cuDNN convolves data of these types here: f32, bf16 or f16, both alike.
pub(super) fn convolves(x: DType, weight: DType) -> bool {
    matches!(x, DType::F32 | DType::BF16 | DType::F16) && weight == x
}

/// `x` convolved with `weight`, no bias, on a CUDA device, both in `format`: channels first
/// `x` [N, C, H, W] and `weight` [CO, C, KH, KW]; channels last [N, H, W, C] and
/// [CO, KH, KW, C]. cuDNN for f32, bf16 and f16; candle's conv2d for other (channels-first)
/// data types.
pub(super) fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    p: ConvParams,
    format: MemoryFormat,
) -> candle_core::Result<Tensor> {
    if !convolves(x.dtype(), weight.dtype()) {
        if format == MemoryFormat::ChannelsLast {
            candle_core::bail!("kiln cuDNN conv2d: channels last takes f32, bf16 or f16 only");
        }
        return x.conv2d(weight, p.padding, p.stride, 1, 1);
    }
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Conv2dOp { p, format })
}

/// (n, c, h, w) of an operand in `format` (for a weight: (co, c, kh, kw)).
fn nchw(layout: &Layout, format: MemoryFormat) -> candle_core::Result<Dims4> {
    Ok(format.to_nchw_order(layout.shape().dims4()?))
}

/// y = conv(x, w); its backward runs the other two directions.
struct Conv2dOp {
    p: ConvParams,
    format: MemoryFormat,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "kiln-cudnn-conv2d"
    }

    crate::ops::cuda_only_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let f = self.format;
        let g = Geometry::new(nchw(xl, f)?, nchw(wl, f)?, self.p)?;
        let y = run(Direction::Forward, g, f, xs, xl, ws, wl)?;
        Ok((y, f.from_nchw_order((g.n, g.co, g.oh, g.ow)).into()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let format = self.format;
        // Inputs that are data, not parameters or results of other ops, need no gradient.
        let grad_x = if x.track_op() {
            let op = DataGrad {
                p: self.p,
                format,
                input: nchw(x.layout(), format)?,
            };
            Some(grad.apply_op2_no_bwd(weight, &op)?)
        } else {
            None
        };
        let grad_weight = if weight.track_op() {
            let op = FilterGrad {
                p: self.p,
                format,
                kernel: nchw(weight.layout(), format)?,
            };
            Some(x.apply_op2_no_bwd(&grad, &op)?)
        } else {
            None
        };
        Ok((grad_x, grad_weight))
    }
}

/// dL/dX from dL/dY and the weight (cuDNN's backward-data).
struct DataGrad {
    p: ConvParams,
    format: MemoryFormat,
    /// (n, c, h, w)
    input: Dims4,
}

impl CustomOp2 for DataGrad {
    fn name(&self) -> &'static str {
        "kiln-cudnn-conv2d-input-grad"
    }

    crate::ops::cuda_only_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let f = self.format;
        let g = Geometry::new(self.input, nchw(wl, f)?, self.p)?;
        expect_dims(gl, f, (g.n, g.co, g.oh, g.ow), "output gradient")?;
        let dx = run(Direction::BackwardData, g, f, gs, gl, ws, wl)?;
        Ok((dx, f.from_nchw_order(self.input).into()))
    }
}

/// dL/dW from the input and dL/dY (cuDNN's backward-filter).
struct FilterGrad {
    p: ConvParams,
    format: MemoryFormat,
    /// (co, c, kh, kw)
    kernel: Dims4,
}

impl CustomOp2 for FilterGrad {
    fn name(&self) -> &'static str {
        "kiln-cudnn-conv2d-weight-grad"
    }

    crate::ops::cuda_only_cpu_fwd!(2);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let f = self.format;
        let g = Geometry::new(nchw(xl, f)?, self.kernel, self.p)?;
        expect_dims(gl, f, (g.n, g.co, g.oh, g.ow), "output gradient")?;
        let dw = run(Direction::BackwardFilter, g, f, xs, xl, gs, gl)?;
        Ok((dw, f.from_nchw_order(self.kernel).into()))
    }
}

/// Checks an operand's (n, c, h, w) in `format`.
fn expect_dims(
    layout: &Layout,
    format: MemoryFormat,
    dims: Dims4,
    what: &str,
) -> candle_core::Result<()> {
    let got = nchw(layout, format)?;
    if got != dims {
        candle_core::bail!("kiln cuDNN conv2d: {what} is {got:?}, expected {dims:?}");
    }
    Ok(())
}

/// The element types cuDNN convolves here.
trait Element: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits {}
impl<T: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits> Element for T {}

/// One convolution of two contiguous operands of one data type into a new storage.
fn run(
    direction: Direction,
    g: Geometry,
    format: MemoryFormat,
    a: &CudaStorage,
    al: &Layout,
    b: &CudaStorage,
    bl: &Layout,
) -> candle_core::Result<CudaStorage> {
    let device = &a.device;
    let storage = match (&a.slice, &b.slice) {
        (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => CudaStorage::wrap_cuda_slice(
            convolve(device, direction, g, format, a, al, b, bl)?,
            device.clone(),
        ),
        (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => CudaStorage::wrap_cuda_slice(
            convolve(device, direction, g, format, a, al, b, bl)?,
            device.clone(),
        ),
        (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => CudaStorage::wrap_cuda_slice(
            convolve(device, direction, g, format, a, al, b, bl)?,
            device.clone(),
        ),
        _ => candle_core::bail!(
            "kiln cuDNN conv2d: operands must both be f32, bf16 or f16 ({direction:?})"
        ),
    };
    Ok(storage)
}

/// The operand's elements, checked to be contiguous and as many as the convolution reads.
fn operand<'a, T>(
    slice: &'a CudaSlice<T>,
    layout: &Layout,
    len: usize,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("kiln cuDNN conv2d: the {what} must be contiguous");
    };
    if end - start != len || end > slice.len() {
        candle_core::bail!(
            "kiln cuDNN conv2d: the {what} has {} elements, the convolution reads {len}",
            end - start
        );
    }
    Ok(slice.slice(start..end))
}

#[allow(clippy::too_many_arguments)]
fn convolve<T: Element>(
    device: &CudaDevice,
    direction: Direction,
    g: Geometry,
    format: MemoryFormat,
    a: &CudaSlice<T>,
    al: &Layout,
    b: &CudaSlice<T>,
    bl: &Layout,
) -> candle_core::Result<CudaSlice<T>> {
    let [a_len, b_len, out_len] = direction.sizes(&g);
    let a = operand(a, al, a_len, "first operand")?;
    let b = operand(b, bl, b_len, "second operand")?;
    if g.n == 0 || g.c == 0 || g.co == 0 || out_len == 0 {
        // Nothing to read or a sum over nothing: cuDNN takes no empty tensors.
        return device.alloc_zeros::<T>(out_len.max(1));
    }
    let mut out = crate::ops::cuda::output::<T>(device, out_len)?;

    let state = device_state(device)?;
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    let state = &mut *state;
    state
        .stream
        .context()
        .bind_to_thread()
        .map_err(driver_error("binding the device's context"))?;

    let operands = {
        let stream = &state.stream;
        // No event is recorded on these guards: kiln turns cudarc's event tracking off.
        let (a, _a) = a.device_ptr(stream);
        let (b, _b) = b.device_ptr(stream);
        let (out, _out) = out.device_ptr_mut(stream);
        [a, b, out]
    };
    let key = Key {
        direction,
        format,
        data_type: T::DATA_TYPE,
        tf32: T::DATA_TYPE == sys::cudnnDataType_t::CUDNN_DATA_FLOAT && ALLOW_TF32,
        x: [g.n, g.c, g.h, g.w],
        w: [g.co, g.c, g.kh, g.kw],
        stride: g.p.stride,
        padding: g.p.padding,
        alignment: alignment(operands),
    };
    let remembered = match state.plans.contains_key(&key) {
        true => false,
        false => {
            let _span = tracing::info_span!("cudnn plan").entered();
            let (plan, remembered) = find_plan(state, &key, &g, operands)?;
            state.plans.insert(key, plan);
            remembered
        }
    };
    // SAFETY (both runs): the operands hold the elements the key's convolution reads and writes
    // (their lengths were checked against the geometry), at the alignment the key records.
    match unsafe { execute(state, &key, operands) } {
        Ok(()) => Ok(out),
        // A choice from an earlier run that no longer runs here: choose afresh.
        Err(e) if remembered => {
            tracing::debug!("cuDNN {key:?}: the remembered plan failed ({e})");
            let plan = choose_and_keep(state, &key, &g, operands)?;
            state.plans.insert(key, plan);
            unsafe { execute(state, &key, operands) }?;
            Ok(out)
        }
        Err(e) => Err(e),
    }
}

/// The largest power of two, at most 16, that divides every address.
fn alignment(addresses: [u64; 3]) -> usize {
    addresses
        .iter()
        .map(|a| 1usize << a.trailing_zeros().min(4))
        .min()
        .unwrap_or(16)
}

/// Runs the key's plan over `operands` (first operand, second, result).
///
/// # Safety
/// The operands must hold the elements the key's convolution reads and writes, at its alignment.
unsafe fn execute(
    state: &mut DeviceState,
    key: &Key,
    operands: [u64; 3],
) -> candle_core::Result<()> {
    let DeviceState {
        handle,
        stream,
        plans,
        ..
    } = state;
    let plan = plans
        .get(key)
        .ok_or_else(|| candle_core::Error::Msg(format!("cuDNN: no plan for {key:?}")))?;
    let workspace = scratch(stream, plan.workspace)?;
    let address = workspace.as_ref().map_or(0, |w| w.device_ptr(stream).0);
    // Dropped after the launch: freed in stream order, so no later work reuses it too early.
    plan.execute(handle, operands, address)
        .map_err(cudnn_error(&format!("running {key:?}")))
}

/// `bytes` of scratch memory from the device's pool, or none where none is needed.
fn scratch(stream: &Arc<CudaStream>, bytes: usize) -> candle_core::Result<Option<CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    // SAFETY: a workspace is scratch memory; cuDNN reads nothing it did not write.
    let workspace = unsafe { stream.alloc::<u8>(bytes) }.map_err(driver_error(&format!(
        "allocating {bytes} bytes of workspace"
    )))?;
    Ok(Some(workspace))
}

/// The plan for a convolution not run yet in this process: an earlier run's choice where the
/// disk keeps one that still runs here (and so true), else the fastest, measured.
fn find_plan(
    state: &mut DeviceState,
    key: &Key,
    g: &Geometry,
    operands: [u64; 3],
) -> candle_core::Result<(Plan, bool)> {
    if let Some(saved) = state.saved.get(&format!("{key:?}")) {
        let name = saved.algorithm.clone();
        let candidates = candidates(state, key, g, Some(&name))?;
        match candidates.plan(&state.handle, &name) {
            Some(Ok(plan)) if plan.workspace <= MAX_WORKSPACE => return Ok((plan, true)),
            Some(Ok(_)) => tracing::debug!("cuDNN {key:?}: {name} now needs too much workspace"),
            Some(Err(e)) => tracing::debug!("cuDNN {key:?}: {name} has no plan here ({e})"),
            None => tracing::debug!("cuDNN {key:?}: {name} is no longer a candidate"),
        }
    }
    Ok((choose_and_keep(state, key, g, operands)?, false))
}

/// The candidates cuDNN proposes for the key's convolution (`only`: see
/// [`cudnn_graph::candidates`]).
fn candidates(
    state: &DeviceState,
    key: &Key,
    g: &Geometry,
    only: Option<&str>,
) -> candle_core::Result<Candidates> {
    let dims = |v: [usize; 4]| v.map(|d| d as i64);
    let convolution = Convolution {
        direction: key.direction,
        channels_last: key.format == MemoryFormat::ChannelsLast,
        data_type: key.data_type,
        x: dims(key.x),
        w: dims(key.w),
        y: dims([g.n, g.co, g.oh, g.ow]),
        stride: key.stride as i64,
        padding: key.padding as i64,
        alignment: key.alignment as i64,
    };
    cudnn_graph::candidates(&state.handle, &convolution, Accept { tf32: key.tf32 }, only)
        .map_err(cudnn_error(&format!("describing {key:?}")))
}

/// The fastest plan for the key's convolution, measured, and kept on disk.
fn choose_and_keep(
    state: &mut DeviceState,
    key: &Key,
    g: &Geometry,
    operands: [u64; 3],
) -> candle_core::Result<Plan> {
    let described = format!("{key:?}");
    let candidates = candidates(state, key, g, None)?;
    let (plan, ms) =
        choose(state, candidates, operands).map_err(|e| e.context(described.clone()))?;
    tracing::debug!(
        "cuDNN {described}: {}, {ms:.3} ms, {} bytes of workspace",
        plan.name,
        plan.workspace
    );
    let saved = Saved {
        algorithm: plan.name.clone(),
        workspace: plan.workspace,
    };
    state.saved.insert(&described, saved);
    Ok(plan)
}

/// What an algorithm choice depends on (the device being the map it is kept in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    direction: Direction,
    format: MemoryFormat,
    data_type: sys::cudnnDataType_t,
    /// f32 on tensor cores (see [`ALLOW_TF32`]).
    tf32: bool,
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    padding: usize,
    /// Of the operands' addresses: a plan made for 16 may read 16 bytes at once.
    alignment: usize,
}

/// cuDNN state of one candle device.
struct DeviceState {
    handle: Handle,
    stream: Arc<CudaStream>,
    plans: HashMap<Key, Plan>,
    /// Choices of earlier runs on this kind of device.
    saved: AlgorithmCache,
}

// SAFETY: a cuDNN handle and its descriptors must not be used by two threads at once, and a
// plan shares its graph through an Rc. A DeviceState is only reached through its Mutex, and each
// use binds the device's context to the calling thread first.
unsafe impl Send for DeviceState {}

type Devices = Mutex<HashMap<DeviceId, Arc<Mutex<DeviceState>>>>;

/// Makes the device's cuDNN state now rather than at its first convolution.
pub(super) fn prepare(device: &CudaDevice) -> candle_core::Result<()> {
    device_state(device).map(drop)
}

/// The device's cuDNN state, made (a handle on the device's stream) on first use.
fn device_state(device: &CudaDevice) -> candle_core::Result<Arc<Mutex<DeviceState>>> {
    static DEVICES: OnceLock<Devices> = OnceLock::new();
    let devices = DEVICES.get_or_init(Default::default);
    let mut devices: MutexGuard<_> = devices.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(state) = devices.get(&device.id()) {
        return Ok(state.clone());
    }
    let stream = device.cuda_stream();
    stream
        .context()
        .bind_to_thread()
        .map_err(driver_error("binding the device's context"))?;
    let handle = Handle::new(stream.cu_stream() as sys::cudaStream_t)
        .map_err(cudnn_error("creating a handle"))?;
    let name = stream.context().name().unwrap_or_else(|_| "unknown".into());
    // SAFETY: a plain query of the loaded library, after a handle was made.
    let version = unsafe { sys::cudnnGetVersion() };
    let state = Arc::new(Mutex::new(DeviceState {
        handle,
        stream,
        plans: HashMap::new(),
        saved: AlgorithmCache::open(&name, version),
    }));
    devices.insert(device.id(), state.clone());
    Ok(state)
}

/// The fastest of the candidates' plans on this device, with its time: each one that builds
/// and fits [`MAX_WORKSPACE`] is run once untimed (its kernels load), then timed over
/// [`TIMED_RUNS`]. Writes the result operand (the caller runs the chosen plan over it again).
fn choose(
    state: &mut DeviceState,
    candidates: Candidates,
    operands: [u64; 3],
) -> candle_core::Result<(Plan, f32)> {
    let stream = state.stream.clone();
    let timing = Some(driver_sys::CUevent_flags::CU_EVENT_DEFAULT);
    let event = |what: &str| {
        stream
            .context()
            .new_event(timing)
            .map_err(driver_error(what))
    };
    let (start, end) = (event("timing event")?, event("timing event")?);
    let mut best: Option<(Plan, f32)> = None;
    let mut failures = Vec::new();
    for (name, plan) in candidates.plans(&state.handle) {
        let plan = match plan {
            Ok(plan) if plan.workspace <= MAX_WORKSPACE => plan,
            Ok(plan) => {
                failures.push(format!(
                    "{name}: needs {} bytes of workspace",
                    plan.workspace
                ));
                continue;
            }
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let bytes = plan.workspace;
        let workspace = match scratch(&stream, bytes) {
            Ok(w) => w,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let scratch = workspace.as_ref().map_or(0, |w| w.device_ptr(&stream).0);
        // SAFETY (every run below): as in `convolve`; the scratch buffer has `bytes` or more.
        if let Err(e) = unsafe { plan.execute(&state.handle, operands, scratch) } {
            failures.push(format!("{name}: {e}"));
            continue;
        }
        start
            .record(&stream)
            .map_err(driver_error("recording an event"))?;
        let mut ran = Ok(());
        for _ in 0..TIMED_RUNS {
            ran = unsafe { plan.execute(&state.handle, operands, scratch) };
            if ran.is_err() {
                break;
            }
        }
        end.record(&stream)
            .map_err(driver_error("recording an event"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(driver_error("timing a plan"))?
            / TIMED_RUNS as f32;
        drop(workspace);
        if let Err(e) = ran {
            failures.push(format!("{name}: {e}"));
            continue;
        }
        tracing::trace!("cuDNN candidate {name}: {ms:.3} ms, {bytes} bytes of workspace");
        if best.as_ref().is_none_or(|(_, b)| ms < *b) {
            best = Some((plan, ms));
        }
    }
    if !failures.is_empty() {
        tracing::trace!("cuDNN candidates that did not run: {}", failures.join("; "));
    }
    best.ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "cuDNN: no engine runs this convolution ({})",
            failures.join("; ")
        ))
    })
}

fn cudnn_error(what: &str) -> impl FnOnce(CudnnError) -> candle_core::Error + '_ {
    move |e| candle_core::Error::Msg(format!("cuDNN: {what}: {:?}", e.0))
}

fn driver_error(what: &str) -> impl FnOnce(DriverError) -> candle_core::Error + '_ {
    move |e| candle_core::Error::Msg(format!("cuDNN: {what}: CUDA error {e}"))
}
