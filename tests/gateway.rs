//! End to end: devices with certificates from a test CA, through real TLS handshakes, to
//! seg mapping them against a real slapd (1,000+ AD-shaped users, LDAPS) and forwarding to a
//! recording upstream.

mod support;

use std::time::{Duration, Instant};

use seg::demo::pki::{LeafSpec, Usage};
use support::lab::{
    assert_refused, eas_target, metric_value, reversed_hex, Client, Lab, Pki, TlsVersion,
    CA_AD_NAME,
};
use support::slapd::UserSpec;

/// The serial from KB5014754's example, with its Windows byte-reversed form.
const KB_SERIAL_HEX: &str = "620000000ccffc58f9832f285600000000000c";
const KB_SERIAL_REVERSED: &str = "0c000000000056282f83f958fccf0c00000062";
const SKI: [u8; 20] = [
    0x5a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f, 0x60, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6, 0xd7, 0xe8, 0xf9,
    0x0a, 0x1b, 0x2c, 0x3d,
];

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// A user created in 2020, before any test certificate (compatibility mode checks that).
fn user(sam: &str, upn: Option<&str>) -> UserSpec {
    let mut u = UserSpec::new(sam);
    u.upn = upn.map(str::to_string);
    u.when_created = Some("20200101000000.0Z".into());
    u
}

/// The accounts every mapping form needs.
fn mapping_users() -> Vec<UserSpec> {
    let mut bob = user("bob", Some("bob@corp.test"));
    bob.alt_security_identities = vec![format!("X509:<I>{CA_AD_NAME}<SR>{KB_SERIAL_REVERSED}")];
    let forward_serial = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66];
    let mut carol = user("carol", Some("carol@corp.test"));
    carol.alt_security_identities = vec![format!(
        "X509:<I>{CA_AD_NAME}<SR>{}",
        seg::identity::hex(&forward_serial)
    )];
    let mut dan = user("dan", Some("dan@corp.test"));
    // Upper-case hex: AD compares altSecurityIdentities case-insensitively.
    dan.alt_security_identities = vec![format!(
        "X509:<SKI>{}",
        seg::identity::hex(&SKI).to_uppercase()
    )];
    let mut eve = user("eve", Some("eve.upn@corp.test"));
    eve.mail = Some("eve@corp.test".into());
    let mut dave = user("dave", Some("dave@corp.test"));
    dave.user_account_control = 514;
    let mut erin = user("erin", Some("erin@corp.test"));
    erin.account_expires = Some(116_444_736_000_000_000 + 10_000_000);
    let mut frank = user("frank", Some("frank@corp.test"));
    frank.account_expires = Some(0x7FFF_FFFF_FFFF_FFFF);
    vec![
        user("alice", Some("alice@corp.test")),
        bob,
        carol,
        dan,
        eve,
        dave,
        erin,
        frank,
        user("twin1", Some("twin@corp.test")),
        user("twin2", Some("twin@corp.test")),
    ]
}

#[tokio::test]
async fn every_mapping_form_reaches_the_upstream_as_its_account() {
    let lab = Lab::start(mapping_users(), "").await;
    let client = lab.client();
    let rows: Vec<(LeafSpec, &str)> = vec![
        (
            LeafSpec::device("alice").upn("alice@corp.test"),
            "alice@corp.test",
        ),
        (
            LeafSpec::device("bob").serial(&unhex(KB_SERIAL_HEX)),
            "bob@corp.test",
        ),
        (
            LeafSpec::device("carol").serial(&[0x11, 0x22, 0x33, 0x44, 0x55, 0x66]),
            "carol@corp.test",
        ),
        (
            LeafSpec::device("dan").subject_key_id(&SKI),
            "dan@corp.test",
        ),
        (
            LeafSpec::device("eve").email("eve@corp.test"),
            "eve.upn@corp.test",
        ),
        (
            LeafSpec::device("frank").upn("FRANK@corp.test"),
            "frank@corp.test",
        ),
    ];
    for (spec, expected) in rows {
        let name = spec.common_name.clone();
        let device = lab.pki.device(spec);
        let before = lab.upstream.requests().len();
        let response = client
            .post(Some(&device), &eas_target("Sync", &name), &[])
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(response.status, 200, "{name}: {}", response.text());
        let requests = lab.upstream.requests();
        assert_eq!(
            requests.len(),
            before + 1,
            "{name}: exactly one upstream request"
        );
        let seen = &requests[before];
        assert_eq!(seen.header_values("x-remote-user"), [expected], "{name}");
        assert_eq!(
            seen.header_values("x-forwarded-for"),
            ["127.0.0.1"],
            "{name}"
        );
        assert!(
            seen.target
                .starts_with("/Microsoft-Server-ActiveSync?Cmd=Sync"),
            "{}",
            seen.target
        );
    }
    // The reversed KB5014754 serial is what slapd was asked for first.
    let filters = lab.slapd.search_filters().join("\n");
    assert!(
        filters
            .to_lowercase()
            .contains(&format!("<sr>{KB_SERIAL_REVERSED}")),
        "filters: {filters}"
    );
    assert_eq!(reversed_hex(&unhex(KB_SERIAL_HEX)), KB_SERIAL_REVERSED);
}

