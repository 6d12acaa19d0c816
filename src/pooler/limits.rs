//! Limits on a pool's backends: connection slots and a lowered pool_size.
//!
//! * Slots: a pool login is a regular backend and needs a free connection
//!   slot beyond `superuser_reserved_connections` (+ `reserved_connections`
//!   from 16), as in the server's `InitPostgres()` (postinit.c). The pooler
//!   counts free slots before each pool login (`pg::slots`); a pool that
//!   already has a shared backend logs in another only while one more slot
//!   stays free, so a direct login of another role always finds the slot it
//!   would have had. Pinned clients' dedicated backends (outside
//!   `pool_size`, see `pool_dedicated_refresh`) are the pool's clients' own
//!   sessions: a pool with only those logs in as a pool with none does. When no slot is free (or the server still answers 53300) the
//!   pool waits `SLOT_BACKOFF` before it tries again and its clients share
//!   the backends it has; one WARNING per episode says so, with the
//!   arithmetic in its HINT.
//! * `nextgres.pool_size` lowered by a reload: surplus parked backends close
//!   at once, and attached ones give their client back at their next
//!   transaction boundary and then close instead of parking; the same for
//!   a lowered `max_db_connections` / `max_user_connections` (`caps_trim`).
use super::backend::BPhase;
use super::conn::Conn;
use super::worker::Pooler;
use nextgres_core::proto::ErrorFields;
use crate::settings::{MAX_DB_CONNECTIONS, MAX_USER_CONNECTIONS};
use std::time::{Duration, Instant};

/// Pause between pool logins of one pool after the server had no slot for
/// one: at most 2 attempts per second per pool.
pub const SLOT_BACKOFF: Duration = Duration::from_millis(500);

const SLOTS_HINT: &str = "Each pool uses up to nextgres.pool_size connection slots; all pools together plus direct connections \
must fit in max_connections - superuser_reserved_connections - reserved_connections (reserved_connections from PostgreSQL 16). \
A pool logs in another backend only while one more slot stays free for direct logins. Raise max_connections or lower nextgres.pool_size.";

/// Is this 53300 the server's "no free slot" (postinit.c), rather than a
/// role's or database's CONNECTION LIMIT (same SQLSTATE)?
pub fn is_slot_shortage(f: &ErrorFields) -> bool {
    f.sqlstate == "53300"
        && (f.message == "sorry, too many clients already" || f.message.starts_with("remaining connection slots are reserved"))
}

impl Pooler {
    /// May `pool` start a pool login now? False while it backs off, or when
    /// the server has no slot for it (which starts or continues an episode).
    pub fn pool_login_room(&mut self, pool: usize) -> bool {
        let Some(p) = self.pools.get(pool) else { return false };
        let now = Instant::now();
        if p.login_backoff_until.is_some_and(|t| now < t) || !p.login_retry_due(now) {
            return false;
        }
        if !self.pool_caps_room(pool) {
            return false;
        }
        let Some(p) = self.pools.get(pool) else { return false };
        // A pool with no backend (or only pinned clients' dedicated ones)
        // has nothing to share: its login goes to the server, which decides
        // exactly as for a direct login (a superuser may take a reserved
        // slot; the count below may also include logins in flight that
        // already hold theirs, so it must not refuse here).
        if p.shared_backends() == 0 {
            return true;
        }
        // Pool logins already under way have not taken their slot yet.
        let pending: usize = self.pools.iter().map(|(_, p)| p.starting + p.sessions_starting).sum();
        // A pool with a backend leaves one slot for direct logins of others.
        if super::agent::unreserved_free(pending + 2) {
            return true;
        }
        self.pool_out_of_slots(pool, None);
        false
    }

