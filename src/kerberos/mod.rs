//! Kerberos constrained delegation toward the upstream (`identity.mode = "kerberos"`).
//!
//! The gateway holds its own credential from a keytab. For each admitted account it
//! impersonates `sAMAccountName@REALM` (S4U2Self) and delegates to the one target SPN
//! (S4U2Proxy); every forwarded request then carries a fresh SPNEGO token in
//! `Authorization: Negotiate`. The impersonated credential is cached per account (moka),
//! renewed in the background before its ticket ends, and concurrent first requests for one
//! account make one exchange. KDC work is bounded like directory work: a few exchanges at
//! once, a bounded queue, 503 past it. The KDC's refusals become 403 with a reason code
//! chosen by Kerberos error code; a KDC that cannot answer becomes 503. GSSAPI is blocking C:
//! every call runs on tokio's blocking pool, never on an async worker. The library is opened
//! at run time (`gss`), when a configuration first asks for Kerberos.

mod gss;

/// Opens MIT's GSSAPI library for `identity.mode = "kerberos"` (once per process); the error
/// names the library and the package that installs it.
pub fn load_library() -> Result<(), String> {
    gss::load()
}

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::HeaderValue;

use crate::config::KerberosConfig;
use crate::directory::AccountEntry;
use crate::identity::DenyReason;
use crate::limiter::WorkLimiter;
use crate::metrics::Metrics;

/// `userAccountControl` NOT_DELEGATED: "account is sensitive and cannot be delegated".
pub const UAC_NOT_DELEGATED: u32 = 0x0010_0000;

/// Kerberos error codes (MIT `krb5.h`, `KRB5KDC_ERR_*` = -1765328384 + the RFC 4120 code),
/// as GSSAPI returns them in the minor status.
mod code {
    const BASE: i32 = -1_765_328_384;
    /// 1: the client's entry has expired (`accountExpires`).
    pub const NAME_EXP: i32 = BASE + 1;
    /// 6: the client is not in the KDC's database.
    pub const C_PRINCIPAL_UNKNOWN: i32 = BASE + 6;
    /// 7: the server (the target SPN, or the gateway's own) is not in the database.
    pub const S_PRINCIPAL_UNKNOWN: i32 = BASE + 7;
    /// 12: KDC policy rejects the request (Samba: a disabled account; AD: logon hours,
    /// workstation restrictions).
    pub const POLICY: i32 = BASE + 12;
    /// 13: KDC cannot accommodate the requested option (S4U2Proxy to an SPN not in the
    /// delegation list, or for an account that cannot be delegated).
    pub const BADOPTION: i32 = BASE + 13;
    /// 14: no key of a supported encryption type (an RC4-only keytab, say).
    pub const ETYPE_NOSUPP: i32 = BASE + 14;
    /// 18: the client's credentials have been revoked (AD: disabled or locked out).
    pub const CLIENT_REVOKED: i32 = BASE + 18;
    /// 23: the password has expired.
    pub const KEY_EXP: i32 = BASE + 23;
    /// 24: pre-authentication failed (the keytab's key is not the account's: rotated?).
    pub const PREAUTH_FAILED: i32 = BASE + 24;
    /// 37: clock skew too great.
    pub const SKEW: i32 = BASE + 37;
    pub const REALM_UNKNOWN: i32 = -1_765_328_230;
    /// Cannot contact any KDC for the realm.
    pub const KDC_UNREACH: i32 = -1_765_328_228;
    pub const KT_NOTFOUND: i32 = -1_765_328_203;
    pub const KT_END: i32 = -1_765_328_202;
    pub const FCC_NOFILE: i32 = -1_765_328_189;
    pub const REALM_CANT_RESOLVE: i32 = -1_765_328_164;
    pub const KT_KVNONOTFOUND: i32 = -1_765_328_154;
}

/// Audit codes for a delegation that cannot be made now (503 + `Retry-After`).
pub const KDC_UNAVAILABLE: &str = "kdc-unavailable";
pub const KDC_CLOCK_SKEW: &str = "kdc-clock-skew";
pub const KDC_OVERLOADED: &str = "kdc-overloaded";
pub const KDC_TIMEOUT: &str = "kdc-timeout";
/// The gateway's own Kerberos setup is wrong: keytab, its keys, the target SPN.
pub const KERBEROS_MISCONFIGURED: &str = "kerberos-misconfigured";
pub const KERBEROS_FAILED: &str = "kerberos-failed";
/// The upstream answered 401 to a delegated request: a gateway or upstream misconfiguration.
pub const UPSTREAM_AUTH_FAILED: &str = "upstream-auth-failed";

