//! Teacher-forced scoring: the log-probabilities a (possibly forgotten) model gives to the
//! tokens of a continuation after a prompt, under the **scoring use** of its combination
//! (outside a term's plausible set the target's own log-probability stands, so every
//! token has a finite probability).
//!
//! Several continuations of one prompt (TOFU's answer, paraphrase and perturbed answers of one
//! question) share the prompt's KV cache: [`Scorer::set_prompt`] prefills it once, each
//! [`Scorer::score`] truncates back to it and runs its continuation as one batched chunk with
//! the logits of every position.
//!
//! ```text
//! row_0 = logits after the prompt            (predicts cont[0])
//! row_i = logits after prompt + cont[..i]    (predicts cont[i]), one forward over cont[..n-1]
//! logp_i = combine_score(target row_i, assistant rows_i)[cont[i]]   (normalised; see combine)
//! ```

use super::combine::{
    combine_in, log_softmax, lse_over, plausible_threshold_in, CombineScratch, ScoreRule, Term,
    TermKind, Use,
};
use super::lockstep::Assistant;
use crate::model::{Model, State};
use crate::patch::PatchSet;
use crate::{Error, Result};
use std::sync::Arc;

/// One model of the combination (the target, an assistant, or an assistant's reference) with
/// its run state, its logits after the prompt and its logits along a continuation.
struct ModelRun {
    model: Arc<Model>,
    state: State,
    /// `[n_vocab]`: after the prompt.
    last: Vec<f32>,
    /// `[n_cont - 1, n_vocab]`: after each continuation token but the last.
    rows: Vec<f32>,
    /// `[n_cont - 1, n_embd]`: the normed hidden states instead of `rows` (sparse scoring).
    hidden: Vec<f32>,
    /// `[n_vocab]`: logits of some rows of one position (the rest stale), for sparse scoring.
    some: Vec<f32>,
    vals: Vec<f32>,
}

impl ModelRun {
    fn new(model: Arc<Model>, patches: Option<Arc<PatchSet>>, n_ctx: usize) -> Result<Self> {
        let mut state = model.new_state(n_ctx);
        model.attach_patches(&mut state, patches)?;
        let v = model.cfg.n_vocab;
        Ok(Self {
            model,
            state,
            last: vec![0.0; v],
            rows: Vec::new(),
            hidden: Vec::new(),
            some: Vec::new(),
            vals: Vec::new(),
        })
    }

    /// Run the prompt tokens `part` after those already in the cache (none when `first`: the
    /// cache is emptied); `last`: they end the prompt, so keep the logits after them.
    fn prefill(&mut self, part: &[u32], first: bool, last: bool) -> Result<()> {
        if first {
            self.state.reset();
        }
        let l = self.model.forward(&mut self.state, part, None)?;
        if last {
            self.last.copy_from_slice(l);
        }
        Ok(())
    }

    fn run(&mut self, prompt_len: usize, cont: &[u32]) -> Result<()> {
        self.state.truncate(prompt_len);
        self.rows.clear();
        if cont.len() > 1 {
            let n = cont.len() - 1;
            self.model
                .forward(&mut self.state, &cont[..n], Some(&mut self.rows))?;
        }
        Ok(())
    }

    /// [`ModelRun::run`] keeping hidden states instead of logits.
    fn run_hidden(&mut self, prompt_len: usize, cont: &[u32]) -> Result<()> {
        self.state.truncate(prompt_len);
        self.hidden.clear();
        if cont.len() > 1 {
            let n = cont.len() - 1;
            self.model
                .forward_hidden(&mut self.state, &cont[..n], &mut self.hidden)?;
        }
        Ok(())
    }

