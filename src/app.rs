//! The gateway assembled and run: a configuration built into its parts (`build_gateway`),
//! the listeners bound and served (`App::start`), reloads that keep what did not change, the
//! background tasks (dependency probes, the NTAuth refresh, the identity snapshot), and the
//! drain at shutdown.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Health;
use crate::config::{Config, DirectoryConfig};
use crate::directory::{Directory, DirectoryError};
use crate::identity::resolver::Resolver;
use crate::metrics::Metrics;
use crate::proxy::{Gateway, HeaderPolicy, Live, Upstream, UpstreamSetupError};

/// Why a configuration could not be turned into a gateway.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Tls(#[from] crate::certs::TlsError),
    #[error("directory: {0}")]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    #[error("identity.mode = \"kerberos\": {0}")]
    Kerberos(String),
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
}

/// Why a reload was refused; the old configuration keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("{0} changes only on restart")]
    NeedsRestart(&'static str),
}

/// A gateway built from a configuration, not yet listening.
pub struct App {
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
}

/// A running gateway: its bound addresses and the handle to reload or stop it.
pub struct Running {
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    live: Arc<Live>,
    drain: watch::Sender<Option<crate::proxy::DrainPlan>>,
    serving: JoinHandle<()>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Builds every part of a gateway from one configuration. Parts whose configuration did not
/// change are carried over from `previous` (the identity cache above all, so a reload does
/// not send every device to the domain controllers at once).
fn build_gateway(
    config: Config,
    metrics: &Arc<Metrics>,
    previous: Option<&Gateway>,
    clock: &crate::clock::Clock,
) -> Result<Gateway, BuildError> {
    // The CRLs in force are shared by every configuration: this one's files plus the CRLs
    // fetched over HTTP so far (while fetching stays on).
    let current_revocation = match previous {
        Some(p) => Arc::clone(&p.revocation),
        None => Arc::new(crate::revocation::CurrentRevocation::default()),
    };
    let crl_files = crate::revocation::RevocationList::load(&config.tls.crl_files)?;
    let fetching = config.revocation.fetches_crls();
    let revocation = if fetching {
        current_revocation.with_files(&crl_files)
    } else {
        crl_files.clone()
    };
    let verifier = Arc::new(crate::tls::ClientCertPolicy::build(
        &config.tls,
        &revocation,
        fetching,
    )?);
    let tls = crate::tls::server_config(&config.tls, Arc::clone(&verifier), clock)?;
    // The NTAuth store read from the directory survives a reload that keeps its settings and
    // trust anchors, so a DC outage during a reload does not empty it.
    let ntauth = match previous.filter(|p| {
        p.config.ntauth == config.ntauth && p.config.tls.client_ca == config.tls.client_ca
    }) {
        Some(p) if p.ntauth.is_some() => p.ntauth.clone(),
        _ => crate::tls::ntauth::NtAuthStore::build(&config.ntauth, &config.tls.client_ca)?,
    };
    if let DirectoryConfig::Ldap(l) = &config.directory {
        if l.danger_allow_plaintext {
            tracing::warn!(target: "seg::config", "directory.danger_allow_plaintext is set: the bind password may cross the network in clear");
        }
    }
    if config.tls.danger_allow_unknown_revocation_status {
        tracing::warn!(target: "seg::config", "tls.danger_allow_unknown_revocation_status is set: certificates whose issuer has no CRL are accepted");
    }
    if !config.activesync.bind_user {
        tracing::warn!(target: "seg::config", "activesync.danger_allow_any_user is set: devices may name any mailbox in User=");
    }
    // The fleet store's client lives as long as the process ([fleet] changes only on
    // restart); a reload reads its key file again (a rotation).
    let fleet = match (&config.fleet, previous.and_then(|p| p.fleet.clone())) {
        (Some(_), Some(fleet)) => {
            fleet.reload_keys()?;
            Some(fleet)
        }
        (Some(fleet_config), None) => {
            let fleet_metrics = crate::metrics::FleetMetrics::new();
            metrics.register_fleet(&fleet_metrics);
            Some(Arc::new(crate::fleet::Fleet::connect(
                fleet_config,
                fleet_metrics,
            )?))
        }
        (None, _) => None,
    };
    // The identity cache survives a reload that leaves identities as they were; new
    // directory files (a rotated bind password, a new DC CA) get a new directory under it.
    let directory_files = directory_files_digest(&config.directory);
    let identity_unchanged = |p: &&Gateway| {
        p.config.directory == config.directory
            && p.config.mapping == config.mapping
            && p.config.account == config.account
            && p.config.identity == config.identity
            && p.config.cache == config.cache
    };
    let (directory, resolver, rebound) = match previous.filter(identity_unchanged) {
        Some(p) if p.directory_files == directory_files => {
            (Arc::clone(&p.directory), Arc::clone(&p.resolver), false)
        }
        Some(p) => {
            let directory = Arc::new(Directory::from_config(&config.directory)?);
            (directory, Arc::clone(&p.resolver), true)
        }
        None => {
            let directory = Arc::new(Directory::from_config(&config.directory)?);
            let resolver = Arc::new(Resolver::new(
                Arc::clone(&directory),
                &config.mapping,
                &config.account,
                &config.identity,
                &config.cache,
                Arc::clone(metrics),
                fleet.clone(),
            ));
            (directory, resolver, false)
        }
    };
    let mut upstream = Upstream::new(&config.upstream, metrics.upstream_connect_waits.clone())?;
    if config.kerberos.is_some() {
        crate::kerberos::load_library().map_err(BuildError::Kerberos)?;
    }
    // Kerberos mode: the delegated credentials survive a reload that keeps their settings.
    let delegation = config.kerberos.as_ref().map(|kerberos| {
        previous
            .and_then(|p| p.delegation.as_ref())
            .filter(|d| d.config() == kerberos)
            .map(Arc::clone)
            .unwrap_or_else(|| {
                Arc::new(crate::kerberos::Delegation::new(
                    kerberos,
                    Arc::clone(metrics),
                ))
            })
    });
    if let Some(kerberos) = &config.kerberos {
        upstream = upstream.pooled_per_account(kerberos.max_credentials);
    }
    let point_directory = match &config.directory {
        DirectoryConfig::Ldap(ldap) => Some((Arc::clone(&directory), ldap.clone())),
        DirectoryConfig::Ldif { .. } => None,
    };
    let online = Arc::new(crate::revocation::online::OnlineRevocation::build(
        &config,
        previous.map(|p| p.online.as_ref()),
        &current_revocation,
        point_directory,
        metrics,
    )?);
    // Nothing below can fail. The CRLs in force change for every connection at once.
    if !fetching {
        if let Some(old) = previous.and_then(|p| p.online.distribution_points.as_ref()) {
            old.stop();
        }
    }
    current_revocation.install(&crl_files, verifier.clone(), &revocation);
    if rebound {
        resolver.set_directory(Arc::clone(&directory));
    }
    // One set of long-poll counts for the life of the process: polls held under the old
    // configuration still count against the caps of the new one.
    let long_polls = match previous {
        Some(p) => {
            p.long_polls.set_limits(&config.activesync);
            Arc::clone(&p.long_polls)
        }
        None => Arc::new(crate::policy::LongPolls::new(
            &config.activesync,
            metrics.long_polls.clone(),
        )),
    };
    metrics.record_pki(&config.tls, revocation.gauges());
    Ok(Gateway {
        resolver,
        directory,
        upstream,
        headers: match &delegation {
            Some(_) => HeaderPolicy::new(&config.identity, &config.upstream, metrics)
                .without_identity_header(),
            None => HeaderPolicy::new(&config.identity, &config.upstream, metrics),
        },
        delegation,
        fleet,
        devices: match previous {
            Some(p) => Arc::clone(&p.devices),
            None => Arc::new(crate::devices::Devices::new(
                config.admin.device_capacity,
                config.fleet.as_ref().map_or("", |f| f.replica.as_str()),
            )),
        },
        long_polls,
        tls,
        client_policy: verifier,
        revocation: current_revocation,
        online,
        metrics: Arc::clone(metrics),
        directory_files,
        clock: clock.clone(),
        ntauth,
        config,
    })
}

/// SHA-256 over the contents of the files the directory reads (bind password, CA, LDIF).
fn directory_files_digest(config: &DirectoryConfig) -> Vec<u8> {
    let files: Vec<&std::path::Path> = match config {
        DirectoryConfig::Ldap(l) => std::iter::once(l.bind_password_file.as_path())
            .chain(l.ca_file.as_deref())
            .collect(),
        DirectoryConfig::Ldif { file } => vec![file.as_path()],
    };
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for file in files {
        context.update(&std::fs::read(file).unwrap_or_default());
        context.update(&[0]);
    }
    context.finish().as_ref().to_vec()
}

impl App {
    /// Reads keys, certificates, CRLs and the bind password; contacts nothing yet.
    pub fn build(config: Config) -> Result<App, BuildError> {
        App::build_with_clock(config, crate::clock::Clock::system())
    }

