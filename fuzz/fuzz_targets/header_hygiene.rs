//! Header hygiene on any set of client headers (one `name: value` per line): afterwards the
//! identity header appears exactly once with seg's value, only allow-listed headers and seg's
//! own remain (so no client-sent identity spelling, credential, cookie, hop-by-hop or
//! `_`-spelled framing header survives), and every header a `Connection` header named is
//! gone (seg's own headers are then added afresh).
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use seg::activesync::REQUEST_HEADERS;
use seg::config::{IdentityConfig, IdentityValue, UpstreamConfig};
use seg::proxy::HeaderPolicy;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    let mut nominated = Vec::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        if name == http::header::CONNECTION {
            if let Ok(text) = value.to_str() {
                nominated.extend(text.split(',').map(|t| t.trim().to_ascii_lowercase()));
            }
        }
        headers.append(name, value);
    }
    // Built once: a policy's metrics registry costs far more than one input.
    static POLICY: std::sync::OnceLock<HeaderPolicy> = std::sync::OnceLock::new();
    let policy = POLICY.get_or_init(|| {
        let config = IdentityConfig {
            header: HeaderName::from_static("x-remote-user"),
            value: IdentityValue::Upn,
            netbios_domain: None,
            strip_headers: vec![],
        };
        let upstream = UpstreamConfig::with_defaults(http::Uri::from_static("http://127.0.0.1"));
        HeaderPolicy::new(&config, &upstream, &seg::metrics::Metrics::new())
    });
    let identity = HeaderValue::from_static("alice@corp.test");
    let peer = HeaderValue::from_static("203.0.113.7");
    policy.apply(&mut headers, &identity, &peer);

    let own: Vec<_> = headers.get_all("x-remote-user").iter().collect();
    assert_eq!(own, [&identity], "the identity header is seg's, once");
    for name in headers.keys() {
        assert!(
            REQUEST_HEADERS.contains(&name.as_str())
                || ["x-remote-user", "x-forwarded-for", "x-forwarded-proto"].contains(&name.as_str()),
            "{name} is not on the allow-list"
        );
        let folded = name.as_str().replace('_', "-");
        assert!(
            folded != "x-remote-user" || name.as_str() == "x-remote-user",
            "a look-alike identity header survived: {name}"
        );
        assert!(!folded.starts_with("x-webobjects-"), "{name} survived");
        // A framing header spelled with `_` would frame differently at an upstream that
        // folds `_` to `-`.
        assert!(
            !name.as_str().contains('_')
                || !["transfer-encoding", "content-length", "host", "expect"]
                    .contains(&folded.as_str()),
            "{name} survived"
        );
        for banned in [
            "authorization",
            "proxy-authorization",
            "x-forwarded-client-cert",
            "connection",
            "keep-alive",
            "te",
            "upgrade",
            "proxy-connection",
        ] {
            assert_ne!(name.as_str(), banned, "{banned} survived");
        }
    }
    for name in nominated {
        // Framing and routing headers are never removed; seg's own are added afresh.
        let protected = [
            "host",
            "content-length",
            "transfer-encoding",
            "x-remote-user",
            "x-forwarded-for",
            "x-forwarded-proto",
        ];
        if !name.is_empty() && !protected.contains(&name.as_str()) {
            assert!(!headers.contains_key(name.as_str()), "{name} was named by Connection");
        }
    }
});
