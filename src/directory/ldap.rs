//! Active Directory over LDAP: a small pool of bound connections, DCs tried in order,
//! connect and operation timeouts, and searches that fail closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchEntry, SearchOptions};
use tokio::sync::Mutex;

use super::{escape_value, AccountEntry, DirectoryError, Lookup, ACCOUNT_ATTRIBUTES, SEARCH_LIMIT};
use crate::config::{GroupMethod, LdapConfig};

/// LDAP_MATCHING_RULE_IN_CHAIN: nested group membership, evaluated by AD only.
const MATCHING_RULE_IN_CHAIN: &str = "1.2.840.113556.1.4.1941";
/// LDAP_CAP_ACTIVE_DIRECTORY_OID in the rootDSE's supportedCapabilities.
const ACTIVE_DIRECTORY_CAPABILITY: &str = "1.2.840.113556.1.4.800";

/// LDAP result codes handled by name.
const RC_NO_SUCH_OBJECT: u32 = 32;
const RC_SUCCESS: u32 = 0;
const RC_SIZE_LIMIT_EXCEEDED: u32 = 4;
const RC_REFERRAL: u32 = 10;

/// A pool of bound LDAP connections. Each connection multiplexes concurrent operations;
/// a broken one is replaced on next use, trying the configured DCs in order.
pub struct LdapDirectory {
    urls: Vec<String>,
    base_dn: String,
    bind_dn: String,
    bind_password: String,
    settings: LdapConnSettings,
    operation_timeout: Duration,
    slots: Vec<Mutex<Option<Ldap>>>,
    next: AtomicUsize,
    /// Whether the directory announced itself as Active Directory (asked once).
    active_directory: tokio::sync::OnceCell<bool>,
}

impl LdapDirectory {
    pub fn new(config: &LdapConfig) -> Result<LdapDirectory, DirectoryError> {
        let bind_password = std::fs::read_to_string(&config.bind_password_file)
            .map_err(|e| {
                DirectoryError::Setup(format!(
                    "cannot read bind password from {}: {e}",
                    config.bind_password_file.display()
                ))
            })?
            .trim_end_matches(['\r', '\n'])
            .to_string();
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(config.connect_timeout)
            .set_starttls(config.starttls);
        if let Some(ca) = &config.ca_file {
            settings = settings.set_config(Arc::new(client_tls(ca)?));
        }
        Ok(LdapDirectory {
            urls: config.urls.clone(),
            base_dn: config.base_dn.clone(),
            bind_dn: config.bind_dn.clone(),
            bind_password,
            settings,
            operation_timeout: config.operation_timeout,
            slots: (0..config.pool_size).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            active_directory: tokio::sync::OnceCell::new(),
        })
    }

    /// Entries matching the lookup, at most `SEARCH_LIMIT`.
    pub async fn search(&self, lookup: &Lookup) -> Result<Vec<AccountEntry>, DirectoryError> {
        let filter = lookup.filter();
        self.with_retry(|mut ldap| {
            let filter = filter.clone();
            async move {
                let result = ldap
                    .with_timeout(self.operation_timeout)
                    .with_search_options(SearchOptions::new().sizelimit(SEARCH_LIMIT as i32))
                    .search(
                        &self.base_dn,
                        Scope::Subtree,
                        &filter,
                        ACCOUNT_ATTRIBUTES.to_vec(),
                    )
                    .await;
                let ldap3::SearchResult(entries, status) = result.map_err(|e| self.error(e))?;
                match status.rc {
                    RC_SUCCESS | RC_REFERRAL => {}
                    // Cut at seg's own limit: enough entries to see any ambiguity.
                    RC_SIZE_LIMIT_EXCEEDED if entries.len() >= SEARCH_LIMIT => {}
                    // Cut below it by the server's own size limit: the entries that came
                    // may hide a second match, so "one account" cannot be told.
                    RC_SIZE_LIMIT_EXCEEDED => {
                        return Err(DirectoryError::Refused(format!(
                            "the directory cut the answer at {} entries (its size limit is below {SEARCH_LIMIT}): a unique match cannot be told",
                            entries.len()
                        )))
                    }
                    rc => return Err(result_error(rc, &status.text)),
                }
                Ok(entries
                    .into_iter()
                    // Referrals (AD answers them for other partitions) are ignored, never chased.
                    .filter(|e| !e.is_ref() && !e.is_intermediate())
                    .map(SearchEntry::construct)
                    .map(|e| {
                        AccountEntry::from_attributes(
                            &e.dn,
                            e.attrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                            e.bin_attrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                        )
                    })
                    .collect())
            }
        })
        .await
    }

