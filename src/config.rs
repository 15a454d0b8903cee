//! Configuration: a TOML file read into typed sections.
//!
//! Loading never stops at the first mistake: every problem is collected with the key path it
//! belongs to (`directory.urls[1]`, `tls.certificate`), unknown keys included, so an operator
//! fixes a broken file in one pass. The binary exits with code 64 when any problem is found.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit code for a configuration that cannot be used (EX_USAGE / EX_CONFIG family).
pub const EXIT_CONFIG: i32 = 64;

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: ListenConfig,
    pub tls: TlsConfig,
    pub directory: DirectoryConfig,
    pub cache: CacheConfig,
    pub mapping: MappingConfig,
    pub account: AccountPolicyConfig,
    pub activesync: ActiveSyncConfig,
    pub identity: IdentityConfig,
    /// `identity.mode = "kerberos"`: forwarded by constrained delegation, not by header.
    pub kerberos: Option<KerberosConfig>,
    pub upstream: UpstreamConfig,
    pub admin: AdminConfig,
    pub reload: ReloadConfig,
    pub revocation: RevocationConfig,
    pub ntauth: NtAuthConfig,
    pub audit: AuditConfig,
    /// `[fleet]`: state shared by the replicas in Redis or Valkey; absent, each is on its own.
    pub fleet: Option<FleetConfig>,
}

/// The store the replicas of a fleet share (`[fleet]`): identity decisions, device blocks,
/// long-poll counts. Read at start only.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// `redis://host:port[/db]`, or `rediss://…` for TLS; no password in it.
    pub url: String,
    /// ACL user (`AUTH username password`); without it, the default user.
    pub username: Option<String>,
    /// The password, first line of this file.
    pub password_file: Option<PathBuf>,
    /// CA bundle for `rediss://`; without it, the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for a store that asks for one.
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Secrets sealing the shared entries, one per line: the first seals, all open.
    pub key_file: PathBuf,
    /// Prefix of every key seg writes, so several fleets can share one store.
    pub key_prefix: String,
    /// This replica's name in the store (long-poll counts); the host name by default.
    pub replica: String,
    /// The most one store operation may take before it counts as a miss.
    pub timeout: Duration,
    /// How long a replica waits for another's directory search of the same certificate.
    pub lock_wait: Duration,
    /// How often the block list is read from the store.
    pub block_poll_interval: Duration,
    /// The last block list read, kept on local disk: enforced at start while the store is down.
    pub block_file: Option<PathBuf>,
}

/// Where the audit log's lines go and how its queue behaves (`[audit]`); read at start only.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    /// One line per request on stdout (when `SEG_LOG` lets `seg::audit` through at info).
    pub stdout: bool,
    /// One line per request appended to this file too.
    pub file: Option<PathBuf>,
    pub when_full: WhenFull,
    /// The most bytes of lines waiting for the writer.
    pub queue_bytes: usize,
    /// How long the writer lets a batch gather after its first line: the most a crash loses.
    pub flush_interval: Duration,
}

/// What a request does when the audit queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Served without its line; counted in `seg_audit_records_dropped_total`.
    Drop,
    /// Held until the writer has made room.
    Block,
}

/// The longest `audit.flush_interval`.
const MAX_AUDIT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Which CAs may issue logon certificates (`[ntauth]`), as the forest's NTAuth store says.
#[derive(Debug, Clone, PartialEq)]
pub struct NtAuthConfig {
    /// CA certificates (PEM) trusted to issue logon certificates.
    pub file: Option<PathBuf>,
    /// Read the NTAuth object's `cACertificate` values from the directory.
    pub directory: bool,
    /// The NTAuth object's DN; by default under the RootDSE's configurationNamingContext.
    pub dn: Option<String>,
    /// How often the directory's NTAuth object is read again.
    pub refresh: Duration,
    /// Any CA that chains to `tls.client_ca` may issue logon certificates.
    pub danger_any_client_ca: bool,
}

/// The device-facing listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenConfig {
    pub address: SocketAddr,
    pub handshake_timeout: Duration,
    /// Longest wait for a complete request head, counted from the connection's start or the
    /// end of the previous response: the keep-alive idle timeout and the header-read timeout
    /// in one (hyper arms its header timer as soon as a connection waits for a request).
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Connections open at once from one device address (an IPv6 /64 counts as one).
    pub max_connections_per_address: usize,
    /// Connections open at once presenting one device certificate.
    pub max_connections_per_device: usize,
    /// A request body must deliver `body_min_rate` bytes per second, averaged over each
    /// period of this length (and at least one byte in it), or the request is cut.
    pub body_timeout: Duration,
    /// Bytes per second a request body must average over each `body_timeout` period.
    pub body_min_rate: u64,
    /// Longest a write toward the device may stay blocked (the device reads nothing) before
    /// the connection is closed. Silence is not a write: a held Ping is not cut.
    pub write_timeout: Duration,
    /// The listen socket's accept backlog: room for a fleet reconnecting at once.
    pub backlog: u32,
    /// Networks whose connections must start with a PROXY protocol header (v1 or v2).
    pub proxy_protocol_from: Vec<crate::syntax::ip_network::IpNetwork>,
    /// On SIGTERM: how long short requests may finish and over which held long polls are
    /// closed, spread out so the devices do not all reconnect in the same second.
    pub drain_window: Duration,
    /// Bytes all unfinished request heads together may hold; a head that would pass it is
    /// refused (503, closed).
    pub max_pending_head_bytes: usize,
}

/// Server certificate and the enterprise CA that issues device certificates.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub client_ca: PathBuf,
    /// CRL files (PEM or DER) for the client CAs; empty: no revocation checking.
    pub crl_files: Vec<PathBuf>,
    /// Check revocation of the leaf only, or of the whole chain.
    pub crl_check_chain: bool,
    /// Accept a certificate whose issuer has no CRL (only with CRLs configured).
    pub danger_allow_unknown_revocation_status: bool,
    /// A sample device certificate validated and mapped at start-up.
    pub self_test_certificate: Option<PathBuf>,
    /// Shared session-ticket keys (a mounted secret) so devices resume on any replica.
    pub session_ticket_key_file: Option<PathBuf>,
    /// How long after its full handshake a session may be resumed (tickets and session IDs).
    pub session_lifetime: Duration,
}

/// Revocation checked online: OCSP for device certificates and CRLs fetched from their
/// distribution points (the CRL files stay in `[tls]`).
#[derive(Debug, Clone, PartialEq)]
pub struct RevocationConfig {
    /// Ask an OCSP responder about every device certificate (cached until its nextUpdate).
    pub ocsp: bool,
    /// A responder used for every certificate instead of the one its AIA names.
    pub ocsp_responder: Option<http::Uri>,
    pub ocsp_timeout: Duration,
    /// Longest an OCSP answer is trusted, whatever its nextUpdate says.
    pub ocsp_max_age: Duration,
    /// Admit a device when the responder cannot answer (logged and counted).
    pub danger_ocsp_soft_fail: bool,
    /// Fetch the CRLs named by the CRL distribution points of the client CAs and devices.
    pub crl_distribution_points: bool,
    /// CRLs fetched over HTTP besides the distribution points.
    /// http:// URLs, or ldap:// ones read from the directory (`ldap_url`).
    pub crl_urls: Vec<String>,
    pub crl_fetch_timeout: Duration,
    /// Admit a device whose distribution-point CRL was never fetched (logged and counted).
    pub danger_crl_fetch_soft_fail: bool,
}

impl RevocationConfig {
    /// Whether CRLs are fetched over HTTP at all.
    pub fn fetches_crls(&self) -> bool {
        self.crl_distribution_points || !self.crl_urls.is_empty()
    }
}

/// Hot reload: SIGHUP always; watched files when enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadConfig {
    /// Reload when the configuration file or a file it names changes.
    pub watch_files: bool,
    pub watch_interval: Duration,
}

