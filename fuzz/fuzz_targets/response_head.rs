//! The upstream side of the HTTP/1.1 codec on any bytes: a response head, then its body, as
//! `upstream::exchange` reads them. No panic; a head takes no more bytes than it was given,
//! parses alike alone and is incomplete one byte short; no field value holds CR, LF or NUL;
//! a chunked body has no `Content-Length` left beside it; a connection is kept only for an
//! HTTP/1.1 response framed by length or chunks, with one framing and no `close`; the
//! `Content-Length` rule is the one requests follow; and the body decodes alike whole or cut (`bodies`).
#![no_main]

#[path = "bodies.rs"]
mod bodies;

use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use libfuzzer_sys::fuzz_target;
use seg::http1::response::parse_response_head;
use seg::http1::{content_length, BodyFraming, ResponseFraming};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 == 1;
    let Ok(Some((head, used))) = parse_response_head(data, head_request) else {
        return;
    };
    assert!(used <= data.len(), "used {used} of {}", data.len());
    assert!(
        matches!(parse_response_head(&data[..used], head_request), Ok(Some((_, again))) if again == used),
        "the head alone does not parse alike"
    );
    assert!(
        matches!(
            parse_response_head(&data[..used - 1], head_request),
            Ok(None)
        ),
        "the head one byte short is not incomplete"
    );
    // An interim response: the next head follows it.
    let Some(head) = head else {
        return;
    };
    for (name, value) in &head.parts.headers {
        assert!(
            !value
                .as_bytes()
                .iter()
                .any(|b| matches!(b, b'\r' | b'\n' | 0)),
            "{name} holds CR, LF or NUL"
        );
    }
    let headers = &head.parts.headers;
    match head.framing {
        ResponseFraming::Chunked => assert!(!headers.contains_key(CONTENT_LENGTH)),
        ResponseFraming::Length(n) => {
            assert!(!headers.contains_key(TRANSFER_ENCODING));
            assert_eq!(
                content_length(headers),
                Ok(Some(n)),
                "one Content-Length rule"
            );
        }
        ResponseFraming::Empty | ResponseFraming::UntilClose => {}
    }
    if head.keep_alive {
        assert_eq!(head.parts.version, http::Version::HTTP_11);
        assert_ne!(head.framing, ResponseFraming::UntilClose);
        assert!(
            !headers
                .get_all(CONNECTION)
                .iter()
                .any(|v| seg::http1::has_token(v.as_bytes(), b"close")),
            "kept alive despite Connection: close"
        );
    }

    let framing = match head.framing {
        ResponseFraming::Length(n) => BodyFraming::Length(n),
        ResponseFraming::Chunked => BodyFraming::Chunked,
        ResponseFraming::Empty | ResponseFraming::UntilClose => return,
    };
    let rest = &data[used..];
    let whole = bodies::decode(framing, std::iter::once(rest));
    let pieces = bodies::pieces(data, rest);
    assert_eq!(
        bodies::decode(framing, pieces),
        whole,
        "pieces and one piece disagree"
    );
});
