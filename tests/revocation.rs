//! Revocation that never goes stale, and PKI changes without a restart: a real OpenSSL CA
//! (`openssl ca -revoke`, `-gencrl`) issues the devices, seg reloads its configuration while
//! connections stay open.

mod support;

use std::time::Duration;

use seg::config::Config;
use support::lab::{
    config_text, eas_target, metric_value, start_slapd, Client, Device, DirectoryRef, Pki,
    TlsVersion, CA_AD_NAME,
};
use support::openssl_ca::{FileServer, IssuedDevice, OcspResponder, OpensslCa};
use support::slapd::UserSpec;

/// The lab with device certificates from an OpenSSL CA and its CRL configured.
struct RevocationLab {
    pki: Pki,
    ca: OpensslCa,
    crl: std::path::PathBuf,
    config_path: std::path::PathBuf,
    seg: seg::Running,
    _slapd: support::slapd::Slapd,
    _upstream: seg::demo::echo::EchoUpstream,
    alice: IssuedDevice,
    bob: IssuedDevice,
}

/// One account per device, mapped strongly by the OpenSSL CA's issuer and the serial.
fn mapped_users(devices: &[(&str, &IssuedDevice)]) -> Vec<UserSpec> {
    devices
        .iter()
        .map(|(sam, device)| {
            let mut user = UserSpec::new(sam);
            user.upn = Some(format!("{sam}@corp.test"));
            let mut reversed = device.serial.clone();
            reversed.reverse();
            user.alt_security_identities = vec![format!(
                "X509:<I>{CA_AD_NAME}<SR>{}",
                seg::identity::hex(&reversed)
            )];
            user
        })
        .collect()
}

impl RevocationLab {
    async fn start(crl_seconds: u32) -> RevocationLab {
        let pki = Pki::new();
        let ca = OpensslCa::new("Corp Test", "Corp Test Issuing CA");
        let alice = ca.issue("alice");
        let bob = ca.issue("bob");
        let users = mapped_users(&[("alice", &alice), ("bob", &bob)]);
        let slapd = start_slapd(&pki, users);
        let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let crl = pki.dir.path().join("corp.crl");
        ca.write_crl(&crl, crl_seconds);
        let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
        let text = support::lab::trusting(
            &config_text(&pki, &directory, upstream.addr, ""),
            &pki,
            &ca.cert,
        )
        .replace(
            &format!("client_ca = \"{}\"", ca.cert.display()),
            &format!(
                "client_ca = \"{}\"\ncrl_files = [\"{}\"]",
                ca.cert.display(),
                crl.display()
            ),
        );
        assert!(text.contains("crl_files"), "config template changed");
        let config_path = pki.dir.write("seg.toml", &text);
        let seg = seg::App::build(Config::load(&config_path).unwrap())
            .unwrap()
            .start()
            .await
            .unwrap();
        RevocationLab {
            pki,
            ca,
            crl,
            config_path,
            seg,
            _slapd: slapd,
            _upstream: upstream,
            alice,
            bob,
        }
    }

    fn device(&self, name: &str, issued: &IssuedDevice) -> Device {
        Device::from_files(name, &issued.cert, &issued.key)
    }

    fn client(&self) -> Client {
        Client::new(self.seg.listen_addr, &self.pki.ca_path)
    }

    fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.seg.metrics.render(), sample)
    }
}

/// Alice's connection, held after one Sync served on it.
async fn served_alice(client: &Client, alice: &Device) -> support::lab::Connection {
    let mut held = client.connect(Some(alice), TlsVersion::Any).await.unwrap();
    let r = held
        .request("POST", &eas_target("Sync", "alice"), &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    held
}

/// Alice's next Sync on her open connection: 403 with `Connection: close`, and the
/// connection then closed.
async fn assert_refused_and_closed(held: &mut support::lab::Connection) {
    let sync = eas_target("Sync", "alice");
    let r = held.request("POST", &sync, &[], b"").await.unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        held.request("POST", &sync, &[], b"").await.is_err(),
        "the connection stayed open"
    );
}

