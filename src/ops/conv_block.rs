//! SimpleCNN's block in one op: conv2d + bias -> ReLU -> max-pool (kernel = stride = k).
//!
//! Separately, each stage hands candle a full-size gradient that its backward pass allocates,
//! zero-fills and adds into (4 MB per stage at batch 64). Fused, the forward pass keeps each
//! window's winner (the first maximum, if positive) and the backward pass goes straight from
//! the pooled gradient to the weight and bias gradients, one chunk of images at a time.
//! On the CPU, and on CUDA where the input needs no gradient (a first layer, as in SimpleCNN);
//! elsewhere (Metal, other dtypes, a CUDA block fed by another layer) it is the unfused
//! composition of kiln's ops.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;
use wide::f32x8;

use super::conv::{conv2d, ConvParams, Geometry, InputGrad};
use super::gemm::{matmul, Matrix};
use super::relu_maxpool::relu_max_pool2d;
use super::{contiguous_f32, contiguous_u32};

/// A window whose maximum was not positive: ReLU passes no gradient back through it.
const NO_WINNER: u32 = u32::MAX;

/// Channels the CPU forward pass pools at once (one `f32x8`: two SSE or one AVX vector).
const LANES: usize = 8;

/// The CPU forward pass carries pixel indices in f32 lanes, exact below 2^24.
const MAX_POOLED_PIXELS: usize = 1 << 24;

/// The first `LANES` values of `values` (callers pass at least that many).
fn lanes(values: &[f32]) -> [f32; LANES] {
    let mut lanes = [0.0; LANES];
    lanes.copy_from_slice(&values[..LANES]);
    lanes
}

/// `max_pool2d(relu(conv2d(x, weight) + bias), k)`; without a bias, a zero one.
pub fn conv_relu_pool(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
    k: usize,
) -> candle_core::Result<Tensor> {
    let zeros;
    let bias = match bias {
        Some(bias) => bias,
        None => {
            zeros = Tensor::zeros(weight.dim(0)?, weight.dtype(), weight.device())?;
            &zeros
        }
    };
    let f32s = [x.dtype(), weight.dtype(), bias.dtype()]
        .iter()
        .all(|d| *d == DType::F32);
    let ours = f32s
        && match x.device() {
            Device::Cpu => true,
            // The CUDA kernels compute no input gradient.
            Device::Cuda(_) => cfg!(feature = "cuda") && !x.track_op(),
            Device::Metal(_) => false,
        };
    if ours {
        let op = ConvReluPool {
            p,
            k,
            winners: Mutex::default(),
        };
        x.contiguous()?
            .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
    } else {
        relu_max_pool2d(&conv2d(x, weight, Some(bias), p)?, k)
    }
}

/// Sizes of the block: the convolution's, and the pooled output's.
#[derive(Clone, Copy)]
struct Block {
    g: Geometry,
    k: usize,
    ph: usize,
    pw: usize,
}

impl Block {
    fn new(g: Geometry, k: usize) -> candle_core::Result<Self> {
        if k == 0 {
            candle_core::bail!("conv_relu_pool: pooling kernel must be at least 1");
        }
        Ok(Self {
            g,
            k,
            ph: g.oh / k,
            pw: g.ow / k,
        })
    }
    fn pooled(&self) -> usize {
        self.ph * self.pw
    }
    fn per_image(&self) -> usize {
        self.g.co * self.pooled()
    }
    /// The pooled output's shape [N, CO, PH, PW].
    fn out_shape(&self) -> Shape {
        Shape::from((self.g.n, self.g.co, self.ph, self.pw))
    }

