//! Certificate → decision, cached: the performance-critical core.
//!
//! Keyed by the SHA-256 of the leaf certificate. A hit costs one cache read. A miss parses the
//! certificate once, tries the mapping rules in order against the directory, checks the
//! account and caches the decision: admissions until the hard TTL (refreshed in the background
//! after the soft TTL, served stale while the directory is down), real denials for the short
//! negative TTL, directory failures never. Concurrent misses for one certificate make one
//! lookup, and one global bound with a bounded queue limits directory work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntCounter;

use crate::config::{AccountPolicyConfig, CacheConfig, Enforcement, IdentityConfig, MappingConfig};
use crate::directory::{AccountEntry, Directory, DirectoryError};
use crate::fleet::{Fetched, Fleet, Lock, LockGuard};
use crate::identity::snapshot::{SharedEntry, Snapshot, SnapshotEntry};
use crate::identity::{
    check_account, decide, header_value, AccountCheck, CertFacts, CertFingerprint, DenyReason,
    Identity, MappingPlan, MappingRule, MappingStrength, RuleAttempt,
};
use crate::limiter::WorkLimiter;
use crate::metrics::Metrics;

/// What the gateway does with a device.
#[derive(Debug, Clone)]
pub enum Decision {
    Admit(Arc<Identity>),
    Deny(Arc<Denial>),
}

/// A real denial: the certificate is fine, the account is not (or there is none).
#[derive(Debug)]
pub struct Denial {
    pub reason: DenyReason,
    /// DN of the account found, if one was.
    pub account: Option<String>,
    pub cert_serial: String,
    pub cert_issuer: String,
    /// The certificate's subject, for the device registry (a refusal without an account).
    pub cert_subject: String,
}

/// Why no decision could be made now. Never cached.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error("directory work queue is full")]
    Overloaded,
    #[error("identity lookup took longer than {0:?}")]
    Timeout(Duration),
}

impl ResolveError {
    /// The audit reason code.
    pub fn code(&self) -> &'static str {
        match self {
            ResolveError::Directory(_) => "directory-unavailable",
            ResolveError::Overloaded => "directory-overloaded",
            ResolveError::Timeout(_) => "directory-timeout",
        }
    }
}

/// Everything a resolution looked at, for `seg map --explain`.
#[derive(Debug, Default, serde::Serialize)]
pub struct Trace {
    pub facts: Option<CertFacts>,
    pub enforcement: Option<Enforcement>,
    /// The one LDAP filter sent; absent when no rule applied.
    pub filter: Option<String>,
    pub rules: Vec<RuleAttempt>,
    /// How strength and enforcement were judged.
    pub reasoning: Vec<String>,
    pub account: Option<AccountEntry>,
    pub checks: Vec<AccountCheck>,
}

/// The cached identity resolver.
pub struct Resolver {
    cache: moka::future::Cache<CertFingerprint, CachedDecision>,
    /// Swapped by a reload that brings new directory files (bind password, CA), cache kept.
    directory: std::sync::RwLock<Arc<Directory>>,
    mapping: MappingConfig,
    account_policy: AccountPolicyConfig,
    identity: IdentityConfig,
    soft_ttl: Duration,
    hard_ttl: Duration,
    negative_ttl: Duration,
    lookup_timeout: Duration,
    /// Whether entries keep their certificate for `cache.snapshot_file`.
    snapshotted: bool,
    limiter: WorkLimiter,
    metrics: Arc<Metrics>,
    /// `seg_identity_cache_total` by result, looked up once: a hit is counted on every request.
    counted: CacheCounters,
    /// The fleet store: a second cache level shared by the replicas (`[fleet]`).
    fleet: Option<Arc<Fleet>>,
    /// Digest of the settings a decision depends on: names the snapshot and the shared
    /// entries, so none made under other settings is ever read.
    settings: String,
}

struct CacheCounters {
    hit: IntCounter,
    stale: IntCounter,
    miss: IntCounter,
    coalesced: IntCounter,
    shared: IntCounter,
}

