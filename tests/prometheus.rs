//! A real Prometheus server scrapes seg while devices use it.
//!
//! The lab (test PKI, slapd over LDAPS, a recording upstream that holds Pings) runs seg in
//! process; `/usr/bin/prometheus` (Debian package `prometheus`) runs on loopback with its own
//! configuration and data folder, scrapes seg's admin listener every second and loads the
//! alerting rules of `deploy/prometheus/seg-alerts.yml`. The test then asks Prometheus's HTTP
//! API, not seg, for the request, handshake, cache, directory and long-poll series and checks
//! that they count exactly the traffic it sent; that every query of the Grafana dashboard
//! runs; that the rules load and evaluate; and that stopping the directory turns
//! `SegDirectoryUnreachable` pending.

mod support;

use seg::activesync::percent_encode;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use seg::demo::echo::EchoUpstream;
use seg::demo::pki::LeafSpec;
use support::lab::{assert_refused, eas_target, Lab, Pki, TempDir, TlsVersion};
use support::slapd::UserSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How to get the server this test needs.
const INSTALL: &str = "Install it with\n  apt-get install -y --no-install-recommends prometheus\n\
     (tests/run.sh does), or point SEG_PROMETHEUS at a prometheus binary";

/// Where Prometheus is looked for: `SEG_PROMETHEUS`, else the Debian package's path, else PATH.
fn prometheus_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SEG_PROMETHEUS") {
        return PathBuf::from(path);
    }
    let debian = PathBuf::from("/usr/bin/prometheus");
    if debian.exists() {
        return debian;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("prometheus"))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| panic!("no Prometheus server: this test runs the real one. {INSTALL}"))
}

