//! Revocation: the CRLs in force (here: read once, looked up in constant time), the online
//! checks run on each request (`online`: OCSP in `ocsp`, distribution-point CRLs in
//! `crl_fetch`) and the plumbing they share (`fetch`).
//!
//! The CRLs serve twice. The TLS verifier gets them (with `nextUpdate` enforced, which
//! rustls skips unless told) so a revoked certificate fails its handshake; and every request
//! is checked against the current list by issuer and serial, because a resumed TLS session
//! restores the old certificate without checking it again and an ActiveSync connection lives
//! for hours: after a reload brings a new CRL, a revoked device's next request is refused.
//!
//! Each CRL is parsed once into a set of serials (`ParsedCrl`); a `RevocationList` only
//! indexes parsed CRLs by issuer, so composing the CRL files with the CRLs fetched from
//! distribution points (`crl_fetch`) after either changes costs no parsing, and two CRLs of
//! one issuer (a file and a fetched one) are both consulted.
//!
//! Delta CRLs (RFC 5280 §5.2.4, what AD CS publishes between base CRLs) are honoured as AD
//! does: a delta applies while a base CRL of its issuer is in force whose CRL number is at
//! least the delta's BaseCRLNumber and below the delta's own number (a newer base supersedes
//! it). The certificate is revoked if the base or an applying delta lists it; an entry with
//! reason removeFromCRL revokes nothing (a hold released), and a certificate the base lists
//! stays refused until the next base. rustls's verifier knows no delta CRLs, so it gets the
//! bases and `ClientCertPolicy` consults the deltas after it (`delta_verdict`); a delta past
//! its nextUpdate refuses its issuer's devices as a stale base does.

pub mod crl_fetch;
pub mod fetch;
pub mod ocsp;
pub mod online;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateRevocationListDer;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::certs::TlsError;

/// The CRLs in force: each parsed once, looked up by issuer.
#[derive(Default, Clone)]
pub struct RevocationList {
    parsed: Vec<Arc<ParsedCrl>>,
    /// Issuer DN (DER) → indexes into `parsed` of its CRLs in force (a file and a fetched
    /// one, say, and the deltas that apply).
    by_issuer: HashMap<Vec<u8>, Vec<usize>>,
    /// How many deltas apply.
    deltas: usize,
}

impl fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.crls()).finish()
    }
}

/// One CRL, parsed once: its revoked serials as a set, its DER for the TLS verifier.
pub struct ParsedCrl {
    pub info: CrlInfo,
    issuer_der: Vec<u8>,
    /// Serials (without sign byte) of the revoked certificates.
    serials: HashSet<Box<[u8]>>,
    /// The cRLNumber extension, big-endian without leading zeros.
    number: Option<Vec<u8>>,
    /// For a delta CRL, its BaseCRLNumber (big-endian without leading zeros).
    base_number: Option<Vec<u8>>,
    /// The Freshest CRL extension's URIs: where the deltas of this base are published.
    pub freshest: Vec<String>,
    pub der: CertificateRevocationListDer<'static>,
}

/// What the delta CRLs in force say of one certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaVerdict {
    /// No applying delta lists it (or there is none).
    NotListed,
    Revoked,
    /// An applying delta of its issuer is past its nextUpdate.
    Stale,
}

/// id-ce-deltaCRLIndicator (RFC 5280 §5.2.4).
const OID_DELTA_CRL_INDICATOR: &[u64] = &[2, 5, 29, 27];
/// id-ce-freshestCRL (RFC 5280 §5.2.6).
const OID_FRESHEST_CRL: &[u64] = &[2, 5, 29, 46];

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
    /// A delta CRL (it carries a BaseCRLNumber).
    pub delta: bool,
}

