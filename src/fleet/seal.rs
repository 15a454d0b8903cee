//! Sealed entries: what a replica writes to the store, so the store can lose, delay or replay
//! an entry within its validity, but never make one up or move one to another key.
//!
//! An entry is `version (1) | key id (8) | valid until (8, Unix seconds, big-endian) | nonce
//! (12) | ChaCha20-Poly1305 ciphertext and tag`. The associated data binds the entry to its
//! key name (a certificate's entry cannot be copied under another certificate's key) and to
//! its validity (which cannot be stretched). Keys come from the fleet's key file: each secret
//! gives a key through HKDF-SHA256 and an 8-byte id (a digest of the secret), the first seals,
//! any opens, so a rotation never makes the entries of the old key unreadable before they end.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 8;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + 8 + NONCE_LEN;
/// Bound to every entry, so nothing sealed for another purpose opens as an entry.
const CONTEXT: &[u8] = b"seg fleet entry v1\0";

/// Why an entry was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// Not an entry of this format, sealed under no key of the file, moved from another key
    /// name, or altered: the store (or whoever writes to it) cannot be trusted with it.
    Rejected,
    /// Authentic, but its validity has ended.
    Expired,
}

/// The fleet's keys, from its key file.
pub struct Keys {
    keys: Vec<([u8; KEY_ID_LEN], LessSafeKey)>,
    random: SystemRandom,
}

impl Keys {
    /// Keys from the secrets of a key file, first line first.
    pub fn from_secrets(secrets: &[Vec<u8>]) -> Keys {
        let keys = secrets
            .iter()
            .map(|secret| {
                let digest = ring::digest::digest(
                    &ring::digest::SHA256,
                    &[b"seg fleet key id\0".as_slice(), secret].concat(),
                );
                let mut id = [0u8; KEY_ID_LEN];
                id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
                (id, derive(secret))
            })
            .collect();
        Keys {
            keys,
            random: SystemRandom::new(),
        }
    }

    /// `plaintext` sealed under the first key for `name`, valid until `valid_until`.
    pub fn seal(&self, name: &str, valid_until: i64, plaintext: &[u8]) -> Vec<u8> {
        let (id, key) = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system's random source");
        let mut entry = Vec::with_capacity(HEADER_LEN + plaintext.len() + 16);
        entry.push(VERSION);
        entry.extend_from_slice(id);
        entry.extend_from_slice(&valid_until.to_be_bytes());
        entry.extend_from_slice(&nonce);
        let mut sealed = plaintext.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(associated(name, valid_until)),
            &mut sealed,
        )
        .expect("ChaCha20-Poly1305 seals any length seg writes");
        entry.extend_from_slice(&sealed);
        entry
    }

    /// The plaintext of the entry stored under `name`, if it is authentic and valid at `now`.
    pub fn open(&self, name: &str, entry: &[u8], now: i64) -> Result<Vec<u8>, OpenError> {
        if entry.len() < HEADER_LEN || entry[0] != VERSION {
            return Err(OpenError::Rejected);
        }
        let id = &entry[1..1 + KEY_ID_LEN];
        let valid_until = i64::from_be_bytes(
            entry[1 + KEY_ID_LEN..1 + KEY_ID_LEN + 8]
                .try_into()
                .expect("eight bytes"),
        );
        let nonce: [u8; NONCE_LEN] = entry[HEADER_LEN - NONCE_LEN..HEADER_LEN]
            .try_into()
            .expect("a nonce's length");
        let (_, key) = self
            .keys
            .iter()
            .find(|(kid, _)| kid == id)
            .ok_or(OpenError::Rejected)?;
        let mut sealed = entry[HEADER_LEN..].to_vec();
        let plaintext = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated(name, valid_until)),
                &mut sealed,
            )
            .map_err(|_| OpenError::Rejected)?;
        if now >= valid_until {
            return Err(OpenError::Expired);
        }
        Ok(plaintext.to_vec())
    }
}

fn associated(name: &str, valid_until: i64) -> Vec<u8> {
    [
        CONTEXT,
        name.as_bytes(),
        b"\0",
        valid_until.to_be_bytes().as_slice(),
    ]
    .concat()
}

fn derive(secret: &[u8]) -> LessSafeKey {
    struct Len;
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            CHACHA20_POLY1305.key_len()
        }
    }
    let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"seg fleet entries v1");
    let mut bytes = [0u8; 32];
    salt.extract(secret)
        .expand(&[b"entry key"], Len)
        .and_then(|okm| okm.fill(&mut bytes))
        .expect("HKDF output of one key's length");
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &bytes).expect("a 32-byte key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secrets: &[&[u8]]) -> Keys {
        Keys::from_secrets(&secrets.iter().map(|s| s.to_vec()).collect::<Vec<_>>())
    }

    const OLD: &[u8] = b"0123456789abcdef0123456789abcdef-old";
    const NEW: &[u8] = b"0123456789abcdef0123456789abcdef-new";

    #[test]
    fn an_entry_opens_only_under_its_name_and_within_its_validity() {
        let keys = keys(&[OLD]);
        let entry = keys.seal("seg:id:alice", 1_000, b"alice's decision");
        assert_eq!(
            keys.open("seg:id:alice", &entry, 999).unwrap(),
            b"alice's decision"
        );
        // Moved to another certificate's key.
        assert_eq!(
            keys.open("seg:id:mallory", &entry, 999),
            Err(OpenError::Rejected)
        );
        // Past its validity.
        assert_eq!(
            keys.open("seg:id:alice", &entry, 1_000),
            Err(OpenError::Expired)
        );
        // Its validity stretched by whoever holds the store.
        let mut stretched = entry.clone();
        stretched[1 + KEY_ID_LEN..1 + KEY_ID_LEN + 8].copy_from_slice(&5_000i64.to_be_bytes());
        assert_eq!(
            keys.open("seg:id:alice", &stretched, 2_000),
            Err(OpenError::Rejected)
        );
        // Any bit of the sealed part flipped, or the entry cut.
        for at in [HEADER_LEN, entry.len() - 1] {
            let mut altered = entry.clone();
            altered[at] ^= 1;
            assert_eq!(
                keys.open("seg:id:alice", &altered, 999),
                Err(OpenError::Rejected)
            );
        }
        assert_eq!(
            keys.open("seg:id:alice", &entry[..HEADER_LEN - 1], 999),
            Err(OpenError::Rejected)
        );
        assert_eq!(
            keys.open("seg:id:alice", b"", 999),
            Err(OpenError::Rejected)
        );
    }

    #[test]
    fn rotation_keeps_old_entries_readable_and_seals_with_the_first_key() {
        let before = keys(&[OLD]);
        let during = keys(&[NEW, OLD]);
        let after = keys(&[NEW]);
        let old_entry = before.seal("k", 100, b"old");
        let new_entry = during.seal("k", 100, b"new");
        assert_eq!(during.open("k", &old_entry, 1).unwrap(), b"old");
        assert_eq!(after.open("k", &new_entry, 1).unwrap(), b"new");
        assert_eq!(before.open("k", &new_entry, 1), Err(OpenError::Rejected));
        assert_eq!(after.open("k", &old_entry, 1), Err(OpenError::Rejected));
        // A fresh nonce each time: the same plaintext never seals to the same bytes.
        assert_ne!(during.seal("k", 100, b"x"), during.seal("k", 100, b"x"));
    }
}
