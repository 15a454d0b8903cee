//! A real nginx standing in for Exchange's IIS front end as a *normalising upstream*: it
//! decodes `%2e`, resolves `.` and `..` segments and merges slashes before it picks a
//! location, as IIS does before it picks a virtual directory. So a request target seg
//! forwards verbatim lands where Exchange would act on it, and the access log says where:
//! `/owa/`, `/ecp/`, `/EWS/`, `/PowerShell/`, `/mapi/`, ActiveSync, Autodiscover, or the
//! default location, each answering 200 with a body naming its location.
//!
//! One nginx per test, in a temp dir of its own, in the foreground as a single process
//! (`master_process off`, so it keeps the test's user and one PID to kill), on a free loopback
//! port; killed when dropped. Its access log is JSON lines (`escape=json`), read back as
//! [`SeenRequest`]s.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::lab::TempDir;

const BINARY: &str = "/usr/sbin/nginx";
const MISSING: &str = "nginx not found at /usr/sbin/nginx: install it with \
     `apt-get install nginx` (the README's test command ./tests/run.sh does this)";

/// The locations, first match wins. Regexes with `~*` rather than prefixes: IIS matches
/// virtual directories case-insensitively, so `/OWA/` must land on the owa marker too.
/// nginx matches them against `$uri`, the normalised path (merge_slashes is on by default).
const LOCATIONS: [(&str, &str); 7] = [
    ("owa", "^/owa(/|$)"),
    ("ecp", "^/ecp(/|$)"),
    ("ews", "^/ews(/|$)"),
    ("powershell", "^/powershell(/|$)"),
    ("mapi", "^/mapi(/|$)"),
    ("activesync", "^/microsoft-server-activesync"),
    ("autodiscover", "^/autodiscover/"),
];

/// The markers of Exchange's back-end applications other than ActiveSync and Autodiscover:
/// a request at one of them is one seg should never have let through.
pub const EXCHANGE_BACKENDS: [&str; 5] = ["owa", "ecp", "ews", "powershell", "mapi"];

/// The marker of the catch-all `location /`.
pub const DEFAULT_MARKER: &str = "default";

/// A running nginx.
pub struct NormalisingUpstream {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: TempDir,
}

/// One request as nginx logged it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SeenRequest {
    pub method: String,
    /// The target as received, before any decoding.
    pub request_uri: String,
    /// The path nginx routed by: decoded, dot-segments resolved, slashes merged.
    pub uri: String,
    /// The location that answered (`owa`, `activesync`, `default`…); empty when nginx
    /// refused the request before choosing one (a 400 for `%00`, say).
    pub location: String,
    pub status: String,
    pub x_remote_user: String,
    pub cookie: String,
    pub x_anchormailbox: String,
    pub x_original_url: String,
    pub x_http_method_override: String,
}

impl SeenRequest {
    /// Whether Exchange would have handed this request to OWA, ECP, EWS, PowerShell or MAPI.
    pub fn reached_a_backend(&self) -> bool {
        EXCHANGE_BACKENDS.contains(&self.location.as_str())
    }
}

impl NormalisingUpstream {
    /// Starts nginx; panics with the install hint when it is missing.
    pub fn start() -> NormalisingUpstream {
        assert!(std::path::Path::new(BINARY).is_file(), "{MISSING}");
        let dir = TempDir::new("nginx");
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let conf = dir.write(
            "nginx.conf",
            &config(&dir.path().display().to_string(), port),
        );
        let output = std::fs::File::create(dir.path().join("output.log")).expect("nginx output");
        let child = Command::new(BINARY)
            .arg("-p")
            .arg(format!("{}/", dir.path().display()))
            // The error log before the configuration is read, else /var/log/nginx.
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("nginx output"))
            .stderr(output)
            .spawn()
            .unwrap_or_else(|e| panic!("{MISSING}: {e}"));
        let mut nginx = NormalisingUpstream {
            addr,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if let Some(Ok(Some(status))) = nginx.child.as_mut().map(|c| c.try_wait()) {
                panic!("nginx exited with {status}:\n{}", nginx.log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {addr}:\n{}",
                nginx.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    /// Every request logged so far, oldest first.
    pub fn requests(&self) -> Vec<SeenRequest> {
        // Bytes, not text: nginx's JSON escaping passes bytes above 0x7f through as they
        // came, and a hostile target need not be UTF-8.
        let bytes = std::fs::read(self.access_log()).unwrap_or_default();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("nginx access log line {line:?}: {e}"))
            })
            .collect()
    }

    /// Every request, once the log has stopped growing for a moment. nginx writes a line
    /// when its request ends, just after the response went out, so a client that already
    /// holds the response can read the log a line early.
    pub fn settled_requests(&self) -> Vec<SeenRequest> {
        let quiet = Duration::from_millis(300);
        let deadline = Instant::now() + Duration::from_secs(10);
        let size = || std::fs::metadata(self.access_log()).map_or(0, |m| m.len());
        let mut last = size();
        let mut since = Instant::now();
        while since.elapsed() < quiet && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(25));
            let now = size();
            if now != last {
                last = now;
                since = Instant::now();
            }
        }
        self.requests()
    }

    /// nginx's own output and error log.
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name));
        format!(
            "{}{}",
            read("output.log").unwrap_or_default(),
            read("error.log").unwrap_or_default()
        )
    }

    fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }
}

impl Drop for NormalisingUpstream {
    fn drop(&mut self) {
        // One process (no master, no workers): killing it leaves nothing behind.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The configuration: every location answers with its marker and logs it.
fn config(dir: &str, port: u16) -> String {
    let mut locations = String::new();
    for (marker, regex) in LOCATIONS {
        locations.push_str(&format!(
            "        location ~* \"{regex}\" {{ set $marker {marker}; return 200 \"{marker}\\n\"; }}\n"
        ));
    }
    format!(
        r#"# The test's own nginx (tests/support/nginx.rs). One process, no privilege drop: it runs
# as whoever runs the tests (root in CI), so every path below is the temp dir's.
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    default_type text/plain;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    # $request_uri is the target as received; $uri the path nginx routed by: decoded
    # (%2e%2e is ..), dot-segments resolved, slashes merged (merge_slashes on, the default);
    # IIS resolves the same way before it picks a virtual directory.
    log_format seen escape=json '{{"method":"$request_method","request_uri":"$request_uri",'
        '"uri":"$uri","location":"$marker","status":"$status",'
        '"x_remote_user":"$http_x_remote_user","cookie":"$http_cookie",'
        '"x_anchormailbox":"$http_x_anchormailbox","x_original_url":"$http_x_original_url",'
        '"x_http_method_override":"$http_x_http_method_override"}}';
    access_log {dir}/access.log seen;

    server {{
        listen 127.0.0.1:{port};
        # Requests nginx refuses before choosing a location log an empty marker.
        set $marker "";
{locations}        location / {{ set $marker {DEFAULT_MARKER}; return 200 "{DEFAULT_MARKER}\n"; }}
    }}
}}
"#
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
