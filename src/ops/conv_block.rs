//! SimpleCNN's block in one op: conv2d + bias -> ReLU -> max-pool (kernel = stride = k).
//!
//! Separately, each stage hands candle a full-size gradient that its backward pass allocates,
//! zero-fills and adds into (4 MB per stage at batch 64). Fused, the forward pass keeps each
//! window's winner (the first maximum, if positive) and the backward pass goes straight from
//! the pooled gradient to the weight and bias gradients, one chunk of images at a time.
//! Elsewhere (CUDA, Metal, other dtypes) it is the unfused composition of kiln's ops.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use super::conv2d::{conv2d, ConvParams, Geometry, InputGrad};
use super::gemm::{matmul, Matrix};
use super::relu_maxpool::{relu_max_pool2d, Pool};

/// A window whose maximum was not positive: ReLU passes no gradient back through it.
const NO_WINNER: u32 = u32::MAX;

/// `max_pool2d(relu(conv2d(x, weight) + bias), k)`.
pub fn conv_relu_pool(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    p: ConvParams,
    k: usize,
) -> candle_core::Result<Tensor> {
    let ours = x.device().is_cpu()
        && [x.dtype(), weight.dtype(), bias.dtype()]
            .iter()
            .all(|d| *d == DType::F32);
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
            ph: g.oh / k,
            pw: g.ow / k,
        })
    }
    fn pooled(&self) -> usize {
        self.ph * self.pw
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
}

struct ConvReluPool {
    p: ConvParams,
    k: usize,
    /// Per pooled output, the index in the image's conv output [CO x OHW] of its window's
    /// winner, or NO_WINNER: set by the forward pass, read by the backward pass.
    winners: Mutex<Option<Arc<Vec<u32>>>>,
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
        if bias.len() != g.co {
            candle_core::bail!(
                "conv_relu_pool: {} biases for {} channels",
                bias.len(),
                g.co
            );
        }
        let kernel = Matrix::rows(weight, g.co, g.patch());
        let per_image = g.co * block.pooled();
        let mut out = vec![0f32; g.n * per_image];
        let mut winners = vec![NO_WINNER; g.n * per_image];
        // Pooling runs over the conv output's planes.
        let pool = Pool {
            h: g.oh,
            w: g.ow,
            k: self.k,
        };
        if per_image > 0 {
            out.par_chunks_mut(per_image)
                .zip(winners.par_chunks_mut(per_image))
                .zip(x.par_chunks(g.image()))
                .for_each_init(
                    || {
                        (
                            vec![0f32; g.patch() * g.out_pixels()],
                            vec![0f32; g.co * g.out_pixels()],
                        )
                    },
                    |(col, conv), ((out, winners), image)| {
                        g.im2col(image, col);
                        for (plane, b) in conv.chunks_mut(g.out_pixels()).zip(bias) {
                            plane.fill(*b);
                        }
                        matmul(
                            kernel,
                            Matrix::rows(col, g.patch(), g.out_pixels()),
                            conv,
                            true,
                        );
                        for (c, plane) in conv.chunks(g.out_pixels()).enumerate() {
                            for py in 0..block.ph {
                                for px in 0..block.pw {
                                    let (at, best) = pool.window_max(plane, py, px);
                                    let o = (c * block.ph + py) * block.pw + px;
                                    if best > 0.0 {
                                        out[o] = best;
                                        winners[o] = (c * g.out_pixels() + at) as u32;
                                    }
                                }
                            }
                        }
                    },
                );
        }
        *self.winners.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(winners));
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.n, g.co, block.ph, block.pw)),
        ))
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
        let grad_weight = x.apply_op2_no_bwd(
            &grad,
            &BlockWeightGrad {
                block,
                winners: winners.clone(),
            },
        )?;
        let grad_bias = grad.apply_op1_no_bwd(&BlockBiasGrad {
            block,
            winners: winners.clone(),
        })?;
        let grad_x = if x.track_op() {
            let dconv = grad.apply_op1_no_bwd(&Scatter { block, winners })?;
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

/// dL/dW: per image, the pooled gradient routed to its winners, times the unfolded input.
struct BlockWeightGrad {
    block: Block,
    winners: Arc<Vec<u32>>,
}

impl CustomOp2 for BlockWeightGrad {
    fn name(&self) -> &'static str {
        "kiln-conv-relu-pool-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, g) = (self.block, self.block.g);
        let (x, grad) = (
            contiguous_f32(xs, xl, "input")?,
            contiguous_f32(gs, gl, "gradient")?,
        );
        let per_image = g.co * b.pooled();
        let total = g.weight_grad(x, |i, dconv| {
            let at = i * per_image..(i + 1) * per_image;
            b.scatter(&grad[at.clone()], &self.winners[at], dconv)
        });
        Ok((CpuStorage::F32(total), Shape::from((g.co, g.c, g.kh, g.kw))))
    }
}

/// dL/db: per channel, the sum of the pooled gradient over windows that had a winner.
struct BlockBiasGrad {
    block: Block,
    winners: Arc<Vec<u32>>,
}

