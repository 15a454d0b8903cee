//! A throwaway OpenLDAP `slapd` that looks enough like Active Directory for
//! the gateway's integration tests.
//!
//! Each [`Slapd`] gets its own directory under `std::env::temp_dir()`, holding
//! a small AD schema (`ad.schema`, real AD names and OIDs), `slapd.conf`
//! (old-style config, `mdb` backend), the generated `data.ldif`, the database
//! and `slapd.log`. Users are loaded offline with `slapadd -q` before slapd
//! starts in the foreground with `-d 256` (stats), so every operation,
//! including each `SRCH ... filter="..."`, lands in `slapd.log`.
//!
//! Directory layout (`<suffix>` is [`SlapdOptions::suffix`], default
//! `DC=corp,DC=test`):
//!
//! * `<suffix>`: `domain` (or `organization` / `organizationalUnit`,
//!   following the first RDN)
//! * `OU=Users,<suffix>`: one `CN=<sam>` `user` entry per [`UserSpec`]
//! * `OU=Groups,<suffix>`: a `group` entry for every `memberOf` value of the
//!   form `CN=<name>,OU=Groups,<suffix>`, with the matching `member` values
//! * `OU=Service,<suffix>`: `CN=svc-seg`, the gateway's simple-bind account
//!   ([`Slapd::bind_dn`], password [`SlapdOptions::bind_password`])
//!
//! Access: the service account and the rootdn (`CN=admin,<suffix>`, used by
//! [`Slapd::modify`]) read everything; anonymous may only bind. An anonymous
//! search fails with `noSuchObject` (32). There is no size limit.
//!
//! API:
//!
//! * [`UserSpec`] / [`UserSpec::new`]: one AD user
//! * [`TlsFiles`]: server certificate, key and CA PEM paths; with them slapd
//!   also listens on `ldaps://` (and StartTLS works on `ldap://`)
//! * [`SlapdOptions`] (`Default`: the default suffix, no users, password
//!   `svc-password`, no TLS)
//! * [`Slapd::start`], [`Slapd::ldap_url`], [`Slapd::ldaps_url`],
//!   [`Slapd::bind_dn`], [`Slapd::suffix`], [`Slapd::users_dn`], [`Slapd::log`],
//!   [`Slapd::search_filters`], [`Slapd::stop`], [`Slapd::restart`],
//!   [`Slapd::modify`]; dropping a `Slapd` kills it and removes its directory
//!   (kept, with its path printed, if the thread is panicking)
//! * [`bulk_users`]; binary SIDs come from `seg::identity::sid_from_text`
//!
//! Things slapd does that a test must know:
//!
//! * Returned DNs have lower-cased attribute types but keep value case:
//!   `CN=alice,OU=Users,DC=corp,DC=test` comes back as
//!   `cn=alice,ou=Users,dc=corp,dc=test`.
//! * The logged filter is slapd's *normalised* form, not the client's bytes:
//!   attribute names take their schema spelling, values are normalised by the
//!   equality rule (caseIgnore values lower-cased, runs of spaces collapsed and
//!   trimmed), `*`, `(`, `)`, `\`, NUL and every byte outside printable ASCII
//!   are written as `\XX` with upper-case hex, and other bytes literally
//!   (octet-string `\50` is logged as `P`). A client filter
//!   `(userPrincipalName=a\2ab\28\29\5c\00@x)` is logged as
//!   `(userPrincipalName=a\2Ab\28\29\5C\00@x)`. A component slapd cannot
//!   evaluate (unknown attribute, value invalid for the syntax such as
//!   `userAccountControl=0512`, or a rule the attribute lacks) is logged with
//!   a `?` in front: `(?foo=bar)`.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::ldif::{escape_rdn_value, ldif_line};

/// The suffix used by [`SlapdOptions::default`].
pub const DEFAULT_SUFFIX: &str = "DC=corp,DC=test";

const MISSING_TOOLS: &str = "slapd not found: install it with `apt-get install slapd ldap-utils` \
     (the README's test command ./tests/run.sh does this)";
