//! Data-parallel training: the processes of one run (its ranks), and what they share.
//!
//! Each rank holds a whole replica of the model and trains on its share of every global batch;
//! after the backward pass the gradients are averaged across ranks, so every replica takes the
//! same optimizer step (PyTorch's DistributedDataParallel). MPI starts the processes and carries
//! the collectives (`--features mpi`); without it, or when a run is started as one process,
//! the [`World`] is a single rank and every collective is a no-op.

pub mod launch;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
pub mod watchdog;

use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::ops::CrossReplicaSum;

/// Gradients travel in buckets of about this many bytes (DDP's default `bucket_cap_mb`): large
/// enough to run at the link's bandwidth, small enough to hold only one extra copy of a bucket.
pub const BUCKET_BYTES: usize = 25 << 20;

/// The processes of a run: this one's rank among `size`, and among the ranks on its machine.
#[derive(Clone)]
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    #[cfg(feature = "mpi")]
    comm: Option<std::sync::Arc<mpi::Comm>>,
    /// Sums gradients between GPUs, once [`World::with_gpu`] joined it.
    #[cfg(feature = "nccl")]
    nccl: Option<std::sync::Arc<nccl::Nccl>>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("local_rank", &self.local_rank)
            .field("local_size", &self.local_size)
            .finish()
    }
}

