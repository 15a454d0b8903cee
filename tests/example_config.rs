//! `config/seg.example.toml` stays true to `src/config.rs`: every key it sets is known and
//! valid, every key the code reads is documented, and every value shown is the code's default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use seg::config::{Config, DirectoryConfig, IdentityValue, MIN_REQUEST_TIMEOUT};
use seg::identity::MappingRule;

const EXAMPLE: &str = include_str!("../config/seg.example.toml");

/// A folder of its own under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("seg-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every quoted `/etc/seg/...` path in the text, comments included.
fn etc_seg_paths(text: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for (start, _) in text.match_indices("\"/etc/seg/") {
        let rest = &text[start + 1..];
        let end = rest.find('"').expect("unterminated path string");
        paths.push(rest[..end].to_string());
    }
    paths.sort();
    paths.dedup();
    paths
}

/// The example with `/etc/seg/` moved to `dir`, each referenced file created empty.
fn example_with_placeholders(dir: &Path) -> String {
    let root = dir.display().to_string();
    for path in etc_seg_paths(EXAMPLE) {
        let placeholder = PathBuf::from(path.replacen("/etc/seg", &root, 1));
        if let Some(parent) = placeholder.parent() {
            std::fs::create_dir_all(parent).expect("create placeholder folder");
        }
        std::fs::write(&placeholder, "").expect("create placeholder file");
    }
    EXAMPLE.replace("\"/etc/seg/", &format!("\"{root}/"))
}

#[test]
fn example_fails_only_on_missing_files() {
    let err = Config::parse(EXAMPLE, Path::new("/"), "seg.example.toml")
        .expect_err("the /etc/seg files do not exist here, so the example cannot load");
    let other: Vec<String> = err
        .problems
        .iter()
        .filter(|p| !p.message.starts_with("cannot read "))
        .map(|p| format!("{}: {}", p.key, p.message))
        .collect();
    assert!(
        other.is_empty(),
        "seg.example.toml has problems besides missing files: {other:#?}"
    );
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "tls.certificate",
        "tls.private_key",
        "tls.client_ca",
        "directory.bind_password_file",
    ] {
        assert!(
            keys.contains(&key),
            "{key} should name a missing file; problems: {keys:?}"
        );
    }
}

#[test]
fn example_parses_with_its_files_present_and_shows_the_defaults() {
    let dir = TempDir::new("example-config");
    let text = example_with_placeholders(&dir.0);
    let config = match Config::parse(&text, &dir.0, "seg.example.toml") {
        Ok(c) => c,
        Err(e) => panic!("seg.example.toml with its files present does not parse:\n{e}"),
    };

    // The documented values, as the example states them.
    assert_eq!(
        config.listen.address,
        "0.0.0.0:443".parse::<std::net::SocketAddr>().unwrap()
    );
    assert_eq!(config.listen.handshake_timeout, Duration::from_secs(10));
    assert_eq!(config.listen.idle_timeout, Duration::from_secs(120));
    assert_eq!(config.listen.max_connections, 20_000);
    assert_eq!(config.cache.soft_ttl, Duration::from_secs(5 * 60));
    assert_eq!(config.cache.hard_ttl, Duration::from_secs(60 * 60));
    assert!(config.cache.soft_ttl <= config.cache.hard_ttl);
    assert_eq!(config.cache.negative_ttl, Duration::from_secs(60));
    assert_eq!(
        config.mapping.rules,
        [
            MappingRule::Upn,
            MappingRule::IssuerSerial,
            MappingRule::SubjectKeyId,
            MappingRule::Email
        ]
    );
    assert_eq!(config.identity.header.as_str(), "x-remote-user");
    assert_eq!(config.identity.value, IdentityValue::Upn);
    assert_eq!(config.identity.netbios_domain, None);
    assert!(config.identity.strip_headers.is_empty());
    assert_eq!(config.upstream.url.scheme_str(), Some("https"));
    assert_eq!(config.upstream.path_prefix, "");
    assert!(config.upstream.ca_file.is_some());
    assert!(config.upstream.request_timeout >= MIN_REQUEST_TIMEOUT);
    assert_eq!(config.upstream.request_timeout, Duration::from_secs(3660));
    assert_eq!(
        config.admin.address,
        "127.0.0.1:9090".parse::<std::net::SocketAddr>().unwrap()
    );
    let DirectoryConfig::Ldap(ldap) = &config.directory else {
        panic!(
            "the example's directory is LDAP, found {:?}",
            config.directory
        );
    };
    assert_eq!(
        ldap.urls.len(),
        2,
        "several domain controllers, tried in order"
    );
    assert!(ldap.urls.iter().all(|u| u.starts_with("ldaps://")));
    assert!(!ldap.danger_allow_plaintext);
    assert!(ldap.ca_file.is_some());

    // Every value the example shows for a key with a default is that default: a file holding
    // only the required keys must parse to the same values.
    let root = dir.0.display();
    let minimal = format!(
        r#"
        [tls]
        certificate = "{root}/server.pem"
        private_key = "{root}/server.key"
        client_ca = "{root}/enterprise-ca.pem"
        [directory]
        urls = ["ldaps://dc1.corp.example:636"]
        base_dn = "DC=corp,DC=example"
        bind_dn = "CN=svc-seg,DC=corp,DC=example"
        bind_password_file = "{root}/bind-password"
        [upstream]
        url = "http://exchange.corp.example"
        "#
    );
    let defaults = match Config::parse(&minimal, &dir.0, "minimal.toml") {
        Ok(c) => c,
        Err(e) => panic!("a file with only the required keys does not parse:\n{e}"),
    };
    let (l, d) = (&config.listen, &defaults.listen);
    assert_eq!(
        (
            l.address,
            l.handshake_timeout,
            l.idle_timeout,
            l.max_connections
        ),
        (
            d.address,
            d.handshake_timeout,
            d.idle_timeout,
            d.max_connections
        ),
        "[listen]"
    );
    let (c, d) = (&config.cache, &defaults.cache);
    assert_eq!(
        (c.soft_ttl, c.hard_ttl, c.negative_ttl, c.lookup_timeout),
        (d.soft_ttl, d.hard_ttl, d.negative_ttl, d.lookup_timeout),
        "[cache] durations"
    );
    assert_eq!(
        (
            c.max_entries,
            c.max_concurrent_lookups,
            c.max_queued_lookups
        ),
        (
            d.max_entries,
            d.max_concurrent_lookups,
            d.max_queued_lookups
        ),
        "[cache] bounds"
    );
    assert_eq!(
        config.mapping.rules, defaults.mapping.rules,
        "[mapping] rules"
    );
    let (i, d) = (&config.identity, &defaults.identity);
    assert_eq!(
        (&i.header, i.value, &i.netbios_domain, &i.strip_headers),
        (&d.header, d.value, &d.netbios_domain, &d.strip_headers),
        "[identity]"
    );
    let (u, d) = (&config.upstream, &defaults.upstream);
    assert_eq!(
        (&u.path_prefix, u.connect_timeout, u.request_timeout),
        (&d.path_prefix, d.connect_timeout, d.request_timeout),
        "[upstream] timeouts and prefix"
    );
    assert_eq!(
        (u.pool_max_idle_per_host, u.pool_idle_timeout),
        (d.pool_max_idle_per_host, d.pool_idle_timeout),
        "[upstream] pool"
    );
    let (a, d) = (&config.admin, &defaults.admin);
    assert_eq!(
        (a.address, a.probe_interval),
        (d.address, d.probe_interval),
        "[admin]"
    );
    let DirectoryConfig::Ldap(d) = &defaults.directory else {
        panic!("the minimal directory is LDAP");
    };
    assert_eq!(
        (ldap.starttls, ldap.connect_timeout, ldap.operation_timeout),
        (d.starttls, d.connect_timeout, d.operation_timeout),
        "[directory] connection"
    );
    assert_eq!(
        (ldap.pool_size, ldap.danger_allow_plaintext),
        (d.pool_size, d.danger_allow_plaintext),
        "[directory] pool and plaintext"
    );
}

