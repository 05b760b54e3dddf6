//! `lethe serve --parallel 4` under load: 64 clients at once, then bursts of 200 short
//! requests, streamed and not, over `/v1/chat/completions`, `/completion` and
//! `/v1/completions`.
//!
//! Nothing may be lost: every request gets exactly one whole 200 answer (a JSON body, or an
//! event stream whose every event is JSON and that ends as its route ends: `[DONE]` for the
//! OpenAI routes, a `stop: true` object for `/completion`). The server documents no error for
//! a busy server (no queue limit, no 503 but while loading or stopping), so an error envelope
//! counts as a failure too; every outcome is counted and printed. And batching changes no
//! answer: each greedy request under load gets the text the same request got alone, one at a
//! time, beforehand. Afterwards `/health` is 200 and `/slots` shows every slot idle.
//!
//! No assertion reads a clock; the total time is printed for reading.

mod common;
#[path = "common/raw.rs"]
mod raw;

use common::serve::Server;
use raw::{check_envelope, clip, sse_events};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Prompts 0..8 go to the chat route, 8..16 to the text completion routes.
const PROMPTS: [&str; 16] = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Who wrote Hamlet?",
    "Tell me a fact about cats.",
    "Translate 'good morning' into Spanish.",
    "List the first five prime numbers.",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "def fibonacci(n):",
    "The capital of Japan is",
    "In 1969, the first person to walk on the Moon",
    "Water boils at a temperature of",
    "My favourite breakfast is",
    "The quick brown fox",
];

/// How long one answer may take before it counts as lost (a hang, not a speed bound).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Chat,
    Completion,
    OaiCompletion,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completion => "/completion",
            Route::OaiCompletion => "/v1/completions",
        }
    }
}

/// One greedy request: a prompt, a route, streamed or not, `n` tokens.
#[derive(Clone, Copy, Debug)]
struct Req {
    prompt: usize,
    route: Route,
    stream: bool,
    n: usize,
}

impl Req {
    /// The `k`-th variant of prompt `prompt`: chat prompts on the chat route, the others on
    /// `/completion` or `/v1/completions` by turns; streamed or not by turns.
    fn variant(prompt: usize, k: usize, n: usize) -> Req {
        let route = match (prompt < 8, k % 2) {
            (true, _) => Route::Chat,
            (false, 0) => Route::Completion,
            (false, _) => Route::OaiCompletion,
        };
        Req {
            prompt,
            route,
            stream: (k / 2 + prompt).is_multiple_of(2),
            n,
        }
    }

    fn body(&self) -> Value {
        let p = PROMPTS[self.prompt];
        match self.route {
            Route::Chat => json!({
                "messages": [{"role": "user", "content": p}],
                "temperature": 0, "max_tokens": self.n, "stream": self.stream,
            }),
            Route::Completion => json!({
                "prompt": p, "temperature": 0, "n_predict": self.n, "stream": self.stream,
            }),
            Route::OaiCompletion => json!({
                "prompt": p, "temperature": 0, "max_tokens": self.n, "stream": self.stream,
            }),
        }
    }
}

/// What became of a request.
enum Outcome {
    /// A whole 200 answer, with its text.
    Text(String),
    /// An answer in llama-server's error envelope: status and type.
    Error(u16, String),
    /// Lost: no answer, a cut or malformed one, or an error outside the envelope.
    Lost(String),
}

fn run(addr: &str, r: &Req) -> Outcome {
    let body = r.body().to_string();
    let res = match raw::post(
        addr,
        r.route.path(),
        Some("application/json"),
        body.as_bytes(),
        ANSWER_TIMEOUT,
    ) {
        Ok(res) => res,
        Err(e) => return Outcome::Lost(e),
    };
    let text = match res.text() {
        Ok(t) => t,
        Err(e) => return Outcome::Lost(e),
    };
    if res.status != 200 {
        return match serde_json::from_str::<Value>(text)
            .map_err(|e| e.to_string())
            .and_then(|v| check_envelope(&v, res.status).map(|_| v))
        {
            Ok(v) => Outcome::Error(
                res.status,
                v["error"]["type"].as_str().unwrap_or_default().to_string(),
            ),
            Err(e) => Outcome::Lost(format!(
                "{} outside the error envelope ({e}): {}",
                res.status,
                clip(text, 300)
            )),
        };
    }
    let ct = res.header("content-type").unwrap_or_default();
    let got = if r.stream {
        if !ct.starts_with("text/event-stream") {
            return Outcome::Lost(format!("a stream with Content-Type {ct:?}"));
        }
        stream_text(r.route, text)
    } else {
        if !ct.starts_with("application/json") {
            return Outcome::Lost(format!("an answer with Content-Type {ct:?}"));
        }
        serde_json::from_str::<Value>(text)
            .map_err(|e| format!("not JSON ({e})"))
            .and_then(|v| whole_text(r.route, &v))
    };
    match got {
        Ok(t) => Outcome::Text(t),
        Err(e) => Outcome::Lost(format!("{e}: {}", clip(text, 300))),
    }
}

