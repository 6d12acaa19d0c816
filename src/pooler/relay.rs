//! The TLS relays: each TLS client's plaintext carried between its TCP
//! socket (rustls) and one end of a Unix socketpair, whose other end the
//! pooler and the pooled backends serve as any client socket (`super::tls`).
//!
//! A client's handshake runs on a thread of its own (a few milliseconds of
//! CPU for the certificate signature, which must not stall other clients'
//! messages; `nextgres.max_tls_handshakes` caps them). Once the session is
//! up, the relay moves to one of a few **relay workers**: threads that each
//! carry many relays from one edge-triggered epoll set, as PgBouncer's one
//! process carries all its TLS clients. A thread per client (this module's
//! first form) had 100 busy clients' relays compete for the CPU as 100
//! threads, two wake-ups per transaction each, which on a saturated server
//! put the TLS p99 at 6-8x PgBouncer's (BENCHMARKS.md, TLS). Where no
//! worker can be started (thread limits) a relay stays on its own thread.
//!
//! Relay threads and workers never call into PostgreSQL (no logging, no
//! palloc): they start with every signal blocked and touch only sockets,
//! rustls and their own memory.
use super::tls::{describe, plaintext_into, Handshake, Parked, RelayCtl, Session, TlsInfo};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use rustls::ServerConnection;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// Plaintext waiting for the pooler or backend beyond this: stop reading TLS.
pub const PAIR_BACKLOG: usize = 256 * 1024;

/// Once the pooler or backend side of the pair has closed, the client gets
/// what is left (the server's FATAL, the last rows) and close_notify within
/// this, in all: a client that stops reading does not hold its relay.
pub const CLOSE_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Rounds of [`Relay::run`] before a worker turns to its other relays: a
/// COPY between two fast sockets never blocks, and must not keep the
/// others waiting.
const RUN_BUDGET: usize = 16;

/// One TLS client's relay: the rustls session, both sockets (non-blocking)
/// and what is in flight between them.
pub struct Relay {
    conn: ServerConnection,
    tcp: TcpStream,
    pair: UnixStream,
    ctl: Arc<RelayCtl>,
    info: TlsInfo,
    /// Counted in `super::tls::handshaking()` until the handshake is done.
    handshake: Option<Handshake>,
    end_point: Option<Arc<[u8]>>,
    ca_loaded: bool,
    /// Direct TLS: ALPN `postgresql` or closed after the handshake.
    require_alpn: bool,
    /// The start of a direct TLS ClientHello, for the relay's thread.
    direct: Option<Vec<u8>>,
    /// Plaintext decrypted, not yet taken by the pair.
    to_pair: Vec<u8>,
    tcp_eof: bool,
    /// The pair side hung up (its bytes may still be unread).
    pair_hup: bool,
    /// Nothing more to read from the pair.
    pair_eof: bool,
    close_notify_sent: bool,
    /// Set when the pair side closes: the relay ends by then.
    deadline: Option<Instant>,
    /// Readiness as last known (set by poll or an epoll edge, cleared by
    /// WouldBlock): a worker's sockets are edge-triggered, so each is used
    /// until it would block, and not tried again before its next edge.
    tcp_in: bool,
    tcp_out: bool,
    pair_in: bool,
    pair_out: bool,
}

/// How [`Relay::run`] left off.
#[derive(Debug, PartialEq, Eq)]
enum Run {
    /// Waiting for a socket (or for its deadline).
    Blocked,
    /// Its budget is spent with more to do.
    Busy,
    /// Done: dropping it closes both sockets (the pooler or backend reads
    /// EOF on its end of the pair).
    Ended,
    /// The pooler asked it to park: [`Relay::park`].
    Park,
}

