//! TLS session resumption with a bound: tickets shared by replicas, so a device resumes on
//! whichever replica the balancer picks; without shared keys, a random key per process
//! (stateless tickets either way: a fleet of thousands resumes, where a server-side session
//! cache would hold only some); and the TLS 1.2 session-ID cache.
//!
//! rustls checks no session's age on the server side, and resumption skips the certificate
//! check, so seg bounds both forms itself: every ticket seals the time of the full handshake
//! it descends from, every cached session keeps it, and a session older than
//! `tls.session_lifetime` by `Clock` is not resumed (the device does a full handshake, its
//! certificate checked again). The same holds across replicas that share the key file,
//! whatever the age of the key. The certificate's own validity is checked again on every
//! request (`proxy`), so a session within its lifetime never outlives its certificate.
//!
//! The key file (a mounted secret) holds one secret per non-empty line, at least 32 bytes
//! each: the first encrypts, all decrypt, so keys rotate by adding a new first line and
//! later removing the oldest, without a restart (the file is reloaded like any other). The
//! ticket key is derived from each secret *and* a digest of the trust policy (client CA
//! bundle, CRL depth and unknown-status setting): a configuration that trusts differently
//! can never resume the sessions of the old one. Revocation needs no such separation: every
//! request is checked against the CRLs in force.

use std::cell::Cell;
use std::fmt;
use std::path::Path;

use std::sync::Arc;
use std::time::Duration;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::StoresServerSessions;

use crate::certs::TlsError;
use crate::clock::Clock;
use crate::config::TlsConfig;

/// How far in the future a sealed issue time may lie: replicas' clocks disagree a little.
const MAX_CLOCK_SKEW_SECS: i64 = 300;
/// Bound to every ticket, so a ticket of another format or purpose never opens.
const TICKET_AAD: &[u8] = b"seg session ticket v2";
/// TLS 1.2 sessions kept by ID (rustls's default size): only clients without ticket support
/// use them.
const SESSION_CACHE_SIZE: usize = 256;

thread_local! {
    /// Within `with_session_origin` only (`Some`): the first time of the session that the
    /// handshake being processed on this thread resumed, if it resumed one.
    static ORIGIN: Cell<Option<Option<i64>>> = const { Cell::new(None) };
}

/// Runs `process` (rustls processing one flight of a handshake) so that the tickets it
/// issues carry the time of the session's first full handshake, not the time of this
/// resumption: a TLS 1.3 resumption (and a TLS 1.2 one) issues new tickets, which would
/// otherwise start the lifetime afresh and let a device that keeps resuming never show its
/// certificate chain again. `origin` is the connection's own, kept across its flights: the
/// oldest time a ticket of this handshake decrypted to, reset by the caller when the
/// handshake turns out to be a full one. rustls calls the ticketer synchronously within
/// `process`, on this thread, so the value cannot cross to another connection.
pub fn with_session_origin<R>(origin: &mut Option<i64>, process: impl FnOnce() -> R) -> R {
    ORIGIN.with(|o| o.set(Some(*origin)));
    let result = process();
    *origin = ORIGIN.with(|o| o.replace(None)).flatten();
    result
}

/// When a session was first established, and for how long it may be resumed.
#[derive(Debug, Clone)]
struct SessionAge {
    clock: Clock,
    lifetime_secs: i64,
}

impl SessionAge {
    fn new(clock: Clock, lifetime: Duration) -> SessionAge {
        SessionAge {
            clock,
            lifetime_secs: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
        }
    }

    /// `value` behind the time it was established (`established`, else now), as 8
    /// big-endian bytes.
    fn stamp(&self, value: &[u8], established: Option<i64>) -> Vec<u8> {
        let time = established.unwrap_or_else(|| self.clock.now_unix());
        let mut stamped = Vec::with_capacity(8 + value.len());
        stamped.extend_from_slice(&time.to_be_bytes());
        stamped.extend_from_slice(value);
        stamped
    }

