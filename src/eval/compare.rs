//! A/B comparison: both sides answer the same prompts (greedy), and along side A's answer the
//! two next-token distributions (scoring use) are compared position by position.
//!
//! ```text
//! KL_t = sum_v pA_t(v) (log pA_t(v) - log pB_t(v))     t over A's answer tokens
//! mean KL = mean_t KL_t
//! ```

use super::run::{greedy_batch, Side};
use crate::Result;
use serde::Serialize;

/// One prompt's two answers and how they differ.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub prompt: String,
    /// The expected answer, when the prompts came with one.
    pub reference: Option<String>,
    pub a: String,
    pub b: String,
    /// The first token where the answers differ (`None`: identical).
    pub first_diff_token: Option<usize>,
    /// The first character (of `a`, in chars) where the texts differ (`None`: identical).
    pub first_diff_char: Option<usize>,
    /// Mean KL(A || B) of the next-token distributions along A's answer, in nats.
    pub mean_kl: f64,
    /// Per position of A's answer.
    pub kl: Vec<f64>,
    pub a_tokens: usize,
    pub b_tokens: usize,
}

/// Options of a comparison.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub max_new: usize,
    pub n_ctx: usize,
}

/// Compare `a` and `b` on `prompts` (`(prompt, expected answer)`); `tick(n)` reports progress
/// (3 units per prompt: two answers and the scoring).
pub fn compare(
    a: &Side,
    b: &Side,
    prompts: &[(String, Option<String>)],
    opts: &CompareOptions,
    tick: &dyn Fn(u64),
) -> Result<Vec<Pair>> {
    let pa = prompts
        .iter()
        .map(|(p, _)| a.prompt(p))
        .collect::<Result<Vec<_>>>()?;
    let pb = prompts
        .iter()
        .map(|(p, _)| b.prompt(p))
        .collect::<Result<Vec<_>>>()?;
    let ga = greedy_batch(a, &pa, opts.max_new, opts.n_ctx, tick)?;
    let gb = greedy_batch(b, &pb, opts.max_new, opts.n_ctx, tick)?;
    let mut sa = a.scorer(opts.n_ctx)?;
    let mut sb = b.scorer(opts.n_ctx)?;
    let v = a.forgotten.model.cfg.n_vocab;
    let mut rows: Vec<f32> = Vec::new();
    let mut out = Vec::with_capacity(prompts.len());
    for (i, (prompt, reference)) in prompts.iter().enumerate() {
        // Along A's answer; an empty answer (end of generation at once) is scored on the
        // token that ended it.
        let mut cont = ga[i].clone();
        if cont.is_empty() {
            cont.extend(a.tok.eog_tokens().first());
        }
        let mut kl = Vec::new();
        if !cont.is_empty() {
            rows.clear();
            sa.set_prompt(&pa[i])?;
            sa.score_with(&cont, |_, lp| rows.extend_from_slice(lp))?;
            sb.set_prompt(&pb[i])?;
            sb.score_with(&cont, |t, lq| {
                kl.push(kl_div(&rows[t * v..(t + 1) * v], lq));
            })?;
        }
        tick(1);
        let ta = a.tok.decode(&ga[i], false).trim().to_string();
        let tb = b.tok.decode(&gb[i], false).trim().to_string();
        let first_diff_token = first_diff(&ga[i], &gb[i]);
        let first_diff_char = first_diff(
            &ta.chars().collect::<Vec<_>>(),
            &tb.chars().collect::<Vec<_>>(),
        );
        out.push(Pair {
            prompt: prompt.clone(),
            reference: reference.clone(),
            mean_kl: kl.iter().sum::<f64>() / kl.len().max(1) as f64,
            kl,
            first_diff_token,
            first_diff_char,
            a_tokens: ga[i].len(),
            b_tokens: gb[i].len(),
            a: ta,
            b: tb,
        });
    }
    Ok(out)
}

/// The first index where `x` and `y` differ (a prefix of the other differs at its end);
/// `None` when equal.
pub fn first_diff<T: PartialEq>(x: &[T], y: &[T]) -> Option<usize> {
    match x.iter().zip(y).position(|(a, b)| a != b) {
        Some(i) => Some(i),
        None if x.len() == y.len() => None,
        None => Some(x.len().min(y.len())),
    }
}

/// KL(p || q) from normalised log-probabilities, in f64; tokens with `p = 0` add nothing.
pub fn kl_div(lp: &[f32], lq: &[f32]) -> f64 {
    lp.iter()
        .zip(lq)
        .filter(|(&a, _)| a > f32::NEG_INFINITY)
        .map(|(&a, &b)| {
            let (a, b) = (a as f64, b as f64);
            a.exp() * (a - b)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference() {
        assert_eq!(first_diff(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_diff(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_diff(&[1, 2], &[1, 2, 3]), Some(2));
        assert_eq!(first_diff::<u32>(&[], &[]), None);
    }

    #[test]
    fn kl_by_hand() {
        // p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
        let p = [0.5f32.ln(), 0.5f32.ln()];
        let q = [0.25f32.ln(), 0.75f32.ln()];
        let want = 0.5 * (2.0f64).ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_div(&p, &q) - want).abs() < 1e-6);
        assert!(kl_div(&p, &p).abs() < 1e-12);
    }
}
