//! Operating seg: the PROXY protocol from the front hop, and graceful drain. Real TLS, real
//! slapd, the recording echo upstream; the front is a sender on loopback.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use seg::demo::pki::LeafSpec;
use support::lab::{eas_target, metric_value, Lab, Pki, TlsVersion, CA_AD_NAME};
use support::slapd::UserSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn accounts() -> Vec<UserSpec> {
    let mut alice = UserSpec::new("alice");
    alice.upn = Some("alice@corp.test".into());
    alice.alt_security_identities = vec![format!("X509:<I>{CA_AD_NAME}<SR>0403020a")];
    vec![alice]
}

fn alice(pki: &Pki) -> support::lab::Device {
    pki.device(LeafSpec::device("alice").serial(&[0x0a, 0x02, 0x03, 0x04]))
}

/// One request over TLS on a TCP stream that first carries `preamble` (a PROXY header).
async fn request_after(
    addr: std::net::SocketAddr,
    preamble: &[u8],
    ca: &std::path::Path,
    device: &support::lab::Device,
) -> std::io::Result<u16> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(preamble).await?;
    let connector = support::lab::Client::new(addr, ca).connector_for(device);
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    tls.write_all(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            eas_target("Sync", "alice")
        )
        .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no response: {text}")))
}

#[tokio::test]
async fn the_front_hop_says_who_the_device_is() {
    let lab = Lab::start(accounts(), "").await;
    // The lab's default: no PROXY protocol; a header from loopback is refused by TLS.
    let device = alice(&lab.pki);
    let header = b"PROXY TCP4 203.0.113.7 192.0.2.1 50000 443\r\n";
    assert!(
        request_after(lab.seg.listen_addr, header, &lab.pki.ca_path, &device)
            .await
            .is_err()
    );
    drop(lab);

    let pki = Pki::new();
    let device = alice(&pki);
    let lab = Lab::start_with(pki, accounts(), "")
        .await
        .reconfigure(|text| {
            text.replace(
                "handshake_timeout = \"5s\"",
                "handshake_timeout = \"5s\"\nproxy_protocol_from = [\"127.0.0.0/8\"]",
            )
        })
        .await;
    let addr = lab.seg.listen_addr;
    let ca = lab.pki.ca_path.clone();
    assert_eq!(
        request_after(addr, header, &ca, &device).await.unwrap(),
        200
    );
    let mut v2 = vec![
        0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x11, 0, 12,
    ];
    v2.extend([198, 51, 100, 9, 192, 0, 2, 1, 0xC3, 0x50, 0x01, 0xBB]);
    assert_eq!(request_after(addr, &v2, &ca, &device).await.unwrap(), 200);
    let seen = lab.upstream.requests();
    assert_eq!(seen[0].header_values("x-forwarded-for"), ["203.0.113.7"]);
    assert_eq!(seen[1].header_values("x-forwarded-for"), ["198.51.100.9"]);
    // From a front network, a connection without a header is refused.
    assert!(request_after(addr, b"", &ca, &device).await.is_err());
    assert!(
        request_after(addr, b"PROXY TCP4 nonsense\r\n", &ca, &device)
            .await
            .is_err()
    );
    assert_eq!(
        lab.metric("seg_tls_handshakes_total{result=\"proxy_header_invalid\"}"),
        2.0
    );
    assert_eq!(lab.upstream.requests().len(), 2);
}

