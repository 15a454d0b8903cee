//! Certificate files as the configuration names them: PEM bundles read whole, and the
//! error of a TLS setup problem, named by the key it comes from. Shared by the listener's
//! TLS, the revocation checks, the NTAuth store and the session tickets.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// A TLS setup problem, named by the configuration key it comes from.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    pub key: &'static str,
    pub message: String,
}

pub fn tls_error(key: &'static str, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        key,
        message: message.to_string(),
    }
}

/// Reads every certificate of a PEM file; an empty file is an error.
pub fn read_certs(
    path: &Path,
    key: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error(key, format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(tls_error(
            key,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}
