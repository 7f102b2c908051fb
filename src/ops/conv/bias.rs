//! A per-channel bias added to channels-last activations on CUDA: one kernel forward
//! (`bias_last` in conv/kernels.cu), and the bias's gradient as a matrix product of a row of ones
//! with the gradient seen as [rows, C] (cuBLAS), where candle's strided sum over the leading
//! axes is slow for few channels (fastnet's whitening layer has 24).

use candle_core::{CustomOp2, Tensor};
#[cfg(feature = "cuda")]
use candle_core::{Layout, Shape};

/// `y` [N, H, W, C] + `bias` [C], both of one float type, on CUDA.
pub fn add(y: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    y.contiguous()?.apply_op2(&bias.contiguous()?, BiasLast)
}

struct BiasLast;

impl CustomOp2 for BiasLast {
    fn name(&self) -> &'static str {
        "kiln-bias-last"
    }

    crate::ops::cuda_only_cpu_fwd!(2, "elsewhere candle's broadcast add");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use crate::ops::cuda::{
            by_float, eights, int, kernel_for, output, per_value, storage, view,
        };
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let c = bl.shape().elem_count();
        let dims = yl.shape().dims();
        if dims.last() != Some(&c) || ys.dtype() != bs.dtype() {
            candle_core::bail!(
                "kiln-bias-last: a bias of {:?} for activations of {:?}",
                bl.shape(),
                yl.shape()
            );
        }
        let total = yl.shape().elem_count();
        int(total, "bias")?;
        let (c32, total32) = (c as u32, total as u32);
        let dev = &ys.device;
        let out = by_float!(ys.dtype(), T => {
            let y = view::<T>(ys, yl, "activations")?;
            let b = view::<T>(bs, bl, "bias")?;
            let out = output::<T>(dev, total)?;
            let func = kernel_for::<T>(dev, "bias_last")?;
            let stream = dev.cuda_stream();
            // Eight values a thread where C allows it and both are aligned to 8 values.
            let wide = eights(c, &[yl, bl]);
            let wide32 = i32::from(wide);
            let mut launch = stream.launch_builder(&func);
            launch.arg(&y).arg(&b).arg(&c32).arg(&total32).arg(&wide32).arg(&out);
            // SAFETY: y holds `total` values, b `c`; every output is written (eight at a time
            // where `wide`: C, and so `total`, a multiple of 8, runs aligned).
            unsafe { launch.launch(per_value(total, wide)) }.w()?;
            storage(out, dev)
        });
        Ok((out, yl.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        bias: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = bias.elem_count();
        let rows = y.elem_count() / c.max(1);
        let ones = Tensor::ones((1, rows), grad.dtype(), grad.device())?;
        let grad_bias = ones
            .matmul(&grad.contiguous()?.reshape((rows, c))?)?
            .reshape(c)?;
        Ok((Some(grad.clone()), Some(grad_bias)))
    }
}
