//! Pooled backends as the pooler sees them: the pool login (the pooler is a
//! client of the server's Unix socket, logging in as the client's role with
//! the pool's credential) and afterwards the control socket of a parked or
//! attached backend.
use super::conn::{self, Conn, READ};
use super::worker::Pooler;
use crate::shmem::BackendState;
use nextgres_core::auth::{self, ClientCredential, ScramClient};
use nextgres_core::control;
use nextgres_core::pool::Credential;
use nextgres_core::proto::{self, backend::AuthRequest, ErrorFields};
use nix::sys::epoll::EpollFlags;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Instant;

pub enum BPhase {
    Login,
    Parked { since: Instant },
    Attached { client: usize },
}

pub struct Backend {
    pub stream: UnixStream,
    pub pool: usize,
    pub row: usize,
    pub phase: BPhase,
    pub inbuf: Vec<u8>,
    pub pid: i32,
    pub last_client: u64,
    /// Session mode: reserved for this client while it is connected.
    pub pinned_to: Option<usize>,
    pub params: Vec<(String, String)>,
    /// Asked (RELEASE_REQUEST) to give its client back.
    pub release_requested: bool,
    scram: Option<ScramClient>,
    pub xacts: i64,
    /// When its pool login started (for `backend_lifetime`).
    pub born: Instant,
    /// Counted as its pinned client's dedicated session, outside pool_size
    /// (`limits::pool_dedicated_refresh`).
    pub dedicated: bool,
    /// Logged in for one dedicated-mode client (`Pool::sessions`): serves
    /// only it and closes when it leaves.
    pub own: bool,
    /// When its current client was attached (`xact_time_ms` runs to RELEASED).
    pub attached_at: Instant,
    /// The clients whose ATTACHes were sent ahead to it (`ahead.rs`), in
    /// the order sent (the order it takes them): at most `shmem::AHEAD_DEPTH`.
    pub ahead: Vec<super::ahead::AheadOf>,
    /// A client sent ahead was taken back (its ATTACH may still sit unread
    /// in its socket, and a long transaction may hold it): nothing more is
    /// sent ahead until its next RELEASED.
    pub ahead_blocked: bool,
    /// The ticket of the client it is attached to, when that client's
    /// ATTACH was sent ahead and not yet claimed as it gave its previous
    /// client back (`ahead::backend_ahead_settle`): it claims it once
    /// parked. Should it die first, the ticket is still there and the
    /// client, never touched, waits again (`backend_gone`). Until its next
    /// RELEASED.
    pub handed: Option<super::ahead::Handed>,
    /// SIGTERM sent (kill_client, kill_clients): it gets no client any
    /// more; closed when it gives its client back.
    pub terminating: bool,
    /// The FATAL a parked backend wrote on its control socket before its
    /// EOF (terminated): told to the client it was reserved for.
    pub last_fatal: Option<Box<ErrorFields>>,
    /// Lent to its pool's kernel queue (`kq`): parked in the books, but
    /// the pooler hands it nothing.
    pub lent: bool,
    /// Asked back from the queue (`KQ_RECALL`), `KQ_PARKED` not read yet.
    pub kq_recalled: bool,
    /// Closed once it answers its recall with `KQ_PARKED` (`backend_close`
    /// of a lent one); dropped when it keeps a client instead (`kq_unlend`).
    pub kq_close: bool,
    /// It answered a lend with `KQ_PARKED` (it could not open the queue:
    /// `pidfd_getfd` refused, no descriptor left): not lent again.
    pub kq_refused: bool,
}

fn login_error(sqlstate: &str, message: String, hint: Option<&str>) -> ErrorFields {
    ErrorFields { severity: "FATAL".into(), sqlstate: sqlstate.into(), message, detail: None, hint: hint.map(Into::into) }
}

const HBA_HINT: &str = "nextgres logs pooled backends in through the server's Unix socket as the client's role. \
Make the first pg_hba.conf \"local\" line that matches the client's database and role use scram-sha-256, md5 or trust \
(for example \"local all all scram-sha-256\" in place of \"local all all peer\", with a \"local all postgres peer\" line \
kept above it for local admin access), then reload.";

/// A pool login refused with 28P01 after the pool had logged in before.
const PASSWORD_CHANGED_HINT: &str = "nextgres logs pooled backends in with the credential of the role's client that logged in last; \
the role's password changed or expired since. Pool logins succeed again once a client logs in with the current password.";

