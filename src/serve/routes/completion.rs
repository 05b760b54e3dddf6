//! `POST /completion` and `/completions` (llama-server's native shape) and
//! `POST /v1/completions` (OpenAI's).

use super::super::engine::Setting;
use super::super::error::{ApiError, ApiResult};
use super::super::request::{bad, response_id, Body};
use super::super::{sse, AppState, Event};
use super::FINGERPRINT;
use super::{
    check_context, collect, finish_reason, now, oai_logprobs, off_workers, read_body, stream,
    timings, usage,
};
use crate::generate::{FinishReason, GenerateParams, Generation, TokenProbs};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// The tokens of `prompt`: a string, an array of token ids, or an array holding one of those.
pub fn prompt_tokens(state: &AppState, prompt: Option<&Value>) -> ApiResult<Vec<u32>> {
    let what = "a string, an array of token ids, or an array holding one string";
    match prompt {
        None => Err(bad("prompt", what)),
        Some(Value::String(s)) => Ok(state.tok.encode(s, true, true)),
        Some(Value::Array(a)) if a.len() == 1 && !a[0].is_number() => {
            prompt_tokens(state, Some(&a[0]))
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => {
            let n = state.tok.n_vocab() as u64;
            a.iter()
                .map(|v| match v.as_u64() {
                    Some(t) if t < n => Ok(t as u32),
                    _ => Err(ApiError::InvalidRequest(format!(
                        "'prompt' holds {v}, which is not a token id (the vocabulary has {n})"
                    ))),
                })
                .collect()
        }
        Some(Value::Array(_)) => Err(ApiError::NotSupported(
            "several prompts in one request are not supported".into(),
        )),
        Some(_) => Err(bad("prompt", what)),
    }
}

/// llama-server's `stop_type`.
fn stop_type(g: &Generation) -> &'static str {
    match (g.finish, &g.stopping_word) {
        (FinishReason::Stop, Some(_)) => "word",
        (FinishReason::Stop, None) => "eos",
        (FinishReason::Length, _) => "limit",
        (FinishReason::Cancelled, _) => "none",
    }
}

/// An integer field from 0 to 20 giving how many alternatives to report per token.
fn n_alternatives(body: &Body, key: &str) -> ApiResult<Option<usize>> {
    match body.get(key) {
        None | Some(Value::Bool(false)) => Ok(None),
        Some(Value::Bool(true)) => Ok(Some(0)),
        Some(_) => match body.i64(key)? {
            Some(n) if (0..=20).contains(&n) => Ok((n > 0).then_some(n as usize)),
            _ => Err(bad(key, "an integer from 0 to 20")),
        },
    }
}

/// llama-server's `completion_probabilities`: per token `{id, token, bytes, logprob,
/// top_logprobs}`.
fn completion_probabilities(state: &AppState, probs: &[TokenProbs]) -> Value {
    oai_logprobs(&state.tok, probs)
}

/// The settings a generation ran with, as llama-server's `generation_settings` names them,
/// with what the model is made of (profile, patch scales, assistants' alpha and filter,
/// file hashes) under `unlearn`.
fn generation_settings(
    state: &AppState,
    setting: &Value,
    model: usize,
    p: &GenerateParams,
) -> Value {
    let s = &p.sampler;
    json!({
        "model": state.models[model].0,
        "profile": state.models[model].1,
        "unlearn": setting,
        "n_ctx": state.cfg.n_ctx,
        "n_predict": p.n_predict,
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repeat_penalty": s.repeat_penalty,
        "repeat_last_n": s.repeat_last_n,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "seed": s.seed,
        "stop": p.stop,
        "ignore_eos": p.ignore_eos,
        "logit_bias": s
            .logit_bias
            .iter()
            .map(|&(token, bias)| json!({ "bias": bias, "token": token }))
            .collect::<Vec<_>>(),
        "stream": false,
    })
}

/// What both completion routes read: the model, its unlearning setting (with what it is
/// made of), the generation settings and the prompt, checked.
struct Prepared {
    model: usize,
    setting: Setting,
    audit: Value,
    params: GenerateParams,
    prompt: Vec<u32>,
}

