//! Gradients summed between GPUs by NCCL (feature `nccl`): one communicator per process, its id
//! made by rank 0 and sent to the others over MPI (as NCCL's own examples and Horovod do), and
//! an all-reduce per bucket on the device's stream, so a step's gradients never visit the host.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, CustomOp1, Device, Layout, Shape, Tensor};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::error::{Error, Result};

/// NCCL's id of a communicator: opaque bytes, made by one rank and sent to the others.
pub type NcclId = [std::ffi::c_char; 128];

/// The communicator between the GPUs of a run, one process each.
pub struct Nccl {
    comm: Mutex<Comm>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time: every use below
// holds the lock.
unsafe impl Send for Nccl {}
// SAFETY: as for Send.
unsafe impl Sync for Nccl {}

impl Nccl {
    /// Joins rank `rank` of `size` on `device`; `id` is rank 0's, received over MPI.
    pub fn join(device: &Device, rank: usize, size: usize, id: NcclId) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            return Err(Error::InvalidSetting(
                "NCCL sums gradients between GPUs; this process trains on another device".into(),
            ));
        };
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, size, Id::uninit(id))
            .map_err(|err| nccl_error(rank, size, format!("cannot join NCCL: {err:?}")))?;
        Ok(Self {
            comm: Mutex::new(comm),
        })
    }

    /// A new communicator's id, made on rank 0.
    pub fn new_id() -> Result<NcclId> {
        let id = Id::new().map_err(|err| nccl_error(0, 0, format!("no NCCL id: {err:?}")))?;
        Ok(*id.internal())
    }

    fn comm(&self) -> MutexGuard<'_, Comm> {
        // A poisoned lock only means another thread panicked; the communicator is unharmed.
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sum of `t` (contiguous, on this process's GPU) over every rank.
    pub fn sum(self: &Arc<Self>, t: &Tensor) -> Result<Tensor> {
        Ok(t.contiguous()?
            .apply_op1_no_bwd(&AllReduce(Arc::clone(self)))?)
    }
}

fn nccl_error(rank: usize, size: usize, message: String) -> Error {
    Error::Distributed {
        rank,
        size,
        message,
    }
}

/// The all-reduce as a candle op: its output is a new buffer that NCCL writes on the stream.
struct AllReduce(Arc<Nccl>);

impl CustomOp1 for AllReduce {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce takes tensors on a GPU")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce takes a contiguous tensor");
        };
        let dev = s.device().clone();
        let comm = self.0.comm();
        macro_rules! reduce {
            ($t:ty) => {{
                let input = s.as_cuda_slice::<$t>()?.slice(start..end);
                // SAFETY: NCCL writes every element before anything reads them.
                let mut output = unsafe { dev.alloc::<$t>(end - start) }?;
                comm.all_reduce(&input, &mut output, &ReduceOp::Sum)
                    .map_err(|err| candle_core::Error::Msg(format!("NCCL all-reduce: {err:?}")))?;
                CudaStorage::wrap_cuda_slice(output, dev.clone())
            }};
        }
        let out = match s.dtype() {
            candle_core::DType::F32 => reduce!(f32),
            candle_core::DType::BF16 => reduce!(half::bf16),
            candle_core::DType::F16 => reduce!(half::f16),
            candle_core::DType::F64 => reduce!(f64),
            other => candle_core::bail!("the NCCL all-reduce takes floats, not {other:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}
