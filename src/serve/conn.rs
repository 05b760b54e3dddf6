//! The accept loop: HTTP/1.1 connections with a header deadline, a cap on how many are open,
//! and a graceful stop.
//!
//! A client that opens a connection and never finishes its request headers (or keeps an idle
//! keep-alive connection) is dropped after [`Limits::header_timeout`]; at most
//! [`Limits::max_connections`] connections are open at once (the next waits in the listen
//! backlog until one closes), so that half-sent requests can neither exhaust the process's file
//! descriptors nor hold `/health` for longer than one header deadline.

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What one connection may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest wait for a request's headers, including the wait for the next request on an
    /// idle keep-alive connection.
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// Serve `app` on `listener` until `stop` completes, then stop accepting, tell every open
/// connection to finish its current response and close, and wait for them.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
    stop: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut stop = std::pin::pin!(stop);
    loop {
        let permit = tokio::select! {
            p = open.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut stop => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of descriptors or a connection reset before it was accepted: wait a
                    // moment rather than spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let mut http = hyper::server::conn::http1::Builder::new();
        // Header names as llama-server writes them (`Access-Control-Allow-Origin`): some
        // clients compare them case-sensitively.
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .title_case_headers(true);
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    graceful.shutdown().await;
}
