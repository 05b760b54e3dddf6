//! `lethe inspect`: metadata, tensor table, type histogram and parameter count of a GGUF file.

use anyhow::Result;
use clap::Args;
use lethe::gguf::GgufFile;
use std::collections::BTreeMap;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A GGUF path or a model name.
    pub model: String,
    /// Print every tensor (default: the first 40 and a count).
    #[arg(long)]
    pub all: bool,
}

pub fn main(a: InspectArgs) -> Result<()> {
    let path = lethe::hub::resolve_model(&a.model)?;
    let f = GgufFile::open(&path)?;
    println!("file: {}", path.display());
    println!(
        "GGUF v{}, {} metadata keys, {} tensors, alignment {}, data at {}",
        f.version,
        f.metadata().len(),
        f.tensors().len(),
        f.alignment,
        f.data_offset
    );
    println!("\nmetadata:");
    for (k, v) in f.metadata() {
        println!("  {k:<44} {}", v.summary(96));
    }
    println!("\ntensors:");
    println!(
        "  {:<36} {:>6} {:>22} {:>12}",
        "name", "type", "shape", "bytes"
    );
    let mut hist: BTreeMap<&str, (usize, u64, u64)> = BTreeMap::new();
    let mut params = 0u64;
    for (i, t) in f.tensors().iter().enumerate() {
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        if a.all || i < 40 {
            println!(
                "  {:<36} {:>6} {:>22} {:>12}",
                t.name,
                t.ty.name(),
                shape.join(" x "),
                t.size
            );
        }
        let e = hist.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.n_elements();
        e.2 += t.size;
        params += t.n_elements();
    }
    if !a.all && f.tensors().len() > 40 {
        println!("  ... {} more (--all lists them)", f.tensors().len() - 40);
    }
    println!("\ntypes:");
    for (ty, (n, el, bytes)) in &hist {
        println!(
            "  {ty:<6} {n:>5} tensors {el:>12} params {:>10.2} MiB",
            *bytes as f64 / (1 << 20) as f64
        );
    }
    let bytes: u64 = hist.values().map(|h| h.2).sum();
    println!(
        "\nparameters: {params} ({:.1} M), {:.2} bits per weight",
        params as f64 / 1e6,
        bytes as f64 * 8.0 / params as f64
    );
    Ok(())
}
