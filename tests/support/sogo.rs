//! A real ActiveSync server for the tests: SOGo 5.8 with its ActiveSync module, on loopback,
//! trusting the `x-webobjects-remote-user` header the gateway sets.
//!
//! [`Sogo::start`] brings up, each in a directory of its own under one temp dir and on free
//! 127.0.0.1 ports:
//!
//! * PostgreSQL (`initdb` + `postgres` as the `postgres` user, trust auth, fsync off): SOGo's
//!   own tables (created by SOGo on first start) and its user source, the SQL table
//!   `sogo_users` with one row per user (`<name>`, mail `<name>@corp.test`; passwords unused);
//! * Dovecot (its own `base_dir`, IMAP only): a passwd-file whose users carry
//!   `nopassword=y allow_nets=127.0.0.0/8` (SOGo logs in to IMAP with an empty password when
//!   it trusts a proxy), maildirs owned by the `mail` user with Sent, Drafts, Trash, Junk and
//!   Templates created; every mailbox is selected once with CONDSTORE before SOGo starts;
//! * memcached;
//! * an SMTP sink, a thread of the test process, that hands every message to `dovecot-lda`
//!   for each local recipient (SOGo sends with `SOGoMailingMechanism = smtp`);
//! * `sogod` as the `sogo` user (it refuses root), with `GNUSTEP_CONFIG_FILE` pointing at a
//!   private GNUstep.conf so its defaults (`sogod.plist`) live in the temp dir.
//!
//! SOGo's users come from that SQL table, or from an LDAP directory ([`UserSource::Ldap`]: a
//! Samba AD over LDAPS, users by `sAMAccountName`, mail from `mail`); Dovecot's users are the
//! same names either way.
//!
//! API: [`Sogo::start`] (users alice and bob), [`Sogo::start_with_users`],
//! [`Sogo::start_with_source`], [`Sogo::url`]
//! (`http://127.0.0.1:PORT`; the EAS endpoint is [`EAS_PATH`] under it), [`Sogo::addr`],
//! [`Sogo::deliver`], [`Sogo::log`], [`Sogo::requests`], [`Sogo::smtp_log`],
//! [`Sogo::dovecot_log`], [`Sogo::startup`], [`Sogo::dir`]. Dropping a `Sogo` stops every
//! process by its PID (sogod's worker processes too) and removes the directory, which is kept
//! with its path printed when the thread is panicking.
//!
//! Needs root (to run PostgreSQL as `postgres` and SOGo as `sogo`) and the Debian packages
//! `sogo sogo-activesync postgresql dovecot-imapd memcached`.
//!
//! What SOGo does that a test must know:
//!
//! * With `SOGoTrustProxyAuthentication = YES` every request is served as the user in
//!   `x-webobjects-remote-user` (it wins over `Authorization`), unknown user → 403; with no
//!   such header, as the user of any `Authorization: Basic` header, password unchecked; with
//!   neither, 403. `User=` in the query is ignored.
//! * Provision answers without a PolicyKey.
//! * sogod closes the connection after every response without sending `Connection: close`; a
//!   client that reuses the connection at once can get a reset (seg's pooled upstream client
//!   answered such a request with 502: give seg `upstream.pool_max_idle_per_host = 0`).
//! * A Ping's HeartbeatInterval above `SOGoMaximumPingInterval` (60 s here) gets Status 5;
//!   changes are noticed every `SOGoInternalSyncInterval` (5 s here); an idle Ping returns
//!   Status 1 after its heartbeat. Each Ping holds one sogod worker (8 here) for its length.
//! * A Ping right after a Sync that brought new items can report the Inbox changed once more
//!   (the next Sync brings nothing); an incremental Sync before an idle Ping settles that.
//! * A fresh Dovecot mailbox makes SOGo's Sync come back empty until CONDSTORE has been used
//!   on it once; the start-up does that for every mailbox that exists then.
//! * sogod's access log (in [`Sogo::log`], parsed by [`Sogo::requests`]) names the request
//!   line and status, not the user served.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// SOGo's ActiveSync endpoint under [`Sogo::url`].
pub const EAS_PATH: &str = "/SOGo/Microsoft-Server-ActiveSync";
/// The mail domain of every user.
pub const MAIL_DOMAIN: &str = "corp.test";

const MISSING: &str = "SOGo's test tier needs `apt-get install sogo sogo-activesync postgresql \
     dovecot-imapd memcached` (the README's test command ./tests/run.sh installs it)";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const WORKERS: usize = 8;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The `SOGoUserSources` entry for `source` (a property list dictionary).
