//! A real Redis for the fleet tests: Debian's `redis-server` on a free loopback port, in a
//! temp dir of its own, without persistence (`--save ""`, no AOF), in the foreground; stopped
//! by PID when dropped.
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
}

impl Redis {
    pub fn start() -> Redis {
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
        };
        redis.launch();
        redis
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join("redis.log")).expect("redis log");
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.addr.port().to_string(),
            ])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
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

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// A synchronous client for the test's own commands.
    pub fn client(&self) -> redis::Connection {
        redis::Client::open(self.url())
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
