//! Winograd's F(2x2, 3x3) for the CPU's 3x3, stride-1, padding-1 convolutions (ResNet's, and
//! their input gradients): each 2x2 block of outputs costs 16 multiplies per channel pair
//! instead of 36, and the input is expanded 4x instead of im2col's 9x.
//!
//! With `U = G g Gᵀ` (the kernel, 4x4 per channel pair) and `V = Bᵀ d B` (a 4x4 input tile per
//! channel), the outputs are `Y = Aᵀ [Σ_c U ⊙ V] A`. The sum over channels is 16 matrix
//! multiplies, one per tile element `e`: `M_e [CO x tiles] = U_e [CO x C] * V_e [C x tiles]`
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015). The
//! transforms add and halve, so results round a little differently from the direct sum (tests
//! hold them to it within a few units of rounding of the terms' magnitudes).

use rayon::prelude::*;

use super::geometry::{with_scratch, Geometry};
use crate::ops::gemm::{matmul, Matrix};
use crate::ops::{par_collect, par_zeros};

/// Elements of a transformed tile: 4 x 4.
const ELEMENTS: usize = 16;

/// Fewer channels than this in or out, and the 16 multiplies are too thin to beat im2col's
/// one (SimpleCNN's and ResNet's 3-channel stems stay direct).
const MIN_CHANNELS: usize = 16;

/// The fewest tiles (over several images) each group's multiplies get: ResNet's last stage has
/// 4 tiles an image.
const TILES_PER_MULTIPLY: usize = 256;

/// Whether `g` is a convolution this engine computes (and is worth it for).
pub(super) fn applies(g: &Geometry) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.p.stride == 1
        && g.p.padding == 1
        && g.c >= MIN_CHANNELS
        && g.co >= MIN_CHANNELS
}

/// Output tiles of an image: rows, columns.
fn tiles(g: &Geometry) -> (usize, usize) {
    (g.oh.div_ceil(2), g.ow.div_ceil(2))
}

/// `x` [N, C, H, W] convolved with `weight` [CO, C, 3, 3], stride 1, padding 1: [N, CO, H, W].
/// Images go in groups fixed by the shape, as in the direct convolution; inside a group the
/// transforms run over channels and the 16 multiplies over elements, in parallel.
pub(super) fn forward(x: &[f32], weight: &[f32], g: &Geometry) -> Vec<f32> {
    let u = transform_kernel(weight, g);
    let (tiles_y, tiles_x) = tiles(g);
    let per_image = tiles_y * tiles_x;
    let group = TILES_PER_MULTIPLY.div_ceil(per_image).clamp(1, g.n.max(1));
    let ohw = g.out_pixels();
    let mut out = par_zeros(g.n * g.co * ohw);
    out.par_chunks_mut(group * g.co * ohw)
        .zip(x.par_chunks(group * g.image()))
        .for_each(|(out, x)| {
            let count = x.len() / g.image();
            let width = count * per_image;
            with_scratch(g.c * ELEMENTS * width, ELEMENTS * g.co * width, |v, m| {
                // V [C][16][tiles]: each channel's tiles, all images of the group.
                v.par_chunks_mut(ELEMENTS * width)
                    .enumerate()
                    .for_each(|(ci, v)| {
                        let mut buffers = TileBuffers::new(g);
                        for (i, image) in x.chunks_exact(g.image()).enumerate() {
                            let plane = &image[ci * g.h * g.w..][..g.h * g.w];
                            buffers.transform_input(plane, v, width, i * per_image);
                        }
                    });
                // M_e [CO x tiles] = U_e [CO x C] * V_e [C x tiles], U [CO][16][C].
                m.par_chunks_mut(g.co * width)
                    .enumerate()
                    .for_each(|(e, m)| {
                        let u_e = Matrix {
                            data: &u[e * g.c..],
                            rows: g.co,
                            cols: g.c,
                            row_stride: ELEMENTS * g.c,
                            col_stride: 1,
                        };
                        let v_e = Matrix {
                            data: &v[e * width..],
                            rows: g.c,
                            cols: width,
                            row_stride: ELEMENTS * width,
                            col_stride: 1,
                        };
                        matmul(u_e, v_e, m, false);
                    });
                let m = &*m;
                out.par_chunks_mut(ohw).enumerate().for_each(|(plane, y)| {
                    let (i, co) = (plane / g.co, plane % g.co);
                    transform_output(m, g, width, co, i * per_image, y);
                });
            })
        });
    out
}

/// `U = G g Gᵀ` for every channel pair, laid out [CO][16][C]: each output channel's 16
/// matrices' rows together.
fn transform_kernel(weight: &[f32], g: &Geometry) -> Vec<f32> {
    par_collect(g.co * ELEMENTS * g.c, ELEMENTS * g.c, |co| {
        let mut rows = vec![0f32; ELEMENTS * g.c];
        for ci in 0..g.c {
            let k = &weight[(co * g.c + ci) * 9..][..9];
            // G g: rows g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2.
            let mut gg = [[0f32; 3]; 4];
            for j in 0..3 {
                let (a, b, c) = (k[j], k[3 + j], k[6 + j]);
                gg[0][j] = a;
                gg[1][j] = 0.5 * (a + b + c);
                gg[2][j] = 0.5 * (a - b + c);
                gg[3][j] = c;
            }
            // (G g) Gᵀ: the same on each row.
            for (r, [a, b, c]) in gg.into_iter().enumerate() {
                let u = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (col, value) in u.into_iter().enumerate() {
                    rows[(r * 4 + col) * g.c + ci] = value;
                }
            }
        }
        rows.into_iter()
    })
}

