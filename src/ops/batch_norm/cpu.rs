//! The arithmetic of kiln's BatchNorm CPU kernels (f32, channels first): each channel's planes,
//! sums in f64 lanes, the scale and shift, and the fused ReLU's gate.

use super::Activation;
use crate::ops::MemoryFormat;

/// Whether a CPU kernel's fused activation is ReLU: GELU is left to candle there
/// ([`Activation::split_for`]).
pub(super) fn cpu_fuses(act: Activation) -> candle_core::Result<bool> {
    match act {
        Activation::Identity => Ok(false),
        Activation::Relu => Ok(true),
        Activation::Gelu => candle_core::bail!("batch_norm: kiln's CPU kernels fuse ReLU only"),
    }
}

/// kiln's CPU kernels read channels-first data only (`ours` sends channels last elsewhere).
pub(super) fn cpu_reads(format: MemoryFormat) -> candle_core::Result<()> {
    if format == MemoryFormat::ChannelsLast {
        candle_core::bail!("batch_norm: kiln's CPU kernels read channels-first data only");
    }
    Ok(())
}

/// The planes of channel `c` in an [N, C, HW] buffer.
pub(super) fn planes(
    data: &[f32],
    c: usize,
    channels: usize,
    hw: usize,
) -> impl Iterator<Item = &[f32]> {
    data.chunks_exact(hw.max(1)).skip(c).step_by(channels)
}

/// Independent f64 accumulators per sum, so the compiler can keep them in vector registers
/// instead of waiting on one chain of adds.
pub(super) const LANES: usize = 8;

/// Sums in f64, as PyTorch's CPU kernel does: a channel's gradient sums are small differences
/// of large terms, and f32 partial sums were seen to move a ResNet-50's step by 1e-3.
pub(super) fn sum_f64(values: impl Iterator<Item = [f64; LANES]>) -> f64 {
    let mut lanes = [0f64; LANES];
    for chunk in values {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum()
}

/// A plane's sum of `f(value)`, in f64 lanes.
pub(super) fn plane_sum(plane: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let chunks = plane.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(f64::from(v))).sum();
    sum_f64(chunks.map(|c| std::array::from_fn(|l| f(f64::from(c[l]))))) + tail
}

/// Over a plane of inputs `x` and upstream gradients `g` (gated by the fused ReLU as
/// [`gated`] says): (sum of g, sum of g * (x - mean)), in f64 lanes.
pub(super) fn plane_grad_sums(
    x: &[f32],
    g: &[f32],
    mean: f64,
    gate: impl Fn(f32, f32) -> f32,
) -> (f64, f64) {
    let pairs = x.chunks_exact(LANES).zip(g.chunks_exact(LANES));
    let (mut total, mut dot) = ([0f64; LANES], [0f64; LANES]);
    for (xc, gc) in pairs {
        // The gate first, for the whole chunk: a branch per value mispredicts half the time.
        let gs: [f32; LANES] = std::array::from_fn(|l| gate(gc[l], xc[l]));
        for l in 0..LANES {
            let g = f64::from(gs[l]);
            total[l] += g;
            dot[l] += g * (f64::from(xc[l]) - mean);
        }
    }
    let whole = x.len() / LANES * LANES;
    let (mut t, mut d) = (total.iter().sum::<f64>(), dot.iter().sum::<f64>());
    for (&v, &g) in x[whole..].iter().zip(&g[whole..]) {
        let g = f64::from(gate(g, v));
        t += g;
        d += g * (f64::from(v) - mean);
    }
    (t, d)
}

/// One channel's scale and shift (gamma * inv_std, beta - mean * scale): the output is
/// `x * scale + shift`, and with ReLU fused it passed where that is positive.
pub(super) fn affine(mean: f32, inv_std: f32, gamma: f32, beta: f32) -> (f32, f32) {
    let scale = inv_std * gamma;
    (scale, beta - mean * scale)
}

/// The upstream gradient `g` at value `v` of a channel with this scale and shift: through
/// ReLU when fused, which passed where `v * scale + shift`, as the forward pass computed it,
/// is positive.
pub(super) fn gated(relu: bool, g: f32, v: f32, scale: f32, shift: f32) -> f32 {
    // A multiply by 0 or 1 rather than a branch: the pattern is random.
    let passed = !relu || v * scale + shift > 0.0;
    g * f32::from(u8::from(passed))
}
