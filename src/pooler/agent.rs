//! The agent and the pooler process.
//!
//! The background worker the postmaster starts ("nextgres agent") keeps its
//! PGPROC and its database-less connection, and is the only nextgres process
//! of the two that touches PostgreSQL shared state. It fork()s the pooler
//! process ("postgres: nextgres pooler"), which is no postmaster child: it
//! owns the port, the clients, the epoll loop and the TLS relays, and asks
//! the agent for whatever needs catalogs or shared state, over a
//! SOCK_SEQPACKET socketpair (one request, one reply; the pooler blocks as it
//! blocked on those reads in-process before). So a pooler killed with
//! kill -9 is not a crashed server child: the postmaster does not restart
//! the server (postmaster.c CleanupBackgroundWorker -> HandleChildCrash),
//! walsenders and dedicated sessions keep running, and the agent forks a new
//! pooler.
//!
//! What runs where (calls from `src/pooler` into PostgreSQL):
//! * agent only (catalogs, transactions, the lock manager, shared-memory
//!   spinlocks, MyProc/MyLatch, ProcSignal): `glue::login_lookup`,
//!   `glue::check_usermap` (`+role` lines read pg_auth_members),
//!   `glue::validate_setting` (a transaction), `slots::unreserved_free`
//!   (ProcStructLock), starting the pg_db_role_setting reader
//!   (RegisterDynamicBackgroundWorker, BackgroundWorkerLock), interrupts
//!   and barriers (CHECK_FOR_INTERRUPTS), pg_hba.conf and pg_ident.conf
//!   (the lines `login_lookup` and `check_usermap` use),
//!   `glue::backend_identity` (ProcArrayLock), `glue::login_params` (a
//!   transaction).
//! * pooler process (process-local): GUC values and ProcessConfigFile,
//!   `GetMockAuthenticationNonce`, `pg_strong_random`,
//!   `GetCurrentTimestamp`, elog to the server log, the TLS files, its own
//!   epoll with the postmaster-death pipe, the shared tables under the
//!   nextgres mutex (`pg::shmem::Guard`, a robust pthread mutex, never an
//!   LWLock), SIGUSR1 wake-ups from backends (pid in the shared header).
use super::worker::Pooler;
use crate::pg::glue::{self, NgError, NgLoginInfo};
use crate::{postmaster, shmem};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker};
use pgrx::pg_sys;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// Pause before a new pooler after one ended (as the worker's restart time
/// was before the split: bounds a pooler that dies at start to one a second).
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// How long the agent waits for a pooler it sent SIGTERM to (its shutdown
/// gives TLS relays up to 1 s) before SIGKILL.
const STOP_PATIENCE: Duration = Duration::from_secs(5);
/// Largest request or reply.
const MSG_MAX: usize = 64 * 1024;

const REQ_LOGIN_LOOKUP: u8 = 1;
const REQ_CHECK_USERMAP: u8 = 2;
const REQ_VALIDATE_SETTING: u8 = 3;
const REQ_UNRESERVED_FREE: u8 = 4;
const REQ_READER_START: u8 = 5;
const REQ_READER_RUNNING: u8 = 6;
const REQ_BACKEND_IDENTITY: u8 = 7;
const REQ_LOGIN_PARAMS: u8 = 8;
const REQ_TLS_LOADS: u8 = 9;

// ---- the agent ----------------------------------------------------------------

