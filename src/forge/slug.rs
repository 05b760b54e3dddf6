//! SLUG, Single Layer Unlearning Gradient (Cai, Tan and Asif, ICML 2025, "Targeted Unlearning
//! with Single Layer Unlearning Gradient"): one gradient of a forget loss and one of a retain
//! loss, one matrix chosen from them, one step along its forget gradient; written as a dense
//! delta patch of that matrix.
//!
//! ```text
//! L_F = mean over forget rows of the mean cross-entropy of the answer's tokens
//! L_R = the same over the retain rows          (answers teacher-forced after the question,
//!                                               both through the chat template)
//! g_F = dL_F/dW,  g_R = dL_R/dW                 for every linear W of the chosen blocks
//! importance(W) = ||g_F|| / ||W||               (Frobenius norms)
//! alignment(W)  = |cos(g_F, g_R)|
//! candidates    = the Pareto front: no other matrix has a higher importance and a lower
//!                 alignment (at least as good in both, better in one)
//! W' = W + lambda ||W|| g_F / ||g_F||           a step up the forget loss
//! ```
//!
//! The gradients of a frozen `W` in `y = W x` are `dW = sum_t dy_t x_t^T`, from the inputs
//! `x_t` and output gradients `dy_t` the training core's backward pass hands out
//! ([`TrainModel::backward_capture`]). Scoring needs only norms and inner products of the
//! `dW`, which need no `dW`:
//!
//! ```text
//! <dW_A, dW_B> = sum_{t in A, s in B} (dy_t . dy_s) (x_t . x_s)
//! ```
//!
//! (Gram matrices of the tokens; `(N/2)(cols + rows)` multiply-adds a pair, against
//! `N cols rows` to materialise). Each matrix is scored the cheaper way; the `dW` of a
//! candidate is materialised for its step.
//!
//! The step size follows the paper's binary search, with the losses measured through the
//! inference engine (the candidate patch attached at scale `lambda`): it starts at
//! `lambda = 0.1` (the paper's first step, a tenth of `||W|| / ||g_F||` on `g_F`), doubles
//! while a step is accepted and nothing has been refused, divides by 4 while a step is refused
//! and nothing has been accepted (a language model's last blocks may take steps of 1e-3), and
//! then bisects between the largest accepted and the smallest refused step. A step is accepted when the retain loss rises by at
//! most `max_retain_increase` (nats per token) and the forget loss rises. Each of the first
//! `candidates` front members (by importance) is searched; the one whose accepted step raises
//! the forget loss most is written, at that step.

use crate::forge::train::{Lora, Objective, TrainModel};
use crate::model::{Model, Proj, WeightId};
use crate::patch::{axpy, dot, write_delta, DeltaEntry, Patch, PatchSet};
use crate::pool::{SharedMut, ThreadPool};
use crate::qa::{answer_nll, chat_tokens, Example};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use lethe_kernels::quant::GgmlType;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// The inputs (`[n, cols]`) and output gradients (`[n, rows]`) of one matrix over the tokens
/// of a set, every sequence's tokens one after another.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    pub n: usize,
    pub x: Vec<f32>,
    pub dy: Vec<f32>,
}

impl Tokens {
    /// Append `n` tokens, leaving out those whose `dy` is zero (they add nothing to `dW`).
    fn push(&mut self, x: &[f32], dy: &[f32], n: usize) {
        let (cols, rows) = (x.len() / n, dy.len() / n);
        for t in 0..n {
            let d = &dy[t * rows..(t + 1) * rows];
            if d.iter().all(|&v| v == 0.0) {
                continue;
            }
            self.x.extend_from_slice(&x[t * cols..(t + 1) * cols]);
            self.dy.extend_from_slice(d);
            self.n += 1;
        }
    }

    fn cols(&self) -> usize {
        self.x.len().checked_div(self.n).unwrap_or(0)
    }

    fn rows(&self) -> usize {
        self.dy.len().checked_div(self.n).unwrap_or(0)
    }
}

