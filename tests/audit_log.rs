//! The audit log as operators run it: `seg run` as a process in front of slapd (LDAPS) and
//! the echo upstream, its lines in a file and on stdout; the file rotated by the real
//! logrotate (`create` with a SIGHUP, then `copytruncate`); a stdout nobody reads, so the
//! queue fills (`drop`: served, dropped, counted; `block`: held until the sink takes lines);
//! SIGKILL, and how many lines it cost.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seg::demo::echo::EchoUpstream;
use seg::demo::pki::LeafSpec;
use support::lab::{
    config_text, http_get, metric_value, start_slapd, Client, Device, DirectoryRef, Pki,
};
use support::slapd::{Slapd, UserSpec};

const SEG: &str = env!("CARGO_BIN_EXE_seg");
const LOGROTATE: &str = "/usr/sbin/logrotate";

/// `seg run` as a process, with what the tests read of it.
struct Gateway {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    /// stdout, while the test has not started reading it for good.
    stdout: Option<BufReader<ChildStdout>>,
    /// stdout's lines, once a reader thread collects them.
    lines: Arc<Mutex<Vec<String>>>,
    pki: Pki,
    alice: Device,
    _slapd: Slapd,
    _upstream: EchoUpstream,
}

impl Gateway {
    /// Starts seg with `audit` as its `[audit]` section; reads stdout up to "seg serving".
    async fn start(audit: &str) -> Gateway {
        let pki = Pki::new();
        let mut alice = UserSpec::new("alice");
        alice.upn = Some("alice@corp.test".into());
        // Created before the certificate, as KB5014754's compatibility mode asks of a UPN
        // mapping.
        alice.when_created = Some("20200101000000.0Z".into());
        let slapd = start_slapd(&pki, vec![alice]);
        let upstream = EchoUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("echo upstream");
        let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
        let text = config_text(
            &pki,
            &directory,
            upstream.addr,
            &format!("[audit]\n{audit}\n"),
        );
        let config = pki.dir.write("seg.toml", &text);
        let mut child = Command::new(SEG)
            .args(["run", "--config", config.to_str().unwrap()])
            .env("SEG_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn seg");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let field = |line: &str, name: &str| -> SocketAddr {
            let start = line.find(&format!("\"{name}\":\"")).expect(name) + name.len() + 4;
            line[start..start + line[start..].find('"').unwrap()]
                .parse()
                .unwrap()
        };
        let (listen, admin) = loop {
            let mut line = String::new();
            if stdout.read_line(&mut line).expect("seg stdout") == 0 {
                panic!("seg exited before serving");
            }
            if line.contains("seg serving") {
                break (field(&line, "listen_addr"), field(&line, "admin_addr"));
            }
        };
        let alice = pki.device(LeafSpec::device("alice").upn("alice@corp.test"));
        Gateway {
            child,
            listen,
            admin,
            stdout: Some(stdout),
            lines: Arc::default(),
            pki,
            alice,
            _slapd: slapd,
            _upstream: upstream,
        }
    }

    /// Reads stdout from now on, in a thread, into `lines`.
    fn read_stdout(&mut self) {
        let stdout = self.stdout.take().expect("stdout read once");
        let lines = Arc::clone(&self.lines);
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { return };
                lines.lock().unwrap().push(line);
            }
        });
    }

    fn client(&self) -> Client {
        Client::new(self.listen, &self.pki.ca_path)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }

    async fn metric(&self, name: &str) -> f64 {
        metric_value(&http_get(self.admin, "/metrics").await, name)
    }

    /// SIGTERM, and the exit status once seg has drained and flushed.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal("-TERM");
        wait(&mut self.child, Duration::from_secs(15))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "seg did not exit in {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Alice's Sync from device `id`.
fn target(id: &str) -> String {
    format!("/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone")
}

/// The audit records in `text`, every line checked to be one JSON object.
fn records(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| l.contains("\"seg::audit\""))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v: &serde_json::Value| v["target"] == "seg::audit")
        .collect()
}

/// The device ids of the audit records in a file, which must hold only whole JSON lines.
fn file_ids(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        !bytes.contains(&0),
        "{} holds NUL bytes: a write landed past the end of a truncated file",
        path.display()
    );
    let text = String::from_utf8(bytes).expect("UTF-8");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "a cut line in {}",
        path.display()
    );
    records(&text)
        .iter()
        .map(|v| v["fields"]["device_id"].as_str().unwrap().to_string())
        .collect()
}

