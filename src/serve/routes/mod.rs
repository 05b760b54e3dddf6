//! The routes, one file per group, and what they share: reading the body, waiting for a
//! generation, streaming it as server-sent events, `timings` and `usage`.

pub mod chat;
pub mod completion;
pub mod health;
pub mod lora;
pub mod props;
pub mod score;
pub mod tokenize;
pub mod webui;

use super::engine::Event;
use super::error::{ApiError, ApiResult};
use super::request::Body;
use super::AppState;
use crate::generate::{FinishReason, Generation, TokenProbs};
use crate::tokenizer::Tokenizer;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Every route of the server.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health", get(health::health))
        .route("/v1/health", get(health::health))
        .route("/models", get(health::models))
        .route("/v1/models", get(health::models))
        .route("/v1/chat/completions", post(chat::chat))
        .route("/chat/completions/input_tokens", post(chat::input_tokens))
        .route(
            "/v1/chat/completions/input_tokens",
            post(chat::input_tokens),
        )
        .route("/chat/completions", post(chat::chat))
        .route("/v1/completions", post(completion::oai_completion))
        .route("/completion", post(completion::completion))
        .route("/completions", post(completion::completion))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/apply-template", post(tokenize::apply_template))
        .route("/props", get(props::props))
        .route("/slots", get(props::slots))
        .route("/metrics", get(props::metrics))
        .route("/lora-adapters", get(lora::list).post(lora::set))
        .route("/score", post(score::score))
}

/// Run a request's CPU work (parsing a large body, rendering the chat template, tokenizing:
/// seconds for a body of megabytes) on tokio's blocking pool, at most two at a time, so that
/// the HTTP workers keep answering every other request (`/health` among them).
pub async fn off_workers<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    static HEAVY: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let _permit = HEAVY
        .acquire()
        .await
        .map_err(|_| ApiError::Unavailable("the server is stopping".into()))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Server(format!("a request's work failed: {e}")))?
}

/// The request body as a JSON object; a body over the limit is a 413.
pub fn read_body(body: Result<Bytes, BytesRejection>, limit: usize) -> ApiResult<Body> {
    match body {
        Ok(b) => Body::parse(&b),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::TooLarge(limit)),
        Err(e) => Err(ApiError::InvalidRequest(e.body_text())),
    }
}

/// The request body as any JSON value; a body over the limit is a 413.
pub fn read_body_json(body: Result<Bytes, BytesRejection>, limit: usize) -> ApiResult<Value> {
    match body {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON: {e}"))),
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::TooLarge(limit)),
        Err(e) => Err(ApiError::InvalidRequest(e.body_text())),
    }
}

/// Tokens of a prompt, checked against the context before anything is queued.
pub fn check_context(state: &AppState, prompt: &[u32]) -> ApiResult<()> {
    if prompt.is_empty() {
        return Err(ApiError::InvalidRequest("the prompt is empty".into()));
    }
    if prompt.len() >= state.cfg.n_ctx {
        return Err(ApiError::ExceedContext {
            n_prompt_tokens: prompt.len(),
            n_ctx: state.cfg.n_ctx,
        });
    }
    Ok(())
}

/// Wait for the whole generation of a job.
pub async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> ApiResult<(usize, Generation)> {
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(..) => {}
            Event::Done { slot, gen } => return Ok((slot, gen)),
            Event::Error(e) => return Err(e),
        }
    }
    Err(ApiError::Server(
        "the generation ended without a result".into(),
    ))
}

/// A server-sent event stream: `first` events, then what `on_event` makes of each job
/// event; it ends when `on_event` says so. A client that goes away drops the job, which
/// frees its slot.
pub fn stream(
    mut rx: mpsc::UnboundedReceiver<Event>,
    first: Vec<Bytes>,
    mut on_event: impl FnMut(Event) -> (Vec<Bytes>, bool) + Send + 'static,
) -> Response {
    let (tx, body) = mpsc::channel::<Result<Bytes, Infallible>>(32);
    tokio::spawn(async move {
        for b in first {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = tx.closed() => return,
            };
            let Some(ev) = ev else { return };
            let (out, end) = on_event(ev);
            for b in out {
                if tx.send(Ok(b)).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(body));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| Response::new(axum::body::Body::empty()))
}

/// llama-server's `timings` object.
pub fn timings(g: &Generation) -> Value {
    let prompt_n = g.n_prompt - g.n_cached;
    let predicted_n = g.tokens.len();
    let per_token = |ms: f64, n: usize| if n > 0 { ms / n as f64 } else { 0.0 };
    let per_second = |ms: f64, n: usize| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    json!({
        "cache_n": g.n_cached,
        "prompt_n": prompt_n,
        "prompt_ms": g.prompt_ms,
        "prompt_per_token_ms": per_token(g.prompt_ms, prompt_n),
        "prompt_per_second": per_second(g.prompt_ms, prompt_n),
        "predicted_n": predicted_n,
        "predicted_ms": g.gen_ms,
        "predicted_per_token_ms": per_token(g.gen_ms, predicted_n),
        "predicted_per_second": per_second(g.gen_ms, predicted_n),
    })
}

/// The OpenAI `usage` object.
pub fn usage(g: &Generation) -> Value {
    json!({
        "completion_tokens": g.tokens.len(),
        "prompt_tokens": g.n_prompt,
        "total_tokens": g.n_prompt + g.tokens.len(),
    })
}

/// The OpenAI `finish_reason` (a cancelled job has no client left to read it).
pub fn finish_reason(g: &Generation) -> &'static str {
    match g.finish {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `system_fingerprint` of the OpenAI responses.
/// llama-server's is `b<build>-<commit>`, and clients check the `b`.
pub const FINGERPRINT: &str = concat!("b", env!("CARGO_PKG_VERSION"), "-lethe");

/// A token's text and its bytes (a piece need not be whole UTF-8).
fn piece(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_to_piece(id, true);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// OpenAI's `logprobs.content`: per token `{id, token, logprob, bytes, top_logprobs}`.
pub fn oai_logprobs(tok: &Tokenizer, probs: &[TokenProbs]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let (token, bytes) = piece(tok, id);
        json!({ "id": id, "token": token, "logprob": logprob, "bytes": bytes })
    };
    Value::Array(
        probs
            .iter()
            .map(|p| {
                let mut e = entry(p.id, p.logprob);
                e["top_logprobs"] = p.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                e
            })
            .collect(),
    )
}
