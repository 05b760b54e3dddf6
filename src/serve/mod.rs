//! A llama-server compatible HTTP API: routes, fields, SSE framing and error envelope as
//! llama-server has them, with every profile served as a model id.
//!
//! The HTTP side runs on a small tokio runtime; generation runs on one inference thread
//! ([`engine`]) that drives the model's own thread pool, fed by a channel.

pub mod conn;
pub mod engine;
pub mod error;
pub mod request;
pub mod routes;
pub mod sse;
pub mod stats;

pub use engine::{Engine, Event, ServedModel};
pub use error::{ApiError, ApiResult};

use crate::tokenizer::Tokenizer;
use crate::unlearn::Base;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

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
    /// The largest prompt chunk run between decode steps.
    pub n_ubatch: usize,
    /// `/score`: most continuations, and most continuation tokens, in one request.
    pub score_max_conts: usize,
    pub score_max_tokens: usize,
    /// Serve `GET /slots`.
    pub slots: bool,
    /// Serve `GET /metrics`.
    pub metrics: bool,
    /// How long a stop signal lets running requests finish before their generations end.
    pub shutdown_timeout: std::time::Duration,
    /// Longest wait for a request's body once its headers are in.
    pub body_timeout: std::time::Duration,
    /// The connections' header deadline and cap.
    pub limits: conn::Limits,
    /// `--cors-origins`: `*`, `localhost` or the value of `Access-Control-Allow-Origin`.
    pub cors_origins: String,
    /// `--verbose`: chat responses carry `__verbose` (the rendered prompt), as llama-server's.
    pub verbose: bool,
    /// Serve the web page at `/` (off with `--no-webui`).
    pub webui: bool,
}

/// What the loader hands the server once the models are in memory.
pub struct ServedModels {
    /// The base model with its tokenizer and context size (each slot's); every served model
    /// shares its weights.
    pub base: Base,
    /// The base first, then each profile.
    pub models: Vec<ServedModel>,
    /// The model a request without `model` gets (an index into `models`).
    pub default_model: usize,
}

/// What every handler sees.
pub struct AppState {
    pub cfg: ServeConfig,
    pub tok: Arc<Tokenizer>,
    /// The base model's architecture name (for the built-in chat formats).
    pub arch: String,
    /// Served model ids, in the engine's order; `profile` is `None` for the base.
    pub models: Vec<(String, Option<String>)>,
    /// Per served model, what it is made of (see [`ServedModel::audit`]).
    pub audit: Vec<serde_json::Value>,
    /// The base model's file.
    pub model_path: PathBuf,
    pub engine: Engine,
    /// Every patch with its id and default scale, and each model's assistant terms.
    pub adapters: routes::lora::Adapters,
    /// Unix time the server started (`created` of the model list).
    pub created: u64,
}

impl AppState {
    /// Whether model `i` may be served (under `--lock`, only profiles).
    pub fn servable(&self, i: usize) -> bool {
        !self.cfg.lock || self.models[i].1.is_some()
    }

