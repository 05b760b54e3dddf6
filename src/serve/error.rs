//! llama-server's error envelope: `{"error": {"code", "message", "type"}}`, with its types and
//! status codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// 400 `invalid_request_error`: a malformed body or a bad field.
    InvalidRequest(String),
    /// 401 `authentication_error`.
    Authentication,
    /// 403 `permission_error`.
    Permission(String),
    /// 404 `not_found_error`.
    NotFound(String),
    /// 413 `invalid_request_error`: the body is over the size limit.
    TooLarge(usize),
    /// 501 `not_supported_error`: a feature lethe does not have.
    NotSupported(String),
    /// 400 `exceed_context_size_error`: the prompt does not fit the context.
    ExceedContext {
        n_prompt_tokens: usize,
        n_ctx: usize,
    },
    /// 503 `unavailable_error`.
    Unavailable(String),
    /// 500 `server_error`.
    Server(String),
    /// 408 `timeout_error`: the client stopped sending its request.
    Timeout(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) | ApiError::ExceedContext { .. } => StatusCode::BAD_REQUEST,
            ApiError::Authentication => StatusCode::UNAUTHORIZED,
            ApiError::Permission(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotSupported(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Server(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The `type` field, as llama-server names it.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) | ApiError::TooLarge(_) => "invalid_request_error",
            ApiError::Authentication => "authentication_error",
            ApiError::Permission(_) => "permission_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::NotSupported(_) => "not_supported_error",
            ApiError::ExceedContext { .. } => "exceed_context_size_error",
            ApiError::Unavailable(_) => "unavailable_error",
            ApiError::Server(_) => "server_error",
            ApiError::Timeout(_) => "timeout_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::InvalidRequest(m)
            | ApiError::Permission(m)
            | ApiError::NotFound(m)
            | ApiError::NotSupported(m)
            | ApiError::Unavailable(m)
            | ApiError::Server(m)
            | ApiError::Timeout(m) => m.clone(),
            ApiError::Authentication => "Invalid API Key".into(),
            ApiError::TooLarge(limit) => {
                format!("the request body is larger than the limit of {limit} bytes")
            }
            ApiError::ExceedContext {
                n_prompt_tokens,
                n_ctx,
            } => format!(
                "request ({n_prompt_tokens} tokens) exceeds the available context size \
                 ({n_ctx} tokens), try increasing it"
            ),
        }
    }

    /// The envelope, as a JSON value (also sent as an SSE event when a stream fails).
    pub fn to_json(&self) -> Value {
        let mut e = json!({
            "code": self.status().as_u16(),
            "message": self.message(),
            "type": self.kind(),
        });
        if let ApiError::ExceedContext {
            n_prompt_tokens,
            n_ctx,
        } = self
        {
            e["n_prompt_tokens"] = json!(n_prompt_tokens);
            e["n_ctx"] = json!(n_ctx);
        }
        json!({ "error": e })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.to_json())).into_response()
    }
}

/// A library error met while answering a request. The request's own fields are checked
/// before any work starts (and answered 400 there); what the library reports afterwards is
/// the client's only where it says so: a full context, a bad value (naming its field), a chat
/// template that cannot render the messages. Anything else is lethe's fault: 500.
impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::ContextFull { needed, n_ctx } => ApiError::ExceedContext {
                n_prompt_tokens: needed,
                n_ctx,
            },
            crate::Error::BadValue { field, msg } => {
                ApiError::InvalidRequest(format!("'{field}': {msg}"))
            }
            crate::Error::Template(m) => ApiError::InvalidRequest(format!("chat template: {m}")),
            other => ApiError::Server(other.to_string()),
        }
    }
}

/// Handlers answer with this.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    /// The status, `type` and message of the envelope `e` is answered with.
    fn answered(e: Error) -> (u16, String, String) {
        let j = ApiError::from(e).to_json();
        let e = &j["error"];
        (
            e["code"].as_u64().unwrap() as u16,
            e["type"].as_str().unwrap().to_string(),
            e["message"].as_str().unwrap().to_string(),
        )
    }

    #[test]
    fn a_full_context_is_llama_servers_exceed_context_error() {
        let j = ApiError::from(Error::ContextFull {
            needed: 5000,
            n_ctx: 4096,
        })
        .to_json();
        assert_eq!(j["error"]["code"], 400);
        assert_eq!(j["error"]["type"], "exceed_context_size_error");
        assert_eq!(j["error"]["n_prompt_tokens"], 5000);
        assert_eq!(j["error"]["n_ctx"], 4096);
    }

    #[test]
    fn a_bad_value_is_a_400_naming_its_field() {
        let (code, kind, msg) = answered(Error::bad_value("prompt", "the prompt is empty"));
        assert_eq!((code, kind.as_str()), (400, "invalid_request_error"));
        assert_eq!(msg, "'prompt': the prompt is empty");
        let (code, _, msg) = answered(Error::Template("unknown role 'tool'".into()));
        assert_eq!(code, 400);
        assert!(msg.contains("unknown role"), "{msg}");
    }

    #[test]
    fn everything_else_is_a_500_server_error() {
        let io = std::io::Error::other("disk gone");
        for e in [
            Error::Internal("a batch lost a decoder".into()),
            Error::Invalid("a patch of another model".into()),
            Error::Model("blk.3.attn_q.weight: bad shape".into()),
            Error::Io {
                context: "reading a patch".into(),
                source: io,
            },
        ] {
            let text = e.to_string();
            let (code, kind, msg) = answered(e);
            assert_eq!((code, kind.as_str()), (500, "server_error"), "{text}");
            assert_eq!(msg, text);
        }
    }

    #[test]
    fn one_batch_failure_reaches_each_caller_with_its_kind() {
        let full = Error::ContextFull {
            needed: 9,
            n_ctx: 8,
        };
        assert!(matches!(
            full.for_each_caller(),
            Error::ContextFull {
                needed: 9,
                n_ctx: 8
            }
        ));
        let other = Error::Model("a state of another model".into());
        match other.for_each_caller() {
            Error::Internal(m) => assert_eq!(m, other.to_string()),
            e => panic!("{e:?}"),
        }
    }
}
