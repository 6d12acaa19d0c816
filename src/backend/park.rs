//! The transaction boundary of a pooled backend: give the client back, park,
//! and attach the next client when the pooler sends its socket. Under
//! saturation the next client's ATTACH is already here (sent *ahead* while
//! this backend served the previous one, `pooler::ahead`), in a slot of its
//! shared row (`slot`) or on its control socket: the backend claims it in
//! shared memory and goes on without parking.
//!
//! fd layout: `MyProcPort->sock` is the fd the server talks to its client on.
//! At login it is the Unix socket to the pooler, which stays open as the
//! *control* fd. Attaching points `sock` at the client's socket as the
//! pooler passed it (no dup2() onto a fixed number: the FE/BE wait set's
//! socket entry follows, `glue::set_port_sock`); parking points it back at
//! the control fd (`release_socket`) and closes the client's, so `sock`
//! always names a live socket and the server never notices the switch. A
//! backend taking a client sent ahead goes straight from one client's
//! socket to the next: nothing in between writes to `sock`.
//!
//! A backend lent to its pool's kernel queue has a boundary of its own
//! (requeue, keep, or take the next ready client): the child module `queue`.
use super::session;
use crate::pg::glue::{self, LingerEvent, ParkEvent, ParkWaitSet};
use crate::pg::session::{self as sess, Pin};
use nextgres_core::control::{self, Attach, Released};
use nextgres_core::proto::frame::parse_message;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{BorrowedFd, RawFd};

mod queue;
use queue::{attach_queued, kq_boundary, lend, HoldWatch};

struct Parking {
    control: RawFd,
    wait: ParkWaitSet,
    /// Client currently attached (id the pooler gave it).
    attached: Option<u64>,
    /// Session mode: keep the client until it leaves.
    reserved: bool,
    /// Keep an idle client while nobody waits (nextgres.hold_idle_clients).
    hold_idle: bool,
    /// Row of the client's pool in the shared pools table.
    pool_row: usize,
    /// The pooler asked for the client back (another client waits).
    release_requested: bool,
    /// Bytes read from the control socket not yet consumed.
    inbuf: Vec<u8>,
    /// Client sockets received with them, in order: each ATTACH in `inbuf`
    /// owns the first one left (the pooler sends every ATTACH's socket with
    /// its first byte, and the kernel never merges two such sends in one read).
    fds: VecDeque<RawFd>,
    /// Pin last written to shared memory.
    pin: Pin,
    /// This backend's row in the shared backends table, once known.
    row: Option<usize>,
    /// When the current client was attached (its time slice starts).
    attached_at: std::time::Instant,
    /// Lent to its pool's kernel queue (`kq`): waits on it while parked,
    /// takes its next client from it at each boundary.
    lent: bool,
    /// A `KQ_LEND` read: the pool row to lend this backend to.
    lend_pending: Option<usize>,
    queue: Option<super::kq::Queue>,
    /// The park wait set with the queue in it.
    queue_wait: Option<ParkWaitSet>,
    /// The client taken from the queue that is attached now.
    served: Option<super::kq::Served>,
    /// The client attached last (its id): a client taken from the queue
    /// keeps this backend's session only if it is that one.
    last_client: u64,
    /// The attached client came from the kernel queue and stays here as an
    /// attached one (`KQ_RETURNED_KEPT`).
    kept_from_queue: bool,
    /// While it keeps such a client: since when the queue has looked ready
    /// at each look (`pool_load`).
    queue_ready_at: Option<std::time::Instant>,
    /// Watches the socket of the queued client this backend keeps idle
    /// (`kq_hold`); in `queue_wait` as its hold event.
    hold: Option<HoldWatch>,
    /// The pid of the pooler that logged this backend in (the peer of its
    /// control socket), 0 when unknown: `pooler_left`.
    pooler: i32,
}

thread_local! {
    static STATE: RefCell<Option<Parking>> = const { RefCell::new(None) };
}

