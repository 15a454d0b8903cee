//! The device-fleet benchmark: seg side by side with nginx and HAProxy doing the same job.
//!
//! `cargo bench --bench fleet` (full: 10,000 devices, 3 rounds) or
//! `cargo bench --bench fleet -- --quick` (1,500 devices, 1 round, well under 2 minutes; CI).
//! More options: `--rounds N`, `--devices N`, `--levels 2000,5000,9000`, `--proxies seg,nginx`,
//! `--outage-secs N`, `--keepalive-secs N`, `--latency-secs N`, `--budget-devices N`,
//! `--handshakes N` (per pass).
//!
//! What it sets up (all on 127.0.0.1, in a temp dir, stopped by PID at the end):
//! - a CA, a server certificate and one ECDSA P-256 certificate per device, each device mapped
//!   strongly to its own account (`altSecurityIdentities` `X509:<I>…<SR>serial`), loaded into a
//!   throwaway slapd (tests/support/slapd.rs) reached over LDAPS;
//! - a fast upstream (benches/fleet/upstream.rs) in a child process;
//! - seg (`target/release/seg run`), nginx and HAProxy from the templates in benches/fleet/,
//!   each one process pinned to core 0 (`taskset -c 0`); the bench, the upstream and slapd run
//!   on core 1.
//!
//! Each round runs every scenario against seg, then nginx, then HAProxy (interleaved rounds);
//! the table gives the median and min–max over rounds and the ratios seg/nginx, seg/HAProxy.
//! The table goes to stdout and `target/fleet/report.json`.
//!
//! Scenarios, per proxy and round: one request checks the job is done (the identity header
//! the upstream received); full handshakes with a new device per connection (a first pass —
//! cold for seg — and a second); keep-alive requests/s over 64 connections and the proxy's CPU
//! per request; p50/p99 at a fixed 2k requests/s minus the same straight to the upstream;
//! resumed TLS 1.3 handshakes; for seg only, a directory outage under steady traffic (slapd
//! stopped for `--outage-secs`) and the EAS load budget (a fleet living an ActiveSync day 60×
//! faster: held Pings with their own heartbeat, Syncs, reconnects; seg's CPU gives the devices
//! one core serves at 80 %); then, on a fresh process, idle connections and held Pings at each
//! level (VmRSS slopes), a restart under the held fleet (time until every device's re-issued
//! Ping reached the upstream; seg's `seg_directory_searches_total`), for seg once more with
//! its identity-cache snapshot (warm restart), and every device leaving during its held Ping
//! (does the upstream see its request closed?). Once, after the rounds (`replicas`): three seg
//! replicas behind HAProxy in TCP mode, each alone and then sharing a redis-server
//! (`[fleet]`), through a cold storm and a rolling restart (benches/fleet/replicas.rs).
//!
//! `FLEET_SEG_BIN=/path/to/seg` measures that seg binary instead of this build's (an earlier
//! commit's, for a before/after in one session); `FLEET_SEG_AUDIT=stdout` has seg write its
//! audit records to stdout only in the "logging on" scenario (no `[audit]` file);
//! `FLEET_KEEP_DIR=1` keeps the work dir (the proxies' logs, seg's audit file) at the end.
//! `FLEET_HEAPTRACK=/tmp/seg.heap` runs seg under heaptrack (benches/fleet/peers.rs says how
//! to read the profiles); `--keepalive-secs N` lengthens the keep-alive scenario for `perf`.

#[path = "../tests/support/haproxy.rs"]
mod haproxy;
#[path = "fleet/http.rs"]
mod http;
#[path = "../tests/support/ldif.rs"]
mod ldif;
#[path = "fleet/peers.rs"]
mod peers;
#[path = "fleet/replicas.rs"]
mod replicas;
#[path = "fleet/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "../tests/support/slapd.rs"]
mod slapd;
#[path = "fleet/upstream.rs"]
mod upstream;

use std::io::{self, BufRead as _};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ClientConfig;
use seg::demo::pki::{CertAuthority, LeafSpec};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};

use http::{connect_plain, connect_tls, device_config, eas_request, HttpConn};
use peers::{free_port, Kind, Proxy, Setup};
use report::{Figure, Report};
use slapd::{Slapd, SlapdOptions, TlsFiles, UserSpec};

/// The fleet CA's name as AD writes it in `altSecurityIdentities`.
const CA_AD_NAME: &str = "O=Fleet Test,CN=Fleet Issuing CA";
const DOMAIN: &str = "corp.test";

struct Opts {
    quick: bool,
    devices: usize,
    rounds: usize,
    keepalive_secs: f64,
    latency_secs: f64,
    latency_rate: f64,
    handshakes: usize,
    resumed_secs: f64,
    outage_secs: f64,
    /// EAS load budget: the fleet sizes tried (smallest first), and seconds measured at each.
    budget_devices: Vec<usize>,
    budget_secs: f64,
    levels: Vec<usize>,
    kinds: Vec<Kind>,
    /// `--only a,b`: run just these scenarios (names in `SCENARIOS`); all when empty.
    only: Vec<String>,
}

/// The scenarios `--only` can pick.
const SCENARIOS: [&str; 10] = [
    "handshakes",
    "keepalive",
    "latency",
    "logged",
    "resumed",
    "outage",
    "budget",
    "longpolls",
    "tlsupstream",
    "replicas",
];

impl Opts {
    fn parse() -> Opts {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let quick = args.iter().any(|a| a == "--quick");
        let mut opts = if quick {
            Opts {
                quick,
                devices: 1500,
                rounds: 1,
                keepalive_secs: 2.0,
                latency_secs: 2.0,
                latency_rate: 2000.0,
                handshakes: 400,
                resumed_secs: 2.0,
                outage_secs: 5.0,
                budget_devices: vec![1000],
                budget_secs: 10.0,
                levels: vec![250, 500, 1000],
                kinds: Kind::ALL.to_vec(),
                only: Vec::new(),
            }
        } else {
            Opts {
                quick,
                devices: 10_000,
                rounds: 3,
                keepalive_secs: 5.0,
                latency_secs: 5.0,
                latency_rate: 2000.0,
                handshakes: 4000,
                resumed_secs: 5.0,
                outage_secs: 30.0,
                budget_devices: vec![1000, 3000, 6000, 9000],
                budget_secs: 20.0,
                levels: vec![2000, 5000, 9000],
                kinds: Kind::ALL.to_vec(),
                only: Vec::new(),
            }
        };
        let value = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        if let Some(v) = value("--rounds") {
            opts.rounds = v.parse().expect("--rounds N");
        }
        if let Some(v) = value("--budget-devices") {
            opts.budget_devices = v
                .split(',')
                .map(|n| n.parse().expect("--budget-devices a,b,c"))
                .collect();
        }
        if let Some(v) = value("--outage-secs") {
            opts.outage_secs = v.parse().expect("--outage-secs N");
        }
        if let Some(v) = value("--keepalive-secs") {
            opts.keepalive_secs = v.parse().expect("--keepalive-secs N");
        }
        if let Some(v) = value("--latency-secs") {
            opts.latency_secs = v.parse().expect("--latency-secs N");
        }
        if let Some(v) = value("--handshakes") {
            opts.handshakes = v.parse().expect("--handshakes N");
        }
        if let Some(v) = value("--devices") {
            opts.devices = v.parse().expect("--devices N");
        }
        if let Some(v) = value("--levels") {
            opts.levels = v
                .split(',')
                .map(|l| l.parse().expect("--levels a,b,c"))
                .collect();
        }
        if let Some(v) = value("--proxies") {
            opts.kinds = v
                .split(',')
                .map(|k| Kind::parse(k).expect("--proxies seg,nginx,haproxy"))
                .collect();
        }
        if let Some(v) = value("--only") {
            opts.only = v.split(',').map(str::to_string).collect();
            for name in &opts.only {
                assert!(
                    SCENARIOS.contains(&name.as_str()),
                    "--only: unknown scenario {name:?}; known: {SCENARIOS:?}"
                );
            }
        }
        let most = opts.levels.iter().copied().max().unwrap_or(0);
        let fits = most.max(64);
        opts.budget_devices.retain(|&n| n <= fits);
        opts.devices = opts.devices.max(most).max(opts.handshakes + 1).max(65);
        opts
    }
}

