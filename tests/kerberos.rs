//! Kerberos constrained delegation against real Kerberos: a Samba AD DC as directory and
//! KDC (`svc-seg` with protocol transition, allowed to delegate to `HTTP/eas.corp.test`
//! only), and a real Negotiate acceptor, Apache with `mod_auth_gssapi` and the `svc-eas`
//! keytab, whose CGI reports the name it authenticated. Every case asserts that name: the
//! LAB.md trap makes tokens that authenticate the gateway account instead of the user.
//!
//! One test function: only one Samba DC can run on a machine (fixed ports, the machine lock
//! in `support::samba`), and the last step stops it.

mod support;

use std::time::{Duration, Instant};

use seg::demo::pki::LeafSpec;
use support::apache::Apache;
use support::lab::{
    config_text, eas_target, http_get, metric_value, start_seg, Client, Connection, Device,
    DirectoryRef, HttpResponse, Pki, TempDir, TlsVersion,
};
use support::samba::Samba;

/// What the backend authenticated, from the CGI's answer.
fn field(response: &HttpResponse, name: &str) -> String {
    let text = response.text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| {
            panic!(
                "no {name} in the backend's answer (HTTP {}):\n{text}",
                response.status
            )
        })
        .to_string()
}

async fn post(conn: &mut Connection, user: &str) -> HttpResponse {
    conn.request("POST", &eas_target("Sync", user), &[], b"")
        .await
        .expect("request")
}

