//! Batch normalisation over the global batch of a data-parallel run (PyTorch's
//! `SyncBatchNorm`): each channel's mean and variance are summed over every replica's share, so
//! W processes normalise as one process does the whole batch, and the gradient flows back
//! through the same sums. A composition of candle operations in f64 around one cross-replica
//! sum; the CPU alone (CUDA's all-reduce belongs to NCCL).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::{Activation, BatchStatistics, MemoryFormat};

/// Sums values over the replicas of a data-parallel run (an MPI all-reduce).
pub trait CrossReplicaSum: Send + Sync {
    /// Replaces `values` with their sum over every replica; every replica calls it in the same
    /// order.
    fn sum(&self, values: &mut [f64]) -> std::result::Result<(), String>;
}

/// What a synced batch norm returns: the output, the global batch's statistics, and how many
/// values per channel they were taken over (for the running variance's correction).
pub struct SyncedOutput {
    pub y: Tensor,
    pub statistics: BatchStatistics,
    pub count: f64,
}

/// `act((x - mean) / sqrt(var + eps) * gamma + beta)` with the statistics of the global batch;
/// `x` in `format`, f32 on the CPU.
pub fn batch_norm_train_synced(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    act: Activation,
    format: MemoryFormat,
    replicas: &Arc<dyn CrossReplicaSum>,
) -> candle_core::Result<SyncedOutput> {
    if !x.device().is_cpu() {
        candle_core::bail!("sync_bn trains on the CPU only (for now); drop --sync-bn");
    }
    let (n, c, h, w) = format.nchw_dims(x)?;
    let (axes, per_channel): ([usize; 3], (usize, usize, usize, usize)) = match format {
        MemoryFormat::ChannelsFirst => ([0, 2, 3], (1, c, 1, 1)),
        MemoryFormat::ChannelsLast => ([0, 1, 2], (1, 1, 1, c)),
    };
    let local = (n * h * w) as f64;
    let mut count = [local];
    replicas.sum(&mut count).map_err(candle_core::Error::Msg)?;
    let count = count[0];
    let sum = ReplicaSum {
        replicas: Arc::clone(replicas),
        share: local / count,
    };
    let x64 = x.to_dtype(DType::F64)?;
    // Two passes, as the kernels: the mean first, then the squared deviations from it.
    let mean = (x64.sum(axes.to_vec())?.apply_op1(sum.clone())? / count)?;
    let centred = x64.broadcast_sub(&mean.reshape(per_channel)?)?;
    let var = (centred.sqr()?.sum(axes.to_vec())?.apply_op1(sum)? / count)?;
    let scale = ((&var + eps)?.sqrt()?.recip()? * gamma.to_dtype(DType::F64)?)?;
    let y = centred
        .broadcast_mul(&scale.reshape(per_channel)?)?
        .broadcast_add(&beta.to_dtype(DType::F64)?.reshape(per_channel)?)?
        .to_dtype(x.dtype())?;
    Ok(SyncedOutput {
        y: act.compose(&y)?,
        statistics: BatchStatistics {
            mean: mean.detach().to_dtype(DType::F32)?,
            var: var.detach().to_dtype(DType::F32)?,
        },
        count,
    })
}

/// The sum of a tensor over the replicas. Each replica's loss is the mean over its own share of
/// the batch, and the optimizer takes the replicas' gradients weighted by `share` (its images
/// over the global batch's): so the gradient that reaches this replica's input is the sum over
/// replicas of their weighted gradients, divided by its own weight.
#[derive(Clone)]
struct ReplicaSum {
    replicas: Arc<dyn CrossReplicaSum>,
    share: f64,
}