/// What the fleet store had for a certificate.
enum Shared {
    Adopted(CachedDecision),
    Missing,
    StoreDown,
}

/// How soon a replica waiting for another's directory search first looks for its answer;
/// the wait doubles up to `MAX_SHARED_POLL`.
const SHARED_POLL: Duration = Duration::from_millis(10);
const MAX_SHARED_POLL: Duration = Duration::from_millis(160);
/// How far ahead of this replica's clock a shared answer may be dated.
const MAX_CLOCK_SKEW_SECS: i64 = 300;

/// The decision one connection reuses between its requests while it is fresh, so the cache
/// is asked once per connection and soft TTL instead of once per request. A cache read is
/// not free: besides the hash lookup, every 64th read makes the reading request run the
/// cache's upkeep (moka's pending tasks), tens of microseconds in the tail of that request.
/// Reuse ends where the cache's own answer would change: at the soft TTL for an admission
/// (then the cache serves it stale and refreshes it), at the entry's end for a denial.
#[derive(Default)]
pub struct Remembered(std::sync::Mutex<Option<(Decision, Instant)>>);

impl Remembered {
    fn fresh(&self) -> Option<Decision> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*kept {
            Some((decision, until)) if Instant::now() < *until => Some(decision.clone()),
            _ => None,
        }
    }

    fn keep(&self, decision: &Decision, until: Option<Instant>) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *kept = until.map(|until| (decision.clone(), until));
    }
}

#[derive(Clone)]
struct CachedDecision {
    decision: Decision,
    /// When the directory last answered for it; the soft TTL counts from here.
    resolved_at: Instant,
    /// How long it may be served from when it was cached: `cache.hard_ttl` for an admission
    /// (less for one restored from a snapshot, whose age counts), `negative_ttl` for a denial.
    lifetime: Duration,
    /// What a background refresh maps again; absent for an unreadable certificate.
    facts: Option<Arc<CertFacts>>,
    refreshing: Arc<AtomicBool>,
    /// When the directory gave this answer (here or on another replica), Unix seconds.
    resolved_unix: i64,
    /// The certificate, kept only when the cache is written to a snapshot.
    leaf: Option<Arc<[u8]>>,
    /// Read from the fleet store rather than from the directory.
    shared: bool,
}

impl CachedDecision {
    /// Until when the cache answers with this decision as it is: an admission until its soft
    /// TTL (then it is served stale while refreshed), a denial until it expires.
    fn fresh_until(&self, soft_ttl: Duration) -> Instant {
        match self.decision {
            Decision::Admit(_) => self.resolved_at + soft_ttl.min(self.lifetime),
            Decision::Deny(_) => self.resolved_at + self.lifetime,
        }
    }
}

/// How long a failed background refresh waits before the next one may start.
const REFRESH_RETRY_DELAY: Duration = Duration::from_secs(10);

impl Resolver {
    pub fn new(
        directory: Arc<Directory>,
        mapping: &MappingConfig,
        account_policy: &AccountPolicyConfig,
        identity: &IdentityConfig,
        cache: &CacheConfig,
        metrics: Arc<Metrics>,
        fleet: Option<Arc<Fleet>>,
    ) -> Resolver {
        let cache_store = moka::future::Cache::builder()
            .max_capacity(cache.max_entries)
            .expire_after(DecisionExpiry)
            .build();
        let settings = {
            let text = format!("{mapping:?}{account_policy:?}{identity:?}");
            let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            CertFingerprint::of(digest.as_ref()).hex()
        };
        Resolver {
            fleet,
            settings,
            cache: cache_store,
            directory: std::sync::RwLock::new(directory),
            mapping: mapping.clone(),
            account_policy: account_policy.clone(),
            identity: identity.clone(),
            soft_ttl: cache.soft_ttl,
            hard_ttl: cache.hard_ttl,
            negative_ttl: cache.negative_ttl,
            lookup_timeout: cache.lookup_timeout,
            snapshotted: cache.snapshot_file.is_some(),
            limiter: WorkLimiter::new(cache.max_concurrent_lookups, cache.max_queued_lookups),
            counted: CacheCounters {
                hit: metrics.identity_cache.with_label_values(&["hit"]),
                stale: metrics.identity_cache.with_label_values(&["stale"]),
                miss: metrics.identity_cache.with_label_values(&["miss"]),
                coalesced: metrics.identity_cache.with_label_values(&["coalesced"]),
                shared: metrics.identity_cache.with_label_values(&["shared"]),
            },
            metrics,
        }
    }

