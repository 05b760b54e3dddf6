//! `lethe serve --parallel 4` with 8 clients streaming at once: the slots decode together in
//! batched steps, and each client must get the greedy text it gets when it runs alone.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_lethe");

/// A running server, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Start `lethe serve ARGS --port 0` and wait until it listens and answers /health.
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start lethe serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = match lines.next() {
                Some(Ok(l)) => l,
                _ => {
                    let _ = child.kill();
                    panic!("lethe serve ended before listening");
                }
            };
            if let Some(i) = line.find("http://") {
                break line[i + "http://".len()..].trim().to_string();
            }
        };
        // Keep draining stderr so that the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        let s = Server { child, addr };
        for _ in 0..100 {
            if s.get("/health").0 == 200 {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("/health never answered 200");
    }

    /// Send a request; returns the status, the headers (lower-cased names) and the body.
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, Vec<(String, String)>, String) {
        let mut s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read the response");
        parse_response(&raw)
    }

    fn get(&self, path: &str) -> (u16, String) {
        let (status, _, body) = self.request("GET", path, &[], b"");
        (status, body)
    }

    /// A streamed POST: the status, the Content-Type and the raw event text.
    fn post_stream(&self, path: &str, body: &Value) -> (u16, String, String) {
        let (status, headers, text) = self.request("POST", path, &[], body.to_string().as_bytes());
        let ct = header(&headers, "content-type").unwrap_or_default();
        (status, ct, text)
    }
}

fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// Split a raw HTTP/1.1 response, undoing chunked transfer encoding.
fn parse_response(raw: &[u8]) -> (u16, Vec<(String, String)>, String) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = std::str::from_utf8(&raw[..split]).expect("UTF-8 headers");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if header(&headers, "transfer-encoding").as_deref() == Some("chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size");
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .expect("hex chunk size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    (
        status,
        headers,
        String::from_utf8(body).expect("UTF-8 body"),
    )
}

/// The JSON of each `data:` event, checking the framing `data: ...\n\n` exactly.
fn events(text: &str) -> Vec<String> {
    assert!(
        text.ends_with("\n\n"),
        "events end with a blank line: {text:?}"
    );
    text[..text.len() - 2]
        .split("\n\n")
        .map(|e| {
            assert!(!e.contains('\n'), "one line per event: {e:?}");
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("an event starts with 'data: ': {e:?}"))
                .to_string()
        })
        .collect()
}

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
