//! Certificate revocation lists: read once, looked up in constant time.
//!
//! The CRLs serve twice. The TLS verifier gets them (with `nextUpdate` enforced, which
//! rustls skips unless told) so a revoked certificate fails its handshake; and every request
//! is checked against the current list by issuer and serial, because a resumed TLS session
//! restores the old certificate without checking it again and an ActiveSync connection lives
//! for hours: after a reload brings a new CRL, a revoked device's next request is refused.
//!
//! Each CRL is parsed once into a set of serials (`ParsedCrl`); a `RevocationList` only
//! indexes parsed CRLs by issuer, so composing the CRL files with the CRLs fetched over HTTP
//! (`crl_fetch`) after either changes costs no parsing, and two CRLs of one issuer (a file
//! and a fetched one) are both consulted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::tls::{ClientCertPolicy, TlsError};

/// The CRLs in force: each parsed once, looked up by issuer.
#[derive(Default, Clone)]
pub struct RevocationList {
    parsed: Vec<Arc<ParsedCrl>>,
    /// Issuer DN (DER) → indexes into `parsed` of its CRLs (a file and a fetched one, say).
    by_issuer: HashMap<Vec<u8>, Vec<usize>>,
}

/// One CRL, parsed once: its revoked serials as a set, its DER for the TLS verifier.
pub struct ParsedCrl {
    pub info: CrlInfo,
    issuer_der: Vec<u8>,
    /// Serials (without sign byte) of the revoked certificates.
    serials: HashSet<Box<[u8]>>,
    pub der: CertificateRevocationListDer<'static>,
}

/// Where a CRL came from, for logs and the metrics' `source` label.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum CrlSource {
    File(PathBuf),
    /// Fetched over HTTP (a distribution point or `revocation.crl_urls`).
    Url(String),
}

impl fmt::Display for CrlSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CrlSource::File(path) => write!(f, "{}", path.display()),
            CrlSource::Url(url) => f.write_str(url),
        }
    }
}

/// What readiness and metrics need of one CRL.
#[derive(Debug, Clone)]
pub struct CrlInfo {
    pub source: CrlSource,
    pub issuer: String,
    pub this_update_unix: i64,
    /// `None` when the CRL has no nextUpdate (treated as never stale).
    pub next_update_unix: Option<i64>,
    pub entries: usize,
}

impl ParsedCrl {
    /// Parses one DER CRL into its lookup set. The signature is not checked here: files are
    /// the operator's, fetched CRLs are verified by `crl_fetch` before they get this far.
    pub fn parse(
        source: CrlSource,
        der: CertificateRevocationListDer<'static>,
    ) -> Result<ParsedCrl, String> {
        let (_, crl) =
            CertificateRevocationList::from_der(der.as_ref()).map_err(|e| e.to_string())?;
        let serials: HashSet<Box<[u8]>> = crl
            .iter_revoked_certificates()
            .map(|revoked| strip_sign_byte(revoked.raw_serial()).into())
            .collect();
        let info = CrlInfo {
            source,
            issuer: crl.issuer().to_string(),
            this_update_unix: crl.last_update().timestamp(),
            next_update_unix: crl.next_update().map(|t| t.timestamp()),
            entries: serials.len(),
        };
        Ok(ParsedCrl {
            info,
            issuer_der: crl.issuer().as_raw().to_vec(),
            serials,
            der,
        })
    }

    /// The issuer's distinguished name, DER.
    pub fn issuer_der(&self) -> &[u8] {
        &self.issuer_der
    }
}

impl RevocationList {
    /// Reads every CRL file (PEM `X509 CRL` blocks or raw DER).
    pub fn load(files: &[PathBuf]) -> Result<RevocationList, TlsError> {
        let mut parsed = Vec::new();
        for file in files {
            for der in read_crl_file(file)? {
                let crl =
                    ParsedCrl::parse(CrlSource::File(file.clone()), der).map_err(|e| TlsError {
                        key: "tls.crl_files",
                        message: format!("{}: {e}", file.display()),
                    })?;
                parsed.push(Arc::new(crl));
            }
        }
        Ok(RevocationList::from_parsed(parsed))
    }

    /// A list of CRLs parsed before (no parsing again: composing is cheap).
    pub fn from_parsed(parsed: Vec<Arc<ParsedCrl>>) -> RevocationList {
        let mut by_issuer: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
        for (i, crl) in parsed.iter().enumerate() {
            by_issuer.entry(crl.issuer_der.clone()).or_default().push(i);
        }
        RevocationList { parsed, by_issuer }
    }

    pub fn is_empty(&self) -> bool {
        self.parsed.is_empty()
    }

    /// Every CRL of the list, for readiness and metrics.
    pub fn crls(&self) -> impl Iterator<Item = &CrlInfo> {
        self.parsed.iter().map(|c| &c.info)
    }

    /// The CRLs as DER, for the TLS verifier.
    pub fn der(&self) -> impl Iterator<Item = CertificateRevocationListDer<'static>> + '_ {
        self.parsed.iter().map(|c| c.der.clone())
    }

    /// Whether some CRL of this issuer (DER) is in force.
    pub fn covers(&self, issuer_der: &[u8]) -> bool {
        self.by_issuer.contains_key(issuer_der)
    }

