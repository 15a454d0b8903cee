//! The device-facing proxy: accept, TLS handshake, identity, forward, audit.
//!
//! `serve` owns the accept loop and connection limits (`caps`: per address and per
//! certificate); `slow` bounds a trickling request body and a device that stops reading. Each
//! request is resolved to a decision (a cache hit for a known device), refused in `refusal` or
//! forwarded through `forward`, and audited by the response body when it ends.

mod audit;
mod caps;
mod connection;
mod forward;
mod handshake_log;
mod refusal;
mod slow;
pub mod target;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::upstream::exchange::BodyFault;
pub use audit::AuditBody;
pub use connection::RequestBody;
use forward::Outgoing;
pub use forward::{ExchangeError, HeaderPolicy, Upstream, UpstreamSetupError};
pub use refusal::{Fault, Refusal, RETRY_AFTER_SECS, REVOCATION_UNAVAILABLE};

use crate::activesync::{EasRequest, QueryForm};
use crate::config::Config;
use crate::directory::Directory;
use crate::fleet::caps::FleetCap;
use crate::identity::resolver::{Decision, Remembered, Resolver};
use crate::identity::{CertFingerprint, DenyReason, Identity};
use crate::metrics::Metrics;
use crate::policy::{check_device, rules_for, user_matches, LongPollCap, LongPolls, PolicyDenial};
use crate::revocation::online::Verdict;
use crate::revocation::CurrentRevocation;
use crate::tls::ntauth::NtAuthVerdict;
use crate::transport::tls_conn::{Cut, DeviceTls, IoWatch};
use audit::{AuditRecord, AuditSubject};
use caps::{address_key, CapFull, ConnectionCaps, HeadCharge};
use connection::CountingBody;
use connection::{ConnectionError, DeviceConn};
use handshake_log::HandshakeLog;
use slow::{BodyPace, PacedBody};

/// Everything built from one configuration. Each connection keeps the gateway it was
/// accepted under; a reload swaps in a new one for the connections that follow.
pub struct Gateway {
    pub config: Config,
    pub resolver: Arc<Resolver>,
    pub directory: Arc<Directory>,
    pub upstream: Upstream,
    pub headers: HeaderPolicy,
    pub long_polls: Arc<LongPolls>,
    /// The listener's TLS configuration (`crate::tls::server_config`).
    pub tls: Arc<rustls::ServerConfig>,
    /// The client-certificate policy inside it (chain, EKU, CRLs in force), for the admin
    /// listener's live decision.
    pub client_policy: Arc<crate::tls::ClientCertPolicy>,
    pub revocation: Arc<CurrentRevocation>,
    /// OCSP and distribution-point CRLs, checked per request after the CRLs in force.
    pub online: Arc<crate::revocation::online::OnlineRevocation>,
    /// Kerberos constrained delegation (`identity.mode = "kerberos"`); None in header mode.
    pub delegation: Option<Arc<crate::kerberos::Delegation>>,
    /// The store shared with the other replicas (`[fleet]`).
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
    /// What the gateway knows about each device (the device API), for the process.
    pub devices: Arc<crate::devices::Devices>,
    pub metrics: Arc<Metrics>,
    /// Digest of the directory's files, to notice a rotated bind password on reload.
    pub directory_files: Vec<u8>,
    /// The wall clock for certificate validity and session age.
    pub clock: crate::clock::Clock,
    /// Which CAs may issue logon certificates; `None` when the client CAs issue leaves only
    /// (or `ntauth.danger_any_client_ca`).
    pub ntauth: Option<Arc<crate::tls::ntauth::NtAuthStore>>,
}

/// What the gateway decided for one request (`Gateway::decide`). Only ever a return value,
/// never kept, so the answer is not boxed.
#[allow(clippy::large_enum_variant)]
enum Handled {
    /// seg answers itself.
    Answered(Response<AuditBody>),
    /// The request goes upstream (`Gateway::forward`).
    Forward(Box<Forward>),
}

/// A request ready for the upstream, with what its answer needs.
struct Forward {
    record: AuditRecord,
    outgoing: Box<Outgoing>,
    /// Kerberos mode: the account whose own upstream connections carry the request.
    principal: Option<Arc<str>>,
}

/// The gateway serving new connections now.
pub struct Live(RwLock<Arc<Gateway>>);

impl Live {
    pub fn new(gateway: Arc<Gateway>) -> Live {
        Live(RwLock::new(gateway))
    }

    pub fn load(&self) -> Arc<Gateway> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn store(&self, gateway: Arc<Gateway>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = gateway;
    }
}

