//! `GET /lora-adapters` and `POST /lora-adapters`.
//!
//! Ids index every patch of every served model in a stable order: the base's `--lora` and
//! `--control-vector` patches first, then each profile's own patches in file order.

use super::super::error::{ApiError, ApiResult};
use super::super::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// Every patch as `{id, path, scale, model}`, in id order.
pub fn adapters(state: &AppState) -> Vec<Value> {
    let n_cli = state
        .audit
        .first()
        .and_then(|a| a["patches"].as_array())
        .map_or(0, Vec::len);
    let mut out = Vec::new();
    for (i, (id, _)) in state.models.iter().enumerate() {
        let Some(patches) = state.audit[i]["patches"].as_array() else {
            continue;
        };
        // A profile's list starts with the base's patches, listed once under the base.
        let own = if i == 0 {
            &patches[..]
        } else {
            &patches[n_cli.min(patches.len())..]
        };
        for p in own {
            out.push(json!({
                "id": out.len(),
                "path": p["file"],
                "scale": p["scale"],
                "model": id,
            }));
        }
    }
    out
}

/// `GET /lora-adapters`.
pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(Value::Array(adapters(&state)))
}

/// `POST /lora-adapters`: refused under `--lock`; changing scales at run time is not
/// supported yet, and is refused rather than ignored.
pub async fn set(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    if state.cfg.lock {
        return Err(ApiError::Permission(
            "this server is locked: patch scales cannot be changed".into(),
        ));
    }
    Err(ApiError::NotSupported(
        "setting patch scales at run time is not supported yet".into(),
    ))
}
