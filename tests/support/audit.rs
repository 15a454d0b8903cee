//! Audit capture for tests that run seg in process: every audit record (the process's audit
//! log, writing here) and every `seg::tls` log record of the test process, as JSON lines; the
//! records of one device id, or of one message.

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

/// Where the capture stands: records captured from now on are `since` it.
pub fn mark() -> usize {
    fields().count()
}

/// The fields of every record captured after `mark`, oldest first.
pub fn since(mark: usize) -> Vec<serde_json::Value> {
    fields().skip(mark).collect()
}

/// The fields of every captured record, oldest first; the audit log's queue is written
/// out first.
fn fields() -> impl Iterator<Item = serde_json::Value> {
    if let Some(log) = seg::audit::global() {
        log.flush();
    }
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
            .with_env_filter("seg::tls=info")
            .with_writer(|| AuditWriter)
            .try_init();
        seg::audit::install(seg::audit::Settings {
            sinks: vec![seg::audit::Sink::Writer(Box::new(AuditWriter))],
            when_full: seg::config::WhenFull::Block,
            queue_bytes: 1 << 20,
            flush_interval: std::time::Duration::from_millis(5),
        })
        .expect("audit log");
    });
}

/// The audit records' fields for one device id, oldest first.
pub fn audit(device_id: &str) -> Vec<serde_json::Value> {
    fields().filter(|f| f["device_id"] == device_id).collect()
}
