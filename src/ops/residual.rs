//! The elementwise ends of a residual block, and the backward pass's gradient arithmetic
//! ([`GradKernels`]): `relu(a + b)` with its gradient gate read from the output, and `a + b` of
//! two gradients of one tensor, passed through the tensor's ReLU in the same pass where it ends
//! in one; both sums written into the held gradient where nothing else reads it. kiln's kernels
//! on the CPU (f32, in parallel chunks) and CUDA (f32, bf16 or f16, eight values a thread in
//! 16-byte accesses: `add_relu_fwd`, `relu_gate`, `add_same`, `add_gated` and the last two's
//! `_into` forms in residual.cu); candle's composition elsewhere, which is also the reference for
//! the tests. Any memory format: each value meets only its partners.
use candle_core::backprop::{CandleGradOps, GradOps};
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, InplaceOp2, InplaceOp3, Layout, Shape, Tensor,
};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda::by_float;
use super::{contiguous_f32, contiguous_f32_mut, par_collect};
#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;

/// Whether kiln's kernels run on `device` for data of type `dtype`: f32 on the CPU, f32, bf16
/// and f16 on CUDA.
fn ours(device: &Device, dtype: DType) -> bool {
    match device {
        Device::Cpu => dtype == DType::F32,
        Device::Cuda(_) => {
            cfg!(feature = "cuda") && matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
        }
        Device::Metal(_) => false,
    }
}

fn same_shapes(what: &str, al: &Layout, bl: &Layout) -> candle_core::Result<()> {
    if al.shape() != bl.shape() {
        candle_core::bail!(
            "{what}: shapes {:?} and {:?} differ",
            al.shape(),
            bl.shape()
        );
    }
    Ok(())
}

/// The CUDA kernel `name` over same-shaped operands (`what` names the op in errors).
#[cfg(feature = "cuda")]
fn same_shaped_kernel(
    name: &str,
    what: &str,
    inputs: &[(&candle_core::CudaStorage, &Layout)],
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    let [(first, first_layout), rest @ ..] = inputs else {
        candle_core::bail!("{what}: no operands");
    };
    for (_, layout) in rest {
        same_shapes(what, first_layout, layout)?;
    }
    let out = by_float!(first.dtype(), T => super::cuda::storage(
        super::cuda::elementwise::<T>(name, inputs)?,
        &first.device,
    ));
    Ok((out, first_layout.shape().clone()))
}

/// [`same_shaped_kernel`]'s in-place form: the kernel `name` writes into `dst`, which is also
/// its first operand.
#[cfg(feature = "cuda")]
fn same_shaped_kernel_into(
    name: &str,
    what: &str,
    (dst, dst_layout): (&mut candle_core::CudaStorage, &Layout),
    inputs: &[(&candle_core::CudaStorage, &Layout)],
) -> candle_core::Result<()> {
    for (_, layout) in inputs {
        same_shapes(what, dst_layout, layout)?;
    }
    by_float!(dst.dtype(), T => super::cuda::elementwise_into::<T>(
        name,
        (dst, dst_layout),
        inputs,
    ))
}

/// Elements a CPU thread takes at a time in the elementwise ops.
const CHUNK: usize = 1 << 14;

/// `f(a, b)` for each pair of elements of `a` and `b` (equally long), in parallel chunks.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let f = &f;
    par_collect(a.len(), CHUNK, |i| {
        let at = i * CHUNK;
        a[at..]
            .iter()
            .zip(&b[at..])
            .take(CHUNK)
            .map(move |(&a, &b)| f(a, b))
    })
}

/// `grad` where `y > 0`, zero elsewhere: ReLU's gradient read from its output.
struct ReluGate;

impl CustomOp2 for ReluGate {
    fn name(&self) -> &'static str {
        "kiln-relu-gate"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (grad, y) = (
            contiguous_f32(gs, gl, "gradient")?,
            contiguous_f32(ys, yl, "output")?,
        );
        let out = zip_map(grad, y, |g, y| if y > 0.0 { g } else { 0.0 });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        same_shaped_kernel("relu_gate", "relu_gate", &[(gs, gl), (ys, yl)])
    }
}

