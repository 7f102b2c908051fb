//! Every path of the convolution held to candle's: kiln's CPU kernels and the portable
//! composition, forward and all three gradients, on random shapes.

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

type ConvFn = fn(&Tensor, &Tensor, Option<&Tensor>, ConvParams) -> candle_core::Result<Tensor>;

/// Output and every gradient (input, weight, bias) of `f`, under a random upstream gradient.
fn run(
    f: ConvFn,
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

/// Each gradient's sum of term magnitudes (input: sum of |w||u|, weight: |x||u|, bias: |u|), the
/// scale a sum's rounding grows with when its terms cancel.
fn gradient_magnitudes(x: &Tensor, w: &Tensor, p: ConvParams) -> Vec<Tensor> {
    let (xv, wv) = (
        Var::from_tensor(&x.abs().unwrap()).unwrap(),
        Var::from_tensor(&w.abs().unwrap()).unwrap(),
    );
    let y = conv2d_reference(xv.as_tensor(), wv.as_tensor(), None, p).unwrap();
    let upstream = random(y.dims(), 99).abs().unwrap();
    let grads = (&y * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    vec![
        grads.get(&xv).unwrap().clone(),
        grads.get(&wv).unwrap().clone(),
        upstream.sum((0, 2, 3)).unwrap(),
    ]
}

/// How far `a` strays from `b` beyond 1e-6 of each element's term magnitude (<= 0: within).
fn beyond_rounding(a: &Tensor, b: &Tensor, magnitude: &Tensor) -> f32 {
    let allowed = (magnitude.clamp(1.0, f32::MAX).unwrap() * 1e-6).unwrap();
    ((a - b).unwrap().abs().unwrap() - allowed)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
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

/// The portable composition with candle's bias: the path Metal takes.
fn portable(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: ConvParams,
) -> candle_core::Result<Tensor> {
    let y = conv2d_portable(x, w, p)?;
    match b {
        Some(b) => add_bias_reference(&y, b),
        None => Ok(y),
    }
}

/// A convolution's shape, as the property tests draw it.
#[derive(Debug, Clone, Copy)]
struct Case {
    n: usize,
    c: usize,
    co: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    p: ConvParams,
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    /// Batches up to 20 images span several of the weight gradient's 8-image chunks; kernels
    /// may be non-square.
    #[test]
    fn every_path_matches_candles_convolution(
        n in 1usize..21, c in 1usize..4, co in 1usize..5, h in 1usize..9, w in 1usize..9,
        kh in 1usize..4, kw in 1usize..4, stride in 1usize..3, padding in 0usize..3,
        transposed in any::<bool>(), seed in 0u64..1000,
    ) {
        prop_assume!(h + 2 * padding >= kh && w + 2 * padding >= kw);
        let p = ConvParams { stride, padding };
        every_path_matches(Case { n, c, co, h, w, kh, kw, p }, transposed, seed)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    /// 3x3 stride-1 padding-1 convolutions with enough channels take Winograd's algorithm
    /// forward and for the input gradient: odd and tiny planes, batches of several groups.
    #[test]
    fn winograd_convolutions_match_candles(
        n in 1usize..5, c in 16usize..19, co in 16usize..19, h in 1usize..8, w in 1usize..8,
        transposed in any::<bool>(), seed in 0u64..1000,
    ) {
        let p = ConvParams { stride: 1, padding: 1 };
        every_path_matches(Case { n, c, co, h, w, kh: 3, kw: 3, p }, transposed, seed)?;
    }
}

/// Output and every gradient of kiln's convolution and of the portable composition, held to
/// candle's.
fn every_path_matches(case: Case, transposed: bool, seed: u64) -> Result<(), TestCaseError> {
    let Case {
        n,
        c,
        co,
        h,
        w,
        kh,
        kw,
        p,
    } = case;
    let (stride, padding) = (p.stride, p.padding);
    let x = random(&[n, c, h, w], seed);
    let weight = random(&[co, c, kh, kw], seed + 1);
    let bias = random(&[co], seed + 2);
    let reference_output = conv2d_reference(&x, &weight, Some(&bias), p).unwrap();
    let upstream = random(reference_output.dims(), 99);
    let want_b = upstream.sum((0, 2, 3)).unwrap();
    for (path, f) in [("kiln", conv2d as ConvFn), ("portable", portable as ConvFn)] {
        let ours = run(f, &x, &weight, &bias, p, transposed);
        let (output, grad_x, grad_w, grad_b) = (&ours[0], &ours[1], &ours[2], &ours[3]);
        prop_assert!(
            max_diff(output, &reference_output) < 1e-5,
            "{} output",
            path
        );

        // Convolution is linear in x and in w, so its gradients are its adjoints: for any
        // probe, <conv(probe, w), u> = <probe, dX> and <conv(x, probe), u> = <probe, dW>.
        // These need only candle's forward.
        for j in 0..4 {
            let probe = random(x.dims(), 1000 + j);
            let (want, scale) = dot(
                &conv2d_reference(&probe, &weight, None, p).unwrap(),
                &upstream,
            );
            let (got, _) = dot(&probe, grad_x);
            prop_assert!(
                (want - got).abs() < 1e-5 * scale,
                "{} input grad: {} vs {}",
                path,
                got,
                want
            );
            let probe = random(weight.dims(), 2000 + j);
            let (want, scale) = dot(&conv2d_reference(&x, &probe, None, p).unwrap(), &upstream);
            let (got, _) = dot(&probe, grad_w);
            prop_assert!(
                (want - got).abs() < 1e-5 * scale,
                "{} weight grad: {} vs {}",
                path,
                got,
                want
            );
        }
        let magnitude_b = upstream.abs().unwrap().sum((0, 2, 3)).unwrap();
        prop_assert!(
            beyond_rounding(grad_b, &want_b, &magnitude_b) <= 0.0,
            "{} bias grad {} vs {}",
            path,
            grad_b,
            want_b
        );

        // candle's own backward, where it works: its input gradient comes out a column or
        // row short when the stride does not tile the padded input exactly.
        let tiles = (h + 2 * padding - kh) % stride == 0 && (w + 2 * padding - kw) % stride == 0;
        if tiles {
            let reference = run(conv2d_reference, &x, &weight, &bias, p, transposed);
            let magnitudes = gradient_magnitudes(&x, &weight, p);
            for (name, ((a, b), magnitude)) in ["input grad", "weight grad", "bias grad"]
                .iter()
                .zip(ours[1..].iter().zip(&reference[1..]).zip(&magnitudes))
            {
                let excess = beyond_rounding(a, b, magnitude);
                prop_assert!(
                    excess <= 0.0,
                    "{} {} differs by {} beyond rounding",
                    path,
                    name,
                    excess
                );
            }
        }
    }
    Ok(())
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
    let upstream = random(y.dims(), 3);
    let grads = (&y * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&x).is_none(), "the data tensor gets no gradient");
    // 64 images: the weight gradient sums several groups' partial products.
    let reference = (&reference * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (ours, theirs) = (grads.get(&w).unwrap(), reference.get(&w).unwrap());
    assert!(max_diff(ours, theirs) < 1e-5, "{}", max_diff(ours, theirs));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// The unfoldings for particular geometries (block copies where the output is as wide as
    /// the input, an index map for small planes) write exactly what the row-by-row one does,
    /// padding included, into matrices wider than one image.
    #[test]
    fn every_unfolding_equals_the_row_by_row_one(
        c in 1usize..4, h in 1usize..12, w in 1usize..12, kh in 1usize..6, kw in 1usize..6,
        stride in 1usize..3, padding in 0usize..3, extra in 0usize..3, seed in 0u64..1000,
    ) {
        prop_assume!(h + 2 * padding >= kh && w + 2 * padding >= kw);
        let g = Geometry::new((1, c, h, w), (1, c, kh, kw), ConvParams { stride, padding }).unwrap();
        let image: Vec<f32> = random(&[c * h * w], seed).to_vec1().unwrap();
        let width = g.out_pixels() + extra;
        // All start from the same non-zero fill: every value each writes is compared.
        let mut by_rows = vec![7f32; g.patch() * width];
        g.im2col_by_rows(&image, &mut by_rows, width);
        let mut by_map = vec![7f32; g.patch() * width];
        g.im2col_by_map(&image, &mut by_map, width);
        prop_assert!(by_rows.iter().zip(&by_map).all(|(a, b)| a.to_bits() == b.to_bits()), "map");
        if stride == 1 && g.ow == w {
            let mut by_blocks = vec![7f32; g.patch() * width];
            g.im2col_same_width(&image, &mut by_blocks, width);
            prop_assert!(by_rows.iter().zip(&by_blocks).all(|(a, b)| a.to_bits() == b.to_bits()), "blocks");
        }
    }
}

#[test]
fn weight_gradient_lanes_of_several_groups_and_a_short_last_one() {
    // 16x16 outputs: two images per multiply, so 19 images are 10 groups in lanes of two
    // groups (four images), the last lane three images: a group of two and one of one.
    let p = ConvParams {
        stride: 1,
        padding: 1,
    };
    let x = random(&[19, 2, 16, 16], 4);
    let weight = random(&[3, 2, 3, 3], 5);
    let bias = random(&[3], 6);
    let ours = run(conv2d, &x, &weight, &bias, p, false);
    let reference = run(conv2d_reference, &x, &weight, &bias, p, false);
    let magnitudes = gradient_magnitudes(&x, &weight, p);
    let excess = beyond_rounding(&ours[2], &reference[2], &magnitudes[1]);
    assert!(
        excess <= 0.0,
        "weight gradient differs by {excess} beyond rounding"
    );
}

#[test]
fn an_empty_batch_gives_a_zero_weight_gradient() {
    let p = ConvParams {
        stride: 1,
        padding: 1,
    };
    let x = Tensor::zeros((0, 2, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let w = Var::from_tensor(&random(&[3, 2, 3, 3], 1)).unwrap();
    let y = conv2d(&x, w.as_tensor(), None, p).unwrap();
    assert_eq!(y.dims(), &[0, 3, 4, 4]);
    let grads = y.sum_all().unwrap().backward().unwrap();
    let grad = grads.get(&w).unwrap();
    assert_eq!(grad.dims(), &[3, 2, 3, 3]);
    assert_eq!(
        grad.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
}