    /// The value of a stamped session still within its lifetime, and when it was established.
    fn fresh(&self, stamped: &[u8]) -> Option<(Vec<u8>, i64)> {
        let (established, value) = stamped.split_first_chunk::<8>()?;
        let established = i64::from_be_bytes(*established);
        let age = self.clock.now_unix().checked_sub(established)?;
        (-MAX_CLOCK_SKEW_SECS..=self.lifetime_secs)
            .contains(&age)
            .then(|| (value.to_vec(), established))
    }
}

/// Session tickets sealed with ChaCha20-Poly1305 under keys derived from the shared secrets,
/// each holding the time of its session's full handshake.
pub struct SharedTicketer {
    keys: Vec<LessSafeKey>,
    random: SystemRandom,
    age: SessionAge,
}

impl fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedTicketer({} keys)", self.keys.len())
    }
}

impl SharedTicketer {
    /// Reads the key file and binds the keys to this configuration's trust policy.
    pub fn from_config(
        path: &Path,
        tls: &TlsConfig,
        clock: &Clock,
    ) -> Result<SharedTicketer, TlsError> {
        let error = |message: String| TlsError {
            key: "tls.session_ticket_key_file",
            message,
        };
        let secrets = crate::secrets::read_secret_lines(path).map_err(error)?;
        let policy = trust_policy_digest(tls)?;
        let keys = secrets
            .iter()
            .map(|secret| derive_key(secret, &policy))
            .collect::<Result<_, _>>()
            .map_err(|_| error("key derivation failed".into()))?;
        Ok(SharedTicketer {
            keys,
            random: SystemRandom::new(),
            age: SessionAge::new(clock.clone(), tls.session_lifetime),
        })
    }
}

impl SharedTicketer {
    /// Without a key file: one random secret for the life of the process (never written
    /// anywhere), bound to the trust policy like shared keys. Devices resume on this replica
    /// across reloads that keep the trust policy; a restart starts over.
    pub fn process_local(tls: &TlsConfig, clock: &Clock) -> Result<SharedTicketer, TlsError> {
        static SECRET: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let secret = SECRET.get_or_init(|| {
            let mut secret = [0u8; 32];
            SystemRandom::new()
                .fill(&mut secret)
                .expect("the system's random source");
            secret
        });
        let policy = trust_policy_digest(tls)?;
        let key = derive_key(secret, &policy).map_err(|_| TlsError {
            key: "tls",
            message: "session ticket key derivation failed".into(),
        })?;
        Ok(SharedTicketer {
            keys: vec![key],
            random: SystemRandom::new(),
            age: SessionAge::new(clock.clone(), tls.session_lifetime),
        })
    }
}

/// TLS 1.2 sessions cached by ID, each resumed only within `tls.session_lifetime` of its
/// full handshake.
#[derive(Debug)]
pub struct BoundedSessionCache {
    sessions: Arc<dyn StoresServerSessions>,
    age: SessionAge,
}

impl BoundedSessionCache {
    pub fn new(tls: &TlsConfig, clock: &Clock) -> BoundedSessionCache {
        BoundedSessionCache {
            sessions: rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE_SIZE),
            age: SessionAge::new(clock.clone(), tls.session_lifetime),
        }
    }
}

