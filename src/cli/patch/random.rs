//! `lethe patch random`: a random LoRA in llama.cpp's layout on chosen matrices of chosen
//! blocks: what `lethe bench --lora` measures the cost of a LoRA with.

use anyhow::{Context, Result};
use clap::Args;
use lethe::model::{Model, Proj, WeightId};
use lethe::patch::{to_file_tensors, write_lora, LowRankEntry};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RandomArgs {
    /// The base model: a GGUF path or a named model.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// Rank of every pair.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Blocks, as A..B (B excluded).
    #[arg(long, default_value = "0..4")]
    pub blocks: String,
    /// Matrices of each block (comma-separated: q,k,v,o,gate,up,down, or all).
    #[arg(long, default_value = "all")]
    pub matrices: String,
    /// LoRA alpha written to the file (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub alpha: f32,
    /// Standard deviation of B A's entries (roughly).
    #[arg(long, default_value_t = 1e-3)]
    pub std: f32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output GGUF.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
}

/// `A..B` (B excluded) or a single block `N`.
pub fn parse_blocks(s: &str, n_layer: usize) -> Result<std::ops::Range<usize>> {
    let r = match s.split_once("..") {
        Some((a, b)) => {
            let a: usize = if a.is_empty() { 0 } else { a.parse()? };
            let b: usize = if b.is_empty() { n_layer } else { b.parse()? };
            a..b
        }
        None => {
            let n: usize = s.parse()?;
            n..n + 1
        }
    };
    if r.start >= r.end || r.end > n_layer {
        anyhow::bail!("blocks {s:?}: the model has blocks 0..{n_layer}");
    }
    Ok(r)
}

fn proj(s: &str) -> Result<Proj> {
    Proj::from_short(s)
        .ok_or_else(|| anyhow::anyhow!("matrix {s:?}: one of q,k,v,o,gate,up,down,all"))
}

pub fn main(a: RandomArgs) -> Result<()> {
    let path = lethe::hub::resolve_model(&a.model)?;
    let model = Model::open(&path, 1).with_context(|| format!("loading {}", path.display()))?;
    let blocks = parse_blocks(&a.blocks, model.cfg.n_layer)?;
    let projs: Vec<Proj> = if a.matrices == "all" {
        // The matrices this architecture has (phi2 has no gate).
        Proj::ALL
            .into_iter()
            .filter(|&p| model.target_weight(WeightId::Block(0, p)).is_some())
            .collect()
    } else {
        a.matrices.split(',').map(proj).collect::<Result<_>>()?
    };
    if a.rank == 0 {
        anyhow::bail!("--rank must be at least 1");
    }
    let mut rng = lethe::generate::sampler::Rng::new(a.seed);
    // Entries of B A are sums of `rank` products: scale each factor to give `std` overall.
    let f = (a.std / (a.rank as f32).sqrt()).sqrt();
    let mut normal = move || {
        // Box-Muller from two uniforms.
        let (u, v) = (rng.next_f64().max(1e-300), rng.next_f64());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    };
    let mut entries = Vec::new();
    for n in blocks.clone() {
        for &s in &projs {
            let t = WeightId::Block(n, s);
            let (cols, rows) = model.target_shape(t)?;
            let a_: Vec<f32> = (0..a.rank * cols).map(|_| f * normal()).collect();
            let b_: Vec<f32> = (0..rows * a.rank).map(|_| f * normal()).collect();
            entries.push(LowRankEntry {
                base: t.tensor_name(),
                cols,
                rows,
                rank: a.rank,
                a: a_,
                b: b_,
            });
        }
    }
    let alpha = (a.alpha != 0.0).then_some(a.alpha);
    let n_matrices = entries.len();
    // As llama.cpp names the file's tensors (phi3's fused q/k/v and gate+up).
    let entries = to_file_tensors(&model, entries, alpha)?;
    write_lora(
        &a.output,
        model.cfg.arch.name(),
        "random LoRA",
        alpha,
        &entries,
    )
    .with_context(|| format!("writing {}", a.output.display()))?;
    println!(
        "wrote {}: rank {} on {} matrices of blocks {}..{} ({:.2} MB)",
        a.output.display(),
        a.rank,
        n_matrices,
        blocks.start,
        blocks.end,
        std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
    );
    Ok(())
}
