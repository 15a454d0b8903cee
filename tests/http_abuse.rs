//! The HTTP abuse corpus (issue #8, item 2): hostile HTTP/1.1 messages, each written as raw
//! bytes over a real TLS connection that presents an admitted device's certificate, to one
//! running seg in front of a real slapd (LDAPS) and an upstream that records every byte.
//!
//! Every row must end in one of two ways: a 4xx and a closed connection with not one byte
//! of the message at the upstream, or exactly the requests the client honestly meant, each
//! well framed, each carrying exactly one identity header with seg's mapped identity and no
//! client-supplied identity, forwarding, hop-by-hop or trailer-borne header. Each row names
//! its expected outcome (`Expect`), so a change in behaviour fails the row, and the report
//! names every failing row. Two narrower outcomes are allowed where the strict one cannot
//! apply, each said in its row: a well-framed request seg refuses itself (route, method,
//! query) keeps its connection open, because where it ended is certain; and a body that
//! breaks its chunked framing after the head may have had its head and first chunks streamed
//! upstream, never a complete request, on an upstream connection seg then closes.
//!
//! The upstream is a raw TCP recorder written here rather than the hyper-based echo of
//! `src/echo.rs`: hyper would itself decide where one request ends, so an echo counting
//! "requests" would share seg's own parser's view of the bytes. The recorder keeps every
//! byte of every connection and frames requests itself, strictly (one Content-Length of
//! digits, or exactly `Transfer-Encoding: chunked`, CRLF only, no obs-fold, no chunk
//! extensions), so "never two requests from one message" and "nothing of a refused message"
//! are checked on the wire. It runs in process because no real server records raw bytes on
//! demand.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use seg::demo::pki::LeafSpec;
use support::lab::{config_text, eas_target, start_seg, start_slapd, Client, DirectoryRef, Pki};
use support::slapd::UserSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// The identity header seg is configured to set; `X-Remote-User` stays in the built-in
/// strip list, so both names are spoofed below.
const IDENTITY_HEADER: &str = "x-seg-user";
const STRIP_EXTRA: &str = "X-Mailbox-Owner";
const ALICE: &str = "alice@corp.test";
/// Every spoofed identity in the corpus names this account; it must never appear in a head
/// or trailer the upstream receives.
const SPOOF: &str = "ceo@corp.test";

/// How long a kept-alive connection must stay quiet after its last expected response.
const QUIET: Duration = Duration::from_millis(400);
/// How long a connection that should close gets to do so after its last response.
const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// The longest a row may take.
const ROW_LIMIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// The raw recording upstream.

/// One request the recorder framed itself.
#[derive(Debug, Clone)]
struct WireRequest {
    connection: usize,
    head: Vec<u8>,
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl WireRequest {
    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

#[derive(Default)]
struct WireConnection {
    bytes: Vec<u8>,
    framed_to: usize,
    error: Option<String>,
    /// seg closed it.
    ended: bool,
}

#[derive(Default)]
struct Wire {
    connections: Vec<WireConnection>,
    requests: Vec<WireRequest>,
}

/// Where the recorder stood before a row.
struct WireMark {
    lengths: Vec<usize>,
    requests: usize,
}

/// What the upstream received during one row.
struct WireDelta {
    new_bytes: usize,
    requests: Vec<WireRequest>,
    /// Bytes that do not (yet) make a complete request, per connection that grew, and
    /// whether seg has closed that connection.
    unframed: Vec<(usize, Vec<u8>, bool)>,
    errors: Vec<(usize, String)>,
}

struct RawUpstream {
    addr: SocketAddr,
    wire: Arc<Mutex<Wire>>,
    task: JoinHandle<()>,
}

/// The recorder's one answer to every request it frames.
const ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nrecorded\n";

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let wire = Arc::new(Mutex::new(Wire::default()));
        let accepted = Arc::clone(&wire);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let id = {
                    let mut wire = accepted.lock().expect("wire");
                    wire.connections.push(WireConnection::default());
                    wire.connections.len() - 1
                };
                tokio::spawn(record(tcp, id, Arc::clone(&accepted)));
            }
        });
        RawUpstream { addr, wire, task }
    }

    fn mark(&self) -> WireMark {
        let wire = self.wire.lock().expect("wire");
        WireMark {
            lengths: wire.connections.iter().map(|c| c.bytes.len()).collect(),
            requests: wire.requests.len(),
        }
    }

    fn since(&self, mark: &WireMark) -> WireDelta {
        let wire = self.wire.lock().expect("wire");
        let mut delta = WireDelta {
            new_bytes: 0,
            requests: wire.requests[mark.requests..].to_vec(),
            unframed: Vec::new(),
            errors: Vec::new(),
        };
        for (id, connection) in wire.connections.iter().enumerate() {
            let before = mark.lengths.get(id).copied().unwrap_or(0);
            if connection.bytes.len() == before {
                continue;
            }
            delta.new_bytes += connection.bytes.len() - before;
            if connection.framed_to < connection.bytes.len() {
                let rest = connection.bytes[connection.framed_to..].to_vec();
                delta.unframed.push((id, rest, connection.ended));
            }
            if let Some(e) = &connection.error {
                delta.errors.push((id, e.clone()));
            }
        }
        delta
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Logs every byte of one upstream connection and answers each request it can frame; a
/// message it cannot frame strictly is recorded as an error and the connection closed.
async fn record(mut tcp: TcpStream, id: usize, wire: Arc<Mutex<Wire>>) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = tcp.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            wire.lock().expect("wire").connections[id].ended = true;
            return;
        }
        let (answers, broken) = {
            let mut wire = wire.lock().expect("wire");
            let Wire {
                connections,
                requests,
            } = &mut *wire;
            let connection = &mut connections[id];
            connection.bytes.extend_from_slice(&chunk[..n]);
            let mut answers = 0;
            while connection.error.is_none() {
                match frame_request(&connection.bytes[connection.framed_to..]) {
                    Ok(Some((mut request, used))) => {
                        request.connection = id;
                        connection.framed_to += used;
                        requests.push(request);
                        answers += 1;
                    }
                    Ok(None) => break,
                    Err(e) => connection.error = Some(e),
                }
            }
            (answers, connection.error.is_some())
        };
        for _ in 0..answers {
            if tcp.write_all(ANSWER).await.is_err() {
                return;
            }
        }
        if broken {
            return;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One strict field line: token, colon, OWS, value without control bytes, OWS.
fn field_line(line: &[u8]) -> Result<(String, String), String> {
    let show = || String::from_utf8_lossy(line).into_owned();
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return Err(format!("obs-fold line {:?}", show()));
    }
    let colon = line
        .iter()
        .position(|b| *b == b':')
        .ok_or_else(|| format!("field line without a colon {:?}", show()))?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
        return Err(format!("bad field name in {:?}", show()));
    }
    let value = line[colon + 1..].trim_ascii();
    if value
        .iter()
        .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
    {
        return Err(format!("control byte in field value {:?}", show()));
    }
    Ok((
        String::from_utf8_lossy(name).into_owned(),
        String::from_utf8_lossy(value).into_owned(),
    ))
}

