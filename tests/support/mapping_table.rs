//! The certificate-mapping table shared by the slapd and Samba AD suites: one row per
//! mapping form or policy case, with the expected outcome under full and compatibility
//! enforcement. The altSecurityIdentities strings are written here from the known inputs
//! (the lab CA's name, the serial and key id chosen for the row), not by seg.

use std::time::SystemTime;

use seg::demo::pki::LeafSpec;

use super::lab::{
    config_text, eas_target, metric_value, Client, Device, DirectoryRef, Pki, CA_AD_NAME,
};

/// What the gateway must do with a row's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Forwarded as this account (its UPN is `<sam>@corp.test`).
    Admit(&'static str),
    /// 403 with this reason code.
    Deny(&'static str),
}

/// The explicit mapping written into the account's `altSecurityIdentities`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    None,
    IssuerSerialReversed,
    IssuerSerialForward,
    SubjectKeyId,
    Sha1PublicKey,
    Sha1Thumbprint,
    IssuerSid,
    IssuerSubject,
    Subject,
    Rfc822,
}

/// The SID a certificate carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertSid {
    None,
    /// The account's SID, in the 1.3.6.1.4.1.311.25.2 extension.
    Extension,
    /// The account's SID, in a SAN URI.
    Uri,
    /// Another SID, in the extension.
    Foreign,
}

/// The UPN a certificate carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upn {
    None,
    Own,
    Of(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailForm {
    Mail,
    ProxyAddress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Normal,
    Disabled,
    Expired,
    Locked,
}

/// A second account the row needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Second {
    None,
    /// Holds the same binding: the mapping is ambiguous.
    Twin(&'static str),
    /// Owns the UPN in the certificate; a strong binding points elsewhere.
    Decoy(&'static str),
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// The account (sAMAccountName) the row is about; the certificate's CN unless a kiosk.
    pub account: &'static str,
    pub has_account: bool,
    pub binding: Binding,
    pub upn: Upn,
    pub email: Option<EmailForm>,
    pub sid: CertSid,
    pub state: State,
    /// The account is newer than the certificate (compatibility mode's event 40).
    pub created_after_cert: bool,
    pub computer: bool,
    pub second: Second,
    /// The certificate is a kiosk's (CN kiosk-7, OU Kiosks), for the many-to-one rule.
    pub kiosk: bool,
    pub full: Expect,
    pub compat: Expect,
}

const NO_STRONG: &str = "no-strong-mapping";

impl Row {
    fn new(account: &'static str, full: Expect, compat: Expect) -> Row {
        Row {
            account,
            has_account: true,
            binding: Binding::None,
            upn: Upn::None,
            email: None,
            sid: CertSid::None,
            state: State::Normal,
            created_after_cert: false,
            computer: false,
            second: Second::None,
            kiosk: false,
            full,
            compat,
        }
    }

    fn both(account: &'static str, expect: Expect) -> Row {
        Row::new(account, expect, expect)
    }

    fn bound(mut self, binding: Binding) -> Row {
        self.binding = binding;
        self
    }

    fn upn(mut self, upn: Upn) -> Row {
        self.upn = upn;
        self
    }

    fn sid(mut self, sid: CertSid) -> Row {
        self.sid = sid;
        self
    }

    fn state(mut self, state: State) -> Row {
        self.state = state;
        self
    }

    /// Every account the row creates (the primary first).
    pub fn accounts(&self) -> Vec<&'static str> {
        let mut accounts = Vec::new();
        if self.has_account {
            accounts.push(self.account);
        }
        match self.second {
            Second::Twin(a) | Second::Decoy(a) => accounts.push(a),
            Second::None => {}
        }
        accounts
    }

    pub fn serial(index: usize) -> Vec<u8> {
        vec![0x5a, index as u8, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06]
    }

    pub fn subject_key_id(index: usize) -> Vec<u8> {
        vec![0x11, index as u8, 0x22, 0x33, 0x44, 0x55]
    }

    fn common_name(&self) -> &'static str {
        if self.kiosk {
            "kiosk-7"
        } else {
            self.account
        }
    }

    /// The row's certificate. `own_sid` is the account's SID, `foreign_sid` another one.
    pub fn leaf(
        &self,
        index: usize,
        own_sid: &str,
        foreign_sid: &str,
        valid_from: Option<SystemTime>,
    ) -> LeafSpec {
        let mut spec = LeafSpec::device(self.common_name())
            .serial(&Row::serial(index))
            .subject_key_id(&Row::subject_key_id(index));
        match self.upn {
            Upn::None => {}
            Upn::Own => spec = spec.upn(&format!("{}@corp.test", self.account)),
            Upn::Of(other) => spec = spec.upn(&format!("{other}@corp.test")),
        }
        if self.email.is_some() || self.binding == Binding::Rfc822 {
            spec = spec.email(&format!("{}@corp.test", self.account));
        }
        match self.sid {
            CertSid::None => {}
            CertSid::Extension => spec = spec.sid_extension(own_sid),
            CertSid::Uri => spec = spec.sid_uri(own_sid),
            CertSid::Foreign => spec = spec.sid_extension(foreign_sid),
        }
        if self.kiosk {
            spec = spec.organizational_unit("Kiosks");
        }
        if let Some(from) = valid_from {
            spec = spec.valid_from(from);
        }
        spec
    }

    /// The altSecurityIdentities values for the primary account.
    pub fn binding_values(&self, index: usize, device: &Device, own_sid: &str) -> Vec<String> {
        let serial = Row::serial(index);
        let mut reversed = serial.clone();
        reversed.reverse();
        let hex = seg::identity::hex;
        let sha1 = |b: &[u8]| {
            hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, b).as_ref())
        };
        let cn = self.common_name();
        let value = match self.binding {
            Binding::None => return Vec::new(),
            Binding::IssuerSerialReversed => format!("X509:<I>{CA_AD_NAME}<SR>{}", hex(&reversed)),
            Binding::IssuerSerialForward => format!("X509:<I>{CA_AD_NAME}<SR>{}", hex(&serial)),
            // Upper-case hex: AD compares these strings case-insensitively.
            Binding::SubjectKeyId => format!(
                "X509:<SKI>{}",
                hex(&Row::subject_key_id(index)).to_uppercase()
            ),
            Binding::Sha1PublicKey => {
                let (_, cert) =
                    x509_parser::parse_x509_certificate(&device.issued.der).expect("certificate");
                format!(
                    "X509:<SHA1-PUKEY>{}",
                    sha1(&cert.public_key().subject_public_key.data)
                )
            }
            Binding::Sha1Thumbprint => format!("X509:<SHA1-PUKEY>{}", sha1(&device.issued.der)),
            Binding::IssuerSid => format!("X509:<I>{CA_AD_NAME}<SID>{own_sid}"),
            Binding::IssuerSubject => format!("X509:<I>{CA_AD_NAME}<S>CN={cn}"),
            Binding::Subject => format!("X509:<S>CN={cn}"),
            Binding::Rfc822 => format!("X509:<RFC822>{}@corp.test", self.account),
        };
        vec![value]
    }

    /// The altSecurityIdentities values for the second account.
    pub fn second_binding_values(
        &self,
        index: usize,
        device: &Device,
        own_sid: &str,
    ) -> Vec<String> {
        match self.second {
            Second::Twin(_) => self.binding_values(index, device, own_sid),
            Second::Decoy(_) | Second::None => Vec::new(),
        }
    }
}

