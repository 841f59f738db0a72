//! One request as the scheduler sees it: tokens, how many are in the KV cache, its blocks.

/// A sequence's tokens and cache state.
#[derive(Debug)]
pub struct Sequence {
    pub id: u64,
    /// Prompt followed by every generated token.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub block_table: Vec<u32>,
    /// Its next token is being chosen on the device: row `r` of the step in flight. That token
    /// is already an input the next step can run (a deferred token) but not yet in `tokens`.
    pub awaiting: Option<usize>,
}

impl Sequence {
    pub fn new(id: u64, prompt: Vec<u32>) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            block_table: Vec::new(),
            awaiting: None,
        }
    }

    /// Tokens still to run through the model (the prompt, or the last sampled token, known or
    /// awaited).
    pub fn num_pending(&self) -> usize {
        self.tokens.len() + usize::from(self.awaiting.is_some()) - self.num_computed
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}
