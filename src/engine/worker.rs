//! The engine thread: owns the scheduler, the model runner and every request's decoding state,
//! and runs one loop — take commands, schedule, queue the forward, collect the previous one,
//! sample, stream out.
//!
//! When every row of the step in flight is greedy, its tokens are chosen on the device and the
//! next step is queued before they are collected (taking them as deferred inputs), so the host's
//! work — reading the tokens, detokenizing, streaming, scheduling — overlaps the device's.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use kiln_kernels::sample::Settings;

use super::request::{Chunk, FinishReason, Logprobs, SamplingParams};
use super::stream::StreamSender;
use crate::error::{Error, Result};
use crate::loader::tokenizer::Tokenizer;
use crate::runner::sampler::Sampler;
use crate::runner::{Forward, Readback, StepOutput};
use crate::scheduler::sequence::Sequence;
use crate::scheduler::{Scheduler, Step};
use crate::text::detokenizer::Detokenizer;
use crate::text::stop::StopMatcher;

/// Messages from engine handles and streams to the engine thread.
pub(crate) enum Command {
    Add {
        id: u64,
        prompt: Vec<u32>,
        params: SamplingParams,
        sender: StreamSender,
    },
    Abort(u64),
    Shutdown,
}

/// A request's decoding state outside the scheduler.
struct Active {
    sender: StreamSender,
    sampler: Sampler,
    detok: Detokenizer,
    stop: StopMatcher,
    max_tokens: usize,
    /// Tokens that end generation: EOS (unless ignored) and the request's stop ids.
    stop_ids: Vec<u32>,
}

/// A step queued on the device and not yet collected.
struct InFlight {
    step: Step,
    readback: Readback,
}

pub(crate) struct Worker {
    pub runner: Box<dyn Forward>,
    pub scheduler: Scheduler,
    pub tokenizer: Arc<Tokenizer>,
    active: HashMap<u64, Active>,
    in_flight: Option<InFlight>,
}

