//! Device blocks written once for the whole fleet (`seg block`), applied by every replica.
//!
//! The list lives in one store hash, `<prefix>blocks`: a field per block, named by what it
//! blocks in canonical form (`device:<DeviceId, upper case>`, `account:<sAMAccountName, lower
//! case>`, `certificate:<SHA-256 of the certificate, lower-case hex>`), its value a small JSON
//! record (reason, when, by whom). Each replica reads the whole hash every
//! `fleet.block_poll_interval`, publishes it to its connections (a held Ping of a blocked
//! device is answered 403 and closed) and keeps a copy in `fleet.block_file`, read at start, so a replica that
//! restarts while the store is down still enforces the last list it knew.
//!
//! A block only refuses: whoever controls the store can add or remove blocks (a denial of
//! service, or a lost phone let back in), never admit a device seg would refuse without it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a block names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// An ActiveSync DeviceId.
    Device,
    /// An account, by `sAMAccountName`.
    Account,
    /// A device certificate, by its SHA-256.
    Certificate,
}

impl BlockKind {
    fn prefix(self) -> &'static str {
        match self {
            BlockKind::Device => "device:",
            BlockKind::Account => "account:",
            BlockKind::Certificate => "certificate:",
        }
    }

    /// The field naming `value` in the block list: the canonical form every replica compares.
    /// DeviceIds are compared without case as Exchange does, accounts as AD does, both with
    /// Unicode's case mapping (`ſ` is `S`, `ı` is `I`): a device cannot spell its way around a
    /// block with a letter .NET folds and ASCII does not.
    pub fn field(self, value: &str) -> String {
        let value = match self {
            BlockKind::Device => value.to_uppercase(),
            BlockKind::Account => value.to_uppercase().to_lowercase(),
            BlockKind::Certificate => value.to_ascii_lowercase(),
        };
        format!("{}{value}", self.prefix())
    }

    /// Why `value` cannot name what a block of this kind names, if it cannot: an account is
    /// its `sAMAccountName` (not `DOMAIN\\name` nor a UPN), a certificate its SHA-256.
    pub fn check(self, value: &str) -> Result<(), String> {
        match self {
            BlockKind::Device if value.is_empty() || value.chars().any(char::is_control) => {
                Err("a DeviceId is a non-empty string without controls".into())
            }
            BlockKind::Account if value.is_empty() || value.contains(['\\', '@', '/']) => {
                Err("an account is named by its sAMAccountName (not DOMAIN\\name or a UPN)".into())
            }
            BlockKind::Certificate
                if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Err("a certificate is named by its SHA-256 in hex".into())
            }
            _ => Ok(()),
        }
    }
}

/// One block, as `seg block` wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub reason: String,
    /// When it was written, Unix seconds.
    pub at: i64,
    /// Who wrote it (the user running `seg block`, and the host).
    #[serde(default)]
    pub by: String,
}

/// The fleet's block list, by field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockList {
    pub blocks: BTreeMap<String, Block>,
}

