//! Turning scheduled work into device work: the flat batch, the forward, sampling.

pub mod batch;
pub mod model_runner;
pub mod sampler;

use crate::error::Result;
use batch::Batch;

/// A model on a device that runs flat batches: the engine thread's only view of it.
pub trait Forward: Send {
    /// One forward; `batch.logit_indices.len()` rows of `vocab_size` f32 logits.
    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>>;

    fn vocab_size(&self) -> usize;
}
