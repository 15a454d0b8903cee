//! One audit record as one JSON line, written straight into the queue's buffer: the keys are
//! seg's own, the values escaped byte by byte, numbers and the timestamp written by hand. The
//! line has the shape the log has always had (`tracing-subscriber`'s JSON format), so every
//! query written against it keeps working:
//! `{"timestamp":"…","level":"INFO","fields":{"message":"request",…},"target":"seg::audit"}`.

use std::net::SocketAddr;

use crate::clock::civil_from_days;
use crate::http1::push_decimal;

/// The opening of every line after its timestamp.
const AFTER_TIMESTAMP: &[u8] = b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\"";
/// The end of every line.
const END: &[u8] = b"},\"target\":\"seg::audit\"}\n";

/// A line being written into `out`.
pub struct Line<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> Line<'a> {
    /// Starts a line stamped `unix_micros` (microseconds since the epoch, UTC); `date` caches
    /// the formatted second between lines.
    pub(super) fn start(out: &'a mut Vec<u8>, date: &mut DateCache, unix_micros: u64) -> Line<'a> {
        out.extend_from_slice(b"{\"timestamp\":\"");
        out.extend_from_slice(date.second(unix_micros / 1_000_000));
        let mut fraction = *b".000000Z";
        put_digits(&mut fraction[1..7], unix_micros % 1_000_000);
        out.extend_from_slice(&fraction);
        out.extend_from_slice(AFTER_TIMESTAMP);
        Line { out }
    }

    pub(super) fn end(self) {
        self.out.extend_from_slice(END);
    }

    fn key(&mut self, key: &'static str) {
        debug_assert!(key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        self.out.extend_from_slice(b",\"");
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A string field; any text, escaped as JSON requires.
    pub fn str(&mut self, key: &'static str, value: &str) {
        self.key(key);
        self.out.push(b'"');
        escape_into(self.out, value);
        self.out.push(b'"');
    }

    /// An address and port: `203.0.113.7:48900`, `[2001:db8::1]:48900`.
    pub fn addr(&mut self, key: &'static str, addr: &SocketAddr) {
        self.key(key);
        self.out.push(b'"');
        match addr {
            SocketAddr::V4(v4) => {
                for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        self.out.push(b'.');
                    }
                    push_decimal(self.out, u64::from(octet));
                }
                self.out.push(b':');
                push_decimal(self.out, u64::from(v4.port()));
            }
            // Rarer, and only hex digits, colons, brackets, dots and a `%` zone: no escaping.
            SocketAddr::V6(v6) => {
                use std::io::Write as _;
                let _ = write!(self.out, "{v6}");
            }
        }
        self.out.push(b'"');
    }

    pub fn uint(&mut self, key: &'static str, value: u64) {
        self.key(key);
        push_decimal(self.out, value);
    }

    pub fn bool(&mut self, key: &'static str, value: bool) {
        self.key(key);
        self.out
            .extend_from_slice(if value { b"true" } else { b"false" });
    }

    /// A duration in milliseconds with microsecond precision (`12.345`).
    pub fn millis(&mut self, key: &'static str, micros: u64) {
        self.key(key);
        push_decimal(self.out, micros / 1000);
        let mut fraction = *b".000";
        put_digits(&mut fraction[1..], micros % 1000);
        self.out.extend_from_slice(&fraction);
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of the last second asked for.
#[derive(Default)]
pub(super) struct DateCache {
    unix_secs: u64,
    text: [u8; 19],
}

impl DateCache {
    fn second(&mut self, unix_secs: u64) -> &[u8; 19] {
        if unix_secs != self.unix_secs || self.text[0] == 0 {
            self.unix_secs = unix_secs;
            let (year, month, day) = civil_from_days(unix_secs / 86_400);
            let of_day = unix_secs % 86_400;
            let mut text = *b"0000-00-00T00:00:00";
            put_digits(&mut text[0..4], year);
            put_digits(&mut text[5..7], month);
            put_digits(&mut text[8..10], day);
            put_digits(&mut text[11..13], of_day / 3600);
            put_digits(&mut text[14..16], of_day / 60 % 60);
            put_digits(&mut text[17..19], of_day % 60);
            self.text = text;
        }
        &self.text
    }
}

fn needs_escape(byte: u8) -> bool {
    byte < 0x20 || byte == b'"' || byte == b'\\'
}

/// Whether any of eight bytes needs escaping (a byte below 0x20, `"` or a backslash): the
/// "has a byte less than n" word test for 0x20, and the "has a zero byte" test on the word
/// xor-ed with each of the two.
fn any_needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGHS;
    let zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGHS;
    below(word, 0x20)
        | zero(word ^ (ONES * u64::from(b'"')))
        | zero(word ^ (ONES * u64::from(b'\\')))
        != 0
}

/// `value` as the inside of a JSON string: `"` and the backslash escaped, control characters
/// as `\n`, `\r`, `\t` or `\u00XX`, everything else (UTF-8 included) as it is.
fn escape_into(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    // Most values need nothing: skip them eight bytes at a time.
    let mut clean = 0;
    while clean + 8 <= bytes.len() {
        let word = u64::from_le_bytes(bytes[clean..clean + 8].try_into().expect("8 bytes"));
        if any_needs_escape(word) {
            break;
        }
        clean += 8;
    }
    if !bytes[clean..].iter().any(|&b| needs_escape(b)) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut plain = 0;
    for (i, &byte) in bytes.iter().enumerate().skip(clean) {
        if !needs_escape(byte) {
            continue;
        }
        out.extend_from_slice(&bytes[plain..i]);
        plain = i + 1;
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
            }
        }
    }
    out.extend_from_slice(&bytes[plain..]);
}

