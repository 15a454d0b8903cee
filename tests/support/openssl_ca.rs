//! A real OpenSSL CA (`openssl ca`) for revocation tests: issue, revoke, and generate CRLs
//! the way an enterprise CA's operators do; a real `openssl ocsp` responder over its
//! database; and a loopback HTTP server publishing files (a CRL distribution point).

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
        self.issue_with(name, "device", "")
    }

    /// Issues a device certificate whose `[device]` extensions gain `extra` lines, such as
    /// `authorityInfoAccess = OCSP;URI:http://127.0.0.1:PORT` or
    /// `crlDistributionPoints = URI:http://127.0.0.1:PORT/ca.crl`.
    pub fn issue_device(&self, name: &str, extra: &str) -> IssuedDevice {
        self.issue_with(name, "device", extra)
    }

    /// A delegated OCSP responder certificate (id-kp-OCSPSigning) issued by this CA.
    pub fn issue_ocsp_signer(&self, name: &str) -> IssuedDevice {
        self.issue_with(name, "ocsp_signer", "")
    }

    /// Issues whatever a hostile test needs: its own subject (raw bytes allowed, openssl
    /// `-subj` syntax), key (`ec` P-256 or `rsa:BITS`), digest and complete extension section.
    pub fn issue_custom(
        &self,
        name: &str,
        subject: &str,
        key: &str,
        digest: &str,
        extensions: &str,
    ) -> IssuedDevice {
        self.issue_full(name, subject, (key, digest), "custom", extensions, &[])
    }

    /// Issues a P-256 certificate valid from `start` to `end` (`YYYYMMDDHHMMSSZ`), whatever
    /// the clock says: expired or not yet valid.
    pub fn issue_dated(
        &self,
        name: &str,
        subject: &str,
        start: &str,
        end: &str,
        extensions: &str,
    ) -> IssuedDevice {
        self.issue_full(
            name,
            subject,
            ("ec", "sha256"),
            "custom",
            extensions,
            &["-startdate", start, "-enddate", end],
        )
    }

    fn issue_with(&self, name: &str, section: &str, extra: &str) -> IssuedDevice {
        let lines = format!("{}{extra}", extension_lines(section));
        self.issue_full(
            name,
            &format!("/CN={name}"),
            ("ec", "sha256"),
            section,
            &lines,
            &[],
        )
    }

    fn issue_full(
        &self,
        name: &str,
        subject: &str,
        (key_kind, digest): (&str, &str),
        section: &str,
        lines: &str,
        ca_args: &[&str],
    ) -> IssuedDevice {
        let path = self.dir.path();
        let serial_hex = std::fs::read_to_string(path.join("serial")).unwrap();
        let serial: Vec<u8> = (0..serial_hex.trim().len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&serial_hex.trim()[i..i + 2], 16).unwrap())
            .collect();
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let cert = format!("{name}.pem");
        let mut req = vec!["req", "-new", "-utf8", "-newkey", key_kind];
        if key_kind == "ec" {
            req.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
        }
        req.extend(["-nodes", "-keyout", &key, "-out", &csr, "-subj", subject]);
        openssl(&req, path);
        let config = self.config.to_str().unwrap();
        let extensions = self
            .dir
            .write(&format!("{name}.ext"), &format!("[{section}]\n{lines}\n"));
        let mut args = vec![
            "ca",
            "-batch",
            "-utf8",
            "-md",
            digest,
            "-config",
            config,
            "-extfile",
            extensions.to_str().unwrap(),
            "-extensions",
            section,
            "-in",
            &csr,
            "-out",
            &cert,
            "-notext",
        ];
        args.extend_from_slice(ca_args);
        openssl(&args, path);
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

    /// The CA's private key (PEM).
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("ca.key")
    }

    /// `openssl ca -gencrl`, valid for `seconds`, written to `file` as DER, as distribution
    /// points serve it.
    pub fn write_crl_der(&self, file: &Path, seconds: u32) {
        let pem = self.dir.path().join("crl-der.pem");
        self.write_crl(&pem, seconds);
        self.to_der(&pem, file);
    }

    /// A delta CRL (RFC 5280 §5.2.4: a critical deltaCRLIndicator naming `base_number`), as
    /// AD CS publishes between base CRLs, valid for `seconds`, written to `file` as DER. It
    /// lists every revocation so far: a delta may list more than the changes since its base.
    pub fn write_delta_crl_der(&self, file: &Path, seconds: u32, base_number: u32) {
        let pem = self.dir.path().join("delta-der.pem");
        self.write_delta_crl(&pem, seconds, base_number);
        self.to_der(&pem, file);
    }

    /// As `write_delta_crl_der`, written as PEM.
    pub fn write_delta_crl(&self, file: &Path, seconds: u32, base_number: u32) {
        let section = format!("delta_of_{base_number}");
        let config = std::fs::read_to_string(&self.config).unwrap();
        if !config.contains(&format!("[{section}]")) {
            std::fs::write(
                &self.config,
                format!("{config}\n[{section}]\n2.5.29.27 = critical,ASN1:INTEGER:{base_number}\n"),
            )
            .unwrap();
        }
        self.gencrl(file, seconds, &["-crlexts", &section]);
    }

    /// The CRL number the next `-gencrl` writes.
    pub fn next_crl_number(&self) -> u32 {
        let text = std::fs::read_to_string(self.dir.path().join("crlnumber")).unwrap();
        u32::from_str_radix(text.trim(), 16).unwrap()
    }

    fn to_der(&self, pem: &Path, file: &Path) {
        let tmp = self.dir.path().join("crl-der.tmp");
        openssl(
            &[
                "crl",
                "-in",
                pem.to_str().unwrap(),
                "-outform",
                "DER",
                "-out",
                tmp.to_str().unwrap(),
            ],
            self.dir.path(),
        );
        std::fs::rename(&tmp, file).unwrap();
    }

    /// `openssl ca -gencrl`, valid for `seconds`, written to `file` (PEM).
    pub fn write_crl(&self, file: &Path, seconds: u32) {
        self.gencrl(file, seconds, &[]);
    }

    fn gencrl(&self, file: &Path, seconds: u32, extra: &[&str]) {
        let config = self.config.to_str().unwrap();
        let tmp = self.dir.path().join("crl.tmp");
        let seconds = seconds.to_string();
        let mut args = vec![
            "ca",
            "-config",
            config,
            "-gencrl",
            "-crlsec",
            &seconds,
            "-out",
            tmp.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        openssl(&args, self.dir.path());
        // Renamed into place, so a watcher never reads half a file.
        std::fs::rename(&tmp, file).unwrap();
    }
}