fn would_block(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

impl Relay {
    /// A relay for `conn` (handshake to do when `handshake` is Some; a
    /// parked session otherwise) between `tcp` and `pair`; `direct`: the
    /// start of a direct TLS ClientHello already read from `tcp`, which the
    /// relay's thread feeds to rustls first; `initial`: plaintext for the
    /// pair first.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        conn: ServerConnection,
        tcp: TcpStream,
        pair: UnixStream,
        info: TlsInfo,
        handshake: Option<Handshake>,
        end_point: Option<Arc<[u8]>>,
        ca_loaded: bool,
        direct: Option<Vec<u8>>,
        initial: Vec<u8>,
    ) -> Box<Relay> {
        Box::new(Relay {
            conn,
            tcp,
            pair,
            ctl: Arc::new(RelayCtl::default()),
            info,
            handshake,
            end_point,
            ca_loaded,
            require_alpn: direct.is_some(),
            direct,
            to_pair: initial,
            tcp_eof: false,
            pair_hup: false,
            pair_eof: false,
            close_notify_sent: false,
            deadline: None,
            tcp_in: true,
            tcp_out: true,
            pair_in: true,
            pair_out: true,
        })
    }

    /// Feeds rustls the start of a direct TLS ClientHello read by the
    /// pooler; false when it is bad (the alert rustls queued is sent).
    fn take_direct(&mut self) -> bool {
        let Some(prefix) = self.direct.take() else { return true };
        let mut rest = &prefix[..];
        while !rest.is_empty() {
            if !matches!(self.conn.read_tls(&mut rest), Ok(n) if n > 0) {
                return false;
            }
        }
        if self.conn.process_new_packets().is_err() {
            let _ = self.conn.write_tls(&mut self.tcp);
            return false;
        }
        true
    }

    pub fn ctl(&self) -> Arc<RelayCtl> {
        self.ctl.clone()
    }

    /// The TCP socket back, when the relay could not be started.
    pub fn into_tcp(self: Box<Self>) -> TcpStream {
        self.tcp
    }

    /// The session back, when a parked client's relay could not be started.
    pub fn into_parked(self: Box<Self>) -> Parked {
        Parked { conn: self.conn, tcp: self.tcp, plaintext: self.to_pair }
    }

    /// Moves everything the relay does until a socket would block, the
    /// relay ends or parks, or `budget` rounds are done.
    fn run(&mut self, buf: &mut [u8], budget: usize) -> Run {
        for _ in 0..budget {
            let mut moved = false;
            // TLS records out to the client.
            while self.conn.wants_write() && self.tcp_out {
                match self.conn.write_tls(&mut self.tcp) {
                    Ok(_) => moved = true,
                    Err(e) if would_block(&e) => self.tcp_out = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => moved = true,
                    Err(_) => return Run::Ended,
                }
            }
            if !self.conn.is_handshaking() && self.info.get().is_none() {
                if self.require_alpn && self.conn.alpn_protocol() != Some(b"postgresql".as_slice()) {
                    // Direct TLS without ALPN: closed before any plaintext
                    // reaches the pooler (which then sees EOF).
                    return Run::Ended;
                }
                // Before any plaintext reaches the pooler.
                let peer_cert = self.conn.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec());
                let status = describe(&self.conn, peer_cert.as_deref());
                let _ = self.info.set(Session { status, end_point: self.end_point.take(), peer_cert, ca_loaded: self.ca_loaded });
                drop(self.handshake.take()); // no longer counted as handshaking
            }
            if self.pair_eof && !self.conn.wants_write() {
                if self.close_notify_sent {
                    // All of it is in the kernel: FIN after it.
                    let _ = self.tcp.shutdown(std::net::Shutdown::Write);
                    return Run::Ended;
                }
                self.conn.send_close_notify();
                self.close_notify_sent = true;
                continue;
            }
            // Plaintext in to the pooler / backend.
            while !self.to_pair.is_empty() && !self.pair_hup && self.pair_out {
                match self.pair.write(&self.to_pair) {
                    Ok(n) => {
                        self.to_pair.drain(..n);
                        moved = true;
                    }
                    Err(e) if would_block(&e) => self.pair_out = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => moved = true,
                    // The pooler closed the client: what it wrote last is
                    // still read and sent.
                    Err(_) => {
                        self.pair_hup = true;
                        moved = true;
                    }
                }
            }
            if self.pair_hup {
                self.to_pair.clear();
                self.deadline.get_or_insert_with(|| Instant::now() + CLOSE_WITHIN);
            }
            if self.tcp_eof && self.to_pair.is_empty() && !self.pair_hup {
                // The client is gone: the pooler or backend reads EOF after
                // the last of its bytes.
                let _ = self.pair.shutdown(std::net::Shutdown::Both);
                return Run::Ended;
            }
            if self.tcp_eof && self.pair_hup {
                return Run::Ended;
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Run::Ended; // the client did not take it in time
            }
            // TLS in from the client.
            if self.tcp_in && self.reads_tcp() {
                match self.conn.read_tls(&mut self.tcp) {
                    Ok(n) => {
                        self.tcp_eof |= n == 0;
                        moved = true;
                    }
                    Err(e) if would_block(&e) => self.tcp_in = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => moved = true,
                    Err(_) => {
                        self.tcp_eof = true;
                        moved = true;
                    }
                }
                if self.conn.process_new_packets().is_err() {
                    // Bad TLS input: send the alert rustls queued, then
                    // close both sides (the pooler closes the client on EOF).
                    let _ = self.conn.write_tls(&mut self.tcp);
                    return Run::Ended;
                }
                let eof = self.tcp_eof;
                self.drain_plaintext(buf);
                moved |= self.tcp_eof != eof;
            }
            // Plaintext from the pair.
            if self.pair_in && self.reads_pair() {
                match self.pair.read(buf) {
                    Ok(0) if self.ctl.park.load(Ordering::SeqCst) && !self.pair_hup => {
                        // The pooler asks to park (it shut its end for
                        // writing after everything it had to send, now all
                        // in rustls and sent: the pair is only read while
                        // nothing is unsent). Plaintext rustls still holds
                        // goes back with the rest.
                        self.drain_plaintext(buf);
                        // A client that sent its last message and
                        // close_notify together: parked all the same, so the
                        // pooler passes the message on (as the server runs a
                        // query sent just before the close); with nothing
                        // before the close_notify, the relay ends as for any
                        // close.
                        if self.tcp_eof && self.to_pair.is_empty() {
                            self.pair_hup = true;
                            self.pair_eof = true;
                            moved = true;
                        } else {
                            return Run::Park;
                        }
                    }
                    Ok(0) => {
                        self.pair_hup = true;
                        self.pair_eof = true;
                        moved = true;
                    }
                    Ok(n) => {
                        // rustls had nothing unsent: 16 KiB always fits.
                        if self.conn.writer().write_all(&buf[..n]).is_err() {
                            return Run::Ended;
                        }
                        moved = true;
                    }
                    Err(e) if would_block(&e) => self.pair_in = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => moved = true,
                    Err(_) => {
                        self.pair_hup = true;
                        self.pair_eof = true;
                        moved = true;
                    }
                }
            }
            if self.pair_hup && self.deadline.is_none() {
                self.deadline = Some(Instant::now() + CLOSE_WITHIN);
                moved = true; // what a hang-up ends is checked above
            }
            if !moved {
                let quiet = !self.conn.is_handshaking() && !self.conn.wants_write() && self.to_pair.is_empty() && !self.pair_hup;
                self.ctl.quiet.store(quiet, Ordering::SeqCst);
                return Run::Blocked;
            }
        }
        self.ctl.quiet.store(false, Ordering::SeqCst);
        Run::Busy
    }

    /// Moves the plaintext rustls holds to `to_pair`; a close_notify or
    /// broken session ends the client's input.
    fn drain_plaintext(&mut self, buf: &mut [u8]) {
        self.tcp_eof |= plaintext_into(&mut self.conn, buf, &mut self.to_pair);
    }

    /// TLS is read from the client (when the socket has some): not after
    /// its EOF or the pair's hang-up, nor while the pair is behind. One
    /// condition for `run` and for the poll of a relay on its own thread.
    fn reads_tcp(&self) -> bool {
        !self.tcp_eof && !self.pair_hup && self.to_pair.len() < PAIR_BACKLOG && self.conn.wants_read()
    }

    /// Plaintext is read from the pair (when it has some): only while
    /// rustls has sent everything (so it always has room for what is read),
    /// and not during the handshake unless the pair hung up.
    fn reads_pair(&self) -> bool {
        !self.pair_eof && (!self.conn.is_handshaking() || self.pair_hup) && !self.conn.wants_write()
    }

    /// Hands the session to the pooler: it is stored in the relay's
    /// control before the pair closes, so the pooler that reads EOF there
    /// finds it.
    fn park(self: Box<Self>) {
        let Relay { conn, tcp, pair, ctl, to_pair, .. } = *self;
        *ctl.parked.lock().unwrap_or_else(|e| e.into_inner()) = Some(Parked { conn, tcp, plaintext: to_pair });
        drop(pair);
    }

    /// Takes what a poll reported (level-triggered: the readiness as of now).
    fn poll_ready(&mut self, tcp: nix::poll::PollFlags, pair: nix::poll::PollFlags) {
        use nix::poll::PollFlags as P;
        let gone = P::POLLHUP | P::POLLERR;
        self.tcp_in |= tcp.intersects(P::POLLIN | gone);
        self.tcp_out |= tcp.intersects(P::POLLOUT | gone);
        self.pair_in |= pair.intersects(P::POLLIN | gone);
        self.pair_out |= pair.intersects(P::POLLOUT | gone);
        if pair.intersects(gone) {
            // Hung up; what it holds is still read (until read says EOF).
            self.pair_hup = true;
        }
    }

    /// Takes an epoll edge for one of its sockets.
    fn edge(&mut self, pair: bool, ev: EpollFlags) {
        let gone = EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
        let readable = ev.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | gone);
        let writable = ev.intersects(EpollFlags::EPOLLOUT | gone);
        if pair {
            self.pair_in |= readable;
            self.pair_out |= writable;
            if ev.intersects(gone) {
                self.pair_hup = true;
            }
        } else {
            self.tcp_in |= readable;
            self.tcp_out |= writable;
        }
    }

    /// The handshake is done (or the relay is being resumed): it may move
    /// to a worker.
    fn established(&self) -> bool {
        self.info.get().is_some()
    }
}