/// Frames one request at the start of `buf`: `Ok(None)` while incomplete, the request and
/// the bytes it used, or why the bytes are not a well-framed HTTP/1.1 request.
fn frame_request(buf: &[u8]) -> Result<Option<(WireRequest, usize)>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > 1 << 20 {
            Err("no end of head within 1 MiB".into())
        } else {
            Ok(None)
        };
    };
    let head = &buf[..head_end];
    let mut parsed = Vec::new();
    let mut rest = head;
    loop {
        let (line, next) = match find(rest, b"\r\n") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        if line.contains(&b'\r') || line.contains(&b'\n') {
            return Err("bare CR or LF in head".into());
        }
        parsed.push(line);
        match next {
            Some(next) => rest = next,
            None => break,
        }
    }
    let request_line = String::from_utf8_lossy(parsed[0]).into_owned();
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(format!("bad request line {request_line:?}"));
    };
    if method.is_empty()
        || !method.bytes().all(is_tchar)
        || target.is_empty()
        || !target.bytes().all(|b| b.is_ascii_graphic())
        || version != "HTTP/1.1"
    {
        return Err(format!("bad request line {request_line:?}"));
    }
    let mut headers = Vec::new();
    for line in &parsed[1..] {
        headers.push(field_line(line)?);
    }
    let values = |name: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    };
    let lengths = values("content-length");
    let codings = values("transfer-encoding");
    let start = head_end + 4;
    let (body, trailers, end) = if !codings.is_empty() {
        if !lengths.is_empty() {
            return Err("both Content-Length and Transfer-Encoding".into());
        }
        if codings.len() != 1 || !codings[0].eq_ignore_ascii_case("chunked") {
            return Err(format!("Transfer-Encoding {codings:?}"));
        }
        match dechunk(buf, start)? {
            Some(done) => done,
            None => return Ok(None),
        }
    } else {
        let length = match lengths.as_slice() {
            [] => 0,
            [one]
                if !one.is_empty() && one.len() < 19 && one.bytes().all(|b| b.is_ascii_digit()) =>
            {
                one.parse::<usize>().map_err(|e| e.to_string())?
            }
            more => return Err(format!("Content-Length {more:?}")),
        };
        if buf.len() < start + length {
            return Ok(None);
        }
        (
            buf[start..start + length].to_vec(),
            Vec::new(),
            start + length,
        )
    };
    Ok(Some((
        WireRequest {
            connection: 0,
            head: head.to_vec(),
            method: method.to_string(),
            target: target.to_string(),
            headers,
            body,
            trailers,
        },
        end,
    )))
}

type Dechunked = (Vec<u8>, Vec<(String, String)>, usize);

/// Decodes a chunked body from `start`: hex sizes only (no extensions), CRLF everywhere.
fn dechunk(buf: &[u8], start: usize) -> Result<Option<Dechunked>, String> {
    let mut pos = start;
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(&buf[pos..], b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[pos..pos + line_end];
        if line.is_empty() || line.len() > 15 || !line.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!(
                "bad chunk-size line {:?}",
                String::from_utf8_lossy(line)
            ));
        }
        let size =
            usize::from_str_radix(&String::from_utf8_lossy(line), 16).map_err(|e| e.to_string())?;
        pos += line_end + 2;
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some(end) = find(&buf[pos..], b"\r\n") else {
                    return Ok(None);
                };
                let line = &buf[pos..pos + end];
                pos += end + 2;
                if line.is_empty() {
                    return Ok(Some((body, trailers, pos)));
                }
                trailers.push(field_line(line)?);
            }
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size;
        if &buf[pos..pos + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        pos += 2;
    }
}

// ---------------------------------------------------------------------------------------
// The device side.

/// One response as the device read it.
#[derive(Debug)]
struct DeviceResponse {
    status: u16,
}

/// Every complete response at the start of `buf` (a response without length counts once
/// the connection has ended).
fn device_responses(buf: &[u8], ended: bool) -> Vec<DeviceResponse> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(head_end) = find(&buf[pos..], b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[pos..pos + head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let Some(status) = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse::<u16>().ok())
        else {
            break;
        };
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let start = pos + head_end + 4;
        let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let end = if (100..200).contains(&status) || status == 204 || status == 304 {
            start
        } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            match dechunk(buf, start) {
                Ok(Some((_, _, end))) => end,
                _ => break,
            }
        } else if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok())
        {
            if buf.len() < start + length {
                break;
            }
            start + length
        } else if ended {
            buf.len()
        } else {
            break;
        };
        out.push(DeviceResponse { status });
        pos = end;
    }
    out
}

/// One thing the device does.
enum Step {
    Send(Vec<u8>),
    Pause(Duration),
    /// Waits for an interim (1xx) response before the next step.
    AwaitContinue,
}

/// What a row must lead to.
#[derive(Debug, Clone)]
enum Expect {
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
    fn statuses(&self) -> Vec<u16> {
        match self {
            Expect::Rejected(status)
            | Expect::RejectedMidBody(status)
            | Expect::Refused(status) => vec![*status],
            Expect::Dropped => Vec::new(),
            Expect::Forwarded(n) | Expect::ForwardedThenClosed(n) => vec![200; *n],
            Expect::Sequence { statuses, .. } => statuses.clone(),
        }
    }

    fn forwarded(&self) -> usize {
        match self {
            Expect::Rejected(_)
            | Expect::RejectedMidBody(_)
            | Expect::Refused(_)
            | Expect::Dropped => 0,
            Expect::Forwarded(n) | Expect::ForwardedThenClosed(n) => *n,
            Expect::Sequence { forwarded, .. } => *forwarded,
        }
    }

