//! lethe: serve GGUF language models with knowledge removed at decode time.

pub mod error;
pub mod gguf;
pub mod hub;
pub mod tokenizer;

pub use error::{Error, Result};