impl World {
    /// One process alone.
    pub fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            #[cfg(feature = "mpi")]
            comm: None,
            #[cfg(feature = "nccl")]
            nccl: None,
        }
    }

    /// The world this process was started into: MPI's when a launcher (`mpirun`, `srun`) started
    /// several processes, a single rank otherwise. A multi-process launch of a build without
    /// MPI is an error, not N independent runs writing over each other.
    pub fn start() -> Result<Self> {
        let Some(launched) = launch::launched() else {
            return Ok(Self::single());
        };
        // `mpirun -np 1` is a world of one: every exchange runs (and NCCL's, on a GPU), so that
        // it trains as a plain run does, bit for bit, through the data-parallel code.
        #[cfg(feature = "mpi")]
        {
            let _ = launched;
            let comm = mpi::Comm::init()?;
            Ok(Self {
                rank: comm.rank(),
                size: comm.size(),
                local_rank: comm.local_rank(),
                local_size: comm.local_size(),
                comm: Some(std::sync::Arc::new(comm)),
                #[cfg(feature = "nccl")]
                nccl: None,
            })
        }
        #[cfg(not(feature = "mpi"))]
        if launched.size == 1 {
            return Ok(Self::single());
        }
        #[cfg(not(feature = "mpi"))]
        Err(Error::InvalidSetting(format!(
            "this process was started as rank {} of {} by {}, but this kiln was built without \
             data-parallel support; rebuild with: cargo build --release --features mpi",
            launched.rank, launched.size, launched.launcher
        )))
    }

    /// This world with its GPUs joined over NCCL, when `device` is one of several processes'
    /// GPU and the build has NCCL; otherwise as it is (gradients then travel through the host).
    pub fn with_gpu(&self, device: &candle_core::Device) -> Result<Self> {
        #[cfg(feature = "nccl")]
        if self.is_distributed() && device.is_cuda() {
            let mut id = [0f64; 128];
            if self.is_root() {
                for (slot, byte) in id.iter_mut().zip(nccl::Nccl::new_id()?) {
                    *slot = f64::from(byte);
                }
            }
            self.broadcast_f64(&mut id)?;
            let id = id.map(|b| b as std::ffi::c_char);
            let joined = nccl::Nccl::join(device, self.rank, self.size, id)?;
            return Ok(Self {
                nccl: Some(std::sync::Arc::new(joined)),
                ..self.clone()
            });
        }
        let _ = device;
        Ok(self.clone())
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// This process's rank among those on its machine (the GPU it takes).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// The rank that prints, plots and writes the run's files.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Whether a launcher started this process as a rank of an MPI world (of one, too).
    pub fn is_distributed(&self) -> bool {
        #[cfg(feature = "mpi")]
        return self.comm.is_some();
        #[cfg(not(feature = "mpi"))]
        false
    }

    /// The positions rank `rank` takes of a global batch at `range` of the epoch's order: every
    /// `size`-th from its rank, as a `DistributedSampler` deals them out.
    pub fn share(&self, range: Range<usize>) -> impl Iterator<Item = usize> {
        range.skip(self.rank).step_by(self.size)
    }

    /// Replaces `values` with their sum over every rank.
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(comm) = &self.comm {
            return comm.sum(values).map_err(|m| self.error(m));
        }
        let _ = values;
        Ok(())
    }

    /// Replaces `values` with their sum over every rank.
    pub fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(comm) = &self.comm {
            return comm.sum(values).map_err(|m| self.error(m));
        }
        let _ = values;
        Ok(())
    }

    /// Replaces `values` on every rank with rank 0's.
    pub fn broadcast_f64(&self, values: &mut [f64]) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let Some(comm) = &self.comm {
            return comm.broadcast_f64(values).map_err(|m| self.error(m));
        }
        let _ = values;
        Ok(())
    }

    /// Runs `first` on local rank 0 while the other ranks of its machine wait, then `rest` on
    /// those: a download or a decoded-image cache is made once per machine, then read by all.
    pub fn local_rank_zero_first<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        #[cfg(feature = "mpi")]
        if let Some(comm) = &self.comm {
            if self.local_rank != 0 {
                comm.local_barrier();
            }
            let result = work();
            if self.local_rank == 0 {
                comm.local_barrier();
            }
            return result;
        }
        work()
    }

    /// Ends every process of the run with `code`, after this one has said why. Used when this
    /// rank fails: the others would otherwise wait for it in their next collective forever.
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let Some(comm) = &self.comm {
            comm.abort(code);
        }
        let _ = code;
    }

    /// What batch norms sum their statistics through under `sync_bn`: this world, when it has
    /// several ranks.
    pub fn batch_sync(&self) -> Option<std::sync::Arc<dyn CrossReplicaSum>> {
        (self.size > 1)
            .then(|| std::sync::Arc::new(self.clone()) as std::sync::Arc<dyn CrossReplicaSum>)
    }

    #[cfg(feature = "mpi")]
    fn error(&self, message: String) -> Error {
        Error::Distributed {
            rank: self.rank,
            size: self.size,
            message,
        }
    }

    /// Sums the step's gradients over the ranks, in buckets of [`BUCKET_BYTES`], in parameter
    /// order (the same on every rank). Each rank's gradients come weighted by its share of the
    /// step's images, so the sum is the mean over the whole step, also where shares differ.
    pub fn sum_gradients(&self, grads: &mut GradStore, params: &[(String, Var)]) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        let present: Vec<(&Var, Tensor)> = params
            .iter()
            .filter_map(|(_, var)| Some((var, grads.get(var)?.clone())))
            .collect();
        let mut start = 0;
        while start < present.len() {
            // A bucket: parameters from `start` until BUCKET_BYTES is reached (at least one).
            let mut end = start;
            let mut elements = 0;
            while end < present.len()
                && (end == start || (elements + present[end].1.elem_count()) * 4 <= BUCKET_BYTES)
            {
                elements += present[end].1.elem_count();
                end += 1;
            }
            let bucket = &present[start..end];
            #[cfg(feature = "nccl")]
            if let Some(nccl) = self.nccl.as_ref() {
                let flat: Vec<Tensor> = bucket
                    .iter()
                    .map(|(_, g)| g.flatten_all())
                    .collect::<candle_core::Result<_>>()?;
                let summed = nccl.sum(&Tensor::cat(&flat, 0)?)?;
                let mut at = 0;
                for (var, grad) in bucket {
                    let n = grad.elem_count();
                    grads.insert(var, summed.narrow(0, at, n)?.reshape(grad.shape())?);
                    at += n;
                }
                start = end;
                continue;
            }
            let mut flat = Vec::with_capacity(elements);
            for (_, grad) in bucket {
                flat.extend(grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            }
            self.sum_f32(&mut flat)?;
            let mut at = 0;
            for (var, grad) in bucket {
                let n = grad.elem_count();
                let summed = Tensor::from_slice(&flat[at..at + n], grad.shape(), grad.device())?
                    .to_dtype(grad.dtype())?;
                grads.insert(var, summed);
                at += n;
            }
            start = end;
        }
        Ok(())
    }

    /// Makes every rank's `state` (parameters and buffers) rank 0's: at the start of a run and
    /// before evaluating, so that replicas that could drift (BatchNorm's running statistics
    /// without `--sync-bn`) evaluate and save as one.
    pub fn broadcast_state(&self, state: &[(String, Var)]) -> Result<()> {
        if !self.is_distributed() {
            return Ok(());
        }
        for (_, var) in state {
            // f64 holds every f32, bf16, f16, u32 and (below 2^53) i64 exactly.
            let tensor = var.as_tensor();
            let mut values = tensor
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?;
            self.broadcast_f64(&mut values)?;
            let received = Tensor::from_vec(values, tensor.shape(), tensor.device())?
                .to_dtype(tensor.dtype())?;
            var.set(&received)?;
        }
        Ok(())
    }
}

impl CrossReplicaSum for World {
    fn sum(&self, values: &mut [f64]) -> std::result::Result<(), String> {
        self.sum_f64(values).map_err(|err| err.to_string())
    }
}
