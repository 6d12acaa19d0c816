//! Dedicated sessions for replication clients (`replication=true|on|yes|1`
//! physical, `replication=database` logical): once the pooler has
//! authenticated the client (pg_hba.conf decided as the server decides for a
//! walsender, `glue.c ng_login_lookup`), it logs in one new backend through
//! the Unix socket as the client's role with the client's `replication` value
//! and startup settings (application_name: pg_stat_replication and
//! synchronous_standby_names), so the server makes it a walsender and gives
//! its own answers to everything after authentication (role, database,
//! REPLICATION attribute, max_wal_senders). The login is a pool login in all
//! but its parameters: same token option (checked with SO_PEERCRED), the
//! credential the client proved. When it is ready, the pooler sends the
//! client the login's ParameterStatus, BackendKeyData and ReadyForQuery, and
//! passes the client's socket with an ATTACH marked `FLAG_DEDICATED`: the
//! walsender keeps that socket for its whole life and stops being a pooled
//! backend (`backend::park`); the pooler forgets both. Never part of a pool,
//! never reused: when the client leaves, the walsender exits as a direct
//! one does.
//!
//! The same login serves a plaintext TCP client whose pg_hba.conf line has
//! a method the pooler does not implement (ident, gss, sspi, pam, ldap,
//! radius, bsd): `server_auth` adds `nextgres.server_auth` and sends no
//! credential, so the DBA's opt-in Unix-socket line for the pooler's OS
//! user (README) must let it in without a secret. In the login's
//! ClientAuthentication_hook the backend asks for the client's socket
//! (SOCKET_REQUEST, with its pid and cancel key), the pooler answers with
//! the fd and forgets both, and the server authenticates the client itself
//! (backend/login.rs): every method answers exactly as on a direct
//! connection, and everything after it goes straight to the client.
use super::backend::answer_auth_request;
use super::client::Phase;
use super::conn::{self, Conn, READ};
use super::worker::Pooler;
use nextgres_core::auth::ScramClient;
use nextgres_core::control::{self, Attach};
use nextgres_core::pool::Credential;
use nextgres_core::proto::{self, ErrorFields, Replication};
use nix::sys::epoll::EpollFlags;
use sendfd::SendWithFd;
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// A replication client's walsender while it logs in.
pub struct Dedicated {
    pub stream: UnixStream,
    /// The client's key in the connection table, and its id (a key is
    /// reused once its client is gone; the id never is).
    client: usize,
    client_id: u64,
    /// The role the client authenticated as: the login must be a session
    /// of it (`session_authorization`), else both are closed.
    user: String,
    cred: Option<Credential>,
    scram: Option<ScramClient>,
    /// The login's ParameterStatus, NoticeResponse and BackendKeyData
    /// messages as the server sent them, in order, replayed to the client.
    replay: Vec<u8>,
    /// The login's `session_authorization` ParameterStatus.
    session_user: Option<String>,
    /// The oids of the role and database the client authenticated as (0:
    /// the server authenticates it; no database for a physical one), and
    /// the login's pid (its BackendKeyData): a login by their names after
    /// a rename is another role's or database's session.
    identity: (u32, u32),
    pid: i32,
    inbuf: Vec<u8>,
    /// The server authenticates the client itself (no credential).
    server_auth: bool,
}

/// Hint for a refused walsender login through the Unix socket.
const REPLICATION_HBA_HINT: &str = "nextgres logs a replication client's walsender in through the server's Unix socket as the client's role. \
Make the first pg_hba.conf \"local replication\" line that matches the client's role use scram-sha-256, md5 or trust \
(for example \"local replication all scram-sha-256\" in place of \"local replication all peer\"), then reload.";

/// Hint for a refused server-authentication login through the Unix socket.
const SERVER_AUTH_HBA_HINT: &str = "For a pg_hba.conf method nextgres does not implement, the server authenticates the client itself, \
in a backend nextgres logs in through the Unix socket as the server's OS user without a password. Add above the other local lines \
\"local all,replication all peer map=nextgres\" and to pg_ident.conf \"nextgres <the server's OS user> all\" (15: one line per role) \
and \"nextgres /^(.*)$ \\1\", then reload.";
/// Hint for a walsender login that asks for a password when the client
/// authenticated without one (a trust line): the pooler has no secret.
const NO_SECRET_HINT: &str = "A client that authenticates without a password (trust) needs a pg_hba.conf line that accepts its walsender login \
through the server's Unix socket without a secret, such as \"local replication all trust\" (logical: a local database line), \
or peer with a map from the server's OS user, above the password lines, then reload.";

fn login_error(message: String) -> ErrorFields {
    ErrorFields { severity: "FATAL".into(), sqlstate: "08006".into(), message, detail: None, hint: None }
}

