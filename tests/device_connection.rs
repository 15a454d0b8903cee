//! The device side of a connection, byte for byte over real TLS: what the abuse corpus
//! (`tests/http_abuse.rs`) leaves open about time, size and TLS. Bodies that trickle, large
//! and chunked responses, `Expect: 100-continue`, HTTP/1.0 keep-alive, devices that leave
//! mid-body or during a held Ping, pipelining past what seg buffers, the idle and head
//! timeouts, and TLS key updates. Each test starts its own lab: a real slapd over LDAPS, the
//! recording echo upstream and seg, and speaks raw HTTP through a rustls client.

mod support;

use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use seg::demo::echo::{EchoUpstream, RecordedRequest};
use seg::demo::pki::LeafSpec;
use support::audit::{audit, capture_audit};
use support::lab::{socket_from, Device, Lab, Pki};
use support::slapd::UserSpec;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Waits until `device_id` has `n` audit records (records are written when a response body
/// ends or its request is dropped), then a moment more to catch a duplicate.
async fn audited(device_id: &str, n: usize) -> Vec<serde_json::Value> {
    wait_until(&format!("{n} audit records for {device_id}"), || {
        audit(device_id).len() >= n
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let records = audit(device_id);
    assert_eq!(
        records.len(),
        n,
        "audit records for {device_id}: {records:#?}"
    );
    records
}

// ---------------------------------------------------------------------------------------
// The lab.

const HANDSHAKE: &str = "handshake_timeout = \"5s\"\n";

/// The lab with `listen` lines added to `[listen]`.
async fn lab(listen: &str, upstream: EchoUpstream) -> Lab {
    capture_audit();
    let users = vec![UserSpec::with_upn("alice")];
    Lab::start_edited(Pki::new(), users, upstream, |base| {
        assert!(base.contains(HANDSHAKE));
        base.replacen(HANDSHAKE, &format!("{HANDSHAKE}{listen}\n"), 1)
    })
    .await
}

async fn echo() -> EchoUpstream {
    EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("echo upstream")
}

/// An upstream that holds every Ping for `hold`.
async fn holding(hold: Duration) -> EchoUpstream {
    EchoUpstream::start_holding("127.0.0.1:0".parse().unwrap(), hold)
        .await
        .expect("echo upstream")
}

fn alice(lab: &Lab) -> Device {
    lab.pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"))
}

/// An ActiveSync target; each test uses device ids of its own, so its audit records and
/// upstream requests are told apart.
fn target(cmd: &str, device_id: &str) -> String {
    format!(
        "/Microsoft-Server-ActiveSync?Cmd={cmd}&User=alice&DeviceId={device_id}&DeviceType=iPhone"
    )
}

/// A request head: `Host`, then `fields`, then the empty line.
fn head(request_line: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut head = format!("{request_line}\r\nHost: localhost\r\n");
    for (name, value) in fields {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

fn post(target: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    head(&format!("POST {target} HTTP/1.1"), fields)
}

/// What the upstream received for one device id.
fn upstream_saw(lab: &Lab, device_id: &str) -> Vec<RecordedRequest> {
    lab.upstream
        .requests()
        .into_iter()
        .filter(|r| r.target.contains(&format!("DeviceId={device_id}&")))
        .collect()
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "waited 5 s for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn timed_out(lab: &Lab, phase: &str) -> f64 {
    lab.metric(&format!(
        "seg_connections_timed_out_total{{phase=\"{phase}\"}}"
    ))
}

// ---------------------------------------------------------------------------------------
// The device's side of the wire.

/// A response as the device read it, framing checked strictly.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Lowercase names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// How many chunks carried the body, when it was chunked.
    chunks: Option<usize>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One device connection: raw bytes out, responses parsed out of what comes back; bytes past
/// a response stay for the next one (pipelining).
struct Wire<S> {
    stream: S,
    received: Vec<u8>,
    /// A slow reader: at most this many bytes between pauses of this length.
    pace: Option<(usize, Duration)>,
    since_pause: usize,
}

/// The device's TLS session over its own TCP connection.
type Tls = TlsStream<TcpStream>;

impl Wire<Tls> {
    async fn open(lab: &Lab, device: &Device) -> Wire<Tls> {
        let tcp = TcpStream::connect(lab.seg.listen_addr)
            .await
            .expect("connect to seg");
        Wire::over(lab, device, tcp).await
    }

    async fn over(lab: &Lab, device: &Device, tcp: TcpStream) -> Wire<Tls> {
        let name = ServerName::try_from("localhost").expect("name");
        let stream = lab
            .client()
            .connector_for(device)
            .connect(name, tcp)
            .await
            .expect("handshake");
        assert_eq!(
            stream.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        Wire::new(stream)
    }

    fn tls(&mut self) -> &mut rustls::ClientConnection {
        self.stream.get_mut().1
    }

    /// Writes bytes under TLS, past rustls: a record of the device's own making.
    async fn send_tcp(&mut self, bytes: &[u8]) {
        let tcp = self.stream.get_mut().0;
        tcp.write_all(bytes).await.expect("tcp write");
    }

    /// `bytes` and the device's close_notify in one flight, one TCP write.
    async fn send_then_close_notify(&mut self, bytes: &[u8]) {
        use std::io::Write as _;
        self.tls().writer().write_all(bytes).expect("plaintext");
        self.tls().send_close_notify();
        self.stream.flush().await.expect("flush");
    }
}

impl<S: AsyncRead + Unpin> Wire<S> {
    fn new(stream: S) -> Wire<S> {
        Wire {
            stream,
            received: Vec::new(),
            pace: None,
            since_pause: 0,
        }
    }

    /// Reads what comes next into `received`; 0 at the end of the stream.
    async fn read_more(&mut self) -> std::io::Result<usize> {
        if let Some((step, pause)) = self.pace {
            if self.since_pause >= step {
                tokio::time::sleep(pause).await;
                self.since_pause = 0;
            }
        }
        let mut chunk = vec![0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        self.received.extend_from_slice(&chunk[..n]);
        self.since_pause += n;
        Ok(n)
    }

    /// Reads until `received` holds `n` bytes.
    async fn fill(&mut self, n: usize) {
        while self.received.len() < n {
            let got = self.read_more().await.expect("read");
            assert!(
                got > 0,
                "the connection ended after {} bytes",
                self.received.len()
            );
        }
    }

    /// Reads until `needle` is in `received`; its position.
    async fn find(&mut self, needle: &[u8]) -> usize {
        let mut from = 0;
        loop {
            if let Some(i) = self.received[from..]
                .windows(needle.len())
                .position(|w| w == needle)
            {
                return from + i;
            }
            from = self.received.len().saturating_sub(needle.len());
            let got = self.read_more().await.expect("read");
            assert!(got > 0, "the connection ended within {:?}", self.text());
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        self.received.drain(..n).collect()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.received[..self.received.len().min(300)]).into_owned()
    }

    /// The next response (an interim one too), within 10 s.
    async fn response(&mut self) -> Reply {
        tokio::time::timeout(Duration::from_secs(10), self.next_response())
            .await
            .expect("a response within 10 s")
    }

    /// The next response, read without a time limit.
    async fn next_response(&mut self) -> Reply {
        let end = self.find(b"\r\n\r\n").await + 4;
        let head = self.take(end);
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut fields);
        let complete = parsed.parse(&head).expect("a response head");
        assert!(complete.is_complete());
        let status = parsed.code.expect("status");
        let headers: Vec<(String, String)> = parsed
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let mut reply = Reply {
            status,
            headers,
            body: Vec::new(),
            chunks: None,
        };
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return reply;
        }
        let chunked = reply
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
        let length = reply
            .header("content-length")
            .map(|n| n.parse::<usize>().expect("content-length"));
        if chunked {
            assert_eq!(length, None, "chunks and a length: {:?}", reply.headers);
            let mut chunks = 0;
            loop {
                let line_end = self.find(b"\r\n").await;
                let line = String::from_utf8(self.take(line_end)).expect("chunk-size line");
                self.take(2);
                let size = usize::from_str_radix(&line, 16)
                    .unwrap_or_else(|_| panic!("chunk-size line {line:?}"));
                self.fill(size + 2).await;
                let data = self.take(size);
                assert_eq!(self.take(2), b"\r\n", "chunk data not followed by CRLF");
                if size == 0 {
                    break;
                }
                chunks += 1;
                reply.body.extend_from_slice(&data);
            }
            reply.chunks = Some(chunks);
        } else if let Some(length) = length {
            self.fill(length).await;
            reply.body = self.take(length);
        } else {
            // Delimited by the connection's end, which must be a clean one (close_notify):
            // without it a cut body could not be told from a whole one.
            loop {
                match self.read_more().await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => panic!("a close-delimited body ended without close_notify: {e}"),
                }
            }
            reply.body = std::mem::take(&mut self.received);
        }
        reply
    }

    /// Whether seg closes the connection within `limit`, sending nothing more.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let before = self.received.len();
        let closed = tokio::time::timeout(limit, async {
            loop {
                match self.read_more().await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok();
        assert_eq!(
            self.received.len(),
            before,
            "unexpected bytes: {:?}",
            self.text()
        );
        closed
    }
}

impl<S: AsyncWrite + Unpin> Wire<S> {
    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }
}

// ---------------------------------------------------------------------------------------
// Request bodies.

/// A phone on a poor network sends its body in small pieces over seconds. seg feeds each
/// piece on as it comes: the upstream must receive the body whole, byte for byte, whichever
/// way its framing was cut into TLS records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_streamed_in_small_pieces_over_seconds_arrives_whole() {
    let lab = lab("", echo().await).await;
    let mut wire = Wire::open(&lab, &alice(&lab)).await;
    let body: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();

    // Chunked, the chunk-size lines and data cut at odd places: 80 pieces over 2.4 s.
    let mut chunked = Vec::new();
    for piece in body.chunks(333) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let started = Instant::now();
    wire.send(&post(
        &target("Sync", "STREAMCHUNKED"),
        &[("Transfer-Encoding", "chunked")],
    ))
    .await;
    for piece in chunked.chunks(chunked.len().div_ceil(80)) {
        wire.send(piece).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(wire.response().await.status, 200);
    assert!(started.elapsed() >= Duration::from_secs(2));
    let seen = upstream_saw(&lab, "STREAMCHUNKED");
    assert_eq!(seen.len(), 1);
    assert!(seen[0].body_complete);
    assert_eq!(seen[0].body, body);

    // By Content-Length on the same connection, in 50 pieces over 1.5 s.
    let length = body.len().to_string();
    wire.send(&post(
        &target("Sync", "STREAMLENGTH"),
        &[("Content-Length", &length)],
    ))
    .await;
    for piece in body.chunks(100) {
        wire.send(piece).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(wire.response().await.status, 200);
    let seen = upstream_saw(&lab, "STREAMLENGTH");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, body);
    assert_eq!(seen[0].header_values("content-length"), [length.as_str()]);
    assert_eq!(audited("STREAMCHUNKED", 1).await[0]["bytes_in"], 5000);
}

/// `Expect: 100-continue`: the device sends its body only after seg's interim answer. seg
/// answers when the upstream asks for the body, so a device that waits is not left waiting;
/// a request refused before its body is needed gets its final answer without a 100, and the
/// connection closes, since where that unsent body would end cannot be known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let lab = lab("", echo().await).await;
    let device = alice(&lab);
    let mut wire = Wire::open(&lab, &device).await;
    let body = vec![b'b'; 4096];
    wire.send(&post(
        &target("Sync", "CONTINUE1"),
        &[("Content-Length", "4096"), ("Expect", "100-continue")],
    ))
    .await;
    let interim = wire.response().await;
    assert_eq!(interim.status, 100, "{interim:?}");
    wire.send(&body).await;
    let reply = wire.response().await;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream_saw(&lab, "CONTINUE1")[0].body, body);

    // The same connection goes on; a request seg refuses itself (no such path) never asks for
    // the body: no 100, the final answer, and the connection's end.
    wire.send(&post(
        "/nowhere?DeviceId=CONTINUE2&",
        &[("Content-Length", "4096"), ("Expect", "100-continue")],
    ))
    .await;
    let refused = wire.response().await;
    assert_eq!(refused.status, 404, "{refused:?}");
    assert!(wire.closed_within(Duration::from_secs(3)).await);
}

/// A body nobody read: skipped when all of it came with the head (the connection goes on),
/// the connection's end when it had not (its bytes must never be read as a request: that
/// would be request smuggling through a refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_nobody_read_is_skipped_when_whole_and_ends_the_connection_when_not() {
    let lab = lab("", echo().await).await;
    let device = alice(&lab);
    let mut wire = Wire::open(&lab, &device).await;
    let mut request = post("/nowhere", &[("Content-Length", "10")]);
    request.extend_from_slice(b"0123456789");
    wire.send(&request).await;
    let refused = wire.response().await;
    assert_eq!(refused.status, 404);
    assert_eq!(refused.header("connection"), None, "the body was skipped");
    wire.send(&post(
        &target("Sync", "UNREAD1"),
        &[("Content-Length", "0")],
    ))
    .await;
    assert_eq!(wire.response().await.status, 200);

    // Only the head: the "body" sent after the refusal is a request of its own. The answer
    // says the connection ends (RFC 9112 §9.6), so the device does not send another.
    let smuggled = post(&target("Sync", "SMUGGLED"), &[("Content-Length", "0")]);
    let length = smuggled.len().to_string();
    wire.send(&post("/nowhere", &[("Content-Length", &length)]))
        .await;
    let refused = wire.response().await;
    assert_eq!(refused.status, 404);
    assert_eq!(refused.header("connection"), Some("close"));
    let _ = wire.stream.write_all(&smuggled).await;
    let _ = wire.stream.flush().await;
    assert!(wire.closed_within(Duration::from_secs(3)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(upstream_saw(&lab, "SMUGGLED").is_empty());
}

/// A refused upload whose body keeps coming: seg answers at once, says the connection ends,
/// and then keeps reading (and dropping) for a moment before it closes. A socket closed with
/// input still arriving answers it with a reset, and across a real network a reset can
/// destroy the answer before the device has read it; so the device's further writes must
/// still be taken for a while, and the connection end cleanly after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_still_coming_is_answered_then_read_away_before_the_close() {
    let lab = lab("", echo().await).await;
    let device = alice(&lab);
    let mut wire = Wire::open(&lab, &device).await;
    wire.send(&post("/nowhere", &[("Content-Length", "4000000")]))
        .await;
    wire.send(&[b'a'; 65536]).await;
    let answer = wire.response().await;
    assert_eq!(answer.status, 404);
    assert_eq!(answer.header("connection"), Some("close"));
    // The phone goes on uploading for a while: each write must still be taken (a reset
    // would fail the next one).
    for piece in 0..4 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let sent = async {
            wire.stream.write_all(&[b'b'; 8192]).await?;
            wire.stream.flush().await
        };
        sent.await
            .unwrap_or_else(|e| panic!("write {piece} after the answer failed: {e}"));
    }
    assert!(wire.closed_within(Duration::from_secs(5)).await);
}

/// A device that goes away mid-body: the upstream must never see a complete request (a
/// half-sent SendMail is not a sent one), and the request is audited once, not as a success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_leaves_mid_body_sends_nothing_complete_upstream() {
    let lab = lab("", echo().await).await;
    let device = alice(&lab);
    for (device_id, close_notify) in [("MIDBODYFIN", false), ("MIDBODYNOTIFY", true)] {
        let mut wire = Wire::open(&lab, &device).await;
        wire.send(&post(
            &target("SendMail", device_id),
            &[("Content-Length", "10000")],
        ))
        .await;
        wire.send(&[b'm'; 3000]).await;
        // Time for seg to forward the head and what came of the body.
        tokio::time::sleep(Duration::from_millis(300)).await;
        if close_notify {
            // TLS's own end of the device's side; its TCP connection stays open.
            wire.tls().send_close_notify();
            wire.stream.flush().await.expect("flush");
        } else {
            drop(wire.stream);
        }
        let records = audited(device_id, 1).await;
        let status = records[0]["status"].as_u64().unwrap();
        assert!(
            status == 400 || status == 499,
            "a device gone mid-body: {records:#?}"
        );
        assert_ne!(records[0]["decision"], "forwarded");
        // The upstream got the request as far as the device sent it, then its connection's
        // end: its body never completed.
        wait_until("the upstream's record", || {
            !upstream_saw(&lab, device_id).is_empty()
        })
        .await;
        let seen = upstream_saw(&lab, device_id);
        assert_eq!(seen.len(), 1);
        assert!(
            !seen[0].body_complete,
            "a complete request reached the upstream"
        );
    }
    assert_eq!(
        lab.metric("seg_requests_total{command=\"SendMail\",status_class=\"2xx\"}"),
        0.0
    );
}

// ---------------------------------------------------------------------------------------
// Responses.

/// A large attachment over a slow link: the device reads steadily but slowly, pausing for
/// less than `listen.write_timeout` each time. The write timeout bounds one blocked write,
/// not the response, so the whole 8 MiB must arrive intact, however long it takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_read_slowly_but_steadily_arrives_intact() {
    let lab = lab("write_timeout = \"1s\"", echo().await).await;
    let device = alice(&lab);
    let socket = socket_from([127, 0, 0, 1]);
    socket
        .set_recv_buffer_size(64 * 1024)
        .expect("small receive buffer");
    let tcp = socket.connect(lab.seg.listen_addr).await.expect("connect");
    let mut wire = Wire::over(&lab, &device, tcp).await;
    const SIZE: usize = 8 << 20;
    wire.pace = Some((1 << 20, Duration::from_millis(450)));
    let started = Instant::now();
    wire.send(&post(
        &target("ItemOperations", "SLOWREADER"),
        &[
            ("Content-Length", "0"),
            ("x-echo-response-bytes", &SIZE.to_string()),
        ],
    ))
    .await;
    let reply = tokio::time::timeout(Duration::from_secs(30), wire.next_response())
        .await
        .expect("the response within 30 s");
    let took = started.elapsed();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-length"),
        Some(SIZE.to_string().as_str())
    );
    assert_eq!(reply.body.len(), SIZE);
    assert!(reply.body.iter().all(|&b| b == b'x'), "corrupted body");
    // Longer than the write timeout several times over: only a blocked write is limited.
    assert!(
        took >= Duration::from_secs(3),
        "read too fast to prove anything: {took:?}"
    );
    assert_eq!(timed_out(&lab, "response_write"), 0.0);
    let record = &audited("SLOWREADER", 1).await[0];
    assert_eq!(record["completed"], true);
    assert_eq!(record["bytes_out"], SIZE as u64);

    // And the connection is still good for the next request.
    wire.pace = None;
    wire.send(&post(
        &target("Sync", "SLOWREADER"),
        &[("Content-Length", "0")],
    ))
    .await;
    assert_eq!(wire.response().await.status, 200);
}