/// What a request is, by its canonical path and method.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `POST /Microsoft-Server-ActiveSync`: a command, with Cmd, DeviceId, DeviceType.
    Command,
    /// `OPTIONS /Microsoft-Server-ActiveSync`: the protocol versions and commands; its query,
    /// if any, may name only the user and the device, and is checked like a command's.
    Options,
    /// `POST /autodiscover/autodiscover.xml`: no query at all.
    Autodiscover,
}

/// What seg knows about one device connection after its handshake.
struct DeviceConnection {
    peer: SocketAddr,
    peer_ip: HeaderValue,
    fingerprint: CertFingerprint,
    leaf: Vec<u8>,
    /// Long polls held on this connection now (a drain closes such a connection early).
    long_polls: Arc<AtomicUsize>,
    /// The certificate already has `listen.max_connections_per_device` connections open:
    /// this one only answers 503 and closes.
    over_device_cap: bool,
    /// What the socket saw: a response write cut by `listen.write_timeout` is audited so.
    io: Arc<IoWatch>,
    /// The identity decision this connection's requests reuse while it is fresh.
    remembered: Remembered,
    /// The DeviceId and account of the long poll held here last (`[fleet]` blocks close it).
    long_poll_holder: std::sync::Mutex<Option<(Box<str>, Box<str>)>>,
}

impl DeviceConnection {
    /// Whether a block in `list` applies to the long poll held on this connection now.
    fn long_poll_blocked(&self, list: &crate::fleet::blocks::BlockList) -> bool {
        if self.long_polls.load(Ordering::Acquire) == 0 {
            return false;
        }
        let holder = self
            .long_poll_holder
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (device_id, account) = match &*holder {
            Some((device_id, account)) => (Some(&**device_id), Some(&**account)),
            None => (None, None),
        };
        list.find(device_id, account, &self.fingerprint.hex())
            .is_some()
    }
}

/// The next block list published by the fleet; never, without `[fleet]`.
async fn block_list_change(
    blocks: &mut Option<watch::Receiver<Arc<crate::fleet::blocks::BlockList>>>,
) -> Arc<crate::fleet::blocks::BlockList> {
    if let Some(receiver) = blocks {
        if receiver.changed().await.is_ok() {
            return Arc::clone(&receiver.borrow_and_update());
        }
    }
    std::future::pending().await
}

/// The policy code of a request refused by a fleet block (`seg block`).
const BLOCKED: &str = "blocked";

/// The `DependencyDown` code while the NTAuth store has not been read from the directory.
const NTAUTH_UNAVAILABLE: &str = "ntauth-unavailable";

/// The most bytes a request line and header block may take; more is 431 and a closed
/// connection. ActiveSync heads are a few hundred bytes and IIS refuses heads past 16 kB by
/// default.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Beyond the drain window, how long connections get to close before serve returns anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// A drain in progress: no new connections, no new requests on open ones; short requests
/// finish by the deadline, held long polls are closed at moments spread over the window so
/// the devices do not all reconnect in the same second.
#[derive(Debug, Clone, Copy)]
pub struct DrainPlan {
    pub started: Instant,
    pub window: Duration,
}

impl DrainPlan {
    pub fn deadline(&self) -> Instant {
        self.started + self.window
    }

    /// A uniformly random moment within the window.
    fn spread(&self) -> Instant {
        self.started + self.window.mul_f64(crate::clock::random_fraction())
    }
}

/// Accepts devices until a drain starts, then waits for the connections to close. Each
/// connection is served by the gateway live when it was accepted.
pub async fn serve(
    listener: TcpListener,
    live: Arc<Live>,
    max: usize,
    mut drain: watch::Receiver<Option<DrainPlan>>,
) {
    let slots = Arc::new(Semaphore::new(max));
    // One set of caps for the process: [listen] changes need a restart.
    let caps = {
        let listen = &live.load().config.listen;
        Arc::new(ConnectionCaps::new(
            listen.max_connections_per_address,
            listen.max_connections_per_device,
            listen.max_pending_head_bytes,
        ))
    };
    // The rate limit of the refused-handshake log records, for the process.
    let refusals = Arc::new(HandshakeLog::default());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.changed() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(target: "seg::listener", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let gateway = live.load();
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            gateway.count_refused("max_connections");
            continue;
        };
        let drain = drain.clone();
        let caps = Arc::clone(&caps);
        let refusals = Arc::clone(&refusals);
        tokio::spawn(async move {
            gateway.connection(tcp, peer, drain, &caps, &refusals).await;
            drop(slot);
        });
    }
    drop(listener);
    let window = drain.borrow().map(|plan| plan.window).unwrap_or_default();
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(window + DRAIN_GRACE, slots.acquire_many(all)).await;
}