fn user_source(source: &UserSource, db: &str) -> String {
    match source {
        UserSource::Sql => format!(
            r#"    {{
      type = sql;
      id = users;
      viewURL = "{db}/sogo_users";
      canAuthenticate = YES;
      isAddressBook = NO;
      userPasswordAlgorithm = plain;
    }}"#
        ),
        UserSource::Ldap(ldap) => format!(
            r#"    {{
      type = ldap;
      id = directory;
      hostname = "{host}";
      port = {port};
      encryption = SSL;
      baseDN = "{base}";
      scope = SUB;
      bindDN = "{bind}";
      bindPassword = "{password}";
      canAuthenticate = YES;
      isAddressBook = NO;
      CNFieldName = cn;
      IDFieldName = cn;
      UIDFieldName = sAMAccountName;
      bindFields = (sAMAccountName);
      MailFieldNames = (mail);
      filter = "objectClass='user'";
    }}"#,
            host = ldap.host,
            port = ldap.port,
            base = ldap.base_dn,
            bind = ldap.bind_dn,
            password = ldap.bind_password,
        ),
    }
}

/// A system account the servers run as.
#[derive(Clone, Copy, Debug)]
struct Account {
    uid: u32,
    gid: u32,
}

/// The binaries, found once.
struct Tools {
    pg_bin: PathBuf,
    dovecot: PathBuf,
    lda: PathBuf,
    memcached: PathBuf,
    sogod: PathBuf,
}

/// Where SOGo looks its users up.
#[derive(Clone, Debug)]
pub enum UserSource {
    /// The `sogo_users` table in SOGo's own PostgreSQL, one row per user.
    Sql,
    /// An Active Directory over LDAPS: users under `base_dn` by `sAMAccountName`.
    Ldap(LdapSource),
}

/// An Active Directory SOGo reads its users from.
#[derive(Clone, Debug)]
pub struct LdapSource {
    /// Host name or address in the server's certificate.
    pub host: String,
    pub port: u16,
    /// Where the users are (searched with subtree scope).
    pub base_dn: String,
    pub bind_dn: String,
    pub bind_password: String,
    /// The CA that issued the server's certificate (`LDAPTLS_CACERT` for sogod).
    pub ca_file: PathBuf,
}

/// A running SOGo with everything it needs.
pub struct Sogo {
    dir: PathBuf,
    users: Vec<String>,
    source: UserSource,
    http_port: u16,
    imap_port: u16,
    pg_port: u16,
    dovecot_conf: PathBuf,
    lda: PathBuf,
    sogod: Option<Child>,
    dovecot: Option<Child>,
    memcached: Option<Child>,
    postgres: Option<Child>,
    smtp: Option<SmtpSink>,
    startup: Vec<(&'static str, Duration)>,
}

impl Sogo {
    /// SOGo with the users alice and bob (alice@corp.test, bob@corp.test).
    pub fn start() -> Sogo {
        Sogo::start_with_users(&["alice", "bob"])
    }

    /// SOGo with the given users (lower-case names; mail `<name>@corp.test`).
    ///
    /// Panics with install instructions when a server is missing, and with the log tail of the
    /// server that did not come up within 30 s.
    pub fn start_with_users(users: &[&str]) -> Sogo {
        Sogo::start_with_source(users, UserSource::Sql)
    }

    /// SOGo with the given Dovecot users, known to SOGo through `source`.
    pub fn start_with_source(users: &[&str], source: UserSource) -> Sogo {
        let started = Instant::now();
        if !is_root() {
            panic!(
                "SOGo's test tier runs as root: it starts PostgreSQL as `postgres` and SOGo as \
                 `sogo` (both refuse root). {MISSING}"
            );
        }
        let tools = Tools::find();
        let postgres_user = account("postgres");
        let sogo_user = account("sogo");
        let mail_user = account("mail");
        // Dovecot's own unprivileged users, checked here for a clear message.
        account("dovecot");
        account("dovenull");
        account("memcache");

        let dir = std::env::temp_dir().join(format!(
            "seg-sogo-{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() % 1_000_000)
                .unwrap_or(0)
        ));
        make_dir(&dir, 0o755, None);
        let mut sogo = Sogo {
            dovecot_conf: dir.join("dovecot/dovecot.conf"),
            lda: tools.lda.clone(),
            dir,
            users: users.iter().map(|u| u.to_string()).collect(),
            source,
            http_port: 0,
            imap_port: 0,
            pg_port: 0,
            sogod: None,
            dovecot: None,
            memcached: None,
            postgres: None,
            smtp: None,
            startup: Vec::new(),
        };

        let t = Instant::now();
        sogo.start_postgres(&tools, postgres_user);
        sogo.startup.push(("postgresql", t.elapsed()));

        let t = Instant::now();
        sogo.start_dovecot(&tools, mail_user);
        sogo.startup.push(("dovecot", t.elapsed()));

        let t = Instant::now();
        let memcached_port = sogo.start_memcached(&tools);
        sogo.startup.push(("memcached", t.elapsed()));

        let t = Instant::now();
        let smtp = SmtpSink::start(
            sogo.lda.clone(),
            sogo.dovecot_conf.clone(),
            sogo.users.clone(),
        );
        let smtp_port = smtp.addr.port();
        sogo.smtp = Some(smtp);
        sogo.startup.push(("smtp sink", t.elapsed()));

        let t = Instant::now();
        sogo.start_sogod(&tools, sogo_user, memcached_port, smtp_port);
        sogo.startup.push(("sogod", t.elapsed()));
        sogo.startup.push(("total", started.elapsed()));
        sogo
    }