const ROOT_PASSWORD: &str = "slapd-root-secret";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const START_ATTEMPTS: usize = 3;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// One Active Directory user, stored as `CN=<sam>,OU=Users,<suffix>` with
/// `cn` and `sn` equal to `sam`. `None` and empty lists leave the attribute out.
#[derive(Clone, Debug)]
pub struct UserSpec {
    /// `sAMAccountName`, also the entry's `cn` and `sn`.
    pub sam: String,
    /// `userPrincipalName`.
    pub upn: Option<String>,
    /// `mail`.
    pub mail: Option<String>,
    /// `altSecurityIdentities` values, e.g. `X509:<I>DC=test,CN=CA<SR>0102`.
    pub alt_security_identities: Vec<String>,
    /// `userAccountControl`: 512 normal, 514 disabled.
    pub user_account_control: u32,
    /// `accountExpires` as a FILETIME; `None` leaves the attribute absent.
    pub account_expires: Option<i64>,
    /// Binary `objectSid` (`seg::identity::sid_from_text`).
    pub object_sid: Option<Vec<u8>>,
    /// `proxyAddresses`, e.g. `SMTP:alice@corp.test`.
    pub proxy_addresses: Vec<String>,
    /// `whenCreated` as GeneralizedTime, e.g. `20240101000000.0Z`.
    pub when_created: Option<String>,
    /// `memberOf` group DNs.
    pub member_of: Vec<String>,
    /// `lockoutTime` (FILETIME), `None` = attribute absent.
    pub lockout_time: Option<i64>,
    /// A computer account (objectClass `computer`, a subclass of `user`) instead of a user.
    pub computer: bool,
    /// `dNSHostName`, for computer accounts.
    pub dns_host_name: Option<String>,
}

impl UserSpec {
    /// An enabled user with the UPN `sam@corp.test`, created in 2020: before any test
    /// certificate, so a weak (UPN) mapping in compatibility mode admits it.
    pub fn with_upn(sam: &str) -> Self {
        let mut user = UserSpec::new(sam);
        user.upn = Some(format!("{sam}@corp.test"));
        user.when_created = Some("20200101000000.0Z".into());
        user
    }

    /// A normal enabled user (`userAccountControl: 512`) with nothing else set.
    pub fn new(sam: &str) -> Self {
        UserSpec {
            sam: sam.to_string(),
            upn: None,
            mail: None,
            alt_security_identities: Vec::new(),
            user_account_control: 512,
            account_expires: None,
            object_sid: None,
            proxy_addresses: Vec::new(),
            when_created: None,
            member_of: Vec::new(),
            lockout_time: None,
            computer: false,
            dns_host_name: None,
        }
    }
}

/// PEM files for slapd's TLS listener. The key must be readable by the user
/// running the tests (slapd runs as that user).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Server certificate (chain) PEM; give it `subjectAltName IP:127.0.0.1`.
    pub cert: PathBuf,
    /// The certificate's private key PEM.
    pub key: PathBuf,
    /// CA certificate PEM.
    pub ca: PathBuf,
}

/// What to put in the directory and how to serve it.
#[derive(Clone, Debug)]
pub struct SlapdOptions {
    /// Database suffix, e.g. `DC=corp,DC=test`.
    pub suffix: String,
    /// Users loaded under `OU=Users,<suffix>`.
    pub users: Vec<UserSpec>,
    /// `userPassword` of the service account [`Slapd::bind_dn`].
    pub bind_password: String,
    /// With `Some`, slapd also listens on `ldaps://`.
    pub tls: Option<TlsFiles>,
    /// slapd's `sizelimit` for every search (the rootdn excepted); `None`: unlimited.
    pub size_limit: Option<u32>,
}

impl Default for SlapdOptions {
    fn default() -> Self {
        SlapdOptions {
            suffix: DEFAULT_SUFFIX.to_string(),
            users: Vec::new(),
            bind_password: "svc-password".to_string(),
            tls: None,
            size_limit: None,
        }
    }
}

/// A running slapd with its own temporary directory.
pub struct Slapd {
    child: Option<Child>,
    dir: PathBuf,
    conf: PathBuf,
    log_path: PathBuf,
    slapd_bin: PathBuf,
    ldap_port: u16,
    ldaps_port: Option<u16>,
    suffix: String,
}

