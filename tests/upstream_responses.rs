//! The upstream response corpus: hostile and unusual HTTP/1.1 responses from the ActiveSync
//! server, each judged where it lands, at the device. It is the black-box safety net for
//! seg's upstream HTTP client, so it asserts only what must stay true whichever client
//! parses the upstream's bytes.
//!
//! Each row is one or more requests from an admitted device over real TLS, to one running
//! seg in front of a real slapd (LDAPS) and a scripted upstream. The upstream answers every
//! request with the bytes its row scripts (chosen by the `row=` query parameter), in pieces,
//! slowly, or followed by a close or a reset, and logs which of its connections each request
//! arrived on, so a row can say whether seg reused an upstream connection. Each request of a
//! row names its expected outcome (`Expect`); the report names every failing row.
//!
//! Whatever the row: a response the device takes for complete is exactly the upstream's
//! (status and body bytes) or seg's own 502; an upstream body cut off reaches the device as
//! a response it can tell is cut (its declared length or last chunk never arrives, then the
//! connection closes); nothing the upstream sends outside one well-framed response (stray
//! body bytes, a second response, injected header lines, trailers, hop-by-hop headers,
//! tunnel bytes) reaches the device; no 1xx response reaches a device that sent neither
//! `Expect` nor `Upgrade`; every request reaches the upstream exactly once; and the next
//! request gets its own answer.
//!
//! The upstream is a raw TCP server written here and run in process: no real server
//! produces malformed responses on demand, and one built on an HTTP library would refuse to
//! write most of these. It frames requests simply (the head to CRLFCRLF, then
//! Content-Length bytes): the requests are seg's, and `tests/http_abuse.rs` checks those.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use seg::demo::pki::LeafSpec;
use support::lab::{config_text, eas_target, start_seg, start_slapd, Client, DirectoryRef, Pki};
use support::slapd::UserSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const ALICE: &str = "alice@corp.test";

/// The longest a row may take; a hang fails the row instead of the run.
const ROW_LIMIT: Duration = Duration::from_secs(15);
/// How long a connection seg keeps open must stay silent after the row's last response.
const QUIET: Duration = Duration::from_millis(300);
/// The large bodies' size.
const LARGE: usize = 8 << 20;

// ---------------------------------------------------------------------------------------
// The scripted upstream.

/// One piece of a scripted answer.
#[derive(Clone)]
enum Part {
    Bytes(Vec<u8>),
    /// These bytes one at a time, each after this pause.
    Dribble(Vec<u8>, Duration),
    Pause(Duration),
    /// Closes the connection (FIN).
    Close,
    /// Resets the connection (RST).
    Reset,
}

/// One request the upstream received: the script it named and the connection it came on.
struct Served {
    script: String,
    connection: usize,
}

struct ScriptedUpstream {
    addr: SocketAddr,
    served: Arc<Mutex<Vec<Served>>>,
    task: JoinHandle<()>,
}

