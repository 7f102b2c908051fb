//! The training loops, one per kind of task a model has (see [`crate::models::Task`]).

pub mod classify;
pub mod linear_fit;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The independent random streams of a run, all derived from its one seed, so changing how
/// one is used (say, the data order) leaves the others (say, the initial weights) as they were.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Shuffle = 1,
    Data = 2,
}

pub fn rng(seed: u64, stream: Stream) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream as u64);
    rng
}
