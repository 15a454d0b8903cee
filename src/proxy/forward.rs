//! The upstream hop: which request headers go on, and the requests to the ActiveSync server.
//!
//! Headers go by allow-list (`HeaderPolicy`): a request carries upstream only the headers
//! ActiveSync and Autodiscover need (`activesync::REQUEST_HEADERS`), those the operator
//! names in `upstream.forward_headers`, the cookies named in `upstream.forward_cookies`, and
//! what seg adds itself: the identity header, `X-Forwarded-For` and `X-Forwarded-Proto`,
//! added last so nothing the client sent can remove or replace them. Everything else is
//! dropped and counted by why: a deny-list is spelled around (Exchange alone acts on
//! `X-AnchorMailbox`, the `X-BEResource` cookie and IIS on `X-Original-URL`), an allow-list
//! is not.

use std::sync::Arc;
use std::time::Duration;

use super::connection::CountingBody;
use crate::upstream::conn::{Connector, PoolKey, UpstreamConn};
use crate::upstream::exchange::{self, BodyFault, ClientError, SendError, UpstreamBody};
use crate::upstream::pool::Pool;

/// A request on its way to the upstream, its body the device's.
pub type Outgoing = exchange::Outgoing<CountingBody>;

/// Why an exchange with the upstream failed, and whose fault it was: the gateway maps it to
/// the device's answer in one place (`Gateway::exchange_failed`).
#[derive(Debug)]
pub enum ExchangeError {
    /// The device's request body failed: too slow, broken framing, the device gone.
    Device(BodyFault),
    /// No connection to the upstream: no slot free, or the connect failed.
    Unreachable,
    /// No response head within `upstream.request_timeout`.
    Timeout,
    /// The upstream broke the exchange: closed, or answered what seg refuses to relay.
    Failed,
}
use super::refusal::Refusal;
use crate::activesync::{REQUEST_HEADERS, SINGLE_VALUED_HEADERS};
use crate::config::{IdentityConfig, UpstreamConfig};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use prometheus::IntCounter;
use tokio::sync::Semaphore;

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the historic ones).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Client headers that claim an identity or a forwarding path. Not on the allow-list, so
/// never forwarded; named so that their drop is counted as `identity`, and so that
/// `upstream.forward_headers` cannot name them.
pub const IDENTITY_HEADERS: [&str; 17] = [
    "authorization",
    "x-remote-user",
    "remote-user",
    "x-forwarded-user",
    "x-authenticated-user",
    "x-forwarded-client-cert",
    "client-cert",
    "client-cert-chain",
    "x-client-cert",
    "x-ssl-client-cert",
    "x-ssl-client-s-dn",
    "x-webobjects-remote-user",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
];

/// Headers a `Connection` token may never remove: framing and routing.
const CONNECTION_PROTECTED: [&str; 2] = ["content-length", "host"];

/// Which request headers go upstream and what seg adds.
pub struct HeaderPolicy {
    identity_header: HeaderName,
    /// False in Kerberos mode: the request names its user by `Authorization: Negotiate`
    /// only, never by a header an upstream might trust instead.
    sets_identity_header: bool,
    /// `upstream.forward_headers`, lowercase.
    extra: Vec<HeaderName>,
    /// The headers read as one value (`SINGLE_VALUED_HEADERS` and `extra`): twice is refused.
    single_valued: Vec<HeaderName>,
    /// `upstream.forward_cookies`: the cookie names kept; empty drops every cookie.
    cookies: Vec<String>,
    /// `identity.strip_headers` and the identity header, lowercase with `-`: counted as
    /// identity headers when dropped (they never pass the allow-list).
    identity_names: Vec<String>,
    dropped: DroppedCounters,
}

/// `seg_request_headers_dropped_total`, one counter per reason, resolved once.
struct DroppedCounters {
    hop_by_hop: IntCounter,
    identity: IntCounter,
    cookie: IntCounter,
    not_allowed: IntCounter,
}

/// A request seg must refuse because of its headers: a header it reads or forwards as one
/// value came twice, so seg and the upstream could read different ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DuplicateHeader;

