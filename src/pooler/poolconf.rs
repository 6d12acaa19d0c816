//! Per-pool settings: `ALTER DATABASE / ROLE ... SET nextgres.x` as stored in
//! `pg_db_role_setting`, resolved per pool with the server's precedence
//! (`nextgres_core::poolconf`).
//!
//! The pooler belongs to no database and cannot open that catalog (see
//! `poolconf.c`), so a short-lived background worker, the settings reader,
//! connects to a database that accepts connections ("postgres" first), copies
//! the `nextgres.*` items (and those of the settings a login reports, for
//! its ParameterStatus) into shared memory and exits. It runs when the
//! pooler starts and after each commit of ALTER ROLE / DATABASE ... SET |
//! RESET (or a role or database rename or drop): the committing backend bumps
//! a counter and wakes the pooler (`nextgres_pool_conf_changed`), and the
//! reader's exit wakes it again (bgw_notify_pid). A reload reads it again
//! too, and so does a standby every 10 s: its changes come by WAL replay,
//! which announces nothing. A COMMIT PREPARED notifies as a COMMIT does.
//!
//! A change applies to live pools at once: a lowered `pool_size` trims the
//! pool (parked backends close now, attached ones at their next transaction
//! boundary, see `limits`), and so does a lowered `max_db_connections` /
//! `max_user_connections` for the pools it bounds; a raised one lets waiting
//! clients' pool logins start; `pool_mode` applies to clients that enter the pool from then on;
//! the timeouts from the next janitor tick.
use super::worker::Pooler;
use crate::settings::{
    PoolMode, BACKEND_LIFETIME, IDLE_BACKEND_TIMEOUT, MIN_POOL_SIZE, POOL_MODE, POOL_SIZE, QUERY_WAIT_TIMEOUT, RESERVE_POOL_SIZE,
    RESERVE_POOL_TIMEOUT,
};
use nextgres_core::poolconf::{self, Cut, Entry, Mode, PoolConf};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A reader that has not reported within this long is given up on (and a
/// new one started): e.g. its database was dropped under it.
const READER_PATIENCE: Duration = Duration::from_secs(10);
/// The longest a login waits for the settings copy to catch up with a
/// committed change (`conf_hold`).
const HOLD_AT_MOST: Duration = Duration::from_secs(2);
/// Pause before another reader after one that failed.
const READER_RETRY: Duration = Duration::from_secs(1);
/// How often a pending reader's end is asked of the agent.
const READER_POLL: Duration = Duration::from_millis(10);
/// How often a standby reads pg_db_role_setting again (the primary's ALTER
/// ROLE / DATABASE ... SET reaches it by WAL replay, which announces
/// nothing).
const STANDBY_REREAD: Duration = Duration::from_secs(10);

/// The pooler's side of the settings reader.
#[derive(Default)]
pub struct ConfState {
    /// `nextgres.*` items of pg_db_role_setting as last read.
    pub entries: Vec<Entry>,
    /// Its items of settings a login reports (`poolconf::REPORTED`), for
    /// the ParameterStatus of logins (`handoff::login_params_now`).
    pub reported: Vec<Entry>,
    /// The copy held every item, or marked the levels it lacks items of
    /// (`reported_cut`). When not (not even the nextgres.* items and the
    /// marks fit), every login reports its pool's backend's values for the
    /// settings a role or database can set.
    pub reported_whole: bool,
    /// Levels (database, role) whose reported items the copy lacks: a login
    /// one applies to reports its pool's backend's values for them, as when
    /// the copy is not whole.
    pub reported_cut: Vec<Cut>,
    /// `Header::conf_changes` the last reader was started for.
    seen_changes: u64,
    /// `Header::conf_changes` the copy in use has read (its reader started
    /// after them).
    covered: u64,
    /// `Header::conf_gen` of `entries` (0: none read yet).
    applied_gen: u64,
    /// A read is due (pooler start, or a change since the last reader began).
    wanted: bool,
    /// The reader the agent started last: when, and `applied_gen` then.
    reader: Option<(Instant, u64)>,
    /// When the agent was last asked whether that reader still runs (a
    /// round trip: at most once per [`READER_POLL`], not once per loop turn).
    reader_polled: Option<Instant>,
    not_before: Option<Instant>,
    failing: bool,
    /// Logins waiting for a copy that has read the changes committed before
    /// they arrived (`conf_hold`): client key, client id, that change count,
    /// since when.
    held: Vec<(usize, u64, u64, Instant)>,
    /// When a re-read was last asked for without a change notice.
    last_reread: Option<Instant>,
}

impl ConfState {
    pub fn new() -> ConfState {
        ConfState { wanted: true, ..Default::default() }
    }
}

/// Backend, at commit of a statement that may change pool settings: count it
/// and wake the pooler. Called from C (poolconf.c); never panics.
#[unsafe(no_mangle)]
pub extern "C" fn nextgres_pool_conf_changed() {
    let Some(t) = crate::shmem::tables() else { return };
    t.header().conf_changes.fetch_add(1, Ordering::SeqCst);
    let pid = t.pooler_pid();
    if pid > 0 {
        // SIGUSR1 wakes the pooler process (`pooler::agent` on_signal).
        unsafe { libc::kill(pid, libc::SIGUSR1) };
    }
}

/// The settings reader: connects to the database given as its argument,
/// copies the nextgres.* items of pg_db_role_setting into shared memory, exits.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn nextgres_conf_reader_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    // Its warnings (a copy cut short) go to the server log.
    crate::pg::logger::init();
    let db = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(db), None);
    let data = BackgroundWorker::transaction(|| {
        Spi::connect(|client| {
            // This runs as the bootstrap superuser in a database whose
            // schemas other roles may create objects in: with "$user" and
            // public on the search path, a role's public.unnest(text[]) or
            // public.=(oid, integer) (an exact match, preferred to the
            // catalog's polymorphic or cast-needing one) would run here as
            // superuser, which any role could trigger with ALTER ROLE itself
            // SET. Only pg_catalog is searched (for this transaction), and
            // every function and operator is named with its schema.
            client.select("SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)", None, &[])?;
            // Items of dropped roles or databases (rows not yet cleaned up)
            // apply to nobody.
            let rows = client.select(
                "SELECT coalesce(d.datname::pg_catalog.text, ''), coalesce(r.rolname::pg_catalog.text, ''), c
                   FROM pg_catalog.pg_db_role_setting s
                   LEFT JOIN pg_catalog.pg_database d ON d.oid OPERATOR(pg_catalog.=) s.setdatabase
                   LEFT JOIN pg_catalog.pg_authid r ON r.oid OPERATOR(pg_catalog.=) s.setrole,
                        pg_catalog.unnest(s.setconfig) AS c
                  WHERE (pg_catalog.lower(c) OPERATOR(pg_catalog.~~) 'nextgres.%'
                         OR pg_catalog.lower(pg_catalog.split_part(c, '=', 1)) OPERATOR(pg_catalog.=) ANY ($1))
                    AND (s.setdatabase OPERATOR(pg_catalog.=) 0::pg_catalog.oid OR d.oid IS NOT NULL)
                    AND (s.setrole OPERATOR(pg_catalog.=) 0::pg_catalog.oid OR r.oid IS NOT NULL)
                  ORDER BY pg_catalog.lower(c) OPERATOR(pg_catalog.!~~) 'nextgres.%'",
                None,
                &[nextgres_core::poolconf::REPORTED.to_vec().into()],
            )?;
            let mut out = Vec::new();
            for row in rows {
                let f = |i| row.get::<String>(i).map(Option::unwrap_or_default);
                out.push((f(1)?, f(2)?, f(3)?));
            }
            Ok::<_, pgrx::spi::Error>(nextgres_core::poolconf::copy_bytes(&out, crate::shmem::CONF_LEN))
        })
    });
    match data {
        Ok(data) => {
            let Some(t) = crate::shmem::tables() else { return };
            if !t.conf_write(&data) {
                log::warn!("pg_db_role_setting has more nextgres.* items than fit ({} bytes); the rest are ignored, and logins report the values of their pool's backends", crate::shmem::CONF_LEN);
            }
            // Logins may be waiting for this copy (`conf_hold`).
            t.wake_pooler();
        }
        Err(e) => log::warn!("could not read pg_db_role_setting: {e}"),
    }
}

