//! Causal multi-head attention with GQA over the F16 cache, for a batch of new tokens.

use super::kv::KvCache;
use crate::pool::{SharedMut, ThreadPool};
use lethe_kernels::ops;

pub struct AttnShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Keys further back than this are masked (sliding-window layers).
    pub window: Option<usize>,
    /// Scores are squashed to `c * tanh(s / c)` before the softmax (gemma2).
    pub softcap: Option<f32>,
}

impl AttnShape {
    /// Layer `il`'s attention: the model's heads, scale and softcap, and its window if it is a
    /// sliding-window layer.
    pub fn of_layer(c: &crate::model::Config, il: usize) -> Self {
        AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            scale: c.attn_scale,
            window: c.sliding_window.filter(|_| c.is_local_layer(il)),
            softcap: c.attn_softcap,
        }
    }
}

/// `out[t, h*hd..]` = softmax(q_t,h · K / sqrt) V for the `n_tok` rows of `q` (`[n_tok,
/// n_head*hd]`), where `row(t)` names row `t`'s cache and position (its key and value, and
/// those before it, are already in that cache, layer `il`). `scores` is scratch of
/// `n_threads * n_ctx` floats, `n_ctx` at least the longest cache.
pub fn attend<'k>(
    pool: &ThreadPool,
    il: usize,
    s: &AttnShape,
    q: &[f32],
    row: &(dyn Fn(usize) -> (&'k KvCache, usize) + Sync),
    out: &mut [f32],
    scores: &mut [f32],
) {
    let hd = s.head_dim;
    let qd = s.n_head * hd;
    let n_tok = q.len() / qd;
    let group = s.n_head / s.n_head_kv;
    let n_ctx = scores.len() / pool.n_threads();
    assert!(out.len() >= n_tok * qd);
    let (op, sp) = (SharedMut::new(out), SharedMut::new(scores));
    pool.for_chunks(n_tok * s.n_head, 1, |ith, jobs| {
        // SAFETY: each thread owns its slice of the scratch and distinct (t, h) outputs.
        let sc = unsafe { sp.slice(ith * n_ctx, n_ctx) };
        for job in jobs {
            let (t, h) = (job / s.n_head, job % s.n_head);
            let (kv, pos) = row(t);
            debug_assert!(kv.n_ctx <= n_ctx);
            let (kc, vc, kvd) = (kv.keys(il), kv.values(il), kv.kv_dim);
            let lo = match s.window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let kh = h / group;
            let qh = &q[t * qd + h * hd..t * qd + (h + 1) * hd];
            let sc = &mut sc[..pos + 1 - lo];
            for (j, p) in (lo..=pos).enumerate() {
                let k = &kc[p * kvd + kh * hd..p * kvd + (kh + 1) * hd];
                sc[j] = ops::dot_f16(qh, k) * s.scale;
            }
            if let Some(cap) = s.softcap {
                for v in sc.iter_mut() {
                    *v = cap * (*v / cap).tanh();
                }
            }
            ops::softmax_inplace(sc);
            let o = unsafe { op.slice(t * qd + h * hd, hd) };
            o.fill(0.0);
            for (j, p) in (lo..=pos).enumerate() {
                let v = &vc[p * kvd + kh * hd..p * kvd + (kh + 1) * hd];
                ops::axpy_f16(o, sc[j], v);
            }
        }
    });
}