    /// May a dedicated-mode client's own login start now? As a direct
    /// login: only max_db_connections / max_user_connections (the pooler's
    /// caps, which count it) may make it wait; the server itself answers
    /// max_connections, reserved slots and CONNECTION LIMIT, and that answer
    /// is what the client gets (no slot is left free for others, no
    /// back-off after another login's refusal). A pool switched to
    /// dedicated first closes its parked shared backends that served
    /// clients before (`pool_close_stale_shared`).
    pub fn pool_own_login_room(&mut self, pool: usize) -> bool {
        self.pool_close_stale_shared(pool);
        self.pool_caps_room(pool)
    }

    /// A pool in `pool_mode = dedicated`: closes its parked shared backends
    /// that served a client (left from before the switch; nobody takes
    /// them, except transaction-mode clients that joined before the switch,
    /// which log in another when they need one). A fresh one, never
    /// attached, stays for `pool_take_fresh_parked`.
    pub fn pool_close_stale_shared(&mut self, pool: usize) {
        if self.pool_mode_of(pool) != nextgres_core::poolconf::Mode::Dedicated {
            return;
        }
        // One at a time: closing one may start logins (new keys).
        loop {
            let Some(p) = self.pools.get(pool) else { return };
            let stale = p.parked.iter().copied().find(|&k| matches!(self.conns.get(k), Some(Conn::Backend(b)) if b.last_client != 0 && !b.own));
            let Some(bk) = stale else { return };
            self.backend_close(bk);
        }
    }

    /// The pool got no connection slot: counted free slots said so (`server`
    /// None) or the server refused the login with 53300 (`server`: its error).
    pub fn pool_out_of_slots(&mut self, pool: usize, server: Option<ErrorFields>) {
        let size = self.pool_size_of(pool);
        let Some(p) = self.pools.get_mut(pool) else { return };
        p.login_backoff_until = Some(Instant::now() + SLOT_BACKOFF);
        if !p.slots_episode {
            p.slots_episode = true;
            let (su, res) = crate::pg::slots::reserved();
            let max = crate::pg::slots::max_connections();
            let cause = match &server {
                Some(f) => format!("the server refused a pool login: {}", f.message),
                None => "no connection slot is free for another pool login".to_string(),
            };
            let msg = format!(
                "nextgres: the pool of role \"{}\" for database \"{}\" has {} of its pool_size = {size} backends and gets no more for now: {cause} \
(max_connections = {max}, superuser_reserved_connections = {su}, reserved_connections = {res}); its clients share the backends it has, and it tries again at most twice a second",
                p.role, p.database, p.shared_backends()
            );
            pgrx::pg_sys::panic::ErrorReport::new(pgrx::PgSqlErrorCode::ERRCODE_TOO_MANY_CONNECTIONS, msg, "nextgres")
                .set_hint(SLOTS_HINT)
                .report(pgrx::PgLogLevel::WARNING);
        }
        if p.shared_backends() == 0 {
            // Nothing to share (dedicated backends serve only their pinned
            // clients): its clients get what a direct login gets.
            let f = server.unwrap_or_else(|| ErrorFields {
                severity: "FATAL".into(),
                sqlstate: "53300".into(),
                message: "sorry, too many clients already".into(),
                detail: None,
                hint: None,
            });
            self.pool_fail_clients(pool, f);
        }
    }

    /// The pool's demand is met (or gone): the next shortage is a new episode.
    pub fn pool_slots_episode_end(&mut self, pool: usize) {
        if let Some(p) = self.pools.get_mut(pool) {
            p.slots_episode = false;
        }
    }

    /// More shared backends than `nextgres.pool_size` (lowered by a reload,
    /// or a dedicated backend whose client unpinned)?
    pub fn pool_surplus(&self, pool: usize) -> usize {
        let size = self.pool_size_of(pool);
        // Lent backends closing (recalled first) are surplus already gone.
        self.pools.get(pool).map_or(0, |p| p.shared_backends().saturating_sub(self.kq_closing_count(pool)).saturating_sub(size))
    }

