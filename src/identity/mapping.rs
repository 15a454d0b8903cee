//! Mapping rules and the KB5014754 decision, as a domain controller makes it.
//!
//! Every enabled rule contributes the exact values it looks for to one directory `Lookup`
//! (one search per certificate). The entries found are then classified rule by rule: a rule
//! matching two accounts refuses the certificate; a strong match wins over any weak one; a
//! SID in the certificate must equal the account's `objectSid`; and a weak mapping admits only
//! under `compatibility` enforcement, for an account older than the certificate.

use crate::config::{Enforcement, ManyToOneRule, MappingConfig, MappingRule, MappingStrength};
use crate::directory::{AccountEntry, AccountKind, Condition, Lookup, SEARCH_LIMIT};

use super::facts::hex;
use super::sid::sid_to_text;
use super::{CertFacts, DenyReason};

impl MappingRule {
    /// Which kind of account the rule maps to.
    pub fn kind(self) -> AccountKind {
        match self {
            MappingRule::Dns => AccountKind::Computer,
            _ => AccountKind::User,
        }
    }

    /// The exact attribute values this rule looks for, or why it does not apply.
    pub fn conditions(
        self,
        facts: &CertFacts,
        many_to_one: &[ManyToOneRule],
    ) -> Result<Vec<Condition>, &'static str> {
        let alt = |value: String| Condition::new("altSecurityIdentities", value);
        let issuer = &facts.issuer_ad;
        let conditions: Vec<Condition> = match self {
            MappingRule::IssuerSerial => {
                let mut reversed = facts.serial.clone();
                reversed.reverse();
                // Windows writes the serial byte-reversed; other tooling forward. Both match.
                let mut values = vec![alt(format!("X509:<I>{issuer}<SR>{}", hex(&reversed)))];
                if reversed != facts.serial {
                    values.push(alt(format!("X509:<I>{issuer}<SR>{}", hex(&facts.serial))));
                }
                values
            }
            MappingRule::SubjectKeyId => match &facts.subject_key_id {
                Some(ski) => vec![alt(format!("X509:<SKI>{}", hex(ski)))],
                None => return Err("certificate has no subject key identifier"),
            },
            MappingRule::Sha1PublicKey => vec![
                alt(format!("X509:<SHA1-PUKEY>{}", hex(&facts.sha1_public_key))),
                alt(format!("X509:<SHA1-PUKEY>{}", hex(&facts.sha1_thumbprint))),
            ],
            MappingRule::IssuerSid => facts
                .sids
                .iter()
                .map(|sid| alt(format!("X509:<I>{issuer}<SID>{sid}")))
                .collect(),
            MappingRule::IssuerSubject => {
                vec![alt(format!("X509:<I>{issuer}<S>{}", facts.subject_ad))]
            }
            MappingRule::Subject => vec![alt(format!("X509:<S>{}", facts.subject_ad))],
            MappingRule::Rfc822 => facts
                .emails
                .iter()
                .map(|e| alt(format!("X509:<RFC822>{e}")))
                .collect(),
            MappingRule::Upn => facts
                .upns
                .iter()
                .map(|u| Condition::new("userPrincipalName", u.clone()))
                .collect(),
            MappingRule::Email => facts
                .emails
                .iter()
                .flat_map(|e| {
                    [
                        Condition::new("mail", e.clone()),
                        // proxyAddresses compare case-insensitively: "smtp:" finds "SMTP:" too.
                        Condition::new("proxyAddresses", format!("smtp:{e}")),
                    ]
                })
                .collect(),
            MappingRule::Dns => facts
                .dns_names
                .iter()
                .map(|d| Condition::new("dNSHostName", d.clone()))
                .collect(),
            MappingRule::ManyToOne => match many_to_one.iter().find(|r| r.applies_to(facts)) {
                Some(rule) => vec![Condition::new("sAMAccountName", rule.account.clone())],
                None => return Err("no many-to-one rule matches the issuer and subject"),
            },
        };
        if conditions.is_empty() {
            return Err(match self {
                MappingRule::IssuerSid => "certificate carries no SID",
                MappingRule::Rfc822 | MappingRule::Email => {
                    "certificate has no email in its subjectAltName"
                }
                MappingRule::Upn => "certificate has no UPN in its subjectAltName",
                MappingRule::Dns => "certificate has no DNS name in its subjectAltName",
                _ => "not applicable",
            });
        }
        Ok(conditions)
    }
}

