//! The NTAuth store: which CAs may issue logon certificates, as a domain controller decides.
//!
//! A DC accepts a logon certificate only if the CA that issued it (the leaf's own issuer, no
//! chaining) is in the forest's NTAuth store, `CN=NTAuthCertificates,CN=Public Key
//! Services,CN=Services,CN=Configuration,<forest>`, attribute `cACertificate`. A chain to a
//! trusted root is not enough: the root also signs web-server and other CAs, and a
//! certificate from any of them could carry a user's UPN and SID. seg keeps the same rule:
//! the leaf's signature must verify under the key of a CA in the store, read from a PEM file
//! (`ntauth.file`) and/or from the directory (`ntauth.directory`), refreshed on a schedule
//! and kept through directory outages like the identity cache.
//!
//! The verdict is made once per certificate and remembered (a signature verification costs
//! tens of microseconds; a held lookup, nanoseconds), until the store changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use x509_parser::prelude::{FromDer, X509Certificate};

use crate::certs::TlsError;
use crate::config::NtAuthConfig;
use crate::identity::CertFingerprint;

/// One CA the store trusts to issue logon certificates.
#[derive(Debug, Clone)]
pub struct IssuingCa {
    /// The certificate (DER), whose key verifies the leaves it issued.
    der: Vec<u8>,
    subject_der: Vec<u8>,
    /// Its subject, for logs and `seg map --explain`.
    pub name: String,
}

/// What the store says of one leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NtAuthVerdict {
    /// Issued by this CA of the store.
    Issued(String),
    /// No CA of the store issued it: a DC refuses it (KDC event 21).
    NotIssued,
    /// The store comes from the directory and the directory has not answered yet.
    Unknown,
}

/// The CAs in force: the file's, plus the directory's last good answer.
#[derive(Debug)]
pub struct NtAuthStore {
    file: Vec<IssuingCa>,
    /// `None` until the directory first answers (with `ntauth.directory`).
    directory: RwLock<Option<Vec<IssuingCa>>>,
    reads_directory: bool,
    /// Bumped on every change of the CAs in force: remembered verdicts of another
    /// generation are judged again.
    generation: AtomicU64,
    verdicts: Mutex<HashMap<CertFingerprint, (u64, NtAuthVerdict)>>,
}

/// Verdicts remembered at most; past it the memory starts over (each costs one verification).
const MAX_VERDICTS: usize = 100_000;

