//! A residual block's end, `relu(batch_norm(main) + shortcut)` (the shortcut's own batch norm
//! inside it where it downsamples), as one node of the graph, and the same composed from its
//! parts.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

#[cfg(feature = "cuda")]
use super::kernel_sizes;
use super::{
    batch_norm_train, kept_statistics, kernels_take, Activation, BatchNormTrain, BatchStatistics,
};
#[cfg(feature = "cuda")]
use crate::ops::cuda::by_float;
use crate::ops::MemoryFormat;
#[cfg(feature = "cuda")]
use candle_core::backend::BackendStorage;

/// A batch norm's training inputs: the data and the layer's scale, shift and epsilon.
#[derive(Clone, Copy)]
pub struct NormInputs<'a> {
    pub x: &'a Tensor,
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub eps: f64,
}

/// What joins a residual block's end: the block's input as it is, or a downsampling
/// convolution's output through its own batch norm.
#[derive(Clone, Copy)]
pub enum Shortcut<'a> {
    Identity(&'a Tensor),
    Normalised(NormInputs<'a>),
}

/// What a residual block's end returns: its output, and the statistics of its batch norm and
/// of the shortcut's, where it has one.
pub struct ResidualEndOutput {
    pub y: Tensor,
    pub main: BatchStatistics,
    pub shortcut: Option<BatchStatistics>,
}

/// `relu(batch_norm(main) + shortcut)`, a residual block's end, as one node of the graph: the
/// normalised values (the shortcut's too, where it is normalised) live only inside it, so the
/// graph does not hold them until the backward pass (PyTorch does not hold the main ones
/// either: its ReLU overwrites the sum in place). Bit for bit [`batch_norm_train`]s without an
/// activation then [`add_relu`](crate::ops::add_relu): on the CPU it runs their kernels inside; on
/// CUDA the statistics' kernels, then one pass for normalising, adding and ReLU (each normalised
/// value rounded as it would have been stored), so the normalised tensors are never written.
/// Where kiln's kernels do not run, it is that composition.
pub fn batch_norm_add_relu_train(
    main: NormInputs,
    shortcut: Shortcut,
    format: MemoryFormat,
) -> candle_core::Result<ResidualEndOutput> {
    let joined = match shortcut {
        Shortcut::Identity(r) => r,
        Shortcut::Normalised(n) => n.x,
    };
    let matching = joined.dtype() == main.x.dtype() && joined.shape() == main.x.shape();
    let take = |n: &NormInputs| kernels_take(n.x, n.gamma, n.beta, format);
    let shortcut_taken = match &shortcut {
        Shortcut::Identity(_) => true,
        Shortcut::Normalised(n) => take(n),
    };
    if !(matching && take(&main) && shortcut_taken) {
        return residual_end_composed(main, shortcut, format);
    }
    let norm = |n: &NormInputs| BatchNormTrain {
        eps: n.eps,
        act: Activation::Identity,
        format,
        saved: Arc::new(Mutex::new(None)),
    };
    let op = BatchNormAddRelu {
        norm: norm(&main),
        shortcut_norm: match &shortcut {
            Shortcut::Identity(_) => None,
            Shortcut::Normalised(n) => Some(norm(n)),
        },
    };
    // A custom op takes three tensors: the scales and shifts travel as the rows of one.
    let parameters = match &shortcut {
        Shortcut::Identity(_) => Tensor::stack(&[main.gamma, main.beta], 0)?,
        Shortcut::Normalised(n) => Tensor::stack(&[main.gamma, main.beta, n.gamma, n.beta], 0)?,
    };
    let (main_saved, shortcut_saved) = (
        Arc::clone(&op.norm.saved),
        op.shortcut_norm.as_ref().map(|n| Arc::clone(&n.saved)),
    );
    let y = main
        .x
        .contiguous()?
        .apply_op3(&parameters, &joined.contiguous()?, op)?;
    Ok(ResidualEndOutput {
        y,
        main: kept_statistics(&main_saved)?,
        shortcut: shortcut_saved.map(|s| kept_statistics(&s)).transpose()?,
    })
}

/// [`batch_norm_add_relu_train`] from its parts, [`batch_norm_train`]s and
/// [`add_relu`](crate::ops::add_relu): where the fused node does not run, and what the tests hold it
/// to.
pub fn residual_end_composed(
    main: NormInputs,
    shortcut: Shortcut,
    format: MemoryFormat,
) -> candle_core::Result<ResidualEndOutput> {
    let train =
        |n: NormInputs| batch_norm_train(n.x, n.gamma, n.beta, n.eps, Activation::Identity, format);
    let (joined, shortcut) = match shortcut {
        Shortcut::Identity(r) => (r.clone(), None),
        Shortcut::Normalised(n) => {
            let (y, statistics) = train(n)?.split();
            (y, Some(statistics))
        }
    };
    let (y, main) = train(main)?.split();
    Ok(ResidualEndOutput {
        y: crate::ops::add_relu(&y, &joined)?,
        main,
        shortcut,
    })
}

/// [`batch_norm_add_relu_train`]'s node: arguments x, the parameters' rows [gamma; beta] (and
/// the shortcut's [gamma; beta] where it is normalised) and what joins.
struct BatchNormAddRelu {
    norm: BatchNormTrain,
    shortcut_norm: Option<BatchNormTrain>,
}

impl BatchNormAddRelu {
    /// Layouts of the parameters' rows `first` and `first + 1`: a batch norm's gamma and beta.
    fn rows(&self, pl: &Layout, first: usize) -> candle_core::Result<(Layout, Layout)> {
        let (rows, c) = pl.shape().dims2()?;
        let want = if self.shortcut_norm.is_some() { 4 } else { 2 };
        if rows != want || !pl.is_contiguous() {
            candle_core::bail!("batch_norm_add_relu: parameters must be a contiguous [{want}, C]");
        }
        let at = pl.start_offset() + first * c;
        Ok((
            Layout::contiguous_with_offset(c, at),
            Layout::contiguous_with_offset(c, at + c),
        ))
    }
}

impl CustomOp3 for BatchNormAddRelu {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-add-relu"
    }

    /// candle's backward pass gates the gradient (`residual::GradKernels`), in the sum where the
    /// output feeds several consumers (a residual block's end feeds the next block).
    fn relu_ended(&self) -> bool {
        true
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // The kernels apart: each BatchNorm's output, then add-ReLU reading it.
        let (gl, bl) = self.rows(pl, 0)?;
        let (normalised, shape) = self.norm.cpu_fwd(xs, xl, ps, &gl, ps, &bl)?;
        let joined = match &self.shortcut_norm {
            None => None,
            Some(norm) => {
                let (gl, bl) = self.rows(pl, 2)?;
                Some(norm.cpu_fwd(rs, rl, ps, &gl, ps, &bl)?)
            }
        };
        let (rs, rl) = match &joined {
            None => (rs, rl.clone()),
            Some((storage, shape)) => (storage, Layout::contiguous(shape)),
        };
        crate::ops::residual::AddRelu.cpu_fwd(&normalised, &Layout::contiguous(shape), rs, &rl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ps: &candle_core::CudaStorage,
        pl: &Layout,
        rs: &candle_core::CudaStorage,
        rl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        // Statistics, then one pass for the rest (`bn_add_relu`): the normalised tensors that
        // the CPU's composition writes and reads back are never stored.
        let (gl, bl) = self.rows(pl, 0)?;
        let stats = self.norm.cuda_statistics(xs, xl, ps, &gl, ps, &bl)?;
        let shortcut_stats = match &self.shortcut_norm {
            None => None,
            Some(norm) => {
                let (gl, bl) = self.rows(pl, 2)?;
                Some(norm.cuda_statistics(rs, rl, ps, &gl, ps, &bl)?)
            }
        };
        let sizes = kernel_sizes(xl, self.norm.format)?;
        let c = sizes.1;
        let dev = &xs.device;
        let y = {
            let main = super::cuda::scale_and_shift(&stats, c);
            let joined = shortcut_stats
                .as_ref()
                .map(|s| super::cuda::scale_and_shift(s, c));
            by_float!(xs.dtype(), T => crate::ops::cuda::storage(
                super::cuda::apply_add_relu::<T>(xs, xl, &main, rs, rl, joined.as_ref(), sizes)?,
                dev,
            ))
        };
        self.norm
            .keep(crate::ops::cuda::tensor(stats, dev, (5, c)))?;
        if let (Some(norm), Some(stats)) = (&self.shortcut_norm, shortcut_stats) {
            norm.keep(crate::ops::cuda::tensor(stats, dev, (5, c)))?;
        }
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _: &Tensor,
        joined: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // `grad` is already through the ReLU (`relu_ended`). BatchNormTrain's backward pass
        // reads only its input and the gradient.
        let norm_grads = |norm: &BatchNormTrain, input: &Tensor| {
            let (grad_input, grad_gamma, grad_beta) = norm.bwd(input, input, input, y, grad)?;
            match (grad_input, grad_gamma, grad_beta) {
                (Some(i), Some(g), Some(b)) => Ok((i, g, b)),
                _ => candle_core::bail!("batch_norm_add_relu: a gradient is missing"),
            }
        };
        let (grad_x, grad_gamma, grad_beta) = norm_grads(&self.norm, x)?;
        let (grad_parameters, grad_joined) = match &self.shortcut_norm {
            None => (Tensor::stack(&[grad_gamma, grad_beta], 0)?, grad.clone()),
            Some(norm) => {
                let (grad_r, grad_gamma_r, grad_beta_r) = norm_grads(norm, joined)?;
                let rows = [grad_gamma, grad_beta, grad_gamma_r, grad_beta_r];
                (Tensor::stack(&rows, 0)?, grad_r)
            }
        };
        Ok((Some(grad_x), Some(grad_parameters), Some(grad_joined)))
    }
}
