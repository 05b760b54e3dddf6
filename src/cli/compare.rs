//! `lethe compare`: two sides (the base, profiles, models) answer the same prompts; the
//! answers side by side, where they first differ, and the mean KL divergence between their
//! next-token distributions along side A's answer.

use super::common::ModelArgs;
use super::eval::named_side;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lethe::eval::compare::{compare, CompareOptions, Pair};
use lethe::eval::data::{self, Split};
use serde_json::json;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct CompareArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Side A: `base`, a profile of --profile, or a model (GGUF path or name).
    #[arg(long = "a", default_value = "base")]
    pub a: String,
    /// Side B: `base`, a profile of --profile, or a model.
    #[arg(long = "b")]
    pub b: String,
    /// Prompts: JSON, JSONL (question/answer, prompt/response or text) or one per line.
    #[arg(long = "prompts", conflicts_with = "tofu")]
    pub prompts: Option<PathBuf>,
    /// The questions of a TOFU forget split (forget01, forget05, forget10), with their answers.
    #[arg(long = "tofu")]
    pub tofu: Option<String>,
    /// Only the first N prompts.
    #[arg(long = "limit")]
    pub limit: Option<usize>,
    /// Most tokens of each answer.
    #[arg(long = "max-tokens", default_value_t = 128)]
    pub max_tokens: usize,
    /// Write everything as JSON.
    #[arg(long = "json")]
    pub json: Option<PathBuf>,
}

pub fn main(a: CompareArgs) -> Result<()> {
    let prompts = prompts(&a)?;
    if prompts.is_empty() {
        bail!("no prompts");
    }
    let l = a.m.load()?;
    let file = l.file.as_ref();
    let sa = named_side(&l.base, &a.a, file)?;
    let sb = named_side(&l.base, &a.b, file)?;
    if sa.forgotten.model.cfg.n_vocab != sb.forgotten.model.cfg.n_vocab {
        bail!("{} and {} have different vocabularies", a.a, a.b);
    }
    let n_ctx = l.base.n_ctx.min(2048);
    let bar = ProgressBar::new(3 * prompts.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("compare [{bar:30}] {pos}/{len} {elapsed}<{eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let opts = CompareOptions {
        max_new: a.max_tokens,
        n_ctx,
    };
    let pairs = compare(&sa, &sb, &prompts, &opts, &|n| bar.inc(n))?;
    bar.finish_and_clear();
    print_pairs(&a.a, &a.b, &pairs);
    if let Some(p) = &a.json {
        let f = std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?;
        let out = json!({
            "a": { "name": a.a, "audit": sa.audit },
            "b": { "name": a.b, "audit": sb.audit },
            "max_tokens": a.max_tokens,
            "pairs": pairs,
        });
        serde_json::to_writer_pretty(std::io::BufWriter::new(f), &out)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `(prompt, expected answer)` from --prompts or --tofu.
fn prompts(a: &CompareArgs) -> Result<Vec<(String, Option<String>)>> {
    let mut out: Vec<(String, Option<String>)> = match (&a.prompts, &a.tofu) {
        (Some(p), _) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let t = text.trim_start();
            if t.starts_with('[') || t.starts_with('{') {
                lethe::qa::read_examples(p)?
                    .into_iter()
                    .map(|e| (e.question, e.answer))
                    .collect()
            } else {
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| (l.to_string(), None))
                    .collect()
            }
        }
        (None, Some(s)) => data::load(Split::parse(s)?, None, None)?
            .forget
            .into_iter()
            .map(|q| (q.question, Some(q.answer)))
            .collect(),
        (None, None) => bail!("give --prompts FILE or --tofu SPLIT"),
    };
    if let Some(n) = a.limit {
        out.truncate(n);
    }
    Ok(out)
}

/// Terminal width, from `COLUMNS` (default 100).
fn width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100usize)
        .clamp(40, 240)
}

/// `text` wrapped at `w` characters (words kept whole where they fit).
fn wrap(text: &str, w: usize) -> Vec<String> {
    let mut lines = Vec::new();
    for para in text.split('\n') {
        let mut line = String::new();
        for word in para.split_whitespace() {
            let mut word: Vec<char> = word.chars().collect();
            while word.len() > w {
                if !line.is_empty() {
                    lines.push(std::mem::take(&mut line));
                }
                lines.push(word.drain(..w).collect());
            }
            let word: String = word.into_iter().collect();
            let n = line.chars().count();
            if n > 0 && n + 1 + word.chars().count() > w {
                lines.push(std::mem::take(&mut line));
            }
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(&word);
        }
        lines.push(line);
    }
    lines
}

fn print_pairs(a: &str, b: &str, pairs: &[Pair]) {
    let col = (width() - 3) / 2;
    let pad = |s: &str| {
        let n = s.chars().count();
        format!("{s}{}", " ".repeat(col.saturating_sub(n)))
    };
    let rule = "-".repeat(2 * col + 3);
    let mut kl_sum = 0.0;
    let mut same = 0;
    for (i, p) in pairs.iter().enumerate() {
        println!("{rule}");
        println!("[{}] {}", i + 1, p.prompt);
        if let Some(r) = &p.reference {
            println!("    expected: {r}");
        }
        println!("{} | B: {b}", pad(&format!("A: {a}")));
        let (la, lb) = (wrap(&p.a, col), wrap(&p.b, col));
        for k in 0..la.len().max(lb.len()) {
            let l = la.get(k).map(String::as_str).unwrap_or("");
            let r = lb.get(k).map(String::as_str).unwrap_or("");
            println!("{} | {r}", pad(l));
        }
        let diff = match (p.first_diff_token, p.first_diff_char) {
            (None, _) => {
                same += 1;
                "identical answers".to_string()
            }
            (Some(t), Some(c)) => format!("first difference at token {t} (character {c})"),
            (Some(t), None) => format!("first difference at token {t} (same text)"),
        };
        println!(
            "    {diff}; mean KL(A||B) along A's answer: {:.4} nats over {} tokens",
            p.mean_kl,
            p.kl.len()
        );
        kl_sum += p.mean_kl;
    }
    println!("{rule}");
    println!(
        "{} prompts: {} identical, mean of the per-prompt mean KL(A||B) {:.4} nats",
        pairs.len(),
        same,
        kl_sum / pairs.len().max(1) as f64
    );
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn wraps_words() {
        assert_eq!(wrap("aa bb cc", 5), vec!["aa bb", "cc"]);
        assert_eq!(wrap("abcdefg", 3), vec!["abc", "def", "g"]);
        assert_eq!(wrap("", 3), vec![""]);
    }
}
