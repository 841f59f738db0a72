//! kiln: LLM inference linked into your process.
//!
//! Build an [`Engine`] over a GGUF file or a Hugging Face folder, then call
//! [`Engine::generate`] or [`Engine::stream`]. Requests from any number of threads are batched
//! together by the engine's continuous-batching scheduler over a paged KV cache.
//! Code that only needs generation can program against [`LlmBackend`] and mock it in tests.

pub mod engine;
pub mod error;
pub mod kv;
pub mod loader;
pub mod models;
pub mod ops;
pub mod runner;
pub mod scheduler;
pub mod text;

pub use engine::backend::LlmBackend;
pub use engine::builder::{DType, Device, EngineBuilder};
pub use engine::request::{
    Chunk, Completion, FinishReason, Logprobs, Prompt, Request, SamplingParams, TokenLogprob,
};
pub use engine::stream::TokenStream;
pub use engine::{Engine, EngineInfo};
pub use error::{Error, Result};
