//! kiln's one error type: every failure a caller can cause or meet, named precisely.

use std::path::PathBuf;

/// Everything that can go wrong in kiln, as a value the caller can match on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model file not found: {0}")]
    ModelNotFound(PathBuf),
    #[error("{path}: not a valid model file: {reason}")]
    InvalidModelFile { path: PathBuf, reason: String },
    #[error("{path}: truncated: {what} needs bytes up to {needed}, file has {len}")]
    Truncated {
        path: PathBuf,
        what: String,
        needed: u64,
        len: u64,
    },
    #[error("{path}: missing metadata key `{key}`")]
    MissingKey { path: PathBuf, key: String },
    #[error("{path}: unsupported architecture `{arch}` (supported: llama, mistral, qwen2, qwen3)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: missing tensor `{tensor}`")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("prompt has {prompt_tokens} tokens; with max_tokens {max_tokens} it exceeds the context window of {context} tokens")]
    PromptTooLong {
        prompt_tokens: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("invalid sampling parameter `{name}`: {reason}")]
    InvalidSampling { name: &'static str, reason: String },
    #[error("request needs {needed} KV-cache blocks but the cache holds only {capacity}")]
    KvCacheExhausted { needed: usize, capacity: usize },
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    #[error("device error: {0}")]
    Device(String),
    #[error("the engine has shut down")]
    EngineStopped,
}

/// `Result` with kiln's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::ModelNotFound(path)
        } else {
            Error::Io { path, source }
        }
    }

    pub(crate) fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::InvalidModelFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
