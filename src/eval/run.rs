//! Running a model (a "side": the base, a forgotten profile, a reference) over TOFU's sets:
//! greedy answers for ROUGE, teacher-forced losses of the answer, its paraphrase and the
//! perturbed answers for probability and truth ratio, and per-token statistics of the forget
//! and holdout answers for membership inference.
//!
//! Greedy answers are decoded [`GEN_BATCH`] questions at a time, one batched forward per model
//! per step (a ULD profile: the targets in one, the assistants in another;
//! [`crate::generate::feed_each`]). Every answer of a question is scored against one prefill
//! of the question ([`Scorer`]); a sweep scores every point from the same forward passes.

use super::data::{QaItem, TofuData};
use super::mia::{self, MiaScores, TokenStats};
use super::rouge::rouge_l_recall;
use super::tofu::{self, ItemScores, SetKind, SetSummary};
use crate::generate::{feed_each, sampler::argmax_raw, Decoder};
use crate::model::Model;
use crate::patch::PatchSet;
use crate::tokenizer::Tokenizer;
use crate::unlearn::{Assistant, Scorer};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

/// Questions decoded together.
pub const GEN_BATCH: usize = 8;

/// A model to evaluate: a base with a profile's assistants and patches (none: the plain model).
#[derive(Clone)]
pub struct Side {
    /// What the report calls it (`base`, a profile's name, a file's stem).
    pub name: String,
    pub model: Arc<Model>,
    pub tok: Arc<Tokenizer>,
    pub terms: Vec<Assistant>,
    pub patches: Option<Arc<PatchSet>>,
    /// Settings and file hashes, for the report.
    pub audit: serde_json::Value,
}

impl Side {
    /// The question as the user's turn of the model's chat template, ready for the answer.
    pub fn prompt(&self, question: &str) -> Result<Vec<u32>> {
        let arch = self.model.cfg.arch.name();
        Ok(crate::forge::ablate::chat_tokens(&self.tok, arch, question, None)?.0)
    }

    /// An answer's tokens, as they follow the prompt.
    pub fn answer(&self, text: &str) -> Vec<u32> {
        self.tok.encode(text, false, false)
    }

    pub fn scorer(&self, n_ctx: usize) -> Result<Scorer> {
        Scorer::new(
            self.model.clone(),
            self.terms.clone(),
            self.patches.clone(),
            n_ctx,
        )
    }

    pub fn decoder(&self, n_ctx: usize) -> Result<Box<dyn Decoder>> {
        crate::unlearn::decoder(
            self.model.clone(),
            self.terms.clone(),
            self.patches.clone(),
            n_ctx,
        )
    }
}

/// How an evaluation runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most tokens of a greedy answer.
    pub max_new: usize,
    /// Tokens of each cache.
    pub n_ctx: usize,
    /// Min-K% / Min-K%++ fraction.
    pub k: f64,
    /// Only the forget set's losses (the reference model of forget quality needs no more).
    pub forget_only: bool,
    /// No greedy answers (no ROUGE, so no model utility): the losses, truth ratios and
    /// membership scores only.
    pub score_only: bool,
    /// With a sweep: greedy answers only at these points (by index); `None`: at every point.
    pub answer_points: Option<Vec<usize>>,
}

impl Options {
    /// Whether point `k` answers greedily.
    pub fn answering(&self, k: usize) -> bool {
        !self.forget_only
            && !self.score_only
            && self.answer_points.as_ref().is_none_or(|v| v.contains(&k))
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_new: 200,
            n_ctx: 1024,
            k: 0.2,
            forget_only: false,
            score_only: false,
            answer_points: None,
        }
    }
}

/// What one item scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    pub question: String,
    pub answer: String,
    /// The greedy answer (absent when the set was only scored).
    pub generated: Option<String>,
    pub rouge_l_recall: Option<f64>,
    /// Mean NLL per token of the answer.
    pub gt_loss: f64,
    pub gt_tokens: usize,
    /// Mean NLL per token of the paraphrased answer (the answer where there is none).
    pub paraphrased_loss: f64,
    /// Mean NLL per token of each perturbed answer.
    pub perturbed_loss: Vec<f64>,
    /// Membership-inference scores of the answer (forget and holdout sets).
    pub mia: Option<MiaScores>,
}

