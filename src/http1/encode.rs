//! Encoding toward the device: response heads, error and busy answers, chunks and the
//! HTTP date, written into the connection's buffer without a general-purpose formatter.

use http::header::{self, HeaderMap};
use http::{StatusCode, Version};

use super::response::forbids_body;
use super::ResponseFraming;
use crate::clock::civil_from_days;

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// The last chunk of a chunked response body, without trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

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

/// `n` in decimal, appended (the audit log writes its numbers with it too).
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
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

#[cfg(test)]
mod tests {
    use super::*;

    use http::HeaderValue;

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
