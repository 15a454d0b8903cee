//! Bodies, one decoder for both hops: a `Content-Length` counted down, or chunks read byte
//! by byte with their extensions and trailer section checked, capped and dropped.

use bytes::{Buf, Bytes, BytesMut};

use super::{hex_value, is_token_byte, is_value_byte, MAX_HEADERS};

/// How a request's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No framing header: no body, whatever the method.
    Empty,
    /// `Content-Length`; `Length(0)` ends at once, like `Empty`.
    Length(u64),
    Chunked,
}

/// Chunk-extension bytes one body may carry, all chunks together (hyper's
/// `CHUNKED_EXTENSIONS_LIMIT`): extensions are read past, so without a cap a device could
/// make seg read forever without a byte of body.
const CHUNK_EXTENSIONS_LIMIT: u32 = 16 * 1024;

/// The most bytes and fields of a trailer section, which is read and dropped.
const MAX_TRAILER_BYTES: u32 = 16 * 1024;
const MAX_TRAILER_FIELDS: u32 = MAX_HEADERS as u32;

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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::http1::{encode_chunk, LAST_CHUNK};

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
}