/// Why no `Authorization` header could be made for an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelegationError {
    /// The KDC refused the account: 403.
    Denied(DenyReason),
    /// The KDC cannot answer now, or the gateway's setup is broken: 503 + `Retry-After`.
    Unavailable(&'static str),
}

/// The decision a Kerberos error code stands for. `not_delegated` is the account's
/// NOT_DELEGATED bit from the directory: the KDC answers `BADOPTION` both for such an account
/// and for an SPN missing from the gateway's delegation list.
pub fn classify(minor: i32, not_delegated: bool) -> DelegationError {
    use DelegationError::{Denied, Unavailable};
    match minor {
        code::NAME_EXP => Denied(DenyReason::KdcAccountExpired),
        code::CLIENT_REVOKED => Denied(DenyReason::KdcAccountDisabled),
        code::POLICY => Denied(DenyReason::KdcPolicy),
        code::KEY_EXP => Denied(DenyReason::KdcPasswordExpired),
        code::C_PRINCIPAL_UNKNOWN => Denied(DenyReason::KdcPrincipalUnknown),
        code::BADOPTION if not_delegated => Denied(DenyReason::AccountNotDelegable),
        code::BADOPTION => Denied(DenyReason::DelegationNotAllowed),
        code::SKEW => Unavailable(KDC_CLOCK_SKEW),
        code::KDC_UNREACH | code::REALM_UNKNOWN | code::REALM_CANT_RESOLVE => {
            Unavailable(KDC_UNAVAILABLE)
        }
        code::S_PRINCIPAL_UNKNOWN
        | code::ETYPE_NOSUPP
        | code::PREAUTH_FAILED
        | code::KT_NOTFOUND
        | code::KT_END
        | code::KT_KVNONOTFOUND
        | code::FCC_NOFILE => Unavailable(KERBEROS_MISCONFIGURED),
        _ => Unavailable(KERBEROS_FAILED),
    }
}

/// What a forwarded request carries: the header and the key of the account's own upstream
/// connection pool.
pub struct Authorization {
    pub header: HeaderValue,
    pub principal: Arc<str>,
}

/// The delegation service of one configuration; carried over by reloads that keep its
/// settings, so the cached credentials survive.
pub struct Delegation {
    config: KerberosConfig,
    /// `target_spn@realm`.
    target: String,
    /// The gateway's credential, acquired on first use; dropped after a setup error so a
    /// repaired keytab is read again.
    gateway: Mutex<Option<gss::GatewayCredential>>,
    credentials: moka::future::Cache<Arc<str>, Cached>,
    limiter: WorkLimiter,
    /// Whether the KDC answered the last exchange or probe.
    kdc_up: AtomicBool,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
enum Cached {
    Ready(Arc<Ready>),
    Refused {
        reason: DenyReason,
        expires_at: Instant,
    },
}

struct Ready {
    credential: gss::UserCredential,
    /// From here on the next request starts a background renewal.
    refresh_at: Instant,
    /// Never served past this (its ticket ends a margin later).
    expires_at: Instant,
    refreshing: AtomicBool,
}

/// Kept between a ticket's end and the last moment its credential is served: room for the
/// request to reach the upstream and for clocks that differ a little.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// After a failed background renewal, how long before the next one may start.
const REFRESH_RETRY_DELAY: Duration = Duration::from_secs(10);

impl Delegation {
    pub fn new(config: &KerberosConfig, metrics: Arc<Metrics>) -> Delegation {
        Delegation {
            target: format!("{}@{}", config.target_spn, config.realm),
            gateway: Mutex::new(None),
            credentials: moka::future::Cache::builder()
                .max_capacity(config.max_credentials)
                .expire_after(CachedExpiry)
                .build(),
            limiter: WorkLimiter::new(config.max_concurrent_exchanges, config.max_queued_exchanges),
            kdc_up: AtomicBool::new(true),
            metrics,
            config: config.clone(),
        }
    }

