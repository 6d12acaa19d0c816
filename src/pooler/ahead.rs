//! Attach ahead: a saturated pool's next client goes to a backend before
//! that backend is free.
//!
//! Without it every transaction of a saturated pool costs a sleep and a
//! wake-up: the backend sends RELEASED and parks, the pooler wakes it with
//! the next client's ATTACH. Here, while as many clients wait as the pool has
//! busy backends, the pooler sends the oldest waiting client's ATTACH and
//! socket to a backend still inside another client's transaction; at that
//! transaction's ReadyForQuery(I) the backend finds it (in an ATTACH slot of
//! its shared row, `nextgres_core::attach_slot`, or on its control socket)
//! and serves it at once (`backend::park::take_ahead`), as PgBouncer's
//! backends find the next query already in their socket.
//!
//! Ownership: the pooler publishes a fresh ticket in the backend's shared row
//! (`BackendRow::ahead`) before it sends the ATTACH that carries it; the
//! backend claims the client by swapping the ticket to 0 before it sends
//! RELEASED, and the pooler takes a client back by the same swap
//! (`shmem::ahead_claim`). Exactly one side wins; the loser never touches the
//! client's socket (the backend closes its copy unread). So a client queued
//! behind a long transaction, one that hangs up, times out, or is told
//! anything by the pooler is first taken back, and if the backend won the
//! client is simply being served.
//!
//! A backend may have up to three clients sent ahead (`shmem::AHEAD_DEPTH`),
//! queued in the order sent (in their slots, or in its socket), each with
//! its own ticket word:
//! on two shared cores the pooler often reads a RELEASED too late to send
//! the next client before that backend's next boundary, and with one place
//! half the backends of a saturated pool slept between clients
//! (BENCHMARKS.md issue 15, ninth step). Place n is used only while at
//! least n times as many clients wait as the pool has busy backends, so
//! the queue stays first come, first served across backends.
//!
//! A client sent ahead is in `Phase::Ahead`; it counts as waiting in
//! `nextgres.pools` and for the backends' time slices.
use super::backend::BPhase;
use super::client::Phase;
use super::conn::Conn;
use super::worker::Pooler;
use crate::shmem::AHEAD_DEPTH;
use std::time::{Duration, Instant};

/// Largest ATTACH sent ahead, bytes: it waits in a busy backend's socket
/// buffer, which must take it (with the others queued or taken back still
/// unread there, `CONTROL_SNDBUF`) without blocking the pooler. A client
/// with a larger session image (many prepared statements) waits in the
/// pooler as before.
const MAX_AHEAD_MESSAGE: usize = 32 * 1024;

/// SO_SNDBUF of the pooler's end of a control socket, bytes (the kernel
/// doubles it): what a busy backend may have unread there at worst, the
/// ATTACHes sent ahead to it and those taken back (a RELEASED ends the
/// block on sending more while those taken back may still sit behind the
/// client it claimed): six of `MAX_AHEAD_MESSAGE` at most, 192 KiB of the
/// 256 KiB, and release requests.
pub const CONTROL_SNDBUF: usize = 4 * MAX_AHEAD_MESSAGE;

/// A client sent ahead waits at least this long for its backend before it
/// may be taken back for another backend that became free while clients
/// still wait in the pooler's queue.
const MIN_AHEAD_PATIENCE: Duration = Duration::from_millis(1);

/// A client handed to a backend at its RELEASED (`backend_ahead_settle`),
/// not yet claimed there: what puts it back in line as it was, should that
/// backend die first (`client_requeue_handed`).
#[derive(Clone, Copy)]
pub struct Handed {
    pub ticket: u64,
    /// When it started waiting.
    pub since: Instant,
    /// Its session was counted before (no FLAG_SESSION_START again).
    pub session_counted: bool,
    /// A plain ATTACH to a parked backend (`handoff`), not one sent ahead.
    pub plain: bool,
}