    /// The decision for a leaf certificate, from the cache when possible.
    pub async fn resolve(
        self: &Arc<Self>,
        fingerprint: CertFingerprint,
        leaf_der: &[u8],
    ) -> Result<Decision, ResolveError> {
        self.resolve_cached(fingerprint, leaf_der)
            .await
            .map(|(decision, _)| decision)
    }

    /// The same for a connection's requests: the decision `remembered` holds while it is
    /// fresh, else the cache's, remembered for the next request.
    pub async fn resolve_remembering(
        self: &Arc<Self>,
        fingerprint: CertFingerprint,
        leaf_der: &[u8],
        remembered: &Remembered,
    ) -> Result<Decision, ResolveError> {
        if let Some(decision) = remembered.fresh() {
            self.counted.hit.inc();
            return Ok(decision);
        }
        let (decision, fresh_until) = self.resolve_cached(fingerprint, leaf_der).await?;
        remembered.keep(&decision, fresh_until);
        Ok(decision)
    }

    /// The decision, and until when the cache would give the same answer without asking the
    /// directory (`None`: it is being refreshed now).
    async fn resolve_cached(
        self: &Arc<Self>,
        fingerprint: CertFingerprint,
        leaf_der: &[u8],
    ) -> Result<(Decision, Option<Instant>), ResolveError> {
        if let Some(cached) = self.cache.get(&fingerprint).await {
            let admitted = matches!(cached.decision, Decision::Admit(_));
            if admitted && cached.resolved_at.elapsed() >= self.soft_ttl {
                self.counted.stale.inc();
                self.refresh_in_background(fingerprint, &cached);
                return Ok((cached.decision, None));
            }
            self.counted.hit.inc();
            let fresh_until = cached.fresh_until(self.soft_ttl);
            return Ok((cached.decision, Some(fresh_until)));
        }
        // Boxed: the directory lookup's state is several KiB, and every connection's request
        // future would otherwise reserve room for it even when the cache answers.
        let entry = Box::pin(
            self.cache
                .entry(fingerprint)
                .or_try_insert_with(self.lookup_bounded(fingerprint, leaf_der)),
        )
        .await
        .map_err(|e| (*e).clone())?;
        let fresh = entry.is_fresh();
        let cached = entry.into_value();
        match (fresh, cached.shared) {
            (true, false) => self.counted.miss.inc(),
            (true, true) => self.counted.shared.inc(),
            (false, _) => self.counted.coalesced.inc(),
        }
        let fresh_until = cached.fresh_until(self.soft_ttl);
        Ok((cached.decision, Some(fresh_until)))
    }

    /// Resolves without the cache and records every step: `seg map`.
    pub async fn explain(&self, leaf_der: &[u8]) -> (Result<Decision, ResolveError>, Trace) {
        let mut trace = Trace::default();
        let facts = match CertFacts::from_der(leaf_der) {
            Ok(f) => f,
            Err(_) => {
                let denial = Denial {
                    reason: DenyReason::CertificateUnreadable,
                    account: None,
                    cert_serial: String::new(),
                    cert_issuer: String::new(),
                    cert_subject: String::new(),
                };
                return (Ok(Decision::Deny(Arc::new(denial))), trace);
            }
        };
        let result = self.decide(&facts, &mut trace).await;
        trace.facts = Some(facts);
        (result, trace)
    }