/// The agent's loop: fork a pooler, serve its requests, fork a new one
/// when it ends. Returns never (SIGTERM: proc_exit after the pooler).
pub fn agent_main() -> ! {
    let tables = shmem::tables().expect("nextgres shared memory (shared_preload_libraries)");
    // The postmaster's loaded rules, not the file on disk: an edit it has
    // not reloaded (or kept through a crash restart) must not apply here.
    if !glue::hba_kept() {
        if let Err(e) = glue::load_hba() {
            log::warn!("could not load pg_hba.conf: {}", e.message());
        }
    }
    let mut reader: Option<DynamicBackgroundWorker> = None;
    crate::pg::on_proc_exit(agent_exit);
    loop {
        let (sock, pid) = spawn();
        POOLER_CHILD.store(pid, std::sync::atomic::Ordering::SeqCst);
        let ended = serve(&sock, pid, &mut reader);
        // Before the pid is reaped (and could be reused): backends stop
        // signalling it and accept no pool login from it. Then those keeping
        // an idle client of it look (`Tables::wake_lingering`).
        tables.set_pooler(0, postmaster::listen::port());
        tables.wake_lingering();
        // The socket stays open until the pooler has exited: a pooler told
        // to stop (SIGTERM) must not see the agent gone first, or it would
        // exit without its FATAL to idle clients.
        let status = reap(pid, ended == Ended::Stop);
        POOLER_CHILD.store(0, std::sync::atomic::Ordering::SeqCst);
        drop(sock);
        log::info!("pooler process (PID {pid}) {}", describe_exit(status));
        super::stats::Rows::new(&tables).reset_all(&tables);
        if ended == Ended::Stop {
            log::info!("agent shutting down");
            // Exit code 1: an agent stopped by pg_terminate_backend is restarted.
            crate::pg::proc_exit(1)
        }
        // The listen sockets stay open in the postmaster: new clients wait
        // in the backlog meanwhile.
        let until = Instant::now() + RESTART_DELAY;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let (latch, _) = glue::agent_wait(-1, left.as_millis() as i64 + 1);
            if latch && agent_interrupts(None) {
                log::info!("agent shutting down");
                crate::pg::proc_exit(1)
            }
        }
    }
}

/// The pooler process the agent forked and has not reaped yet (0: none).
static POOLER_CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The agent exiting with its pooler still running (an ERROR escaped the
/// agent's loop): backends must stop signalling that pid and accept no pool
/// login from it at once, not after PR_SET_PDEATHSIG has killed it and the
/// next agent forked a new one; and the pooler is told to go now.
extern "C-unwind" fn agent_exit(_code: i32, _arg: pg_sys::Datum) {
    let pid = POOLER_CHILD.swap(0, std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        if let Some(tables) = shmem::tables() {
            tables.set_pooler(0, postmaster::listen::port());
            tables.wake_lingering();
        }
        // SAFETY: kill(2) of our own unreaped child (its pid cannot be reused).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

#[derive(PartialEq, Eq)]
enum Ended {
    /// The pooler process ended by itself (or was killed).
    Gone,
    /// The agent got SIGTERM and stopped the pooler.
    Stop,
}

/// Latch set: interrupts, SIGHUP (reload, then the pooler's), SIGTERM.
/// True on SIGTERM.
fn agent_interrupts(pooler: Option<i32>) -> bool {
    glue::pooler_check_interrupts();
    if BackgroundWorker::sighup_received() {
        reload();
        if let Some(pid) = pooler {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGHUP) };
        }
    }
    BackgroundWorker::sigterm_received()
}

/// SIGHUP in the agent: settings, then pg_hba.conf and pg_ident.conf as the
/// postmaster reloads them (the lines `login_lookup` and `check_usermap`
/// use); the pooler process reloads its own settings after.
fn reload() {
    crate::pg::server::reload_config_file();
    match glue::load_hba() {
        Ok(()) => log::info!("reloaded pg_hba.conf and settings"),
        Err(e) => log::warn!("pg_hba.conf not reloaded, keeping the previous rules: {}", e.message()),
    }
    // As the postmaster: pg_ident.conf after pg_hba.conf; one that does
    // not load keeps the previous lines (the server LOGs why). Only where
    // the fork handler kept hba.c's lines valid (else load_ident() would
    // free freed memory; map= is refused then).
    if !glue::ident_kept() {
        log::warn!("pg_ident.conf not reloaded: the postmaster's parsed lines were not kept in the pooler, map= on certificate lines is refused");
    } else if let Err(e) = glue::load_ident() {
        log::warn!("pg_ident.conf not reloaded, keeping the previous lines: {}", e.message());
    }
}

/// Forks the pooler process; returns the agent's end of the socketpair and
/// the pooler's pid. The child never returns from here.
fn spawn() -> (OwnedFd, i32) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair(2) into a local array.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        pgrx::error!("nextgres: socketpair: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned here.
    let (mine, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let agent_pid = std::process::id() as i32;
    // SAFETY: the agent is single-threaded (it starts no thread); the child
    // runs only async-signal-safe code until ng_pooler_child_init, then
    // process-local code (see the module comment).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        pgrx::error!("nextgres: could not fork the pooler process: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(mine);
        child_main(theirs, agent_pid)
    }
    drop(theirs);
    (mine, pid)
}

/// Serves the pooler's requests until it ends (its end of the socketpair
/// closes) or the agent gets SIGTERM (then the pooler is stopped first).
fn serve(sock: &OwnedFd, pid: i32, reader: &mut Option<DynamicBackgroundWorker>) -> Ended {
    let mut buf = vec![0u8; MSG_MAX];
    // Once the pooler is told to stop, keep answering it until it exits:
    // a pooler blocked in `call()` (SA_RESTART recv) would otherwise never
    // finish its shutdown (57P01 to its clients) and be killed after
    // STOP_PATIENCE.
    let mut stopping: Option<Instant> = None;
    let ended = |stopping: Option<Instant>| if stopping.is_some() { Ended::Stop } else { Ended::Gone };
    loop {
        let (latch, readable) = glue::agent_wait(sock.as_raw_fd(), if stopping.is_some() { 100 } else { 1000 });
        if latch && agent_interrupts(Some(pid)) && stopping.is_none() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            stopping = Some(Instant::now());
        }
        if stopping.is_some_and(|t| t.elapsed() >= STOP_PATIENCE) {
            return Ended::Stop;
        }
        if !readable {
            continue;
        }
        loop {
            // SAFETY: recv into our own buffer.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n == 0 {
                return ended(stopping);
            }
            if n < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => break,
                    _ => return ended(stopping),
                }
            }
            let mut reply = answer(&buf[..n as usize], reader);
            // SAFETY: send from our own buffer; MSG_NOSIGNAL: a pooler gone
            // meanwhile is seen as EOF at the next recv.
            unsafe { libc::send(sock.as_raw_fd(), reply.as_ptr().cast(), reply.len(), libc::MSG_NOSIGNAL) };
            wipe(&mut reply);
            wipe(&mut buf[..n as usize]);
        }
    }
}

