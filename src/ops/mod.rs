//! kiln's own hot operations, as candle custom ops with a forward and a backward. Each keeps
//! candle's plain composition as its reference (the tests hold the kernels to it) and as the
//! path for backends and dtypes it does not cover (Metal; CUDA where no kernel is written).
//! With the `cuda` feature, each op's CUDA kernels sit beside it in a .cu file (`gelu.cu`,
//! `batch_norm/kernels.cu`, ...), compiled by build.rs as one PTX module through `kernels.cu`.

/// The `cpu_fwd` of a custom op that has a CUDA kernel alone (its callers compose candle's
/// operations elsewhere), for an op of arity 1, 2 or 3: it fails, naming the op, with the hint
/// (what runs off CUDA) where one is given. Written once so that each such op says only
/// `cuda_only_cpu_fwd!(2)` or `cuda_only_cpu_fwd!(1, "hint")` in its impl.
macro_rules! cuda_only_cpu_fwd {
    ($arity:tt) => {
        $crate::ops::cuda_only_cpu_fwd!($arity, "");
    };
    (1, $hint:literal) => {
        $crate::ops::cuda_only_cpu_fwd!(@fn $hint, _s1 _l1);
    };
    (2, $hint:literal) => {
        $crate::ops::cuda_only_cpu_fwd!(@fn $hint, _s1 _l1 _s2 _l2);
    };
    (3, $hint:literal) => {
        $crate::ops::cuda_only_cpu_fwd!(@fn $hint, _s1 _l1 _s2 _l2 _s3 _l3);
    };
    // One (storage, layout) pair of parameters per operand, as CustomOp1/2/3 declare them.
    (@fn $hint:literal, $($storage:ident $layout:ident)+) => {
        fn cpu_fwd(
            &self,
            $($storage: &candle_core::CpuStorage, $layout: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            $crate::ops::cuda_only(self.name(), $hint)
        }
    };
}
pub(crate) use cuda_only_cpu_fwd;

/// The error of a CUDA-only op run on other tensors: `op` is its name, `hint` (may be empty)
/// what runs there instead.
pub(crate) fn cuda_only<T>(op: &str, hint: &str) -> candle_core::Result<T> {
    if hint.is_empty() {
        candle_core::bail!("{op}: CUDA tensors only")
    }
    candle_core::bail!("{op}: CUDA tensors only ({hint})")
}

pub mod batch_norm;
pub mod conv;
pub mod conv_block;
pub mod cross_entropy;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod gather;
pub mod gelu;
mod gemm;
pub mod max_pool;
pub mod memory_format;
pub mod relu_maxpool;
pub mod residual;

pub use batch_norm::{
    batch_norm_add_relu_train, batch_norm_eval, batch_norm_train, batch_norm_train_synced,
    Activation, BatchNormOutput, BatchStatistics, CrossReplicaSum, NormInputs, ResidualEndOutput,
    Shortcut,
};
pub use conv::{conv2d, conv2d_channels_last, ConvParams};
pub use conv_block::conv_relu_pool;
pub use cross_entropy::{batch_tally, cross_entropy};
pub use gather::{gather_normalise, gather_normalise_into, Augmentation, Normalisation, Positions};
pub use gelu::gelu;
pub use max_pool::{max_pool2d, PoolParams};
pub use memory_format::MemoryFormat;
pub use relu_maxpool::relu_max_pool2d;
pub use residual::{add_relu, GradKernels};

use candle_core::{CpuStorage, Device, Layout, Tensor};
use rayon::prelude::*;

/// Loads ahead of the first training step what its kernels would load on first use: on CUDA,
/// kiln's kernels, candle's modules that a step runs and cuDNN's handle with its libraries;
/// nothing elsewhere. The train binary runs it beside loading the data. The
/// first step's larger cost, cuDNN's engines loading on their first use and its plans, is what
/// [`crate::train::warm_up`] takes out of the first epoch.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn prepare(device: &Device) -> candle_core::Result<()> {
    let _span = tracing::info_span!("prepare").entered();
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        cuda::prepare(cuda)?;
        #[cfg(feature = "cudnn")]
        conv::prepare(cuda)?;
    }
    Ok(())
}

