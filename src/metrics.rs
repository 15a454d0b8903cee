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
    pub handshakes: IntCounterVec,
    pub identity_cache: IntCounterVec,
    pub identity_decisions: IntCounterVec,
    pub directory_searches: IntCounterVec,
    pub directory_search_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub open_connections: IntGauge,
    pub drained_connections: IntCounter,
    pub long_polls: IntGauge,
    pub config_reloads: IntCounterVec,
    pub crl_next_update: prometheus::GaugeVec,
    pub crls_stale: IntGauge,
    pub server_certificate_expiry: prometheus::Gauge,
    pub policy_decisions: IntCounterVec,
    pub connections_refused: IntCounter,
    pub dependency_up: IntGaugeVec,
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
                "Identity resolutions made against the directory, by decision and reason code.",
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
                "nextUpdate of each loaded CRL, by issuer, as a Unix time.",
            ),
            &["issuer"],
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
        let connections_refused = IntCounter::new(
            "connections_refused_total",
            "Device connections closed at accept because max_connections was reached.",
        )
        .expect("valid metric");
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

        let metrics = Metrics {
            registry,
            process_registry: Registry::new(),
            requests,
            request_duration,
            handshakes,
            identity_cache,
            identity_decisions,
            directory_searches,
            directory_search_duration,
            upstream_errors,
            open_connections,
            drained_connections,
            long_polls,
            config_reloads,
            crl_next_update,
            crls_stale,
            server_certificate_expiry,
            policy_decisions,
            connections_refused,
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
            Box::new(metrics.open_connections.clone()),
            Box::new(metrics.drained_connections.clone()),
            Box::new(metrics.long_polls.clone()),
            Box::new(metrics.config_reloads.clone()),
            Box::new(metrics.crl_next_update.clone()),
            Box::new(metrics.crls_stale.clone()),
            Box::new(metrics.server_certificate_expiry.clone()),
            Box::new(metrics.policy_decisions.clone()),
            Box::new(metrics.connections_refused.clone()),
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
    pub fn record_pki(
        &self,
        tls: &crate::config::TlsConfig,
        revocation: &crate::revocation::RevocationList,
    ) {
        self.crl_next_update.reset();
        for crl in &revocation.crls {
            if let Some(next) = crl.next_update_unix {
                self.crl_next_update
                    .with_label_values(&[&crl.issuer])
                    .set(next as f64);
            }
        }
        let expiry = crate::tls::read_certs(&tls.certificate, "tls.certificate")
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

    /// The Prometheus text exposition of every metric.
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