/// Waits for the pooler process to end (bounded when `stopping`: SIGKILL
/// after STOP_PATIENCE) and returns its wait status.
fn reap(pid: i32, stopping: bool) -> i32 {
    let deadline = Instant::now() + STOP_PATIENCE;
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) of our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid || r < 0 {
            return status;
        }
        if stopping && Instant::now() >= deadline {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// As the postmaster words a child's exit (postmaster.c LogChildExit).
fn describe_exit(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: strsignal returns a static string.
        let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(sig)) }.to_string_lossy().into_owned();
        format!("was terminated by signal {sig}: {name}")
    } else {
        format!("exited with unrecognized status {status}")
    }
}

/// One request of the pooler process, answered by the agent.
fn answer(req: &[u8], reader: &mut Option<DynamicBackgroundWorker>) -> Vec<u8> {
    let mut r = Reader(req);
    let Some(kind) = r.u8() else { return vec![1] };
    match kind {
        REQ_LOGIN_LOOKUP => {
            let (Some(db), Some(user), Some(addr), Some(len), Some(ssl), Some(rep)) =
                (r.str(), r.str(), r.bytes(), r.u32(), r.u8(), r.u8())
            else {
                return vec![2];
            };
            let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let n = addr.len().min(size_of::<libc::sockaddr_storage>());
            // SAFETY: copies at most sizeof(sockaddr_storage) bytes into it.
            unsafe { std::ptr::copy_nonoverlapping(addr.as_ptr(), (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(), n) };
            use nextgres_core::proto::Replication;
            let rep = match rep {
                1 => Replication::Physical,
                2 => Replication::Logical,
                _ => Replication::None,
            };
            match crate::pg::loginmem::scoped(|| glue::login_lookup(&db, &user, &ss, len, ssl != 0, rep)) {
                Ok(info) => ok_pod(&*info),
                Err(e) => err_pod(&e),
            }
        }
        REQ_CHECK_USERMAP => {
            let (Some(map), Some(user), Some(sys)) = (r.str(), r.str(), r.bytes()) else { return vec![2] };
            match crate::pg::loginmem::scoped(|| glue::check_usermap(&map, &user, sys)) {
                Ok(b) => vec![0, b as u8],
                Err(e) => err_pod(&e),
            }
        }
        REQ_VALIDATE_SETTING => {
            let (Some(name), Some(value), Some(su), Some(role)) = (r.str(), r.str(), r.u8(), r.u32()) else { return vec![2] };
            match crate::pg::loginmem::scoped(|| glue::validate_setting(&name, &value, su != 0, role)) {
                Ok(shown) => {
                    let mut out = vec![0];
                    out.extend_from_slice(shown.as_deref().unwrap_or("").as_bytes());
                    out
                }
                Err(e) => err_pod(&e),
            }
        }
        REQ_UNRESERVED_FREE => {
            let Some(n) = r.u32() else { return vec![2] };
            vec![0, crate::pg::slots::unreserved_free(n as usize) as u8]
        }
        REQ_READER_START => {
            *reader = None;
            match start_reader() {
                Ok(w) => {
                    *reader = Some(w);
                    vec![0]
                }
                Err(why) => {
                    let mut v = vec![1];
                    v.extend_from_slice(why.as_bytes());
                    v
                }
            }
        }
        REQ_BACKEND_IDENTITY => {
            let Some(pid) = r.u32() else { return vec![2] };
            match glue::backend_identity(pid as i32) {
                Ok(Some((role, db))) => {
                    let mut v = vec![0, 1];
                    v.extend_from_slice(&role.to_ne_bytes());
                    v.extend_from_slice(&db.to_ne_bytes());
                    v
                }
                Ok(None) => vec![0, 0],
                Err(glue::NoPgproc) => {
                    log::error!("backend identity asked in a process with no PGPROC (a bug); refused");
                    vec![2]
                }
            }
        }
        REQ_LOGIN_PARAMS => {
            let (Some(role), Some(n)) = (r.u32(), r.u32()) else { return vec![2] };
            let mut names = Vec::new();
            for _ in 0..n {
                let Some(name) = r.str() else { return vec![2] };
                names.push(name);
            }
            let Some(m) = r.u32() else { return vec![2] };
            let mut settings = Vec::new();
            for _ in 0..m {
                let (Some(name), Some(value)) = (r.str(), r.str()) else { return vec![2] };
                settings.push((name, value));
            }
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let settings: Vec<(&str, &str)> = settings.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            match crate::pg::loginmem::scoped(|| glue::login_params(role, &names, &settings)) {
                Ok(values) => {
                    let mut out = vec![0];
                    for v in values {
                        put_bytes(&mut out, v.as_bytes());
                    }
                    out
                }
                Err(e) => err_pod(&e),
            }
        }
        REQ_TLS_LOADS => vec![0, glue::server_tls_config_loads() as u8],
        REQ_READER_RUNNING => {
            let running = reader
                .as_ref()
                .is_some_and(|w| matches!(w.pid(), Ok(_) | Err(pgrx::bgworkers::BackgroundWorkerStatus::NotYetStarted)));
            vec![0, running as u8]
        }
        _ => vec![2],
    }
}

/// Starts the pg_db_role_setting reader (`pooler::poolconf`).
fn start_reader() -> Result<DynamicBackgroundWorker, String> {
    let Some(db) = crate::pg::poolconf::pick_reader_database() else {
        return Err("no database accepts connections".into());
    };
    BackgroundWorkerBuilder::new("nextgres settings reader")
        .set_type("nextgres settings reader")
        .set_library("nextgres")
        .set_function("nextgres_conf_reader_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_argument(Some(pg_sys::Datum::from(u32::from(db))))
        .set_notify_pid(crate::pg::server::my_pid())
        .load_dynamic()
        .map_err(|e| format!("{e:?} (max_worker_processes)"))
}

fn ok_pod<T>(v: &T) -> Vec<u8> {
    let mut out = vec![0u8];
    // SAFETY: T is a repr(C) plain-data struct of glue.c (no pointers).
    out.extend_from_slice(unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) });
    out
}

