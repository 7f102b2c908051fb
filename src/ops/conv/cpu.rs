//! kiln's CPU convolution (f32): im2col + one matrix multiply per image, images in parallel.
//! The weight gradient, which candle computes slowly, is one multiply per image too, summed over
//! fixed chunks of images in a fixed order, so results do not depend on the thread count.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::ConvParams;
use crate::ops::contiguous_f32;
use crate::ops::gemm::{matmul, matmul_nt, Matrix};

/// `x` [N, C, H, W] convolved with `weight` [CO, C, KH, KW], no bias: contiguous f32 on the CPU.
pub(super) fn conv2d(x: &Tensor, weight: &Tensor, p: ConvParams) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Conv2dOp { p })
}

/// `y + bias` over the channels, contiguous f32 on the CPU.
pub(super) fn add_bias(y: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    y.contiguous()?.apply_op2(&bias.contiguous()?, ChannelBias)
}

/// Images per partial weight-gradient sum: fixed, so the summation order is too.
const IMAGES_PER_CHUNK: usize = 8;

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) co: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    pub(crate) p: ConvParams,
}

impl Geometry {
    pub(crate) fn new(
        x: (usize, usize, usize, usize),
        weight: (usize, usize, usize, usize),
        p: ConvParams,
    ) -> candle_core::Result<Self> {
        let (n, c, h, w) = x;
        let (co, ci, kh, kw) = weight;
        if ci != c {
            candle_core::bail!("conv2d: input has {c} channels, the kernel expects {ci}");
        }
        if p.stride == 0 || h + 2 * p.padding < kh || w + 2 * p.padding < kw {
            candle_core::bail!(
                "conv2d: kernel {kh}x{kw} does not fit input {h}x{w} with padding {}",
                p.padding
            );
        }
        let oh = (h + 2 * p.padding - kh) / p.stride + 1;
        let ow = (w + 2 * p.padding - kw) / p.stride + 1;
        Ok(Self {
            n,
            c,
            h,
            w,
            co,
            kh,
            kw,
            oh,
            ow,
            p,
        })
    }
    /// Rows of the unfolded input: one per (channel, ky, kx).
    pub(crate) fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }
    pub(crate) fn out_pixels(&self) -> usize {
        self.oh * self.ow
    }
    pub(crate) fn image(&self) -> usize {
        self.c * self.h * self.w
    }

    /// The input row and column that output (oy, ox) reads through kernel tap (ky, kx).
    fn source(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        (o * self.p.stride + k)
            .checked_sub(self.p.padding)
            .filter(|&i| i < size)
    }

    /// The outputs `o` in `0..outs` whose tap `k` reads inside `0..size` (the rest read padding),
    /// and the input index the first of them reads: each row of the unfolded input is then a
    /// slice copy (stride 1) or a strided gather, with no per-element test.
    fn inside(&self, k: usize, size: usize, outs: usize) -> (Range<usize>, usize) {
        let (s, pad) = (self.p.stride, self.p.padding);
        let start = pad.saturating_sub(k).div_ceil(s).min(outs);
        let end = (size + pad)
            .saturating_sub(k)
            .div_ceil(s)
            .clamp(start, outs);
        // Where none reads inside, nothing is read: 0 keeps the slicing in bounds.
        let first = if start < end { start * s + k - pad } else { 0 };
        (start..end, first)
    }

    /// Unfolds one image into `col` [patch x out_pixels], zeros where the kernel overhangs.
    pub(crate) fn im2col(&self, image: &[f32], col: &mut [f32]) {
        let (hw, ohw, stride) = (self.h * self.w, self.out_pixels(), self.p.stride);
        for ci in 0..self.c {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut col[((ci * self.kh + ky) * self.kw + kx) * ohw..][..ohw];
                    let (cols, first) = self.inside(kx, self.w, self.ow);
                    for oy in 0..self.oh {
                        let out = &mut row[oy * self.ow..][..self.ow];
                        let Some(iy) = self.source(oy, ky, self.h) else {
                            out.fill(0.0);
                            continue;
                        };
                        let line = &image[ci * hw + iy * self.w..][..self.w];
                        out[..cols.start].fill(0.0);
                        out[cols.end..].fill(0.0);
                        let out = &mut out[cols.clone()];
                        if stride == 1 {
                            out.copy_from_slice(&line[first..][..out.len()]);
                        } else {
                            let taps = line[first..].iter().step_by(stride);
                            out.iter_mut().zip(taps).for_each(|(v, x)| *v = *x);
                        }
                    }
                }
            }
        }
    }

    /// dL/dW = the sum over images of dY_i [CO x OHW] * col_i^T, where `output_grad(i, dy)`
    /// fills image i's dY. Images are summed in fixed chunks, and the chunks in index order, so
    /// the result does not depend on the number of threads.
    pub(crate) fn weight_grad(
        &self,
        x: &[f32],
        output_grad: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Vec<f32> {
        let size = self.co * self.patch();
        let images: Vec<usize> = (0..self.n).collect();
        let partials: Vec<Vec<f32>> = images
            .par_chunks(IMAGES_PER_CHUNK)
            .map(|chunk| {
                let mut sum = vec![0f32; size];
                let mut col = vec![0f32; self.patch() * self.out_pixels()];
                let mut dy = vec![0f32; self.co * self.out_pixels()];
                for &i in chunk {
                    output_grad(i, &mut dy);
                    self.im2col(&x[i * self.image()..][..self.image()], &mut col);
                    matmul_nt(&dy, &col, self.out_pixels(), &mut sum);
                }
                sum
            })
            .collect();
        let mut total = vec![0f32; size];
        for partial in &partials {
            total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
        }
        total
    }

    /// Folds `col` back onto one image, adding overlapping taps: the adjoint of `im2col`.
    pub(crate) fn col2im(&self, col: &[f32], image: &mut [f32]) {
        let (hw, ohw, stride) = (self.h * self.w, self.out_pixels(), self.p.stride);
        image.fill(0.0);
        for ci in 0..self.c {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &col[((ci * self.kh + ky) * self.kw + kx) * ohw..][..ohw];
                    let (cols, first) = self.inside(kx, self.w, self.ow);
                    for oy in 0..self.oh {
                        let Some(iy) = self.source(oy, ky, self.h) else {
                            continue;
                        };
                        let line = &mut image[ci * hw + iy * self.w..][..self.w];
                        let taps = line[first..].iter_mut().step_by(stride);
                        for (x, v) in taps.zip(&row[oy * self.ow..][cols.clone()]) {
                            *x += v;
                        }
                    }
                }
            }
        }
    }
}

