//! `lethe patch`: layer patch files: inspect one, bake patches into a model, or write a random
//! LoRA (for benchmarks and tests).

mod bake;
mod inspect;
mod random;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct PatchArgs {
    #[command(subcommand)]
    pub cmd: PatchCmd,
}

#[derive(Subcommand, Debug)]
pub enum PatchCmd {
    /// Show a patch file: its type, target tensors, ranks, scales and size.
    Inspect(inspect::InspectArgs),
    /// Merge patches into the weights they change and write a GGUF llama.cpp runs.
    Bake(bake::BakeArgs),
    /// Write a random LoRA in llama.cpp's layout (to measure what a LoRA costs).
    Random(random::RandomArgs),
}

pub fn main(a: PatchArgs) -> Result<()> {
    match a.cmd {
        PatchCmd::Inspect(a) => inspect::main(a),
        PatchCmd::Bake(a) => bake::main(a),
        PatchCmd::Random(a) => random::main(a),
    }
}
