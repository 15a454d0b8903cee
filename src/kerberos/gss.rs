//! The blocking GSSAPI calls, on MIT's libgssapi_krb5 loaded at run time: the gateway's
//! credential from its keytab, S4U2Self (impersonation) and S4U2Proxy (a SPNEGO context to
//! the target).
//!
//! The library is opened (`libgssapi_krb5.so.2`, and `libkrb5.so.3` for the two calls that
//! destroy a memory ticket cache) the first time a configuration asks for
//! `identity.mode = "kerberos"` ([`load`]), so seg builds with a Rust toolchain and a C
//! compiler alone and runs in header mode where no Kerberos library is installed. The calls
//! are the stable C ABI of RFC 2744 plus MIT's credential-store extension
//! (`gss_acquire_cred_from`) and S4U (`gss_acquire_cred_impersonate_name`); the structs are
//! declared here with their C layout, checked by the tests. Every handle is owned by one Rust
//! value and released once, when it drops.
//!
//! Every function here blocks on the KDC and must run on a blocking thread. SPNEGO is in the
//! mechanism set of the gateway credential *and* of the impersonation: without it MIT builds
//! the SPNEGO token from the gateway's own credential and the upstream authenticates the
//! gateway account instead of the user.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::Path;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libloading::Library;

/// What the library is opened as; the package that installs it, for the error.
const GSSAPI_LIBRARY: &str = "libgssapi_krb5.so.2";
const KRB5_LIBRARY: &str = "libkrb5.so.3";
const INSTALL_HINT: &str =
    "install MIT Kerberos: apt-get install libgssapi-krb5-2 (Debian, Ubuntu) or dnf install krb5-libs (RHEL)";

// RFC 2744's types, as MIT declares them on Linux (gssapi/gssapi.h).
type OmUint32 = u32;
type GssName = *mut c_void;
type GssCred = *mut c_void;
type GssCtx = *mut c_void;

#[repr(C)]
struct BufferDesc {
    length: usize,
    value: *mut c_void,
}

#[repr(C)]
struct OidDesc {
    length: OmUint32,
    elements: *mut c_void,
}

#[repr(C)]
struct OidSetDesc {
    count: usize,
    elements: *mut OidDesc,
}

#[repr(C)]
struct KeyValueElement {
    key: *const c_char,
    value: *const c_char,
}

#[repr(C)]
struct KeyValueSet {
    count: OmUint32,
    elements: *const KeyValueElement,
}

/// Calling and routine errors; the low 16 bits are supplementary information.
const GSS_ERROR_MASK: OmUint32 = 0xffff_0000;
const GSS_S_FAILURE: OmUint32 = 13 << 16;
const GSS_C_INDEFINITE: OmUint32 = 0xffff_ffff;
const GSS_C_INITIATE: c_int = 1;
const GSS_C_GSS_CODE: c_int = 1;
const GSS_C_MECH_CODE: c_int = 2;

/// 1.2.840.113554.1.2.2, 1.3.6.1.5.5.2 and 1.2.840.113554.1.2.2.1, DER contents.
const MECH_KRB5: &[u8] = b"\x2a\x86\x48\x86\xf7\x12\x01\x02\x02";
const MECH_SPNEGO: &[u8] = b"\x2b\x06\x01\x05\x05\x02";
const KRB5_NT_PRINCIPAL_NAME: &[u8] = b"\x2a\x86\x48\x86\xf7\x12\x01\x02\x02\x01";

