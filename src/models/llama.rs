//! The Llama-family decoder: Llama 2/3.x, SmolLM2, Mistral (`llama`), Qwen2 (q/k/v bias) and
//! Qwen3 (q/k RMSNorm). Pre-norm blocks, GQA attention with RoPE, SwiGLU MLP.

use burn::tensor::{activation::silu, backend::Backend, DType, Int, Tensor, TensorData};

use super::config::Config;
use crate::error::Result;
use crate::loader::weights::Weights;
use crate::ops::attention::{AttentionMetadata, PagedAttention};
use crate::ops::kv_cache::KvCache;
use crate::ops::rms_norm::rms_norm;
use crate::ops::rope::{apply_rope, Rope};
use crate::runner::batch::Batch;

/// A linear layer stored `[in, out]` so that `x · w` needs no transpose.
struct Linear<B: Backend> {
    w: Tensor<B, 2>,
    b: Option<Tensor<B, 1>>,
}

impl<B: Backend> Linear<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let y = x.matmul(self.w.clone());
        match &self.b {
            Some(b) => y.add(b.clone().unsqueeze_dim(0)),
            None => y,
        }
    }
}

struct Layer<B: Backend> {
    input_norm: Tensor<B, 1>,
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    q_norm: Option<Tensor<B, 1>>,
    k_norm: Option<Tensor<B, 1>>,
    post_norm: Tensor<B, 1>,
    gate: Linear<B>,
    up: Linear<B>,
    down: Linear<B>,
}

/// The model's weights on the device.
pub struct Llama<B: Backend> {
    config: Config,
    embed: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    norm: Tensor<B, 1>,
    /// `[hidden, vocab]`.
    lm_head: Tensor<B, 2>,
    rope: Rope<B>,
    device: B::Device,
}

/// Loads weights onto the device in `dtype`, reading each tensor once.
struct Loader<'a, B: Backend> {
    weights: &'a Weights,
    config: &'a Config,
    device: &'a B::Device,
    dtype: DType,
}

impl<B: Backend> Loader<'_, B> {
    fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let t = self.weights.tensor(name, &shape, self.config)?;
        Ok(Tensor::from_data(
            TensorData::new(t.data, shape),
            (self.device, self.dtype),
        ))
    }

    /// A HF `[out, in]` weight, transposed to `[in, out]` on the host.
    fn linear(&self, prefix: &str, inp: usize, out: usize, bias: bool) -> Result<Linear<B>> {
        let t = self
            .weights
            .tensor(&format!("{prefix}.weight"), &[out, inp], self.config)?;
        let mut w = vec![0f32; t.data.len()];
        for (o, row) in t.data.chunks_exact(inp).enumerate() {
            for (i, &x) in row.iter().enumerate() {
                w[i * out + o] = x;
            }
        }
        let w = Tensor::from_data(TensorData::new(w, [inp, out]), (self.device, self.dtype));
        let b = if bias {
            Some(self.tensor(&format!("{prefix}.bias"), [out])?)
        } else {
            None
        };
        Ok(Linear { w, b })
    }
}

