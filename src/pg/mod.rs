//! Everything that touches PostgreSQL internals directly: declarations pgrx does
//! not provide, the C glue (`glue.c`, compiled against the target server's
//! headers) and thin safe-ish wrappers. Other modules call these, never `pg_sys`
//! for the handoff-critical pieces.

pub mod comm;
pub mod glue;
pub mod logger;
pub mod loginmem;
pub mod poolconf;
pub mod server;
pub mod session;
pub mod shmem;
pub mod slots;

/// `proc_exit(code)`: runs the server's exit callbacks and exits the process
/// (storage/ipc/ipc.c). pgrx's PostgreSQL 18 bindings declare it returning
/// `()` (18 marks it `pg_noreturn`, which bindgen does not map), 15-17 as
/// `-> !`; this wrapper is `-> !` on every version.
pub fn proc_exit(code: i32) -> ! {
    #[allow(unreachable_code)]
    {
        unsafe { pgrx::pg_sys::proc_exit(code) };
        unreachable!("proc_exit returned")
    }
}

/// Registers `f` to run when this process exits through `proc_exit()`,
/// an escaped ERROR included (storage/ipc/ipc.c `on_proc_exit`; callbacks run
/// in reverse order of registration). `f` must not raise an ERROR.
pub fn on_proc_exit(f: extern "C-unwind" fn(i32, pgrx::pg_sys::Datum)) {
    // SAFETY: registers a plain function pointer; ipc.c keeps at most
    // MAX_ON_EXITS (20) of them and raises FATAL beyond, which this process
    // never reaches (one call per process).
    unsafe { pgrx::pg_sys::on_proc_exit(Some(f), pgrx::pg_sys::Datum::from(0usize)) };
}

/// A setting's current value as `SHOW` prints it (utils/misc/guc.c
/// `GetConfigOption(name, missing_ok = true, restrict_privileged = false)`);
/// None for an unknown name.
pub fn setting(name: &std::ffi::CStr) -> Option<String> {
    // SAFETY: returns a pointer into the GUC's own storage (or a static
    // buffer) valid until the next GUC call; copied at once.
    let p = unsafe { pgrx::pg_sys::GetConfigOption(name.as_ptr(), true, false) };
    // SAFETY: NULL or the NUL-terminated value, copied before the next GUC call.
    unsafe { owned_c_string(p) }
}

/// A copy of a C string of the server's (None for NULL), invalid UTF-8
/// replaced.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid for
/// the call.
pub unsafe fn owned_c_string(p: *const std::ffi::c_char) -> Option<String> {
    (!p.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// Is the current user a superuser (miscadmin.h `superuser()`)? Inside a
/// transaction (a catalog lookup).
pub fn caller_is_superuser() -> bool {
    // SAFETY: called from SQL functions, inside their transaction.
    unsafe { pgrx::pg_sys::superuser() }
}

/// Is there a database of this name (`get_database_oid(name, true)`)?
/// Inside a transaction.
pub fn database_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else { return false };
    // SAFETY: a catalog lookup inside the calling SQL function's
    // transaction; missing_ok, so no ERROR for an unknown name.
    unsafe { pgrx::pg_sys::get_database_oid(c.as_ptr(), true) != pgrx::pg_sys::InvalidOid }
}

/// Is there a role of this name (`get_role_oid(name, true)`)? Inside a
/// transaction.
pub fn role_exists(name: &str) -> bool {
    role_oid(name).is_some()
}

/// The oid of the role of this name (`get_role_oid(name, true)`), None
/// for an unknown name. Inside a transaction.
pub fn role_oid(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a catalog lookup inside the calling SQL function's
    // transaction; missing_ok, so no ERROR for an unknown name.
    let oid = unsafe { pgrx::pg_sys::get_role_oid(c.as_ptr(), true) };
    (oid != pgrx::pg_sys::InvalidOid).then(|| oid.to_u32())
}

/// Is role `oid` a superuser (`superuser_arg()`)? Inside a transaction.
pub fn role_oid_is_superuser(oid: u32) -> bool {
    // SAFETY: a syscache lookup inside the calling SQL function's
    // transaction; an unknown oid is no superuser.
    unsafe { pgrx::pg_sys::superuser_arg(pgrx::pg_sys::Oid::from(oid)) }
}

/// May the calling role signal the sessions of role `oid`, by
/// pg_terminate_backend's rule for a role without SUPERUSER (signalfuncs.c
/// pg_signal_backend()): it has the privileges of that role, or of
/// `pg_signal_backend` (acl.c has_privs_of_role()). Inside a transaction;
/// the superuser rules are the caller's.
pub fn caller_may_signal_role(oid: u32) -> bool {
    // SAFETY: catalog lookups inside the calling SQL function's transaction.
    unsafe {
        let me = pgrx::pg_sys::GetUserId();
        pgrx::pg_sys::has_privs_of_role(me, pgrx::pg_sys::Oid::from(oid))
            || pgrx::pg_sys::has_privs_of_role(me, pgrx::pg_sys::Oid::from(pgrx::pg_sys::ROLE_PG_SIGNAL_BACKEND))
    }
}

/// This process's pid (miscadmin.h `MyProcPid`).
pub fn my_pid() -> i32 {
    // SAFETY: a process-local int set at process start, never changed after.
    unsafe { pgrx::pg_sys::MyProcPid }
}

/// The server's TCP settings for client connections, as it applies them
/// to each it accepts (libpq/pqcomm.c pq_setkeepalivesidle() and friends
/// from `tcp_keepalives_idle` / `_interval` / `_count` in seconds and
/// `tcp_user_timeout` in ms; 0: the kernel's default).
pub struct TcpSettings {
    pub keepalives_idle_s: u32,
    pub keepalives_interval_s: u32,
    pub keepalives_count: u32,
    pub user_timeout_ms: u32,
}

pub fn tcp_settings() -> TcpSettings {
    // SAFETY: plain int GUC variables of this process (the pooler reloads
    // its settings on SIGHUP), read on its one thread.
    let (idle, interval, count, timeout) = unsafe {
        (
            pgrx::pg_sys::tcp_keepalives_idle,
            pgrx::pg_sys::tcp_keepalives_interval,
            pgrx::pg_sys::tcp_keepalives_count,
            pgrx::pg_sys::tcp_user_timeout,
        )
    };
    let u = |v: i32| v.max(0) as u32;
    TcpSettings { keepalives_idle_s: u(idle), keepalives_interval_s: u(interval), keepalives_count: u(count), user_timeout_ms: u(timeout) }
}

/// The data directory (`DataDir`, miscadmin.h), against which the server
/// resolves relative paths such as `ssl_cert_file`.
pub fn data_dir() -> std::path::PathBuf {
    // SAFETY: a global char * set by the postmaster before libraries load.
    let p = unsafe { pgrx::pg_sys::DataDir };
    std::path::PathBuf::from(unsafe { owned_c_string(p) }.unwrap_or_else(|| ".".to_string()))
}
