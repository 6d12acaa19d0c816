//! Matching clients with backends and passing the client's socket.
//!
//! A client's socket goes to a parked backend when the client sends a
//! message; the backend gives it back at ReadyForQuery(I) (RELEASED) and the
//! pooler watches it again. In session mode the client keeps the backend
//! reserved between transactions.
use super::backend::BPhase;
use super::client::Phase;
use super::conn::Conn;
use super::worker::Pooler;
use crate::shmem::{BackendState, ClientState};
use nextgres_core::control::{self, Attach, Released};
use nextgres_core::pool::{Credential, Pool};
use nextgres_core::proto::{self, ErrorFields};
use sendfd::SendWithFd;
use std::os::fd::AsRawFd;
use std::time::Instant;

impl Pooler {
    /// After authentication: join the (database, role) pool, then finish the
    /// login once the pool knows its session values.
    pub fn client_join_pool(&mut self, key: usize, cred: Option<Credential>, limited: bool, identity: (u32, u32)) {
        let Some(c) = self.client(key) else { return };
        let name = (c.database.clone(), c.user.clone());
        // A pool of the same names whose role or database is another one
        // now (renamed away, dropped and re-created): its backends are
        // logged in as that other role or database and must serve no one
        // who authenticated as this one.
        // (An oid of 0 is unknown, never a difference.)
        if let Some(&old) = self.pool_by_name.get(&name) {
            let had = self.pools[old].identity;
            if nextgres_core::pool::identities_differ(had, identity) {
                self.pool_retire(old);
            } else if had == (0, 0) {
                self.pools[old].identity = identity;
            }
        }
        let pool = match self.pool_by_name.get(&name) {
            Some(&p) => p,
            None => {
                let row = match self.pool_row_alloc(&name.0, &name.1) {
                    None if self.pool_free_idle() => self.pool_row_alloc(&name.0, &name.1),
                    row => row,
                };
                let Some(row) = row else {
                    return self.client_fatal(
                        key,
                        "53300",
                        "nextgres: too many pools",
                        Some("Each (database, role) pair needs a pool; raise nextgres.max_pools."),
                    );
                };
                let mut new = Pool::new(&name.0, &name.1, row);
                new.draining = self.draining.contains(&name.0);
                new.identity = identity;
                let p = self.pools.insert(new);
                self.pool_by_name.insert(name, p);
                self.pool_conf_init(p);
                p
            }
        };
        let session_mode = self.pool_session_mode(pool);
        let dedicated_mode = self.pool_mode_of(pool) == nextgres_core::poolconf::Mode::Dedicated;
        let known = {
            let p = &mut self.pools[pool];
            if let Some(new) = cred {
                // A client that proved another secret (ALTER ROLE ... PASSWORD):
                // a pool login that failed with the previous key says nothing
                // about this one, so do not answer it with that failure.
                // Nor does a check that a login would fail (`keep`).
                if p.credential.as_ref().is_none_or(|old| !same_secret(old, &new)) {
                    p.last_login_error = None;
                    p.login_check = None;
                    p.login_failures_clear();
                }
                p.credential = Some(new);
            }
            p.close_when_idle = limited;
            p.clients += 1;
            p.params.is_some()
        };
        let failed = recent_failure(&self.pools[pool]);
        let Some(c) = self.client(key) else { return };
        c.pool = Some(pool);
        c.walsender_params = Vec::new(); // pooled: no dedicated login needs them
        c.session_mode = session_mode;
        c.dedicated_mode = dedicated_mode;
        // A pool whose login just failed and that has no backend would fail
        // this client the same way: say so now instead of retrying in a loop.
        if let Some(f) = failed {
            return self.client_fatal_fields(key, &f);
        }
        let Some(c) = self.client(key) else { return };
        if known {
            self.client_login_when_current(key);
        } else {
            c.phase = Phase::LoginPending { since: Instant::now() };
            self.pools[pool].login_pending.push(key);
            self.client_rearm(key);
            self.pool_maybe_grow(pool);
        }
        self.sync_pool(pool);
    }

    /// Takes pool `k` out of use for new clients (`Pool::retired`). Its
    /// backends keep serving the clients it has (they close once the last
    /// one leaves: `client_detach_from_pool`); without clients its parked
    /// backends close now.
    pub fn pool_retire(&mut self, k: usize) {
        let Some(p) = self.pools.get_mut(k) else { return };
        p.retired = true;
        log::info!(
            "pool for role \"{}\" and database \"{}\" retired: that role or database was renamed, dropped or re-created since its backends logged in",
            p.role,
            p.database
        );
        self.pool_forget_name(k);
        // Its backends go on serving its remaining clients (as direct
        // sessions of a renamed role go on); without clients, they close
        // (none is reserved then: a client's reservation ends when it
        // leaves its pool).
        if self.pools[k].clients == 0 {
            self.pool_close_parked(k);
        }
        self.pool_retired_check(k);
        self.sync_pool(k);
    }

