//! Operations requested through SQL (`nextgres.pause()`, `resume()`,
//! `reconnect()`, in `sql.rs`): they write shared memory (`shmem::OpSlot`)
//! and wake the pooler, which acts here and acknowledges (`ops_ack`).
//!
//! * pause: no transaction starts in the pool; clients that want a backend
//!   wait (queued, `query_wait_timeout` still applies). Running transactions
//!   finish: every backend serving a client is asked to give it back at its
//!   next transaction boundary and then parks. Session-mode (pinned) clients
//!   keep their backend.
//! * resume: parked backends serve the waiting clients again.
//! * reconnect: backends logged in before the request are replaced at their
//!   next transaction boundary (parked ones at once), see `backend_expired`.
//! * reset_stats: the pools' counters (transactions, queries, xact_time_ms,
//!   query_time_ms, bytes, waits) start at 0.
//! * kill_clients: every client of the pool is disconnected (57P01).
//! * kill_client: one client (by address and port) is disconnected (57P01).
use super::client::Phase;
use super::conn::Conn;
use super::worker::Pooler;
use std::sync::atomic::Ordering;
use std::time::Instant;

#[derive(Default)]
pub struct OpsState {
    seen_gen: u64,
    /// (database, role or "" for every role) paused.
    pauses: Vec<(String, String)>,
}

impl Pooler {
    /// Is the pool paused by nextgres.pause()?
    pub fn pool_paused(&self, pool: usize) -> bool {
        let Some(p) = self.pools.get(pool) else { return false };
        crate::shmem::pause_covers(&self.ops.pauses, &p.database, &p.role)
    }

    /// Each loop turn: act on new operations (one atomic load otherwise).
    pub fn ops_check(&mut self) {
        let gen = self.tables.header().ops_gen.load(Ordering::SeqCst);
        if gen == self.ops.seen_gen {
            return;
        }
        self.ops.seen_gen = gen;
        // Pause, kill, reconnect act on waiting clients: none stays sent
        // ahead (those their backend claimed are served, as attached ones).
        self.recall_all_ahead(None);
        // Nor in a kernel queue: each pool's clients and backends are the
        // pooler's again (lent again, queued again, where the pool is open).
        self.kq_take_back_all(None);
        let (pauses, once) = self.tables.ops_take();
        let keys: Vec<usize> = self.pools.iter().map(|(k, _)| k).collect();
        let was: Vec<bool> = keys.iter().map(|&k| self.pool_paused(k)).collect();
        self.ops.pauses = pauses;
        for (i, &k) in keys.iter().enumerate() {
            let now = self.pool_paused(k);
            let (db, role) = (self.pools[k].database.clone(), self.pools[k].role.clone());
            if now && !was[i] {
                log::info!("pool of role \"{role}\" for database \"{db}\" paused: running transactions finish, new ones wait");
                self.pool_release_all(k);
            } else if !now && was[i] {
                log::info!("pool of role \"{role}\" for database \"{db}\" resumed");
                let parked = std::mem::take(&mut self.pools[k].parked);
                for bk in parked {
                    self.backend_available(bk);
                }
                self.pool_resume_own(k);
                self.pool_maybe_grow(k);
                self.sync_pool(k);
            }
        }
        if once.iter().any(|o| o.0 == crate::shmem::OP_RESET_STATS) {
            // Bytes from before the reset must not show up after it.
            self.count_received_due();
        }
        for (kind, db, role, port) in once {
            if kind == crate::shmem::OP_KILL_CLIENT {
                self.kill_one_client(&db, port);
                continue;
            }
            let now = Instant::now();
            for &k in &keys {
                let p = &mut self.pools[k];
                if !(db.is_empty() || p.database == db) || !(role.is_empty() || p.role == role) {
                    continue;
                }
                if kind == crate::shmem::OP_KILL {
                    self.pool_kill(k);
                    continue;
                }
                if kind == crate::shmem::OP_RESET_STATS {
                    p.xacts = 0;
                    p.queries = 0;
                    p.xact_us = 0;
                    p.waits = 0;
                    p.wait_us = 0;
                    p.max_wait_us = 0;
                    p.query_us = 0;
                    p.bytes_sent = 0;
                    p.bytes_received = 0;
                    p.attaches_ahead = 0;
                    self.kq_reset_counters(k);
                    self.sync_pool(k);
                    continue;
                }
                p.reconnect_before = Some(now);
                log::info!(
                    "pool of role \"{}\" for database \"{}\": reconnect, its {} backends are replaced at their next transaction boundary",
                    p.role,
                    p.database,
                    p.backends
                );
                let parked = std::mem::take(&mut p.parked);
                for bk in parked {
                    // Not the last one of a pool with clients while a new
                    // pool login would fail (`keep`): it goes when that ends.
                    if self.backend_kept(bk) {
                        self.pools[k].parked.push(bk);
                        continue;
                    }
                    self.backend_close(bk);
                }
                self.pool_release_all(k);
                self.pool_maybe_grow(k);
                self.sync_pool(k);
            }
        }
        self.tables.header().ops_ack.store(gen, Ordering::SeqCst);
    }

