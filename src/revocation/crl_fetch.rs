//! CRLs fetched from distribution points: those of the client CAs and of the device
//! certificates as they arrive (their CRL distribution points and Freshest CRL, where the
//! delta CRLs are), those the base CRLs name for their deltas, and `revocation.crl_urls`.
//!
//! Each URL has one background task: fetch, verify the signature with the issuing CA from
//! `tls.client_ca` (only a verified CRL reaches the per-request lookup or the handshake
//! verifier), parse once, install (`CurrentRevocation::set_fetched`), then sleep until 80 %
//! of the thisUpdate→nextUpdate interval has passed and fetch again. A failed fetch is
//! retried with a growing delay and the CRL in force stays, past its nextUpdate too, so its
//! staleness keeps refusing new handshakes and failing `/readyz` rather than silently
//! dropping the check. An older CRL than the one held is refused (no rollback).
//!
//! A point is an http:// URL, or an `ldap://` URL read over the directory's own connections
//! (`ldap_url`): with no host (`ldap:///…`, as AD CS writes them) it names the configured
//! directory; a named host must be one of `directory.urls`, since seg binds nowhere else.
//! Any other point (https://, an LDAP URL of another host or form, LDAP without an LDAP
//! directory) is logged as unsupported and counted in
//! `seg_crl_fetches_total{result="unsupported"}`, once per URL.
//!
//! A device whose distribution points never yielded a CRL is refused with 503 (its first
//! request waits for the first fetch, up to the fetch timeout); so is one whose Freshest CRL
//! points never yielded its delta.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use http::Uri;
use tokio::sync::watch;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::config::{LdapConfig, RevocationConfig};
use crate::directory::Directory;
use crate::metrics::Metrics;
use crate::revocation::fetch::{
    distribution_points, fetchable, freshest_points, Issuers, PlainHttp,
};
use crate::revocation::{crls_from_bytes, CrlSource, CurrentRevocation, ParsedCrl};
use crate::syntax::ldap_url::{is_ldap, LdapUrl};

/// Largest CRL accepted: enterprise CRLs reach tens of MB.
const MAX_CRL_BYTES: usize = 128 * 1024 * 1024;
/// Refresh interval of a CRL without nextUpdate.
const WITHOUT_NEXT_UPDATE: Duration = Duration::from_secs(3600);
/// Shortest wait between two fetches of one URL.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Longest wait between retries of a failing URL.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How far the CA's clock may be ahead of ours.
const CLOCK_SKEW_SECS: i64 = 300;
/// Leaves whose distribution points are remembered.
const MAX_LEAVES: u64 = 200_000;

/// Why a device's CRL is not available.
#[derive(Debug, thiserror::Error)]
pub enum CrlFetchError {
    #[error(
        "no CRL could be fetched from the certificate's distribution points ({urls}): {reason}"
    )]
    NeverFetched { urls: String, reason: String },
    #[error("the certificate names only distribution points seg cannot fetch ({0}) and no CRL of its issuer is in force")]
    OnlyUnsupported(String),
}

/// The distribution-point fetcher, shared by every configuration while fetching stays on.
pub struct CrlFetcher {
    current: Arc<CurrentRevocation>,
    http: Arc<PlainHttp>,
    metrics: Arc<Metrics>,
    settings: RwLock<Settings>,
    points: Mutex<HashMap<String, Arc<Point>>>,
    /// (issuer DER, serial) → the leaf's distribution points.
    leaves: moka::future::Cache<(Vec<u8>, Vec<u8>), Arc<LeafPoints>>,
    /// URLs already reported as unsupported (reported once each).
    reported: Mutex<HashSet<String>>,
    started: AtomicBool,
    me: Weak<CrlFetcher>,
}

#[derive(Default)]
struct Settings {
    timeout: Duration,
    issuers: Arc<Issuers>,
    leaf_points: bool,
    /// The LDAP directory and its settings, for `ldap://` points.
    directory: Option<(Arc<Directory>, LdapConfig)>,
}

