//! Legacy 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1.
//!
//! Block layouts (little-endian, unaligned, exactly ggml's):
//! - `block_q4_0 { f16 d; u8 qs[16] }`: x = d * (q - 8)
//! - `block_q4_1 { f16 d; f16 m; u8 qs[16] }`: x = d * q + m
//! - `block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }`: x = d * (q - 16)
//! - `block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16] }`: x = d * q + m
//! - `block_q8_0 { f16 d; i8 qs[32] }`: x = d * q
//! - `block_q8_1 { f16 d; f16 s; i8 qs[32] }`: x = d * q, with s = d * sum(q)
//!
//! In the 4/5-bit formats element `j < 16` is the low nibble of `qs[j]` and element `j + 16` its
//! high nibble; the fifth bit of element `j` is bit `j` of the little-endian `u32` in `qh`.
//!
//! Quantizers reproduce ggml's reference quantizers (`quantize_row_*_ref`) bit for bit; the
//! Q8_0/Q8_1 activation quantizers have SIMD paths that give the same bytes.

use super::{wrong_type, Family, GgmlType};
use crate::cpu::{self, Isa};

#[cfg(target_arch = "x86_64")]
#[path = "legacy_x86.rs"]
mod x86;

const QK: usize = 32;
const HALF: usize = QK / 2;

const BYTES_Q4_0: usize = 18;
const BYTES_Q4_1: usize = 20;
const BYTES_Q5_0: usize = 22;
const BYTES_Q5_1: usize = 24;
const BYTES_Q8_0: usize = 34;
const BYTES_Q8_1: usize = 36;

#[inline(always)]
fn f16_at(b: &[u8], off: usize) -> f32 {
    super::float::f16_to_f32(u16::from_le_bytes([b[off], b[off + 1]]))
}

#[inline(always)]
fn put_f16(b: &mut [u8], off: usize, x: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes());
}

#[inline(always)]
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn is_legacy(ty: GgmlType) -> bool {
    ty.family() == Family::Legacy
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

/// Dequantize `dst.len() / 32` blocks of `ty` from `src`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    if !is_legacy(ty) {
        wrong_type(Family::Legacy, ty);
    }
    let bs = ty.type_size();
    for (b, y) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(QK)) {
        match ty {
            GgmlType::Q4_0 => {
                let d = f16_at(b, 0);
                for j in 0..HALF {
                    let q = b[2 + j];
                    y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
                    y[j + HALF] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for j in 0..HALF {
                    let q = b[4 + j];
                    y[j] = (q & 0x0F) as f32 * d + m;
                    y[j + HALF] = (q >> 4) as f32 * d + m;
                }
            }
            GgmlType::Q5_0 => {
                let d = f16_at(b, 0);
                let qh = u32_at(b, 2);
                for j in 0..HALF {
                    let q = b[6 + j];
                    let h0 = ((qh >> j) & 1) << 4;
                    let h1 = ((qh >> (j + HALF)) & 1) << 4;
                    y[j] = (((q & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
                    y[j + HALF] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
                }
            }
            GgmlType::Q5_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qh = u32_at(b, 4);
                for j in 0..HALF {
                    let q = b[8 + j];
                    let h0 = ((qh >> j) & 1) << 4;
                    let h1 = ((qh >> (j + HALF)) & 1) << 4;
                    y[j] = ((q & 0x0F) as u32 | h0) as f32 * d + m;
                    y[j + HALF] = ((q >> 4) as u32 | h1) as f32 * d + m;
                }
            }
            GgmlType::Q8_0 | GgmlType::Q8_1 => {
                let off = if ty == GgmlType::Q8_0 { 2 } else { 4 };
                let d = f16_at(b, 0);
                for (yj, &q) in y.iter_mut().zip(&b[off..off + QK]) {
                    *yj = q as i8 as f32 * d;
                }
            }
            _ => wrong_type(Family::Legacy, ty),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization (ggml reference rounding)
// ---------------------------------------------------------------------------------------------

/// Quantize `src` (a multiple of 32 long) into `src.len() / 32` blocks of `ty` in `dst`.
/// Q8_0 and Q8_1 use SIMD when available; the bytes are identical to the scalar reference.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    quantize_at(cpu::isa(), ty, src, dst)
}

/// [`quantize_row`] with the instruction set capped at `isa` (falls back to what the CPU has).
pub fn quantize_row_isa(isa: Isa, ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    quantize_at(cpu::cap(isa), ty, src, dst)
}

/// [`quantize_row`] at level `isa`, which the CPU runs.
fn quantize_at(isa: Isa, ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar && matches!(ty, GgmlType::Q8_0 | GgmlType::Q8_1) {
        let nb = src.len() / QK;
        assert!(
            dst.len() >= nb * ty.type_size(),
            "quantize_row: destination too short"
        );
        let (x, y, sum) = (src.as_ptr(), dst.as_mut_ptr(), ty == GgmlType::Q8_1);
        // SAFETY: the CPU runs `isa`; lengths were checked above.
        unsafe {
            return if isa == Isa::Avx512 {
                x86::quantize_q8_avx512(x, nb, y, sum)
            } else {
                x86::quantize_q8_avx2(x, nb, y, sum)
            };
        }
    }
    let _ = isa;
    quantize_row_ref(ty, src, dst)
}

/// The scalar reference quantizer for every legacy type (ggml's `quantize_row_*_ref`).
pub fn quantize_row_ref(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    if !is_legacy(ty) {
        wrong_type(Family::Legacy, ty);
    }
    let bs = ty.type_size();
    for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(bs)) {
        match ty {
            GgmlType::Q4_0 => quant_block_q4_0(x, y),
            GgmlType::Q4_1 => quant_block_q4_1(x, y),
            GgmlType::Q5_0 => quant_block_q5_0(x, y),
            GgmlType::Q5_1 => quant_block_q5_1(x, y),
            GgmlType::Q8_0 => quant_block_q8(x, y, false),
            GgmlType::Q8_1 => quant_block_q8(x, y, true),
            _ => wrong_type(Family::Legacy, ty),
        }
    }
}

/// The signed value of largest magnitude (first one on ties), as ggml's `_0` quantizers pick it.
#[inline]
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[inline]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

#[inline]
fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

fn quant_block_q4_0(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = inv(d);
    put_f16(y, 0, d);
    for j in 0..HALF {
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + HALF] * id + 8.5) as i8).min(15) as u8;
        y[2 + j] = q0 | (q1 << 4);
    }
}

