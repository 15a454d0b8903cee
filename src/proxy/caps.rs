//! Connection caps per device address and per device certificate.
//!
//! `listen.max_connections` bounds the whole listener; these keep one address (a script, a
//! scanner) or one certificate (stolen, or a buggy client opening connections in a loop)
//! from taking all of it. A count lives only while connections hold it: the maps never hold
//! more keys than there are open connections.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::identity::CertFingerprint;

/// The process's connection caps. Built once by the accept loop: `[listen]` changes need a
/// restart, so a reload never changes them.
pub struct ConnectionCaps {
    pub per_address: Arc<KeyedCap<IpAddr>>,
    pub per_device: Arc<KeyedCap<CertFingerprint>>,
    /// `listen.max_pending_head_bytes`: what unfinished request heads hold in all.
    pub heads: Arc<HeadBudget>,
}

impl ConnectionCaps {
    pub fn new(per_address: usize, per_device: usize, head_bytes: usize) -> ConnectionCaps {
        ConnectionCaps {
            per_address: Arc::new(KeyedCap::new(per_address)),
            per_device: Arc::new(KeyedCap::new(per_device)),
            heads: Arc::new(HeadBudget {
                max: head_bytes,
                held: AtomicUsize::new(0),
            }),
        }
    }
}

/// The bytes every connection's unfinished request head holds together, bounded: one
/// connection's head is bounded by `MAX_REQUEST_HEAD`, but thousands of connections each
/// trickling one in would otherwise hold thousands of them.
pub struct HeadBudget {
    max: usize,
    held: AtomicUsize,
}

impl HeadBudget {
    /// Bytes held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// One connection's share of the `HeadBudget`, given back when dropped.
pub struct HeadCharge {
    budget: Arc<HeadBudget>,
    held: usize,
}

impl HeadCharge {
    pub fn new(budget: &Arc<HeadBudget>) -> HeadCharge {
        HeadCharge {
            budget: Arc::clone(budget),
            held: 0,
        }
    }

    /// Makes the connection's share `bytes`; false, and nothing charged, when that would
    /// take the total past the budget.
    pub fn set(&mut self, bytes: usize) -> bool {
        if bytes <= self.held {
            self.budget
                .held
                .fetch_sub(self.held - bytes, Ordering::AcqRel);
            self.held = bytes;
            return true;
        }
        let more = bytes - self.held;
        let charged = self
            .budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more)
                    .filter(|&total| total <= self.budget.max)
            });
        if charged.is_ok() {
            self.held = bytes;
        }
        charged.is_ok()
    }
}

impl Drop for HeadCharge {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// The key an address is counted under: an IPv4 address (an IPv4-mapped IPv6 one as IPv4),
/// or an IPv6 address's /64, since one host commonly holds a whole /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & (u128::MAX << 64)).into()),
        },
    }
}

/// Why a slot was refused: `first` is true for the first refusal since the key last had a
/// free slot, so a cap reached is logged once per episode, not once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapFull {
    pub first: bool,
}

/// At most `max` connections at once per key.
pub struct KeyedCap<K> {
    max: usize,
    counts: Mutex<HashMap<K, Slots>>,
}

#[derive(Default)]
struct Slots {
    open: usize,
    refusing: bool,
}

impl<K: Hash + Eq + Clone> KeyedCap<K> {
    pub fn new(max: usize) -> KeyedCap<K> {
        KeyedCap {
            max,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for `key`, held until the guard is dropped.
    pub fn acquire(self: &Arc<Self>, key: K) -> Result<CapGuard<K>, CapFull> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let slots = counts.entry(key.clone()).or_default();
        if slots.open >= self.max {
            let first = !slots.refusing;
            slots.refusing = true;
            return Err(CapFull { first });
        }
        slots.open += 1;
        Ok(CapGuard {
            cap: Arc::clone(self),
            key,
        })
    }
}

/// One connection's slot under its key.
pub struct CapGuard<K: Hash + Eq> {
    cap: Arc<KeyedCap<K>>,
    key: K,
}

impl<K: Hash + Eq> Drop for CapGuard<K> {
    fn drop(&mut self) {
        let mut counts = self.cap.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slots) = counts.get_mut(&self.key) {
            slots.open -= 1;
            slots.refusing = false;
            if slots.open == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl<K: Hash + Eq> KeyedCap<K> {
        fn open(&self, key: &K) -> usize {
            self.counts.lock().unwrap().get(key).map_or(0, |s| s.open)
        }

        fn keys(&self) -> usize {
            self.counts.lock().unwrap().len()
        }
    }

    #[test]
    fn a_key_gets_max_slots_and_one_more_after_a_release() {
        let cap = Arc::new(KeyedCap::new(2));
        let a = cap.acquire("a").expect("first");
        let _b = cap.acquire("a").expect("second");
        assert_eq!(cap.acquire("a").err(), Some(CapFull { first: true }));
        assert_eq!(cap.acquire("a").err(), Some(CapFull { first: false }));
        let _other = cap.acquire("b").expect("another key has its own slots");
        drop(a);
        let _c = cap.acquire("a").expect("a slot freed");
        assert_eq!(cap.acquire("a").err(), Some(CapFull { first: true }));
        assert_eq!(cap.open(&"a"), 2);
    }

    #[test]
    fn keys_are_forgotten_when_their_last_connection_closes() {
        let cap = Arc::new(KeyedCap::new(3));
        let guards: Vec<_> = (0..100).map(|i| cap.acquire(i).expect("slot")).collect();
        assert_eq!(cap.keys(), 100);
        drop(guards);
        assert_eq!(cap.keys(), 0);
    }

    #[test]
    fn addresses_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let rows = [
            ("198.51.100.7", "198.51.100.7"),
            ("::ffff:198.51.100.7", "198.51.100.7"),
            ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::"),
            ("2001:db8:1:2::1", "2001:db8:1:2::"),
            ("2001:db8:1:3::1", "2001:db8:1:3::"),
            ("::1", "::"),
        ];
        for (address, key) in rows {
            let ip: IpAddr = address.parse().unwrap();
            assert_eq!(address_key(ip), key.parse::<IpAddr>().unwrap(), "{address}");
        }
    }

    #[test]
    fn unfinished_heads_share_one_budget() {
        let caps = ConnectionCaps::new(10, 10, 100);
        let mut a = HeadCharge::new(&caps.heads);
        let mut b = HeadCharge::new(&caps.heads);
        assert!(a.set(60));
        assert!(!b.set(50), "past the budget");
        assert_eq!(caps.heads.held(), 60, "a refused charge takes nothing");
        assert!(b.set(40));
        assert!(a.set(10), "a head that shrinks gives bytes back");
        assert!(b.set(90));
        drop(b);
        assert_eq!(caps.heads.held(), 10);
        drop(a);
        assert_eq!(caps.heads.held(), 0);
    }
}