impl ParsedCrl {
    /// Parses one DER CRL into its lookup set. The signature is not checked here: files are
    /// the operator's, fetched CRLs are verified by `crl_fetch` before they get this far.
    pub fn parse(
        source: CrlSource,
        der: CertificateRevocationListDer<'static>,
    ) -> Result<ParsedCrl, String> {
        use x509_parser::x509::ReasonCode;
        let (_, crl) =
            CertificateRevocationList::from_der(der.as_ref()).map_err(|e| e.to_string())?;
        let mut base_number = None;
        let mut freshest = Vec::new();
        for extension in crl.extensions() {
            if extension
                .oid
                .iter()
                .is_some_and(|o| o.eq(OID_DELTA_CRL_INDICATOR.iter().copied()))
            {
                base_number = Some(
                    der_unsigned(extension.value)
                        .ok_or("the delta CRL indicator is not an INTEGER")?,
                );
            } else if extension
                .oid
                .iter()
                .is_some_and(|o| o.eq(OID_FRESHEST_CRL.iter().copied()))
            {
                freshest = freshest_urls(extension.value);
            } else if extension.critical
                && !matches!(
                    extension.parsed_extension(),
                    ParsedExtension::CRLNumber(_) | ParsedExtension::IssuingDistributionPoint(_)
                )
            {
                return Err(format!("unknown critical extension {}", extension.oid));
            }
        }
        let delta = base_number.is_some();
        let serials: HashSet<Box<[u8]>> = crl
            .iter_revoked_certificates()
            // In a delta, removeFromCRL releases a hold: it revokes nothing.
            .filter(|revoked| {
                !(delta
                    && revoked
                        .reason_code()
                        .is_some_and(|(_, reason)| reason == ReasonCode::RemoveFromCRL))
            })
            .map(|revoked| strip_sign_byte(revoked.raw_serial()).into())
            .collect();
        if delta && crl.crl_number().is_none() {
            return Err("a delta CRL without a CRL number".into());
        }
        let info = CrlInfo {
            source,
            issuer: crl.issuer().to_string(),
            this_update_unix: crl.last_update().timestamp(),
            next_update_unix: crl.next_update().map(|t| t.timestamp()),
            entries: serials.len(),
            delta,
        };
        Ok(ParsedCrl {
            info,
            issuer_der: crl.issuer().as_raw().to_vec(),
            serials,
            number: crl.crl_number().map(|n| n.to_bytes_be()),
            base_number,
            freshest,
            der,
        })
    }

    /// Whether this delta applies to `base`: same issuer, the base at least as new as the
    /// delta's BaseCRLNumber and older than the delta itself.
    fn applies_to(&self, base: &ParsedCrl) -> bool {
        let (Some(base_needed), Some(delta_number), Some(base_number)) =
            (&self.base_number, &self.number, &base.number)
        else {
            return false;
        };
        base.base_number.is_none()
            && base.issuer_der == self.issuer_der
            && delta_applies(base_number, base_needed, delta_number)
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

    /// A list of CRLs parsed before (no parsing again: composing is cheap). A delta is
    /// indexed only while a base it applies to is in the list.
    pub fn from_parsed(parsed: Vec<Arc<ParsedCrl>>) -> RevocationList {
        let mut by_issuer: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
        let mut deltas = 0;
        for (i, crl) in parsed.iter().enumerate() {
            let applies =
                crl.base_number.is_none() || parsed.iter().any(|base| crl.applies_to(base));
            if applies {
                by_issuer.entry(crl.issuer_der.clone()).or_default().push(i);
                deltas += usize::from(crl.base_number.is_some());
            }
        }
        RevocationList {
            parsed,
            by_issuer,
            deltas,
        }
    }

    /// Whether a delta CRL applies to some certificate (the handshake then consults them).
    pub fn has_deltas(&self) -> bool {
        self.deltas > 0
    }

    /// What the applying delta CRLs say of the certificate with this issuer (DER) and serial
    /// (as encoded, sign byte included) at `now_unix`.
    pub fn delta_verdict(&self, issuer_der: &[u8], serial: &[u8], now_unix: i64) -> DeltaVerdict {
        let Some(crls) = self.by_issuer.get(issuer_der) else {
            return DeltaVerdict::NotListed;
        };
        let serial = strip_sign_byte(serial);
        let mut verdict = DeltaVerdict::NotListed;
        for crl in crls.iter().map(|&i| &self.parsed[i]) {
            if crl.base_number.is_none() {
                continue;
            }
            if crl.serials.contains(serial) {
                return DeltaVerdict::Revoked;
            }
            if crl.info.next_update_unix.is_some_and(|n| n <= now_unix) {
                verdict = DeltaVerdict::Stale;
            }
        }
        verdict
    }

    pub fn is_empty(&self) -> bool {
        self.parsed.is_empty()
    }

    /// Every CRL of the list, for readiness and metrics.
    pub fn crls(&self) -> impl Iterator<Item = &CrlInfo> {
        self.parsed.iter().map(|c| &c.info)
    }

    /// What the CRL gauges show of each CRL of the list.
    pub fn gauges(&self) -> impl Iterator<Item = crate::metrics::CrlGauge<'_>> {
        self.crls().map(|crl| crate::metrics::CrlGauge {
            issuer: &crl.issuer,
            source: crl.source.to_string(),
            this_update_unix: crl.this_update_unix,
            next_update_unix: crl.next_update_unix,
        })
    }

    /// The base CRLs as DER, for the TLS verifier (which knows no deltas).
    pub fn der(&self) -> impl Iterator<Item = CertificateRevocationListDer<'static>> + '_ {
        self.parsed
            .iter()
            .filter(|c| c.base_number.is_none())
            .map(|c| c.der.clone())
    }

    /// Whether some CRL of this issuer (DER) is in force.
    pub fn covers(&self, issuer_der: &[u8]) -> bool {
        self.by_issuer.contains_key(issuer_der)
    }

