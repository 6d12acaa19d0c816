//! Registration and the main loop of the pooler worker.
use super::conn::{self, Conn};
use nextgres_core::pool::Pool;
use crate::pg::glue::{self, PoolerWaitSet};
use crate::{postmaster, shmem};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollTimeout};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use slab::Slab;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

/// Postmaster: register the pooler. It restarts a second after it dies; its
/// listen sockets stay open in the postmaster meanwhile.
pub fn register() {
    // The pooler reads pg_ident.conf as the postmaster parsed it (glue.c,
    // ng_keep_parsed_ident_in_child); without the fork handler those lines
    // would be freed memory in the pooler. pthread_atfork fails on ENOMEM only.
    if !glue::install_ident_keeper() {
        pgrx::error!("nextgres: could not install its fork handler (pthread_atfork)");
    }
    BackgroundWorkerBuilder::new("nextgres pooler")
        .set_type("nextgres pooler")
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
    crate::pg::logger::init();
    let mut pooler = Pooler::new();
    pooler.run();
}

/// All pooler state. Modules add behaviour in their own `impl Pooler` blocks.
pub struct Pooler {
    pub epoll: Epoll,
    pub conns: Slab<Conn>,
    pub pools: Slab<Pool>,
    pub pool_by_name: HashMap<(String, String), usize>,
    /// Client-facing cancel pid -> client conn key.
    pub cancel_keys: HashMap<i32, usize>,
    pub next_client_id: u64,
    pub next_cancel_pid: i32,
    pub token_hex: String,
    pub server_socket: PathBuf,
    pub tables: shmem::Tables,
    pub rows: super::stats::Rows,
    pub clients: usize,
    pub mock_key: [u8; 32],
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
}