/// An upstream answer without a length reaches an HTTP/1.1 device re-chunked: valid chunks,
/// the last chunk, nothing after it, so the next request on the connection is read right.
/// An HTTP/1.0 device cannot read chunks: it gets the bytes delimited by the connection's
/// end, even though it asked to keep the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upstream_response_is_rechunked_to_the_device() {
    let lab = lab("", echo().await).await;
    let device = alice(&lab);
    let mut wire = Wire::open(&lab, &device).await;
    const SIZE: usize = 300_001;
    let size = SIZE.to_string();
    let chunked_answer = [
        ("Content-Length", "0"),
        ("x-echo-response-bytes", size.as_str()),
        ("x-echo-response-chunked", "1"),
    ];
    wire.send(&post(&target("ItemOperations", "CHUNKS1"), &chunked_answer))
        .await;
    let reply = wire.response().await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-length"), None);
    assert!(reply.chunks.is_some_and(|n| n >= 2), "{:?}", reply.chunks);
    assert_eq!(reply.body.len(), SIZE);
    assert!(reply.body.iter().all(|&b| b == b'x'));
    wire.send(&post(
        &target("Sync", "CHUNKS1"),
        &[("Content-Length", "0")],
    ))
    .await;
    let next = wire.response().await;
    assert_eq!(next.status, 200);
    assert!(next.text().contains("CHUNKS1"));

    let mut old = Wire::open(&lab, &device).await;
    let mut fields = vec![("Connection", "keep-alive")];
    fields.extend_from_slice(&chunked_answer);
    old.send(&head(
        &format!("POST {} HTTP/1.0", target("ItemOperations", "CHUNKS2")),
        &fields,
    ))
    .await;
    let reply = old.response().await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("transfer-encoding"), None);
    assert_eq!(reply.header("connection"), Some("close"));
    assert_eq!(reply.body.len(), SIZE);
}

