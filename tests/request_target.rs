//! What seg lets through to Exchange: only canonical request targets on the three paths it
//! serves, queries whose keys Exchange cannot read another way, and an allow-list of request
//! headers.
//!
//! Exchange's IIS front end decodes `%2e`, resolves `..` and merges slashes before it picks a
//! virtual directory, so `/Microsoft-Server-ActiveSync/../owa/` forwarded verbatim is a
//! request to OWA with seg's trusted identity header on it. The upstream here is a real
//! nginx that normalises the same way (`support::nginx`): its access log says which location
//! each forwarded request reached, and the tests assert that none reached OWA, ECP, EWS,
//! PowerShell or MAPI. Every row is raw bytes over a real TLS connection presenting alice's
//! admitted certificate, and names its expected status and audit reason; a table reports
//! every failing row, not only the first.
//!
//! The header allow-list is checked against the echo upstream (`seg::demo::echo`), which records
//! every header line it received, where nginx's log holds only the headers named in it.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use seg::demo::pki::LeafSpec;
use seg::Running;
use support::audit::{capture_audit, mark, since};
use support::lab::{
    config_text, start_seg, start_slapd, Client, Device, DirectoryRef, HttpResponse, Lab, Pki,
};
use support::nginx::{NormalisingUpstream, SeenRequest};
use support::slapd::{Slapd, UserSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ALICE: &str = "alice@corp.test";
/// A device type the gateway blocks, for the OPTIONS rows that must meet the device rules.
const BLOCKED_TYPE: &str = "EvilPhone";
/// The cookie ProxyLogon (CVE-2021-26855) sets to make Exchange's front end proxy a request
/// to a back end of the attacker's choosing.
const BE_RESOURCE: &str = "X-BEResource=localhost~1942062522";
/// How long one exchange may take.
const ROW_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The request target table.

/// What a row must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// seg answers itself with this status and audit reason; nothing reaches the upstream.
    Refused(u16, &'static str),
    /// Forwarded: nginx answers 200 from this location.
    Served(&'static str),
    /// A 400 from seg's HTTP codec, before any routing (and so before any audit reason):
    /// raw bytes `httparse` refuses in a request line.
    HeadRefused,
}

const NOT_CANONICAL: Expect = Expect::Refused(400, "path-not-canonical");
const NOT_SERVED: Expect = Expect::Refused(404, "path-not-served");
const METHOD_NOT_ALLOWED: Expect = Expect::Refused(405, "method-not-allowed");
const BAD_KEY: Expect = Expect::Refused(400, "query-bad-key");
const BAD_SEPARATOR: Expect = Expect::Refused(400, "query-bad-separator");
const BAD_CMD: Expect = Expect::Refused(400, "query-bad-cmd");
const DUPLICATE: Expect = Expect::Refused(400, "query-duplicate-parameter");
const NOT_ALLOWED: Expect = Expect::Refused(400, "query-not-allowed");
const USER_MISMATCH: Expect = Expect::Refused(403, "user-mismatch");
const ACTIVESYNC: Expect = Expect::Served("activesync");
const AUTODISCOVER: Expect = Expect::Served("autodiscover");

/// Request paths, each sent with POST and with OPTIONS, with the query each method needs to
/// be forwarded, so a row stands or falls on its path alone. A trailing `/` alone is
/// canonical (no `//`, no dot-segment): a path seg does not serve. nginx cannot show every
/// row's danger (it reads `\`, `%5c`, `%c0%ae`, `%u002e` and `;` literally, where IIS may
/// not), so the status and audit reason are the rows' own checks.
const PATHS: &[(&str, &[u8], Expect)] = &[
    // The spellings.
    (
        "dot-dot to owa",
        b"/Microsoft-Server-ActiveSync/../owa/",
        NOT_CANONICAL,
    ),
    (
        "encoded dot-dot to EWS",
        b"/Microsoft-Server-ActiveSync/%2e%2e/EWS/Exchange.asmx",
        NOT_CANONICAL,
    ),
    (
        "empty segments around dot-dot",
        b"//..//owa/",
        NOT_CANONICAL,
    ),
    (
        "raw backslash",
        b"/Microsoft-Server-ActiveSync/..\\owa/",
        NOT_CANONICAL,
    ),
    (
        "dot then dot-dot",
        b"/Microsoft-Server-ActiveSync/./../owa/",
        NOT_CANONICAL,
    ),
    (
        "encoded slashes",
        b"/Microsoft-Server-ActiveSync%2F..%2Fowa/",
        NOT_CANONICAL,
    ),
    (
        "upper-case encoded dot-dot-slash",
        b"/Microsoft-Server-ActiveSync/%2E%2E%2Fowa/",
        NOT_CANONICAL,
    ),
    (
        "encoded dot-dot-backslash",
        b"/Microsoft-Server-ActiveSync/%2e%2e%5cecp/",
        NOT_CANONICAL,
    ),
    (
        "path parameter then dot-dot",
        b"/Microsoft-Server-ActiveSync;/../ecp/",
        NOT_CANONICAL,
    ),
    (
        "encoded NUL segment",
        b"/Microsoft-Server-ActiveSync/%00/../owa",
        NOT_CANONICAL,
    ),
    (
        "autodiscover dot-dot",
        b"/autodiscover/../owa/",
        NOT_CANONICAL,
    ),
    (
        "default.eas up two",
        b"/Microsoft-Server-ActiveSync/default.eas/../../mapi/",
        NOT_CANONICAL,
    ),
    (
        "overlong UTF-8 dots",
        b"/Microsoft-Server-ActiveSync/%c0%ae%c0%ae/owa/",
        NOT_CANONICAL,
    ),
    // IIS's "best fit" mapping may read U+FF0E FULLWIDTH FULL STOP as `.`.
    (
        "raw fullwidth dots",
        b"/Microsoft-Server-ActiveSync/\xef\xbc\x8e\xef\xbc\x8e/owa/",
        NOT_CANONICAL,
    ),
    // More ways to spell a dot-segment, an empty segment or a separator.
    (
        "dot then encoded dot",
        b"/Microsoft-Server-ActiveSync/.%2e/PowerShell/",
        NOT_CANONICAL,
    ),
    (
        "encoded dot then dot",
        b"/Microsoft-Server-ActiveSync/%2e./ecp/",
        NOT_CANONICAL,
    ),
    (
        "empty segment then dot-dot",
        b"/Microsoft-Server-ActiveSync//../owa/",
        NOT_CANONICAL,
    ),
    (
        "leading empty segment",
        b"//Microsoft-Server-ActiveSync",
        NOT_CANONICAL,
    ),
    (
        "trailing dot-dot",
        b"/Microsoft-Server-ActiveSync/..",
        NOT_CANONICAL,
    ),
    (
        "trailing dot",
        b"/Microsoft-Server-ActiveSync/.",
        NOT_CANONICAL,
    ),
    (
        "dot before default.eas",
        b"/Microsoft-Server-ActiveSync/./default.eas",
        NOT_CANONICAL,
    ),
    (
        "encoded backslashes",
        b"/Microsoft-Server-ActiveSync/%5c..%5cowa/",
        NOT_CANONICAL,
    ),
    (
        "double-encoded dots",
        b"/Microsoft-Server-ActiveSync/%252e%252e/owa/",
        NOT_CANONICAL,
    ),
    (
        "IIS %u dots",
        b"/Microsoft-Server-ActiveSync/%u002e%u002e/owa/",
        NOT_CANONICAL,
    ),
    (
        "encoded letter",
        b"/%4Dicrosoft-Server-ActiveSync",
        NOT_CANONICAL,
    ),
    (
        "encoded control byte",
        b"/Microsoft-Server-ActiveSync/%01",
        NOT_CANONICAL,
    ),
    (
        "encoded slash to default.eas",
        b"/Microsoft-Server-ActiveSync%2fdefault.eas",
        NOT_CANONICAL,
    ),
    (
        "path parameter",
        b"/Microsoft-Server-ActiveSync/default.eas;.css",
        NOT_CANONICAL,
    ),
    (
        "dot-dot with parameter",
        b"/Microsoft-Server-ActiveSync/..;/owa/",
        NOT_CANONICAL,
    ),
    (
        "absolute form with dot-dot",
        b"http://localhost/Microsoft-Server-ActiveSync/../owa/",
        NOT_CANONICAL,
    ),
    // Canonical, but not one of the three served paths.
    (
        "empty trailing segment",
        b"/Microsoft-Server-ActiveSync/",
        NOT_SERVED,
    ),
    ("owa folder", b"/owa/", NOT_SERVED),
    ("autodiscover folder", b"/autodiscover/", NOT_SERVED),
    (
        "below default.eas",
        b"/Microsoft-Server-ActiveSync/default.eas/extra",
        NOT_SERVED,
    ),
    (
        "three dots are a name",
        b"/Microsoft-Server-ActiveSync/.../owa",
        NOT_SERVED,
    ),
    (
        "suffix on the name",
        b"/Microsoft-Server-ActiveSyncX",
        NOT_SERVED,
    ),
    ("owa", b"/owa", NOT_SERVED),
    ("ecp", b"/ecp/y.js", NOT_SERVED),
    ("EWS", b"/EWS/Exchange.asmx", NOT_SERVED),
    ("PowerShell", b"/PowerShell/Microsoft.Exchange", NOT_SERVED),
    ("mapi", b"/mapi/nspi", NOT_SERVED),
    (
        "autodiscover.json",
        b"/autodiscover/autodiscover.json",
        NOT_SERVED,
    ),
    ("autodiscover without a file", b"/autodiscover", NOT_SERVED),
    // Raw bytes the HTTP codec refuses in a request line, before any routing.
    (
        "raw NUL",
        b"/Microsoft-Server-ActiveSync/\x00/../owa",
        Expect::HeadRefused,
    ),
    (
        "raw control byte",
        b"/Microsoft-Server-ActiveSync/\x01/../owa",
        Expect::HeadRefused,
    ),
    (
        "raw DEL",
        b"/Microsoft-Server-ActiveSync/\x7f/../owa",
        Expect::HeadRefused,
    ),
    (
        "raw byte 0xff",
        b"/Microsoft-Server-ActiveSync/\xff/../owa/",
        Expect::HeadRefused,
    ),
];

#[tokio::test]
async fn non_canonical_and_unserved_paths_never_reach_the_upstream() {
    let gateway = Gateway::start().await;
    let mut rows = Vec::new();
    for (i, (name, path, expect)) in PATHS.iter().enumerate() {
        for method in ["POST", "OPTIONS"] {
            let tag = format!("P{i:02}{}", &method[..3]);
            let query = match method {
                "POST" => format!("Cmd=Sync&User=alice&DeviceId={tag}&DeviceType=iPhone"),
                _ => format!("User=alice&DeviceId={tag}&DeviceType=iPhone"),
            };
            let mut target = path.to_vec();
            target.extend_from_slice(format!("?{query}").as_bytes());
            rows.push(Row {
                name: format!("{method} {name} ({})", String::from_utf8_lossy(path)),
                tag,
                device: gateway.alice.clone(),
                head: head(method, &target, &[]),
                expect: *expect,
            });
        }
    }
    let mut failures = gateway.run(&rows).await;
    let seen = gateway.nginx.settled_requests();
    failures.extend(escaped(&seen));
    report(failures);
}

/// Requests nginx logged that Exchange would have routed outside ActiveSync and Autodiscover.
fn escaped(seen: &[SeenRequest]) -> Vec<String> {
    seen.iter()
        .filter(|r| {
            let uri = r.uri.to_ascii_lowercase();
            r.reached_a_backend()
                || !(uri.starts_with("/microsoft-server-activesync")
                    || uri.starts_with("/autodiscover/"))
        })
        .map(|r| {
            format!(
                "nginx routed {:?} {:?} as {:?} to location {:?} (status {})",
                r.method, r.request_uri, r.uri, r.location, r.status
            )
        })
        .collect()
}

#[tokio::test]
async fn the_served_paths_reach_the_upstream_as_sent() {
    let gateway = Gateway::start().await;
    let served: &[(&str, &str, Expect)] = &[
        (
            "POST",
            "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=D1&DeviceType=iPhone",
            ACTIVESYNC,
        ),
        (
            "POST",
            "/microsoft-server-activesync/Default.eas?Cmd=Sync&User=alice&DeviceId=D2&DeviceType=iPhone",
            ACTIVESYNC,
        ),
        (
            "POST",
            "/MICROSOFT-SERVER-ACTIVESYNC?Cmd=FolderSync&User=alice&DeviceId=D3&DeviceType=iPhone",
            ACTIVESYNC,
        ),
        ("OPTIONS", "/Microsoft-Server-ActiveSync", ACTIVESYNC),
        ("OPTIONS", "/Microsoft-Server-ActiveSync/default.eas", ACTIVESYNC),
        ("POST", "/Autodiscover/Autodiscover.xml", AUTODISCOVER),
        ("POST", "/autodiscover/autodiscover.xml", AUTODISCOVER),
        // Methods other than POST and OPTIONS (and OPTIONS on Autodiscover) are refused.
        ("GET", "/Microsoft-Server-ActiveSync", METHOD_NOT_ALLOWED),
        ("PUT", "/Microsoft-Server-ActiveSync", METHOD_NOT_ALLOWED),
        ("DELETE", "/Microsoft-Server-ActiveSync/default.eas", METHOD_NOT_ALLOWED),
        ("TRACE", "/Microsoft-Server-ActiveSync", METHOD_NOT_ALLOWED),
        ("PROPFIND", "/Microsoft-Server-ActiveSync", METHOD_NOT_ALLOWED),
        ("GET", "/autodiscover/autodiscover.xml", METHOD_NOT_ALLOWED),
        ("OPTIONS", "/autodiscover/autodiscover.xml", METHOD_NOT_ALLOWED),
    ];
    let rows: Vec<Row> = served
        .iter()
        .enumerate()
        .map(|(i, (method, target, expect))| Row {
            name: format!("{method} {target}"),
            tag: format!("S{i:02}"),
            device: gateway.alice.clone(),
            head: head(method, target.as_bytes(), &[]),
            expect: *expect,
        })
        .collect();
    let mut failures = gateway.run(&rows).await;
    let seen = gateway.nginx.settled_requests();
    for (method, target, expect) in served {
        let logged: Vec<&SeenRequest> = seen
            .iter()
            .filter(|r| r.request_uri == *target && r.method == *method)
            .collect();
        match expect {
            Expect::Served(marker) => match logged.as_slice() {
                [one]
                    if one.method == *method
                        && one.location == *marker
                        && one.x_remote_user == ALICE => {}
                other => failures.push(format!(
                    "{method} {target}: expected one {method} at {marker} as {ALICE}, \
                     forwarded exactly as sent; nginx logged {other:#?}"
                )),
            },
            _ if !logged.is_empty() => {
                failures.push(format!("{method} {target}: reached nginx: {logged:#?}"))
            }
            _ => {}
        }
    }
    failures.extend(escaped(&seen));
    report(failures);
}

// ---------------------------------------------------------------------------------------
// The query table.

/// Which certificate a row presents.
#[derive(Clone, Copy)]
enum Who {
    Alice,
    /// kim@corp.test: a name with a `k`, for the Kelvin sign.
    Kim,
}

/// Queries; `{id}` is the row's own DeviceId, so its audit record and nginx log line are
/// its own.
const QUERIES: &[(&str, &str, &str, Who, Expect)] = &[
    (
        "plain form",
        "POST",
        "Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        ACTIVESYNC,
    ),
    // A key Exchange may read as `User` after trimming, decoding or dropping brackets, which
    // seg would not bind to the certificate's account.
    (
        "space-escaped key",
        "POST",
        "Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone&%20User=bob",
        Who::Alice,
        BAD_KEY,
    ),
    (
        "plus-prefixed key",
        "POST",
        "Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone&+User=bob",
        Who::Alice,
        BAD_KEY,
    ),
    (
        "escaped brackets",
        "POST",
        "Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone&User%5B%5D=bob",
        Who::Alice,
        BAD_KEY,
    ),
    (
        "raw brackets",
        "POST",
        "Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone&User[]=bob",
        Who::Alice,
        BAD_KEY,
    ),
    (
        "trailing dot",
        "POST",
        "Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone&User.=bob",
        Who::Alice,
        BAD_KEY,
    ),
    (
        "long s in the key",
        "POST",
        "Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone&U%C5%BFer=bob",
        Who::Alice,
        BAD_KEY,
    ),
    (
        "escaped letter",
        "POST",
        "Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone&%55ser=bob",
        Who::Alice,
        BAD_KEY,
    ),
    (
        "escaped key alone",
        "POST",
        "Cmd=Sync&%55ser=bob&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        BAD_KEY,
    ),
    (
        "semicolon inside a value",
        "POST",
        "Cmd=Sync;User=bob&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        BAD_SEPARATOR,
    ),
    (
        "semicolon before a key",
        "POST",
        "Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone&;User=bob",
        Who::Alice,
        BAD_SEPARATOR,
    ),
    (
        "Cmd with a trailing escaped space",
        "POST",
        "Cmd=Ping%20&User=alice&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        BAD_CMD,
    ),
    (
        "Cmd with a leading escaped space",
        "POST",
        "Cmd=%20Ping&User=alice&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        BAD_CMD,
    ),
    (
        "Cmd with a trailing plus",
        "POST",
        "Cmd=Ping+&User=alice&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        BAD_CMD,
    ),
    (
        "User twice by case",
        "POST",
        "Cmd=Sync&User=alice&user=bob&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        DUPLICATE,
    ),
    (
        "Cmd twice by case",
        "POST",
        "Cmd=Sync&CMD=Ping&User=alice&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        DUPLICATE,
    ),
    (
        "lower-case user names bob",
        "POST",
        "Cmd=Sync&user=bob&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        USER_MISMATCH,
    ),
    (
        "lower-case keys name alice",
        "POST",
        "cmd=Sync&user=ALICE&deviceid={id}&devicetype=iPhone",
        Who::Alice,
        ACTIVESYNC,
    ),
    (
        "long s in the domain",
        "POST",
        "Cmd=Sync&User=alice@corp.te%C5%BFt&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        USER_MISMATCH,
    ),
    (
        "Kelvin sign for k",
        "POST",
        "Cmd=Sync&User=%E2%84%AAim&DeviceId={id}&DeviceType=iPhone",
        Who::Kim,
        USER_MISMATCH,
    ),
    (
        "ASCII case folding",
        "POST",
        "Cmd=Sync&User=KIM&DeviceId={id}&DeviceType=iPhone",
        Who::Kim,
        ACTIVESYNC,
    ),
    // OPTIONS carries User, DeviceId and DeviceType only, bound and checked as for POST.
    (
        "OPTIONS with its three keys",
        "OPTIONS",
        "User=alice&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        ACTIVESYNC,
    ),
    (
        "OPTIONS with Cmd",
        "OPTIONS",
        "Cmd=Sync&User=alice&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        NOT_ALLOWED,
    ),
    (
        "OPTIONS with another key",
        "OPTIONS",
        "User=alice&DeviceId={id}&DeviceType=iPhone&Foo=1",
        Who::Alice,
        NOT_ALLOWED,
    ),
    (
        "OPTIONS naming bob",
        "OPTIONS",
        "User=bob&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        USER_MISMATCH,
    ),
    (
        "OPTIONS lower-case user naming bob",
        "OPTIONS",
        "user=bob&DeviceId={id}&DeviceType=iPhone",
        Who::Alice,
        USER_MISMATCH,
    ),
    (
        "OPTIONS from a blocked device type",
        "OPTIONS",
        "User=alice&DeviceId={id}&DeviceType=EvilPhone",
        Who::Alice,
        Expect::Refused(403, "device-blocked"),
    ),
];

#[tokio::test]
async fn query_keys_exchange_could_read_another_way_are_refused() {
    let gateway = Gateway::start().await;
    let mut rows: Vec<Row> = QUERIES
        .iter()
        .enumerate()
        .map(|(i, (name, method, query, who, expect))| {
            let tag = format!("Q{i:02}");
            let target = format!(
                "/Microsoft-Server-ActiveSync?{}",
                query.replace("{id}", &tag)
            );
            Row {
                name: format!("{name}: {method} {target}"),
                device: gateway.device(*who),
                head: head(method, target.as_bytes(), &[]),
                tag,
                expect: *expect,
            }
        })
        .collect();
    // Autodiscover takes no query at all.
    for (i, query) in ["DeviceId=QA0", "User=alice", "a"].iter().enumerate() {
        let target = format!("/autodiscover/autodiscover.xml?{query}");
        rows.push(Row {
            name: format!("Autodiscover with a query: POST {target}"),
            tag: format!("QA{i}"),
            device: gateway.alice.clone(),
            head: head("POST", target.as_bytes(), &[]),
            expect: NOT_ALLOWED,
        });
    }
    let mut failures = gateway.run(&rows).await;
    let seen = gateway.nginx.settled_requests();
    for row in &rows {
        let id = format!("DeviceId={}", row.tag);
        let logged: Vec<&SeenRequest> = seen
            .iter()
            .filter(|r| {
                r.request_uri
                    .split(['?', '&'])
                    .any(|p| p.eq_ignore_ascii_case(&id))
            })
            .collect();
        match row.expect {
            Expect::Served(_) => {
                let upn = format!("{}@corp.test", row.device.name);
                if logged.len() != 1 || logged[0].x_remote_user != upn {
                    failures.push(format!("{}: nginx logged {logged:#?}", row.name));
                }
            }
            _ if !logged.is_empty() => {
                failures.push(format!("{}: reached nginx: {logged:#?}", row.name))
            }
            _ => {}
        }
    }
    // The Autodiscover rows have no DeviceId of their own to find them by.
    let autodiscover_with_query: Vec<&SeenRequest> = seen
        .iter()
        .filter(|r| {
            r.request_uri
                .to_ascii_lowercase()
                .starts_with("/autodiscover/")
                && r.request_uri.contains('?')
        })
        .collect();
    if !autodiscover_with_query.is_empty() {
        failures.push(format!(
            "Autodiscover queries reached nginx: {autodiscover_with_query:#?}"
        ));
    }
    failures.extend(escaped(&seen));
    report(failures);
}

// ---------------------------------------------------------------------------------------
// The Exchange CVEs' request shapes.

#[tokio::test]
async fn proxylogon_proxyshell_and_proxynotshell_shapes_never_reach_exchange() {
    let gateway = Gateway::start().await;
    let cookie: HeaderList = &[("Cookie", BE_RESOURCE)];
    const SHELL: &str =
        "/autodiscover/autodiscover.json?@evil.corp/mapi/nspi/?&Email=autodiscover/autodiscover.json%3F@evil.corp";
    const NOT_SHELL: &str = "/autodiscover/autodiscover.json?@evil.corp/owa/&Email=autodiscover/autodiscover.json%3F@evil.corp&Protocol=XYZ&FooProtocol=Powershell";
    let shapes: &[(&str, &str, &str, HeaderList, Expect)] = &[
        // CVE-2021-26855: the cookie names the back end; the path only has to exist.
        ("ProxyLogon", "POST", "/ecp/y.js", cookie, NOT_SERVED),
        ("ProxyLogon", "GET", "/ecp/y.js", cookie, NOT_SERVED),
        (
            "ProxyLogon cookie on ActiveSync",
            "POST",
            "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=LOGON&DeviceType=iPhone",
            cookie,
            ACTIVESYNC,
        ),
        // CVE-2021-34473: Autodiscover's "explicit logon" strips `autodiscover.json?@x` and
        // proxies the rest of the target to the back end.
        ("ProxyShell", "GET", SHELL, &[], NOT_SERVED),
        ("ProxyShell", "POST", SHELL, &[], NOT_SERVED),
        (
            "ProxyShell on autodiscover.xml",
            "POST",
            "/autodiscover/autodiscover.xml?@evil.corp/mapi/",
            &[],
            NOT_ALLOWED,
        ),
        (
            "ProxyShell on ActiveSync",
            "POST",
            "/Microsoft-Server-ActiveSync?@evil.corp/mapi/nspi/?&Cmd=Sync&User=alice&DeviceId=SHELL&DeviceType=iPhone",
            &[],
            BAD_KEY,
        ),
        (
            "ProxyShell behind a dot-dot",
            "POST",
            "/Microsoft-Server-ActiveSync/../autodiscover/autodiscover.json?@evil.corp/mapi/nspi/?&Email=autodiscover/autodiscover.json%3F@evil.corp",
            &[],
            NOT_CANONICAL,
        ),
        // CVE-2022-41040: the same path confusion toward PowerShell.
        ("ProxyNotShell", "GET", NOT_SHELL, &[], NOT_SERVED),
        ("ProxyNotShell", "POST", NOT_SHELL, &[], NOT_SERVED),
    ];
    let rows: Vec<Row> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, method, target, headers, expect))| Row {
            name: format!("{name}: {method} {target}"),
            tag: format!("C{i:02}"),
            device: gateway.alice.clone(),
            head: head(method, target.as_bytes(), headers),
            expect: *expect,
        })
        .collect();
    let mut failures = gateway.run(&rows).await;
    let seen = gateway.nginx.settled_requests();
    for r in &seen {
        let target = r.request_uri.to_ascii_lowercase();
        let exchange_would_act = target.contains("autodiscover.json")
            || target.contains("@evil.corp")
            || target.contains("/ecp")
            || !r.cookie.is_empty();
        let expected = r.request_uri.contains("DeviceId=LOGON") && r.location == "activesync";
        if exchange_would_act || !expected {
            failures.push(format!("nginx received a shape Exchange acts on: {r:#?}"));
        }
    }
    if !seen
        .iter()
        .any(|r| r.request_uri.contains("DeviceId=LOGON"))
    {
        failures.push("the ActiveSync POST with the cookie never reached nginx".into());
    }
    failures.extend(escaped(&seen));
    report(failures);
}