impl Pooler {
    /// Terminates backend `key` as pg_terminate_backend does (SIGTERM to
    /// its process group, `signal_backend`): it tells its client, ends the
    /// transaction, and its end is expected (`terminating`). Its pid, or
    /// None for a backend no longer in the table.
    pub fn backend_terminate(&mut self, key: usize) -> Option<i32> {
        let b = self.backend(key)?;
        b.terminating = true;
        let pid = b.pid;
        signal_backend(pid, nix::sys::signal::Signal::SIGTERM);
        Some(pid)
    }

    pub fn backend(&mut self, key: usize) -> Option<&mut Backend> {
        match self.conns.get_mut(key) {
            Some(Conn::Backend(b)) => Some(b),
            _ => None,
        }
    }

    /// Starts one pool login. Failures are reported to the pool's clients.
    pub fn backend_start(&mut self, pool: usize) {
        self.backend_start_for(pool, false)
    }

    /// Starts one login: a shared backend of the pool, or (`own`) one for
    /// the oldest dedicated-mode client waiting (`Pool::session_waiting`).
    pub fn backend_start_for(&mut self, pool: usize, own: bool) {
        let Some(p) = self.pools.get(pool) else { return };
        let (database, role, prow) = (p.database.clone(), p.role.clone(), p.row);
        let stream = match UnixStream::connect(&self.server_socket) {
            Ok(s) => s,
            Err(e) => {
                let f = login_error("08006", format!("nextgres: could not connect to the server socket {}: {e}", self.server_socket.display()), None);
                return self.login_start_failed(pool, own, f);
            }
        };
        let Some(row) = self.backend_row_alloc(prow) else {
            let f = login_error("53300", "sorry, too many clients already".into(), Some("The nextgres backend table is full (max_connections)."));
            return self.login_start_failed(pool, own, f);
        };
        let mut out = Vec::new();
        let token_opt = crate::backend::TOKEN_OPTION.to_str().unwrap_or_default();
        proto::startup_message(&mut out, &[("user", &role), ("database", &database), (token_opt, &self.token_hex)]);
        let mut stream = stream;
        // Room for the ATTACHes sent ahead and those taken back, unread by a
        // backend in a transaction, whatever the system default (`ahead.rs`).
        let _ = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::SndBuf, &super::ahead::CONTROL_SNDBUF);
        // A fresh Unix socket takes a few hundred bytes without blocking.
        if stream.write_all(&out).is_err() || stream.set_nonblocking(true).is_err() {
            self.backend_row_free(row);
            let f = login_error("08006", "nextgres: could not send the pool login".into(), None);
            return self.login_start_failed(pool, own, f);
        }
        let b = Backend {
            stream,
            pool,
            row,
            phase: BPhase::Login,
            inbuf: Vec::new(),
            pid: 0,
            last_client: 0,
            pinned_to: None,
            params: Vec::new(),
            release_requested: false,
            scram: None,
            xacts: 0,
            born: Instant::now(),
            dedicated: false,
            own,
            attached_at: Instant::now(),
            ahead: Vec::with_capacity(crate::shmem::AHEAD_DEPTH),
            ahead_blocked: false,
            handed: None,
            terminating: false,
            lent: false,
            kq_recalled: false,
            kq_close: false,
            kq_refused: false,
            last_fatal: None,
        };
        if own {
            // nextgres.clients().dedicated and backends().dedicated say so.
            self.backend_row_update(row, |r| r.dedicated = true);
        }
        let entry = self.conns.vacant_entry();
        conn::add(&self.epoll, &b.stream, entry.key(), READ);
        entry.insert(Conn::Backend(Box::new(b)));
        if let Some(p) = self.pools.get_mut(pool) {
            p.backends += 1;
            if own {
                p.sessions += 1;
                p.sessions_starting += 1;
            } else {
                p.starting += 1;
            }
        }
        self.sync_pool(pool);
    }

    /// A login failed before it reached the server: a dedicated-mode
    /// client's own fails that client only (`own_login_failed`), a pool
    /// login the pool's waiting clients (`pool_login_failed`).
    fn login_start_failed(&mut self, pool: usize, own: bool, f: ErrorFields) {
        if own {
            self.own_login_failed(pool, f)
        } else {
            self.pool_login_failed(pool, f)
        }
    }

    pub fn backend_event(&mut self, key: usize, ev: EpollFlags) {
        let Some(b) = self.backend(key) else { return };
        let eof = conn::fill_inbuf(&mut b.stream, &mut b.inbuf) || ev.contains(EpollFlags::EPOLLERR);
        loop {
            let Some(b) = self.backend(key) else { return };
            let (tag, body) = match conn::next_message(&mut b.inbuf, control::MAX_CONTROL_MESSAGE) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("backend {}: {}", b.pid, e.message);
                    return self.backend_gone(key, None);
                }
            };
            // Removed even if it says otherwise (a RELEASED that closed it),
            // and its key maybe taken by a new login already: not ours.
            if !self.backend_message(key, tag, &body) || self.freed_in_batch.contains(&key) {
                return;
            }
        }
        // Every message read is handled: what its ring holds came after.
        if !self.backend_ring_take(key, None) {
            return;
        }
        if eof {
            self.backend_gone(key, None);
        }
    }

    /// Returns false when the backend was removed.
    pub(super) fn backend_message(&mut self, key: usize, tag: u8, body: &[u8]) -> bool {
        let Some(b) = self.backend(key) else { return false };
        match (&b.phase, tag) {
            (BPhase::Login, b'R') => return self.backend_auth_request(key, body),
            (BPhase::Login, b'S') => {
                // Once per name, the login's own value: a login event
                // trigger's set_config() (17+) reports a setting again
                // before the login's ReadyForQuery, and a pool login's
                // list with it named that setting twice to every client
                // (hunt12b 2); a client's trigger fires at its first query.
                if let Ok((n, v)) = proto::parse_parameter_status(body) {
                    if !b.params.iter().any(|(have, _)| have == n) {
                        b.params.push((n.to_string(), v.to_string()));
                    }
                }
            }
            (BPhase::Login, b'K') => {
                if let Ok(pid) = proto::backend_key_data_pid(body) {
                    b.pid = pid;
                    let row = b.row;
                    self.backend_row_update(row, |r| r.pid = pid);
                }
            }
            (BPhase::Login, b'Z') => {
                self.backend_logged_in(key);
            }
            (BPhase::Login, b'E') => {
                let f = proto::parse_error_fields(body).unwrap_or_default();
                self.backend_gone(key, Some(f));
                return false;
            }
            (BPhase::Attached { .. }, control::PINNED) => {
                // Only a hint to recount (the recount reads the pin from the
                // shared row): a malformed one is logged, and the backend
                // and its client stay.
                if let Err(e) = control::parse_pinned(body) {
                    log::warn!("backend {}: {}", b.pid, e.message);
                }
                let pool = b.pool;
                // A pinned backend keeps its client: a client sent ahead
                // to it waits for another.
                self.backend_recall_ahead(key);
                self.pool_pins_changed(pool);
            }
            (BPhase::Attached { .. }, control::RELEASED) => match control::parse_released(body) {
                Ok(r) => self.backend_released(key, r),
                Err(e) => {
                    log::warn!("backend {}: {}", b.pid, e.message);
                    self.backend_gone(key, None);
                    return false;
                }
            },
            (BPhase::Attached { .. }, b'E') if {
                let f = proto::parse_error_fields(body).unwrap_or_default();
                matches!(f.severity.as_str(), "FATAL" | "PANIC")
            } =>
            {
                // An attached backend that exits before it took the client's
                // socket, or after it gave it back (it could not receive the
                // descriptor: MSG_CTRUNC; terminated while parking): its
                // FATAL came on the control socket. The client gets it.
                let f = proto::parse_error_fields(body).unwrap_or_default();
                log::debug!("backend {}: {} {}", b.pid, f.sqlstate, f.message);
                self.backend_gone(key, Some(f));
                return false;
            }
            (_, b'E') => {
                // A parked or attached backend being terminated says why
                // before its EOF.
                let f = proto::parse_error_fields(body).unwrap_or_default();
                log::debug!("backend {}: {} {}", b.pid, f.sqlstate, f.message);
                if matches!(f.severity.as_str(), "FATAL" | "PANIC") {
                    b.last_fatal = Some(Box::new(f));
                }
            }
            // KQ_RETURNED in any phase: a backend that kept one client
            // (attached from that message on) may give back the next one
            // it had taken right after (`Released::TooLarge`).
            (BPhase::Parked { .. }, control::KQ_PARKED) | (_, control::KQ_RETURNED) => return self.kq_backend_message(key, tag, body),
            (_, control::RING_MARK) => match control::parse_ring_mark(body) {
                Ok(tail) => return self.backend_ring_take(key, Some(tail)),
                Err(e) => {
                    log::warn!("backend {}: {}", b.pid, e.message);
                    self.backend_gone(key, None);
                    return false;
                }
            },
            (_, b'N') | (_, b'v') => {}
            (_, t) => {
                log::warn!("backend {}: unexpected message type {} on the control socket", b.pid, t);
                self.backend_gone(key, None);
                return false;
            }
        }
        true
    }

    fn backend_auth_request(&mut self, key: usize, body: &[u8]) -> bool {
        let Some(b) = self.backend(key) else { return false };
        let pool = b.pool;
        let cred = self.pools.get(pool).and_then(|p| p.credential.clone());
        let Some(b) = self.backend(key) else { return false };
        let req = match proto::parse_auth_request(body) {
            Ok(r) => r,
            Err(e) => {
                self.backend_gone(key, Some(e.to_fields("FATAL")));
                return false;
            }
        };
        let mut out = Vec::new();
        let failure = answer_auth_request(req, cred, &mut b.scram, &mut out);
        if let Some(f) = failure {
            self.backend_gone(key, Some(f));
            return false;
        }
        if !out.is_empty() && b.stream.write_all(&out).is_err() {
            self.backend_gone(key, None);
            return false;
        }
        true
    }

    fn backend_logged_in(&mut self, key: usize) {
        if !self.backend_login_is_the_pools(key) {
            return;
        }
        let Some(b) = self.backend(key) else { return };
        let (pool, row, params, own) = (b.pool, b.row, std::mem::take(&mut b.params), b.own);
        b.phase = BPhase::Parked { since: Instant::now() };
        self.backend_row_update(row, |r| {
            r.state = BackendState::Parked;
            r.since = crate::pg::shmem::now();
        });
        if let Some(p) = self.pools.get_mut(pool) {
            if own {
                p.sessions_starting = p.sessions_starting.saturating_sub(1);
            } else {
                p.starting = p.starting.saturating_sub(1);
            }
            p.last_login_error = None;
            if !own {
                p.login_failures_clear();
            }
            if p.params.is_none() {
                p.params = Some(params);
            }
        }
        self.pool_params_known(pool);
        if own {
            self.backend_serve_own(key);
        } else {
            self.backend_available(key);
        }
    }

    /// A pool login is by names: a role (or database) renamed, or dropped
    /// and re-created, between the pool's first client and this login's
    /// name lookup makes it a session of another role, which must serve
    /// none of the pool's clients (they authenticated as the other, and it
    /// has that role's privileges). Checked here, at its ReadyForQuery and
    /// before it is handed anything, against the role and database its
    /// PGPROC names (read by the agent: ProcArrayLock). A login that
    /// differs ends (its control socket closed), and so does the pool
    /// (retired: each later login by its names would differ too); its
    /// clients wait for its remaining backends, or are told when it has
    /// none. A login without a BackendKeyData pid, or whose PGPROC the agent
    /// could not read, fails as a login (nothing to check it by). False when
    /// the backend is gone.
    fn backend_login_is_the_pools(&mut self, key: usize) -> bool {
        use super::agent::Identity;
        let Some(b) = self.backend(key) else { return false };
        let (pool, pid, own) = (b.pool, b.pid, b.own);
        let Some(want) = self.pools.get(pool).map(|p| p.identity) else { return true };
        if pid <= 0 {
            let f = login_error("08P01", "nextgres: the pool login sent no BackendKeyData the pooler could read".into(), None);
            self.backend_gone(key, Some(f));
            return false;
        }
        let (role, db) = match super::agent::backend_identity(pid) {
            Identity::Of(role, db) => (role, db),
            // It ended since its ReadyForQuery, before it was handed anyone.
            Identity::Gone => {
                self.backend_gone(key, None);
                return false;
            }
            // Unchecked is unsafe to hand anyone: it fails as a login.
            Identity::Unknown => {
                let f = login_error("XX000", format!("nextgres: the pool login's role (pid {pid}) could not be checked"), None);
                self.backend_gone(key, Some(f));
                return false;
            }
        };
        if !nextgres_core::pool::identities_differ(want, (role, db)) {
            return true;
        }
        log::warn!(
            "pool login (pid {pid}) for role \"{}\" and database \"{}\" found another role or database of those names (oids {role}/{db} instead of {}/{}): renamed, or dropped and re-created, meanwhile; it serves no client",
            self.pools[pool].role,
            self.pools[pool].database,
            want.0,
            want.1
        );
        // A dedicated session's login: the client it was for is told.
        let told = own.then(|| super::handoff::renamed_fatal(&self.pools[pool].role));
        if !self.pools[pool].retired {
            self.pool_retire(pool);
        }
        self.backend_gone(key, told);
        false
    }

    /// A backend logged in for a dedicated-mode client: it serves the oldest
    /// one still waiting for its own, or closes when none is left. While the
    /// pool is paused (a login in flight at `pause()`) it stays parked, in
    /// no queue, until `resume()` calls this again (`pool_resume_own`).
    pub fn backend_serve_own(&mut self, key: usize) {
        let Some(b) = self.backend(key) else { return };
        let pool = b.pool;
        if self.pool_paused(pool) {
            return;
        }
        while let Some(ck) = self.pools.get_mut(pool).and_then(|p| p.session_waiting.pop_front()) {
            if let Some(c) = self.client(ck) {
                if let super::client::Phase::Waiting { since } = c.phase {
                    return self.handoff_own(ck, key, since);
                }
            }
        }
        self.backend_close(key);
    }

    /// The backend is gone (EOF) or its login failed. Whatever client it
    /// served mid-transaction loses its connection, as with a direct backend
    /// (with `login_failure` as its FATAL when the backend sent one on the
    /// control socket while attached).
    pub fn backend_gone(&mut self, key: usize, login_failure: Option<ErrorFields>) {
        // RELEASEDs it left in its ring came before its end: a client it
        // claimed after one of them was attached (and maybe served), not
        // untouched as below; one it leaves after this, it does not serve.
        if !self.backend_ring_close(key) {
            return;
        }
        // Lent to a kernel queue: the queued clients it served go with it
        // (also one it gave back after it stopped being lent, its message
        // unread: `kq_backend_gone` finds them by their owner words).
        if let Some(Conn::Backend(b)) = self.conns.get(key) {
            if b.lent || self.kq.base != 0 {
                let (row, fatal) = (b.row, login_failure.clone().or_else(|| b.last_fatal.as_deref().cloned()));
                self.kq_backend_gone(key, row, fatal);
            }
        }
        // A client sent ahead waits for another backend. Taken back here, or
        // claimed (or refused) by this backend but its RELEASED never read
        // (RELEASED settles the claim): it died before it attached that
        // client (it attaches only after RELEASED is written), so the
        // client's socket was never touched. Settled while the row is still
        // its.
        let kept = self.backend_recall_ahead(key);
        if let Some(b) = self.backend(key) {
            b.ahead.clear();
        }
        // Last first, so they wait at the head of the queue in the order sent.
        for &ck in kept.iter().rev() {
            self.client_requeue_ahead(ck);
        }
        // The client handed to it with the ATTACH sent ahead, if it died
        // before claiming it: never touched, it waits again (below).
        let unserved = match self.conns.get(key) {
            Some(Conn::Backend(b)) => b.handed.filter(|h| crate::shmem::ahead_claim_handed(b.row, h.ticket)),
            _ => None,
        };
        let Some(Conn::Backend(b)) = self.conn_take(key) else { return };
        conn::remove(&self.epoll, &b.stream);
        self.kq_backend_counted(b.pool, b.row);
        self.backend_row_free(b.row);
        let pool = b.pool;
        if let Some(p) = self.pools.get_mut(pool) {
            p.backends = p.backends.saturating_sub(1);
            p.parked.retain(|&k| k != key);
            p.attached.retain(|&k| k != key);
            if b.release_requested {
                p.release_requested = p.release_requested.saturating_sub(1);
            }
            if b.own {
                p.sessions = p.sessions.saturating_sub(1);
            }
            if matches!(b.phase, BPhase::Login) {
                if b.own {
                    p.sessions_starting = p.sessions_starting.saturating_sub(1);
                } else {
                    p.starting = p.starting.saturating_sub(1);
                }
            }
        }
        if self.pool_dedicated_stale(pool, b.dedicated) {
            self.pool_dedicated_refresh(pool);
        }
        if let Some(ck) = b.pinned_to {
            if let Some(c) = self.client(ck) {
                c.pinned = None;
                // Reserved for this client (session or dedicated mode) but
                // parked between its transactions (hold_idle_clients off):
                // its session ended with the backend, as a direct client's
                // ends with its process. It must not carry on, unknowing,
                // on another backend with its session state lost; it is
                // told the backend's FATAL when it sent one (terminated:
                // 57P01), else its connection closes.
                // Also when the pooler had just handed it the client's next
                // query and it ended before taking it (unserved): the
                // client must not be put back in line for another backend.
                let untouched = matches!(b.phase, BPhase::Parked { .. }) && !matches!(c.phase, super::client::Phase::Attached { .. });
                let handed = unserved.is_some() && matches!(b.phase, BPhase::Attached { client } if client == ck);
                if untouched || handed {
                    if handed {
                        // Never touched by it: no longer on it (a FATAL is
                        // never written into a socket counted as a backend's).
                        c.phase = super::client::Phase::Idle;
                    }
                    match login_failure.as_ref().or(b.last_fatal.as_deref()) {
                        Some(f) => self.client_fatal_fields(ck, f),
                        None => self.client_close(ck),
                    }
                }
            }
        }
        match b.phase {
            // Even if it said why (a FATAL while parked: terminated, or
            // EMFILE), which was not about that client; unless it was
            // terminated for that client (kill_client): then as below.
            BPhase::Attached { client } if unserved.is_some_and(|h| !h.plain || self.plain_requeue(&login_failure)) && !b.terminating => {
                if let Some(h) = unserved {
                    self.client_requeue_handed(client, key, h);
                }
            }
            BPhase::Attached { client } => {
                // Only the client this backend serves: its slab key may be
                // another client's by now if some path forgot to update this
                // backend's phase, and closing that one would end a live
                // session without a word.
                if let Some(c) = self.client(client) {
                    if c.id != b.last_client || !matches!(c.phase, super::client::Phase::Attached { backend } if backend == key) {
                        log::warn!(
                            "backend {} ended while counted as serving client {}, whose slot holds client {}, not attached to it: left as it is",
                            b.pid,
                            b.last_client,
                            c.id
                        );
                    } else {
                        // The backend wrote its own FATAL (if any) to the
                        // client; one it sent the pooler instead (`fatal`)
                        // is passed on.
                        c.phase = super::client::Phase::Closing { since: std::time::Instant::now() };
                        c.outbuf.clear();
                        match login_failure {
                            Some(f) => self.client_fatal_fields(client, &f),
                            None => self.client_close(client),
                        }
                    }
                }
            }
            BPhase::Login if b.own => {
                // As a direct login: the client it was for gets the server's
                // error (CONNECTION LIMIT, max_connections, pg_hba.conf).
                if let Some(f) = login_failure {
                    self.own_login_failed(pool, f);
                }
            }
            BPhase::Login => {
                if let Some(f) = login_failure {
                    self.pool_login_failed(pool, f);
                }
            }
            BPhase::Parked { .. } => {}
        }
        self.pool_maybe_grow(pool);
        self.kq_unserved_take_back(pool);
        self.sync_pool(pool);
    }

    /// May the client of a plain ATTACH that its backend never claimed wait
    /// for another backend? Only when that backend was terminated (57P01:
    /// `pg_terminate_backend`, or a FATAL-less exit) while the server is not
    /// stopping. Any other FATAL may have been caused by the ATTACH itself
    /// (its socket not received for the open files limit, a message it
    /// could not parse), which the next backend would meet too: the client
    /// gets it, as before plain ATTACHes carried a ticket.
    fn plain_requeue(&self, f: &Option<ErrorFields>) -> bool {
        !self.stopping && f.as_ref().is_none_or(|f| f.sqlstate == "57P01")
    }

    /// A pool login failed. If the pool has no backend at all, the clients
    /// waiting on it get the error (with the pg_hba.conf fix when it is an
    /// authentication failure); otherwise they wait for the live backends.
    pub fn pool_login_failed(&mut self, pool: usize, mut f: ErrorFields) {
        // The hint is for pg_hba.conf refusing the pool's local login, not
        // for what ALTER ROLE or DROP ROLE changed (the server's own words
        // say that already).
        let role_state = f.message.ends_with("is not permitted to log in") || f.message.ends_with("does not exist");
        // A pool that logged in before and now fails the password check:
        // the role's password changed (or expired) since, not pg_hba.conf.
        let logged_in_before = self.pools.get(pool).is_some_and(|p| p.params.is_some());
        if f.sqlstate == "28P01" && f.hint.is_none() && logged_in_before {
            f.hint = Some(PASSWORD_CHANGED_HINT.into());
        }
        if matches!(f.sqlstate.as_str(), "28000" | "28P01") && f.hint.is_none() && !role_state {
            f.hint = Some(HBA_HINT.into());
        }
        if super::limits::is_slot_shortage(&f) {
            // No connection slot: back off, one log line per episode.
            return self.pool_out_of_slots(pool, Some(f));
        }
        // Its clients share the backends it has meanwhile; without a pause
        // the next login would start as this one's process exits.
        let retry = self
            .pools
            .get_mut(pool)
            .filter(|p| p.logged_in_shared_backends() > 0)
            .map(|p| p.login_failed_while_shared(Instant::now()));
        if retry.is_none() && f.sqlstate == "53300" {
            // A role or database CONNECTION LIMIT with no backend: no
            // retry loop either (its waiting clients get the refusal).
            if let Some(p) = self.pools.get_mut(pool) {
                p.login_backoff_until = Some(Instant::now() + super::limits::SLOT_BACKOFF);
            }
        }
        let Some(p) = self.pools.get(pool) else { return };
        let mut msg = format!(
            "nextgres: pool login for role \"{}\" to database \"{}\" failed: {} {}",
            p.role, p.database, f.sqlstate, f.message
        );
        if let Some(d) = retry {
            msg.push_str(&format!(
                "; its clients share the {} backend(s) it has, and it tries again in {:.1} s",
                p.logged_in_shared_backends(),
                d.as_secs_f64()
            ));
        }
        // The hint (the pg_hba.conf fix) goes to the server log too.
        let mut report = pgrx::pg_sys::panic::ErrorReport::new(pgrx::PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE, msg, "nextgres");
        if let Some(h) = &f.hint {
            report = report.set_hint(h.clone());
        }
        report.report(pgrx::PgLogLevel::WARNING);
        self.pool_fail_clients(pool, f);
    }

    /// Remembers a pool login failure; if the pool has no shared backend
    /// (none, or only pinned clients' dedicated ones), its waiting clients
    /// get the error.
    pub fn pool_fail_clients(&mut self, pool: usize, f: ErrorFields) {
        let Some(p) = self.pools.get_mut(pool) else { return };
        p.last_login_error = Some((f.clone(), Instant::now()));
        // Dedicated backends serve only their pinned clients. A login
        // still under way may succeed: the clients wait for it (no new
        // login starts meanwhile: `recent_failure`).
        if p.shared_backends() > 0 {
            return;
        }
        // Clients in its kernel queue would wait there for no backend: the
        // pooler's again, they get the error with their next message
        // (`recent_failure`, the queue stays closed meanwhile).
        self.kq_take_back_all(Some(pool));
        let Some(p) = self.pools.get_mut(pool) else { return };
        let victims: Vec<usize> = p.waiting.drain(..).chain(p.login_pending.drain(..)).collect();
        for ck in victims {
            self.client_fatal_fields(ck, &f);
        }
        self.sync_pool(pool);
    }

    /// A login for a dedicated-mode client failed: the oldest such client
    /// waiting gets the error (logged as for any pool login).
    fn own_login_failed(&mut self, pool: usize, f: ErrorFields) {
        let Some(p) = self.pools.get_mut(pool) else { return };
        let victim = p.session_waiting.pop_front();
        let msg = format!(
            "nextgres: login of a dedicated session for role \"{}\" to database \"{}\" failed: {} {}",
            p.role, p.database, f.sqlstate, f.message
        );
        pgrx::pg_sys::panic::ErrorReport::new(pgrx::PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE, msg, "nextgres").report(pgrx::PgLogLevel::WARNING);
        if let Some(ck) = victim {
            self.client_fatal_fields(ck, &f);
        }
        self.sync_pool(pool);
    }

    /// Session mode: the client left; its backend serves the next one
    /// (dedicated mode: it closes, `backend_available`).
    pub fn backend_unpin(&mut self, key: usize) {
        let Some(b) = self.backend(key) else { return };
        b.pinned_to = None;
        if matches!(b.phase, BPhase::Parked { .. }) {
            self.backend_available(key);
        }
    }

    /// Clients wait and no backend is parked: ask backends that keep an idle
    /// client (or are finishing a transaction) to give it back, one per
    /// waiting client. A backend that keeps a client only while nobody waits
    /// wakes on SIGUSR1 (its latch) and finds the request on its control socket.
    pub fn pool_request_releases(&mut self, pool: usize) {
        let Some(p) = self.pools.get(pool) else { return };
        let mut need = p.waiting.len().saturating_sub(p.release_requested + p.starting);
        let candidates = p.attached.clone();
        for bk in candidates {
            if need == 0 {
                break;
            }
            if self.backend_request_release(bk, false) {
                need -= 1;
            }
        }
    }

    /// Asks one attached backend to give its client back at its next
    /// ReadyForQuery(I), unless it is pinned or already asked. Unless
    /// `force`, only a backend keeping an idle client is asked: one inside a
    /// transaction sees the waiting count itself when it ends.
    pub fn backend_request_release(&mut self, bk: usize, force: bool) -> bool {
        let row = match self.conns.get(bk) {
            Some(Conn::Backend(b)) => b.row,
            _ => return false,
        };
        // A client kept for its sequence values (Pin::Sequence) yields to
        // waiters after nextgres.sequence_hold, so it is asked like any other.
        let pin = self.tables.backend_pin(row);
        let pinned = pin != crate::pg::session::Pin::None as u8 && !crate::pg::session::Pin::is_short(pin);
        let lingering = self.tables.backend_lingering(row);
        let Some(b) = self.backend(bk) else { return false };
        if b.release_requested || b.pinned_to.is_some() || pinned || !(lingering || force) {
            return false;
        }
        let mut msg = Vec::with_capacity(5);
        control::write_release_request(&mut msg);
        if b.stream.write_all(&msg).is_err() {
            return false;
        }
        b.release_requested = true;
        if b.pid > 0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(b.pid), nix::sys::signal::Signal::SIGUSR1);
        }
        let pool = b.pool;
        self.pools[pool].release_requested += 1;
        true
    }

    /// Closing the control socket makes a parked backend exit. One lent to
    /// a kernel queue may be serving a queued client: recalled first, it
    /// closes once it says it is parked (`kq`).
    pub fn backend_close(&mut self, key: usize) {
        if self.kq_defer_close(key) {
            return;
        }
        self.closing_note(key);
        self.backend_gone(key, None);
    }
}