/// The directory seg reads `ldap://` points from, with its settings (`directory.urls` say
/// which hosts a point may name).
pub type PointDirectory = Option<(Arc<Directory>, LdapConfig)>;

/// Where a point's CRL is read.
enum Location {
    Http(Uri),
    Ldap(LdapUrl),
}

/// One URL and its task.
struct Point {
    location: Location,
    /// From the configuration (removed when it no longer names it) or from a device.
    configured: bool,
    /// The outcome of the latest attempt; `None` until the first one ends.
    outcome: watch::Sender<Option<Result<(), String>>>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// A leaf's distribution points: the ones seg fetches (for its base CRL, and for its delta
/// from the Freshest CRL extension) and the ones it cannot.
struct LeafPoints {
    bases: Vec<String>,
    deltas: Vec<String>,
    unsupported: Vec<String>,
}

impl CrlFetcher {
    /// A fetcher in an `Arc`, knowing itself (its tasks hold it weakly, so dropping the
    /// last configuration that uses it stops them).
    pub fn shared(
        current: Arc<CurrentRevocation>,
        http: Arc<PlainHttp>,
        metrics: Arc<Metrics>,
    ) -> Arc<CrlFetcher> {
        Arc::new_cyclic(|me| CrlFetcher {
            current,
            http,
            metrics,
            settings: RwLock::new(Settings::default()),
            points: Mutex::new(HashMap::new()),
            leaves: moka::future::Cache::new(MAX_LEAVES),
            reported: Mutex::new(HashSet::new()),
            started: AtomicBool::new(false),
            me: me.clone(),
        })
    }

    /// Applies a configuration: the timeout, the CAs, the directory, the configured URLs.
    /// URLs the new configuration no longer names stop being fetched and their CRLs leave
    /// the list.
    pub fn configure(
        &self,
        config: &RevocationConfig,
        issuers: Arc<Issuers>,
        directory: PointDirectory,
    ) {
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = Settings {
            timeout: config.crl_fetch_timeout,
            issuers: Arc::clone(&issuers),
            leaf_points: config.crl_distribution_points,
            directory,
        };
        let mut configured: Vec<String> = config.crl_urls.clone();
        if config.crl_distribution_points {
            for ca in &issuers.certs {
                let Ok((_, cert)) = X509Certificate::from_der(ca.as_ref()) else {
                    continue;
                };
                for url in distribution_points(&cert) {
                    match self.locate(&url) {
                        Ok(_) => configured.push(url),
                        Err(why) => self.report_unsupported(
                            &url,
                            &format!("CA \"{}\"", cert.subject()),
                            &why,
                        ),
                    }
                }
            }
        }
        configured.sort();
        configured.dedup();
        let dropped: Vec<String> = {
            let mut points = self.lock_points();
            let dropped: Vec<String> = points
                .iter()
                .filter(|(url, p)| {
                    (p.configured && !configured.contains(url))
                        || (!p.configured && !config.crl_distribution_points)
                })
                .map(|(url, _)| url.clone())
                .collect();
            for url in &dropped {
                if let Some(point) = points.remove(url) {
                    point.stop();
                }
            }
            dropped
        };
        if !dropped.is_empty() {
            self.current
                .retain_fetched(|url| !dropped.iter().any(|d| d == url));
        }
        if !config.crl_distribution_points {
            self.leaves.invalidate_all();
        }
        for url in configured {
            self.point(&url, true);
        }
    }

    /// Starts the background fetches (once).
    pub fn start(&self) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let points: Vec<(String, Arc<Point>)> = self
            .lock_points()
            .iter()
            .map(|(u, p)| (u.clone(), Arc::clone(p)))
            .collect();
        for (url, point) in points {
            self.spawn(&url, &point);
        }
    }

    /// Stops every fetch and drops the fetched CRLs (fetching turned off by a reload).
    pub fn stop(&self) {
        for (_, point) in self.lock_points().drain() {
            point.stop();
        }
        self.current.retain_fetched(|_| false);
    }

