//! The test lab: a throwaway enterprise PKI, a real slapd over LDAPS holding AD-shaped
//! accounts, the recording echo upstream, and seg itself started in process on port 0; plus
//! a small HTTP/1.1 client over real TLS handshakes that presents device certificates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use seg::config::Config;
use seg::demo::echo::EchoUpstream;
use seg::demo::pki::{CertAuthority, IssuedCert, LeafSpec};
use seg::{App, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use super::slapd::{bulk_users, Slapd, SlapdOptions, TlsFiles, UserSpec};

/// The enterprise CA's name as AD writes it in `altSecurityIdentities` (most significant first).
pub const CA_AD_NAME: &str = "O=Corp Test,CN=Corp Test Issuing CA";

/// A folder under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "seg-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A device: its certificate and key, on disk and in memory.
#[derive(Clone)]
pub struct Device {
    pub name: String,
    pub issued: IssuedCert,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl Device {
    /// A device whose certificate and key were written by someone else (`seg demo`).
    pub fn from_files(name: &str, cert_path: &Path, key_path: &Path) -> Device {
        let cert_pem = std::fs::read_to_string(cert_path).expect("device cert");
        let key_pem = std::fs::read_to_string(key_path).expect("device key");
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .expect("pem")
            .to_vec();
        Device {
            name: name.into(),
            issued: IssuedCert {
                cert_pem,
                key_pem,
                der,
            },
            cert_path: cert_path.into(),
            key_path: key_path.into(),
        }
    }
}

/// The enterprise PKI of a test.
pub struct Pki {
    pub dir: TempDir,
    pub ca: CertAuthority,
    pub ca_path: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = TempDir::new("pki");
        let ca = CertAuthority::new("Corp Test", "Corp Test Issuing CA").expect("CA");
        let ca_path = dir.write("ca.pem", &ca.cert_pem());
        let server = ca.issue(&LeafSpec::loopback_server()).expect("server cert");
        let server_cert = dir.write("server.pem", &server.cert_pem);
        let server_key = dir.write("server.key", &server.key_pem);
        Pki {
            dir,
            ca,
            ca_path,
            server_cert,
            server_key,
        }
    }

    /// Issues a device certificate from the enterprise CA.
    pub fn device(&self, spec: LeafSpec) -> Device {
        let issued = self.ca.issue(&spec).expect("device cert");
        self.store(&spec.common_name, issued)
    }

    /// Issues a device certificate from another CA the gateway does not trust, named
    /// `ca_name` (the enterprise CA's own name makes an impostor).
    pub fn foreign_device(&self, ca_name: &str, spec: LeafSpec) -> Device {
        let rogue = CertAuthority::new("Corp Test", ca_name).expect("rogue CA");
        let issued = rogue.issue(&spec).expect("foreign cert");
        self.store(&format!("foreign-{}", spec.common_name), issued)
    }

    fn store(&self, name: &str, issued: IssuedCert) -> Device {
        let cert_path = self.dir.write(&format!("{name}.pem"), &issued.cert_pem);
        let key_path = self.dir.write(&format!("{name}.key"), &issued.key_pem);
        Device {
            name: name.into(),
            issued,
            cert_path,
            key_path,
        }
    }
}

/// Reverses a byte string's hex (the Windows `<SR>` serial order).
pub fn reversed_hex(bytes: &[u8]) -> String {
    let mut reversed = bytes.to_vec();
    reversed.reverse();
    seg::identity::hex(&reversed)
}

/// slapd with 1,000 bulk users plus the given ones, over LDAPS with the lab's CA.
pub fn start_slapd(pki: &Pki, users: Vec<UserSpec>) -> Slapd {
    let mut all = bulk_users(1000, "corp.test");
    all.extend(users);
    Slapd::start(SlapdOptions {
        users: all,
        bind_password: "svc-password".into(),
        tls: Some(TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            ca: pki.ca_path.clone(),
        }),
        ..SlapdOptions::default()
    })
}

/// Where seg finds a test directory and how it binds.
pub struct DirectoryRef {
    pub urls: Vec<String>,
    pub base_dn: String,
    pub bind_dn: String,
    pub password: String,
}

