//! Replicas that share what they know through a real Redis (`[fleet]`): three seg processes'
//! worth of gateways in this test process, each with its own listener, admin port and cache,
//! in front of one slapd and one echo upstream, sharing one `redis-server` and one key file.
//!
//! Directory work is counted from each replica's own `seg_directory_searches_total`: the
//! figure the fleet exists to keep down. What the store may not do (admit anyone) is tested
//! by writing to it directly, as whoever controls it could.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use seg::demo::echo::EchoUpstream;
use seg::demo::pki::LeafSpec;
use seg::fleet::seal::Keys;
use seg::Running;
use support::lab::{
    config_text, eas_target, metric_value, start_seg, start_slapd, Client, Device, DirectoryRef,
    Pki, TlsVersion,
};
use support::redis::Redis;
use support::slapd::{Slapd, UserSpec};

const KEY: &str = "fleet-test-secret-0123456789abcdef0123456789";

/// Three replicas sharing a store.
struct Fleet {
    pki: Pki,
    _slapd: Slapd,
    upstream: EchoUpstream,
    redis: Redis,
    replicas: Vec<Running>,
}

impl Fleet {
    async fn start(users: &[&str]) -> Fleet {
        let upstream = EchoUpstream::start(([127, 0, 0, 1], 0).into())
            .await
            .expect("echo upstream");
        Fleet::start_with(users, upstream, "").await
    }

    /// Replica `n`'s configuration is `seg-r<n>.toml` in the PKI's directory; each keeps its
    /// copy of the block list in `blocks-r<n>.json` there.
    async fn start_with(users: &[&str], upstream: EchoUpstream, extra: &str) -> Fleet {
        let pki = Pki::new();
        let redis = Redis::start();
        Fleet::start_on(users, upstream, extra, pki, redis).await
    }

    /// The same on a store the test set up (a secured one).
    async fn start_on(
        users: &[&str],
        upstream: EchoUpstream,
        extra: &str,
        pki: Pki,
        redis: Redis,
    ) -> Fleet {
        let slapd = tokio::task::block_in_place(|| {
            start_slapd(&pki, users.iter().map(|u| UserSpec::with_upn(u)).collect())
        });
        let key_file = pki.dir.write("fleet.keys", &format!("{KEY}\n"));
        let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
        let mut replicas = Vec::new();
        for n in 1..=3 {
            let fleet = format!(
                "\n[fleet]\n{store}key_file = \"{keys}\"\nreplica = \"r{n}\"\n\
                 timeout = \"50ms\"\nblock_poll_interval = \"200ms\"\n\
                 block_file = \"{dir}/blocks-r{n}.json\"\n{extra}",
                store = redis.fleet_config(),
                keys = key_file.display(),
                dir = pki.dir.path().display(),
            );
            let text = config_text(&pki, &directory, upstream.addr, &fleet);
            let path = pki.dir.write(&format!("seg-r{n}.toml"), &text);
            replicas.push(start_seg(&path).await);
        }
        Fleet {
            pki,
            _slapd: slapd,
            upstream,
            redis,
            replicas,
        }
    }

    fn config(&self, replica: usize) -> PathBuf {
        self.pki
            .dir
            .path()
            .join(format!("seg-r{}.toml", replica + 1))
    }

