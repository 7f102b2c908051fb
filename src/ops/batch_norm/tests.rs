//! kiln's batch norm held to candle's composition: outputs, statistics and every
//! gradient, on random shapes.

use super::*;
use crate::ops::random_tensor as random;
use candle_core::Var;
use proptest::prelude::*;

fn close(what: &str, a: &Tensor, b: &Tensor, tolerance: f32) -> Result<(), TestCaseError> {
    let (a, b) = (
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    prop_assert_eq!(a.len(), b.len(), "{} sizes", what);
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        prop_assert!(
            (x - y).abs() <= tolerance * scale,
            "{} [{}]: {} vs {}",
            what,
            i,
            x,
            y
        );
    }
    Ok(())
}

type Norm = fn(
    &Tensor,
    &Tensor,
    &Tensor,
    f64,
    Activation,
    MemoryFormat,
) -> candle_core::Result<BatchNormOutput>;

/// Output, statistics and the gradients of x, gamma and beta under a random upstream gradient.
fn run(
    f: Norm,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    act: Activation,
    format: MemoryFormat,
) -> Vec<Tensor> {
    let (xv, gv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(gamma).unwrap(),
        Var::from_tensor(beta).unwrap(),
    );
    let out = f(
        xv.as_tensor(),
        gv.as_tensor(),
        bv.as_tensor(),
        1e-5,
        act,
        format,
    )
    .unwrap();
    // The same upstream gradient in either format.
    let (n, c, h, w) = format.nchw_dims(&out.y).unwrap();
    let upstream = format.from_nchw(&random(&[n, c, h, w], 7)).unwrap();
    let grads = (&out.y * &upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = |v: &Var| grads.get(v).unwrap().clone();
    vec![out.y, out.mean, out.var, grad(&xv), grad(&gv), grad(&bv)]
}

fn activation() -> impl Strategy<Value = Activation> {
    prop_oneof![
        Just(Activation::Identity),
        Just(Activation::Relu),
        Just(Activation::Gelu)
    ]
}

const NAMES: [&str; 6] = [
    "output",
    "mean",
    "variance",
    "input grad",
    "gamma grad",
    "beta grad",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn batch_norm_matches_candles_composition(
        n in 1usize..6, c in 1usize..6, h in 1usize..7, w in 1usize..7,
        act in activation(), shift in -3f32..3f32, seed in 0u64..1000,
    ) {
        prop_assume!(n * h * w > 1);
        // An offset mean, as activations have: the sums must not lose the variance to it.
        let x = (random(&[n, c, h, w], seed) * 2.0).unwrap().affine(1.0, shift as f64).unwrap();
        let gamma = random(&[c], seed + 1);
        let beta = random(&[c], seed + 2);
        let first = MemoryFormat::ChannelsFirst;
        let ours = run(batch_norm_train, &x, &gamma, &beta, act, first);
        let reference = run(batch_norm_train_reference, &x, &gamma, &beta, act, first);
        for (name, (a, b)) in NAMES.iter().zip(ours.iter().zip(&reference)) {
            close(name, a, b, 2e-5)?;
        }
    }

    /// Channels last normalises the same values: the outputs and input gradient are the
    /// channels-first composition's, transposed (on the CPU channels last runs the composition;
    /// CUDA's kernels are held to the CPU in tests/cuda.rs).
    #[test]
    fn channels_last_batch_norm_matches_channels_first(
        n in 1usize..4, c in 1usize..6, h in 1usize..5, w in 1usize..5,
        act in activation(), seed in 0u64..1000,
    ) {
        prop_assume!(n * h * w > 1);
        let last = MemoryFormat::ChannelsLast;
        let x = random(&[n, c, h, w], seed);
        let gamma = random(&[c], seed + 1);
        let beta = random(&[c], seed + 2);
        let first = MemoryFormat::ChannelsFirst;
        let first = run(batch_norm_train_reference, &x, &gamma, &beta, act, first);
        let nhwc = run(batch_norm_train, &last.from_nchw(&x).unwrap(), &gamma, &beta, act, last);
        for (i, (name, (a, b))) in NAMES.iter().zip(first.iter().zip(&nhwc)).enumerate() {
            // The output and input gradient come back channels last; the rest are per channel.
            let b = if i == 0 || i == 3 { last.to_nchw(b).unwrap() } else { b.clone() };
            close(name, a, &b, 2e-5)?;
        }
    }

    /// The fused residual end is the composition it replaces, bit for bit: output, statistics
    /// and the gradients of x, gamma, beta and what joins (through its own batch norm, too).
    #[test]
    fn batch_norm_add_relu_is_batch_norm_then_add_relu(
        n in 1usize..5, c in 1usize..6, h in 1usize..6, w in 1usize..6, seed in 0u64..1000,
        normalised in proptest::bool::ANY,
    ) {
        prop_assume!(n * h * w > 1);
        let end = ResidualEnd::new(&[n, c, h, w], seed, normalised);
        let (fused, _) = end.graph(true);
        let (composed, _) = end.graph(false);
        for (name, (a, b)) in end.names().iter().zip(fused.iter().zip(&composed)) {
            let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
            prop_assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), "{}", name);
        }
    }
}

