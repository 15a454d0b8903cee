//! The HTTP abuse corpus: hostile HTTP/1.1 messages, each written once with what seg's codec
//! reads in it and what the gateway must make of it.
//!
//! Two tests read every row. The codec's unit test (`src/http1/mod.rs`) cuts the bytes every
//! way and checks the reads; the gateway test (`tests/http_abuse.rs`) writes the steps over
//! real TLS to a running seg and checks the device's answers and the upstream's bytes. A row
//! is written for the codec; the gateway's outcome follows from the reads (`Row::expect`),
//! except where seg refuses a well-read request itself (route, method, query, Upgrade,
//! CONNECT), which the row says with `gateway`. So the two depths cannot drift apart: a
//! request the codec reads whole is the only thing the gateway may forward.
//!
//! Both includers provide `BodyError` and `BodyFraming` (seg's `http1` types) to this module
//! through `super`.

// Each includer uses a part: the codec test the reads, the gateway test the outcomes.
#![allow(dead_code)]

use std::time::Duration;

use super::{BodyError, BodyFraming};

/// The account every spoofed identity names; it must never reach the upstream.
pub const SPOOF: &str = "ceo@corp.test";
/// The identity header the gateway test configures (in the case seg writes it).
pub const IDENTITY_HEADER: &str = "x-seg-user";
/// A chunked body of two chunks, "hello world".
pub const HELLO_CHUNKED: &str = "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";

/// An ActiveSync target for this command and user, from the device the gateway test admits.
pub fn target(command: &str, user: &str) -> String {
    format!(
        "/Microsoft-Server-ActiveSync?Cmd={command}&User={user}&DeviceId=TESTDEVICE1&DeviceType=iPhone"
    )
}

/// Alice's Sync, the target of every honest request.
pub fn sync() -> String {
    target("Sync", "alice")
}

/// `{T}` becomes alice's Sync target.
pub fn raw(text: &str) -> Vec<u8> {
    text.replace("{T}", &sync()).into_bytes()
}

/// An honest POST with extra header lines (each ending in CRLF) and a body.
pub fn post(extra: &str, body: &str) -> String {
    format!(
        "POST {} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        sync(),
        body.len()
    )
}

/// A POST whose framing headers are given whole, followed by `rest` verbatim.
pub fn post_framed(framing: &str, rest: &str) -> Vec<u8> {
    raw(&format!(
        "POST {{T}} HTTP/1.1\r\nHost: localhost\r\n{framing}\r\n{rest}"
    ))
}

/// A request a front end would not see, hidden where seg must treat it as body bytes.
pub fn smuggled() -> String {
    format!(
        "POST {} HTTP/1.1\r\nHost: localhost\r\nX-Remote-User: {SPOOF}\r\n{IDENTITY_HEADER}: {SPOOF}\r\nContent-Length: 0\r\n\r\n",
        target("SendMail", "ceo")
    )
}

/// What the codec makes of one message of a connection, read as the driver reads it.
#[derive(Debug, PartialEq)]
pub enum Read {
    /// A request read whole: its framing and flags, and its body without framing.
    Request {
        framing: BodyFraming,
        close: bool,
        continues: bool,
        body: Vec<u8>,
    },
    /// The head was refused with this status (`None`: closed without an answer).
    Refused(Option<u16>),
    /// The head was read, then the body broke its framing.
    BrokenBody(BodyError),
    /// The bytes ended inside a message.
    Incomplete,
}

fn request(framing: BodyFraming, body: &str) -> Read {
    Read::Request {
        framing,
        close: false,
        continues: false,
        body: body.as_bytes().to_vec(),
    }
}

fn closing(framing: BodyFraming, body: &str) -> Read {
    Read::Request {
        framing,
        close: true,
        continues: false,
        body: body.as_bytes().to_vec(),
    }
}

fn continuing(framing: BodyFraming, body: &str) -> Read {
    Read::Request {
        framing,
        close: false,
        continues: true,
        body: body.as_bytes().to_vec(),
    }
}

fn refused(status: u16) -> Read {
    Read::Refused(Some(status))
}