#[tokio::test]
async fn a_device_revoked_while_connected_is_refused_on_its_next_request() {
    let lab = RevocationLab::start(3600).await;
    let alice = lab.device("alice", &lab.alice);
    let bob = lab.device("bob", &lab.bob);
    let client = lab.client();
    let mut held = served_alice(&client, &alice).await;

    lab.ca.revoke(&lab.alice);
    lab.ca.write_crl(&lab.crl, 3600);
    lab.seg
        .reload_file(&lab.config_path)
        .expect("reload with the new CRL");

    // The open keep-alive connection: 403 and closed.
    assert_refused_and_closed(&mut held).await;
    // A new handshake: refused by the verifier.
    support::lab::assert_refused(
        client
            .post(Some(&alice), &eas_target("Sync", "alice"), &[])
            .await,
        "revoked",
    );
    assert!(lab.metric("seg_tls_handshakes_total{result=\"certificate_revoked\"}") >= 1.0);
    assert_eq!(
        lab.metric(
            "seg_identity_decisions_total{decision=\"deny\",reason=\"certificate-revoked\"}"
        ),
        0.0
    );
    // Bob is not revoked.
    let r = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        lab.metric("seg_config_reload_total{result=\"success\"}"),
        1.0
    );
}

#[tokio::test]
async fn a_resumed_session_never_skips_the_revocation_check() {
    let lab = RevocationLab::start(3600).await;
    let alice = lab.device("alice", &lab.alice);
    let resuming = support::lab::ResumingClient::new(lab.seg.listen_addr, &lab.pki.ca_path, &alice);
    for _ in 0..2 {
        let r = resuming.post(&eas_target("Sync", "alice")).await.unwrap();
        assert_eq!(r.status, 200);
    }
    assert!(
        lab.metric("seg_tls_handshakes_total{result=\"resumed\"}") >= 1.0,
        "the second connection did not resume"
    );

    lab.ca.revoke(&lab.alice);
    lab.ca.write_crl(&lab.crl, 3600);
    lab.seg
        .reload_file(&lab.config_path)
        .expect("reload with the new CRL");
    // A new CRL is not a new trust policy: the session still resumes (no certificate check
    // in the handshake), and the request on it is refused by the CRL in force.
    let resumed_before = lab.metric("seg_tls_handshakes_total{result=\"resumed\"}");
    let r = resuming
        .post(&eas_target("Sync", "alice"))
        .await
        .expect("a resumed connection");
    assert_eq!(r.status, 403);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(
        lab.metric("seg_tls_handshakes_total{result=\"resumed\"}"),
        resumed_before + 1.0
    );
}