/// Starts a relay: on a thread of its own for its handshake (then on a
/// worker), or, for a parked session resumed, on a worker at once. When
/// neither can be started (EAGAIN: thread or memory limits) the relay
/// comes back with the error, nothing sent. `answer`: the 'S' the client
/// gets first (sent by the relay's thread: nothing is sent when it cannot
/// start).
pub fn start(relay: Box<Relay>, answer: Option<u8>) -> Result<Arc<RelayCtl>, (Box<Relay>, std::io::Error)> {
    let ctl = relay.ctl();
    if relay.established() && answer.is_none() {
        match to_worker(relay) {
            Ok(()) => return Ok(ctl),
            Err(r) => return spawn_thread(r, None).map(|_| ctl),
        }
    }
    spawn_thread(relay, answer).map(|_| ctl)
}

/// Runs `f` on a new thread that starts with every signal blocked: the
/// server's signal handlers (SIGHUP, SIGTERM, SIGUSR1, ...) must run on
/// the pooler's own thread.
fn spawn_blocked(name: &str, f: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    use nix::sys::signal::{SigSet, SigmaskHow};
    let old = SigSet::all().thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
    let started = std::thread::Builder::new()
        .name(name.into())
        // 1 MiB (address space, touched only as used): a stack overflow
        // here is a SIGSEGV in the pooler, which the postmaster answers
        // with crash recovery of the whole cluster.
        .stack_size(1024 * 1024)
        .spawn(move || {
            // Never unwind into nothing: a panic here only ends its relays.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        });
    let _ = old.thread_set_mask();
    started.map(|_| ())
}

/// A relay's own thread; on failure the relay comes back.
fn spawn_thread(relay: Box<Relay>, answer: Option<u8>) -> Result<(), (Box<Relay>, std::io::Error)> {
    // The closure takes the relay out of this cell, so that a spawn that
    // fails (and drops the closure unrun) leaves it to the caller.
    let cell = Arc::new(Mutex::new(Some(relay)));
    let thread_cell = cell.clone();
    let started = spawn_blocked("nextgres tls", move || {
        let Some(r) = thread_cell.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        drop(thread_cell);
        if let Some(b) = answer {
            // One byte on a fresh socket: only a broken one refuses it.
            if (&r.tcp).write(&[b]).ok() != Some(1) {
                return;
            }
        }
        on_thread(r);
    });
    match started {
        Ok(()) => Ok(()),
        Err(e) => match cell.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(r) => Err((r, e)),
            // Unreachable: a thread that never ran took nothing.
            None => Ok(()),
        },
    }
}

/// A relay on its own thread, by poll(): until its handshake is done, when
/// it moves to a worker, or for its whole life when no worker takes it.
fn on_thread(mut r: Box<Relay>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    if r.tcp.set_nonblocking(true).is_err() || r.pair.set_nonblocking(true).is_err() || !r.take_direct() {
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut try_worker = true;
    loop {
        match r.run(&mut buf, usize::MAX) {
            Run::Ended => return,
            Run::Park => return r.park(),
            Run::Busy | Run::Blocked => {}
        }
        if try_worker && r.established() {
            match to_worker(r) {
                Ok(()) => return,
                Err(back) => {
                    r = back;
                    try_worker = false;
                }
            }
        }
        let timeout = match r.deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) => PollTimeout::try_from(left.as_millis().clamp(1, 60_000) as i32).unwrap_or(PollTimeout::ZERO),
                None => return, // the client did not take it in time
            },
            None => PollTimeout::NONE,
        };
        // Level-triggered: ask for exactly what `run` would do next.
        let mut tcp_ev = PollFlags::empty();
        if r.reads_tcp() {
            tcp_ev |= PollFlags::POLLIN;
        }
        if r.conn.wants_write() {
            tcp_ev |= PollFlags::POLLOUT;
        }
        let mut pair_ev = PollFlags::empty();
        if r.reads_pair() {
            pair_ev |= PollFlags::POLLIN;
        }
        if !r.to_pair.is_empty() && !r.pair_hup {
            pair_ev |= PollFlags::POLLOUT;
        }
        // A hung-up pair reports POLLHUP whatever is asked: polled only
        // when it is to be read. A client that has sent EOF is polled only
        // while TLS output is pending, likewise.
        let poll_pair = !r.pair_hup || !pair_ev.is_empty();
        let poll_tcp = (!r.tcp_eof && !r.pair_hup) || r.conn.wants_write();
        let (tcp_re, pair_re) = {
            let mut fds = Vec::with_capacity(2);
            // Index 0 is always the pair; left out of poll when not polled.
            fds.push(PollFd::new(r.pair.as_fd(), pair_ev));
            if poll_tcp {
                fds.push(PollFd::new(r.tcp.as_fd(), tcp_ev));
            }
            let slice = if poll_pair { &mut fds[..] } else { &mut fds[1..] };
            match poll(slice, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
            let re = |i: usize| fds.get(i).and_then(|f| f.revents()).unwrap_or(PollFlags::empty());
            (re(1), if poll_pair { re(0) } else { PollFlags::empty() })
        };
        r.poll_ready(tcp_re, pair_re);
    }
}

