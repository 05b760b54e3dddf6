//! `POST /v1/chat/completions` and `/chat/completions`, in the OpenAI shape llama-server
//! answers with.

use super::super::error::{ApiError, ApiResult};
use super::super::request::{bad, response_id, Body};
use super::super::{sse, AppState, Event};
use super::FINGERPRINT;
use super::{
    check_context, collect, finish_reason, now, oai_logprobs, off_workers, read_body, stream,
    timings, usage,
};
use crate::tokenizer::{apply_chat_template, ChatMessage};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// The `messages` of a request: each with a string `role` and a `content` that is a string
/// or an array of text parts.
pub fn messages(body: &Body) -> ApiResult<Vec<ChatMessage>> {
    let Some(Value::Array(list)) = body.get("messages") else {
        return Err(bad("messages", "an array of messages"));
    };
    if list.is_empty() {
        return Err(bad("messages", "a non-empty array"));
    }
    let role = |m: &Value| m.get("role").and_then(Value::as_str).map(str::to_owned);
    if list.len() >= 2
        && list[list.len() - 2..]
            .iter()
            .all(|m| role(m).as_deref() == Some("assistant"))
    {
        return Err(ApiError::InvalidRequest(
            "the last two messages are both the assistant's: at most one can be continued".into(),
        ));
    }
    list.iter()
        .map(|m| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("messages[].role", "a string"))?;
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match p.get("type").and_then(Value::as_str) {
                            Some("text") => text.push_str(
                                p.get("text")
                                    .and_then(Value::as_str)
                                    .ok_or_else(|| bad("messages[].content[].text", "a string"))?,
                            ),
                            Some(other) => {
                                return Err(ApiError::NotSupported(format!(
                                    "content parts of type '{other}' are not supported"
                                )))
                            }
                            None => return Err(bad("messages[].content[].type", "a string")),
                        }
                    }
                    text
                }
                Some(_) => {
                    return Err(bad(
                        "messages[].content",
                        "a string or an array of content parts",
                    ))
                }
            };
            if m.get("tool_calls").is_some_and(|t| !t.is_null()) {
                return Err(ApiError::NotSupported(
                    "tool_calls are not supported".into(),
                ));
            }
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// A chat request's prompt: its `messages` rendered with the generation prompt, and the
/// tokens of that text.
pub fn chat_prompt(state: &AppState, body: &Body) -> ApiResult<(String, Vec<u32>)> {
    let text = render(state, &messages(body)?, true)?;
    let tokens = state.tok.encode(&text, true, true);
    Ok((text, tokens))
}

/// The conversation rendered through the chat template, ready to tokenize.
pub fn render(
    state: &AppState,
    msgs: &[ChatMessage],
    add_generation_prompt: bool,
) -> ApiResult<String> {
    Ok(apply_chat_template(
        &state.tok,
        &state.arch,
        state.cfg.chat_template.as_deref(),
        msgs,
        add_generation_prompt,
    )?)
}

/// The chat template in use, as `/props` reports it: the override, the file's, or the
/// built-in format's name.
pub fn template_source(state: &AppState) -> String {
    state
        .cfg
        .chat_template
        .as_deref()
        .or_else(|| state.tok.chat_template())
        .map(str::to_owned)
        .unwrap_or_else(|| {
            if state.arch.starts_with("gemma") {
                "gemma".into()
            } else {
                "chatml".into()
            }
        })
}

/// `logprobs` (a boolean) and `top_logprobs` (0 to 20): the alternatives to report per
/// token, `None` when no probabilities are asked for.
fn chat_probs(body: &Body) -> ApiResult<Option<usize>> {
    let top = body.i64("top_logprobs")?;
    if let Some(n) = top {
        if !(0..=20).contains(&n) {
            return Err(bad("top_logprobs", "an integer from 0 to 20"));
        }
    }
    match body.bool("logprobs")? {
        Some(true) => Ok(Some(top.unwrap_or(0) as usize)),
        _ if top.is_some_and(|n| n > 0) => Err(ApiError::InvalidRequest(
            "'top_logprobs' needs 'logprobs': true".into(),
        )),
        _ => Ok(None),
    }
}

