//! A real Redis for the fleet tests: Debian's `redis-server` on a free loopback port, in a
//! temp dir of its own, without persistence (`--save ""`, no AOF), in the foreground; stopped
//! by PID when dropped.
//!
//! [`Redis::start_secured`] is the production shape: TLS only (`rediss://`), client
//! certificates required, the default user off and an ACL user `seg` limited to the `seg:`
//! keys and the command groups seg uses, as `docs/operations.md` sets it up.
//! [`Redis::fleet_config`] is the `[fleet]` lines that reach either.
//!
//! [`Redis::stop`] and [`Redis::restart`] (same port, empty) make the "store down" and
//! "store back" cases; [`Redis::pause`] and [`Redis::resume`] (SIGSTOP, SIGCONT) a store that
//! accepts connections and answers nothing: the slow store. [`Redis::client`] is a plain
//! synchronous client for the test's own reads and writes (the `redis` crate seg uses).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MISSING: &str = "redis-server not found: install it with `apt-get install redis-server` \
     (the README's test command ./tests/run.sh does this)";

/// A running redis-server.
pub struct Redis {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: PathBuf,
    secured: Option<Secured>,
}

/// TLS and ACL settings of [`Redis::start_secured`].
#[derive(Clone)]
pub struct Secured {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// The client certificate seg presents.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// The ACL of [`Redis::start_secured`]: seg's user, the same line docs/operations.md gives.
pub const ACL_USER: &str = "user seg on >fleet-password-0123456789 ~seg:* +@read +@write \
     +@keyspace +@hash +@string +@sortedset +@scripting +@connection -@admin -@dangerous";
pub const ACL_PASSWORD: &str = "fleet-password-0123456789";

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(None)
    }

    /// TLS only, client certificates required, ACL user `seg` ([`ACL_USER`]).
    pub fn start_secured(secured: Secured) -> Redis {
        Redis::start_with(Some(secured))
    }

    fn start_with(secured: Option<Secured>) -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let dir = std::env::temp_dir().join(format!("seg-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut redis = Redis {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            secured,
        };
        redis.launch();
        redis
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join("redis.log")).expect("redis log");
        let port = self.addr.port().to_string();
        let mut command = Command::new("redis-server");
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir);
        match &self.secured {
            None => {
                command.args(["--port", &port]);
            }
            Some(secured) => {
                let acl = self.dir.join("users.acl");
                std::fs::write(&acl, format!("user default off\n{ACL_USER}\n")).expect("ACL file");
                command
                    .args([
                        "--port",
                        "0",
                        "--tls-port",
                        &port,
                        "--tls-auth-clients",
                        "yes",
                    ])
                    .arg("--tls-cert-file")
                    .arg(&secured.server_cert)
                    .arg("--tls-key-file")
                    .arg(&secured.server_key)
                    .arg("--tls-ca-cert-file")
                    .arg(&secured.ca)
                    .arg("--aclfile")
                    .arg(&acl);
            }
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{MISSING}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("redis-server exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {}:\n{}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` when secured.
    pub fn url(&self) -> String {
        match self.secured {
            None => format!("redis://{}", self.addr),
            Some(_) => format!("rediss://{}", self.addr),
        }
    }

    /// The `[fleet]` lines that reach this server (URL, and for a secured one the CA, the
    /// client certificate and the ACL user with its password file).
    pub fn fleet_config(&self) -> String {
        let mut lines = format!("url = \"{}\"\n", self.url());
        if let Some(secured) = &self.secured {
            let password = self.dir.join("password");
            std::fs::write(&password, format!("{ACL_PASSWORD}\n")).expect("password file");
            lines.push_str(&format!(
                "username = \"seg\"\npassword_file = \"{}\"\nca_file = \"{}\"\n\
                 client_certificate = \"{}\"\nclient_key = \"{}\"\n",
                password.display(),
                secured.ca.display(),
                secured.client_cert.display(),
                secured.client_key.display()
            ));
        }
        lines
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// A synchronous client for the test's own commands (as `seg` on a secured server).
    pub fn client(&self) -> redis::Connection {
        let client = match &self.secured {
            None => redis::Client::open(self.url()),
            Some(secured) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let read = |p: &PathBuf| std::fs::read(p).expect("TLS file");
                redis::Client::build_with_tls(
                    format!("rediss://seg:{ACL_PASSWORD}@{}", self.addr),
                    redis::TlsCertificates {
                        client_tls: Some(redis::ClientTlsConfig {
                            client_cert: read(&secured.client_cert),
                            client_key: read(&secured.client_key),
                        }),
                        root_cert: Some(read(&secured.ca)),
                    },
                )
            }
        };
        client
            .and_then(|c| c.get_connection())
            .expect("a connection to the test's redis")
    }

    /// Every key matching `pattern`, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query(&mut self.client())
            .expect("KEYS");
        keys.sort();
        keys
    }

    /// Kills the server: the store is down (its contents are gone).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A new, empty server on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// SIGSTOP: connections are accepted by the kernel, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Redis::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.resume();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
