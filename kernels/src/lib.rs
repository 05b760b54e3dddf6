//! lethe-kernels: numbers only. Block formats of GGUF (ggml) tensors, their dot products,
//! and the small ops of a transformer forward pass. Nothing here knows about files or models.
//!
//! Every fast kernel has a scalar twin in the same family file; SIMD is chosen at run time by
//! one instruction-set level ([`cpu::isa`]).

pub mod cpu;
pub mod ops;
pub mod quant;
#[cfg(target_arch = "x86_64")]
mod simd_x86;

pub use quant::GgmlType;

/// The crate's one error type: what a caller can get wrong with data (a type id, a row length).
/// Misuse of the kernels themselves (a type handed to the wrong family, buffers too short)
/// panics instead.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("unknown ggml type id {0}")]
    UnknownType(u32),
    #[error("row length {n} is not a multiple of block size {block} for {ty}")]
    BadRowLength {
        ty: &'static str,
        n: usize,
        block: usize,
    },
}