    /// Nested membership by LDAP_MATCHING_RULE_IN_CHAIN or `tokenGroups`, both AD-only:
    /// another directory is an error, never a silent "not a member".
    pub async fn is_member(
        &self,
        account_dn: &str,
        group_dn: &str,
        method: GroupMethod,
    ) -> Result<bool, DirectoryError> {
        let is_ad = self
            .active_directory
            .get_or_try_init(|| self.announces_active_directory())
            .await?;
        if !is_ad {
            return Err(DirectoryError::Setup(format!(
                "account.group_method = \"{}\" needs Active Directory, and this directory does not announce it (use \"member-of\")",
                method.name()
            )));
        }
        match method {
            GroupMethod::MemberOf => Err(DirectoryError::Setup(
                "member-of is evaluated without the directory".into(),
            )),
            GroupMethod::InChain => {
                let filter = format!(
                    "(memberOf:{MATCHING_RULE_IN_CHAIN}:={})",
                    escape_value(group_dn.as_bytes())
                );
                let found = self.read(account_dn, &filter, &["1.1"]).await?;
                Ok(!found.is_empty())
            }
            GroupMethod::TokenGroups => {
                let tokens = self
                    .read(account_dn, "(objectClass=*)", &["tokenGroups"])
                    .await?;
                let tokens: Vec<Vec<u8>> = tokens
                    .into_iter()
                    .flat_map(|e| e.bin_attrs.into_iter().chain(text_as_binary(e.attrs)))
                    .filter(|(k, _)| k.eq_ignore_ascii_case("tokenGroups"))
                    .flat_map(|(_, v)| v)
                    .collect();
                if tokens.is_empty() {
                    return Err(DirectoryError::Refused(format!(
                        "no tokenGroups returned for {account_dn}"
                    )));
                }
                let group = self
                    .read(group_dn, "(objectClass=*)", &["objectSid"])
                    .await?;
                let sid = group
                    .into_iter()
                    .flat_map(|e| e.bin_attrs.into_iter().chain(text_as_binary(e.attrs)))
                    .find(|(k, _)| k.eq_ignore_ascii_case("objectSid"))
                    .and_then(|(_, v)| v.into_iter().next())
                    .ok_or_else(|| {
                        DirectoryError::Refused(format!("group {group_dn} has no objectSid"))
                    })?;
                Ok(tokens.contains(&sid))
            }
        }
    }

