//! The seam between model code and the hardware: attention and fused ops, with the reference
//! implementation in Burn tensor ops (GPU kernels implement the same interfaces).

pub mod attention;
pub mod kv_cache;
pub mod rms_norm;
pub mod rope;
