//! Periodic upkeep, once per loop turn (at least every TICK_MS): clients that
//! waited too long for a backend or never finished authenticating, and parked
//! backends unused for too long.
use super::backend::BPhase;
use super::client::Phase;
use super::conn::Conn;
use super::worker::Pooler;
use std::time::{Duration, Instant};

pub const TICK_MS: i64 = 1000;

/// How long a client that was sent a final error (FATAL) may take to read
/// it before its connection is closed regardless; as a TLS relay's close
/// (`tls::CLOSE_WITHIN`). A client that reads nothing must not keep a
/// connection slot of the pooler (`max_client_conn`) for ever.
pub const CLOSING_WITHIN: Duration = Duration::from_secs(5);

impl Pooler {
    pub fn janitor(&mut self) {
        let now = Instant::now();
        if self.last_janitor.is_some_and(|t| now.duration_since(t) < Duration::from_millis(TICK_MS as u64)) {
            return;
        }
        self.last_janitor = Some(now);
        self.watch_smart_shutdown();
        self.conf_standby_check();
        self.check_drains();
        self.kq_janitor();
        self.count_received_due();
        let auth_limit = secs(crate::pg::server::authentication_timeout_s());
        let mut expired_wait = Vec::new();
        let mut expired_auth = Vec::new();
        let mut idle_backends = Vec::new();
        let mut expired_attached = Vec::new();
        let mut watch = Vec::new();
        let mut refused = Vec::new();
        for (k, conn) in self.conns.iter() {
            match conn {
                Conn::Client(c) => match c.phase {
                    Phase::Waiting { since } | Phase::LoginPending { since } | Phase::Ahead { since, .. } => {
                        let wait_limit = secs(self.query_wait_timeout_of(c.pool));
                        if wait_limit.is_some_and(|l| now.duration_since(since) > l) {
                            // Waits for a backend (`waits`); not a login's
                            // wait for the pool's first backend or settings.
                            let for_backend = matches!(c.phase, Phase::Waiting { .. } | Phase::Ahead { .. });
                            expired_wait.push((k, c.pool, since, for_backend));
                        } else if !matches!(c.phase, Phase::LoginPending { .. })
                            && !c.watch_hangup
                            && now.duration_since(since) >= Duration::from_millis(TICK_MS as u64)
                        {
                            watch.push(k);
                        }
                    }
                    Phase::Startup | Phase::Auth(_) | Phase::Dedicating { .. } => {
                        if auth_limit.is_some_and(|l| now.duration_since(c.started) > l) {
                            expired_auth.push(k);
                        }
                    }
                    // Its final error not read within the bound: the server's
                    // process would be gone by now, with the socket.
                    Phase::Closing { since } if now.duration_since(since) > CLOSING_WITHIN => expired_auth.push(k),
                    _ => {}
                },
                Conn::Backend(b) => match b.phase {
                    BPhase::Parked { since } => {
                        let idle_limit = secs(self.idle_backend_timeout_of(b.pool));
                        // Lent to a kernel queue: idle while it waits there
                        // with no client (it notes since when).
                        let idle = if b.lent {
                            !b.kq_close && idle_limit.is_some_and(|l| self.kq_idle_longer(b.row, l))
                        } else {
                            idle_limit.is_some_and(|l| now.duration_since(since) > l)
                        };
                        if b.pinned_to.is_none() && (idle || self.backend_expired(k)) {
                            idle_backends.push(k);
                        }
                    }
                    BPhase::Attached { .. } if !b.release_requested && self.backend_expired(k) => expired_attached.push(k),
                    _ => {}
                },
                Conn::Refusing(r) if now.duration_since(r.since) > super::refusing::REFUSING_WITHIN => refused.push(k),
                Conn::Listener(_) | Conn::Dedicated(_) | Conn::Refusing(_) => {}
            }
        }
        for k in watch {
            // Waiting long: a hang-up now closes it in the queue (see
            // `Client::interest`).
            if let Some(c) = self.client(k) {
                c.watch_hangup = true;
                self.client_rearm(k);
            }
        }
        // Logged once per pool and tick, with what its backends were doing:
        // the clients' FATAL reaches no server log otherwise, and a pool
        // whose backends all look busy is the first thing to see.
        let mut timed_out: Vec<(Option<usize>, usize)> = Vec::new();
        for &(_, pool, _, _) in &expired_wait {
            match timed_out.iter_mut().find(|(p, _)| *p == pool) {
                Some((_, n)) => *n += 1,
                None => timed_out.push((pool, 1)),
            }
        }
        for (pool, n) in timed_out {
            log::info!("{}", self.wait_timeout_note(pool, n));
        }
        for (k, pool, since, for_backend) in expired_wait {
            let t = self.query_wait_timeout_of(pool);
            let paused = pool.is_some_and(|p| self.pool_paused(p));
            let hint = if paused {
                "The pool is paused (nextgres.pause()); nextgres.resume() ends the pause."
            } else {
                "Raise nextgres.pool_size or nextgres.query_wait_timeout, or shorten transactions."
            };
            self.client_fatal(k, "53400", &format!("nextgres: no backend became free within nextgres.query_wait_timeout ({t}s)"), Some(hint));
            // A wait that failed is a wait too (`waits`, `wait_time_ms`,
            // `max_wait_ms`): a pool failing its clients must not look
            // idle. Only once told: a client its backend claimed meanwhile
            // is served, and counted as served.
            let told = self.client(k).is_none_or(|c| matches!(c.phase, Phase::Closing { .. }));
            if let Some(pk) = pool.filter(|_| for_backend && told) {
                if let Some(p) = self.pools.get_mut(pk) {
                    p.record_wait(since);
                }
                self.sync_pool(pk);
            }
        }
        for k in refused {
            self.refusing_end(k, true);
        }
        for k in expired_auth {
            // As the server: a client that does not finish authenticating in
            // authentication_timeout is dropped (and one that never reads its
            // final error, CLOSING_WITHIN).
            self.client_close(k);
        }
        // min_pool_size: idle ones beyond it close, the pool keeps that many
        // (backends past their lifetime close regardless and are replaced).
        for k in idle_backends {
            let Some(Conn::Backend(b)) = self.conns.get(k) else { continue };
            let pool = b.pool;
            // Lent ones being closed are still counted until they answer.
            let backends = self.pools.get(pool).map_or(0, |p| p.shared_backends()).saturating_sub(self.kq_closing_count(pool));
            if !self.backend_expired(k) && backends <= self.min_pool_size_of(pool) {
                continue;
            }
            // The last one of a pool with clients, when a new pool login
            // would fail (the role's password changed): those clients go
            // on as directly.
            if self.backend_kept(k) {
                continue;
            }
            self.backend_close(k);
            self.kq_unserved_take_back(pool);
        }
        // Attached past their lifetime give their client back at their next
        // transaction boundary and close there (backend_available).
        for k in expired_attached {
            if self.backend_kept(k) {
                continue;
            }
            self.backend_request_release(k, true);
        }
        // Idle TLS clients give up their relay threads.
        self.park_idle_tls();
        // Over-size pools (pool_size lowered) ask again, e.g. backends that
        // were asked while pinned.
        self.pools_trim();
        // Pools that could not log in a backend a moment ago try again.
        let pools: Vec<usize> = self.pools.iter().map(|(k, _)| k).collect();
        for p in pools {
            self.pool_maybe_grow(p);
        }
    }

