//! From a certificate to an account: certificate facts, mapping rules and their strength,
//! account checks, and the `Identity` a request is forwarded as.
//!
//! Nothing here talks to the network: a rule turns `CertFacts` into a directory `Lookup`,
//! and the checks judge the `AccountEntry` the directory returned.

mod facts;

use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;

pub use facts::{ad_dn, hex, CertFacts, CertFingerprint, FactsError};

use crate::config::{IdentityConfig, IdentityValue};
use crate::directory::{AccountEntry, Lookup};

/// One way of finding the account a certificate belongs to (MS-PKCA 3.1.5.2.1, KB5014754).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingRule {
    /// UPN otherName in the subjectAltName → `userPrincipalName` (implicit, weak).
    Upn,
    /// `altSecurityIdentities` = `X509:<I>issuer<SR>serial`, both serial byte orders (strong).
    IssuerSerial,
    /// `altSecurityIdentities` = `X509:<SKI>subjectKeyIdentifier` (strong).
    SubjectKeyId,
    /// rfc822Name in the subjectAltName → `mail` (weak).
    Email,
}

/// How much a mapping proves, in KB5014754's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MappingStrength {
    Strong,
    Weak,
}

impl MappingRule {
    pub const ALL: [MappingRule; 4] = [
        MappingRule::Upn,
        MappingRule::IssuerSerial,
        MappingRule::SubjectKeyId,
        MappingRule::Email,
    ];

    /// The name used in the configuration and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            MappingRule::Upn => "upn",
            MappingRule::IssuerSerial => "issuer-serial",
            MappingRule::SubjectKeyId => "subject-key-id",
            MappingRule::Email => "email",
        }
    }

    pub fn from_name(name: &str) -> Option<MappingRule> {
        MappingRule::ALL.into_iter().find(|r| r.name() == name)
    }

    pub fn strength(self) -> MappingStrength {
        match self {
            MappingRule::IssuerSerial | MappingRule::SubjectKeyId => MappingStrength::Strong,
            MappingRule::Upn | MappingRule::Email => MappingStrength::Weak,
        }
    }

    /// The directory lookup this rule makes for a certificate, or why it does not apply.
    pub fn lookup(self, facts: &CertFacts) -> Result<Lookup, &'static str> {
        let (attribute, values) = match self {
            MappingRule::Upn => ("userPrincipalName", facts.upns.clone()),
            MappingRule::Email => ("mail", facts.emails.clone()),
            MappingRule::IssuerSerial => {
                let forward = hex(&facts.serial);
                let mut reversed_bytes = facts.serial.clone();
                reversed_bytes.reverse();
                let reversed = hex(&reversed_bytes);
                // Windows writes the serial byte-reversed; other tooling forward. Prefer Windows.
                let mut values = vec![format!("X509:<I>{}<SR>{reversed}", facts.issuer_ad)];
                if forward != reversed {
                    values.push(format!("X509:<I>{}<SR>{forward}", facts.issuer_ad));
                }
                ("altSecurityIdentities", values)
            }
            MappingRule::SubjectKeyId => match &facts.subject_key_id {
                Some(ski) => (
                    "altSecurityIdentities",
                    vec![format!("X509:<SKI>{}", hex(ski))],
                ),
                None => ("altSecurityIdentities", Vec::new()),
            },
        };
        if values.is_empty() {
            return Err(match self {
                MappingRule::Upn => "certificate has no UPN in its subjectAltName",
                MappingRule::Email => "certificate has no email in its subjectAltName",
                MappingRule::SubjectKeyId => "certificate has no subject key identifier",
                MappingRule::IssuerSerial => "certificate has no serial",
            });
        }
        Ok(Lookup { attribute, values })
    }
}

/// A device's resolved account, shared by every request on its connections.
#[derive(Debug)]
pub struct Identity {
    pub account: AccountEntry,
    pub rule: MappingRule,
    /// The identity header's value, checked once to hold no CR, LF, NUL or other controls.
    pub header_value: HeaderValue,
    /// Certificate serial (hex) and issuer, for the audit log.
    pub cert_serial: String,
    pub cert_issuer: String,
}

/// Stable reason codes for denials, as they appear in audit records and `seg map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenyReason {
    /// No rule found an account for the certificate.
    NoMapping,
    /// A rule found more than one account: fail closed.
    AmbiguousMapping,
    AccountDisabled,
    AccountExpired,
    /// The account lacks the attribute the identity header is made of.
    IdentityMissing,
    /// The attribute holds characters that cannot go into a header.
    IdentityUnrepresentable,
    /// The certificate could not be parsed after the handshake accepted it.
    CertificateUnreadable,
}

