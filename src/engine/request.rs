//! What callers send and receive: requests, sampling parameters, chunks and completions.

use crate::error::{Error, Result};

/// How the next token is chosen. `Default` is plain sampling at temperature 1;
/// `SamplingParams::greedy()` always takes the most likely token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 disables.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already in prompt or output; 1 disables.
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token already generated; 0 disables.
    pub presence_penalty: f32,
    /// Subtracted once per earlier occurrence in the output; 0 disables.
    pub frequency_penalty: f32,
    /// Same seed, same prompt, same parameters ⇒ same output. `None` draws from entropy.
    pub seed: Option<u64>,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Generation ends before any of these strings; they are not emitted.
    pub stop: Vec<String>,
    /// Generation ends on these tokens (they are not emitted as text).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Return the chosen token's log-probability and the `n` most likely alternatives.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// The most top-n logprobs a request may ask for.
pub const MAX_LOGPROBS: usize = 20;

impl SamplingParams {
    /// Greedy decoding (temperature 0).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every value; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, reason: String| Err(Error::InvalidSampling { name, reason });
        let finite_nonneg = |v: f32| v.is_finite() && v >= 0.0;
        if !finite_nonneg(self.temperature) {
            return bad(
                "temperature",
                format!("{} (must be finite and >= 0)", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} (must be in (0, 1])", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("{} (must be in [0, 1])", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("{} (must be finite and > 0)", self.repetition_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                format!("{} (must be in [-2, 2])", self.presence_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                format!("{} (must be in [-2, 2])", self.frequency_penalty),
            );
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "0 (must be at least 1)".into());
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "empty stop string".into());
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_LOGPROBS) {
            return bad("logprobs", format!("{n} (at most {MAX_LOGPROBS})"));
        }
        Ok(())
    }
}

/// The prompt: text to tokenize, or token ids as they are.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// One generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub prompt: Prompt,
    pub sampling: SamplingParams,
}

impl Request {
    /// A request to continue `text` (raw completion, no chat template) with default sampling.
    pub fn new(text: impl Into<String>) -> Self {
        Self {
            prompt: Prompt::Text(text.into()),
            sampling: SamplingParams::default(),
        }
    }

    /// A request over already-tokenized input.
    pub fn from_tokens(ids: Vec<u32>) -> Self {
        Self {
            prompt: Prompt::Tokens(ids),
            sampling: SamplingParams::default(),
        }
    }

    pub fn sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    pub fn max_tokens(mut self, n: usize) -> Self {
        self.sampling.max_tokens = n;
        self
    }

    pub fn temperature(mut self, t: f32) -> Self {
        self.sampling.temperature = t;
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.sampling.seed = Some(seed);
        self
    }

    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.sampling.stop.push(s.into());
        self
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context window is full.
    Length,
}

/// Log-probability of one token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// The chosen token's log-probability and the most likely alternatives, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct Logprobs {
    pub chosen: TokenLogprob,
    pub top: Vec<TokenLogprob>,
}

/// One step of a stream: the token generated and the text it completes.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    /// New text; may be empty while a multi-byte character or a possible stop string is pending.
    pub text: String,
    pub token_id: u32,
    pub logprobs: Option<Logprobs>,
    /// Set on the last chunk.
    pub finish_reason: Option<FinishReason>,
}

/// A finished generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish_reason: FinishReason,
    /// One entry per generated token, when logprobs were asked for.
    pub logprobs: Option<Vec<Logprobs>>,
}
