//! A real Samba 4 Active Directory domain controller for the gateway's
//! integration tests: the real AD schema, `objectSid`, `tokenGroups`, the
//! in-chain matching rule, `userAccountControl` semantics and a KDC.
//!
//! [`Samba::start`] takes a machine-wide lock, provisions the domain
//! `CORP.TEST` (NetBIOS `CORP`, DC `dc1`, base DN `DC=corp,DC=test`) into a
//! fresh directory under `std::env::temp_dir()` with `samba-tool domain
//! provision` (nothing in /etc, /var or /run is touched), runs
//! `samba -i -M single` in the foreground with only the `ldap` and `kdc`
//! services, and returns once a bound LDAPS search answers. Dropping the
//! [`Samba`] stops it (SIGTERM, SIGKILL after 5 s), releases the lock and
//! removes the directory (kept, with its path printed, if the thread is
//! panicking).
//!
//! Directory layout (`DIR`): `seed.conf` (the provisioning seed),
//! `etc/smb.conf`, `private/sam.ldb` (the directory), `tls/` (copies of the
//! caller's PEM files), `krb5.conf` (realm `CORP.TEST`, KDC `127.0.0.1:88`),
//! `run/` (pid file and sockets), `samba.log` (samba's stdout and stderr).
//!
//! API:
//!
//! * [`SambaTls`]: server certificate, key and CA PEM paths (give the
//!   certificate `subjectAltName IP:127.0.0.1, DNS:localhost,
//!   DNS:dc1.corp.test`)
//! * [`Samba::start`], [`Samba::shared`] (one per test process)
//! * [`Samba::ldaps_url`], [`Samba::base_dn`], [`Samba::admin_dn`],
//!   [`Samba::admin_password`], [`Samba::ca_file`], [`Samba::krb5_conf`],
//!   [`Samba::dir`], [`Samba::log`]
//! * [`Samba::create_user`] (password [`USER_PASSWORD`]), [`Samba::create_users`],
//!   [`Samba::create_computer`], [`Samba::create_group`],
//!   [`Samba::add_member`], [`Samba::dn_of`], [`Samba::object_sid`]
//! * [`Samba::modify`], [`Samba::set_attribute`], [`Samba::disable`],
//!   [`Samba::set_expired`], [`Samba::set_locked`]
//! * [`Samba::search`], [`Samba::search_scoped`] (raw `ldapsearch -LLL`
//!   output), [`strip_references`]
//!
//! All reads and writes go over LDAPS as `Administrator` with the OpenLDAP
//! command-line tools (`LDAPTLS_CACERT` set to the copied CA), never behind
//! the running server's back through `sam.ldb`.
//!
//! Traps, all verified against Samba 4.17.12 (Debian 12):
//!
//! * Only one Samba DC can run on a machine: its ports are fixed (88, 389,
//!   464, 636, 3268, 3269 on 127.0.0.1 and ::1). [`Samba::start`] therefore
//!   holds the lock file `/tmp/seg-samba.lock` (holder pid, its start time
//!   and its directory) for the whole life of the `Samba`, waiting up to
//!   120 s for a live holder; a lock whose holder has died is broken and the
//!   dead holder's directory removed. Inside one process a second `start`
//!   waits for the first `Samba` to be dropped, so a `Samba` kept in a
//!   `static` blocks every later `start` in that process: use
//!   [`Samba::shared`] there.
//! * A `static` is never dropped. samba runs with `-i` and a pipe on its
//!   stdin, and exits by itself ("EOF on stdin") when the test process ends
//!   however it ends, so no samba outlives its test binary; the lock file and
//!   directory left behind are cleaned up by the next `start`.
//! * Root is needed: samba binds ports below 1024 and provisioning writes NT
//!   ACLs (`security.NTACL` xattrs) on sysvol.
//! * Samba refuses a TLS private key that is not mode 0600 and owned by the
//!   user running it ("Invalid permissions on TLS private key file ...
//!   CVE-2013-4476"), and then the whole server exits. `start` copies the
//!   key into `DIR/tls/` with mode 0600, so any readable key works.
//! * Samba's self-generated certificate has no subjectAltName; the caller's
//!   certificate is used instead. Plain `ldap://` simple binds are refused
//!   (strong auth required): use [`Samba::ldaps_url`].
//! * Without `-s seed.conf`, provisioning copies /etc/samba/smb.conf. The
//!   generated smb.conf still puts the pid file and sockets under /run/samba;
//!   `start` moves them into `DIR/run/`.
//! * Subtree searches from `DC=corp,DC=test` return one search result
//!   reference, `ldaps://corp.test/CN=Configuration,DC=corp,DC=test`, next
//!   to the entries (none from `CN=Users,...`); `ldapsearch -LLL` prints it
//!   as a line `# refldaps://corp.test/CN=Configuration,DC=corp,DC=test`
//!   followed by a blank line ([`strip_references`] removes both). A client
//!   must ignore references, not chase them. Entries come back unsorted and
//!   attributes in Samba's stored order, not the requested one.
//! * `tokenGroups` (binary SIDs of every group, transitively, plus the
//!   primary group `...-513` and `S-1-5-32-545` Users) is only returned by a
//!   base-scope search; a subtree search asking for it fails with
//!   `Operations error (1)`, "Cannot provide tokenGroups attribute, this is
//!   not a BASE search". Direct `memberOf` lists neither the primary group
//!   nor nested groups. The in-chain rule
//!   `(memberOf:1.2.840.113556.1.4.1941:=<group DN>)` matches nested groups
//!   as well as users: add `(objectClass=user)`/`(objectCategory=person)`.
//! * `altSecurityIdentities`, `mail` and `userPrincipalName` match
//!   case-insensitively (equality and substring).
//! * `lockoutTime` can be written directly (real AD only accepts 0): the
//!   account then shows bit 16 in `msDS-User-Account-Control-Computed`, not in
//!   `userAccountControl`, and its binds fail with 49 `data 775`; writing 0
//!   unlocks. An expired `accountExpires` shows in neither attribute: a
//!   client must compare it with the clock. LDAP-created users get
//!   `accountExpires: 9223372036854775807` (never).
//! * Samba answers a bind but not the WhoAmI extended operation
//!   (`ldapwhoami` fails with protocol error 2 after a successful bind); test
//!   a password with `ldapsearch` instead.
//! * Default password policy: complexity on, so passwords need three
//!   character classes. `unicodePwd` can only be written over an encrypted
//!   connection, as the quoted password in UTF-16LE.
//! * Speed: provisioning 4-6 s, samba answering 0.5 s after it starts, so
//!   `start` takes ~5 s (8-14 s on a machine busy compiling). Every helper
//!   call is one `ldapsearch`/`ldapmodify` process with its own TLS handshake
//!   and bind, 25-50 ms; a user costs ~25 ms more for hashing its password
//!   into Kerberos keys ([`Samba::create_users`] loads many in one process,
//!   ~22-30 ms per user). `ldb:nosync = true` (Samba's own test-suite
//!   setting) is set: without it every write is fsynced and an add without
//!   password took 63 ms instead of 5 ms of server time.
//! * `samba-tool` starts Python each time (~0.5 s per call), which is why
//!   users, groups and computers are created over LDAPS instead.
//!   `samba-tool computer create` makes a *disabled* account
//!   (`userAccountControl: 4098`) without `dNSHostName`.
//! * A long bulk load blocks the single-process server, its KDC included.
//!   Keep it to a few hundred users.