pub async fn chat(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let st = state.clone();
    let (body, model, setting, params, prompt, text) = off_workers(move || {
        let body = read_body(body, st.cfg.body_limit)?;
        body.refuse_unsupported()?;
        let model = st.resolve_model(body.str("model")?)?;
        let (setting, _) = super::lora::setting(&st, &body, model)?;
        let params = body.generate_params(&st)?;
        if body.bool("add_generation_prompt")? == Some(true)
            && body.bool("continue_final_message")? == Some(true)
        {
            return Err(ApiError::InvalidRequest(
                "add_generation_prompt and continue_final_message cannot both be true".into(),
            ));
        }
        let (text, prompt) = chat_prompt(&st, &body)?;
        check_context(&st, &prompt)?;
        Ok((body, model, setting, params, prompt, text))
    })
    .await?;
    // llama-server's `__verbose` (a request's `verbose`, or the server's --verbose): the
    // prompt as rendered.
    let verbose = body.bool("verbose")?.unwrap_or(state.cfg.verbose);
    let streaming = body.bool("stream")?.unwrap_or(false);
    let include_usage = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let n_probs = chat_probs(&body)?;
    let rx = state.engine.submit(setting, prompt, params, n_probs)?;
    let tok = state.tok.clone();
    let logprobs = move |p: &[crate::generate::TokenProbs]| match n_probs {
        Some(_) => json!({ "content": oai_logprobs(&tok, p) }),
        None => Value::Null,
    };
    let id = response_id("chatcmpl-");
    let name = state.models[model].0.clone();
    let created = now();
    if !streaming {
        let (_, g) = collect(rx).await?;
        let mut r = json!({
            "choices": [{
                "finish_reason": finish_reason(&g),
                "index": 0,
                "message": { "role": "assistant", "content": g.text },
                "logprobs": logprobs(&g.probs),
            }],
            "created": created,
            "model": name,
            "system_fingerprint": FINGERPRINT,
            "object": "chat.completion",
            "usage": usage(&g),
            "id": id,
            "timings": timings(&g),
        });
        if verbose {
            r["__verbose"] = json!({ "prompt": text, "content": g.text });
        }
        return Ok(Json(r).into_response());
    }
    let chunk = move |choices: Value| {
        json!({
            "choices": choices,
            "created": created,
            "id": id,
            "model": name,
            "system_fingerprint": FINGERPRINT,
            "object": "chat.completion.chunk",
        })
    };
    let first = vec![sse::event(&chunk(json!([{
        "finish_reason": null,
        "index": 0,
        "delta": { "role": "assistant", "content": null },
    }])))];
    Ok(stream(rx, first, move |ev| match ev {
        Event::Text(t, probs) => (
            vec![sse::event(&chunk(json!([{
                "finish_reason": null,
                "index": 0,
                "delta": { "content": t },
                "logprobs": logprobs(&probs),
            }])))],
            false,
        ),
        Event::Done { gen, .. } => {
            let mut last = chunk(json!([{
                "finish_reason": finish_reason(&gen),
                "index": 0,
                "delta": {},
            }]));
            last["timings"] = timings(&gen);
            let mut out = vec![sse::event(&last)];
            if include_usage {
                let mut u = chunk(json!([]));
                u["usage"] = usage(&gen);
                u["timings"] = timings(&gen);
                out.push(sse::event(&u));
            }
            out.push(sse::done());
            (out, true)
        }
        Event::Error(e) => (vec![sse::event(&e.to_json())], true),
    }))
}

/// `POST /chat/completions/input_tokens`: how many tokens the conversation's prompt takes, as
/// the chat route would render and tokenize it.
pub async fn input_tokens(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    off_workers(move || {
        let body = read_body(body, state.cfg.body_limit)?;
        let (_, prompt) = chat_prompt(&state, &body)?;
        Ok(Json(json!({ "input_tokens": prompt.len() })))
    })
    .await
}
