//! Choosing a forgotten profile's decode-time settings (ULD's alpha and filter) by a rule that
//! reads no evaluation data.
//!
//! The question TOFU's forget quality asks is whether the model treats the forget set as a
//! model that never learned it would. The rule asks the same of data that is not TOFU's
//! evaluation: held-out *training* rows of the forget authors (a paraphrase of each answer
//! and wrong answers that training did not use), against a yardstick of what "never learned"
//! looks like. Two yardsticks:
//!
//! - a **stand-in**: a model trained like the target but without the forget set (TOFU's
//!   retained model, where one exists), scoring the same forget rows;
//! - **unseen authors**: rows of the same kind about authors the target never saw, scored by
//!   the target itself (no second model needed; it assumes the forget authors' rows are as
//!   hard as the unseen authors' rows, which a 40-row forget set need not be).
//!
//! ```text
//! R(item)   = exp(mean_j NLL(wrong_j) - NLL(answer))        (per-token NLLs, as TOFU's truth ratio)
//! forget    = R of the held-out forget rows, under the profile at the point
//! yardstick = R of the forget rows under the stand-in, or of the unseen rows under the target
//! match     = KS p-value between the two (scipy's ks_2samp, as forget quality)
//! retain    = mean NLL per token of held-out retain answers: point minus base
//! chosen    = among the points with retain <= max_retain_rise, the highest match; ties go to
//!             the smaller |mean ln R(forget) - mean ln R(yardstick)|, then to the earlier point
//! ```
//!
//! Nothing here reads TOFU's `paraphrased_answer` / `perturbed_answer`; the files are
//! question/answer/wrong_answers rows made from training and augmentation data.

use super::data::QaItem;
use super::ks::ks_2samp;
use super::run::{score_item_points, Backend, ItemResult};
use super::tofu;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One calibration row: a question, a true answer and wrong answers to it.
#[derive(Debug, Clone, Deserialize)]
pub struct CalRow {
    pub question: String,
    pub answer: String,
    #[serde(default)]
    pub wrong_answers: Vec<String>,
}

/// Rows of a JSON array of `{question, answer, wrong_answers[]}` (`wrong_answers` may be absent
/// for retain rows). Refuses TOFU's evaluation fields.
pub fn read_rows(path: &Path) -> Result<Vec<CalRow>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not JSON: {e}", path.display())))?;
    if let Some(rows) = v.as_array() {
        for (i, r) in rows.iter().enumerate() {
            for f in crate::qa::EVAL_FIELDS {
                if r.get(f).is_some() {
                    return Err(Error::Invalid(format!(
                        "{}: row {} has {f:?}, a field of TOFU's evaluation; calibration \
                         never reads the evaluation's answers",
                        path.display(),
                        i + 1
                    )));
                }
            }
        }
    }
    let rows: Vec<CalRow> = serde_json::from_value(v).map_err(|e| {
        Error::Invalid(format!(
            "{}: expected an array of {{question, answer, wrong_answers}}: {e}",
            path.display()
        ))
    })?;
    if rows.is_empty() {
        return Err(Error::Invalid(format!("{}: no rows", path.display())));
    }
    Ok(rows)
}

fn item(r: &CalRow) -> QaItem {
    QaItem {
        question: r.question.clone(),
        answer: r.answer.clone(),
        paraphrased: None,
        perturbed: r.wrong_answers.clone(),
    }
}

/// What one point measured.
#[derive(Debug, Clone, Serialize)]
pub struct PointResult {
    pub name: String,
    /// KS p-value of the forget rows' R (this point) against the yardstick's R.
    pub matched: f64,
    /// Mean ln R of the forget rows at this point.
    pub mean_log_r: f64,
    /// Mean NLL per token of the retain answers, this point minus the base.
    pub retain_rise: Option<f64>,
    /// Whether the retain rise is within bounds.
    pub allowed: bool,
}

