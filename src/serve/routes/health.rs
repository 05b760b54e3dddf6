//! `GET /health` and the model list.

use super::super::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// `GET /health`, `/v1/health`: routed here once the model is loaded (until then the
/// server answers 503 `Loading model`).
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /models`, `/v1/models`: the base (unless `--lock`) and every profile.
pub async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
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
                "meta": {
                    "n_ctx": state.cfg.n_ctx,
                    "n_vocab": state.tok.n_vocab(),
                    "profile": profile,
                    "unlearn": state.audit[i],
                },
            })
        })
        .collect();
    Json(json!({ "object": "list", "data": data }))
}
