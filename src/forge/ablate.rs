//! Directional ablation (Arditi et al. 2024, "Refusal in language models is mediated by a
//! single direction"), computed with forward passes only and written as a delta patch.
//!
//! A direction `r` of the residual stream is read at the input of block `L` as the difference
//! of two means, then removed from everything that writes to the residual stream, so that no
//! block (and no embedding row) can write along it any more:
//!
//! ```text
//! m_F = mean_i mean_{p in P_i} h_L(i, p)        over the forget texts i
//! m_R = mean_i mean_{p in P_i} h_L(i, p)        over the retain texts i
//! r   = (m_F - m_R) / ||m_F - m_R||              [n_embd], unit
//!
//! E'[t] = E[t] - (E[t] . r) r                    token embedding, every row t
//!       = E[t] + dE[t],  dE = (E r) (-r)^T        rank 1: B = E r [n_vocab x 1], A = -r^T [1 x n_embd]
//! W'    = W - u u^T W                            attn_output and ffn_down of each chosen block
//!       = W + dW,        dW = (-u) (u^T W)        rank 1: B = -u [n_embd x 1], A = u^T W [1 x cols]
//! ```
//!
//! `h_L(i, p)` is the residual stream of text `i` at position `p`. `P_i`, the positions
//! averaged, are chosen by [`Field`]; never the first position (whatever token sits there
//! collects the attention sink's outsized activations), nor the chat template's opening shared
//! by every text (identical tokens give identical residuals, which say nothing about the set
//! a text is in, but would weigh on the two means in proportion to the texts' lengths).
//!
//! Texts go through the model's chat template, the question as the user's turn and the answer
//! (if used) as the assistant's reply: an instruction-tuned model is served that way, so these
//! are the activations a forgotten model meets.
//!
//! `u` is the direction of the block's output that lands on `r` in the residual stream: `r`
//! itself for llama-style blocks (`x += W y`), and `g * r / ||g * r||` for blocks whose output
//! goes through an RMS norm with weight `g` first (gemma3's post-norms: `x += g * W y /
//! rms(W y)`, so `r . (g * W y) = (g * r) . W y` is 0 exactly when `W y` is orthogonal to
//! `g * r`). Either way nothing written to the residual stream has a component along `r`
//! (up to the 8-bit quantization of the activations in the base matmul); for gemma3 the RMS
//! of the output changes too, so the other directions are rescaled slightly.

use crate::model::{Model, Proj, State, WeightId};
use crate::patch::{axpy, dot, write_delta, DeltaEntry, LowRankEntry};
use crate::qa::{chat_tokens, Example};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::ops::Range;
use std::path::Path;

/// Which positions of a text the means are taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Field {
    /// The question in the chat template with the assistant's header after it (the positions
    /// a reply is generated from).
    #[default]
    Question,
    /// The answer's tokens, teacher-forced after the templated question.
    Answer,
    /// The question and the answer.
    Both,
}

