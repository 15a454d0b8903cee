//! Long-poll caps counted across the fleet: a device (or an account) spread over replicas by
//! the balancer gets its allowance once, not once per replica.
//!
//! Each held long poll is a member of two sorted sets, its device's and its account's
//! (`<prefix>lp:dev:<account>:<DEVICEID>`, `<prefix>lp:acct:<account>`), named
//! `<replica>:<n>` and scored with the moment its lease ends. Taking one is a script, so the
//! check and the add are one step for the whole fleet: expired members are dropped, the two
//! sets are counted against the caps, and the poll is added. The replica renews the leases of
//! the polls it holds ([`Fleet::renew_long_polls`]) and removes each when it ends, so a
//! replica that dies takes its count with it within one lease (`LEASE`), and the sum stays
//! right. The local caps are checked first and still hold when the store does not answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Fleet;

/// How long a held poll counts without renewal: a dead replica's polls stop counting then.
pub const LEASE: Duration = Duration::from_secs(60);

/// The store's clock, in milliseconds, so replicas whose clocks differ agree on what has expired.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 2 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 0
";

/// A lease extended by the store's clock; added again if the store lost it (a restart).
const RENEW: &str = r"
local t = redis.call('TIME')
local until = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], until, ARGV[2])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return 0
";

/// What the fleet said about one more long poll.
pub enum FleetCap {
    /// Counted; released when the lease is dropped.
    Taken(LongPollLease),
    /// The device's polls across the fleet are at the cap.
    DeviceFull,
    /// The account's polls across the fleet are at the cap.
    AccountFull,
    /// The store did not answer: the local caps alone apply.
    Unknown,
}

/// One long poll counted in the store; removed from it when dropped.
pub struct LongPollLease {
    fleet: Arc<Fleet>,
    id: u64,
}

/// The leases this replica holds, for renewal.
#[derive(Default)]
pub(super) struct Leases {
    next: AtomicU64,
    held: Mutex<HashMap<u64, Held>>,
}

#[derive(Clone)]
struct Held {
    keys: [String; 2],
    member: String,
}

impl Fleet {
    /// Counts one more long poll of `account`'s `device_id` across the fleet.
    pub async fn acquire_long_poll(
        self: &Arc<Self>,
        account: &str,
        device_id: &str,
        max_per_device: usize,
        max_per_account: usize,
    ) -> FleetCap {
        let account = account.to_ascii_lowercase();
        let keys = [
            self.key(&format!(
                "lp:dev:{account}:{}",
                device_id.to_ascii_uppercase()
            )),
            self.key(&format!("lp:acct:{account}")),
        ];
        let id = self.leases.next.fetch_add(1, Ordering::Relaxed);
        let member = format!("{}:{}:{id}", self.replica(), self.incarnation);
        let mut command = redis::cmd("EVAL");
        command
            .arg(ACQUIRE)
            .arg(2)
            .arg(&keys[0])
            .arg(&keys[1])
            .arg(LEASE.as_millis() as u64)
            .arg(&member)
            .arg(max_per_device)
            .arg(max_per_account);
        match self.run::<i64>("caps", &command).await {
            Some(0) => {
                self.count("caps", "ok");
                let held = Held { keys, member };
                self.leases
                    .held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, held);
                FleetCap::Taken(LongPollLease {
                    fleet: Arc::clone(self),
                    id,
                })
            }
            Some(1) => {
                self.count("caps", "device-full");
                FleetCap::DeviceFull
            }
            Some(_) => {
                self.count("caps", "account-full");
                FleetCap::AccountFull
            }
            None => {
                // The script may have run with its answer lost: the member is removed so it
                // does not hold a place for a whole lease.
                release(Arc::clone(self), Held { keys, member });
                FleetCap::Unknown
            }
        }
    }

    /// Extends the lease of every long poll this replica holds (every `LEASE / 3`).
    pub async fn renew_long_polls(&self) {
        let held: Vec<Held> = self
            .leases
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        if held.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for Held { keys, member } in &held {
            pipe.cmd("EVAL")
                .arg(RENEW)
                .arg(keys.len())
                .arg(&keys[0])
                .arg(&keys[1])
                .arg(LEASE.as_millis() as u64)
                .arg(member)
                .ignore();
        }
        let mut store = self.store.clone();
        if tokio::time::timeout(Duration::from_secs(2), pipe.query_async::<()>(&mut store))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            self.count("renew", "ok");
        } else {
            self.count("renew", "error");
        }
    }
}

impl Drop for LongPollLease {
    /// The poll ended: removed from the store by a task of its own (best effort; a removal
    /// that fails expires with the lease).
    fn drop(&mut self) {
        let held = self
            .fleet
            .leases
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
        if let Some(held) = held {
            release(Arc::clone(&self.fleet), held);
        }
    }
}

/// Removes a poll's member from the store, by a task of its own (best effort: a removal that
/// fails expires with the lease).
fn release(fleet: Arc<Fleet>, Held { keys, member }: Held) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("ZREM").arg(key).arg(&member).ignore();
        }
        let mut store = fleet.store.clone();
        let _ =
            tokio::time::timeout(Duration::from_secs(2), pipe.query_async::<()>(&mut store)).await;
    });
}
