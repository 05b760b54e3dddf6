//! `lethe forge ablate`: directional ablation written as a delta patch, and `--eval` to score
//! the answers of both sets with and without it.

use anyhow::{Context, Result};
use clap::Args;
use lethe::forge::ablate::{self, Field};
use lethe::model::Model;
use lethe::patch::PatchSet;
use lethe::qa::{self, Example};
use lethe::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct AblateArgs {
    /// The base model: a GGUF path or a named model.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// Texts whose direction is removed: a JSON array or JSON lines of objects with
    /// question/answer, prompt/response or text.
    #[arg(long)]
    pub forget: PathBuf,
    /// Texts to tell them from (same formats).
    #[arg(long)]
    pub retain: PathBuf,
    /// Read the direction at the input of block L (0..=n_layer; n_layer: after the last block).
    #[arg(long)]
    pub layer: usize,
    /// Blocks whose attn_output and ffn_down are changed: A..B, A..=B or N (default: all).
    #[arg(long)]
    pub layers: Option<String>,
    /// Positions averaged: question (templated user turn), answer, or both.
    #[arg(long, default_value = "question")]
    pub field: String,
    /// Use only the first N rows of each file.
    #[arg(long)]
    pub max: Option<usize>,
    /// Output patch (GGUF, adapter.type = delta).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Threads for the forward passes (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Then score the answers with the base and the patched model: mean exp(-NLL per answer
    /// token), on the forget rows used and on the retain rows after those used.
    #[arg(long)]
    pub eval: bool,
    /// Retain rows --eval scores (the ones right after the rows used for the direction).
    #[arg(long = "eval-retain", default_value_t = 40)]
    pub eval_retain: usize,
}

/// The rows of `path`, at most `max`.
fn rows(path: &Path, max: Option<usize>) -> Result<(Vec<Example>, Vec<Example>)> {
    let mut all = qa::read_examples(path)?;
    let n = max.unwrap_or(all.len()).min(all.len());
    let rest = all.split_off(n);
    Ok((all, rest))
}

pub fn main(a: AblateArgs) -> Result<()> {
    if a.max == Some(0) {
        anyhow::bail!("--max must be at least 1");
    }
    let field = Field::parse(&a.field)?;
    let threads = super::threads(a.threads);
    let (_, model, tok) = super::open_model(&a.model, threads)?;
    ablate::check_layer(&model, a.layer)?;
    let n_layer = model.cfg.n_layer;
    let layers = match &a.layers {
        Some(s) => ablate::parse_layers(s, n_layer)?,
        None => 0..n_layer,
    };
    let (forget, _) = rows(&a.forget, a.max)?;
    let (retain, retain_rest) = rows(&a.retain, a.max)?;
    let retain_eval: Vec<Example> = retain_rest.into_iter().take(a.eval_retain).collect();
    if a.eval && retain_eval.is_empty() {
        anyhow::bail!(
            "--eval: no retain rows are left after the {} used for the direction (lower --max)",
            retain.len()
        );
    }
    if a.eval
        && forget
            .iter()
            .chain(&retain_eval)
            .any(|e| e.answer.is_none())
    {
        anyhow::bail!("--eval scores answers: every forget and retain row needs one");
    }

    let d = ablate::direction(&model, &tok, &forget, &retain, a.layer, field)?;
    for (name, s, p) in [
        ("forget", &d.forget, &a.forget),
        ("retain", &d.retain, &a.retain),
    ] {
        println!(
            "{name}: {} texts, {} positions averaged ({})",
            s.texts,
            s.tokens,
            p.display()
        );
    }
    println!(
        "direction at the input of block {} (field {}): ||m_forget - m_retain|| = {:.4}, \
         cos(m_forget, m_retain) = {:.4}",
        d.layer,
        field.name(),
        d.distance,
        d.cosine
    );

    let entries = lethe::forge::ablation_patch(&model, &d.r, layers.clone())?;
    let name = format!(
        "ablation of the block-{} direction ({} forget, {} retain texts)",
        d.layer, d.forget.texts, d.retain.texts
    );
    ablate::write(&a.output, &model, &name, &entries)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({:.2} MB, {} tensors, rank 1 each): token_embd.weight, and \
         blk.N.attn_output.weight and blk.N.ffn_down.weight for N in {}..={}",
        a.output.display(),
        size as f64 / 1e6,
        entries.len(),
        layers.start,
        layers.end - 1
    );

    if a.eval {
        evaluate(&model, &tok, &a.output, &forget, &retain_eval, retain.len())?;
    }
    Ok(())
}

/// Print the probability of the answers of both sets, base and patched.
fn evaluate(
    model: &Model,
    tok: &Tokenizer,
    patch: &Path,
    forget: &[Example],
    retain: &[Example],
    retain_from: usize,
) -> Result<()> {
    let p = lethe::patch::load(patch, model)?;
    let set = Arc::new(PatchSet::new(model, &[(Arc::new(p), 1.0)])?);
    let arch = model.cfg.arch.name();
    let n_ctx = qa::n_ctx_for(tok, arch, forget)?.max(qa::n_ctx_for(tok, arch, retain)?);
    let mut base = model.new_state(n_ctx);
    let mut patched = model.new_state(n_ctx);
    model.attach_patches(&mut patched, Some(set))?;
    println!();
    println!(
        "probability of the answers, mean exp(-NLL per answer token) (forget: the rows used; \
         retain: rows {}..{})",
        retain_from + 1,
        retain_from + retain.len()
    );
    println!(
        "{:<8} {:>5} {:>10} {:>13} {:>8}",
        "set", "items", "base prob", "patched prob", "change"
    );
    for (name, items) in [("forget", forget), ("retain", retain)] {
        let b = qa::answer_prob(model, tok, &mut base, items)?;
        let q = qa::answer_prob(model, tok, &mut patched, items)?;
        println!(
            "{name:<8} {:>5} {b:>10.4} {q:>13.4} {:>7.1}%",
            items.len(),
            100.0 * (q - b) / b
        );
    }
    Ok(())
}
