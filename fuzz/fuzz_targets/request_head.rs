//! The device side's HTTP/1.1 codec on any bytes: a request head, then its body. No panic;
//! a head takes no more bytes than it was given and is incomplete one byte short; no field
//! value it returns holds CR, LF or NUL; a chunked body has no `Content-Length` left beside
//! it; and the body decodes to the same bytes, end and leftover whether it arrives in one
//! piece or in pieces of arbitrary sizes.
#![no_main]

#[path = "bodies.rs"]
mod bodies;

use libfuzzer_sys::fuzz_target;
use seg::http1::{http_date, parse_request_head, BodyFraming};

/// Small, so inputs of a few kilobytes reach the size cap too.
const MAX_HEAD: usize = 2048;

fuzz_target!(|data: &[u8]| {
    let Ok(Some((head, used))) = parse_request_head(data, MAX_HEAD) else {
        return;
    };
    assert!(
        used <= data.len() && used <= MAX_HEAD,
        "used {used} of {}",
        data.len()
    );
    assert!(
        matches!(parse_request_head(&data[..used], MAX_HEAD), Ok(Some((_, again))) if again == used),
        "the head alone does not parse alike"
    );
    assert!(
        matches!(parse_request_head(&data[..used - 1], MAX_HEAD), Ok(None)),
        "the head one byte short is not incomplete"
    );
    for (name, value) in &head.headers {
        assert!(
            !value
                .as_bytes()
                .iter()
                .any(|b| matches!(b, b'\r' | b'\n' | 0)),
            "{name} holds CR, LF or NUL"
        );
    }
    match head.body {
        BodyFraming::Chunked => assert!(!head.headers.contains_key(http::header::CONTENT_LENGTH)),
        BodyFraming::Length(_) => {
            assert!(!head.headers.contains_key(http::header::TRANSFER_ENCODING))
        }
        BodyFraming::Empty => {}
    }

    let rest = &data[used..];
    let whole = bodies::decode(head.body, std::iter::once(rest));
    let pieces = bodies::pieces(data, rest);
    assert_eq!(
        bodies::decode(head.body, pieces),
        whole,
        "pieces and one piece disagree"
    );
    if let (BodyFraming::Length(n), Ok(true)) = (head.body, &whole.1) {
        assert_eq!(whole.0.len() as u64, n);
    }

    let date = http_date(bodies::seed_of(data));
    assert!(date.is_ascii() && date.ends_with(b" GMT"));
});
