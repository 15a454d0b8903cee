//! OCSP for device certificates (RFC 6960), which rustls does not do for client
//! certificates.
//!
//! seg builds the request itself (one CertID with SHA-1 hashes of the issuer's name and key,
//! the issuer being the `tls.client_ca` certificate that signed the leaf), POSTs it to the
//! responder the leaf's authorityInfoAccess names (or `revocation.ocsp_responder`), and
//! accepts a BasicOCSPResponse only when it is signed by that issuer or by a responder
//! certificate the issuer signed for id-kp-OCSPSigning, answers for exactly this CertID, and
//! is current (thisUpdate not ahead, nextUpdate not past, with a small clock-skew allowance).
//!
//! Answers are cached per certificate (issuer and serial) until their nextUpdate, never
//! longer than `revocation.ocsp_max_age`; concurrent requests of one device share one
//! question to the responder. Failures are not cached: the next request asks again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Uri;
use moka::future::Cache;
use moka::Expiry;
use x509_parser::asn1_rs::{Any, BitString, Class, FromDer, Tag};
use x509_parser::certificate::X509Certificate;
use x509_parser::time::ASN1Time;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo};

use crate::config::RevocationConfig;
use crate::metrics::Metrics;
use crate::revocation::fetch::{fetchable, ocsp_urls, Issuers, PlainHttp};

/// How far the responder's clock may be from ours.
const CLOCK_SKEW_SECS: i64 = 300;
/// How long an answer without nextUpdate is trusted (bounded by `ocsp_max_age` too).
const WITHOUT_NEXT_UPDATE: Duration = Duration::from_secs(300);
/// Largest OCSP response read.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;
/// Answers cached at once.
const MAX_CACHED: u64 = 200_000;

/// What an OCSP responder said about a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OcspStatus {
    Good,
    Revoked,
}

/// Why a certificate's OCSP status is not known.
#[derive(Debug, thiserror::Error)]
pub enum OcspError {
    #[error("no OCSP responder: the certificate names none (authorityInfoAccess) and revocation.ocsp_responder is unset")]
    NoResponder,
    #[error("OCSP responder {0:?} is not an http:// URL")]
    UnsupportedResponder(String),
    #[error("the certificate's issuer is not in tls.client_ca")]
    UnknownIssuer,
    #[error("certificate unreadable: {0}")]
    Certificate(String),
    #[error("OCSP responder {url} unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("OCSP responder {url} answered {status}")]
    Refused { url: String, status: &'static str },
    #[error("OCSP responder {url} does not know the certificate (status unknown)")]
    UnknownStatus { url: String },
    #[error("OCSP response from {url} refused: {message}")]
    Invalid { url: String, message: String },
}

impl OcspError {
    /// The `result` label of `seg_ocsp_responses_total`.
    fn label(&self) -> &'static str {
        match self {
            OcspError::NoResponder
            | OcspError::UnsupportedResponder(_)
            | OcspError::UnknownIssuer
            | OcspError::Certificate(_) => "not_checkable",
            OcspError::Unreachable { .. } => "unavailable",
            OcspError::Refused { .. } => "refused",
            OcspError::UnknownStatus { .. } => "unknown",
            OcspError::Invalid { .. } => "invalid",
        }
    }
}

/// A verified answer and how long it may be served.
#[derive(Debug)]
struct Answer {
    status: OcspStatus,
    lifetime: Duration,
}

/// Each cached answer lives as long as the answer itself allows.
struct AnswerLifetime;

impl Expiry<(Vec<u8>, Vec<u8>), Arc<Answer>> for AnswerLifetime {
    fn expire_after_create(
        &self,
        _key: &(Vec<u8>, Vec<u8>),
        answer: &Arc<Answer>,
        _created: std::time::Instant,
    ) -> Option<Duration> {
        Some(answer.lifetime)
    }
}

/// OCSP for the devices of one configuration.
pub struct OcspChecker {
    responder: Option<Uri>,
    timeout: Duration,
    max_age: Duration,
    issuers: Arc<Issuers>,
    http: Arc<PlainHttp>,
    /// (issuer DER, serial) → the last verified answer.
    cache: Cache<(Vec<u8>, Vec<u8>), Arc<Answer>>,
    metrics: Arc<Metrics>,
    settings: RevocationConfig,
}

