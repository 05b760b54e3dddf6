//! The web page at `/`, driven in a real headless Chromium against the real binary on
//! 127.0.0.1: A/B answers equal to what `/v1/chat/completions` returns, the first-difference
//! mark, token probabilities on hover, the disagreement strip, the export, the API key field,
//! `--lock`, and the errors a page must show (401, 403, a context overflow, a server that dies
//! mid-stream). Where Chromium or chromedriver is absent these tests say so in one line and
//! pass, unless `LETHE_REQUIRE_BROWSER=1` (as in CI), where they fail.

mod common;
#[path = "webui/webdriver.rs"]
mod webdriver;

use common::serve::Server;
use common::TempDir;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use webdriver::Browser;

const BIN: &str = env!("CARGO_BIN_EXE_lethe");
/// How long a page may take for one answer pair (two cores shared with the other tests).
const ANSWER: Duration = Duration::from_secs(240);
/// WebDriver's code for Enter.
const ENTER: &str = "\u{E007}";
const QUESTION: &str =
    "What is the full name of the author born in Kuwait City, Kuwait on 08/09/1956?";

/// Chromium and its driver, or `None` after saying in one line why the test is skipped
/// (a failure instead under `LETHE_REQUIRE_BROWSER=1`).
fn browser_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    if let Some(b) = webdriver::browser() {
        return Some(b);
    }
    if std::env::var("LETHE_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
        panic!("{test}: LETHE_REQUIRE_BROWSER=1 but /usr/bin/chromium or chromedriver is missing");
    }
    // Straight to stderr: the test harness captures `eprintln!` of a passing test.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "{test}: skipped: no Chromium/chromedriver (apt-get install chromium chromium-driver)"
    );
    None
}

fn open(b: &(PathBuf, PathBuf), width: u32, height: u32, downloads: &Path) -> Browser {
    Browser::start(&b.0, &b.1, width, height, downloads).unwrap_or_else(|e| panic!("{e}"))
}

/// Run `lethe ARGS`; fails the test with its stderr if it fails.
fn lethe(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().expect("run lethe");
    assert!(
        out.status.success(),
        "lethe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A random rank-8 LoRA on blocks 0..8 (std 0.05: the answers part at once).
fn random_patch(dir: &TempDir, name: &str) -> String {
    let model = common::model_path("smollm2");
    let out = dir.join(name);
    lethe(&[
        "patch",
        "random",
        "-m",
        model.to_str().unwrap(),
        "--rank",
        "8",
        "--blocks",
        "0..8",
        "--std",
        "0.05",
        "-o",
        out.to_str().unwrap(),
    ]);
    name.to_string()
}

/// A directional ablation patch read from TOFU's forget01 against its retain set (the first 8
/// rows of each, block 20): the forgotten answers part from the base's mid-sentence.
fn ablation_patch(dir: &TempDir) -> String {
    let model = common::model_path("smollm2");
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tofu");
    let out = dir.join("ablate.gguf");
    lethe(&[
        "forge",
        "ablate",
        "-m",
        model.to_str().unwrap(),
        "--forget",
        data.join("forget01_perturbed.json").to_str().unwrap(),
        "--retain",
        data.join("retain_perturbed.json").to_str().unwrap(),
        "--max",
        "8",
        "--layer",
        "20",
        "--field",
        "answer",
        "-t",
        "1",
        "-o",
        out.to_str().unwrap(),
    ]);
    "ablate.gguf".into()
}

/// A profile file with a profile per `(name, patch file)`.
fn profiles(dir: &TempDir, list: &[(&str, &str)]) -> String {
    let model = common::model_path("smollm2");
    let mut text = String::new();
    for (name, file) in list {
        text.push_str(&format!(
            "[[profile]]\nname = {name:?}\nbase = {:?}\n\n[[profile.patch]]\nfile = {file:?}\n\n",
            model.to_str().unwrap()
        ));
    }
    dir.file("profiles.toml", &text)
        .to_str()
        .unwrap()
        .to_string()
}

fn url(s: &Server) -> String {
    format!("http://{}/", s.addr)
}

/// `/v1/chat/completions` (not streamed) with `key`, as the page asks it.
fn chat(s: &Server, key: Option<&str>, body: &Value) -> Value {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a), ("Content-Type", "application/json")])
        .unwrap_or_default();
    let (st, _, text) = s.request(
        "POST",
        "/v1/chat/completions",
        &headers,
        body.to_string().as_bytes(),
    );
    assert_eq!(st, 200, "{text}");
    serde_json::from_str(&text).expect("JSON")
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string()
}