/// HTTP/1.0 with `Connection: keep-alive` (older ActiveSync stacks): the answer says
/// keep-alive, since 1.0 closes by default, and the connection serves the next request.
/// Without the token the connection ends after the answer, which says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_keep_alive_keeps_the_connection() {
    let lab = lab("", echo().await).await;
    let mut wire = Wire::open(&lab, &alice(&lab)).await;
    for round in 0..2 {
        let mut request = head(
            &format!("POST {} HTTP/1.0", target("Sync", "OLDKEEP")),
            &[("Connection", "keep-alive"), ("Content-Length", "5")],
        );
        request.extend_from_slice(b"hello");
        wire.send(&request).await;
        let reply = wire.response().await;
        assert_eq!(reply.status, 200, "round {round}");
        assert_eq!(reply.header("connection"), Some("keep-alive"));
        assert!(reply.header("content-length").is_some());
    }
    wire.send(&head(
        &format!("POST {} HTTP/1.0", target("Sync", "OLDKEEP")),
        &[("Content-Length", "0")],
    ))
    .await;
    let reply = wire.response().await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(wire.closed_within(Duration::from_secs(3)).await);
    let seen = upstream_saw(&lab, "OLDKEEP");
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].body, b"hello");
}

// ---------------------------------------------------------------------------------------
// Held Pings and pipelining.

