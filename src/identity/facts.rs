//! `CertFacts`: what mapping needs from a device certificate, read once from its DER.

use std::fmt::Write as _;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::Oid;
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

/// SHA-256 of the leaf certificate's DER: the identity-cache key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CertFingerprint(pub [u8; 32]);

impl CertFingerprint {
    pub fn of(der: &[u8]) -> CertFingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        CertFingerprint(out)
    }

    pub fn hex(&self) -> String {
        hex(&self.0)
    }
}

impl std::fmt::Debug for CertFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertFingerprint({})", self.hex())
    }
}

/// OID of the UPN otherName in a subjectAltName (szOID_NT_PRINCIPAL_NAME).
const UPN_OID: &str = "1.3.6.1.4.1.311.20.2.3";
/// The SID extension AD CS adds since KB5014754 (szOID_NTDS_CA_SECURITY_EXT).
pub const SID_EXTENSION_OID: &str = "1.3.6.1.4.1.311.25.2";
/// The otherName inside it that holds the textual SID.
const SID_OTHER_NAME_OID: &str = "1.3.6.1.4.1.311.25.2.1";
/// A subjectAltName URI carrying the SID (the KB5014754 alternative to the extension).
pub const SID_URI_PREFIX: &str = "tag:microsoft.com,2022-09-14:sid:";

/// The facts of one certificate that mapping rules and the audit log use.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertFacts {
    #[serde(skip)]
    pub fingerprint: CertFingerprint,
    /// Serial number as big-endian bytes, without a DER sign byte.
    #[serde(serialize_with = "ser_hex")]
    pub serial: Vec<u8>,
    /// Issuer DN written the way AD stores it: most significant RDN first.
    pub issuer_ad: String,
    /// Subject DN, most significant RDN first.
    pub subject_ad: String,
    /// Issuer DN as DER, the key CRLs are looked up by.
    #[serde(skip)]
    pub issuer_der: Vec<u8>,
    /// Issuer DN as x509-parser prints it (certificate order, `, `-separated), for the audit log.
    pub issuer: String,
    pub subject: String,
    /// UPNs from subjectAltName otherNames (valid UTF-8 only).
    pub upns: Vec<String>,
    /// rfc822Name entries of the subjectAltName.
    pub emails: Vec<String>,
    pub dns_names: Vec<String>,
    #[serde(serialize_with = "ser_opt_hex")]
    pub subject_key_id: Option<Vec<u8>>,
    /// SHA-1 of the subjectPublicKey bits: `X509:<SHA1-PUKEY>` as MS-PKCA describes it.
    #[serde(serialize_with = "ser_hex")]
    pub sha1_public_key: Vec<u8>,
    /// SHA-1 of the whole certificate (the thumbprint), which some tooling writes instead.
    #[serde(serialize_with = "ser_hex")]
    pub sha1_thumbprint: Vec<u8>,
    /// SIDs the certificate claims, from the SID extension and SAN URIs (textual, as found).
    pub sids: Vec<String>,
    /// Subject attributes as (Windows label, value), in certificate order.
    pub subject_fields: Vec<(String, String)>,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error("certificate is not valid DER: {0}")]
    Der(String),
}