fn err_pod(e: &NgError) -> Vec<u8> {
    let mut out = ok_pod(e);
    out[0] = 1;
    out
}

/// Overwrites a buffer that may have held a secret (volatile: not elided).
fn wipe(b: &mut [u8]) {
    for x in b.iter_mut() {
        // SAFETY: a plain byte of our own buffer.
        unsafe { std::ptr::write_volatile(x, 0) };
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        (self.0.len() >= n).then(|| {
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            a
        })
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Option<String> {
        self.bytes().map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_ne_bytes());
    out.extend_from_slice(b);
}

// ---- the pooler process ----------------------------------------------------------

/// The pooler process's end of the socketpair.
static AGENT: AtomicI32 = AtomicI32::new(-1);
/// eventfd written by the signal handlers; in the pooler's epoll.
static WAKE: AtomicI32 = AtomicI32::new(-1);
pub static GOT_SIGTERM: AtomicBool = AtomicBool::new(false);
pub static GOT_SIGHUP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    match sig {
        libc::SIGTERM => GOT_SIGTERM.store(true, Ordering::SeqCst),
        libc::SIGHUP => GOT_SIGHUP.store(true, Ordering::SeqCst),
        _ => {}
    }
    // SAFETY: errno is the interrupted code's; saved around wake(), whose
    // write(2) is async-signal-safe.
    unsafe {
        let saved = *libc::__errno_location();
        wake();
        *libc::__errno_location() = saved;
    }
}

