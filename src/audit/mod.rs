//! The audit log: one JSON line per request (`json`), queued in memory and written in batches
//! by a thread of its own, so a request pays for forming its line and taking a lock, never
//! for a write.
//!
//! Lines go to stdout (the journal under systemd, the container log on Kubernetes), to a file,
//! or to both (`[audit]`). The writer looks at the queue every `audit.flush_interval` and
//! writes what it holds with one call per sink; so a crash loses at most the lines of the
//! last interval, and a request never has to wake the writer. The queue holds at most `audit.queue_bytes`; when a sink is slower than the traffic,
//! `audit.when_full` decides: `drop` (the default) keeps serving and counts every line it
//! could not queue in `seg_audit_records_dropped_total`, `block` holds the request that would
//! write the line until the writer has made room, so no request is answered without its
//! record and the gateway slows to the sink's pace. A write that fails is counted in
//! `seg_audit_write_errors_total` with its lines. `reopen` (SIGHUP) opens the file again
//! under its name, after logrotate's `create`; the file is opened for appending, so
//! `copytruncate` needs no signal. `flush` (shutdown) waits until every queued line is
//! written.
//!
//! The log is one per process, like the tracing subscriber: `install` it once at start,
//! and requests write to it through `record`; with none installed, records go nowhere.

pub mod json;

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{AuditConfig, WhenFull};
use crate::metrics::AuditCounters;
use json::{DateCache, Line};

/// The longest `flush` waits for the writer.
const FLUSH_WAIT: Duration = Duration::from_secs(5);
/// How often a failing sink is logged at most.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);

/// Where lines are written.
pub enum Sink {
    Stdout,
    /// A file, opened for appending (created 0640 when missing).
    File(PathBuf),
    /// Any writer (tests capture the log in memory with it).
    Writer(Box<dyn Write + Send>),
}

/// How the log is built.
pub struct Settings {
    pub sinks: Vec<Sink>,
    pub when_full: WhenFull,
    pub queue_bytes: usize,
    pub flush_interval: Duration,
}

impl Settings {
    /// The configured log; stdout only when `stdout_enabled` (`SEG_LOG` lets `seg::audit`
    /// through at info, as it always decided).
    pub fn from_config(config: &AuditConfig, stdout_enabled: bool) -> Settings {
        let mut sinks = Vec::new();
        if config.stdout && stdout_enabled {
            sinks.push(Sink::Stdout);
        }
        if let Some(path) = &config.file {
            sinks.push(Sink::File(path.clone()));
        }
        Settings {
            sinks,
            when_full: config.when_full,
            queue_bytes: config.queue_bytes,
            flush_interval: config.flush_interval,
        }
    }
}

/// The process's audit log.
pub struct AuditLog {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The writer waits here for lines, a flush, a reopen.
    work: Condvar,
    /// Requests (when the queue is full, `block`) and `flush` wait here for the writer.
    progress: Condvar,
    when_full: WhenFull,
    queue_bytes: usize,
    flush_interval: Duration,
    counters: AuditCounters,
}

struct Queue {
    buf: Vec<u8>,
    /// Lines ever queued, and ever handed to the sinks (sequence numbers for `flush`).
    queued: u64,
    written: u64,
    date: DateCache,
    /// Someone waits: write what there is now.
    hurry: bool,
    reopen: bool,
}

static LOG: OnceLock<AuditLog> = OnceLock::new();

/// Builds the log and starts its writer; the first call wins (later ones return the log
/// already installed). With no sink nothing is installed, so no record is formed at all.
/// Fails when a file cannot be opened.
pub fn install(settings: Settings) -> io::Result<Option<&'static AuditLog>> {
    if let Some(log) = LOG.get() {
        return Ok(Some(log));
    }
    if settings.sinks.is_empty() {
        return Ok(None);
    }
    let log = AuditLog::start(settings)?;
    Ok(Some(LOG.get_or_init(|| log)))
}

/// The installed log, if any.
pub fn global() -> Option<&'static AuditLog> {
    LOG.get()
}

/// Writes one record to the installed log.
pub fn record(fill: impl FnOnce(&mut Line)) {
    if let Some(log) = LOG.get() {
        log.write(fill);
    }
}

