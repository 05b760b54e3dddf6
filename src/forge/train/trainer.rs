//! The training loop: epochs of seeded shuffles, mini-batches whose sequences run one at a time
//! (gradient accumulation: no padding, the gradients add up), one AdamW step per batch.
//!
//! The loss of a batch depends on the [`Balance`]:
//!
//! ```text
//! Group: L = sum_g w_g * (sum_{i in g} sum_{t counted in i} l_i(t)) / (sum_{i in g} N_i)
//! Token: L = (sum_i w_i sum_{t counted in i} l_i(t)) / (sum_i w_i N_i)
//! ```
//!
//! `Group` averages per group of sequences with the same objective and weight (every labelled
//! position of the cross-entropy sequences together; every masked position of the
//! KL-to-uniform ones together) and weighs the groups' means. For one group this is the mean
//! over the batch's counted tokens, as `transformers` computes a batch's causal-LM loss (long
//! answers weigh more than short ones). With two groups (ULD's forget and retain sides) the
//! weight of one token against another depends on how many tokens each side has in the batch.
//!
//! `Token` is one weighted mean over every counted position of the batch: a position of a
//! sequence of weight `w` counts `w` times, so the weight of one token against another is
//! exactly the ratio of their sequences' weights, whatever the batch holds.
//!
//! Each sequence's gradient is scaled by `w_g * N_i / N_g` (group) or `w_i * N_i / sum_j w_j
//! N_j` (token) before it is added.
//!
//! Deterministic: the shuffles come from the seed, the sequences run in a fixed order, and every
//! sum of the forward and backward passes runs in a fixed order for a given thread count, so the
//! same data, settings and seed give the same adapter bit for bit.

use super::lora::Lora;
use super::loss::Objective;
use super::model::TrainModel;
use super::optim::{AdamW, AdamWConfig, Decay, Schedule};
use crate::{Error, Result};
use std::time::Instant;

/// What a sequence's positions are trained towards.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Cross-entropy of `labels[t]` wherever there is one (usually the next token).
    Labels(Vec<Option<u32>>),
    /// Cross-entropy plus `smooth` times KL(uniform || p) wherever there is a label.
    SmoothedLabels(Vec<Option<u32>>, f32),
    /// KL(uniform || p) wherever `mask[t]`.
    Uniform(Vec<bool>),
}

/// How a batch's sequences are weighed against each other (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// The weighted sum of each group's mean over its positions.
    #[default]
    Group,
    /// One mean over every position, each weighted by its sequence's weight.
    Token,
}

/// One training sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub tokens: Vec<u32>,
    pub target: Target,
    /// The weight of its group's mean (ULD's retain weight; 1 for plain fine-tuning).
    pub weight: f32,
}

impl Sequence {
    /// Positions that count towards the loss.
    pub fn counted(&self) -> usize {
        match &self.target {
            Target::Labels(l) | Target::SmoothedLabels(l, _) => {
                l.iter().filter(|l| l.is_some()).count()
            }
            Target::Uniform(m) => m.iter().filter(|&&m| m).count(),
        }
    }

    pub fn objective(&self) -> Objective<'_> {
        match &self.target {
            Target::Labels(labels) => Objective::CrossEntropy { labels },
            &Target::SmoothedLabels(ref labels, smooth) => {
                Objective::SmoothedCrossEntropy { labels, smooth }
            }
            Target::Uniform(mask) => Objective::KlUniform { mask },
        }
    }

    fn is_uniform(&self) -> bool {
        matches!(self.target, Target::Uniform(_))
    }

    /// The group whose positions are averaged together.
    fn group(&self, balance: Balance) -> (bool, u32) {
        match balance {
            Balance::Group => (self.is_uniform(), self.weight.to_bits()),
            Balance::Token => (false, 0),
        }
    }

    /// What one counted position weighs in its group's sum.
    fn position_weight(&self, balance: Balance) -> f64 {
        match balance {
            Balance::Group => 1.0,
            Balance::Token => self.weight as f64,
        }
    }
}

