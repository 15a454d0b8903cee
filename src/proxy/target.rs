//! The request target: canonical or refused, then matched exactly.
//!
//! seg decides on the path it forwards, so the two must be the same string and every server
//! behind seg must read that string the same way. IIS, nginx and ASP.NET resolve dot-segments,
//! merge slashes, decode `%2e`, `%2f` and `%5c`, read `\` as `/` and cut `;` parameters
//! before they route; a prefix check on the raw path is spelled around with any of those.
//! seg does not resolve or rewrite anything: a path outside the small alphabet the
//! ActiveSync and Autodiscover paths are written in is refused as not canonical (400), and a
//! canonical path is served only when it is one of those paths exactly (else 404). What is
//! forwarded is then the path as received, which no normalising server can read otherwise.

use http::Uri;

/// What seg serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/Microsoft-Server-ActiveSync`, or `…/default.eas` as some clients write it.
    ActiveSync,
    /// `/autodiscover/autodiscover.xml`, the mobile clients' Autodiscover (POX).
    Autodiscover,
}

/// Why a request target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// 400: the target is not in canonical origin form; the rule it breaks, for the log.
    #[error("request target is not canonical: {0}")]
    NotCanonical(&'static str),
    /// 404: canonical, but not a path seg serves.
    #[error("path not served")]
    NotServed,
}

impl TargetError {
    /// The audit reason code.
    pub fn code(self) -> &'static str {
        match self {
            TargetError::NotCanonical(_) => "path-not-canonical",
            TargetError::NotServed => "path-not-served",
        }
    }
}

/// The paths served, compared ASCII case-insensitively as IIS does.
const SERVED: [(&str, Endpoint); 3] = [
    ("/Microsoft-Server-ActiveSync", Endpoint::ActiveSync),
    (
        "/Microsoft-Server-ActiveSync/default.eas",
        Endpoint::ActiveSync,
    ),
    ("/autodiscover/autodiscover.xml", Endpoint::Autodiscover),
];

/// The endpoint a request target names, if it is canonical and served.
pub fn endpoint(uri: &Uri) -> Result<Endpoint, TargetError> {
    // Absolute form names a host (IIS would route by it) and asterisk form no path at all.
    if uri.scheme().is_some() || uri.authority().is_some() {
        return Err(TargetError::NotCanonical("not origin form"));
    }
    let path = uri.path();
    canonical_path(path)?;
    SERVED
        .iter()
        .find(|(served, _)| served.eq_ignore_ascii_case(path))
        .map(|&(_, endpoint)| endpoint)
        .ok_or(TargetError::NotServed)
}

/// Checks that `path` is canonical: `/` then segments of unreserved characters (RFC 3986
/// §2.3: letters, digits, `-`, `.`, `_`, `~`), none empty but the last, none `.` or `..`. No percent
/// escape at all (every served path is plain ASCII, so an escape can only hide a `.`, `/`,
/// `\` or a byte another parser decodes differently), no `\`, no `;`, no control or
/// non-ASCII byte.
pub fn canonical_path(path: &str) -> Result<(), TargetError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(TargetError::NotCanonical("does not start with /"));
    };
    // A trailing `/` ends the path with an empty segment; anywhere else, one is `//`.
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Ok(());
    }
    for segment in rest.split('/') {
        match segment {
            "" => return Err(TargetError::NotCanonical("empty segment")),
            "." | ".." => return Err(TargetError::NotCanonical("dot-segment")),
            _ => {}
        }
        if let Some(&byte) = segment.as_bytes().iter().find(|&&b| !is_unreserved(b)) {
            return Err(TargetError::NotCanonical(match byte {
                b'%' => "percent-encoding",
                b'\\' => "backslash",
                b';' => "path parameter",
                0..=0x1f | 0x7f => "control byte",
                0x80.. => "non-ASCII byte",
                _ => "reserved character",
            }));
        }
    }
    Ok(())
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint_of(target: &str) -> Result<Endpoint, TargetError> {
        endpoint(&Uri::try_from(target).expect("a target http accepts"))
    }

    #[test]
    fn served_paths_in_any_case() {
        for (target, expected) in [
            ("/Microsoft-Server-ActiveSync", Endpoint::ActiveSync),
            (
                "/microsoft-server-activesync?Cmd=Sync",
                Endpoint::ActiveSync,
            ),
            (
                "/Microsoft-Server-ActiveSync/default.eas",
                Endpoint::ActiveSync,
            ),
            (
                "/MICROSOFT-SERVER-ACTIVESYNC/Default.EAS?x",
                Endpoint::ActiveSync,
            ),
            ("/autodiscover/autodiscover.xml", Endpoint::Autodiscover),
            ("/Autodiscover/Autodiscover.xml", Endpoint::Autodiscover),
        ] {
            assert_eq!(endpoint_of(target), Ok(expected), "{target}");
        }
    }

    #[test]
    fn non_canonical_targets_are_refused_not_resolved() {
        for (target, rule) in [
            ("/Microsoft-Server-ActiveSync/../owa/", "dot-segment"),
            ("/Microsoft-Server-ActiveSync/./default.eas", "dot-segment"),
            (
                "/Microsoft-Server-ActiveSync/%2e%2e/EWS/Exchange.asmx",
                "percent-encoding",
            ),
            (
                "/Microsoft-Server-ActiveSync%2F..%2Fowa/",
                "percent-encoding",
            ),
            ("/Microsoft-Server-%41ctiveSync", "percent-encoding"),
            ("//..//owa/", "empty segment"),
            ("/Microsoft-Server-ActiveSync//", "empty segment"),
            ("/Microsoft-Server-ActiveSync/..\\owa/", "backslash"),
            ("/Microsoft-Server-ActiveSync;/../ecp/", "path parameter"),
            ("/Microsoft-Server-ActiveSync;x=1", "path parameter"),
            (
                "/Microsoft-Server-ActiveSync/default.eas!",
                "reserved character",
            ),
            ("/autodiscover/autodiscover.json@x", "reserved character"),
            (
                "http://evil.example/Microsoft-Server-ActiveSync",
                "not origin form",
            ),
            ("*", "does not start with /"),
        ] {
            assert_eq!(
                endpoint_of(target),
                Err(TargetError::NotCanonical(rule)),
                "{target}"
            );
        }
        // Bytes `Uri` itself may accept, checked on the path alone.
        for (path, rule) in [
            ("/Microsoft-Server-ActiveSync/\u{17f}", "non-ASCII byte"),
            ("/a\u{1}b", "control byte"),
            ("Microsoft-Server-ActiveSync", "does not start with /"),
        ] {
            assert_eq!(canonical_path(path), Err(TargetError::NotCanonical(rule)));
        }
    }

    #[test]
    fn canonical_paths_elsewhere_are_not_served() {
        for target in [
            "/owa/",
            "/owa",
            "/ecp/default.aspx",
            "/EWS/Exchange.asmx",
            "/Microsoft-Server-ActiveSync/other",
            "/Microsoft-Server-ActiveSync/default.eas/x",
            "/Microsoft-Server-ActiveSyncX",
            "/autodiscover/autodiscover.json",
            "/autodiscover",
            "/Microsoft-Server-ActiveSync/",
            "/",
        ] {
            assert_eq!(endpoint_of(target), Err(TargetError::NotServed), "{target}");
        }
    }
}
