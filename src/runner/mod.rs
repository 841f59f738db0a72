//! Turning scheduled work into device work: the flat batch, the forward, sampling.

pub mod batch;
pub mod model_runner;
pub mod sampler;