    /// The same, deciding certificate validity and session age by `clock` (tests move it).
    pub fn build_with_clock(config: Config, clock: crate::clock::Clock) -> Result<App, BuildError> {
        let metrics = Arc::new(Metrics::new());
        if let Some(log) = crate::audit::global() {
            metrics.register_audit(log.counters());
        }
        let gateway = Arc::new(build_gateway(config, &metrics, None, &clock)?);
        Ok(App { gateway, metrics })
    }

    /// What `seg check-config` and `seg run` warn about, each with its key path: a CRL file
    /// past its nextUpdate (every device of its CA is refused until a fresh one is in place)
    /// and a server certificate that has expired or expires within 30 days.
    pub fn warnings(&self) -> Vec<String> {
        let config = &self.gateway.config;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut warnings = Vec::new();
        if let Ok(crls) = crate::revocation::RevocationList::load(&config.tls.crl_files) {
            for crl in crls.stale(now) {
                let crate::revocation::CrlSource::File(path) = &crl.source else {
                    continue;
                };
                let index = config.tls.crl_files.iter().position(|f| f == path);
                let since = crl.next_update_unix.map_or(0, |n| now - n);
                warnings.push(format!(
                    "tls.crl_files[{}]: {} ({}) is past its nextUpdate by {since} s: every device of that CA is refused until a fresh CRL is in place",
                    index.unwrap_or(0),
                    path.display(),
                    crl.issuer
                ));
            }
        }
        let expiry = self.metrics.server_certificate_expiry.get() as i64;
        if expiry > 0 && expiry - now < 30 * 86_400 {
            let days = (expiry - now) / 86_400;
            warnings.push(if expiry <= now {
                format!(
                    "tls.certificate: {} has expired: devices refuse the handshake",
                    config.tls.certificate.display()
                )
            } else {
                format!(
                    "tls.certificate: {} expires in {days} day(s)",
                    config.tls.certificate.display()
                )
            });
        }
        warnings
    }

