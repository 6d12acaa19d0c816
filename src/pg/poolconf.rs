//! Per-pool settings (`poolconf.c`): the change notice hooks, the database the
//! pg_db_role_setting reader connects to, and the check hooks of the pool
//! settings.
use std::ffi::c_void;

extern "C" {
    fn ng_install_poolconf_hooks();
    fn ng_pick_reader_database() -> pgrx::pg_sys::Oid;
}

extern "C-unwind" {
    pub fn ng_check_pool_size(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_pool_mode(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_query_wait_timeout(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_idle_backend_timeout(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_max_db_connections(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_max_user_connections(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_reserve_pool_size(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_reserve_pool_timeout(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_pool_priority(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_min_pool_size(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_max_pinned_backends(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
    pub fn ng_check_backend_lifetime(newval: *mut i32, extra: *mut *mut c_void, source: pgrx::pg_sys::GucSource::Type) -> bool;
}

/// Postmaster: ProcessUtility hook and commit callback every backend inherits.
pub fn install_hooks() {
    // SAFETY: sets two hooks in the postmaster during _PG_init.
    unsafe { ng_install_poolconf_hooks() }
}

/// Pooler: a database that accepts connections ("postgres" first), if any.
pub fn pick_reader_database() -> Option<pgrx::pg_sys::Oid> {
    // SAFETY: catches its own errors (one short transaction, heap scan).
    let oid = unsafe { ng_pick_reader_database() };
    (oid != pgrx::pg_sys::InvalidOid).then_some(oid)
}

/// SQL functions: waits up to `ms` milliseconds for the latch (interrupts
/// served, so a cancel or terminate ends the wait with the usual error).
pub fn wait_ms(ms: i64) {
    // SAFETY: a backend's own latch; the flags are the server's own.
    unsafe {
        pgrx::pg_sys::WaitLatch(
            pgrx::pg_sys::MyLatch,
            (pgrx::pg_sys::WL_LATCH_SET | pgrx::pg_sys::WL_TIMEOUT | pgrx::pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            ms as _,
            pgrx::pg_sys::PG_WAIT_EXTENSION,
        );
        pgrx::pg_sys::ResetLatch(pgrx::pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}