impl Pooler {
    /// The client authenticated: start its walsender's login. With
    /// `server_auth`, the client has not authenticated: the server will.
    pub fn dedicated_start(&mut self, key: usize, cred: Option<Credential>, server_auth: bool, identity: (u32, u32)) {
        let Some(c) = self.client(key) else { return };
        let repl = match c.replication {
            Replication::Physical => Some("true"),
            Replication::Logical => Some("database"),
            Replication::None if server_auth => None,
            Replication::None => return,
        };
        let (user, database, settings, client_id) = (c.user.clone(), c.database.clone(), c.settings.clone(), c.id);
        let (startup, minor) = (c.walsender_params.clone(), c.proto_minor);
        let token_opt = crate::backend::TOKEN_OPTION.to_str().unwrap_or_default();
        let server_auth_opt = crate::backend::SERVER_AUTH_OPTION.to_str().unwrap_or_default();
        if settings.iter().any(|(n, _)| n.eq_ignore_ascii_case(token_opt) || n.eq_ignore_ascii_case(server_auth_opt)) {
            // What the server's own login hook answers a direct client
            // that sends the pool token (backend/login.rs).
            let f = ErrorFields {
                severity: "FATAL".into(),
                sqlstate: "28000".into(),
                message: "nextgres: invalid pooled-backend login".into(),
                detail: Some("Only the nextgres pooler may use the nextgres.pool_token startup option.".into()),
                hint: None,
            };
            return self.client_fatal_fields(key, &f);
        }
        let mut stream = match UnixStream::connect(&self.server_socket) {
            Ok(s) => s,
            Err(e) => {
                let f = login_error(format!("nextgres: could not connect to the server socket {}: {e}", self.server_socket.display()));
                return self.client_fatal_fields(key, &f);
            }
        };
        // The client's settings the way it sent them (`options` re-encoded
        // with the server's escaping), after the parameters the pooler
        // authenticated: the server reads `user`, `database` and
        // `replication` only as top-level parameters, which `startup` never
        // holds, so `options=-c user=x` gets the server's own FATAL
        // (unrecognized configuration parameter) as on a direct connection.
        let mut params: Vec<(&str, &str)> = vec![("user", &user), ("database", &database)];
        if let Some(repl) = repl {
            params.push(("replication", repl));
        }
        params.extend(startup.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        params.push((token_opt, &self.token_hex));
        if server_auth {
            params.push((server_auth_opt, "1"));
        }
        let mut out = Vec::new();
        // The client's protocol version (3.2 on 18: its 32-byte cancel key).
        proto::startup_message_minor(&mut out, minor, &params);
        // A fresh Unix socket takes a few hundred bytes without blocking.
        if stream.write_all(&out).is_err() || stream.set_nonblocking(true).is_err() {
            return self.client_fatal_fields(key, &login_error("nextgres: could not send the walsender login".into()));
        }
        let d = Dedicated {
            stream,
            client: key,
            client_id,
            user,
            cred,
            scram: None,
            replay: Vec::new(),
            session_user: None,
            identity,
            pid: 0,
            inbuf: Vec::new(),
            server_auth,
        };
        let entry = self.conns.vacant_entry();
        let login = entry.key();
        conn::add(&self.epoll, &d.stream, login, READ);
        entry.insert(Conn::Dedicated(Box::new(d)));
        if let Some(c) = self.client(key) {
            c.phase = Phase::Dedicating { login };
        }
        self.client_rearm(key);
    }

    fn dedicated(&mut self, key: usize) -> Option<&mut Dedicated> {
        match self.conns.get_mut(key) {
            Some(Conn::Dedicated(d)) => Some(d),
            _ => None,
        }
    }

    /// Forgets a walsender login; closing its socket makes its backend exit.
    pub fn dedicated_drop(&mut self, key: usize) {
        if let Some(Conn::Dedicated(d)) = self.conn_take(key) {
            conn::remove(&self.epoll, &d.stream);
        }
    }

    /// The login failed: the client gets the server's error (with the
    /// pg_hba.conf fix when the local login was refused).
    fn dedicated_failed(&mut self, key: usize, mut f: ErrorFields) {
        let client = self.dedicated(key).map(|d| (d.client, d.client_id, d.server_auth));
        self.dedicated_drop(key);
        let role_state = f.message.ends_with("is not permitted to log in") || f.message.ends_with("does not exist");
        let server_auth = client.is_some_and(|c| c.2);
        if server_auth && matches!(f.sqlstate.as_str(), "28000" | "28P01") {
            // Before the hand-over only the pooler's own local login can
            // fail (role and database are checked after authentication).
            f.message = f.message.replace("the walsender login", "the server-authentication login");
            f.hint = Some(SERVER_AUTH_HBA_HINT.into());
        } else if f.hint.is_none() && matches!(f.sqlstate.as_str(), "28000" | "28P01") && !role_state {
            f.hint = Some(REPLICATION_HBA_HINT.into());
        }
        let client = client.map(|c| (c.0, c.1));
        if let Some((ck, id)) = client {
            let Some(c) = self.client(ck).filter(|c| c.id == id) else { return };
            c.phase = Phase::Startup; // not Dedicating any more: nothing to drop again
            self.client_fatal_fields(ck, &f);
        }
    }

    pub fn dedicated_event(&mut self, key: usize, ev: EpollFlags) {
        let Some(d) = self.dedicated(key) else { return };
        let eof = conn::fill_inbuf(&mut d.stream, &mut d.inbuf) || ev.contains(EpollFlags::EPOLLERR);
        loop {
            let Some(d) = self.dedicated(key) else { return };
            // The server's login messages (authentication requests,
            // parameters, errors): 1 MiB is far beyond any of them.
            let (tag, body) = match conn::next_message(&mut d.inbuf, 1 << 20) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return self.dedicated_failed(key, login_error(format!("nextgres: walsender login: {}", e.message))),
            };
            match tag {
                b'R' => {
                    let req = match proto::parse_auth_request(&body) {
                        Ok(r) => r,
                        Err(e) => return self.dedicated_failed(key, e.to_fields("FATAL")),
                    };
                    let mut out = Vec::new();
                    let cred = d.cred.clone();
                    let no_secret = cred.is_none();
                    if let Some(mut f) = answer_auth_request(req, cred, &mut d.scram, &mut out) {
                        // The walsender hint replaces the pool login's,
                        // but for an MD5-stored password (the fix is the same).
                        let hint = f.hint.take().filter(|_| f.message.contains("stored as an MD5 hash"));
                        if no_secret {
                            // The client proved nothing (trust): the pooler
                            // has no secret to give this login.
                            f.message = "nextgres: the walsender login through the Unix socket asks for a password, and this client authenticated without one".into();
                            f.hint = Some(NO_SECRET_HINT.into());
                        } else {
                            f.message = f.message.replace("the pool login", "the walsender login");
                            f.hint = hint;
                        }
                        return self.dedicated_failed(key, f);
                    }
                    if !out.is_empty() && d.stream.write_all(&out).is_err() {
                        return self.dedicated_failed(key, login_error("nextgres: walsender login: the server closed the connection".into()));
                    }
                }
                b'S' | b'N' | b'K' => {
                    if tag == b'S' {
                        if let Ok(("session_authorization", v)) = proto::parse_parameter_status(&body) {
                            d.session_user = Some(v.to_string());
                        }
                    }
                    if tag == b'K' {
                        if let Ok(pid) = proto::backend_key_data_pid(&body) {
                            d.pid = pid;
                        }
                    }
                    d.replay.push(tag);
                    d.replay.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
                    d.replay.extend_from_slice(&body);
                }
                control::SOCKET_REQUEST if d.server_auth => {
                    return match control::parse_socket_request(&body) {
                        Ok(_) => self.dedicated_hand_over(key),
                        Err(e) => self.dedicated_failed(key, login_error(format!("nextgres: server-authentication login: {}", e.message))),
                    };
                }
                // A server-authentication login asks for its socket
                // before it is ready; one that gets ready without asking
                // never authenticated the client (another extension's
                // hook not chaining to ours): refuse.
                b'Z' if d.server_auth => {
                    return self.dedicated_failed(
                        key,
                        login_error("nextgres: server-authentication login: ready before authenticating the client".into()),
                    );
                }
                b'Z' => return self.dedicated_ready(key),
                b'E' => {
                    let f = proto::parse_error_fields(&body).unwrap_or_default();
                    return self.dedicated_failed(key, f);
                }
                _ => {} // NegotiateProtocolVersion: the client got the pooler's
            }
        }
        if eof {
            self.dedicated_failed(key, login_error("nextgres: walsender login: the server closed the connection".into()));
        }
    }