/// Signals a pooled backend as the server signals one (a cancel: postmaster
/// signal_child / 18's SendCancelRequest; a termination:
/// pg_signal_backend): its whole process group, so that a program it runs
/// (`COPY ... PROGRAM`, an untrusted language's child) gets it too; its
/// process alone when it leads no group.
pub fn signal_backend(pid: i32, sig: nix::sys::signal::Signal) {
    use nix::unistd::Pid;
    if pid <= 0 {
        return;
    }
    if nix::sys::signal::kill(Pid::from_raw(-pid), sig).is_err() {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
    }
}

/// The fix for a role with an MD5-stored password under a scram-sha-256
/// `local` line (see `answer_auth_request`).
const MD5_SECRET_HINT: &str = "Put \"local all ROLE md5\" (and \"local replication ROLE md5\" for its physical replication connections) \
before the scram-sha-256 lines in pg_hba.conf (md5 lines also accept SCRAM secrets), \
or set the role's password again with password_encryption = scram-sha-256.";

/// The pooler's answer to an authentication request of a login it makes
/// (a pool login, or a replication client's dedicated walsender login),
/// written to `out`, with the credential a client proved. Some(error) when
/// it cannot answer (the error carries the pg_hba.conf fix as its hint).
pub fn answer_auth_request(
    req: AuthRequest,
    cred: Option<Credential>,
    scram: &mut Option<ScramClient>,
    out: &mut Vec<u8>,
) -> Option<ErrorFields> {
    let refused = |what: &str| login_error("28000", format!("nextgres: the pool login was asked for {what}, which nextgres cannot answer for this role"), Some(HBA_HINT));
    match (req, cred) {
        (AuthRequest::Ok, _) => None,
        (AuthRequest::Md5 { salt }, Some(Credential::Md5(h))) => {
            proto::password_message(out, &auth::md5_client_response_from_hash(&h, salt));
            None
        }
        (AuthRequest::Sasl { mechanisms }, Some(Credential::Scram { client_key, server_key }))
            if mechanisms.contains(&auth::SCRAM_SHA_256) =>
        {
            let mut nonce = [0u8; 18];
            crate::pg::shmem::strong_random(&mut nonce);
            let mut client = ScramClient::new(ClientCredential::ClientKey { client_key, server_key }, &nonce);
            proto::sasl_initial_response(out, auth::SCRAM_SHA_256, &client.client_first());
            *scram = Some(client);
            None
        }
        (AuthRequest::SaslContinue(data), _) => match scram.as_mut().map(|c| c.server_first(data)) {
            Some(Ok(fin)) => {
                proto::sasl_response(out, &fin);
                None
            }
            _ => Some(login_error("28000", "nextgres: SCRAM exchange with the server failed".into(), None)),
        },
        (AuthRequest::SaslFinal(data), _) => match scram.take().map(|mut c| c.server_final(data)) {
            Some(Ok(())) => None,
            _ => Some(login_error("28000", "nextgres: the server's SCRAM signature did not verify".into(), None)),
        },
        // The role's clients proved an md5 secret (an md5 line over a
        // password stored as MD5), and the local line asks for SCRAM, which
        // never accepts one: the server's CheckPWChallengeAuth() refuses
        // such a login too (28P01, after a mock exchange).
        (AuthRequest::Sasl { .. }, Some(Credential::Md5(_))) => Some(login_error(
            "28P01",
            "nextgres: the pool login was asked for a SCRAM password, but the role's clients proved a password stored as an MD5 hash, which scram-sha-256 never accepts".into(),
            Some(MD5_SECRET_HINT),
        )),
        (AuthRequest::Md5 { .. }, _) => Some(refused("an md5 password")),
        (AuthRequest::Sasl { .. }, _) => Some(refused("a SCRAM password (no client of this role has authenticated with a password since the pooler started)")),
        (AuthRequest::Cleartext, _) => Some(refused("a cleartext password")),
        (AuthRequest::Other(code), _) => Some(refused(&format!("authentication request {code}"))),
    }
}