/// Splits the shared copy into the nextgres.* entries, the items of
/// settings a login reports (`poolconf::REPORTED`, whole), and the levels
/// whose reported items did not fit (`poolconf::copy_bytes`).
fn parse_conf(data: &[u8]) -> (Vec<Entry>, Vec<Entry>, Vec<Cut>) {
    let fields: Vec<String> = data.split(|&b| b == 0).map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    let (mut ours, mut reported, mut cut) = (Vec::new(), Vec::new(), Vec::new());
    for c in fields.chunks_exact(3) {
        let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
        let (d, r) = (opt(&c[0]), opt(&c[1]));
        if c[2].is_empty() {
            cut.push(Cut { database: d, role: r });
        } else if let Some(e) = Entry::from_item(d.as_deref(), r.as_deref(), &c[2]) {
            ours.push(e);
        } else if let Some(e) = Entry::reported_item(d.as_deref(), r.as_deref(), &c[2]) {
            reported.push(e);
        }
    }
    (ours, reported, cut)
}

impl Pooler {
    /// Backends the pool may have: its own `pool_size` or the global one,
    /// plus its `reserve_pool_size` while the reserve is engaged.
    pub fn pool_size_of(&self, pool: usize) -> usize {
        let Some(p) = self.pools.get(pool) else { return 1 };
        let size = p.conf.pool_size.unwrap_or_else(|| POOL_SIZE.get()).max(1) as usize;
        if p.reserve_engaged {
            size + p.conf.reserve_pool_size.unwrap_or_else(|| RESERVE_POOL_SIZE.get()).max(0) as usize
        } else {
            size
        }
    }