/// A residual block's end, `relu(bn(x) + r)` or `relu(bn(x) + bn'(r))`, with random inputs.
struct ResidualEnd {
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    r: Tensor,
    /// The shortcut's own scale and shift, where it is normalised.
    shortcut_norm: Option<(Tensor, Tensor)>,
}

impl ResidualEnd {
    fn new(shape: &[usize], seed: u64, normalised: bool) -> Self {
        let c = shape[1];
        Self {
            x: random(shape, seed),
            gamma: random(&[c], seed + 1),
            beta: random(&[c], seed + 2),
            r: random(shape, seed + 3),
            shortcut_norm: normalised.then(|| (random(&[c], seed + 4), random(&[c], seed + 5))),
        }
    }

    /// What [`Self::graph`] returns, in order.
    fn names(&self) -> Vec<&'static str> {
        let mut names = vec!["y", "mean", "var", "shortcut mean", "shortcut var"];
        if self.shortcut_norm.is_none() {
            names.truncate(3);
        }
        names.extend(["x grad", "gamma grad", "beta grad", "residual grad"]);
        if self.shortcut_norm.is_some() {
            names.extend(["shortcut gamma grad", "shortcut beta grad"]);
        }
        names
    }

    /// Fused or composed: the output, the statistics and every input's gradient under a random
    /// upstream gradient ([`Self::names`]), and the nodes of the loss's graph shaped as x.
    fn graph(&self, fused: bool) -> (Vec<Tensor>, usize) {
        let mut inputs = vec![&self.x, &self.gamma, &self.beta, &self.r];
        if let Some((g, b)) = &self.shortcut_norm {
            inputs.extend([g, b]);
        }
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let v: Vec<&Tensor> = vars.iter().map(Var::as_tensor).collect();
        let first = MemoryFormat::ChannelsFirst;
        let main = NormInputs {
            x: v[0],
            gamma: v[1],
            beta: v[2],
            eps: 1e-5,
        };
        let shortcut = match v.len() {
            4 => Shortcut::Identity(v[3]),
            _ => Shortcut::Normalised(NormInputs {
                x: v[3],
                gamma: v[4],
                beta: v[5],
                eps: 1e-3,
            }),
        };
        let out = if fused {
            batch_norm_add_relu_train(main, shortcut, first).unwrap()
        } else {
            residual_end_composed(main, shortcut, first).unwrap()
        };
        let loss = (&out.y * random(self.x.dims(), 7))
            .unwrap()
            .sum_all()
            .unwrap();
        let activations = loss
            .sorted_nodes()
            .iter()
            .filter(|t| t.dims() == self.x.dims())
            .count();
        let grads = loss.backward().unwrap();
        let mut results = vec![out.y, out.main.mean, out.main.var];
        if let Some(s) = out.shortcut {
            results.extend([s.mean, s.var]);
        }
        results.extend(vars.iter().map(|v| grads.get(v).unwrap().clone()));
        (results, activations)
    }
}

/// What the fusion is for: the graph no longer holds the normalised values until the backward
/// pass, only x, what joins, the output and the product with the upstream gradient.
#[test]
fn fused_residual_end_keeps_no_normalised_values_in_the_graph() {
    for (normalised, composed_nodes) in [(false, 5), (true, 6)] {
        let end = ResidualEnd::new(&[2, 3, 4, 4], 1, normalised);
        let (_, composed) = end.graph(false);
        let (_, fused) = end.graph(true);
        assert_eq!(
            (composed, fused),
            (composed_nodes, 4),
            "normalised {normalised}"
        );
    }
}

/// PyTorch's figures for one small batch (torch 2.x, nn.BatchNorm2d(2) in training mode):
/// the normalised output uses the biased variance.
#[test]
fn normalises_with_the_biased_variance() {
    let x = Tensor::new(
        &[[[[1f32, 2.]], [[0., 4.]]], [[[3., 6.]], [[2., 2.]]]],
        &Device::Cpu,
    )
    .unwrap();
    let gamma = Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap();
    let beta = Tensor::new(&[0f32, 1.], &Device::Cpu).unwrap();
    let out = batch_norm_train(
        &x,
        &gamma,
        &beta,
        1e-5,
        Activation::Identity,
        MemoryFormat::ChannelsFirst,
    )
    .unwrap();
    // Channel 0: values 1, 2, 3, 6: mean 3, biased variance 3.5.
    assert_eq!(out.mean.to_vec1::<f32>().unwrap(), [3.0, 2.0]);
    assert_eq!(out.var.to_vec1::<f32>().unwrap(), [3.5, 2.0]);
    let y = out.y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = (1.0 - 3.0) / (3.5f32 + 1e-5).sqrt();
    assert!((y[0] - want).abs() < 1e-6, "{} vs {want}", y[0]);
}