    /// A retired pool with no backend left cannot serve its waiting
    /// clients (a login by its names would be the new role's or
    /// database's): they get a FATAL and may reconnect. Nor can a retired
    /// pool serve a dedicated-mode client waiting for a login of its own
    /// beyond those under way (its backends serve their own clients only).
    pub fn pool_retired_check(&mut self, k: usize) {
        let Some(p) = self.pools.get(k) else { return };
        if !p.retired {
            return;
        }
        let waiting: Vec<usize> = if p.backends == 0 {
            p.waiting.iter().chain(p.session_waiting.iter()).chain(p.login_pending.iter()).copied().collect()
        } else if !p.session_waiting.is_empty() {
            // Dedicated-mode clients (whatever the pool's mode is now): only
            // its own logins serve them, oldest first, and a retired pool
            // starts none. Those under way, and own backends that logged
            // in while it was paused (parked until resume), serve the
            // oldest.
            let idle_own = self
                .conns
                .iter()
                .filter(|(_, c)| matches!(c, Conn::Backend(b) if b.pool == k && b.own && b.pinned_to.is_none() && matches!(b.phase, BPhase::Parked { .. })))
                .count();
            p.session_waiting.iter().skip(p.sessions_starting + idle_own).copied().collect()
        } else {
            return;
        };
        let Some(p) = self.pools.get(k) else { return };
        let f = renamed_fatal(&p.role);
        for ck in waiting {
            // Still queued here (telling one may have told the others).
            let queued = self.pools.get(k).is_some_and(|p| p.waiting.contains(&ck) || p.session_waiting.contains(&ck) || p.login_pending.contains(&ck));
            if !queued {
                continue;
            }
            self.client_fatal_fields(ck, &f);
        }
    }

    /// ParameterStatus (the pool's fresh-session values, overridden by the
    /// client's own startup settings), BackendKeyData, ReadyForQuery.
    pub fn client_login_complete(&mut self, key: usize) {
        let Some(c) = self.client(key) else { return };
        let Some(pool) = c.pool else { return };
        let minor = c.proto_minor;
        let own_settings = c.settings.clone();
        let key_len = self.server_proto.cancel_key_len(minor);
        let params = self.login_params_now(pool, &own_settings);
        let (pid, secret) = self.new_cancel_key(key, key_len);
        let Some(c) = self.client(key) else { return };
        let mut out = Vec::new();
        for (name, value) in &params {
            proto::parameter_status(&mut out, name, value);
        }
        proto::backend_key_data_bytes(&mut out, pid, &secret);
        proto::ready_for_query(&mut out, b'I');
        c.cancel = Some((pid, secret));
        c.image.told = told_at_login(&params);
        c.phase = Phase::Idle;
        // What it sent to log in is not counted in bytes_received.
        c.tcp_received = super::conn::tcp_bytes_received(&c.stream);
        c.send(&out);
        self.client_set_state(key, ClientState::Idle, 0);
        self.client_rearm(key);
    }