/// Sends one Sync per id on one connection; each must be served.
async fn syncs(gateway: &Gateway, ids: &[String]) {
    let mut conn = gateway
        .client()
        .connect(Some(&gateway.alice), support::lab::TlsVersion::Any)
        .await
        .expect("connect");
    for id in ids {
        let r = conn
            .request("POST", &target(id), &[], b"")
            .await
            .expect("request");
        assert_eq!(r.status, 200, "{id}: {}", r.text());
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i:04}")).collect()
}

/// Waits until `probe` holds, at most `limit`.
async fn until(limit: Duration, what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !probe() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn logrotate(dir: &Path, name: &str, rules: &str) {
    assert!(
        Path::new(LOGROTATE).is_file(),
        "{LOGROTATE} missing: apt-get install -y logrotate (./tests/run.sh does)"
    );
    let config = dir.join(format!("{name}.conf"));
    std::fs::write(&config, rules).unwrap();
    let out = Command::new(LOGROTATE)
        .args(["-f", "-s"])
        .arg(dir.join(format!("{name}.state")))
        .arg(&config)
        .output()
        .expect("run logrotate");
    assert!(
        out.status.success(),
        "logrotate {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn records_reach_the_file_and_stdout_and_survive_both_logrotate_modes() {
    let dir = support::lab::TempDir::new("audit-rotate");
    let file: PathBuf = dir.path().join("audit.log");
    let mut gateway = Gateway::start(&format!("file = \"{}\"", file.display())).await;
    gateway.read_stdout();
    let pid = gateway.child.id();

    // Before any rotation; one request whose User-Agent carries quotes and backslashes,
    // which the record must hold as valid JSON (every other byte is in the unit tests).
    let first = ids("A", 20);
    syncs(&gateway, &first).await;
    let agent = r#"Apple "quoted" \back\slash\"#;
    let r = gateway
        .client()
        .post(
            Some(&gateway.alice),
            &target("H0001"),
            &[("User-Agent", agent)],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    until(Duration::from_secs(5), "first records in the file", || {
        file_ids(&file).len() == first.len() + 1
    })
    .await;
    let hostile = records(&std::fs::read_to_string(&file).unwrap())
        .into_iter()
        .find(|v| v["fields"]["device_id"] == "H0001")
        .expect("the record of the request with a hostile User-Agent");
    assert_eq!(hostile["fields"]["user_agent"], agent);

    // logrotate `create`: the file is renamed, a new one created, seg told with SIGHUP.
    logrotate(
        dir.path(),
        "create",
        &format!(
            "{} {{\n  rotate 5\n  create 0640\n  postrotate\n    kill -HUP {pid}\n  endscript\n}}\n",
            file.display()
        ),
    );
    until(Duration::from_secs(5), "seg reopened the file", || {
        gateway
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("audit file reopened"))
    })
    .await;
    let second = ids("B", 20);
    syncs(&gateway, &second).await;
    until(
        Duration::from_secs(5),
        "second records in the new file",
        || file_ids(&file).len() == second.len(),
    )
    .await;

    // logrotate `copytruncate`: the file is copied, then truncated under seg's open handle.
    logrotate(
        dir.path(),
        "copytruncate",
        &format!("{} {{\n  rotate 5\n  copytruncate\n}}\n", file.display()),
    );
    let third = ids("C", 20);
    syncs(&gateway, &third).await;
    let lines = Arc::clone(&gateway.lines);
    let status = gateway.stop();
    // The reader thread sees stdout's end once seg has exited.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let gateway_stdout = records(&lines.lock().unwrap().join("\n"));
    assert!(status.success(), "seg exited {status}");

    // `create` rotated A… to .1, which `copytruncate` moved on to .2.
    let rotated_first = file_ids(&dir.path().join("audit.log.2"));
    assert_eq!(rotated_first.len(), first.len() + 1);
    assert_eq!(rotated_first[..first.len()], first[..]);
    assert_eq!(file_ids(&dir.path().join("audit.log.1")), second);
    assert_eq!(file_ids(&file), third, "after copytruncate");
    // The same records on stdout, in order.
    let on_stdout: Vec<String> = gateway_stdout
        .iter()
        .map(|v| v["fields"]["device_id"].as_str().unwrap().to_string())
        .collect();
    let all: Vec<String> = [&first[..], &["H0001".to_string()], &second, &third].concat();
    assert_eq!(on_stdout, all);
}

/// Reads stdout from now on, in a thread: all of it, as text.
fn drain(stdout: BufReader<ChildStdout>) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let into = Arc::clone(&text);
    std::thread::spawn(move || {
        let mut stdout = stdout;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match stdout.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n])),
            }
        }
    });
    text
}

