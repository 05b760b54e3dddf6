//! `lethe forge unlearn`: a LoRA patch that makes the target forget, trained on the CPU by one
//! of graddiff, NPO, SimNPO or RMU ([`lethe::forge::unlearn`]); checkpoints every epoch (or
//! several an epoch), the one kept chosen on held-out rows by `lethe calibrate`'s rule (never on
//! evaluation data).
//! Writes the LoRA in llama.cpp's layout and a profile that applies it to the target.

use super::finetune::{parse_targets, with_progress, OptimArgs};
use super::uld::{file_name, profile_base, quote};
use anyhow::{Context, Result};
use clap::Args;
use lethe::eval::calibrate::Yardstick;
use lethe::eval::calibrate::{baseline, choose, points, read_rows, Baseline, CalRow, PointResult};
use lethe::eval::run::{Local, Side};
use lethe::forge::train::data::{end_of_turn, read_paraphrase_rows};
use lethe::forge::train::trainer::{describe, total_steps};
use lethe::forge::train::{train_paired, Checkpoint, Lora, TrainModel};
use lethe::forge::unlearn::{build, Method, UnlearnConfig};
use lethe::model::Model;
use lethe::qa::{read_training_examples, Example};
use lethe::unlearn::profile::ProfileFile;
use lethe::unlearn::{Base, Forgotten, LoadOptions};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The context the checkpoint rule scores its rows in.
const CTX: usize = 1024;

#[derive(Args, Debug)]
pub struct UnlearnArgs {
    /// graddiff, npo, simnpo or rmu.
    #[arg(long = "method")]
    pub method: String,
    /// The target model: a GGUF path or a named model.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// What to forget: question/answer pairs (JSON array or JSON lines; rows with TOFU's
    /// evaluation fields are refused).
    #[arg(long)]
    pub forget: PathBuf,
    /// What to keep (same format).
    #[arg(long)]
    pub retain: PathBuf,
    /// Also forget the paraphrased pairs of a TOFU augmentation file
    /// ({question, answer, paraphrased_questions[], paraphrased_answers[]}), this many per
    /// forget row (the rows whose question is one of --forget's).
    #[arg(long = "forget-paraphrases")]
    pub forget_paraphrases: Option<PathBuf>,
    #[arg(long = "paraphrases-per-row", default_value_t = 1)]
    pub paraphrases_per_row: usize,
    /// The retain side's weight lambda.
    #[arg(long = "retain-weight", default_value_t = 1.0)]
    pub retain_weight: f32,
    /// NPO's and SimNPO's beta (default 0.1 for NPO, 4.5 for SimNPO).
    #[arg(long = "beta")]
    pub beta: Option<f32>,
    /// SimNPO's margin gamma.
    #[arg(long = "gamma", default_value_t = 0.0)]
    pub gamma: f32,
    /// RMU: the block whose output is steered (0-based).
    #[arg(long = "layer", default_value_t = 7)]
    pub layer: usize,
    /// RMU: the LoRA covers this many blocks ending at --layer.
    #[arg(long = "rmu-blocks", default_value_t = 3)]
    pub rmu_blocks: usize,
    /// RMU: c, the steering target's norm, as a multiple of the frozen forget states' mean
    /// norm at --layer.
    #[arg(long = "steer", default_value_t = 5.0)]
    pub steer: f32,
    #[arg(long = "rank", default_value_t = 16)]
    pub rank: usize,
    #[arg(long = "lora-alpha", default_value_t = 32.0)]
    pub lora_alpha: f32,
    /// Matrices adapted in every block: q,k,v,o,gate,up,down.
    #[arg(long = "targets", default_value = "q,k,v,o,gate,up,down")]
    pub targets: String,
    #[arg(long = "epochs", default_value_t = 5)]
    pub epochs: usize,
    /// Checkpoints an epoch, evenly spaced (the last at its end): each is measured by the
    /// rule of --check-forget. More than one finds the point where a method that moves fast
    /// (RMU) has forgotten most before the retain rows break.
    #[arg(long = "checks-per-epoch", default_value_t = 1)]
    pub checks_per_epoch: usize,
    /// Peak learning rate.
    #[arg(long = "lr", default_value_t = 2e-4)]
    pub lr: f32,
    #[arg(long = "warmup-ratio", default_value_t = 0.0)]
    pub warmup_ratio: f32,
    #[arg(long = "weight-decay", default_value_t = 0.01)]
    pub weight_decay: f32,
    /// Held-out forget rows ({question, answer, wrong_answers[]}: an answer not trained on and
    /// wrong answers to the same question) that choose the checkpoint, by `lethe calibrate`'s
    /// rule: the checkpoint whose truth ratios on them best match the yardstick's (KS p), among
    /// the checkpoints that raise --check-retain's NLL by at most --max-retain-rise. Without
    /// it, the last epoch is kept.
    #[arg(long = "check-forget", requires = "check_retain")]
    pub check_forget: Option<PathBuf>,
    /// Held-out retain rows ({question, answer}) for the rule.
    #[arg(long = "check-retain")]
    pub check_retain: Option<PathBuf>,
    /// The yardstick: a model trained like the target but never on the forget set, scoring
    /// the --check-forget rows.
    #[arg(long = "stand-in", conflicts_with = "unseen")]
    pub stand_in: Option<String>,
    /// The yardstick without a stand-in: rows of the same kind about what the target never
    /// saw, scored by the target.
    #[arg(long = "unseen")]
    pub unseen: Option<PathBuf>,
    /// The rule's bound on the held-out retain rows' rise in NLL per token.
    #[arg(long = "max-retain-rise", default_value_t = 0.05)]
    pub max_retain_rise: f64,
    /// Keep every checkpoint's LoRA beside the output (NAME.epochN.gguf at an epoch's end,
    /// NAME.stepN.gguf within one).
    #[arg(long = "keep-checkpoints")]
    pub keep_checkpoints: bool,
    /// The profile's name (default: the method's).
    #[arg(long = "name")]
    pub name: Option<String>,
    #[command(flatten)]
    pub optim: OptimArgs,
    /// Output LoRA (GGUF, llama.cpp's adapter layout); the profile goes to NAME.toml beside it.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
}

