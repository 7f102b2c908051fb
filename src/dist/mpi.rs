//! The MPI side of a [`super::World`] (rsmpi over the system's Open MPI or MPICH).
//!
//! MPI's default error handler ends the whole job on a failed collective, and `mpirun` ends
//! every rank when one dies: a rank never waits for a dead peer.

use std::sync::{Mutex, MutexGuard};

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::Equivalence;
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::error::{Error, Result};

pub struct Comm {
    /// Held through every MPI call: MPI is set up for calls from any thread, one at a time.
    turn: Mutex<()>,
    world: SimpleCommunicator,
    /// The ranks that share this machine's memory (MPI_COMM_TYPE_SHARED).
    local: SimpleCommunicator,
    /// Finalises MPI when dropped, after the communicators above.
    _universe: Universe,
}

impl Comm {
    pub fn init() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| {
                Error::InvalidSetting("MPI was already initialised in this process".into())
            })?;
        if threading < Threading::Serialized {
            return Err(Error::InvalidSetting(format!(
                "this MPI library offers threads only {threading:?} support; kiln needs \
                 MPI_THREAD_SERIALIZED (Open MPI and MPICH builds have it)"
            )));
        }
        let world = universe.world();
        let local = world.split_shared(world.rank());
        Ok(Self {
            turn: Mutex::new(()),
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

    fn turn(&self) -> MutexGuard<'_, ()> {
        // A poisoned lock only means another thread panicked; MPI itself is unharmed.
        self.turn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces `values` with their sum over every rank.
    pub fn sum<T: Equivalence + Copy>(&self, values: &mut [T]) -> std::result::Result<(), String> {
        let _turn = self.turn();
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    pub fn broadcast_f64(&self, values: &mut [f64]) -> std::result::Result<(), String> {
        let _turn = self.turn();
        self.world.process_at_rank(0).broadcast_into(values);
        Ok(())
    }

    pub fn local_barrier(&self) {
        let _turn = self.turn();
        self.local.barrier();
    }

    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

// SAFETY: the communicators are handles that MPI lets any thread of the process use, and MPI is
// initialised for MPI_THREAD_SERIALIZED: every call above holds `turn`, so no two threads are
// ever inside MPI at once. (MPI_Abort ends the process, wherever it is called from.)
unsafe impl Send for Comm {}
// SAFETY: as for Send.
unsafe impl Sync for Comm {}
