//! `lethe forge`: make unlearning artifacts, one file per subcommand. `forge assistant` writes
//! ULD's assistant base: the target's first K blocks with its final norm, embedding, head,
//! tokenizer and chat template. `forge ablate` writes a delta patch removing one direction of
//! the residual stream (directional ablation). `forge slug` writes a dense delta of the one
//! matrix SLUG chooses, one step along its forget gradient.

mod ablate;
mod assistant;
mod finetune;
mod slug;
mod uld;
mod unlearn;

use anyhow::Result;
use clap::{Args, Subcommand};
use lethe::model::Model;
use lethe::tokenizer::Tokenizer;
use lethe::unlearn::{Base, LoadOptions};
use std::path::PathBuf;
use std::sync::Arc;

/// `-t N`, or every core.
pub fn threads(flag: Option<usize>) -> usize {
    flag.unwrap_or_else(lethe::unlearn::default_threads)
}

/// The model a forge command works on (a GGUF path or a named model, fetched on first use):
/// its path, the model and its tokenizer.
pub fn open_model(name: &str, threads: usize) -> Result<(PathBuf, Arc<Model>, Arc<Tokenizer>)> {
    let path = lethe::hub::resolve_model(name)?;
    let opts = LoadOptions {
        threads: Some(threads),
        ..LoadOptions::default()
    };
    let b = Base::open(&path, opts)?;
    // Training's jobs are coarse and spaced out by serial work: keep both threads on them.
    b.model.pool.set_steady(true);
    super::common::tokenizer_warnings(&b.tok);
    Ok((b.path, b.model, b.tok))
}

#[derive(Args, Debug)]
pub struct ForgeArgs {
    #[command(subcommand)]
    pub cmd: ForgeCmd,
}

#[derive(Subcommand, Debug)]
pub enum ForgeCmd {
    /// Write ULD's assistant base: the target truncated to its first K blocks.
    Assistant(assistant::AssistantArgs),
    /// Write a delta patch that removes the forget-minus-retain direction of the residual
    /// stream from the embedding and from every block's attn_output and ffn_down.
    Ablate(ablate::AblateArgs),
    /// Fine-tune a LoRA on question/answer pairs (loss on the answers), on the CPU.
    Finetune(finetune::FinetuneArgs),
    /// Train ULD's assistant: the target's first K blocks with a LoRA that remembers the
    /// forget set and is uniform on the retain set; writes it, its LoRA and a profile.
    Uld(Box<uld::UldArgs>),
    /// SLUG: score every linear matrix by its forget and retain gradients, step the best one
    /// along its forget gradient, and write that step as a dense delta patch.
    Slug(slug::SlugArgs),
    /// Train a LoRA patch that makes the target forget (graddiff, NPO, SimNPO or RMU), one
    /// checkpoint per epoch chosen on held-out rows; writes it and a profile.
    Unlearn(Box<unlearn::UnlearnArgs>),
}

pub fn main(a: ForgeArgs) -> Result<()> {
    match a.cmd {
        ForgeCmd::Ablate(a) => ablate::main(a),
        ForgeCmd::Assistant(a) => assistant::main(a),
        ForgeCmd::Finetune(a) => finetune::main(a),
        ForgeCmd::Uld(a) => uld::main(*a),
        ForgeCmd::Slug(a) => slug::main(a),
        ForgeCmd::Unlearn(a) => unlearn::main(*a),
    }
}
