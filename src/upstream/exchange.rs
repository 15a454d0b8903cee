//! seg's HTTP/1.1 client for the upstream hop.
//!
//! A held Ping waits here for up to an hour, so what a waiting exchange keeps is what the
//! fleet pays per device. hyper's client connection keeps an 8 KiB read buffer, an 8 KiB
//! write buffer and its dispatch state for the whole wait, and runs in a task of its own. Here
//! the exchange is a future of the device connection's task, and a connection that waits
//! (for a response, or in the pool) is its socket alone, and its TLS session for an
//! `https://` upstream (`tls_conn`): bytes are read through a buffer on the stack (or
//! decrypted in a per-thread one) and kept on the heap only once they have arrived, and the
//! request's bytes are freed once written.
//!
//! What it speaks is narrow on purpose. Requests are the ones seg built: origin-form target,
//! the headers hygiene left, one framing seg chose (`Content-Length`, or chunked when the
//! device's body has no known length). Responses are read by the codec both hops share
//! (`http1::response` for the head, `http1::BodyDecoder` for the body), strictly. A
//! connection goes back to the pool only after an HTTP/1.1 response framed by length or chunks
//! ended with not one byte more and without `Connection: close`; anything else closes it, so
//! nothing an upstream sends past its response can become another device's response.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header;
use http::{Method, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;

use super::conn::{Io, UpstreamConn, READ_CHUNK};
use super::pool::Pool;
use crate::http1::response::{
    parse_response_head, ResponseHead, ResponseHeadError, MAX_RESPONSE_HEAD,
};
use crate::http1::{
    self, BodyDecoder, BodyError, BodyEvent, BodyFraming, HeadScan, ResponseFraming,
};

/// Request body bytes gathered behind the head into one write before it goes out.
const MAX_PREFIX: usize = 64 * 1024;

/// After a write failed, how long a response the upstream may have sent first (a 413 before
/// it read the body, then close) is waited for.
const EARLY_RESPONSE_GRACE: Duration = Duration::from_millis(50);

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before its response was complete")]
    Closed,
    #[error(transparent)]
    Head(#[from] ResponseHeadError),
    #[error("malformed upstream response body: {0}")]
    BodyFraming(#[from] BodyError),
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The upstream said nothing for `upstream.request_timeout` in the middle of a body.
    #[error("the upstream fell silent in the middle of its response body")]
    BodySilent,
    /// Reading the device's request body failed: the device's fault, not the upstream's.
    /// Boxed: every waiting exchange's future has room for its error.
    #[error(transparent)]
    Body(Box<BodyFault>),
}

/// The request body an exchange sends: the device's body as the gateway passes it on (held
/// to its pace, counted for the audit record). Its error is the device's fault.
pub trait OutgoingBody: Body<Data = Bytes, Error = BodyFault> + Unpin {}

impl<B> OutgoingBody for B where B: Body<Data = Bytes, Error = BodyFault> + Unpin {}

/// Why the request body failed on its way to the upstream: the device's doing, never the
/// upstream's, so the device is answered for it (408 or 400), not with a 502.
#[derive(Debug, thiserror::Error)]
pub enum BodyFault {
    /// Slower than `listen.body_min_rate` over a `listen.body_timeout` window.
    #[error(
        "request body brought {received} bytes in {window:?}, less than the {required} required"
    )]
    TooSlow {
        received: u64,
        required: u64,
        window: Duration,
    },
    #[error("request body framing: {0}")]
    Framing(#[from] BodyError),
    #[error("the device closed the connection before the request body ended")]
    Gone,
    /// The body's bytes and its declared length disagree.
    #[error("{0}")]
    Length(&'static str),
}

/// Whether a request went out (the upstream may have acted on it) when sending failed.
pub enum SendError<B> {
    /// Not one byte written (the connection was closed): it may go out on another one.
    Unsent(ClientError, Box<Outgoing<B>>),
    Failed(ClientError),
}

/// How the request body is framed toward the upstream.
#[derive(Clone, Copy, Debug, PartialEq)]
enum RequestFraming {
    /// This many body bytes are still to be written.
    Length(u64),
    Chunked,
}

/// A request on its way out: its encoded head (and whatever of the body was ready behind
/// it), then the rest of the body.
pub struct Outgoing<B> {
    prefix: Vec<u8>,
    body: Option<B>,
    framing: RequestFraming,
    head_request: bool,
}

impl<B: OutgoingBody> Outgoing<B> {
    /// Encodes the head. `Content-Length` is seg's to write: the device's value when it
    /// sent one (hyper read the body by it), else the body's known length, else chunked.
    pub fn new(request: Request<B>) -> Result<Outgoing<B>, ClientError> {
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        let declared = http1::content_length(&headers).map_err(ClientError::Malformed)?;
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::TRANSFER_ENCODING);
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut prefix = Vec::with_capacity(256 + headers.len() * 32);
        prefix.extend_from_slice(parts.method.as_str().as_bytes());
        prefix.push(b' ');
        prefix.extend_from_slice(target.as_bytes());
        prefix.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &headers {
            prefix.extend_from_slice(name.as_str().as_bytes());
            prefix.extend_from_slice(b": ");
            prefix.extend_from_slice(value.as_bytes());
            prefix.extend_from_slice(b"\r\n");
        }
        let known = declared.or_else(|| body.size_hint().exact());
        let framing = match known {
            Some(0) if !matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) => {
                RequestFraming::Length(0)
            }
            Some(n) => {
                prefix.extend_from_slice(b"content-length: ");
                prefix.extend_from_slice(n.to_string().as_bytes());
                prefix.extend_from_slice(b"\r\n");
                RequestFraming::Length(n)
            }
            None => {
                prefix.extend_from_slice(b"transfer-encoding: chunked\r\n");
                RequestFraming::Chunked
            }
        };
        prefix.extend_from_slice(b"\r\n");
        let done = framing == RequestFraming::Length(0) && body.is_end_stream();
        Ok(Outgoing {
            prefix,
            body: (!done).then_some(body),
            framing,
            head_request: parts.method == Method::HEAD,
        })
    }

    /// Moves body frames that are ready now behind the head, so a small request goes out in
    /// one write.
    fn gather(&mut self, cx: &mut Context<'_>) -> Result<(), ClientError> {
        while self.prefix.len() < MAX_PREFIX {
            let Some(body) = self.body.as_mut() else {
                return Ok(());
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Some(Err(e))) => return Err(ClientError::Body(Box::new(e))),
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        let mut framed = std::mem::take(&mut self.prefix);
                        self.frame(&data, &mut framed)?;
                        self.prefix = framed;
                    }
                }
                Poll::Ready(None) => {
                    let mut framed = std::mem::take(&mut self.prefix);
                    self.end(&mut framed)?;
                    self.prefix = framed;
                }
            }
        }
        Ok(())
    }

    /// Appends one frame of body data, framed.
    fn frame(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), ClientError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.framing {
            RequestFraming::Length(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return Err(ClientError::Body(Box::new(BodyFault::Length(
                        "the body is longer than its Content-Length",
                    ))));
                }
                *left -= n;
                out.extend_from_slice(data);
            }
            RequestFraming::Chunked => http1::encode_chunk(out, data),
        }
        Ok(())
    }

    /// The body ended: the last chunk, or a check that every declared byte came.
    fn end(&mut self, out: &mut Vec<u8>) -> Result<(), ClientError> {
        self.body = None;
        match self.framing {
            RequestFraming::Length(0) => Ok(()),
            RequestFraming::Length(_) => Err(ClientError::Body(Box::new(BodyFault::Length(
                "the body ended before its Content-Length",
            )))),
            RequestFraming::Chunked => {
                out.extend_from_slice(http1::LAST_CHUNK);
                Ok(())
            }
        }
    }
}

