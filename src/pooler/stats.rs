//! Keeping the shared tables (what `nextgres.pools()`, `clients()` and
//! `backends()` show) in step with the pooler's own state. Rows are allocated
//! from free lists owned by the pooler, the only writer.
use super::worker::Pooler;
use crate::shmem::{self, BackendState, ClientState, Tables};

pub struct Rows {
    free_pools: Vec<usize>,
    free_clients: Vec<usize>,
    /// First in, first out: a backend row is given out again as late as
    /// possible, so a backend the pooler gave up on while it still ran
    /// (its release ring closed, `backend_ring_close`) is long gone before
    /// another uses its row.
    free_backends: std::collections::VecDeque<usize>,
}

impl Rows {
    pub fn new(t: &Tables) -> Rows {
        let (p, c, b) = t.capacities();
        Rows {
            free_pools: (0..p).rev().collect(),
            free_clients: (0..c).rev().collect(),
            free_backends: (0..b).collect(),
        }
    }

    /// A restarted pooler starts from empty tables.
    pub fn reset_all(&self, t: &Tables) {
        t.write(|p, c, b| {
            p.iter_mut().for_each(|r| r.in_use = false);
            c.iter_mut().for_each(|r| r.in_use = false);
            b.iter_mut().for_each(|r| r.in_use = false);
        });
    }
}

