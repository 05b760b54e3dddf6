//! The inference thread's scheduling, over real sockets: a long prompt runs in chunks between
//! other slots' decode steps (and gives the same logits as in one go), a large `/score` runs a
//! continuation at a time, work whose client left is dropped, and `/score` requests are capped.
//!
//! No assertion here reads a clock: a short chat must *finish* while the long work is still
//! under way (with whole-prompt prefill it could only finish after it), and cancelled work must
//! stop short of its end. The times are printed for reading.

mod common;

use common::serve::Server;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The tests below measure against each other's absence: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn model() -> String {
    common::model_path("smollm2").to_str().unwrap().to_string()
}

/// Text of about `n` tokens (distinct words, so no run repeats), with `seed` varying it.
fn long_text(s: &Server, n: usize, seed: usize) -> String {
    let text = |k: usize| {
        (0..k)
            .map(|i| format!("w{}", i * 7 + seed))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (st, v) = s.post("/tokenize", &json!({"content": text(n)}));
    assert_eq!(st, 200, "{v}");
    let per_word = v["tokens"].as_array().unwrap().len() as f64 / n as f64;
    text((n as f64 / per_word) as usize)
}

fn n_tokens(s: &Server, text: &str) -> usize {
    let (st, v) = s.post("/tokenize", &json!({"content": text}));
    assert_eq!(st, 200, "{v}");
    v["tokens"].as_array().unwrap().len()
}

/// POST `body` to `path` on `addr` from another thread; `done` is set when the answer is in
/// (or the connection failed: the server was stopped).
fn post_in_background(addr: &str, path: &str, body: Value) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let (addr, path, flag) = (addr.to_string(), path.to_string(), done.clone());
    std::thread::spawn(move || {
        if let Ok(mut s) = TcpStream::connect(&addr) {
            let body = body.to_string();
            let req = format!(
                "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let mut raw = Vec::new();
            if s.write_all(req.as_bytes()).is_ok() {
                let _ = s.read_to_end(&mut raw);
            }
        }
        flag.store(true, Ordering::SeqCst);
    });
    done
}

/// Send `body` to `path` and hang up without reading the answer.
fn post_and_leave(s: &Server, path: &str, body: &Value, after: impl FnOnce()) {
    let mut c = TcpStream::connect(&s.addr).unwrap();
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        s.addr,
        body.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    after();
    c.shutdown(std::net::Shutdown::Both).unwrap();
}

/// One of lethe's own counters from `/metrics`.
fn counter(s: &Server, name: &str) -> u64 {
    s.metric(&format!("lethe:{name}"))
        .unwrap_or_else(|| panic!("no lethe:{name} in /metrics")) as u64
}

/// Wait (at most `limit`) until `f` holds.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until `name` has not moved for a second (at most `limit`); its value.
fn settled(s: &Server, name: &str, limit: Duration) -> u64 {
    let t = Instant::now();
    let mut last = counter(s, name);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = counter(s, name);
        if now == last {
            return now;
        }
        assert!(
            t.elapsed() < limit,
            "lethe:{name} still moving after {limit:?}"
        );
        last = now;
    }
}

/// A 4-token chat (cold: distinct text), timed.
fn short_chat(s: &Server, k: usize) -> Duration {
    let t = Instant::now();
    let (st, v) = s.post(
        "/v1/chat/completions",
        &json!({
            "messages": [{"role": "user", "content": format!("Say hi to person number {k}.")}],
            "max_tokens": 4,
            "temperature": 0,
        }),
    );
    assert_eq!(st, 200, "{v}");
    t.elapsed()
}

fn median_alone(s: &Server) -> Duration {
    let mut t: Vec<Duration> = (0..3).map(|k| short_chat(s, 1000 + k)).collect();
    t.sort();
    t[1]
}

/// A prompt run in chunks of 8 tokens gives the logits it gives in one chunk, bit for bit.
#[test]
fn chunked_prompt_gives_the_same_logits() {
    let _g = serial();
    let m = model();
    let probs = |ub: &str| {
        let s = Server::start(&["-m", &m, "-c", "2048", "--ubatch-size", ub]);
        let prompt = long_text(&s, 300, 1);
        let (st, v) = s.post(
            "/completion",
            &json!({"prompt": prompt, "n_predict": 6, "temperature": 0, "n_probs": 4}),
        );
        assert_eq!(st, 200, "{v}");
        assert!(v["timings"]["prompt_n"].as_u64().unwrap() > 250, "{v}");
        (v["content"].clone(), v["completion_probabilities"].clone())
    };
    let (text8, probs8) = probs("8");
    let (text512, probs512) = probs("512");
    assert!(probs8.as_array().is_some_and(|a| a.len() == 6), "{probs8}");
    assert_eq!(text8, text512);
    assert_eq!(
        probs8, probs512,
        "the logprobs depend on the prompt's chunks"
    );
}

