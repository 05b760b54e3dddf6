//! TOFU's aggregate metrics from per-item losses, with the rules that reproduce the ULD
//! authors' published numbers for TOFU's Llama-2-7B retain90 model exactly:
//!
//! - probability: `mean exp(-avg_gt_loss)` on the retain set; on real authors, world facts and
//!   the forget set the normalised `mean p(a) / (p(a) + sum_j p(perturbed_j))`, p = exp(-loss);
//! - ROUGE: mean ROUGE-L recall of the greedy answer against the ground truth;
//! - truth ratio: R = exp(mean_j loss(perturbed_j) - loss(paraphrased)) per item, reported as
//!   `mean min(R, 1/R)` on the forget set and `mean max(0, 1 - 1/R)` elsewhere;
//! - model utility: the harmonic mean of the nine retain / real-author / world-fact numbers;
//! - forget quality: the two-sample KS p-value between the raw R of the unlearned model and of
//!   a model never trained on the forget set.
//!
//! TOFU scores only the first 300 items of the retain set (of 400); truncating is the caller's
//! job: [`summarize`] uses every item it is given.

use super::ks::ks_2samp;
use crate::{Error, Result};

/// Which TOFU evaluation set a list of items comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SetKind {
    /// The retain set (authors kept; TOFU scores its first 300 items).
    Retain,
    /// Real-world authors.
    RealAuthors,
    /// World facts.
    WorldFacts,
    /// The forget set.
    Forget,
}

/// One item's scores. Losses are NLLs in nats, averaged over the answer's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemScores {
    /// Mean NLL per token of the ground-truth answer.
    pub avg_gt_loss: f64,
    /// Length-normalised NLL of each perturbed (wrong) answer.
    pub perturb_losses: Vec<f64>,
    /// Length-normalised NLL of the paraphrased answer; on real authors and world facts, which
    /// have no paraphrase, of the answer itself.
    pub paraphrased_loss: f64,
    /// ROUGE-L recall of the generated answer against the ground truth.
    pub rouge_l_recall: f64,
}

/// One set's three numbers.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SetSummary {
    /// Answer probability, plain (retain) or normalised against the perturbed answers.
    pub probability: f64,
    /// Mean ROUGE-L recall.
    pub rouge: f64,
    /// Truth ratio in the set's form: `min(R, 1/R)` (forget) or `max(0, 1 - 1/R)` averaged.
    pub truth_ratio: f64,
}

/// The raw truth ratio R = exp(mean perturbed loss - paraphrased loss) of one item: above 1
/// when the model prefers the paraphrase to the wrong answers.
pub fn raw_truth_ratio(item: &ItemScores) -> f64 {
    let mean = item.perturb_losses.iter().sum::<f64>() / item.perturb_losses.len() as f64;
    (mean - item.paraphrased_loss).exp()
}

/// [`raw_truth_ratio`] of every item, the input of [`forget_quality`].
pub fn raw_truth_ratios(items: &[ItemScores]) -> Vec<f64> {
    items.iter().map(raw_truth_ratio).collect()
}

/// The set's probability, ROUGE and truth ratio (rules in the module doc).
///
/// Errors on no items or an item without perturbed answers.
pub fn summarize(kind: SetKind, items: &[ItemScores]) -> Result<SetSummary> {
    if items.is_empty() {
        return Err(Error::Invalid("tofu summarize: no items".into()));
    }
    if let Some(i) = items.iter().position(|it| it.perturb_losses.is_empty()) {
        return Err(Error::Invalid(format!(
            "tofu summarize: item {i} has no perturbed answer"
        )));
    }
    let mean =
        |f: &dyn Fn(&ItemScores) -> f64| items.iter().map(f).sum::<f64>() / items.len() as f64;
    let probability = match kind {
        SetKind::Retain => mean(&|it| (-it.avg_gt_loss).exp()),
        _ => mean(&|it| {
            let p = (-it.avg_gt_loss).exp();
            let wrong: f64 = it.perturb_losses.iter().map(|l| (-l).exp()).sum();
            p / (p + wrong)
        }),
    };
    let truth_ratio = match kind {
        SetKind::Forget => mean(&|it| {
            let r = raw_truth_ratio(it);
            r.min(1.0 / r)
        }),
        _ => mean(&|it| (1.0 - 1.0 / raw_truth_ratio(it)).max(0.0)),
    };
    Ok(SetSummary {
        probability,
        rouge: mean(&|it| it.rouge_l_recall),
        truth_ratio,
    })
}

/// Model utility: the harmonic mean of the nine numbers of the retain, real-author and
/// world-fact summaries (0 if any of them is 0).
pub fn model_utility(retain: &SetSummary, real: &SetSummary, world: &SetSummary) -> f64 {
    let nine: Vec<f64> = [retain, real, world]
        .iter()
        .flat_map(|s| [s.probability, s.rouge, s.truth_ratio])
        .collect();
    if nine.contains(&0.0) {
        return 0.0;
    }
    nine.len() as f64 / nine.iter().map(|v| 1.0 / v).sum::<f64>()
}

/// The part of model utility that needs no greedy answers: the harmonic mean of the six
/// probability and truth-ratio numbers of the retain, real-author and world-fact sets (a
/// score-only evaluation has no ROUGE). Not TOFU's model utility: lethe's reports name it
/// "scored utility".
pub fn scored_utility(retain: &SetSummary, real: &SetSummary, world: &SetSummary) -> f64 {
    let six: Vec<f64> = [retain, real, world]
        .iter()
        .flat_map(|s| [s.probability, s.truth_ratio])
        .collect();
    if six.contains(&0.0) {
        return 0.0;
    }
    six.len() as f64 / six.iter().map(|v| 1.0 / v).sum::<f64>()
}

/// Forget quality: the two-sample KS p-value ([`ks_2samp`], as scipy) between the raw truth
/// ratios of the unlearned model and those of a model never trained on the forget set.
pub fn forget_quality(unlearned_raw: &[f64], reference_raw: &[f64]) -> Result<f64> {
    Ok(ks_2samp(unlearned_raw, reference_raw)?.pvalue)
}
