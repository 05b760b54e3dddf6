//! Server-sent events as llama-server frames them: `data: {json}\n\n`.

use bytes::Bytes;
use serde_json::Value;

/// One event carrying `v`.
pub fn event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The OpenAI routes' last event.
pub fn done() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}
