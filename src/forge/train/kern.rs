//! The inner loops of training: f32 dot products and axpys over rows, and a parallel loop
//! over chunks of work on the model's pool.
//!
//! The bodies are plain loops over 8-lane arrays that the compiler vectorises; on x86-64 a copy
//! compiled for AVX2+FMA is chosen at run time, as in `lethe-kernels`.

use crate::pool::ThreadPool;
use std::sync::atomic::{AtomicUsize, Ordering};

/// `f(range)` for consecutive chunks of `0..n` of `chunk` items, claimed by the pool's threads
/// as they come (`f` gets the claiming thread's index too, for per-thread scratch).
pub(crate) fn par_chunks(
    pool: &ThreadPool,
    n: usize,
    chunk: usize,
    f: &(dyn Fn(usize, std::ops::Range<usize>) + Sync),
) {
    let chunk = chunk.max(1);
    if n <= chunk || pool.n_threads() == 1 {
        for r0 in (0..n).step_by(chunk) {
            f(0, r0..(r0 + chunk).min(n));
        }
        return;
    }
    let next = AtomicUsize::new(0);
    pool.run_dynamic(&|ith, _| loop {
        let r0 = next.fetch_add(chunk, Ordering::Relaxed);
        if r0 >= n {
            break;
        }
        f(ith, r0..(r0 + chunk).min(n));
    });
}

/// A raw pointer shared by the pool's threads for disjoint writes.
#[derive(Clone, Copy)]
pub(crate) struct Shared(pub *mut f32);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// `len` floats at `off`.
    ///
    /// # Safety
    /// The range must be inside the buffer and written by no other thread meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, off: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

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

#[inline(always)]
fn axpy4_body(y: &mut [f32], a: [f32; 4], w: [&[f32]; 4]) {
    let n = y.len();
    let n8 = n / 8 * 8;
    let mut i = 0;
    while i < n8 {
        let ys: &mut [f32; 8] = (&mut y[i..i + 8]).try_into().unwrap();
        let w0: &[f32; 8] = w[0][i..i + 8].try_into().unwrap();
        let w1: &[f32; 8] = w[1][i..i + 8].try_into().unwrap();
        let w2: &[f32; 8] = w[2][i..i + 8].try_into().unwrap();
        let w3: &[f32; 8] = w[3][i..i + 8].try_into().unwrap();
        for l in 0..8 {
            ys[l] += (a[0] * w0[l] + a[1] * w1[l]) + (a[2] * w2[l] + a[3] * w3[l]);
        }
        i += 8;
    }
    for j in n8..n {
        y[j] += (a[0] * w[0][j] + a[1] * w[1][j]) + (a[2] * w[2][j] + a[3] * w[3][j]);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
        super::dot4_body(x, w)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy4(y: &mut [f32], a: [f32; 4], w: [&[f32]; 4]) {
        super::axpy4_body(y, a, w)
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

/// `[x · w[0], .., x · w[3]]` (all of `x.len()`).
#[inline]
pub(crate) fn dot4(x: &[f32], w: [&[f32]; 4]) -> [f32; 4] {
    debug_assert!(w.iter().all(|r| r.len() >= x.len()));
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { x86::dot4(x, w) };
    }
    dot4_body(x, w)
}

/// `y += a[0] w[0] + .. + a[3] w[3]`.
#[inline]
pub(crate) fn axpy4(y: &mut [f32], a: [f32; 4], w: [&[f32]; 4]) {
    debug_assert!(w.iter().all(|r| r.len() >= y.len()));
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { x86::axpy4(y, a, w) };
    }
    axpy4_body(y, a, w)
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
    fn dot4_and_axpy4_match_scalar() {
        for n in [1usize, 7, 8, 13, 64, 100] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<Vec<f32>> = (0..4)
                .map(|k| (0..n).map(|i| ((i + 3 * k) as f32 * 0.11).cos()).collect())
                .collect();
            let wr = [&w[0][..], &w[1][..], &w[2][..], &w[3][..]];
            let got = dot4(&x, wr);
            for k in 0..4 {
                let want: f64 = x
                    .iter()
                    .zip(&w[k])
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                assert!((got[k] as f64 - want).abs() < 1e-5, "n {n} k {k}");
                assert!((dot(&x, &w[k]) as f64 - want).abs() < 1e-5);
            }
            let mut y = x.clone();
            let a = [0.5, -1.0, 2.0, 0.25];
            axpy4(&mut y, a, wr);
            for i in 0..n {
                let want = x[i] + (0..4).map(|k| a[k] * w[k][i]).sum::<f32>();
                assert!((y[i] - want).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn par_chunks_covers_once() {
        let pool = ThreadPool::new(2);
        let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        par_chunks(&pool, 1000, 7, &|_, r| {
            for i in r {
                hits[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }
}
