//! Logit arithmetic with assistant models:
//!
//! ```text
//! l = l_T + sum_i w_i * term_i      ULD:   w = -alpha, term = l_i
//!                                   pair:  term = l_i - l_ref
//!                                   WHP:   w = -alpha, term = relu(l_i - l_T)
//! ```
//!
//! Every `l` here is a log-softmax, so a term means the same whatever constant a model adds to
//! its raw logits.
//!
//! Each term applies only on a plausible set `S` taken from the target, as ULD's reference code
//! does: with `k = floor(r * V)`, the tokens whose log-softmax is at least
//! `min(k-th largest, max + ln r)` (ties with the k-th kept); `k = 0` keeps every token (a quirk
//! of the reference code, kept). Comparing raw logits gives the same set, since log-softmax
//! only shifts them.
//!
//! Two uses:
//!
//! - [`Use::Sample`] gives `-inf` to every token outside the plausible sets (outside the union,
//!   when terms filter differently). Sampling only sees the set's relative scores, so a constant
//!   added to a term over the set changes nothing.
//! - [`Use::Score`] (teacher-forced log-probabilities, TOFU's metrics, `/score`, MIA) gives every
//!   token a finite probability, by one of two rules per term ([`ScoreRule`]):
//!
//!   ```text
//!   mass (default), for each term in turn, with p the distribution so far (first the target's):
//!     j in S:      log p'(j) = log p(j) + w * term(j) - c,
//!                  c = log sum_{k in S} p(k) e^{w term(k)} - log sum_{k in S} p(k)
//!     j not in S:  p'(j) = p(j)
//!   raw (ULD's reference code): l'(j) = z_T(j) + w * (j in S ? z_A(j) : 0), softmax over V,
//!                  z the raw logits (pair: z_A - z_ref; WHP: relu(z_A - z_T))
//!   ```
//!
//!   Under `mass` the set keeps the target's total probability and is only reweighted inside:
//!   a constant added to a term (an assistant's logits shifted, or flat on the set) changes
//!   nothing, an assistant with uniform logits gives exactly the target's distribution, and
//!   every token outside the set keeps the target's probability. Under `raw` a term that is
//!   large on the set moves probability onto or off the whole set (a near-uniform assistant
//!   with raw logits near 0 changes little; the same assistant with every logit shifted by
//!   +5 pushes every token outside the set down by up to `5 |w|` nats); it is kept to
//!   reproduce the reference's numbers. With the filter off the two rules are the same
//!   distribution.

use serde::{Deserialize, Serialize};

/// How a term is formed from its model's log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TermKind {
    /// `term = l_i`
    Uld,
    /// `term = l_i - l_ref`
    Pair,
    /// `term = relu(l_i - l_T)` ("Who's Harry Potter")
    Whp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Sample,
    Score,
}

/// How a term changes the scored distribution ([`Use::Score`]); see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreRule {
    /// Reweight inside the plausible set, keeping the set's total probability.
    #[default]
    Mass,
    /// ULD's reference code: raw logits, the term zero outside the set, softmax over all.
    Raw,
}

impl ScoreRule {
    pub fn name(self) -> &'static str {
        match self {
            ScoreRule::Mass => "mass",
            ScoreRule::Raw => "raw",
        }
    }

    pub fn parse(s: &str) -> crate::Result<Self> {
        match s {
            "mass" => Ok(ScoreRule::Mass),
            "raw" => Ok(ScoreRule::Raw),
            _ => Err(crate::Error::Invalid(format!(
                "unknown scoring rule {s:?} (mass or raw)"
            ))),
        }
    }
}

/// One assistant term over a vocabulary of `V` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Term<'a> {
    pub kind: TermKind,
    /// `w_i` (ULD and WHP: `-alpha`).
    pub weight: f32,
    /// The assistant's raw logits `[V]`.
    pub logits: &'a [f32],
    /// The reference model's raw logits `[V]` (pair terms only).
    pub reference: Option<&'a [f32]>,
    /// Plausibility filter rate `r` (0: off).
    pub filter: f32,
    /// The scoring rule (scoring use only).
    pub score: ScoreRule,
}

