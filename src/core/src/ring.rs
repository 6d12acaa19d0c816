//! The release ring: a saturated pool's RELEASED without a system call.
//!
//! A backend that takes a client sent ahead at its ReadyForQuery(I) goes on
//! serving at once: nothing waits for the pooler to read its RELEASED. So
//! that RELEASED need not cost a `write` (and a wake-up of the pooler) and
//! the pooler a `recvmsg`: the backend leaves it in its row's ring here, and
//! the pooler reads it at its next wake-up, which a saturated pool's clients
//! bring many times per transaction anyway (`pooler::ring`).
//!
//! One ring per backend row, single producer (the backend of that row) and
//! single consumer (the pooler): the backend writes a slot and then
//! publishes `tail`; the pooler copies slots up to `tail` and then publishes
//! `head`. Indexes only grow (wrapping); `tail - head` entries are pending.
//!
//! Order with the control socket (each backend's messages are taken in the
//! order written, whichever way they went):
//! - a ring entry is written only while the pooler has read every byte the
//!   backend wrote on its control socket (`TIOCOUTQ` is 0), and the pooler
//!   reads ring entries only when no message it read from that socket is
//!   still unprocessed: so nothing written to the socket before an entry is
//!   taken after it;
//! - a socket message written while entries are pending comes after a
//!   RING_MARK naming the ring's tail, and the pooler takes the entries up to
//!   there first.
//!
//! The pooler, before it sleeps, raises a flag in shared memory; the first
//! backend to write an entry while it is raised lowers it and wakes the
//! pooler (a RING_MARK on its socket): one wake-up per sleep of the pooler,
//! however many entries, where each RELEASED on the socket was one.
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Entries a ring holds. A backend writes one per client sent ahead that it
/// took, and it can take at most as many as the pooler sends ahead to one
/// backend (3, `AHEAD_DEPTH` in the extension) before the pooler, reading
/// them, sends more: one spare.
pub const RING_SLOTS: usize = 4;

/// Largest entry a slot holds, bytes (the extension's entry, a pid and a
/// RELEASED without session image, is 42; a larger one goes on the socket).
pub const RING_SLOT: usize = 128;

const WORDS: usize = RING_SLOT / 8;

/// A ring (in shared memory: `shmem::ring`, where all-zero bytes are an
/// empty ring). `tail` and `head` live on separate cache lines (128 bytes,
/// PostgreSQL's PG_CACHE_LINE_SIZE): each is written by one process and read
/// by the other. Slots are words written and read atomically (relaxed;
/// `tail` orders them), so no access races.
#[repr(C, align(128))]
pub struct Ring {
    /// Entries the backend wrote so far (wrapping).
    tail: AtomicU32,
    /// Set by the pooler when it is done with this backend (`close`): the
    /// backend, reading it after it wrote an entry, must not go on.
    closed: AtomicU32,
    _pad: [u8; 120],
    /// Entries the pooler took so far (wrapping).
    head: AtomicU32,
    _pad2: [u8; 124],
    slots: [[AtomicU64; WORDS]; RING_SLOTS],
}

