//! The device API: `GET /api/devices?account=…` or `?device=…` (or `?q=…`, the page's
//! search), `GET /api/refusals?limit=…`, and `POST /api/decision` with a certificate (PEM,
//! leaf first, then any intermediates): the running listener's own validation and mapping
//! of it, run now, as `seg map --explain` would give it.

use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

use super::{Admin, Answer};

/// A certificate chain is a few KiB; a decision request is refused past this.
const MAX_DECISION_BODY: usize = 64 * 1024;
/// How long a decision's body may take to arrive, and the decision itself.
const DECISION_TIME: std::time::Duration = std::time::Duration::from_secs(15);

impl Admin {
    pub(super) async fn api(&self, request: Request<Incoming>) -> Answer {
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        let param = |name: &str| query_param(&query, name);
        let gateway = self.live.load();
        let devices = &gateway.devices;
        match (request.method(), path.as_str()) {
            (&Method::GET, "/api/devices") => match (param("account"), param("device"), param("q"))
            {
                (Some(account), _, _) => Answer::json(&devices.of_account(&account)),
                (None, Some(device), _) => Answer::json(&devices.by_device(&device)),
                (None, None, Some(q)) => Answer::json(&devices.search(&q)),
                (None, None, None) => Answer::text(
                    StatusCode::BAD_REQUEST,
                    "account=, device= or q= is required\n",
                ),
            },
            (&Method::GET, "/api/refusals") => {
                let limit = param("limit").and_then(|l| l.parse().ok()).unwrap_or(50);
                Answer::json(&devices.refused(limit))
            }
            (&Method::POST, "/api/decision") => self.decision(request).await,
            (_, "/api/devices" | "/api/refusals") => {
                Answer::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n")
            }
            (_, "/api/decision") => Answer::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST the certificate (PEM) as application/x-pem-file\n",
            ),
            _ => Answer::text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// The listener's decision for the certificate in the body. The body must say it is PEM
    /// (`application/x-pem-file`): a form on another site cannot send that type without a
    /// CORS preflight, which this listener never answers. One decision at a time (each asks
    /// the directory, uncached), its body within `DECISION_TIME` and its answer too.
    async fn decision(&self, request: Request<Incoming>) -> Answer {
        let is_pem = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("application/x-pem-file"));
        if !is_pem {
            return Answer::text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "POST the certificate (PEM) as application/x-pem-file\n",
            );
        }
        let Ok(_turn) = self.deciding.try_acquire() else {
            return Answer::unavailable("1", "another decision is being made; try again\n");
        };
        let body = Limited::new(request.into_body(), MAX_DECISION_BODY).collect();
        let body = match tokio::time::timeout(DECISION_TIME, body).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(_)) => {
                return Answer::text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "a certificate chain of at most 64 KiB\n",
                )
            }
            Err(_) => {
                return Answer::text(StatusCode::REQUEST_TIMEOUT, "the body came too slowly\n")
            }
        };
        let chain: Vec<CertificateDer<'static>> =
            match CertificateDer::pem_slice_iter(&body).collect::<Result<Vec<_>, _>>() {
                Ok(chain) if !chain.is_empty() => chain,
                _ => {
                    return Answer::text(
                        StatusCode::BAD_REQUEST,
                        "the body holds no PEM certificate\n",
                    )
                }
            };
        let gateway = self.live.load();
        let report = crate::mapcheck::map_der(
            &gateway.client_policy,
            &gateway.resolver,
            gateway.ntauth.as_deref(),
            &chain[0],
            &chain[1..],
        );
        let mut answer = match tokio::time::timeout(DECISION_TIME, report).await {
            Ok(report) => {
                let mut json = report.to_json();
                json["explanation"] = report.explain().into();
                json["replica"] = gateway.fleet.as_ref().map_or("", |f| f.replica()).into();
                Answer::json(&json)
            }
            Err(_) => Answer::unavailable(
                "5",
                "no decision within 15 s: the directory is slow or down\n",
            ),
        };
        answer.cert_serial = crate::identity::CertFacts::from_der(chain[0].as_ref())
            .ok()
            .map(|facts| facts.serial_hex());
        answer
    }
}

/// The percent-decoded value of `name` in a query string (`+` is a space; as ActiveSync's
/// query is decoded, so a broken escape or a control character is no value).
pub(super) fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| crate::activesync::percent_decode(value).ok())?
    })
}
