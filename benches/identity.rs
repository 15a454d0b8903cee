//! The per-request identity path, measured.
//!
//! - `cache_hit_identity`: a known device reconnecting. `fingerprint_and_resolve` is what the
//!   listener pays per connection (SHA-256 of the leaf DER, then a warm-cache
//!   `Resolver::resolve`); `resolve_only` is the cache read alone.
//! - `cold_mapping`: the CPU part of a cache miss before the directory is asked: the
//!   certificate parsed into `CertFacts`, every mapping rule's conditions gathered into the one
//!   `Lookup` (`MappingPlan`) and its LDAP filter written.
//! - `header_hygiene`: `HeaderPolicy::apply` on a realistic ActiveSync request (the map is
//!   cloned inside each iteration, so the figure includes one clone).
//! - `activesync_query`: `EasRequest::parse` of a Sync request's query in the plain form and
//!   in the base64 form (MS-ASHTTP 2.2.1.1.1.1), protocol headers included.
//! - `request_head`: seg's HTTP/1.1 codec reading that Sync's head off the wire into a
//!   request (method, target, headers, framing), as the device connection does per request.
//!
//! `cargo bench --bench identity` measures; `cargo bench --bench identity -- --test` runs
//! each benchmark once (CI does this through tests/run.sh).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};

use seg::activesync::{Command, EasRequest};
use seg::config::Config;
use seg::demo::pki::{CertAuthority, LeafSpec};
use seg::directory::Directory;
use seg::http1::{parse_request_head, BodyFraming};
use seg::identity::resolver::{Decision, Resolver};
use seg::identity::{CertFacts, CertFingerprint, MappingPlan, MappingRule};
use seg::metrics::Metrics;
use seg::proxy::HeaderPolicy;

const LDIF: &str = "\
dn: DC=corp,DC=test
objectClass: domain
dc: corp

dn: CN=Alice Example,OU=Users,DC=corp,DC=test
objectClass: top
objectClass: person
objectClass: organizationalPerson
objectClass: user
cn: Alice Example
sAMAccountName: alice
userPrincipalName: alice@corp.test
mail: alice@corp.test
userAccountControl: 512
accountExpires: 0
objectSid:: AQUAAAAAAAUVAAAA6AMAANAHAAC4CwAAUAQAAA==
";

/// The objectSid above: alice's certificate carries it (the KB5014754 SID extension), which
/// makes her UPN mapping strong under the default full enforcement.
const ALICE_SID: &str = "S-1-5-21-1000-2000-3000-1104";

/// A minimal configuration, read by the real parser so every default (mapping rules and
/// enforcement, cache, account policy) is the shipped one.
const CONFIG: &str = r#"
[listen]
address = "127.0.0.1:0"

[tls]
certificate = "server.pem"
private_key = "server.key"
client_ca = "ca.pem"

[directory]
ldif_file = "directory.ldif"

[identity]
header = "X-Remote-User"
value = "upn"

[upstream]
url = "http://127.0.0.1:9"

[admin]
address = "127.0.0.1:0"

[ntauth]
file = "ca.pem"
"#;

/// Alice's device certificate, the configuration the gateway would run with and the
/// resolver `App::build` would make from it (directory from the config, shipped defaults).
struct Fixture {
    leaf_der: Vec<u8>,
    config: Config,
    resolver: Arc<Resolver>,
    /// The NTAuth store of the configuration (`ntauth.file`, the fixture's CA).
    ntauth: Arc<seg::tls::ntauth::NtAuthStore>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = std::env::temp_dir().join(format!("seg-bench-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let ca = CertAuthority::new("seg bench", "seg bench CA").expect("CA");
        let server = ca.issue(&LeafSpec::loopback_server()).expect("server cert");
        let leaf = ca
            .issue(
                &LeafSpec::device("alice")
                    .upn("alice@corp.test")
                    .sid_extension(ALICE_SID),
            )
            .expect("device cert");
        for (name, text) in [
            ("ca.pem", ca.cert_pem()),
            ("server.pem", server.cert_pem),
            ("server.key", server.key_pem),
            ("directory.ldif", LDIF.to_string()),
        ] {
            std::fs::write(dir.join(name), text).expect("write fixture file");
        }
        let config = Config::parse(CONFIG, &dir, "bench.toml").unwrap_or_else(|e| panic!("{e}"));
        let directory = Directory::from_config(&config.directory).expect("LDIF directory");
        assert!(matches!(directory, Directory::Memory(_)));
        let resolver = Arc::new(Resolver::new(
            Arc::new(directory),
            &config.mapping,
            &config.account,
            &config.identity,
            &config.cache,
            Arc::new(Metrics::new()),
            None,
        ));
        let ntauth = seg::tls::ntauth::NtAuthStore::build(&config.ntauth, &config.tls.client_ca)
            .expect("the NTAuth store")
            .expect("ntauth.file is set");
        // Everything has been read.
        let _ = std::fs::remove_dir_all(&dir);
        Fixture {
            leaf_der: leaf.der,
            config,
            resolver,
            ntauth,
        }
    }
}

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime")
}

