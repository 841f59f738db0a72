//! First-come-first-served continuous batching: every step, running sequences decode, waiting
//! ones are admitted (prompts chunked to the token budget), and when the KV pool runs short the
//! newest sequence is preempted and later recomputed, so no accepted request is lost.
//!
//! A running sequence whose last token is still being chosen on the device (`awaiting`) is
//! scheduled all the same: its input is a deferred token, filled in on the device from the
//! step in flight. Such a sequence, if preempted, waits to be readmitted until its token is in.

pub mod sequence;

use std::collections::VecDeque;

use crate::kv::block_pool::BlockPool;
use crate::runner::batch::Batch;
use sequence::Sequence;

/// Limits of one step.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerLimits {
    pub max_num_seqs: usize,
    pub max_batched_tokens: usize,
}

/// A step's work: the flat batch, and which sequence each logits row belongs to.
pub struct Step {
    pub batch: Batch,
    /// (sequence id, tokens it runs this step), in batch order.
    pub scheduled: Vec<(u64, usize)>,
    /// Sequence id of each logits row.
    pub sampled: Vec<u64>,
}

pub struct Scheduler {
    pool: BlockPool,
    limits: SchedulerLimits,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
}

impl Scheduler {
    pub fn new(pool: BlockPool, limits: SchedulerLimits) -> Self {
        Self {
            pool,
            limits,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Removes a sequence wherever it is, freeing its blocks.
    pub fn remove(&mut self, id: u64) -> Option<Sequence> {
        let mut seq = if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i)
        } else {
            let i = self.waiting.iter().position(|s| s.id == id)?;
            self.waiting.remove(i)?
        };
        self.pool.release(&mut seq.block_table);
        Some(seq)
    }