    /// The resolver `seg map` uses: the same one the listener would.
    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.gateway.resolver
    }

    /// `seg map`: the listener's validation, mapping and NTAuth check for one certificate.
    /// A store kept in the directory is read first.
    pub async fn map(
        &self,
        cert: &std::path::Path,
        chain: Option<&std::path::Path>,
    ) -> Result<crate::mapcheck::MapReport, crate::certs::TlsError> {
        let gateway = &self.gateway;
        if let Some(store) = gateway.ntauth.as_ref().filter(|s| s.reads_directory()) {
            let dn = gateway.config.ntauth.dn.as_deref();
            if let Err(e) = store.read_from(&gateway.directory, dn).await {
                tracing::warn!(target: "seg::tls::ntauth", error = %e, "NTAuth store not read");
            }
        }
        crate::mapcheck::map_certificate(
            &gateway.config,
            &gateway.resolver,
            gateway.ntauth.as_deref(),
            cert,
            chain,
        )
        .await
    }

    /// Validates and maps `tls.self_test_certificate`, if configured, as the listener would.
    /// A chain the configured CAs refuse is a configuration error; a mapping refused or not
    /// possible now (directory down) is only logged.
    pub async fn self_test(&self) -> Result<(), String> {
        let config = &self.gateway.config;
        let Some(path) = &config.tls.self_test_certificate else {
            return Ok(());
        };
        let report = self.map(path, None).await.map_err(|e| e.to_string())?;
        let file = path.display().to_string();
        if let Some(error) = &report.chain_error {
            return Err(format!(
                "tls.self_test_certificate: {file} is refused by the configured client CAs: {error}"
            ));
        }
        match &report.outcome {
            crate::mapcheck::MapOutcome::Admit { identity } => {
                tracing::info!(target: "seg::config", %file, %identity, "self-test certificate maps")
            }
            crate::mapcheck::MapOutcome::Deny { reason, .. } => {
                tracing::warn!(target: "seg::config", %file, %reason, "self-test certificate is refused (run seg map --explain)")
            }
            crate::mapcheck::MapOutcome::Unavailable { reason, error } => {
                tracing::warn!(target: "seg::config", %file, %reason, %error, "self-test certificate could not be mapped now")
            }
        }
        Ok(())
    }

