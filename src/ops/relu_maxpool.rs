//! ReLU then max-pooling (kernel = stride, as `nn.MaxPool2d(k)`), fused: one pass forward,
//! one pass backward. candle builds the same gradient from about a dozen full-size tensor
//! operations (upsample, compare, average-pool, multiply, ...). Max-pooling and ReLU commute,
//! so this is also `max_pool2d(relu(x))`.
//!
//! The gradient goes to the first maximum of each window, as PyTorch's does, and only where
//! that maximum is positive (ReLU's gradient). Elsewhere (CUDA, Metal, other dtypes): a
//! composition of candle operations, the reference the tests hold the kernels to.
//!
//! That composition avoids candle's own `max_pool2d`, whose gradient is k² times too small
//! (it divides by the window size, meaning to share the gradient between tied maxima): with
//! SGD, the layer under the pool would learn k² times slower than in PyTorch.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;

/// `max_pool2d(relu(x), k)` on `x` [N, C, H, W]; odd edges are dropped, as PyTorch does.
pub fn relu_max_pool2d(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(ReluMaxPool { k })
    } else {
        relu_max_pool2d_reference(x, k)
    }
}

/// The same from candle operations, windows made by reshaping: the reference for tests, and the
/// path on other backends. Its gradient is exact (see the module note on `max_pool2d`).
pub fn relu_max_pool2d_reference(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / k, w / k);
    x.relu()?
        .narrow(2, 0, oh * k)?
        .narrow(3, 0, ow * k)?
        .reshape((n, c, oh, k, ow, k))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((n, c, oh, ow, k * k))?
        .max(4)
}

/// The input plane geometry and its pooled size.
#[derive(Clone, Copy)]
pub(super) struct Pool {
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) k: usize,
}

impl Pool {
    pub(super) fn out(&self) -> (usize, usize) {
        (self.h / self.k, self.w / self.k)
    }

    /// The flat index (within the plane) of the first maximum of window (oy, ox), and its value.
    pub(super) fn window_max(&self, plane: &[f32], oy: usize, ox: usize) -> (usize, f32) {
        let mut best = (oy * self.k * self.w + ox * self.k, f32::NEG_INFINITY);
        for dy in 0..self.k {
            let row = (oy * self.k + dy) * self.w + ox * self.k;
            for (dx, &v) in plane[row..row + self.k].iter().enumerate() {
                if v > best.1 {
                    best = (row + dx, v);
                }
            }
        }
        best
    }
}

struct ReluMaxPool {
    k: usize,
}

impl CustomOp1 for ReluMaxPool {
    fn name(&self) -> &'static str {
        "kiln-relu-max-pool2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = layout.shape().dims4()?;
        let pool = Pool { h, w, k: self.k };
        let (oh, ow) = pool.out();
        let x = contiguous_f32(storage, layout, "input")?;
        let mut out = vec![0f32; n * c * oh * ow];
        if oh * ow > 0 {
            out.par_chunks_mut(oh * ow)
                .zip(x.par_chunks(h * w))
                .for_each(|(out_plane, plane)| {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            out_plane[oy * ow + ox] = pool.window_max(plane, oy, ox).1.max(0.0);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &grad.contiguous()?,
            &ReluMaxPoolGrad { k: self.k },
        )?))
    }
}

/// dL/dX from the input and dL/dY: each window's gradient to its first maximum, if positive.
struct ReluMaxPoolGrad {
    k: usize,
}

impl CustomOp2 for ReluMaxPoolGrad {
    fn name(&self) -> &'static str {
        "kiln-relu-max-pool2d-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let pool = Pool { h, w, k: self.k };
        let (oh, ow) = pool.out();
        let (x, grad) = (
            contiguous_f32(xs, xl, "input")?,
            contiguous_f32(gs, gl, "gradient")?,
        );
        let mut dx = vec![0f32; n * c * h * w];
        if oh * ow > 0 {
            dx.par_chunks_mut(h * w)
                .zip(x.par_chunks(h * w))
                .zip(grad.par_chunks(oh * ow))
                .for_each(|((dx_plane, plane), grad_plane)| {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let (at, max) = pool.window_max(plane, oy, ox);
                            if max > 0.0 {
                                dx_plane[at] = grad_plane[oy * ow + ox];
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(dx), Shape::from((n, c, h, w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{non_contiguous, random_tensor as random};
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    fn output_and_grad(
        f: fn(&Tensor, usize) -> candle_core::Result<Tensor>,
        x: &Tensor,
        k: usize,
        transposed: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let var = Var::from_tensor(x).unwrap();
        let input = if transposed {
            non_contiguous(var.as_tensor())
        } else {
            var.as_tensor().clone()
        };
        let y = f(&input, k).unwrap();
        let upstream = random(y.dims(), 7);
        let grads = (&y * &upstream)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (flat(&y), flat(grads.get(&var).unwrap()))
    }

    #[test]
    fn the_whole_gradient_goes_to_the_maximum_as_in_pytorch() {
        // torch: max_pool2d(relu(x), 2) on this window, upstream -0.72, gives [0, 0, 0, -0.72].
        let x = Tensor::new(&[[[[0.1f32, -0.3], [0.2, 0.4774]]]], &Device::Cpu).unwrap();
        let var = Var::from_tensor(&x).unwrap();
        let y = relu_max_pool2d(var.as_tensor(), 2).unwrap();
        let grads = (y * -0.72).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(grad, [0.0, 0.0, 0.0, -0.72]);
        // candle's own max_pool2d gives a quarter of that: why the reference avoids it.
        let y = var.as_tensor().relu().unwrap().max_pool2d(2).unwrap();
        let grads = (y * -0.72).unwrap().sum_all().unwrap().backward().unwrap();
        let candle = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            (candle[3] - -0.18).abs() < 1e-6,
            "candle's max_pool2d gradient changed: {candle:?}"
        );
    }

    /// Integer values tie: PyTorch gives a window's gradient to its first maximum in row-major
    /// order (max_pool2d(relu(x), 2) on [[1, 3], [3, 2]] sends it to the top-right 3), and a
    /// window whose maximum is not positive (all zeros after ReLU) passes none.
    #[test]
    fn ties_go_to_the_first_maximum() {
        let x = Tensor::new(&[[[[1f32, 3., 0., -1.], [3., 2., 0., 0.]]]], &Device::Cpu).unwrap();
        let var = Var::from_tensor(&x).unwrap();
        let y = relu_max_pool2d(var.as_tensor(), 2).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [3.0, 0.0]
        );
        let grads = y.sum_all().unwrap().backward().unwrap();
        let grad = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(grad, [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_the_reference_composition(
            n in 1usize..4, c in 1usize..4, h in 2usize..11, w in 2usize..11, k in 1usize..4,
            transposed in any::<bool>(), seed in 0u64..1000,
        ) {
            prop_assume!(h >= k && w >= k);
            let x = random(&[n, c, h, w], seed);
            let ours = output_and_grad(relu_max_pool2d, &x, k, transposed);
            let reference = output_and_grad(relu_max_pool2d_reference, &x, k, transposed);
            // Both pick one element per window and multiply by the same upstream value: exact.
            prop_assert_eq!(ours, reference);
        }
    }
}
