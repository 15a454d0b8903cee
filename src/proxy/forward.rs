//! The upstream hop: header hygiene and the requests to the ActiveSync server.
//!
//! Hygiene runs before seg adds anything: hop-by-hop headers and the headers a `Connection`
//! token names are removed, then every client-supplied identity header in any spelling
//! (case, `_` for `-`, duplicates), `Authorization` and the forwarding headers. Only then
//! are the identity header, `X-Forwarded-For` and `X-Forwarded-Proto` added, so nothing the
//! client sent can remove or replace them.

use std::sync::Arc;
use std::time::Duration;

use super::audit::CountingBody;
use super::client::{
    self, ClientError, Connector, Outgoing, SendError, UpstreamBody, UpstreamConn,
};
use super::pool::{Pool, PoolKey};
use super::refusal::Refusal;
use crate::config::{IdentityConfig, UpstreamConfig};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
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

/// Client headers that claim an identity or a forwarding path; always removed.
const IDENTITY_HEADERS: [&str; 17] = [
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

/// Prefixes of client headers that are always removed: SOGo trusts every `x-webobjects-*`
/// header it receives (the user, and the server name and URL it builds links from).
const STRIPPED_PREFIXES: [&str; 1] = ["x-webobjects-"];

/// Framing and routing headers besides the hop-by-hop ones; spelled with `_` they are
/// removed.
const UNDERSCORE_FRAMING: [&str; 3] = ["content-length", "host", "expect"];

/// Headers a `Connection` token may never remove: framing and routing.
const CONNECTION_PROTECTED: [&str; 2] = ["content-length", "host"];

/// Which request headers are stripped and what seg adds.
pub struct HeaderPolicy {
    identity_header: HeaderName,
    /// False in Kerberos mode: the request names its user by `Authorization: Negotiate`
    /// only, never by a header an upstream might trust instead.
    sets_identity_header: bool,
    /// Lowercase names with `-`; compared against names with `_` folded to `-`.
    stripped: Vec<String>,
}

impl HeaderPolicy {
    pub fn new(config: &IdentityConfig) -> HeaderPolicy {
        let mut stripped: Vec<String> = IDENTITY_HEADERS.iter().map(|s| s.to_string()).collect();
        let own = config.header.as_str().replace('_', "-");
        for name in std::iter::once(own).chain(
            config
                .strip_headers
                .iter()
                .map(|h| h.to_ascii_lowercase().replace('_', "-")),
        ) {
            if !stripped.contains(&name) {
                stripped.push(name);
            }
        }
        HeaderPolicy {
            identity_header: config.header.clone(),
            sets_identity_header: true,
            stripped,
        }
    }

    /// The same hygiene, without adding the identity header (Kerberos mode).
    pub fn without_identity_header(mut self) -> HeaderPolicy {
        self.sets_identity_header = false;
        self
    }

    /// Cleans the client's headers, then adds the identity and the device's address.
    pub fn apply(&self, headers: &mut HeaderMap, identity: &HeaderValue, peer_ip: &HeaderValue) {
        remove_hop_by_hop(headers);
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| self.is_stripped(name.as_str()))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
        if self.sets_identity_header {
            headers.insert(self.identity_header.clone(), identity.clone());
        }
        headers.insert("x-forwarded-for", peer_ip.clone());
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    }

    fn is_stripped(&self, name: &str) -> bool {
        let folded_eq = |expected: &str, seen: &str| {
            expected
                .bytes()
                .zip(seen.bytes())
                .all(|(a, b)| a == if b == b'_' { b'-' } else { b })
        };
        self.stripped
            .iter()
            .any(|s| s.len() == name.len() && folded_eq(s, name))
            // `Transfer_Encoding`, `Content_Length`: an upstream that reads `_` as `-` would
            // frame the body differently from seg.
            || name.contains('_')
                && HOP_BY_HOP
                    .iter()
                    .chain(&UNDERSCORE_FRAMING)
                    .any(|f| f.len() == name.len() && folded_eq(f, name))
            || STRIPPED_PREFIXES
                .iter()
                .any(|p| name.len() >= p.len() && folded_eq(p, &name[..p.len()]))
    }
}

