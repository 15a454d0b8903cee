//! A real ActiveSync conversation through seg: a real client (pyactivesync, `tests/eas_client.py`)
//! presenting device certificates, seg mapping them against slapd by strong
//! `altSecurityIdentities` bindings, and a real ActiveSync server behind it (SOGo 5.8 with
//! PostgreSQL, Dovecot and memcached, `tests/support/sogo.rs`) that trusts seg's
//! `x-webobjects-remote-user` header.
//!
//! One test function, because SOGo takes seconds to start: the conversation (Provision,
//! FolderSync, first and incremental Sync, an idle Ping and a Ping woken by new mail, SendMail
//! from alice read by bob with his own certificate), then the attacks (alice's certificate
//! naming bob in `User=`, a client-sent `x-webobjects-remote-user` or `Authorization: Basic`,
//! a blocked DeviceType). The attack checks are all run and reported together.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use seg::config::Config;
use seg::demo::pki::LeafSpec;
use seg::App;
use serde_json::Value;
use support::lab::{
    config_text, reversed_hex, start_slapd, Device, DirectoryRef, Pki, TempDir, CA_AD_NAME,
};
use support::slapd::UserSpec;
use support::sogo::Sogo;

const ALICE_SERIAL: [u8; 8] = [0x5e, 0x60, 0xa1, 0x1c, 0xe0, 0x00, 0x00, 0x01];
const BOB_SERIAL: [u8; 8] = [0x5e, 0x60, 0xb0, 0xb0, 0xe0, 0x00, 0x00, 0x02];

fn account(sam: &str, serial: &[u8]) -> UserSpec {
    let mut user = UserSpec::new(sam);
    user.upn = Some(format!("{sam}@corp.test"));
    user.when_created = Some("20200101000000.0Z".into());
    user.alt_security_identities =
        vec![format!("X509:<I>{CA_AD_NAME}<SR>{}", reversed_hex(serial))];
    user
}

/// Runs `tests/eas_client.py` against seg with one device's certificate.
struct Driver {
    script: PathBuf,
    url: String,
    ca: PathBuf,
    state_dir: TempDir,
}

/// One run of the driver: its JSON lines and exit status.
struct Run {
    lines: Vec<Value>,
    success: bool,
    stderr: String,
}

impl Run {
    /// The result line of `step` (the n-th one when a step ran several times).
    fn step(&self, step: &str, n: usize) -> &Value {
        self.lines
            .iter()
            .filter(|l| l["step"] == step && l.get("phase").is_none())
            .nth(n)
            .unwrap_or_else(|| panic!("no result #{n} for step {step}: {self:?}"))
    }

