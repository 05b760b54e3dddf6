//! A block's tensors from the file: separate or fused projections, biases, and the norms each
//! architecture has, checked against what it needs.

use super::config::{Arch, Config};
use super::norm::Norm;
use super::weights::{load_bias, load_biased, Weight};
use super::Layer;
use crate::gguf::GgufFile;
use crate::{Error, Result};

/// The norms and matrices an architecture's block must have (others are optional).
struct Needs {
    /// `attn_norm` (all but olmo2).
    attn_norm: bool,
    /// `ffn_norm` (all but phi2, whose feed-forward reads the attention's norm, and olmo2).
    ffn_norm: bool,
    /// A gated feed-forward (`ffn_gate`, or phi3's gate+up `ffn_up`); phi2's is not.
    gate: bool,
    /// `attn_q_norm` and `attn_k_norm`.
    qk_norm: bool,
    /// `post_attention_norm` and `post_ffw_norm`.
    post_norms: bool,
}

fn needs(arch: Arch) -> Needs {
    let n = Needs {
        attn_norm: true,
        ffn_norm: true,
        gate: true,
        qk_norm: false,
        post_norms: false,
    };
    match arch {
        Arch::Llama | Arch::Qwen2 | Arch::Phi3 => n,
        Arch::Qwen3 => Needs { qk_norm: true, ..n },
        Arch::Phi2 => Needs {
            ffn_norm: false,
            gate: false,
            ..n
        },
        Arch::Gemma2 => Needs {
            post_norms: true,
            ..n
        },
        Arch::Gemma3 => Needs {
            qk_norm: true,
            post_norms: true,
            ..n
        },
        Arch::Olmo2 => Needs {
            attn_norm: false,
            ffn_norm: false,
            qk_norm: true,
            post_norms: true,
            ..n
        },
    }
}

/// Block `i`'s tensors.
pub(super) fn load_layer(f: &GgufFile, c: &Config, i: usize) -> Result<Layer> {
    let (e, qd, kvd, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
    let name = |s: &str| format!("blk.{i}.{s}");
    let w = |s: &str| format!("blk.{i}.{s}.weight");
    let norm = |s: &str, n: usize| Norm::load_opt(f, &name(s), n, c.norm, c.norm_eps);
    let (wq, wk, wv) = qkv(f, c, i)?;
    let (w_gate, w_up) = gate_up(f, c, i)?;
    let qk = |s: &str, head: usize, whole: usize| -> Result<Option<Norm>> {
        // One head wide (qwen3, gemma3) or over the whole vector (olmo2).
        let t = f.tensor(&w(s));
        let n = match t.map(|t| t.n_elements() as usize) {
            Some(n) if n == whole => whole,
            _ => head,
        };
        norm(s, n)
    };
    let layer = Layer {
        attn_norm: norm("attn_norm", e)?,
        wq,
        wk,
        wv,
        wo: load_biased(f, &w("attn_output"), qd, e)?,
        q_norm: qk("attn_q_norm", c.head_dim, qd)?,
        k_norm: qk("attn_k_norm", c.head_dim, kvd)?,
        post_attn_norm: norm("post_attention_norm", e)?,
        ffn_norm: norm("ffn_norm", e)?,
        w_gate,
        w_up,
        w_down: load_biased(f, &w("ffn_down"), ff, e)?,
        post_ffn_norm: norm("post_ffw_norm", e)?,
    };
    let need = needs(c.arch);
    let missing = [
        (need.attn_norm && layer.attn_norm.is_none(), "attn_norm"),
        (need.ffn_norm && layer.ffn_norm.is_none(), "ffn_norm"),
        (need.gate && layer.w_gate.is_none(), "ffn_gate"),
        (need.qk_norm && layer.q_norm.is_none(), "attn_q_norm"),
        (need.qk_norm && layer.k_norm.is_none(), "attn_k_norm"),
        (
            need.post_norms && layer.post_attn_norm.is_none(),
            "post_attention_norm",
        ),
        (
            need.post_norms && layer.post_ffn_norm.is_none(),
            "post_ffw_norm",
        ),
    ];
    if let Some((_, what)) = missing.iter().find(|(m, _)| *m) {
        return Err(Error::Model(format!(
            "{} block {i} lacks its {what} tensor",
            c.arch.name()
        )));
    }
    if let Some(n) = &layer.q_norm {
        n.check_divides(&w("attn_q_norm"), qd)?;
    }
    if let Some(n) = &layer.k_norm {
        n.check_divides(&w("attn_k_norm"), kvd)?;
    }
    Ok(layer)
}

/// q, k and v: separate tensors, or views of the fused `attn_qkv` (phi3; older phi2 files),
/// each with its bias (separate, or its part of `attn_qkv.bias`).
fn qkv(f: &GgufFile, c: &Config, i: usize) -> Result<(Weight, Weight, Weight)> {
    let (e, qd, kvd) = (c.n_embd, c.q_dim(), c.kv_dim());
    let w = |s: &str| format!("blk.{i}.{s}.weight");
    let fused = w("attn_qkv");
    if f.tensor(&fused).is_none() {
        return Ok((
            load_biased(f, &w("attn_q"), e, qd)?,
            load_biased(f, &w("attn_k"), e, kvd)?,
            load_biased(f, &w("attn_v"), e, kvd)?,
        ));
    }
    let qkv = load_biased(f, &fused, e, qd + 2 * kvd)?;
    let (mut q, mut k, mut v) = (qkv.view(0, qd), qkv.view(qd, kvd), qkv.view(qd + kvd, kvd));
    if qkv.bias.is_none() {
        // Fused weights beside separate biases (some converted files).
        q.bias = load_bias(f, &w("attn_q"), qd)?;
        k.bias = load_bias(f, &w("attn_k"), kvd)?;
        v.bias = load_bias(f, &w("attn_v"), kvd)?;
    }
    Ok((q, k, v))
}

/// The feed-forward's gate and up projections: `ffn_gate` and `ffn_up`, or phi3's `ffn_up`
/// of twice the width whose first half is the gate; no gate for phi2.
fn gate_up(f: &GgufFile, c: &Config, i: usize) -> Result<(Option<Weight>, Weight)> {
    let (e, ff) = (c.n_embd, c.n_ff);
    let w = |s: &str| format!("blk.{i}.{s}.weight");
    if f.tensor(&w("ffn_gate")).is_some() {
        return Ok((
            Some(load_biased(f, &w("ffn_gate"), e, ff)?),
            load_biased(f, &w("ffn_up"), e, ff)?,
        ));
    }
    let up_rows = f.tensor(&w("ffn_up")).map(|t| t.n_rows() as usize);
    if needs(c.arch).gate && up_rows == Some(2 * ff) {
        let fused = load_biased(f, &w("ffn_up"), e, 2 * ff)?;
        return Ok((Some(fused.view(0, ff)), fused.view(ff, ff)));
    }
    Ok((None, load_biased(f, &w("ffn_up"), e, ff)?))
}
