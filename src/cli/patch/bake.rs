//! `lethe patch bake`: merge patches into the weights they change and write a GGUF llama.cpp
//! runs, with a report of what survived the requantization.

use super::super::common::file_scale;
use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lethe::model::Model;
use lethe::patch::bake::{
    self, BakeReport, BakeType, Survival, TensorReport, LOST_KEPT, NOISY_RESIDUAL,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BakeArgs {
    /// The base model: a GGUF path or a named model.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// A patch to bake (LoRA or delta GGUF) with an optional scale. Repeatable: the scaled
    /// deltas of several patches add up.
    #[arg(long = "patch", value_name = "FILE[:SCALE]", required = true)]
    pub patch: Vec<String>,
    /// Output GGUF.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Type of the changed tensors: keep (each base tensor's own type), f16 or q8_0.
    #[arg(long = "type", default_value = "keep", value_name = "keep|f16|q8_0")]
    pub ty: String,
    /// Threads for the merge (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
}

pub fn main(a: BakeArgs) -> Result<()> {
    let ty: BakeType = a.ty.parse()?;
    let specs = a
        .patch
        .iter()
        .map(|s| file_scale(s))
        .collect::<Result<Vec<_>>>()?;
    let path = lethe::hub::resolve_model(&a.model)?;
    let threads = super::super::forge::threads(a.threads);
    let model =
        Model::open(&path, threads).with_context(|| format!("loading {}", path.display()))?;
    let parts = bake::load_patches(&model, &specs)?;

    let bar = progress_bar();
    let start = Instant::now();
    let report = bake::bake(
        &model,
        Some(&path),
        &parts,
        ty,
        &a.output,
        &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .with_context(|| format!("baking into {}", a.output.display()));
    bar.finish_and_clear();
    let report = report?;
    print_report(&report, &path, ty, &a.output, start.elapsed().as_secs_f64());
    Ok(())
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("merging [{bar:30}] {pos}/{len} rows ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// `0.123`, or `-` for a ratio without a denominator.
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "-".into()
    }
}

fn print_report(r: &BakeReport, base: &Path, ty: BakeType, out: &Path, secs: f64) {
    println!("base: {}", base.display());
    for (p, s) in &r.patches {
        println!("patch: {p} (scale {s})");
    }
    println!("type: {}", ty.name());
    println!();
    let width = r
        .changed
        .iter()
        .map(|t| label(t).len())
        .max()
        .unwrap_or(0)
        .max(28);
    println!(
        "{:<width$} {:<14} {:>9} {:>9} {:>8} {:>9}",
        "tensor", "type", "|dW|/|W|", "error", "kept", "residual"
    );
    for t in &r.changed {
        print_tensor(t, width);
    }
    println!(
        "(error = |Q(W+dW) - (W+dW)| / |W+dW|; kept = <Q(W+dW) - W, dW> / |dW|^2, the share of \
         the delta carried; residual = |Q(W+dW) - W - dW| / |dW|)"
    );
    if r.head_copied {
        println!(
            "output.weight added: a copy of the original token_embd.weight (tied embeddings: \
             the embedding changed, the head did not)"
        );
    }
    let count = |s: Survival| r.changed.iter().filter(|t| t.survival() == s).count();
    let (lost, noisy, n) = (
        count(Survival::Lost),
        count(Survival::Noisy),
        r.changed.len(),
    );
    if lost > 0 {
        println!();
        println!(
            "WARNING: {lost} of {n} deltas are mostly lost below the quantization step (kept < \
             {LOST_KEPT}): the baked model does not carry them. Bake with --type q8_0 or f16, or \
             apply the patch at run time."
        );
    }
    if noisy > 0 {
        println!();
        println!(
            "WARNING: {noisy} of {n} deltas survive, but the requantization error is more than \
             half their size (residual > {NOISY_RESIDUAL}): the baked model is a noisy copy of \
             the patched one. --type f16 keeps them up to f16 rounding."
        );
    }
    println!();
    println!(
        "baked {} tensor{}, copied {}: wrote {} ({:.1} MB) in {secs:.1} s",
        r.changed.len(),
        if r.changed.len() == 1 { "" } else { "s" },
        r.copied,
        out.display(),
        r.bytes as f64 / 1e6
    );
}

/// The tensor's name, and where its weight came from when that is another tensor (a tied head).
fn label(t: &TensorReport) -> String {
    if t.base == t.name {
        t.name.clone()
    } else {
        format!("{} (from {})", t.name, t.base)
    }
}

fn print_tensor(t: &TensorReport, width: usize) {
    println!(
        "{:<width$} {:<14} {:>9} {:>9} {:>8} {:>9}{}",
        label(t),
        format!("{} -> {}", t.ty_in, t.ty_out),
        num(t.delta_rel),
        num(t.error),
        num(t.kept),
        num(t.residual),
        match t.survival() {
            Survival::Kept => "",
            Survival::Noisy => "  noisy",
            Survival::Lost => "  LOST",
        }
    );
}
