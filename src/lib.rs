//! kiln: train deep-learning models on your own machine (Metal, CUDA or CPU), on candle.
//!
//! Data flows one way: files ([`data`]) -> batches -> model ([`models`]) -> loss -> gradients ->
//! optimizer ([`optim`]) -> weights on disk ([`checkpoint`]), driven by [`train`].

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod evaluate;
pub mod fs;
pub mod metrics;
pub mod models;
pub mod onnx;
pub mod ops;
pub mod optim;
pub mod plots;
pub mod predict;
pub mod profile;
pub mod report;
pub mod tensorboard;
pub mod train;

pub use error::{Error, Result};
