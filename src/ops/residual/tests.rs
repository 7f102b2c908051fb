use super::*;
use crate::ops::random_tensor as random;
use candle_core::Var;
use proptest::prelude::*;

proptest! {
    #[test]
    fn add_relu_matches_candles_composition(n in 1usize..40_000, seed in 0u64..1000) {
        let a = Var::from_tensor(&random(&[n], seed)).unwrap();
        let b = Var::from_tensor(&random(&[n], seed + 1)).unwrap();
        let outputs = |fused: bool| {
            let (x, y) = (a.as_tensor(), b.as_tensor());
            let out = if fused {
                add_relu(x, y).unwrap()
            } else {
                relu(&(x + y).unwrap()).unwrap()
            };
            let grads = (&out * random(&[n], 3)).unwrap().sum_all().unwrap().backward().unwrap();
            [out, grads.get(&a).unwrap().clone(), grads.get(&b).unwrap().clone()]
                .map(|t| t.to_vec1::<f32>().unwrap())
        };
        let (fused, composed) = (outputs(true), outputs(false));
        for (name, (x, y)) in ["output", "lhs grad", "rhs grad"].iter().zip(fused.iter().zip(&composed)) {
            prop_assert_eq!(x, y, "{}", name);
        }
    }
}

/// Gradient arithmetic that gates only every other sum it is offered: a sum already gated,
/// then added to ungated, must be gated again by the backward pass.
struct EveryOther(std::cell::Cell<bool>);

impl GradOps for EveryOther {
    fn add_gated(
        &self,
        held: &Tensor,
        grad: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let turn = self.0.replace(!self.0.get());
        match turn {
            true => GradKernels.add_gated(held, grad, y),
            false => Ok(None),
        }
    }
}

/// A ReLU-ended op's output feeding four consumers, one of them leading to the next
/// ReLU-ended op (a residual block's end feeds the next block), one a subtraction (whose
/// gradient candle adds outside the gated sums), each passing gradient where the output is
/// 0, in two orders: the gradients, gated by the backward pass at the node or in the sum
/// (kiln's kernels, candle's arithmetic, or the two mixed), are those of candle's
/// composition `relu(a + b)` bit for bit (+0 for -0: the composition multiplies by its mask).
#[test]
fn relu_ended_outputs_with_several_consumers_get_the_compositions_gradients() {
    let n = 5000;
    let vars = [1, 2, 3, 4].map(|seed| Var::from_tensor(&random(&[n], seed)).unwrap());
    let [u, v, w] = [5, 6, 7].map(|seed| random(&[n], seed));
    let run = |fused: bool, reversed: bool, ops: &dyn GradOps| {
        let [a, b, s, c] = vars.each_ref().map(Var::as_tensor);
        let end = |x: &Tensor, y: &Tensor| match fused {
            true => add_relu(x, y),
            false => relu(&(x + y)?),
        };
        let y = end(a, b).unwrap();
        let z = end(&(&y * s).unwrap(), c).unwrap();
        let d = (&w - &y).unwrap();
        let mut terms = [(&z, &u), (&y, &v), (&y, &w), (&d, &u)];
        if reversed {
            terms.reverse();
        }
        let loss = terms
            .into_iter()
            .map(|(x, weights)| (x * weights)?.sum_all())
            .reduce(|sum, term| sum? + term?)
            .unwrap()
            .unwrap();
        let grads = loss.backward_consuming_with(ops).unwrap();
        vars.each_ref().map(|var| {
            let grad = (grads.get(var).unwrap() + 0.0).unwrap();
            grad.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|g| g.to_bits())
                .collect::<Vec<_>>()
        })
    };
    for reversed in [false, true] {
        let composed = run(false, reversed, &CandleGradOps);
        assert!(composed[0].contains(&0), "some gradients gated");
        let every_other = EveryOther(std::cell::Cell::new(true));
        for (name, ops) in [
            ("kiln's kernels", &GradKernels as &dyn GradOps),
            ("candle's arithmetic", &CandleGradOps),
            ("gated every other sum", &every_other),
        ] {
            let fused = run(true, reversed, ops);
            assert!(fused == composed, "{name}, reversed {reversed}");
        }
    }
}