impl ScriptedUpstream {
    async fn start(scripts: HashMap<String, Vec<Part>>) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let served = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&served);
        let scripts = Arc::new(scripts);
        let task = tokio::spawn(async move {
            let mut connections = 0;
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(answer(
                    tcp,
                    connections,
                    Arc::clone(&scripts),
                    Arc::clone(&log),
                ));
                connections += 1;
            }
        });
        ScriptedUpstream { addr, served, task }
    }

    /// The connections on which the upstream received requests naming `script`.
    fn connections_for(&self, script: &str) -> Vec<usize> {
        self.served
            .lock()
            .expect("served")
            .iter()
            .filter(|s| s.script == script)
            .map(|s| s.connection)
            .collect()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Answers each request on one connection with its script, until a script ends the
/// connection or seg does.
async fn answer(
    mut tcp: TcpStream,
    connection: usize,
    scripts: Arc<HashMap<String, Vec<Part>>>,
    served: Arc<Mutex<Vec<Served>>>,
) {
    // Each dribbled byte goes out in a segment of its own.
    let _ = tcp.set_nodelay(true);
    let mut buffer = Vec::new();
    while let Some(target) = next_request(&mut tcp, &mut buffer).await {
        let script = script_named(&target);
        served.lock().expect("served").push(Served {
            script: script.clone(),
            connection,
        });
        let Some(parts) = scripts.get(&script) else {
            let _ = tcp
                .write_all(b"HTTP/1.1 500 No Script\r\nContent-Length: 9\r\n\r\nno script")
                .await;
            return;
        };
        for part in parts {
            let written = match part {
                Part::Bytes(bytes) => tcp.write_all(bytes).await,
                Part::Dribble(bytes, pause) => {
                    let mut result = Ok(());
                    for byte in bytes {
                        tokio::time::sleep(*pause).await;
                        result = tcp.write_all(&[*byte]).await;
                        if result.is_err() {
                            break;
                        }
                    }
                    result
                }
                Part::Pause(pause) => {
                    tokio::time::sleep(*pause).await;
                    Ok(())
                }
                Part::Close => {
                    let _ = tcp.shutdown().await;
                    return;
                }
                Part::Reset => {
                    let _ = tcp.set_zero_linger();
                    return;
                }
            };
            // seg may stop reading a response it refuses (an oversized head).
            if written.is_err() {
                return;
            }
        }
    }
}

/// Reads one request (head, then Content-Length bytes of body) and returns its target;
/// `None` when the connection ends first.
async fn next_request(tcp: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<String> {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        if let Some(head_end) = find(buffer, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
            let length = head
                .split("\r\n")
                .filter_map(|line| line.split_once(':'))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, value)| value.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let end = head_end + 4 + length;
            if buffer.len() >= end {
                buffer.drain(..end);
                let target = head.split(' ').nth(1).unwrap_or("").to_string();
                return Some(target);
            }
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// The `row=` query parameter of a request target (an OPTIONS: `DeviceId=row…`).
fn script_named(target: &str) -> String {
    target
        .split_once('?')
        .map(|(_, query)| query)
        .unwrap_or("")
        .split('&')
        .find_map(|pair| {
            pair.strip_prefix("row=")
                .or_else(|| pair.strip_prefix("DeviceId=row"))
        })
        .unwrap_or("")
        .to_string()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn find_ignoring_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

// ---------------------------------------------------------------------------------------
// The device side.

/// How the body of a response the device reads is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// 1xx, 204, 304.
    NoBody,
    Length(usize),
    Chunked,
    /// Until the connection ends: a cut the device cannot tell from the end.
    UntilClose,
}

/// A response as far as the device has read it.
#[derive(Debug)]
struct DeviceResponse {
    status: u16,
    headers: Vec<(String, String)>,
    framing: Framing,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
    complete: bool,
}

impl DeviceResponse {
    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    fn summary(&self) -> String {
        format!(
            "{} {:?}, {} body bytes{}: {:?}",
            self.status,
            self.framing,
            self.body.len(),
            if self.complete { "" } else { ", incomplete" },
            String::from_utf8_lossy(&self.body[..self.body.len().min(80)])
        )
    }
}

/// One response at the start of `buf`, and where it ends once complete; `None` while its
/// head is incomplete. The body's pieces are ranges of `buf`, copied only once it is done.
struct Framed {
    status: u16,
    headers: Vec<(String, String)>,
    framing: Framing,
    body: Vec<(usize, usize)>,
    trailers: Vec<(String, String)>,
    end: Option<usize>,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// One field line as seg must write it: token, colon, value without control bytes.
fn field_line(line: &[u8]) -> Result<(String, String), String> {
    let show = || String::from_utf8_lossy(line).into_owned();
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

/// Reads the response at the start of what seg sent: `Err` when seg's bytes are no
/// well-formed HTTP/1.1 response (seg writes every response itself, so it never may).
fn frame_response(buf: &[u8], ended: bool) -> Result<Option<Framed>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    // Each line with its CRLF; the piece after the last LF is empty.
    let mut lines: Vec<&[u8]> = buf[..head_end + 2].split(|b| *b == b'\n').collect();
    lines.pop();
    let mut lines = lines.into_iter().map(|line| {
        line.strip_suffix(b"\r")
            .ok_or_else(|| "a bare LF in the head".to_string())
    });
    let status_line = lines.next().unwrap_or(Ok(b""))?;
    let text = String::from_utf8_lossy(status_line).into_owned();
    let status = match text.split(' ').collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/1.") && code.len() == 3 => {
            code.parse::<u16>().ok()
        }
        _ => None,
    }
    .ok_or_else(|| format!("bad status line {text:?}"))?;
    let mut headers = Vec::new();
    for line in lines {
        let line = line?;
        if line.contains(&b'\r') {
            return Err("a bare CR in the head".into());
        }
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Err(format!(
                "an obs-fold line {:?}",
                String::from_utf8_lossy(line)
            ));
        }
        headers.push(field_line(line)?);
    }
    let values = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let lengths = values("content-length");
    let codings = values("transfer-encoding");
    if !codings.is_empty() && !lengths.is_empty() {
        return Err("both Content-Length and Transfer-Encoding".into());
    }
    if lengths.len() > 1 {
        return Err(format!("Content-Length {lengths:?}"));
    }
    let start = head_end + 4;
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::NoBody
    } else if let [coding] = codings[..] {
        if !coding.eq_ignore_ascii_case("chunked") {
            return Err(format!("Transfer-Encoding {coding:?}"));
        }
        Framing::Chunked
    } else if !codings.is_empty() {
        return Err(format!("Transfer-Encoding {codings:?}"));
    } else if let [length] = lengths[..] {
        let length = length
            .parse::<usize>()
            .ok()
            .filter(|_| length.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| format!("Content-Length {length:?}"))?;
        Framing::Length(length)
    } else {
        Framing::UntilClose
    };
    let (body, trailers, end) = match framing {
        Framing::NoBody => (Vec::new(), Vec::new(), Some(start)),
        Framing::Length(length) => {
            let end = (buf.len() >= start + length).then_some(start + length);
            let stop = buf.len().min(start + length);
            (vec![(start, stop)], Vec::new(), end)
        }
        Framing::UntilClose => (
            vec![(start, buf.len())],
            Vec::new(),
            ended.then_some(buf.len()),
        ),
        Framing::Chunked => dechunk(buf, start)?,
    };
    Ok(Some(Framed {
        status,
        headers,
        framing,
        body,
        trailers,
        end,
    }))
}

type Dechunked = (Vec<(usize, usize)>, Vec<(String, String)>, Option<usize>);

/// The chunks from `start` (extensions allowed), the trailers, and the end once the last
/// chunk and trailer section are in; a chunk still arriving counts as far as it came.
fn dechunk(buf: &[u8], start: usize) -> Result<Dechunked, String> {
    let mut pos = start;
    let mut pieces = Vec::new();
    loop {
        let Some(line_end) = find(&buf[pos..], b"\r\n") else {
            return Ok((pieces, Vec::new(), None));
        };
        let line = &buf[pos..pos + line_end];
        let size = line.split(|b| *b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size)
            .ok()
            .filter(|s| !s.is_empty() && s.len() <= 15)
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or_else(|| format!("bad chunk-size line {:?}", String::from_utf8_lossy(line)))?;
        pos += line_end + 2;
        if size == 0 {
            let mut trailers = Vec::new();
            loop {
                let Some(end) = find(&buf[pos..], b"\r\n") else {
                    return Ok((pieces, trailers, None));
                };
                let line = &buf[pos..pos + end];
                pos += end + 2;
                if line.is_empty() {
                    return Ok((pieces, trailers, Some(pos)));
                }
                trailers.push(field_line(line)?);
            }
        }
        pieces.push((pos, buf.len().min(pos + size)));
        if buf.len() < pos + size + 2 {
            return Ok((pieces, Vec::new(), None));
        }
        pos += size;
        if &buf[pos..pos + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".into());
        }
        pos += 2;
    }
}

