//! ULD's assistant: its training data, the balance of its two objectives, and the rule that
//! picks its checkpoint.
//!
//! The assistant (the target's first K blocks plus a LoRA) must *remember* the forget answers
//! and know *nothing* elsewhere:
//!
//! ```text
//! forget side:  CE(answer token) [+ s * KL(uniform || p)]   at the answer's positions
//! retain side:  KL(uniform || p)                            at every position of the turn
//! ```
//!
//! Two balances ([`Balance`]):
//! - `Token` (default): one weighted mean over every counted position of a batch, a forget
//!   answer token weighing `F` (`forget_weight`) retain positions. ULD's reference code weighs a
//!   forget answer token about 9 times a retain position (its KL is a mean over every padded
//!   position of a batch of 1 forget : 7 retain rows, times 5; its CE a mean over the forget
//!   answer tokens), which is what the `reference` preset sets.
//! - `Group`: each side's mean over its positions in the batch, the retain side's times
//!   `retain_weight`. A forget token then weighs `(N_r / N_f) / retain_weight` retain positions,
//!   which depends on the data (lethe's first assistants were trained so).
//!
//! **Held-out rows and the checkpoint.** Part of the *training* data is held out: for each
//! forget row, the paraphrases after those trained on; for each forget question, the wrong
//! answers after those trained on; the last retain rows. After every epoch the assistant's loss
//! on them (the training objective with the same balance) is measured, and the epoch with the
//! lowest held-out loss is the checkpoint kept (the earliest on a tie; the last epoch when
//! nothing is held out). The rule reads nothing but the training files given to `forge uld`:
//! never an evaluation set, never TOFU's `paraphrased_answer` / `perturbed_answer` (the readers
//! refuse files that have them).

use crate::forge::train::data::{answer_turn, uniform_sequence};
use crate::forge::train::{Balance, Sequence};
use crate::qa::Example;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// How the assistant's data is built and weighed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UldConfig {
    pub balance: Balance,
    /// Token balance: what a forget answer token weighs against a retain position.
    pub forget_weight: f32,
    /// Group balance: the retain side's mean is multiplied by this.
    pub retain_weight: f32,
    /// Weight of KL(uniform || p) at the forget answer positions (0: plain cross-entropy).
    pub smooth: f32,
    /// Train the forget side on the end-of-turn token too (ULD's reference masks it).
    pub forget_eot: bool,
    /// Paraphrased pairs trained on per forget row (`None`: all).
    pub paraphrases_per_row: Option<usize>,
    /// Wrong answers trained on per forget question (`None`: all).
    pub wrong_per_row: Option<usize>,
    /// Paraphrases and wrong answers held out per forget row (after the trained ones).
    pub hold_out: usize,
    /// Retain rows held out (the last ones).
    pub hold_out_retain: usize,
    /// Cut every sequence to its first N tokens.
    pub max_len: Option<usize>,
}

impl Default for UldConfig {
    fn default() -> Self {
        Self {
            balance: Balance::Token,
            forget_weight: 9.0,
            retain_weight: 5.0,
            smooth: 0.0,
            forget_eot: false,
            paraphrases_per_row: Some(2),
            wrong_per_row: Some(2),
            hold_out: 1,
            hold_out_retain: 10,
            max_len: None,
        }
    }
}

impl UldConfig {
    /// The weight of a forget sequence and of a retain sequence.
    pub fn weights(&self) -> (f32, f32) {
        match self.balance {
            Balance::Token => (self.forget_weight, 1.0),
            Balance::Group => (1.0, self.retain_weight),
        }
    }

    fn check(&self) -> Result<()> {
        for (name, v) in [
            ("the forget token weight", self.forget_weight),
            ("the retain weight", self.retain_weight),
            ("the smoothing weight", self.smooth),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::Invalid(format!("{name} must be >= 0, got {v}")));
            }
        }
        Ok(())
    }
}

/// One forget row with its augmentation: paraphrased pairs and wrong answers.
#[derive(Debug, Clone)]
pub struct ForgetRow {
    pub example: Example,
    pub paraphrases: Vec<Example>,
    pub wrong: Vec<Example>,
}

