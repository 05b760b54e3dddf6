//! `GET /lora-adapters` and `POST /lora-adapters`, and the per-request unlearning setting
//! (`lora` scales and the `unlearn` extension).
//!
//! Ids index every patch of every served model in a stable order: the base's `--lora` and
//! `--control-vector` patches first, then each profile's own patches in file order. As in
//! llama-server, a list of `{id, scale}` sets the scales of the ids it names and 0 for the
//! others.

use super::super::engine::{ServedModel, Setting};
use super::super::error::{ApiError, ApiResult};
use super::super::request::bad;
use super::super::AppState;
use super::read_body_json;
use crate::unlearn::TermKind;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use std::sync::{Arc, RwLock};

/// Every patch of every served model, with the default scales, and each model's terms.
pub struct Adapters {
    /// Per id: the patch's file and the model it is listed under.
    list: Vec<(Value, usize)>,
    /// Per served model, the ids of its patches in its own order.
    ids: Vec<Vec<usize>>,
    /// Per served model, its terms: `(takes alpha, weight, filter)`.
    terms: Vec<Vec<(bool, f32, f32)>>,
    /// The default scale of each id.
    scales: RwLock<Vec<f32>>,
}

impl Adapters {
    pub fn new(models: &[ServedModel]) -> Self {
        let n_cli = models.first().map_or(0, |m| m.forgotten.parts.len());
        let mut a = Adapters {
            list: Vec::new(),
            ids: Vec::new(),
            terms: Vec::new(),
            scales: RwLock::new(Vec::new()),
        };
        let mut scales = Vec::new();
        for (i, m) in models.iter().enumerate() {
            let files = m.audit["patches"].as_array().cloned().unwrap_or_default();
            let mut ids = Vec::new();
            for (k, (_, scale)) in m.forgotten.parts.iter().enumerate() {
                if i > 0 && k < n_cli {
                    // The base's own patches, listed once under the base.
                    ids.push(k);
                    continue;
                }
                ids.push(a.list.len());
                let file = files.get(k).map_or(Value::Null, |f| f["file"].clone());
                a.list.push((file, i));
                scales.push(*scale);
            }
            a.ids.push(ids);
            a.terms.push(
                m.forgotten
                    .terms
                    .iter()
                    .map(|t| (t.kind != TermKind::Pair, t.weight, t.filter))
                    .collect(),
            );
        }
        a.scales = RwLock::new(scales);
        a
    }

