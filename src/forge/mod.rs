//! Forging new GGUF files from existing ones.
//!
//! [`assistant`]: the ULD assistant base, a copy of the target model cut after its first K
//! blocks.

pub mod assistant;

pub use assistant::truncate_model;
