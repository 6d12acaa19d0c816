//! Registration of the agent (the background worker, see `agent`) and the
//! main loop of the pooler process it forks.
use super::conn::{self, Conn};
use nextgres_core::pool::Pool;
use crate::pg::glue;
use crate::{postmaster, shmem};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollTimeout};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use std::sync::atomic::Ordering;
use pgrx::pg_sys;
use slab::Slab;
use std::collections::HashMap;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

/// Postmaster: register the agent, which forks the pooler process (`agent`).
/// The agent restarts a second after it dies (then the server was restarted
/// or it was terminated); its listen sockets stay open in the postmaster
/// meanwhile.
pub fn register() {
    // The pooler reads pg_hba.conf and pg_ident.conf as the postmaster
    // parsed them (glue.c, ng_keep_parsed_auth_files_in_child); without the
    // fork handler those lines would be freed memory in the pooler.
    // pthread_atfork fails on ENOMEM only.
    if !glue::install_auth_file_keeper() {
        pgrx::error!("nextgres: could not install its fork handler (pthread_atfork)");
    }
    BackgroundWorkerBuilder::new("nextgres agent")
        .set_type("nextgres agent")
        .set_library("nextgres")
        .set_function("nextgres_pooler_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn nextgres_pooler_main(_arg: pg_sys::Datum) {
    glue::pooler_guard_stale_hba_contexts();
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // Shared catalogs only (pg_authid, pg_database, pg_auth_members): the
    // pooler belongs to no database.
    BackgroundWorker::connect_worker_to_spi(None, None);
    glue::pooler_catalog_heap_scans();
    glue::agent_acl_init();
    crate::pg::logger::init();
    super::agent::agent_main()
}

/// Keys of the pooler process's own fds in its epoll (connections use slab
/// keys, far below).
const KEY_WAKE: usize = usize::MAX;
const KEY_PM_DEATH: usize = usize::MAX - 1;
const KEY_AGENT: usize = usize::MAX - 2;

/// All pooler state. Modules add behaviour in their own `impl Pooler` blocks.
pub struct Pooler {
    pub epoll: Epoll,
    /// The connection table; a slab key is also the epoll token of its
    /// socket (`conn.rs`).
    pub conns: Slab<Conn>,
    /// Keys removed from `conns` while the current batch of epoll events is
    /// dispatched (`conn_take`): a later event of the batch under such a key
    /// was for the removed connection, not for one that took the key since
    /// (the slab hands a freed key out again at once), and is dropped.
    /// Without this, a reset vanished client's EPOLLERR reached the backend
    /// login started for its key in the same batch, which the pooler then
    /// took for dead.
    pub freed_in_batch: Vec<usize>,
    /// The release rings at the last look (`ring`).
    pub rings_seen: super::ring::RingsSeen,
    /// Scratch list of backends whose rings to read (`rings_look`).
    pub ring_keys: Vec<usize>,
    pub pools: Slab<Pool>,
    pub pool_by_name: HashMap<(String, String), usize>,
    /// Client-facing cancel pid -> client conn key.
    pub cancel_keys: HashMap<i32, usize>,
    /// Clients (key, id) given back since the janitor's last tick, whose
    /// received bytes it counts (`Pooler::count_received_due`).
    pub received_due: Vec<(usize, u64)>,
    /// Local addresses clients connected to, raw sockaddrs as ATTACH
    /// carries them (`Client::local` indexes them).
    pub local_addrs: Vec<Vec<u8>>,
    pub next_client_id: u64,
    pub next_cancel_pid: i32,
    pub token_hex: String,
    pub server_socket: PathBuf,
    pub tables: shmem::Tables,
    pub rows: super::stats::Rows,
    pub clients: usize,
    /// Refused connections read for a CancelRequest (`refusing.rs`).
    pub refusing: usize,
    /// Clients taken at max_client_conn for their SSLRequest only
    /// (`refusing`), not counted in `clients`; at most `MAX_REFUSING`.
    pub over_limit_clients: usize,
    pub mock_key: [u8; 32],
    /// The `password` method's checks against SCRAM secrets, on threads.
    pub verifier: super::password::Verifier,
    /// Failed authentications whose refusal waits out auth_delay.
    pub auth_delayed: Vec<super::auth_delay::Delayed>,
    /// Sockets of clients told a final error, closed when due
    /// (`client::FINAL_ERROR_LINGER`), oldest first.
    pub close_later: std::collections::VecDeque<(std::net::TcpStream, std::time::Instant)>,
    /// What the server speaks: newest protocol minor, longest cancel key.
    pub server_proto: nextgres_core::proto::ServerProtocol,
    /// Smart shutdown in progress: admit nobody, let pools drain.
    pub stopping: bool,
    /// The server's TLS settings as loaded for new clients (`tls`); None:
    /// SSLRequest is answered 'N'.
    pub tls: Option<std::sync::Arc<super::tls::Loaded>>,
    /// Databases a DROP DATABASE (or similar) is waiting on (see `drain`).
    pub draining: Vec<String>,
    pub last_janitor: Option<std::time::Instant>,
    /// Per-pool settings from pg_db_role_setting (`poolconf`).
    pub conf: super::poolconf::ConfState,
    /// Backends the pooler closed whose process may not have exited yet
    /// (`limits`: they still count against max_db/user_connections).
    pub closing: Vec<super::limits::Closing>,
    /// Pauses in force (`ops`).
    pub ops: super::ops::OpsState,
    /// Listen sockets out of the epoll set after accept(2) ran out of
    /// descriptors (`listener`).
    pub accept_pause: nextgres_core::accept::Pause,
    /// Last ticket of an ATTACH sent ahead (`ahead.rs`); starts at random,
    /// so a backend of a previous pooler holding an old ticket never matches
    /// a new one in a reused shared row.
    pub next_ticket: u64,
    /// The kernel queue (`kq`).
    pub kq: super::kq::KernelQueue,
}

impl Pooler {
    /// In the pooler process (`agent::child_main`).
    pub fn new() -> Pooler {
        let tables = shmem::tables().expect("nextgres shared memory (shared_preload_libraries)");
        super::listener::raise_open_files_limit();
        super::ahead::allow_backends_getfd();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll_create");
        let mut conns = Slab::with_capacity(1024);
        for fd in postmaster::listen::listeners() {
            // dup: the postmaster's copy must outlive this process so the
            // backlog survives a pooler restart.
            let dup = match nix::unistd::dup(fd) {
                Ok(d) => d,
                Err(e) => {
                    // Out of descriptors at start: the agent starts
                    // another pooler after its restart delay.
                    log::warn!("could not duplicate the listen socket: {e}");
                    crate::pg::proc_exit(1)
                }
            };
            let owned = unsafe { OwnedFd::from_raw_fd(dup) };
            let entry = conns.vacant_entry();
            conn::add(&epoll, &owned, entry.key(), conn::READ);
            entry.insert(Conn::Listener(owned));
        }
        // pg_hba.conf is the agent's (it runs login_lookup).
        let (wake, pm, agent) = super::agent::watch_fds();
        for (fd, key) in [(wake, KEY_WAKE), (pm, KEY_PM_DEATH), (agent, KEY_AGENT)] {
            // SAFETY: fds this process owns for its whole life.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            conn::add(&epoll, &fd, key, conn::READ);
        }
        let mock_key = crate::pg::server::mock_authentication_nonce();
        let token_hex = crate::backend::token_hex(&tables.header().token);
        let rows = super::stats::Rows::new(&tables);
        let mut seed = [0u8; 4];
        crate::pg::shmem::strong_random(&mut seed);
        let mut ticket_seed = [0u8; 8];
        crate::pg::shmem::strong_random(&mut ticket_seed);
        let mut p = Pooler {
            epoll,
            conns,
            freed_in_batch: Vec::new(),
            rings_seen: Default::default(),
            ring_keys: Vec::new(),
            pools: Slab::new(),
            pool_by_name: HashMap::new(),
            cancel_keys: HashMap::new(),
            received_due: Vec::new(),
            local_addrs: Vec::new(),
            next_client_id: 1,
            next_cancel_pid: (u32::from_ne_bytes(seed) % 1_000_000_000) as i32 + 1,
            token_hex,
            server_socket: server_socket_path(),
            tables,
            rows,
            clients: 0,
            refusing: 0,
            over_limit_clients: 0,
            mock_key,
            verifier: super::password::Verifier::new(),
            auth_delayed: Vec::new(),
            close_later: std::collections::VecDeque::new(),
            server_proto: glue::server_protocol(),
            tls: match super::tls::load_or_startup() {
                (c, None) => c,
                (Some(c), Some(e)) => {
                    log::warn!("SSL configuration could not be loaded, the pooler serves TLS with the one loaded at server start: {e}");
                    Some(c)
                }
                (None, Some(e)) => {
                    log::warn!("TLS not available, SSLRequest is answered 'N': {e}");
                    None
                }
            },
            stopping: false,
            draining: Vec::new(),
            last_janitor: None,
            conf: super::poolconf::ConfState::new(),
            closing: Vec::new(),
            ops: Default::default(),
            accept_pause: Default::default(),
            // Random, so a restarted pooler's tickets differ from the last
            // one's, and below 2^48, so the 61-bit counter never wraps: the
            // backends take the lowest ticket as the first sent.
            next_ticket: u64::from_ne_bytes(ticket_seed) & ((1 << 48) - 1),
            kq: Default::default(),
        };
        p.kq_init();
        p.rows.reset_all(&p.tables);
        p.tables.set_pooler(crate::pg::server::my_pid(), postmaster::listen::port());
        // "pooler ready", after set_pooler: the test harness's
        // Cluster::start waits for it (nextgres.status() then shows the port).
        if postmaster::listen::port() == 0 {
            log::info!("pooler ready without a TCP listener ({}; see the WARNING at startup)", postmaster::listen::mode().name());
        } else {
            log::info!(
                "pooler ready on port {} (pool logins via {})",
                postmaster::listen::port(),
                p.server_socket.display()
            );
        }
        p
    }

    pub fn run(&mut self) -> ! {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            let now = std::time::Instant::now();
            let mut wait = self.accept_pause.wait_ms(now, super::janitor::TICK_MS);
            if let Some(ms) = self.auth_delay_wait_ms(now) {
                wait = wait.min(ms);
            }
            if let Some(ms) = self.close_later_wait_ms(now) {
                wait = wait.min(ms);
            }
            // The next ring entry written while the pooler sleeps wakes it
            // (one written before this store is seen here: no sleep then).
            let mut sleeps = wait > 0;
            if sleeps && !self.rings_quiet(self.tables.pooler_sleeps(true)) {
                // Entries to read: no sleep, so no flag either.
                self.tables.pooler_sleeps(false);
                (wait, sleeps) = (0, false);
            }
            let mut timeout = EpollTimeout::from(wait.clamp(0, u16::MAX as i64) as u16);
            loop {
                let waited = self.epoll.wait(&mut events, timeout);
                if waited == Err(nix::errno::Errno::EINTR) {
                    continue; // asleep again, the flag still up
                }
                if std::mem::take(&mut sleeps) {
                    self.tables.pooler_sleeps(false);
                }
                let n = match waited {
                    Ok(n) => n,
                    Err(e) => {
                        log::warn!("epoll_wait: {e}");
                        break;
                    }
                };
                timeout = EpollTimeout::ZERO;
                let mut woken = false;
                self.freed_in_batch.clear();
                // Before the events: a client's next message may come from a
                // backend's ring entry (its RELEASED) that must be read first.
                self.rings_look();
                for ev in &events[..n] {
                    match ev.data() as usize {
                        KEY_WAKE => woken = true,
                        // The postmaster died, or the agent (its socket
                        // closed: PR_SET_PDEATHSIG kills us anyway).
                        KEY_PM_DEATH => {
                            self.close_later_all();
                            crate::pg::proc_exit(1)
                        }
                        KEY_AGENT => super::agent::agent_gone(),
                        key => self.dispatch(key, ev.events()),
                    }
                }
                if woken {
                    // SIGTERM, SIGHUP, or SIGUSR1 (a backend's wake-up).
                    super::agent::drain_wake();
                    if super::agent::GOT_SIGTERM.load(Ordering::SeqCst) {
                        self.shutdown();
                    }
                    if super::agent::GOT_SIGHUP.swap(false, Ordering::SeqCst) {
                        self.reload();
                    }
                    // Or a password check that finished, a drain, or a
                    // kernel queue that turned busy.
                    self.password_checks_done();
                    self.check_drains();
                    self.kq_waited_wake();
                }
                if n < events.len() {
                    break;
                }
            }
            self.accept_resume();
            self.pool_conf_check();
            self.closing_check();
            self.ops_check();
            self.auth_delays_due();
            self.close_later_due();
            self.janitor();
        }
    }

    fn dispatch(&mut self, key: usize, ev: nix::sys::epoll::EpollFlags) {
        if self.freed_in_batch.contains(&key) {
            return; // for a connection closed since this batch was read
        }
        match self.conns.get(key) {
            Some(Conn::Listener(_)) => self.accept(key),
            Some(Conn::Client(_)) => self.client_event(key, ev),
            Some(Conn::Backend(_)) => self.backend_event(key, ev),
            Some(Conn::Dedicated(_)) => self.dedicated_event(key, ev),
            Some(Conn::Refusing(_)) => self.refusing_event(key),
            None => {}
        }
    }

    /// Removes connection `key` from the table (its socket is closed when
    /// the entry is dropped, after the caller took it out of the epoll set):
    /// the rest of the current event batch ignores that key.
    pub fn conn_take(&mut self, key: usize) -> Option<Conn> {
        let c = self.conns.try_remove(key);
        if c.is_some() {
            self.freed_in_batch.push(key);
        }
        c
    }

    /// SIGHUP, forwarded by the agent after it reloaded settings,
    /// pg_hba.conf and pg_ident.conf (`agent::reload`).
    fn reload(&mut self) {
        crate::pg::server::reload_config_file();
        // As the postmaster reloads its SSL context: new clients get the new
        // settings, a configuration that does not load keeps the old one.
        // The server's own check first: a certificate its OpenSSL refuses
        // (a SHA-1 signature at its security level) or a key file others
        // can read leaves the server on its previous context, and the
        // pooler too, so both ports serve the same certificate.
        match super::tls::load() {
            Ok(_) if crate::pg::server::ssl_enabled() && !super::agent::server_tls_config_loads() => {
                log::warn!("SSL configuration was not reloaded, keeping the previous one: the server's TLS library did not load it (its log says why)")
            }
            Ok(c) => self.tls = c,
            Err(e) => log::warn!("SSL configuration was not reloaded, keeping the previous one: {e}"),
        }
        // pg_db_role_setting is read again: what no commit of this server
        // announced (a standby's replayed ALTER ROLE / DATABASE ... SET) is
        // applied at a reload at the latest.
        self.conf_reread();
        // A lowered nextgres.pool_size applies at once (pools without their
        // own pool_size).
        self.pools_trim();
        // nextgres.pools shows the new pool_size and pool_mode at once (a
        // pool without transactions would show the old ones until its next
        // one), and a raised size logs in for waiting clients now.
        // A refused pool login may succeed now (pg_hba.conf fixed): no
        // pool waits out its back-off for it.
        let pools: Vec<usize> = self.pools.iter().map(|(k, _)| k).collect();
        for k in pools {
            if let Some(p) = self.pools.get_mut(k) {
                p.login_failures_clear();
            }
            self.pool_maybe_grow(k);
            self.sync_pool(k);
        }
    }

    /// SIGTERM (forwarded by the agent at server shutdown, or kill -TERM of
    /// the pooler process): stop accepting, tell every client not in a
    /// transaction (FATAL 57P01) and close it, then exit. Backends attached
    /// to a plaintext client finish on their own (they hold its socket); the
    /// postmaster stops them in a shutdown.
    ///
    /// Backends keeping an idle client (hold_idle_clients) are asked for it
    /// back within that second, and the client is told as an idle one.
    ///
    /// A TLS client's bytes pass through a relay thread of this process, so
    /// a TLS client still attached when the process exits loses its
    /// connection without close_notify. For up to 1 s the pooler therefore
    /// keeps taking clients back at their transaction boundary (a
    /// ReadyForQuery just sent: the hand-back may be in flight when SIGTERM
    /// arrives) and tells them as the idle ones; then it gives the relays of
    /// closed TLS clients up to 1 s to send the FATAL with close_notify.
    fn shutdown(&mut self) -> ! {
        // Nothing more is sent ahead; what was and is not claimed yet is
        // told as a waiting client.
        self.stopping = true;
        self.recall_all_ahead(None);
        // Clients in a kernel queue that no backend serves are told too;
        // the lent backends are recalled, and give back within the second
        // below the clients they serve or keep idle, told then.
        let recalled = self.kq_take_back_all(None);
        let listeners: Vec<usize> =
            self.conns.iter().filter_map(|(k, c)| matches!(c, Conn::Listener(_)).then_some(k)).collect();
        for k in listeners {
            if let Some(Conn::Listener(l)) = self.conn_take(k) {
                conn::remove(&self.epoll, &l);
            }
        }
        // Clients their backends keep idle while nobody waits (the handoff
        // path's hold_idle_clients) are asked back, to be told as the idle
        // ones: a TLS client's relay ends with this process. A plaintext
        // one not back in time hears it from its backend once this process
        // has gone (`backend::park::pooler_gone`).
        let attached: Vec<usize> = self
            .conns
            .iter()
            .filter_map(|(k, c)| matches!(c, Conn::Backend(b) if matches!(b.phase, super::backend::BPhase::Attached { .. })).then_some(k))
            .collect();
        let asked: Vec<usize> = attached.into_iter().filter(|&bk| self.backend_request_release(bk, false)).collect();
        let mut closed_relays = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            let told: Vec<usize> = self
                .conns
                .iter()
                .filter_map(|(k, c)| match c {
                    // Sent ahead and claimed: being served, as attached.
                    Conn::Client(c) if !c.with_backend() => Some(k),
                    _ => None,
                })
                .collect();
            for k in told {
                // A relay handing over a parking client finishes first (a
                // thread's few system calls): told over TLS as any idle one.
                self.client_park_wait(k, deadline);
                self.client_fatal_if_not_attached(k, "57P01", "terminating connection due to administrator command");
                // A relay holds a clone of its client's TlsInfo until its
                // thread ends: the wait below is on those relays only.
                if let Some(Conn::Client(c)) = self.conns.get(k) {
                    if let Some(t) = &c.tls {
                        closed_relays.push(t.info.clone());
                    }
                }
                self.client_close(k);
            }
            let tls_attached = self.conns.iter().any(|(_, c)| {
                matches!(c, Conn::Client(c) if c.tls.is_some() && c.with_backend())
            });
            let asked_back = asked.iter().any(|&bk| {
                matches!(self.conns.get(bk), Some(Conn::Backend(b)) if b.release_requested && matches!(b.phase, super::backend::BPhase::Attached { .. }))
            });
            let recalled_back = recalled.iter().any(|&bk| matches!(self.conns.get(bk), Some(Conn::Backend(b)) if b.lent));
            if (!tls_attached && !asked_back && !recalled_back) || std::time::Instant::now() >= deadline {
                break;
            }
            let n = match self.epoll.wait(&mut events, EpollTimeout::from(10u16)) {
                Ok(n) => n,
                Err(_) => 0,
            };
            let mut agent_gone = false;
            self.freed_in_batch.clear();
            for ev in &events[..n] {
                match ev.data() as usize {
                    KEY_PM_DEATH => crate::pg::proc_exit(1),
                    KEY_AGENT => agent_gone = true,
                    KEY_WAKE => super::agent::drain_wake(),
                    key => self.dispatch(key, ev.events()),
                }
            }
            if agent_gone {
                break;
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while closed_relays.iter().any(|i| std::sync::Arc::strong_count(i) > 1) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.close_later_all();
        self.tables.set_pooler(0, postmaster::listen::port());
        log::info!("pooler shutting down");
        // The agent starts a new one unless it is stopping itself.
        crate::pg::proc_exit(1)
    }
}

/// The server's own Unix socket: first of unix_socket_directories, same port.
fn server_socket_path() -> PathBuf {
    let dirs = crate::pg::server::unix_socket_directories().unwrap_or_else(|| "/tmp".to_string());
    let dir = dirs.split(',').map(str::trim).find(|d| !d.is_empty() && !d.starts_with('@')).unwrap_or("/tmp");
    PathBuf::from(dir).join(format!(".s.PGSQL.{}", crate::pg::server::port()))
}
