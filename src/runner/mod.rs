//! Turning scheduled work into device work: the flat batch, the forward, sampling.

pub mod batch;
pub mod model_runner;
pub mod sampler;

use crate::error::{Error, Result};
use batch::Batch;

/// What a step brings back for its logits rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readback {
    /// Each row's f32 logits: the host samples.
    Logits,
    /// Each row's greedy token, chosen on the device: one u32 a row crosses to the host, and
    /// the next step may take these tokens as inputs before they have (`Batch::deferred`).
    Greedy,
    /// Each row's token drawn on the device with its `Batch::sampling` settings (temperature,
    /// top-k, top-p, min-p): crosses and feeds the next step as `Greedy`'s tokens do.
    Sampled,
}

/// A collected step's rows: logits (`rows × vocab`) or greedy tokens.
#[derive(Debug)]
pub enum StepOutput {
    Logits(Vec<f32>),
    Tokens(Vec<u32>),
}

impl Readback {
    /// Whether the step's tokens are chosen on the device.
    pub fn picks_tokens(self) -> bool {
        self != Readback::Logits
    }
}

/// A model on a device that runs flat batches: the engine thread's only view of it.
///
/// Steps are queued with `submit` and come back, in order, from `collect`. Two may be
/// outstanding: the engine queues step n+1 (its deferred tokens are step n's greedy picks)
/// before it collects step n, so the device works while the host streams step n's tokens.
pub trait Forward: Send {
    /// Queues one forward. `batch.deferred` tokens are taken from the last submitted step, which
    /// must have been a `Greedy` one.
    fn submit(&mut self, batch: &Batch, readback: Readback) -> Result<()>;

    /// Waits for the oldest submitted step: `batch.logit_indices.len()` rows of it.
    fn collect(&mut self) -> Result<StepOutput>;

    fn vocab_size(&self) -> usize;

    /// One forward, run to completion: f32 logits, one row per `batch.logit_indices`.
    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        self.submit(batch, Readback::Logits)?;
        match self.collect()? {
            StepOutput::Logits(logits) => Ok(logits),
            StepOutput::Tokens(_) => Err(Error::Device(
                "a step queued earlier was collected in place of this one".into(),
            )),
        }
    }
}
