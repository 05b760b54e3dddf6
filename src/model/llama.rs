//! `llama`: SmolLM2, Llama 2/3, Mistral, TinyLlama. Pre-norm blocks, GQA attention with rotary
//! embeddings (adjacent-pair layout), SwiGLU feed-forward.
//!
//! ```text
//! x  = embd[tok]
//! x += Wo · attn(rope(Wq·n), rope(Wk·n), Wv·n)     n = rmsnorm(x) * attn_norm
//! x += Wdown · (silu(Wgate·n) * Wup·n)              n = rmsnorm(x) * ffn_norm
//! logits = Wout · (rmsnorm(x) * output_norm)
//! ```

use super::attention::{attend, AttnShape};
use super::patch::Slot;
use super::weights::{matmul, matmul_group};
use super::{norm_rows, Model, State};
use lethe_kernels::ops;

pub(super) fn blocks(m: &Model, st: &mut State, n: usize) {
    let c = &m.cfg;
    let (e, ff) = (c.n_embd, c.n_ff);
    let (pool, f, p) = (&*m.pool, &*m.file, m.precision);
    let shape = AttnShape {
        n_head: c.n_head,
        n_head_kv: c.n_head_kv,
        head_dim: c.head_dim,
        scale: c.attn_scale,
        window: None,
    };
    for (il, l) in m.layers.iter().enumerate() {
        st.tap(il, n);
        norm_rows(&mut st.xb, &st.x, &l.attn_norm, n, c.rms_eps);
        // q [n, n_head*hd], k and v [n, n_head_kv*hd]
        let qkv = &mut [
            (&l.wq, &mut st.q[..]),
            (&l.wk, &mut st.k[..]),
            (&l.wv, &mut st.v[..]),
        ];
        matmul_group(pool, f, qkv, &st.xb, n, &mut st.act, p);
        st.patch_block(pool, p, il, &[Slot::Q, Slot::K, Slot::V], n);
        st.rope_and_cache(c, &m.rope_global, il, n);
        attend(
            pool,
            &st.kv,
            il,
            &shape,
            &st.q,
            n,
            st.pos,
            &mut st.att,
            &mut st.scores,
        );
        matmul(pool, f, &l.wo, &st.att, n, &mut st.xb2, &mut st.act, p); // [n, e]
        st.patch_block(pool, p, il, &[Slot::O], n);
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);

        norm_rows(&mut st.xb, &st.x, &l.ffn_norm, n, c.rms_eps);
        // gate, up [n, n_ff]
        let gate_up = &mut [(&l.w_gate, &mut st.hg[..]), (&l.w_up, &mut st.hu[..])];
        matmul_group(pool, f, gate_up, &st.xb, n, &mut st.act, p);
        st.patch_block(pool, p, il, &[Slot::Gate, Slot::Up], n);
        ops::silu_mul(&mut st.hg[..n * ff], &st.hu[..n * ff]);
        matmul(pool, f, &l.w_down, &st.hg, n, &mut st.xb2, &mut st.act, p); // [n, e]
        st.patch_block(pool, p, il, &[Slot::Down], n);
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);
        st.add_cvec(il, n);
    }
}
