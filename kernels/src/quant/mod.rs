//! GGUF block formats. One file per family:
//! - `float`: F32, F16, BF16
//! - `legacy`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 (32-element blocks)
//! - `kquants`: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K (256-element super-blocks)
//!
//! Each family exposes `dequantize_row`, `quantize_row` (ggml's reference rounding),
//! `vec_dot` (SIMD chosen at run time) and `vec_dot_scalar` (its scalar twin). The dot product
//! takes a weight row in its own format and an activation row in `ty.vec_dot_type()` (ggml's
//! pairing: Q4_0/Q5_0/Q8_0 with Q8_0, Q4_1/Q5_1 with Q8_1, K-quants with Q8_K, floats with
//! themselves).

mod batch;
pub mod float;
pub mod kquants;
pub mod legacy;
#[cfg(target_arch = "x86_64")]
#[path = "x8_x86.rs"]
mod x8;

pub use batch::has_fast_path as has_batch_fast_path;

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

/// Dequantize one row: `src` holds `dst.len() / block_size` blocks of `ty`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    check_len(ty, dst.len())?;
    assert!(
        src.len() >= ty.row_bytes(dst.len()),
        "dequantize_row: source too short"
    );
    match ty.family() {
        Family::Float => float::dequantize_row(ty, src, dst),
        Family::Legacy => legacy::dequantize_row(ty, src, dst),
        Family::K => kquants::dequantize_row(ty, src, dst),
    }
    Ok(())
}

/// Quantize one row with ggml's reference rounding: `dst` receives `ty.row_bytes(src.len())` bytes.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    check_len(ty, src.len())?;
    assert!(
        dst.len() >= ty.row_bytes(src.len()),
        "quantize_row: destination too short"
    );
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

/// Batched [`vec_dot`]: `out[j] = vec_dot(ty, n, w, &act[j * act_stride..])` for
/// `j < n_act`. Where a SIMD batch kernel exists (see [`has_batch_fast_path`]) each weight
/// block is unpacked once and multiplied against up to four activation rows; the integer math
/// is the single-row kernels', only the f32 accumulation order may differ slightly.
pub fn vec_dot_batch(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    act: &[u8],
    act_stride: usize,
    n_act: usize,
    out: &mut [f32],
) {
    if n_act == 0 {
        return;
    }
    assert!(
        n.is_multiple_of(ty.block_size()),
        "vec_dot_batch: bad row length"
    );
    assert!(
        w.len() >= ty.row_bytes(n),
        "vec_dot_batch: weight row too short"
    );
    let ab = ty.vec_dot_type().row_bytes(n);
    assert!(
        act.len() >= (n_act - 1) * act_stride + ab,
        "vec_dot_batch: activation rows too short"
    );
    assert!(out.len() >= n_act, "vec_dot_batch: output too short");
    if batch::vec_dot_batch(ty, n, w, act, act_stride, n_act, out) {
        return;
    }
    for (j, o) in out[..n_act].iter_mut().enumerate() {
        *o = vec_dot(ty, n, w, &act[j * act_stride..]);
    }
}

/// Tiled [`vec_dot`]: `out[i * out_stride + j] = vec_dot(ty, n, &w[i * w_stride..],
/// &act[j * act_stride..])` for `i < n_w`, `j < n_act`, the same bits. Where a SIMD tile
/// kernel exists (Q4_0 and Q5_0 with AVX-512 VNNI) blocks of two weight rows by four
/// activation rows share their unpacked weights and loaded activations; other types go
/// through [`vec_dot_batch`] one weight row at a time. Q4_1 and Q8_0 have their fast tiles
/// in [`vec_dot_tile_x8`], which takes the activations interleaved.
#[allow(clippy::too_many_arguments)]
pub fn vec_dot_tile(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    w_stride: usize,
    n_w: usize,
    act: &[u8],
    act_stride: usize,
    n_act: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    if n_w == 0 || n_act == 0 {
        return;
    }
    assert!(
        n.is_multiple_of(ty.block_size()),
        "vec_dot_tile: bad row length"
    );
    assert!(
        w.len() >= (n_w - 1) * w_stride + ty.row_bytes(n),
        "vec_dot_tile: weight rows too short"
    );
    let ab = ty.vec_dot_type().row_bytes(n);
    assert!(
        act.len() >= (n_act - 1) * act_stride + ab,
        "vec_dot_tile: activation rows too short"
    );
    assert!(
        n_w == 1 || out_stride >= n_act,
        "vec_dot_tile: output stride shorter than a row"
    );
    assert!(
        out.len() >= (n_w - 1) * out_stride + n_act,
        "vec_dot_tile: output too short"
    );
    if batch::vec_dot_tile(
        ty, n, w, w_stride, n_w, act, act_stride, n_act, out, out_stride,
    ) {
        return;
    }
    for i in 0..n_w {
        vec_dot_batch(
            ty,
            n,
            &w[i * w_stride..],
            act,
            act_stride,
            n_act,
            &mut out[i * out_stride..],
        );
    }
}

/// Whether [`vec_dot_tile_x8`] runs for weights of `ty` on this CPU (Q4_1 and Q8_0 with
/// AVX-512 VNNI). Callers that get `false` use [`vec_dot_tile`] with the usual layout.
pub fn has_tile_x8(ty: GgmlType) -> bool {
    crate::cpu::vnni(crate::cpu::isa()) && in_x8_order(ty)
}

