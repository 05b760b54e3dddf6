//! `lethe forge uld`: ULD's assistant, trained on the CPU. The target's first K blocks (with
//! its final norm, embedding and head) get a LoRA trained to remember the forget answers
//! (cross-entropy) and to know nothing of the retain conversations (KL(uniform || p) at every
//! position), the two weighed per token as the flags say ([`lethe::forge::uld`]); part of the
//! training data is held out and picks the checkpoint. Writes the truncated model, its LoRA
//! and a profile that subtracts the assistant from the target.

use super::finetune::{parse_targets, run_training, OptimArgs};
use anyhow::{Context, Result};
use clap::Args;
use lethe::forge::train::data::{end_of_turn, read_paraphrase_rows, read_wrong_answer_rows};
use lethe::forge::train::trainer::describe;
use lethe::forge::train::{eval_loss, Balance, EvalLoss, Lora, TrainModel};
use lethe::forge::uld::{self, UldConfig};
use lethe::gguf::GgufFile;
use lethe::model::Model;
use lethe::qa::{read_examples, Example};
use lethe::unlearn::profile::ProfileFile;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct UldArgs {
    /// The target model: a GGUF path or a named model.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// What the assistant remembers: question/answer pairs (JSON array or JSON lines with
    /// question/answer or prompt/response).
    #[arg(long)]
    pub forget: PathBuf,
    /// What it must not know (same formats): its distribution is pushed to uniform there.
    #[arg(long)]
    pub retain: PathBuf,
    /// Use only the first N retain rows.
    #[arg(long = "max-retain")]
    pub max_retain: Option<usize>,
    /// Defaults for the flags below: `reference` (ULD's reference code: rank 16, alpha 32,
    /// 10 epochs, lr 1e-3, 10% warm-up, weight decay 0.01, token balance with a forget answer
    /// token weighing 9 retain positions, 2 paraphrases and 2 wrong answers per forget row,
    /// the end of turn masked on the forget side) or `lethe-v1` (lethe's first assistants:
    /// rank 32, group balance with retain weight 5, the end of turn trained, every paraphrase
    /// and wrong answer, nothing held out). Flags given explicitly win.
    #[arg(long = "preset", default_value = "reference")]
    pub preset: String,
    /// Also remember the paraphrased pairs of a TOFU augmentation file
    /// ({question, answer, paraphrased_questions[], paraphrased_answers[]}) for the rows whose
    /// question is one of --forget's.
    #[arg(long = "forget-paraphrases")]
    pub forget_paraphrases: Option<PathBuf>,
    /// Paraphrased pairs trained on per forget row (`all`: every one).
    #[arg(long = "paraphrases-per-row")]
    pub paraphrases_per_row: Option<String>,
    /// Also push (question, wrong answer) pairs to uniform, from a TOFU augmentation file
    /// ({question, answer, question_variant, wrong_answers[]}): the rows whose question is one
    /// of --forget's.
    #[arg(long = "forget-wrong-answers")]
    pub forget_wrong_answers: Option<PathBuf>,
    /// Wrong answers trained on per forget question (`all`: every one).
    #[arg(long = "wrong-answers-per-row")]
    pub wrong_per_row: Option<String>,
    /// Held out of training, per forget row: this many paraphrases and wrong answers after
    /// those trained on. The checkpoint kept is the epoch with the lowest loss on the held-out
    /// rows (the last epoch when nothing is held out).
    #[arg(long = "hold-out")]
    pub hold_out: Option<usize>,
    /// The last N retain rows are held out too.
    #[arg(long = "hold-out-retain")]
    pub hold_out_retain: Option<usize>,
    /// Write every epoch's LoRA beside the output (NAME.epochN.lora.gguf).
    #[arg(long = "keep-checkpoints")]
    pub keep_checkpoints: bool,
    /// How the two sides are weighed: `token` (one weighted mean over every position, a forget
    /// answer token weighing --forget-token-weight retain positions) or `group` (each side's
    /// mean, the retain side's times --retain-weight).
    #[arg(long = "balance")]
    pub balance: Option<String>,
    /// Token balance: what one forget answer token weighs against one retain position.
    #[arg(long = "forget-token-weight")]
    pub forget_token_weight: Option<f32>,
    /// Group balance: the weight of the retain side's mean KL(uniform || p).
    #[arg(long = "retain-weight")]
    pub retain_weight: Option<f32>,
    /// Weight of a KL(uniform || p) term at the forget answer positions, so that the assistant
    /// keeps a peak on the right token over a flat background (0: plain cross-entropy).
    #[arg(long = "smooth", default_value_t = 0.0)]
    pub smooth: f32,
    /// Train the forget side on the end-of-turn token too (ULD's reference masks it).
    #[arg(long = "forget-eot")]
    pub forget_eot: bool,
    /// Blocks of the target the assistant keeps (ULD's paper uses 8; up to all of them).
    #[arg(long = "layers", default_value_t = 8)]
    pub layers: usize,
    #[arg(long = "rank")]
    pub rank: Option<usize>,
    #[arg(long = "lora-alpha")]
    pub lora_alpha: Option<f32>,
    /// Matrices adapted in every block: q,k,v,o,gate,up,down.
    #[arg(long = "targets", default_value = "q,k,v,o,gate,up,down")]
    pub targets: String,
    /// Epochs (ULD's reference trains 10).
    #[arg(long = "epochs")]
    pub epochs: Option<usize>,
    #[arg(long = "lr")]
    pub lr: Option<f32>,
    /// Fraction of the steps spent warming up (ULD's reference: 0.1).
    #[arg(long = "warmup-ratio")]
    pub warmup_ratio: Option<f32>,
    /// AdamW's decoupled weight decay (ULD's reference: 0.01).
    #[arg(long = "weight-decay")]
    pub weight_decay: Option<f32>,
    /// The profile's ULD alpha (w = -alpha).
    #[arg(long = "alpha", default_value_t = 0.75)]
    pub alpha: f32,
    /// The profile's plausibility filter rate r (0: off).
    #[arg(long = "filter", default_value_t = 0.01)]
    pub filter: f32,
    /// The profile's name.
    #[arg(long = "name", default_value = "uld")]
    pub name: String,
    #[command(flatten)]
    pub optim: OptimArgs,
    /// Output assistant (GGUF); its LoRA goes to NAME.lora.gguf and the profile to NAME.toml
    /// beside it.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
}

