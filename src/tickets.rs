//! TLS session tickets shared by replicas, so a device resumes on whichever replica the
//! balancer picks; without shared keys, a random key per process (stateless tickets either
//! way: a fleet of thousands resumes, where a server-side session cache would hold only some).
//!
//! The key file (a mounted secret) holds one secret per non-empty line, at least 32 bytes
//! each: the first encrypts, all decrypt, so keys rotate by adding a new first line and
//! later removing the oldest, without a restart (the file is reloaded like any other). The
//! ticket key is derived from each secret *and* a digest of the trust policy (client CA
//! bundle, CRL depth and unknown-status setting): a configuration that trusts differently
//! can never resume the sessions of the old one. Revocation needs no such separation: every
//! request is checked against the CRLs in force.

use std::fmt;
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::TlsConfig;
use crate::tls::TlsError;

/// Ticket lifetime hint, in seconds.
const LIFETIME_SECS: u32 = 6 * 3600;
/// Shortest secret accepted.
const MIN_SECRET: usize = 32;

/// Session tickets sealed with ChaCha20-Poly1305 under keys derived from the shared secrets.
pub struct SharedTicketer {
    keys: Vec<LessSafeKey>,
    random: SystemRandom,
}

impl fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedTicketer({} keys)", self.keys.len())
    }
}

impl SharedTicketer {
    /// Reads the key file and binds the keys to this configuration's trust policy.
    pub fn from_config(path: &Path, tls: &TlsConfig) -> Result<SharedTicketer, TlsError> {
        let error = |message: String| TlsError {
            key: "tls.session_ticket_key_file",
            message,
        };
        let text = std::fs::read(path)
            .map_err(|e| error(format!("cannot read {}: {e}", path.display())))?;
        let secrets: Vec<&[u8]> = text
            .split(|b| *b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.is_empty())
            .collect();
        if secrets.is_empty() {
            return Err(error(format!("{} holds no key", path.display())));
        }
        if let Some(n) = secrets.iter().position(|s| s.len() < MIN_SECRET) {
            return Err(error(format!(
                "key {} is shorter than {MIN_SECRET} bytes",
                n + 1
            )));
        }
        let policy = trust_policy_digest(tls)?;
        let keys = secrets
            .iter()
            .map(|secret| derive_key(secret, &policy))
            .collect::<Result<_, _>>()
            .map_err(|_| error("key derivation failed".into()))?;
        Ok(SharedTicketer {
            keys,
            random: SystemRandom::new(),
        })
    }
}

impl SharedTicketer {
    /// Without a key file: one random secret for the life of the process (never written
    /// anywhere), bound to the trust policy like shared keys. Devices resume on this replica
    /// across reloads that keep the trust policy; a restart starts over.
    pub fn process_local(tls: &TlsConfig) -> Result<SharedTicketer, TlsError> {
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
        })
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

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
        self.keys
            .first()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::empty(),
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
        self.keys.iter().find_map(|key| {
            let mut buffer = sealed.to_vec();
            let plain = key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::empty(),
                    &mut buffer,
                )
                .ok()?;
            Some(plain.to_vec())
        })
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
        }
    }

    #[test]
    fn replicas_share_tickets_and_trust_policies_do_not() {
        let dir = std::env::temp_dir().join(format!("seg-tickets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = "k".repeat(32);
        let new = "n".repeat(40);
        let keys = dir.join("keys");
        std::fs::write(&keys, format!("{old}\n")).unwrap();
        let a = SharedTicketer::from_config(&keys, &tls(&dir, b"CA one")).unwrap();
        let b = SharedTicketer::from_config(&keys, &tls(&dir, b"CA one")).unwrap();
        let ticket = a.encrypt(b"session").unwrap();
        assert_eq!(
            b.decrypt(&ticket).as_deref(),
            Some(&b"session"[..]),
            "another replica resumes"
        );
        // Rotation: a new first key encrypts, the old one still decrypts.
        std::fs::write(&keys, format!("{new}\n{old}\n")).unwrap();
        let rotated = SharedTicketer::from_config(&keys, &tls(&dir, b"CA one")).unwrap();
        assert_eq!(rotated.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
        assert!(
            a.decrypt(&rotated.encrypt(b"x").unwrap()).is_none(),
            "the old replica cannot read new tickets"
        );
        // Another trust policy never resumes the old sessions.
        let other = SharedTicketer::from_config(&keys, &tls(&dir, b"CA two, longer")).unwrap();
        assert!(other.decrypt(&ticket).is_none());
        // Tampering and garbage fail.
        let mut bad = ticket.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(b.decrypt(&bad).is_none());
        assert!(b.decrypt(&[1, 2, 3]).is_none());
        // Short keys are refused.
        std::fs::write(&keys, "short\n").unwrap();
        assert!(SharedTicketer::from_config(&keys, &tls(&dir, b"CA one")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
