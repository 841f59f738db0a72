//! Configuring and starting an [`Engine`](super::Engine).

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use burn::tensor::backend::Backend;

use super::worker::{Command, Worker};
use super::{Engine, EngineInfo, Inner};
use crate::error::{Error, Result};
use crate::kv::block_pool::BlockPool;
use crate::loader::{open_model, ModelFiles};
use crate::models::llama::Llama;
use crate::runner::model_runner::ModelRunner;
use crate::scheduler::{Scheduler, SchedulerLimits};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// Burn's `flex` CPU backend.
    #[default]
    Cpu,
    /// CUDA GPU `n` (needs the `cuda` cargo feature).
    Cuda(usize),
}

/// Compute precision of weights, activations and the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    fn burn(self) -> burn::tensor::DType {
        match self {
            DType::F32 => burn::tensor::DType::F32,
            DType::F16 => burn::tensor::DType::F16,
            DType::BF16 => burn::tensor::DType::BF16,
        }
    }
}

/// Builder for [`Engine`]; start with [`Engine::builder`].
#[derive(Clone, Debug)]
pub struct EngineBuilder {
    model: Option<PathBuf>,
    device: Device,
    dtype: Option<DType>,
    max_num_seqs: usize,
    max_batched_tokens: usize,
    kv_cache_tokens: usize,
    max_model_len: Option<usize>,
    block_size: usize,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self {
            model: None,
            device: Device::Cpu,
            dtype: None,
            max_num_seqs: 16,
            max_batched_tokens: 2048,
            kv_cache_tokens: 8192,
            max_model_len: None,
            block_size: 16,
        }
    }
}

impl EngineBuilder {
    /// A `.gguf` file, or a Hugging Face folder (config.json, tokenizer.json, *.safetensors).
    pub fn model(mut self, path: impl Into<PathBuf>) -> Self {
        self.model = Some(path.into());
        self
    }

    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Default: F32 on the CPU, BF16 on CUDA.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = Some(dtype);
        self
    }

    /// Most sequences in one step (default 16).
    pub fn max_num_seqs(mut self, n: usize) -> Self {
        self.max_num_seqs = n;
        self
    }

    /// Most tokens in one step; longer prompts are prefilled in chunks (default 2048).
    pub fn max_batched_tokens(mut self, n: usize) -> Self {
        self.max_batched_tokens = n;
        self
    }

    /// Token slots in the KV cache, shared by all sequences (default 8192).
    pub fn kv_cache_tokens(mut self, n: usize) -> Self {
        self.kv_cache_tokens = n;
        self
    }

    /// Longest sequence, prompt plus output (default: the model's, capped by the KV cache).
    /// It may exceed the KV cache; a request that needs more than the whole cache then fails
    /// with [`Error::KvCacheExhausted`].
    pub fn max_model_len(mut self, n: usize) -> Self {
        self.max_model_len = Some(n);
        self
    }

    /// Tokens per KV block (default 16).
    pub fn block_size(mut self, n: usize) -> Self {
        self.block_size = n;
        self
    }

    /// Loads the model and starts the engine thread.
    pub fn build(self) -> Result<Engine> {
        let path = self
            .model
            .clone()
            .ok_or_else(|| Error::InvalidConfig("no model path given".into()))?;
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_batched_tokens", self.max_batched_tokens),
            ("kv_cache_tokens", self.kv_cache_tokens),
            ("block_size", self.block_size),
        ] {
            if v == 0 {
                return Err(Error::InvalidConfig(format!("{name} must be at least 1")));
            }
        }
        let files = open_model(&path)?;
        match self.device {
            Device::Cpu => {
                let device = burn::backend::flex::FlexDevice;
                self.start::<burn::backend::Flex>(files, device, DType::F32)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let device = burn::backend::cuda::CudaDevice::new(n);
                self.start::<burn::backend::Cuda>(files, device, DType::BF16)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::InvalidConfig(
                "Device::Cuda needs kiln built with the `cuda` feature".into(),
            )),
        }
    }

    fn start<B: Backend>(
        self,
        files: ModelFiles,
        device: B::Device,
        default_dtype: DType,
    ) -> Result<Engine> {
        let ModelFiles {
            config,
            weights,
            tokenizer,
        } = files;
        let tokenizer = Arc::new(tokenizer.ok_or_else(|| Error::Tokenizer {
            path: weights.path().to_path_buf(),
            reason: "the model has no tokenizer (tokenizer.json)".into(),
        })?);
        let dtype = self.dtype.unwrap_or(default_dtype).burn();
        // An explicit max_model_len beyond the KV cache is honoured: requests that would not
        // fit in the whole cache then fail with `KvCacheExhausted` instead of `PromptTooLong`.
        let max_model_len = self
            .max_model_len
            .unwrap_or_else(|| config.max_position_embeddings.min(self.kv_cache_tokens));
        let model = Llama::<B>::load(&weights, &config, max_model_len, dtype, &device)?;
        drop(weights);
        let num_blocks = self.kv_cache_tokens.div_ceil(self.block_size);
        let runner = ModelRunner::new(model, num_blocks, self.block_size, dtype, &device);
        let scheduler = Scheduler::new(
            BlockPool::new(num_blocks, self.block_size),
            SchedulerLimits {
                max_num_seqs: self.max_num_seqs,
                max_batched_tokens: self.max_batched_tokens,
            },
        );
        let info = EngineInfo {
            max_model_len,
            kv_cache_blocks: num_blocks,
            block_size: self.block_size,
            vocab_size: config.vocab_size,
        };
        let (tx, rx) = mpsc::channel::<Command>();
        let worker = Worker::new(runner, scheduler, tokenizer.clone());
        let thread = std::thread::Builder::new()
            .name("kiln-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::Device(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            inner: Arc::new(Inner::new(tx, tokenizer, info, thread)),
        })
    }
}