    /// After [`ModelRun::run_hidden`]: the logits predicting continuation token `i` on the rows
    /// `rows`, each at its index of the returned `[n_vocab]` row (the other entries stale).
    fn rows_at(&mut self, i: usize, rows: &[u32]) -> Result<&[f32]> {
        if i == 0 {
            return Ok(&self.last);
        }
        let e = self.model.cfg.n_embd;
        let h = &self.hidden[(i - 1) * e..i * e];
        self.vals.resize(rows.len(), 0.0);
        self.some.resize(self.last.len(), 0.0);
        self.model
            .head_rows(&mut self.state, h, rows, &mut self.vals)?;
        for (&r, &v) in rows.iter().zip(&self.vals) {
            self.some[r as usize] = v;
        }
        Ok(&self.some)
    }

    /// The logits predicting continuation token `i`.
    fn row(&self, i: usize) -> &[f32] {
        let v = self.last.len();
        match i {
            0 => &self.last,
            i => &self.rows[(i - 1) * v..i * v],
        }
    }
}

/// One assistant term's runs: the assistant and, for pair terms, its reference.
struct TermRun {
    spec: Assistant,
    run: ModelRun,
    reference: Option<ModelRun>,
}

/// Scores continuations after a prompt under a model with its assistants and patches.
/// Statistics of one scored token under the model's next-token distribution p_t (Min-K%++'s
/// inputs; [`Scorer::score_points_sparse`] leaves `mu` and `sigma` zero when not asked for).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenStats {
    /// log p_t(x_t), the log-probability of the actual token.
    pub logprob: f64,
    /// mu_t = E_{z~p_t}[log p_t(z)] (minus the entropy).
    pub mu: f64,
    /// sigma_t = sqrt(E_{z~p_t}[(log p_t(z))^2] - mu_t^2).
    pub sigma: f64,
}

pub struct Scorer {
    target: ModelRun,
    terms: Vec<TermRun>,
    prompt: Vec<u32>,
    /// Whether `prompt` is in every cache.
    primed: bool,
    scratch: CombineScratch,
    logp: Vec<f32>,
}

