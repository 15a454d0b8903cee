//! The mapping table against a real Active Directory: a Samba AD DC provisioned for this
//! run, its own objectSids, whenCreated, lockout and nested groups. One test function, so
//! the DC is provisioned once (only one Samba DC can run on a machine).

mod support;

use std::time::{Duration, SystemTime};

use base64::Engine as _;

use seg::demo::pki::LeafSpec;
use support::lab::{
    config_text, eas_target, metric_value, Client, Device, DirectoryRef, Pki, TlsVersion,
    CA_AD_NAME,
};
use support::mapping_table::{rows, run_table, EmailForm, Second, State};
use support::openssl_ca::OpensslCa;
use support::samba::Samba;

#[tokio::test]
async fn mapping_against_samba_ad() {
    let pki = Pki::new();
    let samba = Samba::start_with_pki(&pki);
    let directory = DirectoryRef {
        urls: vec![samba.ldaps_url()],
        base_dn: samba.base_dn().to_string(),
        bind_dn: samba.admin_dn(),
        password: samba.admin_password().to_string(),
    };

    // Golden: what AD stores for altSecurityIdentities is found case-insensitively, in the
    // exact forms seg writes.
    samba.create_user("golden", "golden@corp.test");
    let golden = format!("X509:<I>{CA_AD_NAME}<SR>0c000000000056282f83f958fccf0c00000062");
    samba.set_attribute(&samba.dn_of("golden"), "altSecurityIdentities", &[&golden]);
    let found = samba.search(
        &format!("(altSecurityIdentities={})", golden.to_uppercase()),
        &["sAMAccountName"],
    );
    assert!(
        found.contains("sAMAccountName: golden"),
        "AD did not match case-insensitively:\n{found}"
    );

    // Accounts first (AD assigns their SIDs and whenCreated), then certificates valid from
    // now, so every account predates its certificate, except the row that says otherwise.
    let table = rows();
    let mut sids = Vec::new();
    let mut young_certs = Vec::new();
    for (index, row) in table.iter().enumerate() {
        if row.created_after_cert {
            // Issued before its account exists: compatibility mode's event 40.
            let from = SystemTime::now() - Duration::from_secs(3600);
            young_certs.push((index, from));
        }
        for (n, account) in row.accounts().into_iter().enumerate() {
            if n == 0 && row.computer {
                let dn = samba.create_computer(account, &format!("{account}.corp.test"));
                samba.set_attribute(&dn, "userPrincipalName", &[&format!("{account}@corp.test")]);
            } else {
                samba.create_user(account, &format!("{account}@corp.test"));
            }
        }
        let primary = row.accounts().first().map(|a| {
            if row.computer {
                format!("{a}$")
            } else {
                a.to_string()
            }
        });
        sids.push(
            primary
                .map(|a| samba.object_sid(&a))
                .unwrap_or_else(|| "S-1-5-21-1-2-3-4".into()),
        );
    }
    let foreign_sid = samba.object_sid("golden");
    std::thread::sleep(Duration::from_millis(1100));
    let now = SystemTime::now();
    let mut devices = Vec::new();
    for (index, row) in table.iter().enumerate() {
        let from = young_certs
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, f)| *f)
            .unwrap_or(now);
        let device = pki.device(row.leaf(index, &sids[index], &foreign_sid, Some(from)));
        if row.has_account && !row.computer {
            let dn = samba.dn_of(row.account);
            let values = row.binding_values(index, &device, &sids[index]);
            if !values.is_empty() {
                let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                samba.set_attribute(&dn, "altSecurityIdentities", &refs);
            }
            match row.email {
                Some(EmailForm::Mail) => {
                    samba.set_attribute(&dn, "mail", &[&format!("{}@corp.test", row.account)])
                }
                Some(EmailForm::ProxyAddress) => samba.set_attribute(
                    &dn,
                    "proxyAddresses",
                    &[&format!("SMTP:{}@corp.test", row.account)],
                ),
                None => {}
            }
            match row.state {
                State::Normal => {}
                State::Disabled => samba.disable(row.account),
                State::Expired => samba.set_expired(row.account),
                State::Locked => samba.set_locked(row.account),
            }
        }
        if let Second::Twin(twin) = row.second {
            let values = row.second_binding_values(index, &device, &sids[index]);
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            samba.set_attribute(&samba.dn_of(twin), "altSecurityIdentities", &refs);
        }
        devices.push(device);
    }
    run_table(&pki, &directory, &table, &devices).await;

    group_policy(&pki, &samba, &directory).await;
    ntauth_store(&pki, &samba, &directory).await;
    ldap_distribution_points(&pki, &samba, &directory).await;
}

