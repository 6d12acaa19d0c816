//! One pool per (database, role): its parked backends, the clients waiting
//! for one, what the pool logs in with, and the session values new clients
//! are told about.
#![allow(missing_docs)] // field-level docs would only repeat the module docs
use crate::proto::ErrorFields;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The pause after a pool login refused while the pool has backends to
/// share (`Pool::login_failed_while_shared`); it doubles with each refusal
/// in a row, up to `LOGIN_RETRY_MAX` (PgBouncer's `server_login_retry` is
/// 5 s flat).
pub const LOGIN_RETRY_FIRST: Duration = Duration::from_millis(500);
pub const LOGIN_RETRY_MAX: Duration = Duration::from_secs(5);

/// What the pooler logs pooled backends in with. Kept in pooler memory only.
#[derive(Clone)]
pub enum Credential {
    /// SCRAM ClientKey recovered from a client's exchange, with the ServerKey
    /// (from pg_authid) to verify the server's signature.
    Scram { client_key: [u8; 32], server_key: [u8; 32] },
    /// The md5 hash stored in pg_authid is itself the md5 credential.
    Md5([u8; 16]),
}

impl Drop for Credential {
    fn drop(&mut self) {
        match self {
            Credential::Scram { client_key, server_key } => {
                crate::auth::scram::zeroize::wipe(client_key);
                crate::auth::scram::zeroize::wipe(server_key);
            }
            Credential::Md5(h) => crate::auth::scram::zeroize::wipe(h),
        }
    }
}

