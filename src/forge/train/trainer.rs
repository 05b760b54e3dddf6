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
use super::model::{Activations, TrainModel};
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
    /// Minus the cross-entropy of the labels: gradient ascent (graddiff's forget side).
    Ascent(Vec<Option<u32>>),
    /// NPO on the answer the labels spell; `reference` is its log-probability under the model
    /// before unlearning. One term per sequence.
    Npo {
        labels: Vec<Option<u32>>,
        reference: f64,
        beta: f32,
    },
    /// SimNPO on the answer the labels spell. One term per sequence.
    SimNpo {
        labels: Vec<Option<u32>>,
        beta: f32,
        gamma: f32,
    },
    /// RMU's forget side: the hidden states (the residual stream after the last block that
    /// runs) at the positions with `mask[t]` pulled towards `to` (`[n_embd]`), by mean squared
    /// error. The model runs without its head ([`TrainModel::without_head`]).
    Steer { mask: Vec<bool>, to: Vec<f32> },
    /// RMU's retain side: the hidden states at the positions with `mask[t]` kept at `states`
    /// (`[n, n_embd]`, the model's before unlearning), by mean squared error.
    Keep { mask: Vec<bool>, states: Vec<f32> },
}

/// Which of a step's reported means a sequence's loss goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Cross-entropy, plain or smoothed (fine-tuning, ULD's forget side, a retain side).
    Ce,
    /// KL(uniform || p) (ULD's retain side).
    Kl,
    /// An unlearning objective's forget side.
    Forget,
    /// RMU's retain side.
    Keep,
}

