//! The kernel queue: who owns an idle client of a saturated pool.
//!
//! Design (BENCHMARKS.md, "Issue 15, thirteenth step"): each pool has an
//! epoll instance of its own holding its idle clients' sockets, registered
//! `EPOLLONESHOT`. A backend at ReadyForQuery(I) re-arms the client it
//! releases there and takes the next ready one (`epoll_wait`, timeout 0);
//! the kernel hands one readiness to exactly one waiter, so no pooler reads,
//! writes or wakes anyone per transaction.
//!
//! A readiness only says "this socket has bytes". Who may read them is
//! decided here, in one 64-bit *owner word* per client row in shared memory,
//! changed only by compare-and-swap:
//!
//! * [`Owner::Pooler`]: the pooler's, as every client outside the queue.
//! * [`Owner::Queued`]: in its pool's epoll set, armed; nobody reads it.
//! * [`Owner::Taken`]: backend row `row` serves it; `recall` asks that
//!   backend to give it back to the pooler (not to the queue) at its
//!   boundary.
//! * [`Owner::Returned`]: backend row `row` gave it back; its message saying
//!   so (`KQ_RETURNED`, which also says whether that backend keeps serving
//!   it as an attached client) is on the way on that backend's control
//!   socket. The pooler does not read the client until it has read that
//!   message (or the backend is gone), then makes the word `Pooler`.
//!
//! `gen` names one stay of one client in the queue's registration (the
//! pooler bumps it whenever it registers a client, so a row reused by the
//! next client, or re-registered, never matches an event or a word of the
//! previous one). The epoll event's data carries (row, gen)
//! ([`event_data`]): a backend claims the client by swapping
//! `Queued{gen}` for `Taken{row, gen}`, and an event whose word no longer
//! says `Queued{gen}` is stale (taken back by the pooler) and is dropped.
//!
//! Pure logic, no PostgreSQL symbols: the word lives in an `AtomicU64` the
//! caller owns.
use std::sync::atomic::{AtomicU64, Ordering};

/// Bits of a client row in [`event_data`] (2^20 rows: far above any
/// `max_client_conn` the pooler accepts).
pub const ROW_BITS: u32 = 20;
/// Bits of a backend row in a `Taken` word.
pub const BACKEND_BITS: u32 = 16;
/// Generations wrap at 2^40 (one per registration: centuries at a million
/// a second).
pub const GEN_BITS: u32 = 40;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;

const STATE_POOLER: u64 = 0;
const STATE_QUEUED: u64 = 1;
const STATE_TAKEN: u64 = 2;
const STATE_RETURNED: u64 = 3;
const RECALL: u64 = 1 << 2;

/// Who owns a client (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Outside the queue: the pooler reads it (the all-zero word).
    Pooler,
    /// In the queue, armed, registration `gen`.
    Queued {
        /// The registration.
        gen: u64,
    },
    /// Served by the backend in shared row `row`.
    Taken {
        /// The backend's row.
        row: u32,
        /// The registration it was taken under.
        gen: u64,
        /// The pooler wants it back at that backend's boundary.
        recall: bool,
    },
    /// Given back by the backend in shared row `row`, its `KQ_RETURNED`
    /// not read by the pooler yet: nobody reads the client meanwhile.
    Returned {
        /// The backend's row.
        row: u32,
        /// The registration it was taken under.
        gen: u64,
    },
}

impl Owner {
    /// The word for this owner. Layout: bits 0-1 state, bit 2 recall,
    /// bits 8-23 backend row, bits 24-63 generation.
    pub fn encode(self) -> u64 {
        match self {
            Owner::Pooler => STATE_POOLER,
            Owner::Queued { gen } => STATE_QUEUED | (gen & GEN_MASK) << 24,
            Owner::Taken { row, gen, recall } => {
                STATE_TAKEN
                    | if recall { RECALL } else { 0 }
                    | (u64::from(row) & ((1 << BACKEND_BITS) - 1)) << 8
                    | (gen & GEN_MASK) << 24
            }
            Owner::Returned { row, gen } => {
                STATE_RETURNED | (u64::from(row) & ((1 << BACKEND_BITS) - 1)) << 8 | (gen & GEN_MASK) << 24
            }
        }
    }

    /// The owner a word says (all four states are defined; a zeroed word
    /// is the pooler's).
    pub fn decode(w: u64) -> Owner {
        let gen = w >> 24;
        let row = ((w >> 8) & ((1 << BACKEND_BITS) - 1)) as u32;
        match w & 3 {
            STATE_QUEUED => Owner::Queued { gen },
            STATE_TAKEN => Owner::Taken { row, gen, recall: w & RECALL != 0 },
            STATE_RETURNED => Owner::Returned { row, gen },
            _ => Owner::Pooler,
        }
    }
}