impl Gateway {
    async fn connection(
        self: Arc<Self>,
        mut tcp: TcpStream,
        mut peer: SocketAddr,
        mut drain: watch::Receiver<Option<DrainPlan>>,
        caps: &ConnectionCaps,
        refusals: &HandshakeLog,
    ) {
        self.metrics.open_connections.inc();
        let _open = OpenConnection(Arc::clone(&self.metrics));
        let _ = tcp.set_nodelay(true);
        let handshake_timeout = self.config.listen.handshake_timeout;
        let front = &self.config.listen.proxy_protocol_from;
        if front.iter().any(|net| net.contains(peer.ip())) {
            // The front must say who the device is; anything else is refused.
            match tokio::time::timeout(
                handshake_timeout,
                crate::transport::proxy_protocol::read_header(&mut tcp),
            )
            .await
            {
                Ok(Ok(Some(device))) => peer = device,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    self.count_handshake("proxy_header_invalid");
                    tracing::debug!(target: "seg::listener", %peer, error = %e, "PROXY header refused");
                    return;
                }
                Err(_) => {
                    self.count_handshake("timeout");
                    self.count_timed_out("handshake");
                    return;
                }
            }
        }
        // Counted by the device's address, so after the PROXY header: never the front's.
        let _address_slot = match caps.per_address.acquire(address_key(peer.ip())) {
            Ok(slot) => slot,
            Err(CapFull { first }) => {
                self.count_refused("max_connections_per_address");
                if first {
                    tracing::warn!(target: "seg::listener", %peer, max = self.config.listen.max_connections_per_address, "connections from this address refused: listen.max_connections_per_address reached");
                }
                return;
            }
        };
        let listen = &self.config.listen;
        let accept = DeviceTls::accept(tcp, Arc::clone(&self.tls), listen.write_timeout);
        // Boxed: the handshake's state would otherwise stay in every connection's task for
        // its whole life.
        let (tls, received) = match tokio::time::timeout(handshake_timeout, Box::pin(accept)).await
        {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(e)) => {
                let reason = crate::tls::RefusedHandshake::reason_of(&e);
                self.count_handshake(crate::tls::failure_label(reason));
                refusals.refused(peer, &e);
                // The device registry's view: by certificate, as no account is known yet.
                if let Some(c) =
                    crate::tls::RefusedHandshake::of(&e).and_then(|r| r.certificate.as_ref())
                {
                    if !c.serial.is_empty() {
                        self.devices.handshake_refused(
                            &c.serial,
                            &c.subject,
                            c.not_after_unix,
                            reason,
                        );
                    }
                }
                return;
            }
            Err(_) => {
                self.count_handshake("timeout");
                self.count_timed_out("handshake");
                return;
            }
        };
        let io_watch = tls.watch();
        io_watch.forget_reads();
        let resumed = tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        let Some(leaf) = tls.peer_certificates().and_then(|c| c.first()) else {
            // Unreachable with a mandatory verifier; refuse rather than serve without identity.
            self.count_handshake("no_client_certificate");
            return;
        };
        self.count_handshake(if resumed { "resumed" } else { "full" });
        let fingerprint = CertFingerprint::of(leaf.as_ref());
        // The certificate is known only now, so a connection over its cap gets an answer
        // (503 + Retry-After, then close) rather than a bare close the device would retry.
        let device_slot = match caps.per_device.acquire(fingerprint) {
            Ok(slot) => Some(slot),
            Err(CapFull { first }) => {
                self.count_refused("max_connections_per_device");
                if first {
                    tracing::warn!(target: "seg::listener", %peer, max = self.config.listen.max_connections_per_device, "connections of one device certificate refused: listen.max_connections_per_device reached (the audit record names the account)");
                }
                None
            }
        };
        let device = Arc::new(DeviceConnection {
            peer,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            fingerprint,
            leaf: leaf.as_ref().to_vec(),
            long_polls: Arc::new(AtomicUsize::new(0)),
            over_device_cap: device_slot.is_none(),
            io: Arc::clone(&io_watch),
            remembered: Remembered::default(),
            long_poll_holder: std::sync::Mutex::new(None),
        });
        let holds_long_poll = Arc::clone(&device.long_polls);
        // Each request's upstream exchange (client.rs) runs within this connection's task.
        let head_charge = HeadCharge::new(&caps.heads);
        let mut connection = DeviceConn::new(Arc::clone(&self), device, tls, received, head_charge);
        if device_slot.is_none() {
            // The cap holds from the end of the handshake: such a connection is answered at
            // once and reads no request, so a certificate cannot park unfinished heads on
            // connections past its cap.
            connection.refuse_at_once();
        }
        // With [fleet]: a block that names the long poll held here ends the connection, before
        // and during a drain.
        let mut blocks = self.fleet.as_ref().map(|fleet| fleet.blocks());
        let mut close_at: Option<Instant> = None;
        let why = loop {
            let moment = async {
                match close_at {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = poll_fn(|cx| connection.poll_run(cx)) => {
                    if let Err(e) = result {
                        self.connection_failed(&e, &io_watch, peer);
                    }
                    return;
                }
                _ = drain.changed(), if close_at.is_none() => {
                    let Some(plan) = *drain.borrow() else {
                        return;
                    };
                    // One more request, answered with `Connection: close`; the one in flight
                    // may finish, a held long poll until its moment in the window.
                    connection.drain();
                    close_at = Some(if holds_long_poll.load(Ordering::Acquire) > 0 {
                        plan.spread()
                    } else {
                        plan.deadline()
                    });
                }
                _ = moment => break Cut::Drain,
                list = block_list_change(&mut blocks) => {
                    if connection.device().long_poll_blocked(&list) {
                        tracing::info!(target: "seg::fleet", %peer, "a held long poll ended: its device is blocked");
                        if let Some(fleet) = &self.fleet {
                            fleet.count_closed_long_poll();
                        }
                        break Cut::Blocked;
                    }
                }
            }
        };
        // An unfinished request is answered (503 + Retry-After after a drain, 403 after a
        // block), then the connection closes.
        if let Ok(unfinished) = connection.end(why) {
            if unfinished && why == Cut::Drain {
                self.metrics.drained_connections.inc();
            }
            let _ = tokio::time::timeout(
                self.config.listen.write_timeout,
                poll_fn(|cx| connection.poll_run(cx)),
            )
            .await;
        }
    }

    /// A device request's first step: identity, route and policy, then seg's own answer or
    /// the upstream request ready to go. It is kept apart from `forward` so that a held Ping
    /// keeps only the forwarding step's state while it waits (`connection`). The request
    /// comes boxed: a future keeps its arguments' room for its whole life.
    ///
    /// Three stages, each ending the request with a `Stop` when it must: `admit` (who the
    /// certificate is, and whether it still counts), `police` (what the request asks, and
    /// whether this account and device may ask it), `prepare` (the upstream request as that
    /// account). The first stop answers; its record says why.
    async fn decide(
        self: Arc<Self>,
        request: Box<Request<RequestBody>>,
        device: Arc<DeviceConnection>,
    ) -> Handled {
        let request = *request;
        let route = route(&request);
        let (eas, query_error) = match EasRequest::parse(
            request.uri().query(),
            request.headers(),
            route == Ok(Route::Command),
        ) {
            Ok(eas) => (eas, None),
            Err(e) => (EasRequest::headers_only(request.headers()), Some(e)),
        };
        let mut record =
            AuditRecord::new(device.peer, eas, &self.metrics, &device.io, &self.devices);
        let identity = match self.admit(&device, &mut record).await {
            Ok(identity) => identity,
            Err(stop) => return Handled::Answered(self.stop(stop, record)),
        };
        if let Err(stop) = self.police(
            &request,
            route,
            query_error,
            &identity,
            &device,
            &mut record,
        ) {
            return Handled::Answered(self.stop(stop, record));
        }
        match self.prepare(request, &identity, &device, &mut record).await {
            Ok((outgoing, principal)) => Handled::Forward(Box::new(Forward {
                record,
                outgoing,
                principal,
            })),
            Err(stop) => Handled::Answered(self.stop(stop, record)),
        }
    }

    /// Who the certificate is, and whether it still counts: the identity decision, the
    /// certificate's validity now, the NTAuth store, revocation, the per-device cap.
    async fn admit(
        &self,
        device: &DeviceConnection,
        record: &mut AuditRecord,
    ) -> Result<Arc<Identity>, Stop> {
        let identity = match self
            .resolver
            .resolve_remembering(device.fingerprint, &device.leaf, &device.remembered)
            .await
        {
            Ok(Decision::Admit(identity)) => identity,
            Ok(Decision::Deny(denial)) => {
                let reason = denial.reason;
                record.subject = AuditSubject::Denied(denial);
                return Err(Stop::refuse(Refusal::Denied(reason)));
            }
            Err(e) => {
                tracing::warn!(target: "seg::identity", peer = %device.peer, error = %e, "identity unavailable");
                return Err(Stop::refuse(Refusal::from_resolve_error(&e)));
            }
        };
        record.subject = AuditSubject::Admitted(Arc::clone(&identity));
        // A resumed session or a long-lived connection never shows the certificate to the
        // verifier again: its validity is checked here, on every request, by the same clock.
        if let Err(reason) = identity.validity_at(self.clock.now_unix()) {
            return Err(Stop::closing(Refusal::Denied(reason)));
        }
        // As a DC: the CA that issued the leaf must be in the NTAuth store.
        if let Some(ntauth) = &self.ntauth {
            match ntauth.check(device.fingerprint, &device.leaf) {
                NtAuthVerdict::Issued(_) => {}
                NtAuthVerdict::NotIssued => {
                    let reason = DenyReason::CaNotInNtauth;
                    self.metrics
                        .identity_decisions
                        .with_label_values(&["deny", reason.code()])
                        .inc();
                    return Err(Stop::closing(Refusal::Denied(reason)));
                }
                NtAuthVerdict::Unknown => {
                    return Err(Stop::refuse(Refusal::DependencyDown(NTAUTH_UNAVAILABLE)));
                }
            }
        }
        // Resumed sessions and long-lived connections never re-run the handshake's CRL check.
        let (issuer, serial) = &identity.revocation_key;
        // Then OCSP and distribution-point CRLs, when configured: cached, so a known device
        // costs a lookup; a status that cannot be learned is a dependency down (503).
        let online = &self.online;
        // Boxed: the check's state (an HTTP exchange) would otherwise enlarge every
        // connection's request future, checked or not.
        let revoked = self.revocation.load().is_revoked(issuer, serial)
            || online.is_active()
                && match Box::pin(online.check(&identity.revocation_key, &device.leaf)).await {
                    Verdict::Good => false,
                    Verdict::Revoked => true,
                    Verdict::Unavailable => {
                        let refusal = Refusal::DependencyDown(REVOCATION_UNAVAILABLE);
                        return Err(Stop::refuse(refusal));
                    }
                };
        if revoked {
            return Err(Stop::closing(Refusal::Denied(
                DenyReason::CertificateRevoked,
            )));
        }
        if device.over_device_cap {
            // Counted at the handshake; answered here so the audit record names the account.
            return Err(Stop::closing(Refusal::Busy("connection-cap-device")));
        }
        Ok(identity)
    }

    /// What the request asks, and whether this account and device may ask it: the route,
    /// the query, the headers, the `User=` binding, the device rules, the long-poll caps.
    /// Every route passes the same checks.
    fn police(
        &self,
        request: &Request<RequestBody>,
        route: Result<Route, Refusal>,
        query_error: Option<crate::activesync::QueryError>,
        identity: &Identity,
        device: &DeviceConnection,
        record: &mut AuditRecord,
    ) -> Result<(), Stop> {
        // The bytes after a CONNECT or Upgrade head may be another protocol's (tunnel data,
        // an HTTP/2 preface): refused, the connection closes rather than read them as requests.
        let route = match route {
            Ok(route) => route,
            Err(refusal) if request.method() == Method::CONNECT => {
                return Err(Stop::closing(refusal));
            }
            Err(refusal) => return Err(Stop::refuse(refusal)),
        };
        if request.headers().contains_key(http::header::UPGRADE) {
            return Err(Stop::policy_closing(Refusal::BadRequest("upgrade-refused")));
        }
        // A query where none belongs is refused as such, before whatever it says is read.
        let query = request.uri().query();
        if route == Route::Autodiscover && query.is_some()
            || query_error.is_none() && !query_allowed(route, &record.eas)
        {
            return Err(Stop::policy(Refusal::BadRequest("query-not-allowed")));
        }
        if let Some(e) = query_error {
            return Err(Stop::policy(Refusal::BadRequest(e.code())));
        }
        if self.headers.check(request.headers()).is_err() {
            return Err(Stop::policy(Refusal::BadRequest("duplicate-header")));
        }
        // A request without a device (OPTIONS, Autodiscover) is held only to the block
        // rules, as it has nothing to allow.
        let account = &identity.account;
        let activesync = &self.config.activesync;
        let netbios_domain = self.config.identity.netbios_domain.as_deref();
        let eas = &record.eas;
        let sam = account.sam_account_name.as_deref().unwrap_or(&account.dn);
        if let Some(fleet) = &self.fleet {
            let blocked = fleet.blocked(
                eas.device_id.as_deref(),
                Some(sam),
                &device.fingerprint.hex(),
            );
            if let Some(block) = blocked {
                tracing::info!(target: "seg::fleet", peer = %device.peer, block, "request of a blocked device refused");
                return Err(Stop::policy_closing(Refusal::PolicyDenied(BLOCKED)));
            }
        }
        if activesync.bind_user && !user_matches(eas.user.as_deref(), account, netbios_domain) {
            let code = crate::policy::PolicyDenial::UserMismatch.code();
            return Err(Stop::policy(Refusal::PolicyDenied(code)));
        }
        let deviceless = eas.device_id.is_none() && eas.device_type.is_none();
        let decision = match check_device(rules_for(activesync, account), eas) {
            Ok(decision) => decision,
            Err(PolicyDenial::DeviceNotAllowed) if route != Route::Command && deviceless => {
                "no-device"
            }
            Err(denial) => return Err(Stop::policy(Refusal::PolicyDenied(denial.code()))),
        };
        let long_poll = if eas.is_long_poll() {
            let device_id = eas.device_id.as_deref().unwrap_or("");
            match self.long_polls.acquire(sam, device_id, &device.long_polls) {
                Ok(guard) => {
                    self.devices.ping_held(sam, device_id);
                    if self.fleet.is_some() {
                        *device
                            .long_poll_holder
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) =
                            Some((device_id.into(), sam.into()));
                    }
                    Some(guard)
                }
                Err(cap) => return Err(Stop::policy(Refusal::Busy(cap.code()))),
            }
        } else {
            None
        };
        record.policy = decision;
        record.long_poll = long_poll;
        Ok(())
    }

    /// The upstream request as the account: in Kerberos mode the user's own token (and
    /// later the user's own connections; a delegation that cannot be made refuses the
    /// request, there is no header fallback), else the identity header; the target, the
    /// headers hygiene leaves, and the device's body held to its pace and counted.
    async fn prepare(
        &self,
        request: Request<RequestBody>,
        identity: &Identity,
        device: &DeviceConnection,
        record: &mut AuditRecord,
    ) -> Result<(Box<Outgoing>, Option<Arc<str>>), Stop> {
        // A long poll counts against the caps of the whole fleet too (the local caps were
        // checked by `police`; they alone apply while the store does not answer).
        if let (Some(fleet), Some(_)) = (&self.fleet, &record.long_poll) {
            let activesync = &self.config.activesync;
            let account = &identity.account;
            let sam = account.sam_account_name.as_deref().unwrap_or(&account.dn);
            let device_id = record.eas.device_id.as_deref().unwrap_or("");
            let taken = Box::pin(fleet.acquire_long_poll(
                sam,
                device_id,
                activesync.max_long_polls_per_device,
                activesync.max_long_polls_per_account,
            ))
            .await;
            match taken {
                FleetCap::Taken(lease) => record.fleet_lease = Some(lease),
                FleetCap::Unknown => {}
                FleetCap::DeviceFull => {
                    return Err(Stop::policy(Refusal::Busy(LongPollCap::Device.code())));
                }
                FleetCap::AccountFull => {
                    return Err(Stop::policy(Refusal::Busy(LongPollCap::Account.code())));
                }
            }
        }
        // Both Kerberos steps are boxed, like the identity miss path: their state would
        // otherwise enlarge every connection's request future in header mode too.
        let delegated = match &self.delegation {
            Some(delegation) => match Box::pin(delegation.authorize(&identity.account)).await {
                Ok(authorization) => Some(authorization),
                Err(crate::kerberos::DelegationError::Denied(reason)) => {
                    return Err(Stop::refuse(Refusal::Denied(reason)));
                }
                Err(crate::kerberos::DelegationError::Unavailable(code)) => {
                    return Err(Stop::refuse(Refusal::DependencyDown(code)));
                }
            },
            None => None,
        };
        let (mut parts, body) = request.into_parts();
        parts.uri = self.upstream.uri_for(&parts.uri).map_err(Stop::refuse)?;
        parts.version = Version::HTTP_11;
        self.headers
            .apply(&mut parts.headers, &identity.header_value, &device.peer_ip);
        let listen = &self.config.listen;
        let body = PacedBody::new(
            body,
            BodyPace {
                window: listen.body_timeout,
                min_rate: listen.body_min_rate,
            },
        );
        let body = CountingBody::new(body, Arc::clone(&record.bytes_in));
        if let Some(authorization) = &delegated {
            parts
                .headers
                .insert(http::header::AUTHORIZATION, authorization.header.clone());
        }
        let outgoing = self
            .upstream
            .prepare(Request::from_parts(parts, body))
            .map_err(Stop::Exchange)?;
        // Kerberos mode: on the account's own upstream connections.
        Ok((outgoing, delegated.map(|a| a.principal)))
    }

    /// The answer a stage's stop calls for.
    fn stop(&self, stop: Stop, record: AuditRecord) -> Response<AuditBody> {
        match stop {
            Stop::Refused { refusal, close } => {
                let response = refuse(refusal, record);
                if close {
                    closing(response)
                } else {
                    response
                }
            }
            Stop::Policy { refusal, close } => {
                let response = self.refuse_policy(refusal, record);
                if close {
                    closing(response)
                } else {
                    response
                }
            }
            Stop::Exchange(error) => self.exchange_failed(error, record),
        }
    }

    /// A device request's second step: the upstream exchange, and its answer toward the
    /// device.
    async fn forward(self: Arc<Self>, forward: Box<Forward>) -> Response<AuditBody> {
        let outgoing = forward.outgoing;
        let sent = self
            .upstream
            .send(forward.principal.as_ref(), outgoing)
            .await;
        let mut record = forward.record;
        let principal = forward.principal;
        match sent {
            Ok(response)
                if principal.is_some() && response.status() == StatusCode::UNAUTHORIZED =>
            {
                // A 401 would make the phone prompt for a password it does not have: the
                // upstream refused seg's delegation, which only an administrator can fix.
                self.metrics.kerberos.upstream_auth_failures.inc();
                let principal = principal.as_deref().unwrap_or("");
                tracing::error!(target: "seg::kerberos", principal, peer = %record.peer, "upstream answered 401 to a delegated request: check the target SPN, its keytab on the upstream and the delegation settings");
                refuse(
                    Refusal::DependencyDown(crate::kerberos::UPSTREAM_AUTH_FAILED),
                    record,
                )
            }
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                forward::remove_hop_by_hop(&mut parts.headers);
                if principal.is_some() {
                    // Mutual-authentication tokens are for seg, not the device.
                    parts.headers.remove(http::header::WWW_AUTHENTICATE);
                }
                record.status = parts.status.as_u16();
                Response::from_parts(parts, AuditBody::upstream(body, record))
            }
            Err(error) => self.exchange_failed(error, record),
        }
    }
}

