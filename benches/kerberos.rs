//! The cost of Kerberos constrained delegation against a real KDC (a Samba AD DC started by
//! the test support code): a first request's S4U2Self + S4U2Proxy exchange, and a request
//! whose account already has a cached credential (a new SPNEGO token only). Both go through
//! `Delegation::authorize`, the call the proxy makes, blocking pool included.
//!
//! `cargo bench --bench kerberos` (needs root and Samba, like tests/kerberos.rs); with
//! `-- --test` each case runs once (the test command does that).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use seg::config::KerberosConfig;
use seg::demo::pki::LeafSpec;
use seg::directory::AccountEntry;
use seg::kerberos::Delegation;
use seg::metrics::Metrics;
use support::lab::{Pki, TempDir};
use support::samba::{Samba, SambaTls};

/// Accounts for first requests; a fresh `Delegation` (empty cache) takes over when they run out.
const ACCOUNTS: usize = 150;

struct Fixture {
    _samba: Samba,
    _work: TempDir,
    _pki: Pki,
    config: KerberosConfig,
    accounts: Vec<AccountEntry>,
}

fn fixture() -> Fixture {
    let pki = Pki::new();
    let mut spec = LeafSpec::loopback_server();
    spec.dns_names.push("dc1.corp.test".into());
    let server = pki.ca.issue(&spec).expect("DC certificate");
    let samba = Samba::start(SambaTls {
        cert: pki.dir.write("dc1.pem", &server.cert_pem),
        key: pki.dir.write("dc1.key", &server.key_pem),
        ca: pki.ca_path.clone(),
    });
    std::env::set_var("KRB5_CONFIG", samba.krb5_conf());
    let work = TempDir::new("kerberos-bench");
    let keytabs = samba.setup_delegation(work.path());
    let names: Vec<String> = (0..=ACCOUNTS).map(|i| format!("bench{i}")).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "")).collect();
    samba.create_users(&pairs);
    let accounts = names
        .iter()
        .map(|name| AccountEntry {
            sam_account_name: Some(name.clone()),
            user_account_control: 512,
            ..AccountEntry::default()
        })
        .collect();
    Fixture {
        _samba: samba,
        _work: work,
        _pki: pki,
        config: KerberosConfig {
            keytab: keytabs.seg,
            principal: "svc-seg@CORP.TEST".into(),
            realm: "CORP.TEST".into(),
            target_spn: "HTTP/eas.corp.test".into(),
            refresh_before: Duration::from_secs(3600),
            denial_ttl: Duration::from_secs(60),
            max_credentials: 100_000,
            max_concurrent_exchanges: 8,
            max_queued_exchanges: 5_000,
            exchange_timeout: Duration::from_secs(5),
        },
        accounts,
    }
}

fn delegation(c: &mut Criterion) {
    let fixture = fixture();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let fresh = || {
        let delegation = Arc::new(Delegation::new(&fixture.config, Arc::new(Metrics::new())));
        // The gateway's own TGT, as a running gateway has it, outside the measurement.
        runtime
            .block_on(delegation.authorize(&fixture.accounts[ACCOUNTS]))
            .expect("warm-up delegation");
        delegation
    };
    let mut group = c.benchmark_group("kerberos");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(4));
    group.bench_function("first_request_s4u_exchange", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut delegation = fresh();
            for i in 0..iters as usize {
                if i > 0 && i % ACCOUNTS == 0 {
                    delegation = fresh();
                }
                let account = &fixture.accounts[i % ACCOUNTS];
                let started = Instant::now();
                runtime
                    .block_on(delegation.authorize(account))
                    .expect("delegation");
                total += started.elapsed();
            }
            total
        })
    });
    let cached = fresh();
    let account = &fixture.accounts[ACCOUNTS];
    group.bench_function("cached_credential_token", |b| {
        b.to_async(&runtime)
            .iter(|| async { cached.authorize(account).await.expect("token") })
    });
    group.finish();
}

criterion_group!(benches, delegation);
criterion_main!(benches);
