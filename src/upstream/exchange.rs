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
//! device's body has no known length). Responses are read strictly (RFC 9112): a head of at
//! most [`MAX_RESPONSE_HEAD`] bytes with CRLF line ends, no obs-fold, no space before a
//! colon, valid names and values; interim 1xx answers skipped, a `101` refused (seg never
//! asks to switch protocols); the body framed by `Transfer-Encoding: chunked` (taking
//! precedence over, and removing, any `Content-Length`), else by one `Content-Length` (equal
//! duplicates allowed, anything else refused), else by the connection's close. A connection
//! goes back to the pool only after an HTTP/1.1 response framed by length or chunks ended
//! with not one byte more and without `Connection: close`; anything else closes it, so
//! nothing an upstream sends past its response can become another device's response.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncWriteExt;

use super::conn::{Io, UpstreamConn, READ_CHUNK};
use super::pool::Pool;

/// The most bytes a response's status line and headers may take (IIS and Exchange send
/// well under 2 kB); more is a 502.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The most header fields a response may have.
const MAX_RESPONSE_HEADERS: usize = 100;

/// The most bytes of chunk-size line or trailer section read before giving up on them.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

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
    #[error("the upstream's response head is over {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed upstream response: {0}")]
    Malformed(&'static str),
    /// The upstream said nothing for `upstream.request_timeout` in the middle of a body.
    #[error("the upstream fell silent in the middle of its response body")]
    BodySilent,
    /// Reading the device's request body failed: the device's fault, not the upstream's.
    #[error("request body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// The request body an exchange sends: the device's body as the gateway passes it on (held
/// to its pace, counted for the audit record). Its error is the device's fault.
pub trait OutgoingBody:
    Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>> + Unpin
{
}

impl<B> OutgoingBody for B where
    B: Body<Data = Bytes, Error = Box<dyn std::error::Error + Send + Sync>> + Unpin
{
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
        let declared = content_length(&headers).map_err(ClientError::Malformed)?;
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
                Poll::Ready(Some(Err(e))) => return Err(ClientError::Body(e)),
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
                    return Err(ClientError::Body(
                        "the body is longer than its Content-Length".into(),
                    ));
                }
                *left -= n;
                out.extend_from_slice(data);
            }
            RequestFraming::Chunked => {
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
        }
        Ok(())
    }

    /// The body ended: the last chunk, or a check that every declared byte came.
    fn end(&mut self, out: &mut Vec<u8>) -> Result<(), ClientError> {
        self.body = None;
        match self.framing {
            RequestFraming::Length(0) => Ok(()),
            RequestFraming::Length(_) => Err(ClientError::Body(
                "the body ended before its Content-Length".into(),
            )),
            RequestFraming::Chunked => {
                out.extend_from_slice(b"0\r\n\r\n");
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

/// A response head, read.
struct Head {
    parts: http::response::Parts,
    framing: ResponseFraming,
    /// The connection may carry another exchange once this response has ended.
    keep_alive: bool,
}

/// How a response's body is framed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ResponseFraming {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Reads until a final response head has arrived (interim 1xx heads are skipped); body bytes
/// that came with it stay in `buf`.
async fn read_head(
    io: &mut Io,
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Head, ClientError> {
    loop {
        if !buf.is_empty() {
            if let Some((head, used)) = parse_head(buf, head_request)? {
                buf.advance(used);
                match head {
                    Some(head) => return Ok(head),
                    None => continue, // an interim response
                }
            }
            if buf.len() > MAX_RESPONSE_HEAD {
                return Err(ClientError::HeadTooLarge);
            }
        }
        if poll_fn(|cx| io.poll_read_into(cx, buf, READ_CHUNK)).await? == 0 {
            return Err(ClientError::Closed);
        }
    }
}

/// Parses one response head from the start of `buf`: `None` when more bytes are needed,
/// else the bytes it took and the head (`None` for an interim 1xx response).
fn parse_head(
    buf: &[u8],
    head_request: bool,
) -> Result<Option<(Option<Head>, usize)>, ClientError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let used = match response.parse(buf) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ClientError::Malformed("too many header fields"))
        }
        Err(_) => return Err(ClientError::Malformed("unparsable head")),
    };
    if used > MAX_RESPONSE_HEAD {
        return Err(ClientError::HeadTooLarge);
    }
    // httparse takes a bare LF for a line end; seg does not, so a value cannot smuggle a
    // header line of its own past an upstream that meant it as one value.
    if buf[..used]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r'))
    {
        return Err(ClientError::Malformed("bare LF in the head"));
    }
    let code = response.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| ClientError::Malformed("status"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ClientError::Malformed(
            "101 Switching Protocols, never asked for",
        ));
    }
    if status.is_informational() {
        return Ok(Some((None, used)));
    }
    let version = match response.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for field in response.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| ClientError::Malformed("header name"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| ClientError::Malformed("header value"))?;
        headers.append(name, value);
    }
    let chunked = final_coding(&headers).map(|coding| coding.eq_ignore_ascii_case("chunked"));
    let length = content_length(&headers).map_err(ClientError::Malformed)?;
    let closes = has_token(&headers, "close");
    let framing =
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            ResponseFraming::Empty
        } else {
            match (chunked, length) {
                (Some(true), _) => ResponseFraming::Chunked,
                (Some(false), _) => ResponseFraming::UntilClose,
                (None, Some(n)) => ResponseFraming::Length(n),
                (None, None) => ResponseFraming::UntilClose,
            }
        };
    // Both framings given (a response-splitting tell): the chunks rule, the length goes, and
    // the connection is not used again.
    let both = chunked.is_some() && length.is_some();
    if chunked.is_some() || status == StatusCode::NO_CONTENT {
        headers.remove(header::CONTENT_LENGTH);
    }
    let keep_alive =
        version == Version::HTTP_11 && !closes && !both && framing != ResponseFraming::UntilClose;
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some((
        Some(Head {
            parts,
            framing,
            keep_alive,
        }),
        used,
    )))
}