    fn closes(&self) -> bool {
        match self {
            Expect::Rejected(_)
            | Expect::RejectedMidBody(_)
            | Expect::Dropped
            | Expect::ForwardedThenClosed(_) => true,
            Expect::Forwarded(_) | Expect::Refused(_) => false,
            Expect::Sequence { closes, .. } => *closes,
        }
    }

    fn label(&self) -> String {
        match self {
            Expect::Rejected(status) => format!("rejected {status}"),
            Expect::RejectedMidBody(status) => format!("rejected {status} mid-body"),
            Expect::Refused(status) => format!("refused {status}, kept open"),
            Expect::Dropped => "dropped".to_string(),
            Expect::Forwarded(n) => format!("forwarded {n}"),
            Expect::ForwardedThenClosed(n) => format!("forwarded {n}, closed"),
            Expect::Sequence {
                statuses,
                forwarded,
                closes,
            } => format!(
                "statuses {statuses:?}, forwarded {forwarded}{}",
                if *closes { ", closed" } else { "" }
            ),
        }
    }
}

struct Row {
    name: String,
    steps: Vec<Step>,
    expect: Expect,
    /// The bodies the upstream must receive, in order (when the row says).
    bodies: Option<Vec<Vec<u8>>>,
}

impl Row {
    fn new(name: &str, bytes: Vec<u8>, expect: Expect) -> Row {
        Row {
            name: name.to_string(),
            steps: vec![Step::Send(bytes)],
            expect,
            bodies: None,
        }
    }

    fn stepped(name: &str, steps: Vec<Step>, expect: Expect) -> Row {
        Row {
            name: name.to_string(),
            steps,
            expect,
            bodies: None,
        }
    }

    fn bodies(mut self, bodies: &[&str]) -> Row {
        self.bodies = Some(bodies.iter().map(|b| b.as_bytes().to_vec()).collect());
        self
    }
}

/// What one row did, for the report.
struct RowResult {
    statuses: Vec<u16>,
    forwarded: usize,
    closed: bool,
    elapsed: Duration,
}

fn target() -> String {
    eas_target("Sync", "alice")
}

/// `{T}` becomes the ActiveSync target.
fn raw(text: &str) -> Vec<u8> {
    text.replace("{T}", &target()).into_bytes()
}

/// An honest POST with extra header lines (each ending in CRLF) and a body.
fn post(extra: &str, body: &str) -> String {
    format!(
        "POST {} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        target(),
        body.len()
    )
}

/// A POST whose framing headers are given whole, followed by `rest` verbatim.
fn post_framed(framing: &str, rest: &str) -> Vec<u8> {
    raw(&format!(
        "POST {{T}} HTTP/1.1\r\nHost: localhost\r\n{framing}\r\n{rest}"
    ))
}

/// A request a front end would not see, hidden where seg must treat it as body bytes.
fn smuggled() -> String {
    format!(
        "POST {} HTTP/1.1\r\nHost: localhost\r\nX-Remote-User: {SPOOF}\r\n{IDENTITY_HEADER}: {SPOOF}\r\nContent-Length: 0\r\n\r\n",
        eas_target("SendMail", "ceo")
    )
}