/// What `send_ahead` did with a client.
enum Sent {
    Yes,
    /// Its ATTACH must go on the socket, and that backend's queue is in
    /// slots: back at the head of the queue, for another backend.
    NotThatWay,
    /// Back at the head of the queue (too large to send ahead, or that
    /// backend is gone): sending ahead stops here.
    No,
}

/// The client an ATTACH was sent ahead for, as its backend holds it.
pub struct AheadOf {
    pub client: usize,
    pub client_id: u64,
    pub ticket: u64,
    pub sent: Instant,
    /// Its ATTACH is in the backend row's slot, not on the socket.
    pub slot: bool,
}

impl Pooler {
    /// While the pool is saturated (as many clients wait as it has busy
    /// backends, and no login under way or possible would serve them), sends
    /// the oldest waiting clients ahead, one per busy backend, and a second
    /// (third) one each while twice (three times) as many wait. Not for
    /// session or dedicated mode, a paused or draining pool, a pool over its
    /// size, or one under max_db/user_connections (a backend released there
    /// may have to close for another pool, `backend_yield_to_starved`).
    pub fn pool_send_ahead(&mut self, pool: usize) {
        if !self.pool_may_send_ahead(pool) {
            return;
        }
        // The client at the head of the queue must go on the socket (its
        // ATTACH is too large for a slot): only a backend whose queue is on
        // the socket, or empty, may take it.
        let mut socket_only = false;
        loop {
            let Some(p) = self.pools.get(pool) else { return };
            if p.waiting.is_empty() {
                return;
            }
            // Sending one ahead leaves this sum as it is.
            let waiting = p.waiting.len() + p.ahead;
            let depth = (1..=AHEAD_DEPTH).rev().find(|&d| waiting >= d * p.attached.len()).unwrap_or(0);
            if depth == 0 {
                return;
            }
            let Some(bk) = self.ahead_candidate(pool, depth, socket_only) else { return };
            let Some(ck) = self.pools[pool].waiting.pop_front() else { return };
            let since = match self.client(ck) {
                Some(c) if c.pinned.is_none() && !c.dedicated_mode => match c.phase {
                    Phase::Waiting { since } => since,
                    _ => continue, // stale queue entry
                },
                _ => continue,
            };
            match self.send_ahead(ck, bk, since) {
                Sent::Yes => socket_only = false,
                // Back at the head of the queue: tried again with a backend
                // whose queue is on the socket or empty (its ATTACH is built
                // once more, for that backend).
                Sent::NotThatWay => socket_only = true,
                Sent::No => return,
            }
        }
    }

    /// The pool's state and settings allow sending ahead (checked once per
    /// call: sending one client ahead changes none of them).
    fn pool_may_send_ahead(&self, pool: usize) -> bool {
        let Some(p) = self.pools.get(pool) else { return false };
        if self.stopping || p.waiting.len() + p.ahead < p.attached.len().max(1) || p.starting > 0 || p.draining {
            return false;
        }
        !(p.wants_backend(self.pool_size_of(pool))
            || self.pool_surplus(pool) > 0
            || self.pool_mode_of(pool) != nextgres_core::poolconf::Mode::Transaction
            || self.pool_paused(pool)
            // Backends lent to its kernel queue are recalled for waiting
            // clients instead (`kq_recall_for_waiting`): sent ahead to a
            // busy one, a client could wait behind a long transaction
            // while a lent backend idles.
            || self.kq_lent_count(pool) > 0
            || self.max_db_connections_of(&p.database) > 0
            || self.max_user_connections_of(&p.role) > 0)
    }

