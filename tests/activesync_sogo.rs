//! A real ActiveSync conversation through seg: a real client (pyactivesync, `tests/eas_client.py`)
//! presenting device certificates, seg mapping them against slapd by strong
//! `altSecurityIdentities` bindings, and a real ActiveSync server behind it (SOGo 5.8 with
//! PostgreSQL, Dovecot and memcached, `tests/support/sogo.rs`) that trusts seg's
//! `x-webobjects-remote-user` header.
//!
//! One test function, because SOGo takes seconds to start: the conversation (Provision,
//! FolderSync, first and incremental Sync, an idle Ping and a Ping woken by new mail, SendMail
//! from alice read by bob with his own certificate), then the attacks (alice's certificate
//! naming bob in `User=`, a client-sent `x-webobjects-remote-user` or `Authorization: Basic`,
//! a blocked DeviceType). The attack checks are all run and reported together.

mod support;

use std::time::Instant;

use seg::config::Config;
use seg::demo::pki::LeafSpec;
use seg::App;
use support::eas_driver::{conversation, strings, Driver, BOB_DEVICE_ID};
use support::lab::{config_text, reversed_hex, start_slapd, Device, DirectoryRef, Pki, CA_AD_NAME};
use support::slapd::UserSpec;
use support::sogo::Sogo;

const ALICE_SERIAL: [u8; 8] = [0x5e, 0x60, 0xa1, 0x1c, 0xe0, 0x00, 0x00, 0x01];
const BOB_SERIAL: [u8; 8] = [0x5e, 0x60, 0xb0, 0xb0, 0xe0, 0x00, 0x00, 0x02];