/// Where accounts come from.
#[derive(Debug, Clone, PartialEq)]
pub enum DirectoryConfig {
    Ldap(LdapConfig),
    /// An LDIF file served in process: for `seg demo` and trials, never for production.
    Ldif {
        file: PathBuf,
    },
}

/// Active Directory over LDAP.
#[derive(Debug, Clone, PartialEq)]
pub struct LdapConfig {
    pub urls: Vec<String>,
    pub base_dn: String,
    pub bind_dn: String,
    pub bind_password_file: PathBuf,
    pub starttls: bool,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub operation_timeout: Duration,
    pub pool_size: usize,
    /// Simple binds over plain ldap:// allowed (the bind password crosses the network in clear).
    pub danger_allow_plaintext: bool,
}

impl LdapConfig {
    /// Whether `host` (a name, no port) is the host of one of `urls`, case aside.
    pub fn names_host(&self, host: &str) -> bool {
        self.urls.iter().any(|url| {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            let hostport = rest.split('/').next().unwrap_or("");
            let name = hostport.rsplit_once(':').map_or(hostport, |(n, _)| n);
            name.eq_ignore_ascii_case(host)
        })
    }
}

/// One way of finding the account a certificate belongs to (MS-PKCA 3.1.5.2.1, KB5014754).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingRule {
    /// `altSecurityIdentities` = `X509:<I>issuer<SR>serial`, both serial byte orders (strong).
    IssuerSerial,
    /// `X509:<SKI>subjectKeyIdentifier` (strong).
    SubjectKeyId,
    /// `X509:<SHA1-PUKEY>…`: SHA-1 of the public key, or the certificate thumbprint (strong).
    Sha1PublicKey,
    /// `X509:<I>issuer<SID>sid`, the SID from the certificate (strong).
    IssuerSid,
    /// `X509:<I>issuer<S>subject` (weak).
    IssuerSubject,
    /// `X509:<S>subject` (weak).
    Subject,
    /// `X509:<RFC822>email` (weak).
    Rfc822,
    /// UPN otherName in the subjectAltName → `userPrincipalName` (implicit, weak).
    Upn,
    /// rfc822Name in the subjectAltName → `mail` or `proxyAddresses` `smtp:` (weak).
    Email,
    /// dNSName in the subjectAltName → a computer's `dNSHostName` (weak; computers only).
    Dns,
    /// Issuer and subject patterns → one named account, configured on the gateway.
    ManyToOne,
}

/// How much a mapping proves, in KB5014754's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MappingStrength {
    Strong,
    Weak,
}

impl MappingRule {
    pub const ALL: [MappingRule; 11] = [
        MappingRule::IssuerSerial,
        MappingRule::SubjectKeyId,
        MappingRule::Sha1PublicKey,
        MappingRule::IssuerSid,
        MappingRule::IssuerSubject,
        MappingRule::Subject,
        MappingRule::Rfc822,
        MappingRule::Upn,
        MappingRule::Email,
        MappingRule::Dns,
        MappingRule::ManyToOne,
    ];

    /// The name used in the configuration and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            MappingRule::IssuerSerial => "issuer-serial",
            MappingRule::SubjectKeyId => "subject-key-id",
            MappingRule::Sha1PublicKey => "sha1-public-key",
            MappingRule::IssuerSid => "issuer-sid",
            MappingRule::IssuerSubject => "issuer-subject",
            MappingRule::Subject => "subject",
            MappingRule::Rfc822 => "rfc822",
            MappingRule::Upn => "upn",
            MappingRule::Email => "email",
            MappingRule::Dns => "dns",
            MappingRule::ManyToOne => "many-to-one",
        }
    }

    pub fn from_name(name: &str) -> Option<MappingRule> {
        MappingRule::ALL.into_iter().find(|r| r.name() == name)
    }

    /// KB5014754's classification. A many-to-one rule is an explicit binding made by the
    /// gateway's administrator, so it counts as strong.
    pub fn strength(self) -> MappingStrength {
        match self {
            MappingRule::IssuerSerial
            | MappingRule::SubjectKeyId
            | MappingRule::Sha1PublicKey
            | MappingRule::IssuerSid
            | MappingRule::ManyToOne => MappingStrength::Strong,
            MappingRule::IssuerSubject
            | MappingRule::Subject
            | MappingRule::Rfc822
            | MappingRule::Upn
            | MappingRule::Email
            | MappingRule::Dns => MappingStrength::Weak,
        }
    }
}

/// The identity cache in front of the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Age after which a cached identity is refreshed in the background while still served.
    pub soft_ttl: Duration,
    /// Age after which a cached identity is never served: the most staleness tolerated.
    pub hard_ttl: Duration,
    /// Lifetime of a real denial (no mapping, disabled account).
    pub negative_ttl: Duration,
    pub max_entries: u64,
    pub max_concurrent_lookups: usize,
    pub max_queued_lookups: usize,
    /// Deadline for resolving a device not in the cache.
    pub lookup_timeout: Duration,
    /// Where the admitted identities are written (every `snapshot_interval` and at
    /// shutdown) and read at start.
    pub snapshot_file: Option<PathBuf>,
    /// How often the snapshot is written while seg runs, so a restart after a crash or a
    /// `kill -9` starts warm too.
    pub snapshot_interval: Duration,
}

/// Certificate-to-account mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingConfig {
    /// Rules in the order they are tried; a strong match always beats a weak one.
    pub rules: Vec<MappingRule>,
    pub enforcement: Enforcement,
    /// IIS-style many-to-one rules (the `many-to-one` rule), first match wins.
    pub many_to_one: Vec<ManyToOneRule>,
}

/// KB5014754 certificate-mapping enforcement, as a domain controller applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// Only a strong mapping or a matching certificate SID admits (the default).
    Full,
    /// A weak mapping also admits when no SID contradicts it and the account predates the
    /// certificate.
    Compatibility,
}

impl Enforcement {
    /// The configuration spelling.
    pub fn name(self) -> &'static str {
        match self {
            Enforcement::Full => "full",
            Enforcement::Compatibility => "compatibility",
        }
    }
}

impl GroupMethod {
    /// The configuration spelling.
    pub fn name(self) -> &'static str {
        match self {
            GroupMethod::InChain => "in-chain",
            GroupMethod::TokenGroups => "token-groups",
            GroupMethod::MemberOf => "member-of",
        }
    }
}

impl IdentityValue {
    /// The configuration spelling.
    pub fn name(self) -> &'static str {
        match self {
            IdentityValue::Upn => "upn",
            IdentityValue::DomainSam => "domain-sam",
            IdentityValue::Sam => "sam",
        }
    }
}

/// Subject labels a many-to-one pattern may name (the Windows spellings `ad_dn` writes).
const SUBJECT_LABELS: [&str; 14] = [
    "CN",
    "OU",
    "O",
    "L",
    "S",
    "C",
    "STREET",
    "SERIALNUMBER",
    "T",
    "G",
    "SN",
    "DC",
    "UID",
    "E",
];

/// Certificates from one issuer whose subject fields match patterns → one named account.
#[derive(Debug, Clone, PartialEq)]
pub struct ManyToOneRule {
    pub name: String,
    /// Issuer DN as AD writes it (most significant RDN first), compared case-insensitively.
    pub issuer: String,
    /// (Windows attribute label such as `OU`, glob pattern with `*`), all must match.
    pub subject: Vec<(String, String)>,
    /// The sAMAccountName every matching certificate maps to.
    pub account: String,
}

/// Account state and group rules checked after mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountPolicyConfig {
    /// How long a non-zero `lockoutTime` locks an account (the domain's lockout duration).
    pub lockout_duration: Duration,
    /// Group DNs the account must be in (all of them).
    pub required_groups: Vec<String>,
    /// Group DNs the account must not be in (any of them denies).
    pub denied_groups: Vec<String>,
    pub group_method: GroupMethod,
}

/// How group membership is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupMethod {
    /// Nested membership via LDAP_MATCHING_RULE_IN_CHAIN (Active Directory only).
    InChain,
    /// Nested membership via the account's constructed `tokenGroups` (Active Directory only).
    TokenGroups,
    /// Direct `memberOf` values only (any directory; no nesting).
    MemberOf,
}

