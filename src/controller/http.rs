//! `/healthz`, `/readyz` and `/metrics`.
//!
//! `/healthz` answers while the process runs. `/readyz` answers 200 once the caches are synced
//! and this replica is either the leader or a ready standby, and 503 while the decision log
//! cannot be written; a replica that lost its lease exits instead (see `controller::run`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::journal::LogHealth;
use super::metrics::Metrics;

/// Shared state the endpoints report.
#[derive(Default)]
pub(crate) struct Health {
    pub ready: AtomicBool,
    /// Whether the decision log can be written (the leader's; a standby has none).
    pub log: Arc<LogHealth>,
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

async fn route(
    req: Request<Incoming>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if health.ready.load(Ordering::Relaxed) => match health.log.failing() {
            None => respond(StatusCode::OK, "text/plain", "ok\n".into()),
            Some(error) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("the decision log cannot be written, so nothing new is granted: {error}\n"),
            ),
        },
        "/readyz" => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "caches not synced\n".into(),
        ),
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /healthz, /readyz or /metrics\n".into(),
        ),
    })
}

/// Binds `addr` and serves until the task is dropped.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves connections from `listener` forever.
pub(crate) async fn serve(listener: TcpListener, health: Arc<Health>, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| route(req, health.clone(), metrics.clone()));
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "http connection ended with an error");
            }
        });
    }
}