impl StoresServerSessions for BoundedSessionCache {
    /// rustls caches a session only after a full handshake: stamped now.
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.sessions.put(key, self.age.stamp(&value, None))
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.age
            .fresh(&self.sessions.get(key)?)
            .map(|(value, _)| value)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.age
            .fresh(&self.sessions.take(key)?)
            .map(|(value, _)| value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// SHA-256 over what decides which certificates are trusted.
fn trust_policy_digest(tls: &TlsConfig) -> Result<Vec<u8>, TlsError> {
    let ca = std::fs::read(&tls.client_ca).map_err(|e| TlsError {
        key: "tls.client_ca",
        message: format!("cannot read {}: {e}", tls.client_ca.display()),
    })?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(b"seg trust policy v1\0");
    context.update(&ca);
    context.update(&[
        tls.crl_check_chain as u8,
        tls.danger_allow_unknown_revocation_status as u8,
    ]);
    context.update(&[!tls.crl_files.is_empty() as u8]);
    Ok(context.finish().as_ref().to_vec())
}

fn derive_key(secret: &[u8], policy: &[u8]) -> Result<LessSafeKey, ring::error::Unspecified> {
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"seg session tickets v1");
    let info = [policy];
    let prk = salt.extract(secret);
    let okm = prk.expand(&info, &CHACHA20_POLY1305)?;
    Ok(LessSafeKey::new(UnboundKey::from(okm)))
}

impl rustls::server::ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    /// The hint to the device; the bound itself is enforced in `decrypt`.
    fn lifetime(&self) -> u32 {
        u32::try_from(self.age.lifetime_secs).unwrap_or(u32::MAX)
    }

