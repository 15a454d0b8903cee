//! Fault injection: the chaos proxy (`support::chaos`) between seg and a real dependency
//! (slapd over LDAPS, the echo upstream, Samba's KDC), switched between refusing, hanging,
//! slow, resetting and flapping, with the outcome seg documents asserted: statuses,
//! `Retry-After`, how fast the answer comes (generous upper bounds: this is not a benchmark),
//! the audit reason, metrics and what the upstream received.
//!
//! Each directory and upstream scenario has its own slapd (0.3 s to start with 1,000 users)
//! and seg, so one failure names one fault; the KDC scenarios share one Samba AD DC (10 s to
//! provision, one per machine) in one test. Device ids name the scenario: the audit records
//! of every test in this binary go to one capture, read back by device id.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seg::demo::echo::EchoUpstream;
use seg::demo::pki::LeafSpec;
use seg::Running;
use support::audit::{audit, capture_audit};
use support::chaos::{Chaos, Mode};
use support::lab::{
    config_text, reversed_hex, start_slapd, Client, Device, DirectoryRef, HttpResponse, Pki,
    CA_AD_NAME,
};
use support::slapd::{Slapd, UserSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The reason of the last audit record for a device id (records are written when the body
/// ends, so this waits a little for it).
async fn last_reason(device_id: &str) -> String {
    for _ in 0..50 {
        if let Some(last) = audit(device_id).last() {
            return last["reason"].as_str().unwrap_or("").to_string();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no audit record for device id {device_id}");
}

// ---------------------------------------------------------------------------------------
// Accounts, devices, requests.

/// An enabled account mapped strongly by issuer and serial, and its device.
fn account(pki: &Pki, sam: &str, serial: u32) -> (UserSpec, Device) {
    let serial = [
        0x1f,
        (serial >> 16) as u8,
        (serial >> 8) as u8,
        serial as u8,
    ];
    let mut user = UserSpec::new(sam);
    user.upn = Some(format!("{sam}@corp.test"));
    user.alt_security_identities =
        vec![format!("X509:<I>{CA_AD_NAME}<SR>{}", reversed_hex(&serial))];
    let device = pki.device(LeafSpec::device(sam).serial(&serial));
    (user, device)
}

fn target(cmd: &str, user: &str, device_id: &str) -> String {
    format!(
        "/Microsoft-Server-ActiveSync?Cmd={cmd}&User={user}&DeviceId={device_id}&DeviceType=iPhone"
    )
}

/// One POST on a fresh connection; the answer and how long the request took (after the
/// handshake).
async fn eas(
    seg: &Running,
    pki: &Pki,
    device: &Device,
    cmd: &str,
    device_id: &str,
) -> (HttpResponse, Duration) {
    let client = Client::new(seg.listen_addr, &pki.ca_path);
    let mut conn = client
        .connect(Some(device), support::lab::TlsVersion::Any)
        .await
        .unwrap_or_else(|e| panic!("{}: handshake: {e}", device.name));
    let started = Instant::now();
    let response = conn
        .request("POST", &target(cmd, &device.name, device_id), &[], b"")
        .await
        .unwrap_or_else(|e| panic!("{} {cmd}: {e}", device.name));
    (response, started.elapsed())
}

/// 503 with a `Retry-After` of whole seconds within `range`.
fn assert_unavailable(response: &HttpResponse, range: std::ops::RangeInclusive<u64>, what: &str) {
    assert_eq!(response.status, 503, "{what}: {}", response.text());
    let wait: u64 = response
        .header("retry-after")
        .unwrap_or_else(|| panic!("{what}: 503 without Retry-After"))
        .parse()
        .expect("Retry-After in seconds");
    assert!(range.contains(&wait), "{what}: Retry-After {wait}");
}

fn metric(seg: &Running, name: &str) -> f64 {
    support::lab::metric_value(&seg.metrics.render(), name)
}

// ---------------------------------------------------------------------------------------
// The directory behind chaos.

/// slapd (1,000 bulk users plus `users`), one chaos proxy per entry of `modes` in front of
/// its LDAPS port (listed in that order in `directory.urls`), the echo upstream and seg.
struct DirectoryFault {
    pki: Pki,
    slapd: Slapd,
    chaos: Vec<Chaos>,
    _upstream: EchoUpstream,
    seg: Running,
}

async fn directory_fault(
    pki: Pki,
    users: Vec<UserSpec>,
    modes: &[Mode],
    cache: &str,
) -> DirectoryFault {
    capture_audit();
    let slapd = start_slapd(&pki, users);
    let slapd_addr: SocketAddr = slapd
        .ldaps_url()
        .trim_start_matches("ldaps://")
        .parse()
        .expect("slapd address");
    let mut chaos = Vec::new();
    for mode in modes {
        chaos.push(Chaos::start(slapd_addr, *mode).await);
    }
    let urls: Vec<String> = chaos.iter().map(|c| c.url("ldaps")).collect();
    let directory = DirectoryRef::slapd(&slapd, &urls);
    let upstream = EchoUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("echo upstream");
    let text = config_text(
        &pki,
        &directory,
        upstream.addr,
        &format!("[cache]\n{cache}"),
    );
    let config_path = pki.dir.write("seg.toml", &text);
    let seg = support::lab::start_seg(&config_path).await;
    DirectoryFault {
        pki,
        slapd,
        chaos,
        _upstream: upstream,
        seg,
    }
}

impl DirectoryFault {
    async fn sync(&self, device: &Device, device_id: &str) -> (HttpResponse, Duration) {
        eas(&self.seg, &self.pki, device, "Sync", device_id).await
    }

    fn set_account_control(&self, sam: &str, value: u32) {
        self.slapd.modify(&format!(
            "dn: CN={sam},{}\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: {value}\n",
            self.slapd.users_dn()
        ));
    }
}

/// Refused connections: a cached device is served, a new one gets 503 + Retry-After at once
/// (reason directory-unavailable), and seg recovers when the DC comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_refused() {
    let pki = Pki::new();
    let (alice_user, alice) = account(&pki, "alice", 1);
    let (bob_user, bob) = account(&pki, "bob", 2);
    let lab = directory_fault(pki, vec![alice_user, bob_user], &[Mode::Pass], "").await;
    let (r, _) = lab.sync(&alice, "refused-a").await;
    assert_eq!(r.status, 200, "{}", r.text());

    lab.chaos[0].set(Mode::Refuse);
    let (r, _) = lab.sync(&alice, "refused-a").await;
    assert_eq!(r.status, 200, "cached device while the DC refuses");
    let (r, took) = lab.sync(&bob, "refused-b").await;
    assert_unavailable(&r, 30..=30, "new device while the DC refuses");
    assert!(took < Duration::from_secs(2), "refusal took {took:?}");
    assert_eq!(last_reason("refused-b").await, "directory-unavailable");

    lab.chaos[0].set(Mode::Pass);
    let (r, _) = lab.sync(&bob, "refused-b").await;
    assert_eq!(r.status, 200, "after the DC is back: {}", r.text());
}

/// A DC that accepts and never answers (existing connections too): a new device gets 503 +
/// Retry-After within the lookup timeout; a cached one is served from the cache, without
/// waiting for the failing refresh, until the hard TTL, and then gets 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_hanging() {
    let pki = Pki::new();
    let (alice_user, alice) = account(&pki, "alice", 1);
    let (bob_user, bob) = account(&pki, "bob", 2);
    let cache = "soft_ttl = \"1s\"\nhard_ttl = \"6s\"\nlookup_timeout = \"3s\"\n";
    let lab = directory_fault(pki, vec![alice_user, bob_user], &[Mode::Pass], cache).await;
    let (r, _) = lab.sync(&alice, "hang-a").await;
    let admitted = Instant::now();
    assert_eq!(r.status, 200, "{}", r.text());

    lab.chaos[0].set(Mode::Blackhole);
    let (r, took) = lab.sync(&bob, "hang-b").await;
    assert_unavailable(&r, 2..=30, "new device while the DC hangs");
    assert!(
        took < Duration::from_millis(4500),
        "lookup_timeout is 3 s; took {took:?}"
    );
    let reason = last_reason("hang-b").await;
    assert!(
        ["directory-timeout", "directory-unavailable"].contains(&reason.as_str()),
        "{reason}"
    );

    // Within the hard TTL: served, stale after the soft TTL, never waiting for the directory.
    while admitted.elapsed() < Duration::from_millis(4800) {
        let (r, took) = lab.sync(&alice, "hang-a").await;
        assert_eq!(r.status, 200, "cached device at {:?}", admitted.elapsed());
        assert!(
            took < Duration::from_secs(1),
            "a cached answer took {took:?}"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        metric(
            &lab.seg,
            "seg_identity_cache_lookups_total{result=\"stale\"}"
        ) >= 1.0
    );
    // Past the hard TTL: the directory is asked again, and cannot answer.
    tokio::time::sleep(Duration::from_millis(6500).saturating_sub(admitted.elapsed())).await;
    let (r, took) = lab.sync(&alice, "hang-a").await;
    assert_unavailable(&r, 2..=30, "cached device past the hard TTL");
    assert!(took < Duration::from_millis(4500), "took {took:?}");
}

/// The DC's answer is cut by a reset a few bytes into it (and every new connection's TLS
/// handshake too): 503 + Retry-After at once, never a denial built from half an answer; then
/// recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_reset_mid_response() {
    let pki = Pki::new();
    let (alice_user, alice) = account(&pki, "alice", 1);
    let (bob_user, bob) = account(&pki, "bob", 2);
    let lab = directory_fault(pki, vec![alice_user, bob_user], &[Mode::Pass], "").await;
    let (r, _) = lab.sync(&alice, "reset-a").await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The pool's connections are up; the next answer on each is cut after 7 bytes.
    lab.chaos[0].set(Mode::ResetAfter(7));
    let (r, took) = lab.sync(&bob, "reset-b").await;
    assert_unavailable(&r, 2..=30, "answer cut by a reset");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(last_reason("reset-b").await, "directory-unavailable");

    lab.chaos[0].set(Mode::Pass);
    let (r, _) = lab.sync(&bob, "reset-b").await;
    assert_eq!(r.status, 200, "after the resets stop: {}", r.text());
}

/// A DC that is up 400 ms and refusing (resetting its connections) 400 ms, for 5 s: every
/// answer is 200 or 503 + Retry-After, fast; never 403; cached devices always served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_flapping() {
    let pki = Pki::new();
    let (alice_user, alice) = account(&pki, "alice", 1);
    let mut users = vec![alice_user];
    let mut devices = Vec::new();
    for i in 0..40 {
        let (user, device) = account(&pki, &format!("flap{i:02}"), 100 + i);
        users.push(user);
        devices.push(device);
    }
    let lab = directory_fault(pki, users, &[Mode::Pass], "lookup_timeout = \"3s\"\n").await;
    let (r, _) = lab.sync(&alice, "flap-alice").await;
    assert_eq!(r.status, 200, "{}", r.text());

    lab.chaos[0].set(Mode::Flap {
        up: Duration::from_millis(400),
        down: Duration::from_millis(400),
    });
    let (mut served, mut refused) = (0, Vec::new());
    let started = Instant::now();
    for device in &devices {
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
        let (r, took) = lab.sync(device, "flap-cold").await;
        assert!(
            took < Duration::from_secs(4),
            "{}: took {took:?}",
            device.name
        );
        match r.status {
            200 => served += 1,
            503 => {
                assert_unavailable(&r, 2..=30, &device.name);
                refused.push(device);
            }
            other => panic!("{}: HTTP {other} while the DC flaps", device.name),
        }
        let (r, _) = lab.sync(&alice, "flap-alice").await;
        assert_eq!(r.status, 200, "cached device while the DC flaps");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 1, "no device served during the up phases");
    assert!(
        lab.chaos[0].accepted() >= 3,
        "the pool never reconnected: {} connections",
        lab.chaos[0].accepted()
    );
    eprintln!(
        "flapping: {served} served, {} refused, {} connections to the DC",
        refused.len(),
        lab.chaos[0].accepted()
    );

    lab.chaos[0].set(Mode::Pass);
    for device in refused {
        let (r, _) = lab.sync(device, "flap-cold").await;
        assert_eq!(
            r.status,
            200,
            "{} after the flapping: {}",
            device.name,
            r.text()
        );
    }
}

/// Two DCs: the first refuses, then hangs; every lookup is served through the second, within
/// the connect timeout of the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_failover_to_the_second_dc() {
    let pki = Pki::new();
    let (alice_user, alice) = account(&pki, "alice", 1);
    let (bob_user, bob) = account(&pki, "bob", 2);
    let lab = directory_fault(
        pki,
        vec![alice_user, bob_user],
        &[Mode::Refuse, Mode::Pass],
        "lookup_timeout = \"5s\"\n",
    )
    .await;
    let (r, took) = lab.sync(&alice, "failover-a").await;
    assert_eq!(r.status, 200, "first DC refusing: {}", r.text());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(lab.chaos[1].accepted() >= 1);

    // Now the first DC accepts and never answers. Resetting the second one's connections
    // makes the pool connect again, first DC first.
    lab.chaos[0].set(Mode::Blackhole);
    lab.chaos[1].set(Mode::Refuse);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = lab.chaos[0].accepted();
    lab.chaos[1].set(Mode::Pass);
    let (r, took) = lab.sync(&bob, "failover-b").await;
    assert_eq!(r.status, 200, "first DC hanging: {}", r.text());
    // connect_timeout is 1 s per attempt on the first DC; a lookup may try it twice.
    assert!(took < Duration::from_millis(4500), "took {took:?}");
    assert!(
        lab.chaos[0].accepted() > before,
        "the first DC was not tried first"
    );
}