    /// Points the resolver at a rebuilt directory; cached decisions stay.
    pub fn set_directory(&self, directory: Arc<Directory>) {
        *self.directory.write().unwrap_or_else(|e| e.into_inner()) = directory;
    }

    fn directory(&self) -> Arc<Directory> {
        Arc::clone(&self.directory.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Digest of the settings a cached decision depends on: a snapshot written under other
    /// settings is not restored.
    fn settings_digest(&self) -> String {
        self.settings.clone()
    }

    /// The admitted devices in the cache, for `cache.snapshot_file`.
    pub fn snapshot(&self) -> Snapshot {
        let entries = self
            .cache
            .iter()
            .filter_map(|(_, cached)| match (&cached.decision, &cached.leaf) {
                (Decision::Admit(identity), Some(leaf)) => Some(SnapshotEntry::new(
                    leaf,
                    cached.resolved_unix,
                    &identity.account,
                )),
                _ => None,
            })
            .collect();
        Snapshot::new(self.settings_digest(), unix_now(), entries)
    }

    /// Puts a snapshot's devices back in the cache, each judged again by the current rules,
    /// keeping its age, and due for a background refresh at a moment spread over the soft
    /// TTL. Returns how many were restored and how many dropped.
    pub async fn restore(&self, snapshot: Snapshot) -> (usize, usize) {
        if snapshot.settings != self.settings_digest() {
            tracing::warn!(target: "seg::identity", "the identity-cache snapshot was written under other mapping, account or identity settings; starting cold");
            return (0, snapshot.entries.len());
        }
        let now = unix_now();
        let (mut restored, mut dropped) = (0, 0);
        for entry in snapshot.entries {
            let age = now - entry.resolved_unix;
            let remaining = (0..self.hard_ttl.as_secs() as i64)
                .contains(&age)
                .then(|| self.hard_ttl - Duration::from_secs(age as u64));
            let resolved_unix = entry.resolved_unix;
            let judged = remaining.and_then(|lifetime| {
                let (leaf, account) = entry.parts()?;
                Some((self.judge_restored(leaf, account, resolved_unix)?, lifetime))
            });
            let Some(((fingerprint, mut cached), lifetime)) = judged else {
                dropped += 1;
                continue;
            };
            // Due for refresh at a random moment within the soft TTL from now.
            let due_in = self.soft_ttl.mul_f64(crate::clock::random_fraction());
            cached.resolved_at = Instant::now()
                .checked_sub(self.soft_ttl - due_in)
                .unwrap_or_else(Instant::now);
            cached.lifetime = lifetime;
            cached.resolved_unix = resolved_unix;
            self.cache.insert(fingerprint, cached).await;
            restored += 1;
        }
        (restored, dropped)
    }

    /// A restored device judged as a lookup would judge the same directory answer (the group
    /// rules excepted: they were met under the same settings when the entry was written).
    fn judge_restored(
        &self,
        leaf: Vec<u8>,
        account: AccountEntry,
        resolved_unix: i64,
    ) -> Option<(CertFingerprint, CachedDecision)> {
        let facts = Arc::new(CertFacts::from_der(&leaf).ok()?);
        let fingerprint = CertFingerprint::of(&leaf);
        let cached = self.judge_known(facts, account, Some(leaf.into()), resolved_unix)?;
        Some((fingerprint, cached))
    }

    /// An account the directory gave for this certificate earlier (here, in a snapshot, or
    /// on another replica) at `resolved_unix`, judged by the current rules; `None` if they
    /// no longer admit it.
    fn judge_known(
        &self,
        facts: Arc<CertFacts>,
        account: AccountEntry,
        leaf: Option<Arc<[u8]>>,
        resolved_unix: i64,
    ) -> Option<CachedDecision> {
        let plan = MappingPlan::new(&facts, &self.mapping);
        let mapped = decide(&facts, &plan, &[account], self.mapping.enforcement)
            .outcome
            .ok()?;
        let (_, failure) = check_account(
            &mapped.account,
            SystemTime::now(),
            self.account_policy.lockout_duration,
        );
        if failure.is_some() {
            return None;
        }
        let header_value = header_value(&mapped.account, &self.identity).ok()?;
        let identity = identity(
            &facts,
            mapped.account,
            mapped.rule,
            mapped.strength,
            header_value,
            resolved_unix,
        );
        Some(self.cached(Decision::Admit(identity), Some(facts), leaf))
    }

    /// Number of cached decisions, once the cache's pending work is done (for the status
    /// page).
    pub async fn cached_entries(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }

    async fn lookup_bounded(
        &self,
        fingerprint: CertFingerprint,
        leaf_der: &[u8],
    ) -> Result<CachedDecision, ResolveError> {
        let facts = match CertFacts::from_der(leaf_der) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                // The handshake accepted it, so this is a real (and lasting) refusal.
                tracing::warn!(target: "seg::identity", error = %e, "accepted certificate is unreadable");
                self.metrics
                    .identity_decisions
                    .with_label_values(&["deny", DenyReason::CertificateUnreadable.code()])
                    .inc();
                let denial = Decision::Deny(Arc::new(Denial {
                    reason: DenyReason::CertificateUnreadable,
                    account: None,
                    cert_serial: String::new(),
                    cert_issuer: String::new(),
                    cert_subject: String::new(),
                }));
                return Ok(self.cached(denial, None, None));
            }
        };
        let leaf = self.snapshotted.then(|| Arc::from(leaf_der));
        match &self.fleet {
            Some(fleet) => self.lookup_shared(fleet, fingerprint, facts, leaf).await,
            None => self.lookup_facts(facts, leaf).await,
        }
    }

