//! The account directory: Active Directory over LDAP in production, an in-process LDIF
//! directory for `seg demo`.
//!
//! Callers ask with a typed `Lookup` (one attribute, one or more equality values); each
//! backend turns it into its own query. The LDAP filter is built in exactly one place,
//! `Lookup::filter`, with RFC 4515 escaping.

mod filter;
mod ldap;
mod memory;

use std::time::Duration;

pub use filter::{escape_value, user_filter};
pub use ldap::LdapDirectory;
pub use memory::MemoryDirectory;

use crate::config::DirectoryConfig;

/// Attributes read for every account.
pub const ACCOUNT_ATTRIBUTES: [&str; 10] = [
    "sAMAccountName",
    "userPrincipalName",
    "mail",
    "userAccountControl",
    "accountExpires",
    "objectSid",
    "proxyAddresses",
    "whenCreated",
    "memberOf",
    "lockoutTime",
];

/// An equality search on one attribute: an account matches if it holds any of the values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub attribute: &'static str,
    pub values: Vec<String>,
}

impl Lookup {
    /// The LDAP filter sent for this lookup: user objects only, never computers.
    pub fn filter(&self) -> String {
        user_filter(self.attribute, &self.values)
    }
}

/// One account as the directory returned it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AccountEntry {
    pub dn: String,
    pub sam_account_name: Option<String>,
    pub user_principal_name: Option<String>,
    pub mail: Option<String>,
    pub user_account_control: u32,
    /// FILETIME; `None` when absent.
    pub account_expires: Option<i64>,
    #[serde(skip)]
    pub object_sid: Option<Vec<u8>>,
    pub proxy_addresses: Vec<String>,
    pub when_created: Option<String>,
    pub member_of: Vec<String>,
    pub lockout_time: Option<i64>,
}

impl AccountEntry {
    /// Fills an entry from attribute name/value pairs (names compared case-insensitively).
    pub fn from_attributes<'a>(
        dn: &str,
        text: impl Iterator<Item = (&'a str, &'a [String])>,
        binary: impl Iterator<Item = (&'a str, &'a [Vec<u8>])>,
    ) -> AccountEntry {
        let mut entry = AccountEntry {
            dn: dn.to_string(),
            ..AccountEntry::default()
        };
        for (name, values) in text {
            let first = values.first().cloned();
            match name.to_ascii_lowercase().as_str() {
                "samaccountname" => entry.sam_account_name = first,
                "userprincipalname" => entry.user_principal_name = first,
                "mail" => entry.mail = first,
                "useraccountcontrol" => {
                    entry.user_account_control = first
                        .and_then(|v| v.parse::<i64>().ok())
                        .map(|v| v as u32)
                        .unwrap_or(0)
                }
                "accountexpires" => entry.account_expires = first.and_then(|v| v.parse().ok()),
                "lockouttime" => entry.lockout_time = first.and_then(|v| v.parse().ok()),
                "proxyaddresses" => entry.proxy_addresses = values.to_vec(),
                "whencreated" => entry.when_created = first,
                "memberof" => entry.member_of = values.to_vec(),
                // A SID whose bytes happen to be valid UTF-8 arrives among the text values.
                "objectsid" => entry.object_sid = first.map(String::into_bytes),
                _ => {}
            }
        }
        for (name, values) in binary {
            if name.eq_ignore_ascii_case("objectSid") {
                entry.object_sid = values.first().cloned();
            }
        }
        entry
    }
}

/// Why the directory could not answer. Never cached: the next request tries again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DirectoryError {
    #[error("no directory server reachable: {0}")]
    Unavailable(String),
    #[error("directory operation timed out after {0:?}")]
    Timeout(Duration),
    #[error("directory refused the operation: {0}")]
    Refused(String),
    #[error("directory setup failed: {0}")]
    Setup(String),
}

impl DirectoryError {
    /// Label for `seg_directory_searches_total{result}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            DirectoryError::Unavailable(_) => "unavailable",
            DirectoryError::Timeout(_) => "timeout",
            DirectoryError::Refused(_) => "refused",
            DirectoryError::Setup(_) => "setup",
        }
    }
}

/// The configured backend.
pub enum Directory {
    Ldap(LdapDirectory),
    Memory(MemoryDirectory),
}

impl Directory {
    /// Builds the backend; nothing is contacted yet.
    pub fn from_config(config: &DirectoryConfig) -> Result<Directory, DirectoryError> {
        match config {
            DirectoryConfig::Ldap(l) => Ok(Directory::Ldap(LdapDirectory::new(l)?)),
            DirectoryConfig::Ldif { file } => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    DirectoryError::Setup(format!("cannot read {}: {e}", file.display()))
                })?;
                Ok(Directory::Memory(MemoryDirectory::from_ldif(&text)?))
            }
        }
    }

    /// Every user entry matching the lookup; at most two are returned (two means ambiguous).
    pub async fn search(&self, lookup: &Lookup) -> Result<Vec<AccountEntry>, DirectoryError> {
        match self {
            Directory::Ldap(l) => l.search(lookup).await,
            Directory::Memory(m) => Ok(m.search(lookup)),
        }
    }

    /// Checks that a directory server answers, for `/readyz`.
    pub async fn probe(&self) -> Result<(), DirectoryError> {
        match self {
            Directory::Ldap(l) => l.probe().await,
            Directory::Memory(_) => Ok(()),
        }
    }
}