#[tokio::test]
async fn real_denials_get_403_and_nothing_reaches_the_upstream() {
    let lab = Lab::start(mapping_users(), "").await;
    let client = lab.client();
    let rows = [
        (
            LeafSpec::device("nobody").upn("nobody@corp.test"),
            "no-mapping",
        ),
        (LeafSpec::device("bare"), "no-mapping"),
        (
            LeafSpec::device("dave").upn("dave@corp.test"),
            "account-disabled",
        ),
        (
            LeafSpec::device("erin").upn("erin@corp.test"),
            "account-expired",
        ),
        (
            LeafSpec::device("twin").upn("twin@corp.test"),
            "ambiguous-mapping",
        ),
    ];
    for (spec, reason) in rows {
        let name = spec.common_name.clone();
        let device = lab.pki.device(spec);
        let response = client
            .post(Some(&device), &eas_target("Sync", &name), &[])
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(response.status, 403, "{name}");
        assert!(!response.text().contains("ldap"), "body names no internals");
        let decisions =
            format!("seg_identity_decisions_total{{decision=\"deny\",reason=\"{reason}\"}}");
        assert!(lab.metric(&decisions) >= 1.0, "{name}: {decisions}");
    }
    assert!(
        lab.upstream.requests().is_empty(),
        "the upstream saw a denied device"
    );
}

#[tokio::test]
async fn handshakes_without_a_valid_client_certificate_are_refused() {
    let lab = Lab::start(mapping_users(), "").await;
    let client = lab.client();
    let target = eas_target("Sync", "alice");

    assert_refused(
        client.post(None, &target, &[]).await,
        "no client certificate",
    );
    let foreign = lab.pki.foreign_device(
        "Elsewhere CA",
        LeafSpec::device("alice").upn("alice@corp.test"),
    );
    assert_refused(
        client.post(Some(&foreign), &target, &[]).await,
        "another CA",
    );
    let impostor = lab.pki.foreign_device(
        "Corp Test Issuing CA",
        LeafSpec::device("alice").upn("alice@corp.test"),
    );
    assert_refused(
        client.post(Some(&impostor), &target, &[]).await,
        "another CA with the same name",
    );
    let server_only = lab.pki.device(
        LeafSpec::device("alice")
            .upn("alice@corp.test")
            .usage(Usage::ServerAuth),
    );
    assert_refused(
        client.post(Some(&server_only), &target, &[]).await,
        "serverAuth-only leaf",
    );
    let no_eku = lab.pki.device(
        LeafSpec::device("alice")
            .upn("alice@corp.test")
            .usage(Usage::None),
    );
    assert_refused(
        client.post(Some(&no_eku), &target, &[]).await,
        "leaf without EKU",
    );
    let expired = lab.pki.device(
        LeafSpec::device("alice")
            .upn("alice@corp.test")
            .validity((2020, 1, 1), (2021, 1, 1)),
    );
    assert_refused(
        client.post(Some(&expired), &target, &[]).await,
        "expired certificate",
    );

    assert!(lab.upstream.requests().is_empty());
    let m = lab.seg.metrics.render();
    for label in [
        "no_client_certificate",
        "unknown_issuer",
        "certificate_invalid",
        "certificate_wrong_purpose",
        "certificate_expired",
    ] {
        let sample = format!("seg_tls_handshakes_total{{result=\"{label}\"}}");
        assert!(metric_value(&m, &sample) >= 1.0, "{sample} in\n{m}");
    }
}

