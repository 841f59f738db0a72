//! kiln: LLM inference linked into your process.

pub mod error;
pub mod loader;
pub mod models;

pub use error::{Error, Result};
