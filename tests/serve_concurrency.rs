//! `lethe serve --parallel 4` with 8 clients streaming at once: the slots decode together in
//! batched steps, and each client must get the greedy text it gets when it runs alone.

mod common;

use common::serve::{events, Server};

use serde_json::{json, Value};

/// The streamed chat text of `prompt` (greedy, `n` tokens).
fn stream_text(s: &Server, prompt: &str, n: usize) -> String {
    let body = json!({
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": n,
        "stream": true,
    });
    let (st, _, text) = s.post_stream("/v1/chat/completions", &body);
    assert_eq!(st, 200, "{text}");
    let ev = events(&text);
    assert_eq!(ev.last().unwrap(), "[DONE]");
    ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Who wrote Hamlet?",
    "Tell me a fact about cats.",
    "Translate 'good morning' into Spanish.",
    "List the first five prime numbers.",
];

#[test]
fn eight_clients_through_four_slots_get_their_text_alone() {
    let model = common::model_path("smollm2");
    let m = model.to_str().unwrap();
    let s = Server::start(&["-m", m, "--parallel", "4", "-t", "2"]);
    let n = 24;
    // Alone: one request at a time.
    let alone: Vec<String> = PROMPTS.iter().map(|p| stream_text(&s, p, n)).collect();
    assert!(alone.iter().all(|t| !t.is_empty()));
    // Together: 8 clients at once, so 4 run in the slots and 4 wait in the queue.
    let together: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = PROMPTS
            .iter()
            .map(|p| {
                let s = &s;
                sc.spawn(move || stream_text(s, p, n))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "prompt {i} ({:?}) decoded beside others", PROMPTS[i]);
    }
    // The server still answers afterwards.
    assert_eq!(s.get("/health").0, 200);
}
