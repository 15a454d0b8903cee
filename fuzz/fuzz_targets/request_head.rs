//! The device side's HTTP/1.1 codec on any bytes: a request head, then its body. No panic;
//! a head takes no more bytes than it was given and is incomplete one byte short; no field
//! value it returns holds CR, LF or NUL; a chunked body has no `Content-Length` left beside
//! it; and the body decodes to the same bytes, end and leftover whether it arrives in one
//! piece or in pieces of arbitrary sizes.
#![no_main]

#[path = "cuts.rs"]
mod cuts;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use seg::http1::{http_date, parse_request_head, BodyDecoder, BodyError, BodyEvent, BodyFraming};

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
    let whole = decode(head.body, std::iter::once(rest));
    let pieces = cuts::pieces(data, rest);
    assert_eq!(
        decode(head.body, pieces),
        whole,
        "pieces and one piece disagree"
    );
    if let (BodyFraming::Length(n), Ok(true)) = (head.body, &whole.1) {
        assert_eq!(whole.0.len() as u64, n);
    }

    let date = http_date(cuts::seed_of(data));
    assert!(date.is_ascii() && date.ends_with(b" GMT"));
});

/// Feeds `pieces` to a decoder in turn: the body, how it ended (`Ok(true)` complete,
/// `Ok(false)` waiting for more) and the bytes left after a complete body.
fn decode<'a>(
    framing: BodyFraming,
    pieces: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<u8>, Result<bool, BodyError>, Vec<u8>) {
    let mut decoder = BodyDecoder::new(framing);
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut pieces = pieces.into_iter();
    let ended = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(BodyEvent::Data(data))) => {
                assert!(!data.is_empty(), "an empty data event");
                body.extend_from_slice(&data);
            }
            Ok(Some(BodyEvent::End)) => {
                assert!(decoder.is_done());
                assert_eq!(decoder.exact_remaining(), Some(0));
                break Ok(true);
            }
            Ok(None) => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => break Ok(false),
            },
            Err(e) => break Err(e),
        }
    };
    let mut left = Vec::new();
    if ended == Ok(true) {
        left.extend_from_slice(&buf);
        for piece in pieces {
            left.extend_from_slice(piece);
        }
    }
    (body, ended, left)
}