impl DenyReason {
    pub fn code(self) -> &'static str {
        match self {
            DenyReason::NoMapping => "no-mapping",
            DenyReason::AmbiguousMapping => "ambiguous-mapping",
            DenyReason::AccountDisabled => "account-disabled",
            DenyReason::AccountExpired => "account-expired",
            DenyReason::IdentityMissing => "identity-missing",
            DenyReason::IdentityUnrepresentable => "identity-unrepresentable",
            DenyReason::CertificateUnreadable => "certificate-unreadable",
        }
    }
}

/// `userAccountControl` bit ACCOUNTDISABLE.
const UAC_ACCOUNT_DISABLED: u32 = 0x2;
/// Seconds between 1601-01-01 (FILETIME epoch) and 1970-01-01.
const FILETIME_UNIX_OFFSET_SECS: i64 = 11_644_473_600;

/// One account check and its verdict, for `seg map --explain`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AccountCheck {
    pub check: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// Judges the account state; returns every check made and the first failure.
pub fn check_account(
    account: &AccountEntry,
    now: SystemTime,
) -> (Vec<AccountCheck>, Option<DenyReason>) {
    let mut checks = Vec::new();
    let mut failure = None;
    let disabled = account.user_account_control & UAC_ACCOUNT_DISABLED != 0;
    checks.push(AccountCheck {
        check: "enabled",
        passed: !disabled,
        detail: format!("userAccountControl = {:#x}", account.user_account_control),
    });
    if disabled {
        failure = Some(DenyReason::AccountDisabled);
    }
    let (expired, detail) = match account.account_expires {
        None | Some(0) | Some(i64::MAX) => (false, "accountExpires: never".to_string()),
        Some(filetime) => {
            let expires_unix = filetime / 10_000_000 - FILETIME_UNIX_OFFSET_SECS;
            let now_unix = now
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            (
                expires_unix <= now_unix,
                format!("accountExpires = {filetime} (unix {expires_unix})"),
            )
        }
    };
    checks.push(AccountCheck {
        check: "not-expired",
        passed: !expired,
        detail,
    });
    if expired && failure.is_none() {
        failure = Some(DenyReason::AccountExpired);
    }
    (checks, failure)
}

/// The identity header value for an account, or why it cannot be made.
pub fn header_value(
    account: &AccountEntry,
    config: &IdentityConfig,
) -> Result<HeaderValue, DenyReason> {
    let text = match config.value {
        IdentityValue::Upn => account.user_principal_name.clone(),
        IdentityValue::Sam => account.sam_account_name.clone(),
        IdentityValue::DomainSam => match (&config.netbios_domain, &account.sam_account_name) {
            (Some(domain), Some(sam)) => Some(format!("{domain}\\{sam}")),
            _ => None,
        },
    }
    .ok_or(DenyReason::IdentityMissing)?;
    // HeaderValue accepts obs-text; refuse every control byte ourselves (CR, LF, NUL, DEL...).
    if text.is_empty() || text.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(DenyReason::IdentityUnrepresentable);
    }
    HeaderValue::from_str(&text).map_err(|_| DenyReason::IdentityUnrepresentable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> AccountEntry {
        AccountEntry {
            dn: "CN=a,DC=x".into(),
            sam_account_name: Some("alice".into()),
            user_principal_name: Some("alice@corp.test".into()),
            user_account_control: 512,
            ..AccountEntry::default()
        }
    }

    #[test]
    fn account_checks() {
        let now = SystemTime::now();
        assert_eq!(check_account(&account(), now).1, None);
        let mut a = account();
        a.user_account_control = 514;
        assert_eq!(check_account(&a, now).1, Some(DenyReason::AccountDisabled));
        let mut a = account();
        a.account_expires = Some(116_444_736_000_000_000 + 10_000_000); // 1970-01-01T00:00:01
        assert_eq!(check_account(&a, now).1, Some(DenyReason::AccountExpired));
        a.account_expires = Some(0x7FFF_FFFF_FFFF_FFFF);
        assert_eq!(check_account(&a, now).1, None);
    }

    #[test]
    fn header_values_refuse_controls() {
        let config = IdentityConfig {
            header: http::HeaderName::from_static("x-remote-user"),
            value: IdentityValue::Upn,
            netbios_domain: None,
            strip_headers: vec![],
        };
        assert_eq!(
            header_value(&account(), &config).unwrap(),
            "alice@corp.test"
        );
        for bad in ["a\r\nX-Remote-User: bob", "a\0b", "a\nb", "a\x7f", ""] {
            let mut a = account();
            a.user_principal_name = Some(bad.into());
            assert_eq!(
                header_value(&a, &config),
                Err(DenyReason::IdentityUnrepresentable),
                "{bad:?}"
            );
        }
        let mut a = account();
        a.user_principal_name = None;
        assert_eq!(header_value(&a, &config), Err(DenyReason::IdentityMissing));
        let config = IdentityConfig {
            value: IdentityValue::DomainSam,
            netbios_domain: Some("CORP".into()),
            ..config
        };
        assert_eq!(header_value(&account(), &config).unwrap(), "CORP\\alice");
    }
}
