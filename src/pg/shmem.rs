//! Shared-memory plumbing: space requests, ShmemInitStruct and the nextgres
//! lock (a process-shared robust pthread mutex at the start of the segment).
use pgrx::pg_sys;
use std::ffi::c_void;

static mut PREV_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;
static mut SIZE: usize = 0;
static mut INIT: Option<fn(*mut c_void, bool)> = None;
static mut BASE: *mut c_void = std::ptr::null_mut();
static mut LOCK: *mut libc::pthread_mutex_t = std::ptr::null_mut();

/// Room for the mutex before the segment the caller asked for (16-aligned).
const LOCK_SPACE: usize = (size_of::<libc::pthread_mutex_t>() + 15) & !15;

const NAME: &std::ffi::CStr = c"nextgres";

extern "C" {
    /// AddinShmemInitLock (a macro in C), taken around segment creation.
    fn ng_addin_shmem_lock(acquire: bool);
}

/// Postmaster only (`_PG_init`): reserve `size` bytes and the lock; `init`
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
    pg_sys::RequestAddinShmemSpace(LOCK_SPACE + SIZE);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup_hook() {
    if let Some(prev) = PREV_STARTUP_HOOK {
        prev();
    }
    ng_addin_shmem_lock(true);
    let mut found = false;
    let seg = pg_sys::ShmemInitStruct(NAME.as_ptr(), LOCK_SPACE + SIZE, &mut found);
    LOCK = seg.cast();
    BASE = seg.cast::<u8>().add(LOCK_SPACE).cast();
    if !found {
        mutex_init(LOCK);
    }
    if let Some(init) = INIT {
        init(BASE, found);
    }
    ng_addin_shmem_lock(false);
}

/// Base of the segment, or null when nextgres was not preloaded.
pub fn base() -> *mut c_void {
    unsafe { BASE }
}

/// A process-shared, robust mutex (pthread_mutexattr_setpshared,
/// pthread_mutexattr_setrobust), initialised once per shared-memory
/// lifetime (server start, crash restart) in the postmaster.
///
/// Not an LWLock: the pooler process (`pooler::agent`) has no PGPROC, so it
/// could not sleep on an LWLock, and a pooler killed (kill -9) while
/// holding one would leave every backend waiting forever. A robust mutex
/// whose holder died is handed to the next locker with EOWNERDEAD; it is
/// marked consistent and used (the rows a dead pooler was writing are reset
/// by the next pooler; backends dying while holding it make the postmaster
/// reinitialise shared memory anyway).
unsafe fn mutex_init(m: *mut libc::pthread_mutex_t) {
    let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
    let ok = libc::pthread_mutexattr_init(&mut attr) == 0
        && libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED) == 0
        && libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST) == 0
        && libc::pthread_mutex_init(m, &attr) == 0;
    libc::pthread_mutexattr_destroy(&mut attr);
    if !ok {
        pgrx::error!("nextgres: could not initialise its shared mutex");
    }
}

/// Holds the nextgres mutex; released on drop. Held only around plain
/// memory reads and writes of the segment: no PostgreSQL call may run while
/// it is held (an ERROR would longjmp past the drop and keep it locked), and
/// no allocation that could fail other than Rust's (which aborts).
pub struct Guard(());

impl Guard {
    pub fn exclusive() -> Guard {
        // SAFETY: LOCK was initialised by the postmaster before any process
        // that can reach here was started (preloaded library).
        unsafe {
            match libc::pthread_mutex_lock(LOCK) {
                0 => {}
                // The previous holder died (a killed pooler): take it over.
                libc::EOWNERDEAD => {
                    libc::pthread_mutex_consistent(LOCK);
                }
                e => panic!("nextgres: pthread_mutex_lock: {e}"),
            }
        }
        Guard(())
    }
    /// Readers take the same mutex (sections are a few microseconds).
    pub fn shared() -> Guard {
        Guard::exclusive()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: locked by this process in exclusive().
        unsafe { libc::pthread_mutex_unlock(LOCK) };
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
