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
    /// The TLS handshake (or the first read after it) fails: the reason code of seg's
    /// "handshake refused" record and the TLS alert the device receives (RFC 8446 §6.2).
    Refused {
        reason: &'static str,
        alert: &'static str,
    },
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
    /// `openssl ca -startdate/-enddate`, when not the CA's default validity.
    dates: Option<(&'static str, &'static str)>,
    outcome: Outcome,
}

fn row(name: &'static str, subject: &str, extensions: String, outcome: Outcome) -> Row {
    Row {
        name,
        subject: subject.to_string(),
        key: "ec",
        digest: "sha256",
        extensions,
        dates: None,
        outcome,
    }
}

const fn refused(reason: &'static str, alert: &'static str) -> Outcome {
    Outcome::Refused { reason, alert }
}

/// The alert's name from OpenSSL's "SSL alert number N".
fn alert_name(number: u8) -> &'static str {
    match number {
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        116 => "certificate_required",
        _ => "other",
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
            refused("certificate-is-a-ca", "bad_certificate"),
        ),
        row(
            "no-eku",
            "/CN=alice",
            format!("{DEVICE}subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@corp.test\n"),
            refused("certificate-wrong-purpose", "unsupported_certificate"),
        ),
        row(
            "server-auth-only",
            "/CN=alice",
            format!("{DEVICE}extendedKeyUsage = serverAuth\nsubjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@corp.test\n"),
            refused("certificate-wrong-purpose", "unsupported_certificate"),
        ),
        row(
            "email-protection-only",
            "/CN=alice",
            format!("{DEVICE}extendedKeyUsage = emailProtection\nsubjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@corp.test\n"),
            refused("certificate-wrong-purpose", "unsupported_certificate"),
        ),
        row(
            "any-eku-only",
            "/CN=alice",
            format!("{DEVICE}extendedKeyUsage = anyExtendedKeyUsage\nsubjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@corp.test\n"),
            refused("certificate-wrong-purpose", "unsupported_certificate"),
        ),
        row(
            "critical-unknown-extension",
            "/CN=alice",
            format!("{}1.3.6.1.4.1.55555.1 = critical,ASN1:UTF8String:x\n", upn_san("alice@corp.test")),
            refused("certificate-malformed", "bad_certificate"),
        ),
        Row {
            name: "sha1-signature",
            subject: "/CN=alice".into(),
            key: "ec",
            digest: "sha1",
            extensions: upn_san("alice@corp.test"),
            dates: None,
            outcome: refused("certificate-unsupported-algorithm", "unsupported_certificate"),
        },
        Row {
            name: "rsa-1024",
            subject: "/CN=alice".into(),
            key: "rsa:1024",
            digest: "sha256",
            extensions: upn_san("alice@corp.test"),
            dates: None,
            outcome: refused("certificate-key-too-small", "unsupported_certificate"),
        },
        // Outside its validity: only a certificate past its notAfter is "expired".
        Row {
            dates: Some(("20200101000000Z", "20210101000000Z")),
            ..row(
                "expired",
                "/CN=alice",
                upn_san("alice@corp.test"),
                refused("certificate-expired", "certificate_expired"),
            )
        },
        Row {
            dates: Some(("20990101000000Z", "20991231000000Z")),
            ..row(
                "not-yet-valid",
                "/CN=alice",
                upn_san("alice@corp.test"),
                refused("certificate-not-yet-valid", "bad_certificate"),
            )
        },
    ]
}

/// What OpenSSL saw: the response's status, if one came, and the alert seg sent, if any.
struct Presented {
    status: Option<u16>,
    alert: Option<&'static str>,
}

/// One request over a fresh connection with the row's certificate, presented by OpenSSL
/// (`s_client`, its security level lowered so every refusal is seg's: rustls would not even
/// load some of these certificates and keys).
/// `present` off the runtime seg runs on (the test's single thread).
async fn present_blocking(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
    issued: IssuedDevice,
) -> Presented {
    let ca = ca.to_path_buf();
    tokio::task::spawn_blocking(move || present(addr, &ca, &issued))
        .await
        .expect("openssl client")
}

fn present(addr: std::net::SocketAddr, ca: &std::path::Path, issued: &IssuedDevice) -> Presented {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-connect",
            &addr.to_string(),
            "-servername",
            "mail.corp.test",
            "-CAfile",
            ca.to_str().unwrap(),
            "-cert",
            issued.cert.to_str().unwrap(),
            "-key",
            issued.key.to_str().unwrap(),
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    let out = child.wait_with_output().expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text
        .lines()
        .find(|l| l.starts_with("HTTP/1.1 "))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok());
    let errors = String::from_utf8_lossy(&out.stderr);
    let alert = errors
        .split("SSL alert number ")
        .nth(1)
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .map(alert_name);
    Presented { status, alert }
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
    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
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
        let issued = match row.dates {
            Some((start, end)) => {
                ca.issue_dated(row.name, &row.subject, start, end, &row.extensions)
            }
            None => ca.issue_custom(row.name, &row.subject, row.key, row.digest, &row.extensions),
        };
        let before = upstream.requests().len();
        let records_before = log_records("handshake refused").len();
        let presented = present_blocking(seg.listen_addr, &pki.ca_path, issued).await;
        let forwarded = &upstream.requests()[before..];
        let seen: Vec<String> = forwarded
            .iter()
            .flat_map(|r| {
                r.header_values("x-remote-user")
                    .into_iter()
                    .map(str::to_string)
            })
            .collect();
        // Every refused handshake is explained: one record naming the certificate, the
        // name the device asked for, and why.
        let records = log_records("handshake refused");
        let record = records[records_before.min(records.len())..]
            .iter()
            .find(|r| !r["subject"].as_str().unwrap_or("").is_empty());
        let got = match (presented.status, forwarded.len()) {
            (None, 0) => {
                let Some(record) = record else {
                    failures.push(format!(
                        "{}: refused without a \"handshake refused\" record naming the certificate: {:?}",
                        row.name,
                        &records[records_before.min(records.len())..]
                    ));
                    continue;
                };
                if record["sni"] != "mail.corp.test" {
                    failures.push(format!("{}: the record lacks the SNI: {record}", row.name));
                }
                let reason = match row.outcome {
                    Outcome::Refused { reason, .. } if record["reason"] == reason => reason,
                    _ => "(another reason)",
                };
                if reason == "(another reason)" {
                    failures.push(format!("{}: record {record}", row.name));
                }
                let alert = match (row.outcome, presented.alert) {
                    (Outcome::Refused { alert, .. }, Some(sent)) if sent == alert => alert,
                    (_, sent) => {
                        failures.push(format!("{}: the device got alert {sent:?}", row.name));
                        "(another alert)"
                    }
                };
                Outcome::Refused { reason, alert }
            }
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
    let presented = present_blocking(seg.listen_addr, &pki.ca_path, issued).await;
    if presented.status.is_some() {
        failures.push("sibling-ca: the handshake succeeded".into());
    }
    if presented.alert != Some("unknown_ca") {
        failures.push(format!("sibling-ca: alert {:?}", presented.alert));
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
