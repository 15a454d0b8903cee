//! `seg map`: what the listener would decide for one certificate, for an administrator.
//!
//! It runs the same chain validation (CA bundle, clientAuth EKU, validity) and the same
//! uncached mapping against the configured directory, and renders the result as JSON or as
//! an explanation: chain verdict, certificate facts, each rule with its LDAP filter, the
//! account, its checks, and the decision with its reason code.

use std::fmt::Write as _;
use std::path::Path;

use rustls::pki_types::CertificateDer;

use crate::certs::read_certs;
use crate::config::Config;
use crate::identity::resolver::{Decision, Resolver, Trace};
use crate::identity::DenyReason;
use crate::tls::ntauth::{NtAuthStore, NtAuthVerdict};
use crate::tls::ClientCertPolicy;

/// The decision for one certificate and how it was reached.
pub struct MapReport {
    pub chain_error: Option<String>,
    /// The refused handshake's reason code, as the listener's log record gives it.
    pub chain_reason: Option<&'static str>,
    /// What the NTAuth store says of the leaf; `None` when no store is checked.
    pub ntauth: Option<String>,
    pub trace: Trace,
    pub outcome: MapOutcome,
}

/// What the gateway would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOutcome {
    /// Forwarded, carrying this identity header value.
    Admit { identity: String },
    /// Refused with a reason code (403, or a refused handshake for `certificate-invalid`),
    /// and the KDC event it mirrors.
    Deny {
        reason: &'static str,
        kdc_event: Option<u32>,
    },
    /// No decision possible now (503).
    Unavailable { reason: &'static str, error: String },
}

impl MapOutcome {
    /// Process exit code for `seg map`: 0 admit, 1 deny, 69 (EX_UNAVAILABLE) unavailable.
    pub fn exit_code(&self) -> i32 {
        match self {
            MapOutcome::Admit { .. } => 0,
            MapOutcome::Deny { .. } => 1,
            MapOutcome::Unavailable { .. } => 69,
        }
    }
}

/// Validates and maps the first certificate of `cert_file`, with optional intermediates.
pub async fn map_certificate(
    config: &Config,
    resolver: &Resolver,
    ntauth: Option<&NtAuthStore>,
    cert_file: &Path,
    chain_file: Option<&Path>,
) -> Result<MapReport, crate::certs::TlsError> {
    let leaf = read_certs(cert_file, "--cert")?.remove(0);
    let intermediates: Vec<CertificateDer<'static>> = match chain_file {
        Some(path) => read_certs(path, "--chain")?,
        None => Vec::new(),
    };
    let revocation = crate::revocation::RevocationList::load(&config.tls.crl_files)?;
    let policy = ClientCertPolicy::new(&config.tls, &revocation)?;
    Ok(map_der(&policy, resolver, ntauth, &leaf, &intermediates).await)
}

/// Validates `leaf` (with `intermediates`) by `policy` and maps it: the admin listener's
/// `/api/decision` gives it the running listener's own policy (its CAs and CRLs in force).
pub async fn map_der(
    policy: &ClientCertPolicy,
    resolver: &Resolver,
    ntauth: Option<&NtAuthStore>,
    leaf: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
) -> MapReport {
    if let Err((reason, e)) = policy.verify_chain(leaf, intermediates) {
        return MapReport {
            chain_error: Some(e.to_string()),
            chain_reason: Some(reason),
            ntauth: None,
            trace: Trace::default(),
            outcome: MapOutcome::Deny {
                reason: "certificate-invalid",
                kdc_event: None,
            },
        };
    }
    let (result, trace) = resolver.explain(leaf.as_ref()).await;
    // The gateway's order: the mapping's own denial first, then the NTAuth store.
    let verdict = ntauth.map(|store| (store.judge(leaf.as_ref()), store.names()));
    let ntauth_line = verdict.as_ref().map(|(verdict, names)| match verdict {
        NtAuthVerdict::Issued(ca) => format!("issued by {ca}, a CA of the NTAuth store"),
        NtAuthVerdict::NotIssued => format!(
            "NOT issued by a CA of the NTAuth store (it holds: {})",
            if names.is_empty() {
                "no CA".to_string()
            } else {
                names.join("; ")
            }
        ),
        NtAuthVerdict::Unknown => {
            "not known: the directory's NTAuth store could not be read".into()
        }
    });
    let result = match (result, verdict.map(|(v, _)| v)) {
        (Ok(Decision::Admit(_)), Some(NtAuthVerdict::NotIssued)) => {
            return MapReport {
                chain_error: None,
                chain_reason: None,
                ntauth: ntauth_line,
                trace,
                outcome: MapOutcome::Deny {
                    reason: DenyReason::CaNotInNtauth.code(),
                    kdc_event: DenyReason::CaNotInNtauth.kdc_event(),
                },
            };
        }
        (Ok(Decision::Admit(_)), Some(NtAuthVerdict::Unknown)) => {
            return MapReport {
                chain_error: None,
                chain_reason: None,
                ntauth: ntauth_line,
                trace,
                outcome: MapOutcome::Unavailable {
                    reason: "ntauth-unavailable",
                    error: "the directory's NTAuth store could not be read".into(),
                },
            };
        }
        (result, _) => result,
    };
    let outcome = match result {
        Ok(Decision::Admit(identity)) => MapOutcome::Admit {
            identity: String::from_utf8_lossy(identity.header_value.as_bytes()).into_owned(),
        },
        Ok(Decision::Deny(denial)) => MapOutcome::Deny {
            reason: denial.reason.code(),
            kdc_event: denial.reason.kdc_event(),
        },
        Err(e) => MapOutcome::Unavailable {
            reason: e.code(),
            error: e.to_string(),
        },
    };
    MapReport {
        chain_error: None,
        chain_reason: None,
        ntauth: ntauth_line,
        trace,
        outcome,
    }
}