/// The epoll event data of client row `row` registered as `gen`.
pub fn event_data(row: usize, gen: u64) -> u64 {
    (row as u64 & ((1 << ROW_BITS) - 1)) | (gen & GEN_MASK) << ROW_BITS
}

/// (row, gen) of an event's data ([`event_data`]).
pub fn event_parts(data: u64) -> (usize, u64) {
    ((data & ((1 << ROW_BITS) - 1)) as usize, (data >> ROW_BITS) & GEN_MASK)
}

/// The next generation after `gen` (never 0, so a zeroed word or event
/// data never matches a live registration).
pub fn next_gen(gen: u64) -> u64 {
    let g = (gen + 1) & GEN_MASK;
    if g == 0 {
        1
    } else {
        g
    }
}

/// Reads a word (sequentially consistent: the pooler's recall and a
/// backend's hold bit are read in Dekker pairs with it).
pub fn load(word: &AtomicU64) -> Owner {
    Owner::decode(word.load(Ordering::SeqCst))
}

/// Pooler: the client goes into the queue as registration `gen` (stored
/// before its `EPOLL_CTL_ADD`, so a backend woken by it finds it queued).
/// Only the pooler writes a word that says `Pooler`.
pub fn enqueue(word: &AtomicU64, gen: u64) {
    word.store(Owner::Queued { gen }.encode(), Ordering::SeqCst);
}

/// Pooler: the client is its own (a backend's `KQ_RETURNED` read, the
/// backend gone, or a registration that failed).
pub fn settle(word: &AtomicU64) {
    word.store(Owner::Pooler.encode(), Ordering::SeqCst);
}

/// Backend in row `row`: claims the client an event named (`gen`). False
/// when it is no longer queued under that registration (the pooler took it
/// back, or another backend won: never read it then).
pub fn take(word: &AtomicU64, row: u32, gen: u64) -> bool {
    let from = Owner::Queued { gen }.encode();
    let to = Owner::Taken { row, gen, recall: false }.encode();
    word.compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst).is_ok()
}

/// Backend in row `row`, at the client's boundary: puts it back in the
/// queue (the caller re-arms it after this). False when the pooler recalled
/// it: the word says `Returned` then, and the backend gives the client back
/// on its control socket instead of re-arming it. (A word that names
/// neither, the client no longer this backend's, is left alone.)
pub fn requeue(word: &AtomicU64, row: u32, gen: u64) -> bool {
    let from = Owner::Taken { row, gen, recall: false }.encode();
    if word.compare_exchange(from, Owner::Queued { gen }.encode(), Ordering::SeqCst, Ordering::SeqCst).is_ok() {
        return true;
    }
    give_back(word, row, gen);
    false
}

/// Backend in row `row`: gives the client it serves (registration `gen`)
/// to the pooler (it leaves, its session was pinned, or it was recalled);
/// the caller then says so on its control socket (`Returned` until the
/// pooler has read that). False when the word no longer says this backend
/// serves it.
pub fn give_back(word: &AtomicU64, row: u32, gen: u64) -> bool {
    let mut w = word.load(Ordering::SeqCst);
    loop {
        match Owner::decode(w) {
            Owner::Taken { row: r, gen: g, .. } if r == row && g == gen => {}
            _ => return false,
        }
        match word.compare_exchange(w, Owner::Returned { row, gen }.encode(), Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return true,
            Err(now) => w = now,
        }
    }
}

/// What the pooler's take-back found ([`take_back`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TakeBack {
    /// It was queued: the pooler's now (it removes the registration).
    Taken,
    /// Backend row `row` serves it: recalled, it comes back at that
    /// backend's boundary.
    Recalled {
        /// The backend's row.
        row: u32,
    },
    /// Backend row `row` gave it back; its `KQ_RETURNED` is still to be
    /// read (and may say that backend keeps it as an attached client).
    Returning {
        /// The backend's row.
        row: u32,
    },
    /// It was the pooler's already.
    Already,
}

