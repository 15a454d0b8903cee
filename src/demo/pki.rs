//! A throwaway PKI for `seg demo` and the tests: an enterprise CA, a server certificate and
//! device certificates carrying what mapping rules read (UPN, email, serial, SKI).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, OtherNameValue, SanType, SerialNumber,
};

/// A PKI error (rcgen's, with context).
#[derive(Debug, thiserror::Error)]
#[error("certificate generation failed: {0}")]
pub struct PkiError(String);

impl From<rcgen::Error> for PkiError {
    fn from(e: rcgen::Error) -> Self {
        PkiError(e.to_string())
    }
}

/// An issuing certificate authority.
pub struct CertAuthority {
    key: KeyPair,
    cert: rcgen::Certificate,
}

/// A certificate with its key, PEM-encoded.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

/// Which extended key usages a leaf carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    ClientAuth,
    ServerAuth,
    /// No EKU extension at all.
    None,
}

/// A calendar date (year, month, day).
pub type Ymd = (i32, u8, u8);

/// What a leaf certificate holds.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    pub upn: Option<String>,
    pub emails: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<std::net::IpAddr>,
    /// Big-endian serial; random when absent.
    pub serial: Option<Vec<u8>>,
    pub usage: Usage,
    /// (year, month, day) validity; a year either side of today when absent.
    pub validity: Option<(Ymd, Ymd)>,
    /// Start of validity to the second (overrides `validity`'s start); a year later it ends.
    pub valid_from: Option<std::time::SystemTime>,
    /// An organizational unit in the subject (OU), after the CN.
    pub organizational_unit: Option<String>,
    /// subjectKeyIdentifier extension value; none when absent.
    pub subject_key_id: Option<Vec<u8>>,
    /// A SID for the KB5014754 SID extension (1.3.6.1.4.1.311.25.2).
    pub sid_extension: Option<String>,
    /// A SID for a `tag:microsoft.com,2022-09-14:sid:` subjectAltName URI.
    pub sid_uri: Option<String>,
    /// A PKCS#8 PEM key to certify (an RSA key made elsewhere, say); a new P-256 key when absent.
    pub key_pem: Option<String>,
}

impl LeafSpec {
    /// A device certificate: clientAuth, the name as CN.
    pub fn device(common_name: &str) -> LeafSpec {
        LeafSpec {
            common_name: common_name.into(),
            upn: None,
            emails: Vec::new(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            serial: None,
            usage: Usage::ClientAuth,
            validity: None,
            valid_from: None,
            organizational_unit: None,
            subject_key_id: None,
            sid_extension: None,
            sid_uri: None,
            key_pem: None,
        }
    }

    /// A TLS server certificate for loopback.
    pub fn loopback_server() -> LeafSpec {
        LeafSpec {
            dns_names: vec!["localhost".into()],
            ip_addresses: vec![[127, 0, 0, 1].into()],
            usage: Usage::ServerAuth,
            ..LeafSpec::device("localhost")
        }
    }

    pub fn upn(mut self, upn: &str) -> Self {
        self.upn = Some(upn.into());
        self
    }

    pub fn email(mut self, email: &str) -> Self {
        self.emails.push(email.into());
        self
    }

    pub fn serial(mut self, serial: &[u8]) -> Self {
        self.serial = Some(serial.to_vec());
        self
    }

    pub fn usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }

    pub fn subject_key_id(mut self, id: &[u8]) -> Self {
        self.subject_key_id = Some(id.to_vec());
        self
    }

    pub fn sid_extension(mut self, sid: &str) -> Self {
        self.sid_extension = Some(sid.into());
        self
    }

    pub fn sid_uri(mut self, sid: &str) -> Self {
        self.sid_uri = Some(sid.into());
        self
    }

    pub fn key_pem(mut self, pem: &str) -> Self {
        self.key_pem = Some(pem.into());
        self
    }

    pub fn valid_from(mut self, from: std::time::SystemTime) -> Self {
        self.valid_from = Some(from);
        self
    }

    pub fn organizational_unit(mut self, ou: &str) -> Self {
        self.organizational_unit = Some(ou.into());
        self
    }

    pub fn validity(mut self, from: Ymd, until: Ymd) -> Self {
        self.validity = Some((from, until));
        self
    }
}

/// OID arcs of the UPN otherName (szOID_NT_PRINCIPAL_NAME).
const UPN_OID: [u64; 9] = [1, 3, 6, 1, 4, 1, 311, 20, 2];

impl CertAuthority {
    /// A self-signed root with the given organisation and common name.
    pub fn new(organization: &str, common_name: &str) -> Result<CertAuthority, PkiError> {
        let key = KeyPair::generate()?;
        let cert = ca_params(organization, common_name).self_signed(&key)?;
        Ok(CertAuthority { key, cert })
    }

