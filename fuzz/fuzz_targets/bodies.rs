//! Bodies as the codec targets feed them to the decoder: whole, or cut into pieces of the
//! input, mostly tiny (where framing lines get cut) and now and then large, chosen as a
//! function of the input so a crash replays.

use bytes::BytesMut;
use seg::http1::{BodyDecoder, BodyError, BodyEvent, BodyFraming};

/// `rest` cut into pieces, the cuts seeded by `data`.
pub fn pieces<'a>(data: &[u8], rest: &'a [u8]) -> Vec<&'a [u8]> {
    let mut seed = seed_of(data);
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < rest.len() {
        seed = next(seed);
        let len = if seed % 8 == 0 {
            seed as usize % 512
        } else {
            seed as usize % 5
        } + 1;
        let end = (at + len).min(rest.len());
        pieces.push(&rest[at..end]);
        at = end;
    }
    pieces
}

/// FNV-1a of the input.
pub fn seed_of(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1
}

/// xorshift64.
fn next(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Feeds `pieces` to a decoder in turn: the body, how it ended (`Ok(true)` complete,
/// `Ok(false)` waiting for more) and the bytes left after a complete body.
pub fn decode<'a>(
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
