//! Certificate mapping as strict as a domain controller: every mapping form under both
//! enforcement modes, end to end through real TLS handshakes to the echo upstream, against
//! a real slapd with the AD-named schema. The same table runs against a real Samba AD DC
//! in `tests/mapping_ad.rs`.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use seg::demo::pki::LeafSpec;
use support::lab::{config_text, eas_target, metric_value, Client, DirectoryRef, Pki, CA_AD_NAME};
use support::mapping_table::{rows, run_table, EmailForm, State};
use support::slapd::{Slapd, SlapdOptions, TlsFiles, UserSpec};

/// Golden strings: the exact altSecurityIdentities values for a known certificate, as an AD
/// administrator would write them (issuer most significant RDN first, serial byte-reversed).
#[test]
fn golden_alt_security_identities_strings() {
    let pki = Pki::new();
    let serial = [
        0x62, 0x00, 0x00, 0x00, 0x0c, 0xcf, 0xfc, 0x58, 0xf9, 0x83, 0x2f, 0x28, 0x56, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x0c,
    ];
    let device = pki.device(
        LeafSpec::device("golden")
            .serial(&serial)
            .subject_key_id(&[0xab, 0xcd, 0xef])
            .email("golden@corp.test")
            .organizational_unit("Phones"),
    );
    let facts = seg::identity::CertFacts::from_der(&device.issued.der).unwrap();
    let config = seg::config::MappingConfig {
        rules: seg::identity::MappingRule::ALL.to_vec(),
        enforcement: seg::config::Enforcement::Full,
        many_to_one: vec![],
    };
    let values = |rule: seg::identity::MappingRule| -> Vec<String> {
        rule.conditions(&facts, &config.many_to_one)
            .unwrap()
            .into_iter()
            .map(|c| format!("{}={}", c.attribute, c.value))
            .collect()
    };
    use seg::identity::MappingRule as R;
    assert_eq!(
        values(R::IssuerSerial),
        [
            "altSecurityIdentities=X509:<I>O=Corp Test,CN=Corp Test Issuing CA<SR>0c000000000056282f83f958fccf0c00000062",
            "altSecurityIdentities=X509:<I>O=Corp Test,CN=Corp Test Issuing CA<SR>620000000ccffc58f9832f285600000000000c",
        ]
    );
    assert_eq!(
        values(R::SubjectKeyId),
        ["altSecurityIdentities=X509:<SKI>abcdef"]
    );
    assert_eq!(
        values(R::IssuerSubject),
        ["altSecurityIdentities=X509:<I>O=Corp Test,CN=Corp Test Issuing CA<S>CN=golden,OU=Phones"]
    );
    assert_eq!(
        values(R::Subject),
        ["altSecurityIdentities=X509:<S>CN=golden,OU=Phones"]
    );
    assert_eq!(
        values(R::Rfc822),
        ["altSecurityIdentities=X509:<RFC822>golden@corp.test"]
    );
    assert_eq!(
        values(R::Email),
        [
            "mail=golden@corp.test",
            "proxyAddresses=smtp:golden@corp.test"
        ]
    );
    // SHA1-PUKEY: both readings, computed here independently of seg.
    let (_, cert) = x509_parser::parse_x509_certificate(&device.issued.der).unwrap();
    let sha1 = |b: &[u8]| {
        seg::identity::hex(
            ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, b).as_ref(),
        )
    };
    assert_eq!(
        values(R::Sha1PublicKey),
        [
            format!(
                "altSecurityIdentities=X509:<SHA1-PUKEY>{}",
                sha1(&cert.public_key().subject_public_key.data)
            ),
            format!(
                "altSecurityIdentities=X509:<SHA1-PUKEY>{}",
                sha1(&device.issued.der)
            ),
        ]
    );
}

fn filetime(unix: i64) -> i64 {
    (unix + 11_644_473_600) * 10_000_000
}

