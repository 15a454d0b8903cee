//! LDAP URLs (RFC 4516) naming a revocation list in the directory, as AD CS writes them into
//! every certificate's CRL distribution points and Freshest CRL extension:
//!
//! `ldap:///CN=Corp%20Issuing%20CA,CN=dc1,CN=CDP,CN=Public%20Key%20Services,CN=Services,CN=Configuration,DC=corp,DC=test?certificateRevocationList?base?objectClass=cRLDistributionPoint`
//!
//! Only the form that names one entry and one revocation-list attribute is understood; any
//! other (a subtree scope, another attribute, several, an extension) is refused rather than
//! guessed at. The host is kept for the caller to judge: empty means "the directory you use".

use std::fmt;

/// The attributes that hold revocation lists (RFC 4523; AD's schema names them alike).
const ATTRIBUTES: [&str; 3] = [
    "certificateRevocationList",
    "deltaRevocationList",
    "authorityRevocationList",
];

/// One revocation list in the directory: the entry, its attribute, the filter it must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdapUrl {
    /// `host` or `host:port`, lower-cased; `None` for `ldap:///…`.
    pub host: Option<String>,
    /// The entry's DN, percent-decoded.
    pub dn: String,
    /// One of `ATTRIBUTES`, as spelled there.
    pub attribute: &'static str,
    /// `(objectClass=…)`.
    pub filter: String,
}

/// Why an LDAP URL is not one seg reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdapUrlError(pub String);

impl fmt::Display for LdapUrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LdapUrlError {}

fn refuse<T>(why: impl Into<String>) -> Result<T, LdapUrlError> {
    Err(LdapUrlError(why.into()))
}

/// Whether `text` is an LDAP URL at all (any case of `ldap://` or `ldaps://`).
pub fn is_ldap(text: &str) -> bool {
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    lower.starts_with("ldap://") || lower.starts_with("ldaps://")
}

impl LdapUrl {
    pub fn parse(text: &str) -> Result<LdapUrl, LdapUrlError> {
        if !is_ldap(text) {
            return refuse("not an ldap:// URL");
        }
        let rest = &text[text.find("://").map_or(0, |i| i + 3)..];
        let Some(slash) = rest.find('/') else {
            return refuse("no distinguished name after the host");
        };
        let host = &rest[..slash];
        if host.contains(['@', '%', '[']) {
            return refuse("the host is not a plain name[:port]");
        }
        let host = (!host.is_empty()).then(|| host.to_ascii_lowercase());
        let mut parts = rest[slash + 1..].split('?');
        let dn = decode(parts.next().unwrap_or(""))?;
        if dn.is_empty() {
            return refuse("no distinguished name");
        }
        let attributes = decode(parts.next().unwrap_or(""))?;
        let attribute = match attributes.split(',').collect::<Vec<_>>()[..] {
            [one] => {
                let name = one.split(';').next().unwrap_or("");
                match ATTRIBUTES.iter().find(|a| a.eq_ignore_ascii_case(name)) {
                    Some(a) => *a,
                    None if one.is_empty() => {
                        return refuse(
                            "no attribute: name certificateRevocationList or deltaRevocationList",
                        )
                    }
                    None => return refuse(format!("attribute {one:?} holds no revocation list")),
                }
            }
            _ => return refuse("more than one attribute"),
        };
        let scope = decode(parts.next().unwrap_or(""))?;
        if !scope.is_empty() && !scope.eq_ignore_ascii_case("base") {
            return refuse(format!("scope {scope:?}: only base names one entry"));
        }
        let filter = decode(parts.next().unwrap_or(""))?;
        let filter = match filter.trim_start_matches('(').trim_end_matches(')') {
            "" => "(objectClass=*)".to_string(),
            f => match f.split_once('=') {
                Some((key, class))
                    if key.eq_ignore_ascii_case("objectClass")
                        && !class.is_empty()
                        && (class == "*"
                            || class
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-')) =>
                {
                    format!("(objectClass={class})")
                }
                _ => return refuse(format!("filter {filter:?}: only objectClass=<class>")),
            },
        };
        if parts.next().is_some_and(|e| !e.is_empty()) || parts.next().is_some() {
            return refuse("extensions are not supported");
        }
        Ok(LdapUrl {
            host,
            dn,
            attribute,
            filter,
        })
    }

    /// The host without its port, if one is named.
    pub fn host_name(&self) -> Option<&str> {
        self.host
            .as_deref()
            .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name))
    }
}

/// Percent-decodes one URL part; a bad escape, a control character or a non-UTF-8 result is
/// refused.
fn decode(part: &str) -> Result<String, LdapUrlError> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(byte) => out.push(byte),
                None => return refuse("a bad %-escape"),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    if out.iter().any(|b| b.is_ascii_control()) {
        return refuse("a control character");
    }
    String::from_utf8(out).or_else(|_| refuse("not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_ad_cs_writes_names_one_entry_and_one_attribute() {
        let url = LdapUrl::parse("ldap:///CN=Corp%20Issuing%20CA,CN=dc1,CN=CDP,CN=Public%20Key%20Services,CN=Services,CN=Configuration,DC=corp,DC=test?certificateRevocationList?base?objectClass=cRLDistributionPoint").unwrap();
        assert_eq!(url.host, None);
        assert_eq!(
            url.dn,
            "CN=Corp Issuing CA,CN=dc1,CN=CDP,CN=Public Key Services,CN=Services,CN=Configuration,DC=corp,DC=test"
        );
        assert_eq!(url.attribute, "certificateRevocationList");
        assert_eq!(url.filter, "(objectClass=cRLDistributionPoint)");
        let delta =
            LdapUrl::parse("LDAP://DC1.corp.test:389/CN=x?deltaRevocationList;binary").unwrap();
        assert_eq!(delta.host.as_deref(), Some("dc1.corp.test:389"));
        assert_eq!(delta.host_name(), Some("dc1.corp.test"));
        assert_eq!(delta.attribute, "deltaRevocationList");
        assert_eq!(delta.filter, "(objectClass=*)");
    }

    #[test]
    fn anything_else_is_refused_not_guessed() {
        for (url, why) in [
            ("http://x/ca.crl", "not an ldap"),
            ("ldap://", "no distinguished name"),
            ("ldap:///", "no distinguished name"),
            ("ldap:///CN=x", "no attribute"),
            ("ldap:///CN=x?cACertificate", "holds no revocation list"),
            (
                "ldap:///CN=x?certificateRevocationList,deltaRevocationList",
                "more than one",
            ),
            ("ldap:///CN=x?certificateRevocationList?sub", "only base"),
            (
                "ldap:///CN=x?certificateRevocationList?base?(cn=*)",
                "only objectClass",
            ),
            (
                "ldap:///CN=x?certificateRevocationList?base?objectClass=a)(cn=*",
                "only objectClass",
            ),
            (
                "ldap:///CN=x?certificateRevocationList?base??!bindname=x",
                "extensions",
            ),
            ("ldap:///CN=%0a?certificateRevocationList", "control"),
            ("ldap:///CN=%zz?certificateRevocationList", "escape"),
            ("ldap:///CN=%ff?certificateRevocationList", "UTF-8"),
            (
                "ldap://user@dc1/CN=x?certificateRevocationList",
                "plain name",
            ),
        ] {
            let error = LdapUrl::parse(url).unwrap_err();
            assert!(error.0.contains(why), "{url}: {error}");
        }
    }
}
