//! An ActiveSync stand-in for the demo and the tests: it answers every request with the
//! method, target and headers it received, and records them.
//!
//! Test controls, sent as request headers: `x-echo-status: 449` answers with that status,
//! `x-echo-response-header: Name: value` adds a response header, `x-echo-delay-ms: 500`
//! answers after that long, `x-echo-response-bytes: 16777216` answers with that many bytes
//! (streamed, never held in memory) instead of the JSON, and `x-echo-response-chunked: 1` sends
//! those bytes without a length (chunked). An upstream started with a
//! hold keeps every `Cmd=Ping` request open for that long, and counts the held requests whose
//! connection went away before the answer (`aborted_holds`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request as the upstream saw it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordedRequest {
    pub method: String,
    pub target: String,
    /// Every header line, lowercase name, in arrival order (duplicates kept).
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body was read to its end; false when its connection broke first (then `body`
    /// is empty).
    pub body_complete: bool,
}

impl RecordedRequest {
    /// Every value of a header.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A running echo upstream.
pub struct EchoUpstream {
    pub addr: SocketAddr,
    recorded: Arc<Mutex<Vec<RecordedRequest>>>,
    holds: Arc<Holds>,
    task: JoinHandle<()>,
}

/// Held Pings: how long, how many now, how many abandoned by the caller.
#[derive(Default)]
struct Holds {
    duration: Option<Duration>,
    active: AtomicUsize,
    aborted: AtomicUsize,
}

/// Counts a held request; one dropped before its answer was abandoned upstream.
struct HoldGuard<'a> {
    holds: &'a Holds,
    answered: bool,
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        self.holds.active.fetch_sub(1, Ordering::AcqRel);
        if !self.answered {
            self.holds.aborted.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl EchoUpstream {
    /// Listens on `addr` (use port 0 for any).
    pub async fn start(addr: SocketAddr) -> std::io::Result<EchoUpstream> {
        EchoUpstream::start_with(addr, None, None).await
    }

    /// Listens on `addr` and holds every `Cmd=Ping` request for `hold` before answering.
    pub async fn start_holding(addr: SocketAddr, hold: Duration) -> std::io::Result<EchoUpstream> {
        EchoUpstream::start_with(addr, None, Some(hold)).await
    }

    /// Listens with TLS, serving the given certificate chain and key.
    pub async fn start_tls(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<EchoUpstream> {
        EchoUpstream::start_with(addr, Some(tokio_rustls::TlsAcceptor::from(tls)), None).await
    }

    async fn start_with(
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
        hold: Option<Duration>,
    ) -> std::io::Result<EchoUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let holds = Arc::new(Holds {
            duration: hold,
            ..Holds::default()
        });
        let log = Arc::clone(&recorded);
        let task_holds = Arc::clone(&holds);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                let holds = Arc::clone(&task_holds);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let log = Arc::clone(&log);
                        let holds = Arc::clone(&holds);
                        async move { Ok::<_, Infallible>(echo(request, &log, &holds).await) }
                    });
                    let http = http1::Builder::new();
                    let _ = match tls {
                        None => http.serve_connection(TokioIo::new(tcp), service).await,
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(stream) => {
                                http.serve_connection(TokioIo::new(stream), service).await
                            }
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        Ok(EchoUpstream {
            addr,
            recorded,
            holds,
            task,
        })
    }

    /// Pings being held right now.
    pub fn active_holds(&self) -> usize {
        self.holds.active.load(Ordering::Acquire)
    }

    /// Held Pings whose caller went away before the answer.
    pub fn aborted_holds(&self) -> usize {
        self.holds.aborted.load(Ordering::Acquire)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.recorded.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo(
    request: Request<Incoming>,
    log: &Mutex<Vec<RecordedRequest>>,
    holds: &Holds,
) -> Response<EchoBody> {
    let (parts, body) = request.into_parts();
    let is_ping = parts.uri.query().is_some_and(|q| q.contains("Cmd=Ping"));
    let (body, body_complete) = match body.collect().await {
        Ok(body) => (body.to_bytes().to_vec(), true),
        Err(_) => (Vec::new(), false),
    };
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        target: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
        body_complete,
    };
    let text = serde_json::to_string_pretty(&serde_json::json!({
        "method": recorded.method,
        "target": recorded.target,
        "headers": recorded.headers,
    }))
    .unwrap_or_default();
    let status = header(&recorded, "x-echo-status").and_then(|s| s.parse::<u16>().ok());
    let extra = header(&recorded, "x-echo-response-header");
    let delay = header(&recorded, "x-echo-delay-ms").and_then(|d| d.parse::<u64>().ok());
    let filler = header(&recorded, "x-echo-response-bytes").and_then(|n| n.parse::<u64>().ok());
    let chunked = header(&recorded, "x-echo-response-chunked").is_some();
    if let Ok(mut log) = log.lock() {
        log.push(recorded);
    }
    if let Some(ms) = delay {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let (true, Some(duration)) = (is_ping, holds.duration) {
        holds.active.fetch_add(1, Ordering::AcqRel);
        let mut guard = HoldGuard {
            holds,
            answered: false,
        };
        tokio::time::sleep(duration).await;
        guard.answered = true;
    }
    let mut response = Response::new(match filler {
        Some(left) => EchoBody::Filler { left, chunked },
        None => EchoBody::Json(Full::new(Bytes::from(text + "\n"))),
    });
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some((name, value)) = extra.as_deref().and_then(|h| h.split_once(':')) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.trim().as_bytes()),
            http::HeaderValue::from_str(value.trim()),
        ) {
            headers.insert(name, value);
        }
    }
    if let Some(status) = status.and_then(|s| http::StatusCode::from_u16(s).ok()) {
        *response.status_mut() = status;
    }
    response
}

fn header(request: &RecordedRequest, name: &str) -> Option<String> {
    request.header_values(name).first().map(|v| v.to_string())
}

/// The echo's answer: the JSON of the request, or `x-echo-response-bytes` filler bytes,
/// whose length is left unsaid when `chunked` (so hyper sends them in chunks).
pub enum EchoBody {
    Json(Full<Bytes>),
    Filler { left: u64, chunked: bool },
}

impl hyper::body::Body for EchoBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        const CHUNK: &[u8] = &[b'x'; 64 * 1024];
        match &mut *self {
            EchoBody::Json(full) => std::pin::Pin::new(full).poll_frame(cx),
            EchoBody::Filler { left: 0, .. } => std::task::Poll::Ready(None),
            EchoBody::Filler { left, .. } => {
                let n = (*left).min(CHUNK.len() as u64);
                *left -= n;
                let chunk = Bytes::from_static(&CHUNK[..n as usize]);
                std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EchoBody::Json(full) => full.is_end_stream(),
            EchoBody::Filler { left, .. } => *left == 0,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            EchoBody::Json(full) => full.size_hint(),
            EchoBody::Filler {
                left,
                chunked: false,
            } => hyper::body::SizeHint::with_exact(*left),
            EchoBody::Filler { chunked: true, .. } => hyper::body::SizeHint::default(),
        }
    }
}
