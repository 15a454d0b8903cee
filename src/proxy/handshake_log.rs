//! One log record per refused handshake, so an administrator can tell which device was
//! refused and why, rate-limited so that a scanner or a phone retrying in a loop cannot
//! flood the log: at most one record per certificate (or, without one, per source address)
//! per `WINDOW`, the next one saying how many were left out meanwhile.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::identity::CertFingerprint;
use crate::tls::RefusedHandshake;

/// One record per key at most this often.
const WINDOW: Duration = Duration::from_secs(60);
/// Keys remembered at most; past it the memory starts over (a few records too many).
const MAX_KEYS: usize = 10_000;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Certificate(CertFingerprint),
    Source(IpAddr),
}

/// The rate limit of the refused-handshake records.
#[derive(Default)]
pub struct HandshakeLog {
    keys: Mutex<HashMap<Key, (Instant, u64)>>,
}

impl HandshakeLog {
    /// Logs one refused handshake, unless its key had a record within `WINDOW`.
    pub fn refused(&self, peer: SocketAddr, error: &std::io::Error) {
        let refusal = RefusedHandshake::of(error);
        let certificate = refusal.and_then(|r| r.certificate.as_ref());
        let key = match certificate.and_then(|c| c.fingerprint) {
            Some(fingerprint) => Key::Certificate(fingerprint),
            None => Key::Source(super::caps::address_key(peer.ip())),
        };
        let Some(suppressed) = self.admit(key, Instant::now()) else {
            return;
        };
        let c = certificate.cloned().unwrap_or_default();
        tracing::info!(
            target: "seg::tls",
            %peer,
            reason = RefusedHandshake::reason_of(error),
            sni = refusal.and_then(|r| r.sni.as_deref()).unwrap_or(""),
            error = %error,
            subject = c.subject,
            issuer = c.issuer,
            serial = c.serial,
            not_before = c.not_before,
            not_after = c.not_after,
            suppressed,
            "handshake refused"
        );
    }

    /// How many records of `key` were left out since its last one, if one is due now.
    fn admit(&self, key: Key, now: Instant) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.len() >= MAX_KEYS && !keys.contains_key(&key) {
            keys.retain(|_, (last, _)| now.duration_since(*last) < WINDOW);
            if keys.len() >= MAX_KEYS {
                keys.clear();
            }
        }
        match keys.get_mut(&key) {
            Some((last, suppressed)) if now.duration_since(*last) < WINDOW => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                keys.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_record_per_key_per_window_with_the_count_left_out() {
        let log = HandshakeLog::default();
        let start = Instant::now();
        let scanner = Key::Source("192.0.2.1".parse().unwrap());
        let phone = Key::Certificate(CertFingerprint::of(b"leaf"));
        assert_eq!(log.admit(scanner, start), Some(0));
        assert_eq!(log.admit(phone, start), Some(0), "keys are apart");
        for _ in 0..5 {
            assert_eq!(log.admit(scanner, start + Duration::from_secs(1)), None);
        }
        assert_eq!(log.admit(scanner, start + WINDOW), Some(5));
        assert_eq!(log.admit(scanner, start + WINDOW), None);
    }
}