    /// Seals `plain` behind the time of its session's full handshake: now, or on a
    /// resumption the time the resuming ticket carried (`with_session_origin`).
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let origin = ORIGIN.with(Cell::get).flatten();
        let mut sealed = self.age.stamp(plain, origin);
        self.keys
            .first()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(TICKET_AAD),
                &mut sealed,
            )
            .ok()?;
        let mut ticket = nonce.to_vec();
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (nonce, sealed) = cipher.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().ok()?;
        let stamped = self.keys.iter().find_map(|key| {
            let mut buffer = sealed.to_vec();
            let plain = key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(TICKET_AAD),
                    &mut buffer,
                )
                .ok()?;
            Some(plain.to_vec())
        })?;
        let (plain, established) = self.age.fresh(&stamped)?;
        // The oldest, should rustls try several tickets of one handshake.
        ORIGIN.with(|o| {
            if let Some(origin) = o.get() {
                o.set(Some(Some(
                    origin.map_or(established, |t| t.min(established)),
                )));
            }
        });
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn tls(dir: &Path, ca: &[u8]) -> TlsConfig {
        let client_ca = dir.join(format!("ca-{}.pem", ca.len()));
        std::fs::write(&client_ca, ca).unwrap();
        TlsConfig {
            certificate: dir.join("unused"),
            private_key: dir.join("unused"),
            client_ca,
            crl_files: vec![],
            crl_check_chain: false,
            danger_allow_unknown_revocation_status: false,
            self_test_certificate: None,
            session_ticket_key_file: None,
            session_lifetime: std::time::Duration::from_secs(6 * 3600),
        }
    }

    #[test]
    fn replicas_share_tickets_and_trust_policies_do_not() {
        let dir = std::env::temp_dir().join(format!("seg-tickets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = "k".repeat(32);
        let new = "n".repeat(40);
        let keys = dir.join("keys");
        let clock = Clock::system();
        std::fs::write(&keys, format!("{old}\n")).unwrap();
        let a = SharedTicketer::from_config(&keys, &tls(&dir, b"CA one"), &clock).unwrap();
        let b = SharedTicketer::from_config(&keys, &tls(&dir, b"CA one"), &clock).unwrap();
        let ticket = a.encrypt(b"session").unwrap();
        assert_eq!(
            b.decrypt(&ticket).as_deref(),
            Some(&b"session"[..]),
            "another replica resumes"
        );
        // Rotation: a new first key encrypts, the old one still decrypts.
        std::fs::write(&keys, format!("{new}\n{old}\n")).unwrap();
        let rotated = SharedTicketer::from_config(&keys, &tls(&dir, b"CA one"), &clock).unwrap();
        assert_eq!(rotated.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        assert!(
            a.decrypt(&rotated.encrypt(b"x").unwrap()).is_none(),
            "the old replica cannot read new tickets"
        );
        // Another trust policy never resumes the old sessions.
        let other =
            SharedTicketer::from_config(&keys, &tls(&dir, b"CA two, longer"), &clock).unwrap();
        assert!(other.decrypt(&ticket).is_none());
        // Tampering and garbage fail.
        let mut bad = ticket.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(b.decrypt(&bad).is_none());
        assert!(b.decrypt(&[1, 2, 3]).is_none());
        // Short keys are refused.
        std::fs::write(&keys, "short\n").unwrap();
        assert!(SharedTicketer::from_config(&keys, &tls(&dir, b"CA one"), &clock).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tickets_and_cached_sessions_resume_only_within_their_lifetime() {
        let dir = std::env::temp_dir().join(format!("seg-ticket-age-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = dir.join("keys");
        std::fs::write(&keys, format!("{}\n", "k".repeat(32))).unwrap();
        let config = TlsConfig {
            session_lifetime: Duration::from_secs(3600),
            ..tls(&dir, b"CA one")
        };
        let clock = Clock::adjustable();
        // A replica whose clock runs 4 minutes ahead still resumes (clock skew).
        let behind = Clock::adjustable();
        let shared = SharedTicketer::from_config(&keys, &config, &clock).unwrap();
        let local = SharedTicketer::process_local(&config, &clock).unwrap();
        let cache = BoundedSessionCache::new(&config, &clock);
        assert_eq!(shared.lifetime(), 3600, "the hint is the bound");
        let shared_ticket = shared.encrypt(b"session").unwrap();
        let local_ticket = local.encrypt(b"session").unwrap();
        assert!(cache.put(b"id".to_vec(), b"session".to_vec()));
        let ahead = SharedTicketer::from_config(&keys, &config, &behind).unwrap();
        behind.advance(Duration::from_secs(4 * 60));
        let from_the_future = ahead.encrypt(b"early").unwrap();
        assert_eq!(
            shared.decrypt(&from_the_future).as_deref(),
            Some(&b"early"[..])
        );
        clock.advance(Duration::from_secs(3599));
        assert_eq!(
            shared.decrypt(&shared_ticket).as_deref(),
            Some(&b"session"[..])
        );
        assert_eq!(
            local.decrypt(&local_ticket).as_deref(),
            Some(&b"session"[..])
        );
        assert_eq!(cache.get(b"id").as_deref(), Some(&b"session"[..]));
        clock.advance(Duration::from_secs(2));
        assert!(
            shared.decrypt(&shared_ticket).is_none(),
            "past the lifetime"
        );
        assert!(local.decrypt(&local_ticket).is_none());
        assert!(cache.get(b"id").is_none());
        assert!(cache.take(b"id").is_none());
        // A ticket issued on a resumption keeps its session's first time.
        let clock = Clock::adjustable();
        let shared = SharedTicketer::from_config(&keys, &config, &clock).unwrap();
        let first = shared.encrypt(b"full").unwrap();
        clock.advance(Duration::from_secs(3000));
        let mut origin = None;
        let renewed = with_session_origin(&mut origin, || {
            assert!(shared.decrypt(&first).is_some());
            shared.encrypt(b"renewed").unwrap()
        });
        assert!(
            origin.is_some(),
            "the connection keeps the resumed ticket's time"
        );
        let fresh_after_full = with_session_origin(&mut None, || shared.encrypt(b"x").unwrap());
        clock.advance(Duration::from_secs(700));
        assert!(
            shared.decrypt(&renewed).is_none(),
            "renewed, still 3700 s old"
        );
        assert!(
            shared.decrypt(&fresh_after_full).is_some(),
            "a full handshake's: 700 s"
        );
        // A ticket sealed with a far-future time (a replica's clock gone wrong) is refused.
        let skewed = Clock::adjustable();
        skewed.advance(Duration::from_secs(3 * 3600));
        let wrong = SharedTicketer::from_config(&keys, &config, &skewed).unwrap();
        let far = wrong.encrypt(b"x").unwrap();
        assert!(shared.decrypt(&far).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