/// Which requests seg forwards: ActiveSync by POST or OPTIONS and Autodiscover by POST, on
/// a canonical path (`target`).
fn route<B>(request: &Request<B>) -> Result<Route, Refusal> {
    let endpoint = target::endpoint(request.uri()).map_err(|e| match e {
        target::TargetError::NotCanonical(rule) => {
            tracing::debug!(target: "seg::listener", rule, "request target refused: not canonical");
            Refusal::BadRequest(e.code())
        }
        target::TargetError::NotServed => Refusal::NotFound,
    })?;
    match (endpoint, request.method()) {
        (target::Endpoint::ActiveSync, &Method::POST) => Ok(Route::Command),
        (target::Endpoint::ActiveSync, &Method::OPTIONS) => Ok(Route::Options),
        (target::Endpoint::Autodiscover, &Method::POST) => Ok(Route::Autodiscover),
        (target::Endpoint::ActiveSync, _) => Err(Refusal::MethodNotAllowed("OPTIONS, POST")),
        (target::Endpoint::Autodiscover, _) => Err(Refusal::MethodNotAllowed("POST")),
    }
}

/// Whether a query carries only what the route's checks read: nothing for Autodiscover;
/// for OPTIONS the user and the device (plain form), never a command or its parameters.
fn query_allowed(route: Route, eas: &EasRequest) -> bool {
    match route {
        Route::Command => true,
        Route::Options => {
            eas.form != QueryForm::Base64 && eas.command.is_none() && eas.parameters.is_empty()
        }
        Route::Autodiscover => eas.form == QueryForm::None,
    }
}