impl CertFacts {
    /// Parses the leaf certificate once.
    pub fn from_der(der: &[u8]) -> Result<CertFacts, FactsError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| FactsError::Der(e.to_string()))?;
        let mut facts = CertFacts {
            fingerprint: CertFingerprint::of(der),
            serial: strip_sign_byte(cert.raw_serial()).to_vec(),
            issuer_ad: ad_dn(cert.issuer()),
            issuer_der: cert.issuer().as_raw().to_vec(),
            subject_ad: ad_dn(cert.subject()),
            issuer: cert.issuer().to_string(),
            subject: cert.subject().to_string(),
            upns: Vec::new(),
            emails: Vec::new(),
            dns_names: Vec::new(),
            subject_key_id: None,
            sha1_public_key: sha1(&cert.public_key().subject_public_key.data),
            sha1_thumbprint: sha1(der),
            sids: Vec::new(),
            subject_fields: dn_fields(cert.subject()),
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
        };
        let upn_oid: Oid = UPN_OID.parse().map_err(|_| FactsError::Der("oid".into()))?;
        let sid_ext_oid: Oid = SID_EXTENSION_OID
            .parse()
            .map_err(|_| FactsError::Der("oid".into()))?;
        for ext in cert.extensions() {
            if ext.oid == sid_ext_oid {
                facts.sids.extend(sid_extension_values(ext.value));
                continue;
            }
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::RFC822Name(m) => facts.emails.push(m.to_string()),
                            GeneralName::DNSName(d) => facts.dns_names.push(d.to_string()),
                            GeneralName::URI(uri) => {
                                let tagged = uri
                                    .get(..SID_URI_PREFIX.len())
                                    .filter(|p| p.eq_ignore_ascii_case(SID_URI_PREFIX));
                                if tagged.is_some() {
                                    facts.sids.push(uri[SID_URI_PREFIX.len()..].to_string());
                                }
                            }
                            GeneralName::OtherName(oid, value) if *oid == upn_oid => {
                                if let Some(upn) = other_name_utf8(value) {
                                    facts.upns.push(upn);
                                }
                            }
                            _ => {}
                        }
                    }
                }
                ParsedExtension::SubjectKeyIdentifier(ski) => {
                    facts.subject_key_id = Some(ski.0.to_vec());
                }
                _ => {}
            }
        }
        Ok(facts)
    }

    pub fn serial_hex(&self) -> String {
        hex(&self.serial)
    }
}

fn sha1(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, bytes)
        .as_ref()
        .to_vec()
}

/// Reads the SID extension: GeneralNames holding an otherName
/// 1.3.6.1.4.1.311.25.2.1 whose `[0] EXPLICIT` value is the textual SID (an OCTET STRING
/// in AD CS certificates; a UTF8String or IA5String is accepted too).
fn sid_extension_values(value: &[u8]) -> Vec<String> {
    let mut sids = Vec::new();
    let Some((0x30, mut names, _)) = der_tlv(value) else {
        return sids;
    };
    let sid_oid = oid_der(SID_OTHER_NAME_OID);
    while let Some((tag, content, rest)) = der_tlv(names) {
        names = rest;
        // otherName is [0] IMPLICIT SEQUENCE { type-id OID, value [0] EXPLICIT ANY }.
        if tag != 0xA0 {
            continue;
        }
        let Some((0x06, oid, after_oid)) = der_tlv(content) else {
            continue;
        };
        if oid != sid_oid.as_slice() {
            continue;
        }
        let Some((0xA0, wrapped, _)) = der_tlv(after_oid) else {
            continue;
        };
        if let Some((0x04 | 0x0C | 0x16, text, _)) = der_tlv(wrapped) {
            if let Ok(text) = std::str::from_utf8(text) {
                sids.push(text.to_string());
            }
        }
    }
    sids
}

/// DER content octets of a dotted OID (first two arcs combined, base-128 arcs).
pub fn oid_der(dotted: &str) -> Vec<u8> {
    let arcs: Vec<u64> = dotted.split('.').filter_map(|a| a.parse().ok()).collect();
    let mut out = Vec::new();
    if arcs.len() < 2 {
        return out;
    }
    let mut push = |mut arc: u64| {
        let mut chunk = vec![(arc & 0x7f) as u8];
        arc >>= 7;
        while arc > 0 {
            chunk.push(0x80 | (arc & 0x7f) as u8);
            arc >>= 7;
        }
        chunk.reverse();
        out.extend(chunk);
    };
    push(arcs[0] * 40 + arcs[1]);
    for &arc in &arcs[2..] {
        push(arc);
    }
    out
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn ser_hex<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(v))
}

fn ser_opt_hex<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&hex(v)),
        None => s.serialize_none(),
    }
}

fn strip_sign_byte(serial: &[u8]) -> &[u8] {
    match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        other => other,
    }
}