    /// A subordinate CA signed by this one (an issuing CA, or a sibling of one).
    pub fn subordinate(
        &self,
        organization: &str,
        common_name: &str,
    ) -> Result<CertAuthority, PkiError> {
        // As AD CS issues them: no path length constraint.
        let mut params = ca_params(organization, common_name);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(CertAuthority { key, cert })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> Vec<u8> {
        self.cert.der().to_vec()
    }

    /// A CRL of this CA (PEM) revoking `serials`, issued yesterday, the next due in a week.
    pub fn crl_pem(&self, serials: &[&[u8]]) -> Result<String, PkiError> {
        let today = crate::clock::unix_now() / 86_400;
        let day = |days: i64| {
            let (y, m, d) = crate::clock::civil_from_days(u64::try_from(days).unwrap_or(0));
            rcgen::date_time_ymd(y as i32, m as u8, d as u8)
        };
        let params = rcgen::CertificateRevocationListParams {
            this_update: day(today - 1),
            next_update: day(today + 7),
            crl_number: rcgen::SerialNumber::from_slice(&[1]),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(serial),
                    revocation_time: day(today - 1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.cert, &self.key)?.pem()?)
    }

    /// Issues a leaf certificate signed by this CA.
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.as_str());
        if let Some(ou) = &spec.organizational_unit {
            dn.push(DnType::OrganizationalUnitName, ou.as_str());
        }
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match spec.usage {
            Usage::ClientAuth => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ServerAuth => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::None => vec![],
        };
        if let Some(upn) = &spec.upn {
            let mut oid = UPN_OID.to_vec();
            oid.push(3);
            params.subject_alt_names.push(SanType::OtherName((
                oid,
                OtherNameValue::Utf8String(upn.clone()),
            )));
        }
        for email in &spec.emails {
            params
                .subject_alt_names
                .push(SanType::Rfc822Name(email.clone().try_into()?));
        }
        for name in &spec.dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.clone().try_into()?));
        }
        for ip in &spec.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        let serial = spec.serial.clone().unwrap_or_else(random_serial);
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let year = std::time::Duration::from_secs(365 * 86_400);
        match (spec.valid_from, spec.validity) {
            (Some(from), _) => {
                params.not_before = from.into();
                params.not_after = (from + year).into();
            }
            (None, Some(((y1, m1, d1), (y2, m2, d2)))) => {
                params.not_before = rcgen::date_time_ymd(y1, m1, d1);
                params.not_after = rcgen::date_time_ymd(y2, m2, d2);
            }
            (None, None) => {
                let now = std::time::SystemTime::now();
                params.not_before = (now - year).into();
                params.not_after = (now + year).into();
            }
        }
        if let Some(id) = &spec.subject_key_id {
            // OCTET STRING holding the identifier (RFC 5280 §4.2.1.2).
            let mut value = vec![0x04, id.len() as u8];
            value.extend_from_slice(id);
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[2, 5, 29, 14],
                    value,
                ));
        }
        if let Some(sid) = &spec.sid_extension {
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 4, 1, 311, 25, 2],
                    sid_extension_value(sid),
                ));
        }
        if let Some(sid) = &spec.sid_uri {
            let uri = format!("{}{sid}", crate::identity::SID_URI_PREFIX);
            params.subject_alt_names.push(SanType::URI(uri.try_into()?));
        }
        let key = match &spec.key_pem {
            Some(pem) => KeyPair::from_pem(pem)?,
            None => KeyPair::generate()?,
        };
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }
}

/// A CA certificate's parameters: the name, cA without a path length constraint, the
/// certificate- and CRL-signing key usages, a random serial.
fn ca_params(organization: &str, common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, organization);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params
}

/// DER of the SID extension as AD CS writes it: GeneralNames { otherName
/// 1.3.6.1.4.1.311.25.2.1 [0] { OCTET STRING "S-1-5-…" } }.
fn sid_extension_value(sid: &str) -> Vec<u8> {
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            out.extend([0x81, len as u8]);
        }
        out.extend_from_slice(content);
        out
    }
    let oid = crate::identity::oid_der("1.3.6.1.4.1.311.25.2.1");
    let mut other_name = tlv(0x06, &oid);
    other_name.extend(tlv(0xA0, &tlv(0x04, sid.as_bytes())));
    tlv(0x30, &tlv(0xA0, &other_name))
}

/// 16 random bytes with the top bit clear, so the DER integer needs no sign byte.
fn random_serial() -> Vec<u8> {
    let mut serial = vec![0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .expect("system randomness is available");
    serial[0] = (serial[0] & 0x7f) | 0x01;
    serial
}