    /// The walsender is ready: tell the client what the server told its
    /// login, then hand it the client's socket and forget both.
    fn dedicated_ready(&mut self, key: usize) {
        let Some(Conn::Dedicated(mut d)) = self.conn_take(key) else { return };
        conn::remove(&self.epoll, &d.stream);
        let ck = d.client;
        let Some(c) = self.client(ck).filter(|c| c.id == d.client_id) else { return };
        // Defence in depth: the walsender must be a session of the role the
        // client authenticated as (the server reports session_authorization
        // at login, GUC_REPORT).
        if d.session_user.as_deref() != Some(d.user.as_str()) {
            log::warn!(
                "walsender login for client {} as role \"{}\" came back as session_authorization {:?}; both closed",
                c.addr, d.user, d.session_user
            );
            drop(d); // its walsender exits with our end closed
            let f = login_error("nextgres: the walsender login is not a session of the client's role".into());
            c.phase = Phase::Startup;
            return self.client_fatal_fields(ck, &f);
        }
        // By names, so after a rename (a new role of the old name) it may
        // be another role's: its PGPROC says which (read by the agent).
        use super::agent::Identity;
        if d.identity != (0, 0) {
            let refusal = match super::agent::backend_identity(d.pid) {
                Identity::Of(role, db) if nextgres_core::pool::identities_differ(d.identity, (role, db)) => {
                    log::warn!(
                        "walsender login (pid {}) for client {} as role \"{}\" found another role or database of those names (oids {role}/{db} instead of {}/{}): renamed, or dropped and re-created, meanwhile; both closed",
                        d.pid, c.addr, d.user, d.identity.0, d.identity.1
                    );
                    Some(super::handoff::renamed_fatal(&d.user))
                }
                // No pid, or it ended since its ReadyForQuery.
                Identity::Gone => Some(login_error("nextgres: walsender login: the server closed the connection".into())),
                // Unchecked is unsafe to hand the client.
                Identity::Unknown => Some(login_error(format!("nextgres: walsender login: its role (pid {}) could not be checked", d.pid))),
                Identity::Of(..) => None,
            };
            if let Some(f) = refusal {
                drop(d); // its walsender exits with our end closed
                c.phase = Phase::Startup;
                return self.client_fatal_fields(ck, &f);
            }
        }
        let mut out = std::mem::take(&mut d.replay);
        proto::ready_for_query(&mut out, b'I');
        c.send(&out);
        self.dedicated_pass_socket(ck, d);
    }