/// A device that ends its TLS session (close_notify) while its Ping is held has left: the
/// upstream request is closed at once, not held for the heartbeat, and the Ping is audited
/// as abandoned. The close_notify may come in the same packet as the request itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_notify_during_a_held_ping_aborts_the_upstream_request() {
    let lab = lab("", holding(Duration::from_secs(30)).await).await;
    let device = alice(&lab);
    let ping = post(&target("Ping", "NOTIFYPING"), &[("Content-Length", "0")]);

    let mut wire = Wire::open(&lab, &device).await;
    wire.send(&ping).await;
    wait_until("the Ping held upstream", || {
        lab.upstream.active_holds() == 1
    })
    .await;
    wire.tls().send_close_notify();
    wire.stream.flush().await.expect("flush");
    wait_until("the held Ping aborted", || {
        lab.upstream.aborted_holds() == 1
    })
    .await;

    // The request and the close_notify in one TCP write: the device has left all the same,
    // so the Ping is dropped (before or after it reached the upstream), not held.
    let mut wire = Wire::open(&lab, &device).await;
    wire.send_then_close_notify(&ping).await;
    let records = audited("NOTIFYPING", 2).await;
    assert_eq!(lab.upstream.active_holds(), 0);
    for record in &records {
        assert_eq!(record["status"], 499, "{record:#}");
        assert_eq!(record["decision"], "abandoned");
    }
    wait_until("no long poll in flight", || {
        lab.metric("seg_long_polls_in_flight") == 0.0
    })
    .await;
}

