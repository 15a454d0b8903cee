//! The admin listener (loopback by default): `/metrics`, `/healthz` and `/readyz` for
//! Prometheus and the balancer; the device API (`api`) and the status page (`page`) for the
//! helpdesk.
//!
//! The API and the page carry personal data (who uses which phone, and when), so they are
//! not open like `/metrics`. With `admin.api_token_file`, every call needs the token:
//! `Authorization: Bearer <token>` from a program, or the token as the password of HTTP Basic
//! from a browser (any user name, recorded as claimed). The file is read at each call, so a
//! rotated Secret takes effect at once; one that is named but cannot be read refuses every
//! call (it never falls back to the rule without a token). A token, not client certificates:
//! the listener is plain HTTP inside the pod or host, where Prometheus scrapes it, and a
//! token file is one more Secret where a client CA would be a second PKI for the helpdesk.
//! Without a token file only connections from loopback *to* a loopback address are answered
//! (a sidecar proxy or port-forward that connects from 127.0.0.1 to the pod's own address
//! is not local), and only when they name the listener by an IP address or `localhost` (a
//! page elsewhere that rebinds its own name to 127.0.0.1 is refused). Every call, allowed or
//! not, is written to the audit log.

mod api;
mod page;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::proxy::Live;

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

/// What the admin listener reads, and who may read the personal part of it.
pub struct Admin {
    live: Arc<Live>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// When the process started serving, Unix seconds.
    started: i64,
    /// One live decision at a time (`/api/decision`): each asks the directory, uncached.
    deciding: tokio::sync::Semaphore,
}

/// Whether a caller may read the API and the page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Allowed,
    /// A token is set and the caller gave none, or another.
    NoToken,
    /// `admin.api_token_file` is named but cannot be read: nobody is answered.
    TokenUnreadable,
    /// No token is set and the connection is not local, or named the listener by a name
    /// other than `localhost` (DNS rebinding).
    NotLoopback,
}

/// One connection to the admin listener: who connected, to which of our addresses.
#[derive(Clone, Copy)]
struct Caller {
    peer: SocketAddr,
    local: SocketAddr,
}

impl Admin {
    /// The admin side of a running gateway; `admin.api_token_file` is read from the live
    /// configuration at each call.
    pub fn new(live: Arc<Live>, metrics: Arc<Metrics>, health: Arc<Health>) -> Admin {
        Admin {
            live,
            metrics,
            health,
            started: crate::clock::unix_now(),
            deciding: tokio::sync::Semaphore::new(1),
        }
    }

    /// Whether `caller`, presenting the token `given` (if any), may read the API and the page.
    fn access(&self, caller: Caller, given: Option<&str>, headers: &http::HeaderMap) -> Access {
        let token_file = self.live.load().config.admin.api_token_file.clone();
        match token_file {
            Some(path) => {
                let Some(token) = read_token(&path) else {
                    tracing::error!(target: "seg::admin", file = %path.display(), "admin.api_token_file cannot be read or is empty: the device API and the status page refuse every call");
                    return Access::TokenUnreadable;
                };
                match given {
                    Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => {
                        Access::Allowed
                    }
                    _ => Access::NoToken,
                }
            }
            None if caller.peer.ip().to_canonical().is_loopback()
                && caller.local.ip().to_canonical().is_loopback()
                && names_this_host(headers) =>
            {
                Access::Allowed
            }
            None => Access::NotLoopback,
        }
    }

    /// The answer to one request of the API or the page, audited.
    async fn personal(&self, request: Request<Incoming>, caller: Caller) -> Response<Full<Bytes>> {
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(presented_token);
        let access = self.access(
            caller,
            presented.as_ref().map(|(_, token)| token.as_str()),
            request.headers(),
        );
        // The user name a browser typed with the token: a claim, recorded as one.
        let claimed_user = presented.and_then(|(user, _)| user);
        let peer = caller.peer;
        let mut answer = match access {
            Access::Allowed if path.starts_with("/api/") => self.api(request).await,
            Access::Allowed => self.page(request.method(), &path, &query).await,
            Access::NoToken => Answer::text(StatusCode::UNAUTHORIZED, "the admin token is required\n"),
            Access::TokenUnreadable => Answer::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "admin.api_token_file cannot be read: nothing is answered until it can\n",
            ),
            Access::NotLoopback => Answer::text(
                StatusCode::FORBIDDEN,
                "without admin.api_token_file only loopback peers that name this host by address or as localhost are answered\n",
            ),
        };
        crate::audit::record(|line| {
            line.str("kind", "admin-api");
            line.addr("peer", &peer);
            line.str("path", &path);
            line.str("query", &query);
            if let Some(user) = &claimed_user {
                line.str("claimed_user", user);
            }
            if let Some(serial) = &answer.cert_serial {
                line.str("cert_serial", serial);
            }
            line.uint("status", u64::from(answer.status.as_u16()));
            line.str(
                "decision",
                if access == Access::Allowed {
                    "allowed"
                } else {
                    "refused"
                },
            );
        });
        if answer.status == StatusCode::UNAUTHORIZED {
            // A browser asks for the token as a password; a program sends it as a bearer.
            answer.headers.push((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(if path.starts_with("/api/") {
                    "Bearer"
                } else {
                    "Basic realm=\"seg admin\", charset=\"UTF-8\""
                }),
            ));
        }
        answer.into_response()
    }
}