/// The GSSAPI and krb5 entry points seg calls, resolved once.
struct Api {
    acquire_cred_from: unsafe extern "C" fn(
        *mut OmUint32,
        GssName,
        OmUint32,
        *mut OidSetDesc,
        c_int,
        *const KeyValueSet,
        *mut GssCred,
        *mut *mut OidSetDesc,
        *mut OmUint32,
    ) -> OmUint32,
    acquire_cred_impersonate_name: unsafe extern "C" fn(
        *mut OmUint32,
        GssCred,
        GssName,
        OmUint32,
        *mut OidSetDesc,
        c_int,
        *mut GssCred,
        *mut *mut OidSetDesc,
        *mut OmUint32,
    ) -> OmUint32,
    import_name: unsafe extern "C" fn(
        *mut OmUint32,
        *mut BufferDesc,
        *mut OidDesc,
        *mut GssName,
    ) -> OmUint32,
    release_name: unsafe extern "C" fn(*mut OmUint32, *mut GssName) -> OmUint32,
    create_empty_oid_set: unsafe extern "C" fn(*mut OmUint32, *mut *mut OidSetDesc) -> OmUint32,
    add_oid_set_member:
        unsafe extern "C" fn(*mut OmUint32, *mut OidDesc, *mut *mut OidSetDesc) -> OmUint32,
    release_oid_set: unsafe extern "C" fn(*mut OmUint32, *mut *mut OidSetDesc) -> OmUint32,
    init_sec_context: unsafe extern "C" fn(
        *mut OmUint32,
        GssCred,
        *mut GssCtx,
        GssName,
        *mut OidDesc,
        OmUint32,
        OmUint32,
        *mut c_void,
        *mut BufferDesc,
        *mut *mut OidDesc,
        *mut BufferDesc,
        *mut OmUint32,
        *mut OmUint32,
    ) -> OmUint32,
    delete_sec_context:
        unsafe extern "C" fn(*mut OmUint32, *mut GssCtx, *mut BufferDesc) -> OmUint32,
    release_buffer: unsafe extern "C" fn(*mut OmUint32, *mut BufferDesc) -> OmUint32,
    release_cred: unsafe extern "C" fn(*mut OmUint32, *mut GssCred) -> OmUint32,
    inquire_cred: unsafe extern "C" fn(
        *mut OmUint32,
        GssCred,
        *mut GssName,
        *mut OmUint32,
        *mut c_int,
        *mut *mut OidSetDesc,
    ) -> OmUint32,
    display_status: unsafe extern "C" fn(
        *mut OmUint32,
        OmUint32,
        c_int,
        *mut OidDesc,
        *mut OmUint32,
        *mut BufferDesc,
    ) -> OmUint32,
    krb5_init_context: unsafe extern "C" fn(*mut *mut c_void) -> i32,
    krb5_free_context: unsafe extern "C" fn(*mut c_void),
    krb5_cc_resolve: unsafe extern "C" fn(*mut c_void, *const c_char, *mut *mut c_void) -> i32,
    krb5_cc_destroy: unsafe extern "C" fn(*mut c_void, *mut c_void) -> i32,
    /// The libraries the pointers above point into: open for the life of the process.
    _libraries: [Library; 2],
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// Opens the Kerberos libraries (once per process); the error says what is missing and
/// which package brings it.
pub fn load() -> Result<(), String> {
    api().map(drop).map_err(str::to_string)
}

fn api() -> Result<&'static Api, &'static str> {
    API.get_or_init(|| {
        // SAFETY: opening MIT's libraries runs their initialisers, which have no
        // preconditions; the symbols are looked up with the types RFC 2744 and MIT declare.
        unsafe { open() }.map_err(|e| format!("cannot load {e}: {INSTALL_HINT}"))
    })
    .as_ref()
    .map_err(String::as_str)
}

/// The library for a call that reports failures as `GssFailure`.
fn loaded() -> Result<&'static Api, GssFailure> {
    api().map_err(|e| GssFailure::of(e.to_string()))
}

