//! An in-process directory read from an LDIF file, for `seg demo` and trials.
//!
//! It answers the same `Lookup`s as LDAP with AD's matching: attribute names and string
//! values compared case-insensitively, user objects only, computers excluded.

use std::collections::HashMap;

use base64::Engine as _;

use super::{AccountEntry, DirectoryError, Lookup};

/// Entries held in memory.
pub struct MemoryDirectory {
    entries: Vec<MemoryEntry>,
}

struct MemoryEntry {
    dn: String,
    /// Lowercased attribute name → values.
    attributes: HashMap<String, Vec<String>>,
    /// Values given base64-encoded that are not UTF-8 (objectSid).
    binary: HashMap<String, Vec<Vec<u8>>>,
}

impl MemoryDirectory {
    /// Parses LDIF content records (`dn:` first, `attr: value`, `attr:: base64`, folded lines).
    pub fn from_ldif(text: &str) -> Result<MemoryDirectory, DirectoryError> {
        let mut entries = Vec::new();
        for (index, record) in unfold(text).split(|l| l.is_empty()).enumerate() {
            let lines: Vec<&String> = record.iter().filter(|l| !l.starts_with('#')).collect();
            if lines.is_empty() {
                continue;
            }
            let mut dn = None;
            let mut attributes: HashMap<String, Vec<String>> = HashMap::new();
            let mut binary: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
            for line in lines {
                let (name, value) = parse_line(line).ok_or_else(|| {
                    DirectoryError::Setup(format!("ldif record {}: bad line {line:?}", index + 1))
                })?;
                let name = name.to_ascii_lowercase();
                match (name.as_str(), String::from_utf8(value)) {
                    ("dn", Ok(text)) => dn = Some(text),
                    (_, Ok(text)) => attributes.entry(name).or_default().push(text),
                    (_, Err(bytes)) => binary.entry(name).or_default().push(bytes.into_bytes()),
                }
            }
            let dn = dn.ok_or_else(|| {
                DirectoryError::Setup(format!("ldif record {} has no dn", index + 1))
            })?;
            entries.push(MemoryEntry {
                dn,
                attributes,
                binary,
            });
        }
        Ok(MemoryDirectory { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The matching user and computer entries, at most `SEARCH_LIMIT`.
    pub fn search(&self, lookup: &Lookup) -> Vec<AccountEntry> {
        self.entries
            .iter()
            .map(|e| {
                AccountEntry::from_attributes(
                    &e.dn,
                    e.attributes.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                    e.binary.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                )
            })
            .filter(|e| {
                e.object_classes
                    .iter()
                    .any(|c| c.eq_ignore_ascii_case("user"))
            })
            .filter(|e| lookup.matches(e))
            .take(super::SEARCH_LIMIT)
            .collect()
    }
}

/// Joins folded lines (a line starting with one space continues the previous one).
fn unfold(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for raw in text.lines() {
        let raw = raw.trim_end_matches('\r');
        match (raw.strip_prefix(' '), lines.last_mut()) {
            (Some(rest), Some(last)) if !last.is_empty() => last.push_str(rest),
            _ => lines.push(raw.to_string()),
        }
    }
    lines
}

fn parse_line(line: &str) -> Option<(String, Vec<u8>)> {
    let (name, rest) = line.split_once(':')?;
    if let Some(encoded) = rest.strip_prefix(':') {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        return Some((name.to_string(), bytes));
    }
    Some((name.to_string(), rest.trim_start().as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Condition;

    const LDIF: &str = "\
dn: CN=alice,DC=demo
objectClass: user
userPrincipalName: alice@demo.test
sAMAccountName: alice
altSecurityIdentities: X509:<SKI>ab
 cd

dn: CN=pc1,DC=demo
objectClass: user
objectClass: computer
userPrincipalName: alice@demo.test

dn: CN=b64,DC=demo
objectClass: user
mail:: Ym9iQGRlbW8udGVzdA==
";

    #[test]
    fn searches_users_case_insensitively() {
        let d = MemoryDirectory::from_ldif(LDIF).unwrap();
        assert_eq!(d.len(), 3);
        let lookup = |attribute, value: &str| Lookup {
            user: vec![Condition::new(attribute, value)],
            computer: vec![],
        };
        let found = d.search(&lookup("userPrincipalName", "ALICE@demo.test"));
        assert_eq!(found.len(), 1, "the computer account never maps");
        assert_eq!(found[0].sam_account_name.as_deref(), Some("alice"));
        let folded = d.search(&lookup("altSecurityIdentities", "x509:<ski>ABCD"));
        assert_eq!(folded.len(), 1);
        let b64 = d.search(&lookup("mail", "bob@demo.test"));
        assert_eq!(b64[0].dn, "CN=b64,DC=demo");
    }

    #[test]
    fn rejects_broken_ldif() {
        assert!(MemoryDirectory::from_ldif("objectClass: user\n").is_err());
        assert!(MemoryDirectory::from_ldif("dn: x\nno colon here\n").is_err());
    }
}
