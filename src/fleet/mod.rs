//! What the replicas of a fleet share, in Redis or Valkey (`[fleet]`): identity decisions (a
//! second cache level under each replica's own), device blocks and long-poll counts.
//!
//! The store is a cache and a message board, never an authority. Every operation has a small
//! time budget (`fleet.timeout`); one that is late, fails, or returns an entry that does not
//! authenticate is a miss, counted, and the replica goes on as if it had no store: its own
//! cache, then the directory. So a store that is down or slow costs at most the budget per
//! local miss, and a store that is compromised can delete, delay or replay its entries within
//! their validity, but cannot admit anyone: entries are sealed ([`seal`]) with a key from a
//! file the replicas share and the store never sees.
//!
//! The client is one multiplexed connection per process (`redis`'s `ConnectionManager`,
//! reconnecting by itself), made lazily, so a replica starts and serves while the store is
//! down.

pub mod blocks;
pub mod caps;
pub mod seal;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use redis::aio::ConnectionManager;
use redis::IntoConnectionInfo as _;
use tokio::sync::watch;

use crate::config::FleetConfig;
use crate::metrics::FleetMetrics;
use blocks::{Block, BlockKind, BlockList};
use seal::{Keys, OpenError};

/// The budget of one read of the whole block list, and of `seg block`'s write: not a request.
const BLOCK_BUDGET: Duration = Duration::from_secs(2);
/// A replica that has not announced itself for this long is taken for gone (it announces
/// every upkeep round, `block_poll_interval`: three rounds when they are longer).
pub const REPLICA_FRESH: Duration = Duration::from_secs(30);

/// Why the fleet store cannot be set up from its configuration.
#[derive(Debug, thiserror::Error)]
#[error("fleet.{key}: {message}")]
pub struct FleetError {
    pub key: &'static str,
    pub message: String,
}

fn error(key: &'static str, message: impl std::fmt::Display) -> FleetError {
    FleetError {
        key,
        message: message.to_string(),
    }
}

/// What reading one entry gave.
#[derive(Debug)]
pub enum Fetched {
    /// An authentic, valid entry's plaintext.
    Found(Vec<u8>),
    /// No entry, or one that was refused (counted): either way, a miss.
    Missing,
    /// The store did not answer in time (counted): a miss, and no point asking it more now.
    Unavailable,
}

/// What asking for a lock gave.
pub enum Lock {
    /// This replica holds it until the guard is dropped or `lock_wait` passes.
    Acquired(LockGuard),
    /// Another replica holds it.
    Held,
    /// The store did not answer in time.
    Unavailable,
}

/// One replica's connection to the fleet store.
pub struct Fleet {
    store: ConnectionManager,
    prefix: String,
    replica: String,
    timeout: Duration,
    lock_wait: Duration,
    key_file: PathBuf,
    keys: RwLock<Arc<Keys>>,
    metrics: FleetMetrics,
    /// The block list in force, published to every connection.
    blocks: watch::Sender<Arc<BlockList>>,
    block_file: Option<PathBuf>,
    block_poll_interval: Duration,
    /// The long polls this replica counts in the store.
    leases: caps::Leases,
    /// Distinguishes this process's lease and lock names from an earlier one of the same
    /// replica.
    incarnation: u64,
    /// The store's host and port, as the URL names them.
    store_address: Option<(String, u16)>,
    /// Numbers this process's lock acquisitions.
    locks: std::sync::atomic::AtomicU64,
}

