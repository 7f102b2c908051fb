//! kiln's CPU convolution (f32): im2col + one matrix multiply per image, images in parallel
//! (3x3 stride-1 padding-1 ones with enough channels go to [`winograd`] instead).
//! The weight gradient, which candle computes slowly, is one multiply per image too, summed over
//! fixed chunks of images in a fixed order, so results do not depend on the thread count.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::geometry::{with_scratch, Geometry};
use super::{winograd, ConvParams};
use crate::ops::gemm::{matmul, matmul_nt, Matrix};
use crate::ops::{contiguous_f32, par_collect, par_zeros};

/// `x` [N, C, H, W] convolved with `weight` [CO, C, KH, KW], no bias: contiguous f32 on the CPU.
pub(super) fn conv2d(x: &Tensor, weight: &Tensor, p: ConvParams) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Conv2dOp { p })
}

/// `y + bias` over the channels, contiguous f32 on the CPU.
pub(super) fn add_bias(y: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    y.contiguous()?.apply_op2(&bias.contiguous()?, ChannelBias)
}

/// Images per partial weight-gradient sum in the fused SimpleCNN block: fixed, so the summation
/// order is too.
const IMAGES_PER_CHUNK: usize = 8;

/// The fewest columns (output pixels, over several images) a convolution's matrix multiply
/// gets: below that the multiply runs far from the cores' peak.
const COLUMNS_PER_MULTIPLY: usize = 512;

/// Partial sums of a convolution's weight gradient (fewer where the batch has fewer groups of
/// images): enough to keep every core busy, few enough that zeroing and adding them is cheap.
const WEIGHT_GRAD_LANES: usize = 8;

/// The most output pixels an image's plane has for [`Geometry::im2col_by_map`].
const SMALL_PLANE: usize = 64;

