//! Forging new GGUF files from existing ones.
//!
//! [`assistant`]: the ULD assistant base, a copy of the target model cut after its first K
//! blocks.
//! [`ablate`]: directional ablation, a rank-1 delta patch removing one direction of the
//! residual stream.
//! [`slug`]: SLUG, one step along the forget gradient of one matrix, written as a dense delta
//! patch.
//! [`train`]: LoRA training on the CPU (forward and backward passes over the frozen quantized
//! weights).

pub mod ablate;
pub mod assistant;
pub mod slug;
pub mod train;
pub mod uld;
pub mod unlearn;

pub use ablate::ablation_patch;
pub use assistant::truncate_model;
