//! `lethe forge finetune`: supervised LoRA fine-tuning on question/answer pairs, on the CPU.
//! The loss is the cross-entropy of the answer's tokens and of the end-of-turn token, the
//! question as the user's turn of the chat template; the adapter is written in llama.cpp's
//! layout.

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lethe::forge::train::data::{answer_sequence, end_of_turn};
use lethe::forge::train::trainer::{describe, total_steps, Progress};
use lethe::forge::train::{
    train_with_epochs, AdamWConfig, Balance, Decay, Lora, TrainConfig, TrainModel, TrainReport,
};
use lethe::model::Proj;
use lethe::qa::read_examples;
use std::path::PathBuf;

/// The optimizer and schedule flags both training commands take.
#[derive(Args, Debug, Clone)]
pub struct OptimArgs {
    /// Sequences per optimizer step (their gradients are accumulated).
    #[arg(long = "batch", default_value_t = 4)]
    pub batch: usize,
    /// Seeds the adapter's initial values and the shuffles.
    #[arg(long = "seed", default_value_t = 0)]
    pub seed: u64,
    /// Decay after the warm-up: linear, cosine or constant.
    #[arg(long = "schedule", default_value = "linear")]
    pub schedule: String,
    /// Clip the gradient to this global norm (0: no clipping).
    #[arg(long = "max-grad-norm", default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Cut every sequence to its first N tokens.
    #[arg(long = "max-len")]
    pub max_len: Option<usize>,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Run a batch's sequences one after another instead of packed into one pass (the same
    /// gradient up to the order of float sums; slower; what lethe did before packing).
    #[arg(long = "no-pack")]
    pub no_pack: bool,
}

impl OptimArgs {
    pub fn config(
        &self,
        epochs: usize,
        lr: f32,
        warmup_ratio: f32,
        weight_decay: f32,
    ) -> Result<TrainConfig> {
        anyhow::ensure!(epochs >= 1, "--epochs must be at least 1");
        anyhow::ensure!(self.batch >= 1, "--batch must be at least 1");
        anyhow::ensure!(
            (0.0..=1.0).contains(&warmup_ratio),
            "--warmup-ratio must be in [0, 1]"
        );
        Ok(TrainConfig {
            epochs,
            batch: self.batch,
            seed: self.seed,
            lr,
            warmup_ratio,
            decay: Decay::parse(&self.schedule)?,
            adamw: AdamWConfig {
                weight_decay,
                max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
                ..AdamWConfig::default()
            },
            balance: Balance::Group,
            pack: !self.no_pack,
            checks: 1,
        })
    }

    pub fn threads(&self) -> usize {
        super::threads(self.threads)
    }
}

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// The base model: a GGUF path or a named model.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// Question/answer pairs: a JSON array or JSON lines of objects with question/answer or
    /// prompt/response.
    #[arg(long)]
    pub data: PathBuf,
    /// LoRA rank.
    #[arg(long = "rank", default_value_t = 16)]
    pub rank: usize,
    /// LoRA alpha (the adapter is scaled by alpha / rank).
    #[arg(long = "lora-alpha", default_value_t = 32.0)]
    pub lora_alpha: f32,
    #[arg(long = "epochs", default_value_t = 3)]
    pub epochs: usize,
    /// Peak learning rate.
    #[arg(long = "lr", default_value_t = 2e-4)]
    pub lr: f32,
    /// Fraction of the steps spent warming up the learning rate.
    #[arg(long = "warmup-ratio", default_value_t = 0.0)]
    pub warmup_ratio: f32,
    /// AdamW's decoupled weight decay.
    #[arg(long = "weight-decay", default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Matrices adapted in every block: q,k,v,o,gate,up,down.
    #[arg(long = "targets", default_value = "q,k,v,o,gate,up,down")]
    pub targets: String,
    #[command(flatten)]
    pub optim: OptimArgs,
    /// Output LoRA (GGUF, llama.cpp's adapter layout).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
}

/// `q,k,v,o,gate,up,down` (any subset).
pub fn parse_targets(s: &str) -> Result<Vec<Proj>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some(slot) = Proj::from_short(part) else {
            anyhow::bail!("--targets: {part:?} is not one of q,k,v,o,gate,up,down")
        };
        if !out.contains(&slot) {
            out.push(slot);
        }
    }
    anyhow::ensure!(!out.is_empty(), "--targets names no matrix");
    Ok(out)
}

/// Train with an indicatif bar showing the loss and tokens/s; `epoch_end(epoch, tm)` after
/// each epoch (0-based).
pub fn run_training(
    tm: &mut TrainModel,
    data: &[lethe::forge::train::Sequence],
    cfg: &TrainConfig,
    epoch_end: &mut dyn FnMut(usize, &TrainModel) -> lethe::Result<()>,
) -> Result<TrainReport> {
    let used = data.iter().filter(|s| s.counted() > 0).count();
    with_progress(
        total_steps(used, cfg),
        cfg.epochs,
        &mut |on_step, on_epoch| train_with_epochs(tm, data, cfg, on_step, on_epoch),
        epoch_end,
    )
}

