//! The blocking GSSAPI calls, on MIT's libgssapi_krb5: the gateway's credential from its
//! keytab, S4U2Self (impersonation) and S4U2Proxy (a SPNEGO context to the target).
//!
//! Every function here blocks on the KDC and must run on a blocking thread. SPNEGO is in the
//! mechanism set of the gateway credential *and* of the impersonation: without it MIT builds
//! the SPNEGO token from the gateway's own credential and the upstream authenticates the
//! gateway account instead of the user.

use std::ffi::CString;
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use libgssapi::context::{ClientCtx, CtxFlags};
use libgssapi::credential::{Cred, CredUsage};
use libgssapi::error::Error as GssError;
use libgssapi::name::Name;
use libgssapi::oid::{OidSet, GSS_MECH_KRB5, GSS_MECH_SPNEGO, GSS_NT_KRB5_PRINCIPAL};
use libgssapi_sys as sys;

/// A failed GSSAPI call: its status codes (what decisions are made of) and its text (for
/// the log only).
#[derive(Debug, Clone)]
pub struct GssFailure {
    pub major: u32,
    /// For the Kerberos mechanism: the krb5 error code (`KRB5KDC_ERR_*`) as `i32`.
    pub minor: i32,
    pub message: String,
}

impl From<GssError> for GssFailure {
    fn from(e: GssError) -> GssFailure {
        GssFailure {
            major: e.major.bits(),
            minor: e.minor as i32,
            message: e.to_string(),
        }
    }
}

impl std::fmt::Display for GssFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (major {:#x}, minor {})",
            self.message.trim(),
            self.major,
            self.minor
        )
    }
}

/// The gateway's own initiator credential, read from its keytab.
#[derive(Clone)]
pub struct GatewayCredential(Cred);

/// A credential for one user, obtained by S4U2Self, usable only toward services the gateway
/// may delegate to.
#[derive(Clone)]
pub struct UserCredential(Cred);

/// Kerberos and SPNEGO, the mechanisms every credential here is acquired for.
fn mechanisms() -> Result<OidSet, GssFailure> {
    let mut set = OidSet::new();
    set.add(GSS_MECH_KRB5)?;
    set.add(GSS_MECH_SPNEGO)?;
    Ok(set)
}

/// The gateway credential for `principal` from `keytab`, with its tickets in the memory
/// cache `ccache` (`gss_acquire_cred_from`, MIT's credential store: no environment
/// variables, nothing on disk). No KDC is contacted until the credential is first used.
pub fn acquire_gateway(
    keytab: &Path,
    principal: &str,
    ccache: &str,
) -> Result<GatewayCredential, GssFailure> {
    let keytab = c_string(&format!("FILE:{}", keytab.display()))?;
    let ccache = c_string(ccache)?;
    let elements = [
        sys::gss_key_value_element_desc {
            key: c"client_keytab".as_ptr(),
            value: keytab.as_ptr(),
        },
        sys::gss_key_value_element_desc {
            key: c"ccache".as_ptr(),
            value: ccache.as_ptr(),
        },
    ];
    let store = sys::gss_key_value_set_desc {
        count: elements.len() as u32,
        elements: elements.as_ptr().cast_mut(),
    };
    // The safe binding has no gss_acquire_cred_from, so the name and the mechanism set are
    // made here with the C calls too, and released by their guards.
    let name = RawName::import(principal)?;
    let mechs = RawOidSet::krb5_and_spnego()?;
    let mut minor: u32 = 0;
    let mut cred: sys::gss_cred_id_t = ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call; `cred` receives a new
    // credential that `Cred::from_c` takes sole ownership of.
    let major = unsafe {
        sys::gss_acquire_cred_from(
            &mut minor,
            name.0,
            sys::_GSS_C_INDEFINITE,
            mechs.0,
            sys::GSS_C_INITIATE as sys::gss_cred_usage_t,
            &store,
            &mut cred,
            ptr::null_mut(),
            ptr::null_mut(),
        )
    };
    check(major, minor)?;
    // SAFETY: gss_acquire_cred_from succeeded and returned a credential we now own.
    Ok(GatewayCredential(unsafe { Cred::from_c(cred) }))
}