impl CustomOp1 for ReplicaSum {
    fn name(&self) -> &'static str {
        "replica-sum"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F64(data) = storage else {
            candle_core::bail!("replica-sum takes f64");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("replica-sum takes a contiguous tensor");
        };
        let mut values = data[start..end].to_vec();
        self.replicas
            .sum(&mut values)
            .map_err(candle_core::Error::Msg)?;
        Ok((CpuStorage::F64(values), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let weighted = (grad.contiguous()? * self.share)?;
        let summed = weighted.apply_op1_no_bwd(self)?;
        Ok(Some((summed / self.share)?))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Barrier, Mutex};

    use candle_core::Var;

    use super::*;
    use crate::ops::batch_norm::batch_norm_train_reference;
    use crate::ops::random_tensor as random;

    /// Two replicas in two threads of one process, summing through shared memory.
    struct Shared {
        barrier: Barrier,
        slots: Mutex<[Vec<f64>; 2]>,
    }

    struct Replica {
        rank: usize,
        shared: Arc<Shared>,
    }

    impl CrossReplicaSum for Replica {
        fn sum(&self, values: &mut [f64]) -> std::result::Result<(), String> {
            self.shared.slots.lock().unwrap()[self.rank] = values.to_vec();
            self.shared.barrier.wait();
            {
                let slots = self.shared.slots.lock().unwrap();
                for (i, v) in values.iter_mut().enumerate() {
                    *v = slots[0][i] + slots[1][i];
                }
            }
            self.shared.barrier.wait();
            Ok(())
        }
    }

    /// The loss (the mean over a share of `rows` of sum(act(bn(x)) * u)) and its gradients for
    /// x, gamma and beta, weighted by `weight`.
    fn step(
        x: &Tensor,
        u: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        weight: f64,
        replicas: Option<Arc<dyn CrossReplicaSum>>,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (xv, gv, bv) = (
            Var::from_tensor(x).unwrap(),
            Var::from_tensor(gamma).unwrap(),
            Var::from_tensor(beta).unwrap(),
        );
        let format = MemoryFormat::ChannelsFirst;
        let (y, mean) = match replicas {
            Some(r) => {
                let out = batch_norm_train_synced(
                    xv.as_tensor(),
                    gv.as_tensor(),
                    bv.as_tensor(),
                    1e-5,
                    Activation::Relu,
                    format,
                    &r,
                )
                .unwrap();
                (out.y, out.statistics.mean)
            }
            None => {
                let out = batch_norm_train_reference(
                    xv.as_tensor(),
                    gv.as_tensor(),
                    bv.as_tensor(),
                    1e-5,
                    Activation::Relu,
                    format,
                )
                .unwrap();
                (out.y, out.mean)
            }
        };
        let rows = x.dim(0).unwrap() as f64;
        let loss = ((y * u).unwrap().sum_all().unwrap() / rows).unwrap();
        let grads = loss.backward().unwrap();
        let grad = |v: &Var| {
            (grads.get(v).unwrap() * weight)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        (
            mean.to_vec1::<f32>().unwrap(),
            grad(&xv),
            grad(&gv),
            grad(&bv),
        )
    }

    fn close(what: &str, a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// Two replicas, each with half of a batch, compute the whole batch's statistics and, once
    /// their gradients are weighted and summed, the whole batch's gradients: for the scale and
    /// shift, and for each half of the input.
    #[test]
    fn two_replicas_compute_what_one_process_computes() {
        let x = random(&[8, 3, 4, 4], 1);
        let u = random(&[8, 3, 4, 4], 2);
        let gamma = (random(&[3], 3) + 1.5).unwrap();
        let beta = random(&[3], 4);
        let (mean, gx, gg, gb) = step(&x, &u, &gamma, &beta, 1.0, None);
        let shared = Arc::new(Shared {
            barrier: Barrier::new(2),
            slots: Mutex::new([Vec::new(), Vec::new()]),
        });
        let halves: Vec<_> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..2)
                .map(|rank| {
                    let (x, u, gamma, beta) = (&x, &u, &gamma, &beta);
                    let replica: Arc<dyn CrossReplicaSum> = Arc::new(Replica {
                        rank,
                        shared: Arc::clone(&shared),
                    });
                    scope.spawn(move || {
                        let part = |t: &Tensor| t.narrow(0, rank * 4, 4).unwrap();
                        step(&part(x), &part(u), gamma, beta, 0.5, Some(replica))
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for half in &halves {
            close("mean", &half.0, &mean);
        }
        let sum = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<_>>();
        close("gamma's gradient", &sum(&halves[0].2, &halves[1].2), &gg);
        close("beta's gradient", &sum(&halves[0].3, &halves[1].3), &gb);
        let gx_halves = [halves[0].1.clone(), halves[1].1.clone()].concat();
        close("x's gradient", &gx_halves, &gx);
    }
}