/// One input plane, zero-bordered, its columns split into even and odd ones (so that tiles,
/// which start every second column, read both at unit stride), and its vertical transform:
/// reused for every plane a task transforms.
struct TileBuffers {
    even: Vec<f32>,
    odd: Vec<f32>,
    rows: Vec<f32>,
    width: usize,
    h: usize,
    w: usize,
    tiles_y: usize,
    tiles_x: usize,
}

impl TileBuffers {
    fn new(g: &Geometry) -> Self {
        let (tiles_y, tiles_x) = tiles(g);
        // Padded columns 0..2 * tiles_x + 2 (padding 1 each side, one more where the plane is
        // odd), half of them even.
        let width = tiles_x + 1;
        let padded_rows = 2 * tiles_y + 2;
        Self {
            even: vec![0f32; padded_rows * width],
            odd: vec![0f32; padded_rows * width],
            rows: vec![0f32; 8 * width],
            width,
            h: g.h,
            w: g.w,
            tiles_y,
            tiles_x,
        }
    }

    /// `V = Bᵀ d B` for every 4x4 tile `d` of `plane` (tiles 2 apart), element `e` of tile `t`
    /// into `v[e * stride + offset + t]`. Bᵀ's rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3.
    fn transform_input(&mut self, plane: &[f32], v: &mut [f32], stride: usize, offset: usize) {
        let (width, tiles_x) = (self.width, self.tiles_x);
        // Input column x is padded column x + 1. Only the interior is written: the border
        // (and the odd row or column) stays zero.
        for (y, line) in plane.chunks_exact(self.w).take(self.h).enumerate() {
            let odd = &mut self.odd[(y + 1) * width..][..width];
            odd.iter_mut()
                .zip(line.iter().step_by(2))
                .for_each(|(o, x)| *o = *x);
            let even = &mut self.even[(y + 1) * width + 1..][..width - 1];
            let odd_columns = line.iter().skip(1).step_by(2);
            even.iter_mut().zip(odd_columns).for_each(|(e, x)| *e = *x);
        }
        for ty in 0..self.tiles_y {
            // Bᵀ d over the tile row's four padded rows, for even and odd columns alike.
            let (even, odd) = self.rows.split_at_mut(4 * width);
            for (source, t) in [(&self.even, even), (&self.odd, odd)] {
                let d = &source[2 * ty * width..][..4 * width];
                let (d0, rest) = d.split_at(width);
                let (d1, rest) = rest.split_at(width);
                let (d2, d3) = rest.split_at(width);
                let (t0, rest) = t.split_at_mut(width);
                let (t1, rest) = rest.split_at_mut(width);
                let (t2, t3) = rest.split_at_mut(width);
                for j in 0..width {
                    t0[j] = d0[j] - d2[j];
                    t1[j] = d1[j] + d2[j];
                    t2[j] = d2[j] - d1[j];
                    t3[j] = d1[j] - d3[j];
                }
            }
            // ... B across: tile tx reads padded columns 2tx..2tx + 4, which are even[tx],
            // odd[tx], even[tx + 1], odd[tx + 1].
            let first = offset + ty * tiles_x;
            let (even, odd) = self.rows.split_at(4 * width);
            for (r, (e, o)) in even
                .chunks_exact(width)
                .zip(odd.chunks_exact(width))
                .enumerate()
            {
                let (v0, rest) = v[(r * 4) * stride..].split_at_mut(stride);
                let (v1, rest) = rest.split_at_mut(stride);
                let (v2, v3) = rest.split_at_mut(stride);
                let (v0, v1) = (&mut v0[first..][..tiles_x], &mut v1[first..][..tiles_x]);
                let (v2, v3) = (&mut v2[first..][..tiles_x], &mut v3[first..][..tiles_x]);
                let (e0, e1, o0, o1) = (&e[..tiles_x], &e[1..], &o[..tiles_x], &o[1..]);
                for t in 0..tiles_x {
                    v0[t] = e0[t] - e1[t];
                    v1[t] = o0[t] + e1[t];
                    v2[t] = e1[t] - o0[t];
                    v3[t] = o0[t] - o1[t];
                }
            }
        }
    }
}

