//! The pooler's per-login server calls run in a memory context that is reset
//! after each (`loginmem.c`), so nothing they palloc outlives the login.
use pgrx::pg_sys::MemoryContext;

extern "C" {
    fn ng_login_context_enter() -> MemoryContext;
    fn ng_login_context_leave(prev: MemoryContext);
}

/// Runs `f` in the login memory context, reset when `f` returns. `f` must
/// not keep a pointer into memory allocated meanwhile (the glue copies
/// results into Rust-owned structs).
pub fn scoped<T>(f: impl FnOnce() -> T) -> T {
    struct Leave(MemoryContext);
    impl Drop for Leave {
        fn drop(&mut self) {
            // SAFETY: switches back to the context that was current at entry
            // (still alive: a long-lived pooler context) and resets ours.
            unsafe { ng_login_context_leave(self.0) }
        }
    }
    // SAFETY: creates the context once under TopMemoryContext and switches to it.
    let _leave = Leave(unsafe { ng_login_context_enter() });
    f()
}