impl Pooler {
    pub fn pool_row_alloc(&mut self, database: &str, role: &str) -> Option<usize> {
        let row = self.rows.free_pools.pop()?;
        self.tables.write(|p, _, _| {
            let r = &mut p[row];
            *r = unsafe { std::mem::zeroed() };
            r.in_use = true;
            shmem::set_name(&mut r.database, database);
            shmem::set_name(&mut r.role, role);
        });
        // Its kernel queue words too: a pooler before a restart may have
        // left its pool's there (`kq_pool_freed` clears only the counters).
        if let Some(k) = self.tables.kq_pool(row) {
            k.gone.clear();
            k.waited_at.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        Some(row)
    }

    /// Recomputes a pool's row from the pool's queues.
    pub fn sync_pool(&self, pool: usize) {
        let Some(p) = self.pools.get(pool) else { return };
        // Backends lent to the pool's kernel queue count as parked here;
        // `nextgres.pools` counts those serving a queued client as attached
        // (read live from the owner words).
        let lent = self.kq_lent_count(pool);
        let parked = p.parked.len() + lent;
        let attached = p.backends.saturating_sub(parked + p.starting + p.sessions_starting);
        // Clients waiting for the pool's first login wait for a backend too.
        let waiting = p.waiting.len() + p.ahead + p.session_waiting.len() + self.kq_waiting_count(pool) + p.login_pending.len();
        let (size, session) = (self.pool_size_of(pool) as i32, self.pool_session_mode(pool));
        let dedicated_mode = self.pool_mode_of(pool) == nextgres_core::poolconf::Mode::Dedicated;
        // What backends did for clients of its kernel queue.
        let [kx, kq, kqu, kb, kxu, kw] = self.kq_counters(pool).unwrap_or_default();
        // As `shmem::pool_outnumbered` reads the row (backends keeping an
        // idle client watch the queue only while it says so).
        let outnumbered = |r: &shmem::PoolRow| r.clients_idle + r.clients_active + r.clients_waiting > r.backends_attached + r.backends_parked;
        let mut came_to_outnumber = false;
        self.tables.write(|rows, _, _| {
            let r = &mut rows[p.row];
            let was = outnumbered(r);
            r.clients_waiting = waiting as i32;
            r.clients_active = attached as i32;
            r.clients_idle = p.clients.saturating_sub(waiting + attached) as i32;
            r.backends_parked = parked as i32;
            r.backends_attached = attached as i32;
            r.backends_starting = (p.starting + p.sessions_starting) as i32;
            // Pinned clients' and dedicated-mode clients' own backends.
            r.backends_dedicated = (p.dedicated + p.sessions).saturating_sub(p.sessions_starting) as i32;
            r.xacts = p.xacts.saturating_add(kx);
            r.queries = p.queries.saturating_add(kq);
            r.xact_us = p.xact_us.saturating_add(kxu);
            r.waits = p.waits.saturating_add(kw);
            r.waited_at = p.waited_at;
            r.wait_us = p.wait_us;
            r.max_wait_us = p.max_wait_us;
            r.query_us = p.query_us.saturating_add(kqu);
            r.bytes_sent = p.bytes_sent.saturating_add(kb);
            r.bytes_received = p.bytes_received;
            r.attaches_ahead = p.attaches_ahead;
            r.kq_xacts = kx;
            r.pool_size = size;
            r.role_oid = p.identity.0;
            r.session_mode = session;
            r.dedicated_mode = dedicated_mode;
            came_to_outnumber = !was && outnumbered(r);
        });
        if came_to_outnumber {
            self.kq_outnumbered_wake(pool);
        }
    }

    pub fn client_row_alloc(&mut self, addr: &str, port: i32) -> Option<usize> {
        let row = self.rows.free_clients.pop()?;
        let now = crate::pg::shmem::now();
        // Before the row reads as in use: no view adds the last client's.
        if let Some(k) = self.tables.kq_row(row) {
            k.xacts.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        self.tables.write(|_, c, _| {
            let r = &mut c[row];
            *r = unsafe { std::mem::zeroed() };
            r.in_use = true;
            shmem::set_name(&mut r.addr, addr);
            r.port = port;
            r.pool = -1;
            r.state = ClientState::Login;
            r.connected_at = now;
        });
        Some(row)
    }

    /// The pool table is full (`nextgres.max_pools`) and a new (database,
    /// role) needs a pool: a pool without clients, queues or logins under
    /// way, whose backends are all parked (a dropped database or role, a
    /// tenant gone), gives its row up: its parked backends close (a later
    /// client of it logs in again) and its counters go. The one with the
    /// fewest backends goes first. False when every pool is in use.
    pub fn pool_free_idle(&mut self) -> bool {
        let victim = self
            .pools
            .iter()
            .filter(|&(k, p)| {
                p.clients == 0
                    && !p.has_waiters()
                    && p.login_pending.is_empty()
                    && p.ahead == 0
                    && p.starting == 0
                    && p.sessions_starting == 0
                    && p.attached.is_empty()
                    && p.backends == p.parked.len() + self.kq_lent_count(k)
            })
            .min_by_key(|(_, p)| p.backends)
            .map(|(k, _)| k);
        let Some(k) = victim else { return false };
        // Draining: no login starts for it while its backends close (its
        // min_pool_size would log one in again from backend_gone, into a
        // slot the new pool is about to take).
        self.pools[k].draining = true;
        // Its queue goes with it: lent backends close at once (a new
        // pool in its row makes a new queue).
        self.kq_close_lent(k, true);
        self.pool_close_parked(k);
        let p = &self.pools[k];
        if p.backends > 0 || p.starting > 0 || p.sessions_starting > 0 || p.clients > 0 {
            log::warn!("pool for role \"{}\" and database \"{}\" kept: a backend or client is still counted after closing its parked backends", p.role, p.database);
            self.pools[k].draining = self.draining.contains(&self.pools[k].database);
            return false;
        }
        self.pool_forget_name(k);
        // No client or backend left: its kernel queue closes with it.
        self.kq_pool_freed(k);
        let p = self.pools.remove(k);
        log::info!("pool for role \"{}\" and database \"{}\" freed for a new pool (nextgres.max_pools is full)", p.role, p.database);
        self.tables.write(|rows, _, _| rows[p.row].in_use = false);
        self.rows.free_pools.push(p.row);
        true
    }

    /// New clients of pool `k`'s names no longer find it (a retired or
    /// freed pool; another pool may have those names already).
    pub fn pool_forget_name(&mut self, k: usize) {
        let Some(p) = self.pools.get(k) else { return };
        let name = (p.database.clone(), p.role.clone());
        if self.pool_by_name.get(&name) == Some(&k) {
            self.pool_by_name.remove(&name);
        }
    }

    /// Closes every parked backend of pool `k` (each leaves `parked` as it
    /// goes: `backend_gone`).
    pub fn pool_close_parked(&mut self, k: usize) {
        let parked = self.pools.get(k).map(|p| p.parked.clone()).unwrap_or_default();
        // Lent to its kernel queue: idle too (recalled first, closed at its
        // KQ_PARKED: the pool stays, and a lent backend may take a client
        // queued meanwhile).
        self.kq_close_lent(k, false);
        for bk in parked {
            self.backend_close(bk);
        }
    }

    pub fn client_row_free(&mut self, row: usize) {
        self.tables.write(|_, c, _| c[row].in_use = false);
        self.rows.free_clients.push(row);
    }

    pub fn client_row_update(&self, row: usize, f: impl FnOnce(&mut shmem::ClientRow)) {
        self.tables.write(|_, c, _| f(&mut c[row]));
    }

    pub fn backend_row_alloc(&mut self, pool_row: usize) -> Option<usize> {
        let row = self.rows.free_backends.pop_front()?;
        let now = crate::pg::shmem::now();
        // Before the row reads as in use: no view adds the last backend's.
        if let Some(h) = self.tables.kq_backend(row) {
            h.xacts.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        self.tables.write(|_, _, b| {
            let r = &mut b[row];
            *r = unsafe { std::mem::zeroed() };
            r.in_use = true;
            r.pool = pool_row as i32;
            r.state = BackendState::Starting;
            r.client_row = -1;
            r.since = now;
        });
        self.ring_reset(row);
        self.tables.attach_slots_clear(row);
        Some(row)
    }

    pub fn backend_row_free(&mut self, row: usize) {
        self.tables.write(|_, _, b| b[row].in_use = false);
        self.rows.free_backends.push_back(row);
    }

    pub fn backend_row_update(&self, row: usize, f: impl FnOnce(&mut shmem::BackendRow)) {
        self.tables.write(|_, _, b| f(&mut b[row]));
    }
}
