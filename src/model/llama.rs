//! `llama`: SmolLM2, Llama 2/3, Mistral, TinyLlama. Pre-norm blocks, GQA attention with rotary
//! embeddings (adjacent-pair layout), SwiGLU feed-forward.
//!
//! ```text
//! x  = embd[tok]
//! x += Wo · attn(rope(Wq·n), rope(Wk·n), Wv·n)     n = rmsnorm(x) * attn_norm
//! x += Wdown · (silu(Wgate·n) * Wup·n)              n = rmsnorm(x) * ffn_norm
//! logits = Wout · (rmsnorm(x) * output_norm)
//! ```
//!
//! qwen2, qwen3 and phi3 run this block too: what sets them apart is read at load (biases on
//! the weights, fused tensors as views, the NeoX rope layout) or is the one optional step
//! here (qwen3's per-head q/k norms); their files say so.

use super::attention::AttnShape;
use super::{norm, Batch, Model, Scratch};
use crate::model::Proj;
use lethe_kernels::ops;

/// The blocks over the batch `b`, whose rows are in `st` (`st.x`: `[n, n_embd]`).
pub(super) fn blocks(m: &Model, st: &mut Scratch, b: &mut Batch) {
    let n = b.n();
    let c = &m.cfg;
    let (e, ff) = (c.n_embd, c.n_ff);
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    let pool = &*m.pool;
    let ps = b.patches();
    let ps = ps.as_deref();
    for (il, l) in m.layers.iter().enumerate() {
        b.tap(il, st);
        let shape = AttnShape::of_layer(c, il);
        norm(&l.attn_norm).rows(&mut st.xb, &st.x, n);
        // q [n, n_head*hd], k and v [n, n_head_kv*hd] (+ biases: qwen2)
        st.mm(m, ps, il, &[Proj::Q, Proj::K, Proj::V], n);
        if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
            // qwen3: each head's q and k RMS-normed, before rope
            qn.rows_inplace(&mut st.q[..n * qd]);
            kn.rows_inplace(&mut st.k[..n * kvd]);
        }
        b.rope_and_cache(m, il, st);
        b.attend(pool, il, &shape, st); // att [n, n_head*hd], each row over its own cache
        st.mm(m, ps, il, &[Proj::O], n); // xb2 [n, e] = Wo att
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);

        norm(&l.ffn_norm).rows(&mut st.xb, &st.x, n);
        // gate, up [n, n_ff]
        st.mm(m, ps, il, &[Proj::Gate, Proj::Up], n);
        ops::silu_mul(&mut st.hg[..n * ff], &st.hu[..n * ff]);
        st.mm(m, ps, il, &[Proj::Down], n); // xb2 [n, e] = Wdown hg
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);
        st.add_cvec(ps, il, n);
    }
}