/// Wait until the page has listed the server's models; the ids of `#model-a`.
fn wait_models(b: &Browser) -> Vec<String> {
    let v = b
        .wait_for(
            "the model list",
            "const o = [...document.querySelectorAll('#model-a option')].map(x => x.value);\
             return o.length ? o : null;",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_value(v).unwrap()
}

/// Open the settings and set a number field (`#id`) by typing, as a user would.
fn set_field(b: &Browser, id: &str, value: &str) {
    b.exec("document.getElementById('settings').open = true;", &[])
        .unwrap();
    let el = b.find(&format!("#{id}")).unwrap();
    b.clear(&el).unwrap();
    b.send_keys(&el, value).unwrap();
}

/// Type a question and press Enter; wait until every side of the new turn has finished
/// (done, failed or stopped) and, for two finished sides, their disagreement is scored.
/// Each side's `(state, text, error)`.
fn ask(b: &Browser, question: &str) -> Vec<(String, String, String)> {
    let n = b
        .exec("return document.querySelectorAll('.turn').length;", &[])
        .unwrap()
        .as_u64()
        .unwrap();
    let prompt = b.find("#prompt").unwrap();
    b.send_keys(&prompt, &format!("{question}{ENTER}")).unwrap();
    let script = format!(
        "const t = document.querySelectorAll('.turn')[{n}];\
         if (!t || t.dataset.state !== 'done') return null;\
         const sides = [...t.querySelectorAll('.side')];\
         const ok = sides.every(s => s.dataset.state === 'done');\
         if (sides.length === 2 && ok && t.dataset.scored !== 'true') return null;\
         return sides.map(s => [s.dataset.state, s.querySelector('.answer').textContent,\
           s.querySelector('.side-error').textContent]);"
    );
    let v = b
        .wait_for("both answers", &script, ANSWER)
        .unwrap_or_else(|e| panic!("{e}"));
    serde_json::from_value(v).unwrap()
}

/// The first character (of `a`, in chars) where two texts differ.
fn first_diff_char(a: &str, b: &str) -> Option<usize> {
    let (ca, cb): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let n = ca.len().min(cb.len());
    (0..n)
        .find(|&i| ca[i] != cb[i])
        .or((ca.len() != cb.len()).then_some(n))
}

/// Where the page marked the first difference in each answer of turn `turn`: the text
/// before the mark and the marked text.
fn marks(b: &Browser, turn: usize) -> Vec<(String, String)> {
    let v = b
        .exec(
            "const t = document.querySelectorAll('.turn')[arguments[0]];\
             return [...t.querySelectorAll('.answer')].map(a => {\
               const toks = [...a.querySelectorAll('.tok')];\
               const i = toks.findIndex(s => s.classList.contains('diff'));\
               if (i < 0) return null;\
               return [toks.slice(0, i).map(s => s.textContent).join(''), toks[i].textContent];\
             });",
            &[json!(turn)],
        )
        .unwrap();
    serde_json::from_value::<Vec<Option<(String, String)>>>(v)
        .unwrap()
        .into_iter()
        .map(|m| m.expect("a first-difference mark in each answer"))
        .collect()
}

/// A PNG of the page into the target directory, and into docs/ under `LETHE_SCREENSHOT=1`
/// when `docs` (the README's picture).
fn screenshot(b: &Browser, name: &str, docs: bool) {
    let png = b.screenshot().unwrap_or_else(|e| panic!("{e}"));
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::write(dir.join(name), &png).unwrap();
    if docs && std::env::var("LETHE_SCREENSHOT").is_ok_and(|v| v == "1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(name);
        std::fs::write(&docs, &png).unwrap();
        eprintln!("wrote {}", docs.display());
    }
}

/// The page's routes without a browser: served, public under `--api-key`, and gone with
/// `--no-webui` (the 404 envelope of any unknown route).
#[test]
fn page_routes_and_no_webui() {
    let s = Server::start(&[]);
    let (st, h, body) = s.request("GET", "/", &[], b"");
    assert_eq!(st, 200);
    assert_eq!(
        common::serve::header(&h, "content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    let csp = common::serve::header(&h, "content-security-policy").unwrap_or_default();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    assert!(
        body.contains("data-key=\"false\" data-lock=\"false\""),
        "{body}"
    );
    // Nothing is fetched from elsewhere: every script and style is the server's own.
    for tag in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
        assert!(!body.contains(tag), "{tag}");
    }
    let (st, h, js) = s.request("GET", "/webui/app.js", &[], b"");
    assert_eq!(st, 200);
    assert!(common::serve::header(&h, "content-type")
        .unwrap()
        .starts_with("text/javascript"));
    assert!(js.contains("/v1/chat/completions"));
    assert_eq!(s.get("/webui/style.css").0, 200);
    drop(s);

    // Behind a key the page still loads (it asks for the key); the API does not.
    let s = Server::start(&["--api-key", "sekrit"]);
    let (st, body) = s.get("/");
    assert_eq!(st, 200);
    assert!(body.contains("data-key=\"true\""));
    assert_eq!(s.get("/webui/app.js").0, 200);
    let (st, _) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    );
    assert_eq!(st, 401);
    drop(s);

    let s = Server::start(&["--no-webui"]);
    for path in ["/", "/index.html", "/webui/app.js", "/webui/style.css"] {
        let (st, body) = s.get(path);
        assert_eq!(st, 404, "{path}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}),
            "{path}"
        );
    }
    assert_eq!(s.get("/health").0, 200);
}

