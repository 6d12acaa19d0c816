//! A pool keeps its last backend while it has clients and a new pool login
//! would fail.
//!
//! Pool logins go through the server's Unix socket with the credential of
//! the client that logged in last (`Pool::credential`). After `ALTER ROLE
//! ... PASSWORD` (or NOLOGIN, or a VALID UNTIL that passed, or `ALTER
//! DATABASE ... ALLOW_CONNECTIONS false`, or a revoked CONNECT privilege)
//! a login with it fails, while a direct session that exists goes on. So before the pooler
//! closes a pool's last logged-in shared backend (idle past
//! idle_backend_timeout, past backend_lifetime, `nextgres.reconnect()`)
//! while the pool has clients, it asks the agent whether a pool login would
//! still succeed (the `local` pg_hba.conf line, the role, its stored
//! secret against the pool's credential). If not, the backend stays: its
//! clients go on as they would directly. It closes as usual once they leave
//! or a login would succeed again (a client logged in with the new
//! password: `client_join_pool` changes the credential and drops the
//! cached answer). Meanwhile the pool starts no login that would fail.
use super::worker::Pooler;
use crate::pg::glue::{HbaMethod, NgLoginInfo};
use nextgres_core::auth::{self, StoredSecret};
use nextgres_core::pool::Credential;
use std::time::{Duration, Instant};

/// How long the agent's "a login would fail" is reused before asking again
/// (a change of the pool's credential asks at once).
const RECHECK: Duration = Duration::from_secs(10);

impl Pooler {
    /// Does backend `key` stay although it is due to close (idle, expired)?
    /// Only the last logged-in shared backend of a pool with clients, when
    /// a new pool login would fail.
    pub fn backend_kept(&mut self, key: usize) -> bool {
        let Some(b) = self.backend(key) else { return false };
        if b.own || b.dedicated || b.pinned_to.is_some() || b.terminating || b.pid <= 0 {
            return false;
        }
        let pool = b.pool;
        let closing = self.kq_closing_count(pool);
        let stopping = self.stopping;
        let Some(p) = self.pools.get_mut(pool) else { return false };
        if p.clients == 0 || p.retired || p.draining || stopping {
            p.keeping_last = false;
            return false;
        }
        if p.logged_in_shared_backends().saturating_sub(closing) > 1 {
            return false;
        }
        let Some(why) = self.pool_login_would_fail(pool) else { return false };
        let p = &mut self.pools[pool];
        if !std::mem::replace(&mut p.keeping_last, true) {
            log::info!(
                "pool for role \"{}\" and database \"{}\" keeps its last backend: a new pool login would fail ({why}); \
                 it closes when its clients leave or a pool login would succeed again",
                p.role,
                p.database
            );
        }
        true
    }

    /// Should the pool start no shared login now? While it keeps its last
    /// backend for a login that would fail (checked again at most every
    /// RECHECK): that login would only fail, each second, with a WARNING.
    /// Its clients share the backend(s) it has.
    pub fn pool_login_futile(&mut self, pool: usize) -> bool {
        match self.pools.get(pool) {
            Some(p) if p.keeping_last && p.clients > 0 && p.logged_in_shared_backends() > 0 => {}
            _ => return false,
        }
        self.pool_login_would_fail(pool).is_some()
    }

    /// Why a pool login of `pool` would fail now, None if it would
    /// succeed (or the agent could not tell). A failure is reused for
    /// RECHECK; a success ends the pool's keeping episode.
    fn pool_login_would_fail(&mut self, pool: usize) -> Option<String> {
        let p = self.pools.get(pool)?;
        if let Some((at, why)) = &p.login_check {
            if at.elapsed() < RECHECK {
                return Some(why.clone());
            }
        }
        let (database, role) = (p.database.clone(), p.role.clone());
        // The pool login's address: the server's Unix socket (`local` lines).
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        addr.ss_family = libc::AF_UNIX as libc::sa_family_t;
        let len = size_of::<libc::sa_family_t>() as u32;
        let why = match super::agent::login_lookup(&database, &role, &addr, len, false, nextgres_core::proto::Replication::None) {
            Ok(info) => login_refusal(&info, self.pools[pool].credential.as_ref()),
            Err(e) => {
                log::debug!("pool login check for role \"{role}\" failed: {}", e.message());
                None
            }
        };
        let p = &mut self.pools[pool];
        match &why {
            Some(w) => p.login_check = Some((Instant::now(), w.clone())),
            None => {
                p.login_check = None;
                p.keeping_last = false;
            }
        }
        why
    }
}

/// Why a pool login as `info`'s role through the Unix socket, answered
/// with `cred`, would fail; None when it would succeed (as far as the
/// catalogs and pg_hba.conf tell: a role or database that no longer exists
/// is the pool's retirement's business, CONNECTION LIMIT the server's).
fn login_refusal(info: &NgLoginInfo, cred: Option<&Credential>) -> Option<String> {
    if !info.role_exists || !info.db_exists {
        return None;
    }
    if !info.role_canlogin {
        return Some("the role is not permitted to log in".into());
    }
    // ALTER DATABASE ... ALLOW_CONNECTIONS false, REVOKE CONNECT: the
    // server's way to drain a database lets its sessions finish.
    if !info.db_allowconn {
        return Some("the database does not accept connections (ALLOW_CONNECTIONS false)".into());
    }
    if !info.db_can_connect {
        return Some("the role has no CONNECT privilege on the database".into());
    }
    match info.method() {
        HbaMethod::Reject | HbaMethod::ImplicitReject => Some("pg_hba.conf rejects it".into()),
        HbaMethod::Password => Some("its pg_hba.conf line asks for a cleartext password".into()),
        HbaMethod::Md5 | HbaMethod::Scram => {
            let Some(secret) = info.secret() else {
                let detail = info.secret_detail();
                return Some(if detail.is_empty() { "the role has no valid password".into() } else { detail.trim_end_matches('.').to_string() });
            };
            let md5_line = matches!(info.method(), HbaMethod::Md5);
            let proves = match (auth::parse_stored_secret(&secret), cred) {
                (StoredSecret::Scram(s), Some(Credential::Scram { server_key, .. })) => s.server_key == *server_key,
                (StoredSecret::Md5(h), Some(Credential::Md5(c))) => md5_line && h == *c,
                _ => false,
            };
            (!proves).then(|| "the role's password changed since its clients logged in".into())
        }
        HbaMethod::Trust | HbaMethod::Cert | HbaMethod::Other => None,
    }
}