    /// The ParameterStatus values of a login to pool `pool` now: the names
    /// (and order) its first backend's login reported, with the values a
    /// login would get at this moment (`agent::login_params`, with the
    /// pg_db_role_setting items of the settings reader's last copy). The pool's
    /// backends logged in earlier, and since then an ALTER ROLE/DATABASE ...
    /// SET (`client_encoding`, `TimeZone`, `standard_conforming_strings`),
    /// a reloaded postgresql.conf, an ALTER ROLE ... NOSUPERUSER or a
    /// promotion (`in_hot_standby`) may have changed what a login reports;
    /// a client told a stale client_encoding sends its text in the wrong
    /// one. server_version, server_encoding and integer_datetimes are the
    /// database's and the build's, fixed. The agent not answering (a bug,
    /// LOGged) leaves the backend's values.
    ///
    /// `own`: the client's startup settings, in the order the server applies
    /// them, applied last, so their values come back as the server reports
    /// them (DateStyle merged in order, application_name cut and cleaned, a
    /// time zone's own spelling). A value the agent did not compute with
    /// them is the client's last one as it sent it: client_encoding always
    /// (a client told another encoding than its backend's would misread
    /// every byte), and every one when the agent does not answer. Never
    /// session_authorization: the server checks a startup value but keeps
    /// the login role's name (InitializeSessionUserId sets it from a source
    /// that outranks the client's), and so does the pooler.
    fn login_params_now(&self, pool: usize, own: &[(String, String)]) -> Vec<(String, String)> {
        const FIXED: [&str; 3] = ["server_version", "server_encoding", "integer_datetimes"];
        // Not applied by the agent (see above); a startup role is applied
        // (is_superuser follows it) but has no ParameterStatus.
        const NOT_APPLIED: [&str; 2] = ["client_encoding", "session_authorization"];
        let p = &self.pools[pool];
        let mut params = p.params.clone().unwrap_or_default();
        let role = p.identity.0;
        // Whether a value was computed with the client's settings.
        let mut normalized = vec![false; params.len()];
        let as_sent = |mut params: Vec<(String, String)>, normalized: &[bool]| {
            for ((name, value), done) in params.iter_mut().zip(normalized) {
                if name.eq_ignore_ascii_case("session_authorization") {
                    continue;
                }
                if let Some((_, v)) = own.iter().rev().find(|(n, _)| !done && n.eq_ignore_ascii_case(name)) {
                    *value = v.clone();
                }
            }
            params
        };
        if role == 0 || params.is_empty() {
            return as_sent(params, &normalized);
        }
        // Lowest level first: the agent applies each over the one before.
        let mut settings: Vec<(&str, &str)> = nextgres_core::poolconf::applicable(&self.conf.reported, &p.database, &p.role)
            .into_iter()
            .rev()
            .map(|(_, e)| (e.name.as_str(), e.value.as_str()))
            .collect();
        let applied: Vec<(&str, &str)> =
            own.iter()
                .filter(|(n, _)| !NOT_APPLIED.iter().any(|x| n.eq_ignore_ascii_case(x)))
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
        let pool_level = settings.len();
        settings.extend(applied.iter().copied());
        // client_encoding's default is the database's encoding (a dynamic
        // default the agent, in no database, does not have): the backend's
        // unless a role or database setting names it. Settings a role or
        // database can set keep the backend's values too when the settings
        // copy lacks items that may apply (cut short, or this login's
        // levels marked as not all copied).
        let whole = self.conf.reported_whole && !self.conf.reported_cut.iter().any(|c| c.applies(&p.database, &p.role));
        let asked: Vec<usize> = (0..params.len())
            .filter(|&i| {
                let name = params[i].0.as_str();
                let settable = nextgres_core::poolconf::REPORTED.iter().any(|r| name.eq_ignore_ascii_case(r));
                let by_client = applied.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
                !FIXED.iter().any(|f| name.eq_ignore_ascii_case(f))
                    && (by_client || !settable || whole)
                    && (!name.eq_ignore_ascii_case("client_encoding")
                        || settings[..pool_level].iter().any(|s| s.0.eq_ignore_ascii_case(name)))
            })
            .collect();
        let names: Vec<&str> = asked.iter().map(|&i| params[i].0.as_str()).collect();
        match super::agent::login_params(role, &names, &settings) {
            Ok(values) => {
                for (i, v) in asked.into_iter().zip(values) {
                    params[i].1 = v;
                    normalized[i] = !NOT_APPLIED.iter().any(|x| params[i].0.eq_ignore_ascii_case(x));
                }
            }
            Err(e) => log::warn!("login parameters of role \"{}\" in database \"{}\" not read: {}", p.role, p.database, e.message()),
        }
        as_sent(params, &normalized)
    }

    /// The pool's first backend reported its session values.
    pub fn pool_params_known(&mut self, pool: usize) {
        let pending = std::mem::take(&mut self.pools[pool].login_pending);
        for k in pending {
            self.client_login_when_current(k);
        }
    }

    /// Completes a login whose pool's values are known, once the settings
    /// copy has read what was committed before it (`conf_hold`; meanwhile
    /// it stays LoginPending, outside the pool's `login_pending`).
    fn client_login_when_current(&mut self, key: usize) {
        if !self.conf_hold(key) {
            return self.client_login_complete(key);
        }
        let Some(c) = self.client(key) else { return };
        c.phase = Phase::LoginPending { since: Instant::now() };
        self.client_rearm(key);
    }

    /// An idle client sent something: give it a backend or queue it.
    pub fn client_needs_backend(&mut self, key: usize) {
        let Some(c) = self.client(key) else { return };
        let Some(pool) = c.pool else { return };
        // Into the pool's kernel queue, where a lent backend takes it.
        if self.kq_enqueue(key) {
            return;
        }
        let Some(c) = self.client(key) else { return };
        let (pinned, last, own) = (c.pinned, c.last_backend, c.dedicated_mode);
        if own && pinned.is_none() {
            // Dedicated mode: a backend logged in for this client alone. The
            // one a new pool logged in to learn its session values, if it
            // never served anyone, is taken over instead of left idle.
            if !self.pool_paused(pool) {
                if let Some(b) = self.pool_take_fresh_parked(pool) {
                    return self.handoff(key, b, None);
                }
            }
            let Some(c) = self.client(key) else { return };
            c.phase = Phase::Waiting { since: Instant::now() };
            c.watch_hangup = false;
            self.pools[pool].session_waiting.push_back(key);
            self.client_set_state(key, ClientState::Waiting, 0);
            self.client_rearm(key);
            self.pool_maybe_grow(pool);
            return self.sync_pool(pool);
        }
        if let Some(b) = pinned {
            // Session mode: only this backend may serve the client.
            if matches!(self.backend(b).map(|b| &b.phase), Some(BPhase::Parked { .. })) {
                return self.handoff(key, b, None);
            }
        } else if self.pool_paused(pool) {
            // nextgres.pause(): the client waits for resume.
        } else if let Some(b) = self.pools[pool].take_parked(last) {
            return self.handoff(key, b, None);
        }
        self.client_wait(key, pool, Instant::now());
    }

