//! The device side of the wire: TLS connections that present a device certificate, and a
//! minimal HTTP/1.1 client (one request at a time per connection, Content-Length or chunked
//! responses) over any stream, so the direct-upstream baseline uses the same code on plain TCP.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A client configuration for one device: its certificate and key, the fleet CA as the only
/// root, and either no session resumption or an in-memory ticket/session cache. It offers
/// TLS 1.3's AES-128-GCM-SHA256 first, as iOS and Android do (rustls alone would offer
/// AES-256-GCM-SHA384 first); seg, nginx and HAProxy all follow the client's order.
pub fn device_config(
    roots: &Arc<rustls::RootCertStore>,
    cert_der: &[u8],
    key: &PrivateKeyDer<'static>,
    resume: bool,
) -> Arc<ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let key = key.clone_key();
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(Arc::clone(roots))
        .with_client_auth_cert(vec![CertificateDer::from(cert_der.to_vec())], key)
        .expect("client auth cert");
    config.resumption = if resume {
        rustls::client::Resumption::in_memory_sessions(8)
    } else {
        rustls::client::Resumption::disabled()
    };
    Arc::new(config)
}

/// TCP connect (no Nagle) then a full or resumed TLS handshake as `localhost`.
pub async fn connect_tls(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> io::Result<HttpConn<TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await?;
    Ok(HttpConn::new(tls))
}

/// Plain TCP (the direct-upstream baseline).
pub async fn connect_plain(addr: SocketAddr) -> io::Result<HttpConn<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(HttpConn::new(tcp))
}

/// A device request: `POST /Microsoft-Server-ActiveSync?Cmd=…&User=…&DeviceId=…&DeviceType=…`.
pub fn eas_request(cmd: &str, user: &str, device_id: &str) -> Vec<u8> {
    format!(
        "POST /Microsoft-Server-ActiveSync?Cmd={cmd}&User={user}&DeviceId={device_id}&DeviceType=iPhone HTTP/1.1\r\n\
         Host: localhost\r\n\
         User-Agent: Apple-iPhone15C2/2104.60\r\n\
         MS-ASProtocolVersion: 14.1\r\n\
         Content-Type: application/vnd.ms-sync.wbxml\r\n\
         Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// One HTTP/1.1 response as far as the bench cares.
pub struct Response {
    pub status: u16,
    /// `Retry-After` in seconds, when present.
    pub retry_after: Option<u64>,
    /// The identity header the fleet upstream received, echoed back as `X-Fleet-Seen-User`.
    pub seen_user: Option<String>,
    /// The fleet upstream's counters (`X-Fleet-Stats`), on its control answers.
    pub stats: Option<String>,
    /// The body, when the connection keeps bodies (`HttpConn::keep_bodies`).
    pub body: Vec<u8>,
}

/// A connection carrying one request at a time.
pub struct HttpConn<S> {
    pub stream: S,
    buf: Vec<u8>,
    /// Keep response bodies (the metrics scrape) instead of dropping them.
    pub keep_bodies: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HttpConn<S> {
    pub fn new(stream: S) -> Self {
        HttpConn {
            stream,
            buf: Vec::with_capacity(1024),
            keep_bodies: false,
        }
    }

    pub async fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.stream.write_all(request).await?;
        self.stream.flush().await
    }

    pub async fn request(&mut self, request: &[u8]) -> io::Result<Response> {
        self.send(request).await?;
        self.read_response().await
    }

    async fn fill(&mut self) -> io::Result<()> {
        self.buf.reserve(4096);
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(())
    }

    /// Reads one response; its body is read and thrown away.
    pub async fn read_response(&mut self) -> io::Result<Response> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| io::Error::other("response head is not UTF-8"))?;
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line in {head:?}")))?;
        let mut length = None;
        let mut chunked = false;
        let mut retry_after = None;
        let mut seen_user = None;
        let mut stats = None;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("retry-after") {
                retry_after = value.parse().ok();
            } else if name.eq_ignore_ascii_case("x-fleet-seen-user") {
                seen_user = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("x-fleet-stats") {
                stats = Some(value.to_string());
            }
        }
        self.buf.drain(..head_end);
        let mut body = Vec::new();
        if chunked {
            // Chunk sizes are kept in a kept body; only the bench's own scrapes keep bodies,
            // and they are answered with Content-Length.
            loop {
                if let Some(i) = find(&self.buf, b"0\r\n\r\n") {
                    let taken: Vec<u8> = self.buf.drain(..i + 5).collect();
                    if self.keep_bodies {
                        body = taken;
                    }
                    break;
                }
                self.fill().await?;
            }
        } else {
            let length = length.unwrap_or(0);
            while self.buf.len() < length {
                self.fill().await?;
            }
            if self.keep_bodies {
                body = self.buf[..length].to_vec();
            }
            self.buf.drain(..length);
        }
        Ok(Response {
            status,
            retry_after,
            seen_user,
            stats,
            body,
        })
    }
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