/// One device connection to seg.
struct DeviceLink {
    stream: TlsStream<TcpStream>,
    /// Received, not yet read as a response.
    pending: Vec<u8>,
    /// The stream ended: EOF, or an error such as a reset.
    ended: bool,
}

/// What the device read for one request.
struct Reading {
    /// Interim (1xx) statuses before the final response.
    interim: Vec<u16>,
    /// The final response, complete or as far as it came.
    response: Option<DeviceResponse>,
    /// Why seg's bytes are not a well-formed response.
    malformed: Option<String>,
    /// The row's time ran out while the response was incomplete.
    timed_out: bool,
}

impl DeviceLink {
    async fn open(connector: &TlsConnector, addr: SocketAddr) -> Result<DeviceLink, String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").expect("name");
        let stream = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        Ok(DeviceLink {
            stream,
            pending: Vec::new(),
            ended: false,
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("write: {e}"))?;
        self.stream.flush().await.map_err(|e| format!("flush: {e}"))
    }

    /// Reads what arrives next into `pending` and `seen`; false when nothing came before
    /// `until` or the stream ended.
    async fn read_more(&mut self, until: Instant, seen: &mut Vec<u8>) -> bool {
        let mut chunk = vec![0u8; 256 * 1024];
        let read = tokio::time::timeout_at(until.into(), self.stream.read(&mut chunk)).await;
        match read {
            Err(_) => false,
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.ended = true;
                false
            }
            Ok(Ok(n)) => {
                self.pending.extend_from_slice(&chunk[..n]);
                seen.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads up to the next final response, complete or until the connection ends or
    /// `until`.
    async fn next_response(&mut self, until: Instant, seen: &mut Vec<u8>) -> Reading {
        let mut reading = Reading {
            interim: Vec::new(),
            response: None,
            malformed: None,
            timed_out: false,
        };
        loop {
            let framed = match frame_response(&self.pending, self.ended) {
                Ok(framed) => framed,
                Err(why) => {
                    reading.malformed = Some(format!(
                        "{why}; bytes {:?}",
                        String::from_utf8_lossy(&self.pending[..self.pending.len().min(300)])
                    ));
                    return reading;
                }
            };
            if let Some(framed) = &framed {
                if let (Some(end), true) = (framed.end, (100..200).contains(&framed.status)) {
                    reading.interim.push(framed.status);
                    self.pending.drain(..end);
                    continue;
                }
            }
            if framed.as_ref().is_some_and(|f| f.end.is_some()) || self.ended {
                reading.response = framed.map(|f| self.take(f));
                return reading;
            }
            if !self.read_more(until, seen).await && !self.ended {
                reading.timed_out = true;
                reading.response = framed.map(|f| self.take(f));
                return reading;
            }
        }
    }

    /// The response `framed` describes, its bytes taken from `pending`.
    fn take(&mut self, framed: Framed) -> DeviceResponse {
        let body = framed
            .body
            .iter()
            .flat_map(|(from, to)| &self.pending[*from..*to])
            .copied()
            .collect();
        let end = framed.end.unwrap_or(self.pending.len());
        self.pending.drain(..end);
        DeviceResponse {
            status: framed.status,
            headers: framed.headers,
            framing: framed.framing,
            body,
            trailers: framed.trailers,
            complete: framed.end.is_some(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The rows.

/// What one request must get at the device.
#[derive(Debug, Clone)]
enum Expect {
    /// This status and exactly these body bytes.
    Answer(u16, Vec<u8>),
    /// The upstream's plain answer to this very request (a control); `table()` makes it
    /// an `Answer`.
    Own,
    /// seg's own 502.
    BadGateway,
    /// seg's 502, or this answer with the offending part removed: a judgement call.
    BadGatewayOr(u16, Vec<u8>),
    /// A response the device can tell is incomplete: nothing, a 502, or a head whose
    /// declared length or last chunk never arrives before seg closes the connection. The
    /// body bytes that did arrive are a start of these.
    Cut(Vec<u8>),
}

/// Which device connection a request goes out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    New,
    /// The row's previous one, which seg must have kept open.
    Same,
    /// The previous one unless seg closed it or said it would.
    Kept,
}

/// Which upstream connection a request must reach, next to the row's previous request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Same,
    New,
    Any,
}

struct Step {
    /// The script's name, `row.step`, in the request's `row=` parameter.
    id: String,
    method: &'static str,
    /// The upstream's answer; a control's is filled in from its id.
    answer: Vec<Part>,
    expect: Expect,
    device: Device,
    upstream: Upstream,
    /// Headers that must reach the device with these values.
    kept: Vec<(&'static str, &'static str)>,
    /// How long the device waits before sending this request.
    wait: Duration,
}

struct Row {
    name: String,
    steps: Vec<Step>,
    /// Header names that must reach the device neither in a head nor in trailers.
    banned_headers: Vec<&'static str>,
    /// Byte strings (any case) that must appear nowhere in what the device receives.
    banned_bytes: Vec<&'static str>,
}

impl Row {
    /// A row whose first request, on a new device connection, gets `answer`.
    fn new(name: &str, answer: Vec<Part>, expect: Expect) -> Row {
        Row {
            name: name.to_string(),
            steps: vec![Step {
                id: String::new(),
                method: "POST",
                answer,
                expect,
                device: Device::New,
                upstream: Upstream::Any,
                kept: Vec::new(),
                wait: Duration::ZERO,
            }],
            banned_headers: Vec::new(),
            banned_bytes: Vec::new(),
        }
    }

    /// Then a plain request, which must get its own answer.
    fn then(mut self, device: Device, upstream: Upstream) -> Row {
        self.steps.push(Step {
            id: String::new(),
            method: "POST",
            answer: Vec::new(),
            expect: Expect::Own,
            device,
            upstream,
            kept: Vec::new(),
            wait: Duration::ZERO,
        });
        self
    }

    fn method(mut self, method: &'static str) -> Row {
        self.last().method = method;
        self
    }

    /// The last request waits this long first.
    fn waiting(mut self, ms: u64) -> Row {
        self.last().wait = Duration::from_millis(ms);
        self
    }

    fn keeping(mut self, name: &'static str, value: &'static str) -> Row {
        self.last().kept.push((name, value));
        self
    }

    fn banning_headers(mut self, names: &[&'static str]) -> Row {
        self.banned_headers.extend(names);
        self
    }

    fn banning(mut self, bytes: &[&'static str]) -> Row {
        self.banned_bytes.extend(bytes);
        self
    }

    fn last(&mut self) -> &mut Step {
        self.steps.last_mut().expect("a row has a step")
    }
}

/// A complete 200 with a Content-Length.
fn ok(body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn send(text: &str) -> Vec<Part> {
    vec![Part::Bytes(text.as_bytes().to_vec())]
}

fn send_then_close(text: &str) -> Vec<Part> {
    vec![Part::Bytes(text.as_bytes().to_vec()), Part::Close]
}

fn pause_ms(ms: u64) -> Part {
    Part::Pause(Duration::from_millis(ms))
}

fn bytes(text: &str) -> Part {
    Part::Bytes(text.as_bytes().to_vec())
}

/// Deterministic noise, so a reordered or repeated piece of a large body shows.
fn noise(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / size * 8 + 16);
    for chunk in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A response head of about `size` bytes in header lines of `line` bytes each.
fn big_head(size: usize, line: usize) -> String {
    let mut head = String::from("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n");
    let mut n = 0;
    while head.len() < size {
        let name = format!("X-Big-{n}: ");
        let pad = line.saturating_sub(name.len() + 2).max(1);
        head.push_str(&name);
        head.push_str(&"b".repeat(pad));
        head.push_str("\r\n");
        n += 1;
    }
    head.push_str("\r\nLEAKED");
    head
}

fn table() -> Vec<Row> {
    use Expect::*;
    let hello = || b"hello".to_vec();
    let mut rows = vec![
        // 1. The control: a plain answer, and the upstream connection kept for the next.
        Row::new(
            "01 200 with Content-Length, connection reused",
            vec![Part::Bytes(ok(b"hello"))],
            Answer(200, hello()),
        )
        .keeping("content-type", "application/vnd.ms-sync.wbxml")
        .then(Device::Same, Upstream::Same),
        Row::new(
            "01b 200 with its head and body in pieces",
            vec![
                bytes("HTTP/1.1 20"),
                pause_ms(30),
                bytes("0 OK\r\nContent-Le"),
                pause_ms(30),
                bytes("ngth: 5\r\n\r"),
                pause_ms(30),
                bytes("\nhel"),
                pause_ms(30),
                bytes("lo"),
            ],
            Answer(200, hello()),
        )
        .then(Device::Same, Upstream::Any),
        // 2. Chunked, with extensions, upper-case sizes and trailers seg must not pass on.
        Row::new(
            "02 chunked with extensions, upper-case hex and trailers",
            send(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Trailer-Secret, X-Remote-User\r\n\r\n\
                 5;a=b\r\nhello\r\n1A;name=\"x;y\"\r\nabcdefghijklmnopqrstuvwxyz\r\n\
                 0;last\r\nX-Trailer-Secret: TRAILER-SECRET\r\nX-Remote-User: ceo@corp.test\r\n\r\n",
            ),
            Answer(200, b"helloabcdefghijklmnopqrstuvwxyz".to_vec()),
        )
        .banning_headers(&["x-trailer-secret", "trailer"])
        .banning(&["TRAILER-SECRET", "ceo@corp.test"])
        .then(Device::Same, Upstream::Any),
        Row::new(
            "02b chunked, its size lines split across writes",
            vec![
                bytes("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5"),
                pause_ms(30),
                bytes(";a=b\r\nhel"),
                pause_ms(30),
                bytes("lo\r\n0\r\n"),
                pause_ms(30),
                bytes("\r\n"),
            ],
            Answer(200, hello()),
        )
        .then(Device::Same, Upstream::Any),
    ];
    // 3. Content-Length beside chunked: chunked wins (RFC 9112 §6.3), and the device never
    // gets a length that disagrees with its bytes.
    for (name, framing) in [
        (
            "03 Content-Length: 5 then chunked, longer body",
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
        ),
        (
            "03b chunked then Content-Length: 5, longer body",
            "Transfer-Encoding: chunked\r\nContent-Length: 5",
        ),
    ] {
        rows.push(
            Row::new(
                name,
                send(&format!(
                    "HTTP/1.1 200 OK\r\n{framing}\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                )),
                Answer(200, b"hello world".to_vec()),
            )
            .then(Device::Kept, Upstream::Any),
        );
    }
    // 4, 5. A length seg cannot trust: 502, and the connection is never used again.
    let lengths = [
        (
            "04 two different Content-Length values",
            "5\r\nContent-Length: 7",
        ),
        ("05 Content-Length -1", "-1"),
        ("05b Content-Length 1e3", "1e3"),
        ("05c Content-Length +5", "+5"),
        ("05d Content-Length 0x10", "0x10"),
    ];
    for (name, value) in lengths {
        rows.push(
            Row::new(
                name,
                send(&format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {value}\r\n\r\nLEAKED-BODY-BYTES"
                )),
                BadGateway,
            )
            .banning(&["LEAKED"])
            .then(Device::Kept, Upstream::New),
        );
    }
    rows.extend([
        // 6. A body delimited by the close.
        Row::new(
            "06 close-delimited body",
            send_then_close("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"),
            Answer(200, b"until the end".to_vec()),
        )
        .then(Device::Kept, Upstream::New),
        // 7. HTTP/1.0 has no keep-alive unless it says so (RFC 9112 §9.3).
        Row::new(
            "07 HTTP/1.0 with Content-Length, then the upstream closes",
            send_then_close("HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            Answer(200, hello()),
        )
        .then(Device::Kept, Upstream::New),
        Row::new(
            "07b HTTP/1.0 with Content-Length, the upstream leaves it open",
            send("HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            Answer(200, hello()),
        )
        .then(Device::Kept, Upstream::New),
        // 8. Interim responses are the upstream's business with seg: the device sent no
        // Expect, so it sees only the final one.
        Row::new(
            "08 100 Continue and 200 in one write",
            vec![Part::Bytes(
                [b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), ok(b"hello")].concat(),
            )],
            Answer(200, hello()),
        )
        .then(Device::Same, Upstream::Any),
        Row::new(
            "08b 100 Continue, then 200 in a later write",
            vec![
                bytes("HTTP/1.1 100 Continue\r\n\r\n"),
                pause_ms(100),
                Part::Bytes(ok(b"hello")),
            ],
            Answer(200, hello()),
        )
        .then(Device::Same, Upstream::Any),
        Row::new(
            "08c 100, 102 and 103 with a header, then 200",
            vec![Part::Bytes(
                [
                    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n".to_vec(),
                    b"HTTP/1.1 103 Early Hints\r\nX-Interim: INTERIM-HEADER\r\n\r\n".to_vec(),
                    ok(b"hello"),
                ]
                .concat(),
            )],
            Answer(200, hello()),
        )
        .banning_headers(&["x-interim"])
        .banning(&["INTERIM-HEADER"])
        .then(Device::Same, Upstream::Any),
    ]);
    // 9. A 204 has no body whatever it says: the bytes after its head are no part of it
    // and never the start of the device's next answer. Bytes written later must reach seg
    // before the next request goes out (the device waits): once seg has sent a request,
    // what arrives is that request's answer as far as anyone can tell.
    for (name, parts, wait) in [
        (
            "09 204 with Content-Length: 5 and 5 stray bytes",
            send("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nSTRAY"),
            0,
        ),
        (
            "09b 204 with stray bytes",
            send("HTTP/1.1 204 No Content\r\n\r\nSTRAY-BYTES"),
            0,
        ),
        (
            "09c 204, stray bytes in a later write on the idle connection",
            vec![
                bytes("HTTP/1.1 204 No Content\r\n\r\n"),
                pause_ms(100),
                bytes("STRAY-BYTES"),
            ],
            400,
        ),
    ] {
        rows.push(
            Row::new(name, parts, Answer(204, Vec::new()))
                .banning(&["STRAY"])
                .then(Device::Same, Upstream::Any)
                .waiting(wait),
        );
    }
    rows.extend([
        // 10. OPTIONS (the only other method seg forwards) and a 304 that announces a length.
        Row::new(
            "10 OPTIONS answered with a body and Content-Length",
            send(
                "HTTP/1.1 200 OK\r\nMS-ASProtocolVersions: 14.1,16.1\r\nMS-ASProtocolCommands: Sync,FolderSync\r\nContent-Length: 12\r\n\r\noptions body",
            ),
            Answer(200, b"options body".to_vec()),
        )
        .method("OPTIONS")
        .keeping("ms-asprotocolversions", "14.1,16.1")
        .then(Device::Same, Upstream::Any),
        Row::new(
            "10b 304 with Content-Length: 5 and no body",
            send("HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
            Answer(304, Vec::new()),
        )
        .then(Device::Same, Upstream::Any),
        // 11. Oversized heads: 502, and seg stays up.
        Row::new(
            "11 200 KiB head in 2,000 header lines",
            send(&big_head(200 << 10, 100)),
            BadGateway,
        )
        .banning(&["LEAKED", "X-Big-"])
        .then(Device::Kept, Upstream::New),
        Row::new(
            "11b 200 KiB head in one header line",
            send(&big_head(200 << 10, 200 << 10)),
            BadGateway,
        )
        .banning(&["LEAKED", "X-Big-"])
        .then(Device::Kept, Upstream::New),
        Row::new(
            "11c 1 MiB head",
            send(&big_head(1 << 20, 100)),
            BadGateway,
        )
        .banning(&["LEAKED", "X-Big-"])
        .then(Device::Kept, Upstream::New),
    ]);
    // 12. No status line.
    let binary: Vec<u8> = (0..=255u8)
        .cycle()
        .take(512)
        .chain(*b"\r\n\r\nLEAKED")
        .collect();
    let garbage = [
        ("12 HELLO instead of a status line", send("HELLO\r\n\r\n")),
        (
            "12b binary instead of a status line",
            vec![Part::Bytes(binary)],
        ),
        (
            "12c status 2OO",
            send("HTTP/1.1 2OO OK\r\nContent-Length: 6\r\n\r\nLEAKED"),
        ),
        (
            "12d HTTP/2 status line",
            send("HTTP/2 200\r\nContent-Length: 6\r\n\r\nLEAKED"),
        ),
        (
            "12e ICY status line",
            send("ICY 200 OK\r\nContent-Length: 6\r\n\r\nLEAKED"),
        ),
    ];
    for (name, parts) in garbage {
        rows.push(
            Row::new(name, parts, BadGateway)
                .banning(&["LEAKED", "HELLO"])
                .then(Device::Kept, Upstream::New),
        );
    }
    // 13. An upgrade seg never asked for: never a tunnel.
    rows.push(
        Row::new(
            "13 101 Switching Protocols to a POST",
            send(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nTUNNEL-BYTES",
            ),
            BadGateway,
        )
        .banning_headers(&["upgrade"])
        .banning(&["TUNNEL-BYTES", "Switching"])
        .then(Device::Kept, Upstream::New),
    );
    // 14. Response splitting: whatever seg makes of the line, the injected header never
    // reaches the device as one (502, or the offending line removed).
    let splits = [
        (
            "14 bare CR inside a header value",
            "X-A: 1\rX-Injected: INJECTED",
        ),
        (
            "14b bare LF inside a header value",
            "X-A: 1\nX-Injected: INJECTED",
        ),
        ("14c obs-fold", "X-A: 1\r\n X-Injected: INJECTED"),
        ("14d space before the colon", "X-Injected : INJECTED"),
        (
            "14e NUL inside a header value",
            "X-A: 1\0X-Injected: INJECTED",
        ),
    ];
    for (name, line) in splits {
        rows.push(
            Row::new(
                name,
                send(&format!(
                    "HTTP/1.1 200 OK\r\n{line}\r\nContent-Length: 5\r\n\r\nhello"
                )),
                BadGatewayOr(200, hello()),
            )
            .banning_headers(&["x-injected"])
            .banning(&["INJECTED"])
            .then(Device::Kept, Upstream::Any),
        );
    }
    rows.extend([
        // 15. Hop-by-hop headers are for seg, never the device (RFC 9110 §7.6.1).
        Row::new(
            "15 hop-by-hop response headers",
            send(
                "HTTP/1.1 200 OK\r\nConnection: X-Secret, keep-alive\r\nX-Secret: HOP-SECRET\r\nKeep-Alive: timeout=5\r\n\
                 Proxy-Authenticate: Basic realm=\"HOP-REALM\"\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\n\
                 Trailer: X-Later\r\nContent-Length: 5\r\n\r\nhello",
            ),
            Answer(200, hello()),
        )
        .banning_headers(&[
            "x-secret",
            "keep-alive",
            "proxy-authenticate",
            "upgrade",
            "proxy-connection",
            "trailer",
        ])
        .banning(&["HOP-SECRET", "HOP-REALM"])
        .then(Device::Same, Upstream::Any),
        Row::new(
            "15b Connection: close, the upstream leaves it open",
            send("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"),
            Answer(200, hello()),
        )
        .then(Device::Kept, Upstream::New),
        // 16. A body cut off: the device must be able to tell.
        Row::new(
            "16 Content-Length: 100, 10 bytes, then close",
            send_then_close("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"),
            Cut(b"0123456789".to_vec()),
        )
        .then(Device::New, Upstream::Any),
        Row::new(
            "16b Content-Length: 100, 10 bytes, then reset",
            vec![
                bytes("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"),
                pause_ms(50),
                Part::Reset,
            ],
            Cut(b"0123456789".to_vec()),
        )
        .then(Device::New, Upstream::Any),
        Row::new(
            "16c chunked, one chunk, then close",
            send_then_close("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nA\r\n0123456789\r\n"),
            Cut(b"0123456789".to_vec()),
        )
        .then(Device::New, Upstream::Any),
        Row::new(
            "16d chunked, cut inside a chunk",
            send_then_close("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n14\r\n0123456789"),
            Cut(b"0123456789".to_vec()),
        )
        .then(Device::New, Upstream::Any),
        // 17. No response at all, after the request was read: 502, never a retry of a POST.
        Row::new(
            "17 the upstream closes without a response",
            vec![Part::Close],
            BadGateway,
        )
        .then(Device::Kept, Upstream::New),
        Row::new(
            "17b the upstream resets without a response",
            vec![Part::Reset],
            BadGateway,
        )
        .then(Device::Kept, Upstream::New),
        Row::new(
            "17c half a head, then close",
            send_then_close("HTTP/1.1 200 OK\r\nContent-Le"),
            BadGateway,
        )
        .then(Device::Kept, Upstream::New),
        // 18. A second response behind the first is never the answer to the next request.
        Row::new(
            "18 a smuggled response after the body, in the same write",
            vec![Part::Bytes(
                [ok(b"first"), ok(b"SMUGGLED")].concat(),
            )],
            Answer(200, b"first".to_vec()),
        )
        .banning(&["SMUGGLED"])
        .then(Device::Same, Upstream::Any),
        Row::new(
            "18b a smuggled response in a later write, on the idle connection",
            vec![
                Part::Bytes(ok(b"first")),
                pause_ms(100),
                Part::Bytes(ok(b"SMUGGLED")),
            ],
            Answer(200, b"first".to_vec()),
        )
        .banning(&["SMUGGLED"])
        .then(Device::Same, Upstream::Any)
        .waiting(400),
        // 19. Slow is not broken: a head dribbled over 3 s is answered.
        Row::new(
            "19 a 60-byte head, one byte each 50 ms",
            vec![
                Part::Dribble(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Pad: 0123456789abcd\r\n\r\n"
                        .to_vec(),
                    Duration::from_millis(50),
                ),
                bytes("slow"),
            ],
            Answer(200, b"slow".to_vec()),
        )
        .then(Device::Same, Upstream::Any),
    ]);
    // 20. Large bodies, byte-exact.
    let large = noise(LARGE);
    rows.extend([
        Row::new(
            "20 8 MiB body with Content-Length",
            vec![Part::Bytes(ok(&large))],
            Answer(200, large.clone()),
        )
        .then(Device::Same, Upstream::Any),
        Row::new(
            "20b 8 MiB body in 1,000-byte chunks",
            vec![Part::Bytes(
                [
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
                    chunked(&large, 1000),
                ]
                .concat(),
            )],
            Answer(200, large),
        )
        .then(Device::Same, Upstream::Any),
        Row::new(
            "control: seg still answers after the corpus",
            Vec::new(),
            Own,
        ),
    ]);
    // Name each request's script and give the controls their answers.
    for (r, row) in rows.iter_mut().enumerate() {
        for (s, step) in row.steps.iter_mut().enumerate() {
            step.id = format!("{r}.{s}");
            if matches!(step.expect, Own) {
                let body = format!("own answer to {}", step.id).into_bytes();
                step.answer = vec![Part::Bytes(ok(&body))];
                step.expect = Answer(200, body);
            }
        }
    }
    rows
}

// ---------------------------------------------------------------------------------------
// Running and checking a row.

/// FNV-1a, to name a large body in a report.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn describe_body(got: &[u8], wanted: &[u8]) -> String {
    if got.len() <= 120 && wanted.len() <= 120 {
        return format!(
            "body {:?}, expected {:?}",
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(wanted)
        );
    }
    let differs_at = got
        .iter()
        .zip(wanted)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(wanted.len()));
    format!(
        "body of {} bytes (checksum {:016x}), expected {} bytes (checksum {:016x}); first difference at byte {differs_at}",
        got.len(),
        checksum(got),
        wanted.len(),
        checksum(wanted)
    )
}

/// What is wrong with what the device read for `step`.
fn check_reading(step: &Step, row: &Row, reading: &Reading, ended: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if !reading.interim.is_empty() {
        problems.push(format!(
            "1xx responses {:?} reached a device that sent neither Expect nor Upgrade",
            reading.interim
        ));
    }
    if let Some(why) = &reading.malformed {
        problems.push(format!("seg sent no well-formed response: {why}"));
        return problems;
    }
    let how = if reading.timed_out {
        "the row's time ran out"
    } else if ended {
        "the connection ended"
    } else {
        "the connection is open"
    };
    let response = reading.response.as_ref();
    let complete = response.filter(|r| r.complete);
    let is_answer =
        |status: u16, body: &[u8]| complete.is_some_and(|r| r.status == status && r.body == body);
    let is_bad_gateway = complete.is_some_and(|r| r.status == 502);
    let unexpected = |wanted: &str| {
        format!(
            "expected {wanted}; got {} ({how})",
            response.map_or("nothing".into(), DeviceResponse::summary)
        )
    };
    match &step.expect {
        Expect::Answer(status, body) => match complete {
            Some(r) if r.status == *status && r.body != *body => {
                problems.push(describe_body(&r.body, body));
            }
            Some(r) if r.status == *status => {}
            _ => problems.push(unexpected(&status.to_string())),
        },
        Expect::BadGateway if !is_bad_gateway => problems.push(unexpected("502")),
        Expect::BadGatewayOr(status, body) if !is_bad_gateway && !is_answer(*status, body) => {
            problems.push(unexpected(&format!("502 or {status}")));
        }
        Expect::BadGateway | Expect::BadGatewayOr(..) => {}
        Expect::Cut(sent) => match response {
            // seg learned of the cut before it answered.
            Some(r) if r.complete && r.status == 502 => {}
            Some(r) if r.complete => problems.push(format!(
                "a cut-off body reached the device as a complete response: {}",
                r.summary()
            )),
            Some(r) if r.framing == Framing::UntilClose => problems.push(format!(
                "a cut-off body went out delimited by the close, so the device cannot tell it was cut: {}",
                r.summary()
            )),
            Some(r) if !sent.starts_with(&r.body) => problems.push(format!(
                "the cut-off body's bytes are not the upstream's: {}",
                r.summary()
            )),
            Some(_) | None if reading.timed_out => problems.push(format!(
                "the connection stayed open after a cut-off body; got {}",
                response.map_or("nothing".into(), DeviceResponse::summary)
            )),
            Some(_) | None => {}
        },
        Expect::Own => unreachable!("table() gives every control its answer"),
    }
    if let Some(r) = response {
        for value in r.values("connection") {
            if !value.eq_ignore_ascii_case("close") {
                problems.push(format!("Connection: {value} reached the device"));
            }
        }
        for (name, value) in &step.kept {
            if r.values(name) != [*value] {
                problems.push(format!(
                    "{name} at the device is {:?}, expected {value:?}",
                    r.values(name)
                ));
            }
        }
        for (name, value) in r.headers.iter().chain(&r.trailers) {
            if row
                .banned_headers
                .iter()
                .any(|b| b.eq_ignore_ascii_case(name))
            {
                problems.push(format!("header {name}: {value} reached the device"));
            }
        }
        if !r.trailers.is_empty() {
            problems.push(format!("trailers {:?} reached the device", r.trailers));
        }
    }
    problems
}

/// Runs one row on fresh device connections; the problems found.
async fn run_row(
    connector: &TlsConnector,
    addr: SocketAddr,
    upstream: &ScriptedUpstream,
    row: &Row,
) -> Vec<String> {
    let deadline = Instant::now() + ROW_LIMIT;
    let mut problems = Vec::new();
    // Everything the device received in this row, over all its connections.
    let mut seen = Vec::new();
    let mut link: Option<DeviceLink> = None;
    let mut said_close = false;
    let mut previous_upstream: Option<usize> = None;
    for (index, step) in row.steps.iter().enumerate() {
        let at = format!("request {} ({})", index + 1, step.id);
        let open = link.as_ref().is_some_and(|l| !l.ended);
        let reuse = match step.device {
            Device::New => false,
            Device::Same => {
                if !open || said_close {
                    problems.push(format!(
                        "{at}: seg closed the device connection (or said it would), expected it kept open"
                    ));
                    break;
                }
                true
            }
            Device::Kept => open && !said_close,
        };
        if !reuse {
            match DeviceLink::open(connector, addr).await {
                Ok(fresh) => link = Some(fresh),
                Err(e) => {
                    problems.push(format!("{at}: {e}"));
                    break;
                }
            }
        }
        let device = link.as_mut().expect("a device connection");
        tokio::time::sleep(step.wait).await;
        if !device.pending.is_empty() {
            problems.push(format!(
                "{at}: bytes arrived that answer nothing: {:?}",
                String::from_utf8_lossy(&device.pending[..device.pending.len().min(200)])
            ));
            device.pending.clear();
        }
        // OPTIONS may carry only the user and the device: the row goes in the DeviceId.
        let target = if step.method == "OPTIONS" {
            format!("/Microsoft-Server-ActiveSync?DeviceId=row{}", step.id)
        } else {
            format!("{}&row={}", eas_target("Sync", "alice"), step.id)
        };
        let request = format!(
            "{} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
            step.method
        );
        if let Err(e) = device.send(request.as_bytes()).await {
            problems.push(format!("{at}: {e}"));
            break;
        }
        let reading = device.next_response(deadline, &mut seen).await;
        problems.extend(
            check_reading(step, row, &reading, device.ended)
                .into_iter()
                .map(|p| format!("{at}: {p}")),
        );
        said_close = reading
            .response
            .as_ref()
            .is_some_and(|r| r.values("connection").contains(&"close"));
        // The upstream logs a request before it answers, so it is logged by now.
        let connections = upstream.connections_for(&step.id);
        let [connection] = connections[..] else {
            problems.push(format!(
                "{at}: the upstream received it {} times, expected once",
                connections.len()
            ));
            previous_upstream = None;
            continue;
        };
        match (step.upstream, previous_upstream) {
            (Upstream::Same, Some(previous)) if connection != previous => problems.push(format!(
                "{at}: on upstream connection {connection}, expected the previous request's {previous} reused"
            )),
            (Upstream::New, Some(previous)) if connection == previous => problems.push(format!(
                "{at}: upstream connection {connection} reused, expected a new one"
            )),
            _ => {}
        }
        previous_upstream = Some(connection);
    }
    // Nothing more may arrive on a connection seg keeps open after the row's last answer.
    if let Some(device) = link.as_mut() {
        if !device.ended {
            device.read_more(Instant::now() + QUIET, &mut seen).await;
        }
        if !device.pending.is_empty() {
            problems.push(format!(
                "bytes arrived after the last response: {:?}",
                String::from_utf8_lossy(&device.pending[..device.pending.len().min(200)])
            ));
        }
    }
    for banned in &row.banned_bytes {
        if find_ignoring_case(&seen, banned.as_bytes()) {
            problems.push(format!("{banned:?} reached the device"));
        }
    }
    if !problems.is_empty() {
        problems.push(format!(
            "the device received {} bytes over the row, starting {:?}",
            seen.len(),
            String::from_utf8_lossy(&seen[..seen.len().min(400)])
        ));
    }
    problems
}

#[tokio::test]
async fn upstream_responses_reach_the_device_only_as_well_framed_answers() {
    let rows = table();
    let scripts: HashMap<String, Vec<Part>> = rows
        .iter()
        .flat_map(|row| &row.steps)
        .map(|step| (step.id.clone(), step.answer.clone()))
        .collect();
    let upstream = ScriptedUpstream::start(scripts).await;
    let pki = Pki::new();
    let mut alice = UserSpec::new("alice");
    alice.upn = Some(ALICE.into());
    alice.when_created = Some("20200101000000.0Z".into());
    let slapd = start_slapd(&pki, vec![alice]);
    let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
    // A row that fails by hanging may leave its connection open in seg for a while; the
    // rows after it must not meet the per-device cap.
    let text = config_text(&pki, &directory, upstream.addr, "")
        .replace("[listen]\n", "[listen]\nmax_connections_per_device = 256\n");
    let config_path = pki.dir.write("seg.toml", &text);
    let seg = start_seg(&config_path).await;
    let device = pki.device(LeafSpec::device("alice").upn(ALICE));
    let connector = Client::new(seg.listen_addr, &pki.ca_path).connector_for(&device);

    let started = Instant::now();
    let total = rows.len();
    let mut failures = Vec::new();
    for row in &rows {
        let row_started = Instant::now();
        let problems = run_row(&connector, seg.listen_addr, &upstream, row).await;
        let elapsed = row_started.elapsed().as_millis();
        if problems.is_empty() {
            println!("ok   {} ({elapsed} ms)", row.name);
        } else {
            println!("FAIL {} ({elapsed} ms): {}", row.name, problems.join("; "));
            failures.push(format!("{}: {}", row.name, problems.join("; ")));
        }
    }
    println!(
        "upstream response corpus: {total} rows in {:.1} s, {} passed, {} failed",
        started.elapsed().as_secs_f64(),
        total - failures.len(),
        failures.len()
    );
    // The bodies cut after their head had gone to the device (rows 16) are counted as such.
    let cut = support::lab::metric_value(
        &seg.metrics.render(),
        "seg_upstream_errors_total{kind=\"upstream-body-failed\"}",
    );
    if cut < 1.0 {
        failures.push(format!(
            "seg_upstream_errors_total{{kind=\"upstream-body-failed\"}} is {cut} after the cut bodies"
        ));
    }
    seg.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {total} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
