//! One device connection after its handshake: requests read in order, each handed to the
//! gateway with its body streaming, and the responses written back.
//!
//! seg serves devices with this rather than hyper's server connection because of what a
//! connection keeps while it waits. Between requests a connection holds its TLS session
//! (`tls_conn`) and this small state, and no buffer: bytes of a request head are kept only
//! until the head is whole. During a held Ping it adds only the request's own state; hyper
//! kept an 8 KiB read and an 8 KiB write buffer per connection for its whole life. The
//! request syntax is `http1`'s, strict where request smuggling lives.
//!
//! While a request is with the gateway the connection keeps reading the device: to feed the
//! request body when it is asked for, and, once the body is complete, to notice the device
//! leaving. A device that leaves abandons its request: the gateway's future is dropped with
//! its upstream exchange, so a held Ping is closed upstream at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::audit::{AuditBody, AuditRecord};
use super::caps::HeadCharge;
use super::slow::PacedBody;
use super::{CloseAfter, DeviceConnection, Gateway, Handled, MAX_REQUEST_HEAD};
use crate::http1::{
    self, BodyDecoder, BodyEvent, BodyFraming, HeadError, HeadScan, ResponseFraming,
};
use crate::transport::tls_conn::{Cut, DeviceTls};
use crate::upstream::exchange::BodyFault;

/// The most bytes of a next (pipelined) request read while the current one is with the
/// gateway; past it the device is not read until the current response is written.
const MAX_PIPELINED: usize = 64 * 1024;

/// Response bytes gathered before they are encrypted and written: a small response goes out
/// in one record and one write.
const GATHER: usize = 16 * 1024;

/// How long, and for how many bytes, a connection closed with input still coming keeps
/// reading (and dropping) it, so the device reads seg's answer before a reset can destroy
/// it: the kernel answers data sent to a closed socket with a reset, which may discard the
/// response still in the device's receive buffer.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

/// The answer to a request seg ends: after a drain, try again (elsewhere) in a second; after
/// a block, refused.
fn ended_response(why: Cut, date: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(match why {
        Cut::Drain => {
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\
              Connection: close\r\nDate: "
                .as_slice()
        }
        Cut::Blocked => {
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\nDate: ".as_slice()
        }
    });
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n\r\n");
    out
}

/// Why a connection ended other than cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("device connection: {0}")]
    Io(#[from] io::Error),
    /// `listen.idle_timeout` passed without a whole request head; `partial` when some of
    /// one had arrived.
    #[error("no request head within the idle timeout")]
    HeadTimeout { partial: bool },
    #[error("the upstream's response broke off: {0}")]
    ResponseBody(crate::upstream::exchange::ClientError),
}

/// The gateway's work on one request, in its two steps.
enum Work {
    /// Identity and policy (`Gateway::decide`).
    Deciding(Pin<Box<dyn Future<Output = Handled> + Send>>),
    /// The upstream exchange (`Gateway::forward`); a held Ping waits here, so its state is
    /// only this step's.
    Forwarding(Pin<Box<dyn Future<Output = Response<AuditBody>> + Send>>),
}

impl Work {
    /// The response, once there is one; a decision to forward starts the second step.
    fn poll_response(
        &mut self,
        gateway: &Arc<Gateway>,
        cx: &mut Context<'_>,
    ) -> Poll<Response<AuditBody>> {
        loop {
            match self {
                Work::Deciding(decide) => match ready!(decide.as_mut().poll(cx)) {
                    Handled::Answered(response) => return Poll::Ready(response),
                    Handled::Forward(forward) => {
                        *self = Work::Forwarding(Box::pin(Gateway::forward(
                            Arc::clone(gateway),
                            forward,
                        )));
                    }
                },
                Work::Forwarding(forward) => return forward.as_mut().poll(cx),
            }
        }
    }
}

/// A device connection between handshake and close.
pub struct DeviceConn {
    gateway: Arc<Gateway>,
    device: Arc<DeviceConnection>,
    tls: DeviceTls,
    /// Plaintext received and not used yet: (part of) the next request head, or request
    /// body bytes the decoder has not taken. Unallocated when empty.
    buf: BytesMut,
    state: State,
    /// False for a connection over its certificate's cap: one answer, then close.
    keep_alive: bool,
    /// The unfinished head's share of `listen.max_pending_head_bytes`.
    head_charge: HeadCharge,
    /// A drain started: no request after the current one.
    draining: bool,
    idle_timeout: Duration,
    /// Runs while a request head is awaited.
    head_timer: Option<Pin<Box<Sleep>>>,
    /// Bytes of `buf` already looked at for a line end: a head is parsed again only when a
    /// read brought a line end, so a head sent a byte at a time costs one parse per line,
    /// not per byte.
    head_scan: HeadScan,
    /// Close by lingering: the device may still be sending (a refused head, a body nobody
    /// read).
    linger: bool,
}