extern "C" fn on_sigquit(_: libc::c_int) {
    // SAFETY: _exit(2) is async-signal-safe.
    unsafe { libc::_exit(2) }
}

fn child_main(sock: OwnedFd, agent_pid: i32) -> ! {
    glue::pooler_child_init();
    // SAFETY: process-local setup of the new process: die with the agent
    // (SIGKILL: nothing of the agent's may run here after it is gone), own
    // signal handlers instead of the agent's (procsignal's SIGUSR1 handler
    // would read the agent's ProcSignal slot, SIGINT's would set the agent's
    // cancel flags, SIGALRM's would set its latch).
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != agent_pid {
            libc::_exit(1);
        }
        let wake = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        if wake < 0 {
            libc::_exit(1);
        }
        WAKE.store(wake, Ordering::SeqCst);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
        for sig in [libc::SIGINT, libc::SIGALRM, libc::SIGUSR2, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_IGN);
        }
        // Immediate shutdown / crash restart (SIGQUIT to the process
        // group): exit at once without a core, as the server's children do.
        libc::signal(libc::SIGQUIT, on_sigquit as extern "C" fn(libc::c_int) as libc::sighandler_t);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1, libc::SIGQUIT] {
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    AGENT.store(std::os::fd::IntoRawFd::into_raw_fd(sock), Ordering::SeqCst);
    let mut pooler = Pooler::new();
    pooler.run()
}

/// The pooler process's fds its loop watches besides its connections:
/// (signal eventfd, postmaster-death pipe, the agent's socket).
pub fn watch_fds() -> (RawFd, RawFd, RawFd) {
    (WAKE.load(Ordering::SeqCst), glue::postmaster_watch_fd(), AGENT.load(Ordering::SeqCst))
}

/// Wakes the pooler's loop: from the signal handlers, and from another
/// thread (a password check that finished, `password.rs`). Nothing before
/// the eventfd exists.
pub fn wake() {
    let fd = WAKE.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) of 8 bytes to our own eventfd (async-signal-safe).
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Empties the signal eventfd.
pub fn drain_wake() {
    let mut v = 0u64;
    // SAFETY: read(2) of our own nonblocking eventfd.
    unsafe { libc::read(WAKE.load(Ordering::SeqCst), (&mut v as *mut u64).cast(), 8) };
}

