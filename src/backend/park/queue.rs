//! The transaction boundary of a backend lent to its pool's kernel queue
//! (`pooler::kq`, `super::super::kq`): lent on `KQ_LEND`, then at each
//! ReadyForQuery(I) of a client taken from the queue: requeue it (or give
//! it back, or keep it as an attached client when its session is pinned),
//! keep it idle while nobody waits (`hold_idle_clients`), or take the next
//! ready client at once. A child of `park`, whose `Parking` state it shares.
use super::*;

/// `KQ_LEND`: this backend waits on pool row `pool_row`'s kernel queue from
/// now on. One that cannot open it says it is parked (`KQ_PARKED`), the
/// pooler's to hand clients to.
pub(super) fn lend(p: &mut Parking, pool_row: usize) {
    if p.row.is_none() {
        p.row = crate::shmem::own_backend_row();
    }
    if p.queue.is_none() {
        p.queue = p.row.and_then(|row| crate::backend::kq::Queue::open(p.control, row, pool_row));
    }
    let Some(q) = p.queue.as_ref() else {
        let mut msg = Vec::with_capacity(5);
        control::write_empty(&mut msg, control::KQ_PARKED);
        return write_all(p.control, &crate::backend::ring::marked(p.row, &msg));
    };
    if p.queue_wait.is_none() {
        p.hold = HoldWatch::new();
        let hold_fd = p.hold.as_ref().map_or(-1, |h| h.fd());
        p.queue_wait = Some(ParkWaitSet::with_queue(p.control, q.fd(), hold_fd));
    }
    q.mark_busy();
    p.lent = true;
}