/// S4U2Self: a credential for `user` (`sAMAccountName@REALM`) obtained with the gateway's.
///
/// On failure the exchange is repeated for the Kerberos mechanism alone, for its status:
/// MIT's mechanism glue renumbers a minor status that SPNEGO passes on from Kerberos (a
/// code already seen from the Kerberos mechanism gets a new number), and decisions are
/// made by the Kerberos error code.
pub fn impersonate(gateway: &GatewayCredential, user: &str) -> Result<UserCredential, GssFailure> {
    let name = Name::new(user.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))?;
    let mechs = mechanisms()?;
    match gateway
        .0
        .impersonate(&name, None, CredUsage::Initiate, Some(&mechs))
    {
        Ok(cred) => Ok(UserCredential(cred)),
        Err(spnego) => {
            let krb5_only = OidSet::singleton(GSS_MECH_KRB5)?;
            match gateway
                .0
                .impersonate(&name, None, CredUsage::Initiate, Some(&krb5_only))
            {
                Err(krb5) => Err(krb5.into()),
                Ok(_) => Err(spnego.into()),
            }
        }
    }
}

/// The S4U2Proxy exchange for a fresh credential: a Kerberos (not SPNEGO) context to
/// `target`, whose service ticket the credential keeps for the SPNEGO tokens that follow.
/// Kerberos directly, so that a refusal comes back with its own Kerberos error code.
pub fn delegate(credential: &UserCredential, target: &str) -> Result<(), GssFailure> {
    let target = Name::new(target.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))?;
    let mut context = ClientCtx::new(
        Some(credential.0.clone()),
        target,
        CtxFlags::empty(),
        Some(GSS_MECH_KRB5),
    );
    context.step(None, None)?;
    Ok(())
}

/// One SPNEGO token for `target` (`HTTP/host@REALM`) as the user, from the service ticket
/// [`delegate`] cached (S4U2Proxy again only if that ticket is gone).
pub fn token(credential: &UserCredential, target: &str) -> Result<Vec<u8>, GssFailure> {
    let target = Name::new(target.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))?;
    let mut context = ClientCtx::new(
        Some(credential.0.clone()),
        target,
        CtxFlags::empty(),
        Some(GSS_MECH_SPNEGO),
    );
    match context.step(None, None)? {
        Some(token) => Ok(token.to_vec()),
        None => Err(GssFailure {
            major: 0,
            minor: 0,
            message: "SPNEGO produced no initial token".into(),
        }),
    }
}

/// A token for `target` from the gateway's own credential (not delegated), with a ticket
/// cache of its own that is destroyed afterwards: one AS and one TGS exchange, the readiness
/// probe of the KDC, the keytab and the target SPN.
pub fn probe(keytab: &Path, principal: &str, target: &str) -> Result<(), GssFailure> {
    static PROBES: AtomicUsize = AtomicUsize::new(0);
    let ccache = format!(
        "MEMORY:seg-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    let result = (|| {
        let gateway = acquire_gateway(keytab, principal, &ccache)?;
        let target = Name::new(target.as_bytes(), Some(GSS_NT_KRB5_PRINCIPAL))?;
        let mut context = ClientCtx::new(
            Some(gateway.0.clone()),
            target,
            CtxFlags::empty(),
            Some(GSS_MECH_KRB5),
        );
        context.step(None, None)?;
        Ok(())
    })();
    // MIT keeps a MEMORY cache for the life of the process unless it is destroyed.
    destroy_ccache(&ccache);
    result
}

/// What is left of the credential's ticket lifetime.
pub fn lifetime(credential: &UserCredential) -> Result<Duration, GssFailure> {
    Ok(credential.0.lifetime()?)
}

fn c_string(text: &str) -> Result<CString, GssFailure> {
    CString::new(text).map_err(|_| GssFailure {
        major: sys::_GSS_S_FAILURE,
        minor: 0,
        message: format!("{text:?} holds a NUL byte"),
    })
}

fn check(major: u32, minor: u32) -> Result<(), GssFailure> {
    if major == sys::GSS_S_COMPLETE {
        return Ok(());
    }
    Err(GssError {
        major: libgssapi::error::MajorFlags::from_bits_retain(major),
        minor,
    }
    .into())
}