/// What "never learned" is measured on (see the module doc).
pub enum Yardstick<'a> {
    /// The forget rows under a model never trained on them.
    StandIn(&'a mut dyn Backend),
    /// Rows about authors the target never saw, under the target.
    Unseen(&'a [CalRow]),
}

/// The calibration's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// `stand-in` or `unseen`.
    pub yardstick: &'static str,
    /// Mean ln R of the yardstick, and of the forget rows under the base.
    pub yardstick_mean_log_r: f64,
    pub base_forget_mean_log_r: f64,
    /// KS p-value of the forget rows under the base against the yardstick.
    pub base_matched: f64,
    pub points: Vec<PointResult>,
    /// The index of the chosen point (none allowed: `None`).
    pub chosen: Option<usize>,
    pub max_retain_rise: f64,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn mean_nll(rs: &[ItemResult]) -> f64 {
    // Per token over all answers, as a pooled mean (long answers weigh more).
    let (s, n) = rs.iter().fold((0.0, 0usize), |(s, n), r| {
        (s + r.gt_loss * r.gt_tokens as f64, n + r.gt_tokens)
    });
    s / n.max(1) as f64
}

fn truth_ratios(rs: &[ItemResult]) -> Vec<f64> {
    let scores: Vec<_> = rs.iter().map(ItemResult::scores).collect();
    tofu::raw_truth_ratios(&scores)
}

/// What the calibration measures once, whatever the profile: the yardstick's truth ratios,
/// the base's on the forget rows, and the base's retain NLL.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// `stand-in` or `unseen`.
    pub kind: &'static str,
    yard_r: Vec<f64>,
    base_forget_r: Vec<f64>,
    base_retain: Option<f64>,
}

impl Baseline {
    /// Mean ln R of the yardstick.
    pub fn yardstick_mean_log_r(&self) -> f64 {
        ln_mean(&self.yard_r)
    }

    /// Mean ln R of the forget rows under the base.
    pub fn base_forget_mean_log_r(&self) -> f64 {
        ln_mean(&self.base_forget_r)
    }

    /// KS p-value of the forget rows under the base against the yardstick.
    pub fn base_matched(&self) -> Result<f64> {
        Ok(ks_2samp(&self.base_forget_r, &self.yard_r)?.pvalue)
    }
}

fn ln_mean(r: &[f64]) -> f64 {
    mean(&r.iter().map(|x| x.ln()).collect::<Vec<_>>())
}

fn check_rows(forget: &[CalRow], unseen: &[CalRow]) -> Result<()> {
    for (what, rows) in [("forget", forget), ("unseen", unseen)] {
        if let Some(r) = rows.iter().find(|r| r.wrong_answers.is_empty()) {
            return Err(Error::Invalid(format!(
                "a {what} row has no wrong answer: {:?}",
                r.question
            )));
        }
    }
    Ok(())
}

/// Every row of `rows` scored at each of `be`'s points; `tick` after every row.
fn score_all(
    be: &mut dyn Backend,
    rows: &[CalRow],
    tick: &dyn Fn(u64),
) -> Result<Vec<Vec<ItemResult>>> {
    let mut out = vec![Vec::with_capacity(rows.len()); be.n_points()];
    for r in rows {
        for (k, res) in score_item_points(be, &item(r), false, 0.2)?
            .into_iter()
            .enumerate()
        {
            out[k].push(res);
        }
        tick(1);
    }
    Ok(out)
}

/// The half of [`calibrate`] that does not depend on the profile: `base` (the plain target)
/// on `forget` and `retain`, the yardstick on its rows. Measured once, it serves any number of
/// profiles ([`points`]).
pub fn baseline(
    base: &mut dyn Backend,
    forget: &[CalRow],
    yardstick: Yardstick<'_>,
    retain: &[CalRow],
    tick: &dyn Fn(u64),
) -> Result<Baseline> {
    let unseen: &[CalRow] = match &yardstick {
        Yardstick::Unseen(rows) => rows,
        Yardstick::StandIn(_) => &[],
    };
    check_rows(forget, unseen)?;
    let (kind, yard_r) = match yardstick {
        Yardstick::Unseen(rows) => ("unseen", truth_ratios(&score_all(base, rows, tick)?[0])),
        Yardstick::StandIn(m) => ("stand-in", truth_ratios(&score_all(m, forget, tick)?[0])),
    };
    let base_forget_r = truth_ratios(&score_all(base, forget, tick)?[0]);
    let base_retain = if retain.is_empty() {
        None
    } else {
        Some(mean_nll(&score_all(base, retain, tick)?[0]))
    };
    Ok(Baseline {
        kind,
        yard_r,
        base_forget_r,
        base_retain,
    })
}

