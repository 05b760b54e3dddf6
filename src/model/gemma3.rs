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
//!
//! gemma2 runs this block too, without the q/k norms and with its attention softcap. The
//! embeddings' scale is applied where they are looked up (`Config::embd_scale`).

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
        norm(&l.attn_norm).rows(&mut st.xb, &st.x, n);
        // xb2 [n, e] = Wo attn(...): q/k norms, window and softcap as the layer has them
        b.attention(m, ps, il, st);
        norm(&l.post_attn_norm).rows_inplace(&mut st.xb2[..n * e]);
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);

        norm(&l.ffn_norm).rows(&mut st.xb, &st.x, n);
        // gate, up [n, n_ff]
        st.mm(m, ps, il, &[Proj::Gate, Proj::Up], n);
        ops::gelu_tanh_mul(&mut st.hg[..n * ff], &st.hu[..n * ff]);
        st.mm(m, ps, il, &[Proj::Down], n); // xb2 [n, e] = Wdown hg
        norm(&l.post_ffn_norm).rows_inplace(&mut st.xb2[..n * e]);
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);
        st.add_cvec(ps, il, n);
    }
}