/// The token of an `Authorization` value: a bearer token, or the password of HTTP Basic
/// with the user name given beside it. The scheme's name is case-insensitive (RFC 9110).
fn presented_token(value: &str) -> Option<(Option<String>, String)> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("Bearer") {
        return Some((None, rest.to_string()));
    }
    if !scheme.eq_ignore_ascii_case("Basic") {
        return None;
    }
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    let user = user.chars().filter(|c| !c.is_control()).take(64).collect();
    Some((Some(user), password.to_string()))
}

/// Whether the request names the listener by an IP address or as `localhost`: what a
/// browser sends to a loopback address it was given, and not what it sends to a name an
/// attacker's DNS has pointed at 127.0.0.1.
fn names_this_host(headers: &http::HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => {
            return rest
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

/// The device API's token: the first line of `path`, if it is readable and not empty.
pub fn read_token(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.lines().next()?.trim().to_string()).filter(|t| !t.is_empty())
}

/// Compares without returning early, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One answer of the API or the page, before it is audited.
struct Answer {
    status: StatusCode,
    content_type: &'static str,
    body: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// The certificate a decision was asked for, for the audit record.
    cert_serial: Option<String>,
}

impl Answer {
    fn new(status: StatusCode, content_type: &'static str, body: String) -> Answer {
        Answer {
            status,
            content_type,
            body,
            headers: Vec::new(),
            cert_serial: None,
        }
    }

    fn text(status: StatusCode, body: &str) -> Answer {
        Answer::new(status, "text/plain; charset=utf-8", body.to_string())
    }

    /// 503 with `Retry-After: <seconds>`.
    fn unavailable(retry_after: &'static str, body: &str) -> Answer {
        let mut answer = Answer::text(StatusCode::SERVICE_UNAVAILABLE, body);
        answer
            .headers
            .push((header::RETRY_AFTER, HeaderValue::from_static(retry_after)));
        answer
    }

    fn json(value: &impl serde::Serialize) -> Answer {
        match serde_json::to_string(value) {
            Ok(text) => Answer::new(StatusCode::OK, "application/json", text),
            Err(e) => Answer::text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        for (name, value) in self.headers {
            headers.insert(name, value);
        }
        response
    }
}

/// Serves the admin endpoints until `shutdown` turns true.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let Ok(local) = tcp.local_addr() else {
            continue;
        };
        let caller = Caller { peer, local };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let admin = Arc::clone(&admin);
                async move {
                    let response = match request.uri().path() {
                        "/metrics" | "/healthz" | "/readyz" => open(
                            request.method(),
                            request.uri().path(),
                            &admin.metrics,
                            &admin.health,
                        ),
                        _ => admin.personal(request, caller).await,
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

/// The answer to a request of Prometheus or the balancer. Only GET and HEAD read anything
/// here; any other method is 405, so nothing on this path can be made to act (hyper leaves
/// HEAD's body out).
fn open(method: &Method, path: &str, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut answer = Answer::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        answer
            .headers
            .push((header::ALLOW, HeaderValue::from_static("GET, HEAD")));
        return answer.into_response();
    }
    let answer = match path {
        "/metrics" => Answer::new(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => Answer::text(StatusCode::OK, "ok\n"),
        _ => match health.failing().as_slice() {
            [] => Answer::text(StatusCode::OK, "ready\n"),
            down => Answer::text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {}\n", down.join(", ")),
            ),
        },
    };
    answer.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_comes_as_a_bearer_or_as_basics_password() {
        assert_eq!(presented_token("Bearer abc"), Some((None, "abc".into())));
        assert_eq!(presented_token("bearer  abc"), Some((None, "abc".into())));
        // "helpdesk:abc"
        assert_eq!(
            presented_token("Basic aGVscGRlc2s6YWJj"),
            Some((Some("helpdesk".into()), "abc".into()))
        );
        assert_eq!(presented_token("Basic !!!"), None);
        assert_eq!(presented_token("Digest abc"), None);
        assert_eq!(presented_token("Bearer"), None);
    }

    #[test]
    fn loopback_callers_must_name_the_host_by_address() {
        let host = |value: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_str(value).unwrap());
            names_this_host(&headers)
        };
        assert!(host("127.0.0.1:9100"));
        assert!(host("localhost:9100"));
        assert!(host("[::1]:9100"));
        assert!(host("10.0.0.5"));
        assert!(!host("attacker.example:9100"), "a rebound name");
        assert!(!host("127.0.0.1.nip.io"));
        assert!(!names_this_host(&http::HeaderMap::new()));
    }
}
