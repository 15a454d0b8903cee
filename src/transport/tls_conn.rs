//! TLS connections driven through rustls's unbuffered API: the device's (server side) and
//! an `https://` upstream's (client side).
//!
//! A held Ping leaves both its connections silent for up to an hour, so what a waiting
//! connection keeps is what the fleet pays per device. rustls's buffered connection keeps a
//! 4 KiB receive buffer for the connection's whole life (tokio-rustls cannot free it), and an
//! idle mTLS connection held that way measured 12.6 KiB, against 8.6 KiB here. Here a
//! connection keeps rustls's session state and nothing else: TLS records are read into a
//! per-thread buffer and processed there, a record cut by the read waits on the heap only
//! until its rest arrives, and records to send are encrypted into a per-thread buffer and
//! written at once; only what the socket does not take waits on the heap.
//!
//! On the device side it also bounds how long one write may stay blocked
//! (`listen.write_timeout`): a blocked write means the device stopped reading. Silence,
//! however long, never counts.

use std::cell::RefCell;
use std::future::{poll_fn, Future as _};
use std::io;
use std::ops::DerefMut;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedConnectionCommon, UnbufferedStatus, WriteTraffic,
};
use rustls::HandshakeKind;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// The most one TLS record takes on the wire (rustls accepts up to 16 KiB + 2 KiB of
/// payload plus the 5-byte header), so one read of this size can always complete a record.
const READ_CHUNK: usize = 16 * 1024 + 2048 + 5;

/// The most plaintext encrypted at once.
const MAX_WRITE: usize = 64 * 1024;

/// Room for `MAX_WRITE` bytes of plaintext as records: each 16 KiB record adds at most 29
/// bytes (TLS 1.2 AES-GCM: header, explicit nonce, tag), and records rustls already queued
/// (a key update) go first.
const WRITE_SCRATCH: usize = MAX_WRITE + 4096;

thread_local! {
    /// Where received records are read and decrypted; per thread, since a poll never yields
    /// while using it.
    static READ_SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
    /// Where records to send are encrypted before the socket takes them.
    static SEND_SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; WRITE_SCRATCH].into_boxed_slice());
}

/// What a connection's socket saw, read when the connection ends (to say why it ended) and
/// by the audit record of a response cut short.
#[derive(Debug, Default)]
pub struct IoWatch {
    /// A write stayed blocked past `listen.write_timeout`.
    write_timed_out: AtomicBool,
    /// The device sent bytes since seg last wrote: a request (head) is on its way.
    read_since_write: AtomicBool,
    /// Why seg ended the connection itself, if it did (`Cut`, as a number).
    cut: std::sync::atomic::AtomicU8,
}

/// Why seg itself ended a connection whose request was unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A drain reached this connection's moment in its window.
    Drain = 1,
    /// A fleet block named the device of the long poll held here.
    Blocked = 2,
}

impl IoWatch {
    pub fn write_timed_out(&self) -> bool {
        self.write_timed_out.load(Ordering::Acquire)
    }

    /// Whether the device sent anything since seg last wrote (or since `forget_reads`).
    pub fn read_since_write(&self) -> bool {
        self.read_since_write.load(Ordering::Acquire)
    }

    /// Why seg ended the connection, if it did.
    pub fn cut(&self) -> Option<Cut> {
        match self.cut.load(Ordering::Acquire) {
            1 => Some(Cut::Drain),
            2 => Some(Cut::Blocked),
            _ => None,
        }
    }

    /// Marks why seg ends the connection, before its request is dropped.
    pub fn mark_cut(&self, why: Cut) {
        self.cut.store(why as u8, Ordering::Release);
    }

    /// Forgets the handshake's bytes, so a connection silent after it counts as idle.
    pub fn forget_reads(&self) {
        self.read_since_write.store(false, Ordering::Release);
    }
}

/// Where processing the received records stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The handshake needs more bytes from the device.
    Handshaking,
    /// The handshake is done and every whole record was processed.
    Established,
    /// Both sides sent close_notify.
    Closed,
}

/// rustls's unbuffered connection of either side.
pub trait Side: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Send {
    type Data;
    fn process<'c, 'i>(&'c mut self, records: &'i mut [u8])
        -> UnbufferedStatus<'c, 'i, Self::Data>;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;

