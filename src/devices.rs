//! What the gateway knows about each device, live: the helpdesk's "why can't alice sync?"
//! answered from the running process, in the shape of Exchange's
//! `Get-MobileDeviceStatistics`.
//!
//! One entry per account and DeviceId, updated when a request's audit record is written
//! (`proxy/audit.rs`): the device's type and User-Agent, its certificate, first and last seen,
//! the last request (command, status, reason, duration), the last refusal, whether a Ping is
//! held now, and the mapping rule that admitted it with the age of that decision. Requests
//! refused before the account is known (no decision, a refused handshake) are kept by
//! certificate serial instead, with the certificate's subject so a search for the person
//! finds them.
//!
//! Bounded: at most `admin.device_capacity` entries (50,000 by default; about 1 KiB each,
//! so 50 MiB at most) in 16 shards; a shard that is full drops its entry seen longest ago (a
//! linear pass over that shard for each device new to a full shard). The hot path costs one
//! shard lock, one hash lookup and two small allocations (the key) per request; reason codes,
//! the mapping rule and its strength are static strings.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;

const SHARDS: usize = 16;
/// The refused handshakes remembered (the latest; about 1 KiB each).
pub const HANDSHAKE_CAPACITY: usize = 1_024;
/// What a device chose (DeviceId, type, User-Agent) and what a refused certificate says
/// (subject, serial) is kept up to this many bytes.
const MAX_FIELD: usize = 256;

/// `value` cut to `MAX_FIELD` bytes, at a character's boundary.
fn clip(value: &str) -> &str {
    if value.len() <= MAX_FIELD {
        return value;
    }
    let mut end = MAX_FIELD;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    &value[..end]
}
/// The most devices one question answers (a search for a common name, say).
pub const MAX_ANSWER: usize = 500;

fn by_last_seen(state: &DeviceState) -> i64 {
    state.last_seen
}

/// One device of one account.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DeviceState {
    /// The account (`sAMAccountName`), or empty when the request was refused before the
    /// account was known.
    pub account: String,
    pub device_id: String,
    pub device_type: String,
    pub user_agent: String,
    pub cert_serial: String,
    /// The certificate's subject; kept for a device refused before its account was known.
    pub cert_subject: String,
    /// The certificate's notAfter, Unix seconds (0 when unknown).
    pub cert_not_after: i64,
    /// How the certificate was mapped (`issuer-serial`…) and how strong that is.
    pub mapping: &'static str,
    pub strength: &'static str,
    /// When the directory gave the identity decision in force at the last admitted request
    /// (here, in a snapshot or on another replica), Unix seconds; 0 when none.
    pub decided_at: i64,
    pub first_seen: i64,
    pub last_seen: i64,
    /// The last request: its command, status, reason code (empty when served) and duration.
    pub last_command: String,
    pub last_status: u16,
    pub last_reason: &'static str,
    pub last_duration_ms: f64,
    /// The last successful (2xx) request, Unix seconds (0 when none).
    pub last_success: i64,
    /// The last refusal (4xx/5xx decided by seg) and when.
    pub last_refusal: &'static str,
    pub last_refusal_at: i64,
    /// Since when a Ping is held now (0 when none).
    pub ping_held_since: i64,
    /// Requests seen since the entry was made.
    pub requests: u64,
    /// The replica that answers (`fleet.replica`; empty without `[fleet]`).
    pub replica: String,
}

/// What a finished request tells about its device.
#[derive(Default)]
pub struct Seen<'a> {
    pub account: &'a str,
    pub device_id: &'a str,
    pub device_type: &'a str,
    pub user_agent: &'a str,
    pub cert_serial: &'a str,
    /// The certificate's subject when no account was known (empty otherwise).
    pub cert_subject: &'a str,
    pub cert_not_after: i64,
    pub mapping: &'static str,
    pub strength: &'static str,
    pub decided_at: i64,
    pub command: &'a str,
    pub status: u16,
    /// The audit record's decision (`forwarded`, `denied`…) and reason code.
    pub decision: &'static str,
    pub reason: &'static str,
    pub duration_ms: f64,
}

