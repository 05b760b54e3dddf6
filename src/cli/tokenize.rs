//! `lethe tokenize`: print the tokens of a text, as llama.cpp's `llama-tokenize` does.

use anyhow::{Context, Result};
use clap::Args;
use lethe::gguf::GgufFile;
use lethe::tokenizer::Tokenizer;
use std::io::Read;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// Model: a GGUF path or a name from models/.
    #[arg(short = 'm', long = "model", default_value = "smollm2")]
    pub model: String,
    /// Print only the ids, as a list.
    #[arg(long)]
    pub ids: bool,
    /// Do not add BOS/EOS even where the model's metadata asks for them.
    #[arg(long = "no-bos")]
    pub no_bos: bool,
    /// Do not parse special tokens written in the text.
    #[arg(long = "no-parse-special")]
    pub no_parse_special: bool,
    /// Read the text from standard input.
    #[arg(long)]
    pub stdin: bool,
    /// The text (or use --stdin).
    #[arg(short = 'p', long = "prompt")]
    pub prompt: Option<String>,
    #[arg(conflicts_with = "prompt")]
    pub text: Option<String>,
}

pub fn main(a: TokenizeArgs) -> Result<()> {
    let text = if a.stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading standard input")?;
        s
    } else {
        a.prompt
            .or(a.text)
            .context("give a text, -p TEXT, or --stdin")?
    };
    let path = lethe::hub::resolve_model(&a.model)?;
    let f = GgufFile::open(&path)?;
    let tok = Tokenizer::from_gguf(&f)?;
    super::common::tokenizer_warnings(&tok);
    let ids = tok.encode(&text, !a.no_bos, !a.no_parse_special);
    if a.ids {
        let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        println!("[{}]", list.join(", "));
    } else {
        for id in ids {
            let piece = String::from_utf8_lossy(&tok.token_to_piece(id, true)).into_owned();
            println!("{id:6} -> '{piece}'");
        }
    }
    Ok(())
}
