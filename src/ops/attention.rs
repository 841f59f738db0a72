//! The attention seam: writing K/V into the paged pool and attending over it through block
//! tables. `ReferenceAttention` is the plain Burn-ops version; GPU kernels implement the same trait.

use burn::tensor::{
    activation::softmax, backend::Backend, s, Bool, DType, Int, Tensor, TensorData,
};

use super::kv_cache::LayerKv;
use crate::runner::batch::Batch;

/// Per-step attention inputs, built once from the flat batch and shared by every layer.
pub struct AttentionMetadata<B: Backend> {
    /// (flat token start, first slot, length): runs of tokens whose slots are consecutive.
    pub write_runs: Vec<(usize, usize, usize)>,
    pub seqs: Vec<SeqAttention<B>>,
}

/// One sequence's view of the pool.
pub struct SeqAttention<B: Backend> {
    pub start: usize,
    pub len: usize,
    /// Slots of positions `0..context_len`.
    pub slots: Tensor<B, 1, Int>,
    /// `[len, context_len]`, true where a key lies after its query (None for one query).
    pub causal_mask: Option<Tensor<B, 2, Bool>>,
}

impl<B: Backend> AttentionMetadata<B> {
    pub fn new(batch: &Batch, block_size: usize, device: &B::Device) -> Self {
        let mut write_runs: Vec<(usize, usize, usize)> = Vec::new();
        for (i, &slot) in batch.slot_mapping.iter().enumerate() {
            match write_runs.last_mut() {
                Some((start, first, len)) if *start + *len == i && *first + *len == slot => {
                    *len += 1
                }
                _ => write_runs.push((i, slot, 1)),
            }
        }
        let seqs = batch
            .seqs
            .iter()
            .map(|s| {
                let slots: Vec<i32> = (0..s.context_len)
                    .map(|p| {
                        (s.block_table[p / block_size] as usize * block_size + p % block_size)
                            as i32
                    })
                    .collect();
                let causal_mask = (s.len > 1).then(|| {
                    let first = s.context_len - s.len;
                    let mask: Vec<bool> = (0..s.len)
                        .flat_map(|i| (0..s.context_len).map(move |j| j > first + i))
                        .collect();
                    Tensor::from_data(TensorData::new(mask, [s.len, s.context_len]), device)
                });
                SeqAttention {
                    start: s.start,
                    len: s.len,
                    slots: Tensor::from_data(TensorData::new(slots, [s.context_len]), device),
                    causal_mask,
                }
            })
            .collect();
        Self { write_runs, seqs }
    }
}

/// Paged attention over a flat batch.
pub trait PagedAttention<B: Backend>: Send + Sync {
    /// Stores the step's K/V (`[tokens, kv_heads, head_dim]`) into their slots.
    fn write_kv(
        &self,
        cache: &mut LayerKv<B>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        meta: &AttentionMetadata<B>,
    );

    /// Causal attention of `q` (`[tokens, heads, head_dim]`) over each sequence's cached K/V.
    fn attend(
        &self,
        q: Tensor<B, 3>,
        cache: &LayerKv<B>,
        meta: &AttentionMetadata<B>,
        scale: f64,
    ) -> Tensor<B, 3>;
}

/// Attention in plain Burn tensor ops: the reference every kernel is checked against.
pub struct ReferenceAttention;

fn write_runs<B: Backend>(
    pool: Tensor<B, 3>,
    new: &Tensor<B, 3>,
    runs: &[(usize, usize, usize)],
) -> Tensor<B, 3> {
    runs.iter().fold(pool, |pool, &(start, slot, len)| {
        pool.slice_assign(s![slot..slot + len], new.clone().narrow(0, start, len))
    })
}

impl<B: Backend> PagedAttention<B> for ReferenceAttention {
    fn write_kv(
        &self,
        cache: &mut LayerKv<B>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        meta: &AttentionMetadata<B>,
    ) {
        // Take the pool out so the write happens in place (a clone would force a copy).
        let dtype = cache.k.dtype();
        let device = k.device();
        let placeholder = || Tensor::<B, 3>::empty([0, 1, 1], &device);
        let pool_k = std::mem::replace(&mut cache.k, placeholder());
        cache.k = write_runs(pool_k, &k.cast(dtype), &meta.write_runs);
        let pool_v = std::mem::replace(&mut cache.v, placeholder());
        cache.v = write_runs(pool_v, &v.cast(dtype), &meta.write_runs);
    }

    fn attend(
        &self,
        q: Tensor<B, 3>,
        cache: &LayerKv<B>,
        meta: &AttentionMetadata<B>,
        scale: f64,
    ) -> Tensor<B, 3> {
        let [_, heads, head_dim] = q.dims();
        let kv_heads = cache.k.dims()[1];
        let group = heads / kv_heads;
        let dtype = q.dtype();
        let outs: Vec<Tensor<B, 3>> = meta
            .seqs
            .iter()
            .map(|s| {
                let ctx = s.slots.dims()[0];
                // [len, kvh·g, d] → [kvh, g·len, d]: query heads grouped under their K/V head.
                let q = q
                    .clone()
                    .narrow(0, s.start, s.len)
                    .reshape([s.len, kv_heads, group, head_dim])
                    .permute([1, 2, 0, 3])
                    .reshape([kv_heads, group * s.len, head_dim])
                    .cast(DType::F32);
                let k = cache
                    .k
                    .clone()
                    .select(0, s.slots.clone())
                    .swap_dims(0, 1)
                    .cast(DType::F32);
                let v = cache
                    .v
                    .clone()
                    .select(0, s.slots.clone())
                    .swap_dims(0, 1)
                    .cast(DType::F32);
                let scores = q.matmul(k.swap_dims(1, 2)).mul_scalar(scale);
                let mut scores = scores.reshape([kv_heads, group, s.len, ctx]);
                if let Some(mask) = &s.causal_mask {
                    let mask = mask
                        .clone()
                        .unsqueeze::<4>()
                        .expand([kv_heads, group, s.len, ctx]);
                    scores = scores.mask_fill(mask, f32::NEG_INFINITY);
                }
                let probs = softmax(scores, 3).reshape([kv_heads, group * s.len, ctx]);
                probs
                    .matmul(v)
                    .reshape([kv_heads, group, s.len, head_dim])
                    .permute([2, 0, 1, 3])
                    .reshape([s.len, heads, head_dim])
                    .cast(dtype)
            })
            .collect();
        Tensor::cat(outs, 0)
    }
}