/// What a row must lead to at the gateway.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// This 4xx, then the connection closes; nothing of the message reaches the upstream.
    Rejected(u16),
    /// A message whose head is well formed but whose body breaks its framing: this 4xx, then
    /// the connection closes. seg streams bodies, so the head and the valid start of the body
    /// may already be upstream, but never a complete request: seg closes that upstream
    /// connection too.
    RejectedMidBody(u16),
    /// A well-framed request seg refuses itself (route, method, query): this 4xx, nothing
    /// forwarded, and the connection stays open, since where the message ended is certain
    /// (the pipelined rows show the next bytes are read as the next request).
    Refused(u16),
    /// The connection closes without a response, nothing forwarded.
    Dropped,
    /// This many requests forwarded, each answered 200; the connection stays open.
    Forwarded(usize),
    /// This many forwarded, then seg closes the connection (the framing or the client said so).
    ForwardedThenClosed(usize),
    /// These final statuses in order, this many forwarded, then closed or not.
    Sequence {
        statuses: Vec<u16>,
        forwarded: usize,
        closes: bool,
    },
}

impl Expect {
    /// The final statuses the device reads, in order.
    pub fn statuses(&self) -> Vec<u16> {
        match self {
            Expect::Rejected(status)
            | Expect::RejectedMidBody(status)
            | Expect::Refused(status) => vec![*status],
            Expect::Dropped => Vec::new(),
            Expect::Forwarded(n) | Expect::ForwardedThenClosed(n) => vec![200; *n],
            Expect::Sequence { statuses, .. } => statuses.clone(),
        }
    }

    /// How many requests the upstream receives whole.
    pub fn forwarded(&self) -> usize {
        match self {
            Expect::Rejected(_)
            | Expect::RejectedMidBody(_)
            | Expect::Refused(_)
            | Expect::Dropped => 0,
            Expect::Forwarded(n) | Expect::ForwardedThenClosed(n) => *n,
            Expect::Sequence { forwarded, .. } => *forwarded,
        }
    }

    /// Whether seg closes the device's connection.
    pub fn closes(&self) -> bool {
        match self {
            Expect::Rejected(_)
            | Expect::RejectedMidBody(_)
            | Expect::Dropped
            | Expect::ForwardedThenClosed(_) => true,
            Expect::Refused(_) | Expect::Forwarded(_) => false,
            Expect::Sequence { closes, .. } => *closes,
        }
    }
}

/// One write of the device, or a wait between writes.
#[derive(Debug, Clone)]
pub enum Step {
    Send(Vec<u8>),
    Pause(Duration),
    /// Waits for an interim (1xx) response before the next step.
    AwaitContinue,
}

/// One hostile input.
pub struct Row {
    pub name: String,
    /// How the device writes it.
    pub steps: Vec<Step>,
    /// What the codec reads in its bytes, message by message.
    pub reads: Vec<Read>,
    /// Bytes a request that ends its connection leaves unread.
    pub unread: usize,
    /// What the gateway does when seg refuses a request the codec read.
    gateway: Option<Expect>,
}

impl Row {
    fn new(name: &str, bytes: Vec<u8>, reads: Vec<Read>) -> Row {
        Row::stepped(name, vec![Step::Send(bytes)], reads)
    }

    fn stepped(name: &str, steps: Vec<Step>, reads: Vec<Read>) -> Row {
        Row {
            name: name.to_string(),
            steps,
            reads,
            unread: 0,
            gateway: None,
        }
    }

    fn unread(mut self, bytes: usize) -> Row {
        self.unread = bytes;
        self
    }

    /// seg refuses what the codec read, after the codec.
    fn gateway(mut self, expect: Expect) -> Row {
        self.gateway = Some(expect);
        self
    }

    /// Every byte the device writes, in order.
    pub fn bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        for step in &self.steps {
            if let Step::Send(more) = step {
                bytes.extend_from_slice(more);
            }
        }
        bytes
    }

    /// What the gateway must do: what the row says, else what follows from the reads. A
    /// request read whole is forwarded and answered 200, a refused head is answered with its
    /// status (or dropped) and closes, a broken body is a 400 that closes.
    pub fn expect(&self) -> Expect {
        if let Some(expect) = &self.gateway {
            return expect.clone();
        }
        let requests = self
            .reads
            .iter()
            .filter(|read| matches!(read, Read::Request { .. }))
            .count();
        match (self.reads.last(), requests) {
            (Some(Read::Refused(Some(status))), 0) => Expect::Rejected(*status),
            (Some(Read::Refused(None)), 0) => Expect::Dropped,
            (Some(Read::BrokenBody(_)), 0) => Expect::RejectedMidBody(400),
            (Some(Read::Refused(Some(status))), _) => Expect::Sequence {
                statuses: [vec![200; requests], vec![*status]].concat(),
                forwarded: requests,
                closes: true,
            },
            (Some(Read::Request { close: true, .. }), _) => Expect::ForwardedThenClosed(requests),
            (Some(Read::Request { .. }), _) => Expect::Forwarded(requests),
            (last, _) => panic!(
                "{}: no gateway outcome follows from a last read of {last:?}; say it with `gateway`",
                self.name
            ),
        }
    }

    /// The bodies the upstream receives, in order: those of the requests answered 200.
    pub fn forwarded_bodies(&self) -> Vec<Vec<u8>> {
        self.reads
            .iter()
            .zip(self.expect().statuses())
            .filter_map(|(read, status)| match read {
                Read::Request { body, .. } if status == 200 => Some(body.clone()),
                _ => None,
            })
            .collect()
    }
}

