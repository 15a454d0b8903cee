//! The three proxies under test, each started from its own configuration in the bench's temp
//! dir, pinned with `taskset -c 0`, stopped by PID; and what the bench reads from /proc about
//! them (resident memory, CPU time).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const NGINX_CONF: &str = include_str!("nginx.conf");
const HAPROXY_CFG: &str = include_str!("haproxy.cfg");
const SEG_TOML: &str = include_str!("seg.toml");

/// The core every proxy runs on; the bench, its upstream and slapd use the other one.
pub const PROXY_CORE: &str = "0";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Seg,
    Nginx,
    Haproxy,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Seg, Kind::Nginx, Kind::Haproxy];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Seg => "seg",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn binary(self, seg_bin: &Path) -> PathBuf {
        match self {
            Kind::Seg => seg_bin.to_path_buf(),
            Kind::Nginx => PathBuf::from("/usr/sbin/nginx"),
            Kind::Haproxy => PathBuf::from("/usr/sbin/haproxy"),
        }
    }

    /// Whether the proxy's program is installed.
    pub fn available(self, seg_bin: &Path) -> bool {
        self.binary(seg_bin).is_file()
    }

    /// `nginx -v` / `haproxy -v` / the seg binary's path, for the report.
    pub fn version(self, seg_bin: &Path) -> String {
        let out = match self {
            Kind::Seg => return format!("seg {}", env!("CARGO_PKG_VERSION")),
            Kind::Nginx => Command::new(self.binary(seg_bin)).arg("-v").output(),
            Kind::Haproxy => Command::new(self.binary(seg_bin)).arg("-v").output(),
        };
        out.map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
    }
}

/// What every proxy configuration is made of.
pub struct Setup {
    pub dir: PathBuf,
    pub seg_bin: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key in one PEM (HAProxy's `crt`).
    pub cert_and_key: PathBuf,
    pub ca: PathBuf,
    pub upstream: SocketAddr,
    /// The same upstream behind TLS (its certificate from the fleet CA, for 127.0.0.1).
    pub upstream_tls: SocketAddr,
    pub ldaps_url: String,
    pub base_dn: String,
    pub bind_dn: String,
    pub password_file: PathBuf,
}

/// A running proxy.
pub struct Proxy {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// seg's admin listener (/metrics).
    pub admin: Option<SocketAddr>,
    /// Deployed as operators run it: seg's audit records (stdout and a file), nginx's access
    /// log, HAProxy's request log; otherwise none of them.
    pub logged: bool,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
}

impl Proxy {
    /// Writes the configuration for `kind` on `port` (seg's admin on `admin_port`), toward
    /// the upstream over plain HTTP, or over TLS with `tls_upstream`; with its per-request log
    /// when `logged`.
    pub fn new(
        kind: Kind,
        setup: &Setup,
        ports: (u16, u16),
        tls_upstream: bool,
        logged: bool,
    ) -> Proxy {
        Proxy::build(kind, setup, ports, tls_upstream, logged, None)
    }

    /// Replica `n` of a seg fleet (the `replicas` scenario): the plain configuration with
    /// `extra` appended (its `[fleet]`), in a directory of its own.
    pub fn seg_replica(setup: &Setup, n: usize, ports: (u16, u16), extra: &str) -> Proxy {
        Proxy::build(Kind::Seg, setup, ports, false, false, Some((n, extra)))
    }