impl MapReport {
    pub fn to_json(&self) -> serde_json::Value {
        let (decision, reason, identity, error, kdc_event) = match &self.outcome {
            MapOutcome::Admit { identity } => {
                ("admit", "mapped", Some(identity.clone()), None, None)
            }
            MapOutcome::Deny { reason, kdc_event } => ("deny", *reason, None, None, *kdc_event),
            MapOutcome::Unavailable { reason, error } => {
                ("unavailable", *reason, None, Some(error.clone()), None)
            }
        };
        serde_json::json!({
            "chain": { "valid": self.chain_error.is_none(), "error": self.chain_error, "reason": self.chain_reason },
            "ntauth": self.ntauth,
            "certificate": self.trace.facts,
            "enforcement": self.trace.enforcement,
            "filter": self.trace.filter,
            "rules": self.trace.rules,
            "reasoning": self.trace.reasoning,
            "kdc_event": kdc_event,
            "account": self.trace.account,
            "checks": self.trace.checks,
            "decision": decision,
            "reason": reason,
            "identity": identity,
            "error": error,
        })
    }

    /// The explanation for a person.
    pub fn explain(&self) -> String {
        let mut out = String::new();
        match &self.chain_error {
            None => out
                .push_str("chain        valid (enterprise CA bundle, clientAuth EKU, validity)\n"),
            Some(e) => {
                let reason = self.chain_reason.unwrap_or("certificate-invalid");
                let _ = writeln!(out, "chain        INVALID ({reason}): {e}");
                let _ = writeln!(
                    out,
                    "             the TLS handshake would be refused; no mapping is attempted"
                );
            }
        }
        if let Some(line) = &self.ntauth {
            let _ = writeln!(out, "NTAuth       {line}");
        }
        if let Some(f) = &self.trace.facts {
            let none = || "-".to_string();
            let _ = writeln!(out, "certificate");
            let _ = writeln!(out, "  subject    {}", f.subject);
            let _ = writeln!(out, "  issuer     {}", f.issuer);
            let _ = writeln!(out, "  issuer, as AD writes it   {}", f.issuer_ad);
            let _ = writeln!(out, "  serial     {}", f.serial_hex());
            let _ = writeln!(
                out,
                "  UPN        {}",
                if f.upns.is_empty() {
                    none()
                } else {
                    f.upns.join(", ")
                }
            );
            let _ = writeln!(
                out,
                "  email      {}",
                if f.emails.is_empty() {
                    none()
                } else {
                    f.emails.join(", ")
                }
            );
            let _ = writeln!(
                out,
                "  SKI        {}",
                f.subject_key_id
                    .as_deref()
                    .map(crate::identity::hex)
                    .unwrap_or_else(none)
            );
            let sids = if f.sids.is_empty() {
                none()
            } else {
                f.sids.join(", ")
            };
            let _ = writeln!(out, "  SID        {sids}");
        }
        if let Some(enforcement) = self.trace.enforcement {
            let _ = writeln!(out, "enforcement  {}", enforcement.name());
        }
        if let Some(filter) = &self.trace.filter {
            let _ = writeln!(out, "LDAP filter  {filter}");
        }
        if !self.trace.rules.is_empty() {
            let _ = writeln!(out, "rules, in configured order");
        }
        for (i, attempt) in self.trace.rules.iter().enumerate() {
            let strength = match attempt.strength {
                crate::identity::MappingStrength::Strong => "strong",
                crate::identity::MappingStrength::Weak => "weak",
            };
            let _ = writeln!(out, "  {}. {} ({strength})", i + 1, attempt.rule.name());
            for value in &attempt.looked_for {
                let _ = writeln!(out, "     looked for  {value}");
            }
            let _ = writeln!(out, "     result      {}", attempt.outcome);
        }
        for line in &self.trace.reasoning {
            let _ = writeln!(out, "strength     {line}");
        }
        if let Some(a) = &self.trace.account {
            let _ = writeln!(out, "account      {}", a.dn);
            let _ = writeln!(
                out,
                "             sAMAccountName {}, UPN {}",
                a.sam_account_name.as_deref().unwrap_or("-"),
                a.user_principal_name.as_deref().unwrap_or("-")
            );
        }
        for check in &self.trace.checks {
            let mark = if check.passed { "ok  " } else { "FAIL" };
            let _ = writeln!(out, "  {mark} {:<12} {}", check.check, check.detail);
        }
        let _ = match &self.outcome {
            MapOutcome::Admit { identity } => {
                writeln!(
                    out,
                    "decision     ADMIT, forwarded as {identity} (reason: mapped)"
                )
            }
            MapOutcome::Deny {
                reason,
                kdc_event: Some(event),
            } => writeln!(
                out,
                "decision     DENY (reason: {reason}; a domain controller logs event {event})"
            ),
            MapOutcome::Deny { reason, .. } => {
                writeln!(out, "decision     DENY (reason: {reason})")
            }
            MapOutcome::Unavailable { reason, error } => writeln!(
                out,
                "decision     UNAVAILABLE, 503 + Retry-After (reason: {reason}): {error}"
            ),
        };
        out
    }
}