    /// Recounts the pool's dedicated backends: attached ones whose client
    /// pinned its session (the pin the backend last wrote to its shared row:
    /// LISTEN, session advisory lock, temp table, WITH HOLD cursor; not a
    /// sequence value or a statement not bound yet, which keep a client only
    /// for its next transaction), up to
    /// `max_pinned_backends`, those already dedicated first. Session-mode
    /// reservations are not dedicated: there pool_size bounds sessions.
    /// Beyond the cap a pinned backend stays one of the pool's pool_size
    /// (the client keeps it, as it keeps any pinned backend).
    pub fn pool_dedicated_refresh(&mut self, pool: usize) {
        use crate::pg::session::Pin;
        let Some(p) = self.pools.get(pool) else { return };
        // Dedicated-mode clients' own backends come first under the cap.
        let cap = self.max_pinned_backends_of(pool).unwrap_or(usize::MAX).saturating_sub(p.sessions);
        let attached = p.attached.clone();
        let mut pinned: Vec<(bool, usize)> = Vec::new();
        for &bk in &attached {
            let Some(Conn::Backend(b)) = self.conns.get(bk) else { continue };
            let pin = self.tables.backend_pin(b.row);
            // A dedicated-mode client's own backend is counted in
            // `sessions` already (also once its client left, unpinned).
            if b.pinned_to.is_none() && !b.own && pin != Pin::None as u8 && !Pin::is_short(pin) {
                pinned.push((!b.dedicated, bk));
            }
        }
        let all_pinned = pinned.len();
        pinned.sort_unstable();
        pinned.truncate(cap);
        let want: std::collections::HashSet<usize> = pinned.iter().map(|&(_, k)| k).collect();
        for bk in attached {
            let want = want.contains(&bk);
            let Some(Conn::Backend(b)) = self.conns.get_mut(bk) else { continue };
            if b.dedicated != want {
                b.dedicated = want;
                // A dedicated backend is outside pool_size: a release the
                // pool asked of it (to trim, or for a waiting client) no
                // longer counts, since a pinned backend keeps its client.
                let dropped_request = want && std::mem::take(&mut b.release_requested);
                let row = b.row;
                if dropped_request {
                    let p = &mut self.pools[pool];
                    p.release_requested = p.release_requested.saturating_sub(1);
                }
                self.backend_row_update(row, |r| r.dedicated = want);
            }
        }
        let p = &mut self.pools[pool];
        let changed = p.dedicated != want.len() || p.pinned != all_pinned;
        p.dedicated = want.len();
        p.pinned = all_pinned;
        if changed {
            self.sync_pool(pool);
        }
    }

    /// Must a backend of `pool` that released its client, or is gone, make
    /// the pool recount its dedicated backends? When it was dedicated, or
    /// when pinned backends beyond `max_pinned_backends` may take its place.
    pub fn pool_dedicated_stale(&self, pool: usize, was_dedicated: bool) -> bool {
        was_dedicated || self.pools.get(pool).is_some_and(|p| p.pinned > p.dedicated)
    }

    /// A backend told the pooler (control `PINNED`) that its client pinned
    /// or unpinned its session: recount, then log in another backend for
    /// waiting clients, or bring the pool back to pool_size.
    pub fn pool_pins_changed(&mut self, pool: usize) {
        self.pool_dedicated_refresh(pool);
        self.pool_maybe_grow(pool);
        self.pool_trim(pool);
        self.sync_pool(pool);
    }

    /// Brings a pool down to `nextgres.pool_size`: closes surplus parked
    /// backends now and asks as many attached ones as are still surplus to
    /// give their client back at their next transaction boundary (they then
    /// close in `backend_available`). Pinned backends (session mode, temp
    /// tables, ...) leave when their client does.
    pub fn pool_trim(&mut self, pool: usize) {
        self.pool_close_stale_shared(pool);
        self.pool_dedicated_refresh(pool);
        while self.pool_surplus(pool) > 0 {
            let Some(bk) = self.pools.get_mut(pool).and_then(|p| p.parked.pop()) else { break };
            self.backend_close(bk);
        }
        let surplus = self.pool_surplus(pool);
        let mut surplus = self.kq_trim(pool, surplus);
        let Some(p) = self.pools.get(pool) else { return };
        surplus = surplus.saturating_sub(p.release_requested);
        for bk in p.attached.clone() {
            if surplus == 0 {
                break;
            }
            if self.backend_request_release(bk, true) {
                surplus -= 1;
            }
        }
    }

