//! Reading request bodies: JSON objects with typed fields, each failure a 400 naming the
//! field, and the sampling settings llama-server reads.

use super::error::{ApiError, ApiResult};
use super::AppState;
use crate::generate::{GenerateParams, SamplerParams};
use crate::tokenizer::Tokenizer;
use serde_json::{Map, Value};

/// A parsed JSON object body.
pub struct Body(pub Map<String, Value>);

impl Body {
    /// Parse `bytes` as a JSON object.
    pub fn parse(bytes: &[u8]) -> ApiResult<Self> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(m)) => Ok(Body(m)),
            Ok(_) => Err(ApiError::InvalidRequest(
                "the request body must be a JSON object".into(),
            )),
            Err(e) => Err(ApiError::InvalidRequest(format!("invalid JSON: {e}"))),
        }
    }

    /// The field `key`, absent when missing or null.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    pub fn f32(&self, key: &str) -> ApiResult<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            // A finite f64 can still overflow f32 (1e308): refused, not served as infinity.
            Some(v) => match v.as_f64().map(|x| x as f32) {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(bad(key, "a number within the range of f32")),
            },
        }
    }

    pub fn i64(&self, key: &str) -> ApiResult<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match (v.as_i64(), v.as_f64()) {
                (Some(x), _) => Ok(Some(x)),
                (None, Some(x)) if x.fract() == 0.0 && x.abs() < 9e15 => Ok(Some(x as i64)),
                _ => Err(bad(key, "an integer")),
            },
        }
    }

    pub fn bool(&self, key: &str) -> ApiResult<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad(key, "a boolean")),
        }
    }

    pub fn str(&self, key: &str) -> ApiResult<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(bad(key, "a string")),
        }
    }

    /// `stop`: a string or an array of strings.
    pub fn stop(&self) -> ApiResult<Vec<String>> {
        match self.get("stop") {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .map(|v| v.into_iter().filter(|s| !s.is_empty()).collect())
                .ok_or_else(|| bad("stop", "a string or an array of strings")),
            Some(_) => Err(bad("stop", "a string or an array of strings")),
        }
    }

    /// Refuse the fields of features lethe does not have (501), rather than ignore them.
    pub fn refuse_unsupported(&self) -> ApiResult<()> {
        let unsupported =
            |what: &str| Err(ApiError::NotSupported(format!("{what} is not supported")));
        if self
            .get("tools")
            .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
        {
            return unsupported("tools");
        }
        if self.get("tool_choice").is_some_and(|t| t != "none") {
            return unsupported("tool_choice");
        }
        if let Some(rf) = self.get("response_format") {
            if rf.get("type").and_then(Value::as_str) != Some("text") {
                return unsupported("response_format");
            }
        }
        for key in ["grammar", "json_schema"] {
            if self.get(key).is_some() {
                return unsupported(key);
            }
        }
        if self.i64("n")?.is_some_and(|n| n != 1) {
            return unsupported("n other than 1");
        }
        Ok(())
    }

    /// Generation settings: llama-server's fields, with the server's defaults.
    pub fn generate_params(&self, state: &AppState) -> ApiResult<GenerateParams> {
        let d = SamplerParams::default();
        let n_predict = match self.i64("n_predict")? {
            Some(n) => Some(n),
            None => match self.i64("max_completion_tokens")? {
                Some(n) => Some(n),
                None => self.i64("max_tokens")?,
            },
        }
        .unwrap_or(state.cfg.n_predict);
        if n_predict < -1 {
            return Err(ApiError::InvalidRequest(format!(
                "n_predict must be -1 (no limit) or at least 0, not {n_predict}"
            )));
        }
        let seed = self.i64("seed")?.unwrap_or(state.cfg.seed);
        let temperature = self.f32("temperature")?.unwrap_or(state.cfg.temperature);
        if temperature < 0.0 {
            return Err(bad("temperature", "at least 0"));
        }
        let top_p = self.f32("top_p")?.unwrap_or(d.top_p);
        let min_p = self.f32("min_p")?.unwrap_or(d.min_p);
        for (key, v) in [("top_p", top_p), ("min_p", min_p)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(key, "in [0, 1]"));
            }
        }
        let top_k = self.i64("top_k")?.unwrap_or(d.top_k as i64);
        let repeat_last_n = self.i64("repeat_last_n")?.unwrap_or(d.repeat_last_n as i64);
        if repeat_last_n < -1 {
            return Err(bad("repeat_last_n", "-1 or more"));
        }
        let sampler = SamplerParams {
            temperature,
            top_k: top_k.clamp(i32::MIN as i64, i32::MAX as i64) as i32,
            top_p,
            min_p,
            repeat_penalty: self.f32("repeat_penalty")?.unwrap_or(d.repeat_penalty),
            repeat_last_n: repeat_last_n.min(i32::MAX as i64) as i32,
            presence_penalty: self.f32("presence_penalty")?.unwrap_or(d.presence_penalty),
            frequency_penalty: self
                .f32("frequency_penalty")?
                .unwrap_or(d.frequency_penalty),
            seed: if seed < 0 { random_seed() } else { seed as u64 },
            logit_bias: self.logit_bias(&state.tok)?,
        };
        let ignore_eos = self.bool("ignore_eos")?.unwrap_or(false);
        let mut params = GenerateParams {
            n_predict,
            sampler,
            stop: self.stop()?,
            ignore_eos,
        };
        if ignore_eos {
            // As llama-server: the end-of-generation tokens are banned, so they are never
            // sampled (and `generation_settings.logit_bias` lists them).
            for id in state.tok.eog_tokens() {
                params.sampler.logit_bias.push((id, f32::NEG_INFINITY));
            }
        }
        Ok(params)
    }

    /// `logit_bias`, in llama-server's forms: an array of `[token, bias]` pairs or an object
    /// `{token: bias}` (OpenAI's), where a token is an id (a number, or an object key that is
    /// one) or a text whose every token gets the bias (tokenized without special tokens), and
    /// a bias is a number or `false` (the token banned). Unlike llama-server, an id outside the
    /// vocabulary or a malformed entry is a 400 naming it, not skipped.
    pub fn logit_bias(&self, tok: &Tokenizer) -> ApiResult<Vec<(u32, f32)>> {
        const WHAT: &str = "an array of [token, bias] pairs or an object {token: bias}";
        let n_vocab = tok.n_vocab();
        let bias_of = |v: &Value, key: &str| -> ApiResult<f32> {
            match v {
                Value::Bool(false) => Ok(f32::NEG_INFINITY),
                Value::Number(n) => match n.as_f64() {
                    Some(x) if (x as f32).is_finite() => Ok(x as f32),
                    _ => Err(bad("logit_bias", "finite numbers within the range of f32")),
                },
                _ => Err(ApiError::InvalidRequest(format!(
                    "'logit_bias': the bias of {key} must be a number or false, not {v}"
                ))),
            }
        };
        let id = |x: i64| -> ApiResult<u32> {
            if (0..n_vocab as i64).contains(&x) {
                Ok(x as u32)
            } else {
                Err(ApiError::InvalidRequest(format!(
                    "'logit_bias': token {x} is not in the vocabulary (ids 0..{n_vocab})"
                )))
            }
        };
        let mut out = Vec::new();
        let mut add = |key: &Value, bias: f32| -> ApiResult<()> {
            match key {
                Value::Number(n) => match n.as_i64() {
                    Some(x) => out.push((id(x)?, bias)),
                    None => return Err(bad("logit_bias", "keyed by integer token ids or texts")),
                },
                Value::String(text) => {
                    for t in tok.encode(text, false, false) {
                        out.push((t, bias));
                    }
                }
                _ => return Err(bad("logit_bias", WHAT)),
            }
            Ok(())
        };
        match self.get("logit_bias") {
            None => {}
            Some(Value::Array(pairs)) => {
                for pair in pairs {
                    match pair.as_array().map(Vec::as_slice) {
                        Some([key, bias]) => add(key, bias_of(bias, &key.to_string())?)?,
                        _ => return Err(bad("logit_bias", WHAT)),
                    }
                }
            }
            Some(Value::Object(map)) => {
                for (key, bias) in map {
                    let bias = bias_of(bias, &format!("{key:?}"))?;
                    match key.parse::<i64>() {
                        Ok(x) => add(&Value::from(x), bias)?,
                        Err(_) => add(&Value::String(key.clone()), bias)?,
                    }
                }
            }
            Some(_) => return Err(bad("logit_bias", WHAT)),
        }
        Ok(out)
    }
}

/// A 400 saying what `key` must be.
pub fn bad(key: &str, what: &str) -> ApiError {
    ApiError::InvalidRequest(format!("'{key}' must be {what}"))
}

/// A seed from the clock, for `seed: -1`.
pub fn random_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A fresh response id with `prefix` (`chatcmpl-`, `cmpl-`).
pub fn response_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut rng = crate::generate::sampler::Rng::new(random_seed() ^ n.rotate_left(32));
    format!("{prefix}{:016x}{:016x}", rng.next_u64(), rng.next_u64())
}
