//! A pooled backend's side of its release ring (`nextgres_core::ring`): the
//! RELEASED of a client whose transaction ended while the next client, sent
//! ahead, was already here goes to shared memory instead of the control
//! socket. The pooler reads it at its next wake-up; nothing waits for it,
//! since this backend goes straight on to that next client.
use nextgres_core::control;
use nextgres_core::ring::RING_SLOT;
use std::borrow::Cow;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// Since the pooler was last seen to have read everything this backend
/// wrote on its control socket, only RING_MARKs were written there: the
/// ring may still be used (a mark orders nothing after it), so a wake-up
/// mark the pooler has not read yet does not send the next RELEASEDs to the
/// socket. A backend is single-threaded; the atomic is only a static cell.
static ONLY_MARKS_UNREAD: AtomicBool = AtomicBool::new(false);

/// Leaves `released` in the ring of backend row `row`: true when it is
/// there, false when it must go on the control socket (`marked`) instead: no
/// ring, no room, too large, or a message written on the socket before is
/// not read by the pooler yet (it would then read this one first). `write`
/// sends the RING_MARK that wakes the pooler when it sleeps
/// (`Tables::pooler_sleeps`). Ends the backend, as a failed write of RELEASED
/// does, when the pooler gave up on it meanwhile (`Ring::closed`): the client
/// it took ahead was then settled as never touched.
pub fn release(control_fd: RawFd, row: Option<usize>, released: &[u8], write: impl FnOnce(&[u8])) -> bool {
    let Some(t) = crate::shmem::tables() else { return false };
    let Some(row) = row.filter(|&r| t.backend_row_is_mine(r)) else { return false };
    let Some(ring) = t.ring(row) else { return false };
    if socket_read_through(control_fd) {
        ONLY_MARKS_UNREAD.store(true, Ordering::Relaxed);
    } else if !ONLY_MARKS_UNREAD.load(Ordering::Relaxed) {
        return false;
    }
    // Tagged with this backend's pid: the pooler drops an entry of another
    // (one that wrote into a row given to a new backend since). Built here,
    // not allocated: this runs once per transaction of a saturated pool.
    let len = 4 + released.len();
    if len > RING_SLOT {
        return false;
    }
    let mut entry = [0u8; RING_SLOT];
    entry[..4].copy_from_slice(&crate::pg::server::my_pid().to_be_bytes());
    entry[4..len].copy_from_slice(released);
    let Some(tail) = ring.push(&entry[..len]) else { return false };
    // The pooler gave up on this backend, or gave its row to another (read
    // after `closed`: a reset that reopened the ring came after the row
    // stopped being this backend's): it may not read the entry, and has
    // settled the client taken ahead as never touched. End, as a failed
    // write of RELEASED does, without touching it.
    if ring.closed() || !t.backend_row_is_mine(row) {
        crate::pg::proc_exit(0);
    }
    if t.ring_pushed() {
        // The pooler sleeps: wake it (entries up to here are there).
        let mut mark = Vec::with_capacity(9);
        control::write_ring_mark(&mut mark, tail);
        write(&mark);
    }
    true
}

/// `msg` for the control socket, after a RING_MARK when entries this
/// backend left in its ring are still pending: the pooler takes those first.
/// `msg` itself (no copy) when none are.
pub fn marked(row: Option<usize>, msg: &[u8]) -> Cow<'_, [u8]> {
    ONLY_MARKS_UNREAD.store(false, Ordering::Relaxed);
    let pending = crate::shmem::tables().and_then(|t| row.and_then(|r| t.ring(r)).and_then(|ring| ring.pending()));
    let Some(tail) = pending else { return Cow::Borrowed(msg) };
    let mut out = Vec::with_capacity(msg.len() + 9);
    control::write_ring_mark(&mut out, tail);
    out.extend_from_slice(msg);
    Cow::Owned(out)
}

/// Has the peer read every byte written on socket `fd`? (`TIOCOUTQ`, alias
/// `SIOCOUTQ`: on a Unix stream socket, what was sent and not yet read at
/// the other end.) False when it cannot tell.
fn socket_read_through(fd: RawFd) -> bool {
    let mut unread: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int through the pointer, which points to
    // a live local int.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unread as *mut libc::c_int) };
    rc == 0 && unread == 0
}
