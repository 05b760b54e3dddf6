//! `llama`: SmolLM2, Llama 2/3, Mistral, TinyLlama. Pre-norm blocks, GQA attention with rotary
//! embeddings (adjacent-pair layout), SwiGLU feed-forward.
//!
//! ```text
//! x  = embd[tok]
//! x += Wo · attn(rope(Wq·n), rope(Wk·n), Wv·n)     n = rmsnorm(x) * attn_norm
//! x += Wdown · (silu(Wgate·n) * Wup·n)              n = rmsnorm(x) * ffn_norm
//! logits = Wout · (rmsnorm(x) * output_norm)
//! ```

use super::attention::AttnShape;
use super::{norm_rows, Batch, Model, Scratch};
use crate::model::Proj;
use lethe_kernels::ops;

/// The blocks over the batch `b`, whose rows are in `st` (`st.x`: `[n, n_embd]`).
pub(super) fn blocks(m: &Model, st: &mut Scratch, b: &mut Batch) {
    let n = b.n();
    let c = &m.cfg;
    let (e, ff) = (c.n_embd, c.n_ff);
    let pool = &*m.pool;
    let ps = b.patches();
    let ps = ps.as_deref();
    let shape = AttnShape {
        n_head: c.n_head,
        n_head_kv: c.n_head_kv,
        head_dim: c.head_dim,
        scale: c.attn_scale,
        window: None,
    };
    for (il, l) in m.layers.iter().enumerate() {
        b.tap(il, st);
        norm_rows(&mut st.xb, &st.x, &l.attn_norm, n, c.rms_eps);
        // q [n, n_head*hd], k and v [n, n_head_kv*hd]
        st.mm(m, ps, il, &[Proj::Q, Proj::K, Proj::V], n);
        b.rope_and_cache(c, &m.rope_global, il, st);
        b.attend(pool, il, &shape, st); // att [n, n_head*hd], each row over its own cache
        st.mm(m, ps, il, &[Proj::O], n); // xb2 [n, e] = Wo att
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);

        norm_rows(&mut st.xb, &st.x, &l.ffn_norm, n, c.rms_eps);
        // gate, up [n, n_ff]
        st.mm(m, ps, il, &[Proj::Gate, Proj::Up], n);
        ops::silu_mul(&mut st.hg[..n * ff], &st.hu[..n * ff]);
        st.mm(m, ps, il, &[Proj::Down], n); // xb2 [n, e] = Wdown hg
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);
        st.add_cvec(ps, il, n);
    }
}