#[tokio::test]
async fn an_expired_crl_refuses_new_handshakes_and_fails_readiness() {
    let lab = RevocationLab::start(2).await;
    let bob = lab.device("bob", &lab.bob);
    let client = lab.client();
    let r = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Not "unknown CA" (the device's CA is known): its revocation status is not.
    support::lab::assert_alert(
        client
            .post(Some(&bob), &eas_target("Sync", "bob"), &[])
            .await,
        "CertificateUnknown",
        "stale CRL",
    );
    assert!(lab.metric("seg_tls_handshakes_total{result=\"revocation_list_expired\"}") >= 1.0);
    // `seg check-config` names the stale CRL by its key, before a restart meets it.
    let app = seg::App::build(Config::load(&lab.config_path).unwrap()).unwrap();
    let warnings = app.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.starts_with("tls.crl_files[0]: ") && w.contains("past its nextUpdate")),
        "{warnings:?}"
    );
    support::lab::wait_for_readyz(
        lab.seg.admin_addr,
        "HTTP/1.1 503",
        "crl",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(lab.metric("seg_crls_stale"), 1.0);
    // A fresh CRL, reloaded: served again, ready again.
    lab.ca.write_crl(&lab.crl, 3600);
    lab.seg.reload_file(&lab.config_path).unwrap();
    let r = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// A delta CRL in `tls.crl_files` beside its base (one PEM file holding both): the device
/// it lists is refused at the handshake with `certificate_revoked` and on its open
/// connection; once the delta is past its nextUpdate, its CA's devices are refused as with a
/// stale base, and readiness fails.
#[tokio::test]
async fn a_delta_crl_revokes_beside_its_base_and_its_staleness_refuses() {
    let lab = RevocationLab::start(3600).await;
    let base_number = lab.ca.next_crl_number() - 1;
    let (alice, bob) = (lab.device("alice", &lab.alice), lab.device("bob", &lab.bob));
    let client = lab.client();
    let mut held = served_alice(&client, &alice).await;

    lab.ca.revoke(&lab.alice);
    let delta = lab.pki.dir.path().join("delta.pem");
    lab.ca.write_delta_crl(&delta, 3, base_number);
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&lab.crl).unwrap(),
        std::fs::read_to_string(&delta).unwrap()
    );
    std::fs::write(&lab.crl, both).unwrap();
    lab.seg.reload_file(&lab.config_path).unwrap();
    assert_refused_and_closed(&mut held).await;
    support::lab::assert_alert(
        client
            .post(Some(&alice), &eas_target("Sync", "alice"), &[])
            .await,
        "CertificateRevoked",
        "listed by the delta only",
    );
    let r = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "bob is in neither");

    // The delta lapses; the base is still fresh.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    support::lab::assert_alert(
        client
            .post(Some(&bob), &eas_target("Sync", "bob"), &[])
            .await,
        "CertificateUnknown",
        "the delta is past its nextUpdate",
    );
    support::lab::wait_for_readyz(
        lab.seg.admin_addr,
        "HTTP/1.1 503",
        "crl",
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test]
async fn a_broken_reload_keeps_the_old_configuration_serving() {
    let lab = RevocationLab::start(3600).await;
    let bob = lab.device("bob", &lab.bob);
    let client = lab.client();
    let mut held = client.connect(Some(&bob), TlsVersion::Any).await.unwrap();
    assert_eq!(
        held.request("POST", &eas_target("Sync", "bob"), &[], b"")
            .await
            .unwrap()
            .status,
        200
    );

    let good_ca = std::fs::read(&lab.ca.cert).unwrap();
    std::fs::write(
        &lab.ca.cert,
        b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let error = lab
        .seg
        .reload_file(&lab.config_path)
        .expect_err("a broken CA file must be refused");
    assert!(error.to_string().contains("tls.client_ca"), "{error}");
    assert_eq!(
        lab.metric("seg_config_reload_total{result=\"failure\"}"),
        1.0
    );
    // Old configuration: the open connection and new handshakes both still work.
    assert_eq!(
        held.request("POST", &eas_target("Sync", "bob"), &[], b"")
            .await
            .unwrap()
            .status,
        200
    );
    let r = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // A reload that would need a restart is refused too.
    let moved = std::fs::read_to_string(&lab.config_path)
        .unwrap()
        .replace("handshake_timeout = \"5s\"", "handshake_timeout = \"6s\"");
    std::fs::write(&lab.ca.cert, good_ca).unwrap();
    std::fs::write(&lab.config_path, moved).unwrap();
    let error = lab
        .seg
        .reload_file(&lab.config_path)
        .expect_err("[listen] changes need a restart");
    assert!(error.to_string().contains("restart"), "{error}");
}

/// The binary reloads on SIGHUP and when a watched file (the CRL) changes.
#[tokio::test]
async fn the_binary_reloads_on_sighup_and_on_a_changed_crl() {
    use std::io::BufRead;
    let lab = RevocationLab::start(3600).await;
    let text =
        std::fs::read_to_string(&lab.config_path).unwrap() + "\n[reload]\nwatch_files = false\n";
    let config = lab.pki.dir.write("binary.toml", &text);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_seg"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("SEG_LOG", "info,seg::audit=off")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let listen: std::net::SocketAddr = loop {
        let line = lines.next().expect("seg printed nothing").unwrap();
        if let Some(start) = line.find("\"listen_addr\":\"") {
            let rest = &line[start + 15..];
            break rest[..rest.find('"').unwrap()].parse().unwrap();
        }
    };
    let pid = child.id().to_string();
    let client = Client::new(listen, &lab.pki.ca_path);
    let alice = lab.device("alice", &lab.alice);
    let bob = lab.device("bob", &lab.bob);
    assert_eq!(
        client
            .post(Some(&alice), &eas_target("Sync", "alice"), &[])
            .await
            .unwrap()
            .status,
        200
    );
    let mut held = client.connect(Some(&bob), TlsVersion::Any).await.unwrap();
    assert_eq!(
        held.request("POST", &eas_target("Sync", "bob"), &[], b"")
            .await
            .unwrap()
            .status,
        200
    );

    // SIGHUP: alice revoked.
    lab.ca.revoke(&lab.alice);
    lab.ca.write_crl(&lab.crl, 3600);
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let mut refused = false;
    for _ in 0..50 {
        if client
            .post(Some(&alice), &eas_target("Sync", "alice"), &[])
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "SIGHUP did not bring in the new CRL");

    // Watched files: turn watching on with a short interval by reloading once more, then a
    // new CRL revoking bob is picked up on its own; bob's open connection is refused.
    let watching = text.replace(
        "watch_files = false",
        "watch_files = true\nwatch_interval = \"200ms\"",
    );
    std::fs::write(&config, watching).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    lab.ca.revoke(&lab.bob);
    lab.ca.write_crl(&lab.crl, 3600);
    let mut status = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = match held
            .request("POST", &eas_target("Sync", "bob"), &[], b"")
            .await
        {
            Ok(r) => r.status,
            Err(_) => break,
        };
        if status == 403 {
            break;
        }
    }
    assert_eq!(status, 403, "the changed CRL was not picked up");
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