impl Fleet {
    /// The client for `config`; nothing is sent until the first operation.
    pub fn connect(config: &FleetConfig, metrics: FleetMetrics) -> Result<Fleet, FleetError> {
        let keys = read_keys(&config.key_file)?;
        let info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| error("url", e))?;
        let store_address = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
            _ => None,
        };
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &config.username {
            settings = settings.set_username(user);
        }
        if let Some(path) = &config.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| error("password_file", format!("{}: {e}", path.display())))?;
            let password = text.lines().next().unwrap_or("").trim_end();
            settings = settings.set_password(password);
        }
        let info = info.set_redis_settings(settings);
        let client = if config.url.starts_with("rediss://") {
            // redis's TLS builds its rustls configuration with the process's default provider.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let read = |key: &'static str, path: &Option<PathBuf>| {
                path.as_ref()
                    .map(|p| {
                        std::fs::read(p).map_err(|e| error(key, format!("{}: {e}", p.display())))
                    })
                    .transpose()
            };
            let client_tls = match (
                read("client_certificate", &config.client_certificate)?,
                read("client_key", &config.client_key)?,
            ) {
                (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
                _ => None,
            };
            redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls,
                    root_cert: read("ca_file", &config.ca_file)?,
                },
            )
        } else {
            redis::Client::open(info)
        }
        .map_err(|e| error("url", e))?;
        // Reconnects are the manager's own business, in the background; an operation never
        // waits for one longer than the budget.
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let store = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|e| error("url", e))?;
        metrics.store_up.set(1);
        // The last list this replica knew, until the store answers.
        let known = match config.block_file.as_deref().map(BlockList::read) {
            Some(Ok(Some(list))) => {
                tracing::info!(target: "seg::fleet", blocks = list.blocks.len(), "block list read from fleet.block_file");
                list
            }
            Some(Err(e)) => {
                tracing::warn!(target: "seg::fleet", error = %e, "fleet.block_file unreadable; blocks apply once the store answers");
                BlockList::default()
            }
            _ => BlockList::default(),
        };
        Ok(Fleet {
            blocks: watch::Sender::new(Arc::new(known)),
            block_file: config.block_file.clone(),
            block_poll_interval: config.block_poll_interval,
            leases: caps::Leases::default(),
            incarnation: unix_now_ms(),
            store_address,
            locks: std::sync::atomic::AtomicU64::new(0),
            store,
            prefix: config.key_prefix.clone(),
            replica: config.replica.clone(),
            timeout: config.timeout,
            lock_wait: config.lock_wait,
            key_file: config.key_file.clone(),
            keys: RwLock::new(Arc::new(keys)),
            metrics,
        })
    }

    /// Reads the key file again (a rotation); on error the keys in use stay.
    pub fn reload_keys(&self) -> Result<(), FleetError> {
        let keys = read_keys(&self.key_file)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(())
    }

    /// Whether the last store operation was answered in time.
    pub fn store_up(&self) -> bool {
        self.metrics.store_up.get() == 1
    }

    /// This replica's name in the store.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// How long a replica waits for another's answer to the same question.
    pub fn lock_wait(&self) -> Duration {
        self.lock_wait
    }

    /// The full key of `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn keys(&self) -> Arc<Keys> {
        Arc::clone(&self.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs one command within the budget; `None` when it failed (counted here: an answer is
    /// counted by the caller, who knows what it means).
    async fn run<T: redis::FromRedisValue>(
        &self,
        operation: &str,
        command: &redis::Cmd,
    ) -> Option<T> {
        self.run_within(operation, command, self.timeout).await
    }

    async fn run_within<T: redis::FromRedisValue>(
        &self,
        operation: &str,
        command: &redis::Cmd,
        budget: Duration,
    ) -> Option<T> {
        let mut store = self.store.clone();
        let outcome = tokio::time::timeout(budget, command.query_async::<T>(&mut store)).await;
        let failure = match outcome {
            Ok(Ok(value)) => {
                self.metrics.store_up.set(1);
                return Some(value);
            }
            Ok(Err(e)) => {
                tracing::debug!(target: "seg::fleet", operation, error = %e, "fleet store operation failed");
                "error"
            }
            Err(_) => "timeout",
        };
        self.metrics.store_up.set(0);
        self.count(operation, failure);
        None
    }

    fn count(&self, operation: &str, result: &str) {
        self.metrics
            .operations
            .with_label_values(&[operation, result])
            .inc();
    }

    /// The entry under `name`, opened and checked.
    pub async fn get(&self, name: &str) -> Fetched {
        let key = self.key(name);
        let Some(value) = self
            .run::<Option<Vec<u8>>>("get", redis::cmd("GET").arg(&key))
            .await
        else {
            return Fetched::Unavailable;
        };
        let Some(entry) = value else {
            self.count("get", "absent");
            return Fetched::Missing;
        };
        match self.keys().open(&key, &entry, unix_now()) {
            Ok(plaintext) => {
                self.count("get", "ok");
                Fetched::Found(plaintext)
            }
            Err(OpenError::Expired) => {
                self.count("get", "expired");
                Fetched::Missing
            }
            Err(OpenError::Rejected) => {
                self.count("get", "rejected");
                tracing::warn!(target: "seg::fleet", key, "a fleet store entry failed authentication (another key file, or a tampered store); ignored");
                Fetched::Missing
            }
        }
    }

    /// Seals `plaintext` under `name`, valid until `valid_until` (Unix seconds); the store
    /// drops it then too. Best effort: a failure is counted, and the next replica searches.
    pub async fn set(&self, name: &str, plaintext: &[u8], valid_until: i64) {
        let ttl_ms = (valid_until - unix_now()).saturating_mul(1000);
        if ttl_ms <= 0 {
            return;
        }
        let key = self.key(name);
        let entry = self.keys().seal(&key, valid_until, plaintext);
        if self
            .run::<()>(
                "set",
                redis::cmd("SET").arg(&key).arg(entry).arg("PX").arg(ttl_ms),
            )
            .await
            .is_some()
        {
            self.count("set", "ok");
        }
    }

    /// Asks for the lock on `name` (`SET NX PX lock_wait`), held by this replica's name.
    pub async fn lock(self: &Arc<Self>, name: &str) -> Lock {
        let key = self.key(&format!("lock:{name}"));
        let millis = self.lock_wait.as_millis().max(1) as u64;
        // Each acquisition its own value: only its own guard can give it back.
        let token = format!(
            "{}:{}:{}",
            self.replica,
            self.incarnation,
            self.locks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let answer = self
            .run::<Option<String>>(
                "lock",
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis),
            )
            .await;
        match answer {
            Some(Some(_)) => {
                self.count("lock", "ok");
                Lock::Acquired(LockGuard {
                    fleet: Arc::clone(self),
                    key,
                    token,
                })
            }
            Some(None) => {
                self.count("lock", "held");
                Lock::Held
            }
            None => Lock::Unavailable,
        }
    }

    /// The store's host and port, as the URL names them (`None` for a Unix socket).
    pub fn store_address(&self) -> Option<(&str, u16)> {
        self.store_address.as_ref().map(|(h, p)| (h.as_str(), *p))
    }

    /// Says where this replica's admin listener is, for `seg devices` across the fleet: the
    /// hash `<prefix>replicas`, replica name → the address, sealed like every entry (so a
    /// store written by someone without the key file cannot send `seg devices`, and its
    /// token, elsewhere) and valid for `REPLICA_FRESH`; written again by every upkeep round.
    pub async fn announce(&self, admin: SocketAddr) {
        let hash = self.key("replicas");
        let valid_for = REPLICA_FRESH.max(self.block_poll_interval * 3);
        let entry = self.keys().seal(
            &format!("{hash}:{}", self.replica),
            unix_now() + valid_for.as_secs() as i64,
            admin.to_string().as_bytes(),
        );
        let command = redis::cmd("HSET")
            .arg(&hash)
            .arg(&self.replica)
            .arg(entry)
            .clone();
        let _ = self.run::<i64>("announce", &command).await;
    }

    /// Takes this replica out of the list (a drain).
    pub async fn withdraw(&self) {
        let command = redis::cmd("HDEL")
            .arg(self.key("replicas"))
            .arg(&self.replica)
            .clone();
        let _ = self.run::<i64>("announce", &command).await;
    }

    /// The replicas whose announcement is still valid and opens under the key file, by name;
    /// `None` when the store does not answer.
    pub async fn replicas(&self) -> Option<Vec<(String, SocketAddr)>> {
        let hash = self.key("replicas");
        let command = redis::cmd("HGETALL").arg(&hash).clone();
        let fields: Vec<(String, Vec<u8>)> = self
            .run_within("replicas", &command, Duration::from_secs(5))
            .await?;
        let keys = self.keys();
        let now = unix_now();
        let mut fresh: Vec<(String, SocketAddr)> = fields
            .into_iter()
            .filter_map(|(name, entry)| {
                let address = keys.open(&format!("{hash}:{name}"), &entry, now).ok()?;
                Some((name, std::str::from_utf8(&address).ok()?.parse().ok()?))
            })
            .collect();
        fresh.sort();
        Some(fresh)
    }

    /// `PING`, for `seg_fleet_store_up` while no request asks the store anything (and to
    /// reconnect before the next one does).
    pub async fn probe(&self) {
        let _ = self.run::<String>("ping", &redis::cmd("PING")).await;
    }
}

/// A lock this replica holds; given back when dropped (by a task of its own, so a lookup
/// cancelled because its device left still gives it back), if it is still this acquisition's.
pub struct LockGuard {
    fleet: Arc<Fleet>,
    key: String,
    token: String,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        const UNLOCK: &str =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let fleet = Arc::clone(&self.fleet);
        let (key, token) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        runtime.spawn(async move {
            let command = redis::cmd("EVAL")
                .arg(UNLOCK)
                .arg(1)
                .arg(&key)
                .arg(&token)
                .clone();
            let _ = fleet.run::<i64>("unlock", &command).await;
        });
    }
}

