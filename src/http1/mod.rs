//! HTTP/1.1 as seg speaks it on both hops, one set of rules: request heads parsed (here) and
//! response heads parsed (`response`), one body decoder for request and response bodies
//! alike, one `Content-Length` rule, one token reader, response heads and chunks encoded.
//! Pure functions over byte buffers; the connection drivers (`proxy::connection` toward
//! the device, `upstream::exchange` toward the mail server) own the sockets, the buffers
//! and the timing.
//!
//! It makes the decisions hyper's `http1` server connection made before it, row for row of
//! the HTTP abuse corpus (`tests/corpus/http_abuse.rs`). A head is read by `httparse` (bare LF line
//! ends accepted, anything else malformed refused) within a size and field-count cap; the
//! body is framed by `Transfer-Encoding` when its last coding is `chunked` (a request with any
//! other last coding, or with `Transfer-Encoding` on HTTP/1.0, is refused), else by one
//! `Content-Length` (equal duplicates allowed), else it is empty. A request that carries both
//! framings is read by its chunks, loses its `Content-Length` and ends its connection (RFC 9112
//! §6.1), so nothing after the last chunk is ever read as a request. Chunk extensions and
//! trailer fields are checked and dropped: trailers could carry identity headers.

pub mod response;

/// The HTTP abuse corpus, shared with the gateway's test of it (`tests/http_abuse.rs`).
#[cfg(test)]
#[path = "../../tests/corpus/http_abuse.rs"]
mod abuse_corpus;

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

/// The most header fields a request head may have; one more is a 431.
pub const MAX_HEADERS: usize = 100;

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The last chunk of a chunked response body, without trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Chunk-extension bytes one body may carry, all chunks together (hyper's
/// `CHUNKED_EXTENSIONS_LIMIT`): extensions are read past, so without a cap a device could
/// make seg read forever without a byte of body.
const CHUNK_EXTENSIONS_LIMIT: u32 = 16 * 1024;

/// The most bytes and fields of a trailer section, which is read and dropped.
const MAX_TRAILER_BYTES: u32 = 16 * 1024;
const MAX_TRAILER_FIELDS: u32 = MAX_HEADERS as u32;

/// The largest `Content-Length` hyper took (two values below `u64::MAX` were its markers
/// for chunked and close-delimited); a larger one was a 431, and still is.
const MAX_CONTENT_LENGTH: u64 = u64::MAX - 2;

/// The HTTP/2 connection preface, and how much of it tells it from any HTTP/1.x request
/// (`PRI * HTTP/1.1` is a valid one).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HTTP2_PREFACE_TELLS: usize = b"PRI * HTTP/2.0".len();

/// A request head, parsed and checked.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    /// `HTTP_10` or `HTTP_11`.
    pub version: Version,
    /// Every field in the order sent, duplicates kept; without `Content-Length` when the body
    /// is chunked.
    pub headers: HeaderMap,
    pub body: BodyFraming,
    /// The connection ends after this exchange: the device asked (`Connection: close`, or
    /// HTTP/1.0 without `keep-alive`), or the head carried both framings.
    pub close: bool,
    /// An HTTP/1.1 request whose last `Expect` field is `100-continue` and whose body has
    /// bytes to come: the device may wait for [`CONTINUE`] before sending them.
    pub expects_continue: bool,
}

/// How a request's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No framing header: no body, whatever the method.
    Empty,
    /// `Content-Length`; `Length(0)` ends at once, like `Empty`.
    Length(u64),
    Chunked,
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head over its size limit or over {MAX_HEADERS} fields")]
    TooLarge,
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    #[error("an HTTP/2 connection preface on an HTTP/1.1 connection")]
    Http2Preface,
}

impl HeadError {
    /// The status to answer with before closing; `None`: close without an answer (hyper
    /// answered the HTTP/2 preface with nothing, and an HTTP/2 client could not read one).
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HeadError::TooLarge => Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            HeadError::Malformed(_) => Some(StatusCode::BAD_REQUEST),
            HeadError::Http2Preface => None,
        }
    }
}

/// Parses one request head from the start of `buf`: `Ok(None)` while more bytes are needed,
/// else the head and the bytes it took (the body starts there). `max_head` bounds the head,
/// request line included: a head that is or would be longer is [`HeadError::TooLarge`].
pub fn parse_request_head(
    buf: &[u8],
    max_head: usize,
) -> Result<Option<(RequestHead, usize)>, HeadError> {
    // Nothing past `max_head` can belong to an acceptable head; leaving it unscanned bounds
    // the work of each attempt on a slowly arriving head.
    let window = &buf[..buf.len().min(max_head.saturating_add(1))];
    let mut fields: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        window,
        &mut fields,
    );
    let used = match parsed {
        Ok(httparse::Status::Complete(used)) if used > max_head => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(used)) => used,
        // With `max_head` bytes in hand and no end, the head can only be longer.
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return preface_or_malformed(buf, e),
    };
    let (Some(method), Some(target), Some(minor)) = (request.method, request.path, request.version)
    else {
        return Err(HeadError::Malformed("incomplete request line"));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    // A request target never carries a fragment (RFC 9112 §3.2); `Uri` would drop it
    // silently, so what seg routes on would not be the target the device sent.
    if target.contains('#') {
        return Err(HeadError::Malformed("fragment in target"));
    }
    let uri =
        Uri::try_from(target.as_bytes()).map_err(|_| HeadError::Malformed("invalid target"))?;
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };

    // One pass over the fields: each is copied into the map and the four that decide
    // framing and persistence are read on the way, in order, as hyper read them.
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    let mut length: Option<u64> = None;
    let mut saw_length = false;
    // Whether the last `Transfer-Encoding` field so far ends in `chunked`.
    let mut chunked: Option<bool> = None;
    let mut close_token = false;
    let mut keep_alive_token = false;
    let mut continue_expected = false;
    for field in request.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| HeadError::Malformed("invalid header value"))?;
        match name {
            header::CONTENT_LENGTH => {
                saw_length = true;
                // After a Transfer-Encoding field the chunks frame the body and the length
                // is dropped unread, as hyper did.
                if chunked.is_none() {
                    let n = content_length_value(field.value)
                        .ok_or(HeadError::Malformed("invalid Content-Length"))?;
                    if length.is_some_and(|previous| previous != n) {
                        return Err(HeadError::Malformed("conflicting Content-Length values"));
                    }
                    if n > MAX_CONTENT_LENGTH {
                        return Err(HeadError::TooLarge);
                    }
                    length = Some(n);
                }
            }
            header::TRANSFER_ENCODING => {
                if version == Version::HTTP_10 {
                    return Err(HeadError::Malformed(
                        "Transfer-Encoding on an HTTP/1.0 request",
                    ));
                }
                chunked = Some(ends_in_chunked(field.value));
            }
            header::CONNECTION => {
                close_token |= has_token(field.value, b"close");
                keep_alive_token |= has_token(field.value, b"keep-alive");
            }
            header::EXPECT => {
                continue_expected = field.value.eq_ignore_ascii_case(b"100-continue");
            }
            _ => {}
        }
        headers.append(name, value);
    }

    let body = match (chunked, length) {
        (Some(false), _) => {
            return Err(HeadError::Malformed(
                "Transfer-Encoding whose last coding is not chunked",
            ))
        }
        (Some(true), _) => BodyFraming::Chunked,
        (None, Some(n)) => BodyFraming::Length(n),
        (None, None) => BodyFraming::Empty,
    };
    let both_framings = chunked.is_some() && saw_length;
    if both_framings {
        headers.remove(header::CONTENT_LENGTH);
    }
    let close = close_token || (version == Version::HTTP_10 && !keep_alive_token) || both_framings;
    let expects_continue = continue_expected
        && version == Version::HTTP_11
        && !matches!(body, BodyFraming::Empty | BodyFraming::Length(0));
    Ok(Some((
        RequestHead {
            method,
            uri,
            version,
            headers,
            body,
            close,
            expects_continue,
        },
        used,
    )))
}

