//! Max-pooling with any kernel, stride and padding, as `nn.MaxPool2d(k, stride, padding)`:
//! padding never wins (it counts as -inf), each window's gradient goes to its first maximum in
//! row-major order, and overlapping windows add up. torchvision's ResNet stem pools 3x3 with
//! stride 2 and padding 1, which SimpleCNN's non-overlapping `relu_max_pool2d` does not cover.
//! kiln's kernels on CUDA (either memory format) and on the CPU (f32, channels first); elsewhere
//! a composition of strided views and a maximum, which is also the reference for tests (it gives
//! tied maxima each the gradient).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, every_nth, MemoryFormat};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolParams {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl PoolParams {
    /// The pooled size of a side of `size`, or an error if the window does not fit.
    fn out(&self, size: usize) -> candle_core::Result<usize> {
        if self.kernel == 0 || self.stride == 0 || 2 * self.padding > self.kernel {
            candle_core::bail!(
                "max_pool2d: kernel {}, stride {}, padding {} is not a valid pooling",
                self.kernel,
                self.stride,
                self.padding
            );
        }
        if size + 2 * self.padding < self.kernel {
            candle_core::bail!(
                "max_pool2d: a {0}x{0} window does not fit a side of {size}",
                self.kernel
            );
        }
        Ok((size + 2 * self.padding - self.kernel) / self.stride + 1)
    }

    /// The input positions along one side that output `o` reads.
    fn window(&self, o: usize, size: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride).saturating_sub(self.padding);
        let end = (o * self.stride + self.kernel)
            .saturating_sub(self.padding)
            .min(size);
        start..end
    }

    /// `nn.MaxPool2d(k)`: k x k windows that tile the plane (stride k, no padding).
    pub fn tiles(k: usize) -> Self {
        Self {
            kernel: k,
            stride: k,
            padding: 0,
        }
    }
}

/// `nn.MaxPool2d(kernel, stride, padding)` over channels-first activations [N, C, H, W].
pub fn max_pool2d(x: &Tensor, p: PoolParams) -> candle_core::Result<Tensor> {
    max_pool2d_in(x, p, MemoryFormat::ChannelsFirst)
}

/// `nn.MaxPool2d(kernel, stride, padding)` over activations in `format`: kiln's kernels on CUDA
/// (either format, f32, bf16 or f16; `max_pool_fwd` and `max_pool_bwd` in max_pool.cu, eight
/// channels a thread in 16-byte accesses where channels last allows) and on the CPU (channels
/// first, f32); elsewhere strided views or reshaped windows and a maximum, whose gradient goes to
/// each tied maximum.
pub fn max_pool2d_in(
    x: &Tensor,
    p: PoolParams,
    format: MemoryFormat,
) -> candle_core::Result<Tensor> {
    let on_cuda = cfg!(feature = "cuda") && x.device().is_cuda();
    let cuda_kernels =
        on_cuda && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) && x.rank() == 4;
    let first = format == MemoryFormat::ChannelsFirst;
    let cpu_kernels = first && x.device().is_cpu() && x.dtype() == DType::F32;
    if cuda_kernels || cpu_kernels {
        return x.contiguous()?.apply_op1(Pool { p, format });
    }
    if first {
        return max_pool2d_reference(x, p);
    }
    if p != PoolParams::tiles(p.kernel) {
        return format.from_nchw(&max_pool2d(&format.to_nchw(x)?, p)?);
    }
    let k = p.kernel;
    let (n, h, w, c) = x.dims4()?;
    let (oh, ow) = (p.out(h)?, p.out(w)?);
    x.narrow(1, 0, oh * k)?
        .narrow(2, 0, ow * k)?
        .reshape((n, oh, k, ow, k, c))?
        .max(4)?
        .max(2)
}

/// Sizes of one pooling: input plane, output plane.
struct Planes {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
}

