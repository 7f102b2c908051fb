//! cuDNN's convolution on CUDA (the `cudnn` feature): forward, backward-data and backward-filter,
//! f32, bf16 and f16, channels first or last, as candle custom ops.
//!
//! - One cuDNN handle per candle device, created on first use and bound to the device's stream,
//!   so cuDNN's kernels stay ordered with candle's and kiln's.
//! - Algorithms are chosen by measurement: the first time a (direction, shape, data type, math
//!   type) runs on a device, every algorithm cuDNN supports for it (within [`MAX_WORKSPACE`]) is
//!   run and timed, and the fastest is kept for the rest of the process, and on disk for the
//!   next ones ([`super::algorithm_cache`]).
//! - One workspace buffer per device, grown to the largest that a chosen algorithm needs and
//!   reused by every call.
//! - f32 convolutions use FMA math (exact f32 products, as the CPU's) unless
//!   [`set_allow_tf32`] allows TF32 tensor cores; bf16 and f16 always use tensor cores, with f32
//!   accumulation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use candle_core::cuda_backend::cudarc::driver::{
    sys as driver_sys, CudaSlice, CudaStream, CudaView, DeviceRepr, DriverError, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, DeviceId};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType,
};
use cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    CudnnError, FilterDescriptor, TensorDescriptor,
};

use super::algorithm_cache::{AlgorithmCache, Saved};
use super::cpu::Geometry;
use super::ConvParams;
use crate::ops::cuda::int;
use crate::ops::memory_format::Dims4;
use crate::ops::MemoryFormat;

/// The most workspace an algorithm may ask for and still be tried.
const MAX_WORKSPACE: usize = 1 << 30;

/// Timed runs of each algorithm when one is chosen, after one untimed run.
const TIMED_RUNS: usize = 2;

static ALLOW_TF32: AtomicBool = AtomicBool::new(false);

/// Lets f32 convolutions round their inputs to TF32 on tensor cores (PyTorch's default,
/// `torch.backends.cudnn.allow_tf32 = True`): faster, with about 3 significant digits. Off by
/// default, so f32 results agree with the CPU's. Takes effect for the convolutions run after it.
pub fn set_allow_tf32(allowed: bool) {
    ALLOW_TF32.store(allowed, Ordering::Relaxed);
}

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

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln cuDNN conv2d: CUDA tensors only")
    }

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

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln cuDNN conv2d input gradient: CUDA tensors only")
    }

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

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln cuDNN conv2d weight gradient: CUDA tensors only")
    }

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

/// Which of the three convolutions, and so which operands it reads and writes:
/// - Forward: (x, w) -> y;
/// - BackwardData: (dy, w) -> dx;
/// - BackwardFilter: (x, dy) -> dw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Direction {
    Forward,
    BackwardData,
    BackwardFilter,
}

impl Direction {
    /// Elements of the first operand, the second and the result.
    fn sizes(self, g: &Geometry) -> [usize; 3] {
        let (x, w, y) = (
            g.n * g.image(),
            g.co * g.patch(),
            g.n * g.co * g.out_pixels(),
        );
        match self {
            Self::Forward => [x, w, y],
            Self::BackwardData => [y, w, x],
            Self::BackwardFilter => [x, y, w],
        }
    }
}