enum State {
    /// Waiting for a request head.
    Idle,
    /// The gateway is deciding and forwarding; the request body may still be arriving.
    Handling(Box<Handling>),
    /// The response is going out.
    Responding(Box<Responding>),
    /// close_notify, then the connection's end.
    Closing,
    /// Sent close_notify; dropping what the device still sends for a moment (`LINGER`).
    Lingering(Pin<Box<Sleep>>, usize),
}

/// What the connection must remember of a request while it is served.
struct Exchange {
    head_request: bool,
    version: Version,
    /// The request or its framing asked for the connection's end after this exchange.
    close: bool,
    /// A request body still arriving.
    feed: Option<Feed>,
    /// The device closed its side before the body ended: the body's failure answers the
    /// request, so the close does not also abandon it.
    closed_mid_body: bool,
}

struct Handling {
    work: Work,
    exchange: Exchange,
}

struct Responding {
    body: AuditBody,
    framing: ResponseFraming,
    /// Body bytes still due under `Content-Length`.
    remaining: Option<u64>,
    close: bool,
    /// Plaintext gathered and not yet handed to TLS.
    out: Vec<u8>,
    ended: bool,
}

impl DeviceConn {
    pub fn new(
        gateway: Arc<Gateway>,
        device: Arc<DeviceConnection>,
        tls: DeviceTls,
        received: BytesMut,
        head_charge: HeadCharge,
    ) -> DeviceConn {
        let idle_timeout = gateway.config.listen.idle_timeout;
        DeviceConn {
            gateway,
            device,
            tls,
            buf: received,
            state: State::Idle,
            keep_alive: true,
            head_charge,
            draining: false,
            idle_timeout,
            head_timer: None,
            head_scan: HeadScan::default(),
            linger: false,
        }
    }

    /// Answers the gateway's decision for a request with no head at all (a connection over
    /// its certificate's cap: 503 with the account in the audit record), then closes,
    /// lingering over whatever the device sends meanwhile.
    /// The device this connection serves.
    pub fn device(&self) -> &DeviceConnection {
        &self.device
    }

    pub fn refuse_at_once(&mut self) {
        self.keep_alive = false;
        self.linger = true;
        let head = http1::RequestHead {
            method: Method::GET,
            uri: http::Uri::from_static("/"),
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            body: BodyFraming::Empty,
            close: true,
            expects_continue: false,
        };
        self.state = self.dispatch(head);
    }

    /// A drain began: the connection serves one more request, answered with `Connection:
    /// close`, so the device learns from a completed exchange to reconnect (to another
    /// replica); a busy connection closes after its current response. An idle connection is
    /// not closed now, since a request may be on its way: it waits for one until
    /// [`DeviceConn::end_drain`].
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// seg ends the connection (`why`): whatever request is unfinished is answered, so no
    /// device sees a bare close where it sent a request. A drain's moment for this connection
    /// answers `503` with `Retry-After`, a fleet block `403`; a held long poll's upstream
    /// exchange is dropped (its audit record says `drained` or `blocked`); an idle connection
    /// with nothing of a request closes. Returns whether a request was unfinished.
    pub fn end(&mut self, why: Cut) -> Result<bool, ConnectionError> {
        let unanswered = match &self.state {
            State::Handling(_) => true,
            State::Idle => !self.buf.is_empty() || self.tls.has_partial_record(),
            State::Responding(_) | State::Closing | State::Lingering(..) => false,
        };
        self.device.io.mark_cut(why);
        // Dropping the request's work writes its audit record.
        self.state = State::Closing;
        if unanswered {
            self.tls.send(&ended_response(why, &date()))?;
            self.linger = true;
        }
        Ok(unanswered)
    }

