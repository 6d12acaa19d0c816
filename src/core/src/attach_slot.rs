//! ATTACH slots: a client sent ahead to a busy backend without a system
//! call on either side.
//!
//! Under saturation the pooler sends the next waiting client *ahead* to a
//! backend still inside another client's transaction; the backend takes it
//! at that transaction's ReadyForQuery(I). Sent on the control socket, that
//! ATTACH cost the pooler a `sendmsg` with `SCM_RIGHTS` per transaction (its
//! largest system call left there) and the backend a `recvmsg`. Here the
//! pooler leaves the ATTACH in a slot of the backend's row instead, with the
//! number of its own descriptor for the client's socket and that socket's
//! inode; the backend copies the ATTACH and takes a duplicate of the
//! socket from the pooler with `pidfd_getfd(2)` (`backend::slot`).
//!
//! One slot per queue place of a backend row (the ticket word that says who
//! owns the client, `shmem::ahead_claim`, stays where it is). The pooler
//! writes a slot only while its place holds no ticket of a client still
//! queued there, then publishes the ticket (release order); `ticket` in the
//! slot says which ticket the content belongs to (an ATTACH that went on the
//! socket leaves the slot as it was: another ticket). The backend copies a
//! slot after loading the ticket word (acquire) and uses the copy only when
//! the word still holds that ticket afterwards: tickets never repeat, so an
//! unchanged word means the pooler wrote nothing there in between (a
//! sequence lock whose sequence is the ticket). Every field is an atomic,
//! written and read relaxed, so a racing copy is stale, never undefined.
use std::sync::atomic::{fence, AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Bytes of one slot in shared memory (with its header).
pub const SLOT_SIZE: usize = 2048;

/// Largest ATTACH a slot holds, bytes. A typical one (a few startup
/// settings, no or few prepared statements) is 100-600 bytes; a larger one
/// goes on the socket.
pub const SLOT_BYTES: usize = SLOT_SIZE - 24;

const WORDS: usize = SLOT_BYTES / 8;

/// One slot (in shared memory, where all-zero bytes are an empty slot:
/// ticket 0 is never a live one).
#[repr(C, align(128))]
pub struct AttachSlot {
    /// The ticket whose ATTACH this is.
    ticket: AtomicU64,
    /// Bytes of the framed ATTACH in `words`.
    len: AtomicU32,
    /// The pooler's descriptor number of the client's socket.
    fd: AtomicI32,
    /// That socket's inode (`fstat` st_ino): the backend checks its
    /// duplicate against it.
    ino: AtomicU64,
    words: [AtomicU64; WORDS],
}

const _: () = assert!(size_of::<AttachSlot>() == SLOT_SIZE);

impl Default for AttachSlot {
    fn default() -> Self {
        AttachSlot {
            ticket: AtomicU64::new(0),
            len: AtomicU32::new(0),
            fd: AtomicI32::new(0),
            ino: AtomicU64::new(0),
            words: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// What a slot said, as the backend copied it (`AttachSlot::read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCopy {
    /// The ticket the content belongs to.
    pub ticket: u64,
    /// The pooler's descriptor number of the client's socket.
    pub fd: i32,
    /// That socket's inode.
    pub ino: u64,
}

impl AttachSlot {
    /// Pooler: writes `msg` (one framed ATTACH) for `ticket`, before that
    /// ticket is published. False when it does not fit (`SLOT_BYTES`): it
    /// goes on the socket then, and the slot is left as it was.
    pub fn write(&self, ticket: u64, msg: &[u8], fd: i32, ino: u64) -> bool {
        if msg.len() > SLOT_BYTES {
            return false;
        }
        // Orders the change of the ticket word that freed this place (the
        // pooler's own take-back) before these stores: a backend that sees
        // one of them sees that change when it looks at the word again.
        fence(Ordering::Release);
        self.ticket.store(ticket, Ordering::Relaxed);
        self.len.store(msg.len() as u32, Ordering::Relaxed);
        self.fd.store(fd, Ordering::Relaxed);
        self.ino.store(ino, Ordering::Relaxed);
        for (word, chunk) in self.words.iter().zip(msg.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        true
    }

    /// Pooler, giving the row to a new backend: names no ticket (a later
    /// pooler's tickets may repeat an earlier one's).
    pub fn clear(&self) {
        self.ticket.store(0, Ordering::SeqCst);
    }

    /// Backend: the ticket the slot's content belongs to (cheap: tells a
    /// slot ATTACH from one on the socket before copying anything).
    pub fn ticket(&self) -> u64 {
        self.ticket.load(Ordering::Relaxed)
    }

    /// Backend, after loading the ticket word (acquire): copies the slot,
    /// its ATTACH into `out` (replaced). The copy is the pooler's for that
    /// ticket only if the ticket word still holds it when loaded after this
    /// (this ends with the acquire fence that orders that load).
    pub fn read(&self, out: &mut Vec<u8>) -> SlotCopy {
        let ticket = self.ticket.load(Ordering::Relaxed);
        // A torn length (a write racing this copy) is cut to the slot: the
        // copy is thrown away then anyway.
        let len = (self.len.load(Ordering::Relaxed) as usize).min(SLOT_BYTES);
        let fd = self.fd.load(Ordering::Relaxed);
        let ino = self.ino.load(Ordering::Relaxed);
        out.clear();
        for word in self.words.iter().take(len.div_ceil(8)) {
            out.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        out.truncate(len);
        fence(Ordering::Acquire);
        SlotCopy { ticket, fd, ino }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attach_comes_out_as_written() {
        let s = Box::<AttachSlot>::default();
        let msg: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        assert!(s.write(7, &msg, 42, 99));
        assert_eq!(s.ticket(), 7);
        let mut out = vec![1, 2, 3];
        assert_eq!(s.read(&mut out), SlotCopy { ticket: 7, fd: 42, ino: 99 });
        assert_eq!(out, msg);
    }

    #[test]
    fn a_shorter_attach_replaces_a_longer_one_whole() {
        let s = Box::<AttachSlot>::default();
        assert!(s.write(1, &[9; 100], 3, 4));
        assert!(s.write(2, b"abc", 5, 6));
        let mut out = Vec::new();
        assert_eq!(s.read(&mut out).ticket, 2);
        assert_eq!(out, b"abc");
    }

    #[test]
    fn a_large_attach_does_not_fit_and_leaves_the_slot() {
        let s = Box::<AttachSlot>::default();
        assert!(s.write(1, b"x", 3, 4));
        assert!(!s.write(2, &vec![0; SLOT_BYTES + 1], 5, 6));
        assert!(s.write(3, &vec![8; SLOT_BYTES], 5, 6), "exactly SLOT_BYTES fits");
        let mut out = Vec::new();
        assert_eq!(s.read(&mut out).ticket, 3);
        assert_eq!(out.len(), SLOT_BYTES);
    }

    #[test]
    fn an_empty_slot_names_no_ticket() {
        let s = Box::<AttachSlot>::default();
        let mut out = vec![1];
        assert_eq!(s.read(&mut out), SlotCopy { ticket: 0, fd: 0, ino: 0 });
        assert!(out.is_empty());
    }
}