/// What devices may do: mailbox binding, device rules, long-poll caps.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveSyncConfig {
    /// `User=` must name the certificate's account (on unless `danger_allow_any_user`).
    pub bind_user: bool,
    pub devices: DeviceRules,
    /// Per-account device rules (by sAMAccountName) that replace the global ones.
    pub account_overrides: Vec<(String, DeviceRules)>,
    pub max_long_polls_per_device: usize,
    pub max_long_polls_per_account: usize,
    /// Long polls held upstream at once, so they never take every upstream connection.
    pub max_long_polls: usize,
}

/// Allow and block rules on DeviceId, DeviceType and User-Agent (exact or `*` globs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceRules {
    pub default_allow: bool,
    pub allow_device_ids: Vec<String>,
    pub block_device_ids: Vec<String>,
    pub allow_device_types: Vec<String>,
    pub block_device_types: Vec<String>,
    pub allow_user_agents: Vec<String>,
    pub block_user_agents: Vec<String>,
}

/// How the mapped account is presented to the upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityConfig {
    pub header: http::HeaderName,
    pub value: IdentityValue,
    pub netbios_domain: Option<String>,
    /// Extra client header names to strip besides the built-in identity header list.
    pub strip_headers: Vec<String>,
}

/// Kerberos constrained delegation toward the upstream (`[identity.kerberos]`): the gateway's
/// own credential from a keytab, each account impersonated (S4U2Self) and delegated to the
/// one target SPN (S4U2Proxy).
#[derive(Debug, Clone, PartialEq)]
pub struct KerberosConfig {
    pub keytab: PathBuf,
    /// The gateway's principal, `name@REALM` (the realm is added when left out).
    pub principal: String,
    /// Accounts are impersonated as `sAMAccountName@realm`.
    pub realm: String,
    /// The upstream's service principal, `HTTP/host` (the realm is implied).
    pub target_spn: String,
    /// A cached credential is renewed in the background once its ticket has less left.
    pub refresh_before: Duration,
    /// How long a KDC refusal (disabled account, not delegable...) is remembered.
    pub denial_ttl: Duration,
    pub max_credentials: u64,
    pub max_concurrent_exchanges: usize,
    pub max_queued_exchanges: usize,
    /// Deadline for a first request's exchange with the KDC, queueing included.
    pub exchange_timeout: Duration,
}

/// Which account attribute becomes the identity header's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityValue {
    Upn,
    DomainSam,
    Sam,
}

/// The ActiveSync server behind seg.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub url: http::Uri,
    pub path_prefix: String,
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// New connections being opened at once; more wait for a slot.
    pub max_connecting: usize,
    pub request_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    pub pool_idle_timeout: Duration,
    /// Request headers forwarded besides the ActiveSync ones (lowercase).
    pub forward_headers: Vec<http::HeaderName>,
    /// Cookie names forwarded; every other cookie is dropped.
    pub forward_cookies: Vec<String>,
}

/// The loopback admin listener.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub address: SocketAddr,
    pub probe_interval: Duration,
    /// The device API's bearer token (first line); without it the API answers loopback
    /// peers only.
    pub api_token_file: Option<PathBuf>,
    /// The most devices the gateway remembers for the device API.
    pub device_capacity: usize,
}

/// Longest `tls.session_lifetime`: a TLS 1.3 ticket's lifetime is at most seven days.
pub const MAX_SESSION_LIFETIME: Duration = Duration::from_secs(7 * 86_400);

/// Headers `upstream.forward_headers` may not name: seg writes them itself (framing,
/// routing, the forwarding headers) or they carry a credential or a session.
const NOT_FORWARDABLE: [&str; 16] = [
    "authorization",
    "connection",
    "content-length",
    "cookie",
    "expect",
    "forwarded",
    "host",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-proto",
];

/// Cookies Exchange's front end takes a back-end server or a token from: never forwarded.
const EXCHANGE_ROUTING_COOKIES: [&str; 4] = [
    "X-BEResource",
    "X-AnonResource-Backend",
    "X-AnonResource",
    "X-BackEndCookie",
];

