//! The public handle: build an [`Engine`], then `generate` or `stream`. The engine thread owns
//! all model state; handles are cheap to clone and safe to share across threads.

pub mod backend;
pub mod builder;
pub mod request;
pub mod stream;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::loader::tokenizer::Tokenizer;
use backend::LlmBackend;
use builder::EngineBuilder;
use request::{Completion, Prompt, Request};
use stream::TokenStream;
use worker::Command;

/// Sizes fixed when the engine was built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineInfo {
    /// Longest sequence (prompt + output) a request may reach.
    pub max_model_len: usize,
    pub kv_cache_blocks: usize,
    pub block_size: usize,
    pub vocab_size: usize,
}

/// An LLM loaded in this process, serving concurrent requests from its own thread.
///
/// ```no_run
/// use kiln::{Engine, Request, SamplingParams};
///
/// let engine = Engine::builder().model("SmolLM2-135M-Instruct.Q4_1.gguf").build()?;
/// let done = engine.generate(Request::new("The capital of France is").sampling(SamplingParams::greedy()).max_tokens(8))?;
/// println!("{}", done.text);
///
/// // Streaming, as a blocking iterator (it is also a `futures::Stream`):
/// for chunk in engine.stream(Request::new("Once upon a time").max_tokens(32).seed(7))? {
///     print!("{}", chunk?.text);
/// }
/// # Ok::<(), kiln::Error>(())
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    commands: Sender<Command>,
    tokenizer: Arc<Tokenizer>,
    info: EngineInfo,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    fn new(
        commands: Sender<Command>,
        tokenizer: Arc<Tokenizer>,
        info: EngineInfo,
        thread: JoinHandle<()>,
    ) -> Self {
        Self {
            commands,
            tokenizer,
            info,
            next_id: AtomicU64::new(0),
            thread: Mutex::new(Some(thread)),
        }
    }
}

impl Drop for Inner {
    /// Stops the engine thread; streams still open end with `Error::EngineStopped`.
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Engine {
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    pub fn info(&self) -> EngineInfo {
        self.inner.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// Runs `request` to the end.
    pub fn generate(&self, request: Request) -> Result<Completion> {
        self.stream(request)?.into_completion()
    }

    /// Starts `request`; its chunks arrive on the returned stream. Invalid requests fail here,
    /// before anything is queued.
    pub fn stream(&self, request: Request) -> Result<TokenStream> {
        let params = request.sampling;
        params.validate()?;
        let info = self.inner.info;
        let prompt = match request.prompt {
            Prompt::Text(t) => self.inner.tokenizer.encode(&t)?,
            Prompt::Tokens(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= info.vocab_size) {
                    return Err(Error::Tokenize(format!(
                        "token id {bad} is outside the vocabulary of {} tokens",
                        info.vocab_size
                    )));
                }
                ids
            }
        };
        if prompt.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let total = prompt.len() + params.max_tokens;
        if total > info.max_model_len {
            return Err(Error::PromptTooLong {
                prompt_tokens: prompt.len(),
                max_tokens: params.max_tokens,
                context: info.max_model_len,
            });
        }
        let needed = total.div_ceil(info.block_size);
        if needed > info.kv_cache_blocks {
            return Err(Error::KvCacheExhausted {
                needed,
                capacity: info.kv_cache_blocks,
            });
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let commands = self.inner.commands.clone();
        let (sender, stream) = TokenStream::channel(
            prompt.len(),
            Box::new(move || {
                let _ = commands.send(Command::Abort(id));
            }),
        );
        self.inner
            .commands
            .send(Command::Add {
                id,
                prompt,
                params,
                sender,
            })
            .map_err(|_| Error::EngineStopped)?;
        Ok(stream)
    }
}

impl LlmBackend for Engine {
    fn generate(&self, request: Request) -> Result<Completion> {
        Engine::generate(self, request)
    }

    fn stream(&self, request: Request) -> Result<TokenStream> {
        Engine::stream(self, request)
    }
}