impl Gateway {
    /// `seg_tls_handshakes_total{result}`.
    fn count_handshake(&self, result: &str) {
        self.metrics.handshakes.with_label_values(&[result]).inc();
    }

    /// `seg_connections_refused_total{reason}`: the cap (its `[listen]` key) that refused.
    fn count_refused(&self, reason: &str) {
        self.metrics
            .connections_refused
            .with_label_values(&[reason])
            .inc();
    }

    /// `seg_connections_timed_out_total{phase}`.
    fn count_timed_out(&self, phase: &str) {
        self.metrics
            .connections_timed_out
            .with_label_values(&[phase])
            .inc();
    }

    /// A connection that ended in an error: a device cut for slowness is counted and logged.
    fn connection_failed(&self, error: &ConnectionError, io: &IoWatch, peer: SocketAddr) {
        let listen = &self.config.listen;
        if io.write_timed_out() {
            // The request's audit record says so too (reason response-write-timeout).
            self.count_timed_out("response_write");
            tracing::info!(target: "seg::listener", %peer, write_timeout = ?listen.write_timeout, "connection closed: the device stopped reading the response");
        } else if let ConnectionError::HeadTimeout { partial: true } = error {
            self.count_timed_out("request_head");
            tracing::info!(target: "seg::listener", %peer, idle_timeout = ?listen.idle_timeout, "connection closed: the request head did not arrive in time");
        } else if let ConnectionError::HeadTimeout { partial: false } = error {
            self.count_timed_out("idle");
            tracing::debug!(target: "seg::listener", %peer, "idle connection closed");
        } else {
            tracing::debug!(target: "seg::listener", %peer, %error, "connection ended with an error");
        }
    }