/// Shortest timeout allowed on an ActiveSync request in flight: a Ping may be held 3540 s.
pub const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// One thing wrong with the configuration, at one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{}: {n} configuration problem{}",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a configuration file; relative paths are resolved against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: source_name.clone(),
            problems: vec![ConfigProblem {
                key: "(file)".into(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Config::parse(&text, &base, &source_name)
    }

    /// Parses configuration text; `base` resolves relative paths.
    pub fn parse(text: &str, base: &Path, source_name: &str) -> Result<Config, ConfigError> {
        let mut problems = Problems::default();
        let table = match text.parse::<toml::Table>() {
            Ok(t) => t,
            Err(e) => {
                return Err(ConfigError {
                    source_name: source_name.into(),
                    problems: vec![ConfigProblem {
                        key: "(syntax)".into(),
                        message: e.message().to_string()
                            + &e.span()
                                .map(|s| format!(" (at byte {})", s.start))
                                .unwrap_or_default(),
                    }],
                });
            }
        };
        let mut root = Section::root(table, base);
        let config = read_config(&mut root, &mut problems);
        root.finish(&mut problems);
        match config {
            Some(c) if problems.0.is_empty() => Ok(c),
            _ => Err(ConfigError {
                source_name: source_name.into(),
                problems: problems.0,
            }),
        }
    }

    /// A short human summary for `seg check-config`.
    pub fn summary(&self) -> String {
        let directory = match &self.directory {
            DirectoryConfig::Ldap(l) => format!("ldap {} (base {})", l.urls.join(", "), l.base_dn),
            DirectoryConfig::Ldif { file } => format!("ldif file {} (demo only)", file.display()),
        };
        let rules: Vec<&str> = self.mapping.rules.iter().map(|r| r.name()).collect();
        let identity = match &self.kerberos {
            Some(k) => format!(
                "kerberos as {} for sAMAccountName@{} to {}",
                k.principal, k.realm, k.target_spn
            ),
            None => format!(
                "header {} = {}",
                self.identity.header,
                self.identity.value.name()
            ),
        };
        format!(
            "listen      {}\nclient CA   {}\ndirectory   {}\nmapping     {} (enforcement {})\nidentity    {}\nupstream    {}{}\nadmin       {}\n",
            self.listen.address,
            self.tls.client_ca.display(),
            directory,
            rules.join(" → "),
            self.mapping.enforcement.name(),
            identity,
            self.upstream.url,
            if self.upstream.path_prefix.is_empty() {
                String::new()
            } else {
                format!(" (path prefix {})", self.upstream.path_prefix)
            },
            self.admin.address,
        )
    }
}

fn read_config(root: &mut Section, p: &mut Problems) -> Option<Config> {
    let mut s = root.section("listen", p);
    let listen = ListenConfig {
        address: s.socket_addr("address", Some("0.0.0.0:443"), p),
        handshake_timeout: s.duration("handshake_timeout", "10s", p),
        idle_timeout: s.duration("idle_timeout", "120s", p),
        max_connections: s.integer("max_connections", 20_000, 1, p),
        max_connections_per_address: s.integer("max_connections_per_address", 1000, 1, p),
        max_connections_per_device: s.integer("max_connections_per_device", 8, 1, p),
        body_timeout: s.duration("body_timeout", "30s", p),
        body_min_rate: s.integer("body_min_rate", 500, 0, p) as u64,
        write_timeout: s.duration("write_timeout", "60s", p),
        backlog: s.integer("backlog", 4096, 1, p) as u32,
        proxy_protocol_from: {
            let key = s.key("proxy_protocol_from");
            s.string_list("proxy_protocol_from", &[], p)
                .iter()
                .enumerate()
                .filter_map(|(i, text)| {
                    match text.parse::<crate::syntax::ip_network::IpNetwork>() {
                        Ok(net) => Some(net),
                        Err(e) => {
                            p.push(&format!("{key}[{i}]"), &e);
                            None
                        }
                    }
                })
                .collect()
        },
        drain_window: s.duration("drain_window", "60s", p),
        max_pending_head_bytes: s.integer("max_pending_head_bytes", 32 << 20, 64 << 10, p),
    };
    s.finish(p);

    let mut s = root.section("tls", p);
    let tls = TlsConfig {
        certificate: s.file("certificate", p),
        private_key: s.file("private_key", p),
        client_ca: s.file("client_ca", p),
        crl_files: s.file_list("crl_files", p),
        crl_check_chain: match s.string("crl_check_depth", "leaf", p).as_str() {
            "leaf" => false,
            "chain" => true,
            other => {
                p.push(
                    "tls.crl_check_depth",
                    &format!("unknown depth \"{other}\"; one of leaf, chain"),
                );
                false
            }
        },
        danger_allow_unknown_revocation_status: s.boolean(
            "danger_allow_unknown_revocation_status",
            false,
            p,
        ),
        self_test_certificate: s.optional_file("self_test_certificate", p),
        session_ticket_key_file: s.optional_file("session_ticket_key_file", p),
        session_lifetime: {
            let lifetime = s.duration("session_lifetime", "6h", p);
            // RFC 8446 §4.6.1: a ticket lives at most seven days.
            if lifetime > MAX_SESSION_LIFETIME {
                p.push(&s.key("session_lifetime"), "must be at most 7 days (168h)");
            }
            lifetime
        },
    };
    s.finish(p);

    let mut s = root.section("directory", p);
    let directory = read_directory(&mut s, p);
    s.finish(p);

    let mut s = root.section("cache", p);
    let cache = CacheConfig {
        soft_ttl: s.duration("soft_ttl", "5m", p),
        hard_ttl: s.duration("hard_ttl", "1h", p),
        negative_ttl: s.duration("negative_ttl", "1m", p),
        max_entries: s.integer("max_entries", 200_000, 1, p) as u64,
        max_concurrent_lookups: s.integer("max_concurrent_lookups", 32, 1, p),
        max_queued_lookups: s.integer("max_queued_lookups", 20_000, 0, p),
        lookup_timeout: s.duration("lookup_timeout", "5s", p),
        snapshot_file: s.writable_file("snapshot_file", p),
        snapshot_interval: s.duration("snapshot_interval", "1m", p),
    };
    if cache.snapshot_interval.is_zero() {
        p.push("cache.snapshot_interval", "must be more than zero");
    }
    if cache.soft_ttl > cache.hard_ttl {
        p.push("cache.soft_ttl", "must not exceed cache.hard_ttl");
    }
    s.finish(p);

    let mut s = root.section("mapping", p);
    let default_rules = [
        "issuer-serial",
        "subject-key-id",
        "sha1-public-key",
        "issuer-sid",
        "upn",
        "email",
    ];
    let names = s.string_list("rules", &default_rules, p);
    let mut rules = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match MappingRule::from_name(name) {
            Some(rule) if rules.contains(&rule) => p.push(
                &format!("mapping.rules[{i}]"),
                &format!("\"{name}\" is listed twice"),
            ),
            Some(rule) => rules.push(rule),
            None => p.push(
                &format!("mapping.rules[{i}]"),
                &format!(
                    "unknown rule \"{name}\"; known rules: {}",
                    MappingRule::ALL
                        .iter()
                        .map(|r| r.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }
    }
    if names.is_empty() {
        p.push("mapping.rules", "at least one rule is needed");
    }
    let enforcement = match s.string("enforcement", "full", p).as_str() {
        "full" => Enforcement::Full,
        "compatibility" => Enforcement::Compatibility,
        other => {
            p.push(
                "mapping.enforcement",
                &format!("unknown mode \"{other}\"; one of full, compatibility"),
            );
            Enforcement::Full
        }
    };
    let mut many_to_one = Vec::new();
    for mut t in s.table_list("many_to_one", p) {
        let name = t.required_string("name", p).unwrap_or_default();
        let issuer = t.required_string("issuer", p).unwrap_or_default();
        let account = t.required_string("account", p).unwrap_or_default();
        let subject_key = t.key("subject");
        let subject = t.section("subject", p).string_pairs(p);
        if subject.is_empty() {
            p.push(
                &subject_key,
                "needs at least one pattern (for example OU = \"Kiosks\"); an empty one would match every certificate of the issuer",
            );
        }
        for (label, _) in &subject {
            if !SUBJECT_LABELS.contains(&label.as_str()) {
                p.push(
                    &format!("{subject_key}.{label}"),
                    &format!(
                        "unknown subject label; one of {}",
                        SUBJECT_LABELS.join(", ")
                    ),
                );
            }
        }
        many_to_one.push(ManyToOneRule {
            name,
            issuer,
            subject,
            account,
        });
        t.finish(p);
    }
    let uses_many_to_one = rules.contains(&MappingRule::ManyToOne);
    if uses_many_to_one && many_to_one.is_empty() {
        p.push(
            "mapping.many_to_one",
            "the many-to-one rule is enabled but no [[mapping.many_to_one]] table is defined",
        );
    }
    if !uses_many_to_one && !many_to_one.is_empty() {
        p.push(
            "mapping.rules",
            "[[mapping.many_to_one]] tables are defined but the many-to-one rule is not enabled",
        );
    }
    s.finish(p);

    let mut s = root.section("account", p);
    let account = AccountPolicyConfig {
        lockout_duration: s.duration("lockout_duration", "30m", p),
        required_groups: s.string_list("required_groups", &[], p),
        denied_groups: s.string_list("denied_groups", &[], p),
        group_method: match s.string("group_method", "in-chain", p).as_str() {
            "in-chain" => GroupMethod::InChain,
            "token-groups" => GroupMethod::TokenGroups,
            "member-of" => GroupMethod::MemberOf,
            other => {
                p.push(
                    "account.group_method",
                    &format!(
                        "unknown method \"{other}\"; one of in-chain, token-groups, member-of"
                    ),
                );
                GroupMethod::InChain
            }
        },
    };
    s.finish(p);

    let mut s = root.section("activesync", p);
    let bind_user = !s.boolean("danger_allow_any_user", false, p);
    let devices = read_device_rules(&mut s, p);
    let mut account_overrides = Vec::new();
    for mut t in s.table_list("account_overrides", p) {
        let account = t.required_string("account", p).unwrap_or_default();
        account_overrides.push((account, read_device_rules(&mut t, p)));
        t.finish(p);
    }
    let activesync = ActiveSyncConfig {
        bind_user,
        devices,
        account_overrides,
        max_long_polls_per_device: s.integer("max_long_polls_per_device", 2, 1, p),
        max_long_polls_per_account: s.integer("max_long_polls_per_account", 10, 1, p),
        max_long_polls: s.integer("max_long_polls", 15_000, 1, p),
    };
    s.finish(p);

    let mut s = root.section("identity", p);
    let kerberos = read_identity_mode(&mut s, p);
    let identity = read_identity(&mut s, p);
    s.finish(p);

    let mut s = root.section("upstream", p);
    let upstream = read_upstream(&mut s, p);
    s.finish(p);

    let mut s = root.section("reload", p);
    let reload = ReloadConfig {
        watch_files: s.boolean("watch_files", true, p),
        watch_interval: s.duration("watch_interval", "5s", p),
    };
    s.finish(p);

    let mut s = root.section("revocation", p);
    let revocation = read_revocation(&mut s, directory.as_ref(), p);
    s.finish(p);

    let mut s = root.section("ntauth", p);
    let ntauth = NtAuthConfig {
        file: s.optional_file("file", p),
        directory: s.boolean("directory", false, p),
        dn: s.optional_string("dn", p),
        refresh: s.duration("refresh", "15m", p),
        danger_any_client_ca: s.boolean("danger_any_client_ca", false, p),
    };
    if ntauth.directory && matches!(directory, Some(DirectoryConfig::Ldif { .. })) {
        p.push(
            "ntauth.directory",
            "the LDIF directory holds no NTAuth object: use ntauth.file",
        );
    }
    if ntauth.dn.is_some() && !ntauth.directory {
        p.push("ntauth.dn", "only read with ntauth.directory = true");
    }
    s.finish(p);

    let mut s = root.section("audit", p);
    let audit = read_audit(&mut s, p);
    s.finish(p);

    let fleet = root.has("fleet").then(|| {
        let mut s = root.section("fleet", p);
        let fleet = read_fleet(&mut s, p);
        s.finish(p);
        fleet
    });

    let mut s = root.section("admin", p);
    let admin = AdminConfig {
        address: s.socket_addr("address", Some("127.0.0.1:9090"), p),
        probe_interval: s.duration("probe_interval", "5s", p),
        api_token_file: s.optional_file("api_token_file", p),
        device_capacity: s.integer("device_capacity", 50_000, 16, p),
    };
    s.finish(p);

    let has_groups = !account.required_groups.is_empty() || !account.denied_groups.is_empty();
    if has_groups
        && account.group_method != GroupMethod::MemberOf
        && matches!(directory, Some(DirectoryConfig::Ldif { .. }))
    {
        p.push(
            "account.group_method",
            "the LDIF directory evaluates direct memberOf only: set group_method = \"member-of\"",
        );
    }
    Some(Config {
        listen,
        tls,
        directory: directory?,
        cache,
        mapping: MappingConfig {
            rules,
            enforcement,
            many_to_one,
        },
        account,
        activesync,
        identity: identity?,
        kerberos,
        upstream: upstream?,
        admin,
        reload,
        revocation,
        ntauth,
        audit,
        fleet,
    })
}

fn read_fleet(s: &mut Section, p: &mut Problems) -> FleetConfig {
    let url = s.required_string("url", p).unwrap_or_default();
    let tls = url.starts_with("rediss://");
    if !(url.is_empty() || tls || url.starts_with("redis://")) {
        p.push(
            &s.key("url"),
            &format!("\"{url}\" is not a redis:// or rediss:// URL"),
        );
    } else if url
        .split('/')
        .nth(2)
        .is_some_and(|authority| authority.contains('@'))
    {
        p.push(
            &s.key("url"),
            "holds credentials: put the password in password_file (and the ACL user in username)",
        );
    }
    let key_file = s.file("key_file", p);
    if key_file.exists() {
        if let Err(e) = crate::secrets::read_secret_lines(&key_file) {
            p.push(&s.key("key_file"), &e);
        }
    }
    let ca_file = s.optional_file("ca_file", p);
    let client_certificate = s.optional_file("client_certificate", p);
    let client_key = s.optional_file("client_key", p);
    if !tls && (ca_file.is_some() || client_certificate.is_some()) {
        p.push(
            &s.key("url"),
            "ca_file and client_certificate need a rediss:// (TLS) URL",
        );
    }
    if client_certificate.is_some() != client_key.is_some() {
        p.push(
            &s.key("client_key"),
            "client_certificate and client_key go together",
        );
    }
    // 50 ms, not less: under a reconnect storm a replica's own CPU queue delays the store's
    // answer, and at 10 ms the fleet benchmark's storm lost 1,329 of 9,000 devices' store
    // operations to the budget (each a directory search); at 50 ms none (docs/performance.md).
    let timeout = s.duration("timeout", "50ms", p);
    if timeout.is_zero() || timeout > Duration::from_secs(1) {
        p.push(
            &s.key("timeout"),
            "must be between 1ms and 1s: every local miss waits for it when the store is slow",
        );
    }
    let block_poll_interval = s.duration("block_poll_interval", "1s", p);
    if block_poll_interval < Duration::from_millis(100) {
        p.push(
            &s.key("block_poll_interval"),
            "must be at least 100ms (every replica reads the whole list each time)",
        );
    }
    let key_prefix = s.string("key_prefix", "seg:", p);
    if key_prefix.is_empty()
        || key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        p.push(
            &s.key("key_prefix"),
            "must be non-empty, without spaces or controls",
        );
    }
    let replica = s
        .optional_string("replica", p)
        .unwrap_or_else(default_replica_name);
    FleetConfig {
        url,
        username: s.optional_string("username", p),
        password_file: s.optional_file("password_file", p),
        ca_file,
        client_certificate,
        client_key,
        key_file,
        key_prefix,
        replica,
        timeout,
        lock_wait: s.duration("lock_wait", "2s", p),
        block_poll_interval,
        block_file: s.writable_file("block_file", p),
    }
}

/// The host name (a pod's name on Kubernetes), else `seg-<pid>`.
fn default_replica_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("seg-{}", std::process::id()))
}