/// A device that pipelines more than seg reads ahead while its Ping is held (seg stops
/// reading past 64 KiB): nothing is lost or reordered, each request is answered in order
/// once the Ping is, and each reaches the upstream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pipelined_past_what_seg_reads_ahead_are_all_answered_in_order() {
    let lab = lab("", holding(Duration::from_millis(1500)).await).await;
    let wire = Wire::open(&lab, &alice(&lab)).await;
    const SYNCS: usize = 150;
    let padding = "p".repeat(1000);
    let mut bytes = post(&target("Ping", "PIPELINE"), &[("Content-Length", "0")]);
    for n in 0..SYNCS {
        bytes.extend(post(
            &target("Sync", "PIPELINE"),
            &[
                ("Content-Length", "0"),
                ("x-seq", &n.to_string()),
                ("x-padding", &padding),
            ],
        ));
    }
    assert!(bytes.len() > 2 * 64 * 1024);
    let (reader, mut writer) = tokio::io::split(wire.stream);
    let sending = tokio::spawn(async move {
        writer.write_all(&bytes).await.expect("pipelined requests");
        writer.flush().await.expect("flush");
        writer
    });
    let mut reader = Wire::new(reader);
    let ping = reader.response().await;
    assert_eq!(ping.status, 200);
    assert_eq!(echoed_header(&ping, "x-seq"), None);
    for n in 0..SYNCS {
        let reply = reader.response().await;
        assert_eq!(reply.status, 200);
        assert_eq!(echoed_header(&reply, "x-seq"), Some(n.to_string()));
    }
    let _writer = sending.await.expect("writer");
    let seqs: Vec<String> = upstream_saw(&lab, "PIPELINE")
        .iter()
        .filter(|r| r.target.contains("Cmd=Sync"))
        .map(|r| r.header_values("x-seq")[0].to_string())
        .collect();
    let wanted: Vec<String> = (0..SYNCS).map(|n| n.to_string()).collect();
    assert_eq!(seqs, wanted);
}

