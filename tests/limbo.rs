//! x509-limbo: every case of the C2SP test vectors, run through the validation seg really
//! uses. CLIENT cases go through `seg::tls::ClientCertPolicy` (the listener's verifier, with
//! its extra clientAuth-EKU requirement); SERVER cases through `seg::tls::upstream_verifier`
//! (the verifier toward an https:// upstream). A case whose verdict differs from the expected
//! one is a divergence and must be listed, with a one-line reason, in
//! `tests/limbo-divergences.txt`; the test fails on a new divergence and on a listed one that
//! now agrees, so the file stays exact.
//!
//! The vectors live outside the repository, in `../shared/x509-limbo/limbo.json`; without
//! them the test fails, it never skips.
//!
//! Mapping of the case fields:
//! - `validation_time`: the `now` handed to the verifier (null: the current time).
//! - `trusted_certs`: CLIENT, a PEM file named by `tls.client_ca`; SERVER, the
//!   `RootCertStore` given to `upstream_verifier`. A trust anchor rustls refuses makes seg
//!   refuse the configuration, which counts as a rejection.
//! - `crls`: CLIENT, PEM files named by `tls.crl_files`, with `tls.crl_check_chain = true`
//!   (a limbo CRL may come from any CA of the chain, and checking the whole chain is what the
//!   case asks) and unknown revocation status refused. SERVER: ignored, seg's upstream
//!   verifier has no CRLs.
//! - `expected_peer_name`: SERVER, the `ServerName` (DNS or IP). CLIENT: not checked, seg's
//!   client policy validates the chain only (names are mapped to accounts later).
//! - `extended_key_usage`: rustls fixes it by direction (serverAuth toward the upstream,
//!   clientAuth for devices), which is what every case here asks of its direction.
//! - `max_chain_depth`, `key_usage`, `signature_algorithms`, `features`: nothing in seg or
//!   rustls expresses them; the case runs anyway and a differing verdict is a divergence.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use serde::Deserialize;

const LIMBO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/x509-limbo/limbo.json"
);
const DIVERGENCES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/limbo-divergences.txt");

#[derive(Deserialize)]
struct Limbo {
    version: u32,
    testcases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    id: String,
    validation_kind: Kind,
    trusted_certs: Vec<String>,
    untrusted_intermediates: Vec<String>,
    peer_certificate: String,
    validation_time: Option<String>,
    expected_result: Expected,
    expected_peer_name: Option<PeerName>,
    crls: Vec<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "UPPERCASE")]
enum Kind {
    Server,
    Client,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "UPPERCASE")]
enum Expected {
    Success,
    Failure,
}

#[derive(Deserialize)]
struct PeerName {
    kind: String,
    value: String,
}

/// What seg made of a case.
enum Verdict {
    Accept,
    Reject(String),
    /// seg cannot even pose the question the case asks.
    Inexpressible(String),
}

impl Verdict {
    fn agrees(&self, expected: Expected) -> bool {
        matches!(
            (self, expected),
            (Verdict::Accept, Expected::Success) | (Verdict::Reject(_), Expected::Failure)
        )
    }

    fn describe(&self) -> String {
        match self {
            Verdict::Accept => "accepted".to_string(),
            Verdict::Reject(why) => format!("rejected: {why}"),
            Verdict::Inexpressible(why) => format!("cannot be expressed: {why}"),
        }
    }
}