fn read_audit(s: &mut Section, p: &mut Problems) -> AuditConfig {
    let when_full = match s.string("when_full", "drop", p).as_str() {
        "drop" => WhenFull::Drop,
        "block" => WhenFull::Block,
        other => {
            p.push(
                &s.key("when_full"),
                &format!("unknown value \"{other}\"; one of drop, block"),
            );
            WhenFull::Drop
        }
    };
    let flush_interval = s.duration("flush_interval", "10ms", p);
    if flush_interval.is_zero() || flush_interval > MAX_AUDIT_FLUSH_INTERVAL {
        p.push(
            &s.key("flush_interval"),
            "must be between 1ms and 1s (a crash loses the lines of one interval)",
        );
    }
    AuditConfig {
        stdout: s.boolean("stdout", true, p),
        file: s.writable_file("file", p),
        when_full,
        queue_bytes: s.integer("queue_bytes", 4 << 20, 64 << 10, p),
        flush_interval,
    }
}

/// An http:// URL for revocation data; anything else is a problem at `key`.
fn http_url(text: &str, key: &str, p: &mut Problems) -> Option<http::Uri> {
    match text.parse::<http::Uri>() {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.authority().is_some() => Some(uri),
        _ => {
            p.push(
                key,
                &format!("\"{text}\" is not an http:// URL (OCSP and CRLs are fetched over plain HTTP: they are signed)"),
            );
            None
        }
    }
}

fn read_revocation(
    s: &mut Section,
    directory: Option<&DirectoryConfig>,
    p: &mut Problems,
) -> RevocationConfig {
    let responder_key = s.key("ocsp_responder");
    let ocsp_responder = s
        .optional_string("ocsp_responder", p)
        .and_then(|text| http_url(&text, &responder_key, p));
    let urls_key = s.key("crl_urls");
    let crl_urls = s
        .string_list("crl_urls", &[], p)
        .into_iter()
        .enumerate()
        .filter(|(i, text)| {
            let key = format!("{urls_key}[{i}]");
            if !crate::syntax::ldap_url::is_ldap(text) {
                return http_url(text, &key, p).is_some();
            }
            let url = match crate::syntax::ldap_url::LdapUrl::parse(text) {
                Ok(url) => url,
                Err(e) => {
                    p.push(&key, &format!("\"{text}\": {e}"));
                    return false;
                }
            };
            let ldap = match directory {
                Some(DirectoryConfig::Ldap(ldap)) => ldap,
                _ => {
                    p.push(&key, "an ldap:// URL is read from the LDAP directory: configure directory.urls");
                    return false;
                }
            };
            match url.host_name() {
                Some(host) if !ldap.names_host(host) => {
                    p.push(&key, &format!("\"{text}\": host {host} is not one of directory.urls (leave it empty, ldap:///…, for the configured directory)"));
                    false
                }
                _ => true,
            }
        })
        .map(|(_, text)| text)
        .collect();
    RevocationConfig {
        ocsp: s.boolean("ocsp", false, p),
        ocsp_responder,
        ocsp_timeout: s.duration("ocsp_timeout", "5s", p),
        ocsp_max_age: s.duration("ocsp_max_age", "1h", p),
        danger_ocsp_soft_fail: s.boolean("danger_ocsp_soft_fail", false, p),
        crl_distribution_points: s.boolean("crl_distribution_points", false, p),
        crl_urls,
        crl_fetch_timeout: s.duration("crl_fetch_timeout", "10s", p),
        danger_crl_fetch_soft_fail: s.boolean("danger_crl_fetch_soft_fail", false, p),
    }
}

