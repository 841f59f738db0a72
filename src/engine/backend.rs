//! The interface RAG code programs against: implemented by [`Engine`](super::Engine), and by
//! any mock a test wants to put in its place.

use super::request::{Completion, Request};
use super::stream::TokenStream;
use crate::error::Result;

/// A text-generation backend.
pub trait LlmBackend: Send + Sync {
    /// Runs `request` to the end.
    fn generate(&self, request: Request) -> Result<Completion>;

    /// Starts `request` and streams its chunks; dropping the stream cancels it.
    fn stream(&self, request: Request) -> Result<TokenStream>;
}
