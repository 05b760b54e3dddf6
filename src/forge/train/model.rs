//! A model of llama's block (llama, qwen2, qwen3) as a function of its LoRA adapters: the
//! forward pass over one sequence keeping what the backward pass needs, and the backward pass
//! accumulating the adapters' gradients. The quantized weights stay frozen in the mmapped file.
//!
//! ```text
//! x  = embd[tok]                                          [n, e]
//! q, k, v = Wq·a + bq, Wk·a + bk, Wv·a + bv               a = rmsnorm(x) * attn_norm
//! q_h, k_h = rmsnorm(q_h) * q_norm, rmsnorm(k_h) * k_norm (qwen3: each head, before rope)
//! x += Wo · attn(rope(q), rope(k), v)                     [n, e]
//! x += Wdown · (silu(Wgate·b) * Wup·b)                    b = rmsnorm(x) * ffn_norm
//! logits = Wout · (rmsnorm(x) * output_norm)              [n, n_vocab]
//! ```
//!
//! with every adapted `W·` being `W· + (alpha / r) B A·`; a bias (qwen2's on q, k and v, or
//! any other matrix's a file has) is frozen and added after the adapted product, so the
//! gradients flow through it unchanged. Rope is the model's table (the engine's): it pairs
//! dimensions as the config says (adjacent pairs for llama, NeoX halves for qwen2 and qwen3)
//! over the first `n_rot` of each head; `q` is `n_head * head_dim` wide, which need not be
//! `n_embd` (qwen3).
//!
//! Kept per block: its input and the residual after attention (the norms' inputs), the norms'
//! `rstd`, the q/k norms' inputs and `rstd` (qwen3), rotated `q` and `k`, `v`, the attention
//! probabilities, the attention output, the gate and up projections, and each adapter's `A x`.
//! The normalised inputs and `silu(g) * u` are recomputed in the backward pass (cheap,
//! element-wise).
//!
//! Other architectures are refused ([`trainable`]), naming what the trainer lacks for them.

use super::attn::{attention_backward, attention_forward, Heads};
use super::linear::{linear_backward, linear_forward, lora_backward, lora_forward};
use super::lora::Lora;
use super::loss::Objective;
use super::ops::{
    rmsnorm_backward, rmsnorm_forward, rope_backward, rope_forward, swiglu_backward, swiglu_forward,
};
use crate::model::{norm, Arch, Model, NormKind, Proj};
use crate::pool::ThreadPool;
use crate::{Error, Result};

/// What the backward pass needs of one block.
struct BlockActs {
    x: Vec<f32>,         // [n, e] block input
    rstd_attn: Vec<f32>, // [n]
    q: Vec<f32>,         // [n, n_head*hd] rotated
    k: Vec<f32>,         // [n, n_head_kv*hd] rotated
    v: Vec<f32>,         // [n, n_head_kv*hd]
    probs: Vec<f32>,     // per sequence of length L: [n_head, L(L+1)/2]
    att: Vec<f32>,       // [n, n_head*hd] attention output (input of Wo)
    x_mid: Vec<f32>,     // [n, e] residual after attention
    rstd_ffn: Vec<f32>,  // [n]
    gate: Vec<f32>,      // [n, n_ff]
    up: Vec<f32>,        // [n, n_ff]
    /// The per-head q/k norms' inputs and `rstd` (qwen3).
    qk_norm: Option<QkNormActs>,
    /// `A x` of each adapted matrix, by slot.
    lora_u: [Option<Vec<f32>>; 7], // [n, r]
}

/// What the backward pass of the q/k norms needs: their inputs (the projections, biases
/// added) and `rstd` of every row the norm runs over (a head, or the whole vector).
struct QkNormActs {
    q: Vec<f32>,      // [n, n_head*hd] before the norm
    k: Vec<f32>,      // [n, n_head_kv*hd] before the norm
    rstd_q: Vec<f32>, // [n * n_head*hd / q_norm.len()]
    rstd_k: Vec<f32>, // [n * n_head_kv*hd / k_norm.len()]
}

