//! `lethe chat`: an interactive, streaming, multi-turn conversation through the chat template.
//! `/reset` starts over, `/exit` quits; Ctrl-C stops the current answer, not the program.

use super::common::{ModelArgs, SamplingArgs};
use anyhow::Result;
use clap::Args;
use lethe::generate::{generate, Flow, GenerateParams};
use lethe::tokenizer::{apply_chat_template, ChatMessage};
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Most tokens per answer (-1: until end of generation or a full context).
    #[arg(short = 'n', long = "n-predict", default_value_t = -1, allow_hyphen_values = true)]
    pub n_predict: i64,
    /// A system message.
    #[arg(long = "system")]
    pub system: Option<String>,
    /// Override the chat template: a built-in name (chatml, gemma) or Jinja source.
    #[arg(long = "chat-template")]
    pub chat_template: Option<String>,
}

pub fn main(a: ChatArgs) -> Result<()> {
    let mut l = a.model.load()?;
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    }
    let mut dec = l.decoder(l.base.n_ctx)?;
    let mut cached: Vec<u32> = Vec::new();
    let mut msgs: Vec<ChatMessage> = Vec::new();
    let reset = |msgs: &mut Vec<ChatMessage>| {
        msgs.clear();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s.clone()));
        }
    };
    reset(&mut msgs);
    let params = GenerateParams {
        n_predict: a.n_predict,
        sampler: a.sampling.params(),
        stop: Vec::new(),
        ignore_eos: false,
    };
    let arch = l.base.model.cfg.arch.name();
    eprintln!(
        "lethe chat: {} ({} threads, context {}). /reset starts over, /use NAME|base switches profile, /exit quits, Ctrl-C stops an answer.",
        l.base.path.display(),
        l.base.model.pool.n_threads(),
        l.base.n_ctx
    );
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        print!("\n> ");
        std::io::stdout().flush()?;
        interrupted.store(false, Ordering::SeqCst);
        let Some(line) = lines.next() else { break };
        let line = match line {
            Ok(l) => l,
            // Ctrl-C at the prompt interrupts the read on some terminals: ask again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let input = line.trim();
        match input {
            "" => continue,
            "/exit" | "/quit" => break,
            cmd if cmd.starts_with("/use") => {
                let name = cmd["/use".len()..].trim();
                match l.switch(name) {
                    Ok(()) => {
                        // A new decoder: its caches start empty; the conversation stays.
                        dec = l.decoder(l.base.n_ctx)?;
                        cached.clear();
                        eprintln!(
                            "(now answering as {})",
                            l.forgotten.profile.as_deref().unwrap_or("base")
                        );
                    }
                    Err(e) => eprintln!("error: {e:#}"),
                }
                continue;
            }
            "/reset" => {
                reset(&mut msgs);
                cached.clear();
                dec.truncate(0);
                eprintln!("(conversation reset)");
                continue;
            }
            _ => {}
        }
        msgs.push(ChatMessage::new("user", input));
        let text = apply_chat_template(&l.base.tok, arch, a.chat_template.as_deref(), &msgs, true)?;
        let prompt = l.base.tok.encode(&text, true, true);
        if prompt.len() >= l.base.n_ctx {
            eprintln!(
                "(the conversation no longer fits the {}-token context: /reset to start over)",
                l.base.n_ctx
            );
            msgs.pop();
            continue;
        }
        let mut out = std::io::stdout().lock();
        let g = generate(
            dec.as_mut(),
            &l.base.tok,
            &mut cached,
            &prompt,
            &params,
            |t| {
                let _ = write!(out, "{t}");
                let _ = out.flush();
                if interrupted.load(Ordering::SeqCst) {
                    Flow::Stop
                } else {
                    Flow::Continue
                }
            },
        );
        drop(out);
        match g {
            Ok(g) => {
                if g.finish == lethe::generate::FinishReason::Cancelled {
                    eprint!(" [stopped]");
                }
                msgs.push(ChatMessage::new("assistant", g.text.trim().to_string()));
            }
            Err(e) => {
                eprintln!("error: {e}");
                msgs.pop();
            }
        }
    }
    Ok(())
}