impl DirectoryRef {
    /// The lab slapd at the given URLs.
    pub fn slapd(slapd: &Slapd, urls: &[String]) -> DirectoryRef {
        DirectoryRef {
            urls: urls.to_vec(),
            base_dn: slapd.suffix().to_string(),
            bind_dn: slapd.bind_dn(),
            password: "svc-password".into(),
        }
    }
}

/// A configuration pointing at a test directory and upstream; `extra` is appended verbatim.
pub fn config_text(
    pki: &Pki,
    directory: &DirectoryRef,
    upstream: SocketAddr,
    extra: &str,
) -> String {
    let password = pki
        .dir
        .write("bind-password", &format!("{}\n", directory.password));
    let urls: Vec<String> = directory.urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        r#"
[listen]
address = "127.0.0.1:0"
handshake_timeout = "5s"

[tls]
certificate = "{cert}"
private_key = "{key}"
client_ca = "{ca}"

[directory]
urls = [{urls}]
base_dn = "{base}"
bind_dn = "{bind}"
bind_password_file = "{password}"
ca_file = "{ca}"
connect_timeout = "1s"
operation_timeout = "2s"

[mapping]
# The issue-2 suites map by UPN and email too; strong-mapping enforcement has its own table.
enforcement = "compatibility"

[upstream]
url = "http://{upstream}"
# The echo upstream's test controls (src/echo.rs); no ActiveSync header, so listed here.
{echo_controls}

[admin]
address = "127.0.0.1:0"
probe_interval = "200ms"

# The test CA issues the devices itself: it is the NTAuth store.
[ntauth]
file = "{ca}"
{extra}
"#,
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca_path.display(),
        urls = urls.join(", "),
        base = directory.base_dn,
        bind = directory.bind_dn,
        password = password.display(),
        echo_controls = ECHO_CONTROLS,
    )
}

/// `text` (a `config_text`) with `ca` trusted for devices in place of the lab's CA: as client
/// CA bundle and as the NTAuth store.
pub fn trusting(text: &str, pki: &Pki, ca: &Path) -> String {
    text.replace(
        &format!("client_ca = \"{}\"", pki.ca_path.display()),
        &format!("client_ca = \"{}\"", ca.display()),
    )
    .replace(
        &format!("[ntauth]\nfile = \"{}\"", pki.ca_path.display()),
        &format!("[ntauth]\nfile = \"{}\"", ca.display()),
    )
}

/// `text` (a `config_text`) with its `[ntauth]` section replaced by `ntauth` (a whole
/// section, or nothing).
pub fn replace_ntauth(text: &str, ntauth: &str) -> String {
    let start = text.find("\n[ntauth]").expect("the lab's [ntauth] section");
    let end = text[start + 1..]
        .find("\n\n")
        .map_or(text.len(), |e| start + 1 + e);
    format!("{}\n{ntauth}\n{}", &text[..start], &text[end..])
}

/// The `forward_headers` line naming the echo upstream's control headers.
pub const ECHO_CONTROLS: &str = r#"forward_headers = ["x-echo-status", "x-echo-response-header", "x-echo-response-bytes", "x-echo-response-chunked", "x-echo-delay-ms", "x-seq"]"#;

/// Everything one test needs, running.
pub struct Lab {
    pub pki: Pki,
    pub slapd: Slapd,
    pub upstream: EchoUpstream,
    pub seg: Running,
    pub config_path: PathBuf,
}

impl Lab {
    /// PKI, slapd (1,000 bulk users plus `users`), echo upstream and seg.
    pub async fn start(users: Vec<UserSpec>, extra_config: &str) -> Lab {
        let pki = Pki::new();
        Lab::start_with(pki, users, extra_config).await
    }

    pub async fn start_with(pki: Pki, users: Vec<UserSpec>, extra_config: &str) -> Lab {
        let upstream = EchoUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("echo upstream");
        Lab::start_with_upstream(pki, users, extra_config, upstream).await
    }