/// `dW = sum_t dy_t x_t^T` (`[rows, cols]`, row `r` = `sum_t dy_t[r] x_t`), over `cols` and
/// `rows` wide tokens; rows shared out over `pool`.
pub fn dense_grad(pool: &ThreadPool, t: &Tokens, cols: usize, rows: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols]; // [rows, cols]
    if t.n == 0 {
        return out;
    }
    let o = SharedMut::new(&mut out);
    pool.for_chunks(rows, 1, |_, rs| {
        for r in rs {
            // SAFETY: row r of the output is this chunk's alone.
            let row = unsafe { o.slice(r * cols, cols) };
            for s in 0..t.n {
                let d = t.dy[s * rows + r];
                if d != 0.0 {
                    axpy(row, d, &t.x[s * cols..(s + 1) * cols]);
                }
            }
        }
    });
    out
}

/// `||g_F||^2`, `||g_R||^2` and `<g_F, g_R>` of one matrix.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GradStats {
    pub ff: f64,
    pub rr: f64,
    pub fr: f64,
}

impl GradStats {
    /// `cos(g_F, g_R)` (0 when either is zero).
    pub fn cos(&self) -> f64 {
        let d = (self.ff * self.rr).sqrt();
        if d > 0.0 {
            self.fr / d
        } else {
            0.0
        }
    }
}

/// `sum_{t in a, s in b} (x_t . x_s)(dy_t . dy_s)`, in f64 (`same`: `a` is `b`, so the sum is
/// symmetric and each pair is computed once).
fn gram_dot(pool: &ThreadPool, a: &Tokens, b: &Tokens, same: bool) -> f64 {
    let (cols, rows) = (a.cols(), a.rows());
    pool.map(a.n, |i| {
        let (xi, di) = (
            &a.x[i * cols..(i + 1) * cols],
            &a.dy[i * rows..(i + 1) * rows],
        );
        let from = if same { i } else { 0 };
        let mut acc = 0f64;
        for j in from..b.n {
            let xx = dot(xi, &b.x[j * cols..(j + 1) * cols]) as f64;
            let dd = dot(di, &b.dy[j * rows..(j + 1) * rows]) as f64;
            let w = if same && j != i { 2.0 } else { 1.0 };
            acc += w * xx * dd;
        }
        acc
    })
    .into_iter()
    .sum()
}

/// The statistics through the Gram matrices of the tokens, never forming `dW`.
pub fn gram_stats(pool: &ThreadPool, f: &Tokens, r: &Tokens) -> GradStats {
    GradStats {
        ff: gram_dot(pool, f, f, true),
        rr: gram_dot(pool, r, r, true),
        fr: gram_dot(pool, f, r, false),
    }
}

fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// The statistics from the materialised gradients.
pub fn dense_stats(
    pool: &ThreadPool,
    f: &Tokens,
    r: &Tokens,
    cols: usize,
    rows: usize,
) -> GradStats {
    let gf = dense_grad(pool, f, cols, rows);
    let gr = dense_grad(pool, r, cols, rows);
    GradStats {
        ff: dot64(&gf, &gf),
        rr: dot64(&gr, &gr),
        fr: dot64(&gf, &gr),
    }
}

/// Whichever of [`gram_stats`] and [`dense_stats`] costs fewer multiply-adds.
pub fn grad_stats(
    pool: &ThreadPool,
    f: &Tokens,
    r: &Tokens,
    cols: usize,
    rows: usize,
) -> GradStats {
    let n = (f.n + r.n) as f64;
    if n * (cols + rows) as f64 / 2.0 < (cols * rows) as f64 {
        gram_stats(pool, f, r)
    } else {
        dense_stats(pool, f, r, cols, rows)
    }
}

/// The captured tokens of every matrix of blocks `layers` for one set.
pub struct SetGrads {
    pub layers: Range<usize>,
    /// `[block - layers.start][slot]`.
    pub mats: Vec<[Tokens; 7]>,
    /// `L`: the mean over rows of each row's mean answer-token cross-entropy (training
    /// forward, exact f32 activations).
    pub loss: f64,
    pub rows: usize,
    /// Answer tokens scored, over all rows.
    pub answer_tokens: usize,
}

