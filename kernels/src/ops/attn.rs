//! Inner loops of attention over an F16 cache.

use half::f16;

/// `sum_i q[i] * k[i]` with `k` in f16.
#[inline]
pub fn dot_f16(q: &[f32], k: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        let f = crate::cpu::features();
        if f.avx2_fma && f.f16c && q.len().is_multiple_of(8) {
            // SAFETY: features checked above.
            return unsafe { x86::dot_f16_avx2(q, k) };
        }
    }
    q.iter().zip(k).map(|(&a, &b)| a * b.to_f32()).sum()
}

/// `out += w * v` with `v` in f16.
#[inline]
pub fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    {
        let f = crate::cpu::features();
        if f.avx2_fma && f.f16c && out.len().is_multiple_of(8) {
            // SAFETY: features checked above.
            return unsafe { x86::axpy_f16_avx2(out, w, v) };
        }
    }
    for (o, &b) in out.iter_mut().zip(v) {
        *o += w * b.to_f32();
    }
}

pub fn f32_to_f16_slice(src: &[f32], dst: &mut [f16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(s);
    }
}

pub fn f16_to_f32_slice(src: &[f16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::simd_x86::hsum;
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16_avx2(q: &[f32], k: &[f16]) -> f32 {
        let n = q.len();
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let k0 = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i) as *const __m128i));
            let k1 = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i + 8) as *const __m128i));
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), k0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i + 8)), k1, acc1);
            i += 16;
        }
        while i + 8 <= n {
            let k0 = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(i) as *const __m128i));
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), k0, acc0);
            i += 8;
        }
        hsum(_mm256_add_ps(acc0, acc1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16_avx2(out: &mut [f32], w: f32, v: &[f16]) {
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i + 8 <= out.len() {
            let x = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
            let o = _mm256_loadu_ps(out.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_fmadd_ps(wv, x, o));
            i += 8;
        }
    }
}
