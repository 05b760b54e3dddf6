//! The `lethe` binary.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "lethe",
    version,
    about = "Serve GGUF language models with knowledge removed at decode time"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Generate from a prompt, streaming to stdout.
    Run(cli::run::RunArgs),
    /// Chat interactively through the model's chat template.
    Chat(cli::chat::ChatArgs),
    /// Show a GGUF file's metadata, tensors and types.
    Inspect(cli::inspect::InspectArgs),
    /// Print the tokens of a text.
    Tokenize(cli::tokenize::TokenizeArgs),
    /// Measure prefill and decode speed against the memory-bandwidth ceiling.
    Bench(cli::bench::BenchArgs),
    /// Download named models into the cache (otherwise fetched on first use).
    Fetch(cli::fetch::FetchArgs),
    /// Make unlearning artifacts (assistants, ablation patches).
    Forge(cli::forge::ForgeArgs),
    /// Check unlearning profiles.
    Profile(cli::profile::ProfileArgs),
    /// Layer patch files: inspect, bake into a model, make a random LoRA.
    Patch(cli::patch::PatchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(a) => cli::run::main(a),
        Cmd::Chat(a) => cli::chat::main(a),
        Cmd::Inspect(a) => cli::inspect::main(a),
        Cmd::Tokenize(a) => cli::tokenize::main(a),
        Cmd::Bench(a) => cli::bench::main(a),
        Cmd::Fetch(a) => cli::fetch::main(a),
        Cmd::Forge(a) => cli::forge::main(a),
        Cmd::Profile(a) => cli::profile::main(a),
        Cmd::Patch(a) => cli::patch::main(a),
    }
}
