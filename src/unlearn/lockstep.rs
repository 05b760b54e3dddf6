//! Lockstep decoding: the target and its assistants keep their own KV caches, prefill the same
//! prompt and step on the same tokens; their logits are combined before sampling.
//!
//! With one ULD term and its filter on, the assistant's output head is computed only on the
//! rows of the target's plausible set (the head is most of a small model's cost).
//! Sampling is invariant to a constant shift over the set, so raw logits suffice there.
//!
//! On that path, when the assistant's first blocks are the target's own (ULD's assistants
//! are truncated copies of the target with a LoRA: [`Model::shared_blocks`]), each decode
//! step runs both models' rows through those blocks together, so their weights are read once
//! per step for both ([`Model::forward_multi_shared`]); the numbers are the same bits.

use super::combine::{
    combine_in, plausible_threshold_in, CombineScratch, ScoreRule, Term, TermKind, Use,
};
use crate::generate::Decoder;
use crate::model::{Model, SharedBlocks, State, MAX_BATCH};
use crate::patch::PatchSet;
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
    /// A ULD term: weight `-alpha`, plausibility rate `filter`, no patches, the mass rule.
    pub fn uld(model: Arc<Model>, alpha: f32, filter: f32) -> Self {
        Self {
            model,
            kind: TermKind::Uld,
            weight: -alpha,
            filter,
            reference: None,
            patches: None,
            score: ScoreRule::Mass,
        }
    }

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

struct AssistantRun {
    spec: Assistant,
    state: State,
    ref_state: Option<State>,
    logits: Vec<f32>,
    ref_logits: Vec<f32>,
}