    /// Engages the pool's reserve when its longest-waiting client has waited
    /// more than reserve_pool_timeout (logged); disengages it once the queue
    /// has been empty that long (its surplus backends then close, `limits`).
    /// On each grow attempt, so at least once per janitor tick.
    pub fn pool_reserve_check(&mut self, pool: usize) {
        let Some(p) = self.pools.get(pool) else { return };
        let timeout = Duration::from_secs(p.conf.reserve_pool_timeout.unwrap_or_else(|| RESERVE_POOL_TIMEOUT.get()).max(0) as u64);
        if p.reserve_engaged {
            if p.waiting.is_empty() && p.ahead == 0 && p.reserve_idle_since.is_some_and(|t| t.elapsed() > timeout) {
                let p = &mut self.pools[pool];
                p.reserve_engaged = false;
                p.reserve_idle_since = None;
            }
            return;
        }
        if p.conf.reserve_pool_size.unwrap_or_else(|| RESERVE_POOL_SIZE.get()) <= 0 {
            return;
        }
        let queued = p.waiting.iter().find_map(|&ck| match self.conns.get(ck) {
            Some(super::conn::Conn::Client(c)) => match c.phase {
                super::client::Phase::Waiting { since } => Some(since),
                _ => None,
            },
            _ => None,
        });
        // Clients sent ahead wait too (they were the oldest when sent).
        let oldest = match (queued, self.pool_oldest_ahead(pool)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if oldest.is_some_and(|t| t.elapsed() > timeout) {
            let p = &mut self.pools[pool];
            p.reserve_engaged = true;
            log::info!(
                "pool of role \"{}\" for database \"{}\": a client waited more than reserve_pool_timeout ({}s), using the reserve pool",
                p.role,
                p.database,
                timeout.as_secs()
            );
        }
    }

    /// A backend of the pool is free: note when its queue became empty.
    pub fn pool_reserve_release(&mut self, pool: usize) {
        if let Some(p) = self.pools.get_mut(pool) {
            if !p.reserve_engaged || !p.waiting.is_empty() || p.ahead > 0 {
                p.reserve_idle_since = None;
            } else if p.reserve_idle_since.is_none() {
                p.reserve_idle_since = Some(std::time::Instant::now());
            }
        }
    }

    /// `pool_mode` of the pool: its own or the global one.
    pub fn pool_mode_of(&self, pool: usize) -> Mode {
        match self.pools.get(pool).and_then(|p| p.conf.pool_mode) {
            Some(m) => m,
            None => match POOL_MODE.get() {
                PoolMode::Transaction => Mode::Transaction,
                PoolMode::Session => Mode::Session,
                PoolMode::Dedicated => Mode::Dedicated,
            },
        }
    }

    /// Does a client entering this pool keep its backend for its session
    /// (session mode, or dedicated mode where the backend is its own)?
    pub fn pool_session_mode(&self, pool: usize) -> bool {
        self.pool_mode_of(pool) != Mode::Transaction
    }

    /// `query_wait_timeout` of the pool, seconds (0: forever).
    pub fn query_wait_timeout_of(&self, pool: Option<usize>) -> i32 {
        let own = pool.and_then(|p| self.pools.get(p)).and_then(|p| p.conf.query_wait_timeout);
        own.unwrap_or_else(|| QUERY_WAIT_TIMEOUT.get())
    }

    /// `idle_backend_timeout` of the pool, seconds (0: never).
    pub fn idle_backend_timeout_of(&self, pool: usize) -> i32 {
        let own = self.pools.get(pool).and_then(|p| p.conf.idle_backend_timeout);
        own.unwrap_or_else(|| IDLE_BACKEND_TIMEOUT.get())
    }

    /// `pool_priority` of the pool.
    pub fn pool_priority_of(&self, pool: usize) -> i32 {
        let own = self.pools.get(pool).and_then(|p| p.conf.pool_priority);
        own.unwrap_or_else(|| crate::settings::POOL_PRIORITY.get())
    }

    /// `max_pinned_backends` of the pool: None for no cap of its own.
    pub fn max_pinned_backends_of(&self, pool: usize) -> Option<usize> {
        let own = self.pools.get(pool).and_then(|p| p.conf.max_pinned_backends);
        let v = own.unwrap_or_else(|| crate::settings::MAX_PINNED_BACKENDS.get());
        (v >= 0).then_some(v as usize)
    }

    /// `min_pool_size` of the pool (never above its pool_size).
    pub fn min_pool_size_of(&self, pool: usize) -> usize {
        if self.pool_mode_of(pool) == Mode::Dedicated {
            // Nobody would use them: each client logs in its own backend.
            return 0;
        }
        let own = self.pools.get(pool).and_then(|p| p.conf.min_pool_size);
        (own.unwrap_or_else(|| MIN_POOL_SIZE.get()).max(0) as usize).min(self.pool_size_of(pool))
    }

    /// `backend_lifetime` of the pool (None: forever).
    pub fn backend_lifetime_of(&self, pool: usize) -> Option<Duration> {
        let own = self.pools.get(pool).and_then(|p| p.conf.backend_lifetime);
        let s = own.unwrap_or_else(|| BACKEND_LIFETIME.get());
        (s > 0).then(|| Duration::from_secs(s as u64))
    }

    /// A backend past its pool's backend_lifetime, or logged in before a
    /// `nextgres.reconnect()` of its pool?
    pub fn backend_expired(&self, key: usize) -> bool {
        match self.conns.get(key) {
            Some(super::conn::Conn::Backend(b)) => {
                self.backend_lifetime_of(b.pool).is_some_and(|l| b.born.elapsed() > l)
                    || self.pools.get(b.pool).and_then(|p| p.reconnect_before).is_some_and(|t| b.born <= t)
            }
            _ => false,
        }
    }

    /// A new pool: its settings as last read.
    pub fn pool_conf_init(&mut self, pool: usize) {
        if let Some(p) = self.pools.get_mut(pool) {
            p.conf = poolconf::resolve(&self.conf.entries, &p.database, &p.role);
        }
    }

    /// Each loop turn: start a settings reader when one is due, and apply
    /// what the last one read. Two atomic loads when nothing changed.
    pub fn pool_conf_check(&mut self) {
        let h = self.tables.header();
        let changes = h.conf_changes.load(Ordering::SeqCst);
        let gen = h.conf_gen.load(Ordering::SeqCst);
        if changes != self.conf.seen_changes {
            self.conf.wanted = true;
        }
        if gen != self.conf.applied_gen {
            self.pool_conf_apply();
        }
        if let Some((started, gen0)) = &self.conf.reader {
            // What it read is applied: done, whether or not its process has
            // exited yet. Otherwise ask the agent, not on every loop turn.
            let published = self.conf.applied_gen != *gen0;
            let due = self.conf.reader_polled.is_none_or(|t| t.elapsed() >= READER_POLL);
            let done = published
                || (due && {
                    self.conf.reader_polled = Some(Instant::now());
                    !super::agent::reader_running()
                });
            if done || started.elapsed() > READER_PATIENCE {
                let read = self.conf.applied_gen != *gen0;
                if read {
                    self.conf.covered = self.conf.covered.max(self.conf.seen_changes);
                }
                if !read {
                    // Failed (its log line says why): try again, not in a loop.
                    self.conf.wanted = true;
                    self.conf.not_before = Some(Instant::now() + READER_RETRY);
                }
                self.conf.reader = None;
            }
        }
        if self.conf.wanted && self.conf.reader.is_none() && self.conf.not_before.is_none_or(|t| Instant::now() >= t) {
            self.pool_conf_start_reader(changes);
        }
        if !self.conf.held.is_empty() {
            let (covered, failing) = (self.conf.covered, self.conf.failing);
            let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.conf.held)
                .into_iter()
                .partition(|&(_, _, target, since)| covered >= target || failing || since.elapsed() >= HOLD_AT_MOST);
            self.conf.held = wait;
            for (key, id, _, _) in due {
                if self.client(key).is_some_and(|c| c.id == id && matches!(c.phase, super::client::Phase::LoginPending { .. })) {
                    self.client_login_complete(key);
                }
            }
        }
    }