    async fn announces_active_directory(&self) -> Result<bool, DirectoryError> {
        let root = self
            .read("", "(objectClass=*)", &["supportedCapabilities"])
            .await?;
        Ok(root.iter().any(|e| {
            e.attrs
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("supportedCapabilities"))
                .flat_map(|(_, v)| v)
                .any(|v| v == ACTIVE_DIRECTORY_CAPABILITY)
        }))
    }

    /// A base-scope read of one entry.
    async fn read(
        &self,
        dn: &str,
        filter: &str,
        attrs: &[&str],
    ) -> Result<Vec<SearchEntry>, DirectoryError> {
        let attrs: Vec<String> = attrs.iter().map(|a| a.to_string()).collect();
        self.with_retry(|mut ldap| {
            let attrs = attrs.clone();
            async move {
                let ldap3::SearchResult(entries, status) = ldap
                    .with_timeout(self.operation_timeout)
                    .search(dn, Scope::Base, filter, attrs)
                    .await
                    .map_err(|e| self.error(e))?;
                match status.rc {
                    RC_SUCCESS => {}
                    rc => return Err(result_error(rc, &status.text)),
                }
                Ok(entries
                    .into_iter()
                    .filter(|e| !e.is_ref() && !e.is_intermediate())
                    .map(SearchEntry::construct)
                    .collect())
            }
        })
        .await
    }

    /// The `cACertificate` values of the NTAuth object (`CN=NTAuthCertificates,CN=Public Key
    /// Services,CN=Services,<configurationNamingContext>` unless `dn` names it). An object
    /// that does not exist is an empty store, not an error: nobody may issue logons.
    pub async fn read_ntauth(&self, dn: Option<&str>) -> Result<Vec<Vec<u8>>, DirectoryError> {
        let dn = match dn {
            Some(dn) => dn.to_string(),
            None => format!(
                "CN=NTAuthCertificates,CN=Public Key Services,CN=Services,{}",
                self.configuration_context().await?
            ),
        };
        self.read_binary(&dn, "(objectClass=*)", "cACertificate")
            .await
    }

    /// The binary values of `attribute` (with or without `;binary`) of the entry at `dn`,
    /// if it matches `filter`; none when there is no such entry. For the NTAuth store and
    /// the CRLs of `ldap:///` distribution points.
    pub async fn read_binary(
        &self,
        dn: &str,
        filter: &str,
        attribute: &str,
    ) -> Result<Vec<Vec<u8>>, DirectoryError> {
        self.with_retry(|mut ldap| async move {
            let ldap3::SearchResult(entries, status) = ldap
                .with_timeout(self.operation_timeout)
                .search(dn, Scope::Base, filter, vec![attribute])
                .await
                .map_err(|e| self.error(e))?;
            match status.rc {
                RC_SUCCESS => {}
                RC_NO_SUCH_OBJECT => return Ok(Vec::new()),
                rc => return Err(result_error(rc, &status.text)),
            }
            Ok(entries
                .into_iter()
                .filter(|e| !e.is_ref() && !e.is_intermediate())
                .map(SearchEntry::construct)
                .flat_map(|e| {
                    e.bin_attrs
                        .into_iter()
                        .chain(
                            e.attrs
                                .into_iter()
                                .map(|(k, v)| (k, v.into_iter().map(String::into_bytes).collect())),
                        )
                        .filter(|(k, _)| {
                            k.split(';')
                                .next()
                                .is_some_and(|name| name.eq_ignore_ascii_case(attribute))
                        })
                        .flat_map(|(_, values)| values)
                        .collect::<Vec<_>>()
                })
                .collect())
        })
        .await
    }

    /// The RootDSE's configurationNamingContext (AD's `CN=Configuration,<forest root>`).
    async fn configuration_context(&self) -> Result<String, DirectoryError> {
        self.with_retry(|mut ldap| async move {
            let ldap3::SearchResult(entries, status) = ldap
                .with_timeout(self.operation_timeout)
                .search("", Scope::Base, "(objectClass=*)", vec!["configurationNamingContext"])
                .await
                .map_err(|e| self.error(e))?;
            if status.rc != RC_SUCCESS {
                return Err(result_error(status.rc, &status.text));
            }
            entries
                .into_iter()
                .map(SearchEntry::construct)
                .find_map(|e| e.attrs.get("configurationNamingContext")?.first().cloned())
                .ok_or_else(|| {
                    DirectoryError::Setup(
                        "the directory's RootDSE names no configurationNamingContext (not Active Directory): set ntauth.dn".into(),
                    )
                })
        })
        .await
    }

    /// Reads the base DN entry: proves a DC answers and the bind works.
    pub async fn probe(&self) -> Result<(), DirectoryError> {
        self.with_retry(|mut ldap| async move {
            let ldap3::SearchResult(_, status) = ldap
                .with_timeout(self.operation_timeout)
                .search(&self.base_dn, Scope::Base, "(objectClass=*)", vec!["1.1"])
                .await
                .map_err(|e| self.error(e))?;
            match status.rc {
                RC_SUCCESS => Ok(()),
                rc => Err(result_error(rc, &status.text)),
            }
        })
        .await
    }

    /// Runs an operation on a pooled connection; a transport failure drops that connection and
    /// the (idempotent) operation is tried once more on a fresh one.
    async fn with_retry<F, Fut, T>(&self, op: F) -> Result<T, DirectoryError>
    where
        F: Fn(Ldap) -> Fut,
        Fut: std::future::Future<Output = Result<T, DirectoryError>>,
    {
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut last = None;
        for _ in 0..2 {
            let ldap = self.connection(slot).await?;
            match op(ldap).await {
                Ok(v) => return Ok(v),
                Err(e @ (DirectoryError::Unavailable(_) | DirectoryError::Timeout(_))) => {
                    *self.slots[slot].lock().await = None;
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| DirectoryError::Unavailable("no attempt made".into())))
    }

    async fn connection(&self, slot: usize) -> Result<Ldap, DirectoryError> {
        let mut guard = self.slots[slot].lock().await;
        if let Some(ldap) = guard.as_mut() {
            if !ldap.is_closed() {
                return Ok(ldap.clone());
            }
        }
        let ldap = self.connect().await?;
        *guard = Some(ldap.clone());
        Ok(ldap)
    }

    /// Connects and binds to the first DC that answers, in configured order.
    async fn connect(&self) -> Result<Ldap, DirectoryError> {
        let mut failures = Vec::new();
        for url in &self.urls {
            match self.connect_one(url).await {
                Ok(ldap) => return Ok(ldap),
                Err(e) => {
                    tracing::warn!(target: "seg::directory", %url, error = %e, "directory server failed");
                    let detail = match e {
                        DirectoryError::Unavailable(detail) => detail,
                        other => other.to_string(),
                    };
                    failures.push(format!("{url}: {detail}"));
                }
            }
        }
        Err(DirectoryError::Unavailable(failures.join("; ")))
    }

    async fn connect_one(&self, url: &str) -> Result<Ldap, DirectoryError> {
        let (conn, mut ldap) = LdapConnAsync::with_settings(self.settings.clone(), url)
            .await
            .map_err(|e| self.error(e))?;
        ldap3::drive!(conn);
        let bound = ldap
            .with_timeout(self.operation_timeout)
            .simple_bind(&self.bind_dn, &self.bind_password)
            .await
            .map_err(|e| self.error(e))?;
        if bound.rc != RC_SUCCESS {
            return Err(DirectoryError::Refused(format!(
                "bind as {} failed: result {} {}",
                self.bind_dn, bound.rc, bound.text
            )));
        }
        Ok(ldap)
    }

    fn error(&self, e: LdapError) -> DirectoryError {
        match e {
            LdapError::Timeout { .. } => DirectoryError::Timeout(self.operation_timeout),
            other => DirectoryError::Unavailable(other.to_string()),
        }
    }
}

/// ldap3 files binary values that happen to be valid UTF-8 among the text attributes.
fn text_as_binary(
    attrs: std::collections::HashMap<String, Vec<String>>,
) -> impl Iterator<Item = (String, Vec<Vec<u8>>)> {
    attrs
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().map(String::into_bytes).collect()))
}

/// A non-success LDAP result: busy and unavailable are transient, the rest are refusals.
fn result_error(rc: u32, text: &str) -> DirectoryError {
    match rc {
        51 | 52 => DirectoryError::Unavailable(format!("server busy or unavailable: {rc} {text}")),
        _ => DirectoryError::Refused(format!("result {rc} {text}")),
    }
}

fn client_tls(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, DirectoryError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| DirectoryError::Setup(format!("directory.ca_file: {e}")))?;
    for cert in certs {
        let cert = cert.map_err(|e| DirectoryError::Setup(format!("directory.ca_file: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| DirectoryError::Setup(format!("directory.ca_file: {e}")))?;
    }
    if roots.is_empty() {
        return Err(DirectoryError::Setup(format!(
            "directory.ca_file {} holds no certificate",
            ca_file.display()
        )));
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}