    fn defaults(&self) -> Vec<f32> {
        self.scales
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A `[{"id", "scale"}]` list: the scales it sets (the others 0), every id checked by
/// `check`.
fn parse_list(
    key: &str,
    v: &Value,
    n: usize,
    check: impl Fn(usize) -> ApiResult<()>,
) -> ApiResult<Vec<f32>> {
    let what = "an array of objects with an integer 'id' and a number 'scale'";
    let list = v.as_array().ok_or_else(|| bad(key, what))?;
    let mut scales = vec![0.0f32; n];
    for e in list {
        let id = e
            .get("id")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(key, what))?;
        let scale = match e.get("scale").and_then(Value::as_f64) {
            Some(s) if s.is_finite() && (s as f32).is_finite() => s as f32,
            _ => {
                return Err(ApiError::InvalidRequest(format!(
                    "'{key}': adapter {id} needs a finite number as 'scale'"
                )))
            }
        };
        if id as usize >= n {
            return Err(ApiError::InvalidRequest(format!(
                "'{key}': there is no adapter {id} (ids go from 0 to {}; see GET /lora-adapters)",
                n as i64 - 1
            )));
        }
        check(id as usize)?;
        scales[id as usize] = scale;
    }
    Ok(scales)
}

/// The setting a request for model `model` runs with (its `lora` and `unlearn` fields over
/// the defaults), and what it is made of for `generation_settings`. Under `--lock` any
/// override is refused with 403.
pub fn setting(
    state: &AppState,
    body: &super::super::request::Body,
    model: usize,
) -> ApiResult<(Setting, Value)> {
    let a = &state.adapters;
    for key in ["lora", "unlearn"] {
        if state.cfg.lock && body.get(key).is_some() {
            return Err(ApiError::Permission(format!(
                "this server is locked: '{key}' overrides are refused"
            )));
        }
    }
    let ids = &a.ids[model];
    let all = match body.get("lora") {
        None => a.defaults(),
        Some(v) => parse_list("lora", v, a.list.len(), |id| {
            if ids.contains(&id) {
                return Ok(());
            }
            Err(ApiError::InvalidRequest(format!(
                "'lora': adapter {id} is a patch of model '{}', not of '{}'",
                state.models[a.list[id].1].0, state.models[model].0
            )))
        })?,
    };
    let scales: Vec<f32> = ids.iter().map(|&id| all[id]).collect();
    let mut terms: Vec<(f32, f32)> = a.terms[model].iter().map(|&(_, w, f)| (w, f)).collect();
    let mut audit = state.audit[model].clone();
    if let Some(u) = body.get("unlearn") {
        let u = u
            .as_object()
            .ok_or_else(|| bad("unlearn", "an object with 'alpha' and/or 'filter'"))?;
        if terms.is_empty() {
            return Err(ApiError::InvalidRequest(format!(
                "'unlearn': model '{}' has no assistants",
                state.models[model].0
            )));
        }
        let num = |k: &str| match u.get(k).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x as f32)),
                _ => Err(bad(&format!("unlearn.{k}"), "a finite number")),
            },
        };
        let alpha = num("alpha")?;
        let filter = num("filter")?;
        // A negative alpha would add the assistant's distribution (what was to be forgotten)
        // instead of taking it away.
        if alpha.is_some_and(|al| al < 0.0) {
            return Err(bad(
                "unlearn.alpha",
                "at least 0 (a negative alpha adds what the assistant remembers)",
            ));
        }
        if filter.is_some_and(|f| !(0.0..1.0).contains(&f)) {
            return Err(bad("unlearn.filter", "in [0, 1)"));
        }
        if let Some(k) = u.keys().find(|k| *k != "alpha" && *k != "filter") {
            return Err(ApiError::InvalidRequest(format!(
                "'unlearn' has an unknown field '{k}' (it takes 'alpha' and 'filter')"
            )));
        }
        for (k, (t, &(takes_alpha, _, _))) in terms.iter_mut().zip(&a.terms[model]).enumerate() {
            if let (Some(al), true) = (alpha, takes_alpha) {
                t.0 = -al;
                audit["assistants"][k]["alpha"] = json!(al);
            }
            if let Some(f) = filter {
                t.1 = f;
                audit["assistants"][k]["filter"] = json!(f);
            }
        }
    }
    if let Some(list) = audit["patches"].as_array_mut() {
        for (p, s) in list.iter_mut().zip(&scales) {
            p["scale"] = json!(s);
        }
    }
    // Under --lock without a key nobody can prove they may see what a profile is made of
    // (its files' names can say what was forgotten): responses name the profile only.
    if state.cfg.lock && state.cfg.api_keys.is_empty() {
        audit = json!({ "profile": audit["profile"].clone() });
    }
    Ok((Setting::new(model, &scales, &terms), audit))
}

/// Every patch as `{id, path, scale, model}`, in id order, with the default scales.
pub fn adapters(state: &AppState) -> Vec<Value> {
    let scales = state.adapters.defaults();
    state
        .adapters
        .list
        .iter()
        .enumerate()
        .map(|(id, (path, m))| {
            json!({
                "id": id,
                "path": path,
                "scale": scales[id],
                "model": state.models[*m].0,
            })
        })
        .collect()
}

/// `GET /lora-adapters`.
pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(Value::Array(adapters(&state)))
}

/// `POST /lora-adapters`: set the default scales (refused under `--lock`).
pub async fn set(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    if state.cfg.lock {
        return Err(ApiError::Permission(
            "this server is locked: patch scales cannot be changed".into(),
        ));
    }
    let v = read_body_json(body, state.cfg.body_limit)?;
    let n = state.adapters.list.len();
    let scales = parse_list("body", &v, n, |_| Ok(()))?;
    *state
        .adapters
        .scales
        .write()
        .unwrap_or_else(|p| p.into_inner()) = scales;
    Ok(Json(json!({ "success": true })))
}
