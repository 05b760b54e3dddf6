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
//! - negative cross-entropy: `-CE`, gradient ascent on the labels (graddiff's forget side).
//!
//! `N` is the number of counted positions; with none, the loss and its gradient are 0.
//!
//! Two objectives of unlearning score a whole answer at once, through its log-probability
//! `lp = sum over labelled t of log p_t(y_t)`, whose gradient is `d lp / d z_t = onehot(y_t) -
//! p_t`; each sequence is one term (its loss is not divided by its length):
//!
//! - NPO (Zhang et al. 2024): `(2 / beta) * log(1 + exp(beta * (lp - lp_ref)))`, with `lp_ref`
//!   the answer's log-probability under the model before unlearning; `dL / d lp = 2 *
//!   sigmoid(beta * (lp - lp_ref))`.
//! - SimNPO (Fan et al. 2024): `-(2 / beta) * log sigmoid(-(beta / |y|) * lp - gamma)`, `|y|`
//!   the number of labelled tokens; with `u = -(beta / |y|) * lp - gamma`, `dL / d lp = (2 /
//!   |y|) * sigmoid(-u)`.
//!
//! RMU's objective is on hidden states, not logits: [`hidden_mse`].

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
    /// Minus the mean cross-entropy of `labels[t]` (gradient ascent).
    NegCrossEntropy { labels: &'a [Option<u32>] },
    /// NPO over the answer the labels spell, against its log-probability `reference` under the
    /// model before unlearning.
    Npo {
        labels: &'a [Option<u32>],
        reference: f64,
        beta: f32,
    },
    /// SimNPO over the answer the labels spell.
    SimNpo {
        labels: &'a [Option<u32>],
        beta: f32,
        gamma: f32,
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
            Objective::NegCrossEntropy { labels } => {
                let l = cross_entropy(logits, n_vocab, labels, dlogits)?;
                for g in dlogits.iter_mut() {
                    *g = -*g;
                }
                Ok(-l)
            }
            Objective::Npo {
                labels,
                reference,
                beta,
            } => npo(logits, n_vocab, labels, reference, beta, dlogits),
            Objective::SimNpo {
                labels,
                beta,
                gamma,
            } => simnpo(logits, n_vocab, labels, beta, gamma, dlogits),
        }
    }

    /// The number of positions it covers (labels or mask entries).
    pub fn len(&self) -> usize {
        match *self {
            Objective::CrossEntropy { labels }
            | Objective::SmoothedCrossEntropy { labels, .. }
            | Objective::NegCrossEntropy { labels }
            | Objective::Npo { labels, .. }
            | Objective::SimNpo { labels, .. } => labels.len(),
            Objective::KlUniform { mask } => mask.len(),
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

/// `log(1 + exp(x))` without overflow.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `1 / (1 + exp(-x))` without overflow.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The answer's log-probability `lp = sum over labelled t of log p_t(y_t)` and the number of
/// labels; `dlogits` gets `d lp / d z` (`onehot(y_t) - p_t` at the labelled positions, 0
/// elsewhere).
pub fn answer_logprob(
    logits: &[f32],
    n_vocab: usize,
    labels: &[Option<u32>],
    dlogits: &mut [f32],
) -> Result<(f64, usize)> {
    let n = labels.len();
    check(logits, n_vocab, n, dlogits)?;
    if let Some(bad) = labels.iter().flatten().find(|&&y| y as usize >= n_vocab) {
        return Err(Error::Invalid(format!(
            "label {bad} is outside the vocabulary of {n_vocab}"
        )));
    }
    dlogits.fill(0.0);
    let (mut lp, mut count) = (0.0f64, 0usize);
    for (t, y) in labels.iter().enumerate() {
        let Some(y) = y else { continue };
        let (z, d) = (
            &logits[t * n_vocab..(t + 1) * n_vocab],
            &mut dlogits[t * n_vocab..(t + 1) * n_vocab],
        );
        let lse = softmax_into(z, d);
        lp += z[*y as usize] as f64 - lse;
        for g in d.iter_mut() {
            *g = -*g;
        }
        d[*y as usize] += 1.0;
        count += 1;
    }
    Ok((lp, count))
}

/// `dlogits *= f`.
fn scale(dlogits: &mut [f32], f: f64) {
    for g in dlogits.iter_mut() {
        *g = (*g as f64 * f) as f32;
    }
}

fn check_beta(beta: f32) -> Result<()> {
    if !beta.is_finite() || beta <= 0.0 {
        return Err(Error::Invalid(format!("beta must be > 0, got {beta}")));
    }
    Ok(())
}

/// NPO's loss of one answer, `(2 / beta) * log(1 + exp(beta * (lp - reference)))`; `dlogits`
/// gets its gradient. 0 (and a zero gradient) when nothing is labelled.
pub fn npo(
    logits: &[f32],
    n_vocab: usize,
    labels: &[Option<u32>],
    reference: f64,
    beta: f32,
    dlogits: &mut [f32],
) -> Result<f64> {
    check_beta(beta)?;
    if !reference.is_finite() {
        return Err(Error::Invalid(format!(
            "NPO's reference log-probability must be finite, got {reference}"
        )));
    }
    let (lp, count) = answer_logprob(logits, n_vocab, labels, dlogits)?;
    if count == 0 {
        return Ok(0.0);
    }
    let b = beta as f64;
    let x = b * (lp - reference);
    scale(dlogits, 2.0 * sigmoid(x));
    Ok(2.0 / b * softplus(x))
}

/// SimNPO's loss of one answer, `-(2 / beta) * log sigmoid(-(beta / |y|) * lp - gamma)`;
/// `dlogits` gets its gradient. 0 (and a zero gradient) when nothing is labelled.
pub fn simnpo(
    logits: &[f32],
    n_vocab: usize,
    labels: &[Option<u32>],
    beta: f32,
    gamma: f32,
    dlogits: &mut [f32],
) -> Result<f64> {
    check_beta(beta)?;
    if !gamma.is_finite() {
        return Err(Error::Invalid(format!("gamma must be finite, got {gamma}")));
    }
    let (lp, count) = answer_logprob(logits, n_vocab, labels, dlogits)?;
    if count == 0 {
        return Ok(0.0);
    }
    let (b, len) = (beta as f64, count as f64);
    let u = -(b / len) * lp - gamma as f64;
    // -log sigmoid(u) = softplus(-u); dL/dlp = (2 / |y|) sigmoid(-u).
    scale(dlogits, 2.0 / len * sigmoid(-u));
    Ok(2.0 / b * softplus(-u))
}

/// What RMU pulls hidden states towards.
#[derive(Debug, Clone, Copy)]
pub enum HiddenTarget<'a> {
    /// One vector for every position (`[e]`: RMU's `c * u` on the forget side).
    Fixed(&'a [f32]),
    /// A vector per position (`[n, e]`: the frozen model's states on the retain side).
    Rows(&'a [f32]),
}

/// RMU's loss on hidden states `h` (`[n, e]`): the mean over the positions with `mask[t]` and
/// the `e` dimensions of `(h_t - target_t)^2` (PyTorch's `mse_loss` over the selected rows);
/// `dh` gets its gradient, `2 (h_t - target_t) / (N e)` there and 0 elsewhere.
pub fn hidden_mse(
    h: &[f32],
    e: usize,
    target: HiddenTarget,
    mask: &[bool],
    dh: &mut [f32],
) -> Result<f64> {
    let n = mask.len();
    let tlen = match target {
        HiddenTarget::Fixed(v) => v.len() * n,
        HiddenTarget::Rows(v) => v.len(),
    };
    if e == 0 || h.len() != n * e || dh.len() != h.len() || tlen != n * e {
        return Err(Error::Invalid(format!(
            "hidden-state loss over {} values, {} gradients and a target of {tlen} for {n} \
             positions of {e}",
            h.len(),
            dh.len()
        )));
    }
    dh.fill(0.0);
    let count = mask.iter().filter(|&&m| m).count();
    if count == 0 {
        return Ok(0.0);
    }
    let inv = 1.0 / (count * e) as f64;
    let mut loss = 0.0f64;
    for t in (0..n).filter(|&t| mask[t]) {
        let want = match target {
            HiddenTarget::Fixed(v) => v,
            HiddenTarget::Rows(v) => &v[t * e..(t + 1) * e],
        };
        let (ht, dt) = (&h[t * e..(t + 1) * e], &mut dh[t * e..(t + 1) * e]);
        for ((d, &x), &w) in dt.iter_mut().zip(ht).zip(want) {
            let r = x as f64 - w as f64;
            loss += r * r;
            *d = (2.0 * r * inv) as f32;
        }
    }
    Ok(loss * inv)
}
