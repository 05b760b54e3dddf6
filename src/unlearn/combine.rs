//! Logit arithmetic with assistant models:
//!
//! ```text
//! l = l_T + sum_i w_i * term_i      ULD:   w = -alpha, term = l_i
//!                                   pair:  term = l_i - l_ref
//!                                   WHP:   w = -alpha, term = relu(l_i - l_T)
//! ```
//!
//! Every `l` here is a log-softmax, so a term means the same whatever constant a model adds to
//! its raw logits; with the filter off this is the same distribution as combining raw logits.
//!
//! Each term applies only on a plausible set taken from the target, as ULD's reference code
//! does: with `k = floor(r * V)`, the tokens whose log-softmax is at least
//! `min(k-th largest, max + ln r)` (ties with the k-th kept); `k = 0` keeps every token (a quirk
//! of the reference code, kept). Comparing raw logits gives the same set, since log-softmax
//! only shifts them.
//!
//! Two uses: [`Use::Sample`] gives `-inf` to every token outside the plausible sets (outside
//! the union, when terms filter differently); [`Use::Score`] keeps the target's own
//! log-probabilities there, so every token keeps a finite probability.

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

/// Combine the target's raw logits `target` (`[V]`) with `terms` into `out` (`[V]`, log-space
/// scores: softmax of `out` is the combined distribution).
pub fn combine(target: &[f32], terms: &[Term], how: Use, out: &mut Vec<f32>) {
    let v = target.len();
    let mut lt = Vec::new();
    log_softmax(target, &mut lt);
    out.clear();
    out.extend_from_slice(&lt);
    let mut in_any = vec![terms.is_empty(); v];
    let (mut li, mut lr) = (Vec::new(), Vec::new());
    for t in terms {
        assert_eq!(
            t.logits.len(),
            v,
            "a term's vocabulary differs from the target's"
        );
        let th = plausible_threshold(target, t.filter);
        log_softmax(t.logits, &mut li);
        if let Some(r) = t.reference {
            assert_eq!(
                r.len(),
                v,
                "a reference's vocabulary differs from the target's"
            );
            log_softmax(r, &mut lr);
        }
        for j in 0..v {
            if th.is_some_and(|th| target[j] < th) {
                continue;
            }
            in_any[j] = true;
            let term = match t.kind {
                TermKind::Uld => li[j],
                TermKind::Pair => li[j] - lr.get(j).copied().unwrap_or(0.0),
                TermKind::Whp => (li[j] - lt[j]).max(0.0),
            };
            out[j] += t.weight * term;
        }
    }
    if how == Use::Sample {
        for (o, keep) in out.iter_mut().zip(&in_any) {
            if !keep {
                *o = f32::NEG_INFINITY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dense, literal implementation of the formula in f64, for comparison.
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
            for j in 0..v {
                if !set[j] {
                    continue;
                }
                keep[j] = true;
                let term = match t.kind {
                    TermKind::Uld => li[j],
                    TermKind::Pair => li[j] - lr.as_ref().unwrap()[j],
                    TermKind::Whp => (li[j] - lt[j]).max(0.0),
                };
                out[j] += t.weight as f64 * term;
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
            }
        }
    }

    #[test]
    fn matches_the_dense_formula() {
        for &v in &[10usize, 1000, 49152] {
            let t = logits(v, 1);
            let a = logits(v, 2);
            let b = logits(v, 3);
            for &r in &[0.0f32, 0.01, 0.1] {
                let uld = Term {
                    kind: TermKind::Uld,
                    weight: -0.75,
                    logits: &a,
                    reference: None,
                    filter: r,
                };
                let pair = Term {
                    kind: TermKind::Pair,
                    weight: 0.5,
                    logits: &a,
                    reference: Some(&b),
                    filter: r,
                };
                let whp = Term {
                    kind: TermKind::Whp,
                    weight: -1.0,
                    logits: &b,
                    reference: None,
                    filter: r,
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
            }],
            Use::Score,
            &mut out,
        );
        let want = [
            0.5f64.ln() - 0.5 * 0.7f64.ln(),
            0.3f64.ln() - 0.5 * 0.2f64.ln(),
            0.2f64.ln() - 0.5 * 0.1f64.ln(),
        ];
        for j in 0..3 {
            assert!((out[j] as f64 - want[j]).abs() < 1e-6);
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
            }],
            Use::Sample,
            &mut out,
        );
        let am = |x: &[f32]| (0..x.len()).max_by(|&i, &j| x[i].total_cmp(&x[j])).unwrap();
        assert_eq!(am(&out), am(&t));
    }
}