    /// The client waits for a backend of pool `pool` (since `since`): in
    /// the pool's waiting list, listed as waiting, under
    /// query_wait_timeout, served by the next backend available (a lent
    /// one is recalled for it).
    pub fn client_wait(&mut self, key: usize, pool: usize, since: Instant) {
        let spare = self.kq_idle_lent(pool).is_some();
        let Some(c) = self.client(key) else { return };
        c.waits_for_recall = spare;
        c.phase = Phase::Waiting { since };
        c.watch_hangup = false;
        self.pools[pool].waiting.push_back(key);
        self.client_set_state(key, ClientState::Waiting, 0);
        self.client_rearm(key);
        self.pool_maybe_grow(pool);
        // Before the request: backends read the waiting count from shared memory.
        self.sync_pool(pool);
        self.pool_request_releases(pool);
        self.pool_send_ahead(pool);
        self.kq_recall_for_waiting(pool);
    }

    /// A backend is parked and unreserved: serve the oldest waiting client.
    pub fn backend_available(&mut self, key: usize) {
        let Some(b) = self.backend(key) else { return };
        let pool = b.pool;
        if b.pinned_to.is_some() {
            return;
        }
        if b.terminating {
            // Its SIGTERM is on the way: a client handed to it now would
            // get the FATAL meant for the killed one.
            return self.backend_close(key);
        }
        if b.own {
            // Dedicated mode: its client left; no state reaches anyone else.
            return self.backend_close(key);
        }
        self.pool_reserve_release(pool);
        if self.backend_close_if_surplus(key) {
            return;
        }
        // Past its lifetime, at a transaction boundary: replaced as needed
        // (backend_gone lets the pool log in another for waiting clients).
        // Not the last one of a pool with clients while a new pool login
        // would fail (`keep`).
        if self.backend_expired(key) && !self.backend_kept(key) {
            return self.backend_close(key);
        }
        if self.backend_yield_to_starved(key) {
            return;
        }
        // Draining first: a paused pool's backend must still leave for a
        // DROP DATABASE (pausing before maintenance is common).
        if self.pools[pool].draining {
            return self.backend_close(key);
        }
        if self.pool_paused(pool) {
            self.pools[pool].parked.push(key);
            return self.sync_pool(pool);
        }
        self.pool_recall_stale_ahead(pool, true);
        while let Some(ck) = self.pools[pool].waiting.pop_front() {
            if let Some(c) = self.client(ck) {
                if let Phase::Waiting { since } = c.phase {
                    if c.pinned.is_none() {
                        return self.handoff(ck, key, Some(since));
                    }
                }
            }
        }
        // Nothing to serve: lent to the pool's kernel queue, if it has one.
        if self.kq_lend(key) {
            return self.sync_pool(pool);
        }
        self.pools[pool].parked.push(key);
        self.sync_pool(pool);
    }

    /// Starts pool logins while clients wait that no starting backend serves.
    pub fn pool_maybe_grow(&mut self, pool: usize) {
        if self.pool_paused(pool) {
            return;
        }
        if self.pools.get(pool).is_some_and(|p| p.retired) {
            return self.pool_retired_check(pool);
        }
        self.pool_reserve_check(pool);
        // Keeping its last backend because a login would fail (`keep`): no
        // shared login (its clients share what it has), so none is recalled
        // from a backend it was sent ahead to either.
        let futile = self.pool_login_futile(pool);
        let size = self.pool_size_of(pool);
        // The pool may log in more backends (pool_size raised, reserve
        // engaged, a backend gone): clients sent ahead to busy backends
        // wait in its queue again, where a new backend serves them.
        if !futile && self.pools.get(pool).is_some_and(|p| p.ahead > 0 && p.shared_backends() < size) {
            self.recall_all_ahead(Some(pool));
        }
        if self.pools.get(pool).is_some_and(|p| !p.wants_backend(size)) {
            self.pool_slots_episode_end(pool);
        }
        let min = self.min_pool_size_of(pool);
        let warm = |p: &Pool| {
            // min_pool_size: once the pool has logged in (its session values
            // are known), keep that many logged in, unless its role or
            // database has a CONNECTION LIMIT or the server is stopping.
            p.shared_backends() < min && p.params.is_some() && !p.draining && !p.close_when_idle
        };
        self.pool_grow_own(pool);
        if futile {
            return;
        }
        let stopping = self.stopping;
        // A smart shutdown refuses every login (57P03): a pool with
        // backends lets its clients share them rather than try; one with
        // none tries, so its clients get that refusal.
        while self.pools.get(pool).is_some_and(|p| {
            (p.wants_backend(size) || (!stopping && warm(p)))
                && recent_failure(p).is_none()
                && !(stopping && p.logged_in_shared_backends() > 0)
        }) {
            if !self.pool_login_room(pool) {
                break;
            }
            let before = self.pools[pool].backends;
            self.backend_start(pool);
            if self.pools.get(pool).is_none_or(|p| p.backends == before) {
                break; // the login could not even start
            }
        }
    }