    /// The settings this service was built from.
    pub fn config(&self) -> &KerberosConfig {
        &self.config
    }

    /// `Authorization: Negotiate …` for one request as `account`.
    pub async fn authorize(
        self: &Arc<Self>,
        account: &AccountEntry,
    ) -> Result<Authorization, DelegationError> {
        let principal: Arc<str> = self.principal_of(account)?.into();
        let cached = match self.credentials.get(&principal).await {
            Some(cached) => {
                self.count_cache("hit");
                cached
            }
            None => self.first_exchange(&principal, account).await?,
        };
        let ready = match cached {
            Cached::Ready(ready) => ready,
            Cached::Refused { reason, .. } => return Err(DelegationError::Denied(reason)),
        };
        if Instant::now() >= ready.refresh_at && !ready.refreshing.swap(true, Ordering::AcqRel) {
            self.refresh_in_background(Arc::clone(&principal), account, Arc::clone(&ready));
        }
        tracing::debug!(target: "seg::kerberos", %principal, "making a token");
        let credential = ready.credential.clone();
        let target = self.target.clone();
        let token = tokio::task::spawn_blocking(move || gss::token(&credential, &target))
            .await
            .map_err(|_| DelegationError::Unavailable(KERBEROS_FAILED))?;
        match token {
            Ok(token) => Ok(Authorization {
                header: negotiate_header(&token)?,
                principal,
            }),
            Err(failure) => {
                // A cached credential whose service ticket had to be fetched again.
                let error = classify(failure.minor, not_delegated(account));
                tracing::warn!(target: "seg::kerberos", %principal, error = %failure, "token from a cached credential failed");
                if matches!(error, DelegationError::Denied(_)) {
                    self.credentials.invalidate(&principal).await;
                }
                Err(error)
            }
        }
    }

