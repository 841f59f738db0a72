//! kiln's CubeCL kernels: one kernel per file, each with its plain reference
//! implementation and tests beside it. The GPU hot path lands here.

pub use cubecl;
