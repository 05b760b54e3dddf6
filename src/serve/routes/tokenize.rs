//! `POST /tokenize`, `/detokenize` and `/apply-template`.

use super::super::error::{ApiError, ApiResult};
use super::super::request::bad;
use super::super::AppState;
use super::chat::{messages, render};
use super::{off_workers, read_body};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// `POST /tokenize`: `content`, `add_special` (default false), `parse_special` (default
/// true), `with_pieces` (default false).
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    off_workers(move || tokenize_body(&state, body))
        .await
        .map(Json)
}

fn tokenize_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let body = read_body(body, state.cfg.body_limit)?;
    let content = body
        .str("content")?
        .ok_or_else(|| bad("content", "a string"))?;
    let add_special = body.bool("add_special")?.unwrap_or(false);
    let parse_special = body.bool("parse_special")?.unwrap_or(true);
    let ids = state.tok.encode(content, add_special, parse_special);
    if !body.bool("with_pieces")?.unwrap_or(false) {
        return Ok(json!({ "tokens": ids }));
    }
    let tokens: Vec<Value> = ids
        .iter()
        .map(|&id| {
            let bytes = state.tok.token_to_piece(id, true);
            // A piece that is not whole UTF-8 is given as its bytes, as llama-server does.
            let piece = match String::from_utf8(bytes) {
                Ok(s) => json!(s),
                Err(e) => json!(e.into_bytes()),
            };
            json!({ "id": id, "piece": piece })
        })
        .collect();
    Ok(json!({ "tokens": tokens }))
}

/// `POST /detokenize`: `tokens` (ids) to `content`.
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    off_workers(move || detokenize_body(&state, body))
        .await
        .map(Json)
}

fn detokenize_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let body = read_body(body, state.cfg.body_limit)?;
    let n = state.tok.n_vocab() as u64;
    let ids = match body.get("tokens") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v.as_u64() {
                Some(t) if t < n => Ok(t as u32),
                _ => Err(ApiError::InvalidRequest(format!(
                    "'tokens' holds {v}, which is not a token id (the vocabulary has {n})"
                ))),
            })
            .collect::<ApiResult<Vec<u32>>>()?,
        Some(_) => return Err(bad("tokens", "an array of token ids")),
    };
    Ok(json!({ "content": state.tok.decode(&ids, true) }))
}

/// `POST /apply-template`: `messages` rendered through the chat template, as `prompt`
/// (`add_generation_prompt`, default true, as in llama-server).
pub async fn apply_template(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    off_workers(move || {
        let body = read_body(body, state.cfg.body_limit)?;
        let msgs = messages(&body)?;
        let add = body.bool("add_generation_prompt")?.unwrap_or(true);
        Ok(Json(json!({ "prompt": render(&state, &msgs, add)? })))
    })
    .await
}