/// Whether lethe can train `model`: an architecture whose block the trainer's forward and
/// backward passes compute (llama, qwen2, qwen3), in a file without a piece they lack. The
/// error names the architecture and what is missing, so no forward pass runs a formula other
/// than the model's.
pub fn trainable(model: &Model) -> Result<()> {
    let c = &model.cfg;
    let refuse = |what: String| {
        Err(Error::Model(format!(
            "training on {} is not supported: {what}; lethe trains llama, qwen2 and qwen3",
            c.arch.name()
        )))
    };
    let missing = match c.arch {
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => None,
        Arch::Phi3 => Some(
            "its fused attn_qkv and gate+up ffn_up tensors have no LoRA layout in lethe's \
             adapter files, and LongRoPE's tables (which change with the context length) are \
             not in lethe's trainer yet",
        ),
        Arch::Phi2 => Some(
            "its LayerNorm, parallel attention+FFN and ungated GELU have no backward pass in \
             lethe yet",
        ),
        Arch::Gemma2 => Some(
            "its scaled embedding, post-norms, attention and final-logit softcapping, \
             sliding-window attention and GeGLU have no backward pass in lethe yet",
        ),
        Arch::Gemma3 => Some(
            "its scaled embedding, post-norms, sliding-window attention (with a rope base of \
             its own) and GeGLU have no backward pass in lethe yet",
        ),
        Arch::Olmo2 => Some(
            "its post-norms in place of pre-norms and its q/k RMSNorm over the whole q and k \
             have no backward pass in lethe yet",
        ),
    };
    if let Some(what) = missing {
        return refuse(what.into());
    }
    // A file of a trained architecture with a piece of another one.
    if c.norm != NormKind::Rms {
        return refuse("its LayerNorm has no backward pass in lethe yet".into());
    }
    if c.attn_softcap.is_some() || c.final_logit_softcap.is_some() {
        return refuse("its softcapping has no backward pass in lethe yet".into());
    }
    if c.sliding_window.is_some() {
        return refuse("its sliding-window attention is not in lethe's trainer yet".into());
    }
    if model.rope_long.is_some() {
        return refuse("LongRoPE's long factors are not in lethe's trainer yet".into());
    }
    for (il, l) in model.layers.iter().enumerate() {
        if l.attn_norm.is_none() || l.ffn_norm.is_none() || l.w_gate.is_none() {
            return refuse(format!(
                "block {il} lacks a pre-norm or the feed-forward's gate"
            ));
        }
        if let Some(w) = Proj::ALL
            .into_iter()
            .filter_map(|p| l.weight(p))
            .find(|w| w.is_view(&model.file))
        {
            return refuse(format!(
                "{} is a fused tensor, which has no LoRA layout in lethe's adapter files",
                w.name
            ));
        }
    }
    Ok(())
}

/// Where a backward pass starts: the gradient of the logits, or of the hidden states after
/// the last block (a model without its head).
#[derive(Clone, Copy)]
enum Start<'a> {
    Logits(&'a [f32]),
    Hidden(&'a [f32]),
}

/// What [`TrainModel::backward_capture`] hands each matrix's input and output gradient to:
/// `(block, slot, x [n, cols], dy [n, rows])`.
pub type Capture<'a> = dyn FnMut(usize, Proj, &[f32], &[f32]) + 'a;

/// The forward pass of one sequence (or of several packed one after another, each attending
/// only to itself from position 0): the logits and what the backward pass needs. Valid for
/// the adapter values it was computed with.
pub struct Activations {
    /// Tokens in all.
    pub n: usize,
    /// The sequences' lengths, in order (their rows follow each other).
    pub segs: Vec<usize>,
    pub logits: Vec<f32>, // [n, n_vocab]
    blocks: Vec<BlockActs>,
    x_out: Vec<f32>,    // [n, e] residual after the last block
    rstd_out: Vec<f32>, // [n]
}

impl Activations {
    /// The residual stream after the last block that ran (`[n, n_embd]`, before the final
    /// norm).
    pub fn hidden(&self) -> &[f32] {
        &self.x_out
    }
}

/// A model with trainable LoRA adapters: the first `n_layers` blocks of `model`, then its
/// final norm and head (all blocks, or the ULD assistant's first K without writing it out).
pub struct TrainModel<'m> {
    pub model: &'m Model,
    pub lora: Lora,
    n_layers: usize,
    /// Whether the final norm and head run (not for a loss on hidden states: RMU).
    head: bool,
}

