//! The cancel word of a backend's shared row (`BackendRow::cancel`): a
//! CancelRequest that the pooler routes to a backend that has just been
//! given the client (its ATTACH read or not, its query not started) would
//! be lost as a signal alone: the server drops a cancel that lands while
//! it reads a command (postgres.c, "Query cancel is supposed to be a no-op
//! when there is no query in progress"), and the attach itself clears a
//! pending one as the previous client's. So the pooler also leaves the
//! client's id here, and the backend, at the first statement of that
//! client after the attach, takes it and cancels that statement.
//!
//! The word never outlives the attach it was meant for: the backend
//! withdraws its client's id after it published the release (RELEASED,
//! or the queue's owner word given back), and the pooler, after it posted
//! the id, looks at the backend's messages again and withdraws the id
//! itself when the client is no longer that backend's. One side or the
//! other sees the release, so a late cancel never hits the client's next
//! transaction. Only the id of the client it serves (or has claimed) is
//! ever posted for a backend.
use super::*;

/// The cancel word of backend row `row` as an atomic (the row lives in the
/// shared segment for the server's life; zeroed when the row is given to a
/// new backend).
fn cancel_word(t: &Tables, row: usize) -> Option<&AtomicU64> {
    let r = t.backends_raw().get_mut(row)?;
    // SAFETY: a u64 in shared memory that every process reads and writes
    // only through this atomic view.
    Some(unsafe { AtomicU64::from_ptr(&mut r.cancel) })
}

/// Pooler: a cancel for client `client` (its id, never 0), which the
/// backend of `row` serves or has claimed. Posted before the signal.
pub fn cancel_post(row: usize, client: u64) {
    if let Some(t) = tables() {
        if let Some(w) = cancel_word(&t, row) {
            w.store(client, Ordering::SeqCst);
        }
    }
    // Before the pooler looks again (ticket words, owner words, messages):
    // a release or refusal it does not see then withdraws after this.
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// Either side: the cancel for `client` on `row`, if still there, is void
/// (the client's transaction there is over, or it was never served there).
pub fn cancel_withdraw(row: usize, client: u64) {
    // After a publication that may be no atomic (RELEASED written to the
    // control socket): the other side's post and look pair with this.
    std::sync::atomic::fence(Ordering::SeqCst);
    cancel_take(row, client);
}

/// Backend, at its client's first statement after the attach: takes a
/// cancel posted for `client`. True when there was one. A load first: the
/// word is almost always 0, and a load keeps the row's cache line shared
/// (the pooler swaps its ticket words).
pub fn cancel_take(row: usize, client: u64) -> bool {
    tables().is_some_and(|t| {
        cancel_word(&t, row).is_some_and(|w| w.load(Ordering::SeqCst) == client && w.compare_exchange(client, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok())
    })
}
