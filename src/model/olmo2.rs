//! `olmo2`: OLMo 2 (and OLMo 3, which adds sliding windows on three of four layers). No norm
//! before attention or the feed-forward: q, k and v are projected from the residual stream
//! itself; q and k are RMS-normed over their whole width (not per head) before rope; each
//! branch's output is RMS-normed before it is added. NeoX rope, SwiGLU.
//!
//! ```text
//! x  = embd[tok]
//! q  = rmsnorm(Wq·x) * q_norm,  k = rmsnorm(Wk·x) * k_norm       (over n_head*hd, n_head_kv*hd)
//! x += rmsnorm(Wo · attn(rope_neox(q), rope_neox(k), Wv·x)) * post_attention_norm
//! x += rmsnorm(Wdown · (silu(Wgate·x) * Wup·x)) * post_ffw_norm
//! logits = Wout · (rmsnorm(x) * output_norm)
//! ```

use super::{norm, Batch, Model, RowPatches, Scratch};
use crate::model::Proj;
use lethe_kernels::ops;

/// The blocks over the batch `b`, whose rows are in `st` (`st.x`: `[n, n_embd]`).
pub(super) fn blocks(m: &Model, st: &mut Scratch, b: &mut Batch) {
    let n = b.n();
    let (e, ff) = (m.cfg.n_embd, m.cfg.n_ff);
    let ps = b.patches();
    let ps = RowPatches::of(&ps);
    for il in b.layers.clone() {
        let l = &m.layers[il];
        b.tap(il, st);
        // The matmuls read xb: here the residual stream itself, not a norm of it.
        st.xb[..n * e].copy_from_slice(&st.x[..n * e]);
        // xb2 [n, e] = Wo attn(...), q and k normed over each row's whole width
        b.attention(m, ps, il, st);
        norm(&l.post_attn_norm).rows_inplace(&mut st.xb2[..n * e]);
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);

        st.xb[..n * e].copy_from_slice(&st.x[..n * e]);
        // gate, up [n, n_ff]
        st.mm(m, ps, il, &[Proj::Gate, Proj::Up], n);
        ops::silu_mul(&mut st.hg[..n * ff], &st.hu[..n * ff]);
        st.mm(m, ps, il, &[Proj::Down], n); // xb2 [n, e] = Wdown hg
        norm(&l.post_ffn_norm).rows_inplace(&mut st.xb2[..n * e]);
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);
        st.add_cvec(ps, il, n);
    }
}
