//! Client authentication in the pooler, by the server's own rules: the hba
//! line for the client's real address, database and role decides the method;
//! pg_authid holds the secret (VALID UNTIL honoured). Supported: trust,
//! reject, password, md5, scram-sha-256, cert, and `clientcert` on any of
//! them (the client certificate rustls verified during the handshake, its
//! name matched through pg_ident.conf by the server's own check_usermap()).
//! A successful exchange also yields
//! what the pool needs to log backends in as that role.
use super::client::Phase;
use super::worker::Pooler;
use crate::pg::glue::{self, HbaMethod, NgLoginInfo};
use nextgres_core::auth::{self, PasswordCheck, ScramServer, StoredSecret};
use nextgres_core::pool::Credential;
use nextgres_core::proto::{self, ErrorFields};

enum State {
    Cleartext,
    /// The password's check runs on a thread (`password.rs`); the guard
    /// stops it when this state goes.
    Checking { id: u64, _cancel: super::password::CancelOnDrop },
    Md5 { salt: [u8; 4] },
    SaslInitial(Box<ScramServer>),
    /// The mechanism is chosen but the SASLInitialResponse carried no
    /// data (length -1): the client-first-message comes in a SASLResponse.
    SaslFirst(Box<ScramServer>),
    SaslFinal(Box<ScramServer>),
    /// Refused; the refusal waits out auth_delay (`auth_delay.rs`), and
    /// the client's input is not read meanwhile.
    Delayed,
}

pub struct AuthSession {
    pub info: Box<NgLoginInfo>,
    state: State,
    /// The client's TLS session; None for plaintext.
    tls: Option<super::tls::Session>,
}

/// The result of one authentication step.
pub enum Step {
    /// Send these bytes and wait for the client's next message.
    Continue(Vec<u8>),
    /// Check this cleartext password on a thread, then go on with
    /// [`AuthSession::check_finished`].
    Check(super::password::PasswordJob),
    /// Authenticated; send these bytes (may be empty) first.
    Done(Vec<u8>, Option<Credential>),
    Fail(ErrorFields),
    /// The method failed (auth.c auth_failed()): the client gets the
    /// fields, the server log also this DETAIL (why, and the matched line).
    Refused(ErrorFields, String),
    /// A method the pooler does not implement, for a plaintext TCP client:
    /// the server authenticates it itself (`dedicated.rs`).
    Server,
}

/// How a password was checked, for the log's DETAIL when it fails.
#[derive(Clone, Copy)]
enum Verify {
    /// Compared with the stored secret (cleartext, or an md5 challenge).
    Compare,
    /// A SCRAM exchange.
    Scram,
}

fn fatal(sqlstate: &str, message: String) -> ErrorFields {
    ErrorFields { severity: "FATAL".into(), sqlstate: sqlstate.into(), message, detail: None, hint: None }
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    crate::pg::shmem::strong_random(&mut b);
    b
}

impl AuthSession {
    /// The identity the server would record for this login (auth.c
    /// `set_authn_id()`): the role name for the password methods, the
    /// certificate's subject DN (RFC 2253, as be-secure-openssl.c prints
    /// `peer_dn`) for `cert`, even on a `clientname=CN` line; none for
    /// `trust`, nor for a DN nextgres cannot print as OpenSSL does.
    pub fn authn(&self, user: &str) -> Option<nextgres_core::control::Authn> {
        use nextgres_core::control::{Authn, AUTHN_CERT, AUTHN_MD5, AUTHN_PASSWORD, AUTHN_SCRAM};
        let (method, id) = match self.info.method() {
            HbaMethod::Password => (AUTHN_PASSWORD, user.as_bytes().to_vec()),
            HbaMethod::Md5 => (AUTHN_MD5, user.as_bytes().to_vec()),
            HbaMethod::Scram => (AUTHN_SCRAM, user.as_bytes().to_vec()),
            HbaMethod::Cert => {
                let der = self.tls.as_ref()?.peer_cert.as_ref()?;
                (AUTHN_CERT, nextgres_core::cert::subject_names(der).ok()?.dn?.into_bytes())
            }
            _ => return None,
        };
        Some(Authn { method, id })
    }