/// The labels of a templated question + answer: position `p - 1` predicts answer token `p`.
fn answer_labels(tokens: &[u32], start: usize) -> Vec<Option<u32>> {
    let mut labels = vec![None; tokens.len()];
    for p in start.max(1)..tokens.len() {
        labels[p - 1] = Some(tokens[p]);
    }
    labels
}

/// The gradient of `L` (see [`SetGrads::loss`]) over `set` with respect to every matrix of
/// blocks `layers`, kept as the tokens' inputs and output gradients.
pub fn set_grads(
    model: &Model,
    tok: &Tokenizer,
    set: &[Example],
    layers: Range<usize>,
) -> Result<SetGrads> {
    let n_layer = model.cfg.n_layer;
    if layers.start >= layers.end || layers.end > n_layer {
        return Err(Error::Invalid(format!(
            "blocks {}..{}: the model has 0..{n_layer}",
            layers.start, layers.end
        )));
    }
    if set.is_empty() {
        return Err(Error::Invalid("a gradient needs at least one row".into()));
    }
    let lora = Lora::new(model, [], &[], 1, 1.0, 0)?;
    let mut tm = TrainModel::new(model, lora)?;
    let arch = model.cfg.arch.name();
    let mut mats: Vec<[Tokens; 7]> = (0..layers.len()).map(|_| Default::default()).collect();
    let inv = 1.0 / set.len() as f32;
    let (mut loss, mut answer_tokens) = (0.0, 0);
    for (i, ex) in set.iter().enumerate() {
        let a = ex
            .answer
            .as_deref()
            .ok_or_else(|| Error::Invalid(format!("row {} has no answer", i + 1)))?;
        let (tokens, start) = chat_tokens(tok, arch, &ex.question, Some(a))?;
        if start >= tokens.len() || start == 0 {
            return Err(Error::Invalid(format!(
                "row {}: its answer has no tokens",
                i + 1
            )));
        }
        let labels = answer_labels(&tokens, start);
        let obj = Objective::CrossEntropy { labels: &labels };
        let act = tm.forward(&tokens)?;
        let mut dlogits = vec![0f32; act.logits.len()]; // [n, n_vocab]
        loss += obj.loss(&act.logits, model.cfg.n_vocab, &mut dlogits)?;
        answer_tokens += tokens.len() - start;
        for d in dlogits.iter_mut() {
            *d *= inv;
        }
        let n = act.n;
        let from = layers.start;
        tm.backward_capture(&act, &dlogits, from, &mut |il, slot, x, dy| {
            if il < layers.end {
                mats[il - from][slot as usize].push(x, dy, n);
            }
        })?;
    }
    Ok(SetGrads {
        layers,
        mats,
        loss: loss / set.len() as f64,
        rows: set.len(),
        answer_tokens,
    })
}

/// One scored matrix.
#[derive(Debug, Clone)]
pub struct MatrixScore {
    pub layer: usize,
    pub slot: Proj,
    pub weight_norm: f64,
    pub stats: GradStats,
    /// `||g_F|| / ||W||`.
    pub importance: f64,
    /// `|cos(g_F, g_R)|`.
    pub alignment: f64,
}

impl MatrixScore {
    pub fn name(&self) -> String {
        WeightId::Block(self.layer, self.slot).tensor_name()
    }
}

/// `||W||_F` of the dequantized weight.
pub fn weight_norm(model: &Model, t: WeightId) -> Result<f64> {
    let (cols, rows) = model.target_shape(t)?;
    let w = model.target_weight(t).expect("checked by target_shape");
    const CHUNK: usize = 64;
    let sums = model.pool.map(rows.div_ceil(CHUNK), |i| {
        let mut row = vec![0f32; cols]; // [cols]
        let mut sum = 0f64;
        for r in i * CHUNK..((i + 1) * CHUNK).min(rows) {
            w.dequantize_row(&model.file, r, &mut row);
            sum += dot64(&row, &row);
        }
        sum
    });
    Ok(sums.into_iter().sum::<f64>().sqrt())
}