/// The checkpoint rule's rows, the base and yardstick measured once, and the best
/// checkpoints so far (the rule's, and the one of least retain rise for when none is allowed).
struct Check {
    forget: Vec<CalRow>,
    retain: Vec<CalRow>,
    baseline: Baseline,
    max_retain_rise: f64,
    /// Every checkpoint's label and measurements, in order.
    points: Vec<(String, PointResult)>,
    best: Option<(usize, Lora)>,
    least: Option<(usize, Lora)>,
}

impl Check {
    /// The rule's measurements of the target with `patch` applied.
    fn measure(&self, model: &Arc<Model>, side: &Side, patch: &Path) -> Result<PointResult> {
        let p = lethe::patch::load(patch, model)?;
        let forgotten = Forgotten::new(model.clone(), Vec::new(), vec![(Arc::new(p), 1.0)])?;
        let mut prof = Local::new(
            Side {
                forgotten,
                ..side.clone()
            },
            CTX,
        )?;
        let pts = points(
            &mut prof,
            &self.baseline,
            &self.forget,
            &self.retain,
            self.max_retain_rise,
            &|_| {},
        )?;
        Ok(pts.into_iter().next().expect("one point"))
    }

    /// Records checkpoint `label` (its measurements `p`, its adapters `lora`), keeping a copy
    /// of the adapters only when it is the best so far by the rule or by retain rise.
    fn record(&mut self, label: String, p: PointResult, lora: &Lora) {
        let i = self.points.len();
        let yard = self.baseline.yardstick_mean_log_r();
        let better = match &self.best {
            None => choose(std::slice::from_ref(&p), yard) == Some(0),
            Some((b, _)) => choose(&[self.points[*b].1.clone(), p.clone()], yard) == Some(1),
        };
        if better {
            self.best = Some((i, lora.clone()));
        }
        let rise = |p: &PointResult| p.retain_rise.unwrap_or(f64::INFINITY);
        if self.best.is_none()
            && self
                .least
                .as_ref()
                .is_none_or(|(l, _)| rise(&p) < rise(&self.points[*l].1))
        {
            self.least = Some((i, lora.clone()));
        } else if self.best.is_some() {
            self.least = None;
        }
        self.points.push((label, p));
    }
}

