//! The fast ActiveSync stand-in behind every proxy, run as a child process of the bench (so
//! its sockets do not count against the bench's own descriptor limit), pinned with the bench
//! to the load generator's core.
//!
//! Hand-written HTTP/1.1 on one tokio thread: every request gets `200` with a 2-byte body and
//! `X-Fleet-Seen-User` echoing the identity header it received. `Cmd=Ping` requests are held
//! until `/_fleet/release` (or, with `X-Fleet-Hold-Ms: n`, for n ms: a heartbeat expiring); while one is held the connection is watched, so a proxy that closes
//! its upstream connection when the device goes away is seen at once (`aborted`). Control:
//! `GET /_fleet/stats` (answer in the `X-Fleet-Stats` header), `/_fleet/release`,
//! `/_fleet/reset` (clears the set of DeviceIds whose Ping arrived).
//!
//! With `FLEET_UPSTREAM_CERT` and `FLEET_UPSTREAM_KEY` set it also listens with TLS on a
//! second port (`TLSPORT <n>`), serving the same requests from the same state: the
//! https:// upstream of the memory measurement with TLS on both hops.

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::http::{connect_plain, find};

#[derive(Default)]
struct Counters {
    held: AtomicU64,
    aborted: AtomicU64,
    completed: AtomicU64,
    requests: AtomicU64,
}

struct State {
    counters: Counters,
    distinct: Mutex<HashSet<String>>,
    release: watch::Sender<u64>,
}

/// The child process's main: binds, prints `PORT <n>`, serves forever.
pub fn child_main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let state = Arc::new(State {
            counters: Counters::default(),
            distinct: Mutex::new(HashSet::new()),
            release: watch::channel(0).0,
        });
        let listener = listen();
        println!("PORT {}", listener.local_addr().expect("addr").port());
        if let Some(acceptor) = tls_acceptor() {
            let tls_listener = listen();
            println!(
                "TLSPORT {}",
                tls_listener.local_addr().expect("addr").port()
            );
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = tls_listener.accept().await else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (acceptor, state) = (acceptor.clone(), Arc::clone(&state));
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            serve(tls, state).await;
                        }
                    });
                }
            });
        }
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(serve(stream, Arc::clone(&state)));
        }
    });
}

fn listen() -> TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    socket.listen(4096).expect("listen")
}

/// The TLS side, when the bench asked for one (`FLEET_UPSTREAM_CERT`, `FLEET_UPSTREAM_KEY`).
fn tls_acceptor() -> Option<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert = std::env::var_os("FLEET_UPSTREAM_CERT")?;
    let key = std::env::var_os("FLEET_UPSTREAM_KEY")?;
    let certs = CertificateDer::pem_file_iter(cert)
        .expect("upstream cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("upstream cert");
    let key = PrivateKeyDer::from_pem_file(key).expect("upstream key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("upstream TLS config");
    Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

struct Head {
    target: String,
    length: usize,
    chunked: bool,
    user: String,
    /// `X-Fleet-Hold-Ms`: how long a Ping is held before it is answered.
    hold_ms: Option<u64>,
}

fn parse_head(head: &str) -> Option<Head> {
    let mut lines = head.split("\r\n");
    let target = lines.next()?.split(' ').nth(1)?.to_string();
    let mut out = Head {
        target,
        length: 0,
        chunked: false,
        user: String::new(),
        hold_ms: None,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            out.length = value.parse().ok()?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            out.chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("x-remote-user") {
            out.user = value.to_string();
        } else if name.eq_ignore_ascii_case("x-fleet-hold-ms") {
            out.hold_ms = value.parse().ok();
        }
    }
    Some(out)
}

fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let query = target.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

async fn read_more<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> bool {
    buf.reserve(4096);
    matches!(stream.read_buf(buf).await, Ok(n) if n > 0)
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, state: Arc<State>) {
    let mut buf = Vec::with_capacity(2048);
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(&mut stream, &mut buf).await {
                return;
            }
        };
        let Some(head) = std::str::from_utf8(&buf[..head_end])
            .ok()
            .and_then(parse_head)
        else {
            return;
        };
        buf.drain(..head_end);
        if head.chunked {
            loop {
                if let Some(i) = find(&buf, b"0\r\n\r\n") {
                    buf.drain(..i + 5);
                    break;
                }
                if !read_more(&mut stream, &mut buf).await {
                    return;
                }
            }
        } else {
            while buf.len() < head.length {
                if !read_more(&mut stream, &mut buf).await {
                    return;
                }
            }
            buf.drain(..head.length);
        }

        let c = &state.counters;
        let mut extra = String::new();
        if let Some(control) = head.target.strip_prefix("/_fleet/") {
            match control {
                "release" => {
                    state.release.send_modify(|g| *g += 1);
                }
                "reset" => state.distinct.lock().unwrap().clear(),
                _ => {}
            }
            extra = format!(
                "X-Fleet-Stats: held={} distinct={} aborted={} completed={} requests={}\r\n",
                c.held.load(Ordering::Relaxed),
                state.distinct.lock().unwrap().len(),
                c.aborted.load(Ordering::Relaxed),
                c.completed.load(Ordering::Relaxed),
                c.requests.load(Ordering::Relaxed),
            );
        } else {
            c.requests.fetch_add(1, Ordering::Relaxed);
            if query_param(&head.target, "Cmd").is_some_and(|v| v.eq_ignore_ascii_case("Ping")) {
                let device = query_param(&head.target, "DeviceId").unwrap_or("");
                state.distinct.lock().unwrap().insert(device.to_string());
                let mut release = state.release.subscribe();
                let expires = tokio::time::sleep(
                    head.hold_ms
                        .map_or(Duration::from_secs(86_400), Duration::from_millis),
                );
                tokio::pin!(expires);
                c.held.fetch_add(1, Ordering::Relaxed);
                let aborted = loop {
                    tokio::select! {
                        _ = release.changed() => break false,
                        _ = &mut expires => break false,
                        more = read_more(&mut stream, &mut buf) => if !more { break true },
                    }
                };
                c.held.fetch_sub(1, Ordering::Relaxed);
                if aborted {
                    c.aborted.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                c.completed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ms-sync.wbxml\r\nContent-Length: 2\r\nX-Fleet-Seen-User: {}\r\n{extra}\r\nok",
            head.user
        );
        if stream.write_all(response.as_bytes()).await.is_err() || stream.flush().await.is_err() {
            return;
        }
    }
}

/// The upstream's counters, as the bench reads them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub held: u64,
    pub distinct: u64,
    pub aborted: u64,
    pub completed: u64,
    pub requests: u64,
}

/// Sends one control request (`stats`, `release`, `reset`) and returns the counters.
pub async fn control(addr: SocketAddr, what: &str) -> io::Result<Stats> {
    let mut conn = connect_plain(addr).await?;
    let request = format!("GET /_fleet/{what} HTTP/1.1\r\nHost: upstream\r\n\r\n");
    let response = conn.request(request.as_bytes()).await?;
    let text = response
        .stats
        .ok_or_else(|| io::Error::other("no X-Fleet-Stats"))?;
    let mut stats = Stats::default();
    for pair in text.split_whitespace() {
        if let Some((k, v)) = pair.split_once('=') {
            let v: u64 = v.parse().unwrap_or(0);
            match k {
                "held" => stats.held = v,
                "distinct" => stats.distinct = v,
                "aborted" => stats.aborted = v,
                "completed" => stats.completed = v,
                "requests" => stats.requests = v,
                _ => {}
            }
        }
    }
    Ok(stats)
}