/// Gives a relay to the relay workers (started on first use); back when
/// none could be started (they are tried again at the next relay: a
/// moment without threads to spare does not leave every later relay on a
/// thread of its own).
fn to_worker(r: Box<Relay>) -> Result<(), Box<Relay>> {
    static WORKERS: OnceLock<Workers> = OnceLock::new();
    static STARTING: Mutex<()> = Mutex::new(());
    if let Some(w) = WORKERS.get() {
        return w.give(r);
    }
    {
        let _one = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        if WORKERS.get().is_none() {
            if let Some(w) = Workers::start() {
                let _ = WORKERS.set(w);
            }
        }
    }
    match WORKERS.get() {
        Some(w) => w.give(r),
        None => Err(r),
    }
}

/// Relay workers of this process (the pooler) and where new relays go.
struct Workers {
    all: Vec<Arc<Inbox>>,
}

/// One worker's door: relays given to it, and the eventfd that wakes it.
struct Inbox {
    #[allow(clippy::vec_box)] // boxed once, moved to the slab as is
    new: Mutex<Vec<Box<Relay>>>,
    wake: EventFd,
    /// Relays it carries (for choosing the least loaded).
    load: std::sync::atomic::AtomicUsize,
    /// Its thread has ended (an epoll error, a panic outside a relay):
    /// it is given no more relays.
    dead: std::sync::atomic::AtomicBool,
}