    /// Every pool, after a reload, after pg_db_role_setting changed, and
    /// once per janitor tick; then the shared limits (`caps_trim`).
    pub fn pools_trim(&mut self) {
        let pools: Vec<usize> = self.pools.iter().filter(|(_, p)| p.backends > 0).map(|(k, _)| k).collect();
        for p in pools {
            self.pool_trim(p);
        }
        self.caps_trim();
    }

    /// A backend about to park: close it instead if its pool is over size,
    /// or its database or role over a lowered shared limit.
    /// Returns true when it was closed.
    pub fn backend_close_if_surplus(&mut self, key: usize) -> bool {
        let pool = match self.conns.get(key) {
            Some(Conn::Backend(b)) if matches!(b.phase, BPhase::Parked { .. }) => b.pool,
            _ => return false,
        };
        if self.pool_surplus(pool) == 0 && !self.pool_over_caps(pool) {
            return false;
        }
        self.backend_close(key);
        true
    }
}

/// A lowered `max_db_connections` / `max_user_connections`.
///
/// The limits bound the backends the pooler keeps, as `pool_size` does per
/// pool: lowered by `ALTER DATABASE | ROLE ... SET` or a reload (or set
/// after pools logged in: the settings reader runs a moment after the
/// commit), the surplus goes as a lowered pool_size's does. Parked backends
/// close at once, those of pools without clients first, then of the pool
/// with the most; as many lent to a kernel queue (recalled, closed at their
/// return) and attached ones as are still surplus (those that keep an idle
/// client included: `hold_idle_clients`) are asked to give
/// their client back, and any that reaches a transaction boundary while
/// its database or role is over the limit closes instead of parking. Only
/// live backends count here: one already closed still counts against new
/// logins until its process is gone (`backends_where`), but closing another
/// for it would overshoot.
impl Pooler {
    /// Live backends of all pools matching `same` (closing ones not).
    fn live_backends_where(&self, same: impl Fn(&str, &str) -> bool) -> usize {
        // Lent backends being closed (recalled first) count as closing.
        self.pools
            .iter()
            .filter(|(_, p)| same(&p.database, &p.role))
            .map(|(k, p)| p.backends.saturating_sub(self.kq_closing_count(k)))
            .sum()
    }

    /// Are `pool`'s database or role over their limit (live backends)?
    fn pool_over_caps(&self, pool: usize) -> bool {
        let Some(p) = self.pools.get(pool) else { return false };
        let (db, role) = (&p.database, &p.role);
        let max_db = self.max_db_connections_of(db);
        let max_user = self.max_user_connections_of(role);
        (max_db > 0 && self.live_backends_where(|d, _| d == db) > max_db)
            || (max_user > 0 && self.live_backends_where(|_, r| r == role) > max_user)
    }

