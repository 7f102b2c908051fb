//! Files to batches: the CIFAR-10 binary format, the in-memory data set, and synthetic images.

pub mod batches;
pub mod cifar;
pub mod synthetic;

pub use batches::ImageSet;