/// One request to the agent and its reply. The agent gone: the pooler
/// process exits (it would be killed by PR_SET_PDEATHSIG anyway).
fn call(req: &[u8]) -> Vec<u8> {
    let fd = AGENT.load(Ordering::SeqCst);
    loop {
        // SAFETY: send from our own buffer on our own socket.
        let n = unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            agent_gone();
        }
    }
    let mut buf = vec![0u8; MSG_MAX];
    loop {
        // SAFETY: recv into our own buffer on our own socket.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 {
            buf.truncate(n as usize);
            return buf;
        }
        if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            agent_gone();
        }
    }
}

pub fn agent_gone() -> ! {
    log::warn!("the nextgres agent is gone, pooler exiting");
    crate::pg::proc_exit(1)
}

fn from_pod<T>(b: &[u8], out: &mut T) -> bool {
    if b.len() != size_of::<T>() {
        return false;
    }
    // SAFETY: T is a repr(C) plain-data struct of glue.c, filled byte for
    // byte from the agent's copy of the same type (same binary).
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (out as *mut T).cast::<u8>(), size_of::<T>()) };
    true
}

fn reply_err(b: &[u8]) -> NgError {
    let mut e = NgError::new();
    if !from_pod(b, &mut e) {
        let msg = b"nextgres: bad reply from the agent";
        for (d, s) in e.message.iter_mut().zip(msg.iter()) {
            *d = *s as std::ffi::c_char;
        }
        for (d, s) in e.sqlstate.iter_mut().zip(b"XX000".iter()) {
            *d = *s as std::ffi::c_char;
        }
    }
    e
}

/// `glue::login_lookup`, run by the agent (pg_hba.conf and catalogs).
pub fn login_lookup(
    database: &str,
    user: &str,
    addr: &libc::sockaddr_storage,
    len: u32,
    ssl_in_use: bool,
    replication: nextgres_core::proto::Replication,
) -> Result<Box<NgLoginInfo>, NgError> {
    use nextgres_core::proto::Replication;
    let mut req = vec![REQ_LOGIN_LOOKUP];
    put_bytes(&mut req, database.as_bytes());
    put_bytes(&mut req, user.as_bytes());
    // SAFETY: sockaddr_storage is plain data.
    put_bytes(&mut req, unsafe {
        std::slice::from_raw_parts((addr as *const libc::sockaddr_storage).cast::<u8>(), size_of::<libc::sockaddr_storage>())
    });
    req.extend_from_slice(&len.to_ne_bytes());
    req.push(ssl_in_use as u8);
    req.push(match replication {
        Replication::None => 0,
        Replication::Physical => 1,
        Replication::Logical => 2,
    });
    let mut rep = call(&req);
    let out = match rep.first() {
        Some(0) => {
            // Boxed and zeroed as glue::login_lookup does; wiped on drop.
            let mut info: Box<NgLoginInfo> = Box::new(unsafe { std::mem::zeroed() });
            if from_pod(&rep[1..], &mut *info) {
                Ok(info)
            } else {
                Err(reply_err(&[]))
            }
        }
        _ => Err(reply_err(rep.get(1..).unwrap_or(&[]))),
    };
    wipe(&mut rep);
    out
}

/// `glue::check_usermap`, run by the agent (its pg_ident.conf; `+role`
/// lines read the catalogs).
pub fn check_usermap(usermap: &str, pg_user: &str, system_user: &[u8]) -> Result<bool, NgError> {
    let mut req = vec![REQ_CHECK_USERMAP];
    put_bytes(&mut req, usermap.as_bytes());
    put_bytes(&mut req, pg_user.as_bytes());
    put_bytes(&mut req, system_user);
    let rep = call(&req);
    match rep.as_slice() {
        [0, b] => Ok(*b != 0),
        _ => Err(reply_err(rep.get(1..).unwrap_or(&[]))),
    }
}