    /// The upstream could not be asked or did not answer, counted by why.
    /// The answer to a failed exchange, by whose fault it was: the device's body (too slow:
    /// 408; broken framing or gone: 400, closing) or the upstream (502, 503, 504).
    fn exchange_failed(&self, error: ExchangeError, record: AuditRecord) -> Response<AuditBody> {
        let refusal = match error {
            ExchangeError::Device(BodyFault::TooSlow { .. }) => {
                self.count_timed_out("request_body");
                let listen = &self.config.listen;
                tracing::info!(target: "seg::listener", peer = %record.peer, body_timeout = ?listen.body_timeout, body_min_rate = listen.body_min_rate, "request cut: its body came too slowly");
                return refuse(Refusal::BodyTooSlow, record);
            }
            ExchangeError::Device(_) => {
                let refusal = Refusal::BadRequest("request-body-invalid");
                return closing(self.refuse_policy(refusal, record));
            }
            ExchangeError::Unreachable => Refusal::UpstreamUnreachable,
            ExchangeError::Timeout => Refusal::UpstreamTimeout,
            ExchangeError::Failed => Refusal::UpstreamFailed,
        };
        self.upstream_failed(refusal, record)
    }

    fn upstream_failed(&self, refusal: Refusal, record: AuditRecord) -> Response<AuditBody> {
        self.metrics
            .upstream_errors
            .with_label_values(&[refusal.code()])
            .inc();
        refuse(refusal, record)
    }