impl Worker {
    pub fn new(runner: Box<dyn Forward>, scheduler: Scheduler, tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            runner,
            scheduler,
            tokenizer,
            active: HashMap::new(),
            in_flight: None,
        }
    }

    pub fn run(mut self, commands: Receiver<Command>) {
        loop {
            if !self.scheduler.has_work() && self.in_flight.is_none() {
                match commands.recv() {
                    Ok(c) => {
                        if !self.handle(c) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            while let Ok(c) = commands.try_recv() {
                if !self.handle(c) {
                    return;
                }
            }
            self.drop_abandoned();
            self.step();
        }
    }

    /// Applies one command; false on shutdown.
    fn handle(&mut self, c: Command) -> bool {
        match c {
            Command::Add {
                id,
                prompt,
                params,
                sender,
            } => {
                let mut stop_ids = params.stop_token_ids.clone();
                if !params.ignore_eos {
                    stop_ids.extend_from_slice(self.tokenizer.eos_ids());
                }
                self.active.insert(
                    id,
                    Active {
                        sender,
                        sampler: Sampler::new(params.clone(), &prompt),
                        detok: Detokenizer::new(),
                        stop: StopMatcher::new(params.stop),
                        max_tokens: params.max_tokens,
                        stop_ids,
                    },
                );
                self.scheduler.add(Sequence::new(id, prompt));
                true
            }
            Command::Abort(id) => {
                self.finish(id);
                true
            }
            Command::Shutdown => false,
        }
    }

    fn finish(&mut self, id: u64) {
        self.scheduler.remove(id);
        self.active.remove(&id);
    }

    /// Cancels requests whose caller dropped the stream.
    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, a)| a.sender.is_dropped())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.finish(id);
        }
    }

    fn step(&mut self) {
        // The host samples a `Logits` step's tokens: they must be in before the next is built.
        if self
            .in_flight
            .as_ref()
            .is_some_and(|f| !f.readback.picks_tokens())
        {
            self.collect();
        }
        let queued = self.scheduler.schedule().and_then(|step| self.submit(step));
        if self.in_flight.is_some() {
            self.collect();
        }
        if let Some(f) = queued {
            self.scheduler.await_tokens(&f.step.sampled);
            self.in_flight = Some(f);
        }
    }

    /// Queues a step on the device: the device picks the tokens (argmax when every row is
    /// greedy, else a draw with each row's settings) unless a row needs its logits on the host.
    fn submit(&mut self, mut step: Step) -> Option<InFlight> {
        let all = |test: fn(&Sampler) -> bool| {
            step.sampled
                .iter()
                .all(|id| self.active.get(id).is_some_and(|a| test(&a.sampler)))
        };
        let readback = if all(Sampler::is_greedy) {
            Readback::Greedy
        } else if all(Sampler::samples_on_device) {
            Readback::Sampled
        } else {
            Readback::Logits
        };
        if readback == Readback::Sampled {
            step.batch.sampling = step
                .sampled
                .iter()
                .map(|id| match self.active.get_mut(id) {
                    Some(a) => a.sampler.device_settings(),
                    None => Settings::GREEDY,
                })
                .collect();
        }
        let runner = &mut self.runner;
        let outcome = catch_unwind(AssertUnwindSafe(|| runner.submit(&step.batch, readback)))
            .unwrap_or_else(|panic| Err(Error::Device(panic_message(panic))));
        match outcome {
            Ok(()) => {
                self.scheduler.complete(&step.scheduled);
                Some(InFlight { step, readback })
            }
            Err(e) => {
                self.fail(&step, &e);
                None
            }
        }
    }

    /// Collects the step in flight: samples (or takes the device's tokens) and streams them.
    fn collect(&mut self) {
        let Some(InFlight { step, .. }) = self.in_flight.take() else {
            return;
        };
        let runner = &mut self.runner;
        let outcome = catch_unwind(AssertUnwindSafe(|| runner.collect()))
            .unwrap_or_else(|panic| Err(Error::Device(panic_message(panic))));
        let vocab = self.runner.vocab_size();
        let mut output = match outcome {
            Ok(out) => out,
            Err(e) => return self.fail(&step, &e),
        };
        for (row, &id) in step.sampled.iter().enumerate() {
            let Some(a) = self.active.get_mut(&id) else {
                continue; // finished or aborted while the step ran
            };
            let picked = match &mut output {
                StepOutput::Tokens(tokens) => tokens.get(row).map(|&t| {
                    a.sampler.record(t);
                    (t, None)
                }),
                StepOutput::Logits(logits) => logits
                    .get_mut(row * vocab..(row + 1) * vocab)
                    .map(|l| a.sampler.sample(l)),
            };
            let outcome = match picked {
                Some((token, logprobs)) => self.emit(id, token, logprobs),
                None => Err(Error::Device(format!("the step brought back no row {row}"))),
            };
            match outcome {
                Ok(true) => {}
                Ok(false) => self.finish(id),
                Err(e) => {
                    if let Some(a) = self.active.get(&id) {
                        a.sender.send(Err(e));
                    }
                    self.finish(id);
                }
            }
        }
    }

    /// A device failure belongs to the whole step: fail its requests, keep serving the rest.
    fn fail(&mut self, step: &Step, e: &Error) {
        for &(id, _) in &step.scheduled {
            if let Some(a) = self.active.get(&id) {
                a.sender.send(Err(Error::Device(e.to_string())));
            }
            self.finish(id);
        }
    }

    /// Appends a sequence's next token and streams it; false once the request is over.
    fn emit(&mut self, id: u64, token: u32, logprobs: Option<Logprobs>) -> Result<bool> {
        let Some(a) = self.active.get_mut(&id) else {
            return Ok(false);
        };
        self.scheduler.append(id, token);
        let generated = self.scheduler.get(id).map_or(0, Sequence::num_generated);
        let tok = &self.tokenizer;
        let is_stop_token = a.stop_ids.contains(&token);
        let mut text = String::new();
        let mut finish = None;
        if !is_stop_token {
            let (out, hit) = a.stop.push(&a.detok.push(tok, token)?);
            text = out;
            finish = hit.then_some(FinishReason::Stop);
        }
        if finish.is_none() {
            if is_stop_token {
                finish = Some(FinishReason::Stop);
            } else if generated >= a.max_tokens {
                finish = Some(FinishReason::Length);
            }
            if finish.is_some() {
                // Release held-back text: a trailing partial character or a stop-string prefix.
                let (out, hit) = a.stop.push(&a.detok.flush(tok)?);
                text.push_str(&out);
                if !hit {
                    text.push_str(&a.stop.flush());
                }
            }
        }
        let chunk = Chunk {
            text,
            token_id: token,
            logprobs,
            finish_reason: finish,
        };
        Ok(a.sender.send(Ok(chunk)) && finish.is_none())
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic in the forward pass".into())
}
