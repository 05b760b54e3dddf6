//! x86-64 dot products for F32, F16 and BF16 (declared from `float.rs`).
//!
//! Each kernel converts to f32 and accumulates with FMA into four 8-lane accumulators (32 elements
//! per iteration), then 8 at a time, then a scalar tail. Unaligned loads only; callers check
//! bounds and CPU features. (512-bit versions were slower on Zen 4 and were dropped.)

#![allow(clippy::missing_safety_doc)]

use crate::simd_x86::{h2f_s, hsum, rd_f32};
use core::arch::x86_64::*;

/// Generic AVX2 loop: `load(p, i)` gives 8 f32 from element `i`; `scalar(i)` one product.
macro_rules! avx2_loop {
    ($n:expr, $load:expr, $scalar:expr) => {{
        let n = $n;
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let (x, y) = $load(i + 8 * k);
                *a = _mm256_fmadd_ps(x, y, *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            let (x, y) = $load(i);
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut sum = hsum(v);
        while i < n {
            sum += $scalar(i);
            i += 1;
        }
        sum
    }};
}

#[inline]
unsafe fn bf2f(p: *const u8) -> f32 {
    f32::from_bits((core::ptr::read_unaligned(p as *const u16) as u32) << 16)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32_avx2(n: usize, x: *const u8, y: *const u8) -> f32 {
    let (x, y) = (x as *const f32, y as *const f32);
    avx2_loop!(
        n,
        |i: usize| (_mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(y.add(i))),
        |i: usize| rd_f32(x.add(i) as *const u8) * rd_f32(y.add(i) as *const u8)
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16_avx2(n: usize, x: *const u8, y: *const u8) -> f32 {
    let ld =
        |p: *const u8, i: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i));
    avx2_loop!(n, |i: usize| (ld(x, i), ld(y, i)), |i: usize| h2f_s(
        x.add(2 * i)
    ) * h2f_s(
        y.add(2 * i)
    ))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_bf16_avx2(n: usize, x: *const u8, y: *const u8) -> f32 {
    let ld = |p: *const u8, i: usize| {
        let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i) as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
    };
    avx2_loop!(n, |i: usize| (ld(x, i), ld(y, i)), |i: usize| bf2f(
        x.add(2 * i)
    ) * bf2f(
        y.add(2 * i)
    ))
}