    fn build(
        kind: Kind,
        setup: &Setup,
        (port, admin_port): (u16, u16),
        tls_upstream: bool,
        logged: bool,
        replica: Option<(usize, &str)>,
    ) -> Proxy {
        let name = match (tls_upstream, logged, replica) {
            (_, _, Some((n, _))) => format!("{}-r{n}", kind.name()),
            (false, false, None) => kind.name().to_string(),
            (true, _, None) => format!("{}-tls-upstream", kind.name()),
            (false, true, None) => format!("{}-logged", kind.name()),
        };
        let dir = setup.dir.join(name);
        let ca = setup.ca.display().to_string();
        let (scheme, upstream, upstream_ca, haproxy_tls) = match tls_upstream {
            false => ("http", setup.upstream, String::new(), String::new()),
            true => (
                "https",
                setup.upstream_tls,
                format!("ca_file = \"{ca}\""),
                format!(
                    " ssl verify required ca-file {ca} sni str(localhost) verifyhost localhost"
                ),
            ),
        };
        std::fs::create_dir_all(&dir).expect("proxy dir");
        let template = match kind {
            Kind::Seg => SEG_TOML,
            Kind::Nginx => NGINX_CONF,
            Kind::Haproxy => HAPROXY_CFG,
        };
        // Each writes where its operators usually do: seg to stdout (the journal) and a file,
        // nginx to its access log file, HAProxy to stdout.
        // `FLEET_SEG_AUDIT=stdout`: seg's records on stdout only (a build before `[audit]`).
        let seg_audit_file = std::env::var("FLEET_SEG_AUDIT").map_or(true, |v| v != "stdout");
        let logging = match (kind, logged) {
            (Kind::Seg, true) if seg_audit_file => "[audit]\nfile = \"{{DIR}}/audit.log\"",
            (Kind::Seg, true) => "",
            (Kind::Nginx, true) => "access_log {{DIR}}/access.log combined;",
            (Kind::Haproxy, true) => "log stdout format raw local0",
            (Kind::Seg, false) => "",
            (Kind::Nginx, false) => "access_log off;",
            (Kind::Haproxy, false) => "",
        };
        let haproxy_httplog = match logged {
            true => "log global\n    option httplog",
            false => "",
        };
        let text = format!("{template}\n{}", replica.map_or("", |(_, extra)| extra))
            .replace("{{LOGGING}}", logging)
            .replace("{{HAPROXY_HTTPLOG}}", haproxy_httplog)
            .replace("{{DIR}}", &dir.display().to_string())
            .replace("{{PORT}}", &port.to_string())
            .replace("{{ADMIN}}", &admin_port.to_string())
            .replace("{{CERT}}", &setup.cert.display().to_string())
            .replace("{{KEY}}", &setup.key.display().to_string())
            .replace("{{CERTKEY}}", &setup.cert_and_key.display().to_string())
            .replace("{{CA}}", &setup.ca.display().to_string())
            .replace("{{UPSTREAM}}", &upstream.to_string())
            .replace("{{SCHEME}}", scheme)
            .replace("{{UPSTREAM_CA}}", &upstream_ca)
            .replace("{{HAPROXY_UPSTREAM_TLS}}", &haproxy_tls)
            .replace("{{LDAPS}}", &setup.ldaps_url)
            .replace("{{BASE_DN}}", &setup.base_dn)
            .replace("{{BIND_DN}}", &setup.bind_dn)
            .replace(
                "{{PASSWORD_FILE}}",
                &setup.password_file.display().to_string(),
            );
        let (file, args) = match kind {
            Kind::Seg => {
                let file = dir.join("seg.toml");
                let args = vec![
                    "run".into(),
                    "--config".into(),
                    file.display().to_string(),
                    "--threads".into(),
                    "1".into(),
                ];
                (file, args)
            }
            Kind::Nginx => {
                let file = dir.join("nginx.conf");
                let args = vec![
                    "-p".into(),
                    format!("{}/", dir.display()),
                    "-e".into(),
                    dir.join("nginx-error.log").display().to_string(),
                    "-c".into(),
                    file.display().to_string(),
                ];
                (file, args)
            }
            Kind::Haproxy => {
                let file = dir.join("haproxy.cfg");
                let args = vec!["-f".into(), file.display().to_string(), "-db".into()];
                (file, args)
            }
        };
        std::fs::write(&file, text).expect("write proxy config");
        Proxy {
            kind,
            logged,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: (kind == Kind::Seg).then(|| SocketAddr::from(([127, 0, 0, 1], admin_port))),
            program: kind.binary(&setup.seg_bin),
            args,
            log: dir.join("output.log"),
            dir,
            child: None,
        }
    }

