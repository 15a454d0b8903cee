//! The `replicas` scenario: three seg replicas behind HAProxy (TCP mode, round robin, a
//! refused connection redispatched), as a fleet is deployed, each replica alone and then
//! sharing a Redis (`[fleet]`).
//!
//! Per set-up: a cold storm (every device connects twice, one Sync each time, so round robin
//! sends most devices to two replicas), then a rolling restart (each replica in turn stopped
//! with SIGTERM and started again without its snapshot, as a new pod on an `emptyDir`
//! would), then every device once more. Reported: directory searches in each phase (summed
//! over the replicas' `seg_directory_searches_total`; the target is no more than the number
//! of distinct devices, whatever the replica count), the time until every device was served,
//! the mean time of a request that missed its replica's own cache (asked the directory alone,
//! or the store first), and how many requests were refused or lost.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::haproxy::Haproxy;
use crate::http::connect_tls;
use crate::peers::{free_port, Proxy, Setup};
use crate::{scrape, Fleet};

/// Devices connecting at once in a storm.
const CONCURRENCY: usize = 200;
/// Devices kept out of the storms and measured one at a time: what a local miss costs with
/// and without the store, on replicas that are not saturated.
const PROBES: usize = 100;

/// What one set-up (alone, or with the store) measured.
#[derive(Debug, Default, Clone)]
pub struct ReplicaFigures {
    pub devices: usize,
    /// Directory searches in the cold storm (two connections per device).
    pub storm_searches: f64,
    pub storm_secs: f64,
    /// One device at a time (the `PROBES` devices, unseen): the mean time of its first
    /// request (its first replica misses: alone, a directory search; with the store, a
    /// store miss, the lock, the search and the store write) and of its second (another
    /// replica: alone, a search again; with the store, the store's entry), ms.
    pub first_ms: f64,
    pub second_ms: f64,
    /// Store operations past `fleet.timeout` (counted as misses) during the storms.
    pub store_timeouts: f64,
    /// Directory searches after the rolling restart, every device once more.
    pub restart_searches: f64,
    pub restart_secs: f64,
    /// Requests answered other than 200 (a 503 is retried), and requests that got no answer.
    pub refused: u64,
    pub lost: u64,
}

/// A bench-owned redis-server without persistence.
struct Store {
    child: Child,
    url: String,
}

