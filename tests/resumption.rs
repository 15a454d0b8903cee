//! Resumption with a bound (issue 16, finding 2): a session resumed after its certificate
//! expired, or after `tls.session_lifetime`, never gets a request through as the account.
//!
//! seg runs in process against a real slapd, over real TLS, with a clock the test moves
//! (`seg::clock::Clock::adjustable`): the same clock decides certificate validity at the
//! handshake, the age of a ticket or cached session, and the validity check on every request.
//! Each way a device resumes is one row: TLS 1.3 tickets, TLS 1.2 tickets (RFC 5077) and
//! TLS 1.2 session IDs (the server's session cache).

mod support;

use std::time::{Duration, SystemTime};

use seg::clock::Clock;
use seg::demo::pki::LeafSpec;
use support::audit::{audit, capture_audit};
use support::lab::{
    config_text, start_seg_with_clock, start_slapd, DirectoryRef, Pki, ResumingClient, Resumption,
};
use support::slapd::UserSpec;

const HOUR: Duration = Duration::from_secs(3600);
const YEAR: Duration = Duration::from_secs(365 * 86_400);

const ROWS: [Resumption; 3] = [
    Resumption::Tls13Ticket,
    Resumption::Tls12Ticket,
    Resumption::Tls12SessionId,
];

fn target(device_id: &str) -> String {
    format!(
        "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId={device_id}&DeviceType=iPhone"
    )
}

/// Alice's certificate, valid for a year up to `not_after`.
fn alice_until(not_after: SystemTime) -> LeafSpec {
    let mut spec = LeafSpec::device("alice").upn("alice@corp.test");
    spec.valid_from = Some(not_after - YEAR);
    spec
}

struct ClockLab {
    pki: Pki,
    _slapd: support::slapd::Slapd,
    seg: seg::Running,
    clock: Clock,
}

impl ClockLab {
    async fn start() -> ClockLab {
        capture_audit();
        let pki = Pki::new();
        let mut alice = UserSpec::with_upn("alice");
        alice.when_created = Some("20200101000000.0Z".into());
        let slapd = start_slapd(&pki, vec![alice]);
        let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
        let upstream = seg::demo::echo::EchoUpstream::start(([127, 0, 0, 1], 0).into())
            .await
            .expect("echo upstream");
        let text = config_text(&pki, &directory, upstream.addr, "");
        let text = text.replace("[tls]\n", "[tls]\nsession_lifetime = \"6h\"\n");
        let path = pki.dir.write("seg.toml", &text);
        let clock = Clock::adjustable();
        let seg = start_seg_with_clock(&path, clock.clone()).await;
        // The echo upstream lives as long as the process: the lab ends with the test.
        std::mem::forget(upstream);
        ClockLab {
            pki,
            _slapd: slapd,
            seg,
            clock,
        }
    }

    /// The lab clock's now.
    fn now(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.clock.now_unix() as u64)
    }

    fn device(&self, spec: LeafSpec, how: Resumption) -> ResumingClient {
        let device = self.pki.device(spec);
        ResumingClient::resuming_by(self.seg.listen_addr, &self.pki.ca_path, &device, how)
    }
}

/// One request on a new connection: (status, resumed, `Connection` header).
async fn post(client: &ResumingClient, device_id: &str) -> (u16, bool, Option<String>) {
    let (mut conn, resumed) = client.connect().await.expect("handshake");
    let response = conn
        .request("POST", &target(device_id), &[], b"")
        .await
        .expect("response");
    let connection = response.header("connection").map(str::to_string);
    (response.status, resumed, connection)
}

