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
    /// Serve an HTTP API compatible with llama-server's, each profile a model id.
    Serve(Box<cli::serve::ServeArgs>),
    /// TOFU metrics and membership inference of a forgotten profile against its base.
    Eval(cli::eval::EvalArgs),
    /// Two models answer the same prompts: side by side, first difference, KL.
    Compare(cli::compare::CompareArgs),
    /// Several evaluations (`eval --json`) in one table and one forget-quality chart.
    Report(cli::report::ReportArgs),
    /// Choose a ULD profile's alpha and filter from a sweep, reading no evaluation data.
    Calibrate(cli::calibrate::CalibrateArgs),
}

/// Output piped into `head` and closed early ends the process quietly, as for other Unix
/// tools, instead of a panic on the failed write.
#[cfg(unix)]
fn default_sigpipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

fn main() -> anyhow::Result<()> {
    #[cfg(unix)]
    default_sigpipe();
    // Model downloads show their steps and progress on stderr.
    lethe::hub::set_report(lethe::hub::Report {
        note: |line| eprintln!("lethe: {line}"),
        progress: true,
    });
    // llama.cpp spells `--parallel` as `-np`, which is not a one-letter flag; `lethe serve`
    // takes llama-server's other multi-letter short flags too.
    let args: Vec<String> = std::env::args().collect();
    let cli = if args.get(1).map(String::as_str) == Some("serve") {
        Cli::parse_from(cli::serve_compat::rewrite_shorts(args.into_iter()))
    } else {
        Cli::parse_from(
            args.into_iter()
                .map(|a| if a == "-np" { "--parallel".into() } else { a }),
        )
    };
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
        Cmd::Serve(a) => cli::serve::main(*a),
        Cmd::Eval(a) => cli::eval::main(a),
        Cmd::Compare(a) => cli::compare::main(a),
        Cmd::Report(a) => cli::report::main(a),
        Cmd::Calibrate(a) => cli::calibrate::main(a),
    }
}