pub struct Pool {
    pub database: String,
    pub role: String,
    pub row: usize,
    /// Parked backends, most recently parked last.
    pub parked: Vec<usize>,
    /// Backends serving a client (in a transaction, or keeping an idle
    /// client while nobody waits).
    pub attached: Vec<usize>,
    /// Of those, the ones asked to give their client back.
    pub release_requested: usize,
    /// Clients waiting for a backend, oldest first (not those sent ahead).
    pub waiting: VecDeque<usize>,
    /// Waiting clients whose ATTACH was sent ahead to a busy backend
    /// (`ahead` in the pooler); they count as waiting in `nextgres.pools`.
    pub ahead: usize,
    /// Clients backends took at a transaction boundary from an ATTACH sent
    /// ahead, without parking: `nextgres.pools.attaches_ahead`.
    pub attaches_ahead: i64,
    /// Clients in the pool's kernel queue (the pooler's `kq`).
    pub queued: usize,
    /// Of those, the ones queued since the pooler's last look (it queues a
    /// client when its query arrives).
    pub queued_fresh: usize,
    /// At that look (once a second), the queue was busy: a backend took a
    /// client whose query was already waiting within the last second, or
    /// a query sat untaken (`pooler::kq`). Then every queued client may
    /// want a backend; otherwise only the fresh ones do. Clients a backend
    /// put back at ReadyForQuery(I) sit idle in an idle queue and ask for
    /// no backend, so an idle pool's backends close after
    /// `idle_backend_timeout` and stay closed.
    pub queue_busy: bool,
    /// When a client last got a backend after waiting for one (monotonic
    /// µs, the same clock in every process; 0: never): backends do not
    /// hold idle clients of a pool saturated that recently
    /// (`backend::park::linger`).
    pub waited_at: i64,
    /// Clients authenticated before the pool knew its session values.
    pub login_pending: Vec<usize>,
    /// Backends in any state, including logging in.
    pub backends: usize,
    /// Of those, attached backends whose client pinned its session (LISTEN,
    /// session advisory lock, temp table, WITH HOLD cursor, ...) and that
    /// the pooler counts as that client's dedicated session, outside
    /// `pool_size` (at most `nextgres.max_pinned_backends`).
    pub dedicated: usize,
    /// Attached backends whose client pinned its session, dedicated or not
    /// (beyond `max_pinned_backends` they stay in `pool_size`).
    pub pinned: usize,
    /// `pool_mode = dedicated`: backends logged in for one client each
    /// (starting ones included), outside pool_size; they exit with it.
    pub sessions: usize,
    /// Of `sessions`: still logging in.
    pub sessions_starting: usize,
    /// Dedicated-mode clients waiting for their own backend, oldest first.
    pub session_waiting: VecDeque<usize>,
    pub starting: usize,
    pub clients: usize,
    pub credential: Option<Credential>,
    /// ParameterStatus values of a fresh session of this role and database.
    pub params: Option<Vec<(String, String)>>,
    /// The role or database has a CONNECTION LIMIT: backends left without
    /// clients are closed at once so they do not hold slots direct logins
    /// could use.
    pub close_when_idle: bool,
    /// A DROP DATABASE (or another command that needs the database to
    /// itself) is waiting for this pool's backends to leave: none logs in,
    /// none parks.
    pub draining: bool,
    /// The (role, database) oids its clients authenticated as; 0 unknown.
    pub identity: (u32, u32),
    /// Its role or database was renamed, dropped or re-created since: no
    /// new client joins it and it logs in no backend (a login by its name
    /// would be another role's or database's); its backends serve its
    /// remaining clients until they leave.
    pub retired: bool,
    pub last_login_error: Option<(ErrorFields, Instant)>,
    /// Why a pool login would fail now (its credential no longer the
    /// role's secret, NOLOGIN, an expired password), and when that was
    /// checked (the agent's answer, reused for a few seconds; dropped when
    /// the pool's credential changes). While it holds and the pool has
    /// clients, the pool keeps its last backend (the pooler's `keep`).
    pub login_check: Option<(Instant, String)>,
    /// The pool keeps its last backend for that reason (logged once per
    /// episode).
    pub keeping_last: bool,
    /// No pool login before this instant: the server had no connection
    /// slot for the last one (53300), so the pool does not retry in a loop.
    pub login_backoff_until: Option<Instant>,
    /// No pool login before this instant while the pool has logged-in
    /// backends to share: the server refused the last one
    /// (`login_failed_while_shared`). A pool left without backends tries
    /// at once (its waiting clients then get the refusal).
    pub login_retry_at: Option<Instant>,
    /// Pool logins refused in a row while the pool had backends to share
    /// (reset by one that succeeds, or a client with another secret).
    pub login_failures: u32,
    /// The pool is short of connection slots since this episode began (its
    /// log line is written once per episode).
    pub slots_episode: bool,
    pub xacts: i64,
    /// Statements run for the pool's clients (reported with RELEASED).
    pub queries: i64,
    /// Time its backends spent attached to clients, attach to release (µs).
    pub xact_us: i64,
    /// Query time, µs (`control::Released::query_us`).
    pub query_us: i64,
    /// Protocol bytes the pool's backends sent to its clients.
    pub bytes_sent: i64,
    /// Bytes received from the pool's clients after their login (TCP).
    pub bytes_received: i64,
    pub waits: i64,
    pub wait_us: i64,
    pub max_wait_us: i64,
    /// Settings of this pool from `ALTER ROLE / DATABASE ... SET` (None:
    /// the global value).
    pub conf: crate::poolconf::PoolConf,
    /// `nextgres.reconnect()`: backends logged in before this instant are
    /// replaced at their next transaction boundary.
    pub reconnect_before: Option<Instant>,
    /// A client waited longer than reserve_pool_timeout: the pool may have
    /// reserve_pool_size more backends until its queue has been empty for
    /// reserve_pool_timeout.
    pub reserve_engaged: bool,
    /// Since when the queue of a pool with the reserve engaged is empty.
    pub reserve_idle_since: Option<Instant>,
}