use std::fmt::Write as _;
use std::fs;
use std::io::{ErrorKind, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

use super::ldif::{escape_rdn_value, ldif_line};

/// The domain's base DN.
pub const BASE_DN: &str = "DC=corp,DC=test";
/// The Kerberos realm.
pub const REALM: &str = "CORP.TEST";
/// The DNS domain (lower-case realm); user principal names use it.
pub const DNS_DOMAIN: &str = "corp.test";
/// The NetBIOS domain name.
pub const NETBIOS_DOMAIN: &str = "CORP";
/// The password of `Administrator`.
pub const ADMIN_PASSWORD: &str = "Seg-Admin-Pass1!";
/// The password every user made by [`Samba::create_user`] gets.
pub const USER_PASSWORD: &str = "Seg-User-Pass1!";

const MISSING_TOOLS: &str = "samba not found: install it with \
     `apt-get install samba samba-dsdb-modules ldb-tools krb5-user ldap-utils` \
     (the README's test command ./tests/run.sh does this)";
const LOCK_PATH: &str = "/tmp/seg-samba.lock";
const LOCK_TIMEOUT: Duration = Duration::from_secs(120);
const PORTS_FREE_TIMEOUT: Duration = Duration::from_secs(15);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Ports Samba's ldap and kdc services bind on 127.0.0.1.
const PORTS: [u16; 6] = [88, 389, 464, 636, 3268, 3269];
/// Difference between the FILETIME epoch (1601) and the Unix epoch, in seconds.
const FILETIME_UNIX_OFFSET: u64 = 11_644_473_600;

static COUNTER: AtomicUsize = AtomicUsize::new(0);
/// Whether a `Samba` of this process holds the machine lock, and its signal.
static IN_PROCESS: (Mutex<bool>, Condvar) = (Mutex::new(false), Condvar::new());

/// PEM files for Samba's LDAPS listener. They are copied into the Samba
/// directory (the key with mode 0600), so they only need to be readable.
#[derive(Clone, Debug)]
pub struct SambaTls {
    /// Server certificate PEM, with `subjectAltName IP:127.0.0.1,
    /// DNS:localhost, DNS:dc1.corp.test`.
    pub cert: PathBuf,
    /// The certificate's private key PEM (unencrypted).
    pub key: PathBuf,
    /// The CA certificate PEM that signed `cert`.
    pub ca: PathBuf,
}

/// The keytabs [`Samba::setup_delegation`] exported.
pub struct DelegationKeytabs {
    /// `svc-seg` and `HTTP/seg.corp.test`: the gateway's.
    pub seg: PathBuf,
    /// `HTTP/eas.corp.test`: the backend's.
    pub eas: PathBuf,
}

impl DelegationKeytabs {
    /// seg's `[identity]` for these keytabs: Kerberos as `svc-seg`, to `HTTP/eas.corp.test`.
    pub fn identity_config(&self) -> String {
        format!(
            r#"
[identity]
mode = "kerberos"

[identity.kerberos]
keytab = "{keytab}"
principal = "svc-seg"
realm = "{REALM}"
target_spn = "HTTP/eas.corp.test"
"#,
            keytab = self.seg.display()
        )
    }
}

/// A running Samba AD DC for `CORP.TEST` with its own temporary directory.
pub struct Samba {
    child: Option<Child>,
    dir: PathBuf,
    log_path: PathBuf,
    ca: PathBuf,
    lock: Option<MachineLock>,
}

impl Samba {
    /// [`Samba::start`] with a DC certificate (`dc1.corp.test`, `localhost`) issued by the
    /// test's PKI, so seg trusts the DC's LDAPS through the test CA.
    pub fn start_with_pki(pki: &super::lab::Pki) -> Samba {
        let mut spec = seg::demo::pki::LeafSpec::loopback_server();
        spec.dns_names.push("dc1.corp.test".into());
        let server = pki.ca.issue(&spec).expect("DC certificate");
        Samba::start(SambaTls {
            cert: pki.dir.write("dc1.pem", &server.cert_pem),
            key: pki.dir.write("dc1.key", &server.key_pem),
            ca: pki.ca_path.clone(),
        })
    }

    /// Takes the machine-wide Samba lock (waiting up to 120 s), provisions
    /// `CORP.TEST` into a new directory, starts samba and waits until an
    /// LDAPS search bound as `Administrator` answers.
    ///
    /// Panics with install instructions if Samba or the LDAP tools are
    /// missing, with the output of whatever failed, and with the log tail if
    /// samba does not answer within 30 s.
    pub fn start(tls: SambaTls) -> Samba {
        let samba_bin = find_tool("samba");
        let samba_tool = find_tool("samba-tool");
        find_tool("ldapsearch");
        find_tool("ldapmodify");
        if !is_root() {
            panic!(
                "Samba tests must run as root: samba binds ports 88/389/636 and \
                 provisioning writes NT ACL xattrs"
            );
        }
        for path in [&tls.cert, &tls.key, &tls.ca] {
            if let Err(e) = fs::File::open(path) {
                panic!("Samba TLS file {} is not readable: {e}", path.display());
            }
        }

        let dir = std::env::temp_dir().join(format!(
            "seg-samba-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            unix_now().as_nanos()
        ));
        let lock = MachineLock::acquire(&dir);
        wait_for_free_ports();

        let mut samba = Samba {
            child: None,
            log_path: dir.join("samba.log"),
            ca: dir.join("tls/ca.pem"),
            dir,
            lock: Some(lock),
        };
        samba.provision(&samba_tool, &tls);
        samba.spawn(&samba_bin);
        samba
    }

    /// One Samba for the whole test process, started by the first caller with
    /// `tls()` and shared by every later caller (their `tls` is not called).
    ///
    /// It is never dropped: samba exits when the test process does (EOF on
    /// its stdin pipe) and the next [`Samba::start`] on the machine removes
    /// the lock file and directory left behind. Do not mix with
    /// [`Samba::start`] in the same process: that would wait for this one.
    pub fn shared(tls: impl FnOnce() -> SambaTls) -> &'static Samba {
        static SHARED: OnceLock<Samba> = OnceLock::new();
        SHARED.get_or_init(|| Samba::start(tls()))
    }

    /// `ldaps://127.0.0.1:636`.
    pub fn ldaps_url(&self) -> String {
        "ldaps://127.0.0.1:636".to_string()
    }

    /// `DC=corp,DC=test`.
    pub fn base_dn(&self) -> &str {
        BASE_DN
    }

    /// `CN=Administrator,CN=Users,DC=corp,DC=test`.
    pub fn admin_dn(&self) -> String {
        format!("CN=Administrator,CN=Users,{BASE_DN}")
    }

    /// `Administrator`'s password ([`ADMIN_PASSWORD`]).
    pub fn admin_password(&self) -> &str {
        ADMIN_PASSWORD
    }

    /// The copy of the CA certificate that signed the LDAPS certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca
    }

    /// A krb5.conf for realm `CORP.TEST` with the KDC at `127.0.0.1:88`
    /// (no DNS lookups); point `KRB5_CONFIG` at it.
    pub fn krb5_conf(&self) -> PathBuf {
        self.dir.join("krb5.conf")
    }

    /// The directory holding the provisioned domain, config and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// samba's whole output so far (`-i` sends its log to stdout; the
    /// default debug level 0 logs startup, shutdown and errors only).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Creates an enabled user `CN=<sam>,CN=Users,DC=corp,DC=test` with
    /// `sAMAccountName` `sam`, `userPrincipalName` `upn` (left out when
    /// empty) and password [`USER_PASSWORD`]; returns its DN.
    pub fn create_user(&self, sam: &str, upn: &str) -> String {
        self.create_users(&[(sam, upn)]).remove(0)
    }

    /// [`Samba::create_user`] for many `(sam, upn)` pairs in one
    /// `ldapmodify` run, which saves its ~40 ms start-up, TLS handshake and
    /// bind per user; returns the DNs in order.
    pub fn create_users(&self, users: &[(&str, &str)]) -> Vec<String> {
        let password = unicode_pwd(USER_PASSWORD);
        let mut ldif = String::new();
        let mut dns = Vec::with_capacity(users.len());
        for (sam, upn) in users {
            let dn = format!("CN={},CN=Users,{BASE_DN}", escape_rdn_value(sam));
            ldif_line(&mut ldif, "dn", dn.as_bytes());
            ldif.push_str("changetype: add\nobjectClass: user\n");
            ldif_line(&mut ldif, "sAMAccountName", sam.as_bytes());
            if !upn.is_empty() {
                ldif_line(&mut ldif, "userPrincipalName", upn.as_bytes());
            }
            ldif_line(&mut ldif, "unicodePwd", &password);
            ldif.push_str("userAccountControl: 512\n\n");
            dns.push(dn);
        }
        if !users.is_empty() {
            self.modify(&ldif);
        }
        dns
    }

    /// Creates an enabled workstation account `CN=<name>,CN=Computers,...`
    /// (`sAMAccountName` `<name>$`, `userAccountControl: 4096`, a password,
    /// `dNSHostName` and `servicePrincipalName` `HOST/<dns_host_name>`);
    /// returns its DN. Computers are `user`s too (objectClass `computer`
    /// derives from `user`), which is why the gateway must not map them.
    pub fn create_computer(&self, name: &str, dns_host_name: &str) -> String {
        let dn = format!("CN={},CN=Computers,{BASE_DN}", escape_rdn_value(name));
        let mut ldif = String::new();
        ldif_line(&mut ldif, "dn", dn.as_bytes());
        ldif.push_str("changetype: add\nobjectClass: computer\n");
        ldif_line(&mut ldif, "sAMAccountName", format!("{name}$").as_bytes());
        ldif_line(&mut ldif, "dNSHostName", dns_host_name.as_bytes());
        ldif_line(
            &mut ldif,
            "servicePrincipalName",
            format!("HOST/{dns_host_name}").as_bytes(),
        );
        ldif_line(&mut ldif, "unicodePwd", &unicode_pwd(USER_PASSWORD));
        ldif.push_str("userAccountControl: 4096\n");
        self.modify(&ldif);
        dn
    }

    /// Makes the domain a KDC for constrained delegation (LAB.md's recipe): the gateway
    /// account `svc-seg` (SPN `HTTP/seg.corp.test`, protocol transition, allowed to delegate
    /// to `HTTP/eas.corp.test` only) and the backend account `svc-eas` (SPN
    /// `HTTP/eas.corp.test`), both AES-only (`msDS-SupportedEncryptionTypes: 24`, else the
    /// keytabs come out RC4-only), and their keytabs exported with `samba-tool domain
    /// exportkeytab` into `dir`. The seg keytab holds `svc-seg` as well as its SPN: Samba's
    /// KDC refuses an SPN as the client of an AS request.
    pub fn setup_delegation(&self, dir: &Path) -> DelegationKeytabs {
        // TRUSTED_TO_AUTH_FOR_DELEGATION (protocol transition) | NORMAL_ACCOUNT.
        let seg_dn =
            self.create_service_account("svc-seg", "HTTP/seg.corp.test", 0x0100_0000 | 0x200);
        self.set_attribute(&seg_dn, "msDS-AllowedToDelegateTo", &["HTTP/eas.corp.test"]);
        self.create_service_account("svc-eas", "HTTP/eas.corp.test", 0x200);
        let seg = dir.join("seg.keytab");
        let eas = dir.join("eas.keytab");
        for (file, principal) in [
            (&seg, "svc-seg"),
            (&seg, "HTTP/seg.corp.test"),
            (&eas, "HTTP/eas.corp.test"),
        ] {
            self.samba_tool(&[
                "domain",
                "exportkeytab",
                &file.display().to_string(),
                &format!("--principal={principal}"),
            ]);
        }
        DelegationKeytabs { seg, eas }
    }

    /// A service account with one SPN, AES keys only, and a password; returns its DN.
    fn create_service_account(&self, sam: &str, spn: &str, user_account_control: u32) -> String {
        let dn = format!("CN={},CN=Users,{BASE_DN}", escape_rdn_value(sam));
        let mut ldif = String::new();
        ldif_line(&mut ldif, "dn", dn.as_bytes());
        ldif.push_str("changetype: add\nobjectClass: user\n");
        ldif_line(&mut ldif, "sAMAccountName", sam.as_bytes());
        ldif_line(&mut ldif, "servicePrincipalName", spn.as_bytes());
        ldif.push_str("msDS-SupportedEncryptionTypes: 24\n");
        ldif_line(&mut ldif, "unicodePwd", &unicode_pwd(USER_PASSWORD));
        ldif.push_str(&format!("userAccountControl: {user_account_control}\n"));
        self.modify(&ldif);
        dn
    }

    /// Sets bits in `sam`'s `userAccountControl` (0x100000 NOT_DELEGATED: "account is
    /// sensitive and cannot be delegated").
    pub fn add_account_control(&self, sam: &str, bits: u32) {
        let dn = self.dn_of(sam);
        let out = self.search_scoped(&dn, "base", "(objectClass=*)", &["userAccountControl"]);
        let uac: u32 = ldif_values(&out, "userAccountControl")
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no userAccountControl on {dn}:\n{out}"));
        self.set_attribute(&dn, "userAccountControl", &[&(uac | bits).to_string()]);
    }

    /// Stops samba (its LDAP and its KDC) and keeps the directory and the machine lock:
    /// the "domain controller down" case. Dropping the `Samba` cleans up as usual.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `samba-tool ARGS -s DIR/etc/smb.conf`, which works on the domain's files directly.
    fn samba_tool(&self, args: &[&str]) {
        let bin = find_tool("samba-tool");
        let out = Command::new(&bin)
            .args(args)
            .arg("-s")
            .arg(self.dir.join("etc/smb.conf"))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
        if !out.status.success() {
            panic!(
                "samba-tool {args:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Creates a global security group `CN=<name>,CN=Users,DC=corp,DC=test`
    /// with `sAMAccountName` `name`; returns its DN.
    pub fn create_group(&self, name: &str) -> String {
        let dn = format!("CN={},CN=Users,{BASE_DN}", escape_rdn_value(name));
        let mut ldif = String::new();
        ldif_line(&mut ldif, "dn", dn.as_bytes());
        ldif.push_str("changetype: add\nobjectClass: group\n");
        ldif_line(&mut ldif, "sAMAccountName", name.as_bytes());
        self.modify(&ldif);
        dn
    }

    /// Adds the account or group whose `sAMAccountName` is `member` (a
    /// computer's ends in `$`) to the group whose `sAMAccountName` is
    /// `group`. Groups nest.
    pub fn add_member(&self, group: &str, member: &str) {
        let group_dn = self.dn_of(group);
        let member_dn = self.dn_of(member);
        let mut ldif = String::new();
        ldif_line(&mut ldif, "dn", group_dn.as_bytes());
        ldif.push_str("changetype: modify\nadd: member\n");
        ldif_line(&mut ldif, "member", member_dn.as_bytes());
        ldif.push_str("-\n");
        self.modify(&ldif);
    }

    /// The DN of the object whose `sAMAccountName` is `sam`; panics if there
    /// is not exactly one.
    pub fn dn_of(&self, sam: &str) -> String {
        let out = self.search(
            &format!("(sAMAccountName={})", escape_filter(sam)),
            &["1.1"],
        );
        let dns: Vec<String> = ldif_values(&out, "dn");
        match dns.as_slice() {
            [dn] => dn.clone(),
            _ => panic!("expected one object with sAMAccountName {sam:?}, found:\n{out}"),
        }
    }

    /// The `objectSid` of `sam` in text form, `S-1-5-21-...`.
    pub fn object_sid(&self, sam: &str) -> String {
        let filter = format!("(sAMAccountName={})", escape_filter(sam));
        let out = self.search(&filter, &["objectSid"]);
        let sids: Vec<Vec<u8>> = ldif_raw_values(&out, "objectSid");
        match sids.as_slice() {
            [sid] => seg::identity::sid_to_text(sid)
                .unwrap_or_else(|| panic!("malformed objectSid for {sam:?} in:\n{out}")),
            _ => panic!("expected one objectSid for sAMAccountName {sam:?}, got:\n{out}"),
        }
    }

    /// Runs `ldapmodify` over LDAPS as `Administrator`. `ldif` holds change
    /// records, each with its own `changetype:` line. Panics with
    /// ldapmodify's output on failure.
    pub fn modify(&self, ldif: &str) {
        let bin = find_tool("ldapmodify");
        let mut child = self
            .ldap_command(&bin)
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

    /// Replaces every value of `attr` on `dn` with `values`; no values
    /// deletes the attribute.
    pub fn set_attribute(&self, dn: &str, attr: &str, values: &[&str]) {
        let mut ldif = String::new();
        ldif_line(&mut ldif, "dn", dn.as_bytes());
        ldif.push_str("changetype: modify\n");
        ldif_line(&mut ldif, "replace", attr.as_bytes());
        for value in values {
            ldif_line(&mut ldif, attr, value.as_bytes());
        }
        ldif.push_str("-\n");
        self.modify(&ldif);
    }

    /// Sets `ACCOUNTDISABLE` (2) in `sam`'s `userAccountControl`.
    pub fn disable(&self, sam: &str) {
        let dn = self.dn_of(sam);
        let out = self.search_scoped(&dn, "base", "(objectClass=*)", &["userAccountControl"]);
        let uac: u32 = ldif_values(&out, "userAccountControl")
            .first()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no userAccountControl on {dn}:\n{out}"));
        self.set_attribute(&dn, "userAccountControl", &[&(uac | 2).to_string()]);
    }

    /// Sets `sam`'s `accountExpires` to one day ago (a FILETIME).
    pub fn set_expired(&self, sam: &str) {
        let dn = self.dn_of(sam);
        let day = 24 * 3600 * 10_000_000;
        let value = (filetime_now() - day).to_string();
        self.set_attribute(&dn, "accountExpires", &[&value]);
    }

    /// Locks `sam` out: writes `lockoutTime` = now as a FILETIME. Samba
    /// accepts the direct write (real AD only accepts 0), reports the lockout
    /// in `msDS-User-Account-Control-Computed` (bit 16) but not in
    /// `userAccountControl`, and refuses the user's binds until the domain's
    /// `lockoutDuration` (30 min) has passed.
    pub fn set_locked(&self, sam: &str) {
        let dn = self.dn_of(sam);
        self.set_attribute(&dn, "lockoutTime", &[&filetime_now().to_string()]);
    }

    /// `ldapsearch -LLL` (lines unwrapped) over LDAPS as `Administrator`,
    /// subtree from `DC=corp,DC=test`; the raw output, search references
    /// included (`# refldaps://...` lines). No attributes means all user
    /// attributes; `["1.1"]` means none.
    pub fn search(&self, filter: &str, attrs: &[&str]) -> String {
        self.search_scoped(BASE_DN, "sub", filter, attrs)
    }

    /// Like [`Samba::search`] with another base and scope (`base`, `one`,
    /// `sub` or `children`); constructed attributes such as `tokenGroups`
    /// need `base`.
    pub fn search_scoped(&self, base: &str, scope: &str, filter: &str, attrs: &[&str]) -> String {
        let out = self.ldapsearch(base, scope, filter, attrs);
        if !out.status.success() {
            panic!(
                "ldapsearch -b {base:?} -s {scope} {filter:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ldapsearch(&self, base: &str, scope: &str, filter: &str, attrs: &[&str]) -> Output {
        let bin = find_tool("ldapsearch");
        self.ldap_command(&bin)
            .args([
                "-LLL",
                "-o",
                "ldif_wrap=no",
                "-b",
                base,
                "-s",
                scope,
                filter,
            ])
            .args(attrs)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
    }

    /// An OpenLDAP client bound as `Administrator` over LDAPS, trusting only
    /// the copied CA.
    fn ldap_command(&self, bin: &Path) -> Command {
        let mut cmd = Command::new(bin);
        cmd.env("LDAPTLS_CACERT", &self.ca)
            .env("LDAPTLS_REQCERT", "demand")
            .args(["-x", "-H", &self.ldaps_url(), "-D", &self.admin_dn(), "-w"])
            .arg(ADMIN_PASSWORD);
        cmd
    }

    /// Writes the TLS copies and seed.conf, runs `samba-tool domain
    /// provision`, then rewrites smb.conf and writes krb5.conf.
    fn provision(&self, samba_tool: &Path, tls: &SambaTls) {
        let tls_dir = self.dir.join("tls");
        let run_dir = self.dir.join("run");
        for d in [&tls_dir, &run_dir] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
        }
        let cert = tls_dir.join("cert.pem");
        let key = tls_dir.join("key.pem");
        for (from, to) in [(&tls.cert, &cert), (&tls.key, &key), (&tls.ca, &self.ca)] {
            fs::copy(from, to)
                .unwrap_or_else(|e| panic!("copying {} to {}: {e}", from.display(), to.display()));
        }
        set_mode_0600(&key);

        let settings = [
            ("interfaces", "lo".to_string()),
            ("bind interfaces only", "yes".to_string()),
            ("server services", "ldap, kdc".to_string()),
            ("ldb:nosync", "true".to_string()),
            ("tls enabled", "yes".to_string()),
            ("tls keyfile", key.display().to_string()),
            ("tls certfile", cert.display().to_string()),
            ("tls cafile", self.ca.display().to_string()),
            ("pid directory", run_dir.display().to_string()),
            ("ncalrpc dir", run_dir.join("ncalrpc").display().to_string()),
            (
                "winbindd socket directory",
                run_dir.join("winbindd").display().to_string(),
            ),
            (
                "ntp signd socket directory",
                run_dir.join("ntp_signd").display().to_string(),
            ),
        ];
        let mut seed = String::from("[global]\n");
        for (name, value) in &settings {
            writeln!(seed, "\t{name} = {value}").expect("writing to a String");
        }
        let seed_path = self.dir.join("seed.conf");
        write_file(&seed_path, &seed);

        let started = Instant::now();
        let out = Command::new(samba_tool)
            .args(["domain", "provision", "-s"])
            .arg(&seed_path)
            .arg(format!("--targetdir={}", self.dir.display()))
            .args([
                &format!("--realm={REALM}"),
                &format!("--domain={NETBIOS_DOMAIN}"),
                "--server-role=dc",
                "--dns-backend=NONE",
                "--use-rfc2307",
                "--host-name=dc1",
                "--host-ip=127.0.0.1",
                &format!("--adminpass={ADMIN_PASSWORD}"),
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", samba_tool.display()));
        write_file(
            &self.dir.join("provision.log"),
            &format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        );
        if !out.status.success() {
            panic!(
                "samba-tool domain provision failed ({}) in {} after {:?} \
                 (is samba-dsdb-modules installed? {MISSING_TOOLS}):\n{}{}",
                out.status,
                self.dir.display(),
                started.elapsed(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // Provisioning carries most seed settings over but writes its own
        // `server services`; force every setting of ours into [global].
        let conf_path = self.dir.join("etc/smb.conf");
        let conf = fs::read_to_string(&conf_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", conf_path.display()));
        write_file(&conf_path, &override_global(&conf, &settings));

        write_file(
            &self.krb5_conf(),
            &format!(
                "[libdefaults]\n\tdefault_realm = {REALM}\n\tdns_lookup_realm = false\n\
                 \tdns_lookup_kdc = false\n\trdns = false\n\tdns_canonicalize_hostname = false\n\
                 \tforwardable = true\n\n[realms]\n\t{REALM} = {{\n\
                 \t\tkdc = 127.0.0.1:88\n\t\tadmin_server = 127.0.0.1\n\t}}\n\n\
                 [domain_realm]\n\t.{DNS_DOMAIN} = {REALM}\n\t{DNS_DOMAIN} = {REALM}\n"
            ),
        );
    }

    /// Starts `samba -i -M single` with its stdin a pipe this process keeps
    /// open, and waits for a bound LDAPS search to succeed.
    fn spawn(&mut self, samba_bin: &Path) {
        let log = fs::File::create(&self.log_path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", self.log_path.display()));
        let stdout = log.try_clone().expect("duplicating the log file handle");
        let mut child = Command::new(samba_bin)
            .args(["-i", "-M", "single", "-s"])
            .arg(self.dir.join("etc/smb.conf"))
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", samba_bin.display()));

        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], 636));
        let failure = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break format!("samba exited with {status}");
            }
            if Instant::now() > deadline {
                break format!(
                    "samba did not answer a bound LDAPS search within {READY_TIMEOUT:?}"
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                let out = self.ldapsearch(BASE_DN, "base", "(objectClass=*)", &["1.1"]);
                if out.status.success() {
                    self.child = Some(child);
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Dropping `self` while panicking stops samba and keeps the directory.
        self.child = Some(child);
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        panic!(
            "{failure} ({}); log tail:\n{}",
            self.dir.display(),
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
}

impl Drop for Samba {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let terminated = matches!(child.try_wait(), Ok(None))
                && Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
            let deadline = Instant::now() + STOP_TIMEOUT;
            let mut exited = false;
            while terminated && Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "samba test directory kept for inspection: {}",
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
        drop(self.lock.take());
    }
}

/// The machine-wide lock file, and this process's in-process flag.
struct MachineLock {
    content: String,
}

impl MachineLock {
    /// Waits (up to [`LOCK_TIMEOUT`]) first for other `Samba`s of this
    /// process, then for the lock file, breaking it if its holder is dead.
    fn acquire(dir: &Path) -> MachineLock {
        let deadline = Instant::now() + LOCK_TIMEOUT;
        {
            let (busy, signal) = &IN_PROCESS;
            let mut busy = busy.lock().unwrap_or_else(|e| e.into_inner());
            while *busy {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    panic!(
                        "another Samba of this process is still alive after {LOCK_TIMEOUT:?} \
                         (only one can run; is one kept in a static? use Samba::shared)"
                    );
                }
                busy = signal
                    .wait_timeout(busy, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            *busy = true;
        }

        let pid = std::process::id();
        let content = format!(
            "pid={pid}\nstart={}\ndir={}\n",
            process_start_time(pid).unwrap_or_default(),
            dir.display()
        );
        // Write the content first, then link it into place: the lock file
        // appears atomically and never empty.
        let tmp = PathBuf::from(format!("{LOCK_PATH}.{pid}.{}", unix_now().as_nanos()));
        write_file(&tmp, &content);
        let result = loop {
            match fs::hard_link(&tmp, LOCK_PATH) {
                Ok(()) => break Ok(()),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => break Err(format!("creating {LOCK_PATH}: {e}")),
            }
            let Ok(held) = fs::read_to_string(LOCK_PATH) else {
                continue; // released meanwhile
            };
            if !holder_alive(&held) {
                break_stale_lock(&held);
                continue;
            }
            if Instant::now() > deadline {
                break Err(format!(
                    "{LOCK_PATH} still held after {LOCK_TIMEOUT:?} by a live process \
                     (only one Samba can run on a machine):\n{held}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let _ = fs::remove_file(&tmp);
        if let Err(e) = result {
            release_in_process();
            panic!("{e}");
        }
        MachineLock { content }
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        // Remove the file only if it is still ours.
        if fs::read_to_string(LOCK_PATH).is_ok_and(|held| held == self.content) {
            let _ = fs::remove_file(LOCK_PATH);
        }
        release_in_process();
    }
}

fn release_in_process() {
    let (busy, signal) = &IN_PROCESS;
    *busy.lock().unwrap_or_else(|e| e.into_inner()) = false;
    signal.notify_all();
}

/// Whether the process named in a lock file's content is still the one that
/// wrote it (same pid and start time).
fn holder_alive(content: &str) -> bool {
    let Some(pid) = lock_field(content, "pid").and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    match process_start_time(pid) {
        None => false,
        Some(start) => lock_field(content, "start").is_none_or(|s| s.is_empty() || s == start),
    }
}

/// Moves a dead holder's lock file aside, removes it and the holder's
/// directory. If the file moved aside turns out to be a fresh lock (another
/// process broke the stale one first and took the lock), puts it back.
fn break_stale_lock(stale: &str) {
    let aside = format!(
        "{LOCK_PATH}.stale.{}.{}",
        std::process::id(),
        unix_now().as_nanos()
    );
    if fs::rename(LOCK_PATH, &aside).is_err() {
        return;
    }
    let moved = fs::read_to_string(&aside).unwrap_or_default();
    if moved == stale {
        if let Some(dir) = lock_field(stale, "dir") {
            let dir = Path::new(dir);
            let ours = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-samba-"));
            if ours {
                let _ = fs::remove_dir_all(dir);
            }
        }
    } else {
        // Fails only if yet another lock appeared; then that one stands.
        let _ = fs::hard_link(&aside, LOCK_PATH);
    }
    let _ = fs::remove_file(&aside);
}

fn lock_field<'a>(content: &'a str, name: &str) -> Option<&'a str> {
    content
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
}

/// Field 22 of /proc/PID/stat (start time in clock ticks since boot); `None`
/// if there is no such process.
fn process_start_time(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().nth(19)?.to_string())
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Waits until nothing accepts connections on Samba's ports (a samba whose
/// test process just died needs a moment to notice), or panics.
fn wait_for_free_ports() {
    let deadline = Instant::now() + PORTS_FREE_TIMEOUT;
    loop {
        let busy: Vec<u16> = PORTS
            .into_iter()
            .filter(|&port| {
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
            .collect();
        if busy.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "127.0.0.1 ports {busy:?} are still in use after {PORTS_FREE_TIMEOUT:?}, \
                 but Samba needs them: is a system samba-ad-dc, slapd or krb5-kdc running? \
                 (`ss -ltnp` shows who)"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Returns `conf` with `settings` replacing any same-named line in
/// `[global]`, inserted right after the `[global]` header.
fn override_global(conf: &str, settings: &[(&str, String)]) -> String {
    let normalise = |name: &str| {
        name.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    let ours: Vec<String> = settings.iter().map(|(name, _)| normalise(name)).collect();
    let mut out = String::new();
    let mut in_global = false;
    for line in conf.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_global = trimmed.eq_ignore_ascii_case("[global]");
            out.push_str(line);
            out.push('\n');
            if in_global {
                for (name, value) in settings {
                    writeln!(out, "\t{name} = {value}").expect("writing to a String");
                }
            }
            continue;
        }
        let replaced = in_global
            && trimmed
                .split_once('=')
                .is_some_and(|(name, _)| ours.contains(&normalise(name)));
        if !replaced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The current time as a Windows FILETIME (100 ns ticks since 1601).
fn filetime_now() -> i64 {
    let now = unix_now();
    ((now.as_secs() + FILETIME_UNIX_OFFSET) * 10_000_000 + u64::from(now.subsec_nanos() / 100))
        as i64
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// `unicodePwd`'s value: the password in double quotes, UTF-16LE.
fn unicode_pwd(password: &str) -> Vec<u8> {
    format!("\"{password}\"")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// `ldif` (the output of [`Samba::search`]) without its search result
/// references: each `# ref...` line and the blank line after it go, so a
/// subtree search from the domain root compares equal to one from
/// `CN=Users`.
pub fn strip_references(ldif: &str) -> String {
    let mut out = String::with_capacity(ldif.len());
    let mut after_reference = false;
    for line in ldif.lines() {
        if line.starts_with("# ref") {
            after_reference = true;
            continue;
        }
        if !(after_reference && line.is_empty()) {
            out.push_str(line);
            out.push('\n');
        }
        after_reference = false;
    }
    out
}

/// Every value of `attr` (case-insensitive name) in LDIF `out`, as text
/// (base64 values decoded, lossily).
fn ldif_values(out: &str, attr: &str) -> Vec<String> {
    ldif_raw_values(out, attr)
        .into_iter()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .collect()
}

/// Every value of `attr` in unwrapped LDIF `out`, as bytes.
fn ldif_raw_values(out: &str, attr: &str) -> Vec<Vec<u8>> {
    out.lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            if !name.eq_ignore_ascii_case(attr) {
                return None;
            }
            match rest.strip_prefix(':') {
                Some(b64) => Some(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64.trim())
                        .ok()
                        .unwrap_or_else(|| panic!("bad base64 in LDIF line {line:?}")),
                ),
                None => Some(rest.strip_prefix(' ').unwrap_or(rest).as_bytes().to_vec()),
            }
        })
        .collect()
}

/// Escapes a filter assertion value (RFC 4515).
fn escape_filter(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '*' | '(' | ')' | '\\' | '\0' => write!(out, "\\{:02x}", c as u32).expect("String"),
            _ => out.push(c),
        }
    }
    out
}

fn set_mode_0600(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 0600 {}: {e}", path.display()));
}

fn write_file(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Finds a Samba or OpenLDAP tool in the sbin directories or on PATH.
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
