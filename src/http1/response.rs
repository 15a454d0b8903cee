//! Response heads as the upstream sends them, read strictly (RFC 9112): a head of at most
//! [`MAX_RESPONSE_HEAD`] bytes with CRLF line ends, no obs-fold, no space before a colon,
//! valid names and values; interim 1xx answers skipped, a `101` refused (seg never asks to
//! switch protocols). The body is framed by `Transfer-Encoding` when its last coding is
//! `chunked` (taking precedence over, and removing, any `Content-Length`), else by the one
//! `Content-Length` rule requests follow too, else by the connection's close. A response
//! that carries both framings, says `Connection: close`, or is HTTP/1.0 ends its connection.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};

use super::{content_length, ends_in_chunked, has_token};

/// The most bytes a response's status line and headers may take (IIS and Exchange send
/// well under 2 kB); more is a 502.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The most header fields a response may have.
const MAX_RESPONSE_HEADERS: usize = 100;

/// A final response head, read.
#[derive(Debug)]
pub struct ResponseHead {
    pub parts: http::response::Parts,
    pub framing: ResponseFraming,
    /// The connection may carry another exchange once this response has ended.
    pub keep_alive: bool,
}

/// Why a response head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseHeadError {
    #[error("the upstream's response head is over {MAX_RESPONSE_HEAD} bytes")]
    TooLarge,
    #[error("malformed upstream response: {0}")]
    Malformed(&'static str),
}

/// Parses one response head from the start of `buf`: `None` when more bytes are needed,
/// else the bytes it took and the head (`None` for an interim 1xx response).
/// `head_request`: the request was a HEAD, so the response has no body whatever it says.
pub fn parse_response_head(
    buf: &[u8],
    head_request: bool,
) -> Result<Option<(Option<ResponseHead>, usize)>, ResponseHeadError> {
    use ResponseHeadError::{Malformed, TooLarge};
    let window = &buf[..buf.len().min(MAX_RESPONSE_HEAD + 1)];
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let used = match response.parse(window) {
        Ok(httparse::Status::Complete(used)) if used > MAX_RESPONSE_HEAD => return Err(TooLarge),
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => return Err(TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Malformed("too many header fields")),
        Err(_) => return Err(Malformed("unparsable head")),
    };
    // httparse takes a bare LF for a line end; seg does not, so a value cannot smuggle a
    // header line of its own past an upstream that meant it as one value.
    if buf[..used]
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r'))
    {
        return Err(Malformed("bare LF in the head"));
    }
    let code = response.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Malformed("status"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Malformed("101 Switching Protocols, never asked for"));
    }
    if status.is_informational() {
        return Ok(Some((None, used)));
    }
    let version = match response.version {
        Some(1) => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    // Whether the last `Transfer-Encoding` field ends in `chunked`, if there is one.
    let mut chunked: Option<bool> = None;
    let mut closes = false;
    for field in response.headers.iter() {
        let name =
            HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Malformed("header name"))?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| Malformed("header value"))?;
        match name {
            header::TRANSFER_ENCODING => chunked = Some(ends_in_chunked(field.value)),
            header::CONNECTION => closes |= has_token(field.value, b"close"),
            _ => {}
        }
        headers.append(name, value);
    }
    let length = content_length(&headers).map_err(Malformed)?;
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
        Some(ResponseHead {
            parts,
            framing,
            keep_alive,
        }),
        used,
    )))
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

/// 1xx and 204 responses have no body and must not announce a length (RFC 9110 §8.6).
pub(super) fn forbids_body(status: StatusCode) -> bool {
    status.is_informational() || status == StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::{parse_request_head, BodyFraming};

    /// One `Content-Length` rule on both hops: each spelling is accepted, with the same
    /// length, or refused alike in a request head and in a response head.
    #[test]
    fn requests_and_responses_read_content_length_alike() {
        for fields in [
            "Content-Length: 5\r\n",
            "Content-Length: 5\r\nContent-Length: 5\r\n",
            "Content-Length:  5 \r\n",
            "Content-Length: 5, 5\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: -5\r\n",
            "Content-Length: 0x5\r\n",
            "Content-Length: \r\n",
            "Content-Length: 99999999999999999999\r\n",
        ] {
            let request = parse_request_head(
                format!("POST / HTTP/1.1\r\nHost: x\r\n{fields}\r\n").as_bytes(),
                64 * 1024,
            );
            let request = match request {
                Ok(Some((head, _))) => match head.body {
                    BodyFraming::Length(n) => Some(n),
                    other => panic!("{fields:?}: request framed as {other:?}"),
                },
                Ok(None) => panic!("{fields:?}: incomplete"),
                Err(_) => None,
            };
            let response = match parse_response_head(
                format!("HTTP/1.1 200 OK\r\n{fields}\r\n").as_bytes(),
                false,
            ) {
                Ok(Some((Some(head), _))) => match head.framing {
                    ResponseFraming::Length(n) => Some(n),
                    other => panic!("{fields:?}: response framed as {other:?}"),
                },
                Ok(_) => panic!("{fields:?}: no final head"),
                Err(_) => None,
            };
            assert_eq!(request, response, "{fields:?}");
        }
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
}
