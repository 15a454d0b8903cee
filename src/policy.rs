//! What a mapped device may do: the mailbox it asks for must be its own (`User=` binding),
//! its DeviceId, DeviceType and User-Agent must pass the device rules, and it may hold only
//! so many long polls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::activesync::EasRequest;
use crate::config::{ActiveSyncConfig, DeviceRules};
use crate::directory::AccountEntry;
use crate::identity::glob_match;

/// A policy refusal and its stable reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyDenial {
    /// `User=` names a mailbox that is not the certificate's account.
    UserMismatch,
    /// A block rule matched.
    DeviceBlocked,
    /// No allow rule matched and the default action is block.
    DeviceNotAllowed,
}

impl PolicyDenial {
    pub fn code(self) -> &'static str {
        match self {
            PolicyDenial::UserMismatch => "user-mismatch",
            PolicyDenial::DeviceBlocked => "device-blocked",
            PolicyDenial::DeviceNotAllowed => "device-not-allowed",
        }
    }
}

/// Whether `User=` names the account, in any form AD uses: sAMAccountName, `DOMAIN\sam`,
/// UPN, primary SMTP address or another proxy address; case-insensitively as `names_equal`
/// compares. An absent `User` (allowed in the base64 form) is the certificate's account.
pub fn user_matches(
    requested: Option<&str>,
    account: &AccountEntry,
    netbios_domain: Option<&str>,
) -> bool {
    let Some(requested) = requested else {
        return true;
    };
    let eq = names_equal;
    let sam = account.sam_account_name.as_deref();
    if let Some((domain, user)) = requested.split_once('\\') {
        let domain_ok = match netbios_domain {
            Some(d) => eq(domain, d),
            // Without a configured domain name, only the account part can be checked.
            None => !domain.is_empty(),
        };
        return domain_ok && sam.is_some_and(|s| eq(user, s));
    }
    let smtp = account.proxy_addresses.iter().filter_map(|p| {
        p.get(..5)
            .filter(|pre| pre.eq_ignore_ascii_case("smtp:"))
            .map(|_| &p[5..])
    });
    sam.into_iter()
        .chain(account.user_principal_name.as_deref())
        .chain(account.mail.as_deref())
        .chain(smtp)
        .any(|candidate| eq(candidate, requested))
}

/// Two account names, equal as AD compares them, but never by folding a non-ASCII character
/// into an ASCII one: the Kelvin sign `K` lowercases to `k` and `ſ` uppercases to `S`, so a
/// Unicode-folding comparison would let `User=\u{212a}im` pass as `kim` while the upstream,
/// comparing otherwise, reads another name. ASCII letters compare case-insensitively;
/// non-ASCII characters only with non-ASCII ones, by their lowercase forms.
pub fn names_equal(a: &str, b: &str) -> bool {
    let mut left = a.chars();
    let mut right = b.chars();
    loop {
        match (left.next(), right.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if x.is_ascii() && y.is_ascii() => {
                if !x.eq_ignore_ascii_case(&y) {
                    return false;
                }
            }
            (Some(x), Some(y)) if !x.is_ascii() && !y.is_ascii() => {
                let (lx, ly) = (x.to_lowercase(), y.to_lowercase());
                if lx.clone().any(|c| c.is_ascii()) || !lx.eq(ly) {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// The device rules for an account: its override if one exists, else the global rules.
pub fn rules_for<'a>(config: &'a ActiveSyncConfig, account: &AccountEntry) -> &'a DeviceRules {
    let sam = account.sam_account_name.as_deref().unwrap_or("");
    config
        .account_overrides
        .iter()
        .find(|(a, _)| a.eq_ignore_ascii_case(sam))
        .map(|(_, rules)| rules)
        .unwrap_or(&config.devices)
}

/// Block rules first, then allow rules, then the default action. Returns the decision's name
/// for the audit log.
pub fn check_device(
    rules: &DeviceRules,
    request: &EasRequest,
) -> Result<&'static str, PolicyDenial> {
    let any = |patterns: &[String], value: Option<&str>| {
        value.is_some_and(|v| patterns.iter().any(|p| glob_match(p, v)))
    };
    let id = request.device_id.as_deref();
    let kind = request.device_type.as_deref();
    let agent = request.user_agent.as_deref();
    if any(&rules.block_device_ids, id)
        || any(&rules.block_device_types, kind)
        || any(&rules.block_user_agents, agent)
    {
        return Err(PolicyDenial::DeviceBlocked);
    }
    if any(&rules.allow_device_ids, id)
        || any(&rules.allow_device_types, kind)
        || any(&rules.allow_user_agents, agent)
    {
        return Ok("allowed-by-rule");
    }
    if rules.default_allow {
        Ok("allowed-by-default")
    } else {
        Err(PolicyDenial::DeviceNotAllowed)
    }
}

/// Counts of long polls held, per device, per account and in all.
pub struct LongPolls {
    per_device: Mutex<HashMap<(String, String), usize>>,
    per_account: Mutex<HashMap<String, usize>>,
    total: AtomicUsize,
    max_per_device: AtomicUsize,
    max_per_account: AtomicUsize,
    max_total: AtomicUsize,
    gauge: prometheus::IntGauge,
}

/// Which long-poll cap refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongPollCap {
    Device,
    Account,
    Gateway,
}

impl LongPollCap {
    pub fn code(self) -> &'static str {
        match self {
            LongPollCap::Device => "long-poll-cap-device",
            LongPollCap::Account => "long-poll-cap-account",
            LongPollCap::Gateway => "long-poll-cap-gateway",
        }
    }
}

