//! The whole Kerberos chain, end to end, to a real mailbox: a real ActiveSync client
//! (pyactivesync, `tests/eas_client.py`) presents each user's device certificate to seg; seg
//! maps it against a Samba AD DC and delegates (S4U2Self + S4U2Proxy, `identity.mode =
//! "kerberos"`) to `HTTP/eas.corp.test`; Apache with `mod_auth_gssapi` and that SPN's keytab
//! accepts the token and proxies to SOGo with the authenticated name in
//! `x-webobjects-remote-user`; SOGo reads its users from the same AD over LDAPS.
//!
//! Nothing in the chain trusts a header seg sets: SOGo's user is the one the KDC put in the
//! ticket. One test function: only one Samba DC runs on a machine, and SOGo takes seconds to
//! start. The conversation is the one `tests/activesync_sogo.rs` has with a trusted header
//! (`support::eas_driver::conversation`); then what seg refuses before any Kerberos work
//! (`User=` naming another mailbox) and what the KDC refuses (an account marked "sensitive
//! and cannot be delegated").

mod support;

use std::io::{Read as _, Write as _};
use std::time::Instant;

use seg::demo::pki::LeafSpec;
use support::audit::{audit, capture_audit};
use support::eas_driver::{conversation, strings, Driver, ALICE_DEVICE_ID, BOB_DEVICE_ID};
use support::lab::{config_text, metric_value, start_seg, DirectoryRef, Pki, TempDir};
use support::samba::{Samba, ADMIN_PASSWORD, BASE_DN, DNS_DOMAIN};
use support::sogo::{LdapSource, Sogo, UserSource};