/// Every `step`-th element of `t` along `dim`, from the first: a reshape of the zero-padded
/// view and a narrow, both with plain gradients.
pub(crate) fn every_nth(t: &Tensor, dim: usize, step: usize) -> candle_core::Result<Tensor> {
    if step == 1 {
        return Ok(t.clone());
    }
    let len = t.dim(dim)?;
    let kept = len.div_ceil(step);
    let padded = t.pad_with_zeros(dim, 0, kept * step - len)?;
    let mut dims = padded.dims().to_vec();
    dims[dim] = kept;
    dims.insert(dim + 1, step);
    padded
        .reshape(dims)?
        .narrow(dim + 1, 0, 1)?
        .squeeze(dim + 1)
}

/// `len` floats made in parallel, `chunk` at a time: `values(i)` yields chunk i's values in
/// order. They are written straight into the new vector: zero-filling an output first, on the
/// thread that called the op, cost a pass over every activation while the compute threads
/// waited.
pub(crate) fn par_collect<I: Iterator<Item = f32>>(
    len: usize,
    chunk: usize,
    values: impl Fn(usize) -> I + Sync,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, slots)| {
            let mut written = 0;
            for (slot, v) in slots.iter_mut().zip(values(i)) {
                slot.write(v);
                written += 1;
            }
            assert_eq!(
                written,
                slots.len(),
                "par_collect: chunk {i} came out short"
            );
        });
    // SAFETY: each chunk of the first `len` slots was written whole, or its assertion panicked
    // before this line.
    unsafe { out.set_len(len) };
    out
}

/// `len` zeros, written in parallel: for outputs that a multiply or a sum fills afterwards.
pub(crate) fn par_zeros(len: usize) -> Vec<f32> {
    par_collect(len, 1 << 16, |_| std::iter::repeat(0.0))
}

/// The f32 data of a contiguous CPU tensor argument (`what` names it in the error).
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("kiln op: {what} must be a contiguous f32 tensor"),
    }
}

/// The same, for a tensor an in-place op writes.
pub(crate) fn contiguous_f32_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => candle_core::bail!("kiln op: {what} must be a contiguous f32 tensor"),
    }
}

/// The u32 data (labels, indices) of a contiguous CPU tensor argument.
fn contiguous_u32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [u32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::U32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("kiln op: {what} must be a contiguous u32 tensor"),
    }
}

/// A tensor of values uniform in [-1, 1), the same for the same seed (for the ops' tests).
#[cfg(test)]
pub(crate) fn random_tensor(shape: &[usize], seed: u64) -> candle_core::Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.iter().product())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    candle_core::Tensor::from_vec(values, shape, &candle_core::Device::Cpu)
        .expect("the shape fits the values")
}

/// The same values as `t` [N, C, H, W] in a non-contiguous view: NCWH storage seen as NCHW.
#[cfg(test)]
fn non_contiguous(t: &candle_core::Tensor) -> candle_core::Tensor {
    let transposed = t.transpose(2, 3).and_then(|t| t.contiguous());
    transposed
        .and_then(|t| t.transpose(2, 3))
        .expect("a rank-4 tensor")
}

#[cfg(test)]
mod tests {
    use super::par_collect;

    #[test]
    fn par_collect_writes_every_chunk_in_order_the_last_one_short() {
        let values = par_collect(10, 4, |i| (0..4).map(move |j| (i * 4 + j) as f32));
        assert_eq!(values, (0..10).map(|k| k as f32).collect::<Vec<_>>());
    }

    #[test]
    #[should_panic(expected = "came out short")]
    fn a_chunk_with_too_few_values_panics_before_the_vector_is_used() {
        par_collect(10, 4, |_| std::iter::once(1.0));
    }
}
