//! Trust toward devices: the listener's TLS configuration, the client-certificate policy
//! (here), the session tickets and cache that bound resumption (`tickets`), and the NTAuth
//! store that says which CAs may issue logon certificates (`ntauth`).
//!
//! A client certificate is mandatory and must chain to the configured enterprise CA bundle
//! (never the system roots). rustls-webpki accepts a leaf with no extended key usage at all,
//! so `ClientCertPolicy` also requires the leaf to name clientAuth explicitly.
//!
//! The CRLs the verifier checks can be replaced without building a new TLS configuration
//! (`ClientCertPolicy::set_crls`, for CRLs fetched from distribution points): the trust
//! anchors and every other setting stay, so the session cache and the session tickets, which
//! are bound to the trust policy (`tickets`), stay valid across a CRL refresh.

pub mod ntauth;
pub mod tickets;

use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::certs::{read_certs, tls_error, TlsError};
use crate::config::TlsConfig;
use crate::revocation::{DeltaVerdict, RevocationList};

/// The crypto provider every TLS configuration of seg uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the listener's rustls configuration from the `[tls]` section. Sessions resume by
/// ticket, under keys bound to the trust policy: a rebuilt configuration that trusts the same
/// way resumes the old sessions, one that trusts differently never does.
pub fn server_config(
    config: &TlsConfig,
    verifier: Arc<ClientCertPolicy>,
    clock: &crate::clock::Clock,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs = read_certs(&config.certificate, "tls.certificate")?;
    let key = PrivateKeyDer::from_pem_file(&config.private_key).map_err(|e| {
        tls_error(
            "tls.private_key",
            format!("{}: {e}", config.private_key.display()),
        )
    })?;
    let certified = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        tls_error(
            "tls.private_key",
            format!("does not match tls.certificate or is unsupported: {e}"),
        )
    })?;
    // The clock decides certificate validity at the handshake and a session's age, the same
    // clock the per-request validity check reads.
    let mut server =
        rustls::ServerConfig::builder_with_details(provider(), Arc::new(clock.clone()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| tls_error("tls", e))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(NotingSni(Arc::new(certified))));
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Stateless tickets always: a fleet of thousands of devices resumes whatever the number
    // of sessions (rustls's default stateful cache holds 256).
    server.ticketer = Arc::new(match &config.session_ticket_key_file {
        Some(keys) => crate::tls::tickets::SharedTicketer::from_config(keys, config, clock)?,
        None => crate::tls::tickets::SharedTicketer::process_local(config, clock)?,
    });
    // TLS 1.2 clients without ticket support resume by session ID, within the same bound.
    server.session_storage = Arc::new(crate::tls::tickets::BoundedSessionCache::new(config, clock));
    Ok(Arc::new(server))
}

/// The verifier seg applies to an https:// upstream: webpki with exactly the given roots
/// (never the system's).
pub fn upstream_verifier(
    roots: rustls::RootCertStore,
) -> Result<Arc<rustls::client::WebPkiServerVerifier>, TlsError> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| tls_error("upstream.ca_file", e))
}

/// Client-certificate verification: webpki chain validation to the enterprise CAs, plus an
/// explicit clientAuth EKU in the leaf.
#[derive(Debug)]
pub struct ClientCertPolicy {
    roots: Arc<rustls::RootCertStore>,
    check_chain: bool,
    allow_unknown_status: bool,
    /// The CA names offered to devices; they depend on the roots only.
    hints: Vec<DistinguishedName>,
    /// The verifiers of the CRLs in force; replaced whole when they change.
    inner: RwLock<Arc<Verifiers>>,
}

/// webpki's verifier with the base CRLs, and the delta CRLs it cannot read.
#[derive(Debug)]
struct Verifiers {
    webpki: Arc<dyn ClientCertVerifier>,
    /// The CRLs in force when some delta applies (`RevocationList::delta_verdict`).
    deltas: Option<RevocationList>,
}

impl ClientCertPolicy {
    /// Trusts exactly the certificates in `tls.client_ca` (roots and issuing intermediates),
    /// checking revocation against the CRLs when there are any, `nextUpdate` enforced.
    pub fn new(
        config: &TlsConfig,
        revocation: &RevocationList,
    ) -> Result<ClientCertPolicy, TlsError> {
        ClientCertPolicy::build(config, revocation, false)
    }