    /// Dedicated mode: starts a login for each client waiting for its own
    /// backend that no login under way serves, while `max_pinned_backends`
    /// (with pinned clients' dedicated backends), max_db_connections and
    /// max_user_connections leave room; the server itself applies
    /// max_connections and CONNECTION LIMIT to the login, as to a direct one.
    fn pool_grow_own(&mut self, pool: usize) {
        loop {
            let Some(p) = self.pools.get(pool) else { return };
            if p.session_waiting.len() <= p.sessions_starting || p.draining {
                return;
            }
            let (held, before) = (p.sessions + p.dedicated, p.sessions_starting);
            let cap = self.own_backends_cap(pool);
            if cap.is_some_and(|c| held >= c) || !self.pool_own_login_room(pool) {
                return;
            }
            self.backend_start_for(pool, true);
            if self.pools.get(pool).is_none_or(|p| p.sessions_starting == before) {
                return; // the login could not even start
            }
        }
    }

    /// The cap on a dedicated-mode pool's own backends (with its pinned
    /// clients' dedicated ones): `max_pinned_backends` when above 0. Its 0
    /// means "pinned backends stay in pool_size", which has no meaning
    /// without pooling, so 0 and -1 both leave dedicated mode uncapped
    /// (the server's max_connections and CONNECTION LIMIT still apply).
    pub fn own_backends_cap(&self, pool: usize) -> Option<usize> {
        self.max_pinned_backends_of(pool).filter(|&c| c > 0)
    }

    /// Takes a parked backend of the pool that never served a client and
    /// makes it a dedicated-mode client's own (outside pool_size from now).
    fn pool_take_fresh_parked(&mut self, pool: usize) -> Option<usize> {
        let p = self.pools.get(pool)?;
        if self.own_backends_cap(pool).is_some_and(|c| p.sessions + p.dedicated >= c) {
            return None;
        }
        let i = p.parked.iter().position(|&k| matches!(self.conns.get(k), Some(Conn::Backend(b)) if b.last_client == 0 && !b.own))?;
        let p = &mut self.pools[pool];
        let bk = p.parked.remove(i);
        p.sessions += 1;
        let b = self.backend(bk)?;
        b.own = true;
        let row = b.row;
        self.backend_row_update(row, |r| r.dedicated = true);
        Some(bk)
    }

    /// Gives a backend logged in for a dedicated-mode client to it.
    pub fn handoff_own(&mut self, ck: usize, bk: usize, since: Instant) {
        self.handoff(ck, bk, Some(since));
    }

    fn handoff(&mut self, ck: usize, bk: usize, waited_since: Option<Instant>) {
        let ticket = self.handoff_ticket(ck, bk, waited_since);
        let ahead = ticket.map(|(h, row)| control::Ahead { ticket: h.ticket, backend_row: row as u32 });
        let Some((msg, fd)) = self.attach_message(ck, bk, ahead, None) else { return };
        if let Some((h, row)) = ticket {
            self.tables.handed_offer(row, h.ticket);
        }
        let Some(b) = self.backend(bk) else { return };
        b.handed = ticket.map(|(h, _)| h);
        let sent = send_all_with_fd(&b.stream, &msg, fd);
        if !sent {
            // The backend died while parked (`backend_gone` takes the
            // ticket back); put the client back in line.
            self.backend_gone(bk, None);
            if let Some(c) = self.client(ck) {
                c.phase = Phase::Idle;
            }
            return self.client_needs_backend(ck);
        }
        self.attached(ck, bk, waited_since);
    }