#[tokio::test]
async fn tls12_and_rsa_device_keys_are_served() {
    let pki = Pki::new();
    let rsa_key = pki.dir.path().join("rsa.key");
    let status = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&rsa_key)
        .output()
        .expect("openssl is needed (apt-get install openssl; ./tests/run.sh installs it)");
    assert!(status.status.success(), "openssl genpkey failed");
    let rsa_pem = std::fs::read_to_string(&rsa_key).unwrap();
    let rsa = pki.device(
        LeafSpec::device("alice-rsa")
            .upn("alice@corp.test")
            .key_pem(&rsa_pem),
    );
    let ecdsa = pki.device(LeafSpec::device("alice").upn("alice@corp.test"));
    let lab = Lab::start_with(pki, mapping_users(), "").await;
    let client = lab.client();
    for (device, version) in [
        (&rsa, TlsVersion::Any),
        (&rsa, TlsVersion::Tls12),
        (&ecdsa, TlsVersion::Tls12),
    ] {
        let mut conn = client
            .connect(Some(device), version)
            .await
            .expect("handshake");
        let response = conn
            .request("POST", &eas_target("Ping", "alice"), &[], b"")
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{}", device.name);
    }
}

#[tokio::test]
async fn spoofed_identity_headers_are_replaced_by_the_real_one() {
    let lab = Lab::start(mapping_users(), "").await;
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    let mut conn = lab
        .client()
        .connect(Some(&alice), TlsVersion::Any)
        .await
        .unwrap();
    let spoofs: &[(&str, &str)] = &[
        ("X-Remote-User", "bob@corp.test"),
        ("x-remote-user", "bob2@corp.test"),
        ("X-REMOTE-USER", "bob3@corp.test"),
        ("X_Remote_User", "bob4@corp.test"),
        ("x_remote-user", "bob5@corp.test"),
        (
            "X-Forwarded-Client-Cert",
            "By=spiffe://x;Hash=00;Subject=\"CN=bob\"",
        ),
        ("X-Forwarded-For", "10.9.8.7"),
        ("Forwarded", "for=10.9.8.7"),
        ("x-webobjects-remote-user", "bob"),
        ("X_WebObjects_Server_URL", "https://evil.example"),
        ("Authorization", "Basic Ym9iOng="),
        ("Connection", "X-Remote-User, X-Forwarded-For"),
    ];
    let response = conn
        .request("POST", &eas_target("Sync", "alice"), spoofs, b"hello")
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let seen = &lab.upstream.requests()[0];
    assert_eq!(seen.header_values("x-remote-user"), ["alice@corp.test"]);
    assert_eq!(seen.header_values("x-forwarded-for"), ["127.0.0.1"]);
    for gone in [
        "x_remote_user",
        "x_remote-user",
        "x-forwarded-client-cert",
        "forwarded",
        "x-webobjects-remote-user",
        "x_webobjects_server_url",
        "authorization",
        "connection",
    ] {
        assert!(
            seen.header_values(gone).is_empty(),
            "{gone} reached the upstream: {:?}",
            seen.headers
        );
    }
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains("bob")),
        "a client-chosen identity reached the upstream: {:?}",
        seen.headers
    );
    assert_eq!(seen.body, b"hello");
}

#[tokio::test]
async fn ldap_metacharacters_in_the_upn_are_escaped_and_match_nothing() {
    let lab = Lab::start(mapping_users(), "").await;
    let client = lab.client();
    let rows = [
        ("*", "\\2A"),
        ("*@corp.test", "\\2A@corp.test"),
        (
            "alice@corp.test)(userPrincipalName=*",
            "alice@corp.test\\29\\28userprincipalname=\\2A",
        ),
        ("back\\slash@corp.test", "back\\5Cslash@corp.test"),
        ("alice@corp.test\0", "alice@corp.test\\00"),
        (
            "alice@corp.test\r\nX-Remote-User: bob",
            "alice@corp.test\\0D\\0Ax-remote-user: bob",
        ),
    ];
    for (upn, logged) in rows {
        let device = lab.pki.device(LeafSpec::device("injector").upn(upn));
        let response = client
            .post(Some(&device), &eas_target("Sync", "alice"), &[])
            .await
            .unwrap_or_else(|e| panic!("{upn:?}: {e}"));
        assert_eq!(response.status, 403, "{upn:?} matched an account");
        let expected = format!("(userPrincipalName={logged})");
        let filters = lab.slapd.search_filters();
        assert!(
            filters.iter().any(|f| f.contains(&expected)),
            "{upn:?}: slapd never received {expected}; it received {filters:#?}"
        );
    }
    assert!(lab.upstream.requests().is_empty());
}