    /// A busy backend of the pool that may take a client at its next
    /// ReadyForQuery(I): fewer than `depth` clients sent ahead to it yet, no
    /// session pin, not keeping an idle client while nobody waits (it would
    /// not look at its control socket), not past its lifetime; with
    /// `socket_only`, no queue in slots. The fewest sent ahead first, then
    /// the longest attached: with short transactions it is the one to
    /// finish soonest.
    fn ahead_candidate(&self, pool: usize, depth: usize, socket_only: bool) -> Option<usize> {
        let p = self.pools.get(pool)?;
        let mut best: Option<(usize, Instant, usize)> = None;
        for &bk in &p.attached {
            let Some(Conn::Backend(b)) = self.conns.get(bk) else { continue };
            if b.ahead.len() >= depth
                || (socket_only && b.ahead.first().is_some_and(|a| a.slot))
                || b.ahead_blocked
                || b.terminating
                || b.pinned_to.is_some()
                || b.own
                || b.dedicated
                || b.pid <= 0
                || !matches!(b.phase, BPhase::Attached { .. })
                || self.tables.backend_pin(b.row) != 0
                || self.tables.backend_lingering(b.row)
                || self.backend_expired(bk)
            {
                continue;
            }
            if best.is_none_or(|(n, at, _)| (b.ahead.len(), b.attached_at) < (n, at)) {
                best = Some((b.ahead.len(), b.attached_at, bk));
            }
        }
        best.map(|(_, _, bk)| bk)
    }