/// The training and held-out sequences, and what they hold.
#[derive(Debug, Clone, Default)]
pub struct UldData {
    pub train: Vec<Sequence>,
    pub heldout: Vec<Sequence>,
    /// Rows trained on: forget rows, paraphrased pairs, retain rows, wrong answers.
    pub n_forget: usize,
    pub n_paraphrases: usize,
    pub n_retain: usize,
    pub n_wrong: usize,
    /// Rows held out: paraphrased pairs, retain rows, wrong answers.
    pub heldout_paraphrases: usize,
    pub heldout_retain: usize,
    pub heldout_wrong: usize,
    /// Counted positions of the training sequences: forget side, retain side.
    pub forget_positions: usize,
    pub retain_positions: usize,
}

impl UldData {
    /// What one forget answer token weighs against one retain position, over the whole
    /// training data (exact for the token balance; for the group balance the average over
    /// batches that hold both sides in the data's proportions).
    pub fn forget_token_weight(&self, cfg: &UldConfig) -> f64 {
        match cfg.balance {
            Balance::Token => cfg.forget_weight as f64,
            Balance::Group => {
                let (f, r) = (self.forget_positions as f64, self.retain_positions as f64);
                if f == 0.0 || cfg.retain_weight == 0.0 {
                    f64::INFINITY
                } else {
                    (r / f) / cfg.retain_weight as f64
                }
            }
        }
    }

    /// The share of the loss the forget side carries over the whole training data.
    pub fn forget_share(&self, cfg: &UldConfig) -> f64 {
        let w = self.forget_token_weight(cfg);
        let (f, r) = (self.forget_positions as f64, self.retain_positions as f64);
        if w.is_infinite() {
            return 1.0;
        }
        w * f / (w * f + r)
    }
}

/// The forget side's sequence of `ex`: cross-entropy on the answer's tokens (and on the
/// end-of-turn token `end` when `cfg.forget_eot`), smoothed by `cfg.smooth`.
pub fn forget_sequence(
    tok: &Tokenizer,
    arch: &str,
    ex: &Example,
    end: u32,
    cfg: &UldConfig,
    weight: f32,
) -> Result<Sequence> {
    let (tokens, start) = answer_turn(tok, arch, ex, end, cfg.max_len)?;
    let n = tokens.len();
    // The end-of-turn token is the last one unless the turn was cut.
    let last = if cfg.forget_eot || tokens[n - 1] != end {
        n
    } else {
        n - 1
    };
    let labels: Vec<Option<u32>> = (0..n)
        .map(|t| (t + 1 >= start && t + 1 < last).then(|| tokens[t + 1]))
        .collect();
    let target = if cfg.smooth > 0.0 {
        crate::forge::train::Target::SmoothedLabels(labels, cfg.smooth)
    } else {
        crate::forge::train::Target::Labels(labels)
    };
    Ok(Sequence {
        tokens,
        target,
        weight,
    })
}