#[test]
fn limbo() {
    let text = std::fs::read_to_string(LIMBO).unwrap_or_else(|e| {
        panic!(
            "the x509-limbo vectors are missing: expected limbo.json at {LIMBO} \
             (../shared/x509-limbo/ next to the repository root): {e}"
        )
    });
    let limbo: Limbo = serde_json::from_str(&text).expect("limbo.json does not parse");
    assert_eq!(limbo.version, 1, "limbo.json: unknown schema version");
    assert!(!limbo.testcases.is_empty(), "limbo.json holds no case");

    let listed = read_divergences();
    let scratch = Scratch::new();

    let mut diverging: BTreeMap<&str, (Kind, Expected, String)> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for (index, case) in limbo.testcases.iter().enumerate() {
        assert!(
            ids.insert(case.id.as_str()),
            "duplicate case id {}",
            case.id
        );
        let verdict = match case.validation_kind {
            Kind::Client => run_client(case, &scratch.dir.join(index.to_string())),
            Kind::Server => run_server(case),
        };
        if !verdict.agrees(case.expected_result) {
            diverging.insert(
                &case.id,
                (
                    case.validation_kind,
                    case.expected_result,
                    verdict.describe(),
                ),
            );
        }
    }

    let total = limbo.testcases.len();
    let client = diverging
        .values()
        .filter(|(kind, ..)| *kind == Kind::Client)
        .count();
    let server = diverging.len() - client;
    for (id, (kind, expected, got)) in &diverging {
        println!("diverge {id} ({kind:?}, expected {expected:?}): {got}");
    }
    println!(
        "limbo: {total} cases, {} agree, {} diverge ({client} client, {server} server)",
        total - diverging.len(),
        diverging.len()
    );

    let new: Vec<String> = diverging
        .iter()
        .filter(|(id, _)| !listed.contains_key(**id))
        .map(|(id, (kind, expected, got))| {
            format!("  {id} ({kind:?}, expected {expected:?}): {got}")
        })
        .collect();
    let stale: Vec<String> = listed
        .keys()
        .filter(|id| !diverging.contains_key(id.as_str()))
        .map(|id| {
            if ids.contains(id.as_str()) {
                format!("  {id}: now agrees with the expected result")
            } else {
                format!("  {id}: no such case in limbo.json")
            }
        })
        .collect();
    let mut problems = String::new();
    if !new.is_empty() {
        problems += &format!(
            "new divergences, not in tests/limbo-divergences.txt:\n{}\n",
            new.join("\n")
        );
    }
    if !stale.is_empty() {
        problems += &format!(
            "stale entries in tests/limbo-divergences.txt:\n{}\n",
            stale.join("\n")
        );
    }
    assert!(problems.is_empty(), "{problems}");
}

/// The listed divergences: `<id> <reason>` per line, `#` comments and blank lines allowed.
fn read_divergences() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(DIVERGENCES)
        .unwrap_or_else(|e| panic!("cannot read {DIVERGENCES}: {e}"));
    let mut listed = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (id, reason) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        assert!(
            !reason.trim().is_empty(),
            "limbo-divergences.txt:{}: {id} has no reason",
            number + 1
        );
        assert!(
            listed
                .insert(id.to_string(), reason.trim().to_string())
                .is_none(),
            "limbo-divergences.txt:{}: {id} listed twice",
            number + 1
        );
    }
    listed
}

/// A device presenting the case's chain to seg's listener.
fn run_client(case: &Case, dir: &Path) -> Verdict {
    std::fs::create_dir_all(dir).expect("create the case directory");
    let client_ca = dir.join("client_ca.pem");
    std::fs::write(&client_ca, case.trusted_certs.join("\n")).expect("write client_ca");
    let mut crl_files = Vec::new();
    for (n, crl) in case.crls.iter().enumerate() {
        let path = dir.join(format!("crl{n}.pem"));
        std::fs::write(&path, crl).expect("write a CRL");
        crl_files.push(path);
    }
    let config = seg::config::TlsConfig {
        // Never read by the client policy.
        certificate: dir.join("unused-server.pem"),
        private_key: dir.join("unused-server.key"),
        client_ca,
        crl_files: crl_files.clone(),
        crl_check_chain: true,
        danger_allow_unknown_revocation_status: false,
        self_test_certificate: None,
        session_ticket_key_file: None,
        session_lifetime: std::time::Duration::from_secs(6 * 3600),
    };
    let revocation = match seg::revocation::RevocationList::load(&crl_files) {
        Ok(list) => list,
        Err(e) => return Verdict::Reject(format!("configuration refused: {e}")),
    };
    let policy = match seg::tls::ClientCertPolicy::new(&config, &revocation) {
        Ok(policy) => policy,
        Err(e) => return Verdict::Reject(format!("configuration refused: {e}")),
    };
    let (leaf, intermediates) = match chain(case) {
        Ok(chain) => chain,
        Err(e) => return Verdict::Reject(e),
    };
    match policy.verify_client_cert(&leaf, &intermediates, validation_time(case)) {
        Ok(_) => Verdict::Accept,
        Err(e) => Verdict::Reject(e.to_string()),
    }
}

