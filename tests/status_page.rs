//! The status page, in a real headless Chromium against a real seg (slapd, the echo
//! upstream, real TLS): the page renders the gateway's state, the search box finds alice's
//! devices when a person types her name and presses Enter (with her held Ping, and her
//! revoked old certificate refused at the handshake), the refused devices show their
//! reasons, a hostile User-Agent stays text, and the browser loads nothing but the page and
//! its style sheet from the admin listener.

mod support;

use std::time::Duration;

use seg::demo::echo::EchoUpstream;
use seg::demo::pki::LeafSpec;
use support::chromium::Chromium;
use support::lab::{Lab, Pki};
use support::slapd::UserSpec;

/// What a device can put in its User-Agent to reach a helpdesk's browser.
const HOSTILE_AGENT: &str =
    "<img src=x onerror=\"document.title='pwned'\"><script>document.title='pwned'</script>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_finds_alices_devices_and_says_why_one_was_refused() {
    // The enterprise CA's CRL revokes alice's old certificate.
    let pki = Pki::new();
    let old_serial: &[u8] = &[0x0d, 0x1d];
    let crl = pki
        .dir
        .write("corp.crl", &pki.ca.crl_pem(&[old_serial]).unwrap());
    let upstream = EchoUpstream::start_holding(([127, 0, 0, 1], 0).into(), Duration::from_secs(60))
        .await
        .unwrap();
    let lab = Lab::start_edited(
        pki,
        vec![UserSpec::with_upn("alice"), UserSpec::with_upn("bob")],
        upstream,
        |text| {
            let client_ca = text
                .lines()
                .find(|l| l.starts_with("client_ca = "))
                .unwrap()
                .to_string();
            text.replace(
                &client_ca,
                &format!("{client_ca}\ncrl_files = [\"{}\"]", crl.display()),
            )
        },
    )
    .await;
    let alice = lab
        .pki
        .device(LeafSpec::device("alice").upn("alice@corp.test"));
    let alice_old = lab.pki.device(
        LeafSpec::device("alice")
            .upn("alice@corp.test")
            .serial(old_serial),
    );
    let bob = lab.pki.device(LeafSpec::device("bob").upn("bob@corp.test"));
    let client = lab.client();
    let eas = |cmd: &str, user: &str, device: &str, kind: &str| {
        format!("/Microsoft-Server-ActiveSync?Cmd={cmd}&User={user}&DeviceId={device}&DeviceType={kind}")
    };
    let phone_agent = [("User-Agent", "Apple-iPhone15C2/2104.60")];
    for _ in 0..3 {
        let r = client
            .post(
                Some(&alice),
                &eas("Sync", "alice", "ALICEPHONE", "iPhone"),
                &phone_agent,
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    // alice's tablet asks for bob's mailbox with her certificate.
    let r = client
        .post(
            Some(&alice),
            &eas("FolderSync", "bob", "ALICETABLET", "iPad"),
            &[("User-Agent", "Apple-iPad8C1/2104.60")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let r = client
        .post(
            Some(&bob),
            &eas("Sync", "bob", "BOBPHONE", "Android"),
            &[("User-Agent", HOSTILE_AGENT)],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(client
        .post(
            Some(&alice_old),
            &eas("Sync", "alice", "ALICEOLD", "iPhone"),
            &[]
        )
        .await
        .is_err());
    // alice's phone waits for mail: a Ping the upstream holds for a minute.
    let ping_client = lab.client();
    let ping_device = alice.clone();
    let ping = tokio::spawn(async move {
        ping_client
            .post(
                Some(&ping_device),
                &eas("Ping", "alice", "ALICEPHONE", "iPhone"),
                &phone_agent,
            )
            .await
    });

    let chromium = Chromium::start();
    let mut page = chromium.page().await;
    let origin = format!("http://{}", lab.seg.admin_addr);
    page.navigate(&format!("{origin}/")).await;

    // The page renders the gateway's state.
    assert_eq!(page.eval("document.title").await, "seg status");
    let tile = |id: &str| format!("document.querySelector('#{id} dd').textContent");
    // The probes run on their own schedule, and the Ping takes a moment: wait for both.
    let mut seen = (String::new(), String::new());
    for _ in 0..50 {
        page.navigate(&format!("{origin}/")).await;
        seen = (
            page.eval(&tile("ready"))
                .await
                .as_str()
                .unwrap()
                .to_string(),
            page.eval(&tile("pings"))
                .await
                .as_str()
                .unwrap()
                .to_string(),
        );
        if seen == ("ready".to_string(), "1".to_string()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        seen,
        ("ready".to_string(), "1".to_string()),
        "ready, one Ping held"
    );
    assert_eq!(page.eval(&tile("directory")).await, "up");
    assert_eq!(page.eval(&tile("upstream")).await, "up");
    let connections: u64 = page
        .eval(&tile("connections"))
        .await
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(connections >= 1, "the Ping's connection is open");
    let cache = page.eval(&tile("cache")).await;
    assert!(cache.as_str().unwrap().starts_with("2 entries"), "{cache}");
    assert_eq!(page.eval(&tile("devices")).await, "4 of 50000");
    // The CRL in force, current.
    assert_eq!(
        page.eval(&tile("revocation")).await,
        "1 CRL(s), all current"
    );
    let crl_row = page
        .eval("document.querySelector('#crls tr:nth-child(2)').textContent")
        .await;
    assert!(
        crl_row.as_str().unwrap().contains("Corp Test Issuing CA"),
        "{crl_row}"
    );
    // The refusals are listed before anyone searches (both within one second: any order).
    let refused = page
        .eval("[...document.querySelectorAll('#refusals tr.device')].map(r => r.querySelector('td.refusal').textContent.split(' ')[0]).sort()")
        .await;
    assert_eq!(
        refused,
        serde_json::json!(["certificate-revoked", "user-mismatch"])
    );

    // A person types alice's name in the search box (focused on load) and presses Enter.
    assert_eq!(page.eval("document.activeElement.id").await, "q");
    page.type_and_enter("alice").await;
    assert_eq!(page.eval("location.search").await, "?q=alice");
    let row = |device: &str, cell: &str| {
        format!(
            "document.querySelector('#results tr[data-device=\"{device}\"] {cell}').textContent"
        )
    };
    let found = page
        .eval("[...document.querySelectorAll('#results tr.device')].map(r => r.dataset.device).sort()")
        .await;
    // The handshake refused before any account was known has no DeviceId.
    assert_eq!(found, serde_json::json!(["", "ALICEPHONE", "ALICETABLET"]));
    let revoked = page.eval(&row("", "td.refusal")).await;
    assert!(
        revoked.as_str().unwrap().starts_with("certificate-revoked"),
        "{revoked}"
    );
    let revoked_row = page
        .eval("document.querySelector('#results tr[data-device=\"\"]').textContent")
        .await;
    assert!(
        revoked_row
            .as_str()
            .unwrap()
            .contains("not mapped: CN=alice")
            && revoked_row.as_str().unwrap().contains("0d1d"),
        "{revoked_row}"
    );
    let reason = page.eval(&row("ALICETABLET", "td.refusal")).await;
    assert!(
        reason.as_str().unwrap().starts_with("user-mismatch"),
        "{reason}"
    );
    assert_eq!(
        page.eval("document.querySelector('#results tr[data-device=\"ALICETABLET\"]').className")
            .await,
        "device refused"
    );
    let phone = page
        .eval("document.querySelector('#results tr[data-device=\"ALICEPHONE\"]').textContent")
        .await;
    let phone = phone.as_str().unwrap();
    assert!(
        phone.contains("Apple-iPhone15C2/2104.60") && phone.contains("Sync 200"),
        "{phone}"
    );
    assert!(
        phone.contains("upn (weak)") || phone.contains("upn (strong)"),
        "{phone}"
    );
    assert!(page
        .eval(&row("ALICEPHONE", "td:nth-child(7)"))
        .await
        .as_str()
        .unwrap()
        .starts_with("since "));
    let shot = page.screenshot().await;
    assert!(
        shot.starts_with(b"\x89PNG") && shot.len() > 20_000,
        "{} bytes",
        shot.len()
    );
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&path, &shot).unwrap();
    eprintln!("screenshot: {}", path.display());

    // bob's User-Agent is shown as the text it is, and runs nothing.
    page.navigate(&format!("{origin}/?q=bob")).await;
    assert_eq!(page.eval("document.title").await, "seg status");
    assert_eq!(
        page.eval(&row("BOBPHONE", "td:nth-child(3)")).await,
        HOSTILE_AGENT
    );
    assert_eq!(
        page.eval("document.querySelectorAll('main img, main script').length")
            .await,
        0
    );

    // Nothing was loaded from anywhere but the admin listener.
    let requested = page.requested();
    assert!(
        requested.iter().any(|u| u.ends_with("/seg.css")),
        "{requested:?}"
    );
    for url in &requested {
        assert!(url.starts_with(&origin), "the page loaded {url}");
    }
    ping.abort();
}