fn read_directory(s: &mut Section, p: &mut Problems) -> Option<DirectoryConfig> {
    if s.has("ldif_file") {
        let file = s.file("ldif_file", p);
        for key in ["urls", "base_dn", "bind_dn", "bind_password_file"] {
            if s.has(key) {
                p.push(&s.key(key), "cannot be combined with directory.ldif_file");
            }
        }
        return Some(DirectoryConfig::Ldif { file });
    }
    let urls = s.string_list("urls", &[], p);
    if urls.is_empty() && !p.has(&s.key("urls")) {
        p.push(
            &s.key("urls"),
            "required: one or more ldap:// or ldaps:// URLs (tried in order)",
        );
    }
    for (i, url) in urls.iter().enumerate() {
        if !(url.starts_with("ldap://") || url.starts_with("ldaps://")) {
            p.push(
                &format!("{}[{i}]", s.key("urls")),
                &format!("\"{url}\" is not an ldap:// or ldaps:// URL"),
            );
        }
    }
    let starttls = s.boolean("starttls", false, p);
    let ldap = LdapConfig {
        base_dn: s.required_string("base_dn", p).unwrap_or_default(),
        bind_dn: s.required_string("bind_dn", p).unwrap_or_default(),
        bind_password_file: s.file("bind_password_file", p),
        starttls,
        ca_file: s.optional_file("ca_file", p),
        connect_timeout: s.duration("connect_timeout", "3s", p),
        operation_timeout: s.duration("operation_timeout", "5s", p),
        pool_size: s.integer("pool_size", 4, 1, p),
        danger_allow_plaintext: s.boolean("danger_allow_plaintext", false, p),
        urls,
    };
    let uses_tls = ldap.starttls || ldap.urls.iter().any(|u| u.starts_with("ldaps://"));
    if uses_tls && ldap.ca_file.is_none() && !p.has(&s.key("ca_file")) {
        p.push(
            &s.key("ca_file"),
            "required with ldaps:// or starttls: the CA that issued the domain controllers' certificates (system roots are never trusted)",
        );
    }
    let plain = ldap.urls.iter().any(|u| u.starts_with("ldap://"));
    if plain && !ldap.starttls && !ldap.danger_allow_plaintext {
        p.push(
            &s.key("urls"),
            "ldap:// without starttls sends the bind password in clear; use ldaps://, set starttls = true, or set danger_allow_plaintext = true",
        );
    }
    Some(DirectoryConfig::Ldap(ldap))
}

fn read_device_rules(s: &mut Section, p: &mut Problems) -> DeviceRules {
    let default_allow = match s.string("default_action", "allow", p).as_str() {
        "allow" => true,
        "block" => false,
        other => {
            p.push(
                &s.key("default_action"),
                &format!("unknown action \"{other}\"; one of allow, block"),
            );
            true
        }
    };
    DeviceRules {
        default_allow,
        allow_device_ids: s.string_list("allow_device_ids", &[], p),
        block_device_ids: s.string_list("block_device_ids", &[], p),
        allow_device_types: s.string_list("allow_device_types", &[], p),
        block_device_types: s.string_list("block_device_types", &[], p),
        allow_user_agents: s.string_list("allow_user_agents", &[], p),
        block_user_agents: s.string_list("block_user_agents", &[], p),
    }
}

/// `identity.mode` and, in mode "kerberos", `[identity.kerberos]`.
fn read_identity_mode(s: &mut Section, p: &mut Problems) -> Option<KerberosConfig> {
    let mode = s.string("mode", "header", p);
    let mut k = s.section("kerberos", p);
    let kerberos = match mode.as_str() {
        "header" => {
            if !k.table.is_empty() {
                p.push(&k.path, "only used with identity.mode = \"kerberos\"");
                k.table.clear();
            }
            None
        }
        "kerberos" => Some(read_kerberos(&mut k, p)),
        other => {
            p.push(
                &s.key("mode"),
                &format!("unknown mode \"{other}\"; one of header, kerberos"),
            );
            None
        }
    };
    k.finish(p);
    kerberos
}

fn read_kerberos(s: &mut Section, p: &mut Problems) -> KerberosConfig {
    let keytab = s.file("keytab", p);
    let realm = s.required_string("realm", p).unwrap_or_default();
    if realm.contains(['@', '/', ' ']) {
        p.push(&s.key("realm"), &format!("\"{realm}\" is not a realm name"));
    }
    let principal = s.required_string("principal", p).unwrap_or_default();
    let principal = match principal.split_once('@') {
        None if !principal.is_empty() => format!("{principal}@{realm}"),
        Some((name, at)) if name.is_empty() || at.is_empty() => {
            p.push(
                &s.key("principal"),
                &format!("\"{principal}\" is not name@REALM"),
            );
            principal
        }
        _ => principal,
    };
    let target_spn = s.required_string("target_spn", p).unwrap_or_default();
    let spn_ok = target_spn
        .split_once('/')
        .is_some_and(|(service, host)| !service.is_empty() && !host.is_empty())
        && !target_spn.contains(['@', ',', ' ']);
    if !target_spn.is_empty() && !spn_ok {
        p.push(
            &s.key("target_spn"),
            &format!("\"{target_spn}\" is not one service principal name such as \"HTTP/mail.corp.example\" (no realm, no list)"),
        );
    }
    KerberosConfig {
        keytab,
        principal,
        realm,
        target_spn,
        refresh_before: s.duration("refresh_before", "1h", p),
        denial_ttl: s.duration("denial_ttl", "1m", p),
        max_credentials: s.integer("max_credentials", 100_000, 1, p) as u64,
        max_concurrent_exchanges: s.integer("max_concurrent_exchanges", 8, 1, p),
        max_queued_exchanges: s.integer("max_queued_exchanges", 5_000, 0, p),
        exchange_timeout: s.duration("exchange_timeout", "5s", p),
    }
}

fn read_identity(s: &mut Section, p: &mut Problems) -> Option<IdentityConfig> {
    let header_name = s.string("header", "X-Remote-User", p);
    let header = match http::HeaderName::from_bytes(header_name.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            p.push(
                &s.key("header"),
                &format!("\"{header_name}\" is not a valid header name"),
            );
            None
        }
    };
    let value = match s.string("value", "upn", p).as_str() {
        "upn" => IdentityValue::Upn,
        "domain-sam" => IdentityValue::DomainSam,
        "sam" => IdentityValue::Sam,
        other => {
            p.push(
                &s.key("value"),
                &format!("unknown value \"{other}\"; one of upn, domain-sam, sam"),
            );
            IdentityValue::Upn
        }
    };
    let netbios_domain = s.optional_string("netbios_domain", p);
    if value == IdentityValue::DomainSam && netbios_domain.is_none() {
        p.push(
            &s.key("netbios_domain"),
            "required when identity.value = \"domain-sam\"",
        );
    }
    let strip_headers = s.string_list("strip_headers", &[], p);
    for (i, h) in strip_headers.iter().enumerate() {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            p.push(
                &format!("{}[{i}]", s.key("strip_headers")),
                &format!("\"{h}\" is not a valid header name"),
            );
        }
    }
    Some(IdentityConfig {
        header: header?,
        value,
        netbios_domain,
        strip_headers,
    })
}

