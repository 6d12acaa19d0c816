//! The pooler's side of the kernel queue (`nextgres_core::kq`; setting
//! `nextgres.kernel_queue`, on by default).
//!
//! Each pool gets an epoll instance of its own, its *queue*, holding the
//! sockets of its idle clients, registered one-shot. The pooler puts a
//! client there when the client needs a backend (its query is in the
//! socket, so the registration is ready at once), with its ATTACH in the
//! client's shared slot. Parked backends are *lent* to the queue
//! (`KQ_LEND`): they wait on it, take a ready client, serve its
//! transaction, put it back (re-arm) at ReadyForQuery(I) and take the next
//! one, without a word to the pooler. The pooler hands a lent backend
//! nothing: to serve a client that cannot be queued (TLS, pinned, a pool
//! paused or draining) it recalls one (`KQ_RECALL`), which parks on its
//! control socket once it serves no queued client and says `KQ_PARKED`.
//! So a backend is never both the pooler's and the queue's.
//!
//! Descriptor numbers are fixed (`nextgres_core::kq::fd_base`): client row
//! `r`'s socket is at `base + r` here and in the backend serving it, which
//! is how that backend can re-arm the pooler's registration.
//!
//! What the pooler no longer sees for queued clients: their transactions
//! (counted by backends in shared memory, `shmem::KqPool`), and which one
//! a backend serves (`nextgres.clients` and `nextgres.backends` read the
//! owner words). Which ones wait it learns by looking at each tick
//! (`kq_watch_waiting`); one that waits that long goes to the pooler's
//! waiting list, where query_wait_timeout and cancels apply as always.
//!
//! This file keeps the clients' side (queueing, taking back, the waiting
//! watch, cancels, counters); the lent backends' side is the child `lent`.
use super::client::Phase;
use super::conn::{self, Conn};
use super::worker::Pooler;
use crate::shmem::ClientState;
use nextgres_core::control::{self, Attach};
use nextgres_core::proto::ErrorFields;
use nextgres_core::kq::{self, TakeBack};
use crate::kq_fd::{fd_free, ready_flags};
use nix::sys::epoll::EpollEvent;
use std::collections::HashMap;
use std::time::Instant;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

mod lent;

/// `Backend::last_client` of a backend lent to a queue: it serves (or
/// served) the queue's clients, so the next client the pooler hands it is a
/// new one for it, and it is no fresh backend (`pool_take_fresh_parked`)
/// nor one that never served (a pool switched to dedicated mode closes it).
/// No client has this id.
pub const QUEUE_CLIENTS: u64 = u64::MAX;

/// The pooler's kernel queue state.
#[derive(Default)]
pub struct KernelQueue {
    /// `Header::kq_fd_base`; 0: no kernel queue.
    pub base: i32,
    clients_cap: usize,
    /// Pool key -> its queue.
    pools: HashMap<usize, PoolQueue>,
    /// Client key -> client row, for clients in a queue (`Phase::Queued`).
    queued: HashMap<usize, usize>,
    /// Client row -> client key: the reverse of `queued`, for what a
    /// backend reports by row (`KQ_RETURNED`).
    by_row: HashMap<usize, usize>,
    /// Queued clients seen waiting at the last tick (`kq_watch_waiting`):
    /// client key -> (its row's take count then, when first seen).
    waiting: HashMap<usize, (u32, Instant)>,
    /// Pool key -> how many of `waiting` are its clients.
    waiting_per_pool: HashMap<usize, usize>,
    /// Queued client key -> its row's take count at the last tick: one
    /// taken since ran transactions (its received bytes are counted).
    takes_seen: HashMap<usize, u32>,
    /// Pool key -> when one of its clients last could have been queued
    /// (`kq_enqueue` found it and its pool fit): backends are lent only to
    /// pools with such clients, so a pool whose clients all use the handoff
    /// path (TLS) does not recall a lent backend for each transaction.
    demand: HashMap<usize, Instant>,
    gen: u64,
}

