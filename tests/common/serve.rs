//! A `lethe serve` process for the server tests, and a small HTTP/1.1 client over real sockets.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_lethe");

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    /// `host:port` the server listens on.
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Send the server a signal (`TERM`, `INT`, ...).
    #[allow(dead_code)]
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait up to `timeout` for the server to exit; its exit code (`Some(-1)` for a signal),
    /// or `None` if it is still running.
    #[allow(dead_code)]
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let t = std::time::Instant::now();
        while t.elapsed() < timeout {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Open a streamed request and read until its first event; the rest is read from the
    /// returned socket.
    #[allow(dead_code)]
    pub fn open_stream(&self, path: &str, body: &Value) -> BufReader<TcpStream> {
        let mut s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                r.read_line(&mut line).expect("read") > 0,
                "the stream ended at once"
            );
            if line.starts_with("data: ") {
                return r;
            }
        }
    }

    /// The server's resident memory in MiB (Linux `/proc`; `None` elsewhere).
    #[allow(dead_code)]
    pub fn rss_mib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    }

    /// Start `lethe serve ARGS --host 127.0.0.1 --port 0` (and `-t 1` unless ARGS sets the
    /// threads) and wait until it listens and answers /health.
    pub fn start(args: &[&str]) -> Server {
        let threads = args.iter().any(|a| *a == "-t" || *a == "--threads");
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(if threads { &[][..] } else { &["-t", "1"][..] })
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
        // The socket is bound before the model loads: until then, 503 `Loading model`.
        for _ in 0..1200 {
            let (st, body) = s.get("/health");
            if st == 200 {
                return s;
            }
            assert_eq!(st, 503, "{body}");
            let v: Value = serde_json::from_str(&body).expect("JSON");
            assert_eq!(
                v,
                json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("/health never answered 200");
    }

    /// Send a request; returns the status, the headers (lower-cased names) and the body.
    pub fn request(
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

    /// The value of the metric `name` (with its prefix: `llamacpp:...`, `lethe:...`) in
    /// `/metrics`, if listed; the server must serve `/metrics`.
    #[allow(dead_code)]
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (st, text) = self.get("/metrics");
        assert_eq!(st, 200, "{text}");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.parse().expect("a number"))
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let (status, _, body) = self.request("GET", path, &[], b"");
        (status, body)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, text) = self.request("POST", path, &[], body.to_string().as_bytes());
        (status, serde_json::from_str(&text).expect("a JSON body"))
    }

    /// A streamed POST: the status, the Content-Type and the raw event text.
    pub fn post_stream(&self, path: &str, body: &Value) -> (u16, String, String) {
        let (status, headers, text) = self.request("POST", path, &[], body.to_string().as_bytes());
        let ct = header(&headers, "content-type").unwrap_or_default();
        (status, ct, text)
    }
}

pub fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// Split a raw HTTP/1.1 response, undoing chunked transfer encoding.
pub fn parse_response(raw: &[u8]) -> (u16, Vec<(String, String)>, String) {
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
pub fn events(text: &str) -> Vec<String> {
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