/// A rotated bind password (a changed file, same configuration text) is picked up by a
/// reload, and the identity cache survives it.
#[tokio::test]
async fn a_rotated_bind_password_is_used_after_reload_and_the_cache_is_kept() {
    let users = ["alice", "bob"]
        .into_iter()
        .map(UserSpec::with_upn)
        .collect();
    let mut lab = support::lab::Lab::start(users, "").await;
    let alice = lab
        .pki
        .device(seg::demo::pki::LeafSpec::device("alice").upn("alice@corp.test"));
    let bob = lab
        .pki
        .device(seg::demo::pki::LeafSpec::device("bob").upn("bob@corp.test"));
    let client = lab.client();
    assert_eq!(
        client
            .post(Some(&alice), &eas_target("Sync", "alice"), &[])
            .await
            .unwrap()
            .status,
        200
    );

    lab.slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: userPassword\nuserPassword: rotated-password\n",
        lab.slapd.bind_dn()
    ));
    lab.pki.dir.write("bind-password", "rotated-password\n");
    lab.seg.reload_file(&lab.config_path).expect("reload");
    // New connections to the DC must bind with the new password.
    lab.slapd.restart();
    let r = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(
        r.status, 200,
        "the new directory did not bind with the rotated password"
    );
    let hits = lab.metric("seg_identity_cache_lookups_total{result=\"hit\"}");
    assert_eq!(
        client
            .post(Some(&alice), &eas_target("Sync", "alice"), &[])
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        lab.metric("seg_identity_cache_lookups_total{result=\"hit\"}"),
        hits + 1.0,
        "the cache was lost"
    );
}

/// seg in front of the devices of an OpenSSL CA, with a `[revocation]` section and no CRL
/// file: OCSP and distribution-point CRLs are the only revocation sources.
struct OnlineLab {
    pki: Pki,
    config_path: std::path::PathBuf,
    seg: seg::Running,
    _slapd: support::slapd::Slapd,
    _upstream: seg::demo::echo::EchoUpstream,
}

impl OnlineLab {
    async fn start(
        ca: &OpensslCa,
        devices: &[(&str, &IssuedDevice)],
        revocation: &str,
    ) -> OnlineLab {
        let pki = Pki::new();
        let users = mapped_users(devices);
        let slapd = start_slapd(&pki, users);
        let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
        let text = config_text(
            &pki,
            &directory,
            upstream.addr,
            &format!("\n[revocation]\n{revocation}\n"),
        );
        let text = support::lab::trusting(&text, &pki, &ca.cert);
        let config_path = pki.dir.write("seg.toml", &text);
        let seg = support::lab::start_seg(&config_path).await;
        OnlineLab {
            pki,
            config_path,
            seg,
            _slapd: slapd,
            _upstream: upstream,
        }
    }

    fn client(&self) -> Client {
        Client::new(self.seg.listen_addr, &self.pki.ca_path)
    }

    fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.seg.metrics.render(), sample)
    }

    /// Reloads with `edit` applied to the configuration text.
    fn reload_with(&self, edit: impl Fn(&str) -> String) {
        let text = edit(&std::fs::read_to_string(&self.config_path).unwrap());
        std::fs::write(&self.config_path, text).unwrap();
        self.seg.reload_file(&self.config_path).expect("reload");
    }
}

fn device(issued: &IssuedDevice, name: &str) -> Device {
    Device::from_files(name, &issued.cert, &issued.key)
}