    /// A local miss with a fleet store: its entry if another replica made one; else one
    /// replica searches the directory for the certificate (the one holding the lock) while
    /// the others wait for its entry, and searches themselves if none comes within
    /// `fleet.lock_wait` or the store does not answer.
    async fn lookup_shared(
        &self,
        fleet: &Arc<Fleet>,
        fingerprint: CertFingerprint,
        facts: Arc<CertFacts>,
        leaf: Option<Arc<[u8]>>,
    ) -> Result<CachedDecision, ResolveError> {
        let name = self.shared_name(fingerprint);
        let deadline = Instant::now() + fleet.lock_wait();
        let mut poll = SHARED_POLL;
        loop {
            match self.adopt_shared(fleet, &name, &facts, &leaf).await {
                Shared::Adopted(cached) => return Ok(cached),
                Shared::Missing => {}
                // A store that did not answer is not asked for a lock nor given the answer:
                // one budget lost per local miss, not three.
                Shared::StoreDown => return self.lookup_facts(facts, leaf).await,
            }
            match fleet.lock(&name).await {
                Lock::Held if Instant::now() < deadline => {
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(MAX_SHARED_POLL);
                }
                Lock::Acquired(guard) => {
                    return self
                        .lookup_and_share(fleet, name, facts, leaf, Some(guard))
                        .await;
                }
                Lock::Held | Lock::Unavailable => {
                    return self.lookup_and_share(fleet, name, facts, leaf, None).await;
                }
            }
        }
    }

    /// The store's key name for a certificate's decision under these settings.
    fn shared_name(&self, fingerprint: CertFingerprint) -> String {
        format!("id:{}:{}", &self.settings[..16], fingerprint.hex())
    }

    /// Searches the directory and puts the decision in the store for the other replicas, off
    /// the request's path (the lock, if held, is given back after the write).
    async fn lookup_and_share(
        &self,
        fleet: &Arc<Fleet>,
        name: String,
        facts: Arc<CertFacts>,
        leaf: Option<Arc<[u8]>>,
        lock: Option<LockGuard>,
    ) -> Result<CachedDecision, ResolveError> {
        let cached = self.lookup_facts(facts, leaf).await?;
        if let Some((plaintext, valid_until)) = self.shared_entry(&cached) {
            let fleet = Arc::clone(fleet);
            tokio::spawn(async move {
                fleet.set(&name, &plaintext, valid_until).await;
                drop(lock);
            });
        }
        Ok(cached)
    }

