//! Chat templates: the model's Jinja `tokenizer.chat_template` rendered with minijinja the way
//! Hugging Face renders it (trim_blocks, lstrip_blocks, Python string methods,
//! `raise_exception`, `strftime_now`, `bos_token`/`eos_token`), or, for files without one,
//! the architecture's own format as llama.cpp's built-in templates write it.

use super::Tokenizer;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Built-in formats, by the names llama.cpp gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builtin {
    ChatMl,
    Gemma,
}

impl Builtin {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "chatml" => Some(Self::ChatMl),
            "gemma" => Some(Self::Gemma),
            _ => None,
        }
    }
}

/// Render a conversation as the model expects it.
///
/// The template is `template_override` if given (a built-in name, `"chatml"` or `"gemma"`, or
/// Jinja source), else the file's `tokenizer.chat_template`, else the format of `arch`:
/// gemma's turns for `gemma*` architectures, ChatML for anything else. The built-in formats
/// write no BOS text: BOS comes from tokenizing with `add_special`, as in llama.cpp; likewise a
/// Jinja template's leading `bos_token` (trailing `eos_token`) text is dropped when the model
/// adds BOS (EOS) itself, so `tok.encode(&text, true, true)` never doubles them.
/// Errors (syntax, `raise_exception`) are [`Error::Template`].
pub fn apply_chat_template(
    tok: &Tokenizer,
    arch: &str,
    template_override: Option<&str>,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    let source = template_override.or_else(|| tok.chat_template());
    if let Some(b) = source.and_then(|s| Builtin::from_name(s.trim())) {
        return Ok(render_builtin(b, messages, add_generation_prompt));
    }
    match source {
        Some(src) => render_jinja(tok, src, messages, add_generation_prompt),
        None => {
            let b = if arch.starts_with("gemma") {
                Builtin::Gemma
            } else {
                Builtin::ChatMl
            };
            Ok(render_builtin(b, messages, add_generation_prompt))
        }
    }
}

/// llama.cpp's `trim`: ASCII whitespace off both ends.
fn trim(s: &str) -> &str {
    s.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'))
}

fn render_builtin(b: Builtin, messages: &[ChatMessage], add_ass: bool) -> String {
    let mut out = String::new();
    match b {
        Builtin::ChatMl => {
            for m in messages {
                out.push_str("<|im_start|>");
                out.push_str(&m.role);
                out.push('\n');
                out.push_str(&m.content);
                out.push_str("<|im_end|>\n");
            }
            if add_ass {
                out.push_str("<|im_start|>assistant\n");
            }
        }
        Builtin::Gemma => {
            // llama.cpp's LLM_CHAT_TEMPLATE_GEMMA: no system turn, the system text goes in front
            // of the next user turn; "assistant" is "model".
            let mut system = String::new();
            for m in messages {
                if m.role == "system" {
                    system.push_str(trim(&m.content));
                    continue;
                }
                let role = if m.role == "assistant" {
                    "model"
                } else {
                    m.role.as_str()
                };
                out.push_str("<start_of_turn>");
                out.push_str(role);
                out.push('\n');
                if !system.is_empty() && role != "model" {
                    out.push_str(&system);
                    out.push_str("\n\n");
                    system.clear();
                }
                out.push_str(trim(&m.content));
                out.push_str("<end_of_turn>\n");
            }
            if add_ass {
                out.push_str("<start_of_turn>model\n");
            }
        }
    }
    out
}

fn raise_exception(msg: String) -> std::result::Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        msg,
    ))
}

fn template_error(e: minijinja::Error) -> Error {
    // The message of raise_exception is the error's detail; keep the chain readable.
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    Error::Template(msg)
}

/// Render Jinja template source as Hugging Face's `apply_chat_template` does.
fn render_jinja(
    tok: &Tokenizer,
    src: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_template("chat", src).map_err(template_error)?;
    let tmpl = env.get_template("chat").map_err(template_error)?;
    let special = |id: Option<u32>| id.map(|i| tok.token_str(i).to_string()).unwrap_or_default();
    // Today's date, as llama.cpp's chat code hands it to every template (`date_string` for
    // Llama 3.x, `datetime` for firefunction).
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => special(tok.bos()),
        eos_token => special(tok.eos()),
        date_string => strftime_now("%d %b %Y".into()),
        datetime => strftime_now("%b %d %Y".into()),
    };
    let mut out = tmpl.render(ctx).map_err(template_error)?;
    // As llama.cpp's chat code: text that tokenizing with add_special adds again is dropped, so
    // `encode(out, true, true)` gives one BOS (templates write `{{ bos_token }}` themselves).
    if tok.add_bos() {
        let bos = special(tok.bos());
        if !bos.is_empty() && out.starts_with(&bos) {
            out.drain(..bos.len());
        }
    }
    if tok.add_eos() {
        let eos = special(tok.eos());
        if !eos.is_empty() && out.ends_with(&eos) {
            out.truncate(out.len() - eos.len());
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `strftime_now(format)` as HF's chat templates get it (UTC; the common specifiers).
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(&fmt, secs)
}

fn strftime(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let month = MONTHS[(m as usize - 1) % 12];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match it.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_builtin_merges_system() {
        let msgs = [
            ChatMessage::new("system", " Be brief. "),
            ChatMessage::new("user", "Hi\n"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "Bye"),
        ];
        assert_eq!(
            render_builtin(Builtin::Gemma, &msgs, true),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn strftime_formats() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime("%A %-d %B %y %H:%M:%S %%", t),
            "Thursday 29 February 24 13:05:09 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 0), "1970-01-01");
    }

    #[test]
    fn chatml_builtin() {
        let msgs = [ChatMessage::new("user", "Hi")];
        assert_eq!(
            render_builtin(Builtin::ChatMl, &msgs, false),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }
}