impl<B: Backend> Llama<B> {
    /// Loads the model; RoPE tables cover positions `0..max_positions`.
    pub fn load(
        weights: &Weights,
        config: &Config,
        max_positions: usize,
        dtype: DType,
        device: &B::Device,
    ) -> Result<Self> {
        let c = config;
        let ld = Loader::<B> {
            weights,
            config,
            device,
            dtype,
        };
        let (h, hd) = (c.hidden_size, c.head_dim);
        let layers = (0..c.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let norm = |n: &str, dim: usize| ld.tensor(&format!("{p}.{n}.weight"), [dim]);
                Ok(Layer {
                    input_norm: norm("input_layernorm", h)?,
                    q: ld.linear(
                        &format!("{p}.self_attn.q_proj"),
                        h,
                        c.num_heads * hd,
                        c.qkv_bias,
                    )?,
                    k: ld.linear(
                        &format!("{p}.self_attn.k_proj"),
                        h,
                        c.num_kv_heads * hd,
                        c.qkv_bias,
                    )?,
                    v: ld.linear(
                        &format!("{p}.self_attn.v_proj"),
                        h,
                        c.num_kv_heads * hd,
                        c.qkv_bias,
                    )?,
                    o: ld.linear(&format!("{p}.self_attn.o_proj"), c.num_heads * hd, h, false)?,
                    q_norm: c
                        .qk_norm
                        .then(|| norm("self_attn.q_norm", hd))
                        .transpose()?,
                    k_norm: c
                        .qk_norm
                        .then(|| norm("self_attn.k_norm", hd))
                        .transpose()?,
                    post_norm: norm("post_attention_layernorm", h)?,
                    gate: ld.linear(
                        &format!("{p}.mlp.gate_proj"),
                        h,
                        c.intermediate_size,
                        false,
                    )?,
                    up: ld.linear(&format!("{p}.mlp.up_proj"), h, c.intermediate_size, false)?,
                    down: ld.linear(
                        &format!("{p}.mlp.down_proj"),
                        c.intermediate_size,
                        h,
                        false,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = ld.tensor("model.embed_tokens.weight", [c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings || !weights.has("lm_head.weight") {
            embed.clone().transpose()
        } else {
            ld.linear("lm_head", h, c.vocab_size, false)?.w
        };
        Ok(Self {
            config: config.clone(),
            embed,
            layers,
            norm: ld.tensor("model.norm.weight", [h])?,
            lm_head,
            rope: Rope::new(config, max_positions, device),
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// One forward over the flat batch: writes every token's K/V into `cache` and returns
    /// f32 logits `[batch.logit_indices.len(), vocab]`.
    pub fn forward(
        &self,
        batch: &Batch,
        cache: &mut KvCache<B>,
        attention: &dyn PagedAttention<B>,
    ) -> Tensor<B, 2> {
        let c = &self.config;
        let n = batch.num_tokens();
        let dev = &self.device;
        let ints = |v: Vec<i32>| {
            Tensor::<B, 1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), dev)
        };
        let ids = ints(batch.token_ids.iter().map(|&t| t as i32).collect());
        let positions = ints(batch.positions.iter().map(|&p| p as i32).collect());
        let meta = AttentionMetadata::<B>::new(batch, cache.block_size, dev);
        let (cos, sin) = self.rope.at(&positions);
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let eps = c.rms_norm_eps;

        let mut x = self.embed.clone().select(0, ids);
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let h = rms_norm(x.clone(), &layer.input_norm, eps);
            let mut q = layer
                .q
                .forward(h.clone())
                .reshape([n, c.num_heads, c.head_dim]);
            let mut k = layer
                .k
                .forward(h.clone())
                .reshape([n, c.num_kv_heads, c.head_dim]);
            let v = layer.v.forward(h).reshape([n, c.num_kv_heads, c.head_dim]);
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(q, qn, eps);
                k = rms_norm(k, kn, eps);
            }
            let q = apply_rope(q, &cos, &sin);
            let k = apply_rope(k, &cos, &sin);
            attention.write_kv(kv, k, v, &meta);
            let a = attention
                .attend(q, kv, &meta, scale)
                .reshape([n, c.num_heads * c.head_dim]);
            x = x.add(layer.o.forward(a));
            let h = rms_norm(x.clone(), &layer.post_norm, eps);
            let mlp = silu(layer.gate.forward(h.clone())).mul(layer.up.forward(h));
            x = x.add(layer.down.forward(mlp));
        }
        let rows = ints(batch.logit_indices.iter().map(|&i| i as i32).collect());
        let x = rms_norm(x.select(0, rows), &self.norm, eps);
        x.matmul(self.lm_head.clone()).cast(DType::F32)
    }
}