    /// A decision as the store keeps it, and until when: an admission for the soft TTL (a
    /// replica reading it later asks the directory itself), a denial for the negative TTL.
    fn shared_entry(&self, cached: &CachedDecision) -> Option<(Vec<u8>, i64)> {
        let entry = match &cached.decision {
            Decision::Admit(identity) => {
                SharedEntry::admitted(cached.resolved_unix, &identity.account)
            }
            Decision::Deny(denial) => SharedEntry::denied(
                cached.resolved_unix,
                denial.reason.code(),
                denial.account.as_deref(),
            ),
        };
        let plaintext = serde_json::to_vec(&entry).ok()?;
        let valid_for = match cached.decision {
            Decision::Admit(_) => self.soft_ttl.min(cached.lifetime),
            Decision::Deny(_) => cached.lifetime,
        };
        Some((plaintext, cached.resolved_unix + valid_for.as_secs() as i64))
    }

    /// The decision another replica stored for this certificate, judged here again as a
    /// lookup would judge the same directory answer; its age counts against the TTLs.
    async fn adopt_shared(
        &self,
        fleet: &Fleet,
        name: &str,
        facts: &Arc<CertFacts>,
        leaf: &Option<Arc<[u8]>>,
    ) -> Shared {
        let plaintext = match fleet.get(name).await {
            Fetched::Found(plaintext) => plaintext,
            Fetched::Missing => return Shared::Missing,
            Fetched::Unavailable => return Shared::StoreDown,
        };
        match self.judge_shared(&plaintext, facts, leaf) {
            Some(cached) => Shared::Adopted(cached),
            None => Shared::Missing,
        }
    }

    /// A shared entry's decision for this certificate, if it still holds here.
    fn judge_shared(
        &self,
        plaintext: &[u8],
        facts: &Arc<CertFacts>,
        leaf: &Option<Arc<[u8]>>,
    ) -> Option<CachedDecision> {
        let entry: SharedEntry = serde_json::from_slice(plaintext).ok()?;
        // Replicas' clocks differ a little; an answer from further ahead is refused.
        let age = unix_now() - entry.resolved_unix;
        if age < -MAX_CLOCK_SKEW_SECS {
            return None;
        }
        let age = Duration::from_secs(u64::try_from(age).unwrap_or(0));
        let (mut cached, lifetime) = match &entry.denied {
            Some(code) => {
                let denial = Decision::Deny(Arc::new(Denial {
                    reason: DenyReason::from_directory_code(code)?,
                    account: entry.denied_account.clone(),
                    cert_serial: facts.serial_hex(),
                    cert_issuer: facts.issuer.clone(),
                    cert_subject: facts.subject.clone(),
                }));
                let cached = self.cached(denial, Some(Arc::clone(facts)), None);
                (cached, self.negative_ttl.checked_sub(age)?)
            }
            None => {
                // Past the soft TTL a replica alone would ask the directory: so does this
                // one, whatever the store holds (a replayed old admission included).
                if age >= self.soft_ttl {
                    return None;
                }
                let account = entry.admitted_account()?;
                let cached = self.judge_known(
                    Arc::clone(facts),
                    account,
                    leaf.clone(),
                    entry.resolved_unix,
                )?;
                (cached, self.hard_ttl.checked_sub(age)?)
            }
        };
        if lifetime.is_zero() {
            return None;
        }
        cached.resolved_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        cached.lifetime = lifetime;
        cached.resolved_unix = entry.resolved_unix;
        cached.shared = true;
        Some(cached)
    }