    fn process<'c, 'i>(
        &'c mut self,
        records: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(records)
    }
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;

    fn process<'c, 'i>(
        &'c mut self,
        records: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(records)
    }
}

/// A device's TLS connection.
pub type DeviceTls = TlsConn<UnbufferedServerConnection>;

/// An `https://` upstream's TLS connection.
pub type UpstreamTls = TlsConn<UnbufferedClientConnection>;

/// A TLS connection after (or during) its handshake.
pub struct TlsConn<C> {
    tcp: TcpStream,
    conn: Box<C>,
    /// Received bytes that do not make a whole record yet; unallocated most of the time.
    incoming: Vec<u8>,
    /// Encrypted bytes the socket has not taken yet, from `sent` on.
    outgoing: Vec<u8>,
    sent: usize,
    /// The peer sent close_notify or closed its end.
    peer_closed: bool,
    /// seg's close_notify is sealed.
    close_sent: bool,
    /// How long one write may wait for the peer to read (device side only).
    write_timeout: Option<Duration>,
    /// Running while a write waits for the peer to read.
    blocked: Option<Pin<Box<Sleep>>>,
    watch: Arc<IoWatch>,
}

impl DeviceTls {
    /// Runs the TLS handshake on a device's `tcp`. Application data the device sent right
    /// behind its last handshake message (a request in the same packet) is returned with
    /// the connection. A handshake rustls refuses sends its alert, then fails with a
    /// `crate::tls::RefusedHandshake` inside the `io::Error`.
    pub async fn accept(
        tcp: TcpStream,
        config: Arc<rustls::ServerConfig>,
        write_timeout: Duration,
    ) -> io::Result<(DeviceTls, BytesMut)> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        TlsConn::new(tcp, conn, Some(write_timeout))
            .handshake()
            .await
    }
}

impl UpstreamTls {
    /// Runs the TLS handshake with an `https://` upstream as `name`.
    pub async fn connect(
        tcp: TcpStream,
        config: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<UpstreamTls> {
        let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
        let (tls, received) = TlsConn::new(tcp, conn, None).handshake().await?;
        if !received.is_empty() {
            // A server speaks only when asked.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the upstream sent data before any request",
            ));
        }
        Ok(tls)
    }
}

impl<C: Side> TlsConn<C> {
    fn new(tcp: TcpStream, conn: C, write_timeout: Option<Duration>) -> TlsConn<C> {
        TlsConn {
            tcp,
            conn: Box::new(conn),
            incoming: Vec::new(),
            outgoing: Vec::new(),
            sent: 0,
            peer_closed: false,
            close_sent: false,
            write_timeout,
            blocked: None,
            watch: Arc::new(IoWatch::default()),
        }
    }

