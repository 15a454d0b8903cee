//! The admin listener (loopback by default): `/metrics`, `/healthz`, `/readyz`, and the
//! device API (`/api/devices?account=…`, `/api/devices?device=…`, `/api/refusals`): what the
//! gateway knows about each device (`crate::devices`).
//!
//! The device API carries personal data (who uses which phone, and when), so it is not open
//! like `/metrics`: with `admin.api_token_file` every call needs `Authorization: Bearer
//! <token>`; without it only loopback peers are answered (the listener's default address is
//! loopback; on Kubernetes, where Prometheus scrapes it over the pod network, set a token).
//! Every call, allowed or not, is written to the audit log.

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

use std::net::SocketAddr;

use crate::devices::Devices;
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

/// Who may read the device API, and what it reads.
pub struct DeviceApi {
    devices: Arc<Devices>,
    /// The bearer token; `None`: loopback peers only.
    token: Option<String>,
}

impl DeviceApi {
    /// The API over `devices`, guarded by the first line of `token_file` if there is one (an
    /// unreadable or empty file leaves the API to loopback peers, logged).
    pub fn new(devices: Arc<Devices>, token_file: Option<&std::path::Path>) -> DeviceApi {
        let token = token_file.and_then(|path| {
            let token = read_token(path);
            if token.is_none() {
                tracing::warn!(target: "seg::admin", file = %path.display(), "admin.api_token_file is unreadable or empty: the device API answers loopback peers only");
            }
            token
        });
        DeviceApi { devices, token }
    }

    /// Whether a caller from `peer` presenting `headers` may read the API.
    fn allows(&self, peer: SocketAddr, headers: &http::HeaderMap) -> bool {
        match &self.token {
            Some(token) => headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes())),
            None => peer.ip().is_loopback(),
        }
    }

    fn answer(
        &self,
        method: &http::Method,
        path: &str,
        query: &str,
        peer: SocketAddr,
        headers: &http::HeaderMap,
    ) -> Response<Full<Bytes>> {
        let allowed = self.allows(peer, headers);
        let (status, body) = if method != http::Method::GET {
            (StatusCode::METHOD_NOT_ALLOWED, "GET only\n".to_string())
        } else if !allowed {
            match self.token {
                Some(_) => (
                    StatusCode::UNAUTHORIZED,
                    "a bearer token is required\n".into(),
                ),
                None => (
                    StatusCode::FORBIDDEN,
                    "the device API answers loopback peers only; set admin.api_token_file\n".into(),
                ),
            }
        } else {
            let param = |name: &str| query_param(query, name);
            match path {
                "/api/devices" => match (param("account"), param("device")) {
                    (Some(account), _) => json(&self.devices.of_account(&account)),
                    (None, Some(device)) => json(&self.devices.by_device(&device)),
                    (None, None) => (
                        StatusCode::BAD_REQUEST,
                        "account= or device= is required\n".into(),
                    ),
                },
                "/api/refusals" => {
                    let limit = param("limit").and_then(|l| l.parse().ok()).unwrap_or(50);
                    json(&self.devices.refused(limit))
                }
                _ => (StatusCode::NOT_FOUND, "not found\n".into()),
            }
        };
        crate::audit::record(|line| {
            line.str("kind", "admin-api");
            line.addr("peer", &peer);
            line.str("path", path);
            line.str("query", query);
            line.uint("status", u64::from(status.as_u16()));
            line.str("decision", if allowed { "allowed" } else { "refused" });
        });
        let content_type = if status == StatusCode::OK {
            "application/json"
        } else {
            "text/plain"
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// The device API's token: the first line of `path`, if it is readable and not empty.
pub fn read_token(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.lines().next()?.trim().to_string()).filter(|t| !t.is_empty())
}

fn json(devices: &[crate::devices::DeviceState]) -> (StatusCode, String) {
    match serde_json::to_string(devices) {
        Ok(text) => (StatusCode::OK, text),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// The percent-decoded value of `name` in a query string (`+` is a space; as ActiveSync's
/// query is decoded, so a broken escape or a control character is no value).
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| crate::activesync::percent_decode(value).ok())?
    })
}

/// Compares without returning early, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the admin endpoints until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    api: Arc<DeviceApi>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let metrics = Arc::clone(&metrics);
        let health = Arc::clone(&health);
        let api = Arc::clone(&api);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let path = request.uri().path();
                let response = if path.starts_with("/api/") {
                    api.answer(
                        request.method(),
                        path,
                        request.uri().query().unwrap_or(""),
                        peer,
                        request.headers(),
                    )
                } else {
                    answer(request.method(), path, &metrics, &health)
                };
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