impl HeaderPolicy {
    pub fn new(
        identity: &IdentityConfig,
        upstream: &UpstreamConfig,
        metrics: &crate::metrics::Metrics,
    ) -> HeaderPolicy {
        let folded = |name: &str| name.to_ascii_lowercase().replace('_', "-");
        let identity_names = std::iter::once(folded(identity.header.as_str()))
            .chain(identity.strip_headers.iter().map(|h| folded(h)))
            .collect();
        let counter = |reason: &str| metrics.request_headers_dropped.with_label_values(&[reason]);
        HeaderPolicy {
            identity_header: identity.header.clone(),
            sets_identity_header: true,
            extra: upstream.forward_headers.clone(),
            single_valued: SINGLE_VALUED_HEADERS
                .iter()
                .map(|name| HeaderName::from_static(name))
                .chain(upstream.forward_headers.iter().cloned())
                .collect(),
            cookies: upstream.forward_cookies.clone(),
            identity_names,
            dropped: DroppedCounters {
                hop_by_hop: counter("hop-by-hop"),
                identity: counter("identity"),
                cookie: counter("cookie"),
                not_allowed: counter("not-allowed"),
            },
        }
    }

    /// The same policy, without adding the identity header (Kerberos mode).
    pub fn without_identity_header(mut self) -> HeaderPolicy {
        self.sets_identity_header = false;
        self
    }

    /// Refuses a request that carries twice a header seg reads or forwards as one value
    /// (two `User-Agent`s: seg would check the first against the block rules, a server might
    /// read the last).
    pub fn check(&self, headers: &HeaderMap) -> Result<(), DuplicateHeader> {
        let twice = |name: &HeaderName| {
            let mut values = headers.get_all(name).iter();
            values.next().is_some() && values.next().is_some()
        };
        if self.single_valued.iter().any(twice) {
            return Err(DuplicateHeader);
        }
        Ok(())
    }

    /// Keeps the allowed headers (and cookies), then adds the identity and the device's
    /// address.
    pub fn apply(&self, headers: &mut HeaderMap, identity: &HeaderValue, peer_ip: &HeaderValue) {
        let nominated = connection_nominated(headers);
        let mut kept = HeaderMap::with_capacity(headers.len() + 3);
        let mut cookies: Vec<u8> = Vec::new();
        let mut current: Option<HeaderName> = None;
        for (name, value) in headers.drain() {
            if let Some(name) = name {
                current = Some(name);
            }
            let Some(name) = &current else { continue };
            let lower = name.as_str();
            if name == header::HOST {
                // The upstream's own is set when the request is prepared.
                continue;
            }
            if HOP_BY_HOP.contains(&lower) || nominated.iter().any(|n| n == lower) {
                self.dropped.hop_by_hop.inc();
            } else if name == header::COOKIE {
                self.keep_cookies(&value, &mut cookies);
            } else if self.is_identity(lower) {
                // Never forwarded, whatever the lists say.
                self.dropped.identity.inc();
            } else if REQUEST_HEADERS.contains(&lower) || self.extra.contains(name) {
                kept.append(name.clone(), value);
            } else {
                self.dropped.not_allowed.inc();
            }
        }
        if !cookies.is_empty() {
            if let Ok(value) = HeaderValue::from_bytes(&cookies) {
                kept.insert(header::COOKIE, value);
            }
        }
        *headers = kept;
        if self.sets_identity_header {
            headers.insert(self.identity_header.clone(), identity.clone());
        }
        headers.insert("x-forwarded-for", peer_ip.clone());
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    }