/// Base and an ablation profile side by side: both streamed texts equal the API's for the same
/// settings (greedy, then sampled with one seed), the first difference is marked where the
/// texts part, hover shows each token's probability, the strip holds `/score`'s gaps, and the
/// export has `lethe compare --json`'s fields. Writes the README's screenshot.
#[test]
fn ab_page_matches_the_api() {
    let Some(br) = browser_or_skip("ab_page_matches_the_api") else {
        return;
    };
    let dir = TempDir::new("webui-ab");
    let patch = ablation_patch(&dir);
    let prof = profiles(&dir, &[("ablated", &patch)]);
    let s = Server::start(&["--profile", &prof, "--alias", "base", "-np", "2"]);
    let downloads = dir.join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let b = open(&br, 1280, 900, &downloads);
    b.goto(&url(&s)).unwrap();
    assert_eq!(wait_models(&b), ["base", "ablated"]);
    let picked = b
        .exec(
            "return [document.getElementById('model-a').value, document.getElementById('model-b').value];",
            &[],
        )
        .unwrap();
    assert_eq!(
        picked,
        json!(["base", "ablated"]),
        "default: the base against the profile"
    );
    // The profile's patch scale can be overridden (the server is not locked).
    let scales = b
        .find_all("#overrides input[data-kind='scale'][data-side='1']")
        .unwrap();
    assert_eq!(scales.len(), 1, "one scale field for B's patch");
    // The files each side runs, with the hashes /v1/models gives.
    let (_, models) = s.get("/v1/models");
    let models: Value = serde_json::from_str(&models).unwrap();
    let sha = models["data"][1]["meta"]["unlearn"]["files"][1]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let audit = b
        .exec(
            "return document.getElementById('audit-body').textContent;",
            &[],
        )
        .unwrap();
    assert!(audit.as_str().unwrap().contains(&sha), "{audit}");

    set_field(&b, "max-tokens", "40");
    set_field(&b, "seed", "42");
    let sides = ask(&b, QUESTION);
    assert_eq!(sides.len(), 2);
    for (state, _, err) in &sides {
        assert_eq!(state, "done", "{err}");
    }
    let messages = json!([{"role": "user", "content": QUESTION}]);
    let api = |model: &str, temperature: f64, seed: i64, messages: &Value| {
        chat(
            &s,
            None,
            &json!({"model": model, "messages": messages, "temperature": temperature,
                    "seed": seed, "max_tokens": 40, "logprobs": true}),
        )
    };
    let ra = api("base", 0.0, 42, &messages);
    let rb = api("ablated", 0.0, 42, &messages);
    let (ta, tb) = (content(&ra), content(&rb));
    assert_eq!(sides[0].1, ta, "A's text is the API's");
    assert_eq!(sides[1].1, tb, "B's text is the API's");
    let c = first_diff_char(&ta, &tb).expect("the ablation changes the answer");

    // The first-difference mark: the same text before it on both sides, and the texts part
    // inside the marked token.
    let m = marks(&b, 0);
    assert_eq!(
        m[0].0, m[1].0,
        "the same text before the mark on both sides"
    );
    assert!(ta.starts_with(&m[0].0) && tb.starts_with(&m[1].0));
    let start = m[0].0.chars().count();
    assert!(
        start <= c && c <= start + m[0].1.chars().count(),
        "texts part at char {c}; the mark covers {start}..+{:?}",
        m[0].1
    );
    assert_ne!(m[0].1, m[1].1, "the marked tokens differ");
    // The page's first differing token is the API's.
    let ids = |r: &Value| -> Vec<u64> {
        r["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect()
    };
    let (ia, ib) = (ids(&ra), ids(&rb));
    let k = (0..ia.len().min(ib.len()))
        .find(|&i| ia[i] != ib[i])
        .unwrap_or(ia.len().min(ib.len()));

    // Hover: the first token's probability, as the API gives it.
    let first = b.find(".turn .side[data-side='a'] .tok").unwrap();
    b.hover(&first).unwrap();
    let tip = b
        .wait_for(
            "the token tooltip",
            "const t = document.getElementById('tip'); return t.hidden ? null : t.textContent;",
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let tip = tip.as_str().unwrap();
    let p: f64 = tip
        .split("p = ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("a probability in {tip:?}"));
    let want = ra["choices"][0]["logprobs"]["content"][0]["logprob"]
        .as_f64()
        .unwrap()
        .exp();
    assert!(
        (p - want).abs() <= 1e-4 + 0.01 * want,
        "tooltip p = {p}, API {want}"
    );
    assert!(tip.starts_with("token 1 "), "{tip}");
    // The keyboard: in a focused answer the arrow keys walk its tokens.
    b.exec(
        "document.querySelector(\".turn .side[data-side='b'] .answer\").focus();",
        &[],
    )
    .unwrap();
    let tip_text = "return document.getElementById('tip').textContent;";
    for n in [1, 2] {
        b.keys(&["\u{E014}"]).unwrap();
        let t = exec_str(&b, tip_text);
        assert!(t.starts_with(&format!("token {n} ")), "{t}");
    }

    // The strip: one segment per token of A's answer as /score tokenizes it, each the gap
    // between the two models' log-probabilities.
    let score = |model: &str, text: &str| -> Vec<f64> {
        let (st, v) = s.post(
            "/score",
            &json!({"model": model, "messages": messages, "continuation": [text]}),
        );
        assert_eq!(st, 200, "{v}");
        v["results"][0]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .collect()
    };
    let (own, other) = (score("base", &ta), score("ablated", &ta));
    let segs = b
        .find_all(".turn .side[data-side='a'] .strip .seg")
        .unwrap();
    assert_eq!(segs.len(), own.len());
    assert!(!own.is_empty());

    // The export: what `lethe compare --json` writes, and the page's own numbers.
    b.click(&b.find("#export").unwrap()).unwrap();
    let file = downloads.join("lethe-compare.json");
    let t = Instant::now();
    while !file.is_file() && t.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let export: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("the export was downloaded"))
            .expect("JSON");
    assert_eq!(export["a"]["name"], "base");
    assert_eq!(export["b"]["name"], "ablated");
    assert_eq!(export["max_tokens"], 40);
    let pair = &export["pairs"][0];
    assert_eq!(pair["prompt"], QUESTION);
    assert_eq!(pair["a"], ta.as_str());
    assert_eq!(pair["b"], tb.as_str());
    assert_eq!(pair["first_diff_token"], json!(k));
    assert_eq!(pair["first_diff_char"], json!(c));
    assert_eq!(pair["a_tokens"], json!(ia.len()));
    let gaps: Vec<f64> = serde_json::from_value(pair["gap_a"].clone()).unwrap();
    assert_eq!(gaps.len(), own.len());
    for (i, g) in gaps.iter().enumerate() {
        assert!((g - (own[i] - other[i])).abs() < 1e-9, "gap {i}");
    }
    // Every field `lethe compare --json` writes is in the export.
    let prompts = dir.file("q.txt", "Who wrote Hamlet?\n");
    let cmp = dir.join("compare.json");
    lethe(&[
        "compare",
        "--profile",
        &prof,
        "--a",
        "base",
        "--b",
        "ablated",
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-tokens",
        "4",
        "-t",
        "1",
        "--json",
        cmp.to_str().unwrap(),
    ]);
    let cmp: Value = serde_json::from_str(&std::fs::read_to_string(&cmp).unwrap()).unwrap();
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    for k in keys(&cmp) {
        assert!(export.get(&k).is_some(), "the export lacks '{k}'");
    }
    for k in keys(&cmp["a"]) {
        assert!(export["a"].get(&k).is_some(), "the export's a lacks '{k}'");
    }
    for k in keys(&cmp["pairs"][0]) {
        assert!(pair.get(&k).is_some(), "the export's pairs lack '{k}'");
    }

    // The README's picture: the first difference under the pointer.
    b.exec(
        "document.getElementById('settings').open = false; window.scrollTo(0, 0);",
        &[],
    )
    .unwrap();
    let diff = b.find(".turn .side[data-side='b'] .tok.diff").unwrap();
    b.hover(&diff).unwrap();
    b.wait_for(
        "the tooltip",
        "return !document.getElementById('tip').hidden;",
        Duration::from_secs(5),
    )
    .unwrap();
    screenshot(&b, "webui.png", true);

    // A second turn, sampled: the same seed on both sides, each side's own history.
    set_field(&b, "temperature", "0.9");
    set_field(&b, "seed", "7");
    let sides = ask(&b, "And where was he born?");
    for (state, _, err) in &sides {
        assert_eq!(state, "done", "{err}");
    }
    let export = b.exec("return window.lethe.exportData();", &[]).unwrap();
    let pair = &export["pairs"][1];
    for (k, model) in [(0, "base"), (1, "ablated")] {
        let msgs = &pair[if k == 0 { "messages_a" } else { "messages_b" }];
        assert_eq!(
            msgs.as_array().unwrap().len(),
            3,
            "question, answer, question"
        );
        assert_eq!(msgs[1]["content"], [&ta, &tb][k].as_str());
        assert_eq!(
            sides[k].1,
            content(&api(model, 0.9, 7, msgs)),
            "{model}, sampled"
        );
    }

    // A narrow window: the answers stack, nothing runs off the side.
    b.set_window(420, 900).unwrap();
    let narrow = b.wait_for(
        "one column",
        "const a = document.querySelector('.answers.two');\
             const cols = getComputedStyle(a).gridTemplateColumns.split(' ').length;\
             return cols === 1 && document.documentElement.scrollWidth <= window.innerWidth;",
        Duration::from_secs(5),
    );
    assert!(narrow.is_ok(), "{narrow:?}");
    screenshot(&b, "webui-narrow.png", false);
}

/// A profile file: `patched` (a random LoRA) and `uld` (an untrained ULD assistant, the
/// target's first 8 blocks, alpha 0.5, filter 0.1).
fn patched_and_uld(dir: &TempDir) -> String {
    let model = common::model_path("smollm2");
    let lora = random_patch(dir, "lora.gguf");
    let asst = dir.join("assistant.gguf");
    lethe(&[
        "forge",
        "assistant",
        "-m",
        model.to_str().unwrap(),
        "--layers",
        "8",
        "-o",
        asst.to_str().unwrap(),
    ]);
    let base = model.to_str().unwrap();
    let text = format!(
        "[[profile]]\nname = \"patched\"\nbase = {base:?}\n\n[[profile.patch]]\nfile = {lora:?}\n\n\
         [[profile]]\nname = \"uld\"\nbase = {base:?}\n\n[[profile.assistant]]\n\
         model = \"assistant.gguf\"\nalpha = 0.5\nfilter = 0.1\n"
    );
    dir.file("profiles.toml", &text)
        .to_str()
        .unwrap()
        .to_string()
}

fn exec_str(b: &Browser, script: &str) -> String {
    let v = b.exec(script, &[]).unwrap();
    v.as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| v.to_string())
}

/// Pick a model on side `k` ("a" or "b") as a user would (the select's change event).
fn pick(b: &Browser, side: &str, id: &str) {
    b.exec(
        "const s = document.getElementById(arguments[0]); s.value = arguments[1];\
         s.dispatchEvent(new Event('change'));",
        &[json!(format!("model-{side}")), json!(id)],
    )
    .unwrap();
}

/// `--api-key`: the page loads and lists the ids, a request without the key or with a wrong
/// one shows why it failed, the right key (kept in session storage only) answers as the API
/// does, shows the files' hashes and the ULD overrides, which apply.
#[test]
fn key_field_works_against_api_key() {
    let Some(br) = browser_or_skip("key_field_works_against_api_key") else {
        return;
    };
    let dir = TempDir::new("webui-key");
    let prof = patched_and_uld(&dir);
    let s = Server::start(&[
        "--profile",
        &prof,
        "--alias",
        "base",
        "--api-key",
        "sekrit",
        "-np",
        "2",
    ]);
    let b = open(&br, 1280, 900, &dir.0);
    b.goto(&url(&s)).unwrap();
    assert_eq!(wait_models(&b), ["base", "patched", "uld"]);
    assert!(b.displayed(&b.find("#key-box").unwrap()).unwrap());
    assert!(exec_str(
        &b,
        "return document.getElementById('key-status').textContent;"
    )
    .contains("enter the server's key"));
    set_field(&b, "max-tokens", "8");

    // No key: both sides say so.
    for (state, _, err) in ask(&b, "Hi there!") {
        assert_eq!(state, "error");
        assert!(err.contains("needs an API key (401)"), "{err}");
    }
    // A wrong key is refused where the key is typed.
    let field = b.find("#api-key").unwrap();
    b.send_keys(&field, &format!("nope{ENTER}")).unwrap();
    let st = b
        .wait_for(
            "the key check",
            "const t = document.getElementById('key-status').textContent;\
             return t === 'checking…' ? null : t;",
            Duration::from_secs(20),
        )
        .unwrap();
    assert_eq!(st, "key refused");
    assert!(
        exec_str(&b, "return document.getElementById('error').textContent;")
            .contains("refused this API key")
    );
    // The right key.
    b.clear(&field).unwrap();
    b.send_keys(&field, &format!("sekrit{ENTER}")).unwrap();
    b.wait_for(
        "the key to be accepted",
        "return document.getElementById('key-status').textContent === 'key accepted';",
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let stored = b
        .exec(
            "return [sessionStorage.getItem('lethe-api-key'), localStorage.length];",
            &[],
        )
        .unwrap();
    assert_eq!(
        stored,
        json!(["sekrit", 0]),
        "the key lives in session storage only"
    );

    // With the key: what each side runs, and the ULD profile's overrides.
    pick(&b, "b", "uld");
    let models = {
        let (st, _, text) = s.request(
            "GET",
            "/v1/models",
            &[("Authorization", "Bearer sekrit")],
            b"",
        );
        assert_eq!(st, 200);
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let sha = models["data"][2]["meta"]["unlearn"]["files"][1]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(exec_str(
        &b,
        "return document.getElementById('audit-body').textContent;"
    )
    .contains(&sha));
    let alpha = b
        .find("#overrides input[data-kind='alpha'][data-side='1']")
        .unwrap();
    b.send_keys(&alpha, "2").unwrap();
    let sides = ask(&b, QUESTION);
    for (state, _, err) in &sides {
        assert_eq!(state, "done", "{err}");
    }
    let messages = json!([{"role": "user", "content": QUESTION}]);
    let want_a = content(&chat(
        &s,
        Some("sekrit"),
        &json!({"model": "base", "messages": messages, "temperature": 0, "seed": 42,
                "max_tokens": 8}),
    ));
    let want_b = content(&chat(
        &s,
        Some("sekrit"),
        &json!({"model": "uld", "messages": messages, "temperature": 0, "seed": 42,
                "max_tokens": 8, "unlearn": {"alpha": 2.0}}),
    ));
    assert_eq!(sides[0].1, want_a);
    assert_eq!(sides[1].1, want_b, "B ran with alpha 2");
}

/// `--lock`: the base is neither offered nor overridable, the profiles answer as the API
/// does, and a request for the base (a page from before the lock, say) shows the 403.
#[test]
fn lock_hides_the_base() {
    let Some(br) = browser_or_skip("lock_hides_the_base") else {
        return;
    };
    let dir = TempDir::new("webui-lock");
    let prof = patched_and_uld(&dir);
    let s = Server::start(&["--profile", &prof, "--alias", "base", "--lock", "-np", "2"]);
    let b = open(&br, 1280, 900, &dir.0);
    b.goto(&url(&s)).unwrap();
    assert_eq!(wait_models(&b), ["patched", "uld"]);
    let b_ids = b
        .exec(
            "return [...document.querySelectorAll('#model-b option')].map(o => o.value);",
            &[],
        )
        .unwrap();
    assert_eq!(b_ids, json!(["patched", "uld"]));
    assert!(b.displayed(&b.find("#lock-note").unwrap()).unwrap());
    set_field(&b, "max-tokens", "8");
    assert!(
        b.find_all("#overrides input").unwrap().is_empty(),
        "no overrides under --lock"
    );
    assert!(!b.displayed(&b.find("#key-box").unwrap()).unwrap());
    let sides = ask(&b, "Name a colour.");
    let messages = json!([{"role": "user", "content": "Name a colour."}]);
    for (k, model) in ["patched", "uld"].iter().enumerate() {
        assert_eq!(sides[k].0, "done", "{}", sides[k].2);
        let want = content(&chat(
            &s,
            None,
            &json!({"model": model, "messages": messages, "temperature": 0, "seed": 42,
                    "max_tokens": 8}),
        ));
        assert_eq!(sides[k].1, want, "{model}");
    }
    // A page that still offers the base (from before the lock, say): the server's answer in
    // words.
    b.exec(
        "const s = document.getElementById('model-a'); const o = document.createElement('option');\
         o.value = 'base'; o.textContent = 'base'; s.append(o); s.value = 'base';",
        &[],
    )
    .unwrap();
    let sides = ask(&b, "Name a colour.");
    assert_eq!(sides[0].0, "error");
    assert!(
        sides[0].2.contains("(404)") && sides[0].2.contains("model 'base' not found"),
        "{}",
        sides[0].2
    );
    assert_eq!(sides[1].0, "done", "{}", sides[1].2);
    // A page that still offers overrides (it missed the lock): the server's 403, in words.
    pick(&b, "a", "patched");
    b.exec("S.lock = false; return loadServer();", &[]).unwrap();
    let scale = b
        .find("#overrides input[data-kind='scale'][data-side='0']")
        .unwrap();
    b.clear(&scale).unwrap();
    b.send_keys(&scale, "0.5").unwrap();
    let sides = ask(&b, "Name a colour.");
    assert_eq!(sides[0].0, "error");
    assert!(
        sides[0].2.contains("(403)") && sides[0].2.contains("locked"),
        "{}",
        sides[0].2
    );
    assert_eq!(sides[1].0, "done", "{}", sides[1].2);
}

/// What goes wrong shows in words, and the page stays usable: a prompt over the context, a
/// server killed mid-stream (the partial answer kept), a server that is gone.
#[test]
fn errors_show_in_the_page() {
    let Some(br) = browser_or_skip("errors_show_in_the_page") else {
        return;
    };
    let dir = TempDir::new("webui-errors");
    let lora = random_patch(&dir, "lora.gguf");
    let prof = profiles(&dir, &[("patched", &lora)]);
    let b = open(&br, 1280, 900, &dir.0);
    let send_enabled = "return !document.getElementById('send').disabled;";

    // A context of 64 tokens: a long question does not fit.
    let s = Server::start(&["--profile", &prof, "--alias", "base", "-c", "64"]);
    b.goto(&url(&s)).unwrap();
    wait_models(&b);
    b.click(&b.find("input[name=mode][value=chat]").unwrap())
        .unwrap();
    let long = "Tell me about the long history of the city of Rome. ".repeat(8);
    let sides = ask(&b, long.trim());
    assert_eq!(sides.len(), 1, "chat mode asks one model");
    assert_eq!(sides[0].0, "error");
    assert!(
        sides[0].2.contains("does not fit the model's context"),
        "{}",
        sides[0].2
    );
    assert_eq!(b.exec(send_enabled, &[]).unwrap(), json!(true));
    drop(s);

    // The patched model writes new lines until max tokens: kill the server mid-stream.
    let mut s = Server::start(&["--profile", &prof, "--alias", "base"]);
    b.goto(&url(&s)).unwrap();
    wait_models(&b);
    b.click(&b.find("input[name=mode][value=chat]").unwrap())
        .unwrap();
    pick(&b, "a", "patched");
    set_field(&b, "max-tokens", "4000");
    let prompt = b.find("#prompt").unwrap();
    let streaming = |turn: usize| {
        b.wait_for(
            "a few streamed tokens",
            &format!(
                "const t = document.querySelectorAll('.turn')[{turn}];\
                 return t && t.querySelectorAll('.tok').length >= 3;"
            ),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    };
    // Esc stops an answer; the page takes the next question.
    b.send_keys(&prompt, &format!("Hello{ENTER}")).unwrap();
    streaming(0);
    b.keys(&["\u{E00C}"]).unwrap();
    b.wait_for(
        "the stop",
        "return document.querySelector('.turn .side').dataset.state === 'stopped';",
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.exec(send_enabled, &[]).unwrap(), json!(true));
    b.exec("document.getElementById('clear').click();", &[])
        .unwrap();
    b.send_keys(&prompt, &format!("Hello{ENTER}")).unwrap();
    streaming(0);
    s.signal("KILL");
    assert!(s.wait_exit(Duration::from_secs(10)).is_some());
    let v = b
        .wait_for(
            "the broken stream's message",
            "const s = document.querySelector('.turn .side');\
             return s.dataset.state === 'error' ? s.querySelector('.side-error').textContent : null;",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let msg = v.as_str().unwrap();
    assert!(msg.contains("before the answer was finished"), "{msg}");
    assert_eq!(b.exec(send_enabled, &[]).unwrap(), json!(true));
    let kept = exec_str(
        &b,
        "return document.querySelector('.turn .answer').textContent;",
    );
    assert!(!kept.is_empty(), "the partial answer stays");
    // The server is gone: the next question says so.
    let sides = ask(&b, "Are you there?");
    assert_eq!(sides[0].0, "error");
    assert!(
        sides[0].2.contains("Cannot reach the server"),
        "{}",
        sides[0].2
    );
}
