//! `lethe run`: generate from a prompt and stream the text to stdout.

use super::common::{ModelArgs, SamplingArgs};
use anyhow::Result;
use clap::Args;
use lethe::generate::{generate, Flow, GenerateParams};
use lethe::tokenizer::{apply_chat_template, ChatMessage};
use std::io::Write;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The prompt.
    #[arg(short = 'p', long = "prompt")]
    pub prompt: String,
    /// Tokens to generate (-1: until end of generation or a full context).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_hyphen_values = true)]
    pub n_predict: i64,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// A system message (with --chat).
    #[arg(long = "system", requires = "chat")]
    pub system: Option<String>,
    /// Override the chat template: a built-in name (chatml, gemma) or Jinja source.
    #[arg(long = "chat-template")]
    pub chat_template: Option<String>,
    /// Stop strings (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Print speed figures to stderr when done.
    #[arg(long)]
    pub timings: bool,
}

pub fn main(a: RunArgs) -> Result<()> {
    let l = a.model.load()?;
    let text = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
        msgs.push(ChatMessage::new("user", a.prompt.clone()));
        apply_chat_template(
            &l.base.tok,
            l.base.model.cfg.arch.name(),
            a.chat_template.as_deref(),
            &msgs,
            true,
        )?
    } else {
        a.prompt.clone()
    };
    let prompt = l.base.tok.encode(&text, true, true);
    let mut dec = l.decoder(l.base.n_ctx)?;
    let params = GenerateParams {
        n_predict: a.n_predict,
        sampler: a.sampling.params(),
        stop: a.stop.clone(),
        ignore_eos: false,
    };
    let mut out = std::io::stdout().lock();
    if !a.chat {
        write!(out, "{}", a.prompt)?;
    }
    let g = generate(
        dec.as_mut(),
        &l.base.tok,
        &mut Vec::new(),
        &prompt,
        &params,
        |t| {
            let _ = write!(out, "{t}");
            let _ = out.flush();
            Flow::Continue
        },
    )?;
    writeln!(out)?;
    if a.timings {
        eprintln!(
            "prompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | finish: {}",
            g.n_prompt,
            g.prompt_tps(),
            g.tokens.len(),
            g.gen_tps(),
            g.finish.as_str()
        );
    }
    Ok(())
}