/// Pooler: takes a client out of the queue, or has its backend give it
/// back at its boundary.
pub fn take_back(word: &AtomicU64) -> TakeBack {
    let mut w = word.load(Ordering::SeqCst);
    loop {
        let (to, result) = match Owner::decode(w) {
            Owner::Pooler => return TakeBack::Already,
            Owner::Returned { row, .. } => return TakeBack::Returning { row },
            Owner::Queued { .. } => (Owner::Pooler, TakeBack::Taken),
            Owner::Taken { recall: true, row, .. } => return TakeBack::Recalled { row },
            Owner::Taken { row, gen, .. } => (Owner::Taken { row, gen, recall: true }, TakeBack::Recalled { row }),
        };
        match word.compare_exchange(w, to.encode(), Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return result,
            Err(now) => w = now,
        }
    }
}

/// Pooler: takes a client out of the queue only if it is there, unserved
/// (true: the pooler's now). Unlike [`take_back`], a client a backend
/// serves is left alone, not recalled: for a client that waits in the
/// queue (query_wait_timeout, a cancel of its waiting query), a backend
/// that took it meanwhile is serving it, which is what it waited for.
pub fn take_back_waiting(word: &AtomicU64) -> bool {
    let w = word.load(Ordering::SeqCst);
    matches!(Owner::decode(w), Owner::Queued { .. })
        && word.compare_exchange(w, Owner::Pooler.encode(), Ordering::SeqCst, Ordering::SeqCst).is_ok()
}