    fn secret(&self) -> StoredSecret {
        match self.info.secret() {
            Some(s) => auth::parse_stored_secret(&s),
            None => StoredSecret::Plain(String::new()),
        }
    }

    /// A password that did not prove the role's secret, as the server
    /// words it: the client gets 28P01; the log's DETAIL says why as the
    /// server's does (crypt.c get_role_password(), plain_crypt_verify(),
    /// md5_crypt_verify(); auth-scram.c scram_init()) and names the line.
    fn password_failed(&self, user: &str, how: Verify) -> Step {
        let why = if !self.info.has_secret {
            self.info.secret_detail()
        } else {
            match how {
                Verify::Compare if matches!(self.secret(), StoredSecret::Plain(_)) => {
                    format!("Password of user \"{user}\" is in unrecognized format.")
                }
                Verify::Compare => format!("Password does not match for user \"{user}\"."),
                Verify::Scram if !matches!(self.secret(), StoredSecret::Scram(_)) => {
                    format!("User \"{user}\" does not have a valid SCRAM secret.")
                }
                Verify::Scram => String::new(),
            }
        };
        let f = fatal("28P01", format!("password authentication failed for user \"{user}\""));
        Step::Refused(f, self.failure_detail(&why))
    }

    /// auth.c auth_failed()'s log DETAIL: `why` (may be empty), then the
    /// matched pg_hba.conf line.
    fn failure_detail(&self, why: &str) -> String {
        let line = self.info.hba_match_detail();
        if why.is_empty() {
            line
        } else {
            format!("{why}\n{line}")
        }
    }

    /// Trust-authenticated clients still give the pool an md5 credential when
    /// pg_authid holds one: that hash is itself what md5 logins prove.
    fn stored_md5_credential(&self) -> Option<Credential> {
        match self.secret() {
            StoredSecret::Md5(h) => Some(Credential::Md5(h)),
            _ => None,
        }
    }

    fn start_scram(&mut self, user: &str, mock_key: &[u8; 32]) -> Step {
        let server = match self.secret() {
            StoredSecret::Scram(s) => ScramServer::new(s, &random::<18>()),
            // No usable SCRAM secret: run a mock exchange that fails at the
            // end, so a probe cannot tell which roles exist; salt and
            // iteration count as the server's mock secret.
            _ => ScramServer::new_mock_keyed(user, mock_key, glue::mock_scram_iterations(), &random::<18>()),
        };
        // On TLS, SCRAM-SHA-256-PLUS with tls-server-end-point binding to
        // the certificate this client was shown (auth-scram.c).
        let server = match self.tls.as_ref().map(|t| t.end_point.as_ref()) {
            Some(Some(h)) => server.with_channel_binding(h.to_vec()),
            Some(None) => server.with_channel_binding_unavailable(),
            None => server,
        };
        let mut out = Vec::new();
        proto::auth_sasl(&mut out, server.mechanisms());
        self.state = State::SaslInitial(Box::new(server));
        Step::Continue(out)
    }

