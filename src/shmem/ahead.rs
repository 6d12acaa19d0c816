//! The ticket words of a backend's shared row (`BackendRow::ahead`,
//! `BackendRow::handed`) through which the pooler sends a client *ahead* to
//! a busy backend (`pooler::ahead`) and the two sides settle, without a
//! lock, who serves it: the backend claims a ticket, the pooler hands or
//! takes it back, each by one compare-and-swap.
use super::*;

/// The ticket words of a `BackendRow` (attach ahead).
#[derive(Clone, Copy)]
enum Word {
    /// `BackendRow::ahead`, the place `ticket` names (`ahead_place`)
    Ahead(u64),
    /// `BackendRow::handed`
    Handed,
}

/// Word `w` of backend row `row` as an atomic. The rows live in the shared
/// segment for the server's life (8-aligned: repr(C) rows, 16-byte aligned
/// table).
fn ticket_word(t: &Tables, row: usize, w: Word) -> Option<&AtomicU64> {
    let r = t.backends_raw().get_mut(row)?;
    let field = match w {
        Word::Ahead(ticket) => r.ahead.get_mut(ahead_place(ticket))?,
        Word::Handed => &mut r.handed,
    };
    // SAFETY: the field is a u64 in shared memory that every process reads
    // and writes only through this atomic view.
    Some(unsafe { AtomicU64::from_ptr(field) })
}

/// Swaps word `w` of `row` from `from` to `to`: true for the one caller
/// whose swap succeeded (false too without shared memory or row).
fn ticket_swap(row: usize, w: Word, from: u64, to: u64) -> bool {
    tables()
        .and_then(|t| ticket_word(&t, row, w).map(|a| a.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire).is_ok()))
        .unwrap_or(false)
}

/// Word `w` of `row` (None without shared memory or row).
fn ticket_load(row: usize, w: Word) -> Option<u64> {
    tables().and_then(|t| ticket_word(&t, row, w).map(|a| a.load(Ordering::Acquire)))
}

/// Pooler, reading RELEASED of the backend of `row` with `ticket` still
/// unclaimed: hands that client to the backend, parking now. The ticket
/// moves to `handed` before it leaves `ahead`, so the backend's claim
/// (`ahead_claim` or `ahead_claim_handed`) finds it in one of them. False
/// when the backend claimed it meanwhile (it serves it: nothing to hand),
/// or refused it (`ahead_refuse`).
pub fn ahead_hand(row: usize, ticket: u64) -> bool {
    let Some(t) = tables() else { return false };
    let Some(h) = ticket_word(&t, row, Word::Handed) else { return false };
    h.store(ticket, Ordering::Release);
    if ticket_swap(row, Word::Ahead(ticket), ticket, 0) {
        return true;
    }
    ticket_swap(row, Word::Handed, ticket, 0);
    false
}

/// Is `ticket` the client handed to the backend of `row`, still unclaimed?
pub fn ahead_handed_is(row: usize, ticket: u64) -> bool {
    ticket_load(row, Word::Handed) == Some(ticket)
}

/// The backend's claim of a client handed to it (`ahead_hand`), or the
/// pooler's when that backend died first: true for the one caller whose
/// swap of `ticket` to 0 succeeded.
pub fn ahead_claim_handed(row: usize, ticket: u64) -> bool {
    ticket_swap(row, Word::Handed, ticket, 0)
}

/// Takes the client of the ATTACH sent ahead under `ticket` to the backend
/// of `row`: true for the one caller (that backend, or the pooler taking the
/// client back) whose swap of `ticket` to 0 succeeded; false for the other,
/// which must not touch the client's socket.
pub fn ahead_claim(row: usize, ticket: u64) -> bool {
    ticket_swap(row, Word::Ahead(ticket), ticket, 0)
}

/// Marks a ticket in `BackendRow::ahead` as refused by its backend
/// (`ahead_refuse`). The pooler's tickets never have this bit.
pub const AHEAD_REFUSED: u64 = 1 << 63;

/// The backend of `row` could not take the client of `ticket` (its socket
/// did not come with the ATTACH: EMFILE; or, from a slot, `pidfd_getfd`
/// failed or brought another socket): marks it refused, so the pooler,
/// reading its RELEASED, takes the client back instead of handing it over
/// (`ahead_take_refused`). False when the ticket was no longer offered.
pub fn ahead_refuse(row: usize, ticket: u64) -> bool {
    ticket_swap(row, Word::Ahead(ticket), ticket, ticket | AHEAD_REFUSED)
}