    /// Brings every database and role down to its limit.
    pub fn caps_trim(&mut self) {
        // Nothing to do (every janitor tick) without any limit.
        let limits = |n: &str| n == "max_db_connections" || n == "max_user_connections";
        if MAX_DB_CONNECTIONS.get() <= 0 && MAX_USER_CONNECTIONS.get() <= 0 && !self.conf.entries.iter().any(|e| limits(&e.name)) {
            return;
        }
        let names = |of: fn(&nextgres_core::pool::Pool) -> &String| -> Vec<String> {
            let mut v: Vec<String> = self.pools.iter().map(|(_, p)| of(p).clone()).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let (dbs, roles) = (names(|p| &p.database), names(|p| &p.role));
        for db in dbs {
            let max = self.max_db_connections_of(&db);
            if max > 0 {
                self.caps_shed(max, |d, _| d == db);
            }
        }
        for role in roles {
            let max = self.max_user_connections_of(&role);
            if max > 0 {
                self.caps_shed(max, |_, r| r == role);
            }
        }
    }

    /// Closes parked backends of the pools matching `same` until they have
    /// at most `max` live ones, then recalls lent ones and asks attached
    /// ones for the rest. A
    /// backend reserved for a session-mode client between its transactions
    /// never closes (that session would end), nor does a pinned one give
    /// its client back (`backend_request_release`).
    fn caps_shed(&mut self, max: usize, same: impl Fn(&str, &str) -> bool) {
        while self.live_backends_where(&same) > max {
            let victim = self
                .pools
                .iter()
                .filter(|(_, p)| same(&p.database, &p.role))
                .filter_map(|(k, p)| Some(((p.clients == 0, p.shared_backends()), k, self.free_parked(k, p)?)))
                .max_by_key(|&(order, _, _)| order);
            let Some((_, pool, bk)) = victim else { break };
            self.backend_close(bk);
            self.sync_pool(pool);
        }
        let asked: usize = self.pools.iter().filter(|(_, p)| same(&p.database, &p.role)).map(|(_, p)| p.release_requested).sum();
        let mut surplus = self.live_backends_where(&same).saturating_sub(max).saturating_sub(asked);
        if surplus == 0 {
            return;
        }
        let mut pools: Vec<(usize, usize)> =
            self.pools.iter().filter(|(_, p)| same(&p.database, &p.role)).map(|(k, p)| (p.shared_backends(), k)).collect();
        pools.sort_unstable_by(|a, b| b.cmp(a));
        // Backends lent to a kernel queue and serving (or keeping) its
        // clients are recalled and close at their return, as for a lowered
        // pool_size (`pool_trim`); without this a busy queue kept them over
        // the limit for as long as it had clients (hunt11c 2).
        for &(_, pool) in &pools {
            surplus = self.kq_trim(pool, surplus);
        }
        for (_, pool) in pools {
            for bk in self.pools[pool].attached.clone() {
                if surplus == 0 {
                    return;
                }
                if self.backend_request_release(bk, true) {
                    surplus -= 1;
                }
            }
        }
    }
}

/// A backend the pooler closed, counted against the limits until its process
/// is gone (its pg_stat_activity entry goes at exit, a moment after the
/// pooler closed its control socket).
pub struct Closing {
    pid: i32,
    database: String,
    role: String,
    since: Instant,
}

/// A closed backend whose process still exists after this long no longer
/// counts (it is not the pooler's any more).
const CLOSING_PATIENCE: Duration = Duration::from_secs(5);

impl Pooler {
    /// `max_db_connections` of a database (0: none): its own from ALTER
    /// DATABASE ... SET, else the global.
    pub fn max_db_connections_of(&self, database: &str) -> usize {
        nextgres_core::poolconf::resolve_database_limit(&self.conf.entries, "max_db_connections", database)
            .unwrap_or_else(|| MAX_DB_CONNECTIONS.get())
            .max(0) as usize
    }

    /// `max_user_connections` of a role (0: none).
    pub fn max_user_connections_of(&self, role: &str) -> usize {
        nextgres_core::poolconf::resolve_role_limit(&self.conf.entries, "max_user_connections", role)
            .unwrap_or_else(|| MAX_USER_CONNECTIONS.get())
            .max(0) as usize
    }

    /// Backends of all pools matching `same` (closing ones included).
    fn backends_where(&self, same: impl Fn(&str, &str) -> bool) -> usize {
        // Every backend of the pools (lent ones closing included: they hold
        // their slot until they answer), then those closed but not gone.
        let pooled: usize = self.pools.iter().filter(|(_, p)| same(&p.database, &p.role)).map(|(_, p)| p.backends).sum();
        pooled + self.closing.iter().filter(|c| same(&c.database, &c.role)).count()
    }

