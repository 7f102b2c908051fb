//! Training: a run resolved once ([`plan`]), the loop ([`fit`]) and what observes it
//! ([`observers`]), the image-classification run that wires them ([`classify`]), the linear
//! set-up check, what it takes to resume, and the dry run that loads a GPU's kernels before the
//! first step ([`warm_up`]).

pub mod classify;
pub mod fit;
pub mod linear_fit;
pub mod lr_find;
pub mod observers;
pub mod plan;
pub mod resume;
pub mod warm_up;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The independent random streams of a run, all derived from its one seed, so changing how
/// one is used (say, the data order) leaves the others (say, the initial weights) as they were.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Shuffle = 1,
    Data = 2,
}

/// The generator for `stream` in `epoch` (0 for streams used once per run). Deriving it from
/// (seed, stream, epoch) means a checkpoint's epoch is all it takes to restore it exactly.
pub fn rng(seed: u64, stream: Stream, epoch: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((stream as u64) << 32) | epoch as u64);
    rng
}