/// `Y = Aᵀ M A` for output channel `co` of one image (tiles `first..` of each M_e, which are
/// [CO x width] each, one after the other), into its plane `y` [OH x OW]. Aᵀ's rows:
/// m0 + m1 + m2, m1 - m2 - m3.
fn transform_output(m: &[f32], g: &Geometry, width: usize, co: usize, first: usize, y: &mut [f32]) {
    let (tiles_y, tiles_x) = tiles(g);
    // Per tile row: Aᵀ down (s: 2 x 4 rows), then across into the two output rows' even and
    // odd columns (4 rows), then interleaved into the plane.
    let mut s = vec![0f32; 8 * tiles_x];
    let mut lines = vec![0f32; 4 * tiles_x];
    for ty in 0..tiles_y {
        let t = first + ty * tiles_x;
        let element = |e: usize| &m[(e * g.co + co) * width + t..][..tiles_x];
        let (s0, s1) = s.split_at_mut(4 * tiles_x);
        for k in 0..4 {
            let (m0, m1, m2, m3) = (element(k), element(4 + k), element(8 + k), element(12 + k));
            let (a, b) = (
                &mut s0[k * tiles_x..][..tiles_x],
                &mut s1[k * tiles_x..][..tiles_x],
            );
            for j in 0..tiles_x {
                a[j] = m0[j] + m1[j] + m2[j];
                b[j] = m1[j] - m2[j] - m3[j];
            }
        }
        for (half, line) in s
            .chunks_exact(4 * tiles_x)
            .zip(lines.chunks_exact_mut(2 * tiles_x))
        {
            let (k0, rest) = half.split_at(tiles_x);
            let (k1, rest) = rest.split_at(tiles_x);
            let (k2, k3) = rest.split_at(tiles_x);
            let (even, odd) = line.split_at_mut(tiles_x);
            for j in 0..tiles_x {
                even[j] = k0[j] + k1[j] + k2[j];
                odd[j] = k1[j] - k2[j] - k3[j];
            }
        }
        for (dy, line) in lines.chunks_exact(2 * tiles_x).enumerate() {
            let oy = 2 * ty + dy;
            if oy >= g.oh {
                break;
            }
            let (even, odd) = line.split_at(tiles_x);
            let row = &mut y[oy * g.ow..][..g.ow];
            let mut pairs = row.chunks_exact_mut(2);
            for (pair, (e, o)) in (&mut pairs).zip(even.iter().zip(odd)) {
                pair[0] = *e;
                pair[1] = *o;
            }
            if let [last] = pairs.into_remainder() {
                *last = even[tiles_x - 1];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::ConvParams;
    use proptest::prelude::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The direct sum, in f64: y[n][co][oy][ox] = Σ x[n][c][oy + ky - 1][ox + kx - 1] w[co][c][ky][kx],
    /// and the sum of the terms' magnitudes (the scale rounding grows with).
    fn direct(x: &[f32], w: &[f32], g: &Geometry) -> (Vec<f64>, Vec<f64>) {
        let mut out = vec![0f64; g.n * g.co * g.out_pixels()];
        let mut magnitude = out.clone();
        for n in 0..g.n {
            for co in 0..g.co {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let at = ((n * g.co + co) * g.oh + oy) * g.ow + ox;
                        for c in 0..g.c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy < 1 || ix < 1 || iy > g.h || ix > g.w {
                                        continue;
                                    }
                                    let a = x[((n * g.c + c) * g.h + iy - 1) * g.w + ix - 1] as f64;
                                    let b = w[((co * g.c + c) * 3 + ky) * 3 + kx] as f64;
                                    out[at] += a * b;
                                    magnitude[at] += (a * b).abs();
                                }
                            }
                        }
                    }
                }
            }
        }
        (out, magnitude)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any plane (odd, even, a single pixel), any channel count, batches that span several
        /// groups: the same as the direct sum within a few units of rounding of its terms.
        #[test]
        fn equals_the_direct_convolution(
            n in 1usize..6, c in 1usize..6, co in 1usize..6, h in 1usize..12, w in 1usize..12,
            seed in 0u64..1000,
        ) {
            let g = Geometry::new((n, c, h, w), (co, c, 3, 3), ConvParams { stride: 1, padding: 1 }).unwrap();
            let x = random(n * c * h * w, seed);
            let weight = random(co * c * 9, seed + 1);
            let got = forward(&x, &weight, &g);
            let (want, magnitude) = direct(&x, &weight, &g);
            for (i, ((got, want), scale)) in got.iter().zip(&want).zip(&magnitude).enumerate() {
                let error = (*got as f64 - want).abs();
                prop_assert!(error <= 1e-6 * scale.max(1.0), "output {}: {} vs {} (scale {})", i, got, want, scale);
            }
        }
    }

    #[test]
    fn applies_to_resnets_3x3_convolutions_only() {
        let geometry = |c, co, k, stride, padding| {
            Geometry::new((2, c, 8, 8), (co, c, k, k), ConvParams { stride, padding }).unwrap()
        };
        assert!(applies(&geometry(64, 64, 3, 1, 1)));
        assert!(!applies(&geometry(3, 64, 3, 1, 1)), "a 3-channel stem");
        assert!(!applies(&geometry(64, 128, 3, 2, 1)), "stride 2");
        assert!(!applies(&geometry(64, 128, 1, 1, 0)), "1x1");
        assert!(!applies(&geometry(64, 64, 3, 1, 0)), "no padding");
    }
}