/// With a long prompt running in one slot, a short chat in the other answers before the long
/// prompt has finished.
#[test]
fn short_chat_answers_during_a_long_prompt() {
    let _g = serial();
    let m = model();
    let s = Server::start(&["-m", &m, "-np", "2", "-c", "8192", "-t", "2", "--metrics"]);
    let alone = median_alone(&s);
    let prompt = long_text(&s, 2000, 2);
    let n = n_tokens(&s, &prompt);
    let long = post_in_background(
        &s.addr,
        "/completion",
        json!({"prompt": prompt, "n_predict": 1, "cache_prompt": false}),
    );
    let before = counter(&s, "prompt_tokens_run_total");
    wait_for(Duration::from_secs(60), "the long prompt to start", || {
        counter(&s, "prompt_tokens_run_total") > before
    });
    let behind = short_chat(&s, 1);
    let run = counter(&s, "prompt_tokens_run_total") - before;
    eprintln!(
        "4-token chat: {alone:?} alone, {behind:?} behind a {n}-token prompt ({:.1}x); \
         {run} of its tokens had run",
        behind.as_secs_f64() / alone.as_secs_f64()
    );
    assert!(
        !long.load(Ordering::SeqCst),
        "the {n}-token prompt finished before the short chat answered"
    );
}

/// With a 300-continuation `/score` under way, a short chat answers before it has finished;
/// a `/score` over the cap is refused.
#[test]
fn short_chat_answers_during_a_large_score() {
    let _g = serial();
    let m = model();
    let s = Server::start(&["-m", &m, "-np", "2", "-t", "2", "--metrics"]);
    let alone = median_alone(&s);
    let conts: Vec<String> = (0..300)
        .map(|i| format!(" Paris, city number {i}, lies on the Seine in northern France."))
        .collect();
    let body = json!({"prompt": "The capital of France is", "continuation": conts});
    let scored = post_in_background(&s.addr, "/score", body);
    let before = counter(&s, "score_continuations_total");
    wait_for(Duration::from_secs(60), "the scoring to start", || {
        counter(&s, "score_continuations_total") > before
    });
    let behind = short_chat(&s, 2);
    let n = counter(&s, "score_continuations_total") - before;
    eprintln!(
        "4-token chat: {alone:?} alone, {behind:?} behind a 300-continuation /score ({:.1}x); \
         {n} continuations had been scored",
        behind.as_secs_f64() / alone.as_secs_f64()
    );
    assert!(
        !scored.load(Ordering::SeqCst),
        "the /score finished before the short chat answered"
    );
    drop(s);

    let s = Server::start(&[
        "-m",
        &m,
        "--score-max-continuations",
        "3",
        "--score-max-tokens",
        "19",
    ]);
    let (st, v) = s.post(
        "/score",
        &json!({"prompt": "Hi", "continuation": [" a", " b", " c", " d"]}),
    );
    assert_eq!(st, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("--score-max-continuations"), "{msg}");
    let (st, v) = s.post(
        "/score",
        &json!({"prompt": "Hi", "continuation": [" one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"]}),
    );
    assert_eq!(st, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("--score-max-tokens"), "{msg}");
    let (st, v) = s.post(
        "/score",
        &json!({"prompt": "Hi", "continuation": [" a", " b", " c"]}),
    );
    assert_eq!(st, 200, "{v}");
}

/// A long prompt whose client hangs up stops at its next chunk; what ran stays cached and the
/// next request with that prompt reuses it. A `/score` whose client hangs up stops too.
#[test]
fn work_of_a_client_that_left_stops() {
    let _g = serial();
    let m = model();
    let s = Server::start(&["-m", &m, "-np", "1", "-c", "4096", "-t", "2", "--metrics"]);
    let prompt = long_text(&s, 2000, 3);
    let n = n_tokens(&s, &prompt) as u64;
    let before = counter(&s, "prompt_tokens_run_total");
    post_and_leave(
        &s,
        "/completion",
        &json!({"prompt": prompt, "n_predict": 4}),
        || {
            wait_for(Duration::from_secs(60), "the prompt to start", || {
                counter(&s, "prompt_tokens_run_total") > before
            })
        },
    );
    let run = settled(&s, "prompt_tokens_run_total", Duration::from_secs(60)) - before;
    eprintln!("{run} of {n} prompt tokens ran before the client left");
    assert!(run < n, "all {n} tokens ran for a client that had left");
    let (_, slots) = s.get("/slots");
    let slots: Value = serde_json::from_str(&slots).unwrap();
    assert_eq!(slots[0]["is_processing"], false, "{slots}");
    // The same prompt again: the tokens that ran are reused.
    let (st, v) = s.post("/completion", &json!({"prompt": prompt, "n_predict": 1}));
    assert_eq!(st, 200, "{v}");
    let cached = v["timings"]["cache_n"].as_u64().unwrap();
    assert!(
        cached > 0 && cached <= run,
        "cache_n {cached} after {run} tokens ran: {v}"
    );

    let conts: Vec<String> = (0..300)
        .map(|i| format!(" Paris, city number {i}, lies on the Seine in northern France."))
        .collect();
    let before = counter(&s, "score_continuations_total");
    post_and_leave(
        &s,
        "/score",
        &json!({"prompt": "The capital of France is", "continuation": conts}),
        || {
            wait_for(Duration::from_secs(60), "the scoring to start", || {
                counter(&s, "score_continuations_total") > before
            })
        },
    );
    let scored = settled(&s, "score_continuations_total", Duration::from_secs(60)) - before;
    eprintln!("{scored} of 300 continuations scored before the client left");
    assert!(
        scored < 300,
        "every continuation was scored for a client that had left"
    );
    assert_eq!(s.get("/health").0, 200);
}