    /// As `new`; with `crls_fetched`, CRLs also come over HTTP, so an issuer whose CRL has
    /// not been fetched yet passes the handshake: the request check waits for its CRL (and
    /// refuses the device when it cannot be had), see `crl_fetch`.
    pub fn build(
        config: &TlsConfig,
        revocation: &RevocationList,
        crls_fetched: bool,
    ) -> Result<ClientCertPolicy, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(&config.client_ca, "tls.client_ca")? {
            refuse_unenforceable_name_constraints(&cert)?;
            roots
                .add(cert)
                .map_err(|e| tls_error("tls.client_ca", format!("unusable CA certificate: {e}")))?;
        }
        let roots = Arc::new(roots);
        let check_chain = config.crl_check_chain;
        let allow_unknown_status = config.danger_allow_unknown_revocation_status || crls_fetched;
        let inner = verifiers(&roots, check_chain, allow_unknown_status, revocation)?;
        Ok(ClientCertPolicy {
            hints: inner.webpki.root_hint_subjects().to_vec(),
            roots,
            check_chain,
            allow_unknown_status,
            inner: RwLock::new(inner),
        })
    }

    /// Checks revocation against these CRLs from now on; trust anchors and settings stay.
    pub fn set_crls(&self, revocation: &RevocationList) -> Result<(), TlsError> {
        let inner = verifiers(
            &self.roots,
            self.check_chain,
            self.allow_unknown_status,
            revocation,
        )?;
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = inner;
        Ok(())
    }

    /// The same verdict the listener reaches, outside a handshake (`seg map`): the reason
    /// code and the error as the verifier found it.
    pub fn verify_chain(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), (&'static str, rustls::Error)> {
        self.check(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| (refusal_code(&e), e))
    }

    /// The chain to a trust anchor, revocation, and the clientAuth purpose.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let inner = self.inner();
        let verified = inner
            .webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        // The leaf is read once, for the delta CRLs and the purpose alike.
        let leaf = X509Certificate::from_der(end_entity.as_ref())
            .ok()
            .map(|(_, leaf)| leaf);
        if let Some(deltas) = &inner.deltas {
            let now = now.as_secs() as i64;
            let listed = |cert: &X509Certificate<'_>| match deltas.delta_verdict(
                cert.issuer().as_raw(),
                cert.raw_serial(),
                now,
            ) {
                DeltaVerdict::NotListed => None,
                DeltaVerdict::Revoked => Some(CertificateError::Revoked),
                DeltaVerdict::Stale => Some(CertificateError::ExpiredRevocationList),
            };
            let chain = intermediates
                .iter()
                .filter(|_| self.check_chain)
                .filter_map(|der| X509Certificate::from_der(der.as_ref()).ok());
            let error = leaf
                .as_ref()
                .and_then(listed)
                .or_else(|| chain.into_iter().find_map(|(_, cert)| listed(&cert)));
            if let Some(error) = error {
                return Err(rustls::Error::InvalidCertificate(error));
            }
        }
        // rustls-webpki accepts a leaf without any EKU: clientAuth must be named.
        let client_auth = leaf.is_some_and(
            |leaf| matches!(leaf.extended_key_usage(), Ok(Some(eku)) if eku.value.client_auth),
        );
        if client_auth {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose,
            ))
        }
    }

    fn inner(&self) -> Arc<Verifiers> {
        Arc::clone(&self.inner.read().unwrap_or_else(|e| e.into_inner()))
    }
}

fn verifiers(
    roots: &Arc<rustls::RootCertStore>,
    check_chain: bool,
    allow_unknown_status: bool,
    revocation: &RevocationList,
) -> Result<Arc<Verifiers>, TlsError> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), provider());
    let bases: Vec<_> = revocation.der().collect();
    if !bases.is_empty() {
        builder = builder.with_crls(bases).enforce_revocation_expiration();
        if !check_chain {
            builder = builder.only_check_end_entity_revocation();
        }
        if allow_unknown_status {
            builder = builder.allow_unknown_revocation_status();
        }
    }
    let webpki = builder.build().map_err(|e| tls_error("tls.crl_files", e))?;
    Ok(Arc::new(Verifiers {
        webpki,
        deltas: revocation.has_deltas().then(|| revocation.clone()),
    }))
}