    /// Drives the handshake to its end, from whichever side speaks first.
    async fn handshake(mut self) -> io::Result<(TlsConn<C>, BytesMut)> {
        let mut plaintext = BytesMut::new();
        // A resumed session's first time, for the tickets this handshake issues (`tickets`).
        let mut origin = None;
        // The name a device asked for, for the record of a refused handshake.
        let mut sni = None;
        loop {
            let mut pending = std::mem::take(&mut self.incoming);
            crate::tls::clear_handshake_notes();
            let step = crate::tls::tickets::with_session_origin(&mut origin, || {
                self.process(&mut pending, &mut plaintext)
            });
            sni = crate::tls::take_sni().or(sni);
            let (consumed, stop) =
                step.map_err(|e| crate::tls::explain_handshake_failure(e, sni.take()))?;
            if self.conn.handshake_kind() == Some(HandshakeKind::Full) {
                // A ticket decrypted but not resumed (refused for its SNI or suite, say).
                origin = None;
            }
            pending.drain(..consumed);
            self.incoming = pending;
            poll_fn(|cx| self.poll_flush(cx)).await?;
            match stop {
                Stop::Established => break,
                Stop::Closed => return Err(io::ErrorKind::UnexpectedEof.into()),
                Stop::Handshaking if self.peer_closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the handshake",
                    ))
                }
                Stop::Handshaking => {}
            }
            let mut chunk = [0u8; 4096];
            let n = poll_fn(|cx| self.poll_read_socket(cx, &mut chunk)).await?;
            if n == 0 {
                self.peer_closed = true;
            }
            self.incoming.extend_from_slice(&chunk[..n]);
        }
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        Ok((self, plaintext))
    }

    /// What the socket saw, shared with the audit records of this connection's requests.
    pub fn watch(&self) -> Arc<IoWatch> {
        Arc::clone(&self.watch)
    }

    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    pub fn handshake_kind(&self) -> Option<HandshakeKind> {
        self.conn.handshake_kind()
    }

    /// Reads what the device sent and appends its plaintext to `plaintext`. Ready(Ok(n))
    /// with n > 0 when application data arrived; Ready(Ok(0)) once the device has closed its
    /// side (close_notify, or the TCP connection's end).
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        plaintext: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let before = plaintext.len();
        while !self.peer_closed {
            let processed = READ_SCRATCH.with_borrow_mut(|scratch| -> Poll<io::Result<()>> {
                let n = ready!(self.poll_read_socket(cx, scratch))?;
                if n == 0 {
                    self.peer_closed = true;
                    return Poll::Ready(Ok(()));
                }
                if self.incoming.is_empty() {
                    // The common case: whole records, processed where they were read; only
                    // a record the read cut in two is kept for the next read.
                    let records = &mut scratch[..n];
                    let (consumed, _) = self.process(records, plaintext)?;
                    self.incoming.extend_from_slice(&records[consumed..]);
                } else {
                    let mut pending = std::mem::take(&mut self.incoming);
                    pending.extend_from_slice(&scratch[..n]);
                    let (consumed, _) = self.process(&mut pending, plaintext)?;
                    pending.drain(..consumed);
                    if !pending.is_empty() {
                        self.incoming = pending;
                    }
                }
                Poll::Ready(Ok(()))
            });
            ready!(processed)?;
            // Records rustls wants sent (a key update's answer) go out now if the socket
            // takes them; otherwise with the next response.
            self.try_send();
            if plaintext.len() > before {
                self.watch.read_since_write.store(true, Ordering::Release);
                return Poll::Ready(Ok(plaintext.len() - before));
            }
        }
        Poll::Ready(Ok(0))
    }

    /// Encrypts `data` and sends what the socket takes at once; the rest waits for
    /// `poll_flush`. Never waits itself: whoever sends much should flush between sends.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        for piece in data.chunks(MAX_WRITE) {
            SEND_SCRATCH.with_borrow_mut(|scratch| -> io::Result<()> {
                let records = self.seal(scratch, |traffic, out| traffic.encrypt(piece, out))?;
                self.send_now(records)
            })?;
        }
        Ok(())
    }

    /// Writes every byte still waiting. The write timeout runs while the device reads none.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            match self.tcp.poll_write_ready(cx) {
                Poll::Pending => return self.blocked(cx),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match self.tcp.try_write(&self.outgoing[self.sent..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.sent += n;
                    self.wrote();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        // Freed, not kept: an idle connection holds no buffer.
        self.outgoing = Vec::new();
        self.sent = 0;
        self.blocked = None;
        Poll::Ready(Ok(()))
    }

    /// Sends close_notify, waits for everything to be written and closes the sending side.
    pub fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_sent && !self.conn.is_handshaking() {
            self.close_sent = true;
            let sealed = SEND_SCRATCH.with_borrow_mut(|scratch| -> io::Result<()> {
                let records = self.seal(scratch, |traffic, out| traffic.queue_close_notify(out))?;
                self.outgoing.extend_from_slice(records);
                Ok(())
            });
            // A connection rustls already failed has nothing more to say.
            if sealed.is_err() && !self.has_pending_output() {
                self.outgoing = Vec::new();
                self.sent = 0;
            }
        }
        ready!(self.poll_flush(cx))?;
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    /// The device's end is known to be closed.
    #[cfg(test)]
    fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Whether part of a TLS record has arrived and waits for its rest.
    pub fn has_partial_record(&self) -> bool {
        !self.incoming.is_empty()
    }

    /// Whether bytes still wait to be written.
    pub fn has_pending_output(&self) -> bool {
        self.sent < self.outgoing.len()
    }

    /// Bytes kept on the heap between reads and writes (zero when idle).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.incoming.capacity() + self.outgoing.capacity()
    }

    /// Runs rustls over `records`: application data goes to `plaintext`, records rustls
    /// wants sent go to `outgoing`. Returns how many bytes of `records` are done with (the
    /// rest, a partial record, must be presented again, first, with more bytes behind it) and
    /// where rustls stopped. An error has sent rustls's alert if the socket took it.
    fn process(
        &mut self,
        records: &mut [u8],
        plaintext: &mut BytesMut,
    ) -> io::Result<(usize, Stop)> {
        let mut consumed = 0;
        match self.process_records(records, &mut consumed, plaintext) {
            Ok(stop) => Ok((consumed, stop)),
            Err(e) => Err(self.fail(e, &mut records[consumed..])),
        }
    }

    fn process_records(
        &mut self,
        records: &mut [u8],
        consumed: &mut usize,
        plaintext: &mut BytesMut,
    ) -> Result<Stop, rustls::Error> {
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process(&mut records[*consumed..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    *consumed += discard;
                    return Err(e);
                }
            };
            let stop = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = match record {
                            Ok(record) => record,
                            Err(e) => {
                                *consumed += discard;
                                return Err(e);
                            }
                        };
                        discard += record.discard;
                        plaintext.extend_from_slice(record.payload);
                    }
                    None
                }
                state @ (ConnectionState::EncodeTlsData(_)
                | ConnectionState::TransmitTlsData(_)
                | ConnectionState::PeerClosed) => {
                    record_keeping(state, &mut self.outgoing, &mut self.peer_closed);
                    None
                }
                ConnectionState::BlockedHandshake => Some(Stop::Handshaking),
                ConnectionState::WriteTraffic(_) => Some(Stop::Established),
                ConnectionState::Closed => Some(Stop::Closed),
                // Early data is never enabled; a state rustls adds later is not understood.
                _ => {
                    return Err(rustls::Error::General(
                        "unexpected TLS connection state".into(),
                    ))
                }
            };
            *consumed += discard;
            if let Some(stop) = stop {
                if stop == Stop::Handshaking && !self.conn.is_handshaking() {
                    return Err(rustls::Error::General(
                        "TLS handshake blocked after it ended".into(),
                    ));
                }
                return Ok(stop);
            }
        }
    }

    /// Encrypts through `seal` into `scratch` (after any records rustls queued itself) and
    /// returns the records.
    fn seal<'s>(
        &mut self,
        scratch: &'s mut [u8],
        seal: impl Fn(&mut WriteTraffic<'_, C::Data>, &mut [u8]) -> Result<usize, EncryptError>,
    ) -> io::Result<&'s [u8]> {
        loop {
            let UnbufferedStatus { discard, state } = self.conn.process(&mut self.incoming);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    let mut rest = std::mem::take(&mut self.incoming);
                    let rest_start = discard.min(rest.len());
                    return Err(self.fail(e, &mut rest[rest_start..]));
                }
            };
            let sealed = match state {
                ConnectionState::WriteTraffic(mut traffic) => match seal(&mut traffic, scratch) {
                    Ok(n) => Some(n),
                    Err(EncryptError::InsufficientSize(InsufficientSizeError {
                        required_size,
                    })) => {
                        // Larger than the scratch can hold (a long queue of records): this
                        // once, on the heap.
                        let mut records = vec![0; required_size];
                        let n = seal(&mut traffic, &mut records).map_err(io::Error::other)?;
                        self.outgoing.extend_from_slice(&records[..n]);
                        Some(0)
                    }
                    Err(e) => return Err(io::Error::other(e)),
                },
                state @ (ConnectionState::EncodeTlsData(_)
                | ConnectionState::TransmitTlsData(_)
                | ConnectionState::PeerClosed) => {
                    record_keeping(state, &mut self.outgoing, &mut self.peer_closed);
                    None
                }
                ConnectionState::Closed => return Err(io::ErrorKind::BrokenPipe.into()),
                _ => {
                    return Err(io::Error::other(
                        "TLS connection not ready for application data",
                    ))
                }
            };
            if discard > 0 {
                self.incoming.drain(..discard);
            }
            if let Some(n) = sealed {
                return Ok(&scratch[..n]);
            }
        }
    }

    /// Writes `records` now, behind anything already waiting; what the socket does not
    /// take waits in `outgoing`.
    fn send_now(&mut self, records: &[u8]) -> io::Result<()> {
        let mut written = 0;
        if !self.has_pending_output() {
            while written < records.len() {
                match self.tcp.try_write(&records[written..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        written += n;
                        self.wrote();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        self.outgoing.extend_from_slice(&records[written..]);
        Ok(())
    }

    /// Writes what waits without waiting; errors are left for the next write to meet.
    fn try_send(&mut self) {
        while self.has_pending_output() {
            match self.tcp.try_write(&self.outgoing[self.sent..]) {
                Ok(n) if n > 0 => {
                    self.sent += n;
                    self.wrote();
                }
                _ => return,
            }
        }
        if !self.outgoing.is_empty() {
            self.outgoing = Vec::new();
            self.sent = 0;
        }
    }

    /// The device took bytes: a blocked write's clock stops.
    fn wrote(&mut self) {
        self.blocked = None;
        self.watch.read_since_write.store(false, Ordering::Release);
    }

    /// A write waits for the device: the write timeout runs, and its end is an error.
    fn blocked(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(limit) = self.write_timeout else {
            // An upstream that stops reading is bounded by upstream.request_timeout.
            return Poll::Pending;
        };
        let timer = self
            .blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        self.watch.write_timed_out.store(true, Ordering::Release);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the device read nothing for {limit:?}"),
        )))
    }

    /// One read from the socket. Through `AsyncRead` rather than `try_read`: tokio takes a
    /// read shorter than the buffer as proof the socket is drained, so the next read waits
    /// for readiness instead of costing a system call that finds nothing (one per request
    /// otherwise, in keep-alive traffic).
    fn poll_read_socket(
        &mut self,
        cx: &mut Context<'_>,
        into: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut read = ReadBuf::new(into);
        ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut read))?;
        Poll::Ready(Ok(read.filled().len()))
    }

    /// rustls refused the connection: its alert goes out if the socket takes it at once, and
    /// the error is returned for the caller to report. `rest` is what remained of the
    /// records being processed: rustls must see the same buffer again to hand out its alert.
    fn fail(&mut self, error: rustls::Error, mut rest: &mut [u8]) -> io::Error {
        for _ in 0..8 {
            let UnbufferedStatus { discard, state } = self.conn.process(rest);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut alert)) => {
                    encode(&mut alert, &mut self.outgoing)
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => break,
            }
            let rest_now = std::mem::take(&mut rest);
            let skip = discard.min(rest_now.len());
            rest = &mut rest_now[skip..];
        }
        self.try_send();
        tls_error(error)
    }
}