struct Conv2dOp {
    p: ConvParams,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "kiln-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl.shape().dims4()?, wl.shape().dims4()?, self.p)?;
        let (x, weight) = (
            contiguous_f32(xs, xl, "input")?,
            contiguous_f32(ws, wl, "weight")?,
        );
        let kernel = Matrix::rows(weight, g.co, g.patch());
        let mut out = vec![0f32; g.n * g.co * g.out_pixels()];
        out.par_chunks_mut(g.co * g.out_pixels())
            .zip(x.par_chunks(g.image()))
            .for_each_init(
                || vec![0f32; g.patch() * g.out_pixels()],
                |col, (out_image, image)| {
                    g.im2col(image, col);
                    matmul(
                        kernel,
                        Matrix::rows(col, g.patch(), g.out_pixels()),
                        out_image,
                        false,
                    );
                },
            );
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.co, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grad_weight = x.apply_op2_no_bwd(
            &grad,
            &WeightGrad {
                p: self.p,
                kernel: weight.dims4()?,
            },
        )?;
        // Inputs that are data, not parameters or results of other ops, need no gradient.
        let grad_x = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                weight,
                &InputGrad {
                    p: self.p,
                    input: x.dims4()?,
                },
            )?)
        } else {
            None
        };
        Ok((grad_x, Some(grad_weight)))
    }
}

/// `y + bias` over the channels of `y` [N, C, H, W]. candle's broadcast-add gradient reduces over
/// N, H and W with strided sums (11 ms for SimpleCNN's batch of 64); here each contiguous plane
/// is summed in turn.
struct ChannelBias;

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "kiln-channel-bias"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = yl.shape().dims4()?;
        let (y, bias) = (
            contiguous_f32(ys, yl, "input")?,
            contiguous_f32(bs, bl, "bias")?,
        );
        if bias.len() != c {
            candle_core::bail!("kiln conv2d: {} biases for {c} channels", bias.len());
        }
        let mut out = y.to_vec();
        out.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(plane, values)| {
                let b = bias[plane % c];
                values.iter_mut().for_each(|v| *v += b);
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let grad_bias = grad.apply_op1_no_bwd(&ChannelSum)?;
        Ok((Some(grad), Some(grad_bias)))
    }
}

/// The sum of each channel of [N, C, H, W] over N, H and W, in a fixed order.
struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "kiln-channel-sum"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = gl.shape().dims4()?;
        let grad = contiguous_f32(gs, gl, "gradient")?;
        let sums: Vec<f32> = (0..c)
            .into_par_iter()
            .map(|ch| {
                (0..n)
                    .map(|i| grad[(i * c + ch) * h * w..][..h * w].iter().sum::<f32>())
                    .sum()
            })
            .collect();
        Ok((CpuStorage::F32(sums), Shape::from(c)))
    }
}

/// dL/dW from the input and dL/dY: the sum over images of dY_i [CO x OHW] * col_i^T.
struct WeightGrad {
    p: ConvParams,
    kernel: (usize, usize, usize, usize),
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "kiln-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(xl.shape().dims4()?, self.kernel, self.p)?;
        let (x, grad) = (
            contiguous_f32(xs, xl, "input")?,
            contiguous_f32(gs, gl, "gradient")?,
        );
        let per_image = g.co * g.out_pixels();
        let total = g.weight_grad(x, |i, dy| {
            dy.copy_from_slice(&grad[i * per_image..][..per_image])
        });
        Ok((CpuStorage::F32(total), Shape::from(self.kernel)))
    }
}

/// dL/dX from dL/dY and the weight: col2im(W^T [patch x CO] * dY_i) per image.
pub(crate) struct InputGrad {
    pub(crate) p: ConvParams,
    pub(crate) input: (usize, usize, usize, usize),
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "kiln-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(self.input, wl.shape().dims4()?, self.p)?;
        let (grad, weight) = (
            contiguous_f32(gs, gl, "gradient")?,
            contiguous_f32(ws, wl, "weight")?,
        );
        let kernel_t = Matrix::rows(weight, g.co, g.patch()).t();
        let mut dx = vec![0f32; g.n * g.image()];
        dx.par_chunks_mut(g.image())
            .zip(grad.par_chunks(g.co * g.out_pixels()))
            .for_each_init(
                || vec![0f32; g.patch() * g.out_pixels()],
                |col, (dx_image, grad_image)| {
                    matmul(
                        kernel_t,
                        Matrix::rows(grad_image, g.co, g.out_pixels()),
                        col,
                        false,
                    );
                    g.col2im(col, dx_image);
                },
            );
        Ok((CpuStorage::F32(dx), Shape::from(self.input)))
    }
}