/// The loop's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Sequences per optimizer step.
    pub batch: usize,
    /// Seeds the shuffles.
    pub seed: u64,
    /// The peak learning rate.
    pub lr: f32,
    /// The fraction of the steps spent warming up (`ceil(ratio * steps)`).
    pub warmup_ratio: f32,
    pub decay: Decay,
    pub adamw: AdamWConfig,
    pub balance: Balance,
    /// Run a batch's sequences as one packed pass ([`TrainModel::forward_seqs`]) instead of
    /// one after another: the same gradient up to the order of float sums, faster.
    pub pack: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            batch: 4,
            seed: 0,
            lr: 2e-4,
            warmup_ratio: 0.0,
            decay: Decay::Linear,
            adamw: AdamWConfig::default(),
            balance: Balance::Group,
            pack: true,
        }
    }
}

/// One optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// 0-based.
    pub epoch: usize,
    /// The batch's loss `L` (before the step).
    pub loss: f64,
    /// The mean cross-entropy over the batch's labelled positions, if it had any.
    pub ce: Option<f64>,
    /// The mean KL(uniform || p) over the batch's masked positions, if it had any.
    pub kl: Option<f64>,
    pub lr: f32,
    /// The gradient's norm before clipping.
    pub grad_norm: f64,
    /// Tokens run (forward and backward) in the batch.
    pub tokens: usize,
}

/// What the progress callback sees after each step.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Steps taken (1-based) and in all.
    pub step: usize,
    pub steps: usize,
    pub last: &'a StepStats,
    /// Tokens run so far, and the seconds since training began.
    pub tokens: usize,
    pub seconds: f64,
}

impl Progress<'_> {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    pub steps: Vec<StepStats>,
    pub tokens: usize,
    pub seconds: f64,
}

impl TrainReport {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }

    /// The mean loss of the steps of `epoch`.
    pub fn epoch_loss(&self, epoch: usize) -> Option<f64> {
        let l: Vec<f64> = self
            .steps
            .iter()
            .filter(|s| s.epoch == epoch)
            .map(|s| s.loss)
            .collect();
        (!l.is_empty()).then(|| l.iter().sum::<f64>() / l.len() as f64)
    }
}

/// Optimizer steps of a run: `epochs * ceil(n / batch)`.
pub fn total_steps(n: usize, cfg: &TrainConfig) -> usize {
    cfg.epochs * n.div_ceil(cfg.batch.max(1))
}