fn quant_block_q4_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inv(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    for j in 0..HALF {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + HALF] - min) * id + 0.5) as i8).min(15) as u8;
        y[4 + j] = q0 | (q1 << 4);
    }
}

fn quant_block_q5_0(x: &[f32], y: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = inv(d);
    put_f16(y, 0, d);
    let mut qh = 0u32;
    for j in 0..HALF {
        let q0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let q1 = ((x[j + HALF] * id + 16.5) as i8).min(31) as u8;
        y[6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= (((q0 & 0x10) >> 4) as u32) << j;
        qh |= (((q1 & 0x10) >> 4) as u32) << (j + HALF);
    }
    y[2..6].copy_from_slice(&qh.to_le_bytes());
}

fn quant_block_q5_1(x: &[f32], y: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inv(d);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    let mut qh = 0u32;
    for j in 0..HALF {
        // ggml's q5_1 reference has no clamp here: the value cannot exceed 31.
        let q0 = ((x[j] - min) * id + 0.5) as u8;
        let q1 = ((x[j + HALF] - min) * id + 0.5) as u8;
        y[8 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= (((q0 & 0x10) >> 4) as u32) << j;
        qh |= (((q1 & 0x10) >> 4) as u32) << (j + HALF);
    }
    y[4..8].copy_from_slice(&qh.to_le_bytes());
}

fn quant_block_q8(x: &[f32], y: &mut [u8], with_sum: bool) {
    let amax = x
        .iter()
        .fold(0.0f32, |a, &v| if a > v.abs() { a } else { v.abs() });
    let d = amax / 127.0;
    let id = inv(d);
    let off = if with_sum { 4 } else { 2 };
    let mut sum = 0i32;
    for (yj, &v) in y[off..off + QK].iter_mut().zip(x) {
        // f32::round is C's roundf: half-way cases away from zero.
        let q = (v * id).round() as i8;
        sum += q as i32;
        *yj = q as u8;
    }
    put_f16(y, 0, d);
    if with_sum {
        put_f16(y, 2, sum as f32 * d);
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products
// ---------------------------------------------------------------------------------------------

/// The instruction set the legacy kernels will actually use when asked for `isa`: capped by what
/// the CPU supports ([`cpu::cap`]).
pub fn effective_isa(isa: Isa) -> Isa {
    cpu::cap(isa)
}

/// Whether the AVX-512 dot-product path uses VNNI (`vpdpbusd`) on this CPU.
pub fn uses_vnni() -> bool {
    cpu::vnni(cpu::cap(Isa::Avx512))
}

/// Dot product of `n` elements: weights `w` in `ty`, activations `act` in `ty.vec_dot_type()`.
/// SIMD chosen at run time.
#[inline]
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    dot_at(cpu::isa(), ty, n, w, act)
}

/// [`vec_dot`] with the instruction set capped at `isa` (falls back to what the CPU has).
pub fn vec_dot_isa(isa: Isa, ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    dot_at(cpu::cap(isa), ty, n, w, act)
}

/// [`vec_dot`] at level `isa`, which the CPU runs.
fn dot_at(isa: Isa, ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        let nb = n / QK;
        let (xs, ys) = (ty.type_size(), ty.vec_dot_type().type_size());
        if !is_legacy(ty) {
            wrong_type(Family::Legacy, ty);
        }
        assert!(w.len() >= nb * xs, "vec_dot: weight row too short");
        assert!(act.len() >= nb * ys, "vec_dot: activation row too short");
        let (x, y) = (w.as_ptr(), act.as_ptr());
        // SAFETY: the CPU runs `isa` (and VNNI where `cpu::vnni` says so); `nb` blocks of both
        // operands are in bounds (asserted above). The kernels only do unaligned loads.
        unsafe {
            return if cpu::vnni(isa) {
                x86::vnni::dot(ty, nb, x, y)
            } else {
                x86::avx2::dot(ty, nb, x, y)
            };
        }
    }
    let _ = isa;
    vec_dot_scalar(ty, n, w, act)
}

/// The scalar twin of [`vec_dot`].
pub fn vec_dot_scalar(ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    let nb = n / QK;
    let bs = ty.type_size();
    let w = &w[..nb * bs];
    match ty {
        GgmlType::Q4_0 => dot_scalar_q4_0(w, &act[..nb * BYTES_Q8_0]),
        GgmlType::Q4_1 => dot_scalar_q4_1(w, &act[..nb * BYTES_Q8_1]),
        GgmlType::Q5_0 => dot_scalar_q5_0(w, &act[..nb * BYTES_Q8_0]),
        GgmlType::Q5_1 => dot_scalar_q5_1(w, &act[..nb * BYTES_Q8_1]),
        GgmlType::Q8_0 => dot_scalar_q8::<BYTES_Q8_0, 2>(w, &act[..nb * BYTES_Q8_0]),
        GgmlType::Q8_1 => dot_scalar_q8::<BYTES_Q8_1, 4>(w, &act[..nb * BYTES_Q8_1]),
        _ => wrong_type(Family::Legacy, ty),
    }
}

#[inline(always)]
fn q8(y: &[u8], off: usize) -> &[u8] {
    &y[off..off + QK]
}

fn dot_scalar_q4_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(BYTES_Q4_0).zip(a.chunks_exact(BYTES_Q8_0)) {
        let qy = q8(y, 2);
        let mut sumi = 0i32;
        for j in 0..HALF {
            let q = x[2 + j];
            sumi += ((q & 0x0F) as i32 - 8) * qy[j] as i8 as i32;
            sumi += ((q >> 4) as i32 - 8) * qy[j + HALF] as i8 as i32;
        }
        sum += sumi as f32 * f16_at(x, 0) * f16_at(y, 0);
    }
    sum
}

fn dot_scalar_q4_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(BYTES_Q4_1).zip(a.chunks_exact(BYTES_Q8_1)) {
        let qy = q8(y, 4);
        let mut sumi = 0i32;
        for j in 0..HALF {
            let q = x[4 + j];
            sumi += (q & 0x0F) as i32 * qy[j] as i8 as i32;
            sumi += (q >> 4) as i32 * qy[j + HALF] as i8 as i32;
        }
        sum += (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32 + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

fn dot_scalar_q5_0(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(BYTES_Q5_0).zip(a.chunks_exact(BYTES_Q8_0)) {
        let qh = u32_at(x, 2);
        let qy = q8(y, 2);
        let mut sumi = 0i32;
        for j in 0..HALF {
            let q = x[6 + j];
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + HALF)) & 1) << 4;
            sumi += (((q & 0x0F) as u32 | h0) as i32 - 16) * qy[j] as i8 as i32;
            sumi += (((q >> 4) as u32 | h1) as i32 - 16) * qy[j + HALF] as i8 as i32;
        }
        sum += sumi as f32 * f16_at(x, 0) * f16_at(y, 0);
    }
    sum
}

fn dot_scalar_q5_1(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(BYTES_Q5_1).zip(a.chunks_exact(BYTES_Q8_1)) {
        let qh = u32_at(x, 4);
        let qy = q8(y, 4);
        let mut sumi = 0i32;
        for j in 0..HALF {
            let q = x[8 + j];
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + HALF)) & 1) << 4;
            sumi += ((q & 0x0F) as u32 | h0) as i32 * qy[j] as i8 as i32;
            sumi += ((q >> 4) as u32 | h1) as i32 * qy[j + HALF] as i8 as i32;
        }
        sum += (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32 + f16_at(x, 2) * f16_at(y, 2);
    }
    sum
}

/// Q8_0·Q8_0 (`BS = 34`, quants at 2) and Q8_1·Q8_1 (`BS = 36`, quants at 4; `s` unused).
fn dot_scalar_q8<const BS: usize, const OFF: usize>(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w.chunks_exact(BS).zip(a.chunks_exact(BS)) {
        let sumi: i32 = q8(x, OFF)
            .iter()
            .zip(q8(y, OFF))
            .map(|(&p, &q)| p as i8 as i32 * q as i8 as i32)
            .sum();
        sum += sumi as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sum
}