/// The states in which rustls only hands over records or news, alike whatever the
/// connection was doing: a handshake or alert record to append to `outgoing` (sent by the
/// next flush, in order behind anything already waiting), records appended already, or the
/// peer's close_notify.
fn record_keeping<Data>(
    state: ConnectionState<'_, '_, Data>,
    outgoing: &mut Vec<u8>,
    peer_closed: &mut bool,
) {
    match state {
        ConnectionState::EncodeTlsData(mut data) => encode(&mut data, outgoing),
        ConnectionState::TransmitTlsData(transmit) => transmit.done(),
        ConnectionState::PeerClosed => *peer_closed = true,
        _ => {}
    }
}

/// Appends a handshake (or alert) record rustls prepared to `outgoing`.
fn encode<Data>(data: &mut EncodeTlsData<'_, Data>, outgoing: &mut Vec<u8>) {
    let start = outgoing.len();
    let mut room = 512;
    loop {
        outgoing.resize(start + room, 0);
        match data.encode(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return;
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(EncodeError::AlreadyEncoded) => {
                outgoing.truncate(start);
                return;
            }
        }
    }
}

/// A rustls error as the `io::Error` tokio-rustls would have made of it.
fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::pki::{CertAuthority, LeafSpec};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;
    use tokio_rustls::client::TlsStream;

    struct Configs {
        server: Arc<rustls::ServerConfig>,
        /// A server that asks for no client certificate: an https:// upstream.
        upstream: Arc<rustls::ServerConfig>,
        device: Arc<rustls::ClientConfig>,
        anonymous: Arc<rustls::ClientConfig>,
    }

    fn configs() -> Configs {
        let ca = CertAuthority::new("seg test", "device TLS CA").unwrap();
        let server = ca.issue(&LeafSpec::loopback_server()).unwrap();
        let device = ca.issue(&LeafSpec::device("device")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der())).unwrap();
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&roots),
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        let key = |pem: &str| PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap();
        let server_builder = || {
            rustls::ServerConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
        };
        let upstream_config = server_builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(server.der.clone())],
                key(&server.key_pem),
            )
            .unwrap();
        let mut server_config = server_builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![CertificateDer::from(server.der)], key(&server.key_pem))
            .unwrap();
        server_config.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
        let client = || {
            rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(Arc::clone(&roots))
        };
        let device_config = client()
            .with_client_auth_cert(vec![CertificateDer::from(device.der)], key(&device.key_pem))
            .unwrap();
        Configs {
            server: Arc::new(server_config),
            upstream: Arc::new(upstream_config),
            device: Arc::new(device_config),
            anonymous: Arc::new(client().with_no_client_auth()),
        }
    }

    /// A handshake over loopback: seg's side and the device's.
    async fn connect(
        configs: &Configs,
        write_timeout: Duration,
    ) -> ((DeviceTls, BytesMut), TlsStream<TcpStream>) {
        let (addr, accepted) = accept_one(configs, write_timeout).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&configs.device));
        let name = ServerName::try_from("localhost").unwrap();
        let device = connector.connect(name, tcp).await.unwrap();
        (accepted.await.unwrap().unwrap(), device)
    }

    /// seg's side of one handshake over loopback: the address to connect to, and the
    /// accepted connection or the handshake's error.
    async fn accept_one(
        configs: &Configs,
        write_timeout: Duration,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<io::Result<(DeviceTls, BytesMut)>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::clone(&configs.server);
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            DeviceTls::accept(tcp, server, write_timeout).await
        });
        (addr, accepted)
    }

    async fn read_exactly<C: Side>(tls: &mut TlsConn<C>, into: &mut BytesMut, n: usize) {
        while into.len() < n {
            let got = poll_fn(|cx| tls.poll_read(cx, into)).await.unwrap();
            assert!(
                got > 0,
                "the device's end came after {} of {n} bytes",
                into.len()
            );
        }
    }

    #[tokio::test]
    async fn data_crosses_both_ways_whatever_its_size_and_nothing_stays_buffered() {
        let configs = configs();
        let ((mut tls, mut received), mut device) = connect(&configs, Duration::from_secs(5)).await;
        let upload: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        let sent = upload.clone();
        let writer = tokio::spawn(async move {
            device.write_all(&sent).await.unwrap();
            device.flush().await.unwrap();
            device
        });
        read_exactly(&mut tls, &mut received, upload.len()).await;
        assert_eq!(&received[..], &upload[..]);
        let mut device = writer.await.unwrap();

        let download: Vec<u8> = (0..777_777u32).map(|i| (i % 241) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 777_777];
            device.read_exact(&mut got).await.unwrap();
            got
        });
        for piece in download.chunks(100_000) {
            tls.send(piece).unwrap();
            poll_fn(|cx| tls.poll_flush(cx)).await.unwrap();
        }
        assert_eq!(reader.await.unwrap(), download);
        // Between exchanges the connection holds no buffer of its own.
        assert_eq!(tls.buffered(), 0);
    }

    #[tokio::test]
    async fn records_cut_into_single_bytes_are_put_together() {
        let configs = configs();
        let (addr, accepted) = accept_one(&configs, Duration::from_secs(5)).await;
        // The device's side in plain rustls, so every TLS byte can go out on its own.
        let device = Arc::clone(&configs.device);
        let writer = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            tcp.set_nodelay(true).unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let mut conn = rustls::ClientConnection::new(device, name).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).unwrap();
            }
            conn.writer().write_all(b"POST / HTTP/1.1\r\n\r\n").unwrap();
            let mut records = Vec::new();
            conn.write_tls(&mut records).unwrap();
            for byte in records {
                tcp.write_all(&[byte]).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            // Keep the connection open until seg has read everything.
            let _ = tcp.read(&mut [0; 1]);
        });
        let (mut tls, mut received) = accepted.await.unwrap().unwrap();
        read_exactly(&mut tls, &mut received, 19).await;
        assert_eq!(&received[..], b"POST / HTTP/1.1\r\n\r\n");
        assert_eq!(
            tls.buffered(),
            0,
            "a completed record leaves nothing behind"
        );
        drop(tls);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn the_devices_close_notify_and_a_key_update_are_understood() {
        let configs = configs();
        let ((mut tls, mut received), mut device) = connect(&configs, Duration::from_secs(5)).await;
        // The device asks for new keys in both directions: seg must answer with its own
        // key update, or the device cannot read what seg sends next.
        device.get_mut().1.refresh_traffic_keys().unwrap();
        device.write_all(b"after the update").await.unwrap();
        device.flush().await.unwrap();
        read_exactly(&mut tls, &mut received, 16).await;
        assert_eq!(&received[..], b"after the update");
        tls.send(b"answer").unwrap();
        poll_fn(|cx| tls.poll_flush(cx)).await.unwrap();
        let mut answer = [0; 6];
        device.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"answer");

        device.shutdown().await.unwrap();
        let mut rest = BytesMut::new();
        assert_eq!(poll_fn(|cx| tls.poll_read(cx, &mut rest)).await.unwrap(), 0);
        assert!(tls.peer_closed());
        poll_fn(|cx| tls.poll_shutdown(cx)).await.unwrap();
        // seg's close_notify reached the device: its read ends cleanly.
        let mut tail = Vec::new();
        device.read_to_end(&mut tail).await.unwrap();
        assert!(tail.is_empty());
    }

    #[tokio::test]
    async fn a_device_without_a_certificate_gets_an_alert_and_a_labelled_error() {
        let configs = configs();
        let (addr, accepted) = accept_one(&configs, Duration::from_secs(5)).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&configs.anonymous));
        let name = ServerName::try_from("localhost").unwrap();
        // TLS 1.3: the client's handshake ends before the server judges its (absent)
        // certificate, so the alert shows on the first read.
        let outcome = match connector.connect(name, tcp).await {
            Ok(mut stream) => {
                let _ = stream.write_all(b"x").await;
                stream.read(&mut [0; 16]).await.map(|_| ())
            }
            Err(e) => Err(e),
        };
        let error = outcome.expect_err("the device must see its refusal");
        assert!(
            error
                .to_string()
                .to_lowercase()
                .contains("certificaterequired"),
            "the device saw {error}"
        );
        let refused = accepted.await.unwrap().err().expect("refused");
        assert_eq!(
            crate::tls::RefusedHandshake::reason_of(&refused),
            "no-client-certificate"
        );
    }

    #[tokio::test]
    async fn the_upstream_side_speaks_first_and_keeps_no_buffer_between_exchanges() {
        let configs = configs();
        // An https:// upstream: rustls's buffered server through tokio-rustls, seg's client
        // side through the unbuffered one.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&configs.upstream));
        let upstream = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut request = vec![0; 300_000];
            tls.read_exact(&mut request).await.unwrap();
            tls.write_all(&request).await.unwrap();
            tls.flush().await.unwrap();
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest).await.unwrap();
            rest
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = UpstreamTls::connect(tcp, Arc::clone(&configs.anonymous), name)
            .await
            .unwrap();
        let request: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        tls.send(&request).unwrap();
        poll_fn(|cx| tls.poll_flush(cx)).await.unwrap();
        let mut echoed = BytesMut::new();
        read_exactly(&mut tls, &mut echoed, request.len()).await;
        assert_eq!(&echoed[..], &request[..]);
        assert_eq!(tls.buffered(), 0);
        poll_fn(|cx| tls.poll_shutdown(cx)).await.unwrap();
        assert!(upstream.await.unwrap().is_empty(), "a clean close_notify");
    }

    #[tokio::test]
    async fn a_write_the_device_never_reads_times_out_and_is_reported() {
        let configs = configs();
        let ((mut tls, _), device) = connect(&configs, Duration::from_millis(300)).await;
        let watch = tls.watch();
        let big = vec![0x5a; 256 * 1024];
        let outcome: io::Result<()> = async {
            loop {
                tls.send(&big)?;
                poll_fn(|cx| tls.poll_flush(cx)).await?;
            }
        }
        .await;
        let error = outcome.expect_err("the device never reads");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(watch.write_timed_out());
        drop(device);
    }
}