/// The URL AD CS writes for a CA's revocation list `attribute` (spaces escaped, commas not).
fn ad_cs_url(entry: &str, attribute: &str) -> String {
    format!(
        "ldap:///{}?{attribute}?base?objectClass=cRLDistributionPoint",
        entry.replace(' ', "%20")
    )
}

/// Revocation where AD CS publishes it: device certificates whose CRL distribution point and
/// Freshest CRL are `ldap:///` URLs into the forest's `CN=CDP` container, read by seg over its
/// own directory connections. A revocation published only in a delta CRL reaches a device's
/// open connection and its next handshake; a device the delta does not list is still served.
async fn ldap_distribution_points(pki: &Pki, samba: &Samba, directory: &DirectoryRef) {
    let ca = OpensslCa::new("Corp Test", "Corp Test Issuing CA");
    let entry = format!(
        "CN=Corp Test Issuing CA,CN=dc1,CN=CDP,CN=Public Key Services,CN=Services,CN=Configuration,{}",
        samba.base_dn()
    );
    let points = format!(
        "crlDistributionPoints = cdp\nfreshestCRL = fresh\n[cdp]\nfullname = @cdp_names\n[cdp_names]\nURI.0 = {}\n[fresh]\nfullname = @fresh_names\n[fresh_names]\nURI.0 = {}\n",
        ad_cs_url(&entry, "certificateRevocationList"),
        ad_cs_url(&entry, "deltaRevocationList"),
    );
    let mut devices = Vec::new();
    for sam in ["cdpalice", "cdpbob"] {
        let issued = ca.issue_device(sam, &points);
        samba.create_user(sam, &format!("{sam}@corp.test"));
        let mut reversed = issued.serial.clone();
        reversed.reverse();
        let value = format!("X509:<I>{CA_AD_NAME}<SR>{}", seg::identity::hex(&reversed));
        samba.set_attribute(&samba.dn_of(sam), "altSecurityIdentities", &[&value]);
        devices.push(issued);
    }
    // Published as `certutil -dspublish` does: a base CRL and its (empty) delta.
    let crl = ca.dir.path().join("published.crl");
    let b64 = |path: &std::path::Path| {
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap())
    };
    let base_number = ca.next_crl_number();
    ca.write_crl_der(&crl, 3600);
    let base = b64(&crl);
    // Refreshed at 80 % of its 10 s: the revocation below arrives within a refresh.
    ca.write_delta_crl_der(&crl, 10, base_number);
    samba.modify(&format!(
        "dn: CN=dc1,CN=CDP,CN=Public Key Services,CN=Services,CN=Configuration,{}\nchangetype: add\nobjectClass: container\ncn: dc1\n\ndn: {entry}\nchangetype: add\nobjectClass: cRLDistributionPoint\ncn: Corp Test Issuing CA\ncertificateRevocationList:: {base}\ndeltaRevocationList:: {}\n",
        samba.base_dn(),
        b64(&crl)
    ));

    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let text = support::lab::trusting(
        &config_text(
            pki,
            directory,
            upstream.addr,
            "\n[revocation]\ncrl_distribution_points = true\n",
        ),
        pki,
        &ca.cert,
    );
    let path = pki.dir.write("ad-cdp.toml", &text);
    let seg = support::lab::start_seg(&path).await;
    let client = Client::new(seg.listen_addr, &pki.ca_path);
    let alice = Device::from_files("cdpalice", &devices[0].cert, &devices[0].key);
    let bob = Device::from_files("cdpbob", &devices[1].cert, &devices[1].key);
    let mut alice_held = client.connect(Some(&alice), TlsVersion::Any).await.unwrap();
    let mut bob_held = client.connect(Some(&bob), TlsVersion::Any).await.unwrap();
    for (held, sam) in [(&mut alice_held, "cdpalice"), (&mut bob_held, "cdpbob")] {
        let r = held
            .request("POST", &eas_target("Sync", sam), &[], b"")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{sam}: {}", r.text());
    }
    let m = seg.metrics.render();
    assert!(
        metric_value(&m, "seg_crl_fetches_total{result=\"ok\"}") >= 2.0,
        "the base and its delta were read from the directory"
    );
    assert_eq!(
        metric_value(&m, "seg_crl_fetches_total{result=\"unsupported\"}"),
        0.0
    );

    // Alice revoked; only a new delta is published (the base stays as it was).
    ca.revoke(&devices[0]);
    ca.write_delta_crl_der(&crl, 3600, base_number);
    samba.modify(&format!(
        "dn: {entry}\nchangetype: modify\nreplace: deltaRevocationList\ndeltaRevocationList:: {}\n-\n",
        b64(&crl)
    ));
    let status = alice_held
        .post_while(&eas_target("Sync", "cdpalice"), 200, 80)
        .await;
    assert_eq!(
        status, 403,
        "the delta CRL did not reach alice's open connection"
    );
    support::lab::assert_alert(
        client
            .post(Some(&alice), &eas_target("Sync", "cdpalice"), &[])
            .await,
        "CertificateRevoked",
        "revoked by the delta CRL at the handshake",
    );
    let r = bob_held
        .request("POST", &eas_target("Sync", "cdpbob"), &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "bob is not in the delta");
    let r = client
        .post(Some(&bob), &eas_target("Sync", "cdpbob"), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "bob's new handshake");
    seg.stop().await;
}