    /// Bias, ReLU and max-pool of one image's conv output `conv` [OHW x CO] into `out`
    /// [CO x pooled], keeping each window's winner (its first maximum, if positive) as an index
    /// into the channel-major [CO x OHW] output that the backward pass and the CUDA kernels
    /// use. The bias is the same across a window, so it is added to the maximum alone.
    fn pool(&self, conv: &[f32], bias: &[f32], out: &mut [f32], winners: &mut [u32]) {
        let (co, ow, k) = (self.g.co, self.g.ow, self.k);
        let vectors = co / LANES;
        let (ohw, pooled) = (self.g.out_pixels(), self.pooled());
        let mut keep = |c: usize, o: usize, best: f32, at: u32| {
            let positive = best > 0.0;
            out[c * pooled + o] = if positive { best } else { 0.0 };
            winners[c * pooled + o] = if positive {
                (c * ohw) as u32 + at
            } else {
                NO_WINNER
            };
        };
        for py in 0..self.ph {
            for px in 0..self.pw {
                let o = py * self.pw + px;
                let corner = py * k * ow + px * k;
                // Eight channels at a time as one vector, comparing each pixel's row in order;
                // the pixel index rides along as an f32 lane (exact: see MAX_POOLED_PIXELS).
                for v in 0..vectors {
                    let first = v * LANES;
                    let mut best = f32x8::splat(f32::NEG_INFINITY);
                    let mut at = f32x8::splat(0.0);
                    for pixel in (0..k).flat_map(|dy| (0..k).map(move |dx| dy * ow + dx)) {
                        let pixel = corner + pixel;
                        let row = f32x8::from(lanes(&conv[pixel * co + first..]));
                        let wins = row.simd_gt(best);
                        best = wins.bitselect(row, best);
                        at = wins.bitselect(f32x8::splat(pixel as f32), at);
                    }
                    let best: [f32; LANES] = (best + f32x8::from(lanes(&bias[first..]))).into();
                    let at: [f32; LANES] = at.into();
                    for l in 0..LANES {
                        keep(first + l, o, best[l], at[l] as u32);
                    }
                }
                for c in vectors * LANES..co {
                    let (mut best, mut at) = (f32::NEG_INFINITY, 0);
                    for pixel in (0..k).flat_map(|dy| (0..k).map(move |dx| dy * ow + dx)) {
                        let pixel = corner + pixel;
                        if conv[pixel * co + c] > best {
                            (best, at) = (conv[pixel * co + c], pixel as u32);
                        }
                    }
                    keep(c, o, best + bias[c], at);
                }
            }
        }
    }

    /// Routes one image's pooled gradient [CO x pooled] to its winners in `dconv` [CO x OHW].
    fn scatter(&self, grad: &[f32], winners: &[u32], dconv: &mut [f32]) {
        dconv.fill(0.0);
        for (&g, &at) in grad.iter().zip(winners) {
            if at != NO_WINNER {
                dconv[at as usize] = g;
            }
        }
    }

    /// The sizes as conv_block.cu's `Block`.
    #[cfg(feature = "cuda")]
    fn to_cuda(self) -> candle_core::Result<cuda::BlockSizes> {
        let g = self.g;
        let int = |v| super::cuda::int(v, "conv_relu_pool");
        Ok(cuda::BlockSizes {
            n: int(g.n)?,
            c: int(g.c)?,
            h: int(g.h)?,
            w: int(g.w)?,
            co: int(g.co)?,
            kh: int(g.kh)?,
            kw: int(g.kw)?,
            stride: int(g.p.stride)?,
            pad: int(g.p.padding)?,
            oh: int(g.oh)?,
            ow: int(g.ow)?,
            k: int(self.k)?,
            ph: int(self.ph)?,
            pw: int(self.pw)?,
        })
    }
}

struct ConvReluPool {
    p: ConvParams,
    k: usize,
    /// Per pooled output, the index in the image's conv output [CO x OHW] of its window's
    /// winner, or NO_WINNER: set by the forward pass, read by the backward pass.
    winners: Mutex<Option<Tensor>>,
}

impl ConvReluPool {
    fn keep_winners(&self, winners: Tensor) {
        *self.winners.lock().unwrap_or_else(|p| p.into_inner()) = Some(winners);
    }
}