/// A `gss_name_t` imported as a Kerberos principal, released on drop.
struct RawName(sys::gss_name_t);

impl RawName {
    fn import(principal: &str) -> Result<RawName, GssFailure> {
        let mut oid = oid_desc(KRB5_NT_PRINCIPAL_NAME);
        let mut buffer = sys::gss_buffer_desc {
            length: principal.len(),
            value: principal.as_ptr().cast_mut().cast(),
        };
        let mut minor = 0;
        let mut name: sys::gss_name_t = ptr::null_mut();
        // SAFETY: the buffer and OID outlive the call, which copies them.
        let major = unsafe { sys::gss_import_name(&mut minor, &mut buffer, &mut oid, &mut name) };
        check(major, minor)?;
        Ok(RawName(name))
    }
}

impl Drop for RawName {
    fn drop(&mut self) {
        let mut minor = 0;
        // SAFETY: the name was made by gss_import_name and is released once.
        unsafe { sys::gss_release_name(&mut minor, &mut self.0) };
    }
}

/// A `gss_OID_set`, released on drop.
struct RawOidSet(sys::gss_OID_set);

impl RawOidSet {
    fn krb5_and_spnego() -> Result<RawOidSet, GssFailure> {
        let mut minor = 0;
        let mut set = RawOidSet(ptr::null_mut());
        // SAFETY: the set is created empty, then each OID (valid for the call) is copied in.
        check(
            unsafe { sys::gss_create_empty_oid_set(&mut minor, &mut set.0) },
            minor,
        )?;
        for der in [MECH_KRB5, MECH_SPNEGO] {
            let mut oid = oid_desc(der);
            check(
                unsafe { sys::gss_add_oid_set_member(&mut minor, &mut oid, &mut set.0) },
                minor,
            )?;
        }
        Ok(set)
    }
}

impl Drop for RawOidSet {
    fn drop(&mut self) {
        if !self.0.is_null() {
            let mut minor = 0;
            // SAFETY: the set was made by gss_create_empty_oid_set and is released once.
            unsafe { sys::gss_release_oid_set(&mut minor, &mut self.0) };
        }
    }
}

/// 1.2.840.113554.1.2.2, 1.3.6.1.5.5.2 and 1.2.840.113554.1.2.2.1, DER contents.
const MECH_KRB5: &[u8] = b"\x2a\x86\x48\x86\xf7\x12\x01\x02\x02";
const MECH_SPNEGO: &[u8] = b"\x2b\x06\x01\x05\x05\x02";
const KRB5_NT_PRINCIPAL_NAME: &[u8] = b"\x2a\x86\x48\x86\xf7\x12\x01\x02\x02\x01";

fn oid_desc(der: &'static [u8]) -> sys::gss_OID_desc {
    sys::gss_OID_desc {
        length: der.len() as u32,
        elements: der.as_ptr().cast_mut().cast(),
    }
}

// The two krb5 calls needed to destroy a memory ticket cache; libgssapi_krb5 links libkrb5.
#[link(name = "krb5")]
unsafe extern "C" {
    fn krb5_init_context(context: *mut *mut std::ffi::c_void) -> i32;
    fn krb5_free_context(context: *mut std::ffi::c_void);
    fn krb5_cc_resolve(
        context: *mut std::ffi::c_void,
        name: *const std::ffi::c_char,
        cache: *mut *mut std::ffi::c_void,
    ) -> i32;
    fn krb5_cc_destroy(context: *mut std::ffi::c_void, cache: *mut std::ffi::c_void) -> i32;
}

fn destroy_ccache(name: &str) {
    let Ok(name) = CString::new(name) else {
        return;
    };
    let mut context = ptr::null_mut();
    // SAFETY: a context of our own, the cache resolved in it and destroyed (which also
    // closes it), then the context freed.
    unsafe {
        if krb5_init_context(&mut context) != 0 {
            return;
        }
        let mut cache = ptr::null_mut();
        if krb5_cc_resolve(context, name.as_ptr(), &mut cache) == 0 {
            krb5_cc_destroy(context, cache);
        }
        krb5_free_context(context);
    }
}