    pub fn get(&self, id: u64) -> Option<&Sequence> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .find(|s| s.id == id)
    }

    /// Chooses the next step's work, or `None` when there is nothing to run.
    pub fn schedule(&mut self) -> Option<Step> {
        let mut budget = self.limits.max_batched_tokens;
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (index in running, tokens)
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let n = self.running[i].num_pending().min(budget);
            let target = self.running[i].num_computed + n;
            if self.pool.grow(&mut self.running[i].block_table, target) {
                plan.push((i, n));
                budget -= n;
                i += 1;
            } else {
                // Preempt the newest sequence (possibly this one) and retry.
                let Some(mut victim) = self.running.pop() else {
                    break;
                };
                self.pool.release(&mut victim.block_table);
                victim.num_computed = 0;
                self.waiting.push_front(victim);
            }
        }
        while budget > 0 && self.running.len() < self.limits.max_num_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            if seq.awaiting.is_some() {
                break; // recomputing it needs every token on the host
            }
            let n = seq.num_pending().min(budget);
            let target = seq.num_computed + n;
            if !self.pool.grow(&mut seq.block_table, target) {
                break;
            }
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            self.running.push(seq);
            plan.push((self.running.len() - 1, n));
            budget -= n;
        }
        if plan.is_empty() {
            return None;
        }
        let block_size = self.pool.block_size();
        let mut batch = Batch::default();
        let mut scheduled = Vec::with_capacity(plan.len());
        let mut sampled = Vec::new();
        for (i, n) in plan {
            let s = &self.running[i];
            let end = s.num_computed + n;
            let known = end.min(s.tokens.len());
            let sample = end == s.num_computed + s.num_pending(); // reaches its last token
            let mut tokens = s.tokens[s.num_computed..known].to_vec();
            let deferred = s.awaiting.filter(|_| end > known);
            if deferred.is_some() {
                tokens.push(0); // placeholder, filled in on the device
            }
            batch.push_seq(&tokens, end, &s.block_table, block_size, sample);
            if let Some(row) = deferred {
                batch.defer_last(row);
            }
            scheduled.push((s.id, n));
            if sample {
                sampled.push(s.id);
            }
        }
        Some(Step {
            batch,
            scheduled,
            sampled,
        })
    }

    /// Records that a step was queued: its tokens are cached once it runs, which every later
    /// step's work is ordered after.
    pub fn complete(&mut self, scheduled: &[(u64, usize)]) {
        for &(id, n) in scheduled {
            if let Some(s) = self.running.iter_mut().find(|s| s.id == id) {
                s.num_computed += n;
            }
        }
    }

    /// Appends a sampled token to a sequence (running, or preempted while it was awaited).
    pub fn append(&mut self, id: u64, token: u32) {
        if let Some(s) = self.find_mut(id) {
            s.tokens.push(token);
            s.awaiting = None;
        }
    }

    /// Marks the sequences of a queued step's logits rows as awaiting their device-chosen
    /// tokens: `sampled[r]` awaits row `r`.
    pub fn await_tokens(&mut self, sampled: &[u64]) {
        for (row, &id) in sampled.iter().enumerate() {
            if let Some(s) = self.find_mut(id) {
                s.awaiting = Some(row);
            }
        }
    }

    fn find_mut(&mut self, id: u64) -> Option<&mut Sequence> {
        self.running
            .iter_mut()
            .chain(self.waiting.iter_mut())
            .find(|s| s.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::batch::DeferredToken;

    fn sched(blocks: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            BlockPool::new(blocks, 4),
            SchedulerLimits {
                max_num_seqs: 8,
                max_batched_tokens: budget,
            },
        )
    }

    #[test]
    fn long_prompt_is_chunked_and_decode_follows() {
        let mut s = sched(8, 4);
        s.add(Sequence::new(1, (0..10).collect()));
        let step = s.schedule().unwrap();
        assert_eq!(step.scheduled, vec![(1, 4)]);
        assert!(
            step.sampled.is_empty(),
            "no logits before the prompt is done"
        );
        s.complete(&step.scheduled);
        let step = s.schedule().unwrap();
        s.complete(&step.scheduled);
        let step = s.schedule().unwrap();
        assert_eq!(step.scheduled, vec![(1, 2)]);
        assert_eq!(step.sampled, vec![1]);
        assert_eq!(step.batch.positions, vec![8, 9]);
        s.complete(&step.scheduled);
        s.append(1, 42);
        let step = s.schedule().unwrap();
        assert_eq!(step.batch.token_ids, vec![42]);
        assert_eq!(step.batch.positions, vec![10]);
    }

    #[test]
    fn pool_shortage_preempts_newest_and_recomputes_it() {
        // 3 blocks of 4 slots; two sequences of 4 prompt tokens each take a block each.
        let mut s = sched(3, 64);
        s.add(Sequence::new(1, vec![1; 4]));
        s.add(Sequence::new(2, vec![2; 4]));
        let step = s.schedule().unwrap();
        assert_eq!(step.scheduled, vec![(1, 4), (2, 4)]);
        s.complete(&step.scheduled);
        s.append(1, 7);
        s.append(2, 8);
        // Both now need a second block; only one is free: sequence 2 is preempted.
        let step = s.schedule().unwrap();
        assert_eq!(step.scheduled, vec![(1, 1)]);
        s.complete(&step.scheduled);
        assert_eq!(s.get(2).unwrap().num_computed, 0);
        assert_eq!(
            s.get(2).unwrap().tokens,
            vec![2, 2, 2, 2, 8],
            "its token is kept"
        );
        s.remove(1);
        let step = s.schedule().unwrap();
        assert_eq!(
            step.scheduled,
            vec![(2, 5)],
            "recomputed with its generated token"
        );
        assert_eq!(step.sampled, vec![2]);
    }

    #[test]
    fn awaited_tokens_run_as_deferred_inputs() {
        let mut s = sched(8, 64);
        s.add(Sequence::new(1, vec![1; 4]));
        let step = s.schedule().unwrap();
        s.complete(&step.scheduled);
        s.await_tokens(&step.sampled);
        // The prompt's token is being chosen on the device: the next step runs it as row 0 of
        // the step in flight, at position 4.
        let step = s.schedule().unwrap();
        assert_eq!(step.batch.positions, vec![4]);
        assert_eq!(step.sampled, vec![1]);
        assert_eq!(
            step.batch.deferred,
            vec![DeferredToken {
                index: 0,
                prev_row: 0
            }]
        );
        s.complete(&step.scheduled);
        s.append(1, 42); // the first step's token arrives while the second runs
        s.await_tokens(&step.sampled);
        let seq = s.get(1).unwrap();
        assert_eq!((seq.tokens.len(), seq.num_computed), (5, 5));
        let step = s.schedule().unwrap();
        assert_eq!(step.batch.positions, vec![5]);
        assert_eq!(step.batch.deferred.len(), 1);
    }

    #[test]
    fn preempted_while_awaited_waits_for_its_token() {
        let mut s = sched(3, 64);
        s.add(Sequence::new(1, vec![1; 4]));
        s.add(Sequence::new(2, vec![2; 4]));
        let step = s.schedule().unwrap();
        s.complete(&step.scheduled);
        s.await_tokens(&step.sampled);
        // Both need a second block for their deferred token; sequence 2 is preempted.
        let step = s.schedule().unwrap();
        assert_eq!(step.scheduled, vec![(1, 1)]);
        s.complete(&step.scheduled);
        s.remove(1);
        assert!(
            s.schedule().is_none(),
            "not readmitted before its token is in"
        );
        s.append(2, 8);
        let step = s.schedule().unwrap();
        assert_eq!(step.scheduled, vec![(2, 5)]);
        assert_eq!(step.batch.token_ids, vec![2, 2, 2, 2, 8]);
        assert!(step.batch.deferred.is_empty());
    }
}