/// A header value as the echo upstream reported receiving it, from its JSON answer.
fn echoed_header(reply: &Reply, name: &str) -> Option<String> {
    let json: serde_json::Value = serde_json::from_slice(&reply.body).expect("echo JSON");
    json["headers"]
        .as_array()?
        .iter()
        .find(|pair| pair[0] == name)
        .and_then(|pair| pair[1].as_str())
        .map(str::to_string)
}

// ---------------------------------------------------------------------------------------
// Timeouts.

/// How trickled bytes travel.
#[derive(Clone, Copy, PartialEq)]
enum Layer {
    /// As plaintext, each piece a TLS record of its own.
    Http,
    /// Raw on the TCP connection, under the device's TLS session.
    Tcp,
}

/// Sends `piece(i)` for i = 0, 1, ... every `every` until seg closes the connection; how long
/// that took.
async fn trickle_until_closed(
    wire: &mut Wire<Tls>,
    every: Duration,
    layer: Layer,
    mut piece: impl FnMut(usize) -> Vec<u8>,
) -> Duration {
    let started = Instant::now();
    for i in 0.. {
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
        let bytes = piece(i);
        let sent = match layer {
            Layer::Tcp => wire.stream.get_mut().0.write_all(&bytes).await,
            Layer::Http => {
                async {
                    wire.stream.write_all(&bytes).await?;
                    wire.stream.flush().await
                }
                .await
            }
        };
        if sent.is_err() {
            break;
        }
        let mut byte = [0u8; 1];
        match tokio::time::timeout(every, wire.stream.read(&mut byte)).await {
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => panic!("seg answered a request that never ended"),
        }
    }
    started.elapsed()
}

