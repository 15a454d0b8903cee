//! HAProxy as the L4 front of several seg replicas, as customers run it: TCP mode (TLS passes
//! through to seg), round robin, a connection refused by one replica (its listener closed
//! by a drain) retried on another (`retries` + `option redispatch`). Debian's `haproxy`, in
//! the foreground in a temp dir of its own, on a free loopback port; stopped when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MISSING: &str = "haproxy not found: install it with `apt-get install haproxy` \
     (the README's test command ./tests/run.sh does this)";

/// A running HAProxy in front of `backends`.
pub struct Haproxy {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Haproxy {
    pub fn start(backends: &[SocketAddr]) -> Haproxy {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let dir = std::env::temp_dir().join(format!("seg-haproxy-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("haproxy dir");
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(n, addr)| format!("    server r{} {addr}\n", n + 1))
            .collect();
        let config = format!(
            "global\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 1s\n\
             \x20   timeout client 120s\n    timeout server 120s\n    retries 3\n\
             \x20   option redispatch 1\n\nfrontend devices\n    bind 127.0.0.1:{port}\n\
             \x20   default_backend seg\n\nbackend seg\n    balance roundrobin\n{servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).expect("haproxy.cfg");
        let log = std::fs::File::create(dir.join("haproxy.log")).expect("haproxy log");
        let child = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{MISSING}: {e}"));
        let mut haproxy = Haproxy {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&haproxy.addr, Duration::from_millis(100)).is_err() {
            if let Some(Ok(Some(status))) = haproxy.child.as_mut().map(|c| c.try_wait()) {
                panic!("haproxy exited with {status}:\n{}", haproxy.log());
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen:\n{}",
                haproxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        haproxy
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
