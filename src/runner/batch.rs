//! The flat batch: the only thing the scheduler hands the model runner each step.

use kiln_kernels::sample::Settings;

/// One sequence's share of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqChunk {
    /// Index of its first token in the flat batch; its tokens are contiguous.
    pub start: usize,
    /// Tokens it contributes this step (the prompt chunk, or 1 when decoding).
    pub len: usize,
    /// Tokens in its KV cache once this step has run (context + `len`).
    pub context_len: usize,
    /// Its KV blocks, in position order.
    pub block_table: Vec<u32>,
}

/// An input token not known on the host yet: the previous step's greedy pick for its logits
/// row `prev_row`, filled in on the device into flat position `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeferredToken {
    pub index: usize,
    pub prev_row: usize,
}

/// Tokens of several sequences, prefill and decode mixed, run in one forward.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub token_ids: Vec<u32>,
    pub positions: Vec<usize>,
    /// KV-cache slot (block · block_size + offset) each token's K/V is written to.
    pub slot_mapping: Vec<usize>,
    pub seqs: Vec<SeqChunk>,
    /// Flat indices of the tokens whose logits are wanted, one row of logits each.
    pub logit_indices: Vec<usize>,
    /// Tokens of `token_ids` (placeholders there) that the previous step chose on the device.
    pub deferred: Vec<DeferredToken>,
    /// Per logits row, how the device draws its token (`Readback::Sampled` steps only).
    pub sampling: Vec<Settings>,
}

impl Batch {
    /// Appends `tokens` of one sequence at positions `context_len - tokens.len() ..`.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        context_len: usize,
        block_table: &[u32],
        block_size: usize,
        want_logits: bool,
    ) {
        let start = self.token_ids.len();
        let first_pos = context_len - tokens.len();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = first_pos + i;
            self.token_ids.push(t);
            self.positions.push(pos);
            let block = block_table[pos / block_size] as usize;
            self.slot_mapping
                .push(block * block_size + pos % block_size);
        }
        if want_logits {
            self.logit_indices.push(start + tokens.len() - 1);
        }
        self.seqs.push(SeqChunk {
            start,
            len: tokens.len(),
            context_len,
            block_table: block_table.to_vec(),
        });
    }

    /// Marks the batch's last token as the previous step's greedy pick for row `prev_row`.
    pub fn defer_last(&mut self, prev_row: usize) {
        if let Some(index) = self.token_ids.len().checked_sub(1) {
            self.deferred.push(DeferredToken { index, prev_row });
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}
