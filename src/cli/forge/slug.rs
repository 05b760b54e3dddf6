//! `lethe forge slug`: SLUG (Single Layer Unlearning Gradient), one step along the forget
//! gradient of the one matrix chosen from both sets' gradients, written as a dense delta patch.

use anyhow::{Context, Result};
use clap::Args;
use lethe::forge::ablate;
use lethe::forge::slug::{self, SearchOpts, SlugOpts};
use lethe::qa::{self, Example};
use lethe_kernels::quant::GgmlType;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct SlugArgs {
    /// The base model: a GGUF path or a named model.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// Rows to forget: a JSON array or JSON lines of objects with question/answer or
    /// prompt/response (the answer is scored).
    #[arg(long)]
    pub forget: PathBuf,
    /// Rows to keep (same formats).
    #[arg(long)]
    pub retain: PathBuf,
    /// Use only the first N rows of each file.
    #[arg(long)]
    pub max: Option<usize>,
    /// Blocks whose matrices are scored: A..B, A..=B or N (default: all).
    #[arg(long)]
    pub layers: Option<String>,
    /// Matrices scored in each block: comma-separated q,k,v,o,gate,up,down, or all.
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// Largest rise of the retain loss (mean NLL per answer token, nats) a step may cause.
    #[arg(long = "max-retain-increase", default_value_t = 0.1)]
    pub max_retain_increase: f64,
    /// Pareto-front matrices whose step is searched, highest importance first.
    #[arg(long, default_value_t = 3)]
    pub candidates: usize,
    /// Steps evaluated per candidate (doubling from 0.1, then bisecting).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Largest step lambda (in units of ||W||).
    #[arg(long = "max-step", default_value_t = 10.0)]
    pub max_step: f64,
    /// The delta's tensor type: f16 or f32.
    #[arg(long = "type", default_value = "f16")]
    pub ty: String,
    /// Matrices of the report's table (highest importance first).
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Output patch (GGUF, adapter.type = delta).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

fn rows(path: &Path, max: Option<usize>) -> Result<Vec<Example>> {
    let mut all = qa::read_examples(path)?;
    all.truncate(max.unwrap_or(all.len()));
    if let Some(i) = all.iter().position(|e| e.answer.is_none()) {
        anyhow::bail!(
            "{}: row {} has no answer (SLUG scores answers)",
            path.display(),
            i + 1
        );
    }
    Ok(all)
}

pub fn main(a: SlugArgs) -> Result<()> {
    if a.max == Some(0) {
        anyhow::bail!("--max must be at least 1");
    }
    let ty = match a.ty.to_ascii_lowercase().as_str() {
        "f16" => GgmlType::F16,
        "f32" => GgmlType::F32,
        other => anyhow::bail!("--type {other:?}: expected f16 or f32"),
    };
    let threads = super::threads(a.threads);
    let (_, model, tok) = super::open_model(&a.model, threads)?;
    lethe::forge::train::trainable(&model).context("SLUG's gradients come from lethe's trainer")?;
    let n_layer = model.cfg.n_layer;
    let layers = match &a.layers {
        Some(s) => ablate::parse_layers(s, n_layer)?,
        None => 0..n_layer,
    };
    let forget = rows(&a.forget, a.max)?;
    let retain = rows(&a.retain, a.max)?;
    let opts = SlugOpts {
        layers: layers.clone(),
        slots: slug::parse_slots(&a.targets)?,
        candidates: a.candidates,
        search: SearchOpts {
            max_retain_increase: a.max_retain_increase,
            steps: a.steps,
            lambda0: 0.1,
            lambda_max: a.max_step,
        },
        ty,
    };
    let t0 = std::time::Instant::now();
    let r = slug::slug(&model, &tok, &forget, &retain, &opts, &a.output)?;
    let secs = t0.elapsed().as_secs_f64();

    println!(
        "forget: {} rows, {} answer tokens ({}); retain: {} rows, {} answer tokens ({})",
        r.forget_rows,
        r.forget_tokens,
        a.forget.display(),
        r.retain_rows,
        r.retain_tokens,
        a.retain.display()
    );
    println!(
        "loss (mean NLL per answer token): forget {:.4}, retain {:.4} (inference engine); \
         {:.4}, {:.4} (training forward)",
        r.base.0, r.base.1, r.train_loss.0, r.train_loss.1
    );
    println!(
        "scored {} matrices of blocks {}..={}: importance = ||g_forget|| / ||W||, alignment \
         = |cos(g_forget, g_retain)|",
        r.scored.len(),
        layers.start,
        layers.end - 1
    );
    let mut by_imp: Vec<usize> = (0..r.scored.len()).collect();
    by_imp.sort_by(|&x, &y| r.scored[y].importance.total_cmp(&r.scored[x].importance));
    println!();
    println!(
        "{:<26} {:>11} {:>10} {:>9} {:>6}",
        "matrix", "importance", "alignment", "||W||", "front"
    );
    let row = |i: usize| {
        let s = &r.scored[i];
        println!(
            "{:<26} {:>11.4e} {:>10.4} {:>9.3} {:>6}",
            s.name(),
            s.importance,
            s.alignment,
            s.weight_norm,
            if r.front.contains(&i) { "*" } else { "" }
        );
    };
    for &i in by_imp.iter().take(a.top) {
        row(i);
    }
    println!();
    println!("Pareto front ({} matrices, by importance):", r.front.len());
    for &i in &r.front {
        row(i);
    }
    for (i, s) in &r.searches {
        println!();
        println!(
            "step search on {} (W' = W + lambda ||W|| g/||g||; accepted: retain rises <= {} \
             and forget rises)",
            r.scored[*i].name(),
            a.max_retain_increase
        );
        println!(
            "{:>9} {:>10} {:>10} {:>10} {:>10} {:>9}",
            "lambda", "forget", "d forget", "retain", "d retain", "accepted"
        );
        for st in &s.steps {
            println!(
                "{:>9.4} {:>10.4} {:>+10.4} {:>10.4} {:>+10.4} {:>9}",
                st.lambda,
                st.forget,
                st.forget - r.base.0,
                st.retain,
                st.retain - r.base.1,
                if st.accepted { "yes" } else { "no" }
            );
        }
    }
    println!();
    match r.chosen {
        Some((i, st)) => {
            let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
            println!(
                "chosen: {} at lambda {:.4}: forget loss {:.4} -> {:.4} ({:+.4}), retain \
                 {:.4} -> {:.4} ({:+.4})",
                r.scored[i].name(),
                st.lambda,
                r.base.0,
                st.forget,
                st.forget - r.base.0,
                r.base.1,
                st.retain,
                st.retain - r.base.1
            );
            println!(
                "wrote {} ({:.2} MB, dense {} delta of {}) in {secs:.1} s",
                a.output.display(),
                size as f64 / 1e6,
                a.ty.to_ascii_uppercase(),
                r.scored[i].name()
            );
        }
        None => anyhow::bail!(
            "no step of the {} candidates kept the retain loss within {} while raising the \
             forget loss; nothing written (raise --max-retain-increase or --candidates)",
            r.searches.len(),
            a.max_retain_increase
        ),
    }
    Ok(())
}