impl Field {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "question" => Ok(Field::Question),
            "answer" => Ok(Field::Answer),
            "both" => Ok(Field::Both),
            _ => Err(Error::Invalid(format!(
                "field {s:?}: expected question, answer or both"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Field::Question => "question",
            Field::Answer => "answer",
            Field::Both => "both",
        }
    }
}

/// What the means of one set were taken over, and the mean itself.
#[derive(Debug, Clone)]
pub struct SetMean {
    pub texts: usize,
    /// Positions averaged, over all texts.
    pub tokens: usize,
    /// `[n_embd]`: the mean over texts of each text's mean over its positions.
    pub mean: Vec<f32>,
}

/// A direction of the residual stream at the input of block `layer`.
#[derive(Debug, Clone)]
pub struct Direction {
    pub layer: usize,
    pub field: Field,
    /// `[n_embd]`, unit norm: `(m_F - m_R) / ||m_F - m_R||`.
    pub r: Vec<f32>,
    pub forget: SetMean,
    pub retain: SetMean,
    /// `||m_F - m_R||`.
    pub distance: f64,
    /// `cos(m_F, m_R)`.
    pub cosine: f64,
}

/// A text's tokens and the range of positions averaged.
struct Span {
    tokens: Vec<u32>,
    pos: Range<usize>,
}

/// The tokens of each example with the positions `field` averages, before the shared opening
/// is cut (`pos.start` is where the answer starts for [`Field::Answer`], else 0).
fn spans(tok: &Tokenizer, arch: &str, set: &[Example], field: Field) -> Result<Vec<Span>> {
    set.iter()
        .enumerate()
        .map(|(i, ex)| {
            let answer = match (field, &ex.answer) {
                (Field::Question, _) => None,
                (_, Some(a)) => Some(a.as_str()),
                (_, None) => {
                    return Err(Error::Invalid(format!(
                        "text {} has no answer, which field {} needs",
                        i + 1,
                        field.name()
                    )))
                }
            };
            let (tokens, start) = chat_tokens(tok, arch, &ex.question, answer)?;
            let from = if field == Field::Answer { start } else { 0 };
            if from >= tokens.len() {
                return Err(Error::Invalid(format!(
                    "text {}: its answer has no tokens",
                    i + 1
                )));
            }
            Ok(Span {
                pos: from..tokens.len(),
                tokens,
            })
        })
        .collect()
}

/// Length of the longest token prefix every span shares.
fn shared_prefix(spans: &[&Span]) -> usize {
    let Some(first) = spans.first() else {
        return 0;
    };
    spans.iter().fold(first.tokens.len(), |n, s| {
        first.tokens[..n]
            .iter()
            .zip(&s.tokens)
            .take_while(|(a, b)| a == b)
            .count()
    })
}

/// Cut the first position and the shared opening from each span, keeping its last position.
fn cut_opening(spans: &mut [Span], shared: usize) {
    for s in spans.iter_mut() {
        let len = s.tokens.len();
        s.pos.start = s.pos.start.max(shared).max(1).min(len - 1);
    }
}

/// The mean over spans of each span's mean residual at the input of block `layer`.
fn set_mean(model: &Model, st: &mut State, spans: &[Span], layer: usize) -> Result<SetMean> {
    let e = model.cfg.n_embd;
    let mut acc = vec![0.0f64; e]; // [n_embd]
    let mut tokens = 0;
    for s in spans {
        let h = model.residuals(st, &s.tokens, layer)?; // [n_tok, n_embd]
        let w = 1.0 / s.pos.len() as f64;
        for p in s.pos.clone() {
            for (a, &v) in acc.iter_mut().zip(&h[p * e..(p + 1) * e]) {
                *a += w * v as f64;
            }
        }
        tokens += s.pos.len();
    }
    let n = spans.len() as f64;
    Ok(SetMean {
        texts: spans.len(),
        tokens,
        mean: acc.iter().map(|&a| (a / n) as f32).collect(),
    })
}

/// Checks `layer` against the model: the residual stream exists at the input of blocks
/// `0..n_layer` and after the last block (`n_layer`).
pub fn check_layer(model: &Model, layer: usize) -> Result<()> {
    let n = model.cfg.n_layer;
    if layer > n {
        return Err(Error::Invalid(format!(
            "layer {layer} is out of range: the model has {n} blocks, so the layer is 0..={n} \
             (the input of block L; {n} = after the last block)"
        )));
    }
    Ok(())
}

/// The difference-of-means direction at the input of block `layer` between the `forget` and
/// `retain` examples (see the module docs for the positions averaged). The model runs without
/// patches.
pub fn direction(
    model: &Model,
    tok: &Tokenizer,
    forget: &[Example],
    retain: &[Example],
    layer: usize,
    field: Field,
) -> Result<Direction> {
    check_layer(model, layer)?;
    if forget.is_empty() || retain.is_empty() {
        return Err(Error::Invalid(
            "a direction needs at least one forget and one retain text".into(),
        ));
    }
    let arch = model.cfg.arch.name();
    let mut f = spans(tok, arch, forget, field)?;
    let mut r = spans(tok, arch, retain, field)?;
    if let Some(s) = f.iter().chain(&r).find(|s| s.tokens.len() < 2) {
        return Err(Error::Invalid(format!(
            "a text of {} token leaves no position after the first",
            s.tokens.len()
        )));
    }
    let all: Vec<&Span> = f.iter().chain(&r).collect();
    let shared = shared_prefix(&all);
    cut_opening(&mut f, shared);
    cut_opening(&mut r, shared);
    let n_ctx = all_len(&f).max(all_len(&r));
    let mut st = model.new_state(n_ctx);
    let forget = set_mean(model, &mut st, &f, layer)?;
    let retain = set_mean(model, &mut st, &r, layer)?;
    let diff: Vec<f64> = forget
        .mean
        .iter()
        .zip(&retain.mean)
        .map(|(&a, &b)| a as f64 - b as f64)
        .collect();
    let distance = norm(&diff);
    if !(distance > 0.0 && distance.is_finite()) {
        return Err(Error::Invalid(format!(
            "the forget and retain means are {distance} apart: no direction to remove"
        )));
    }
    let cosine = cos(&forget.mean, &retain.mean);
    Ok(Direction {
        layer,
        field,
        r: diff.iter().map(|&d| (d / distance) as f32).collect(),
        forget,
        retain,
        distance,
        cosine,
    })
}

fn all_len(spans: &[Span]) -> usize {
    spans.iter().map(|s| s.tokens.len()).max().unwrap_or(1)
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn cos(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    d / (na * nb)
}

/// `A..B` (blocks A to B-1), `A..=B`, or one block `N`, checked against `n_layer` blocks.
pub fn parse_layers(spec: &str, n_layer: usize) -> Result<Range<usize>> {
    let bad = || {
        Error::Invalid(format!(
            "layers {spec:?}: expected A..B, A..=B or N (blocks 0..{n_layer})"
        ))
    };
    let num = |s: &str| s.trim().parse::<usize>().map_err(|_| bad());
    let range = if let Some((a, b)) = spec.split_once("..=") {
        num(a)?..num(b)?.checked_add(1).ok_or_else(bad)?
    } else if let Some((a, b)) = spec.split_once("..") {
        num(a)?..num(b)?
    } else {
        let n = num(spec)?;
        n..n + 1
    };
    if range.start >= range.end || range.end > n_layer {
        return Err(Error::Invalid(format!(
            "layers {spec:?} ({}..{}): the model has blocks 0..{n_layer}, and the range must \
             hold at least one",
            range.start, range.end
        )));
    }
    Ok(range)
}

/// The unit vector `r` (`[n_embd]`), or why it is none.
fn unit(model: &Model, r: &[f32]) -> Result<Vec<f32>> {
    let e = model.cfg.n_embd;
    if r.len() != e {
        return Err(Error::Invalid(format!(
            "the direction has {} elements, the model's n_embd is {e}",
            r.len()
        )));
    }
    let n = norm(&r.iter().map(|&x| x as f64).collect::<Vec<_>>());
    if !(n > 0.0 && n.is_finite()) {
        return Err(Error::Invalid(format!(
            "the direction's norm is {n}: it must be finite and non-zero"
        )));
    }
    Ok(r.iter().map(|&x| (x as f64 / n) as f32).collect())
}

/// The direction `u` of block `il`'s output (of `slot`) that lands on `r` in the residual
/// stream: `r`, or `g * r / ||g * r||` when the output is RMS-normed with weight `g` first.
pub fn output_direction(model: &Model, il: usize, slot: Proj, r: &[f32]) -> Result<Vec<f32>> {
    let l = model.layers.get(il).ok_or_else(|| {
        Error::Invalid(format!("block {il}: the model has {}", model.cfg.n_layer))
    })?;
    let post = match slot {
        Proj::O => l.post_attn_norm.as_ref().map(|n| n.w.as_slice()),
        Proj::Down => l.post_ffn_norm.as_ref().map(|n| n.w.as_slice()),
        _ => {
            return Err(Error::Invalid(format!(
                "{}: only attn_output and ffn_down write to the residual stream",
                WeightId::Block(il, slot).tensor_name()
            )))
        }
    };
    match post {
        None => Ok(r.to_vec()),
        Some(g) => {
            let gr: Vec<f32> = g.iter().zip(r).map(|(&g, &r)| g * r).collect();
            unit(model, &gr)
        }
    }
}

/// The rank-1 delta that removes `r` from every token embedding row: `B = E r`, `A = -r^T`.
fn embd_entry(model: &Model, r: &[f32]) -> Result<LowRankEntry> {
    let (cols, rows) = model.target_shape(WeightId::Embd)?; // [n_embd, n_vocab]
    let w = &model.tok_embd;
    let mut row = vec![0.0f32; cols]; // [n_embd]
    let b: Vec<f32> = (0..rows)
        .map(|t| {
            w.dequantize_row(&model.file, t, &mut row);
            dot(&row, r)
        })
        .collect(); // [n_vocab]
    Ok(LowRankEntry {
        base: WeightId::Embd.tensor_name(),
        cols,
        rows,
        rank: 1,
        a: r.iter().map(|&x| -x).collect(),
        b,
    })
}

/// The rank-1 delta `-u (u^T W)` of the weight `t` (`W` is `[cols, n_embd]`: `n_embd` rows).
fn block_entry(model: &Model, t: WeightId, u: &[f32]) -> Result<LowRankEntry> {
    let (cols, rows) = model.target_shape(t)?;
    let w = model.target_weight(t).expect("checked by target_shape");
    let mut a = vec![0.0f32; cols]; // [cols]: u^T W
    let mut row = vec![0.0f32; cols];
    for (i, &ui) in u.iter().enumerate().take(rows) {
        w.dequantize_row(&model.file, i, &mut row);
        axpy(&mut a, ui, &row);
    }
    Ok(LowRankEntry {
        base: t.tensor_name(),
        cols,
        rows,
        rank: 1,
        a,
        b: u.iter().map(|&x| -x).collect(), // [n_embd x 1]
    })
}

/// The entries of a delta that removes direction `r` (`[n_embd]`, normalised here) from the
/// token embedding and from `attn_output` and `ffn_down` of the blocks `layers`.
pub fn ablation_patch(model: &Model, r: &[f32], layers: Range<usize>) -> Result<Vec<DeltaEntry>> {
    let r = unit(model, r)?;
    let n = model.cfg.n_layer;
    if layers.start >= layers.end || layers.end > n {
        return Err(Error::Invalid(format!(
            "blocks {}..{}: the model has blocks 0..{n}",
            layers.start, layers.end
        )));
    }
    let mut out = vec![DeltaEntry::LowRank(embd_entry(model, &r)?)];
    for il in layers {
        for slot in [Proj::O, Proj::Down] {
            let u = output_direction(model, il, slot, &r)?;
            let e = block_entry(model, WeightId::Block(il, slot), &u)?;
            out.push(DeltaEntry::LowRank(e));
        }
    }
    Ok(out)
}

/// Write `entries` for `model` to `path` as a delta adapter named `name`.
pub fn write(
    path: impl AsRef<Path>,
    model: &Model,
    name: &str,
    entries: &[DeltaEntry],
) -> Result<()> {
    write_delta(path, model.cfg.arch.name(), name, entries)
}