    /// Appends the cookies of one `Cookie` header whose names are listed, `; `-separated.
    fn keep_cookies(&self, value: &HeaderValue, out: &mut Vec<u8>) {
        let mut dropped = self.cookies.is_empty();
        for pair in value.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if pair.is_empty() {
                continue;
            }
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &b""[..]),
            };
            // Only a plain cookie value (RFC 6265 §4.1.1): a `,` or a space in it would let an
            // upstream that also splits on `,` read a second cookie seg never listed.
            if self.cookies.iter().any(|c| c.as_bytes() == name) && is_cookie_value(value) {
                if !out.is_empty() {
                    out.extend_from_slice(b"; ");
                }
                out.extend_from_slice(pair);
            } else {
                dropped = true;
            }
        }
        if dropped {
            self.dropped.cookie.inc();
        }
    }

    /// A client-sent identity or forwarding header, in any case and with `_` for `-`.
    fn is_identity(&self, name: &str) -> bool {
        let folded_eq = |expected: &str| {
            expected.len() == name.len()
                && expected
                    .bytes()
                    .zip(name.bytes())
                    .all(|(a, b)| a == if b == b'_' { b'-' } else { b })
        };
        IDENTITY_HEADERS.iter().any(|h| folded_eq(h))
            || self.identity_names.iter().any(|h| folded_eq(h))
            // SOGo trusts every `x-webobjects-*` header (the user, its server name and URL).
            || name.len() >= 13 && name[..13].replace('_', "-") == "x-webobjects-"
    }
}

/// RFC 6265 §4.1.1 `cookie-value`: cookie-octets, optionally in double quotes.
fn is_cookie_value(value: &[u8]) -> bool {
    let inner = value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(value);
    inner
        .iter()
        .all(|&b| matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e))
}

/// The header names a `Connection` header lists, lowercase, except framing and routing.
fn connection_nominated(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && !CONNECTION_PROTECTED.contains(&t.as_str()))
        .collect()
}

/// Removes the hop-by-hop headers and those a `Connection` header names (never framing or
/// routing ones), from a request or a response.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let nominated = connection_nominated(headers);
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for name in &nominated {
        headers.remove(name.as_str());
    }
}

/// The ActiveSync server: where requests go and the idle connections to it.
pub struct Upstream {
    connector: Connector,
    /// Idle connections; in Kerberos mode keyed by account, because an upstream that keeps
    /// Kerberos authentication per connection (IIS) must never see a connection carry two
    /// users.
    pool: Arc<Pool>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    host: HeaderValue,
    path_prefix: String,
    request_timeout: Duration,
    /// Slots for opening new connections (`upstream.max_connecting`): requests that find no
    /// idle connection all at once (a restart under a fleet's held Pings) reach the server
    /// as a bounded stream of handshakes, not as one burst.
    connecting: Semaphore,
    max_connecting: usize,
    connect_timeout: Duration,
    /// Counts the requests that had to wait for a slot (`seg_upstream_connect_waits_total`).
    connect_waits: prometheus::IntCounter,
}

/// An upstream setup problem.
#[derive(Debug, thiserror::Error)]
#[error("upstream.ca_file: {0}")]
pub struct UpstreamSetupError(String);

