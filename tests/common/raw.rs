//! A tolerant HTTP/1.1 client for the load and fuzz tests (`tests/serve_load.rs`,
//! `tests/serve_fuzz.rs`): any byte string as a body, any Content-Type, and every failure (a
//! refused or reset connection, no answer within the timeout, a truncated or malformed answer)
//! is an `Err` to count and report with the request that caused it, never a panic.
//!
//! Included by those files with `#[path]`, so that `common/mod.rs` stays as it is.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// An answer, its body as sent (chunked transfer encoding undone).
pub struct Response {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> Result<&str, String> {
        std::str::from_utf8(&self.body).map_err(|e| format!("the body is not UTF-8: {e}"))
    }
}

/// POST `body` to `path` on `addr` (`Connection: close`, a correct Content-Length, and
/// `content_type` if given); the answer, read within `timeout`.
pub fn post(
    addr: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<Response, String> {
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str("\r\n");
    let mut raw = req.into_bytes();
    raw.extend_from_slice(body);
    exchange(addr, &raw, timeout)
}

/// Send `request` (whole, as bytes) and read the answer until the server closes.
pub fn exchange(addr: &str, request: &[u8], timeout: Duration) -> Result<Response, String> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("no address for {addr}"))?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(30))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // A server that answers before reading the whole body may close the socket under the
    // write: the answer it sent is still worth reading.
    let wrote = s.write_all(request);
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    if raw.is_empty() {
        return Err(match (wrote, read) {
            (Err(e), _) => format!("write: {e}"),
            (_, Err(e)) => format!("no answer (read: {e})"),
            _ => "the connection closed without an answer".into(),
        });
    }
    if let Err(e) = read {
        return Err(format!(
            "read: {e} after {} bytes of the answer: {}",
            raw.len(),
            clip(&String::from_utf8_lossy(&raw), 300)
        ));
    }
    parse(&raw)
}

/// Split a raw answer, checking that it is whole: a Content-Length body of that length, or a
/// chunked body that ends with its last chunk.
pub fn parse(raw: &[u8]) -> Result<Response, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "the headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let find = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let body = if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(rest)?
    } else if let Some(len) = find("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| format!("bad Content-Length {len}"))?;
        if rest.len() != len {
            return Err(format!(
                "a body of {} bytes, Content-Length {len}",
                rest.len()
            ));
        }
        rest.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a chunked body cut off (no last chunk)")?;
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .ok_or("a bad chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let data = rest
            .get(eol + 2..eol + 2 + size)
            .ok_or("a chunked body cut off in a chunk")?;
        out.extend_from_slice(data);
        rest = rest
            .get(eol + 2 + size + 2..)
            .ok_or("a chunked body cut off after a chunk")?;
    }
}

/// At most `n` characters of `s`, marked when cut.
pub fn clip(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}... ({} bytes in all)", &s[..i], s.len()),
        None => s.to_string(),
    }
}

/// The payloads of a server-sent event stream: each event must be exactly `data: ...\n\n`.
pub fn sse_events(text: &str) -> Result<Vec<&str>, String> {
    let Some(body) = text.strip_suffix("\n\n") else {
        return Err(format!(
            "the stream does not end with a blank line: {}",
            clip(text, 300)
        ));
    };
    body.split("\n\n")
        .map(|e| {
            if e.contains('\n') {
                return Err(format!("an event of several lines: {}", clip(e, 300)));
            }
            e.strip_prefix("data: ")
                .ok_or_else(|| format!("an event without 'data: ': {}", clip(e, 300)))
        })
        .collect()
}

/// Whether `v` is llama-server's error envelope `{"error": {"code", "message", "type"}}` with
/// `code` equal to `status` and a non-empty message; what is wrong with it otherwise.
pub fn check_envelope(v: &serde_json::Value, status: u16) -> Result<(), String> {
    let e = v
        .get("error")
        .and_then(|e| e.as_object())
        .ok_or("no 'error' object")?;
    if v.as_object().map(|o| o.len()) != Some(1) {
        return Err("fields beside 'error'".into());
    }
    if e.get("code").and_then(|c| c.as_u64()) != Some(status as u64) {
        return Err(format!("error.code {:?} is not {status}", e.get("code")));
    }
    match e.get("message").and_then(|m| m.as_str()) {
        Some(m) if !m.trim().is_empty() => {}
        _ => return Err("error.message is not a non-empty string".into()),
    }
    match e.get("type").and_then(|t| t.as_str()) {
        Some(t) if !t.is_empty() => Ok(()),
        _ => Err("error.type is not a non-empty string".into()),
    }
}