    /// Whether the device certificate is revoked by its distribution points' CRLs, waiting
    /// for their first fetch if it is still under way.
    pub async fn check(
        &self,
        issuer: &[u8],
        serial: &[u8],
        leaf: &[u8],
    ) -> Result<bool, CrlFetchError> {
        let (leaf_points_on, timeout) = {
            let settings = self.settings.read().unwrap_or_else(|e| e.into_inner());
            (settings.leaf_points, settings.timeout)
        };
        if !leaf_points_on {
            return Ok(self.current.load().is_revoked(issuer, serial));
        }
        let leaf_points = self
            .leaves
            .get_with((issuer.to_vec(), serial.to_vec()), async {
                self.read_leaf(leaf)
            })
            .await;
        if leaf_points.bases.is_empty() {
            let list = self.current.load();
            if !leaf_points.unsupported.is_empty() && !list.covers(issuer) {
                return Err(CrlFetchError::OnlyUnsupported(
                    leaf_points.unsupported.join(", "),
                ));
            }
        } else {
            self.first_fetch(&leaf_points.bases, timeout).await?;
        }
        if !leaf_points.deltas.is_empty() {
            self.first_fetch(&leaf_points.deltas, timeout).await?;
        }
        Ok(self.current.load().is_revoked(issuer, serial))
    }

    /// Waits until one of `urls` has yielded a CRL, or each has failed once (up to the fetch
    /// timeout); an error says why none did.
    async fn first_fetch(&self, urls: &[String], timeout: Duration) -> Result<(), CrlFetchError> {
        let points: Vec<Arc<Point>> = urls
            .iter()
            .filter_map(|url| self.point(url, false))
            .collect();
        let fetched = |this: &Self| urls.iter().any(|url| this.current.fetched(url).is_some());
        if fetched(self) {
            return Ok(());
        }
        // The first attempt of each point, if still running; later failures answer at once.
        let first_attempts = points.iter().map(|p| {
            let mut outcome = p.outcome.subscribe();
            async move {
                let _ = outcome.wait_for(|o| o.is_some()).await;
            }
        });
        let _ = tokio::time::timeout(
            timeout + Duration::from_secs(1),
            futures_join_all(first_attempts),
        )
        .await;
        if fetched(self) {
            return Ok(());
        }
        let reason = points
            .iter()
            .filter_map(|p| match &*p.outcome.borrow() {
                Some(Err(e)) => Some(e.clone()),
                Some(Ok(())) => None,
                None => Some("still fetching".into()),
            })
            .collect::<Vec<_>>()
            .join("; ");
        Err(CrlFetchError::NeverFetched {
            urls: urls.join(", "),
            reason,
        })
    }

    fn read_leaf(&self, leaf: &[u8]) -> Arc<LeafPoints> {
        let mut points = LeafPoints {
            bases: Vec::new(),
            deltas: Vec::new(),
            unsupported: Vec::new(),
        };
        if let Ok((_, cert)) = X509Certificate::from_der(leaf) {
            let whose = || format!("devices of \"{}\"", cert.issuer());
            for url in distribution_points(&cert) {
                match self.locate(&url) {
                    Ok(_) => points.bases.push(url),
                    Err(why) => {
                        self.report_unsupported(&url, &whose(), &why);
                        points.unsupported.push(url);
                    }
                }
            }
            for url in freshest_points(&cert) {
                match self.locate(&url) {
                    Ok(_) => points.deltas.push(url),
                    Err(why) => self.report_unsupported(&url, &whose(), &why),
                }
            }
        }
        Arc::new(points)
    }

    /// Where seg reads the CRL of `url`, or why it cannot.
    fn locate(&self, url: &str) -> Result<Location, String> {
        if !is_ldap(url) {
            return fetchable(url)
                .map(Location::Http)
                .ok_or_else(|| "seg fetches CRLs over http:// and ldap:// only".to_string());
        }
        let ldap = LdapUrl::parse(url).map_err(|e| e.to_string())?;
        let settings = self.settings.read().unwrap_or_else(|e| e.into_inner());
        let Some((_, config)) = &settings.directory else {
            return Err("an ldap:// point needs an LDAP directory ([directory] urls)".into());
        };
        if let Some(host) = ldap.host_name() {
            if !config.names_host(host) {
                return Err(format!(
                    "host {host} is not one of directory.urls (seg reads ldap:// points only from the directory it binds to)"
                ));
            }
        }
        Ok(Location::Ldap(ldap))
    }