impl Store {
    fn start(dir: &Path) -> Store {
        let port = free_port();
        let child = Command::new("taskset")
            .args(["-c", "1", "redis-server", "--bind", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server; ./tests/run.sh does)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Store {
            child,
            url: format!("redis://{addr}"),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the scenario for one set-up: with a store whose operations have `budget` (a
/// `fleet.timeout`), else (`None`) each replica alone.
pub async fn run(
    setup: &Setup,
    fleet: &Fleet,
    devices: usize,
    budget: Option<&str>,
) -> ReplicaFigures {
    let shared = budget.is_some();
    let dir = setup.dir.join(match budget {
        Some(budget) => format!("replicas-shared-{budget}"),
        None => "replicas-alone".into(),
    });
    std::fs::create_dir_all(&dir).expect("scenario dir");
    let store = shared.then(|| Store::start(&dir));
    let keys: PathBuf = dir.join("fleet.keys");
    std::fs::write(&keys, "replicas-bench-0123456789abcdef0123456789\n").expect("key file");
    let mut replicas: Vec<Proxy> = (1..=3)
        .map(|n| {
            let extra = match &store {
                Some(store) => format!(
                    "[fleet]\nurl = \"{}\"\nkey_file = \"{}\"\nreplica = \"r{n}\"\n\
                     timeout = \"{}\"\n",
                    store.url,
                    keys.display(),
                    budget.unwrap_or("50ms")
                ),
                None => String::new(),
            };
            Proxy::seg_replica(setup, n, (free_port(), free_port()), &extra)
        })
        .collect();
    for replica in replicas.iter_mut() {
        replica.start_cold();
    }
    // HAProxy as the tests run it in front of replicas (tests/support/haproxy.rs).
    let front = Haproxy::start(&replicas.iter().map(|r| r.addr).collect::<Vec<_>>());
    let searches = |replicas: &[Proxy]| {
        let admins: Vec<SocketAddr> = replicas.iter().filter_map(|r| r.admin).collect();
        async move {
            let mut total = 0.0;
            for admin in admins {
                total += scrape(admin, "seg_directory_searches_total{result=\"ok\"}")
                    .await
                    .unwrap_or(0.0);
            }
            total
        }
    };

    let mut figures = ReplicaFigures {
        devices,
        ..ReplicaFigures::default()
    };
    let tally = Arc::new(Tally::default());
    let stormed = 0..devices - PROBES;
    let started = Instant::now();
    storm(front.addr, fleet, stormed.clone(), 2, CONCURRENCY, &tally).await;
    figures.storm_secs = started.elapsed().as_secs_f64();
    figures.storm_searches = searches(&replicas).await;
    let times = storm(front.addr, fleet, devices - PROBES..devices, 2, 1, &tally).await;
    figures.first_ms = times[0];
    figures.second_ms = times[1];

    // A rolling restart: each replica stopped (SIGTERM, drain) and started again cold; the
    // restarted processes count their searches from zero.
    for replica in replicas.iter_mut() {
        replica.stop();
        replica.start_cold();
    }
    let started = Instant::now();
    storm(front.addr, fleet, 0..devices, 1, CONCURRENCY, &tally).await;
    figures.restart_secs = started.elapsed().as_secs_f64();
    figures.restart_searches = searches(&replicas).await;
    for replica in &replicas {
        for operation in ["get", "lock", "set"] {
            let name = format!(
                "seg_fleet_store_operations_total{{operation=\"{operation}\",result=\"timeout\"}}"
            );
            figures.store_timeouts += scrape(replica.admin.expect("admin"), &name)
                .await
                .unwrap_or(0.0);
        }
    }
    figures.refused = tally.refused.load(Ordering::Relaxed);
    figures.lost = tally.lost.load(Ordering::Relaxed);
    drop(front);
    for replica in replicas.iter_mut() {
        replica.stop();
    }
    drop(store);
    figures
}

#[derive(Default)]
struct Tally {
    refused: AtomicU64,
    lost: AtomicU64,
}

/// Every device of `devices` makes `connections` connections through the front, one Sync
/// each, retried after a 503 until served, `concurrency` devices at a time; returns the mean
/// time of each connection's request (after its handshake), ms.
async fn storm(
    front: SocketAddr,
    fleet: &Fleet,
    devices: std::ops::Range<usize>,
    connections: usize,
    concurrency: usize,
    tally: &Arc<Tally>,
) -> Vec<f64> {
    let count = devices.len();
    let gate = Arc::new(Semaphore::new(concurrency));
    let totals: Arc<Vec<AtomicU64>> =
        Arc::new((0..connections).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::with_capacity(count);
    for i in devices {
        let (gate, fleet, totals, tally) = (
            Arc::clone(&gate),
            Arc::clone(fleet),
            Arc::clone(&totals),
            Arc::clone(tally),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("gate");
            let device = &fleet[i];
            for nth in 0..connections {
                loop {
                    let Ok(mut conn) = connect_tls(front, &device.config).await else {
                        tally.lost.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let sent = Instant::now();
                    match conn.request(&device.sync).await {
                        Ok(r) if r.status == 200 => {
                            totals[nth]
                                .fetch_add(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
                            break;
                        }
                        Ok(_) => {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(_) => {
                            tally.lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    totals
        .iter()
        .map(|t| t.load(Ordering::Relaxed) as f64 / count.max(1) as f64 / 1000.0)
        .collect()
}
