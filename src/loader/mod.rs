//! Reading model files: GGUF, safetensors folders, tokenizers, and resolving a model path.

pub mod ggml_type;
pub mod gguf;
pub mod host_tensor;
pub mod safetensors;
mod source;
pub mod tokenizer;
pub mod weights;

pub use source::{open_model, ModelFiles};
