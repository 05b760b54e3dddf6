//! x86-64 dot products for F32, F16 and BF16 (declared from `float.rs`).
//!
//! Each kernel converts to f32 and accumulates with FMA into four 8-lane accumulators (32 elements
//! per iteration), then 8 at a time, then a scalar tail. Unaligned loads only; callers check
//! bounds and CPU features. (512-bit versions were slower on Zen 4 and were dropped.)

#![allow(clippy::missing_safety_doc)]

use core::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

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
        let mut sum = hsum256(v);
        while i < n {
            sum += $scalar(i);
            i += 1;
        }
        sum
    }};
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn h2f(p: *const u8) -> f32 {
    let bits = core::ptr::read_unaligned(p as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
unsafe fn bf2f(p: *const u8) -> f32 {
    f32::from_bits((core::ptr::read_unaligned(p as *const u16) as u32) << 16)
}

#[inline]
unsafe fn rf(p: *const u8) -> f32 {
    core::ptr::read_unaligned(p as *const f32)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32_avx2(n: usize, x: *const u8, y: *const u8) -> f32 {
    let (x, y) = (x as *const f32, y as *const f32);
    avx2_loop!(
        n,
        |i: usize| (_mm256_loadu_ps(x.add(i)), _mm256_loadu_ps(y.add(i))),
        |i: usize| rf(x.add(i) as *const u8) * rf(y.add(i) as *const u8)
    )
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16_avx2(n: usize, x: *const u8, y: *const u8) -> f32 {
    let ld =
        |p: *const u8, i: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i) as *const __m128i));
    avx2_loop!(n, |i: usize| (ld(x, i), ld(y, i)), |i: usize| h2f(
        x.add(2 * i)
    ) * h2f(
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
