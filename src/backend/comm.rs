//! Wrappers around the server's FE/BE output methods. `putmessage` notes a
//! ReadyForQuery and its status; `flush` forwards and, after a flushed
//! ReadyForQuery(I), reaches the transaction boundary where the backend may
//! give its client back; CommandComplete and ErrorResponse are counted as the
//! client's statements (`nextgres.pools.queries`). Ordinary backends pay one
//! branch per call.
use crate::pg::comm::{PQcommMethods, PqCommMethods};
use std::cell::Cell;
use std::ffi::{c_char, c_int};

static mut ORIGINAL: Option<PQcommMethods> = None;
static mut WRAPPED: Option<PQcommMethods> = None;

thread_local! {
    /// Status byte of a ReadyForQuery queued since the last flush.
    static PENDING_READY: Cell<Option<u8>> = const { Cell::new(None) };
    /// CommandComplete and ErrorResponse messages sent since `take_queries`.
    static QUERIES: Cell<u32> = const { Cell::new(0) };
}

/// Statements answered (CommandComplete or ErrorResponse) since the last
/// call; the counter starts again at 0.
pub fn take_queries() -> u32 {
    QUERIES.with(|q| q.replace(0))
}

fn original() -> &'static PQcommMethods {
    // Set in the postmaster before any backend exists; never changes after.
    unsafe { (*std::ptr::addr_of!(ORIGINAL)).as_ref().expect("comm methods installed") }
}

pub fn install() {
    unsafe {
        let orig = *PqCommMethods;
        ORIGINAL = Some(orig);
        WRAPPED = Some(PQcommMethods { putmessage: Some(putmessage), flush: Some(flush), ..orig });
        PqCommMethods = (*std::ptr::addr_of!(WRAPPED)).as_ref().expect("just set");
    }
}

unsafe extern "C" fn putmessage(msgtype: c_char, s: *const c_char, len: usize) -> c_int {
    if super::is_pooled() {
        match msgtype as u8 {
            b'Z' if len == 1 => PENDING_READY.with(|p| p.set(Some(*s as u8))),
            // ParseComplete / CloseComplete: named statements may have changed.
            b'1' | b'3' => crate::pg::session::note_statement_messages(),
            // One per statement a client ran, failed ones included (as
            // PgBouncer's query count).
            b'C' | b'E' => QUERIES.with(|q| q.set(q.get().wrapping_add(1))),
            _ => {}
        }
    }
    (original().putmessage.expect("putmessage"))(msgtype, s, len)
}

unsafe extern "C" fn flush() -> c_int {
    let rc = (original().flush.expect("flush"))();
    if let Some(status) = PENDING_READY.with(|p| p.take()) {
        if rc == 0 && status == b'I' {
            super::park::transaction_boundary();
        }
    }
    rc
}