/// One simulated device: its TLS client configuration and its two requests.
struct Device {
    cert_der: Vec<u8>,
    key: PrivateKeyDer<'static>,
    config: Arc<ClientConfig>,
    sync: Vec<u8>,
    ping: Vec<u8>,
}

type Fleet = Arc<Vec<Device>>;

impl Opts {
    /// Whether `--only` (if given) names this scenario.
    fn runs(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == scenario)
    }
}

fn main() {
    if std::env::var_os("FLEET_ROLE").is_some_and(|r| r == "upstream") {
        upstream::child_main();
        return;
    }
    let opts = Opts::parse();
    let started = Instant::now();
    let load_at_start = load_average();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The load generator (and everything it starts: slapd, the upstream) on core 1.
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    // Above the compilers and tests other people may be running on the same two cores; every
    // process the bench starts inherits it (only root may raise a priority: a no-op otherwise).
    let reniced = Command::new("renice")
        .args(["-n", "-10", "-p", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());

    // `FLEET_SEG_BIN` runs another build of seg (an earlier commit's, for a before/after).
    let seg_bin = std::env::var_os("FLEET_SEG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_seg")));
    let mut report = Report::default();
    // A requested peer that is missing is a failure, not a quiet gap in the table; leave it
    // out explicitly with --proxies.
    let missing: Vec<&str> = opts
        .kinds
        .iter()
        .filter(|k| !k.available(&seg_bin))
        .map(|k| k.name())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "fleet: {} not installed: apt-get install -y nginx haproxy (./tests/run.sh does), or leave them out with --proxies",
            missing.join(", ")
        );
        std::process::exit(1);
    }
    let kinds: Vec<Kind> = opts.kinds.clone();

    let mut levels = opts.levels.clone();
    let limit = open_file_limit();
    // The bench holds one socket per held device, plus a few dozen of its own.
    if let Some(limit) = limit {
        let most = limit.saturating_sub(200) as usize;
        if levels.iter().any(|&l| l > most) {
            report.notes.push(format!(
                "long-poll levels capped at {most} by this process's open-file limit ({limit})"
            ));
            levels.retain(|&l| l <= most);
            if levels.is_empty() {
                levels.push(most);
            }
        }
    }

    let dir = std::env::temp_dir().join(format!("seg-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    eprintln!(
        "fleet: {} mode, {} devices, {} round(s), proxies {:?}, work dir {}",
        if opts.quick { "quick" } else { "full" },
        opts.devices,
        opts.rounds,
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>(),
        dir.display()
    );

    // PKI and the directory.
    let t = Instant::now();
    let ca = CertAuthority::new("Fleet Test", "Fleet Issuing CA").expect("CA");
    let server = ca.issue(&LeafSpec::loopback_server()).expect("server cert");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let ca_path = write("ca.pem", &ca.cert_pem());
    let cert_path = write("server.pem", &server.cert_pem);
    let key_path = write("server.key", &server.key_pem);
    let cert_and_key = write(
        "server-and-key.pem",
        &format!("{}{}", server.cert_pem, server.key_pem),
    );
    let password_file = write("bind-password", "svc-password\n");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der())).expect("fleet CA");
    let roots = Arc::new(roots);
    let _ = ROOTS.set(roots.clone());
    let (fleet, users) = make_fleet(&ca, &roots, opts.devices);
    let fleet: Fleet = Arc::new(fleet);
    eprintln!(
        "fleet: {} device certificates in {:.1} s",
        fleet.len(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let mut slapd = Slapd::start(SlapdOptions {
        users,
        bind_password: "svc-password".into(),
        tls: Some(TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
            ca: ca_path.clone(),
        }),
        ..SlapdOptions::default()
    });
    eprintln!(
        "fleet: slapd with {} accounts in {:.1} s",
        fleet.len(),
        t.elapsed().as_secs_f64()
    );
    let upstream = UpstreamChild::start(&cert_path, &key_path);

    let setup = Setup {
        dir: dir.clone(),
        seg_bin: seg_bin.clone(),
        cert: cert_path,
        key: key_path,
        cert_and_key,
        ca: ca_path,
        upstream: upstream.addr,
        upstream_tls: upstream.tls_addr,
        ldaps_url: slapd.ldaps_url(),
        base_dn: slapd.suffix().to_string(),
        bind_dn: slapd.bind_dn(),
        password_file,
    };
    let mut proxies: Vec<Proxies> = kinds
        .iter()
        .map(|&k| Proxies {
            plain: Proxy::new(k, &setup, (free_port(), free_port()), false, false),
            tls_upstream: Proxy::new(k, &setup, (free_port(), free_port()), true, false),
            logged: Proxy::new(k, &setup, (free_port(), free_port()), false, true),
        })
        .collect();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut direct = Vec::new();
    let mut fleets = Vec::new();
    runtime.block_on(async {
        for round in 0..opts.rounds {
            eprintln!("fleet: round {} of {}", round + 1, opts.rounds);
            let base = direct_baseline(upstream.addr, &opts).await;
            eprintln!(
                "  direct upstream at {}/s: p50 {} µs, p99 {} µs",
                opts.latency_rate, base.0, base.1
            );
            direct.push(base);
            for proxies in proxies.iter_mut() {
                run_proxy(
                    proxies,
                    &fleet,
                    &opts,
                    &levels,
                    (upstream.addr, &mut slapd),
                    base,
                    &mut report,
                )
                .await;
            }
        }
        // Three replicas behind an L4 front, alone and sharing a store (once, after the
        // rounds; seg only).
        if opts.runs("replicas") && kinds.contains(&Kind::Seg) {
            let devices = fleet.len().min(9_000);
            // A tight store budget (10 ms) and the default (50 ms): the three replicas share
            // one core here, so under the storm a store answer can wait for the CPU past 10 ms.
            for budget in [None, Some("10ms"), Some("50ms")] {
                eprintln!(
                    "fleet: three replicas behind HAProxy, {} ({devices} devices)",
                    budget.map_or("each alone".into(), |b| format!(
                        "sharing a store, fleet.timeout {b}"
                    ))
                );
                let figures = replicas::run(&setup, &fleet, devices, budget).await;
                eprintln!("  {figures:?}");
                fleets.push((budget, figures));
            }
        }
    });

    for proxies in proxies.iter_mut() {
        proxies.plain.stop();
        proxies.tls_upstream.stop();
        proxies.logged.stop();
    }
    drop(upstream);
    drop(slapd);
    if std::env::var_os("FLEET_KEEP_DIR").is_some() {
        eprintln!("fleet: kept {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }

    for (budget, f) in &fleets {
        report.notes.push(format!(
            "Three seg replicas behind HAProxy (TCP, round robin), {}: {} devices' cold storm (two \
             connections each, 200 devices at a time) {:.1} s with {} directory searches; after \
             a rolling restart (each replica cold), every device once more in {:.1} s with {} \
             searches; store operations past fleet.timeout {}; {} requests refused (retried), {} \
             lost. One unseen device at a time: first request {:.2} ms, second (another \
             replica) {:.2} ms.",
            budget.map_or("each alone".into(), |b| format!(
                "sharing a store ([fleet], redis-server, fleet.timeout {b})"
            )),
            f.devices,
            f.storm_secs,
            f.storm_searches,
            f.restart_secs,
            f.restart_searches,
            f.store_timeouts,
            f.refused,
            f.lost,
            f.first_ms,
            f.second_ms,
        ));
    }

    // Facts of the run.
    report.notes.push(format!(
        "direct upstream (plain HTTP, no proxy) at {}/s: p50 {} µs, p99 {} µs (per round: {:?})",
        opts.latency_rate,
        direct.iter().map(|d| d.0).sum::<f64>() / direct.len().max(1) as f64,
        direct.iter().map(|d| d.1).sum::<f64>() / direct.len().max(1) as f64,
        direct
    ));
    report.notes.push(
        "TLS 1.3 everywhere, the device offering AES-128-GCM-SHA256 first as iOS and Android do \
         (HAProxy, which would pick AES-256-GCM-SHA384 by its own order, is told to prefer it \
         too; the suite each proxy chose is in its first-request line), X25519, ECDSA P-256 \
         certificates. Resumption: \
         seg = stateless tickets under a per-process key (2 TLS 1.3 tickets per handshake); \
         nginx = tickets on (its default) plus ssl_session_cache shared:SSL:64m (its default is none); \
         HAProxy = its defaults (tickets, 20,000-entry cache)."
            .into(),
    );
    report.notes.push(
        "Logging: off in every scenario but \"logging on\" (nginx access_log off, HAProxy no log, \
         seg SEG_LOG=warn: no per-request audit records). Logging on, each proxy writes one line \
         per request where its operators usually do: seg its JSON audit record to stdout (a \
         file here, as the journal's pipe would take it) and to an `[audit]` file, nginx the \
         `combined` access log to a file, HAProxy `option httplog` to stdout."
            .into(),
    );
    for (figure, what) in [
        (&fig::LAT_P99, "p99 added at 2k req/s, quiet"),
        (&fig::LOG_LAT_P99, "p99 added at 2k req/s, logging on"),
    ] {
        if let Some((led, rounds)) = report.rounds_seg_leads(figure) {
            let per_round = report
                .rows
                .iter()
                .find(|r| r.key == figure.key)
                .map(|r| {
                    r.values
                        .iter()
                        .map(|(k, v)| format!("{} {v:.0?}", k.name()))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
                .unwrap_or_default();
            report.notes.push(format!(
                "{what}: seg at or below the better peer in {led} of {rounds} rounds (per round, µs: {per_round})."
            ));
        }
    }
    if reniced {
        report.notes.push(
            "Every process of the bench (proxies, upstream, slapd, load generator) ran at nice -10, \
             so that other work on the machine disturbs the figures less."
                .into(),
        );
    }
    report.notes.push(format!(
        "Load average (1, 5, 15 min) at the start: {load_at_start}; at the end: {}. Other work \
         on the machine shows in the rates more than in the CPU-per-operation figures.",
        load_average()
    ));
    let elapsed = started.elapsed().as_secs_f64();
    let header = json!({
        "mode": if opts.quick { "quick" } else { "full" },
        "devices": fleet.len(),
        "rounds": opts.rounds,
        "levels": levels,
        "keepalive_seconds": opts.keepalive_secs,
        "latency_rate": opts.latency_rate,
        "handshakes_per_pass": opts.handshakes,
        "elapsed_seconds": elapsed,
        "machine": machine(),
        "versions": kinds.iter().map(|k| (k.name(), k.version(&seg_bin))).collect::<std::collections::BTreeMap<_, _>>(),
        "open_file_limit": limit,
    });
    let markdown = report.markdown(&kinds);
    println!(
        "\n## Fleet benchmark ({} mode, {} devices, {} round(s), {:.0} s)\n\n{markdown}",
        if opts.quick { "quick" } else { "full" },
        fleet.len(),
        opts.rounds,
        elapsed
    );
    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("fleet");
    std::fs::create_dir_all(&out_dir).expect("target/fleet");
    let json = report.json(header);
    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("write report.json");
    std::fs::write(out_dir.join("report.md"), markdown).expect("write report.md");
    eprintln!("fleet: wrote {}", out_dir.join("report.json").display());
}

/// Device certificates (two threads), their client configurations and their accounts.
fn make_fleet(
    ca: &CertAuthority,
    roots: &Arc<rustls::RootCertStore>,
    n: usize,
) -> (Vec<Device>, Vec<UserSpec>) {
    let make = |i: usize| {
        let sam = format!("dev{i:05}");
        // Positive 8-byte serial, unique per device.
        let serial: Vec<u8> = [0x1f, 0x1e, 0x1d, 0x1c]
            .into_iter()
            .chain((i as u32).to_be_bytes())
            .collect();
        let issued = ca
            .issue(&LeafSpec::device(&sam).serial(&serial))
            .expect("device cert");
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("device key");
        let config = device_config(roots, &issued.der, &key, false);
        let mut user = UserSpec::new(&sam);
        user.upn = Some(format!("{sam}@{DOMAIN}"));
        let reversed: String = serial.iter().rev().map(|b| format!("{b:02x}")).collect();
        user.alt_security_identities = vec![format!("X509:<I>{CA_AD_NAME}<SR>{reversed}")];
        let device_id = format!("FLEET{i:05}");
        let device = Device {
            cert_der: issued.der,
            key,
            config,
            sync: eas_request("Sync", &sam, &device_id),
            ping: eas_request("Ping", &sam, &device_id),
        };
        (device, user)
    };
    let half = n / 2;
    let (a, b) = std::thread::scope(|s| {
        let first = s.spawn(|| (0..half).map(make).collect::<Vec<_>>());
        let second: Vec<_> = (half..n).map(make).collect();
        (first.join().expect("cert thread"), second)
    });
    a.into_iter().chain(b).unzip()
}

/// The upstream child process (same binary, `FLEET_ROLE=upstream`): plain HTTP, and the same
/// behind TLS with the fleet's server certificate.
struct UpstreamChild {
    child: Child,
    addr: SocketAddr,
    tls_addr: SocketAddr,
}

impl UpstreamChild {
    fn start(cert: &Path, key: &Path) -> UpstreamChild {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .env("FLEET_ROLE", "upstream")
            .env("FLEET_UPSTREAM_CERT", cert)
            .env("FLEET_UPSTREAM_KEY", key)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("upstream child");
        let mut lines = io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut port = |prefix: &str| -> u16 {
            let line = lines
                .next()
                .and_then(Result::ok)
                .unwrap_or_else(|| panic!("upstream child: no {prefix} line"));
            line.trim()
                .strip_prefix(prefix)
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or_else(|| panic!("upstream said {line:?}"))
        };
        let plain = port("PORT ");
        let tls = port("TLSPORT ");
        UpstreamChild {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], plain)),
            tls_addr: SocketAddr::from(([127, 0, 0, 1], tls)),
        }
    }
}

impl Drop for UpstreamChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        // The bench is pinned to one core by now: count the machine's, not its own.
        "cpus": cpuinfo.lines().filter(|l| l.starts_with("processor")).count(),
        "cpu_model": model,
        "kernel": kernel.trim(),
    })
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64
}