/// rustls-webpki evaluates only DNS and IP name constraints and refuses every certificate
/// under a CA constrained by any other kind. Such a CA is reported at start-up, with the
/// constraint's type and the CA's name, rather than failing every device later.
fn refuse_unenforceable_name_constraints(ca: &CertificateDer<'_>) -> Result<(), TlsError> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(ca.as_ref()) else {
        return Ok(());
    };
    let Ok(Some(constraints)) = cert.name_constraints() else {
        return Ok(());
    };
    let subtrees = constraints
        .value
        .permitted_subtrees
        .iter()
        .chain(constraints.value.excluded_subtrees.iter())
        .flatten();
    for subtree in subtrees {
        let kind = match subtree.base {
            GeneralName::DNSName(_) | GeneralName::IPAddress(_) => continue,
            GeneralName::DirectoryName(_) => "directoryName",
            GeneralName::RFC822Name(_) => "rfc822Name (email)",
            GeneralName::URI(_) => "URI",
            GeneralName::OtherName(..) => "otherName",
            _ => "an unsupported",
        };
        return Err(tls_error(
            "tls.client_ca",
            format!(
                "CA \"{}\" carries {kind} name constraints, which the certificate verifier cannot evaluate: every device certificate it issues would be refused",
                cert.subject()
            ),
        ));
    }
    Ok(())
}

impl crate::revocation::CrlSink for ClientCertPolicy {
    fn set_crls(&self, list: &RevocationList) -> Result<(), TlsError> {
        ClientCertPolicy::set_crls(self, list)
    }
}

impl ClientCertVerifier for ClientCertPolicy {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates, now)
            .map_err(|e| refused(end_entity, refusal_code(&e), e))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()
            .webpki
            .verify_tls12_signature(message, cert, dss)
            .map_err(|e| refused(cert, signature_refusal_code(cert, &e), e))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // A key the verifier refuses to use (RSA-1024, say) fails here, after the chain.
        self.inner()
            .webpki
            .verify_tls13_signature(message, cert, dss)
            .map_err(|e| refused(cert, signature_refusal_code(cert, &e), e))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().webpki.supported_verify_schemes()
    }
}

/// Serves the one server certificate, noting the name the device asked for (SNI), so the
/// record of a refused handshake can give it.
#[derive(Debug)]
struct NotingSni(Arc<CertifiedKey>);

impl ResolvesServerCert for NotingSni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        NOTES.with(|n| n.borrow_mut().sni = hello.server_name().map(str::to_owned));
        Some(Arc::clone(&self.0))
    }
}

/// A certificate the listener refused at the handshake, as the log record explaining the
/// refusal names it.
#[derive(Debug, Clone, Default)]
pub struct RefusedCertificate {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    /// notAfter in Unix seconds (0 when the certificate could not be read).
    pub not_after_unix: i64,
    /// SHA-256 of the leaf: the rate limit of the refusal's log records is per certificate.
    pub fingerprint: Option<crate::identity::CertFingerprint>,
}

/// A device's handshake that failed: why, in seg's reason code, and what the handshake had
/// revealed by then. Carried inside the `io::Error` the handshake returns.
#[derive(Debug)]
pub struct RefusedHandshake {
    /// The reason code, as `seg map --explain` gives it for the same certificate.
    pub reason: &'static str,
    /// The verifier's own error (not the one chosen for its alert).
    pub detail: String,
    /// The name the device asked for, if it sent one.
    pub sni: Option<String>,
    pub certificate: Option<RefusedCertificate>,
}

impl std::fmt::Display for RefusedHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for RefusedHandshake {}

impl RefusedHandshake {
    /// The refusal inside an error of the device handshake, if it is one.
    pub fn of(error: &std::io::Error) -> Option<&RefusedHandshake> {
        error.get_ref().and_then(|e| e.downcast_ref())
    }

    /// The reason code of a failed device handshake: the refusal's, or `io-error`.
    pub fn reason_of(error: &std::io::Error) -> &'static str {
        RefusedHandshake::of(error).map_or("io-error", |r| r.reason)
    }
}

