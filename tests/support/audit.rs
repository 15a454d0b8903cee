//! Audit capture for tests that run seg in process: every `seg::audit` and `seg::tls` record
//! of the test process, as JSON lines; the records of one device id, or of one message.

use std::sync::{Mutex, OnceLock};

static AUDIT: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct AuditWriter;

impl std::io::Write for AuditWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        AUDIT.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The fields of every captured record whose message is `message` (`seg::tls` records:
/// `"handshake refused"`), oldest first.
pub fn log_records(message: &str) -> Vec<serde_json::Value> {
    fields().filter(|f| f["message"] == message).collect()
}

/// The fields of every captured record, oldest first.
fn fields() -> impl Iterator<Item = serde_json::Value> {
    let text = String::from_utf8_lossy(&AUDIT.lock().unwrap()).into_owned();
    let records: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["fields"].clone())
        .collect();
    records.into_iter()
}

/// Installs the capture (once per process; later calls do nothing).
pub fn capture_audit() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter("seg::audit=info,seg::tls=info")
            .with_writer(|| AuditWriter)
            .try_init();
    });
}

/// The audit records' fields for one device id, oldest first.
pub fn audit(device_id: &str) -> Vec<serde_json::Value> {
    fields().filter(|f| f["device_id"] == device_id).collect()
}