impl Scorer {
    /// A scorer of `model` with the assistant `terms` and layer `patches` of a profile (none
    /// of either: the plain model), with caches of `n_ctx` tokens.
    pub fn new(
        model: Arc<Model>,
        terms: Vec<Assistant>,
        patches: Option<Arc<PatchSet>>,
        n_ctx: usize,
    ) -> Result<Self> {
        let v = model.cfg.n_vocab;
        let mut runs = Vec::new();
        for a in terms {
            a.check(v)?;
            let run = ModelRun::new(a.model.clone(), a.patches.clone(), n_ctx)?;
            let reference = match &a.reference {
                Some(r) => Some(ModelRun::new(r.clone(), None, n_ctx)?),
                None => None,
            };
            runs.push(TermRun {
                spec: a,
                run,
                reference,
            });
        }
        Ok(Self {
            target: ModelRun::new(model, patches, n_ctx)?,
            terms: runs,
            prompt: Vec::new(),
            primed: false,
            scratch: CombineScratch::default(),
            logp: Vec::with_capacity(v),
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.target.last.len()
    }

    pub fn n_ctx(&self) -> usize {
        self.target.state.n_ctx()
    }

    /// Prefill `prompt` (at least one token) into every cache; a no-op when it is already the
    /// prompt.
    pub fn set_prompt(&mut self, prompt: &[u32]) -> Result<()> {
        while !self.prime(prompt, prompt.len())? {}
        Ok(())
    }

    /// Whether `prompt` is all in every cache.
    pub fn primed_on(&self, prompt: &[u32]) -> bool {
        self.primed && self.prompt == prompt
    }

    /// How many of `prompt`'s tokens are in every cache, for [`Scorer::prime`] to go on from.
    pub fn primed_len(&self, prompt: &[u32]) -> usize {
        if self.primed_on(prompt) || (!self.primed && prompt.starts_with(&self.prompt)) {
            self.prompt.len()
        } else {
            0
        }
    }

    /// [`Scorer::set_prompt`] in steps: run up to `n` (at least one) more tokens of `prompt`
    /// into every cache, continuing a prompt whose first tokens are already in; true once the
    /// whole prompt is in.
    pub fn prime(&mut self, prompt: &[u32], n: usize) -> Result<bool> {
        if prompt.is_empty() {
            return Err(Error::bad_value(
                "prompt",
                "scoring needs a prompt of at least one token",
            ));
        }
        if self.primed && self.prompt == prompt {
            return Ok(true);
        }
        if self.primed || !prompt.starts_with(&self.prompt) {
            // Another prompt (scoring has also moved the caches past it): start again.
            self.primed = false;
            self.prompt.clear();
        }
        let from = self.prompt.len();
        let to = (from + n.max(1)).min(prompt.len());
        let part = &prompt[from..to];
        let (first, last) = (from == 0, to == prompt.len());
        // Unknown contents until the part has run in every cache.
        self.prompt.clear();
        self.target.prefill(part, first, last)?;
        for t in &mut self.terms {
            t.run.prefill(part, first, last)?;
            if let Some(r) = t.reference.as_mut() {
                r.prefill(part, first, last)?;
            }
        }
        self.prompt.extend_from_slice(&prompt[..to]);
        self.primed = last;
        Ok(last)
    }

    /// Score `cont` after the current prompt: calls `each(i, logp)` for every token `i` of
    /// it, with `logp` the model's normalised log-probabilities over the vocabulary (`[V]`)
    /// at that position (scoring use); returns each token's log-probability.
    pub fn score_with(
        &mut self,
        cont: &[u32],
        mut each: impl FnMut(usize, &[f32]),
    ) -> Result<Vec<f64>> {
        let mut out = self.score_points(cont, &[Vec::new()], |_, i, logp| each(i, logp))?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Check `cont` and `points`, then run every model over `cont` after the prompt.
    fn run_all(&mut self, cont: &[u32], points: &[Vec<(f32, f32)>], sparse: bool) -> Result<()> {
        if !self.primed {
            return Err(Error::Internal(
                "a continuation scored before its prompt was set".into(),
            ));
        }
        for p in points {
            if !p.is_empty() && p.len() != self.terms.len() {
                return Err(Error::Invalid(format!(
                    "a sweep point sets {} terms; the model has {}",
                    p.len(),
                    self.terms.len()
                )));
            }
        }
        let v = self.n_vocab();
        if let Some(&bad) = cont.iter().find(|&&t| t as usize >= v) {
            return Err(Error::bad_value(
                "continuation",
                format!("token id {bad} is outside the vocabulary of {v}"),
            ));
        }
        let p = self.prompt.len();
        if p + cont.len() > self.n_ctx() + 1 {
            return Err(Error::ContextFull {
                needed: p + cont.len() - 1,
                n_ctx: self.n_ctx(),
            });
        }
        self.target.run(p, cont)?;
        for t in &mut self.terms {
            let runs = std::iter::once(&mut t.run).chain(t.reference.as_mut());
            for r in runs {
                match sparse {
                    true => r.run_hidden(p, cont)?,
                    false => r.run(p, cont)?,
                }
            }
        }
        Ok(())
    }

    /// Score `cont` at several settings of the terms at once: `points[k]` gives each term's
    /// `(weight, filter)` (an empty list: the scorer's own). The forward passes of the target
    /// and of every assistant run once; only the combination is repeated per point.
    /// Calls `each(k, i, logp)` for point `k` and token `i`; returns per point each token's
    /// log-probability (the same numbers as a scorer built with that point's settings).
    pub fn score_points(
        &mut self,
        cont: &[u32],
        points: &[Vec<(f32, f32)>],
        mut each: impl FnMut(usize, usize, &[f32]),
    ) -> Result<Vec<Vec<f64>>> {
        if cont.is_empty() {
            return Ok(vec![Vec::new(); points.len()]);
        }
        self.run_all(cont, points, false)?;
        let mut out = vec![Vec::with_capacity(cont.len()); points.len()];
        for (i, &tok) in cont.iter().enumerate() {
            let target = self.target.row(i);
            if self.terms.is_empty() {
                log_softmax(target, &mut self.logp);
                for (k, o) in out.iter_mut().enumerate() {
                    each(k, i, &self.logp);
                    o.push(self.logp[tok as usize] as f64);
                }
                continue;
            }
            for (k, point) in points.iter().enumerate() {
                let terms: Vec<Term> = self
                    .terms
                    .iter()
                    .enumerate()
                    .map(|(j, t)| {
                        let (weight, filter) = point
                            .get(j)
                            .copied()
                            .unwrap_or((t.spec.weight, t.spec.filter));
                        Term {
                            kind: t.spec.kind,
                            weight,
                            logits: t.run.row(i),
                            reference: t.reference.as_ref().map(|r| r.row(i)),
                            filter,
                            score: t.spec.score,
                        }
                    })
                    .collect();
                // The scoring use's output is already normalised.
                combine_in(
                    target,
                    &terms,
                    Use::Score,
                    &mut self.logp,
                    &mut self.scratch,
                );
                each(k, i, &self.logp);
                out[k].push(self.logp[tok as usize] as f64);
            }
        }
        Ok(out)
    }

    /// Whether [`Scorer::score_points_sparse`] can score this scorer's terms: one ULD or pair
    /// term under the mass rule (the common sweep).
    pub fn sparse_ok(&self) -> bool {
        matches!(self.terms.as_slice(), [t] if t.spec.score == ScoreRule::Mass
            && matches!(t.spec.kind, TermKind::Uld | TermKind::Pair))
    }

    /// [`Scorer::score_points`] without the whole distribution per point: under the mass
    /// rule a term changes only its plausible set `S`, so per position the target's
    /// log-softmax and each filter's set are computed once and each point costs `O(|S|)`:
    ///
    /// ```text
    /// d_j = w * term_j,  c = lse_{j in S}(lt_j + d_j) - lse_{j in S}(lt_j)
    /// logp(tok) = lt_tok + d_tok - c  if tok in S,  lt_tok otherwise
    /// ```
    ///
    /// The assistant (and a pair term's reference) run without their output head; per
    /// position its rows are computed only on the union of the points' sets ([`Model::head_rows`]),
    /// about a fifth of a small assistant's work.
    ///
    /// With `stats`, each token's [`TokenStats`] too (`mu`, `sigma` of log p under the
    /// combined distribution, from the sums of `p lt` and `p lt^2` outside `S`, taken once per
    /// position). The same numbers as [`Scorer::score_points`] up to rounding (the sums run in
    /// another order). `None` when the terms are not [`Scorer::sparse_ok`].
    pub fn score_points_sparse(
        &mut self,
        cont: &[u32],
        points: &[Vec<(f32, f32)>],
        stats: bool,
    ) -> Result<Option<Vec<Vec<TokenStats>>>> {
        if !self.sparse_ok() {
            return Ok(None);
        }
        if cont.is_empty() {
            return Ok(Some(vec![Vec::new(); points.len()]));
        }
        self.run_all(cont, points, true)?;
        let t = &mut self.terms[0];
        let settings: Vec<(f64, f32)> = points
            .iter()
            .map(|p| {
                let (w, f) = p.first().copied().unwrap_or((t.spec.weight, t.spec.filter));
                (w as f64, f)
            })
            .collect();
        let mut filters: Vec<f32> = settings.iter().map(|s| s.1).collect();
        filters.sort_by(f32::total_cmp);
        filters.dedup();
        let mut out = vec![Vec::with_capacity(cont.len()); points.len()];
        let mut sel = Vec::new();
        let mut sets: Vec<Vec<u32>> = vec![Vec::new(); filters.len()];
        let mut union: Vec<u32> = Vec::new();
        for (i, &tok) in cont.iter().enumerate() {
            let target = self.target.row(i);
            for (f, set) in filters.iter().zip(sets.iter_mut()) {
                set.clear();
                match plausible_threshold_in(target, *f, &mut sel) {
                    Some(th) => {
                        set.extend((0..target.len() as u32).filter(|&j| target[j as usize] >= th))
                    }
                    None => set.extend(0..target.len() as u32),
                }
            }
            // The assistant's (and reference's) head only on the union of the sets.
            union.clear();
            for set in &sets {
                union.extend_from_slice(set);
            }
            union.sort_unstable();
            union.dedup();
            let z = t.run.rows_at(i, &union)?;
            let zr = match t.reference.as_mut() {
                Some(r) => Some(r.rows_at(i, &union)?),
                None => None,
            };
            log_softmax(target, &mut self.logp);
            let lt = &self.logp;
            // Sums over the whole vocabulary, for the moments: sum p lt, sum p lt^2.
            let (t1, t2) = if stats {
                lt.iter().fold((0.0f64, 0.0f64), |(a, b), &l| {
                    let l = l as f64;
                    let p = l.exp();
                    (a + p * l, b + p * l * l)
                })
            } else {
                (0.0, 0.0)
            };
            for (k, &(w, f)) in settings.iter().enumerate() {
                let set = &sets[filters.iter().position(|x| *x == f).unwrap_or(0)];
                let term = |j: usize| {
                    let a = z[j] as f64;
                    a - zr.map_or(0.0, |r| r[j] as f64)
                };
                let idx = || set.iter().map(|&j| j as usize);
                let before = lse_over(idx(), |j| lt[j] as f64);
                let after = lse_over(idx(), |j| lt[j] as f64 + w * term(j));
                let c = after - before;
                let tu = tok as usize;
                let inside = set.binary_search(&tok).is_ok();
                let logprob = if inside {
                    lt[tu] as f64 + w * term(tu) - c
                } else {
                    lt[tu] as f64
                };
                let (mut mu, mut sigma) = (0.0, 0.0);
                if stats {
                    let (mut a1, mut a2) = (t1, t2);
                    for &j in set {
                        let l = lt[j as usize] as f64;
                        let p = l.exp();
                        a1 -= p * l;
                        a2 -= p * l * l;
                        let l2 = l + w * term(j as usize) - c;
                        let p2 = l2.exp();
                        a1 += p2 * l2;
                        a2 += p2 * l2 * l2;
                    }
                    mu = a1;
                    sigma = (a2 - a1 * a1).max(0.0).sqrt();
                }
                out[k].push(TokenStats { logprob, mu, sigma });
            }
        }
        Ok(Some(out))
    }

    /// [`Scorer::score_with`] without the per-position callback.
    pub fn score(&mut self, cont: &[u32]) -> Result<Vec<f64>> {
        self.score_with(cont, |_, _| {})
    }
}

/// [`TokenStats`] of `token` from one row of logits (the vocabulary's unnormalised
/// log-probabilities), in f64 with a max-shifted log-sum-exp. A logit of -inf is a token of
/// probability 0 and adds nothing to mu or sigma. sigma is computed as
/// sqrt(E[(log p - mu)^2]), the same quantity without the cancellation of E[x^2] - mu^2.
///
/// Errors on an empty row, `token` out of range, or a NaN or +inf logit.
pub fn mink_stats(logits: &[f32], token: u32) -> Result<TokenStats> {
    let t = token as usize;
    if t >= logits.len() {
        return Err(Error::Invalid(format!(
            "mink_stats: token {token} outside a row of {} logits",
            logits.len()
        )));
    }
    if logits.iter().any(|l| l.is_nan() || *l == f32::INFINITY) {
        return Err(Error::Invalid("mink_stats: NaN or +inf logit".into()));
    }
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &l| m.max(l as f64));
    if max == f64::NEG_INFINITY {
        return Err(Error::Invalid("mink_stats: every logit is -inf".into()));
    }
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    // (p, log p) of every token of non-zero probability.
    let terms = || {
        logits
            .iter()
            .map(move |&l| l as f64 - lse)
            .filter(|lp| *lp > f64::NEG_INFINITY)
            .map(|lp| (lp.exp(), lp))
    };
    let mu: f64 = terms().map(|(p, lp)| p * lp).sum();
    let var: f64 = terms().map(|(p, lp)| p * (lp - mu) * (lp - mu)).sum();
    Ok(TokenStats {
        logprob: logits[t] as f64 - lse,
        mu,
        sigma: var.sqrt(),
    })
}