/// What the handshake step running on this thread revealed (rustls calls the certificate
/// resolver and the verifier synchronously within the step).
#[derive(Default)]
struct Notes {
    sni: Option<String>,
    /// The refused certificate, its reason code and the verifier's own error.
    refused: Option<(RefusedCertificate, &'static str, String)>,
}

thread_local! {
    static NOTES: std::cell::RefCell<Notes> = std::cell::RefCell::new(Notes::default());
}

/// Forgets what an earlier handshake step noted on this thread: called before each step,
/// so what `take_sni` and `explain_handshake_failure` find is that step's own.
pub fn clear_handshake_notes() {
    NOTES.with(|n| *n.borrow_mut() = Notes::default());
}

/// The name the device asked for, if the step that just ran on this thread read it.
pub fn take_sni() -> Option<String> {
    NOTES.with(|n| n.borrow_mut().sni.take())
}

/// The `io::Error` of a failed handshake step, with the refusal it carries: the reason code,
/// the refused certificate (noted by the verifier in the step that just failed on this
/// thread) and `sni`.
pub fn explain_handshake_failure(error: std::io::Error, sni: Option<String>) -> std::io::Error {
    let Some(rustls_error) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return error;
    };
    let noted = NOTES.with(|n| n.borrow_mut().refused.take());
    let refusal = match noted {
        Some((certificate, reason, detail)) => RefusedHandshake {
            reason,
            detail,
            sni,
            certificate: Some(certificate),
        },
        None => RefusedHandshake {
            reason: refusal_code(rustls_error),
            detail: rustls_error.to_string(),
            sni,
            certificate: None,
        },
    };
    std::io::Error::new(error.kind(), refusal)
}

/// Notes the refused certificate for the handshake's log record and returns the error whose
/// alert tells the device the real cause.
fn refused(
    end_entity: &CertificateDer<'_>,
    reason: &'static str,
    error: rustls::Error,
) -> rustls::Error {
    let certificate = match x509_parser::certificate::X509Certificate::from_der(end_entity.as_ref())
    {
        Ok((_, cert)) => RefusedCertificate {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: crate::identity::hex(cert.raw_serial()),
            not_before: cert.validity().not_before.to_string(),
            not_after: cert.validity().not_after.to_string(),
            not_after_unix: cert.validity().not_after.timestamp(),
            fingerprint: Some(crate::identity::CertFingerprint::of(end_entity.as_ref())),
        },
        Err(_) => RefusedCertificate {
            subject: "(not a readable certificate)".into(),
            fingerprint: Some(crate::identity::CertFingerprint::of(end_entity.as_ref())),
            ..RefusedCertificate::default()
        },
    };
    let detail = error.to_string();
    NOTES.with(|n| n.borrow_mut().refused = Some((certificate, reason, detail)));
    with_alert(reason, error)
}

/// The error rustls is given for a refusal with `reason`. rustls chooses the TLS alert from
/// the error's variant (RFC 8446 §6.2): the variant is picked for the alert that names the
/// cause, while the reason code and the verifier's own error travel in the log record.
fn with_alert(reason: &'static str, error: rustls::Error) -> rustls::Error {
    use CertificateError as E;
    let carrier = match reason {
        // certificate_expired: only for a certificate past its notAfter.
        "certificate-expired" => E::Expired,
        // certificate_revoked
        "certificate-revoked" => E::Revoked,
        // unknown_ca: no trusted CA issued it; one that names a trusted CA as its issuer
        // but is not signed by its key (a sibling CA of the same name) included.
        "unknown-issuer" | "certificate-bad-signature" => E::UnknownIssuer,
        // unsupported_certificate: a certificate not for this use, or made with an algorithm
        // or key size seg does not accept.
        "certificate-wrong-purpose"
        | "certificate-unsupported-algorithm"
        | "certificate-key-too-small" => E::InvalidPurpose,
        // certificate_unknown: the certificate may be fine, its revocation status is not
        // known (a stale CRL, no CRL of its issuer).
        "revocation-list-expired" | "revocation-status-unknown" => {
            E::Other(OtherError(Arc::new(error)))
        }
        // decrypt_error: the device failed to prove it holds the certificate's key.
        "handshake-signature-invalid" => return error,
        // bad_certificate: not yet valid, badly signed, malformed, or otherwise unusable.
        _ => E::BadEncoding,
    };
    rustls::Error::InvalidCertificate(carrier)
}