/// Every row of the corpus.
pub fn rows() -> Vec<Row> {
    use BodyFraming::{Chunked, Empty, Length};
    use Expect::*;
    let smuggle = smuggled();
    let honest = post("", "hello");
    let world = post("", "world");
    let mut rows = vec![
        // Controls: the table can tell forwarding from refusal.
        Row::new(
            "control: honest POST",
            honest.clone().into_bytes(),
            vec![request(Length(5), "hello")],
        ),
        Row::new(
            "control: honest chunked POST",
            post_framed("Transfer-Encoding: chunked\r\n", HELLO_CHUNKED),
            vec![request(Chunked, "hello world")],
        ),
        Row::new(
            "control: Connection: close",
            post("Connection: close\r\n", "hi").into_bytes(),
            vec![closing(Length(2), "hi")],
        ),
        // Content-Length and Transfer-Encoding together: chunked wins and the connection
        // closes after the answer (RFC 9112 §6.1), so what follows the last chunk is never
        // read as a request.
        Row::new(
            "CL.TE: CL then TE, smuggled request after the last chunk",
            post_framed(
                "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                &format!("0\r\n\r\n{smuggle}"),
            ),
            vec![closing(Chunked, "")],
        )
        .unread(smuggle.len()),
        Row::new(
            "TE.CL: TE then CL, smuggled request after the last chunk",
            post_framed(
                "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                &format!("0\r\n\r\n{smuggle}"),
            ),
            vec![closing(Chunked, "")],
        )
        .unread(smuggle.len()),
        Row::new(
            "TE.CL: CL counting past the chunks",
            post_framed(
                &format!(
                    "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
                    HELLO_CHUNKED.len() + smuggle.len()
                ),
                &format!("{HELLO_CHUNKED}{smuggle}"),
            ),
            vec![closing(Chunked, "hello world")],
        )
        .unread(smuggle.len()),
    ];

    // Transfer-Encoding spellings, alone and beside a Content-Length (which then closes).
    for (coding, name, accepted) in [
        ("chunked, identity", "TE: chunked, identity", false),
        ("identity", "TE: identity", false),
        ("  chunked", "TE: leading spaces (OWS)", true),
        (
            "Chunked",
            "TE: Chunked (codings are case-insensitive)",
            true,
        ),
        ("xchunked", "TE: xchunked", false),
        ("chunked\t", "TE: trailing tab (OWS)", true),
        ("chunked;q=1", "TE: chunked with a parameter", false),
        ("\"chunked\"", "TE: quoted chunked", false),
        ("gzip, chunked", "TE: gzip, chunked", true),
    ] {
        let (alone, with_length) = if accepted {
            (
                request(Chunked, "hello world"),
                closing(Chunked, "hello world"),
            )
        } else {
            (refused(400), refused(400))
        };
        rows.push(Row::new(
            name,
            post_framed(&format!("Transfer-Encoding: {coding}\r\n"), HELLO_CHUNKED),
            vec![alone],
        ));
        rows.push(Row::new(
            &format!("{name}, with Content-Length"),
            post_framed(
                &format!(
                    "Content-Length: {}\r\nTransfer-Encoding: {coding}\r\n",
                    HELLO_CHUNKED.len()
                ),
                HELLO_CHUNKED,
            ),
            vec![with_length],
        ));
    }
    rows.extend([
        Row::new(
            "TE: obs-fold continuation",
            post_framed("Transfer-Encoding:\r\n chunked\r\n", HELLO_CHUNKED),
            vec![refused(400)],
        ),
        Row::new(
            "TE: two lines, chunked then identity",
            post_framed(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                HELLO_CHUNKED,
            ),
            vec![refused(400)],
        ),
        Row::new(
            "TE: two lines, identity then chunked",
            post_framed(
                "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
                HELLO_CHUNKED,
            ),
            vec![request(Chunked, "hello world")],
        ),
        Row::new(
            "TE: chunked on HTTP/1.0",
            raw(&format!(
                "POST {{T}} HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n{HELLO_CHUNKED}"
            )),
            vec![refused(400)],
        ),
        Row::new(
            "TE: chunked on a GET, with a smuggled request in the chunk",
            raw(&format!(
                "GET {{T}} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggle}\r\n0\r\n\r\n",
                smuggle.len()
            )),
            vec![request(Chunked, &smuggle)],
        )
        .gateway(Refused(405)),
    ]);

    // Content-Length spellings.
    for (value, name, accepted) in [
        ("5\r\nContent-Length: 5", "CL: duplicate, equal", true),
        ("5\r\nContent-Length: 6", "CL: duplicate, different", false),
        ("5, 5", "CL: list in one line", false),
        ("+5", "CL: plus sign", false),
        ("-5", "CL: minus sign", false),
        ("0x5", "CL: hex", false),
        ("5.0", "CL: decimal point", false),
        ("   5", "CL: leading spaces (OWS)", true),
        ("5 ", "CL: trailing space (OWS)", true),
        ("05", "CL: leading zero", true),
        ("", "CL: empty", false),
        ("5 5", "CL: two numbers", false),
        ("99999999999999999999999", "CL: overflowing u64", false),
    ] {
        let read = if accepted {
            request(Length(5), "hello")
        } else {
            refused(400)
        };
        rows.push(Row::new(
            name,
            post_framed(&format!("Content-Length: {value}\r\n"), "hello"),
            vec![read],
        ));
    }
    rows.extend([
        Row::new(
            "CL: body longer than CL (the rest is a second, pipelined request)",
            post_framed("Content-Length: 5\r\n", &format!("hello{smuggle}")),
            vec![request(Length(5), "hello"), request(Length(0), "")],
        )
        // The second is ceo's SendMail on alice's certificate.
        .gateway(Sequence {
            statuses: vec![200, 403],
            forwarded: 1,
            closes: false,
        }),
        Row::new(
            "CL: absent on a POST with a body (the body is read as a request)",
            post_framed("", "hello\r\n\r\n"),
            vec![request(Empty, ""), refused(400)],
        ),
        Row::new(
            "smuggled request inside a Content-Length body",
            post("Content-Type: application/vnd.ms-sync.wbxml\r\n", &smuggle).into_bytes(),
            vec![request(Length(smuggle.len() as u64), &smuggle)],
        ),
        Row::new(
            "smuggled request inside a chunked body",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                &format!("{:x}\r\n{smuggle}\r\n0\r\n\r\n", smuggle.len()),
            ),
            vec![request(Chunked, &smuggle)],
        ),
    ]);

    // Chunked framing abuse; the head is well formed, so these fail in the body.
    for (body, name, error) in [
        (
            "10000000000000005\r\nhello\r\n0\r\n\r\n",
            "chunk size: 17 hex digits (overflow)",
            BodyError::ChunkSizeOverflow,
        ),
        (
            "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            "chunk size: 18 f's (overflow)",
            BodyError::ChunkSizeOverflow,
        ),
        (
            "0x5\r\nhello\r\n0\r\n\r\n",
            "chunk size: 0x prefix",
            BodyError::ChunkSizeLine(b'x'),
        ),
        (
            "-5\r\nhello\r\n0\r\n\r\n",
            "chunk size: negative",
            BodyError::ChunkSizeMissing(b'-'),
        ),
        (
            "+5\r\nhello\r\n0\r\n\r\n",
            "chunk size: plus sign",
            BodyError::ChunkSizeMissing(b'+'),
        ),
        (
            "\r\nhello\r\n0\r\n\r\n",
            "chunk size: empty",
            BodyError::ChunkSizeMissing(b'\r'),
        ),
        (
            "5\nhello\n0\n\n",
            "chunked: bare LF line endings",
            BodyError::ChunkSizeLine(b'\n'),
        ),
        (
            "5\rhello\r0\r\r",
            "chunked: bare CR line endings",
            BodyError::ChunkSizeLine(b'h'),
        ),
        (
            "5\r\nhelloXX\r\n0\r\n\r\n",
            "chunked: data longer than its size",
            BodyError::ChunkDataEnd(b'X'),
        ),
        (
            "5\r\nhel\r\n0\r\n\r\n",
            "chunked: data shorter than its size",
            BodyError::ChunkDataEnd(b'0'),
        ),
    ] {
        rows.push(Row::new(
            name,
            post_framed("Transfer-Encoding: chunked\r\n", body),
            vec![Read::BrokenBody(error)],
        ));
    }
    rows.extend([
        Row::new(
            "chunk extensions: name and quoted value (dropped)",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                "5;name=\"v;a=l\"\r\nhello\r\n0;last\r\n\r\n",
            ),
            vec![request(Chunked, "hello")],
        ),
        Row::new(
            "chunk extensions: 20 kB of extension",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                &format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(20_000)),
            ),
            vec![Read::BrokenBody(BodyError::ExtensionsTooLong)],
        ),
        Row::new(
            "chunk extension carrying CRLF and a header",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                &format!("5;x\r\nX-Remote-User: {SPOOF}\r\nhello\r\n0\r\n\r\n"),
            ),
            vec![Read::BrokenBody(BodyError::ChunkDataEnd(b'o'))],
        ),
    ]);

    // Trailers: read and dropped, whatever they claim.
    rows.extend([
        Row::new(
            "trailers: identity headers after a chunked body",
            post_framed(
                "Transfer-Encoding: chunked\r\nTrailer: X-Remote-User, X-Seg-User\r\n",
                &format!(
                    "5\r\nhello\r\n0\r\nX-Remote-User: {SPOOF}\r\n{IDENTITY_HEADER}: {SPOOF}\r\nX_Remote_User: {SPOOF}\r\nAuthorization: Basic Y2VvOng=\r\nX-Forwarded-For: 10.6.6.6\r\nX-Forwarded-Client-Cert: By={SPOOF}\r\n\r\n"
                ),
            ),
            vec![request(Chunked, "hello")],
        ),
        Row::new(
            "trailers: framing headers after a chunked body",
            post_framed(
                "Transfer-Encoding: chunked\r\nTE: trailers\r\n",
                "5\r\nhello\r\n0\r\nContent-Length: 999\r\nTransfer-Encoding: chunked\r\nHost: evil.example\r\n\r\n",
            ),
            vec![request(Chunked, "hello")],
        ),
    ]);

    // Line endings and field syntax in the head.
    rows.extend([
        Row::new(
            "bare LF line endings in the head",
            raw("POST {T} HTTP/1.1\nHost: localhost\nContent-Length: 5\n\nhello"),
            vec![request(Length(5), "hello")],
        ),
        Row::new(
            "bare LF inside a value, hiding an identity header",
            raw(&format!(
                "POST {{T}} HTTP/1.1\r\nHost: localhost\r\nX-Note: a\nX-Remote-User: {SPOOF}\r\nContent-Length: 0\r\n\r\n"
            )),
            vec![request(Length(0), "")],
        ),
    ]);
    for (name, text) in [
        (
            "bare CR line endings in the head",
            "POST {T} HTTP/1.1\rHost: localhost\rContent-Length: 0\r\r".to_string(),
        ),
        (
            "CR inside a value",
            format!("POST {{T}} HTTP/1.1\r\nHost: localhost\r\nX-Note: a\rX-Remote-User: {SPOOF}\r\nContent-Length: 0\r\n\r\n"),
        ),
        (
            "NUL inside a value",
            "POST {T} HTTP/1.1\r\nHost: localhost\r\nX-Note: a\0b\r\nContent-Length: 0\r\n\r\n".to_string(),
        ),
        (
            "obs-fold header continuation",
            format!("POST {{T}} HTTP/1.1\r\nHost: localhost\r\nX-Note: a\r\n X-Remote-User: {SPOOF}\r\nContent-Length: 0\r\n\r\n"),
        ),
        (
            "empty header name",
            "POST {T} HTTP/1.1\r\nHost: localhost\r\n: x\r\nContent-Length: 0\r\n\r\n".to_string(),
        ),
        (
            "space before the colon of an identity header",
            format!("POST {{T}} HTTP/1.1\r\nHost: localhost\r\nX-Remote-User : {SPOOF}\r\nContent-Length: 0\r\n\r\n"),
        ),
        (
            "space before the colon of Content-Length",
            "POST {T} HTTP/1.1\r\nHost: localhost\r\nContent-Length : 5\r\n\r\nhello".to_string(),
        ),
        (
            "tab before the colon",
            "POST {T} HTTP/1.1\r\nHost: localhost\r\nContent-Length\t: 5\r\n\r\nhello".to_string(),
        ),
        (
            "non-token byte in a header name",
            format!("POST {{T}} HTTP/1.1\r\nHost: localhost\r\nX-Remote(User): {SPOOF}\r\nContent-Length: 0\r\n\r\n"),
        ),
        (
            "header line without a colon",
            "POST {T} HTTP/1.1\r\nHost: localhost\r\nX-Note\r\nContent-Length: 0\r\n\r\n".to_string(),
        ),
    ] {
        rows.push(Row::new(name, raw(&text), vec![refused(400)]));
    }
    rows.push(Row::new(
        "obs-text (high bytes) in a value",
        raw("POST {T} HTTP/1.1\r\nHost: localhost\r\nX-Note: caf\u{e9}\r\nContent-Length: 0\r\n\r\n"),
        vec![request(Length(0), "")],
    ));

    // Sizes.
    let long_target = format!("{}&Pad={}", sync(), "a".repeat(70_000));
    rows.extend([
        Row::new(
            "oversize request line (70 kB target)",
            format!("POST {long_target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
                .into_bytes(),
            // Past seg's 64 kB head cap before any URI check is reached.
            vec![refused(431)],
        ),
        Row::new(
            "oversize header block (450 kB header)",
            post(&format!("X-Pad: {}\r\n", "a".repeat(450_000)), "").into_bytes(),
            vec![refused(431)],
        ),
        Row::new(
            "too many headers (150)",
            post(
                &(0..150)
                    .map(|i| format!("X-H{i}: {i}\r\n"))
                    .collect::<String>(),
                "",
            )
            .into_bytes(),
            vec![refused(431)],
        ),
        Row::new(
            "oversize query under the URI limit (seg's query cap)",
            format!(
                "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
                &long_target[..6000]
            )
            .into_bytes(),
            vec![request(Length(0), "")],
        )
        .gateway(Refused(400)),
        Row::new(
            "head just over the 64 kB cap, in many headers",
            post(
                &(0..90)
                    .map(|i| format!("X-H{i}: {}\r\n", "b".repeat(740)))
                    .collect::<String>(),
                "",
            )
            .into_bytes(),
            vec![refused(431)],
        ),
        Row::new(
            "head under the 64 kB cap (60 kB header)",
            post(&format!("X-Pad: {}\r\n", "c".repeat(60_000)), "").into_bytes(),
            vec![request(Length(0), "")],
        ),
    ]);

    // Hop-by-hop nominations and protocol switches: seg refuses Upgrade and CONNECT after
    // the codec, and closes, so no byte after such a head is read.
    let h2c = post(
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n",
        "",
    );
    let connect = "CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n";
    rows.extend([
        Row::new(
            "Connection naming the identity header and X-Forwarded-For",
            post(
                "Connection: keep-alive, X-Seg-User, X-Remote-User, X-Forwarded-For, X-Forwarded-Proto\r\n",
                "",
            )
            .into_bytes(),
            vec![request(Length(0), "")],
        ),
        Row::new(
            "Connection naming Content-Length and Host",
            post("Connection: Content-Length, Host\r\n", "hello").into_bytes(),
            vec![request(Length(5), "hello")],
        ),
        Row::new(
            "Connection naming Transfer-Encoding on a chunked body",
            post_framed(
                "Transfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n",
                HELLO_CHUNKED,
            ),
            vec![request(Chunked, "hello world")],
        ),
        Row::new(
            "Upgrade: h2c with HTTP2-Settings",
            h2c.clone().into_bytes(),
            vec![request(Length(0), "")],
        )
        .gateway(Rejected(400)),
        Row::new(
            "Upgrade: websocket",
            post(
                "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
                "",
            )
            .into_bytes(),
            vec![request(Length(0), "")],
        )
        .gateway(Rejected(400)),
        Row::new(
            "Upgrade: h2c followed at once by the HTTP/2 preface",
            format!(
                "{h2c}PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n{}",
                post("", "after the preface")
            )
            .into_bytes(),
            vec![request(Length(0), ""), Read::Refused(None)],
        )
        .gateway(Rejected(400)),
        Row::new(
            "HTTP/2 prior-knowledge preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            // Dropped without an answer, as hyper dropped it.
            vec![Read::Refused(None)],
        ),
        Row::new(
            "CONNECT host:443",
            connect.as_bytes().to_vec(),
            vec![request(Empty, "")],
        )
        // Authority form is no canonical path.
        .gateway(Rejected(400)),
        Row::new(
            "CONNECT followed at once by tunnel bytes that look like a request",
            format!("{connect}{}", post("", "tunnel")).into_bytes(),
            vec![request(Empty, ""), request(Length(6), "tunnel")],
        )
        .gateway(Rejected(400)),
    ]);

    // Targets, versions and methods.
    rows.extend([
        Row::new(
            "absolute-form target naming another host",
            raw("POST http://evil.example{T} HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n"),
            vec![request(Length(0), "")],
        )
        // An upstream (IIS) routes an absolute-form target by its host: not canonical.
        .gateway(Refused(400)),
        Row::new(
            "absolute-form target with userinfo",
            raw(&format!(
                "POST http://{SPOOF}@evil.example{{T}} HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n"
            )),
            vec![request(Length(0), "")],
        )
        // RFC 9110 §4.2.4 would have userinfo treated as an error; absolute form is not
        // canonical, so nothing reaches the upstream.
        .gateway(Refused(400)),
        // RFC 9112 §3.2 asks for 400 in the next two; seg replaces Host with the upstream's,
        // so the upstream sees exactly one, its own (checked for every forwarded request).
        Row::new(
            "two Host headers",
            raw("POST {T} HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n"),
            vec![request(Length(0), "")],
        ),
        Row::new(
            "HTTP/1.1 without Host",
            raw("POST {T} HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            vec![request(Length(0), "")],
        ),
        Row::new(
            "HTTP/1.0 without Host",
            raw("POST {T} HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello"),
            vec![closing(Length(5), "hello")],
        ),
        Row::new(
            "HTTP/1.0 keep-alive, pipelined twice",
            raw("POST {T} HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhelloPOST {T} HTTP/1.0\r\nContent-Length: 5\r\n\r\nworld"),
            vec![request(Length(5), "hello"), closing(Length(5), "world")],
        ),
        Row::new(
            "HTTP/0.9-style request line",
            raw("GET {T}\r\n\r\n"),
            vec![refused(400)],
        ),
        Row::new(
            "HTTP/1.2",
            raw("POST {T} HTTP/1.2\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
            vec![refused(400)],
        ),
        Row::new(
            "two spaces in the request line",
            raw("POST  {T} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
            vec![refused(400)],
        ),
        Row::new(
            "lower-case method",
            raw("post {T} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
            vec![request(Length(0), "")],
        )
        .gateway(Refused(405)),
        Row::new(
            "CRLF injected into the query, percent-encoded",
            raw(&format!(
                "POST {{T}}%0d%0aX-Remote-User:%20{SPOOF} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
            )),
            vec![request(Length(0), "")],
        )
        .gateway(Refused(400)),
        Row::new(
            "asterisk-form target",
            raw("OPTIONS * HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
            vec![request(Length(0), "")],
        )
        .gateway(Refused(400)),
    ]);

    // Pipelining.
    rows.extend([
        Row::new(
            "pipelined: two requests in one write",
            format!("{honest}{world}").into_bytes(),
            vec![request(Length(5), "hello"), request(Length(5), "world")],
        ),
        Row::new(
            "pipelined: ten requests in one write",
            honest.repeat(10).into_bytes(),
            (0..10).map(|_| request(Length(5), "hello")).collect(),
        ),
        Row::new(
            "pipelined: refused GET, then an honest POST",
            format!("GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n{honest}", sync()).into_bytes(),
            vec![request(Empty, ""), request(Length(5), "hello")],
        )
        .gateway(Sequence {
            statuses: vec![405, 200],
            forwarded: 1,
            closes: false,
        }),
        Row::new(
            "pipelined: honest POST, then a malformed one",
            format!(
                "{honest}POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
                sync()
            )
            .into_bytes(),
            vec![request(Length(5), "hello"), refused(400)],
        ),
        Row::new(
            "pipelined: second request spoofing the identity",
            format!(
                "{honest}{}",
                post(&format!("X-Remote-User: {SPOOF}\r\n"), "world")
            )
            .into_bytes(),
            vec![request(Length(5), "hello"), request(Length(5), "world")],
        ),
    ]);

    // Expect: 100-continue.
    rows.extend([
        Row::stepped(
            "Expect: 100-continue, body after the interim response",
            vec![
                Step::Send(post_framed(
                    "Expect: 100-continue\r\nContent-Length: 5\r\n",
                    "",
                )),
                Step::AwaitContinue,
                Step::Send(b"hello".to_vec()),
            ],
            vec![continuing(Length(5), "hello")],
        ),
        Row::new(
            "Expect: 100-continue, body sent at once",
            post("Expect: 100-continue\r\n", "hello").into_bytes(),
            vec![continuing(Length(5), "hello")],
        ),
        Row::stepped(
            "Expect: 100-continue on a refused request",
            vec![
                Step::Send(raw(
                    "GET {T} HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
                )),
                Step::Pause(Duration::from_millis(200)),
                Step::Send(b"hello".to_vec()),
            ],
            vec![continuing(Length(5), "hello")],
        )
        // Refused before its body was asked for, so where it ends is not certain: closed.
        .gateway(Sequence {
            statuses: vec![405],
            forwarded: 0,
            closes: true,
        }),
        Row::new(
            "Expect: an unknown expectation",
            post("Expect: 200-ok\r\n", "hello").into_bytes(),
            vec![request(Length(5), "hello")],
        ),
    ]);

    // Framing header names spelled with `_` frame nothing, and seg removes them: an upstream
    // that folds `_` to `-` would otherwise frame the body differently from seg on a pooled
    // connection other users share.
    rows.extend([
        Row::new(
            "Transfer_Encoding: chunked beside Content-Length",
            post("Transfer_Encoding: chunked\r\n", "0\r\n\r\n").into_bytes(),
            vec![request(Length(5), "0\r\n\r\n")],
        ),
        Row::new(
            "Content_Length beside a chunked body",
            post_framed(
                "Transfer-Encoding: chunked\r\nContent_Length: 0\r\n",
                HELLO_CHUNKED,
            ),
            vec![request(Chunked, "hello world")],
        ),
    ]);

    // Robustness: framing must not depend on how the bytes are cut.
    rows.extend([
        Row::stepped(
            "pipelined pair written one byte per TLS record",
            format!("{honest}{world}")
                .bytes()
                .map(|b| Step::Send(vec![b]))
                .collect(),
            vec![request(Length(5), "hello"), request(Length(5), "world")],
        ),
        Row::new(
            "pipelined after Connection: close (never read)",
            format!("{}{honest}", post("Connection: close\r\n", "first")).into_bytes(),
            vec![closing(Length(5), "first")],
        )
        .unread(honest.len()),
        Row::new(
            "chunk size: leading zeros",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                "000000000000000000005\r\nhello\r\n0\r\n\r\n",
            ),
            vec![request(Chunked, "hello")],
        ),
        Row::new(
            "chunk size: trailing whitespace",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                "5 \t\r\nhello\r\n0\r\n\r\n",
            ),
            vec![request(Chunked, "hello")],
        ),
        Row::new(
            "trailer line without a colon",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\nX-Remote-User\r\n\r\n",
            ),
            vec![Read::BrokenBody(BodyError::Trailer(b'\r'))],
        ),
        Row::new(
            "trailer with obs-fold",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                &format!("5\r\nhello\r\n0\r\nX-Note: a\r\n X-Remote-User: {SPOOF}\r\n\r\n"),
            ),
            vec![Read::BrokenBody(BodyError::Trailer(b' '))],
        ),
    ]);

    // Identity spoofing in every spelling: ordinary fields to the codec, which the gateway's
    // hygiene removes.
    let spoofs: String = [
        "X-Remote-User",
        "x-remote-user",
        "X-REMOTE-USER",
        "X_Remote_User",
        "x_remote-user",
        "X-Seg-User",
        "x_seg_user",
        "X-SEG-USER",
        "X-Mailbox-Owner",
        "x_mailbox_owner",
        "Remote-User",
        "Remote_User",
        "X-Forwarded-User",
        "X-Authenticated-User",
        "X-Forwarded-Client-Cert",
        "x_forwarded_client_cert",
        "Client-Cert",
        "Client-Cert-Chain",
        "X-Client-Cert",
        "X-SSL-Client-Cert",
        "X-SSL-Client-S-DN",
        "X-WebObjects-Remote-User",
        "x_webobjects_remote_user",
        "X-Forwarded-Host",
        "X-Real-IP",
        "Forwarded",
    ]
    .iter()
    .map(|name| format!("{name}: {SPOOF}\r\n"))
    .collect();
    rows.extend([
        Row::new(
            "identity spoofed in every spelling",
            post(&spoofs, "").into_bytes(),
            vec![request(Length(0), "")],
        ),
        Row::new(
            "identity spoofed twice, before and after other headers",
            post(
                &format!("X-Seg-User: {SPOOF}\r\nUser-Agent: Apple-iPhone/1\r\nX-Seg-User: {SPOOF}\r\nX-Remote-User: {SPOOF}\r\n"),
                "",
            )
            .into_bytes(),
            vec![request(Length(0), "")],
        ),
        Row::new(
            "Authorization and forwarding headers",
            post(
                &format!("Authorization: Basic Y2VvOng=\r\nX-Forwarded-For: 10.6.6.6\r\nX-Forwarded-Proto: http\r\nForwarded: for=10.6.6.6;by={SPOOF}\r\nProxy-Authorization: Basic Y2VvOng=\r\n"),
                "",
            )
            .into_bytes(),
            vec![request(Length(0), "")],
        ),
        Row::new(
            "identity header with an empty value and with tabs",
            post(&format!("X-Seg-User:\r\nX-Remote-User:\t{SPOOF}\t\r\n"), "").into_bytes(),
            vec![request(Length(0), "")],
        ),
    ]);
    rows
}