    fn ok(&self, step: &str, n: usize) -> &Value {
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

fn strings(value: &Value) -> Vec<String> {
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
    fn new(url: String, ca: &Path) -> Driver {
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

    fn command(&self, device: &Device, user: &str, device_id: &str, extra: &[&str]) -> Command {
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
    fn run(&self, device: &Device, user: &str, device_id: &str, extra: &[&str]) -> Run {
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
    fn run_live(
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
    fn raw(&self, device: &Device, query: &str, headers: &[&str]) -> Value {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_activesync_client_through_seg_to_sogo() {
    let test_started = Instant::now();
    // SOGo and its servers come up in the background while the PKI and slapd are made.
    let sogo_start = tokio::task::spawn_blocking(Sogo::start);
    let pki = Pki::new();
    let alice_device = pki.device(LeafSpec::device("alice-phone").serial(&ALICE_SERIAL));
    let bob_device = pki.device(LeafSpec::device("bob-phone").serial(&BOB_SERIAL));
    let slapd = tokio::task::block_in_place(|| {
        start_slapd(
            &pki,
            vec![account("alice", &ALICE_SERIAL), account("bob", &BOB_SERIAL)],
        )
    });
    let sogo = match sogo_start.await {
        Ok(sogo) => sogo,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let sogo_ready = test_started.elapsed();

    let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
    let extra = r#"
[identity]
header = "x-webobjects-remote-user"
value = "sam"

[activesync]
block_device_types = ["EvilPhone"]
"#;
    let upstream_line = format!("url = \"{}\"", sogo.url());
    let text = config_text(&pki, &directory, sogo.addr(), extra)
        .replace(
            &upstream_line,
            // sogod closes every connection after its response without saying so
            // (no `Connection: close`): a pooled connection can be dead by the time it is
            // reused, and the device gets a 502. No idle pool toward SOGo.
            &format!("{upstream_line}\npath_prefix = \"/SOGo\"\npool_max_idle_per_host = 0"),
        )
        .replace("enforcement = \"compatibility\"", "enforcement = \"full\"");
    assert!(text.contains("path_prefix = \"/SOGo\""), "{text}");
    let config_path = pki.dir.write("seg-sogo.toml", &text);
    let config = Config::load(&config_path).unwrap_or_else(|e| panic!("config: {e}"));
    let seg = App::build(config)
        .unwrap_or_else(|e| panic!("build: {e}"))
        .start()
        .await
        .expect("seg start");
    let url = format!("https://127.0.0.1:{}", seg.listen_addr.port());

    let conversation_started = Instant::now();
    let driver = Driver::new(url, &pki.ca_path);
    tokio::task::block_in_place(|| conversation(&driver, &sogo, &alice_device, &bob_device));
    let conversation_time = conversation_started.elapsed();

    let attacks_started = Instant::now();
    let failures =
        tokio::task::block_in_place(|| attacks(&driver, &sogo, &alice_device, &bob_device));
    let attacks_time = attacks_started.elapsed();

    println!("SOGo tier timings:");
    for (part, took) in sogo.startup() {
        println!("  start {part:<12} {:>8.2} s", took.as_secs_f64());
    }
    println!(
        "  ready with PKI + slapd   {:>8.2} s",
        sogo_ready.as_secs_f64()
    );
    println!(
        "  conversation             {:>8.2} s",
        conversation_time.as_secs_f64()
    );
    println!(
        "  attacks                  {:>8.2} s",
        attacks_time.as_secs_f64()
    );
    println!("  SMTP sink: {:?}", sogo.smtp_log());
    let stopping = Instant::now();
    drop(seg);
    drop(sogo);
    println!(
        "  stop                     {:>8.2} s",
        stopping.elapsed().as_secs_f64()
    );
    println!(
        "  whole test               {:>8.2} s",
        test_started.elapsed().as_secs_f64()
    );

    assert!(
        failures.is_empty(),
        "{} attack check(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// The conversation every device has, through seg with each user's own certificate.
fn conversation(driver: &Driver, sogo: &Sogo, alice: &Device, bob: &Device) {
    sogo.deliver(
        "alice",
        "Welcome alice",
        "first message, there before the device",
    );

    // Provision (SOGo grants no policy key), FolderSync, first Sync, who SOGo serves.
    let run = driver.run(
        alice,
        "alice",
        "SEGALICE1",
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
    let run = driver.run(alice, "alice", "SEGALICE1", &["--steps", "sync,sync"]);
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
        "SEGALICE1",
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
        "SEGALICE1",
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
        "SEGALICE1",
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
        "SEGBOB1",
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

/// The attacks; every check runs, failures are returned together.
fn attacks(driver: &Driver, sogo: &Sogo, alice: &Device, bob: &Device) -> Vec<String> {
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        println!("  [{}] {what}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failures.push(what);
        }
    };
    let sogo_saw = |device_id: &str| -> Vec<(String, u16)> {
        sogo.requests()
            .into_iter()
            .filter(|(request, _)| request.contains(&format!("DeviceId={device_id}")))
            .collect()
    };

    // Control: alice's own mailbox through a raw request.
    let line = driver.raw(
        alice,
        "Cmd=FolderSync&User=alice&DeviceId=CONTROL1&DeviceType=iPhone",
        &[],
    );
    check(
        line["status"] == 200 && line["folders"].as_u64().unwrap_or(0) >= 4,
        format!("control: alice's FolderSync as alice is served: {line}"),
    );
    // Control for the "never reaches SOGo" checks: SOGo's access log shows what did.
    let seen = sogo_saw("CONTROL1");
    check(
        seen.len() == 1 && seen[0].1 == 200,
        format!("control: SOGo's log shows the control request: {seen:?}"),
    );

    // 1. alice's certificate naming bob in User=.
    let line = driver.raw(
        alice,
        "Cmd=FolderSync&User=bob&DeviceId=ATTACK1&DeviceType=iPhone",
        &[],
    );
    check(
        line["status"] == 403,
        format!("User=bob with alice's certificate → 403: got {line}"),
    );
    let seen = sogo_saw("ATTACK1");
    check(
        seen.is_empty(),
        format!("User=bob with alice's certificate never reaches SOGo: SOGo saw {seen:?}"),
    );
    let run = driver.run(
        alice,
        "bob",
        "ATTACK1B",
        &["--steps", "provision,foldersync"],
    );
    let provision = run.step("provision", 0);
    check(
        provision["ok"] == false && provision["http_status"] == 403,
        format!(
            "a device run as bob with alice's certificate is refused at Provision: {provision}"
        ),
    );
    let seen = sogo_saw("ATTACK1B");
    check(
        seen.is_empty(),
        format!("the device run as bob never reaches SOGo: SOGo saw {seen:?}"),
    );

    // 2. A client-sent identity header, and Basic credentials, are never bob.
    for header in [
        "x-webobjects-remote-user: bob",
        "Authorization: Basic Ym9iOng=",
        "X-WebObjects-Remote-User: bob",
    ] {
        let line = driver.raw(
            alice,
            "Cmd=Settings&User=alice&DeviceId=ATTACK2&DeviceType=iPhone",
            &[header],
        );
        check(
            line["status"] == 200 && strings(&line["emails"]) == ["alice@corp.test"],
            format!("`{header}` from alice's device is served as alice: {line}"),
        );
    }
    let run = driver.run(
        alice,
        "alice",
        "ATTACK2B",
        &[
            "--steps",
            "provision,foldersync,sync,whoami",
            "--header",
            "x-webobjects-remote-user: bob",
            "--basic",
            "bob:x",
        ],
    );
    let served_as_alice = run.success
        && strings(&run.step("whoami", 0)["emails"]) == ["alice@corp.test"]
        && strings(&run.step("sync", 0)["subjects"]).contains(&"Welcome alice".to_string())
        && !strings(&run.step("sync", 0)["subjects"]).contains(&"From alice via seg".to_string());
    check(
        served_as_alice,
        format!("a full device conversation with bob's header and Basic bob:x sees alice's mailbox: {run:?}"),
    );

    // 3. A blocked DeviceType.
    let line = driver.raw(
        alice,
        "Cmd=FolderSync&User=alice&DeviceId=ATTACK3&DeviceType=EvilPhone",
        &[],
    );
    check(
        line["status"] == 403,
        format!("DeviceType=EvilPhone → 403: got {line}"),
    );
    let run = driver.run(
        alice,
        "alice",
        "ATTACK3B",
        &["--steps", "provision", "--device-type", "EvilPhone"],
    );
    check(
        run.step("provision", 0)["http_status"] == 403,
        format!("a device of type EvilPhone is refused at Provision: {run:?}"),
    );
    for device_id in ["ATTACK3", "ATTACK3B"] {
        let seen = sogo_saw(device_id);
        check(
            seen.is_empty(),
            format!("the blocked device {device_id} never reaches SOGo: SOGo saw {seen:?}"),
        );
    }

    // bob's state is untouched: his device's next Sync has nothing new, and every request
    // SOGo saw for User=bob came from bob's own device.
    let run = driver.run(bob, "bob", "SEGBOB1", &["--steps", "sync"]);
    let sync = run.step("sync", 0);
    check(
        run.success && sync["added"] == 0 && sync["changed"] == 0 && sync["deleted"] == 0,
        format!("bob's mailbox unchanged by the attacks: {sync}"),
    );
    let foreign: Vec<(String, u16)> = sogo
        .requests()
        .into_iter()
        .filter(|(r, _)| r.contains("User=bob&") && !r.contains("DeviceId=SEGBOB1"))
        .collect();
    check(
        foreign.is_empty(),
        format!("SOGo saw User=bob only from bob's device: also {foreign:?}"),
    );
    failures
}