impl Pool {
    pub fn new(database: &str, role: &str, row: usize) -> Pool {
        Pool {
            database: database.to_string(),
            role: role.to_string(),
            row,
            parked: Vec::new(),
            attached: Vec::new(),
            release_requested: 0,
            waiting: VecDeque::new(),
            ahead: 0,
            attaches_ahead: 0,
            queued: 0,
            queued_fresh: 0,
            queue_busy: false,
            waited_at: 0,
            login_pending: Vec::new(),
            backends: 0,
            dedicated: 0,
            pinned: 0,
            sessions: 0,
            sessions_starting: 0,
            session_waiting: VecDeque::new(),
            starting: 0,
            clients: 0,
            credential: None,
            params: None,
            close_when_idle: false,
            draining: false,
            identity: (0, 0),
            retired: false,
            last_login_error: None,
            login_check: None,
            keeping_last: false,
            login_backoff_until: None,
            login_retry_at: None,
            login_failures: 0,
            slots_episode: false,
            xacts: 0,
            queries: 0,
            xact_us: 0,
            query_us: 0,
            bytes_sent: 0,
            bytes_received: 0,
            waits: 0,
            wait_us: 0,
            max_wait_us: 0,
            conf: Default::default(),
            reconnect_before: None,
            reserve_engaged: false,
            reserve_idle_since: None,
        }
    }

    /// Picks a parked backend for a client: the one it used last if parked
    /// (no session switch needed), else the most recently parked (warmest).
    pub fn take_parked(&mut self, last_backend_of_client: Option<usize>) -> Option<usize> {
        if let Some(b) = last_backend_of_client {
            if let Some(i) = self.parked.iter().position(|&k| k == b) {
                return Some(self.parked.remove(i));
            }
        }
        self.parked.pop()
    }

    /// Backends that count against `pool_size`: all but the dedicated ones
    /// (pinned clients' and dedicated-mode clients' own).
    pub fn shared_backends(&self) -> usize {
        self.backends.saturating_sub(self.dedicated + self.sessions)
    }

    /// Shared backends logged in (those whose login is under way not
    /// counted): what a failed login is weighed against. Two logins in
    /// flight must not each see the other as a live backend, or a login
    /// that cannot succeed is retried without pause.
    pub fn logged_in_shared_backends(&self) -> usize {
        self.shared_backends().saturating_sub(self.starting)
    }

    /// A pool login failed while the pool still has logged-in shared
    /// backends, which its clients share meanwhile: no login before a
    /// pause that doubles with each failure in a row (`LOGIN_RETRY_FIRST`
    /// up to `LOGIN_RETRY_MAX`), so a login the server keeps refusing
    /// (NOLOGIN, ALLOW_CONNECTIONS false, REVOKE CONNECT, a smart
    /// shutdown's 57P03) costs a fork and its log lines every few seconds,
    /// not hundreds a second. Returns the pause.
    pub fn login_failed_while_shared(&mut self, now: Instant) -> Duration {
        self.login_failures = self.login_failures.saturating_add(1);
        let pause = LOGIN_RETRY_FIRST.saturating_mul(1 << (self.login_failures - 1).min(8)).min(LOGIN_RETRY_MAX);
        self.login_retry_at = Some(now + pause);
        pause
    }

    /// May a pool login start at `now` as far as refused ones go? Not
    /// before `login_retry_at` while the pool has backends to share.
    pub fn login_retry_due(&self, now: Instant) -> bool {
        self.logged_in_shared_backends() == 0 || self.login_retry_at.is_none_or(|t| now >= t)
    }

    /// The pool's logins may succeed again (one did, or a client proved
    /// another secret): the next one is not held back by earlier failures.
    pub fn login_failures_clear(&mut self) {
        self.login_failures = 0;
        self.login_retry_at = None;
    }

    /// Do clients of this pool wait for a backend: for one to run a
    /// query on (`waiting`), for their own (`session_waiting`), or for the
    /// pool's first login to finish theirs (`login_pending`, while the
    /// pool's session values are unknown)?
    pub fn has_waiters(&self) -> bool {
        !self.waiting.is_empty() || !self.session_waiting.is_empty() || (self.params.is_none() && !self.login_pending.is_empty())
    }