/// The reason code of a failed handshake signature check: the key refused for its size or
/// algorithm, or a signature that does not verify (the device does not hold the key).
fn signature_refusal_code(cert: &CertificateDer<'_>, error: &rustls::Error) -> &'static str {
    use x509_parser::public_key::PublicKey;
    let rsa_bits = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
        .ok()
        .and_then(|(_, cert)| match cert.public_key().parsed() {
            Ok(PublicKey::RSA(rsa)) => Some(rsa.key_size()),
            _ => None,
        });
    if rsa_bits.is_some_and(|bits| bits < 2048) {
        return "certificate-key-too-small";
    }
    match error {
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            "handshake-signature-invalid"
        }
        other => refusal_code(other),
    }
}

/// The reason code of a refused handshake, as the log record and `seg map --explain` give it.
pub fn refusal_code(error: &rustls::Error) -> &'static str {
    use CertificateError as E;
    match error {
        rustls::Error::NoCertificatesPresented => "no-client-certificate",
        rustls::Error::InvalidCertificate(e) => match e {
            E::Expired | E::ExpiredContext { .. } => "certificate-expired",
            E::NotValidYet | E::NotValidYetContext { .. } => "certificate-not-yet-valid",
            E::InvalidPurpose | E::InvalidPurposeContext { .. } => "certificate-wrong-purpose",
            E::UnknownIssuer => "unknown-issuer",
            E::Revoked => "certificate-revoked",
            E::ExpiredRevocationList | E::ExpiredRevocationListContext { .. } => {
                "revocation-list-expired"
            }
            E::UnknownRevocationStatus => "revocation-status-unknown",
            E::BadSignature => "certificate-bad-signature",
            #[allow(deprecated)]
            E::UnsupportedSignatureAlgorithm
            | E::UnsupportedSignatureAlgorithmContext { .. }
            | E::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                "certificate-unsupported-algorithm"
            }
            E::BadEncoding | E::UnhandledCriticalExtension => "certificate-malformed",
            E::Other(other) => other
                .0
                .downcast_ref::<webpki::Error>()
                .map_or("certificate-invalid", webpki_refusal_code),
            _ => "certificate-invalid",
        },
        rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => {
            "tls-incompatible"
        }
        _ => "tls-protocol-error",
    }
}

/// The reason code of what the certificate verifier reports without a rustls name for it.
fn webpki_refusal_code(error: &webpki::Error) -> &'static str {
    use webpki::Error as W;
    match error {
        W::UnsupportedCriticalExtension
        | W::MalformedExtensions
        | W::ExtensionValueInvalid
        | W::UnsupportedCertVersion
        | W::InvalidSerialNumber
        | W::TrailingData(_) => "certificate-malformed",
        W::CaUsedAsEndEntity => "certificate-is-a-ca",
        W::EndEntityUsedAsCa | W::PathLenConstraintViolated => "chain-invalid",
        W::NameConstraintViolation | W::MalformedNameConstraint => {
            "certificate-outside-name-constraints"
        }
        _ => "certificate-invalid",
    }
}

/// Label for `seg_tls_handshakes_total{result}` from a handshake's reason code: the metric's
/// labels are coarser than the log's reason codes, one rule, two spellings.
pub fn failure_label(reason: &str) -> &'static str {
    match reason {
        "io-error" => "io_error",
        "no-client-certificate" => "no_client_certificate",
        "certificate-expired" => "certificate_expired",
        "certificate-wrong-purpose" => "certificate_wrong_purpose",
        "unknown-issuer" => "unknown_issuer",
        "certificate-revoked" => "certificate_revoked",
        "revocation-list-expired" => "revocation_list_expired",
        "revocation-status-unknown" => "revocation_status_unknown",
        "tls-incompatible" | "tls-protocol-error" => "protocol_error",
        _ => "certificate_invalid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unenforceable_name_constraints_are_reported() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Constrained CA");
        params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![rcgen::GeneralSubtree::Rfc822Name("corp.test".into())],
            excluded_subtrees: vec![],
        });
        let ca = params.clone().self_signed(&key).unwrap();
        let error = refuse_unenforceable_name_constraints(&CertificateDer::from(ca.der().to_vec()))
            .unwrap_err();
        assert!(error.message.contains("rfc822Name"), "{}", error.message);
        assert!(
            error.message.contains("Constrained CA"),
            "{}",
            error.message
        );

        params.name_constraints = Some(rcgen::NameConstraints {
            permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("corp.test".into())],
            excluded_subtrees: vec![],
        });
        let ca = params.self_signed(&key).unwrap();
        assert!(
            refuse_unenforceable_name_constraints(&CertificateDer::from(ca.der().to_vec())).is_ok()
        );
    }
}
