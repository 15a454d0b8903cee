//! One audit record per request, written when its response body ends (or is abandoned), so
//! a long poll is recorded with its real duration and byte counts.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::activesync::EasRequest;
use crate::identity::resolver::Denial;
use crate::identity::{Identity, MappingStrength};
use crate::metrics::Metrics;
use crate::upstream::exchange::{ClientError, UpstreamBody};

use crate::transport::tls_conn::{Cut, IoWatch};

/// Who the device turned out to be; the record reads its fields when it is written.
pub enum AuditSubject {
    /// Not resolved (the directory could not answer).
    Unknown,
    Admitted(Arc<Identity>),
    Denied(Arc<Denial>),
}

/// What the audit log says about one request.
pub struct AuditRecord {
    pub started: Instant,
    pub peer: SocketAddr,
    pub subject: AuditSubject,
    pub eas: EasRequest,
    pub status: u16,
    /// `forwarded`, `denied`, `unavailable`, `refused`, `throttled`, `upstream-error`,
    /// `abandoned` or `drained`.
    pub decision: &'static str,
    pub reason: &'static str,
    /// The KDC event a domain controller would log for the same refusal (39, 40, 41, 21).
    pub kdc_event: Option<u32>,
    pub bytes_in: Arc<AtomicU64>,
    pub metrics: Arc<Metrics>,
    /// The device-policy decision (`allowed-by-rule`, `allowed-by-default`, or empty).
    pub policy: &'static str,
    /// Held while a long poll is in flight; released with the record.
    pub long_poll: Option<crate::policy::LongPollGuard>,
    /// With `[fleet]`: the same long poll counted across the fleet; released with the record.
    pub fleet_lease: Option<crate::fleet::caps::LongPollLease>,
    /// The device connection's socket: a response cut because the device stopped reading
    /// is written with reason `response-write-timeout`.
    pub device_io: Arc<IoWatch>,
    /// Set once the record is written, so it is written exactly once.
    pub written: bool,
    /// What the gateway remembers of each device, updated as the record is written.
    pub devices: Arc<crate::devices::Devices>,
}

impl Drop for AuditRecord {
    /// A record dropped unwritten belongs to a request the device abandoned before any
    /// response (a held Ping whose device went away): written as 499, as nginx does. One
    /// that seg cut was answered by the connection: 503 + `Retry-After` by a drain
    /// (`drained`), 403 by a fleet block (`denied`, `blocked`).
    fn drop(&mut self) {
        if self.written {
            return;
        }
        match self.device_io.cut() {
            Some(Cut::Drain) => {
                self.status = 503;
                self.decision = "drained";
                self.reason = "drain";
                self.finish(0, true);
            }
            Some(Cut::Blocked) => {
                self.status = 403;
                self.decision = "denied";
                self.reason = "blocked";
                self.finish(0, true);
            }
            None => {
                self.status = 499;
                self.decision = "abandoned";
                self.finish(0, false);
            }
        }
    }
}

impl AuditRecord {
    /// A request's record, before anything is decided: forwarded unless it says otherwise.
    pub fn new(
        peer: SocketAddr,
        eas: EasRequest,
        metrics: &Arc<Metrics>,
        device_io: &Arc<IoWatch>,
        devices: &Arc<crate::devices::Devices>,
    ) -> AuditRecord {
        AuditRecord {
            started: Instant::now(),
            peer,
            subject: AuditSubject::Unknown,
            eas,
            status: 0,
            decision: "forwarded",
            reason: "",
            kdc_event: None,
            bytes_in: Arc::new(AtomicU64::new(0)),
            metrics: Arc::clone(metrics),
            policy: "",
            long_poll: None,
            fleet_lease: None,
            device_io: Arc::clone(device_io),
            written: false,
            devices: Arc::clone(devices),
        }
    }

    /// Writes the record of a request refused at its head (nothing of it read but the
    /// connection it came on): `status` answered, or `None` when the connection closed
    /// without an answer.
    pub fn refused_head(mut self, status: Option<u16>, reason: &'static str) {
        self.decision = "refused";
        self.reason = reason;
        self.status = status.unwrap_or(400);
        self.finish(0, status.is_some());
    }