fn read_upstream(s: &mut Section, p: &mut Problems) -> Option<UpstreamConfig> {
    let url_text = s.required_string("url", p);
    let url = url_text.and_then(|text| match text.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http") | Some("https")) && u.host().is_some() => {
            Some(u)
        }
        _ => {
            p.push(
                &s.key("url"),
                &format!("\"{text}\" is not an http:// or https:// URL"),
            );
            None
        }
    });
    let path_prefix = s.string("path_prefix", "", p);
    // The prefix goes in front of every canonical path seg forwards, so it is canonical too:
    // segments of letters, digits, '-', '.', '_', '~', none empty, '.' or '..'.
    let canonical_segment = |segment: &str| {
        !matches!(segment, "" | "." | "..")
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    };
    if !path_prefix.is_empty()
        && !path_prefix
            .strip_prefix('/')
            .is_some_and(|rest| rest.split('/').all(canonical_segment))
    {
        p.push(
            &s.key("path_prefix"),
            "must be '/' then segments of letters, digits, '-', '.', '_', '~', none empty, '.' or '..', and not end with '/' (for example \"/SOGo\")",
        );
    }
    let ca_file = s.optional_file("ca_file", p);
    if let Some(u) = &url {
        if u.scheme_str() == Some("https") && ca_file.is_none() {
            p.push(
                &s.key("ca_file"),
                "required for an https:// upstream (system roots are never trusted)",
            );
        }
        if u.path() != "/" && !u.path().is_empty() {
            p.push(
                &s.key("url"),
                "must not carry a path; put it in upstream.path_prefix",
            );
        }
    }
    let request_timeout = s.duration("request_timeout", "3660s", p);
    if request_timeout < MIN_REQUEST_TIMEOUT {
        p.push(
            &s.key("request_timeout"),
            "must be at least 3600s: ActiveSync holds Ping and Sync for up to 3540 s",
        );
    }
    let forward_headers = {
        let key = s.key("forward_headers");
        s.string_list("forward_headers", &[], p)
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let lower = name.to_ascii_lowercase();
                match http::HeaderName::from_bytes(lower.as_bytes()) {
                    Err(_) => {
                        p.push(&format!("{key}[{i}]"), &format!("\"{name}\" is not a valid header name"));
                        None
                    }
                    Ok(_) if lower.contains('_') => {
                        p.push(
                            &format!("{key}[{i}]"),
                            &format!("\"{name}\" has a '_', which servers read as '-' or drop: name the header as the upstream reads it"),
                        );
                        None
                    }
                    Ok(_) if NOT_FORWARDABLE.contains(&lower.as_str()) || lower.starts_with("x-forwarded-") => {
                        p.push(
                            &format!("{key}[{i}]"),
                            &format!("\"{name}\" is seg's own to write or a credential; it is never forwarded (cookies: upstream.forward_cookies)"),
                        );
                        None
                    }
                    Ok(header) => Some(header),
                }
            })
            .collect()
    };
    let forward_cookies = s.string_list("forward_cookies", &[], p);
    for (i, name) in forward_cookies.iter().enumerate() {
        // RFC 6265 §4.1.1: a cookie name is an RFC 9110 token.
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            p.push(
                &format!("{}[{i}]", s.key("forward_cookies")),
                &format!("\"{name}\" is not a cookie name"),
            );
        } else if EXCHANGE_ROUTING_COOKIES
            .iter()
            .any(|c| c.eq_ignore_ascii_case(name))
        {
            p.push(
                &format!("{}[{i}]", s.key("forward_cookies")),
                &format!("\"{name}\" names the back end Exchange routes to (ProxyLogon, CVE-2021-26855); it is never forwarded"),
            );
        }
    }
    Some(UpstreamConfig {
        url: url?,
        path_prefix,
        ca_file,
        connect_timeout: s.duration("connect_timeout", "5s", p),
        max_connecting: s.integer("max_connecting", 64, 1, p),
        request_timeout,
        pool_max_idle_per_host: s.integer("pool_max_idle_per_host", 256, 0, p),
        pool_idle_timeout: s.duration("pool_idle_timeout", "90s", p),
        forward_headers,
        forward_cookies,
    })
}

impl UpstreamConfig {
    /// An upstream at `url` with every other key at its default.
    pub fn with_defaults(url: http::Uri) -> UpstreamConfig {
        UpstreamConfig {
            url,
            path_prefix: String::new(),
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            max_connecting: 64,
            request_timeout: Duration::from_secs(3660),
            pool_max_idle_per_host: 256,
            pool_idle_timeout: Duration::from_secs(90),
            forward_headers: Vec::new(),
            forward_cookies: Vec::new(),
        }
    }
}

#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn push(&mut self, key: &str, message: &str) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|p| p.key == key)
    }
}

/// One TOML table being consumed; keys left over at `finish` are unknown.
struct Section {
    path: String,
    table: toml::Table,
    base: PathBuf,
}

impl Section {
    fn root(table: toml::Table, base: &Path) -> Section {
        Section {
            path: String::new(),
            table,
            base: base.to_path_buf(),
        }
    }

    fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    fn section(&mut self, key: &str, p: &mut Problems) -> Section {
        let table = match self.table.remove(key) {
            Some(toml::Value::Table(t)) => t,
            Some(_) => {
                p.push(&self.key(key), "must be a table");
                toml::Table::new()
            }
            None => toml::Table::new(),
        };
        Section {
            path: self.key(key),
            table,
            base: self.base.clone(),
        }
    }

    /// An array of tables (`[[key]]`), each a section named `key[i]`.
    fn table_list(&mut self, key: &str, p: &mut Problems) -> Vec<Section> {
        let Some(v) = self.take(key, "array", p) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in v.as_array().into_iter().flatten().enumerate() {
            match item.as_table() {
                Some(t) => out.push(Section {
                    path: format!("{}[{i}]", self.key(key)),
                    table: t.clone(),
                    base: self.base.clone(),
                }),
                None => p.push(&format!("{}[{i}]", self.key(key)), "must be a table"),
            }
        }
        out
    }