    /// Begins the exchange the hba line asks for.
    /// `tls`: the client's TLS session, None for plaintext (the server's
    /// "SSL encryption" in its hba messages, auth.c ClientAuthentication()).
    /// `walsender`: a physical replication connection, which the server
    /// names so in its hba refusals (auth.c ClientAuthentication()).
    pub fn start(
        info: Box<NgLoginInfo>,
        user: &str,
        database: &str,
        host: &str,
        mock_key: &[u8; 32],
        tls: Option<super::tls::Session>,
        walsender: bool,
    ) -> (Self, Step) {
        let encryption = if tls.is_some() { "SSL encryption" } else { "no encryption" };
        let mut s = AuthSession { info, state: State::Cleartext, tls };
        if s.info.hba_clientcert != 0 {
            // The server checks clientcert before the method (auth.c
            // ClientAuthentication()); rustls has verified a certificate
            // the client sent against ssl_ca_file during the handshake.
            if !s.tls.as_ref().is_some_and(|t| t.ca_loaded) {
                let f = fatal("F0000", "client certificates can only be checked if a root certificate store is available".into());
                return (s, Step::Fail(f));
            }
            if s.tls.as_ref().and_then(|t| t.peer_cert.as_ref()).is_none() {
                return (s, Step::Fail(fatal("28000", "connection requires a valid client certificate".into())));
            }
        }
        let step = match s.info.method() {
            HbaMethod::ImplicitReject if walsender => Step::Fail(fatal(
                "28000",
                format!("no pg_hba.conf entry for replication connection from host \"{host}\", user \"{user}\", {encryption}"),
            )),
            HbaMethod::Reject if walsender => Step::Fail(fatal(
                "28000",
                format!("pg_hba.conf rejects replication connection for host \"{host}\", user \"{user}\", {encryption}"),
            )),
            HbaMethod::ImplicitReject => Step::Fail(fatal(
                "28000",
                format!("no pg_hba.conf entry for host \"{host}\", user \"{user}\", database \"{database}\", {encryption}"),
            )),
            HbaMethod::Reject => Step::Fail(fatal(
                "28000",
                format!("pg_hba.conf rejects connection for host \"{host}\", user \"{user}\", database \"{database}\", {encryption}"),
            )),
            // cert: as trust, then the certificate's name is checked below.
            HbaMethod::Trust | HbaMethod::Cert => Step::Done(Vec::new(), s.stored_md5_credential()),
            HbaMethod::Password => {
                let mut out = Vec::new();
                proto::auth_cleartext(&mut out);
                Step::Continue(out)
            }
            HbaMethod::Md5 => {
                // As the server (CheckPWChallengeAuth): md5 lines challenge
                // with md5 only for an md5 secret. Without a usable secret
                // (unknown role, none set, VALID UNTIL passed) the exchange
                // follows password_encryption, so such roles blend in with
                // the roles that do have one.
                let md5 = if s.info.has_secret {
                    matches!(s.secret(), StoredSecret::Md5(_))
                } else {
                    crate::pg::server::password_encryption_is_md5()
                };
                if !md5 {
                    s.start_scram(user, mock_key)
                } else {
                    let salt = random::<4>();
                    s.state = State::Md5 { salt };
                    let mut out = Vec::new();
                    proto::auth_md5(&mut out, salt);
                    Step::Continue(out)
                }
            }
            HbaMethod::Scram => s.start_scram(user, mock_key),
            HbaMethod::Other if s.tls.is_none() => Step::Server,
            HbaMethod::Other => {
                let mut f = fatal(
                    "28000",
                    format!("authentication method \"{}\" is not supported by nextgres", s.info.method_name()),
                );
                f.hint = Some(format!(
                    "Line {} of \"{}\" applies to this connection; over SSL, nextgres authenticates with scram-sha-256, md5, password, cert, trust or reject (the server itself authenticates other methods for clients without SSL).",
                    s.info.hba_line,
                    s.info.hba_file()
                ));
                Step::Fail(f)
            }
        };
        let step = s.cert_gate(user, step);
        (s, step)
    }

