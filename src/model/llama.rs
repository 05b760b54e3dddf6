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
use super::weights::matmul;
use super::{Model, State};
use lethe_kernels::ops;

pub(super) fn blocks(m: &Model, st: &mut State, n: usize) {
    let c = &m.cfg;
    let (e, qd, kvd, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
    let (pool, f, p) = (&*m.pool, &*m.file, m.precision);
    let pos0 = st.pos;
    let shape = AttnShape {
        n_head: c.n_head,
        n_head_kv: c.n_head_kv,
        head_dim: hd,
        scale: c.attn_scale,
        window: None,
    };
    for (il, l) in m.layers.iter().enumerate() {
        for t in 0..n {
            ops::rmsnorm(
                &mut st.xb[t * e..(t + 1) * e],
                &st.x[t * e..(t + 1) * e],
                &l.attn_norm,
                c.rms_eps,
            );
        }
        matmul(pool, f, &l.wq, &st.xb, n, &mut st.q, &mut st.act, p); // [n, qd]
        matmul(pool, f, &l.wk, &st.xb, n, &mut st.k, &mut st.act, p); // [n, kvd]
        matmul(pool, f, &l.wv, &st.xb, n, &mut st.v, &mut st.act, p); // [n, kvd]
        for t in 0..n {
            m.rope_global.fill(pos0 + t, &mut st.rope_cs);
            let kind = m.rope_global.kind;
            ops::rope_inplace(
                kind,
                &mut st.q[t * qd..(t + 1) * qd],
                hd,
                c.n_rot,
                &st.rope_cs,
            );
            ops::rope_inplace(
                kind,
                &mut st.k[t * kvd..(t + 1) * kvd],
                hd,
                c.n_rot,
                &st.rope_cs,
            );
            st.kv.store(
                il,
                pos0 + t,
                &st.k[t * kvd..(t + 1) * kvd],
                &st.v[t * kvd..(t + 1) * kvd],
            );
        }
        attend(
            pool,
            &st.kv,
            il,
            &shape,
            &st.q,
            n,
            pos0,
            &mut st.att,
            &mut st.scores,
        );
        matmul(pool, f, &l.wo, &st.att, n, &mut st.xb2, &mut st.act, p); // [n, e]
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);

        for t in 0..n {
            ops::rmsnorm(
                &mut st.xb[t * e..(t + 1) * e],
                &st.x[t * e..(t + 1) * e],
                &l.ffn_norm,
                c.rms_eps,
            );
        }
        matmul(pool, f, &l.w_gate, &st.xb, n, &mut st.hg, &mut st.act, p); // [n, n_ff]
        matmul(pool, f, &l.w_up, &st.xb, n, &mut st.hu, &mut st.act, p); // [n, n_ff]
        ops::silu_mul(&mut st.hg[..n * c.n_ff], &st.hu[..n * c.n_ff]);
        matmul(pool, f, &l.w_down, &st.hg, n, &mut st.xb2, &mut st.act, p); // [n, e]
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);
    }
}