impl Target {
    /// The positions it covers (labels or mask entries).
    pub fn len(&self) -> usize {
        match self {
            Target::Labels(l)
            | Target::SmoothedLabels(l, _)
            | Target::Ascent(l)
            | Target::Npo { labels: l, .. }
            | Target::SimNpo { labels: l, .. } => l.len(),
            Target::Uniform(m) | Target::Steer { mask: m, .. } | Target::Keep { mask: m, .. } => {
                m.len()
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it is a loss on hidden states, not on logits.
    pub fn on_hidden(&self) -> bool {
        matches!(self, Target::Steer { .. } | Target::Keep { .. })
    }

    fn part(&self) -> Part {
        match self {
            Target::Labels(_) | Target::SmoothedLabels(..) => Part::Ce,
            Target::Uniform(_) => Part::Kl,
            Target::Ascent(_)
            | Target::Npo { .. }
            | Target::SimNpo { .. }
            | Target::Steer { .. } => Part::Forget,
            Target::Keep { .. } => Part::Keep,
        }
    }
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
    /// Positions that count towards the loss; NPO and SimNPO count a sequence as one (their
    /// loss is per answer, not per token).
    pub fn counted(&self) -> usize {
        let labels = |l: &[Option<u32>]| l.iter().filter(|l| l.is_some()).count();
        match &self.target {
            Target::Labels(l) | Target::SmoothedLabels(l, _) | Target::Ascent(l) => labels(l),
            Target::Npo { labels: l, .. } | Target::SimNpo { labels: l, .. } => labels(l).min(1),
            Target::Uniform(m) | Target::Steer { mask: m, .. } | Target::Keep { mask: m, .. } => {
                m.iter().filter(|&&m| m).count()
            }
        }
    }

    /// The objective over the logits (`None` for a loss on hidden states).
    pub fn objective(&self) -> Option<Objective<'_>> {
        Some(match &self.target {
            Target::Labels(labels) => Objective::CrossEntropy { labels },
            &Target::SmoothedLabels(ref labels, smooth) => {
                Objective::SmoothedCrossEntropy { labels, smooth }
            }
            Target::Uniform(mask) => Objective::KlUniform { mask },
            Target::Ascent(labels) => Objective::NegCrossEntropy { labels },
            &Target::Npo {
                ref labels,
                reference,
                beta,
            } => Objective::Npo {
                labels,
                reference,
                beta,
            },
            &Target::SimNpo {
                ref labels,
                beta,
                gamma,
            } => Objective::SimNpo {
                labels,
                beta,
                gamma,
            },
            Target::Steer { .. } | Target::Keep { .. } => return None,
        })
    }

    /// Its loss over its rows of the model's output (`out`: logits `[n, n_vocab]`, or the
    /// hidden states `[n, n_embd]` for a loss on them), the gradient into `d` (same shape).
    pub fn loss(&self, out: &[f32], n_vocab: usize, n_embd: usize, d: &mut [f32]) -> Result<f64> {
        use super::loss::{hidden_mse, HiddenTarget};
        match &self.target {
            Target::Steer { mask, to } => hidden_mse(out, n_embd, HiddenTarget::Fixed(to), mask, d),
            Target::Keep { mask, states } => {
                hidden_mse(out, n_embd, HiddenTarget::Rows(states), mask, d)
            }
            _ => self
                .objective()
                .expect("a logit objective")
                .loss(out, n_vocab, d),
        }
    }

    /// The group whose positions are averaged together.
    fn group(&self, balance: Balance) -> (Part, u32) {
        match balance {
            Balance::Group => (self.target.part(), self.weight.to_bits()),
            Balance::Token => (Part::Ce, 0),
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
    /// Checkpoints per epoch ([`train_paired`]): the callback runs after this many evenly
    /// spaced steps of each epoch, the last at its end. At least 1.
    pub checks: usize,
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
            checks: 1,
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
    /// The mean unlearning objective of the forget side (per token; NPO and SimNPO per
    /// answer), if the batch had one.
    pub forget: Option<f64>,
    /// The mean squared error of RMU's retain side, if the batch had one.
    pub keep: Option<f64>,
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

/// Where a run stands at a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// 0-based.
    pub epoch: usize,
    /// Steps taken so far (1-based) and in all.
    pub step: usize,
    pub steps: usize,
    /// Steps an epoch.
    pub per_epoch: usize,
}

impl Checkpoint {
    /// Whether this checkpoint ends its epoch.
    pub fn ends_epoch(&self) -> bool {
        self.step.is_multiple_of(self.per_epoch)
    }

    /// Epochs run, with their fraction: `1.5` halfway through the second.
    pub fn epochs(&self) -> f64 {
        self.step as f64 / self.per_epoch as f64
    }

    /// "epoch 2" at an epoch's end, else "epoch 1.50 (step 15)".
    pub fn label(&self) -> String {
        if self.ends_epoch() {
            format!("epoch {}", self.epoch + 1)
        } else {
            format!("epoch {:.2} (step {})", self.epochs(), self.step)
        }
    }
}

/// The steps (1-based, within an epoch of `per_epoch` steps) after which `checks` evenly
/// spaced checkpoints fall, the last at the epoch's end; never more than one a step.
pub fn check_steps(per_epoch: usize, checks: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..=checks.max(1))
        .map(|k| (per_epoch * k).div_ceil(checks.max(1)))
        .filter(|&s| s > 0)
        .collect();
    v.dedup();
    v
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
    let cfg = TrainConfig { checks: 1, ..*cfg };
    epochs(tm, data, &[], &cfg, "training", progress, &mut |c, tm| {
        epoch_end(c.epoch, tm)
    })
}

/// Unlearning's loop: each step takes `batch` forget sequences and as many retain sequences
/// (fewer when the retain set is smaller). An epoch is one pass over the forget sequences in a
/// seeded shuffle; the retain sequences come in a seeded shuffled order that runs on across
/// epochs (reshuffled whenever it is used up), so every retain row is used as often as the
/// others. A batch's loss is weighed by `cfg.balance` as any batch's ([`factors`]): with the
/// group balance, the forget side's mean plus the retain side's mean times its sequences'
/// weight. Calls `progress` after every step and `checkpoint(at, tm)` `cfg.checks` times an
/// epoch ([`check_steps`]), the last at the epoch's end.
pub fn train_paired(
    tm: &mut TrainModel,
    forget: &[Sequence],
    retain: &[Sequence],
    cfg: &TrainConfig,
    progress: &mut dyn FnMut(&Progress),
    checkpoint: &mut dyn FnMut(Checkpoint, &TrainModel) -> Result<()>,
) -> Result<TrainReport> {
    epochs(tm, forget, retain, cfg, "forget", progress, checkpoint)
}

/// The loop of [`train_paired`] (with no retain sequences: [`train_with_epochs`]); `what`
/// names the first side in the error when none of it counts a position.
fn epochs(
    tm: &mut TrainModel,
    forget: &[Sequence],
    retain: &[Sequence],
    cfg: &TrainConfig,
    what: &str,
    progress: &mut dyn FnMut(&Progress),
    checkpoint: &mut dyn FnMut(Checkpoint, &TrainModel) -> Result<()>,
) -> Result<TrainReport> {
    check_run(cfg)?;
    check_data(forget)?;
    check_data(retain)?;
    let (f_used, r_used) = (used(forget), used(retain));
    if f_used.is_empty() {
        return Err(Error::Invalid(format!(
            "no {what} sequence has a position to train on"
        )));
    }
    let steps = total_steps(f_used.len(), cfg);
    let per_epoch = f_used.len().div_ceil(cfg.batch);
    let checks = check_steps(per_epoch, cfg.checks);
    let mut opt = AdamW::new(&tm.lora, cfg.adamw, schedule(cfg, steps))?;
    let mut run = Run::new(steps);
    let (mut r_order, mut r_pos, mut r_round) = (Vec::new(), 0usize, 0u64);
    for epoch in 0..cfg.epochs {
        let mut order = f_used.clone();
        shuffle(&mut order, cfg.seed, epoch as u64);
        for (k, chunk) in order.chunks(cfg.batch).enumerate() {
            let mut seqs: Vec<&Sequence> = chunk.iter().map(|&i| &forget[i]).collect();
            for _ in 0..chunk.len().min(r_used.len()) {
                if r_pos == r_order.len() {
                    r_order = r_used.clone();
                    shuffle(&mut r_order, cfg.seed ^ 0x5245_5441_494E, r_round);
                    (r_pos, r_round) = (0, r_round + 1);
                }
                seqs.push(&retain[r_order[r_pos]]);
                r_pos += 1;
            }
            let stats = batch_step(tm, &mut opt, &seqs, epoch, cfg)?;
            run.record(stats, progress);
            if checks.contains(&(k + 1)) {
                let at = Checkpoint {
                    epoch,
                    step: run.report.steps.len(),
                    steps,
                    per_epoch,
                };
                checkpoint(at, tm)?;
            }
        }
    }
    Ok(run.report)
}

fn check_run(cfg: &TrainConfig) -> Result<()> {
    if cfg.batch == 0 || cfg.epochs == 0 || cfg.checks == 0 {
        return Err(Error::Invalid(
            "training needs at least one epoch, a batch of at least one sequence and a \
             checkpoint an epoch"
                .into(),
        ));
    }
    Ok(())
}

fn check_data(data: &[Sequence]) -> Result<()> {
    for (i, s) in data.iter().enumerate() {
        if s.target.len() != s.tokens.len() || !s.weight.is_finite() || s.weight < 0.0 {
            return Err(Error::Invalid(format!(
                "training sequence {i}: {} tokens, its target covers {}, weight {}",
                s.tokens.len(),
                s.target.len(),
                s.weight
            )));
        }
    }
    Ok(())
}

/// The sequences that count a position (the others are left out).
fn used(data: &[Sequence]) -> Vec<usize> {
    (0..data.len()).filter(|&i| data[i].counted() > 0).collect()
}

fn schedule(cfg: &TrainConfig, steps: usize) -> Schedule {
    Schedule {
        lr: cfg.lr,
        warmup: Schedule::warmup_steps(cfg.warmup_ratio, steps),
        total: steps,
        decay: cfg.decay,
    }
}

/// A run's report as it grows, and its clock.
struct Run {
    report: TrainReport,
    steps: usize,
    t0: Instant,
}

impl Run {
    fn new(steps: usize) -> Self {
        Self {
            report: TrainReport {
                steps: Vec::with_capacity(steps),
                tokens: 0,
                seconds: 0.0,
            },
            steps,
            t0: Instant::now(),
        }
    }

    fn record(&mut self, stats: StepStats, progress: &mut dyn FnMut(&Progress)) {
        let r = &mut self.report;
        r.tokens += stats.tokens;
        r.seconds = self.t0.elapsed().as_secs_f64();
        r.steps.push(stats);
        progress(&Progress {
            step: r.steps.len(),
            steps: self.steps,
            last: r.steps.last().expect("just pushed"),
            tokens: r.tokens,
            seconds: r.seconds,
        });
    }
}

/// Each sequence's factor in the batch loss: `L = sum_i f_i * l_i`, with `l_i` its own mean
/// over its counted positions (see the module doc).
pub fn factors(seqs: &[&Sequence], balance: Balance) -> Vec<f64> {
    // N_g: the weighted count of positions per group in this batch.
    let mut groups: Vec<((Part, u32), f64)> = Vec::new();
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
    /// The mean forget-side objective (per token; NPO and SimNPO per answer).
    pub forget: Option<f64>,
    /// The mean squared error of RMU's retain side per position.
    pub keep: Option<f64>,
}

/// Sums per reported part: `(sum of loss * counted, counted)`.
#[derive(Default)]
struct Parts([(f64, usize); 4]);

impl Parts {
    fn add(&mut self, s: &Sequence, l: f64) {
        let p = &mut self.0[s.target.part() as usize];
        p.0 += l * s.counted() as f64;
        p.1 += s.counted();
    }

    fn mean(&self, p: Part) -> Option<f64> {
        let (sum, n) = self.0[p as usize];
        (n > 0).then(|| sum / n as f64)
    }
}

/// The model's output a sequence's loss reads: its hidden states when the batch's targets are
/// on hidden states (all or none of them must be), else its logits. Returns the output and
/// its width.
fn output<'a>(tm: &TrainModel, act: &'a Activations, hidden: bool) -> (&'a [f32], usize) {
    if hidden {
        (act.hidden(), tm.model.cfg.n_embd)
    } else {
        (&act.logits, tm.model.cfg.n_vocab)
    }
}

/// Whether `seqs` are on hidden states; an error when they mix the two kinds, or when the
/// model's head and the targets disagree.
fn on_hidden(tm: &TrainModel, seqs: &[&Sequence]) -> Result<bool> {
    let hidden = seqs.iter().any(|s| s.target.on_hidden());
    if hidden && !seqs.iter().all(|s| s.target.on_hidden()) {
        return Err(Error::Invalid(
            "a batch mixes losses on hidden states with losses on logits".into(),
        ));
    }
    if hidden == tm.has_head() {
        return Err(Error::Invalid(if hidden {
            "losses on hidden states need a model run without its head".into()
        } else {
            "losses on logits need the model's head".into()
        }));
    }
    Ok(hidden)
}

/// The loss of `seqs` taken as one batch, forward passes only (a held-out check).
pub fn eval_loss(tm: &TrainModel, seqs: &[Sequence], balance: Balance) -> Result<EvalLoss> {
    let (nv, e) = (tm.model.cfg.n_vocab, tm.model.cfg.n_embd);
    let used: Vec<&Sequence> = seqs.iter().filter(|s| s.counted() > 0).collect();
    let hidden = on_hidden(tm, &used)?;
    let f = factors(&used, balance);
    let mut loss = 0.0;
    let mut parts = Parts::default();
    for (s, f) in used.iter().zip(f) {
        let act = tm.forward(&s.tokens)?;
        let (out, _) = output(tm, &act, hidden);
        let mut d = vec![0f32; out.len()];
        let l = s.loss(out, nv, e, &mut d)?;
        loss += f * l;
        parts.add(s, l);
    }
    Ok(EvalLoss {
        loss,
        ce: parts.mean(Part::Ce),
        kl: parts.mean(Part::Kl),
        forget: parts.mean(Part::Forget),
        keep: parts.mean(Part::Keep),
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
    let (nv, e) = (tm.model.cfg.n_vocab, tm.model.cfg.n_embd);
    let hidden = on_hidden(tm, seqs)?;
    let factors = factors(seqs, balance);
    tm.lora.zero_grad();
    let (mut loss, mut tokens) = (0.0f64, 0usize);
    let mut parts = Parts::default();
    let mut count = |s: &Sequence, f: f64, l: f64| {
        loss += f * l;
        tokens += s.tokens.len();
        parts.add(s, l);
    };
    // Each sequence's loss into its rows of the output's gradient, scaled by its factor.
    let loss_rows = |s: &Sequence, f: f64, out: &[f32], d: &mut [f32]| -> Result<f64> {
        let l = s.loss(out, nv, e, d)?;
        for x in d.iter_mut() {
            *x = (*x as f64 * f) as f32;
        }
        Ok(l)
    };
    let backward = |tm: &mut TrainModel, act: &Activations, d: &[f32]| {
        if hidden {
            tm.backward_hidden(act, d)
        } else {
            tm.backward(act, d)
        }
    };
    if pack {
        let toks: Vec<&[u32]> = seqs.iter().map(|s| &s.tokens[..]).collect();
        let act = tm.forward_seqs(&toks)?;
        let (out, w) = output(tm, &act, hidden);
        let mut d = vec![0f32; out.len()]; // [n, width]
        let mut r0 = 0;
        for (s, &f) in seqs.iter().zip(&factors) {
            let rows = r0 * w..(r0 + s.tokens.len()) * w;
            let l = loss_rows(s, f, &out[rows.clone()], &mut d[rows])?;
            count(s, f, l);
            r0 += s.tokens.len();
        }
        backward(tm, &act, &d)?;
    } else {
        for (s, &f) in seqs.iter().zip(&factors) {
            let act = tm.forward(&s.tokens)?;
            let (out, _) = output(tm, &act, hidden);
            let mut d = vec![0f32; out.len()]; // [n, width]
            let l = loss_rows(s, f, out, &mut d)?;
            backward(tm, &act, &d)?;
            count(s, f, l);
        }
    }
    Ok(StepStats {
        epoch,
        loss,
        ce: parts.mean(Part::Ce),
        kl: parts.mean(Part::Kl),
        forget: parts.mean(Part::Forget),
        keep: parts.mean(Part::Keep),
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
    fn checkpoints_are_evenly_spaced_and_end_the_epoch() {
        assert_eq!(check_steps(30, 1), vec![30]);
        assert_eq!(check_steps(30, 4), vec![8, 15, 23, 30]);
        assert_eq!(check_steps(3, 5), vec![1, 2, 3]);
        assert_eq!(check_steps(1, 3), vec![1]);
        let c = |step| Checkpoint {
            epoch: (step - 1) / 30,
            step,
            steps: 90,
            per_epoch: 30,
        };
        assert_eq!(c(30).label(), "epoch 1");
        assert!(c(60).ends_epoch() && !c(45).ends_epoch());
        assert_eq!(c(45).label(), "epoch 1.50 (step 45)");
    }

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