/// The devices the gateway has seen, bounded.
pub struct Devices {
    shards: Vec<Mutex<HashMap<(String, String), DeviceState>>>,
    per_shard: usize,
    /// Refused handshakes, apart: anyone can make one with a certificate of their own, so
    /// they have their own small room and never push a device that got through out.
    handshakes: Mutex<HashMap<(String, String), DeviceState>>,
    replica: String,
}

impl Devices {
    /// At most `capacity` devices, answered as `replica`'s (empty without a fleet).
    pub fn new(capacity: usize, replica: &str) -> Devices {
        Devices {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            handshakes: Mutex::new(HashMap::new()),
            replica: replica.to_string(),
        }
    }

    fn shard(
        &self,
        account: &str,
        device_id: &str,
    ) -> &Mutex<HashMap<(String, String), DeviceState>> {
        // FNV-1a: cheap, and the shard only spreads contention.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in account.bytes().chain([0]).chain(device_id.bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        &self.shards[(hash % SHARDS as u64) as usize]
    }

    /// A request has ended: its record, as the audit log writes it.
    pub fn seen(&self, seen: &Seen<'_>) {
        let now = unix_now();
        let key_account = if seen.account.is_empty() {
            format!("certificate:{}", seen.cert_serial)
        } else {
            seen.account.to_ascii_lowercase()
        };
        let device_id = clip(seen.device_id);
        let key = (key_account, device_id.to_string());
        let mut shard = self
            .shard(&key.0, &key.1)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let state = entry(
            &mut shard,
            self.per_shard,
            key,
            seen.account,
            device_id,
            now,
        );
        let set = |field: &mut String, value: &str| {
            let value = clip(value);
            if !value.is_empty() && field != value {
                *field = value.to_string();
            }
        };
        set(&mut state.device_type, seen.device_type);
        set(&mut state.user_agent, seen.user_agent);
        set(&mut state.cert_serial, seen.cert_serial);
        set(&mut state.cert_subject, seen.cert_subject);
        set(&mut state.last_command, seen.command);
        if !seen.mapping.is_empty() {
            state.mapping = seen.mapping;
            state.strength = seen.strength;
            state.decided_at = seen.decided_at;
        }
        if seen.cert_not_after != 0 {
            state.cert_not_after = seen.cert_not_after;
        }
        state.last_seen = now;
        state.last_status = seen.status;
        state.last_reason = seen.reason;
        state.last_duration_ms = seen.duration_ms;
        state.requests += 1;
        if (200..300).contains(&seen.status) {
            state.last_success = now;
        }
        if !matches!(seen.decision, "forwarded" | "abandoned") {
            state.last_refusal = if seen.reason.is_empty() {
                seen.decision
            } else {
                seen.reason
            };
            state.last_refusal_at = now;
        }
        if seen.command == "Ping" {
            state.ping_held_since = 0;
        }
    }

    /// A handshake was refused for `reason` (a TLS reason code such as
    /// `certificate-expired`): kept by the certificate's serial, as no account is known.
    pub fn handshake_refused(
        &self,
        serial: &str,
        subject: &str,
        not_after: i64,
        reason: &'static str,
    ) {
        let serial = clip(serial);
        let key = (format!("certificate:{serial}"), String::new());
        let mut handshakes = self.handshakes.lock().unwrap_or_else(|e| e.into_inner());
        let now = unix_now();
        let state = entry(&mut handshakes, HANDSHAKE_CAPACITY, key, "", "", now);
        if state.cert_serial != serial {
            state.cert_serial = serial.to_string();
            state.cert_subject = clip(subject).to_string();
        }
        state.cert_not_after = not_after;
        state.last_command = "handshake".into();
        state.last_seen = now;
        state.last_status = 0;
        state.last_reason = reason;
        state.last_refusal = reason;
        state.last_refusal_at = now;
        state.requests += 1;
    }

    /// A Ping of this device is held from now on (until its request is `seen`).
    pub fn ping_held(&self, account: &str, device_id: &str) {
        let key = (account.to_ascii_lowercase(), device_id.to_string());
        let mut shard = self
            .shard(&key.0, &key.1)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = unix_now();
        let state = entry(&mut shard, self.per_shard, key, account, device_id, now);
        if state.last_seen == 0 {
            state.last_seen = now;
        }
        state.ping_held_since = now;
    }