    /// `http://127.0.0.1:PORT`, SOGo's own HTTP listener (EAS at [`EAS_PATH`] under it).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// SOGo's HTTP listener address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.http_port))
    }

    /// The directory holding every server's files and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long each part took to come up, and the total.
    pub fn startup(&self) -> &[(&'static str, Duration)] {
        &self.startup
    }

    /// Drops a message into `to`'s INBOX through `dovecot-lda` (`to` is a user name or
    /// `name@corp.test`). Returns once Dovecot has stored it.
    pub fn deliver(&self, to: &str, subject: &str, body: &str) {
        let user = self.local_user(to).unwrap_or_else(|| {
            panic!(
                "deliver: {to} is not one of this SOGo's users {:?}",
                self.users
            )
        });
        let message = format!(
            "From: Lab Sender <sender@{MAIL_DOMAIN}>\r\nTo: {user}@{MAIL_DOMAIN}\r\n\
             Subject: {subject}\r\nDate: {date}\r\nMessage-ID: <{id}@seg-test>\r\n\
             MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n",
            date = rfc2822_now(),
            id = unique_id(),
        );
        lda_deliver(
            &self.lda,
            &self.dovecot_conf,
            &user,
            &format!("sender@{MAIL_DOMAIN}"),
            message.as_bytes(),
        )
        .unwrap_or_else(|e| panic!("deliver to {user}: {e}\n{}", self.dovecot_log()));
    }

    /// sogod's log: start-up, one `starting method` line and one access line per request.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sogo/sogo.log")).unwrap_or_default()
    }

    /// The requests sogod answered, from its access log: (request line, HTTP status).
    pub fn requests(&self) -> Vec<(String, u16)> {
        self.log()
            .lines()
            .filter_map(|line| {
                let start = line.find(" \"")? + 2;
                let rest = &line[start..];
                let end = rest.find("\" ")?;
                let request = &rest[..end];
                if !request.contains(" HTTP/") {
                    return None;
                }
                let status = rest[end + 2..].split(' ').next()?.parse().ok()?;
                Some((request.to_string(), status))
            })
            .collect()
    }

    /// What the SMTP sink accepted: one line per delivered recipient.
    pub fn smtp_log(&self) -> Vec<String> {
        self.smtp
            .as_ref()
            .map(|s| s.log.lock().unwrap().clone())
            .unwrap_or_default()
    }

    /// Dovecot's log (logins, deliveries).
    pub fn dovecot_log(&self) -> String {
        fs::read_to_string(self.dir.join("dovecot/dovecot.log")).unwrap_or_default()
    }

    fn local_user(&self, address: &str) -> Option<String> {
        local_user(&self.users, address)
    }

    // -- PostgreSQL ----------------------------------------------------------------------------