    /// A parked backend of pool `p` that may close: not one reserved for a
    /// session-mode client between its transactions (that client's session
    /// would end with it).
    fn free_parked(&self, k: usize, p: &nextgres_core::pool::Pool) -> Option<usize> {
        p.parked
            .iter()
            .copied()
            .find(|&bk| matches!(self.conns.get(bk), Some(Conn::Backend(b)) if b.pinned_to.is_none()))
            // Lent to the pool's kernel queue and waiting there with no
            // client: as idle (closed once recalled).
            .or_else(|| self.kq_idle_lent(k))
    }

    /// Room under max_db_connections and max_user_connections for one more
    /// backend of `pool`? When not, and clients of the pool wait, an unused
    /// (parked) backend of another pool that shares the limit, and that this
    /// pool deserves (`pool_deserves`), is closed so the next try finds room
    /// (as PgBouncer evicts an idle server connection); the pool retries
    /// when that backend's process is gone.
    fn pool_caps_room(&mut self, pool: usize) -> bool {
        let Some(p) = self.pools.get(pool) else { return false };
        // Clients seen waiting in its kernel queue count (`kq_watch_waiting`).
        let (db, role, waiting) = (p.database.clone(), p.role.clone(), p.has_waiters() || self.kq_waiting_count(pool) > 0);
        let max_db = self.max_db_connections_of(&db);
        if max_db > 0 && self.backends_where(|d, _| d == db) >= max_db {
            if waiting {
                self.evict_parked(pool, |d, _| d == db);
            }
            return false;
        }
        let max_user = self.max_user_connections_of(&role);
        if max_user > 0 && self.backends_where(|_, r| r == role) >= max_user {
            if waiting {
                self.evict_parked(pool, |_, r| r == role);
            }
            return false;
        }
        true
    }

    /// Does waiting pool `q` deserve a backend of pool `holder`, both under
    /// one full limit? A higher `pool_priority` does while the holder keeps
    /// one backend; the same priority does with at least two backends fewer
    /// (fair shares); a lower one only while it has none.
    fn pool_deserves(&self, q: usize, holder: usize) -> bool {
        let (Some(qp), Some(hp)) = (self.pools.get(q), self.pools.get(holder)) else { return false };
        let (qprio, hprio) = (self.pool_priority_of(q), self.pool_priority_of(holder));
        let (qn, hn) = (self.pool_held(q, qp), self.pool_held(holder, hp));
        if qprio > hprio {
            hn > 1
        } else if qprio == hprio {
            qn + 1 < hn
        } else {
            qn == 0 && hn > 1
        }
    }

    /// Backends a pool holds for fairness under a shared limit: its shared
    /// ones, or for a dedicated-mode pool (whose clients' own backends are
    /// all it has) every backend.
    fn pool_held(&self, k: usize, p: &nextgres_core::pool::Pool) -> usize {
        // Lent backends closing for another pool are no longer held.
        let closing = self.kq_closing_count(k);
        if self.pool_mode_of(k) == nextgres_core::poolconf::Mode::Dedicated {
            p.backends.saturating_sub(closing)
        } else {
            p.shared_backends().saturating_sub(closing)
        }
    }

    /// Closes the longest-parked backend of the other pool, among those
    /// matching `same` that have no client at all or that `pool` deserves a
    /// backend of, that has the most backends. Where no such pool has a
    /// parked one, a backend of a deserving pool that keeps an idle client
    /// (`hold_idle_clients`) is asked to give it back: its own pool has
    /// nobody waiting, so it would keep it, and at the release
    /// `backend_yield_to_starved` closes it for `pool`.
    fn evict_parked(&mut self, pool: usize, same: impl Fn(&str, &str) -> bool) {
        // A lent backend closing under this limit frees a slot at its next
        // boundary: closing more meanwhile would overshoot.
        if self.pools.iter().any(|(k, p)| same(&p.database, &p.role) && self.kq_closing_count(k) > 0) {
            return;
        }
        let victim = self
            .pools
            .iter()
            .filter(|&(k, p)| {
                k != pool
                    && same(&p.database, &p.role)
                    && (!p.parked.is_empty() || self.kq_any_lent(k).is_some())
                    && (p.clients == 0 || self.pool_deserves(pool, k))
            })
            .max_by_key(|(_, p)| p.shared_backends())
            .map(|(k, _)| k);
        let Some(v) = victim else { return self.ask_holder_release(pool, same) };
        if let Some(bk) = self.free_parked(v, &self.pools[v]).or_else(|| self.kq_any_lent(v)) {
            // It leaves `parked` as it goes (`backend_gone`).
            self.backend_close(bk);
            self.sync_pool(v);
        }
    }