#[tokio::test]
async fn a_stopped_directory_serves_cached_identities_and_503_for_unknown_devices() {
    let mut lab = Lab::start(mapping_users(), "").await;
    let client = lab.client();
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    let response = client
        .post(Some(&alice), &eas_target("Sync", "alice"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    lab.slapd.stop();
    let response = client
        .post(Some(&alice), &eas_target("Sync", "alice"), &[])
        .await
        .unwrap();
    assert_eq!(
        response.status, 200,
        "a cached identity is served while the directory is down"
    );

    let bob = lab
        .pki
        .device(LeafSpec::device("bob").serial(&unhex(KB_SERIAL_HEX)));
    let started = Instant::now();
    let response = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "503 took {:?}",
        started.elapsed()
    );
    assert_eq!(response.header("retry-after"), Some("30"));
    assert_eq!(
        lab.upstream.requests().len(),
        2,
        "the unknown device reached the upstream"
    );

    // Transport errors are never cached: the device maps once the directory is back.
    lab.slapd.restart();
    let response = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        lab.upstream.requests()[2].header_values("x-remote-user"),
        ["bob@corp.test"]
    );
}

/// A directory that refuses seg itself — a wrong bind password (slapd answers
/// invalidCredentials), an LDAPS certificate from a CA seg does not trust — is a dependency
/// down: 503 + Retry-After and readiness failing, never a denial, and nothing forwarded.
#[tokio::test]
async fn a_directory_that_refuses_seg_is_a_503_not_a_denial() {
    let pki = Pki::new();
    let slapd = support::lab::start_slapd(&pki, mapping_users());
    let upstream =
        seg::demo::echo::EchoUpstream::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
    let alice = pki.device(LeafSpec::device("alice").upn("alice@corp.test"));
    let other_ca = Pki::new();
    // Built one at a time: config_text writes the bind password file afresh each time.
    let wrong_password = || {
        let mut directory = support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
        directory.password = "not-the-password".into();
        support::lab::config_text(&pki, &directory, upstream.addr, "")
    };
    let untrusted_ldaps = || {
        let directory = support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
        let text = support::lab::config_text(&pki, &directory, upstream.addr, "");
        let edited = text.replace(
            &format!("ca_file = \"{}\"", pki.ca_path.display()),
            &format!("ca_file = \"{}\"", other_ca.ca_path.display()),
        );
        assert_ne!(text, edited, "the directory's ca_file line");
        edited
    };
    let cases: [(&str, &dyn Fn() -> String); 2] = [
        ("bind refused", &wrong_password),
        ("LDAPS certificate from an untrusted CA", &untrusted_ldaps),
    ];
    for (name, config) in cases {
        let text = config();
        let path = pki.dir.write("refusing-directory.toml", &text);
        let seg = support::lab::start_seg(&path).await;
        let client = Client::new(seg.listen_addr, &pki.ca_path);
        let response = client
            .post(Some(&alice), &eas_target("Sync", "alice"), &[])
            .await
            .unwrap();
        assert_eq!(response.status, 503, "{name}: {}", response.text());
        assert_eq!(response.header("retry-after"), Some("30"), "{name}");
        let ready = support::lab::http_get(seg.admin_addr, "/readyz").await;
        assert!(!ready.starts_with("HTTP/1.1 200"), "{name}: {ready}");
        seg.stop().await;
    }
    assert!(upstream.requests().is_empty(), "nothing forwarded");
}