    /// Should another backend log in? Only while clients wait that the
    /// backends already starting will not serve, and the pool has room:
    /// fewer shared backends than `pool_size` (dedicated ones do not count).
    pub fn wants_backend(&self, pool_size: usize) -> bool {
        // Clients in a busy kernel queue want as many backends as there
        // are of them (the pooler cannot see which of them wait), in an
        // idle one only those that just sent a query; pinned backends in
        // pool_size serve no queue.
        let serving = self.shared_backends().saturating_sub(self.starting + self.pinned.saturating_sub(self.dedicated));
        let asking = if self.queue_busy { self.queued } else { self.queued_fresh.min(self.queued) };
        let queued = asking.saturating_sub(serving);
        let demand = self.waiting.len() + queued + usize::from(self.params.is_none() && !self.login_pending.is_empty());
        !self.draining && !self.retired && self.shared_backends() < pool_size && demand > self.starting
    }

    pub fn record_wait(&mut self, since: Instant) {
        let us = since.elapsed().as_micros() as i64;
        self.waits += 1;
        self.wait_us += us;
        self.max_wait_us = self.max_wait_us.max(us);
    }
}

/// The time slice a pooled backend gives its client while `waiting` clients
/// of the pool wait for one of its `backends`. With fewer waiting clients
/// than backends, each waits at most about one slice (the next backend whose
/// slice ends takes it), and the pool saves a handoff per transaction. With a
/// queue at least as long as the pool, every client's turn comes only after
/// `waiting / backends` others, so letting each keep its backend for K
/// transactions multiplies that wait, and so the p99, by about K: there the
/// slice is 0 and the queue is served first in, first out, one transaction
/// per turn, as by PgBouncer. (Measured on a saturated pool: a slice still
/// worth two transactions per turn raised the p99 about 1.6x for no clear
/// throughput gain; see BENCHMARKS.md.)
pub fn fair_slice(slice: std::time::Duration, waiting: i32, backends: i32) -> std::time::Duration {
    if waiting < backends || backends <= 0 {
        return slice;
    }
    std::time::Duration::ZERO
}