impl Default for Ring {
    fn default() -> Self {
        Ring {
            tail: AtomicU32::new(0),
            closed: AtomicU32::new(0),
            _pad: [0; 120],
            head: AtomicU32::new(0),
            _pad2: [0; 124],
            slots: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl Ring {
    /// Backend: writes `msg` (one framed control message) as the next
    /// entry and returns the tail after it; None when it does not fit (no
    /// room, too large): it goes on the socket then.
    pub fn push(&self, msg: &[u8]) -> Option<u32> {
        let tail = self.tail.load(Ordering::Relaxed);
        let head = self.head.load(Ordering::Acquire);
        if msg.len() > RING_SLOT || tail.wrapping_sub(head) as usize >= RING_SLOTS {
            return None;
        }
        // The slot is this backend's until `tail` passes it: the pooler
        // reads only slots below `tail`, and has taken this one (room was
        // checked against `head`).
        let slot = &self.slots[tail as usize % RING_SLOTS];
        for (word, chunk) in slot.iter().zip(msg.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        let tail = tail.wrapping_add(1);
        self.tail.store(tail, Ordering::SeqCst);
        Some(tail)
    }

    /// Backend, after `push`: did the pooler close this ring (`close`)? Then
    /// it may not have seen the entry, and has settled the client this
    /// backend took as untouched: the backend must end without serving it.
    /// (Store and load on both sides, sequentially consistent: the pooler
    /// sees the entry, or the backend sees the close, or both.)
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst) != 0
    }

    /// Pooler, giving up on this ring's backend: entries written after this
    /// are never read (`closed`).
    pub fn close(&self) {
        self.closed.store(1, Ordering::SeqCst);
    }

    /// Backend: are entries written that the pooler has not taken yet?
    pub fn pending(&self) -> Option<u32> {
        let tail = self.tail.load(Ordering::Relaxed);
        (self.head.load(Ordering::Acquire) != tail).then_some(tail)
    }

    /// Pooler: takes the oldest entry written, if any and if it comes
    /// before `upto` (a RING_MARK's tail: entries up to there) when given,
    /// copied into `out` (a framed message, padded to the slot). One at a
    /// time, so whatever handling one entry leads to finds the later ones
    /// still in the ring.
    pub fn take_one(&self, upto: Option<u32>, out: &mut [u8; RING_SLOT]) -> bool {
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::SeqCst);
        let pending = tail.wrapping_sub(head);
        // A tail more than a ring ahead is no backend's writing (a row that
        // was not reset): take nothing. A mark at or behind `head` names
        // entries taken already.
        if pending == 0 || pending as usize > RING_SLOTS || upto.is_some_and(|u| (u.wrapping_sub(head) as i32) <= 0) {
            return false;
        }
        // Slots below `tail` are complete (published with release order),
        // and the backend does not write them again until `head` passes them.
        let slot = &self.slots[head as usize % RING_SLOTS];
        for (word, chunk) in slot.iter().zip(out.chunks_mut(8)) {
            chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
        }
        self.head.store(head.wrapping_add(1), Ordering::Release);
        true
    }

    /// Pooler, giving the row to a new backend (none writes it now): empty.
    pub fn reset(&self) {
        self.tail.store(0, Ordering::SeqCst);
        self.head.store(0, Ordering::SeqCst);
        self.closed.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Box<Ring> {
        Box::default()
    }

    fn take(r: &Ring, upto: Option<u32>) -> Option<u8> {
        let mut out = [0u8; RING_SLOT];
        r.take_one(upto, &mut out).then_some(out[0])
    }

    #[test]
    fn entries_come_out_in_order_up_to_a_mark() {
        let r = ring();
        assert_eq!(r.push(b"1"), Some(1));
        assert_eq!(r.push(b"2"), Some(2));
        assert_eq!(r.pending(), Some(2));
        assert_eq!(take(&r, Some(1)), Some(b'1'));
        assert_eq!(take(&r, Some(1)), None, "the mark names only the first");
        assert_eq!(take(&r, None), Some(b'2'));
        assert_eq!(r.pending(), None);
        assert_eq!(take(&r, None), None);
    }

    #[test]
    fn a_mark_behind_the_head_takes_nothing() {
        let r = ring();
        r.push(b"1");
        r.push(b"2");
        assert_eq!(take(&r, None), Some(b'1'));
        assert_eq!(take(&r, Some(0)), None);
        assert_eq!(take(&r, Some(1)), None);
        assert_eq!(take(&r, Some(2)), Some(b'2'));
    }

    #[test]
    fn a_full_ring_or_a_large_message_goes_on_the_socket() {
        let r = ring();
        assert_eq!(r.push(&[0; RING_SLOT + 1]), None);
        for _ in 0..RING_SLOTS {
            assert!(r.push(b"x").is_some());
        }
        assert_eq!(r.push(b"x"), None);
        assert_eq!(take(&r, None), Some(b'x'));
        assert!(r.push(b"y").is_some());
    }

    #[test]
    fn indexes_wrap() {
        let r = ring();
        r.tail.store(u32::MAX, Ordering::Relaxed);
        r.head.store(u32::MAX, Ordering::Relaxed);
        assert_eq!(r.push(b"a"), Some(0));
        assert_eq!(r.push(b"b"), Some(1));
        assert_eq!(take(&r, Some(0)), Some(b'a'));
        assert_eq!(take(&r, Some(0)), None);
        assert_eq!(take(&r, None), Some(b'b'));
    }

    #[test]
    fn a_reset_ring_is_open_and_empty() {
        let r = ring();
        r.push(b"a");
        r.close();
        assert!(r.closed());
        r.reset();
        assert!(!r.closed());
        assert_eq!(r.pending(), None);
        assert_eq!(take(&r, None), None);
    }
}