/// The block list: read by every replica, written by `seg block` and `seg unblock`.
impl Fleet {
    /// The block list in force, and its changes.
    pub fn blocks(&self) -> watch::Receiver<Arc<BlockList>> {
        self.blocks.subscribe()
    }

    /// The field of the block that applies to this device, account and certificate, if any.
    pub fn blocked(
        &self,
        device_id: Option<&str>,
        account: Option<&str>,
        certificate_hex: &str,
    ) -> Option<String> {
        let list = self.blocks.borrow();
        list.find(device_id, account, certificate_hex)
            .map(|(field, _)| field.to_string())
    }

    /// Counts a held long poll closed because a block named it.
    pub fn count_closed_long_poll(&self) {
        self.metrics.blocked_long_polls_closed.inc();
    }

    /// How often [`Fleet::refresh_blocks`] runs.
    pub fn block_poll_interval(&self) -> Duration {
        self.block_poll_interval
    }

    /// Reads the whole list from the store; publishes it and keeps it on disk if it changed.
    /// A store that does not answer leaves the list in force as it is.
    pub async fn refresh_blocks(&self) {
        let command = redis::cmd("HGETALL").arg(self.key("blocks")).clone();
        let Some(fields) = self
            .run_within::<Vec<(Vec<u8>, Vec<u8>)>>("blocks", &command, BLOCK_BUDGET)
            .await
        else {
            return;
        };
        self.count("blocks", "ok");
        let list = BlockList::from_fields(fields);
        if **self.blocks.borrow() == list {
            return;
        }
        tracing::info!(target: "seg::fleet", blocks = list.blocks.len(), "block list changed");
        if let Some(path) = &self.block_file {
            if let Err(e) = list.write(path) {
                tracing::warn!(target: "seg::fleet", file = %path.display(), error = %e, "fleet.block_file not written");
            }
        }
        self.blocks.send_replace(Arc::new(list));
    }