/// The forest's NTAuth store, published as `certutil -dspublish -f ca.cer NTAuthCA` does
/// (an AD `certificationAuthority` with placeholder revocation lists), found by seg under the
/// RootDSE's configurationNamingContext, and a change to it taking effect without a restart.
async fn ntauth_store(pki: &Pki, samba: &Samba, directory: &DirectoryRef) {
    samba.create_user("ntauser", "ntauser@corp.test");
    let serial = [0x77, 0x01, 0x02];
    let mut reversed = serial.to_vec();
    reversed.reverse();
    let value = format!("X509:<I>{CA_AD_NAME}<SR>{}", seg::identity::hex(&reversed));
    samba.set_attribute(&samba.dn_of("ntauser"), "altSecurityIdentities", &[&value]);
    let device = pki.device(LeafSpec::device("ntauser").serial(&serial));
    let b64 = |der: &[u8]| base64::engine::general_purpose::STANDARD.encode(der);
    let dn = format!(
        "CN=NTAuthCertificates,CN=Public Key Services,CN=Services,CN=Configuration,{}",
        samba.base_dn()
    );
    samba.modify(&format!(
        "dn: {dn}\nchangetype: add\nobjectClass: certificationAuthority\ncn: NTAuthCertificates\ncACertificate:: {}\ncertificateRevocationList:: AA==\nauthorityRevocationList:: AA==\n",
        b64(&pki.ca.der())
    ));
    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let text = support::lab::replace_ntauth(
        &config_text(pki, directory, upstream.addr, ""),
        "[ntauth]\ndirectory = true\nrefresh = \"1s\"\n",
    );
    let path = pki.dir.write("ad-ntauth.toml", &text);
    let seg = support::lab::start_seg(&path).await;
    let client = Client::new(seg.listen_addr, &pki.ca_path);
    let status = |expected: u16| {
        let client = &client;
        let device = &device;
        async move {
            let mut status = 0;
            for _ in 0..50 {
                status = client
                    .post(Some(device), &eas_target("Sync", "ntauser"), &[])
                    .await
                    .unwrap()
                    .status;
                if status == expected {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            status
        }
    };
    assert_eq!(
        status(200).await,
        200,
        "the device's CA is in the forest's NTAuth store"
    );
    // Another CA replaces it in the store: the device is refused within a refresh.
    let other = seg::demo::pki::CertAuthority::new("Elsewhere", "Elsewhere CA").unwrap();
    samba.modify(&format!(
        "dn: {dn}\nchangetype: modify\nreplace: cACertificate\ncACertificate:: {}\n-\n",
        b64(&other.der())
    ));
    assert_eq!(status(403).await, 403, "its CA left the NTAuth store");
    let m = seg.metrics.render();
    assert!(
        metric_value(
            &m,
            "seg_identity_decisions_total{decision=\"deny\",reason=\"ca-not-in-ntauth\"}"
        ) >= 1.0
    );
    seg.stop().await;
}

/// Nested groups through the in-chain rule and tokenGroups, as only AD evaluates them.
async fn group_policy(pki: &Pki, samba: &Samba, directory: &DirectoryRef) {
    let outer = samba.create_group("EAS Users");
    let inner = samba.create_group("EAS Phones");
    let blocked = samba.create_group("EAS Blocked");
    samba.add_member("EAS Users", "EAS Phones");
    let mut devices = Vec::new();
    for (index, (sam, groups)) in [
        ("nested", vec!["EAS Phones"]),
        ("outsider", vec![]),
        ("barred", vec!["EAS Phones", "EAS Blocked"]),
    ]
    .into_iter()
    .enumerate()
    {
        samba.create_user(sam, &format!("{sam}@corp.test"));
        for g in groups {
            samba.add_member(g, sam);
        }
        let serial = [0x44, index as u8, 0x55, 0x66];
        let mut reversed = serial.to_vec();
        reversed.reverse();
        let value = format!("X509:<I>{CA_AD_NAME}<SR>{}", seg::identity::hex(&reversed));
        samba.set_attribute(&samba.dn_of(sam), "altSecurityIdentities", &[&value]);
        devices.push(pki.device(LeafSpec::device(sam).serial(&serial)));
    }
    let direct = samba.search_scoped(
        &samba.dn_of("nested"),
        "base",
        "(objectClass=*)",
        &["memberOf"],
    );
    assert!(
        !direct.to_lowercase().contains("cn=eas users"),
        "nesting must not be direct:\n{direct}"
    );
    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    for (method, expected) in [
        ("in-chain", [200, 403, 403]),
        ("token-groups", [200, 403, 403]),
        // Direct memberOf does not see the nesting: the nested member is refused.
        ("member-of", [403, 403, 403]),
    ] {
        let extra = format!(
            "[account]\nrequired_groups = [\"{outer}\"]\ndenied_groups = [\"{blocked}\"]\ngroup_method = \"{method}\"\n"
        );
        let path = pki.dir.write(
            &format!("ad-groups-{method}.toml"),
            &config_text(pki, directory, upstream.addr, &extra),
        );
        let seg = support::lab::start_seg(&path).await;
        let client = Client::new(seg.listen_addr, &pki.ca_path);
        for (device, status) in devices.iter().zip(expected) {
            let response = client
                .post(Some(device), &eas_target("Sync", &device.name), &[])
                .await
                .unwrap();
            assert_eq!(response.status, status, "{method} {}", device.name);
        }
        let m = seg.metrics.render();
        let denied = metric_value(
            &m,
            "seg_identity_decisions_total{decision=\"deny\",reason=\"group-denied\"}",
        );
        if method != "member-of" {
            assert_eq!(
                denied, 1.0,
                "{method}: the barred user is refused for the denied group"
            );
        }
        seg.stop().await;
    }
    let _ = inner;
}
