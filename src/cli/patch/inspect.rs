//! `lethe patch inspect FILE`: what a patch file holds, without a base model.

use anyhow::Result;
use clap::Args;
use lethe::patch::PatchKind;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The patch file (LoRA, control vector or delta GGUF).
    pub file: PathBuf,
}

pub fn main(a: InspectArgs) -> Result<()> {
    let info = lethe::patch::inspect(&a.file)?;
    println!("file: {}", a.file.display());
    println!("type: {}", info.kind.name());
    match info.kind {
        PatchKind::ControlVector => {
            println!("model hint: {}", info.arch.as_deref().unwrap_or("(none)"))
        }
        _ => println!("architecture: {}", info.arch.as_deref().unwrap_or("(none)")),
    }
    if info.kind == PatchKind::Lora {
        match info.alpha {
            Some(alpha) if alpha != 0.0 => {
                println!("alpha: {alpha} (each tensor is scaled by alpha / rank)")
            }
            _ => println!("alpha: none (scale 1)"),
        }
    }
    println!(
        "size: {:.2} MB, {} target{}",
        info.file_size as f64 / 1e6,
        info.targets.len(),
        if info.targets.len() == 1 { "" } else { "s" }
    );
    println!();
    println!("{:<32} {:<28} {:>12}", "target", "form", "bytes");
    for (name, form, bytes) in &info.targets {
        let name = match info.kind {
            PatchKind::ControlVector => format!("{name} (after block {})", &name[10..]),
            _ => name.clone(),
        };
        let form = match (info.kind, info.alpha) {
            (PatchKind::Lora, Some(alpha)) if alpha != 0.0 => {
                let rank: f32 = form
                    .split_whitespace()
                    .nth(1)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0.0);
                format!("{form}, scale {:.4}", alpha / rank)
            }
            _ => form.clone(),
        };
        println!("{name:<32} {form:<28} {bytes:>12}");
    }
    Ok(())
}
