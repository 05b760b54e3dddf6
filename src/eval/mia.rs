//! Membership inference: per-text scores from per-token statistics, and the ROC AUC that
//! separates texts seen in training (members) from unseen ones.
//!
//! Every score is oriented so that HIGHER means more likely a member:
//! - LOSS: the mean token log-probability (minus the mean NLL);
//! - zlib: the LOSS score divided by the length in bytes of the zlib-compressed text (Carlini
//!   et al. 2021's ratio of log-perplexity to zlib entropy, sign flipped);
//! - Min-K%: the mean of the lowest k fraction of token log-probabilities (Shi et al. 2024);
//! - Min-K%++: the same over z_t = (log p(x_t) - mu_t) / sigma_t, with mu_t and sigma_t the
//!   mean and standard deviation of log p_t(z) for z drawn from the model's next-token
//!   distribution p_t (Zhang et al. 2024).

use crate::{Error, Result};
use std::io::Write;

/// ROC AUC of scores where higher means "positive": the probability that a random positive
/// scores above a random negative, ties counting 1/2 (the Mann-Whitney U / (n_pos n_neg)).
///
/// NaN if either set is empty or any score is NaN.
pub fn roc_auc(positive: &[f64], negative: &[f64]) -> f64 {
    if positive.is_empty() || negative.is_empty() {
        return f64::NAN;
    }
    if positive.iter().chain(negative).any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let mut neg = negative.to_vec();
    neg.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    // Twice U, in integers: 2 per negative strictly below, 1 per tie.
    let twice_u: u128 = positive
        .iter()
        .map(|&p| {
            let below = neg.partition_point(|&n| n < p);
            let up_to = neg.partition_point(|&n| n <= p);
            (2 * below + (up_to - below)) as u128
        })
        .sum();
    let pairs = 2 * positive.len() as u128 * negative.len() as u128;
    twice_u as f64 / pairs as f64
}

/// Statistics of one scored token and their computation, beside the scorer that uses them.
pub use crate::unlearn::score::{mink_stats, TokenStats};

/// Per-text membership scores (see the module doc); higher = more likely a member.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MiaScores {
    /// Mean token log-probability.
    pub loss: f64,
    /// `loss` / zlib-compressed length of the text in bytes.
    pub zlib: f64,
    /// Mean of the lowest k fraction of token log-probabilities.
    pub min_k: f64,
    /// Mean of the lowest k fraction of the normalised log-probabilities z_t.
    pub min_k_pp: f64,
}

/// sigma_t is floored at this in z_t, as open-unlearning clamps the variance at 1e-6, so that
/// a near-certain prediction does not divide by zero.
pub const MIN_SIGMA: f64 = 1e-3;

/// The membership scores of one text from its scored tokens.
///
/// The Min-K% means take the `max(1, floor(n k))` lowest of the n values (the reference code's
/// `int(len * k)`, with at least one value, as open-unlearning). `text` is the text the tokens
/// spell, for the zlib length. Errors on no tokens or k outside (0, 1].
pub fn scores(tokens: &[TokenStats], text: &str, k: f64) -> Result<MiaScores> {
    if tokens.is_empty() {
        return Err(Error::Invalid("mia scores: no tokens".into()));
    }
    if !(k > 0.0 && k <= 1.0) {
        return Err(Error::Invalid(format!(
            "mia scores: k = {k} outside (0, 1]"
        )));
    }
    let n = tokens.len() as f64;
    let loss = tokens.iter().map(|t| t.logprob).sum::<f64>() / n;
    let lp: Vec<f64> = tokens.iter().map(|t| t.logprob).collect();
    let z: Vec<f64> = tokens
        .iter()
        .map(|t| (t.logprob - t.mu) / t.sigma.max(MIN_SIGMA))
        .collect();
    Ok(MiaScores {
        loss,
        zlib: loss / zlib_len(text) as f64,
        min_k: lowest_mean(lp, k),
        min_k_pp: lowest_mean(z, k),
    })
}

/// Mean of the `max(1, floor(len * k))` smallest values.
fn lowest_mean(mut v: Vec<f64>, k: f64) -> f64 {
    let count = ((v.len() as f64 * k) as usize).max(1);
    v.sort_by(f64::total_cmp);
    v[..count].iter().sum::<f64>() / count as f64
}

/// Length in bytes of `zlib.compress(text.encode("utf-8"))` (zlib format, level 6).
pub fn zlib_len(text: &str) -> usize {
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(text.as_bytes())
        .and_then(|_| enc.finish())
        .map(|v| v.len())
        .expect("compressing into memory does not fail")
}
