//! The web page at `/`: chat with a served model, or two side by side (A/B) with where their
//! answers part. Plain HTML, CSS and JavaScript embedded in the binary (nothing fetched from
//! elsewhere); the page talks to the server's own routes (`/v1/models`,
//! `/v1/chat/completions`, `/score`, `/lora-adapters`). `--no-webui` leaves these routes out.

use super::super::AppState;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::sync::Arc;

const INDEX: &str = include_str!("../webui/index.html");
const APP_JS: &str = include_str!("../webui/app.js");
const STYLE_CSS: &str = include_str!("../webui/style.css");

/// The page's paths. They answer without an API key (the page asks for it), as llama-server's
/// page does.
pub const PATHS: [&str; 4] = ["/", "/index.html", "/webui/app.js", "/webui/style.css"];

/// Whether `path` is one of the page's own (served without a key when the page is on).
pub fn is_page(path: &str) -> bool {
    PATHS.contains(&path)
}

/// The page's routes.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/webui/app.js", get(app_js))
        .route("/webui/style.css", get(style_css))
}

/// The page, told whether the server wants a key and whether it is locked (the page hides
/// what a locked server refuses). Neither is a secret: a request without a key gets 401, and
/// a locked server does not list its base.
async fn index(State(state): State<Arc<AppState>>) -> Response {
    let page = INDEX
        .replace(
            "{{key}}",
            if state.cfg.api_keys.is_empty() {
                "false"
            } else {
                "true"
            },
        )
        .replace("{{lock}}", if state.cfg.lock { "true" } else { "false" });
    asset(page, "text/html; charset=utf-8")
}

async fn app_js() -> Response {
    asset(APP_JS.to_string(), "text/javascript; charset=utf-8")
}

async fn style_css() -> Response {
    asset(STYLE_CSS.to_string(), "text/css; charset=utf-8")
}

/// An embedded file, with a policy that keeps the page to this server: no script, style,
/// image or connection from anywhere else.
fn asset(body: String, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn page_paths() {
        assert!(super::is_page("/"));
        assert!(super::is_page("/webui/app.js"));
        assert!(!super::is_page("/v1/chat/completions"));
        assert!(!super::is_page("/webui/other.js"));
        // The page's placeholders are where the route fills them.
        assert!(super::INDEX.contains("{{key}}") && super::INDEX.contains("{{lock}}"));
    }
}
