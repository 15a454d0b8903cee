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
            for line in lines {
                let (name, value) = parse_line(line).ok_or_else(|| {
                    DirectoryError::Setup(format!("ldif record {}: bad line {line:?}", index + 1))
                })?;
                if name.eq_ignore_ascii_case("dn") {
                    dn = Some(value);
                } else {
                    attributes
                        .entry(name.to_ascii_lowercase())
                        .or_default()
                        .push(value);
                }
            }
            let dn = dn.ok_or_else(|| {
                DirectoryError::Setup(format!("ldif record {} has no dn", index + 1))
            })?;
            entries.push(MemoryEntry { dn, attributes });
        }
        Ok(MemoryDirectory { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Up to two matching user entries.
    pub fn search(&self, lookup: &Lookup) -> Vec<AccountEntry> {
        let attribute = lookup.attribute.to_ascii_lowercase();
        self.entries
            .iter()
            .filter(|e| e.has_class("user") && !e.has_class("computer"))
            .filter(|e| {
                e.attributes.get(&attribute).is_some_and(|values| {
                    values
                        .iter()
                        .any(|v| lookup.values.iter().any(|l| l.eq_ignore_ascii_case(v)))
                })
            })
            .take(2)
            .map(|e| {
                AccountEntry::from_attributes(
                    &e.dn,
                    e.attributes.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                    std::iter::empty(),
                )
            })
            .collect()
    }
}

impl MemoryEntry {
    fn has_class(&self, class: &str) -> bool {
        self.attributes
            .get("objectclass")
            .is_some_and(|v| v.iter().any(|c| c.eq_ignore_ascii_case(class)))
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

fn parse_line(line: &str) -> Option<(String, String)> {
    let (name, rest) = line.split_once(':')?;
    if let Some(encoded) = rest.strip_prefix(':') {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        return Some((name.to_string(), String::from_utf8(bytes).ok()?));
    }
    Some((name.to_string(), rest.trim_start().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let found = d.search(&Lookup {
            attribute: "userPrincipalName",
            values: vec!["ALICE@demo.test".into()],
        });
        assert_eq!(found.len(), 1, "the computer account never maps");
        assert_eq!(found[0].sam_account_name.as_deref(), Some("alice"));
        let folded = d.search(&Lookup {
            attribute: "altSecurityIdentities",
            values: vec!["x509:<ski>ABCD".into()],
        });
        assert_eq!(folded.len(), 1);
        let b64 = d.search(&Lookup {
            attribute: "mail",
            values: vec!["bob@demo.test".into()],
        });
        assert_eq!(b64[0].dn, "CN=b64,DC=demo");
    }

    #[test]
    fn rejects_broken_ldif() {
        assert!(MemoryDirectory::from_ldif("objectClass: user\n").is_err());
        assert!(MemoryDirectory::from_ldif("dn: x\nno colon here\n").is_err());
    }
}
