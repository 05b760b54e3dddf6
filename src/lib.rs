//! lethe: serve GGUF language models with knowledge removed at decode time.

pub mod error;
pub mod eval;
pub mod forge;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod model;
pub mod patch;
pub mod pool;
pub mod qa;
pub mod serve;
pub mod tokenizer;
pub mod unlearn;

pub use error::{Error, Result};
