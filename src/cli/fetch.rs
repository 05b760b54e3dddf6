//! `lethe fetch`: download named models into the cache now (they are otherwise fetched on
//! first use), verified by sha256.

use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// Model names (default: every model of the manifest).
    pub names: Vec<String>,
    /// List the known names and where they are cached.
    #[arg(long)]
    pub list: bool,
}

pub fn main(a: FetchArgs) -> Result<()> {
    let m = lethe::hub::manifest();
    if a.list {
        let dir = lethe::hub::cache_dir()?;
        for (name, e) in &m.models {
            let p = dir.join(&e.file);
            let state = if p.exists() { "cached" } else { "not fetched" };
            println!("{name:<10} {:<60} {state}: {}", e.description, p.display());
        }
        return Ok(());
    }
    let names: Vec<String> = if a.names.is_empty() {
        m.models.keys().cloned().collect()
    } else {
        a.names
    };
    for n in names {
        let p = lethe::hub::resolve_model(&n)?;
        println!("{n}: {}", p.display());
    }
    Ok(())
}
