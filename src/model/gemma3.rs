//! `gemma3`: scaled embeddings, q/k RMSNorm per head, norms before and after both attention
//! and feed-forward, GeGLU (tanh) feed-forward, rotary embeddings in the NeoX layout, and
//! sliding-window attention on five of every six layers (rope base 10000 there; the global
//! layers use the file's base). Those two constants live in llama.cpp's code, not the file.
//!
//! ```text
//! x  = embd[tok] * sqrt(n_embd)
//! x += post_attn_norm(Wo · attn(rope(qnorm(Wq·n)), rope(knorm(Wk·n)), Wv·n))
//! x += post_ffn_norm(Wdown · (gelu(Wgate·n) * Wup·n))
//! logits = Wembd · (rmsnorm(x) * output_norm)
//! ```

use super::attention::AttnShape;
use super::{norm_rows, norm_rows_inplace, Batch, Model, Scratch};
use crate::model::Proj;
use lethe_kernels::ops;

/// An optional norm weight (gemma3's are checked present at load).
fn norm(w: &Option<Vec<f32>>) -> &[f32] {
    w.as_deref().unwrap_or(&[])
}

/// The blocks over the batch `b`, whose rows are in `st` (`st.x`: `[n, n_embd]`).
pub(super) fn blocks(m: &Model, st: &mut Scratch, b: &mut Batch) {
    let n = b.n();
    let c = &m.cfg;
    let (e, ff, eps) = (c.n_embd, c.n_ff, c.rms_eps);
    let pool = &*m.pool;
    let ps = b.patches();
    let ps = ps.as_deref();
    ops::scale_inplace(&mut st.x[..n * e], (e as f32).sqrt());
    for (il, l) in m.layers.iter().enumerate() {
        b.tap(il, st);
        let local = c.is_local_layer(il);
        let rope = if local { &m.rope_local } else { &m.rope_global };
        let shape = AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            scale: c.attn_scale,
            window: if local { c.sliding_window } else { None },
        };

        norm_rows(&mut st.xb, &st.x, &l.attn_norm, n, eps);
        // q [n, n_head*hd], k and v [n, n_head_kv*hd]
        st.mm(m, ps, il, &[Proj::Q, Proj::K, Proj::V], n);
        norm_rows_inplace(&mut st.q, norm(&l.q_norm), n * c.n_head, eps);
        norm_rows_inplace(&mut st.k, norm(&l.k_norm), n * c.n_head_kv, eps);
        b.rope_and_cache(c, rope, il, st);
        b.attend(pool, il, &shape, st); // att [n, n_head*hd], each row over its own cache
        st.mm(m, ps, il, &[Proj::O], n); // xb2 [n, e] = Wo att
        norm_rows_inplace(&mut st.xb2, norm(&l.post_attn_norm), n, eps);
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);

        norm_rows(&mut st.xb, &st.x, &l.ffn_norm, n, eps);
        // gate, up [n, n_ff]
        st.mm(m, ps, il, &[Proj::Gate, Proj::Up], n);
        ops::gelu_tanh_mul(&mut st.hg[..n * ff], &st.hu[..n * ff]);
        st.mm(m, ps, il, &[Proj::Down], n); // xb2 [n, e] = Wdown hg
        norm_rows_inplace(&mut st.xb2, norm(&l.post_ffn_norm), n, eps);
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);
        st.add_cvec(ps, il, n);
    }
}