/// The raw-logit threshold of the plausible set of `logits` at rate `r`; `None` keeps every
/// token (`r <= 0` or `floor(r * V) == 0`).
pub fn plausible_threshold(logits: &[f32], r: f32) -> Option<f32> {
    plausible_threshold_in(logits, r, &mut Vec::new())
}

/// [`plausible_threshold`] with a caller's scratch buffer (no allocation once it has grown).
pub fn plausible_threshold_in(logits: &[f32], r: f32, scratch: &mut Vec<f32>) -> Option<f32> {
    if r <= 0.0 {
        return None;
    }
    let k = (r as f64 * logits.len() as f64).floor() as usize;
    if k == 0 {
        return None;
    }
    let k = k.min(logits.len());
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // The k-th largest without sorting everything.
    scratch.clear();
    scratch.extend_from_slice(logits);
    let (_, kth, _) = scratch.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    Some(kth.min(max + r.ln()))
}

/// `out = x - logsumexp(x)` (`[V]`, the sum in f64).
pub(crate) fn log_softmax(x: &[f32], out: &mut Vec<f32>) {
    let lse = lethe_kernels::ops::logsumexp(x);
    out.clear();
    out.extend(x.iter().map(|&v| (v as f64 - lse) as f32));
}

/// `log sum exp` of `f(j)` over the `j` where `keep(j)`, in f64 (`-inf` for an empty set).
fn lse_where(v: usize, keep: impl Fn(usize) -> bool, f: impl Fn(usize) -> f64) -> f64 {
    lse_over((0..v).filter(|&j| keep(j)), f)
}

/// `log sum exp` of `f(j)` over the indices `idx`, in f64, max-shifted (`-inf` for none).
pub(crate) fn lse_over(idx: impl Iterator<Item = usize> + Clone, f: impl Fn(usize) -> f64) -> f64 {
    let m = idx.clone().map(&f).fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    let s: f64 = idx.map(|j| (f(j) - m).exp()).sum();
    m + s.ln()
}

/// Reusable buffers of [`combine_in`] (nothing allocated per call once they have grown).
#[derive(Debug, Default)]
pub struct CombineScratch {
    lt: Vec<f32>,
    li: Vec<f32>,
    lr: Vec<f32>,
    acc: Vec<f64>,
    d: Vec<f64>,
    keep: Vec<bool>,
    sel: Vec<f32>,
}

/// Combine the target's raw logits `target` (`[V]`) with `terms` into `out` (`[V]`, log-space
/// scores: softmax of `out` is the combined distribution; under [`Use::Score`] `out` is already
/// normalised).
pub fn combine(target: &[f32], terms: &[Term], how: Use, out: &mut Vec<f32>) {
    combine_in(target, terms, how, out, &mut CombineScratch::default())
}

/// [`combine`] with reusable buffers.
pub fn combine_in(
    target: &[f32],
    terms: &[Term],
    how: Use,
    out: &mut Vec<f32>,
    s: &mut CombineScratch,
) {
    let v = target.len();
    for t in terms {
        assert_eq!(
            t.logits.len(),
            v,
            "a term's vocabulary differs from the target's"
        );
        if let Some(r) = t.reference {
            assert_eq!(
                r.len(),
                v,
                "a reference's vocabulary differs from the target's"
            );
        }
    }
    log_softmax(target, &mut s.lt);
    match how {
        Use::Sample => sample(target, terms, out, s),
        Use::Score => score(target, terms, out, s),
    }
}