impl ItemResult {
    pub fn scores(&self) -> ItemScores {
        ItemScores {
            avg_gt_loss: self.gt_loss,
            perturb_losses: self.perturbed_loss.clone(),
            paraphrased_loss: self.paraphrased_loss,
            rouge_l_recall: self.rouge_l_recall.unwrap_or(0.0),
        }
    }
}

/// One set's items and their summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetResult {
    pub name: String,
    pub kind: SetKind,
    pub summary: SetSummary,
    pub items: Vec<ItemResult>,
}

/// ROC AUC of each membership-inference score, forget (members) against holdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MiaAuc {
    pub k: f64,
    pub loss: f64,
    pub zlib: f64,
    pub min_k: f64,
    pub min_k_pp: f64,
}

/// Everything one side scored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideResult {
    pub name: String,
    pub audit: serde_json::Value,
    /// Forget, then (unless forget only) retain, real authors, world facts.
    pub sets: Vec<SetResult>,
    pub holdout: Vec<ItemResult>,
    pub model_utility: Option<f64>,
    /// The harmonic mean of the six probability and truth-ratio numbers of model utility
    /// (everything but ROUGE: what a score-only evaluation can tell).
    #[serde(default)]
    pub scored_utility: Option<f64>,
    /// KS p-value of the forget truth ratios against the reference's (set by the caller).
    pub forget_quality: Option<f64>,
    pub mia: Option<MiaAuc>,
    pub seconds: f64,
}

impl SideResult {
    pub fn set(&self, kind: SetKind) -> Option<&SetResult> {
        self.sets.iter().find(|s| s.kind == kind)
    }

    /// The raw truth ratios `R` of the forget items (forget quality compares these).
    pub fn forget_truth_ratios(&self) -> Vec<f64> {
        self.set(SetKind::Forget)
            .map(|s| {
                let items: Vec<ItemScores> = s.items.iter().map(ItemResult::scores).collect();
                tofu::raw_truth_ratios(&items)
            })
            .unwrap_or_default()
    }
}

/// Work units of [`evaluate`] (for a progress bar): one per item generated and one per item
/// scored.
pub fn work(data: &TofuData, opts: &Options, n_points: usize) -> u64 {
    if opts.forget_only {
        return (data.forget.len() * n_points) as u64;
    }
    let scored = data.forget.len()
        + data.holdout.len()
        + data.retain.len()
        + data.real_authors.len()
        + data.world_facts.len();
    let answering = (0..n_points).filter(|&k| opts.answering(k)).count();
    (scored * n_points + (scored - data.holdout.len()) * answering) as u64
}

/// What an evaluation needs of a model: greedy answers and teacher-forced scores. Local
/// models ([`Local`]) and models behind a `lethe serve` (`super::remote`) provide it.
pub trait Backend {
    /// What the report calls the model.
    fn name(&self) -> String;
    /// Settings and file hashes, for the report.
    fn audit(&self) -> serde_json::Value;
    /// The greedy answer to each question; `tick(1)` per answer.
    fn answers(
        &mut self,
        questions: &[&str],
        opts: &Options,
        tick: &dyn Fn(u64),
    ) -> Result<Vec<String>>;
    /// Each continuation's per-token log-probabilities after `question` (scoring use); with
    /// `stats`, the first continuation's per-token Min-K%++ statistics too.
    fn score(&mut self, question: &str, conts: &[&str], stats: bool) -> Result<Scored>;
    /// The settings evaluated at once (a sweep's points; 1: the model as it is).
    fn n_points(&self) -> usize {
        1
    }
    /// What point `k` is called in a report, and its settings.
    fn point(&self, _k: usize) -> (String, serde_json::Value) {
        (self.name(), self.audit())
    }
    /// [`Backend::score`] at every point (one forward pass of each model for all of them).
    fn score_points(&mut self, question: &str, conts: &[&str], stats: bool) -> Result<Vec<Scored>> {
        Ok(vec![self.score(question, conts, stats)?])
    }
    /// [`Backend::answers`] at point `k`.
    fn answers_at(
        &mut self,
        _k: usize,
        questions: &[&str],
        opts: &Options,
        tick: &dyn Fn(u64),
    ) -> Result<Vec<String>> {
        self.answers(questions, opts, tick)
    }
}

