//! `POST /score`: lethe's one extension route. llama-server returns no log-probabilities for
//! given text, so an audit of a deployed profile could not score TOFU's answers; this route
//! does, under the model's scoring use (a forgotten profile's combined distribution, never
//! the raw target's).
//!
//! Request: `model`, `prompt` (text, tokenized with the special tokens parsed) or `messages`
//! (through the chat template, ready for the assistant's reply), `continuation` (a string or
//! an array of strings, each tokenized after the prompt as it stands), `stats` (default
//! false: each token's mean and deviation of the log-probability at its position, for
//! Min-K%++), and the `lora` / `unlearn` overrides of the generation routes.
//!
//! Response: `{model, object: "score", prompt_tokens, results: [{index, continuation,
//! tokens: [{id, token, logprob[, mu, sigma]}], logprob, n_tokens}], generation_settings}`.

use super::super::error::{ApiError, ApiResult};
use super::super::request::bad;
use super::super::AppState;
use super::chat::chat_prompt;
use super::{off_workers, read_body};
use crate::serve::engine::Setting;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

pub async fn score(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let st = state.clone();
    let (model, setting, audit, prompt, texts, conts, stats) =
        off_workers(move || parse(&st, body)).await?;
    let n_prompt = prompt.len();
    let scored = state
        .engine
        .score(setting, prompt, conts.clone(), stats)
        .await?;
    let results: Vec<Value> = scored
        .iter()
        .zip(&conts)
        .zip(&texts)
        .enumerate()
        .map(|(i, ((s, ids), text))| {
            let tokens: Vec<Value> = ids
                .iter()
                .enumerate()
                .map(|(j, &id)| {
                    let piece =
                        String::from_utf8_lossy(&state.tok.token_to_piece(id, true)).into_owned();
                    let mut t = json!({ "id": id, "token": piece, "logprob": s.logprobs[j] });
                    if let Some(st) = s.stats.get(j) {
                        t["mu"] = json!(st.mu);
                        t["sigma"] = json!(st.sigma);
                    }
                    t
                })
                .collect();
            json!({
                "index": i,
                "continuation": text,
                "tokens": tokens,
                "logprob": s.logprobs.iter().sum::<f64>(),
                "n_tokens": ids.len(),
            })
        })
        .collect();
    Ok(Json(json!({
        "model": state.models[model].0,
        "object": "score",
        "prompt_tokens": n_prompt,
        "results": results,
        "generation_settings": audit,
    })))
}

/// What a `/score` request asks: model, setting, audit, prompt, continuations (texts and
/// tokens) and whether to add the per-token statistics.
type Parsed = (
    usize,
    Setting,
    Value,
    Vec<u32>,
    Vec<String>,
    Vec<Vec<u32>>,
    bool,
);

/// Read and tokenize a `/score` body (run off the HTTP workers).
fn parse(state: &AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Parsed> {
    let body = read_body(body, state.cfg.body_limit)?;
    let model = state.resolve_model(body.str("model")?)?;
    let (setting, audit) = super::lora::setting(state, &body, model)?;
    let prompt = match (body.get("prompt"), body.get("messages")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidRequest(
                "give 'prompt' or 'messages', not both".into(),
            ))
        }
        (Some(_), None) => {
            let p = body
                .str("prompt")?
                .ok_or_else(|| bad("prompt", "a string"))?;
            state.tok.encode(p, true, true)
        }
        (None, Some(_)) => chat_prompt(state, &body)?.1,
        (None, None) => {
            return Err(ApiError::InvalidRequest(
                "'prompt' or 'messages' is required".into(),
            ))
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::InvalidRequest("the prompt is empty".into()));
    }
    let texts: Vec<String> = match body.get("continuation") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if !a.is_empty() => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad("continuation", "a string or an array of strings"))
            })
            .collect::<ApiResult<_>>()?,
        _ => {
            return Err(bad(
                "continuation",
                "a string or a non-empty array of strings",
            ))
        }
    };
    let conts: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| state.tok.encode(t, false, false))
        .collect();
    if let Some(i) = conts.iter().position(Vec::is_empty) {
        return Err(ApiError::InvalidRequest(format!(
            "continuation {i} has no tokens"
        )));
    }
    let max = state.cfg.score_max_conts;
    if conts.len() > max {
        return Err(ApiError::InvalidRequest(format!(
            "{} continuations in one request; this server scores at most {max} (--score-max-continuations)",
            conts.len()
        )));
    }
    let n_tokens: usize = conts.iter().map(Vec::len).sum();
    let max = state.cfg.score_max_tokens;
    if n_tokens > max {
        return Err(ApiError::InvalidRequest(format!(
            "{n_tokens} continuation tokens in one request; this server scores at most {max} (--score-max-tokens)"
        )));
    }
    let stats = body.bool("stats")?.unwrap_or(false);
    Ok((model, setting, audit, prompt, texts, conts, stats))
}