impl AuditLog {
    fn start(settings: Settings) -> io::Result<AuditLog> {
        let sinks = settings
            .sinks
            .into_iter()
            .map(OpenSink::open)
            .collect::<io::Result<Vec<_>>>()?;
        let counters = AuditCounters::new();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                buf: Vec::with_capacity(64 * 1024),
                queued: 0,
                written: 0,
                date: DateCache::default(),
                hurry: false,
                reopen: false,
            }),
            work: Condvar::new(),
            progress: Condvar::new(),
            when_full: settings.when_full,
            queue_bytes: settings.queue_bytes.max(1),
            flush_interval: settings.flush_interval,
            counters,
        });
        let writer = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("seg-audit".into())
            .spawn(move || writer.run(sinks))?;
        Ok(AuditLog { shared })
    }

    /// The log's counters, for a gateway's registry.
    pub fn counters(&self) -> &AuditCounters {
        &self.shared.counters
    }

    /// Queues one line; `fill` writes its fields.
    pub fn write(&self, fill: impl FnOnce(&mut Line)) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let unix_micros = now.as_secs() * 1_000_000 + u64::from(now.subsec_micros());
        let shared = &*self.shared;
        let mut queue = shared.lock();
        if queue.buf.len() >= shared.queue_bytes {
            match shared.when_full {
                WhenFull::Drop => {
                    drop(queue);
                    shared.counters.dropped.inc();
                    return;
                }
                WhenFull::Block => {
                    queue.hurry = true;
                    shared.work.notify_one();
                    queue = shared
                        .progress
                        .wait_while(queue, |q| q.buf.len() >= shared.queue_bytes)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
        let Queue { buf, date, .. } = &mut *queue;
        let mut line = Line::start(buf, date, unix_micros);
        fill(&mut line);
        line.end();
        queue.queued += 1;
        shared.counters.queued_bytes.set(queue.buf.len() as i64);
        // Past half the queue, the writer does not wait for the end of its interval.
        let hurry = !queue.hurry && queue.buf.len() >= shared.queue_bytes / 2;
        queue.hurry |= hurry;
        drop(queue);
        if hurry {
            shared.work.notify_one();
        }
    }

    /// Waits (at most 5 s) until every line queued before the call is written.
    pub fn flush(&self) {
        let shared = &*self.shared;
        let mut queue = shared.lock();
        let target = queue.queued;
        if queue.written >= target {
            return;
        }
        queue.hurry = true;
        shared.work.notify_one();
        let _ = shared
            .progress
            .wait_timeout_while(queue, FLUSH_WAIT, |q| q.written < target);
    }

    /// Opens the file sink again under its name (after logrotate's `create`), before the
    /// next batch.
    pub fn reopen(&self) {
        let mut queue = self.shared.lock();
        queue.reopen = true;
        queue.hurry = true;
        drop(queue);
        self.shared.work.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer thread: waits for a first line, lets a batch gather, writes it, again.
    fn run(&self, mut sinks: Vec<OpenSink>) {
        let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut queue = self.lock();
        loop {
            if queue.reopen {
                queue.reopen = false;
                drop(queue);
                for sink in &mut sinks {
                    sink.reopen(&self.counters);
                }
                queue = self.lock();
                continue;
            }
            if queue.buf.is_empty() || !queue.hurry {
                // Lines wait for the next look, at most one interval; a request never wakes
                // the writer (a wake-up on the request path costs a system call and, with
                // both threads on one core, a switch to this thread), only `hurry` does.
                if queue.buf.is_empty() {
                    queue.hurry = false;
                    self.progress.notify_all();
                }
                let (next, timed_out) = self
                    .work
                    .wait_timeout(queue, self.flush_interval)
                    .unwrap_or_else(|e| e.into_inner());
                queue = next;
                if !timed_out.timed_out() || queue.buf.is_empty() {
                    continue;
                }
            }
            queue.hurry = false;
            std::mem::swap(&mut queue.buf, &mut batch);
            let (from, to) = (queue.written, queue.queued);
            self.counters.queued_bytes.set(0);
            drop(queue);
            let lines = to - from;
            for sink in &mut sinks {
                sink.write(&batch, lines, &self.counters);
            }
            self.counters.written.inc_by(lines);
            // Keep a batch-sized buffer, not the largest one ever seen.
            batch.clear();
            batch.shrink_to(self.queue_bytes.min(1 << 20));
            queue = self.lock();
            queue.written = to;
            self.counters.queued_bytes.set(queue.buf.len() as i64);
            self.progress.notify_all();
        }
    }
}

/// A sink, opened.
struct OpenSink {
    kind: Sink,
    file: Option<File>,
    last_error_logged: Option<Instant>,
}

impl OpenSink {
    fn open(kind: Sink) -> io::Result<OpenSink> {
        let file = match &kind {
            Sink::File(path) => Some(open_append(path).map_err(|e| {
                io::Error::new(e.kind(), format!("audit.file {}: {e}", path.display()))
            })?),
            _ => None,
        };
        Ok(OpenSink {
            kind,
            file,
            last_error_logged: None,
        })
    }

    fn write(&mut self, batch: &[u8], lines: u64, counters: &AuditCounters) {
        let result = match (&mut self.kind, &mut self.file) {
            (Sink::Stdout, _) => {
                // Under stdout's lock, as every other log line is written: lines never mix.
                let mut out = io::stdout().lock();
                out.write_all(batch).and_then(|()| out.flush())
            }
            (Sink::File(_), Some(file)) => file.write_all(batch),
            (Sink::File(_), None) => Err(io::Error::other("not open")),
            (Sink::Writer(writer), _) => writer.write_all(batch).and_then(|()| writer.flush()),
        };
        if let Err(e) = result {
            counters.write_errors.inc_by(lines);
            self.log_error(&format!("{lines} audit records not written: {e}"));
        }
    }

    fn reopen(&mut self, counters: &AuditCounters) {
        let Sink::File(path) = &self.kind else {
            return;
        };
        match open_append(path) {
            Ok(file) => {
                self.file = Some(file);
                tracing::info!(target: "seg::audit_log", file = %path.display(), "audit file reopened");
            }
            Err(e) => {
                counters.write_errors.inc();
                let text = format!(
                    "cannot reopen the audit file {}: {e}; still writing to the old one",
                    path.display()
                );
                self.log_error(&text);
            }
        }
    }

    fn log_error(&mut self, text: &str) {
        if self
            .last_error_logged
            .is_some_and(|at| at.elapsed() < ERROR_LOG_EVERY)
        {
            return;
        }
        self.last_error_logged = Some(Instant::now());
        let sink = match &self.kind {
            Sink::Stdout => "stdout".to_string(),
            Sink::File(path) => path.display().to_string(),
            Sink::Writer(_) => "writer".to_string(),
        };
        tracing::error!(target: "seg::audit_log", sink, "{text}");
    }
}

fn open_append(path: &std::path::Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o640);
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer into shared memory that can be held shut, as a stalled pipe would be.
    #[derive(Clone, Default)]
    struct Held {
        bytes: Arc<Mutex<Vec<u8>>>,
        shut: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Held {
        fn shut(&self, shut: bool) {
            *self.shut.0.lock().unwrap() = shut;
            self.shut.1.notify_all();
        }

        fn lines(&self) -> Vec<serde_json::Value> {
            let bytes = self.bytes.lock().unwrap();
            bytes
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).expect("a JSON line"))
                .collect()
        }
    }

    impl Write for Held {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (shut, open) = &*self.shut;
            drop(open.wait_while(shut.lock().unwrap(), |s| *s).unwrap());
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn log(sink: &Held, when_full: WhenFull, queue_bytes: usize) -> AuditLog {
        AuditLog::start(Settings {
            sinks: vec![Sink::Writer(Box::new(sink.clone()))],
            when_full,
            queue_bytes,
            flush_interval: Duration::from_millis(5),
        })
        .expect("log")
    }

    fn numbered(log: &AuditLog, n: u64) {
        log.write(|line| line.uint("status", n));
    }

    #[test]
    fn lines_are_written_in_order_and_flushed() {
        let sink = Held::default();
        let log = log(&sink, WhenFull::Drop, 1 << 20);
        for n in 0..1000 {
            numbered(&log, n);
        }
        log.flush();
        let statuses: Vec<u64> = sink
            .lines()
            .iter()
            .map(|v| v["fields"]["status"].as_u64().unwrap())
            .collect();
        assert_eq!(statuses, (0..1000).collect::<Vec<_>>());
        assert_eq!(log.counters().written.get(), 1000);
        assert_eq!(log.counters().dropped.get(), 0);
    }

    /// In-process: a sink held shut is the only way to stall the writer on demand here; the
    /// same behaviour against a real unread pipe is tested in `tests/audit_log.rs`.
    #[test]
    fn a_full_queue_drops_and_counts_when_told_to() {
        let sink = Held::default();
        sink.shut(true);
        let log = log(&sink, WhenFull::Drop, 4096);
        for n in 0..500 {
            numbered(&log, n);
        }
        let dropped = log.counters().dropped.get();
        assert!(dropped > 0, "nothing dropped");
        sink.shut(false);
        log.flush();
        let written = sink.lines().len() as u64;
        assert_eq!(
            written + dropped,
            500,
            "{written} written, {dropped} dropped"
        );
        assert_eq!(log.counters().written.get(), written);
    }

    #[test]
    fn a_full_queue_holds_the_writer_of_a_line_when_told_to() {
        let sink = Held::default();
        sink.shut(true);
        let log = Arc::new(log(&sink, WhenFull::Block, 4096));
        let writing = Arc::clone(&log);
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&done);
        let thread = std::thread::spawn(move || {
            for n in 0..500 {
                numbered(&writing, n);
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        let held_at = done.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            held_at < 500,
            "the queue never filled: {held_at} lines queued"
        );
        sink.shut(false);
        thread.join().unwrap();
        log.flush();
        assert_eq!(sink.lines().len(), 500);
        assert_eq!(log.counters().dropped.get(), 0);
    }
}
