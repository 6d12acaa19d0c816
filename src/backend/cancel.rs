//! A CancelRequest that reached this backend before its client's first
//! statement after the attach (`shmem::cancel`): the signal alone would be
//! dropped by the attach (as the previous client's) or by the server
//! while it reads the query, so the statement that starts first takes the
//! cancel the pooler left in this backend's row and fails with 57014, as
//! the query would on a direct connection where the cancel comes while it
//! runs. Armed at each attach, disarmed by the first statement and at each
//! boundary: a cancel that comes later is the signal's alone, as directly.
use std::cell::Cell;

thread_local! {
    /// (backend row, client id) while the client's first statement after
    /// its attach has not started.
    static ARMED: Cell<Option<(usize, u64)>> = const { Cell::new(None) };
}

/// At an attach of client `client`, this backend's row `row` (None: no
/// row, so no cancel can be posted for it).
pub fn arm(row: Option<usize>, client: u64) {
    let armed = row.map(|r| (r, client));
    ARMED.with(|a| a.set(armed));
    crate::pg::session::set_cancel_armed(armed.is_some());
}

/// At a boundary (ReadyForQuery): no first statement is due any more.
pub fn disarm() {
    if ARMED.with(|a| a.take()).is_some() {
        crate::pg::session::set_cancel_armed(false);
    }
}

/// After the release of `client` was published (RELEASED written, or the
/// queue's owner word given back), or a client taken from the queue was
/// given up unserved: a cancel posted for it here is void. Never in a row
/// that is no longer this backend's (one that outlived its pooler holds the
/// index of a row the next pooler may have given another backend, whose
/// clients' ids may repeat this one's), here or in `ng_rs_cancel_due`.
pub fn released(row: Option<usize>, client: u64) {
    if let Some(row) = row.filter(|&r| crate::shmem::backend_row_is_mine(r)) {
        crate::shmem::cancel_withdraw(row, client);
    }
}

/// session.c, at the first statement hook after an attach (the C flag is
/// cleared there): is a cancel for this client due?
#[no_mangle]
pub extern "C" fn ng_rs_cancel_due() -> bool {
    ARMED.with(|a| a.take()).is_some_and(|(row, client)| crate::shmem::backend_row_is_mine(row) && crate::shmem::cancel_take(row, client))
}