impl Geometry {
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
        self.im2col_at(image, col, self.out_pixels());
    }

    /// The same into the first `out_pixels` columns of a wider matrix whose rows are `width`
    /// apart: several images' unfoldings side by side, for one matrix multiply.
    fn im2col_at(&self, image: &[f32], col: &mut [f32], width: usize) {
        if self.out_pixels() <= SMALL_PLANE {
            self.im2col_by_map(image, col, width);
        } else if self.p.stride == 1 && self.ow == self.w {
            self.im2col_same_width(image, col, width);
        } else {
            self.im2col_by_rows(image, col, width);
        }
    }

    /// `im2col_at` for small output planes (ResNet's last two stages: 8x8 and 4x4), where each
    /// row copy or fill is a few floats and a call: each tap's row is gathered through a map of
    /// source pixels, made once per image, with no call inside the loops.
    pub(super) fn im2col_by_map(&self, image: &[f32], col: &mut [f32], width: usize) {
        let (hw, ohw, taps) = (self.h * self.w, self.out_pixels(), self.kh * self.kw);
        // The source pixel of each tap and output pixel; `hw` (out of the plane) for padding.
        let mut map = Vec::with_capacity(taps * ohw);
        for ky in 0..self.kh {
            for kx in 0..self.kw {
                for oy in 0..self.oh {
                    let iy = self.source(oy, ky, self.h);
                    map.extend(
                        (0..self.ow).map(|ox| match (iy, self.source(ox, kx, self.w)) {
                            (Some(iy), Some(ix)) => iy * self.w + ix,
                            _ => hw,
                        }),
                    );
                }
            }
        }
        // Each plane with a zero after it, which padding reads: the gather has no branch, and
        // no bounds check once the index is clamped to the copy's length.
        let mut padded = vec![0f32; hw + 1];
        for (ci, plane) in image.chunks_exact(hw).take(self.c).enumerate() {
            padded[..hw].copy_from_slice(plane);
            for (t, sources) in map.chunks_exact(ohw).enumerate() {
                let row = &mut col[(ci * taps + t) * width..][..ohw];
                for (v, &i) in row.iter_mut().zip(sources) {
                    *v = padded[i.min(hw)];
                }
            }
        }
    }

    /// `im2col_at` for any geometry: one copy or strided gather per output row and tap.
    pub(super) fn im2col_by_rows(&self, image: &[f32], col: &mut [f32], width: usize) {
        let (hw, ohw, stride) = (self.h * self.w, self.out_pixels(), self.p.stride);
        for ci in 0..self.c {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &mut col[((ci * self.kh + ky) * self.kw + kx) * width..][..ohw];
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

    /// `im2col_at` where the output is as wide as the input (stride 1, a kernel 2 * padding + 1
    /// wide: ResNet's 3x3 and 1x1 convolutions, and their input gradients). Each tap's unfolded
    /// row is then the channel's plane shifted by a constant: one block copy per tap, not one
    /// per output row, and a zero written where each row wraps into its neighbour. (Per-row
    /// copies of 4 to 32 floats were 51 million calls a ResNet-18 step, 16% of its time.)
    pub(super) fn im2col_same_width(&self, image: &[f32], col: &mut [f32], width: usize) {
        let (hw, w, ohw) = (self.h * self.w, self.w, self.out_pixels());
        let pad = self.p.padding as isize;
        for ci in 0..self.c {
            let plane = &image[ci * hw..][..hw];
            for ky in 0..self.kh {
                // Output rows whose tap row lies inside the input; the rest read padding.
                let dy = ky as isize - pad;
                let rows_start = (-dy).clamp(0, self.oh as isize) as usize;
                let rows_end =
                    (self.h as isize - dy).clamp(rows_start as isize, self.oh as isize) as usize;
                for kx in 0..self.kw {
                    let row = &mut col[((ci * self.kh + ky) * self.kw + kx) * width..][..ohw];
                    let dx = kx as isize - pad;
                    // Output pixel i reads plane[i + offset], within the rows above.
                    let offset = dy * w as isize + dx;
                    let start = ((rows_start * w) as isize).max(-offset).min(ohw as isize) as usize;
                    let end = ((rows_end * w) as isize)
                        .min(hw as isize - offset)
                        .max(start as isize) as usize;
                    row[..start].fill(0.0);
                    row[end..].fill(0.0);
                    if start < end {
                        let from = (start as isize + offset) as usize;
                        row[start..end].copy_from_slice(&plane[from..][..end - start]);
                    }
                    // Columns whose tap falls off the row's left or right end read padding.
                    let edge = if dx < 0 {
                        0..((-dx) as usize).min(w)
                    } else {
                        w.saturating_sub(dx as usize)..w
                    };
                    for oy in rows_start..rows_end {
                        row[oy * w..][edge.clone()]
                            .iter_mut()
                            .for_each(|v| *v = 0.0);
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

    /// Images unfolded side by side into one matrix multiply: enough that the multiply has at
    /// least COLUMNS_PER_MULTIPLY columns (ResNet's last stage has 16 output pixels an image, too
    /// few for a multiply on their own). Fixed by the shape alone, so the weight gradient's
    /// partial sums, and the result, do not depend on the thread count.
    fn images_per_multiply(&self) -> usize {
        COLUMNS_PER_MULTIPLY
            .div_ceil(self.out_pixels().max(1))
            .clamp(1, self.n.max(1))
    }

    /// Unfolds the `count` images of `x` side by side into `col` [patch x count * out_pixels].
    fn unfold(&self, x: &[f32], count: usize, col: &mut [f32]) {
        let width = count * self.out_pixels();
        for (i, image) in x.chunks_exact(self.image()).take(count).enumerate() {
            self.im2col_at(image, &mut col[i * self.out_pixels()..], width);
        }
    }

    /// `count` images' [CO x out_pixels] blocks of `nchw` side by side into `wide`
    /// [CO x count * out_pixels].
    fn widen(&self, nchw: &[f32], wide: &mut [f32], count: usize) {
        let (ohw, width) = (self.out_pixels(), count * self.out_pixels());
        for i in 0..count {
            for co in 0..self.co {
                wide[co * width + i * ohw..][..ohw]
                    .copy_from_slice(&nchw[(i * self.co + co) * ohw..][..ohw]);
            }
        }
    }

    /// The inverse of [`Geometry::widen`].
    fn narrow_back(&self, wide: &[f32], nchw: &mut [f32], count: usize) {
        let (ohw, width) = (self.out_pixels(), count * self.out_pixels());
        for i in 0..count {
            for co in 0..self.co {
                nchw[(i * self.co + co) * ohw..][..ohw]
                    .copy_from_slice(&wide[co * width + i * ohw..][..ohw]);
            }
        }
    }

    /// Folds the first `out_pixels` columns of `col` (rows `width` apart) back onto one image,
    /// adding overlapping taps into what `image` holds (zeros, for the adjoint of `im2col_at`).
    fn col2im_at(&self, col: &[f32], image: &mut [f32], width: usize) {
        let (hw, ohw, stride) = (self.h * self.w, self.out_pixels(), self.p.stride);
        for ci in 0..self.c {
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = &col[((ci * self.kh + ky) * self.kw + kx) * width..][..ohw];
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

/// The convolution of `x` by `weight` as `g` describes them: groups of images unfolded side by
/// side, one matrix multiply per group.
fn forward(x: &[f32], weight: &[f32], g: &Geometry) -> Vec<f32> {
    if winograd::applies(g) {
        return winograd::forward(x, weight, g);
    }
    let kernel = Matrix::rows(weight, g.co, g.patch());
    let (ohw, m) = (g.out_pixels(), g.images_per_multiply());
    let mut out = par_zeros(g.n * g.co * ohw);
    out.par_chunks_mut(m * g.co * ohw)
        .zip(x.par_chunks(m * g.image()))
        .for_each(|(out, x)| {
            let count = x.len() / g.image();
            let wide = if count > 1 { g.co * count * ohw } else { 0 };
            with_scratch(g.patch() * count * ohw, wide, |col, wide| {
                g.unfold(x, count, col);
                let col = Matrix::rows(col, g.patch(), count * ohw);
                if count == 1 {
                    matmul(kernel, col, out, false);
                } else {
                    matmul(kernel, col, wide, false);
                    g.narrow_back(wide, out, count);
                }
            })
        });
    out
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
        let out = forward(x, weight, &g);
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
/// N, H and W with strided sums, slow on the CPU; here each contiguous plane is summed in turn.
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
        // dW^T [patch x CO] = the sum over groups of images of the unfolded input [patch x
        // pixels] times dY^T [pixels x CO]: the larger operand is read as it lies, only dY
        // across. Each lane, a fixed run of consecutive groups, accumulates its groups in one
        // partial sum; the lanes are then added in index order as dW is turned back to
        // [CO x patch]. Lanes depend on the shape alone, so the result does not depend on the
        // thread count.
        let (ohw, m, size) = (g.out_pixels(), g.images_per_multiply(), g.co * g.patch());
        let groups = g.n.div_ceil(m);
        let lane_images = (groups.div_ceil(groups.clamp(1, WEIGHT_GRAD_LANES)) * m).max(1);
        let partials: Vec<Vec<f32>> = x
            .par_chunks(lane_images * g.image())
            .zip(grad.par_chunks(lane_images * g.co * ohw))
            .map(|(x, grad)| {
                let mut partial = vec![0f32; size];
                let groups = x.chunks(m * g.image()).zip(grad.chunks(m * g.co * ohw));
                for (x, grad) in groups {
                    let count = x.len() / g.image();
                    let wide = if count > 1 { g.co * count * ohw } else { 0 };
                    with_scratch(g.patch() * count * ohw, wide, |col, wide| {
                        g.unfold(x, count, col);
                        let dy = if count > 1 {
                            g.widen(grad, wide, count);
                            &*wide
                        } else {
                            grad
                        };
                        matmul(
                            Matrix::rows(col, g.patch(), count * ohw),
                            Matrix::rows(dy, g.co, count * ohw).t(),
                            &mut partial,
                            true,
                        );
                    });
                }
                partial
            })
            .collect();
        let total = sum_transposed(partials, g.patch(), g.co);
        Ok((CpuStorage::F32(total), Shape::from(self.kernel)))
    }
}

/// The sum of `partials` (each [rows x cols] row-major, added in index order), transposed to
/// [cols x rows]. Both passes run in parallel: done serially, the sums and the transpose of
/// ResNet's 2.4M-float weight gradients kept one core busy while the others waited.
fn sum_transposed(mut partials: Vec<Vec<f32>>, rows: usize, cols: usize) -> Vec<f32> {
    /// Floats each task adds: long enough to stream, short enough for every core to get some.
    const STRIP: usize = 1 << 14;
    /// Rows of the result each task writes.
    const BAND: usize = 64;
    const TILE: usize = 16;
    let mut out = par_zeros(rows * cols);
    let Some((sum, rest)) = partials.split_first_mut() else {
        return out;
    };
    sum.par_chunks_mut(STRIP)
        .enumerate()
        .for_each(|(strip, sum)| {
            for partial in rest.iter() {
                let terms = &partial[strip * STRIP..][..sum.len()];
                sum.iter_mut().zip(terms).for_each(|(s, t)| *s += t);
            }
        });
    let sum = &*sum;
    // In 16 x 16 tiles: a result row's 16 floats (one cache line) are written together, from
    // 16 source lines that the tile's other rows read too. (Writing a whole band's rows in step
    // put 64 lines 18 KB apart into two sets of the L1 cache.)
    out.par_chunks_mut(BAND * rows.max(1))
        .enumerate()
        .for_each(|(band, out)| {
            let band_cols = out.len() / rows.max(1);
            for c0 in (0..band_cols).step_by(TILE) {
                for r0 in (0..rows).step_by(TILE) {
                    for c in c0..(c0 + TILE).min(band_cols) {
                        let source = band * BAND + c;
                        let line = &mut out[c * rows + r0..][..TILE.min(rows - r0)];
                        for (i, v) in line.iter_mut().enumerate() {
                            *v = sum[(r0 + i) * cols + source];
                        }
                    }
                }
            }
        });
    out
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
        let (kh, kw, pad) = (g.kh, g.kw, self.p.padding);
        if self.p.stride == 1 && kh == kw && pad < kh {
            // With stride 1, dL/dX is dL/dY convolved by the weight turned around (channels
            // swapped, taps reversed) with padding k - 1 - p: the forward kernel, with no
            // unfolded gradient to fold back (col2im).
            let taps = kh * kw;
            let flipped = par_collect(weight.len(), g.co * taps, |ci| {
                (0..g.co).flat_map(move |co| {
                    weight[(co * g.c + ci) * taps..][..taps]
                        .iter()
                        .rev()
                        .copied()
                })
            });
            let turned = ConvParams {
                stride: 1,
                padding: kh - 1 - pad,
            };
            let back = Geometry::new((g.n, g.co, g.oh, g.ow), (g.c, g.co, kh, kw), turned)?;
            let dx = forward(grad, &flipped, &back);
            return Ok((CpuStorage::F32(dx), Shape::from(self.input)));
        }
        let kernel_t = Matrix::rows(weight, g.co, g.patch()).t();
        let (ohw, m) = (g.out_pixels(), g.images_per_multiply());
        // Zeroed once here: col2im adds each image's taps into it.
        let mut dx = par_zeros(g.n * g.image());
        dx.par_chunks_mut(m * g.image())
            .zip(grad.par_chunks(m * g.co * ohw))
            .for_each(|(dx, grad)| {
                let count = dx.len() / g.image();
                let width = count * ohw;
                let wide = if count > 1 { g.co * width } else { 0 };
                with_scratch(g.patch() * width, wide, |col, wide| {
                    if count == 1 {
                        matmul(kernel_t, Matrix::rows(grad, g.co, ohw), col, false);
                    } else {
                        g.widen(grad, wide, count);
                        matmul(kernel_t, Matrix::rows(wide, g.co, width), col, false);
                    }
                    for (i, image) in dx.chunks_exact_mut(g.image()).enumerate() {
                        g.col2im_at(&col[i * ohw..], image, width);
                    }
                })
            });
        Ok((CpuStorage::F32(dx), Shape::from(self.input)))
    }
}
