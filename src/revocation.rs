//! Certificate revocation lists: read once, looked up in constant time.
//!
//! The CRLs serve twice. The TLS verifier gets them (with `nextUpdate` enforced, which
//! rustls skips unless told) so a revoked certificate fails its handshake; and every request
//! is checked against the current list by issuer and serial, because a resumed TLS session
//! restores the old certificate without checking it again and an ActiveSync connection lives
//! for hours: after a reload brings a new CRL, a revoked device's next request is refused.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::tls::TlsError;

/// The CRLs in force.
#[derive(Default)]
pub struct RevocationList {
    /// Issuer DN (DER) → serials (without sign byte) of its revoked certificates.
    revoked: HashMap<Vec<u8>, HashSet<Box<[u8]>>>,
    /// One entry per CRL, for readiness and metrics.
    pub crls: Vec<CrlInfo>,
    /// The CRLs as DER, for the TLS verifier.
    pub der: Vec<CertificateRevocationListDer<'static>>,
}

/// What readiness and metrics need of one CRL.
#[derive(Debug, Clone)]
pub struct CrlInfo {
    pub file: PathBuf,
    pub issuer: String,
    pub this_update_unix: i64,
    /// `None` when the CRL has no nextUpdate (treated as never stale).
    pub next_update_unix: Option<i64>,
    pub entries: usize,
}

impl RevocationList {
    /// Reads every CRL file (PEM `X509 CRL` blocks or raw DER).
    pub fn load(files: &[PathBuf]) -> Result<RevocationList, TlsError> {
        let mut list = RevocationList::default();
        for file in files {
            for der in read_crl_file(file)? {
                list.add(file, der)?;
            }
        }
        Ok(list)
    }

    fn add(
        &mut self,
        file: &Path,
        der: CertificateRevocationListDer<'static>,
    ) -> Result<(), TlsError> {
        let bad = |e: String| TlsError {
            key: "tls.crl_files",
            message: format!("{}: {e}", file.display()),
        };
        let (_, crl) =
            CertificateRevocationList::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
        let serials = self
            .revoked
            .entry(crl.issuer().as_raw().to_vec())
            .or_default();
        let mut entries = 0;
        for revoked in crl.iter_revoked_certificates() {
            serials.insert(strip_sign_byte(revoked.raw_serial()).into());
            entries += 1;
        }
        self.crls.push(CrlInfo {
            file: file.to_path_buf(),
            issuer: crl.issuer().to_string(),
            this_update_unix: crl.last_update().timestamp(),
            next_update_unix: crl.next_update().map(|t| t.timestamp()),
            entries,
        });
        self.der.push(der);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.crls.is_empty()
    }

    /// Whether the certificate with this issuer (DER) and serial is revoked.
    pub fn is_revoked(&self, issuer_der: &[u8], serial: &[u8]) -> bool {
        self.revoked
            .get(issuer_der)
            .is_some_and(|serials| serials.contains(serial))
    }

    /// The CRLs past their nextUpdate at `now_unix`.
    pub fn stale(&self, now_unix: i64) -> Vec<&CrlInfo> {
        self.crls
            .iter()
            .filter(|c| c.next_update_unix.is_some_and(|n| n <= now_unix))
            .collect()
    }
}

/// The CRLs in force for every connection, old or new: shared by all configurations and
/// replaced only when a reload succeeds, so an open connection sees a new CRL at once.
#[derive(Default)]
pub struct CurrentRevocation(RwLock<Arc<RevocationList>>);

impl CurrentRevocation {
    pub fn load(&self) -> Arc<RevocationList> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn store(&self, list: Arc<RevocationList>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = list;
    }
}

fn read_crl_file(file: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = std::fs::read(file).map_err(|e| TlsError {
        key: "tls.crl_files",
        message: format!("cannot read {}: {e}", file.display()),
    })?;
    let pem: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError {
            key: "tls.crl_files",
            message: format!("{}: {e}", file.display()),
        })?;
    if !pem.is_empty() {
        return Ok(pem);
    }
    // Not PEM: a raw DER CRL, as distribution points serve them.
    Ok(vec![CertificateRevocationListDer::from(bytes)])
}

fn strip_sign_byte(serial: &[u8]) -> &[u8] {
    match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    }
}
