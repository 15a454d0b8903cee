//! ActiveSync through seg: the mailbox binding (`User=` must be the certificate's account),
//! both query forms, device rules, long-poll caps and cancellation, and passthrough of
//! ActiveSync statuses and headers. Real TLS, real slapd, the recording echo upstream.

mod support;

use std::time::Duration;

use base64::Engine as _;
use seg::demo::pki::LeafSpec;
use support::lab::{Lab, Pki, TlsVersion, CA_AD_NAME};
use support::slapd::UserSpec;

fn accounts() -> Vec<UserSpec> {
    let mut alice = UserSpec::new("alice");
    alice.upn = Some("alice@corp.test".into());
    alice.mail = Some("alice.example@corp.test".into());
    alice.proxy_addresses = vec![
        "SMTP:alice.example@corp.test".into(),
        "smtp:al@corp.test".into(),
    ];
    alice.alt_security_identities = vec![format!("X509:<I>{CA_AD_NAME}<SR>0403020a")];
    let mut bob = UserSpec::new("bob");
    bob.upn = Some("bob@corp.test".into());
    bob.alt_security_identities = vec![format!("X509:<I>{CA_AD_NAME}<SR>0403020b")];
    vec![alice, bob]
}

fn alice(pki: &Pki) -> support::lab::Device {
    pki.device(LeafSpec::device("alice").serial(&[0x0a, 0x02, 0x03, 0x04]))
}

const SETTINGS: &str = "[identity]\nnetbios_domain = \"CORP\"\n";

fn target(cmd: &str, user: &str, device_type: &str) -> String {
    format!(
        "/Microsoft-Server-ActiveSync?Cmd={cmd}&User={user}&DeviceId=DEV1&DeviceType={device_type}"
    )
}

#[tokio::test]
async fn the_mailbox_must_be_the_certificates_account() {
    let lab = Lab::start(accounts(), SETTINGS).await;
    let device = alice(&lab.pki);
    let mut conn = lab
        .client()
        .connect(Some(&device), TlsVersion::Any)
        .await
        .unwrap();
    for user in [
        "alice",
        "ALICE",
        "CORP%5Calice",
        "alice%40corp.test",
        "alice.example%40corp.test",
        "al%40corp.test",
    ] {
        let r = conn
            .request("POST", &target("Sync", user, "iPhone"), &[], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "User={user}");
    }
    let forwarded = lab.upstream.requests().len();
    for user in [
        "bob",
        "CORP%5Cbob",
        "bob%40corp.test",
        "OTHER%5Calice",
        "alice%40evil.test",
    ] {
        let r = conn
            .request("POST", &target("Sync", user, "iPhone"), &[], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 403, "User={user}");
    }
    assert_eq!(
        lab.upstream.requests().len(),
        forwarded,
        "the upstream saw another user's request"
    );
    assert_eq!(
        lab.metric("seg_policy_refusals_total{reason=\"user-mismatch\"}"),
        5.0
    );
}