    /// Serves requests until the connection ends. Its state lives in `self`, so the future
    /// polling it may be dropped and polling resumed (the caller does so when a drain
    /// starts).
    pub fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectionError>> {
        loop {
            let next = match self.state {
                State::Idle => Some(ready!(self.poll_idle(cx))?),
                State::Handling(_) => ready!(self.poll_handling(cx))?,
                State::Responding(_) => Some(ready!(self.poll_responding(cx))?),
                State::Closing => {
                    // A device that stopped reading meets the write timeout here too.
                    if ready!(self.tls.poll_shutdown(cx)).is_err() || !self.linger {
                        return Poll::Ready(Ok(()));
                    }
                    Some(State::Lingering(Box::pin(tokio::time::sleep(LINGER)), 0))
                }
                State::Lingering(..) => {
                    ready!(self.poll_linger(cx));
                    return Poll::Ready(Ok(()));
                }
            };
            match next {
                Some(state) => self.state = state,
                // The device left during its request: the request is abandoned.
                None => return Poll::Ready(Ok(())),
            }
        }
    }

    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Result<State, ConnectionError>> {
        loop {
            if self.head_scan.may_be_complete(&self.buf, MAX_REQUEST_HEAD) {
                match http1::parse_request_head(&self.buf, MAX_REQUEST_HEAD) {
                    Ok(Some((head, used))) => {
                        self.buf.advance(used);
                        self.head_scan.restart();
                        self.head_timer = None;
                        self.head_charge.set(0);
                        return Poll::Ready(Ok(self.dispatch(head)));
                    }
                    Ok(None) => {}
                    Err(error) => return Poll::Ready(self.refuse_head(&error)),
                }
            }
            match self.tls.poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(State::Closing)),
                Poll::Ready(Ok(_)) if !self.head_charge.set(self.buf.len()) => {
                    return Poll::Ready(self.refuse_head_memory());
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {}
            }
            let limit = self.idle_timeout;
            let timer = self
                .head_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
            ready!(timer.as_mut().poll(cx));
            return Poll::Ready(Err(ConnectionError::HeadTimeout {
                partial: !self.buf.is_empty() || self.tls.has_partial_record(),
            }));
        }
    }

    /// Drops what the device still sends after close_notify, until it closes its side,
    /// `LINGER` passes or `LINGER_BYTES` have come.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let State::Lingering(timer, dropped) = &mut self.state else {
            return Poll::Ready(());
        };
        loop {
            self.buf.clear();
            match self.tls.poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(n)) if n > 0 && *dropped + n < LINGER_BYTES => *dropped += n,
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return timer.as_mut().poll(cx),
            }
        }
    }

    /// A head seg cannot take: 400 or 431 and close; the HTTP/2 preface gets no answer.
    fn refuse_head(&mut self, error: &HeadError) -> Result<State, ConnectionError> {
        tracing::debug!(target: "seg::listener", peer = %self.device.peer, %error, "request head refused");
        let reason = match error {
            HeadError::TooLarge => "head-too-large",
            HeadError::Malformed(_) => "head-malformed",
            HeadError::Http2Preface => "http2-preface",
        };
        self.audit_refused_head(error.status().map(|s| s.as_u16()), reason);
        self.buf = BytesMut::new();
        self.head_charge.set(0);
        if let Some(status) = error.status() {
            self.tls.send(&http1::error_response(status, &date()))?;
            self.linger = true;
        }
        Ok(State::Closing)
    }

    /// Counts and audits a request refused at its head, like any other request.
    fn audit_refused_head(&self, status: Option<u16>, reason: &'static str) {
        let eas = crate::activesync::EasRequest::headers_only(&HeaderMap::new());
        AuditRecord::new(
            self.device.peer,
            eas,
            &self.gateway.metrics,
            &self.device.io,
            &self.gateway.devices,
        )
        .refused_head(status, reason);
    }

    /// Unfinished heads hold all of `listen.max_pending_head_bytes`: this one is refused
    /// with 503 and a `Retry-After`, and the connection closes.
    fn refuse_head_memory(&mut self) -> Result<State, ConnectionError> {
        tracing::warn!(target: "seg::listener", peer = %self.device.peer, "request head refused: unfinished request heads hold listen.max_pending_head_bytes");
        self.gateway
            .metrics
            .connections_refused
            .with_label_values(&["max_pending_head_bytes"])
            .inc();
        self.audit_refused_head(Some(503), "pending-head-bytes");
        self.buf = BytesMut::new();
        self.head_charge.set(0);
        let retry_after = super::RETRY_AFTER_SECS;
        self.tls.send(&http1::busy_response(retry_after, &date()))?;
        self.linger = true;
        Ok(State::Closing)
    }

    /// Hands a request to the gateway; a body that came with its head goes along whole.
    fn dispatch(&mut self, head: http1::RequestHead) -> State {
        let mut exchange = Exchange {
            head_request: head.method == Method::HEAD,
            version: head.version,
            close: head.close,
            feed: None,
            closed_mid_body: false,
        };
        let body = match head.body {
            BodyFraming::Empty => RequestBody::complete(None),
            framing => self.start_body(framing, head.expects_continue, &mut exchange),
        };
        let mut request = Box::new(Request::new(body));
        *request.method_mut() = head.method;
        *request.uri_mut() = head.uri;
        *request.version_mut() = head.version;
        *request.headers_mut() = head.headers;
        if self.buf.is_empty() {
            // A held Ping keeps no buffer.
            self.buf = BytesMut::new();
        }
        let work = Work::Deciding(Box::pin(Gateway::decide(
            Arc::clone(&self.gateway),
            request,
            Arc::clone(&self.device),
        )));
        State::Handling(Box::new(Handling { work, exchange }))
    }

    /// Decodes what of the body has arrived; the rest streams through a feed.
    fn start_body(
        &mut self,
        framing: BodyFraming,
        expects_continue: bool,
        exchange: &mut Exchange,
    ) -> RequestBody {
        let mut decoder = BodyDecoder::new(framing);
        let mut arrived = Arrived::default();
        loop {
            match decoder.decode(&mut self.buf) {
                Ok(Some(BodyEvent::Data(data))) => arrived.push(data),
                Ok(Some(BodyEvent::End)) => return RequestBody::complete(arrived.take()),
                Ok(None) => break,
                Err(e) => {
                    // Where the message ends is unknown: nothing after it can be read.
                    exchange.close = true;
                    return RequestBody::failed(BodyFault::Framing(e));
                }
            }
        }
        let channel = Arc::new(BodyChannel::new(decoder.exact_remaining()));
        // A client that sent its body without waiting needs no 100 Continue.
        let continue_due = expects_continue && arrived.is_empty();
        if let Some(data) = arrived.take() {
            channel.put(data, decoder.exact_remaining(), Waker::noop());
        }
        exchange.feed = Some(Feed {
            decoder,
            channel: Arc::clone(&channel),
            continue_due,
        });
        RequestBody(Source::Streaming(channel))
    }

    /// Returns the next state, or None when the device left and the request was abandoned.
    fn poll_handling(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<State>, ConnectionError>> {
        let State::Handling(handling) = &mut self.state else {
            return Poll::Ready(Ok(Some(State::Closing)));
        };
        loop {
            // A 100 Continue the socket did not take at once must still reach the device.
            if self.tls.has_pending_output() {
                if let Poll::Ready(Err(e)) = self.tls.poll_flush(cx) {
                    return Poll::Ready(Err(e.into()));
                }
            }
            if let Poll::Ready(response) = handling.work.poll_response(&self.gateway, cx) {
                let State::Handling(handling) = std::mem::replace(&mut self.state, State::Closing)
                else {
                    unreachable!("state checked above");
                };
                let handling = *handling;
                return Poll::Ready(Ok(Some(self.respond(response, handling.exchange))));
            }
            let exchange = &mut handling.exchange;
            match &mut exchange.feed {
                Some(feed) => {
                    if !feed.channel.wanted() {
                        // Nobody reads the body now; a body given up is drained, or the
                        // connection closed, after the response.
                        return Poll::Pending;
                    }
                    if feed.continue_due {
                        feed.continue_due = false;
                        self.tls.send(http1::CONTINUE)?;
                    }
                    match feed.decoder.decode(&mut self.buf) {
                        Ok(Some(BodyEvent::Data(data))) => {
                            let remaining = feed.decoder.exact_remaining();
                            feed.channel.put(data, remaining, cx.waker());
                            continue;
                        }
                        Ok(Some(BodyEvent::End)) => {
                            feed.channel.finish(None, cx.waker());
                            exchange.feed = None;
                            continue;
                        }
                        Err(e) => {
                            feed.channel.finish(Some(BodyFault::Framing(e)), cx.waker());
                            exchange.feed = None;
                            exchange.close = true;
                            continue;
                        }
                        Ok(None) => {}
                    }
                    match self.tls.poll_read(cx, &mut self.buf) {
                        Poll::Ready(Ok(0)) => {
                            feed.channel.finish(Some(BodyFault::Gone), cx.waker());
                            exchange.feed = None;
                            exchange.close = true;
                            exchange.closed_mid_body = true;
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                None => {
                    // The request is complete: watch for the device leaving. Bytes of a
                    // next request are kept, up to a bound. A close that came in the same
                    // read as the request's last bytes is reported by this read.
                    if self.buf.len() >= MAX_PIPELINED || exchange.closed_mid_body {
                        return Poll::Pending;
                    }
                    match self.tls.poll_read(cx, &mut self.buf) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Ok(None)),
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
        }
    }

    /// Encodes the response head and starts on its body.
    fn respond(&mut self, response: Response<AuditBody>, mut exchange: Exchange) -> State {
        let (parts, body) = response.into_parts();
        // The gateway is done with the request, so a body still arriving is one nobody will
        // read: skipped if it has all arrived already; otherwise where the next request
        // starts cannot be known without waiting for the body, and the answer says close.
        let mut body_unread = false;
        if let Some(mut feed) = exchange.feed.take() {
            feed.channel.finish(Some(BodyFault::Gone), Waker::noop());
            body_unread = !drain_arrived(&mut feed.decoder, &mut self.buf);
            self.linger |= body_unread;
        }
        let method = if exchange.head_request {
            &Method::HEAD
        } else {
            &Method::POST
        };
        let framing = http1::response_framing(
            method,
            exchange.version,
            parts.status,
            &parts.headers,
            body.size_hint().exact(),
        );
        let close = exchange.close
            || body_unread
            || !self.keep_alive
            || self.draining
            || framing == ResponseFraming::UntilClose
            || parts.extensions.get::<CloseAfter>().is_some();
        let mut out = Vec::with_capacity(256 + parts.headers.len() * 48);
        http1::encode_response_head(
            &mut out,
            parts.status,
            &parts.headers,
            framing,
            exchange.version,
            close,
            &date(),
        );
        let remaining = match framing {
            ResponseFraming::Length(n) => Some(n),
            _ => None,
        };
        State::Responding(Box::new(Responding {
            body,
            framing,
            remaining,
            close,
            out,
            ended: false,
        }))
    }

    fn poll_responding(&mut self, cx: &mut Context<'_>) -> Poll<Result<State, ConnectionError>> {
        let State::Responding(r) = &mut self.state else {
            return Poll::Ready(Ok(State::Closing));
        };
        loop {
            // What TLS holds must reach the device before more is taken from the upstream.
            if self.tls.has_pending_output() {
                ready!(self.tls.poll_flush(cx))?;
            }
            if r.ended {
                if !r.out.is_empty() {
                    self.tls.send(&r.out)?;
                    r.out = Vec::new();
                    continue;
                }
                ready!(self.tls.poll_flush(cx))?;
                let State::Responding(done) = std::mem::replace(&mut self.state, State::Closing)
                else {
                    unreachable!("state checked above");
                };
                return Poll::Ready(Ok(self.after_response(*done)));
            }
            match Pin::new(&mut r.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // response trailers are not passed on
                    };
                    match r.framing {
                        ResponseFraming::Empty => {}
                        ResponseFraming::Chunked => http1::encode_chunk(&mut r.out, &data),
                        ResponseFraming::UntilClose => r.out.extend_from_slice(&data),
                        ResponseFraming::Length(_) => {
                            let left = r.remaining.unwrap_or(0);
                            let n = (data.len() as u64).min(left);
                            r.out.extend_from_slice(&data[..n as usize]);
                            r.remaining = Some(left - n);
                            if n < data.len() as u64 {
                                // More than its Content-Length: what was declared goes out,
                                // then the connection closes.
                                r.close = true;
                            }
                        }
                    }
                    if r.out.len() >= GATHER {
                        self.tls.send(&r.out)?;
                        r.out.clear();
                    }
                }
                Poll::Ready(None) => {
                    match r.framing {
                        ResponseFraming::Chunked => r.out.extend_from_slice(http1::LAST_CHUNK),
                        // Shorter than its Content-Length: the device must not wait for the
                        // rest on a reused connection.
                        ResponseFraming::Length(_) if r.remaining != Some(0) => r.close = true,
                        _ => {}
                    }
                    r.ended = true;
                }
                Poll::Ready(Some(Err(e))) => {
                    // The device cannot be told cleanly: what was gathered goes out, then the
                    // connection closes, so the truncation shows.
                    let _ = self.tls.send(&r.out);
                    r.out = Vec::new();
                    return Poll::Ready(Err(ConnectionError::ResponseBody(e)));
                }
                Poll::Pending => {
                    if r.out.is_empty() {
                        return Poll::Pending;
                    }
                    self.tls.send(&r.out)?;
                    r.out.clear();
                }
            }
        }
    }

    /// The response is out: the next request, or the connection's end.
    fn after_response(&mut self, done: Responding) -> State {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        if !done.close && !self.draining {
            // Bytes read ahead during the exchange are the next head: charged as one. Past
            // the budget, that head is not read on.
            if !self.head_charge.set(self.buf.len()) {
                return self.refuse_head_memory().unwrap_or(State::Closing);
            }
            State::Idle
        } else {
            State::Closing
        }
    }
}

/// Skips the already-received rest of a body nobody read; true if it ended there.
fn drain_arrived(decoder: &mut BodyDecoder, buf: &mut BytesMut) -> bool {
    loop {
        match decoder.decode(buf) {
            Ok(Some(BodyEvent::Data(_))) => continue,
            Ok(Some(BodyEvent::End)) => return true,
            Ok(None) | Err(_) => return false,
        }
    }
}

fn wake_other(waiting: Option<Waker>, connection: &Waker) {
    if let Some(waker) = waiting {
        if !waker.will_wake(connection) {
            waker.wake();
        }
    }
}

/// The `Date` of responses, formatted once a second per thread.
fn date() -> [u8; 29] {
    use std::cell::Cell;
    thread_local! {
        static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHED.with(|cached| {
        let (at, text) = cached.get();
        if at == now {
            return text;
        }
        let text = http1::http_date(now);
        cached.set((now, text));
        text
    })
}

/// Body bytes that came with the head, joined when they came in several pieces.
#[derive(Default)]
struct Arrived {
    first: Option<Bytes>,
    more: Option<BytesMut>,
}

impl Arrived {
    fn push(&mut self, data: Bytes) {
        match (&mut self.first, &mut self.more) {
            (None, _) => self.first = Some(data),
            (Some(first), None) => {
                let mut joined = BytesMut::with_capacity(first.len() + data.len());
                joined.extend_from_slice(first);
                joined.extend_from_slice(&data);
                self.more = Some(joined);
            }
            (Some(_), Some(joined)) => joined.extend_from_slice(&data),
        }
    }

    fn is_empty(&self) -> bool {
        self.first.as_ref().is_none_or(Bytes::is_empty)
    }

    fn take(&mut self) -> Option<Bytes> {
        match self.more.take() {
            Some(joined) => {
                self.first = None;
                Some(joined.freeze())
            }
            None => self.first.take(),
        }
    }
}

/// A request body on its way from the device to the upstream.
pub struct RequestBody(Source);

enum Source {
    /// All of it: empty, or arrived with the head.
    Complete(Option<Bytes>),
    /// Its framing broke before the request was handed on.
    Failed(Option<BodyFault>),
    /// Still arriving; the connection feeds it as it is read.
    Streaming(Arc<BodyChannel>),
}

impl RequestBody {
    fn complete(data: Option<Bytes>) -> RequestBody {
        RequestBody(Source::Complete(data.filter(|d| !d.is_empty())))
    }

    fn failed(failure: BodyFault) -> RequestBody {
        RequestBody(Source::Failed(Some(failure)))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyFault;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyFault>>> {
        match &mut self.0 {
            Source::Complete(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            Source::Failed(failure) => Poll::Ready(failure.take().map(Err)),
            Source::Streaming(channel) => channel.poll_take(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Source::Complete(data) => data.is_none(),
            Source::Failed(failure) => failure.is_none(),
            Source::Streaming(channel) => channel.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Source::Complete(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Source::Failed(_) => SizeHint::default(),
            Source::Streaming(channel) => channel.size_hint(),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Source::Streaming(channel) = &self.0 {
            channel.abandon();
        }
    }
}

/// The request body still arriving, with the connection's feed.
struct Feed {
    decoder: BodyDecoder,
    channel: Arc<BodyChannel>,
    /// `Expect: 100-continue` is owed once the body is first asked for.
    continue_due: bool,
}

/// Where the connection hands request body bytes to whoever reads the body. Both sides run
/// in the connection's task, so the lock is never contended; it is there because the body
/// travels inside the gateway's future.
struct BodyChannel(Mutex<Slot>);

#[derive(Default)]
struct Slot {
    data: Option<Bytes>,
    /// The body ended: cleanly (None) or not.
    end: Option<Option<BodyFault>>,
    /// The reader found nothing and waits.
    waiting: Option<Waker>,
    /// The reader dropped the body.
    abandoned: bool,
    /// Bytes still to come from the device, when the framing says.
    remaining: Option<u64>,
}

impl BodyChannel {
    fn new(remaining: Option<u64>) -> BodyChannel {
        BodyChannel(Mutex::new(Slot {
            remaining,
            ..Slot::default()
        }))
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the reader found nothing and waits for bytes.
    fn wanted(&self) -> bool {
        let slot = self.slot();
        slot.waiting.is_some() && !slot.abandoned && slot.data.is_none() && slot.end.is_none()
    }

    /// Hands on body bytes, with what the framing says is still to come. The connection
    /// polls the reader again itself when the reader runs in its task (`connection`); any
    /// other reader is woken.
    fn put(&self, data: Bytes, remaining: Option<u64>, connection: &Waker) {
        let mut slot = self.slot();
        slot.remaining = remaining;
        slot.data = Some(data);
        wake_other(slot.waiting.take(), connection);
    }

    fn finish(&self, failure: Option<BodyFault>, connection: &Waker) {
        let mut slot = self.slot();
        if slot.end.is_none() {
            slot.end = Some(failure);
        }
        wake_other(slot.waiting.take(), connection);
    }

    fn abandon(&self) {
        self.slot().abandoned = true;
    }

    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyFault>>> {
        let mut slot = self.slot();
        if let Some(data) = slot.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match slot.end.as_mut() {
            Some(failure) => Poll::Ready(failure.take().map(Err)),
            None => {
                slot.waiting = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn is_end(&self) -> bool {
        let slot = self.slot();
        slot.data.is_none() && matches!(&slot.end, Some(None))
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.slot();
        let buffered = slot.data.as_ref().map_or(0, |d| d.len() as u64);
        match slot.remaining {
            Some(remaining) => SizeHint::with_exact(remaining + buffered),
            None => SizeHint::default(),
        }
    }
}

/// The request body toward the upstream, held to its pace; counts bytes for the audit record.
pub struct CountingBody {
    inner: PacedBody<RequestBody>,
    count: Arc<AtomicU64>,
}

impl CountingBody {
    pub fn new(inner: PacedBody<RequestBody>, count: Arc<AtomicU64>) -> CountingBody {
        CountingBody { inner, count }
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = BodyFault;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            match frame.data_ref() {
                Some(data) => {
                    self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                // Request trailers are never forwarded: they could carry identity headers.
                None => return Poll::Ready(None),
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The memory design, guarded: what a connection keeps between requests and while a Ping is
/// held is this module's types (and the upstream exchange's, see `upstream::exchange`), so
/// their sizes are held to budgets. A change that grows one fails here, with the size it
/// reached; raise a budget only with the fleet benchmark's memory per held Ping and per idle
/// connection beside it (`docs/performance.md`).
#[cfg(test)]
mod size_budgets {
    use super::*;

    /// Fails naming every type over its budget (bytes), with its size.
    fn assert_within(sizes: &[(&str, usize, usize)]) {
        let over: Vec<String> = sizes
            .iter()
            .filter(|(_, size, budget)| size > budget)
            .map(|(name, size, budget)| format!("{name}: {size} bytes, budget {budget}"))
            .collect();
        assert!(over.is_empty(), "over budget: {over:?}");
    }

    #[test]
    fn a_connection_and_a_held_request_stay_within_their_budgets() {
        let sizes = [
            ("DeviceConn", std::mem::size_of::<DeviceConn>(), 264),
            ("DeviceTls", std::mem::size_of::<DeviceTls>(), 136),
            ("State", std::mem::size_of::<State>(), 24),
            ("Handling", std::mem::size_of::<Handling>(), 80),
            ("Responding", std::mem::size_of::<Responding>(), 264),
            ("Exchange", std::mem::size_of::<Exchange>(), 56),
            ("Feed", std::mem::size_of::<Feed>(), 48),
        ];
        assert_within(&sizes);
    }
}
