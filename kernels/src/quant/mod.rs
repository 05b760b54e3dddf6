//! GGUF block formats. One file per family:
//! - `float`: F32, F16, BF16
//! - `legacy`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 (32-element blocks)
//! - `kquants`: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K (256-element super-blocks)
//!
//! Each family exposes `dequantize_row`, `quantize_row` (ggml's reference rounding),
//! `vec_dot` (SIMD chosen at run time) and `vec_dot_scalar` (its scalar twin). The dot product
//! takes a weight row in its own format and an activation row in `ty.vec_dot_type()` (ggml's
//! pairing: Q4_0/Q5_0/Q8_0 with Q8_0, Q4_1/Q5_1 with Q8_1, K-quants with Q8_K, floats with
//! themselves). `batch` holds the products of several rows at once ([`vec_dot_batch`],
//! [`vec_dot_tile`], [`vec_dot_tile_x8`]).
//!
//! Every family's entry points pick their SIMD body by the one instruction-set level of
//! [`crate::cpu::isa`]; the `*_x86.rs` files hold the `#[target_feature]` bodies.

mod batch;
pub mod float;
pub mod kquants;
pub mod legacy;
#[cfg(target_arch = "x86_64")]
#[path = "x8_x86.rs"]
mod x8;

pub use batch::{
    has_fast_path as has_batch_fast_path, has_tile_x8, quantize_row_x8, vec_dot_batch,
    vec_dot_tile, vec_dot_tile_x8, x8_row_bytes,
};

use crate::KernelError;

pub const QK4_0: usize = 32;
pub const QK4_1: usize = 32;
pub const QK5_0: usize = 32;
pub const QK5_1: usize = 32;
pub const QK8_0: usize = 32;
pub const QK8_1: usize = 32;
pub const QK_K: usize = 256;
pub const K_SCALE_SIZE: usize = 12;

/// ggml tensor types, with ggml's numeric ids.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    /// Integers (sparse delta indices); no dot product.
    I32 = 26,
    BF16 = 30,
}

impl GgmlType {
    pub const ALL: [GgmlType; 16] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::I32,
    ];

    pub fn from_u32(id: u32) -> Result<Self, KernelError> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| *t as u32 == id)
            .ok_or(KernelError::UnknownType(id))
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q8_1 => "Q8_1",
            GgmlType::Q2_K => "Q2_K",
            GgmlType::Q3_K => "Q3_K",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
            GgmlType::I32 => "I32",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::I32 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => 32,
            GgmlType::Q8_0 | GgmlType::Q8_1 => 32,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::I32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + QK4_0 / 2,
            GgmlType::Q4_1 => 4 + QK4_1 / 2,
            GgmlType::Q5_0 => 2 + 4 + QK5_0 / 2,
            GgmlType::Q5_1 => 4 + 4 + QK5_1 / 2,
            GgmlType::Q8_0 => 2 + QK8_0,
            GgmlType::Q8_1 => 4 + QK8_1,
            GgmlType::Q2_K => QK_K / 16 + QK_K / 4 + 4,
            GgmlType::Q3_K => QK_K / 8 + QK_K / 4 + 12 + 2,
            GgmlType::Q4_K => 4 + K_SCALE_SIZE + QK_K / 2,
            GgmlType::Q5_K => 4 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2,
            GgmlType::Q6_K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            GgmlType::Q8_K => 4 + QK_K + QK_K / 16 * 2,
        }
    }

    /// Bytes of a row of `n` elements (`n` must be a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }

    /// The activation format this weight format's dot product pairs with.
    pub fn vec_dot_type(self) -> GgmlType {
        match self {
            GgmlType::F32 => GgmlType::F32,
            GgmlType::I32 => GgmlType::I32,
            GgmlType::F16 => GgmlType::F16,
            GgmlType::BF16 => GgmlType::BF16,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 => GgmlType::Q8_1,
            GgmlType::Q8_1 => GgmlType::Q8_1,
            _ => GgmlType::Q8_K,
        }
    }

    pub fn is_quantized(self) -> bool {
        !matches!(
            self,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::I32
        )
    }

    pub(crate) fn family(self) -> Family {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::I32 => Family::Float,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1 => Family::Legacy,
            _ => Family::K,
        }
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The families of block formats, one file of kernels each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Float,
    Legacy,
    K,
}

