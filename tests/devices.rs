//! The device API and `seg devices`: what a running seg knows about each device, asked the
//! way a helpdesk would ("why can't alice sync?"), against a real seg (slapd, the echo
//! upstream, real TLS); and who may ask (loopback without a token; with
//! `admin.api_token_file`, only with the token).

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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(admin).await.expect("admin");
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(
            format!(
                "GET {target} HTTP/1.1\r\nHost: admin\r\n{authorization}Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    let status = answer[9..12].parse().expect("a status");
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
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
    // /metrics stays open: Prometheus has no token.
    assert_eq!(get(admin, "/metrics", None).await.0, 200);
    // The command reads the token file named by the configuration.
    let out = seg_devices(&lab, &["alice", "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&out).expect("JSON");
    assert_eq!(listed[0]["device_id"], "TESTDEVICE1");
}