/// `listen.idle_timeout` bounds the wait for a whole request head: a silent kept-alive
/// connection is closed and counted as idle; a head that trickles in (slowloris) is closed
/// at the same time however steadily its bytes come, and counted as a slow head; so is a
/// TLS record trickled in below HTTP. A record header over TLS's limit is refused at once,
/// never buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_closes_silent_connections_and_slow_heads() {
    let lab = lab("idle_timeout = \"1s\"", echo().await).await;
    let device = alice(&lab);
    let in_time = Duration::from_millis(900)..Duration::from_millis(2500);

    let mut wire = Wire::open(&lab, &device).await;
    wire.send(&post(&target("Sync", "IDLE"), &[("Content-Length", "0")]))
        .await;
    assert_eq!(wire.response().await.status, 200);
    let started = Instant::now();
    assert!(wire.closed_within(Duration::from_secs(5)).await);
    assert!(
        in_time.contains(&started.elapsed()),
        "{:?}",
        started.elapsed()
    );
    wait_until("an idle close counted", || timed_out(&lab, "idle") == 1.0).await;

    // The head one byte every 100 ms: it would take 15 s.
    let mut wire = Wire::open(&lab, &device).await;
    let request = post(&target("Sync", "SLOWHEAD"), &[("Content-Length", "0")]);
    let took = trickle_until_closed(&mut wire, Duration::from_millis(100), Layer::Http, |i| {
        vec![request[i]]
    })
    .await;
    assert!(in_time.contains(&took), "{took:?}");
    wait_until("a slow head counted", || {
        timed_out(&lab, "request_head") == 1.0
    })
    .await;
    assert!(upstream_saw(&lab, "SLOWHEAD").is_empty());

    // Below HTTP: a record header announcing 18 KiB less a byte (the most rustls takes),
    // then its bytes one at a time. seg keeps the partial record, and the same clock runs;
    // a record under way counts as a head under way, not as silence.
    let mut wire = Wire::open(&lab, &device).await;
    let before = timed_out(&lab, "request_head");
    let took = trickle_until_closed(
        &mut wire,
        Duration::from_millis(100),
        Layer::Tcp,
        |i| match i {
            0 => vec![0x17, 0x03, 0x03, 0x47, 0xff],
            _ => vec![0x42],
        },
    )
    .await;
    assert!(in_time.contains(&took), "{took:?}");
    wait_until("the trickled record counted", || {
        timed_out(&lab, "request_head") == before + 1.0
    })
    .await;

    // A record header over the limit: refused at once (an alert), long before the timeout.
    let mut wire = Wire::open(&lab, &device).await;
    wire.send_tcp(&[0x17, 0x03, 0x03, 0x48, 0x00]).await;
    assert!(wire.closed_within(Duration::from_millis(500)).await);
}

