//! Configuring and starting an [`Engine`](super::Engine).

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use burn::backend::Flex;

use super::worker::{Command, Worker};
use super::{Engine, EngineInfo, Inner};
use crate::error::{Error, Result};
use crate::kv::block_pool::BlockPool;
use crate::loader::tokenizer::Tokenizer;
use crate::loader::{open_model, ModelFiles};
use crate::models::config::Config;
use crate::models::llama::Llama;
#[cfg(feature = "cuda")]
use crate::models::llama_kernels::KernelLlama;
use crate::runner::model_runner::ModelRunner;
use crate::runner::Forward;
use crate::scheduler::{Scheduler, SchedulerLimits};

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    /// Burn's `flex` CPU backend.
    #[default]
    Cpu,
    /// CUDA GPU `n` (needs the `cuda` cargo feature): the forward runs on kiln's CubeCL kernels.
    Cuda(usize),
}

/// Compute precision of weights, activations and the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// Every product in f32, on CUDA too (no TF32, as torch's default for matmuls): slower than
    /// BF16 — the prompt's products leave the tensor cores — and meant for checking results.
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
        let ModelFiles {
            config,
            weights,
            tokenizer,
        } = files;
        let tokenizer = Arc::new(tokenizer.ok_or_else(|| Error::Tokenizer {
            path: weights.path().to_path_buf(),
            reason: "the model has no tokenizer (tokenizer.json)".into(),
        })?);
        // An explicit max_model_len beyond the KV cache is honoured: requests that would not
        // fit in the whole cache then fail with `KvCacheExhausted` instead of `PromptTooLong`.
        let max_model_len = self
            .max_model_len
            .unwrap_or_else(|| config.max_position_embeddings.min(self.kv_cache_tokens));
        let num_blocks = self.kv_cache_tokens.div_ceil(self.block_size);
        let runner: Box<dyn Forward> = match self.device {
            Device::Cpu => {
                let device = burn::backend::flex::FlexDevice;
                let dtype = self.dtype.unwrap_or(DType::F32).burn();
                let model = Llama::<Flex>::load(&weights, &config, max_model_len, dtype, &device)?;
                Box::new(ModelRunner::new(
                    model,
                    num_blocks,
                    self.block_size,
                    dtype,
                    &device,
                ))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                use kiln_kernels::cubecl::cuda::{CudaDevice, CudaRuntime};
                use kiln_kernels::cubecl::Runtime;
                let client = CudaRuntime::client(&CudaDevice::new(n));
                let (ml, bs) = (max_model_len, self.block_size);
                match self.dtype.unwrap_or(DType::BF16) {
                    DType::BF16 => Box::new(KernelLlama::<CudaRuntime, half::bf16>::load(
                        client, &weights, &config, ml, num_blocks, bs,
                    )?),
                    DType::F16 => Box::new(KernelLlama::<CudaRuntime, half::f16>::load(
                        client, &weights, &config, ml, num_blocks, bs,
                    )?),
                    DType::F32 => Box::new(KernelLlama::<CudaRuntime, f32>::load(
                        client, &weights, &config, ml, num_blocks, bs,
                    )?),
                }
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                return Err(Error::InvalidConfig(
                    "Device::Cuda needs kiln built with the `cuda` feature".into(),
                ))
            }
        };
        drop(weights);
        self.start(runner, tokenizer, &config, max_model_len, num_blocks)
    }

    fn start(
        self,
        runner: Box<dyn Forward>,
        tokenizer: Arc<Tokenizer>,
        config: &Config,
        max_model_len: usize,
        num_blocks: usize,
    ) -> Result<Engine> {
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