    /// Checks the KDC, the keytab and the target SPN with an exchange of the gateway's own;
    /// keeps the answer for `/readyz`.
    pub async fn probe(&self) -> Result<(), String> {
        let keytab = self.config.keytab.clone();
        let principal = self.config.principal.clone();
        let target = self.target.clone();
        let result = tokio::task::spawn_blocking(move || gss::probe(&keytab, &principal, &target))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|f| f.to_string()));
        self.kdc_up.store(result.is_ok(), Ordering::Release);
        result
    }

    /// Whether the KDC answered the last exchange or probe.
    pub fn kdc_up(&self) -> bool {
        self.kdc_up.load(Ordering::Acquire)
    }

    /// `sAMAccountName@REALM`, or why the account cannot be impersonated.
    fn principal_of(&self, account: &AccountEntry) -> Result<String, DelegationError> {
        let sam = account
            .sam_account_name
            .as_deref()
            .ok_or(DelegationError::Denied(DenyReason::IdentityMissing))?;
        if sam.is_empty() || sam.contains(['@', '/', '\\']) || sam.chars().any(char::is_control) {
            return Err(DelegationError::Denied(DenyReason::IdentityUnrepresentable));
        }
        Ok(format!("{sam}@{}", self.config.realm))
    }

    /// The coalesced, bounded first exchange for an account not in the cache.
    async fn first_exchange(
        self: &Arc<Self>,
        principal: &Arc<str>,
        account: &AccountEntry,
    ) -> Result<Cached, DelegationError> {
        let not_delegated = not_delegated(account);
        // The exchange runs in a task of its own that keeps its permit until the GSSAPI call
        // returns: a blocking call cannot be cancelled, and MIT waits about 25 s per attempt
        // for a KDC that accepts TCP and never answers. Were the permit dropped with the
        // caller at exchange_timeout, every first request during a KDC hang would leave one
        // more blocked thread behind (threads without bound, all queued on the gateway
        // credential, delaying recovery by minutes). A request that gave up while queued
        // starts no exchange.
        let this = Arc::clone(self);
        let user = Arc::clone(principal);
        let deadline = Instant::now() + self.config.exchange_timeout;
        let work = async move {
            tokio::spawn(async move {
                let _permit = this
                    .limiter
                    .acquire()
                    .await
                    .ok_or(DelegationError::Unavailable(KDC_OVERLOADED))?;
                if Instant::now() >= deadline {
                    return Err(DelegationError::Unavailable(KDC_TIMEOUT));
                }
                this.exchange(user, not_delegated).await
            })
            .await
            .map_err(|_| DelegationError::Unavailable(KERBEROS_FAILED))?
        };
        let entry = tokio::time::timeout(
            self.config.exchange_timeout,
            self.credentials
                .entry(Arc::clone(principal))
                .or_try_insert_with(work),
        )
        .await;
        let entry = match entry {
            Err(_) => {
                self.count_outcome(KDC_TIMEOUT);
                return Err(DelegationError::Unavailable(KDC_TIMEOUT));
            }
            Ok(Err(e)) => return Err(*e),
            Ok(Ok(entry)) => entry,
        };
        self.count_cache(if entry.is_fresh() {
            "miss"
        } else {
            "coalesced"
        });
        Ok(entry.into_value())
    }

    /// S4U2Self then S4U2Proxy for one account, on a blocking thread. A refusal is a value
    /// (cached for `denial_ttl`); only "cannot answer now" is an error (never cached).
    async fn exchange(
        self: &Arc<Self>,
        principal: Arc<str>,
        not_delegated: bool,
    ) -> Result<Cached, DelegationError> {
        let this = Arc::clone(self);
        let user = Arc::clone(&principal);
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let gateway = this.gateway_credential()?;
            let credential = gss::impersonate(&gateway, &user)?;
            gss::delegate(&credential, &this.target)?;
            let lifetime = gss::lifetime(&credential)?;
            Ok::<_, gss::GssFailure>((credential, lifetime))
        })
        .await
        .map_err(|_| DelegationError::Unavailable(KERBEROS_FAILED))?;
        self.metrics
            .kerberos
            .exchange_duration
            .observe(started.elapsed().as_secs_f64());
        let now = Instant::now();
        match result {
            Ok((credential, lifetime)) => {
                tracing::debug!(target: "seg::kerberos", %principal, ?lifetime, "delegated");
                self.kdc_up.store(true, Ordering::Release);
                self.count_outcome("delegated");
                let usable = lifetime.saturating_sub(EXPIRY_MARGIN);
                let refresh_in = if usable > self.config.refresh_before {
                    usable - self.config.refresh_before
                } else {
                    usable / 2
                };
                Ok(Cached::Ready(Arc::new(Ready {
                    credential,
                    refresh_at: now + refresh_in,
                    expires_at: now + usable,
                    refreshing: AtomicBool::new(false),
                })))
            }
            Err(failure) => {
                let decision = classify(failure.minor, not_delegated);
                match decision {
                    DelegationError::Denied(reason) => {
                        self.kdc_up.store(true, Ordering::Release);
                        self.count_outcome(reason.code());
                        tracing::info!(target: "seg::kerberos", %principal, reason = reason.code(), error = %failure, "KDC refused delegation");
                        Ok(Cached::Refused {
                            reason,
                            expires_at: now + self.config.denial_ttl,
                        })
                    }
                    DelegationError::Unavailable(code) => {
                        self.count_outcome(code);
                        if code == KERBEROS_MISCONFIGURED {
                            *self.gateway.lock().unwrap_or_else(|e| e.into_inner()) = None;
                            tracing::error!(target: "seg::kerberos", %principal, reason = code, error = %failure, "Kerberos delegation failed: check the keytab, the gateway principal and the target SPN");
                        } else {
                            if code != KERBEROS_FAILED {
                                self.kdc_up.store(false, Ordering::Release);
                            }
                            tracing::warn!(target: "seg::kerberos", %principal, reason = code, error = %failure, "KDC could not answer");
                        }
                        Err(decision)
                    }
                }
            }
        }
    }

    /// The gateway's credential (acquired once; no KDC contact until it is used).
    fn gateway_credential(&self) -> Result<gss::GatewayCredential, gss::GssFailure> {
        static STORES: AtomicUsize = AtomicUsize::new(0);
        let mut slot = self.gateway.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(gateway) = slot.as_ref() {
            return Ok(gateway.clone());
        }
        let ccache = format!(
            "MEMORY:seg-gateway-{}-{}",
            std::process::id(),
            STORES.fetch_add(1, Ordering::Relaxed)
        );
        let gateway = gss::acquire_gateway(&self.config.keytab, &self.config.principal, &ccache)?;
        *slot = Some(gateway.clone());
        Ok(gateway)
    }

    /// Renews a credential while the old one keeps serving; a refusal replaces it at once.
    fn refresh_in_background(
        self: &Arc<Self>,
        principal: Arc<str>,
        account: &AccountEntry,
        old: Arc<Ready>,
    ) {
        let this = Arc::clone(self);
        let not_delegated = not_delegated(account);
        tokio::spawn(async move {
            let result = match this.limiter.try_acquire() {
                Some(_permit) => this.exchange(Arc::clone(&principal), not_delegated).await,
                None => Err(DelegationError::Unavailable(KDC_OVERLOADED)),
            };
            match result {
                Ok(fresh) => {
                    this.count_cache("refreshed");
                    this.credentials.insert(principal, fresh).await;
                }
                Err(_) => {
                    tokio::time::sleep(REFRESH_RETRY_DELAY).await;
                    old.refreshing.store(false, Ordering::Release);
                }
            }
        });
    }

    fn count_cache(&self, result: &str) {
        self.metrics
            .kerberos
            .credential_cache
            .with_label_values(&[result])
            .inc();
    }

    fn count_outcome(&self, outcome: &str) {
        self.metrics
            .kerberos
            .exchanges
            .with_label_values(&[outcome])
            .inc();
    }
}

