//! The NTAuth store (issue 17): a certificate is a logon certificate only if the CA that
//! issued it is in the store, as a domain controller decides.
//!
//! The PKI is an enterprise root with two subordinates: the issuing CA for devices and a
//! web-server CA, its sibling. `tls.client_ca` holds the root and the issuing CA, as the
//! example configuration used to invite. The attacker's certificate comes from the web CA and
//! carries admin's UPN and admin's SID (which makes the mapping strong), and presents the web
//! CA as its intermediate: the chain is valid, only NTAuth tells the two CAs apart. Real
//! slapd over LDAPS, real TLS; the directory's store is an object holding `cACertificate`
//! values, as `certutil -dspublish -f ca.cer NTAuthCA` writes them.

mod support;

use std::sync::Arc;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use seg::demo::pki::{CertAuthority, LeafSpec};
use support::audit::{audit, capture_audit};
use support::lab::{config_text, replace_ntauth, start_seg, start_slapd, DirectoryRef, Pki};
use support::slapd::{Slapd, UserSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const ADMIN_SID: &str = "S-1-5-21-1000-2000-3000-500";
const ALICE_SID: &str = "S-1-5-21-1000-2000-3000-1104";

/// The enterprise PKI of these tests.
struct Enterprise {
    pki: Pki,
    issuing: CertAuthority,
    web: CertAuthority,
}

impl Enterprise {
    fn new() -> Enterprise {
        let pki = Pki::new();
        let issuing = pki.ca.subordinate("Corp Test", "Corp Issuing CA").unwrap();
        let web = pki
            .ca
            .subordinate("Corp Test", "Corp Web Server CA")
            .unwrap();
        Enterprise { pki, issuing, web }
    }

    /// The root and the issuing CA, in one bundle.
    fn client_ca_bundle(&self) -> std::path::PathBuf {
        let bundle = format!("{}{}", self.pki.ca.cert_pem(), self.issuing.cert_pem());
        self.pki.dir.write("client-ca.pem", &bundle)
    }
}

fn users() -> Vec<UserSpec> {
    let user = |sam: &str, sid: &str| {
        let mut u = UserSpec::with_upn(sam);
        u.object_sid = Some(seg::identity::sid_from_text(sid).unwrap());
        u
    };
    vec![user("alice", ALICE_SID), user("admin", ADMIN_SID)]
}

/// A device presenting `leaf` and, behind it, `chain`.
struct Phone {
    connector: TlsConnector,
}

impl Phone {
    fn new(pki: &Pki, leaf: &seg::demo::pki::IssuedCert, chain: &[&CertAuthority]) -> Phone {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&pki.ca_path).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut certs = vec![CertificateDer::from(leaf.der.clone())];
        certs.extend(chain.iter().map(|ca| CertificateDer::from(ca.der())));
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
        Phone {
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    /// One Sync on a new connection: the status line's code, or an error.
    async fn sync(&self, seg: std::net::SocketAddr, user: &str, device: &str) -> u16 {
        let tcp = TcpStream::connect(seg).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = self.connector.connect(name, tcp).await.expect("handshake");
        let request = format!(
            "POST /Microsoft-Server-ActiveSync?Cmd=Sync&User={user}&DeviceId={device}&DeviceType=iPhone HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        let _ = tls.read_to_end(&mut response).await;
        let text = String::from_utf8_lossy(&response);
        text.get(9..12)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {text:?}"))
    }
}

/// The enterprise's devices: alice from the issuing CA, the attacker from the web CA.
fn phones(enterprise: &Enterprise) -> (Phone, Phone) {
    let alice = enterprise
        .issuing
        .issue(
            &LeafSpec::device("alice")
                .upn("alice@corp.test")
                .sid_uri(ALICE_SID),
        )
        .unwrap();
    let forged = enterprise
        .web
        .issue(
            &LeafSpec::device("admin")
                .upn("admin@corp.test")
                .sid_uri(ADMIN_SID),
        )
        .unwrap();
    (
        Phone::new(&enterprise.pki, &alice, &[]),
        Phone::new(&enterprise.pki, &forged, &[&enterprise.web]),
    )
}

/// The lab's configuration with the root + issuing CA bundle and `ntauth` as `[ntauth]`.
fn config(
    enterprise: &Enterprise,
    slapd: &Slapd,
    upstream: std::net::SocketAddr,
    ntauth: &str,
) -> String {
    let pki = &enterprise.pki;
    let directory = DirectoryRef::slapd(slapd, &[slapd.ldaps_url()]);
    let text = replace_ntauth(&config_text(pki, &directory, upstream, ""), ntauth);
    let bundle = enterprise.client_ca_bundle();
    text.replace(
        &format!("client_ca = \"{}\"", pki.ca_path.display()),
        &format!("client_ca = \"{}\"", bundle.display()),
    )
}

#[tokio::test]
async fn a_sibling_cas_certificate_is_never_a_logon_certificate() {
    capture_audit();
    let enterprise = Enterprise::new();
    let slapd = start_slapd(&enterprise.pki, users());
    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (alice, forged) = phones(&enterprise);

    // No NTAuth decision: a root that signs CAs is refused at build, naming the key.
    let text = config(&enterprise, &slapd, upstream.addr, "");
    let path = enterprise.pki.dir.write("undecided.toml", &text);
    let loaded = seg::config::Config::load(&path).unwrap();
    let error = seg::App::build(loaded).err().expect("refused").to_string();
    assert!(error.starts_with("tls.client_ca: holds"), "{error}");
    assert!(error.contains("may sign other CAs"), "{error}");

    // The issuing CA alone in a file: alice is served, the sibling's certificate refused.
    let issuing = enterprise
        .pki
        .dir
        .write("ntauth.pem", &enterprise.issuing.cert_pem());
    let text = config(
        &enterprise,
        &slapd,
        upstream.addr,
        &format!("[ntauth]\nfile = \"{}\"\n", issuing.display()),
    );
    let path = enterprise.pki.dir.write("file.toml", &text);
    let seg = start_seg(&path).await;
    assert_eq!(alice.sync(seg.listen_addr, "alice", "NTA1").await, 200);
    assert_eq!(forged.sync(seg.listen_addr, "admin", "NTF1").await, 403);
    let record = audit("NTF1").pop().expect("an audit record");
    assert_eq!(record["reason"], "ca-not-in-ntauth", "{record}");
    assert_eq!(record["kdc_event"], 21, "{record}");
    assert_eq!(
        record["account"].as_str().map(|a| a.contains("admin")),
        Some(true),
        "{record}"
    );
    let metrics = seg.metrics.render();
    assert!(
        metrics.contains(
            "seg_identity_decisions_total{decision=\"deny\",reason=\"ca-not-in-ntauth\"} 1"
        ),
        "{metrics}"
    );
    seg.stop().await;

    // Without any NTAuth, the opt-out admits the forged certificate: what the check stops.
    let text = config(
        &enterprise,
        &slapd,
        upstream.addr,
        "[ntauth]\ndanger_any_client_ca = true\n",
    );
    let path = enterprise.pki.dir.write("danger.toml", &text);
    let seg = start_seg(&path).await;
    assert_eq!(forged.sync(seg.listen_addr, "admin", "NTF2").await, 200);
    seg.stop().await;
}

/// The directory's NTAuth object holding `cas`, as certutil publishes it.
fn publish(slapd: &Slapd, cas: &[&CertAuthority], first: bool) {
    let dn = format!("CN=NTAuthCertificates,{}", slapd.suffix());
    let values: String = cas
        .iter()
        .map(|ca| {
            format!(
                "cACertificate;binary:: {}\n",
                base64::engine::general_purpose::STANDARD.encode(ca.der())
            )
        })
        .collect();
    let ldif = if first {
        format!("dn: {dn}\nchangetype: add\nobjectClass: organizationalRole\nobjectClass: pkiCA\ncn: NTAuthCertificates\n{values}\n")
    } else {
        format!("dn: {dn}\nchangetype: modify\nreplace: cACertificate;binary\n{values}-\n\n")
    };
    slapd.modify(&ldif);
}

#[tokio::test]
async fn the_directorys_ntauth_store_decides_and_its_changes_take_effect() {
    capture_audit();
    let enterprise = Enterprise::new();
    let slapd = start_slapd(&enterprise.pki, users());
    publish(&slapd, &[&enterprise.issuing], true);
    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let (alice, forged) = phones(&enterprise);
    let text = config(
        &enterprise,
        &slapd,
        upstream.addr,
        &format!(
            "[ntauth]\ndirectory = true\ndn = \"CN=NTAuthCertificates,{}\"\nrefresh = \"1s\"\n",
            slapd.suffix()
        ),
    );
    let path = enterprise.pki.dir.write("seg.toml", &text);
    let seg = start_seg(&path).await;
    // The first read happens at start; allow it a moment.
    let mut status = 0;
    for _ in 0..50 {
        status = alice.sync(seg.listen_addr, "alice", "NTD1").await;
        if status != 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        status, 200,
        "alice, issued by a CA of the directory's store"
    );
    assert_eq!(forged.sync(seg.listen_addr, "admin", "NTD2").await, 403);
    assert_eq!(audit("NTD2").pop().unwrap()["reason"], "ca-not-in-ntauth");

    // The store changes in the directory: within a refresh, alice's CA is out.
    publish(&slapd, &[&enterprise.web], false);
    let mut status = 200;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        status = alice.sync(seg.listen_addr, "alice", "NTD3").await;
        if status == 403 {
            break;
        }
    }
    assert_eq!(
        status, 403,
        "the changed store took effect without a restart"
    );
    assert_eq!(audit("NTD3").pop().unwrap()["reason"], "ca-not-in-ntauth");
    seg.stop().await;
}
