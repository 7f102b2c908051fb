//! The elementwise ends of a residual block, and the backward pass's gradient sums:
//! `relu(a + b)` with its gradient gate read from the output, and `a + b` of two gradients of
//! one tensor, passed through the tensor's ReLU in the same pass where it ends in one. kiln's
//! kernels on the CPU (f32, in parallel chunks) and CUDA (f32, bf16 or f16, eight values a thread
//! in 16-byte accesses: `add_relu_fwd`, `relu_gate`, `add_same`, `add_gated` in kernels.cu);
//! candle's composition elsewhere, which is also the reference for the tests. Any memory format:
//! each value meets only its partners.
use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, TensorId,
};

#[cfg(feature = "cuda")]
use super::cuda::by_float;
use super::{contiguous_f32, par_collect};
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

/// `f(a, b)` for each pair of elements of `a` and `b` (equally long), in parallel chunks.
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    const CHUNK: usize = 1 << 14;
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

/// The names of kiln's nodes that end in a ReLU, whose output's summed gradient
/// [`add_gradients`] passes through it.
const RELU_ENDED: [&str; 2] = [ADD_RELU, super::batch_norm::BATCH_NORM_ADD_RELU];

const ADD_RELU: &str = "kiln-add-relu";

pub(crate) struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        ADD_RELU
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
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let gated = through_relu(grad, y)?;
        Ok((Some(gated.clone()), Some(gated)))
    }
}

/// The ReLU-ended outputs whose gradient [`add_gradients`] has summed and passed through their
/// ReLU, until their node's backward pass takes it as it comes. Only the backward pass fills
/// and empties it, within one `backward`; tensor ids are never reused.
static GATED_IN_THE_SUM: Mutex<Option<HashSet<TensorId>>> = Mutex::new(None);

/// `grad` through a ReLU whose output is `y`, for a ReLU-ended node's backward pass: as it
/// comes where [`add_gradients`] already gated it, else kiln's kernel.
pub(crate) fn through_relu(grad: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let already = GATED_IN_THE_SUM
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_mut()
        .is_some_and(|ids| ids.remove(&y.id()));
    if already {
        Ok(grad.clone())
    } else {
        grad.contiguous()?.apply_op2_no_bwd(y, &ReluGate)
    }
}

/// `a + b` as the backward pass sums two gradients of one tensor, `of` (a residual block's
/// input): kiln's vectorised kernel for same-shaped f32, bf16 or f16 tensors on CUDA (candle's
/// addition moves bf16 two bytes a thread, 4 ms of a ResNet-50 step at batch 512 on an H200),
/// candle's addition elsewhere. `device::open` installs it as candle's gradient addition.
///
/// Where `of` is the output of a ReLU-ended node (the previous block's end), the kernel passes
/// the sum through that ReLU too (`add_gated`: the gradient is then read and written once, not
/// twice), and the node's backward pass takes it as it comes ([`through_relu`]). The gradient
/// the store holds for `of` is then the one before its ReLU; candle drops it once `of`'s node
/// has used it, so no caller sees it.
pub fn add_gradients(of: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let same = a.shape() == b.shape() && a.dtype() == b.dtype();
    let on_cuda = cfg!(feature = "cuda") && a.device().is_cuda();
    if !(same && on_cuda && matches!(a.dtype(), DType::F32 | DType::BF16 | DType::F16)) {
        return a.add(b);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let relu_ended =
        candle_core::backprop::custom_op_name(of).is_some_and(|n| RELU_ENDED.contains(&n));
    if relu_ended && of.shape() == a.shape() && of.dtype() == a.dtype() && of.is_contiguous() {
        let sum = a.apply_op3_no_bwd(&b, of, &AddGated)?;
        GATED_IN_THE_SUM
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(HashSet::new)
            .insert(of.id());
        Ok(sum)
    } else {
        a.apply_op2_no_bwd(&b, &AddSame)
    }
}

/// `a + b` where `y > 0`, else 0: two gradients of a ReLU's output `y` summed and passed through
/// it, same shapes, CUDA only (see [`add_gradients`]).
struct AddGated;

impl CustomOp3 for AddGated {
    fn name(&self) -> &'static str {
        "kiln-add-gated"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("kiln-add-gated: CUDA tensors only (add_gradients adds elsewhere)")
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
            "add_gradients",
            &[(a_s, al), (bs, bl), (ys, yl)],
        )
    }
}

/// `a + b`, same shapes, CUDA only (see [`add_gradients`]).
struct AddSame;

impl CustomOp2 for AddSame {
    fn name(&self) -> &'static str {
        "kiln-add"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "kiln-add: CUDA tensors only (add_gradients uses candle's addition elsewhere)"
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        a_s: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        same_shaped_kernel("add_same", "add_gradients", &[(a_s, al), (bs, bl)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::random_tensor as random;
    use candle_core::Var;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn add_relu_matches_candles_composition(n in 1usize..40_000, seed in 0u64..1000) {
            let a = Var::from_tensor(&random(&[n], seed)).unwrap();
            let b = Var::from_tensor(&random(&[n], seed + 1)).unwrap();
            let outputs = |fused: bool| {
                let (x, y) = (a.as_tensor(), b.as_tensor());
                let out = if fused {
                    add_relu(x, y).unwrap()
                } else {
                    relu(&(x + y).unwrap()).unwrap()
                };
                let grads = (&out * random(&[n], 3)).unwrap().sum_all().unwrap().backward().unwrap();
                [out, grads.get(&a).unwrap().clone(), grads.get(&b).unwrap().clone()]
                    .map(|t| t.to_vec1::<f32>().unwrap())
            };
            let (fused, composed) = (outputs(true), outputs(false));
            for (name, (x, y)) in ["output", "lhs grad", "rhs grad"].iter().zip(fused.iter().zip(&composed)) {
                prop_assert_eq!(x, y, "{}", name);
            }
        }
    }

    /// At a sum of exactly 0, add-ReLU passes no gradient, as PyTorch's ReLU.
    #[test]
    fn add_relu_passes_no_gradient_where_the_sum_is_zero() {
        let a =
            Var::from_tensor(&Tensor::new(&[-0.9159355f32, 0.5], &Device::Cpu).unwrap()).unwrap();
        let b = Tensor::new(&[0.9159355f32, 0.25], &Device::Cpu).unwrap();
        let y = add_relu(a.as_tensor(), &b).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let grad = grads.get(&a).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(grad, vec![0.0, 1.0]);
    }
}