    fn start_postgres(&mut self, tools: &Tools, postgres: Account) {
        let pg = self.dir.join("pg");
        make_dir(&pg, 0o700, Some(postgres));
        let data = pg.join("data");
        let out = Command::new(tools.pg_bin.join("initdb"))
            .args(["-D", path_str(&data), "-U", "postgres", "--auth=trust"])
            .args(["-E", "UTF8", "--locale=C", "--no-sync"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir(&pg)
            .uid(postgres.uid)
            .gid(postgres.gid)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running initdb: {e}"));
        if !out.status.success() {
            panic!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let log_path = pg.join("postgres.log");
        let log = fs::File::create(&log_path).expect("postgres log");
        chown(&log_path, postgres);
        self.pg_port = free_port();
        let port = self.pg_port.to_string();
        let child = Command::new(tools.pg_bin.join("postgres"))
            .args(["-D", path_str(&data), "-h", "127.0.0.1", "-p", &port])
            .args(["-k", path_str(&pg)])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "synchronous_commit=off", "-c", "max_connections=200"])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .current_dir(&pg)
            .uid(postgres.uid)
            .gid(postgres.gid)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting postgres: {e}"));
        self.postgres = Some(child);

        let psql = tools.pg_bin.join("psql");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = Command::new(&psql)
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ])
                .args(["-X", "-q", "-c", "select 1"])
                .env_clear()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            if let Some(status) = self.postgres.as_mut().and_then(|c| c.try_wait().ok()?) {
                panic!(
                    "postgres exited ({status}):\n{}",
                    tail(&fs::read_to_string(&log_path).unwrap_or_default())
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "postgres not ready after {READY_TIMEOUT:?}:\n{}",
                    tail(&fs::read_to_string(&log_path).unwrap_or_default())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }

        let mut sql = String::from(
            "CREATE ROLE sogo LOGIN PASSWORD 'sogo';\n\
             CREATE DATABASE sogo OWNER sogo;\n\
             \\connect sogo sogo\n\
             CREATE TABLE sogo_users (c_uid varchar(64) PRIMARY KEY, c_name varchar(64) NOT NULL, \
             c_password varchar(128) NOT NULL, c_cn varchar(128), mail varchar(128));\n",
        );
        let sql_users = if matches!(self.source, UserSource::Sql) {
            &self.users[..]
        } else {
            &[]
        };
        for user in sql_users {
            sql.push_str(&format!(
                "INSERT INTO sogo_users VALUES ('{user}', '{user}', 'unused', '{user} (test)', \
                 '{user}@{MAIL_DOMAIN}');\n"
            ));
        }
        let setup = pg.join("setup.sql");
        fs::write(&setup, sql).expect("setup.sql");
        let out = Command::new(&psql)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", path_str(&setup)])
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running psql: {e}"));
        if !out.status.success() {
            panic!(
                "creating SOGo's database failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // -- Dovecot -------------------------------------------------------------------------------

    fn start_dovecot(&mut self, tools: &Tools, mail: Account) {
        let base = self.dir.join("dovecot");
        make_dir(&base, 0o755, None);
        make_dir(&base.join("state"), 0o755, None);
        let mail_root = base.join("mail");
        make_dir(&mail_root, 0o755, Some(mail));
        let mut passwd = String::new();
        for user in &self.users {
            passwd.push_str(&format!(
                "{user}::{uid}:{gid}::{home}::nopassword=y allow_nets=127.0.0.0/8\n",
                uid = mail.uid,
                gid = mail.gid,
                home = mail_root.join(user).display(),
            ));
        }
        let users_file = base.join("users");
        fs::write(&users_file, passwd).expect("dovecot users");
        self.imap_port = free_port();
        let conf = format!(
            r#"# Written by tests/support/sogo.rs
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
instance_name = seg-test-{port}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = 1
first_valid_gid = 1
mail_location = maildir:~/Maildir
passdb {{
  driver = passwd-file
  args = {users}
}}
userdb {{
  driver = passwd-file
  args = {users}
}}
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Sent {{
    special_use = \Sent
    auto = subscribe
  }}
  mailbox Drafts {{
    special_use = \Drafts
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \Trash
    auto = subscribe
  }}
  mailbox Junk {{
    special_use = \Junk
    auto = subscribe
  }}
  mailbox Templates {{
    auto = subscribe
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
protocol lda {{
  postmaster_address = postmaster@{MAIL_DOMAIN}
}}
"#,
            base = base.display(),
            users = users_file.display(),
            port = self.imap_port,
        );
        fs::write(&self.dovecot_conf, conf).expect("dovecot.conf");
        let out = fs::File::create(base.join("dovecot.out")).expect("dovecot.out");
        let child = Command::new(&tools.dovecot)
            .args(["-F", "-c", path_str(&self.dovecot_conf)])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("out"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting dovecot: {e}"));
        self.dovecot = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(mut imap) = Imap::connect(self.imap_port) {
                if imap.greeting().is_ok() {
                    break;
                }
            }
            if let Some(status) = self.dovecot.as_mut().and_then(|c| c.try_wait().ok()?) {
                panic!(
                    "dovecot exited ({status}):\n{}{}",
                    fs::read_to_string(base.join("dovecot.out")).unwrap_or_default(),
                    tail(&self.dovecot_log())
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "dovecot not ready after {READY_TIMEOUT:?}:\n{}",
                    tail(&self.dovecot_log())
                );
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        // The CONDSTORE trap: SOGo's first Sync of a mailbox never opened with CONDSTORE comes
        // back empty. Log in once per user (creating the mailboxes) and select each of them.
        for user in &self.users {
            prime_condstore(self.imap_port, user)
                .unwrap_or_else(|e| panic!("priming {user}'s mailboxes: {e}"));
        }
    }

    // -- memcached -----------------------------------------------------------------------------

    fn start_memcached(&mut self, tools: &Tools) -> u16 {
        let port = free_port();
        let out = fs::File::create(self.dir.join("memcached.log")).expect("memcached.log");
        let child = Command::new(&tools.memcached)
            .args(["-u", "memcache", "-l", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", "0", "-m", "32"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("out"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting memcached: {e}"));
        self.memcached = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                panic!("memcached not listening after {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        port
    }

    // -- sogod ---------------------------------------------------------------------------------

    fn start_sogod(&mut self, tools: &Tools, sogo: Account, memcached_port: u16, smtp_port: u16) {
        let home = self.dir.join("sogo");
        make_dir(&home, 0o755, Some(sogo));
        let defaults = home.join("defaults");
        make_dir(&defaults, 0o755, Some(sogo));
        let system_conf = fs::read_to_string("/etc/GNUstep/GNUstep.conf")
            .unwrap_or_else(|e| panic!("/etc/GNUstep/GNUstep.conf: {e}. {MISSING}"));
        let mut gnustep: String = system_conf
            .lines()
            .filter(|l| {
                !l.starts_with("GNUSTEP_USER_DEFAULTS_DIR=")
                    && !l.starts_with("GNUSTEP_USER_CONFIG_FILE=")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        gnustep.push_str(&format!(
            "GNUSTEP_USER_CONFIG_FILE={}\nGNUSTEP_USER_DEFAULTS_DIR={}\n",
            home.join("no-user-GNUstep.conf").display(),
            defaults.display()
        ));
        let gnustep_conf = home.join("GNUstep.conf");
        fs::write(&gnustep_conf, gnustep).expect("GNUstep.conf");
        self.http_port = free_port();
        let db = format!("postgresql://sogo:sogo@127.0.0.1:{}/sogo", self.pg_port);
        let plist = format!(
            r#"{{
  SOGoProfileURL = "{db}/sogo_user_profile";
  OCSFolderInfoURL = "{db}/sogo_folder_info";
  OCSSessionsFolderURL = "{db}/sogo_sessions_folder";
  OCSEMailAlarmsFolderURL = "{db}/sogo_alarms_folder";
  SOGoUserSources = (
{source}
  );
  SOGoTrustProxyAuthentication = YES;
  SOGoIMAPServer = "imap://127.0.0.1:{imap}";
  SOGoSieveServer = "";
  SOGoSieveScriptsEnabled = NO;
  SOGoVacationEnabled = NO;
  SOGoForwardEnabled = NO;
  SOGoMailingMechanism = smtp;
  SOGoSMTPServer = "smtp://127.0.0.1:{smtp}";
  SOGoMailDomain = {MAIL_DOMAIN};
  SOGoMemcachedHost = "127.0.0.1:{memcached}";
  SOGoTimeZone = UTC;
  SOGoLanguage = English;
  SOGoSentFolderName = Sent;
  SOGoTrashFolderName = Trash;
  SOGoDraftsFolderName = Drafts;
  SOGoJunkFolderName = Junk;
  SOGoAppointmentSendEMailNotifications = NO;
  SOGoMaximumPingInterval = 60;
  SOGoMaximumSyncInterval = 60;
  SOGoInternalSyncInterval = 5;
  WOWorkersCount = {WORKERS};
  WOPort = "127.0.0.1:{http}";
  WOLogFile = "{home}/sogo.log";
  WOPidFile = "{home}/sogo.pid";
}}
"#,
            source = user_source(&self.source, &db),
            imap = self.imap_port,
            smtp = smtp_port,
            memcached = memcached_port,
            http = self.http_port,
            home = home.display(),
        );
        let plist_path = defaults.join("sogod.plist");
        fs::write(&plist_path, plist).expect("sogod.plist");
        for path in [&gnustep_conf, &plist_path] {
            chown(path, sogo);
        }
        let out_path = home.join("sogod.out");
        let out = fs::File::create(&out_path).expect("sogod.out");
        chown(&out_path, sogo);
        let mut command = Command::new(&tools.sogod);
        command
            .args([
                "-WONoDetach",
                "YES",
                "-WOWorkersCount",
                &WORKERS.to_string(),
            ])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &home)
            .env("LANG", "C.UTF-8")
            .env("GNUSTEP_CONFIG_FILE", &gnustep_conf);
        if let UserSource::Ldap(ldap) = &self.source {
            // libldap reads the directory's CA from its environment; sogod runs as `sogo`,
            // so the CA goes where that user can read it.
            let ca = home.join("ldap-ca.pem");
            fs::copy(&ldap.ca_file, &ca).expect("copy the directory's CA");
            chown(&ca, sogo);
            command
                .env("LDAPTLS_CACERT", &ca)
                .env("LDAPTLS_REQCERT", "demand");
        }
        let child = command
            .current_dir(&home)
            .uid(sogo.uid)
            .gid(sogo.gid)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("out"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting sogod: {e}"));
        self.sogod = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if http_status(self.http_port, "/SOGo/") == Some(200) {
                break;
            }
            if let Some(status) = self.sogod.as_mut().and_then(|c| c.try_wait().ok()?) {
                panic!(
                    "sogod exited ({status}):\n{}{}",
                    fs::read_to_string(&out_path).unwrap_or_default(),
                    tail(&self.log())
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "sogod not answering after {READY_TIMEOUT:?}:\n{}{}",
                    fs::read_to_string(&out_path).unwrap_or_default(),
                    tail(&self.log())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Every worker has to be up (and past creating the tables) before a test counts on
        // concurrent requests, such as a Ping next to a Sync.
        let deadline = Instant::now() + READY_TIMEOUT;
        while self
            .log()
            .matches("notified the watchdog that we are ready")
            .count()
            < WORKERS
        {
            if Instant::now() > deadline {
                panic!(
                    "sogod: fewer than {WORKERS} workers ready:\n{}",
                    tail(&self.log())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // -- stopping ------------------------------------------------------------------------------

    fn stop_sogod(&mut self) {
        // The watchdog does not exit on SIGTERM while workers hang on; its workers sit in
        // process groups of their own.
        if let Some(child) = self.sogod.take() {
            kill_tree(child);
        }
    }
}

impl Drop for Sogo {
    fn drop(&mut self) {
        self.stop_sogod();
        if let Some(smtp) = self.smtp.take() {
            smtp.stop();
        }
        if let Some(child) = self.dovecot.take() {
            // Dovecot's orderly SIGTERM takes a second or more; nothing here needs keeping.
            kill_tree(child);
        }
        if let Some(mut child) = self.memcached.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(child) = self.postgres.take() {
            // SIGINT: PostgreSQL's fast shutdown.
            stop(child, "INT", Duration::from_secs(10));
        }
        if std::thread::panicking() {
            eprintln!(
                "SOGo test directory kept for inspection: {}",
                self.dir.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Tools {
    fn find() -> Tools {
        let pg_bin = fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let version: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("postgres").is_file().then_some((version, bin))
            })
            .max()
            .map(|(_, bin)| bin)
            .unwrap_or_else(|| panic!("PostgreSQL not found in /usr/lib/postgresql. {MISSING}"));
        for tool in ["initdb", "psql"] {
            if !pg_bin.join(tool).is_file() {
                panic!("{} is missing. {MISSING}", pg_bin.join(tool).display());
            }
        }
        let file = |path: &str| {
            let path = PathBuf::from(path);
            if !path.is_file() {
                panic!("{} is missing. {MISSING}", path.display());
            }
            path
        };
        let tools = Tools {
            pg_bin,
            dovecot: file("/usr/sbin/dovecot"),
            lda: file("/usr/lib/dovecot/dovecot-lda"),
            memcached: file("/usr/bin/memcached"),
            sogod: file("/usr/sbin/sogod"),
        };
        if !Path::new("/usr/lib/GNUstep/SOGo/ActiveSync.SOGo").is_dir() {
            panic!("SOGo's ActiveSync module is missing. {MISSING}");
        }
        if !Path::new("/usr/lib/dovecot/imap").is_file() {
            panic!("Dovecot's IMAP server is missing. {MISSING}");
        }
        tools
    }
}

// -- the SMTP sink -----------------------------------------------------------------------------

/// A minimal SMTP server that hands each message to `dovecot-lda` per local recipient.
struct SmtpSink {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl SmtpSink {
    fn start(lda: PathBuf, conf: PathBuf, users: Vec<String>) -> SmtpSink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("SMTP sink bind");
        let addr = listener.local_addr().expect("SMTP sink addr");
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (Arc::clone(&stop), Arc::clone(&log));
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (lda, conf, users, log) =
                    (lda.clone(), conf.clone(), users.clone(), Arc::clone(&log2));
                std::thread::spawn(move || {
                    if let Err(e) = smtp_session(stream, &lda, &conf, &users, &log) {
                        log.lock().unwrap().push(format!("session error: {e}"));
                    }
                });
            }
        });
        SmtpSink {
            addr,
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn smtp_session(
    stream: TcpStream,
    lda: &Path,
    conf: &Path,
    users: &[String],
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = stream.try_clone()?;
    let mut input = BufReader::new(stream);
    out.write_all(b"220 seg-test-smtp ESMTP\r\n")?;
    let mut from = String::new();
    let mut recipients: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_string();
        let verb = command
            .split([' ', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply: String = match verb.as_str() {
            "EHLO" => "250-seg-test-smtp\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n".into(),
            "HELO" => "250 seg-test-smtp\r\n".into(),
            "MAIL" => {
                from = angle_address(&command);
                recipients.clear();
                "250 OK\r\n".into()
            }
            "RCPT" => {
                let to = angle_address(&command);
                match local_user(users, &to) {
                    Some(user) => {
                        recipients.push(user);
                        "250 OK\r\n".into()
                    }
                    None => format!("550 no such user {to}\r\n"),
                }
            }
            "DATA" => {
                out.write_all(b"354 end with <CRLF>.<CRLF>\r\n")?;
                let mut message = Vec::new();
                loop {
                    let mut data = Vec::new();
                    if input.read_until(b'\n', &mut data)? == 0 {
                        return Ok(());
                    }
                    if data == b".\r\n" || data == b".\n" {
                        break;
                    }
                    let data = if data.starts_with(b"..") {
                        &data[1..]
                    } else {
                        &data[..]
                    };
                    message.extend_from_slice(data);
                }
                let mut failed = None;
                for user in &recipients {
                    match lda_deliver(lda, conf, user, &from, &message) {
                        Ok(()) => log
                            .lock()
                            .unwrap()
                            .push(format!("{from} -> {user}: {}", subject_of(&message))),
                        Err(e) => failed = Some(e),
                    }
                }
                recipients.clear();
                match failed {
                    None => "250 delivered\r\n".into(),
                    Some(e) => {
                        log.lock().unwrap().push(format!("delivery failed: {e}"));
                        "451 delivery failed\r\n".into()
                    }
                }
            }
            "RSET" => {
                recipients.clear();
                "250 OK\r\n".into()
            }
            "NOOP" => "250 OK\r\n".into(),
            "QUIT" => {
                out.write_all(b"221 bye\r\n")?;
                return Ok(());
            }
            _ => "502 not implemented\r\n".into(),
        };
        out.write_all(reply.as_bytes())?;
    }
}

fn angle_address(command: &str) -> String {
    match (command.find('<'), command.find('>')) {
        (Some(a), Some(b)) if a < b => command[a + 1..b].to_string(),
        _ => command
            .split_once(':')
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default(),
    }
}

fn subject_of(message: &[u8]) -> String {
    String::from_utf8_lossy(message)
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            l.strip_prefix("Subject:")
                .or_else(|| l.strip_prefix("subject:"))
        })
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `name` or `name@corp.test` → `name`, when it is one of `users`.
fn local_user(users: &[String], address: &str) -> Option<String> {
    let address = address.to_ascii_lowercase();
    let name = match address.split_once('@') {
        Some((name, domain)) if domain == MAIL_DOMAIN => name.to_string(),
        Some(_) => return None,
        None => address,
    };
    users.iter().find(|u| **u == name).cloned()
}

fn lda_deliver(
    lda: &Path,
    conf: &Path,
    user: &str,
    from: &str,
    message: &[u8],
) -> Result<(), String> {
    let mut child = Command::new(lda)
        .args(["-c", path_str(conf), "-d", user, "-f", from])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running dovecot-lda: {e}"))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(message)
        .map_err(|e| format!("writing to dovecot-lda: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("dovecot-lda: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "dovecot-lda -d {user} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

// -- IMAP (just enough to open every mailbox with CONDSTORE) ---------------------------------

struct Imap {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    tag: usize,
}

impl Imap {
    fn connect(port: u16) -> std::io::Result<Imap> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Imap {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            tag: 0,
        })
    }

    /// Reads lines up to the server's `* OK` greeting.
    fn greeting(&mut self) -> Result<(), String> {
        loop {
            let mut line = String::new();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("closed before the greeting".into());
            }
            if line.starts_with("* OK") && line.contains("ready") {
                return Ok(());
            }
            if !line.starts_with("* OK") {
                return Err(format!("unexpected greeting {line:?}"));
            }
        }
    }

    /// Sends one command; returns its untagged lines, or the tagged line when not OK.
    fn command(&mut self, text: &str) -> Result<Vec<String>, String> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        self.writer
            .write_all(format!("{tag} {text}\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut untagged = Vec::new();
        loop {
            let mut line = String::new();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err(format!("{text}: connection closed"));
            }
            let line = line.trim_end().to_string();
            if let Some(rest) = line.strip_prefix(&format!("{tag} ")) {
                return if rest.starts_with("OK") {
                    Ok(untagged)
                } else {
                    Err(format!("{text}: {rest}"))
                };
            }
            untagged.push(line);
        }
    }
}

fn prime_condstore(port: u16, user: &str) -> Result<(), String> {
    let mut imap = Imap::connect(port).map_err(|e| e.to_string())?;
    imap.greeting()?;
    imap.command(&format!("LOGIN {user} unused"))?;
    let mut mailboxes = Vec::new();
    for line in imap.command("LIST \"\" \"*\"")? {
        if let Some(rest) = line.strip_prefix("* LIST ") {
            // * LIST (\HasNoChildren \Sent) "/" Sent   (the name may be quoted)
            let name = rest.rsplit_once(' ').map(|(_, n)| n).unwrap_or("");
            let name = name.trim_matches('"');
            if !name.is_empty() {
                mailboxes.push(name.to_string());
            }
        }
    }
    if !mailboxes.iter().any(|m| m.eq_ignore_ascii_case("INBOX")) {
        mailboxes.push("INBOX".into());
    }
    for mailbox in &mailboxes {
        let lines = imap.command(&format!("SELECT \"{mailbox}\" (CONDSTORE)"))?;
        if !lines.iter().any(|l| l.contains("HIGHESTMODSEQ")) {
            return Err(format!(
                "SELECT {mailbox} (CONDSTORE) reported no HIGHESTMODSEQ"
            ));
        }
    }
    let _ = imap.command("LOGOUT");
    Ok(())
}

// -- processes and files -----------------------------------------------------------------------

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn account(name: &str) -> Account {
    fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.len() > 3 && fields[0] == name).then(|| Account {
                    uid: fields[2].parse().unwrap_or(0),
                    gid: fields[3].parse().unwrap_or(0),
                })
            })
        })
        .unwrap_or_else(|| panic!("no system user `{name}`. {MISSING}"))
}

fn make_dir(path: &Path, mode: u32, owner: Option<Account>) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    if let Some(owner) = owner {
        chown(path, owner);
    }
}

fn chown(path: &Path, owner: Account) {
    std::os::unix::fs::chown(path, Some(owner.uid), Some(owner.gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0 to find a free port")
}

fn signal(name: &str, pid: u32) -> bool {
    Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Signals `child` by PID, waits up to `grace`, then kills it.
fn stop(mut child: Child, name: &str, grace: Duration) {
    if signal(name, child.id()) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Kills `child` and every process below it, each by PID: the processes below are noted
/// first, then the parent goes (so it respawns nothing), then they do.
fn kill_tree(mut child: Child) {
    let below = descendants(child.id());
    let _ = child.kill();
    let _ = child.wait();
    for pid in below {
        signal("KILL", pid);
    }
}

/// Every live process below `root`, from /proc.
fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next().unwrap_or("");
        if let Some(ppid) = fields.next().and_then(|p| p.parse::<u32>().ok()) {
            if state != "Z" {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found: Vec<u32> = Vec::new();
    let mut seen: HashSet<u32> = HashSet::from([root]);
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for &(pid, ppid) in &parents {
            if ppid == parent && seen.insert(pid) {
                found.push(pid);
                frontier.push(pid);
            }
        }
    }
    found
}

/// The status of a plain GET, or `None` when nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .ok()?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).ok()?;
    let text = String::from_utf8_lossy(&head[..n]);
    text.split(' ').nth(1)?.parse().ok()
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn unique_id() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{}.{}.{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The current time as an RFC 2822 date, UTC.
fn rfc2822_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let month_name = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {month_name} {year} {:02}:{:02}:{:02} +0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
