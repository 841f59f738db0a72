//! Runs a flat batch through the Burn model on its device and brings back the logits rows.
//! Synchronous: a step runs to completion in `submit`, and `collect` hands its rows back.

use std::collections::VecDeque;

use burn::tensor::{backend::Backend, DType};
use kiln_kernels::sample;

use super::batch::Batch;
use super::sampler::argmax;
use super::{Forward, Readback, StepOutput};
use crate::error::{Error, Result};
use crate::models::llama::Llama;
use crate::ops::attention::{PagedAttention, ReferenceAttention};
use crate::ops::kv_cache::KvCache;

/// The model, its KV pool and the attention implementation, on one device.
pub struct ModelRunner<B: Backend> {
    model: Llama<B>,
    cache: KvCache<B>,
    attention: Box<dyn PagedAttention<B>>,
    /// Submitted steps' rows, oldest first.
    done: VecDeque<StepOutput>,
    /// The last submitted step's greedy tokens, for the next step's deferred inputs.
    last_tokens: Vec<u32>,
}

impl<B: Backend> ModelRunner<B> {
    pub fn new(
        model: Llama<B>,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let c = model.config();
        let cache = KvCache::new(
            c.num_layers,
            num_blocks,
            block_size,
            c.num_kv_heads,
            c.head_dim,
            dtype,
            device,
        );
        Self {
            model,
            cache,
            attention: Box::new(ReferenceAttention),
            done: VecDeque::new(),
            last_tokens: Vec::new(),
        }
    }
}

impl<B: Backend> Forward for ModelRunner<B> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn submit(&mut self, batch: &Batch, readback: Readback) -> Result<()> {
        let mut resolved;
        let batch = if batch.deferred.is_empty() {
            batch
        } else {
            resolved = batch.clone();
            for d in &batch.deferred {
                resolved.token_ids[d.index] =
                    *self.last_tokens.get(d.prev_row).ok_or_else(|| {
                        Error::Device(format!("no greedy token for previous row {}", d.prev_row))
                    })?;
            }
            &resolved
        };
        let logits = self
            .model
            .forward(batch, &mut self.cache, self.attention.as_ref())
            .into_data()
            .into_vec::<f32>()
            .map_err(|e| Error::Device(format!("reading logits: {e:?}")))?;
        let out = match readback {
            Readback::Logits => StepOutput::Logits(logits),
            Readback::Greedy | Readback::Sampled => {
                let vocab = self.vocab_size();
                let rows = logits.len() / vocab;
                let tokens: Vec<u32> = if readback == Readback::Greedy {
                    logits.chunks_exact(vocab).map(argmax).collect()
                } else if batch.sampling.len() == rows {
                    sample::reference(&logits, &batch.sampling)
                } else {
                    return Err(Error::Device(format!(
                        "{} sampling settings for {rows} rows",
                        batch.sampling.len()
                    )));
                };
                // A step without rows leaves the last picks in place, as the device runner does.
                if !tokens.is_empty() {
                    self.last_tokens = tokens.clone();
                }
                StepOutput::Tokens(tokens)
            }
        };
        self.done.push_back(out);
        Ok(())
    }

    fn collect(&mut self) -> Result<StepOutput> {
        self.done
            .pop_front()
            .ok_or_else(|| Error::Device("collect without a submitted step".into()))
    }
}