// ---------------------------------------------------------------------------------------
// The header allow-list, against the echo upstream.

/// Request header lines, name and value.
type HeaderList = &'static [(&'static str, &'static str)];

/// What happens to one request header.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Passed,
    Dropped,
}

/// One ActiveSync POST's headers besides Host and Content-Length.
const HEADERS: &[(&str, &str, Fate)] = &[
    (
        "Content-Type",
        "application/vnd.ms-sync.wbxml",
        Fate::Passed,
    ),
    ("Accept", "*/*", Fate::Passed),
    ("Accept-Language", "en-us", Fate::Passed),
    ("Accept-Encoding", "gzip, deflate", Fate::Passed),
    ("User-Agent", "Apple-iPhone9C1/1602.92", Fate::Passed),
    ("MS-ASProtocolVersion", "14.1", Fate::Passed),
    ("X-MS-PolicyKey", "1307199584", Fate::Passed),
    ("MS-ASAcceptMultiPart", "T", Fate::Passed),
    // Headers IIS, ARR, Exchange or an auth proxy act on: routing, method, identity.
    (
        "X-Original-URL",
        "/ecp/DDI/DDIService.svc/GetList",
        Fate::Dropped,
    ),
    ("X-Rewrite-URL", "/owa/", Fate::Dropped),
    ("X-HTTP-Method-Override", "DELETE", Fate::Dropped),
    ("X-ARR-ClientCert", "MIIB", Fate::Dropped),
    ("X-MS-CLIENT-PRINCIPAL-NAME", "ceo@corp.test", Fate::Dropped),
    ("X-AnchorMailbox", "ceo@corp.test", Fate::Dropped),
    ("X-Forwarded-Email", "ceo@corp.test", Fate::Dropped),
    ("X-Auth-Request-User", "ceo", Fate::Dropped),
    ("X-User", "ceo", Fate::Dropped),
    ("True-Client-IP", "10.9.8.7", Fate::Dropped),
    ("X-Client-IP", "10.9.8.7", Fate::Dropped),
    ("Cookie", BE_RESOURCE, Fate::Dropped),
    ("X-Remote-User", "ceo@corp.test", Fate::Dropped),
    ("Keep-Alive", "timeout=5", Fate::Dropped),
];