/// Sends `out` on `conn` and reads the response head; the body streams from the returned
/// response, fails when the upstream falls silent within it for `silence`, and gives the
/// connection back to `pool` when it has ended cleanly.
pub async fn send<B: OutgoingBody>(
    mut conn: UpstreamConn,
    mut out: Box<Outgoing<B>>,
    pool: &Arc<Pool>,
    silence: Duration,
) -> Result<Response<UpstreamBody>, SendError<B>> {
    if let Err(e) = poll_fn(|cx| Poll::Ready(out.gather(cx))).await {
        return Err(SendError::Failed(e));
    }
    // The first write tells whether the connection was still open: an error before any
    // byte went out leaves the request unsent.
    let written = match conn.io.write(&out.prefix).await {
        Ok(0) => {
            let closed = io::Error::from(io::ErrorKind::WriteZero);
            return Err(SendError::Unsent(closed.into(), out));
        }
        Err(e) => return Err(SendError::Unsent(e.into(), out)),
        Ok(n) => n,
    };
    let head_request = out.head_request;
    let mut buf = BytesMut::new();
    match write_rest(&mut conn.io, &mut out, written).await {
        Ok(()) => {}
        Err(ClientError::Body(e)) => return Err(SendError::Failed(ClientError::Body(e))),
        Err(e) => {
            // An upstream may answer before it has read the whole body (a 413), then close:
            // that answer is the one to pass on, if it came.
            drop(out);
            let early = read_head(&mut conn.io, &mut buf, head_request);
            return match tokio::time::timeout(EARLY_RESPONSE_GRACE, early).await {
                Ok(Ok(head)) => Ok(respond(conn, buf, head, false, pool, silence)),
                _ => Err(SendError::Failed(e)),
            };
        }
    }
    drop(out);
    match read_head(&mut conn.io, &mut buf, head_request).await {
        Ok(head) => Ok(respond(conn, buf, head, true, pool, silence)),
        Err(e) => Err(SendError::Failed(e)),
    }
}

