//! Softmax cross-entropy fused, with PyTorch's label smoothing: one pass forward (the mean
//! loss), one pass backward ((softmax - target) * dL/dloss / n, target = (1 - e) one-hot +
//! e / classes), where candle composes log-softmax, gather and mean from a handful of tensors
//! each way. And a batch's figures for the epoch's running sums in one
//! pass. CPU and CUDA; elsewhere (Metal, other dtypes) candle's composition, which is also the
//! reference the tests hold these to.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor};

use super::{contiguous_f32, contiguous_u32};

/// Whether kiln's kernels take these arguments: f32 logits [n, k], u32 labels, CPU or CUDA.
fn ours(logits: &Tensor, labels: &Tensor) -> bool {
    let device = match logits.device() {
        Device::Cpu => true,
        Device::Cuda(_) => cfg!(feature = "cuda"),
        Device::Metal(_) => false,
    };
    device
        && logits.dtype() == DType::F32
        && labels.dtype() == DType::U32
        && logits.rank() == 2
        && labels.rank() == 1
}

/// The mean cross-entropy of `logits` [n, k] against class `labels` [n] (u32), the labels
/// smoothed by `smoothing` (0 for none) as `nn.CrossEntropyLoss(label_smoothing=...)`.
pub fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    smoothing: f32,
) -> candle_core::Result<Tensor> {
    if ours(logits, labels) {
        logits
            .contiguous()?
            .apply_op2(&labels.contiguous()?, CrossEntropy { smoothing })
    } else {
        cross_entropy_reference(logits, labels, smoothing)
    }
}

/// The same from candle operations: `(1 - e) * nll + e * mean over classes of -log_softmax`.
pub fn cross_entropy_reference(
    logits: &Tensor,
    labels: &Tensor,
    smoothing: f32,
) -> candle_core::Result<Tensor> {
    let nll = candle_nn::loss::cross_entropy(logits, labels)?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let uniform = candle_nn::ops::log_softmax(logits, 1)?
        .mean(1)?
        .mean_all()?
        .neg()?;
    (nll * (1.0 - f64::from(smoothing)))? + (uniform * f64::from(smoothing))?
}

/// `[loss * n, correct]` for a batch: its mean `loss`, and how many rows of `logits` have their
/// first maximum at the label. No gradient.
pub fn batch_tally(logits: &Tensor, labels: &Tensor, loss: &Tensor) -> candle_core::Result<Tensor> {
    let (logits, loss) = (logits.detach(), loss.detach());
    if ours(&logits, labels) && loss.dtype() == DType::F32 {
        logits
            .contiguous()?
            .apply_op3_no_bwd(&labels.contiguous()?, &loss, &BatchTally)
    } else {
        let n = labels.dim(0)? as f64;
        let correct = logits
            .argmax(1)?
            .eq(labels)?
            .to_dtype(DType::F32)?
            .sum_all()?;
        Tensor::stack(&[(loss.to_dtype(DType::F32)? * n)?, correct], 0)
    }
}

/// Rows and classes of `logits`, checked against `labels`.
fn sizes(logits: &Layout, labels: &Layout) -> candle_core::Result<(usize, usize)> {
    let (n, k) = logits.shape().dims2()?;
    if labels.shape().elem_count() != n {
        candle_core::bail!(
            "cross_entropy: {} labels for {n} rows of logits",
            labels.shape().elem_count()
        );
    }
    Ok((n, k))
}

/// Rows, classes and the data of the logits and labels every CPU kernel here reads.
fn cpu_rows<'a>(
    ls: &'a CpuStorage,
    ll: &Layout,
    ys: &'a CpuStorage,
    yl: &Layout,
) -> candle_core::Result<(usize, usize, &'a [f32], &'a [u32])> {
    let (n, k) = sizes(ll, yl)?;
    Ok((
        n,
        k,
        contiguous_f32(ls, ll, "logits")?,
        contiguous_u32(ys, yl, "labels")?,
    ))
}

/// A row's maximum and the sum of exp(v - maximum). The loss and the softmax are formed from
/// these two without adding the maximum back: `max + ln(sum)` rounds to the maximum's f32 steps
/// (2e-6 at 20), which cost a confident row's gradient (softmax - 1, about -5e-5) 5% of its
/// value.
fn max_and_sum_exp(row: &[f32]) -> (f32, f32) {
    let top = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (top, row.iter().map(|v| (v - top).exp()).sum())
}

/// The first maximum's index.
fn argmax(row: &[f32]) -> usize {
    (1..row.len()).fold(0, |best, j| if row[j] > row[best] { j } else { best })
}

struct CrossEntropy {
    smoothing: f32,
}