/// Every matrix of `slots` in the blocks both sets cover, scored.
pub fn score(
    model: &Model,
    f: &SetGrads,
    r: &SetGrads,
    slots: &[Proj],
) -> Result<Vec<MatrixScore>> {
    if f.layers != r.layers {
        return Err(Error::Invalid(
            "the forget and retain gradients cover different blocks".into(),
        ));
    }
    let mut out = Vec::new();
    for il in f.layers.clone() {
        for &slot in slots {
            let t = WeightId::Block(il, slot);
            let (cols, rows) = model.target_shape(t)?;
            let k = il - f.layers.start;
            let stats = grad_stats(
                &model.pool,
                &f.mats[k][slot as usize],
                &r.mats[k][slot as usize],
                cols,
                rows,
            );
            let weight_norm = weight_norm(model, t)?;
            out.push(MatrixScore {
                layer: il,
                slot,
                weight_norm,
                stats,
                importance: stats.ff.sqrt() / weight_norm,
                alignment: stats.cos().abs(),
            });
        }
    }
    Ok(out)
}

/// The indices of the points `(importance, alignment)` no other point dominates (at least as
/// high an importance and as low an alignment, and better in one), by importance, highest
/// first. Points with a NaN are never on the front.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let ok = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let mut front: Vec<usize> = (0..points.len())
        .filter(|&i| {
            let (ia, aa) = points[i];
            ok(&points[i])
                && !points
                    .iter()
                    .any(|q| ok(q) && q.0 >= ia && q.1 <= aa && (q.0 > ia || q.1 < aa))
        })
        .collect();
    front.sort_by(|&a, &b| points[b].0.total_cmp(&points[a].0));
    front
}

/// The mean over `items` of each answer's mean NLL per token, through the inference engine
/// with `patches` attached (none: the base model).
pub fn mean_answer_nll(
    model: &Model,
    tok: &Tokenizer,
    items: &[Example],
    patches: Option<Arc<PatchSet>>,
) -> Result<f64> {
    if items.is_empty() {
        return Err(Error::Invalid("no rows to score".into()));
    }
    let arch = model.cfg.arch.name();
    let n_ctx = crate::qa::n_ctx_for(tok, arch, items)?;
    let mut st = model.new_state(n_ctx);
    model.attach_patches(&mut st, patches)?;
    let mut sum = 0.0;
    for (i, ex) in items.iter().enumerate() {
        let a = ex
            .answer
            .as_deref()
            .ok_or_else(|| Error::Invalid(format!("row {} has no answer", i + 1)))?;
        sum += answer_nll(model, tok, &mut st, &ex.question, a)?;
    }
    Ok(sum / items.len() as f64)
}

/// One evaluated step.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub lambda: f64,
    pub forget: f64,
    pub retain: f64,
    pub accepted: bool,
}

/// The step search's settings.
#[derive(Debug, Clone, Copy)]
pub struct SearchOpts {
    /// Largest rise of the retain loss accepted, nats per token.
    pub max_retain_increase: f64,
    /// Steps evaluated per candidate.
    pub steps: usize,
    /// First step.
    pub lambda0: f64,
    /// No step beyond this.
    pub lambda_max: f64,
}

impl Default for SearchOpts {
    fn default() -> Self {
        Self {
            max_retain_increase: 0.1,
            steps: 8,
            lambda0: 0.1,
            lambda_max: 10.0,
        }
    }
}

/// The steps evaluated on one candidate and the one chosen.
#[derive(Debug, Clone)]
pub struct Search {
    pub steps: Vec<Step>,
    /// The largest accepted step, if any.
    pub best: Option<Step>,
}

