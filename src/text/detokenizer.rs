//! Incremental detokenization: text deltas that never split a UTF-8 character and that join
//! up to exactly the full decode of the tokens.

use crate::error::Result;
use crate::loader::tokenizer::Tokenizer;

/// Turns a growing token sequence into text deltas.
///
/// Each step decodes a short window (`prefix..`) and emits what it adds over the already emitted
/// part of that window (`prefix..read`), so byte-level merges across token boundaries come out
/// right; a window ending in U+FFFD is an incomplete character and waits for the next token.
#[derive(Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let done = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let all = tok.decode(&self.ids[self.prefix..], true)?;
        if all.len() > done.len() && !all.ends_with('\u{FFFD}') {
            if let Some(delta) = all.get(done.len()..) {
                let delta = delta.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                return Ok(delta);
            }
        }
        Ok(String::new())
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let done = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let all = tok.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(all.get(done.len()..).unwrap_or_default().to_string())
    }
}