/// What [`Backend::score`] returns.
#[derive(Debug, Clone, Default)]
pub struct Scored {
    /// Per continuation, per token.
    pub logprobs: Vec<Vec<f64>>,
    /// Per token of the first continuation (when asked for).
    pub stats: Vec<TokenStats>,
}

/// One point of a sweep over the assistant terms' settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPoint {
    /// What the report calls it (`alpha=0.5 filter=0.01`).
    pub name: String,
    /// Each term's `(weight, filter)`.
    pub terms: Vec<(f32, f32)>,
}

/// A model evaluated in this process, at its own settings or at each point of a sweep.
pub struct Local {
    pub side: Side,
    scorer: Scorer,
    points: Vec<SweepPoint>,
}

impl Local {
    pub fn new(side: Side, n_ctx: usize) -> Result<Self> {
        let scorer = side.scorer(n_ctx)?;
        Ok(Self {
            side,
            scorer,
            points: Vec::new(),
        })
    }

    /// The same side evaluated at each of `points` (its own settings ignored).
    pub fn with_points(mut self, points: Vec<SweepPoint>) -> Result<Self> {
        for p in &points {
            if p.terms.len() != self.side.terms.len() {
                return Err(Error::Invalid(format!(
                    "sweep point {:?} sets {} terms; {} has {}",
                    p.name,
                    p.terms.len(),
                    self.side.name,
                    self.side.terms.len()
                )));
            }
        }
        self.points = points;
        Ok(self)
    }

    /// The side at point `k` (its terms' weights and filters set).
    fn side_at(&self, k: usize) -> Side {
        let mut side = self.side.clone();
        if let Some(p) = self.points.get(k) {
            for (t, &(w, f)) in side.terms.iter_mut().zip(&p.terms) {
                t.weight = w;
                t.filter = f;
            }
        }
        side
    }
}

impl Backend for Local {
    fn name(&self) -> String {
        self.side.name.clone()
    }

    fn audit(&self) -> serde_json::Value {
        self.side.audit.clone()
    }

    fn answers(
        &mut self,
        questions: &[&str],
        opts: &Options,
        tick: &dyn Fn(u64),
    ) -> Result<Vec<String>> {
        let side = &self.side;
        let prompts = questions
            .iter()
            .map(|q| side.prompt(q))
            .collect::<Result<Vec<_>>>()?;
        let out = greedy_batch(side, &prompts, opts.max_new, opts.n_ctx, tick)?;
        Ok(out
            .iter()
            .map(|t| side.tok.decode(t, false).trim().to_string())
            .collect())
    }

    fn score(&mut self, question: &str, conts: &[&str], stats: bool) -> Result<Scored> {
        let mut all = self.score_settings(question, conts, stats, &[Vec::new()])?;
        Ok(all.pop().unwrap_or_default())
    }

    fn n_points(&self) -> usize {
        self.points.len().max(1)
    }

    fn point(&self, k: usize) -> (String, serde_json::Value) {
        match self.points.get(k) {
            None => (self.name(), self.audit()),
            Some(p) => {
                let mut audit = self.side.audit.clone();
                if let Some(o) = audit.as_object_mut() {
                    o.insert("sweep_point".into(), serde_json::json!(p.name));
                    o.insert(
                        "terms".into(),
                        serde_json::json!(p
                            .terms
                            .iter()
                            .map(|&(w, f)| serde_json::json!({"weight": w, "filter": f}))
                            .collect::<Vec<_>>()),
                    );
                }
                (format!("{} {}", self.side.name, p.name), audit)
            }
        }
    }