/// The sampling use: log-softmax terms on the sets, `-inf` outside their union.
fn sample(target: &[f32], terms: &[Term], out: &mut Vec<f32>, s: &mut CombineScratch) {
    let v = target.len();
    out.clear();
    out.extend_from_slice(&s.lt);
    s.keep.clear();
    s.keep.resize(v, terms.is_empty());
    for t in terms {
        let th = plausible_threshold_in(target, t.filter, &mut s.sel);
        log_softmax(t.logits, &mut s.li);
        if let Some(r) = t.reference {
            log_softmax(r, &mut s.lr);
        }
        for j in 0..v {
            if th.is_some_and(|th| target[j] < th) {
                continue;
            }
            s.keep[j] = true;
            let term = match t.kind {
                TermKind::Uld => s.li[j],
                TermKind::Pair => s.li[j] - s.lr[j],
                TermKind::Whp => (s.li[j] - s.lt[j]).max(0.0),
            };
            out[j] += t.weight * term;
        }
    }
    for (o, keep) in out.iter_mut().zip(&s.keep) {
        if !keep {
            *o = f32::NEG_INFINITY;
        }
    }
}

/// The scoring use: every term by its rule, in f64; `out` normalised log-probabilities.
fn score(target: &[f32], terms: &[Term], out: &mut Vec<f32>, s: &mut CombineScratch) {
    let v = target.len();
    // `acc`: log-probabilities under the mass rule so far (normalised after each mass term);
    // the raw terms add raw logits into `raw`-space, so raw terms start from the target's raw
    // logits and the distribution is normalised once at the end.
    s.acc.clear();
    s.acc.extend(s.lt.iter().map(|&x| x as f64));
    for t in terms {
        let th = plausible_threshold_in(target, t.filter, &mut s.sel);
        let inside = |j: usize| th.is_none_or(|th| target[j] >= th);
        s.d.clear();
        match t.score {
            ScoreRule::Mass => {
                // ULD and pair terms from the raw logits in f64: the log-softmax's constant
                // is the same on the whole set and cancels when the set is renormalised, so
                // a shifted assistant scores the same up to the rounding of its input.
                let (lse_i, lse_t) = match t.kind {
                    TermKind::Whp => (
                        lethe_kernels::ops::logsumexp(t.logits),
                        lethe_kernels::ops::logsumexp(target),
                    ),
                    _ => (0.0, 0.0),
                };
                for j in 0..v {
                    let z = t.logits[j] as f64;
                    let term = match t.kind {
                        TermKind::Uld => z,
                        TermKind::Pair => z - t.reference.map_or(0.0, |r| r[j] as f64),
                        TermKind::Whp => ((z - lse_i) - (target[j] as f64 - lse_t)).max(0.0),
                    };
                    s.d.push(t.weight as f64 * term);
                }
                let (acc, d) = (&s.acc, &s.d);
                let before = lse_where(v, inside, |j| acc[j]);
                let after = lse_where(v, inside, |j| acc[j] + d[j]);
                let c = after - before;
                for j in (0..v).filter(|&j| inside(j)) {
                    s.acc[j] += s.d[j] - c;
                }
            }
            ScoreRule::Raw => {
                for j in 0..v {
                    let z = t.logits[j] as f64;
                    let term = match t.kind {
                        TermKind::Uld => z,
                        TermKind::Pair => z - t.reference.map_or(0.0, |r| r[j] as f64),
                        TermKind::Whp => (z - target[j] as f64).max(0.0),
                    };
                    if inside(j) {
                        s.acc[j] += t.weight as f64 * term;
                    }
                }
                // log-softmax again: the raw rule moves mass across the whole vocabulary.
                let acc = &s.acc;
                let lse = lse_where(v, |_| true, |j| acc[j]);
                for a in s.acc.iter_mut() {
                    *a -= lse;
                }
            }
        }
    }
    out.clear();
    out.extend(s.acc.iter().map(|&x| x as f32));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dense, literal implementation of the formulas in f64, for comparison.
    fn dense(target: &[f32], terms: &[Term], how: Use) -> Vec<f64> {
        let ls = |x: &[f32]| -> Vec<f64> {
            let m = x
                .iter()
                .map(|&v| v as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
            x.iter().map(|&v| v as f64 - m - s.ln()).collect()
        };
        let v = target.len();
        let lt = ls(target);
        let mut out = lt.clone();
        let mut keep = vec![terms.is_empty(); v];
        for t in terms {
            // The set, by sorting (ties with the k-th kept).
            let k = (t.filter as f64 * v as f64).floor() as usize;
            let set: Vec<bool> = if t.filter <= 0.0 || k == 0 {
                vec![true; v]
            } else {
                let mut s = lt.clone();
                s.sort_by(|a, b| b.partial_cmp(a).unwrap());
                let max = s[0];
                let th = s[k - 1].min(max + (t.filter as f64).ln());
                lt.iter().map(|&x| x >= th - 1e-6).collect()
            };
            let li = ls(t.logits);
            let lr = t.reference.map(ls);
            let term = |j: usize| match t.kind {
                TermKind::Uld => li[j],
                TermKind::Pair => li[j] - lr.as_ref().unwrap()[j],
                TermKind::Whp => (li[j] - lt[j]).max(0.0),
            };
            let w = t.weight as f64;
            match (how, t.score) {
                (Use::Sample, _) => {
                    for j in 0..v {
                        if set[j] {
                            keep[j] = true;
                            out[j] += w * term(j);
                        }
                    }
                }
                (Use::Score, ScoreRule::Mass) => {
                    // p'(j) = p(j) e^{w term(j)} * P(S) / sum_{k in S} p(k) e^{w term(k)}
                    let mass: f64 = (0..v).filter(|&j| set[j]).map(|j| out[j].exp()).sum();
                    let moved: f64 = (0..v)
                        .filter(|&j| set[j])
                        .map(|j| (out[j] + w * term(j)).exp())
                        .sum();
                    for j in 0..v {
                        if set[j] {
                            out[j] = out[j] + w * term(j) + mass.ln() - moved.ln();
                        }
                    }
                }
                (Use::Score, ScoreRule::Raw) => {
                    for j in 0..v {
                        if set[j] {
                            let z = t.logits[j] as f64;
                            out[j] += w * match t.kind {
                                TermKind::Uld => z,
                                TermKind::Pair => z - t.reference.unwrap()[j] as f64,
                                TermKind::Whp => (z - target[j] as f64).max(0.0),
                            };
                        }
                    }
                    let m = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let lse = m + out.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
                    for o in out.iter_mut() {
                        *o -= lse;
                    }
                }
            }
        }
        if how == Use::Sample {
            for j in 0..v {
                if !keep[j] {
                    out[j] = f64::NEG_INFINITY;
                }
            }
        }
        out
    }

    fn logits(v: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::generate::sampler::Rng::new(seed);
        (0..v)
            .map(|_| (rng.next_f64() * 12.0 - 6.0) as f32)
            .collect()
    }

    fn check(target: &[f32], terms: &[Term]) {
        for how in [Use::Sample, Use::Score] {
            let mut got = Vec::new();
            combine(target, terms, how, &mut got);
            let want = dense(target, terms, how);
            for (j, (&g, &w)) in got.iter().zip(&want).enumerate() {
                if w == f64::NEG_INFINITY {
                    assert_eq!(g, f32::NEG_INFINITY, "{how:?} token {j}");
                } else {
                    assert!(
                        (g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{how:?} token {j}: {g} vs {w}"
                    );
                }
            }
            if how == Use::Score {
                assert!(
                    got.iter().all(|x| x.is_finite()),
                    "scoring keeps every token finite"
                );
                let total: f64 = got.iter().map(|&x| (x as f64).exp()).sum();
                assert!((total - 1.0).abs() < 1e-5, "normalised: {total}");
            }
        }
    }

    #[test]
    fn matches_the_dense_formula() {
        for &v in &[10usize, 1000, 49152] {
            let t = logits(v, 1);
            let a = logits(v, 2);
            let b = logits(v, 3);
            for (&r, score) in [0.0f32, 0.01, 0.1]
                .iter()
                .flat_map(|r| [(r, ScoreRule::Mass), (r, ScoreRule::Raw)])
            {
                let uld = Term {
                    kind: TermKind::Uld,
                    weight: -0.75,
                    logits: &a,
                    reference: None,
                    filter: r,
                    score,
                };
                let pair = Term {
                    kind: TermKind::Pair,
                    weight: 0.5,
                    logits: &a,
                    reference: Some(&b),
                    filter: r,
                    score,
                };
                let whp = Term {
                    kind: TermKind::Whp,
                    weight: -1.0,
                    logits: &b,
                    reference: None,
                    filter: r,
                    score,
                };
                check(&t, &[uld]);
                check(&t, &[pair]);
                check(&t, &[whp]);
                check(&t, &[uld, pair, whp]);
            }
        }
    }

    #[test]
    fn k_zero_keeps_every_token() {
        // V = 10, r = 0.01: floor(0.1) = 0, so nothing is filtered even in sampling.
        let t = logits(10, 4);
        assert_eq!(plausible_threshold(&t, 0.01), None);
        let a = logits(10, 5);
        let mut out = Vec::new();
        combine(
            &t,
            &[Term {
                kind: TermKind::Uld,
                weight: -0.75,
                logits: &a,
                reference: None,
                filter: 0.01,
                score: ScoreRule::Mass,
            }],
            Use::Sample,
            &mut out,
        );
        assert!(out.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn ties_with_the_kth_are_kept() {
        // V = 100, r = 0.02: k = 2; three tokens tie for the top, all kept; max + ln r is lower.
        let mut t = vec![0.0f32; 100];
        t[3] = 5.0;
        t[7] = 5.0;
        t[9] = 5.0;
        let th = plausible_threshold(&t, 0.02).unwrap();
        assert_eq!(th, 5.0 + 0.02f32.ln());
        let kept: Vec<usize> = (0..100).filter(|&j| t[j] >= th).collect();
        assert_eq!(kept, vec![3, 7, 9]);
        // With r = 0.5 (k = 50), the k-th largest (0.0, tied by 97 tokens) is the lower bound.
        let th = plausible_threshold(&t, 0.5).unwrap();
        assert_eq!(th, 0.0);
        assert_eq!((0..100).filter(|&j| t[j] >= th).count(), 100);
    }

    #[test]
    fn hand_computed_uld_step() {
        // Target log-probs: log(0.5), log(0.3), log(0.2); assistant log-probs: log(0.7),
        // log(0.2), log(0.1); alpha = 0.5, filter off:
        // l = l_T - 0.5 l_A = [ln .5 - .5 ln .7, ln .3 - .5 ln .2, ln .2 - .5 ln .1]
        let t = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let a = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln()];
        let mut out = Vec::new();
        combine(
            &t,
            &[Term {
                kind: TermKind::Uld,
                weight: -0.5,
                logits: &a,
                reference: None,
                filter: 0.0,
                score: ScoreRule::Mass,
            }],
            Use::Score,
            &mut out,
        );
        let want = [
            0.5f64.ln() - 0.5 * 0.7f64.ln(),
            0.3f64.ln() - 0.5 * 0.2f64.ln(),
            0.2f64.ln() - 0.5 * 0.1f64.ln(),
        ];
        // Scoring normalises: out = want - log sum exp(want).
        let lse = want.iter().map(|w| w.exp()).sum::<f64>().ln();
        for j in 0..3 {
            assert!((out[j] as f64 - (want[j] - lse)).abs() < 1e-6);
        }
        // The remembered token (the assistant's favourite) lost the argmax: 0 had it, 1 has it now.
        // ln .5 - .5 ln .7 = -0.5148; ln .3 - .5 ln .2 = -0.4007; ln .2 - .5 ln .1 = -0.4581
        let best = (0..3).max_by(|&i, &j| out[i].total_cmp(&out[j])).unwrap();
        assert_eq!(best, 1);
    }

    #[test]
    fn the_whole_target_as_assistant_keeps_the_argmax() {
        // l_T - alpha l_T = (1 - alpha) l_T on the set: same argmax for 0 < alpha < 1.
        let t = logits(49152, 9);
        let mut out = Vec::new();
        combine(
            &t,
            &[Term {
                kind: TermKind::Uld,
                weight: -0.75,
                logits: &t,
                reference: None,
                filter: 0.01,
                score: ScoreRule::Mass,
            }],
            Use::Sample,
            &mut out,
        );
        let am = |x: &[f32]| (0..x.len()).max_by(|&i, &j| x[i].total_cmp(&x[j])).unwrap();
        assert_eq!(am(&out), am(&t));
    }

    fn uld(logits: &[f32], alpha: f32, filter: f32, score: ScoreRule) -> Term<'_> {
        Term {
            kind: TermKind::Uld,
            weight: -alpha,
            logits,
            reference: None,
            filter,
            score,
        }
    }

    fn scored(target: &[f32], terms: &[Term]) -> Vec<f32> {
        let mut out = Vec::new();
        combine(target, terms, Use::Score, &mut out);
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn a_constant_added_to_an_assistant_changes_no_score() {
        let v = 49152;
        let t = logits(v, 11);
        // Multiples of 2^-10, so that adding the constants below is exact in f32: the test
        // then sees the rule, not the rounding of its input.
        let a: Vec<f32> = logits(v, 12)
            .iter()
            .map(|&x| (x * 1024.0).round() / 1024.0)
            .collect();
        for &c in &[-40.0f32, -3.5, 0.25, 7.0, 60.0, 1000.0] {
            let shifted: Vec<f32> = a.iter().map(|&x| x + c).collect();
            for &(alpha, r) in &[(0.75f32, 0.01f32), (2.0, 0.1), (0.5, 0.0)] {
                let base = scored(&t, &[uld(&a, alpha, r, ScoreRule::Mass)]);
                let moved = scored(&t, &[uld(&shifted, alpha, r, ScoreRule::Mass)]);
                let d = max_diff(&base, &moved);
                assert!(d <= 1e-6, "shift {c}, alpha {alpha}, filter {r}: {d}");
            }
        }
    }

    #[test]
    fn a_uniform_assistant_gives_the_targets_distribution() {
        let v = 49152;
        let t = logits(v, 13);
        let mut lt = Vec::new();
        log_softmax(&t, &mut lt);
        for &c in &[0.0f32, 1.0, -12.5, 300.0] {
            let flat = vec![c; v];
            for &(alpha, r) in &[(0.75f32, 0.01f32), (2.0, 0.1), (1.0, 0.0)] {
                let got = scored(&t, &[uld(&flat, alpha, r, ScoreRule::Mass)]);
                let d = max_diff(&got, &lt);
                assert!(d <= 1e-6, "constant {c}, alpha {alpha}, filter {r}: {d}");
            }
        }
        // The raw rule (the reference code's) does move mass for the same flat assistant
        // when its logits are not 0: that is what the mass rule is for.
        let flat = vec![10.0f32; v];
        let got = scored(&t, &[uld(&flat, 0.75, 0.01, ScoreRule::Raw)]);
        assert!(max_diff(&got, &lt) > 1.0);
    }

    #[test]
    fn tokens_outside_the_set_keep_the_targets_probability() {
        let v = 49152;
        let t = logits(v, 14);
        let a = logits(v, 15);
        let mut lt = Vec::new();
        log_softmax(&t, &mut lt);
        for &(alpha, r) in &[(0.75f32, 0.01f32), (2.0, 0.1), (5.0, 0.2)] {
            let th = plausible_threshold(&t, r).expect("the filter is on");
            let got = scored(&t, &[uld(&a, alpha, r, ScoreRule::Mass)]);
            let (mut outside, mut changed_inside) = (0, 0);
            let (mut mass_in_t, mut mass_in_got) = (0.0f64, 0.0f64);
            for j in 0..v {
                if t[j] < th {
                    outside += 1;
                    assert!(
                        (got[j] as f64 - lt[j] as f64).abs() <= 1e-6,
                        "token {j} outside the set: {} vs {}",
                        got[j],
                        lt[j]
                    );
                } else {
                    mass_in_t += (lt[j] as f64).exp();
                    mass_in_got += (got[j] as f64).exp();
                    changed_inside += ((got[j] - lt[j]).abs() > 1e-3) as usize;
                }
            }
            assert!(outside > v / 2, "most tokens are outside the set");
            assert!(changed_inside > 0, "the term changes the set");
            assert!(
                (mass_in_t - mass_in_got).abs() < 1e-6,
                "the set keeps its mass"
            );
        }
    }

    #[test]
    fn hand_computed_mass_rule_with_the_filter_on() {
        // V = 200, r = 0.01: k = 2, the set is the two tokens with the largest target
        // log-probability (max + ln 0.01 is far lower). Target probabilities: token 0: 0.5,
        // token 1: 0.3, the other 198 share 0.2 equally. The assistant's probabilities on
        // the set: token 0: 0.6, token 1: 0.01 (the rest spread anyhow). alpha = 1:
        //   inside: p'(j) = p(j) / pA(j) * P(S) / sum_S p / pA
        //           p / pA = [0.5 / 0.6, 0.3 / 0.01] = [0.8333.., 30], sum 30.8333..
        //           P(S) = 0.8: p'(0) = 0.8 * 0.8333../30.8333.. = 0.021622, p'(1) = 0.778378
        //   outside: 0.2 / 198 each, unchanged.
        let v = 200;
        let mut p = vec![0.2f64 / 198.0; v];
        p[0] = 0.5;
        p[1] = 0.3;
        let t: Vec<f32> = p.iter().map(|&x| x.ln() as f32).collect();
        let mut pa = vec![(1.0f64 - 0.61) / 198.0; v];
        pa[0] = 0.6;
        pa[1] = 0.01;
        let a: Vec<f32> = pa.iter().map(|&x| (x.ln() + 3.0) as f32).collect();
        let got = scored(&t, &[uld(&a, 1.0, 0.01, ScoreRule::Mass)]);
        let want0: f64 = 0.8 * (0.5 / 0.6) / (0.5 / 0.6 + 30.0);
        let want1: f64 = 0.8 * 30.0 / (0.5 / 0.6 + 30.0);
        assert!((want0 - 0.021622).abs() < 1e-6 && (want1 - 0.778378).abs() < 1e-6);
        assert!(((got[0] as f64).exp() - want0).abs() < 1e-6);
        assert!(((got[1] as f64).exp() - want1).abs() < 1e-6);
        for (j, &g) in got.iter().enumerate().skip(2) {
            assert!(((g as f64).exp() - 0.2 / 198.0).abs() < 1e-9, "token {j}");
        }
        // The raw rule on the same numbers: z = [ln .5, ln .3, ...] + w * [zA0, zA1, 0, ...]
        // with the assistant's raw logits zA = ln pA + 3, then softmax over all 200.
        let got = scored(&t, &[uld(&a, 1.0, 0.01, ScoreRule::Raw)]);
        let z0 = 0.5f64.ln() - (0.6f64.ln() + 3.0);
        let z1 = 0.3f64.ln() - (0.01f64.ln() + 3.0);
        let zr = (0.2f64 / 198.0).ln();
        let lse = (z0.exp() + z1.exp() + 198.0 * zr.exp()).ln();
        assert!((got[0] as f64 - (z0 - lse)).abs() < 1e-5);
        assert!((got[1] as f64 - (z1 - lse)).abs() < 1e-5);
        assert!((got[5] as f64 - (zr - lse)).abs() < 1e-5);
    }

    #[test]
    fn both_rules_agree_with_the_filter_off() {
        let v = 1000;
        let t = logits(v, 16);
        let a = logits(v, 17);
        let mass = scored(&t, &[uld(&a, 0.75, 0.0, ScoreRule::Mass)]);
        let raw = scored(&t, &[uld(&a, 0.75, 0.0, ScoreRule::Raw)]);
        assert!(max_diff(&mass, &raw) < 1e-5);
    }
}
