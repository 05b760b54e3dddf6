//! Float formats: F32, F16 (IEEE half), BF16 (bfloat16). Block size 1, little-endian, unaligned.
//!
//! Conversions follow ggml: fp32 -> fp16 rounds to nearest even (the `half` crate, as F16C does);
//! fp32 -> bf16 is [`fp32_to_bf16`] (ggml_compute_fp32_to_bf16: nearest even, NaNs quieted).
//! Dot products pair each format with itself; the SIMD paths convert to f32 and accumulate with
//! FMA in several f32 vectors, the scalar twin sums f32 products in f64 (as ggml's scalar code).

use super::{wrong_type, Family, GgmlType};
use crate::cpu::{self, Isa};

#[cfg(target_arch = "x86_64")]
#[path = "float_x86.rs"]
mod x86;

/// fp32 -> bf16 bits exactly as ggml's `ggml_compute_fp32_to_bf16`: NaNs become quiet NaNs
/// (top 16 bits | 0x40), everything else rounds to nearest, ties to even (overflow gives inf).
#[inline]
pub fn fp32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7FFF_FFFF) > 0x7F80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u as u64 + (0x7FFF + ((u >> 16) & 1)) as u64) >> 16) as u16
}

/// bf16 bits -> fp32 (exact).
#[inline]
pub fn bf16_to_fp32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// fp16 bits -> fp32, exact (bit-identical to `half::f16::to_f32` and F16C: NaNs are quieted),
/// branch-free: `half` checks for F16C at run time on every call.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let em = (h & 0x7FFF) as u32;
    // Exponent and mantissa moved to f32's place read as 2^(e-127) * 1.m (or the subnormal
    // m * 2^-136); scaling by 2^112 rebiases both exactly.
    let finite = (f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let quiet = if em > 0x7C00 { 0x0040_0000 } else { 0 };
    let special = 0x7F80_0000 | ((em & 0x03FF) << 13) | quiet;
    f32::from_bits(sign | if em >= 0x7C00 { special } else { finite })
}

/// Convert `dst.len()` elements of `ty` from `src` to f32.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (y, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (y, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *y = f16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        GgmlType::BF16 => {
            for (y, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *y = bf16_to_fp32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        GgmlType::I32 => {
            for (y, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *y = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
            }
        }
        _ => wrong_type(Family::Float, ty),
    }
}

/// Convert `src` to `ty` in `dst` (`ty.row_bytes(src.len())` bytes).
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) {
    match ty {
        GgmlType::F32 => {
            for (c, x) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (c, x) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&half::f16::from_f32(*x).to_bits().to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (c, x) in dst.chunks_exact_mut(2).zip(src) {
                c.copy_from_slice(&fp32_to_bf16(*x).to_le_bytes());
            }
        }
        GgmlType::I32 => {
            for (c, x) in dst.chunks_exact_mut(4).zip(src) {
                c.copy_from_slice(&(x.round() as i32).to_le_bytes());
            }
        }
        _ => wrong_type(Family::Float, ty),
    }
}

/// The instruction set the float kernels will use when asked for `isa` (capped by the CPU,
/// [`cpu::cap`]). There are no 512-bit float kernels: on Zen 4 they measured no faster for
/// F32/BF16 and much slower for F16 (`vcvtph2ps zmm`), so `Avx512` runs the 256-bit ones.
pub fn effective_isa(isa: Isa) -> Isa {
    cpu::cap(isa).min(Isa::Avx2)
}

/// Dot product of `n` elements of `ty` (both operands in `ty`). SIMD chosen at run time.
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
        let es = match ty {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            _ => wrong_type(Family::Float, ty),
        };
        assert!(w.len() >= n * es, "vec_dot: weight row too short");
        assert!(act.len() >= n * es, "vec_dot: activation row too short");
        let (x, y) = (w.as_ptr(), act.as_ptr());
        // SAFETY: the CPU runs `isa` (AVX2, FMA and F16C); `n` elements of both are in bounds.
        unsafe {
            return match ty {
                GgmlType::F32 => x86::dot_f32_avx2(n, x, y),
                GgmlType::F16 => x86::dot_f16_avx2(n, x, y),
                _ => x86::dot_bf16_avx2(n, x, y),
            };
        }
    }
    let _ = isa;
    vec_dot_scalar(ty, n, w, act)
}

/// The scalar twin of [`vec_dot`]: f32 products summed in f64.
pub fn vec_dot_scalar(ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    match ty {
        GgmlType::F32 => {
            dot_scalar::<4>(n, w, act, |c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        }
        GgmlType::F16 => {
            dot_scalar::<2>(n, w, act, |c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
        }
        GgmlType::BF16 => dot_scalar::<2>(n, w, act, |c| {
            bf16_to_fp32(u16::from_le_bytes([c[0], c[1]]))
        }),
        _ => wrong_type(Family::Float, ty),
    }
}

#[inline(always)]
fn dot_scalar<const ES: usize>(n: usize, w: &[u8], act: &[u8], conv: impl Fn(&[u8]) -> f32) -> f32 {
    let (w, act) = (&w[..n * ES], &act[..n * ES]);
    // Four partial sums break the add dependency chain; in f64 the order hardly matters.
    let mut s = [0.0f64; 4];
    let (wc, ac) = (w.chunks_exact(4 * ES), act.chunks_exact(4 * ES));
    let (wr, ar) = (wc.remainder(), ac.remainder());
    for (a, b) in wc.zip(ac) {
        for k in 0..4 {
            s[k] += (conv(&a[k * ES..]) * conv(&b[k * ES..])) as f64;
        }
    }
    for (a, b) in wr.chunks_exact(ES).zip(ar.chunks_exact(ES)) {
        s[0] += (conv(a) * conv(b)) as f64;
    }
    ((s[0] + s[1]) + (s[2] + s[3])) as f32
}