/// Marks its worker dead when the worker's loop ends, however it ends.
struct Obituary(Arc<Inbox>);

impl Drop for Obituary {
    fn drop(&mut self) {
        // Under the inbox's lock, as `give` checks it: a relay is either
        // refused or dropped here (closed), never left in a dead inbox.
        let mut new = self.0.new.lock().unwrap_or_else(|e| e.into_inner());
        self.0.dead.store(true, Ordering::SeqCst);
        new.clear();
    }
}

/// Relay workers started: as many as the cores this process may use, at
/// most 8 (each carries relays at some µs per message; more threads than
/// cores only preempt each other).
const MAX_WORKERS: usize = 8;

impl Workers {
    fn start() -> Option<Workers> {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, MAX_WORKERS);
        let mut all = Vec::new();
        for _ in 0..n {
            let Ok(wake) = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK) else { break };
            let Ok(epoll) = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) else { break };
            if epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE)).is_err() {
                break;
            }
            let inbox = Arc::new(Inbox { new: Mutex::new(Vec::new()), wake, load: Default::default(), dead: Default::default() });
            let mine = inbox.clone();
            if spawn_blocked("nextgres relays", move || worker(epoll, mine)).is_err() {
                break;
            }
            all.push(inbox);
        }
        (!all.is_empty()).then_some(Workers { all })
    }

    /// Gives a relay to the least loaded worker; back when every worker
    /// has ended.
    fn give(&self, r: Box<Relay>) -> Result<(), Box<Relay>> {
        let live = self.all.iter().filter(|w| !w.dead.load(Ordering::SeqCst));
        let Some(w) = live.min_by_key(|w| w.load.load(Ordering::Relaxed)) else { return Err(r) };
        // An edge-triggered set reports only what changes after a socket
        // joins it: every socket is tried once first.
        let mut r = r;
        (r.tcp_in, r.tcp_out, r.pair_in, r.pair_out) = (true, true, true, true);
        let mut new = w.new.lock().unwrap_or_else(|e| e.into_inner());
        if w.dead.load(Ordering::SeqCst) {
            return Err(r);
        }
        w.load.fetch_add(1, Ordering::Relaxed);
        new.push(r);
        drop(new);
        let _ = w.wake.write(1);
        Ok(())
    }
}

