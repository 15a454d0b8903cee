//! Idle upstream connections, between the exchanges of any device connection.
//!
//! A connection waits here polled by nobody: it is its socket alone (see exchange.rs).
//! Taking one out polls it once to learn whether the upstream closed it meanwhile. A
//! connection comes back when its response body has ended cleanly (exchange.rs decides), so a
//! device that goes away during a held Ping closes that Ping's upstream connection at once.
//! In Kerberos mode the pool is keyed by account, so a connection never carries two users.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::conn::{PoolKey, UpstreamConn};

/// Idle upstream connections by key, newest last.
pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<UpstreamConn>>>,
    max_idle_per_key: usize,
    max_keys: usize,
    idle_timeout: Duration,
    sweeping: AtomicBool,
}

impl Pool {
    pub fn new(max_idle_per_key: usize, max_keys: usize, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(HashMap::new()),
            max_idle_per_key,
            max_keys: max_keys.max(1),
            idle_timeout,
            sweeping: AtomicBool::new(false),
        })
    }

    /// An empty pool with these settings, for at most `max_keys` keys.
    pub fn with_max_keys(&self, max_keys: usize) -> Arc<Pool> {
        Pool::new(self.max_idle_per_key, max_keys, self.idle_timeout)
    }

    /// The most recently used idle connection for `key` that is still open.
    pub fn take(&self, key: &PoolKey) -> Option<UpstreamConn> {
        let mut closed = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let conns = idle.get_mut(key)?;
            let mut found = None;
            while let Some(mut conn) = conns.pop() {
                if conn.idle_since.elapsed() < self.idle_timeout && conn.still_usable() {
                    found = Some(conn);
                    break;
                }
                closed.push(conn);
            }
            if conns.is_empty() {
                idle.remove(key);
            }
            found
        };
        drop(closed); // closes their sockets outside the lock
        found
    }

    /// Keeps a connection whose exchange ended cleanly for the next request, within bounds.
    pub fn give_back(self: &Arc<Pool>, mut conn: UpstreamConn) {
        if self.max_idle_per_key == 0 {
            return;
        }
        conn.idle_since = Instant::now();
        let refused = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let full = idle.len() >= self.max_keys && !idle.contains_key(&conn.key);
            let conns = idle.entry(conn.key.clone()).or_default();
            if full || conns.len() >= self.max_idle_per_key {
                Some(conn)
            } else {
                conns.push(conn);
                None
            }
        };
        drop(refused);
        self.start_sweeper();
    }

    /// Closes idle connections past the idle timeout, every half timeout, while the pool
    /// exists (from the first connection given back: a runtime is running by then).
    fn start_sweeper(self: &Arc<Pool>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<Pool> = Arc::downgrade(self);
        let period = (self.idle_timeout / 2).max(Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    fn sweep(&self) {
        let expired: Vec<UpstreamConn> = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let mut expired = Vec::new();
            idle.retain(|_, conns| {
                let (old, fresh): (Vec<_>, Vec<_>) = conns
                    .drain(..)
                    .partition(|c| c.idle_since.elapsed() >= self.idle_timeout);
                expired.extend(old);
                *conns = fresh;
                !conns.is_empty()
            });
            expired
        };
        drop(expired);
    }
}