    /// Starts the process pinned to the proxy core; does not wait for it to listen.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.kind.name());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("proxy log");
        let child = Command::new("taskset")
            .arg("-c")
            .arg(PROXY_CORE)
            .args(heaptrack_prefix(self.kind))
            .arg(&self.program)
            .args(&self.args)
            // Quiet, seg's audit records are off as the peers' access logs are (warnings still
            // logged); logged, they go to stdout and the `[audit]` file.
            .env("SEG_LOG", if self.logged { "info" } else { "warn" })
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.kind.name()));
        self.child = Some(child);
    }

    /// Starts the process and waits until its listener (and seg's admin) accept connections.
    pub fn start(&mut self) {
        self.spawn();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut targets = vec![self.addr];
        targets.extend(self.admin);
        for target in targets {
            loop {
                if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
                    break;
                }
                if let Some(child) = self.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "{} exited at start ({status}); its output:\n{}",
                            self.kind.name(),
                            std::fs::read_to_string(&self.log).unwrap_or_default()
                        );
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "{} did not listen on {target} within 20 s; its output:\n{}",
                    self.kind.name(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Starts without seg's identity-cache snapshot of an earlier run.
    pub fn start_cold(&mut self) {
        if let Some(snapshot) = self.snapshot_file() {
            let _ = std::fs::remove_file(snapshot);
        }
        self.start();
    }

    /// seg's identity-cache snapshot (written when it stops).
    pub fn snapshot_file(&self) -> Option<PathBuf> {
        (self.kind == Kind::Seg).then(|| self.dir.join("identity-cache.json"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("proxy running").id()
    }

    /// SIGTERM, then SIGKILL after 10 s; returns how long the process took to go.
    pub fn stop(&mut self) -> Duration {
        let Some(mut child) = self.child.take() else {
            return Duration::ZERO;
        };
        let start = Instant::now();
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            // seg drains for its 2 s window, then writes its identity-cache snapshot.
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        start.elapsed()
    }

    /// Resident memory of the proxy process, KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// User plus system CPU time of the whole process (all threads), in seconds.
    /// CPU time used so far, user plus kernel.
    pub fn cpu_seconds(&self) -> f64 {
        let (user, kernel) = self.cpu_split();
        user + kernel
    }

    /// CPU time used so far: (user, kernel) seconds.
    pub fn cpu_split(&self) -> (f64, f64) {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // Fields 14 (utime) and 15 (stime) of proc(5), counted after the command name.
        (
            ticks(11) as f64 / clock_ticks(),
            ticks(12) as f64 / clock_ticks(),
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A port that was free on 127.0.0.1 a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `FLEET_HEAPTRACK=/tmp/seg.heap`: seg runs under heaptrack's preload library, one raw
/// profile per start (`/tmp/seg.heap.0`, `.1`, …; the long-poll phase is `.1`). Read one with
/// `/usr/lib/heaptrack/libexec/heaptrack_interpret < /tmp/seg.heap.1 | gzip > seg.gz` and
/// `heaptrack_print -f seg.gz`. The memory figures of such a run are heaptrack's, not seg's.
fn heaptrack_prefix(kind: Kind) -> Vec<String> {
    static STARTS: AtomicUsize = AtomicUsize::new(0);
    match std::env::var("FLEET_HEAPTRACK") {
        Ok(out) if kind == Kind::Seg => {
            let n = STARTS.fetch_add(1, Ordering::Relaxed);
            vec![
                "env".into(),
                "LD_PRELOAD=/usr/lib/heaptrack/libheaptrack_preload.so".into(),
                format!("DUMP_HEAPTRACK_OUTPUT={out}.{n}"),
            ]
        }
        _ => vec![],
    }
}