    fn score_points(&mut self, question: &str, conts: &[&str], stats: bool) -> Result<Vec<Scored>> {
        let points: Vec<Vec<(f32, f32)>> = if self.points.is_empty() {
            vec![Vec::new()]
        } else {
            self.points.iter().map(|p| p.terms.clone()).collect()
        };
        self.score_settings(question, conts, stats, &points)
    }

    fn answers_at(
        &mut self,
        k: usize,
        questions: &[&str],
        opts: &Options,
        tick: &dyn Fn(u64),
    ) -> Result<Vec<String>> {
        let side = self.side_at(k);
        let prompts = questions
            .iter()
            .map(|q| side.prompt(q))
            .collect::<Result<Vec<_>>>()?;
        let out = greedy_batch(&side, &prompts, opts.max_new, opts.n_ctx, tick)?;
        Ok(out
            .iter()
            .map(|t| side.tok.decode(t, false).trim().to_string())
            .collect())
    }
}

impl Local {
    /// Each continuation scored at each of `points` (one forward pass for all).
    fn score_settings(
        &mut self,
        question: &str,
        conts: &[&str],
        stats: bool,
        points: &[Vec<(f32, f32)>],
    ) -> Result<Vec<Scored>> {
        let side = &self.side;
        self.scorer.set_prompt(&side.prompt(question)?)?;
        let mut out = vec![Scored::default(); points.len()];
        for (i, c) in conts.iter().enumerate() {
            let t = side.answer(c);
            if t.is_empty() {
                return Err(Error::Invalid(format!(
                    "an answer to {question:?} has no tokens: {c:?}"
                )));
            }
            let want_stats = stats && i == 0;
            if let Some(sparse) = self.scorer.score_points_sparse(&t, points, want_stats)? {
                for (k, toks) in sparse.into_iter().enumerate() {
                    if want_stats {
                        out[k].stats = toks.clone();
                    }
                    out[k]
                        .logprobs
                        .push(toks.iter().map(|m| m.logprob).collect());
                }
                continue;
            }
            let mut st: Vec<Vec<Result<TokenStats>>> =
                (0..points.len()).map(|_| Vec::new()).collect();
            let lp = self.scorer.score_points(&t, points, |k, j, logp| {
                if want_stats {
                    st[k].push(mia::mink_stats(logp, t[j]));
                }
            })?;
            for (k, (lp, st)) in lp.into_iter().zip(st).enumerate() {
                if want_stats {
                    out[k].stats = st.into_iter().collect::<Result<_>>()?;
                }
                out[k].logprobs.push(lp);
            }
        }
        Ok(out)
    }
}

/// Evaluate the model behind `be` on `data`; `tick(n)` reports `n` more units of [`work`]
/// done.
pub fn evaluate(
    be: &mut dyn Backend,
    data: &TofuData,
    opts: &Options,
    tick: &dyn Fn(u64),
) -> Result<SideResult> {
    let mut all = evaluate_points(be, data, opts, tick)?;
    Ok(all.swap_remove(0))
}