/// seg connecting to an https:// upstream that presents the case's chain.
fn run_server(case: &Case) -> Verdict {
    let name = match &case.expected_peer_name {
        None => {
            return Verdict::Inexpressible(
                "no expected peer name; rustls always verifies the server's name".to_string(),
            )
        }
        Some(name) => name,
    };
    let server_name: ServerName<'static> = match name.kind.as_str() {
        "DNS" => match ServerName::try_from(name.value.clone()) {
            Ok(server_name) => server_name,
            Err(e) => {
                return Verdict::Inexpressible(format!("DNS name {:?}: {e}", name.value));
            }
        },
        "IP" => match name.value.parse::<std::net::IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(e) => return Verdict::Inexpressible(format!("IP {:?}: {e}", name.value)),
        },
        other => {
            return Verdict::Inexpressible(format!("peer name kind {other} is not a ServerName"))
        }
    };
    // As `Upstream::new` does: every certificate of `upstream.ca_file` must be usable.
    let mut roots = rustls::RootCertStore::empty();
    for pem in &case.trusted_certs {
        let added = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|cert| roots.add(cert).map_err(|e| e.to_string()));
        if let Err(e) = added {
            return Verdict::Reject(format!("configuration refused: {e}"));
        }
    }
    let verifier: Arc<WebPkiServerVerifier> = match seg::tls::upstream_verifier(roots) {
        Ok(verifier) => verifier,
        Err(e) => return Verdict::Reject(format!("configuration refused: {e}")),
    };
    let (leaf, intermediates) = match chain(case) {
        Ok(chain) => chain,
        Err(e) => return Verdict::Reject(e),
    };
    match verifier.verify_server_cert(
        &leaf,
        &intermediates,
        &server_name,
        &[],
        validation_time(case),
    ) {
        Ok(_) => Verdict::Accept,
        Err(e) => Verdict::Reject(e.to_string()),
    }
}

/// The peer's certificate and the untrusted intermediates it sends, as DER.
#[allow(clippy::type_complexity)]
fn chain(case: &Case) -> Result<(CertificateDer<'static>, Vec<CertificateDer<'static>>), String> {
    let der = |pem: &String| {
        CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("PEM: {e}"))
    };
    let leaf = der(&case.peer_certificate)?;
    let intermediates = case
        .untrusted_intermediates
        .iter()
        .map(der)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((leaf, intermediates))
}

fn validation_time(case: &Case) -> UnixTime {
    match &case.validation_time {
        None => UnixTime::now(),
        Some(text) => {
            let seconds = parse_rfc3339(text)
                .unwrap_or_else(|| panic!("{}: bad validation_time {text:?}", case.id));
            let seconds = u64::try_from(seconds)
                .unwrap_or_else(|_| panic!("{}: validation_time before 1970", case.id));
            UnixTime::since_unix_epoch(Duration::from_secs(seconds))
        }
    }
}

/// Seconds since the Unix epoch of an RFC 3339 date-time (`Z` or `±hh:mm`, fraction of a
/// second dropped).
fn parse_rfc3339(text: &str) -> Option<i64> {
    fn digits(part: Option<&str>) -> Option<i64> {
        let part = part?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    }
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| digits(text.get(range));
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't' | b' ')
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return None;
    }
    let local = seg::identity::unix_from_civil(
        number(0..4)?,
        number(5..7)?,
        number(8..10)?,
        number(11..13)?,
        number(14..16)?,
        number(17..19)?,
    )?;
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let count = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if count == 0 {
            return None;
        }
        rest = &fraction[count..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (hours, minutes) = (digits(rest.get(1..3))?, digits(rest.get(4..6))?);
            sign * (hours * 3600 + minutes * 60)
        }
        _ => return None,
    };
    Some(local - offset)
}

#[test]
fn rfc3339() {
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(parse_rfc3339("1970-01-01T00:00:03+00:00"), Some(3));
    assert_eq!(
        parse_rfc3339("2024-01-01T00:00:00+00:00"),
        Some(1_704_067_200)
    );
    assert_eq!(
        parse_rfc3339("2024-02-29T12:30:15.250Z"),
        Some(1_709_209_815)
    );
    assert_eq!(
        parse_rfc3339("2024-01-01T01:00:00+01:00"),
        Some(1_704_067_200)
    );
    assert_eq!(
        parse_rfc3339("2023-12-31T23:00:00-01:00"),
        Some(1_704_067_200)
    );
    assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
    assert_eq!(parse_rfc3339("2024-01-01"), None);
    assert_eq!(parse_rfc3339("2024-01-01T00:00:00"), None);
    assert_eq!(
        parse_rfc3339("2024-01-01T00:00:00.5+01:30"),
        Some(1_704_061_800)
    );
    assert_eq!(parse_rfc3339("2024-01-01T00:00:00+1:300"), None);
}

/// A per-run directory under cargo's scratch space for the CLIENT cases' files, removed at
/// the end.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("limbo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        Scratch { dir }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
