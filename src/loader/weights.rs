//! One view over a model's weights, whatever the file format: tensors are asked for by
//! their Hugging Face names and come back in HF layout as f32.

use std::path::{Path, PathBuf};

use super::gguf::GgufFile;
use super::host_tensor::HostTensor;
use super::safetensors::SafetensorsWeights;
use crate::error::{Error, Result};
use crate::models::config::{Architecture, Config};

/// The weights of a loaded model file or folder.
pub enum Weights {
    Gguf(GgufFile),
    Safetensors {
        dir: PathBuf,
        st: SafetensorsWeights,
    },
}

impl Weights {
    pub fn path(&self) -> &Path {
        match self {
            Weights::Gguf(g) => g.path(),
            Weights::Safetensors { dir, .. } => dir,
        }
    }

    pub fn has(&self, hf_name: &str) -> bool {
        match self {
            Weights::Gguf(g) => gguf_name(hf_name).is_some_and(|n| g.has_tensor(&n)),
            Weights::Safetensors { st, .. } => st.has(hf_name),
        }
    }

    /// Reads tensor `hf_name`, checking it has `shape`.
    pub fn tensor(&self, hf_name: &str, shape: &[usize], config: &Config) -> Result<HostTensor> {
        let t = match self {
            Weights::Gguf(g) => {
                let name = gguf_name(hf_name).ok_or_else(|| Error::MissingTensor {
                    path: g.path().to_path_buf(),
                    tensor: hf_name.to_string(),
                })?;
                let t = g.tensor(&name)?;
                check_shape(g.path(), &name, shape, &t)?;
                unpermute_llama_qk(hf_name, t, config)
            }
            Weights::Safetensors { st, dir } => {
                let t = st.tensor(hf_name)?;
                check_shape(dir, hf_name, shape, &t)?;
                t
            }
        };
        Ok(t)
    }
}

fn check_shape(path: &Path, name: &str, expected: &[usize], t: &HostTensor) -> Result<()> {
    if t.shape == expected {
        Ok(())
    } else {
        Err(Error::TensorShape {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
            actual: t.shape.clone(),
        })
    }
}

/// Maps a HF tensor name to its GGUF name (llama.cpp's naming).
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gg = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gg}.{kind}"))
}

/// llama.cpp's converter permutes the rows of llama Q/K weights so that RoPE rotates adjacent
/// pairs; kiln rotates halves (as HF does), so the rows go back to HF order here.
fn unpermute_llama_qk(hf_name: &str, t: HostTensor, config: &Config) -> HostTensor {
    if config.arch != Architecture::Llama {
        return t;
    }
    let heads = if hf_name.ends_with("self_attn.q_proj.weight") {
        config.num_heads
    } else if hf_name.ends_with("self_attn.k_proj.weight") {
        config.num_kv_heads
    } else {
        return t;
    };
    let hd = config.head_dim;
    let cols = t.shape[1];
    let mut out = vec![0f32; t.data.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * hd / 2 + i) * cols;
                out[dst..dst + cols].copy_from_slice(&t.data[src..src + cols]);
            }
        }
    }
    HostTensor::new(t.shape, out)
}