#[tokio::test]
async fn a_session_resumed_after_its_certificate_expired_is_refused() {
    let lab = ClockLab::start().await;
    for how in ROWS {
        let device_id = format!("EXPIRED{how:?}");
        let client = lab.device(alice_until(lab.now() + 2 * HOUR), how);
        assert_eq!(post(&client, &device_id).await.0, 200, "{how:?}: first");
        lab.clock.advance(HOUR);
        let (status, resumed, _) = post(&client, &device_id).await;
        assert_eq!(
            (status, resumed),
            (200, true),
            "{how:?}: resumed while valid"
        );
        // Past notAfter, within the session's lifetime: the handshake resumes (it checks no
        // certificate), the request does not pass.
        lab.clock.advance(2 * HOUR);
        let (status, resumed, connection) = post(&client, &device_id).await;
        assert!(resumed, "{how:?}: the session is within its lifetime");
        assert_eq!(
            status, 403,
            "{how:?}: expired certificate on a resumed session"
        );
        assert_eq!(connection.as_deref(), Some("close"), "{how:?}");
        let records = audit(&device_id);
        let last = records.last().expect("an audit record");
        assert_eq!(last["reason"], "certificate-expired", "{how:?}: {last}");
        assert_eq!(last["status"], 403);
        // A full handshake with such a certificate is refused outright (in TLS 1.3 the
        // client learns it at its first read).
        let fresh = lab.device(alice_until(lab.now() - HOUR), how);
        let refused = match fresh.connect().await {
            Err(_) => true,
            Ok((mut conn, _)) => conn
                .request("POST", &target("NEVER"), &[], b"")
                .await
                .is_err(),
        };
        assert!(
            refused,
            "{how:?}: full handshake with an expired certificate"
        );
    }
}

#[tokio::test]
async fn a_session_is_not_resumed_past_its_lifetime() {
    let lab = ClockLab::start().await;
    for how in ROWS {
        for (ahead, why) in [(7 * HOUR, "7 hours"), (30 * 24 * HOUR, "30 days")] {
            let device_id = format!("AGED{how:?}");
            let client = lab.device(alice_until(lab.now() + YEAR), how);
            assert_eq!(post(&client, &device_id).await.0, 200);
            let (status, resumed, _) = post(&client, &device_id).await;
            assert_eq!((status, resumed), (200, true), "{how:?}: resumes at once");
            lab.clock.advance(ahead);
            // Past the lifetime: a full handshake (the certificate, still valid, is checked).
            let (status, resumed, _) = post(&client, &device_id).await;
            assert!(!resumed, "{how:?}: resumed {why} later");
            assert_eq!(status, 200, "{how:?}: the full handshake's request");
        }
    }
}

#[tokio::test]
async fn a_device_that_keeps_resuming_still_makes_a_full_handshake_each_lifetime() {
    let lab = ClockLab::start().await;
    for how in ROWS {
        let device_id = format!("ROLLING{how:?}");
        let client = lab.device(alice_until(lab.now() + YEAR), how);
        let (status, resumed, _) = post(&client, &device_id).await;
        assert_eq!((status, resumed), (200, false));
        // Each resumption gets new tickets; they keep the first handshake's time.
        for hour in 1..=5 {
            lab.clock.advance(HOUR);
            let (status, resumed, _) = post(&client, &device_id).await;
            assert_eq!((status, resumed), (200, true), "{how:?}: hour {hour}");
        }
        lab.clock.advance(HOUR + Duration::from_secs(60));
        let (status, resumed, _) = post(&client, &device_id).await;
        assert!(
            !resumed,
            "{how:?}: resumed 6 h 1 min after its full handshake"
        );
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn a_kept_alive_connection_is_refused_once_its_certificate_expires() {
    let lab = ClockLab::start().await;
    let client = lab.device(alice_until(lab.now() + HOUR), Resumption::Tls13Ticket);
    let (mut conn, _) = client.connect().await.expect("handshake");
    let first = conn.request("POST", &target("KEPT1"), &[], b"").await;
    assert_eq!(first.expect("first").status, 200);
    lab.clock.advance(2 * HOUR);
    let second = conn
        .request("POST", &target("KEPT1"), &[], b"")
        .await
        .expect("second");
    assert_eq!(second.status, 403);
    assert_eq!(second.header("connection"), Some("close"));
    assert_eq!(
        audit("KEPT1").last().unwrap()["reason"],
        "certificate-expired"
    );
}
