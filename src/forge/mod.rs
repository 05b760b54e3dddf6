//! Forging new GGUF files from existing ones.
//!
//! [`assistant`]: the ULD assistant base, a copy of the target model cut after its first K
//! blocks.
//! [`ablate`]: directional ablation, a rank-1 delta patch removing one direction of the
//! residual stream.

pub mod ablate;
pub mod assistant;
pub mod bake;

pub use ablate::ablation_patch;
pub use assistant::truncate_model;
pub use bake::{bake, BakeReport, BakeType, TensorReport};