    /// Every device of `account` (compared without ASCII case), last seen first.
    pub fn of_account(&self, account: &str) -> Vec<DeviceState> {
        let account = account.to_ascii_lowercase();
        self.collect(|key, _| key.0 == account, by_last_seen, MAX_ANSWER)
    }

    /// Every device with this DeviceId, whatever its account.
    pub fn by_device(&self, device_id: &str) -> Vec<DeviceState> {
        self.collect(
            |key, _| key.1.eq_ignore_ascii_case(device_id),
            by_last_seen,
            MAX_ANSWER,
        )
    }

    /// What a helpdesk's search for `query` finds: the devices of the account of that name,
    /// the device of that DeviceId, the certificate of that serial, and devices refused
    /// before their account was known whose certificate subject names `query`.
    pub fn search(&self, query: &str) -> Vec<DeviceState> {
        let query = query.trim();
        if query.is_empty() {
            return Vec::new();
        }
        let account = query.to_ascii_lowercase();
        let found = |key: &(String, String), state: &DeviceState| {
            key.0 == account
                || key.1.eq_ignore_ascii_case(query)
                || state.cert_serial.eq_ignore_ascii_case(query)
                || (state.account.is_empty()
                    && state.cert_subject.to_ascii_lowercase().contains(&account))
        };
        self.collect(found, by_last_seen, MAX_ANSWER)
    }

    /// The `limit` devices refused last, most recent first.
    pub fn refused(&self, limit: usize) -> Vec<DeviceState> {
        self.collect(
            |_, state| state.last_refusal_at > 0,
            |state| state.last_refusal_at,
            limit.min(MAX_ANSWER),
        )
    }

    /// How many devices are kept now (refused handshakes included).
    pub fn len(&self) -> usize {
        self.rooms()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `limit` wanted devices that come first by `order` (highest first), copied out. A
    /// shard is locked while it is read, and only its first `limit` are copied, so a broad
    /// question costs a pass over the registry, not a copy of it.
    fn collect(
        &self,
        wanted: impl Fn(&(String, String), &DeviceState) -> bool,
        order: impl Fn(&DeviceState) -> i64,
        limit: usize,
    ) -> Vec<DeviceState> {
        let mut out: Vec<DeviceState> = Vec::new();
        for shard in self.rooms() {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            let mut found: Vec<&DeviceState> = shard
                .iter()
                .filter(|(key, state)| wanted(key, state))
                .map(|(_, state)| state)
                .collect();
            found.sort_by_key(|s| std::cmp::Reverse(order(s)));
            out.extend(found.into_iter().take(limit).map(|state| DeviceState {
                replica: self.replica.clone(),
                ..state.clone()
            }));
        }
        out.sort_by_key(|s| std::cmp::Reverse(order(s)));
        out.truncate(limit);
        out
    }
}

impl Devices {
    /// The shards and the room of refused handshakes.
    fn rooms(&self) -> impl Iterator<Item = &Mutex<HashMap<(String, String), DeviceState>>> {
        self.shards.iter().chain(std::iter::once(&self.handshakes))
    }
}

/// The device's entry in `room`, made (first seen `now`) if it has none; a full room (of
/// `capacity`) forgets the device it saw longest ago first.
fn entry<'s>(
    room: &'s mut HashMap<(String, String), DeviceState>,
    capacity: usize,
    key: (String, String),
    account: &str,
    device_id: &str,
    now: i64,
) -> &'s mut DeviceState {
    if !room.contains_key(&key) && room.len() >= capacity {
        evict_oldest(room);
    }
    room.entry(key).or_insert_with(|| DeviceState {
        account: account.to_string(),
        device_id: device_id.to_string(),
        first_seen: now,
        ..DeviceState::default()
    })
}

fn evict_oldest(shard: &mut HashMap<(String, String), DeviceState>) {
    let oldest = shard
        .iter()
        .min_by_key(|(_, state)| state.last_seen)
        .map(|(key, _)| key.clone());
    if let Some(key) = oldest {
        shard.remove(&key);
    }
}

use crate::clock::unix_now;

#[cfg(test)]
mod tests {
    use super::*;