// ---------------------------------------------------------------------------------------
// TLS.

/// TLS 1.3 lets the device rotate its keys whenever it likes (RFC 8446 §4.6.3): between
/// requests, twice in a row, in the middle of a body, and during a held Ping. seg must read
/// on with the new keys and answer with its own update, or the connection is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_updates_from_the_device_keep_the_connection_working() {
    let lab = lab("", holding(Duration::from_millis(1000)).await).await;
    let mut wire = Wire::open(&lab, &alice(&lab)).await;
    let sync = post(&target("Sync", "KEYUPDATE"), &[("Content-Length", "0")]);
    wire.send(&sync).await;
    assert_eq!(wire.response().await.status, 200);

    wire.tls().refresh_traffic_keys().expect("key update");
    wire.send(&sync).await;
    assert_eq!(wire.response().await.status, 200);

    wire.tls().refresh_traffic_keys().expect("key update");
    wire.tls().refresh_traffic_keys().expect("key update");
    wire.send(&sync).await;
    assert_eq!(wire.response().await.status, 200);

    // Mid-body.
    wire.send(&post(
        &target("Sync", "KEYUPDATE"),
        &[("Content-Length", "10")],
    ))
    .await;
    wire.send(b"01234").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    wire.tls().refresh_traffic_keys().expect("key update");
    wire.send(b"56789").await;
    assert_eq!(wire.response().await.status, 200);

    // While a Ping is held: seg reads the update during the wait.
    wire.send(&post(
        &target("Ping", "KEYUPDATE"),
        &[("Content-Length", "0")],
    ))
    .await;
    wait_until("the Ping held", || lab.upstream.active_holds() == 1).await;
    wire.tls().refresh_traffic_keys().expect("key update");
    wire.stream.flush().await.expect("flush");
    assert_eq!(wire.response().await.status, 200);
    assert_eq!(lab.upstream.aborted_holds(), 0);
    wire.send(&sync).await;
    assert_eq!(wire.response().await.status, 200);

    let bodies: Vec<Vec<u8>> = upstream_saw(&lab, "KEYUPDATE")
        .into_iter()
        .map(|r| r.body)
        .collect();
    assert_eq!(bodies.len(), 6);
    assert_eq!(bodies[3], b"0123456789");
}

/// A head seg refuses is counted and audited like any request: a malformed one (400), one
/// over the head limit (431) and the HTTP/2 preface (closed unanswered) each leave one record
/// with decision `refused` and the reason, and count in `seg_requests_total{command="none"}`.
#[tokio::test]
async fn refused_heads_are_counted_and_audited() {
    let lab = lab("", echo().await).await;
    let device = alice(&lab);
    let before = lab.metric("seg_requests_total{command=\"none\",status_class=\"4xx\"}");
    let records_before = support::audit::log_records("request").len();
    let huge = format!(
        "POST /Microsoft-Server-ActiveSync HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let cases: [(&[u8], u64, &str); 3] = [
        (
            b"POST /x HTTP/1.1\r\nBad Header\r\n\r\n",
            400,
            "head-malformed",
        ),
        (huge.as_bytes(), 431, "head-too-large"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "http2-preface"),
    ];
    for (bytes, status, reason) in cases {
        let mut wire = Wire::open(&lab, &device).await;
        wire.send(bytes).await;
        if reason != "http2-preface" {
            assert_eq!(u64::from(wire.response().await.status), status, "{reason}");
        }
        assert!(wire.closed_within(Duration::from_secs(5)).await, "{reason}");
        wait_until(&format!("the record of {reason}"), || {
            support::audit::log_records("request")[records_before..]
                .iter()
                .any(|r| r["reason"] == reason)
        })
        .await;
        let records = support::audit::log_records("request");
        let record = records[records_before..]
            .iter()
            .find(|r| r["reason"] == reason)
            .unwrap();
        assert_eq!(record["decision"], "refused", "{record}");
        assert_eq!(record["status"], status, "{record}");
    }
    assert_eq!(
        lab.metric("seg_requests_total{command=\"none\",status_class=\"4xx\"}"),
        before + 3.0
    );
}