    /// A committed ALTER ROLE / DATABASE ... SET (or RESET, rename, drop)
    /// not yet in the copy: a login now would be told the values from before
    /// it, where a direct login made after the commit gets the new ones (a
    /// `standard_conforming_strings` told `on` while the session has `off`
    /// misleads a client's escaping). Such a login (its pool's values
    /// known) waits for a copy read after the changes counted so far, and
    /// no later ones: a role that commits ALTER ROLE itself SET in a loop
    /// delays each login by a reader's run or two (tens of milliseconds),
    /// not for as long as it goes on. At most [`HOLD_AT_MOST`], and not
    /// while readers fail to start. False (told now) when the copy is
    /// current: one atomic load.
    pub fn conf_hold(&mut self, key: usize) -> bool {
        let changes = self.tables.header().conf_changes.load(Ordering::SeqCst);
        if changes == self.conf.covered || self.conf.failing {
            return false;
        }
        let Some(id) = self.client(key).map(|c| c.id) else { return false };
        self.conf.held.push((key, id, changes, Instant::now()));
        true
    }

    /// Has pg_db_role_setting read again: at a reload, and every
    /// [`STANDBY_REREAD`] while the server is a standby, where changes come
    /// from WAL replay and no commit here announces them.
    pub fn conf_reread(&mut self) {
        self.conf.wanted = true;
        self.conf.last_reread = Some(Instant::now());
    }