/// A Prometheus server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second as job `seg`, with seg's alerting rules.
    fn start(target: SocketAddr) -> Prometheus {
        let binary = prometheus_binary();
        let dir = TempDir::new("prometheus");
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/seg-alerts.yml");
        let config = dir.write(
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: seg\n    static_configs:\n      - targets: ['{target}']\n",
                rules = rules.display(),
            ),
        );
        // A free loopback port for Prometheus's own listener.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}. This test runs a real Prometheus server: {INSTALL}",
                    binary.display()
                )
            });
        Prometheus { child, addr, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path_and_query` from Prometheus's HTTP API: status and body.
    async fn get(&self, path_and_query: &str) -> std::io::Result<(u16, String)> {
        let mut tcp = TcpStream::connect(self.addr).await?;
        // HTTP/1.0: the body ends with the connection, never chunked.
        tcp.write_all(
            format!("GET {path_and_query} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_string()))
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            if let Ok((200, _)) = self.get("/-/ready").await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 60 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An instant query: the result vector (`data.result`).
    async fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let (status, body) = self
            .get(&format!("/api/v1/query?query={}", percent_encode(promql)))
            .await
            .map_err(|e| format!("{promql}: {e}"))?;
        let json: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("{promql}: HTTP {status}: {e}: {body}"))?;
        if json["status"] != "success" {
            return Err(format!("{promql}: HTTP {status}: {body}"));
        }
        Ok(json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The value of a query that returns one sample (None when it returns none).
    async fn scalar(&self, promql: &str) -> Result<Option<f64>, String> {
        let result = self.query(promql).await?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => Ok(one["value"][1].as_str().and_then(|v| v.parse().ok())),
            many => Err(format!(
                "{promql}: {} samples, expected one: {many:?}",
                many.len()
            )),
        }
    }

    /// Waits (30 s at most) until `promql` returns exactly `want`.
    async fn wait_for(&self, promql: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.scalar(promql).await;
            if matches!(got, Ok(Some(v)) if v == want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus never answered {want} to {promql}; last answer: {got:?}\nprometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every query of the Grafana dashboard, with its variables set for this lab.
fn dashboard_queries() -> Vec<(String, String)> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/grafana/seg-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("json");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "1m")
                .replace("$job", "seg")
                .replace("$instance", ".+");
            queries.push((panel["title"].as_str().unwrap_or("").to_string(), expr));
        }
    }
    queries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_traffic_seg_serves() {
    let mut dave = UserSpec::with_upn("dave");
    dave.user_account_control = 514; // disabled
    let upstream = EchoUpstream::start_holding(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        Duration::from_secs(120),
    )
    .await
    .expect("echo upstream");
    let mut lab = Lab::start_with_upstream(
        Pki::new(),
        vec![UserSpec::with_upn("alice"), dave],
        "",
        upstream,
    )
    .await;
    let mut prometheus = Prometheus::start(lab.seg.admin_addr);
    prometheus.wait_ready().await;
    // Traffic starts only once Prometheus has a first sample: every counter then rises
    // between two scrapes and the rate() of the dashboard has something to show.
    prometheus.wait_for("up{job=\"seg\"}", 1.0).await;
    prometheus
        .wait_for("seg_dependency_up{dependency=\"directory\"}", 1.0)
        .await;
    prometheus
        .wait_for("seg_dependency_up{dependency=\"upstream\"}", 1.0)
        .await;

    let client = lab.client();
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    let dave = lab
        .pki
        .device(LeafSpec::device("dave").upn("dave@corp.test"));
    // alice: one connection (one full handshake), four commands: one cache miss, three hits.
    let mut conn = client
        .connect(Some(&alice), TlsVersion::Any)
        .await
        .expect("alice connects");
    for cmd in ["Sync", "Sync", "Sync", "FolderSync"] {
        let response = conn
            .request("POST", &eas_target(cmd, "alice"), &[], b"x")
            .await
            .expect("alice's request");
        assert_eq!(response.status, 200, "alice {cmd}: {}", response.text());
    }
    drop(conn);
    // dave: disabled in AD: 403, one more miss and directory search.
    let response = client
        .post(Some(&dave), &eas_target("Sync", "dave"), &[])
        .await
        .expect("dave's request");
    assert_eq!(response.status, 403);
    // No client certificate: the handshake is refused.
    assert_refused(
        client.post(None, &eas_target("Sync", "alice"), &[]).await,
        "no client certificate",
    );
    // Two Pings held by the upstream, each on its own connection: two more full handshakes
    // and cache hits, two long polls in flight.
    let mut pings = Vec::new();
    for _ in 0..2 {
        let mut conn = client
            .connect(Some(&alice), TlsVersion::Any)
            .await
            .expect("alice connects");
        pings.push(tokio::spawn(async move {
            conn.request("POST", &eas_target("Ping", "alice"), &[], b"x")
                .await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.upstream.active_holds() < 2 {
        assert!(
            Instant::now() < deadline,
            "the upstream never held two Pings"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // What Prometheus stored, series by series.
    let expected = [
        (
            "seg_requests_total{command=\"Sync\",status_class=\"2xx\"}",
            3.0,
        ),
        (
            "seg_requests_total{command=\"FolderSync\",status_class=\"2xx\"}",
            1.0,
        ),
        (
            "seg_requests_total{command=\"Sync\",status_class=\"4xx\"}",
            1.0,
        ),
        ("seg_request_duration_seconds_count{kind=\"short\"}", 5.0),
        ("seg_tls_handshakes_total{result=\"full\"}", 4.0),
        (
            "seg_tls_handshakes_total{result=\"no_client_certificate\"}",
            1.0,
        ),
        ("seg_identity_cache_lookups_total{result=\"miss\"}", 2.0),
        ("seg_identity_cache_lookups_total{result=\"hit\"}", 5.0),
        (
            "seg_identity_decisions_total{decision=\"admit\",reason=\"mapped\"}",
            1.0,
        ),
        (
            "seg_identity_decisions_total{decision=\"deny\",reason=\"account-disabled\"}",
            1.0,
        ),
        ("seg_directory_searches_total{result=\"ok\"}", 2.0),
        (
            "seg_directory_search_duration_seconds_count{result=\"ok\"}",
            2.0,
        ),
        ("seg_long_polls_in_flight", 2.0),
        ("count(seg_build_info{job=\"seg\"})", 1.0),
    ];
    for (promql, want) in expected {
        prometheus.wait_for(promql, want).await;
    }
    // A second wave, now that every series exists in Prometheus: a series is born with the
    // value of its first scrape, so rate() sees only the increments after it. One more Sync
    // for alice and a device the directory does not know (one more search, a 403).
    let response = client
        .post(Some(&alice), &eas_target("Sync", "alice"), &[])
        .await
        .expect("alice's request");
    assert_eq!(response.status, 200);
    let stranger = lab
        .pki
        .device(LeafSpec::device("nobody").upn("nobody@corp.test"));
    let response = client
        .post(Some(&stranger), &eas_target("Sync", "nobody"), &[])
        .await
        .expect("the stranger's request");
    assert_eq!(response.status, 403);
    prometheus
        .wait_for(
            "seg_requests_total{command=\"Sync\",status_class=\"2xx\"}",
            4.0,
        )
        .await;
    prometheus
        .wait_for("seg_directory_searches_total{result=\"ok\"}", 3.0)
        .await;
    prometheus
        .wait_for(
            "seg_identity_decisions_total{decision=\"deny\",reason=\"no-mapping\"}",
            1.0,
        )
        .await;
    // The histograms work in PromQL: latencies are real durations, not NaN or zero.
    for promql in [
        "histogram_quantile(0.99, sum by (le) (rate(seg_request_duration_seconds_bucket{kind=\"short\"}[1m])))",
        "histogram_quantile(0.5, sum by (le) (rate(seg_directory_search_duration_seconds_bucket{result=\"ok\"}[1m])))",
    ] {
        let value = prometheus.scalar(promql).await.expect("query").expect(promql);
        assert!(value > 0.0 && value < 10.0, "{promql} = {value}");
    }
    // The process collector's series sit beside seg's own.
    let rss = prometheus
        .scalar("process_resident_memory_bytes{job=\"seg\"}")
        .await
        .expect("query");
    assert!(
        matches!(rss, Some(v) if v > 0.0),
        "process_resident_memory_bytes: {rss:?}"
    );

    // Every query of the Grafana dashboard runs on a real Prometheus; the main panels have data.
    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries() {
        let result = prometheus
            .query(&expr)
            .await
            .unwrap_or_else(|e| panic!("dashboard panel {title:?}: {e}"));
        if result.is_empty() {
            empty.push(title);
        }
    }
    for panel in [
        "Requests by command",
        "Requests by status class",
        "Latency of short requests",
        "TLS handshakes by result",
        "Identity cache hit ratio",
        "Directory search latency",
        "Long polls in flight",
    ] {
        assert!(
            !empty.iter().any(|t| t == panel),
            "dashboard panel {panel:?} shows no data"
        );
    }

    // The alerting rules loaded and evaluate without error against seg's series.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = prometheus.get("/api/v1/rules").await.expect("rules");
        let json: serde_json::Value = serde_json::from_str(&body).expect("rules json");
        let rules: Vec<&serde_json::Value> = json["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let healthy = rules.iter().filter(|r| r["health"] == "ok").count();
        assert!(
            rules.iter().all(|r| r["health"] != "err"),
            "a rule fails to evaluate: {body}"
        );
        if !rules.is_empty() && healthy == rules.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules never all evaluated: {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The devices holding Pings go away: the long polls end, recorded as abandoned (499).
    for ping in &pings {
        ping.abort();
    }
    prometheus.wait_for("seg_long_polls_in_flight", 0.0).await;
    prometheus
        .wait_for("sum(seg_requests_total{command=\"Ping\"})", 2.0)
        .await;
    prometheus
        .wait_for(
            "seg_request_duration_seconds_count{kind=\"long_poll\"}",
            2.0,
        )
        .await;

    // The directory stops: the probe notices, Prometheus stores it, the alert turns pending.
    lab.slapd.stop();
    prometheus
        .wait_for("seg_dependency_up{dependency=\"directory\"}", 0.0)
        .await;
    prometheus
        .wait_for(
            "ALERTS{alertname=\"SegDirectoryUnreachable\",alertstate=\"pending\"}",
            1.0,
        )
        .await;
}