/// The text of a non-streamed answer, which must be finished.
fn whole_text(route: Route, v: &Value) -> Result<String, String> {
    let (text, done) = match route {
        Route::Chat => (
            &v["choices"][0]["message"]["content"],
            v["choices"][0]["finish_reason"].is_string(),
        ),
        Route::Completion => (&v["content"], v["stop"] == true),
        Route::OaiCompletion => (
            &v["choices"][0]["text"],
            v["choices"][0]["finish_reason"].is_string(),
        ),
    };
    match (text.as_str(), done) {
        (Some(t), true) => Ok(t.to_string()),
        _ => Err("no text or not finished".into()),
    }
}

/// The text of a streamed answer: every event JSON (but the OpenAI routes' `[DONE]`, which
/// must come last), none an error, and the last one finishing the generation.
fn stream_text(route: Route, body: &str) -> Result<String, String> {
    let mut ev = sse_events(body)?;
    if route != Route::Completion && ev.pop() != Some("[DONE]") {
        return Err("the stream does not end with data: [DONE]".into());
    }
    let chunks = ev
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).map_err(|err| format!("event {e:?}: {err}")))
        .collect::<Result<Vec<Value>, String>>()?;
    if let Some(c) = chunks.iter().find(|c| c.get("error").is_some()) {
        return Err(format!("an error event {c}"));
    }
    let finished = match (route, chunks.last()) {
        (_, None) => false,
        (Route::Completion, Some(c)) => {
            c["stop"] == true
                && chunks[..chunks.len() - 1]
                    .iter()
                    .all(|c| c["stop"] == false)
        }
        // The chat's last chunk; the text completion's last (no usage was asked for).
        (_, Some(c)) => c["choices"][0]["finish_reason"].is_string(),
    };
    if !finished {
        return Err("the stream's last event does not finish it".into());
    }
    Ok(chunks
        .iter()
        .filter_map(|c| match route {
            Route::Chat => c["choices"][0]["delta"]["content"].as_str(),
            Route::Completion => c["content"].as_str(),
            Route::OaiCompletion => c["choices"][0]["text"].as_str(),
        })
        .collect())
}

/// Counts per route and mode, and what went wrong.
#[derive(Default)]
struct Tally {
    /// (route, streamed) -> (200s, errors, lost).
    counts: BTreeMap<(Route, bool), (usize, usize, usize)>,
    problems: Vec<String>,
}

impl Tally {
    fn add(&mut self, phase: &str, i: usize, r: &Req, out: &Outcome, alone: &str) {
        let c = self.counts.entry((r.route, r.stream)).or_default();
        let what = format!(
            "{phase} request {i} ({} {}, prompt {} {:?})",
            r.route.path(),
            if r.stream { "streamed" } else { "whole" },
            r.prompt,
            PROMPTS[r.prompt]
        );
        match out {
            Outcome::Text(t) => {
                c.0 += 1;
                if t != alone {
                    self.problems.push(format!(
                        "{what}: under load {t:?}, alone {alone:?} (batching changed a greedy answer)"
                    ));
                }
            }
            Outcome::Error(st, kind) => {
                c.1 += 1;
                self.problems.push(format!("{what}: error {st} {kind}"));
            }
            Outcome::Lost(e) => {
                c.2 += 1;
                self.problems.push(format!("{what}: lost: {e}"));
            }
        }
    }

    fn total(&self) -> (usize, usize, usize) {
        self.counts
            .values()
            .fold((0, 0, 0), |(a, b, c), (x, y, z)| (a + x, b + y, c + z))
    }
}