unsafe fn open() -> Result<Api, String> {
    let gssapi =
        unsafe { Library::new(GSSAPI_LIBRARY) }.map_err(|e| format!("{GSSAPI_LIBRARY} ({e})"))?;
    let krb5 =
        unsafe { Library::new(KRB5_LIBRARY) }.map_err(|e| format!("{KRB5_LIBRARY} ({e})"))?;
    // Each pointer is copied out of its `Symbol`; the libraries stay open in `Api`.
    macro_rules! symbol {
        ($library:expr, $file:expr, $name:literal) => {
            *unsafe { $library.get($name) }.map_err(|e| format!("{} ({e})", $file))?
        };
    }
    Ok(Api {
        acquire_cred_from: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_acquire_cred_from\0"),
        acquire_cred_impersonate_name: symbol!(
            gssapi,
            GSSAPI_LIBRARY,
            b"gss_acquire_cred_impersonate_name\0"
        ),
        import_name: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_import_name\0"),
        release_name: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_release_name\0"),
        create_empty_oid_set: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_create_empty_oid_set\0"),
        add_oid_set_member: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_add_oid_set_member\0"),
        release_oid_set: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_release_oid_set\0"),
        init_sec_context: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_init_sec_context\0"),
        delete_sec_context: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_delete_sec_context\0"),
        release_buffer: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_release_buffer\0"),
        release_cred: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_release_cred\0"),
        inquire_cred: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_inquire_cred\0"),
        display_status: symbol!(gssapi, GSSAPI_LIBRARY, b"gss_display_status\0"),
        krb5_init_context: symbol!(krb5, KRB5_LIBRARY, b"krb5_init_context\0"),
        krb5_free_context: symbol!(krb5, KRB5_LIBRARY, b"krb5_free_context\0"),
        krb5_cc_resolve: symbol!(krb5, KRB5_LIBRARY, b"krb5_cc_resolve\0"),
        krb5_cc_destroy: symbol!(krb5, KRB5_LIBRARY, b"krb5_cc_destroy\0"),
        _libraries: [gssapi, krb5],
    })
}

/// A failed GSSAPI call: its status codes (what decisions are made of) and its text (for
/// the log only).
#[derive(Debug, Clone)]
pub struct GssFailure {
    pub major: u32,
    /// For the Kerberos mechanism: the krb5 error code (`KRB5KDC_ERR_*`) as `i32`.
    pub minor: i32,
    pub message: String,
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

impl GssFailure {
    fn of(message: String) -> GssFailure {
        GssFailure {
            major: GSS_S_FAILURE,
            minor: 0,
            message,
        }
    }
}

/// A credential handle, released once when the last holder drops it.
struct CredHandle(GssCred);

// SAFETY: MIT's credential handles may be used from any thread; seg never changes one after
// it is acquired (contexts made from it are per call).
unsafe impl Send for CredHandle {}
unsafe impl Sync for CredHandle {}

impl Drop for CredHandle {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            let mut minor = 0;
            // SAFETY: the handle came from an acquire call and is released once, here.
            unsafe { (api.release_cred)(&mut minor, &mut self.0) };
        }
    }
}

/// The gateway's own initiator credential, read from its keytab.
#[derive(Clone)]
pub struct GatewayCredential(Arc<CredHandle>);

/// A credential for one user, obtained by S4U2Self, usable only toward services the gateway
/// may delegate to.
#[derive(Clone)]
pub struct UserCredential(Arc<CredHandle>);

/// The gateway credential for `principal` from `keytab`, with its tickets in the memory
/// cache `ccache` (`gss_acquire_cred_from`, MIT's credential store: no environment
/// variables, nothing on disk). No KDC is contacted until the credential is first used.
pub fn acquire_gateway(
    keytab: &Path,
    principal: &str,
    ccache: &str,
) -> Result<GatewayCredential, GssFailure> {
    let api = loaded()?;
    let keytab = c_string(&format!("FILE:{}", keytab.display()))?;
    let ccache = c_string(ccache)?;
    let elements = [
        KeyValueElement {
            key: c"client_keytab".as_ptr(),
            value: keytab.as_ptr(),
        },
        KeyValueElement {
            key: c"ccache".as_ptr(),
            value: ccache.as_ptr(),
        },
    ];
    let store = KeyValueSet {
        count: elements.len() as OmUint32,
        elements: elements.as_ptr(),
    };
    let name = OwnedName::import(api, principal)?;
    let mechs = OwnedOidSet::of(api, &[MECH_KRB5, MECH_SPNEGO])?;
    let mut minor = 0;
    let mut cred: GssCred = ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call; `cred` receives a new
    // credential that the handle owns from here on.
    let major = unsafe {
        (api.acquire_cred_from)(
            &mut minor,
            name.0,
            GSS_C_INDEFINITE,
            mechs.0,
            GSS_C_INITIATE,
            &store,
            &mut cred,
            ptr::null_mut(),
            ptr::null_mut(),
        )
    };
    check(api, major, minor)?;
    Ok(GatewayCredential(Arc::new(CredHandle(cred))))
}

