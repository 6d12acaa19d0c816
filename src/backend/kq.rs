//! A pooled backend's side of the kernel queue (`pooler::kq`,
//! `nextgres_core::kq`): lent to its pool's queue, it takes a ready client
//! from it (a swap of the client's owner word decides), serves its
//! transaction, and at ReadyForQuery(I) writes the client's ATTACH (its
//! session image as this backend leaves it) to the client's slot and
//! re-arms it in the queue, then takes the next ready one. No word to the
//! pooler per transaction; it counts them in its own shared row
//! (`shmem::KqCounters`).
//!
//! The client's socket is duplicated from the pooler (`pidfd_getfd`) and
//! held at the pooler's own number for it (`dup3`), so that this backend's
//! `EPOLL_CTL_MOD` names the pooler's registration; it is closed once the
//! client is re-armed or given back.
use nextgres_core::control::{self, Attach};
use nextgres_core::kq;
use crate::kq_fd::{fd_free, ready_flags};
use nextgres_core::proto::frame::parse_message;
use nix::sys::epoll::{Epoll, EpollEvent, EpollTimeout};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;

/// This backend's handle on its pool's queue.
pub struct Queue {
    ep: Epoll,
    base: i32,
    /// This backend's shared row.
    row: u32,
    pool_row: usize,
}

/// A client taken from the queue, while this backend serves it.
pub struct Served {
    pub client_row: usize,
    pub gen: u64,
    /// Its ATTACH as taken, its image kept up to date at each boundary.
    pub attach: Attach,
    /// Its socket, at `base + client_row`.
    pub fd: RawFd,
    pub since: std::time::Instant,
}

/// What `Queue::release` did with the client.
pub enum Released {
    /// Back in the queue.
    Requeued,
    /// The pooler's again (recalled, or leaving): `KQ_RETURNED` sent.
    Returned,
    /// Its ATTACH outgrew the slot: the caller keeps it as an attached
    /// client (`KQ_RETURNED_KEPT` is sent) and gives it back the pooler's
    /// way, with its whole image.
    TooLarge,
}

