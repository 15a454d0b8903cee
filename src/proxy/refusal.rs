//! Every way seg answers a request itself, decided in one place.
//!
//! The device sees a status and a generic body; the reason code goes to the audit record.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::identity::resolver::ResolveError;
use crate::identity::DenyReason;

/// Seconds a device is told to wait when a dependency is down.
pub const RETRY_AFTER_SECS: u64 = 30;

/// The range of the random wait given when the directory is busy rather than down.
const STORM_RETRY_MIN_SECS: u64 = 2;
const STORM_RETRY_MAX_SECS: u64 = 10;

/// The `DependencyDown` code when a device's revocation status cannot be learned (OCSP
/// responder or CRL distribution point down, an answer that cannot be trusted).
pub const REVOCATION_UNAVAILABLE: &str = "revocation-unavailable";

/// A request seg answers instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A real denial: the certificate maps to no usable account.
    Denied(DenyReason),
    /// A dependency (the directory, an OCSP responder, a CRL distribution point) cannot
    /// decide now; try again later.
    DependencyDown(&'static str),
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamFailed,
    NotFound,
    /// The path is served, not by this method; the methods it is served by.
    MethodNotAllowed(&'static str),
    /// A malformed request (ActiveSync query, Upgrade); the code says what.
    BadRequest(&'static str),
    /// A policy denial after mapping (User= binding, device rules).
    PolicyDenied(&'static str),
    /// A cap is full (long polls, connections of one certificate); the device should come
    /// back later.
    Busy(&'static str),
    /// The request body came slower than `listen.body_min_rate`; the connection is closed.
    BodyTooSlow,
}

/// Who is at fault, for the audit record's `decision` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Dependency,
    Upstream,
}

impl Refusal {
    pub fn from_resolve_error(e: &ResolveError) -> Refusal {
        Refusal::DependencyDown(e.code())
    }

    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Denied(_) => StatusCode::FORBIDDEN,
            Refusal::DependencyDown(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::UpstreamUnreachable | Refusal::UpstreamFailed => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::PolicyDenied(_) => StatusCode::FORBIDDEN,
            Refusal::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The stable reason code in the audit record.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::Denied(reason) => reason.code(),
            Refusal::DependencyDown(code) => code,
            Refusal::UpstreamUnreachable => "upstream-unreachable",
            Refusal::UpstreamTimeout => "upstream-timeout",
            Refusal::UpstreamFailed => "upstream-failed",
            Refusal::NotFound => "path-not-served",
            Refusal::MethodNotAllowed(_) => "method-not-allowed",
            Refusal::BodyTooSlow => "request-body-too-slow",
            Refusal::BadRequest(code) | Refusal::PolicyDenied(code) | Refusal::Busy(code) => code,
        }
    }

    pub fn fault(self) -> Fault {
        match self {
            Refusal::Denied(_)
            | Refusal::NotFound
            | Refusal::MethodNotAllowed(_)
            | Refusal::BadRequest(_)
            | Refusal::PolicyDenied(_)
            | Refusal::Busy(_)
            | Refusal::BodyTooSlow => Fault::Client,
            Refusal::DependencyDown(_) => Fault::Dependency,
            Refusal::UpstreamUnreachable | Refusal::UpstreamTimeout | Refusal::UpstreamFailed => {
                Fault::Upstream
            }
        }
    }

    /// Seconds to tell the device to wait. A directory that is down gets the full
    /// `RETRY_AFTER_SECS`; one that is only busy (a reconnect storm filling the lookup queue or
    /// outlasting `cache.lookup_timeout`) gets a short, random wait, so the devices come back
    /// soon and not all in the same second.
    fn retry_after(self) -> u64 {
        match self {
            Refusal::DependencyDown("directory-overloaded" | "directory-timeout") => {
                STORM_RETRY_MIN_SECS
                    + (crate::clock::random_fraction()
                        * (STORM_RETRY_MAX_SECS - STORM_RETRY_MIN_SECS) as f64)
                        .round() as u64
            }
            _ => RETRY_AFTER_SECS,
        }
    }

    /// The response: generic text naming no internals.
    pub fn response(self) -> Response<Bytes> {
        let status = self.status();
        let text = format!(
            "{} {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        );
        let mut response = Response::new(Bytes::from(text));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        match self {
            Refusal::DependencyDown(_) | Refusal::Busy(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after()));
            }
            Refusal::MethodNotAllowed(allowed) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allowed));
            }
            Refusal::BodyTooSlow => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_busy_directory_gets_a_short_random_wait_and_a_down_one_the_full_wait() {
        let storm = [
            ResolveError::Overloaded,
            ResolveError::Timeout(Duration::from_secs(5)),
        ];
        for error in &storm {
            for _ in 0..50 {
                let wait = Refusal::from_resolve_error(error).retry_after();
                assert!((STORM_RETRY_MIN_SECS..=STORM_RETRY_MAX_SECS).contains(&wait));
            }
        }
        assert_eq!(
            Refusal::DependencyDown("directory-unavailable").retry_after(),
            RETRY_AFTER_SECS
        );
        assert_eq!(
            Refusal::Busy("long-poll-cap").retry_after(),
            RETRY_AFTER_SECS
        );
    }
}