/// `userAccountControl`: NOT_DELEGATED, "account is sensitive and cannot be delegated".
const NOT_DELEGATED: u32 = 0x0010_0000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activesync_through_kerberos_delegation_to_sogo() {
    let test_started = Instant::now();
    capture_audit();
    let pki = Pki::new();
    // SOGo and its servers come up in the background while the domain is provisioned; SOGo
    // asks the directory only when a request names a user.
    let source = UserSource::Ldap(LdapSource {
        host: "127.0.0.1".into(),
        port: 636,
        base_dn: format!("CN=Users,{BASE_DN}"),
        bind_dn: format!("CN=Administrator,CN=Users,{BASE_DN}"),
        bind_password: ADMIN_PASSWORD.into(),
        ca_file: pki.ca_path.clone(),
    });
    let users = ["alice", "bob", "dave"];
    let sogo_start = tokio::task::spawn_blocking(move || Sogo::start_with_source(&users, source));

    let samba = tokio::task::block_in_place(|| Samba::start_with_pki(&pki));
    // Before any Kerberos call in this process: MIT reads its configuration once.
    std::env::set_var("KRB5_CONFIG", samba.krb5_conf());
    let work = TempDir::new("kerberos-sogo");
    let keytabs = samba.setup_delegation(work.path());
    let pairs: Vec<(String, String)> = users
        .iter()
        .map(|u| (u.to_string(), format!("{u}@{DNS_DOMAIN}")))
        .collect();
    let refs: Vec<(&str, &str)> = pairs.iter().map(|(u, p)| (&u[..], &p[..])).collect();
    for (dn, (_, mail)) in samba.create_users(&refs).iter().zip(&pairs) {
        samba.set_attribute(dn, "mail", &[mail]);
    }
    samba.add_account_control("dave", NOT_DELEGATED);
    let device = |user: &str| {
        pki.device(
            LeafSpec::device(&format!("{user}-phone"))
                .upn(&format!("{user}@{DNS_DOMAIN}"))
                .sid_extension(&samba.object_sid(user)),
        )
    };
    let (alice, bob, dave) = (device("alice"), device("bob"), device("dave"));

    let sogo = match sogo_start.await {
        Ok(sogo) => sogo,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let apache = support::apache::Apache::start_sogo_front(
        &work.path().join("apache"),
        &keytabs.eas,
        &samba.krb5_conf(),
        sogo.addr(),
    );
    let ready = test_started.elapsed();

    let directory = DirectoryRef {
        urls: vec![samba.ldaps_url()],
        base_dn: samba.base_dn().to_string(),
        bind_dn: samba.admin_dn(),
        password: samba.admin_password().to_string(),
    };
    let extra = keytabs.identity_config();
    let upstream_line = format!("url = \"http://{}\"", apache.addr);
    let text = config_text(&pki, &directory, apache.addr, &extra)
        .replace(
            &upstream_line,
            &format!("{upstream_line}\npath_prefix = \"/SOGo\""),
        )
        .replace("enforcement = \"compatibility\"", "enforcement = \"full\"");
    assert!(text.contains("path_prefix = \"/SOGo\""), "{text}");
    let config_path = pki.dir.write("seg-kerberos-sogo.toml", &text);
    let seg = start_seg(&config_path).await;
    let metric = |name: &str| metric_value(&seg.metrics.render(), name);
    let driver = Driver::new(
        format!("https://127.0.0.1:{}", seg.listen_addr.port()),
        &pki.ca_path,
    );

    // 1. The conversation, each user served as themselves through the ticket.
    let conversation_started = Instant::now();
    tokio::task::block_in_place(|| conversation(&driver, &sogo, &alice, &bob));
    let conversation_time = conversation_started.elapsed();
    let access = apache.access_log();
    for (device_id, user) in [(ALICE_DEVICE_ID, "alice"), (BOB_DEVICE_ID, "bob")] {
        let lines: Vec<&str> = access
            .lines()
            .filter(|l| l.contains(&format!("DeviceId={device_id}&")))
            .collect();
        assert!(lines.len() >= 4, "{device_id}: {access}");
        for line in &lines {
            assert!(
                line.ends_with(&format!(" 200 {user}")),
                "{device_id}'s request not authenticated as {user} by Apache: {line}\n{access}"
            );
        }
    }
    assert!(
        !access.contains(" 401 "),
        "a token Apache refused:\n{access}\n{}",
        apache.log()
    );
    assert_eq!(
        metric("seg_kerberos_exchanges_total{outcome=\"delegated\"}"),
        2.0,
        "one S4U exchange per account, then cached credentials"
    );

    // Apache itself never takes the header from a client: a request without a ticket that
    // names bob in it is refused there and never reaches SOGo.
    let answer = tokio::task::block_in_place(|| {
        let mut stream = std::net::TcpStream::connect(apache.addr).expect("connect to Apache");
        stream
            .write_all(
                b"POST /SOGo/Microsoft-Server-ActiveSync?Cmd=Settings&User=bob&DeviceId=SEGDIRECT1\
                  &DeviceType=iPhone HTTP/1.1\r\nHost: eas.corp.test\r\n\
                  x-webobjects-remote-user: bob\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .expect("write to Apache");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .expect("read Apache's answer");
        answer
    });
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
    assert!(
        !sogo
            .requests()
            .iter()
            .any(|(r, _)| r.contains("SEGDIRECT1")),
        "a request without a ticket reached SOGo"
    );

    // 2. An identity header sent by alice's device changes nothing: served as alice.
    let line = tokio::task::block_in_place(|| {
        driver.raw(
            &alice,
            "Cmd=Settings&User=alice&DeviceId=SEGHEADER1&DeviceType=iPhone",
            &["x-webobjects-remote-user: bob"],
        )
    });
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(strings(&line["emails"]), ["alice@corp.test"], "{line}");

    // 3. alice's certificate naming bob's mailbox: seg refuses, before any Kerberos work.
    let exchanges = metric("seg_kerberos_exchanges_total{outcome=\"delegated\"}");
    let line = tokio::task::block_in_place(|| {
        driver.raw(
            &alice,
            "Cmd=FolderSync&User=bob&DeviceId=SEGATTACK1&DeviceType=iPhone",
            &[],
        )
    });
    assert_eq!(line["status"], 403, "{line}");
    assert!(
        !apache.access_log().contains("SEGATTACK1"),
        "User=bob reached Apache:\n{}",
        apache.access_log()
    );
    let records = audit("SEGATTACK1");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["status"], 403, "{records:?}");
    assert_eq!(records[0]["reason"], "user-mismatch", "{records:?}");
    assert_eq!(
        metric("seg_kerberos_exchanges_total{outcome=\"delegated\"}"),
        exchanges
    );

    // 4. dave is "sensitive and cannot be delegated": the KDC refuses the S4U2Proxy, seg
    //    answers 403 at Provision with the reason in its audit record, and nothing reaches
    //    Apache or SOGo.
    let run = tokio::task::block_in_place(|| {
        driver.run(&dave, "dave", "SEGDAVE1", &["--steps", "provision"])
    });
    let provision = run.step("provision", 0);
    assert_eq!(provision["ok"], false, "{run:?}");
    assert_eq!(provision["http_status"], 403, "{run:?}");
    let records = audit("SEGDAVE1");
    assert!(!records.is_empty(), "no audit record for dave");
    for record in &records {
        assert_eq!(record["status"], 403, "{records:?}");
        assert_eq!(record["reason"], "account-not-delegable", "{records:?}");
        assert!(
            record["account"].as_str().unwrap_or("").contains("dave"),
            "{records:?}"
        );
    }
    assert_eq!(
        metric("seg_kerberos_exchanges_total{outcome=\"account-not-delegable\"}"),
        1.0
    );
    assert!(
        !apache.access_log().contains("SEGDAVE1"),
        "dave reached Apache:\n{}",
        apache.access_log()
    );
    assert!(
        !sogo.requests().iter().any(|(r, _)| r.contains("SEGDAVE1")),
        "dave reached SOGo"
    );

    println!("Kerberos chain timings:");
    for (part, took) in sogo.startup() {
        println!("  start {part:<12} {:>8.2} s", took.as_secs_f64());
    }
    println!("  all servers ready        {:>8.2} s", ready.as_secs_f64());
    println!(
        "  conversation             {:>8.2} s",
        conversation_time.as_secs_f64()
    );
    seg.stop().await;
    drop(apache);
    drop(sogo);
    drop(samba);
    println!(
        "  whole test               {:>8.2} s",
        test_started.elapsed().as_secs_f64()
    );
}
