//! Question/answer rows, the data of forgetting and of its evaluation: reading them (a JSON
//! array of objects or JSON lines), their tokens as a chat turn, and an answer's
//! teacher-forced likelihood under a model.

use crate::model::{Model, State};
use crate::tokenizer::{apply_chat_template, ChatMessage, Tokenizer};
use crate::{Error, Result};
use std::path::Path;

/// The fields of TOFU's evaluation rows that no training or calibration may read.
pub const EVAL_FIELDS: [&str; 2] = ["paraphrased_answer", "perturbed_answer"];

/// One row of a text file: a question with its answer, or a lone text (the user's turn).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub question: String,
    pub answer: Option<String>,
}

/// The text fields a row may have, first match wins: `question` (+ `answer`), `prompt`
/// (+ `response`), `text`.
const FIELDS: [(&str, Option<&str>); 3] = [
    ("question", Some("answer")),
    ("prompt", Some("response")),
    ("text", None),
];

/// Read the rows of a JSON array of objects or of a JSON-lines file (one object a line).
pub fn read_examples(path: impl AsRef<Path>) -> Result<Vec<Example>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    parse_examples(&text).map_err(|e| match e {
        Error::Invalid(m) => Error::Invalid(format!("{}: {m}", path.display())),
        e => e,
    })
}

/// [`read_examples`] for training data: a row with one of TOFU's evaluation fields
/// ([`EVAL_FIELDS`]) is refused, naming the row, so an evaluation file is never trained on.
pub fn read_training_examples(path: impl AsRef<Path>) -> Result<Vec<Example>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    let in_file = |e: Error| match e {
        Error::Invalid(m) => Error::Invalid(format!("{}: {m}", path.display())),
        e => e,
    };
    let rows = parse_rows(&text).map_err(in_file)?;
    for (n, v) in &rows {
        if let Some(f) = EVAL_FIELDS.iter().find(|f| v.get(**f).is_some()) {
            return Err(in_file(Error::Invalid(format!(
                "row {n} has {f:?}, a field of TOFU's evaluation: training never reads the \
                 evaluation's answers (give question/answer rows of training data)"
            ))));
        }
    }
    rows.iter()
        .map(|(n, v)| example(*n, v))
        .collect::<Result<Vec<_>>>()
        .map_err(in_file)
}

/// The rows of `text`: a JSON array of objects, or JSON lines.
pub fn parse_examples(text: &str) -> Result<Vec<Example>> {
    let rows = parse_rows(text)?;
    rows.iter().map(|(n, v)| example(*n, v)).collect()
}

/// The rows of `text` with their 1-based numbers.
fn parse_rows(text: &str) -> Result<Vec<(usize, serde_json::Value)>> {
    let body = text.trim_start_matches('\u{feff}').trim();
    if body.is_empty() {
        return Err(Error::Invalid("the file is empty".into()));
    }
    let rows: Vec<(usize, serde_json::Value)> = if body.starts_with('[') {
        let v: serde_json::Value = serde_json::from_str(body)
            .map_err(|e| Error::Invalid(format!("not a valid JSON array: {e}")))?;
        let arr = v.as_array().cloned().unwrap_or_default();
        arr.into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, v))
            .collect()
    } else {
        let mut rows = Vec::new();
        for (i, line) in body.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(line).map_err(|e| {
                Error::Invalid(format!(
                    "line {}: not JSON ({e}); expected a JSON array of objects or one JSON \
                     object a line",
                    i + 1
                ))
            })?;
            rows.push((i + 1, v));
        }
        rows
    };
    if rows.is_empty() {
        return Err(Error::Invalid("the file holds no rows".into()));
    }
    Ok(rows)
}

