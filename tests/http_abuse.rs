//! The HTTP abuse corpus (issue #8, item 2): hostile HTTP/1.1 messages, each written as raw
//! bytes over a real TLS connection that presents an admitted device's certificate, to one
//! running seg in front of a real slapd (LDAPS) and an upstream that records every byte.
//!
//! Every row must end in one of two ways: a 4xx and a closed connection with not one byte
//! of the message at the upstream, or exactly the requests the client honestly meant, each
//! well framed, each carrying exactly one identity header with seg's mapped identity and no
//! client-supplied identity, forwarding, hop-by-hop or trailer-borne header. The rows are
//! `tests/corpus/http_abuse.rs`, shared with the codec's unit test: each says what the codec
//! reads, from which its outcome here follows unless the row says seg refuses it after the
//! codec, so a change in behaviour fails the row, and the report names every failing row. Two narrower outcomes are allowed where the strict one cannot
//! apply, each said in its row: a well-framed request seg refuses itself (route, method,
//! query) keeps its connection open, because where it ended is certain; and a body that
//! breaks its chunked framing after the head may have had its head and first chunks streamed
//! upstream, never a complete request, on an upstream connection seg then closes.
//!
//! The upstream is a raw TCP recorder written here rather than the hyper-based echo of
//! `src/demo/echo.rs`: hyper would itself decide where one request ends, so an echo counting
//! "requests" would share seg's own parser's view of the bytes. The recorder keeps every
//! byte of every connection and frames requests itself, strictly (one Content-Length of
//! digits, or exactly `Transfer-Encoding: chunked`, CRLF only, no obs-fold, no chunk
//! extensions), so "never two requests from one message" and "nothing of a refused message"
//! are checked on the wire. It runs in process because no real server records raw bytes on
//! demand.

mod support;

#[path = "corpus/http_abuse.rs"]
mod corpus;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corpus::{Expect, Row, Step, IDENTITY_HEADER, SPOOF};
use rustls::pki_types::ServerName;
use seg::demo::pki::LeafSpec;
use seg::http1::{BodyError, BodyFraming};
use support::lab::{config_text, start_seg, start_slapd, Client, DirectoryRef, Pki};
use support::slapd::UserSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

/// seg is configured to set the corpus' `IDENTITY_HEADER`; `X-Remote-User` stays in the
/// built-in strip list, so both names are spoofed. The corpus' `SPOOF` must never appear in
/// a head or trailer the upstream receives.
const STRIP_EXTRA: &str = "X-Mailbox-Owner";
const ALICE: &str = "alice@corp.test";

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

/// How a row's outcome is named in the report.
impl Expect {
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

/// What one row did, for the report.
struct RowResult {
    statuses: Vec<u16>,
    forwarded: usize,
    closed: bool,
    elapsed: Duration,
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
    let expect = row.expect();
    let bodies = row.forwarded_bodies();
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
    let wanted = expect.statuses();
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
            if expect.closes() {
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
    if closed != expect.closes() {
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
    if delta.requests.len() != expect.forwarded() {
        problems.push(format!(
            "upstream framed {} requests, expected {}",
            delta.requests.len(),
            expect.forwarded()
        ));
    }
    let mid_body = matches!(expect, Expect::RejectedMidBody(_));
    if expect.forwarded() == 0 && delta.new_bytes > 0 && !mid_body {
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
    let seen: Vec<&[u8]> = delta.requests.iter().map(|r| r.body.as_slice()).collect();
    if seen != bodies {
        problems.push(format!(
            "upstream bodies {:?}, expected {:?}",
            seen.iter()
                .map(|b| String::from_utf8_lossy(b))
                .collect::<Vec<_>>(),
            bodies
                .iter()
                .map(|b| String::from_utf8_lossy(b))
                .collect::<Vec<_>>()
        ));
    }
    if problems.is_empty() {
        Ok(result)
    } else {
        Err(format!(
            "{} (saw statuses {:?}, {} forwarded, {}): {}",
            expect.label(),
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
    let rows = corpus::rows();
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
