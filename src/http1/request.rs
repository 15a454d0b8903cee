//! Request heads: parsed by `httparse` within a size and field-count cap, checked field by
//! field, and framed (`BodyFraming`), with the HTTP/2 preface told early.

use std::mem::MaybeUninit;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};

use super::{content_length_value, ends_in_chunked, has_token, BodyFraming, MAX_CONTENT_LENGTH};

/// The most header fields a request head may have; one more is a 431.
pub const MAX_HEADERS: usize = 100;

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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::http1::abuse_corpus::{self, post, post_framed, raw, Read, HELLO_CHUNKED};
    use crate::http1::{BodyDecoder, BodyEvent};
    use bytes::{Buf, BytesMut};

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
}