/// Do two (role oid, database oid) identities name different roles or
/// databases? An oid of 0 is unknown, never a difference (a physical
/// walsender has no database; a pool's identity may not be known yet).
pub fn identities_differ(a: (u32, u32), b: (u32, u32)) -> bool {
    let differs = |x: u32, y: u32| x != 0 && y != 0 && x != y;
    differs(a.0, b.0) || differs(a.1, b.1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn identities_differ_only_on_known_oids() {
        use super::identities_differ;
        assert!(!identities_differ((10, 5), (10, 5)));
        assert!(identities_differ((10, 5), (11, 5)));
        assert!(identities_differ((10, 5), (10, 6)));
        assert!(!identities_differ((0, 0), (11, 6)));
        assert!(!identities_differ((10, 0), (10, 6)));
        assert!(identities_differ((10, 0), (11, 0)));
    }

    use super::*;

    #[test]
    fn prefers_the_clients_last_backend() {
        let mut p = Pool::new("db", "r", 0);
        p.parked = vec![3, 5, 7];
        assert_eq!(p.take_parked(Some(5)), Some(5));
        assert_eq!(p.take_parked(Some(42)), Some(7));
        assert_eq!(p.take_parked(None), Some(3));
        assert_eq!(p.take_parked(None), None);
    }

    #[test]
    fn refused_logins_back_off_until_one_succeeds() {
        let mut p = Pool::new("db", "r", 0);
        let now = Instant::now();
        let pauses: Vec<u64> = (0..7).map(|_| p.login_failed_while_shared(now).as_millis() as u64).collect();
        assert_eq!(pauses, [500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(p.login_retry_at, Some(now + LOGIN_RETRY_MAX));
        // Held back only while there are backends to share.
        assert!(p.login_retry_due(now));
        p.backends = 1;
        assert!(!p.login_retry_due(now));
        assert!(p.login_retry_due(now + LOGIN_RETRY_MAX));
        p.starting = 1; // a login under way is no backend to share
        assert!(p.login_retry_due(now));
        p.starting = 0;
        // Another cause's pause is not this one's to clear.
        p.login_backoff_until = Some(now);
        p.login_failures_clear();
        assert_eq!((p.login_failures, p.login_retry_at, p.login_backoff_until), (0, None, Some(now)));
        assert!(p.login_retry_due(now));
        assert_eq!(p.login_failed_while_shared(now), LOGIN_RETRY_FIRST);
    }

    #[test]
    fn a_draining_pool_never_grows() {
        let mut p = Pool::new("db", "r", 0);
        p.waiting.push_back(1);
        assert!(p.wants_backend(4));
        p.draining = true;
        assert!(!p.wants_backend(4));
    }

    #[test]
    fn grows_only_for_unserved_demand() {
        let mut p = Pool::new("db", "r", 0);
        p.params = Some(vec![]);
        assert!(!p.wants_backend(4));
        p.waiting.push_back(1);
        assert!(p.wants_backend(4));
        p.starting = 1;
        p.backends = 1;
        assert!(!p.wants_backend(4));
        p.waiting.push_back(2);
        assert!(p.wants_backend(4));
        p.backends = 4;
        assert!(!p.wants_backend(4));
        // Pinned clients' dedicated backends leave pool_size to the others.
        p.dedicated = 3;
        assert!(p.wants_backend(4));
        p.backends = 7;
        assert!(!p.wants_backend(4));
        // So do dedicated-mode clients' own backends.
        p.sessions = 2;
        assert_eq!(p.shared_backends(), 2);
        assert!(p.wants_backend(4));
    }

    #[test]
    fn idle_queued_clients_want_no_backend() {
        let mut p = Pool::new("db", "r", 0);
        p.params = Some(vec![]);
        // 10 clients idle in the kernel queue, no backend left.
        p.queued = 10;
        assert!(!p.wants_backend(4));
        // Three of them sent a query: three logins, not ten.
        p.queued_fresh = 3;
        assert!(p.wants_backend(4));
        p.starting = 3;
        p.backends = 3;
        assert!(!p.wants_backend(4));
        // Logged in, the three serve them.
        p.starting = 0;
        assert!(!p.wants_backend(4));
        // The next look finds the queue busy: the ten may all want one.
        p.queued_fresh = 0;
        p.queue_busy = true;
        assert!(p.wants_backend(4));
        p.backends = 4;
        assert!(!p.wants_backend(4));
        // A lone backend serving the first query of a lone client: enough.
        let mut p = Pool::new("db", "r", 0);
        p.params = Some(vec![]);
        p.backends = 1;
        p.queued = 1;
        p.queued_fresh = 1;
        assert!(!p.wants_backend(4));
        // Never more than are queued.
        p.queued_fresh = 5;
        assert!(!p.wants_backend(4));
    }

    #[test]
    fn fair_slice_only_while_the_queue_is_shorter_than_the_pool() {
        let ms = Duration::from_millis;
        assert_eq!(fair_slice(ms(2), 1, 16), ms(2));
        assert_eq!(fair_slice(ms(2), 15, 16), ms(2));
        // As many waiting as backends, or more: one transaction per turn.
        assert_eq!(fair_slice(ms(2), 16, 16), Duration::ZERO);
        assert_eq!(fair_slice(ms(2), 984, 16), Duration::ZERO);
        // Backends not known yet (racy read): the configured slice.
        assert_eq!(fair_slice(ms(2), 10, 0), ms(2));
        assert_eq!(fair_slice(ms(0), 3, 16), ms(0));
    }
}
