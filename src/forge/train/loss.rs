//! The training objectives over a sequence's logits (`[n, n_vocab]`), each with its gradient
//! with respect to the logits. Sums run in f64.
//!
//! - cross-entropy: `mean over counted t of -log p_t(y_t)`; grad `(p_t - onehot(y_t)) / N`.
//! - KL(uniform || p): `mean over counted t of (-log V - mean_v log p_t(v))`, ULD's retain
//!   objective (the assistant learns to know nothing there); grad `(p_t - 1/V) / N`.
//! - smoothed cross-entropy: `mean over counted t of -log p_t(y_t) + s * KL(uniform || p_t)`,
//!   the same as label smoothing up to a constant; ULD's forget side with a flat background
//!   (the assistant keeps a peak on the right token, not the target's whole distribution);
//!   grad `((p_t - onehot(y_t)) + s * (p_t - 1/V)) / N`.
//!
//! `N` is the number of counted positions; with none, the loss and its gradient are 0.

use crate::{Error, Result};

/// What a sequence is trained towards.
#[derive(Debug, Clone, Copy)]
pub enum Objective<'a> {
    /// Cross-entropy of `labels[t]` at every position `t` that has one (usually the next
    /// token), averaged over those positions.
    CrossEntropy { labels: &'a [Option<u32>] },
    /// KL(uniform || p) at every position with `mask[t]`, averaged over those positions.
    KlUniform { mask: &'a [bool] },
    /// Cross-entropy plus `smooth` times KL(uniform || p) at every position with a label,
    /// averaged over those positions.
    SmoothedCrossEntropy {
        labels: &'a [Option<u32>],
        smooth: f32,
    },
}

impl Objective<'_> {
    /// The loss over `logits` (`[n, n_vocab]`), and its gradient into `dlogits` (same shape,
    /// overwritten).
    pub fn loss(&self, logits: &[f32], n_vocab: usize, dlogits: &mut [f32]) -> Result<f64> {
        match *self {
            Objective::CrossEntropy { labels } => cross_entropy(logits, n_vocab, labels, dlogits),
            Objective::KlUniform { mask } => kl_uniform(logits, n_vocab, mask, dlogits),
            Objective::SmoothedCrossEntropy { labels, smooth } => {
                smoothed_cross_entropy(logits, n_vocab, labels, smooth, dlogits)
            }
        }
    }

    /// The number of positions it covers (labels or mask entries).
    pub fn len(&self) -> usize {
        match *self {
            Objective::CrossEntropy { labels } => labels.len(),
            Objective::KlUniform { mask } => mask.len(),
            Objective::SmoothedCrossEntropy { labels, .. } => labels.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn check(logits: &[f32], n_vocab: usize, n: usize, dlogits: &[f32]) -> Result<()> {
    if n_vocab == 0 || logits.len() != n * n_vocab || dlogits.len() != logits.len() {
        return Err(Error::Invalid(format!(
            "loss over {} logits and {} gradients for {n} positions of {n_vocab}",
            logits.len(),
            dlogits.len()
        )));
    }
    Ok(())
}

/// `p = softmax(z)` into `out` (f32), returning `log sum exp z` in f64.
fn softmax_into(z: &[f32], out: &mut [f32]) -> f64 {
    let lse = lethe_kernels::ops::logsumexp(z);
    for (o, &v) in out.iter_mut().zip(z) {
        *o = (v as f64 - lse).exp() as f32;
    }
    lse
}

/// Mean cross-entropy over the positions with a label; `dlogits` gets its gradient.
pub fn cross_entropy(
    logits: &[f32],
    n_vocab: usize,
    labels: &[Option<u32>],
    dlogits: &mut [f32],
) -> Result<f64> {
    smoothed_cross_entropy(logits, n_vocab, labels, 0.0, dlogits)
}

/// Mean of `CE + smooth * KL(uniform || p)` over the positions with a label; `dlogits` gets
/// its gradient (`smooth = 0`: plain cross-entropy).
pub fn smoothed_cross_entropy(
    logits: &[f32],
    n_vocab: usize,
    labels: &[Option<u32>],
    smooth: f32,
    dlogits: &mut [f32],
) -> Result<f64> {
    if !smooth.is_finite() || smooth < 0.0 {
        return Err(Error::Invalid(format!(
            "the smoothing weight must be >= 0, got {smooth}"
        )));
    }
    let (s, log_v, uni) = (smooth as f64, (n_vocab as f64).ln(), 1.0 / n_vocab as f64);
    let n = labels.len();
    check(logits, n_vocab, n, dlogits)?;
    if let Some(bad) = labels.iter().flatten().find(|&&y| y as usize >= n_vocab) {
        return Err(Error::Invalid(format!(
            "label {bad} is outside the vocabulary of {n_vocab}"
        )));
    }
    dlogits.fill(0.0);
    let count = labels.iter().filter(|l| l.is_some()).count();
    if count == 0 {
        return Ok(0.0);
    }
    let inv = 1.0 / count as f64;
    let mut loss = 0.0;
    for (t, y) in labels.iter().enumerate() {
        let Some(y) = y else { continue };
        let (z, d) = (
            &logits[t * n_vocab..(t + 1) * n_vocab],
            &mut dlogits[t * n_vocab..(t + 1) * n_vocab],
        );
        let lse = softmax_into(z, d);
        loss += lse - z[*y as usize] as f64;
        if s > 0.0 {
            let mean_z = z.iter().map(|&v| v as f64).sum::<f64>() * uni;
            loss += s * (-log_v - (mean_z - lse));
            for g in d.iter_mut() {
                *g = (*g as f64 + s * (*g as f64 - uni)) as f32;
            }
        }
        d[*y as usize] -= 1.0;
        for g in d.iter_mut() {
            *g = (*g as f64 * inv) as f32;
        }
    }
    Ok(loss * inv)
}

/// Mean KL(uniform || p) over the positions with `mask[t]`; `dlogits` gets its gradient.
pub fn kl_uniform(
    logits: &[f32],
    n_vocab: usize,
    mask: &[bool],
    dlogits: &mut [f32],
) -> Result<f64> {
    let n = mask.len();
    check(logits, n_vocab, n, dlogits)?;
    dlogits.fill(0.0);
    let count = mask.iter().filter(|&&m| m).count();
    if count == 0 {
        return Ok(0.0);
    }
    let inv = 1.0 / count as f64;
    let (log_v, uni) = ((n_vocab as f64).ln(), 1.0 / n_vocab as f64);
    let mut loss = 0.0;
    for t in (0..n).filter(|&t| mask[t]) {
        let (z, d) = (
            &logits[t * n_vocab..(t + 1) * n_vocab],
            &mut dlogits[t * n_vocab..(t + 1) * n_vocab],
        );
        let lse = softmax_into(z, d);
        let mean_z = z.iter().map(|&v| v as f64).sum::<f64>() * uni;
        loss += -log_v - (mean_z - lse);
        for g in d.iter_mut() {
            *g = ((*g as f64 - uni) * inv) as f32;
        }
    }
    Ok(loss * inv)
}