/// The other half: `profile` at each of its points on `forget` and `retain`, measured against
/// `baseline` (made from the same rows).
pub fn points(
    profile: &mut dyn Backend,
    baseline: &Baseline,
    forget: &[CalRow],
    retain: &[CalRow],
    max_retain_rise: f64,
    tick: &dyn Fn(u64),
) -> Result<Vec<PointResult>> {
    check_rows(forget, &[])?;
    let np = profile.n_points();
    let forget_at = score_all(profile, forget, tick)?;
    let retain_at = if retain.is_empty() {
        vec![Vec::new(); np]
    } else {
        score_all(profile, retain, tick)?
    };
    let mut points = Vec::with_capacity(np);
    for k in 0..np {
        let r = truth_ratios(&forget_at[k]);
        let rise = baseline.base_retain.map(|b| mean_nll(&retain_at[k]) - b);
        points.push(PointResult {
            name: profile.point(k).0,
            matched: ks_2samp(&r, &baseline.yard_r)?.pvalue,
            mean_log_r: ln_mean(&r),
            retain_rise: rise,
            allowed: rise.is_none_or(|x| x <= max_retain_rise),
        });
    }
    Ok(points)
}

/// Run the calibration: `profile` evaluated at each of its points on `forget` and `retain`,
/// `base` (the plain target) on `forget` and `retain`, the yardstick on its rows; `tick` after
/// every row of every set.
pub fn calibrate(
    profile: &mut dyn Backend,
    base: &mut dyn Backend,
    forget: &[CalRow],
    yardstick: Yardstick<'_>,
    retain: &[CalRow],
    max_retain_rise: f64,
    tick: &dyn Fn(u64),
) -> Result<Calibration> {
    let b = baseline(base, forget, yardstick, retain, tick)?;
    let points = points(profile, &b, forget, retain, max_retain_rise, tick)?;
    let yard_mean = b.yardstick_mean_log_r();
    let chosen = choose(&points, yard_mean);
    Ok(Calibration {
        yardstick: b.kind,
        yardstick_mean_log_r: yard_mean,
        base_forget_mean_log_r: b.base_forget_mean_log_r(),
        base_matched: b.base_matched()?,
        points,
        chosen,
        max_retain_rise,
    })
}

/// The rule of the module doc.
pub fn choose(points: &[PointResult], yardstick_mean_log_r: f64) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, p) in points.iter().enumerate() {
        if !p.allowed || !p.matched.is_finite() {
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => {
                let q = &points[b];
                let gap = |x: &PointResult| (x.mean_log_r - yardstick_mean_log_r).abs();
                p.matched > q.matched || (p.matched == q.matched && gap(p) < gap(q))
            }
        };
        if better {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(matched: f64, mean_log_r: f64, allowed: bool) -> PointResult {
        PointResult {
            name: String::new(),
            matched,
            mean_log_r,
            retain_rise: None,
            allowed,
        }
    }

    #[test]
    fn the_rule() {
        // The highest match among the allowed points.
        let pts = [p(0.2, 0.0, true), p(0.9, 0.5, false), p(0.6, 1.0, true)];
        assert_eq!(choose(&pts, 0.0), Some(2));
        // Ties: the smaller gap of mean ln R to the yardstick's, then the earlier point.
        let pts = [p(1.0, 0.8, true), p(1.0, -0.1, true), p(1.0, 0.1, true)];
        assert_eq!(choose(&pts, 0.0), Some(1));
        let pts = [p(1.0, 0.1, true), p(1.0, -0.1, true)];
        assert_eq!(choose(&pts, 0.0), Some(0));
        // Nothing allowed: no choice.
        assert_eq!(choose(&[p(1.0, 0.0, false)], 0.0), None);
    }
}
