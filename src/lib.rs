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
//! - [`tls`]: the listener's rustls configuration and client-certificate policy (EKU).
//! - [`pki`]: a throwaway CA and certificates for the demo and the tests.
//! - [`proxy`]: accept, handshake, per-request decision, header hygiene, forwarding, audit.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`mapcheck`]: `seg map` — the listener's validation and mapping for one certificate,
//!   explained.
//! - [`echo`]: an ActiveSync stand-in that answers with what it received (demo, tests).
//! - [`demo`]: `seg demo`, the whole job on one machine.
//!
//! [`App`] assembles a configuration into running listeners.

pub mod activesync;
pub mod admin;
pub mod config;
pub mod demo;
pub mod directory;
pub mod echo;
pub mod identity;
pub mod mapcheck;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod proxy;
pub mod resolver;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use admin::Health;
use config::{Config, DirectoryConfig};
use directory::{Directory, DirectoryError};
use metrics::Metrics;
use proxy::{Gateway, HeaderPolicy, Upstream, UpstreamSetupError};
use resolver::Resolver;

/// Why a configuration could not be turned into a gateway.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("directory: {0}")]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
}

/// A gateway built from a configuration, not yet listening.
pub struct App {
    config: Config,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    directory: Arc<Directory>,
    resolver: Arc<Resolver>,
    tls: Arc<rustls::ServerConfig>,
}

/// A running gateway: its bound addresses and the handle to stop it.
pub struct Running {
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub resolver: Arc<Resolver>,
    pub health: Arc<Health>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl App {
    /// Reads keys, certificates and the bind password; contacts nothing yet.
    pub fn build(config: Config) -> Result<App, BuildError> {
        let metrics = Arc::new(Metrics::new());
        let tls = tls::server_config(&config.tls)?;
        if let DirectoryConfig::Ldap(l) = &config.directory {
            if l.danger_allow_plaintext {
                tracing::warn!(target: "seg::config", "directory.danger_allow_plaintext is set: the bind password may cross the network in clear");
            }
        }
        let directory = Arc::new(Directory::from_config(&config.directory)?);
        let upstream = Upstream::new(&config.upstream)?;
        let resolver = Arc::new(Resolver::new(
            Arc::clone(&directory),
            &config.mapping,
            &config.account,
            &config.identity,
            &config.cache,
            Arc::clone(&metrics),
        ));
        Ok(App {
            config,
            upstream,
            metrics,
            directory,
            resolver,
            tls,
        })
    }

    /// The resolver `seg map` uses: the same one the listener would.
    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.resolver
    }

    /// Binds both listeners and starts serving.
    pub async fn start(self) -> std::io::Result<Running> {
        let listener = TcpListener::bind(self.config.listen.address).await?;
        let admin_listener = TcpListener::bind(self.config.admin.address).await?;
        let listen_addr = listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let gateway = Arc::new(Gateway {
            resolver: Arc::clone(&self.resolver),
            upstream: self.upstream,
            headers: HeaderPolicy::new(&self.config.identity),
            long_polls: Arc::new(policy::LongPolls::new(
                &self.config.activesync,
                self.metrics.long_polls.clone(),
            )),
            activesync: self.config.activesync.clone(),
            netbios_domain: self.config.identity.netbios_domain.clone(),
            metrics: Arc::clone(&self.metrics),
            listen: self.config.listen.clone(),
        });
        let health = Arc::new(Health::default());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(Arc::clone(&gateway).serve(
                listener,
                Arc::clone(&self.tls),
                shutdown_rx.clone(),
            )),
            tokio::spawn(admin::serve(
                admin_listener,
                Arc::clone(&self.metrics),
                Arc::clone(&health),
                shutdown_rx.clone(),
            )),
            tokio::spawn(probe_dependencies(
                Arc::clone(&self.directory),
                gateway,
                Arc::clone(&health),
                self.config.admin.probe_interval,
                shutdown_rx,
            )),
        ];
        tracing::info!(target: "seg::listener", %listen_addr, %admin_addr, "seg serving");
        Ok(Running {
            listen_addr,
            admin_addr,
            metrics: self.metrics,
            resolver: self.resolver,
            health,
            shutdown,
            tasks,
        })
    }
}

impl Running {
    /// Stops accepting, lets open requests finish (bounded), and returns.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Keeps `/readyz` and `seg_dependency_up` current.
async fn probe_dependencies(
    directory: Arc<Directory>,
    gateway: Arc<Gateway>,
    health: Arc<Health>,
    interval: std::time::Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let directory_up = match directory.probe().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(target: "seg::directory", error = %e, "directory probe failed");
                false
            }
        };
        let upstream_up = gateway.upstream.probe().await;
        health.directory_up.store(directory_up, Ordering::Release);
        health.upstream_up.store(upstream_up, Ordering::Release);
        let gauge = &gateway.metrics.dependency_up;
        gauge
            .with_label_values(&["directory"])
            .set(directory_up as i64);
        gauge
            .with_label_values(&["upstream"])
            .set(upstream_up as i64);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}
