//! Drives a real ActiveSync client, pyactivesync through `tests/eas_client.py`, with one
//! device's certificate, and holds the conversation every device has with SOGo behind seg,
//! whatever carries the identity from seg to SOGo (a trusted header, or Kerberos delegation
//! through Apache).
//!
//! [`Driver::run`] runs the script to its end and returns its JSON lines ([`Run`]);
//! [`Driver::run_live`] reacts to each line as it arrives (a Ping's "sent"); [`Driver::raw`]
//! sends one request. [`conversation`] is Provision, FolderSync, first and incremental Sync,
//! an idle Ping, a Ping woken by delivered mail, and SendMail from alice read by bob.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::lab::{Device, TempDir};
use super::sogo::Sogo;

/// alice's device in [`conversation`].
pub const ALICE_DEVICE_ID: &str = "SEGALICE1";
/// bob's device in [`conversation`].
pub const BOB_DEVICE_ID: &str = "SEGBOB1";

/// Runs `tests/eas_client.py` against seg with one device's certificate.
pub struct Driver {
    script: PathBuf,
    url: String,
    ca: PathBuf,
    state_dir: TempDir,
}

/// One run of the driver: its JSON lines and exit status.
pub struct Run {
    pub lines: Vec<Value>,
    pub success: bool,
    pub stderr: String,
}

impl Run {
    /// The result line of `step` (the n-th one when a step ran several times).
    pub fn step(&self, step: &str, n: usize) -> &Value {
        self.lines
            .iter()
            .filter(|l| l["step"] == step && l.get("phase").is_none())
            .nth(n)
            .unwrap_or_else(|| panic!("no result #{n} for step {step}: {self:?}"))
    }

    pub fn ok(&self, step: &str, n: usize) -> &Value {
        let line = self.step(step, n);
        assert_eq!(line["ok"], true, "step {step} #{n} failed: {self:?}");
        line
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        write!(f, "exit ok: {}; stderr: {}", self.success, self.stderr)
    }
}

pub fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

