//! 2-D convolution, NCHW, any kernel size, stride and padding (no dilation, no groups).
//!
//! On the CPU with f32, kiln's own kernels: im2col + one matrix multiply per image, images in
//! parallel. The weight gradient, which candle computes slowly, is one multiply per image too,
//! summed over fixed chunks of images in a fixed order, so results do not depend on the
//! thread count. Elsewhere (CUDA, Metal, other dtypes), candle's own conv2d: the reference that
//! the tests hold the kernels to.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::gemm::{matmul, matmul_nt, Matrix};

/// Images per partial weight-gradient sum: fixed, so the summation order is too.
const IMAGES_PER_CHUNK: usize = 8;

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
    let ours = x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    let y = if ours {
        x.contiguous()?
            .apply_op2(&weight.contiguous()?, Conv2dOp { p })?
    } else {
        x.conv2d(weight, p.padding, p.stride, 1, 1)?
    };
    add_bias(y, bias)
}

/// candle's composition of the same convolution: the reference for tests.
pub fn conv2d_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    p: ConvParams,
) -> candle_core::Result<Tensor> {
    add_bias(x.conv2d(weight, p.padding, p.stride, 1, 1)?, bias)
}

fn add_bias(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) if y.device().is_cpu() && y.dtype() == DType::F32 && b.dtype() == DType::F32 => {
            y.contiguous()?.apply_op2(&b.contiguous()?, ChannelBias)
        }
        Some(b) => add_bias_reference(y, b),
        None => Ok(y),
    }
}

fn add_bias_reference(y: Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)
}

/// A convolution layer's parameters, in PyTorch's layout (`nn.Conv2d` with its default bias);
/// models pass them to [`conv2d`] or to a fused op such as `conv_relu_pool`.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub params: ConvParams,
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) co: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) p: ConvParams,
}

impl Geometry {
    pub(super) fn new(
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
    pub(super) fn patch(&self) -> usize {
        self.c * self.kh * self.kw
    }
    pub(super) fn out_pixels(&self) -> usize {
        self.oh * self.ow
    }
    pub(super) fn image(&self) -> usize {
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
    pub(super) fn im2col(&self, image: &[f32], col: &mut [f32]) {
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
    pub(super) fn weight_grad(
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
    pub(super) fn col2im(&self, col: &[f32], image: &mut [f32]) {
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
pub(super) struct InputGrad {
    pub(super) p: ConvParams,
    pub(super) input: (usize, usize, usize, usize),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{non_contiguous, random_tensor as random};
    use candle_core::Var;
    use proptest::prelude::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff / scale
    }

    /// Output and every gradient (input, weight, bias) of `f`, under a random upstream gradient.
    fn run(
        f: fn(&Tensor, &Tensor, Option<&Tensor>, ConvParams) -> candle_core::Result<Tensor>,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        p: ConvParams,
        transposed_input: bool,
    ) -> Vec<Tensor> {
        let (xv, wv, bv) = (
            Var::from_tensor(x).unwrap(),
            Var::from_tensor(w).unwrap(),
            Var::from_tensor(b).unwrap(),
        );
        let input = if transposed_input {
            non_contiguous(xv.as_tensor())
        } else {
            xv.as_tensor().clone()
        };
        let y = f(&input, wv.as_tensor(), Some(bv.as_tensor()), p).unwrap();
        let upstream = random(y.dims(), 99);
        let grads = (&y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = |v: &Var| grads.get(v).unwrap().clone();
        vec![y, grad(&xv), grad(&wv), grad(&bv)]
    }

    /// <a, b>, and <|a|, |b|> as the scale its rounding error grows with.
    fn dot(a: &Tensor, b: &Tensor) -> (f32, f32) {
        let value = (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = (a.abs().unwrap() * b.abs().unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        (value, scale.max(1.0))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn kernels_match_the_reference_composition(
            n in 1usize..4, c in 1usize..4, co in 1usize..5, h in 1usize..9, w in 1usize..9,
            k in 1usize..4, stride in 1usize..3, padding in 0usize..3, transposed in any::<bool>(), seed in 0u64..1000,
        ) {
            prop_assume!(h + 2 * padding >= k && w + 2 * padding >= k);
            let p = ConvParams { stride, padding };
            let x = random(&[n, c, h, w], seed);
            let weight = random(&[co, c, k, k], seed + 1);
            let bias = random(&[co], seed + 2);
            let ours = run(conv2d, &x, &weight, &bias, p, transposed);
            let (output, grad_x, grad_w, grad_b) = (&ours[0], &ours[1], &ours[2], &ours[3]);
            let reference_output = conv2d_reference(&x, &weight, Some(&bias), p).unwrap();
            prop_assert!(max_diff(output, &reference_output) < 1e-5);

            // Convolution is linear in x and in w, so its gradients are its adjoints: for any
            // probe, <conv(probe, w), u> = <probe, dX> and <conv(x, probe), u> = <probe, dW>.
            // These need only candle's forward.
            let upstream = random(output.dims(), 99);
            for j in 0..4 {
                let probe = random(x.dims(), 1000 + j);
                let (want, scale) = dot(&conv2d_reference(&probe, &weight, None, p).unwrap(), &upstream);
                let (got, _) = dot(&probe, grad_x);
                prop_assert!((want - got).abs() < 1e-5 * scale, "input grad: {} vs {}", got, want);
                let probe = random(weight.dims(), 2000 + j);
                let (want, scale) = dot(&conv2d_reference(&x, &probe, None, p).unwrap(), &upstream);
                let (got, _) = dot(&probe, grad_w);
                prop_assert!((want - got).abs() < 1e-5 * scale, "weight grad: {} vs {}", got, want);
            }
            let want_b = upstream.sum((0, 2, 3)).unwrap();
            prop_assert!(max_diff(grad_b, &want_b) < 1e-5);

            // candle's own backward, where it works: its input gradient comes out a column or
            // row short when the stride does not tile the padded input exactly.
            let tiles = (h + 2 * padding - k) % stride == 0 && (w + 2 * padding - k) % stride == 0;
            if tiles {
                let reference = run(conv2d_reference, &x, &weight, &bias, p, transposed);
                for (name, (a, b)) in ["input grad", "weight grad", "bias grad"].iter().zip(ours[1..].iter().zip(&reference[1..])) {
                    let d = max_diff(a, b);
                    prop_assert!(d < 1e-5, "{} differs by {} (relative)", name, d);
                }
            }
        }
    }

    #[test]
    fn simplecnn_shape_and_data_inputs_get_no_gradient() {
        let p = ConvParams {
            stride: 1,
            padding: 1,
        };
        let x = random(&[64, 3, 32, 32], 1);
        let w = Var::from_tensor(&random(&[16, 3, 3, 3], 2)).unwrap();
        let y = conv2d(&x, w.as_tensor(), None, p).unwrap();
        assert_eq!(y.dims(), &[64, 16, 32, 32]);
        let reference = conv2d_reference(&x, w.as_tensor(), None, p).unwrap();
        assert!(max_diff(&y, &reference) < 1e-5);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_none(), "the data tensor gets no gradient");
        assert!(grads.get(&w).is_some());
    }
}