/// The binary search of the module docs over `eval(lambda) -> (forget loss, retain loss)`,
/// from base losses `base`.
pub fn search_step(
    base: (f64, f64),
    opts: &SearchOpts,
    eval: &mut dyn FnMut(f64) -> Result<(f64, f64)>,
) -> Result<Search> {
    let (mut lo, mut hi): (Option<Step>, Option<f64>) = (None, None);
    let mut lambda = opts.lambda0.min(opts.lambda_max);
    let mut steps = Vec::new();
    for _ in 0..opts.steps {
        let (forget, retain) = eval(lambda)?;
        let accepted = retain - base.1 <= opts.max_retain_increase && forget > base.0;
        let s = Step {
            lambda,
            forget,
            retain,
            accepted,
        };
        steps.push(s);
        if accepted {
            lo = Some(s);
            match hi {
                Some(h) => lambda = (lambda + h) / 2.0,
                None if lambda >= opts.lambda_max => break,
                None => lambda = (2.0 * lambda).min(opts.lambda_max),
            }
        } else {
            hi = Some(lambda);
            lambda = match lo {
                Some(s) => (s.lambda + lambda) / 2.0,
                None => lambda / 4.0,
            };
        }
    }
    Ok(Search { steps, best: lo })
}

/// The unit step of one matrix: `||W|| g_F / ||g_F||` (`[rows, cols]`).
pub fn unit_step(model: &Model, f: &SetGrads, s: &MatrixScore) -> Result<Vec<f32>> {
    let (cols, rows) = model.target_shape(WeightId::Block(s.layer, s.slot))?;
    let k = s.layer - f.layers.start;
    let mut g = dense_grad(&model.pool, &f.mats[k][s.slot as usize], cols, rows);
    let n = dot64(&g, &g).sqrt();
    if !(n > 0.0 && n.is_finite()) {
        return Err(Error::Invalid(format!(
            "{}: the forget gradient's norm is {n}",
            s.name()
        )));
    }
    let c = (s.weight_norm / n) as f32;
    g.iter_mut().for_each(|v| *v *= c);
    Ok(g)
}

/// The dense delta of `s`'s matrix holding `data` (`[rows, cols]`).
pub fn entry(model: &Model, s: &MatrixScore, ty: GgmlType, data: Vec<f32>) -> Result<DeltaEntry> {
    let t = WeightId::Block(s.layer, s.slot);
    let (cols, rows) = model.target_shape(t)?;
    Ok(DeltaEntry::Dense {
        base: t.tensor_name(),
        cols,
        rows,
        ty,
        data,
    })
}

/// Write `entries` to `path` as a delta and load it back against `model`.
pub fn write_and_load(
    model: &Model,
    path: &Path,
    name: &str,
    entries: &[DeltaEntry],
) -> Result<Arc<Patch>> {
    write_delta(path, model.cfg.arch.name(), name, entries)?;
    Ok(Arc::new(crate::patch::load(path, model)?))
}

/// What [`slug`] did.
#[derive(Debug, Clone)]
pub struct Report {
    pub forget_rows: usize,
    pub retain_rows: usize,
    pub forget_tokens: usize,
    pub retain_tokens: usize,
    /// The training forward's losses (exact f32 activations).
    pub train_loss: (f64, f64),
    /// The inference engine's losses without a patch.
    pub base: (f64, f64),
    pub scored: Vec<MatrixScore>,
    /// Indices into `scored`, by importance.
    pub front: Vec<usize>,
    /// `(index into scored, its search)` for each candidate searched.
    pub searches: Vec<(usize, Search)>,
    /// The matrix written and its step.
    pub chosen: Option<(usize, Step)>,
}

/// The settings of [`slug`].
#[derive(Debug, Clone)]
pub struct SlugOpts {
    pub layers: Range<usize>,
    pub slots: Vec<Proj>,
    /// Front members searched, by importance.
    pub candidates: usize,
    pub search: SearchOpts,
    /// The delta's tensor type (F32 or F16).
    pub ty: GgmlType,
}

