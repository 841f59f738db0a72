//! Runs a flat batch through the model on its device and brings back the logits rows.

use burn::tensor::{backend::Backend, DType};

use super::batch::Batch;
use super::Forward;
use crate::error::{Error, Result};
use crate::models::llama::Llama;
use crate::ops::attention::{PagedAttention, ReferenceAttention};
use crate::ops::kv_cache::KvCache;

/// The model, its KV pool and the attention implementation, on one device.
pub struct ModelRunner<B: Backend> {
    model: Llama<B>,
    cache: KvCache<B>,
    attention: Box<dyn PagedAttention<B>>,
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
        }
    }
}

impl<B: Backend> Forward for ModelRunner<B> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        let logits = self
            .model
            .forward(batch, &mut self.cache, self.attention.as_ref());
        logits
            .into_data()
            .into_vec::<f32>()
            .map_err(|e| Error::Device(format!("reading logits: {e:?}")))
    }
}
