//! Hostile device certificates, end to end through real TLS handshakes: each row is issued by
//! a real OpenSSL CA (`openssl ca`, so keys, digests and extensions are exactly as written)
//! and presented to a running seg in front of a real slapd and the recording echo upstream.
//!
//! Every row either fails its handshake, or gets the status it should with exactly the
//! identity it should at the upstream — never an identity taken from text the device chose.

mod support;

use std::process::{Command, Stdio};

use seg::config::Config;
use support::audit::{capture_audit, log_records};
use support::lab::{config_text, eas_target, start_slapd, DirectoryRef, Pki};
use support::openssl_ca::{IssuedDevice, OpensslCa};
use support::slapd::UserSpec;

/// What a row must lead to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    /// The TLS handshake (or the first read after it) fails.
    Refused,
    /// A response with this status and nothing forwarded.
    Denied(u16),
    /// Forwarded, the upstream seeing exactly this identity.
    Forwarded(&'static str),
}

const DEVICE: &str = "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n";

fn device_with(extra: &str) -> String {
    format!("{DEVICE}extendedKeyUsage = clientAuth\n{extra}")
}

fn upn_san(upn: &str) -> String {
    device_with(&format!(
        "subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:{upn}\n"
    ))
}

struct Row {
    name: &'static str,
    subject: String,
    key: &'static str,
    digest: &'static str,
    extensions: String,
    outcome: Outcome,
}

fn row(name: &'static str, subject: &str, extensions: String, outcome: Outcome) -> Row {
    Row {
        name,
        subject: subject.to_string(),
        key: "ec",
        digest: "sha256",
        extensions,
        outcome,
    }
}

fn table() -> Vec<Row> {
    let long = format!("{}@corp.test", "a".repeat(4096));
    vec![
        // The control rows: the table can tell admission from refusal.
        row(
            "alice",
            "/CN=alice",
            upn_san("alice@corp.test"),
            Outcome::Forwarded("alice@corp.test"),
        ),
        // Names the device chose.
        row(
            "crlf-in-subject",
            "/CN=alice\r\nX-Remote-User: ceo@corp.test",
            device_with(""),
            Outcome::Denied(403),
        ),
        row(
            "crlf-in-upn",
            "/CN=mallory",
            upn_san("ceo@corp.test\\0D\\0AX-Remote-User: ceo@corp.test"),
            Outcome::Denied(403),
        ),
        row(
            "wildcard-upn",
            "/CN=mallory",
            upn_san("*@corp.test"),
            Outcome::Denied(403),
        ),
        row(
            "filter-injection-upn",
            "/CN=mallory",
            upn_san("x)(|(userPrincipalName=alice@corp.test)"),
            Outcome::Denied(403),
        ),
        row(
            "two-at-signs",
            "/CN=mallory",
            upn_san("alice@corp.test@corp.test"),
            Outcome::Denied(403),
        ),
        row("4kb-upn", "/CN=mallory", upn_san(&long), Outcome::Denied(403)),
        row(
            "cn-is-another-users-upn",
            "/CN=alice@corp.test",
            device_with("subjectAltName = email:mallory@corp.test\n"),
            Outcome::Denied(403),
        ),
        // Certificates that must not pass the handshake.
        row(
            "ca-as-leaf",
            "/CN=alice",
            "basicConstraints = critical,CA:TRUE\nkeyUsage = critical,digitalSignature,keyCertSign\nextendedKeyUsage = clientAuth\nsubjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@corp.test\n".into(),
            Outcome::Refused,
        ),
        row(
            "no-eku",
            "/CN=alice",
            format!("{DEVICE}subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@corp.test\n"),
            Outcome::Refused,
        ),
        row(
            "server-auth-only",
            "/CN=alice",
            format!("{DEVICE}extendedKeyUsage = serverAuth\nsubjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@corp.test\n"),
            Outcome::Refused,
        ),
        row(
            "email-protection-only",
            "/CN=alice",
            format!("{DEVICE}extendedKeyUsage = emailProtection\nsubjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@corp.test\n"),
            Outcome::Refused,
        ),
        row(
            "any-eku-only",
            "/CN=alice",
            format!("{DEVICE}extendedKeyUsage = anyExtendedKeyUsage\nsubjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@corp.test\n"),
            Outcome::Refused,
        ),
        row(
            "critical-unknown-extension",
            "/CN=alice",
            format!("{}1.3.6.1.4.1.55555.1 = critical,ASN1:UTF8String:x\n", upn_san("alice@corp.test")),
            Outcome::Refused,
        ),
        Row {
            name: "sha1-signature",
            subject: "/CN=alice".into(),
            key: "ec",
            digest: "sha1",
            extensions: upn_san("alice@corp.test"),
            outcome: Outcome::Refused,
        },
        Row {
            name: "rsa-1024",
            subject: "/CN=alice".into(),
            key: "rsa:1024",
            digest: "sha256",
            extensions: upn_san("alice@corp.test"),
            outcome: Outcome::Refused,
        },
    ]
}

/// One request over a fresh connection with the row's certificate, presented by OpenSSL
/// (`s_client`, its security level lowered so every refusal is seg's: rustls would not even
/// load some of these certificates and keys); `None` when the handshake or exchange fails.
/// `present` off the runtime seg runs on (the test's single thread).
async fn present_blocking(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    issued: IssuedDevice,
) -> Option<u16> {
    let ca = ca.to_path_buf();
    tokio::task::spawn_blocking(move || present(addr, &ca, &issued))
        .await
        .expect("openssl client")
}