/// Pooler: has the backend of `row` refused the client of `ticket`?
pub fn ahead_refused(row: usize, ticket: u64) -> bool {
    ticket_load(row, Word::Ahead(ticket)) == Some(ticket | AHEAD_REFUSED)
}

/// Pooler: clears a ticket its backend refused; true if it was. Read
/// first: at nearly every RELEASED the ticket was claimed, and a load keeps
/// the row's cache line shared where a failing compare-and-swap takes it.
pub fn ahead_take_refused(row: usize, ticket: u64) -> bool {
    ticket_load(row, Word::Ahead(ticket)) == Some(ticket | AHEAD_REFUSED) && ticket_swap(row, Word::Ahead(ticket), ticket | AHEAD_REFUSED, 0)
}

/// Is `ticket` still the one published in backend row `row`? (False: it
/// was claimed or taken back, for good: tickets never repeat.)
pub fn ahead_is(row: usize, ticket: u64) -> bool {
    ticket_load(row, Word::Ahead(ticket)) == Some(ticket)
}

/// A ticket is published in the backend row `row`: an ATTACH was sent ahead
/// to it (or is about to be) and nobody claimed it yet.
pub fn ahead_pending(row: usize) -> bool {
    ahead_words(row).any(|v| v != 0)
}

/// The ticket words of backend row `row`, place by place (none without
/// shared memory or row).
fn ahead_words(row: usize) -> impl Iterator<Item = u64> {
    (0..AHEAD_DEPTH).filter_map(move |place| ticket_load(row, Word::Ahead(ahead_ticket(0, place))))
}

/// The first client still queued in backend row `row`: its live ticket
/// (neither claimed, taken back nor refused) with the lowest counter, which
/// the pooler sent first. None when none is.
pub fn ahead_first(row: usize) -> Option<u64> {
    ahead_words(row)
        .filter(|&t| t != 0 && t & AHEAD_REFUSED == 0)
        .min_by_key(|&t| t & !(AHEAD_REFUSED | AHEAD_PLACE_BITS))
}

/// Clients sent ahead to one backend at most: the places of its queue, each
/// with its ticket word in the backend's row. With more than one, a backend
/// of a saturated pool finds a client at its boundary even when the pooler
/// could not read its previous RELEASED in time to send the next one; the
/// third place still gained 1-6% TPS over two (BENCHMARKS.md issue 15,
/// ninth step).
pub const AHEAD_DEPTH: usize = 3;

/// Bits of a ticket that name its place in the backend's queue (its word in
/// `BackendRow::ahead`); the pooler's ticket counter never sets them (nor
/// `AHEAD_REFUSED`).
pub const AHEAD_PLACE_BITS: u64 = 0b11 << AHEAD_PLACE_SHIFT;
const AHEAD_PLACE_SHIFT: u32 = 61;
const _: () = assert!(AHEAD_DEPTH <= 4);

/// The place in its backend's queue that `ticket` names.
pub fn ahead_place(ticket: u64) -> usize {
    ((ticket & AHEAD_PLACE_BITS) >> AHEAD_PLACE_SHIFT) as usize
}

/// `counter` (a ticket without place bits) naming `place`.
pub fn ahead_ticket(counter: u64, place: usize) -> u64 {
    counter | ((place as u64) << AHEAD_PLACE_SHIFT)
}

impl Tables {
    /// Pooler: publishes `ticket` in the backend's row after its ATTACH slot
    /// is written, or before the ATTACH that carries it is sent on the socket.
    pub fn ahead_offer(&self, row: usize, ticket: u64) {
        if let Some(w) = ticket_word(self, row, Word::Ahead(ticket)) {
            w.store(ticket, Ordering::Release);
        }
    }

    /// Pooler: publishes the ticket of a plain ATTACH (to a parked backend)
    /// in the backend's `handed` word before it is sent: the backend claims
    /// it there (`ahead_claim_handed`) as it reads the ATTACH; a backend
    /// that dies first leaves it for the pooler to take back.
    pub fn handed_offer(&self, row: usize, ticket: u64) {
        if let Some(w) = ticket_word(self, row, Word::Handed) {
            w.store(ticket, Ordering::Release);
        }
    }
}