/// `n` in decimal, zero-padded to the width of `out` (the high digits dropped).
fn put_digits(out: &mut [u8], mut n: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(unix_micros: u64, fill: impl FnOnce(&mut Line)) -> serde_json::Value {
        let mut out = Vec::new();
        let mut line = Line::start(&mut out, &mut DateCache::default(), unix_micros);
        fill(&mut line);
        line.end();
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
        serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&out)))
    }

    #[test]
    fn a_line_has_the_shape_of_the_log() {
        // 2026-12-06T07:21:05.000042Z
        let v = line(1_796_541_665_000_042, |l| {
            l.str("account", "CN=Dave,DC=corp");
            l.addr("peer", &"203.0.113.7:48900".parse().unwrap());
            l.addr("peer_v", &"[2001:db8::1%2]:443".parse().unwrap());
            l.uint("status", 403);
            l.uint("bytes_in", 0);
            l.uint("bytes_out", u64::MAX);
            l.millis("duration_ms", 12_345);
            l.millis("short_ms", 7);
            l.bool("completed", true);
        });
        assert_eq!(v["timestamp"], "2026-12-06T07:21:05.000042Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "seg::audit");
        let f = &v["fields"];
        assert_eq!(f["message"], "request");
        assert_eq!(f["account"], "CN=Dave,DC=corp");
        assert_eq!(f["peer"], "203.0.113.7:48900");
        assert_eq!(f["peer_v"], "[2001:db8::1%2]:443");
        assert_eq!(f["peer_v"], "[2001:db8::1%2]:443");
        assert_eq!(f["status"], 403);
        assert_eq!(f["bytes_in"], 0);
        assert_eq!(f["bytes_out"], u64::MAX);
        assert_eq!(f["duration_ms"], 12.345);
        assert_eq!(f["short_ms"], 0.007);
        assert_eq!(f["completed"], true);
    }

    #[test]
    fn timestamps_follow_the_calendar() {
        let mut date = DateCache::default();
        for (unix_secs, text) in [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_709_251_199, "2024-02-29T23:59:59"),
            (4_102_444_800, "2100-01-01T00:00:00"),
        ] {
            assert_eq!(&date.second(unix_secs)[..], text.as_bytes());
        }
    }

    /// The word test agrees with the byte test for every byte value in every position,
    /// beside bytes that need nothing and beside multi-byte UTF-8.
    #[test]
    fn the_word_test_finds_every_byte_that_needs_escaping() {
        for filler in [b'a', 0xc3, 0x7f, b' '] {
            for position in 0..8 {
                for byte in 0..=255u8 {
                    let mut word = [filler; 8];
                    word[position] = byte;
                    assert_eq!(
                        any_needs_escape(u64::from_le_bytes(word)),
                        needs_escape(byte) || needs_escape(filler),
                        "byte {byte:#04x} at {position} among {filler:#04x}"
                    );
                }
            }
        }
    }

    /// Any text a device can put in a field comes back unchanged from the JSON: every byte
    /// value below 0x80 in every position, and multi-byte characters, including U+2028.
    #[test]
    fn every_value_survives_the_round_trip() {
        let mut texts: Vec<String> = (0u8..0x80)
            .map(|b| format!("a{}b{}", char::from(b), char::from(b)))
            .collect();
        texts.push("\"\\\u{0}\u{1f}\u{7f}café\u{2028}\u{10ffff}".to_string());
        texts.push(String::new());
        // Long values, one awkward character at every position (the word-at-a-time path).
        for special in ['"', '\\', '\u{1}', '\u{1f}', 'é'] {
            for at in 0..40 {
                let mut text: String = "x".repeat(40);
                text.insert(at, special);
                texts.push(text);
            }
        }
        // A fixed pseudo-random walk over short strings of awkward characters.
        let pool = [
            '"', '\\', '\n', '\r', '\t', '\u{0}', '\u{1b}', 'x', 'é', '\u{2029}', '/',
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let len = (seed % 9) as usize;
            let mut text = String::new();
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push(pool[(seed % pool.len() as u64) as usize]);
            }
            texts.push(text);
        }
        for text in texts {
            let v = line(0, |l| l.str("user_agent", &text));
            assert_eq!(v["fields"]["user_agent"], text.as_str(), "{text:?}");
        }
    }
}