    /// A fresh cache entry; `leaf` is kept for the snapshot.
    fn cached(
        &self,
        decision: Decision,
        facts: Option<Arc<CertFacts>>,
        leaf: Option<Arc<[u8]>>,
    ) -> CachedDecision {
        let lifetime = match decision {
            Decision::Admit(_) => self.hard_ttl,
            Decision::Deny(_) => self.negative_ttl,
        };
        CachedDecision {
            decision,
            resolved_at: Instant::now(),
            lifetime,
            facts,
            refreshing: Arc::new(AtomicBool::new(false)),
            resolved_unix: unix_now(),
            leaf,
            shared: false,
        }
    }

    async fn lookup_facts(
        &self,
        facts: Arc<CertFacts>,
        leaf: Option<Arc<[u8]>>,
    ) -> Result<CachedDecision, ResolveError> {
        let work = async {
            let _permit = self
                .limiter
                .acquire()
                .await
                .ok_or(ResolveError::Overloaded)?;
            self.decide(&facts, &mut Trace::default()).await
        };
        let decision = tokio::time::timeout(self.lookup_timeout, work)
            .await
            .map_err(|_| ResolveError::Timeout(self.lookup_timeout))??;
        Ok(self.cached(decision, Some(facts), leaf))
    }

    fn refresh_in_background(
        self: &Arc<Self>,
        fingerprint: CertFingerprint,
        cached: &CachedDecision,
    ) {
        let (Decision::Admit(_), Some(facts)) = (&cached.decision, &cached.facts) else {
            return;
        };
        if cached.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let resolver = Arc::clone(self);
        let facts = Arc::clone(facts);
        let refreshing = Arc::clone(&cached.refreshing);
        let leaf = cached.leaf.clone();
        let resolved_unix = cached.resolved_unix;
        tokio::spawn(async move {
            let refreshed = match &resolver.fleet {
                Some(fleet) => {
                    resolver
                        .refresh_shared(fleet, fingerprint, facts, leaf, resolved_unix)
                        .await
                }
                None => resolver.lookup_facts(facts, leaf).await,
            };
            match refreshed {
                Ok(fresh) => resolver.cache.insert(fingerprint, fresh).await,
                Err(e) => {
                    tracing::warn!(target: "seg::identity", error = %e, "identity refresh failed; serving the cached decision");
                    tokio::time::sleep(REFRESH_RETRY_DELAY).await;
                    refreshing.store(false, Ordering::Release);
                }
            }
        });
    }

    /// A refresh with a fleet store: another replica's newer answer if there is one, else a
    /// search whose answer is shared.
    async fn refresh_shared(
        &self,
        fleet: &Arc<Fleet>,
        fingerprint: CertFingerprint,
        facts: Arc<CertFacts>,
        leaf: Option<Arc<[u8]>>,
        resolved_unix: i64,
    ) -> Result<CachedDecision, ResolveError> {
        let name = self.shared_name(fingerprint);
        if let Shared::Adopted(newer) = self.adopt_shared(fleet, &name, &facts, &leaf).await {
            if newer.resolved_unix > resolved_unix {
                return Ok(newer);
            }
        }
        self.lookup_and_share(fleet, name, facts, leaf, None).await
    }