    /// Asks one backend keeping an idle client, of the pool matching `same`
    /// that `pool` deserves a backend of and that has the most, to give its
    /// client back; nothing while such a request is still open there (the
    /// janitor's tick asks again, e.g. once a busy backend lingers).
    fn ask_holder_release(&mut self, pool: usize, same: impl Fn(&str, &str) -> bool) {
        let holder = self
            .pools
            .iter()
            .filter(|(k, p)| *k != pool && same(&p.database, &p.role) && !p.attached.is_empty() && self.pool_deserves(pool, *k))
            .max_by_key(|(_, p)| p.shared_backends())
            .map(|(k, _)| k);
        let Some(h) = holder else { return };
        if self.pools[h].release_requested > 0 {
            return;
        }
        for bk in self.pools[h].attached.clone() {
            if self.backend_request_release(bk, false) {
                return;
            }
        }
    }

    /// A backend of `pool` is free at a transaction boundary: while another
    /// pool sharing a full max_db/user_connections limit has waiting clients
    /// and deserves it (a higher `pool_priority`, while this pool keeps one
    /// backend; the same priority and at least two backends fewer; a lower
    /// priority and no backend at all), close this one so that pool gets the
    /// room.
    /// Returns true when it was closed.
    pub fn backend_yield_to_starved(&mut self, key: usize) -> bool {
        let Some(Conn::Backend(b)) = self.conns.get(key) else { return false };
        let pool = b.pool;
        let Some(p) = self.pools.get(pool) else { return false };
        let (db, role) = (p.database.clone(), p.role.clone());
        let max_db = self.max_db_connections_of(&db);
        let max_user = self.max_user_connections_of(&role);
        let full_db = max_db > 0 && self.backends_where(|d, _| d == db) >= max_db;
        let full_user = max_user > 0 && self.backends_where(|_, r| r == role) >= max_user;
        if !full_db && !full_user {
            return false;
        }
        let starved = self.pools.iter().any(|(k, q)| {
            k != pool
                && q.has_waiters()
                && self.pool_deserves(k, pool)
                && ((full_db && q.database == db) || (full_user && q.role == role))
        });
        if starved {
            self.backend_close(key);
        }
        starved
    }

    /// Before the pooler closes a backend: count it until its process is gone.
    pub fn closing_note(&mut self, key: usize) {
        let Some(Conn::Backend(b)) = self.conns.get(key) else { return };
        if b.pid <= 0 {
            return;
        }
        let Some(p) = self.pools.get(b.pool) else { return };
        self.closing.push(Closing { pid: b.pid, database: p.database.clone(), role: p.role.clone(), since: Instant::now() });
    }

    /// Each loop turn: forget closed backends whose process is gone, and let
    /// pools with waiting clients try again.
    pub fn closing_check(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        let before = self.closing.len();
        self.closing.retain(|c| {
            c.since.elapsed() < CLOSING_PATIENCE
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.pid), None).is_ok()
        });
        if self.closing.len() == before {
            return;
        }
        // Highest pool_priority first, then fewest backends: they get the room.
        let mut waiting: Vec<(std::cmp::Reverse<i32>, usize, usize)> = self
            .pools
            .iter()
            .filter(|(_, p)| p.has_waiters())
            .map(|(k, p)| (std::cmp::Reverse(self.pool_priority_of(k)), p.shared_backends(), k))
            .collect();
        waiting.sort_unstable();
        for (_, _, p) in waiting {
            self.pool_maybe_grow(p);
        }
    }
}