/// One held long poll; released when dropped (the response ended or the device left).
pub struct LongPollGuard {
    polls: Arc<LongPolls>,
    device: (String, String),
    /// The connection's own count of held long polls.
    connection: Arc<AtomicUsize>,
}

impl LongPolls {
    pub fn new(config: &ActiveSyncConfig, gauge: prometheus::IntGauge) -> LongPolls {
        LongPolls {
            per_device: Mutex::new(HashMap::new()),
            per_account: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
            max_per_device: AtomicUsize::new(config.max_long_polls_per_device),
            max_per_account: AtomicUsize::new(config.max_long_polls_per_account),
            max_total: AtomicUsize::new(config.max_long_polls),
            gauge,
        }
    }

    /// New caps from a reloaded configuration; the polls already held keep counting.
    pub fn set_limits(&self, config: &ActiveSyncConfig) {
        self.max_per_device
            .store(config.max_long_polls_per_device, Ordering::Release);
        self.max_per_account
            .store(config.max_long_polls_per_account, Ordering::Release);
        self.max_total
            .store(config.max_long_polls, Ordering::Release);
    }

    /// Takes one slot for this account's device, or says which cap is full.
    pub fn acquire(
        self: &Arc<Self>,
        account: &str,
        device_id: &str,
        connection: &Arc<AtomicUsize>,
    ) -> Result<LongPollGuard, LongPollCap> {
        let key = (account.to_ascii_lowercase(), device_id.to_string());
        let mut devices = self.per_device.lock().unwrap_or_else(|e| e.into_inner());
        let mut accounts = self.per_account.lock().unwrap_or_else(|e| e.into_inner());
        if devices.get(&key).copied().unwrap_or(0) >= self.max_per_device.load(Ordering::Acquire) {
            return Err(LongPollCap::Device);
        }
        if accounts.get(&key.0).copied().unwrap_or(0)
            >= self.max_per_account.load(Ordering::Acquire)
        {
            return Err(LongPollCap::Account);
        }
        if self.total.load(Ordering::Acquire) >= self.max_total.load(Ordering::Acquire) {
            return Err(LongPollCap::Gateway);
        }
        *devices.entry(key.clone()).or_insert(0) += 1;
        *accounts.entry(key.0.clone()).or_insert(0) += 1;
        self.total.fetch_add(1, Ordering::AcqRel);
        self.gauge.inc();
        connection.fetch_add(1, Ordering::AcqRel);
        Ok(LongPollGuard {
            polls: Arc::clone(self),
            device: key,
            connection: Arc::clone(connection),
        })
    }
}

