//! The crate's error type.

use crate::gguf::GgufError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Kernel(#[from] lethe_kernels::KernelError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("unsupported architecture {0:?} (lethe runs: llama, qwen2, qwen3, phi3, phi2, gemma2, gemma3, olmo2)")]
    UnsupportedArch(String),
    #[error("model: {0}")]
    Model(String),
    #[error("context full: {needed} tokens needed, the context holds {n_ctx}")]
    ContextFull { needed: usize, n_ctx: usize },
    #[error("fetch: {0}")]
    Fetch(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// A value the caller gave is out of its domain; `field` names it (a request field, a
    /// flag, an argument). A server answers it with 400, naming the field.
    #[error("{field}: {msg}")]
    BadValue { field: String, msg: String },
    /// An input lethe was given does not hold what it should: a patch, profile or data
    /// file, a setting that does not fit the model it is for.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// lethe's own fault: something its code should have kept true did not hold. A server
    /// answers it with 500.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A [`Error::BadValue`] of `field`.
    pub fn bad_value(field: &str, msg: impl Into<String>) -> Self {
        Error::BadValue {
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    /// The same error for another receiver, where one failure is reported to several
    /// callers (a batched forward pass of several decoders): a full context stays one, any
    /// other failure is internal to the batch.
    pub fn for_each_caller(&self) -> Self {
        match self {
            Error::ContextFull { needed, n_ctx } => Error::ContextFull {
                needed: *needed,
                n_ctx: *n_ctx,
            },
            other => Error::Internal(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