    /// Where the deltas of the base CRLs in force are published (their Freshest CRL).
    pub fn freshest_urls(&self) -> impl Iterator<Item = &str> {
        self.parsed
            .iter()
            .flat_map(|c| c.freshest.iter().map(String::as_str))
    }

    /// Whether the certificate with this issuer (DER) and serial is revoked.
    pub fn is_revoked(&self, issuer_der: &[u8], serial: &[u8]) -> bool {
        self.by_issuer.get(issuer_der).is_some_and(|crls| {
            crls.iter()
                .any(|&i| self.parsed[i].serials.contains(serial))
        })
    }

    /// The CRLs in force past their nextUpdate at `now_unix` (a delta that no longer
    /// applies is not in force).
    pub fn stale(&self, now_unix: i64) -> Vec<&CrlInfo> {
        self.by_issuer
            .values()
            .flatten()
            .map(|&i| &self.parsed[i].info)
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

/// What checks new handshakes against the CRLs in force (the client-certificate verifier,
/// `tls::ClientCertPolicy`): given every new list, or refusing it with the key at fault.
pub trait CrlSink: Send + Sync {
    fn set_crls(&self, list: &RevocationList) -> Result<(), TlsError>;
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
    verifier: Option<Arc<dyn CrlSink>>,
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
        verifier: Arc<dyn CrlSink>,
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

/// An unsigned DER INTEGER's value, big-endian without leading zeros.
fn der_unsigned(der: &[u8]) -> Option<Vec<u8>> {
    let (rest, value) = x509_parser::der_parser::der::parse_der_integer(der).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let bytes = value.as_slice().ok()?;
    if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        return None;
    }
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    Some(bytes[start..].to_vec())
}

/// Whether a delta with BaseCRLNumber `base_needed` and number `delta_number` applies to a
/// base numbered `base_number` (RFC 5280 §5.2.4): the base at least as new as the one the
/// delta was made against, and the delta newer than the base (else the base supersedes it).
/// Numbers are big-endian, unsigned.
fn delta_applies(base_number: &[u8], base_needed: &[u8], delta_number: &[u8]) -> bool {
    compare_unsigned(base_number, base_needed).is_ge()
        && compare_unsigned(delta_number, base_number).is_gt()
}

/// Orders two big-endian unsigned numbers.
fn compare_unsigned(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let trim = |x: &[u8]| -> Vec<u8> { x.iter().copied().skip_while(|&b| b == 0).collect() };
    let (a, b) = (trim(a), trim(b));
    a.len().cmp(&b.len()).then_with(|| a.cmp(&b))
}

/// The URIs of a Freshest CRL extension's value (the CRL distribution points syntax).
fn freshest_urls(value: &[u8]) -> Vec<String> {
    use x509_parser::extensions::{CRLDistributionPoints, DistributionPointName, GeneralName};
    let Ok((_, points)) = CRLDistributionPoints::from_der(value) else {
        return Vec::new();
    };
    points
        .iter()
        .filter_map(|p| match &p.distribution_point {
            Some(DistributionPointName::FullName(names)) => Some(names),
            _ => None,
        })
        .flatten()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

fn strip_sign_byte(serial: &[u8]) -> &[u8] {
    match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delta_applies_to_the_bases_from_its_own_up_to_before_itself() {
        // Delta 7 made against base 5.
        assert!(delta_applies(&[5], &[5], &[7]));
        assert!(
            delta_applies(&[6], &[5], &[7]),
            "a newer base, still older than the delta"
        );
        assert!(
            !delta_applies(&[4], &[5], &[7]),
            "the base is older than the delta needs"
        );
        assert!(
            !delta_applies(&[7], &[5], &[7]),
            "the base superseded the delta"
        );
        assert!(!delta_applies(&[8], &[5], &[7]));
        // Numbers of different lengths, leading zeros aside.
        assert!(delta_applies(&[0x01, 0x00], &[0xff], &[0x01, 0x01]));
        assert!(delta_applies(&[0, 5], &[5], &[0, 0, 7]));
    }

    #[test]
    fn the_delta_indicator_is_an_unsigned_integer() {
        assert_eq!(der_unsigned(&[0x02, 0x01, 0x05]), Some(vec![5]));
        assert_eq!(der_unsigned(&[0x02, 0x02, 0x00, 0x80]), Some(vec![0x80]));
        assert_eq!(der_unsigned(&[0x02, 0x01, 0x80]), None, "negative");
        assert_eq!(
            der_unsigned(&[0x02, 0x01, 0x05, 0x00]),
            None,
            "trailing data"
        );
        assert_eq!(der_unsigned(&[0x04, 0x01, 0x05]), None, "not an INTEGER");
    }
}
