//! GELU in its exact (erf) form, PyTorch's `nn.GELU()` default: kiln's kernels on CUDA (f32,
//! bf16 or f16, `gelu_fwd` and `gelu_bwd` in gelu.cu: one pass each way, where candle's
//! backward composes eight kernels), candle's `gelu_erf` elsewhere, which is also the
//! reference for the CUDA tests.

use candle_core::{CustomOp1, CustomOp2, DType, Tensor};
#[cfg(feature = "cuda")]
use candle_core::{Layout, Shape};

pub fn gelu(x: &Tensor) -> candle_core::Result<Tensor> {
    let on_cuda = cfg!(feature = "cuda") && x.device().is_cuda();
    if on_cuda && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        x.gelu_erf()
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "kiln-gelu"
    }

    crate::ops::cuda_only_cpu_fwd!(1, "the CPU runs candle's gelu_erf");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{by_float, eights, kernel_for, output, per_value, storage, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let dev = &xs.device;
        let total = xl.shape().elem_count();
        let out = by_float!(xs.dtype(), T => {
            let x = view::<T>(xs, xl, "input")?;
            let y = output::<T>(dev, total)?;
            let func = kernel_for::<T>(dev, "gelu_fwd")?;
            let stream = dev.cuda_stream();
            let wide = eights(total, &[xl]);
            let wide32 = i32::from(wide);
            let mut launch = stream.launch_builder(&func);
            launch.arg(&x).arg(&total).arg(&wide32).arg(&y);
            // SAFETY: x holds `total` contiguous values; the grid-stride loop writes all of y
            // (eight at a time where `wide`: `total` a multiple of 8, x aligned to 8 values).
            unsafe { launch.launch(per_value(total, wide)) }.w()?;
            storage(y, dev)
        });
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// grad * (Phi(x) + x * phi(x)).
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "kiln-gelu-grad"
    }

    crate::ops::cuda_only_cpu_fwd!(2);

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{by_float, eights, kernel_for, output, per_value, storage, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        if xl.shape() != gl.shape() || xs.dtype() != gs.dtype() {
            candle_core::bail!(
                "kiln-gelu-grad: a gradient of {:?} for an input of {:?}",
                gl.shape(),
                xl.shape()
            );
        }
        let dev = &xs.device;
        let total = xl.shape().elem_count();
        let out = by_float!(xs.dtype(), T => {
            let x = view::<T>(xs, xl, "input")?;
            let g = view::<T>(gs, gl, "gradient")?;
            let dx = output::<T>(dev, total)?;
            let func = kernel_for::<T>(dev, "gelu_bwd")?;
            let stream = dev.cuda_stream();
            let wide = eights(total, &[xl, gl]);
            let wide32 = i32::from(wide);
            let mut launch = stream.launch_builder(&func);
            launch.arg(&x).arg(&g).arg(&total).arg(&wide32).arg(&dx);
            // SAFETY: x, g and dx hold `total` contiguous values each; every dx is written
            // (eight at a time as in the forward pass).
            unsafe { launch.launch(per_value(total, wide)) }.w()?;
            storage(dx, dev)
        });
        Ok((out, xl.shape().clone()))
    }
}
