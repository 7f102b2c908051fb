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
}