/// The boundary of a client taken from the kernel queue. True when handled
/// (the client back in the queue or the pooler's, and this backend on to
/// its next client or parked); false when this backend keeps it as an
/// attached client (its session is pinned now, or holds sequence values
/// for `nextgres.sequence_hold`: `KQ_RETURNED_KEPT`), and the boundary goes
/// on as for any attached client.
pub(super) fn kq_boundary(p: &mut Parking, mut leaving: bool, unbound: bool) -> bool {
    if p.queue.is_none() {
        return false;
    }
    let Some(mut s) = p.served.take() else { return false };
    if !leaving && pin_now(unbound) != Pin::None {
        hold_forget(p, s.fd);
        let q = p.queue.as_ref().expect("checked above");
        q.keep(p.control, &s);
        p.lent = false;
        p.kept_from_queue = true;
        return false;
    }
    // Requeued, the client would be closed unseen with the queue its
    // pooler left behind: told instead, as the pooler's idle clients.
    if !leaving && pooler_left(p) {
        pooler_gone();
    }
    let n = crate::backend::comm::take_counters();
    p.queue.as_ref().expect("checked above").count(&mut s, n.queries, n.query_us, n.bytes_sent);
    // Kept while no other client is ready (hold_idle_clients), or on to
    // the one that is.
    let mut next = None;
    if !leaving {
        match kq_hold(p, &s) {
            Hold::Serve => {
                p.queue.as_ref().expect("checked above").held_again(&s);
                p.served = Some(s);
                return true;
            }
            Hold::Next(a, t, waited) => next = Some((a, t, waited)),
            Hold::Release { leaving: l } => leaving = l,
        }
    }
    hold_forget(p, s.fd);
    let q = p.queue.as_ref().expect("checked above");
    let settings = sess::take_session_settings();
    let statements = session::note_release(settings.as_deref(), sess::take_statements());
    let defaults = session::take_reported_defaults();
    let told = session::take_told();
    // As `release_prepare`: an image too large for the control channel ends
    // the session with a FATAL the client receives (its socket is still
    // `sock`), not a silent close.
    let image_bytes = [settings.as_ref().unwrap_or(&s.attach.image.settings), defaults.as_ref().unwrap_or(&s.attach.image.defaults)]
        .iter()
        .flat_map(|v| v.iter())
        .map(|(n, v)| n.len() + v.len() + 2)
        .sum::<usize>()
        + statements.as_ref().unwrap_or(&s.attach.image.statements).byte_len();
    image_fits(image_bytes);
    glue::febe_detach();
    show_ssl(None);
    // The client's socket is closed by the release: nothing may write to it.
    glue::set_port_sock(p.control);
    let image = crate::backend::kq::Image { settings, statements, defaults, told };
    let client = p.attached.take();
    let outcome = q.release(p.control, &mut s, image, leaving);
    // Given back: a cancel for the client from now on finds it so.
    crate::backend::cancel::released(p.row, client.unwrap_or(s.attach.client_id));
    match outcome {
        crate::backend::kq::Released::Requeued | crate::backend::kq::Released::Returned => {}
        crate::backend::kq::Released::TooLarge => {
            // Kept (the pooler's books say attached): given back the
            // pooler's way, with its whole image, and parked.
            if let Some((_, t, _)) = next.take() {
                q.put_back(p.control, t);
            }
            p.lent = false;
            let _ = nix::unistd::close(s.fd);
            let img = std::mem::take(&mut s.attach.image);
            let released = Released {
                client_id: client.unwrap_or(s.attach.client_id),
                queries: 0,
                query_us: 0,
                bytes_sent: 0,
                settings: Some(img.settings),
                statements: Some(img.statements),
                defaults: Some(img.defaults),
                told: Some(img.told),
            };
            let mut msg = Vec::with_capacity(256);
            control::write_released(&mut msg, &released);
            write_all(p.control, &crate::backend::ring::marked(p.row, &msg));
            crate::backend::cancel::released(p.row, released.client_id);
            park(p);
            return true;
        }
    }
    crate::backend::sched::follow_setting();
    let q = p.queue.as_ref().expect("checked above");
    // Taken while the kept client was attached: looked at now (its bytes
    // read for the server); one that sent nothing after all or left is
    // as none taken.
    if let Some((a, t, waited)) = next.and_then(|(a, t, w)| q.checked(p.control, t).map(|t| (a, t, w))) {
        // Ready before this backend was free: it waited for one (not so
        // one that came while this backend kept its client idle).
        if waited {
            q.count_wait();
        }
        let timer_was_on = glue::idle_session_timer_suspend();
        glue::report_parked();
        attach_queued(p, a, t, timer_was_on);
        return true;
    }
    // Recalled, or the next ready client (it waited for this backend), or
    // a wait on the queue: `park` looks first.
    park(p);
    true
}

/// What `kq_hold` found.
enum Hold {
    /// The kept client's next message is here: serve it.
    Serve,
    /// Another client was ready and is taken: release the kept one, then
    /// serve this one. True: it was ready at the boundary (it waited for a
    /// backend); false: it came while the kept client idled, taken at once.
    Next(Attach, crate::backend::kq::Served, bool),
    /// Release the client (to the queue, or the pooler when recalled;
    /// `leaving`: it hung up or sent Terminate).
    Release { leaving: bool },
}