    /// The ticket of a plain ATTACH of `ck` to the parked backend `bk`
    /// (with the backend's row), for a client whose session no backend
    /// holds (transaction mode, not pinned): should that backend end before
    /// it reads the ATTACH (pg_terminate_backend of a backend that looked
    /// idle), the ticket is still in its row and the client, never touched,
    /// waits for another backend (`backend_gone`) instead of losing its
    /// connection. A pinned, session-mode or dedicated-mode client's session
    /// is that backend's: it ends with it, as a direct one.
    fn handoff_ticket(&mut self, ck: usize, bk: usize, waited_since: Option<Instant>) -> Option<(super::ahead::Handed, usize)> {
        let Some(Conn::Client(c)) = self.conns.get(ck) else { return None };
        if c.pinned.is_some() || c.session_mode || c.dedicated_mode {
            return None;
        }
        let session_counted = c.session_counted;
        let Some(Conn::Backend(b)) = self.conns.get(bk) else { return None };
        if b.own || b.dedicated || b.pinned_to.is_some() {
            return None;
        }
        let row = b.row;
        let since = waited_since.unwrap_or_else(Instant::now);
        let ticket = self.next_ticket();
        Some((super::ahead::Handed { ticket, since, session_counted, plain: true }, row))
    }

    /// The ATTACH for client `ck` on backend `bk` (sent ahead with `ahead`),
    /// and the client's socket. None when either is gone, or the message
    /// would exceed `max` bytes.
    pub fn attach_message(
        &mut self,
        ck: usize,
        bk: usize,
        ahead: Option<control::Ahead>,
        max: Option<usize>,
    ) -> Option<(Vec<u8>, std::os::fd::RawFd)> {
        let Some(Conn::Client(c)) = self.conns.get(ck) else { return None };
        let (client_id, fd) = (c.id, c.stream.as_raw_fd());
        // pg_stat_ssl for the backend's session (set by the relay before
        // any plaintext reached the pooler).
        let tls = c.tls_status();
        let Some(Conn::Backend(b)) = self.conns.get(bk) else { return None };
        // Same client again only if the backend served this client last AND
        // this client was last on this backend: the client may have moved
        // to another backend since (SET, PREPARE there) and come back, while
        // this one still names it as its last client.
        let new_client = b.last_client != client_id || c.last_backend != Some(bk);
        let session_mode = c.session_mode;
        let session_start = !c.session_counted;
        let pool_row = c.pool.and_then(|p| self.pools.get(p)).map(|p| p.row as u32).unwrap_or(0);
        let key_pid = c.key_pid();
        let addr = c.raw_addr();
        let local = self.local_addr(c.local);
        // A backend that served this client last still holds its session.
        // The image (hundreds of statements for some drivers) and the
        // startup settings are written from the client's own, taken and
        // put back, not from a copy (an allocation per setting, per
        // transaction of a saturated pool).
        let (image, settings, authn) = match self.client(ck) {
            Some(c) if new_client => (std::mem::take(&mut c.image), std::mem::take(&mut c.settings), c.authn()),
            _ => Default::default(),
        };
        let attach = Attach {
            client_id,
            flags: if new_client { control::FLAG_NEW_CLIENT } else { 0 }
                | if session_mode { control::FLAG_RESERVED } else { 0 }
                | if crate::settings::HOLD_IDLE_CLIENTS.get() { control::FLAG_HOLD_IDLE } else { 0 }
                | if session_start { control::FLAG_SESSION_START } else { 0 },
            pool_row,
            key_pid,
            addr,
            local,
            settings,
            image,
            authn,
            tls,
            ahead,
        };
        let size = control::attach_size_hint(&attach);
        let fits = max.is_none_or(|m| size <= m);
        let mut msg = Vec::new();
        if fits {
            msg.reserve(size);
            control::write_attach(&mut msg, &attach);
        }
        if new_client {
            if let Some(c) = self.client(ck) {
                c.image = attach.image;
                c.settings = attach.settings;
            }
        }
        fits.then_some((msg, fd))
    }

    /// Client `ck` is on backend `bk` now (its ATTACH was read, or claimed
    /// when sent ahead): the books and the shared rows say so.
    pub fn attached(&mut self, ck: usize, bk: usize, waited_since: Option<Instant>) {
        let Some(Conn::Client(c)) = self.conns.get(ck) else { return };
        let (client_id, row, pool, session_mode) = (c.id, c.row, c.pool, c.session_mode);
        let Some(b) = self.backend(bk) else { return };
        b.phase = BPhase::Attached { client: ck };
        b.attached_at = Instant::now();
        b.last_client = client_id;
        if session_mode {
            b.pinned_to = Some(ck);
        }
        let (bpid, brow) = (b.pid, b.row);
        let Some(c) = self.client(ck) else { return };
        c.phase = Phase::Attached { backend: bk };
        c.last_backend = Some(bk);
        // A wait for the recall of an idle lent backend says nothing of
        // load: marked as one, the backends of a pool with room would stop
        // keeping idle clients (`park::linger`), and a TLS client would go
        // back to the pooler, and to another backend, every transaction.
        let saturated = !std::mem::take(&mut c.waits_for_recall);
        c.session_counted = true;
        if session_mode {
            c.pinned = Some(bk);
        }
        self.client_rearm(ck);
        self.client_set_state(ck, ClientState::Active, bpid);
        let now = crate::pg::shmem::now();
        self.backend_row_update(brow, |r| {
            r.state = BackendState::Attached;
            r.client_row = row as i32;
            r.since = now;
        });
        if let (Some(since), Some(p)) = (waited_since, pool) {
            self.pools[p].record_wait(since);
            if saturated {
                self.pools[p].waited_at = crate::shmem::mono_now();
            }
        }
        if let Some(p) = pool {
            self.pools[p].attached.push(bk);
        }
        if let Some(p) = pool {
            self.sync_pool(p);
        }
    }