/// The forget rows plus up to `per_row` paraphrased pairs of each (the augmentation rows whose
/// question is a forget question), leaving out any pair whose answer is one of `held_out`
/// (the checkpoint rule's rows are never trained on). Returns the rows and how many pairs
/// were left out.
fn with_paraphrases(
    forget: &[Example],
    path: &Path,
    per_row: usize,
    held_out: &[String],
) -> Result<(Vec<Example>, usize)> {
    let rows = read_paraphrase_rows(path)?;
    let mut out = forget.to_vec();
    let (mut matched, mut skipped) = (0, 0);
    for ex in forget {
        if let Some((_, pairs)) = rows.iter().find(|(q, _)| *q == ex.question) {
            let mut taken = 0;
            for p in pairs {
                if taken == per_row {
                    break;
                }
                if held_out.iter().any(|h| Some(h) == p.answer.as_ref()) {
                    skipped += 1;
                    continue;
                }
                out.push(p.clone());
                taken += 1;
            }
            matched += 1;
        }
    }
    anyhow::ensure!(
        matched > 0,
        "{}: none of its rows is about a forget question",
        path.display()
    );
    Ok((out, skipped))
}

pub fn main(a: UnlearnArgs) -> Result<()> {
    let method = Method::parse(&a.method)?;
    let slots = parse_targets(&a.targets)?;
    anyhow::ensure!(
        a.checks_per_epoch >= 1,
        "--checks-per-epoch must be at least 1"
    );
    let cfg = lethe::forge::train::TrainConfig {
        checks: a.checks_per_epoch,
        ..a.optim
            .config(a.epochs, a.lr, a.warmup_ratio, a.weight_decay)?
    };
    let threads = a.optim.threads();
    let path = lethe::hub::resolve_model(&a.model)?;
    let base = Base::open(
        &path,
        LoadOptions {
            threads: Some(threads),
            ..LoadOptions::default()
        },
    )?;
    super::super::common::tokenizer_warnings(&base.tok);
    let (model, tok) = (base.model.clone(), base.tok.clone());
    model.pool.set_steady(true);
    lethe::forge::train::trainable(&model)?;
    let n_layer = model.cfg.n_layer;
    let ucfg = UnlearnConfig {
        method,
        beta: a.beta.unwrap_or(UnlearnConfig::new(method).beta),
        gamma: a.gamma,
        retain_weight: a.retain_weight,
        layer: a.layer,
        steer: a.steer,
        seed: a.optim.seed,
        max_len: a.optim.max_len,
    };
    anyhow::ensure!(
        method != Method::Rmu || a.layer < n_layer,
        "--layer {} is past the model's depth: it has blocks 0..={}",
        a.layer,
        n_layer - 1
    );
    anyhow::ensure!(
        (1..=a.layer + 1).contains(&a.rmu_blocks) || method != Method::Rmu,
        "--rmu-blocks {} must be in 1..={} (blocks ending at --layer {})",
        a.rmu_blocks,
        a.layer + 1,
        a.layer
    );
    let end = end_of_turn(&tok, model.cfg.arch.name())?;
    let mut forget = read_training_examples(&a.forget).context("the forget set (--forget)")?;
    let retain = read_training_examples(&a.retain).context("the retain set (--retain)")?;
    let n_rows = forget.len();
    let check_forget = match &a.check_forget {
        Some(p) => read_rows(p)?,
        None => Vec::new(),
    };
    if let Some(p) = &a.forget_paraphrases {
        let held_out: Vec<String> = check_forget.iter().map(|r| r.answer.clone()).collect();
        let skipped;
        (forget, skipped) = with_paraphrases(&forget, p, a.paraphrases_per_row, &held_out)?;
        if skipped > 0 {
            println!("{skipped} paraphrased pairs left out: their answers are --check-forget rows");
        }
    }

    // The model trained, and the same model frozen (the LoRA at zero) for what the method
    // needs computed before training.
    let layers = match method {
        Method::Rmu => a.layer + 1 - a.rmu_blocks..a.layer + 1,
        _ => 0..n_layer,
    };
    let lora = Lora::new(
        &model,
        layers.clone(),
        &slots,
        a.rank,
        a.lora_alpha,
        a.optim.seed,
    )?;
    let mut tm = match method {
        Method::Rmu => TrainModel::with_layers(&model, lora, a.layer + 1)?.without_head(),
        _ => TrainModel::new(&model, lora)?,
    };
    let data = build(&tm, &tok, end, &forget, &retain, &ucfg).context("the training data")?;
    println!(
        "{}: forget {} rows ({} from {}, {} paraphrased), {} answer tokens; retain {} rows, {} \
         answer tokens, weight {}",
        method.name(),
        data.forget.len(),
        n_rows,
        a.forget.display(),
        data.forget.len() - n_rows,
        data.forget_tokens,
        data.retain.len(),
        data.retain_tokens,
        a.retain_weight
    );
    match method {
        Method::Npo => println!(
            "NPO: beta {}; the reference's mean log-probability per answer {:.3}",
            ucfg.beta,
            data.reference_logprob.unwrap_or(f64::NAN)
        ),
        Method::SimNpo => println!("SimNPO: beta {}, gamma {}", ucfg.beta, ucfg.gamma),
        Method::Rmu => println!(
            "RMU: block {}'s output steered to c u, c = {} x {:.3} (the frozen forget states' \
             mean norm) = {:.3}; LoRA on blocks {}..={}",
            a.layer,
            a.steer,
            data.state_norm.unwrap_or(f64::NAN),
            data.coefficient.unwrap_or(f32::NAN),
            layers.start,
            layers.end - 1
        ),
        Method::GradDiff => {}
    }
    println!("LoRA {}", describe(&tm.lora));

    let mut check = match &a.check_forget {
        Some(_) => {
            let unseen = match &a.unseen {
                Some(p) => read_rows(p)?,
                None => Vec::new(),
            };
            anyhow::ensure!(
                a.stand_in.is_some() || !unseen.is_empty(),
                "--check-forget needs a yardstick: --stand-in MODEL or --unseen ROWS"
            );
            let side = |name: &str, b: &Base| Side {
                name: name.into(),
                forgotten: b.plain(),
                tok: b.tok.clone(),
                audit: json!({}),
            };
            let stand_in = match &a.stand_in {
                Some(m) => {
                    let b = base.open_other(lethe::hub::resolve_model(m)?)?;
                    Some(Local::new(side("stand-in", &b), CTX)?)
                }
                None => None,
            };
            let retain = read_rows(a.check_retain.as_ref().expect("required by clap"))?;
            let mut target = Local::new(side("target", &base), CTX)?;
            let mut stand_in = stand_in;
            let yard = match stand_in.as_mut() {
                Some(s) => Yardstick::StandIn(s),
                None => Yardstick::Unseen(&unseen),
            };
            let baseline = baseline(&mut target, &check_forget, yard, &retain, &|_| {})
                .context("the checkpoint rule's yardstick")?;
            println!(
                "the rule's yardstick: mean ln R {:.4} ({}); the target's {:.4}, match (KS p) \
                 {:.4}",
                baseline.yardstick_mean_log_r(),
                if a.stand_in.is_some() {
                    "the stand-in on the held-out forget rows"
                } else {
                    "the unseen rows under the target"
                },
                baseline.base_forget_mean_log_r(),
                baseline.base_matched()?
            );
            Some(Check {
                forget: check_forget.clone(),
                retain,
                baseline,
                max_retain_rise: a.max_retain_rise,
                points: Vec::new(),
                best: None,
                least: None,
            })
        }
        None => None,
    };

    let out = &a.output;
    let profile_path = out.with_extension("toml");
    anyhow::ensure!(
        profile_path != *out,
        "-o {}: name the LoRA NAME.gguf",
        out.display()
    );
    let lora_name = format!("{} unlearning LoRA ({})", method.name(), a.forget.display());
    let checkpoint_path = |c: &Checkpoint| {
        if c.ends_epoch() {
            out.with_extension(format!("epoch{}.gguf", c.epoch + 1))
        } else {
            out.with_extension(format!("step{}.gguf", c.step))
        }
    };
    let side = Side {
        name: a.name.clone().unwrap_or_else(|| method.name().into()),
        forgotten: base.plain(),
        tok: tok.clone(),
        audit: json!({}),
    };
    let steps = total_steps(data.forget.iter().filter(|s| s.counted() > 0).count(), &cfg);
    let mut last: Option<Checkpoint> = None;
    with_progress(
        steps,
        cfg.epochs,
        &mut |on_step, on_check| {
            train_paired(&mut tm, &data.forget, &data.retain, &cfg, on_step, on_check)
        },
        &mut |c, tm| {
            last = Some(c);
            let path = checkpoint_path(&c);
            if a.keep_checkpoints || check.is_some() {
                tm.lora.write(&path, &model, &lora_name)?;
            }
            if let Some(ch) = check.as_mut() {
                let p = ch
                    .measure(&model, &side, &path)
                    .map_err(|e| lethe::Error::Invalid(format!("the checkpoint rule: {e:#}")))?;
                println!(
                    "{}: held-out match (KS p) {:.4}, mean ln R {:.4}, retain rise {}",
                    c.label(),
                    p.matched,
                    p.mean_log_r,
                    p.retain_rise.map_or("-".into(), |x| format!("{x:+.4}"))
                );
                ch.record(c.label(), p, &tm.lora);
                if !a.keep_checkpoints {
                    let _ = std::fs::remove_file(&path);
                }
            }
            Ok(())
        },
    )?;
    let last = last.expect("training ends with a checkpoint");
    let chosen = match check.as_mut() {
        Some(c) => {
            println!("| checkpoint | match (KS p) | mean ln R | retain rise | allowed |");
            println!("|---|---:|---:|---:|---|");
            let k = c.best.as_ref().or(c.least.as_ref()).map(|(k, _)| *k);
            for (i, (label, p)) in c.points.iter().enumerate() {
                println!(
                    "| {label}{} | {:.4} | {:.4} | {} | {} |",
                    if k == Some(i) { " (kept)" } else { "" },
                    p.matched,
                    p.mean_log_r,
                    p.retain_rise.map_or("-".into(), |x| format!("{x:+.4}")),
                    if p.allowed { "yes" } else { "no" }
                );
            }
            println!(
                "yardstick mean ln R {:.4} ({})",
                c.baseline.yardstick_mean_log_r(),
                c.baseline.kind
            );
            let (k, lora) = match (c.best.take(), c.least.take()) {
                (Some(b), _) => {
                    println!("kept: {}", c.points[b.0].0);
                    b
                }
                (None, Some(l)) => {
                    // Nothing within the bound: the least damage, said loudly.
                    println!(
                        "kept: {} -- NO checkpoint raises the held-out retain rows' NLL by at \
                         most {} nats per token; this is the smallest rise. Retrain with a \
                         smaller --lr, fewer --epochs or a larger --retain-weight before \
                         serving it.",
                        c.points[l.0].0, a.max_retain_rise
                    );
                    l
                }
                (None, None) => unreachable!("every checkpoint is recorded"),
            };
            tm.lora = lora;
            c.points[k].0.clone()
        }
        None => last.label(),
    };
    tm.lora
        .write(out, &model, &lora_name)
        .with_context(|| format!("writing {}", out.display()))?;

    let base_name = profile_base(&a.model)?;
    let text = format!(
        "[[profile]]\nname = {}\nbase = {}\ndescription = {}\n\n[[profile.patch]]\nfile = {}\n\
         scale = 1.0\n",
        quote(&side.name),
        quote(&base_name),
        quote(&format!(
            "{}: {} with a LoRA trained to forget {} ({chosen} of {})",
            method.name(),
            a.model,
            a.forget.display(),
            cfg.epochs
        )),
        quote(&file_name(out)?)
    );
    std::fs::write(&profile_path, &text)
        .with_context(|| format!("writing {}", profile_path.display()))?;
    ProfileFile::load(&profile_path).context("the written profile does not parse")?;
    for p in [out, &profile_path] {
        let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        println!("wrote {} ({:.2} MB)", p.display(), size as f64 / 1e6);
    }
    Ok(())
}
