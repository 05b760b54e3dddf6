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
use super::weights::{matmul, matmul_group};
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
        // q [n, qd], k [n, kvd], v [n, kvd]
        let qkv = &mut [
            (&l.wq, &mut st.q[..]),
            (&l.wk, &mut st.k[..]),
            (&l.wv, &mut st.v[..]),
        ];
        matmul_group(pool, f, qkv, &st.xb, n, &mut st.act, p);
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
        // gate, up [n, n_ff]
        let gate_up = &mut [(&l.w_gate, &mut st.hg[..]), (&l.w_up, &mut st.hu[..])];
        matmul_group(pool, f, gate_up, &st.xb, n, &mut st.act, p);
        ops::silu_mul(&mut st.hg[..n * c.n_ff], &st.hu[..n * c.n_ff]);
        matmul(pool, f, &l.w_down, &st.hg, n, &mut st.xb2, &mut st.act, p); // [n, e]
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);
    }
}
