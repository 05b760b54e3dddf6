//! `lethe serve` spoken to with the official OpenAI Python SDK (`tests/fixtures/openai_client.py`):
//! chat and text completions, streamed and not, at temperature 0, against the base model and a
//! patched profile, with a `base_url` ending in `/v1` and without it. The test fails (never
//! skips) when the `openai` package is missing.

mod common;

use common::serve::Server;

use serde_json::Value;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_lethe");
const MAX_TOKENS: u64 = 16;

/// Run the SDK script against `root` for `models`; its JSON report.
fn run_client(root: &str, models: &[&str]) -> Value {
    let python = common::python();
    let script = common::fixture("openai_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(root)
        .args(models)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!(
            "{stderr}\n{}",
            common::python::missing("the OpenAI Python SDK", &python)
        );
    }
    assert!(out.status.success(), "openai_client.py failed: {stderr}");
    serde_json::from_slice(&out.stdout).expect("openai_client.py prints JSON")
}

/// Usage numbers as the SDK parsed them, checked for consistency; (prompt, completion).
fn check_usage(u: &Value, finish: &str, what: &str) -> (u64, u64) {
    let p = u["prompt_tokens"].as_u64().expect("prompt_tokens");
    let c = u["completion_tokens"].as_u64().expect("completion_tokens");
    let t = u["total_tokens"].as_u64().expect("total_tokens");
    assert!(p > 0, "{what}: no prompt tokens: {u}");
    assert!(c > 0 && c <= MAX_TOKENS, "{what}: completion tokens: {u}");
    assert_eq!(t, p + c, "{what}: total = prompt + completion: {u}");
    if finish == "length" {
        assert_eq!(c, MAX_TOKENS, "{what}: ended on length before max_tokens");
    }
    (p, c)
}

/// One row of the report: (base_url, model, api, stream).
fn row<'a>(rows: &'a [Value], base_url: &str, model: &str, api: &str, stream: bool) -> &'a Value {
    rows.iter()
        .find(|r| {
            r["base_url"] == base_url
                && r["model_asked"] == model
                && r["api"] == api
                && r["stream"] == stream
        })
        .unwrap_or_else(|| panic!("no result for {base_url} {model} {api} stream={stream}"))
}

/// Check one model's calls through one base URL; returns (chat text, completion text).
fn check_model(rows: &[Value], base_url: &str, model: &str) -> (String, String) {
    let v1 = base_url.ends_with("/v1");
    let prefix = if v1 { "/v1" } else { "" };

    // Chat, not streamed.
    let r = &row(rows, base_url, model, "chat", false)["result"];
    let what = format!("{base_url} {model} chat");
    assert_eq!(r["object"], "chat.completion", "{what}: {r}");
    assert_eq!(r["model"], model, "{what}: model echoes the id");
    assert_eq!(r["choices"], 1, "{what}");
    assert_eq!(r["role"], "assistant", "{what}");
    assert!(
        r["id"].as_str().unwrap().starts_with("chatcmpl-"),
        "{what}: {r}"
    );
    let chat = r["text"].as_str().expect("chat text").to_string();
    assert!(!chat.trim().is_empty(), "{what}: empty text");
    let finish = r["finish_reason"].as_str().expect("finish_reason");
    assert!(matches!(finish, "stop" | "length"), "{what}: {finish}");
    let usage = check_usage(&r["usage"], finish, &what);

    // Chat, streamed: the same text, finish reason and usage.
    let s = &row(rows, base_url, model, "chat", true)["result"];
    let what = format!("{base_url} {model} chat stream");
    assert!(s["chunks"].as_u64().unwrap() >= 3, "{what}: {s}");
    for o in s["objects"].as_array().unwrap() {
        assert_eq!(o, "chat.completion.chunk", "{what}");
    }
    for m in s["models"].as_array().unwrap() {
        assert_eq!(m, model, "{what}: every chunk echoes the id");
    }
    let ids = s["ids"].as_array().unwrap();
    assert!(
        ids.iter().all(|i| i == &ids[0]),
        "{what}: one id per stream"
    );
    assert_eq!(s["roles"], serde_json::json!(["assistant"]), "{what}");
    assert_eq!(
        s["text"],
        chat.as_str(),
        "{what}: streamed text == not streamed"
    );
    assert_eq!(s["finish_reason"], finish, "{what}");
    assert_eq!(
        check_usage(&s["usage"], finish, &what),
        usage,
        "{what}: usage as not streamed"
    );

    for stream in [false, true] {
        let r = row(rows, base_url, model, "chat", stream);
        assert_eq!(
            r["paths"],
            serde_json::json!([format!("{prefix}/chat/completions")]),
            "the SDK's request path"
        );
    }

    if !v1 {
        return (chat, check_native(rows, base_url, model));
    }

    // Text completion, not streamed.
    let r = &row(rows, base_url, model, "completion", false)["result"];
    let what = format!("{base_url} {model} completion");
    assert_eq!(r["object"], "text_completion", "{what}: {r}");
    assert_eq!(r["model"], model, "{what}: model echoes the id");
    assert_eq!(r["choices"], 1, "{what}");
    assert!(
        r["id"].as_str().unwrap().starts_with("cmpl-"),
        "{what}: {r}"
    );
    let text = r["text"].as_str().expect("completion text").to_string();
    assert!(!text.trim().is_empty(), "{what}: empty text");
    let finish = r["finish_reason"].as_str().expect("finish_reason");
    assert!(matches!(finish, "stop" | "length"), "{what}: {finish}");
    let usage = check_usage(&r["usage"], finish, &what);

    // Text completion, streamed.
    let s = &row(rows, base_url, model, "completion", true)["result"];
    let what = format!("{base_url} {model} completion stream");
    assert!(s["chunks"].as_u64().unwrap() >= 2, "{what}: {s}");
    for o in s["objects"].as_array().unwrap() {
        assert_eq!(o, "text_completion", "{what}");
    }
    for m in s["models"].as_array().unwrap() {
        assert_eq!(m, model, "{what}: every chunk echoes the id");
    }
    let ids = s["ids"].as_array().unwrap();
    assert!(
        ids.iter().all(|i| i == &ids[0]),
        "{what}: one id per stream"
    );
    assert_eq!(
        s["text"],
        text.as_str(),
        "{what}: streamed text == not streamed"
    );
    assert_eq!(s["finish_reason"], finish, "{what}");
    assert_eq!(
        check_usage(&s["usage"], finish, &what),
        usage,
        "{what}: usage as not streamed"
    );
    for stream in [false, true] {
        let r = row(rows, base_url, model, "completion", stream);
        assert_eq!(
            r["paths"],
            serde_json::json!(["/v1/completions"]),
            "the SDK's request path"
        );
    }
    (chat, text)
}

