//! `lethe serve` over real sockets: the binary is started on a free port of 127.0.0.1 and
//! spoken to with a small HTTP/1.1 client.

mod common;

use common::serve::{events, header, Server};

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_lethe");

/// `lethe run` greedy text for `prompt` as a chat user message.
fn run_greedy(model: &Path, prompt: &str, n: usize) -> String {
    let out = Command::new(BIN)
        .args(["run", "-m"])
        .arg(model)
        .args(["-p", prompt, "--chat", "--temp", "0", "-t", "1", "-n"])
        .arg(n.to_string())
        .output()
        .expect("lethe run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

/// The entry of `/v1/models` with id `id`.
fn entry_of<'a>(models: &'a Value, id: &str) -> &'a Value {
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .unwrap()
}

fn error_type(v: &Value) -> &str {
    v["error"]["type"].as_str().unwrap_or("")
}

fn chat_body(prompt: &str, n: usize) -> Value {
    json!({
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": n,
    })
}

const PROMPT: &str = "Write a short story about a dragon.";

#[test]
fn routes_stream_and_greedy_match_run() {
    let model = common::model_path("smollm2");
    let m = model.to_str().unwrap();
    let s = Server::start(&["-m", m, "--alias", "small", "-np", "2"]);

    let (st, body) = s.get("/v1/health");
    assert_eq!((st, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (st, models) = s.get("/v1/models");
    assert_eq!(st, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "small");
    assert_eq!(models["data"].as_array().unwrap().len(), 1);

    // Greedy chat equals `lethe run` greedy with the same template.
    let expect = run_greedy(&model, PROMPT, 16);
    let (st, r) = s.post("/v1/chat/completions", &chat_body(PROMPT, 16));
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "small");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["message"]["content"], expect.as_str());
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 16);
    let u = &r["usage"];
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + 16
    );
    assert_eq!(r["timings"]["predicted_n"], 16);
    // Without the /v1 prefix too.
    let (st, r2) = s.post("/chat/completions", &chat_body(PROMPT, 16));
    assert_eq!(st, 200);
    assert_eq!(r2["choices"][0]["message"]["content"], expect.as_str());

    // Streamed chat: role first, deltas, finish with an empty delta, usage, [DONE].
    let mut b = chat_body(PROMPT, 16);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let (st, ct, text) = s.post_stream("/v1/chat/completions", &b);
    assert_eq!(st, 200);
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let ev = events(&text);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let n = chunks.len();
    let fin = &chunks[n - 2];
    assert_eq!(fin["choices"][0]["finish_reason"], "length");
    assert_eq!(fin["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], 16);
    let streamed: String = chunks[1..n - 2]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, expect);

    // Native /completion, then streamed: partials, a final stop: true object, no [DONE].
    let cb = json!({"prompt": "The capital of France is", "n_predict": 8, "temperature": 0});
    let (st, c) = s.post("/completion", &cb);
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["stop"], true);
    assert_eq!(c["tokens_predicted"], 8);
    assert_eq!(c["stop_type"], "limit");
    let content = c["content"].as_str().unwrap().to_string();
    assert!(!content.is_empty());
    let mut sb = cb.clone();
    sb["stream"] = json!(true);
    let (st, _, text) = s.post_stream("/completions", &sb);
    assert_eq!(st, 200);
    let ev: Vec<Value> = events(&text)
        .iter()
        .map(|e| serde_json::from_str(e).expect("no [DONE] on /completion"))
        .collect();
    let last = ev.last().unwrap();
    assert_eq!(last["stop"], true);
    assert!(ev[..ev.len() - 1].iter().all(|e| e["stop"] == false));
    let joined: String = ev.iter().map(|e| e["content"].as_str().unwrap()).collect();
    assert_eq!(joined, content);

    // OpenAI text completions, with a stop string.
    let ob = json!({"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
    let (st, o) = s.post("/v1/completions", &ob);
    assert_eq!(st, 200, "{o}");
    assert_eq!(o["object"], "text_completion");
    assert_eq!(o["choices"][0]["text"], content.as_str());
    let mut ob2 = ob.clone();
    ob2["stop"] = json!(["."]);
    let (_, o2) = s.post("/v1/completions", &ob2);
    assert_eq!(o2["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        o2["choices"][0]["text"].as_str().unwrap(),
        content.split('.').next().unwrap()
    );
    ob2["stream"] = json!(true);
    let (_, _, text) = s.post_stream("/v1/completions", &ob2);
    assert_eq!(events(&text).last().unwrap(), "[DONE]");

    // Tokenize, detokenize, apply-template.
    let (st, t) = s.post("/tokenize", &json!({"content": "Hello world"}));
    assert_eq!(st, 200);
    let ids = t["tokens"].clone();
    assert!(!ids.as_array().unwrap().is_empty());
    let (_, d) = s.post("/detokenize", &json!({"tokens": ids}));
    assert_eq!(d["content"], "Hello world");
    let (st, p) = s.post(
        "/apply-template",
        &json!({"messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(st, 200);
    let prompt = p["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("Hi") && prompt.contains("assistant"),
        "{prompt}"
    );
    // input_tokens: the prompt a chat would take; verbose: the rendered prompt comes back.
    let msgs = json!([{"role": "system", "content": "Book"},
                      {"role": "user", "content": "What is the best book"}]);
    let (st, n) = s.post(
        "/chat/completions/input_tokens",
        &json!({ "messages": msgs }),
    );
    assert_eq!(st, 200, "{n}");
    let (st, r) = s.post(
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 1, "verbose": true}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(n["input_tokens"], r["usage"]["prompt_tokens"], "{n} {r}");
    let shown = r["__verbose"]["prompt"].as_str().unwrap();
    assert!(shown.contains("What is the best book"), "{shown}");
    let (_, r) = s.post(
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 1}),
    );
    assert!(r.get("__verbose").is_none(), "{r}");
    // add_generation_prompt: false leaves the assistant's header out.
    let (st, p) = s.post(
        "/apply-template",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": false}),
    );
    assert_eq!(st, 200);
    let without = p["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with(without) && prompt.len() > without.len(),
        "{without}"
    );
    assert!(prompt[without.len()..].contains("assistant"), "{prompt}");
}

#[test]
fn errors_and_api_key() {
    let model = common::model_path("smollm2");
    let m = model.to_str().unwrap();
    let s = Server::start(&["-m", m, "-c", "64", "--api-key", "sesame"]);
    let key = [("Authorization", "Bearer sesame")];
    let post = |path: &str, body: &[u8], headers: &[(&str, &str)]| {
        let (st, _, text) = s.request("POST", path, headers, body);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON: {text}"));
        (st, v)
    };
    let chat = chat_body("Hi", 4).to_string();

    // Health and models are public; the rest need the key.
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/models").0, 200);
    // The model list shows what a model is made of (its files' paths and hashes) only with
    // the key; without it, the ids and the context size.
    let (st, _, text) = s.request("GET", "/v1/models", &[], b"");
    let public: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(st, 200);
    assert_eq!(public["data"][0]["meta"]["n_ctx"], 64);
    assert!(
        public["data"][0]["meta"].get("unlearn").is_none(),
        "{public}"
    );
    assert!(!text.contains(".gguf"), "{text}");
    let (_, _, text) = s.request("GET", "/v1/models", &key, b"");
    let full: Value = serde_json::from_str(&text).unwrap();
    assert!(full["data"][0]["meta"]["unlearn"].is_object(), "{full}");
    assert!(full["data"][0]["meta"]["profile"].is_null(), "{full}");
    assert_eq!(public["data"][0]["id"], full["data"][0]["id"]);
    // A known route with a method it does not take: llama-server's 404, in the envelope.
    for (method, path) in [("GET", "/v1/chat/completions"), ("DELETE", "/health")] {
        let (st, _, text) = s.request(method, path, &key, b"");
        let e: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON: {text}"));
        assert_eq!(
            (st, error_type(&e)),
            (404, "not_found_error"),
            "{method} {path}"
        );
    }
    let (st, e) = post("/v1/chat/completions", chat.as_bytes(), &[]);
    assert_eq!((st, error_type(&e)), (401, "authentication_error"));
    // Numbers a f64 holds but an f32 does not are refused, not served as infinities.
    for (field, value) in [
        ("temperature", json!(1e308)),
        ("frequency_penalty", json!(-1e300)),
        ("logit_bias", json!([[42, 1e300]])),
    ] {
        let mut b = chat_body("Hi", 4);
        b[field] = value;
        let (st, e) = post("/v1/chat/completions", b.to_string().as_bytes(), &key);
        assert_eq!(
            (st, error_type(&e)),
            (400, "invalid_request_error"),
            "{field}: {e}"
        );
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field) && msg.contains("f32"), "{msg}");
    }
    let (st, e) = post(
        "/v1/chat/completions",
        chat.as_bytes(),
        &[("Authorization", "Bearer wrong")],
    );
    assert_eq!((st, error_type(&e)), (401, "authentication_error"));
    assert_eq!(e["error"]["code"], 401);
    let (st, _) = post(
        "/v1/chat/completions",
        chat.as_bytes(),
        &[("X-Api-Key", "sesame")],
    );
    assert_eq!(st, 200);
    let (st, _) = post("/v1/chat/completions", chat.as_bytes(), &key);
    assert_eq!(st, 200);

    // Malformed JSON and bad fields: 400.
    for body in [&b"{bad"[..], b"[1,2]", b"\xff\xfe", b""] {
        let (st, e) = post("/v1/chat/completions", body, &key);
        assert_eq!(
            (st, error_type(&e)),
            (400, "invalid_request_error"),
            "{body:?}"
        );
    }
    for bad in [
        json!({"messages": "hi"}),
        json!({"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}),
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": -5}),
        // Two trailing assistant messages, and a generation prompt after a message to
        // continue: refused as llama-server refuses them.
        json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"},
                            {"role": "assistant", "content": "b"}]}),
        json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
               "add_generation_prompt": true, "continue_final_message": true}),
    ] {
        let (st, e) = post("/v1/chat/completions", bad.to_string().as_bytes(), &key);
        assert_eq!(
            (st, error_type(&e)),
            (400, "invalid_request_error"),
            "{bad}"
        );
    }
    let (st, e) = post("/completion", br#"{"n_predict": 4}"#, &key);
    assert_eq!((st, error_type(&e)), (400, "invalid_request_error"));

    // One model served: any model name is that model, as in llama-server.
    let mut b = chat_body("Hi", 4);
    b["model"] = json!("gpt-3.5-turbo");
    let (st, r) = post("/v1/chat/completions", b.to_string().as_bytes(), &key);
    assert_eq!(st, 200, "{r}");
    // Unknown route: 404.
    let (st, e) = post("/v1/nothing", b"{}", &key);
    assert_eq!((st, error_type(&e)), (404, "not_found_error"));

    // Features lethe does not have: 501.
    let mut b = chat_body("Hi", 4);
    b["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
    let (st, e) = post("/v1/chat/completions", b.to_string().as_bytes(), &key);
    assert_eq!((st, error_type(&e)), (501, "not_supported_error"));
    let mut b = chat_body("Hi", 4);
    b["response_format"] = json!({"type": "json_object"});
    let (st, e) = post("/v1/chat/completions", b.to_string().as_bytes(), &key);
    assert_eq!((st, error_type(&e)), (501, "not_supported_error"));

    // A prompt over the context: 400 before any streaming.
    let long = "word ".repeat(200);
    let mut b = chat_body(&long, 4);
    b["stream"] = json!(true);
    let (st, e) = post("/v1/chat/completions", b.to_string().as_bytes(), &key);
    assert_eq!((st, error_type(&e)), (400, "exceed_context_size_error"));
    assert_eq!(e["error"]["n_ctx"], 64);
    assert!(e["error"]["n_prompt_tokens"].as_u64().unwrap() > 64);

    // A body over the limit.
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(9 << 20));
    let (st, e) = post("/completion", huge.as_bytes(), &key);
    assert_eq!((st, error_type(&e)), (413, "invalid_request_error"));

    // A generation that fills the context ends with "length".
    let (st, r) = post(
        "/completion",
        br#"{"prompt": "Once upon a time", "temperature": 0, "ignore_eos": true}"#,
        &key,
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["stop_type"], "limit");
    assert!(r["tokens_cached"].as_u64().unwrap() <= 64);

    // The server still answers.
    assert_eq!(s.get("/health").0, 200);
}