impl CustomOp3 for ConvReluPool {
    fn name(&self) -> &'static str {
        "kiln-conv-relu-pool"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl.shape().dims4()?, wl.shape().dims4()?, self.p)?;
        let block = Block::new(g, self.k)?;
        let (x, weight, bias) = (
            contiguous_f32(xs, xl, "input")?,
            contiguous_f32(ws, wl, "weight")?,
            contiguous_f32(bs, bl, "bias")?,
        );
        check_bias(bias.len(), g.co)?;
        if g.out_pixels() > MAX_POOLED_PIXELS {
            candle_core::bail!(
                "conv_relu_pool: {}x{} conv outputs are past the CPU kernel's 2^24 pixels",
                g.oh,
                g.ow
            );
        }
        let kernel = Matrix::rows(weight, g.co, g.patch());
        let per_image = block.per_image();
        let mut out = vec![0f32; g.n * per_image];
        let mut winners = vec![NO_WINNER; g.n * per_image];
        if per_image > 0 {
            out.par_chunks_mut(per_image)
                .zip(winners.par_chunks_mut(per_image))
                .zip(x.par_chunks(g.image()))
                .for_each_init(
                    || {
                        (
                            vec![0f32; g.patch() * g.out_pixels()],
                            vec![0f32; g.out_pixels() * g.co],
                        )
                    },
                    |(col, conv), ((out, winners), image)| {
                        g.im2col(image, col);
                        // Pixel-major [OHW x CO]: a window's pixels are then rows of CO
                        // channels, compared a whole row at a time.
                        let cols = Matrix::rows(col, g.patch(), g.out_pixels());
                        matmul(cols.t(), kernel.t(), conv, false);
                        block.pool(conv, bias, out, winners);
                    },
                );
        }
        let count = winners.len();
        self.keep_winners(Tensor::from_vec(winners, count, &Device::Cpu)?);
        Ok((CpuStorage::F32(out), block.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::new(xl.shape().dims4()?, wl.shape().dims4()?, self.p)?;
        let block = Block::new(g, self.k)?;
        check_bias(bl.shape().elem_count(), g.co)?;
        let (out, winners) = cuda::forward(xs, xl, ws, wl, bs, bl, block)?;
        let count = g.n * block.per_image();
        self.keep_winners(super::cuda::tensor(winners, &xs.device, count));
        Ok((super::cuda::storage(out, &xs.device), block.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(winners) = self
            .winners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            candle_core::bail!("conv_relu_pool: backward before forward");
        };
        let grad = grad.contiguous()?;
        let g = Geometry::new(x.dims4()?, weight.dims4()?, self.p)?;
        let block = Block::new(g, self.k)?;
        // One buffer: the weight gradient, then the bias gradient.
        let both = x.apply_op3_no_bwd(&grad, &winners, &BlockGrads { block })?;
        let weights = g.co * g.patch();
        let grad_weight = both.narrow(0, 0, weights)?.reshape(weight.shape())?;
        let grad_bias = both.narrow(0, weights, g.co)?;
        let grad_x = if x.track_op() {
            let dconv = grad.apply_op2_no_bwd(&winners, &Scatter { block })?;
            Some(dconv.apply_op2_no_bwd(
                weight,
                &InputGrad {
                    p: self.p,
                    input: x.dims4()?,
                },
            )?)
        } else {
            None
        };
        Ok((grad_x, Some(grad_weight), Some(grad_bias)))
    }
}

fn check_bias(biases: usize, channels: usize) -> candle_core::Result<()> {
    if biases != channels {
        candle_core::bail!("conv_relu_pool: {biases} biases for {channels} channels");
    }
    Ok(())
}

/// dL/dW then dL/db, in one buffer [CO * patch + CO]: per image, the pooled gradient routed to
/// its winners, times the unfolded input (and summed, for the bias).
struct BlockGrads {
    block: Block,
}

impl CustomOp3 for BlockGrads {
    fn name(&self) -> &'static str {
        "kiln-conv-relu-pool-grads"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, g) = (self.block, self.block.g);
        let (x, grad, winners) = (
            contiguous_f32(xs, xl, "input")?,
            contiguous_f32(gs, gl, "gradient")?,
            contiguous_u32(ws, wl, "winners")?,
        );
        let per_image = b.per_image();
        let mut both = g.weight_grad(x, |i, dconv| {
            let at = i * per_image..(i + 1) * per_image;
            b.scatter(&grad[at.clone()], &winners[at], dconv)
        });
        let pooled = b.pooled();
        both.extend((0..g.co).map(|c| {
            (0..g.n)
                .map(|i| {
                    let at = (i * g.co + c) * pooled;
                    grad[at..at + pooled]
                        .iter()
                        .zip(&winners[at..at + pooled])
                        .filter(|(_, &w)| w != NO_WINNER)
                        .map(|(v, _)| v)
                        .sum::<f32>()
                })
                .sum::<f32>()
        }));
        let len = both.len();
        Ok((CpuStorage::F32(both), Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let g = self.block.g;
        let both = cuda::grads(xs, xl, gs, gl, ws, wl, self.block)?;
        Ok((
            super::cuda::storage(both, &xs.device),
            Shape::from(g.co * g.patch() + g.co),
        ))
    }
}

/// The pooled gradient routed to the conv output's shape [N, CO, OH, OW] (for dL/dX, CPU only).
struct Scatter {
    block: Block,
}

impl CustomOp2 for Scatter {
    fn name(&self) -> &'static str {
        "kiln-conv-relu-pool-scatter"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, g) = (self.block, self.block.g);
        let (grad, winners) = (
            contiguous_f32(gs, gl, "gradient")?,
            contiguous_u32(ws, wl, "winners")?,
        );
        let per_image = b.per_image();
        let mut dconv = vec![0f32; g.n * g.co * g.out_pixels()];
        if per_image > 0 {
            for (i, out) in dconv.chunks_mut(g.co * g.out_pixels()).enumerate() {
                b.scatter(
                    &grad[i * per_image..][..per_image],
                    &winners[i * per_image..][..per_image],
                    out,
                );
            }
        }
        Ok((CpuStorage::F32(dconv), Shape::from((g.n, g.co, g.oh, g.ow))))
    }
}

