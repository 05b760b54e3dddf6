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

/// The most query heads [`attend_group`] takes at once (their accumulators fill the 16
/// AVX2 registers).
pub const GROUP_MAX: usize = 3;

/// Attention of `g = q.len() / hd` query heads (at most [`GROUP_MAX`]) over the same `n`
/// cached positions, row `j`'s key at `k[j * stride..][..hd]` and its value at
/// `v[j * stride..][..hd]`:
///
/// ```text
/// s_ij   = scale * q_i . k_j          (then c * tanh(s_ij / c) with a softcap c)
/// out_i  = sum_j softmax_j(s_i)_j v_j  // q, out: [g, hd]; scores: scratch of g * n
/// ```
///
/// Bit for bit what [`dot_f16`], [`super::softmax_inplace`] and [`axpy_f16`] give one head at
/// a time (the same sums in the same order); each key and value row is converted from f16
/// once for all `g` heads instead of once per head.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    q: &[f32],
    hd: usize,
    k: &[f16],
    v: &[f16],
    stride: usize,
    n: usize,
    scale: f32,
    softcap: Option<f32>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let g = q.len() / hd;
    assert!((1..=GROUP_MAX).contains(&g) && q.len() == g * hd && out.len() >= g * hd);
    assert!(scores.len() >= g * n && n >= 1);
    assert!(k.len() >= (n - 1) * stride + hd && v.len() >= (n - 1) * stride + hd);
    #[cfg(target_arch = "x86_64")]
    {
        let f = crate::cpu::features();
        if f.avx2_fma && f.f16c && hd.is_multiple_of(8) {
            // SAFETY: features checked above; bounds asserted above.
            unsafe { x86::attend_group_avx2(q, hd, k, v, stride, n, scale, softcap, scores, out) };
            return;
        }
    }
    attend_group_scalar(q, hd, k, v, stride, n, scale, softcap, scores, out);
}

/// [`attend_group`] one head at a time through the single-row ops.
#[allow(clippy::too_many_arguments)]
pub fn attend_group_scalar(
    q: &[f32],
    hd: usize,
    k: &[f16],
    v: &[f16],
    stride: usize,
    n: usize,
    scale: f32,
    softcap: Option<f32>,
    scores: &mut [f32],
    out: &mut [f32],
) {
    for (i, qi) in q.chunks_exact(hd).enumerate() {
        let sc = &mut scores[i * n..(i + 1) * n];
        for (j, s) in sc.iter_mut().enumerate() {
            *s = dot_f16(qi, &k[j * stride..j * stride + hd]) * scale;
        }
        finish_scores(sc, softcap);
        let o = &mut out[i * hd..(i + 1) * hd];
        o.fill(0.0);
        for (j, &w) in sc.iter().enumerate() {
            axpy_f16(o, w, &v[j * stride..j * stride + hd]);
        }
    }
}

/// Softcap (if any) and softmax of one head's scores.
fn finish_scores(sc: &mut [f32], softcap: Option<f32>) {
    if let Some(cap) = softcap {
        for v in sc.iter_mut() {
            *v = cap * (*v / cap).tanh();
        }
    }
    super::softmax_inplace(sc);
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

    /// See [`super::attend_group`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_group_avx2(
        q: &[f32],
        hd: usize,
        k: &[f16],
        v: &[f16],
        stride: usize,
        n: usize,
        scale: f32,
        softcap: Option<f32>,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let g = q.len() / hd;
        match g {
            1 => qk::<1>(q, hd, k, stride, n, scale, scores),
            2 => qk::<2>(q, hd, k, stride, n, scale, scores),
            _ => qk::<3>(q, hd, k, stride, n, scale, scores),
        }
        for i in 0..g {
            super::finish_scores(&mut scores[i * n..(i + 1) * n], softcap);
        }
        // Values in column chunks of up to `w` vectors, every head's accumulators in registers.
        let w = if g == 3 { 3 } else { 4 };
        let mut c = 0;
        while c < hd {
            let nv = ((hd - c) / 8).min(w);
            macro_rules! go {
                ($($g:literal, $w:literal);*) => {
                    match (g, nv) {
                        $(($g, $w) => pv::<$g, $w>(v, c, stride, n, hd, scores, out),)*
                        _ => unreachable!("g <= 3, nv <= 4"),
                    }
                };
            }
            go!(1, 1; 1, 2; 1, 3; 1, 4; 2, 1; 2, 2; 2, 3; 2, 4; 3, 1; 3, 2; 3, 3);
            c += nv * 8;
        }
    }

    // Register arrays indexed by head and column: index loops read best.
    /// `scores[i * n + j] = scale * q_i . k_j` for `G` heads, each key row converted once; the
    /// sums as [`dot_f16_avx2`] makes them.
    #[inline]
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn qk<const G: usize>(
        q: &[f32],
        hd: usize,
        k: &[f16],
        stride: usize,
        n: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let qp = q.as_ptr();
        for j in 0..n {
            let kp = k.as_ptr().add(j * stride);
            let mut acc0 = [_mm256_setzero_ps(); G];
            let mut acc1 = [_mm256_setzero_ps(); G];
            let mut c = 0;
            while c + 16 <= hd {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(c) as *const __m128i));
                let k1 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(c + 8) as *const __m128i));
                for i in 0..G {
                    let qi = qp.add(i * hd + c);
                    acc0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(qi), k0, acc0[i]);
                    acc1[i] = _mm256_fmadd_ps(_mm256_loadu_ps(qi.add(8)), k1, acc1[i]);
                }
                c += 16;
            }
            if c + 8 <= hd {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(c) as *const __m128i));
                for i in 0..G {
                    let qi = qp.add(i * hd + c);
                    acc0[i] = _mm256_fmadd_ps(_mm256_loadu_ps(qi), k0, acc0[i]);
                }
            }
            for i in 0..G {
                *scores.get_unchecked_mut(i * n + j) =
                    hsum(_mm256_add_ps(acc0[i], acc1[i])) * scale;
            }
        }
    }

    /// `out[i][c..c + 8W] = sum_j p_ij v_j[c..c + 8W]` for `G` heads, each value chunk
    /// converted once; the sums in [`axpy_f16_avx2`]'s order.
    #[inline]
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pv<const G: usize, const W: usize>(
        v: &[f16],
        c: usize,
        stride: usize,
        n: usize,
        hd: usize,
        scores: &[f32],
        out: &mut [f32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); W]; G];
        for j in 0..n {
            let vp = v.as_ptr().add(j * stride + c);
            let mut x = [_mm256_setzero_ps(); W];
            for (w, xw) in x.iter_mut().enumerate() {
                *xw = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(w * 8) as *const __m128i));
            }
            for i in 0..G {
                let p = _mm256_set1_ps(*scores.get_unchecked(i * n + j));
                for w in 0..W {
                    acc[i][w] = _mm256_fmadd_ps(p, x[w], acc[i][w]);
                }
            }
        }
        for i in 0..G {
            for w in 0..W {
                _mm256_storeu_ps(out.as_mut_ptr().add(i * hd + c + w * 8), acc[i][w]);
            }
        }
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
