//! Every metric seg exports, on one explicit registry, prefixed `seg_`.
//!
//! Labels are fixed, small sets: never a user, device or certificate.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The metrics of one gateway process.
pub struct Metrics {
    registry: Registry,
    /// The process collector's own registry: its names carry no `seg_` prefix.
    process_registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// `request_duration` by kind, looked up once: every request observes one of them.
    pub request_duration_short: prometheus::Histogram,
    pub request_duration_long_poll: prometheus::Histogram,
    pub handshakes: IntCounterVec,
    pub identity_cache: IntCounterVec,
    pub identity_decisions: IntCounterVec,
    pub directory_searches: IntCounterVec,
    pub directory_search_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    /// Requests that waited for one of the `upstream.max_connecting` slots.
    pub upstream_connect_waits: IntCounter,
    pub open_connections: IntGauge,
    pub drained_connections: IntCounter,
    pub long_polls: IntGauge,
    pub config_reloads: IntCounterVec,
    pub crl_next_update: prometheus::GaugeVec,
    pub crl_age: prometheus::GaugeVec,
    pub crl_seconds_to_next_update: prometheus::GaugeVec,
    pub crls_stale: IntGauge,
    pub crl_fetches: IntCounterVec,
    pub ocsp_responses: IntCounterVec,
    pub ocsp_duration: prometheus::Histogram,
    pub revocation_soft_fails: IntCounterVec,
    pub server_certificate_expiry: prometheus::Gauge,
    pub policy_decisions: IntCounterVec,
    /// By `reason`: the cap that refused (`max_connections`, `max_connections_per_address`,
    /// `max_connections_per_device`).
    pub connections_refused: IntCounterVec,
    /// Request headers not forwarded, by `reason`: `hop-by-hop`, `identity`, `cookie`,
    /// `not-allowed` (no header names as labels: a device chooses those).
    pub request_headers_dropped: IntCounterVec,
    /// By `phase`: where a slow or silent device was cut (`handshake`, `idle`,
    /// `request_head`, `request_body`, `response_write`).
    pub connections_timed_out: IntCounterVec,
    pub dependency_up: IntGaugeVec,
    /// Kerberos constrained delegation (`identity.mode = "kerberos"`).
    pub kerberos: KerberosMetrics,
}

/// The audit log's own figures: one set per process (the log is), exported by every
/// gateway's registry.
#[derive(Clone)]
pub struct AuditCounters {
    pub written: IntCounter,
    pub dropped: IntCounter,
    pub write_errors: IntCounter,
    pub queued_bytes: IntGauge,
}

impl AuditCounters {
    pub fn new() -> AuditCounters {
        let counter = |name: &str, help: &str| {
            IntCounter::with_opts(Opts::new(name, help)).expect("valid metric")
        };
        AuditCounters {
            written: counter(
                "audit_records_written_total",
                "Audit records handed to the log's sinks.",
            ),
            dropped: counter(
                "audit_records_dropped_total",
                "Audit records not written: the queue was full (audit.when_full = \"drop\").",
            ),
            write_errors: counter(
                "audit_write_errors_total",
                "Audit records a sink failed to take (the write returned an error).",
            ),
            queued_bytes: IntGauge::with_opts(Opts::new(
                "audit_queue_bytes",
                "Audit record bytes waiting for the writer.",
            ))
            .expect("valid metric"),
        }
    }
}

impl Default for AuditCounters {
    fn default() -> Self {
        AuditCounters::new()
    }
}