    /// A server-authentication login asks for its client's socket (its pid
    /// and cancel key with it): hand it over and forget both.
    /// (A CancelRequest for it goes to the server's socket, which checks
    /// the pid and key itself: `cancel_request`.)
    fn dedicated_hand_over(&mut self, key: usize) {
        let Some(Conn::Dedicated(d)) = self.conn_take(key) else { return };
        conn::remove(&self.epoll, &d.stream);
        self.dedicated_pass_socket(d.client, d);
    }

    /// Passes the client's socket to its dedicated backend `d` (already out
    /// of the connection table) and forgets the client.
    fn dedicated_pass_socket(&mut self, ck: usize, d: Box<Dedicated>) {
        let local = self.client_local(ck);
        let Some(c) = self.client(ck).filter(|c| c.id == d.client_id) else { return };
        c.phase = Phase::Startup;
        // The backend writes to this socket as soon as it has it: what we
        // queued must be out first (a few hundred bytes; bounded wait).
        if !flush_blocking(c) {
            return self.client_close(ck);
        }
        let attach = Attach {
            client_id: c.id,
            flags: control::FLAG_DEDICATED,
            pool_row: 0,
            key_pid: 0,
            addr: c.raw_addr(),
            local,
            settings: Vec::new(),
            image: Default::default(),
            authn: c.authn(),
            tls: c.tls_status(),
            ahead: None,
        };
        let mut msg = Vec::with_capacity(64);
        control::write_attach(&mut msg, &attach);
        if !send_all_with_fd(&d.stream, &msg, c.stream.as_raw_fd()) {
            return self.client_close(ck);
        }
        drop(d); // our end of the walsender's control socket
        // A CancelRequest with its key to the pooler's port is passed on
        // to the server's socket (`cancel_request`).
        self.client_forget(ck);
    }
}

/// Writes the client's queued bytes, waiting up to 5 s for the socket.
fn flush_blocking(c: &mut super::client::Client) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !c.outbuf.is_empty() {
        if !c.flush() || std::time::Instant::now() > deadline {
            return false;
        }
        if !c.outbuf.is_empty() {
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(c.stream.as_raw_fd()) };
            let _ = nix::poll::poll(&mut [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLOUT)], nix::poll::PollTimeout::from(100u16));
        }
    }
    true
}

/// Sends an ATTACH with the client's fd (small message, idle socket).
fn send_all_with_fd(stream: &UnixStream, msg: &[u8], fd: i32) -> bool {
    let mut sent = match stream.send_with_fd(msg, &[fd]) {
        Ok(n) => n,
        Err(_) => return false,
    };
    while sent < msg.len() {
        match (&*stream).write(&msg[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => std::thread::yield_now(),
            Err(_) => return false,
        }
    }
    true
}