    /// Runs the `seg` command with `args` and `--config` of replica 1; its stdout.
    fn command(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_seg"))
            .args(args)
            .arg("--config")
            .arg(self.config(0))
            .output()
            .expect("running seg");
        assert!(
            out.status.success(),
            "seg {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls `request` on `replica` until it answers `status` (blocks arrive by polling).
    async fn await_status(
        &self,
        replica: usize,
        device: &Device,
        target: &str,
        status: u16,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let answer = self
                .client(replica)
                .post(Some(device), target, &[])
                .await
                .map(|r| r.status);
            if answer.as_ref().ok() == Some(&status) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "r{} still answers {answer:?} to {target}, not {status}",
                replica + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn device(&self, user: &str) -> Device {
        self.pki
            .device(LeafSpec::device(user).upn(&format!("{user}@corp.test")))
    }

    fn client(&self, replica: usize) -> Client {
        Client::new(self.replicas[replica].listen_addr, &self.pki.ca_path)
    }

    /// One request of `device` on replica `replica`: its status and the identity forwarded.
    async fn request(&self, replica: usize, device: &Device, user: &str) -> (u16, String) {
        let before = self.upstream.requests().len();
        let response = self
            .client(replica)
            .post(Some(device), &eas_target("Sync", user), &[])
            .await
            .unwrap_or_else(|e| panic!("{user} on r{}: {e}", replica + 1));
        let forwarded = self
            .upstream
            .requests()
            .get(before..)
            .and_then(|seen| seen.last().cloned())
            .map(|seen| seen.header_values("x-remote-user").join(","))
            .unwrap_or_default();
        (response.status, forwarded)
    }

    fn metric(&self, replica: usize, name: &str) -> f64 {
        metric_value(&self.replicas[replica].metrics.render(), name)
    }

    /// Directory searches made by all three replicas.
    fn searches(&self) -> f64 {
        (0..3)
            .map(|r| self.metric(r, "seg_directory_searches_total{result=\"ok\"}"))
            .sum()
    }

    fn total(&self, name: &str) -> f64 {
        (0..3).map(|r| self.metric(r, name)).sum()
    }

    async fn stop(self) {
        for replica in self.replicas {
            replica.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_directory_search_per_certificate_for_the_whole_fleet() {
    let fleet = Fleet::start(&["alice", "bob", "carol"]).await;
    let alice = fleet.device("alice");

    // alice on each replica in turn: one search, two answers from the store.
    for replica in 0..3 {
        let (status, forwarded) = fleet.request(replica, &alice, "alice").await;
        assert_eq!(status, 200, "alice on r{}", replica + 1);
        assert_eq!(forwarded, "alice@corp.test");
    }
    assert_eq!(fleet.searches(), 1.0, "alice was searched more than once");
    assert_eq!(
        fleet.total("seg_identity_cache_lookups_total{result=\"shared\"}"),
        2.0
    );
    assert_eq!(
        fleet.redis.keys("seg:id:*").len(),
        1,
        "{:?}",
        fleet.redis.keys("*")
    );
    // The helpdesk asks one command: it finds every replica through the store, and each
    // says it served alice's device, under the one decision the directory gave on r1.
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for _ in 0..50 {
        rows = serde_json::from_str(&fleet.command(&["devices", "alice", "--json"])).unwrap();
        if rows.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut replicas: Vec<&str> = rows
        .iter()
        .map(|d| d["replica"].as_str().unwrap())
        .collect();
    replicas.sort();
    assert_eq!(replicas, ["r1", "r2", "r3"], "{rows:?}");
    let decided: std::collections::BTreeSet<i64> = rows
        .iter()
        .map(|d| d["decided_at"].as_i64().unwrap())
        .collect();
    assert_eq!(decided.len(), 1, "one decision, shared: {rows:?}");
    // An announcement written into the store without the key file is not asked: the
    // command would fail to reach 127.0.0.1:1 and exit 75.
    let _: i64 = redis::cmd("HSET")
        .arg("seg:replicas")
        .arg("forged")
        .arg(format!("{} 127.0.0.1:1", seg::clock::unix_now()))
        .query(&mut fleet.redis.client())
        .unwrap();
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&fleet.command(&["devices", "alice", "--json"])).unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");

    // Twelve concurrent first requests of bob, four on each replica: one search.
    let bob = fleet.device("bob");
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let client = fleet.client(i % 3);
            let bob = bob.clone();
            tokio::spawn(async move {
                client
                    .post(Some(&bob), &eas_target("Sync", "bob"), &[])
                    .await
                    .map(|r| r.status)
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task").expect("bob's request"), 200);
    }
    assert_eq!(
        fleet.searches(),
        2.0,
        "concurrent first requests on three replicas made more than one search"
    );

    // A denial is shared too, for its negative TTL: mallory has no account.
    let mallory = fleet.device("mallory");
    assert_eq!(fleet.request(0, &mallory, "mallory").await.0, 403);
    assert_eq!(fleet.request(1, &mallory, "mallory").await.0, 403);
    assert_eq!(fleet.request(2, &mallory, "mallory").await.0, 403);
    assert_eq!(fleet.searches(), 3.0, "mallory's denial was not shared");
    fleet.stop().await;
}

/// The store is not trusted: entries written into it by anyone without the key file, moved
/// between certificates, or past their validity are refused, counted, and the replica asks
/// the directory as if the store were empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_moved_or_expired_entry_is_refused() {
    let fleet = Fleet::start(&["alice", "bob", "carol", "dave", "erin", "frank"]).await;
    let mut store = fleet.redis.client();
    let (alice, bob, carol, dave, erin) = (
        fleet.device("alice"),
        fleet.device("bob"),
        fleet.device("carol"),
        fleet.device("dave"),
        fleet.device("erin"),
    );
    assert_eq!(fleet.request(0, &alice, "alice").await.0, 200);
    let alice_key = fleet.redis.keys("seg:id:*").remove(0);
    let alice_entry: Vec<u8> = redis::cmd("GET")
        .arg(&alice_key)
        .query(&mut store)
        .expect("alice's entry");
    // Keys are `seg:id:<settings>:<SHA-256 of the certificate>`.
    let key_of = |device: &Device| {
        let digest = ring::digest::digest(&ring::digest::SHA256, &device.issued.der);
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let (prefix, _) = alice_key
            .rsplit_once(':')
            .expect("a key with a fingerprint");
        format!("{prefix}:{hex}")
    };
    let put = |store: &mut redis::Connection, key: &str, value: &[u8]| {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query(store)
            .expect("SET");
    };
    let searches = fleet.searches();

    // 1. alice's entry copied under bob's key: bob's certificate must not become alice.
    put(&mut store, &key_of(&bob), &alice_entry);
    let (status, forwarded) = fleet.request(1, &bob, "bob").await;
    assert_eq!((status, forwarded.as_str()), (200, "bob@corp.test"));
    // 2. Bytes that are no entry at all.
    put(
        &mut store,
        &key_of(&carol),
        b"{\"resolved_unix\":0,\"account\":{\"dn\":\"CN=alice\"}}",
    );
    let (status, forwarded) = fleet.request(1, &carol, "carol").await;
    assert_eq!((status, forwarded.as_str()), (200, "carol@corp.test"));
    // 3. A well-formed entry sealed under a key the fleet does not have.
    let other = Keys::from_secrets(&[b"some-other-fleet-0123456789abcdef0123".to_vec()]);
    let dave_key = key_of(&dave);
    put(
        &mut store,
        &dave_key,
        &other.seal(&dave_key, i64::MAX, b"{}"),
    );
    let (status, forwarded) = fleet.request(1, &dave, "dave").await;
    assert_eq!((status, forwarded.as_str()), (200, "dave@corp.test"));
    assert_eq!(
        fleet.metric(
            1,
            "seg_fleet_store_operations_total{operation=\"get\",result=\"rejected\"}"
        ),
        3.0
    );
    // 4. An authentic entry past its validity (sealed with the fleet's own key: a replay).
    let ours = Keys::from_secrets(&[KEY.as_bytes().to_vec()]);
    let erin_key = key_of(&erin);
    let stale = format!(
        "{{\"resolved_unix\":{},\"account\":{{\"dn\":\"CN=alice,OU=Users,DC=corp,DC=test\"}}}}",
        seg::fleet::unix_now() - 7_200
    );
    put(
        &mut store,
        &erin_key,
        &ours.seal(&erin_key, seg::fleet::unix_now() - 1, stale.as_bytes()),
    );
    let (status, forwarded) = fleet.request(2, &erin, "erin").await;
    assert_eq!((status, forwarded.as_str()), (200, "erin@corp.test"));
    assert_eq!(
        fleet.metric(
            2,
            "seg_fleet_store_operations_total{operation=\"get\",result=\"expired\"}"
        ),
        1.0
    );
    // 5. An authentic admission older than the soft TTL (5 min), as a replica sealing for
    //    longer would have written it and a store could replay it: a replica alone would ask
    //    the directory, and so does this one. frank's own entry, edited and sealed again
    //    with the fleet's key; the same edit 10 s old is adopted (the control).
    let frank = fleet.device("frank");
    assert_eq!(fleet.request(0, &frank, "frank").await.0, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frank_key = key_of(&frank);
    let sealed: Vec<u8> = redis::cmd("GET")
        .arg(&frank_key)
        .query(&mut store)
        .expect("frank's entry");
    let now = seg::fleet::unix_now();
    let mut entry: serde_json::Value = serde_json::from_slice(
        &ours
            .open(&frank_key, &sealed, now)
            .expect("frank's entry opens"),
    )
    .expect("frank's entry is JSON");
    let mut aged = |age: i64| {
        entry["resolved_unix"] = (now - age).into();
        ours.seal(
            &frank_key,
            now + 3_000,
            &serde_json::to_vec(&entry).unwrap(),
        )
    };
    let searched = fleet.searches();
    put(&mut store, &frank_key, &aged(10));
    assert_eq!(fleet.request(1, &frank, "frank").await.0, 200);
    assert_eq!(
        fleet.searches(),
        searched,
        "a 10 s old entry was not adopted"
    );
    put(&mut store, &frank_key, &aged(400));
    let (status, forwarded) = fleet.request(2, &frank, "frank").await;
    assert_eq!((status, forwarded.as_str()), (200, "frank@corp.test"));
    assert_eq!(
        fleet.searches(),
        searched + 1.0,
        "an entry past the soft TTL was adopted"
    );
    // Every one of them was searched in the directory, and stored properly again.
    assert_eq!(fleet.searches(), searches + 6.0);
    // The write to the store follows the answer; give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, forwarded) = fleet.request(2, &bob, "bob").await;
    assert_eq!((status, forwarded.as_str()), (200, "bob@corp.test"));
    assert_eq!(
        fleet.searches(),
        searches + 6.0,
        "bob's own entry was not stored"
    );
    fleet.stop().await;
}

/// The store down, or answering nothing: known devices are served from each replica's own
/// cache, new ones from the directory, refused ones refused; nothing waits past the budget;
/// when the store returns, sharing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_or_silent_admits_nobody_wrongly() {
    let mut fleet = Fleet::start(&["alice", "bob", "carol", "dave"]).await;
    let (alice, bob, carol, dave, mallory) = (
        fleet.device("alice"),
        fleet.device("bob"),
        fleet.device("carol"),
        fleet.device("dave"),
        fleet.device("mallory"),
    );
    assert_eq!(fleet.request(0, &alice, "alice").await.0, 200);

    // Silent: SIGSTOP. Each store operation gives up at fleet.timeout (50 ms here).
    fleet.redis.pause();
    let started = Instant::now();
    let (status, forwarded) = fleet.request(1, &bob, "bob").await;
    let took = started.elapsed();
    assert_eq!((status, forwarded.as_str()), (200, "bob@corp.test"));
    assert!(
        took < Duration::from_secs(2),
        "bob waited {took:?} on a silent store"
    );
    assert!(
        fleet.metric(
            1,
            "seg_fleet_store_operations_total{operation=\"get\",result=\"timeout\"}"
        ) >= 1.0
    );
    assert_eq!(fleet.metric(1, "seg_fleet_store_up"), 0.0);
    assert_eq!(fleet.request(1, &mallory, "mallory").await.0, 403);
    fleet.redis.resume();

    // Down: killed. alice is known to r1; carol is new to r3; mallory is still refused.
    fleet.redis.stop();
    assert_eq!(fleet.request(0, &alice, "alice").await.0, 200);
    let (status, forwarded) = fleet.request(2, &carol, "carol").await;
    assert_eq!((status, forwarded.as_str()), (200, "carol@corp.test"));
    assert_eq!(fleet.request(2, &mallory, "mallory").await.0, 403);
    // Refused connections, or a reconnect that outlasts the budget: a miss either way.
    let failed: f64 = ["error", "timeout"]
        .iter()
        .map(|result| {
            let name = format!(
                "seg_fleet_store_operations_total{{operation=\"get\",result=\"{result}\"}}"
            );
            fleet.metric(2, &name)
        })
        .sum();
    assert!(failed >= 1.0, "r3 never counted a failed read");
    // Readiness does not depend on the store.
    let ready = support::lab::http_get(fleet.replicas[2].admin_addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

    // Back (empty): once every replica's probe has reconnected, dave is searched once, by
    // r1, and shared with r2 and r3.
    fleet.redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while (0..3).any(|r| fleet.metric(r, "seg_fleet_store_up") != 1.0) {
        assert!(
            Instant::now() < deadline,
            "the replicas never saw the store again:\n{}",
            fleet.replicas[0].metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let searches = fleet.searches();
    for replica in 0..3 {
        let (status, forwarded) = fleet.request(replica, &dave, "dave").await;
        assert_eq!((status, forwarded.as_str()), (200, "dave@corp.test"));
    }
    assert_eq!(
        fleet.searches() - searches,
        1.0,
        "dave was not shared after the store came back"
    );
    fleet.stop().await;
}

/// `seg block` writes once; every replica refuses the device within a poll interval, a Ping
/// it holds is closed, and the list survives a restart while the store is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_reaches_every_replica_and_closes_a_held_ping() {
    let upstream = EchoUpstream::start_holding(([127, 0, 0, 1], 0).into(), Duration::from_secs(60))
        .await
        .expect("holding echo upstream");
    let mut fleet = Fleet::start_with(&["alice", "bob"], upstream, "").await;
    let (alice, bob) = (fleet.device("alice"), fleet.device("bob"));
    let lost_phone =
        "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ALICEPHONE&DeviceType=iPhone";
    let ping =
        "/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=ALICEPHONE&DeviceType=iPhone";
    let tablet =
        "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ALICETABLET&DeviceType=iPad";
    for replica in 0..3 {
        fleet.await_status(replica, &alice, lost_phone, 200).await;
    }

    // The lost phone holds a Ping on r2.
    let mut held = fleet
        .client(1)
        .connect(Some(&alice), TlsVersion::Any)
        .await
        .expect("alice's phone connects");
    let holding = tokio::spawn(async move { held.request("POST", ping, &[], b"").await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while fleet.upstream.active_holds() == 0 {
        assert!(
            Instant::now() < deadline,
            "the Ping never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Blocked once, from the command line (lower case: DeviceIds compare without case).
    let blocked_at = Instant::now();
    let said = fleet.command(&[
        "block",
        "--device",
        "alicephone",
        "--reason",
        "reported lost",
    ]);
    assert!(said.contains("blocked device:ALICEPHONE"), "{said}");
    let cut = tokio::time::timeout(Duration::from_secs(5), holding)
        .await
        .expect("the held Ping was not ended within 5 s")
        .expect("task")
        .expect("the held Ping was closed without an answer");
    assert_eq!(cut.status, 403, "the held Ping's answer");
    assert_eq!(cut.header("connection"), Some("close"));
    let closed_after = blocked_at.elapsed();
    assert!(
        closed_after < Duration::from_secs(2),
        "closed after {closed_after:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while fleet.upstream.aborted_holds() == 0 {
        assert!(
            Instant::now() < deadline,
            "the upstream exchange of the Ping was not cut"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        fleet.metric(1, "seg_fleet_blocked_long_polls_closed_total"),
        1.0
    );
    // Every replica refuses the phone; alice's tablet and bob are untouched.
    for replica in 0..3 {
        fleet.await_status(replica, &alice, lost_phone, 403).await;
        assert_eq!(
            fleet.metric(replica, "seg_policy_refusals_total{reason=\"blocked\"}"),
            1.0
        );
        fleet.await_status(replica, &alice, tablet, 200).await;
    }
    fleet
        .await_status(0, &bob, &eas_target("Sync", "bob"), 200)
        .await;

    // An account block (any spelling of the name) refuses every device of the account.
    fleet.command(&["block", "--account", "BOB", "--reason", "left the company"]);
    for replica in 0..3 {
        fleet
            .await_status(replica, &bob, &eas_target("Sync", "bob"), 403)
            .await;
    }
    let listed: serde_json::Value =
        serde_json::from_str(&fleet.command(&["blocks", "--json"])).expect("seg blocks --json");
    assert_eq!(
        listed["device:ALICEPHONE"]["reason"], "reported lost",
        "{listed}"
    );
    assert_eq!(
        listed["account:bob"]["reason"], "left the company",
        "{listed}"
    );

    // Lifted: served again everywhere.
    fleet.command(&["unblock", "--device", "AlicePhone"]);
    for replica in 0..3 {
        fleet.await_status(replica, &alice, lost_phone, 200).await;
    }

    // The store goes down and r1 restarts: the list it kept on disk still holds bob.
    fleet.redis.stop();
    let r1 = fleet.replicas.remove(0);
    r1.stop().await;
    fleet.replicas.insert(0, start_seg(&fleet.config(0)).await);
    fleet
        .await_status(0, &bob, &eas_target("Sync", "bob"), 403)
        .await;
    fleet.await_status(0, &alice, lost_phone, 200).await;
    fleet.stop().await;
}

/// A Ping of `device_id` on `replica`: `Ok(connection)` while it is held, `Err(status)` when
/// it was answered at once (refused).
async fn hold(
    fleet: &Fleet,
    replica: usize,
    device: &Device,
    device_id: &str,
) -> Result<support::lab::Connection, u16> {
    let mut conn = fleet
        .client(replica)
        .connect(Some(device), TlsVersion::Any)
        .await
        .expect("connect");
    let ping = format!(
        "/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId={device_id}&DeviceType=iPhone"
    );
    conn.send_raw(
        format!("POST {ping} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send");
    match tokio::time::timeout(Duration::from_millis(500), conn.read_response()).await {
        Ok(Ok(response)) => Err(response.status),
        Ok(Err(e)) => panic!("the Ping's connection failed: {e}"),
        Err(_) => Ok(conn),
    }
}

/// The long-poll caps count the whole fleet: a device or account spread over replicas gets
/// its allowance once; a poll that ends frees its place everywhere; the polls of a replica
/// that died stop counting when their lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_caps_hold_across_replicas() {
    let upstream = EchoUpstream::start_holding(([127, 0, 0, 1], 0).into(), Duration::from_secs(60))
        .await
        .expect("holding echo upstream");
    let caps = "[activesync]\nmax_long_polls_per_device = 2\nmax_long_polls_per_account = 3\n";
    let fleet = Fleet::start_with(&["alice"], upstream, caps).await;
    let alice = fleet.device("alice");
    let refused = |replica: usize, cap: &str| {
        fleet.metric(
            replica,
            &format!("seg_policy_refusals_total{{reason=\"long-poll-cap-{cap}\"}}"),
        )
    };

    // The phone's two Pings on r1 and r2: a third on r3 is over the device's cap.
    let phone_r1 = hold(&fleet, 0, &alice, "PHONE").await.expect("held on r1");
    let _phone_r2 = hold(&fleet, 1, &alice, "PHONE").await.expect("held on r2");
    assert_eq!(hold(&fleet, 2, &alice, "phone").await.err(), Some(503));
    assert_eq!(refused(2, "device"), 1.0);
    // The tablet's takes the account's third place; a watch's is over the account's cap.
    let _tablet = hold(&fleet, 2, &alice, "TABLET").await.expect("held on r3");
    assert_eq!(hold(&fleet, 0, &alice, "WATCH").await.err(), Some(503));
    assert_eq!(refused(0, "account"), 1.0);

    // A Ping that ends frees its place on every replica.
    drop(phone_r1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let _watch = loop {
        match hold(&fleet, 1, &alice, "WATCH").await {
            Ok(conn) => break conn,
            Err(status) => assert_eq!(status, 503),
        }
        assert!(Instant::now() < deadline, "the ended Ping still counts");
    };

    // A replica that died (r9, never renewing) holds the laptop's two places until its
    // leases end.
    let mut store = fleet.redis.client();
    let until = seg::fleet::unix_now_ms() + 1_500;
    for member in ["r9:1:1", "r9:1:2"] {
        let _: () = redis::cmd("ZADD")
            .arg("seg:lp:dev:alice:LAPTOP")
            .arg(until)
            .arg(member)
            .query(&mut store)
            .expect("ZADD");
    }
    drop(_watch);
    assert_eq!(hold(&fleet, 2, &alice, "LAPTOP").await.err(), Some(503));
    let deadline = Instant::now() + Duration::from_secs(5);
    let _laptop = loop {
        match hold(&fleet, 2, &alice, "LAPTOP").await {
            Ok(conn) => break conn,
            Err(status) => assert_eq!(status, 503),
        }
        assert!(
            Instant::now() < deadline,
            "a dead replica's polls never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        seg::fleet::unix_now_ms() >= until,
        "a dead replica's polls stopped counting before their lease ended"
    );
    fleet.stop().await;
}

/// The production shape of the store: TLS with client certificates and an ACL user limited
/// to seg's keys. Decisions are shared through it; a replica with the wrong password is
/// refused by the store and serves alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_over_tls_with_an_acl_user() {
    let pki = Pki::new();
    let client = pki.device(LeafSpec::device("seg-fleet-client"));
    let redis = Redis::start_secured(support::redis::Secured {
        ca: pki.ca_path.clone(),
        server_cert: pki.server_cert.clone(),
        server_key: pki.server_key.clone(),
        client_cert: client.cert_path.clone(),
        client_key: client.key_path.clone(),
    });
    let upstream = EchoUpstream::start(([127, 0, 0, 1], 0).into())
        .await
        .expect("echo upstream");
    let fleet = Fleet::start_on(&["alice"], upstream, "", pki, redis).await;
    let alice = fleet.device("alice");
    for replica in 0..3 {
        let (status, forwarded) = fleet.request(replica, &alice, "alice").await;
        assert_eq!((status, forwarded.as_str()), (200, "alice@corp.test"));
    }
    assert_eq!(fleet.searches(), 1.0, "not shared over TLS");
    assert_eq!(
        fleet.total("seg_fleet_store_operations_total{operation=\"get\",result=\"ok\"}"),
        2.0
    );
    // The ACL confines seg to its own keys.
    let denied: redis::RedisResult<()> = redis::cmd("SET")
        .arg("other:key")
        .arg("x")
        .query(&mut fleet.redis.client());
    assert!(denied.is_err(), "the ACL user wrote outside seg's prefix");
    fleet.stop().await;
}

/// Restarts lose nothing: three replicas behind HAProxy (TCP, round robin) restarted one
/// after another under keep-alive load (Syncs, and Pings the upstream holds). Every request
/// sent gets an answer: a Sync on a draining replica is served with `Connection: close` (the
/// client reconnects, HAProxy sends it to another replica), a Ping held there is answered
/// 503 + `Retry-After` at its moment in the window; none meets a bare close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_haproxy_loses_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    let users = ["alice", "bob", "carol", "dave"];
    let pki = Pki::new();
    let redis = Redis::start();
    let slapd = tokio::task::block_in_place(|| {
        start_slapd(&pki, users.iter().map(|u| UserSpec::with_upn(u)).collect())
    });
    let upstream =
        EchoUpstream::start_holding(([127, 0, 0, 1], 0).into(), Duration::from_millis(1500))
            .await
            .expect("holding echo upstream");
    let key_file = pki.dir.write("fleet.keys", &format!("{KEY}\n"));
    let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
    let mut configs = Vec::new();
    let mut addrs = Vec::new();
    for n in 1..=3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let fleet = format!(
            "\n[fleet]\n{}key_file = \"{}\"\nreplica = \"r{n}\"\n",
            redis.fleet_config(),
            key_file.display()
        );
        let text = config_text(&pki, &directory, upstream.addr, &fleet).replacen(
            "address = \"127.0.0.1:0\"",
            &format!("address = \"127.0.0.1:{port}\"\ndrain_window = \"1s\""),
            1,
        );
        configs.push(pki.dir.write(&format!("seg-r{n}.toml"), &text));
        addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let mut replicas = Vec::new();
    for config in &configs {
        replicas.push(start_seg(config).await);
    }
    let haproxy = support::haproxy::Haproxy::start(&addrs);

    #[derive(Default)]
    struct Tally {
        sent: AtomicUsize,
        served: AtomicUsize,
        drained: AtomicUsize,
        other: AtomicUsize,
        lost: AtomicUsize,
        refused_connections: AtomicUsize,
    }
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..12 {
        let user = users[i % users.len()];
        let device = pki.device(LeafSpec::device(user).upn(&format!("{user}@corp.test")));
        let cmd = if i % 4 == 3 { "Ping" } else { "Sync" };
        let target = format!(
            "/Microsoft-Server-ActiveSync?Cmd={cmd}&User={user}&DeviceId=LOAD{i}&DeviceType=iPhone"
        );
        let client = Client::new(haproxy.addr, &pki.ca_path);
        let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let Ok(mut conn) = client.connect(Some(&device), TlsVersion::Any).await else {
                    tally.refused_connections.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                while !stop.load(Ordering::Acquire) {
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    match conn.request("POST", &target, &[], b"").await {
                        Ok(response) => {
                            let counter = match response.status {
                                200 => &tally.served,
                                503 if response.header("retry-after").is_some() => &tally.drained,
                                _ => &tally.other,
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                            if response.header("connection") == Some("close") {
                                break;
                            }
                        }
                        Err(_) => {
                            tally.lost.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        }));
    }

    // Steady load, then each replica in turn: drained (1 s window) and started again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = tally.sent.load(Ordering::Relaxed);
    for (n, config) in configs.iter().enumerate() {
        let old = replicas.remove(n);
        old.drain(Duration::from_secs(1)).await;
        replicas.insert(n, start_seg(config).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Release);
    for client in clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), client).await;
    }
    let get = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    let (sent, served, drained, other, lost, refused) = (
        get(&tally.sent),
        get(&tally.served),
        get(&tally.drained),
        get(&tally.other),
        get(&tally.lost),
        get(&tally.refused_connections),
    );
    println!(
        "rolling restart: {sent} requests sent ({} during the restarts), {served} served, \
         {drained} drained Pings answered 503, {other} other, {lost} lost; {refused} refused connections",
        sent - before
    );
    assert!(
        sent - before > 200,
        "too little load to mean anything: {sent}"
    );
    assert_eq!(lost, 0, "requests met a bare close");
    assert_eq!(other, 0, "unexpected answers");
    assert_eq!(refused, 0, "connections refused through HAProxy");
    // Requests still in flight when the load stopped are neither answered nor lost.
    assert!(
        served + drained + 12 >= sent,
        "{served} + {drained} of {sent}"
    );
    for replica in replicas {
        replica.stop().await;
    }
    drop(haproxy);
}