    /// Resume: dedicated-mode logins that completed while the pool was
    /// paused (parked, in no queue) serve their waiting clients now.
    fn pool_resume_own(&mut self, pool: usize) {
        let own: Vec<usize> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c {
                Conn::Backend(b) if b.pool == pool && b.own && matches!(b.phase, super::backend::BPhase::Parked { .. }) => Some(k),
                _ => None,
            })
            .collect();
        for bk in own {
            self.backend_serve_own(bk);
        }
    }

    /// nextgres.kill_clients(): every client of the pool gets FATAL 57P01 and
    /// is disconnected: the pooler tells those it holds; a backend serving a
    /// client is terminated (SIGTERM, as pg_terminate_backend), which tells
    /// its client the same and ends its transaction; parked backends close.
    fn pool_kill(&mut self, pool: usize) {
        // An earlier operation of this batch may have sent clients ahead.
        self.recall_all_ahead(Some(pool));
        // Backends lent to its kernel queue serve clients the pooler cannot
        // take back: terminated, as attached ones below.
        for bk in self.kq_take_back_all(Some(pool)) {
            self.backend_terminate(bk);
        }
        let Some(p) = self.pools.get(pool) else { return };
        log::info!(
            "pool of role \"{}\" for database \"{}\": killing its {} clients and {} backends",
            p.role,
            p.database,
            p.clients,
            p.backends
        );
        let mut held: Vec<(bool, usize)> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c {
                Conn::Client(c) if c.pool == Some(pool) && !c.with_backend() => Some((c.pinned.is_some(), k)),
                _ => None,
            })
            .collect();
        // Clients with a pinned idle backend last: telling one frees its
        // backend, which must find no waiting client of the pool left.
        held.sort_unstable();
        let held: Vec<usize> = held.into_iter().map(|(_, k)| k).collect();
        for ck in held {
            self.client_fatal(ck, "57P01", "terminating connection due to administrator command", None);
        }
        for (_, c) in self.conns.iter_mut() {
            if let Conn::Client(c) = c {
                if c.pool == Some(pool) && c.with_backend() {
                    c.killed = true;
                }
            }
        }
        let parked = std::mem::take(&mut self.pools[pool].parked);
        for bk in parked {
            self.backend_close(bk);
        }
        // The backends still serving clients once the others were told (a
        // told client's pinned idle backend was freed and parked above).
        for bk in self.pools[pool].attached.clone() {
            self.backend_terminate(bk);
        }
        self.sync_pool(pool);
    }

    /// nextgres.kill_client(): the client at `addr`:`port` (as
    /// `nextgres.clients` shows it) gets FATAL 57P01 and is disconnected. If
    /// a backend serves it, that backend is terminated (SIGTERM, as
    /// pg_terminate_backend): it tells the client, rolls its transaction
    /// back, and the pooler closes the client when the backend is gone.
    fn kill_one_client(&mut self, addr: &str, port: i32) {
        let found = self.conns.iter().find_map(|(k, c)| match c {
            Conn::Client(c)
                if c.addr.port() as i32 == port
                    && c.addr.ip().to_string() == addr
                    && !matches!(c.phase, Phase::Closing { .. }) =>
            {
                Some((k, c.user.clone(), c.database.clone(), c.pool))
            }
            _ => None,
        });
        let Some((ck, role, db, pool)) = found else {
            log::info!("kill of client {addr} port {port}: no such client");
            return;
        };
        // Killed whichever way it is told: marked first, so a client that
        // its kernel-queue backend gives back between the checks below is
        // told when that backend's message is read (`kq_returned`).
        if let Some(c) = self.client(ck) {
            c.killed = true;
        }
        // Sent ahead and not claimed: waiting again, told by the pooler
        // below (its busy backend serves another client). Claimed: that
        // backend serves it.
        self.client_recall(ck);
        // Given back by a backend lent to a kernel queue, its message on
        // the way: told when that is read (`kq_returned`; a backend that
        // keeps the client is terminated then).
        if self.kq_returning(ck) {
            log::info!("killing client {addr} port {port} of role \"{role}\" for database \"{db}\": told when its backend gives it back");
            return;
        }
        // Served by a backend lent to a kernel queue: that backend is
        // terminated (it tells the client), as for an attached one.
        if let Some(brow) = self.kq_serving_row(ck) {
            let bk = self.conns.iter().find_map(|(k, c)| matches!(c, Conn::Backend(b) if b.row == brow).then_some(k));
            if let Some(pid) = bk.and_then(|bk| self.backend_terminate(bk)) {
                log::info!("killing client {addr} port {port} of role \"{role}\" for database \"{db}\": terminating its backend {pid}");
                return;
            }
        }
        let mut attached = self.client(ck).and_then(|c| c.backend());
        if let Some(bk) = attached {
            // Read what its backend already sent: a RELEASED in flight
            // means it may be serving the next client now, which its
            // SIGTERM must not hit.
            self.backend_event(bk, nix::sys::epoll::EpollFlags::empty());
            if self.client(ck).is_none() {
                return; // closed meanwhile (its backend died)
            }
            attached = self.client(ck).and_then(|c| c.backend());
        }
        // Reading that may have sent the backend its next client ahead.
        // Taken back here, it cannot be claimed while the SIGTERM is on its
        // way; already claimed, the backend is past this client's
        // transaction (it claims at its ReadyForQuery(I)) and serves that
        // one: no SIGTERM, this client is told when its RELEASED is read.
        // Still sent ahead after that read: its backend claimed it (serving
        // it soon) or refused it (EMFILE: it may be serving the next one in
        // its queue), RELEASED not read yet. A SIGTERM could hit another
        // client: it is told once settled (`client_requeue_ahead`), or when
        // its backend gives it back.
        let still_ahead = matches!(self.client(ck).map(|c| &c.phase), Some(Phase::Ahead { .. }));
        let moved_on = still_ahead
            || (matches!(self.client(ck).map(|c| &c.phase), Some(Phase::Attached { .. }))
                && attached.is_some_and(|bk| !self.backend_recall_ahead(bk).is_empty()));
        let pid = attached.filter(|_| !moved_on).and_then(|bk| match self.conns.get(bk) {
            Some(Conn::Backend(b)) if b.pid > 0 => Some(b.pid),
            _ => None,
        });
        if moved_on {
            if let Some(c) = self.client(ck) {
                c.killed = true;
            }
            log::info!("killing client {addr} port {port} of role \"{role}\" for database \"{db}\": told when its backend gives it back");
            if let Some(p) = pool {
                self.sync_pool(p);
            }
            return;
        }
        match pid {
            Some(pid) => {
                if let Some(c) = self.client(ck) {
                    c.killed = true;
                }
                if let Some(b) = attached.and_then(|bk| self.backend(bk)) {
                    b.terminating = true;
                }
                log::info!("killing client {addr} port {port} of role \"{role}\" for database \"{db}\": terminating its backend {pid}");
                super::backend::signal_backend(pid, nix::sys::signal::Signal::SIGTERM);
            }
            None => {
                log::info!("killing client {addr} port {port} of role \"{role}\" for database \"{db}\"");
                self.client_fatal(ck, "57P01", "terminating connection due to administrator command", None);
            }
        }
        if let Some(p) = pool {
            self.sync_pool(p);
        }
    }

    /// Asks every backend serving a client of the pool to give it back at
    /// its next transaction boundary (pinned ones decline).
    fn pool_release_all(&mut self, pool: usize) {
        let attached = self.pools.get(pool).map(|p| p.attached.clone()).unwrap_or_default();
        for bk in attached {
            self.backend_request_release(bk, true);
        }
    }
}