/// Writes what is left of the prefix, then the body as it comes: each write takes every
/// frame ready by then, so a body sent in many small chunks does not cost a write each.
async fn write_rest<B: OutgoingBody>(
    io: &mut Io,
    out: &mut Outgoing<B>,
    written: usize,
) -> Result<(), ClientError> {
    io.write_all(&out.prefix[written..]).await?;
    out.prefix.clear();
    while out.body.is_some() {
        poll_fn(|cx| {
            out.gather(cx)?;
            if out.prefix.is_empty() && out.body.is_some() {
                // Nothing ready: the body registered this task for its next frame.
                Poll::Pending
            } else {
                Poll::Ready(Ok::<_, ClientError>(()))
            }
        })
        .await?;
        io.write_all(&out.prefix).await?;
        out.prefix.clear();
    }
    out.prefix = Vec::new();
    io.flush().await?;
    Ok(())
}

/// Reads until a final response head has arrived (interim 1xx heads are skipped); body bytes
/// that came with it stay in `buf`. The head is parsed once a line end has come, not from
/// its first byte on every read.
async fn read_head(
    io: &mut Io,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<ResponseHead, ClientError> {
    let mut scan = HeadScan::default();
    loop {
        while scan.may_be_complete(buf, MAX_RESPONSE_HEAD) {
            match parse_response_head(buf, head_request)? {
                Some((head, used)) => {
                    buf.advance(used);
                    scan.restart();
                    match head {
                        Some(head) => return Ok(head),
                        None => continue, // an interim response; the next may be here
                    }
                }
                None => break,
            }
        }
        if poll_fn(|cx| io.poll_read_into(cx, buf, READ_CHUNK)).await? == 0 {
            return Err(ClientError::Closed);
        }
    }
}

/// Builds the response toward the device around `conn`, which its body now owns.
fn respond(
    conn: UpstreamConn,
    buf: BytesMut,
    head: ResponseHead,
    reusable: bool,
    pool: &Arc<Pool>,
    silence_limit: Duration,
) -> Response<UpstreamBody> {
    let decode = match head.framing {
        ResponseFraming::Empty | ResponseFraming::Length(0) => Decode::Done,
        ResponseFraming::Length(n) => Decode::Framed(BodyDecoder::new(BodyFraming::Length(n))),
        ResponseFraming::Chunked => Decode::Framed(BodyDecoder::new(BodyFraming::Chunked)),
        ResponseFraming::UntilClose => Decode::UntilClose,
    };
    let mut body = UpstreamBody {
        conn: Some(conn),
        pool: Arc::clone(pool),
        buf,
        decode,
        keep_alive: reusable && head.keep_alive,
        length: match head.framing {
            ResponseFraming::Length(n) => Some(n),
            ResponseFraming::Empty => Some(0),
            _ => None,
        },
        silence_limit,
        silence: None,
    };
    if matches!(body.decode, Decode::Done) {
        body.finish();
    }
    Response::from_parts(head.parts, body)
}

/// Where a response body's decoding stands.
#[derive(Debug)]
enum Decode {
    /// Framed by its length or its chunks, decoded as request bodies are.
    Framed(BodyDecoder),
    UntilClose,
    Done,
}

/// An upstream response body, decoded from the connection it owns. When it ends cleanly the
/// connection goes back to the pool; dropped before its end (a device that went away during
/// its held Ping), the connection is closed and the upstream sees the request abandoned.
pub struct UpstreamBody {
    conn: Option<UpstreamConn>,
    pool: Arc<Pool>,
    /// Bytes read and not yet handed on.
    buf: BytesMut,
    decode: Decode,
    keep_alive: bool,
    /// The length the head declared, for the size hint.
    length: Option<u64>,
    /// How long the upstream may stay silent in the middle of the body, and the timer
    /// measuring it, made at the first wait.
    silence_limit: Duration,
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl UpstreamBody {
    /// The body has ended: its connection goes back to the pool if nothing is wrong with it.
    fn finish(&mut self) {
        self.decode = Decode::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && self.buf.is_empty() {
                self.pool.give_back(conn);
            }
        }
        self.buf = BytesMut::new();
    }

    fn fail(&mut self, e: ClientError) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        self.keep_alive = false;
        self.finish();
        Poll::Ready(Some(Err(e)))
    }

    /// Reads more into `buf`; `Ok(0)` at the connection's end.
    fn poll_more(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<io::Result<usize>> {
        match self.conn.as_mut() {
            Some(conn) => conn.io.poll_read_into(cx, &mut self.buf, limit),
            None => Poll::Ready(Ok(0)),
        }
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        loop {
            let decoder = match &mut self.decode {
                Decode::Done => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Decode::UntilClose => {
                    if self.buf.is_empty() {
                        match ready!(self.poll_more(cx, READ_CHUNK)) {
                            Ok(0) => {
                                self.keep_alive = false;
                                self.finish();
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return self.fail(e.into()),
                        }
                    }
                    let data = self.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Decode::Framed(decoder) => decoder,
            };
            // Trailer fields are read past, never handed on: they could carry headers the
            // device must not see as the upstream's.
            match decoder.decode(&mut self.buf) {
                Ok(Some(BodyEvent::Data(data))) => {
                    if decoder.is_done() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Some(BodyEvent::End)) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(None) => {
                    // A length body: read no further than its end.
                    let want = decoder.exact_remaining().map_or(READ_CHUNK, |left| {
                        usize::try_from(left).unwrap_or(READ_CHUNK)
                    });
                    match ready!(self.poll_more(cx, want)) {
                        Ok(0) => return self.fail(ClientError::Closed),
                        Ok(_) => {}
                        Err(e) => return self.fail(e.into()),
                    }
                }
                Err(e) => return self.fail(e.into()),
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let this = &mut *self;
        let limit = this.silence_limit;
        match this.step(cx) {
            // Past `limit` of silence the body fails and its connection is closed.
            Poll::Pending => {
                let timer = this
                    .silence
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                ready!(timer.as_mut().poll(cx));
                this.fail(ClientError::BodySilent)
            }
            Poll::Ready(frame) => {
                // Something came: the next silence is measured from now.
                if let Some(timer) = this.silence.as_mut() {
                    timer.as_mut().reset(tokio::time::Instant::now() + limit);
                }
                Poll::Ready(frame)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decode, Decode::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.decode, self.length) {
            (Decode::Done, _) => SizeHint::with_exact(0),
            (Decode::Framed(decoder), Some(_)) => decoder
                .exact_remaining()
                .map_or_else(SizeHint::default, SizeHint::with_exact),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    fn head(text: &str) -> Result<Option<(Option<ResponseHead>, usize)>, ResponseHeadError> {
        parse_response_head(text.as_bytes(), false)
    }

    fn framing(text: &str) -> (ResponseFraming, bool) {
        let (head, _) = head(text).expect("parses").expect("complete");
        let head = head.expect("final");
        (head.framing, head.keep_alive)
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (ResponseFraming::Length(5), true)
        );
        // Equal fields are one length; a list in one field is refused, as on requests.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            (ResponseFraming::Length(5), true)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"),
            (ResponseFraming::Chunked, true)
        );
        // Both: the chunks rule and the connection is not reused.
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (ResponseFraming::Chunked, false)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            (ResponseFraming::UntilClose, false)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\n\r\n"),
            (ResponseFraming::UntilClose, false)
        );
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
            (ResponseFraming::Empty, true)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n"),
            (ResponseFraming::Length(5), false)
        );
        assert_eq!(
            framing(
                "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 1\r\n\r\n"
            ),
            (ResponseFraming::Length(1), false)
        );
    }

    #[test]
    fn malformed_heads_are_refused() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\r2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX-A: 1\nX-Injected: 2\r\n\r\n",
            "HTTP/1.1 200 OK\n\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
            "HELLO\r\n\r\n",
        ] {
            assert!(head(bad).is_err(), "accepted: {bad:?}");
        }
    }

    #[test]
    fn interim_responses_are_skipped_and_heads_wait_for_their_end() {
        let (interim, used) = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
            .unwrap()
            .unwrap();
        assert!(interim.is_none());
        assert_eq!(used, "HTTP/1.1 100 Continue\r\n\r\n".len());
        assert!(head("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
    }

    /// A body over a real loopback socket whose far end (the test, standing in for an
    /// upstream: no real server stalls mid-body on demand) writes `parts` with `gap` between
    /// them and then stays open and silent; returns what the body yielded.
    async fn body_through_silence(
        parts: &'static [&'static [u8]],
        gap: Duration,
        limit: Duration,
    ) -> (Vec<u8>, Option<ClientError>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            for part in parts {
                tokio::time::sleep(gap).await;
                socket.write_all(part).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let conn = UpstreamConn::new(Io::Plain(tcp), None);
        let (head, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            .unwrap()
            .unwrap();
        let pool = Pool::new(1, 1, Duration::from_secs(60));
        let mut body =
            respond(conn, BytesMut::new(), head.unwrap(), true, &pool, limit).into_body();
        let mut got = Vec::new();
        let error = loop {
            match poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                Some(Ok(frame)) => got.extend_from_slice(&frame.into_data().unwrap()),
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        upstream.abort();
        (got, error)
    }

    #[tokio::test]
    async fn an_upstream_silent_mid_body_fails_the_body_and_one_that_keeps_talking_does_not() {
        let (got, error) =
            body_through_silence(&[b"hello"], Duration::ZERO, Duration::from_millis(200)).await;
        assert_eq!(got, b"hello");
        assert!(matches!(error, Some(ClientError::BodySilent)), "{error:?}");
        // Each part comes within the limit, though the whole body takes longer than it.
        let (got, error) = body_through_silence(
            &[b"he", b"ll", b"o ", b"wo", b"rl", b"d!"],
            Duration::from_millis(100),
            Duration::from_millis(400),
        )
        .await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(got, b"hello worl");
    }

    /// A request body for the size test: nothing to send.
    struct NoBody;

    impl Body for NoBody {
        type Data = Bytes;
        type Error = BodyFault;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(None)
        }
    }

    /// What a held Ping keeps on the upstream side, guarded (see `proxy::connection`'s
    /// budgets): the exchange's future while it waits for the response head, the connection,
    /// and the response body while it streams.
    #[tokio::test]
    async fn a_waiting_exchange_stays_within_its_budget() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let conn = UpstreamConn::new(Io::Plain(tcp), None);
        let outgoing = Box::new(Outgoing::new(Request::new(NoBody)).unwrap());
        let pool = Pool::new(1, 1, Duration::from_secs(60));
        let waiting = send(conn, outgoing, &pool, Duration::from_secs(1));
        // The future's size is the optimised build's (`cargo test --release`, as CI runs).
        let sizes = [
            ("send future", std::mem::size_of_val(&waiting), 456),
            ("UpstreamConn", std::mem::size_of::<UpstreamConn>(), 64),
            ("UpstreamBody", std::mem::size_of::<UpstreamBody>(), 184),
        ];
        for (name, size, budget) in sizes {
            assert!(size <= budget, "{name}: {size} bytes, budget {budget}");
        }
    }
}
