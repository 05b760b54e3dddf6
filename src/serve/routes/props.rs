//! `GET /props`, `GET /slots` and `GET /metrics`: what the server is and what it is doing.

use super::super::error::{ApiError, ApiResult};
use super::super::stats::SlotView;
use super::super::AppState;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::fmt::Write;
use std::sync::Arc;

/// A slot in llama-server's shape. As there, `params` (the server's defaults) and
/// `next_token` are given only for a slot that has run a task (`always`: for `/props`'s
/// default settings, always); an idle slot's `next_token` has no budget left (`n_remain`
/// -1) and nothing decoded.
fn slot_json(state: &AppState, s: &SlotView, always: bool) -> Value {
    let mut v = json!({
        "id": s.id,
        "id_task": s.id_task,
        "n_ctx": s.n_ctx,
        "speculative": false,
        "is_processing": s.is_processing,
        "model": s.model,
        "n_cached": s.n_cached,
    });
    if always || s.model.is_some() {
        v["params"] = json!({
            "n_predict": state.cfg.n_predict,
            "temperature": state.cfg.temperature,
            "seed": state.cfg.seed,
        });
        v["next_token"] = json!([{
            "has_next_token": s.is_processing,
            "has_new_line": false,
            "n_remain": if s.is_processing { state.cfg.n_predict } else { -1 },
            "n_decoded": s.n_decoded,
        }]);
    }
    v
}

/// `GET /props`: the default generation settings, the number of slots, the model file, the
/// chat template and the build.
pub async fn props(State(state): State<Arc<AppState>>) -> Json<Value> {
    let template = super::chat::template_source(&state);
    let first = state.engine.stats.slots().into_iter().next();
    let default_settings = first
        .map(|s| slot_json(&state, &s, true))
        .unwrap_or_else(|| json!({}));
    let token = |id: Option<u32>| id.map(|t| state.tok.decode(&[t], true)).unwrap_or_default();
    Json(json!({
        "default_generation_settings": default_settings,
        "total_slots": state.cfg.n_parallel,
        "model_path": state.model_path.display().to_string(),
        "chat_template": template,
        "bos_token": token(state.tok.bos()),
        "eos_token": token(state.tok.eos()),
        "modalities": { "vision": false, "audio": false },
        "endpoint_slots": state.cfg.slots,
        "endpoint_metrics": state.cfg.metrics,
        "build_info": super::FINGERPRINT,
    }))
}

/// `GET /slots`: each slot's state; 501 with `--no-slots`.
pub async fn slots(State(state): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    if !state.cfg.slots {
        return Err(ApiError::NotSupported(
            "This server does not support slots endpoint. Start it with `--slots`".into(),
        ));
    }
    let slots: Vec<Value> = state
        .engine
        .stats
        .slots()
        .iter()
        .map(|s| slot_json(&state, s, false))
        .collect();
    Ok(Json(Value::Array(slots)))
}

/// `GET /metrics`: Prometheus text with llama-server's metric names; 501 without
/// `--metrics`.
pub async fn metrics(State(state): State<Arc<AppState>>) -> ApiResult<Response> {
    if !state.cfg.metrics {
        return Err(ApiError::NotSupported(
            "This server does not support metrics endpoint. Start it with `--metrics`".into(),
        ));
    }
    let c = state.engine.stats.counters();
    let processing = state
        .engine
        .stats
        .slots()
        .iter()
        .filter(|s| s.is_processing)
        .count();
    let rate = |n: u64, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let busy_per_decode = if c.n_decode_total > 0 {
        c.n_busy_slots_total as f64 / c.n_decode_total as f64
    } else {
        0.0
    };
    let metrics: [(&str, &str, &str, f64); 12] = [
        (
            "prompt_tokens_cached_total",
            "counter",
            "Number of prompt tokens taken from the cache.",
            c.prompt_tokens_cached_total as f64,
        ),
        (
            "prompt_tokens_total",
            "counter",
            "Number of prompt tokens processed.",
            c.prompt_tokens_total as f64,
        ),
        (
            "prompt_seconds_total",
            "counter",
            "Prompt process time",
            c.prompt_seconds_total,
        ),
        (
            "tokens_predicted_total",
            "counter",
            "Number of generation tokens processed.",
            c.tokens_predicted_total as f64,
        ),
        (
            "tokens_predicted_seconds_total",
            "counter",
            "Predict process time",
            c.tokens_predicted_seconds_total,
        ),
        (
            "n_decode_total",
            "counter",
            "Total number of forward passes.",
            c.n_decode_total as f64,
        ),
        (
            "n_tokens_max",
            "counter",
            "Largest observed n_tokens.",
            c.n_tokens_max as f64,
        ),
        (
            "n_busy_slots_per_decode",
            "counter",
            "Average number of busy slots per forward pass.",
            busy_per_decode,
        ),
        (
            "prompt_tokens_seconds",
            "gauge",
            "Average prompt throughput in tokens/s.",
            rate(c.prompt_tokens_total, c.prompt_seconds_total),
        ),
        (
            "predicted_tokens_seconds",
            "gauge",
            "Average generation throughput in tokens/s.",
            rate(c.tokens_predicted_total, c.tokens_predicted_seconds_total),
        ),
        (
            "requests_processing",
            "gauge",
            "Number of requests processing.",
            processing as f64,
        ),
        (
            "requests_deferred",
            "gauge",
            "Number of requests deferred.",
            c.requests_deferred as f64,
        ),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in metrics {
        let _ = writeln!(text, "# HELP llamacpp:{name} {help}");
        let _ = writeln!(text, "# TYPE llamacpp:{name} {kind}");
        let _ = writeln!(text, "llamacpp:{name} {value}");
    }
    // lethe's own, under its own prefix.
    let own = [
        (
            "prompt_tokens_run_total",
            "Prompt tokens run, chunk by chunk (including prompts whose client left).",
            c.prompt_tokens_run_total,
        ),
        (
            "score_continuations_total",
            "Continuations scored by /score.",
            c.score_continuations_total,
        ),
    ];
    for (name, help, value) in own {
        let _ = writeln!(text, "# HELP lethe:{name} {help}");
        let _ = writeln!(text, "# TYPE lethe:{name} counter");
        let _ = writeln!(text, "lethe:{name} {value}");
    }
    // llama-server sends when the process started in this header.
    let start = state.created.to_string();
    Ok((
        [
            (
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4".to_string(),
            ),
            (
                header::HeaderName::from_static("process-start-time-unix"),
                start,
            ),
        ],
        text,
    )
        .into_response())
}