fn cache_hit_identity(c: &mut Criterion, fixture: &Fixture) {
    let rt = current_thread_runtime();
    let resolver = &fixture.resolver;
    let der = fixture.leaf_der.as_slice();
    let fingerprint = CertFingerprint::of(der);
    // Warm the cache with one real miss and make sure it is an admission.
    match rt.block_on(resolver.resolve(fingerprint, der)) {
        Ok(Decision::Admit(identity)) => {
            assert_eq!(identity.header_value, "alice@corp.test");
        }
        other => panic!("alice should be admitted, got {other:?}"),
    }

    let mut group = c.benchmark_group("cache_hit_identity");
    group.bench_function("fingerprint_and_resolve", |b| {
        b.to_async(&rt).iter(|| async {
            let fingerprint = CertFingerprint::of(black_box(der));
            resolver.resolve(fingerprint, der).await.expect("resolve")
        })
    });
    group.bench_function("resolve_only", |b| {
        b.to_async(&rt).iter(|| async {
            resolver
                .resolve(black_box(fingerprint), der)
                .await
                .expect("resolve")
        })
    });
    group.finish();
}

fn cold_mapping(c: &mut Criterion, fixture: &Fixture) {
    let der = fixture.leaf_der.as_slice();
    // Every rule the gateway knows, not only the default ones.
    let mut mapping = fixture.config.mapping.clone();
    mapping.rules = MappingRule::ALL.to_vec();
    c.bench_function("cold_mapping", |b| {
        b.iter(|| {
            let facts = CertFacts::from_der(black_box(der)).expect("facts");
            MappingPlan::new(&facts, &mapping).lookup.filter()
        })
    });
}

/// What an iPhone's Mail app sends on a Sync, plus a spoofed identity header.
fn activesync_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in [
        ("host", "mail.corp.test"),
        ("user-agent", "Apple-iPhone15C2/2101.87"),
        ("ms-asprotocolversion", "16.1"),
        ("x-ms-policykey", "3942419847"),
        ("content-type", "application/vnd.ms-sync.wbxml"),
        ("content-length", "131"),
        ("authorization", "Basic YWxpY2VAY29ycC50ZXN0OnBhc3N3b3Jk"),
        ("x-remote-user", "administrator@corp.test"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
}

fn header_hygiene(c: &mut Criterion, fixture: &Fixture) {
    let metrics = seg::metrics::Metrics::new();
    let policy = HeaderPolicy::new(&fixture.config.identity, &fixture.config.upstream, &metrics);
    let template = activesync_headers();
    let identity = HeaderValue::from_static("alice@corp.test");
    let peer_ip = HeaderValue::from_static("203.0.113.7");
    // Check once that the bench measures the real thing.
    let mut cleaned = template.clone();
    policy.apply(&mut cleaned, &identity, &peer_ip);
    assert_eq!(cleaned["x-remote-user"], "alice@corp.test");
    assert!(!cleaned.contains_key("authorization"));

    c.bench_function("header_hygiene", |b| {
        b.iter(|| {
            let mut headers = black_box(&template).clone();
            policy.apply(&mut headers, &identity, &peer_ip);
            headers
        })
    });
}

fn activesync_query(c: &mut Criterion) {
    let headers = activesync_headers();
    let plain = "Cmd=Sync&User=alice&DeviceId=ApplF17XQ3NKJC68&DeviceType=iPhone";
    // The specification's example: version 14.0, Sync, en-US, DeviceId v140Device,
    // DeviceType SmartPhone.
    let base64 = "jAAJBAp2MTQwRGV2aWNlAApTbWFydFBob25l";
    for (query, device) in [(plain, "ApplF17XQ3NKJC68"), (base64, "v140Device")] {
        let parsed = EasRequest::parse(Some(query), &headers, true).expect("a valid query");
        assert_eq!(parsed.command, Some(Command::Sync));
        assert_eq!(parsed.device_id.as_deref(), Some(device));
    }
    let mut group = c.benchmark_group("activesync_query");
    group.bench_function("plain", |b| {
        b.iter(|| EasRequest::parse(Some(black_box(plain)), &headers, true))
    });
    group.bench_function("base64", |b| {
        b.iter(|| EasRequest::parse(Some(black_box(base64)), &headers, true))
    });
    group.finish();
}

fn request_head(c: &mut Criterion) {
    let mut wire = b"POST /Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ApplF17XQ3NKJC68&DeviceType=iPhone HTTP/1.1\r\n".to_vec();
    for (name, value) in activesync_headers().iter() {
        wire.extend_from_slice(name.as_str().as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(value.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"\r\n");
    let (head, used) = parse_request_head(&wire, 64 * 1024)
        .expect("a valid head")
        .expect("a whole head");
    assert_eq!(used, wire.len());
    assert_eq!(head.headers.len(), 8);
    assert_eq!(head.body, BodyFraming::Length(131));
    c.bench_function("request_head", |b| {
        b.iter(|| parse_request_head(black_box(&wire), 64 * 1024))
    });
}

/// The NTAuth check: a certificate's first sight (its signature verified under the store's
/// CA key, once per certificate) and every later one (the remembered verdict).
fn ntauth_check(c: &mut Criterion, fixture: &Fixture) {
    let store = &fixture.ntauth;
    let fingerprint = seg::identity::CertFingerprint::of(&fixture.leaf_der);
    assert!(matches!(
        store.check(fingerprint, &fixture.leaf_der),
        seg::tls::ntauth::NtAuthVerdict::Issued(_)
    ));
    let mut group = c.benchmark_group("ntauth_check");
    group.bench_function("first_sight", |b| {
        b.iter(|| store.judge(black_box(&fixture.leaf_der)))
    });
    group.bench_function("remembered", |b| {
        b.iter(|| store.check(fingerprint, black_box(&fixture.leaf_der)))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let fixture = Fixture::new();
    ntauth_check(c, &fixture);
    cache_hit_identity(c, &fixture);
    cold_mapping(c, &fixture);
    header_hygiene(c, &fixture);
    activesync_query(c);
    request_head(c);
}

criterion_group!(identity, benches);
criterion_main!(identity);