    /// A refusal after mapping, counted by its reason code.
    fn refuse_policy(&self, refusal: Refusal, record: AuditRecord) -> Response<AuditBody> {
        self.metrics
            .policy_decisions
            .with_label_values(&[refusal.code()])
            .inc();
        refuse(refusal, record)
    }
}

fn refuse(refusal: Refusal, mut record: AuditRecord) -> Response<AuditBody> {
    let (parts, body) = refusal.response().into_parts();
    record.status = parts.status.as_u16();
    record.reason = refusal.code();
    if let Refusal::Denied(reason) = refusal {
        record.kdc_event = reason.kdc_event();
    }
    record.decision = match refusal {
        Refusal::Denied(_) | Refusal::PolicyDenied(_) => "denied",
        Refusal::Busy(_) => "throttled",
        _ => match refusal.fault() {
            Fault::Client => "refused",
            Fault::Dependency => "unavailable",
            Fault::Upstream => "upstream-error",
        },
    };
    Response::from_parts(parts, AuditBody::local(body, record))
}

/// Ends the connection after this response.
/// How a stage of `decide` ends a request.
enum Stop {
    /// Refused; `close` ends the connection after the answer.
    Refused { refusal: Refusal, close: bool },
    /// Refused by the ActiveSync policy (counted in `seg_policy_refusals_total`).
    Policy { refusal: Refusal, close: bool },
    /// The upstream request could not be prepared.
    Exchange(ExchangeError),
}

impl Stop {
    fn refuse(refusal: Refusal) -> Stop {
        Stop::Refused {
            refusal,
            close: false,
        }
    }

    fn closing(refusal: Refusal) -> Stop {
        Stop::Refused {
            refusal,
            close: true,
        }
    }

    fn policy(refusal: Refusal) -> Stop {
        Stop::Policy {
            refusal,
            close: false,
        }
    }

    fn policy_closing(refusal: Refusal) -> Stop {
        Stop::Policy {
            refusal,
            close: true,
        }
    }
}

/// Marks a response after which the device's connection closes (a refusal that ends it):
/// a field of the response the connection reads, not a header it would parse back.
#[derive(Debug, Clone, Copy)]
struct CloseAfter;

fn closing(mut response: Response<AuditBody>) -> Response<AuditBody> {
    response.extensions_mut().insert(CloseAfter);
    response
}

struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.dec();
    }
}