fn not_delegated(account: &AccountEntry) -> bool {
    account.user_account_control & UAC_NOT_DELEGATED != 0
}

fn negotiate_header(token: &[u8]) -> Result<HeaderValue, DelegationError> {
    let text = format!(
        "Negotiate {}",
        base64::engine::general_purpose::STANDARD.encode(token)
    );
    HeaderValue::from_str(&text).map_err(|_| DelegationError::Unavailable(KERBEROS_FAILED))
}

struct CachedExpiry;

impl moka::Expiry<Arc<str>, Cached> for CachedExpiry {
    fn expire_after_create(
        &self,
        _key: &Arc<str>,
        value: &Cached,
        created_at: Instant,
    ) -> Option<Duration> {
        let until = match value {
            Cached::Ready(ready) => ready.expires_at,
            Cached::Refused { expires_at, .. } => *expires_at,
        };
        Some(until.saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        key: &Arc<str>,
        value: &Cached,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdc_answers_map_to_decisions_by_code() {
        use DelegationError::{Denied, Unavailable};
        let rows: [(i32, bool, DelegationError); 12] = [
            (code::NAME_EXP, false, Denied(DenyReason::KdcAccountExpired)),
            (
                code::CLIENT_REVOKED,
                false,
                Denied(DenyReason::KdcAccountDisabled),
            ),
            (code::POLICY, false, Denied(DenyReason::KdcPolicy)),
            (code::KEY_EXP, false, Denied(DenyReason::KdcPasswordExpired)),
            (
                code::BADOPTION,
                true,
                Denied(DenyReason::AccountNotDelegable),
            ),
            (
                code::BADOPTION,
                false,
                Denied(DenyReason::DelegationNotAllowed),
            ),
            (code::SKEW, false, Unavailable(KDC_CLOCK_SKEW)),
            (code::KDC_UNREACH, false, Unavailable(KDC_UNAVAILABLE)),
            (
                code::S_PRINCIPAL_UNKNOWN,
                false,
                Unavailable(KERBEROS_MISCONFIGURED),
            ),
            (
                code::PREAUTH_FAILED,
                false,
                Unavailable(KERBEROS_MISCONFIGURED),
            ),
            (
                code::KT_NOTFOUND,
                false,
                Unavailable(KERBEROS_MISCONFIGURED),
            ),
            (12345, false, Unavailable(KERBEROS_FAILED)),
        ];
        for (minor, not_delegated, expected) in rows {
            assert_eq!(classify(minor, not_delegated), expected, "minor {minor}");
        }
        // The table's codes are MIT's (krb5.h).
        assert_eq!(code::BADOPTION, -1_765_328_371);
        assert_eq!(code::SKEW, -1_765_328_347);
    }
}