    /// After a successful method: the `cert` method and
    /// `clientcert=verify-full` check the certificate's name (auth.c
    /// ClientAuthentication() and CheckCertAuth()); a mismatch fails with
    /// the method's own message (auth.c auth_failed()).
    fn cert_gate(&self, user: &str, step: Step) -> Step {
        let method = self.info.method();
        if !matches!(step, Step::Done(..)) || !(self.info.hba_clientcert == 2 || method == HbaMethod::Cert) {
            return step;
        }
        if self.cert_name_allowed(user) {
            return step;
        }
        let failed = match method {
            HbaMethod::Cert => fatal("28000", format!("certificate authentication failed for user \"{user}\"")),
            HbaMethod::Trust => fatal("28000", format!("\"trust\" authentication failed for user \"{user}\"")),
            _ => fatal("28P01", format!("password authentication failed for user \"{user}\"")),
        };
        Step::Refused(failed, self.failure_detail(""))
    }

    /// auth.c CheckCertAuth(): the certificate's CN (or DN with
    /// `clientname=DN`) through the line's `map=` (the server's own
    /// check_usermap(), which LOGs a refusal), or equal to the user name
    /// without one.
    fn cert_name_allowed(&self, user: &str) -> bool {
        let Some(der) = self.tls.as_ref().and_then(|t| t.peer_cert.as_ref()) else { return false };
        let names = match nextgres_core::cert::subject_names(der) {
            Ok(n) => n,
            Err(e) => {
                log::info!("certificate authentication failed for user \"{user}\": {e}");
                return false;
            }
        };
        let dn = self.info.hba_clientname_dn;
        if dn && names.dn.is_none() {
            log::info!("certificate authentication failed for user \"{user}\": the certificate's DN has an attribute type nextgres cannot name as OpenSSL does");
            return false;
        }
        if !self.info.usermap().is_empty() && !glue::ident_kept() {
            // hba.c's parsed pg_ident.conf is freed memory in a pooler the
            // fork handler did not run in (glue.c ng_ident_kept()): refused,
            // never read.
            log::warn!(
                "certificate authentication failed for user \"{user}\": map= on line {} of \"{}\" cannot be checked: the postmaster's pg_ident.conf was not kept in the pooler",
                self.info.hba_line,
                self.info.hba_file()
            );
            return false;
        }
        if self.info.hba_usermap_too_long {
            log::info!("certificate authentication failed for user \"{user}\": the pg_hba.conf map name is longer than nextgres supports");
            return false;
        }
        let name = if dn { names.dn.map(String::into_bytes) } else { names.cn };
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            log::info!("certificate authentication failed for user \"{user}\": client certificate contains no user name");
            return false;
        };
        match super::agent::check_usermap(&self.info.usermap(), user, &name) {
            Ok(true) => true,
            Ok(false) => {
                if self.info.hba_clientcert == 2 && self.info.method() != HbaMethod::Cert {
                    let what = if dn { "DN" } else { "CN" };
                    log::info!("certificate validation (clientcert=verify-full) failed for user \"{user}\": {what} mismatch");
                }
                false
            }
            Err(e) => {
                log::warn!("pg_ident.conf check failed: {}", e.message());
                false
            }
        }
    }

    /// The answer of a cleartext password's check (`password.rs`).
    fn password_checked(&self, user: &str, check: Option<PasswordCheck>) -> Step {
        match (check, self.secret()) {
            (Some(PasswordCheck::Scram { client_key }), StoredSecret::Scram(s)) => {
                Step::Done(Vec::new(), Some(Credential::Scram { client_key, server_key: s.server_key }))
            }
            (Some(PasswordCheck::Md5), StoredSecret::Md5(h)) => Step::Done(Vec::new(), Some(Credential::Md5(h))),
            _ => self.password_failed(user, Verify::Compare),
        }
    }

    /// Is the password's check running (`password.rs`)? Meanwhile the
    /// client is watched only for a hang-up: what it sends next waits, as
    /// it waits in the socket while the server's backend checks.
    pub fn is_checking(&self) -> bool {
        matches!(self.state, State::Checking { .. } | State::Delayed)
    }

    /// Refused, the refusal held back for auth_delay: nothing more is read.
    pub fn delayed(&mut self) {
        self.state = State::Delayed;
    }

    /// The password's check is queued as `id`, stopped when `cancel` goes.
    pub fn checking(&mut self, id: u64, cancel: super::password::CancelOnDrop) {
        self.state = State::Checking { id, _cancel: cancel };
    }

    /// Check `id` finished: the next step, or None when this session is not
    /// waiting for it (a connection that took the key of the one that asked).
    pub fn check_finished(&mut self, user: &str, id: u64, check: Option<PasswordCheck>) -> Option<Step> {
        if !matches!(self.state, State::Checking { id: mine, .. } if mine == id) {
            return None;
        }
        self.state = State::Cleartext;
        Some(self.check_answered(user, check))
    }

    /// The step after a cleartext password's check.
    pub fn check_answered(&self, user: &str, check: Option<PasswordCheck>) -> Step {
        let step = self.password_checked(user, check);
        self.cert_gate(user, step)
    }

    /// Handles one client message during the exchange.
    pub fn on_message(&mut self, user: &str, tag: u8, body: &[u8]) -> Step {
        let step = self.exchange(user, tag, body);
        self.cert_gate(user, step)
    }

    /// The client-first-message: the server-first-message goes out.
    fn sasl_first(&mut self, mut server: Box<ScramServer>, data: &[u8]) -> Step {
        match server.client_first(data) {
            Ok(first) => {
                let mut out = Vec::new();
                proto::auth_sasl_continue(&mut out, &first);
                self.state = State::SaslFinal(server);
                Step::Continue(out)
            }
            Err(e) => Step::Fail(scram_error(&e)),
        }
    }

    fn exchange(&mut self, user: &str, tag: u8, body: &[u8]) -> Step {
        if tag != b'p' {
            // auth-sasl.c CheckSASLAuth() words it for SASL, auth.c
            // recv_password_packet() for a password.
            let sasl = matches!(self.state, State::SaslInitial(_) | State::SaslFirst(_) | State::SaslFinal(_));
            let what = if sasl { "SASL" } else { "password" };
            return Step::Fail(fatal("08P01", format!("expected {what} response, got message type {tag}")));
        }
        match std::mem::replace(&mut self.state, State::Cleartext) {
            State::Cleartext => {
                let mut pw = match password_packet(body) {
                    Ok(p) => p,
                    Err(f) => return Step::Fail(f),
                };
                if pw.is_empty() {
                    return Step::Fail(fatal("28P01", "empty password returned by client".into()));
                }
                let secret = self.secret();
                if !self.info.has_secret {
                    auth::scram::zeroize::wipe(&mut pw);
                    return self.password_failed(user, Verify::Compare);
                }
                if auth::password_check_is_slow(&secret) {
                    return Step::Check(super::password::PasswordJob { secret, user: user.to_string(), password: pw });
                }
                let check = auth::check_password(&secret, user, &pw, &|| false);
                auth::scram::zeroize::wipe(&mut pw);
                self.password_checked(user, check)
            }
            // The client wrote again before its password was answered: as
            // the server, which would read this after authentication, where
            // a password message is no valid message.
            State::Checking { .. } | State::Delayed => {
                Step::Fail(fatal("08P01", format!("invalid frontend message type {}", tag)))
            }
            State::Md5 { salt } => {
                let resp = match password_packet(body) {
                    Ok(p) => p,
                    Err(f) => return Step::Fail(f),
                };
                // As for any password message (auth.c recv_password_packet()).
                if resp.is_empty() {
                    return Step::Fail(fatal("28P01", "empty password returned by client".into()));
                }
                match self.secret() {
                    StoredSecret::Md5(h) if self.info.has_secret && auth::verify_md5_response(&h, salt, &resp) => {
                        Step::Done(Vec::new(), Some(Credential::Md5(h)))
                    }
                    _ => self.password_failed(user, Verify::Compare),
                }
            }
            State::SaslInitial(mut server) => {
                let (mech, data) = match proto::parse_sasl_initial_response(body) {
                    Ok(x) => x,
                    Err(e) => return Step::Fail(e.to_fields("FATAL")),
                };
                if let Err(e) = server.select_mechanism(mech) {
                    return Step::Fail(scram_error(&e));
                }
                let Some(data) = data else {
                    // No initial response: an empty challenge, as the
                    // server's scram_exchange() answers NULL input.
                    let mut out = Vec::new();
                    proto::auth_sasl_continue(&mut out, b"");
                    self.state = State::SaslFirst(server);
                    return Step::Continue(out);
                };
                self.sasl_first(server, data)
            }
            State::SaslFirst(server) => self.sasl_first(server, body),
            State::SaslFinal(mut server) => match server.client_final(body) {
                Ok((fin, client_key)) => {
                    let server_key = match self.secret() {
                        StoredSecret::Scram(s) => s.server_key,
                        _ => return self.password_failed(user, Verify::Scram),
                    };
                    let mut out = Vec::new();
                    proto::auth_sasl_final(&mut out, &fin);
                    Step::Done(out, Some(Credential::Scram { client_key, server_key }))
                }
                Err(auth::ScramError::BadProof) => self.password_failed(user, Verify::Scram),
                Err(e) => Step::Fail(scram_error(&e)),
            },
        }
    }
}

