//! A pooled backend's side of the ATTACH slots
//! (`nextgres_core::attach_slot`): at its ReadyForQuery(I), the client sent
//! ahead is copied from shared memory and its socket duplicated from the
//! pooler with `pidfd_getfd(2)`, no control socket read.
//!
//! Claimed last: the copy, the duplicate and its check come first, and only
//! a won swap of the ticket (`shmem::ahead_claim`) makes the client this
//! backend's. A lost swap (the pooler took the client back meanwhile)
//! closes the duplicate unread, as a taken-back ATTACH's socket is closed.
use nextgres_core::attach_slot::AttachSlot;
use nextgres_core::control::{self, Attach};
use nextgres_core::proto::frame::parse_message;
use std::os::fd::RawFd;

/// What the ticket words of this backend's row hold at a boundary.
pub enum Ahead {
    /// A client sent ahead through a slot, taken: its ATTACH and socket.
    Took(Attach, RawFd),
    /// The first client queued here came on the control socket: read it there.
    OnSocket,
    /// Nothing (more) to take.
    None,
}

/// Takes the first client queued in backend row `row` (`control`: this
/// backend's control socket) when its ATTACH is
/// in a slot (`Ahead::Took`). One refused (this backend at its open files
/// limit, or `pidfd_getfd` refused here) is marked so in its ticket word
/// (`shmem::ahead_refuse`: the pooler puts it back in line when it reads
/// RELEASED) and the next is tried.
pub fn take(control: RawFd, row: usize) -> Ahead {
    let Some(t) = crate::shmem::tables() else { return Ahead::None };
    // A backend that outlived its pooler (a restart) holds the index of a
    // row the next pooler may have given another backend: never take that
    // one's clients.
    if !t.backend_row_is_mine(row) {
        return Ahead::None;
    }
    let mut buf = Vec::new();
    // Each round ends a ticket (taken back, refused) or returns; the bound
    // only guards against a pooler that keeps offering.
    for _ in 0..2 * crate::shmem::AHEAD_DEPTH {
        let Some(ticket) = crate::shmem::ahead_first(row) else { return Ahead::None };
        // The words are read one by one: a ticket published while this
        // scan went by its place was missed, though sent before the one
        // found. Published before it, it shows in a second scan (acquire),
        // and none sent earlier can appear after that.
        if crate::shmem::ahead_first(row) != Some(ticket) {
            continue;
        }
        let Some(slot) = t.attach_slot(row, crate::shmem::ahead_place(ticket)) else { return Ahead::None };
        if slot.ticket() != ticket {
            return Ahead::OnSocket;
        }
        if let Some((a, fd)) = take_one(control, row, ticket, slot, &mut buf) {
            return Ahead::Took(a, fd);
        }
    }
    Ahead::None
}

/// A client sent ahead waits for this backend (its row, `row`, still its
/// own): on the socket or in a slot, neither taken back nor refused yet.
pub fn queued_here(row: usize) -> bool {
    crate::shmem::backend_row_is_mine(row) && crate::shmem::ahead_first(row).is_some()
}

/// Copies the slot of `ticket`, duplicates the client's socket and claims
/// the client; None when it is not this backend's to serve (taken back,
/// or refused here).
fn take_one(control: RawFd, row: usize, ticket: u64, slot: &AttachSlot, buf: &mut Vec<u8>) -> Option<(Attach, RawFd)> {
    let copy = slot.read(buf);
    if copy.ticket != ticket || !crate::shmem::ahead_is(row, ticket) {
        return None; // taken back while copied: the copy may be another's
    }
    let attach = match parse_message(buf, control::MAX_CONTROL_MESSAGE) {
        Ok(Some((m, _))) if m.tag == control::ATTACH => control::parse_attach(m.body).ok(),
        _ => None,
    };
    let Some(attach) = attach.filter(|a| a.ahead.is_some_and(|x| x.ticket == ticket && x.backend_row as usize == row)) else {
        super::park::fatal("malformed ATTACH in shared memory")
    };
    let fd = match pooler_socket(control, copy.fd) {
        Ok(fd) => fd,
        Err(e) => {
            refuse(row, ticket, attach.client_id, e);
            return None;
        }
    };
    // The pooler's descriptor named this client's socket when it wrote the
    // slot; it closes it only once it took the client back, and then the
    // number may name another socket: never serve that one.
    if !nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_ino == copy.ino) {
        let _ = nix::unistd::close(fd);
        refuse(row, ticket, attach.client_id, nix::errno::Errno::EBADF); // as if that descriptor were gone
        return None;
    }
    let mine = crate::shmem::backend_row_is_mine(row);
    if mine && crate::shmem::ahead_claim(row, ticket) {
        return Some((attach, fd));
    }
    let _ = nix::unistd::close(fd);
    None
}