/// What seg itself adds or rebuilds on every forwarded request.
const ADDED_BY_SEG: [&str; 5] = [
    "host",
    "content-length",
    "x-remote-user",
    "x-forwarded-for",
    "x-forwarded-proto",
];

#[tokio::test]
async fn request_headers_outside_the_allow_list_never_reach_the_upstream() {
    capture_audit();
    let lab = Lab::start(vec![UserSpec::with_upn("alice")], "").await;
    let alice = lab.pki.device(LeafSpec::device("alice").upn(ALICE));
    let listener = Listener::of(&lab.seg, &lab.pki);
    let headers: Vec<(&str, &str)> = HEADERS.iter().map(|(n, v, _)| (*n, *v)).collect();
    let target = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=H1&DeviceType=iPhone";
    let response = exchange(
        &listener,
        &alice,
        &head("POST", target.as_bytes(), &headers),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = lab.upstream.requests();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    let seen = &seen[0];
    let mut failures = Vec::new();
    for (name, value, fate) in HEADERS {
        let values = seen.header_values(name);
        // The device's X-Remote-User is dropped; seg's own, from the certificate, replaces it.
        let expected = match fate {
            Fate::Passed => vec![*value],
            Fate::Dropped if name.eq_ignore_ascii_case("x-remote-user") => vec![ALICE],
            Fate::Dropped => vec![],
        };
        if values != expected {
            failures.push(format!(
                "{name}: {value:?} sent, {values:?} arrived, {expected:?} expected"
            ));
        }
    }
    for (name, value) in &seen.headers {
        let allowed = HEADERS
            .iter()
            .any(|(n, _, fate)| *fate == Fate::Passed && n.eq_ignore_ascii_case(name))
            || ADDED_BY_SEG.contains(&name.as_str());
        if !allowed {
            failures.push(format!("{name}: {value} is not on the allow-list"));
        }
    }
    // Every dropped header counted once, under its reason.
    let dropped = |reason: &str| {
        lab.metric(&format!(
            "seg_request_headers_dropped_total{{reason=\"{reason}\"}}"
        ))
    };
    let counted = [
        ("cookie", dropped("cookie"), 1.0),
        ("hop-by-hop", dropped("hop-by-hop"), 1.0),
        // Which of the client-named identity headers seg files as identity rather than
        // not-allowed is its own choice; together they are the other twelve.
        (
            "identity + not-allowed",
            dropped("identity") + dropped("not-allowed"),
            12.0,
        ),
    ];
    for (reason, value, expected) in counted {
        if value != expected {
            failures.push(format!(
                "seg_request_headers_dropped_total {reason}: {value}, expected {expected}"
            ));
        }
    }
    report(failures);
}

#[tokio::test]
async fn a_repeated_single_valued_header_is_refused() {
    capture_audit();
    let lab = Lab::start(vec![UserSpec::with_upn("alice")], "").await;
    let alice = lab.pki.device(LeafSpec::device("alice").upn(ALICE));
    let duplicates: &[(&str, &[(&str, &str)])] = &[
        (
            "User-Agent",
            &[
                ("User-Agent", "Apple-iPhone/1"),
                ("User-Agent", "Outlook/2"),
            ],
        ),
        (
            "User-Agent by case",
            &[
                ("User-Agent", "Apple-iPhone/1"),
                ("user-agent", "Outlook/2"),
            ],
        ),
        (
            "MS-ASProtocolVersion",
            &[
                ("MS-ASProtocolVersion", "14.1"),
                ("MS-ASProtocolVersion", "2.5"),
            ],
        ),
        (
            "X-MS-PolicyKey",
            &[("X-MS-PolicyKey", "1"), ("X-MS-PolicyKey", "0")],
        ),
        (
            "Content-Type",
            &[
                ("Content-Type", "application/vnd.ms-sync.wbxml"),
                ("Content-Type", "text/xml"),
            ],
        ),
    ];
    let rows: Vec<Row> = duplicates
        .iter()
        .enumerate()
        .map(|(i, (name, headers))| {
            let tag = format!("DUP{i}");
            let target = format!(
                "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={tag}&DeviceType=iPhone"
            );
            Row {
                name: format!("two {name} headers"),
                device: alice.clone(),
                head: head("POST", target.as_bytes(), headers),
                tag,
                expect: Expect::Refused(400, "duplicate-header"),
            }
        })
        .collect();
    let mut failures = run_rows(&Listener::of(&lab.seg, &lab.pki), &rows).await;
    let seen = lab.upstream.requests();
    if !seen.is_empty() {
        failures.push(format!("the upstream received {seen:#?}"));
    }
    report(failures);
}

#[tokio::test]
async fn headers_and_cookies_the_operator_lists_are_forwarded() {
    capture_audit();
    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .expect("echo upstream");
    let lab = Lab::start_edited(
        Pki::new(),
        vec![UserSpec::with_upn("alice")],
        upstream,
        |text| {
            assert!(text.contains(support::lab::ECHO_CONTROLS));
            text.replacen(
                support::lab::ECHO_CONTROLS,
                "forward_headers = [\"X-Extra\"]\nforward_cookies = [\"keep\", \"also\"]\n",
                1,
            )
        },
    )
    .await;
    let alice = lab.pki.device(LeafSpec::device("alice").upn(ALICE));
    let target = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=FWD1&DeviceType=iPhone";
    let headers = [
        ("X-Extra", "listed"),
        ("X-Other", "not listed"),
        ("Cookie", "drop=1; keep=2"),
        ("Cookie", &format!("{BE_RESOURCE}; also=3")),
    ];
    let response = exchange(
        &Listener::of(&lab.seg, &lab.pki),
        &alice,
        &head("POST", target.as_bytes(), &headers),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = &lab.upstream.requests()[0];
    assert_eq!(seen.header_values("x-extra"), ["listed"]);
    assert!(seen.header_values("x-other").is_empty(), "{seen:#?}");
    assert_eq!(
        seen.header_values("cookie"),
        ["keep=2; also=3"],
        "only the listed cookies, in one Cookie header"
    );
}

#[tokio::test]
async fn the_admin_listener_answers_get_and_head_only() {
    let lab = Lab::start(vec![UserSpec::with_upn("alice")], "").await;
    let methods = [
        ("GET", 200),
        ("HEAD", 200),
        ("POST", 405),
        ("PUT", 405),
        ("DELETE", 405),
        ("PATCH", 405),
        ("OPTIONS", 405),
        ("TRACE", 405),
    ];
    let mut failures = Vec::new();
    // The status page and the device API read too; the one thing POSTed is a certificate to
    // /api/decision, which answers without one 415 (below, and in tests/devices.rs).
    let admin = lab.seg.admin_addr;
    for path in [
        "/metrics",
        "/healthz",
        "/",
        "/api/devices?account=alice",
        "/api/decision",
    ] {
        for (method, expected) in methods {
            let expected = match (path, method) {
                ("/api/devices?account=alice", "HEAD") => 405,
                ("/api/decision", "GET" | "HEAD") => 405,
                ("/api/decision", "POST") => 415,
                _ => expected,
            };
            let mut tcp = TcpStream::connect(admin).await.expect("admin");
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            tcp.write_all(request.as_bytes()).await.expect("write");
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(ROW_LIMIT, tcp.read_to_end(&mut answer)).await;
            let answer = String::from_utf8_lossy(&answer);
            let status = answer.split(' ').nth(1).unwrap_or("");
            if status != expected.to_string() {
                failures.push(format!(
                    "{method} {path}: expected {expected}, got {answer:?}"
                ));
            }
        }
    }
    report(failures);
}

// ---------------------------------------------------------------------------------------
// The lab: slapd, nginx, seg.

/// seg in front of the normalising nginx, with alice's and kim's devices.
struct Gateway {
    nginx: NormalisingUpstream,
    listener: Listener,
    alice: Device,
    kim: Device,
    _seg: Running,
    _slapd: Slapd,
    _pki: Pki,
}

impl Gateway {
    async fn start() -> Gateway {
        capture_audit();
        let pki = Pki::new();
        let slapd = start_slapd(
            &pki,
            vec![UserSpec::with_upn("alice"), UserSpec::with_upn("kim")],
        );
        let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
        let nginx = NormalisingUpstream::start();
        let rules = format!("[activesync]\nblock_device_types = [\"{BLOCKED_TYPE}\"]\n");
        let text = config_text(&pki, &directory, nginx.addr, &rules);
        let seg = start_seg(&pki.dir.write("seg.toml", &text)).await;
        Gateway {
            listener: Listener::of(&seg, &pki),
            alice: pki.device(LeafSpec::device("alice").upn(ALICE)),
            kim: pki.device(LeafSpec::device("kim").upn("kim@corp.test")),
            nginx,
            _seg: seg,
            _slapd: slapd,
            _pki: pki,
        }
    }

    fn device(&self, who: Who) -> Device {
        match who {
            Who::Alice => self.alice.clone(),
            Who::Kim => self.kim.clone(),
        }
    }

    async fn run(&self, rows: &[Row]) -> Vec<String> {
        run_rows(&self.listener, rows).await
    }
}

/// seg's device listener, and a client of the lab's PKI for it.
struct Listener {
    client: Client,
    addr: SocketAddr,
}

impl Listener {
    fn of(seg: &Running, pki: &Pki) -> Listener {
        Listener {
            client: Client::new(seg.listen_addr, &pki.ca_path),
            addr: seg.listen_addr,
        }
    }
}

/// One request of a table.
struct Row {
    name: String,
    /// The row's DeviceId where its query has one: its audit records are its own.
    tag: String,
    device: Device,
    head: Vec<u8>,
    expect: Expect,
}

/// Runs every row on a connection of its own; the failures, each naming its row.
async fn run_rows(listener: &Listener, rows: &[Row]) -> Vec<String> {
    let mut failures = Vec::new();
    for row in rows {
        let got = match exchange(listener, &row.device, &row.head).await {
            Ok(got) => got,
            Err(e) => {
                failures.push(format!("{}: {e}", row.name));
                continue;
            }
        };
        let fine = match row.expect {
            Expect::Refused(status, reason) => {
                got.status == status && got.reason.as_deref() == Some(reason)
            }
            Expect::Served(marker) => got.status == 200 && got.body == format!("{marker}\n"),
            // Whether the codec's refusal is audited is not this table's concern.
            Expect::HeadRefused => got.status == 400,
        };
        if !fine {
            failures.push(format!(
                "{}: expected {:?}, got {} with audit reason {:?} and body {:?}",
                row.name, row.expect, got.status, got.reason, got.body
            ));
        }
    }
    failures
}

/// What the device got for one request, and the reason seg's audit record gave.
struct Exchanged {
    status: u16,
    body: String,
    reason: Option<String>,
}

/// Sends `head` on a new TLS connection presenting `device`; reads the response and finds
/// the request's audit record by the connection's source address.
async fn exchange(listener: &Listener, device: &Device, head: &[u8]) -> Result<Exchanged, String> {
    let before = mark();
    let tcp = TcpStream::connect(listener.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let peer = tcp.local_addr().map_err(|e| e.to_string())?;
    let mut conn = listener
        .client
        .connect_over(tcp, Some(device))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let response: HttpResponse = tokio::time::timeout(ROW_LIMIT, async {
        conn.send_raw(head).await?;
        conn.read_response().await
    })
    .await
    .map_err(|_| "no response in time".to_string())?
    .map_err(|e| format!("no response: {e}"))?;
    Ok(Exchanged {
        status: response.status,
        body: response.text(),
        reason: audit_reason(before, peer).await,
    })
}

/// The reason of the audit record of the request from `peer` among those written after
/// `before` (a port is used again by later connections of the same test process), waiting a
/// little for it (a record is written when its response body ends); `None` when seg wrote
/// none.
async fn audit_reason(before: usize, peer: SocketAddr) -> Option<String> {
    let peer = peer.to_string();
    for _ in 0..50 {
        if let Some(record) = since(before).iter().find(|r| r["peer"] == peer.as_str()) {
            return Some(record["reason"].as_str().unwrap_or("").to_string());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// A request head: the method, the raw target, Host, an empty body and `headers`.
fn head(method: &str, target: &[u8], headers: &[(&str, &str)]) -> Vec<u8> {
    let mut head = format!("{method} ").into_bytes();
    head.extend_from_slice(target);
    head.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n");
    for (name, value) in headers {
        head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Fails with every failure listed, one a line.
fn report(failures: Vec<String>) {
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
