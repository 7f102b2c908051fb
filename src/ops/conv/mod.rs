//! 2-D convolution, NCHW or channels last (NHWC), any kernel size (square or not), stride and
//! padding (no dilation, no groups), with the best engine each backend has:
//! - CPU, f32: kiln's kernels ([`cpu`]: im2col + gemm, a deterministic weight gradient;
//!   [`winograd`] F(2x2, 3x3) for 3x3 stride-1 convolutions and their input gradients);
//! - CUDA: cuDNN with the `cudnn` feature ([`cudnn`], either format read as it lies), else
//!   candle's conv2d; `tests/cuda.rs` holds their gradients to the CPU's;
//! - elsewhere (Metal, other dtypes): [`conv2d_portable`], shape operations and one matrix
//!   multiply. candle's own conv2d is avoided there: its weight gradient convolves transposed,
//!   non-contiguous tensors that Metal's im2col reads as if contiguous, and training silently
//!   diverges (huggingface/candle#3839).
//!
//! candle's conv2d on the CPU ([`conv2d_reference`]) is what the tests hold every path to.

#[cfg(feature = "cudnn")]
mod algorithm_cache;
mod bias;
mod cpu;
#[cfg(feature = "cudnn")]
mod cudnn;
#[cfg(feature = "cudnn")]
mod cudnn_graph;
#[cfg(feature = "cudnn")]
mod filter;
mod geometry;
mod winograd;

pub(crate) use cpu::InputGrad;
pub(crate) use geometry::Geometry;

use candle_core::{DType, Device, Tensor};

use super::{every_nth, MemoryFormat};

/// Makes the device's cuDNN handle (loading cuDNN's libraries) before the first convolution.
#[cfg(feature = "cudnn")]
pub(crate) fn prepare(device: &candle_core::CudaDevice) -> candle_core::Result<()> {
    cudnn::prepare(device)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvParams {
    pub stride: usize,
    pub padding: usize,
}

/// `nn.Conv2d`'s forward: `x` [N, C, H, W], `weight` [CO, C, KH, KW], `bias` [CO].
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
) -> candle_core::Result<Tensor> {
    let f32s = x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    let y = match x.device() {
        Device::Cpu if f32s => cpu::conv2d(x, weight, p)?,
        #[cfg(feature = "cudnn")]
        Device::Cuda(_) => cudnn::conv2d(x, weight, p, MemoryFormat::ChannelsFirst)?,
        #[cfg(not(feature = "cudnn"))]
        Device::Cuda(_) => x.conv2d(weight, p.padding, p.stride, 1, 1)?,
        _ => conv2d_portable(x, weight, p)?,
    };
    match bias {
        Some(b) if y.device().is_cpu() && y.dtype() == DType::F32 && b.dtype() == DType::F32 => {
            cpu::add_bias(&y, b)
        }
        Some(b) => add_bias_reference(&y, b),
        None => Ok(y),
    }
}

/// [`conv2d`] on channels-last data: `x` [N, H, W, C], `weight` [CO, C, KH, KW] (PyTorch's
/// layout, in which parameters are kept; any float type, convolved in `x`'s), `bias` [CO]; the
/// output is [N, OH, OW, CO]. cuDNN convolves it as it lies, with the weight as cuDNN's
/// channels-last filter [CO, KH, KW, C] (one kernel casts and transposes an f32 master weight,
/// one brings its gradient back); elsewhere it is the channels-first convolution between two
/// transposes.
pub fn conv2d_channels_last(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
) -> candle_core::Result<Tensor> {
    let last = MemoryFormat::ChannelsLast;
    let y = match x.device() {
        #[cfg(feature = "cudnn")]
        Device::Cuda(_) if cudnn::convolves(x.dtype(), x.dtype()) => {
            let filter = filter::channels_last_filter(weight, x.dtype())?;
            cudnn::conv2d(x, &filter, p, last)?
        }
        _ => {
            let weight = weight.to_dtype(x.dtype())?;
            last.from_nchw(&conv2d(&last.to_nchw(x)?, &weight, None, p)?)?
        }
    };
    match bias {
        Some(b) if cfg!(feature = "cuda") && y.device().is_cuda() && b.dtype() == y.dtype() => {
            bias::add(&y, b)
        }
        Some(b) => y.broadcast_add(&b.reshape(last.per_channel(b.dim(0)?))?),
        None => Ok(y),
    }
}

/// candle's own conv2d and bias: the reference for tests, all candle.
pub fn conv2d_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
) -> candle_core::Result<Tensor> {
    let y = x.conv2d(weight, p.padding, p.stride, 1, 1)?;
    match bias {
        Some(b) => add_bias_reference(&y, b),
        None => Ok(y),
    }
}

fn add_bias_reference(y: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)
}

/// The convolution from operations whose gradients are candle's basic ones on every backend:
/// zero padding, one strided view of the padded input per kernel tap, and one matrix multiply
/// of the unfolded input [N*OH*OW, C*KH*KW] by the weight. Every operand is made contiguous
/// before it is multiplied.
pub fn conv2d_portable(x: &Tensor, weight: &Tensor, p: ConvParams) -> candle_core::Result<Tensor> {
    let g = Geometry::new(x.dims4()?, weight.dims4()?, p)?;
    let padded = x
        .pad_with_zeros(2, p.padding, p.padding)?
        .pad_with_zeros(3, p.padding, p.padding)?;
    let mut taps = Vec::with_capacity(g.kh * g.kw);
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let rows = every_nth(
                &padded.narrow(2, ky, p.stride * (g.oh - 1) + 1)?,
                2,
                p.stride,
            )?;
            taps.push(every_nth(
                &rows.narrow(3, kx, p.stride * (g.ow - 1) + 1)?,
                3,
                p.stride,
            )?);
        }
    }
    // [N, C, OH, OW, KH*KW] -> [N, OH, OW, C, KH*KW]: rows in PyTorch's (c, ky, kx) order.
    let unfolded = Tensor::stack(&taps, 4)?
        .permute((0, 2, 3, 1, 4))?
        .contiguous()?
        .reshape((g.n * g.out_pixels(), g.patch()))?;
    let kernel = weight.reshape((g.co, g.patch()))?.t()?.contiguous()?;
    unfolded
        .matmul(&kernel)?
        .reshape((g.n, g.oh, g.ow, g.co))?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

#[cfg(test)]
mod tests;