/// The types whose VNNI dot products sum in eight-block lanes (`x8_x86.rs`), the order their
/// tile kernels on interleaved activations reproduce.
fn in_x8_order(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// Bytes of one activation row of `n` elements (a multiple of 32) in the interleaved layout
/// of [`quantize_row_x8`]: groups of eight blocks, the last one padded.
pub fn x8_row_bytes(n: usize) -> usize {
    n.div_ceil(8 * QK8_0) * 288
}

/// Quantize `src` to `vt` (Q8_0 or Q8_1; the same values as [`quantize_row`]) in the
/// interleaved layout that [`vec_dot_tile_x8`] reads: per group of eight blocks, the eight
/// `d`, eight second fields (Q8_1: `s`; Q8_0: the i16 sum of the block's quants), then the
/// quants with dword `v` of block `k` at dword `8 * v + k`. `dst` takes
/// [`x8_row_bytes`]`(src.len())` bytes.
pub fn quantize_row_x8(vt: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), KernelError> {
    assert!(
        matches!(vt, GgmlType::Q8_0 | GgmlType::Q8_1),
        "quantize_row_x8: {vt} is not Q8_0 or Q8_1"
    );
    check_len(vt, src.len())?;
    let nb = src.len() / QK8_0;
    assert!(
        dst.len() >= x8_row_bytes(src.len()),
        "quantize_row_x8: destination too short"
    );
    // One group at a time through the usual quantizer (same bytes), then rearranged.
    let bs = vt.type_size();
    let mut tmp = [0u8; 8 * 36];
    for (g, out) in dst[..x8_row_bytes(src.len())]
        .chunks_exact_mut(288)
        .enumerate()
    {
        let k = (nb - 8 * g).min(8);
        let x = &src[8 * g * QK8_0..(8 * g + k) * QK8_0];
        quantize_row(vt, x, &mut tmp[..k * bs])?;
        interleave(vt == GgmlType::Q8_1, k, &tmp[..k * bs], out);
    }
    Ok(())
}

/// `nb` blocks of Q8_0 or Q8_1 (`q8_1`) at `src` into one interleaved group (`nb` <= 8).
fn interleave(q8_1: bool, nb: usize, src: &[u8], out: &mut [u8]) {
    let bs = if q8_1 { 36 } else { 34 };
    let off = bs - 32;
    out[..288].fill(0);
    for k in 0..nb {
        let b = &src[k * bs..(k + 1) * bs];
        out[2 * k..2 * k + 2].copy_from_slice(&b[..2]);
        let second = if q8_1 {
            [b[2], b[3]]
        } else {
            let s: i32 = b[off..off + 32].iter().map(|&q| q as i8 as i32).sum();
            (s as i16).to_le_bytes()
        };
        out[16 + 2 * k..16 + 2 * k + 2].copy_from_slice(&second);
        for v in 0..8 {
            let o = 32 + 32 * v + 4 * k;
            out[o..o + 4].copy_from_slice(&b[off + 4 * v..off + 4 * v + 4]);
        }
    }
}

/// [`vec_dot_tile`] with the activations in the interleaved layout of [`quantize_row_x8`]
/// (rows `act_stride` bytes apart): `out[i * out_stride + j]` is the same bits as
/// `vec_dot(ty, n, &w[i * w_stride..], a_j)` where `a_j` is activation row `j` in the usual
/// layout. Weight rows are unpacked once per group of eight blocks for all activation rows.
/// Panics unless [`has_tile_x8`]`(ty)`.
#[allow(clippy::too_many_arguments)]
pub fn vec_dot_tile_x8(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    w_stride: usize,
    n_w: usize,
    act: &[u8],
    act_stride: usize,
    n_act: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    assert!(has_tile_x8(ty), "vec_dot_tile_x8: no kernel for {ty}");
    if n_w == 0 || n_act == 0 {
        return;
    }
    assert!(
        n.is_multiple_of(ty.block_size()),
        "vec_dot_tile_x8: bad row length"
    );
    assert!(
        w.len() >= (n_w - 1) * w_stride + ty.row_bytes(n),
        "vec_dot_tile_x8: weight rows too short"
    );
    assert!(
        act.len() >= (n_act - 1) * act_stride + x8_row_bytes(n),
        "vec_dot_tile_x8: activation rows too short"
    );
    assert!(
        n_w == 1 || out_stride >= n_act,
        "vec_dot_tile_x8: output stride shorter than a row"
    );
    assert!(
        out.len() >= (n_w - 1) * out_stride + n_act,
        "vec_dot_tile_x8: output too short"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `has_tile_x8` checked the CPU level; the bounds were checked above. The
    // kernel reads only the `n / 32` blocks of each weight row (masked loads and gathers in a
    // partial group) and whole groups of each activation row.
    unsafe {
        x8::dot_tile(
            ty,
            n / ty.block_size(),
            w.as_ptr(),
            w_stride,
            n_w,
            act.as_ptr(),
            act_stride,
            n_act,
            out.as_mut_ptr(),
            out_stride,
        );
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