    /// RELEASED: the backend flushed ReadyForQuery(I) and gave the socket back.
    pub fn backend_released(&mut self, bk: usize, r: Released) {
        let client_id = r.client_id;
        let mut killed_client = None;
        let mut look_again = false;
        let Some(b) = self.backend(bk) else { return };
        let BPhase::Attached { client: ck } = b.phase else { return };
        b.phase = BPhase::Parked { since: Instant::now() };
        b.xacts += 1;
        let requested = std::mem::take(&mut b.release_requested);
        let was_dedicated = std::mem::take(&mut b.dedicated);
        let attached_us = b.attached_at.elapsed().as_micros().min(i64::MAX as u128) as i64;
        let (brow, bx, pool) = (b.row, b.xacts, b.pool);
        {
            let p = &mut self.pools[pool];
            p.queries = p.queries.saturating_add(r.queries.min(i64::MAX as u64) as i64);
            p.query_us = p.query_us.saturating_add(r.query_us.min(i64::MAX as u64) as i64);
            p.bytes_sent = p.bytes_sent.saturating_add(r.bytes_sent.min(i64::MAX as u64) as i64);
            p.xact_us = p.xact_us.saturating_add(attached_us);
            p.attached.retain(|&k| k != bk);
            if requested {
                p.release_requested = p.release_requested.saturating_sub(1);
            }
        }
        if was_dedicated {
            self.backend_row_update(brow, |r| r.dedicated = false);
        }
        if self.pool_dedicated_stale(pool, was_dedicated) {
            // Its client unpinned or left: the backend is the pool's again
            // (or closes as surplus in backend_available), and a pinned
            // backend beyond max_pinned_backends may take its place.
            self.pool_dedicated_refresh(pool);
        }
        let now = crate::pg::shmem::now();
        self.backend_row_update(brow, |r| {
            r.state = BackendState::Parked;
            r.client_row = -1;
            r.xacts = bx;
            r.since = now;
        });
        self.pools[pool].xacts += 1;
        if self.client(ck).is_some_and(|c| c.id == client_id) {
            self.client_received_later(ck);
        }
        if let Some(c) = self.client(ck) {
            if c.id == client_id {
                if let Some(settings) = r.settings {
                    c.image.settings = settings;
                }
                if let Some(statements) = r.statements {
                    c.image.statements = statements;
                }
                if let Some(defaults) = r.defaults {
                    c.image.defaults = defaults;
                }
                if let Some(told) = r.told {
                    c.image.told = told;
                }
                c.xacts += 1;
                c.phase = Phase::Idle;
                let killed = c.killed;
                self.client_set_state(ck, ClientState::Idle, 0);
                if killed {
                    killed_client = Some(ck);
                } else {
                    self.client_rearm(ck);
                    look_again = self.client(ck).is_some_and(|c| c.input_seen);
                }
            }
        }
        match self.backend_ahead_settle(bk) {
            // It took the client sent ahead: serving it already.
            Some(next) => {
                let since = match self.client(next).map(|c| &c.phase) {
                    Some(Phase::Ahead { since, .. }) => Some(*since),
                    _ => None,
                };
                self.attached(next, bk, since);
                self.kill_claimed(next, bk);
                // Every backend of a saturated pool may go on like this, so
                // no backend_available() runs: a client sent ahead to a
                // backend in a long transaction moves here.
                self.pool_recall_stale_ahead(pool, false);
            }
            None => {
                self.backend_available(bk);
                // Left parked, it does not look at its slots: clients still
                // there wait in line again.
                if matches!(self.backend(bk), Some(b) if matches!(b.phase, BPhase::Parked { .. }) && b.ahead.first().is_some_and(|a| a.slot)) {
                    self.backend_recall_ahead(bk);
                    // Nothing of them is in its socket: it may be sent
                    // clients ahead again as soon as it serves one.
                    if let Some(b) = self.backend(bk) {
                        b.ahead_blocked = false;
                    }
                }
            }
        }
        self.pool_send_ahead(pool);
        self.sync_pool(pool);
        if look_again {
            // After this backend found its next client or parked: it may
            // take this one again.
            self.client_input_seen(ck, client_id);
        }
        if let Some(ck) = killed_client {
            // Its backend's SIGTERM came after this RELEASED. Told last:
            // telling it may unpin and close this backend (session mode),
            // which must not happen while this function still uses `bk`.
            self.client_fatal(ck, "57P01", "terminating connection due to administrator command", None);
        }
    }
}