/// Every row: each mapping form, SID binding, enforcement and account policy case.
pub fn rows() -> Vec<Row> {
    use Expect::{Admit, Deny};
    let weak = |account: &'static str| Row::new(account, Deny(NO_STRONG), Admit(account));
    let mut rows = vec![
        Row::both("sr-reversed", Admit("sr-reversed")).bound(Binding::IssuerSerialReversed),
        Row::both("sr-forward", Admit("sr-forward")).bound(Binding::IssuerSerialForward),
        Row::both("ski", Admit("ski")).bound(Binding::SubjectKeyId),
        Row::both("pukey", Admit("pukey")).bound(Binding::Sha1PublicKey),
        Row::both("thumbprint", Admit("thumbprint")).bound(Binding::Sha1Thumbprint),
        Row::both("issuer-sid", Admit("issuer-sid"))
            .bound(Binding::IssuerSid)
            .sid(CertSid::Extension),
        weak("issuer-subj").bound(Binding::IssuerSubject),
        weak("subject").bound(Binding::Subject),
        weak("rfc822").bound(Binding::Rfc822),
        weak("upn").upn(Upn::Own),
        Row {
            email: Some(EmailForm::Mail),
            ..weak("mail")
        },
        Row {
            email: Some(EmailForm::ProxyAddress),
            ..weak("proxy")
        },
        Row::both("upn-sid", Admit("upn-sid"))
            .upn(Upn::Own)
            .sid(CertSid::Extension),
        Row::both("upn-sid-uri", Admit("upn-sid-uri"))
            .upn(Upn::Own)
            .sid(CertSid::Uri),
        Row::both("upn-bad-sid", Deny("sid-mismatch"))
            .upn(Upn::Own)
            .sid(CertSid::Foreign),
        Row::both("sr-bad-sid", Deny("sid-mismatch"))
            .bound(Binding::IssuerSerialReversed)
            .sid(CertSid::Foreign),
        Row {
            created_after_cert: true,
            ..Row::new(
                "young",
                Deny(NO_STRONG),
                Deny("certificate-predates-account"),
            )
            .upn(Upn::Own)
        },
        Row::both("disabled", Deny("account-disabled"))
            .bound(Binding::IssuerSerialReversed)
            .state(State::Disabled),
        Row::both("expired", Deny("account-expired"))
            .bound(Binding::IssuerSerialReversed)
            .state(State::Expired),
        Row::both("locked", Deny("account-locked"))
            .bound(Binding::IssuerSerialReversed)
            .state(State::Locked),
        Row {
            has_account: false,
            ..Row::both("nobody", Deny("no-mapping")).upn(Upn::Own)
        },
        Row {
            second: Second::Twin("twin-b"),
            ..Row::both("twin-a", Deny("ambiguous-mapping")).bound(Binding::SubjectKeyId)
        },
        Row {
            second: Second::Decoy("decoy"),
            ..Row::both("strong-wins", Admit("strong-wins"))
                .bound(Binding::IssuerSerialReversed)
                .upn(Upn::Of("decoy"))
        },
        Row {
            computer: true,
            ..Row::both("pc1", Deny("no-mapping"))
                .upn(Upn::Own)
                .sid(CertSid::Extension)
        },
        Row {
            kiosk: true,
            ..Row::both("kiosk-shared", Admit("kiosk-shared"))
        },
    ];
    rows.shrink_to_fit();
    rows
}