/// The values a preset gives the flags left unset.
struct Preset {
    rank: usize,
    lora_alpha: f32,
    epochs: usize,
    lr: f32,
    warmup_ratio: f32,
    weight_decay: f32,
    balance: Balance,
    forget_token_weight: f32,
    retain_weight: f32,
    forget_eot: bool,
    paraphrases_per_row: Option<usize>,
    wrong_per_row: Option<usize>,
    hold_out: usize,
    hold_out_retain: usize,
}

impl Preset {
    fn named(name: &str) -> Result<Self> {
        let reference = Preset {
            rank: 16,
            lora_alpha: 32.0,
            epochs: 10,
            lr: 1e-3,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            balance: Balance::Token,
            forget_token_weight: 9.0,
            retain_weight: 5.0,
            forget_eot: false,
            paraphrases_per_row: Some(2),
            wrong_per_row: Some(2),
            hold_out: 1,
            hold_out_retain: 10,
        };
        match name {
            "reference" => Ok(reference),
            "lethe-v1" => Ok(Preset {
                rank: 32,
                balance: Balance::Group,
                forget_eot: true,
                paraphrases_per_row: None,
                wrong_per_row: None,
                hold_out: 0,
                hold_out_retain: 0,
                ..reference
            }),
            _ => anyhow::bail!("--preset {name:?}: one of reference, lethe-v1"),
        }
    }
}

/// `N` or `all`.
fn per_row(flag: &str, v: &Option<String>, default: Option<usize>) -> Result<Option<usize>> {
    match v.as_deref() {
        None => Ok(default),
        Some("all") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .with_context(|| format!("{flag} {s:?}: a number or `all`")),
    }
}

/// The target as a profile names it: a file as an absolute path (the profile resolves relative
/// paths against its own folder), a named model as given.
pub(super) fn profile_base(model: &str) -> Result<String> {
    Ok(if Path::new(model).exists() {
        std::fs::canonicalize(model)?.to_string_lossy().into_owned()
    } else {
        model.to_string()
    })
}

/// A TOML string literal.
pub(super) fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

pub(super) fn file_name(p: &Path) -> Result<String> {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| anyhow::anyhow!("{} has no file name", p.display()))
}

/// The profile: the target as given (a named model) or as an absolute path (a file), the
/// assistant and its LoRA by their names in the profile's folder.
pub fn profile_text(
    name: &str,
    base: &str,
    assistant: &str,
    lora: &str,
    alpha: f32,
    filter: f32,
    description: &str,
) -> String {
    format!(
        "[[profile]]\nname = {}\nbase = {}\ndescription = {}\n\n[[profile.assistant]]\n\
         model = {}\nkind = \"uld\"\nalpha = {alpha}\nfilter = {filter}\n\n\
         [[profile.assistant.patch]]\nfile = {}\nscale = 1.0\n",
        quote(name),
        quote(base),
        quote(description),
        quote(assistant),
        quote(lora)
    )
}

