//! Large CRLs: a ~20 MB list (about 500,000 revoked serials) is parsed once into a hash set
//! (constant-time lookups) and handed to the TLS verifier. Run with `cargo bench --bench crl`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use seg::config::TlsConfig;
use seg::revocation::RevocationList;

const REVOKED: u32 = 500_000;

struct Fixture {
    dir: PathBuf,
    crl: PathBuf,
    tls: TlsConfig,
    bytes: usize,
}

fn fixture() -> Fixture {
    let dir = std::env::temp_dir().join(format!("seg-crl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Bench Issuing CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = params.self_signed(&key).expect("CA");
    let now = SystemTime::now();
    let revoked_certs = (0..REVOKED)
        .map(|n| {
            // 16-byte serials, as enterprise CAs issue them.
            let mut serial = [0x11u8; 16];
            serial[12..].copy_from_slice(&n.to_be_bytes());
            RevokedCertParams {
                serial_number: SerialNumber::from_slice(&serial),
                revocation_time: (now - Duration::from_secs(3600)).into(),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            }
        })
        .collect();
    let crl = CertificateRevocationListParams {
        this_update: (now - Duration::from_secs(60)).into(),
        next_update: (now + Duration::from_secs(86_400)).into(),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&ca, &key)
    .expect("CRL");
    let crl_path = dir.join("big.crl");
    std::fs::write(&crl_path, crl.der()).expect("write CRL");
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write CA");
    Fixture {
        bytes: crl.der().len(),
        tls: TlsConfig {
            certificate: dir.join("unused"),
            private_key: dir.join("unused"),
            client_ca: ca_path,
            crl_files: vec![crl_path.clone()],
            crl_check_chain: false,
            danger_allow_unknown_revocation_status: false,
            self_test_certificate: None,
            session_ticket_key_file: None,
            session_lifetime: std::time::Duration::from_secs(6 * 3600),
        },
        crl: crl_path,
        dir,
    }
}

fn large_crl(c: &mut Criterion) {
    let f = fixture();
    println!(
        "CRL: {} revoked serials, {:.1} MB",
        REVOKED,
        f.bytes as f64 / 1e6
    );
    let mut group = c.benchmark_group("crl_20mb");
    group.sample_size(10);
    group.bench_function("parse_into_lookup_set", |b| {
        b.iter(|| RevocationList::load(std::slice::from_ref(&f.crl)).expect("load"))
    });
    let list = RevocationList::load(std::slice::from_ref(&f.crl)).expect("load");
    group.bench_function("verifier_with_crl", |b| {
        b.iter(|| seg::tls::ClientCertPolicy::new(&f.tls, &list).expect("verifier"))
    });
    let issuer = {
        use x509_parser::prelude::FromDer;
        let der = std::fs::read(&f.crl).expect("read");
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(&der).expect("parse");
        crl.issuer().as_raw().to_vec()
    };
    let mut serial = [0x11u8; 16];
    serial[12..].copy_from_slice(&123_456u32.to_be_bytes());
    assert!(list.is_revoked(&issuer, &serial));
    group.bench_function("lookup_one_serial", |b| {
        b.iter(|| list.is_revoked(&issuer, &serial))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&f.dir);
}

criterion_group!(benches, large_crl);
criterion_main!(benches);