impl NtAuthStore {
    /// The store of `config`; `None` when NTAuth is not checked (`ntauth.danger_any_client_ca`).
    /// Refuses a configuration that would let a sibling CA issue logons: a client CA bundle
    /// holding a CA that may sign other CAs, with no NTAuth source and no opt-out.
    pub fn build(
        config: &NtAuthConfig,
        client_ca: &std::path::Path,
    ) -> Result<Option<Arc<NtAuthStore>>, TlsError> {
        let error = |key: &'static str, message: String| TlsError { key, message };
        if config.danger_any_client_ca {
            tracing::warn!(target: "seg::config", "ntauth.danger_any_client_ca is set: any CA that chains to tls.client_ca may issue logon certificates, as no domain controller allows");
            return Ok(None);
        }
        let file = match &config.file {
            Some(path) => crate::certs::read_certs(path, "ntauth.file")?
                .iter()
                .map(|der| issuing_ca(der).map_err(|e| error("ntauth.file", e)))
                .collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        if config.file.is_none() && !config.directory {
            let signers = crate::certs::read_certs(client_ca, "tls.client_ca")?
                .iter()
                .filter_map(|der| may_sign_cas(der))
                .collect::<Vec<_>>();
            if !signers.is_empty() {
                return Err(error(
                    "tls.client_ca",
                    format!(
                        "holds {} that may sign other CAs, so a certificate of a sibling CA (a web-server CA, say) would be taken for a logon certificate; name the CAs that issue logon certificates as a domain controller does: read the forest's NTAuth store (ntauth.directory = true) or list them (ntauth.file), or accept any CA under the bundle with ntauth.danger_any_client_ca = true",
                        signers.join(", ")
                    ),
                ));
            }
            // The bundle's CAs issue leaves only: each is its own NTAuth store.
            return Ok(None);
        }
        Ok(Some(Arc::new(NtAuthStore {
            file,
            directory: RwLock::new(None),
            reads_directory: config.directory,
            generation: AtomicU64::new(0),
            verdicts: Mutex::new(HashMap::new()),
        })))
    }

    /// Whether the store reads the directory (and so needs refreshing).
    pub fn reads_directory(&self) -> bool {
        self.reads_directory
    }

    /// Installs the CAs the directory's NTAuth object holds (each value of `cACertificate`);
    /// values that are not CA certificates are skipped with a warning (certutil writes
    /// placeholders). Returns how many CAs are in force from the directory.
    pub fn install_directory(&self, values: &[Vec<u8>]) -> usize {
        let mut cas = Vec::new();
        for der in values {
            match issuing_ca(der) {
                Ok(ca) => cas.push(ca),
                Err(e) => {
                    tracing::warn!(target: "seg::tls::ntauth", error = %e, "a cACertificate value of the NTAuth object is skipped")
                }
            }
        }
        let count = cas.len();
        let mut current = self.directory.write().unwrap_or_else(|e| e.into_inner());
        let changed = current.as_ref().is_none_or(|old| {
            old.len() != cas.len() || old.iter().zip(&cas).any(|(a, b)| a.der != b.der)
        });
        *current = Some(cas);
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
            tracing::info!(target: "seg::tls::ntauth", cas = count, "NTAuth store read from the directory");
        }
        count
    }

    /// Reads the directory's NTAuth object (at `dn`, or under configurationNamingContext)
    /// and installs it; a failed read leaves the last store in force. Returns how many CAs
    /// the directory's store holds.
    pub async fn read_from(
        &self,
        directory: &crate::directory::Directory,
        dn: Option<&str>,
    ) -> Result<usize, crate::directory::DirectoryError> {
        let values = directory.read_ntauth(dn).await?;
        Ok(self.install_directory(&values))
    }

    /// Whether a CA of the store issued `leaf_der` (the leaf's signature verifies under its
    /// key and its subject is the leaf's issuer), remembered per certificate.
    pub fn check(&self, fingerprint: CertFingerprint, leaf_der: &[u8]) -> NtAuthVerdict {
        let generation = self.generation.load(Ordering::Acquire);
        let verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((g, verdict)) = verdicts.get(&fingerprint) {
            if *g == generation {
                return verdict.clone();
            }
        }
        drop(verdicts);
        let verdict = self.judge(leaf_der);
        if verdict != NtAuthVerdict::Unknown {
            let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
            if verdicts.len() >= MAX_VERDICTS {
                verdicts.clear();
            }
            verdicts.insert(fingerprint, (generation, verdict.clone()));
        }
        verdict
    }

    /// The verdict without memory (`seg map --explain`, and the first time).
    pub fn judge(&self, leaf_der: &[u8]) -> NtAuthVerdict {
        let directory = self.directory.read().unwrap_or_else(|e| e.into_inner());
        if self.reads_directory && directory.is_none() && self.file.is_empty() {
            return NtAuthVerdict::Unknown;
        }
        let Ok((_, leaf)) = X509Certificate::from_der(leaf_der) else {
            return NtAuthVerdict::NotIssued;
        };
        let issuer = leaf.issuer().as_raw();
        let cas = self.file.iter().chain(directory.iter().flatten());
        for ca in cas.filter(|ca| ca.subject_der == issuer) {
            let Ok((_, ca_cert)) = X509Certificate::from_der(&ca.der) else {
                continue;
            };
            if leaf.verify_signature(Some(ca_cert.public_key())).is_ok() {
                return NtAuthVerdict::Issued(ca.name.clone());
            }
        }
        if self.reads_directory && directory.is_none() {
            // The file's CAs did not issue it; the directory's might, once it answers.
            return NtAuthVerdict::Unknown;
        }
        NtAuthVerdict::NotIssued
    }