/// The table on slapd: SIDs are chosen here, certificates issued before slapd loads the
/// accounts (whenCreated is written: 2020, or 2099 for an account newer than its certificate).
#[tokio::test]
async fn the_mapping_table_on_slapd() {
    let pki = Pki::new();
    let table = rows();
    let sid = |n: usize| format!("S-1-5-21-7-8-9-{}", 2000 + n);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut users = Vec::new();
    let mut devices = Vec::new();
    for (index, row) in table.iter().enumerate() {
        let device = pki.device(row.leaf(index, &sid(index), &sid(900 + index), None));
        for (n, account) in row.accounts().into_iter().enumerate() {
            let mut user = UserSpec::new(account);
            user.upn = Some(format!("{account}@corp.test"));
            user.object_sid = seg::identity::sid_from_text(&sid(index + 500 * n));
            user.when_created = Some(
                if row.created_after_cert {
                    "20990101000000.0Z"
                } else {
                    "20200101000000.0Z"
                }
                .into(),
            );
            if n == 0 {
                user.computer = row.computer;
                match row.state {
                    State::Normal => {}
                    State::Disabled => user.user_account_control = 514,
                    State::Expired => user.account_expires = Some(filetime(now - 86_400)),
                    State::Locked => user.lockout_time = Some(filetime(now - 60)),
                }
                user.alt_security_identities = row.binding_values(index, &device, &sid(index));
                match row.email {
                    Some(EmailForm::Mail) => user.mail = Some(format!("{account}@corp.test")),
                    Some(EmailForm::ProxyAddress) => {
                        user.proxy_addresses = vec![format!("SMTP:{account}@corp.test")]
                    }
                    None => {}
                }
            } else {
                user.alt_security_identities =
                    row.second_binding_values(index, &device, &sid(index));
            }
            users.push(user);
        }
        devices.push(device);
    }
    let slapd = Slapd::start(SlapdOptions {
        users,
        bind_password: "svc-password".into(),
        tls: Some(TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            ca: pki.ca_path.clone(),
        }),
        ..SlapdOptions::default()
    });
    let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
    run_table(&pki, &directory, &table, &devices).await;
}

/// Required and denied groups by direct memberOf on slapd; the in-chain method, which slapd
/// cannot evaluate (it silently returns no entries), is refused loudly instead: 503, never a
/// quiet "not a member".
#[tokio::test]
async fn group_policy_on_slapd() {
    let pki = Pki::new();
    let groups = "OU=Groups,DC=corp,DC=test";
    let mut users = Vec::new();
    let mut devices = Vec::new();
    for (index, (sam, member_of)) in [
        ("member", vec![format!("CN=EAS Users,{groups}")]),
        ("outsider", vec![]),
        (
            "blocked",
            vec![
                format!("CN=EAS Users,{groups}"),
                format!("CN=Blocked,{groups}"),
            ],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let serial = [0x33, index as u8, 0x44, 0x55];
        let mut reversed = serial.to_vec();
        reversed.reverse();
        let mut user = UserSpec::new(sam);
        user.upn = Some(format!("{sam}@corp.test"));
        user.member_of = member_of;
        user.alt_security_identities = vec![format!(
            "X509:<I>{CA_AD_NAME}<SR>{}",
            seg::identity::hex(&reversed)
        )];
        users.push(user);
        devices.push(pki.device(LeafSpec::device(sam).serial(&serial)));
    }
    let slapd = Slapd::start(SlapdOptions {
        users,
        bind_password: "svc-password".into(),
        tls: Some(TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            ca: pki.ca_path.clone(),
        }),
        ..SlapdOptions::default()
    });
    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let directory = DirectoryRef::slapd(&slapd, &[slapd.ldaps_url()]);
    for (method, expected) in [
        ("member-of", [200, 403, 403]),
        ("in-chain", [503, 503, 503]),
    ] {
        let extra = format!(
            "[account]\nrequired_groups = [\"CN=EAS Users,{groups}\"]\ndenied_groups = [\"cn=blocked, {}\"]\ngroup_method = \"{method}\"\n",
            groups.to_lowercase()
        );
        let path = pki.dir.write(
            &format!("groups-{method}.toml"),
            &config_text(&pki, &directory, upstream.addr, &extra),
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
        if method == "member-of" {
            assert_eq!(
                metric_value(
                    &m,
                    "seg_identity_decisions_total{decision=\"deny\",reason=\"group-required\"}"
                ),
                1.0
            );
            assert_eq!(
                metric_value(
                    &m,
                    "seg_identity_decisions_total{decision=\"deny\",reason=\"group-denied\"}"
                ),
                1.0
            );
        } else {
            assert_eq!(
                metric_value(
                    &m,
                    "seg_identity_decisions_total{decision=\"deny\",reason=\"group-required\"}"
                ),
                0.0
            );
        }
        seg.stop().await;
    }
    assert_eq!(
        upstream.requests().len(),
        1,
        "only the member reached the upstream"
    );
}
