//! Any backend about to run a command that needs a database to itself
//! (DROP DATABASE and friends, detected in `src/pg/dbcmd.c`) tells the pooler
//! to close that database's pooled backends first; see `pooler::drain`.
use std::ffi::{c_char, c_int, CStr};

extern "C" {
    fn ng_install_dbcmd_hook();
}

/// Postmaster: the utility hook every backend inherits.
pub fn install() {
    unsafe { ng_install_dbcmd_hook() }
}

/// Called by dbcmd.c before the command runs; the slot goes back to
/// `nextgres_drain_end` when it ends, however it ends.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn nextgres_drain_begin(database: *const c_char) -> c_int {
    if database.is_null() {
        return -1;
    }
    let name = unsafe { CStr::from_ptr(database) }.to_string_lossy();
    crate::shmem::drain_begin(&name).map_or(-1, |s| s as c_int)
}

#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn nextgres_drain_end(slot: c_int) {
    if slot >= 0 {
        crate::shmem::drain_end(slot as usize);
    }
}