/// The block's kernels (conv_block.cu: conv_relu_pool_fwd, conv_relu_pool_wgrad, sum_chunks).
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout};

    use super::Block;
    use crate::ops::cuda::{kernel, output, per_item, view, THREADS};

    /// Images whose gradients one block sums before the chunks are added in order.
    const IMAGES_PER_CHUNK: usize = 8;

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(super) struct BlockSizes {
        pub n: i32,
        pub c: i32,
        pub h: i32,
        pub w: i32,
        pub co: i32,
        pub kh: i32,
        pub kw: i32,
        pub stride: i32,
        pub pad: i32,
        pub oh: i32,
        pub ow: i32,
        pub k: i32,
        pub ph: i32,
        pub pw: i32,
    }

    // SAFETY: plain i32 fields, laid out as conv_block.cu's `Block`.
    unsafe impl DeviceRepr for BlockSizes {}

    /// The pooled output and each window's winner.
    pub(super) fn forward(
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
        block: Block,
    ) -> candle_core::Result<(CudaSlice<f32>, CudaSlice<u32>)> {
        let dev = &xs.device;
        let (x, w, b) = (
            view::<f32>(xs, xl, "input")?,
            view::<f32>(ws, wl, "weight")?,
            view::<f32>(bs, bl, "bias")?,
        );
        let sizes = block.to_cuda()?;
        let items = block.g.n * block.per_image();
        let out = output::<f32>(dev, items)?;
        let winners = output::<u32>(dev, items)?;
        let func = kernel(dev, "conv_relu_pool_fwd")?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&x)
            .arg(&w)
            .arg(&b)
            .arg(&sizes)
            .arg(&out)
            .arg(&winners);
        // SAFETY: the arguments match the kernel's signature; it writes `items` of each output.
        unsafe { launch.launch(per_item(items)) }.w()?;
        Ok((out, winners))
    }

    /// The weight gradient [CO * patch] followed by the bias gradient [CO].
    pub(super) fn grads(
        xs: &CudaStorage,
        xl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        block: Block,
    ) -> candle_core::Result<CudaSlice<f32>> {
        let dev = &xs.device;
        let (x, grad, winners) = (
            view::<f32>(xs, xl, "input")?,
            view::<f32>(gs, gl, "gradient")?,
            view::<u32>(ws, wl, "winners")?,
        );
        let g = block.g;
        let sizes = block.to_cuda()?;
        let chunks = g.n.div_ceil(IMAGES_PER_CHUNK).max(1);
        let row = g.patch() + 1;
        let partial = output::<f32>(dev, chunks * g.co * row)?;
        let stream = dev.cuda_stream();
        let func = kernel(dev, "conv_relu_pool_wgrad")?;
        let mut launch = stream.launch_builder(&func);
        let per_chunk = IMAGES_PER_CHUNK as i32;
        launch
            .arg(&x)
            .arg(&grad)
            .arg(&winners)
            .arg(&sizes)
            .arg(&per_chunk)
            .arg(&partial);
        let cfg = LaunchConfig {
            grid_dim: (g.co as u32, chunks as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; block (co, chunk) writes its row.
        unsafe { launch.launch(cfg) }.w()?;

        let both = output::<f32>(dev, g.co * row)?;
        let func = kernel(dev, "sum_chunks")?;
        let mut launch = stream.launch_builder(&func);
        let (chunks, co, patch) = (chunks as i32, g.co as i32, g.patch() as i32);
        launch
            .arg(&partial)
            .arg(&chunks)
            .arg(&co)
            .arg(&patch)
            .arg(&both);
        // SAFETY: as above; one thread per output element.
        unsafe { launch.launch(per_item(g.co * row)) }.w()?;
        Ok(both)
    }
}

#[cfg(test)]
mod tests;