/// The last transfer coding named, if any `Transfer-Encoding` field is present.
fn final_coding(headers: &HeaderMap) -> Option<&str> {
    let mut last = None;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let text = value.to_str().unwrap_or("?");
        if let Some(coding) = text.split(',').map(str::trim).rfind(|c| !c.is_empty()) {
            last = Some(coding);
        } else {
            last = Some("?");
        }
    }
    last
}

/// Whether a `Connection` field names `token`.
fn has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The `Content-Length`, if given: every value (fields and list members) digits only and
/// all equal.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut found: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for member in value.as_bytes().split(|&b| b == b',') {
            let digits = member.trim_ascii();
            if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
                return Err("invalid Content-Length");
            }
            let n = digits
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if found.is_some_and(|f| f != n) {
                return Err("conflicting Content-Length values");
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Builds the response toward the device around `conn`, which its body now owns.
fn respond(
    conn: UpstreamConn,
    buf: BytesMut,
    head: Head,
    reusable: bool,
    pool: &Arc<Pool>,
    silence_limit: Duration,
) -> Response<UpstreamBody> {
    let decode = match head.framing {
        ResponseFraming::Empty | ResponseFraming::Length(0) => Decode::Done,
        ResponseFraming::Length(n) => Decode::Length(n),
        ResponseFraming::Chunked => Decode::Chunked(Chunk::Size),
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
    if body.decode == Decode::Done {
        body.finish();
    }
    Response::from_parts(head.parts, body)
}

/// Where a response body's decoding stands.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Decode {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the current chunk are still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk; this many bytes of it read so far.
    Trailers(usize),
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

    /// Hands on up to `left` bytes of `buf`.
    fn take(&mut self, left: u64) -> Bytes {
        let n = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(self.buf.len());
        self.buf.split_to(n).freeze()
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        loop {
            match self.decode {
                Decode::Done => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Decode::Length(left) | Decode::Chunked(Chunk::Data(left)) => {
                    if self.buf.is_empty() {
                        let want = usize::try_from(left).unwrap_or(READ_CHUNK);
                        match ready!(self.poll_more(cx, want)) {
                            Ok(0) => return self.fail(ClientError::Closed),
                            Ok(_) => {}
                            Err(e) => return self.fail(e.into()),
                        }
                    }
                    let data = self.take(left);
                    let left = left - data.len() as u64;
                    self.decode = match (self.decode, left) {
                        (Decode::Length(_), 0) => Decode::Done,
                        (Decode::Length(_), n) => Decode::Length(n),
                        (_, 0) => Decode::Chunked(Chunk::DataEnd),
                        (_, n) => Decode::Chunked(Chunk::Data(n)),
                    };
                    if self.decode == Decode::Done {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
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
                Decode::Chunked(Chunk::Size) => match chunk_size(&self.buf) {
                    Ok(Some((used, size))) => {
                        self.buf.advance(used);
                        self.decode = Decode::Chunked(if size == 0 {
                            Chunk::Trailers(0)
                        } else {
                            Chunk::Data(size)
                        });
                    }
                    Ok(None) if self.buf.len() > MAX_CHUNK_LINE => {
                        return self.fail(ClientError::Malformed("chunk-size line too long"))
                    }
                    Ok(None) => {
                        if let Err(e) = ready!(self.need_more(cx)) {
                            return self.fail(e);
                        }
                    }
                    Err(e) => return self.fail(ClientError::Malformed(e)),
                },
                Decode::Chunked(Chunk::DataEnd) => {
                    if self.buf.len() < 2 {
                        if let Err(e) = ready!(self.need_more(cx)) {
                            return self.fail(e);
                        }
                        continue;
                    }
                    if &self.buf[..2] != b"\r\n" {
                        return self.fail(ClientError::Malformed("no CRLF after chunk data"));
                    }
                    self.buf.advance(2);
                    self.decode = Decode::Chunked(Chunk::Size);
                }
                Decode::Chunked(Chunk::Trailers(seen)) => {
                    // Trailer fields are read past, never handed on: they could carry
                    // headers the device must not see as the upstream's.
                    match find_crlf(&self.buf) {
                        Some(0) => {
                            self.buf.advance(2);
                            self.decode = Decode::Done;
                        }
                        Some(end) if seen + end <= MAX_TRAILERS => {
                            if self.buf[..end].iter().any(|&b| b == b'\r' || b == b'\n') {
                                return self
                                    .fail(ClientError::Malformed("bare CR or LF in a trailer"));
                            }
                            self.buf.advance(end + 2);
                            self.decode = Decode::Chunked(Chunk::Trailers(seen + end + 2));
                        }
                        Some(_) => return self.fail(ClientError::Malformed("trailers too long")),
                        None if seen + self.buf.len() > MAX_TRAILERS => {
                            return self.fail(ClientError::Malformed("trailers too long"))
                        }
                        None => {
                            if let Err(e) = ready!(self.need_more(cx)) {
                                return self.fail(e);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Reads more for a framing line; the connection's end here is a broken response.
    fn need_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        Poll::Ready(match ready!(self.poll_more(cx, READ_CHUNK)) {
            Ok(0) => Err(ClientError::Closed),
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        })
    }
}

/// Parses a chunk-size line strictly: 1–16 hex digits, then optionally `;` and an extension
/// of visible characters, spaces and tabs (ignored), then CRLF. `None` when more bytes are
/// needed; else the line's length with its CRLF, and the size.
fn chunk_size(buf: &[u8]) -> Result<Option<(usize, u64)>, &'static str> {
    let Some(end) = find_crlf(buf) else {
        return if buf.contains(&b'\n') {
            Err("bare LF in a chunk-size line")
        } else {
            Ok(None)
        };
    };
    let line = &buf[..end];
    let digits = line
        .iter()
        .position(|&b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return Err("invalid chunk size");
    }
    let rest = &line[digits..];
    let extension_ok = rest.is_empty()
        || rest[0] == b';'
            && rest
                .iter()
                .all(|&b| b == b'\t' || (b' '..0x7f).contains(&b));
    if !extension_ok {
        return Err("invalid chunk-size line");
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16).unwrap_or(0);
        (n << 4) | u64::from(v)
    });
    Ok(Some((end + 2, size)))
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
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
        self.decode == Decode::Done
    }

    fn size_hint(&self) -> SizeHint {
        match (self.decode, self.length) {
            (Decode::Done, _) => SizeHint::with_exact(0),
            (Decode::Length(left), Some(_)) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpStream;

    fn head(text: &str) -> Result<Option<(Option<Head>, usize)>, ClientError> {
        parse_head(text.as_bytes(), false)
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
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n"),
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

    #[test]
    fn chunk_size_lines_are_strict() {
        assert_eq!(chunk_size(b"1A\r\nxx"), Ok(Some((4, 26))));
        assert_eq!(chunk_size(b"5;name=value\r\n"), Ok(Some((14, 5))));
        assert_eq!(chunk_size(b"5"), Ok(None));
        for bad in [
            &b"\r\n"[..],
            b"5\n",
            b"5;a\nb\r\n",
            b"-5\r\n",
            b"5 \r\n",
            b"12345678901234567\r\n",
            b"5;a\x01\r\n",
        ] {
            assert!(chunk_size(bad).is_err(), "accepted {bad:?}");
        }
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
}
