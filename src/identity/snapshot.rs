//! Warm restart: the identity cache written at shutdown and read at start.
//!
//! Without it, every device that reconnects after a restart is a cache miss, and a fleet of
//! ten thousand phones reconnecting within seconds becomes ten thousand directory searches
//! at once. The snapshot holds, per admitted device, its certificate, the directory's answer
//! (the account entry) and when that answer was given. At start each entry is judged again
//! by the current mapping and account rules (time-based checks such as expiry included),
//! served at once, and re-validated against the directory in the background at a moment
//! spread over `cache.soft_ttl`. Its age counts: an entry older than `cache.hard_ttl` is
//! dropped, so the staleness bound holds across restarts.
//!
//! The file is written with mode 0600 through a temporary file and a rename. It names
//! accounts, so it lives in seg's own state directory; a snapshot written under different
//! mapping, account or identity settings is ignored as a whole.

use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::directory::AccountEntry;

/// The file's format name; another one is ignored.
const FORMAT: &str = "seg-identity-cache/1";

#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    format: String,
    /// Digest of the settings the decisions depend on.
    pub settings: String,
    pub written_unix: i64,
    pub entries: Vec<SnapshotEntry>,
}

/// One admitted device.
#[derive(Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// The leaf certificate, DER in base64.
    pub certificate: String,
    /// When the directory answered, Unix seconds.
    pub resolved_unix: i64,
    pub account: AccountEntry,
    /// objectSid in base64 (`AccountEntry` leaves it out of its JSON form).
    #[serde(default)]
    pub object_sid: Option<String>,
}

/// A decision as the fleet store holds it (sealed by [`crate::fleet`]): the directory's
/// answer for a certificate, not the certificate, which the replica reading it has in hand.
#[derive(Serialize, Deserialize)]
pub struct SharedEntry {
    /// When the directory answered, Unix seconds: the soft and hard TTLs count from here on
    /// every replica.
    pub resolved_unix: i64,
    /// An admission's account as the directory returned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_sid: Option<String>,
    /// A denial's reason code, and the DN of the account it found, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied_account: Option<String>,
}

impl SharedEntry {
    pub fn admitted(resolved_unix: i64, account: &AccountEntry) -> SharedEntry {
        let b64 = base64::engine::general_purpose::STANDARD;
        SharedEntry {
            resolved_unix,
            account: Some(account.clone()),
            object_sid: account.object_sid.as_ref().map(|sid| b64.encode(sid)),
            denied: None,
            denied_account: None,
        }
    }

    pub fn denied(resolved_unix: i64, reason: &str, account: Option<&str>) -> SharedEntry {
        SharedEntry {
            resolved_unix,
            account: None,
            object_sid: None,
            denied: Some(reason.to_string()),
            denied_account: account.map(str::to_string),
        }
    }

    /// The admitted account with its objectSid, if this is an admission.
    pub fn admitted_account(&self) -> Option<AccountEntry> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut account = self.account.clone()?;
        account.object_sid = match &self.object_sid {
            Some(sid) => Some(b64.decode(sid).ok()?),
            None => None,
        };
        Some(account)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a snapshot: {0}")]
    Format(String),
}

impl Snapshot {
    pub fn new(settings: String, written_unix: i64, entries: Vec<SnapshotEntry>) -> Snapshot {
        Snapshot {
            format: FORMAT.to_string(),
            settings,
            written_unix,
            entries,
        }
    }

    /// Writes the snapshot with mode 0600; a reader sees the old file or the whole new one.
    pub fn write(&self, path: &Path) -> Result<(), SnapshotError> {
        let json = serde_json::to_vec(self).map_err(|e| SnapshotError::Format(e.to_string()))?;
        crate::secrets::write_private(path, &json)?;
        Ok(())
    }

    /// Reads a snapshot; `Ok(None)` when there is no file.
    pub fn read(path: &Path) -> Result<Option<Snapshot>, SnapshotError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let snapshot: Snapshot =
            serde_json::from_slice(&bytes).map_err(|e| SnapshotError::Format(e.to_string()))?;
        if snapshot.format != FORMAT {
            return Err(SnapshotError::Format(format!(
                "format {:?}, expected {FORMAT:?}",
                snapshot.format
            )));
        }
        Ok(Some(snapshot))
    }
}

impl SnapshotEntry {
    pub fn new(leaf: &[u8], resolved_unix: i64, account: &AccountEntry) -> SnapshotEntry {
        let b64 = base64::engine::general_purpose::STANDARD;
        SnapshotEntry {
            certificate: b64.encode(leaf),
            resolved_unix,
            account: account.clone(),
            object_sid: account.object_sid.as_ref().map(|sid| b64.encode(sid)),
        }
    }

    /// The certificate and the account as the directory returned them.
    pub fn parts(self) -> Option<(Vec<u8>, AccountEntry)> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let leaf = b64.decode(&self.certificate).ok()?;
        let mut account = self.account;
        account.object_sid = match self.object_sid {
            Some(sid) => Some(b64.decode(sid).ok()?),
            None => None,
        };
        Some((leaf, account))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_snapshot_round_trips_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("seg-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cache.json");
        let account = AccountEntry {
            dn: "CN=alice,DC=corp,DC=test".into(),
            object_sid: Some(vec![1, 5, 0, 0, 0, 0, 0, 5]),
            ..AccountEntry::default()
        };
        let entry = SnapshotEntry::new(b"\x30\x03\x02\x01\x01", 1_700_000_000, &account);
        Snapshot::new("digest".into(), 1_700_000_100, vec![entry])
            .write(&path)
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = Snapshot::read(&path).unwrap().expect("the snapshot");
        assert_eq!(read.settings, "digest");
        let (leaf, restored) = read.entries.into_iter().next().unwrap().parts().unwrap();
        assert_eq!(leaf, b"\x30\x03\x02\x01\x01");
        assert_eq!(restored, account);
        std::fs::write(&path, b"{\"format\":\"other\"}").unwrap();
        assert!(Snapshot::read(&path).is_err());
        assert!(Snapshot::read(&dir.join("absent.json")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