/// Removes the hop-by-hop headers and those a `Connection` header names (never framing or
/// routing ones), from a request or a response.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let nominated: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && !CONNECTION_PROTECTED.contains(&t.as_str()))
        .collect();
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
            let certs = crate::tls::read_certs(ca, "upstream.ca_file")
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
    pub fn prepare(&self, mut request: Request<CountingBody>) -> Result<Box<Outgoing>, Refusal> {
        request
            .headers_mut()
            .insert(header::HOST, self.host.clone());
        Outgoing::new(request).map(Box::new).map_err(|e| {
            tracing::debug!(target: "seg::upstream", error = %e, "request not sendable");
            Refusal::UpstreamFailed
        })
    }

    /// Sends one prepared request; with an `account` (Kerberos mode) only on that account's
    /// own connections. The body streams; a request is sent again, on a new connection, only
    /// if not one byte of it was written.
    pub async fn send(
        &self,
        account: Option<&Arc<str>>,
        outgoing: Box<Outgoing>,
    ) -> Result<Response<UpstreamBody>, Refusal> {
        let key = account.cloned();
        match tokio::time::timeout(self.request_timeout, self.exchange(key, outgoing)).await {
            Err(_) => Err(Refusal::UpstreamTimeout),
            Ok(result) => result,
        }
    }

    async fn exchange(
        &self,
        key: PoolKey,
        mut outgoing: Box<Outgoing>,
    ) -> Result<Response<UpstreamBody>, Refusal> {
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
            match client::send(conn, outgoing, &self.pool, self.request_timeout).await {
                Ok(response) => return Ok(response),
                Err(SendError::Unsent(e, unsent)) if !fresh => {
                    tracing::debug!(target: "seg::upstream", error = %e, "idle upstream connection closed; sending on another");
                    outgoing = unsent;
                }
                Err(SendError::Unsent(e, _)) => {
                    tracing::warn!(target: "seg::upstream", error = %e, "new upstream connection closed at once");
                    return Err(Refusal::UpstreamFailed);
                }
                // Reading the device's body failed (broken framing, too slow): the caller
                // answers the device; the upstream did nothing wrong.
                Err(SendError::Failed(e @ ClientError::Body(_))) => {
                    tracing::debug!(target: "seg::upstream", error = %e, "request body failed");
                    return Err(Refusal::UpstreamFailed);
                }
                Err(SendError::Failed(e)) => {
                    tracing::warn!(target: "seg::upstream", error = %e, "upstream request failed");
                    return Err(Refusal::UpstreamFailed);
                }
            }
        }
    }

    /// A connection for `key` and whether it is new: opened once one of the
    /// `upstream.max_connecting` slots is free, or an idle one given back to the pool during
    /// the wait. The wait is bounded by `upstream.connect_timeout`, as a connect is: slots
    /// that stay taken mean connects that are not completing.
    async fn open(&self, key: &PoolKey) -> Result<(UpstreamConn, bool), Refusal> {
        if self.connecting.available_permits() == 0 {
            self.connect_waits.inc();
        }
        let slot = match tokio::time::timeout(self.connect_timeout, self.connecting.acquire()).await
        {
            Ok(Ok(slot)) => slot,
            _ => {
                tracing::warn!(target: "seg::upstream", max_connecting = self.max_connecting, connect_timeout = ?self.connect_timeout, "no upstream connection slot free within the connect timeout");
                return Err(Refusal::UpstreamUnreachable);
            }
        };
        if let Some(conn) = self.pool.take(key) {
            return Ok((conn, false));
        }
        let conn = self.connect(key.clone()).await;
        drop(slot);
        Ok((conn?, true))
    }

    async fn connect(&self, key: PoolKey) -> Result<UpstreamConn, Refusal> {
        match self.connector.connect().await {
            Ok(io) => Ok(UpstreamConn::new(io, key)),
            Err(e) => {
                tracing::warn!(target: "seg::upstream", error = %e, "upstream connect failed");
                Err(Refusal::UpstreamUnreachable)
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

    fn policy() -> HeaderPolicy {
        HeaderPolicy::new(&IdentityConfig {
            header: HeaderName::from_static("x-remote-user"),
            value: IdentityValue::Upn,
            netbios_domain: None,
            strip_headers: vec!["X-Custom-Identity".into()],
        })
    }

    #[test]
    fn spoofed_identities_are_replaced() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("x-remote-user", "bob"),
            ("X-REMOTE-USER", "bob2"),
            ("x_remote_user", "bob3"),
            ("X_Remote-User", "bob4"),
            ("x-forwarded-client-cert", "Hash=1"),
            ("authorization", "Basic Ym9iOng="),
            ("x-custom-identity", "bob"),
            ("x_webobjects_remote_user", "bob"),
            ("x-forwarded-for", "10.0.0.1"),
            ("content-type", "application/vnd.ms-sync.wbxml"),
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static(value),
            );
        }
        policy().apply(
            &mut h,
            &HeaderValue::from_static("alice@corp.test"),
            &HeaderValue::from_static("192.0.2.7"),
        );
        assert_eq!(
            h.get_all("x-remote-user").iter().collect::<Vec<_>>(),
            ["alice@corp.test"]
        );
        for gone in [
            "x_remote_user",
            "x_remote-user",
            "x-forwarded-client-cert",
            "authorization",
            "x-custom-identity",
            "x_webobjects_remote_user",
        ] {
            assert!(h.get(gone).is_none(), "{gone} survived");
        }
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["192.0.2.7"]
        );
        assert_eq!(h["content-type"], "application/vnd.ms-sync.wbxml");
    }

    #[test]
    fn framing_headers_spelled_with_underscores_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert("transfer_encoding", HeaderValue::from_static("chunked"));
        headers.insert("content_length", HeaderValue::from_static("5"));
        headers.insert("x_custom_header", HeaderValue::from_static("kept"));
        policy().apply(
            &mut headers,
            &HeaderValue::from_static("alice"),
            &HeaderValue::from_static("192.0.2.1"),
        );
        assert!(!headers.contains_key("transfer_encoding"));
        assert!(!headers.contains_key("content_length"));
        assert_eq!(headers["x_custom_header"], "kept");
    }

    #[test]
    fn connection_tokens_cannot_remove_gateway_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static(
                "close, X-Remote-User, x-forwarded-for, content-length, x-extra",
            ),
        );
        h.insert("x-extra", HeaderValue::from_static("1"));
        h.insert("content-length", HeaderValue::from_static("5"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("te", HeaderValue::from_static("trailers"));
        policy().apply(
            &mut h,
            &HeaderValue::from_static("alice@corp.test"),
            &HeaderValue::from_static("192.0.2.7"),
        );
        assert_eq!(h["x-remote-user"], "alice@corp.test");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["content-length"], "5");
        for gone in ["connection", "x-extra", "upgrade", "te"] {
            assert!(h.get(gone).is_none(), "{gone} survived");
        }
    }
}