/// Called from the flush wrapper after ReadyForQuery(I) reached the client,
/// or after a Flush that followed it with nothing answered since (input the
/// server ignored, `comm::take_unbound`).
pub fn transaction_boundary() {
    // A cancel is due at most at the first statement after an attach.
    super::cancel::disarm();
    // Pipelined input already read from this client stays with this backend:
    // it belongs to the client's next message and must not be split. A
    // buffered Terminate means the client is leaving (what it sent after
    // the Terminate is dropped: the server never runs it). Flush messages
    // after the Sync (psycopg 3's pipeline mode) ask for nothing left to
    // send: read, they keep no idle client here.
    let buffered = !glue::recv_buffer_empty() && !(sess::consume_buffered_flushes() && glue::recv_buffer_empty());
    let leaving = buffered && glue::consume_buffered_terminate();
    if buffered && !leaving {
        // Let go once the server has read it, should it answer nothing
        // (what is left of a failed COPY: session.c idle_input_read).
        sess::note_idle_input();
        return;
    }
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let p = s.get_or_insert_with(|| {
            // First boundary: the login's ReadyForQuery went to the pooler,
            // on the socket that is the control socket from now on. Not
            // inherited by a program this backend runs (COPY ... PROGRAM):
            // one that outlived it would keep the pooler from seeing it go.
            let control = glue::port_sock();
            let _ = nix::fcntl::fcntl(control, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
            // A pool login is no client's session; each client counts instead.
            sess::count_session(-1);
            Parking {
                control,
                wait: ParkWaitSet::new(control),
                attached: None,
                reserved: false,
                hold_idle: false,
                pool_row: 0,
                release_requested: false,
                inbuf: Vec::new(),
                fds: VecDeque::new(),
                pin: Pin::None,
                row: None,
                attached_at: std::time::Instant::now(),
                lent: false,
                lend_pending: None,
                queue: None,
                queue_wait: None,
                served: None,
                last_client: 0,
                kept_from_queue: false,
                queue_ready_at: None,
                hold: None,
                pooler: control_peer_pid(control).map_or(0, |pid| pid.max(0)),
            }
        });
        // A client taken from the kernel queue goes back there (or to the
        // pooler); one whose session is pinned now stays, attached.
        // Taken once per boundary (the queue's and the attached path both
        // read it).
        let unbound = super::comm::take_unbound();
        if p.served.is_some() && kq_boundary(p, leaving, unbound) {
            return;
        }
        if let Some(client) = p.attached {
            // State that cannot move keeps the client here, attached, as on
            // a direct connection (LISTEN notifications keep arriving), until
            // it leaves: then the pooler closes it and the next client's
            // DISCARD ALL removes what it left, so no backend is lost.
            let pin = pin_now(unbound);
            if pin != p.pin {
                let was = pins_session(p.pin);
                p.pin = pin;
                crate::shmem::report_pin(pin as u8);
                if pins_session(pin) != was && !leaving {
                    // Tell the pooler (after the shared row says why): a
                    // pinned backend becomes its client's dedicated session
                    // and the pool logs in another for its other clients.
                    // Best effort: a pooler that is gone (restarting) must
                    // not end the client's session here; the release notices.
                    let mut pinned_msg = Vec::with_capacity(6);
                    control::write_pinned(&mut pinned_msg, !was);
                    let msg = super::ring::marked(p.row, &pinned_msg);
                    let flags = nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL;
                    if let Ok(n) = nix::sys::socket::send(p.control, &msg, flags) {
                        if n > 0 && n < msg.len() {
                            write_all(p.control, &msg[n..]); // never split a message
                        }
                    }
                }
            }
            // Sequence values keep the client only for a while when others
            // wait (nextgres.sequence_hold): an idle client must not hold
            // a backend of a saturated pool for ever after an INSERT.
            let sequence = Pin::is_short(pin as u8);
            let pinned = pin != Pin::None && !sequence;
            // A pooler gone: a session-mode client keeps its backend to its
            // end, as a pinned one; any other is told (`pooler_gone`).
            let orphaned = !leaving && pooler_left(p);
            if orphaned && !pinned && !p.reserved {
                pooler_gone();
            }
            if !leaving && (pinned || orphaned || sequence || p.hold_idle) && linger(p, pinned || orphaned, sequence) {
                return; // the client's next message is here: serve it
            }
            p.attached = None;
            if p.pin != Pin::None {
                // The shared row stops saying pinned (or kept, for a short
                // pin: sequence values, an unbound statement) before RELEASED: the
                // pooler may hand this backend to the next client as soon as
                // it reads RELEASED, and must not count that client's
                // session as pinned (dedicated) from a stale row. The
                // DISCARD ALL below still runs before park() reads the
                // next ATTACH, so no client sees what this one left.
                p.pin = Pin::None;
                crate::shmem::report_pin(0);
            }
            let released = release_prepare(client);
            if leaving {
                // The client sent Terminate: the session ends here, as the
                // server ends it there. Its socket is shut down, so the
                // client sees the end at once and the pooler, which gets
                // it back with RELEASED, finds it hung up and closes it.
                let _ = nix::sys::socket::shutdown(glue::port_sock(), nix::sys::socket::Shutdown::Both);
            }
            // A saturated pool's backend may go from client to client
            // without parking: a changed setting applies here too.
            super::sched::follow_setting();
            // Claimed after everything that can end this backend (a FATAL)
            // and before RELEASED, so the pooler reading RELEASED finds the
            // client taken (one swap in shared memory decides); a backend
            // that dies in between never touched the claimed client, and
            // the pooler puts it back in line (`backend_gone`).
            let next = take_ahead(p);
            // Taking a client sent ahead, nothing runs between here and its
            // socket's attach that could write to a client (the discard of a
            // pinned session can: it gets the control socket first).
            if next.is_none() || pinned {
                release_socket(p);
            }
            // Going straight on to the next client, the RELEASED can wait in
            // shared memory for the pooler's next look (`ring`): no write,
            // no wake-up. Parking, it goes on the socket: the pooler must
            // read it to send the next client.
            let control_fd = p.control;
            let in_ring = next.is_some() && !pinned && super::ring::release(control_fd, p.row, &released, |m| write_all(control_fd, m));
            if !in_ring {
                write_all(p.control, &super::ring::marked(p.row, &released));
            }
            // Published: a cancel for the client that comes from now on
            // finds it released (the pooler looks again after posting).
            super::cancel::released(p.row, client);
            if pinned {
                // The client left a pinned session: clean it now, so its
                // advisory locks or temp tables do not outlive it while parked.
                session::discard();
            }
            if let Some(next) = next {
                // No park, no sleep: the next client's query is likely there.
                p.release_requested = false;
                let timer_was_on = glue::idle_session_timer_suspend();
                glue::report_parked();
                return attach_client(p, next, timer_was_on);
            }
        }
        park(p);
    });
}

