//! What kiln's CPU convolution engines ([`super::cpu`], [`super::winograd`]) and cuDNN's share:
//! a convolution's sizes, and each compute thread's scratch buffers. Below both engines, so
//! that the CPU one can hand work to Winograd's without either importing the other.

use std::cell::RefCell;

use super::ConvParams;

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
}

thread_local! {
    /// Each compute thread's unfolding and widening buffers, kept from one convolution to the
    /// next: allocated and zeroed afresh per group of images, they were about 5% of a ResNet
    /// layer's backward pass.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` on this thread's two scratch buffers, `first` and `second` floats long. They hold
/// whatever an earlier call left: every caller writes all it reads first.
pub(super) fn with_scratch<R>(
    first: usize,
    second: usize,
    f: impl FnOnce(&mut [f32], &mut [f32]) -> R,
) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffers) => {
            let (a, b) = &mut *buffers;
            if a.len() < first {
                a.resize(first, 0.0);
            }
            if b.len() < second {
                b.resize(second, 0.0);
            }
            f(&mut a[..first], &mut b[..second])
        }
        // Only if `f` itself ever reached here again on the same thread.
        Err(_) => f(&mut vec![0f32; first], &mut vec![0f32; second]),
    })
}