impl Upstream {
    /// The upstream of `config`; `connect_waits` counts the requests that wait for a
    /// connection slot.
    pub fn new(
        config: &UpstreamConfig,
        connect_waits: prometheus::IntCounter,
    ) -> Result<Upstream, UpstreamSetupError> {
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &config.ca_file {
            let certs = crate::certs::read_certs(ca, "upstream.ca_file")
                .map_err(|e| UpstreamSetupError(e.message))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| UpstreamSetupError(e.to_string()))?;
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamSetupError(e.to_string()))?;
        // No CA file: an http:// upstream (an https:// one without it is a config error), so
        // an empty trust store that can verify nothing.
        let tls = if roots.is_empty() {
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            let verifier =
                crate::tls::upstream_verifier(roots).map_err(|e| UpstreamSetupError(e.message))?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        };
        let scheme = config
            .url
            .scheme()
            .cloned()
            .unwrap_or(http::uri::Scheme::HTTP);
        let authority = config
            .url
            .authority()
            .cloned()
            .ok_or_else(|| UpstreamSetupError("upstream.url has no host".into()))?;
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|e| UpstreamSetupError(e.to_string()))?;
        let https = scheme == http::uri::Scheme::HTTPS;
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = https.then(|| {
            let mut tls = tls;
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(tls)
        });
        let connector = Connector::new(authority.host(), port, tls, config.connect_timeout)
            .map_err(UpstreamSetupError)?;
        Ok(Upstream {
            connector,
            pool: Pool::new(config.pool_max_idle_per_host, 1, config.pool_idle_timeout),
            scheme,
            authority,
            host,
            path_prefix: config.path_prefix.clone(),
            request_timeout: config.request_timeout,
            connecting: Semaphore::new(config.max_connecting),
            max_connecting: config.max_connecting,
            connect_timeout: config.connect_timeout,
            connect_waits,
        })
    }

    /// The upstream request target (origin form) for a device's path and query.
    pub fn uri_for(&self, device_uri: &Uri) -> Result<Uri, Refusal> {
        let path_and_query = device_uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut target = String::with_capacity(self.path_prefix.len() + path_and_query.len());
        target.push_str(&self.path_prefix);
        target.push_str(path_and_query);
        Uri::builder()
            .path_and_query(target)
            .build()
            .map_err(|_| Refusal::NotFound)
    }

    /// Keeps idle connections per account (Kerberos mode), for at most `max_accounts`
    /// accounts at a time.
    pub fn pooled_per_account(mut self, max_accounts: u64) -> Upstream {
        self.pool = self
            .pool
            .with_max_keys(usize::try_from(max_accounts).unwrap_or(usize::MAX));
        self
    }

    /// Encodes a request for the upstream: its head as seg writes it, with the upstream's
    /// own `Host`. Boxed, so the futures that carry it stay small.
    pub fn prepare(
        &self,
        mut request: Request<CountingBody>,
    ) -> Result<Box<Outgoing>, ExchangeError> {
        request
            .headers_mut()
            .insert(header::HOST, self.host.clone());
        Outgoing::new(request).map(Box::new).map_err(|e| {
            tracing::debug!(target: "seg::upstream", error = %e, "request not sendable");
            ExchangeError::Failed
        })
    }

    /// Sends one prepared request; with an `account` (Kerberos mode) only on that account's
    /// own connections. The body streams; a request is sent again, on a new connection, only
    /// if not one byte of it was written.
    pub async fn send(
        &self,
        account: Option<&Arc<str>>,
        outgoing: Box<Outgoing>,
    ) -> Result<Response<UpstreamBody>, ExchangeError> {
        let key = account.cloned();
        match tokio::time::timeout(self.request_timeout, self.exchange(key, outgoing)).await {
            Err(_) => Err(ExchangeError::Timeout),
            Ok(result) => result,
        }
    }

    async fn exchange(
        &self,
        key: PoolKey,
        mut outgoing: Box<Outgoing>,
    ) -> Result<Response<UpstreamBody>, ExchangeError> {
        // An idle connection may have been closed by the upstream a moment ago; then the
        // request is unsent and goes out on another one. A new connection is the last try.
        loop {
            let (conn, fresh) = match self.pool.take(&key) {
                Some(conn) => (conn, false),
                // Boxed: a connect's state (DNS, TCP, TLS) would otherwise enlarge every
                // request's future, held Pings included.
                None => Box::pin(self.open(&key)).await?,
            };
            // The wait for the head is bounded in `send`; a silence within the body is
            // bounded alike.
            match exchange::send(conn, outgoing, &self.pool, self.request_timeout).await {
                Ok(response) => return Ok(response),
                Err(SendError::Unsent(e, unsent)) if !fresh => {
                    tracing::debug!(target: "seg::upstream", error = %e, "idle upstream connection closed; sending on another");
                    outgoing = unsent;
                }
                Err(SendError::Unsent(e, _)) => {
                    tracing::warn!(target: "seg::upstream", error = %e, "new upstream connection closed at once");
                    return Err(ExchangeError::Failed);
                }
                // Reading the device's body failed (broken framing, too slow, the device
                // gone): the device is answered for it; the upstream did nothing wrong.
                Err(SendError::Failed(ClientError::Body(fault))) => {
                    tracing::debug!(target: "seg::upstream", error = %fault, "request body failed");
                    return Err(ExchangeError::Device(*fault));
                }
                Err(SendError::Failed(e)) => {
                    tracing::warn!(target: "seg::upstream", error = %e, "upstream request failed");
                    return Err(ExchangeError::Failed);
                }
            }
        }
    }

    /// A connection for `key` and whether it is new: opened once one of the
    /// `upstream.max_connecting` slots is free, or an idle one given back to the pool during
    /// the wait. The wait is bounded by `upstream.connect_timeout`, as a connect is: slots
    /// that stay taken mean connects that are not completing.
    async fn open(&self, key: &PoolKey) -> Result<(UpstreamConn, bool), ExchangeError> {
        if self.connecting.available_permits() == 0 {
            self.connect_waits.inc();
        }
        let slot = match tokio::time::timeout(self.connect_timeout, self.connecting.acquire()).await
        {
            Ok(Ok(slot)) => slot,
            _ => {
                tracing::warn!(target: "seg::upstream", max_connecting = self.max_connecting, connect_timeout = ?self.connect_timeout, "no upstream connection slot free within the connect timeout");
                return Err(ExchangeError::Unreachable);
            }
        };
        if let Some(conn) = self.pool.take(key) {
            return Ok((conn, false));
        }
        let conn = self.connect(key.clone()).await;
        drop(slot);
        Ok((conn?, true))
    }

    async fn connect(&self, key: PoolKey) -> Result<UpstreamConn, ExchangeError> {
        match self.connector.connect().await {
            Ok(io) => Ok(UpstreamConn::new(io, key)),
            Err(e) => {
                tracing::warn!(target: "seg::upstream", error = %e, "upstream connect failed");
                Err(ExchangeError::Unreachable)
            }
        }
    }

    /// Checks that the upstream accepts TCP connections, for `/readyz`.
    pub async fn probe(&self) -> bool {
        let port =
            self.authority
                .port_u16()
                .unwrap_or(if self.scheme == http::uri::Scheme::HTTPS {
                    443
                } else {
                    80
                });
        let host = self
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        matches!(
            tokio::time::timeout(
                Duration::from_secs(3),
                tokio::net::TcpStream::connect((host, port))
            )
            .await,
            Ok(Ok(_))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IdentityValue;

    fn policy_with(forward_headers: &[&str], forward_cookies: &[&str]) -> HeaderPolicy {
        let upstream = UpstreamConfig {
            forward_headers: forward_headers
                .iter()
                .map(|h| HeaderName::from_bytes(h.as_bytes()).unwrap())
                .collect(),
            forward_cookies: forward_cookies.iter().map(|c| c.to_string()).collect(),
            ..UpstreamConfig::with_defaults("http://127.0.0.1:1".parse().unwrap())
        };
        HeaderPolicy::new(
            &IdentityConfig {
                header: HeaderName::from_static("x-remote-user"),
                value: IdentityValue::Upn,
                netbios_domain: None,
                strip_headers: vec!["X-Custom-Identity".into()],
            },
            &upstream,
            &crate::metrics::Metrics::new(),
        )
    }

    fn policy() -> HeaderPolicy {
        policy_with(&[], &[])
    }

    fn headers(rows: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in rows {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    fn apply(policy: &HeaderPolicy, h: &mut HeaderMap) {
        policy.apply(
            h,
            &HeaderValue::from_static("alice@corp.test"),
            &HeaderValue::from_static("192.0.2.7"),
        );
    }

    #[test]
    fn only_allowed_headers_reach_the_upstream() {
        let mut h = headers(&[
            ("content-type", "application/vnd.ms-sync.wbxml"),
            ("content-length", "5"),
            ("user-agent", "Apple-iPhone9C1/1602.92"),
            ("ms-asprotocolversion", "16.1"),
            ("x-ms-policykey", "3942919513"),
            ("accept-language", "en-us"),
            // What Exchange, IIS and ARR act on, and what other gateways trust.
            ("x-original-url", "/ecp/"),
            ("x-rewrite-url", "/ecp/"),
            ("x-http-method-override", "DELETE"),
            ("x-arr-clientcert", "MIIB"),
            ("x-ms-client-principal-name", "ceo@corp.test"),
            ("x-anchormailbox", "ceo@corp.test"),
            ("x-forwarded-email", "ceo@corp.test"),
            ("x-auth-request-user", "ceo"),
            ("x-user", "ceo"),
            ("true-client-ip", "10.0.0.1"),
            ("x-client-ip", "10.0.0.1"),
            ("cookie", "X-BEResource=localhost/owa/auth/x.js~1942062522"),
            ("expect", "100-continue"),
            ("content_type", "text/plain"),
        ]);
        apply(&policy(), &mut h);
        let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept-language",
                "content-length",
                "content-type",
                "ms-asprotocolversion",
                "user-agent",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-ms-policykey",
                "x-remote-user",
            ]
        );
        assert_eq!(h["content-type"], "application/vnd.ms-sync.wbxml");
    }

    #[test]
    fn spoofed_identities_are_replaced() {
        let mut h = headers(&[
            ("x-remote-user", "bob"),
            ("X-REMOTE-USER", "bob2"),
            ("x_remote_user", "bob3"),
            ("X_Remote-User", "bob4"),
            ("x-forwarded-client-cert", "Hash=1"),
            ("authorization", "Basic Ym9iOng="),
            ("x-custom-identity", "bob"),
            ("x_webobjects_remote_user", "bob"),
            ("x-forwarded-for", "10.0.0.1"),
        ]);
        let policy = policy_with(&["X-Custom-Identity", "x-remote-user"], &[]);
        apply(&policy, &mut h);
        assert_eq!(
            h.get_all("x-remote-user").iter().collect::<Vec<_>>(),
            ["alice@corp.test"]
        );
        assert!(h.get("x-custom-identity").is_none(), "strip_headers wins");
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["192.0.2.7"]
        );
        assert_eq!(policy.dropped.identity.get(), 9);
        assert_eq!(policy.dropped.not_allowed.get(), 0);
    }

    #[test]
    fn operator_headers_and_cookies_are_kept_by_name() {
        let policy = policy_with(&["x-device-note"], &["ASP.NET_SessionId", "lb"]);
        let mut h = headers(&[
            ("x-device-note", "kept"),
            ("x-other", "dropped"),
            (
                "cookie",
                "X-BEResource=localhost~1942062522; lb=7; msExchEcpCanary=x",
            ),
            ("cookie", "ASP.NET_SessionId=abc;lbx=1"),
            // A comma would read as a second cookie at a parser that splits on it.
            ("cookie", "lb=7, X-BEResource=localhost~1"),
        ]);
        apply(&policy, &mut h);
        assert_eq!(h["x-device-note"], "kept");
        assert!(h.get("x-other").is_none());
        assert_eq!(
            h.get_all("cookie").iter().collect::<Vec<_>>(),
            ["lb=7; ASP.NET_SessionId=abc"]
        );
        assert_eq!(policy.dropped.cookie.get(), 3);
        assert_eq!(policy.dropped.not_allowed.get(), 1);
        // Without forward_cookies no cookie passes.
        let mut h = headers(&[("cookie", "lb=7")]);
        apply(&self::policy(), &mut h);
        assert!(h.get("cookie").is_none());
    }

    #[test]
    fn connection_tokens_cannot_remove_gateway_headers() {
        let mut h = headers(&[
            (
                "connection",
                "close, X-Remote-User, x-forwarded-for, content-length, user-agent",
            ),
            ("user-agent", "Apple"),
            ("content-length", "5"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
        ]);
        let policy = policy();
        apply(&policy, &mut h);
        assert_eq!(h["x-remote-user"], "alice@corp.test");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["content-length"], "5");
        for gone in ["connection", "user-agent", "upgrade", "te"] {
            assert!(h.get(gone).is_none(), "{gone} survived");
        }
        assert_eq!(policy.dropped.hop_by_hop.get(), 4);
    }

    #[test]
    fn a_header_read_as_one_value_may_come_once() {
        let policy = policy_with(&["x-device-note"], &[]);
        for name in [
            "user-agent",
            "content-type",
            "ms-asprotocolversion",
            "x-ms-policykey",
            "x-device-note",
        ] {
            let twice = headers(&[(name, "a"), (name, "b")]);
            assert_eq!(policy.check(&twice), Err(DuplicateHeader), "{name}");
            assert_eq!(policy.check(&headers(&[(name, "a")])), Ok(()), "{name}");
        }
        assert_eq!(
            policy.check(&headers(&[("accept", "a"), ("accept", "b")])),
            Ok(())
        );
    }
}
