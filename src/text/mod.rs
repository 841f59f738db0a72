//! Text out of tokens: incremental detokenization and stop strings.

pub mod detokenizer;
pub mod stop;