    /// Sends `ck`'s ATTACH ahead to `bk`: in the ATTACH slot of its queue
    /// place when it fits (`attach_slot`), else on its control socket with
    /// the client's socket. Unless `Sent::Yes`, the client is back at the
    /// head of the queue.
    ///
    /// A backend's queue goes one way at a time, all slots or all socket:
    /// it takes its clients in ticket order, and a slot ticket behind one
    /// whose ATTACH is still on its way through the socket could be taken
    /// first. A client that would go the other way is `Sent::NotThatWay`
    /// (another backend may take it).
    fn send_ahead(&mut self, ck: usize, bk: usize, since: Instant) -> Sent {
        let counter = self.next_ticket();
        let Some(Conn::Backend(b)) = self.conns.get(bk) else { return self.unqueue_front(ck) };
        // A place (ticket word) none of the clients queued there holds.
        let used = |place| b.ahead.iter().any(|a| crate::shmem::ahead_place(a.ticket) == place);
        let Some(place) = (0..AHEAD_DEPTH).find(|&place| !used(place)) else { return self.unqueue_front(ck) };
        let queued_by_slot = b.ahead.first().map(|a| a.slot);
        let ticket = crate::shmem::ahead_ticket(counter, place);
        let row = b.row;
        let ahead = nextgres_core::control::Ahead { ticket, backend_row: row as u32 };
        let Some((msg, fd)) = self.attach_message(ck, bk, Some(ahead), Some(MAX_AHEAD_MESSAGE)) else {
            return self.unqueue_front(ck);
        };
        let slot = queued_by_slot != Some(false) && self.attach_slot_write(ck, row, place, ticket, &msg, fd);
        if !slot && queued_by_slot == Some(true) {
            self.unqueue_front(ck);
            return Sent::NotThatWay;
        }
        self.tables.ahead_offer(row, ticket);
        let Some(b) = self.backend(bk) else { return self.unqueue_front(ck) };
        if !slot && !super::handoff::send_all_with_fd(&b.stream, &msg, fd) {
            // Nothing (or part) reached a dying backend: ours again. Its EOF
            // comes through the event loop.
            crate::shmem::ahead_claim(row, ticket);
            b.ahead_blocked = true;
            return self.unqueue_front(ck);
        }
        // A backend that began to keep an idle client (`backend::park::
        // linger`) after it was chosen here looks at its tickets when woken:
        // it announced itself before it looked (store, fence, load on each
        // side), so either it saw this ticket or this sees its flag.
        let pid = b.pid;
        if self.tables.backend_lingering(row) && pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGUSR1);
        }
        let Some(c) = self.client(ck) else { return Sent::No };
        let client_id = c.id;
        c.phase = Phase::Ahead { backend: bk, since };
        let pool = c.pool;
        if let Some(b) = self.backend(bk) {
            b.ahead.push(AheadOf { client: ck, client_id, ticket, sent: Instant::now(), slot });
        }
        if let Some(p) = pool.and_then(|p| self.pools.get_mut(p)) {
            p.ahead += 1;
        }
        self.client_rearm(ck);
        Sent::Yes
    }

    /// Writes an ATTACH sent ahead into the slot of queue place `place` of
    /// backend row `row`, for `ticket` (not published yet), with the
    /// pooler's descriptor `fd` of the client's socket and that socket's
    /// inode: no `sendmsg`, no `SCM_RIGHTS` (`nextgres_core::attach_slot`).
    /// False when it must go on the socket: too large, slots refused here
    /// (a backend found `pidfd_getfd` refused), or no inode to name.
    fn attach_slot_write(&mut self, ck: usize, row: usize, place: usize, ticket: u64, msg: &[u8], fd: std::os::fd::RawFd) -> bool {
        if msg.len() > nextgres_core::attach_slot::SLOT_BYTES || !self.tables.attach_slots_usable() {
            return false;
        }
        let Some(c) = self.client(ck) else { return false };
        let ino = match c.sock_ino {
            0 => {
                let Ok(st) = nix::sys::stat::fstat(fd) else { return false };
                // Kept for a plaintext client only: a TLS client's stream
                // is another socket after each park of its relay.
                if c.tls.is_none() {
                    c.sock_ino = st.st_ino;
                }
                st.st_ino
            }
            ino => ino,
        };
        self.tables.attach_slot(row, place).is_some_and(|s| s.write(ticket, msg, fd, ino))
    }

    pub fn next_ticket(&mut self) -> u64 {
        self.next_ticket = (self.next_ticket.wrapping_add(1) & !(crate::shmem::AHEAD_REFUSED | crate::shmem::AHEAD_PLACE_BITS)).max(1);
        self.next_ticket
    }

    /// Puts a client taken off the queue back at its head; returns
    /// `Sent::No`.
    fn unqueue_front(&mut self, ck: usize) -> Sent {
        if let Some(pool) = self.client(ck).and_then(|c| c.pool) {
            self.pools[pool].waiting.push_front(ck);
        }
        Sent::No
    }

    /// Takes a client sent ahead back from its backend, when the backend has
    /// not claimed it yet: it waits at the head of the queue again and
    /// true is returned. False: its backend claimed it (it is being served,
    /// and becomes attached when that backend's RELEASED is read); the
    /// pooler must not touch its socket. True for a client not sent ahead.
    pub fn client_recall(&mut self, ck: usize) -> bool {
        let Some(c) = self.client(ck) else { return true };
        if let Phase::Queued { .. } = c.phase {
            // Served by a backend: closed when it comes back.
            return self.kq_take_back(ck, true);
        }
        let Phase::Ahead { backend: bk, .. } = c.phase else { return true };
        let Some(b) = self.backend(bk) else { return true };
        let Some(i) = b.ahead.iter().position(|a| a.client == ck) else { return true };
        if !crate::shmem::ahead_claim(b.row, b.ahead[i].ticket) {
            return false;
        }
        // Send it nothing more until that transaction ends: an ATTACH on
        // the socket stays unread there until then, and a backend whose
        // clients were taken back for a long transaction would be chosen
        // again at once (it has the fewest queued).
        b.ahead.remove(i);
        b.ahead_blocked = true;
        let (row, pid) = (b.row, b.pid);
        // A backend keeping an idle client with no end in sight (pinned, or
        // announced while nobody waited) is woken to close its copy now
        // (`prune_stale_ahead`); any other finds the ticket gone at its
        // boundary (busy), when the ATTACH wakes it (parked), or when its
        // slice ends. Signalling a busy backend would interrupt its query
        // (a signal, a latch and a wake-up) for nothing: it was most of what
        // a take-back cost.
        if pid > 0 && (self.tables.backend_lingering(row) || self.tables.backend_pin(row) != 0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGUSR1);
        }
        self.client_requeue_ahead(ck);
        true
    }

    /// Takes back whatever was sent ahead to `bk` (it pinned its session,
    /// it is past a killed client's transaction, it is gone, or a long
    /// transaction holds it). Returns, in the order sent, the clients it
    /// could not take back: claimed by the backend (one per RELEASED of its
    /// the pooler has not read yet) or refused there (EMFILE, `pidfd_getfd`
    /// refused, a socket that was not the one sent); they stay in
    /// `Backend::ahead` for its RELEASEDs to settle.
    pub fn backend_recall_ahead(&mut self, bk: usize) -> Vec<usize> {
        let Some(b) = self.backend(bk) else { return Vec::new() };
        let sent: Vec<usize> = b.ahead.iter().map(|a| a.client).collect();
        let mut kept = Vec::new();
        // Last first: each goes back to the head of the queue, so they wait
        // there in the order they were sent.
        for ck in sent.into_iter().rev() {
            if !self.client_recall(ck) {
                kept.insert(0, ck);
            }
        }
        kept
    }

    /// Takes back every client sent ahead in `pool` (None: every pool), for
    /// operations that act on waiting clients (pause, kill, drain, stop).
    pub fn recall_all_ahead(&mut self, pool: Option<usize>) {
        let ahead: Vec<usize> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c {
                Conn::Client(c) if matches!(c.phase, Phase::Ahead { .. }) && (pool.is_none() || c.pool == pool) => Some(k),
                _ => None,
            })
            .collect();
        for ck in ahead {
            self.client_recall(ck);
        }
    }

    /// A client sent ahead that its backend will not serve (taken back, the
    /// backend parked without claiming it, or died before its RELEASED was
    /// read): waiting again, at the head of the queue.
    pub fn client_requeue_ahead(&mut self, ck: usize) {
        let Some(c) = self.client(ck) else { return };
        let Phase::Ahead { since, .. } = c.phase else { return };
        c.phase = Phase::Waiting { since };
        let killed = c.killed;
        if let Some(p) = c.pool.and_then(|p| self.pools.get_mut(p)) {
            p.ahead = p.ahead.saturating_sub(1);
            p.waiting.push_front(ck);
        }
        self.client_rearm(ck);
        if killed {
            // Killed while its backend still had it (`kill_one_client`).
            self.client_fatal(ck, "57P01", "terminating connection due to administrator command", None);
        }
    }

    /// A client handed to a backend that died before it claimed it
    /// (`backend_gone`): never touched, it is served next, as if it had
    /// never been sent.
    pub fn client_requeue_handed(&mut self, ck: usize, bk: usize, h: Handed) {
        let Some(c) = self.client(ck) else { return };
        if !matches!(c.phase, Phase::Attached { backend } if backend == bk) {
            return;
        }
        c.session_counted = h.session_counted;
        c.phase = Phase::Idle;
        if c.killed {
            // Killed while that backend had it: told now, not served.
            return self.client_fatal(ck, "57P01", "terminating connection due to administrator command", None);
        }
        self.client_needs_backend(ck);
        // Queued (no backend parked): at the head, with its first wait.
        let Some(c) = self.client(ck) else { return };
        if let (true, Some(pool)) = (matches!(c.phase, Phase::Waiting { .. }), c.pool) {
            c.phase = Phase::Waiting { since: h.since };
            let q = &mut self.pools[pool].waiting;
            if let Some(i) = q.iter().position(|&k| k == ck) {
                q.remove(i);
                q.push_front(ck);
            }
        }
    }

    /// RELEASED from `bk`: settles what was sent ahead to it. Some(client)
    /// when the backend serves it now: claimed at its boundary, or not yet
    /// (its ReadyForQuery came before the ATTACH reached it) and then
    /// *handed*: the ATTACH is in its socket, and the backend, parking now,
    /// claims it there. Taking it back instead, to send it again (most
    /// likely to this very backend, now parked), cost a second ATTACH with
    /// its socket for 46% of a saturated pool's transactions (pgbench -S,
    /// 100 clients, pool 16; BENCHMARKS.md issue 15 sixth step). None: no
    /// client was sent ahead, or none sent is still waiting for this backend
    /// (taken back to the head of the queue if still there).
    ///
    /// The backend takes its clients sent ahead in the order sent (a slot's
    /// by the lowest ticket, `backend::slot`) and claims the first it can:
    /// those before it were refused (EMFILE and the like: waiting again), it
    /// is the one served, and those after it stay queued for its next
    /// boundary. Claimed none: the first one still offered is handed when it
    /// came on the socket, taken back when it is in a slot (a parked backend
    /// does not look at its slots; `backend_released` gives it that client
    /// with a plain ATTACH, or takes the rest back if it stays parked).
    pub fn backend_ahead_settle(&mut self, bk: usize) -> Option<usize> {
        let b = self.backend(bk)?;
        b.ahead_blocked = false;
        b.handed = None;
        let (row, pool) = (b.row, b.pool);
        let mut dropped = Vec::new();
        let served = loop {
            let Some(b) = self.backend(bk) else { break None };
            if b.ahead.is_empty() {
                break None;
            }
            let a = b.ahead.remove(0);
            let here = self.client(a.client).and_then(|c| match c.phase {
                Phase::Ahead { backend, since } if backend == bk && c.id == a.client_id => Some((since, c.session_counted)),
                _ => None,
            });
            if crate::shmem::ahead_is(row, a.ticket) {
                match here {
                    // Not handed: a parked backend looks only at its socket.
                    // Taken back, it is at the head of the queue, which this
                    // backend, free now, serves next with a plain ATTACH;
                    // the others stay in their slots for its next boundary.
                    Some(_) if a.slot => {
                        if crate::shmem::ahead_claim(row, a.ticket) {
                            dropped.push(a);
                            break None;
                        }
                    }
                    Some((since, session_counted)) if crate::shmem::ahead_hand(row, a.ticket) => {
                        if let Some(b) = self.backend(bk) {
                            b.handed = Some(Handed { ticket: a.ticket, since, session_counted, plain: false });
                        }
                    }
                    Some(_) => {} // claimed (served) or refused meanwhile: below
                    None => {
                        // Not waiting for it any more: its socket is closed
                        // unread there.
                        if !crate::shmem::ahead_claim(row, a.ticket) {
                            log::warn!("backend {bk}: took a client sent ahead that no longer waits for it");
                        }
                        dropped.push(a);
                        continue;
                    }
                }
            }
            if crate::shmem::ahead_take_refused(row, a.ticket) {
                // Its socket never reached the backend (EMFILE, or refused
                // for a slot): waiting again. The inode is looked up again
                // (a stale one would be refused for ever).
                if let Some(c) = self.client(a.client) {
                    c.sock_ino = 0;
                }
                dropped.push(a);
                continue;
            }
            if let Some(p) = self.pools.get_mut(pool) {
                p.ahead = p.ahead.saturating_sub(1);
                p.attaches_ahead += 1;
            }
            break Some(a.client).filter(|&ck| self.client(ck).is_some_and(|c| c.id == a.client_id));
        };
        // Last first, so they wait at the head of the queue in the order sent.
        for a in dropped.iter().rev() {
            self.ahead_drop(pool, bk, a);
        }
        served
    }

    /// A client sent ahead to `bk` (of `pool`), off that backend's queue and
    /// not served there: waiting again at the head of the queue when it is
    /// still that client, waiting for `bk`; the pool's count of clients sent
    /// ahead forgets it either way.
    fn ahead_drop(&mut self, pool: usize, bk: usize, a: &AheadOf) {
        let ours = self.client(a.client).is_some_and(|c| c.id == a.client_id && matches!(c.phase, Phase::Ahead { backend, .. } if backend == bk));
        if ours {
            self.client_requeue_ahead(a.client);
        } else if let Some(p) = self.pools.get_mut(pool) {
            p.ahead = p.ahead.saturating_sub(1);
        }
    }

    /// What was sent ahead to the busy backends of `pool`, each with its
    /// place in its backend's queue (0: taken at its next boundary).
    fn pool_aheads(&self, pool: usize) -> impl Iterator<Item = (usize, &AheadOf)> + '_ {
        let attached = self.pools.get(pool).filter(|p| p.ahead > 0).map_or(&[][..], |p| &p.attached[..]);
        attached
            .iter()
            .filter_map(|&bk| match self.conns.get(bk) {
                Some(Conn::Backend(b)) => Some(b.ahead.iter().enumerate()),
                _ => None,
            })
            .flatten()
    }

    /// When the longest-waiting client sent ahead in `pool` started waiting.
    pub fn pool_oldest_ahead(&self, pool: usize) -> Option<Instant> {
        self.pool_aheads(pool)
            .filter_map(|(_, a)| match self.conns.get(a.client) {
                Some(Conn::Client(c)) => match c.phase {
                    Phase::Ahead { since, .. } => Some(since),
                    _ => None,
                },
                _ => None,
            })
            .min()
    }

    /// A backend became free (`free`), or took its client sent ahead:
    /// clients sent ahead to a backend that has not taken the first of them
    /// within its patience (a long transaction there) all go back to the
    /// head of the queue, so this one (or the next sent ahead) serves them;
    /// with `free` and an empty queue, so does one client sent ahead, the
    /// one with the most to wait for (last in its backend's queue, then the
    /// oldest). Acts on one backend per call.
    pub fn pool_recall_stale_ahead(&mut self, pool: usize, free: bool) {
        let Some(p) = self.pools.get(pool) else { return };
        if p.ahead == 0 {
            return;
        }
        // Only a backend that is free now serves a client taken back at once.
        let queue_empty = free && p.waiting.is_empty();
        // Patience: four average transactions of this pool, at least 1 ms.
        let avg = Duration::from_micros((p.xact_us / p.xacts.max(1)).max(0) as u64);
        let patience = (avg * 4).max(MIN_AHEAD_PATIENCE);
        let now = Instant::now();
        // Only the first of a backend's queue tells: it is due at that
        // backend's next boundary, and has waited since it was sent or the
        // current transaction there began, whichever came later (the others
        // queued behind it wait their turn).
        let attached = self.pools.get(pool).map_or(&[][..], |p| &p.attached[..]);
        let stale = attached
            .iter()
            .filter_map(|&bk| match self.conns.get(bk) {
                Some(Conn::Backend(b)) => b.ahead.first().map(|a| (a.sent.max(b.attached_at), bk)),
                _ => None,
            })
            .filter(|&(since, _)| now.duration_since(since) > patience)
            .min()
            .map(|(_, bk)| bk);
        if let Some(bk) = stale {
            self.backend_recall_ahead(bk);
            return;
        }
        if queue_empty {
            let last = self
                .pool_aheads(pool)
                .max_by_key(|(place, a)| (*place, std::cmp::Reverse(a.sent)))
                .map(|(_, a)| a.client);
            if let Some(ck) = last {
                self.client_recall(ck);
            }
        }
    }
}

/// Pooler start: lets pooled backends take client sockets from this
/// process with `pidfd_getfd(2)` (ATTACH slots) where the Yama LSM
/// restricts ptrace to descendants (`kernel.yama.ptrace_scope = 1`, the
/// default of several distributions): it names the postmaster, whose
/// descendants (every backend; they share the server's memory anyway) may
/// then. No effect without Yama, or at its stricter scopes, where backends
/// find `pidfd_getfd` refused and clients go ahead on the socket.
pub fn allow_backends_getfd() {
    let postmaster = crate::pg::server::postmaster_pid();
    // SAFETY: prctl(PR_SET_PTRACER, pid) takes plain integers; it only sets
    // this process's Yama exception (EINVAL without Yama, ignored).
    unsafe { libc::prctl(libc::PR_SET_PTRACER, postmaster as libc::c_ulong, 0, 0, 0) };
}