    /// Writes (`Some`) or removes (`None`) the block of `value`; the error says why not.
    pub async fn write_block(
        &self,
        kind: BlockKind,
        value: &str,
        block: Option<&Block>,
    ) -> Result<(), String> {
        kind.check(value)?;
        let field = kind.field(value);
        let mut command = match block {
            Some(_) => redis::cmd("HSET"),
            None => redis::cmd("HDEL"),
        };
        command.arg(self.key("blocks")).arg(&field);
        if let Some(block) = block {
            command.arg(serde_json::to_string(block).map_err(|e| e.to_string())?);
        }
        self.query_reporting::<i64>(&command).await.map(|_| ())
    }

    /// The whole list as the store holds it now; the error says why it cannot be read.
    pub async fn read_blocks(&self) -> Result<BlockList, String> {
        let command = redis::cmd("HGETALL").arg(self.key("blocks")).clone();
        self.query_reporting::<Vec<(Vec<u8>, Vec<u8>)>>(&command)
            .await
            .map(BlockList::from_fields)
    }

    /// One command for a person at a terminal: a failure is an error to show, not a miss.
    async fn query_reporting<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, String> {
        let mut store = self.store.clone();
        match tokio::time::timeout(BLOCK_BUDGET, command.query_async::<T>(&mut store)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(format!("the fleet store refused: {e}")),
            Err(_) => Err(format!(
                "the fleet store did not answer within {BLOCK_BUDGET:?}"
            )),
        }
    }
}

fn read_keys(path: &std::path::Path) -> Result<Keys, FleetError> {
    crate::secrets::read_secret_lines(path)
        .map(|secrets| Keys::from_secrets(&secrets))
        .map_err(|e| error("key_file", e))
}

/// Now, in Unix milliseconds.
pub fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub use crate::clock::unix_now;
