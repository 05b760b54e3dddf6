//! `lethe profile check FILE`: validate a profile file: every file exists and loads as GGUF,
//! and every assistant has the base's vocabulary, token for token.

use anyhow::Result;
use clap::{Args, Subcommand};
use lethe::unlearn::profile::{check_profile, ProfileFile};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ProfileArgs {
    #[command(subcommand)]
    pub cmd: ProfileCmd,
}

#[derive(Subcommand, Debug)]
pub enum ProfileCmd {
    /// Check every profile of a file (or one, with --use).
    Check {
        /// The profile file (TOML).
        file: PathBuf,
        /// Check only this profile.
        #[arg(long = "use")]
        use_profile: Option<String>,
    },
}

pub fn main(a: ProfileArgs) -> Result<()> {
    let ProfileCmd::Check { file, use_profile } = a.cmd;
    let pf = ProfileFile::load(&file)?;
    let mut checked = 0;
    for p in &pf.profiles {
        if use_profile.as_deref().is_some_and(|u| u != p.name) {
            continue;
        }
        let report = check_profile(p, &pf.dir)?;
        println!(
            "profile {:?}: ok ({} tokens)",
            report.profile, report.n_vocab
        );
        for f in &report.files {
            println!(
                "  {:<24} {}  {}  ({} bytes)",
                f.role,
                f.sha256,
                f.path.display(),
                f.size
            );
        }
        checked += 1;
    }
    if checked == 0 {
        anyhow::bail!(
            "no profile {:?} in {}",
            use_profile.unwrap_or_default(),
            file.display()
        );
    }
    Ok(())
}