/// Does this pin keep the client for its whole session? (Sequence values
/// and a statement not bound yet keep it only for its next transaction.)
fn pins_session(pin: Pin) -> bool {
    pin != Pin::None && !Pin::is_short(pin as u8)
}

/// Why the client must stay on this backend now: the session's own state
/// (session.c), else a statement its last cycle prepared and did not bind
/// (`unbound`: `comm::take_unbound` at this boundary).
pub(super) fn pin_now(unbound: bool) -> Pin {
    match sess::pin_reason() {
        Pin::None if unbound => Pin::Unbound,
        pin => pin,
    }
}

/// A pool in which a client got a backend after waiting for one within
/// this long (µs) counts as saturated: its backends keep no idle client
/// (`linger`). Measured (PostgreSQL 17, pool 16, `pgbench -S -c 100`):
/// keeping them in the gaps between bursts of queries raised the p99 from
/// 4.2 to 4.5 ms (BENCHMARKS.md, issue 15 fourth step).
const SATURATED_WITHIN_US: i64 = 100_000;

/// Keeps the client while nobody else needs this backend (no handoff at all
/// when the pool is not saturated), or while its session is pinned. While
/// others wait, a client that sends its next message at once still keeps the
/// backend until its time slice (nextgres.client_time_slice, counted from its
/// attach; none once as many wait as the pool has backends, see
/// `pool::fair_slice`) is used up: a mildly saturated pool then pays one
/// handoff per slice, not per transaction. Returns true when the client's
/// next message arrived, false when the client must go back to the pooler
/// (the client is leaving, or, unless pinned, another client waits or the
/// pooler asked).
///
/// Only an unbounded wait (nobody waiting) is announced in shared memory: the
/// pooler signals announced backends when a client starts waiting, and a
/// backend already counting down its slice needs no signal.
///
/// `sequence`: the client's transaction called nextval(); while others wait
/// it keeps the backend at least `nextgres.sequence_hold` from this boundary.
///
/// A pool saturated moments ago (`SATURATED_WITHIN_US`) keeps nothing
/// unless pinned or for a sequence: given back at once, even where one
/// waiting client would still leave the slice (a burst's gap, not a mild
/// queue).
fn linger(p: &mut Parking, pinned: bool, sequence: bool) -> bool {
    // The client is idle from here, as a direct one in ReadCommand: no
    // connection check until its next statement (nor a wake-up for one).
    glue::connection_check_stop();
    let optional = !pinned && !p.reserved;
    let boundary = std::time::Instant::now();
    let hold = if sequence {
        std::time::Duration::from_millis(crate::settings::SEQUENCE_HOLD.get().max(0) as u64)
    } else {
        std::time::Duration::ZERO
    };
    if optional && p.row.is_none() {
        p.row = crate::shmem::own_backend_row();
        // Without its row the pooler could not ask for the client back.
        if p.row.is_none() {
            return false;
        }
    }
    let waited_at = crate::shmem::pool_waited_at(p.pool_row);
    if optional && !sequence && crate::shmem::waited_within(waited_at, crate::shmem::mono_now(), SATURATED_WITHIN_US) {
        // A client of the pool had to wait moments ago: the pool is
        // saturated, though none may wait at this instant (clients' queries
        // come in bursts). Kept, the client would make the next one to come
        // wait for a release request (a signal and two messages) rather
        // than find a parked backend: given back now, as in a queue.
        return false;
    }
    let mut announced: Option<Lingering> = None;
    let mut queue_look = KEPT_QUEUE_LOOK_MS;
    p.queue_ready_at = None;
    let slice = std::time::Duration::from_millis(crate::settings::CLIENT_TIME_SLICE.get().max(0) as u64);
    let left = |waiting, backends, attached_at: std::time::Instant| {
        nextgres_core::pool::fair_slice(slice, waiting, backends)
            .saturating_sub(attached_at.elapsed())
            .max(hold.saturating_sub(boundary.elapsed()))
    };
    loop {
        if optional {
            // Clients wait and this one's turn is over (always, once as many
            // wait as the pool has backends): give it back without reading
            // the control socket, which could only add reasons to (an EAGAIN
            // per transaction of a saturated pool).
            let (waiting, backends) = pool_load(p);
            if waiting > 0 && left(waiting, backends, p.attached_at).is_zero() {
                return false;
            }
            if waiting == 0 && !p.release_requested && announced.is_none() {
                // Announce before the look below: the pooler sends a client
                // ahead before it may take it back, and signals only an
                // announced backend after its swap, so a stale one is in
                // the socket by then, its ticket gone, or the signal comes.
                announced = p.row.map(Lingering::announce);
            }
        }
        let open = read_control(p);
        if optional && (!open || pooler_left(p)) {
            pooler_gone();
        }
        // An ATTACH sent ahead (on the socket, or in a slot): a client
        // waits for this very backend.
        if prune_stale_ahead(p) || p.row.is_some_and(super::slot::queued_here) {
            p.release_requested = true;
        }
        let mut timeout_ms = -1;
        if optional {
            let (waiting, backends) = pool_load(p);
            if !p.release_requested && waiting == 0 && announced.is_none() {
                // Announce, then look again (the loop's top): the pooler
                // stores the waiting count before it reads the flag, so one
                // side sees the other; the same for a client sent ahead.
                // Rare: the count fell to 0 since the top's look.
                announced = p.row.map(Lingering::announce);
                continue;
            }
            if p.release_requested || waiting > 0 {
                announced = None;
                let left = left(waiting, backends, p.attached_at);
                if left.is_zero() {
                    return false;
                }
                timeout_ms = left.as_micros().div_ceil(1000) as i64;
            } else if p.kept_from_queue && p.queue.is_some() {
                timeout_ms = if p.queue_ready_at.is_some() {
                    QUEUE_READY_CONFIRM.as_millis() as i64
                } else {
                    let look = queue_look;
                    queue_look = (queue_look * 2).min(KEPT_QUEUE_LOOK_MAX_MS);
                    look
                };
            }
        }
        match glue::linger_wait(timeout_ms) {
            LingerEvent::ClientReadable => {
                let mut peek = [0u8; 5];
                let sock = glue::port_sock();
                return match nix::sys::socket::recv(
                    sock,
                    &mut peek,
                    nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                ) {
                    Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => continue,
                    // EOF, error or Terminate: the pooler closes the client.
                    Ok(0) | Err(_) => false,
                    Ok(n) => !(n == 5 && peek == super::kq::TERMINATE),
                };
            }
            LingerEvent::Latch => glue::linger_service_interrupts(),
            LingerEvent::PostmasterDeath => crate::pg::proc_exit(1),
            LingerEvent::Timeout => {}
        }
    }
}

