//! A real Negotiate acceptor standing in for Exchange's IIS: Apache httpd with
//! `mod_auth_gssapi` and the backend's keytab, in a temp dir of its own, in the foreground
//! (`-DFOREGROUND`, prefork) on a free loopback port, stopped by PID when dropped.
//!
//! Every request under `/Microsoft-Server-ActiveSync` must authenticate with Kerberos
//! (SPNEGO); a CGI then answers with what Apache authenticated: `REMOTE_USER=…`, the client
//! port of the connection (`REMOTE_PORT=…`, to tell connections apart) and any
//! `X-Remote-User` header that reached it. `/bad/Microsoft-Server-ActiveSync` is the same
//! script behind a keytab that is not the target SPN's, so every token is refused with 401.
//!
//! [`Apache::start_sogo_front`] is the other shape: Apache as SOGo's Kerberos front,
//! `mod_proxy_http` passing each authenticated request to SOGo with the user's name in
//! `x-webobjects-remote-user`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MISSING: &str = "Apache with mod_auth_gssapi not found: install it with \
     `apt-get install apache2 libapache2-mod-auth-gssapi` \
     (the README's test command ./tests/run.sh does this)";
const MODULES: &str = "/usr/lib/apache2/modules";
const APACHE: &str = "/usr/sbin/apache2";

/// A running Apache Negotiate acceptor.
pub struct Apache {
    child: Option<Child>,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Apache {
    /// Starts Apache in `dir` with `keytab` (the target SPN's) for `/` and `wrong_keytab`
    /// for `/bad`; `krb5_conf` is the realm's configuration.
    pub fn start(dir: &Path, keytab: &Path, wrong_keytab: &Path, krb5_conf: &Path) -> Apache {
        require(&["mod_cgi.so"]);
        std::fs::create_dir_all(dir.join("cgi")).expect("apache dir");
        let keytab = copy_readable(keytab, &dir.join("eas.keytab"));
        let wrong_keytab = copy_readable(wrong_keytab, &dir.join("wrong.keytab"));
        let script = dir.join("cgi/eas.cgi");
        std::fs::write(
            &script,
            "#!/bin/sh\nbody=\"REMOTE_USER=$REMOTE_USER\nREMOTE_PORT=$REMOTE_PORT\n\
             X_REMOTE_USER=$HTTP_X_REMOTE_USER\nAUTH_TYPE=$AUTH_TYPE\n\"\n\
             printf 'Content-Type: text/plain\\r\\nContent-Length: %d\\r\\n\\r\\n%s' \
             \"${#body}\" \"$body\"\n",
        )
        .expect("write cgi");
        set_mode(&script, 0o755);
        let d = dir.display();
        let site = format!(
            r#"LoadModule alias_module {MODULES}/mod_alias.so
LoadModule cgi_module {MODULES}/mod_cgi.so
ScriptAlias /bad/Microsoft-Server-ActiveSync "{d}/cgi/eas.cgi"
ScriptAlias /Microsoft-Server-ActiveSync "{d}/cgi/eas.cgi"
<Location /Microsoft-Server-ActiveSync>
{auth}
</Location>
<Location /bad>
{wrong}
</Location>
"#,
            auth = negotiate(&keytab),
            wrong = negotiate(&wrong_keytab),
        );
        Apache::launch(dir, &site, krb5_conf)
    }

    /// Starts Apache in `dir` as SOGo's front, as SOGo's documentation sets it up for
    /// Kerberos: every request under `/SOGo/Microsoft-Server-ActiveSync` authenticates with
    /// Negotiate against `keytab`, and is proxied to SOGo at `sogo` with
    /// `x-webobjects-remote-user` set to the authenticated name without its realm
    /// (`GssapiLocalName`); any copy of that header, or an `Authorization` header, sent by
    /// the client is removed first.
    pub fn start_sogo_front(
        dir: &Path,
        keytab: &Path,
        krb5_conf: &Path,
        sogo: SocketAddr,
    ) -> Apache {
        require(&["mod_proxy.so", "mod_proxy_http.so", "mod_headers.so"]);
        let keytab = copy_readable(keytab, &dir.join("eas.keytab"));
        let site = format!(
            r#"LoadModule proxy_module {MODULES}/mod_proxy.so
LoadModule proxy_http_module {MODULES}/mod_proxy_http.so
LoadModule headers_module {MODULES}/mod_headers.so
# A held Ping lasts up to SOGo's longest heartbeat.
ProxyTimeout 120
RequestHeader unset x-webobjects-remote-user early
<Location /SOGo/Microsoft-Server-ActiveSync>
{auth}
    GssapiLocalName On
    RequestHeader unset Authorization
    RequestHeader set x-webobjects-remote-user "expr=%{{REMOTE_USER}}"
    # sogod closes every connection after its response without saying so.
    ProxyPass http://{sogo}/SOGo/Microsoft-Server-ActiveSync disablereuse=On
</Location>
"#,
            auth = negotiate(&keytab),
        );
        Apache::launch(dir, &site, krb5_conf)
    }

    /// Writes `httpd.conf` (the common server settings, then `site`) and runs Apache in the
    /// foreground until it listens.
    fn launch(dir: &Path, site: &str, krb5_conf: &Path) -> Apache {
        let binary = Path::new(APACHE);
        std::fs::create_dir_all(dir).expect("apache dir");
        // Apache's children run as www-data: they read the keytabs and scripts in `dir`.
        set_mode(dir, 0o755);
        // The replay cache is written by the www-data child.
        let rcache = dir.join("rcache");
        std::fs::create_dir_all(&rcache).expect("rcache dir");
        set_mode(&rcache, 0o1777);
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let d = dir.display();
        let conf = format!(
            r#"ServerRoot "{d}"
ServerName eas.corp.test
Listen 127.0.0.1:{port}
PidFile "{d}/httpd.pid"
ErrorLog "{d}/error.log"
LogLevel info auth_gssapi:debug
LogFormat "%h \"%r\" %>s %u" seg
CustomLog "{d}/access.log" seg
DefaultRuntimeDir "{d}"
Mutex file:{d} default
User www-data
Group www-data
LoadModule mpm_prefork_module {MODULES}/mod_mpm_prefork.so
LoadModule authz_core_module {MODULES}/mod_authz_core.so
LoadModule authn_core_module {MODULES}/mod_authn_core.so
LoadModule authz_user_module {MODULES}/mod_authz_user.so
LoadModule auth_gssapi_module {MODULES}/mod_auth_gssapi.so
DocumentRoot "{d}"
KeepAlive On
StartServers 4
MinSpareServers 4
MaxRequestWorkers 32
{site}"#
        );
        let conf_path = dir.join("httpd.conf");
        std::fs::write(&conf_path, conf).expect("write httpd.conf");
        let log = std::fs::File::create(dir.join("stdout.log")).expect("apache log");
        // A process group of its own: prefork's parent signals its whole group on shutdown.
        let child = Command::new(binary)
            .process_group(0)
            .args(["-DFOREGROUND", "-f"])
            .arg(&conf_path)
            .env("KRB5_CONFIG", krb5_conf)
            .env("KRB5RCACHEDIR", &rcache)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{MISSING}: {e}"));
        let mut apache = Apache {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            if let Some(Ok(Some(status))) = apache.child.as_mut().map(|c| c.try_wait()) {
                panic!("apache exited with {status}:\n{}", apache.log());
            }
            if Instant::now() > deadline {
                panic!("apache did not listen on {addr}:\n{}", apache.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        apache
    }

    /// Apache's error log and output.
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}{}", read("stdout.log"), read("error.log"))
    }

    /// The access log: one line per request, `CLIENT "REQUEST LINE" STATUS USER`.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

/// Panics naming the packages when Apache, `mod_auth_gssapi` or one of `modules` is missing.
fn require(modules: &[&str]) {
    let mut needed = vec![
        Path::new(APACHE).to_path_buf(),
        Path::new(MODULES).join("mod_auth_gssapi.so"),
    ];
    needed.extend(modules.iter().map(|m| Path::new(MODULES).join(m)));
    for path in needed {
        if !path.exists() {
            panic!("{MISSING} [{} is missing]", path.display());
        }
    }
}

/// The directives that demand Kerberos (SPNEGO) against `keytab`.
fn negotiate(keytab: &Path) -> String {
    format!(
        "    AuthType GSSAPI\n    AuthName \"EAS\"\n    GssapiCredStore keytab:{}\n    \
         GssapiAllowedMech krb5\n    Require valid-user",
        keytab.display()
    )
}

/// Copies `from` to `to`, readable by Apache's www-data children.
fn copy_readable(from: &Path, to: &Path) -> PathBuf {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).expect("apache dir");
    }
    std::fs::copy(from, to).expect("copy keytab");
    set_mode(to, 0o644);
    to.to_path_buf()
}

impl Drop for Apache {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: the parent stops its www-data children, then exits.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