/// Max-pooling by kiln's kernels: CUDA's (either format) and the CPU's (channels first, f32).
/// The backward pass finds each window's winner again (PyTorch keeps their indices, 8 bytes an
/// output value).
struct Pool {
    p: PoolParams,
    format: MemoryFormat,
}

impl Pool {
    fn planes(&self, h: usize, w: usize) -> candle_core::Result<Planes> {
        Ok(Planes {
            h,
            w,
            oh: self.p.out(h)?,
            ow: self.p.out(w)?,
        })
    }

    /// The flat index within the plane of window (oy, ox)'s first maximum.
    fn winner(&self, plane: &[f32], g: &Planes, oy: usize, ox: usize) -> usize {
        let (rows, cols) = (self.p.window(oy, g.h), self.p.window(ox, g.w));
        let mut best = (rows.start * g.w + cols.start, f32::NEG_INFINITY);
        for y in rows {
            for x in cols.clone() {
                let v = plane[y * g.w + x];
                if v > best.1 {
                    best = (y * g.w + x, v);
                }
            }
        }
        best.0
    }

    /// The output's shape and the kernels' description of the pooling, for input `layout`
    /// (`operands`: the layouts of all it reads, for the eight-channel kernels' alignment).
    #[cfg(feature = "cuda")]
    fn describe(
        &self,
        layout: &Layout,
        operands: &[&Layout],
    ) -> candle_core::Result<(Shape, Pooling)> {
        use super::cuda::int;
        let (n, c, h, w) = self.format.to_nchw_order(layout.shape().dims4()?);
        let p = self.p;
        let (oh, ow) = (p.out(h)?, p.out(w)?);
        // The kernels index in 32 bits.
        int(n * c * h * w, "max_pool2d")?;
        let shape = Shape::from(self.format.from_nchw_order((n, c, oh, ow)));
        let channels_last = self.format == MemoryFormat::ChannelsLast;
        let vec8 = channels_last && super::cuda::eights(c, operands);
        let pooling = Pooling {
            n: int(n, "max_pool2d")?,
            c: int(c, "max_pool2d")?,
            h: int(h, "max_pool2d")?,
            w: int(w, "max_pool2d")?,
            k: int(p.kernel, "max_pool2d")?,
            s: int(p.stride, "max_pool2d")?,
            pad: int(p.padding, "max_pool2d")?,
            oh: int(oh, "max_pool2d")?,
            ow: int(ow, "max_pool2d")?,
            channels_last: i32::from(channels_last),
            vec8: i32::from(vec8),
        };
        Ok((shape, pooling))
    }
}

/// max_pool.cu's `Pooling`.
#[cfg(feature = "cuda")]
#[repr(C)]
#[derive(Clone, Copy)]
struct Pooling {
    n: i32,
    c: i32,
    h: i32,
    w: i32,
    k: i32,
    s: i32,
    pad: i32,
    oh: i32,
    ow: i32,
    channels_last: i32,
    vec8: i32,
}

#[cfg(feature = "cuda")]
impl Pooling {
    /// The forward kernel's threads: one per output value, or per eight channels of one.
    fn threads(&self, outputs: usize) -> usize {
        if self.vec8 == 1 {
            outputs / 8
        } else {
            outputs
        }
    }

    /// The backward kernel's: one per window where windows tile the plane, else one per input
    /// pixel (or eight channels of one).
    fn backward_threads(&self, outputs: usize, inputs: usize) -> usize {
        self.threads(if self.s == self.k && self.pad == 0 {
            outputs
        } else {
            inputs
        })
    }
}