async fn post_new(client: &Client, device: &Device, user: &str) -> HttpResponse {
    let mut conn = client
        .connect(Some(device), TlsVersion::Any)
        .await
        .expect("connect");
    post(&mut conn, user).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_against_samba_and_apache() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("SEG_LOG").unwrap_or_else(|_| "seg=info".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let pki = Pki::new();
    let mut samba = Samba::start_with_pki(&pki);
    // Before any Kerberos call in this process: MIT reads its configuration once.
    std::env::set_var("KRB5_CONFIG", samba.krb5_conf());
    let work = TempDir::new("kerberos");
    let keytabs = samba.setup_delegation(work.path());

    let users = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"];
    for user in users {
        samba.create_user(user, &format!("{user}@corp.test"));
    }
    // dave is "sensitive and cannot be delegated".
    samba.add_account_control("dave", 0x0010_0000);
    let sids: Vec<String> = users.iter().map(|u| samba.object_sid(u)).collect();
    let devices: Vec<Device> = users
        .iter()
        .zip(&sids)
        .map(|(user, sid)| {
            pki.device(
                LeafSpec::device(user)
                    .upn(&format!("{user}@corp.test"))
                    .sid_extension(sid),
            )
        })
        .collect();
    let device = |name: &str| {
        devices
            .iter()
            .find(|d| d.name == name)
            .expect("a device of that name")
    };

    let apache = Apache::start(
        &work.path().join("apache"),
        &keytabs.eas,
        &keytabs.seg,
        &samba.krb5_conf(),
    );
    let directory = DirectoryRef {
        urls: vec![samba.ldaps_url()],
        base_dn: samba.base_dn().to_string(),
        bind_dn: samba.admin_dn(),
        password: samba.admin_password().to_string(),
    };
    let text = config_text(&pki, &directory, apache.addr, &keytabs.identity_config());
    let config_path = pki.dir.write("seg.toml", &text);
    let seg = start_seg(&config_path).await;
    let client = Client::new(seg.listen_addr, &pki.ca_path);
    let metric = |name: &str| metric_value(&seg.metrics.render(), name);

    // 1. alice and bob alternate on their own keep-alive connections: each arrives as
    //    themselves, on connections of their own (the CGI reports the client port).
    let mut alice = client
        .connect(Some(device("alice")), TlsVersion::Any)
        .await
        .expect("alice connects");
    let mut bob = client
        .connect(Some(device("bob")), TlsVersion::Any)
        .await
        .expect("bob connects");
    let mut ports = (Vec::new(), Vec::new());
    for round in 0..3 {
        for (conn, user, seen) in [
            (&mut alice, "alice", &mut ports.0),
            (&mut bob, "bob", &mut ports.1),
        ] {
            let response = post(conn, user).await;
            assert_eq!(
                response.status,
                200,
                "{user}, round {round}: {}\n{}",
                response.text(),
                apache.log()
            );
            assert_eq!(field(&response, "REMOTE_USER"), format!("{user}@CORP.TEST"));
            assert_eq!(field(&response, "AUTH_TYPE"), "Negotiate");
            assert_eq!(field(&response, "X_REMOTE_USER"), "", "no identity header");
            assert!(response.header("www-authenticate").is_none());
            seen.push(field(&response, "REMOTE_PORT"));
        }
    }
    assert!(
        ports.0.iter().all(|p| !ports.1.contains(p)),
        "an upstream connection carried both users: alice {:?}, bob {:?}",
        ports.0,
        ports.1
    );
    assert_eq!(
        metric("seg_kerberos_exchanges_total{outcome=\"delegated\"}"),
        2.0
    );
    assert_eq!(
        metric("seg_kerberos_credential_cache_total{result=\"hit\"}"),
        4.0
    );

    // 2. Eight concurrent first requests for one account make one S4U exchange.
    let before = metric("seg_kerberos_exchanges_total{outcome=\"delegated\"}");
    let frank = device("frank").clone();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let client = Client::new(seg.listen_addr, &pki.ca_path);
            let frank = frank.clone();
            tokio::spawn(async move { post_new(&client, &frank, "frank").await })
        })
        .collect();
    for task in tasks {
        let response = task.await.expect("task");
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(field(&response, "REMOTE_USER"), "frank@CORP.TEST");
    }
    assert_eq!(
        metric("seg_kerberos_exchanges_total{outcome=\"delegated\"}"),
        before + 1.0,
        "concurrent first requests were not coalesced"
    );

    // 3. dave cannot be delegated (NOT_DELEGATED): the KDC refuses, 403 with its own code.
    let response = post_new(&client, device("dave"), "dave").await;
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(
        metric("seg_kerberos_exchanges_total{outcome=\"account-not-delegable\"}"),
        1.0
    );

    // 4. Accounts the directory admitted (and seg cached) but the KDC now refuses: carol is
    //    disabled, erin expired, after a first request put their identity in the cache (it
    //    fails the User= binding, before any Kerberos work).
    for user in ["carol", "erin", "grace"] {
        let response = post_new(&client, device(user), "someone-else").await;
        assert_eq!(response.status, 403, "{user}: User= mismatch expected");
    }
    samba.disable("carol");
    samba.set_expired("erin");
    let response = post_new(&client, device("carol"), "carol").await;
    assert_eq!(response.status, 403, "carol: {}", response.text());
    let response = post_new(&client, device("erin"), "erin").await;
    assert_eq!(response.status, 403, "erin: {}", response.text());
    let exposition = seg.metrics.render();
    let refusals: Vec<&str> = exposition
        .lines()
        .filter(|l| l.starts_with("seg_kerberos_exchanges_total"))
        .collect();
    assert_eq!(
        metric_value(
            &exposition,
            "seg_kerberos_exchanges_total{outcome=\"kdc-account-expired\"}"
        ),
        1.0,
        "{refusals:#?}"
    );
    // Samba answers a disabled account with KDC_ERR_POLICY (AD: KDC_ERR_CLIENT_REVOKED,
    // kdc-account-disabled); both are 403s with their own code.
    assert_eq!(
        metric_value(
            &exposition,
            "seg_kerberos_exchanges_total{outcome=\"kdc-policy\"}"
        ),
        1.0,
        "{refusals:#?}"
    );
    // A refusal is remembered for denial_ttl: no second exchange.
    let response = post_new(&client, device("carol"), "carol").await;
    assert_eq!(response.status, 403);
    assert_eq!(
        metric("seg_kerberos_exchanges_total{outcome=\"kdc-policy\"}"),
        1.0
    );

    // 5. The backend refuses the token (a keytab that is not the target SPN's): 503 with
    //    Retry-After, never 401, counted and logged.
    let bad = std::fs::read_to_string(&config_path)
        .expect("config")
        .replace("[upstream]\n", "[upstream]\npath_prefix = \"/bad\"\n");
    seg.reload(seg::config::Config::parse(&bad, pki.dir.path(), "bad.toml").expect("bad config"))
        .expect("reload");
    let response = post_new(&client, device("alice"), "alice").await;
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(response.header("retry-after").is_some());
    assert!(response.header("www-authenticate").is_none());
    assert_eq!(metric("seg_upstream_auth_failures_total"), 1.0);
    seg.reload(seg::config::Config::load(&config_path).expect("config"))
        .expect("reload back");
    let response = post_new(&client, device("alice"), "alice").await;
    assert_eq!(response.status, 200, "{}", response.text());

    // 6. The KDC (and the directory) stop: cached credentials keep working, an account
    //    without one gets 503 + Retry-After, and /readyz fails naming the KDC.
    samba.stop();
    let response = post(&mut alice, "alice").await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(field(&response, "REMOTE_USER"), "alice@CORP.TEST");
    let response = post_new(&client, device("bob"), "bob").await;
    assert_eq!(field(&response, "REMOTE_USER"), "bob@CORP.TEST");
    let response = post_new(&client, device("grace"), "grace").await;
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(response.header("retry-after").is_some());
    assert_eq!(
        metric("seg_kerberos_exchanges_total{outcome=\"kdc-unavailable\"}"),
        1.0
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = http_get(seg.admin_addr, "/readyz").await;
        if ready.contains("503") && ready.contains("kdc") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never named the KDC:\n{ready}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric("seg_dependency_up{dependency=\"kdc\"}"), 0.0);
    seg.stop().await;
    drop(apache);
}