    /// The model a request names (`None` or empty: the default). A server with exactly one
    /// model takes any name, as llama-server does (clients send `gpt-3.5-turbo` and the like);
    /// with several, an unknown name is a 404: a mistyped profile must never fall back to
    /// the unforgotten base.
    pub fn resolve_model(&self, name: Option<&str>) -> ApiResult<usize> {
        let mut servable = (0..self.models.len()).filter(|&i| self.servable(i));
        let only = match (servable.next(), servable.next()) {
            (Some(i), None) => Some(i),
            _ => None,
        };
        let known = |n: &str| self.models.iter().any(|(id, _)| id == n);
        let i = match (name.filter(|n| !n.is_empty()), only) {
            (None, _) => self.cfg.default_model,
            (Some(n), Some(only)) if !known(n) => only,
            (Some(n), _) => self
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

impl AppState {
    /// Whether `headers` carry one of the server's API keys (`Authorization: Bearer KEY` or
    /// `X-Api-Key: KEY`); false when the server has none.
    pub fn has_key(&self, headers: &axum::http::HeaderMap) -> bool {
        let key = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
        key.is_some_and(|k| self.cfg.api_keys.iter().any(|a| a == k))
    }
}

/// Check the API key on every route but the public ones.
async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.cfg.api_keys.is_empty()
        || PUBLIC.contains(&req.uri().path())
        || (state.cfg.webui && routes::webui::is_page(req.uri().path()))
        || state.has_key(req.headers())
    {
        return next.run(req).await;
    }
    ApiError::Authentication.into_response()
}

/// Read a request's whole body within `body_timeout` before its handler runs: a client that
/// stops sending gets 408 instead of holding the connection and the handler.
async fn body_deadline(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limit = state.cfg.body_limit;
    let read = tokio::time::timeout(state.cfg.body_timeout, axum::body::to_bytes(body, limit));
    match read.await {
        Err(_) => ApiError::Timeout(format!(
            "the request body did not arrive within {} s",
            state.cfg.body_timeout.as_secs_f64()
        ))
        .into_response(),
        // `to_bytes` says so when the body is over the limit; anything else is a broken body.
        Ok(Err(e)) if e.to_string().contains("length limit") => {
            ApiError::TooLarge(limit).into_response()
        }
        Ok(Err(e)) => ApiError::InvalidRequest(format!("reading the body: {e}")).into_response(),
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
    }
}

/// Whether `origin` is http(s)://localhost, 127.0.0.1 or [::1], with any port.
fn is_localhost(origin: &str) -> bool {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let Some(rest) = rest else {
        return false;
    };
    let host = if rest.starts_with('[') {
        rest.split(']').next().map(|h| format!("{h}]"))
    } else {
        rest.split(':').next().map(str::to_owned)
    };
    let Some(host) = host else {
        return false;
    };
    let port_ok = match rest.strip_prefix(host.as_str()) {
        Some("") => true,
        Some(p) => p
            .strip_prefix(':')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    };
    port_ok && matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]")
}

/// CORS as llama-server does it, by `--cors-origins`: `*` echoes the request's `Origin`,
/// `localhost` echoes it only for a local origin, anything else is sent as it is; a preflight
/// `OPTIONS` is answered 200 with credentials, llama-server's methods and any header.
async fn cors(State(origins): State<Arc<str>>, req: Request, next: Next) -> Response {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allow = match &*origins {
        "*" => Some(origin.unwrap_or(HeaderValue::from_static("*"))),
        "localhost" => origin.filter(|o| o.to_str().is_ok_and(is_localhost)),
        other => HeaderValue::from_str(other).ok(),
    };
    let mut res = if req.method() == Method::OPTIONS {
        let mut r = StatusCode::OK.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("*"),
        );
        r
    } else {
        next.run(req).await
    };
    let h = res.headers_mut();
    if let Some(allow) = allow {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
    }
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    res
}