/// Where the fixed descriptor numbers start (`Header::kq_fd_base`): client
/// row `r`'s socket lives at `base + r` in the pooler and in any backend
/// serving it (epoll keys a registration by descriptor number, so a
/// backend can re-arm it only under the pooler's number), and pool row
/// `p`'s epoll instance at `base + clients + p`. The places lie above the
/// descriptors either process opens itself (the kernel gives the lowest
/// free number): at `want` (room for the pooler's own client sockets),
/// lower only as far as `limit` (`RLIMIT_NOFILE`, both processes raise
/// their soft limit to it) forces, never under `floor` (PostgreSQL keeps a
/// backend's files under `max_files_per_process`). Not at the top of a
/// large limit: a process's descriptor table grows to its highest number,
/// 8 bytes of kernel memory per number in each backend (8 MB at 2^20).
/// None when the limit leaves no room above `floor`: no kernel queue then.
/// A number found taken anyway is never reused (`fd_free` checks; that
/// client then uses the handoff path).
pub fn fd_base(limit: u64, clients: usize, pools: usize, floor: u64, want: u64) -> Option<i32> {
    let need = (clients + pools) as u64;
    // No limit (RLIM_INFINITY): the kernel still caps descriptors at
    // fs.nr_open, 2^20 by default.
    let limit = limit.min(1 << 20);
    let top = limit.checked_sub(need)?;
    let base = top.min(want.max(floor));
    (base >= floor && base <= i32::MAX as u64).then_some(base as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_descriptors_sit_at_the_top_of_the_limit() {
        assert_eq!(fd_base(20_000, 10_016, 256, 2_024, 13_000), Some(9_728), "lowered to fit the limit");
        assert_eq!(fd_base(1_024, 10_016, 256, 2_024, 13_000), None, "no room under a small limit");
        assert_eq!(fd_base(12_000, 10_016, 256, 2_024, 13_000), None, "the places would reach the backends' own descriptors");
        assert_eq!(fd_base(u64::MAX, 100, 10, 2_024, 13_000), Some(13_000), "not at the top of a large limit");
        assert_eq!(fd_base(1 << 20, 100, 10, 2_024, 0), Some(2_024), "never under the floor");
    }

    #[test]
    fn words_round_trip() {
        for o in [
            Owner::Pooler,
            Owner::Queued { gen: 1 },
            Owner::Queued { gen: GEN_MASK },
            Owner::Taken { row: 0, gen: 7, recall: false },
            Owner::Taken { row: 65535, gen: GEN_MASK, recall: true },
            Owner::Returned { row: 0, gen: 1 },
            Owner::Returned { row: 65535, gen: GEN_MASK },
        ] {
            assert_eq!(Owner::decode(o.encode()), o);
        }
        assert_eq!(Owner::decode(0), Owner::Pooler, "a zeroed row is the pooler's");
    }

    #[test]
    fn event_data_round_trips_and_generations_skip_zero() {
        assert_eq!(event_parts(event_data(12345, 678)), (12345, 678));
        assert_eq!(event_parts(event_data((1 << ROW_BITS) - 1, GEN_MASK)), ((1 << ROW_BITS) - 1, GEN_MASK));
        assert_eq!(next_gen(GEN_MASK), 1);
        assert_eq!(next_gen(0), 1);
        assert_eq!(next_gen(5), 6);
    }

    #[test]
    fn one_of_two_backends_takes_a_queued_client() {
        let w = AtomicU64::new(0);
        enqueue(&w, 9);
        assert!(take(&w, 3, 9));
        assert!(!take(&w, 4, 9), "already taken");
        assert_eq!(load(&w), Owner::Taken { row: 3, gen: 9, recall: false });
    }

    #[test]
    fn a_waiting_client_is_taken_back_only_while_unserved() {
        let w = AtomicU64::new(0);
        assert!(!take_back_waiting(&w), "the pooler's already");
        enqueue(&w, 4);
        assert!(take(&w, 2, 4));
        assert!(!take_back_waiting(&w), "served meanwhile");
        assert_eq!(load(&w), Owner::Taken { row: 2, gen: 4, recall: false }, "and not recalled");
        assert!(requeue(&w, 2, 4));
        assert!(take_back_waiting(&w));
        assert_eq!(load(&w), Owner::Pooler);
        assert!(!take(&w, 2, 4), "its event is stale now");
    }

    #[test]
    fn a_stale_event_takes_nothing() {
        let w = AtomicU64::new(0);
        enqueue(&w, 9);
        assert!(!take(&w, 3, 8), "an earlier registration's event");
        assert_eq!(take_back(&w), TakeBack::Taken);
        assert!(!take(&w, 3, 9), "taken back by the pooler");
        assert_eq!(load(&w), Owner::Pooler);
    }

    #[test]
    fn a_served_client_goes_back_to_the_queue_unless_recalled() {
        let w = AtomicU64::new(0);
        enqueue(&w, 2);
        assert!(take(&w, 1, 2));
        assert!(requeue(&w, 1, 2));
        assert_eq!(load(&w), Owner::Queued { gen: 2 });
        assert!(take(&w, 5, 2));
        assert_eq!(take_back(&w), TakeBack::Recalled { row: 5 });
        assert_eq!(take_back(&w), TakeBack::Recalled { row: 5 }, "recalling twice changes nothing");
        assert!(!requeue(&w, 5, 2), "recalled: back to the pooler");
        assert_eq!(load(&w), Owner::Returned { row: 5, gen: 2 });
        assert_eq!(take_back(&w), TakeBack::Returning { row: 5 }, "its message is on the way");
        assert!(!take(&w, 5, 2) && !requeue(&w, 5, 2) && !give_back(&w, 5, 2), "no backend's any more");
        settle(&w);
        assert_eq!(take_back(&w), TakeBack::Already);
        enqueue(&w, 3);
        assert!(!requeue(&w, 5, 2), "another registration's word is not touched");
        assert!(!give_back(&w, 5, 2));
        assert_eq!(load(&w), Owner::Queued { gen: 3 });
        assert!(take(&w, 6, 3));
        assert!(!give_back(&w, 5, 3), "another backend's");
        assert!(give_back(&w, 6, 3));
        assert_eq!(load(&w), Owner::Returned { row: 6, gen: 3 });
    }

    /// A backend that keeps its client (session pinned) gives it back and
    /// goes on serving it: until the pooler reads that backend's message,
    /// a take-back must not make the client the pooler's, or two processes
    /// would read its socket.
    #[test]
    fn a_client_given_back_is_nobodys_until_its_message_is_read() {
        let w = AtomicU64::new(0);
        enqueue(&w, 7);
        assert!(take(&w, 4, 7));
        assert!(give_back(&w, 4, 7));
        assert_eq!(take_back(&w), TakeBack::Returning { row: 4 });
        assert_eq!(take_back(&w), TakeBack::Returning { row: 4 }, "unchanged by asking");
        assert!(!take_back_waiting(&w));
        assert_eq!(load(&w), Owner::Returned { row: 4, gen: 7 });
        settle(&w);
        assert_eq!(load(&w), Owner::Pooler);
    }

    #[test]
    fn threads_never_both_take_one_client() {
        use std::sync::atomic::AtomicUsize;
        use std::sync::Arc;
        for round in 1..200u64 {
            let w = Arc::new(AtomicU64::new(0));
            enqueue(&w, round);
            let wins = Arc::new(AtomicUsize::new(0));
            let hs: Vec<_> = (0..4u32)
                .map(|r| {
                    let (w, wins) = (w.clone(), wins.clone());
                    std::thread::spawn(move || {
                        if take(&w, r, round) {
                            wins.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            let pooler = take_back(&w) == TakeBack::Taken;
            for h in hs {
                h.join().unwrap();
            }
            assert_eq!(wins.load(Ordering::SeqCst) + usize::from(pooler), 1);
        }
    }
}
