//! The inner loops of training: f32 dot products and axpys over rows.
//!
//! On x86-64 with AVX2 and FMA (checked at run time, as in `lethe-kernels`) the row kernels are
//! intrinsics; elsewhere plain loops over 8-lane arrays.

#[inline(always)]
fn dot4_body(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
    let n = x.len();
    let n8 = n / 8 * 8;
    let mut acc = [[0f32; 8]; 4];
    let mut i = 0;
    while i < n8 {
        let xs: &[f32; 8] = x[i..i + 8].try_into().unwrap();
        for (a, wr) in acc.iter_mut().zip(&w) {
            let ws: &[f32; 8] = wr[i..i + 8].try_into().unwrap();
            for l in 0..8 {
                a[l] += xs[l] * ws[l];
            }
        }
        i += 8;
    }
    let mut out = [0f32; 4];
    for (k, a) in acc.iter().enumerate() {
        let mut s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
        for j in n8..n {
            s += x[j] * w[k][j];
        }
        out[k] = s;
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Two input rows against four weight rows: eight independent sums.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot2x4(x: [&[f32]; 2], w: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let n = x[0].len();
        let n8 = n / 8 * 8;
        let (x0, x1) = (x[0].as_ptr(), x[1].as_ptr());
        let wp = [w[0].as_ptr(), w[1].as_ptr(), w[2].as_ptr(), w[3].as_ptr()];
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i < n8 {
            let a = _mm256_loadu_ps(x0.add(i));
            let b = _mm256_loadu_ps(x1.add(i));
            for k in 0..4 {
                let wv = _mm256_loadu_ps(wp[k].add(i));
                acc[k] = _mm256_fmadd_ps(a, wv, acc[k]);
                acc[4 + k] = _mm256_fmadd_ps(b, wv, acc[4 + k]);
            }
            i += 8;
        }
        let mut out = [[0f32; 4]; 2];
        for k in 0..4 {
            out[0][k] = hsum(acc[k]);
            out[1][k] = hsum(acc[4 + k]);
            for j in n8..n {
                out[0][k] += x[0][j] * w[k][j];
                out[1][k] += x[1][j] * w[k][j];
            }
        }
        out
    }

    /// `y += sum_k a[k] w[k * stride..][..y.len()]`: 64 (then 32, 8) outputs stay in registers
    /// over all the rows.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_rows(y: &mut [f32], a: &[f32], w: &[f32], stride: usize) {
        let n = y.len();
        let (yp, wp) = (y.as_mut_ptr(), w.as_ptr());
        let mut i = 0;
        // Eight independent sums hide the FMA latency.
        while i + 64 <= n {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (j, c) in acc.iter_mut().enumerate() {
                *c = _mm256_loadu_ps(yp.add(i + 8 * j));
            }
            for (k, &ak) in a.iter().enumerate() {
                let av = _mm256_set1_ps(ak);
                let r = wp.add(k * stride + i);
                for (j, c) in acc.iter_mut().enumerate() {
                    *c = _mm256_fmadd_ps(av, _mm256_loadu_ps(r.add(8 * j)), *c);
                }
            }
            for (j, c) in acc.iter().enumerate() {
                _mm256_storeu_ps(yp.add(i + 8 * j), *c);
            }
            i += 64;
        }
        while i + 32 <= n {
            let mut acc = [
                _mm256_loadu_ps(yp.add(i)),
                _mm256_loadu_ps(yp.add(i + 8)),
                _mm256_loadu_ps(yp.add(i + 16)),
                _mm256_loadu_ps(yp.add(i + 24)),
            ];
            for (k, &ak) in a.iter().enumerate() {
                let av = _mm256_set1_ps(ak);
                let r = wp.add(k * stride + i);
                for (j, c) in acc.iter_mut().enumerate() {
                    *c = _mm256_fmadd_ps(av, _mm256_loadu_ps(r.add(8 * j)), *c);
                }
            }
            for (j, c) in acc.iter().enumerate() {
                _mm256_storeu_ps(yp.add(i + 8 * j), *c);
            }
            i += 32;
        }
        while i + 8 <= n {
            let mut c = _mm256_loadu_ps(yp.add(i));
            for (k, &ak) in a.iter().enumerate() {
                c = _mm256_fmadd_ps(
                    _mm256_set1_ps(ak),
                    _mm256_loadu_ps(wp.add(k * stride + i)),
                    c,
                );
            }
            _mm256_storeu_ps(yp.add(i), c);
            i += 8;
        }
        for j in i..n {
            for (k, &ak) in a.iter().enumerate() {
                y[j] += ak * w[k * stride + j];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_2 {
    use std::arch::x86_64::*;

    /// `y0 += sum_k a0[k] w[k]`, `y1 += sum_k a1[k] w[k]` over the same rows of `w`: each
    /// loaded row feeds both outputs (32 outputs of each in registers at a time).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_rows2(
        y0: &mut [f32],
        y1: &mut [f32],
        a0: &[f32],
        a1: &[f32],
        w: &[f32],
        stride: usize,
    ) {
        let n = y0.len();
        let (p0, p1, wp) = (y0.as_mut_ptr(), y1.as_mut_ptr(), w.as_ptr());
        let mut i = 0;
        while i + 32 <= n {
            let mut c0 = [_mm256_setzero_ps(); 4];
            let mut c1 = [_mm256_setzero_ps(); 4];
            for j in 0..4 {
                c0[j] = _mm256_loadu_ps(p0.add(i + 8 * j));
                c1[j] = _mm256_loadu_ps(p1.add(i + 8 * j));
            }
            for k in 0..a0.len() {
                let (b0, b1) = (_mm256_set1_ps(a0[k]), _mm256_set1_ps(a1[k]));
                let r = wp.add(k * stride + i);
                for j in 0..4 {
                    let wv = _mm256_loadu_ps(r.add(8 * j));
                    c0[j] = _mm256_fmadd_ps(b0, wv, c0[j]);
                    c1[j] = _mm256_fmadd_ps(b1, wv, c1[j]);
                }
            }
            for j in 0..4 {
                _mm256_storeu_ps(p0.add(i + 8 * j), c0[j]);
                _mm256_storeu_ps(p1.add(i + 8 * j), c1[j]);
            }
            i += 32;
        }
        while i + 8 <= n {
            let (mut c0, mut c1) = (_mm256_loadu_ps(p0.add(i)), _mm256_loadu_ps(p1.add(i)));
            for k in 0..a0.len() {
                let wv = _mm256_loadu_ps(wp.add(k * stride + i));
                c0 = _mm256_fmadd_ps(_mm256_set1_ps(a0[k]), wv, c0);
                c1 = _mm256_fmadd_ps(_mm256_set1_ps(a1[k]), wv, c1);
            }
            _mm256_storeu_ps(p0.add(i), c0);
            _mm256_storeu_ps(p1.add(i), c1);
            i += 8;
        }
        for j in i..n {
            for k in 0..a0.len() {
                y0[j] += a0[k] * w[k * stride + j];
                y1[j] += a1[k] * w[k * stride + j];
            }
        }
    }
}

#[inline]
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        lethe_kernels::cpu::features().avx2_fma
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `[[x[i] · w[0], .., x[i] · w[3]] for i in 0..2]`, all of `x[0].len()` (the rows of `x`
/// have the same length).
#[inline]
pub(crate) fn dot2x4(x: [&[f32]; 2], w: [&[f32]; 4]) -> [[f32; 4]; 2] {
    debug_assert!(x[1].len() == x[0].len() && w.iter().all(|r| r.len() >= x[0].len()));
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; every row is at least as long as `x[0]`.
        return unsafe { x86::dot2x4(x, w) };
    }
    [dot4_body(x[0], w), dot4_body(x[1], w)]
}

/// `y += sum_k a[k] w[k * stride..][..y.len()]` (`w`: `a.len()` rows `stride` apart).
#[inline]
pub(crate) fn axpy_rows(y: &mut [f32], a: &[f32], w: &[f32], stride: usize) {
    if a.is_empty() {
        return;
    }
    assert!(w.len() >= (a.len() - 1) * stride + y.len());
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; the rows are inside `w` (checked above).
        return unsafe { x86::axpy_rows(y, a, w, stride) };
    }
    for (k, &ak) in a.iter().enumerate() {
        axpy(y, ak, &w[k * stride..k * stride + y.len()]);
    }
}

/// [`axpy_rows`] for two outputs over the same rows of `w` (`a0`, `a1`: one weight per row
/// each): `y0 += sum_k a0[k] w[k]`, `y1 += sum_k a1[k] w[k]`.
#[inline]
pub(crate) fn axpy_rows2(
    y0: &mut [f32],
    y1: &mut [f32],
    a0: &[f32],
    a1: &[f32],
    w: &[f32],
    stride: usize,
) {
    if a0.is_empty() {
        return;
    }
    assert!(y0.len() == y1.len() && a0.len() == a1.len());
    assert!(w.len() >= (a0.len() - 1) * stride + y0.len());
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; the rows are inside `w` (checked above).
        return unsafe { x86_2::axpy_rows2(y0, y1, a0, a1, w, stride) };
    }
    axpy_rows(y0, a0, w, stride);
    axpy_rows(y1, a1, w, stride);
}

/// `x · w`.
#[inline]
pub(crate) fn dot(x: &[f32], w: &[f32]) -> f32 {
    let mut s = 0f32;
    let n8 = x.len() / 8 * 8;
    let mut acc = [0f32; 8];
    for (xs, ws) in x[..n8].chunks_exact(8).zip(w[..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += xs[l] * ws[l];
        }
    }
    for j in n8..x.len() {
        s += x[j] * w[j];
    }
    s + ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `y += a x`.
#[inline]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot2x4_matches_f64() {
        for n in [1usize, 7, 8, 13, 64, 100] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<Vec<f32>> = (0..4)
                .map(|k| (0..n).map(|i| ((i + 3 * k) as f32 * 0.11).cos()).collect())
                .collect();
            let wr = [&w[0][..], &w[1][..], &w[2][..], &w[3][..]];
            let x2: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
            let pair = dot2x4([&x, &x2], wr);
            for k in 0..4 {
                let want: f64 = x
                    .iter()
                    .zip(&w[k])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                assert!((pair[0][k] as f64 - want).abs() < 1e-5, "n {n} k {k}");
                assert!((pair[1][k] as f64 - 2.0 * want).abs() < 2e-5);
                assert!((dot(&x, &w[k]) as f64 - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn axpy_rows_matches_f64() {
        for (n, m) in [(5usize, 3usize), (8, 1), (40, 16), (100, 7), (200, 16)] {
            let stride = n + 3;
            let w: Vec<f32> = (0..m * stride).map(|i| (i as f32 * 0.21).sin()).collect();
            let a: Vec<f32> = (0..m).map(|k| k as f32 * 0.5 - 1.0).collect();
            let mut y: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
            let y0 = y.clone();
            axpy_rows(&mut y, &a, &w, stride);
            for i in 0..n {
                let want: f64 = y0[i] as f64
                    + (0..m)
                        .map(|k| a[k] as f64 * w[k * stride + i] as f64)
                        .sum::<f64>();
                assert!((y[i] as f64 - want).abs() < 1e-5, "n {n} m {m} i {i}");
            }
        }
    }

    #[test]
    fn axpy_rows2_matches_f64() {
        for (n, m) in [
            (5usize, 3usize),
            (8, 1),
            (40, 16),
            (100, 7),
            (200, 16),
            (72, 16),
        ] {
            let stride = n + 3;
            let w: Vec<f32> = (0..m * stride).map(|i| (i as f32 * 0.21).sin()).collect();
            let a0: Vec<f32> = (0..m).map(|k| k as f32 * 0.5 - 1.0).collect();
            let a1: Vec<f32> = (0..m).map(|k| (k as f32 * 0.7).cos()).collect();
            let mut y0: Vec<f32> = (0..n).map(|i| i as f32 * 0.1).collect();
            let mut y1: Vec<f32> = (0..n).map(|i| 1.0 - i as f32 * 0.05).collect();
            let (z0, z1) = (y0.clone(), y1.clone());
            axpy_rows2(&mut y0, &mut y1, &a0, &a1, &w, stride);
            for i in 0..n {
                for (y, z, a) in [(&y0, &z0, &a0), (&y1, &z1, &a1)] {
                    let want: f64 = z[i] as f64
                        + (0..m)
                            .map(|k| a[k] as f64 * w[k * stride + i] as f64)
                            .sum::<f64>();
                    assert!((y[i] as f64 - want).abs() < 1e-5, "n {n} m {m} i {i}");
                }
            }
        }
    }
}
