//! kiln's CubeCL kernels: one kernel per file, each with its plain reference implementation and
//! tests beside it. The tests run on wgpu (Mesa lavapipe on CPU-only machines); the same kernels
//! run on CUDA in the engine and the GPU benchmarks.

pub mod argmax;
pub mod decode_attention_tiles;
pub mod deferred_tokens;
pub mod embedding;
pub mod gemv;
pub mod matmul;
pub(crate) mod mma;
pub mod mma_gemm;
pub mod paged_decode_attention;
pub mod prefill_attention;
pub mod reduce;
pub mod rms_norm;
pub mod rope_kv_write;
pub mod sample;
pub mod silu_mul;
pub mod vector;

#[cfg(test)]
pub(crate) mod test_util;

pub use cubecl;
