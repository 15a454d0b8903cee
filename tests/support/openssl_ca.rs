//! A real OpenSSL CA (`openssl ca`) for revocation tests: issue, revoke, and generate CRLs
//! the way an enterprise CA's operators do.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::lab::TempDir;

/// An OpenSSL CA in a temp dir: its database, serial file and keys.
pub struct OpensslCa {
    pub dir: TempDir,
    pub cert: PathBuf,
    config: PathBuf,
}

/// A device certificate issued by the OpenSSL CA.
pub struct IssuedDevice {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The serial as big-endian bytes.
    pub serial: Vec<u8>,
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed: apt-get install openssl (./tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl OpensslCa {
    /// A root CA named `O=<organization>, CN=<common_name>`, serials from 0x1000.
    pub fn new(organization: &str, common_name: &str) -> OpensslCa {
        let dir = TempDir::new("openssl-ca");
        let path = dir.path().to_path_buf();
        std::fs::write(path.join("index.txt"), "").unwrap();
        std::fs::write(path.join("serial"), "1000\n").unwrap();
        std::fs::write(path.join("crlnumber"), "01\n").unwrap();
        let config = dir.write(
            "ca.cnf",
            &format!(
                r#"[ca]
default_ca = corp
[corp]
dir = {dir}
database = $dir/index.txt
serial = $dir/serial
crlnumber = $dir/crlnumber
new_certs_dir = $dir
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
default_days = 30
default_crl_days = 1
policy = anything
unique_subject = no
copy_extensions = none
[anything]
commonName = supplied
[device]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[req]
distinguished_name = dn
[dn]
"#,
                dir = path.display()
            ),
        );
        let subject = format!("/O={organization}/CN={common_name}");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "30",
                "-subj",
                &subject,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            &path,
        );
        OpensslCa {
            cert: path.join("ca.pem"),
            dir,
            config,
        }
    }

    /// Issues a clientAuth device certificate with subject CN=`name`.
    pub fn issue(&self, name: &str) -> IssuedDevice {
        let path = self.dir.path();
        let serial_hex = std::fs::read_to_string(path.join("serial")).unwrap();
        let serial: Vec<u8> = (0..serial_hex.trim().len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&serial_hex.trim()[i..i + 2], 16).unwrap())
            .collect();
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let cert = format!("{name}.pem");
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={name}"),
            ],
            path,
        );
        let config = self.config.to_str().unwrap();
        openssl(
            &[
                "ca",
                "-batch",
                "-config",
                config,
                "-extensions",
                "device",
                "-in",
                &csr,
                "-out",
                &cert,
                "-notext",
            ],
            path,
        );
        // `openssl req` writes the key as PKCS#8, which rustls reads.
        IssuedDevice {
            cert: path.join(cert),
            key: path.join(key),
            serial,
        }
    }

    /// `openssl ca -revoke`.
    pub fn revoke(&self, device: &IssuedDevice) {
        let config = self.config.to_str().unwrap();
        openssl(
            &[
                "ca",
                "-config",
                config,
                "-revoke",
                device.cert.to_str().unwrap(),
            ],
            self.dir.path(),
        );
    }

    /// `openssl ca -gencrl`, valid for `seconds`, written to `file` (PEM).
    pub fn write_crl(&self, file: &Path, seconds: u32) {
        let config = self.config.to_str().unwrap();
        let tmp = self.dir.path().join("crl.tmp");
        openssl(
            &[
                "ca",
                "-config",
                config,
                "-gencrl",
                "-crlsec",
                &seconds.to_string(),
                "-out",
                tmp.to_str().unwrap(),
            ],
            self.dir.path(),
        );
        // Renamed into place, so a watcher never reads half a file.
        std::fs::rename(&tmp, file).unwrap();
    }
}