    /// The lab around a given upstream (one that holds Pings, say).
    pub async fn start_with_upstream(
        pki: Pki,
        users: Vec<UserSpec>,
        extra_config: &str,
        upstream: EchoUpstream,
    ) -> Lab {
        Lab::start_edited(pki, users, upstream, |text| text + extra_config).await
    }

    /// The lab with its configuration text (`config_text`'s) edited before seg starts.
    pub async fn start_edited(
        pki: Pki,
        users: Vec<UserSpec>,
        upstream: EchoUpstream,
        edit: impl FnOnce(String) -> String,
    ) -> Lab {
        let slapd = start_slapd(&pki, users);
        let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
        let text = edit(config_text(&pki, &directory, upstream.addr, ""));
        let config_path = pki.dir.write("seg.toml", &text);
        let seg = start_seg(&config_path).await;
        Lab {
            pki,
            slapd,
            upstream,
            seg,
            config_path,
        }
    }

    pub fn client(&self) -> Client {
        Client::new(self.seg.listen_addr, &self.pki.ca_path)
    }

    /// Restarts seg with its configuration text edited (for keys a reload cannot change).
    pub async fn reconfigure(self, edit: impl Fn(&str) -> String) -> Lab {
        let config_path = self.config_path.clone();
        self.restart_after(|| {
            let text = edit(&std::fs::read_to_string(&config_path).expect("lab config"));
            std::fs::write(&config_path, text).expect("lab config");
        })
        .await
    }

    /// Stops seg, runs `between` (seg is down: its files may change), starts seg again.
    pub async fn restart_after(self, between: impl FnOnce()) -> Lab {
        let Lab {
            pki,
            slapd,
            upstream,
            seg,
            config_path,
        } = self;
        seg.stop().await;
        between();
        let seg = start_seg(&config_path).await;
        Lab {
            pki,
            slapd,
            upstream,
            seg,
            config_path,
        }
    }

    pub fn metric(&self, name_and_labels: &str) -> f64 {
        metric_value(&self.seg.metrics.render(), name_and_labels)
    }
}

/// The value of one sample in a Prometheus exposition, 0 when absent.
pub fn metric_value(exposition: &str, name_and_labels: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// An HTTP response as the device saw it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A device-side client: real TLS handshakes, HTTP/1.1 written by hand.
pub struct Client {
    addr: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
}

/// How a device's TLS client is set up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Any,
    Tls12,
}

impl Client {
    pub fn new(addr: SocketAddr, ca: &Path) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("ca") {
            roots.add(cert.expect("ca cert")).expect("add root");
        }
        Client {
            addr,
            roots: Arc::new(roots),
        }
    }

    /// The TLS connector a device uses (for callers that write their own bytes first).
    pub fn connector_for(&self, device: &Device) -> TlsConnector {
        self.tls(Some(device), TlsVersion::Any)
    }

    fn tls(&self, device: Option<&Device>, version: TlsVersion) -> TlsConnector {
        TlsConnector::from(self.tls_config(device, version))
    }

    fn tls_config(
        &self,
        device: Option<&Device>,
        version: TlsVersion,
    ) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = match version {
            TlsVersion::Any => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls12 => &[&rustls::version::TLS12],
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(Arc::clone(&self.roots));
        let config = match device {
            Some(d) => {
                let certs = vec![CertificateDer::from(d.issued.der.clone())];
                let key = PrivateKeyDer::from_pem_slice(d.issued.key_pem.as_bytes()).expect("key");
                builder
                    .with_client_auth_cert(certs, key)
                    .expect("client auth")
            }
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }

    /// Opens a TLS connection presenting `device` over a TCP connection the caller opened
    /// (from another source address, or with a small receive buffer; see `socket_from`).
    pub async fn connect_over(
        &self,
        tcp: TcpStream,
        device: Option<&Device>,
    ) -> std::io::Result<Connection> {
        let name = ServerName::try_from("localhost").expect("name");
        let stream = self.tls(device, TlsVersion::Any).connect(name, tcp).await?;
        Ok(Connection { stream })
    }

    /// Opens a TLS connection presenting `device` (or no certificate).
    pub async fn connect(
        &self,
        device: Option<&Device>,
        version: TlsVersion,
    ) -> std::io::Result<Connection> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = ServerName::try_from("localhost").expect("name");
        let stream = self.tls(device, version).connect(name, tcp).await?;
        Ok(Connection { stream })
    }

    /// One request on a fresh connection.
    pub async fn post(
        &self,
        device: Option<&Device>,
        target: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<HttpResponse> {
        let mut conn = self.connect(device, TlsVersion::Any).await?;
        conn.request("POST", target, headers, b"").await
    }
}