/// The element types cuDNN convolves here.
trait Element: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType {}
impl<T: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType> Element for T {}

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

    let math = math_type(T::DATA_TYPE);
    let key = Key {
        direction,
        format,
        data_type: T::DATA_TYPE,
        math,
        x: [g.n, g.c, g.h, g.w],
        w: [g.co, g.c, g.kh, g.kw],
        stride: g.p.stride,
        padding: g.p.padding,
    };
    let d = Descriptors::new(&state.cudnn, &g, format, math)?;
    let plan = d.plan(direction);
    let described = format!("{key:?}");
    let (choice, remembered) = match state.algorithms.get(&key) {
        Some(choice) => (*choice, false),
        None => match state
            .saved
            .get(&described)
            .and_then(|s| remembered(&plan, s))
        {
            Some(choice) => (choice, true),
            None => (
                choose_and_keep(state, &plan, &described, &a, &b, &mut out)?,
                false,
            ),
        },
    };
    state.algorithms.insert(key, choice);
    let workspace = state.workspace(choice.workspace)?;
    // SAFETY: the descriptors describe `a`, `b` and `out` (their lengths were checked against the
    // geometry the descriptors were made from), all on the handle's stream; the workspace holds
    // at least what cuDNN asked for this algorithm.
    let ran = unsafe { plan.launch(choice.algorithm, workspace, &a, &b, &mut out) };
    match ran {
        Ok(()) => Ok(out),
        // A choice from an earlier run that no longer runs here: choose afresh.
        Err(e) if remembered => {
            tracing::debug!(
                "cuDNN {described}: the remembered {:?} failed ({e})",
                choice.algorithm
            );
            let choice = choose_and_keep(state, &plan, &described, &a, &b, &mut out)?;
            state.algorithms.insert(key, choice);
            let workspace = state.workspace(choice.workspace)?;
            // SAFETY: as above.
            unsafe { plan.launch(choice.algorithm, workspace, &a, &b, &mut out) }
                .map_err(cudnn_error(&format!("{direction:?} {key:?}")))?;
            Ok(out)
        }
        Err(e) => Err(cudnn_error(&format!("{direction:?} {key:?}"))(e)),
    }
}

/// The fastest algorithm for the convolution `described`, measured, and kept on disk.
fn choose_and_keep<T: Element>(
    state: &mut DeviceState,
    plan: &Plan<'_, T>,
    described: &str,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    out: &mut CudaSlice<T>,
) -> candle_core::Result<Choice> {
    let choice = choose(plan, &state.stream, &mut state.workspace, a, b, out)
        .map_err(|e| e.context(described.to_string()))?;
    tracing::debug!(
        "cuDNN {described}: {:?}, {:.3} ms, {} bytes of workspace",
        choice.algorithm,
        choice.ms,
        choice.workspace
    );
    let saved = Saved {
        algorithm: format!("{:?}", choice.algorithm),
        workspace: choice.workspace,
    };
    state.saved.insert(described, saved);
    Ok(choice)
}

/// An earlier run's choice, where the algorithm still exists and fits [`MAX_WORKSPACE`] here.
fn remembered<T: Element>(plan: &Plan<'_, T>, saved: &Saved) -> Option<Choice> {
    let algorithm = plan
        .algorithms()
        .into_iter()
        .find(|a| format!("{a:?}") == saved.algorithm)?;
    let workspace = plan
        .workspace_size(algorithm)
        .ok()
        .filter(|&bytes| bytes <= MAX_WORKSPACE)?;
    Some(Choice {
        algorithm,
        workspace,
        ms: f32::NAN,
    })
}