/// The training function [`with_progress`] runs: it is handed the step and checkpoint
/// callbacks (a checkpoint `C`: an epoch's index, or a [`lethe::forge::train::Checkpoint`]).
pub type TrainFn<'a, C> = dyn FnMut(
        &mut dyn FnMut(&Progress),
        &mut dyn FnMut(C, &TrainModel) -> lethe::Result<()>,
    ) -> lethe::Result<TrainReport>
    + 'a;

/// Run `train` (`steps` optimizer steps over `epochs`) with an indicatif bar showing the loss,
/// its parts and tokens/s (a log line every tenth of the run without a terminal), then print
/// each epoch's mean loss and the throughput.
pub fn with_progress<C>(
    steps: usize,
    epochs: usize,
    train: &mut TrainFn<'_, C>,
    checkpoint: &mut dyn FnMut(C, &TrainModel) -> lethe::Result<()>,
) -> Result<TrainReport> {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {elapsed}<{eta} {msg}")
            .expect("a valid template"),
    );
    // Without a terminal the bar is hidden: a line every tenth of the run instead (a log).
    let log_lines = bar.is_hidden();
    let (mut loss_sum, mut loss_n, mut logged) = (0.0f64, 0usize, 0usize);
    let mut on_step = |p: &Progress| {
        let s = p.last;
        let mut parts = String::new();
        for (name, v) in [
            ("ce", s.ce),
            ("kl", s.kl),
            ("forget", s.forget),
            ("keep", s.keep),
        ] {
            if let Some(v) = v {
                parts += &format!("{}{name} {v:.3}", if parts.is_empty() { "" } else { ", " });
            }
        }
        // One part alone is the loss itself.
        let parts = if parts.contains(',') {
            format!(" ({parts})")
        } else {
            String::new()
        };
        if log_lines {
            loss_sum += s.loss;
            loss_n += 1;
            let due = p.step * 10 / p.steps.max(1);
            if due > logged || p.step == p.steps {
                logged = due;
                println!(
                    "step {}/{} epoch {} mean loss {:.4} lr {:.2e} {:.0} tok/s {:.0} s; last{parts}",
                    p.step,
                    p.steps,
                    s.epoch + 1,
                    loss_sum / loss_n as f64,
                    s.lr,
                    p.tokens_per_s(),
                    p.seconds
                );
                (loss_sum, loss_n) = (0.0, 0);
            }
        }
        bar.set_message(format!(
            "epoch {} loss {:.4} lr {:.2e} {:.0} tok/s{parts}",
            s.epoch + 1,
            s.loss,
            s.lr,
            p.tokens_per_s()
        ));
        bar.set_position(p.step as u64);
    };
    let report = train(&mut on_step, &mut |c, tm| bar.suspend(|| checkpoint(c, tm)))?;
    bar.finish();
    for e in 0..epochs {
        if let Some(l) = report.epoch_loss(e) {
            println!("epoch {}: mean loss {l:.4}", e + 1);
        }
    }
    println!(
        "{} steps, {} tokens in {:.1} s: {:.1} tokens/s (forward and backward)",
        report.steps.len(),
        report.tokens,
        report.seconds,
        report.tokens_per_s()
    );
    Ok(report)
}

pub fn main(a: FinetuneArgs) -> Result<()> {
    let slots = parse_targets(&a.targets)?;
    let cfg = a
        .optim
        .config(a.epochs, a.lr, a.warmup_ratio, a.weight_decay)?;
    let (_, model, tok) = super::open_model(&a.model, a.optim.threads())?;
    lethe::forge::train::trainable(&model)?;
    let arch = model.cfg.arch.name();
    let end = end_of_turn(&tok, arch)?;
    let examples = read_examples(&a.data)?;
    let data = examples
        .iter()
        .map(|ex| answer_sequence(&tok, arch, ex, end, a.optim.max_len, 1.0))
        .collect::<lethe::Result<Vec<_>>>()
        .with_context(|| format!("reading {}", a.data.display()))?;
    let counted: usize = data.iter().map(|s| s.counted()).sum();
    let lora = Lora::new(
        &model,
        0..model.cfg.n_layer,
        &slots,
        a.rank,
        a.lora_alpha,
        a.optim.seed,
    )?;
    println!(
        "{} examples, {} answer tokens (the end of turn {:?} included); LoRA {}",
        data.len(),
        counted,
        tok.decode(&[end], true),
        describe(&lora)
    );
    let mut tm = TrainModel::new(&model, lora)?;
    run_training(&mut tm, &data, &cfg, &mut |_, _| Ok(()))?;
    let name = format!("LoRA fine-tuned on {}", a.data.display());
    tm.lora
        .write(&a.output, &model, &name)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    println!("wrote {} ({:.2} MB)", a.output.display(), size as f64 / 1e6);
    Ok(())
}