/// S4U2Self: a credential for `user` (`sAMAccountName@REALM`) obtained with the gateway's.
///
/// On failure the exchange is repeated for the Kerberos mechanism alone, for its status:
/// MIT's mechanism glue renumbers a minor status that SPNEGO passes on from Kerberos (a
/// code already seen from the Kerberos mechanism gets a new number), and decisions are
/// made by the Kerberos error code.
pub fn impersonate(gateway: &GatewayCredential, user: &str) -> Result<UserCredential, GssFailure> {
    let api = loaded()?;
    let name = OwnedName::import(api, user)?;
    let attempt = |mechanisms: &[&'static [u8]]| -> Result<UserCredential, GssFailure> {
        let mechs = OwnedOidSet::of(api, mechanisms)?;
        let mut minor = 0;
        let mut cred: GssCred = ptr::null_mut();
        // SAFETY: the gateway credential, the name and the set are live for the call;
        // `cred` receives a new credential the handle owns.
        let major = unsafe {
            (api.acquire_cred_impersonate_name)(
                &mut minor,
                gateway.0 .0,
                name.0,
                GSS_C_INDEFINITE,
                mechs.0,
                GSS_C_INITIATE,
                &mut cred,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
        check(api, major, minor)?;
        Ok(UserCredential(Arc::new(CredHandle(cred))))
    };
    match attempt(&[MECH_KRB5, MECH_SPNEGO]) {
        Ok(credential) => Ok(credential),
        Err(spnego) => match attempt(&[MECH_KRB5]) {
            Err(krb5) => Err(krb5),
            Ok(_) => Err(spnego),
        },
    }
}

/// The S4U2Proxy exchange for a fresh credential: a Kerberos (not SPNEGO) context to
/// `target`, whose service ticket the credential keeps for the SPNEGO tokens that follow.
/// Kerberos directly, so that a refusal comes back with its own Kerberos error code.
pub fn delegate(credential: &UserCredential, target: &str) -> Result<(), GssFailure> {
    first_token(&credential.0, target, MECH_KRB5).map(drop)
}

/// One SPNEGO token for `target` (`HTTP/host@REALM`) as the user, from the service ticket
/// [`delegate`] cached (S4U2Proxy again only if that ticket is gone).
pub fn token(credential: &UserCredential, target: &str) -> Result<Vec<u8>, GssFailure> {
    let token = first_token(&credential.0, target, MECH_SPNEGO)?;
    if token.is_empty() {
        return Err(GssFailure::of("SPNEGO produced no initial token".into()));
    }
    Ok(token)
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
    let result = acquire_gateway(keytab, principal, &ccache)
        .and_then(|gateway| first_token(&gateway.0, target, MECH_KRB5).map(drop));
    // MIT keeps a MEMORY cache for the life of the process unless it is destroyed.
    destroy_ccache(&ccache);
    result
}

/// What is left of the credential's ticket lifetime.
pub fn lifetime(credential: &UserCredential) -> Result<Duration, GssFailure> {
    let api = loaded()?;
    let mut minor = 0;
    let mut lifetime: OmUint32 = 0;
    // SAFETY: the credential is live; only the lifetime is asked for.
    let major = unsafe {
        (api.inquire_cred)(
            &mut minor,
            credential.0 .0,
            ptr::null_mut(),
            &mut lifetime,
            ptr::null_mut(),
            ptr::null_mut(),
        )
    };
    check(api, major, minor)?;
    Ok(Duration::from_secs(u64::from(lifetime)))
}

/// The first token of a context to `target` for mechanism `mech`, the context deleted after.
fn first_token(
    credential: &CredHandle,
    target: &str,
    mech: &'static [u8],
) -> Result<Vec<u8>, GssFailure> {
    let api = loaded()?;
    let target = OwnedName::import(api, target)?;
    let mut oid = oid_desc(mech);
    let mut context = OwnedContext(ptr::null_mut());
    let mut output = BufferDesc {
        length: 0,
        value: ptr::null_mut(),
    };
    let mut minor = 0;
    // SAFETY: credential, name and OID are live for the call; the context and the output
    // buffer it fills are owned here and released below.
    let major = unsafe {
        (api.init_sec_context)(
            &mut minor,
            credential.0,
            &mut context.0,
            target.0,
            &mut oid,
            0,
            0,
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            &mut output,
            ptr::null_mut(),
            ptr::null_mut(),
        )
    };
    let token = if output.value.is_null() || output.length == 0 {
        Vec::new()
    } else {
        // SAFETY: the library filled `length` bytes at `value`.
        unsafe { std::slice::from_raw_parts(output.value.cast::<u8>(), output.length) }.to_vec()
    };
    if !output.value.is_null() {
        let mut ignored = 0;
        // SAFETY: the buffer was allocated by the library and is released once.
        unsafe { (api.release_buffer)(&mut ignored, &mut output) };
    }
    // GSS_S_CONTINUE_NEEDED (SPNEGO's first token) carries no error bits.
    check(api, major, minor)?;
    Ok(token)
}

/// A security context, deleted once when dropped.
struct OwnedContext(GssCtx);

impl Drop for OwnedContext {
    fn drop(&mut self) {
        if self.0.is_null() {
            return;
        }
        if let Ok(api) = api() {
            let mut minor = 0;
            // SAFETY: the context came from gss_init_sec_context and is deleted once.
            unsafe { (api.delete_sec_context)(&mut minor, &mut self.0, ptr::null_mut()) };
        }
    }
}

/// A `gss_name_t` imported as a Kerberos principal, released once when dropped.
struct OwnedName(GssName);

impl OwnedName {
    fn import(api: &Api, principal: &str) -> Result<OwnedName, GssFailure> {
        let mut oid = oid_desc(KRB5_NT_PRINCIPAL_NAME);
        let mut buffer = BufferDesc {
            length: principal.len(),
            value: principal.as_ptr().cast_mut().cast(),
        };
        let mut minor = 0;
        let mut name: GssName = ptr::null_mut();
        // SAFETY: the buffer and OID outlive the call, which copies them.
        let major = unsafe { (api.import_name)(&mut minor, &mut buffer, &mut oid, &mut name) };
        check(api, major, minor)?;
        Ok(OwnedName(name))
    }
}

impl Drop for OwnedName {
    fn drop(&mut self) {
        if let Ok(api) = api() {
            let mut minor = 0;
            // SAFETY: the name was made by gss_import_name and is released once.
            unsafe { (api.release_name)(&mut minor, &mut self.0) };
        }
    }
}

/// A `gss_OID_set`, released once when dropped.
struct OwnedOidSet(*mut OidSetDesc);

impl OwnedOidSet {
    fn of(api: &Api, members: &[&'static [u8]]) -> Result<OwnedOidSet, GssFailure> {
        let mut minor = 0;
        let mut set = OwnedOidSet(ptr::null_mut());
        // SAFETY: the set is created empty, then each OID (valid for the call) is copied in.
        check(
            api,
            unsafe { (api.create_empty_oid_set)(&mut minor, &mut set.0) },
            minor,
        )?;
        for der in members {
            let mut oid = oid_desc(der);
            let major = unsafe { (api.add_oid_set_member)(&mut minor, &mut oid, &mut set.0) };
            check(api, major, minor)?;
        }
        Ok(set)
    }
}

impl Drop for OwnedOidSet {
    fn drop(&mut self) {
        if self.0.is_null() {
            return;
        }
        if let Ok(api) = api() {
            let mut minor = 0;
            // SAFETY: the set was made by gss_create_empty_oid_set and is released once.
            unsafe { (api.release_oid_set)(&mut minor, &mut self.0) };
        }
    }
}

fn oid_desc(der: &'static [u8]) -> OidDesc {
    OidDesc {
        length: der.len() as OmUint32,
        elements: der.as_ptr().cast_mut().cast(),
    }
}

fn c_string(text: &str) -> Result<CString, GssFailure> {
    CString::new(text).map_err(|_| GssFailure::of(format!("{text:?} holds a NUL byte")))
}

/// `Ok` for a complete call; else the failure with both status codes' text.
fn check(api: &Api, major: OmUint32, minor: OmUint32) -> Result<(), GssFailure> {
    if major & GSS_ERROR_MASK == 0 {
        return Ok(());
    }
    let mut message = status_text(api, major, GSS_C_GSS_CODE);
    if minor != 0 {
        let mech = status_text(api, minor, GSS_C_MECH_CODE);
        if !mech.is_empty() {
            message = format!("{message} ({mech})");
        }
    }
    Err(GssFailure {
        major,
        minor: minor as i32,
        message,
    })
}

/// `gss_display_status` for one status code, every message of it joined.
fn status_text(api: &Api, status: OmUint32, kind: c_int) -> String {
    let mut parts = Vec::new();
    let mut context: OmUint32 = 0;
    // A status has a few messages at most; the bound guards against a library that never
    // clears the context.
    for _ in 0..8 {
        let mut minor = 0;
        let mut buffer = BufferDesc {
            length: 0,
            value: ptr::null_mut(),
        };
        // SAFETY: the buffer is filled by the library and released below.
        let major = unsafe {
            (api.display_status)(
                &mut minor,
                status,
                kind,
                ptr::null_mut(),
                &mut context,
                &mut buffer,
            )
        };
        if major & GSS_ERROR_MASK != 0 {
            break;
        }
        if !buffer.value.is_null() {
            // SAFETY: `length` bytes at `value`, filled by the library.
            let text =
                unsafe { std::slice::from_raw_parts(buffer.value.cast::<u8>(), buffer.length) };
            parts.push(String::from_utf8_lossy(text).into_owned());
            // SAFETY: released once.
            unsafe { (api.release_buffer)(&mut minor, &mut buffer) };
        }
        if context == 0 {
            break;
        }
    }
    parts.join("; ")
}

fn destroy_ccache(name: &str) {
    let (Ok(api), Ok(name)) = (api(), CString::new(name)) else {
        return;
    };
    let mut context = ptr::null_mut();
    // SAFETY: a context of our own, the cache resolved in it and destroyed (which also
    // closes it), then the context freed.
    unsafe {
        if (api.krb5_init_context)(&mut context) != 0 {
            return;
        }
        let mut cache = ptr::null_mut();
        if (api.krb5_cc_resolve)(context, name.as_ptr(), &mut cache) == 0 {
            (api.krb5_cc_destroy)(context, cache);
        }
        (api.krb5_free_context)(context);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The structs match MIT's C layout on this platform (gssapi.h: size_t + pointer,
    /// OM_uint32 + pointer, pointer pairs).
    #[test]
    fn structs_have_the_c_layout() {
        use std::mem::{align_of, offset_of, size_of};
        let word = size_of::<usize>();
        assert_eq!(size_of::<BufferDesc>(), 2 * word);
        assert_eq!(offset_of!(BufferDesc, value), word);
        assert_eq!(size_of::<OidDesc>(), 2 * word);
        assert_eq!(offset_of!(OidDesc, elements), word);
        assert_eq!(size_of::<OidSetDesc>(), 2 * word);
        assert_eq!(offset_of!(OidSetDesc, elements), word);
        assert_eq!(size_of::<KeyValueElement>(), 2 * word);
        assert_eq!(size_of::<KeyValueSet>(), 2 * word);
        assert_eq!(offset_of!(KeyValueSet, elements), word);
        assert_eq!(align_of::<OidDesc>(), word);
    }

    /// Against the installed library: a name imported and released, a mechanism set made
    /// and released, a status code turned into text, a keytab that does not exist refused
    /// with its reason. (`tests/kerberos.rs` runs the whole delegation against Samba's KDC.)
    #[test]
    fn the_library_loads_and_its_handles_are_released() {
        load().unwrap_or_else(|e| panic!("{e}"));
        let api = api().unwrap();
        for _ in 0..100 {
            drop(OwnedName::import(api, "alice@CORP.TEST").expect("import"));
            drop(OwnedOidSet::of(api, &[MECH_KRB5, MECH_SPNEGO]).expect("set"));
        }
        assert!(!status_text(api, GSS_S_FAILURE, GSS_C_GSS_CODE).is_empty());
        let missing = acquire_gateway(
            Path::new("/nonexistent/seg.keytab"),
            "HTTP/seg.corp.test@CORP.TEST",
            "MEMORY:seg-test",
        )
        .and_then(|gateway| first_token(&gateway.0, "HTTP/eas.corp.test@CORP.TEST", MECH_KRB5));
        let failure = missing.expect_err("no keytab, no token");
        assert_ne!(failure.major & GSS_ERROR_MASK, 0, "{failure}");
        destroy_ccache("MEMORY:seg-test");
    }
}