fn table() -> Vec<Row> {
    use Expect::*;
    let hello_chunked = "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let smuggle = smuggled();
    let mut rows = vec![
        // Controls: the table can tell forwarding from refusal.
        Row::new(
            "control: honest POST",
            post("", "hello").into_bytes(),
            Forwarded(1),
        )
        .bodies(&["hello"]),
        Row::new(
            "control: honest chunked POST",
            post_framed("Transfer-Encoding: chunked\r\n", hello_chunked),
            Forwarded(1),
        )
        .bodies(&["hello world"]),
        Row::new(
            "control: Connection: close",
            post("Connection: close\r\n", "hi").into_bytes(),
            ForwardedThenClosed(1),
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
            ForwardedThenClosed(1),
        )
        .bodies(&[""]),
        Row::new(
            "TE.CL: TE then CL, smuggled request after the last chunk",
            post_framed(
                "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                &format!("0\r\n\r\n{smuggle}"),
            ),
            ForwardedThenClosed(1),
        )
        .bodies(&[""]),
        Row::new(
            "TE.CL: CL counting past the chunks",
            post_framed(
                &format!(
                    "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
                    hello_chunked.len() + smuggle.len()
                ),
                &format!("{hello_chunked}{smuggle}"),
            ),
            ForwardedThenClosed(1),
        )
        .bodies(&["hello world"]),
    ];
    // Transfer-Encoding spellings, alone and beside a Content-Length.
    let codings: [(&str, &str, Expect); 9] = [
        ("chunked, identity", "TE: chunked, identity", Rejected(400)),
        ("identity", "TE: identity", Rejected(400)),
        ("  chunked", "TE: leading spaces (OWS)", Forwarded(1)),
        (
            "Chunked",
            "TE: Chunked (codings are case-insensitive)",
            Forwarded(1),
        ),
        ("xchunked", "TE: xchunked", Rejected(400)),
        ("chunked\t", "TE: trailing tab (OWS)", Forwarded(1)),
        ("chunked;q=1", "TE: chunked with a parameter", Rejected(400)),
        ("\"chunked\"", "TE: quoted chunked", Rejected(400)),
        ("gzip, chunked", "TE: gzip, chunked", Forwarded(1)),
    ];
    for (coding, name, expect) in codings {
        rows.push(Row::new(
            name,
            post_framed(&format!("Transfer-Encoding: {coding}\r\n"), hello_chunked),
            expect.clone(),
        ));
        let with_length = match expect {
            Forwarded(n) => ForwardedThenClosed(n),
            other => other,
        };
        rows.push(Row::new(
            &format!("{name}, with Content-Length"),
            post_framed(
                &format!(
                    "Content-Length: {}\r\nTransfer-Encoding: {coding}\r\n",
                    hello_chunked.len()
                ),
                hello_chunked,
            ),
            with_length,
        ));
    }
    rows.extend([
        Row::new(
            "TE: obs-fold continuation",
            post_framed("Transfer-Encoding:\r\n chunked\r\n", hello_chunked),
            Rejected(400),
        ),
        Row::new(
            "TE: two lines, chunked then identity",
            post_framed(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                hello_chunked,
            ),
            Rejected(400),
        ),
        Row::new(
            "TE: two lines, identity then chunked",
            post_framed(
                "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
                hello_chunked,
            ),
            Forwarded(1),
        )
        .bodies(&["hello world"]),
        Row::new(
            "TE: chunked on HTTP/1.0",
            raw(&format!(
                "POST {{T}} HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n{hello_chunked}"
            )),
            Rejected(400),
        ),
        Row::new(
            "TE: chunked on a GET, with a smuggled request in the chunk",
            raw(&format!(
                "GET {{T}} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{smuggle}\r\n0\r\n\r\n",
                smuggle.len()
            )),
            Refused(405),
        ),
    ]);
    // Content-Length spellings.
    for (value, name, expect) in [
        (
            "5\r\nContent-Length: 5",
            "CL: duplicate, equal",
            Forwarded(1),
        ),
        (
            "5\r\nContent-Length: 6",
            "CL: duplicate, different",
            Rejected(400),
        ),
        ("5, 5", "CL: list in one line", Rejected(400)),
        ("+5", "CL: plus sign", Rejected(400)),
        ("-5", "CL: minus sign", Rejected(400)),
        ("0x5", "CL: hex", Rejected(400)),
        ("5.0", "CL: decimal point", Rejected(400)),
        ("   5", "CL: leading spaces (OWS)", Forwarded(1)),
        ("5 ", "CL: trailing space (OWS)", Forwarded(1)),
        ("05", "CL: leading zero", Forwarded(1)),
        ("", "CL: empty", Rejected(400)),
        ("5 5", "CL: two numbers", Rejected(400)),
        (
            "99999999999999999999999",
            "CL: overflowing u64",
            Rejected(400),
        ),
    ] {
        let mut row = Row::new(
            name,
            post_framed(&format!("Content-Length: {value}\r\n"), "hello"),
            expect.clone(),
        );
        if matches!(expect, Forwarded(_)) {
            row = row.bodies(&["hello"]);
        }
        rows.push(row);
    }
    rows.extend([
        Row::new(
            "CL: body longer than CL (the rest is a second, pipelined request)",
            post_framed("Content-Length: 5\r\n", &format!("hello{smuggle}")),
            Sequence {
                statuses: vec![200, 403],
                forwarded: 1,
                closes: false,
            },
        ),
        Row::new(
            "CL: absent on a POST with a body (the body is read as a request)",
            post_framed("", "hello\r\n\r\n"),
            Sequence {
                statuses: vec![200, 400],
                forwarded: 1,
                closes: true,
            },
        ),
        Row::new(
            "smuggled request inside a Content-Length body",
            post("Content-Type: application/vnd.ms-sync.wbxml\r\n", &smuggle).into_bytes(),
            Forwarded(1),
        )
        .bodies(&[&smuggle]),
        Row::new(
            "smuggled request inside a chunked body",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                &format!("{:x}\r\n{smuggle}\r\n0\r\n\r\n", smuggle.len()),
            ),
            Forwarded(1),
        )
        .bodies(&[&smuggle]),
    ]);
    // Chunked framing abuse; the head is already well formed, so these fail in the body.
    for (body, name) in [
        (
            "10000000000000005\r\nhello\r\n0\r\n\r\n",
            "chunk size: 17 hex digits (overflow)",
        ),
        (
            "ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            "chunk size: 18 f's (overflow)",
        ),
        ("0x5\r\nhello\r\n0\r\n\r\n", "chunk size: 0x prefix"),
        ("-5\r\nhello\r\n0\r\n\r\n", "chunk size: negative"),
        ("+5\r\nhello\r\n0\r\n\r\n", "chunk size: plus sign"),
        ("\r\nhello\r\n0\r\n\r\n", "chunk size: empty"),
        ("5\nhello\n0\n\n", "chunked: bare LF line endings"),
        ("5\rhello\r0\r\r", "chunked: bare CR line endings"),
        (
            "5\r\nhelloXX\r\n0\r\n\r\n",
            "chunked: data longer than its size",
        ),
        (
            "5\r\nhel\r\n0\r\n\r\n",
            "chunked: data shorter than its size",
        ),
    ] {
        rows.push(Row::new(
            name,
            post_framed("Transfer-Encoding: chunked\r\n", body),
            RejectedMidBody(400),
        ));
    }
    let long_extension = format!("5;{}\r\nhello\r\n0\r\n\r\n", "x".repeat(20_000));
    rows.extend([
        Row::new(
            "chunk extensions: name and quoted value (dropped)",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                "5;name=\"v;a=l\"\r\nhello\r\n0;last\r\n\r\n",
            ),
            Forwarded(1),
        )
        .bodies(&["hello"]),
        Row::new(
            "chunk extensions: 20 kB of extension",
            post_framed("Transfer-Encoding: chunked\r\n", &long_extension),
            RejectedMidBody(400),
        ),
        Row::new(
            "chunk extension carrying CRLF and a header",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                &format!("5;x\r\nX-Remote-User: {SPOOF}\r\nhello\r\n0\r\n\r\n"),
            ),
            RejectedMidBody(400),
        ),
    ]);
    // Trailers: never forwarded, whatever they claim.
    rows.extend([
        Row::new(
            "trailers: identity headers after a chunked body",
            post_framed(
                "Transfer-Encoding: chunked\r\nTrailer: X-Remote-User, X-Seg-User\r\n",
                &format!(
                    "5\r\nhello\r\n0\r\nX-Remote-User: {SPOOF}\r\n{IDENTITY_HEADER}: {SPOOF}\r\nX_Remote_User: {SPOOF}\r\nAuthorization: Basic Y2VvOng=\r\nX-Forwarded-For: 10.6.6.6\r\nX-Forwarded-Client-Cert: By={SPOOF}\r\n\r\n"
                ),
            ),
            Forwarded(1),
        )
        .bodies(&["hello"]),
        Row::new(
            "trailers: framing headers after a chunked body",
            post_framed(
                "Transfer-Encoding: chunked\r\nTE: trailers\r\n",
                "5\r\nhello\r\n0\r\nContent-Length: 999\r\nTransfer-Encoding: chunked\r\nHost: evil.example\r\n\r\n",
            ),
            Forwarded(1),
        )
        .bodies(&["hello"]),
    ]);
    // Line endings and field syntax in the head.
    rows.extend([
        Row::new(
            "bare LF line endings in the head",
            raw("POST {T} HTTP/1.1\nHost: localhost\nContent-Length: 5\n\nhello"),
            Forwarded(1),
        )
        .bodies(&["hello"]),
        Row::new(
            "bare LF inside a value, hiding an identity header",
            raw(&format!(
                "POST {{T}} HTTP/1.1\r\nHost: localhost\r\nX-Note: a\nX-Remote-User: {SPOOF}\r\nContent-Length: 0\r\n\r\n"
            )),
            Forwarded(1),
        ),
        Row::new(
            "bare CR line endings in the head",
            raw("POST {T} HTTP/1.1\rHost: localhost\rContent-Length: 0\r\r"),
            Rejected(400),
        ),
        Row::new(
            "CR inside a value",
            raw(&format!(
                "POST {{T}} HTTP/1.1\r\nHost: localhost\r\nX-Note: a\rX-Remote-User: {SPOOF}\r\nContent-Length: 0\r\n\r\n"
            )),
            Rejected(400),
        ),
        Row::new(
            "NUL inside a value",
            raw("POST {T} HTTP/1.1\r\nHost: localhost\r\nX-Note: a\0b\r\nContent-Length: 0\r\n\r\n"),
            Rejected(400),
        ),
        Row::new(
            "obs-fold header continuation",
            raw(&format!(
                "POST {{T}} HTTP/1.1\r\nHost: localhost\r\nX-Note: a\r\n X-Remote-User: {SPOOF}\r\nContent-Length: 0\r\n\r\n"
            )),
            Rejected(400),
        ),
        Row::new(
            "empty header name",
            raw("POST {T} HTTP/1.1\r\nHost: localhost\r\n: x\r\nContent-Length: 0\r\n\r\n"),
            Rejected(400),
        ),
        Row::new(
            "space before the colon of an identity header",
            raw(&format!(
                "POST {{T}} HTTP/1.1\r\nHost: localhost\r\nX-Remote-User : {SPOOF}\r\nContent-Length: 0\r\n\r\n"
            )),
            Rejected(400),
        ),
        Row::new(
            "space before the colon of Content-Length",
            raw("POST {T} HTTP/1.1\r\nHost: localhost\r\nContent-Length : 5\r\n\r\nhello"),
            Rejected(400),
        ),
        Row::new(
            "tab before the colon",
            raw("POST {T} HTTP/1.1\r\nHost: localhost\r\nContent-Length\t: 5\r\n\r\nhello"),
            Rejected(400),
        ),
        Row::new(
            "non-token byte in a header name",
            raw(&format!(
                "POST {{T}} HTTP/1.1\r\nHost: localhost\r\nX-Remote(User): {SPOOF}\r\nContent-Length: 0\r\n\r\n"
            )),
            Rejected(400),
        ),
        Row::new(
            "header line without a colon",
            raw("POST {T} HTTP/1.1\r\nHost: localhost\r\nX-Note\r\nContent-Length: 0\r\n\r\n"),
            Rejected(400),
        ),
        Row::new(
            "obs-text (high bytes) in a value",
            raw("POST {T} HTTP/1.1\r\nHost: localhost\r\nX-Note: caf\u{e9}\r\nContent-Length: 0\r\n\r\n"),
            Forwarded(1),
        ),
    ]);
    // Sizes.
    let long_target = format!("{}&Pad={}", target(), "a".repeat(70_000));
    let big_header = format!("X-Pad: {}\r\n", "a".repeat(450_000));
    let many_headers: String = (0..150).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    rows.extend([
        Row::new(
            "oversize request line (70 kB target)",
            format!("POST {long_target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
                .into_bytes(),
            // Past seg's 64 kB head cap before hyper's URI check (414) is reached.
            Rejected(431),
        ),
        Row::new(
            "oversize header block (450 kB header)",
            post(&big_header, "").into_bytes(),
            Rejected(431),
        ),
        Row::new(
            "too many headers (150)",
            post(&many_headers, "").into_bytes(),
            Rejected(431),
        ),
        Row::new(
            "oversize query under the URI limit (seg's query cap)",
            format!(
                "POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
                &long_target[..6000]
            )
            .into_bytes(),
            Refused(400),
        ),
        Row::new(
            "head just over the 64 kB cap, in many headers",
            post(
                &(0..90)
                    .map(|i| format!("X-H{i}: {}\r\n", "b".repeat(740)))
                    .collect::<String>(),
                "",
            )
            .into_bytes(),
            Rejected(431),
        ),
        Row::new(
            "head under the 64 kB cap (60 kB header)",
            post(&format!("X-Pad: {}\r\n", "c".repeat(60_000)), "").into_bytes(),
            Forwarded(1),
        ),
    ]);
    // Hop-by-hop nominations and protocol switches.
    rows.extend([
        Row::new(
            "Connection naming the identity header and X-Forwarded-For",
            post(
                "Connection: keep-alive, X-Seg-User, X-Remote-User, X-Forwarded-For, X-Forwarded-Proto\r\n",
                "",
            )
            .into_bytes(),
            Forwarded(1),
        ),
        Row::new(
            "Connection naming Content-Length and Host",
            post("Connection: Content-Length, Host\r\n", "hello").into_bytes(),
            Forwarded(1),
        )
        .bodies(&["hello"]),
        Row::new(
            "Connection naming Transfer-Encoding on a chunked body",
            post_framed(
                "Transfer-Encoding: chunked\r\nConnection: Transfer-Encoding\r\n",
                hello_chunked,
            ),
            Forwarded(1),
        )
        .bodies(&["hello world"]),
        Row::new(
            "Upgrade: h2c with HTTP2-Settings",
            post(
                "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n",
                "",
            )
            .into_bytes(),
            Rejected(400),
        ),
        Row::new(
            "Upgrade: websocket",
            post(
                "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
                "",
            )
            .into_bytes(),
            Rejected(400),
        ),
        Row::new(
            "Upgrade: h2c followed at once by the HTTP/2 preface",
            [
                post("Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n", "")
                    .into_bytes(),
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
                post("", "after the preface").into_bytes(),
            ]
            .concat(),
            Rejected(400),
        ),
        Row::new(
            "HTTP/2 prior-knowledge preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            // hyper drops a connection that opens with the HTTP/2 preface without answering.
            Dropped,
        ),
        Row::new(
            "CONNECT host:443",
            b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n".to_vec(),
            // Authority form is no canonical path (400), and the tunnel's bytes are never read.
            Rejected(400),
        ),
        Row::new(
            "CONNECT followed at once by tunnel bytes that look like a request",
            [
                b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n".to_vec(),
                post("", "tunnel").into_bytes(),
            ]
            .concat(),
            Rejected(400),
        ),
    ]);
    // Targets, versions and methods.
    rows.extend([
        Row::new(
            "absolute-form target naming another host",
            raw(&format!(
                "POST http://evil.example{} HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n",
                target()
            )),
            // An upstream (IIS) routes an absolute-form target by its host: not canonical.
            Refused(400),
        ),
        Row::new(
            "absolute-form target with userinfo",
            raw(&format!(
                "POST http://{SPOOF}@evil.example{} HTTP/1.1\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n",
                target()
            )),
            // RFC 9110 §4.2.4 would have userinfo treated as an error; absolute form is not
            // canonical, so nothing reaches the upstream.
            Refused(400),
        ),
        Row::new(
            "two Host headers",
            raw("POST {T} HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\nContent-Length: 0\r\n\r\n"),
            // RFC 9112 §3.2 asks for 400 here and below; seg replaces Host with the upstream's,
            // so the upstream sees exactly one, its own (checked for every forwarded request).
            Forwarded(1),
        ),
        Row::new(
            "HTTP/1.1 without Host",
            raw("POST {T} HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Forwarded(1),
        ),
        Row::new(
            "HTTP/1.0 without Host",
            raw("POST {T} HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello"),
            ForwardedThenClosed(1),
        )
        .bodies(&["hello"]),
        Row::new(
            "HTTP/1.0 keep-alive, pipelined twice",
            raw("POST {T} HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 5\r\n\r\nhelloPOST {T} HTTP/1.0\r\nContent-Length: 5\r\n\r\nworld"),
            ForwardedThenClosed(2),
        )
        .bodies(&["hello", "world"]),
        Row::new(
            "HTTP/0.9-style request line",
            raw("GET {T}\r\n\r\n"),
            Rejected(400),
        ),
        Row::new(
            "HTTP/1.2",
            raw("POST {T} HTTP/1.2\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
            Rejected(400),
        ),
        Row::new(
            "two spaces in the request line",
            raw("POST  {T} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
            Rejected(400),
        ),
        Row::new(
            "lower-case method",
            raw("post {T} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
            Refused(405),
        ),
        Row::new(
            "CRLF injected into the query, percent-encoded",
            raw(&format!(
                "POST {{T}}%0d%0aX-Remote-User:%20{SPOOF} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
            )),
            Refused(400),
        ),
        Row::new(
            "asterisk-form target",
            raw("OPTIONS * HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
            Refused(400),
        ),
    ]);
    // Pipelining.
    let honest = post("", "hello");
    let many: String = (0..10).map(|_| honest.clone()).collect();
    rows.extend([
        Row::new(
            "pipelined: two requests in one write",
            format!("{honest}{}", post("", "world")).into_bytes(),
            Forwarded(2),
        )
        .bodies(&["hello", "world"]),
        Row::new(
            "pipelined: ten requests in one write",
            many.into_bytes(),
            Forwarded(10),
        ),
        Row::new(
            "pipelined: refused GET, then an honest POST",
            format!(
                "GET {} HTTP/1.1\r\nHost: localhost\r\n\r\n{honest}",
                target()
            )
            .into_bytes(),
            Sequence {
                statuses: vec![405, 200],
                forwarded: 1,
                closes: false,
            },
        ),
        Row::new(
            "pipelined: honest POST, then a malformed one",
            format!(
                "{honest}POST {} HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
                target()
            )
            .into_bytes(),
            Sequence {
                statuses: vec![200, 400],
                forwarded: 1,
                closes: true,
            },
        ),
        Row::new(
            "pipelined: second request spoofing the identity",
            format!(
                "{honest}{}",
                post(&format!("X-Remote-User: {SPOOF}\r\n"), "world")
            )
            .into_bytes(),
            Forwarded(2),
        ),
    ]);
    // Expect: 100-continue.
    rows.extend([
        Row::stepped(
            "Expect: 100-continue, body after the interim response",
            vec![
                Step::Send(post_framed("Expect: 100-continue\r\nContent-Length: 5\r\n", "")),
                Step::AwaitContinue,
                Step::Send(b"hello".to_vec()),
            ],
            Forwarded(1),
        )
        .bodies(&["hello"]),
        Row::new(
            "Expect: 100-continue, body sent at once",
            post("Expect: 100-continue\r\n", "hello").into_bytes(),
            Forwarded(1),
        )
        .bodies(&["hello"]),
        Row::stepped(
            "Expect: 100-continue on a refused request",
            vec![
                Step::Send(raw(
                    "GET {T} HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
                )),
                Step::Pause(Duration::from_millis(200)),
                Step::Send(b"hello".to_vec()),
            ],
            Sequence {
                statuses: vec![405],
                forwarded: 0,
                closes: true,
            },
        ),
        Row::new(
            "Expect: an unknown expectation",
            post("Expect: 200-ok\r\n", "hello").into_bytes(),
            Forwarded(1),
        )
        .bodies(&["hello"]),
    ]);
    // Framing header names spelled with `_`: hyper rightly frames by the real header, and
    // seg removes the look-alike: an upstream that folds `_` to `-` would otherwise frame
    // the body differently from seg on a pooled connection other users share.
    rows.extend([
        Row::new(
            "Transfer_Encoding: chunked beside Content-Length",
            post("Transfer_Encoding: chunked\r\n", "0\r\n\r\n").into_bytes(),
            Forwarded(1),
        )
        .bodies(&["0\r\n\r\n"]),
        Row::new(
            "Content_Length beside a chunked body",
            post_framed(
                "Transfer-Encoding: chunked\r\nContent_Length: 0\r\n",
                hello_chunked,
            ),
            Forwarded(1),
        )
        .bodies(&["hello world"]),
    ]);
    // Robustness: framing must not depend on how the bytes are cut.
    let pair = format!("{honest}{}", post("", "world"));
    rows.extend([
        Row::stepped(
            "pipelined pair written one byte per TLS record",
            pair.bytes().map(|b| Step::Send(vec![b])).collect(),
            Forwarded(2),
        )
        .bodies(&["hello", "world"]),
        Row::new(
            "pipelined after Connection: close (never read)",
            format!("{}{honest}", post("Connection: close\r\n", "first")).into_bytes(),
            ForwardedThenClosed(1),
        )
        .bodies(&["first"]),
        Row::new(
            "chunk size: leading zeros",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                "000000000000000000005\r\nhello\r\n0\r\n\r\n",
            ),
            Forwarded(1),
        )
        .bodies(&["hello"]),
        Row::new(
            "chunk size: trailing whitespace",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                "5 \t\r\nhello\r\n0\r\n\r\n",
            ),
            Forwarded(1),
        )
        .bodies(&["hello"]),
        Row::new(
            "trailer line without a colon",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\nX-Remote-User\r\n\r\n",
            ),
            RejectedMidBody(400),
        ),
        Row::new(
            "trailer with obs-fold",
            post_framed(
                "Transfer-Encoding: chunked\r\n",
                &format!("5\r\nhello\r\n0\r\nX-Note: a\r\n X-Remote-User: {SPOOF}\r\n\r\n"),
            ),
            RejectedMidBody(400),
        ),
    ]);
    // Identity spoofing in every spelling.
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
            Forwarded(1),
        ),
        Row::new(
            "identity spoofed twice, before and after other headers",
            post(
                &format!("X-Seg-User: {SPOOF}\r\nUser-Agent: Apple-iPhone/1\r\nX-Seg-User: {SPOOF}\r\nX-Remote-User: {SPOOF}\r\n"),
                "",
            )
            .into_bytes(),
            Forwarded(1),
        ),
        Row::new(
            "Authorization and forwarding headers",
            post(
                &format!("Authorization: Basic Y2VvOng=\r\nX-Forwarded-For: 10.6.6.6\r\nX-Forwarded-Proto: http\r\nForwarded: for=10.6.6.6;by={SPOOF}\r\nProxy-Authorization: Basic Y2VvOng=\r\n"),
                "",
            )
            .into_bytes(),
            Forwarded(1),
        ),
        Row::new(
            "identity header with an empty value and with tabs",
            post(&format!("X-Seg-User:\r\nX-Remote-User:\t{SPOOF}\t\r\n"), "")
                .into_bytes(),
            Forwarded(1),
        ),
    ]);
    rows
}