/// A client this backend cannot take through its slot: refused in its
/// ticket word (the pooler puts it back in line). Unless the reason is this
/// backend's own (open files limit, memory), the descriptor gone (the
/// pooler took the client back and closed it) or the pooler gone,
/// `pidfd_getfd` does not work here: the pooler stops using slots (LOG
/// once).
fn refuse(row: usize, ticket: u64, client_id: u64, e: nix::errno::Errno) {
    use nix::errno::Errno;
    // Not in a row no longer this backend's (its pooler restarted): that
    // ticket is another backend's to take.
    if !crate::shmem::backend_row_is_mine(row) {
        return;
    }
    crate::shmem::ahead_refuse(row, ticket);
    // Never served here: a cancel posted for it here is void (the pooler,
    // after posting, also looks for the refusal).
    crate::shmem::cancel_withdraw(row, client_id);
    if matches!(e, Errno::EMFILE | Errno::ENFILE | Errno::ENOMEM | Errno::EBADF | Errno::ESRCH) {
        return;
    }
    if crate::shmem::tables().is_some_and(|t| t.attach_slots_refused()) {
        log::info!(
            "could not take a client socket from the pooler with pidfd_getfd ({e}): clients sent ahead to busy backends go on the control socket from now on"
        );
    }
}

/// A duplicate of the pooler's descriptor `fd` in this process
/// (`pidfd_getfd(2)`, close-on-exec).
pub(super) fn pooler_socket(control: RawFd, fd: RawFd) -> nix::Result<RawFd> {
    let pidfd = pooler_pidfd(control)?;
    // SAFETY: pidfd_getfd(pidfd, targetfd, flags) takes three integers and
    // returns a new descriptor or -1 with errno.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) };
    if r < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(r as RawFd)
}

thread_local! {
    /// (pid, pidfd) of this backend's pooler, opened at the first slot taken.
    static POOLER: std::cell::Cell<Option<(i32, RawFd)>> = const { std::cell::Cell::new(None) };
}

/// The pidfd of the pooler that logged this backend in: the peer of its
/// control socket (`SO_PEERCRED`), while it is still the pooler that
/// serves (`Header::pooler_pid`). A backend that outlived its pooler (a
/// restart) gets ESRCH: the next pooler's clients are not its to take.
fn pooler_pidfd(control: RawFd) -> nix::Result<RawFd> {
    let serving = crate::shmem::tables().map_or(0, |t| t.pooler_pid());
    let (pid, pidfd) = match POOLER.get() {
        Some(known) => known,
        None => {
            let pid = super::park::control_peer_pid(control)?;
            if pid <= 0 {
                return Err(nix::errno::Errno::ESRCH);
            }
            // SAFETY: pidfd_open(pid, flags) takes two integers and returns
            // a new descriptor (close-on-exec) or -1 with errno.
            let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if r < 0 {
                return Err(nix::errno::Errno::last());
            }
            POOLER.set(Some((pid, r as RawFd)));
            (pid, r as RawFd)
        }
    };
    if pid != serving {
        return Err(nix::errno::Errno::ESRCH);
    }
    Ok(pidfd)
}