/// A piece of a request body as [`BodyDecoder::decode`] hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEvent {
    /// Body bytes, framing removed.
    Data(Bytes),
    /// The body (and any trailer section) is complete; the next request starts here.
    End,
}

/// Why a request body broke its framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("chunk-size line starting with byte {0:#04x}, not a hex digit")]
    ChunkSizeMissing(u8),
    #[error("chunk size over 64 bits")]
    ChunkSizeOverflow,
    #[error("byte {0:#04x} out of place in a chunk-size line")]
    ChunkSizeLine(u8),
    #[error("chunk extensions over {CHUNK_EXTENSIONS_LIMIT} bytes in one body")]
    ExtensionsTooLong,
    #[error("byte {0:#04x} where CRLF must end a chunk's data")]
    ChunkDataEnd(u8),
    #[error("byte {0:#04x} out of place in the trailer section")]
    Trailer(u8),
    #[error("trailer section over {MAX_TRAILER_BYTES} bytes or {MAX_TRAILER_FIELDS} fields")]
    TrailersTooLarge,
}

/// Reads one request body out of the connection's buffer as its head framed it.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    state: Decode,
    /// Chunk-extension bytes read so far in this body.
    extension_bytes: u32,
    /// Trailer-section bytes and fields read so far.
    trailer_bytes: u32,
    trailer_fields: u32,
}

/// Where decoding stands; chunk sizes travel with the states of their line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    /// This many `Content-Length` bytes are still to come.
    Length(u64),
    ChunkSizeStart,
    ChunkSize(u64),
    /// Spaces or tabs after the size.
    ChunkSizeSpace(u64),
    ChunkExtension(u64),
    /// The CR of the chunk-size line has come.
    ChunkSizeLf(u64),
    /// This many bytes of the current chunk are still to come.
    ChunkData(u64),
    ChunkDataCr,
    ChunkDataLf,
    /// After the last chunk: a trailer field or the empty line that ends the body.
    TrailerLineStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

impl BodyDecoder {
    /// A decoder for a body framed as `framing`; an `Empty` or `Length(0)` body is done
    /// before a byte is read.
    pub fn new(framing: BodyFraming) -> BodyDecoder {
        let state = match framing {
            BodyFraming::Empty | BodyFraming::Length(0) => Decode::Done,
            BodyFraming::Length(n) => Decode::Length(n),
            BodyFraming::Chunked => Decode::ChunkSizeStart,
        };
        BodyDecoder {
            state,
            extension_bytes: 0,
            trailer_bytes: 0,
            trailer_fields: 0,
        }
    }

    /// Consumes from the front of `buf`: body bytes (as many as `buf` holds, up to the end
    /// of the current chunk or of the length, split off without copying), `End` once the
    /// body is complete (again on every later call), or `None` when more bytes are needed.
    /// How `buf` was cut does not change the outcome. After an error the body is broken and
    /// the connection must close; calling again repeats the error.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BodyEvent>, BodyError> {
        loop {
            match self.state {
                Decode::Done => return Ok(Some(BodyEvent::End)),
                Decode::Length(left) | Decode::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()));
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (Decode::Length(_), 0) => Decode::Done,
                        (Decode::Length(_), left) => Decode::Length(left),
                        (_, 0) => Decode::ChunkDataCr,
                        (_, left) => Decode::ChunkData(left),
                    };
                    return Ok(Some(BodyEvent::Data(data)));
                }
                _ => {
                    // Framing bytes: a few per chunk, so stepping through them one by one
                    // costs little and makes any cut of the input decode alike.
                    let mut used = 0;
                    let mut outcome = Ok(());
                    while let Some(&byte) = buf.get(used) {
                        match self.step(byte) {
                            Ok(next) => {
                                used += 1;
                                self.state = next;
                                if matches!(next, Decode::ChunkData(_) | Decode::Done) {
                                    break;
                                }
                            }
                            Err(e) => {
                                outcome = Err(e);
                                break;
                            }
                        }
                    }
                    buf.advance(used);
                    outcome?;
                    if !matches!(self.state, Decode::ChunkData(_) | Decode::Done) {
                        return Ok(None);
                    }
                }
            }
        }
    }

    /// The whole body has been read: `decode` returns `End` without needing a byte.
    pub fn is_done(&self) -> bool {
        self.state == Decode::Done
    }

    /// The body bytes still to come when that is known (a `Content-Length` body, or any
    /// body once done), for a size hint.
    pub fn exact_remaining(&self) -> Option<u64> {
        match self.state {
            Decode::Length(left) => Some(left),
            Decode::Done => Some(0),
            _ => None,
        }
    }

    /// One framing byte: the state it leads to. Counters change only for bytes accepted.
    fn step(&mut self, byte: u8) -> Result<Decode, BodyError> {
        Ok(match self.state {
            Decode::ChunkSizeStart => match hex_value(byte) {
                Some(digit) => Decode::ChunkSize(u64::from(digit)),
                None => return Err(BodyError::ChunkSizeMissing(byte)),
            },
            Decode::ChunkSize(size) => match (hex_value(byte), byte) {
                (Some(digit), _) => Decode::ChunkSize(
                    size.checked_mul(16)
                        .and_then(|size| size.checked_add(u64::from(digit)))
                        .ok_or(BodyError::ChunkSizeOverflow)?,
                ),
                (None, b' ' | b'\t') => Decode::ChunkSizeSpace(size),
                (None, b';') => Decode::ChunkExtension(size),
                (None, b'\r') => Decode::ChunkSizeLf(size),
                (None, _) => return Err(BodyError::ChunkSizeLine(byte)),
            },
            Decode::ChunkSizeSpace(size) => match byte {
                b' ' | b'\t' => Decode::ChunkSizeSpace(size),
                b';' => Decode::ChunkExtension(size),
                b'\r' => Decode::ChunkSizeLf(size),
                _ => return Err(BodyError::ChunkSizeLine(byte)),
            },
            // Extensions are dropped unread: any byte but CR and LF, within the cap.
            Decode::ChunkExtension(size) => match byte {
                b'\r' => Decode::ChunkSizeLf(size),
                b'\n' => return Err(BodyError::ChunkSizeLine(byte)),
                _ if self.extension_bytes + 1 >= CHUNK_EXTENSIONS_LIMIT => {
                    return Err(BodyError::ExtensionsTooLong)
                }
                _ => {
                    self.extension_bytes += 1;
                    Decode::ChunkExtension(size)
                }
            },
            Decode::ChunkSizeLf(size) => match byte {
                b'\n' if size == 0 => Decode::TrailerLineStart,
                b'\n' => Decode::ChunkData(size),
                _ => return Err(BodyError::ChunkSizeLine(byte)),
            },
            Decode::ChunkDataCr => match byte {
                b'\r' => Decode::ChunkDataLf,
                _ => return Err(BodyError::ChunkDataEnd(byte)),
            },
            Decode::ChunkDataLf => match byte {
                b'\n' => Decode::ChunkSizeStart,
                _ => return Err(BodyError::ChunkDataEnd(byte)),
            },
            Decode::TrailerLineStart
            | Decode::TrailerName
            | Decode::TrailerValue
            | Decode::TrailerLf
            | Decode::EndLf => return self.trailer_step(byte),
            // Data and done never reach here: `decode` handles them without stepping.
            Decode::Length(_) | Decode::ChunkData(_) | Decode::Done => self.state,
        })
    }

    /// One byte of the trailer section: each line a strict field (token name, colon, value
    /// without CR, LF or NUL, CRLF), then an empty line.
    fn trailer_step(&mut self, byte: u8) -> Result<Decode, BodyError> {
        if self.trailer_bytes >= MAX_TRAILER_BYTES {
            return Err(BodyError::TrailersTooLarge);
        }
        let next = match (self.state, byte) {
            (Decode::TrailerLineStart, b'\r') => Decode::EndLf,
            (Decode::TrailerLineStart, _) if is_token_byte(byte) => {
                if self.trailer_fields >= MAX_TRAILER_FIELDS {
                    return Err(BodyError::TrailersTooLarge);
                }
                self.trailer_fields += 1;
                Decode::TrailerName
            }
            (Decode::TrailerName, b':') => Decode::TrailerValue,
            (Decode::TrailerName, _) if is_token_byte(byte) => Decode::TrailerName,
            (Decode::TrailerValue, b'\r') => Decode::TrailerLf,
            (Decode::TrailerValue, _) if is_value_byte(byte) => Decode::TrailerValue,
            (Decode::TrailerLf, b'\n') => Decode::TrailerLineStart,
            (Decode::EndLf, b'\n') => Decode::Done,
            _ => return Err(BodyError::Trailer(byte)),
        };
        self.trailer_bytes += 1;
        Ok(next)
    }
}

