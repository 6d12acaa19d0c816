//! Shared-memory plumbing: space requests, ShmemInitStruct and one LWLock.
use pgrx::pg_sys;
use std::ffi::c_void;

static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;
static mut SIZE: usize = 0;
static mut INIT: Option<fn(*mut c_void, bool)> = None;
static mut BASE: *mut c_void = std::ptr::null_mut();
static mut LOCK: *mut pg_sys::LWLock = std::ptr::null_mut();

const NAME: &std::ffi::CStr = c"nextgres";

extern "C" {
    /// AddinShmemInitLock (a macro in C), taken around segment creation.
    fn ng_addin_shmem_lock(acquire: bool);
}

/// Postmaster only (`_PG_init`): reserve `size` bytes and one LWLock; `init`
/// runs once in the postmaster when the segment is created (found = false).
pub fn request(size: usize, init: fn(*mut c_void, bool)) {
    unsafe {
        SIZE = size;
        INIT = Some(init);
        PREV_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_hook);
        PREV_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(startup_hook);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request_hook() {
    if let Some(prev) = PREV_REQUEST_HOOK {
        prev();
    }
    pg_sys::RequestAddinShmemSpace(SIZE);
    pg_sys::RequestNamedLWLockTranche(NAME.as_ptr(), 1);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup_hook() {
    if let Some(prev) = PREV_STARTUP_HOOK {
        prev();
    }
    ng_addin_shmem_lock(true);
    let mut found = false;
    BASE = pg_sys::ShmemInitStruct(NAME.as_ptr(), SIZE, &mut found);
    LOCK = &mut (*pg_sys::GetNamedLWLockTranche(NAME.as_ptr())).lock;
    if let Some(init) = INIT {
        init(BASE, found);
    }
    ng_addin_shmem_lock(false);
}

/// Base of the segment, or null when nextgres was not preloaded.
pub fn base() -> *mut c_void {
    unsafe { BASE }
}

/// Holds the nextgres LWLock; released on drop (and by PostgreSQL on error).
pub struct Guard(());

impl Guard {
    pub fn exclusive() -> Guard {
        unsafe { pg_sys::LWLockAcquire(LOCK, pg_sys::LWLockMode::LW_EXCLUSIVE) };
        Guard(())
    }
    pub fn shared() -> Guard {
        unsafe { pg_sys::LWLockAcquire(LOCK, pg_sys::LWLockMode::LW_SHARED) };
        Guard(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(LOCK) };
    }
}

/// Cryptographically strong random bytes from the server's own source.
pub fn strong_random(buf: &mut [u8]) -> bool {
    unsafe { pg_sys::pg_strong_random(buf.as_mut_ptr().cast(), buf.len()) }
}

/// Microseconds since the PostgreSQL epoch (a TimestampTz).
pub fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// When the server began processing the current client message (a
/// TimestampTz: `statement_timestamp()`, set per message in tcop/postgres.c).
pub fn statement_start() -> i64 {
    unsafe { pg_sys::GetCurrentStatementStartTimestamp() }
}