impl ManyToOneRule {
    /// Whether a certificate's issuer and subject fields match this rule.
    pub fn applies_to(&self, facts: &CertFacts) -> bool {
        crate::directory::dn_eq(&self.issuer, &facts.issuer_ad)
            && self.subject.iter().all(|(label, pattern)| {
                facts
                    .subject_fields
                    .iter()
                    .any(|(l, v)| l.eq_ignore_ascii_case(label) && glob_match(pattern, v))
            })
    }
}

/// Case-insensitive glob with `*` (any run) and `?` (one character).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let t: Vec<char> = text.to_lowercase().chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                backtrack = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match backtrack {
                Some((bp, bt)) => {
                    pi = bp + 1;
                    ti = bt + 1;
                    backtrack = Some((bp, bt + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// One rule as tried, for `seg map --explain` and the trace.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleAttempt {
    pub rule: MappingRule,
    pub strength: MappingStrength,
    /// `attribute=value` strings looked for; empty when the rule did not apply.
    pub looked_for: Vec<String>,
    pub outcome: String,
}

/// The rules' conditions for one certificate, and the single lookup they make.
pub struct MappingPlan {
    pub lookup: Lookup,
    rules: Vec<(MappingRule, Result<Vec<Condition>, &'static str>)>,
}

impl MappingPlan {
    pub fn new(facts: &CertFacts, config: &MappingConfig) -> MappingPlan {
        let mut lookup = Lookup::default();
        let rules: Vec<_> = config
            .rules
            .iter()
            .map(|&rule| {
                let conditions = rule.conditions(facts, &config.many_to_one);
                for c in conditions.iter().flatten() {
                    lookup.add(rule.kind(), c.clone());
                }
                (rule, conditions)
            })
            .collect();
        MappingPlan { lookup, rules }
    }
}

/// An account the certificate maps to, and how strongly.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub rule: MappingRule,
    pub account: AccountEntry,
    pub strength: MappingStrength,
    pub sid_verified: bool,
}

/// The mapping decision with everything that led to it.
#[derive(Debug)]
pub struct MappingVerdict {
    pub attempts: Vec<RuleAttempt>,
    /// How the strength and enforcement decision was reached, in words.
    pub reasoning: Vec<String>,
    pub outcome: Result<Mapped, (DenyReason, Option<AccountEntry>)>,
}

/// Classifies the entries the lookup returned and applies KB5014754 enforcement.
pub fn decide(
    facts: &CertFacts,
    plan: &MappingPlan,
    entries: &[AccountEntry],
    enforcement: Enforcement,
) -> MappingVerdict {
    let mut attempts = Vec::new();
    let mut reasoning = Vec::new();
    let deny = |attempts, reasoning, reason, account| MappingVerdict {
        attempts,
        reasoning,
        outcome: Err((reason, account)),
    };
    if entries.len() >= SEARCH_LIMIT {
        reasoning.push(format!(
            "the search returned {SEARCH_LIMIT} or more accounts"
        ));
        return deny(attempts, reasoning, DenyReason::AmbiguousMapping, None);
    }
    let mut strong: Option<(MappingRule, &AccountEntry)> = None;
    let mut weak: Option<(MappingRule, &AccountEntry)> = None;
    for (rule, conditions) in &plan.rules {
        let mut attempt = RuleAttempt {
            rule: *rule,
            strength: rule.strength(),
            looked_for: Vec::new(),
            outcome: String::new(),
        };
        let conditions = match conditions {
            Ok(c) => c,
            Err(why) => {
                attempt.outcome = format!("not applicable: {why}");
                attempts.push(attempt);
                continue;
            }
        };
        attempt.looked_for = conditions
            .iter()
            .map(|c| format!("{}={}", c.attribute, c.value))
            .collect();
        let found: Vec<&AccountEntry> = entries
            .iter()
            .filter(|e| e.kind() == rule.kind())
            .filter(|e| {
                conditions
                    .iter()
                    .any(|c| e.has_value(c.attribute, &c.value))
            })
            .collect();
        match found.as_slice() {
            [] => attempt.outcome = "no account".into(),
            [account] => {
                attempt.outcome = format!("found {}", account.dn);
                let slot = match rule.strength() {
                    MappingStrength::Strong => &mut strong,
                    MappingStrength::Weak => &mut weak,
                };
                if slot.is_none() {
                    *slot = Some((*rule, account));
                }
            }
            many => {
                attempt.outcome = format!("{} accounts: refused", many.len());
                attempts.push(attempt);
                reasoning.push(format!(
                    "rule {} matches more than one account",
                    rule.name()
                ));
                return deny(attempts, reasoning, DenyReason::AmbiguousMapping, None);
            }
        }
        attempts.push(attempt);
    }
    let Some((rule, account)) = strong.or(weak) else {
        return deny(attempts, reasoning, DenyReason::NoMapping, None);
    };
    if let (Some((_, s)), Some((weak_rule, w))) = (strong, weak) {
        if s.dn != w.dn {
            reasoning.push(format!(
                "rule {} points at another account ({}); the strong mapping wins",
                weak_rule.name(),
                w.dn
            ));
        }
    }

    // A SID in the certificate must be the account's (KDC event 41), whatever the mode.
    let mut claimed: Vec<String> = facts.sids.iter().map(|s| s.to_ascii_uppercase()).collect();
    claimed.dedup();
    let sid_verified = match claimed.as_slice() {
        [] => false,
        [sid] => {
            let account_sid = account.object_sid.as_deref().and_then(sid_to_text);
            if account_sid
                .as_deref()
                .map(str::to_ascii_uppercase)
                .as_deref()
                != Some(sid.as_str())
            {
                reasoning.push(format!(
                    "certificate SID {sid} differs from the account's objectSid {} (KDC event 41)",
                    account_sid.as_deref().unwrap_or("(none)")
                ));
                return deny(
                    attempts,
                    reasoning,
                    DenyReason::SidMismatch,
                    Some(account.clone()),
                );
            }
            reasoning.push(format!(
                "certificate SID {sid} matches the account's objectSid"
            ));
            true
        }
        _ => {
            reasoning.push(format!(
                "certificate carries conflicting SIDs: {}",
                claimed.join(", ")
            ));
            return deny(
                attempts,
                reasoning,
                DenyReason::SidMismatch,
                Some(account.clone()),
            );
        }
    };
    let strength = if rule.strength() == MappingStrength::Strong || sid_verified {
        MappingStrength::Strong
    } else {
        MappingStrength::Weak
    };
    if strength == MappingStrength::Weak {
        match enforcement {
            Enforcement::Full => {
                reasoning.push(format!(
                    "rule {} is weak and no certificate SID confirms it; full enforcement refuses (KDC event 39)",
                    rule.name()
                ));
                return deny(
                    attempts,
                    reasoning,
                    DenyReason::NoStrongMapping,
                    Some(account.clone()),
                );
            }
            Enforcement::Compatibility => {
                let created = account
                    .when_created
                    .as_deref()
                    .and_then(generalized_time_unix);
                match created {
                    Some(created) if created <= facts.not_before_unix => reasoning.push(format!(
                        "weak mapping admitted in compatibility mode: the account (created {}) predates the certificate",
                        account.when_created.as_deref().unwrap_or("")
                    )),
                    _ => {
                        reasoning.push(format!(
                            "weak mapping, and the account's whenCreated ({}) is not before the certificate's notBefore (KDC event 40)",
                            account.when_created.as_deref().unwrap_or("absent")
                        ));
                        return deny(
                            attempts,
                            reasoning,
                            DenyReason::CertificatePredatesAccount,
                            Some(account.clone()),
                        );
                    }
                }
            }
        }
    } else if !sid_verified {
        reasoning.push(format!("rule {} is a strong mapping", rule.name()));
    }
    MappingVerdict {
        attempts,
        reasoning,
        outcome: Ok(Mapped {
            rule,
            account: account.clone(),
            strength,
            sid_verified,
        }),
    }
}

/// `YYYYMMDDHHMMSS[.f]Z` (LDAP GeneralizedTime, UTC) → Unix seconds.
pub fn generalized_time_unix(text: &str) -> Option<i64> {
    let digits = text.get(..14)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !text.ends_with('Z') {
        return None;
    }
    let n = |range: std::ops::Range<usize>| digits[range].parse::<i64>().ok();
    unix_from_civil(
        n(0..4)?,
        n(4..6)?,
        n(6..8)?,
        n(8..10)?,
        n(10..12)?,
        n(12..14)?,
    )
}

/// A UTC date and time (proleptic Gregorian) → Unix seconds; `None` when a field is out of
/// range. Leap seconds (60) are accepted as the next second.
pub fn unix_from_civil(
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
) -> Option<i64> {
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::pki::{CertAuthority, LeafSpec};

    fn facts(spec: LeafSpec) -> CertFacts {
        let ca = CertAuthority::new("Unit", "Unit CA").unwrap();
        CertFacts::from_der(&ca.issue(&spec).unwrap().der).unwrap()
    }

    fn config(rules: &[MappingRule]) -> MappingConfig {
        MappingConfig {
            rules: rules.to_vec(),
            enforcement: Enforcement::Full,
            many_to_one: vec![],
        }
    }

    fn account(dn: &str, classes: &[&str]) -> AccountEntry {
        AccountEntry {
            dn: dn.into(),
            object_classes: classes.iter().map(|c| c.to_string()).collect(),
            user_principal_name: Some("a@corp.test".into()),
            dns_host_name: Some("pc1.corp.test".into()),
            object_sid: crate::identity::sid_from_text("S-1-5-21-1-2-3-500"),
            ..AccountEntry::default()
        }
    }

    #[test]
    fn conflicting_certificate_sids_refuse() {
        let f = facts(
            LeafSpec::device("a")
                .upn("a@corp.test")
                .sid_extension("S-1-5-21-1-2-3-500")
                .sid_uri("S-1-5-21-1-2-3-501"),
        );
        let plan = MappingPlan::new(&f, &config(&[MappingRule::Upn]));
        let entries = [account("CN=a", &["user"])];
        let verdict = decide(&f, &plan, &entries, Enforcement::Compatibility);
        assert_eq!(verdict.outcome.unwrap_err().0, DenyReason::SidMismatch);
    }

    #[test]
    fn the_dns_rule_maps_computers_only() {
        let mut spec = LeafSpec::device("pc1");
        spec.dns_names.push("pc1.corp.test".into());
        let f = facts(spec);
        let plan = MappingPlan::new(&f, &config(&[MappingRule::Dns]));
        assert!(plan.lookup.user.is_empty());
        assert_eq!(plan.lookup.computer.len(), 1);
        let user = [account("CN=u", &["user"])];
        let verdict = decide(&f, &plan, &user, Enforcement::Compatibility);
        assert_eq!(verdict.outcome.unwrap_err().0, DenyReason::NoMapping);
        let mut computer = account("CN=pc1", &["user", "computer"]);
        computer.when_created = Some("20000101000000.0Z".into());
        let verdict = decide(&f, &plan, &[computer], Enforcement::Compatibility);
        assert_eq!(verdict.outcome.unwrap().account.dn, "CN=pc1");
    }

    #[test]
    fn a_full_search_is_ambiguous() {
        let f = facts(LeafSpec::device("a").upn("a@corp.test"));
        let plan = MappingPlan::new(&f, &config(&[MappingRule::Upn]));
        let entries: Vec<_> = (0..SEARCH_LIMIT)
            .map(|i| account(&format!("CN={i}"), &["user"]))
            .collect();
        let verdict = decide(&f, &plan, &entries, Enforcement::Compatibility);
        assert_eq!(verdict.outcome.unwrap_err().0, DenyReason::AmbiguousMapping);
    }

    #[test]
    fn globs() {
        assert!(glob_match("kiosk-*", "Kiosk-017"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c", "abc"));
        assert!(glob_match("*.corp.*", "pc1.corp.test"));
        assert!(!glob_match("kiosk-*", "admin"));
        assert!(!glob_match("a?c", "ac"));
    }

    #[test]
    fn generalized_times() {
        assert_eq!(generalized_time_unix("19700101000000.0Z"), Some(0));
        assert_eq!(
            generalized_time_unix("20240229120000.0Z"),
            Some(1_709_208_000)
        );
        assert_eq!(generalized_time_unix("20241301000000.0Z"), None);
        assert_eq!(generalized_time_unix("2024"), None);
    }
}
