//! What the online checks share: the plain-HTTP client (OCSP answers and CRLs are signed,
//! so RFC 5019 and RFC 5280 publish them over http://), the client CAs indexed by subject
//! (the issuers whose CRLs and OCSP answers seg accepts), and the URLs a certificate names.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{
    CRLDistributionPoints, DistributionPointName, GeneralName, ParsedExtension,
};
use x509_parser::prelude::FromDer;

use crate::certs::TlsError;

/// The client CAs (`tls.client_ca`) by subject: the issuers whose CRLs and OCSP answers
/// seg accepts.
#[derive(Default)]
pub struct Issuers {
    by_subject: HashMap<Vec<u8>, Vec<CertificateDer<'static>>>,
    /// Every CA certificate, in file order.
    pub certs: Vec<CertificateDer<'static>>,
    /// SHA-256 over the bundle, to notice a changed file on reload.
    pub digest: Vec<u8>,
}

impl Issuers {
    pub fn load(path: &std::path::Path) -> Result<Issuers, TlsError> {
        let certs = crate::certs::read_certs(path, "tls.client_ca")?;
        let mut by_subject: HashMap<Vec<u8>, Vec<CertificateDer<'static>>> = HashMap::new();
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for cert in &certs {
            digest.update(cert.as_ref());
            let (_, parsed) = X509Certificate::from_der(cert.as_ref()).map_err(|e| TlsError {
                key: "tls.client_ca",
                message: format!("{}: {e}", path.display()),
            })?;
            by_subject
                .entry(parsed.subject().as_raw().to_vec())
                .or_default()
                .push(cert.clone());
        }
        Ok(Issuers {
            by_subject,
            certs,
            digest: digest.finish().as_ref().to_vec(),
        })
    }

    /// The CA certificates named `subject` (DER): usually one, two during a key rollover.
    pub fn named(&self, subject: &[u8]) -> &[CertificateDer<'static>] {
        self.by_subject.get(subject).map_or(&[], Vec::as_slice)
    }
}

/// OCSP responder URLs (id-ad-ocsp in the authorityInfoAccess) of a certificate.
pub fn ocsp_urls(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut urls = Vec::new();
    for extension in cert.extensions() {
        if let ParsedExtension::AuthorityInfoAccess(aia) = extension.parsed_extension() {
            for access in &aia.accessdescs {
                if access.access_method
                    == x509_parser::oid_registry::OID_PKIX_ACCESS_DESCRIPTOR_OCSP
                {
                    if let GeneralName::URI(uri) = access.access_location {
                        urls.push(uri.to_string());
                    }
                }
            }
        }
    }
    urls
}

/// Every CRL distribution point of a certificate, as written (URI full names; a name
/// relative to the CRL issuer is returned as a description so it can be reported).
pub fn distribution_points(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut points = Vec::new();
    for extension in cert.extensions() {
        if let ParsedExtension::CRLDistributionPoints(cdp) = extension.parsed_extension() {
            points.extend(point_names(cdp));
        }
    }
    points
}

/// The points of a certificate's Freshest CRL extension (RFC 5280 §4.2.1.15): where the
/// delta CRLs of its issuer are published.
pub fn freshest_points(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut points = Vec::new();
    for extension in cert.extensions() {
        if extension
            .oid
            .iter()
            .is_some_and(|o| o.eq([2u64, 5, 29, 46]))
        {
            if let Ok((_, cdp)) = CRLDistributionPoints::from_der(extension.value) {
                points.extend(point_names(&cdp));
            }
        }
    }
    points
}

fn point_names(cdp: &CRLDistributionPoints<'_>) -> Vec<String> {
    let mut points = Vec::new();
    for point in cdp.iter() {
        match &point.distribution_point {
            Some(DistributionPointName::FullName(names)) => {
                for name in names {
                    match name {
                        GeneralName::URI(uri) => points.push(uri.to_string()),
                        other => points.push(format!("(non-URI name {other})")),
                    }
                }
            }
            Some(DistributionPointName::NameRelativeToCRLIssuer(_)) => {
                points.push("(name relative to the CRL issuer)".into())
            }
            None => {}
        }
    }
    points
}

/// Whether seg can fetch from this URL: plain http:// only.
pub fn fetchable(url: &str) -> Option<Uri> {
    url.parse::<Uri>()
        .ok()
        .filter(|u| u.scheme_str() == Some("http") && u.authority().is_some())
}

/// A plain-HTTP client for revocation data: bounded in time and size.
pub struct PlainHttp {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for PlainHttp {
    fn default() -> Self {
        PlainHttp::new()
    }
}

impl PlainHttp {
    pub fn new() -> PlainHttp {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .build(connector);
        PlainHttp { client }
    }

    /// GET `uri`; the body, at most `limit` bytes, within `timeout` in all.
    pub async fn get(&self, uri: &Uri, timeout: Duration, limit: usize) -> Result<Bytes, String> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(uri.clone())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        self.send(request, timeout, limit).await
    }

    /// POST `body` as `content_type` to `uri`; as `get` otherwise.
    pub async fn post(
        &self,
        uri: &Uri,
        content_type: &'static str,
        body: Vec<u8>,
        timeout: Duration,
        limit: usize,
    ) -> Result<Bytes, String> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri.clone())
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.send(request, timeout, limit).await
    }

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
        timeout: Duration,
        limit: usize,
    ) -> Result<Bytes, String> {
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                format!(
                    "{e}: {}",
                    std::error::Error::source(&e)
                        .map(|s| s.to_string())
                        .unwrap_or_default()
                )
            })?;
            if !response.status().is_success() {
                return Err(format!("HTTP {}", response.status()));
            }
            Limited::new(response.into_body(), limit)
                .collect()
                .await
                .map(|body| body.to_bytes())
                .map_err(|e| format!("body: {e}"))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    }
}
