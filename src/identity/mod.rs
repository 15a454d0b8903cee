//! From a certificate to an account: certificate facts, mapping rules and their strength,
//! account checks, and the `Identity` a request is forwarded as.
//!
//! Nothing here talks to the network: a rule turns `CertFacts` into a directory `Lookup`,
//! and the checks judge the `AccountEntry` the directory returned.

pub mod resolver;
pub mod snapshot;

mod facts;
mod mapping;
mod sid;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;

pub use crate::config::{MappingRule, MappingStrength};
pub use facts::{
    ad_dn, hex, oid_der, CertFacts, CertFingerprint, FactsError, SID_EXTENSION_OID, SID_URI_PREFIX,
};
pub use mapping::{
    decide, generalized_time_unix, glob_match, unix_from_civil, Mapped, MappingPlan,
    MappingVerdict, RuleAttempt,
};
pub use sid::{sid_from_text, sid_to_text};

use crate::config::{IdentityConfig, IdentityValue};
use crate::directory::AccountEntry;

/// A device's resolved account, shared by every request on its connections.
#[derive(Debug)]
pub struct Identity {
    pub account: AccountEntry,
    pub rule: MappingRule,
    pub strength: MappingStrength,
    /// The identity header's value, checked once to hold no CR, LF, NUL or other controls.
    pub header_value: HeaderValue,
    /// Certificate serial (hex) and issuer, for the audit log.
    pub cert_serial: String,
    pub cert_issuer: String,
    /// (issuer DER, serial): the certificate's key in revocation lists.
    pub revocation_key: (Vec<u8>, Vec<u8>),
    /// The certificate's validity (notBefore, notAfter), Unix seconds: checked on every
    /// request, because a resumed session never shows the certificate to the verifier again.
    pub validity: (i64, i64),
    /// When the directory gave the answer this identity comes from (here, in a snapshot or
    /// on another replica), Unix seconds: the cached decision's age is counted from it.
    pub decided_unix: i64,
}

impl Identity {
    /// Why the certificate is not valid at `now` (Unix seconds), if it is not.
    pub fn validity_at(&self, now: i64) -> Result<(), DenyReason> {
        let (not_before, not_after) = self.validity;
        if now < not_before {
            Err(DenyReason::CertificateNotYetValid)
        } else if now > not_after {
            Err(DenyReason::CertificateExpired)
        } else {
            Ok(())
        }
    }
}

/// Stable reason codes for denials, as they appear in audit records and `seg map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DenyReason {
    /// No rule found an account for the certificate.
    NoMapping,
    /// A rule found more than one account: fail closed.
    AmbiguousMapping,
    /// Only a weak mapping, no SID to confirm it, full enforcement (KDC event 39).
    NoStrongMapping,
    /// Weak mapping in compatibility mode, account newer than the certificate (KDC event 40).
    CertificatePredatesAccount,
    /// The certificate's SID is not the account's (KDC event 41).
    SidMismatch,
    AccountDisabled,
    AccountExpired,
    AccountLocked,
    /// Not a member of a required group.
    GroupRequired,
    /// A member of a denied group.
    GroupDenied,
    /// The account lacks the attribute the identity header is made of.
    IdentityMissing,
    /// The attribute holds characters that cannot go into a header.
    IdentityUnrepresentable,
    /// The certificate could not be parsed after the handshake accepted it.
    CertificateUnreadable,
    /// A CRL lists the certificate (caught on a resumed or long-lived connection).
    CertificateRevoked,
    /// The certificate's notAfter has passed (caught on a resumed or long-lived connection).
    CertificateExpired,
    /// No CA of the NTAuth store issued the certificate (KDC event 21): a sibling of the
    /// issuing CA under the same root, say.
    CaNotInNtauth,
    /// The certificate's notBefore is still ahead.
    CertificateNotYetValid,
    /// Kerberos delegation (`identity.mode = "kerberos"`), the KDC's refusals by error code:
    /// KDC_ERR_CLIENT_REVOKED, the account is disabled or locked out.
    KdcAccountDisabled,
    /// KDC_ERR_NAME_EXP, the account has expired.
    KdcAccountExpired,
    /// KDC_ERR_KEY_EXP, the account's password has expired (or must be changed).
    KdcPasswordExpired,
    /// KDC_ERR_POLICY: Samba's answer for a disabled account; AD's for logon hours or
    /// workstation restrictions.
    KdcPolicy,
    /// KDC_ERR_C_PRINCIPAL_UNKNOWN: the KDC knows no `sAMAccountName@REALM` of that name.
    KdcPrincipalUnknown,
    /// KDC_ERR_BADOPTION for an account marked "sensitive and cannot be delegated"
    /// (`userAccountControl` NOT_DELEGATED).
    AccountNotDelegable,
    /// KDC_ERR_BADOPTION otherwise: the target SPN is not in the gateway account's delegation
    /// list, or protocol transition is not allowed.
    DelegationNotAllowed,
}

