//! An ActiveSync stand-in for the demo and the tests: it answers every request with the
//! method, target and headers it received, and records them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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
    task: JoinHandle<()>,
}

impl EchoUpstream {
    /// Listens on `addr` (use port 0 for any).
    pub async fn start(addr: SocketAddr) -> std::io::Result<EchoUpstream> {
        EchoUpstream::start_with(addr, None).await
    }

    /// Listens with TLS, serving the given certificate chain and key.
    pub async fn start_tls(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Result<EchoUpstream> {
        EchoUpstream::start_with(addr, Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<EchoUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&recorded);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let log = Arc::clone(&log);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let log = Arc::clone(&log);
                        async move { Ok::<_, Infallible>(echo(request, &log).await) }
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
            task,
        })
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
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
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
    };
    let text = serde_json::to_string_pretty(&serde_json::json!({
        "method": recorded.method,
        "target": recorded.target,
        "headers": recorded.headers,
    }))
    .unwrap_or_default();
    if let Ok(mut log) = log.lock() {
        log.push(recorded);
    }
    let mut response = Response::new(Full::new(Bytes::from(text + "\n")));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