/// Run `reqs` from as many threads, all released at once; the outcomes in order.
fn at_once(addr: &str, reqs: &[Req]) -> Vec<Outcome> {
    let start = Barrier::new(reqs.len());
    std::thread::scope(|sc| {
        let handles: Vec<_> = reqs
            .iter()
            .map(|r| {
                let start = &start;
                sc.spawn(move || {
                    start.wait();
                    run(addr, r)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a client thread panicked"))
            .collect()
    })
}

#[test]
fn sixty_four_clients_then_bursts_lose_nothing_and_change_no_answer() {
    const SLOTS: usize = 4;
    const LONG: usize = 16;
    const SHORT: usize = 2;
    const CLIENTS: usize = 64;
    const BURST: usize = 200;
    const BURSTS: usize = 2;
    let model = common::model_path("smollm2");
    let m = model.to_str().unwrap();
    let np = SLOTS.to_string();
    let s = Server::start(&["-m", m, "-np", &np, "-t", "2", "--metrics"]);
    let t0 = Instant::now();

    // Alone, one at a time: each prompt's greedy text at both lengths.
    let mut alone: BTreeMap<(usize, usize), String> = BTreeMap::new();
    for n in [LONG, SHORT] {
        for p in 0..PROMPTS.len() {
            let r = Req::variant(p, 0, n);
            match run(&s.addr, &r) {
                Outcome::Text(t) => {
                    assert!(!t.is_empty(), "prompt {p} alone gave no text");
                    alone.insert((p, n), t);
                }
                Outcome::Error(st, kind) => panic!("prompt {p} alone: {st} {kind}"),
                Outcome::Lost(e) => panic!("prompt {p} alone: {e}"),
            }
        }
    }
    let t_alone = t0.elapsed();

    let mut tally = Tally::default();
    // 64 clients at once: each prompt 4 times, by turns streamed or not and on each route.
    let reqs: Vec<Req> = (0..CLIENTS)
        .map(|i| Req::variant(i % PROMPTS.len(), i / PROMPTS.len(), LONG))
        .collect();
    let t1 = Instant::now();
    for (i, (r, out)) in reqs.iter().zip(at_once(&s.addr, &reqs)).enumerate() {
        tally.add("64 clients:", i, r, &out, &alone[&(r.prompt, LONG)]);
    }
    let t_clients = t1.elapsed();

    // Bursts of 200 short requests.
    let t2 = Instant::now();
    for b in 0..BURSTS {
        let reqs: Vec<Req> = (0..BURST)
            .map(|i| {
                let j = b * BURST + i;
                Req::variant(j % PROMPTS.len(), j / PROMPTS.len(), SHORT)
            })
            .collect();
        let phase = format!("burst {b}:");
        for (i, (r, out)) in reqs.iter().zip(at_once(&s.addr, &reqs)).enumerate() {
            tally.add(&phase, i, r, &out, &alone[&(r.prompt, SHORT)]);
        }
    }
    let t_bursts = t2.elapsed();

    let (ok, errors, lost) = tally.total();
    eprintln!(
        "serve_load: {} requests under load: {ok} answered 200, {errors} error envelopes, \
         {lost} lost; alone {:.1} s (32 requests), 64 clients {:.1} s, {BURSTS} bursts of \
         {BURST} {:.1} s, total {:.1} s",
        CLIENTS + BURSTS * BURST,
        t_alone.as_secs_f64(),
        t_clients.as_secs_f64(),
        t_bursts.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let metric = |name: &str| {
        s.metric(&format!("llamacpp:{name}"))
            .map_or("?".to_string(), |v| v.to_string())
    };
    eprintln!(
        "serve_load: prompt tokens run {}, taken from the cache {}, tokens predicted {}",
        metric("prompt_tokens_total"),
        metric("prompt_tokens_cached_total"),
        metric("tokens_predicted_total")
    );
    for ((route, stream), (a, e, l)) in &tally.counts {
        eprintln!(
            "serve_load:   {:<22} {:<8} {a} ok, {e} errors, {l} lost",
            route.path(),
            if *stream { "streamed" } else { "whole" }
        );
    }
    assert_eq!(ok + errors + lost, CLIENTS + BURSTS * BURST);
    assert!(
        tally.problems.is_empty(),
        "{} of {} requests went wrong:\n{}",
        tally.problems.len(),
        CLIENTS + BURSTS * BURST,
        tally
            .problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Afterwards: healthy, and every slot idle once the last answers are in (the scheduler
    // marks a slot idle right after sending its last event; give it a moment).
    let (st, body) = s.get("/health");
    assert_eq!(st, 200, "{body}");
    let mut slots = Value::Null;
    for _ in 0..100 {
        let (st, body) = s.get("/slots");
        assert_eq!(st, 200, "{body}");
        slots = serde_json::from_str(&body).expect("/slots is JSON");
        let list = slots.as_array().expect("/slots is an array");
        assert_eq!(list.len(), SLOTS, "{slots}");
        if list.iter().all(|s| s["is_processing"] == false) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("a slot is still busy after the load: {slots}");
}
