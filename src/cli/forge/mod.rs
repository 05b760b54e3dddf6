//! `lethe forge`: make unlearning artifacts, one file per subcommand. `forge assistant` writes
//! ULD's assistant base: the target's first K blocks with its final norm, embedding, head,
//! tokenizer and chat template. `forge ablate` writes a delta patch removing one direction of
//! the residual stream (directional ablation).

mod ablate;
mod assistant;

use anyhow::Result;
use clap::{Args, Subcommand};

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
}

pub fn main(a: ForgeArgs) -> Result<()> {
    match a.cmd {
        ForgeCmd::Ablate(a) => ablate::main(a),
        ForgeCmd::Assistant(a) => assistant::main(a),
    }
}
