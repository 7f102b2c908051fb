//! The MPI side of a [`super::World`] (rsmpi over the system's Open MPI or MPICH).
//!
//! MPI's default error handler ends the whole job on a failed collective, and `mpirun` ends
//! every rank when one dies: a rank never waits for a dead peer.

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::error::{Error, Result};

pub struct Comm {
    world: SimpleCommunicator,
    /// The ranks that share this machine's memory (MPI_COMM_TYPE_SHARED).
    local: SimpleCommunicator,
    /// Finalises MPI when dropped, after the communicators above.
    _universe: Universe,
}

impl Comm {
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| {
            Error::InvalidSetting("MPI was already initialised in this process".into())
        })?;
        let world = universe.world();
        let local = world.split_shared(world.rank());
        Ok(Self {
            world,
            local,
            _universe: universe,
        })
    }

    pub fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    pub fn size(&self) -> usize {
        self.world.size() as usize
    }

    pub fn local_rank(&self) -> usize {
        self.local.rank() as usize
    }

    pub fn local_size(&self) -> usize {
        self.local.size() as usize
    }

    pub fn sum_f64(&self, values: &mut [f64]) -> std::result::Result<(), String> {
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    pub fn sum_f32(&self, values: &mut [f32]) -> std::result::Result<(), String> {
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    pub fn broadcast_f64(&self, values: &mut [f64]) -> std::result::Result<(), String> {
        self.world.process_at_rank(0).broadcast_into(values);
        Ok(())
    }

    pub fn local_barrier(&self) {
        self.local.barrier();
    }

    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