/// `relu(a + b)`: the end of a residual block, one pass each way.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    // Elementwise: any format.
    if ours(a.device(), a.dtype()) && a.dtype() == b.dtype() {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        relu(&(a + b)?)
    }
}

/// ReLU whose gradient is 0 where its input is exactly 0, as PyTorch's and kiln's kernels
/// (candle's `relu` passes it there): the compositions then agree with them on ties, which
/// bf16's coarse rounding makes common (a + b = 0 wherever b = -a).
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    x * x.gt(0f64)?.to_dtype(x.dtype())?
}

pub(crate) struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "kiln-add-relu"
    }

    /// candle's backward pass gates the gradient ([`GradKernels`]), in the sum where the output
    /// feeds several consumers.
    fn relu_ended(&self) -> bool {
        true
    }

    fn cpu_fwd(
        &self,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        same_shapes("add_relu", al, bl)?;
        let (a, b) = (
            contiguous_f32(a_s, al, "lhs")?,
            contiguous_f32(bs, bl, "rhs")?,
        );
        let out = zip_map(a, b, |a, b| (a + b).max(0.0));
        Ok((CpuStorage::F32(out), al.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a_s: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        same_shaped_kernel("add_relu_fwd", "add_relu", &[(a_s, al), (bs, bl)])
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Already through the ReLU (`relu_ended`).
        Ok((Some(grad.clone()), Some(grad.clone())))
    }
}

/// kiln's gradient arithmetic for candle's backward pass
/// ([`Tensor::backward_consuming_with`]): the sums of two gradients of one tensor (a residual
/// block's input) in kiln's vectorised kernel for same-shaped f32, bf16 or f16 tensors on CUDA
/// (candle's addition moves bf16 two bytes a thread), candle's addition elsewhere; where the
/// tensor is a ReLU-ended op's output (the previous block's end), the sum passed through that
/// ReLU in the same pass, on CUDA and the CPU (f32), so the gradient is read and written once,
/// not twice; both into the held gradient where the gradient store alone holds it (the pass
/// then needs no third tensor for the sum, as PyTorch's autograd accumulates in place); and the
/// ReLU gate in kiln's kernel.
pub struct GradKernels;

impl GradOps for GradKernels {
    fn add(&self, held: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        // CUDA only: on the CPU candle's addition does as well.
        if held.device().is_cuda() && alike(held, grad) && ours(held.device(), held.dtype()) {
            held.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &AddSame)
        } else {
            held.add(grad)
        }
    }

    fn add_gated(
        &self,
        held: &Tensor,
        grad: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // `y` is read as it is: a copy would cost the pass this saves.
        let fits = alike(held, grad) && alike(held, y) && y.is_contiguous();
        if !(fits && ours(held.device(), held.dtype())) {
            return Ok(None);
        }
        let (held, grad) = (held.contiguous()?, grad.contiguous()?);
        held.apply_op3_no_bwd(&grad, y, &AddGated).map(Some)
    }

    fn add_in_place(&self, held: &Tensor, grad: &Tensor) -> candle_core::Result<bool> {
        if !(alike(held, grad) && ours(held.device(), held.dtype())) {
            return Ok(false);
        }
        held.inplace_op2(&grad.contiguous()?, &AddInto)?;
        Ok(true)
    }

    fn add_gated_in_place(
        &self,
        held: &Tensor,
        grad: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<bool> {
        let fits = alike(held, grad) && alike(held, y) && y.is_contiguous();
        if !(fits && ours(held.device(), held.dtype())) {
            return Ok(false);
        }
        held.inplace_op3(&grad.contiguous()?, y, &AddGatedInto)?;
        Ok(true)
    }

    fn gate(&self, grad: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        if alike(grad, y) && ours(grad.device(), grad.dtype()) {
            grad.contiguous()?
                .apply_op2_no_bwd(&y.contiguous()?, &ReluGate)
        } else {
            CandleGradOps.gate(grad, y)
        }
    }
}

/// Same shapes and types: what kiln's elementwise kernels take.
fn alike(a: &Tensor, b: &Tensor) -> bool {
    a.shape() == b.shape() && a.dtype() == b.dtype()
}

/// `a + b` where `y > 0`, else 0: two gradients of a ReLU's output `y` summed and passed through
/// it, same shapes (see [`GradKernels`]).
struct AddGated;

impl CustomOp3 for AddGated {
    fn name(&self) -> &'static str {
        "kiln-add-gated"
    }

    fn cpu_fwd(
        &self,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        same_shapes("add_gated", al, bl)?;
        same_shapes("add_gated", al, yl)?;
        let (a, b, y) = (
            contiguous_f32(a_s, al, "held gradient")?,
            contiguous_f32(bs, bl, "gradient")?,
            contiguous_f32(ys, yl, "output")?,
        );
        // The sum, then ReLU's gate, as the two passes would: the same bits.
        let out = par_collect(a.len(), CHUNK, |i| {
            let at = i * CHUNK;
            a[at..]
                .iter()
                .zip(&b[at..])
                .zip(&y[at..])
                .take(CHUNK)
                .map(|((&a, &b), &y)| if y > 0.0 { a + b } else { 0.0 })
        });
        Ok((CpuStorage::F32(out), al.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a_s: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        same_shaped_kernel(
            "add_gated",
            "grad_kernels",
            &[(a_s, al), (bs, bl), (ys, yl)],
        )
    }
}

/// `a += b` where `y > 0`, else `a = 0`: [`AddGated`] into the held gradient.
struct AddGatedInto;

impl InplaceOp3 for AddGatedInto {
    fn name(&self) -> &'static str {
        "kiln-add-gated-into"
    }

    fn cpu_fwd(
        &self,
        a_s: &mut CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<()> {
        same_shapes("add_gated_into", al, bl)?;
        same_shapes("add_gated_into", al, yl)?;
        let (b, y) = (
            contiguous_f32(bs, bl, "gradient")?,
            contiguous_f32(ys, yl, "output")?,
        );
        let a = contiguous_f32_mut(a_s, al, "held gradient")?;
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK).zip(y.par_chunks(CHUNK)))
            .for_each(|(a, (b, y))| {
                for ((a, &b), &y) in a.iter_mut().zip(b).zip(y) {
                    *a = if y > 0.0 { *a + b } else { 0.0 };
                }
            });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a_s: &mut candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<()> {
        same_shaped_kernel_into(
            "add_gated_into",
            "add_gated_into",
            (a_s, al),
            &[(bs, bl), (ys, yl)],
        )
    }
}

/// `a += b`, same shapes: [`AddSame`] into the held gradient, on the CPU (f32) too.
struct AddInto;

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        "kiln-add-into"
    }

    fn cpu_fwd(
        &self,
        a_s: &mut CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        same_shapes("add_into", al, bl)?;
        let b = contiguous_f32(bs, bl, "gradient")?;
        let a = contiguous_f32_mut(a_s, al, "held gradient")?;
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks(CHUNK))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, &b)| *a += b));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a_s: &mut candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<()> {
        same_shaped_kernel_into("add_same_into", "add_into", (a_s, al), &[(bs, bl)])
    }
}

/// `a + b`, same shapes, CUDA only (see [`GradKernels`]).
struct AddSame;

impl CustomOp2 for AddSame {
    fn name(&self) -> &'static str {
        "kiln-add"
    }

    super::cuda_only_cpu_fwd!(2, "GradKernels uses candle's addition elsewhere");

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a_s: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        same_shaped_kernel("add_same", "grad_kernels", &[(a_s, al), (bs, bl)])
    }
}

#[cfg(test)]
mod tests;