/// The extensions of each certificate kind the CA issues.
fn extension_lines(section: &str) -> &'static str {
    match section {
        "ocsp_signer" => {
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = OCSPSigning\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        }
        _ => {
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\nsubjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        }
    }
}

/// A free loopback port (bound, read, released: a responder started right after gets it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A real `openssl ocsp` responder over the CA's database (`index.txt`).
pub struct OcspResponder {
    pub port: u16,
    args: Vec<String>,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl OcspResponder {
    /// Answers signed by `signer` (a delegated responder certificate) or, with `None`, by
    /// the CA itself; no nextUpdate in the answers (seg caches them its own short while).
    pub fn start(ca: &OpensslCa, port: u16, signer: Option<&IssuedDevice>) -> OcspResponder {
        let (cert, key) = match signer {
            Some(s) => (s.cert.clone(), s.key.clone()),
            None => (ca.cert.clone(), ca.key()),
        };
        let args: Vec<String> = [
            "ocsp",
            "-index",
            "index.txt",
            // OpenSSL 3.0 takes a bare port here (it listens on every interface).
            "-port",
            &port.to_string(),
            "-rsigner",
            cert.to_str().unwrap(),
            "-rkey",
            key.to_str().unwrap(),
            "-CA",
            ca.cert.to_str().unwrap(),
            "-ignore_err",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut responder = OcspResponder {
            port,
            args,
            dir: ca.dir.path().to_path_buf(),
            child: None,
        };
        responder.spawn();
        responder
    }

    fn spawn(&mut self) {
        let child = Command::new("openssl")
            .args(&self.args)
            .current_dir(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl is needed: apt-get install openssl (./tests/run.sh installs it)");
        self.child = Some(child);
        // Listening within a few hundred milliseconds. Probed by trying to bind the port, not
        // by connecting: `openssl ocsp` serves one connection at a time and an empty one
        // wedges it.
        for _ in 0..100 {
            if std::net::TcpListener::bind(("::", self.port)).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("openssl ocsp did not listen on 127.0.0.1:{}", self.port);
    }

    /// Stops the responder (a responder outage).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (it reads index.txt afresh).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for OcspResponder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback HTTP/1.1 server answering `GET /NAME` with the file `dir/NAME` (404 if
/// absent): a CRL distribution point. Counts the GETs it answered.
pub struct FileServer {
    pub addr: std::net::SocketAddr,
    pub gets: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FileServer {
    pub async fn start(dir: &Path) -> FileServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the file server");
        let addr = listener.local_addr().unwrap();
        let gets = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&gets);
        let dir = dir.to_path_buf();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                let dir = dir.clone();
                let counter = std::sync::Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match tcp.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split(' ').nth(1).unwrap_or("/");
                    let name = path.trim_start_matches('/');
                    let body = (!name.contains('/') && !name.contains(".."))
                        .then(|| std::fs::read(dir.join(name)).ok())
                        .flatten();
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let response = match body {
                        Some(body) => [
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/pkix-crl\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes(),
                            body,
                        ]
                        .concat(),
                        None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                    };
                    let _ = tcp.write_all(&response).await;
                });
            }
        });
        FileServer { addr, gets, task }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