/// A directory whose own size limit cuts an answer below seg's may hide a second match:
/// twin@corp.test is two accounts, and slapd with `sizelimit 1` returns one of them with
/// sizeLimitExceeded. That one must never be taken as the unique match (it is a 503: the
/// directory's setting must change), while a unique account is still served.
#[tokio::test]
async fn an_answer_cut_by_the_directorys_size_limit_is_never_a_unique_match() {
    let pki = Pki::new();
    let slapd = support::slapd::Slapd::start(support::slapd::SlapdOptions {
        users: mapping_users(),
        bind_password: "svc-password".into(),
        tls: Some(support::slapd::TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            ca: pki.ca_path.clone(),
        }),
        size_limit: Some(1),
        ..support::slapd::SlapdOptions::default()
    });
    let upstream =
        seg::demo::echo::EchoUpstream::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
    let text = support::lab::config_text(
        &pki,
        &support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]),
        upstream.addr,
        "",
    );
    let path = pki.dir.write("size-limited.toml", &text);
    let seg = support::lab::start_seg(&path).await;
    let client = Client::new(seg.listen_addr, &pki.ca_path);
    let twin = pki.device(LeafSpec::device("twin").upn("twin@corp.test"));
    let response = client
        .post(Some(&twin), &eas_target("Sync", "twin1"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 503, "{}", response.text());
    let alice = pki.device(LeafSpec::device("alice").upn("alice@corp.test"));
    let response = client
        .post(Some(&alice), &eas_target("Sync", "alice"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let seen: Vec<String> = upstream
        .requests()
        .iter()
        .flat_map(|r| r.header_values("x-remote-user"))
        .map(str::to_string)
        .collect();
    assert_eq!(seen, ["alice@corp.test"]);
    seg.stop().await;
}

#[tokio::test]
async fn readiness_follows_the_directory() {
    let mut lab = Lab::start(mapping_users(), "").await;
    let admin = lab.seg.admin_addr;
    let wait_for =
        |want: &'static str| support::lab::wait_for_readyz(admin, want, "", Duration::from_secs(5));
    wait_for("HTTP/1.1 200").await;
    lab.slapd.stop();
    let answer = wait_for("HTTP/1.1 503").await;
    assert!(answer.contains("directory"), "{answer}");
    lab.slapd.restart();
    wait_for("HTTP/1.1 200").await;
}

#[tokio::test]
async fn concurrent_first_requests_for_one_certificate_make_one_directory_search() {
    // 100 connections of one certificate at once: over listen.max_connections_per_device (8,
    // tests/slow_clients.rs), lifted here because this test is about coalescing lookups.
    let lab = Lab::start(mapping_users(), "")
        .await
        .reconfigure(|text| {
            text.replacen(
                "handshake_timeout = \"5s\"",
                "handshake_timeout = \"5s\"\nmax_connections_per_device = 100",
                1,
            )
        })
        .await;
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    let client = std::sync::Arc::new(lab.client());
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let client = std::sync::Arc::clone(&client);
        let alice = alice.clone();
        tasks.push(tokio::spawn(async move {
            client
                .post(Some(&alice), &eas_target("Sync", "alice"), &[])
                .await
                .map(|r| r.status)
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), 200);
    }
    let searches: Vec<String> = lab
        .slapd
        .search_filters()
        .into_iter()
        .filter(|f| f.contains("alice@corp.test"))
        .collect();
    assert_eq!(
        searches.len(),
        1,
        "directory searches for alice: {searches:#?}"
    );
    let m = lab.seg.metrics.render();
    assert_eq!(
        metric_value(&m, "seg_identity_cache_lookups_total{result=\"miss\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(lab.upstream.requests().len(), 100);
}

#[tokio::test]
async fn keep_alive_connections_serve_many_requests_with_one_lookup() {
    let lab = Lab::start(mapping_users(), "").await;
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    let mut conn = lab
        .client()
        .connect(Some(&alice), TlsVersion::Any)
        .await
        .unwrap();
    for cmd in ["FolderSync", "Sync", "Ping", "SendMail"] {
        let response = conn
            .request("POST", &eas_target(cmd, "alice"), &[], b"x")
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{cmd}");
    }
    assert_eq!(lab.upstream.requests().len(), 4);
    assert_eq!(
        lab.metric("seg_directory_searches_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        lab.metric("seg_requests_total{command=\"SendMail\",status_class=\"2xx\"}"),
        1.0
    );
    // Process and build metrics, unprefixed and prefixed as Prometheus's conventions want.
    assert!(lab.metric("process_resident_memory_bytes") > 0.0);
    assert!(lab.metric("process_open_fds") > 0.0);
    assert_eq!(
        lab.metric(&format!(
            "seg_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
}

#[tokio::test]
async fn other_paths_and_methods_are_not_forwarded() {
    let lab = Lab::start(mapping_users(), "").await;
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    let mut conn = lab
        .client()
        .connect(Some(&alice), TlsVersion::Any)
        .await
        .unwrap();
    let r = conn.request("POST", "/owa/", &[], b"").await.unwrap();
    assert_eq!(r.status, 404);
    let r = conn
        .request("GET", "/Microsoft-Server-ActiveSync", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 405);
    let r = conn
        .request("POST", "/Microsoft-Server-ActiveSyncX", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    let r = conn
        .request("OPTIONS", "/Microsoft-Server-ActiveSync", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let r = conn
        .request("POST", "/autodiscover/autodiscover.xml", &[], b"<x/>")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(lab.upstream.requests().len(), 2);
}

#[tokio::test]
async fn the_second_directory_url_is_used_when_the_first_is_down() {
    let pki = Pki::new();
    let slapd = support::lab::start_slapd(&pki, mapping_users());
    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // A port nothing listens on: bind and drop.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let urls = [format!("ldaps://{dead}"), slapd.ldaps_url()];
    let text = support::lab::config_text(
        &pki,
        &support::lab::DirectoryRef::slapd(&slapd, &urls),
        upstream.addr,
        "",
    );
    let path = pki.dir.write("failover.toml", &text);
    let seg = support::lab::start_seg(&path).await;
    let alice = pki.device(LeafSpec::device("alice").upn("alice@corp.test"));
    let client = Client::new(seg.listen_addr, &pki.ca_path);
    let response = client
        .post(Some(&alice), &eas_target("Sync", "alice"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        upstream.requests()[0].header_values("x-remote-user"),
        ["alice@corp.test"]
    );
    seg.stop().await;
}

#[tokio::test]
async fn the_identity_header_value_follows_the_configuration() {
    let lab = Lab::start(
        mapping_users(),
        "[identity]\nheader = \"X-WebObjects-Remote-User\"\nvalue = \"domain-sam\"\nnetbios_domain = \"CORP\"\n",
    )
    .await;
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    let response = lab
        .client()
        .post(
            Some(&alice),
            &eas_target("Sync", "alice"),
            &[
                ("x-webobjects-remote-user", "bob"),
                ("X-Remote-User", "bob"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let seen = &lab.upstream.requests()[0];
    assert_eq!(
        seen.header_values("x-webobjects-remote-user"),
        ["CORP\\alice"]
    );
    assert!(seen.header_values("x-remote-user").is_empty());
}

#[tokio::test]
async fn an_https_upstream_with_its_own_ca_and_a_path_prefix() {
    let pki = Pki::new();
    // The upstream's certificate comes from a CA of its own, trusted only through ca_file.
    let upstream_ca = seg::demo::pki::CertAuthority::new("Mail", "Mail Servers CA").unwrap();
    let upstream_cert = upstream_ca.issue(&LeafSpec::loopback_server()).unwrap();
    let upstream_ca_path = pki.dir.write("upstream-ca.pem", &upstream_ca.cert_pem());
    let server_tls = rustls::ServerConfig::builder_with_provider(seg::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![upstream_cert.der.clone().into()],
            rustls::pki_types::PrivateKeyDer::try_from(
                rustls::pki_types::pem::PemObject::from_pem_slice(upstream_cert.key_pem.as_bytes())
                    .map(|k: rustls::pki_types::PrivatePkcs8KeyDer<'static>| {
                        k.secret_pkcs8_der().to_vec()
                    })
                    .unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
    let upstream = seg::demo::echo::EchoUpstream::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        std::sync::Arc::new(server_tls),
    )
    .await
    .unwrap();
    let slapd = support::lab::start_slapd(&pki, mapping_users());
    let mut text = support::lab::config_text(
        &pki,
        &support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]),
        upstream.addr,
        "",
    );
    text = text.replace(
        &format!("url = \"http://{}\"", upstream.addr),
        &format!(
            "url = \"https://localhost:{}\"\nca_file = \"{}\"\npath_prefix = \"/SOGo\"",
            upstream.addr.port(),
            upstream_ca_path.display()
        ),
    );
    let path = pki.dir.write("https.toml", &text);
    let seg = support::lab::start_seg(&path).await;
    let alice = pki.device(LeafSpec::device("alice").upn("alice@corp.test"));
    let client = Client::new(seg.listen_addr, &pki.ca_path);
    let response = client
        .post(Some(&alice), &eas_target("Sync", "alice"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.text());
    let seen = &upstream.requests()[0];
    assert!(
        seen.target
            .starts_with("/SOGo/Microsoft-Server-ActiveSync?Cmd=Sync"),
        "{}",
        seen.target
    );
    assert_eq!(seen.header_values("x-remote-user"), ["alice@corp.test"]);
    seg.stop().await;
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() {
    let pki = Pki::new();
    let slapd = support::lab::start_slapd(&pki, mapping_users());
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = support::lab::config_text(
        &pki,
        &support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]),
        dead,
        "",
    );
    let path = pki.dir.write("dead-upstream.toml", &text);
    let seg = support::lab::start_seg(&path).await;
    let alice = pki.device(LeafSpec::device("alice").upn("alice@corp.test"));
    let client = Client::new(seg.listen_addr, &pki.ca_path);
    let response = client
        .post(Some(&alice), &eas_target("Sync", "alice"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 502);
    assert!(
        metric_value(
            &seg.metrics.render(),
            "seg_upstream_errors_total{kind=\"upstream-unreachable\"}"
        ) >= 1.0
    );
    seg.stop().await;
}

/// An upstream that answers one request per connection and then closes it without saying
/// so (no `Connection: close`), as a server whose keep-alive timeout fires between two
/// requests does. In-process: a real server closes idle connections only after its timeout,
/// and this one closes at once so every reuse meets a closed connection. Returns its address
/// and, per connection, the requests (heads and bodies) it read.
async fn closing_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let log = std::sync::Arc::clone(&log);
            tokio::spawn(async move {
                let mut bytes = Vec::new();
                let mut buf = [0u8; 4096];
                // Head and the Content-Length body (the requests here are small).
                loop {
                    let Ok(n) = tcp.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        break;
                    }
                    bytes.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&bytes).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text[..end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if bytes.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&bytes).to_string());
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                // Closed without notice.
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn an_upstream_connection_closed_while_idle_is_not_reused_and_nothing_is_sent_twice() {
    let pki = Pki::new();
    let slapd = support::lab::start_slapd(&pki, mapping_users());
    let (upstream, seen) = closing_upstream().await;
    let text = support::lab::config_text(
        &pki,
        &support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]),
        upstream,
        "",
    );
    let path = pki.dir.write("closing-upstream.toml", &text);
    let seg = support::lab::start_seg(&path).await;
    let alice = pki.device(LeafSpec::device("alice").upn("alice@corp.test"));
    let client = Client::new(seg.listen_addr, &pki.ca_path);
    let mut connection = client.connect(Some(&alice), TlsVersion::Any).await.unwrap();
    for i in 0..3 {
        // Time for the upstream's close to arrive, so seg finds the idle connection closed.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let body = format!("sync-{i}");
        let response = connection
            .request("POST", &eas_target("Sync", "alice"), &[], body.as_bytes())
            .await
            .unwrap();
        assert_eq!(response.status, 200, "request {i}: {}", response.text());
    }
    // Connections that sent nothing are /readyz's TCP probes.
    let seen: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| !r.is_empty())
        .cloned()
        .collect();
    assert_eq!(
        seen.len(),
        3,
        "one upstream connection per request: {seen:#?}"
    );
    for (i, request) in seen.iter().enumerate() {
        assert!(
            request.ends_with(&format!("sync-{i}")),
            "each request went out once, in order: {seen:#?}"
        );
    }
    let metrics = seg.metrics.render();
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("seg_upstream_errors_total{"))
        .collect();
    assert!(errors.is_empty(), "no upstream errors: {errors:?}");
    seg.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_at_the_handshake_timeout() {
    let pki = Pki::new();
    let slapd = support::lab::start_slapd(&pki, vec![]);
    let text = support::lab::config_text(
        &pki,
        &support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]),
        "127.0.0.1:9".parse().unwrap(),
        "",
    )
    .replace("handshake_timeout = \"5s\"", "handshake_timeout = \"1s\"");
    let path = pki.dir.write("timeout.toml", &text);
    let seg = support::lab::start_seg(&path).await;
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(seg.listen_addr)
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    use tokio::io::AsyncReadExt;
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("seg kept a silent connection open")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early: {:?}",
        started.elapsed()
    );
    assert_eq!(
        metric_value(
            &seg.metrics.render(),
            "seg_tls_handshakes_total{result=\"timeout\"}"
        ),
        1.0
    );
}

/// A lab whose cache keeps admissions fresh and denials for one second, with dave (denied:
/// disabled) and alice (admitted) as devices.
async fn one_second_cache_lab() -> (Lab, support::lab::Device, support::lab::Device) {
    let lab = Lab::start(
        mapping_users(),
        "[cache]\nsoft_ttl = \"1s\"\nhard_ttl = \"1h\"\nnegative_ttl = \"1s\"\n",
    )
    .await;
    let dave = lab
        .pki
        .device(LeafSpec::device("dave").upn("dave@corp.test"));
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    (lab, dave, alice)
}

/// Sets an account's userAccountControl in the lab's slapd (512 enabled, 514 disabled).
fn set_account_control(lab: &Lab, sam: &str, value: u32) {
    let users = lab.slapd.users_dn();
    lab.slapd.modify(&format!(
        "dn: CN={sam},{users}\nchangetype: modify\nreplace: userAccountControl\nuserAccountControl: {value}\n"
    ))
}

#[tokio::test]
async fn denials_expire_after_the_negative_ttl_and_admissions_refresh_after_the_soft_ttl() {
    let (lab, dave, alice) = one_second_cache_lab().await;
    let client = lab.client();
    let set_uac = |sam: &str, value: u32| set_account_control(&lab, sam, value);
    let status = |device: &support::lab::Device| {
        let client = &client;
        let device = device.clone();
        async move {
            let target = eas_target("Sync", &device.name);
            client
                .post(Some(&device), &target, &[])
                .await
                .unwrap()
                .status
        }
    };

    assert_eq!(status(&dave).await, 403);
    assert_eq!(status(&alice).await, 200);
    set_uac("dave", 512);
    set_uac("alice", 514);
    assert_eq!(
        status(&dave).await,
        403,
        "the denial is cached for the negative TTL"
    );
    assert_eq!(status(&alice).await, 200, "the admission is cached");

    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        status(&dave).await,
        200,
        "after the negative TTL the directory is asked again"
    );
    // Past the soft TTL the stale admission is served once while a refresh runs behind it.
    assert_eq!(status(&alice).await, 200);
    let mut refused = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if status(&alice).await == 403 {
            refused = true;
            break;
        }
    }
    assert!(refused, "the background refresh never saw alice disabled");
    assert!(lab.metric("seg_identity_cache_lookups_total{result=\"stale\"}") >= 1.0);
}

/// A kept-alive connection reuses its decision between requests (`Remembered`), never past
/// the point where the cache itself would answer differently: the same sequence as above,
/// each device on one connection throughout.
#[tokio::test]
async fn a_kept_alive_connection_reuses_its_decision_only_while_the_cache_would() {
    let (lab, dave, alice) = one_second_cache_lab().await;
    let client = lab.client();
    let set_uac = |sam: &str, value: u32| set_account_control(&lab, sam, value);
    let mut dave_conn = client.connect(Some(&dave), TlsVersion::Any).await.unwrap();
    let mut alice_conn = client.connect(Some(&alice), TlsVersion::Any).await.unwrap();
    async fn status(conn: &mut support::lab::Connection, user: &str) -> u16 {
        conn.request("POST", &eas_target("Sync", user), &[], b"")
            .await
            .unwrap()
            .status
    }

    assert_eq!(status(&mut dave_conn, "dave").await, 403);
    assert_eq!(status(&mut alice_conn, "alice").await, 200);
    set_uac("dave", 512);
    set_uac("alice", 514);
    assert_eq!(status(&mut dave_conn, "dave").await, 403, "denial reused");
    assert_eq!(
        status(&mut alice_conn, "alice").await,
        200,
        "admission reused"
    );

    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        status(&mut dave_conn, "dave").await,
        200,
        "past the negative TTL the same connection asks again"
    );
    assert_eq!(
        status(&mut alice_conn, "alice").await,
        200,
        "stale, refreshing"
    );
    let mut refused = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if status(&mut alice_conn, "alice").await == 403 {
            refused = true;
            break;
        }
    }
    assert!(
        refused,
        "the connection kept an admission the refresh had withdrawn"
    );
}

#[tokio::test]
async fn starttls_on_plain_ldap_works() {
    let pki = Pki::new();
    let slapd = support::lab::start_slapd(&pki, mapping_users());
    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let text = support::lab::config_text(
        &pki,
        &support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldap_url()]),
        upstream.addr,
        "",
    )
    .replace("connect_timeout", "starttls = true\nconnect_timeout");
    let path = pki.dir.write("starttls.toml", &text);
    let seg = support::lab::start_seg(&path).await;
    let alice = pki.device(LeafSpec::device("alice").upn("alice@corp.test"));
    let response = Client::new(seg.listen_addr, &pki.ca_path)
        .post(Some(&alice), &eas_target("Sync", "alice"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    seg.stop().await;
}
