//! Replicas that share what they know through a real Redis (`[fleet]`): three seg processes'
//! worth of gateways in this test process, each with its own listener, admin port and cache,
//! in front of one slapd and one echo upstream, sharing one `redis-server` and one key file.
//!
//! Directory work is counted from each replica's own `seg_directory_searches_total`: the
//! figure the fleet exists to keep down. What the store may not do (admit anyone) is tested
//! by writing to it directly, as whoever controls it could.

mod support;

use std::time::{Duration, Instant};

use seg::demo::echo::EchoUpstream;
use seg::demo::pki::LeafSpec;
use seg::fleet::seal::Keys;
use seg::Running;
use support::lab::{
    config_text, eas_target, metric_value, start_seg, start_slapd, Client, Device, DirectoryRef,
    Pki,
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
        let pki = Pki::new();
        let redis = Redis::start();
        let slapd = tokio::task::block_in_place(|| {
            start_slapd(&pki, users.iter().map(|u| UserSpec::with_upn(u)).collect())
        });
        let upstream = EchoUpstream::start(([127, 0, 0, 1], 0).into())
            .await
            .expect("echo upstream");
        let key_file = pki.dir.write("fleet.keys", &format!("{KEY}\n"));
        let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
        let mut replicas = Vec::new();
        for n in 1..=3 {
            let fleet = format!(
                "\n[fleet]\nurl = \"{}\"\nkey_file = \"{}\"\nreplica = \"r{n}\"\ntimeout = \"50ms\"\n",
                redis.url(),
                key_file.display()
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
    let fleet = Fleet::start(&["alice", "bob", "carol", "dave", "erin"]).await;
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
    // Every one of them was searched in the directory, and stored properly again.
    assert_eq!(fleet.searches(), searches + 4.0);
    let (status, forwarded) = fleet.request(2, &bob, "bob").await;
    assert_eq!((status, forwarded.as_str()), (200, "bob@corp.test"));
    assert_eq!(
        fleet.searches(),
        searches + 4.0,
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
    assert!(
        fleet.metric(
            2,
            "seg_fleet_store_operations_total{operation=\"get\",result=\"error\"}"
        ) >= 1.0
    );
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