impl<'m> TrainModel<'m> {
    /// All of `model`'s blocks.
    pub fn new(model: &'m Model, lora: Lora) -> Result<Self> {
        Self::with_layers(model, lora, model.cfg.n_layer)
    }

    /// The first `n_layers` blocks of `model`, then its final norm and head.
    pub fn with_layers(model: &'m Model, lora: Lora, n_layers: usize) -> Result<Self> {
        let c = &model.cfg;
        trainable(model)?;
        if n_layers == 0 || n_layers > c.n_layer {
            return Err(Error::Invalid(format!(
                "{n_layers} blocks: the model has 1..={}",
                c.n_layer
            )));
        }
        for p in &lora.params {
            let t = p.target();
            if p.layer >= n_layers {
                return Err(Error::Invalid(format!(
                    "{}: an adapter on a block past the {n_layers} that run",
                    t.tensor_name()
                )));
            }
            if model.target_shape(t)? != (p.cols, p.rows)
                || p.a.len() != lora.rank * p.cols
                || p.b.len() != p.rows * lora.rank
            {
                return Err(Error::Invalid(format!(
                    "{}: the adapter's shape does not fit the model",
                    t.tensor_name()
                )));
            }
        }
        Ok(Self {
            model,
            lora,
            n_layers,
            head: true,
        })
    }

    /// The same blocks without the final norm and head: the forward pass ends at the
    /// residual stream after the last block ([`Activations::hidden`]; no logits), and the
    /// backward pass starts from its gradient ([`TrainModel::backward_hidden`]).
    pub fn without_head(mut self) -> Self {
        self.head = false;
        self
    }

