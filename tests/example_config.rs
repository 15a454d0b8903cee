//! `config/seg.example.toml` stays true to `src/config.rs`: every key it sets is known and
//! valid, every key the code reads is documented, and every value shown is the code's default.
//! The README's minimal configuration parses as it is shown.

use std::path::{Path, PathBuf};
use std::time::Duration;

use seg::config::{
    Config, DirectoryConfig, Enforcement, GroupMethod, IdentityValue, MIN_REQUEST_TIMEOUT,
};
use seg::demo::pki::{CertAuthority, LeafSpec};
use seg::identity::{CertFacts, MappingRule};

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
    with_placeholders(EXAMPLE, dir)
}

/// `text` with `/etc/seg/` moved to `dir`, each referenced file created empty.
fn with_placeholders(text: &str, dir: &Path) -> String {
    let root = dir.display().to_string();
    for path in etc_seg_paths(text) {
        let placeholder = PathBuf::from(path.replacen("/etc/seg", &root, 1));
        if let Some(parent) = placeholder.parent() {
            std::fs::create_dir_all(parent).expect("create placeholder folder");
        }
        std::fs::write(&placeholder, "").expect("create placeholder file");
    }
    text.replace("\"/etc/seg/", &format!("\"{root}/"))
}

#[test]
fn the_readmes_minimal_configuration_parses() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("## A minimal configuration")
        .expect("the README's minimal configuration");
    let block = &readme[start..];
    let toml_start = block.find("```toml\n").expect("a toml block") + 8;
    let toml_end = toml_start + block[toml_start..].find("```").expect("its end");
    let dir = TempDir::new("readme-config");
    let text = with_placeholders(&block[toml_start..toml_end], &dir.0);
    let config = Config::parse(&text, &dir.0, "README.md")
        .unwrap_or_else(|e| panic!("the README's configuration: {e}"));
    assert!(config.ntauth.directory);
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
    assert_eq!(config.listen.max_connections_per_address, 1000);
    assert_eq!(config.listen.max_connections_per_device, 8);
    assert_eq!(config.listen.body_timeout, Duration::from_secs(30));
    assert_eq!(config.listen.body_min_rate, 500);
    assert_eq!(config.listen.write_timeout, Duration::from_secs(60));
    assert_eq!(config.cache.soft_ttl, Duration::from_secs(5 * 60));
    assert_eq!(config.cache.hard_ttl, Duration::from_secs(60 * 60));
    assert!(config.cache.soft_ttl <= config.cache.hard_ttl);
    assert_eq!(config.cache.negative_ttl, Duration::from_secs(60));
    assert_eq!(
        config.mapping.rules,
        [
            MappingRule::IssuerSerial,
            MappingRule::SubjectKeyId,
            MappingRule::Sha1PublicKey,
            MappingRule::IssuerSid,
            MappingRule::Upn,
            MappingRule::Email
        ]
    );
    assert_eq!(config.mapping.enforcement, Enforcement::Full);
    assert!(config.mapping.many_to_one.is_empty());
    assert_eq!(
        config.account.lockout_duration,
        Duration::from_secs(30 * 60)
    );
    assert!(config.account.required_groups.is_empty());
    assert!(config.account.denied_groups.is_empty());
    assert_eq!(config.account.group_method, GroupMethod::InChain);
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
        ca_file = "{root}/ad-ca.pem"
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
    assert_eq!(
        (
            l.max_connections_per_address,
            l.max_connections_per_device,
            l.body_timeout,
            l.body_min_rate,
            l.write_timeout
        ),
        (
            d.max_connections_per_address,
            d.max_connections_per_device,
            d.body_timeout,
            d.body_min_rate,
            d.write_timeout
        ),
        "[listen] slow clients and caps"
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
        (&config.mapping.rules, config.mapping.enforcement),
        (&defaults.mapping.rules, defaults.mapping.enforcement),
        "[mapping]"
    );
    let (a, d) = (&config.account, &defaults.account);
    assert_eq!(
        (
            a.lockout_duration,
            &a.required_groups,
            &a.denied_groups,
            a.group_method
        ),
        (
            d.lockout_duration,
            &d.required_groups,
            &d.denied_groups,
            d.group_method
        ),
        "[account]"
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
        (
            u.pool_max_idle_per_host,
            u.pool_idle_timeout,
            u.max_connecting
        ),
        (
            d.pool_max_idle_per_host,
            d.pool_idle_timeout,
            d.max_connecting
        ),
        "[upstream] pool and connection slots"
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
/// set, in a comment or as a table header, so a key added to the code without documentation
/// fails here.
#[test]
fn every_key_read_by_config_rs_is_documented() {
    let source_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config.rs");
    let source = std::fs::read_to_string(&source_path).expect("read src/config.rs");
    // Any receiver (`s.`, `t.`, `root.`): the helper name and a literal key are what count.
    let helpers = [
        ".socket_addr(\"",
        ".duration(\"",
        ".integer(\"",
        ".file(\"",
        ".optional_file(\"",
        ".boolean(\"",
        ".string(\"",
        ".optional_string(\"",
        ".required_string(\"",
        ".string_list(\"",
        ".has(\"",
        ".section(\"",
        ".table_list(\"",
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
    for expected in [
        "enforcement",
        "many_to_one",
        "subject",
        "group_method",
        "ca_file",
    ] {
        assert!(
            keys.contains(&expected.to_string()),
            "the scan of src/config.rs missed {expected:?} ({keys:?}); have the Section helpers been renamed? update this test"
        );
    }
    assert!(
        keys.len() >= 50,
        "found only {} key names in src/config.rs ({keys:?}); have the Section helpers been renamed? update this test",
        keys.len()
    );
    let documented = |key: &str| {
        EXAMPLE.lines().any(|line| {
            let line = line.trim_start().trim_start_matches('#').trim_start();
            let is_table_named_key = line.starts_with('[')
                && line
                    .trim_matches(|c| c == '[' || c == ']')
                    .rsplit('.')
                    .next()
                    == Some(key);
            is_table_named_key || line.starts_with(&format!("{key} ="))
        })
    };
    let missing: Vec<&String> = keys.iter().filter(|k| !documented(k)).collect();
    assert!(
        missing.is_empty(),
        "keys read by src/config.rs but absent from config/seg.example.toml: {missing:?}"
    );
}

/// The commented `[[mapping.many_to_one]]` example, uncommented, is what its comments say:
/// refused without the rule, accepted with it, and its patterns match the certificates they
/// are meant for.
#[test]
fn the_commented_many_to_one_example_is_accurate() {
    let dir = TempDir::new("example-many-to-one");
    let text = example_with_placeholders(&dir.0);
    let block = commented_block(&text, "# [[mapping.many_to_one]]");
    assert!(
        block.len() >= 6,
        "the many-to-one example is shorter than expected: {block:#?}"
    );
    let uncommented: Vec<String> = block
        .iter()
        .map(|l| l.trim_start_matches('#').trim_start().to_string())
        .collect();
    let with_tables = text.replacen(&block.join("\n"), &uncommented.join("\n"), 1);

    let err = Config::parse(&with_tables, &dir.0, "seg.example.toml")
        .expect_err("tables without the many-to-one rule are refused");
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["mapping.rules"], "{err}");

    let rules_line = with_tables
        .lines()
        .find(|l| l.starts_with("rules = ["))
        .expect("the example sets mapping.rules");
    let enabled = with_tables.replacen(
        rules_line,
        &rules_line.replacen("rules = [", "rules = [\"many-to-one\", ", 1),
        1,
    );
    let config = match Config::parse(&enabled, &dir.0, "seg.example.toml") {
        Ok(c) => c,
        Err(e) => panic!("the uncommented many-to-one example does not parse:\n{e}"),
    };
    assert_eq!(config.mapping.rules[0], MappingRule::ManyToOne);
    let [rule] = config.mapping.many_to_one.as_slice() else {
        panic!(
            "one many-to-one table expected: {:?}",
            config.mapping.many_to_one
        );
    };
    assert_eq!(rule.name, "kiosks");
    assert_eq!(rule.issuer, "DC=example,DC=corp,CN=Corp Issuing CA");
    assert_eq!(rule.account, "svc-kiosk");

    // The same patterns against real certificates, with the issuer of a throwaway CA.
    let ca = CertAuthority::new("Corp", "Corp Issuing CA").expect("ca");
    let facts =
        |spec: LeafSpec| CertFacts::from_der(&ca.issue(&spec).expect("issue").der).expect("facts");
    let kiosk = facts(LeafSpec::device("Kiosk-017").organizational_unit("kiosks"));
    let mut rule = rule.clone();
    rule.issuer = kiosk.issuer_ad.to_ascii_lowercase();
    assert!(
        rule.applies_to(&kiosk),
        "case-insensitive issuer, labels and globs"
    );
    let phone = facts(LeafSpec::device("kiosk-018").organizational_unit("Phones"));
    assert!(!rule.applies_to(&phone), "every subject pattern must match");
    let no_ou = facts(LeafSpec::device("kiosk-019"));
    assert!(
        !rule.applies_to(&no_ou),
        "a missing attribute does not match"
    );
    let other_ca = CertAuthority::new("Corp", "Other CA").expect("ca");
    let elsewhere = CertFacts::from_der(
        &other_ca
            .issue(&LeafSpec::device("kiosk-017").organizational_unit("Kiosks"))
            .expect("issue")
            .der,
    )
    .expect("facts");
    assert!(
        !rule.applies_to(&elsewhere),
        "another issuer does not match"
    );
}

/// The constraints the example's comments state are the code's.
#[test]
fn the_documented_constraints_hold() {
    let dir = TempDir::new("example-constraints");
    let text = example_with_placeholders(&dir.0);
    let problems_with = |from: &str, to: &str| -> Vec<(String, String)> {
        assert!(
            text.contains(from),
            "the example no longer contains {from:?}"
        );
        match Config::parse(&text.replacen(from, to, 1), &dir.0, "seg.example.toml") {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.into_iter().map(|p| (p.key, p.message)).collect(),
        }
    };
    let keys = |problems: Vec<(String, String)>| -> Vec<String> {
        problems.into_iter().map(|(k, _)| k).collect()
    };

    // directory.ca_file: required with ldaps:// (and with starttls).
    let ca_line = text
        .lines()
        .find(|l| l.starts_with("ca_file = ") && l.contains("ad-ca.pem"))
        .expect("the example sets directory.ca_file")
        .to_string();
    assert_eq!(keys(problems_with(&ca_line, "")), ["directory.ca_file"]);
    let starttls_only = text
        .replacen(&ca_line, "", 1)
        .replace("ldaps://", "ldap://")
        .replacen("starttls = false", "starttls = true", 1);
    let err = Config::parse(&starttls_only, &dir.0, "seg.example.toml")
        .expect_err("starttls without ca_file is refused");
    let starttls_keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(starttls_keys, ["directory.ca_file"]);

    // Zero durations are refused.
    let zero = problems_with("handshake_timeout = \"10s\"", "handshake_timeout = \"0s\"");
    assert_eq!(
        zero,
        [(
            "listen.handshake_timeout".to_string(),
            "must be longer than zero".to_string()
        )]
    );
    assert_eq!(
        keys(problems_with(
            "lockout_duration = \"30m\"",
            "lockout_duration = \"0m\""
        )),
        ["account.lockout_duration"]
    );
    assert_eq!(
        keys(problems_with(
            "write_timeout = \"60s\"",
            "write_timeout = \"0s\""
        )),
        ["listen.write_timeout"]
    );
    assert_eq!(
        keys(problems_with(
            "body_timeout = \"30s\"",
            "body_timeout = \"0s\""
        )),
        ["listen.body_timeout"]
    );

    // The connection caps are at least 1; body_min_rate 0 is allowed (one byte per period).
    for cap in [
        "max_connections_per_address = 1000",
        "max_connections_per_device = 8",
    ] {
        let key = cap.split(' ').next().unwrap();
        assert_eq!(
            problems_with(cap, &format!("{key} = 0")),
            [(
                format!("listen.{key}"),
                "must be an integer ≥ 1".to_string()
            )]
        );
    }
    assert!(problems_with("body_min_rate = 500", "body_min_rate = 0").is_empty());

    // The documented values of enforcement and group_method, and nothing else.
    assert!(problems_with("enforcement = \"full\"", "enforcement = \"compatibility\"").is_empty());
    assert_eq!(
        keys(problems_with(
            "enforcement = \"full\"",
            "enforcement = \"audit\""
        )),
        ["mapping.enforcement"]
    );
    for method in ["token-groups", "member-of"] {
        assert!(
            problems_with(
                "group_method = \"in-chain\"",
                &format!("group_method = \"{method}\"")
            )
            .is_empty(),
            "{method}"
        );
    }
    assert_eq!(
        keys(problems_with(
            "group_method = \"in-chain\"",
            "group_method = \"nested\""
        )),
        ["account.group_method"]
    );

    // Every rule the comments list is a rule name the code knows, and the reverse.
    let mapping = &text
        [text.find("[mapping]").expect("[mapping]")..text.find("[account]").expect("[account]")];
    for rule in MappingRule::ALL {
        assert!(
            mapping.contains(&format!("#   {} ", rule.name())),
            "rule {} is not described in the [mapping] comments",
            rule.name()
        );
    }
}

/// The lines from the one starting with `first` that are commented-out TOML (`# key = …`,
/// `# [table]`), up to the first line that is not.
fn commented_block<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with(first));
    let mut block: Vec<&str> = lines.next().into_iter().collect();
    assert!(!block.is_empty(), "no line starts with {first:?}");
    for line in lines {
        let Some(rest) = line.strip_prefix("# ") else {
            break;
        };
        let key = rest.split(" = ").next().unwrap_or("");
        let is_toml = rest.starts_with('[')
            || (rest.contains(" = ")
                && !key.is_empty()
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        if !is_toml {
            break;
        }
        block.push(line);
    }
    block
}

