//! The admin listener (loopback by default): `/metrics`, `/healthz`, `/readyz`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Readiness as last probed: `/readyz` is 200 only when every dependency answered and no
/// CRL is past its nextUpdate.
pub struct Health {
    pub directory_up: AtomicBool,
    pub upstream_up: AtomicBool,
    /// Every CRL is within its nextUpdate.
    pub crls_fresh: AtomicBool,
    /// Kerberos mode: the KDC answered the gateway's probe (always true in header mode).
    pub kdc_up: AtomicBool,
    /// A drain has begun: the balancer should send no more devices here.
    pub draining: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            directory_up: AtomicBool::new(false),
            upstream_up: AtomicBool::new(false),
            crls_fresh: AtomicBool::new(true),
            kdc_up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
        }
    }
}

impl Health {
    /// The names of the dependencies that are down.
    pub fn failing(&self) -> Vec<&'static str> {
        let mut down = Vec::new();
        if self.draining.load(Ordering::Acquire) {
            down.push("draining");
        }
        if !self.directory_up.load(Ordering::Acquire) {
            down.push("directory");
        }
        if !self.upstream_up.load(Ordering::Acquire) {
            down.push("upstream");
        }
        if !self.kdc_up.load(Ordering::Acquire) {
            down.push("kdc");
        }
        if !self.crls_fresh.load(Ordering::Acquire) {
            down.push("crl (past nextUpdate)");
        }
        down
    }
}

/// Serves the admin endpoints until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let metrics = Arc::clone(&metrics);
        let health = Arc::clone(&health);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = answer(request.method(), request.uri().path(), &metrics, &health);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The answer to one admin request. Only GET and HEAD read anything here; any other method
/// is 405, so nothing on this listener can be made to act (hyper leaves HEAD's body out).
fn answer(
    method: &http::Method,
    path: &str,
    metrics: &Metrics,
    health: &Health,
) -> Response<Full<Bytes>> {
    if method != http::Method::GET && method != http::Method::HEAD {
        let mut response = Response::new(Full::new(Bytes::from_static(b"method not allowed\n")));
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        let headers = response.headers_mut();
        headers.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain"),
        );
        return response;
    }
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match health.failing().as_slice() {
            [] => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            down => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {}\n", down.join(", ")),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}