/// The epoll token of a worker's eventfd; a relay's sockets are 2k (TCP)
/// and 2k + 1 (pair) for its slab key k.
const WAKE: u64 = u64::MAX;

/// A relay worker: edge-triggered epoll over every socket of its relays.
fn worker(epoll: Epoll, inbox: Arc<Inbox>) {
    let _obituary = Obituary(inbox.clone());
    let mut relays: slab::Slab<Box<Relay>> = slab::Slab::new();
    // Relays whose budget ran out with more to do (no edge will come).
    let mut busy: Vec<usize> = Vec::new();
    // Relays with a deadline (closing).
    let mut closing: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut events = vec![EpollEvent::empty(); 256];
    let et = EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
    loop {
        let timeout = if !busy.is_empty() {
            EpollTimeout::ZERO
        } else {
            let now = Instant::now();
            match closing.iter().filter_map(|&k| relays.get(k).and_then(|r| r.deadline)).min() {
                Some(d) => {
                    EpollTimeout::from(d.saturating_duration_since(now).as_millis().clamp(1, 60_000) as u16)
                }
                None => EpollTimeout::NONE,
            }
        };
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(_) => return,
        };
        let mut ran: Vec<usize> = std::mem::take(&mut busy);
        for ev in &events[..n] {
            let token = ev.data();
            if token == WAKE {
                let _ = inbox.wake.read();
                let new = std::mem::take(&mut *inbox.new.lock().unwrap_or_else(|e| e.into_inner()));
                for r in new {
                    let entry = relays.vacant_entry();
                    let k = entry.key() as u64;
                    let ok = r.tcp.set_nonblocking(true).is_ok()
                        && r.pair.set_nonblocking(true).is_ok()
                        && epoll.add(r.tcp.as_fd(), EpollEvent::new(et, 2 * k)).is_ok()
                        && epoll.add(r.pair.as_fd(), EpollEvent::new(et, 2 * k + 1)).is_ok();
                    if !ok {
                        // Out of the set if it got in (ENOENT otherwise).
                        let _ = epoll.delete(r.tcp.as_fd());
                        inbox.load.fetch_sub(1, Ordering::Relaxed);
                        continue; // dropped: both sockets close
                    }
                    entry.insert(r);
                    ran.push(k as usize);
                }
                continue;
            }
            let k = (token / 2) as usize;
            if let Some(r) = relays.get_mut(k) {
                r.edge(token % 2 == 1, ev.events());
                ran.push(k);
            }
        }
        // Deadlines due are checked by running their relays.
        let now = Instant::now();
        closing.retain(|&k| relays.get(k).is_some_and(|r| r.deadline.is_some()));
        ran.extend(closing.iter().copied().filter(|&k| relays.get(k).is_some_and(|r| r.deadline.is_some_and(|d| d <= now))));
        ran.sort_unstable();
        ran.dedup();
        for k in ran {
            let Some(r) = relays.get_mut(k) else { continue };
            // A panic (a bug in rustls, say) ends that client only, not
            // every relay of this worker.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| r.run(&mut buf, RUN_BUDGET))).unwrap_or(Run::Ended);
            match run {
                Run::Blocked => {}
                Run::Busy => busy.push(k),
                end @ (Run::Ended | Run::Park) => {
                    let r = relays.remove(k);
                    // Out of this epoll set before anyone else may own
                    // the TCP socket (parked: the pooler's set).
                    let _ = epoll.delete(r.tcp.as_fd());
                    let _ = epoll.delete(r.pair.as_fd());
                    inbox.load.fetch_sub(1, Ordering::Relaxed);
                    if end == Run::Park {
                        r.park();
                    }
                    continue;
                }
            }
            // Also one that came with its deadline set (its pair closed
            // before its handshake thread handed it over).
            if relays.get(k).is_some_and(|r| r.deadline.is_some()) && !closing.contains(&k) {
                closing.push(k);
            }
        }
    }
}
