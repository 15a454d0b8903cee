//! The `seg` binary: check-config, map and demo, run as a process.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use seg::demo::pki::LeafSpec;
use support::lab::{config_text, eas_target, start_slapd, Client, Device, Pki, TempDir};
use support::slapd::UserSpec;

const SEG: &str = env!("CARGO_BIN_EXE_seg");

fn seg(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(SEG)
        .args(args)
        .env("SEG_LOG", "off")
        .output()
        .expect("run seg");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_broken_config_lists_every_problem_and_exits_64() {
    let dir = TempDir::new("badconfig");
    let path = dir.write(
        "seg.toml",
        r#"
[listen]
address = "not an address"
handshake_timeout = "soon"
colour = "blue"

[tls]
certificate = "/nonexistent/server.pem"

[directory]
urls = ["http://dc1.corp.test"]
base_dn = ""

[mapping]
rules = ["upn", "telepathy", "upn"]

[identity]
value = "domain-sam"

[upstream]
url = "https://eas.corp.test/SOGo"
request_timeout = "30s"

[unknown_section]
x = 1
"#,
    );
    let (code, stdout, stderr) = seg(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 64, "stdout: {stdout}\nstderr: {stderr}");
    for key in [
        "listen.address",
        "listen.handshake_timeout",
        "listen.colour: unknown key",
        "tls.certificate",
        "tls.private_key: required",
        "tls.client_ca: required",
        "directory.urls[0]",
        "directory.base_dn: must not be empty",
        "directory.bind_dn: required",
        "directory.bind_password_file: required",
        "mapping.rules[1]: unknown rule \"telepathy\"",
        "mapping.rules[2]: \"upn\" is listed twice",
        "identity.netbios_domain: required when identity.value = \"domain-sam\"",
        "upstream.ca_file: required for an https:// upstream",
        "upstream.url: must not carry a path",
        "upstream.request_timeout: must be at least 3600s",
        "unknown_section: unknown key",
    ] {
        assert!(stderr.contains(key), "missing {key:?} in:\n{stderr}");
    }
    // `run` refuses the same file with the same code.
    let (code, _, stderr) = seg(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 64, "{stderr}");
    let (code, _, stderr) = seg(&["check-config", "--config", "/nonexistent/seg.toml"]);
    assert_eq!(code, 64, "{stderr}");
}

#[test]
fn a_good_config_is_summarised() {
    let pki = Pki::new();
    let slapd = start_slapd(&pki, vec![]);
    let text = config_text(
        &pki,
        &support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]),
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let path = pki.dir.write("seg.toml", &text);
    let (code, stdout, stderr) = seg(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(
        stdout.contains(
            "issuer-serial → subject-key-id → sha1-public-key → issuer-sid → upn → email (enforcement compatibility)"
        ),
        "{stdout}"
    );
}

#[test]
fn map_explains_each_decision_against_the_directory() {
    let pki = Pki::new();
    let mut dave = UserSpec::new("dave");
    dave.upn = Some("dave@corp.test".into());
    dave.user_account_control = 514;
    dave.when_created = Some("20200101000000.0Z".into());
    let mut alice = UserSpec::new("alice");
    alice.upn = Some("alice@corp.test".into());
    alice.when_created = Some("20200101000000.0Z".into());
    let mut slapd = start_slapd(&pki, vec![alice, dave]);
    let text = config_text(
        &pki,
        &support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]),
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let config = pki.dir.write("seg.toml", &text);
    let config = config.to_str().unwrap();
    let alice = pki.device(LeafSpec::device("alice").upn("alice@corp.test"));
    let dave = pki.device(LeafSpec::device("dave").upn("dave@corp.test"));
    let foreign = pki.foreign_device(
        "Elsewhere CA",
        LeafSpec::device("alice").upn("alice@corp.test"),
    );

    let (code, stdout, stderr) = seg(&[
        "map",
        "--config",
        config,
        "--cert",
        alice.cert_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(json["decision"], "admit");
    assert_eq!(json["identity"], "alice@corp.test");
    assert_eq!(json["chain"]["valid"], true);
    let upn = json["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["rule"] == "upn")
        .expect("the upn rule");
    assert_eq!(upn["looked_for"][0], "userPrincipalName=alice@corp.test");
    assert_eq!(
        upn["outcome"].as_str().map(|o| o.starts_with("found ")),
        Some(true),
        "{upn}"
    );
    let filter = json["filter"].as_str().unwrap();
    assert!(
        filter.starts_with("(&(objectClass=user)(!(objectClass=computer))(|"),
        "{filter}"
    );
    assert!(
        filter.contains("(userPrincipalName=alice@corp.test)"),
        "{filter}"
    );

    let (code, stdout, _) = seg(&[
        "map",
        "--config",
        config,
        "--cert",
        dave.cert_path.to_str().unwrap(),
        "--explain",
    ]);
    assert_eq!(code, 1, "{stdout}");
    for fact in [
        "chain        valid",
        "UPN        dave@corp.test",
        "enforcement  compatibility",
        "LDAP filter  (&(objectClass=user)(!(objectClass=computer))(|",
        "1. issuer-serial (strong)",
        "5. upn (weak)",
        "looked for  userPrincipalName=dave@corp.test",
        "weak mapping admitted in compatibility mode",
        "FAIL enabled      userAccountControl = 0x202",
        "DENY (reason: account-disabled)",
    ] {
        assert!(stdout.contains(fact), "missing {fact:?} in:\n{stdout}");
    }

    let (code, stdout, _) = seg(&[
        "map",
        "--config",
        config,
        "--cert",
        foreign.cert_path.to_str().unwrap(),
        "--explain",
    ]);
    assert_eq!(code, 1);
    assert!(stdout.contains("chain        INVALID"), "{stdout}");
    assert!(stdout.contains("reason: certificate-invalid"), "{stdout}");

    slapd.stop();
    let (code, stdout, _) = seg(&[
        "map",
        "--config",
        config,
        "--cert",
        alice.cert_path.to_str().unwrap(),
    ]);
    assert_eq!(code, 69, "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(json["decision"], "unavailable");
    assert_eq!(json["reason"], "directory-unavailable");
}

/// The Kerberos libraries (and headers) seg could reach, hidden by a `sh -c` prefix that
/// binds /dev/null over each file (or an empty directory over each folder) in a mount
/// namespace of its own, then runs the command: seg must not need them outside Kerberos mode.
fn without_kerberos(command: &str) -> String {
    let mut hide = String::new();
    for name in [
        "libgssapi_krb5.so.2",
        "libkrb5.so.3",
        "libk5crypto.so.3",
        "libkrb5support.so.0",
    ] {
        hide.push_str(&format!(
            "mount --bind /dev/null {} && ",
            installed_library(name)
        ));
    }
    for folder in ["/usr/include/gssapi", "/usr/include/krb5"] {
        if std::path::Path::new(folder).is_dir() {
            hide.push_str(&format!("mount -t tmpfs none {folder} && "));
        }
    }
    format!("{hide}exec {command}")
}

/// The demo, with every Kerberos library and header out of reach (a mount namespace).
#[tokio::test]
async fn the_demo_serves_maps_refuses_and_stops_cleanly() {
    let dir = TempDir::new("demo");
    let mut child = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(without_kerberos(&format!(
            "{SEG} demo --dir {} --listen 127.0.0.1:0 --admin 127.0.0.1:0",
            dir.path().display()
        )))
        .env("SEG_LOG", "off")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn seg demo (unshare: util-linux, as root)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    while let Some(Ok(line)) = lines.next() {
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("Ctrl-C") {
            break;
        }
    }
    let port = |marker: &str| -> u16 {
        let start = printed
            .find(marker)
            .unwrap_or_else(|| panic!("{marker} in {printed}"))
            + marker.len();
        printed[start..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let listen = port("serving on https://127.0.0.1:");
    let admin = port("(admin http://127.0.0.1:");
    for needle in [
        "curl --cacert",
        "devices/alice.pem",
        "devices/dave.pem",
        "devices/mallory.pem",
        "/metrics",
    ] {
        assert!(
            printed.contains(needle),
            "{needle} missing from:\n{printed}"
        );
    }

    let client = Client::new(
        format!("127.0.0.1:{listen}").parse().unwrap(),
        &dir.path().join("ca.pem"),
    );
    let device = |name: &str| {
        Device::from_files(
            name,
            &dir.path().join(format!("devices/{name}.pem")),
            &dir.path().join(format!("devices/{name}.key")),
        )
    };
    let response = client
        .post(
            Some(&device("alice")),
            &eas_target("FolderSync", "alice"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert!(
        response.text().contains("alice@demo.test"),
        "{}",
        response.text()
    );
    let response = client
        .post(Some(&device("bob")), &eas_target("Sync", "bob"), &[])
        .await
        .unwrap();
    assert!(
        response.text().contains("bob@demo.test"),
        "{}",
        response.text()
    );
    let response = client
        .post(Some(&device("dave")), &eas_target("Sync", "dave"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 403);
    let response = client
        .post(Some(&device("erin")), &eas_target("Sync", "erin"), &[])
        .await
        .unwrap();
    assert_eq!(response.status, 403);
    support::lab::assert_refused(
        client
            .post(Some(&device("mallory")), &eas_target("Sync", "alice"), &[])
            .await,
        "mallory's CA is not trusted",
    );
    let metrics =
        support::lab::http_get(format!("127.0.0.1:{admin}").parse().unwrap(), "/metrics").await;
    assert!(
        metrics.contains("seg_requests_total{command=\"FolderSync\",status_class=\"2xx\"} 1"),
        "{metrics}"
    );

    let response = client
        .post(
            Some(&device("alice")),
            "/Microsoft-Server-ActiveSync?Cmd=Ping&User=alice&DeviceId=AUDIT1&DeviceType=iPad",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200);

    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status().unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "demo exited with {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "demo did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_self_test_certificate_the_cas_refuse_stops_the_start() {
    let pki = Pki::new();
    let slapd = start_slapd(&pki, vec![]);
    let foreign = pki.foreign_device(
        "Elsewhere CA",
        LeafSpec::device("sample").upn("sample@corp.test"),
    );
    let text = config_text(
        &pki,
        &support::lab::DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]),
        "127.0.0.1:9".parse().unwrap(),
        "",
    )
    .replace(
        &format!("client_ca = \"{}\"", pki.ca_path.display()),
        &format!(
            "client_ca = \"{}\"\nself_test_certificate = \"{}\"",
            pki.ca_path.display(),
            foreign.cert_path.display()
        ),
    );
    let path = pki.dir.write("selftest.toml", &text);
    let (code, _, stderr) = seg(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("tls.self_test_certificate")
            && stderr.contains("refused by the configured client CAs"),
        "{stderr}"
    );
}

/// Where the dynamic loader finds `name` (`ldconfig -p`).
fn installed_library(name: &str) -> String {
    let out = Command::new("ldconfig")
        .arg("-p")
        .output()
        .expect("ldconfig");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit("=> ").next())
        .map(|p| p.trim().to_string())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: apt-get install libgssapi-krb5-2 (./tests/run.sh does)"
            )
        })
}

/// Kerberos mode opens MIT's GSSAPI library at run time. Hidden (a mount namespace with
/// /dev/null bound over the library file), `check-config` refuses a Kerberos configuration
/// with exit 64, naming the library and the package for Debian and RHEL, while a header-mode
/// configuration is untouched; with the library present the same configuration is valid.
#[test]
fn kerberos_mode_without_its_library_is_refused_naming_the_package() {
    let library = installed_library("libgssapi_krb5.so.2");
    let pki = Pki::new();
    let directory = support::lab::DirectoryRef {
        urls: vec!["ldaps://127.0.0.1:9".into()],
        base_dn: "DC=corp,DC=test".into(),
        bind_dn: "CN=svc-seg,CN=Users,DC=corp,DC=test".into(),
        password: "unused".into(),
    };
    let header = config_text(&pki, &directory, "127.0.0.1:9".parse().unwrap(), "");
    let keytab = pki
        .dir
        .write("seg.keytab", "read only at the first request");
    let kerberos = format!(
        "{header}\n[identity]\nmode = \"kerberos\"\n[identity.kerberos]\nkeytab = \"{}\"\nprincipal = \"svc-seg\"\nrealm = \"CORP.TEST\"\ntarget_spn = \"HTTP/eas.corp.test\"\n",
        keytab.display()
    );
    let header = pki.dir.write("header.toml", &header);
    let kerberos = pki.dir.write("kerberos.toml", &kerberos);
    let hidden = |config: &std::path::Path| {
        let out = Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(format!(
                "mount --bind /dev/null {library} && exec {SEG} check-config --config {}",
                config.display()
            ))
            .env("SEG_LOG", "off")
            .output()
            .expect("run unshare (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stderr.contains("mount:") && !stderr.contains("unshare:"),
            "hiding the library needs root and util-linux's unshare: {stderr}"
        );
        (out.status.code().unwrap_or(-1), stderr)
    };

    let (code, stdout, stderr) = seg(&["check-config", "--config", kerberos.to_str().unwrap()]);
    assert_eq!(code, 0, "with the library: {stdout}{stderr}");
    let (code, stderr) = hidden(&kerberos);
    assert_eq!(code, 64, "{stderr}");
    for needle in [
        "identity.mode = \"kerberos\"",
        "libgssapi_krb5.so.2",
        "libgssapi-krb5-2",
        "krb5-libs",
    ] {
        assert!(stderr.contains(needle), "{needle:?} missing from: {stderr}");
    }
    let (code, stderr) = hidden(&header);
    assert_eq!(code, 0, "header mode never opens the library: {stderr}");
}