/// The DN as AD writes it in `altSecurityIdentities`: RDNs in certificate (most significant
/// first) order, Windows attribute names, values quoted when they hold a separator.
pub fn ad_dn(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    for (label, value, first_in_rdn) in dn_attributes(name) {
        if !out.is_empty() {
            // Attributes of one multi-valued RDN are joined with '+', RDNs with ','.
            out.push(if first_in_rdn { ',' } else { '+' });
        }
        out.push_str(&label);
        out.push('=');
        if value.contains([',', '+', '=', '"', '<', '>', '#', ';', '\n', '\r']) {
            out.push('"');
            out.push_str(&value.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(&value);
        }
    }
    out
}

/// The attributes of a DN as (Windows label, value), most significant first.
fn dn_fields(name: &X509Name<'_>) -> Vec<(String, String)> {
    dn_attributes(name)
        .into_iter()
        .map(|(label, value, _)| (label, value))
        .collect()
}

/// (Windows label, value, first attribute of its RDN), most significant first.
fn dn_attributes(name: &X509Name<'_>) -> Vec<(String, String, bool)> {
    let mut fields = Vec::new();
    for rdn in name.iter() {
        for (position, attr) in rdn.iter().enumerate() {
            let oid = attr.attr_type().to_id_string();
            let label = match oid.as_str() {
                "2.5.4.3" => "CN".to_string(),
                "2.5.4.11" => "OU".to_string(),
                "2.5.4.10" => "O".to_string(),
                "2.5.4.7" => "L".to_string(),
                "2.5.4.8" => "S".to_string(),
                "2.5.4.6" => "C".to_string(),
                "2.5.4.9" => "STREET".to_string(),
                "2.5.4.5" => "SERIALNUMBER".to_string(),
                "2.5.4.12" => "T".to_string(),
                "2.5.4.42" => "G".to_string(),
                "2.5.4.4" => "SN".to_string(),
                "0.9.2342.19200300.100.1.25" => "DC".to_string(),
                "0.9.2342.19200300.100.1.1" => "UID".to_string(),
                "1.2.840.113549.1.9.1" => "E".to_string(),
                other => format!("OID.{other}"),
            };
            let value = attr
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|_| format!("#{}", hex(attr.attr_value().data)));
            fields.push((label, value, position == 0));
        }
    }
    fields
}

/// Reads `[0] EXPLICIT UTF8String` (the UPN otherName value); x509-parser hands over the
/// raw explicit wrapper.
fn other_name_utf8(value: &[u8]) -> Option<String> {
    let inner = match der_tlv(value)? {
        (0xA0, content, _) => content,
        (0x0C, _, _) => value,
        _ => return None,
    };
    match der_tlv(inner)? {
        (0x0C, s, _) => String::from_utf8(s.to_vec()).ok(),
        _ => None,
    }
}

/// One DER tag-length-value: (tag, content, rest).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upn_other_name_forms() {
        // [0] { UTF8String "a@b" }
        assert_eq!(
            other_name_utf8(&[0xA0, 5, 0x0C, 3, b'a', b'@', b'b']),
            Some("a@b".into())
        );
        assert_eq!(other_name_utf8(&[0x0C, 1, b'x']), Some("x".into()));
        assert_eq!(other_name_utf8(&[0xA0, 5, 0x0C, 9, b'a']), None);
        assert_eq!(other_name_utf8(&[0xA0, 3, 0x0C, 1, 0xff]), None);
        assert_eq!(other_name_utf8(&[]), None);
    }

    #[test]
    fn oid_encoding() {
        // 1.3.6.1.4.1.311.25.2.1 as it appears in AD CS certificates.
        assert_eq!(
            oid_der("1.3.6.1.4.1.311.25.2.1"),
            [0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x19, 0x02, 0x01]
        );
    }

    #[test]
    fn sid_extension() {
        let sid = b"S-1-5-21-1-2-3-1104";
        let oid = oid_der(SID_OTHER_NAME_OID);
        let mut octets = vec![0x04, sid.len() as u8];
        octets.extend_from_slice(sid);
        let mut explicit = vec![0xA0, octets.len() as u8];
        explicit.extend(octets);
        let mut other = vec![0x06, oid.len() as u8];
        other.extend(oid);
        other.extend(explicit);
        let mut name = vec![0xA0, other.len() as u8];
        name.extend(other);
        let mut value = vec![0x30, name.len() as u8];
        value.extend(name);
        assert_eq!(sid_extension_values(&value), ["S-1-5-21-1-2-3-1104"]);
        assert!(sid_extension_values(&[0x30, 0x00]).is_empty());
        assert!(sid_extension_values(&value[..value.len() - 3]).is_empty());
    }

    #[test]
    fn sign_byte() {
        assert_eq!(strip_sign_byte(&[0, 0x80]), &[0x80]);
        assert_eq!(strip_sign_byte(&[0]), &[0]);
        assert_eq!(strip_sign_byte(&[0x12, 0]), &[0x12, 0]);
    }
}