/// The commented `[identity.kerberos]` block, uncommented with `mode = "kerberos"`, parses
/// and shows the code's defaults; in header mode the same table is refused.
#[test]
fn the_commented_kerberos_block_is_accurate() {
    let dir = TempDir::new("example-kerberos");
    let text = example_with_placeholders(&dir.0);
    let start = text
        .find("# [identity.kerberos]")
        .expect("the example documents [identity.kerberos]");
    let end = start
        + text[start..]
            .find("\n[upstream]")
            .expect("[upstream] follows");
    let block: Vec<&str> = text[start..end]
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter(|l| {
            l.starts_with('[')
                || l.split(" = ").next().is_some_and(|k| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) && l.contains(" = ")
        })
        .collect();
    assert!(block.len() >= 11, "kerberos block too short: {block:?}");
    let uncommented = format!("{}\n{}\n{}", &text[..start], block.join("\n"), &text[end..]);
    let header_mode = Config::parse(&uncommented, &dir.0, "seg.example.toml")
        .expect_err("[identity.kerberos] in header mode is refused");
    let keys: Vec<&str> = header_mode
        .problems
        .iter()
        .map(|p| p.key.as_str())
        .collect();
    assert_eq!(keys, ["identity.kerberos"]);
    let kerberos_mode = uncommented.replacen("mode = \"header\"", "mode = \"kerberos\"", 1);
    let config = match Config::parse(&kerberos_mode, &dir.0, "seg.example.toml") {
        Ok(c) => c,
        Err(e) => panic!("the kerberos block does not parse:\n{e}"),
    };
    let k = config.kerberos.expect("kerberos mode");
    assert_eq!(k.principal, "svc-seg@CORP.EXAMPLE");
    assert_eq!(k.realm, "CORP.EXAMPLE");
    assert_eq!(k.target_spn, "HTTP/mail.corp.example");
    assert_eq!(k.refresh_before, Duration::from_secs(3600));
    assert_eq!(k.denial_ttl, Duration::from_secs(60));
    assert_eq!(k.max_credentials, 100_000);
    assert_eq!(k.max_concurrent_exchanges, 8);
    assert_eq!(k.max_queued_exchanges, 5_000);
    assert_eq!(k.exchange_timeout, Duration::from_secs(5));
    // Without the optional keys the same defaults apply.
    let minimal = kerberos_mode
        .lines()
        .filter(|l| {
            !["refresh_before", "denial_ttl", "max_", "exchange_timeout"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let defaults = Config::parse(&minimal, &dir.0, "seg.example.toml")
        .unwrap_or_else(|e| panic!("minimal kerberos block: {e}"))
        .kerberos
        .expect("kerberos mode");
    assert_eq!(defaults, k);
    // A list of SPNs, a missing keytab: each problem at its key.
    let bad = kerberos_mode
        .replacen(
            "target_spn = \"HTTP/mail.corp.example\"",
            "target_spn = \"HTTP/a.corp.example,HTTP/b.corp.example\"",
            1,
        )
        .replacen("keytab = ", "keytab_file = ", 1);
    let err = Config::parse(&bad, &dir.0, "seg.example.toml").expect_err("bad kerberos");
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "identity.kerberos.target_spn",
        "identity.kerberos.keytab",
        "identity.kerberos.keytab_file",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
}