    fn finish(&mut self, bytes_out: u64, completed: bool) {
        self.written = true;
        if !completed && self.reason.is_empty() && self.device_io.write_timed_out() {
            self.reason = "response-write-timeout";
        }
        let duration = self.started.elapsed();
        let command = self.eas.command_label();
        let status_class = match self.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.metrics
            .requests
            .with_label_values(&[command, status_class])
            .inc();
        let by_kind = if self.eas.is_long_poll() {
            &self.metrics.request_duration_long_poll
        } else {
            &self.metrics.request_duration_short
        };
        by_kind.observe(duration.as_secs_f64());
        let eas = &self.eas;
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let duration_us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        // What the device registry keeps of this request; the subject's part is read once,
        // for it and for the record.
        let mut seen = crate::devices::Seen {
            device_id: eas.device_id.as_deref().unwrap_or(""),
            device_type: eas.device_type.as_deref().unwrap_or(""),
            user_agent: eas.user_agent.as_deref().unwrap_or(""),
            command: eas.command_name(),
            status: self.status,
            decision: self.decision,
            reason: self.reason,
            duration_ms: duration_us as f64 / 1000.0,
            ..crate::devices::Seen::default()
        };
        let (cert_issuer, account) = match &self.subject {
            AuditSubject::Unknown => ("", ""),
            AuditSubject::Admitted(i) => {
                // The registry keeps a device by its account's sAMAccountName.
                seen.account = i
                    .account
                    .sam_account_name
                    .as_deref()
                    .unwrap_or(&i.account.dn);
                seen.cert_serial = &i.cert_serial;
                seen.cert_not_after = i.validity.1;
                seen.mapping = i.rule.name();
                seen.strength = match i.strength {
                    MappingStrength::Strong => "strong",
                    MappingStrength::Weak => "weak",
                };
                seen.decided_at = i.decided_unix;
                (i.cert_issuer.as_str(), i.account.dn.as_str())
            }
            AuditSubject::Denied(d) => {
                seen.cert_serial = &d.cert_serial;
                if d.account.is_none() {
                    seen.cert_subject = &d.cert_subject;
                }
                (d.cert_issuer.as_str(), d.account.as_deref().unwrap_or(""))
            }
        };
        self.devices.seen(&seen);
        let (cert_serial, mapping, strength) = (seen.cert_serial, seen.mapping, seen.strength);
        crate::audit::record(|line| {
            line.addr("peer", &self.peer);
            line.str("cert_serial", cert_serial);
            line.str("cert_issuer", cert_issuer);
            line.str("account", account);
            line.str("mapping", mapping);
            line.str("strength", strength);
            line.str("cmd", eas.command_name());
            line.str(
                "protocol_version",
                eas.protocol_version.as_deref().unwrap_or(""),
            );
            line.str("device_id", eas.device_id.as_deref().unwrap_or(""));
            line.str("device_type", eas.device_type.as_deref().unwrap_or(""));
            line.str("user_agent", eas.user_agent.as_deref().unwrap_or(""));
            line.str("user_param", eas.user.as_deref().unwrap_or(""));
            line.str("policy", self.policy);
            line.uint("status", u64::from(self.status));
            line.uint("bytes_in", bytes_in);
            line.uint("bytes_out", bytes_out);
            line.millis("duration_ms", duration_us);
            line.bool("completed", completed);
            line.str("decision", self.decision);
            line.str("reason", self.reason);
            if let Some(event) = self.kdc_event {
                line.uint("kdc_event", u64::from(event));
            }
        });
    }
}

enum Inner {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
}

/// The response body toward the device; counts bytes and writes the audit record at its end.
pub struct AuditBody {
    inner: Inner,
    record: Option<Box<AuditRecord>>,
    bytes_out: u64,
}

impl AuditBody {
    pub fn upstream(body: UpstreamBody, record: AuditRecord) -> AuditBody {
        AuditBody {
            inner: Inner::Upstream(body),
            record: Some(Box::new(record)),
            bytes_out: 0,
        }
    }

    pub fn local(bytes: Bytes, record: AuditRecord) -> AuditBody {
        AuditBody {
            inner: Inner::Local(Some(bytes)),
            record: Some(Box::new(record)),
            bytes_out: 0,
        }
    }

    fn inner_ended(&self) -> bool {
        match &self.inner {
            Inner::Upstream(body) => body.is_end_stream(),
            Inner::Local(bytes) => bytes.is_none(),
        }
    }

    fn complete(&mut self, completed: bool) {
        if let Some(mut record) = self.record.take() {
            record.finish(self.bytes_out, completed);
        }
    }
}

impl Body for AuditBody {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::Upstream(body) => Pin::new(body).poll_frame(cx),
            Inner::Local(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes_out += data.len() as u64;
                }
                // hyper stops polling a body that reports its end; record completion now.
                if this.inner_ended() {
                    this.complete(true);
                }
            }
            Poll::Ready(None) => this.complete(true),
            Poll::Ready(Some(Err(error))) => {
                // The response head went out already: the device sees a cut response, the
                // record and the upstream counter say why.
                if let Some(record) = this.record.as_mut() {
                    let kind = match error {
                        ClientError::BodySilent => "upstream-body-timeout",
                        _ => "upstream-body-failed",
                    };
                    record.reason = kind;
                    record
                        .metrics
                        .upstream_errors
                        .with_label_values(&[kind])
                        .inc();
                }
                this.complete(false)
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner_ended()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(body) => body.size_hint(),
            Inner::Local(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Inner::Local(None) => SizeHint::with_exact(0),
        }
    }
}

impl Drop for AuditBody {
    fn drop(&mut self) {
        // Dropped before its end: the device went away or the connection failed.
        self.complete(false);
    }
}