/// The `ldif_file` alternative mentioned in a comment is a real key, and really exclusive.
#[test]
fn the_commented_ldif_alternative_is_accurate() {
    let dir = TempDir::new("example-ldif");
    let text = example_with_placeholders(&dir.0);
    let ldif = format!("{}/directory.ldif", dir.0.display());
    assert!(
        Path::new(&ldif).exists(),
        "the example mentions /etc/seg/directory.ldif"
    );
    let with_ldif = text.replacen(
        "[directory]\n",
        &format!("[directory]\nldif_file = \"{ldif}\"\n"),
        1,
    );
    let err = Config::parse(&with_ldif, &dir.0, "seg.example.toml")
        .expect_err("ldif_file cannot be combined with urls");
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"directory.urls"), "{keys:?}");
    assert!(keys.contains(&"directory.bind_dn"), "{keys:?}");
}

/// Each key name `src/config.rs` reads through its `Section` helpers appears in the example,
/// set or in a comment, so a key added to the code without documentation fails here.
#[test]
fn every_key_read_by_config_rs_is_documented() {
    let source_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config.rs");
    let source = std::fs::read_to_string(&source_path).expect("read src/config.rs");
    let helpers = [
        "s.socket_addr(\"",
        "s.duration(\"",
        "s.integer(\"",
        "s.file(\"",
        "s.optional_file(\"",
        "s.boolean(\"",
        "s.string(\"",
        "s.optional_string(\"",
        "s.required_string(\"",
        "s.string_list(\"",
        "s.has(\"",
        "root.section(\"",
    ];
    let mut keys = Vec::new();
    for helper in helpers {
        for (start, _) in source.match_indices(helper) {
            let rest = &source[start + helper.len()..];
            let end = rest.find('"').expect("unterminated key name");
            keys.push(rest[..end].to_string());
        }
    }
    keys.sort();
    keys.dedup();
    assert!(
        keys.len() >= 40,
        "found only {} key names in src/config.rs ({keys:?}); have the Section helpers been renamed? update this test",
        keys.len()
    );
    let documented = |key: &str| {
        EXAMPLE.lines().any(|line| {
            let line = line.trim_start().trim_start_matches('#').trim_start();
            line.starts_with(&format!("[{key}]")) || line.starts_with(&format!("{key} ="))
        })
    };
    let missing: Vec<&String> = keys.iter().filter(|k| !documented(k)).collect();
    assert!(
        missing.is_empty(),
        "keys read by src/config.rs but absent from config/seg.example.toml: {missing:?}"
    );
}