impl Drop for LongPollGuard {
    fn drop(&mut self) {
        let polls = &self.polls;
        let mut devices = polls.per_device.lock().unwrap_or_else(|e| e.into_inner());
        let mut accounts = polls.per_account.lock().unwrap_or_else(|e| e.into_inner());
        decrement(&mut devices, &self.device);
        decrement(&mut accounts, &self.device.0);
        polls.total.fetch_sub(1, Ordering::AcqRel);
        polls.gauge.dec();
        self.connection.fetch_sub(1, Ordering::AcqRel);
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> AccountEntry {
        AccountEntry {
            sam_account_name: Some("alice".into()),
            user_principal_name: Some("alice@corp.test".into()),
            mail: Some("Alice.Example@corp.test".into()),
            proxy_addresses: vec![
                "SMTP:Alice.Example@corp.test".into(),
                "smtp:al@corp.test".into(),
                "X500:/o=x".into(),
            ],
            ..AccountEntry::default()
        }
    }

    #[test]
    fn user_binding_accepts_every_form_of_the_account_and_nothing_else() {
        let a = alice();
        for ok in [
            None,
            Some("alice"),
            Some("ALICE"),
            Some("CORP\\alice"),
            Some("corp\\Alice"),
            Some("alice@corp.test"),
            Some("alice.example@corp.test"),
            Some("al@corp.test"),
        ] {
            assert!(user_matches(ok, &a, Some("CORP")), "{ok:?}");
        }
        for bad in [
            Some("bob"),
            Some("OTHER\\alice"),
            Some("CORP\\bob"),
            Some("alice@evil.test"),
            Some("/o=x"),
            Some(""),
            Some("alic"),
            // Unicode folding never turns a non-ASCII character into the account's ASCII.
            Some("\u{212a}alice"),
            Some("alice@corp.tes\u{1e9b}"),
            Some("\u{17f}mtp"),
        ] {
            assert!(!user_matches(bad, &a, Some("CORP")), "{bad:?}");
        }
        assert!(user_matches(Some("ANY\\alice"), &a, None));
    }

    #[test]
    fn names_compare_without_folding_into_ascii() {
        assert!(names_equal("Kim", "kIM"));
        assert!(!names_equal("\u{212a}im", "kim"), "Kelvin sign");
        assert!(!names_equal("\u{17f}am", "sam"), "long s");
        assert!(!names_equal("i", "\u{130}"), "dotted capital I");
        assert!(names_equal("J\u{fc}rgen", "j\u{dc}RGEN"));
        assert!(!names_equal("J\u{fc}rgen", "Jurgen"));
        assert!(!names_equal("alice", "alic"));
    }

    fn request(id: &str, kind: &str, agent: &str) -> EasRequest {
        let mut headers = http::HeaderMap::new();
        headers.insert("user-agent", agent.parse().unwrap());
        EasRequest::parse(
            Some(&format!("Cmd=Ping&DeviceId={id}&DeviceType={kind}")),
            &headers,
            true,
        )
        .unwrap()
    }

    #[test]
    fn device_rules() {
        let rules = DeviceRules {
            default_allow: false,
            allow_device_types: vec!["iPhone".into(), "Android*".into()],
            block_device_ids: vec!["LOST1".into()],
            block_user_agents: vec!["*Outdated/1.*".into()],
            ..DeviceRules::default()
        };
        assert_eq!(
            check_device(&rules, &request("A1", "iPhone", "Apple/1")),
            Ok("allowed-by-rule")
        );
        assert_eq!(
            check_device(&rules, &request("A1", "AndroidTablet", "x")),
            Ok("allowed-by-rule")
        );
        assert_eq!(
            check_device(&rules, &request("LOST1", "iPhone", "x")),
            Err(PolicyDenial::DeviceBlocked)
        );
        assert_eq!(
            check_device(&rules, &request("A1", "iPhone", "Mail Outdated/1.2")),
            Err(PolicyDenial::DeviceBlocked)
        );
        assert_eq!(
            check_device(&rules, &request("A1", "WindowsPhone", "x")),
            Err(PolicyDenial::DeviceNotAllowed)
        );
    }

    #[test]
    fn long_poll_caps() {
        let config = ActiveSyncConfig {
            bind_user: true,
            devices: DeviceRules::default(),
            account_overrides: vec![],
            max_long_polls_per_device: 2,
            max_long_polls_per_account: 3,
            max_long_polls: 4,
        };
        let gauge = prometheus::IntGauge::new("g", "g").unwrap();
        let polls = Arc::new(LongPolls::new(&config, gauge.clone()));
        let conn = Arc::new(AtomicUsize::new(0));
        let a = polls.acquire("alice", "D1", &conn).unwrap();
        let b = polls.acquire("Alice", "D1", &conn).unwrap();
        assert_eq!(
            polls.acquire("alice", "D1", &conn).err(),
            Some(LongPollCap::Device),
            "the third Ping of one device"
        );
        let c = polls.acquire("alice", "D2", &conn).unwrap();
        assert_eq!(
            polls.acquire("alice", "D3", &conn).err(),
            Some(LongPollCap::Account)
        );
        let d = polls.acquire("bob", "D1", &conn).unwrap();
        assert_eq!(
            polls.acquire("carol", "D1", &conn).err(),
            Some(LongPollCap::Gateway)
        );
        assert_eq!(gauge.get(), 4);
        assert_eq!(conn.load(Ordering::Acquire), 4);
        drop((a, b, c, d));
        assert_eq!(gauge.get(), 0);
        assert_eq!(conn.load(Ordering::Acquire), 0);
        assert!(polls.per_device.lock().unwrap().is_empty());
        assert!(polls.acquire("alice", "D1", &conn).is_ok());
    }
}