/// OCSP through a delegated responder certificate: good → forwarded (and cached); after
/// `openssl ca -revoke` and the cache lifetime, the device's next request on its open
/// keep-alive connection gets 403 and the connection closes.
#[tokio::test]
async fn ocsp_good_is_forwarded_and_a_revocation_reaches_the_open_connection() {
    let ca = OpensslCa::new("Corp Test", "Corp Test Issuing CA");
    let port = support::openssl_ca::free_port();
    let aia = format!("authorityInfoAccess = OCSP;URI:http://127.0.0.1:{port}");
    let alice = ca.issue_device("alice", &aia);
    let bob = ca.issue_device("bob", &aia);
    let signer = ca.issue_ocsp_signer("ocsp-responder");
    let mut responder = OcspResponder::start(&ca, port, Some(&signer));
    let lab = OnlineLab::start(
        &ca,
        &[("alice", &alice), ("bob", &bob)],
        "ocsp = true\nocsp_max_age = \"1s\"",
    )
    .await;
    let client = lab.client();
    let mut held = client
        .connect(Some(&device(&alice, "alice")), TlsVersion::Any)
        .await
        .unwrap();
    for _ in 0..2 {
        let r = held
            .request("POST", &eas_target("Sync", "alice"), &[], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        lab.metric("seg_ocsp_responses_total{result=\"good\"}"),
        1.0,
        "the second request must be answered from the cache"
    );
    assert_eq!(lab.metric("seg_ocsp_request_duration_seconds_count"), 1.0);

    ca.revoke(&alice);
    // `openssl ocsp` (3.0) reads index.txt once at start: restart it to serve the revocation.
    responder.restart();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_refused_and_closed(&mut held).await;
    assert_eq!(
        lab.metric("seg_ocsp_responses_total{result=\"revoked\"}"),
        1.0
    );
    // Bob, not revoked, still syncs.
    let r = client
        .post(Some(&device(&bob, "bob")), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
}

/// Answers signed by the CA itself; the responder down → 503 + Retry-After (hard fail);
/// `danger_ocsp_soft_fail` opted in → forwarded and counted.
#[tokio::test]
async fn an_unreachable_ocsp_responder_fails_hard_unless_soft_fail_is_opted_in() {
    let ca = OpensslCa::new("Corp Test", "Corp Test Issuing CA");
    let port = support::openssl_ca::free_port();
    let bob = ca.issue_device(
        "bob",
        &format!("authorityInfoAccess = OCSP;URI:http://127.0.0.1:{port}"),
    );
    let mut responder = OcspResponder::start(&ca, port, None);
    let lab = OnlineLab::start(
        &ca,
        &[("bob", &bob)],
        "ocsp = true\nocsp_max_age = \"1s\"\nocsp_timeout = \"2s\"",
    )
    .await;
    let client = lab.client();
    let bob = device(&bob, "bob");
    let r = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "a CA-signed good answer");
    assert_eq!(lab.metric("seg_ocsp_responses_total{result=\"good\"}"), 1.0);

    responder.stop();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("30"));
    assert_eq!(
        lab.metric("seg_ocsp_responses_total{result=\"unavailable\"}"),
        1.0
    );

    lab.reload_with(|text| {
        text.replace("ocsp = true", "ocsp = true\ndanger_ocsp_soft_fail = true")
    });
    let r = client
        .post(Some(&bob), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "soft fail admits");
    assert_eq!(
        lab.metric("seg_revocation_soft_fail_total{check=\"ocsp\"}"),
        1.0
    );
}