    pub fn has_head(&self) -> bool {
        self.head
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    fn heads(&self) -> Heads {
        let c = &self.model.cfg;
        Heads {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            scale: c.attn_scale,
        }
    }

    /// `y = W x + b` of block `il`'s matrix `slot` with its adapter (`+ s B A x`), keeping the
    /// adapter's `A x`; the bias `b`, when the weight has one, is frozen.
    fn mm(
        &self,
        il: usize,
        slot: Proj,
        x: &[f32],
        n: usize,
        us: &mut [Option<Vec<f32>>; 7],
    ) -> Vec<f32> {
        let m = self.model;
        let w = m.layers[il]
            .weight(slot)
            .expect("checked when the LoRA was made");
        let mut y = vec![0f32; n * w.rows]; // [n, rows]
        linear_forward(&m.pool, &m.file, w, x, n, &mut y);
        w.add_bias(&mut y, n);
        if let Some(p) = self.lora.get(il, slot) {
            let r = self.lora.rank;
            let mut u = vec![0f32; n * r]; // [n, r]
            lora_forward(&m.pool, p, self.lora.scale(), x, n, &mut u, &mut y);
            us[slot as usize] = Some(u);
        }
        y
    }

    /// Run `tokens` (positions `0..n`) and keep what [`TrainModel::backward`] needs.
    pub fn forward(&self, tokens: &[u32]) -> Result<Activations> {
        self.forward_seqs(&[tokens])
    }

    /// Run several sequences in one pass, packed one after another: every matmul runs over
    /// all their rows at once (each weight row dequantized once for all), while rope and
    /// attention run per sequence from position 0, so each sequence's logits are those of
    /// [`TrainModel::forward`] on it alone (up to the order of float sums).
    pub fn forward_seqs(&self, seqs: &[&[u32]]) -> Result<Activations> {
        let m = self.model;
        let c = &m.cfg;
        let segs: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        let (n, e, nv) = (tokens.len(), c.n_embd, c.n_vocab);
        if n == 0 || segs.contains(&0) {
            return Err(Error::Invalid("forward needs at least one token".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= nv) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {nv}"
            )));
        }
        let (hs, pool) = (self.heads(), &*m.pool);
        let mut x = vec![0f32; n * e]; // [n, e]
        for (t, &tok) in tokens.iter().enumerate() {
            m.tok_embd
                .dequantize_row(&m.file, tok as usize, &mut x[t * e..(t + 1) * e]);
        }
        let mut blocks = Vec::with_capacity(self.n_layers);
        let mut xn = vec![0f32; n * e]; // [n, e] normalised input of a group of matmuls
        for (il, l) in m.layers[..self.n_layers].iter().enumerate() {
            let mut us: [Option<Vec<f32>>; 7] = Default::default();
            let mut rstd_attn = vec![0f32; n]; // [n]
            rmsnorm_forward(
                &x,
                &norm(&l.attn_norm).w,
                c.norm_eps,
                &mut xn,
                &mut rstd_attn,
            );
            let mut q = self.mm(il, Proj::Q, &xn, n, &mut us); // [n, n_head*hd]
            let mut k = self.mm(il, Proj::K, &xn, n, &mut us); // [n, n_head_kv*hd]
            let v = self.mm(il, Proj::V, &xn, n, &mut us); // [n, n_head_kv*hd]
            let qk_norm = match (&l.q_norm, &l.k_norm) {
                // qwen3: q and k RMS-normed per head (rows of the norm's width), before rope.
                (Some(qn), Some(kn)) => {
                    let mut rstd_q = vec![0f32; q.len() / qn.len()]; // [n * n_head]
                    let mut rstd_k = vec![0f32; k.len() / kn.len()]; // [n * n_head_kv]
                    let (q_in, k_in) = (q.clone(), k.clone());
                    rmsnorm_forward(&q_in, &qn.w, qn.eps, &mut q, &mut rstd_q);
                    rmsnorm_forward(&k_in, &kn.w, kn.eps, &mut k, &mut rstd_k);
                    Some(QkNormActs {
                        q: q_in,
                        k: k_in,
                        rstd_q,
                        rstd_k,
                    })
                }
                _ => None,
            };
            let mut probs = vec![0f32; segs.iter().map(|&l| hs.probs_len(l)).sum()];
            let mut att = vec![0f32; n * hs.q_dim()]; // [n, n_head*hd]
            let (qd, kvd) = (hs.q_dim(), hs.kv_dim());
            let (mut t0, mut p0) = (0, 0);
            for &len in &segs {
                let (t1, p1) = (t0 + len, p0 + hs.probs_len(len));
                let (qs, ks) = (&mut q[t0 * qd..t1 * qd], &mut k[t0 * kvd..t1 * kvd]);
                rope_forward(&m.rope_global, qs, len, c.head_dim, 0);
                rope_forward(&m.rope_global, ks, len, c.head_dim, 0);
                attention_forward(
                    pool,
                    &hs,
                    &q[t0 * qd..t1 * qd],
                    &k[t0 * kvd..t1 * kvd],
                    &v[t0 * kvd..t1 * kvd],
                    len,
                    &mut probs[p0..p1],
                    &mut att[t0 * qd..t1 * qd],
                );
                (t0, p0) = (t1, p1);
            }
            let o = self.mm(il, Proj::O, &att, n, &mut us); // [n, e]
            let mut x_mid = o;
            lethe_kernels::ops::add_inplace(&mut x_mid, &x); // [n, e]

            let mut rstd_ffn = vec![0f32; n]; // [n]
            rmsnorm_forward(
                &x_mid,
                &norm(&l.ffn_norm).w,
                c.norm_eps,
                &mut xn,
                &mut rstd_ffn,
            );
            let gate = self.mm(il, Proj::Gate, &xn, n, &mut us); // [n, n_ff]
            let up = self.mm(il, Proj::Up, &xn, n, &mut us); // [n, n_ff]
            let mut h = vec![0f32; n * c.n_ff]; // [n, n_ff]
            swiglu_forward(&gate, &up, &mut h);
            let mut out = self.mm(il, Proj::Down, &h, n, &mut us); // [n, e]
            lethe_kernels::ops::add_inplace(&mut out, &x_mid);
            let x_in = std::mem::replace(&mut x, out);
            blocks.push(BlockActs {
                x: x_in,
                rstd_attn,
                q,
                k,
                v,
                probs,
                att,
                x_mid,
                rstd_ffn,
                gate,
                up,
                qk_norm,
                lora_u: us,
            });
        }
        let mut rstd_out = vec![0f32; n]; // [n]
        let mut logits = Vec::new(); // [n, n_vocab] with the head
        if self.head {
            rmsnorm_forward(&x, &m.output_norm.w, c.norm_eps, &mut xn, &mut rstd_out);
            logits = vec![0f32; n * nv];
            linear_forward(pool, &m.file, &m.output, &xn, n, &mut logits);
            m.output.add_bias(&mut logits, n);
        }
        Ok(Activations {
            n,
            segs,
            logits,
            blocks,
            x_out: x,
            rstd_out,
        })
    }

    /// Add to the adapters' gradients those of `sum(dlogits * logits)`, for the forward pass
    /// `act` (`dlogits`: `[n, n_vocab]`, the loss's gradient with respect to the logits).
    pub fn backward(&mut self, act: &Activations, dlogits: &[f32]) -> Result<()> {
        self.backward_inner(act, Start::Logits(dlogits), None)
    }

    /// Add to the adapters' gradients those of `sum(dh * h)`, `h` the residual stream after
    /// the last block ([`Activations::hidden`]) of the forward pass `act` of a model without
    /// its head (`dh`: `[n, n_embd]`, the loss's gradient with respect to `h`).
    pub fn backward_hidden(&mut self, act: &Activations, dh: &[f32]) -> Result<()> {
        self.backward_inner(act, Start::Hidden(dh), None)
    }

    /// [`TrainModel::backward`], which also hands `capture` the input `x` (`[n, cols]`) and
    /// the output's gradient `dy` (`[n, rows]`) of every frozen matrix of blocks
    /// `from..n_layers`, as `capture(block, slot, x, dy)`: the gradient of the loss with
    /// respect to that weight is `dW = sum_t dy_t x_t^T` (`dy` includes the adapter's share of
    /// the output, so this is the gradient of the adapted matrix). The pass runs down to block
    /// `from` even where no adapter needs it.
    pub fn backward_capture(
        &mut self,
        act: &Activations,
        dlogits: &[f32],
        from: usize,
        capture: &mut Capture<'_>,
    ) -> Result<()> {
        if from >= self.n_layers {
            return Err(Error::Invalid(format!(
                "capture from block {from}: {} blocks run",
                self.n_layers
            )));
        }
        self.backward_inner(act, Start::Logits(dlogits), Some((from, capture)))
    }

    fn backward_inner(
        &mut self,
        act: &Activations,
        start: Start,
        mut cap: Option<(usize, &mut Capture<'_>)>,
    ) -> Result<()> {
        let m = self.model;
        let c = &m.cfg;
        let (n, e, ff) = (act.n, c.n_embd, c.n_ff);
        let (given, width, what) = match start {
            Start::Logits(d) => (d.len(), c.n_vocab, "logits"),
            Start::Hidden(d) => (d.len(), e, "hidden states"),
        };
        if given != n * width || act.blocks.len() != self.n_layers {
            return Err(Error::Invalid(format!(
                "backward: {given} gradients for {n} tokens of {width} {what}, or activations \
                 of another model"
            )));
        }
        if matches!(start, Start::Logits(_)) != self.head {
            return Err(Error::Invalid(format!(
                "backward from the {what} of a model {} its head",
                if self.head { "with" } else { "without" }
            )));
        }
        let cap_from = cap.as_ref().map(|c| c.0);
        let lowest = match (self.lora.lowest_layer(), cap_from) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => match a.or(b) {
                Some(l) => l,
                None => return Ok(()),
            },
        };
        // Hands (x, dy) of block `il`'s `slot` to the capture, if it covers the block.
        let mut take = |il: usize, slot: Proj, x: &[f32], dy: &[f32]| {
            if let Some((from, f)) = cap.as_mut() {
                if il >= *from {
                    f(il, slot, x, dy);
                }
            }
        };
        let (hs, pool) = (self.heads(), &*m.pool);
        let mut xn = vec![0f32; n * e]; // [n, e] a recomputed norm output
        let mut tmp = vec![0f32; n]; // [n] rstd, recomputed (equal to the kept one)

        // Head and final norm, or the gradient of the last block's output as given.
        let mut dxn = vec![0f32; n * e]; // [n, e]
        let mut dx = vec![0f32; n * e]; // [n, e] gradient of the residual stream
        match start {
            Start::Logits(dlogits) => {
                linear_backward(pool, &m.file, &m.output, dlogits, n, &mut dxn);
                rmsnorm_backward(&act.x_out, &m.output_norm.w, &act.rstd_out, &dxn, &mut dx);
            }
            Start::Hidden(dh) => dx.copy_from_slice(dh),
        }

        for il in (lowest..self.n_layers).rev() {
            let (l, b) = (&m.layers[il], &act.blocks[il]);
            let captured = cap_from.is_some_and(|f| il >= f);
            let has = |slot: Proj| captured || self.lora.get(il, slot).is_some();
            let need_in = il > lowest;
            let attn_needed = need_in || [Proj::Q, Proj::K, Proj::V, Proj::O].into_iter().any(has);

            // Feed-forward: dx is the gradient of the block's output.
            let mut h = vec![0f32; n * ff]; // [n, n_ff]
            swiglu_forward(&b.gate, &b.up, &mut h);
            let mut dh = vec![0f32; n * ff]; // [n, n_ff]
            linear_backward(pool, &m.file, &l.w_down, &dx, n, &mut dh);
            self.lora_bwd(act, il, Proj::Down, &h, &dx, Some(&mut dh));
            take(il, Proj::Down, &h, &dx);
            let (mut dg, mut du) = (vec![0f32; n * ff], vec![0f32; n * ff]); // [n, n_ff]
            swiglu_backward(&b.gate, &b.up, &dh, &mut dg, &mut du);
            rmsnorm_forward(
                &b.x_mid,
                &norm(&l.ffn_norm).w,
                c.norm_eps,
                &mut xn,
                &mut tmp,
            );
            take(il, Proj::Gate, &xn, &dg);
            take(il, Proj::Up, &xn, &du);
            if attn_needed {
                dxn.fill(0.0);
                linear_backward(
                    pool,
                    &m.file,
                    l.w_gate.as_ref().expect("llama has a gate"),
                    &dg,
                    n,
                    &mut dxn,
                );
                linear_backward(pool, &m.file, &l.w_up, &du, n, &mut dxn);
                self.lora_bwd(act, il, Proj::Gate, &xn, &dg, Some(&mut dxn));
                self.lora_bwd(act, il, Proj::Up, &xn, &du, Some(&mut dxn));
                // dx becomes the gradient of x_mid: the residual path plus the norm's.
                rmsnorm_backward(&b.x_mid, &norm(&l.ffn_norm).w, &b.rstd_ffn, &dxn, &mut dx);
            } else {
                self.lora_bwd(act, il, Proj::Gate, &xn, &dg, None);
                self.lora_bwd(act, il, Proj::Up, &xn, &du, None);
                break;
            }

            // Attention: dx is the gradient of x_mid.
            let mut datt = vec![0f32; n * hs.q_dim()]; // [n, n_head*hd]
            linear_backward(pool, &m.file, &l.wo, &dx, n, &mut datt);
            self.lora_bwd(act, il, Proj::O, &b.att, &dx, Some(&mut datt));
            take(il, Proj::O, &b.att, &dx);
            let mut dq = vec![0f32; n * hs.q_dim()]; // [n, n_head*hd]
            let mut dk = vec![0f32; n * hs.kv_dim()]; // [n, n_head_kv*hd]
            let mut dv = vec![0f32; n * hs.kv_dim()]; // [n, n_head_kv*hd]
            let (qd, kvd) = (hs.q_dim(), hs.kv_dim());
            let (mut t0, mut p0) = (0, 0);
            for &len in &act.segs {
                let (t1, p1) = (t0 + len, p0 + hs.probs_len(len));
                let (qr, kr) = (t0 * qd..t1 * qd, t0 * kvd..t1 * kvd);
                attention_backward(
                    pool,
                    &hs,
                    &b.q[qr.clone()],
                    &b.k[kr.clone()],
                    &b.v[kr.clone()],
                    &b.probs[p0..p1],
                    &datt[qr.clone()],
                    len,
                    &mut dq[qr.clone()],
                    &mut dk[kr.clone()],
                    &mut dv[kr.clone()],
                );
                rope_backward(&m.rope_global, &mut dq[qr], len, c.head_dim, 0);
                rope_backward(&m.rope_global, &mut dk[kr], len, c.head_dim, 0);
                (t0, p0) = (t1, p1);
            }
            if let (Some(a), Some(qn), Some(kn)) = (&b.qk_norm, &l.q_norm, &l.k_norm) {
                // dq, dk become the gradients of the projections, before the norms.
                let mut dq_in = vec![0f32; n * hs.q_dim()]; // [n, n_head*hd]
                let mut dk_in = vec![0f32; n * hs.kv_dim()]; // [n, n_head_kv*hd]
                rmsnorm_backward(&a.q, &qn.w, &a.rstd_q, &dq, &mut dq_in);
                rmsnorm_backward(&a.k, &kn.w, &a.rstd_k, &dk, &mut dk_in);
                (dq, dk) = (dq_in, dk_in);
            }
            rmsnorm_forward(&b.x, &norm(&l.attn_norm).w, c.norm_eps, &mut xn, &mut tmp);
            take(il, Proj::Q, &xn, &dq);
            take(il, Proj::K, &xn, &dk);
            take(il, Proj::V, &xn, &dv);
            if need_in {
                dxn.fill(0.0);
                linear_backward(pool, &m.file, &l.wq, &dq, n, &mut dxn);
                linear_backward(pool, &m.file, &l.wk, &dk, n, &mut dxn);
                linear_backward(pool, &m.file, &l.wv, &dv, n, &mut dxn);
            }
            let mut dxn_opt = need_in.then_some(&mut dxn);
            for (slot, dy) in [(Proj::Q, &dq), (Proj::K, &dk), (Proj::V, &dv)] {
                let dx = dxn_opt.as_deref_mut().map(|d| &mut d[..]);
                self.lora_bwd(act, il, slot, &xn, dy, dx);
            }
            if need_in {
                rmsnorm_backward(&b.x, &norm(&l.attn_norm).w, &b.rstd_attn, &dxn, &mut dx);
            }
        }
        Ok(())
    }

    /// The backward pass of block `il`'s adapter on `slot`, if it has one, in the forward pass
    /// `act` (`x`: that matmul's input, `dy`: the gradient of its output).
    fn lora_bwd(
        &mut self,
        act: &Activations,
        il: usize,
        slot: Proj,
        x: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
    ) {
        let Some(i) = self.lora.index_of(il, slot) else {
            return;
        };
        let s = self.lora.scale();
        let u = act.blocks[il].lora_u[slot as usize]
            .as_deref()
            .expect("kept by the forward pass");
        let pool: &ThreadPool = &self.model.pool;
        lora_backward(pool, &mut self.lora.params[i], s, x, u, dy, act.n, dx);
    }

    /// Forward, loss and backward of one sequence: returns the loss and adds its gradient to
    /// the adapters' (call [`Lora::zero_grad`] between steps).
    pub fn loss_and_grad(&mut self, tokens: &[u32], objective: Objective) -> Result<f64> {
        if objective.len() != tokens.len() {
            return Err(Error::Invalid(format!(
                "{} tokens but the objective covers {} positions",
                tokens.len(),
                objective.len()
            )));
        }
        if !self.head {
            return Err(Error::Invalid(
                "a loss on logits needs the model's head".into(),
            ));
        }
        let act = self.forward(tokens)?;
        let mut dlogits = vec![0f32; act.logits.len()]; // [n, n_vocab]
        let loss = objective.loss(&act.logits, self.model.cfg.n_vocab, &mut dlogits)?;
        self.backward(&act, &dlogits)?;
        Ok(loss)
    }
}