/// How long a pool keeps lending its free backends after its last client
/// that could be queued asked for one.
const DEMAND_FRESH: std::time::Duration = std::time::Duration::from_secs(2);

struct PoolQueue {
    /// The epoll instance, at its fixed number.
    ep: nix::sys::epoll::Epoll,
    /// Backends lent to it (keys).
    lent: Vec<usize>,
    /// Shared rows of the backends ever lent to it and not gone: their
    /// counters are the pool's (`shmem::KqCounters`).
    counted: Vec<usize>,
}

impl Pooler {
    /// Pooler start: the fixed descriptor base when `nextgres.kernel_queue`
    /// sized shared memory for it and the open files limit has room (LOG
    /// either way).
    pub fn kq_init(&mut self) {
        if !self.tables.header().kq_rows {
            self.tables.set_kq_fd_base(0);
            return;
        }
        let (pools, clients, backends) = self.tables.capacities();
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map(|l| l.0).unwrap_or(0);
        let files = crate::pg::server::max_files_per_process().max(0) as u64;
        // Below the places: the pooler's own sockets (each client's until it
        // is queued, each backend's control socket) and room to spare.
        let want = files + 1024 + (clients + backends) as u64;
        match kq::fd_base(limit, clients, pools, files + 1024, want) {
            Some(base) => {
                log::info!("kernel queue on: client sockets at fixed descriptors from {base}");
                // A random first generation: a backend of an earlier pooler
                // (restarted) never matches this one's registrations.
                let mut seed = [0u8; 8];
                let _ = getrandom::getrandom(&mut seed);
                self.kq.gen = u64::from_ne_bytes(seed) >> 24;
                // No client is queued or served yet: a backend that served one
                // under the previous pooler finds its word no longer its own,
                // so it never writes a slot this pooler may give another.
                for row in 0..clients {
                    if let Some(k) = self.tables.kq_row(row) {
                        kq::settle(&k.owner);
                    }
                }
                self.kq.base = base;
                self.kq.clients_cap = clients;
                self.tables.set_kq_fd_base(base);
            }
            None => {
                log::warn!(
                    "nextgres.kernel_queue is on but the open files limit ({limit}) leaves no room above max_files_per_process for {} fixed descriptors: no kernel queue",
                    clients + pools
                );
                self.tables.set_kq_fd_base(0);
            }
        }
    }

    /// May the pool's clients wait in its kernel queue now?
    fn kq_open(&self, pool: usize) -> bool {
        let Some(p) = self.pools.get(pool) else { return false };
        self.kq.base != 0
            && !self.stopping
            && p.params.is_some()
            // A pool whose logins fail with no backend left: its clients
            // get the error (`pool_fail_clients`), none waits in the queue.
            && (p.logged_in_shared_backends() > 0 || super::handoff::recent_failure(p).is_none())
            && !p.draining
            && !p.retired
            && !self.pool_paused(pool)
            && !self.pool_session_mode(pool)
            && self.pool_mode_of(pool) == nextgres_core::poolconf::Mode::Transaction
    }

    /// Pool `pool` is freed (no client or backend left): its queue closes,
    /// so the next pool in its row makes its own.
    pub fn kq_pool_freed(&mut self, pool: usize) {
        self.kq.demand.remove(&pool);
        // Its counters are not the next pool's.
        self.kq_reset_counters(pool);
        self.kq.pools.remove(&pool);
    }