/// Custom `prefix.name` settings nobody defined are accepted by the server as
/// placeholders with any value; checking them in the pooler would only grow
/// its own settings table. Everything else is checked.
///
/// `application_name` is not checked either: the server never refuses it
/// (its check hook only replaces non-ASCII bytes), and on PostgreSQL 16.2
/// that hook leaks the value it replaces in GUCMemoryContext
/// (`check_application_name`, commands/variable.c; 15.x and 16.15 do not),
/// about 16 bytes of the pooler per login of a libpq client.
fn needs_validation(name: &str) -> bool {
    if name.eq_ignore_ascii_case("application_name") {
        return false;
    }
    if !name.contains('.') || name.to_ascii_lowercase().starts_with("nextgres.") {
        return true;
    }
    crate::pg::setting(&glue::cstring(name)).is_some()
}

/// A PasswordMessage is exactly one NUL-terminated string, as the server
/// insists: bytes after the NUL are a protocol violation, not ignored. The
/// string is bytes in whatever encoding the client sent (auth.c
/// recv_password_packet() checks no encoding): a Latin-1 password works.
fn password_packet(body: &[u8]) -> Result<Vec<u8>, ErrorFields> {
    match body.iter().position(|&b| b == 0) {
        Some(end) if end + 1 == body.len() => Ok(body[..end].to_vec()),
        Some(_) => Err(fatal("08P01", "invalid password packet size".into())),
        None => Err(fatal("08P01", "invalid string in message".into())),
    }
}

