//! `lethe forge assistant`: ULD's assistant base, the target cut after its first K blocks.

use anyhow::{Context, Result};
use clap::Args;
use lethe::gguf::GgufFile;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct AssistantArgs {
    /// The target model: a GGUF path or a named model.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// Blocks to keep (ULD's paper uses 8).
    #[arg(long = "layers", default_value_t = 8)]
    pub layers: usize,
    /// Output GGUF.
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
}

pub fn main(a: AssistantArgs) -> Result<()> {
    let path = lethe::hub::resolve_model(&a.model)?;
    let f = GgufFile::open(&path)?;
    lethe::forge::truncate_model(&f, a.layers, &a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({} of {}'s blocks, {:.1} MB)",
        a.output.display(),
        a.layers,
        path.display(),
        size as f64 / 1e6
    );
    Ok(())
}