// SAFETY: plain integers, laid out as max_pool.cu's `Pooling`.
#[cfg(feature = "cuda")]
unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for Pooling {}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        "kiln-max-pool"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if self.format != MemoryFormat::ChannelsFirst {
            candle_core::bail!("kiln-max-pool: the CPU kernel reads channels first");
        }
        let (n, c, h, w) = xl.shape().dims4()?;
        let g = self.planes(h, w)?;
        let x = contiguous_f32(xs, xl, "input")?;
        let mut out = vec![0f32; n * c * g.oh * g.ow];
        out.par_chunks_mut(g.oh * g.ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(out, plane)| {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        out[oy * g.ow + ox] = plane[self.winner(plane, &g, oy, ox)];
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, g.oh, g.ow))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{by_float, kernel_for, output, per_item, storage, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let (shape, pooling) = self.describe(xl, &[xl])?;
        let dev = &xs.device;
        let out = by_float!(xs.dtype(), T => {
            let x = view::<T>(xs, xl, "input")?;
            let y = output::<T>(dev, shape.elem_count())?;
            let func = kernel_for::<T>(dev, "max_pool_fwd")?;
            let stream = dev.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&x).arg(&pooling).arg(&y);
            // SAFETY: x holds n * c * h * w values in the format the flag names; the grid-stride
            // loop writes every one of y's n * c * oh * ow (eight at a time where `vec8`: C a
            // multiple of 8 and every operand aligned for the 16-byte accesses).
            unsafe { launch.launch(per_item(pooling.threads(shape.elem_count()))) }.w()?;
            storage(y, dev)
        });
        Ok((out, shape))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(
            &grad,
            &PoolGrad {
                pool: Pool {
                    p: self.p,
                    format: self.format,
                },
            },
        )?))
    }
}

/// The input's gradient: each window's gradient to its winner, zero elsewhere.
struct PoolGrad {
    pool: Pool,
}

impl CustomOp2 for PoolGrad {
    fn name(&self) -> &'static str {
        "kiln-max-pool-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let g = self.pool.planes(h, w)?;
        let (x, grad) = (
            contiguous_f32(xs, xl, "input")?,
            contiguous_f32(gs, gl, "gradient")?,
        );
        let mut dx = vec![0f32; n * c * h * w];
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(grad.par_chunks(g.oh * g.ow)))
            .for_each(|(dx, (plane, grad))| {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        dx[self.pool.winner(plane, &g, oy, ox)] += grad[oy * g.ow + ox];
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda::{by_float, kernel_for, output, per_item, storage, view};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        use candle_core::cuda_backend::WrapErr;
        let (shape, pooling) = self.pool.describe(xl, &[xl, gl])?;
        if gl.shape() != &shape || gs.dtype() != xs.dtype() {
            candle_core::bail!(
                "kiln-max-pool-grad: a gradient of shape {:?} for an output of {shape:?}",
                gl.shape()
            );
        }
        let dev = &xs.device;
        let total = xl.shape().elem_count();
        let out = by_float!(xs.dtype(), T => {
            let x = view::<T>(xs, xl, "input")?;
            let g = view::<T>(gs, gl, "gradient")?;
            let dx = output::<T>(dev, total)?;
            let func = kernel_for::<T>(dev, "max_pool_bwd")?;
            let stream = dev.cuda_stream();
            let mut launch = stream.launch_builder(&func);
            launch.arg(&x).arg(&g).arg(&pooling).arg(&dx);
            // SAFETY: x and dx hold the input's n * c * h * w values, g the output's. Where
            // windows tile the plane a thread per window writes its window, the last ones also
            // what lies past them; otherwise a thread per input pixel writes it: all of dx.
            let threads = pooling.backward_threads(shape.elem_count(), total);
            unsafe { launch.launch(per_item(threads)) }.w()?;
            storage(dx, dev)
        });
        Ok((out, xl.shape().clone()))
    }
}