    /// Whether the certificate with this issuer (DER) and serial is revoked.
    pub fn is_revoked(&self, issuer_der: &[u8], serial: &[u8]) -> bool {
        self.by_issuer.get(issuer_der).is_some_and(|crls| {
            crls.iter()
                .any(|&i| self.parsed[i].serials.contains(serial))
        })
    }

    /// The CRLs past their nextUpdate at `now_unix`.
    pub fn stale(&self, now_unix: i64) -> Vec<&CrlInfo> {
        self.crls()
            .filter(|c| c.next_update_unix.is_some_and(|n| n <= now_unix))
            .collect()
    }

    /// Whether both lists hold exactly the same parsed CRLs.
    pub fn same_crls(&self, other: &RevocationList) -> bool {
        self.parsed.len() == other.parsed.len()
            && self
                .parsed
                .iter()
                .zip(&other.parsed)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// The CRLs in force for every connection, old or new: shared by all configurations. The
/// list is the CRL files of the configuration serving now plus the CRLs fetched over HTTP;
/// either changing replaces it at once for the per-request check and rebuilds the verifier
/// of new handshakes (`ClientCertPolicy::set_crls`), so an open connection sees a new CRL
/// at once and a fetched CRL never waits for a reload.
#[derive(Default)]
pub struct CurrentRevocation {
    list: RwLock<Arc<RevocationList>>,
    sources: Mutex<Sources>,
}

#[derive(Default)]
struct Sources {
    files: Vec<Arc<ParsedCrl>>,
    fetched: BTreeMap<String, Arc<ParsedCrl>>,
    /// The verifier of the configuration serving now.
    verifier: Option<Arc<ClientCertPolicy>>,
}

impl Sources {
    fn merged(&self) -> RevocationList {
        RevocationList::from_parsed(
            self.files
                .iter()
                .chain(self.fetched.values())
                .cloned()
                .collect(),
        )
    }
}

impl CurrentRevocation {
    pub fn load(&self) -> Arc<RevocationList> {
        Arc::clone(&self.list.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The list a configuration with these CRL files would have: its files and the CRLs
    /// fetched so far. Nothing changes until `install`.
    pub fn with_files(&self, files: &RevocationList) -> RevocationList {
        let sources = self.lock();
        RevocationList::from_parsed(
            files
                .parsed
                .iter()
                .chain(sources.fetched.values())
                .cloned()
                .collect(),
        )
    }

    /// A new configuration takes over: its CRL files, and its verifier, built with
    /// `built_with`, which is brought up to date if a CRL was fetched since.
    pub fn install(
        &self,
        files: &RevocationList,
        verifier: Arc<ClientCertPolicy>,
        built_with: &RevocationList,
    ) {
        let mut sources = self.lock();
        sources.files = files.parsed.clone();
        let merged = Arc::new(sources.merged());
        if !merged.same_crls(built_with) {
            if let Err(e) = verifier.set_crls(&merged) {
                tracing::error!(target: "seg::tls", error = %e, "the TLS verifier refuses the CRLs fetched meanwhile; new handshakes use those it was built with");
            }
        }
        sources.verifier = Some(verifier);
        *self.list.write().unwrap_or_else(|e| e.into_inner()) = merged;
    }

    /// A CRL fetched from `url` (verified), or `None` to drop the one from `url`. Rebuilds
    /// the verifier: on error (webpki refuses the CRL) nothing changes.
    pub fn set_fetched(&self, url: &str, crl: Option<Arc<ParsedCrl>>) -> Result<(), TlsError> {
        let mut sources = self.lock();
        let previous = match crl {
            Some(crl) => sources.fetched.insert(url.to_string(), crl),
            None => sources.fetched.remove(url),
        };
        if let Err(e) = self.publish(&sources) {
            match previous {
                Some(old) => sources.fetched.insert(url.to_string(), old),
                None => sources.fetched.remove(url),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Drops every fetched CRL whose URL `keep` refuses.
    pub fn retain_fetched(&self, keep: impl Fn(&str) -> bool) {
        let mut sources = self.lock();
        let before = sources.fetched.len();
        sources.fetched.retain(|url, _| keep(url));
        if sources.fetched.len() != before {
            let _ = self.publish(&sources);
        }
    }

    /// The fetched CRL of `url`, if one was ever fetched.
    pub fn fetched(&self, url: &str) -> Option<Arc<ParsedCrl>> {
        self.lock().fetched.get(url).cloned()
    }

    fn publish(&self, sources: &Sources) -> Result<(), TlsError> {
        let merged = Arc::new(sources.merged());
        if let Some(verifier) = &sources.verifier {
            verifier.set_crls(&merged)?;
        }
        *self.list.write().unwrap_or_else(|e| e.into_inner()) = merged;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_crl_file(file: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = std::fs::read(file).map_err(|e| TlsError {
        key: "tls.crl_files",
        message: format!("cannot read {}: {e}", file.display()),
    })?;
    crls_from_bytes(bytes).map_err(|e| TlsError {
        key: "tls.crl_files",
        message: format!("{}: {e}", file.display()),
    })
}

/// PEM `X509 CRL` blocks, or else the bytes as one DER CRL (as distribution points serve
/// them).
pub fn crls_from_bytes(
    bytes: Vec<u8>,
) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let pem: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if !pem.is_empty() {
        return Ok(pem);
    }
    Ok(vec![CertificateRevocationListDer::from(bytes)])
}

fn strip_sign_byte(serial: &[u8]) -> &[u8] {
    match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    }
}
