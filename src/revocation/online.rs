//! Revocation checked online, once per request: OCSP (`ocsp`) and the CRLs of the device's
//! distribution points (`crl_fetch`), after the identity is resolved and the CRLs in force
//! are consulted.
//!
//! Both talk to the network, so neither runs inside the TLS handshake: a slow responder
//! must never hold the handshake thread, and a resumed session or an hours-long ActiveSync
//! connection must be checked anyway. Both fail hard by default: a device whose revocation
//! status cannot be learned gets 503 with `Retry-After`, never a silent pass; the
//! `danger_*_soft_fail` keys admit it instead, logged and counted.

use std::sync::Arc;

use crate::certs::TlsError;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::revocation::crl_fetch::CrlFetcher;
use crate::revocation::fetch::{Issuers, PlainHttp};
use crate::revocation::ocsp::{OcspChecker, OcspStatus};
use crate::revocation::CurrentRevocation;

/// The online checks of one configuration.
pub struct OnlineRevocation {
    pub ocsp: Option<Arc<OcspChecker>>,
    pub distribution_points: Option<Arc<CrlFetcher>>,
    ocsp_soft_fail: bool,
    crl_soft_fail: bool,
    http: Arc<PlainHttp>,
    metrics: Arc<Metrics>,
}

/// What the online checks say about one device certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not revoked, or nothing to check, or unknown but soft-fail was opted in.
    Good,
    Revoked,
    /// The status could not be learned: 503, the device comes back later.
    Unavailable,
}

impl OnlineRevocation {
    /// The checks `config` asks for. Carries the OCSP cache and the fetched CRLs over from
    /// `previous` when their settings did not change. Contacts nothing until `start`.
    pub fn build(
        config: &Config,
        previous: Option<&OnlineRevocation>,
        current: &Arc<CurrentRevocation>,
        directory: crate::revocation::crl_fetch::PointDirectory,
        metrics: &Arc<Metrics>,
    ) -> Result<OnlineRevocation, TlsError> {
        let settings = &config.revocation;
        let http = previous
            .map(|p| Arc::clone(&p.http))
            .unwrap_or_else(|| Arc::new(PlainHttp::new()));
        let needs_issuers = settings.ocsp || settings.fetches_crls();
        let issuers = if needs_issuers {
            Arc::new(Issuers::load(&config.tls.client_ca)?)
        } else {
            Arc::new(Issuers::default())
        };
        let ocsp = settings
            .ocsp
            .then(|| match previous.and_then(|p| p.ocsp.as_ref()) {
                Some(old) if old.same_settings(settings, &issuers) => Arc::clone(old),
                _ => Arc::new(OcspChecker::new(
                    settings,
                    Arc::clone(&issuers),
                    Arc::clone(&http),
                    Arc::clone(metrics),
                )),
            });
        let distribution_points = settings.fetches_crls().then(|| {
            match previous.and_then(|p| p.distribution_points.as_ref()) {
                Some(old) => Arc::clone(old),
                None => {
                    CrlFetcher::shared(Arc::clone(current), Arc::clone(&http), Arc::clone(metrics))
                }
            }
        });
        if let Some(fetcher) = &distribution_points {
            fetcher.configure(settings, Arc::clone(&issuers), directory);
        }
        if settings.danger_ocsp_soft_fail && settings.ocsp {
            tracing::warn!(target: "seg::config", "revocation.danger_ocsp_soft_fail is set: a device is admitted when the OCSP responder cannot answer");
        }
        if settings.danger_crl_fetch_soft_fail && settings.fetches_crls() {
            tracing::warn!(target: "seg::config", "revocation.danger_crl_fetch_soft_fail is set: a device is admitted when its distribution point's CRL cannot be fetched");
        }
        Ok(OnlineRevocation {
            ocsp,
            distribution_points,
            ocsp_soft_fail: settings.danger_ocsp_soft_fail,
            crl_soft_fail: settings.danger_crl_fetch_soft_fail,
            http,
            metrics: Arc::clone(metrics),
        })
    }

    /// Starts fetching CRLs in the background (once; later calls do nothing).
    pub fn start(&self) {
        if let Some(fetcher) = &self.distribution_points {
            fetcher.start();
        }
    }

    /// Whether any online check is configured.
    pub fn is_enabled(&self) -> bool {
        self.ocsp.is_some() || self.distribution_points.is_some()
    }

    /// Whether OCSP or distribution-point CRLs are configured at all.
    pub fn is_active(&self) -> bool {
        self.distribution_points.is_some() || self.ocsp.is_some()
    }

    /// Checks one device certificate: its distribution-point CRLs, then OCSP. `key` is
    /// (issuer DER, serial without sign byte); `leaf` is read only on a cache miss.
    pub async fn check(&self, key: &(Vec<u8>, Vec<u8>), leaf: &[u8]) -> Verdict {
        let (issuer, serial) = key;
        if let Some(fetcher) = &self.distribution_points {
            match fetcher.check(issuer, serial, leaf).await {
                Ok(false) => {}
                Ok(true) => return Verdict::Revoked,
                Err(e) if self.crl_soft_fail => {
                    tracing::warn!(target: "seg::revocation", error = %e, "CRL unavailable; admitted (danger_crl_fetch_soft_fail)");
                    self.count_soft_fail("crl_distribution_point");
                }
                Err(e) => {
                    tracing::warn!(target: "seg::revocation", error = %e, "CRL unavailable; refused");
                    return Verdict::Unavailable;
                }
            }
        }
        if let Some(ocsp) = &self.ocsp {
            match ocsp.check(issuer, serial, leaf).await {
                Ok(OcspStatus::Good) => {}
                Ok(OcspStatus::Revoked) => return Verdict::Revoked,
                Err(e) if self.ocsp_soft_fail => {
                    tracing::warn!(target: "seg::revocation", error = %e, "OCSP unavailable; admitted (danger_ocsp_soft_fail)");
                    self.count_soft_fail("ocsp");
                }
                Err(e) => {
                    tracing::warn!(target: "seg::revocation", error = %e, "OCSP unavailable; refused");
                    return Verdict::Unavailable;
                }
            }
        }
        Verdict::Good
    }

    fn count_soft_fail(&self, check: &str) {
        self.metrics
            .revocation_soft_fails
            .with_label_values(&[check])
            .inc();
    }
}