impl Driver {
    pub fn new(url: String, ca: &Path) -> Driver {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/eas_client.py");
        let check = Command::new("python3")
            .args(["-c", "import pyactivesync, requests"])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "python3 not found ({e}): install python3 and `pip install pyactivesync==0.17.0` \
                     (the README's test command ./tests/run.sh installs them)"
                )
            });
        if !check.status.success() {
            panic!(
                "pyactivesync missing: `pip install pyactivesync==0.17.0` (the README's test \
                 command ./tests/run.sh installs it)\n{}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
        Driver {
            script,
            url,
            ca: ca.to_path_buf(),
            state_dir: TempDir::new("eas-client"),
        }
    }

    pub fn command(&self, device: &Device, user: &str, device_id: &str, extra: &[&str]) -> Command {
        let mut command = Command::new("python3");
        command
            .arg(&self.script)
            .args(["--url", &self.url])
            .arg("--ca")
            .arg(&self.ca)
            .arg("--cert")
            .arg(&device.cert_path)
            .arg("--key")
            .arg(&device.key_path)
            .args(["--user", user, "--device-id", device_id])
            .arg("--state")
            .arg(self.state_dir.path().join(format!("{device_id}.json")))
            .args(extra);
        command
    }

    /// Runs the driver to its end.
    pub fn run(&self, device: &Device, user: &str, device_id: &str, extra: &[&str]) -> Run {
        let out = self
            .command(device, user, device_id, extra)
            .stdin(Stdio::null())
            .output()
            .expect("running tests/eas_client.py");
        let run = Run {
            lines: String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect(),
            success: out.status.success(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        println!(
            "  {device_id} {extra:?}\n    {}",
            format!("{run:?}").replace('\n', "\n    ")
        );
        run
    }

    /// Runs the driver and calls `react` on every line as it arrives (the Ping's "sent" line).
    pub fn run_live(
        &self,
        device: &Device,
        user: &str,
        device_id: &str,
        extra: &[&str],
        mut react: impl FnMut(&Value),
    ) -> Run {
        let mut child = self
            .command(device, user, device_id, extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running tests/eas_client.py");
        let mut stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut lines = Vec::new();
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            let Ok(value) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            react(&value);
            if value["step"] == "wait" {
                let _ = stdin.write_all(b"go\n");
            }
            lines.push(value);
        }
        drop(stdin);
        let out = child.wait_with_output().expect("driver exit");
        let run = Run {
            lines,
            success: out.status.success(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        println!(
            "  {device_id} {extra:?}\n    {}",
            format!("{run:?}").replace('\n', "\n    ")
        );
        run
    }

    /// One raw request (`--raw-query`), returning the printed line.
    pub fn raw(&self, device: &Device, query: &str, headers: &[&str]) -> Value {
        let mut extra = vec!["--raw-query", query];
        for header in headers {
            extra.push("--header");
            extra.push(header);
        }
        let run = self.run(device, "raw", "RAW", &extra);
        run.lines
            .first()
            .cloned()
            .unwrap_or_else(|| panic!("raw request printed nothing: {run:?}"))
    }
}

/// The conversation every device has, through seg with each user's own certificate.
pub fn conversation(driver: &Driver, sogo: &Sogo, alice: &Device, bob: &Device) {
    sogo.deliver(
        "alice",
        "Welcome alice",
        "first message, there before the device",
    );

    // Provision (SOGo grants no policy key), FolderSync, first Sync, who SOGo serves.
    let run = driver.run(
        alice,
        "alice",
        ALICE_DEVICE_ID,
        &["--steps", "provision,foldersync,sync,whoami"],
    );
    assert!(run.success, "{run:?}");
    assert_eq!(run.ok("provision", 0)["no_policy_key"], true, "{run:?}");
    let folders = run.ok("foldersync", 0);
    let names = strings(&folders["names"]);
    for name in ["INBOX", "Sent", "Drafts", "Trash"] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing from {names:?}"
        );
    }
    assert!(folders["inbox"].is_string(), "{run:?}");
    let first = run.ok("sync", 0);
    assert_eq!(first["first"], true);
    assert_eq!(strings(&first["subjects"]), ["Welcome alice"], "{run:?}");
    assert_eq!(strings(&run.ok("whoami", 0)["emails"]), ["alice@corp.test"]);

    // Incremental Sync: only what arrived since.
    sogo.deliver("alice", "Second for alice", "arrived after the first sync");
    let run = driver.run(alice, "alice", ALICE_DEVICE_ID, &["--steps", "sync,sync"]);
    assert!(run.success, "{run:?}");
    let incremental = run.ok("sync", 0);
    assert_eq!(incremental["first"], false);
    assert_eq!(
        strings(&incremental["subjects"]),
        ["Second for alice"],
        "{run:?}"
    );
    assert_eq!(run.ok("sync", 1)["added"], 0, "{run:?}");

    // An idle Ping: nothing new, Status 1 after the heartbeat.
    let run = driver.run(
        alice,
        "alice",
        ALICE_DEVICE_ID,
        &["--steps", "ping", "--heartbeat", "5"],
    );
    assert!(run.success, "{run:?}");
    let idle = run.ok("ping", 0);
    assert_eq!(idle["status"], "1", "idle ping: {run:?}");
    assert!(idle["seconds"].as_f64().unwrap() >= 4.0, "{run:?}");

    // A Ping woken by mail delivered while it waits, then the Sync that fetches it.
    let mut delivered_at = None;
    let run = driver.run_live(
        alice,
        "alice",
        ALICE_DEVICE_ID,
        &["--steps", "ping,sync", "--heartbeat", "40"],
        |line| {
            if line["step"] == "ping" && line["phase"] == "sent" {
                std::thread::sleep(Duration::from_secs(2));
                sogo.deliver("alice", "Pushed during ping", "the ping should wake up");
                delivered_at = Some(Instant::now());
            }
        },
    );
    assert!(run.success, "{run:?}");
    assert!(delivered_at.is_some(), "{run:?}");
    let woken = run.ok("ping", 0);
    assert_eq!(woken["status"], "2", "ping with new mail: {run:?}");
    assert_eq!(
        strings(&woken["changed"]).len(),
        1,
        "the Inbox changed: {run:?}"
    );
    assert!(woken["seconds"].as_f64().unwrap() < 20.0, "{run:?}");
    assert_eq!(
        strings(&run.ok("sync", 0)["subjects"]),
        ["Pushed during ping"],
        "{run:?}"
    );

    // SendMail from alice, read by bob with his own certificate.
    let run = driver.run(
        alice,
        "alice",
        ALICE_DEVICE_ID,
        &[
            "--steps",
            "sendmail",
            "--to",
            "bob@corp.test",
            "--subject",
            "From alice via seg",
            "--body",
            "sent over ActiveSync through the gateway",
        ],
    );
    assert!(run.success, "{run:?}");
    assert!(
        sogo.smtp_log()
            .iter()
            .any(|l| l.contains("alice@corp.test -> bob: From alice via seg")),
        "SMTP sink saw {:?}",
        sogo.smtp_log()
    );
    let run = driver.run(
        bob,
        "bob",
        BOB_DEVICE_ID,
        &["--steps", "provision,foldersync,sync,whoami,sync"],
    );
    assert!(run.success, "{run:?}");
    let inbox = run.ok("sync", 0);
    assert_eq!(
        strings(&inbox["subjects"]),
        ["From alice via seg"],
        "{run:?}"
    );
    assert!(
        strings(&inbox["from"])[0].contains("alice@corp.test"),
        "{run:?}"
    );
    assert_eq!(strings(&run.ok("whoami", 0)["emails"]), ["bob@corp.test"]);
    assert_eq!(run.ok("sync", 1)["added"], 0, "{run:?}");
}
