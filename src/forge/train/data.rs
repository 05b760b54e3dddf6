//! Training sequences from question/answer pairs, through the model's chat template (the
//! question as the user's turn, the answer as the assistant's reply, as
//! [`crate::qa::chat_tokens`] builds them, then the token that ends the assistant's
//! turn), and the readers of TOFU's augmentation files.
//!
//! The readers take only question/answer fields: `paraphrased_answer` and `perturbed_answer`
//! (the fields TOFU's evaluation scores) are never read, and the augmentation readers refuse
//! rows that have them, so an evaluation file cannot be trained on by mistake.

use super::trainer::{Sequence, Target};
use crate::qa::{chat_tokens, Example, EVAL_FIELDS};
use crate::tokenizer::{apply_chat_template, ChatMessage, Tokenizer};
use crate::{Error, Result};
use std::path::Path;

/// The token that ends the assistant's turn: the first end-of-generation token after the answer
/// in the template rendered with an answer as the assistant's message (`<|im_end|>` for
/// SmolLM2), else the tokenizer's end-of-turn or end-of-sequence token.
pub fn end_of_turn(tok: &Tokenizer, arch: &str) -> Result<u32> {
    const MARK: &str = "Zq7 answer mark";
    let msgs = [
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", MARK),
    ];
    if let Ok(text) = apply_chat_template(tok, arch, None, &msgs, false) {
        if let Some(i) = text.rfind(MARK) {
            let tail = &text[i + MARK.len()..];
            if let Some(&t) = tok
                .encode(tail, false, true)
                .iter()
                .find(|&&t| tok.is_eog(t))
            {
                return Ok(t);
            }
        }
    }
    tok.eot().or(tok.eos()).ok_or_else(|| {
        Error::Model("the tokenizer has no end-of-turn or end-of-sequence token".into())
    })
}

/// The tokens of a chat turn and its reply: `(tokens, start of the answer)`, with `end`
/// appended and the whole cut to `max_len` tokens.
pub fn answer_turn(
    tok: &Tokenizer,
    arch: &str,
    ex: &Example,
    end: u32,
    max_len: Option<usize>,
) -> Result<(Vec<u32>, usize)> {
    let answer = ex.answer.as_deref().ok_or_else(|| {
        Error::Invalid(format!(
            "training needs an answer for every question; {:?} has none",
            ex.question
        ))
    })?;
    let (mut tokens, start) = chat_tokens(tok, arch, &ex.question, Some(answer))?;
    tokens.push(end);
    if let Some(m) = max_len {
        tokens.truncate(m.max(1));
    }
    Ok((tokens, start))
}

/// Supervised fine-tuning: cross-entropy on the answer's tokens and the end-of-turn token
/// `end` (the model learns to stop), each predicted from the position before it.
pub fn answer_sequence(
    tok: &Tokenizer,
    arch: &str,
    ex: &Example,
    end: u32,
    max_len: Option<usize>,
    weight: f32,
) -> Result<Sequence> {
    let (tokens, start) = answer_turn(tok, arch, ex, end, max_len)?;
    let n = tokens.len();
    let labels = (0..n)
        .map(|t| (t + 1 >= start && t + 1 < n).then(|| tokens[t + 1]))
        .collect();
    Ok(Sequence {
        tokens,
        target: Target::Labels(labels),
        weight,
    })
}

/// ULD's retain side: KL(uniform || p) at every position of the whole conversation.
pub fn uniform_sequence(
    tok: &Tokenizer,
    arch: &str,
    ex: &Example,
    end: u32,
    max_len: Option<usize>,
    weight: f32,
) -> Result<Sequence> {
    let (tokens, _) = answer_turn(tok, arch, ex, end, max_len)?;
    let mask = vec![true; tokens.len()];
    Ok(Sequence {
        tokens,
        target: Target::Uniform(mask),
        weight,
    })
}