#[tokio::test]
async fn a_stdout_nobody_reads_costs_records_counted_never_requests() {
    let mut gateway = Gateway::start("queue_bytes = 65536\nwhen_full = \"drop\"").await;
    // Nobody reads stdout now: the pipe (64 KiB) and the queue (64 KiB) fill.
    let sent = ids("D", 1500);
    let started = Instant::now();
    syncs(&gateway, &sent).await;
    let served_in = started.elapsed();
    let dropped = gateway.metric("seg_audit_records_dropped_total").await;
    assert!(dropped > 0.0, "no record dropped with the sink stalled");
    // Now the sink takes lines again: every record is written or counted as dropped.
    let text = drain(gateway.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    let (written, dropped) = loop {
        let written = gateway.metric("seg_audit_records_written_total").await;
        let dropped = gateway.metric("seg_audit_records_dropped_total").await;
        if written + dropped >= sent.len() as f64 {
            break (written, dropped);
        }
        assert!(
            Instant::now() < deadline,
            "{written} written, {dropped} dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = gateway.stop();
    assert!(status.success());
    let seen = records(&text.lock().unwrap()).len();
    assert_eq!(
        seen as f64, written,
        "records on stdout against the written counter"
    );
    assert_eq!(written + dropped, sent.len() as f64);
    println!(
        "stalled stdout: {} requests served in {:.2} s, {written} records written, {dropped} dropped",
        sent.len(),
        served_in.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdout_nobody_reads_holds_requests_when_records_must_not_be_lost() {
    let mut gateway = Gateway::start("queue_bytes = 65536\nwhen_full = \"block\"").await;
    let sent = ids("E", 1500);
    let client = gateway.client();
    let alice = gateway.alice.clone();
    let requests = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut conn = client
                .connect(Some(&alice), support::lab::TlsVersion::Any)
                .await
                .expect("connect");
            for id in &sent {
                let r = conn
                    .request("POST", &target(id), &[], b"")
                    .await
                    .expect("request");
                assert_eq!(r.status, 200, "{id}");
            }
        })
    };
    // The queue fills and holds the requests: they do not finish while nobody reads.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !requests.is_finished(),
        "1500 requests served with the sink stalled"
    );
    let text = drain(gateway.stdout.take().unwrap());
    tokio::time::timeout(Duration::from_secs(30), requests)
        .await
        .expect("requests finish once the sink takes lines")
        .expect("request task");
    assert_eq!(gateway.metric("seg_audit_records_dropped_total").await, 0.0);
    let status = gateway.stop();
    assert!(status.success());
    let ids_seen: Vec<String> = records(&text.lock().unwrap())
        .iter()
        .map(|v| v["fields"]["device_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids_seen, sent, "every record, in order");
}

/// The crash window: records are written a batch at a time, `flush_interval` after the
/// first of the batch; SIGKILL loses the batch being gathered and nothing older.
#[tokio::test]
async fn sigkill_loses_at_most_the_records_of_the_last_flush_interval() {
    let dir = support::lab::TempDir::new("audit-kill");
    let file: PathBuf = dir.path().join("audit.log");
    let interval = Duration::from_millis(10);
    let gateway = Gateway::start(&format!(
        "file = \"{}\"\nstdout = false\nflush_interval = \"10ms\"",
        file.display()
    ))
    .await;
    let mut conn = gateway
        .client()
        .connect(Some(&gateway.alice), support::lab::TlsVersion::Any)
        .await
        .unwrap();
    let sent = ids("K", 400);
    let mut answered = Vec::new();
    for id in &sent {
        let r = conn.request("POST", &target(id), &[], b"").await.unwrap();
        assert_eq!(r.status, 200);
        answered.push(Instant::now());
    }
    gateway.signal("-KILL");
    let killed = Instant::now();
    let mut gateway = gateway;
    wait(&mut gateway.child, Duration::from_secs(5));
    let kept = file_ids(&file);
    assert_eq!(
        kept[..],
        sent[..kept.len()],
        "the file keeps a prefix of the records"
    );
    let lost = sent.len() - kept.len();
    // Every lost record was answered within the last interval before the kill (with room
    // for the writer's own scheduling on a busy machine).
    let window = answered
        .get(kept.len())
        .map(|at| killed.duration_since(*at))
        .unwrap_or_default();
    println!(
        "SIGKILL after {} answered requests: {lost} records lost, answered in the last {:.1} ms",
        sent.len(),
        window.as_secs_f64() * 1000.0
    );
    assert!(
        window <= interval * 5,
        "a record answered {window:?} before the kill was lost (flush interval {interval:?})"
    );
}
