//! Teacher-forced scoring: the log-probabilities a (possibly forgotten) model gives to the
//! tokens of a continuation after a prompt, under the **scoring use** of its combination
//! (DESIGN: outside a term's plausible set the target's own log-probability stands, so every
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

use super::combine::{combine_in, log_softmax, CombineScratch, Term, Use};
use super::lockstep::Assistant;
use crate::model::{Model, PatchSet, State};
use crate::{Error, Result};
use std::sync::Arc;

/// One model of the combination (the target, an assistant, or an assistant's reference) with
/// its run state, its logits after the prompt and its logits along a continuation.
struct Run {
    model: Arc<Model>,
    state: State,
    /// `[n_vocab]`: after the prompt.
    last: Vec<f32>,
    /// `[n_cont - 1, n_vocab]`: after each continuation token but the last.
    rows: Vec<f32>,
}

impl Run {
    fn new(model: Arc<Model>, patches: Option<Arc<PatchSet>>, n_ctx: usize) -> Result<Self> {
        let mut state = model.new_state(n_ctx);
        model.attach_patches(&mut state, patches)?;
        let v = model.cfg.n_vocab;
        Ok(Self {
            model,
            state,
            last: vec![0.0; v],
            rows: Vec::new(),
        })
    }

    fn prefill(&mut self, prompt: &[u32]) -> Result<()> {
        self.state.reset();
        let l = self.model.forward(&mut self.state, prompt, None)?;
        self.last.copy_from_slice(l);
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
    run: Run,
    reference: Option<Run>,
}

/// Scores continuations after a prompt under a model with its assistants and patches.
pub struct Scorer {
    target: Run,
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
            let run = Run::new(a.model.clone(), a.patches.clone(), n_ctx)?;
            let reference = match &a.reference {
                Some(r) => Some(Run::new(r.clone(), None, n_ctx)?),
                None => None,
            };
            runs.push(TermRun {
                spec: a,
                run,
                reference,
            });
        }
        Ok(Self {
            target: Run::new(model, patches, n_ctx)?,
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
        if prompt.is_empty() {
            return Err(Error::Invalid(
                "scoring needs a prompt of at least one token".into(),
            ));
        }
        if self.primed && self.prompt == prompt {
            return Ok(());
        }
        self.primed = false;
        self.target.prefill(prompt)?;
        for t in &mut self.terms {
            t.run.prefill(prompt)?;
            if let Some(r) = t.reference.as_mut() {
                r.prefill(prompt)?;
            }
        }
        self.prompt.clear();
        self.prompt.extend_from_slice(prompt);
        self.primed = true;
        Ok(())
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
        if !self.primed {
            return Err(Error::Invalid("set a prompt before scoring".into()));
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
        if cont.is_empty() {
            return Ok(vec![Vec::new(); points.len()]);
        }
        let v = self.n_vocab();
        if let Some(&bad) = cont.iter().find(|&&t| t as usize >= v) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the vocabulary of {v}"
            )));
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
            t.run.run(p, cont)?;
            if let Some(r) = t.reference.as_mut() {
                r.run(p, cont)?;
            }
        }
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

    /// [`Scorer::score_with`] without the per-position callback.
    pub fn score(&mut self, cont: &[u32]) -> Result<Vec<f64>> {
        self.score_with(cont, |_, _| {})
    }
}