impl Slapd {
    /// Creates the directory, loads the entries with `slapadd`, starts slapd
    /// on free 127.0.0.1 ports and waits until it accepts connections.
    ///
    /// Panics with install instructions if slapd is missing, and with the
    /// log tail if slapd does not come up within 10 s.
    pub fn start(opts: SlapdOptions) -> Slapd {
        let slapd_bin = find_tool("slapd");
        let slapadd_bin = find_tool("slapadd");
        if let Some(tls) = &opts.tls {
            for path in [&tls.cert, &tls.key, &tls.ca] {
                if let Err(e) = fs::File::open(path) {
                    panic!("slapd TLS file {} is not readable: {e}", path.display());
                }
            }
        }

        let dir = std::env::temp_dir().join(format!(
            "seg-slapd-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let db = dir.join("db");
        fs::create_dir_all(&db).unwrap_or_else(|e| panic!("creating {}: {e}", db.display()));
        let schema = dir.join("ad.schema");
        let conf = dir.join("slapd.conf");
        let ldif = dir.join("data.ldif");
        write_file(&schema, AD_SCHEMA);
        write_file(&conf, &slapd_conf(&opts, &schema, &db));
        write_file(&ldif, &directory_ldif(&opts));

        let out = Command::new(&slapadd_bin)
            .arg("-q")
            .arg("-f")
            .arg(&conf)
            .arg("-l")
            .arg(&ldif)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", slapadd_bin.display()));
        if !out.status.success() {
            panic!(
                "slapadd failed ({}) in {}:\n{}{}",
                out.status,
                dir.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let mut slapd = Slapd {
            child: None,
            log_path: dir.join("slapd.log"),
            dir,
            conf,
            slapd_bin,
            ldap_port: 0,
            ldaps_port: None,
            suffix: opts.suffix,
        };
        // Another process may grab a port between our probe and slapd's bind;
        // retry with fresh ports when that is why slapd exited.
        for attempt in 1..=START_ATTEMPTS {
            slapd.ldap_port = free_port();
            slapd.ldaps_port = opts.tls.as_ref().map(|_| free_port());
            match slapd.spawn() {
                Ok(()) => return slapd,
                Err(tail) if attempt < START_ATTEMPTS && tail.contains("errno=98") => continue,
                Err(tail) => panic!("slapd did not start ({}):\n{tail}", slapd.dir.display()),
            }
        }
        unreachable!("the last start attempt either returns or panics")
    }

    /// `ldap://127.0.0.1:PORT`.
    pub fn ldap_url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.ldap_port)
    }

    /// `ldaps://127.0.0.1:PORT`; panics if started without TLS files.
    pub fn ldaps_url(&self) -> String {
        match self.ldaps_port {
            Some(port) => format!("ldaps://127.0.0.1:{port}"),
            None => panic!("this slapd was started without TlsFiles, so it has no ldaps:// URL"),
        }
    }

    /// The service account: `CN=svc-seg,OU=Service,<suffix>`.
    pub fn bind_dn(&self) -> String {
        service_dn(&self.suffix)
    }

    /// The database suffix, as given in [`SlapdOptions::suffix`].
    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    /// `OU=Users,<suffix>`, where the users live.
    pub fn users_dn(&self) -> String {
        format!("OU=Users,{}", self.suffix)
    }

    /// slapd's whole stats log so far, across restarts.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Every `filter="..."` of a `SRCH` line in the log, in order, exactly as
    /// slapd logged it (its normalised form; see the module documentation).
    pub fn search_filters(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|line| line.contains(" SRCH base="))
            .filter_map(|line| {
                let start = line.find(" filter=\"")? + " filter=\"".len();
                Some(
                    line[start..]
                        .strip_suffix('"')
                        .unwrap_or(&line[start..])
                        .to_string(),
                )
            })
            .collect()
    }

    /// Stops slapd (SIGTERM, SIGKILL after 5 s) and waits for it to exit.
    /// The ports then refuse connections; [`Slapd::restart`] brings it back.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let terminated = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        if terminated {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts slapd again on the same ports and data, and waits until ready.
    /// Stops it first if it is still running.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(tail) = self.spawn() {
            panic!("slapd did not restart ({}):\n{tail}", self.dir.display());
        }
    }

    /// Runs `ldapmodify` as the rootdn against [`Slapd::ldap_url`]. `ldif`
    /// holds change records, each with its own `changetype:` line.
    /// Panics with ldapmodify's output on failure.
    pub fn modify(&self, ldif: &str) {
        let bin = find_tool("ldapmodify");
        let mut child = Command::new(&bin)
            .args([
                "-x",
                "-H",
                &self.ldap_url(),
                "-D",
                &root_dn(&self.suffix),
                "-w",
                ROOT_PASSWORD,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
        // A write error means ldapmodify exited early; its output says why.
        let _ = child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(ldif.as_bytes());
        let out = child.wait_with_output().expect("waiting for ldapmodify");
        if !out.status.success() {
            panic!(
                "ldapmodify failed ({}):\n{}{}\nLDIF was:\n{ldif}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Launches slapd on the current ports and waits for it. On failure the
    /// process is reaped and the new part of the log is returned.
    fn spawn(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log_path.display()));
        let log_start = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let mut urls = self.ldap_url();
        if let Some(port) = self.ldaps_port {
            write!(urls, " ldaps://127.0.0.1:{port}").expect("writing to a String");
        }
        let stdout = log.try_clone().expect("duplicating the log file handle");
        let mut child = Command::new(&self.slapd_bin)
            .arg("-f")
            .arg(&self.conf)
            .args(["-h", &urls, "-d", "256"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.slapd_bin.display()));

        let addr = SocketAddr::from(([127, 0, 0, 1], self.ldap_port));
        let deadline = Instant::now() + READY_TIMEOUT;
        let failure = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break format!("slapd exited with {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break format!("slapd not ready after {READY_TIMEOUT:?}");
            }
            let started = self
                .log()
                .get(log_start..)
                .is_some_and(|l| l.contains("slapd starting"));
            if started && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let log = self.log();
        let new = log.get(log_start..).unwrap_or(&log);
        let lines: Vec<&str> = new.lines().collect();
        Err(format!(
            "{failure}; log tail:\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        ))
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "slapd test directory kept for inspection: {}",
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// `n` enabled users `user00001`, `user00002`, ... with `userPrincipalName`
/// and `mail` both `userNNNNN@<domain>`.
pub fn bulk_users(n: usize, domain: &str) -> Vec<UserSpec> {
    (1..=n)
        .map(|i| {
            let sam = format!("user{i:05}");
            let address = format!("{sam}@{domain}");
            UserSpec {
                upn: Some(address.clone()),
                mail: Some(address),
                ..UserSpec::new(&sam)
            }
        })
        .collect()
}

/// AD attribute types and object classes under their real names and OIDs.
const AD_SCHEMA: &str = "\
attributetype ( 1.2.840.113556.1.4.656 NAME 'userPrincipalName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.221 NAME 'sAMAccountName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.867 NAME 'altSecurityIdentities'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 1.2.840.113556.1.4.8 NAME 'userAccountControl'
  EQUALITY integerMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.159 NAME 'accountExpires'
  EQUALITY integerMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.146 NAME 'objectSid'
  EQUALITY octetStringMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.2 NAME 'objectGUID'
  EQUALITY octetStringMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.40 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.2.102 NAME 'memberOf'
  EQUALITY distinguishedNameMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.12 )
attributetype ( 1.2.840.113556.1.4.750 NAME 'groupType'
  EQUALITY integerMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.2.210 NAME 'proxyAddresses'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 )
attributetype ( 1.2.840.113556.1.2.2 NAME 'whenCreated'
  EQUALITY generalizedTimeMatch ORDERING generalizedTimeOrderingMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.24 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.662 NAME 'lockoutTime'
  EQUALITY integerMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.27 SINGLE-VALUE )
attributetype ( 1.2.840.113556.1.4.619 NAME 'dNSHostName'
  EQUALITY caseIgnoreMatch SUBSTR caseIgnoreSubstringsMatch
  SYNTAX 1.3.6.1.4.1.1466.115.121.1.15 SINGLE-VALUE )
objectclass ( 1.2.840.113556.1.5.9 NAME 'user'
  SUP organizationalPerson STRUCTURAL
  MAY ( userPrincipalName $ sAMAccountName $ altSecurityIdentities $
        userAccountControl $ accountExpires $ objectSid $ objectGUID $
        memberOf $ groupType $ proxyAddresses $ whenCreated $ lockoutTime $
        dNSHostName $ mail ) )
objectclass ( 1.2.840.113556.1.5.30 NAME 'computer'
  SUP user STRUCTURAL )
objectclass ( 1.2.840.113556.1.5.8 NAME 'group'
  SUP top STRUCTURAL MUST cn
  MAY ( member $ groupType $ sAMAccountName $ objectSid ) )
";

fn slapd_conf(opts: &SlapdOptions, schema: &Path, db: &Path) -> String {
    let mut conf = String::new();
    // core defines `member`/`userPassword`, cosine `mail` and `domain`.
    for file in [
        "/etc/ldap/schema/core.schema",
        "/etc/ldap/schema/cosine.schema",
    ] {
        conf_line(&mut conf, "include", &[file]);
    }
    conf_line(&mut conf, "include", &[&schema.display().to_string()]);
    if let Some(tls) = &opts.tls {
        conf_line(
            &mut conf,
            "TLSCACertificateFile",
            &[&tls.ca.display().to_string()],
        );
        conf_line(
            &mut conf,
            "TLSCertificateFile",
            &[&tls.cert.display().to_string()],
        );
        conf_line(
            &mut conf,
            "TLSCertificateKeyFile",
            &[&tls.key.display().to_string()],
        );
    }
    let size_limit = opts
        .size_limit
        .map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    conf_line(&mut conf, "sizelimit", &[&size_limit]);
    conf_line(&mut conf, "modulepath", &["/usr/lib/ldap"]);
    conf_line(&mut conf, "moduleload", &["back_mdb"]);
    conf_line(&mut conf, "database", &["mdb"]);
    conf_line(&mut conf, "suffix", &[&opts.suffix]);
    conf_line(&mut conf, "rootdn", &[&root_dn(&opts.suffix)]);
    conf_line(&mut conf, "rootpw", &[ROOT_PASSWORD]);
    conf_line(&mut conf, "directory", &[&db.display().to_string()]);
    conf_line(&mut conf, "maxsize", &["1073741824"]);
    conf_line(&mut conf, "index", &["objectClass", "eq"]);
    conf_line(
        &mut conf,
        "index",
        &["userPrincipalName,sAMAccountName,altSecurityIdentities,mail,proxyAddresses,objectSid,dNSHostName", "eq"],
    );
    conf_line(
        &mut conf,
        "access",
        &[
            "to",
            "attrs=userPassword",
            "by",
            "anonymous",
            "auth",
            "by",
            "*",
            "none",
        ],
    );
    let reader = format!("dn.exact={}", service_dn(&opts.suffix));
    conf_line(
        &mut conf,
        "access",
        &["to", "*", "by", &reader, "read", "by", "*", "none"],
    );
    conf
}

/// Appends one slapd.conf directive, quoting each argument.
fn conf_line(conf: &mut String, directive: &str, args: &[&str]) {
    conf.push_str(directive);
    for arg in args {
        let quoted = arg.replace('\\', "\\\\").replace('"', "\\\"");
        write!(conf, " \"{quoted}\"").expect("writing to a String");
    }
    conf.push('\n');
}

fn root_dn(suffix: &str) -> String {
    format!("CN=admin,{suffix}")
}

fn service_dn(suffix: &str) -> String {
    format!("CN=svc-seg,OU=Service,{suffix}")
}

/// The suffix entry, the OUs, the service account, the users and their groups.
fn directory_ldif(opts: &SlapdOptions) -> String {
    let suffix = &opts.suffix;
    let mut out = String::new();

    let first_rdn = suffix.split(',').next().unwrap_or_default();
    let (rdn_type, rdn_value) = first_rdn
        .split_once('=')
        .unwrap_or_else(|| panic!("suffix {suffix:?} does not start with an attribute=value RDN"));
    let (classes, attr): (&[&str], &str) = match rdn_type.trim().to_ascii_lowercase().as_str() {
        "dc" => (&["top", "domain"], "dc"),
        "o" => (&["top", "organization"], "o"),
        "ou" => (&["top", "organizationalUnit"], "ou"),
        other => panic!("unsupported suffix RDN type {other:?} in {suffix:?} (use DC=, O= or OU=)"),
    };
    entry(
        &mut out,
        suffix,
        classes,
        &[(attr, rdn_value.trim().as_bytes())],
    );
    for ou in ["Users", "Groups", "Service"] {
        let dn = format!("OU={ou},{suffix}");
        entry(
            &mut out,
            &dn,
            &["top", "organizationalUnit"],
            &[("ou", ou.as_bytes())],
        );
    }
    let user_classes: &[&str] = &["top", "person", "organizationalPerson", "user"];
    entry(
        &mut out,
        &service_dn(suffix),
        user_classes,
        &[
            ("cn", "svc-seg".as_bytes()),
            ("sn", "svc-seg".as_bytes()),
            ("sAMAccountName", "svc-seg".as_bytes()),
            ("userAccountControl", "512".as_bytes()),
            ("userPassword", opts.bind_password.as_bytes()),
        ],
    );

    let groups_suffix = format!(",OU=Groups,{suffix}").to_ascii_lowercase();
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for user in &opts.users {
        let dn = format!("CN={},OU=Users,{suffix}", escape_rdn_value(&user.sam));
        let uac = user.user_account_control.to_string();
        let expires = user.account_expires.map(|v| v.to_string());
        let lockout = user.lockout_time.map(|v| v.to_string());
        let mut attrs: Vec<(&str, &[u8])> = vec![
            ("cn", user.sam.as_bytes()),
            ("sn", user.sam.as_bytes()),
            ("sAMAccountName", user.sam.as_bytes()),
            ("userAccountControl", uac.as_bytes()),
        ];
        let optional = [
            ("userPrincipalName", user.upn.as_deref().map(str::as_bytes)),
            ("mail", user.mail.as_deref().map(str::as_bytes)),
            ("accountExpires", expires.as_deref().map(str::as_bytes)),
            ("lockoutTime", lockout.as_deref().map(str::as_bytes)),
            (
                "dNSHostName",
                user.dns_host_name.as_deref().map(str::as_bytes),
            ),
            ("objectSid", user.object_sid.as_deref()),
            (
                "whenCreated",
                user.when_created.as_deref().map(str::as_bytes),
            ),
        ];
        attrs.extend(
            optional
                .into_iter()
                .filter_map(|(name, value)| Some((name, value?))),
        );
        attrs.extend(
            user.alt_security_identities
                .iter()
                .map(|v| ("altSecurityIdentities", v.as_bytes())),
        );
        attrs.extend(
            user.proxy_addresses
                .iter()
                .map(|v| ("proxyAddresses", v.as_bytes())),
        );
        attrs.extend(user.member_of.iter().map(|v| ("memberOf", v.as_bytes())));
        let computer_classes: Vec<&str> = user_classes
            .iter()
            .copied()
            .chain(std::iter::once("computer"))
            .collect();
        let classes = if user.computer {
            &computer_classes[..]
        } else {
            user_classes
        };
        entry(&mut out, &dn, classes, &attrs);

        for group in &user.member_of {
            // Only plain `CN=name,OU=Groups,<suffix>` DNs get a group entry.
            let lower = group.to_ascii_lowercase();
            let Some(cn) = lower
                .strip_suffix(&groups_suffix)
                .and_then(|rdn| rdn.strip_prefix("cn="))
            else {
                continue;
            };
            if cn.contains([',', '+', '\\', '=']) {
                continue;
            }
            match groups
                .iter_mut()
                .find(|(g, _)| g.eq_ignore_ascii_case(group))
            {
                Some((_, members)) => members.push(dn.clone()),
                None => groups.push((group.clone(), vec![dn.clone()])),
            }
        }
    }
    for (dn, members) in &groups {
        let cn = &dn["CN=".len()..dn.len() - groups_suffix.len()];
        let mut attrs: Vec<(&str, &[u8])> =
            vec![("cn", cn.as_bytes()), ("sAMAccountName", cn.as_bytes())];
        attrs.extend(members.iter().map(|m| ("member", m.as_bytes())));
        entry(&mut out, dn, &["top", "group"], &attrs);
    }
    out
}

/// Appends one LDIF entry.
fn entry(out: &mut String, dn: &str, classes: &[&str], attrs: &[(&str, &[u8])]) {
    ldif_line(out, "dn", dn.as_bytes());
    for class in classes {
        ldif_line(out, "objectClass", class.as_bytes());
    }
    for (name, value) in attrs {
        ldif_line(out, name, value);
    }
    out.push('\n');
}

fn write_file(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

/// Finds an OpenLDAP tool in the sbin directories or on PATH.
fn find_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/usr/local/sbin", "/sbin"]
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{MISSING_TOOLS} [{name} is missing]"))
}