impl BlockList {
    /// The list from the store's hash; fields or values that are not blocks (not UTF-8, not
    /// one of the kinds, not a block record) are skipped, so one bad value never stops the
    /// list from being read.
    pub fn from_fields(fields: Vec<(Vec<u8>, Vec<u8>)>) -> BlockList {
        let blocks = fields
            .into_iter()
            .filter_map(|(field, value)| {
                let field = String::from_utf8(field).ok()?;
                let known = [
                    BlockKind::Device,
                    BlockKind::Account,
                    BlockKind::Certificate,
                ]
                .iter()
                .any(|kind| field.starts_with(kind.prefix()));
                Some((field, serde_json::from_slice(&value).ok()?)).filter(|_| known)
            })
            .collect();
        BlockList { blocks }
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// The block that applies to a request of this device, account and certificate, if any.
    pub fn find(
        &self,
        device_id: Option<&str>,
        account: Option<&str>,
        certificate_hex: &str,
    ) -> Option<(&str, &Block)> {
        if self.blocks.is_empty() {
            return None;
        }
        let fields = [
            device_id.map(|d| BlockKind::Device.field(d)),
            account.map(|a| BlockKind::Account.field(a)),
            Some(BlockKind::Certificate.field(certificate_hex)),
        ];
        fields
            .into_iter()
            .flatten()
            .find_map(|field| self.blocks.get_key_value(&field))
            .map(|(field, block)| (field.as_str(), block))
    }

    /// The list kept on local disk, if there is one.
    pub fn read(path: &Path) -> Result<Option<BlockList>, String> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Writes the list with mode 0600 through a temporary file and a rename.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        crate::secrets::write_private(path, &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(reason: &str) -> String {
        serde_json::to_string(&Block {
            reason: reason.into(),
            at: 1,
            by: "ops".into(),
        })
        .unwrap()
    }

    #[test]
    fn blocks_match_in_canonical_form_only() {
        let list = BlockList::from_fields(fields(vec![
            (BlockKind::Device.field("Appl4Lost"), block("lost")),
            (BlockKind::Account.field("Mallory"), block("left")),
            (BlockKind::Certificate.field("ABCD"), block("stolen")),
            (BlockKind::Device.field("SPY"), block("found")),
            ("device:JUNK".into(), "not json".into()),
            ("other:thing".into(), block("ignored")),
        ]));
        assert_eq!(list.blocks.len(), 4);
        let find = |d, a, c| {
            list.find(d, a, c)
                .map(|(field, b)| (field.to_string(), b.reason.clone()))
        };
        assert_eq!(
            find(Some("appl4lost"), Some("alice"), "00"),
            Some(("device:APPL4LOST".into(), "lost".into()))
        );
        assert_eq!(
            find(Some("OTHER"), Some("MALLORY"), "00"),
            Some(("account:mallory".into(), "left".into()))
        );
        assert_eq!(
            find(None, None, "abcd"),
            Some(("certificate:abcd".into(), "stolen".into()))
        );
        assert_eq!(find(Some("APPL4LOST2"), Some("alice"), "abcde"), None);
        assert_eq!(find(Some("JUNK"), None, "00"), None);
        // Letters Unicode (and .NET) fold to ASCII ones name the same device.
        assert_eq!(
            find(Some("ſpy"), None, "00"),
            Some(("device:SPY".into(), "found".into()))
        );
        // A value that is not UTF-8 is skipped, the rest still read.
        let mixed = BlockList::from_fields(vec![
            (b"device:A".to_vec(), vec![0xff, 0xfe]),
            (b"device:B".to_vec(), block("ok").into_bytes()),
        ]);
        assert_eq!(mixed.blocks.len(), 1);
    }

    #[test]
    fn block_values_are_checked_for_their_kind() {
        assert!(BlockKind::Account.check("jdoe").is_ok());
        for wrong in ["CORP\\jdoe", "jdoe@corp.example", ""] {
            assert!(BlockKind::Account.check(wrong).is_err(), "{wrong}");
        }
        assert!(BlockKind::Certificate.check(&"ab".repeat(32)).is_ok());
        assert!(BlockKind::Certificate.check("abcd").is_err());
        assert!(BlockKind::Device.check("ApplDNQ").is_ok());
        assert!(BlockKind::Device.check("a\nb").is_err());
    }

    fn fields(pairs: Vec<(String, String)>) -> Vec<(Vec<u8>, Vec<u8>)> {
        pairs
            .into_iter()
            .map(|(f, v)| (f.into_bytes(), v.into_bytes()))
            .collect()
    }

    #[test]
    fn the_local_copy_round_trips_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("seg-blocks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blocks.json");
        assert_eq!(BlockList::read(&path), Ok(None));
        let list =
            BlockList::from_fields(fields(vec![(BlockKind::Device.field("X1"), block("lost"))]));
        list.write(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(BlockList::read(&path), Ok(Some(list)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