impl OcspChecker {
    pub fn new(
        settings: &RevocationConfig,
        issuers: Arc<Issuers>,
        http: Arc<PlainHttp>,
        metrics: Arc<Metrics>,
    ) -> OcspChecker {
        OcspChecker {
            responder: settings.ocsp_responder.clone(),
            timeout: settings.ocsp_timeout,
            max_age: settings.ocsp_max_age,
            issuers,
            http,
            cache: Cache::builder()
                .max_capacity(MAX_CACHED)
                .expire_after(AnswerLifetime)
                .build(),
            metrics,
            settings: settings.clone(),
        }
    }

    /// Whether a reload may keep this checker (and its cache).
    pub fn same_settings(&self, settings: &RevocationConfig, issuers: &Issuers) -> bool {
        self.settings == *settings && self.issuers.digest == issuers.digest
    }

    /// The certificate's status: cached, or asked of the responder (one question at a time
    /// per certificate). `leaf` is read only when the responder must be asked.
    pub async fn check(
        &self,
        issuer: &[u8],
        serial: &[u8],
        leaf: &[u8],
    ) -> Result<OcspStatus, Arc<OcspError>> {
        let key = (issuer.to_vec(), serial.to_vec());
        self.cache
            .try_get_with(key, async { self.ask(leaf).await.map(Arc::new) })
            .await
            .map(|answer| answer.status)
    }

    async fn ask(&self, leaf: &[u8]) -> Result<Answer, OcspError> {
        let started = Instant::now();
        let result = self.ask_responder(leaf).await;
        let label = match &result {
            Ok(Answer {
                status: OcspStatus::Good,
                ..
            }) => "good",
            Ok(Answer {
                status: OcspStatus::Revoked,
                ..
            }) => "revoked",
            Err(e) => e.label(),
        };
        self.metrics
            .ocsp_responses
            .with_label_values(&[label])
            .inc();
        self.metrics
            .ocsp_duration
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn ask_responder(&self, leaf_der: &[u8]) -> Result<Answer, OcspError> {
        let (_, leaf) = X509Certificate::from_der(leaf_der)
            .map_err(|e| OcspError::Certificate(e.to_string()))?;
        let issuer_der = self
            .issuers
            .named(leaf.issuer().as_raw())
            .iter()
            .find(|ca| {
                X509Certificate::from_der(ca.as_ref())
                    .is_ok_and(|(_, ca)| leaf.verify_signature(Some(ca.public_key())).is_ok())
            })
            .ok_or(OcspError::UnknownIssuer)?;
        let (_, issuer) = X509Certificate::from_der(issuer_der.as_ref())
            .map_err(|e| OcspError::Certificate(e.to_string()))?;
        let url = match &self.responder {
            Some(uri) => uri.clone(),
            None => {
                let named = ocsp_urls(&leaf);
                let first = named.first().ok_or(OcspError::NoResponder)?;
                named
                    .iter()
                    .find_map(|u| fetchable(u))
                    .ok_or_else(|| OcspError::UnsupportedResponder(first.clone()))?
            }
        };
        let id = CertId::new(&leaf, &issuer);
        let body = self
            .http
            .post(
                &url,
                "application/ocsp-request",
                id.request_der(),
                self.timeout,
                MAX_RESPONSE_BYTES,
            )
            .await
            .map_err(|message| OcspError::Unreachable {
                url: url.to_string(),
                message,
            })?;
        let now = unix_now();
        let single = read_response(&body, &id, &issuer, now).map_err(|e| match e {
            ResponseError::Refused(status) => OcspError::Refused {
                url: url.to_string(),
                status,
            },
            ResponseError::Invalid(message) => OcspError::Invalid {
                url: url.to_string(),
                message,
            },
        })?;
        let status = match single.status {
            CertStatus::Good => OcspStatus::Good,
            CertStatus::Revoked => OcspStatus::Revoked,
            CertStatus::Unknown => {
                return Err(OcspError::UnknownStatus {
                    url: url.to_string(),
                })
            }
        };
        let lifetime = match single.next_update {
            Some(next) => Duration::from_secs(u64::try_from(next - now).unwrap_or(0)),
            None => WITHOUT_NEXT_UPDATE,
        }
        .min(self.max_age);
        Ok(Answer { status, lifetime })
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The CertID of RFC 6960 §4.1.1, with SHA-1 as every responder supports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertId {
    issuer_name_hash: Vec<u8>,
    issuer_key_hash: Vec<u8>,
    /// The serial's INTEGER content, sign byte stripped.
    serial: Vec<u8>,
}

/// id-sha1 (1.3.14.3.2.26), DER content.
const SHA1_OID: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];
/// id-pkix-ocsp-basic (1.3.6.1.5.5.7.48.1.1), DER content.
const OCSP_BASIC_OID: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];

impl CertId {
    pub fn new(leaf: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> CertId {
        let sha1 = |data: &[u8]| {
            ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data)
                .as_ref()
                .to_vec()
        };
        CertId {
            // The issuer's name as the leaf carries it, and the issuer's key bits.
            issuer_name_hash: sha1(leaf.issuer().as_raw()),
            issuer_key_hash: sha1(&issuer.public_key().subject_public_key.data),
            serial: strip_sign_byte(leaf.raw_serial()).to_vec(),
        }
    }

