use super::*;
use crate::ops::conv::conv2d_reference;
use crate::ops::random_tensor as random;
use crate::ops::relu_maxpool::relu_max_pool2d_reference;
use candle_core::Var;
use proptest::prelude::*;

type Block =
    fn(&Tensor, &Tensor, Option<&Tensor>, ConvParams, usize) -> candle_core::Result<Tensor>;

/// Output and the gradients of x, weight and bias, flattened.
fn run(f: Block, x: &Tensor, w: &Tensor, b: &Tensor, p: ConvParams, k: usize) -> Vec<Vec<f32>> {
    let (xv, wv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let y = f(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), p, k).unwrap();
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
    b: Option<&Tensor>,
    p: ConvParams,
    k: usize,
) -> candle_core::Result<Tensor> {
    relu_max_pool2d(&conv2d(x, w, b, p)?, k)
}

fn reference(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    p: ConvParams,
    k: usize,
) -> candle_core::Result<Tensor> {
    relu_max_pool2d_reference(&conv2d_reference(x, w, b, p)?, k)
}

fn close(a: &[f32], b: &[f32]) -> bool {
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5 * scale)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn matches_the_unfused_ops_and_the_reference(
        n in 1usize..21, c in 1usize..4, co in 1usize..20, h in 2usize..10, w in 2usize..10,
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