impl Pooler {
    fn new() -> Pooler {
        let tables = shmem::tables().expect("nextgres shared memory (shared_preload_libraries)");
        super::listener::raise_open_files_limit();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll_create");
        let mut conns = Slab::with_capacity(1024);
        for fd in postmaster::listen::listeners() {
            // dup: the postmaster's copy must outlive this process so the
            // backlog survives a pooler restart.
            let dup = nix::unistd::dup(fd).expect("dup listen socket");
            let owned = unsafe { OwnedFd::from_raw_fd(dup) };
            let entry = conns.vacant_entry();
            conn::add(&epoll, &owned, entry.key(), conn::READ);
            entry.insert(Conn::Listener(owned));
        }
        if let Err(e) = glue::load_hba() {
            log::warn!("could not load pg_hba.conf: {}", e.message());
        }
        let mut mock_key = [0u8; 32];
        let nonce = unsafe { pg_sys::GetMockAuthenticationNonce() };
        if !nonce.is_null() {
            let n = unsafe { std::slice::from_raw_parts(nonce.cast::<u8>(), 32) };
            mock_key.copy_from_slice(n);
        }
        let token_hex = crate::backend::token_hex(&tables.header().token);
        let rows = super::stats::Rows::new(&tables);
        let mut seed = [0u8; 4];
        crate::pg::shmem::strong_random(&mut seed);
        let p = Pooler {
            epoll,
            conns,
            pools: Slab::new(),
            pool_by_name: HashMap::new(),
            cancel_keys: HashMap::new(),
            next_client_id: 1,
            next_cancel_pid: (u32::from_ne_bytes(seed) % 1_000_000_000) as i32 + 1,
            token_hex,
            server_socket: server_socket_path(),
            tables,
            rows,
            clients: 0,
            mock_key,
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
        };
        p.rows.reset_all(&p.tables);
        p.tables.set_pooler(unsafe { pg_sys::MyProcPid }, postmaster::listen::port());
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

    fn run(&mut self) -> ! {
        let waitset = PoolerWaitSet::new(self.epoll.0.as_raw_fd());
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            let wake = waitset.wait(self.accept_pause.wait_ms(std::time::Instant::now(), super::janitor::TICK_MS));
            if wake.postmaster_death {
                crate::pg::proc_exit(1)
            }
            if wake.latch {
                glue::pooler_check_interrupts();
                if BackgroundWorker::sigterm_received() {
                    self.shutdown();
                }
                if BackgroundWorker::sighup_received() {
                    self.reload();
                }
                self.check_drains();
            }
            loop {
                let n = match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        log::warn!("epoll_wait: {e}");
                        break;
                    }
                };
                for ev in &events[..n] {
                    self.dispatch(ev.data() as usize, ev.events());
                }
                if n < events.len() {
                    break;
                }
            }
            self.accept_resume();
            self.pool_conf_check();
            self.closing_check();
            self.ops_check();
            self.janitor();
        }
    }

    fn dispatch(&mut self, key: usize, ev: nix::sys::epoll::EpollFlags) {
        match self.conns.get(key) {
            Some(Conn::Listener(_)) => self.accept(key),
            Some(Conn::Client(_)) => self.client_event(key, ev),
            Some(Conn::Backend(_)) => self.backend_event(key, ev),
            Some(Conn::Dedicated(_)) => self.dedicated_event(key, ev),
            None => {}
        }
    }

    fn reload(&mut self) {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        match glue::load_hba() {
            Ok(()) => log::info!("reloaded pg_hba.conf and settings"),
            Err(e) => log::warn!("pg_hba.conf not reloaded, keeping the previous rules: {}", e.message()),
        }
        // As the postmaster: pg_ident.conf after pg_hba.conf; one that does
        // not load keeps the previous lines (the server LOGs why).
        // Only where the fork handler kept hba.c's lines valid (else
        // load_ident() would free freed memory; map= is refused then).
        if !glue::ident_kept() {
            log::warn!("pg_ident.conf not reloaded: the postmaster's parsed lines were not kept in the pooler, map= on certificate lines is refused");
        } else if let Err(e) = glue::load_ident() {
            log::warn!("pg_ident.conf not reloaded, keeping the previous lines: {}", e.message());
        }
        // As the postmaster reloads its SSL context: new clients get the new
        // settings, a configuration that does not load keeps the old one.
        match super::tls::load() {
            Ok(c) => self.tls = c,
            Err(e) => log::warn!("SSL configuration was not reloaded, keeping the previous one: {e}"),
        }
        // A lowered nextgres.pool_size applies at once (pools without their
        // own pool_size).
        self.pools_trim();
    }

    /// SIGTERM (server shutdown or pg_terminate_backend on the pooler): tell
    /// clients not in a transaction, then exit. Backends attached to a client
    /// finish on their own; the postmaster stops them in a shutdown.
    fn shutdown(&mut self) -> ! {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.client_fatal_if_not_attached(
                k,
                "57P01",
                "terminating connection due to administrator command",
            );
        }
        // TLS clients: their FATAL is still to be encrypted by their relay
        // thread, which dies with this process. Close their ends and give
        // the relays a bounded moment (1 s) to send it with close_notify.
        // Relays of clients inside a transaction keep running until exit.
        // TLS clients not attached are closed now; their relays get up to
        // 1 s to send the FATAL. A relay holds a clone of its client's
        // TlsInfo until its thread ends, so the wait is on those relays
        // only (not on the attached clients' relays, which live on).
        let mut closed_relays = Vec::new();
        let tls_keys: Vec<usize> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c {
                Conn::Client(c) if !matches!(c.phase, super::client::Phase::Attached { .. }) => {
                    c.tls.as_ref().map(|info| {
                        closed_relays.push(info.clone());
                        k
                    })
                }
                _ => None,
            })
            .collect();
        for k in tls_keys {
            self.client_close(k);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while closed_relays.iter().any(|i| std::sync::Arc::strong_count(i) > 1) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.tables.set_pooler(0, postmaster::listen::port());
        log::info!("pooler shutting down");
        // Exit code 1: a pooler stopped by pg_terminate_backend is restarted.
        crate::pg::proc_exit(1)
    }
}

/// The server's own Unix socket: first of unix_socket_directories, same port.
fn server_socket_path() -> PathBuf {
    let dirs = unsafe { pg_sys::Unix_socket_directories };
    let dirs = if dirs.is_null() {
        "/tmp".to_string()
    } else {
        unsafe { std::ffi::CStr::from_ptr(dirs) }.to_string_lossy().into_owned()
    };
    let dir = dirs.split(',').map(str::trim).find(|d| !d.is_empty() && !d.starts_with('@')).unwrap_or("/tmp");
    PathBuf::from(dir).join(format!(".s.PGSQL.{}", unsafe { pg_sys::PostPortNumber }))
}