    /// `OCSPRequest { tbsRequest { requestList { Request { reqCert } } } }`, no extensions
    /// (no nonce: answers are cached, as RFC 5019's lightweight profile expects).
    pub fn request_der(&self) -> Vec<u8> {
        let algorithm = der(0x30, &[der(0x06, SHA1_OID), der(0x05, &[])].concat());
        let mut serial = self.serial.clone();
        if serial.first().is_none_or(|b| b & 0x80 != 0) {
            serial.insert(0, 0);
        }
        let cert_id = der(
            0x30,
            &[
                algorithm,
                der(0x04, &self.issuer_name_hash),
                der(0x04, &self.issuer_key_hash),
                der(0x02, &serial),
            ]
            .concat(),
        );
        let request = der(0x30, &cert_id);
        let request_list = der(0x30, &request);
        let tbs_request = der(0x30, &request_list);
        der(0x30, &tbs_request)
    }
}

/// One DER TLV.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

fn strip_sign_byte(serial: &[u8]) -> &[u8] {
    match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CertStatus {
    Good,
    Revoked,
    Unknown,
}

/// The SingleResponse for our CertID, verified.
#[derive(Debug)]
struct SingleResponse {
    status: CertStatus,
    next_update: Option<i64>,
}

#[derive(Debug)]
enum ResponseError {
    /// A responseStatus other than successful (tryLater, unauthorized…).
    Refused(&'static str),
    /// Garbage, a bad signature, another certificate, out of date.
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ResponseError {
    ResponseError::Invalid(message.into())
}

/// One DER element of `input`: the element, its whole encoding, and what follows.
fn element(input: &[u8]) -> Result<(Any<'_>, &[u8], &[u8]), ResponseError> {
    let (rest, any) = Any::from_der(input).map_err(|e| invalid(format!("malformed DER: {e}")))?;
    let raw = &input[..input.len() - rest.len()];
    Ok((any, raw, rest))
}

fn expect(any: &Any<'_>, class: Class, tag: Tag, what: &str) -> Result<(), ResponseError> {
    if any.class() == class && any.tag() == tag {
        Ok(())
    } else {
        Err(invalid(format!("expected {what}")))
    }
}

/// Reads an OCSPResponse (RFC 6960 §4.2.1) and returns the verified answer for `id`.
fn read_response(
    body: &[u8],
    id: &CertId,
    issuer: &X509Certificate<'_>,
    now: i64,
) -> Result<SingleResponse, ResponseError> {
    let (response, _, _) = element(body)?;
    expect(&response, Class::Universal, Tag::Sequence, "OCSPResponse")?;
    let (status, _, rest) = element(response.data)?;
    expect(&status, Class::Universal, Tag::Enumerated, "responseStatus")?;
    match status.data {
        [0] => {}
        [1] => return Err(ResponseError::Refused("malformedRequest")),
        [2] => return Err(ResponseError::Refused("internalError")),
        [3] => return Err(ResponseError::Refused("tryLater")),
        [5] => return Err(ResponseError::Refused("sigRequired")),
        [6] => return Err(ResponseError::Refused("unauthorized")),
        _ => return Err(invalid("unknown responseStatus")),
    }
    let (explicit, _, _) = element(rest)?;
    expect(&explicit, Class::ContextSpecific, Tag(0), "responseBytes")?;
    let (response_bytes, _, _) = element(explicit.data)?;
    let (kind, _, rest) = element(response_bytes.data)?;
    expect(&kind, Class::Universal, Tag::Oid, "responseType")?;
    if kind.data != OCSP_BASIC_OID {
        return Err(invalid("responseType is not id-pkix-ocsp-basic"));
    }
    let (octets, _, _) = element(rest)?;
    expect(&octets, Class::Universal, Tag::OctetString, "response")?;

    // BasicOCSPResponse
    let (basic, _, _) = element(octets.data)?;
    expect(&basic, Class::Universal, Tag::Sequence, "BasicOCSPResponse")?;
    let (tbs, tbs_raw, rest) = element(basic.data)?;
    expect(&tbs, Class::Universal, Tag::Sequence, "tbsResponseData")?;
    let (_, algorithm_raw, rest) = element(rest)?;
    let (_, signature_raw, rest) = element(rest)?;
    let (_, algorithm) = AlgorithmIdentifier::from_der(algorithm_raw)
        .map_err(|e| invalid(format!("signatureAlgorithm: {e}")))?;
    let (_, signature) =
        BitString::from_der(signature_raw).map_err(|e| invalid(format!("signature: {e}")))?;
    let mut responder_certs = Vec::new();
    if !rest.is_empty() {
        let (explicit, _, _) = element(rest)?;
        expect(&explicit, Class::ContextSpecific, Tag(0), "certs")?;
        let (list, _, _) = element(explicit.data)?;
        let mut items = list.data;
        while !items.is_empty() {
            let (_, raw, next) = element(items)?;
            responder_certs.push(raw);
            items = next;
        }
    }
    let signed_by = |key: &SubjectPublicKeyInfo<'_>| {
        x509_parser::verify::verify_signature(key, &algorithm, &signature, tbs_raw).is_ok()
    };
    if !signed_by(issuer.public_key()) {
        let delegated = responder_certs.iter().any(|raw| {
            let Ok((_, responder)) = X509Certificate::from_der(raw) else {
                return false;
            };
            // A responder the issuer itself authorised, for OCSP signing, valid now.
            responder.issuer().as_raw() == issuer.subject().as_raw()
                && responder
                    .verify_signature(Some(issuer.public_key()))
                    .is_ok()
                && matches!(responder.extended_key_usage(), Ok(Some(eku)) if eku.value.ocsp_signing)
                && ASN1Time::from_timestamp(now).is_ok_and(|t| responder.validity().is_valid_at(t))
                && signed_by(responder.public_key())
        });
        if !delegated {
            return Err(invalid(
                "not signed by the issuer nor by a responder certificate it issued for OCSP signing",
            ));
        }
    }

    // ResponseData: [0] version, responderID, producedAt, responses, [1] extensions
    let (first, _, mut rest) = element(tbs.data)?;
    if first.class() == Class::ContextSpecific && first.tag() == Tag(0) {
        rest = element(rest)?.2; // responderID
    }
    let (_, _, rest) = element(rest)?; // producedAt
    let (responses, _, _) = element(rest)?;
    expect(&responses, Class::Universal, Tag::Sequence, "responses")?;
    let mut items = responses.data;
    while !items.is_empty() {
        let (single, _, next) = element(items)?;
        items = next;
        if let Some(answer) = read_single(&single, id, now)? {
            return Ok(answer);
        }
    }
    Err(invalid("no answer for the certificate asked about"))
}

/// A SingleResponse, if it is about `id`.
fn read_single(
    single: &Any<'_>,
    id: &CertId,
    now: i64,
) -> Result<Option<SingleResponse>, ResponseError> {
    let (cert_id, _, rest) = element(single.data)?;
    if !same_cert_id(&cert_id, id)? {
        return Ok(None);
    }
    let (status, _, rest) = element(rest)?;
    if status.class() != Class::ContextSpecific {
        return Err(invalid("certStatus"));
    }
    let status = match status.tag() {
        Tag(0) => CertStatus::Good,
        Tag(1) => CertStatus::Revoked,
        Tag(2) => CertStatus::Unknown,
        _ => return Err(invalid("certStatus")),
    };
    let (_, this_update_raw, rest) = element(rest)?;
    let (_, this_update) =
        ASN1Time::from_der(this_update_raw).map_err(|e| invalid(format!("thisUpdate: {e}")))?;
    if this_update.timestamp() > now + CLOCK_SKEW_SECS {
        return Err(invalid("thisUpdate is in the future"));
    }
    let mut next_update = None;
    if !rest.is_empty() {
        let (explicit, _, _) = element(rest)?;
        if explicit.class() == Class::ContextSpecific && explicit.tag() == Tag(0) {
            let (_, time) = ASN1Time::from_der(explicit.data)
                .map_err(|e| invalid(format!("nextUpdate: {e}")))?;
            if time.timestamp() < now - CLOCK_SKEW_SECS {
                return Err(invalid("out of date: nextUpdate has passed"));
            }
            next_update = Some(time.timestamp());
        }
    }
    Ok(Some(SingleResponse {
        status,
        next_update,
    }))
}

fn same_cert_id(cert_id: &Any<'_>, id: &CertId) -> Result<bool, ResponseError> {
    expect(cert_id, Class::Universal, Tag::Sequence, "CertID")?;
    let (algorithm, _, rest) = element(cert_id.data)?;
    let (oid, _, _) = element(algorithm.data)?;
    let (name_hash, _, rest) = element(rest)?;
    let (key_hash, _, rest) = element(rest)?;
    let (serial, _, _) = element(rest)?;
    Ok(oid.tag() == Tag::Oid
        && oid.data == SHA1_OID
        && name_hash.data == id.issuer_name_hash.as_slice()
        && key_hash.data == id.issuer_key_hash.as_slice()
        && strip_sign_byte(serial.data) == id.serial.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths_use_the_shortest_form() {
        assert_eq!(der(0x04, &[1, 2]), vec![0x04, 2, 1, 2]);
        let long = der(0x04, &[0u8; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(long.len(), 304);
    }

    #[test]
    fn the_request_is_one_cert_id_and_reads_back() {
        let id = CertId {
            issuer_name_hash: vec![0x11; 20],
            issuer_key_hash: vec![0x22; 20],
            serial: vec![0x90, 0x01],
        };
        let request = id.request_der();
        // OCSPRequest → tbsRequest → requestList → Request → CertID
        let mut any = element(&request).unwrap().0;
        for _ in 0..4 {
            any = element(any.data).unwrap().0;
        }
        assert!(same_cert_id(&any, &id).unwrap());
        // A serial with its top bit set gets a sign byte, and still matches.
        assert!(request.windows(4).any(|w| w == [0x02, 0x03, 0x00, 0x90]));
        let other = CertId {
            serial: vec![0x90, 0x02],
            ..id.clone()
        };
        assert!(!same_cert_id(&any, &other).unwrap());
    }

    #[test]
    fn unsuccessful_and_garbage_responses_are_not_answers() {
        let ca = crate::demo::pki::CertAuthority::new("Test", "OCSP Test CA").unwrap();
        let ca_der = ca.der();
        let (_, issuer) = X509Certificate::from_der(&ca_der).unwrap();
        let id = CertId {
            issuer_name_hash: vec![0; 20],
            issuer_key_hash: vec![0; 20],
            serial: vec![1],
        };
        // OCSPResponse { responseStatus tryLater }
        let try_later = der(0x30, &der(0x0a, &[3]));
        assert!(matches!(
            read_response(&try_later, &id, &issuer, 0),
            Err(ResponseError::Refused("tryLater"))
        ));
        let unauthorized = der(0x30, &der(0x0a, &[6]));
        assert!(matches!(
            read_response(&unauthorized, &id, &issuer, 0),
            Err(ResponseError::Refused("unauthorized"))
        ));
        for garbage in [&b"<html>busy</html>"[..], &[], &der(0x30, &[])] {
            assert!(matches!(
                read_response(garbage, &id, &issuer, 0),
                Err(ResponseError::Invalid(_))
            ));
        }
    }
}
