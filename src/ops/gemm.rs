//! A safe face for the `gemm` crate (the matrix multiply candle itself uses on the CPU).

/// A row-major-or-not view of an `rows x cols` f32 matrix: element (i, j) is at
/// `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Matrix<'a> {
    /// A contiguous row-major matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, without moving data.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// The largest index any element uses, plus one.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
        }
    }
}

/// `out = a * b` (or `out += a * b` with `accumulate`), `out` row-major `a.rows x b.cols`,
/// single-threaded: callers parallelise over images instead.
pub fn matmul(a: Matrix, b: Matrix, out: &mut [f32], accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert!(
        a.extent() <= a.data.len() && b.extent() <= b.data.len(),
        "matrix view out of bounds"
    );
    assert!(out.len() >= m * n, "output too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the assertions above keep every element the views and the output name inside
    // their slices, and `out` is exclusively borrowed, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Lanes of the `matmul_nt` kernel: one AVX vector, or two SSE/NEON ones.
const LANES: usize = 8;

/// `out[i][j] += sum over k of a[i][k] * b[j][k]`, for `a` [rows_a x n] and `b` [rows_b x n]
/// both row-major and `out` [rows_a x rows_b]: a product of two matrices whose shared dimension
/// is contiguous in both, as in a convolution's weight gradient (dY [CO x pixels] times the
/// unfolded input [patch x pixels], transposed). `gemm` would first copy both into panels, one
/// strided element at a time, which took as long as the multiply itself; here each row is read
/// in place, 2 x 4 rows at a time. Single-threaded; the same result on every x86-64 CPU.
pub fn matmul_nt(a: &[f32], b: &[f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        return;
    }
    let (rows_a, rows_b) = (a.len() / n, b.len() / n);
    assert!(
        a.len() == rows_a * n && b.len() == rows_b * n && out.len() == rows_a * rows_b,
        "matmul_nt: sizes do not agree"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: this CPU has AVX2, which is all `nt_avx2` is compiled to need.
        unsafe { nt_avx2(a, b, n, out) };
        return;
    }
    nt_rows(a, b, n, out);
}

/// [`nt_rows`] compiled for AVX2 (found at run time: kiln's build targets baseline x86-64).
/// Its arithmetic is the same as the baseline build's (separate multiplies and adds, lanes
/// summed in the same order), only wider.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn nt_avx2(a: &[f32], b: &[f32], n: usize, out: &mut [f32]) {
    nt_rows(a, b, n, out);
}

#[inline(always)]
fn nt_rows(a: &[f32], b: &[f32], n: usize, out: &mut [f32]) {
    let (rows_a, rows_b) = (a.len() / n, b.len() / n);
    let (a_pairs, b_quads) = (rows_a / 2 * 2, rows_b / 4 * 4);
    for i in (0..a_pairs).step_by(2) {
        for j in (0..b_quads).step_by(4) {
            nt_block::<2, 4>(a, b, n, i, j, rows_b, out);
        }
        nt_last::<2>(a, b, n, i, b_quads, rows_b, out);
    }
    for i in a_pairs..rows_a {
        for j in (0..b_quads).step_by(4) {
            nt_block::<1, 4>(a, b, n, i, j, rows_b, out);
        }
        nt_last::<1>(a, b, n, i, b_quads, rows_b, out);
    }
}

/// The last one to three rows of `b`, from `j`, as one block.
#[inline(always)]
fn nt_last<const RA: usize>(
    a: &[f32],
    b: &[f32],
    n: usize,
    i: usize,
    j: usize,
    rows_b: usize,
    out: &mut [f32],
) {
    match rows_b - j {
        1 => nt_block::<RA, 1>(a, b, n, i, j, rows_b, out),
        2 => nt_block::<RA, 2>(a, b, n, i, j, rows_b, out),
        3 => nt_block::<RA, 3>(a, b, n, i, j, rows_b, out),
        _ => {}
    }
}

/// Rows `i..i + RA` of `a` against rows `j..j + RB` of `b`, added into `out`.
#[inline(always)]
fn nt_block<const RA: usize, const RB: usize>(
    a: &[f32],
    b: &[f32],
    n: usize,
    i: usize,
    j: usize,
    rows_b: usize,
    out: &mut [f32],
) {
    let a_rows: [&[f32]; RA] = std::array::from_fn(|r| &a[(i + r) * n..][..n]);
    let b_rows: [&[f32]; RB] = std::array::from_fn(|r| &b[(j + r) * n..][..n]);
    let mut acc = [[[0f32; LANES]; RB]; RA];
    let whole = n / LANES * LANES;
    for k in (0..whole).step_by(LANES) {
        let av: [[f32; LANES]; RA] = std::array::from_fn(|r| lanes(&a_rows[r][k..]));
        let bv: [[f32; LANES]; RB] = std::array::from_fn(|r| lanes(&b_rows[r][k..]));
        for (acc, av) in acc.iter_mut().zip(&av) {
            for (acc, bv) in acc.iter_mut().zip(&bv) {
                for l in 0..LANES {
                    acc[l] += av[l] * bv[l];
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (q, acc) in acc.iter().enumerate() {
            let halves = [
                acc[0] + acc[4],
                acc[1] + acc[5],
                acc[2] + acc[6],
                acc[3] + acc[7],
            ];
            let mut sum = (halves[0] + halves[2]) + (halves[1] + halves[3]);
            for k in whole..n {
                sum += a_rows[r][k] * b_rows[q][k];
            }
            out[(i + r) * rows_b + j + q] += sum;
        }
    }
}

#[inline(always)]
fn lanes(values: &[f32]) -> [f32; LANES] {
    let mut lanes = [0f32; LANES];
    lanes.copy_from_slice(&values[..LANES]);
    lanes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_transposes_and_accumulation() {
        let a = [1., 2., 3., 4., 5., 6.]; // 2x3
        let b = [7., 8., 9., 10., 11., 12.]; // 3x2
        let mut out = [0f32; 4];
        matmul(
            Matrix::rows(&a, 2, 3),
            Matrix::rows(&b, 3, 2),
            &mut out,
            false,
        );
        assert_eq!(out, [58., 64., 139., 154.]);
        matmul(
            Matrix::rows(&a, 2, 3),
            Matrix::rows(&b, 3, 2),
            &mut out,
            true,
        );
        assert_eq!(out, [116., 128., 278., 308.]);
        // a^T a: 3x3
        let mut ata = [0f32; 9];
        matmul(
            Matrix::rows(&a, 2, 3).t(),
            Matrix::rows(&a, 2, 3),
            &mut ata,
            false,
        );
        assert_eq!(ata, [17., 22., 27., 22., 29., 36., 27., 36., 45.]);
    }

    /// Every block shape and tail of `matmul_nt` against `matmul` with a transposed view.
    #[test]
    fn nt_product_matches_the_general_one() {
        for (rows_a, rows_b, n) in [
            (16, 27, 1024),
            (3, 5, 13),
            (1, 1, 1),
            (2, 6, 300),
            (5, 11, 7),
        ] {
            let a: Vec<f32> = (0..rows_a * n).map(|v| (v % 7) as f32 - 3.0).collect();
            let b: Vec<f32> = (0..rows_b * n).map(|v| (v % 5) as f32 * 0.5).collect();
            let mut expected = vec![1f32; rows_a * rows_b];
            let mut ours = expected.clone();
            matmul(
                Matrix::rows(&a, rows_a, n),
                Matrix::rows(&b, rows_b, n).t(),
                &mut expected,
                true,
            );
            matmul_nt(&a, &b, n, &mut ours);
            // Small integers and halves: every partial sum is exact in f32, in any order.
            assert_eq!(ours, expected, "{rows_a}x{n} by ({rows_b}x{n})^T");
        }
    }

    /// The AVX2 build of the kernel and the baseline one give the same bits (x86-64 only: the
    /// AVX2 path exists nowhere else).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn nt_product_is_the_same_with_and_without_avx2() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2, so both paths are the baseline one");
            return;
        }
        let (rows_a, rows_b, n) = (5, 11, 1027);
        let a: Vec<f32> = (0..rows_a * n).map(|v| (v as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..rows_b * n).map(|v| (v as f32 * 0.11).cos()).collect();
        let mut dispatched = vec![0f32; rows_a * rows_b];
        let mut baseline = dispatched.clone();
        matmul_nt(&a, &b, n, &mut dispatched);
        nt_rows(&a, &b, n, &mut baseline);
        assert_eq!(dispatched, baseline);
    }
}
