//! HTTP/1.1 as seg speaks it on both hops, one set of rules: request heads parsed
//! (`request`), response heads parsed and framed (`response`), one body decoder for request
//! and response bodies alike (`body`), response heads and chunks encoded (`encode`), and here
//! the rules they share: one `Content-Length` rule, one token reader, the head scan.
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

mod body;
mod encode;
mod request;
pub mod response;

pub use body::{BodyDecoder, BodyError, BodyEvent, BodyFraming};
pub use encode::{
    busy_response, encode_chunk, encode_response_head, error_response, http_date, push_decimal,
    CONTINUE, LAST_CHUNK,
};
pub use request::{parse_request_head, HeadError, RequestHead, MAX_HEADERS};
pub use response::{response_framing, ResponseFraming};

/// The HTTP abuse corpus, shared with the gateway's test of it (`tests/http_abuse.rs`).
#[cfg(test)]
#[path = "../../tests/corpus/http_abuse.rs"]
mod abuse_corpus;

use http::header::{self, HeaderMap};

/// The largest `Content-Length` hyper took (two values below `u64::MAX` were its markers
/// for chunked and close-delimited); a larger one was a 431, and still is.
const MAX_CONTENT_LENGTH: u64 = u64::MAX - 2;

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