/// A profile with a LoRA patch is a model id that answers differently from the base; with
/// `--lock`, the base is neither listed nor served.
#[test]
fn profile_served_by_id_and_lock() {
    let model = common::model_path("smollm2");
    let dir = std::env::temp_dir().join(format!("lethe-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lora = dir.join("lora.gguf");
    let out = Command::new(BIN)
        .args(["patch", "random", "-m"])
        .arg(&model)
        .args(["--rank", "8", "--blocks", "0..8", "--std", "0.05", "-o"])
        .arg(&lora)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prof = dir.join("profiles.toml");
    std::fs::write(
        &prof,
        format!(
            "[[profile]]\nname = \"patched\"\nbase = {:?}\n\n[[profile.patch]]\nfile = \"lora.gguf\"\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let p = prof.to_str().unwrap();

    let s = Server::start(&["--profile", p, "--alias", "base"]);
    let (_, models) = s.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "patched"]);
    // Several models: an unknown name is a 404, never the base.
    let mut b = chat_body(PROMPT, 2);
    b["model"] = json!("pached");
    let (st, e) = s.post("/v1/chat/completions", &b);
    assert_eq!((st, error_type(&e)), (404, "not_found_error"));
    let ask = |model: &str| {
        let mut b = chat_body(PROMPT, 12);
        b["model"] = json!(model);
        let (st, r) = s.post("/v1/chat/completions", &b);
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["model"], model);
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let base = ask("base");
    let patched = ask("patched");
    assert_ne!(base, patched, "the patch changes the answer");
    assert_eq!(
        ask("base"),
        base,
        "the base is unchanged after the profile ran"
    );
    assert_eq!(ask("patched"), patched);

    // Every patch of every profile, with a stable id.
    let (st, list) = s.get("/lora-adapters");
    assert_eq!(st, 200);
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], 0);
    assert_eq!(list[0]["scale"], 1.0);
    assert!(list[0]["path"].as_str().unwrap().ends_with("lora.gguf"));

    // Per-request scales, for that request only: 0 leaves the patch out (the base's text),
    // 1 is the profile's, another scale another text; on both chat and text completions.
    let ask_with = |model: &str, extra: Value| {
        let mut b = chat_body(PROMPT, 12);
        b["model"] = json!(model);
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (st, r) = s.post("/v1/chat/completions", &b);
        assert_eq!(st, 200, "{r}");
        r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let lora = |scale: f64| json!({"lora": [{"id": 0, "scale": scale}]});
    assert_eq!(ask_with("patched", lora(0.0)), base);
    assert_eq!(ask_with("patched", lora(1.0)), patched);
    let tripled = ask_with("patched", lora(3.0));
    assert_ne!(tripled, patched, "another scale, another text");
    assert_eq!(ask("patched"), patched, "the override was for one request");
    assert_eq!(
        ask_with("patched", json!({"lora": []})),
        base,
        "unlisted ids get 0"
    );
    let b = json!({"model": "patched", "prompt": "The capital of France is", "n_predict": 4,
                   "temperature": 0, "lora": [{"id": 0, "scale": 3.0}]});
    let (st, r) = s.post("/completion", &b);
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        r["generation_settings"]["unlearn"]["patches"][0]["scale"],
        3.0
    );
    let (st, r) = s.post("/v1/completions", &b);
    assert_eq!(st, 200, "{r}");

    // Bad overrides: 400 with a message naming the problem.
    let bad_lora = |model: &str, extra: Value, needle: &str| {
        let mut b = chat_body(PROMPT, 2);
        b["model"] = json!(model);
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (st, e) = s.post("/v1/chat/completions", &b);
        assert_eq!(
            (st, error_type(&e)),
            (400, "invalid_request_error"),
            "{extra}"
        );
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg}");
    };
    bad_lora("base", lora(0.5), "of model 'patched', not of 'base'");
    bad_lora(
        "patched",
        json!({"lora": [{"id": 7, "scale": 1}]}),
        "no adapter 7",
    );
    bad_lora(
        "patched",
        json!({"lora": [{"id": 0, "scale": "x"}]}),
        "finite",
    );
    bad_lora("patched", json!({"lora": {"id": 0}}), "'lora' must be");
    bad_lora(
        "patched",
        json!({"unlearn": {"alpha": 1}}),
        "has no assistants",
    );

    // POST /lora-adapters sets the default scales; GET shows them.
    let (st, r) = s.post("/lora-adapters", &json!([{"id": 0, "scale": 0.0}]));
    assert_eq!(st, 200, "{r}");
    let (_, list) = s.get("/lora-adapters");
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["scale"], 0.0);
    assert_eq!(
        ask("patched"),
        base,
        "the profile runs with the new default"
    );
    assert_eq!(ask_with("patched", lora(1.0)), patched);
    for bad in [
        json!([{"id": 3, "scale": 1.0}]),
        json!([{"id": 0, "scale": null}]),
        json!({"id": 0}),
    ] {
        let (st, e) = s.post("/lora-adapters", &bad);
        assert_eq!(
            (st, error_type(&e)),
            (400, "invalid_request_error"),
            "{bad}"
        );
    }
    let (st, _) = s.post("/lora-adapters", &json!([{"id": 0, "scale": 1.0}]));
    assert_eq!(st, 200);
    assert_eq!(ask("patched"), patched);

    // Audit: the profile's files with their sha256, in the list and in the response.
    let entry = &models["data"][1];
    let files = entry["meta"]["unlearn"]["files"].as_array().unwrap();
    assert!(files.len() >= 2, "{entry}");
    for f in files {
        let h = f["sha256"].as_str().unwrap();
        assert!(
            h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()),
            "{f}"
        );
    }
    assert_eq!(entry["meta"]["unlearn"]["patches"][0]["scale"], 1.0);
    assert_eq!(models["data"][0]["meta"]["unlearn"]["files"], json!([]));

    // Logprobs come from the distribution sampled from: they differ between the base and
    // the profile, and sum (exp) to at most 1.
    let probs = |model: &str| {
        let b = json!({"model": model, "prompt": "The capital of France is", "n_predict": 4,
                       "temperature": 0, "n_probs": 5});
        let (st, r) = s.post("/completion", &b);
        assert_eq!(st, 200, "{r}");
        assert_eq!(r["generation_settings"]["model"], model);
        assert_eq!(
            r["generation_settings"]["unlearn"],
            entry_of(&models, model)["meta"]["unlearn"]
        );
        let cp = r["completion_probabilities"].as_array().unwrap().clone();
        assert_eq!(cp.len(), 4);
        for t in &cp {
            let top = t["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 5);
            let sum: f64 = top
                .iter()
                .map(|e| e["logprob"].as_f64().unwrap().exp())
                .sum();
            assert!(sum <= 1.0 + 1e-4, "{sum}");
            // Greedy: the sampled token is the most likely one.
            assert_eq!(t["id"], top[0]["id"]);
            assert!(t["logprob"].as_f64().unwrap() <= 0.0);
        }
        cp
    };
    let (pb, pp) = (probs("base"), probs("patched"));
    assert_ne!(pb, pp, "the profile's logprobs are its own");
    let mut b = chat_body(PROMPT, 3);
    b["model"] = json!("patched");
    b["logprobs"] = json!(true);
    b["top_logprobs"] = json!(2);
    let (st, r) = s.post("/v1/chat/completions", &b);
    assert_eq!(st, 200, "{r}");
    let content = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(content[0]["bytes"].is_array() && content[0]["token"].is_string());
    let ob = json!({"model": "patched", "prompt": "The capital of France is", "max_tokens": 2,
                    "temperature": 0, "logprobs": 3, "stream": true});
    let (st, _, text) = s.post_stream("/v1/completions", &ob);
    assert_eq!(st, 200);
    let n: usize = events(&text)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .map(|a| a.len())
        })
        .sum();
    assert_eq!(n, 2, "{text}");
    drop(s);

    // --default-model: a request without `model` gets it.
    let s = Server::start(&[
        "--profile",
        p,
        "--alias",
        "base",
        "--default-model",
        "patched",
    ]);
    let (st, r) = s.post("/v1/chat/completions", &chat_body(PROMPT, 12));
    assert_eq!(st, 200);
    assert_eq!(r["model"], "patched");
    drop(s);

    let s = Server::start(&["--profile", p, "--alias", "base", "--lock"]);
    let (_, text) = s.get("/v1/models");
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 1);
    assert_eq!(models["data"][0]["id"], "patched");
    // Under --lock (no key to show), no file names, hashes or scales.
    assert!(models["data"][0]["meta"].get("unlearn").is_none(), "{text}");
    assert!(!text.contains("lora.gguf"), "{text}");
    let mut b = chat_body(PROMPT, 12);
    b["model"] = json!("base");
    let (st, e) = s.post("/v1/chat/completions", &b);
    assert_eq!((st, error_type(&e)), (404, "not_found_error"));
    // Per-request overrides and new scales are refused under --lock.
    for extra in [
        json!({"lora": [{"id": 0, "scale": 0.0}]}),
        json!({"unlearn": {"alpha": 0.0}}),
    ] {
        let mut b = chat_body(PROMPT, 2);
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (st, e) = s.post("/v1/chat/completions", &b);
        assert_eq!((st, error_type(&e)), (403, "permission_error"), "{extra}");
    }
    let (st, e) = s.post("/lora-adapters", &json!([{"id": 0, "scale": 0.0}]));
    assert_eq!((st, error_type(&e)), (403, "permission_error"));
    // No model: the first profile.
    let (st, r) = s.post("/v1/chat/completions", &chat_body(PROMPT, 12));
    assert_eq!(st, 200);
    assert_eq!(r["model"], "patched");
    // Its settings name the profile, not its files.
    let (st, c) = s.post(
        "/completion",
        &json!({"prompt": PROMPT, "n_predict": 2, "temperature": 0}),
    );
    assert_eq!(st, 200, "{c}");
    assert_eq!(
        c["generation_settings"]["unlearn"],
        json!({"profile": "patched"}),
        "{c}"
    );
    assert_eq!(r["choices"][0]["message"]["content"], patched.as_str());
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A ULD profile: a request's `unlearn` overrides alpha and filter for that request only;
/// alpha 0 gives the base's greedy text.
#[test]
fn unlearn_per_request() {
    let model = common::model_path("smollm2");
    let dir = std::env::temp_dir().join(format!("lethe-serve-uld-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(BIN)
        .args(["forge", "assistant", "-m"])
        .arg(&model)
        .args(["--layers", "4", "-o"])
        .arg(dir.join("assistant.gguf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prof = dir.join("profiles.toml");
    std::fs::write(
        &prof,
        format!(
            "[[profile]]\nname = \"uld\"\nbase = {:?}\n\n[[profile.assistant]]\nmodel = \"assistant.gguf\"\nalpha = 1.0\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let s = Server::start(&[
        "--profile",
        prof.to_str().unwrap(),
        "--alias",
        "base",
        "-np",
        "1",
    ]);
    let ask = |model: &str, unlearn: Option<Value>| {
        let mut b = json!({"model": model, "prompt": "The capital of France is",
                           "n_predict": 12, "temperature": 0});
        if let Some(u) = unlearn {
            b["unlearn"] = u;
        }
        let (st, r) = s.post("/completion", &b);
        assert_eq!(st, 200, "{r}");
        (
            r["content"].as_str().unwrap().to_string(),
            r["generation_settings"]["unlearn"]["assistants"][0].clone(),
        )
    };
    let (base, _) = ask("base", None);
    let (uld, a) = ask("uld", None);
    assert_eq!(
        (a["alpha"].as_f64(), a["filter"].as_f64()),
        (Some(1.0), Some(0.01f32 as f64))
    );
    assert_ne!(uld, base, "the assistant changes the text");
    let (zero, a) = ask("uld", Some(json!({"alpha": 0})));
    assert_eq!(zero, base, "alpha 0: the target's greedy text");
    assert_eq!(a["alpha"], 0.0);
    let (strong, a) = ask("uld", Some(json!({"alpha": 4, "filter": 0.2})));
    assert_ne!(strong, uld, "another alpha, another text");
    assert_eq!(
        (a["alpha"].as_f64(), a["filter"].as_f64()),
        (Some(4.0), Some(0.2f32 as f64))
    );
    assert_eq!(ask("uld", None).0, uld, "the override was for one request");
    // The one slot's cache serves a repeated setting, never another one.
    let cached = |unlearn: Value| {
        let b = json!({"model": "uld", "prompt": "The capital of France is", "n_predict": 1,
                       "temperature": 0, "unlearn": unlearn});
        let (st, r) = s.post("/completion", &b);
        assert_eq!(st, 200, "{r}");
        r["timings"]["cache_n"].as_u64().unwrap()
    };
    assert!(cached(json!({"alpha": 2})) == 0);
    assert!(
        cached(json!({"alpha": 2})) > 0,
        "the same setting reuses the cache"
    );
    assert_eq!(cached(json!({"alpha": 3})), 0, "another alpha starts over");
    assert_eq!(cached(json!({"alpha": 3, "filter": 0.5})), 0);
    assert_eq!(
        cached(json!({})),
        0,
        "the profile's default is another setting"
    );
    for bad in [
        json!({"alpha": "x"}),
        json!({"filter": 1.0}),
        json!({"filter": -0.1}),
        json!({"beta": 1}),
        json!({"alpha": -0.5}),
        json!(3),
    ] {
        let b = json!({"model": "uld", "prompt": "Hi", "n_predict": 1, "unlearn": bad});
        let (st, e) = s.post("/completion", &b);
        assert_eq!(
            (st, error_type(&e)),
            (400, "invalid_request_error"),
            "{bad}"
        );
    }
    let b = json!({"model": "base", "prompt": "Hi", "n_predict": 1, "unlearn": {"alpha": 1}});
    let (st, e) = s.post("/completion", &b);
    assert_eq!((st, error_type(&e)), (400, "invalid_request_error"));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/props`, `/slots` and `/metrics` (with `--metrics`), CORS, and keys from
/// `--api-key-file`.
#[test]
fn props_slots_metrics_cors_key_file() {
    let model = common::model_path("smollm2");
    let dir = std::env::temp_dir().join(format!("lethe-serve-props-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.txt");
    std::fs::write(&keys, "first\n\n  second  \n").unwrap();
    let m = model.to_str().unwrap();
    let s = Server::start(&[
        "-m",
        m,
        "-np",
        "2",
        "-c",
        "256",
        "--metrics",
        "--api-key-file",
        keys.to_str().unwrap(),
    ]);
    let key = [("X-Api-Key", "second")];
    let get = |path: &str| {
        let (st, _, body) = s.request("GET", path, &key, b"");
        (st, body)
    };

    // Keys from the file; none or a wrong one: 401.
    assert_eq!(s.get("/props").0, 401);
    let (st, _, _) = s.request("GET", "/props", &[("Authorization", "Bearer first")], b"");
    assert_eq!(st, 200);
    let (st, _, _) = s.request("GET", "/props", &[("X-Api-Key", "third")], b"");
    assert_eq!(st, 401);

    let (st, props) = get("/props");
    assert_eq!(st, 200);
    let props: Value = serde_json::from_str(&props).unwrap();
    assert_eq!(props["total_slots"], 2);
    assert!(props["model_path"].as_str().unwrap().ends_with(".gguf"));
    assert!(!props["chat_template"].as_str().unwrap().is_empty());
    // -c is shared by the slots, as in llama-server: 256 / 2 a slot.
    assert_eq!(props["default_generation_settings"]["n_ctx"], 128);
    let build = props["build_info"].as_str().unwrap();
    assert!(
        build.starts_with('b') && build.ends_with("-lethe"),
        "{build}"
    );

    let (st, slots) = get("/slots");
    assert_eq!(st, 200);
    let slots: Value = serde_json::from_str(&slots).unwrap();
    let slots = slots.as_array().unwrap();
    assert_eq!(slots.len(), 2);
    for (i, sl) in slots.iter().enumerate() {
        assert_eq!(sl["id"], i);
        assert_eq!(sl["n_ctx"], 128);
        assert_eq!(sl["is_processing"], false);
        // As in llama-server: a slot that never ran a task has no params or next token.
        assert!(
            sl.get("params").is_none() && sl.get("next_token").is_none(),
            "{sl}"
        );
    }

    let body = json!({"prompt": "The capital of France is", "n_predict": 4, "temperature": 0});
    let (st, _, r) = s.request("POST", "/completion", &key, body.to_string().as_bytes());
    assert_eq!(st, 200, "{r}");
    // The slot that ran it is idle again: no budget left, nothing being decoded.
    let (_, slots) = get("/slots");
    let slots: Value = serde_json::from_str(&slots).unwrap();
    let used: Vec<&Value> = slots
        .as_array()
        .unwrap()
        .iter()
        .filter(|sl| sl.get("next_token").is_some())
        .collect();
    assert_eq!(used.len(), 1, "{slots}");
    assert_eq!(used[0]["next_token"][0]["n_remain"], -1);
    assert_eq!(used[0]["next_token"][0]["n_decoded"], 0);
    assert_eq!(used[0]["is_processing"], false);
    let (st, headers, text) = s.request("GET", "/metrics", &key, b"");
    assert_eq!(st, 200);
    let started: u64 = header(&headers, "process-start-time-unix")
        .expect("Process-Start-Time-Unix")
        .parse()
        .unwrap();
    assert!(started > 1_700_000_000);
    assert!(header(&headers, "content-type")
        .unwrap()
        .starts_with("text/plain"));
    let metric = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("llamacpp:{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    };
    assert!(text.contains("# TYPE llamacpp:prompt_tokens_total counter"));
    assert!(metric("prompt_tokens_total") >= 5.0);
    // One request so far: nothing came from a cache.
    assert_eq!(metric("prompt_tokens_cached_total"), 0.0);
    assert_eq!(metric("tokens_predicted_total"), 4.0);
    assert_eq!(metric("requests_processing"), 0.0);
    assert_eq!(metric("requests_deferred"), 0.0);
    assert!(metric("n_decode_total") >= 4.0);

    // CORS: the Origin is echoed; a preflight gets the methods and headers.
    let (st, headers, _) = s.request("GET", "/health", &[("Origin", "http://example.org")], b"");
    assert_eq!(st, 200);
    assert_eq!(
        header(&headers, "access-control-allow-origin").as_deref(),
        Some("http://example.org")
    );
    let (st, headers, _) = s.request(
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", "http://example.org"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type",
            ),
        ],
        b"",
    );
    assert_eq!(st, 200);
    assert_eq!(
        header(&headers, "access-control-allow-origin").as_deref(),
        Some("http://example.org")
    );
    assert_eq!(
        header(&headers, "access-control-allow-methods").as_deref(),
        Some("GET, POST, DELETE, OPTIONS")
    );
    assert_eq!(
        header(&headers, "access-control-allow-headers").as_deref(),
        Some("*")
    );
    // Header names go out as llama-server writes them.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nOrigin: http://example.org\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    c.read_to_string(&mut raw).unwrap();
    assert!(
        raw.contains("\r\nAccess-Control-Allow-Origin: http://example.org\r\n"),
        "{raw}"
    );
    drop(s);

    // --cors-origins localhost: only local origins are echoed. The server also takes
    // llama-server's flags that do not apply here, as the suite passes them.
    let s = Server::start(&[
        "-m",
        m,
        "--cors-origins",
        "localhost",
        "--offline",
        "-b",
        "512",
        "-ub",
        "512",
        "-fa",
        "on",
        "--kv-unified",
        "--swa-full",
        "--verbose",
        "-ngl",
        "99",
        "--reasoning",
        "off",
        "--slot-save-path",
        "/nonexistent",
    ]);
    for (origin, echoed) in [
        ("http://localhost:3000", true),
        ("http://[::1]", true),
        ("http://evil.com", false),
        ("http://localhost.evil.com", false),
    ] {
        let (st, headers, _) = s.request(
            "OPTIONS",
            "/completions",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
            ],
            b"",
        );
        assert_eq!(st, 200);
        let got = header(&headers, "access-control-allow-origin");
        assert_eq!(got.as_deref(), echoed.then_some(origin), "{origin}");
    }
    drop(s);

    // --chat-template-file: the file's Jinja source is the template.
    let tf = dir.join("template.jinja");
    std::fs::write(
        &tf,
        "{% for m in messages %}<<{{ m.content }}>>{% endfor %}|{{ date_string }}|{{ datetime }}",
    )
    .unwrap();
    let s = Server::start(&["-m", m, "--chat-template-file", tf.to_str().unwrap()]);
    let (st, r) = s.post(
        "/apply-template",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(st, 200, "{r}");
    // Today's date as llama.cpp hands it to templates: "03 Dec 2026" and "Dec 03 2026".
    let parts: Vec<&str> = r["prompt"].as_str().unwrap().split('|').collect();
    assert_eq!(parts[0], "<<hi>>");
    let (d, t) = (parts[1], parts[2]);
    assert_eq!((d.len(), t.len()), (11, 11), "{d} {t}");
    assert_eq!((&d[..2], &d[3..6]), (&t[4..6], &t[..3]), "{d} {t}");
    assert_eq!(&d[7..], &t[7..]);
    drop(s);

    // --no-slots, and no --metrics: 501 for both, as llama-server answers.
    let s = Server::start(&["-m", m, "--no-slots"]);
    for path in ["/slots", "/metrics"] {
        let (st, body) = s.get(path);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!((st, error_type(&v)), (501, "not_supported_error"), "{path}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that goes away mid-stream frees its slot: with one slot, the next request runs.
#[test]
fn disconnect_frees_the_slot() {
    let model = common::model_path("smollm2");
    let s = Server::start(&["-m", model.to_str().unwrap(), "-np", "1"]);
    let body = json!({
        "prompt": "Once upon a time",
        "n_predict": 100000,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
    })
    .to_string();
    let mut c = TcpStream::connect(&s.addr).unwrap();
    write!(
        c,
        "POST /completion HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut first = [0u8; 256];
    let n = c.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(c);
    let (st, r) = s.post(
        "/completion",
        &json!({"prompt": "The capital of France is", "n_predict": 4, "temperature": 0}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["tokens_predicted"], 4);
}

/// `logit_bias` in llama-server's forms changes what is sampled: the greedy continuation's
/// first token banned by id (an array of pairs), by an id as an object key (OpenAI's form)
/// and by its text; a positive bias makes a chosen token the greedy pick; the settings are
/// echoed in `generation_settings.logit_bias`, `ignore_eos` bans the end-of-generation tokens
/// there (the null bias is llama-server's -inf), and malformed entries are 400s naming them.
#[test]
fn logit_bias_is_applied() {
    let model = common::model_path("smollm2");
    let s = Server::start(&["-m", model.to_str().unwrap()]);
    let ask = |bias: Value| {
        let (st, r) = s.post(
            "/completion",
            &json!({"prompt": "The capital of France is", "n_predict": 3, "temperature": 0,
                    "logit_bias": bias, "n_probs": 1}),
        );
        assert_eq!(st, 200, "{r}");
        r
    };
    let plain = ask(Value::Null);
    let first = plain["completion_probabilities"][0]["id"].as_u64().unwrap();
    let text = plain["completion_probabilities"][0]["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(plain["generation_settings"]["logit_bias"], json!([]));
    for bias in [
        json!([[first, -100]]),
        json!([[first, false]]),
        json!({ first.to_string(): -100 }),
        json!([[text.clone(), false]]),
        json!({ text.clone(): false }),
    ] {
        let r = ask(bias.clone());
        let got = r["completion_probabilities"][0]["id"].as_u64().unwrap();
        assert_ne!(got, first, "{bias}: {r}");
        assert_ne!(r["content"], plain["content"], "{bias}");
    }
    let r = ask(json!([[first, -100]]));
    assert_eq!(
        r["generation_settings"]["logit_bias"],
        json!([{"bias": -100.0, "token": first}])
    );
    assert_eq!(
        ask(json!([[first, false]]))["generation_settings"]["logit_bias"][0]["bias"],
        Value::Null
    );
    // A token far down the list, pushed up to be the pick.
    let (_, t) = s.post("/tokenize", &json!({"content": " zebra"}));
    let zebra = t["tokens"][0].as_u64().unwrap();
    let r = ask(json!({ zebra.to_string(): 100 }));
    assert_eq!(r["completion_probabilities"][0]["id"], zebra, "{r}");

    // ignore_eos: every end-of-generation token banned, as llama-server lists them.
    let (st, r) = s.post(
        "/completion",
        &json!({"prompt": "Hi", "n_predict": 2, "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(st, 200, "{r}");
    let lb = r["generation_settings"]["logit_bias"].as_array().unwrap();
    assert!(!lb.is_empty(), "{r}");
    assert!(lb.iter().all(|e| e["bias"].is_null()), "{r}");

    // Malformed: a 400 that names the problem; the server goes on.
    for (bias, says) in [
        (json!([[49152, -1]]), "not in the vocabulary"),
        (json!({"-3": -1}), "not in the vocabulary"),
        (json!([[1, true]]), "number or false"),
        (json!([[1, "x"]]), "number or false"),
        (json!([1, 2]), "pairs"),
        (json!("x"), "pairs"),
        (json!([[1.5, 1]]), "integer token ids"),
    ] {
        let (st, r) = s.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
                    "logit_bias": bias}),
        );
        assert_eq!(st, 400, "{bias}: {r}");
        let msg = r["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("logit_bias") && msg.contains(says),
            "{bias}: {msg}"
        );
    }
    assert_eq!(s.get("/health").0, 200);
}

/// A client that sends long distinct words (nothing for the tokenizer's word cache to share)
/// must not grow the server's memory without bound: the cache keeps only short words, and
/// what one request allocates is given back. Twelve 1 MiB words, then memory measured after
/// each: after the first few (the allocator's high-water mark) it stays flat.
#[test]
fn long_words_do_not_grow_memory() {
    let model = common::model_path("smollm2");
    let s = Server::start(&["-m", model.to_str().unwrap(), "-c", "64"]);
    let Some(start) = s.rss_mib() else {
        eprintln!("no /proc: memory not measured");
        return;
    };
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut rss = Vec::new();
    for _ in 0..12 {
        // 1 MiB of pseudo-random letters: one word, different every time.
        let word: String = (0..1 << 20)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (b'a' + (state % 26) as u8) as char
            })
            .collect();
        let (st, r) = s.post("/tokenize", &json!({ "content": word }));
        assert_eq!(st, 200);
        assert!(r["tokens"].as_array().unwrap().len() > 100_000);
        rss.push(s.rss_mib().unwrap());
    }
    eprintln!("RSS {start} MiB at start, then {rss:?}");
    let plateau = rss[3];
    let last = *rss.last().unwrap();
    assert!(
        last <= plateau + 24,
        "memory grew from {plateau} to {last} MiB over 8 more long words: {rss:?}"
    );
    assert!(last <= start + 160, "{start} -> {rss:?} MiB");
}

/// Tokenizing large bodies runs off the HTTP workers: while three clients tokenize 3 MiB
/// words each (seconds of work), `/health` keeps answering at once.
#[test]
fn health_answers_while_large_bodies_tokenize() {
    let model = common::model_path("smollm2");
    let s = std::sync::Arc::new(Server::start(&["-m", model.to_str().unwrap(), "-c", "64"]));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..3u8)
        .map(|k| {
            let (s, done) = (s.clone(), done.clone());
            std::thread::spawn(move || {
                let word: String = (0..3usize << 20)
                    .map(|i| (b'a' + ((i * 7 + i / 26 + k as usize) % 26) as u8) as char)
                    .collect();
                let (st, _) = s.post("/tokenize", &json!({ "content": word }));
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                st
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut worst = std::time::Duration::ZERO;
    let mut n = 0;
    while done.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        let t = std::time::Instant::now();
        assert_eq!(s.get("/health").0, 200);
        worst = worst.max(t.elapsed());
        n += 1;
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for c in clients {
        assert_eq!(c.join().unwrap(), 200);
    }
    eprintln!("/health: {n} checks while tokenizing, the slowest {worst:?}");
    assert!(
        n >= 3,
        "the tokenizing ended too soon to measure ({n} checks)"
    );
    assert!(
        worst < std::time::Duration::from_millis(250),
        "/health took {worst:?} while large bodies were tokenized"
    );
}

/// A stop signal lets running requests finish until `--shutdown-timeout`, then ends their
/// generations: an endless stream gets its final event and closes, and the server exits.
#[test]
fn stop_signal_ends_endless_streams_at_the_deadline() {
    let model = common::model_path("smollm2");
    let m = model.to_str().unwrap();
    let mut s = Server::start(&["-m", m, "-c", "2048", "--shutdown-timeout", "1"]);
    let endless = json!({"prompt": "Once upon a time", "n_predict": -1, "ignore_eos": true,
                         "stream": true});
    let mut stream = s.open_stream("/completion", &endless);
    let t = std::time::Instant::now();
    s.signal("TERM");
    let mut rest = String::new();
    stream.read_to_string(&mut rest).expect("the stream closes");
    let ended = t.elapsed();
    // The rest of the chunked body: the last event is the final one.
    let at = rest.rfind("data: ").expect("a final event") + "data: ".len();
    let last = rest[at..].lines().next().unwrap();
    let v: Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["stop"], true, "{last}");
    assert_eq!(v["stop_type"], "none", "{last}");
    assert!(
        ended >= std::time::Duration::from_millis(900),
        "ended before the deadline: {ended:?}"
    );
    let code = s.wait_exit(std::time::Duration::from_secs(10));
    assert_eq!(code, Some(0), "the server exits after draining");
    eprintln!(
        "stream ended {ended:?} after SIGTERM; exited after {:?}",
        t.elapsed()
    );
}

/// A second stop signal exits at once, whatever is running.
#[test]
fn second_stop_signal_exits_at_once() {
    let model = common::model_path("smollm2");
    let m = model.to_str().unwrap();
    let mut s = Server::start(&["-m", m, "-c", "2048", "--shutdown-timeout", "600"]);
    let endless = json!({"prompt": "Once upon a time", "n_predict": -1, "ignore_eos": true,
                         "stream": true});
    let _stream = s.open_stream("/completion", &endless);
    s.signal("TERM");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(s.wait_exit(std::time::Duration::ZERO), None, "draining");
    let t = std::time::Instant::now();
    s.signal("INT");
    let code = s.wait_exit(std::time::Duration::from_secs(5));
    assert!(code.is_some(), "still running 5 s after the second signal");
    eprintln!("exited {:?} after the second signal", t.elapsed());
}

/// Half-sent requests cannot hold the server: headers not finished within `--header-timeout`
/// close the connection, a body not finished within `--timeout` is a 408, and with
/// `--max-connections` taken by such clients `/health` waits at most about one header
/// deadline.
#[test]
fn half_sent_requests_time_out() {
    use std::time::{Duration, Instant};
    let model = common::model_path("smollm2");
    let m = model.to_str().unwrap();
    let s = Server::start(&[
        "-m",
        m,
        "-c",
        "64",
        "--header-timeout",
        "1",
        "--timeout",
        "1",
        "--max-connections",
        "40",
    ]);
    // 40 connections (the cap): half a header each, or nothing at all.
    let t = Instant::now();
    let mut slow: Vec<TcpStream> = (0..40)
        .map(|k| {
            let mut c = TcpStream::connect(&s.addr).unwrap();
            if k % 2 == 0 {
                c.write_all(b"POST /completion HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
            }
            c
        })
        .collect();
    // /health needs a connection of its own: it gets one once the deadline frees them.
    assert_eq!(s.get("/health").0, 200);
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(5), "/health waited {waited:?}");
    // Every slow connection was closed by the server.
    for c in &mut slow {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let r = c.read_to_end(&mut buf);
        assert!(r.is_ok(), "still open: {r:?}");
    }
    let closed = t.elapsed();
    // A body that stops halfway: 408 in the envelope.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"",
    )
    .unwrap();
    let t = Instant::now();
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let (st, _, body) = common::serve::parse_response(&raw);
    let e: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("JSON: {body}"));
    assert_eq!((st, error_type(&e)), (408, "timeout_error"));
    assert!(t.elapsed() < Duration::from_secs(5));
    eprintln!(
        "/health after {waited:?}; slow connections closed after {closed:?}; 408 after {:?}",
        t.elapsed()
    );
    // And the server goes on serving.
    assert_eq!(s.post("/tokenize", &json!({"content": "hi"})).0, 200);
}