/// One device connection; requests go out one after another (keep-alive).
pub struct Connection {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
}

impl Connection {
    /// Posts to `target` on this connection every 200 ms, at most `tries` times, while the
    /// answer is `while_status`: the last status (0 once the connection failed). For a
    /// change that reaches open connections in the background (a fetched CRL, say).
    pub async fn post_while(&mut self, target: &str, while_status: u16, tries: usize) -> u16 {
        let mut status = 0;
        for _ in 0..tries {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            status = self
                .request("POST", target, &[], b"")
                .await
                .map(|r| r.status)
                .unwrap_or(0);
            if status != while_status {
                break;
            }
        }
        status
    }

    pub async fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<HttpResponse> {
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        self.send_raw(head.as_bytes()).await?;
        self.send_raw(body).await?;
        self.read_response().await
    }

    /// Reads whatever arrives next; 0 at the end of the stream.
    pub async fn read_some(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        self.stream.read(buffer).await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Reads one response framed by Content-Length (or by the connection's end).
    pub async fn read_response(&mut self) -> std::io::Result<HttpResponse> {
        let mut buffer = Vec::new();
        let header_end = loop {
            if let Some(i) = find(&buffer, b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before a response",
                ));
            }
            buffer.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buffer[..header_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let mut body = buffer[header_end..].to_vec();
        let chunked = headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
        });
        if chunked {
            // Read up to the last chunk, then decode (no trailers, no extensions).
            while find(&body, b"0\r\n\r\n").is_none_or(|i| i != 0 && !body[..i].ends_with(b"\r\n"))
            {
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            let mut decoded = Vec::new();
            let mut rest = body.as_slice();
            while let Some(line_end) = find(rest, b"\r\n") {
                let size = std::str::from_utf8(&rest[..line_end])
                    .ok()
                    .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                    .unwrap_or(0);
                if size == 0 {
                    break;
                }
                let start = line_end + 2;
                decoded.extend_from_slice(&rest[start..(start + size).min(rest.len())]);
                rest = &rest[(start + size + 2).min(rest.len())..];
            }
            return Ok(HttpResponse {
                status,
                headers,
                body: decoded,
            });
        }
        match length {
            Some(len) => {
                while body.len() < len {
                    let mut chunk = [0u8; 4096];
                    let n = self.stream.read(&mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&chunk[..n]);
                }
                body.truncate(len);
            }
            None => {
                let _ = self.stream.read_to_end(&mut body).await;
            }
        }
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A TCP socket bound to `source`, a loopback address (any of 127.0.0.0/8 on Linux), so
/// per-address connection caps see each test client as a device address of its own.
pub fn socket_from(source: [u8; 4]) -> TcpSocket {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("bind a loopback source address");
    socket
}

/// The ActiveSync path with a plain query.
pub fn eas_target(cmd: &str, user: &str) -> String {
    format!(
        "/Microsoft-Server-ActiveSync?Cmd={cmd}&User={user}&DeviceId=TESTDEVICE1&DeviceType=iPhone"
    )
}

/// Asserts a device got no HTTP answer because the TLS handshake was refused.
pub fn assert_refused(result: std::io::Result<HttpResponse>, why: &str) {
    match result {
        Ok(response) => panic!(
            "{why}: expected a refused handshake, got HTTP {}",
            response.status
        ),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("alert")
                    || text.contains("closed")
                    || text.contains("reset")
                    || text.contains("Broken pipe"),
                "{why}: unexpected error {text}"
            );
        }
    }
}

/// Asserts a device's handshake was refused with this TLS alert (rustls's name for it, as in
/// "received fatal alert: CertificateRevoked").
pub fn assert_alert(result: std::io::Result<HttpResponse>, alert: &str, why: &str) {
    match result {
        Ok(response) => panic!(
            "{why}: expected alert {alert}, got HTTP {}",
            response.status
        ),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains(&format!("alert: {alert}")),
                "{why}: expected alert {alert}, got {text}"
            );
        }
    }
}