fn account(sam: &str, serial: &[u8]) -> UserSpec {
    let mut user = UserSpec::new(sam);
    user.upn = Some(format!("{sam}@corp.test"));
    user.when_created = Some("20200101000000.0Z".into());
    user.alt_security_identities =
        vec![format!("X509:<I>{CA_AD_NAME}<SR>{}", reversed_hex(serial))];
    user
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_activesync_client_through_seg_to_sogo() {
    let test_started = Instant::now();
    // SOGo and its servers come up in the background while the PKI and slapd are made.
    let sogo_start = tokio::task::spawn_blocking(Sogo::start);
    let pki = Pki::new();
    let alice_device = pki.device(LeafSpec::device("alice-phone").serial(&ALICE_SERIAL));
    let bob_device = pki.device(LeafSpec::device("bob-phone").serial(&BOB_SERIAL));
    let slapd = tokio::task::block_in_place(|| {
        start_slapd(
            &pki,
            vec![account("alice", &ALICE_SERIAL), account("bob", &BOB_SERIAL)],
        )
    });
    let sogo = match sogo_start.await {
        Ok(sogo) => sogo,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let sogo_ready = test_started.elapsed();

    let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
    let extra = r#"
[identity]
header = "x-webobjects-remote-user"
value = "sam"

[activesync]
block_device_types = ["EvilPhone"]
"#;
    let upstream_line = format!("url = \"{}\"", sogo.url());
    let text = config_text(&pki, &directory, sogo.addr(), extra)
        .replace(
            &upstream_line,
            // sogod closes every connection after its response without saying so
            // (no `Connection: close`): a pooled connection can be dead by the time it is
            // reused, and the device gets a 502. No idle pool toward SOGo.
            &format!("{upstream_line}\npath_prefix = \"/SOGo\"\npool_max_idle_per_host = 0"),
        )
        .replace("enforcement = \"compatibility\"", "enforcement = \"full\"");
    assert!(text.contains("path_prefix = \"/SOGo\""), "{text}");
    let config_path = pki.dir.write("seg-sogo.toml", &text);
    let config = Config::load(&config_path).unwrap_or_else(|e| panic!("config: {e}"));
    let seg = App::build(config)
        .unwrap_or_else(|e| panic!("build: {e}"))
        .start()
        .await
        .expect("seg start");
    let url = format!("https://127.0.0.1:{}", seg.listen_addr.port());

    let conversation_started = Instant::now();
    let driver = Driver::new(url, &pki.ca_path);
    tokio::task::block_in_place(|| conversation(&driver, &sogo, &alice_device, &bob_device));
    let conversation_time = conversation_started.elapsed();

    let attacks_started = Instant::now();
    let failures =
        tokio::task::block_in_place(|| attacks(&driver, &sogo, &alice_device, &bob_device));
    let attacks_time = attacks_started.elapsed();

    println!("SOGo tier timings:");
    for (part, took) in sogo.startup() {
        println!("  start {part:<12} {:>8.2} s", took.as_secs_f64());
    }
    println!(
        "  ready with PKI + slapd   {:>8.2} s",
        sogo_ready.as_secs_f64()
    );
    println!(
        "  conversation             {:>8.2} s",
        conversation_time.as_secs_f64()
    );
    println!(
        "  attacks                  {:>8.2} s",
        attacks_time.as_secs_f64()
    );
    println!("  SMTP sink: {:?}", sogo.smtp_log());
    let stopping = Instant::now();
    drop(seg);
    drop(sogo);
    println!(
        "  stop                     {:>8.2} s",
        stopping.elapsed().as_secs_f64()
    );
    println!(
        "  whole test               {:>8.2} s",
        test_started.elapsed().as_secs_f64()
    );

    assert!(
        failures.is_empty(),
        "{} attack check(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// The attacks; every check runs, failures are returned together.
fn attacks(driver: &Driver, sogo: &Sogo, alice: &Device, bob: &Device) -> Vec<String> {
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        println!("  [{}] {what}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failures.push(what);
        }
    };
    let sogo_saw = |device_id: &str| -> Vec<(String, u16)> {
        sogo.requests()
            .into_iter()
            .filter(|(request, _)| request.contains(&format!("DeviceId={device_id}")))
            .collect()
    };

    // Control: alice's own mailbox through a raw request.
    let line = driver.raw(
        alice,
        "Cmd=FolderSync&User=alice&DeviceId=CONTROL1&DeviceType=iPhone",
        &[],
    );
    check(
        line["status"] == 200 && line["folders"].as_u64().unwrap_or(0) >= 4,
        format!("control: alice's FolderSync as alice is served: {line}"),
    );
    // Control for the "never reaches SOGo" checks: SOGo's access log shows what did.
    let seen = sogo_saw("CONTROL1");
    check(
        seen.len() == 1 && seen[0].1 == 200,
        format!("control: SOGo's log shows the control request: {seen:?}"),
    );

    // 1. alice's certificate naming bob in User=.
    let line = driver.raw(
        alice,
        "Cmd=FolderSync&User=bob&DeviceId=ATTACK1&DeviceType=iPhone",
        &[],
    );
    check(
        line["status"] == 403,
        format!("User=bob with alice's certificate → 403: got {line}"),
    );
    let seen = sogo_saw("ATTACK1");
    check(
        seen.is_empty(),
        format!("User=bob with alice's certificate never reaches SOGo: SOGo saw {seen:?}"),
    );
    let run = driver.run(
        alice,
        "bob",
        "ATTACK1B",
        &["--steps", "provision,foldersync"],
    );
    let provision = run.step("provision", 0);
    check(
        provision["ok"] == false && provision["http_status"] == 403,
        format!(
            "a device run as bob with alice's certificate is refused at Provision: {provision}"
        ),
    );
    let seen = sogo_saw("ATTACK1B");
    check(
        seen.is_empty(),
        format!("the device run as bob never reaches SOGo: SOGo saw {seen:?}"),
    );

    // 2. A client-sent identity header, and Basic credentials, are never bob.
    for header in [
        "x-webobjects-remote-user: bob",
        "Authorization: Basic Ym9iOng=",
        "X-WebObjects-Remote-User: bob",
    ] {
        let line = driver.raw(
            alice,
            "Cmd=Settings&User=alice&DeviceId=ATTACK2&DeviceType=iPhone",
            &[header],
        );
        check(
            line["status"] == 200 && strings(&line["emails"]) == ["alice@corp.test"],
            format!("`{header}` from alice's device is served as alice: {line}"),
        );
    }
    let run = driver.run(
        alice,
        "alice",
        "ATTACK2B",
        &[
            "--steps",
            "provision,foldersync,sync,whoami",
            "--header",
            "x-webobjects-remote-user: bob",
            "--basic",
            "bob:x",
        ],
    );
    let served_as_alice = run.success
        && strings(&run.step("whoami", 0)["emails"]) == ["alice@corp.test"]
        && strings(&run.step("sync", 0)["subjects"]).contains(&"Welcome alice".to_string())
        && !strings(&run.step("sync", 0)["subjects"]).contains(&"From alice via seg".to_string());
    check(
        served_as_alice,
        format!("a full device conversation with bob's header and Basic bob:x sees alice's mailbox: {run:?}"),
    );

    // 3. A blocked DeviceType.
    let line = driver.raw(
        alice,
        "Cmd=FolderSync&User=alice&DeviceId=ATTACK3&DeviceType=EvilPhone",
        &[],
    );
    check(
        line["status"] == 403,
        format!("DeviceType=EvilPhone → 403: got {line}"),
    );
    let run = driver.run(
        alice,
        "alice",
        "ATTACK3B",
        &["--steps", "provision", "--device-type", "EvilPhone"],
    );
    check(
        run.step("provision", 0)["http_status"] == 403,
        format!("a device of type EvilPhone is refused at Provision: {run:?}"),
    );
    for device_id in ["ATTACK3", "ATTACK3B"] {
        let seen = sogo_saw(device_id);
        check(
            seen.is_empty(),
            format!("the blocked device {device_id} never reaches SOGo: SOGo saw {seen:?}"),
        );
    }

    // bob's state is untouched: his device's next Sync has nothing new, and every request
    // SOGo saw for User=bob came from bob's own device.
    let run = driver.run(bob, "bob", BOB_DEVICE_ID, &["--steps", "sync"]);
    let sync = run.step("sync", 0);
    check(
        run.success && sync["added"] == 0 && sync["changed"] == 0 && sync["deleted"] == 0,
        format!("bob's mailbox unchanged by the attacks: {sync}"),
    );
    let foreign: Vec<(String, u16)> = sogo
        .requests()
        .into_iter()
        .filter(|(r, _)| {
            r.contains("User=bob&") && !r.contains(&format!("DeviceId={BOB_DEVICE_ID}"))
        })
        .collect();
    check(
        foreign.is_empty(),
        format!("SOGo saw User=bob only from bob's device: also {foreign:?}"),
    );
    failures
}
