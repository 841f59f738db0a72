//! The plain model configuration, read from a HF `config.json` or from GGUF metadata.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::loader::gguf::GgufFile;

/// Decoder families kiln runs. Mistral is the llama architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    fn parse(name: &str, path: &Path) -> Result<Self> {
        match name {
            "llama" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            other => Err(Error::UnsupportedArchitecture {
                path: path.to_path_buf(),
                arch: other.to_string(),
            }),
        }
    }
}

/// How RoPE frequencies are rescaled for long context.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x: low frequencies divided by `factor`, high kept, a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position: f64,
    },
    /// Per-frequency divisors, as GGUF stores them (`rope_freqs.weight`).
    FreqFactors(Vec<f32>),
}

/// Everything the forward pass needs to know about a model's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Q/K/V projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on Q and K before RoPE (Qwen3).
    pub qk_norm: bool,
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Deserialize)]
struct RawRope {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    rms_norm_eps: f64,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
}

impl Config {
    /// Reads a HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: RawConfig =
            serde_json::from_str(&text).map_err(|e| Error::invalid(path, e.to_string()))?;
        let arch = Architecture::parse(&raw.model_type, path)?;
        let rope = raw.rope_parameters.or(raw.rope_scaling);
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope.as_ref().and_then(|r| r.rope_theta))
            .unwrap_or(10_000.0);
        let rope_scaling = match rope {
            Some(r) if r.rope_type.as_deref() == Some("llama3") => {
                let need = |v: Option<f64>, key: &str| {
                    v.ok_or_else(|| Error::MissingKey {
                        path: path.to_path_buf(),
                        key: format!("rope_scaling.{key}"),
                    })
                };
                Some(RopeScaling::Llama3 {
                    factor: need(r.factor, "factor")?,
                    low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
                    original_max_position: need(
                        r.original_max_position_embeddings,
                        "original_max_position_embeddings",
                    )?,
                })
            }
            Some(r) if !matches!(r.rope_type.as_deref(), None | Some("default")) => {
                return Err(Error::invalid(
                    path,
                    format!(
                        "unsupported rope scaling `{}`",
                        r.rope_type.unwrap_or_default()
                    ),
                ))
            }
            _ => None,
        };
        let config = Self {
            arch,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1)),
            rope_theta,
            rope_scaling,
            rms_norm_eps: raw.rms_norm_eps,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            qkv_bias: raw.attention_bias.unwrap_or(arch == Architecture::Qwen2),
            qk_norm: arch == Architecture::Qwen3,
        };
        config.validate(path)
    }

    /// Reads the `{arch}.*` metadata of a GGUF file.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let path = gguf.path();
        let arch_name = gguf.str("general.architecture")?;
        let arch = Architecture::parse(arch_name, path)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_key = |k: &str| gguf.u64(&key(k)).map(|v| v as usize);
        let hidden_size = usize_key("embedding_length")?;
        let num_heads = usize_key("attention.head_count")?;
        let num_kv_heads = usize_key("attention.head_count_kv").unwrap_or(num_heads);
        let vocab_size = match usize_key("vocab_size") {
            Ok(v) => v,
            Err(_) => gguf.array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_scaling = if gguf.has_tensor("rope_freqs.weight") {
            Some(RopeScaling::FreqFactors(
                gguf.tensor("rope_freqs.weight")?.data,
            ))
        } else {
            None
        };
        let config = Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: usize_key("feed_forward_length")?,
            num_layers: usize_key("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim: usize_key("attention.key_length").unwrap_or(hidden_size / num_heads.max(1)),
            rope_theta: gguf.f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: gguf.f64(&key("attention.layer_norm_rms_epsilon"))?,
            max_position_embeddings: usize_key("context_length")?,
            tie_word_embeddings: !gguf.has_tensor("output.weight"),
            qkv_bias: gguf.has_tensor("blk.0.attn_q.bias"),
            qk_norm: arch == Architecture::Qwen3,
        };
        config.validate(path)
    }

    fn validate(self, path: &Path) -> Result<Self> {
        let ok = self.num_heads > 0
            && self.num_kv_heads > 0
            && self.num_heads.is_multiple_of(self.num_kv_heads)
            && self.head_dim > 0
            && self.head_dim.is_multiple_of(2)
            && self.num_layers > 0
            && self.vocab_size > 0;
        if ok {
            Ok(self)
        } else {
            Err(Error::invalid(
                path,
                format!("inconsistent model shape: {self:?}"),
            ))
        }
    }

    /// Query heads that share one K/V head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}