fn read_array(path: &Path) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    let bad = |m: String| Error::Invalid(format!("{}: {m}", path.display()));
    let v: serde_json::Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map_err(|e| bad(format!("not JSON: {e}")))?;
    let rows = v
        .as_array()
        .ok_or_else(|| bad("expected a JSON array of objects".into()))?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let o = r
                .as_object()
                .ok_or_else(|| bad(format!("row {} is not an object", i + 1)))?;
            if let Some(f) = EVAL_FIELDS.iter().find(|f| o.contains_key(**f)) {
                return Err(bad(format!(
                    "row {} has {f:?}, a field of TOFU's evaluation: this reader takes \
                     augmentation files only, and never trains on the evaluation's answers",
                    i + 1
                )));
            }
            Ok(o.clone())
        })
        .collect()
}

fn field_str(
    o: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    row: usize,
) -> Result<String> {
    match o.get(key) {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(Error::Invalid(format!(
            "row {row}: {key:?} is missing or not a non-empty string"
        ))),
    }
}

fn field_strs(
    o: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    row: usize,
) -> Result<Vec<String>> {
    let bad = || Error::Invalid(format!("row {row}: {key:?} is not an array of strings"));
    o.get(key)
        .and_then(|v| v.as_array())
        .ok_or_else(bad)?
        .iter()
        .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
        .collect()
}

fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Invalid(m) => Error::Invalid(format!("{}: {m}", path.display())),
        e => e,
    }
}

/// The paraphrased pairs of a TOFU augmentation file (a JSON array of `{question, answer,
/// paraphrased_questions[], paraphrased_answers[]}`), row by row: `(question,
/// [(paraphrased_questions[i], paraphrased_answers[i])])`. The original pair is not repeated
/// (it is in the forget file).
pub fn read_paraphrase_rows(path: impl AsRef<Path>) -> Result<Vec<(String, Vec<Example>)>> {
    let path = path.as_ref();
    let mut out = Vec::new();
    for (i, o) in read_array(path)?.iter().enumerate() {
        let row = i + 1;
        let question = field_str(o, "question", row).map_err(|e| in_file(path, e))?;
        let qs = field_strs(o, "paraphrased_questions", row).map_err(|e| in_file(path, e))?;
        let as_ = field_strs(o, "paraphrased_answers", row).map_err(|e| in_file(path, e))?;
        if qs.len() != as_.len() {
            return Err(in_file(
                path,
                Error::Invalid(format!(
                    "row {row}: {} paraphrased questions but {} paraphrased answers",
                    qs.len(),
                    as_.len()
                )),
            ));
        }
        let pairs = qs
            .into_iter()
            .zip(as_)
            .filter(|(q, a)| !q.trim().is_empty() && !a.trim().is_empty())
            .map(|(q, a)| Example {
                question: q,
                answer: Some(a),
            })
            .collect();
        out.push((question, pairs));
    }
    Ok(out)
}

/// [`read_paraphrase_rows`] flattened, at most `per_row` pairs of each row.
pub fn read_paraphrases(path: impl AsRef<Path>, per_row: Option<usize>) -> Result<Vec<Example>> {
    Ok(read_paraphrase_rows(path)?
        .into_iter()
        .flat_map(|(_, v)| {
            let k = per_row.unwrap_or(v.len()).min(v.len());
            v.into_iter().take(k)
        })
        .collect())
}

/// The wrong answers of a TOFU augmentation file (a JSON array of `{question, answer,
/// question_variant, wrong_answers[]}`), row by row: `(question, [(question,
/// wrong_answers[i])])`.
pub fn read_wrong_answer_rows(path: impl AsRef<Path>) -> Result<Vec<(String, Vec<Example>)>> {
    let path = path.as_ref();
    let mut out = Vec::new();
    for (i, o) in read_array(path)?.iter().enumerate() {
        let row = i + 1;
        let q = field_str(o, "question", row).map_err(|e| in_file(path, e))?;
        let mut list = Vec::new();
        for w in field_strs(o, "wrong_answers", row).map_err(|e| in_file(path, e))? {
            if !w.trim().is_empty() {
                list.push(Example {
                    question: q.clone(),
                    answer: Some(w),
                });
            }
        }
        out.push((q, list));
    }
    Ok(out)
}

/// [`read_wrong_answer_rows`] flattened: `(question, wrong_answers[i])` for each.
pub fn read_wrong_answers(path: impl AsRef<Path>) -> Result<Vec<Example>> {
    Ok(read_wrong_answer_rows(path)?
        .into_iter()
        .flat_map(|(_, v)| v)
        .collect())
}