/// The same from candle operations: -inf padding, one strided view per window tap, a maximum.
pub fn max_pool2d_reference(x: &Tensor, p: PoolParams) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (p.out(h)?, p.out(w)?);
    let fill = |dims: (usize, usize, usize, usize)| {
        Tensor::full(f32::NEG_INFINITY, dims, x.device())?.to_dtype(x.dtype())
    };
    let (pad, padded_w) = (p.padding, w + 2 * p.padding);
    // Without padding, no empty fill: a cast of an empty tensor fails on CUDA.
    let padded = if pad == 0 {
        x.clone()
    } else {
        let rows = Tensor::cat(
            &[fill((n, c, h, pad))?, x.clone(), fill((n, c, h, pad))?],
            3,
        )?;
        Tensor::cat(
            &[
                fill((n, c, pad, padded_w))?,
                rows,
                fill((n, c, pad, padded_w))?,
            ],
            2,
        )?
    };
    let mut taps = Vec::with_capacity(p.kernel * p.kernel);
    for ky in 0..p.kernel {
        for kx in 0..p.kernel {
            let view = padded.narrow(2, ky, p.stride * (oh - 1) + 1)?.narrow(
                3,
                kx,
                p.stride * (ow - 1) + 1,
            )?;
            taps.push(every_nth(&every_nth(&view, 2, p.stride)?, 3, p.stride)?);
        }
    }
    Tensor::stack(&taps, 4)?.max(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::random_tensor as random;
    use candle_core::{Device, Var};
    use proptest::prelude::*;

    fn forward_and_grad(
        pool: fn(&Tensor, PoolParams) -> candle_core::Result<Tensor>,
        x: &Tensor,
        p: PoolParams,
    ) -> (Vec<f32>, Vec<f32>) {
        let xv = Var::from_tensor(x).unwrap();
        let y = pool(xv.as_tensor(), p).unwrap();
        let grads = (&y * random(y.dims(), 3))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (flat(&y), flat(grads.get(&xv).unwrap()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Continuous random inputs have no ties, where the reference would split the gradient.
        #[test]
        fn matches_the_reference_composition(
            n in 1usize..3, c in 1usize..3, h in 1usize..10, w in 1usize..10,
            kernel in 1usize..4, stride in 1usize..3, padding in 0usize..2, seed in 0u64..1000,
        ) {
            let p = PoolParams { kernel, stride, padding };
            prop_assume!(2 * padding <= kernel && h + 2 * padding >= kernel && w + 2 * padding >= kernel);
            let x = random(&[n, c, h, w], seed);
            let (ours, reference) = (forward_and_grad(max_pool2d, &x, p), forward_and_grad(max_pool2d_reference, &x, p));
            prop_assert_eq!(ours.0, reference.0);
            for (a, b) in ours.1.iter().zip(&reference.1) {
                prop_assert!((a - b).abs() < 1e-6, "{} vs {}", a, b);
            }
        }
    }

    /// Channels last pools as channels first: windows that tile the plane (fastnet) and the
    /// ResNet stem's overlapping, padded ones.
    #[test]
    fn channels_last_pools_as_channels_first() {
        fn last(x: &Tensor, p: PoolParams) -> candle_core::Result<Tensor> {
            let f = MemoryFormat::ChannelsLast;
            f.to_nchw(&max_pool2d_in(&f.from_nchw(x)?, p, f)?)
        }
        let stem = PoolParams {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        for p in [PoolParams::tiles(2), stem] {
            let x = random(&[2, 3, 7, 9], 5);
            assert_eq!(
                forward_and_grad(max_pool2d, &x, p),
                forward_and_grad(last, &x, p),
                "{p:?}"
            );
        }
    }

    /// PyTorch's answer for a tie (torch.nn.functional.max_pool2d(x, 3, 2, 1) on an all-ones
    /// 4x4 plane): each window's gradient to its first maximum, in row-major order.
    #[test]
    fn ties_go_to_the_first_maximum_as_in_pytorch() {
        let x = Var::from_tensor(&Tensor::ones((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let p = PoolParams {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let y = max_pool2d(x.as_tensor(), p).unwrap();
        assert_eq!(y.dims(), &[1, 1, 2, 2]);
        let grad = y.sum_all().unwrap().backward().unwrap();
        let dx = grad
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Windows start at rows/columns -1 and 1: their first in-bounds cells are (0,0), (0,1),
        // (1,0) and (1,1).
        let mut want = vec![0f32; 16];
        for i in [0, 1, 4, 5] {
            want[i] = 1.0;
        }
        assert_eq!(dx, want);
    }
}
