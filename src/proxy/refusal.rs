//! Every way seg answers a request itself, decided in one place.
//!
//! The device sees a status and a generic body; the reason code goes to the audit record.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::identity::DenyReason;
use crate::resolver::ResolveError;

/// Seconds a device is told to wait when a dependency is down.
pub const RETRY_AFTER_SECS: u64 = 30;

/// A request seg answers instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A real denial: the certificate maps to no usable account.
    Denied(DenyReason),
    /// The directory cannot decide now; try again later.
    DependencyDown(&'static str),
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamFailed,
    NotFound,
    MethodNotAllowed,
    /// A malformed request (ActiveSync query, Upgrade); the code says what.
    BadRequest(&'static str),
    /// A policy denial after mapping (User= binding, device rules).
    PolicyDenied(&'static str),
    /// A cap is full (long polls); the device should come back later.
    Busy(&'static str),
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
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
            Refusal::PolicyDenied(_) => StatusCode::FORBIDDEN,
            Refusal::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
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
            Refusal::MethodNotAllowed => "method-not-allowed",
            Refusal::BadRequest(code) | Refusal::PolicyDenied(code) | Refusal::Busy(code) => code,
        }
    }

    pub fn fault(self) -> Fault {
        match self {
            Refusal::Denied(_)
            | Refusal::NotFound
            | Refusal::MethodNotAllowed
            | Refusal::BadRequest(_)
            | Refusal::PolicyDenied(_)
            | Refusal::Busy(_) => Fault::Client,
            Refusal::DependencyDown(_) => Fault::Dependency,
            Refusal::UpstreamUnreachable | Refusal::UpstreamTimeout | Refusal::UpstreamFailed => {
                Fault::Upstream
            }
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
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            Refusal::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static("OPTIONS, POST"));
            }
            _ => {}
        }
        response
    }
}
