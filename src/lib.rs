//! seg, the Secure Email Gateway: devices present a client certificate from the enterprise
//! CA, seg maps it to one Active Directory account through a cached LDAP lookup and forwards
//! each ActiveSync request to the mail server as that account.
//!
//! # Layout
//!
//! Data flows top to bottom; each folder is one concern. The layers, lowest first (a module
//! uses its own layer and the ones below, never a higher one; no two files import each other
//! in a loop: `tests/architecture.rs` checks both):
//!
//! 1. Foundations, using nothing of seg:
//!    - [`clock`]: the wall clock decisions read (certificate validity, session age); tests
//!      move it. Also the random fraction that spreads work over a window.
//!    - [`limiter`]: a bound on concurrent work against a dependency, with a bounded queue.
//!    - [`certs`]: PEM certificate bundles read whole; the error naming the key they come from.
//!    - [`syntax`]: values named by the configuration and certificates: `ldap:///` URLs as AD
//!      CS writes them, IP networks.
//!    - [`secrets`]: files of secrets shared by replicas (the first line seals, all open).
//! 2. [`config`]: the TOML file → typed `Config`; every problem reported with its key path;
//!    the mapping rules' vocabulary.
//! 3. Sources:
//!    - [`metrics`]: every Prometheus metric, on one registry.
//!    - [`directory`]: accounts by `Lookup` — AD over LDAP (pool, failover, RFC 4515
//!      escaping) or an in-process LDIF directory for the demo.
//! 4. Outputs and shared state:
//!    - [`audit`]: the audit log, one JSON line per request, formed by hand and written in
//!      batches by its own thread to stdout and a file; bounded, flushed on shutdown.
//!    - [`fleet`]: the store the replicas share (Redis or Valkey, `[fleet]`): sealed entries
//!      under a time budget, locks, block lists; a miss whenever it is late or wrong.
//! 5. Decisions about a certificate and a request:
//!    - [`identity`]: `CertFacts` read once from a certificate, the mapping rules and their
//!      strength, account checks, the `Identity` a request is forwarded as; the resolver
//!      (certificate → decision, cached by leaf SHA-256, coalesced, bounded) and its snapshot
//!      (warm restart).
//!    - [`activesync`]: the ActiveSync request model (both query forms, `Command`).
//!    - [`revocation`]: the CRLs in force (base and delta) for the verifier and the
//!      per-request check; the online checks (OCSP, distribution points over http:// and
//!      ldap://), hard-fail unless a `danger_` key opts out.
//! 6. [`tls`]: the listener's rustls configuration, the client-certificate policy (chain,
//!    EKU, deltas, the alert that names a refusal), session tickets bound to the trust
//!    policy and `tls.session_lifetime`, the NTAuth store.
//! 7. Connections and what rides on them:
//!    - [`transport`]: the TLS driver both sides run on (rustls's unbuffered API), the PROXY
//!      protocol header from the L4 front.
//!    - [`upstream`]: connections to the mail server, their pool, the HTTP/1.1 exchange run
//!      in the device connection's task.
//!    - [`kerberos`]: constrained delegation (S4U2Self + S4U2Proxy) toward the upstream.
//!    - [`policy`]: `User=` binding, device allow/block rules, long-poll caps.
//!    - [`devices`]: what the gateway knows about each device, live and bounded (a layer
//!      of its own below these).
//! 8. [`proxy`]: accept, connection caps, handshake, the device connection, slow-client
//!    limits, the per-request decision, header hygiene, forwarding, refusals, audit.
//! 9. The whole: [`app`] (a configuration built into a running gateway, reloads, drain),
//!    [`mapcheck`] (`seg map`: the listener's validation and mapping for one certificate,
//!    explained) and [`admin`] (the admin listener: `/metrics`, `/healthz`, `/readyz`, the
//!    device API with the live decision for a certificate, and the status page).
//! 10. [`demo`]: `seg demo`, the whole job on one machine, with its throwaway PKI and an
//!     ActiveSync stand-in that answers with what it received (also used by the tests).

pub mod activesync;
pub mod admin;
pub mod app;
pub mod audit;
pub mod certs;
pub mod clock;
pub mod config;
pub mod demo;
pub mod devices;
pub mod directory;
pub mod fleet;
pub mod http1;
pub mod identity;
pub mod kerberos;
pub mod limiter;
pub mod mapcheck;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod revocation;
pub mod secrets;
pub mod syntax;
pub mod tls;
pub mod transport;
pub mod upstream;

pub use app::{files_signature, App, BuildError, ReloadError, Running};
