//! `seg demo`: the whole job on one machine, no setup.
//!
//! A throwaway CA issues a server certificate and device certificates; a built-in LDIF
//! directory holds their accounts; an echo upstream plays ActiveSync; seg serves in front
//! and the exact `curl` commands to try are printed.

pub mod echo;
pub mod pki;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::demo::echo::EchoUpstream;
use crate::demo::pki::{CertAuthority, IssuedCert, LeafSpec};
use crate::{App, Running};

/// The demo directory, shipped in `config/`.
pub const DEMO_LDIF: &str = include_str!("../../config/demo-directory.ldif");

/// Bob's certificate serial; `config/demo-directory.ldif` binds it byte-reversed.
pub const BOB_SERIAL: [u8; 8] = [0x1a, 0x2b, 0x3c, 0x4d, 0x5e, 0x6f, 0x70, 0x81];

/// Where the demo listens and writes its files.
pub struct DemoOptions {
    pub dir: Option<PathBuf>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

/// A running demo.
pub struct Demo {
    pub dir: PathBuf,
    pub running: Running,
    pub upstream: EchoUpstream,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] crate::demo::pki::PkiError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Build(#[from] crate::app::BuildError),
    #[error("cannot listen: {0}")]
    Listen(std::io::Error),
}

impl Demo {
    /// Writes the PKI, directory and configuration under the demo folder and starts serving.
    pub async fn start(options: DemoOptions) -> Result<Demo, DemoError> {
        let dir = match options.dir {
            Some(d) => d,
            None => std::env::temp_dir().join(format!(
                "seg-demo-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0)
            )),
        };
        let devices = dir.join("devices");
        create_dir(&devices)?;

        let ca = CertAuthority::new("seg demo", "seg demo enterprise CA")?;
        write(&dir.join("ca.pem"), &ca.cert_pem())?;
        write_pair(&dir, "server", &ca.issue(&LeafSpec::loopback_server())?)?;
        let alice = LeafSpec::device("alice")
            .upn("alice@demo.test")
            .sid_extension("S-1-5-21-1000-2000-3000-1104");
        write_pair(&devices, "alice", &ca.issue(&alice)?)?;
        let bob = LeafSpec::device("bob").serial(&BOB_SERIAL);
        write_pair(&devices, "bob", &ca.issue(&bob)?)?;
        let dave = LeafSpec::device("dave")
            .upn("dave@demo.test")
            .sid_extension("S-1-5-21-1000-2000-3000-1106");
        write_pair(&devices, "dave", &ca.issue(&dave)?)?;
        let erin = LeafSpec::device("erin")
            .upn("erin@demo.test")
            .sid_extension("S-1-5-21-1000-2000-3000-1107");
        write_pair(&devices, "erin", &ca.issue(&erin)?)?;
        // Mallory claims Alice's UPN, from a CA the gateway does not trust.
        let rogue = CertAuthority::new("elsewhere", "rogue CA")?;
        write_pair(&devices, "mallory", &rogue.issue(&alice.clone())?)?;
        write(&dir.join("directory.ldif"), DEMO_LDIF)?;

        let upstream = EchoUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(DemoError::Listen)?;
        let config_path = dir.join("seg.toml");
        write(
            &config_path,
            &demo_config(options.listen, options.admin, upstream.addr),
        )?;
        let config = Config::load(&config_path)?;
        let running = App::build(config)?
            .start()
            .await
            .map_err(DemoError::Listen)?;
        Ok(Demo {
            dir,
            running,
            upstream,
        })
    }

    /// The commands a newcomer runs against the demo.
    pub fn instructions(&self) -> String {
        let d = self.dir.display();
        let url = format!(
            "https://127.0.0.1:{}/Microsoft-Server-ActiveSync",
            self.running.listen_addr.port()
        );
        let curl = |who: &str, query: &str| {
            format!(
                "curl --cacert {d}/ca.pem --cert {d}/devices/{who}.pem --key {d}/devices/{who}.key \\\n       -X POST '{url}?{query}'"
            )
        };
        format!(
            "seg demo is serving on https://{listen} (admin http://{admin}); files in {d}\n\n\
             A mapped request (alice's UPN → her account, made strong by the SID in her certificate;\n\
             the echo upstream shows X-Remote-User):\n  {alice}\n\n\
             The same by an explicit altSecurityIdentities binding (bob):\n  {bob}\n\n\
             Rejected: a disabled account → 403 (and erin, an expired one, likewise):\n  {dave}\n\n\
             Rejected: a certificate from an untrusted CA → the TLS handshake fails:\n  {mallory}\n\n\
             Why a certificate maps or not, as an administrator sees it:\n  \
             seg map --config {d}/seg.toml --cert {d}/devices/dave.pem --explain\n\n\
             The metrics:\n  curl http://{admin}/metrics\n\n\
             Ctrl-C stops everything.\n",
            listen = self.running.listen_addr,
            admin = self.running.admin_addr,
            alice = curl("alice", "Cmd=FolderSync&User=alice&DeviceId=DEMO1&DeviceType=iPhone"),
            bob = curl("bob", "Cmd=Sync&User=bob&DeviceId=DEMO2&DeviceType=Android"),
            dave = curl("dave", "Cmd=Sync&User=dave&DeviceId=DEMO3&DeviceType=iPhone"),
            mallory = curl("mallory", "Cmd=Sync&User=alice&DeviceId=EVIL&DeviceType=iPhone"),
        )
    }
}

fn demo_config(listen: SocketAddr, admin: SocketAddr, upstream: SocketAddr) -> String {
    format!(
        r#"# Written by `seg demo`. Every key is documented in config/seg.example.toml.
[listen]
address = "{listen}"

[tls]
certificate = "server.pem"
private_key = "server.key"
client_ca = "ca.pem"

[directory]
ldif_file = "directory.ldif"

[mapping]
# The defaults: strong forms first, and KB5014754 full enforcement.
rules = ["issuer-serial", "subject-key-id", "sha1-public-key", "issuer-sid", "upn", "email"]
enforcement = "full"

[identity]
header = "X-Remote-User"
value = "upn"

[upstream]
url = "http://{upstream}"

[admin]
address = "{admin}"

# The demo CA issues the devices itself: it is the NTAuth store (in AD, read it from the
# directory with directory = true).
[ntauth]
file = "ca.pem"
"#
    )
}

fn create_dir(path: &Path) -> Result<(), DemoError> {
    std::fs::create_dir_all(path).map_err(|source| DemoError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<(), DemoError> {
    std::fs::write(path, text).map_err(|source| DemoError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn write_pair(dir: &Path, name: &str, issued: &IssuedCert) -> Result<(), DemoError> {
    write(&dir.join(format!("{name}.pem")), &issued.cert_pem)?;
    let key = dir.join(format!("{name}.key"));
    write(&key, &issued.key_pem)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600));
    }
    Ok(())
}