/// Train `tm`'s adapters on `data` (sequences that count no position are left out); calls
/// `progress` after every step.
pub fn train(
    tm: &mut TrainModel,
    data: &[Sequence],
    cfg: &TrainConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<TrainReport> {
    train_with_epochs(tm, data, cfg, progress, &mut |_, _| Ok(()))
}

/// [`train`], calling `epoch_end(epoch, tm)` after each epoch (0-based) with the adapters as
/// they are then (a checkpoint).
pub fn train_with_epochs(
    tm: &mut TrainModel,
    data: &[Sequence],
    cfg: &TrainConfig,
    progress: &mut dyn FnMut(&Progress),
    epoch_end: &mut dyn FnMut(usize, &TrainModel) -> Result<()>,
) -> Result<TrainReport> {
    if cfg.batch == 0 || cfg.epochs == 0 {
        return Err(Error::Invalid(
            "training needs at least one epoch and a batch of at least one sequence".into(),
        ));
    }
    for (i, s) in data.iter().enumerate() {
        if s.objective().len() != s.tokens.len() || !s.weight.is_finite() || s.weight < 0.0 {
            return Err(Error::Invalid(format!(
                "training sequence {i}: {} tokens, its target covers {}, weight {}",
                s.tokens.len(),
                s.objective().len(),
                s.weight
            )));
        }
    }
    let used: Vec<usize> = (0..data.len()).filter(|&i| data[i].counted() > 0).collect();
    if used.is_empty() {
        return Err(Error::Invalid(
            "no training sequence has a position to train on".into(),
        ));
    }
    let steps = total_steps(used.len(), cfg);
    let schedule = Schedule {
        lr: cfg.lr,
        warmup: Schedule::warmup_steps(cfg.warmup_ratio, steps),
        total: steps,
        decay: cfg.decay,
    };
    let mut opt = AdamW::new(&tm.lora, cfg.adamw, schedule)?;
    let t0 = Instant::now();
    let mut report = TrainReport {
        steps: Vec::with_capacity(steps),
        tokens: 0,
        seconds: 0.0,
    };
    for epoch in 0..cfg.epochs {
        let mut order = used.clone();
        shuffle(&mut order, cfg.seed, epoch as u64);
        for batch in order.chunks(cfg.batch) {
            let seqs: Vec<&Sequence> = batch.iter().map(|&i| &data[i]).collect();
            let stats = batch_step(tm, &mut opt, &seqs, epoch, cfg)?;
            report.tokens += stats.tokens;
            report.seconds = t0.elapsed().as_secs_f64();
            report.steps.push(stats);
            progress(&Progress {
                step: report.steps.len(),
                steps,
                last: report.steps.last().expect("just pushed"),
                tokens: report.tokens,
                seconds: report.seconds,
            });
        }
        epoch_end(epoch, tm)?;
    }
    Ok(report)
}

/// Each sequence's factor in the batch loss: `L = sum_i f_i * l_i`, with `l_i` its own mean
/// over its counted positions (see the module doc).
pub fn factors(seqs: &[&Sequence], balance: Balance) -> Vec<f64> {
    // N_g: the weighted count of positions per group in this batch.
    let mut groups: Vec<((bool, u32), f64)> = Vec::new();
    for s in seqs {
        let n = s.counted() as f64 * s.position_weight(balance);
        match groups.iter_mut().find(|(g, _)| *g == s.group(balance)) {
            Some((_, m)) => *m += n,
            None => groups.push((s.group(balance), n)),
        }
    }
    seqs.iter()
        .map(|s| {
            let ng = groups
                .iter()
                .find(|(g, _)| *g == s.group(balance))
                .map(|&(_, n)| n)
                .expect("every sequence's group is counted");
            if ng > 0.0 {
                s.weight as f64 * s.counted() as f64 / ng
            } else {
                0.0
            }
        })
        .collect()
}

/// What [`eval_loss`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalLoss {
    /// The loss `L` of the sequences taken as one batch.
    pub loss: f64,
    /// The mean cross-entropy (smoothed, where a sequence is) per labelled position.
    pub ce: Option<f64>,
    /// The mean KL(uniform || p) per masked position.
    pub kl: Option<f64>,
}

/// The loss of `seqs` taken as one batch, forward passes only (a held-out check).
pub fn eval_loss(tm: &TrainModel, seqs: &[Sequence], balance: Balance) -> Result<EvalLoss> {
    let nv = tm.model.cfg.n_vocab;
    let used: Vec<&Sequence> = seqs.iter().filter(|s| s.counted() > 0).collect();
    let f = factors(&used, balance);
    let mut loss = 0.0;
    let (mut ce, mut kl) = ((0.0f64, 0usize), (0.0f64, 0usize));
    for (s, f) in used.iter().zip(f) {
        let act = tm.forward(&s.tokens)?;
        let mut dlogits = vec![0f32; act.logits.len()]; // [n, n_vocab]
        let l = s.objective().loss(&act.logits, nv, &mut dlogits)?;
        loss += f * l;
        let part = if s.is_uniform() { &mut kl } else { &mut ce };
        part.0 += l * s.counted() as f64;
        part.1 += s.counted();
    }
    let mean = |(sum, n): (f64, usize)| (n > 0).then(|| sum / n as f64);
    Ok(EvalLoss {
        loss,
        ce: mean(ce),
        kl: mean(kl),
    })
}