    /// Binds both listeners and starts serving.
    pub async fn start(self) -> std::io::Result<Running> {
        let config = &self.gateway.config;
        let listener = bind(config.listen.address, config.listen.backlog)?;
        let admin_listener = TcpListener::bind(config.admin.address).await?;
        let listen_addr = listener.local_addr()?;
        let admin_addr = admin_listener.local_addr()?;
        let max_connections = config.listen.max_connections;
        if let Some(path) = &config.cache.snapshot_file {
            restore_snapshot(&self.gateway.resolver, path).await;
        }
        self.gateway.online.start();
        let live = Arc::new(Live::new(self.gateway));
        let health = Arc::new(Health::default());
        let admin = Arc::new(crate::admin::Admin::new(
            Arc::clone(&live),
            Arc::clone(&self.metrics),
            Arc::clone(&health),
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (drain, drain_rx) = watch::channel(None);
        let serving = tokio::spawn(crate::proxy::serve(
            listener,
            Arc::clone(&live),
            max_connections,
            drain_rx,
        ));
        let tasks = vec![
            tokio::spawn(crate::admin::serve(
                admin_listener,
                admin,
                shutdown_rx.clone(),
            )),
            tokio::spawn(probe_dependencies(
                Arc::clone(&live),
                Arc::clone(&health),
                shutdown_rx.clone(),
            )),
            tokio::spawn(refresh_ntauth(Arc::clone(&live), shutdown_rx.clone())),
            tokio::spawn(fleet_upkeep(
                Arc::clone(&live),
                Arc::clone(&health),
                admin_addr,
                shutdown_rx.clone(),
            )),
            tokio::spawn(write_snapshots(Arc::clone(&live), shutdown_rx)),
        ];
        tracing::info!(target: "seg::listener", %listen_addr, %admin_addr, "seg serving");
        Ok(Running {
            listen_addr,
            admin_addr,
            metrics: self.metrics,
            health,
            live,
            drain,
            serving,
            shutdown,
            tasks,
        })
    }
}

impl Running {
    /// The resolver of the configuration serving now.
    pub fn resolver(&self) -> Arc<Resolver> {
        Arc::clone(&self.live.load().resolver)
    }

    /// Builds a complete gateway from `config`, then swaps it in atomically: new connections
    /// get it, open ones keep theirs. On any error nothing changes.
    pub fn reload(&self, config: Config) -> Result<(), ReloadError> {
        let current = self.live.load();
        let result = if config.listen != current.config.listen {
            Err(ReloadError::NeedsRestart("[listen]"))
        } else if config.admin.address != current.config.admin.address {
            Err(ReloadError::NeedsRestart("admin.address"))
        } else if config.audit != current.config.audit {
            Err(ReloadError::NeedsRestart("[audit]"))
        } else if config.fleet != current.config.fleet {
            Err(ReloadError::NeedsRestart("[fleet]"))
        } else {
            build_gateway(config, &self.metrics, Some(&current), &current.clock)
                .map_err(ReloadError::from)
                .map(|gateway| {
                    gateway.online.start();
                    self.live.store(Arc::new(gateway))
                })
        };
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(()) => tracing::info!(target: "seg::config", "configuration reloaded"),
            Err(e) => {
                tracing::error!(target: "seg::config", error = %e, "reload refused; the previous configuration keeps serving")
            }
        }
        result
    }

    /// Reads the configuration file again and reloads it.
    pub fn reload_file(&self, path: &std::path::Path) -> Result<(), ReloadError> {
        match Config::load(path) {
            Ok(config) => self.reload(config),
            Err(e) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                tracing::error!(target: "seg::config", error = %e, "reload refused; the previous configuration keeps serving");
                Err(e.into())
            }
        }
    }

    /// The files a reload reads: the configuration and everything it names.
    pub fn watched_files(&self, config_path: &std::path::Path) -> Vec<std::path::PathBuf> {
        let current = self.live.load();
        let c = &current.config;
        let mut files = vec![
            config_path.to_path_buf(),
            c.tls.certificate.clone(),
            c.tls.private_key.clone(),
            c.tls.client_ca.clone(),
        ];
        files.extend(c.tls.crl_files.iter().cloned());
        files.extend(c.tls.session_ticket_key_file.iter().cloned());
        files.extend(c.upstream.ca_file.iter().cloned());
        match &c.directory {
            DirectoryConfig::Ldap(l) => {
                files.push(l.bind_password_file.clone());
                files.extend(l.ca_file.iter().cloned());
            }
            DirectoryConfig::Ldif { file } => files.push(file.clone()),
        }
        files
    }

