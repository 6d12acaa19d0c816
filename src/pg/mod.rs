//! Everything that touches PostgreSQL internals directly: declarations pgrx does
//! not provide, the C glue (`glue.c`, compiled against the target server's
//! headers) and thin safe-ish wrappers. Other modules call these, never `pg_sys`
//! for the handoff-critical pieces.

pub mod comm;
pub mod glue;
pub mod logger;
pub mod loginmem;
pub mod poolconf;
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