impl CustomOp1 for BlockBiasGrad {
    fn name(&self) -> &'static str {
        "kiln-conv-relu-pool-bias-grad"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, g) = (self.block, self.block.g);
        let grad = contiguous_f32(gs, gl, "gradient")?;
        let pooled = b.pooled();
        let sums = (0..g.co)
            .map(|c| {
                (0..g.n)
                    .map(|i| {
                        let at = (i * g.co + c) * pooled;
                        grad[at..at + pooled]
                            .iter()
                            .zip(&self.winners[at..at + pooled])
                            .filter(|(_, &w)| w != NO_WINNER)
                            .map(|(v, _)| v)
                            .sum::<f32>()
                    })
                    .sum()
            })
            .collect();
        Ok((CpuStorage::F32(sums), Shape::from(g.co)))
    }
}

/// The pooled gradient routed to the conv output's shape [N, CO, OH, OW] (for dL/dX).
struct Scatter {
    block: Block,
    winners: Arc<Vec<u32>>,
}

impl CustomOp1 for Scatter {
    fn name(&self) -> &'static str {
        "kiln-conv-relu-pool-scatter"
    }

    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, g) = (self.block, self.block.g);
        let grad = contiguous_f32(gs, gl, "gradient")?;
        let per_image = g.co * b.pooled();
        let mut dconv = vec![0f32; g.n * g.co * g.out_pixels()];
        if per_image > 0 {
            for (i, out) in dconv.chunks_mut(g.co * g.out_pixels()).enumerate() {
                b.scatter(
                    &grad[i * per_image..][..per_image],
                    &self.winners[i * per_image..][..per_image],
                    out,
                );
            }
        }
        Ok((CpuStorage::F32(dconv), Shape::from((g.n, g.co, g.oh, g.ow))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::conv2d_reference;
    use crate::ops::random_tensor as random;
    use crate::ops::relu_maxpool::relu_max_pool2d_reference;
    use candle_core::Var;
    use proptest::prelude::*;

    type Block = fn(&Tensor, &Tensor, &Tensor, ConvParams, usize) -> candle_core::Result<Tensor>;

    /// Output and the gradients of x, weight and bias, flattened.
    fn run(f: Block, x: &Tensor, w: &Tensor, b: &Tensor, p: ConvParams, k: usize) -> Vec<Vec<f32>> {
        let (xv, wv, bv) = (
            Var::from_tensor(x).unwrap(),
            Var::from_tensor(w).unwrap(),
            Var::from_tensor(b).unwrap(),
        );
        let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), p, k).unwrap();
        let upstream = random(y.dims(), 5);
        let grads = (&y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        vec![
            flat(&y),
            flat(grads.get(&xv).unwrap()),
            flat(grads.get(&wv).unwrap()),
            flat(grads.get(&bv).unwrap()),
        ]
    }

    fn unfused(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        p: ConvParams,
        k: usize,
    ) -> candle_core::Result<Tensor> {
        relu_max_pool2d(&conv2d(x, w, Some(b), p)?, k)
    }

    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        p: ConvParams,
        k: usize,
    ) -> candle_core::Result<Tensor> {
        relu_max_pool2d_reference(&conv2d_reference(x, w, Some(b), p)?, k)
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn matches_the_unfused_ops_and_the_reference(
            n in 1usize..4, c in 1usize..4, co in 1usize..5, h in 2usize..10, w in 2usize..10,
            kernel in 1usize..4, stride in 1usize..3, padding in 0usize..2, k in 1usize..3, seed in 0u64..1000,
        ) {
            prop_assume!(h + 2 * padding >= kernel && w + 2 * padding >= kernel);
            let p = ConvParams { stride, padding };
            prop_assume!((h + 2 * padding - kernel) / stride + 1 >= k && (w + 2 * padding - kernel) / stride + 1 >= k);
            let (x, weight, bias) = (random(&[n, c, h, w], seed), random(&[co, c, kernel, kernel], seed + 1), random(&[co], seed + 2));
            let fused = run(conv_relu_pool, &x, &weight, &bias, p, k);
            let parts = run(unfused, &x, &weight, &bias, p, k);
            for (name, (a, b)) in ["output", "input grad", "weight grad", "bias grad"].iter().zip(fused.iter().zip(&parts)) {
                prop_assert!(close(a, b), "{} differs from the unfused ops", name);
            }
            // candle's own conv backward works only where the stride tiles the padded input. With
            // padding >= kernel some outputs see no pixel, only the bias: tied maxima, where
            // candle's max reduction gives every tie the gradient and PyTorch (and kiln) the first.
            let tiles = (h + 2 * padding - kernel) % stride == 0 && (w + 2 * padding - kernel) % stride == 0;
            if tiles && padding < kernel {
                let reference = run(reference, &x, &weight, &bias, p, k);
                for (name, (a, b)) in ["output", "input grad", "weight grad", "bias grad"].iter().zip(fused.iter().zip(&reference)) {
                    prop_assert!(close(a, b), "{} differs from the reference", name);
                }
            }
        }
    }
}