/// What the CRL gauges show of one CRL in force.
pub struct CrlGauge<'a> {
    pub issuer: &'a str,
    /// The file or URL it came from.
    pub source: String,
    pub this_update_unix: i64,
    pub next_update_unix: Option<i64>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("seg".into()), None)
            .expect("static registry options are valid");
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Device requests answered, by ActiveSync command and status class.",
            ),
            &["command", "status_class"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time from request head to the end of the response body, by request kind.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
            ]),
            &["kind"],
        )
        .expect("valid metric");
        let handshakes = IntCounterVec::new(
            Opts::new("tls_handshakes_total", "TLS handshakes, by result."),
            &["result"],
        )
        .expect("valid metric");
        let identity_cache = IntCounterVec::new(
            Opts::new(
                "identity_cache_lookups_total",
                "Identity cache lookups: hit, miss (this lookup asked the directory), coalesced (waited for another's lookup), stale (served past the soft TTL).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let identity_decisions = IntCounterVec::new(
            Opts::new(
                "identity_decisions_total",
                "Identity resolutions made against the directory, by decision and reason code; also each request refused because no CA of the NTAuth store issued its certificate (ca-not-in-ntauth).",
            ),
            &["decision", "reason"],
        )
        .expect("valid metric");
        let directory_searches = IntCounterVec::new(
            Opts::new("directory_searches_total", "Directory searches, by result."),
            &["result"],
        )
        .expect("valid metric");
        let directory_search_duration = HistogramVec::new(
            HistogramOpts::new(
                "directory_search_duration_seconds",
                "Directory search latency.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["result"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "upstream_errors_total",
                "Requests the upstream could not answer, by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let upstream_connect_waits = IntCounter::new(
            "upstream_connect_waits_total",
            "Requests that found no idle upstream connection and waited for a slot to open one \
             (upstream.max_connecting).",
        )
        .expect("valid metric");
        let open_connections = IntGauge::new(
            "open_connections",
            "Device connections currently open (TLS handshake included).",
        )
        .expect("valid metric");
        let long_polls = IntGauge::new(
            "long_polls_in_flight",
            "ActiveSync Ping requests held open upstream right now.",
        )
        .expect("valid metric");
        let policy_decisions = IntCounterVec::new(
            Opts::new(
                "policy_refusals_total",
                "Requests refused after mapping, by reason code (user binding, device rules, long-poll caps, malformed queries).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "config_reload_total",
                "Configuration reloads, by result (success, failure).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let crl_next_update = prometheus::GaugeVec::new(
            Opts::new(
                "crl_next_update_timestamp_seconds",
                "nextUpdate of each CRL in force, by issuer and source (file or URL), as a Unix time.",
            ),
            &["issuer", "source"],
        )
        .expect("valid metric");
        let crl_age = prometheus::GaugeVec::new(
            Opts::new(
                "crl_age_seconds",
                "Seconds since the thisUpdate of each CRL in force, by issuer and source (updated every probe interval).",
            ),
            &["issuer", "source"],
        )
        .expect("valid metric");
        let crl_seconds_to_next_update = prometheus::GaugeVec::new(
            Opts::new(
                "crl_seconds_to_next_update",
                "Seconds until the nextUpdate of each CRL in force (negative once past), by issuer and source (updated every probe interval).",
            ),
            &["issuer", "source"],
        )
        .expect("valid metric");
        let crl_fetches = IntCounterVec::new(
            Opts::new(
                "crl_fetches_total",
                "CRL fetches over HTTP, by result (ok, unavailable, invalid: unparsable, badly signed or refused; unsupported: a distribution point seg cannot fetch, such as ldap://, counted once per URL).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let ocsp_responses = IntCounterVec::new(
            Opts::new(
                "ocsp_responses_total",
                "OCSP questions asked of responders (cached answers not counted), by result: good, revoked, unknown, refused (tryLater, unauthorized…), invalid (garbage, bad signature, out of date), unavailable (no answer), not_checkable (no responder, issuer not a client CA).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let ocsp_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "ocsp_request_duration_seconds",
                "Time to ask an OCSP responder and check its answer.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )
        .expect("valid metric");
        let revocation_soft_fails = IntCounterVec::new(
            Opts::new(
                "revocation_soft_fail_total",
                "Requests admitted although their revocation status was unknown, because a danger_*_soft_fail key allows it, by check (ocsp, crl_distribution_point).",
            ),
            &["check"],
        )
        .expect("valid metric");
        let crls_stale = IntGauge::new(
            "crls_stale",
            "Loaded CRLs past their nextUpdate (new handshakes of their certificates fail).",
        )
        .expect("valid metric");
        let server_certificate_expiry = prometheus::Gauge::new(
            "server_certificate_expiry_timestamp_seconds",
            "notAfter of the server certificate in use, as a Unix time.",
        )
        .expect("valid metric");
        let drained_connections = IntCounter::new(
            "drained_connections_total",
            "Connections closed by a drain before their request finished (held long polls, mostly).",
        )
        .expect("valid metric");
        let request_headers_dropped = IntCounterVec::new(
            Opts::new(
                "request_headers_dropped_total",
                "Request headers a device sent that seg did not forward, by reason: hop-by-hop, identity (a client-sent identity or forwarding header), cookie (a cookie not in upstream.forward_cookies), not-allowed (not on the allow-list).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in ["hop-by-hop", "identity", "cookie", "not-allowed"] {
            request_headers_dropped.with_label_values(&[reason]);
        }
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "connections_refused_total",
                "Device connections refused by a cap, by reason: max_connections and max_connections_per_address (closed before the TLS handshake), max_connections_per_device (answered 503 at its end), max_pending_head_bytes (a request head refused 503 while unfinished heads hold the listener's budget).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in [
            "max_connections",
            "max_connections_per_address",
            "max_connections_per_device",
            "max_pending_head_bytes",
        ] {
            connections_refused.with_label_values(&[reason]);
        }
        let connections_timed_out = IntCounterVec::new(
            Opts::new(
                "connections_timed_out_total",
                "Device connections cut for slowness, by phase: handshake (listen.handshake_timeout), idle and request_head (listen.idle_timeout with nothing or part of a request head sent), request_body (under listen.body_min_rate over listen.body_timeout), response_write (the device read nothing for listen.write_timeout).",
            ),
            &["phase"],
        )
        .expect("valid metric");
        for phase in [
            "handshake",
            "idle",
            "request_head",
            "request_body",
            "response_write",
        ] {
            connections_timed_out.with_label_values(&[phase]);
        }
        let dependency_up = IntGaugeVec::new(
            Opts::new(
                "dependency_up",
                "1 when the last readiness probe of a dependency succeeded.",
            ),
            &["dependency"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let kerberos = KerberosMetrics::register(&registry);
        let metrics = Metrics {
            kerberos,
            registry,
            process_registry: Registry::new(),
            requests,
            request_duration_short: request_duration.with_label_values(&["short"]),
            request_duration_long_poll: request_duration.with_label_values(&["long_poll"]),
            request_duration,
            handshakes,
            identity_cache,
            identity_decisions,
            directory_searches,
            directory_search_duration,
            upstream_errors,
            upstream_connect_waits,
            open_connections,
            drained_connections,
            long_polls,
            config_reloads,
            crl_next_update,
            crl_age,
            crl_seconds_to_next_update,
            crls_stale,
            crl_fetches,
            ocsp_responses,
            ocsp_duration,
            revocation_soft_fails,
            server_certificate_expiry,
            policy_decisions,
            connections_refused,
            request_headers_dropped,
            connections_timed_out,
            dependency_up,
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(metrics.requests.clone()),
            Box::new(metrics.request_duration.clone()),
            Box::new(metrics.handshakes.clone()),
            Box::new(metrics.identity_cache.clone()),
            Box::new(metrics.identity_decisions.clone()),
            Box::new(metrics.directory_searches.clone()),
            Box::new(metrics.directory_search_duration.clone()),
            Box::new(metrics.upstream_errors.clone()),
            Box::new(metrics.upstream_connect_waits.clone()),
            Box::new(metrics.open_connections.clone()),
            Box::new(metrics.drained_connections.clone()),
            Box::new(metrics.long_polls.clone()),
            Box::new(metrics.config_reloads.clone()),
            Box::new(metrics.crl_next_update.clone()),
            Box::new(metrics.crls_stale.clone()),
            Box::new(metrics.crl_age.clone()),
            Box::new(metrics.crl_seconds_to_next_update.clone()),
            Box::new(metrics.crl_fetches.clone()),
            Box::new(metrics.ocsp_responses.clone()),
            Box::new(metrics.ocsp_duration.clone()),
            Box::new(metrics.revocation_soft_fails.clone()),
            Box::new(metrics.server_certificate_expiry.clone()),
            Box::new(metrics.policy_decisions.clone()),
            Box::new(metrics.connections_refused.clone()),
            Box::new(metrics.request_headers_dropped.clone()),
            Box::new(metrics.connections_timed_out.clone()),
            Box::new(metrics.dependency_up.clone()),
            Box::new(build_info),
        ];
        for c in collectors {
            metrics
                .registry
                .register(c)
                .expect("metric names are unique");
        }
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …
        // unprefixed, as Prometheus's conventions name them.
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            let _ = metrics.process_registry.register(Box::new(process));
        }
        metrics
    }

    /// Records the PKI facts of a configuration just built: CRL nextUpdates and the server
    /// certificate's expiry.
    pub fn record_pki<'a>(
        &self,
        tls: &crate::config::TlsConfig,
        crls: impl Iterator<Item = CrlGauge<'a>>,
    ) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.record_crls(crls, now);
        let expiry = crate::certs::read_certs(&tls.certificate, "tls.certificate")
            .ok()
            .and_then(|certs| certs.into_iter().next())
            .and_then(|leaf| {
                use x509_parser::prelude::FromDer;
                x509_parser::certificate::X509Certificate::from_der(leaf.as_ref())
                    .ok()
                    .map(|(_, c)| c.validity().not_after.timestamp())
            });
        if let Some(expiry) = expiry {
            self.server_certificate_expiry.set(expiry as f64);
        }
    }

    /// The CRL gauges for the CRLs in force at `now_unix`. Labelled by issuer *and* source,
    /// so a file and a fetched CRL of one issuer do not overwrite each other.
    pub fn record_crls<'a>(&self, crls: impl Iterator<Item = CrlGauge<'a>>, now_unix: i64) {
        self.crl_next_update.reset();
        self.crl_age.reset();
        self.crl_seconds_to_next_update.reset();
        for crl in crls {
            let labels = [crl.issuer, crl.source.as_str()];
            self.crl_age
                .with_label_values(&labels)
                .set((now_unix - crl.this_update_unix) as f64);
            if let Some(next) = crl.next_update_unix {
                self.crl_next_update
                    .with_label_values(&labels)
                    .set(next as f64);
                self.crl_seconds_to_next_update
                    .with_label_values(&labels)
                    .set((next - now_unix) as f64);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    /// Exports the process's audit-log counters with this gateway's.
    pub fn register_audit(&self, counters: &AuditCounters) {
        let _ = self.registry.register(Box::new(counters.written.clone()));
        let _ = self.registry.register(Box::new(counters.dropped.clone()));
        let _ = self
            .registry
            .register(Box::new(counters.write_errors.clone()));
        let _ = self
            .registry
            .register(Box::new(counters.queued_bytes.clone()));
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let mut families = self.registry.gather();
        families.extend(self.process_registry.gather());
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The Kerberos delegation metrics (no per-user labels).
pub struct KerberosMetrics {
    /// S4U exchanges by outcome: delegated, a refusal's reason code, or why none was made.
    pub exchanges: IntCounterVec,
    /// Time of one S4U2Self + S4U2Proxy exchange.
    pub exchange_duration: prometheus::Histogram,
    pub credential_cache: IntCounterVec,
    /// Upstream 401s to delegated requests (each answered 503).
    pub upstream_auth_failures: IntCounter,
}

impl KerberosMetrics {
    fn register(registry: &Registry) -> KerberosMetrics {
        let exchanges = IntCounterVec::new(
            Opts::new(
                "kerberos_exchanges_total",
                "S4U2Self + S4U2Proxy exchanges with the KDC, by outcome: delegated, the refusal's reason code (kdc-account-disabled, account-not-delegable, delegation-not-allowed...) or why none was made (kdc-unavailable, kdc-clock-skew, kdc-overloaded, kdc-timeout, kerberos-misconfigured).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let exchange_duration = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "kerberos_exchange_duration_seconds",
                "Time of one S4U2Self + S4U2Proxy exchange (a first request's, or a renewal's).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
        )
        .expect("valid metric");
        let credential_cache = IntCounterVec::new(
            Opts::new(
                "kerberos_credential_cache_total",
                "Delegated-credential cache lookups: hit, miss (this request made the exchange), coalesced (waited for another's), refreshed (renewed in the background).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let upstream_auth_failures = IntCounter::new(
            "upstream_auth_failures_total",
            "Upstream 401 answers to requests seg delegated with Kerberos (each answered 503: a misconfiguration).",
        )
        .expect("valid metric");
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(exchanges.clone()),
            Box::new(exchange_duration.clone()),
            Box::new(credential_cache.clone()),
            Box::new(upstream_auth_failures.clone()),
        ];
        for c in collectors {
            registry.register(c).expect("metric names are unique");
        }
        KerberosMetrics {
            exchanges,
            exchange_duration,
            credential_cache,
            upstream_auth_failures,
        }
    }
}

/// The fleet store's metrics (`[fleet]`), registered only when a configuration has one, so a
/// replica on its own exposes none (and no alert about a store it does not use can fire).
#[derive(Clone)]
pub struct FleetMetrics {
    /// Store operations by operation and result.
    pub operations: IntCounterVec,
    /// 1 while the last store operation was answered in time, 0 after one that was not.
    pub store_up: IntGauge,
    /// Held long polls closed because a block named their device.
    pub blocked_long_polls_closed: IntCounter,
}

impl FleetMetrics {
    pub fn new() -> FleetMetrics {
        FleetMetrics {
            operations: IntCounterVec::new(
                Opts::new(
                    "fleet_store_operations_total",
                    "Operations on the fleet store, by operation (get, set, lock, blocks, caps) and result: ok, absent (no such entry), held (another replica holds the lock), timeout (past fleet.timeout: treated as a miss), error (unreachable or refused: treated as a miss), rejected (an entry that failed authentication: a wrong key or a tampered store), expired (an authentic entry past its validity).",
                ),
                &["operation", "result"],
            )
            .expect("valid metric"),
            store_up: IntGauge::with_opts(Opts::new(
                "fleet_store_up",
                "1 while the fleet store answers within fleet.timeout, 0 while it does not (replicas fall back to their own cache and the directory).",
            ))
            .expect("valid metric"),
            blocked_long_polls_closed: IntCounter::new(
                "fleet_blocked_long_polls_closed_total",
                "Held long polls (Pings) closed because a fleet block (seg block) named their device, account or certificate.",
            )
            .expect("valid metric"),
        }
    }
}

impl Default for FleetMetrics {
    fn default() -> Self {
        FleetMetrics::new()
    }
}

impl Metrics {
    /// Registers the fleet store's metrics (once; a second registration is ignored).
    pub fn register_fleet(&self, fleet: &FleetMetrics) {
        let _ = self.registry.register(Box::new(fleet.operations.clone()));
        let _ = self.registry.register(Box::new(fleet.store_up.clone()));
        let _ = self
            .registry
            .register(Box::new(fleet.blocked_long_polls_closed.clone()));
    }
}