/// A type handed to the kernels of a family it is not in. The entry points of this module
/// dispatch by family, so only a direct caller of a family's functions can get here: that is a
/// bug, and every family panics the same way.
#[cold]
#[track_caller]
pub(crate) fn wrong_type(family: Family, ty: GgmlType) -> ! {
    let name = match family {
        Family::Float => "float",
        Family::Legacy => "legacy block",
        Family::K => "K-quant",
    };
    panic!("{ty} is not a {name} type")
}

fn check_len(ty: GgmlType, n: usize) -> Result<(), KernelError> {
    if !n.is_multiple_of(ty.block_size()) {
        return Err(KernelError::BadRowLength {
            ty: ty.name(),
            n,
            block: ty.block_size(),
        });
    }
    Ok(())
}

/// A row of `n` elements of `ty` in a buffer of `bytes` bytes: an error unless the row is whole
/// blocks, a panic (`{what} too short`) unless the buffer holds it.
fn check_row(ty: GgmlType, n: usize, bytes: usize, what: &str) -> Result<(), KernelError> {
    check_len(ty, n)?;
    assert!(bytes >= ty.row_bytes(n), "{what} too short");
    Ok(())
}

/// Dequantize one row: `src` holds `dst.len() / block_size` blocks of `ty`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    check_row(ty, dst.len(), src.len(), "dequantize_row: source")?;
    match ty.family() {
        Family::Float => float::dequantize_row(ty, src, dst),
        Family::Legacy => legacy::dequantize_row(ty, src, dst),
        Family::K => kquants::dequantize_row(ty, src, dst),
    }
    Ok(())
}

/// Quantize one row with ggml's reference rounding: `dst` receives `ty.row_bytes(src.len())` bytes.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    check_row(ty, src.len(), dst.len(), "quantize_row: destination")?;
    match ty.family() {
        Family::Float => float::quantize_row(ty, src, dst),
        Family::Legacy => legacy::quantize_row(ty, src, dst),
        Family::K => kquants::quantize_row(ty, src, dst),
    }
    Ok(())
}

/// Dot product of a weight row (`ty`, `n` elements) with an activation row in
/// `ty.vec_dot_type()`. SIMD chosen at run time. Q8_K has no dot product of its own.
#[inline]
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    debug_assert!(n.is_multiple_of(ty.block_size()));
    debug_assert!(w.len() >= ty.row_bytes(n));
    debug_assert!(act.len() >= ty.vec_dot_type().row_bytes(n));
    match ty.family() {
        Family::Float => float::vec_dot(ty, n, w, act),
        Family::Legacy => legacy::vec_dot(ty, n, w, act),
        Family::K => kquants::vec_dot(ty, n, w, act),
    }
}

/// The scalar twin of [`vec_dot`].
pub fn vec_dot_scalar(ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    match ty.family() {
        Family::Float => float::vec_dot_scalar(ty, n, w, act),
        Family::Legacy => legacy::vec_dot_scalar(ty, n, w, act),
        Family::K => kquants::vec_dot_scalar(ty, n, w, act),
    }
}

/// Whether `ty` can be used as a matmul weight (has a dot product).
pub fn has_vec_dot(ty: GgmlType) -> bool {
    !matches!(ty, GgmlType::Q8_K | GgmlType::I32)
}

// Compile-time block size checks (ggml's static asserts).
const _: () = assert!(2 + QK4_0 / 2 == 18);
const _: () = assert!(4 + QK4_1 / 2 == 20);
const _: () = assert!(2 + 4 + QK5_0 / 2 == 22);
const _: () = assert!(4 + 4 + QK5_1 / 2 == 24);
const _: () = assert!(2 + QK8_0 == 34);
const _: () = assert!(4 + QK8_1 == 36);
const _: () = assert!(QK_K / 16 + QK_K / 4 + 4 == 84);
const _: () = assert!(QK_K / 8 + QK_K / 4 + 12 + 2 == 110);
const _: () = assert!(4 + K_SCALE_SIZE + QK_K / 2 == 144);
const _: () = assert!(4 + K_SCALE_SIZE + QK_K / 8 + QK_K / 2 == 176);
const _: () = assert!(QK_K / 2 + QK_K / 4 + QK_K / 16 + 2 == 210);
const _: () = assert!(4 + QK_K + QK_K / 16 * 2 == 292);
