//! Client connections: their buffers, phases and shared rows, their events,
//! errors and ends. The startup phase is `startup`'s, a CancelRequest
//! `cancel`'s; an idle client's next message is left unread in the socket
//! for the backend that will serve it.
use super::auth::AuthSession;
use super::conn::{self, Conn, HANGUP, READ};
use super::worker::Pooler;
use crate::pg::session::LogClient;
use crate::shmem::ClientState;
use nextgres_core::proto::{self, ErrorFields, ProtoError};
use nix::sys::epoll::EpollFlags;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Largest message accepted during authentication (the server's limit).
pub const MAX_AUTH_MESSAGE: usize = 65535;

pub enum Phase {
    Startup,
    Auth(Box<AuthSession>),
    /// Authenticated; waiting for the pool's first backend to learn the
    /// session values (ParameterStatus) it will report.
    LoginPending { since: Instant },
    Idle,
    Waiting { since: Instant },
    /// Waiting, its ATTACH sent ahead to busy `backend` (`ahead.rs`): the
    /// pooler must take it back (`client_recall`) before it touches the
    /// socket, and may not if the backend claimed it first.
    Ahead { backend: usize, since: Instant },
    Attached { backend: usize },
    /// In its pool's kernel queue (`kq`): a backend may serve it (its owner
    /// word says); the pooler neither reads nor writes it, nor watches it.
    Queued,
    /// A replication client waiting for its dedicated walsender's login
    /// (`dedicated.rs`), the connection table entry `login`.
    Dedicating { login: usize },
    /// Sending a final error, then closing; closed anyway
    /// `CLOSING_WITHIN` after `since` (a client that reads nothing).
    Closing { since: Instant },
}

pub struct Client {
    /// The client's TCP socket; for a TLS client, the pooler's end of the
    /// relay's socketpair (a Unix stream socket: only read, write, shutdown
    /// and the raw fd are used on it, which work the same), or its own TCP
    /// socket again while parked (`ClientTls::parked`, read and written through rustls).
    pub stream: TcpStream,
    /// A TLS client's state; None for plaintext (boxed: an idle plaintext
    /// client, most of a big pool, pays one pointer for it).
    pub tls: Option<Box<ClientTls>>,
    /// A startup packet (SSLRequest, GSSENCRequest) was read: a first byte
    /// 0x16 (direct TLS) is only looked for before that.
    pub negotiated: bool,
    /// Taken at max_client_conn for its SSLRequest only: a CancelRequest
    /// is carried out, a startup packet refused (`refusing`).
    pub over_limit: bool,
    /// Before TLS: (SSLRequest done, GSSENCRequest done), as the server's
    /// ProcessStartupPacket(ssl_done, gss_done): a refused SSLRequest
    /// allows a GSSENCRequest next and a refused GSSENCRequest an
    /// SSLRequest, but the same one twice in a row is a protocol error.
    pub plain_negotiation: (bool, bool),
    pub addr: SocketAddr,
    /// The address it connected to: an index in `Pooler::local_addrs`
    /// (`NO_LOCAL`: not known).
    pub local: u16,
    pub row: usize,
    pub id: u64,
    pub phase: Phase,
    pub inbuf: Vec<u8>,
    pub outbuf: Vec<u8>,
    /// In the pooler's epoll set, with these events last armed. Clients are
    /// registered one-shot (`conn::arm`): an event disarms the registration
    /// until `client_rearm`, and `armed` says whether it is armed now; an
    /// idle plaintext client edge-triggered (EPOLLET in here, see
    /// `client_rearm`), which no event disarms.
    pub registered: Option<EpollFlags>,
    pub armed: bool,
    /// An edge-triggered event came while a backend had (or was about to
    /// get) the socket: the client may have sent its next query meanwhile,
    /// which no later edge announces, so it is looked at once idle again
    /// (`client_input_seen`). A second such event disarms the registration.
    pub input_seen: bool,
    /// The inode of a plaintext client's socket (0: not known yet), which
    /// an ATTACH slot names (`ahead::attach_slot_write`): fstat'ed once,
    /// not per transaction. A TLS client's stream changes as its relay
    /// parks, so it is not kept for one.
    pub sock_ino: u64,
    /// Waiting (or sent ahead) for a second at a janitor tick (so 1 to 2 s
    /// into the wait): armed for a hang-up (see `interest`); cleared when a
    /// new wait starts.
    pub watch_hangup: bool,
    pub user: String,
    pub database: String,
    /// Startup parameters and `-c` options that are settings, in order.
    pub settings: Vec<(String, String)>,
    /// What the client changed in its session (SET, prepared statements),
    /// carried to whichever backend serves it next.
    pub image: nextgres_core::control::SessionImage,
    pub pool: Option<usize>,
    /// Cancel pid and key handed out in BackendKeyData.
    pub cancel: Option<(i32, Vec<u8>)>,
    /// Protocol minor version of the session (the client's request capped
    /// at the server's newest): decides the cancel key's length.
    pub proto_minor: u16,
    pub last_backend: Option<usize>,
    /// It waits only while an idle backend lent to the pool's kernel queue
    /// is recalled for it (a TLS client, which the queue cannot serve, in
    /// a pool with room): no sign of a saturated pool (`attached`).
    pub waits_for_recall: bool,
    /// Session mode: the backend reserved for this client.
    pub pinned: Option<usize>,
    pub session_mode: bool,
    /// `pool_mode = dedicated`: the client gets a backend of its own, outside
    /// pool_size, that exits when the client leaves.
    pub dedicated_mode: bool,
    /// The socket's `tcpi_bytes_received` when last added to its pool's
    /// `bytes_received` (None: not known, e.g. before its login completed).
    pub tcp_received: Option<u64>,
    /// Listed in `Pooler::received_due`: its bytes are counted at the next
    /// janitor tick.
    pub received_due: bool,
    /// A backend has counted this client's session (pg_stat_database.sessions).
    pub session_counted: bool,
    /// Killed (`kill_clients`, `kill_client`) while a backend had it: the
    /// backend is terminated, but one that gave the client back just before
    /// (RELEASED in flight) no longer concerns it, so the client is told
    /// 57P01 when it comes back.
    pub killed: bool,
    /// Closed when its backend returns it from the kernel queue (`kq`).
    pub kq_close: bool,
    /// Logged in (its disconnection is logged as the server's would be).
    pub logged_in: bool,
    /// The method of its authenticated identity (`control::AUTHN_*`; 0:
    /// none, e.g. trust), whose id is `user`, or for `cert` `authn_dn`
    /// (kept apart so that a password login, most clients, stores no
    /// second copy of its role name).
    pub authn_method: u8,
    pub authn_dn: Option<Box<[u8]>>,
    pub xacts: i64,
    pub started: Instant,
    /// The `replication` startup parameter as the server reads it: a
    /// walsender client is served as a dedicated session (`dedicated.rs`).
    pub replication: proto::Replication,
    /// A replication client's startup parameters for its walsender's login
    /// (`dedicated.rs`), in the client's order: its settings as sent, an
    /// `options` string re-encoded from what it set (`-c name=value`, the
    /// server's escaping), never `user`, `database` or `replication` (the
    /// pooler sends the ones it authenticated).
    pub walsender_params: Vec<(String, String)>,
}

/// `Client::local` when the address it connected to is not known.
pub const NO_LOCAL: u16 = u16::MAX;

/// What only a TLS client carries (`Client::tls`).
pub struct ClientTls {
    /// Filled by the relay with the version and cipher once the handshake
    /// is done (before any plaintext reaches `Client::stream`).
    pub info: super::tls::TlsInfo,
    /// While a relay thread carries the client: its control (see
    /// [`super::tls::RelayCtl`]); None while parked.
    pub relay: Option<std::sync::Arc<super::tls::RelayCtl>>,
    /// The pooler asked the relay to park and shut its pair end for
    /// writing; until the relay's end closes, input is collected in
    /// `park_in` and nothing is written.
    pub parking: bool,
    /// When the relay was asked to park: a relay that has not handed over
    /// within `tls::CLOSE_WITHIN` (a client that sends KeyUpdates and reads
    /// nothing) has its client closed by the janitor.
    pub park_asked: Option<std::time::Instant>,
    pub park_in: Vec<u8>,
    /// Parked (idle in the pooler, no relay thread, no socketpair): the
    /// rustls session; `Client::stream` is then the client's own TCP
    /// socket, read and written through it.
    pub parked: Option<Box<rustls::ServerConnection>>,
    /// The janitor saw the client idle with this many transactions at its
    /// last tick: seen so again, it is parked.
    pub idle_mark: Option<i64>,
    /// The server's (ssl_done, gss_done) of ProcessStartupPacket(): (true,
    /// true) after SSLRequest + 'S', (false, false) after direct TLS; a
    /// request already done gets 0A000 "unsupported frontend protocol".
    pub negotiation: (bool, bool),
    /// TLS bytes read while parked that brought no plaintext (KeyUpdates,
    /// empty records): past `tls::PARKED_HOUSEKEEPING` the client gets its
    /// relay thread back, so such traffic costs its own thread, not the
    /// pooler's event loop.
    pub parked_read: usize,
}

impl Client {
    /// The client's TLS session as the backend's `pg_stat_ssl` row shows
    /// it (ATTACH); None for plaintext, or before the relay has set it.
    pub fn tls_status(&self) -> Option<nextgres_core::control::TlsStatus> {
        self.tls.as_ref().and_then(|t| t.info.get()).map(|s| s.status.clone())
    }

    /// The process id of the cancel key handed out (`Attach::key_pid`; 0
    /// before the login's BackendKeyData).
    pub fn key_pid(&self) -> i32 {
        self.cancel.as_ref().map_or(0, |(pid, _)| *pid)
    }

    pub fn new(stream: TcpStream, addr: SocketAddr, row: usize, id: u64) -> Client {
        Client {
            stream,
            tls: None,
            negotiated: false,
            over_limit: false,
            plain_negotiation: (false, false),
            addr,
            local: NO_LOCAL,
            row,
            id,
            phase: Phase::Startup,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            registered: None,
            armed: false,
            input_seen: false,
            sock_ino: 0,
            watch_hangup: false,
            user: String::new(),
            database: String::new(),
            settings: Vec::new(),
            image: Default::default(),
            pool: None,
            cancel: None,
            proto_minor: 0,
            last_backend: None,
            waits_for_recall: false,
            pinned: None,
            session_mode: false,
            dedicated_mode: false,
            tcp_received: None,
            received_due: false,
            session_counted: false,
            killed: false,
            kq_close: false,
            logged_in: false,
            authn_method: 0,
            authn_dn: None,
            xacts: 0,
            started: Instant::now(),
            replication: proto::Replication::None,
            walsender_params: Vec::new(),
        }
    }

    /// The server's "connection received" line (postmaster's BackendInitialize()).
    /// `local`: the raw address it connected to (`Pooler::client_local`).
    pub fn log_receipt(&self, local: &[u8]) {
        use crate::pg::session::{log_client_line, ConnectionLogging};
        if ConnectionLogging::now().receipt() {
            let (host, port) = self.host_port();
            let who = LogClient { host: &host, port: &port, local, user: None, db: None, appname: None };
            log_client_line(&format!("connection received: host={host} port={port}"), &who);
        }
    }

    /// The client's address as the server's log lines name it (`%h`, `%r`'s port).
    fn host_port(&self) -> (String, String) {
        (self.addr.ip().to_string(), self.addr.port().to_string())
    }

    /// A login refused (`Pooler::client_login_refused`), as the server's
    /// FATAL line with this client's log_line_prefix escapes.
    pub fn log_refusal(&self, local: &[u8], f: &ErrorFields, log_detail: Option<&str>) {
        let (host, port) = self.host_port();
        let who = LogClient {
            host: &host,
            port: &port,
            local,
            user: Some(self.user.as_str()),
            // A physical replication connection has no database (the server
            // clears it: %d shows "[unknown]").
            db: (self.replication != proto::Replication::Physical).then_some(self.database.as_str()),
            // The server refuses before it applies the startup packet's
            // application_name: %a shows as not known yet.
            appname: None,
        };
        crate::pg::session::log_client_fatal(&f.sqlstate, &f.message, log_detail.or(f.detail.as_deref()), f.hint.as_deref(), &who);
    }

    /// The identity its backends show (`SYSTEM_USER`): see `log_login`.
    pub fn authn(&self) -> Option<nextgres_core::control::Authn> {
        let id = match self.authn_method {
            0 => return None,
            nextgres_core::control::AUTHN_CERT => self.authn_dn.as_deref()?.to_vec(),
            _ => self.user.as_bytes().to_vec(),
        };
        Some(nextgres_core::control::Authn { method: self.authn_method, id })
    }

    /// The server's "connection authenticated" and "connection authorized"
    /// lines (postinit.c PerformAuthentication(), auth.c set_authn_id());
    /// `authn` is the identity the login established (`AuthSession::authn`),
    /// kept for the client's backends.
    pub fn log_login(&mut self, local: &[u8], info: &crate::pg::glue::NgLoginInfo, authn: Option<nextgres_core::control::Authn>) {
        use crate::pg::session::{hba_file, log_client_line, ConnectionLogging};
        self.logged_in = true;
        let logging = ConnectionLogging::now();
        let (host, port) = self.host_port();
        let who = LogClient {
            host: &host,
            port: &port,
            local,
            user: Some(self.user.as_str()),
            db: Some(self.database.as_str()),
            appname: None,
        };
        // Methods that authenticate someone name the identity; from 17 a
        // login without one (trust) is logged too, with its user name.
        if logging.authentication() {
            let what = match &authn {
                Some(a) => Some(format!("identity=\"{}\"", String::from_utf8_lossy(&a.id))),
                None if crate::pg::session::LOGS_LOGIN_WITHOUT_IDENTITY => Some(format!("user=\"{}\"", self.user)),
                None => None,
            };
            if let Some(what) = what {
                let msg = format!("connection authenticated: {what} method={} ({}:{})", info.method_name(), hba_file(), info.hba_line);
                log_client_line(&msg, &who);
            }
        }
        if let Some(a) = &authn {
            self.authn_method = a.method;
            if a.method == nextgres_core::control::AUTHN_CERT {
                self.authn_dn = Some(a.id.clone().into_boxed_slice());
            }
        }
        if logging.authorization() {
            let mut msg = format!("connection authorized: user={} database={}", self.user, self.database);
            if let Some((_, app)) = self.settings.iter().find(|(n, _)| n.eq_ignore_ascii_case("application_name")) {
                msg.push_str(&format!(" application_name={}", crate::pg::session::clean_ascii(app)));
            }
            log_client_line(&msg, &who);
        }
    }

    /// The server's "disconnection" line (postgres.c log_disconnections()).
    fn log_disconnection(&self, local: &[u8]) {
        use crate::pg::session::{log_client_line, ConnectionLogging};
        if !self.logged_in || !ConnectionLogging::now().disconnection() {
            return;
        }
        let t = self.started.elapsed();
        let (ms, s) = (t.subsec_millis(), t.as_secs());
        let (host, port) = self.host_port();
        let msg = format!(
            "disconnection: session time: {}:{:02}:{:02}.{:03} user={} database={} host={} port={}",
            s / 3600,
            (s / 60) % 60,
            s % 60,
            ms,
            self.user,
            self.database,
            host,
            port
        );
        // The application_name in effect at the end: a SET of the client's, else its startup one.
        let app = self
            .image
            .settings
            .iter()
            .chain(self.settings.iter())
            .find(|(n, _)| n.eq_ignore_ascii_case("application_name"))
            .map(|(_, v)| v.as_str());
        let who = LogClient {
            host: &host,
            port: &port,
            local,
            user: Some(&self.user),
            db: Some(&self.database),
            appname: app,
        };
        log_client_line(&msg, &who);
    }

    /// The raw sockaddr of the client, sent to backends with its socket.
    pub fn raw_addr(&self) -> Vec<u8> {
        super::conn::raw_sockaddr(&self.addr)
    }

    /// The relay was asked to park the TLS client and has not handed it
    /// over yet: nothing is written to it.
    pub fn parking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.parking)
    }

    /// Output not yet handed to the socket (for a parked client: to rustls
    /// or by rustls).
    pub fn out_pending(&self) -> bool {
        match self.tls.as_ref().and_then(|t| t.parked.as_ref()) {
            Some(conn) => super::tls::parked_pending(conn, &self.outbuf),
            None => !self.outbuf.is_empty(),
        }
    }

    fn interest(&self) -> Option<EpollFlags> {
        if let Some(t) = self.tls.as_ref().filter(|t| t.parking) {
            // Only the relay's hand-over (EOF on the pair) and input that
            // raced it matter; the pair takes no writes. Past
            // PAIR_BACKLOG of such input, only the hand-over: the pair
            // fills and the relay stops reading the client.
            if t.park_in.len() >= super::tls::PAIR_BACKLOG {
                return Some(HANGUP);
            }
            return Some(READ | HANGUP);
        }
        let out = if self.out_pending() { EpollFlags::EPOLLOUT } else { EpollFlags::empty() };
        match self.phase {
            Phase::Auth(ref s) if s.is_checking() => Some(HANGUP | out),
            Phase::Startup | Phase::Auth(_) | Phase::Idle => Some(READ | out),
            Phase::LoginPending { .. } | Phase::Dedicating { .. } => Some(HANGUP | out),
            // A waiting client is watched for a hang-up only once it has
            // waited a janitor tick (`watch_hangup`): under saturation
            // nearly every transaction waits a few milliseconds, and the
            // registration cost an `epoll_ctl` each. One that hangs up
            // sooner (a FIN; a reset or an error is reported by the idle
            // registration, still in place, and closes it in the queue) is
            // seen by the backend it is handed to, as a direct
            // connection's backend sees it: the query it sent runs (as it
            // would have there), then that backend reads EOF.
            Phase::Waiting { .. } if self.watch_hangup => Some(HANGUP | out),
            Phase::Waiting { .. } => (!out.is_empty()).then_some(out),
            Phase::Closing { .. } => Some(HANGUP | EpollFlags::EPOLLOUT),
            // Sent ahead: the same, and nothing is ever written to it (a
            // backend may own it already).
            Phase::Ahead { .. } if self.watch_hangup => Some(HANGUP),
            Phase::Ahead { .. } | Phase::Attached { .. } | Phase::Queued { .. } => None,
        }
    }

    /// A backend serves the client, or may have claimed it (sent ahead):
    /// the pooler neither reads nor writes its socket.
    pub fn with_backend(&self) -> bool {
        self.backend().is_some() || matches!(self.phase, Phase::Queued { .. })
    }

    /// The backend serving the client, or holding its ATTACH sent ahead.
    pub fn backend(&self) -> Option<usize> {
        match self.phase {
            Phase::Attached { backend } | Phase::Ahead { backend, .. } => Some(backend),
            _ => None,
        }
    }

    /// Reads until `inbuf` holds `want` bytes, never more: bytes past the
    /// current message belong to whoever handles the next one.
    /// Ok(true) = complete, Ok(false) = need more, Err = EOF or error.
    pub(super) fn fill(&mut self, want: usize) -> std::io::Result<bool> {
        while self.inbuf.len() < want {
            let mut buf = vec![0u8; want - self.inbuf.len()];
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads one complete regular message (tag, length, body) exactly.
    pub fn read_message(&mut self) -> Result<Option<(u8, Vec<u8>)>, ProtoError> {
        let eof = || ProtoError::violation("unexpected EOF on client connection");
        if !self.fill(5).map_err(|_| eof())? {
            return Ok(None);
        }
        let len = i32::from_be_bytes([self.inbuf[1], self.inbuf[2], self.inbuf[3], self.inbuf[4]]);
        if len < 4 || len as usize > MAX_AUTH_MESSAGE {
            return Err(ProtoError::violation(format!("invalid message length {len}")));
        }
        if !self.fill(1 + len as usize).map_err(|_| eof())? {
            return Ok(None);
        }
        let tag = self.inbuf[0];
        let body = self.inbuf[5..].to_vec();
        self.inbuf = Vec::new(); // an idle client keeps no buffer
        Ok(Some((tag, body)))
    }

    /// Queues bytes and writes what the socket takes now.
    pub fn send(&mut self, bytes: &[u8]) {
        self.outbuf.extend_from_slice(bytes);
        self.flush();
    }

    /// Returns false when the connection is broken.
    pub fn flush(&mut self) -> bool {
        if self.parking() {
            return true; // written once parked
        }
        if let Some(conn) = self.tls.as_mut().and_then(|t| t.parked.as_mut()) {
            let ok = super::tls::parked_flush(conn, &mut self.stream, &mut self.outbuf).is_ok();
            self.release_outbuf();
            return ok;
        }
        while !self.outbuf.is_empty() {
            match self.stream.write(&self.outbuf) {
                Ok(n) => {
                    self.outbuf.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        self.release_outbuf();
        true
    }

    /// Frees a drained output buffer: the login's answer (authentication,
    /// some fifteen ParameterStatus, BackendKeyData) would otherwise stay
    /// allocated for the life of an idle client, half a kilobyte each.
    /// The pooler writes to a client only at login and on errors, so the
    /// allocation saved is not paid again per transaction.
    fn release_outbuf(&mut self) {
        if self.outbuf.is_empty() && self.outbuf.capacity() != 0 {
            self.outbuf = Vec::new();
        }
    }
}

/// FATAL 53300 "sorry, too many clients already" (the postmaster's answer
/// when it cannot fork), with what nextgres ran out of as its detail: a TLS
/// client whose relay gets no socketpair or thread.
pub fn no_relay_fields(why: &str) -> ErrorFields {
    let mut f = fatal_fields("53300", "sorry, too many clients already", None);
    f.detail = Some(format!("nextgres {why}"));
    f
}

/// A startup-stage protocol error as the FATAL the server sends for it.
pub(super) fn proto_fatal(e: &ProtoError) -> ErrorFields {
    fatal_fields(e.sqlstate, &e.message, e.hint.as_deref())
}

pub(super) fn fatal_fields(sqlstate: &str, message: &str, hint: Option<&str>) -> ErrorFields {
    ErrorFields {
        severity: "FATAL".into(),
        sqlstate: sqlstate.into(),
        message: message.into(),
        detail: None,
        hint: hint.map(str::to_string),
    }
}

impl Pooler {
    pub fn client(&mut self, key: usize) -> Option<&mut Client> {
        match self.conns.get_mut(key) {
            Some(Conn::Client(c)) => Some(c),
            _ => None,
        }
    }

    /// The raw address client `key` connected to (pqcomm.c's `port->laddr`;
    /// empty when not known), which its ATTACH and its log lines' %L carry.
    pub fn client_local(&self, key: usize) -> Vec<u8> {
        match self.conns.get(key) {
            Some(Conn::Client(c)) => self.local_addr(c.local),
            _ => Vec::new(),
        }
    }

    /// Brings the epoll registration in line with the client's phase.
    ///
    /// A client stays in the epoll set from accept to close. Idle (and not
    /// read through rustls by the pooler) it is registered edge-triggered:
    /// the event for its query wakes the pooler, and the registration stays
    /// as it is while a backend serves the client and after it gives it
    /// back, so a saturated pool's transaction costs no `epoll_ctl` (the
    /// one-shot re-arm at each RELEASED was one of four system calls per
    /// transaction left in the pooler). An edge that comes while a backend
    /// has the socket is only noted (`input_seen`; the pooler never reads
    /// or writes a socket a backend is using) and looked at when the client
    /// is idle again; a second one disarms the registration (a multi-
    /// statement transaction or a COPY would wake the pooler per packet).
    /// Every other phase is registered one-shot (EPOLLONESHOT): an event
    /// disarms it until the next `client_rearm`. Changing the registration
    /// re-checks the socket, so input that came while it was disarmed
    /// is reported then.
    pub fn client_rearm(&mut self, key: usize) {
        let epoll = &self.epoll;
        let Some(Conn::Client(c)) = self.conns.get_mut(key) else { return };
        let Some(mut w) = c.interest() else { return };
        let edge = w == conn::READ
            && matches!(c.phase, Phase::Idle)
            && c.tls.as_ref().is_none_or(|t| t.parked.is_none() && !t.parking);
        if edge {
            w |= EpollFlags::EPOLLET;
        }
        match c.registered {
            None if edge => conn::add(epoll, &c.stream, key, w),
            None => conn::arm_add(epoll, &c.stream, key, w),
            Some(r) if r == w && c.armed => return,
            Some(_) if edge => conn::modify(epoll, &c.stream, key, w),
            Some(_) => conn::arm_modify(epoll, &c.stream, key, w),
        }
        c.registered = Some(w);
        c.armed = true;
        // The kernel checks the socket against the new registration and
        // reports what is there: looking too would see it twice.
        c.input_seen = false;
    }

    /// An edge-triggered event for a client whose socket a backend has or
    /// may have: noted for when it is idle again; the second one disarms
    /// the registration until then (armed for nothing, a one-shot
    /// registration still reports a hang-up or an error, once).
    fn client_edge_while_away(&mut self, key: usize) {
        let epoll = &self.epoll;
        let Some(Conn::Client(c)) = self.conns.get_mut(key) else { return };
        if !c.input_seen {
            c.input_seen = true;
            return;
        }
        conn::arm_modify(epoll, &c.stream, key, EpollFlags::empty());
        c.registered = Some(EpollFlags::empty());
        c.armed = false;
    }

    /// A client given back (RELEASED) after an edge came while its backend
    /// had it: reads what may be its next query, as its event would have.
    pub fn client_input_seen(&mut self, key: usize, id: u64) {
        let Some(c) = self.client(key) else { return };
        if c.id != id || !c.input_seen || !matches!(c.phase, Phase::Idle) || c.parking() {
            return;
        }
        self.client_idle_input(key);
    }

    pub fn client_event(&mut self, key: usize, ev: EpollFlags) {
        let Some(c) = self.client(key) else { return };
        if c.registered.is_some_and(|r| r.contains(EpollFlags::EPOLLET)) {
            if matches!(c.phase, Phase::Waiting { .. } | Phase::Ahead { .. } | Phase::Attached { .. }) {
                self.client_edge_while_away(key);
            }
        } else {
            // The one-shot registration fired and is disarmed now.
            c.armed = false;
        }
        let Some(c) = self.client(key) else { return };
        if matches!(c.phase, Phase::Attached { .. }) {
            // A backend owns the socket now: noted above if edge-triggered,
            // or a one-shot registration left armed from Waiting fired. (One
            // that gave it back in its release ring, unread yet, has the
            // pooler read it before it sleeps: the message is then read as
            // the RELEASED is handled, `client_input_seen`.)
            return;
        }
        if matches!(c.phase, Phase::Ahead { .. }) {
            // Its hang-up watch fired (`watch_hangup`). Taken back, the
            // client is closed as a waiting one; claimed by its backend,
            // that backend sees the hang-up itself.
            if ev.intersects(HANGUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) && self.client_recall(key) {
                return self.client_close(key);
            }
            return;
        }
        if c.parking() {
            return self.client_park_input(key, ev.intersects(HANGUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR));
        }
        if ev.contains(EpollFlags::EPOLLOUT) && !c.flush() {
            return self.client_close(key);
        }
        let hangup = ev.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR | EpollFlags::EPOLLRDHUP);
        match &c.phase {
            Phase::Closing { .. } => {
                if !c.out_pending() || hangup {
                    return self.client_close(key);
                }
            }
            Phase::Startup => self.client_startup(key),
            Phase::Auth(s) if s.is_checking() => {
                if hangup {
                    return self.client_close(key);
                }
            }
            Phase::Auth(_) => self.client_auth_input(key),
            Phase::Idle => self.client_idle_input(key),
            Phase::LoginPending { .. } | Phase::Waiting { .. } | Phase::Dedicating { .. } => {
                if hangup {
                    return self.client_close(key);
                }
            }
            Phase::Ahead { .. } | Phase::Attached { .. } | Phase::Queued { .. } => {}
        }
        if self.freed_in_batch.contains(&key) {
            return; // closed above; its key may be another connection's now
        }
        self.client_rearm(key);
    }

    fn client_idle_input(&mut self, key: usize) {
        let Some(c) = self.client(key) else { return };
        c.input_seen = false;
        if c.tls.as_ref().is_some_and(|t| t.parked.is_some()) {
            return self.client_parked_input(key);
        }
        let mut peek = [0u8; 5];
        let n = loop {
            match nix::sys::socket::recv(c.stream.as_raw_fd(), &mut peek, nix::sys::socket::MsgFlags::MSG_PEEK) {
                Ok(n) => break n,
                // Edge-triggered: no later event repeats this one's news.
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(_) => return self.client_close(key),
            }
        };
        if n == 0 {
            return self.client_close(key);
        }
        if n == 5 && peek == [b'X', 0, 0, 0, 4] {
            return self.client_close(key); // Terminate while idle: no backend needed
        }
        self.client_needs_backend(key);
    }

    pub fn client_fatal(&mut self, key: usize, sqlstate: &str, message: &str, hint: Option<&str>) {
        self.client_fatal_fields(key, &fatal_fields(sqlstate, message, hint));
    }

    pub fn client_fatal_fields(&mut self, key: usize, f: &ErrorFields) {
        if !self.client_recall(key) {
            return; // its backend claimed it: being served, nothing to tell
        }
        let Some(c) = self.client(key) else { return };
        if matches!(c.phase, Phase::Attached { .. }) {
            return; // never write into a socket a backend is using
        }
        let mut out = Vec::new();
        proto::error_response(&mut out, f);
        c.send(&out);
        let done = !c.out_pending() && !c.parking();
        if let Phase::Dedicating { login } = c.phase {
            self.dedicated_drop(login); // its walsender exits with our end closed
        }
        self.client_detach_from_pool(key);
        let Some(c) = self.client(key) else { return };
        c.phase = Phase::Closing { since: Instant::now() };
        if done {
            self.client_close(key);
        } else {
            self.client_rearm(key);
        }
    }

    /// Used at shutdown: clients not inside a transaction get a FATAL.
    pub fn client_fatal_if_not_attached(&mut self, key: usize, sqlstate: &str, message: &str) {
        if !self.client_recall(key) {
            return;
        }
        if let Some(c) = self.client(key) {
            if !matches!(c.phase, Phase::Attached { .. }) {
                let mut out = Vec::new();
                proto::error_response(&mut out, &fatal_fields(sqlstate, message, None));
                c.send(&out);
            }
        }
    }

    /// Adds what the client sent since the last call to its pool's
    /// `bytes_received` (one `getsockopt(TCP_INFO)`): at the janitor's tick
    /// after a transaction of it (`client_received_later`) and when it
    /// leaves.
    pub fn client_count_received(&mut self, key: usize) {
        let Some(c) = self.client(key) else { return };
        c.received_due = false;
        let (Some(pool), Some(before)) = (c.pool, c.tcp_received) else { return };
        let Some(now) = conn::tcp_bytes_received(&c.stream) else { return };
        c.tcp_received = Some(now);
        if let Some(p) = self.pools.get_mut(pool) {
            p.bytes_received = p.bytes_received.saturating_add(now.saturating_sub(before).min(i64::MAX as u64) as i64);
        }
    }

    /// A backend gave the client back: its bytes are counted at the next
    /// janitor tick (`count_received_due`), not per transaction, so neither
    /// the pooler nor the backend pays a system call per transaction;
    /// `nextgres.pools.bytes_received` lags by up to a tick (1 s), as the
    /// server's cumulative statistics lag too.
    pub fn client_received_later(&mut self, key: usize) {
        let Some(c) = self.client(key) else { return };
        if c.received_due || c.tcp_received.is_none() {
            return;
        }
        c.received_due = true;
        let id = c.id;
        self.received_due.push((key, id));
    }

    /// Janitor tick (and before a stats reset): counts the bytes of the
    /// clients given back since the last tick and publishes the pools'
    /// counts (a pool gone quiet has no other sync to show them).
    pub fn count_received_due(&mut self) {
        let mut pools = Vec::new();
        for (key, id) in std::mem::take(&mut self.received_due) {
            let Some(c) = self.client(key).filter(|c| c.id == id && c.received_due) else { continue };
            if let Some(p) = c.pool {
                if !pools.contains(&p) {
                    pools.push(p);
                }
            }
            self.client_count_received(key);
        }
        for p in pools {
            self.sync_pool(p);
        }
    }

    /// Takes the client out of its pool's queues and counts.
    fn client_detach_from_pool(&mut self, key: usize) {
        self.client_count_received(key);
        let Some(c) = self.client(key) else { return };
        let Some(pool) = c.pool.take() else { return };
        let pinned = c.pinned.take();
        let was_waiting = matches!(c.phase, Phase::Waiting { .. });
        if let Some(p) = self.pools.get_mut(pool) {
            p.clients = p.clients.saturating_sub(1);
            if was_waiting {
                p.waiting.retain(|&k| k != key);
                p.session_waiting.retain(|&k| k != key);
            }
            p.login_pending.retain(|&k| k != key);
        }
        if let Some(b) = pinned {
            self.backend_unpin(b);
        }
        // Connection limits count clients: a limited pool without clients
        // gives its parked backends' slots back to the server.
        if self.pools.get(pool).is_some_and(|p| p.clients == 0 && (p.close_when_idle || p.retired)) {
            self.pool_close_parked(pool);
        }
        self.sync_pool(pool);
    }

    pub fn client_close(&mut self, key: usize) {
        if !matches!(self.conns.get(key), Some(Conn::Client(_))) {
            return;
        }
        if !self.client_recall(key) {
            return; // its backend claimed it: closed when it gives it back
        }
        if let Some(Conn::Client(c)) = self.conns.get(key) {
            if let Phase::Dedicating { login } = c.phase {
                self.dedicated_drop(login); // its walsender exits with our end closed
            }
        }
        self.client_detach_from_pool(key);
        let local = self.client_local(key);
        let Some(Conn::Client(mut c)) = self.conn_take(key) else { return };
        c.log_disconnection(&local);
        if c.registered.is_some() {
            conn::remove(&self.epoll, &c.stream);
        }
        let told = matches!(c.phase, Phase::Closing { .. });
        if let Some(conn) = c.tls.as_mut().and_then(|t| t.parked.as_mut()) {
            super::tls::parked_close(conn, &mut c.stream, &mut c.outbuf);
            linger_close(&mut c.stream);
        } else {
            c.flush();
            // Its final error on the wire: the end of the connection follows
            // it after a moment, as a backend's exit follows its FATAL,
            // rather than in the same read. A client that reads the end with
            // the error may report only the end (the Rust `postgres` crate
            // says "connection closed").
            let later = told && c.tls.is_none() && !c.out_pending() && self.close_later.len() < CLOSE_LATER_MAX;
            match later.then(|| c.stream.try_clone().ok()).flatten() {
                Some(s) => self.close_later.push_back((s, Instant::now() + FINAL_ERROR_LINGER)),
                None => linger_close(&mut c.stream),
            }
        }
        self.client_gone(&c);
    }

    /// Closes the sockets of `close_later` whose time has come.
    pub fn close_later_due(&mut self) {
        let now = Instant::now();
        while self.close_later.front().is_some_and(|(_, due)| *due <= now) {
            if let Some((mut s, _)) = self.close_later.pop_front() {
                linger_close(&mut s);
            }
        }
    }

    /// Closes every socket of `close_later` now (the pooler is exiting: the
    /// kernel would close them with their unread input, a reset).
    pub fn close_later_all(&mut self) {
        while let Some((mut s, _)) = self.close_later.pop_front() {
            linger_close(&mut s);
        }
    }

    /// Milliseconds until the first of `close_later` is due (the loop's
    /// wait), if any.
    pub fn close_later_wait_ms(&self, now: Instant) -> Option<i64> {
        self.close_later.front().map(|(_, due)| due.saturating_duration_since(now).as_millis() as i64 + 1)
    }

    /// A replication client's socket went to its walsender
    /// (`dedicated.rs`): drop the pooler's copy without a word or a FIN on
    /// it, and forget the client (its session is the walsender's now).
    pub fn client_forget(&mut self, key: usize) {
        let Some(Conn::Client(c)) = self.conn_take(key) else { return };
        if c.registered.is_some() {
            conn::remove(&self.epoll, &c.stream);
        }
        self.client_gone(&c);
    }

    /// A client taken out of the table (closed or forgotten): its cancel
    /// key, its shared row and its place in the count it was in go.
    fn client_gone(&mut self, c: &Client) {
        if let Some((pid, _)) = c.cancel {
            self.cancel_keys.remove(&pid);
        }
        self.client_row_free(c.row);
        if c.over_limit {
            self.over_limit_clients -= 1;
        } else {
            self.clients -= 1;
        }
    }

    pub fn client_set_state(&self, key: usize, state: ClientState, backend_pid: i32) {
        if let Some(Conn::Client(c)) = self.conns.get(key) {
            let xacts = c.xacts;
            let pool = c.pool.and_then(|p| self.pools.get(p)).map(|p| p.row as i32).unwrap_or(-1);
            self.client_row_update(c.row, |r| {
                r.state = state;
                r.backend_pid = backend_pid;
                r.xacts = xacts;
                r.pool = pool;
            });
        }
    }
}

/// How long a client's connection stays open after its final error was
/// sent (`Pooler::close_later`).
pub const FINAL_ERROR_LINGER: Duration = Duration::from_millis(100);
/// At most this many sockets wait in `close_later` (their descriptors are
/// outside `max_client_conn`'s count): beyond it one closes at once.
const CLOSE_LATER_MAX: usize = 256;

/// Closing a socket with unread input makes the kernel send a reset, which
/// can overtake a FATAL we just wrote (the client then sees "connection
/// reset" instead of our error). Send FIN first, then discard what the
/// client had sent (its query that never ran).
fn linger_close(stream: &mut TcpStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut scratch = [0u8; 8192];
    for _ in 0..8 {
        match stream.read(&mut scratch) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
}