pub struct LockstepDecoder {
    target: Arc<Model>,
    state: State,
    runs: Vec<AssistantRun>,
    target_logits: Vec<f32>,
    out: Vec<f32>,
    rows: Vec<u32>,
    sparse: Vec<f32>,
    scratch: Vec<f32>,
    combine: CombineScratch,
    /// The blocks the sparse path's assistant shares with the target, if any.
    shared: Option<SharedBlocks>,
    /// The assistant's final hidden state of a shared step (`[MAX_BATCH / 2, n_embd]`).
    hidden: Vec<f32>,
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
            runs.push(AssistantRun {
                spec: a,
                state,
                ref_state,
                logits: vec![0.0; v],
                ref_logits: vec![0.0; v],
            });
        }
        let shared = match runs.as_slice() {
            [r] if r.spec.kind == TermKind::Uld && r.spec.filter > 0.0 => {
                target.shared_blocks(&r.spec.model)
            }
            _ => None,
        };
        let hidden = match shared {
            Some(_) => vec![0.0; MAX_BATCH / 2 * target.cfg.n_embd],
            None => Vec::new(),
        };
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
            shared,
            hidden,
        })
    }

    /// Whether decode steps run the blocks the assistant shares with the target once for
    /// both (on by default where they can; off: each model alone, the same numbers slower).
    pub fn with_shared_blocks(mut self, on: bool) -> Self {
        if !on {
            self.shared = None;
            self.hidden = Vec::new();
        }
        self
    }

    /// How many blocks a decode step runs once for the target and the assistant (0: none).
    pub fn shared_blocks(&self) -> usize {
        self.shared.map_or(0, |s| s.k())
    }

    /// The blocks a decode step of `n` sequences can share: on the sparse path with an
    /// unpatched target, one token per sequence.
    fn sharing(&self, n_tokens: usize) -> Option<SharedBlocks> {
        let ok = self.sparse_uld() && self.state.patches().is_none() && n_tokens <= MAX_BATCH / 2;
        self.shared.filter(|_| ok)
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

    /// The sparse path's rows: the target's plausible set at the term's rate.
    fn plausible_rows(&mut self) {
        let tl = &self.target_logits;
        let th = plausible_threshold_in(tl, self.runs[0].spec.filter, &mut self.scratch);
        self.rows.clear();
        self.rows
            .extend((0..tl.len() as u32).filter(|&j| th.is_none_or(|th| tl[j as usize] >= th)));
    }

    /// The sparse path's output: the term on the rows, `-inf` elsewhere.
    fn combine_sparse(&mut self) {
        let (tl, w) = (&self.target_logits, self.runs[0].spec.weight);
        self.out.clear();
        self.out.resize(tl.len(), f32::NEG_INFINITY);
        for (i, &j) in self.rows.iter().enumerate() {
            self.out[j as usize] = tl[j as usize] + w * self.sparse[i];
        }
    }

    /// The dense path's output, from every term's logits.
    fn combine_dense(&mut self) {
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
        combine_in(
            &self.target_logits,
            &terms,
            Use::Sample,
            &mut self.out,
            &mut self.combine,
        );
    }

    /// Step a group of lockstep decoders of the same models ([`Decoder::group`]) by one token
    /// each: the targets in one batched forward, then each assistant (and reference) in one,
    /// the sparse heads per sequence. Each decoder gets what its own [`Decoder::feed`] gives.
    fn feed_group(
        group: &mut [&mut dyn Decoder],
        tokens: &[u32],
        done: &mut dyn FnMut(usize, Result<&[f32]>),
    ) {
        let mut ds: Vec<&mut LockstepDecoder> = group
            .iter_mut()
            .map(|d| {
                d.as_any_mut()
                    .and_then(|a| a.downcast_mut::<LockstepDecoder>())
                    .expect("a group holds lockstep decoders")
            })
            .collect();
        let r = Self::step_group(&mut ds, tokens);
        for (i, d) in ds.iter().enumerate() {
            match &r {
                Ok(()) => done(i, Ok(&d.out)),
                Err(e) => done(i, Err(e.for_each_caller())),
            }
        }
    }

    fn step_group(ds: &mut [&mut LockstepDecoder], tokens: &[u32]) -> Result<()> {
        let Some(first) = ds.first() else {
            return Ok(());
        };
        let target = first.target.clone();
        let sparse = first.sparse_uld();
        let n_runs = first.runs.len();
        let models: Vec<(Arc<Model>, Option<Arc<Model>>)> = first
            .runs
            .iter()
            .map(|r| (r.spec.model.clone(), r.spec.reference.clone()))
            .collect();
        if let Some(shared) = first.sharing(ds.len()) {
            return Self::step_group_shared(ds, tokens, &shared);
        }
        {
            let mut sts: Vec<&mut State> = ds.iter_mut().map(|d| &mut d.state).collect();
            target.forward_multi(&mut sts, tokens)?;
        }
        for d in ds.iter_mut() {
            let d = &mut **d;
            d.target_logits.copy_from_slice(&d.state.logits);
        }
        if sparse {
            // Each decoder's plausible set on its own thread of the pool.
            target.pool.for_each_mut(ds, |d| d.plausible_rows());
            let mut sts = Vec::with_capacity(ds.len());
            let mut rows = Vec::with_capacity(ds.len());
            let mut outs = Vec::with_capacity(ds.len());
            for d in ds.iter_mut() {
                let LockstepDecoder {
                    runs,
                    rows: r,
                    sparse: sp,
                    ..
                } = &mut **d;
                let n = r.len();
                sts.push(&mut runs[0].state);
                rows.push(&r[..]);
                outs.push(&mut sp[..n]);
            }
            models[0]
                .0
                .forward_multi_rows(&mut sts, tokens, &rows, &mut outs)?;
            target.pool.for_each_mut(ds, |d| d.combine_sparse());
            return Ok(());
        }
        for (k, (m, reference)) in models.iter().enumerate().take(n_runs) {
            let mut sts: Vec<&mut State> = ds.iter_mut().map(|d| &mut d.runs[k].state).collect();
            m.forward_multi(&mut sts, tokens)?;
            if let Some(rm) = reference {
                let mut sts: Vec<&mut State> = ds
                    .iter_mut()
                    .map(|d| {
                        d.runs[k]
                            .ref_state
                            .as_mut()
                            .expect("a pair term's reference")
                    })
                    .collect();
                rm.forward_multi(&mut sts, tokens)?;
            }
            for d in ds.iter_mut() {
                let run = &mut d.runs[k];
                run.logits.copy_from_slice(&run.state.logits);
                if let Some(st) = &run.ref_state {
                    run.ref_logits.copy_from_slice(&st.logits);
                }
            }
        }
        target.pool.for_each_mut(ds, |d| d.combine_dense());
        Ok(())
    }
}

