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
/// `n_threads * GROUP_MAX * n_ctx` floats ([`scratch_len`]), `n_ctx` at least the longest
/// cache.
///
/// One job per row and block of query heads that share a KV head (up to
/// [`ops::GROUP_MAX`] of them, so each key and value is converted once per block; one head a
/// job when there are too few rows to keep the threads busy).
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
    let n_ctx = scores.len() / (pool.n_threads() * ops::GROUP_MAX);
    assert!(out.len() >= n_tok * qd);
    // Heads per job: a block of a KV group, or one when blocks leave threads idle.
    let per = group.min(ops::GROUP_MAX);
    let blocks_per_kv = group.div_ceil(per);
    let per = if n_tok * s.n_head_kv * blocks_per_kv >= 2 * pool.n_threads() {
        per
    } else {
        1
    };
    let blocks_per_kv = group.div_ceil(per);
    let n_jobs = n_tok * s.n_head_kv * blocks_per_kv;
    let (op, sp) = (SharedMut::new(out), SharedMut::new(scores));
    pool.for_chunks(n_jobs, 1, |ith, jobs| {
        // SAFETY: each thread owns its slice of the scratch and distinct (t, h) outputs.
        let sc = unsafe { sp.slice(ith * ops::GROUP_MAX * n_ctx, ops::GROUP_MAX * n_ctx) };
        for job in jobs {
            let t = job / (s.n_head_kv * blocks_per_kv);
            let r = job % (s.n_head_kv * blocks_per_kv);
            let (kh, b) = (r / blocks_per_kv, r % blocks_per_kv);
            // Query heads h0..h1, all of KV head kh.
            let h0 = kh * group + b * per;
            let h1 = (h0 + per).min((kh + 1) * group);
            let (kv, pos) = row(t);
            debug_assert!(kv.n_ctx <= n_ctx);
            let (kc, vc, kvd) = (kv.keys(il), kv.values(il), kv.kv_dim);
            let lo = match s.window {
                Some(w) => (pos + 1).saturating_sub(w),
                None => 0,
            };
            let n = pos + 1 - lo;
            let base = lo * kvd + kh * hd;
            let qh = &q[t * qd + h0 * hd..t * qd + h1 * hd];
            let o = unsafe { op.slice(t * qd + h0 * hd, (h1 - h0) * hd) };
            ops::attend_group(
                qh,
                hd,
                &kc[base..],
                &vc[base..],
                kvd,
                n,
                s.scale,
                s.softcap,
                sc,
                o,
            );
        }
    });
}

/// The length of [`attend`]'s `scores` scratch for `n_threads` threads and caches of up to
/// `n_ctx` tokens.
pub fn scratch_len(n_threads: usize, n_ctx: usize) -> usize {
    n_threads * ops::GROUP_MAX * n_ctx
}