/// Starts seg once per enforcement mode and checks every row in both; reports every
/// failing row at once.
pub async fn run_table(pki: &Pki, directory: &DirectoryRef, table: &[Row], devices: &[Device]) {
    let upstream = seg::demo::echo::EchoUpstream::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut failures = Vec::new();
    for mode in ["full", "compatibility"] {
        let template = config_text(pki, directory, upstream.addr, "");
        let lab_mapping = "[mapping]\n# The issue-2 suites map by UPN and email too; strong-mapping enforcement has its own table.\nenforcement = \"compatibility\"\n";
        assert!(
            template.contains(lab_mapping),
            "the lab config template changed:\n{template}"
        );
        let text = template.replace(
            lab_mapping,
            &format!(
                "[mapping]\nenforcement = \"{mode}\"\nrules = [\"issuer-serial\", \"subject-key-id\", \"sha1-public-key\", \"issuer-sid\", \"issuer-subject\", \"subject\", \"rfc822\", \"upn\", \"email\", \"many-to-one\"]\n\n[[mapping.many_to_one]]\nname = \"kiosks\"\nissuer = \"{CA_AD_NAME}\"\naccount = \"kiosk-shared\"\n[mapping.many_to_one.subject]\nOU = \"Kiosk*\"\n"
            ),
        );
        let path = pki.dir.write(&format!("table-{mode}.toml"), &text);
        let seg = super::lab::start_seg(&path).await;
        let client = Client::new(seg.listen_addr, &pki.ca_path);
        for (row, device) in table.iter().zip(devices) {
            let expect = if mode == "full" { row.full } else { row.compat };
            let before_upstream = upstream.requests().len();
            let before = seg.metrics.render();
            let response = client
                .post(Some(device), &eas_target("Sync", row.account), &[])
                .await;
            let after = seg.metrics.render();
            let status = match response {
                Ok(r) => r.status,
                Err(e) => {
                    failures.push(format!("{mode} {}: no response ({e})", row.account));
                    continue;
                }
            };
            match expect {
                Expect::Admit(account) => {
                    let seen = upstream.requests();
                    let identity = seen
                        .get(before_upstream)
                        .map(|r| r.header_values("x-remote-user").join(","));
                    if status != 200
                        || identity.as_deref() != Some(format!("{account}@corp.test").as_str())
                    {
                        failures.push(format!(
                            "{mode} {}: expected admit as {account}, got {status} as {identity:?}",
                            row.account
                        ));
                    }
                }
                Expect::Deny(reason) => {
                    let sample = format!(
                        "seg_identity_decisions_total{{decision=\"deny\",reason=\"{reason}\"}}"
                    );
                    let counted = metric_value(&after, &sample) - metric_value(&before, &sample);
                    if status != 403
                        || counted != 1.0
                        || upstream.requests().len() != before_upstream
                    {
                        failures.push(format!("{mode} {}: expected 403 {reason}, got {status} (reason counted {counted})", row.account));
                    }
                }
            }
        }
        seg.stop().await;
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        table.len() * 2,
        failures.join("\n")
    );
}