impl LockstepDecoder {
    /// [`LockstepDecoder::step_group`] on the sparse path with shared blocks: the targets'
    /// and the assistants' rows through the shared blocks at once, the rest of the target,
    /// its plausible sets, then the assistants' sparse heads per sequence.
    fn step_group_shared(
        ds: &mut [&mut LockstepDecoder],
        tokens: &[u32],
        shared: &SharedBlocks,
    ) -> Result<()> {
        let target = ds[0].target.clone();
        let am = ds[0].runs[0].spec.model.clone();
        let (d, e) = (ds.len(), am.cfg.n_embd);
        {
            let mut hidden = std::mem::take(&mut ds[0].hidden);
            let mut sts: Vec<&mut State> = Vec::with_capacity(2 * d);
            let mut runs = Vec::with_capacity(d);
            for dec in ds.iter_mut() {
                let LockstepDecoder { state, runs: r, .. } = &mut **dec;
                sts.push(state);
                runs.push(&mut r[0].state);
            }
            sts.extend(runs);
            let r = target.forward_multi_shared(&am, shared, &mut sts, tokens, &mut hidden);
            drop(sts);
            // Each decoder's own hidden state, for its sparse head.
            for (i, dec) in ds.iter_mut().enumerate().skip(1) {
                dec.hidden[..e].copy_from_slice(&hidden[i * e..(i + 1) * e]);
            }
            ds[0].hidden = hidden;
            r?;
        }
        target.pool.for_each_mut(ds, |dec| {
            dec.target_logits.copy_from_slice(&dec.state.logits);
            dec.plausible_rows();
        });
        for dec in ds.iter_mut() {
            let LockstepDecoder {
                runs,
                rows,
                sparse,
                hidden,
                ..
            } = &mut **dec;
            let n = rows.len();
            am.head_rows(&mut runs[0].state, &hidden[..e], rows, &mut sparse[..n])?;
        }
        target.pool.for_each_mut(ds, |dec| dec.combine_sparse());
        Ok(())
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
        if let (Some(shared), 1) = (self.sharing(1), tokens.len()) {
            let run = &mut self.runs[0];
            let am = run.spec.model.clone();
            let mut both = [&mut self.state, &mut run.state];
            self.target
                .forward_multi_shared(&am, &shared, &mut both, tokens, &mut self.hidden)?;
            self.target_logits.copy_from_slice(&self.state.logits);
            self.plausible_rows();
            let (e, n) = (am.cfg.n_embd, self.rows.len());
            let run = &mut self.runs[0];
            am.head_rows(
                &mut run.state,
                &self.hidden[..e],
                &self.rows,
                &mut self.sparse[..n],
            )?;
            self.combine_sparse();
            return Ok(&self.out);
        }
        let tl = self.target.forward(&mut self.state, tokens, None)?;
        self.target_logits.copy_from_slice(tl);
        if self.sparse_uld() {
            self.plausible_rows();
            let run = &mut self.runs[0];
            let n = self.rows.len();
            run.spec.model.forward_rows(
                &mut run.state,
                tokens,
                &self.rows,
                &mut self.sparse[..n],
            )?;
            self.combine_sparse();
            return Ok(&self.out);
        }
        for run in &mut self.runs {
            let l = run.spec.model.forward(&mut run.state, tokens, None)?;
            run.logits.copy_from_slice(l);
            if let (Some(m), Some(st)) = (&run.spec.reference, run.ref_state.as_mut()) {
                run.ref_logits.copy_from_slice(m.forward(st, tokens, None)?);
            }
        }
        self.combine_dense();
        Ok(&self.out)
    }

    /// Lockstep decoders of the same target, assistants and references, with the same patches
    /// and the same path (sparse or dense), step together.
    fn group(&self) -> Option<(Vec<usize>, crate::generate::GroupFeed)> {
        let ptr = |m: &Arc<Model>| Arc::as_ptr(m) as usize;
        let pat = |st: &State| st.patches().map_or(0, |p| Arc::as_ptr(p) as usize);
        let mut key = vec![
            ptr(&self.target),
            pat(&self.state),
            self.sparse_uld() as usize,
            self.shared.is_some() as usize,
            self.runs.len(),
        ];
        for r in &self.runs {
            key.push(ptr(&r.spec.model));
            key.push(pat(&r.state));
            key.push(r.spec.reference.as_ref().map_or(0, ptr));
        }
        Some((key, Self::feed_group))
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
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
