//! The request-target canonicaliser: any target either is refused or names a served path
//! that every normalising server reads as itself. The check here normalises the way IIS and
//! nginx do before they route (percent-decoding, `\` as `/`, `;` parameters cut, slashes
//! merged, dot-segments resolved) and asserts that an accepted path is a fixed point of it,
//! so what seg decided on is what the upstream serves. An accepted query is one whose keys
//! are plain letters and digits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use seg::activesync::EasRequest;
use seg::proxy::target::{endpoint, Endpoint};

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = http::Uri::try_from(data) else {
        return;
    };
    let Ok(served) = endpoint(&uri) else {
        return;
    };
    let path = uri.path();
    assert_eq!(normalise(path), path.to_ascii_lowercase(), "{path:?} is not canonical");
    let expected = match served {
        Endpoint::ActiveSync => ["/microsoft-server-activesync", "/microsoft-server-activesync/default.eas"],
        Endpoint::Autodiscover => ["/autodiscover/autodiscover.xml"; 2],
    };
    assert!(expected.contains(&path.to_ascii_lowercase().as_str()), "{path:?} served as {served:?}");
    if let Some(query) = uri.query() {
        if EasRequest::parse(Some(query), &http::HeaderMap::new(), false).is_ok() && query.contains('=') {
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let key = pair.split('=').next().unwrap_or_default();
                assert!(key.bytes().all(|b| b.is_ascii_alphanumeric()), "key {key:?} accepted");
            }
            assert!(!query.contains(';'), "';' accepted in {query:?}");
        }
    }
});

/// What a normalising server routes on: lowercase (IIS), decoded, `\` → `/`, parameters cut,
/// empty and `.` segments dropped, `..` resolved.
fn normalise(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1..i + 3)) {
            (b'%', Some(hex)) if std::str::from_utf8(hex).is_ok_and(|h| u8::from_str_radix(h, 16).is_ok()) => {
                decoded.push(u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("00"), 16).unwrap_or(0));
                i += 3;
            }
            (b'\\', _) => {
                decoded.push(b'/');
                i += 1;
            }
            (b, _) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let text = String::from_utf8_lossy(&decoded).to_ascii_lowercase();
    let mut out: Vec<&str> = Vec::new();
    for segment in text.split('/') {
        let segment = segment.split(';').next().unwrap_or_default();
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = text.ends_with('/') && !out.is_empty();
    let mut normal = format!("/{}", out.join("/"));
    if trailing {
        normal.push('/');
    }
    normal
}