/// The pid of the process at the other end of the control socket: the
/// pooler that logged this backend in (`SO_PEERCRED` keeps the connecting
/// process), whether or not it still serves. Also `slot`'s, for its pidfd.
pub(super) fn control_peer_pid(control: RawFd) -> nix::Result<i32> {
    // SAFETY: a borrow of the control socket for one getsockopt.
    let control = unsafe { BorrowedFd::borrow_raw(control) };
    Ok(nix::sys::socket::getsockopt(&control, nix::sys::socket::sockopt::PeerCredentials)?.pid())
}

/// Has the pooler that logged this backend in ended (a restart: SIGTERM or
/// kill -9 of the pooler, `pg_terminate_backend` of the agent)? One load of
/// the shared header, no system call: the agent clears the pid there as
/// soon as its pooler has ended, however it ended (`pooler::agent`), and a
/// new pooler puts its own.
fn pooler_left(p: &Parking) -> bool {
    p.pooler > 0 && crate::shmem::tables().is_some_and(|t| t.pooler_pid() != p.pooler)
}

/// A transaction-mode client at its boundary whose pooler is gone: no
/// pooler can take it back (a new one knows nothing of it), so its session
/// ends with the FATAL 57P01 the pooler sent its idle clients as it stopped
/// (`pooler::worker` shutdown), where before it saw its connection close
/// without a word. The client's socket is still `sock`: the error reaches
/// it. Pinned and session-mode clients keep their backend to the end of
/// their session instead, as dedicated sessions and walsenders do.
fn pooler_gone() -> ! {
    pgrx::ereport!(
        pgrx::PgLogLevel::FATAL,
        pgrx::PgSqlErrorCode::ERRCODE_ADMIN_SHUTDOWN,
        "terminating connection due to administrator command"
    );
    unreachable!()
}

/// (waiting clients, backends) of the client's pool. The pooler counts
/// only the clients it holds: for a client kept from the kernel queue (its
/// sequence values, an unbound statement), a client ready in the queue at
/// two looks `QUEUE_READY_CONFIRM` apart counts one waiting, so the queue
/// does not starve (`linger` looks every `KEPT_QUEUE_LOOK_MS` and then).
/// Before, one always counted, and such a client kept its backend only for
/// `sequence_hold` with nobody waiting (its unnamed statement or currval()
/// gone after 50 ms). Not one look: a lent backend waiting idle takes a
/// ready client within microseconds, and a look in between gave the kept
/// client up for nothing (hunt12a F2). Not "a client waited moments ago"
/// (`SATURATED_WITHIN_US`): the one this backend served just before counts
/// so, though the queue is empty.
fn pool_load(p: &mut Parking) -> (i32, i32) {
    let (waiting, backends) = crate::shmem::pool_load(p.pool_row);
    if waiting == 0 && p.kept_from_queue {
        if p.queue.as_ref().is_some_and(|q| q.ready_now()) {
            match p.queue_ready_at {
                Some(at) if at.elapsed() >= QUEUE_READY_CONFIRM => return (1, backends),
                Some(_) => {}
                None => p.queue_ready_at = Some(std::time::Instant::now()),
            }
        } else {
            p.queue_ready_at = None;
        }
    }
    (waiting, backends)
}

/// How often (ms) a backend that keeps a client from the kernel queue with
/// nobody waiting looks at the queue, at first: a client getting ready there
/// wakes no one (the pooler sees it at its next look, within a second), and
/// such a client is rare (sequence values, an unbound statement). Doubled
/// at each look up to `KEPT_QUEUE_LOOK_MAX_MS`, so a client that stays idle
/// costs its backend a few wake-ups a second (hunt12a F3).
const KEPT_QUEUE_LOOK_MS: i64 = 50;
const KEPT_QUEUE_LOOK_MAX_MS: i64 = 400;