/// Without `/v1` the SDK's `completions.create` reaches `/completions`, llama-server's native
/// completion route: the raw answer is the native object (`content`, `stop`), streamed as
/// `data:` events ending on `stop: true`, with no `[DONE]`. Returns its text.
fn check_native(rows: &[Value], base_url: &str, model: &str) -> String {
    let r = row(rows, base_url, model, "native_completion", false);
    assert_eq!(r["paths"], serde_json::json!(["/completions"]));
    let r = &r["result"];
    let what = format!("{base_url} {model} /completions");
    assert_eq!(r["status"], 200, "{what}: {r}");
    let body = &r["body"];
    assert_eq!(body["model"], model, "{what}: model echoes the id");
    assert_eq!(body["stop"], true, "{what}");
    assert!(body.get("choices").is_none(), "{what}: the native shape");
    let text = body["content"].as_str().expect("content").to_string();
    assert!(!text.trim().is_empty(), "{what}: empty text");
    assert!(body["tokens_predicted"].as_u64().unwrap() <= MAX_TOKENS);

    let s = row(rows, base_url, model, "native_completion", true);
    assert_eq!(s["paths"], serde_json::json!(["/completions"]));
    let s = &s["result"];
    let what = format!("{what} stream");
    assert_eq!(s["status"], 200, "{what}: {s}");
    let events: Vec<Value> = s["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let l = l.as_str().unwrap();
            let data = l
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("{what}: not an SSE data line: {l}"));
            serde_json::from_str(data).unwrap_or_else(|_| panic!("{what}: not JSON: {l}"))
        })
        .collect();
    let (last, partials) = events.split_last().expect("events");
    assert_eq!(last["stop"], true, "{what}: ends on stop: true");
    assert!(partials.iter().all(|e| e["stop"] == false), "{what}");
    let streamed: String = events
        .iter()
        .map(|e| e["content"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(streamed, text, "{what}: streamed text == not streamed");
    text
}

#[test]
fn openai_sdk_against_base_and_profile() {
    let model = common::model_path("smollm2");
    let dir = std::env::temp_dir().join(format!("lethe-serve-openai-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lora = dir.join("lora.gguf");
    let out = Command::new(BIN)
        .args(["patch", "random", "-m"])
        .arg(&model)
        .args(["--rank", "8", "--blocks", "0..2", "--std", "0.05", "-o"])
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
            "[[profile]]\nname = \"forget\"\nbase = {:?}\n\n[[profile.patch]]\nfile = \"lora.gguf\"\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();

    let s = Server::start(&[
        "-m",
        model.to_str().unwrap(),
        "--profile",
        prof.to_str().unwrap(),
        "--alias",
        "base",
    ]);
    let root = format!("http://{}", s.addr);
    let report = run_client(&root, &["base", "forget"]);
    drop(s);
    let rows = report["results"].as_array().expect("results");
    assert_eq!(rows.len(), 17, "{report}");
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| r.get("error").is_some())
        .map(|r| {
            format!(
                "{} {} {} stream={}: {}",
                r["base_url"], r["model_asked"], r["api"], r["stream"], r["error"]
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "SDK calls failed (openai {}):\n{}",
        report["openai"],
        failed.join("\n")
    );

    let v1 = format!("{root}/v1");
    // logit_bias through the SDK (an object of token ids as strings): the banned first word
    // is gone from the answer's start.
    let lb = &row(rows, &v1, "base", "logit_bias", false)["result"];
    let (word, after) = (lb["word"].as_str().unwrap(), lb["after"].as_str().unwrap());
    assert!(!lb["ids"].as_array().unwrap().is_empty(), "{lb}");
    assert_ne!(lb["before"], lb["after"], "{lb}");
    assert_ne!(after.split_whitespace().next(), Some(word), "{lb}");
    let (base_chat, base_text) = check_model(rows, &v1, "base");
    let (forget_chat, forget_text) = check_model(rows, &v1, "forget");
    assert_ne!(
        base_chat, forget_chat,
        "the profile changes the chat answer"
    );
    assert_ne!(base_text, forget_text, "the profile changes the completion");
    // Without /v1: the same answers through /chat/completions and /completions.
    assert_eq!(
        check_model(rows, &root, "base"),
        (base_chat, base_text),
        "{root}: base"
    );
    assert_eq!(
        check_model(rows, &root, "forget"),
        (forget_chat, forget_text),
        "{root}: forget"
    );
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