/// kiln's arithmetic, counting the sums it makes in place and into new tensors.
#[derive(Default)]
struct Counted {
    in_place: std::cell::Cell<usize>,
    fresh: std::cell::Cell<usize>,
}

impl Counted {
    fn tally<T>(&self, in_place: bool, result: T) -> T {
        let count = if in_place {
            &self.in_place
        } else {
            &self.fresh
        };
        count.set(count.get() + 1);
        result
    }
}

impl GradOps for Counted {
    fn add(&self, held: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        self.tally(false, GradKernels.add(held, grad))
    }
    fn add_gated(
        &self,
        held: &Tensor,
        grad: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let sum = GradKernels.add_gated(held, grad, y)?;
        Ok(match sum {
            Some(sum) => self.tally(false, Some(sum)),
            None => None,
        })
    }
    fn add_in_place(&self, held: &Tensor, grad: &Tensor) -> candle_core::Result<bool> {
        let done = GradKernels.add_in_place(held, grad)?;
        Ok(done && self.tally(true, true))
    }
    fn add_gated_in_place(
        &self,
        held: &Tensor,
        grad: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<bool> {
        let done = GradKernels.add_gated_in_place(held, grad, y)?;
        Ok(done && self.tally(true, true))
    }
    fn gate(&self, grad: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        GradKernels.gate(grad, y)
    }
}

/// A block's input `y` (ReLU-ended, or a plain product) feeds the block's end directly and
/// through `hops` scalings (the block's branch): the pass adds the branch's gradient into
/// the one held in place where the store alone holds it (the branch's nodes let go of it
/// after their first hop), into a new tensor where another handle still reads it (a branch
/// of one hop, whose node holds the same gradient while it runs), with the gradients of
/// candle's own arithmetic bit for bit either way.
#[test]
fn gradient_sums_run_in_place_where_nothing_else_reads_the_held_gradient() {
    let n = 5000;
    let vars = [1, 2].map(|seed| Var::from_tensor(&random(&[n], seed)).unwrap());
    let w = random(&[n], 3);
    let run = |relu_ended: bool, hops: usize, ops: &dyn GradOps| {
        let [a, b] = vars.each_ref().map(Var::as_tensor);
        let y = match relu_ended {
            true => add_relu(a, b).unwrap(),
            false => (a * b).unwrap(),
        };
        // Scalings: their gradients hold no handle on the one they scale.
        let mut branch = y.clone();
        for hop in 0..hops {
            branch = branch.affine(0.75 + hop as f64, 0.25).unwrap();
        }
        let z = add_relu(&branch, &y).unwrap();
        let loss = (&z * &w).unwrap().sum_all().unwrap();
        let grads = loss.backward_consuming_with(ops).unwrap();
        vars.each_ref().map(|var| {
            let grad = (grads.get(var).unwrap() + 0.0).unwrap();
            let values = grad.to_vec1::<f32>().unwrap();
            values.iter().map(|g| g.to_bits()).collect::<Vec<_>>()
        })
    };
    for relu_ended in [true, false] {
        for (hops, in_place) in [(2, 1), (3, 1), (1, 0)] {
            let counted = Counted::default();
            let ours = run(relu_ended, hops, &counted);
            let what = format!("ReLU-ended {relu_ended}, {hops} hops");
            assert_eq!(counted.in_place.get(), in_place, "{what}: sums in place");
            assert_eq!(
                counted.fresh.get(),
                1 - in_place,
                "{what}: sums into new tensors"
            );
            assert!(ours == run(relu_ended, hops, &CandleGradOps), "{what}");
        }
    }
}

/// At a sum of exactly 0, add-ReLU passes no gradient, as PyTorch's ReLU.
#[test]
fn add_relu_passes_no_gradient_where_the_sum_is_zero() {
    let a = Var::from_tensor(&Tensor::new(&[-0.9159355f32, 0.5], &Device::Cpu).unwrap()).unwrap();
    let b = Tensor::new(&[0.9159355f32, 0.25], &Device::Cpu).unwrap();
    let y = add_relu(a.as_tensor(), &b).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let grad = grads.get(&a).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(grad, vec![0.0, 1.0]);
}