/// Sends one row on a fresh connection and checks it; the error names what went wrong.
async fn run_row(
    connector: &TlsConnector,
    addr: SocketAddr,
    upstream: &RawUpstream,
    row: Row,
) -> Result<RowResult, String> {
    let started = Instant::now();
    let mark = upstream.mark();
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").expect("name");
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let interim = Arc::new(Notify::new());
    let seen_interim = Arc::clone(&interim);
    let steps = row.steps;
    // The writer runs beside the reader: seg may answer (and close) before the last byte.
    let write = tokio::spawn(async move {
        for step in steps {
            match step {
                Step::Send(bytes) => {
                    if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                        break;
                    }
                }
                Step::Pause(pause) => tokio::time::sleep(pause).await,
                Step::AwaitContinue => {
                    let waited =
                        tokio::time::timeout(Duration::from_secs(5), seen_interim.notified());
                    if waited.await.is_err() {
                        return Err("no interim response before the body".to_string());
                    }
                }
            }
        }
        // Keep the write half (and so the connection) open until the row is read.
        Ok(writer)
    });
    let wanted = row.expect.statuses();
    let mut buffer = Vec::new();
    let mut closed = false;
    let mut read_error = None;
    let mut chunk = vec![0u8; 64 * 1024];
    let deadline = started + ROW_LIMIT;
    loop {
        let responses = device_responses(&buffer, false);
        if responses.iter().any(|r| (100..200).contains(&r.status)) {
            interim.notify_one();
        }
        let finals = responses.iter().filter(|r| r.status >= 200).count();
        let now = Instant::now();
        let wait = if finals >= wanted.len() {
            if row.expect.closes() {
                CLOSE_WAIT
            } else {
                QUIET
            }
        } else {
            deadline.saturating_duration_since(now)
        };
        match tokio::time::timeout(wait, reader.read(&mut chunk)).await {
            Err(_) => break,
            Ok(Ok(0)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buffer.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => {
                // A reset after the answer is a close too, but say so if the answer is lost.
                closed = true;
                read_error = Some(e.to_string());
                break;
            }
        }
    }
    let writer = write.abort_handle();
    let write_result = match tokio::time::timeout(Duration::from_millis(100), write).await {
        Ok(Ok(result)) => result.map(drop),
        _ => {
            writer.abort();
            Ok(())
        }
    };
    drop(reader);
    // Anything seg would still send upstream for this row arrives within this pause.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let delta = upstream.since(&mark);
    let statuses: Vec<u16> = device_responses(&buffer, closed)
        .iter()
        .map(|r| r.status)
        .filter(|s| *s >= 200)
        .collect();
    let result = RowResult {
        statuses: statuses.clone(),
        forwarded: delta.requests.len(),
        closed,
        elapsed: started.elapsed(),
    };
    let mut problems = Vec::new();
    if let Err(e) = write_result {
        problems.push(e);
    }
    if statuses != wanted {
        problems.push(format!(
            "device saw statuses {statuses:?}, expected {wanted:?}{}; raw: {:?}",
            read_error
                .as_ref()
                .map(|e| format!(" (read error: {e})"))
                .unwrap_or_default(),
            String::from_utf8_lossy(&buffer[..buffer.len().min(600)])
        ));
    }
    if closed != row.expect.closes() {
        problems.push(if closed {
            format!(
                "connection closed, expected it to stay open{}",
                read_error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        } else {
            "connection left open, expected seg to close it".to_string()
        });
    }
    if delta.requests.len() != row.expect.forwarded() {
        problems.push(format!(
            "upstream framed {} requests, expected {}",
            delta.requests.len(),
            row.expect.forwarded()
        ));
    }
    let mid_body = matches!(row.expect, Expect::RejectedMidBody(_));
    if row.expect.forwarded() == 0 && delta.new_bytes > 0 && !mid_body {
        problems.push(format!(
            "{} bytes of a refused message reached the upstream",
            delta.new_bytes
        ));
    }
    for (connection, rest, ended) in &delta.unframed {
        if mid_body && *ended {
            // The streamed start of a body that then broke; the upstream saw it cut off.
            continue;
        }
        problems.push(format!(
            "upstream connection {connection} holds {} bytes that are no complete request: {:?}",
            rest.len(),
            String::from_utf8_lossy(&rest[..rest.len().min(300)])
        ));
    }
    for (connection, error) in &delta.errors {
        problems.push(format!(
            "upstream connection {connection} is not well framed: {error}"
        ));
    }
    for request in &delta.requests {
        problems.extend(check_forwarded(request));
    }
    if let Some(bodies) = &row.bodies {
        let seen: Vec<&[u8]> = delta.requests.iter().map(|r| r.body.as_slice()).collect();
        let wanted: Vec<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
        if seen != wanted {
            problems.push(format!(
                "upstream bodies {:?}, expected {:?}",
                seen.iter()
                    .map(|b| String::from_utf8_lossy(b))
                    .collect::<Vec<_>>(),
                wanted
                    .iter()
                    .map(|b| String::from_utf8_lossy(b))
                    .collect::<Vec<_>>()
            ));
        }
    }
    if problems.is_empty() {
        Ok(result)
    } else {
        Err(format!(
            "{} (saw statuses {:?}, {} forwarded, {}): {}",
            row.expect.label(),
            result.statuses,
            result.forwarded,
            if closed { "closed" } else { "open" },
            problems.join("; ")
        ))
    }
}

/// Header names (folded: lower case, `_` as `-`) no client may get to the upstream.
const CLIENT_IDENTITY: [&str; 22] = [
    "authorization",
    "proxy-authorization",
    "x-remote-user",
    "remote-user",
    "x-forwarded-user",
    "x-authenticated-user",
    "x-forwarded-client-cert",
    "client-cert",
    "client-cert-chain",
    "x-client-cert",
    "x-ssl-client-cert",
    "x-ssl-client-s-dn",
    "x-webobjects-remote-user",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
    "x-mailbox-owner",
    "connection",
    "upgrade",
    "http2-settings",
    "te",
    "trailer",
];

/// Framing and routing header names; a spelling with `_` for `-` is one an upstream that
/// folds underscores (as CGI-style servers do) would read as the real header.
const FRAMING: [&str; 8] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// What every forwarded request must look like at the upstream; the problems found.
fn check_forwarded(request: &WireRequest) -> Vec<String> {
    let mut problems = Vec::new();
    let at = format!("upstream request on connection {}", request.connection);
    let identity = request.values(IDENTITY_HEADER);
    if identity != [ALICE] {
        problems.push(format!("{at}: {IDENTITY_HEADER} is {identity:?}"));
    }
    for name in request.headers.iter().map(|(n, _)| n) {
        let folded = name.to_ascii_lowercase().replace('_', "-");
        if folded == IDENTITY_HEADER && name.as_str() != IDENTITY_HEADER {
            problems.push(format!(
                "{at}: a second spelling of the identity header {name:?}"
            ));
        }
        if CLIENT_IDENTITY.contains(&folded.as_str()) {
            problems.push(format!("{at}: header {name:?} reached the upstream"));
        }
        if name.contains('_') && FRAMING.contains(&folded.as_str()) {
            problems.push(format!(
                "{at}: framing look-alike {name:?} reached the upstream"
            ));
        }
    }
    if request.values("x-forwarded-for") != ["127.0.0.1"] {
        problems.push(format!(
            "{at}: X-Forwarded-For {:?}",
            request.values("x-forwarded-for")
        ));
    }
    if request.values("x-forwarded-proto") != ["https"] {
        problems.push(format!(
            "{at}: X-Forwarded-Proto {:?}",
            request.values("x-forwarded-proto")
        ));
    }
    if request.values("host").len() != 1 || request.values("host")[0].contains("evil") {
        problems.push(format!("{at}: Host {:?}", request.values("host")));
    }
    if !request.trailers.is_empty() {
        problems.push(format!("{at}: trailers {:?}", request.trailers));
    }
    if find(&request.head, SPOOF.as_bytes()).is_some() {
        problems.push(format!(
            "{at}: the spoofed identity is in the head: {:?}",
            String::from_utf8_lossy(&request.head)
        ));
    }
    if request.method != "POST" || !request.target.starts_with("/Microsoft-Server-ActiveSync?") {
        problems.push(format!("{at}: {} {}", request.method, request.target));
    }
    problems
}

#[tokio::test]
async fn hostile_http_reaches_the_upstream_only_as_the_requests_meant() {
    let upstream = RawUpstream::start().await;
    let pki = Pki::new();
    let mut alice = UserSpec::new("alice");
    alice.upn = Some(ALICE.into());
    alice.when_created = Some("20200101000000.0Z".into());
    let slapd = start_slapd(&pki, vec![alice]);
    let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
    let text = config_text(
        &pki,
        &directory,
        upstream.addr,
        &format!("[identity]\nheader = \"X-Seg-User\"\nstrip_headers = [\"{STRIP_EXTRA}\"]\n"),
    );
    let config_path = pki.dir.write("seg.toml", &text);
    let seg = start_seg(&config_path).await;
    let device = pki.device(LeafSpec::device("alice").upn(ALICE));
    let connector = Client::new(seg.listen_addr, &pki.ca_path).connector_for(&device);

    let started = Instant::now();
    let rows = table();
    let total = rows.len();
    let mut failures = Vec::new();
    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
    let mut forwarded_requests = 0;
    for row in rows {
        let name = row.name.clone();
        match run_row(&connector, seg.listen_addr, &upstream, row).await {
            Ok(result) => {
                forwarded_requests += result.forwarded;
                let outcome = match (result.forwarded, result.statuses.first(), result.closed) {
                    (0, None, _) => "dropped without a response".to_string(),
                    (0, Some(status), true) => format!("rejected {status}, closed"),
                    (0, Some(status), false) => format!("refused {status}, kept open"),
                    (_, _, _) => "forwarded".to_string(),
                };
                *outcomes.entry(outcome).or_default() += 1;
                println!(
                    "ok   {name}: statuses {:?}, {} forwarded, {} ({} ms)",
                    result.statuses,
                    result.forwarded,
                    if result.closed { "closed" } else { "open" },
                    result.elapsed.as_millis()
                );
            }
            Err(why) => {
                println!("FAIL {name}: {why}");
                failures.push(format!("{name}: {why}"));
            }
        }
    }
    println!(
        "http abuse corpus: {total} inputs tried in {:.1} s, {} passed, {} failed; outcomes of the passing rows: {outcomes:?}; {forwarded_requests} requests framed at the upstream",
        started.elapsed().as_secs_f64(),
        total - failures.len(),
        failures.len()
    );
    seg.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {total} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