/// Least-squares slope of y over x.
fn slope(points: &[(usize, u64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return f64::NAN;
    }
    let mx = points.iter().map(|p| p.0 as f64).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let sxy: f64 = points
        .iter()
        .map(|p| (p.0 as f64 - mx) * (p.1 as f64 - my))
        .sum();
    let sxx: f64 = points.iter().map(|p| (p.0 as f64 - mx).powi(2)).sum();
    sxy / sxx
}

async fn sleep(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

/// p50 and p99 at the fixed rate straight to the upstream (plain HTTP).
async fn direct_baseline(addr: SocketAddr, opts: &Opts) -> (f64, f64) {
    let mut conns = Vec::new();
    for i in 0..32 {
        let conn = connect_plain(addr).await.expect("upstream");
        conns.push((conn, eas_request("Sync", &format!("dev{i:05}"), "DIRECT")));
    }
    let (_, _, conns) = paced(conns, opts.latency_rate, 0.5).await;
    let (mut lat, _, _) = paced(conns, opts.latency_rate, opts.latency_secs).await;
    lat.sort_unstable();
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

/// Open-loop requests at `rate` per second spread over the connections, each request sent at
/// its scheduled time (tokio's timer: 1 ms granularity); latency from send to full response.
async fn paced<S>(
    conns: Vec<(HttpConn<S>, Vec<u8>)>,
    rate: f64,
    secs: f64,
) -> (Vec<u32>, u64, Vec<(HttpConn<S>, Vec<u8>)>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let k = conns.len();
    let t0 = tokio::time::Instant::now() + Duration::from_millis(20);
    let end = t0 + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for (j, (mut conn, request)) in conns.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            for n in 0u64.. {
                let at = t0 + Duration::from_secs_f64((j as f64 + (n as usize * k) as f64) / rate);
                if at >= end {
                    break;
                }
                tokio::time::sleep_until(at).await;
                let sent = Instant::now();
                match conn.request(&request).await {
                    Ok(r) if r.status == 200 => latencies.push(sent.elapsed().as_micros() as u32),
                    _ => errors += 1,
                }
            }
            (latencies, errors, conn, request)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut back = Vec::new();
    for t in tasks {
        let (l, e, c, r) = t.await.expect("paced task");
        all.extend(l);
        errors += e;
        back.push((c, r));
    }
    (all, errors, back)
}

/// The figures of the table, in its order.
mod fig {
    use crate::report::Figure;

    const HS: &str = "full handshake + 1 request";
    const KA: &str = "keep-alive, 64 connections";
    const LAT: &str = "latency at 2k req/s";
    const LOG: &str = "logging on (one line per request)";
    const RES: &str = "resumed handshake + 1 request";
    const LP: &str = "held long polls";
    const STORM: &str = "reconnect storm";
    const ORPHAN: &str = "orphaned long poll";
    const OUTAGE: &str = "directory outage";
    const BUDGET: &str = "EAS load budget";

    pub const HS_COLD: Figure =
        Figure::new(HS, "hs_cold", "first pass (seg: cold cache)", "/s", true);
    pub const HS_COLD_CPU: Figure = Figure::new(
        HS,
        "hs_cold_cpu",
        "first pass: proxy CPU per handshake",
        "µs",
        false,
    );
    pub const HS_WARM: Figure =
        Figure::new(HS, "hs_warm", "second pass (seg: warm cache)", "/s", true);
    pub const HS_WARM_CPU: Figure = Figure::new(
        HS,
        "hs_warm_cpu",
        "second pass: proxy CPU per handshake",
        "µs",
        false,
    );
    pub const KA_RPS: Figure = Figure::new(KA, "ka_rps", "requests", "/s", true);
    pub const KA_CPU: Figure = Figure::new(KA, "ka_cpu", "proxy CPU per request", "µs", false);
    pub const KA_KERNEL: Figure = Figure::new(
        KA,
        "ka_kernel",
        "of which in the kernel (4 socket calls)",
        "µs",
        false,
    );
    pub const LAT_P50: Figure = Figure::new(LAT, "lat_p50", "p50 added over direct", "µs", false);
    pub const LOG_KA_RPS: Figure =
        Figure::new(LOG, "log_ka_rps", "keep-alive requests", "/s", true);
    pub const LOG_KA_CPU: Figure = Figure::new(
        LOG,
        "log_ka_cpu",
        "keep-alive: proxy CPU per request",
        "µs",
        false,
    );
    pub const LOG_KA_KERNEL: Figure = Figure::new(
        LOG,
        "log_ka_kernel",
        "keep-alive: of which in the kernel",
        "µs",
        false,
    );
    pub const LOG_LAT_P50: Figure = Figure::new(
        LOG,
        "log_lat_p50",
        "p50 added over direct at 2k req/s",
        "µs",
        false,
    );
    pub const LOG_LAT_P99: Figure = Figure::new(
        LOG,
        "log_lat_p99",
        "p99 added over direct at 2k req/s",
        "µs",
        false,
    );
    pub const LAT_P99: Figure = Figure::new(LAT, "lat_p99", "p99 added over direct", "µs", false);
    pub const RESUMED: Figure = Figure::new(RES, "hs_resumed", "resumed", "/s", true);
    pub const RESUMED_CPU: Figure = Figure::new(
        RES,
        "hs_resumed_cpu",
        "proxy CPU per resumed handshake",
        "µs",
        false,
    );
    pub const MEM_IDLE: Figure = Figure::new(
        LP,
        "mem_idle",
        "memory per idle mTLS connection",
        "KiB",
        false,
    );
    pub const MEM_HELD: Figure = Figure::new(
        LP,
        "mem_held",
        "memory per device holding a Ping",
        "KiB",
        false,
    );
    pub const MEM_IDLE_TLS: Figure = Figure::new(
        LP,
        "mem_idle_tls",
        "with TLS to the upstream too: memory per idle connection",
        "KiB",
        false,
    );
    pub const MEM_HELD_TLS: Figure = Figure::new(
        LP,
        "mem_held_tls",
        "with TLS to the upstream too: memory per device holding a Ping",
        "KiB",
        false,
    );
    pub const HELD_MAX: Figure = Figure::new(
        LP,
        "held_max",
        "devices holding a Ping at once",
        "devices",
        true,
    );
    pub const STORM_SECS: Figure = Figure::new(
        STORM,
        "storm_secs",
        "all devices re-served after a restart",
        "s",
        false,
    );
    pub const STORM_SEARCHES: Figure = Figure::new(
        STORM,
        "storm_searches",
        "directory searches during the storm",
        "searches",
        false,
    );
    pub const WARM_SECS: Figure = Figure::new(
        STORM,
        "warm_storm_secs",
        "seg with its identity-cache snapshot: all re-served",
        "s",
        false,
    );
    pub const WARM_SEARCHES: Figure = Figure::new(
        STORM,
        "warm_storm_searches",
        "seg with its snapshot: directory searches until all were re-served",
        "searches",
        false,
    );
    pub const OUTAGE_P99_BEFORE: Figure = Figure::new(
        OUTAGE,
        "outage_p99_before",
        "p99 added at 2k req/s, directory up",
        "µs",
        false,
    );
    pub const OUTAGE_P99_DURING: Figure = Figure::new(
        OUTAGE,
        "outage_p99_during",
        "p99 added at 2k req/s, directory stopped",
        "µs",
        false,
    );
    pub const OUTAGE_ERRORS: Figure = Figure::new(
        OUTAGE,
        "outage_errors",
        "failed requests from known devices during the outage",
        "requests",
        false,
    );
    pub const OUTAGE_NEW_MS: Figure = Figure::new(
        OUTAGE,
        "outage_new_ms",
        "a never-seen device's 503 + Retry-After, after",
        "ms",
        false,
    );
    pub const BUDGET_FLEET: Figure = Figure::new(
        BUDGET,
        "budget_fleet",
        "largest fleet measured within budget (≤ 80 % CPU, p99 +≤ 5 ms, no errors)",
        "devices",
        true,
    );
    pub const BUDGET_DEVICES: Figure = Figure::new(
        BUDGET,
        "budget_devices",
        "its CPU extrapolated: devices one core serves at 80 %",
        "devices",
        true,
    );
    pub const BUDGET_P99: Figure = Figure::new(
        BUDGET,
        "budget_p99",
        "p99 added to a Sync, at the measured load",
        "µs",
        false,
    );
    pub const ABORT_MS: Figure = Figure::new(
        ORPHAN,
        "abort_ms",
        "upstream sees every held request closed after its device left",
        "ms",
        false,
    );
    pub const ABORT_OPEN: Figure = Figure::new(
        ORPHAN,
        "abort_open",
        "held requests still open upstream 3 s after their devices left",
        "%",
        false,
    );
}

/// One proxy in its three set-ups: quiet toward the plain upstream (most scenarios), toward
/// the upstream over TLS, and with its per-request log on.
struct Proxies {
    plain: Proxy,
    tls_upstream: Proxy,
    logged: Proxy,
}

/// Every scenario against one proxy, one round.
async fn run_proxy(
    Proxies {
        plain: proxy,
        tls_upstream,
        logged,
    }: &mut Proxies,
    fleet: &Fleet,
    opts: &Opts,
    levels: &[usize],
    (up, slapd): (SocketAddr, &mut Slapd),
    direct: (f64, f64),
    report: &mut Report,
) {
    let kind = proxy.kind;
    let name = kind.name();
    let t = Instant::now();
    proxy.start_cold();
    let addr = proxy.addr;

    // Does it do the job? One request, the identity header the upstream received.
    let first = match connect_tls(addr, &fleet[0].config).await {
        Ok(mut c) => {
            let session = c.stream.get_ref().1;
            let suite = session
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
                .unwrap_or_default();
            let group = session
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
                .unwrap_or_default();
            match c.request(&fleet[0].sync).await {
                Ok(r) => format!(
                    "first request → {}, upstream received X-Remote-User: {:?} ({suite}, {group})",
                    r.status,
                    r.seen_user.unwrap_or_default()
                ),
                Err(e) => format!("first request failed: {e}"),
            }
        }
        Err(e) => format!("first handshake failed: {e}"),
    };
    report.fact(kind, first);

    if opts.runs("handshakes") {
        // Full handshakes, a different device on every connection: cold, then warm.
        let range = 1..1 + opts.handshakes;
        let cold = handshakes(proxy, fleet, range.clone(), 32, 30.0).await;
        let warm = handshakes(proxy, fleet, range, 32, 30.0).await;
        eprintln!(
            "  {name}: full handshakes cold {:.0}/s ({:.0} µs CPU each, {} errors), warm {:.0}/s ({:.0} µs CPU each, {} errors)",
            cold.0, cold.2, cold.1, warm.0, warm.2, warm.1
        );
        report.add(&fig::HS_COLD, kind, cold.0);
        report.add(&fig::HS_COLD_CPU, kind, cold.2);
        report.add(&fig::HS_WARM, kind, warm.0);
        report.add(&fig::HS_WARM_CPU, kind, warm.2);
        if cold.1 + warm.1 > 0 {
            report.fact(kind, format!("full handshakes: {} errors", cold.1 + warm.1));
        }
    }

    if opts.runs("keepalive") {
        // Keep-alive throughput.
        let figures = [&fig::KA_RPS, &fig::KA_CPU, &fig::KA_KERNEL];
        report_keepalive(proxy, fleet, opts, name, figures, report).await;
    }

    if opts.runs("latency") {
        // Added latency at a fixed rate.
        let figures = [&fig::LAT_P50, &fig::LAT_P99];
        report_latency(proxy, fleet, opts, (name, direct), figures, report).await;
    }

    if opts.runs("logged") {
        // The same two scenarios as deployed: one log line per request.
        logged.start_cold();
        let label = format!("{name}, logging on");
        let figures = [&fig::LOG_KA_RPS, &fig::LOG_KA_CPU, &fig::LOG_KA_KERNEL];
        report_keepalive(logged, fleet, opts, &label, figures, report).await;
        let figures = [&fig::LOG_LAT_P50, &fig::LOG_LAT_P99];
        report_latency(logged, fleet, opts, (&label, direct), figures, report).await;
        logged.stop();
    }

    if opts.runs("resumed") {
        // Resumed handshakes.
        let (rate, fraction, errors, cpu) = resumed(proxy, fleet, 1..33, opts.resumed_secs).await;
        eprintln!(
            "  {name}: resumed handshakes {rate:.0}/s ({cpu:.0} µs CPU each, {:.0} % resumed, {errors} errors)",
            fraction * 100.0
        );
        report.add(&fig::RESUMED, kind, rate);
        report.add(&fig::RESUMED_CPU, kind, cpu);
        report.fact(
            kind,
            format!(
                "resumed scenario: {:.0} % of handshakes resumed (TLS 1.3)",
                fraction * 100.0
            ),
        );
    }

    // Directory outage under steady traffic (seg is the only one that uses the directory).
    if kind == Kind::Seg && opts.runs("outage") {
        match outage(addr, fleet, opts, slapd).await {
            Ok(o) => {
                eprintln!(
                    "  {name}: directory outage: p99 before {} µs, during {} µs, after {} µs; {} errors of {} requests during; a new device got {} in {:.0} ms",
                    o.p99[0], o.p99[1], o.p99[2], o.errors, o.during, o.new_device.0, o.new_device.1
                );
                report.add(&fig::OUTAGE_P99_BEFORE, kind, o.p99[0] - direct.1);
                report.add(&fig::OUTAGE_P99_DURING, kind, o.p99[1] - direct.1);
                report.add(&fig::OUTAGE_ERRORS, kind, o.errors as f64);
                report.add(&fig::OUTAGE_NEW_MS, kind, o.new_device.1);
                report.fact(
                    kind,
                    format!(
                        "directory outage ({:.0} s, slapd stopped): known devices {} errors in {} requests; a device never seen before got {} (Retry-After)",
                        opts.outage_secs, o.errors, o.during, o.new_device.0
                    ),
                );
            }
            Err(e) => report.fact(kind, format!("directory outage failed: {e}")),
        }
    }

    // The EAS load budget (seg's capacity; the peers do not map identities): growing fleets;
    // the largest that stays within the budget (≤ 80 % of the core, Sync p99 added ≤ 5 ms,
    // no errors) is the figure, with the devices per core its CPU extrapolates to.
    if kind == Kind::Seg && opts.runs("budget") {
        let mut within = None;
        for &n in &opts.budget_devices {
            let b = eas_budget(proxy, fleet, opts, up, n).await;
            let added = b.sync_p99 - direct.1;
            let ok = b.core_share <= 0.8 && added <= 5000.0 && b.errors == 0;
            eprintln!(
                "  {name}: EAS budget: {} devices × {}× time = {} real: {:.0} req/s ({} Syncs), {:.1} % of a core, Sync p99 {:.0} µs (+{added:.0}), {} errors → {:.0} devices per core at 80 %{}",
                b.devices, COMPRESSION, b.devices * COMPRESSION as usize, b.rps, b.syncs, b.core_share * 100.0, b.sync_p99, b.errors, b.per_core,
                if ok { "" } else { " (outside the budget)" }
            );
            report.fact(
                kind,
                format!(
                    "EAS load budget, {} devices 60× faster ({} real): {:.0} req/s took {:.1} % of a core; Sync p99 +{added:.0} µs; {} errors{}",
                    b.devices, b.devices * COMPRESSION as usize, b.rps, b.core_share * 100.0, b.errors,
                    if ok { "" } else { " — outside the budget" }
                ),
            );
            if !ok {
                break;
            }
            within = Some((b, added));
        }
        if let Some((b, added)) = within {
            report.add(
                &fig::BUDGET_FLEET,
                kind,
                (b.devices * COMPRESSION as usize) as f64,
            );
            report.add(&fig::BUDGET_DEVICES, kind, b.per_core);
            report.add(&fig::BUDGET_P99, kind, added);
        }
    }

    // Long polls, memory, reconnect storm, orphaned long polls: on a fresh process.
    proxy.stop();
    if opts.runs("longpolls") {
        proxy.start_cold();
        report_long_polls(proxy, fleet, levels, up, report).await;
        proxy.stop();
    }
    // Memory again with TLS to the upstream too, as an Exchange server is reached.
    if opts.runs("tlsupstream") {
        tls_upstream.start_cold();
        let lp = long_polls(tls_upstream, fleet, levels, up, false).await;
        report_memory(
            report,
            kind,
            "with TLS to the upstream: ",
            &lp,
            [&fig::MEM_IDLE_TLS, &fig::MEM_HELD_TLS],
        );
        tls_upstream.stop();
    }
    eprintln!("  {name}: round done in {:.1} s", t.elapsed().as_secs_f64());
}

/// Keep-alive throughput and CPU per request into `figures` (rate, CPU, of which kernel).
async fn report_keepalive(
    proxy: &Proxy,
    fleet: &Fleet,
    opts: &Opts,
    label: &str,
    figures: [&Figure; 3],
    report: &mut Report,
) {
    match keepalive(proxy, fleet, 64, opts.keepalive_secs).await {
        Ok((rps, cpu, kernel, errors)) => {
            eprintln!("  {label}: keep-alive {rps:.0} req/s, {cpu:.1} µs CPU each ({kernel:.1} in the kernel), {errors} errors");
            for (figure, value) in figures.into_iter().zip([rps, cpu, kernel]) {
                report.add(figure, proxy.kind, value);
            }
        }
        Err(e) => report.fact(proxy.kind, format!("{label}: keep-alive failed: {e}")),
    }
}

/// p50 and p99 at the fixed rate, less the direct upstream's (`direct`), into `figures`.
async fn report_latency(
    proxy: &Proxy,
    fleet: &Fleet,
    opts: &Opts,
    (label, direct): (&str, (f64, f64)),
    figures: [&Figure; 2],
    report: &mut Report,
) {
    match latency(proxy.addr, fleet, opts).await {
        Ok((p50, p99, errors)) => {
            eprintln!(
                "  {label}: at {}/s p50 {p50} µs, p99 {p99} µs ({errors} errors)",
                opts.latency_rate
            );
            report.add(figures[0], proxy.kind, p50 - direct.0);
            report.add(figures[1], proxy.kind, p99 - direct.1);
        }
        Err(e) => report.fact(proxy.kind, format!("{label}: latency failed: {e}")),
    }
}

/// Memory per idle connection and per device holding a Ping, from the slopes over the
/// levels, into `figures` (idle, held).
fn report_memory(
    report: &mut Report,
    kind: Kind,
    label: &str,
    lp: &LongPolls,
    figures: [&Figure; 2],
) {
    let idle = slope(&lp.idle);
    let held = slope(&lp.held);
    eprintln!(
        "  {}: {label}memory idle {:?} → {idle:.1} KiB/conn; held {:?} → +{held:.1} KiB/held",
        kind.name(),
        lp.idle,
        lp.held
    );
    report.add(figures[0], kind, idle);
    report.add(figures[1], kind, idle + held);
}

/// Held long polls, the reconnect storm and orphaned long polls, into the report.
async fn report_long_polls(
    proxy: &mut Proxy,
    fleet: &Fleet,
    levels: &[usize],
    up: SocketAddr,
    report: &mut Report,
) {
    let kind = proxy.kind;
    let name = kind.name();
    let lp = long_polls(proxy, fleet, levels, up, true).await;
    report_memory(report, kind, "", &lp, [&fig::MEM_IDLE, &fig::MEM_HELD]);
    report.add(&fig::HELD_MAX, kind, lp.held_reached as f64);
    report.add(&fig::STORM_SECS, kind, lp.storm_secs.unwrap_or(f64::NAN));
    if let Some(searches) = lp.searches {
        report.add(&fig::STORM_SEARCHES, kind, searches);
    }
    if let Some(warm) = lp.warm {
        report.add(&fig::WARM_SECS, kind, warm.secs.unwrap_or(f64::NAN));
        if let Some(searches) = warm.searches {
            report.add(&fig::WARM_SEARCHES, kind, searches);
        }
        eprintln!(
            "  {name}: warm restart (snapshot): {} devices re-served in {:?} s, searches {:?}",
            warm.reached, warm.secs, warm.searches
        );
    }
    match lp.storm_secs {
        Some(s) => eprintln!(
            "  {name}: storm of {} devices re-served in {s:.2} s ({} 503s, {} failed connects, searches {:?})",
            lp.held_reached, lp.storm_503, lp.connect_errors, lp.searches
        ),
        None => eprintln!(
            "  {name}: storm: only {} of {} devices re-served",
            lp.storm_reached, lp.held_reached
        ),
    }
    if lp.storm_503 > 0 {
        report.fact(
            kind,
            format!(
                "reconnect storm: devices got {} 503 answers (Retry-After honoured, capped at 30 s)",
                lp.storm_503
            ),
        );
    }
    report.add(&fig::ABORT_MS, kind, lp.abort_ms.unwrap_or(f64::NAN));
    report.add(
        &fig::ABORT_OPEN,
        kind,
        100.0 * lp.still_open as f64 / lp.abort_of.max(1) as f64,
    );
    let behaviour = match lp.abort_ms {
        Some(ms) => format!(
            "device gone during a held Ping → upstream request aborted ({} held, all closed upstream within {ms:.0} ms)",
            lp.abort_of
        ),
        None => format!(
            "device gone during a held Ping → upstream request kept open ({} of {} still held upstream 3 s later)",
            lp.still_open, lp.abort_of
        ),
    };
    eprintln!("  {name}: {behaviour}");
    report.fact(kind, behaviour);
}

/// Connections opened one after another, each with a different device, `concurrency` at a
/// time; each does one request and closes. Returns (handshakes per second, errors, proxy CPU
/// µs per handshake).
async fn handshakes(
    proxy: &Proxy,
    fleet: &Fleet,
    range: Range<usize>,
    concurrency: usize,
    max_secs: f64,
) -> (f64, u64, f64) {
    let addr = proxy.addr;
    let cpu0 = proxy.cpu_seconds();
    let next = Arc::new(AtomicUsize::new(range.start));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(max_secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, ok, errors, fleet) = (next.clone(), ok.clone(), errors.clone(), fleet.clone());
        let end = range.end;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end || Instant::now() > deadline {
                    break;
                }
                let device = &fleet[i];
                let result = match connect_tls(addr, &device.config).await {
                    Ok(mut c) => c.request(&device.sync).await.map(|r| r.status),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = proxy.cpu_seconds() - cpu0;
    let n = ok.load(Ordering::Relaxed) as f64;
    (
        n / elapsed,
        errors.load(Ordering::Relaxed),
        cpu * 1e6 / n.max(1.0),
    )
}

/// `conns` keep-alive connections, each sending its next request as soon as the previous
/// response arrives. Returns (requests per second, proxy CPU µs per request, errors).
async fn keepalive(
    proxy: &Proxy,
    fleet: &Fleet,
    conns: usize,
    secs: f64,
) -> io::Result<(f64, f64, f64, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for device in fleet.iter().skip(1).take(conns) {
        let mut conn = connect_tls(proxy.addr, &device.config).await?;
        for _ in 0..5 {
            conn.request(&device.sync).await?;
        }
        let request = device.sync.clone();
        let (stop, count, errors) = (stop.clone(), count.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match conn.request(&request).await {
                    Ok(r) if r.status == 200 => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }));
    }
    sleep(0.3).await;
    let (c0, t0, cpu0) = (
        count.load(Ordering::Relaxed),
        Instant::now(),
        proxy.cpu_split(),
    );
    sleep(secs).await;
    let (c1, t1, cpu1) = (
        count.load(Ordering::Relaxed),
        Instant::now(),
        proxy.cpu_split(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let n = (c1 - c0) as f64;
    Ok((
        n / (t1 - t0).as_secs_f64(),
        (cpu1.0 + cpu1.1 - cpu0.0 - cpu0.1) * 1e6 / n.max(1.0),
        (cpu1.1 - cpu0.1) * 1e6 / n.max(1.0),
        errors.load(Ordering::Relaxed),
    ))
}

struct Outage {
    /// p99 (µs) before, during and after the outage.
    p99: [f64; 3],
    errors: u64,
    during: usize,
    /// What a device the cache has never seen got during the outage, and how fast (ms).
    new_device: (u16, f64),
}

/// Steady traffic from known devices (32 keep-alive connections at the latency rate) while
/// slapd is stopped for `outage_secs` and started again.
async fn outage(
    addr: SocketAddr,
    fleet: &Fleet,
    opts: &Opts,
    slapd: &mut Slapd,
) -> io::Result<Outage> {
    let mut conns = Vec::new();
    for device in fleet.iter().skip(1).take(32) {
        conns.push((
            connect_tls(addr, &device.config).await?,
            device.sync.clone(),
        ));
    }
    let p99 = |mut lat: Vec<u32>| {
        lat.sort_unstable();
        percentile(&lat, 0.99)
    };
    let (before, _, conns) = paced(conns, opts.latency_rate, opts.latency_secs).await;
    slapd.stop();
    let stranger = fleet.last().expect("fleet");
    let asked = Instant::now();
    let new_device = match connect_tls(addr, &stranger.config).await {
        Ok(mut conn) => conn.request(&stranger.sync).await.map(|r| r.status)?,
        Err(e) => return Err(e),
    };
    let new_device = (new_device, asked.elapsed().as_secs_f64() * 1000.0);
    let (during, errors, conns) = paced(conns, opts.latency_rate, opts.outage_secs).await;
    slapd.restart();
    let (after, _, _) = paced(conns, opts.latency_rate, opts.latency_secs).await;
    Ok(Outage {
        during: during.len() + errors as usize,
        p99: [p99(before), p99(during), p99(after)],
        errors,
        new_device,
    })
}

/// Time runs this many times faster in the EAS budget fleet: a 5–59 min heartbeat lasts 5–59 s.
const COMPRESSION: u32 = 60;

struct Budget {
    devices: usize,
    rps: f64,
    syncs: usize,
    /// Fraction of one core seg used.
    core_share: f64,
    sync_p99: f64,
    errors: u64,
    /// Real (uncompressed) devices one core serves at 80 %.
    per_core: f64,
}

/// A small deterministic generator per device (xorshift), for heartbeats and jitter.
struct Jitter(u64);

impl Jitter {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A fleet living an ActiveSync day, `COMPRESSION` times faster: each device holds a Ping
/// whose heartbeat (5–59 min) is its own, syncs every ~3 min (the Ping returns early, as
/// Exchange answers a Ping when a folder changes), and opens a new TLS connection every
/// ~15 min (network changes; resumed). seg's CPU over the measured window, divided by the
/// real devices the fleet stands for, gives the devices one core serves at 80 %.
async fn eas_budget(proxy: &Proxy, fleet: &Fleet, opts: &Opts, up: SocketAddr, n: usize) -> Budget {
    let n = n.min(fleet.len());
    let c = COMPRESSION as f64;
    let minute = Duration::from_secs_f64(60.0 / c);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicUsize::new(0));
    let ramp = Arc::new(Semaphore::new(64));
    let addr = proxy.addr;
    let mut tasks = Vec::new();
    for i in 0..n {
        let fleet = fleet.clone();
        let (measuring, stop, errors, requests, connected, ramp) = (
            measuring.clone(),
            stop.clone(),
            errors.clone(),
            requests.clone(),
            connected.clone(),
            ramp.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let device = &fleet[i];
            let mut jitter =
                Jitter(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1).wrapping_mul(0x2545_f491));
            let heartbeat = minute.mul_f64(5.0 + 54.0 * jitter.unit());
            let start = tokio::time::Instant::now();
            let mut next_sync = start + minute.mul_f64(3.0 * jitter.unit());
            let mut next_reconnect = start + minute.mul_f64(15.0 * jitter.unit());
            let mut latencies = Vec::new();
            // Joining: connect and sync until served (a cold device may be told to come back
            // while the directory works through the others), then live the day.
            let permit = ramp.acquire_owned().await.expect("semaphore");
            let mut conn = loop {
                let Ok(mut conn) = connect_tls(addr, &device.config).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                match conn.request(&device.sync).await {
                    Ok(r) if r.status == 200 => break conn,
                    Ok(r) => {
                        let wait = r.retry_after.unwrap_or(1).min(30);
                        tokio::time::sleep(Duration::from_secs(wait)).await;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            drop(permit);
            connected.fetch_add(1, Ordering::Relaxed);
            let head = &device.ping[..device.ping.len() - 2];
            while !stop.load(Ordering::Relaxed) {
                let now = tokio::time::Instant::now();
                let hold = heartbeat
                    .min(next_sync.saturating_duration_since(now))
                    .max(Duration::from_millis(1));
                let mut ping = head.to_vec();
                ping.extend_from_slice(
                    format!("X-Fleet-Hold-Ms: {}\r\n\r\n", hold.as_millis()).as_bytes(),
                );
                let counted = measuring.load(Ordering::Relaxed);
                match conn.request(&ping).await {
                    Ok(r) if r.status == 200 => {}
                    _ if stop.load(Ordering::Relaxed) => break,
                    Ok(r) => {
                        eprintln!("  budget: device {i}: Ping answered {}", r.status);
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => {
                        eprintln!("  budget: device {i}: Ping failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
                if counted {
                    requests.fetch_add(1, Ordering::Relaxed);
                }
                let now = tokio::time::Instant::now();
                if now >= next_sync {
                    next_sync = now + minute.mul_f64(3.0 * (0.5 + jitter.unit()));
                    let sent = Instant::now();
                    match conn.request(&device.sync).await {
                        Ok(r) if r.status == 200 => {}
                        other => {
                            eprintln!(
                                "  budget: device {i}: Sync got {:?}",
                                other.map(|r| r.status)
                            );
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    if measuring.load(Ordering::Relaxed) {
                        latencies.push(sent.elapsed().as_micros() as u32);
                        requests.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if now >= next_reconnect {
                    next_reconnect = now + minute.mul_f64(15.0 * (0.5 + jitter.unit()));
                    conn = match connect_tls(addr, &device.config).await {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("  budget: device {i}: reconnect failed: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    };
                }
            }
            latencies
        }));
    }
    let all = connected.clone();
    let errs = errors.clone();
    wait_for(Duration::from_secs(120), Duration::from_millis(50), || {
        let (all, errs) = (all.clone(), errs.clone());
        async move { all.load(Ordering::Relaxed) + errs.load(Ordering::Relaxed) as usize >= n }
    })
    .await;
    // One compressed sync period to settle, then measure.
    tokio::time::sleep(minute * 3).await;
    errors.store(0, Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    let (t0, cpu0) = (Instant::now(), proxy.cpu_seconds());
    sleep(opts.budget_secs).await;
    let (t1, cpu1) = (Instant::now(), proxy.cpu_seconds());
    measuring.store(false, Ordering::Relaxed);
    let errors_seen = errors.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    // Held Pings end now, so every device sees the stop.
    let _ = upstream::control(up, "release").await;
    let mut lat = Vec::new();
    for mut t in tasks {
        // A Ping sent just as the stop came is released by the next call.
        loop {
            match tokio::time::timeout(Duration::from_millis(500), &mut t).await {
                Ok(Ok(l)) => lat.extend(l),
                Ok(Err(_)) => {}
                Err(_) => {
                    let _ = upstream::control(up, "release").await;
                    continue;
                }
            }
            break;
        }
    }
    lat.sort_unstable();
    let secs = (t1 - t0).as_secs_f64();
    let core_share = (cpu1 - cpu0) / secs;
    let real_devices = n as f64 * c;
    Budget {
        devices: n,
        rps: requests.load(Ordering::Relaxed) as f64 / secs,
        syncs: lat.len(),
        core_share,
        sync_p99: percentile(&lat, 0.99),
        errors: errors_seen,
        per_core: 0.8 * real_devices / core_share.max(1e-9),
    }
}

/// p50, p99 (µs) at the fixed rate over 32 keep-alive connections.
async fn latency(addr: SocketAddr, fleet: &Fleet, opts: &Opts) -> io::Result<(f64, f64, u64)> {
    let mut conns = Vec::new();
    for device in fleet.iter().skip(1).take(32) {
        conns.push((
            connect_tls(addr, &device.config).await?,
            device.sync.clone(),
        ));
    }
    let (_, _, conns) = paced(conns, opts.latency_rate, 0.5).await;
    let (mut lat, errors, _) = paced(conns, opts.latency_rate, opts.latency_secs).await;
    lat.sort_unstable();
    Ok((percentile(&lat, 0.5), percentile(&lat, 0.99), errors))
}

/// Each device in `range` resumes its own TLS session over and over (one request per
/// connection). Returns (handshakes per second, fraction resumed, errors, proxy CPU µs per
/// handshake).
async fn resumed(
    proxy: &Proxy,
    fleet: &Fleet,
    range: Range<usize>,
    secs: f64,
) -> (f64, f64, u64, f64) {
    let addr = proxy.addr;
    let ok = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start_at = tokio::time::Instant::now() + Duration::from_millis(300);
    let end_at = start_at + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for i in range {
        let device = &fleet[i];
        let roots = ROOTS.get().expect("fleet roots").clone();
        let config = device_config(&roots, &device.cert_der, &device.key, true);
        let request = device.sync.clone();
        let (ok, resumed, errors) = (ok.clone(), resumed.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            // Prime: one full handshake, whose tickets the client keeps.
            if let Ok(mut c) = connect_tls(addr, &config).await {
                let _ = c.request(&request).await;
            }
            tokio::time::sleep_until(start_at).await;
            while tokio::time::Instant::now() < end_at {
                let result = match connect_tls(addr, &config).await {
                    Ok(mut c) => {
                        let kind = c.stream.get_ref().1.handshake_kind();
                        c.request(&request)
                            .await
                            .map(|r| (r.status, kind == Some(rustls::HandshakeKind::Resumed)))
                    }
                    Err(e) => Err(e),
                };
                match result {
                    Ok((200, was_resumed)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if was_resumed {
                            resumed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep_until(start_at).await;
    let cpu0 = proxy.cpu_seconds();
    let n0 = ok.load(Ordering::Relaxed);
    tokio::time::sleep_until(end_at).await;
    let cpu = proxy.cpu_seconds() - cpu0;
    let n_window = (ok.load(Ordering::Relaxed) - n0) as f64;
    for t in tasks {
        let _ = t.await;
    }
    let n = ok.load(Ordering::Relaxed) as f64;
    (
        n / secs,
        resumed.load(Ordering::Relaxed) as f64 / n.max(1.0),
        errors.load(Ordering::Relaxed),
        cpu * 1e6 / n_window.max(1.0),
    )
}

/// The fleet CA as the devices' only root (for configurations made after setup).
static ROOTS: std::sync::OnceLock<Arc<rustls::RootCertStore>> = std::sync::OnceLock::new();

#[derive(Clone, Copy, Default)]
struct Ctl {
    /// Devices with an index below this hold a Ping.
    hold_upto: usize,
    /// Every device drops its connection and stops.
    quit: bool,
}

#[derive(Default)]
struct FleetCounters {
    connected: AtomicUsize,
    connect_errors: AtomicU64,
    status_503: AtomicU64,
    other_status: AtomicU64,
}

#[derive(Default)]
struct LongPolls {
    idle: Vec<(usize, u64)>,
    held: Vec<(usize, u64)>,
    held_reached: u64,
    storm_secs: Option<f64>,
    storm_reached: u64,
    storm_503: u64,
    connect_errors: u64,
    searches: Option<f64>,
    /// seg restarted with its identity-cache snapshot.
    warm: Option<Storm>,
    abort_ms: Option<f64>,
    abort_of: u64,
    still_open: u64,
}

async fn wait_quit(ctl: &mut watch::Receiver<Ctl>) {
    loop {
        if ctl.borrow_and_update().quit {
            return;
        }
        if ctl.changed().await.is_err() {
            return;
        }
    }
}

/// One device of the long-poll fleet: connects (one Sync), idles, holds a Ping when told,
/// and reconnects and re-issues its Ping whenever its connection breaks.
async fn device_task(
    i: usize,
    addr: SocketAddr,
    fleet: Fleet,
    mut ctl: watch::Receiver<Ctl>,
    counters: Arc<FleetCounters>,
    ramp: Arc<Semaphore>,
) {
    let device = &fleet[i];
    let mut registered = false;
    let backoff = Duration::from_millis(20 + (i as u64 * 7919) % 50);
    loop {
        let permit = if registered {
            None
        } else {
            Some(ramp.clone().acquire_owned().await.expect("semaphore"))
        };
        let connected = tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(30), connect_tls(addr, &device.config)) => r,
            _ = wait_quit(&mut ctl) => return,
        };
        let mut conn = match connected {
            Ok(Ok(c)) => c,
            _ => {
                counters.connect_errors.fetch_add(1, Ordering::Relaxed);
                drop(permit);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    _ = wait_quit(&mut ctl) => return,
                }
            }
        };
        if !registered {
            match conn.request(&device.sync).await {
                Ok(r) if r.status == 200 => {}
                _ => {
                    counters.other_status.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            }
            registered = true;
            counters.connected.fetch_add(1, Ordering::Relaxed);
        }
        drop(permit);
        'conn: loop {
            loop {
                let c = *ctl.borrow_and_update();
                if c.quit {
                    return;
                }
                if i < c.hold_upto {
                    break;
                }
                if ctl.changed().await.is_err() {
                    return;
                }
            }
            if conn.send(&device.ping).await.is_err() {
                break 'conn;
            }
            let answer = tokio::select! {
                r = conn.read_response() => r,
                _ = wait_quit(&mut ctl) => return,
            };
            match answer {
                Ok(r) if r.status == 200 => {}
                Ok(r) => {
                    let counter = if r.status == 503 {
                        &counters.status_503
                    } else {
                        &counters.other_status
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    let wait = r
                        .retry_after
                        .map_or(Duration::from_secs(1), |s| Duration::from_secs(s.min(30)));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = wait_quit(&mut ctl) => return,
                    }
                }
                Err(_) => break 'conn,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = wait_quit(&mut ctl) => return,
        }
    }
}

/// Polls `probe` every `every` until it returns true or `limit` passes.
async fn wait_for<F, Fut>(limit: Duration, every: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if probe().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

async fn up_stats(up: SocketAddr) -> upstream::Stats {
    upstream::control(up, "stats").await.unwrap_or_default()
}

/// Held long polls at each level (memory), then, when `all`, the reconnect storm after a
/// restart and what happens upstream when every device leaves during its held Ping.
async fn long_polls(
    proxy: &mut Proxy,
    fleet: &Fleet,
    levels: &[usize],
    up: SocketAddr,
    all: bool,
) -> LongPolls {
    let mut out = LongPolls::default();
    let (tx, rx) = watch::channel(Ctl::default());
    let counters = Arc::new(FleetCounters::default());
    let ramp = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    let addr = proxy.addr;
    // Idle connections (each did one Sync).
    for &level in levels {
        while tasks.len() < level {
            tasks.push(tokio::spawn(device_task(
                tasks.len(),
                addr,
                fleet.clone(),
                rx.clone(),
                counters.clone(),
                ramp.clone(),
            )));
        }
        let c = counters.clone();
        let limit = Duration::from_secs(30 + level as u64 / 100);
        if !wait_for(limit, Duration::from_millis(20), || {
            let c = c.clone();
            async move { c.connected.load(Ordering::Relaxed) >= level }
        })
        .await
        {
            eprintln!(
                "  {}: only {} of {level} devices connected",
                proxy.kind.name(),
                counters.connected.load(Ordering::Relaxed)
            );
            break;
        }
        sleep(0.5).await;
        out.idle.push((level, proxy.rss_kib()));
    }
    // Held Pings.
    for &level in levels {
        tx.send_modify(|c| c.hold_upto = level);
        let reached = wait_for(
            Duration::from_secs(60),
            Duration::from_millis(50),
            || async { up_stats(up).await.held >= level as u64 },
        )
        .await;
        out.held_reached = up_stats(up).await.held;
        if !reached {
            eprintln!(
                "  {}: only {} of {level} Pings held upstream",
                proxy.kind.name(),
                out.held_reached
            );
            break;
        }
        sleep(0.5).await;
        out.held.push((level, proxy.rss_kib()));
    }
    if !all {
        tx.send_modify(|c| c.quit = true);
        let _ = upstream::control(up, "release").await;
        for t in tasks {
            let _ = t.await;
        }
        return out;
    }
    // Reconnect storm: restart the proxy under the held fleet, cold (seg without its
    // identity-cache snapshot), then for seg warm (with it).
    let holding = out.held_reached;
    let cold = storm(proxy, up, holding, false).await;
    out.storm_secs = cold.secs;
    out.storm_reached = cold.reached;
    out.searches = cold.searches;
    out.storm_503 = counters.status_503.load(Ordering::Relaxed);
    out.connect_errors = counters.connect_errors.load(Ordering::Relaxed);
    if proxy.kind == Kind::Seg {
        let _ = wait_for(
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async { up_stats(up).await.held >= holding },
        )
        .await;
        out.warm = Some(storm(proxy, up, holding, true).await);
    }
    // Every device leaves during its held Ping.
    let _ = wait_for(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { up_stats(up).await.held >= holding },
    )
    .await;
    out.abort_of = up_stats(up).await.held;
    tx.send_modify(|c| c.quit = true);
    let t1 = Instant::now();
    let gone = wait_for(Duration::from_secs(3), Duration::from_millis(5), || async {
        up_stats(up).await.held == 0
    })
    .await;
    if gone {
        out.abort_ms = Some(t1.elapsed().as_secs_f64() * 1000.0);
    }
    out.still_open = up_stats(up).await.held;
    let _ = upstream::control(up, "release").await;
    for t in tasks {
        let _ = t.await;
    }
    out
}

/// One reconnect storm: how long until every device holding a Ping is served again after a
/// restart, and the directory searches seg made meanwhile.
#[derive(Clone, Copy)]
struct Storm {
    secs: Option<f64>,
    reached: u64,
    searches: Option<f64>,
}

async fn storm(proxy: &mut Proxy, up: SocketAddr, holding: u64, warm: bool) -> Storm {
    let _ = upstream::control(up, "reset").await;
    proxy.stop();
    if let Some(snapshot) = proxy.snapshot_file() {
        if !warm {
            let _ = std::fs::remove_file(snapshot);
        } else if !snapshot.exists() {
            eprintln!("  seg: no identity-cache snapshot was written at stop");
        }
    }
    let t0 = Instant::now();
    proxy.spawn();
    let served = wait_for(
        Duration::from_secs(180),
        Duration::from_millis(20),
        || async { up_stats(up).await.distinct >= holding },
    )
    .await;
    let secs = served.then(|| t0.elapsed().as_secs_f64());
    let searches = match proxy.admin {
        Some(admin) => scrape(admin, "seg_directory_searches_total").await,
        None => None,
    };
    Storm {
        secs,
        reached: up_stats(up).await.distinct,
        searches,
    }
}

/// The sum of every sample of a metric on seg's admin listener.
async fn scrape(admin: SocketAddr, metric: &str) -> Option<f64> {
    let mut conn = connect_plain(admin).await.ok()?;
    conn.keep_bodies = true;
    let response = conn
        .request(b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n")
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&response.body);
    let sum = text
        .lines()
        .filter(|l| l.starts_with(metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b);
    Some(sum)
}
