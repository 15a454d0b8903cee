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

pub use filter::escape_value;
pub use ldap::LdapDirectory;
pub use memory::MemoryDirectory;

use crate::config::{DirectoryConfig, GroupMethod};

/// DN equality as the gateway needs it: case-insensitive, spaces after commas ignored.
pub fn dn_eq(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.split(',')
            .map(|part| part.trim().to_lowercase())
            .collect::<Vec<_>>()
    };
    norm(a) == norm(b)
}

/// Attributes read for every account.
pub const ACCOUNT_ATTRIBUTES: [&str; 13] = [
    "objectClass",
    "altSecurityIdentities",
    "dNSHostName",
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

/// Most entries one lookup returns; reaching it is treated as an ambiguous mapping.
pub const SEARCH_LIMIT: usize = 16;

/// What kind of account an entry is. A computer never maps as a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountKind {
    User,
    Computer,
}

/// One equality condition: the attribute holds the value (compared case-insensitively).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    pub attribute: &'static str,
    pub value: String,
}

impl Condition {
    pub fn new(attribute: &'static str, value: impl Into<String>) -> Condition {
        Condition {
            attribute,
            value: value.into(),
        }
    }
}

/// One directory search: user accounts meeting any user condition, and computer accounts
/// meeting any computer condition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lookup {
    pub user: Vec<Condition>,
    pub computer: Vec<Condition>,
}

impl Lookup {
    pub fn add(&mut self, kind: AccountKind, condition: Condition) {
        let list = match kind {
            AccountKind::User => &mut self.user,
            AccountKind::Computer => &mut self.computer,
        };
        if !list.contains(&condition) {
            list.push(condition);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.user.is_empty() && self.computer.is_empty()
    }

    /// The LDAP filter sent for this lookup.
    pub fn filter(&self) -> String {
        filter::lookup_filter(&self.user, &self.computer)
    }

    /// Whether an entry meets this lookup (the in-process directory's evaluation).
    pub fn matches(&self, entry: &AccountEntry) -> bool {
        let conditions = match entry.kind() {
            AccountKind::User => &self.user,
            AccountKind::Computer => &self.computer,
        };
        conditions
            .iter()
            .any(|c| entry.has_value(c.attribute, &c.value))
    }
}

/// One account as the directory returned it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccountEntry {
    pub dn: String,
    pub object_classes: Vec<String>,
    pub alt_security_identities: Vec<String>,
    pub dns_host_name: Option<String>,
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
    pub fn kind(&self) -> AccountKind {
        if self
            .object_classes
            .iter()
            .any(|c| c.eq_ignore_ascii_case("computer"))
        {
            AccountKind::Computer
        } else {
            AccountKind::User
        }
    }

    /// Whether the attribute holds the value, compared case-insensitively as AD does for
    /// these (Unicode string) attributes.
    pub fn has_value(&self, attribute: &str, value: &str) -> bool {
        // AD ignores case for all of Unicode; the ASCII test answers most comparisons.
        let eq = |v: &String| {
            v.eq_ignore_ascii_case(value)
                || (!v.is_ascii() && v.to_lowercase() == value.to_lowercase())
        };
        match attribute.to_ascii_lowercase().as_str() {
            "altsecurityidentities" => self.alt_security_identities.iter().any(eq),
            "userprincipalname" => self.user_principal_name.iter().any(eq),
            "mail" => self.mail.iter().any(eq),
            "proxyaddresses" => self.proxy_addresses.iter().any(eq),
            "samaccountname" => self.sam_account_name.iter().any(eq),
            "dnshostname" => self.dns_host_name.iter().any(eq),
            _ => false,
        }
    }

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
                "objectclass" => entry.object_classes = values.to_vec(),
                "altsecurityidentities" => entry.alt_security_identities = values.to_vec(),
                "dnshostname" => entry.dns_host_name = first,
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
    #[error("directory unavailable: {0}")]
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
    Ldap(Box<LdapDirectory>),
    Memory(MemoryDirectory),
}

impl Directory {
    /// Builds the backend; nothing is contacted yet.
    pub fn from_config(config: &DirectoryConfig) -> Result<Directory, DirectoryError> {
        match config {
            DirectoryConfig::Ldap(l) => Ok(Directory::Ldap(Box::new(LdapDirectory::new(l)?))),
            DirectoryConfig::Ldif { file } => {
                let text = std::fs::read_to_string(file).map_err(|e| {
                    DirectoryError::Setup(format!("cannot read {}: {e}", file.display()))
                })?;
                Ok(Directory::Memory(MemoryDirectory::from_ldif(&text)?))
            }
        }
    }

    /// Every entry matching the lookup, at most `SEARCH_LIMIT`.
    pub async fn search(&self, lookup: &Lookup) -> Result<Vec<AccountEntry>, DirectoryError> {
        match self {
            Directory::Ldap(l) => l.search(lookup).await,
            Directory::Memory(m) => Ok(m.search(lookup)),
        }
    }

    /// Whether the account is a member of the group, by the configured method. A directory
    /// that cannot answer by that method is an error, never a silent "not a member".
    pub async fn is_member(
        &self,
        account: &AccountEntry,
        group_dn: &str,
        method: GroupMethod,
    ) -> Result<bool, DirectoryError> {
        if method == GroupMethod::MemberOf {
            return Ok(account.member_of.iter().any(|g| dn_eq(g, group_dn)));
        }
        match self {
            Directory::Ldap(l) => l.is_member(&account.dn, group_dn, method).await,
            Directory::Memory(_) => Err(DirectoryError::Setup(
                "the LDIF directory evaluates direct memberOf only: set account.group_method = \"member-of\"".into(),
            )),
        }
    }

    /// The `cACertificate` values of the forest's NTAuth object: at `dn`, or under the
    /// RootDSE's configurationNamingContext.
    pub async fn read_ntauth(&self, dn: Option<&str>) -> Result<Vec<Vec<u8>>, DirectoryError> {
        match self {
            Directory::Ldap(l) => l.read_ntauth(dn).await,
            Directory::Memory(_) => Err(DirectoryError::Setup(
                "the LDIF directory holds no NTAuth object".into(),
            )),
        }
    }

    /// The binary values of `attribute` of the entry at `dn` matching `filter` (the CRL
    /// of an `ldap:///` distribution point).
    pub async fn read_binary(
        &self,
        dn: &str,
        filter: &str,
        attribute: &str,
    ) -> Result<Vec<Vec<u8>>, DirectoryError> {
        match self {
            Directory::Ldap(l) => l.read_binary(dn, filter, attribute).await,
            Directory::Memory(_) => Err(DirectoryError::Setup(
                "the LDIF directory serves no CRLs: ldap:/// distribution points need an LDAP directory".into(),
            )),
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
