//! Model architectures (one file each) and their configuration.

pub mod config;
pub mod llama;
pub mod llama_kernels;