/// `glue::validate_setting`, run by the agent (a transaction).
pub fn validate_setting(name: &str, value: &str, superuser: bool, role: u32) -> Result<Option<String>, NgError> {
    let mut req = vec![REQ_VALIDATE_SETTING];
    put_bytes(&mut req, name.as_bytes());
    put_bytes(&mut req, value.as_bytes());
    req.push(superuser as u8);
    req.extend_from_slice(&role.to_ne_bytes());
    let rep = call(&req);
    match rep.as_slice() {
        [0, shown @ ..] => Ok((!shown.is_empty()).then(|| String::from_utf8_lossy(shown).into_owned())),
        _ => Err(reply_err(rep.get(1..).unwrap_or(&[]))),
    }
}

/// `glue::login_params`, run by the agent (a transaction): one value per
/// name, in order.
pub fn login_params(role: u32, names: &[&str], settings: &[(&str, &str)]) -> Result<Vec<String>, NgError> {
    let mut req = vec![REQ_LOGIN_PARAMS];
    req.extend_from_slice(&role.to_ne_bytes());
    req.extend_from_slice(&(names.len() as u32).to_ne_bytes());
    for n in names {
        put_bytes(&mut req, n.as_bytes());
    }
    req.extend_from_slice(&(settings.len() as u32).to_ne_bytes());
    for (name, value) in settings {
        put_bytes(&mut req, name.as_bytes());
        put_bytes(&mut req, value.as_bytes());
    }
    let rep = call(&req);
    match rep.split_first() {
        Some((0, rest)) => {
            let mut r = Reader(rest);
            let values: Option<Vec<String>> = names.iter().map(|_| r.str()).collect();
            values.filter(|_| r.0.is_empty()).ok_or_else(|| reply_err(&[]))
        }
        _ => Err(reply_err(rep.get(1..).unwrap_or(&[]))),
    }
}

/// `glue::server_tls_config_loads`, run by the agent (the server's TLS
/// library is linked into every process, but the agent is the one whose
/// errors may be raised and caught).
pub fn server_tls_config_loads() -> bool {
    matches!(call(&[REQ_TLS_LOADS]).as_slice(), [0, 1])
}

/// `slots::unreserved_free`, run by the agent (ProcStructLock, a spinlock).
pub fn unreserved_free(n: usize) -> bool {
    let mut req = vec![REQ_UNRESERVED_FREE];
    req.extend_from_slice(&(n as u32).to_ne_bytes());
    matches!(call(&req).as_slice(), [0, 1])
}

/// Has the agent start a pg_db_role_setting reader; Err(why) when none started.
pub fn reader_start() -> Result<(), String> {
    let rep = call(&[REQ_READER_START]);
    match rep.first() {
        Some(0) => Ok(()),
        _ => Err(String::from_utf8_lossy(rep.get(1..).unwrap_or(&[])).into_owned()),
    }
}

/// What the agent found for a backend's pid (`backend_identity`).
pub enum Identity {
    /// The role and database (oids) its PGPROC names.
    Of(u32, u32),
    /// No live backend has that pid.
    Gone,
    /// The agent could not tell (a malformed or refused answer: a bug).
    Unknown,
}

/// `glue::backend_identity`, run by the agent (ProcArrayLock: the pooler
/// process has no PGPROC, so it never takes an LWLock).
pub fn backend_identity(pid: i32) -> Identity {
    let mut req = vec![REQ_BACKEND_IDENTITY];
    req.extend_from_slice(&(pid as u32).to_ne_bytes());
    match call(&req).as_slice() {
        [0, 1, rest @ ..] => {
            let mut r = Reader(rest);
            match (r.u32(), r.u32()) {
                (Some(role), Some(db)) if r.0.is_empty() => Identity::Of(role, db),
                _ => Identity::Unknown,
            }
        }
        [0, 0] => Identity::Gone,
        _ => Identity::Unknown,
    }
}

/// Is the reader the agent started last still starting or running?
pub fn reader_running() -> bool {
    matches!(call(&[REQ_READER_RUNNING]).as_slice(), [0, 1])
}
