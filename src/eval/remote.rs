//! Evaluating a model behind a `lethe serve`: greedy answers through
//! `/v1/chat/completions` (temperature 0) and teacher-forced scores through `/score`, so an
//! auditor can measure what a deployed profile forgot with the API clients get.

use super::mia::TokenStats;
use super::run::{Backend, Options, Scored};
use crate::{Error, Result};
use serde_json::{json, Value};

/// A model served at `base_url` (`http://host:port`, with or without a trailing `/v1`).
pub struct Remote {
    base: String,
    model: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    audit: Value,
}

impl Remote {
    /// Connect to `url` for model `model` (checked against `/v1/models`, whose entry gives
    /// the audit: profile, settings and file hashes).
    pub fn new(url: &str, model: &str, api_key: Option<String>) -> Result<Self> {
        let base = url
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string();
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(std::time::Duration::from_secs(10))
            .build();
        let mut r = Self {
            base,
            model: model.to_string(),
            api_key,
            agent,
            audit: Value::Null,
        };
        let models = r.get("/v1/models")?;
        let entry = models["data"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["id"] == model))
            .ok_or_else(|| {
                Error::Invalid(format!("{url} serves no model {model:?} (see /v1/models)"))
            })?;
        r.audit = json!({ "server": url, "model": model, "meta": entry.get("meta") });
        Ok(r)
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        if let Some(k) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        req
    }

    fn get(&self, path: &str) -> Result<Value> {
        read(self.request("GET", path).call(), path)
    }

    fn post(&self, path: &str, body: Value) -> Result<Value> {
        read(self.request("POST", path).send_json(body), path)
    }
}

/// The JSON of a response, or the server's error message.
fn read(r: std::result::Result<ureq::Response, ureq::Error>, path: &str) -> Result<Value> {
    match r {
        Ok(resp) => resp
            .into_json()
            .map_err(|e| Error::Invalid(format!("{path}: the answer is not JSON: {e}"))),
        Err(ureq::Error::Status(code, resp)) => {
            let body: Value = resp.into_json().unwrap_or(Value::Null);
            let msg = body["error"]["message"].as_str().unwrap_or("no message");
            Err(Error::Invalid(format!("{path}: HTTP {code}: {msg}")))
        }
        Err(e) => Err(Error::Invalid(format!("{path}: {e}"))),
    }
}

impl Backend for Remote {
    fn name(&self) -> String {
        self.model.clone()
    }

    fn audit(&self) -> Value {
        self.audit.clone()
    }

    fn answers(
        &mut self,
        questions: &[&str],
        opts: &Options,
        tick: &dyn Fn(u64),
    ) -> Result<Vec<String>> {
        let mut out = Vec::with_capacity(questions.len());
        for q in questions {
            let r = self.post(
                "/v1/chat/completions",
                json!({
                    "model": self.model,
                    "messages": [{ "role": "user", "content": q }],
                    "temperature": 0.0,
                    "max_tokens": opts.max_new,
                }),
            )?;
            let text = r["choices"][0]["message"]["content"]
                .as_str()
                .ok_or_else(|| Error::Invalid("/v1/chat/completions: no message content".into()))?;
            out.push(text.trim().to_string());
            tick(1);
        }
        Ok(out)
    }

    fn score(&mut self, question: &str, conts: &[&str], stats: bool) -> Result<Scored> {
        let r = self.post(
            "/score",
            json!({
                "model": self.model,
                "messages": [{ "role": "user", "content": question }],
                "continuation": conts,
                "stats": stats,
            }),
        )?;
        let results = r["results"]
            .as_array()
            .ok_or_else(|| Error::Invalid("/score: no results".into()))?;
        let mut out = Scored::default();
        for (i, res) in results.iter().enumerate() {
            let toks = res["tokens"]
                .as_array()
                .ok_or_else(|| Error::Invalid("/score: a result without tokens".into()))?;
            let num = |t: &Value, k: &str| {
                t[k].as_f64()
                    .ok_or_else(|| Error::Invalid(format!("/score: a token without {k}")))
            };
            let mut lp = Vec::with_capacity(toks.len());
            for t in toks {
                lp.push(num(t, "logprob")?);
                if stats && i == 0 {
                    out.stats.push(TokenStats {
                        logprob: num(t, "logprob")?,
                        mu: num(t, "mu")?,
                        sigma: num(t, "sigma")?,
                    });
                }
            }
            out.logprobs.push(lp);
        }
        Ok(out)
    }
}
