//! seg, the Secure Email Gateway: devices present a client certificate from the enterprise
//! CA, seg maps it to one Active Directory account through a cached LDAP lookup and forwards
//! each ActiveSync request to the mail server as that account.
//!
//! # Layout
//!
//! Data flows top to bottom. The lower modules (`config` to `tls`) never use the proxy, the
//! admin listener or the command line.
//!
//! - [`config`]: the TOML file → typed `Config`; every problem reported with its key path.
//! - [`directory`]: accounts by `Lookup` — AD over LDAP (pool, failover, RFC 4515 escaping)
//!   or an in-process LDIF directory for the demo.
//! - [`identity`]: `CertFacts` read once from a certificate, the mapping rules and their
//!   strength, account checks, the `Identity` a request is forwarded as.
//! - [`activesync`]: the ActiveSync request model (both query forms, `Command`).
//! - [`policy`]: `User=` binding, device allow/block rules, long-poll caps.
//! - [`metrics`]: every Prometheus metric, on one registry.
//! - [`resolver`]: certificate → decision, cached by leaf SHA-256, coalesced, bounded.
//! - [`kerberos`]: constrained delegation (S4U2Self + S4U2Proxy) toward the upstream: the
//!   impersonated credential per account, cached and bounded; KDC answers → decisions.
//! - [`clock`]: the wall clock decisions read (certificate validity, session age); tests
//!   move it.
//! - [`tls`]: the listener's rustls configuration and client-certificate policy (EKU).
//! - [`ntauth`]: the NTAuth store: which CAs may issue logon certificates, from a file and
//!   the directory, as a domain controller decides.
//! - [`limiter`]: a bound on concurrent work against a dependency, with a bounded queue.
//! - [`revocation`]: CRLs (base and delta), for the verifier and the per-request check.
//! - [`online`]: revocation checked online on each request (OCSP, distribution-point
//!   CRLs), hard-fail unless a `danger_` key opts out; the plain-HTTP client they share.
//! - [`ocsp`]: OCSP requests built, responses verified, answers cached until nextUpdate.
//! - [`crl_fetch`]: CRLs fetched from distribution points and URLs (http://, and ldap://
//!   over the directory's connections), verified, refreshed ahead of their nextUpdate.
//! - [`ldap_url`]: the `ldap:///…?certificateRevocationList` URLs AD CS writes.
//! - [`snapshot`]: the identity cache written at shutdown and read at start (warm restart).
//! - [`tickets`]: session resumption with a bound: tickets shared by replicas, bound to the
//!   trust policy, and the TLS 1.2 session cache, each resumed only within
//!   `tls.session_lifetime`.
//! - [`pki`]: a throwaway CA and certificates for the demo and the tests.
//! - [`proxy_protocol`]: the PROXY protocol header from the L4 front, and source networks.
//! - [`proxy`]: accept, connection caps, handshake, slow-client limits, per-request decision,
//!   header hygiene, forwarding on upstream connections driven in the device's task, audit.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`mapcheck`]: `seg map` — the listener's validation and mapping for one certificate,
//!   explained.
//! - [`echo`]: an ActiveSync stand-in that answers with what it received (demo, tests).
//! - [`demo`]: `seg demo`, the whole job on one machine.
//!
//! [`App`] assembles a configuration into running listeners.

pub mod activesync;
pub mod admin;
pub mod app;
pub mod certs;
pub mod clock;
pub mod config;
pub mod demo;
pub mod directory;
pub mod identity;
pub mod kerberos;
pub mod limiter;
pub mod mapcheck;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod revocation;
pub mod syntax;
pub mod tls;
pub mod transport;
pub mod upstream;

pub use app::{files_signature, App, BuildError, ReloadError, Running};