/// How a response body is delimited toward the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body: 1xx, 204, 304, or the answer to a HEAD request.
    Empty,
    Length(u64),
    Chunked,
    /// The body ends when seg closes the connection (HTTP/1.0 peer, length unknown).
    UntilClose,
}

/// Chooses how a response body is framed: none where the status or a HEAD request rules a
/// body out, else the `Content-Length` the headers carry (every field valid and equal), else
/// the body's known length, else chunks for HTTP/1.1 and the connection's close for HTTP/1.0
/// (the caller then closes after the body).
pub fn response_framing(
    request_method: &Method,
    request_version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    body_exact_len: Option<u64>,
) -> ResponseFraming {
    if forbids_body(status) || status == StatusCode::NOT_MODIFIED || *request_method == Method::HEAD
    {
        return ResponseFraming::Empty;
    }
    match content_length(headers).ok().flatten().or(body_exact_len) {
        Some(n) => ResponseFraming::Length(n),
        None if request_version == Version::HTTP_11 => ResponseFraming::Chunked,
        None => ResponseFraming::UntilClose,
    }
}

/// Appends a response head: the status line, every header but the framing and connection
/// ones (the codec writes those itself from `framing` and `close`), `date` unless the
/// headers carry a Date, then the empty line.
///
/// With `Empty` framing the headers' first `Content-Length` is written back as given (not
/// for 1xx and 204, which must not carry one): the answer to a HEAD request, or a 304,
/// states the length the body would have had (RFC 9110 §8.6). A response to an HTTP/1.0
/// request that keeps its connection says `connection: keep-alive`, since HTTP/1.0 closes by
/// default (hyper did the same).
pub fn encode_response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: ResponseFraming,
    request_version: Version,
    close: bool,
    date: &[u8; 29],
) {
    out.reserve(128 + headers.len() * 48);
    push_status_line(out, status);
    let mut has_date = false;
    for (name, value) in headers {
        match *name {
            header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION => continue,
            header::DATE => has_date = true,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        ResponseFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        ResponseFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        ResponseFraming::Empty if !forbids_body(status) => {
            if let Some(length) = headers.get(header::CONTENT_LENGTH) {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(length.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        ResponseFraming::Empty | ResponseFraming::UntilClose => {}
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if request_version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !has_date {
        push_date(out, date);
    }
    out.extend_from_slice(b"\r\n");
}

/// The whole response seg sends for a head it refused (400, 431): no body, and the
/// connection closes after it.
pub fn error_response(status: StatusCode, date: &[u8; 29]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    push_status_line(&mut out, status);
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n");
    push_date(&mut out, date);
    out.extend_from_slice(b"\r\n");
    out
}

/// A 503 seg answers before any head is read (memory for heads used up), closing.
pub fn busy_response(retry_after_secs: u64, date: &[u8; 29]) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    push_status_line(&mut out, StatusCode::SERVICE_UNAVAILABLE);
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\nretry-after: ");
    out.extend_from_slice(retry_after_secs.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    push_date(&mut out, date);
    out.extend_from_slice(b"\r\n");
    out
}

/// Appends one chunk of a chunked body; nothing for empty data, whose chunk would read as
/// the last one.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.reserve(data.len() + 20);
    push_hex(out, data.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The IMF-fixdate of a Unix time (`Sun, 06 Nov 1994 08:49:37 GMT`), for the Date header.
/// Times past the year 9999, which the format cannot write, are written as its last second.
pub fn http_date(unix_secs: u64) -> [u8; 29] {
    const LAST: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    const WEEKDAYS: [&[u8; 3]; 7] = [b"Sun", b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let secs = unix_secs.min(LAST);
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    // 1970-01-01 was a Thursday.
    out[..3].copy_from_slice(WEEKDAYS[((days + 4) % 7) as usize]);
    put_two_digits(&mut out[5..7], day);
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    put_two_digits(&mut out[12..14], year / 100);
    put_two_digits(&mut out[14..16], year % 100);
    put_two_digits(&mut out[17..19], of_day / 3600);
    put_two_digits(&mut out[20..22], of_day / 60 % 60);
    put_two_digits(&mut out[23..25], of_day % 60);
    out
}

/// Year, month (1–12) and day of the month of a count of days since 1970-01-01, in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`, for days ≥ 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March is 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn put_two_digits(out: &mut [u8], n: u64) {
    out[0] = b'0' + (n / 10 % 10) as u8;
    out[1] = b'0' + (n % 10) as u8;
}

fn push_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_date(out: &mut Vec<u8>, date: &[u8; 29]) {
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(date);
    out.extend_from_slice(b"\r\n");
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn push_hex(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// 1xx and 204 responses have no body and must not announce a length (RFC 9110 §8.6).
fn forbids_body(status: StatusCode) -> bool {
    status.is_informational() || status == StatusCode::NO_CONTENT
}

/// An httparse error, unless the bytes are the HTTP/2 preface: far enough in to tell, or a
/// start of it that httparse already refused (`PRI * HTTP/2`), which waits for the rest.
fn preface_or_malformed(
    buf: &[u8],
    error: httparse::Error,
) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let known = buf.len().min(HTTP2_PREFACE_TELLS);
    if buf[..known] == HTTP2_PREFACE[..known] {
        return if known == HTTP2_PREFACE_TELLS {
            Err(HeadError::Http2Preface)
        } else {
            Ok(None)
        };
    }
    Err(HeadError::Malformed(match error {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid method or target",
        httparse::Error::Version => "unsupported HTTP version",
        httparse::Error::Status | httparse::Error::TooManyHeaders => "invalid request line",
    }))
}

/// A `Content-Length` field's value: digits only (surrounding spaces and tabs aside), no
/// sign, no list, within 64 bits.
pub fn content_length_value(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// The one `Content-Length` rule, both hops: every field a valid value
/// (`content_length_value`: no list, no sign) and all of them equal; `None` without one.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut found = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        let n = content_length_value(value.as_bytes()).ok_or("invalid Content-Length")?;
        if found.is_some_and(|f| f != n) {
            return Err("conflicting Content-Length values");
        }
        found = Some(n);
    }
    Ok(found)
}

/// Whether a head can have ended since the last look: the bytes that arrived since hold a
/// line end (every head ends with one; one can also finish a head the parser refuses), or
/// the head is past its bound. So a head arriving a few bytes at a time is parsed once a
/// line, not from its first byte on every read.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeadScan {
    scanned: usize,
}

impl HeadScan {
    pub fn may_be_complete(&mut self, buf: &[u8], max_head: usize) -> bool {
        let fresh = &buf[self.scanned.min(buf.len())..];
        let line_end = fresh.iter().any(|&b| b == b'\n' || b == b'\r');
        self.scanned = buf.len();
        line_end || buf.len() > max_head
    }

    /// The head was taken from the buffer: the next one starts at its front.
    pub fn restart(&mut self) {
        self.scanned = 0;
    }
}

/// Whether a `Transfer-Encoding` field's last coding is `chunked` (ASCII only, as hyper read
/// it: `chunked;q=1` or `"chunked"` are other codings).
pub fn ends_in_chunked(value: &[u8]) -> bool {
    value.is_ascii()
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether a comma-separated field value (ASCII only, as hyper read it) has `token`.
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.is_ascii()
        && value
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// A `tchar` of RFC 9110 §5.6.2.
fn is_token_byte(byte: u8) -> bool {
    matches!(byte,
        b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_'
        | b'`' | b'|' | b'~')
}

/// A byte a field value may hold: tab, visible ASCII, space, obs-text (as httparse allows).
fn is_value_byte(byte: u8) -> bool {
    byte == b'\t' || (b' '..=b'~').contains(&byte) || byte >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::abuse_corpus::{self, post, post_framed, raw, Read, HELLO_CHUNKED};

    /// The head cap seg passes.
    const MAX_HEAD: usize = 64 * 1024;

    /// Reads requests off `bytes` as a connection driver would, the bytes arriving `piece`
    /// at a time, until the bytes end, a message is refused or broken, or a request closes
    /// the connection. Returns what was seen and how many bytes a closing request left
    /// unread.
    fn read(bytes: &[u8], piece: usize) -> (Vec<Read>, usize) {
        let mut arriving = bytes.chunks(piece);
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        loop {
            let (head, used) = loop {
                match parse_request_head(&buf, MAX_HEAD) {
                    Ok(Some(parsed)) => break parsed,
                    Ok(None) => match arriving.next() {
                        Some(more) => buf.extend_from_slice(more),
                        None => {
                            if !buf.is_empty() {
                                seen.push(Read::Incomplete);
                            }
                            return (seen, 0);
                        }
                    },
                    Err(e) => {
                        seen.push(Read::Refused(e.status().map(|s| s.as_u16())));
                        return (seen, 0);
                    }
                }
            };
            assert!(used <= buf.len());
            buf.advance(used);
            let mut decoder = BodyDecoder::new(head.body);
            let mut body = Vec::new();
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(BodyEvent::Data(data))) => {
                        assert!(!data.is_empty(), "an empty data event");
                        body.extend_from_slice(&data);
                    }
                    Ok(Some(BodyEvent::End)) => break,
                    Ok(None) => match arriving.next() {
                        Some(more) => buf.extend_from_slice(more),
                        None => {
                            seen.push(Read::Incomplete);
                            return (seen, 0);
                        }
                    },
                    Err(e) => {
                        seen.push(Read::BrokenBody(e));
                        return (seen, 0);
                    }
                }
            }
            assert!(decoder.is_done());
            seen.push(Read::Request {
                framing: head.body,
                close: head.close,
                continues: head.expects_continue,
                body,
            });
            if head.close {
                let unread = buf.len() + arriving.map(<[u8]>::len).sum::<usize>();
                return (seen, unread);
            }
        }
    }

    #[test]
    fn corpus_rows_read_as_hyper_read_them_however_the_bytes_are_cut() {
        let mut failures = Vec::new();
        for row in abuse_corpus::rows() {
            let (name, bytes) = (&row.name, row.bytes());
            // Byte by byte is quadratic in the head; large rows arrive in larger pieces.
            let pieces: &[usize] = if bytes.len() > 8 * 1024 {
                &[bytes.len(), 1021, 4096]
            } else {
                &[bytes.len().max(1), 1, 2, 7, 64]
            };
            for &piece in pieces {
                let (seen, unread) = read(&bytes, piece);
                if seen != row.reads || unread != row.unread {
                    failures.push(format!(
                        "{name} (pieces of {piece}): saw {seen:?} leaving {unread}, expected {:?} leaving {}",
                        row.reads, row.unread
                    ));
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn the_gateway_forwards_only_requests_the_codec_reads_whole() {
        for row in abuse_corpus::rows() {
            let expect = row.expect();
            assert!(
                expect.statuses().len() <= row.reads.len(),
                "{}: {expect:?} answers more messages than the codec reads",
                row.name
            );
            assert_eq!(
                expect.forwarded(),
                row.forwarded_bodies().len(),
                "{}: {expect:?} forwards other than the requests it answers 200",
                row.name
            );
        }
    }

    fn parse(bytes: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
        parse_request_head(bytes, MAX_HEAD)
    }

    fn head(text: &str) -> RequestHead {
        match parse(text.as_bytes()) {
            Ok(Some((head, _))) => head,
            other => panic!("{text:?} did not parse: {other:?}"),
        }
    }

    #[test]
    fn heads_wait_for_their_end() {
        for message in [
            post("", "hello").into_bytes(),
            post_framed("Transfer-Encoding: chunked\r\n", HELLO_CHUNKED),
            raw("POST {T} HTTP/1.1\nHost: localhost\nContent-Length: 5\n\nhello"),
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            // Empty lines before a request line are skipped (RFC 9112 §2.2).
            b"\r\nGET / HTTP/1.1\r\n\r\n".to_vec(),
        ] {
            let show = String::from_utf8_lossy(&message);
            let (_, used) = parse(&message).unwrap().unwrap();
            assert!(used <= message.len());
            for end in 0..used {
                assert!(
                    matches!(parse(&message[..end]), Ok(None)),
                    "{show:?} cut at {end} is not incomplete"
                );
            }
            assert_eq!(
                parse(&message[..used]).unwrap().unwrap().1,
                used,
                "{show:?}"
            );
        }
    }

    #[test]
    fn the_http2_preface_is_told_early_and_dropped_without_an_answer() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        for end in 0..=preface.len() {
            let outcome = parse(&preface[..end]);
            if end < "PRI * HTTP/2.0".len() {
                assert!(matches!(outcome, Ok(None)), "cut at {end}: {outcome:?}");
            } else {
                assert_eq!(
                    outcome.unwrap_err(),
                    HeadError::Http2Preface,
                    "cut at {end}"
                );
            }
        }
        let with_frames = [&preface[..], b"\x00\x00\x12\x04\x00\x00\x00\x00\x00"].concat();
        assert_eq!(parse(&with_frames).unwrap_err(), HeadError::Http2Preface);
        assert_eq!(HeadError::Http2Preface.status(), None);
        // `PRI` is a method like any other on HTTP/1.1.
        assert_eq!(head("PRI * HTTP/1.1\r\n\r\n").method.as_str(), "PRI");
        assert!(matches!(
            parse(b"PRI * HTTP/2.1\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    /// A head of exactly `len` bytes, padded in one field.
    fn head_of(len: usize) -> Vec<u8> {
        let frame = "GET / HTTP/1.1\r\nX-Pad: \r\n\r\n".len();
        format!(
            "GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
            "p".repeat(len - frame)
        )
        .into_bytes()
    }

    fn fields(count: usize) -> Vec<u8> {
        let lines: String = (0..count).map(|i| format!("X-H{i}: {i}\r\n")).collect();
        format!("GET / HTTP/1.1\r\n{lines}\r\n").into_bytes()
    }

    #[test]
    fn heads_are_capped_in_bytes_and_fields() {
        let at_cap = head_of(MAX_HEAD);
        assert_eq!(at_cap.len(), MAX_HEAD);
        let with_body = [&at_cap[..], &[b'b'; 100_000][..]].concat();
        assert_eq!(parse(&with_body).unwrap().unwrap().1, MAX_HEAD);
        assert!(matches!(parse(&at_cap[..MAX_HEAD - 1]), Ok(None)));

        let over = head_of(MAX_HEAD + 1);
        assert_eq!(parse(&over).unwrap_err(), HeadError::TooLarge);
        // Incomplete with the cap's worth of bytes already in hand: it can only be longer.
        assert_eq!(parse(&over[..MAX_HEAD]).unwrap_err(), HeadError::TooLarge);
        assert!(matches!(parse(&over[..MAX_HEAD - 1]), Ok(None)));
        // A caller's smaller cap holds as well.
        assert_eq!(
            parse_request_head(&head_of(200), 199).unwrap_err(),
            HeadError::TooLarge
        );
        assert!(parse_request_head(&head_of(200), 200).unwrap().is_some());

        assert_eq!(
            head(std::str::from_utf8(&fields(MAX_HEADERS)).unwrap())
                .headers
                .len(),
            100
        );
        assert_eq!(
            parse(&fields(MAX_HEADERS + 1)).unwrap_err(),
            HeadError::TooLarge
        );
        assert_eq!(
            HeadError::TooLarge.status(),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        assert_eq!(
            HeadError::Malformed("x").status(),
            Some(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn framing_and_persistence_follow_hyper_field_by_field() {
        use BodyFraming::{Chunked, Empty, Length};
        // The framing and close flag a head comes to, or the status refusing it.
        type Framed = Result<(BodyFraming, bool), u16>;
        let table: &[(&str, &str, Framed)] = &[
            ("1.1", "", Ok((Empty, false))),
            ("1.1", "Content-Length: 0\r\n", Ok((Length(0), false))),
            (
                "1.1",
                "Content-Length: 000000000000000000000000000005\r\n",
                Ok((Length(5), false)),
            ),
            (
                "1.1",
                "Content-Length: 18446744073709551613\r\n",
                Ok((Length(u64::MAX - 2), false)),
            ),
            // hyper's own markers: a 431, as before.
            ("1.1", "Content-Length: 18446744073709551614\r\n", Err(431)),
            ("1.1", "Content-Length: 18446744073709551615\r\n", Err(431)),
            ("1.1", "Content-Length: 18446744073709551616\r\n", Err(400)),
            (
                "1.1",
                "Content-Length: 5\r\nContent-Length: 5\r\nContent-Length: 5\r\n",
                Ok((Length(5), false)),
            ),
            (
                "1.1",
                "Content-Length: 5\r\nContent-Length: 05\r\n",
                Ok((Length(5), false)),
            ),
            ("1.1", "Content-Length: caf\u{e9}\r\n", Err(400)),
            // Once Transfer-Encoding is seen, later lengths are dropped unread; earlier ones
            // were read and must be valid and agree.
            (
                "1.1",
                "Transfer-Encoding: chunked\r\nContent-Length: abc\r\n",
                Ok((Chunked, true)),
            ),
            (
                "1.1",
                "Transfer-Encoding: chunked\r\nContent-Length: 5\r\nContent-Length: 6\r\n",
                Ok((Chunked, true)),
            ),
            (
                "1.1",
                "Content-Length: abc\r\nTransfer-Encoding: chunked\r\n",
                Err(400),
            ),
            (
                "1.1",
                "Content-Length: 5\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n",
                Err(400),
            ),
            (
                "1.1",
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                Ok((Chunked, false)),
            ),
            (
                "1.1",
                "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                Ok((Chunked, false)),
            ),
            (
                "1.1",
                "Transfer-Encoding: , chunked\r\n",
                Ok((Chunked, false)),
            ),
            ("1.1", "Transfer-Encoding: chunked,\r\n", Err(400)),
            ("1.1", "Transfer-Encoding:\r\n", Err(400)),
            ("1.1", "Transfer-Encoding: caf\u{e9}, chunked\r\n", Err(400)),
            (
                "1.0",
                "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
                Err(400),
            ),
            ("1.1", "Connection: close\r\n", Ok((Empty, true))),
            (
                "1.1",
                "Connection: keep-alive, Close\r\n",
                Ok((Empty, true)),
            ),
            (
                "1.1",
                "Connection: upgrade\r\nConnection: close\r\n",
                Ok((Empty, true)),
            ),
            ("1.1", "Connection: closed\r\n", Ok((Empty, false))),
            ("1.1", "Connection: keep-alive\r\n", Ok((Empty, false))),
            ("1.0", "", Ok((Empty, true))),
            ("1.0", "Content-Length: 5\r\n", Ok((Length(5), true))),
            ("1.0", "Connection: keep-alive\r\n", Ok((Empty, false))),
            (
                "1.0",
                "Connection: Keep-Alive\r\nContent-Length: 5\r\n",
                Ok((Length(5), false)),
            ),
            (
                "1.0",
                "Connection: foo, keep-alive\r\nConnection: bar\r\n",
                Ok((Empty, false)),
            ),
            (
                "1.0",
                "Connection: close\r\nConnection: keep-alive\r\n",
                Ok((Empty, true)),
            ),
            (
                "1.0",
                "Connection: keep-alive, close\r\n",
                Ok((Empty, true)),
            ),
        ];
        for (version, lines, want) in table {
            let text = format!("POST / HTTP/{version}\r\n{lines}\r\n");
            let got = match parse(text.as_bytes()) {
                Ok(Some((head, _))) => Ok((head.body, head.close)),
                Ok(None) => panic!("{text:?} is incomplete"),
                Err(e) => Err(e.status().map_or(0, |s| s.as_u16())),
            };
            assert_eq!(&got, want, "{text:?}");
        }
    }

    #[test]
    fn continue_is_expected_only_where_a_body_waits_for_it() {
        let table: &[(&str, &str, bool)] = &[
            ("1.1", "Expect: 100-continue\r\nContent-Length: 5\r\n", true),
            (
                "1.1",
                "Expect: 100-Continue\r\nTransfer-Encoding: chunked\r\n",
                true,
            ),
            ("1.1", "Expect: 100-continue\r\n", false),
            (
                "1.1",
                "Expect: 100-continue\r\nContent-Length: 0\r\n",
                false,
            ),
            (
                "1.0",
                "Expect: 100-continue\r\nContent-Length: 5\r\n",
                false,
            ),
            (
                "1.1",
                "Expect: 100-continue, foo\r\nContent-Length: 5\r\n",
                false,
            ),
            ("1.1", "Expect: 200-ok\r\nContent-Length: 5\r\n", false),
            // The last Expect field decides, as in hyper.
            (
                "1.1",
                "Expect: 100-continue\r\nExpect: foo\r\nContent-Length: 5\r\n",
                false,
            ),
            (
                "1.1",
                "Expect: foo\r\nExpect: 100-continue\r\nContent-Length: 5\r\n",
                true,
            ),
        ];
        for (version, lines, want) in table {
            let text = format!("POST / HTTP/{version}\r\n{lines}\r\n");
            assert_eq!(head(&text).expects_continue, *want, "{text:?}");
        }
    }

    #[test]
    fn fields_are_kept_in_order_with_duplicates() {
        let head = head(
            "GET / HTTP/1.1\r\nX-A: 1\r\nHost: h\r\nX-A:  2 \r\nX-B: caf\u{e9}\r\nX-Empty:\r\nX-Note: a\nX-Remote-User: x\r\nTE: trailers\r\n\r\n",
        );
        let values = |name: &str| -> Vec<&[u8]> {
            head.headers
                .get_all(name)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect()
        };
        assert_eq!(values("x-a"), [&b"1"[..], b"2"]);
        assert_eq!(values("x-b"), [&b"caf\xc3\xa9"[..]]);
        assert_eq!(values("x-empty"), [&b""[..]]);
        // A bare LF ends the line: the rest is a field of its own, for hygiene to judge.
        assert_eq!(values("x-note"), [&b"a"[..]]);
        assert_eq!(values("x-remote-user"), [&b"x"[..]]);
        assert_eq!(head.headers.len(), 8);

        // Both framings: the chunks rule and no Content-Length is passed on.
        let both = self::head(
            "POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
        );
        assert!(both.close);
        assert!(!both.headers.contains_key(header::CONTENT_LENGTH));
        assert_eq!(both.headers[header::TRANSFER_ENCODING], "chunked");
        // One framing: its fields stay, duplicates included.
        let twice = self::head("POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n");
        assert_eq!(
            twice.headers.get_all(header::CONTENT_LENGTH).iter().count(),
            2
        );
    }

    #[test]
    fn targets_methods_and_versions() {
        // (request line, method, target as parsed, version)
        let table = [
            ("GET /x?y=1 HTTP/1.1", "GET", "/x?y=1", Version::HTTP_11),
            (
                "POST http://evil.example/p?q HTTP/1.1",
                "POST",
                "http://evil.example/p?q",
                Version::HTTP_11,
            ),
            (
                "CONNECT localhost:443 HTTP/1.1",
                "CONNECT",
                "localhost:443",
                Version::HTTP_11,
            ),
            ("OPTIONS * HTTP/1.1", "OPTIONS", "*", Version::HTTP_11),
            ("post / HTTP/1.0", "post", "/", Version::HTTP_10),
            (
                "X-CUSTOM-METHOD /a%20b HTTP/1.1",
                "X-CUSTOM-METHOD",
                "/a%20b",
                Version::HTTP_11,
            ),
        ];
        for (line, method, target, version) in table {
            let head = head(&format!("{line}\r\n\r\n"));
            assert_eq!(head.method.as_str(), method, "{line}");
            assert_eq!(head.uri.to_string(), target, "{line}");
            assert_eq!(head.version, version, "{line}");
        }
        let absolute = head("POST http://evil.example/p?q HTTP/1.1\r\n\r\n").uri;
        assert_eq!(absolute.host(), Some("evil.example"));
        assert_eq!(absolute.path_and_query().map(|p| p.as_str()), Some("/p?q"));
        // httparse passes these targets; `Uri` does not.
        for bad in [
            &b"GET http://[::1 HTTP/1.1\r\n\r\n"[..],
            b"GET http:// HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                parse(bad).unwrap_err(),
                HeadError::Malformed("invalid target"),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Decodes `pieces` in turn: the body bytes, how it ended (`Ok(true)` complete,
    /// `Ok(false)` waiting for more) and the bytes left after it.
    fn decode_pieces<'a>(
        framing: BodyFraming,
        pieces: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<u8>, Result<bool, BodyError>, Vec<u8>) {
        let mut decoder = BodyDecoder::new(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut pieces = pieces.into_iter();
        let ended = loop {
            match decoder.decode(&mut buf) {
                Ok(Some(BodyEvent::Data(data))) => body.extend_from_slice(&data),
                Ok(Some(BodyEvent::End)) => break Ok(true),
                Ok(None) => match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => break Ok(false),
                },
                Err(e) => break Err(e),
            }
        };
        if ended.is_ok() {
            // Whatever was not fed is left too.
            for piece in pieces {
                buf.extend_from_slice(piece);
            }
        } else {
            buf.clear();
        }
        (body, ended, buf.to_vec())
    }

    #[test]
    fn bodies_decode_alike_however_they_are_cut() {
        use BodyFraming::{Chunked, Empty, Length};
        let table: &[(BodyFraming, &[u8], Result<bool, BodyError>)] = &[
            (Length(5), b"helloNEXT", Ok(true)),
            (Length(5), b"hel", Ok(false)),
            (Empty, b"NEXT", Ok(true)),
            (
                Chunked,
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nNEXT",
                Ok(true),
            ),
            (
                Chunked,
                b"5;a=b;c=\"d;e\"\r\nhello\r\n0;last\r\nX-T: 1\r\nX-U:\t2 \r\n\r\nNEXT",
                Ok(true),
            ),
            (
                Chunked,
                b"A\r\n0123456789\r\nf \t ;ext\r\n0123456789abcde\r\n00\r\n\r\n",
                Ok(true),
            ),
            (
                Chunked,
                b"5\r\nhello\r\n0\r\nX-T: caf\xc3\xa9\r\n\r\n",
                Ok(true),
            ),
            (Chunked, b"5\r\nhello\r\n0\r\n", Ok(false)),
            (Chunked, b"5\r\nhel", Ok(false)),
            (
                Chunked,
                b"5\r\nhello\r\n0\r\nX-T: a\nX-U: b\r\n\r\n",
                Err(BodyError::Trailer(b'\n')),
            ),
            (
                Chunked,
                b"5\r\nhello\r\n0\r\nX-T: a\0\r\n\r\n",
                Err(BodyError::Trailer(0)),
            ),
            (
                Chunked,
                b"5\r\nhello\r\n0\r\n: a\r\n\r\n",
                Err(BodyError::Trailer(b':')),
            ),
            (
                Chunked,
                b"5\r\nhello\r\n0\r\nX-T : a\r\n\r\n",
                Err(BodyError::Trailer(b' ')),
            ),
            (
                Chunked,
                b"5\r\nhello\r\n0\r\nX-T: a\r\r\n\r\n",
                Err(BodyError::Trailer(b'\r')),
            ),
            (
                Chunked,
                b"5\r\nhello\r\n0\r\n\rX",
                Err(BodyError::Trailer(b'X')),
            ),
            (
                Chunked,
                b"5;a\nb\r\nhello\r\n0\r\n\r\n",
                Err(BodyError::ChunkSizeLine(b'\n')),
            ),
            (
                Chunked,
                b"5 5\r\nhello\r\n0\r\n\r\n",
                Err(BodyError::ChunkSizeLine(b'5')),
            ),
            (
                Chunked,
                b"5\r\nhello\n0\r\n\r\n",
                Err(BodyError::ChunkDataEnd(b'\n')),
            ),
            (
                Chunked,
                b"5\r\nhello\r0\r\n\r\n",
                Err(BodyError::ChunkDataEnd(b'0')),
            ),
            (
                Chunked,
                b"10000000000000000\r\n",
                Err(BodyError::ChunkSizeOverflow),
            ),
            (Chunked, b"ffffffffffffffff\r\nhello", Ok(false)),
            (
                Chunked,
                b" 5\r\nhello\r\n0\r\n\r\n",
                Err(BodyError::ChunkSizeMissing(b' ')),
            ),
        ];
        for (framing, bytes, want) in table {
            let show = String::from_utf8_lossy(bytes);
            let whole = decode_pieces(*framing, [*bytes]);
            assert_eq!(&whole.1, want, "{show:?} in one piece");
            assert_eq!(
                decode_pieces(*framing, bytes.chunks(1)),
                whole,
                "{show:?} byte by byte"
            );
            for at in 0..=bytes.len() {
                let (front, back) = bytes.split_at(at);
                assert_eq!(
                    decode_pieces(*framing, [front, back]),
                    whole,
                    "{show:?} cut at {at}"
                );
            }
        }
        let (body, _, left) = decode_pieces(
            Chunked,
            [&b"5;a=b;c=\"d;e\"\r\nhello\r\n0;last\r\nX-T: 1\r\nX-U:\t2 \r\n\r\nNEXT"[..]],
        );
        assert_eq!((&body[..], &left[..]), (&b"hello"[..], &b"NEXT"[..]));
    }

    #[test]
    fn body_data_is_split_off_without_copying_and_bounded_by_its_frame() {
        let mut buf = BytesMut::from(&b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\nGET"[..]);
        let start = buf.as_ptr() as usize;
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked);
        let Ok(Some(BodyEvent::Data(first))) = decoder.decode(&mut buf) else {
            panic!("no data");
        };
        assert_eq!(&first[..], b"hello");
        assert_eq!(first.as_ptr() as usize, start + 3, "copied");
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(BodyEvent::Data(Bytes::from_static(b"abc"))))
        );
        assert_eq!(decoder.exact_remaining(), None);
        assert!(!decoder.is_done());
        assert_eq!(decoder.decode(&mut buf), Ok(Some(BodyEvent::End)));
        assert!(decoder.is_done());
        assert_eq!(decoder.exact_remaining(), Some(0));
        assert_eq!(decoder.decode(&mut buf), Ok(Some(BodyEvent::End)));
        assert_eq!(&buf[..], b"GET");

        let mut length = BodyDecoder::new(BodyFraming::Length(10));
        assert_eq!(length.exact_remaining(), Some(10));
        let mut buf = BytesMut::from(&b"hello"[..]);
        assert_eq!(
            length.decode(&mut buf),
            Ok(Some(BodyEvent::Data(Bytes::from_static(b"hello"))))
        );
        assert_eq!(length.exact_remaining(), Some(5));
        assert_eq!(length.decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"worldXYZ");
        assert_eq!(
            length.decode(&mut buf),
            Ok(Some(BodyEvent::Data(Bytes::from_static(b"world"))))
        );
        assert!(length.is_done());
        assert_eq!(length.decode(&mut buf), Ok(Some(BodyEvent::End)));
        assert_eq!(&buf[..], b"XYZ");

        for framing in [BodyFraming::Empty, BodyFraming::Length(0)] {
            let mut empty = BodyDecoder::new(framing);
            assert!(empty.is_done());
            assert_eq!(empty.exact_remaining(), Some(0));
            assert_eq!(empty.decode(&mut BytesMut::new()), Ok(Some(BodyEvent::End)));
        }

        // A broken body stays broken.
        let mut broken = BodyDecoder::new(BodyFraming::Chunked);
        let mut buf = BytesMut::from(&b"5\r\nhelloXX"[..]);
        assert!(matches!(
            broken.decode(&mut buf),
            Ok(Some(BodyEvent::Data(_)))
        ));
        assert_eq!(broken.decode(&mut buf), Err(BodyError::ChunkDataEnd(b'X')));
        assert_eq!(broken.decode(&mut buf), Err(BodyError::ChunkDataEnd(b'X')));
    }

    #[test]
    fn chunk_extensions_and_trailers_are_capped() {
        let decode = |bytes: String| decode_pieces(BodyFraming::Chunked, [bytes.as_bytes()]).1;
        let extension = |len: usize| "x".repeat(len);
        // 16 KiB of extension bytes per body, all chunks together (`;` not counted).
        assert_eq!(
            decode(format!("5;{}\r\nhello\r\n0\r\n\r\n", extension(16_383))),
            Ok(true)
        );
        assert_eq!(
            decode(format!("5;{}\r\nhello\r\n0\r\n\r\n", extension(16_384))),
            Err(BodyError::ExtensionsTooLong)
        );
        assert_eq!(
            decode(format!(
                "5;{}\r\nhello\r\n0;{}\r\n\r\n",
                extension(8_192),
                extension(8_191)
            )),
            Ok(true)
        );
        assert_eq!(
            decode(format!(
                "5;{}\r\nhello\r\n0;{}\r\n\r\n",
                extension(8_192),
                extension(8_192)
            )),
            Err(BodyError::ExtensionsTooLong)
        );
        // 16 KiB of trailer section, its last empty line included, and 100 fields.
        let trailer = |len: usize| format!("5\r\nhello\r\n0\r\nX: {}\r\n\r\n", "v".repeat(len));
        let fixed = "X: \r\n\r\n".len();
        assert_eq!(decode(trailer(16_384 - fixed)), Ok(true));
        assert_eq!(
            decode(trailer(16_385 - fixed)),
            Err(BodyError::TrailersTooLarge)
        );
        let fields = |count: usize| {
            let lines: String = (0..count).map(|i| format!("T{i}: v\r\n")).collect();
            format!("0\r\n{lines}\r\n")
        };
        assert_eq!(decode(fields(100)), Ok(true));
        assert_eq!(decode(fields(101)), Err(BodyError::TrailersTooLarge));
    }

    #[test]
    fn response_framing_follows_status_method_and_length() {
        use ResponseFraming::{Chunked, Empty, Length, UntilClose};
        let with_length = |values: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::CONTENT_LENGTH, HeaderValue::from_static(value));
            }
            headers
        };
        let none = HeaderMap::new();
        let table = [
            (Method::POST, Version::HTTP_11, 200, &none, None, Chunked),
            (Method::POST, Version::HTTP_10, 200, &none, None, UntilClose),
            (
                Method::POST,
                Version::HTTP_11,
                200,
                &none,
                Some(5),
                Length(5),
            ),
            (
                Method::POST,
                Version::HTTP_10,
                200,
                &none,
                Some(0),
                Length(0),
            ),
            (
                Method::POST,
                Version::HTTP_11,
                200,
                &with_length(&["9"]),
                None,
                Length(9),
            ),
            (
                Method::POST,
                Version::HTTP_11,
                200,
                &with_length(&["9", "9"]),
                None,
                Length(9),
            ),
            (
                Method::POST,
                Version::HTTP_11,
                200,
                &with_length(&["9", "8"]),
                None,
                Chunked,
            ),
            (
                Method::POST,
                Version::HTTP_11,
                200,
                &with_length(&["x"]),
                Some(3),
                Length(3),
            ),
            (
                Method::HEAD,
                Version::HTTP_11,
                200,
                &with_length(&["9"]),
                None,
                Empty,
            ),
            (Method::GET, Version::HTTP_11, 204, &none, None, Empty),
            (
                Method::GET,
                Version::HTTP_11,
                304,
                &with_length(&["9"]),
                None,
                Empty,
            ),
            (Method::GET, Version::HTTP_11, 100, &none, None, Empty),
            (
                Method::OPTIONS,
                Version::HTTP_11,
                403,
                &none,
                Some(0),
                Length(0),
            ),
        ];
        for (method, version, status, headers, exact, want) in table {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                response_framing(&method, version, status, headers, exact),
                want,
                "{method} {version:?} {status} {headers:?} {exact:?}"
            );
        }
    }

    #[test]
    fn response_heads_are_encoded() {
        use ResponseFraming::{Chunked, Empty, Length, UntilClose};
        let date = http_date(784_111_777);
        let headers = |fields: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in fields {
                map.append(*name, HeaderValue::from_static(value));
            }
            map
        };
        const DATE: &str = "date: Sun, 06 Nov 1994 08:49:37 GMT\r\n";
        let table = [
            (
                200,
                headers(&[("content-type", "text/plain"), ("content-length", "9")]),
                Length(9),
                Version::HTTP_11,
                false,
                format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 9\r\n{DATE}\r\n"),
            ),
            (
                200,
                headers(&[("transfer-encoding", "chunked"), ("connection", "keep-alive"), ("x-a", "1"), ("x-a", "2")]),
                Chunked,
                Version::HTTP_11,
                true,
                format!("HTTP/1.1 200 OK\r\nx-a: 1\r\nx-a: 2\r\ntransfer-encoding: chunked\r\nconnection: close\r\n{DATE}\r\n"),
            ),
            // The answer to a HEAD request keeps the length the body would have had.
            (
                200,
                headers(&[("content-length", "42")]),
                Empty,
                Version::HTTP_11,
                false,
                format!("HTTP/1.1 200 OK\r\ncontent-length: 42\r\n{DATE}\r\n"),
            ),
            (
                204,
                headers(&[("content-length", "0")]),
                Empty,
                Version::HTTP_11,
                false,
                format!("HTTP/1.1 204 No Content\r\n{DATE}\r\n"),
            ),
            (
                304,
                headers(&[("etag", "\"a\""), ("date", "Mon, 01 Mar 2100 00:00:00 GMT")]),
                Empty,
                Version::HTTP_11,
                false,
                "HTTP/1.1 304 Not Modified\r\netag: \"a\"\r\ndate: Mon, 01 Mar 2100 00:00:00 GMT\r\n\r\n".to_string(),
            ),
            (
                599,
                headers(&[]),
                Length(0),
                Version::HTTP_11,
                false,
                format!("HTTP/1.1 599 \r\ncontent-length: 0\r\n{DATE}\r\n"),
            ),
            (
                200,
                headers(&[]),
                UntilClose,
                Version::HTTP_10,
                true,
                format!("HTTP/1.1 200 OK\r\nconnection: close\r\n{DATE}\r\n"),
            ),
            (
                200,
                headers(&[]),
                Length(u64::MAX),
                Version::HTTP_10,
                false,
                format!("HTTP/1.1 200 OK\r\ncontent-length: 18446744073709551615\r\nconnection: keep-alive\r\n{DATE}\r\n"),
            ),
        ];
        for (status, headers, framing, version, close, want) in table {
            let mut out = b"kept".to_vec();
            let status = StatusCode::from_u16(status).unwrap();
            encode_response_head(&mut out, status, &headers, framing, version, close, &date);
            assert_eq!(String::from_utf8_lossy(&out[4..]), want);
            assert_eq!(&out[..4], b"kept");
        }
        assert_eq!(CONTINUE, b"HTTP/1.1 100 Continue\r\n\r\n");
    }

    #[test]
    fn error_responses_close_without_a_body() {
        let date = http_date(0);
        assert_eq!(
            error_response(StatusCode::BAD_REQUEST, &date),
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n"
        );
        assert_eq!(
            error_response(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, &date),
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\r\n"
        );
    }

    #[test]
    fn chunks_are_encoded_and_read_back() {
        let mut out = Vec::new();
        encode_chunk(&mut out, b"hello");
        encode_chunk(&mut out, b"");
        assert_eq!(out, b"5\r\nhello\r\n");
        let big = vec![b'z'; 4096 + 10];
        encode_chunk(&mut out, &big);
        assert!(out.ends_with(b"\r\n") && out[10..].starts_with(b"100a\r\nzzz"));
        out.extend_from_slice(LAST_CHUNK);
        let (body, ended, left) = decode_pieces(BodyFraming::Chunked, [&out[..]]);
        assert_eq!(ended, Ok(true));
        assert!(left.is_empty());
        assert_eq!(body, [&b"hello"[..], &big].concat());
    }

    #[test]
    fn http_dates_are_imf_fixdates() {
        for (secs, want) in [
            (0, "Thu, 01 Jan 1970 00:00:00 GMT"),
            (784_111_777, "Sun, 06 Nov 1994 08:49:37 GMT"),
            (951_825_600, "Tue, 29 Feb 2000 12:00:00 GMT"),
            (1_709_251_199, "Thu, 29 Feb 2024 23:59:59 GMT"),
            (2_147_483_648, "Tue, 19 Jan 2038 03:14:08 GMT"),
            // 2100 is not a leap year.
            (4_107_542_399, "Sun, 28 Feb 2100 23:59:59 GMT"),
            (4_107_542_400, "Mon, 01 Mar 2100 00:00:00 GMT"),
            (253_402_300_799, "Fri, 31 Dec 9999 23:59:59 GMT"),
            (u64::MAX, "Fri, 31 Dec 9999 23:59:59 GMT"),
        ] {
            assert_eq!(std::str::from_utf8(&http_date(secs)), Ok(want), "{secs}");
        }
    }
}