impl Queue {
    /// This backend's duplicate of pool row `pool_row`'s queue; None when
    /// the server has no kernel queue or it cannot be taken (then the
    /// backend tells the pooler it is parked instead).
    pub fn open(control: RawFd, row: usize, pool_row: usize) -> Option<Queue> {
        let t = crate::shmem::tables()?;
        let base = t.kq_fd_base();
        if base == 0 || !t.backend_row_is_mine(row) {
            return None;
        }
        let (_, clients, _) = t.capacities();
        // The client sockets' fixed numbers are above the soft limit this
        // backend started with, perhaps: raised to the hard one, as the
        // pooler's (PostgreSQL's own file accounting is unaffected).
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
            if soft < hard {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
            }
        }
        let ep = match super::slot::pooler_socket(control, base + (clients + pool_row) as i32) {
            Ok(ep) => ep,
            Err(e) => {
                // The pooler lends this backend no more (it serves through
                // the handoff path).
                log::info!("could not take the pool's kernel queue from the pooler with pidfd_getfd ({e}): this backend serves clients handed to it only");
                return None;
            }
        };
        // SAFETY: pidfd_getfd just gave this process that descriptor.
        let ep = Epoll(unsafe { OwnedFd::from_raw_fd(ep) });
        Some(Queue { ep, base, row: row as u32, pool_row })
    }

    /// The queue's descriptor (for the park wait set).
    pub fn fd(&self) -> RawFd {
        self.ep.0.as_raw_fd()
    }

    /// Is a client of the queue ready and untaken now? A look (`poll(2)`
    /// on the epoll descriptor) that takes nothing: its one-shot events
    /// stay for the backend that takes them.
    pub fn ready_now(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.ep.0.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
    }

    /// The next ready client this backend may serve, taken, its socket at
    /// its fixed number, its ATTACH flags set for this backend. Clients
    /// found leaving (end of file, Terminate) are given back on `control`.
    /// None when none is ready. `check`: how what the client sent is
    /// looked at (`Check`).
    pub fn take(&self, control: RawFd, check: Check) -> Option<(Attach, Served)> {
        self.hold_clear();
        let t = crate::shmem::tables()?;
        let mut events = [EpollEvent::empty(); 1];
        let mut buf = Vec::new();
        // Each round takes one ready event; stale ones (taken back) are
        // dropped. Bounded: a storm of leaving clients is met at the next
        // boundary.
        for _ in 0..16 {
            match self.ep.wait(&mut events, EpollTimeout::ZERO) {
                Ok(1) => {}
                _ => return None,
            }
            let (row, gen) = kq::event_parts(events[0].data());
            let Some(k) = t.kq_row(row) else { continue };
            if !kq::take(&k.owner, self.row, gen) {
                continue;
            }
            k.takes.fetch_add(1, Ordering::Relaxed);
            self.mark_busy();
            let copy = k.slot.read(&mut buf);
            let attach = match parse_message(&buf, control::MAX_CONTROL_MESSAGE) {
                Ok(Some((m, _))) if m.tag == control::ATTACH && copy.ticket == gen => control::parse_attach(m.body).ok(),
                _ => None,
            };
            let Some(mut attach) = attach else {
                super::park::fatal("malformed ATTACH in a kernel queue slot")
            };
            let number = self.base + row as i32;
            let fd = match self.socket(control, number) {
                Ok(fd) => fd,
                // This backend cannot hold client sockets (out of
                // descriptors, or its number is taken here): it ends, as
                // one that cannot receive an ATTACH's socket does, its
                // FATAL on the control socket; the client, still this
                // backend's in its owner word, gets it from the pooler
                // (`kq_backend_gone`), so it is neither lost nor retried
                // here for ever.
                Err(e) => super::park::fatal(&format!("could not receive the client socket from the pooler: {e}")),
            };
            // A hang-up or a lone Terminate: nothing to serve.
            let input = match check {
                Check::Later => Input::Message,
                Check::ReadAhead => client_input(fd),
            };
            match input {
                Input::Message => {}
                Input::Nothing => {
                    // Ready without bytes (spurious): back in the queue.
                    if kq::requeue(&k.owner, self.row, gen) {
                        self.rearm(fd, row, gen);
                    } else {
                        self.returned(control, row, attach.client_id, 0);
                    }
                    self.cancel_void(attach.client_id);
                    let _ = nix::unistd::close(fd);
                    continue;
                }
                Input::Leaving => {
                    let _ = nix::unistd::close(fd);
                    self.give_back(control, row, gen, attach.client_id, control::KQ_RETURNED_LEAVING);
                    continue;
                }
            }
            // Same session only if this backend released it last.
            if k.last_backend.load(Ordering::Relaxed) == self.row as i32 && attach.flags & control::FLAG_SESSION_START == 0 {
                attach.flags &= !control::FLAG_NEW_CLIENT;
            } else {
                attach.flags |= control::FLAG_NEW_CLIENT;
            }
            attach.flags &= !control::FLAG_HOLD_IDLE;
            let served = Served { client_row: row, gen, attach: clone_attach(&attach), fd, since: std::time::Instant::now() };
            return Some((attach, served));
        }
        None
    }

    /// A client taken with `Check::Later`, now that no client is attached:
    /// its first bytes read for the server (`Check::ReadAhead`). Some: serve
    /// it. None: it had sent nothing after all (back in the queue) or it
    /// left (given back).
    pub fn checked(&self, control: RawFd, s: Served) -> Option<Served> {
        match client_input(s.fd) {
            Input::Message => Some(s),
            Input::Nothing => {
                self.put_back(control, s);
                None
            }
            Input::Leaving => {
                let _ = nix::unistd::close(s.fd);
                self.give_back(control, s.client_row, s.gen, s.attach.client_id, control::KQ_RETURNED_LEAVING);
                None
            }
        }
    }

    /// The client's socket from the pooler, at `number` in this process.
    fn socket(&self, control: RawFd, number: RawFd) -> Result<RawFd, String> {
        if !fd_free(number) {
            return Err(format!("descriptor {number} is in use in this backend"));
        }
        let got = super::slot::pooler_socket(control, number).map_err(|e| e.desc().to_lowercase())?;
        let placed = nix::unistd::dup3(got, number, nix::fcntl::OFlag::O_CLOEXEC);
        let _ = nix::unistd::close(got);
        placed.map_err(|e| e.desc().to_lowercase())
    }

    /// Re-arms client row `row`'s registration (this backend holds its
    /// socket at the pooler's number). One the pooler removed meanwhile
    /// (ENOENT) stays removed.
    ///
    /// The word says `Queued{gen}` before the re-arm, so between the two
    /// the pooler may take the client back and queue it again under a new
    /// registration; this re-arm would then give that registration this
    /// one's stale event data, which every backend drops, leaving the
    /// client unserved until the pooler's look. So the word is read again
    /// after: queued under another registration, it is re-armed with that
    /// one's (the pooler's own `EPOLL_CTL_ADD` had the same).
    fn rearm(&self, fd: RawFd, row: usize, gen: u64) {
        let t = crate::shmem::tables();
        let word = t.as_ref().and_then(|t| t.kq_row(row)).map(|k| &k.owner);
        let mut gen = gen;
        for _ in 0..4 {
            let mut ev = EpollEvent::new(ready_flags(), kq::event_data(row, gen));
            // SAFETY: borrowed for one call; `fd` is open in this process.
            if self.ep.modify(unsafe { BorrowedFd::borrow_raw(fd) }.as_fd(), &mut ev).is_err() {
                return;
            }
            match word.map(kq::load) {
                Some(kq::Owner::Queued { gen: now }) if now != gen => gen = now,
                _ => return,
            }
        }
    }

    /// Gives client row `row` back to the pooler (owner word, then
    /// `KQ_RETURNED`).
    fn give_back(&self, control: RawFd, row: usize, gen: u64, client_id: u64, flags: u8) {
        crate::pg::session::read_ahead_forget(self.base + row as i32);
        let Some(t) = crate::shmem::tables() else { return };
        let Some(k) = t.kq_row(row) else { return };
        if kq::give_back(&k.owner, self.row, gen) {
            self.returned(control, row, client_id, flags);
        }
        self.cancel_void(client_id);
    }

    /// A client taken and given up again (after the owner word says so): a
    /// cancel the pooler posted for it here meanwhile is void
    /// (`shmem::cancel`); it is no longer this backend's to run.
    fn cancel_void(&self, client_id: u64) {
        super::cancel::released(Some(self.row as usize), client_id);
    }

    fn returned(&self, control: RawFd, row: usize, client_id: u64, flags: u8) {
        // The developer option widens the window in which the word says
        // `Returned` and the pooler has no message yet (tests only).
        let delay = crate::settings::DEBUG_RETURN_DELAY.get();
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay as u64));
        }
        let mut msg = Vec::with_capacity(18);
        control::write_kq_returned(&mut msg, row as u32, client_id, flags);
        super::park::write_all(control, &super::ring::marked(Some(self.row as usize), &msg));
    }

    /// The served client's transaction ended (ReadyForQuery(I)): counted in
    /// this backend's row (`KqBackend::counters`), its time from `s.since`.
    /// At once, not in batches: the pooler publishes them when a client
    /// leaves, and `nextgres.pools` must then count its last transactions
    /// (a batched version missed them: BENCHMARKS.md, session 34).
    pub fn count(&self, s: &mut Served, queries: u64, query_us: u64, bytes_sent: u64) {
        let Some(t) = crate::shmem::tables() else { return };
        if let Some(h) = t.kq_backend(self.row as usize) {
            // Its own row's line, which no other backend writes, so it
            // stays in this core's cache. Atomic adds all the same: the
            // pooler zeroes it (reset_stats) or moves it to the pool's.
            let c = &h.counters;
            c.xacts.fetch_add(1, Ordering::Relaxed);
            c.queries.fetch_add(queries, Ordering::Relaxed);
            c.query_us.fetch_add(query_us, Ordering::Relaxed);
            c.bytes_sent.fetch_add(bytes_sent, Ordering::Relaxed);
            c.xact_us.fetch_add(s.since.elapsed().as_micros() as u64, Ordering::Relaxed);
            h.xacts.fetch_add(1, Ordering::Relaxed);
        }
        // The client's own count: its row's owner word is on that line,
        // which this backend reads at each boundary anyway.
        if let Some(k) = t.kq_row(s.client_row) {
            k.xacts.fetch_add(1, Ordering::Relaxed);
        }
        s.since = std::time::Instant::now();
    }

    /// The kept client sent its next query (`park::kq_hold`): its row's take
    /// count moves as if it were taken, so the pooler counts the bytes it
    /// received (its look once a second).
    pub fn held_again(&self, s: &Served) {
        let Some(t) = crate::shmem::tables() else { return };
        if let Some(k) = t.kq_row(s.client_row) {
            k.takes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Is the served client no longer this backend's to keep (the pooler
    /// set its recall bit, or the word names another owner)?
    pub fn client_recalled(&self, s: &Served) -> bool {
        let Some(t) = crate::shmem::tables() else { return true };
        let Some(k) = t.kq_row(s.client_row) else { return true };
        kq::load(&k.owner) != kq::Owner::Taken { row: self.row, gen: s.gen, recall: false }
    }

    /// At the served client's ReadyForQuery(I) (after `count`): its image
    /// (the parts that changed) into its ATTACH, the ATTACH into its slot,
    /// the client back in the queue (or to the pooler when recalled or
    /// `leaving`); its socket closed here unless `TooLarge`.
    pub fn release(&self, control: RawFd, s: &mut Served, image: Image, leaving: bool) -> Released {
        crate::pg::session::read_ahead_forget(s.fd);
        let Some(t) = crate::shmem::tables() else { return Released::Returned };
        let Some(k) = t.kq_row(s.client_row) else { return Released::Returned };
        if leaving {
            self.give_back(control, s.client_row, s.gen, s.attach.client_id, control::KQ_RETURNED_LEAVING);
            let _ = nix::unistd::close(s.fd);
            return Released::Returned;
        }
        // Only while the client is still this backend's: one that served it
        // under a pooler since restarted (the shared rows cleared, the row
        // maybe another client's now) must not write that client's slot.
        match kq::load(&k.owner) {
            kq::Owner::Taken { row, gen, .. } if row == self.row && gen == s.gen => {}
            _ => {
                let _ = nix::unistd::close(s.fd);
                return Released::Returned;
            }
        }
        let a = &mut s.attach;
        if let Some(v) = image.settings {
            a.image.settings = v;
        }
        if let Some(v) = image.statements {
            a.image.statements = v;
        }
        if let Some(v) = image.defaults {
            a.image.defaults = v;
        }
        if let Some(v) = image.told {
            a.image.told = v;
        }
        a.flags = control::FLAG_NEW_CLIENT | control::FLAG_QUEUED;
        let mut msg = Vec::with_capacity(control::attach_size_hint(a));
        control::write_attach(&mut msg, a);
        if !k.slot.write(s.gen, &msg, self.base + s.client_row as i32, 0) {
            if kq::give_back(&k.owner, self.row, s.gen) {
                self.returned(control, s.client_row, a.client_id, control::KQ_RETURNED_KEPT);
                return Released::TooLarge;
            }
            let _ = nix::unistd::close(s.fd);
            return Released::Returned;
        }
        k.last_backend.store(self.row as i32, Ordering::Relaxed);
        let out = if kq::requeue(&k.owner, self.row, s.gen) {
            self.rearm(s.fd, s.client_row, s.gen);
            Released::Requeued
        } else {
            // Recalled: the word says the pooler's; the slot has the image.
            self.returned(control, s.client_row, a.client_id, 0);
            Released::Returned
        };
        let _ = nix::unistd::close(s.fd);
        out
    }

    /// Puts a client taken but not served back in the queue (or gives it to
    /// the pooler when recalled meanwhile); its socket closes here.
    pub fn put_back(&self, control: RawFd, s: Served) {
        crate::pg::session::read_ahead_forget(s.fd);
        if let Some(k) = crate::shmem::tables().as_ref().and_then(|t| t.kq_row(s.client_row)) {
            if kq::requeue(&k.owner, self.row, s.gen) {
                self.rearm(s.fd, s.client_row, s.gen);
            } else {
                self.returned(control, s.client_row, s.attach.client_id, 0);
            }
        }
        self.cancel_void(s.attach.client_id);
        let _ = nix::unistd::close(s.fd);
    }

    /// Keeps a served client as an attached one (its session pinned): the
    /// pooler's books say so from `KQ_RETURNED_KEPT` on.
    pub fn keep(&self, control: RawFd, s: &Served) {
        self.give_back(control, s.client_row, s.gen, s.attach.client_id, control::KQ_RETURNED_KEPT);
    }

    /// The cancel hand-shake (`shmem::KqBackend::hold`): waits while the
    /// pooler decides whether to signal this backend; a signal it sent is
    /// pending now, and is delivered (and then cleared as stale by the
    /// attach) before any client taken after this runs a query.
    pub fn hold_clear(&self) {
        let Some(t) = crate::shmem::tables() else { return };
        let Some(h) = t.kq_backend(self.row as usize) else { return };
        loop {
            match h.hold.load(Ordering::SeqCst) {
                0 => return,
                1 => std::thread::yield_now(),
                _ => {
                    let _ = h.hold.compare_exchange(2, 0, Ordering::SeqCst, Ordering::SeqCst);
                }
            }
        }
    }

    /// Has the pooler asked this backend back (`KqBackend::recall`)?
    pub fn recalled(&self) -> bool {
        crate::shmem::tables().is_some_and(|t| t.kq_backend(self.row as usize).is_some_and(|h| h.recall.load(Ordering::SeqCst) != 0))
    }

    /// A client taken without this backend waiting for one: its query
    /// waited for a backend (counted in the pool's `waits`).
    pub fn count_wait(&self) {
        let Some(t) = crate::shmem::tables() else { return };
        if let Some(h) = t.kq_backend(self.row as usize) {
            h.counters.waits.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(p) = t.kq_pool(self.pool_row) {
            // Every backend of a saturated pool comes here at each
            // transaction: a store only when the mark is a millisecond old
            // keeps the line mostly shared.
            let now = crate::shmem::mono_now();
            let last = p.waited_at.load(Ordering::Relaxed);
            if now - last >= 1000 {
                p.waited_at.store(now, Ordering::Relaxed);
                // The first wait after a quiet spell: the pooler counts this
                // queue as idle until its next look, up to a second away,
                // and grows the pool for its clients only once it knows
                // (`pooler::kq::kq_waited_wake`). At most one signal per
                // quiet spell (a few where backends race), none while the
                // pool is at its size.
                if !crate::shmem::kq_waited_recently(last, now) && crate::shmem::pool_has_room(self.pool_row) {
                    t.wake_pooler();
                }
            }
        }
    }

    /// A client of this queue waited for a backend within `within_us`
    /// (µs): the pool is saturated, though none may be ready at this
    /// instant (queries come in bursts).
    pub fn waited_within(&self, within_us: i64) -> bool {
        let Some(t) = crate::shmem::tables() else { return false };
        let Some(p) = t.kq_pool(self.pool_row) else { return false };
        crate::shmem::waited_within(p.waited_at.load(Ordering::Relaxed), crate::shmem::mono_now(), within_us)
    }

    /// About to wait on the queue with no client: notes since when, once
    /// (the pooler's idle_backend_timeout for lent backends).
    pub fn mark_idle(&self) {
        let Some(t) = crate::shmem::tables() else { return };
        let Some(h) = t.kq_backend(self.row as usize) else { return };
        if h.idle_since.load(Ordering::Relaxed) == 0 {
            h.idle_since.store(crate::shmem::mono_now(), Ordering::Relaxed);
        }
    }

    /// Serving, lent again or no longer lent: not idle (clears a mark left
    /// by an earlier lending, or an earlier backend of this row).
    pub fn mark_busy(&self) {
        let Some(t) = crate::shmem::tables() else { return };
        if let Some(h) = t.kq_backend(self.row as usize) {
            h.idle_since.store(0, Ordering::Relaxed);
        }
    }

    /// Answers a recall: the flag down, then `KQ_PARKED`.
    pub fn unlend(&self, control: RawFd) {
        self.mark_busy();
        if let Some(t) = crate::shmem::tables() {
            if let Some(h) = t.kq_backend(self.row as usize) {
                h.recall.store(0, Ordering::SeqCst);
            }
        }
        let mut msg = Vec::with_capacity(5);
        control::write_empty(&mut msg, control::KQ_PARKED);
        super::park::write_all(control, &super::ring::marked(Some(self.row as usize), &msg));
    }
}

/// What a boundary hands `Queue::release`: the parts of the session image
/// that changed (None: unchanged).
pub struct Image {
    pub settings: Option<Vec<(String, String)>>,
    pub statements: Option<control::StatementList>,
    pub defaults: Option<Vec<(String, String)>>,
    pub told: Option<control::Told>,
}

fn clone_attach(a: &Attach) -> Attach {
    Attach {
        client_id: a.client_id,
        flags: a.flags,
        pool_row: a.pool_row,
        key_pid: a.key_pid,
        addr: a.addr.clone(),
        local: a.local.clone(),
        settings: a.settings.clone(),
        image: a.image.clone(),
        authn: a.authn.clone(),
        tls: None,
        ahead: None,
    }
}

/// How `Queue::take` looks at what a taken client sent before it returns
/// it (a hang-up or a lone Terminate is given back, a spurious readiness
/// put back).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Its bytes read for the server (no client attached, and this one will
    /// be).
    ReadAhead,
    /// Not yet: a client is attached still (`Queue::checked` once it has
    /// gone).
    Later,
}

/// What a client taken from the queue (or kept) has sent.
pub enum Input {
    /// A message (or its first bytes): serve it.
    Message,
    /// Nothing yet.
    Nothing,
    /// End of file, a socket error or a lone Terminate: it leaves.
    Leaving,
}

/// A lone Terminate (protocol message formats).
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// What the client on `fd` has sent: its bytes are read for the server
/// (`sess::read_ahead`: one system call where a look and the server's own
/// read were two), so it must then be served or forgotten; where recv() is
/// not redirected, a MSG_PEEK look. A Terminate read ahead is dropped.
pub fn client_input(fd: RawFd) -> Input {
    use crate::pg::session::{self as sess, ReadAhead};
    match sess::read_ahead(fd) {
        ReadAhead::Nothing => Input::Nothing,
        ReadAhead::Closed => Input::Leaving,
        ReadAhead::Read { len, head } if len >= 5 && head == TERMINATE => {
            sess::read_ahead_clear();
            Input::Leaving
        }
        ReadAhead::Read { .. } => Input::Message,
        ReadAhead::Unavailable => {
            let mut peek = [0u8; 5];
            match nix::sys::socket::recv(fd, &mut peek, nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => Input::Nothing,
                Ok(0) | Err(_) => Input::Leaving,
                Ok(n) if n == 5 && peek == TERMINATE => Input::Leaving,
                Ok(_) => Input::Message,
            }
        }
    }
}