/// With `hold_idle_clients`, a client taken from the kernel queue stays with
/// this backend at ReadyForQuery(I) while its pool has no more clients than
/// backends and none had to wait lately, as on the handoff path: its next query finds its session here
/// (prepared statements, settings) with no re-arm, no socket duplicated
/// from the pooler and no other backend woken. Its owner word still says
/// this backend serves it (the views show it attached), so the pooler's
/// recall works as for a client inside a transaction: it sets the recall
/// bit, then wakes this backend with `KQ_RECALL`. The backend waits on the
/// client, the queue, its control socket and its latch at once; another
/// ready client (taken first, so a burst never finds every backend
/// giving up its client for one query), a recall of this backend or of
/// the client, or the client leaving ends the keep.
fn kq_hold(p: &mut Parking, s: &crate::backend::kq::Served) -> Hold {
    let release = Hold::Release { leaving: false };
    if !crate::settings::HOLD_IDLE_CLIENTS.get() {
        return release;
    }
    let q = p.queue.as_ref().expect("a served client's queue");
    if q.recalled() || q.client_recalled(s) {
        return release;
    }
    // Saturated moments ago: kept, the client's next query would be served
    // ahead of clients already queued (as `linger`). Measured (PostgreSQL
    // 17, pool 16, pgbench -S): 100 clients p99 7.5 ms kept, 2.8 given
    // back; 1,000 clients 61 / 46 ms (BENCHMARKS.md, issue 15 eighteenth
    // step). Only where clients outnumber backends: with no more clients
    // than backends a queued query "waits" only the moments a backend
    // takes to requeue its last client, and not keeping clients would make
    // more such waits (16 clients, -M prepared: 52,600 tps against 66,700
    // kept). Where they do, a client ready in the queue goes first (one
    // look, no wait): it was ready before this backend was free.
    if crate::shmem::pool_outnumbered(p.pool_row) {
        // Saturated: given back, and the next ready client taken then (one
        // look at the queue per transaction, in `park`).
        if q.waited_within(SATURATED_WITHIN_US) {
            return release;
        }
        if let Some((a, t)) = q.take(p.control, crate::backend::kq::Check::Later) {
            return Hold::Next(a, t, true);
        }
    }
    // Not outnumbered, a client ready in the queue has a backend free for
    // it (at most as many clients as backends, this one keeping one of
    // them): this one neither looks at the queue here nor takes from it
    // while it keeps its client (`queue_watch`). Like a direct backend, it
    // reads its client first and waits only when nothing is there.
    let Some(h) = p.hold.as_mut() else { return release };
    if !h.watch(s.fd) {
        return release;
    }
    // Idle from here, as a direct client in ReadCommand: no connection
    // check until its next statement (`linger`).
    glue::connection_check_stop();
    if let Some(h) = kept_client_input(p, s) {
        return h;
    }
    loop {
        queue_watch(p);
        let Some(w) = &p.queue_wait else { return release };
        let event = w.wait(-1);
        match event {
            ParkEvent::PostmasterDeath => crate::pg::proc_exit(1),
            ParkEvent::Latch => {
                glue::linger_service_interrupts();
                continue;
            }
            ParkEvent::Control => {
                if !read_control(p) {
                    // The pooler is gone: the kept client is still `sock`.
                    pooler_gone();
                }
            }
            ParkEvent::Hold => {
                if let Some(h) = kept_client_input(p, s) {
                    return h;
                }
            }
            ParkEvent::Queue | ParkEvent::Timeout => {}
        }
        if let Some(h) = kq_hold_ends(p, s) {
            return h;
        }
    }
}

/// What the kept client sent, if anything: its next message (serve it,
/// unless the pooler recalled it: then nothing is read and the message
/// waits for whoever gets it), a hang-up or a Terminate (it leaves), or
/// None: nothing yet. The bytes are read ahead for the server
/// (`kq::client_input`): its own read of the message then makes no system
/// call, as a direct backend makes one read per message.
fn kept_client_input(p: &Parking, s: &crate::backend::kq::Served) -> Option<Hold> {
    let q = p.queue.as_ref().expect("a served client's queue");
    // Checked before reading: the pooler sets the recall bit before it
    // takes the client, so a client read here is still this backend's (a
    // recall after the check finds it inside a transaction, given back at
    // its end, as any served client).
    if q.client_recalled(s) {
        return Some(Hold::Release { leaving: false });
    }
    match crate::backend::kq::client_input(s.fd) {
        crate::backend::kq::Input::Nothing => None,
        crate::backend::kq::Input::Leaving => Some(Hold::Release { leaving: true }),
        crate::backend::kq::Input::Message => Some(Hold::Serve),
    }
}

