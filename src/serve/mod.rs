//! A llama-server compatible HTTP API: routes, fields, SSE framing and error envelope as
//! llama-server has them, with every profile served as a model id.
//!
//! The HTTP side runs on a small tokio runtime; generation runs on one inference thread
//! ([`engine`]) that drives the model's own thread pool, fed by a channel.

pub mod engine;
pub mod error;
pub mod request;
pub mod routes;
pub mod sse;

pub use engine::{Engine, Event, ServedModel};
pub use error::{ApiError, ApiResult};

use crate::model::Model;
use crate::tokenizer::Tokenizer;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Server settings (the flags of `lethe serve`, resolved).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Context size of each slot, in tokens.
    pub n_ctx: usize,
    pub n_parallel: usize,
    /// Default `n_predict` (-1: until the context is full).
    pub n_predict: i64,
    /// Default temperature and seed (-1: random).
    pub temperature: f32,
    pub seed: i64,
    /// Accepted API keys; empty: no key needed.
    pub api_keys: Vec<String>,
    /// Chat template override: a built-in name or Jinja source.
    pub chat_template: Option<String>,
    /// The model a request without `model` gets (an index into the served models).
    pub default_model: usize,
    /// Serve only profiles.
    pub lock: bool,
    /// Largest request body, in bytes.
    pub body_limit: usize,
}

/// What every handler sees.
pub struct AppState {
    pub cfg: ServeConfig,
    pub tok: Arc<Tokenizer>,
    /// The base model's architecture name (for the built-in chat formats).
    pub arch: String,
    /// Served model ids, in the engine's order; `profile` is `None` for the base.
    pub models: Vec<(String, Option<String>)>,
    pub engine: Engine,
    /// Unix time the server started (`created` of the model list).
    pub created: u64,
}

impl AppState {
    /// Whether model `i` may be served (under `--lock`, only profiles).
    pub fn servable(&self, i: usize) -> bool {
        !self.cfg.lock || self.models[i].1.is_some()
    }

    /// The model a request names (`None` or empty: the default).
    pub fn resolve_model(&self, name: Option<&str>) -> ApiResult<usize> {
        let i = match name.filter(|n| !n.is_empty()) {
            None => self.cfg.default_model,
            Some(n) => self
                .models
                .iter()
                .position(|(id, _)| id == n)
                .filter(|&i| self.servable(i))
                .ok_or_else(|| ApiError::NotFound(format!("model '{n}' not found")))?,
        };
        if !self.servable(i) {
            return Err(ApiError::Permission(
                "this server is locked: only forgotten profiles are served; name one in 'model'"
                    .into(),
            ));
        }
        Ok(i)
    }
}

/// Routes that answer without an API key.
const PUBLIC: [&str; 4] = ["/health", "/v1/health", "/models", "/v1/models"];

/// Check the API key (`Authorization: Bearer KEY` or `X-Api-Key: KEY`).
async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.cfg.api_keys.is_empty() || PUBLIC.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let h = req.headers();
    let key = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()));
    match key {
        Some(k) if state.cfg.api_keys.iter().any(|a| a == k) => next.run(req).await,
        _ => ApiError::Authentication.into_response(),
    }
}

/// The application: every route, the key check and the body limit.
pub fn router(state: Arc<AppState>) -> axum::Router {
    let limit = state.cfg.body_limit;
    routes::routes()
        .fallback(|| async { ApiError::NotFound("File Not Found".into()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serve `models` (the base and its profiles, sharing `base`'s weights) until SIGINT or
/// SIGTERM. `ready` is called with the bound address once the server listens.
pub fn run(
    cfg: ServeConfig,
    base: Arc<Model>,
    tok: Tokenizer,
    models: Vec<ServedModel>,
    ready: impl FnOnce(std::net::SocketAddr),
) -> crate::Result<()> {
    let io = |context: &str| {
        let context = context.to_string();
        move |source| crate::Error::Io { context, source }
    };
    if models.is_empty() || cfg.default_model >= models.len() {
        return Err(crate::Error::Invalid("no model to serve".into()));
    }
    let tok = Arc::new(tok);
    let ids = models
        .iter()
        .map(|m| (m.id.clone(), m.profile.clone()))
        .collect();
    let arch = base.cfg.arch.name().to_string();
    let engine = Engine::start(base, tok.clone(), models, cfg.n_parallel, cfg.n_ctx)
        .map_err(io("starting the inference thread"))?;
    let state = Arc::new(AppState {
        cfg: cfg.clone(),
        tok,
        arch,
        models: ids,
        engine,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("lethe-http")
        .build()
        .map_err(io("starting the HTTP runtime"))?;
    rt.block_on(async move {
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(io(&format!("listening on {addr}")))?;
        ready(
            listener
                .local_addr()
                .map_err(io("reading the bound address"))?,
        );
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown())
            .await
            .map_err(io("serving"))
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