fn present(addr: std::net::SocketAddr, ca: &std::path::Path, issued: &IssuedDevice) -> Option<u16> {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
            "-CAfile",
            ca.to_str()?,
            "-cert",
            issued.cert.to_str()?,
            "-key",
            issued.key.to_str()?,
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is needed: apt-get install openssl (./tests/run.sh installs it)");
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        eas_target("Sync", "alice")
    );
    use std::io::Write;
    // A refused handshake may close the pipe early: the answer (none) is in the output.
    if let Some(stdin) = child.stdin.as_mut() {
        let _ = stdin.write_all(request.as_bytes());
    }
    let out = child.wait_with_output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with("HTTP/1.1 "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
}

#[tokio::test]
async fn hostile_certificates_never_carry_an_identity_in() {
    capture_audit();
    let pki = Pki::new();
    let ca = OpensslCa::new("Corp Test", "Corp Test Issuing CA");
    let mut alice = UserSpec::new("alice");
    alice.upn = Some("alice@corp.test".into());
    // Older than her certificates: a weak mapping of a certificate issued before the account
    // existed is refused (certificate-predates-account).
    alice.when_created = Some("20200101000000.0Z".into());
    let mut ceo = UserSpec::new("ceo");
    ceo.upn = Some("ceo@corp.test".into());
    let mut mallory = UserSpec::new("mallory");
    mallory.upn = Some("mallory@corp.test".into());
    let slapd = start_slapd(&pki, vec![alice, ceo, mallory]);
    let upstream = seg::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
    // Trust the OpenSSL CA only; map by UPN (compatibility enforcement admits weak mappings,
    // so the table tests the names themselves, not the strong-mapping rule).
    let text = support::lab::trusting(
        &config_text(&pki, &directory, upstream.addr, ""),
        &pki,
        &ca.cert,
    );
    let config_path = pki.dir.write("seg.toml", &text);
    let seg = seg::App::build(Config::load(&config_path).unwrap())
        .unwrap()
        .start()
        .await
        .unwrap();

    let mut failures = Vec::new();
    let mut forwarded_expected = 0;
    for row in table() {
        let issued = ca.issue_custom(row.name, &row.subject, row.key, row.digest, &row.extensions);
        let before = upstream.requests().len();
        let records_before = log_records("handshake refused").len();
        let status = present_blocking(seg.listen_addr, &pki.ca_path, issued).await;
        let forwarded = &upstream.requests()[before..];
        let seen: Vec<String> = forwarded
            .iter()
            .flat_map(|r| {
                r.header_values("x-remote-user")
                    .into_iter()
                    .map(str::to_string)
            })
            .collect();
        let got = match (status, forwarded.len()) {
            (None, 0) => Outcome::Refused,
            (Some(200), 1) if seen.len() == 1 => match row.outcome {
                Outcome::Forwarded(who) if seen[0] == who => Outcome::Forwarded(who),
                _ => {
                    failures.push(format!("{}: forwarded as {seen:?}", row.name));
                    continue;
                }
            },
            (Some(code), 0) => Outcome::Denied(code),
            other => {
                failures.push(format!(
                    "{}: status {:?} with {} request(s) upstream carrying {seen:?}",
                    row.name, other.0, other.1
                ));
                continue;
            }
        };
        if matches!(row.outcome, Outcome::Forwarded(_)) {
            forwarded_expected += 1;
        }
        if got != row.outcome {
            failures.push(format!(
                "{}: expected {:?}, got {got:?}",
                row.name, row.outcome
            ));
        }
        // Every refused handshake is explained: one record naming the certificate and why.
        if got == Outcome::Refused {
            let records = log_records("handshake refused");
            let explained = records[records_before.min(records.len())..]
                .iter()
                .any(|r| {
                    let subject = r["subject"].as_str().unwrap_or("");
                    let reason = r["reason"].as_str().unwrap_or("");
                    !subject.is_empty() && !reason.is_empty() && reason != "io-error"
                });
            if !explained {
                failures.push(format!(
                    "{}: no \"handshake refused\" record naming the certificate: {:?}",
                    row.name,
                    &records[records_before.min(records.len())..]
                ));
            }
        }
    }
    // A sibling CA with the same name, not the one trusted.
    let sibling = OpensslCa::new("Corp Test", "Corp Test Issuing CA");
    let issued = sibling.issue_custom(
        "sibling",
        "/CN=alice",
        "ec",
        "sha256",
        &upn_san("alice@corp.test"),
    );
    let before = upstream.requests().len();
    if present_blocking(seg.listen_addr, &pki.ca_path, issued)
        .await
        .is_some()
    {
        failures.push("sibling-ca: the handshake succeeded".into());
    }
    assert_eq!(upstream.requests().len(), before, "sibling-ca: forwarded");
    let decisions: Vec<String> = seg
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("seg_identity_decisions_total"))
        .map(str::to_string)
        .collect();
    failures.extend((!failures.is_empty()).then(|| format!("identity decisions: {decisions:#?}")));
    assert!(
        failures.is_empty(),
        "hostile certificates:\n{}",
        failures.join("\n")
    );
    assert_eq!(upstream.requests().len(), forwarded_expected);
    seg.stop().await;
}
