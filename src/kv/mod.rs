//! KV-cache bookkeeping in block ids: allocation and per-sequence block tables.

pub mod block_pool;
