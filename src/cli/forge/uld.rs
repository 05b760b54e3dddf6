//! `lethe forge uld`: ULD's assistant, trained on the CPU. The target's first K blocks (with
//! its final norm, embedding and head) get a LoRA trained to remember the forget answers
//! (cross-entropy) and to know nothing of the retain conversations (KL(uniform || p) at every
//! position, times the retain weight). Writes the truncated model, its LoRA and a profile that
//! subtracts the assistant from the target.

use super::finetune::{parse_targets, run_training, OptimArgs};
use anyhow::{Context, Result};
use clap::Args;
use lethe::forge::ablate::{read_examples, Example};
use lethe::forge::train::data::{
    answer_sequence, end_of_turn, read_paraphrases, read_wrong_answers, uniform_sequence,
};
use lethe::forge::train::trainer::describe;
use lethe::forge::train::{Lora, TrainModel};
use lethe::gguf::GgufFile;
use lethe::model::Model;
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
    /// Also remember the paraphrased pairs of a TOFU augmentation file
    /// ({question, answer, paraphrased_questions[], paraphrased_answers[]}).
    #[arg(long = "forget-paraphrases")]
    pub forget_paraphrases: Option<PathBuf>,
    /// At most N paraphrased pairs of each row of --forget-paraphrases.
    #[arg(long = "paraphrases-per-row")]
    pub paraphrases_per_row: Option<usize>,
    /// Also push (question, wrong answer) pairs to uniform, from a TOFU augmentation file
    /// ({question, answer, question_variant, wrong_answers[]}): the rows whose question is one
    /// of --forget's.
    #[arg(long = "forget-wrong-answers")]
    pub forget_wrong_answers: Option<PathBuf>,
    /// Blocks of the target the assistant keeps (ULD's paper uses 8).
    #[arg(long = "layers", default_value_t = 8)]
    pub layers: usize,
    #[arg(long = "rank", default_value_t = 32)]
    pub rank: usize,
    #[arg(long = "lora-alpha", default_value_t = 32.0)]
    pub lora_alpha: f32,
    /// Matrices adapted in every block: q,k,v,o,gate,up,down.
    #[arg(long = "targets", default_value = "q,k,v,o,gate,up,down")]
    pub targets: String,
    /// Epochs (ULD's reference trains 10).
    #[arg(long = "epochs", default_value_t = 10)]
    pub epochs: usize,
    #[arg(long = "lr", default_value_t = 1e-3)]
    pub lr: f32,
    /// Fraction of the steps spent warming up (ULD's reference: 0.1).
    #[arg(long = "warmup-ratio", default_value_t = 0.1)]
    pub warmup_ratio: f32,
    /// AdamW's decoupled weight decay (ULD's reference: 0.01).
    #[arg(long = "weight-decay", default_value_t = 0.01)]
    pub weight_decay: f32,
    /// The weight of the retain side's KL(uniform || p).
    #[arg(long = "retain-weight", default_value_t = 5.0)]
    pub retain_weight: f32,
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

/// A TOML string literal.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn file_name(p: &Path) -> Result<String> {
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
    anyhow::ensure!(
        a.retain_weight.is_finite() && a.retain_weight >= 0.0,
        "--retain-weight must be >= 0"
    );
    let cfg = a
        .optim
        .config(a.epochs, a.lr, a.warmup_ratio, a.weight_decay)?;
    let (path, model, tok) = super::open_model(&a.model, a.optim.threads())?;
    anyhow::ensure!(
        (1..=model.cfg.n_layer).contains(&a.layers),
        "--layers {} is outside 1..={} (the target's blocks)",
        a.layers,
        model.cfg.n_layer
    );
    let arch = model.cfg.arch.name();
    let end = end_of_turn(&tok, arch)?;

    let mut forget = read_examples(&a.forget)?;
    let n_forget = forget.len();
    if let Some(p) = &a.forget_paraphrases {
        forget.extend(read_paraphrases(p, a.paraphrases_per_row)?);
    }
    let mut retain: Vec<Example> = read_examples(&a.retain)?;
    if let Some(n) = a.max_retain {
        retain.truncate(n);
    }
    let n_retain = retain.len();
    if let Some(p) = &a.forget_wrong_answers {
        // Only the wrong answers to this forget set's questions (TOFU's file covers forget10).
        let asked: std::collections::HashSet<&str> = forget[..n_forget]
            .iter()
            .map(|e| e.question.as_str())
            .collect();
        let wrong: Vec<Example> = read_wrong_answers(p)?
            .into_iter()
            .filter(|e| asked.contains(e.question.as_str()))
            .collect();
        anyhow::ensure!(
            !wrong.is_empty(),
            "{}: none of its questions is a question of {}",
            p.display(),
            a.forget.display()
        );
        retain.extend(wrong);
    }
    let ml = a.optim.max_len;
    let mut data = Vec::with_capacity(forget.len() + retain.len());
    for ex in &forget {
        data.push(answer_sequence(&tok, arch, ex, end, ml, 1.0).context("a forget row")?);
    }
    for ex in &retain {
        data.push(
            uniform_sequence(&tok, arch, ex, end, ml, a.retain_weight).context("a retain row")?,
        );
    }
    println!(
        "forget: {} rows ({} from {}, {} paraphrased); retain: {} rows ({} from {}, {} with \
         wrong answers)",
        forget.len(),
        n_forget,
        a.forget.display(),
        forget.len() - n_forget,
        retain.len(),
        n_retain,
        a.retain.display(),
        retain.len() - n_retain
    );

    // The assistant: the target's first K blocks, trained in place (the same function as the
    // truncated file).
    let lora = Lora::new(
        &model,
        0..a.layers,
        &slots,
        a.rank,
        a.lora_alpha,
        a.optim.seed,
    )?;
    println!(
        "assistant: the first {} of {} blocks; LoRA {}",
        a.layers,
        model.cfg.n_layer,
        describe(&lora)
    );
    let mut tm = TrainModel::with_layers(&model, lora, a.layers)?;
    run_training(&mut tm, &data, &cfg)?;

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
    let name = format!("ULD assistant LoRA ({})", a.forget.display());
    tm.lora
        .write(&lora_path, &assistant, &name)
        .with_context(|| format!("writing {}", lora_path.display()))?;

    // A file target is written as an absolute path (the profile resolves relative paths
    // against its own folder); a named model as given.
    let base = if Path::new(&a.model).exists() {
        std::fs::canonicalize(&a.model)?
            .to_string_lossy()
            .into_owned()
    } else {
        a.model.clone()
    };
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
