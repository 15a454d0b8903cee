//! A connection to the upstream: plain TCP, or TLS for an `https://` upstream, opened by the
//! `Connector`; what a waiting connection keeps is its socket alone (and its TLS session).

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::transport::tls_conn::UpstreamTls;

/// One read's stack buffer: bytes reach the heap only once they have arrived.
pub const READ_CHUNK: usize = 16 * 1024;

/// Whose connections a pool entry holds: `None` in header mode (any request may use any
/// connection), the account in Kerberos mode.
pub type PoolKey = Option<Arc<str>>;

/// A connection to the upstream: plain TCP, or TLS for an `https://` upstream (through
/// rustls's unbuffered API, so a waiting TLS connection keeps no buffer either).
pub enum Io {
    Plain(TcpStream),
    Tls(Box<UpstreamTls>),
}

impl Io {
    /// Reads what is there onto the end of `buf`: through a stack buffer for plain TCP (at
    /// most `limit` bytes), whole records for TLS. `Ok(0)` at the connection's end.
    pub(super) fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        limit: usize,
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Plain(tcp) => {
                let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
                let mut read = ReadBuf::uninit(&mut stack[..limit.clamp(1, READ_CHUNK)]);
                ready!(Pin::new(tcp).poll_read(cx, &mut read))?;
                buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            // More than `limit` may come (a record is decrypted whole): the caller keeps
            // what is past its response and then does not reuse the connection.
            Io::Tls(tls) => tls.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Tls(tls) => {
                ready!(tls.poll_flush(cx))?;
                tls.send(buf)?;
                Poll::Ready(Ok(buf.len()))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Tls(tls) => tls.poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Tls(tls) => tls.poll_shutdown(cx),
        }
    }
}

/// Opens connections to the upstream's host and port, with TLS for an `https://` upstream.
pub struct Connector {
    host: String,
    port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    connect_timeout: Duration,
}

impl Connector {
    pub fn new(
        host: &str,
        port: u16,
        tls: Option<Arc<rustls::ClientConfig>>,
        connect_timeout: Duration,
    ) -> Result<Connector, String> {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = match tls {
            None => None,
            Some(config) => {
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| format!("upstream.url host {host:?}: {e}"))?;
                Some((config, name))
            }
        };
        Ok(Connector {
            host,
            port,
            tls,
            connect_timeout,
        })
    }

    /// Connects to the first of the host's addresses that answers, each within the connect
    /// timeout.
    pub async fn connect(&self) -> io::Result<Io> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
        for addr in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    tcp.set_nodelay(true)?;
                    return match &self.tls {
                        None => Ok(Io::Plain(tcp)),
                        Some((config, name)) => {
                            let tls = UpstreamTls::connect(tcp, Arc::clone(config), name.clone());
                            match tokio::time::timeout(self.connect_timeout, tls).await {
                                Ok(tls) => Ok(Io::Tls(Box::new(tls?))),
                                Err(_) => Err(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    "TLS handshake timed out",
                                )),
                            }
                        }
                    };
                }
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("connecting to {addr} timed out"),
                    )
                }
            }
        }
        Err(last)
    }
}

/// One idle or working connection to the upstream.
pub struct UpstreamConn {
    pub(super) io: Io,
    pub(super) key: PoolKey,
    pub(super) idle_since: Instant,
}

impl UpstreamConn {
    pub fn new(io: Io, key: PoolKey) -> UpstreamConn {
        UpstreamConn {
            io,
            key,
            idle_since: Instant::now(),
        }
    }

    /// Polls the socket once, outside any task: false when the upstream closed it while it
    /// was idle, or sent something unasked.
    pub(super) fn still_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.io
            .poll_read_into(&mut cx, &mut BytesMut::new(), 1)
            .is_pending()
    }
}