impl DenyReason {
    /// The reasons a directory lookup can give (what a shared decision may carry).
    const FROM_DIRECTORY: [DenyReason; 13] = [
        DenyReason::NoMapping,
        DenyReason::AmbiguousMapping,
        DenyReason::NoStrongMapping,
        DenyReason::CertificatePredatesAccount,
        DenyReason::SidMismatch,
        DenyReason::AccountDisabled,
        DenyReason::AccountExpired,
        DenyReason::AccountLocked,
        DenyReason::GroupRequired,
        DenyReason::GroupDenied,
        DenyReason::IdentityMissing,
        DenyReason::IdentityUnrepresentable,
        DenyReason::CertificateUnreadable,
    ];

    /// The directory lookup's reason of that code.
    pub fn from_directory_code(code: &str) -> Option<DenyReason> {
        DenyReason::FROM_DIRECTORY
            .into_iter()
            .find(|r| r.code() == code)
    }

    pub fn code(self) -> &'static str {
        match self {
            DenyReason::NoMapping => "no-mapping",
            DenyReason::AmbiguousMapping => "ambiguous-mapping",
            DenyReason::NoStrongMapping => "no-strong-mapping",
            DenyReason::CertificatePredatesAccount => "certificate-predates-account",
            DenyReason::SidMismatch => "sid-mismatch",
            DenyReason::AccountDisabled => "account-disabled",
            DenyReason::AccountExpired => "account-expired",
            DenyReason::AccountLocked => "account-locked",
            DenyReason::GroupRequired => "group-required",
            DenyReason::GroupDenied => "group-denied",
            DenyReason::IdentityMissing => "identity-missing",
            DenyReason::IdentityUnrepresentable => "identity-unrepresentable",
            DenyReason::CertificateUnreadable => "certificate-unreadable",
            DenyReason::CertificateRevoked => "certificate-revoked",
            DenyReason::CertificateExpired => "certificate-expired",
            DenyReason::CaNotInNtauth => "ca-not-in-ntauth",
            DenyReason::CertificateNotYetValid => "certificate-not-yet-valid",
            DenyReason::KdcAccountDisabled => "kdc-account-disabled",
            DenyReason::KdcAccountExpired => "kdc-account-expired",
            DenyReason::KdcPasswordExpired => "kdc-password-expired",
            DenyReason::KdcPolicy => "kdc-policy",
            DenyReason::KdcPrincipalUnknown => "kdc-principal-unknown",
            DenyReason::AccountNotDelegable => "account-not-delegable",
            DenyReason::DelegationNotAllowed => "delegation-not-allowed",
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

/// The KDC event a reason code mirrors, if any.
impl DenyReason {
    pub fn kdc_event(self) -> Option<u32> {
        match self {
            DenyReason::NoStrongMapping => Some(39),
            DenyReason::CertificatePredatesAccount => Some(40),
            DenyReason::SidMismatch => Some(41),
            // KDCEVENT_INVALID_CLIENT_CERTIFICATE: the chain is not valid for NT logon.
            DenyReason::CaNotInNtauth => Some(21),
            _ => None,
        }
    }
}

fn filetime_unix(filetime: i64) -> i64 {
    filetime / 10_000_000 - FILETIME_UNIX_OFFSET_SECS
}

/// Judges the account state (disabled, expired, locked out); returns every check made and
/// the first failure.
pub fn check_account(
    account: &AccountEntry,
    now: SystemTime,
    lockout_duration: Duration,
) -> (Vec<AccountCheck>, Option<DenyReason>) {
    let mut checks = Vec::new();
    let mut failure = None;
    let now_unix = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
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
            let expires_unix = filetime_unix(filetime);
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
    let (locked, detail) = match account.lockout_time {
        None | Some(0) => (false, "lockoutTime: not locked".to_string()),
        Some(filetime) => {
            let until = filetime_unix(filetime) + lockout_duration.as_secs() as i64;
            (
                now_unix < until,
                format!("lockoutTime = {filetime} (locked until unix {until})"),
            )
        }
    };
    checks.push(AccountCheck {
        check: "not-locked",
        passed: !locked,
        detail,
    });
    if locked && failure.is_none() {
        failure = Some(DenyReason::AccountLocked);
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
        let lockout = Duration::from_secs(1800);
        assert_eq!(check_account(&account(), now, lockout).1, None);
        let mut a = account();
        a.user_account_control = 514;
        assert_eq!(
            check_account(&a, now, lockout).1,
            Some(DenyReason::AccountDisabled)
        );
        let mut a = account();
        a.account_expires = Some(116_444_736_000_000_000 + 10_000_000); // 1970-01-01T00:00:01
        assert_eq!(
            check_account(&a, now, lockout).1,
            Some(DenyReason::AccountExpired)
        );
        a.account_expires = Some(0x7FFF_FFFF_FFFF_FFFF);
        assert_eq!(check_account(&a, now, lockout).1, None);
        let unix_now = now.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        let filetime = |unix: i64| (unix + FILETIME_UNIX_OFFSET_SECS) * 10_000_000;
        a.lockout_time = Some(filetime(unix_now - 60));
        assert_eq!(
            check_account(&a, now, lockout).1,
            Some(DenyReason::AccountLocked)
        );
        a.lockout_time = Some(filetime(unix_now - 3600));
        assert_eq!(
            check_account(&a, now, lockout).1,
            None,
            "the lockout has run out"
        );
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