    /// The pool's queue, created at its fixed number on first use.
    fn kq_pool_queue(&mut self, pool: usize) -> Option<&mut PoolQueue> {
        if !self.kq.pools.contains_key(&pool) {
            let row = self.pools.get(pool)?.row;
            let number = self.kq.base + (self.kq.clients_cap + row) as i32;
            if !fd_free(number) {
                return None;
            }
            let ep = nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC).ok()?;
            let ep: OwnedFd = ep.0;
            nix::unistd::dup3(ep.as_raw_fd(), number, nix::fcntl::OFlag::O_CLOEXEC).ok()?;
            // SAFETY: dup3 just made `number` a descriptor of ours.
            let ep = nix::sys::epoll::Epoll(unsafe { OwnedFd::from_raw_fd(number) });
            self.kq.pools.insert(pool, PoolQueue { ep, lent: Vec::new(), counted: Vec::new() });
        }
        self.kq.pools.get_mut(&pool)
    }

    /// An idle client needs a backend: into its pool's queue when it can
    /// go there (true). Not: TLS (its relay is the pooler's), pinned,
    /// session or dedicated mode, bytes the pooler already read, a pool
    /// not open (`kq_open`), an ATTACH too large for its slot.
    pub fn kq_enqueue(&mut self, ck: usize) -> bool {
        if self.kq.base == 0 {
            return false;
        }
        let Some(Conn::Client(c)) = self.conns.get(ck) else { return false };
        let Some(pool) = c.pool else { return false };
        if !matches!(c.phase, Phase::Idle)
            || c.tls.is_some()
            || c.pinned.is_some()
            || c.session_mode
            || c.dedicated_mode
            || c.killed
            || !c.inbuf.is_empty()
            || c.row >= self.kq.clients_cap
            // Its statements alone outgrow a slot (the exact look below).
            || c.image.statements.byte_len() >= nextgres_core::attach_slot::SLOT_BYTES
        {
            return false;
        }
        // Its ATTACH, looked at before the pool's backends are lent below:
        // a client whose ATTACH does not fit its slot (hundreds of driver
        // statements) is served the pooler's way, and lending them first
        // left it none parked at each transaction, so it waited for a
        // recall and mostly got another backend, a full switch with its
        // whole image (2 ms per transaction at 3,000 statements, release
        // build, against 0.2 ms without the queue; hunt11a 2).
        let pool_row = self.pools.get(pool).map(|p| p.row as u32).unwrap_or(0);
        let local = self.client_local(ck);
        let Some(Conn::Client(c)) = self.conns.get(ck) else { return false };
        let attach = Attach {
            client_id: c.id,
            flags: control::FLAG_NEW_CLIENT
                | control::FLAG_QUEUED
                | if c.session_counted { 0 } else { control::FLAG_SESSION_START },
            pool_row,
            key_pid: c.key_pid(),
            addr: c.raw_addr(),
            local,
            settings: c.settings.clone(),
            image: c.image.clone(),
            authn: c.authn(),
            tls: None,
            ahead: None,
        };
        let mut msg = Vec::with_capacity(control::attach_size_hint(&attach));
        control::write_attach(&mut msg, &attach);
        if msg.len() > nextgres_core::attach_slot::SLOT_BYTES {
            return false;
        }
        if !self.kq_open(pool) || self.kq_pool_queue(pool).is_none() {
            return false;
        }
        self.kq.demand.insert(pool, Instant::now());
        // Backends left parked while no client used the queue (all TLS, a
        // pause) serve it from now on.
        while let Some(bk) = self.pools.get_mut(pool).and_then(|p| p.parked.pop()) {
            if !self.kq_lend(bk) {
                if let Some(p) = self.pools.get_mut(pool) {
                    p.parked.push(bk);
                }
                break;
            }
        }
        // Queued only while a backend serves the queue (one closing serves
        // nobody new) or logs in for it: otherwise (every backend pinned or
        // closing, the pool at its size) it waits the pooler's way, where
        // query_wait_timeout and recalls apply, and a backend gone makes
        // room for it.
        if self.kq_any_lent(pool).is_none() && self.pools.get(pool).is_none_or(|p| p.starting == 0) {
            return false;
        }
        let Some(Conn::Client(c)) = self.conns.get(ck) else { return false };
        let row = c.row;
        let Some(slot_row) = self.tables.kq_row(row) else { return false };
        // The socket at its fixed number.
        let number = self.kq.base + row as i32;
        if c.stream.as_raw_fd() != number {
            if !fd_free(number) || nix::unistd::dup3(c.stream.as_raw_fd(), number, nix::fcntl::OFlag::O_CLOEXEC).is_err() {
                return false;
            }
            let Some(Conn::Client(c)) = self.conns.get_mut(ck) else { return false };
            if c.registered.take().is_some() {
                conn::remove(&self.epoll, &c.stream);
            }
            // SAFETY: dup3 just made `number` a descriptor of ours, the
            // same socket; the old descriptor closes as it is replaced.
            c.stream = unsafe { std::net::TcpStream::from_raw_fd(number) };
        }
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else { return false };
        if c.registered.take().is_some() {
            conn::remove(&self.epoll, &c.stream);
        }
        self.kq.gen = kq::next_gen(self.kq.gen);
        let gen = self.kq.gen;
        if !slot_row.slot.write(gen, &msg, number, 0) {
            self.client_rearm(ck);
            return false;
        }
        slot_row.last_backend.store(-1, std::sync::atomic::Ordering::Relaxed);
        kq::enqueue(&slot_row.owner, gen);
        let ev = EpollEvent::new(ready_flags(), kq::event_data(row, gen));
        let Some(q) = self.kq.pools.get(&pool) else { return false };
        // SAFETY: borrowed for one call; the client's socket is open.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(number) };
        if q.ep.add(fd, ev).is_err() {
            kq::settle(&slot_row.owner);
            self.client_rearm(ck);
            return false;
        }
        let Some(c) = self.client(ck) else { return false };
        c.phase = Phase::Queued;
        c.session_counted = true;
        c.watch_hangup = false;
        self.kq.queued.insert(ck, row);
        self.kq.by_row.insert(row, ck);
        self.client_set_state(ck, ClientState::Idle, 0);
        if let Some(p) = self.pools.get_mut(pool) {
            p.queued += 1;
            // Its query is in the socket: demand until the next look.
            p.queued_fresh += 1;
        }
        self.pool_maybe_grow(pool);
        self.sync_pool(pool);
        true
    }

    /// Takes a queued client back from the queue (true: the pooler's now,
    /// `Phase::Idle`, unwatched: the caller watches or closes it). False:
    /// a backend serves it, or gave it back and its `KQ_RETURNED` is still
    /// unread; the client comes back with that message (`close` then
    /// closes it there), unless the backend keeps it as an attached one.
    pub fn kq_take_back(&mut self, ck: usize, close: bool) -> bool {
        let Some(c) = self.client(ck) else { return true };
        let Phase::Queued { .. } = c.phase else { return true };
        let Some(&row) = self.kq.queued.get(&ck) else { return true };
        let Some(slot_row) = self.tables.kq_row(row) else { return true };
        match kq::take_back(&slot_row.owner) {
            TakeBack::Recalled { row: brow } => {
                if close {
                    if let Some(c) = self.client(ck) {
                        c.kq_close = true;
                    }
                }
                // A backend keeping the client idle (hold_idle_clients)
                // waits on its control socket too: woken, it finds the
                // recall in the word (written before this message). One
                // inside a transaction reads the message as a no-op.
                if let Some(bk) = self.kq_backend_at(brow as usize) {
                    self.kq_wake(bk);
                }
                false
            }
            TakeBack::Returning { .. } => {
                // Its backend may go on serving it (a pinned session, said
                // by that message): the pooler must not read it before.
                if close {
                    if let Some(c) = self.client(ck) {
                        c.kq_close = true;
                    }
                }
                false
            }
            TakeBack::Taken | TakeBack::Already => {
                self.kq_settle(ck, row);
                true
            }
        }
    }

    /// A queued client is the pooler's again (taken back, or returned by a
    /// backend): out of its queue, its session image and count as the
    /// last backend left them in its slot.
    fn kq_settle(&mut self, ck: usize, row: usize) {
        if let Some(row) = self.kq.queued.remove(&ck) {
            self.kq.by_row.remove(&row);
        }
        let pool = self.client(ck).and_then(|c| c.pool);
        if self.kq.waiting.remove(&ck).is_some() {
            if let Some(n) = pool.and_then(|p| self.kq.waiting_per_pool.get_mut(&p)) {
                *n = n.saturating_sub(1);
            }
        }
        let image = self.tables.kq_row(row).and_then(|r| {
            let mut buf = Vec::new();
            r.slot.read(&mut buf);
            match nextgres_core::proto::frame::parse_message(&buf, control::MAX_CONTROL_MESSAGE) {
                Ok(Some((m, _))) if m.tag == control::ATTACH => control::parse_attach(m.body).ok(),
                _ => None,
            }
        });
        if let Some(q) = pool.and_then(|p| self.kq.pools.get(&p)) {
            if let Some(Conn::Client(c)) = self.conns.get(ck) {
                let _ = q.ep.delete(&c.stream);
            }
        }
        let Some(c) = self.client(ck) else { return };
        if let Some(a) = image.filter(|a| a.client_id == c.id) {
            c.image = a.image;
            c.session_counted = a.flags & control::FLAG_SESSION_START == 0;
        }
        c.phase = Phase::Idle;
        if let Some(p) = pool.and_then(|p| self.pools.get_mut(p)) {
            p.queued = p.queued.saturating_sub(1);
            p.queued_fresh = p.queued_fresh.min(p.queued);
        }
    }

    /// Every client of the pool (all pools: None) out of its queue and
    /// every lent backend recalled: an operation (pause, kill, reconnect)
    /// or a pool no longer open. Clients a backend serves come back at its
    /// boundary. Returns the lent backends.
    pub fn kq_take_back_all(&mut self, pool: Option<usize>) -> Vec<usize> {
        let clients: Vec<usize> = self
            .kq
            .queued
            .keys()
            .copied()
            .filter(|&ck| pool.is_none() || matches!(self.conns.get(ck), Some(Conn::Client(c)) if c.pool == pool))
            .collect();
        for ck in clients {
            if self.kq_take_back(ck, false) {
                self.client_rearm(ck);
            }
        }
        let lent: Vec<usize> = self.kq.pools.iter().filter(|(&p, _)| pool.is_none_or(|x| x == p)).flat_map(|(_, q)| q.lent.clone()).collect();
        for &bk in &lent {
            self.kq_recall(bk);
        }
        lent
    }

    /// A queue left with no backend to serve it (the last one closing or
    /// gone) and none logging in for it: its clients are the pooler's to
    /// watch from now on, so the next query of any of them logs a backend
    /// in. Idle queued clients ask for no backend (`Pool::queue_busy`);
    /// `kq_janitor` would find the queue unserved at its next look, a
    /// second later.
    pub fn kq_unserved_take_back(&mut self, pool: usize) {
        if self.kq_unserved(pool) {
            self.kq_take_back_all(Some(pool));
        }
    }

    /// Pool `pool` has queued clients, no lent backend that is not closing
    /// (a closing one serves nobody after its current client) and none
    /// logging in (all pinned, say, or the last one just closed for
    /// idleness).
    fn kq_unserved(&self, pool: usize) -> bool {
        self.kq_any_lent(pool).is_none() && self.pools.get(pool).is_some_and(|p| p.starting == 0 && p.queued > 0)
    }

    /// Woken (SIGUSR1): a backend that found a queued client waiting after
    /// a quiet spell wakes the pooler when the pool has room to grow
    /// (`backend::kq::Queue::count_wait`). A queue idle at the last look
    /// asks only for its freshly queued clients (`Pool::queue_busy`), so
    /// without this the pool would grow for a burst of its queued clients
    /// at the next look only, up to a second later.
    pub fn kq_waited_wake(&mut self) {
        if self.kq.base == 0 {
            return;
        }
        let now_us = crate::shmem::mono_now();
        let pools: Vec<usize> = self.kq.pools.keys().copied().collect();
        for pool in pools {
            let Some(p) = self.pools.get_mut(pool) else { continue };
            if p.queue_busy || !self.tables.kq_waited_recently(p.row, now_us) {
                continue;
            }
            p.queue_busy = true;
            self.pool_maybe_grow(pool);
            self.sync_pool(pool);
        }
    }

    /// Janitor: pools whose queue is no longer open give their clients and
    /// backends back; every queue's counters reach `nextgres.pools`.
    pub fn kq_janitor(&mut self) {
        let pools: Vec<usize> = self.kq.pools.keys().copied().collect();
        for pool in pools {
            // No backend serves the queue and none logs in for it: its
            // clients wait the pooler's way instead.
            if !self.kq_open(pool) || self.kq_unserved(pool) {
                self.kq_take_back_all(Some(pool));
            }
        }
        self.kq_watch_waiting();
        for pool in self.kq.pools.keys().copied().collect::<Vec<_>>() {
            // Waiting clients whose recalled backend closed instead (a
            // limit took it) get another.
            self.kq_recall_for_waiting(pool);
            self.sync_pool(pool);
        }
    }

    /// Clients of pool `pool` seen waiting in its queue at the last tick.
    pub fn kq_waiting_count(&self, pool: usize) -> usize {
        self.kq.waiting_per_pool.get(&pool).copied().unwrap_or(0)
    }

    /// Each tick: which queued clients wait (their query in the socket, no
    /// backend has taken it). No backend tells the pooler when a queued
    /// client becomes ready (that is the point), so it looks: one poll(2)
    /// over the unserved ones' sockets, which does not touch their queue
    /// registrations. Seen waiting: listed as `waiting` (`nextgres.clients`,
    /// `clients_waiting`). Seen waiting at two ticks in a row with its
    /// row's take count unchanged: no backend took it in between (every
    /// lent backend is held by longer transactions), so it waits the
    /// pooler's way from then on (`kq_wait`): query_wait_timeout counts
    /// from when it was first seen, and a recalled backend serves it. A
    /// client served between two looks is not counted as waiting through.
    fn kq_watch_waiting(&mut self) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let now = Instant::now();
        // One read of each queued row: its take count, and whether it is
        // unserved (in the queue) now.
        let rows: Vec<(usize, usize, u32, bool)> = self
            .kq
            .queued
            .iter()
            .filter_map(|(&ck, &row)| {
                let k = self.tables.kq_row(row)?;
                let takes = k.takes.load(std::sync::atomic::Ordering::Relaxed);
                Some((ck, row, takes, matches!(kq::load(&k.owner), kq::Owner::Queued { .. })))
            })
            .collect();
        // Clients served since the last tick: their received bytes are
        // counted as for a client a backend gave back
        // (`client_received_later`).
        let seen: HashMap<usize, u32> = rows.iter().map(|&(ck, _, takes, _)| (ck, takes)).collect();
        let served: Vec<usize> = seen.iter().filter(|&(ck, t)| self.kq.takes_seen.get(ck) != Some(t)).map(|(&ck, _)| ck).collect();
        self.kq.takes_seen = seen;
        for ck in served {
            self.client_received_later(ck);
        }
        let looked: Vec<(usize, usize, u32)> = rows.into_iter().filter(|r| r.3).map(|(ck, row, takes, _)| (ck, row, takes)).collect();
        let ready: Vec<bool> = {
            // SAFETY: each queued client's socket is open at its fixed
            // number while it is in `queued` (closed only after kq_settle).
            let mut fds: Vec<PollFd> = looked
                .iter()
                .map(|&(_, row, _)| PollFd::new(unsafe { std::os::fd::BorrowedFd::borrow_raw(self.kq.base + row as i32) }, PollFlags::POLLIN))
                .collect();
            // A signal (a backend's wake-up) can interrupt even a poll that
            // does not wait: look again rather than skip this tick.
            while !fds.is_empty() {
                match poll(&mut fds, PollTimeout::ZERO) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                    Ok(_) => break,
                }
            }
            fds.iter().map(|f| f.revents().is_some_and(|r| !r.is_empty())).collect()
        };
        let before = std::mem::take(&mut self.kq.waiting);
        let mut stuck = Vec::new();
        // Pools with a queued client whose query no backend has taken
        // (those stuck go to the waiting list, counted there).
        let mut ready_pools: std::collections::HashSet<usize> = Default::default();
        for (&(ck, _, takes), ready) in looked.iter().zip(ready) {
            if !ready {
                continue;
            }
            match before.get(&ck) {
                Some(&(t, since)) if t == takes => stuck.push((ck, since)),
                _ => {
                    self.kq.waiting.insert(ck, (takes, now));
                    if let Some(p) = self.client(ck).and_then(|c| c.pool) {
                        ready_pools.insert(p);
                    }
                }
            }
        }
        // Whether the pools' queued clients ask for backends until the next
        // look (`Pool::queue_busy`): a query untaken now, or one a backend
        // found waiting within the last second (`KqPool::waited_at`).
        let now_us = crate::shmem::mono_now();
        for (k, p) in self.pools.iter_mut() {
            p.queue_busy = ready_pools.contains(&k) || self.tables.kq_waited_recently(p.row, now_us);
            p.queued_fresh = 0;
        }
        for &ck in before.keys() {
            if !self.kq.waiting.contains_key(&ck) && self.kq.queued.contains_key(&ck) {
                self.client_set_state(ck, ClientState::Idle, 0);
            }
        }
        let mut per_pool: HashMap<usize, usize> = HashMap::new();
        for &ck in self.kq.waiting.keys() {
            if !before.contains_key(&ck) {
                self.client_set_state(ck, ClientState::Waiting, 0);
            }
            if let Some(Conn::Client(c)) = self.conns.get(ck) {
                if let Some(p) = c.pool {
                    *per_pool.entry(p).or_insert(0) += 1;
                }
            }
        }
        self.kq.waiting_per_pool = per_pool;
        for (ck, since) in stuck {
            self.kq_wait(ck, since);
        }
    }

    /// A queued client that waits goes to the pooler's waiting list (true),
    /// unless a backend has just taken it (false: being served).
    fn kq_wait(&mut self, ck: usize, since: Instant) -> bool {
        let Some(&row) = self.kq.queued.get(&ck) else { return false };
        let Some(pool) = self.client(ck).and_then(|c| c.pool) else { return false };
        if !self.tables.kq_row(row).is_some_and(|k| kq::take_back_waiting(&k.owner)) {
            return false;
        }
        self.kq_settle(ck, row);
        self.client_wait(ck, pool, since);
        true
    }

    /// The backend row serving a queued client, if one does (cancel, kill).
    pub fn kq_serving_row(&self, ck: usize) -> Option<usize> {
        let row = *self.kq.queued.get(&ck)?;
        match kq::load(&self.tables.kq_row(row)?.owner) {
            kq::Owner::Taken { row, .. } => Some(row as usize),
            _ => None,
        }
    }

    /// Has a backend given this queued client back, its `KQ_RETURNED`
    /// still unread (`kq::Owner::Returned`)? Then only that message says
    /// whether the backend still serves it.
    pub fn kq_returning(&self, ck: usize) -> bool {
        let Some(&row) = self.kq.queued.get(&ck) else { return false };
        self.tables.kq_row(row).is_some_and(|k| matches!(kq::load(&k.owner), kq::Owner::Returned { .. }))
    }

    /// The key of the backend in shared row `row`.
    fn kq_backend_at(&self, row: usize) -> Option<usize> {
        self.conns.iter().find_map(|(k, c)| match c {
            Conn::Backend(b) if b.row == row => Some(k),
            _ => None,
        })
    }

    /// CancelRequest for a queued client: the backend serving it gets
    /// SIGINT, by the hand-shake of `shmem::KqBackend::hold` (a backend
    /// takes no queued client while the pooler decides, and clears a
    /// signal meant for the previous one before it serves the next). Not
    /// served: its query is over, or not started (dropped, LOG).
    pub fn kq_cancel(&mut self, ck: usize) {
        let Some(&row) = self.kq.queued.get(&ck) else { return };
        let Some(owner) = self.tables.kq_row(row).map(|r| kq::load(&r.owner)) else { return };
        // Its query waits in the queue: cancelled as a client waiting the
        // pooler's way is (answered 57014, unrun). Idle (nothing sent): the
        // cancel does nothing, as on a direct connection.
        if matches!(owner, kq::Owner::Queued { .. }) {
            let mut one = [0u8; 1];
            let fd = self.kq.base + row as i32;
            use nix::sys::socket::{recv, MsgFlags};
            if !matches!(recv(fd, &mut one, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT), Ok(n) if n > 0) {
                return log::info!("cancel request for an idle client of a kernel queue: dropped");
            }
            if self.kq_wait(ck, Instant::now()) {
                return self.cancel_queued(ck);
            }
        }
        let Some(owner) = self.tables.kq_row(row).map(|r| kq::load(&r.owner)) else { return };
        let kq::Owner::Taken { row: brow, gen, .. } = owner else {
            return log::info!("cancel request for a client of a kernel queue that no backend serves: dropped");
        };
        let Some(id) = self.client(ck).map(|c| c.id) else { return };
        let Some(hold) = self.tables.kq_backend(brow as usize) else { return };
        use std::sync::atomic::Ordering::SeqCst;
        hold.hold.store(1, SeqCst);
        // Posted before the look (`shmem::cancel`): the backend that took
        // the client may not have started its query (the attach clears
        // the signal as stale, the server drops one that lands while it
        // reads): it takes the cancel at the query's first statement. One
        // that gives the client back after the look withdraws it itself.
        crate::shmem::cancel_post(brow as usize, id);
        let still = self.tables.kq_row(row).map(|r| kq::load(&r.owner));
        let pid = self.kq_backend_at(brow as usize).and_then(|k| match self.conns.get(k) {
            Some(Conn::Backend(b)) if b.pid > 0 => Some(b.pid),
            _ => None,
        });
        match (still, pid) {
            (Some(kq::Owner::Taken { row: r, gen: g, .. }), Some(pid)) if r == brow && g == gen => {
                super::backend::signal_backend(pid, nix::sys::signal::Signal::SIGINT);
                hold.hold.store(2, SeqCst);
            }
            _ => {
                crate::shmem::cancel_withdraw(brow as usize, id);
                hold.hold.store(0, SeqCst);
            }
        }
    }

    /// `nextgres.reset_stats()`, or the pool freed: its queue counters
    /// (its backends' and its gone ones') to 0.
    pub fn kq_reset_counters(&self, pool: usize) {
        let Some(prow) = self.pools.get(pool).map(|p| p.row) else { return };
        if let Some(k) = self.tables.kq_pool(prow) {
            k.gone.clear();
        }
        for &brow in self.kq.pools.get(&pool).map_or(&[][..], |q| &q.counted[..]) {
            if let Some(h) = self.tables.kq_backend(brow) {
                h.counters.clear();
            }
        }
    }

    /// Counters of the pool's queue, its backends' summed with its gone
    /// ones': (xacts, queries, query_us, bytes_sent, xact_us, waits).
    pub fn kq_counters(&self, pool: usize) -> Option<[i64; 6]> {
        if self.kq.base == 0 {
            return None;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let prow = self.pools.get(pool)?.row;
        let mut sum = [0u64; 6];
        let mut add = |c: &crate::shmem::KqCounters| {
            for (s, a) in sum.iter_mut().zip(c.all()) {
                *s = s.wrapping_add(a.load(Relaxed));
            }
        };
        add(&self.tables.kq_pool(prow)?.gone);
        for &brow in self.kq.pools.get(&pool).map_or(&[][..], |q| &q.counted[..]) {
            if let Some(h) = self.tables.kq_backend(brow) {
                add(&h.counters);
            }
        }
        Some(sum.map(|v| v.min(i64::MAX as u64) as i64))
    }
}