    fn report_unsupported(&self, url: &str, whose: &str, why: &str) {
        let first = self
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url.to_string());
        if first {
            tracing::warn!(target: "seg::revocation", %url, %whose, reason = %why, "CRL distribution point not supported; publish the CRL where seg reads it, or list it in revocation.crl_urls or tls.crl_files");
            self.metrics
                .crl_fetches
                .with_label_values(&["unsupported"])
                .inc();
        }
    }

    /// The point for `url`, registered (and fetching, once started) if new.
    fn point(&self, url: &str, configured: bool) -> Option<Arc<Point>> {
        let location = self.locate(url).ok()?;
        let (point, new) = {
            let mut points = self.lock_points();
            match points.get(url) {
                Some(p) => (Arc::clone(p), false),
                None => {
                    let point = Arc::new(Point {
                        location,
                        configured,
                        outcome: watch::Sender::new(None),
                        task: Mutex::new(None),
                    });
                    points.insert(url.to_string(), Arc::clone(&point));
                    (point, true)
                }
            }
        };
        if new && self.started.load(Ordering::Acquire) {
            self.spawn(url, &point);
        }
        Some(point)
    }

    fn spawn(&self, url: &str, point: &Arc<Point>) {
        let me = self.me.clone();
        let url = url.to_string();
        let task_point = Arc::clone(point);
        let task = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let Some(fetcher) = me.upgrade() else {
                    return;
                };
                let wait = match fetcher.fetch(&url, &task_point.location).await {
                    Ok(wait) => {
                        failures = 0;
                        task_point.outcome.send_replace(Some(Ok(())));
                        wait
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(target: "seg::revocation", %url, error = %e, "CRL fetch failed; the CRL in force stays");
                        task_point.outcome.send_replace(Some(Err(e)));
                        backoff(failures)
                    }
                };
                drop(fetcher);
                tokio::time::sleep(wait).await;
            }
        });
        *point.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
    }

    /// One fetch of `url`: on success, how long until the next one.
    async fn fetch(&self, url: &str, location: &Location) -> Result<Duration, String> {
        let (timeout, issuers, directory) = {
            let settings = self.settings.read().unwrap_or_else(|e| e.into_inner());
            (
                settings.timeout,
                Arc::clone(&settings.issuers),
                settings.directory.as_ref().map(|(d, _)| Arc::clone(d)),
            )
        };
        let count = |result: &str| self.metrics.crl_fetches.with_label_values(&[result]).inc();
        let read = match location {
            Location::Http(uri) => self
                .http
                .get(uri, timeout, MAX_CRL_BYTES)
                .await
                .map(|b| b.to_vec()),
            Location::Ldap(ldap) => read_ldap(directory, ldap, timeout).await,
        };
        let body = match read {
            Ok(body) => body,
            Err(e) => {
                count("unavailable");
                return Err(e);
            }
        };
        let current = Arc::clone(&self.current);
        let url_owned = url.to_string();
        // Verifying and parsing a large CRL, and rebuilding the verifier, take a while.
        let installed =
            tokio::task::spawn_blocking(move || install(&current, &url_owned, body, &issuers))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
        match installed {
            Ok(crl) => {
                count("ok");
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                let list = self.current.load();
                self.metrics.record_crls(list.gauges(), now);
                tracing::info!(target: "seg::revocation", %url, issuer = %crl.issuer, entries = crl.entries, delta = crl.delta, "CRL fetched");
                // The deltas the base CRLs name (their Freshest CRL) are fetched beside them.
                let deltas: Vec<String> = list.freshest_urls().map(str::to_string).collect();
                for delta in deltas {
                    if self.locate(&delta).is_ok() {
                        self.point(&delta, false);
                    }
                }
                Ok(refresh_delay(crl.this_update_unix, crl.next_update_unix))
            }
            Err(e) => {
                count("invalid");
                Err(e)
            }
        }
    }

    fn lock_points(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Point>>> {
        self.points.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for CrlFetcher {
    fn drop(&mut self) {
        for point in self.lock_points().values() {
            point.stop();
        }
    }
}

impl Point {
    fn stop(&self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

/// The CRL at an `ldap://` point, read over the directory's connections within `timeout`.
async fn read_ldap(
    directory: Option<Arc<Directory>>,
    url: &LdapUrl,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let directory = directory.ok_or("no LDAP directory is configured")?;
    let values = tokio::time::timeout(
        timeout,
        directory.read_binary(&url.dn, &url.filter, url.attribute),
    )
    .await
    .map_err(|_| format!("no answer from the directory within {timeout:?}"))?
    .map_err(|e| e.to_string())?;
    // AD keeps a one-byte placeholder where no list was published.
    values
        .into_iter()
        .find(|v| v.len() > 1)
        .ok_or_else(|| format!("{} holds no {}", url.dn, url.attribute))
}

/// Verifies, parses and installs a fetched CRL; returns what it says of itself.
fn install(
    current: &CurrentRevocation,
    url: &str,
    body: Vec<u8>,
    issuers: &Issuers,
) -> Result<crate::revocation::CrlInfo, String> {
    let der = crls_from_bytes(body)?
        .into_iter()
        .next()
        .ok_or("empty answer")?;
    {
        let (_, crl) =
            CertificateRevocationList::from_der(der.as_ref()).map_err(|e| e.to_string())?;
        verify_crl(&crl, issuers)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if crl.last_update().timestamp() > now + CLOCK_SKEW_SECS {
            return Err("thisUpdate is in the future".into());
        }
        if let Some(held) = current.fetched(url) {
            if crl.last_update().timestamp() < held.info.this_update_unix {
                return Err("older than the CRL in force (thisUpdate went back)".into());
            }
        }
    }
    let parsed = ParsedCrl::parse(CrlSource::Url(url.to_string()), der)?;
    let info = parsed.info.clone();
    current
        .set_fetched(url, Some(Arc::new(parsed)))
        .map_err(|e| format!("the TLS verifier refuses it: {}", e.message))?;
    Ok(info)
}

/// The CRL's signature, by a CA of `tls.client_ca` with its name.
fn verify_crl(crl: &CertificateRevocationList<'_>, issuers: &Issuers) -> Result<(), String> {
    let named = issuers.named(crl.issuer().as_raw());
    if named.is_empty() {
        return Err(format!(
            "issuer \"{}\" is not in tls.client_ca",
            crl.issuer()
        ));
    }
    let signed = named.iter().any(|ca| {
        X509Certificate::from_der(ca.as_ref())
            .is_ok_and(|(_, ca)| crl.verify_signature(ca.public_key()).is_ok())
    });
    if signed {
        Ok(())
    } else {
        Err(format!(
            "signature is not that of \"{}\" from tls.client_ca",
            crl.issuer()
        ))
    }
}

/// When to fetch again: at 80 % of the CRL's validity, so a fresh one is in force before
/// the old one lapses even if a fetch or two fail.
fn refresh_delay(this_update: i64, next_update: Option<i64>) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let Some(next_update) = next_update else {
        return WITHOUT_NEXT_UPDATE;
    };
    let at = this_update as f64 + 0.8 * (next_update - this_update).max(0) as f64;
    Duration::from_secs_f64((at - now).max(0.0)).max(MIN_REFRESH)
}

/// 1 s, 2 s, 4 s… up to `MAX_BACKOFF`.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF)
}

/// Awaits every future (no `futures` crate for one join).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    for future in futures {
        future.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_comes_at_four_fifths_of_the_validity_and_retries_back_off() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let delay = refresh_delay(now, Some(now + 100));
        assert!(delay > Duration::from_secs(78) && delay <= Duration::from_secs(80));
        assert_eq!(refresh_delay(now - 100, Some(now)), MIN_REFRESH);
        assert_eq!(refresh_delay(now, None), WITHOUT_NEXT_UPDATE);
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
