//! Lockstep decoding: the target and its assistants keep their own KV caches, prefill the same
//! prompt and step on the same tokens; their logits are combined before sampling.
//!
//! With one ULD term and its filter on, the assistant's output head is computed only on the
//! rows of the target's plausible set (DESIGN: the head is most of a small model's cost).
//! Sampling is invariant to a constant shift over the set, so raw logits suffice there.

use super::combine::{
    combine_in, plausible_threshold_in, CombineScratch, ScoreRule, Term, TermKind, Use,
};
use crate::generate::Decoder;
use crate::model::{Model, PatchSet, State};
use crate::{Error, Result};
use std::sync::Arc;

/// One assistant of a lockstep decoder.
#[derive(Clone)]
pub struct Assistant {
    pub model: Arc<Model>,
    pub kind: TermKind,
    /// `w_i` (ULD/WHP: `-alpha`).
    pub weight: f32,
    /// Plausibility rate `r` (0: off).
    pub filter: f32,
    /// The reference model of a pair term.
    pub reference: Option<Arc<Model>>,
    /// Layer patches of the assistant (ULD's assistant is a truncated target plus a LoRA).
    pub patches: Option<Arc<PatchSet>>,
    /// How the term changes scored distributions (sampling is the same under both rules).
    pub score: ScoreRule,
}

impl Assistant {
    /// Check that this assistant (and its reference) can run beside a target of `n_vocab`
    /// tokens: the same vocabulary size, and a reference for a pair term.
    pub(super) fn check(&self, n_vocab: usize) -> Result<()> {
        let models = std::iter::once(&self.model).chain(self.reference.as_ref());
        if let Some(m) = models.clone().find(|m| m.cfg.n_vocab != n_vocab) {
            return Err(Error::Invalid(format!(
                "an assistant has {} tokens, the target {n_vocab}: vocabularies must be equal",
                m.cfg.n_vocab
            )));
        }
        if self.kind == TermKind::Pair && self.reference.is_none() {
            return Err(Error::Invalid("a pair term needs a reference model".into()));
        }
        Ok(())
    }
}

struct Run {
    spec: Assistant,
    state: State,
    ref_state: Option<State>,
    logits: Vec<f32>,
    ref_logits: Vec<f32>,
}

pub struct LockstepDecoder {
    target: Arc<Model>,
    state: State,
    runs: Vec<Run>,
    target_logits: Vec<f32>,
    out: Vec<f32>,
    rows: Vec<u32>,
    sparse: Vec<f32>,
    scratch: Vec<f32>,
    combine: CombineScratch,
}

impl LockstepDecoder {
    pub fn new(target: Arc<Model>, assistants: Vec<Assistant>, n_ctx: usize) -> Result<Self> {
        let v = target.cfg.n_vocab;
        let mut runs = Vec::new();
        for a in assistants {
            a.check(v)?;
            let mut state = a.model.new_state(n_ctx);
            a.model.attach_patches(&mut state, a.patches.clone())?;
            let ref_state = a.reference.as_ref().map(|r| r.new_state(n_ctx));
            runs.push(Run {
                spec: a,
                state,
                ref_state,
                logits: vec![0.0; v],
                ref_logits: vec![0.0; v],
            });
        }
        Ok(Self {
            state: target.new_state(n_ctx),
            target,
            runs,
            target_logits: vec![0.0; v],
            out: Vec::with_capacity(v),
            rows: Vec::with_capacity(v),
            sparse: vec![0.0; v],
            scratch: Vec::with_capacity(v),
            combine: CombineScratch::default(),
        })
    }

    /// Run the target with `patches` (the cache starts over when they change).
    pub fn with_target_patches(mut self, patches: Option<Arc<PatchSet>>) -> Result<Self> {
        self.target.attach_patches(&mut self.state, patches)?;
        Ok(self)
    }

    /// One ULD term with the filter on: the sparse path applies.
    fn sparse_uld(&self) -> bool {
        matches!(self.runs.as_slice(), [r] if r.spec.kind == TermKind::Uld && r.spec.filter > 0.0)
    }
}

impl Decoder for LockstepDecoder {
    fn n_vocab(&self) -> usize {
        self.target.cfg.n_vocab
    }
    fn n_ctx(&self) -> usize {
        self.state.n_ctx()
    }
    fn pos(&self) -> usize {
        self.state.pos
    }

    fn feed(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        let tl = self.target.forward(&mut self.state, tokens, None)?;
        self.target_logits.copy_from_slice(tl);
        let tl = &self.target_logits;
        if self.sparse_uld() {
            let run = &mut self.runs[0];
            let th = plausible_threshold_in(tl, run.spec.filter, &mut self.scratch);
            self.rows.clear();
            self.rows
                .extend((0..tl.len() as u32).filter(|&j| th.is_none_or(|th| tl[j as usize] >= th)));
            let n = self.rows.len();
            run.spec.model.forward_rows(
                &mut run.state,
                tokens,
                &self.rows,
                &mut self.sparse[..n],
            )?;
            self.out.clear();
            self.out.resize(tl.len(), f32::NEG_INFINITY);
            for (i, &j) in self.rows.iter().enumerate() {
                self.out[j as usize] = tl[j as usize] + run.spec.weight * self.sparse[i];
            }
            return Ok(&self.out);
        }
        for run in &mut self.runs {
            let l = run.spec.model.forward(&mut run.state, tokens, None)?;
            run.logits.copy_from_slice(l);
            if let (Some(m), Some(st)) = (&run.spec.reference, run.ref_state.as_mut()) {
                run.ref_logits.copy_from_slice(m.forward(st, tokens, None)?);
            }
        }
        let terms: Vec<Term> = self
            .runs
            .iter()
            .map(|r| Term {
                kind: r.spec.kind,
                weight: r.spec.weight,
                logits: &r.logits,
                reference: r.spec.reference.as_ref().map(|_| &r.ref_logits[..]),
                filter: r.spec.filter,
                score: r.spec.score,
            })
            .collect();
        combine_in(tl, &terms, Use::Sample, &mut self.out, &mut self.combine);
        Ok(&self.out)
    }

    fn truncate(&mut self, n: usize) {
        self.state.truncate(n);
        for r in &mut self.runs {
            r.state.truncate(n);
            if let Some(s) = r.ref_state.as_mut() {
                s.truncate(n);
            }
        }
    }
}