fn scram_error(e: &auth::ScramError) -> ErrorFields {
    let mut f = fatal(e.sqlstate(), e.message());
    f.detail = e.detail();
    f
}

impl Pooler {
    pub fn client_begin_auth(&mut self, key: usize) {
        let local = self.client_local(key);
        let Some(c) = self.client(key) else { return };
        c.log_receipt(&local);
        let raw = c.raw_addr();
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), (&mut storage as *mut libc::sockaddr_storage).cast(), raw.len()) };
        let (user, database, host) = (c.user.clone(), c.database.clone(), c.addr.ip().to_string());
        let replication = c.replication;
        // The server words refusals of physical ones only as replication
        // connections (auth.c: am_walsender && !am_db_walsender).
        let walsender = replication == proto::Replication::Physical;
        // The relay fills this before any plaintext reaches the pooler.
        let tls = c.tls.as_ref().map(|t| t.info.get().cloned().unwrap_or_default());
        let on_tls = tls.is_some();
        if let Some(t) = &tls {
            let row = c.row;
            self.client_row_update(row, |r| {
                r.tls = true;
                crate::shmem::set_name(&mut r.tls_version, &t.status.version);
                crate::shmem::set_name(&mut r.tls_cipher, &t.status.cipher);
                crate::shmem::set_name(&mut r.client_dn, &t.status.client_dn);
            });
        }
        let info = match super::agent::login_lookup(&database, &user, &storage, raw.len() as u32, on_tls, replication) {
            Ok(i) => i,
            Err(e) => {
                log::warn!("authentication lookup failed: {}", e.message());
                return self.client_fatal(key, "XX000", &format!("nextgres: {}", e.message()), None);
            }
        };
        let mock_key = self.mock_key;
        let (session, step) = AuthSession::start(info, &user, &database, &host, &mock_key, tls, walsender);
        if let Some(c) = self.client(key) {
            c.phase = Phase::Auth(Box::new(session));
        }
        self.client_auth_step(key, step);
    }

    pub fn client_auth_input(&mut self, key: usize) {
        loop {
            let Some(c) = self.client(key) else { return };
            if matches!(&c.phase, Phase::Auth(s) if s.is_checking()) {
                return;
            }
            let msg = match c.read_message() {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(_) => return self.client_close(key), // EOF mid-auth: libpq asking for a password
            };
            let user = c.user.clone();
            let Phase::Auth(session) = &mut c.phase else { return };
            let step = session.on_message(&user, msg.0, &msg.1);
            let done = !matches!(step, Step::Continue(_));
            self.client_auth_step(key, step);
            if done {
                return;
            }
        }
    }

    fn client_auth_step(&mut self, key: usize, step: Step) {
        match step {
            Step::Continue(out) => {
                if let Some(c) = self.client(key) {
                    c.send(&out);
                }
            }
            Step::Fail(f) => self.client_login_refused(key, &f, None),
            Step::Refused(f, detail) => self.client_auth_failed(key, f, detail),
            Step::Check(job) => match self.verifier.submit(key, job) {
                Ok((id, cancel)) => {
                    if let Some(Phase::Auth(session)) = self.client(key).map(|c| &mut c.phase) {
                        session.checking(id, cancel);
                    }
                    self.client_rearm(key);
                }
                // No thread: checked on this loop, as before threads.
                Err(check) => {
                    let Some(c) = self.client(key) else { return };
                    let user = c.user.clone();
                    let Phase::Auth(session) = &c.phase else { return };
                    let step = session.check_answered(&user, check);
                    self.client_auth_step(key, step);
                }
            },
            Step::Server => {
                if let Some(c) = self.client(key) {
                    c.phase = Phase::Startup; // drops the lookup (and its secret)
                }
                self.dedicated_start(key, None, true, (0, 0));
            }
            Step::Done(out, cred) => {
                let local = self.client_local(key);
                let Some(c) = self.client(key) else { return };
                let Phase::Auth(session) = std::mem::replace(&mut c.phase, Phase::Startup) else { return };
                let mut bytes = out;
                proto::auth_ok(&mut bytes);
                c.send(&bytes);
                let (user, database) = (c.user.clone(), c.database.clone());
                let settings = c.settings.clone();
                if c.replication != proto::Replication::None {
                    // A walsender of its own: its login (a real backend of
                    // the client's role, with the client's settings) gives
                    // the server's own answers for everything after
                    // authentication (role, database, REPLICATION
                    // attribute, max_wal_senders, settings).
                    c.log_login(&local, &session.info, session.authn(&user));
                    let identity = (session.info.role_oid, session.info.db_oid);
                    drop(session); // wipes the secret
                    return self.dedicated_start(key, cred, false, identity);
                }
                if let Err(f) = self.login_checks(&session.info, &user, &database) {
                    return self.client_login_refused(key, &f, None);
                }
                // As the server: startup settings are checked after the login
                // checks, and a bad one ends the connection.
                for (i, (name, value)) in settings.iter().enumerate() {
                    if !needs_validation(name) {
                        continue;
                    }
                    match super::agent::validate_setting(name, value, session.info.role_super, session.info.role_oid) {
                        Err(e) => return self.client_login_refused(key, &e.to_fatal(), None),
                        // The server's spelling of a reported setting, for
                        // the login's ParameterStatus (and the backends
                        // that apply it). Not DateStyle's: each of its
                        // values merges into the one before (German, then
                        // SQL: "SQL, DMY"), which a spelling made alone
                        // would undo ("SQL, MDY").
                        Ok(Some(shown)) if shown != *value && !name.eq_ignore_ascii_case("DateStyle") => {
                            if let Some(s) = self.client(key).and_then(|c| c.settings.get_mut(i)) {
                                s.1 = shown;
                            }
                        }
                        Ok(_) => {}
                    }
                }
                let limited = session.info.role_connlimit >= 0 || session.info.db_connlimit >= 0;
                let authn = session.authn(&user);
                if let Some(c) = self.client(key) {
                    c.log_login(&local, &session.info, authn);
                }
                let identity = (session.info.role_oid, session.info.db_oid);
                drop(session); // wipes the secret
                self.client_join_pool(key, cred, limited, identity);
            }
        }
    }

    /// A login refused: in the server log as the server logs its own
    /// (FATAL, the client's prefix escapes; `log_detail` replaces the
    /// client's DETAIL there, as errdetail_log), then to the client.
    pub(super) fn client_login_refused(&mut self, key: usize, f: &ErrorFields, log_detail: Option<&str>) {
        let local = self.client_local(key);
        if let Some(c) = self.client(key) {
            c.log_refusal(&local, f, log_detail);
        }
        self.client_fatal_fields(key, f)
    }

    /// Password checks finished on their threads: each client goes on.
    pub fn password_checks_done(&mut self) {
        for d in self.verifier.finished() {
            let Some(c) = self.client(d.client) else { continue };
            let user = c.user.clone();
            let Phase::Auth(session) = &mut c.phase else { continue };
            if let Some(step) = session.check_finished(&user, d.id, d.check) {
                self.client_auth_step(d.client, step);
                // Watched for input again (or as its next phase says).
                self.client_rearm(d.client);
            }
        }
    }

    /// What InitPostgres would refuse after authentication, with its words.
    fn login_checks(&self, info: &NgLoginInfo, user: &str, database: &str) -> Result<(), ErrorFields> {
        if !info.role_exists {
            return Err(fatal("28000", format!("role \"{user}\" does not exist")));
        }
        if !info.role_canlogin {
            return Err(fatal("28000", format!("role \"{user}\" is not permitted to log in")));
        }
        let (role_clients, db_clients) = self.pools.iter().fold((0, 0), |(r, d), (_, p)| {
            (r + if p.role == user { p.clients } else { 0 }, d + if p.database == database { p.clients } else { 0 })
        });
        if !info.role_super && info.role_connlimit >= 0 && role_clients + 1 > info.role_connlimit as usize {
            return Err(fatal("53300", format!("too many connections for role \"{user}\"")));
        }
        if !info.db_exists {
            return Err(fatal("3D000", format!("database \"{database}\" does not exist")));
        }
        if !info.db_allowconn {
            return Err(fatal("55000", format!("database \"{database}\" is not currently accepting connections")));
        }
        if !info.db_can_connect {
            let mut f = fatal("42501", format!("permission denied for database \"{database}\""));
            f.detail = Some("User does not have CONNECT privilege.".into());
            return Err(f);
        }
        if !info.role_super && info.db_connlimit >= 0 && db_clients + 1 > info.db_connlimit as usize {
            return Err(fatal("53300", format!("too many connections for database \"{database}\"")));
        }
        Ok(())
    }
}