#[tokio::test]
async fn the_base64_query_form() {
    let lab = Lab::start(accounts(), SETTINGS).await;
    let device = alice(&lab.pki);
    let client = lab.client();
    let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    // 14.1 FolderSync, DeviceId DEV1, no policy key, DeviceType iPhone; no User: alice's own.
    let mut base = vec![141u8, 9, 0x09, 0x04, 4, b'D', b'E', b'V', b'1', 0, 6];
    base.extend_from_slice(b"iPhone");
    let r = client
        .post(
            Some(&device),
            &format!("/Microsoft-Server-ActiveSync?{}", encode(&base)),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        lab.upstream.requests()[0].header_values("x-remote-user"),
        ["alice@corp.test"]
    );
    // The spec's own example (no User) passes too.
    let r = client
        .post(
            Some(&device),
            "/Microsoft-Server-ActiveSync?jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // User=bob in the tagged parameters is refused.
    let mut with_bob = base.clone();
    with_bob.extend([8, 3, b'b', b'o', b'b']);
    let r = client
        .post(
            Some(&device),
            &format!("/Microsoft-Server-ActiveSync?{}", encode(&with_bob)),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    // Truncated: 400, nothing forwarded.
    let r = client
        .post(
            Some(&device),
            &format!("/Microsoft-Server-ActiveSync?{}", encode(&base[..6])),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(lab.upstream.requests().len(), 2);
    assert_eq!(
        lab.metric("seg_policy_refusals_total{reason=\"query-truncated\"}"),
        1.0
    );
}

#[tokio::test]
async fn malformed_queries_get_400_and_reach_nobody() {
    let lab = Lab::start(accounts(), SETTINGS).await;
    let device = alice(&lab.pki);
    let mut conn = lab
        .client()
        .connect(Some(&device), TlsVersion::Any)
        .await
        .unwrap();
    for query in [
        "Cmd=Sync&User=alice&DeviceId=%zz&DeviceType=iPhone",
        "Cmd=Sync&User=alice&User=bob&DeviceId=D&DeviceType=iPhone",
        "Cmd=Sync&User=alice&user=bob&DeviceId=D&DeviceType=iPhone",
        "Cmd=Sync&User=alice&USER=bob&DeviceId=D&DeviceType=iPhone",
        "Cmd=Sync&User=alice&DeviceId=D%0d%0aX&DeviceType=iPhone",
        "User=alice&DeviceId=D&DeviceType=iPhone",
        "Cmd=Sync&User=alice",
    ] {
        let r = conn
            .request(
                "POST",
                &format!("/Microsoft-Server-ActiveSync?{query}"),
                &[],
                b"",
            )
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{query}");
    }
    assert!(lab.upstream.requests().is_empty());
}

#[tokio::test]
async fn device_rules_block_and_allow() {
    let lab = Lab::start(
        accounts(),
        "[activesync]\nblock_device_types = [\"EvilPhone\"]\nblock_user_agents = [\"*OldMail/1.*\"]\n\n[[activesync.account_overrides]]\naccount = \"bob\"\ndefault_action = \"block\"\nallow_device_ids = [\"BOBPHONE\"]\n",
    )
    .await;
    let client = lab.client();
    let device = alice(&lab.pki);
    let r = client
        .post(Some(&device), &target("Sync", "alice", "EvilPhone"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let r = client
        .post(
            Some(&device),
            &target("Sync", "alice", "iPhone"),
            &[("User-Agent", "OldMail/1.3")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let r = client
        .post(Some(&device), &target("Sync", "alice", "iPhone"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // Bob's override: only his registered phone.
    let bob = lab
        .pki
        .device(LeafSpec::device("bob").serial(&[0x0b, 0x02, 0x03, 0x04]));
    let r = client
        .post(Some(&bob), &target("Sync", "bob", "iPhone"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let r = client
        .post(
            Some(&bob),
            "/Microsoft-Server-ActiveSync?Cmd=Sync&User=bob&DeviceId=BOBPHONE&DeviceType=iPhone",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        lab.metric("seg_policy_refusals_total{reason=\"device-blocked\"}"),
        2.0
    );
    assert_eq!(
        lab.metric("seg_policy_refusals_total{reason=\"device-not-allowed\"}"),
        1.0
    );
    assert_eq!(lab.upstream.requests().len(), 2);
}

#[tokio::test]
async fn the_third_concurrent_ping_of_a_device_waits_and_a_gone_device_aborts_upstream() {
    let upstream = seg::demo::echo::EchoUpstream::start_holding(
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let lab = Lab::start_with_upstream(Pki::new(), accounts(), SETTINGS, upstream).await;
    let device = alice(&lab.pki);
    let client = lab.client();
    let ping = target("Ping", "alice", "iPhone");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = client
            .connect(Some(&device), TlsVersion::Any)
            .await
            .unwrap();
        conn.send_raw(
            format!("POST {ping} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        held.push(conn);
    }
    wait_until(|| lab.upstream.active_holds() == 2).await;
    assert_eq!(lab.metric("seg_long_polls_in_flight"), 2.0);
    let third = client.post(Some(&device), &ping, &[]).await.unwrap();
    assert_eq!(third.status, 503);
    assert_eq!(third.header("retry-after"), Some("30"));
    // Short commands still pass while the Pings are held.
    let sync = client
        .post(Some(&device), &target("Sync", "alice", "iPhone"), &[])
        .await
        .unwrap();
    assert_eq!(sync.status, 200);

    // The devices go away: seg abandons both upstream requests at once.
    drop(held);
    wait_until(|| lab.upstream.aborted_holds() == 2).await;
    wait_until(|| lab.metric("seg_long_polls_in_flight") == 0.0).await;
    // Each abandoned Ping still gets its audit record (status 499, decision abandoned).
    wait_until(|| lab.metric("seg_requests_total{command=\"Ping\",status_class=\"4xx\"}") == 2.0)
        .await;
    let again = client.connect(Some(&device), TlsVersion::Any).await;
    let mut again = again.unwrap();
    again
        .send_raw(
            format!("POST {ping} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    wait_until(|| lab.upstream.active_holds() == 1).await;
}

async fn wait_until(mut condition: impl FnMut() -> bool) {
    for _ in 0..100 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition not reached within 5 s");
}

#[tokio::test]
async fn activesync_statuses_and_headers_pass_through() {
    let lab = Lab::start(accounts(), SETTINGS).await;
    let device = alice(&lab.pki);
    let mut conn = lab
        .client()
        .connect(Some(&device), TlsVersion::Any)
        .await
        .unwrap();
    let rows: &[(&str, &str)] = &[
        ("401", "WWW-Authenticate: Basic realm=\"eas\""),
        ("403", "X-Test: 1"),
        ("449", "X-Test: 1"),
        (
            "451",
            "X-MS-Location: https://eas2.corp.test/Microsoft-Server-ActiveSync",
        ),
        ("456", "X-Test: 1"),
        ("457", "X-Test: 1"),
        ("503", "Retry-After: 120"),
        ("507", "X-Test: 1"),
        (
            "200",
            "MS-ASProtocolVersions: 2.5,12.0,12.1,14.0,14.1,16.0,16.1",
        ),
    ];
    for (status, header) in rows {
        let r = conn
            .request(
                "POST",
                &target("Sync", "alice", "iPhone"),
                &[
                    ("x-echo-status", status),
                    ("x-echo-response-header", header),
                ],
                b"",
            )
            .await
            .unwrap();
        assert_eq!(r.status.to_string(), *status);
        let (name, value) = header.split_once(": ").unwrap();
        assert_eq!(r.header(name), Some(value), "{status}: {:?}", r.headers);
    }
    let r = conn
        .request(
            "OPTIONS",
            "/Microsoft-Server-ActiveSync",
            &[("x-echo-response-header", "MS-ASProtocolCommands: Sync,Ping")],
            b"",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("MS-ASProtocolCommands"), Some("Sync,Ping"));
    let r = conn
        .request(
            "POST",
            &target("Sync", "alice", "iPhone"),
            &[("Upgrade", "h2c"), ("Connection", "Upgrade")],
            b"",
        )
        .await;
    assert_eq!(r.unwrap().status, 400, "Upgrade is refused");
}

#[tokio::test]
async fn connect_is_refused() {
    let lab = Lab::start(accounts(), SETTINGS).await;
    let device = alice(&lab.pki);
    let mut conn = lab
        .client()
        .connect(Some(&device), TlsVersion::Any)
        .await
        .unwrap();
    conn.send_raw(b"CONNECT eas.corp.test:443 HTTP/1.1\r\nHost: eas.corp.test:443\r\n\r\n")
        .await
        .unwrap();
    let r = conn.read_response().await.unwrap();
    assert!(
        r.status == 405 || r.status == 404 || r.status == 400,
        "CONNECT got {}",
        r.status
    );
    assert!(lab.upstream.requests().is_empty());
}

#[tokio::test]
async fn a_held_ping_outlives_the_idle_timeout() {
    let pki = Pki::new();
    let slapd = support::lab::start_slapd(&pki, accounts());
    let upstream = seg::demo::echo::EchoUpstream::start_holding(
        "127.0.0.1:0".parse().unwrap(),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    let directory = support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
    let text = support::lab::config_text(&pki, &directory, upstream.addr, SETTINGS).replace(
        "handshake_timeout = \"5s\"",
        "handshake_timeout = \"5s\"\nidle_timeout = \"1s\"",
    );
    assert!(text.contains("idle_timeout = \"1s\""));
    let path = pki.dir.write("idle.toml", &text);
    let seg = support::lab::start_seg(&path).await;
    let device = alice(&pki);
    let client = support::lab::Client::new(seg.listen_addr, &pki.ca_path);
    let started = std::time::Instant::now();
    let r = client
        .post(Some(&device), &target("Ping", "alice", "iPhone"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "the held Ping was cut");
    assert!(started.elapsed() >= Duration::from_secs(3));
    // An idle kept-alive connection, on the other hand, is closed after idle_timeout.
    let mut conn = client
        .connect(Some(&device), TlsVersion::Any)
        .await
        .unwrap();
    let r = conn
        .request("POST", &target("Sync", "alice", "iPhone"), &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        conn.request("POST", &target("Sync", "alice", "iPhone"), &[], b"")
            .await
            .is_err(),
        "idle connection kept"
    );
    seg.stop().await;
}