    /// Janitor: a standby's periodic re-read (see [`Pooler::conf_reread`]).
    pub fn conf_standby_check(&mut self) {
        if self.conf.last_reread.is_some_and(|t| t.elapsed() < STANDBY_REREAD) || !crate::pg::server::recovery_in_progress() {
            return;
        }
        self.conf_reread();
    }

    /// The agent starts the reader (a dynamic background worker, which only
    /// a process with a PGPROC may register).
    fn pool_conf_start_reader(&mut self, changes: u64) {
        match super::agent::reader_start() {
            Ok(()) => {
                self.conf.seen_changes = changes;
                self.conf.wanted = false;
                self.conf.failing = false;
                self.conf.reader = Some((Instant::now(), self.conf.applied_gen));
            }
            Err(e) => self.pool_conf_reader_failed(&e),
        }
    }

    fn pool_conf_reader_failed(&mut self, why: &str) {
        if !self.conf.failing {
            log::warn!("could not start the reader of pg_db_role_setting: {why}; pools keep the settings read last");
        }
        self.conf.failing = true;
        self.conf.not_before = Some(Instant::now() + READER_RETRY);
    }

    /// Applies the shared copy to every pool whose settings changed.
    fn pool_conf_apply(&mut self) {
        let (gen, data, whole) = self.tables.conf_read();
        self.conf.applied_gen = gen;
        let (entries, reported, cut) = parse_conf(&data);
        self.conf.reported = reported;
        self.conf.reported_whole = whole;
        if cut != self.conf.reported_cut {
            for c in &cut {
                log::warn!(
                    "the items of settings a login reports that pg_db_role_setting holds for {} in {} do not all fit the pooler's copy ({} bytes); logins they apply to report the values of their pool's backends",
                    c.role.as_deref().map_or("every role".to_string(), |r| format!("role \"{r}\"")),
                    c.database.as_deref().map_or("every database".to_string(), |d| format!("database \"{d}\"")),
                    crate::shmem::CONF_LEN
                );
            }
        }
        self.conf.reported_cut = cut;
        if entries == self.conf.entries {
            return;
        }
        self.conf.entries = entries;
        let keys: Vec<usize> = self.pools.iter().map(|(k, _)| k).collect();
        for k in keys {
            let p = &mut self.pools[k];
            let new = poolconf::resolve(&self.conf.entries, &p.database, &p.role);
            if new == p.conf {
                continue;
            }
            log::info!(
                "pool of role \"{}\" for database \"{}\": settings from pg_db_role_setting now {}",
                p.role,
                p.database,
                describe(&new)
            );
            p.conf = new;
            self.pool_trim(k);
            self.pool_maybe_grow(k);
            self.sync_pool(k);
        }
        // max_db_connections / max_user_connections are no pool's own
        // settings (they bound several pools): lowered, their surplus goes.
        self.caps_trim();
    }
}