/// Evaluate the model behind `be` at each of its points ([`Backend::n_points`]): every
/// continuation is scored once for all points; greedy answers (unless `opts.score_only`) are
/// decoded point by point. `tick` counts [`work`] units of all points together.
pub fn evaluate_points(
    be: &mut dyn Backend,
    data: &TofuData,
    opts: &Options,
    tick: &dyn Fn(u64),
) -> Result<Vec<SideResult>> {
    let t0 = Instant::now();
    let np = be.n_points();
    let mut sets: Vec<Vec<SetResult>> = vec![Vec::new(); np];
    let mut list: Vec<(&str, SetKind, &[QaItem])> = vec![("forget", SetKind::Forget, &data.forget)];
    if !opts.forget_only {
        list.extend([
            ("retain", SetKind::Retain, &data.retain[..]),
            ("real_authors", SetKind::RealAuthors, &data.real_authors[..]),
            ("world_facts", SetKind::WorldFacts, &data.world_facts[..]),
        ]);
    }
    // Scoring ticks once per item for all points; answers tick per point.
    let tick_points = |n: u64| tick(n * np as u64);
    for (name, kind, items) in list {
        let qs: Vec<&str> = items.iter().map(|q| q.question.as_str()).collect();
        let gen: Vec<Option<Vec<String>>> = (0..np)
            .map(|k| {
                opts.answering(k)
                    .then(|| be.answers_at(k, &qs, opts, tick))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let mut out: Vec<Vec<ItemResult>> = vec![Vec::with_capacity(items.len()); np];
        for (i, item) in items.iter().enumerate() {
            let mia = kind == SetKind::Forget;
            for (k, mut r) in score_item_points(be, item, mia, opts.k)?
                .into_iter()
                .enumerate()
            {
                if let Some(g) = &gen[k] {
                    r.rouge_l_recall = Some(rouge_l_recall(&item.answer, &g[i]));
                    r.generated = Some(g[i].clone());
                }
                out[k].push(r);
            }
            tick_points(1);
        }
        for (k, out) in out.into_iter().enumerate() {
            let scores: Vec<ItemScores> = out.iter().map(ItemResult::scores).collect();
            sets[k].push(SetResult {
                name: name.into(),
                kind,
                summary: tofu::summarize(kind, &scores)?,
                items: out,
            });
        }
    }
    let mut holdout: Vec<Vec<ItemResult>> = vec![Vec::new(); np];
    if !opts.forget_only {
        for item in &data.holdout {
            for (k, r) in score_item_points(be, item, true, opts.k)?
                .into_iter()
                .enumerate()
            {
                holdout[k].push(r);
            }
            tick_points(1);
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let mut results = Vec::with_capacity(np);
    for (k, (sets, holdout)) in sets.into_iter().zip(holdout).enumerate() {
        let mut mia_auc = None;
        if !opts.forget_only {
            let forget = &sets[0].items;
            let pick = |f: fn(&MiaScores) -> f64, v: &[ItemResult]| -> Vec<f64> {
                v.iter().filter_map(|r| r.mia.as_ref().map(f)).collect()
            };
            let auc = |f: fn(&MiaScores) -> f64| mia::roc_auc(&pick(f, forget), &pick(f, &holdout));
            if !forget.is_empty() && !holdout.is_empty() {
                mia_auc = Some(MiaAuc {
                    k: opts.k,
                    loss: auc(|m| m.loss),
                    zlib: auc(|m| m.zlib),
                    min_k: auc(|m| m.min_k),
                    min_k_pp: auc(|m| m.min_k_pp),
                });
            }
        }
        let three = match (
            sets.iter().find(|s| s.kind == SetKind::Retain),
            sets.iter().find(|s| s.kind == SetKind::RealAuthors),
            sets.iter().find(|s| s.kind == SetKind::WorldFacts),
        ) {
            (Some(r), Some(a), Some(w)) => Some((&r.summary, &a.summary, &w.summary)),
            _ => None,
        };
        let model_utility = three
            .filter(|_| opts.answering(k))
            .map(|(r, a, w)| tofu::model_utility(r, a, w));
        let scored_utility = three.map(|(r, a, w)| tofu::scored_utility(r, a, w));
        let (name, audit) = be.point(k);
        results.push(SideResult {
            name,
            audit,
            sets,
            holdout,
            model_utility,
            scored_utility,
            forget_quality: None,
            mia: mia_auc,
            seconds,
        });
    }
    Ok(results)
}

/// Mean NLL per token from per-token log-probabilities.
fn mean_nll(lp: &[f64]) -> f64 {
    -lp.iter().sum::<f64>() / lp.len().max(1) as f64
}

/// Score an item's answer, paraphrase and perturbed answers (one prefill of its question);
/// with `mia`, the answer's membership-inference scores too.
pub fn score_item(be: &mut dyn Backend, item: &QaItem, mia: bool, k: f64) -> Result<ItemResult> {
    let mut all = score_item_points(be, item, mia, k)?;
    Ok(all.swap_remove(0))
}

/// [`score_item`] at every point of `be`.
pub fn score_item_points(
    be: &mut dyn Backend,
    item: &QaItem,
    mia: bool,
    k: f64,
) -> Result<Vec<ItemResult>> {
    // Where there is no paraphrase the answer stands in for it: its loss is the answer's,
    // scored once.
    let mut conts = vec![item.answer.as_str()];
    conts.extend(item.paraphrased.as_deref());
    let first_perturbed = conts.len();
    conts.extend(item.perturbed.iter().map(String::as_str));
    let all = be.score_points(&item.question, &conts, mia)?;
    let para = if item.paraphrased.is_some() { 1 } else { 0 };
    all.into_iter()
        .map(|s| {
            if s.logprobs.len() != conts.len() {
                return Err(Error::Invalid(format!(
                    "{} scores for {} answers",
                    s.logprobs.len(),
                    conts.len()
                )));
            }
            Ok(ItemResult {
                question: item.question.clone(),
                answer: item.answer.clone(),
                generated: None,
                rouge_l_recall: None,
                gt_loss: mean_nll(&s.logprobs[0]),
                gt_tokens: s.logprobs[0].len(),
                paraphrased_loss: mean_nll(&s.logprobs[para]),
                perturbed_loss: s.logprobs[first_perturbed..]
                    .iter()
                    .map(|l| mean_nll(l))
                    .collect(),
                mia: mia
                    .then(|| mia::scores(&s.stats, &item.answer, k))
                    .transpose()?,
            })
        })
        .collect()
}

/// Greedy continuations of `prompts` (token ids, without the end-of-generation token).
pub fn greedy_batch(
    side: &Side,
    prompts: &[Vec<u32>],
    max_new: usize,
    n_ctx: usize,
    tick: &dyn Fn(u64),
) -> Result<Vec<Vec<u32>>> {
    struct Running {
        item: usize,
        next: u32,
    }
    let n_dec = GEN_BATCH.min(prompts.len()).max(1);
    let mut decs = (0..n_dec)
        .map(|_| side.decoder(n_ctx))
        .collect::<Result<Vec<_>>>()?;
    let mut slots: Vec<Option<Running>> = (0..n_dec).map(|_| None).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut queue = 0..prompts.len();
    loop {
        // Start a question in every free slot, and retire those that ended.
        for (s, dec) in slots.iter_mut().zip(decs.iter_mut()) {
            loop {
                if let Some(r) = s {
                    let ended = side.tok.is_eog(r.next)
                        || out[r.item].len() >= max_new
                        || dec.pos() + 1 > dec.n_ctx();
                    if !ended {
                        break;
                    }
                    *s = None;
                    tick(1);
                }
                let Some(item) = queue.next() else {
                    break;
                };
                dec.truncate(0);
                let p = &prompts[item];
                if p.len() > dec.n_ctx() {
                    return Err(Error::ContextFull {
                        needed: p.len(),
                        n_ctx: dec.n_ctx(),
                    });
                }
                let next = argmax_raw(dec.feed(p)?);
                *s = Some(Running { item, next });
            }
        }
        let active: Vec<usize> = (0..n_dec).filter(|&i| slots[i].is_some()).collect();
        if active.is_empty() {
            return Ok(out);
        }
        let mut toks = Vec::with_capacity(active.len());
        for &i in &active {
            let r = slots[i].as_ref().expect("active");
            out[r.item].push(r.next);
            toks.push(r.next);
        }
        let mut refs: Vec<&mut dyn Decoder> = Vec::with_capacity(active.len());
        for (i, d) in decs.iter_mut().enumerate() {
            if slots[i].is_some() {
                refs.push(d.as_mut());
            }
        }
        let mut err = None;
        feed_each(&mut refs, &toks, |j, r| match r {
            Ok(l) => {
                if let Some(s) = slots[active[j]].as_mut() {
                    s.next = argmax_raw(l);
                }
            }
            Err(e) => err = Some(e),
        });
        if let Some(e) = err {
            return Err(e);
        }
    }
}