/// How long a client must stay ready in the kernel queue to count as
/// waiting for a backend that keeps a client (`pool_load`).
const QUEUE_READY_CONFIRM: std::time::Duration = std::time::Duration::from_millis(5);

/// The shared flag saying this backend keeps an idle client, up while
/// lingering and down on every way out.
struct Lingering(usize);

impl Lingering {
    fn announce(row: usize) -> Lingering {
        crate::shmem::set_lingering(row, true);
        Lingering(row)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        crate::shmem::set_lingering(self.0, false);
    }
}

/// Reads pending control messages without blocking (with the sockets of
/// ATTACHes sent ahead); notes release requests. Returns false at EOF (the
/// pooler is gone).
fn read_control(p: &mut Parking) -> bool {
    let mut open = true;
    loop {
        let fds = p.fds.len();
        match read_some(p, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
            Ok(0) => {
                open = false; // pooler gone: the release will notice
                break;
            }
            // Short and without a descriptor: the socket is empty (the
            // kernel ends a read early only after a part that carried one),
            // so reading on would only collect an EAGAIN.
            Ok(n) if n < READ_CHUNK && p.fds.len() == fds => break,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    drain_requests(p);
    open
}

const EMFILE_MSG: &str = "could not receive the client socket from the pooler: too many open files in this backend (the descriptor was dropped)";

/// One read of the control socket into `inbuf`, a passed socket into `fds`
/// (`NO_FD` in its place when this backend could not receive it). Never
/// inlined: its buffer would sit in the frame of `transaction_boundary`,
/// whose stack probes then touch pages no other code uses at every
/// transaction (a cache miss each on a busy machine; perf, session 37).
#[inline(never)]
fn read_some(p: &mut Parking, flags: nix::sys::socket::MsgFlags) -> nix::Result<usize> {
    let mut buf = [0u8; READ_CHUNK];
    let (n, fd, truncated) = recv_control(p.control, &mut buf, flags)?;
    p.inbuf.extend_from_slice(&buf[..n]);
    if let Some(fd) = fd {
        p.fds.push_back(fd);
    } else if truncated {
        p.fds.push_back(NO_FD);
    }
    Ok(n)
}

/// Bytes one read of the control socket takes at most.
const READ_CHUNK: usize = 8192;

/// Stands in `Parking::fds` for a descriptor the kernel dropped (EMFILE).
const NO_FD: RawFd = -1;

/// Blocks (1 s at a time) for the rest of an ATTACH whose first bytes and
/// socket arrived: the pooler writes a control message whole.
fn read_rest(p: &mut Parking) {
    let _ = nix::poll::poll(
        &mut [nix::poll::PollFd::new(unsafe { BorrowedFd::borrow_raw(p.control) }, nix::poll::PollFlags::POLLIN)],
        nix::poll::PollTimeout::from(1000u16),
    );
    if let Ok(0) = read_some(p, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
        crate::pg::proc_exit(0);
    }
}

/// The next ATTACH in `inbuf` this backend may serve, with its socket:
/// release requests before it are noted; an ATTACH sent ahead is served only
/// if this backend's swap of its ticket wins (`shmem::ahead_claim`),
/// otherwise the pooler took the client back and its socket is closed
/// unread. `parked`: a plain ATTACH is expected too (one sent ahead can
/// arrive after the backend parked); while a client is attached only ATTACHes
/// sent ahead can come, anything else ends the backend (FATAL XX000).
fn next_buffered_attach(p: &mut Parking, parked: bool) -> Option<(Attach, RawFd)> {
    loop {
        drain_requests(p);
        match parse_message(&p.inbuf, control::MAX_CONTROL_MESSAGE) {
            Ok(Some((m, used))) if m.tag == control::ATTACH => {
                let a = control::parse_attach(m.body).unwrap_or_else(|e| fatal(&e.message));
                p.inbuf.drain(..used);
                let Some(fd) = p.fds.pop_front() else { fatal("an ATTACH came without its client socket") };
                match a.ahead {
                    // Its socket did not fit (EMFILE): refused, the pooler
                    // takes the client back when it reads RELEASED. Handed
                    // to this backend already (parked, its RELEASED read:
                    // `pooler::ahead::backend_ahead_settle`) it cannot be
                    // refused: this backend ends, and the pooler, finding
                    // it unclaimed, puts the client back in line.
                    Some(x) if fd == NO_FD => {
                        let row = x.backend_row as usize;
                        if !crate::shmem::ahead_refuse(row, x.ticket) && parked && crate::shmem::ahead_handed_is(row, x.ticket) {
                            fatal(EMFILE_MSG)
                        }
                    }
                    Some(x) if crate::shmem::ahead_claim(x.backend_row as usize, x.ticket) => return Some((a, fd)),
                    // Handed to this backend once parked (`shmem::ahead_hand`),
                    // or a plain ATTACH's ticket (`Tables::handed_offer`).
                    Some(x) if parked && crate::shmem::ahead_claim_handed(x.backend_row as usize, x.ticket) => return Some((a, fd)),
                    Some(_) => {
                        let _ = nix::unistd::close(fd); // taken back: never read it
                    }
                    // This backend cannot serve the client. Parked, the
                    // FATAL goes to the pooler (the control socket is under
                    // `sock` then), which passes it on; at a boundary
                    // (`take_ahead`) to the client still attached here
                    // (RELEASED is not sent yet), which the pooler closes.
                    None if fd == NO_FD => fatal(EMFILE_MSG),
                    None if parked => return Some((a, fd)),
                    None => fatal("an ATTACH came for a backend serving a client"),
                }
            }
            Ok(Some(_)) | Err(_) => fatal("unexpected message on the control socket"),
            // Part of an ATTACH: its socket came with its first byte.
            Ok(None) if !p.fds.is_empty() => read_rest(p),
            Ok(None) => return None,
        }
    }
}

/// Closes the sockets of complete ATTACHes at the head of `inbuf` that the
/// pooler took back (their ticket is no longer in this backend's row:
/// tickets never repeat), so a client the pooler closed meanwhile is not
/// held open here while this backend keeps its own client. True when a live
/// one (or an incomplete one) remains: a client waits for this backend.
fn prune_stale_ahead(p: &mut Parking) -> bool {
    loop {
        drain_requests(p);
        match parse_message(&p.inbuf, control::MAX_CONTROL_MESSAGE) {
            Ok(Some((m, used))) if m.tag == control::ATTACH => {
                let stale = match control::parse_attach(m.body) {
                    Ok(a) => a.ahead.is_some_and(|x| {
                        let row = x.backend_row as usize;
                        !crate::shmem::ahead_is(row, x.ticket) && !crate::shmem::ahead_handed_is(row, x.ticket)
                    }),
                    Err(_) => false, // the boundary reports it
                };
                if !stale {
                    return true;
                }
                p.inbuf.drain(..used);
                if let Some(fd) = p.fds.pop_front().filter(|&f| f != NO_FD) {
                    let _ = nix::unistd::close(fd);
                }
            }
            _ => return !p.fds.is_empty(),
        }
    }
}

/// At the boundary, before RELEASED: the client sent ahead, if one was and
/// the pooler has not taken it back.
fn take_ahead(p: &mut Parking) -> Option<(Attach, RawFd)> {
    if p.row.is_none() {
        p.row = crate::shmem::own_backend_row();
    }
    // Sent through a slot (`slot`): taken without reading the socket.
    if let Some(row) = p.row {
        match super::slot::take(p.control, row) {
            super::slot::Ahead::Took(a, fd) => return Some((a, fd)),
            super::slot::Ahead::None if p.fds.is_empty() => return None,
            _ => {}
        }
    }
    // The pooler publishes the ticket before it sends the ATTACH: no
    // ticket, no read (an unsaturated pool pays no system call here). One
    // sent just after this look is read once parked, and claimed there.
    if p.fds.is_empty() && p.row.is_some_and(|r| !crate::shmem::ahead_pending(r)) {
        return None;
    }
    // One read, not one more for the EAGAIN: the kernel ends a read after
    // the part of the stream that carried a descriptor, so the ATTACH sent
    // ahead is what this read ends with. Anything behind it (the next one
    // sent ahead, a release request) is read at the next look, or wakes
    // the park; another read only when that ATTACH was taken back and a
    // ticket is still offered (each read takes one ATTACH; one that brings
    // none ends the loop).
    loop {
        if let Ok(0) = read_some(p, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
            return None; // the pooler is gone: the release notices
        }
        drain_requests(p);
        if p.fds.is_empty() {
            return None; // nothing sent ahead (the common unsaturated case)
        }
        if let Some(next) = next_buffered_attach(p, false) {
            return Some(next);
        }
        if p.row.is_some_and(|r| !crate::shmem::ahead_pending(r)) {
            return None;
        }
    }
}

/// Consumes leading RELEASE_REQUEST messages (they may arrive late, after the
/// backend already gave its client back on its own).
fn drain_requests(p: &mut Parking) {
    while let Ok(Some((m, used))) = parse_message(&p.inbuf, control::MAX_CONTROL_MESSAGE) {
        match m.tag {
            control::RELEASE_REQUEST => p.release_requested = true,
            control::KQ_LEND => match control::parse_kq_lend(m.body) {
                Ok(row) => p.lend_pending = Some(row as usize),
                Err(e) => fatal(&e.message),
            },
            // Only a wake-up: the shared flag says it (`kq::Queue::recalled`).
            control::KQ_RECALL => {}
            _ => break,
        }
        p.inbuf.drain(..used);
    }
}

/// `pg_stat_ssl` currently shows a TLS session for this backend.
static SSL_SHOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Shows `tls` in this backend's `pg_stat_ssl` row, or clears it (only
/// when a session is shown: plaintext switches cost nothing).
fn show_ssl(tls: Option<&control::TlsStatus>) {
    use std::sync::atomic::Ordering;
    if tls.is_some() || SSL_SHOWN.load(Ordering::Relaxed) {
        glue::set_ssl_status(tls);
        SSL_SHOWN.store(tls.is_some(), Ordering::Relaxed);
    }
}

/// A session image of `image_bytes` too large for the control channel ends
/// the client's session with a FATAL (54000) it receives (its socket is
/// still `sock`), rather than a pooler that drops it without a word.
fn image_fits(image_bytes: usize) {
    if image_bytes + 1024 > control::MAX_CONTROL_MESSAGE {
        pgrx::ereport!(
            pgrx::PgLogLevel::FATAL,
            pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "nextgres: this session's prepared statements and settings ({image_bytes} bytes) exceed what a pooled client can carry between backends ({} bytes)",
                control::MAX_CONTROL_MESSAGE
            )
        );
    }
}

/// Takes the client's socket out of FeBeWaitSet and returns the RELEASED
/// to send the pooler; `sock` still holds the client's socket (see
/// `release_socket`).
fn release_prepare(client: u64) -> Vec<u8> {
    // The session image first, while the client's socket is still ours: one
    // too large for the control channel ends the client's session with a
    // FATAL it receives, rather than a pooler that drops it without a word.
    let settings = sess::take_session_settings();
    let statements = session::note_release(settings.as_deref(), sess::take_statements());
    let defaults = session::take_reported_defaults();
    let told = session::take_told();
    let image_bytes = statements.as_ref().map_or(0, |l| l.byte_len())
        + [&settings, &defaults].iter().filter_map(|v| v.as_ref()).flatten().map(|(n, v)| n.len() + v.len() + 2).sum::<usize>();
    image_fits(image_bytes);
    glue::febe_detach();
    // No client here any more: pg_stat_ssl shows no TLS while parked.
    show_ssl(None);
    let n = super::comm::take_counters();
    let released = Released {
        client_id: client,
        queries: n.queries,
        query_us: n.query_us,
        bytes_sent: n.bytes_sent,
        settings,
        statements,
        defaults,
        told,
    };
    let mut msg = Vec::with_capacity(64);
    control::write_released(&mut msg, &released);
    msg
}

/// Puts the control socket in place of the client's under `sock` and
/// closes the client's, so nothing this backend writes while parked (an
/// error report) can reach a client the pooler may have handed on. Not
/// needed when the next client's socket replaces it at once
/// (`attach_client`).
fn release_socket(p: &Parking) {
    let old = glue::port_sock();
    glue::set_port_sock(p.control);
    close_client(p, old);
}

/// Closes a client socket that `sock` no longer names (never the control
/// socket, which is `sock` while parked).
fn close_client(p: &Parking, fd: RawFd) {
    if fd != p.control && fd >= 0 {
        let _ = nix::unistd::close(fd);
    }
}

fn park(p: &mut Parking) {
    p.release_requested = false;
    super::sched::follow_setting();
    let timer_was_on = glue::idle_session_timer_suspend();
    glue::report_parked();
    // Wait first: the pooler answers RELEASED, so an ATTACH is never there
    // yet, and the wait set (level-triggered) reports one that raced ahead.
    // Whether this backend has waited yet: a queued client it takes before
    // that was waiting for a backend.
    let mut waited = false;
    loop {
        if let Some(pool_row) = p.lend_pending.take() {
            lend(p, pool_row);
        }
        if p.lent {
            let q = p.queue.as_ref().expect("a lent backend has its queue");
            if q.recalled() {
                q.unlend(p.control);
                p.lent = false;
            } else if let Some((a, s)) = q.take(p.control, super::kq::Check::ReadAhead) {
                if !waited {
                    q.count_wait();
                }
                return attach_queued(p, a, s, timer_was_on);
            } else {
                q.mark_idle();
            }
        }
        let wait = match (&p.queue_wait, p.lent) {
            (Some(w), true) => {
                // A free backend takes whatever the queue has (a keep may
                // have left it unwatched).
                w.watch_queue(true);
                w
            }
            _ => &p.wait,
        };
        waited = true;
        match wait.wait(-1) {
            ParkEvent::PostmasterDeath => crate::pg::proc_exit(1),
            ParkEvent::Latch => glue::park_service_interrupts(),
            ParkEvent::Control => {
                if let Some(attach) = next_attach(p) {
                    attach_client(p, attach, timer_was_on);
                    return;
                }
            }
            ParkEvent::Queue | ParkEvent::Hold | ParkEvent::Timeout => {}
        }
    }
}

/// Reads what the control socket has. Returns a complete ATTACH (with its fd)
/// when one arrived that this backend may serve. EOF means the pooler is
/// gone: a parked backend has no client and no purpose, so it exits quietly.
fn next_attach(p: &mut Parking) -> Option<(Attach, RawFd)> {
    match read_some(p, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
        Ok(0) => crate::pg::proc_exit(0),
        Ok(_) => {}
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => return None,
        Err(_) => crate::pg::proc_exit(0),
    }
    let next = next_buffered_attach(p, true);
    p.release_requested = false; // nothing attached to release
    next
}

fn attach_client(p: &mut Parking, (mut a, fd): (Attach, RawFd), timer_was_on: bool) {
    // A backend lent to a kernel queue before (recalled while it served a
    // queued client, now attaching one the pooler sends): a cancel the
    // pooler is deciding for that queued client is settled first, as at a
    // take from the queue, so its signal lands before the stale-cancel
    // clearing below, never in this client's query (hunt11a 1).
    if let Some(q) = p.queue.as_ref() {
        q.hold_clear();
    }
    // Taking a client sent ahead, `sock` is still the previous client's
    // socket, given back already (out of FeBeWaitSet since release_prepare).
    let old = glue::port_sock();
    glue::set_port_sock(fd);
    close_client(p, old);
    glue::febe_attach();
    super::comm::set_key_pid(a.key_pid);
    // pg_stat_ssl: this client's TLS session, which the pooler terminates;
    // none for a plaintext client.
    show_ssl(a.tls.as_ref());
    if a.flags & control::FLAG_DEDICATED != 0 {
        return attach_dedicated(p, &a, timer_was_on);
    }
    // A cancel aimed at the previous client may have landed after its
    // transaction ended; it must not hit this one.
    glue::clear_stale_cancel();
    glue::set_client_addr(&a.addr, &a.local);
    if a.flags & control::FLAG_SESSION_START != 0 {
        sess::count_session(1);
    }
    if a.flags & control::FLAG_SESSION_START != 0 {
        a.image.defaults = session::login_defaults();
    }
    if a.flags & control::FLAG_NEW_CLIENT != 0 {
        glue::set_client_identity(a.authn.as_ref());
        session::switch_to(&a.settings, std::mem::take(&mut a.image), a.flags & control::FLAG_SESSION_START != 0);
    } else {
        // Its image is not sent (the pooler's ATTACH) or is the one this
        // backend wrote (a kernel queue slot): what it was told is still
        // `session`'s.
        session::attached_again();
    }
    if a.flags & control::FLAG_SESSION_START != 0 {
        // In the client's session, before its first query: what a trigger
        // sets (set_config) is the client's, carried at its release.
        glue::fire_login_triggers();
    }
    if timer_was_on {
        glue::idle_session_timer_resume();
    }
    p.attached = Some(a.client_id);
    p.last_client = a.client_id;
    p.kept_from_queue = false;
    p.queue_ready_at = None;
    p.attached_at = std::time::Instant::now();
    // Count only what this client runs from here on.
    super::comm::take_counters();
    p.reserved = a.flags & control::FLAG_RESERVED != 0;
    p.hold_idle = a.flags & control::FLAG_HOLD_IDLE != 0;
    p.pool_row = a.pool_row as usize;
    p.release_requested = false;
    if p.row.is_none() {
        p.row = crate::shmem::own_backend_row();
    }
    super::cancel::arm(p.row, a.client_id);
}

/// A replication client's own walsender (pooler `dedicated.rs`): the
/// client's socket (now under `MyProcPort->sock`, in FeBeWaitSet, which
/// WalSndWait uses) stays for the rest of this process's life. The login's
/// settings are the client's own, so nothing is switched; the pooler has
/// forgotten this backend, so the control socket closes and every pooled
/// hook goes dormant (`unpool`): the walsender's ReadyForQuery after each
/// replication command never parks, and statements of a logical walsender
/// are not tracked. It exits when its client leaves, as a direct one.
fn attach_dedicated(p: &mut Parking, a: &Attach, timer_was_on: bool) {
    glue::set_client_addr(&a.addr, &a.local);
    // Its own login was over the Unix socket: SYSTEM_USER is the client's.
    glue::set_client_identity(a.authn.as_ref());
    // Undo the first park's "a pool login is no client's session" (a no-op
    // for a physical walsender, which has no database).
    sess::count_session(1);
    if timer_was_on {
        glue::idle_session_timer_resume();
    }
    let _ = nix::unistd::close(p.control);
    p.control = -1;
    p.attached = None;
    super::sched::restore();
    super::unpool();
}

/// Reads from a control socket, taking at most one descriptor passed with
/// SCM_RIGHTS (any more are closed). Returns (bytes, descriptors). A
/// descriptor the kernel could not install (MSG_CTRUNC, the process is at
/// its open files limit) is Err(EMFILE), the bytes read are lost.
pub(crate) fn recv_with_fd(
    fd: RawFd,
    buf: &mut [u8],
    fds: &mut [RawFd; 1],
    flags: nix::sys::socket::MsgFlags,
) -> nix::Result<(usize, usize)> {
    match recv_control(fd, buf, flags)? {
        (_, _, true) => Err(nix::errno::Errno::EMFILE),
        (n, Some(f), false) => {
            fds[0] = f;
            Ok((n, 1))
        }
        (n, None, false) => Ok((n, 0)),
    }
}

/// One `recvmsg` of a control socket: (bytes, the descriptor passed with
/// them if any, truncated). Truncated: the kernel dropped a descriptor it
/// could not install (this process at RLIMIT_NOFILE; the pooler sends one,
/// which the buffer fits), the bytes came without their socket. (nix's
/// cmsgs() would say ENOBUFS.) Extra descriptors are closed.
fn recv_control(fd: RawFd, buf: &mut [u8], flags: nix::sys::socket::MsgFlags) -> nix::Result<(usize, Option<RawFd>, bool)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC | flags)?;
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Ok((msg.bytes, None, true));
    }
    let mut got = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(r) = c {
            for f in r {
                if got.is_none() {
                    got = Some(f);
                } else {
                    let _ = nix::unistd::close(f);
                }
            }
        }
    }
    Ok((msg.bytes, got, false))
}

pub(super) fn write_all(fd: RawFd, mut data: &[u8]) {
    while !data.is_empty() {
        match nix::unistd::write(unsafe { BorrowedFd::borrow_raw(fd) }, data) {
            Ok(n) => data = &data[n..],
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {
                let _ = nix::poll::poll(
                    &mut [nix::poll::PollFd::new(unsafe { BorrowedFd::borrow_raw(fd) }, nix::poll::PollFlags::POLLOUT)],
                    nix::poll::PollTimeout::from(1000u16),
                );
            }
            Err(_) => crate::pg::proc_exit(0),
        }
    }
}

pub(super) fn fatal(msg: &str) -> ! {
    pgrx::ereport!(
        pgrx::PgLogLevel::FATAL,
        pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("nextgres: {msg}")
    );
    unreachable!()
}