/// `pool_size=4, pool_mode=session` or `none (global settings)`.
fn describe(c: &PoolConf) -> String {
    let mut parts = Vec::new();
    if let Some(v) = c.pool_size {
        parts.push(format!("pool_size={v}"));
    }
    if let Some(v) = c.pool_mode {
        let mode = match v {
            Mode::Transaction => "transaction",
            Mode::Session => "session",
            Mode::Dedicated => "dedicated",
        };
        parts.push(format!("pool_mode={mode}"));
    }
    if let Some(v) = c.query_wait_timeout {
        parts.push(format!("query_wait_timeout={v}s"));
    }
    if let Some(v) = c.idle_backend_timeout {
        parts.push(format!("idle_backend_timeout={v}s"));
    }
    if let Some(v) = c.min_pool_size {
        parts.push(format!("min_pool_size={v}"));
    }
    if let Some(v) = c.backend_lifetime {
        parts.push(format!("backend_lifetime={v}s"));
    }
    if let Some(v) = c.reserve_pool_size {
        parts.push(format!("reserve_pool_size={v}"));
    }
    if let Some(v) = c.reserve_pool_timeout {
        parts.push(format!("reserve_pool_timeout={v}s"));
    }
    if let Some(v) = c.pool_priority {
        parts.push(format!("pool_priority={v}"));
    }
    if let Some(v) = c.max_pinned_backends {
        parts.push(format!("max_pinned_backends={v}"));
    }
    if parts.is_empty() {
        "none (global settings)".to_string()
    } else {
        parts.join(", ")
    }
}