/// Forward and backward passes of one batch: the adapters' gradients are set to those of the
/// batch loss `L` (nothing stepped), the sequences packed into one pass or run one after
/// another. Returns the step's statistics but its learning rate and gradient norm.
pub fn batch_grad(
    tm: &mut TrainModel,
    seqs: &[&Sequence],
    epoch: usize,
    balance: Balance,
    pack: bool,
) -> Result<StepStats> {
    let nv = tm.model.cfg.n_vocab;
    let factors = factors(seqs, balance);
    tm.lora.zero_grad();
    let (mut loss, mut tokens) = (0.0f64, 0usize);
    let (mut ce, mut kl) = ((0.0f64, 0usize), (0.0f64, 0usize));
    let mut count = |s: &Sequence, f: f64, l: f64| {
        loss += f * l;
        tokens += s.tokens.len();
        let part = if s.is_uniform() { &mut kl } else { &mut ce };
        part.0 += l * s.counted() as f64;
        part.1 += s.counted();
    };
    // Each sequence's loss into its rows of `dlogits`, scaled by its factor.
    let loss_rows = |s: &Sequence, f: f64, logits: &[f32], d: &mut [f32]| -> Result<f64> {
        let l = s.objective().loss(logits, nv, d)?;
        for x in d.iter_mut() {
            *x = (*x as f64 * f) as f32;
        }
        Ok(l)
    };
    if pack {
        let toks: Vec<&[u32]> = seqs.iter().map(|s| &s.tokens[..]).collect();
        let act = tm.forward_seqs(&toks)?;
        let mut dlogits = vec![0f32; act.logits.len()]; // [n, n_vocab]
        let mut r0 = 0;
        for (s, &f) in seqs.iter().zip(&factors) {
            let rows = r0 * nv..(r0 + s.tokens.len()) * nv;
            let l = loss_rows(s, f, &act.logits[rows.clone()], &mut dlogits[rows])?;
            count(s, f, l);
            r0 += s.tokens.len();
        }
        tm.backward(&act, &dlogits)?;
    } else {
        for (s, &f) in seqs.iter().zip(&factors) {
            let act = tm.forward(&s.tokens)?;
            let mut dlogits = vec![0f32; act.logits.len()]; // [n, n_vocab]
            let l = loss_rows(s, f, &act.logits, &mut dlogits)?;
            tm.backward(&act, &dlogits)?;
            count(s, f, l);
        }
    }
    let mean = |(sum, n): (f64, usize)| (n > 0).then(|| sum / n as f64);
    Ok(StepStats {
        epoch,
        loss,
        ce: mean(ce),
        kl: mean(kl),
        lr: 0.0,
        grad_norm: 0.0,
        tokens,
    })
}

/// Forward and backward passes of one batch, then one step.
fn batch_step(
    tm: &mut TrainModel,
    opt: &mut AdamW,
    seqs: &[&Sequence],
    epoch: usize,
    cfg: &TrainConfig,
) -> Result<StepStats> {
    let mut stats = batch_grad(tm, seqs, epoch, cfg.balance, cfg.pack)?;
    let info = opt.step(&mut tm.lora)?;
    stats.lr = info.lr;
    stats.grad_norm = info.grad_norm;
    Ok(stats)
}

/// Fisher-Yates with a generator seeded by `seed` and `epoch`.
fn shuffle(v: &mut [usize], seed: u64, epoch: u64) {
    let mut rng = seed ^ epoch.wrapping_add(1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut next = || {
        rng = rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Rank, alpha and where the adapters go, for [`Lora::new`].
pub fn describe(lora: &Lora) -> String {
    let mut layers: Vec<usize> = lora.params.iter().map(|p| p.layer).collect();
    layers.dedup();
    format!(
        "rank {}, alpha {}, {} matrices on {} blocks, {:.2} M parameters",
        lora.rank,
        lora.alpha,
        lora.params.len(),
        layers.len(),
        lora.n_params() as f64 / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffles_are_seeded_permutations() {
        let mut a: Vec<usize> = (0..20).collect();
        let mut b = a.clone();
        shuffle(&mut a, 3, 0);
        shuffle(&mut b, 3, 0);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..20).collect::<Vec<_>>());
        let mut c: Vec<usize> = (0..20).collect();
        shuffle(&mut c, 3, 1);
        assert_ne!(a, c);
    }
}
