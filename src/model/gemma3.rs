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

use super::attention::{attend, AttnShape};
use super::weights::{matmul, matmul_group};
use super::{Model, State};
use lethe_kernels::ops;

pub(super) fn blocks(m: &Model, st: &mut State, n: usize) {
    let c = &m.cfg;
    let (e, qd, kvd, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
    let (pool, f, p) = (&*m.pool, &*m.file, m.precision);
    let pos0 = st.pos;
    ops::scale_inplace(&mut st.x[..n * e], (e as f32).sqrt());
    for (il, l) in m.layers.iter().enumerate() {
        let local = c.is_local_layer(il);
        let rope = if local { &m.rope_local } else { &m.rope_global };
        let shape = AttnShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: hd,
            scale: c.attn_scale,
            window: if local { c.sliding_window } else { None },
        };
        let (q_norm, k_norm) = (
            l.q_norm.as_deref().unwrap_or(&[]),
            l.k_norm.as_deref().unwrap_or(&[]),
        );

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
            for head in st.q[t * qd..(t + 1) * qd].chunks_exact_mut(hd) {
                ops::rmsnorm_inplace(head, q_norm, c.rms_eps);
            }
            for head in st.k[t * kvd..(t + 1) * kvd].chunks_exact_mut(hd) {
                ops::rmsnorm_inplace(head, k_norm, c.rms_eps);
            }
            rope.fill(pos0 + t, &mut st.rope_cs);
            ops::rope_inplace(
                rope.kind,
                &mut st.q[t * qd..(t + 1) * qd],
                hd,
                c.n_rot,
                &st.rope_cs,
            );
            ops::rope_inplace(
                rope.kind,
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
        let post = l.post_attn_norm.as_deref().unwrap_or(&[]);
        for t in 0..n {
            ops::rmsnorm_inplace(&mut st.xb2[t * e..(t + 1) * e], post, c.rms_eps);
        }
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
        ops::gelu_tanh_mul(&mut st.hg[..n * c.n_ff], &st.hu[..n * c.n_ff]);
        matmul(pool, f, &l.w_down, &st.hg, n, &mut st.xb2, &mut st.act, p); // [n, e]
        let post = l.post_ffn_norm.as_deref().unwrap_or(&[]);
        for t in 0..n {
            ops::rmsnorm_inplace(&mut st.xb2[t * e..(t + 1) * e], post, c.rms_eps);
        }
        ops::add_inplace(&mut st.x[..n * e], &st.xb2[..n * e]);
    }
}
