//! `phi2`: Phi-1, Phi-1.5, Phi-2. One LayerNorm (with bias) per block feeds attention and the
//! feed-forward in parallel; biases on every matrix; rotary embeddings in the NeoX layout
//! over only the first `rope.dimension_count` dims of each head (32 of 64 in Phi-1.5, 32 of
//! 80 in Phi-2); an ungated GELU (tanh) feed-forward; a LayerNorm and a biased head at the end.
//!
//! ```text
//! x  = embd[tok]
//! n  = layernorm(x) * attn_norm + attn_norm_b
//! a  = Wo · attn(rope_neox_partial(Wq·n + bq), rope_neox_partial(Wk·n + bk), Wv·n + bv) + bo
//! f  = Wdown · gelu(Wup·n + bup) + bdown
//! x += a + f
//! logits = Wout · (layernorm(x) * output_norm + output_norm_b) + bout
//! ```
//!
//! Older files fuse q, k and v in `attn_qkv` (read as views, as phi3's).

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
        // xb [n, e]: the one norm both branches read
        norm(&l.attn_norm).rows(&mut st.xb, &st.x, n);
        // xb2 [n, e] = Wo attn(...) + bo: biased q/k/v, rope on the first n_rot dims of a head
        b.attention(m, ps, il, st);
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);

        // The feed-forward reads the same normed input, still in xb.
        st.mm(m, ps, il, &[Proj::Up], n); // hu [n, n_ff] = Wup xb + bup
        st.hg[..n * ff].copy_from_slice(&st.hu[..n * ff]);
        ops::gelu_tanh_inplace(&mut st.hg[..n * ff]);
        st.mm(m, ps, il, &[Proj::Down], n); // xb2 [n, e] = Wdown hg + bdown
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);
        st.add_cvec(ps, il, n);
    }
}