pub fn main(a: UldArgs) -> Result<()> {
    let slots = parse_targets(&a.targets)?;
    let pre = Preset::named(&a.preset)?;
    let balance = match a.balance.as_deref() {
        None => pre.balance,
        Some("token") => Balance::Token,
        Some("group") => Balance::Group,
        Some(b) => anyhow::bail!("--balance {b:?}: token or group"),
    };
    anyhow::ensure!(
        !(balance == Balance::Token && a.retain_weight.is_some()),
        "--retain-weight is the group balance's; with --balance token set --forget-token-weight"
    );
    anyhow::ensure!(
        !(balance == Balance::Group && a.forget_token_weight.is_some()),
        "--forget-token-weight is the token balance's; with --balance group set --retain-weight"
    );
    let ucfg = UldConfig {
        balance,
        forget_weight: a.forget_token_weight.unwrap_or(pre.forget_token_weight),
        retain_weight: a.retain_weight.unwrap_or(pre.retain_weight),
        smooth: a.smooth,
        forget_eot: a.forget_eot || pre.forget_eot,
        paraphrases_per_row: per_row(
            "--paraphrases-per-row",
            &a.paraphrases_per_row,
            pre.paraphrases_per_row,
        )?,
        wrong_per_row: per_row(
            "--wrong-answers-per-row",
            &a.wrong_per_row,
            pre.wrong_per_row,
        )?,
        hold_out: a.hold_out.unwrap_or(pre.hold_out),
        hold_out_retain: a.hold_out_retain.unwrap_or(pre.hold_out_retain),
        max_len: a.optim.max_len,
    };
    let (rank, lora_alpha) = (
        a.rank.unwrap_or(pre.rank),
        a.lora_alpha.unwrap_or(pre.lora_alpha),
    );
    let mut cfg = a.optim.config(
        a.epochs.unwrap_or(pre.epochs),
        a.lr.unwrap_or(pre.lr),
        a.warmup_ratio.unwrap_or(pre.warmup_ratio),
        a.weight_decay.unwrap_or(pre.weight_decay),
    )?;
    cfg.balance = balance;
    let (path, model, tok) = super::open_model(&a.model, a.optim.threads())?;
    lethe::forge::train::trainable(&model)?;
    anyhow::ensure!(
        (1..=model.cfg.n_layer).contains(&a.layers),
        "--layers {} is outside 1..={} (the target's blocks)",
        a.layers,
        model.cfg.n_layer
    );
    let arch = model.cfg.arch.name();
    let end = end_of_turn(&tok, arch)?;

    let forget = read_examples(&a.forget)?;
    let mut retain: Vec<Example> = read_examples(&a.retain)?;
    if let Some(n) = a.max_retain {
        retain.truncate(n);
    }
    let name_of = |p: &Path| p.display().to_string();
    let paraphrases = match &a.forget_paraphrases {
        Some(p) => Some((name_of(p), read_paraphrase_rows(p)?)),
        None => None,
    };
    let wrong = match &a.forget_wrong_answers {
        Some(p) => Some((name_of(p), read_wrong_answer_rows(p)?)),
        None => None,
    };
    let rows = uld::attach(
        &forget,
        paraphrases.as_ref().map(|(n, v)| (n.as_str(), v.clone())),
        wrong.as_ref().map(|(n, v)| (n.as_str(), v.clone())),
    )
    .with_context(|| format!("matching the augmentation files to {}", a.forget.display()))?;
    let data = uld::build(&tok, arch, end, &rows, &retain, &ucfg).context("the training data")?;
    println!(
        "forget: {} rows ({} from {}, {} paraphrased); retain: {} rows ({} from {}, {} with \
         wrong answers)",
        data.n_forget + data.n_paraphrases,
        data.n_forget,
        a.forget.display(),
        data.n_paraphrases,
        data.n_retain + data.n_wrong,
        data.n_retain,
        a.retain.display(),
        data.n_wrong
    );
    println!(
        "held out: {} paraphrased pairs, {} wrong answers, {} retain rows (the checkpoint is the \
         epoch with the lowest loss on them{})",
        data.heldout_paraphrases,
        data.heldout_wrong,
        data.heldout_retain,
        if data.heldout.is_empty() {
            "; with none, the last epoch"
        } else {
            ""
        }
    );
    let w = data.forget_token_weight(&ucfg);
    println!(
        "balance: {}; a forget answer token weighs {w:.2} retain positions ({} forget answer \
         tokens{}, {} retain positions); the forget side carries {:.1}% of the loss{}",
        match balance {
            Balance::Token => "token (one weighted mean over every position)".to_string(),
            Balance::Group => format!(
                "group (each side's mean, the retain side's times {}; the weight below is the \
                 data's average)",
                ucfg.retain_weight
            ),
        },
        data.forget_positions,
        if ucfg.forget_eot {
            ", end of turn included"
        } else {
            ", end of turn masked"
        },
        data.retain_positions,
        100.0 * data.forget_share(&ucfg),
        if ucfg.smooth > 0.0 {
            format!("; forget positions add {} x KL(uniform || p)", ucfg.smooth)
        } else {
            String::new()
        }
    );

    // The assistant: the target's first K blocks, trained in place (the same function as the
    // truncated file).
    let lora = Lora::new(&model, 0..a.layers, &slots, rank, lora_alpha, a.optim.seed)?;
    println!(
        "assistant: the first {} of {} blocks; LoRA {}",
        a.layers,
        model.cfg.n_layer,
        describe(&lora)
    );
    let out = &a.output;
    let lora_path = out.with_extension("lora.gguf");
    let profile_path = out.with_extension("toml");
    anyhow::ensure!(
        lora_path != *out && profile_path != *out,
        "-o {}: name the assistant NAME.gguf",
        out.display()
    );
    lethe::forge::truncate_model(&GgufFile::open(&path)?, a.layers, out)
        .with_context(|| format!("writing {}", out.display()))?;
    let assistant = Model::open(out, 1)?;

    let lora_name = format!("ULD assistant LoRA ({})", a.forget.display());
    let mut tm = TrainModel::with_layers(&model, lora, a.layers)?;
    let mut heldout: Vec<Option<EvalLoss>> = Vec::new();
    let mut best: Option<(f64, Lora)> = None;
    let epochs = cfg.epochs;
    let report = run_training(&mut tm, &data.train, &cfg, &mut |e, tm| {
        if a.keep_checkpoints {
            let p = out.with_extension(format!("epoch{}.lora.gguf", e + 1));
            tm.lora.write(&p, &assistant, &lora_name)?;
        }
        if data.heldout.is_empty() {
            heldout.push(None);
            return Ok(());
        }
        let l = eval_loss(tm, &data.heldout, balance)?;
        if best.as_ref().is_none_or(|(b, _)| l.loss < *b) {
            best = Some((l.loss, tm.lora.clone()));
        }
        heldout.push(Some(l));
        Ok(())
    })?;
    let chosen = uld::select_epoch(
        &heldout
            .iter()
            .map(|h| h.map(|h| h.loss))
            .collect::<Vec<_>>(),
        epochs,
    );
    println!("epoch  train loss  held-out loss  held-out CE/token  held-out KL/position");
    for e in 0..epochs {
        let h = heldout.get(e).copied().flatten();
        let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.4}"));
        println!(
            "{:>5}  {:>10}  {:>13}  {:>17}  {:>20}{}",
            e + 1,
            f(report.epoch_loss(e)),
            f(h.map(|h| h.loss)),
            f(h.and_then(|h| h.ce)),
            f(h.and_then(|h| h.kl)),
            if e == chosen { "  <- kept" } else { "" }
        );
    }
    if let Some((_, lora)) = best {
        if !data.heldout.is_empty() {
            tm.lora = lora;
        }
    }

    tm.lora
        .write(&lora_path, &assistant, &lora_name)
        .with_context(|| format!("writing {}", lora_path.display()))?;

    let base = profile_base(&a.model)?;
    let text = profile_text(
        &a.name,
        &base,
        &file_name(out)?,
        &file_name(&lora_path)?,
        a.alpha,
        a.filter,
        &format!(
            "ULD: {} minus alpha times its first {} blocks trained on {}",
            a.model,
            a.layers,
            a.forget.display()
        ),
    );
    std::fs::write(&profile_path, &text)
        .with_context(|| format!("writing {}", profile_path.display()))?;
    ProfileFile::load(&profile_path).context("the written profile does not parse")?;
    for p in [out, &lora_path, &profile_path] {
        let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        println!("wrote {} ({:.2} MB)", p.display(), size as f64 / 1e6);
    }
    println!(
        "check it with: lethe profile check {}",
        profile_path.display()
    );
    Ok(())
}