/// f32: FMA unless TF32 is allowed (then cuDNN's default, which is TF32 on Ampere and newer);
/// bf16 and f16: tensor cores.
fn math_type(data_type: sys::cudnnDataType_t) -> sys::cudnnMathType_t {
    match data_type {
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT if ALLOW_TF32.load(Ordering::Relaxed) => {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        }
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

/// What an algorithm choice depends on (the device being the map it is kept in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    direction: Direction,
    format: MemoryFormat,
    data_type: sys::cudnnDataType_t,
    math: sys::cudnnMathType_t,
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    padding: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    BackwardData(sys::cudnnConvolutionBwdDataAlgo_t),
    BackwardFilter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

#[derive(Debug, Clone, Copy)]
struct Choice {
    algorithm: Algorithm,
    /// Bytes of workspace it needs.
    workspace: usize,
    /// Its time when it was chosen, per run.
    ms: f32,
}

/// cuDNN state of one candle device.
struct DeviceState {
    cudnn: Arc<Cudnn>,
    stream: Arc<CudaStream>,
    workspace: Option<CudaSlice<u8>>,
    algorithms: HashMap<Key, Choice>,
    /// Choices of earlier runs on this kind of device.
    saved: AlgorithmCache,
}

// SAFETY: `Cudnn` is neither Send nor Sync because a cuDNN handle must not be used by two threads
// at once, and because of its Arc's count. A DeviceState is only reached through its Mutex, and
// every clone of the Arc (the descriptors hold one) is made and dropped while that lock is held;
// each use binds the device's context to the calling thread first.
unsafe impl Send for DeviceState {}

impl DeviceState {
    /// The device's workspace, grown to at least `bytes` (None where none is needed).
    fn workspace(&mut self, bytes: usize) -> candle_core::Result<Option<&mut CudaSlice<u8>>> {
        if bytes == 0 {
            return Ok(None);
        }
        if self.workspace.as_ref().is_none_or(|w| w.len() < bytes) {
            // Free the old one first (stream-ordered), so both are never held at once.
            self.workspace = None;
            // SAFETY: a workspace is scratch memory; cuDNN reads nothing it did not write.
            let grown = unsafe { self.stream.alloc::<u8>(bytes) }.map_err(driver_error(
                &format!("allocating {bytes} bytes of workspace"),
            ))?;
            self.workspace = Some(grown);
        }
        Ok(self.workspace.as_mut())
    }
}

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
    // Cudnn::new binds the context too, but unwraps the result: bind it here first.
    stream
        .context()
        .bind_to_thread()
        .map_err(driver_error("binding the device's context"))?;
    let cudnn = Cudnn::new(stream.clone()).map_err(cudnn_error("creating a handle"))?;
    let name = stream.context().name().unwrap_or_else(|_| "unknown".into());
    // SAFETY: a plain query of the loaded library, after a handle was made.
    let version = unsafe { sys::cudnnGetVersion() };
    let state = Arc::new(Mutex::new(DeviceState {
        cudnn,
        stream,
        workspace: None,
        algorithms: HashMap::new(),
        saved: AlgorithmCache::open(&name, version),
    }));
    devices.insert(device.id(), state.clone());
    Ok(state)
}

/// The descriptors of one convolution: x [N, C, H, W], w [CO, C, KH, KW], y [N, CO, OH, OW], or
/// channels last x [N, H, W, C], w [CO, KH, KW, C], y [N, OH, OW, CO] (cuDNN's NHWC, whose
/// dimensions are still given in NCHW order); the convolution computes in f32 whatever the data
/// type.
struct Descriptors<T: CudnnDataType> {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
}

impl<T: CudnnDataType> Descriptors<T> {
    fn new(
        cudnn: &Arc<Cudnn>,
        g: &Geometry,
        format: MemoryFormat,
        math: sys::cudnnMathType_t,
    ) -> candle_core::Result<Self> {
        let dims = |v: [usize; 4], what: &str| -> candle_core::Result<[i32; 4]> {
            let mut out = [0i32; 4];
            for (o, v) in out.iter_mut().zip(v) {
                *o = int(v, what)?;
            }
            Ok(out)
        };
        let (pad, stride) = (int(g.p.padding, "padding")?, int(g.p.stride, "stride")?);
        let layout = match format {
            MemoryFormat::ChannelsFirst => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            MemoryFormat::ChannelsLast => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
        };
        let mut conv = cudnn
            .create_conv2d::<f32>(
                [pad, pad],
                [stride, stride],
                [1, 1],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(cudnn_error("convolution descriptor"))?;
        conv.set_math_type(math)
            .map_err(cudnn_error("setting the math type"))?;
        let x = cudnn
            .create_4d_tensor::<T>(layout, dims([g.n, g.c, g.h, g.w], "conv2d input")?)
            .map_err(cudnn_error("input descriptor"))?;
        let w = cudnn
            .create_4d_filter::<T>(layout, dims([g.co, g.c, g.kh, g.kw], "conv2d weight")?)
            .map_err(cudnn_error("filter descriptor"))?;
        let y = cudnn
            .create_4d_tensor::<T>(layout, dims([g.n, g.co, g.oh, g.ow], "conv2d output")?)
            .map_err(cudnn_error("output descriptor"))?;
        Ok(Self { conv, x, w, y })
    }

    fn plan(&self, direction: Direction) -> Plan<'_, T> {
        let conv = &self.conv;
        match direction {
            Direction::Forward => Plan::Forward(ConvForward {
                conv,
                x: &self.x,
                w: &self.w,
                y: &self.y,
            }),
            Direction::BackwardData => Plan::BackwardData(ConvBackwardData {
                conv,
                dx: &self.x,
                w: &self.w,
                dy: &self.y,
            }),
            Direction::BackwardFilter => Plan::BackwardFilter(ConvBackwardFilter {
                conv,
                x: &self.x,
                dw: &self.w,
                dy: &self.y,
            }),
        }
    }
}

/// One direction of a convolution, over its descriptors.
enum Plan<'a, T: CudnnDataType> {
    Forward(ConvForward<'a, T, f32, T>),
    BackwardData(ConvBackwardData<'a, T, f32, T>),
    BackwardFilter(ConvBackwardFilter<'a, T, f32, T>),
}

impl<T: Element> Plan<'_, T> {
    /// Every algorithm cuDNN names for the direction (not all run every convolution).
    fn algorithms(&self) -> Vec<Algorithm> {
        use sys::cudnnConvolutionBwdDataAlgo_t as D;
        use sys::cudnnConvolutionBwdFilterAlgo_t as F;
        use sys::cudnnConvolutionFwdAlgo_t as Y;
        match self {
            Self::Forward(_) => [
                Y::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                Y::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                Y::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
                Y::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
                Y::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
                Y::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
                Y::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
                Y::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
            ]
            .map(Algorithm::Forward)
            .to_vec(),
            Self::BackwardData(_) => [
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
                D::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
            ]
            .map(Algorithm::BackwardData)
            .to_vec(),
            // ALGO_WINOGRAD is not implemented for the filter gradient.
            Self::BackwardFilter(_) => [
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
                F::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
            ]
            .map(Algorithm::BackwardFilter)
            .to_vec(),
        }
    }

    /// Bytes of workspace `algorithm` needs; an error where it cannot run this convolution.
    fn workspace_size(&self, algorithm: Algorithm) -> Result<usize, CudnnError> {
        match (self, algorithm) {
            (Self::Forward(op), Algorithm::Forward(a)) => op.get_workspace_size(a),
            (Self::BackwardData(op), Algorithm::BackwardData(a)) => op.get_workspace_size(a),
            (Self::BackwardFilter(op), Algorithm::BackwardFilter(a)) => op.get_workspace_size(a),
            _ => Err(CudnnError(sys::cudnnStatus_t::CUDNN_STATUS_BAD_PARAM)),
        }
    }

    /// Runs the convolution: `out` = conv(`a`, `b`) in the direction's sense (see [`Direction`]).
    ///
    /// # Safety
    /// `a`, `b` and `out` must hold the elements the descriptors describe, and `workspace` at
    /// least [`Self::workspace_size`] bytes.
    unsafe fn launch(
        &self,
        algorithm: Algorithm,
        workspace: Option<&mut CudaSlice<u8>>,
        a: &CudaView<'_, T>,
        b: &CudaView<'_, T>,
        out: &mut CudaSlice<T>,
    ) -> Result<(), CudnnError> {
        let scale = (T::from_f64(1.0), T::from_f64(0.0));
        match (self, algorithm) {
            (Self::Forward(op), Algorithm::Forward(alg)) => {
                op.launch(alg, workspace, scale, a, b, out)
            }
            (Self::BackwardData(op), Algorithm::BackwardData(alg)) => {
                op.launch(alg, workspace, scale, out, b, a)
            }
            (Self::BackwardFilter(op), Algorithm::BackwardFilter(alg)) => {
                op.launch(alg, workspace, scale, a, out, b)
            }
            _ => Err(CudnnError(sys::cudnnStatus_t::CUDNN_STATUS_BAD_PARAM)),
        }
    }
}

/// The fastest algorithm for the plan on this device: each one cuDNN can run within
/// [`MAX_WORKSPACE`] is run once untimed (its kernels load), then timed over [`TIMED_RUNS`].
/// Writes `out` (the caller runs the chosen one over it afterwards).
fn choose<T: Element>(
    plan: &Plan<'_, T>,
    stream: &Arc<CudaStream>,
    workspace: &mut Option<CudaSlice<u8>>,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    out: &mut CudaSlice<T>,
) -> candle_core::Result<Choice> {
    let timing = Some(driver_sys::CUevent_flags::CU_EVENT_DEFAULT);
    let event = |what: &str| {
        stream
            .context()
            .new_event(timing)
            .map_err(driver_error(what))
    };
    let (start, end) = (event("timing event")?, event("timing event")?);
    let mut best: Option<Choice> = None;
    let mut failures = Vec::new();
    for algorithm in plan.algorithms() {
        let bytes = match plan.workspace_size(algorithm) {
            Ok(bytes) if bytes <= MAX_WORKSPACE => bytes,
            Ok(bytes) => {
                failures.push(format!("{algorithm:?}: needs {bytes} bytes of workspace"));
                continue;
            }
            Err(e) => {
                failures.push(format!("{algorithm:?}: {e}"));
                continue;
            }
        };
        // The device's workspace where it is large enough, else a temporary one, so that an
        // algorithm tried but not chosen leaves no large buffer behind.
        let mut temporary = None;
        let mut scratch = match workspace.as_mut() {
            _ if bytes == 0 => None,
            Some(w) if w.len() >= bytes => Some(w),
            _ => {
                // SAFETY: scratch memory; cuDNN reads nothing it did not write.
                match unsafe { stream.alloc::<u8>(bytes) } {
                    Ok(w) => Some(temporary.insert(w)),
                    Err(e) => {
                        failures.push(format!("{algorithm:?}: allocating {bytes} bytes: {e}"));
                        continue;
                    }
                }
            }
        };
        // SAFETY (every launch below): as in `convolve`; the scratch buffer has `bytes` or more.
        if let Err(e) = unsafe { plan.launch(algorithm, scratch.as_deref_mut(), a, b, out) } {
            failures.push(format!("{algorithm:?}: {e}"));
            continue;
        }
        start
            .record(stream)
            .map_err(driver_error("recording an event"))?;
        let mut ran = Ok(());
        for _ in 0..TIMED_RUNS {
            ran = unsafe { plan.launch(algorithm, scratch.as_deref_mut(), a, b, out) };
            if ran.is_err() {
                break;
            }
        }
        end.record(stream)
            .map_err(driver_error("recording an event"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(driver_error("timing an algorithm"))?
            / TIMED_RUNS as f32;
        drop(temporary);
        if let Err(e) = ran {
            failures.push(format!("{algorithm:?}: {e}"));
            continue;
        }
        tracing::trace!("cuDNN candidate {algorithm:?}: {ms:.3} ms, {bytes} bytes of workspace");
        if best.is_none_or(|b| ms < b.ms) {
            best = Some(Choice {
                algorithm,
                workspace: bytes,
                ms,
            });
        }
    }
    if !failures.is_empty() {
        tracing::trace!("cuDNN candidates that did not run: {}", failures.join("; "));
    }
    best.ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "cuDNN: no algorithm runs this convolution ({})",
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