/// Read and check a completion request off the HTTP workers: its body and what it asks.
async fn prepare(
    state: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(Body, Prepared)> {
    let st = state.clone();
    off_workers(move || {
        let body = read_body(body, st.cfg.body_limit)?;
        let prepared = prepare_body(&st, &body)?;
        Ok((body, prepared))
    })
    .await
}

fn prepare_body(state: &AppState, body: &Body) -> ApiResult<Prepared> {
    body.refuse_unsupported()?;
    let model = state.resolve_model(body.str("model")?)?;
    let (setting, audit) = super::lora::setting(state, body, model)?;
    let params = body.generate_params(state)?;
    let prompt = prompt_tokens(state, body.get("prompt"))?;
    check_context(state, &prompt)?;
    Ok(Prepared {
        model,
        setting,
        audit,
        params,
        prompt,
    })
}

/// `POST /completion`: native fields; streaming sends partial objects and a final one with
/// `stop: true`, and no `[DONE]`.
pub async fn completion(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (body, prepared) = prepare(&state, body).await?;
    let Prepared {
        model,
        setting,
        audit,
        params,
        prompt,
    } = prepared;
    let streaming = body.bool("stream")?.unwrap_or(false);
    let name = state.models[model].0.clone();
    let mut settings = generation_settings(&state, &audit, model, &params);
    settings["stream"] = json!(streaming);
    let n_probs = n_alternatives(&body, "n_probs")?;
    settings["n_probs"] = json!(n_probs.unwrap_or(0));
    let prompt_text = state.tok.decode(&prompt, true);
    let rx = state.engine.submit(setting, prompt, params, n_probs)?;
    let st = state.clone();
    let probs_json = move |p: &[TokenProbs]| completion_probabilities(&st, p);
    let final_object = move |slot: usize, g: &Generation, content: &str, probs: &[TokenProbs]| {
        let mut o = json!({
            "index": 0,
            "content": content,
            "tokens": [],
            "id_slot": slot,
            "stop": true,
            "model": name,
            "tokens_predicted": g.tokens.len(),
            "tokens_evaluated": g.n_prompt,
            "generation_settings": settings,
            "prompt": prompt_text,
            "has_new_line": g.text.contains('\n'),
            "truncated": false,
            "stop_type": stop_type(g),
            "stopping_word": g.stopping_word.clone().unwrap_or_default(),
            // The last token sampled is never fed, so it is not in the cache.
            "tokens_cached": g.n_prompt + g.tokens.len().saturating_sub(1),
            "timings": timings(g),
        });
        if n_probs.is_some() {
            o["completion_probabilities"] = probs_json(probs);
        }
        o
    };
    if !streaming {
        let (slot, g) = collect(rx).await?;
        return Ok(Json(final_object(slot, &g, &g.text, &g.probs)).into_response());
    }
    let st = state.clone();
    let mut n = 0usize;
    Ok(stream(rx, Vec::new(), move |ev| match ev {
        Event::Text(t, probs) => {
            n += 1;
            let mut partial = json!({
                "index": 0,
                "content": t,
                "tokens": [],
                "stop": false,
                "id_slot": -1,
                "tokens_predicted": n,
                "tokens_evaluated": 0,
            });
            if n_probs.is_some() {
                partial["completion_probabilities"] = completion_probabilities(&st, &probs);
            }
            (vec![sse::event(&partial)], false)
        }
        Event::Done { slot, gen } => (vec![sse::event(&final_object(slot, &gen, "", &[]))], true),
        Event::Error(e) => (vec![sse::event(&e.to_json())], true),
    }))
}

/// `POST /v1/completions`: the OpenAI text completion shape.
pub async fn oai_completion(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let (body, prepared) = prepare(&state, body).await?;
    let Prepared {
        model,
        setting,
        params,
        prompt,
        ..
    } = prepared;
    let streaming = body.bool("stream")?.unwrap_or(false);
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let n_probs = n_alternatives(&body, "logprobs")?;
    let rx = state.engine.submit(setting, prompt, params, n_probs)?;
    let tok = state.tok.clone();
    let logprobs = move |p: &[TokenProbs]| match n_probs {
        Some(_) => json!({ "content": oai_logprobs(&tok, p) }),
        None => Value::Null,
    };
    let id = response_id("cmpl-");
    let name = state.models[model].0.clone();
    let created = now();
    let object = move |choices: Value| {
        json!({
            "choices": choices,
            "created": created,
            "model": name,
            "system_fingerprint": FINGERPRINT,
            "object": "text_completion",
            "id": id,
        })
    };
    if !streaming {
        let (_, g) = collect(rx).await?;
        let mut o = object(json!([{
            "text": g.text,
            "index": 0,
            "logprobs": logprobs(&g.probs),
            "finish_reason": finish_reason(&g),
        }]));
        o["usage"] = usage(&g);
        o["timings"] = timings(&g);
        return Ok(Json(o).into_response());
    }
    Ok(stream(rx, Vec::new(), move |ev| match ev {
        Event::Text(t, probs) => (
            vec![sse::event(&object(json!([{
                "text": t,
                "index": 0,
                "logprobs": logprobs(&probs),
                "finish_reason": null,
            }])))],
            false,
        ),
        Event::Done { gen, .. } => {
            let mut last = object(json!([{
                "text": "",
                "index": 0,
                "logprobs": null,
                "finish_reason": finish_reason(&gen),
            }]));
            last["timings"] = timings(&gen);
            let mut out = vec![sse::event(&last)];
            if include_usage {
                let mut u = object(json!([]));
                u["usage"] = usage(&gen);
                out.push(sse::event(&u));
            }
            out.push(sse::done());
            (out, true)
        }
        Event::Error(e) => (vec![sse::event(&e.to_json())], true),
    }))
}