impl Pooler {
    /// A client killed (`nextgres.kill_client`) while its backend had
    /// claimed it ahead, RELEASED unread, is that backend's now: its
    /// transaction may be long or its session pinned, so it is not left to
    /// its next RELEASED. With nothing else sent ahead to the backend (taken
    /// back here, so nothing can be claimed while the signal is on its
    /// way), the backend serves this client: SIGTERM, as `kill_one_client`
    /// does for an attached one. One it claimed after it means it is past
    /// this client's transaction: told at that RELEASED, as before.
    fn kill_claimed(&mut self, ck: usize, bk: usize) {
        if !self.client(ck).is_some_and(|c| c.killed) || !self.backend_recall_ahead(bk).is_empty() {
            return;
        }
        if self.backend(bk).is_some_and(|b| b.pid > 0) {
            if let Some(pid) = self.backend_terminate(bk) {
                log::info!("killing a client its backend {pid} had taken ahead: terminating that backend");
            }
        }
    }
}

/// The error of a pool login that failed less than a second ago while the
/// pool had no backend: clients arriving meanwhile get it at once, so a
/// misconfigured pg_hba.conf does not become a login storm.
pub(super) fn recent_failure(p: &Pool) -> Option<nextgres_core::proto::ErrorFields> {
    p.last_login_error
        .as_ref()
        .filter(|(_, at)| p.logged_in_shared_backends() == 0 && at.elapsed().as_millis() <= 1000)
        .map(|(f, _)| f.clone())
}

/// Do two credentials come from the same stored secret? (A SCRAM secret is
/// identified by its ServerKey, which a new password's fresh salt changes.)
fn same_secret(a: &Credential, b: &Credential) -> bool {
    match (a, b) {
        (Credential::Scram { server_key: x, .. }, Credential::Scram { server_key: y, .. }) => x == y,
        (Credential::Md5(x), Credential::Md5(y)) => x == y,
        _ => false,
    }
}

/// Sends an ATTACH with the client's fd. Control messages are small and the
/// socket is idle, so a short blocking retry is enough for partial sends.
pub fn send_all_with_fd(stream: &std::os::unix::net::UnixStream, msg: &[u8], fd: i32) -> bool {
    let mut sent = match stream.send_with_fd(msg, &[fd]) {
        Ok(n) => n,
        Err(_) => return false,
    };
    while sent < msg.len() {
        match std::io::Write::write(&mut &*stream, &msg[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                std::thread::yield_now()
            }
            Err(_) => return false,
        }
    }
    true
}

/// The FATAL (57P01) for a client whose role or database was renamed or
/// re-created under it before a backend of its own could be logged in: a
/// login by its names would be another role's or database's session.
pub fn renamed_fatal(role: &str) -> ErrorFields {
    super::client::fatal_fields(
        "57P01",
        &format!("terminating connection because role or database of this session was renamed or re-created (role \"{role}\")"),
        Some("Connect again."),
    )
}

/// What a login's ParameterStatus `params` told the client
/// (`nextgres_core::told`). They are sent in the database encoding, as the
/// pooler has them (it has no encoding conversions); a client whose
/// `client_encoding` is another one (neither SQL_ASCII) got a non-ASCII
/// value (a role name in `session_authorization`, a `search_path`) in a form
/// the server would not send it, so that value counts as not told: the
/// first backend the client runs on reports it, converted, before its first
/// ReadyForQuery.
fn told_at_login(params: &[(String, String)]) -> nextgres_core::told::Told {
    let mut told = nextgres_core::told::Told::from_pairs(params);
    let value = |name: &str| params.iter().rev().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    // Spelled as the server reports them (UTF8, LATIN1, SQL_ASCII);
    // loosened as encnames.c compares names, in case.
    let key = |name: &str| {
        let k: String = name.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect();
        if k == "unicode" { "utf8".to_string() } else { k }
    };
    let (client, server) = (key(value("client_encoding").unwrap_or("")), key(value("server_encoding").unwrap_or("")));
    if client != server && client != "sqlascii" && server != "sqlascii" {
        for (name, _) in params.iter().filter(|(_, v)| !v.is_ascii()) {
            told.mark_untold(name);
        }
    }
    told
}
