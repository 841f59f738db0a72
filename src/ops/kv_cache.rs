//! The paged KV pool on the device: per layer, K and V of `num_blocks · block_size` slots.

use burn::tensor::{backend::Backend, DType, Tensor};

/// K and V of one layer: `[slots, kv_heads, head_dim]` each.
pub struct LayerKv<B: Backend> {
    pub k: Tensor<B, 3>,
    pub v: Tensor<B, 3>,
}

/// The KV pool of every layer.
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerKv<B>>,
    pub block_size: usize,
}

impl<B: Backend> KvCache<B> {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Self {
        let shape = [num_blocks * block_size, kv_heads, head_dim];
        let zeros = || Tensor::<B, 3>::zeros(shape, (device, dtype));
        Self {
            layers: (0..num_layers)
                .map(|_| LayerKv {
                    k: zeros(),
                    v: zeros(),
                })
                .collect(),
            block_size,
        }
    }
}