/// Run SLUG and write the patch to `out` (nothing is written when no step is accepted; the
/// report says so). Each candidate is written beside `out` (`slug.gguf` ->
/// `slug.candidate.gguf`), loaded, and removed before its search.
pub fn slug(
    model: &Model,
    tok: &Tokenizer,
    forget: &[Example],
    retain: &[Example],
    opts: &SlugOpts,
    out: &Path,
) -> Result<Report> {
    if !matches!(opts.ty, GgmlType::F32 | GgmlType::F16) {
        return Err(Error::Invalid(format!(
            "a SLUG delta is F32 or F16, not {}",
            opts.ty
        )));
    }
    if opts.slots.is_empty() || opts.candidates == 0 || opts.search.steps == 0 {
        return Err(Error::Invalid(
            "SLUG needs at least one target, one candidate and one step".into(),
        ));
    }
    let fg = set_grads(model, tok, forget, opts.layers.clone())?;
    let rg = set_grads(model, tok, retain, opts.layers.clone())?;
    let scored = score(model, &fg, &rg, &opts.slots)?;
    let points: Vec<(f64, f64)> = scored.iter().map(|s| (s.importance, s.alignment)).collect();
    let front = pareto_front(&points);
    let base = (
        mean_answer_nll(model, tok, forget, None)?,
        mean_answer_nll(model, tok, retain, None)?,
    );
    let tmp = out.with_extension("candidate.gguf");
    let mut searches = Vec::new();
    let mut chosen: Option<(usize, Step, Vec<f32>)> = None;
    for &i in front.iter().take(opts.candidates) {
        let s = &scored[i];
        let unit = unit_step(model, &fg, s)?;
        let patch = write_and_load(
            model,
            &tmp,
            &format!("SLUG candidate {}", s.name()),
            &[entry(model, s, opts.ty, unit.clone())?],
        );
        let _ = std::fs::remove_file(&tmp);
        let patch = patch?;
        let mut eval = |lambda: f64| -> Result<(f64, f64)> {
            let set = Arc::new(PatchSet::new(model, &[(patch.clone(), lambda as f32)])?);
            Ok((
                mean_answer_nll(model, tok, forget, Some(set.clone()))?,
                mean_answer_nll(model, tok, retain, Some(set))?,
            ))
        };
        let search = search_step(base, &opts.search, &mut eval)?;
        if let Some(b) = search.best {
            if chosen.as_ref().is_none_or(|c| b.forget > c.1.forget) {
                chosen = Some((i, b, unit));
            }
        }
        searches.push((i, search));
    }
    let chosen = match chosen {
        Some((i, step, mut unit)) => {
            let s = &scored[i];
            unit.iter_mut().for_each(|v| *v *= step.lambda as f32);
            let name = format!(
                "SLUG: {} at lambda {:.4} ({} forget, {} retain rows)",
                s.name(),
                step.lambda,
                forget.len(),
                retain.len()
            );
            write_delta(
                out,
                model.cfg.arch.name(),
                &name,
                &[entry(model, s, opts.ty, unit)?],
            )?;
            Some((i, step))
        }
        None => None,
    };
    Ok(Report {
        forget_rows: fg.rows,
        retain_rows: rg.rows,
        forget_tokens: fg.answer_tokens,
        retain_tokens: rg.answer_tokens,
        train_loss: (fg.loss, rg.loss),
        base,
        scored,
        front,
        searches,
        chosen,
    })
}

/// Matrices by name: `q k v o gate up down`, or the tensor names (`attn_q` ... `ffn_down`),
/// comma-separated; `all` for the seven.
pub fn parse_slots(spec: &str) -> Result<Vec<Proj>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if part == "all" {
            for s in Proj::ALL {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
            continue;
        }
        let Some(s) = Proj::from_short(part).or_else(|| Proj::from_tensor(part)) else {
            return Err(Error::Invalid(format!(
                "target {part:?}: expected q, k, v, o, gate, up, down (or attn_q ... ffn_down, \
                 or all)"
            )));
        };
        if !out.contains(&s) {
            out.push(s);
        }
    }
    if out.is_empty() {
        return Err(Error::Invalid(format!("targets {spec:?}: none given")));
    }
    Ok(out)
}
