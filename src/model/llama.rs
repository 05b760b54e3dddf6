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
//! the weights, fused tensors as views, the NeoX rope layout) or is an optional step of the
//! attention every block shares (`Batch::attention`: qwen3's per-head q/k norms); their files
//! say so.

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
        // xb2 [n, e] = Wo attn(...): biases (qwen2) and per-head q/k norms (qwen3) included
        b.attention(m, ps, il, st);
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