/// CRLs from an HTTP distribution point: a revoked device is refused on its first request
/// (the CRL is fetched then) and at the handshake afterwards; a new `-gencrl` is fetched in
/// the background ahead of nextUpdate and reaches an open connection; once the
/// distribution point stops answering and the CRL lapses, `/readyz` fails.
#[tokio::test]
async fn crls_from_a_distribution_point_are_fetched_refreshed_and_enforced() {
    let ca = OpensslCa::new("Corp Test", "Corp Test Issuing CA");
    let published = support::lab::TempDir::new("distribution-point");
    let server = FileServer::start(published.path()).await;
    let cdp = format!("crlDistributionPoints = URI:http://{}/ca.crl", server.addr);
    let alice = ca.issue_device("alice", &cdp);
    let bob = ca.issue_device("bob", &cdp);
    ca.revoke(&alice);
    let crl = published.path().join("ca.crl");
    ca.write_crl_der(&crl, 6);
    let lab = OnlineLab::start(
        &ca,
        &[("alice", &alice), ("bob", &bob)],
        "crl_distribution_points = true",
    )
    .await;
    let client = lab.client();
    let (alice, issued_bob) = (device(&alice, "alice"), bob);
    let bob = device(&issued_bob, "bob");

    // No CRL yet: the handshake passes, the request waits for the CRL and is refused.
    let mut held = client.connect(Some(&alice), TlsVersion::Any).await.unwrap();
    let r = held
        .request("POST", &eas_target("Sync", "alice"), &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(lab.metric("seg_crl_fetches_total{result=\"ok\"}"), 1.0);
    // The verifier has it now: a new handshake is refused.
    support::lab::assert_alert(
        client
            .post(Some(&alice), &eas_target("Sync", "alice"), &[])
            .await,
        "CertificateRevoked",
        "revoked by the fetched CRL",
    );
    assert!(lab.metric("seg_tls_handshakes_total{result=\"certificate_revoked\"}") >= 1.0);
    let mut bob_held = client.connect(Some(&bob), TlsVersion::Any).await.unwrap();
    let r = bob_held
        .request("POST", &eas_target("Sync", "bob"), &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let source = format!("source=\"http://{}/ca.crl\"", server.addr);
    assert!(
        lab.seg.metrics.render().contains(&source),
        "the CRL gauges name the URL"
    );

    // Bob revoked, a new CRL published: the background refresh (at 80 % of its 6 s) brings
    // it to bob's open connection without any reload.
    ca.revoke(&issued_bob);
    ca.write_crl_der(&crl, 6);
    let status = bob_held
        .post_while(&eas_target("Sync", "bob"), 200, 60)
        .await;
    assert_eq!(
        status, 403,
        "the refreshed CRL did not reach the open connection"
    );
    assert!(lab.metric("seg_crl_fetches_total{result=\"ok\"}") >= 2.0);
    assert_eq!(
        lab.metric("seg_config_reload_total{result=\"success\"}"),
        0.0,
        "no reload was involved"
    );

    // The distribution point goes away: the CRL in force stays until it lapses, then
    // readiness fails and the staleness is reported.
    drop(server);
    support::lab::wait_for_readyz(
        lab.seg.admin_addr,
        "HTTP/1.1 503",
        "crl",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(lab.metric("seg_crls_stale"), 1.0);
    assert!(lab.metric("seg_crl_fetches_total{result=\"unavailable\"}") >= 1.0);
}

/// A device whose distribution point is an ldap:// URL of a host seg does not bind to is
/// reported as unsupported and refused (no CRL of its issuer); one whose distribution point
/// does not answer is refused with 503 until soft fail is opted in; an ldap:// `crl_urls`
/// entry naming such a host is a configuration error.
#[tokio::test]
async fn unsupported_and_unreachable_distribution_points_fail_hard() {
    let ca = OpensslCa::new("Corp Test", "Corp Test Issuing CA");
    let carol = ca.issue_device(
        "carol",
        "crlDistributionPoints = URI:ldap://dc1.corp.test/cn=cdp?certificateRevocationList",
    );
    let closed = support::openssl_ca::free_port();
    let dave = ca.issue_device(
        "dave",
        &format!("crlDistributionPoints = URI:http://127.0.0.1:{closed}/ca.crl"),
    );
    let lab = OnlineLab::start(
        &ca,
        &[("carol", &carol), ("dave", &dave)],
        "crl_distribution_points = true\ncrl_fetch_timeout = \"2s\"",
    )
    .await;
    let client = lab.client();
    let (carol, dave) = (device(&carol, "carol"), device(&dave, "dave"));
    let r = client
        .post(Some(&carol), &eas_target("Sync", "carol"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        lab.metric("seg_crl_fetches_total{result=\"unsupported\"}"),
        1.0
    );
    let r = client
        .post(Some(&dave), &eas_target("Sync", "dave"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("30"));
    assert!(lab.metric("seg_crl_fetches_total{result=\"unavailable\"}") >= 1.0);

    lab.reload_with(|text| {
        text.replace(
            "crl_distribution_points = true",
            "crl_distribution_points = true\ndanger_crl_fetch_soft_fail = true",
        )
    });
    let r = client
        .post(Some(&dave), &eas_target("Sync", "dave"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "soft fail admits");
    assert_eq!(
        lab.metric("seg_revocation_soft_fail_total{check=\"crl_distribution_point\"}"),
        1.0
    );

    let text = std::fs::read_to_string(&lab.config_path).unwrap().replace(
        "crl_distribution_points = true",
        "crl_distribution_points = true\ncrl_urls = [\"ldap://dc1.corp.test/CN=CDP?certificateRevocationList\"]",
    );
    let error = Config::parse(&text, lab.pki.dir.path(), "seg.toml").unwrap_err();
    let problem = error
        .problems
        .iter()
        .find(|p| p.key == "revocation.crl_urls[0]")
        .unwrap_or_else(|| panic!("no problem at revocation.crl_urls[0]: {error}"));
    assert!(
        problem.message.contains("not one of directory.urls"),
        "{}",
        problem.message
    );
}
