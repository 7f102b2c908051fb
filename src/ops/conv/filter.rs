//! cuDNN's channels-last filter from kiln's parameters: the f32 master weight [CO, C, KH, KW]
//! (PyTorch's layout, in which parameters and checkpoints stay) becomes [CO, KH, KW, C] in the
//! activations' type in one kernel, and the filter's gradient comes back to the weight's type
//! and layout in one more. candle's composition (a cast, a permute, a copy; backward a strided
//! cast and a copy) took four launches a convolution and a step, the strided ones slow.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::ops::cuda::{by_float, kernel_for, output, per_item, storage, view};

/// `weight` [CO, C, KH, KW] as [CO, KH, KW, C] of `dtype`, with its gradient.
pub(super) fn channels_last_filter(weight: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let ours = weight.device().is_cuda()
        && weight.dtype() == DType::F32
        && matches!(dtype, DType::F32 | DType::BF16 | DType::F16);
    if ours {
        weight.contiguous()?.apply_op1(ToChannelsLast { dtype })
    } else {
        weight.to_dtype(dtype)?.permute((0, 2, 3, 1))?.contiguous()
    }
}

/// (CO, C, KH*KW) of a filter [CO, C, KH, KW] or, `last`, [CO, KH, KW, C]; checked to fit the
/// kernels' 32-bit indices.
fn sizes(layout: &Layout, last: bool) -> candle_core::Result<(u32, u32, u32, u32)> {
    let (co, a, b, c) = layout.shape().dims4()?;
    let (c, taps) = if last { (c, a * b) } else { (a, b * c) };
    let total = u32::try_from(co * c * taps).map_err(|_| {
        candle_core::Error::Msg(format!("conv2d: a filter of {co}x{c}x{taps} is too large"))
    })?;
    Ok((co as u32, c as u32, taps as u32, total))
}

/// f32 [CO, C, KH, KW] to `dtype` [CO, KH, KW, C].
struct ToChannelsLast {
    dtype: DType,
}

impl CustomOp1 for ToChannelsLast {
    fn name(&self) -> &'static str {
        "kiln-filter-to-channels-last"
    }

    crate::ops::cuda_only_cpu_fwd!(1);

    fn cuda_fwd(&self, ws: &CudaStorage, wl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &ws.device;
        let (_, c, taps, total) = sizes(wl, false)?;
        let w = view::<f32>(ws, wl, "weight")?;
        let out = by_float!(self.dtype, T => {
            let out = output::<T>(dev, total as usize)?;
            let func = kernel_for::<T>(dev, "filter_to_last")?;
            let stream = dev.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&w).arg(&c).arg(&taps).arg(&total).arg(&out);
            // SAFETY: `w` holds `total` f32 values (a contiguous [CO, C, KH, KW]); a grid-stride
            // loop writes each of the `total` outputs once.
            unsafe { launch.launch(per_item(total as usize)) }.w()?;
            storage(out, dev)
        });
        let (co, c, kh, kw) = wl.shape().dims4()?;
        Ok((out, Shape::from((co, kh, kw, c))))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op1_no_bwd(&FromChannelsLast)?,
        ))
    }
}

/// A filter's gradient [CO, KH, KW, C] back to f32 [CO, C, KH, KW].
struct FromChannelsLast;

impl CustomOp1 for FromChannelsLast {
    fn name(&self) -> &'static str {
        "kiln-filter-from-channels-last"
    }

    crate::ops::cuda_only_cpu_fwd!(1);

    fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = &gs.device;
        let (_, c, taps, total) = sizes(gl, true)?;
        let out = output::<f32>(dev, total as usize)?;
        by_float!(gs.dtype(), T => {
            let g = view::<T>(gs, gl, "filter gradient")?;
            let func = kernel_for::<T>(dev, "filter_from_last")?;
            let stream = dev.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&g).arg(&c).arg(&taps).arg(&total).arg(&out);
            // SAFETY: `g` holds `total` values (a contiguous [CO, KH, KW, C]); a grid-stride
            // loop writes each of the `total` outputs once.
            unsafe { launch.launch(per_item(total as usize)) }.w()?;
        });
        let (co, kh, kw, c) = gl.shape().dims4()?;
        Ok((storage(out, dev), Shape::from((co, c, kh, kw))))
    }
}