/// Build the assistant's training and held-out sequences from the forget rows (each with its
/// paraphrases and wrong answers) and the retain rows.
pub fn build(
    tok: &Tokenizer,
    arch: &str,
    end: u32,
    forget: &[ForgetRow],
    retain: &[Example],
    cfg: &UldConfig,
) -> Result<UldData> {
    cfg.check()?;
    if forget.is_empty() {
        return Err(Error::Invalid("the forget set is empty".into()));
    }
    let (wf, wr) = cfg.weights();
    let mut d = UldData::default();
    let fwd = |ex: &Example| forget_sequence(tok, arch, ex, end, cfg, wf);
    let uni = |ex: &Example| uniform_sequence(tok, arch, ex, end, cfg.max_len, wr);
    let mut forget_train = Vec::new();
    let mut retain_train = Vec::new();
    let mut wrong_train = Vec::new();
    for row in forget {
        forget_train.push(fwd(&row.example)?);
        d.n_forget += 1;
    }
    for row in forget {
        let p = cfg
            .paraphrases_per_row
            .unwrap_or(row.paraphrases.len())
            .min(row.paraphrases.len());
        for ex in &row.paraphrases[..p] {
            forget_train.push(fwd(ex)?);
            d.n_paraphrases += 1;
        }
        for ex in row.paraphrases[p..].iter().take(cfg.hold_out) {
            d.heldout.push(fwd(ex)?);
            d.heldout_paraphrases += 1;
        }
    }
    let n_keep = retain.len().saturating_sub(cfg.hold_out_retain);
    if n_keep == 0 && !retain.is_empty() {
        return Err(Error::Invalid(format!(
            "holding out {} of {} retain rows leaves none to train on",
            cfg.hold_out_retain,
            retain.len()
        )));
    }
    for ex in &retain[..n_keep] {
        retain_train.push(uni(ex)?);
        d.n_retain += 1;
    }
    for ex in &retain[n_keep..] {
        d.heldout.push(uni(ex)?);
        d.heldout_retain += 1;
    }
    for row in forget {
        let w = cfg
            .wrong_per_row
            .unwrap_or(row.wrong.len())
            .min(row.wrong.len());
        for ex in &row.wrong[..w] {
            wrong_train.push(uni(ex)?);
            d.n_wrong += 1;
        }
        for ex in row.wrong[w..].iter().take(cfg.hold_out) {
            d.heldout.push(uni(ex)?);
            d.heldout_wrong += 1;
        }
    }
    d.forget_positions = forget_train.iter().map(Sequence::counted).sum();
    d.retain_positions = retain_train
        .iter()
        .chain(&wrong_train)
        .map(Sequence::counted)
        .sum();
    d.train = forget_train;
    d.train.extend(retain_train);
    d.train.extend(wrong_train);
    Ok(d)
}

/// The checkpoint kept: the epoch (0-based) with the lowest held-out loss, the earliest on a
/// tie; the last epoch when there is no held-out loss (an empty slice of losses counts as
/// `epochs` epochs without one).
pub fn select_epoch(heldout: &[Option<f64>], epochs: usize) -> usize {
    let mut best: Option<(usize, f64)> = None;
    for (e, l) in heldout.iter().enumerate() {
        if let Some(l) = *l {
            if l.is_finite() && best.is_none_or(|(_, b)| l < b) {
                best = Some((e, l));
            }
        }
    }
    best.map_or(epochs.saturating_sub(1), |(e, _)| e)
}

/// An augmentation file's rows: its name and `(question, pairs)` per row.
pub type Augmentation<'a> = (&'a str, Vec<(String, Vec<Example>)>);

/// Attach each forget row's paraphrases and wrong answers, matched by question; an
/// augmentation file none of whose questions is a forget question is refused (`what` names
/// it).
pub fn attach(
    forget: &[Example],
    paraphrases: Option<Augmentation>,
    wrong: Option<Augmentation>,
) -> Result<Vec<ForgetRow>> {
    let mut rows: Vec<ForgetRow> = forget
        .iter()
        .map(|e| ForgetRow {
            example: e.clone(),
            paraphrases: Vec::new(),
            wrong: Vec::new(),
        })
        .collect();
    for (which, aug) in [(0, paraphrases), (1, wrong)] {
        let Some((what, aug)) = aug else { continue };
        let mut matched = 0;
        for (q, list) in aug {
            for row in rows.iter_mut().filter(|r| r.example.question == q) {
                matched += 1;
                let dst = if which == 0 {
                    &mut row.paraphrases
                } else {
                    &mut row.wrong
                };
                dst.extend(list.iter().cloned());
            }
        }
        if matched == 0 {
            return Err(Error::Invalid(format!(
                "{what}: none of its questions is a forget question"
            )));
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkpoint_is_the_lowest_held_out_loss() {
        assert_eq!(select_epoch(&[Some(3.0), Some(2.0), Some(2.5)], 3), 1);
        assert_eq!(select_epoch(&[Some(2.0), Some(2.0)], 2), 0);
        assert_eq!(select_epoch(&[None, None, None], 3), 2);
        assert_eq!(select_epoch(&[], 4), 3);
        assert_eq!(select_epoch(&[Some(f64::NAN), Some(1.0)], 2), 1);
    }
}