/// One row's loss: (1 - e) (lse - row[label]) + e (lse - mean(row)), lse formed from the row's
/// maximum as `max_and_sum_exp` says; NaN for a label out of range.
fn row_loss(row: &[f32], label: u32, smoothing: f32) -> f32 {
    let Some(v) = row.get(label as usize) else {
        return f32::NAN;
    };
    let (top, sum) = max_and_sum_exp(row);
    let nll = (top - v) + sum.ln();
    if smoothing == 0.0 {
        return nll;
    }
    let mean_gap = row.iter().map(|x| top - x).sum::<f32>() / row.len() as f32;
    (1.0 - smoothing) * nll + smoothing * (mean_gap + sum.ln())
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k, logits, labels) = cpu_rows(ls, ll, ys, yl)?;
        let sum: f32 = logits
            .chunks_exact(k.max(1))
            .zip(labels)
            .map(|(row, &y)| row_loss(row, y, self.smoothing))
            .sum();
        Ok((CpuStorage::F32(vec![sum / n as f32]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, k) = sizes(ll, yl)?;
        let loss = cuda::forward(ls, ll, ys, yl, n, k, self.smoothing)?;
        Ok((super::cuda::storage(loss, &ls.device), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let op = CrossEntropyGrad {
            smoothing: self.smoothing,
        };
        let grad_logits = logits.apply_op3_no_bwd(labels, &grad, &op)?;
        Ok((Some(grad_logits), None))
    }
}

/// (softmax(row) - target) * dL/dloss / n, target = (1 - e) onehot(label) + e / k, the loss
/// gradient staying on the device.
struct CrossEntropyGrad {
    smoothing: f32,
}

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "kiln-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k, logits, labels) = cpu_rows(ls, ll, ys, yl)?;
        let scale = contiguous_f32(gs, gl, "loss gradient")?[0] / n as f32;
        let mut grad = vec![0f32; n * k];
        let (hot, cold) = (1.0 - self.smoothing, self.smoothing / k as f32);
        for ((row, out), &y) in logits
            .chunks_exact(k.max(1))
            .zip(grad.chunks_exact_mut(k.max(1)))
            .zip(labels)
        {
            let (top, sum) = max_and_sum_exp(row);
            for (j, (v, g)) in row.iter().zip(out.iter_mut()).enumerate() {
                let target = if j == y as usize { hot + cold } else { cold };
                *g = ((v - top).exp() / sum - target) * scale;
            }
        }
        Ok((CpuStorage::F32(grad), Shape::from((n, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, k) = sizes(ll, yl)?;
        let grad = cuda::backward(ls, ll, ys, yl, gs, gl, n, k, self.smoothing)?;
        Ok((super::cuda::storage(grad, &ls.device), Shape::from((n, k))))
    }
}

struct BatchTally;

impl CustomOp3 for BatchTally {
    fn name(&self) -> &'static str {
        "kiln-batch-tally"
    }

    fn cpu_fwd(
        &self,
        ls: &CpuStorage,
        ll: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k, logits, labels) = cpu_rows(ls, ll, ys, yl)?;
        let loss = contiguous_f32(ss, sl, "loss")?[0];
        let correct = logits
            .chunks_exact(k.max(1))
            .zip(labels)
            .filter(|(row, &y)| argmax(row) == y as usize)
            .count();
        Ok((
            CpuStorage::F32(vec![loss * n as f32, correct as f32]),
            Shape::from(2),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
        ys: &candle_core::CudaStorage,
        yl: &Layout,
        ss: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, k) = sizes(ll, yl)?;
        let sums = cuda::tally(ls, ll, ys, yl, ss, sl, n, k)?;
        Ok((super::cuda::storage(sums, &ls.device), Shape::from(2)))
    }
}

/// cross_entropy.cu: cross_entropy_fwd, cross_entropy_bwd, batch_tally.
#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout};

    use crate::ops::cuda::{kernel, one_block, output, per_item, view};

    fn int(v: usize) -> candle_core::Result<i32> {
        crate::ops::cuda::int(v, "cross_entropy")
    }

    /// The logits and labels every kernel here reads.
    fn views<'a>(
        ls: &'a CudaStorage,
        ll: &Layout,
        ys: &'a CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CudaView<'a, f32>, CudaView<'a, u32>)> {
        Ok((
            view::<f32>(ls, ll, "logits")?,
            view::<u32>(ys, yl, "labels")?,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        ls: &CudaStorage,
        ll: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
        n: usize,
        k: usize,
        smoothing: f32,
    ) -> candle_core::Result<CudaSlice<f32>> {
        let dev = &ls.device;
        let (logits, labels) = views(ls, ll, ys, yl)?;
        let loss = output::<f32>(dev, 1)?;
        let func = kernel(dev, "cross_entropy_fwd")?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        let (n, k) = (int(n)?, int(k)?);
        launch
            .arg(&logits)
            .arg(&labels)
            .arg(&n)
            .arg(&k)
            .arg(&smoothing)
            .arg(&loss);
        // SAFETY: the arguments match the kernel's signature; thread 0 writes the one output.
        unsafe { launch.launch(one_block()) }.w()?;
        Ok(loss)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        ls: &CudaStorage,
        ll: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
        n: usize,
        k: usize,
        smoothing: f32,
    ) -> candle_core::Result<CudaSlice<f32>> {
        let dev = &ls.device;
        let (logits, labels) = views(ls, ll, ys, yl)?;
        let grad_loss = view::<f32>(gs, gl, "loss gradient")?;
        let grad = output::<f32>(dev, n * k)?;
        let func = kernel(dev, "cross_entropy_bwd")?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        let (rows, k) = (int(n)?, int(k)?);
        launch
            .arg(&logits)
            .arg(&labels)
            .arg(&grad_loss)
            .arg(&rows)
            .arg(&k)
            .arg(&smoothing)
            .arg(&grad);
        // SAFETY: as above; one thread per row writes the row's k gradients.
        unsafe { launch.launch(per_item(n)) }.w()?;
        Ok(grad)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn tally(
        ls: &CudaStorage,
        ll: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
        n: usize,
        k: usize,
    ) -> candle_core::Result<CudaSlice<f32>> {
        let dev = &ls.device;
        let (logits, labels) = views(ls, ll, ys, yl)?;
        let loss = view::<f32>(ss, sl, "loss")?;
        let sums = output::<f32>(dev, 2)?;
        let func = kernel(dev, "batch_tally")?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        let (n, k) = (int(n)?, int(k)?);
        launch
            .arg(&logits)
            .arg(&labels)
            .arg(&loss)
            .arg(&n)
            .arg(&k)
            .arg(&sums);
        // SAFETY: as above; thread 0 writes both sums.
        unsafe { launch.launch(one_block()) }.w()?;
        Ok(sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::random_tensor as random;
    use candle_core::Var;
    use proptest::prelude::*;

    fn labels(n: usize, k: usize, seed: u64) -> Tensor {
        let values: Vec<u32> = (0..n as u64)
            .map(|i| ((i * 7 + seed) % k as u64) as u32)
            .collect();
        Tensor::from_vec(values, n, &Device::Cpu).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn loss_and_gradient_match_candles_composition(
            n in 1usize..40, k in 1usize..12, seed in 0u64..1000, scale in 0.1f64..30.0,
            smoothing in prop_oneof![Just(0.0f32), 0.0f32..0.5],
        ) {
            let logits = Var::from_tensor(&(random(&[n, k], seed) * scale).unwrap()).unwrap();
            let y = labels(n, k, seed);
            let ours = cross_entropy(logits.as_tensor(), &y, smoothing).unwrap();
            let reference = cross_entropy_reference(logits.as_tensor(), &y, smoothing).unwrap();
            let (a, b) = (ours.to_scalar::<f32>().unwrap(), reference.to_scalar::<f32>().unwrap());
            prop_assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "loss {a} vs {b}");
            // An upstream gradient other than 1, as when the loss is scaled.
            let grad = |loss: Tensor| {
                let g = (loss * 3.0).unwrap().backward().unwrap();
                g.get(&logits).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            for (x, r) in grad(ours).iter().zip(grad(reference)) {
                // Relative above 1: the upstream 3 makes gradients up to 3, a few f32 steps apart.
                prop_assert!((x - r).abs() <= 1e-6 * r.abs().max(1.0), "gradient {x} vs {r}");
            }
        }

        #[test]
        fn tally_matches_candles_argmax(n in 1usize..40, k in 1usize..12, seed in 0u64..1000) {
            let logits = random(&[n, k], seed);
            let y = labels(n, k, seed);
            let loss = Tensor::new(0.75f32, &Device::Cpu).unwrap();
            let ours = batch_tally(&logits, &y, &loss).unwrap().to_vec1::<f32>().unwrap();
            let correct = logits.argmax(1).unwrap().eq(&y).unwrap()
                .to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            prop_assert_eq!(ours, vec![0.75 * n as f32, correct]);
        }
    }

    #[test]
    fn a_label_out_of_range_gives_nan_not_a_crash() {
        let logits = random(&[2, 3], 1);
        let y = Tensor::new(&[0u32, 7], &Device::Cpu).unwrap();
        let loss = cross_entropy(&logits, &y, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(loss.is_nan());
    }

    /// Integer logits tie: a row counts as correct only where its first maximum is the label,
    /// as torch.argmax picks the first (rows [2, 5, 5] with label 2 and [4, 4, 1] with label 0).
    #[test]
    fn ties_count_the_first_maximum_only() {
        let logits =
            Tensor::new(&[[2f32, 5., 5.], [4., 4., 1.], [7., 7., 7.]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[2u32, 0, 1], &Device::Cpu).unwrap();
        let loss = Tensor::new(1.0f32, &Device::Cpu).unwrap();
        let tally = batch_tally(&logits, &labels, &loss)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            tally,
            [3.0, 1.0],
            "only the second row's first maximum is its label"
        );
    }

    /// nn.CrossEntropyLoss(label_smoothing=0.1) on these logits (torch 2.15, float32).
    #[test]
    fn label_smoothing_matches_pytorch() {
        let logits = Tensor::new(&[[2.0f32, -1.0, 0.5], [0.1, 0.2, 3.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let loss = cross_entropy(&logits, &y, 0.1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((loss - 1.605_456_4).abs() < 1e-6, "{loss}");
    }
}