/// An account disabled in the directory while it is up: denied (403 account-disabled) once
/// the soft TTL has passed and the background refresh has run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_up_account_disabled() {
    let pki = Pki::new();
    let (alice_user, alice) = account(&pki, "alice", 1);
    let cache = "soft_ttl = \"1s\"\nhard_ttl = \"60s\"\n";
    let lab = directory_fault(pki, vec![alice_user], &[Mode::Pass], cache).await;
    let (r, _) = lab.sync(&alice, "disable-up").await;
    assert_eq!(r.status, 200, "{}", r.text());

    lab.set_account_control("alice", 514);
    let changed = Instant::now();
    loop {
        let (r, _) = lab.sync(&alice, "disable-up").await;
        if r.status == 403 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            changed.elapsed() < Duration::from_secs(5),
            "still admitted 5 s after the account was disabled (soft_ttl 1 s)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last_reason("disable-up").await, "account-disabled");
}

/// An account disabled while seg cannot reach the directory: the cached admission is served
/// until the hard TTL (the documented staleness bound), then 503 + Retry-After; when the
/// directory is back, 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_down_account_disabled() {
    let pki = Pki::new();
    let (alice_user, alice) = account(&pki, "alice", 1);
    let cache = "soft_ttl = \"1s\"\nhard_ttl = \"5s\"\n";
    let lab = directory_fault(pki, vec![alice_user], &[Mode::Pass], cache).await;
    let (r, _) = lab.sync(&alice, "disable-down").await;
    let admitted = Instant::now();
    assert_eq!(r.status, 200, "{}", r.text());

    lab.chaos[0].set(Mode::Refuse);
    lab.set_account_control("alice", 514);
    while admitted.elapsed() < Duration::from_millis(4300) {
        let (r, _) = lab.sync(&alice, "disable-down").await;
        assert_eq!(
            r.status,
            200,
            "within the hard TTL at {:?}",
            admitted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(5500).saturating_sub(admitted.elapsed())).await;
    let (r, _) = lab.sync(&alice, "disable-down").await;
    assert_unavailable(&r, 30..=30, "past the hard TTL, directory down");
    assert_eq!(last_reason("disable-down").await, "directory-unavailable");

    lab.chaos[0].set(Mode::Pass);
    let back = Instant::now();
    loop {
        let (r, _) = lab.sync(&alice, "disable-down").await;
        if r.status == 403 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(back.elapsed() < Duration::from_secs(5), "no 403 after 5 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last_reason("disable-down").await, "account-disabled");
}

/// Number of cold devices in the slow-directory storm. 400: five times what the lookup
/// limits below admit at once (8 running + 64 queued), which is what exercises the bound;
/// each is a real TLS 1.3 handshake with a client certificate on the 2 shared cores, so
/// 1,000 would triple the run time and only add refusals of the same kind.
const STORM_DEVICES: usize = 400;

/// A slow DC (every chunk delayed 150 ms) and 400 devices nobody has seen, all at once:
/// each gets 200 or 503 + a short random Retry-After (overloaded or timed out) within the
/// lookup timeout, none hangs, and nothing is left behind (connections, tasks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_slow_with_a_storm_of_new_devices() {
    let pki = Pki::new();
    let mut users = Vec::new();
    let mut devices = Vec::new();
    for i in 0..STORM_DEVICES {
        let (user, device) = account(&pki, &format!("storm{i:04}"), 1000 + i as u32);
        users.push(user);
        devices.push(device);
    }
    let cache = "max_concurrent_lookups = 8\nmax_queued_lookups = 64\nlookup_timeout = \"3s\"\n";
    let lab = directory_fault(pki, users, &[Mode::Pass], cache).await;
    let (r, _) = lab.sync(&devices[0], "storm").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let runtime = tokio::runtime::Handle::current().metrics();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks_before = runtime.num_alive_tasks();

    lab.chaos[0].set(Mode::Delay(Duration::from_millis(150)));
    let lab = Arc::new(lab);
    let started = Instant::now();
    let requests: Vec<_> = devices[1..]
        .iter()
        .cloned()
        .map(|device| {
            let lab = Arc::clone(&lab);
            tokio::spawn(async move {
                let (r, took) = lab.sync(&device, "storm").await;
                (device.name, r, took)
            })
        })
        .collect();
    let (mut served, mut refused) = (0, 0);
    let mut longest = Duration::ZERO;
    for request in requests {
        let (name, r, took) = request.await.expect("request task");
        longest = longest.max(took);
        assert!(
            took < Duration::from_secs(5),
            "{name} waited {took:?} (lookup_timeout 3 s)"
        );
        match r.status {
            200 => served += 1,
            503 => {
                assert_unavailable(&r, 2..=30, &name);
                refused += 1;
            }
            other => panic!("{name}: HTTP {other}: {}", r.text()),
        }
    }
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for record in audit("storm") {
        *reasons
            .entry(record["reason"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    eprintln!(
        "storm of {}: {served} served, {refused} refused (reasons {reasons:?}), longest request {longest:?}, all answered in {:?}",
        STORM_DEVICES - 1,
        started.elapsed()
    );
    assert!(
        reasons.get("directory-overloaded").copied().unwrap_or(0) >= 1,
        "the lookup queue never filled"
    );
    assert_eq!(served + refused, STORM_DEVICES - 1);

    // Nothing left behind once the devices are gone.
    let settled = Instant::now();
    loop {
        let open = metric(&lab.seg, "seg_open_connections");
        let tasks = runtime.num_alive_tasks();
        if open == 0.0 && tasks <= tasks_before + 10 {
            break;
        }
        assert!(
            settled.elapsed() < Duration::from_secs(10),
            "10 s after the storm: {open} connections open, {tasks} tasks alive (before: {tasks_before})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lab.chaos[0].set(Mode::Pass);
    let (r, _) = lab.sync(&devices[STORM_DEVICES - 1], "storm-after").await;
    assert_eq!(r.status, 200, "after the storm: {}", r.text());
}

// ---------------------------------------------------------------------------------------
// The upstream behind chaos.

/// slapd (direct), alice, an upstream behind a chaos proxy, and seg.
struct UpstreamFault {
    pki: Pki,
    _slapd: Slapd,
    alice: Device,
    seg: Running,
}

/// seg with `upstream.url` at `upstream`; `adjust` changes the loaded configuration before
/// seg starts, past validation (a `request_timeout` below the 3600 s ActiveSync long polls
/// need, so a test can wait for it).
async fn upstream_fault(
    upstream: SocketAddr,
    extra: &str,
    adjust: impl FnOnce(&mut seg::config::Config, &Pki),
) -> UpstreamFault {
    capture_audit();
    let pki = Pki::new();
    let (alice_user, alice) = account(&pki, "alice", 1);
    let slapd = start_slapd(&pki, vec![alice_user]);
    let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
    let text = config_text(&pki, &directory, upstream, extra);
    let config_path = pki.dir.write("seg.toml", &text);
    let mut config = seg::config::Config::load(&config_path).expect("config");
    adjust(&mut config, &pki);
    let seg = seg::App::build(config)
        .expect("build")
        .start()
        .await
        .expect("seg start");
    UpstreamFault {
        pki,
        _slapd: slapd,
        alice,
        seg,
    }
}

impl UpstreamFault {
    async fn post(&self, cmd: &str, device_id: &str) -> (HttpResponse, Duration) {
        eas(&self.seg, &self.pki, &self.alice, cmd, device_id).await
    }
}

async fn echo() -> EchoUpstream {
    EchoUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("echo upstream")
}

/// An upstream that refuses connections: 502 at once, reason upstream-unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refused() {
    let upstream = echo().await;
    let chaos = Chaos::start(upstream.addr, Mode::Refuse).await;
    let lab = upstream_fault(chaos.addr, "", |_, _| {}).await;
    let (r, took) = lab.post("Sync", "up-refused").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(last_reason("up-refused").await, "upstream-unreachable");
    assert!(upstream.requests().is_empty());
    assert_eq!(
        metric(
            &lab.seg,
            "seg_upstream_errors_total{kind=\"upstream-unreachable\"}"
        ),
        1.0
    );
}

/// An upstream that accepts and never answers: 504 once `upstream.request_timeout` has
/// passed, not before and not much after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_hanging() {
    let upstream = echo().await;
    let chaos = Chaos::start(upstream.addr, Mode::Pass).await;
    let lab = upstream_fault(chaos.addr, "", |config, _| {
        config.upstream.request_timeout = Duration::from_secs(2);
    })
    .await;
    let (r, _) = lab.post("Sync", "up-hang").await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The pooled connection and any new one both hang.
    chaos.set(Mode::Blackhole);
    for _ in 0..2 {
        let (r, took) = lab.post("FolderSync", "up-hang").await;
        assert_eq!(r.status, 504, "{}", r.text());
        assert!(
            (Duration::from_millis(1900)..Duration::from_millis(3500)).contains(&took),
            "request_timeout is 2 s; took {took:?}"
        );
        assert_eq!(last_reason("up-hang").await, "upstream-timeout");
    }
}

/// The upstream's answer is cut by a reset: in its head → 502 upstream-failed; in its body
/// (the 200 head already went to the device) → the device's connection ends before the
/// announced length and the audit record says not completed. Either way the request reached
/// the upstream exactly once: a POST is never sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_response_is_not_retried() {
    let upstream = echo().await;
    let chaos = Chaos::start(upstream.addr, Mode::Pass).await;
    let lab = upstream_fault(chaos.addr, "", |_, _| {}).await;
    let (r, _) = lab.post("Sync", "up-reset").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(upstream.requests().len(), 1);

    // Cut 20 bytes into the head, on the pooled connection and on new ones: three POSTs.
    chaos.set(Mode::ResetAfter(20));
    for i in 0..3 {
        let (r, took) = lab.post("Sync", "up-reset-head").await;
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert_eq!(last_reason("up-reset-head").await, "upstream-failed");
        assert_eq!(
            upstream.requests().len(),
            2 + i,
            "a POST reset mid-response was sent again"
        );
    }

    // Cut in the body: the echo's head is about 110 bytes, its body several hundred.
    chaos.set(Mode::ResetAfter(160));
    let client = Client::new(lab.seg.listen_addr, &lab.pki.ca_path);
    let mut conn = client
        .connect(Some(&lab.alice), support::lab::TlsVersion::Any)
        .await
        .expect("connect");
    let outcome = conn
        .request("POST", &target("Sync", "alice", "up-reset-body"), &[], b"")
        .await;
    if let Ok(r) = &outcome {
        assert_eq!(r.status, 200, "the head was complete");
        let announced: usize = r
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(usize::MAX);
        assert!(
            r.body.len() < announced,
            "a body cut by the upstream's reset arrived whole ({} bytes)",
            r.body.len()
        );
    }
    let mut record = None;
    for _ in 0..50 {
        record = audit("up-reset-body").pop();
        if record.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let record = record.expect("audit record of the cut response");
    assert_eq!(record["completed"], false, "{record}");
    assert_eq!(upstream.requests().len(), 5);
}

/// A response a real server does not produce on demand: an in-process fake that answers
/// every request with bytes that are not HTTP. 502 upstream-failed, the request sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_malformed_response() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(Mutex::new(0usize));
    let seen = Arc::clone(&heads);
    let fake = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
                *seen.lock().unwrap() += 1;
                let _ = tcp
                    .write_all(b"HTTP/1.1 2x0 \x01\x02garbage\r\n\xff\xfe: ?\r\n\r\n")
                    .await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    let lab = upstream_fault(addr, "", |_, _| {}).await;
    let (r, took) = lab.post("Sync", "up-garbage").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(last_reason("up-garbage").await, "upstream-failed");
    assert_eq!(*heads.lock().unwrap(), 1, "the POST was sent again");
    fake.abort();
}

/// Long polls fill the gateway's cap (6 held Pings, each held 4 s upstream; fewer than the
/// per-certificate connection cap of 8, as all come from one device): the next Ping
/// gets 503 + Retry-After at once, and a Sync from the same account is still served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_long_polls_do_not_starve_other_requests() {
    let upstream = EchoUpstream::start_holding(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Duration::from_secs(4),
    )
    .await
    .expect("holding upstream");
    let chaos = Chaos::start(upstream.addr, Mode::Pass).await;
    let extra = "[activesync]\nmax_long_polls = 6\nmax_long_polls_per_account = 100\n";
    let lab = Arc::new(upstream_fault(chaos.addr, extra, |_, _| {}).await);
    let (r, _) = lab.post("Sync", "poll-sync").await;
    assert_eq!(r.status, 200, "{}", r.text());

    let pings: Vec<_> = (0..6)
        .map(|i| {
            let lab = Arc::clone(&lab);
            tokio::spawn(async move { lab.post("Ping", &format!("poll-{i}")).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    while upstream.active_holds() < 6 {
        assert!(
            Instant::now() < deadline,
            "{} Pings held",
            upstream.active_holds()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&lab.seg, "seg_long_polls_in_flight"), 6.0);

    let (r, took) = lab.post("Ping", "poll-extra").await;
    assert_unavailable(&r, 1..=30, "Ping past the gateway's cap");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(last_reason("poll-extra").await, "long-poll-cap-gateway");
    let (r, took) = lab.post("Sync", "poll-sync").await;
    assert_eq!(r.status, 200, "Sync while the cap is full: {}", r.text());
    assert!(took < Duration::from_secs(1), "took {took:?}");

    for ping in pings {
        let (r, took) = ping.await.expect("ping task");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(took < Duration::from_secs(7), "took {took:?}");
    }
    assert_eq!(metric(&lab.seg, "seg_long_polls_in_flight"), 0.0);
}

/// New upstream connections are opened `upstream.max_connecting` at a time. With 2 slots and
/// an https:// upstream whose handshakes never complete (a blackhole in front of it), four
/// requests at once open two connections, not four; every request ends in 502
/// upstream-unreachable within its connect timeout and its wait for a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connects_are_opened_a_few_at_a_time() {
    let upstream = echo().await;
    let chaos = Chaos::start(upstream.addr, Mode::Blackhole).await;
    let url = format!("https://{}", chaos.addr);
    let lab = Arc::new(
        upstream_fault(chaos.addr, "", |config, pki| {
            config.upstream.url = url.parse().expect("url");
            config.upstream.ca_file = Some(pki.ca_path.clone());
            config.upstream.max_connecting = 2;
            config.upstream.connect_timeout = Duration::from_secs(2);
            // The readiness probe's connects would count too: one, at the start.
            config.admin.probe_interval = Duration::from_secs(3600);
        })
        .await,
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let probes = chaos.accepted();
    let posts: Vec<_> = (0..4)
        .map(|i| {
            let lab = Arc::clone(&lab);
            tokio::spawn(async move { lab.post("Sync", &format!("slots-{i}")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        chaos.accepted() - probes,
        2,
        "connections opened while four requests wanted one"
    );
    for post in posts {
        let (r, took) = post.await.expect("post task");
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(took < Duration::from_secs(6), "took {took:?}");
    }
    for i in 0..4 {
        assert_eq!(
            last_reason(&format!("slots-{i}")).await,
            "upstream-unreachable"
        );
    }
    assert!(upstream.requests().is_empty());
    assert_eq!(metric(&lab.seg, "seg_upstream_connect_waits_total"), 2.0);
}

// ---------------------------------------------------------------------------------------
// The KDC behind chaos.

/// Runs futures concurrently on this task; their outputs in order.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (future, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *output = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.into_iter().map(|o| o.expect("ready")).collect()
}

/// Threads of this process (tokio's blocking pool included): GSSAPI calls block one each.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Kerberos mode against a real Samba AD DC (directory over LDAPS directly, KDC through the
/// chaos proxy: krb5.conf names the proxy's port and `udp_preference_limit = 1` forces TCP)
/// and the echo upstream, which records what it was sent. One Samba for every KDC fault: it
/// takes 10 s to provision and only one can run on a machine.
///
/// A KDC that refuses or hangs: a device whose credential is cached keeps being served; one
/// without gets 503 + Retry-After (kdc-unavailable, kdc-timeout) within `exchange_timeout`,
/// and its request never reaches the upstream, neither with a header identity nor without
/// any identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kdc_refused_and_hanging() {
    capture_audit();
    let pki = Pki::new();
    let samba = support::samba::Samba::start_with_pki(&pki);
    let work = support::lab::TempDir::new("kdc-faults");
    let keytabs = samba.setup_delegation(work.path());
    let mut users = vec!["alice".to_string(), "bob".to_string(), "cut".to_string()];
    users.extend((1..=12).map(|i| format!("wave{i:02}")));
    let devices: Vec<Device> = users
        .iter()
        .map(|user| {
            samba.create_user(user, &format!("{user}@corp.test"));
            let sid = samba.object_sid(user);
            pki.device(
                LeafSpec::device(user)
                    .upn(&format!("{user}@corp.test"))
                    .sid_extension(&sid),
            )
        })
        .collect();
    let device = |name: &str| devices.iter().find(|d| d.name == name).expect("device");
    let waves = &devices[3..];

    let kdc = Chaos::start(SocketAddr::from(([127, 0, 0, 1], 88)), Mode::Pass).await;
    let krb5 = std::fs::read_to_string(samba.krb5_conf())
        .expect("krb5.conf")
        .replace("kdc = 127.0.0.1:88", &format!("kdc = {}", kdc.addr))
        .replace(
            "[libdefaults]\n",
            "[libdefaults]\n\tudp_preference_limit = 1\n",
        );
    let krb5_path = work.write("krb5.conf", &krb5);
    // Before any Kerberos call in this process: MIT reads its configuration once.
    std::env::set_var("KRB5_CONFIG", &krb5_path);

    let upstream = echo().await;
    let directory = DirectoryRef {
        urls: vec![samba.ldaps_url()],
        base_dn: samba.base_dn().to_string(),
        bind_dn: samba.admin_dn(),
        password: samba.admin_password().to_string(),
    };
    let extra = format!(
        "[identity]\nmode = \"kerberos\"\n\n[identity.kerberos]\nkeytab = \"{}\"\nprincipal = \"svc-seg\"\nrealm = \"CORP.TEST\"\ntarget_spn = \"HTTP/eas.corp.test\"\nexchange_timeout = \"3s\"\nmax_concurrent_exchanges = 2\n",
        keytabs.seg.display()
    );
    let text = config_text(&pki, &directory, upstream.addr, &extra);
    let config_path = pki.dir.write("seg.toml", &text);
    let seg = support::lab::start_seg(&config_path).await;
    let sync = |name: &'static str, id: &'static str| {
        let (seg, pki, device) = (&seg, &pki, device(name));
        async move { eas(seg, pki, device, "Sync", id).await }
    };
    // Everything the upstream ever received carries a Negotiate token and no header identity.
    let upstream_saw_only_negotiate = || {
        for request in upstream.requests() {
            assert!(
                request.header_values("x-remote-user").is_empty(),
                "{request:?}"
            );
            let authorization = request.header_values("authorization");
            assert_eq!(authorization.len(), 1, "{request:?}");
            assert!(authorization[0].starts_with("Negotiate "), "{request:?}");
        }
    };

    let (r, _) = sync("alice", "kdc-alice").await;
    assert_eq!(r.status, 200, "{}\n{}", r.text(), samba.log());
    assert!(
        kdc.accepted() >= 1,
        "the KDC was not reached through the proxy"
    );
    assert_eq!(upstream.requests().len(), 1);
    upstream_saw_only_negotiate();

    // Refused: the cached credential serves alice; bob has none.
    kdc.set(Mode::Refuse);
    let (r, _) = sync("alice", "kdc-alice").await;
    assert_eq!(r.status, 200, "cached credential while the KDC refuses");
    let forwarded = upstream.requests().len();
    let (r, took) = sync("bob", "kdc-bob").await;
    assert_unavailable(&r, 30..=30, "no credential, KDC refusing");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(last_reason("kdc-bob").await, "kdc-unavailable");
    assert_eq!(
        upstream.requests().len(),
        forwarded,
        "bob's request was forwarded"
    );
    let readiness = Instant::now();
    while metric(&seg, "seg_dependency_up{dependency=\"kdc\"}") != 0.0 {
        assert!(
            readiness.elapsed() < Duration::from_secs(10),
            "the KDC probe never failed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Hanging (accepted, never answered): every new account waits at most exchange_timeout
    // (3 s), in three waves of four first requests 3.5 s apart. MIT waits ~25 s per attempt
    // on such a KDC and a GSSAPI call cannot be cancelled: at most max_concurrent_exchanges
    // (2) of them may be left blocked, not one per timed-out request.
    kdc.set(Mode::Blackhole);
    let threads_before = threads();
    let seg_ref = &seg;
    let pki_ref = &pki;
    for wave in waves.chunks(4) {
        let started = Instant::now();
        let answers = futures_join(wave.iter().map(|device| async move {
            let id = format!("kdc-{}", device.name);
            let (r, took) = eas(seg_ref, pki_ref, device, "Sync", &id).await;
            (device.name.clone(), id, r, took)
        }))
        .await;
        for (name, id, r, took) in answers {
            assert_unavailable(&r, 2..=30, &format!("{name}, KDC hanging"));
            assert!(took < Duration::from_millis(4500), "{name}: took {took:?}");
            let reason = last_reason(&id).await;
            assert!(
                ["kdc-timeout", "kdc-overloaded", "kdc-unavailable"].contains(&reason.as_str()),
                "{name}: {reason}"
            );
        }
        tokio::time::sleep(Duration::from_millis(3500).saturating_sub(started.elapsed())).await;
    }
    let (r, _) = sync("alice", "kdc-alice").await;
    assert_eq!(r.status, 200, "cached credential while the KDC hangs");
    assert_eq!(upstream.requests().len(), forwarded + 1);
    upstream_saw_only_negotiate();
    let threads_after = threads();
    eprintln!(
        "KDC hanging: threads {threads_before} before, {threads_after} after 12 first requests"
    );
    // Two blocked exchanges and the readiness probe's own, and one spare.
    assert!(
        threads_after <= threads_before + 4,
        "blocked GSSAPI calls piled up: {threads_before} threads before, {threads_after} after"
    );

    // Back: the accounts refused meanwhile are served.
    kdc.set(Mode::Pass);
    let back = Instant::now();
    loop {
        let (r, _) = sync("bob", "kdc-bob").await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "bob never served after the KDC came back"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    upstream_saw_only_negotiate();

    // The KDC's answers cut by a reset 10 bytes in: 503 with a kdc- reason, nothing
    // forwarded; served once the resets stop.
    kdc.set(Mode::ResetAfter(10));
    let forwarded = upstream.requests().len();
    let (r, took) = sync("cut", "kdc-cut").await;
    assert_unavailable(&r, 2..=30, "KDC answers cut by a reset");
    assert!(took < Duration::from_millis(4500), "took {took:?}");
    let reason = last_reason("kdc-cut").await;
    assert!(reason.starts_with("kdc-"), "{reason}");
    assert_eq!(
        upstream.requests().len(),
        forwarded,
        "forwarded without a credential"
    );
    kdc.set(Mode::Pass);
    let back = Instant::now();
    loop {
        let (r, _) = sync("cut", "kdc-cut").await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(
            back.elapsed() < Duration::from_secs(40),
            "never served after the resets"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    upstream_saw_only_negotiate();
    eprintln!("KDC: {} connections through the proxy", kdc.accepted());
    seg.stop().await;
    drop(samba);
}