    /// Whether watched files should trigger reloads, and how often to look.
    pub fn watch_settings(&self) -> (bool, std::time::Duration) {
        let current = self.live.load();
        (
            current.config.reload.watch_files,
            current.config.reload.watch_interval,
        )
    }

    /// Drains, then stops: `/readyz` fails at once so the balancer stops sending devices;
    /// no new connections or requests are taken; requests in flight finish within `window`;
    /// held long polls are closed at moments spread over `window`; then the admin listener
    /// stops too.
    pub async fn drain(self, window: std::time::Duration) {
        self.health.draining.store(true, Ordering::Release);
        tracing::info!(target: "seg::listener", window_secs = window.as_secs_f64(), "draining");
        let _ = self.drain.send(Some(crate::proxy::DrainPlan {
            started: std::time::Instant::now(),
            window,
        }));
        let _ = self.serving.await;
        let gateway = self.live.load();
        if let Some(path) = &gateway.config.cache.snapshot_file {
            write_snapshot(&gateway.resolver, path, true);
        }
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// The configured drain window (`listen.drain_window`).
    pub fn drain_window(&self) -> std::time::Duration {
        self.live.load().config.listen.drain_window
    }

    /// Stops at once: held requests are cut (tests, the demo).
    pub async fn stop(self) {
        self.drain(std::time::Duration::ZERO).await;
    }
}

async fn restore_snapshot(resolver: &Resolver, path: &std::path::Path) {
    match crate::identity::snapshot::Snapshot::read(path) {
        Ok(Some(snapshot)) => {
            let age = snapshot.written_unix;
            let (restored, dropped) = resolver.restore(snapshot).await;
            tracing::info!(target: "seg::identity", file = %path.display(), restored, dropped, written_unix = age, "identity cache restored from its snapshot; entries are re-validated in the background");
        }
        Ok(None) => {
            tracing::info!(target: "seg::identity", file = %path.display(), "no identity-cache snapshot yet; starting cold");
        }
        Err(e) => {
            tracing::warn!(target: "seg::identity", file = %path.display(), error = %e, "identity-cache snapshot unreadable; starting cold");
        }
    }
}

/// Writes the snapshot; `at_stop` is the last write of the process (logged at info; the
/// periodic ones at debug). One write at a time: they share the temporary file.
fn write_snapshot(resolver: &Resolver, path: &std::path::Path, at_stop: bool) {
    static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    let snapshot = resolver.snapshot();
    let entries = snapshot.entries.len();
    match snapshot.write(path) {
        Ok(()) if at_stop => {
            tracing::info!(target: "seg::identity", file = %path.display(), entries, "identity cache written to its snapshot");
        }
        Ok(()) => {
            tracing::debug!(target: "seg::identity", file = %path.display(), entries, "identity cache written to its snapshot");
        }
        Err(e) => {
            tracing::warn!(target: "seg::identity", file = %path.display(), error = %e, "identity-cache snapshot not written");
        }
    }
}

/// A listening socket with the configured accept backlog (tokio's bind uses 1024).
fn bind(address: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(backlog)
}

/// A fingerprint of files (modification time and length), to notice changes.
pub fn files_signature(files: &[std::path::PathBuf]) -> Vec<Option<(std::time::SystemTime, u64)>> {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// Keeps `/readyz` and `seg_dependency_up` current.
/// With `cache.snapshot_file`: writes the snapshot every `cache.snapshot_interval`, off the
/// runtime's threads (a large cache takes tens of milliseconds to write).
async fn write_snapshots(live: Arc<Live>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let interval = live.load().config.cache.snapshot_interval;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let gateway = live.load();
        let Some(path) = gateway.config.cache.snapshot_file.clone() else {
            continue;
        };
        let resolver = Arc::clone(&gateway.resolver);
        let _ = tokio::task::spawn_blocking(move || write_snapshot(&resolver, &path, false)).await;
    }
}

/// With `[fleet]`: reads the fleet's block list every `fleet.block_poll_interval`, and
/// renews the leases of the long polls this replica counts in the store.
async fn fleet_upkeep(
    live: Arc<Live>,
    health: Arc<Health>,
    admin: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut renewed = std::time::Instant::now();
    let mut advertised = None;
    let mut withdrawn = false;
    loop {
        let Some(fleet) = live.load().fleet.clone() else {
            return;
        };
        if health.draining.load(Ordering::Acquire) {
            if !withdrawn {
                fleet.withdraw().await;
                withdrawn = true;
            }
        } else {
            if advertised.is_none() {
                // No route yet (the store's name does not resolve, say): the next round tries
                // again; an unspecified address is never announced.
                advertised = advertised_address(admin, &fleet).await;
            }
            if let Some(address) = advertised {
                fleet.announce(address).await;
            }
        }
        fleet.refresh_blocks().await;
        if renewed.elapsed() >= crate::fleet::caps::LEASE / 3 {
            fleet.renew_long_polls().await;
            renewed = std::time::Instant::now();
        }
        tokio::select! {
            _ = tokio::time::sleep(fleet.block_poll_interval()) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// The address other hosts reach this replica's admin listener at: its own, or, when it
/// listens on every address (a pod), the address this host uses toward the fleet store (no
/// packet is sent: a UDP socket is only connected to learn the route); `None` when that
/// route cannot be learnt now.
async fn advertised_address(admin: SocketAddr, fleet: &crate::fleet::Fleet) -> Option<SocketAddr> {
    if !admin.ip().is_unspecified() {
        return Some(admin);
    }
    let route = async {
        let (host, port) = fleet.store_address()?;
        let socket = tokio::net::UdpSocket::bind((admin.ip(), 0)).await.ok()?;
        socket.connect((host, port)).await.ok()?;
        socket.local_addr().ok()
    };
    let local = route.await?;
    Some(SocketAddr::new(local.ip(), admin.port()))
}

async fn probe_dependencies(
    live: Arc<Live>,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let gateway = live.load();
        let directory_up = match gateway.directory.probe().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(target: "seg::directory", error = %e, "directory probe failed");
                false
            }
        };
        let upstream_up = gateway.upstream.probe().await;
        let kdc_up = match &gateway.delegation {
            Some(delegation) => match delegation.probe().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(target: "seg::kerberos", error = %e, "KDC probe failed");
                    false
                }
            },
            None => true,
        };
        // The fleet store is probed for its gauge only: readiness never depends on it.
        if let Some(fleet) = &gateway.fleet {
            fleet.probe().await;
        }
        health.kdc_up.store(kdc_up, Ordering::Release);
        if gateway.delegation.is_some() {
            gateway
                .metrics
                .dependency_up
                .with_label_values(&["kdc"])
                .set(kdc_up as i64);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let revocation = gateway.revocation.load();
        let stale = revocation.stale(now);
        for crl in &stale {
            tracing::error!(target: "seg::tls", issuer = %crl.issuer, source = %crl.source, "CRL is past its nextUpdate: new handshakes of its certificates are refused");
        }
        gateway.metrics.record_crls(revocation.gauges(), now);
        health.directory_up.store(directory_up, Ordering::Release);
        health.upstream_up.store(upstream_up, Ordering::Release);
        health.crls_fresh.store(stale.is_empty(), Ordering::Release);
        let gauge = &gateway.metrics.dependency_up;
        gauge
            .with_label_values(&["directory"])
            .set(directory_up as i64);
        gauge
            .with_label_values(&["upstream"])
            .set(upstream_up as i64);
        gateway.metrics.crls_stale.set(stale.len() as i64);
        // A reload may change the interval.
        let interval = gateway.config.admin.probe_interval;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Keeps the NTAuth store read from the directory current: read at start, then every
/// `ntauth.refresh`; a failed read keeps the last good store (retried sooner).
async fn refresh_ntauth(live: Arc<Live>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let gateway = live.load();
        let config = &gateway.config.ntauth;
        let mut wait = config.refresh;
        if let Some(store) = gateway.ntauth.as_ref().filter(|s| s.reads_directory()) {
            match store
                .read_from(&gateway.directory, config.dn.as_deref())
                .await
            {
                Ok(count) => {
                    if count == 0 {
                        tracing::warn!(target: "seg::tls::ntauth", "the directory's NTAuth store holds no CA: every device is refused (certutil -dspublish -f ca.cer NTAuthCA adds one)");
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "seg::tls::ntauth", error = %e, "NTAuth store not read; the last one read stays in force");
                    wait = wait.min(std::time::Duration::from_secs(30));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}