    /// One search for every rule's values, the KB5014754 verdict, then the account checks.
    async fn decide(&self, facts: &CertFacts, trace: &mut Trace) -> Result<Decision, ResolveError> {
        let deny = |reason: DenyReason, account: Option<&AccountEntry>| {
            self.metrics
                .identity_decisions
                .with_label_values(&["deny", reason.code()])
                .inc();
            Decision::Deny(Arc::new(Denial {
                reason,
                account: account.map(|a| a.dn.clone()),
                cert_serial: facts.serial_hex(),
                cert_issuer: facts.issuer.clone(),
                cert_subject: facts.subject.clone(),
            }))
        };
        trace.enforcement = Some(self.mapping.enforcement);
        let plan = MappingPlan::new(facts, &self.mapping);
        let entries = if plan.lookup.is_empty() {
            Vec::new()
        } else {
            trace.filter = Some(plan.lookup.filter());
            let started = Instant::now();
            let result = self.directory().search(&plan.lookup).await;
            let label = match &result {
                Ok(_) => "ok",
                Err(e) => e.metric_label(),
            };
            self.metrics
                .directory_searches
                .with_label_values(&[label])
                .inc();
            self.metrics
                .directory_search_duration
                .with_label_values(&[label])
                .observe(started.elapsed().as_secs_f64());
            result?
        };
        let verdict = decide(facts, &plan, &entries, self.mapping.enforcement);
        trace.rules = verdict.attempts;
        trace.reasoning = verdict.reasoning;
        let mapped = match verdict.outcome {
            Ok(mapped) => mapped,
            Err((reason, account)) => {
                trace.account = account.clone();
                return Ok(deny(reason, account.as_ref()));
            }
        };
        let account = mapped.account;
        trace.account = Some(account.clone());
        let (checks, failure) = check_account(
            &account,
            SystemTime::now(),
            self.account_policy.lockout_duration,
        );
        trace.checks = checks;
        if let Some(reason) = failure {
            return Ok(deny(reason, Some(&account)));
        }
        if let Some(reason) = self.check_groups(&account, trace).await? {
            return Ok(deny(reason, Some(&account)));
        }
        let header_value = match header_value(&account, &self.identity) {
            Ok(v) => v,
            Err(reason) => return Ok(deny(reason, Some(&account))),
        };
        self.metrics
            .identity_decisions
            .with_label_values(&["admit", "mapped"])
            .inc();
        Ok(Decision::Admit(identity(
            facts,
            account,
            mapped.rule,
            mapped.strength,
            header_value,
            unix_now(),
        )))
    }

    /// Denied groups first, then required ones; a directory that cannot say is an error.
    async fn check_groups(
        &self,
        account: &AccountEntry,
        trace: &mut Trace,
    ) -> Result<Option<DenyReason>, ResolveError> {
        let method = self.account_policy.group_method;
        let rules = self
            .account_policy
            .denied_groups
            .iter()
            .map(|g| (g, false))
            .chain(
                self.account_policy
                    .required_groups
                    .iter()
                    .map(|g| (g, true)),
            );
        for (group, required) in rules {
            let member = self
                .directory()
                .is_member(account, group, method)
                .await
                .inspect_err(|e| {
                    tracing::error!(target: "seg::identity", group = %group, error = %e, "group membership cannot be evaluated");
                })?;
            let passed = member == required;
            trace.checks.push(AccountCheck {
                check: if required {
                    "in-required-group"
                } else {
                    "not-in-denied-group"
                },
                passed,
                detail: format!(
                    "{group} ({}): {}",
                    method.name(),
                    if member { "member" } else { "not a member" }
                ),
            });
            if !passed {
                return Ok(Some(if required {
                    DenyReason::GroupRequired
                } else {
                    DenyReason::GroupDenied
                }));
            }
        }
        Ok(None)
    }
}

fn identity(
    facts: &CertFacts,
    account: AccountEntry,
    rule: MappingRule,
    strength: MappingStrength,
    header_value: http::HeaderValue,
    decided_unix: i64,
) -> Arc<Identity> {
    Arc::new(Identity {
        decided_unix,
        account,
        rule,
        strength,
        header_value,
        cert_serial: facts.serial_hex(),
        cert_issuer: facts.issuer.clone(),
        revocation_key: (facts.issuer_der.clone(), facts.serial.clone()),
        validity: (facts.not_before_unix, facts.not_after_unix),
    })
}

use crate::clock::unix_now;

/// Each entry lives for its own `lifetime`, counted again when a refresh replaces it.
struct DecisionExpiry;

impl moka::Expiry<CertFingerprint, CachedDecision> for DecisionExpiry {
    fn expire_after_create(
        &self,
        _key: &CertFingerprint,
        value: &CachedDecision,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }

    fn expire_after_update(
        &self,
        key: &CertFingerprint,
        value: &CachedDecision,
        updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}