    fn seen<'a>(account: &'a str, device: &'a str, status: u16, reason: &'static str) -> Seen<'a> {
        Seen {
            account,
            device_id: device,
            device_type: "iPhone",
            user_agent: "Apple-iPhone15C2/2104.60",
            cert_serial: "0a",
            cert_subject: "",
            cert_not_after: 2_000_000_000,
            mapping: "issuer-serial",
            strength: "strong",
            decided_at: 1_700_000_000,
            command: "Sync",
            status,
            decision: if status == 200 { "forwarded" } else { "denied" },
            reason,
            duration_ms: 1.5,
        }
    }

    #[test]
    fn a_device_keeps_its_last_request_and_last_refusal() {
        let devices = Devices::new(100, "r1");
        devices.seen(&seen("alice", "PHONE", 200, ""));
        devices.seen(&seen("Alice", "PHONE", 403, "user-mismatch"));
        devices.seen(&seen("alice", "PHONE", 200, ""));
        devices.seen(&seen("alice", "TABLET", 200, ""));
        let alice = devices.of_account("ALICE");
        assert_eq!(alice.len(), 2);
        let phone = alice.iter().find(|d| d.device_id == "PHONE").unwrap();
        assert_eq!(phone.requests, 3);
        assert_eq!(phone.last_status, 200);
        assert_eq!(phone.last_refusal, "user-mismatch");
        assert!(phone.last_success > 0 && phone.last_refusal_at > 0);
        assert_eq!(devices.by_device("phone").len(), 1);
        assert_eq!(devices.refused(10).len(), 1);
        assert_eq!(phone.decided_at, 1_700_000_000);
        assert_eq!(phone.replica, "r1");
        // A handshake refused before any account was known, found by the subject's name.
        devices.handshake_refused(
            "0b",
            "CN=alice,O=Corp",
            1_600_000_000,
            "certificate-expired",
        );
        let found = devices.search("Alice");
        assert_eq!(found.len(), 3, "{found:?}");
        let refused = found.iter().find(|d| d.account.is_empty()).unwrap();
        assert_eq!(refused.last_refusal, "certificate-expired");
        assert_eq!(devices.search("0B").len(), 1);
        assert!(devices.search("  ").is_empty());
        devices.ping_held("alice", "PHONE");
        assert!(
            devices.of_account("alice")[0].ping_held_since > 0
                || devices.by_device("PHONE")[0].ping_held_since > 0
        );
    }

    #[test]
    fn a_question_answers_at_most_its_limit() {
        let devices = Devices::new(10_000, "");
        for n in 0..(MAX_ANSWER + 100) {
            devices.handshake_refused(&format!("{n:x}"), "CN=scanner", 0, "unknown-issuer");
        }
        assert_eq!(devices.search("scanner").len(), MAX_ANSWER);
        assert_eq!(devices.refused(7).len(), 7);
        assert_eq!(devices.refused(usize::MAX).len(), MAX_ANSWER);
        assert_eq!(devices.search("1f").len(), 1, "by serial");
    }

    #[test]
    fn refused_handshakes_never_push_out_a_device_and_fields_are_clipped() {
        let devices = Devices::new(16, "");
        devices.seen(&seen("alice", &"P".repeat(1_000), 200, ""));
        for n in 0..(HANDSHAKE_CAPACITY + 10) {
            devices.handshake_refused(&format!("{n:x}"), &"S".repeat(70_000), 0, "unknown-issuer");
        }
        let alice = devices.of_account("alice");
        assert_eq!(alice.len(), 1, "alice's phone is still known");
        assert_eq!(alice[0].device_id.len(), MAX_FIELD);
        assert_eq!(devices.len(), 1 + HANDSHAKE_CAPACITY);
        assert!(devices
            .refused(10)
            .iter()
            .all(|d| d.cert_subject.len() == MAX_FIELD));
        assert_eq!(clip("ééé"), "ééé");
        assert_eq!(clip(&"é".repeat(200)).len(), MAX_FIELD);
    }

    #[test]
    fn memory_is_bounded_by_the_capacity() {
        let devices = Devices::new(32, "");
        for n in 0..1_000 {
            let id = format!("D{n}");
            devices.seen(&seen("bulk", &id, 200, ""));
        }
        assert!(devices.len() <= 32, "{} kept", devices.len());
        assert!(!devices.is_empty());
    }
}