    /// The CAs in force, for `seg map --explain`.
    pub fn names(&self) -> Vec<String> {
        let directory = self.directory.read().unwrap_or_else(|e| e.into_inner());
        self.file
            .iter()
            .chain(directory.iter().flatten())
            .map(|ca| ca.name.clone())
            .collect()
    }
}

/// A certificate of the store: a CA certificate (basicConstraints cA).
fn issuing_ca(der: &[u8]) -> Result<IssuingCa, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not a certificate: {e}"))?;
    if !cert.is_ca() {
        return Err(format!("{} is not a CA certificate", cert.subject()));
    }
    Ok(IssuingCa {
        der: der.to_vec(),
        subject_der: cert.subject().as_raw().to_vec(),
        name: cert.subject().to_string(),
    })
}

/// The subject of a CA certificate that may sign other CAs (no path length constraint, or
/// one above zero).
fn may_sign_cas(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let constraints = cert.basic_constraints().ok().flatten()?.value;
    let signs_cas = constraints.ca && constraints.path_len_constraint.is_none_or(|n| n > 0);
    signs_cas.then(|| cert.subject().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::pki::{CertAuthority, LeafSpec};

    fn store(file: &[&CertAuthority]) -> NtAuthStore {
        NtAuthStore {
            file: file
                .iter()
                .map(|ca| issuing_ca(&ca.der()).unwrap())
                .collect(),
            directory: RwLock::new(None),
            reads_directory: false,
            generation: AtomicU64::new(0),
            verdicts: Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn only_a_leaf_signed_by_a_ca_of_the_store_is_issued() {
        let issuing = CertAuthority::new("Corp", "Corp Issuing CA").unwrap();
        let web = CertAuthority::new("Corp", "Corp Web CA").unwrap();
        // Same name as the issuing CA, another key: the name alone never matches.
        let impostor = CertAuthority::new("Corp", "Corp Issuing CA").unwrap();
        let store = store(&[&issuing]);
        let ok = issuing.issue(&LeafSpec::device("alice")).unwrap().der;
        let sibling = web.issue(&LeafSpec::device("alice")).unwrap().der;
        let forged = impostor.issue(&LeafSpec::device("alice")).unwrap().der;
        assert_eq!(
            store.check(CertFingerprint::of(&ok), &ok),
            NtAuthVerdict::Issued("O=Corp, CN=Corp Issuing CA".into())
        );
        assert_eq!(
            store.check(CertFingerprint::of(&sibling), &sibling),
            NtAuthVerdict::NotIssued
        );
        assert_eq!(
            store.check(CertFingerprint::of(&forged), &forged),
            NtAuthVerdict::NotIssued
        );
        // A directory store that has not answered knows nothing yet; its answer decides.
        let directory = NtAuthStore {
            reads_directory: true,
            ..store_empty()
        };
        assert_eq!(
            directory.check(CertFingerprint::of(&ok), &ok),
            NtAuthVerdict::Unknown
        );
        assert_eq!(
            directory.install_directory(&[b"placeholder".to_vec(), web.der()]),
            1
        );
        assert_eq!(
            directory.check(CertFingerprint::of(&ok), &ok),
            NtAuthVerdict::NotIssued
        );
        directory.install_directory(&[issuing.der()]);
        assert!(
            matches!(
                directory.check(CertFingerprint::of(&ok), &ok),
                NtAuthVerdict::Issued(_)
            ),
            "a changed store judges again"
        );
    }

    fn store_empty() -> NtAuthStore {
        store(&[])
    }
}
