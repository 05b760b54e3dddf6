//! Causal multi-head self-attention with grouped key/value heads over one sequence, forward
//! and backward. The softmax probabilities are kept (lower triangle only) for the backward
//! pass.
//!
//! ```text
//! s[t, j] = scale * q[t, h] · k[j, h / group]     j <= t
//! p[t]    = softmax(s[t])
//! o[t, h] = sum_j p[t, j] v[j, h / group]
//! ```

use super::kern::{axpy, dot};
use crate::pool::{SharedMut, ThreadPool};

/// The head layout of one attention.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Factor of the scores (`1 / sqrt(head_dim)`).
    pub scale: f32,
}

impl Heads {
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Floats of the kept probabilities of `n` tokens: `[n_head, n (n + 1) / 2]`.
    pub fn probs_len(&self, n: usize) -> usize {
        self.n_head * tri(n)
    }
}

/// Entries of an `n x n` lower triangle with its diagonal; row `t` starts at `tri(t)`.
#[inline]
fn tri(n: usize) -> usize {
    n * (n + 1) / 2
}

/// Forward: `q` `[n, n_head*hd]`, `k`, `v` `[n, n_head_kv*hd]` (already rotated) give `out`
/// `[n, n_head*hd]` (overwritten) and `probs` `[n_head, n (n + 1) / 2]` (row `t` of head `h`
/// at `h * tri(n) + tri(t)`, `t + 1` values). One job per (head, token).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    pool: &ThreadPool,
    s: &Heads,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    probs: &mut [f32],
    out: &mut [f32],
) {
    let (hd, qd, kvd) = (s.head_dim, s.q_dim(), s.kv_dim());
    let group = s.n_head / s.n_head_kv;
    let (pp, op) = (SharedMut::new(&mut *probs), SharedMut::new(&mut *out));
    pool.for_chunks(s.n_head * n, 8, |_, jobs| {
        for job in jobs {
            let (h, t) = (job / n, job % n);
            let kh = h / group;
            let qt = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
            // SAFETY: row t of head h of the probabilities and of the output is this job's.
            let p = unsafe { pp.slice(h * tri(n) + tri(t), t + 1) }; // [t + 1]
            for (j, pj) in p.iter_mut().enumerate() {
                *pj = s.scale * dot(qt, &k[j * kvd + kh * hd..j * kvd + (kh + 1) * hd]);
            }
            lethe_kernels::ops::softmax_inplace(p);
            let o = unsafe { op.slice(t * qd + h * hd, hd) }; // [hd]
            o.fill(0.0);
            for (j, &pj) in p.iter().enumerate() {
                axpy(o, pj, &v[j * kvd + kh * hd..j * kvd + (kh + 1) * hd]);
            }
        }
    });
}

/// Backward, given the forward's inputs, its `probs` and `dout` (`[n, n_head*hd]`): adds to
/// `dq` (`[n, n_head*hd]`), `dk` and `dv` (`[n, n_head_kv*hd]`). With `dp[j] = dout[t] · v[j]`
/// and `ds[j] = p[j] (dp[j] - sum_i p[i] dp[i])`: `dq[t] += scale sum_j ds[j] k[j]`,
/// `dk[j] += scale ds[j] q[t]`, `dv[j] += p[j] dout[t]`. One job per query head; the heads
/// of a group add their key and value gradients in their own scratch, summed at the end.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    pool: &ThreadPool,
    s: &Heads,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
    n: usize,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (hd, qd, kvd) = (s.head_dim, s.q_dim(), s.kv_dim());
    let group = s.n_head / s.n_head_kv;
    let mut dkv = vec![0f32; 2 * s.n_head * n * hd]; // [2, n_head, n, hd]: dk, dv per query head
    let (dqp, dkvp) = (SharedMut::new(&mut *dq), SharedMut::new(&mut dkv));
    pool.for_chunks(s.n_head, 1, |_, hs| {
        let mut dp = vec![0f32; n]; // [n]
        for h in hs {
            let kh = h / group;
            // SAFETY: head h's key and value gradients and its columns of dq are this job's.
            let dkh = unsafe { dkvp.slice(h * n * hd, n * hd) }; // [n, hd]
            let dvh = unsafe { dkvp.slice((s.n_head + h) * n * hd, n * hd) }; // [n, hd]
                                                                              // Token j's key or value of this head's group.
            fn kv(x: &[f32], j: usize, kvd: usize, kh: usize, hd: usize) -> &[f32] {
                &x[j * kvd + kh * hd..j * kvd + (kh + 1) * hd]
            }
            for t in 0..n {
                let p = &probs[h * tri(n) + tri(t)..h * tri(n) + tri(t) + t + 1]; // [t + 1]
                let dot_t = &dout[t * qd + h * hd..t * qd + (h + 1) * hd]; // [hd]
                let qt = &q[t * qd + h * hd..t * qd + (h + 1) * hd]; // [hd]
                let mut sum = 0f32;
                for (j, &pj) in p.iter().enumerate() {
                    dp[j] = dot(dot_t, kv(v, j, kvd, kh, hd));
                    sum += pj * dp[j];
                    axpy(&mut dvh[j * hd..(j + 1) * hd], pj, dot_t);
                }
                let dqt = unsafe { dqp.slice(t * qd + h * hd, hd) }; // [hd]
                for (j, &pj) in p.iter().enumerate() {
                    let ds = s.scale * pj * (dp[j] - sum);
                    if ds != 0.0 {
                        axpy(dqt, ds, kv(k, j, kvd, kh, hd));
                        axpy(&mut dkh[j * hd..(j + 1) * hd], ds, qt);
                    }
                }
            }
        }
    });
    for h in 0..s.n_head {
        let kh = h / group;
        for j in 0..n {
            let (src_k, src_v) = (
                &dkv[(h * n + j) * hd..(h * n + j + 1) * hd],
                &dkv[((s.n_head + h) * n + j) * hd..((s.n_head + h) * n + j + 1) * hd],
            );
            let o = j * kvd + kh * hd;
            for (d, &g) in dk[o..o + hd].iter_mut().zip(src_k) {
                *d += g;
            }
            for (d, &g) in dv[o..o + hd].iter_mut().zip(src_v) {
                *d += g;
            }
        }
    }
}
