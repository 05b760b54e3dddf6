//! `GET /health` and the model list.

use super::super::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// `GET /health`, `/v1/health`: routed here once the model is loaded (until then the
/// server answers 503 `Loading model`).
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /models`, `/v1/models`: the base (unless `--lock`) and every profile. The route is
/// public as in llama-server, but a server with `--api-key` or `--lock` shows what each model
/// is made of (profile, files and their paths and hashes, alpha and filter: a file name can
/// say what was forgotten) only to a request with a valid key; others get the ids.
pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Json<Value> {
    let private = !state.cfg.api_keys.is_empty() || state.cfg.lock;
    let details = !private || state.has_key(&headers);
    let data: Vec<Value> = state
        .models
        .iter()
        .enumerate()
        .filter(|&(i, _)| state.servable(i))
        .map(|(i, (id, profile))| {
            json!({
                "id": id,
                "object": "model",
                "created": state.created,
                "owned_by": "lethe",
                "meta": if details {
                    json!({
                        "n_ctx": state.cfg.n_ctx,
                        "n_vocab": state.tok.n_vocab(),
                        "profile": profile,
                        "unlearn": state.audit[i],
                    })
                } else {
                    json!({ "n_ctx": state.cfg.n_ctx, "n_vocab": state.tok.n_vocab() })
                },
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}
