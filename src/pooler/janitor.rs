//! Periodic upkeep, once per loop turn (at least every TICK_MS): clients that
//! waited too long for a backend or never finished authenticating, and parked
//! backends unused for too long.
use super::backend::BPhase;
use super::client::Phase;
use super::conn::Conn;
use super::worker::Pooler;
use crate::settings::{IDLE_BACKEND_TIMEOUT, QUERY_WAIT_TIMEOUT};
use std::time::{Duration, Instant};

pub const TICK_MS: i64 = 1000;

impl Pooler {
    pub fn janitor(&mut self) {
        let now = Instant::now();
        if self.last_janitor.is_some_and(|t| now.duration_since(t) < Duration::from_millis(TICK_MS as u64)) {
            return;
        }
        self.last_janitor = Some(now);
        let wait_limit = secs(QUERY_WAIT_TIMEOUT.get());
        let idle_limit = secs(IDLE_BACKEND_TIMEOUT.get());
        let auth_limit = secs(unsafe { pgrx::pg_sys::AuthenticationTimeout });
        let mut expired_wait = Vec::new();
        let mut expired_auth = Vec::new();
        let mut idle_backends = Vec::new();
        for (k, conn) in self.conns.iter() {
            match conn {
                Conn::Client(c) => match c.phase {
                    Phase::Waiting { since } | Phase::LoginPending { since } => {
                        if wait_limit.is_some_and(|l| now.duration_since(since) > l) {
                            expired_wait.push(k);
                        }
                    }
                    Phase::Startup | Phase::Auth(_) => {
                        if auth_limit.is_some_and(|l| now.duration_since(c.started) > l) {
                            expired_auth.push(k);
                        }
                    }
                    _ => {}
                },
                Conn::Backend(b) => {
                    if let BPhase::Parked { since } = b.phase {
                        if b.pinned_to.is_none() && idle_limit.is_some_and(|l| now.duration_since(since) > l) {
                            idle_backends.push(k);
                        }
                    }
                }
                Conn::Listener(_) => {}
            }
        }
        for k in expired_wait {
            let t = QUERY_WAIT_TIMEOUT.get();
            self.client_fatal(
                k,
                "53400",
                &format!("nextgres: no backend became free within nextgres.query_wait_timeout ({t}s)"),
                Some("Raise nextgres.pool_size or nextgres.query_wait_timeout, or shorten transactions."),
            );
        }
        for k in expired_auth {
            // As the server: a client that does not finish authenticating in
            // authentication_timeout is dropped.
            self.client_close(k);
        }
        for k in idle_backends {
            self.backend_close(k);
        }
    }
}

fn secs(s: i32) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s as u64))
}