/// One row as an [`Example`]; `n` (1-based) names it in messages.
fn example(n: usize, v: &serde_json::Value) -> Result<Example> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::Invalid(format!("row {n} is not a JSON object")))?;
    let string = |key: &str| -> Result<Option<String>> {
        match obj.get(key) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
            Some(serde_json::Value::String(_)) => {
                Err(Error::Invalid(format!("row {n}: {key:?} is empty")))
            }
            Some(_) => Err(Error::Invalid(format!("row {n}: {key:?} is not a string"))),
        }
    };
    for (q, a) in FIELDS {
        if let Some(question) = string(q)? {
            let answer = match a {
                Some(a) => string(a)?,
                None => None,
            };
            return Ok(Example { question, answer });
        }
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    Err(Error::Invalid(format!(
        "row {n} has none of the fields question/answer, prompt/response or text (it has: {})",
        keys.join(", ")
    )))
}

/// The tokens of `question` as the user's turn of a chat, then those of `answer` (if any) as
/// the assistant's reply, and where the reply starts (`prompt.len()`).
pub fn chat_tokens(
    tok: &Tokenizer,
    arch: &str,
    question: &str,
    answer: Option<&str>,
) -> Result<(Vec<u32>, usize)> {
    let msgs = [ChatMessage::new("user", question)];
    let text = apply_chat_template(tok, arch, None, &msgs, true)?;
    let mut tokens = tok.encode(&text, true, true);
    let start = tokens.len();
    if let Some(a) = answer {
        tokens.extend(tok.encode(a, false, false));
    }
    Ok((tokens, start))
}

/// The mean negative log-likelihood per token of `answer` given `question` (teacher-forced,
/// the question as the user's turn of the chat template, the answer as the assistant's reply;
/// the turn's end token is not scored), with the patches attached to `st`:
///
/// ```text
/// NLL = -(1/|a|) sum_j log p(a_j | prompt, a_<j)
/// ```
pub fn answer_nll(
    model: &Model,
    tok: &Tokenizer,
    st: &mut State,
    question: &str,
    answer: &str,
) -> Result<f64> {
    let (tokens, start) = chat_tokens(tok, model.cfg.arch.name(), question, Some(answer))?;
    if start >= tokens.len() {
        return Err(Error::Invalid(format!(
            "the answer {answer:?} has no tokens"
        )));
    }
    let v = model.cfg.n_vocab;
    let mut logits = Vec::with_capacity(tokens.len() * v);
    st.reset();
    model.forward(st, &tokens, Some(&mut logits))?; // [n_tok, n_vocab]
    let nll: f64 = (start..tokens.len())
        .map(|p| -log_softmax_at(&logits[(p - 1) * v..p * v], tokens[p] as usize))
        .sum();
    Ok(nll / (tokens.len() - start) as f64)
}

/// `log softmax(z)[i]`, in f64.
fn log_softmax_at(z: &[f32], i: usize) -> f64 {
    let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = z.iter().map(|&x| (x as f64 - max).exp()).sum();
    z[i] as f64 - max - sum.ln()
}

/// TOFU's probability of the answers: `mean_i exp(-NLL_i)` over `items` (each must have an
/// answer), with the patches attached to `st`.
pub fn answer_prob(
    model: &Model,
    tok: &Tokenizer,
    st: &mut State,
    items: &[Example],
) -> Result<f64> {
    if items.is_empty() {
        return Err(Error::Invalid("no items to score".into()));
    }
    let mut sum = 0.0;
    for (i, ex) in items.iter().enumerate() {
        let a = ex
            .answer
            .as_deref()
            .ok_or_else(|| Error::Invalid(format!("item {} has no answer to score", i + 1)))?;
        sum += (-answer_nll(model, tok, st, &ex.question, a)?).exp();
    }
    Ok(sum / items.len() as f64)
}

/// Tokens `answer_nll` needs the context to hold for `items`.
pub fn n_ctx_for(tok: &Tokenizer, arch: &str, items: &[Example]) -> Result<usize> {
    let mut n = 1;
    for ex in items {
        let (t, _) = chat_tokens(tok, arch, &ex.question, ex.answer.as_deref())?;
        n = n.max(t.len());
    }
    Ok(n)
}
