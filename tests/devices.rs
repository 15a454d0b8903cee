//! The device API and `seg devices`: what a running seg knows about each device, asked the
//! way a helpdesk would ("why can't alice sync?"), against a real seg (slapd, the echo
//! upstream, real TLS); the listener's live decision for a certificate; and who may ask
//! (loopback callers naming the host by address without a token; with
//! `admin.api_token_file`, only with the token, as a bearer or as Basic's password).

mod support;

use std::net::SocketAddr;

use seg::demo::echo::EchoUpstream;
use seg::demo::pki::LeafSpec;
use serde_json::Value;
use support::lab::{eas_target, Lab, Pki};
use support::slapd::UserSpec;

fn users() -> Vec<UserSpec> {
    vec![UserSpec::with_upn("alice"), UserSpec::with_upn("bob")]
}

/// One GET to the admin listener: status and body.
async fn get(admin: SocketAddr, target: &str, token: Option<&str>) -> (u16, String) {
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!("GET {target} HTTP/1.1\r\nHost: {admin}\r\n{authorization}");
    let (status, _, body) = call(admin, &head, b"").await;
    (status, body)
}

/// One request to the admin listener, `head` without its last CRLF and `body`: status,
/// head and body of the answer.
async fn call(admin: SocketAddr, head: &str, body: &[u8]) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(admin).await.expect("admin");
    let mut request = format!(
        "{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    let status = answer[9..12].parse().expect("a status");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (status, head.to_string(), body.to_string())
}