    /// Every key of this table as a string pair; non-strings are problems.
    fn string_pairs(self, p: &mut Problems) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (key, value) in &self.table {
            match value.as_str() {
                Some(v) => out.push((key.to_ascii_uppercase(), v.to_string())),
                None => p.push(&self.key(key), "must be a string"),
            }
        }
        out
    }

    fn finish(self, p: &mut Problems) {
        for key in self.table.keys() {
            p.push(&self.key(key), "unknown key");
        }
    }

    fn take(&mut self, key: &str, kind: &str, p: &mut Problems) -> Option<toml::Value> {
        let v = self.table.remove(key)?;
        let ok = match kind {
            "string" => v.is_str(),
            "integer" => v.is_integer(),
            "boolean" => v.is_bool(),
            "array" => v.is_array(),
            _ => true,
        };
        if ok {
            Some(v)
        } else {
            p.push(
                &self.key(key),
                &format!("must be a {kind}, found {}", v.type_str()),
            );
            None
        }
    }

    fn optional_string(&mut self, key: &str, p: &mut Problems) -> Option<String> {
        let v = self.take(key, "string", p)?;
        v.as_str().map(str::to_string)
    }

    fn string(&mut self, key: &str, default: &str, p: &mut Problems) -> String {
        self.optional_string(key, p)
            .unwrap_or_else(|| default.to_string())
    }

    fn required_string(&mut self, key: &str, p: &mut Problems) -> Option<String> {
        let present = self.has(key);
        let v = self.optional_string(key, p);
        match &v {
            Some(s) if s.is_empty() => p.push(&self.key(key), "must not be empty"),
            None if !present => p.push(&self.key(key), "required"),
            _ => {}
        }
        v.filter(|s| !s.is_empty())
    }

    fn string_list(&mut self, key: &str, default: &[&str], p: &mut Problems) -> Vec<String> {
        let Some(v) = self.take(key, "array", p) else {
            return default.iter().map(|s| s.to_string()).collect();
        };
        let mut out = Vec::new();
        for (i, item) in v.as_array().into_iter().flatten().enumerate() {
            match item.as_str() {
                Some(s) => out.push(s.to_string()),
                None => p.push(&format!("{}[{i}]", self.key(key)), "must be a string"),
            }
        }
        out
    }

    fn boolean(&mut self, key: &str, default: bool, p: &mut Problems) -> bool {
        self.take(key, "boolean", p)
            .and_then(|v| v.as_bool())
            .unwrap_or(default)
    }

    fn integer(&mut self, key: &str, default: usize, min: usize, p: &mut Problems) -> usize {
        let Some(v) = self.take(key, "integer", p).and_then(|v| v.as_integer()) else {
            return default;
        };
        match usize::try_from(v) {
            Ok(n) if n >= min => n,
            _ => {
                p.push(&self.key(key), &format!("must be an integer ≥ {min}"));
                default
            }
        }
    }

    fn duration(&mut self, key: &str, default: &str, p: &mut Problems) -> Duration {
        let fallback = parse_duration(default).unwrap_or_default();
        let Some(text) = self.optional_string(key, p) else {
            return fallback;
        };
        match parse_duration(&text) {
            Some(d) if !d.is_zero() => d,
            Some(_) => {
                p.push(&self.key(key), "must be longer than zero");
                fallback
            }
            None => {
                p.push(
                    &self.key(key),
                    &format!("\"{text}\" is not a duration (for example \"250ms\", \"30s\", \"5m\", \"1h\")"),
                );
                fallback
            }
        }
    }

    fn socket_addr(&mut self, key: &str, default: Option<&str>, p: &mut Problems) -> SocketAddr {
        let fallback: SocketAddr = default
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let Some(text) = self.optional_string(key, p) else {
            return fallback;
        };
        text.parse().unwrap_or_else(|_| {
            p.push(
                &self.key(key),
                &format!("\"{text}\" is not an address:port (for example \"0.0.0.0:443\")"),
            );
            fallback
        })
    }

    fn resolve(&self, text: &str) -> PathBuf {
        let path = PathBuf::from(text);
        if path.is_absolute() {
            path
        } else {
            self.base.join(path)
        }
    }

    fn optional_file(&mut self, key: &str, p: &mut Problems) -> Option<PathBuf> {
        let text = self.optional_string(key, p)?;
        let path = self.resolve(&text);
        if let Err(e) = std::fs::File::open(&path) {
            p.push(
                &self.key(key),
                &format!("cannot read {}: {e}", path.display()),
            );
        }
        Some(path)
    }

    fn file_list(&mut self, key: &str, p: &mut Problems) -> Vec<PathBuf> {
        let names = self.string_list(key, &[], p);
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let path = self.resolve(name);
                if let Err(e) = std::fs::File::open(&path) {
                    p.push(
                        &format!("{}[{i}]", self.key(key)),
                        &format!("cannot read {}: {e}", path.display()),
                    );
                }
                path
            })
            .collect()
    }

    /// A file seg writes: it need not exist, its directory must.
    fn writable_file(&mut self, key: &str, p: &mut Problems) -> Option<PathBuf> {
        let text = self.optional_string(key, p)?;
        let path = self.resolve(&text);
        match path.parent().map(std::fs::metadata) {
            Some(Ok(m)) if m.is_dir() => {}
            Some(Err(e)) => p.push(
                &self.key(key),
                &format!("the directory of {} is unusable: {e}", path.display()),
            ),
            _ => p.push(
                &self.key(key),
                &format!("{} is not in a directory", path.display()),
            ),
        }
        Some(path)
    }

    fn file(&mut self, key: &str, p: &mut Problems) -> PathBuf {
        if !self.has(key) {
            p.push(&self.key(key), "required");
            return PathBuf::new();
        }
        self.optional_file(key, p).unwrap_or_default()
    }
}

/// Parses "250ms", "30s", "5m", "1h" or "2d".
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let millis = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        "d" => n.checked_mul(86_400_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("5 minutes"), None);
        assert_eq!(parse_duration("99999999999999999999d"), None);
    }

    #[test]
    fn many_to_one_rules_are_checked() {
        let text = r#"
            [mapping]
            rules = ["many-to-one"]
            [[mapping.many_to_one]]
            name = "kiosks"
            issuer = "O=Corp,CN=Corp CA"
            account = "kiosk"
            [mapping.many_to_one.subject]
            ST = "Bavaria"
            [[mapping.many_to_one]]
            name = "empty"
            issuer = "O=Corp,CN=Corp CA"
            account = "kiosk"
        "#;
        let err = Config::parse(text, Path::new("/"), "test.toml").unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(
            keys.contains(&"mapping.many_to_one[0].subject.ST"),
            "{keys:?}"
        );
        assert!(keys.contains(&"mapping.many_to_one[1].subject"), "{keys:?}");
    }

    #[test]
    fn every_problem_is_listed_with_its_key() {
        let text = r#"
            [listen]
            address = "nowhere"
            colour = "blue"
            [tls]
            certificate = "/nonexistent/cert.pem"
            [directory]
            urls = ["http://dc1"]
            [mapping]
            rules = ["upn", "telepathy"]
            [upstream]
            url = "http://eas.example"
            request_timeout = "60s"
            [bogus]
        "#;
        let err = Config::parse(text, Path::new("/"), "test.toml").unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "listen.address",
            "listen.colour",
            "tls.certificate",
            "tls.private_key",
            "tls.client_ca",
            "directory.urls[0]",
            "directory.base_dn",
            "directory.bind_dn",
            "directory.bind_password_file",
            "mapping.rules[1]",
            "upstream.request_timeout",
            "bogus",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

    #[test]
    fn forwarding_lists_and_the_session_lifetime_are_checked() {
        let text = r#"
            [tls]
            session_lifetime = "200h"
            [upstream]
            url = "http://eas.example"
            path_prefix = "/SOGo/../owa"
            forward_headers = ["X-Device-Note", "Authorization", "cookie", "X-Forwarded-Host", "bad header", "content_length"]
            forward_cookies = ["lb", "x-beresource", "a;b", "X-BackEndCookie"]
        "#;
        let err = Config::parse(text, Path::new("/"), "test.toml").unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "tls.session_lifetime",
            "upstream.forward_headers[1]",
            "upstream.forward_headers[2]",
            "upstream.forward_headers[3]",
            "upstream.forward_headers[4]",
            "upstream.forward_headers[5]",
            "upstream.forward_cookies[1]",
            "upstream.forward_cookies[2]",
            "upstream.forward_cookies[3]",
            "upstream.path_prefix",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
        for fine in ["upstream.forward_headers[0]", "upstream.forward_cookies[0]"] {
            assert!(!keys.contains(&fine), "{fine} refused: {keys:?}");
        }
    }

    #[test]
    fn the_fleet_section_is_checked() {
        let dir = std::env::temp_dir().join(format!("seg-fleet-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("short.keys"), "too short\n").unwrap();
        let text = r#"
            [fleet]
            url = "redis://:hunter2@store.corp.example:6379"
            key_file = "short.keys"
            ca_file = "absent.pem"
            timeout = "5s"
            key_prefix = "a b"
        "#;
        let err = Config::parse(text, &dir, "test.toml").unwrap_err();
        assert!(
            problem_of(&err, "fleet.url").contains("password_file"),
            "{err}"
        );
        assert!(problem_of(&err, "fleet.url").contains("rediss://"), "{err}");
        assert!(
            problem_of(&err, "fleet.key_file").contains("shorter than 32 bytes"),
            "{err}"
        );
        assert!(
            problem_of(&err, "fleet.ca_file").contains("cannot read"),
            "{err}"
        );
        assert!(
            problem_of(&err, "fleet.timeout").contains("between 1ms and 1s"),
            "{err}"
        );
        assert!(
            problem_of(&err, "fleet.key_prefix").contains("without spaces"),
            "{err}"
        );
        let err = Config::parse("[fleet]\nurl = \"memcached://x\"\n", &dir, "t.toml").unwrap_err();
        assert!(
            problem_of(&err, "fleet.url").contains("not a redis://"),
            "{err}"
        );
        assert!(
            problem_of(&err, "fleet.key_file").contains("required"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn problem_of(err: &ConfigError, key: &str) -> String {
        err.problems
            .iter()
            .filter(|p| p.key == key)
            .map(|p| p.message.clone())
            .collect::<Vec<_>>()
            .join("; ")
    }
}