#[tokio::test]
async fn a_drain_lets_requests_finish_and_spreads_long_poll_closes() {
    let upstream = seg::demo::echo::EchoUpstream::start_holding(
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let lab = Lab::start_with_upstream(Pki::new(), accounts(), "", upstream).await;
    let device = alice(&lab.pki);
    let client = lab.client();
    // Six devices' Pings held (one account, six DeviceIds), and one slow Sync in flight.
    let mut held = Vec::new();
    for n in 0..6 {
        let mut conn = client
            .connect(Some(&device), TlsVersion::Any)
            .await
            .unwrap();
        let ping = format!(
            "/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=PHONE{n}&DeviceType=iPhone"
        );
        conn.send_raw(
            format!("POST {ping} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        held.push(conn);
    }
    for _ in 0..100 {
        if lab.upstream.active_holds() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lab.upstream.active_holds(), 6);
    let mut slow = client
        .connect(Some(&device), TlsVersion::Any)
        .await
        .unwrap();
    slow.send_raw(
        format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nx-echo-delay-ms: 800\r\nContent-Length: 0\r\n\r\n",
            eas_target("Sync", "alice")
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A keep-alive connection idle when the drain begins, and one that stays idle (from
    // another certificate of alice's: the first has its connection cap's worth open).
    let tablet = alice(&lab.pki);
    let mut idle = client
        .connect(Some(&tablet), TlsVersion::Any)
        .await
        .unwrap();
    let r = idle
        .request("POST", &eas_target("Sync", "alice"), &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let mut silent = client
        .connect(Some(&tablet), TlsVersion::Any)
        .await
        .unwrap();
    let r = silent
        .request("POST", &eas_target("Sync", "alice"), &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    let metrics = Arc::clone(&lab.seg.metrics);
    let Lab {
        seg,
        pki,
        upstream,
        slapd,
        ..
    } = lab;
    let listen = seg.listen_addr;
    let admin = seg.admin_addr;
    let window = Duration::from_secs(2);
    let started = Instant::now();
    let draining = tokio::spawn(seg.drain(window));

    // Readiness fails at once; the listener takes no new device.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = support::lab::http_get(admin, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("draining"),
        "{ready}"
    );
    let new_client = support::lab::Client::new(listen, &pki.ca_path);
    assert!(
        new_client
            .post(Some(&device), &eas_target("Sync", "alice"), &[])
            .await
            .is_err(),
        "accepted during drain"
    );
    // The short request in flight finishes, told to close.
    let r = slow.read_response().await.unwrap();
    assert_eq!(r.status, 200, "a short request was cut by the drain");
    assert_eq!(r.header("connection"), Some("close"));
    // The idle connection's next request is served, not met with a bare close, and told
    // to close: the device reconnects elsewhere after a completed exchange.
    let r = idle
        .request("POST", &eas_target("Sync", "alice"), &[], b"")
        .await
        .expect("a request on an idle connection during the drain");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    // The held Pings are answered 503 + Retry-After + close one by one over the window,
    // none after it: never a bare close.
    let watchers: Vec<_> = held
        .into_iter()
        .map(|mut conn| {
            tokio::spawn(async move {
                let result =
                    tokio::time::timeout(window + Duration::from_secs(3), conn.read_response())
                        .await
                        .expect("a held Ping outlived the drain")
                        .expect("a held Ping was closed without an answer");
                assert_eq!(result.status, 503);
                assert_eq!(result.header("retry-after"), Some("1"));
                assert_eq!(result.header("connection"), Some("close"));
                started.elapsed()
            })
        })
        .collect();
    let mut closed_at = Vec::new();
    for watcher in watchers {
        closed_at.push(watcher.await.unwrap());
    }
    let first = closed_at.iter().min().unwrap();
    let last = closed_at.iter().max().unwrap();
    assert!(
        *last <= window + Duration::from_millis(500),
        "closes: {closed_at:?}"
    );
    assert!(
        *last - *first >= Duration::from_millis(300),
        "all long polls closed together: {closed_at:?}"
    );
    tokio::time::timeout(Duration::from_secs(10), draining)
        .await
        .unwrap()
        .unwrap();
    // Closing them aborted the upstream requests too.
    assert_eq!(upstream.aborted_holds(), 6);
    assert_eq!(
        metric_value(&metrics.render(), "seg_drained_connections_total"),
        6.0
    );
    assert_eq!(
        metric_value(
            &metrics.render(),
            "seg_requests_total{command=\"Ping\",status_class=\"5xx\"}"
        ),
        6.0
    );
    // The connection idle through the whole window was closed at its end.
    let mut byte = [0u8; 1];
    assert!(matches!(silent.read_some(&mut byte).await, Ok(0) | Err(_)));
    drop(slapd);
}

/// Replicas sharing a session-ticket key file: a device resumes on the other replica; a
/// replica with a different trust policy never resumes those sessions.
#[tokio::test]
async fn replicas_share_session_tickets_within_one_trust_policy() {
    let lab = Lab::start(accounts(), "").await;
    let keys = lab
        .pki
        .dir
        .write("ticket-keys", &format!("{}\n", "s".repeat(48)));
    let with_keys = |text: &str, ca: &std::path::Path| {
        text.replace(
            &format!("client_ca = \"{}\"", lab.pki.ca_path.display()),
            &format!(
                "client_ca = \"{}\"\nsession_ticket_key_file = \"{}\"",
                ca.display(),
                keys.display()
            ),
        )
    };
    let text = std::fs::read_to_string(&lab.config_path).unwrap();
    // Replica B trusts the same CA; replica C also trusts another one (a different policy).
    let b_path = lab
        .pki
        .dir
        .write("replica-b.toml", &with_keys(&text, &lab.pki.ca_path));
    let other = seg::demo::pki::CertAuthority::new("Other", "Other CA").unwrap();
    let bundle = lab.pki.dir.write(
        "bundle.pem",
        &(std::fs::read_to_string(&lab.pki.ca_path).unwrap() + &other.cert_pem()),
    );
    let c_path = lab
        .pki
        .dir
        .write("replica-c.toml", &with_keys(&text, &bundle));
    let a_path = lab
        .pki
        .dir
        .write("replica-a.toml", &with_keys(&text, &lab.pki.ca_path));
    let a = support::lab::start_seg(&a_path).await;
    let b = support::lab::start_seg(&b_path).await;
    let c = support::lab::start_seg(&c_path).await;

    let device = alice(&lab.pki);
    let resuming = support::lab::ResumingClient::new(a.listen_addr, &lab.pki.ca_path, &device);
    let target = eas_target("Sync", "alice");
    assert_eq!(resuming.post(&target).await.unwrap().status, 200);
    assert_eq!(
        resuming
            .post_to(b.listen_addr, &target)
            .await
            .unwrap()
            .status,
        200
    );
    let resumed = |running: &seg::Running| {
        support::lab::metric_value(
            &running.metrics.render(),
            "seg_tls_handshakes_total{result=\"resumed\"}",
        )
    };
    assert_eq!(resumed(&b), 1.0, "replica B did not resume A's session");
    assert_eq!(
        resuming
            .post_to(c.listen_addr, &target)
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        resumed(&c),
        0.0,
        "a replica with another trust policy resumed the session"
    );
    for running in [a, b, c] {
        running.stop().await;
    }
}

/// The identity cache survives a restart through `cache.snapshot_file`: restored devices are
/// served without a directory search (even while the directory is down), re-validated in the
/// background after the soft TTL, and a snapshot entry older than the hard TTL is not used.
#[tokio::test]
async fn a_restart_keeps_the_identity_cache_through_its_snapshot() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let alice = alice(&pki);
    let mut bob = UserSpec::new("bob");
    bob.upn = Some("bob@corp.test".into());
    bob.alt_security_identities = vec![format!("X509:<I>{CA_AD_NAME}<SR>0403020b")];
    let bob_device = pki.device(LeafSpec::device("bob").serial(&[0x0b, 0x02, 0x03, 0x04]));
    let snapshot = pki.dir.path().join("identity-cache.json");
    let extra = format!(
        "[cache]\nsoft_ttl = \"2s\"\nsnapshot_file = \"{}\"\n",
        snapshot.display()
    );
    let mut users = accounts();
    users.push(bob);
    let lab = Lab::start_with(pki, users, &extra).await;
    let searches = r#"seg_directory_searches_total{result="ok"}"#;
    let sync = eas_target("Sync", "alice");
    let status = |r: std::io::Result<support::lab::HttpResponse>| r.expect("response").status;

    assert_eq!(
        status(lab.client().post(Some(&alice), &sync, &[]).await),
        200
    );
    assert_eq!(lab.metric(searches), 1.0);
    assert!(
        !snapshot.exists(),
        "written at shutdown and every snapshot_interval (1m), not before"
    );

    // Restart: alice is served from the restored cache, no search.
    let lab = lab.reconfigure(|text| text.to_string()).await;
    let mode = std::fs::metadata(&snapshot)
        .expect("snapshot written")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the snapshot names accounts: owner only"
    );
    assert_eq!(
        status(lab.client().post(Some(&alice), &sync, &[]).await),
        200
    );
    assert_eq!(lab.metric(searches), 0.0, "served from the snapshot");
    // Past the soft TTL her next request is served and re-validated in the background.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        status(lab.client().post(Some(&alice), &sync, &[]).await),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while lab.metric(searches) < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lab.metric(searches), 1.0, "one background re-validation");

    // Restart while the directory is down: alice still served, bob (never seen) is not.
    let mut lab = lab.reconfigure(|text| text.to_string()).await;
    lab.slapd.stop();
    let lab = lab.reconfigure(|text| text.to_string()).await;
    assert_eq!(
        status(lab.client().post(Some(&alice), &sync, &[]).await),
        200
    );
    let bob_sync = eas_target("Sync", "bob");
    let refused = lab
        .client()
        .post(Some(&bob_device), &bob_sync, &[])
        .await
        .expect("response");
    assert_eq!(refused.status, 503);

    // A snapshot entry older than the hard TTL (1 h) is dropped: alice needs the directory.
    let text = std::fs::read_to_string(&snapshot).expect("snapshot");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("snapshot JSON");
    for entry in json["entries"].as_array_mut().expect("entries") {
        let resolved = entry["resolved_unix"].as_i64().expect("resolved_unix");
        entry["resolved_unix"] = (resolved - 3601).into();
    }
    // Written while seg stops, then restored by the next start: edit between the two.
    let lab = lab
        .restart_after(|| std::fs::write(&snapshot, json.to_string()).expect("aged snapshot"))
        .await;
    assert_eq!(
        status(lab.client().post(Some(&alice), &sync, &[]).await),
        503
    );
}

/// The snapshot is also written while seg runs (`cache.snapshot_interval`): a replica that
/// never stopped cleanly (`kill -9`, a crashed node) leaves one, and its successor starts
/// warm from it.
#[tokio::test]
async fn the_snapshot_is_written_while_seg_runs() {
    let pki = Pki::new();
    let alice = alice(&pki);
    let snapshot = pki.dir.path().join("identity-cache.json");
    let extra = format!(
        "[cache]\nsnapshot_file = \"{}\"\nsnapshot_interval = \"200ms\"\n",
        snapshot.display()
    );
    let lab = Lab::start_with(pki, accounts(), &extra).await;
    let sync = eas_target("Sync", "alice");
    let r = lab.client().post(Some(&alice), &sync, &[]).await.unwrap();
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&snapshot).is_ok_and(|t| t.contains("alice")) {
        assert!(Instant::now() < deadline, "no snapshot while running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second process started from it, the first never stopped: alice without a search.
    let successor = support::lab::start_seg(&lab.config_path).await;
    let client = support::lab::Client::new(successor.listen_addr, &lab.pki.ca_path);
    let r = client.post(Some(&alice), &sync, &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        metric_value(
            &successor.metrics.render(),
            "seg_directory_searches_total{result=\"ok\"}"
        ),
        0.0,
        "the successor searched instead of reading the snapshot"
    );
    successor.stop().await;
}