/// `seg devices ARGS` against the lab's seg (its admin listener, its configuration); the
/// output, once the command succeeded.
fn seg_devices(lab: &Lab, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_seg"))
        .arg("devices")
        .args(args)
        .args(["--admin", &lab.seg.admin_addr.to_string(), "--config"])
        .arg(&lab.config_path)
        .output()
        .expect("seg devices");
    assert!(
        out.status.success(),
        "seg devices {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helpdesk_sees_alices_devices_and_why_one_was_refused() {
    let lab = Lab::start(users(), "").await;
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    let client = lab.client();
    let phone =
        "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alice&DeviceId=ALICEPHONE&DeviceType=iPhone";
    let tablet =
        "/Microsoft-Server-ActiveSync?Cmd=FolderSync&User=bob&DeviceId=ALICETABLET&DeviceType=iPad";
    assert_eq!(
        client.post(Some(&alice), phone, &[]).await.unwrap().status,
        200
    );
    assert_eq!(
        client.post(Some(&alice), tablet, &[]).await.unwrap().status,
        403
    );

    let admin = lab.seg.admin_addr;
    let (status, body) = get(admin, "/api/devices?account=alice", None).await;
    assert_eq!(status, 200, "{body}");
    let devices: Vec<Value> = serde_json::from_str(&body).expect("JSON");
    assert_eq!(devices.len(), 2, "{body}");
    let find = |id: &str| {
        devices
            .iter()
            .find(|d| d["device_id"] == id)
            .cloned()
            .unwrap()
    };
    let phone_state = find("ALICEPHONE");
    assert_eq!(phone_state["device_type"], "iPhone");
    assert_eq!(phone_state["last_status"], 200);
    assert_eq!(phone_state["last_command"], "Sync");
    assert!(phone_state["last_success"].as_i64().unwrap() > 0);
    assert!(phone_state["cert_not_after"].as_i64().unwrap() > 0);
    // The decision that admitted it: its rule, strength, and when the directory gave it.
    assert_eq!(phone_state["mapping"], "upn", "{phone_state}");
    let decided_at = phone_state["decided_at"].as_i64().unwrap();
    let now = seg::clock::unix_now();
    assert!((now - 60..=now).contains(&decided_at), "{phone_state}");
    let tablet_state = find("ALICETABLET");
    assert_eq!(tablet_state["last_status"], 403);
    assert_eq!(tablet_state["last_refusal"], "user-mismatch");
    // One device by its id, and the refusals.
    let (_, body) = get(admin, "/api/devices?device=alicephone", None).await;
    assert_eq!(serde_json::from_str::<Vec<Value>>(&body).unwrap().len(), 1);
    let (_, body) = get(admin, "/api/refusals", None).await;
    let refused: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(refused[0]["device_id"], "ALICETABLET", "{body}");
    // Nobody else's devices, and a request without a question.
    let (_, body) = get(admin, "/api/devices?account=bob", None).await;
    assert_eq!(body, "[]");
    assert_eq!(get(admin, "/api/devices", None).await.0, 400);

    // A handshake refused for an expired certificate is kept by certificate: the search for
    // the person's name finds it, with the reason.
    let expired = lab.pki.device(
        LeafSpec::device("alice")
            .upn("alice@corp.test")
            .serial(&[0x7e, 0x57])
            .validity((2020, 1, 1), (2021, 1, 1)),
    );
    assert!(client.post(Some(&expired), phone, &[]).await.is_err());
    // The device learns of the refusal before seg has recorded it: ask until it has.
    let mut found: Vec<Value> = Vec::new();
    for _ in 0..100 {
        let (_, body) = get(admin, "/api/devices?q=alice", None).await;
        found = serde_json::from_str(&body).unwrap();
        if found.len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(found.len(), 3, "{found:?}");
    let refused_handshake = found
        .iter()
        .find(|d| d["cert_serial"] == "7e57")
        .expect("the refused handshake");
    assert_eq!(refused_handshake["last_refusal"], "certificate-expired");
    assert_eq!(refused_handshake["account"], "");
    // A certificate of the enterprise CA that maps to no account: found by its subject.
    let mallory = lab.pki.device(LeafSpec::device("mallory"));
    let r = client
        .post(Some(&mallory), &eas_target("Sync", "mallory"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let (_, body) = get(admin, "/api/devices?q=mallory", None).await;
    let found: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(found.len(), 1, "{body}");
    assert!(
        found[0]["cert_subject"]
            .as_str()
            .unwrap()
            .contains("CN=mallory"),
        "{body}"
    );

    // The listener's own decision for a certificate, made now.
    let pem = alice.issued.cert_pem.as_bytes();
    let decide = |content_type: &'static str| {
        let head = format!(
            "POST /api/decision HTTP/1.1\r\nHost: {admin}\r\nContent-Type: {content_type}\r\n"
        );
        async move { call(admin, &head, pem).await }
    };
    let (status, _, body) = decide("application/x-pem-file").await;
    assert_eq!(status, 200, "{body}");
    let decision: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(decision["decision"], "admit", "{body}");
    assert_eq!(decision["identity"], "alice@corp.test", "{body}");
    assert!(decision["explanation"]
        .as_str()
        .unwrap()
        .contains("chain        valid"));
    // A form of another site can send text/plain without a preflight: refused.
    assert_eq!(decide("text/plain").await.0, 415);
    let expired_pem = expired.issued.cert_pem.clone();
    let (_, _, body) = call(
        admin,
        &format!("POST /api/decision HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/x-pem-file\r\n"),
        expired_pem.as_bytes(),
    )
    .await;
    let decision: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(decision["decision"], "deny", "{body}");
    assert_eq!(decision["chain"]["reason"], "certificate-expired", "{body}");
    // The command: the explanation, and its exit status says the decision.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_seg"))
        .args(["devices", "--certificate"])
        .arg(&expired.cert_path)
        .args(["--admin", &admin.to_string(), "--config"])
        .arg(&lab.config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("INVALID (certificate-expired)"));

    // A page elsewhere whose name was rebound to 127.0.0.1 is not answered.
    let (status, _, _) = call(
        admin,
        "GET /api/devices?account=alice HTTP/1.1\r\nHost: rebind.attacker.example:80\r\n",
        b"",
    )
    .await;
    assert_eq!(status, 403);

    // The helpdesk's command, against the running seg.
    let table = seg_devices(&lab, &["alice"]);
    assert!(table.starts_with("ACCOUNT"), "{table}");
    let tablet_line = table
        .lines()
        .find(|l| l.contains("ALICETABLET"))
        .expect("the tablet");
    assert!(
        tablet_line.contains("user-mismatch") && tablet_line.contains("403"),
        "{table}"
    );
    assert!(table.contains("ALICEPHONE"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_file_the_device_api_needs_the_token() {
    let pki = Pki::new();
    let token = "helpdesk-token-0123456789";
    let token_file = pki.dir.write("api-token", &format!("{token}\n"));
    let upstream = EchoUpstream::start(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let lab = Lab::start_edited(pki, users(), upstream, |text| {
        text.replace(
            "[admin]\n",
            &format!("[admin]\napi_token_file = \"{}\"\n", token_file.display()),
        )
    })
    .await;
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    let r = lab
        .client()
        .post(Some(&alice), &eas_target("Sync", "alice"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let admin = lab.seg.admin_addr;
    let target = "/api/devices?account=alice";
    assert_eq!(get(admin, target, None).await.0, 401);
    assert_eq!(get(admin, target, Some("not-the-token")).await.0, 401);
    let (status, body) = get(admin, target, Some(token)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("TESTDEVICE1"), "{body}");
    // A browser gives the token as Basic's password; the page asks for it that way.
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("helpdesk:{token}"));
    let page = |authorization: String| {
        let head = format!("GET /?q=alice HTTP/1.1\r\nHost: {admin}\r\n{authorization}");
        async move { call(admin, &head, b"").await }
    };
    let (status, head, _) = page(String::new()).await;
    assert_eq!(status, 401);
    assert!(
        head.contains("www-authenticate: Basic realm=\"seg admin\""),
        "{head}"
    );
    let (status, head, body) = page(format!("Authorization: Basic {basic}\r\n")).await;
    assert_eq!(status, 200);
    assert!(body.contains("TESTDEVICE1"), "{body}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; style-src 'self'"),
        "{head}"
    );
    // The file is read at each call: a rotated token takes effect at once.
    std::fs::write(&token_file, "rotated-token-9876543210\n").unwrap();
    assert_eq!(get(admin, target, Some(token)).await.0, 401);
    assert_eq!(
        get(admin, target, Some("rotated-token-9876543210")).await.0,
        200
    );
    // /metrics stays open: Prometheus has no token.
    assert_eq!(get(admin, "/metrics", None).await.0, 200);
    // The command reads the token file named by the configuration (the rotated token).
    let out = seg_devices(&lab, &["alice", "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&out).expect("JSON");
    assert_eq!(listed[0]["device_id"], "TESTDEVICE1");
    // A token file that is named but gone answers nobody, loopback included.
    std::fs::remove_file(&token_file).unwrap();
    assert_eq!(
        get(admin, target, Some("rotated-token-9876543210")).await.0,
        503
    );
    assert_eq!(get(admin, target, None).await.0, 503);
}
