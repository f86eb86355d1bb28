//! The accept loop: hyper (HTTP/1.1 and HTTP/2) on an injected listener, with graceful
//! shutdown that lets in-flight requests finish up to a deadline.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{route, HttpState};

/// The response body type of every handler.
pub mod bytes_body {
    /// A complete body.
    pub type Body = http_body_util::Full<hyper::body::Bytes>;
}

/// How long in-flight requests may run after shutdown was requested.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves until `shutdown` is cancelled, then stops accepting, drains in-flight requests
/// (at most [`DRAIN_TIMEOUT`]) and returns.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>, shutdown: CancellationToken) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let state = state.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let state = state.clone();
            async move { Ok::<Response<Body>, Infallible>(route(state, request).await) }
        });
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, error = %error, "Connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("HTTP server drained"),
        _ = tokio::time::sleep(DRAIN_TIMEOUT) => tracing::warn!("HTTP drain timed out; closing remaining connections"),
    }
}