/// A device whose connections share one TLS client configuration, so the second and later
/// handshakes resume the first session (rustls's in-memory session cache).
pub struct ResumingClient {
    addr: SocketAddr,
    connector: TlsConnector,
}

/// How a device resumes its sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumption {
    /// TLS 1.3, by ticket.
    Tls13Ticket,
    /// TLS 1.2, by ticket (RFC 5077).
    Tls12Ticket,
    /// TLS 1.2, by session ID (the server's session cache).
    Tls12SessionId,
}

impl ResumingClient {
    pub fn new(addr: SocketAddr, ca: &Path, device: &Device) -> ResumingClient {
        let client = Client::new(addr, ca);
        ResumingClient {
            addr,
            connector: client.tls(Some(device), TlsVersion::Any),
        }
    }

    /// A device that resumes only in the given way.
    pub fn resuming_by(
        addr: SocketAddr,
        ca: &Path,
        device: &Device,
        how: Resumption,
    ) -> ResumingClient {
        let client = Client::new(addr, ca);
        let version = match how {
            Resumption::Tls13Ticket => TlsVersion::Any,
            Resumption::Tls12Ticket | Resumption::Tls12SessionId => TlsVersion::Tls12,
        };
        let mut config = (*client.tls_config(Some(device), version)).clone();
        if how == Resumption::Tls12SessionId {
            config.resumption = rustls::client::Resumption::in_memory_sessions(32)
                .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
        }
        ResumingClient {
            addr,
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    /// A new connection, resumed when the server allows it, and whether it was.
    pub async fn connect(&self) -> std::io::Result<(Connection, bool)> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = ServerName::try_from("localhost").expect("name");
        let stream = self.connector.connect(name, tcp).await?;
        let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        Ok((Connection { stream }, resumed))
    }

    /// One request on a new connection (resumed when the server allows it).
    pub async fn post(&self, target: &str) -> std::io::Result<HttpResponse> {
        self.post_to(self.addr, target).await
    }

    /// The same, to another server (a replica).
    pub async fn post_to(&self, addr: SocketAddr, target: &str) -> std::io::Result<HttpResponse> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("name");
        let stream = self.connector.connect(name, tcp).await?;
        let mut conn = Connection { stream };
        conn.request("POST", target, &[], b"").await
    }
}

/// A plain HTTP GET to the admin listener; the whole raw response.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("admin listener");
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.expect("read");
    out
}

/// Polls `/readyz` every 100 ms until its answer starts with `status` (such as
/// `"HTTP/1.1 503"`) and contains `naming`; returns that answer, or panics after `limit`.
pub async fn wait_for_readyz(
    admin: SocketAddr,
    status: &str,
    naming: &str,
    limit: std::time::Duration,
) -> String {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let answer = http_get(admin, "/readyz").await;
        if answer.starts_with(status) && answer.contains(naming) {
            return answer;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never answered {status} naming {naming:?}; last answer:\n{answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// seg built from a configuration file and started.
pub async fn start_seg(config_path: &Path) -> Running {
    start_seg_with_clock(config_path, seg::clock::Clock::system()).await
}

/// seg deciding certificate validity and session age by `clock`, which the test moves.
pub async fn start_seg_with_clock(config_path: &Path, clock: seg::clock::Clock) -> Running {
    let config = Config::load(config_path).unwrap_or_else(|e| panic!("config: {e}"));
    App::build_with_clock(config, clock)
        .unwrap_or_else(|e| panic!("build: {e}"))
        .start()
        .await
        .expect("seg start")
}