/// The application: every route, the key check and the body limit.
pub fn router(state: Arc<AppState>) -> axum::Router {
    let limit = state.cfg.body_limit;
    let app = routes::routes();
    let app = if state.cfg.webui {
        app.merge(routes::webui::routes())
    } else {
        app
    };
    app.fallback(|| async { ApiError::NotFound("File Not Found".into()) })
        // A known path with a method it does not take: llama-server's 404 envelope.
        .method_not_allowed_fallback(|| async { ApiError::NotFound("File Not Found".into()) })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            body_deadline,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The server as it starts: every request is answered 503 `Loading model` until the
/// application is set, then handed to it. CORS applies throughout.
fn gate(app: Arc<OnceLock<axum::Router>>, origins: Arc<str>) -> axum::Router {
    axum::Router::new()
        .fallback(move |req: Request| {
            let app = app.clone();
            async move {
                match app.get() {
                    Some(r) => {
                        let mut r = r.clone();
                        match tower_service::Service::call(&mut r, req).await {
                            Ok(res) => res,
                            Err(never) => match never {},
                        }
                    }
                    None => ApiError::Unavailable("Loading model".into()).into_response(),
                }
            }
        })
        .layer(axum::middleware::from_fn_with_state(origins, cors))
}

/// Listen first (requests get 503 `Loading model` meanwhile), then `load` the models (the
/// base and its profiles, sharing the base's weights) and serve them until SIGINT or
/// SIGTERM. `ready` is called with the bound address once the server listens; a failed
/// load stops the server with its error.
pub fn run(
    mut cfg: ServeConfig,
    load: impl FnOnce() -> crate::Result<ServedModels> + Send + 'static,
    ready: impl FnOnce(std::net::SocketAddr),
) -> crate::Result<()> {
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
        let deadline = cfg.shutdown_timeout;
        let limits = cfg.limits;
        let origins: Arc<str> = cfg.cors_origins.as_str().into();
        let app = Arc::new(OnceLock::new());
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<crate::Error>();
        let loading = app.clone();
        tokio::task::spawn_blocking(move || {
            let state = load().and_then(|l| {
                cfg.n_ctx = l.base.n_ctx;
                cfg.default_model = l.default_model;
                start(cfg, l)
            });
            match state {
                Ok(state) => {
                    let _ = loading.set(router(Arc::new(state)));
                }
                Err(e) => {
                    let _ = failed_tx.send(e);
                }
            }
        });
        let failure = Arc::new(std::sync::Mutex::new(None));
        let seen = failure.clone();
        let stop = async move {
            tokio::select! {
                _ = shutdown() => {
                    eprintln!(
                        "lethe: stopping: running requests get {:.1} s to finish (a second \
                         signal exits at once)",
                        deadline.as_secs_f64()
                    );
                    tokio::spawn(drain(deadline));
                },
                Ok(e) = failed_rx => {
                    *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                },
            }
        };
        conn::serve(listener, gate(app, origins), limits, stop).await;
        let failed = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })
}

/// The handlers' state for `loaded`, with the inference thread started.
fn start(cfg: ServeConfig, loaded: ServedModels) -> crate::Result<AppState> {
    let ServedModels { base, models, .. } = loaded;
    if models.is_empty() || cfg.default_model >= models.len() {
        return Err(crate::Error::Internal("no model to serve".into()));
    }
    let tok = base.tok.clone();
    let ids = models
        .iter()
        .map(|m| (m.id.clone(), m.forgotten.profile.clone()))
        .collect();
    let audit = models.iter().map(|m| m.audit.clone()).collect();
    let arch = base.model.cfg.arch.name().to_string();
    let adapters = routes::lora::Adapters::new(&models);
    let engine = Engine::start(tok.clone(), models, cfg.n_parallel, cfg.n_ctx, cfg.n_ubatch)
        .map_err(io("starting the inference thread"))?;
    Ok(AppState {
        cfg,
        tok,
        arch,
        models: ids,
        audit,
        model_path: base.path,
        engine,
        adapters,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

/// An I/O error with `context`.
fn io(context: &str) -> impl FnOnce(std::io::Error) -> crate::Error {
    let context = context.to_string();
    move |source| crate::Error::Io { context, source }
}

/// Resolves on SIGINT or SIGTERM.
/// After the first stop signal: at `deadline`, end every running generation (their streams
/// get a final event and close, so the graceful shutdown completes); a second signal, or a
/// server still not stopped a few seconds after the deadline, exits at once.
async fn drain(deadline: std::time::Duration) {
    tokio::select! {
        _ = tokio::time::sleep(deadline) => {
            engine::STOP.store(true, std::sync::atomic::Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {
                    eprintln!("lethe: still busy 5 s after the deadline; exiting");
                    std::process::exit(1);
                }
                _ = shutdown() => {}
            }
        }
        _ = shutdown() => {}
    }
    eprintln!("lethe: second stop signal; exiting");
    std::process::exit(130);
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn localhost_origins() {
        for o in [
            "http://localhost",
            "http://localhost:8080",
            "http://127.0.0.1",
            "https://127.0.0.1:3000",
            "http://[::1]",
            "http://[::1]:3000",
        ] {
            assert!(super::is_localhost(o), "{o}");
        }
        for o in [
            "http://web.mydomain.fr",
            "http://evil.com",
            "http://notlocalhost",
            "http://localhost.evil.com",
            "http://localhost:",
            "http://localhost:80x",
            "localhost",
            "ftp://localhost",
        ] {
            assert!(!super::is_localhost(o), "{o}");
        }
    }
}