    /// The log line for `n` clients of `pool` (none: not yet assigned one)
    /// that waited out query_wait_timeout, with the pool's backends by
    /// state: enough to tell a pool too small for its load from one whose
    /// backends serve nobody.
    fn wait_timeout_note(&self, pool: Option<usize>, n: usize) -> String {
        let t = self.query_wait_timeout_of(pool);
        let who = clients_word(n);
        let Some((pool, p)) = pool.and_then(|k| Some((k, self.pools.get(k)?))) else {
            return format!("{who} waited out nextgres.query_wait_timeout ({t}s)");
        };
        let (mut starting, mut attached, mut pinned, mut parked, mut lent, mut closing, mut recalled) = (0, 0, 0, 0, 0, 0, 0);
        for (_, c) in self.conns.iter() {
            let Conn::Backend(b) = c else { continue };
            if b.pool != pool {
                continue;
            }
            match b.phase {
                BPhase::Login => starting += 1,
                BPhase::Attached { .. } => {
                    attached += 1;
                    if self.tables.backend_pin(b.row) != 0 {
                        pinned += 1;
                    }
                }
                BPhase::Parked { .. } if b.lent => {
                    lent += 1;
                    closing += usize::from(b.kq_close);
                    recalled += usize::from(b.kq_recalled);
                }
                BPhase::Parked { .. } => parked += 1,
            }
        }
        format!(
            "{who} of role \"{}\" for database \"{}\" waited out nextgres.query_wait_timeout ({t}s): pool_size {}; \
             backends {starting} starting, {attached} attached ({pinned} pinned), {parked} parked, \
             {lent} lent to the kernel queue ({closing} closing, {recalled} recalled)",
            p.role,
            p.database,
            self.pool_size_of(pool)
        )
    }
}

impl Pooler {
    /// A smart shutdown waits for client backends to end, and parked
    /// backends would never end on their own. The postmaster announces it in
    /// postmaster.pid; from then on nobody new is admitted and a pool whose
    /// last client left closes its backends.
    fn watch_smart_shutdown(&mut self) {
        if !self.stopping && postmaster_stopping() {
            log::info!("server is shutting down: admitting no new clients, closing pools as their clients leave");
            self.stopping = true;
        }
        if !self.stopping {
            return;
        }
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c {
                Conn::Backend(b) if matches!(b.phase, BPhase::Parked { .. } | BPhase::Login) => {
                    self.pools.get(b.pool).is_some_and(|p| p.clients == 0).then_some(k)
                }
                _ => None,
            })
            .collect();
        for k in idle {
            self.backend_close(k);
        }
    }
}

/// Status line of postmaster.pid (the server's cwd is its data directory).
fn postmaster_stopping() -> bool {
    std::fs::read_to_string("postmaster.pid")
        .ok()
        .and_then(|s| s.lines().nth(7).map(|l| l.trim() == "stopping"))
        .unwrap_or(false)
}

/// "1 client", "3 clients".
fn clients_word(n: usize) -> String {
    if n == 1 { "1 client".to_string() } else { format!("{n} clients") }
}

fn secs(s: i32) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s as u64))
}