/// What ends a keep, checked after each wake-up: a recall (of this backend
/// or of the kept client) gives the client back; another client ready in
/// the queue is taken (`Hold::Next`: it came while this one idled; the kept
/// one is released after it). None: keep waiting.
fn kq_hold_ends(p: &Parking, s: &crate::backend::kq::Served) -> Option<Hold> {
    let q = p.queue.as_ref().expect("a served client's queue");
    if q.recalled() || q.client_recalled(s) {
        return Some(Hold::Release { leaving: false });
    }
    // Only where clients outnumber backends: otherwise a free backend
    // takes it, and this one taking it would send its own idle client to
    // the queue, where another backend keeping one would take it in turn,
    // and so on: every client going round the backends (a session switch
    // each time) for as long as the pool ran (seen with 16 clients over 16
    // backends: 86% of transactions went through the queue).
    if !queue_watch(p) {
        return None;
    }
    q_take(p).map(|(a, t)| Hold::Next(a, t, false))
}

/// A keeping backend watches the queue only while its pool's clients
/// outnumber its backends (the pooler wakes lent backends when they come
/// to: `Pooler::kq_outnumbered_wake`). Returns whether they do.
fn queue_watch(p: &Parking) -> bool {
    let outnumbered = crate::shmem::pool_outnumbered(p.pool_row);
    if let Some(w) = &p.queue_wait {
        w.watch_queue(outnumbered);
    }
    outnumbered
}

fn q_take(p: &Parking) -> Option<(Attach, crate::backend::kq::Served)> {
    // The kept client is still attached: the next one is looked at once
    // it has gone (`Queue::checked`).
    p.queue.as_ref().expect("a served client's queue").take(p.control, crate::backend::kq::Check::Later)
}

/// The kept client's socket leaves the hold watch (before it is closed or
/// given back: a registration outlives a descriptor while the pooler's
/// duplicate is open).
fn hold_forget(p: &mut Parking, fd: RawFd) {
    if let Some(h) = p.hold.as_mut() {
        h.forget(fd);
    }
}

/// An epoll instance holding the socket of the client a lent backend keeps
/// idle (`kq_hold`), or nothing; it sits in the backend's queue wait set, so
/// one wait covers the queue, the control socket, the latch and the client.
pub(super) struct HoldWatch {
    ep: nix::sys::epoll::Epoll,
    client: Option<RawFd>,
}

impl HoldWatch {
    fn new() -> Option<HoldWatch> {
        let ep = nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC).ok()?;
        Some(HoldWatch { ep, client: None })
    }

    fn fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.ep.0.as_raw_fd()
    }

    /// Watches `fd` (the one watched already, or alone). False when it
    /// cannot (the backend does not keep the client then).
    fn watch(&mut self, fd: RawFd) -> bool {
        if self.client == Some(fd) {
            return true;
        }
        if let Some(old) = self.client {
            self.forget(old);
        }
        use nix::sys::epoll::{EpollEvent, EpollFlags};
        let ev = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP, fd as u64);
        // SAFETY: borrowed for one call; `fd` is the served client's open socket.
        if self.ep.add(unsafe { BorrowedFd::borrow_raw(fd) }, ev).is_err() {
            return false;
        }
        self.client = Some(fd);
        true
    }

    fn forget(&mut self, fd: RawFd) {
        if self.client == Some(fd) {
            // SAFETY: borrowed for one call; still open (closed after this).
            let _ = self.ep.delete(unsafe { BorrowedFd::borrow_raw(fd) });
            self.client = None;
        }
    }
}

/// Attaches a client taken from the kernel queue.
pub(super) fn attach_queued(p: &mut Parking, mut a: Attach, mut s: crate::backend::kq::Served, timer_was_on: bool) {
    // The slot says this backend released the client last; its session is
    // still the client's only if it served nobody since.
    if p.last_client != a.client_id {
        a.flags |= control::FLAG_NEW_CLIENT;
    }
    if a.flags & control::FLAG_SESSION_START != 0 {
        s.attach.image.defaults = session::login_defaults();
    }
    let fd = s.fd;
    p.served = Some(s);
    attach_client(p, (a, fd), timer_was_on);
}

