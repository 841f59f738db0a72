//! The per-request channel from the engine thread to the caller: a blocking iterator and an
//! async `Stream` over the same queue. Dropping it cancels the request.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::request::{Chunk, Completion};
use crate::error::{Error, Result};

#[derive(Default)]
struct Queue {
    items: VecDeque<Result<Chunk>>,
    /// No more items will come.
    closed: bool,
    /// The receiver is gone; the sender should stop.
    dropped: bool,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent: keep going.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The engine's end of a stream.
pub(crate) struct StreamSender {
    shared: Arc<Shared>,
}

impl StreamSender {
    /// Queues an item; false if the caller has dropped its stream.
    pub fn send(&self, item: Result<Chunk>) -> bool {
        let mut q = self.shared.lock();
        if q.dropped {
            return false;
        }
        q.items.push_back(item);
        if let Some(w) = q.waker.take() {
            w.wake();
        }
        self.shared.ready.notify_all();
        true
    }

    pub fn is_dropped(&self) -> bool {
        self.shared.lock().dropped
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        let mut q = self.shared.lock();
        q.closed = true;
        if let Some(w) = q.waker.take() {
            w.wake();
        }
        self.shared.ready.notify_all();
    }
}

/// A request's chunks as they are generated.
///
/// Iterate it (blocking) or poll it as a `futures::Stream`. The last chunk carries the
/// `finish_reason`; an `Err` item means the request failed and nothing follows.
pub struct TokenStream {
    shared: Arc<Shared>,
    prompt_tokens: usize,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl TokenStream {
    pub(crate) fn channel(
        prompt_tokens: usize,
        on_drop: Box<dyn FnOnce() + Send>,
    ) -> (StreamSender, Self) {
        let shared = Arc::new(Shared::default());
        (
            StreamSender {
                shared: shared.clone(),
            },
            Self {
                shared,
                prompt_tokens,
                on_drop: Some(on_drop),
            },
        )
    }

    /// A finished stream over fixed items: for `LlmBackend` mocks and tests.
    pub fn from_items(prompt_tokens: usize, items: Vec<Result<Chunk>>) -> Self {
        let shared = Arc::new(Shared::default());
        {
            let mut q = shared.lock();
            q.items.extend(items);
            q.closed = true;
        }
        Self {
            shared,
            prompt_tokens,
            on_drop: None,
        }
    }

    /// Tokens in the (tokenized) prompt.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Waits for the whole generation and joins it into a [`Completion`].
    pub fn into_completion(self) -> Result<Completion> {
        let prompt_tokens = self.prompt_tokens;
        let mut text = String::new();
        let mut token_ids = Vec::new();
        let mut logprobs: Option<Vec<_>> = None;
        for chunk in self {
            let chunk = chunk?;
            text.push_str(&chunk.text);
            token_ids.push(chunk.token_id);
            if let Some(lp) = chunk.logprobs {
                logprobs.get_or_insert_with(Vec::new).push(lp);
            }
            if let Some(finish_reason) = chunk.finish_reason {
                return Ok(Completion {
                    text,
                    token_ids,
                    prompt_tokens,
                    finish_reason,
                    logprobs,
                });
            }
        }
        Err(Error::EngineStopped)
    }
}

impl Iterator for TokenStream {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut q = self.shared.lock();
        loop {
            if let Some(item) = q.items.pop_front() {
                return Some(item);
            }
            if q.closed {
                return None;
            }
            q = self.shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl futures_core::Stream for TokenStream {
    type Item = Result<Chunk>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut q = self.shared.lock();
        if let Some(item) = q.items.pop_front() {
            return Poll::Ready(Some(item));
        }
        if q.closed {
            return Poll::Ready(None);
        }
        q.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        let finished = {
            let mut q = self.shared.lock();
            q.dropped = true;
            q.closed
        };
        if let (false, Some(cancel)) = (finished, self.on_drop.take()) {
            cancel();
        }
    }
}
