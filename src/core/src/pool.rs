//! One pool per (database, role): its parked backends, the clients waiting
//! for one, what the pool logs in with, and the session values new clients
//! are told about.
#![allow(missing_docs)] // field-level docs would only repeat the module docs
use crate::proto::ErrorFields;
use std::collections::VecDeque;
use std::time::Instant;

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
    /// Clients waiting for a backend, oldest first.
    pub waiting: VecDeque<usize>,
    /// Clients authenticated before the pool knew its session values.
    pub login_pending: Vec<usize>,
    /// Backends in any state, including logging in.
    pub backends: usize,
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
    pub last_login_error: Option<(ErrorFields, Instant)>,
    pub xacts: i64,
    pub waits: i64,
    pub wait_us: i64,
    pub max_wait_us: i64,
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
            login_pending: Vec::new(),
            backends: 0,
            starting: 0,
            clients: 0,
            credential: None,
            params: None,
            close_when_idle: false,
            draining: false,
            last_login_error: None,
            xacts: 0,
            waits: 0,
            wait_us: 0,
            max_wait_us: 0,
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

    /// Should another backend log in? Only while clients wait that the
    /// backends already starting will not serve, and the pool has room.
    pub fn wants_backend(&self, pool_size: usize) -> bool {
        let demand = self.waiting.len() + usize::from(self.params.is_none() && !self.login_pending.is_empty());
        !self.draining && self.backends < pool_size && demand > self.starting
    }

    pub fn record_wait(&mut self, since: Instant) {
        let us = since.elapsed().as_micros() as i64;
        self.waits += 1;
        self.wait_us += us;
        self.max_wait_us = self.max_wait_us.max(us);
    }
}

/// The time slice a pooled backend gives its client while `waiting` clients
/// of the pool wait for one of its `backends`. Backends take turns, so a
/// waiting client waits about `waiting / backends` slices: with more waiting
/// clients than backends the slice shrinks in proportion, which keeps that
/// wait near one full `slice` (the tail latency a saturated pool adds)
/// instead of growing with the queue. A deep queue thus degrades to one
/// handoff per transaction, which is what a FIFO pooler does anyway.
pub fn fair_slice(slice: std::time::Duration, waiting: i32, backends: i32) -> std::time::Duration {
    if waiting <= backends || backends <= 0 {
        return slice;
    }
    slice * backends as u32 / waiting as u32
}

#[cfg(test)]
mod tests {
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
    }

    #[test]
    fn fair_slice_bounds_the_wait_of_a_deep_queue() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        // Fewer waiting clients than backends: the whole slice.
        assert_eq!(fair_slice(ms(2), 3, 16), ms(2));
        assert_eq!(fair_slice(ms(2), 16, 16), ms(2));
        // 84 waiting on 16 backends: each waits ~84/16 slices of 2*16/84 ms = 2 ms.
        let s = fair_slice(ms(2), 84, 16);
        assert_eq!(s, Duration::from_nanos(2_000_000 * 16 / 84));
        assert!((s * 84 / 16).abs_diff(ms(2)) < Duration::from_micros(1));
        // A deep queue: the slice goes to (nearly) nothing.
        assert!(fair_slice(ms(2), 984, 16) < Duration::from_micros(40));
        // No backend known (racy read): never divide by zero.
        assert_eq!(fair_slice(ms(2), 10, 0), ms(2));
        assert_eq!(fair_slice(ms(0), 100, 16), ms(0));
    }
}
