//! Accepting clients on the pooler's listen sockets, and the open-files
//! limit they are accepted under.
use super::client::{fatal_fields, Client};
use super::conn::{self, Conn};
use super::worker::Pooler;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd};

/// Accepts per readiness event; the rest wait for the next loop turn so one
/// flood cannot starve established clients.
const ACCEPT_BATCH: usize = 64;

/// Distinct local addresses `local_index` keeps (a few in practice).
const MAX_LOCAL_ADDRS: usize = 4096;

impl Pooler {
    pub fn accept(&mut self, key: usize) {
        use nextgres_core::accept::{classify, Failure};
        let Some(Conn::Listener(l)) = self.conns.get(key) else { return };
        let lfd = l.as_raw_fd();
        for _ in 0..ACCEPT_BATCH {
            let fd = match nix::sys::socket::accept4(
                lfd,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => fd,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(e) => match classify(e as i32) {
                    Failure::Retry => continue,
                    Failure::Pause => return self.accept_pause(e),
                    Failure::Skip => {
                        log::info!("could not accept new connection: {}", e.desc());
                        return;
                    }
                },
            };
            let stream = unsafe { TcpStream::from_raw_fd(fd) };
            self.new_client(stream);
        }
    }

    /// accept(2) failed for lack of descriptors or memory: the connection
    /// stays queued and the listen socket readable. As the postmaster
    /// (pqcomm.c AcceptConnection(): LOG, then 100 ms without accepting),
    /// but without blocking the loop: the listen sockets leave the epoll
    /// set for `nextgres_core::accept::PAUSE` ([`Self::accept_resume`]
    /// puts them back); one LOG line per pause.
    fn accept_pause(&mut self, e: nix::errno::Errno) {
        if !self.accept_pause.start(std::time::Instant::now()) {
            return;
        }
        log::info!("could not accept new connection: {}", e.desc());
        for (_, c) in self.conns.iter() {
            if let Conn::Listener(l) = c {
                conn::remove(&self.epoll, l);
            }
        }
    }

    /// Once per loop turn: the listen sockets go back into the epoll set
    /// when a pause is over (the loop's wait is cut to end with it).
    pub fn accept_resume(&mut self) {
        if !self.accept_pause.end_if_due(std::time::Instant::now()) {
            return;
        }
        for (k, c) in self.conns.iter() {
            if let Conn::Listener(l) = c {
                conn::add(&self.epoll, l, k, conn::READ);
            }
        }
    }

    /// The index in `local_addrs` of the address `stream` was accepted on
    /// (one getsockname() per connection; pqcomm.c's `port->laddr`), which
    /// every ATTACH of the client carries. Interned: a server's clients
    /// connect to one or a few addresses. `NO_LOCAL` when unknown, or past
    /// `MAX_LOCAL_ADDRS` distinct ones (the backend then asks its socket).
    fn local_index(&mut self, stream: &TcpStream) -> u16 {
        let Ok(a) = stream.local_addr() else { return super::client::NO_LOCAL };
        let raw = conn::raw_sockaddr(&a);
        if let Some(i) = self.local_addrs.iter().position(|x| *x == raw) {
            return i as u16;
        }
        if self.local_addrs.len() >= MAX_LOCAL_ADDRS {
            return super::client::NO_LOCAL;
        }
        self.local_addrs.push(raw);
        (self.local_addrs.len() - 1) as u16
    }

    /// The raw address a client with `Client::local` index `local`
    /// connected to, as ATTACH carries it (empty when not known).
    pub fn local_addr(&self, local: u16) -> Vec<u8> {
        self.local_addrs.get(local as usize).cloned().unwrap_or_default()
    }

    fn new_client(&mut self, stream: TcpStream) {
        let Ok(addr) = stream.peer_addr() else { return };
        let _ = stream.set_nodelay(true);
        let _ = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::KeepAlive, &true);
        // As the postmaster sets them on every TCP connection it accepts:
        // the backends log in over the Unix socket, where the server skips
        // them, so `SHOW tcp_keepalives_idle` and the kernel's dead-peer
        // timing would otherwise be the kernel defaults (2 h).
        let tcp = crate::pg::tcp_settings();
        use nix::sys::socket::{setsockopt, sockopt};
        if tcp.keepalives_idle_s > 0 {
            let _ = setsockopt(&stream, sockopt::TcpKeepIdle, &tcp.keepalives_idle_s);
        }
        if tcp.keepalives_interval_s > 0 {
            let _ = setsockopt(&stream, sockopt::TcpKeepInterval, &tcp.keepalives_interval_s);
        }
        if tcp.keepalives_count > 0 {
            let _ = setsockopt(&stream, sockopt::TcpKeepCount, &tcp.keepalives_count);
        }
        if tcp.user_timeout_ms > 0 {
            let _ = setsockopt(&stream, sockopt::TcpUserTimeout, &tcp.user_timeout_ms);
        }
        if self.stopping {
            return self.refuse(stream, shutting_down_refusal());
        }
        let max = crate::settings::MAX_CLIENT_CONN.get() as usize;
        let row = if self.clients < max { self.client_row_alloc(&addr.ip().to_string(), addr.port() as i32) } else { None };
        let Some(row) = row else {
            return self.refuse(stream, max_client_conn_refusal());
        };
        self.client_accepted(stream, addr, row, Vec::new(), false);
    }

    /// A new client on `stream` with shared row `row`, in its startup phase,
    /// watched for its first packet; `read` holds what was read of it
    /// already. `over_limit`: taken at max_client_conn for its SSLRequest
    /// only (`refusing`), counted apart. Returns its key.
    pub fn client_accepted(&mut self, stream: TcpStream, addr: std::net::SocketAddr, row: usize, read: Vec<u8>, over_limit: bool) -> usize {
        if over_limit {
            self.over_limit_clients += 1;
        } else {
            self.clients += 1;
        }
        let id = self.next_client_id;
        self.next_client_id += 1;
        let local = self.local_index(&stream);
        let mut client = Client::new(stream, addr, row, id);
        client.local = local;
        client.inbuf = read;
        client.over_limit = over_limit;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        conn::arm_add(&self.epoll, &client.stream, key, conn::READ);
        entry.insert(Conn::Client(Box::new(client)));
        if let Some(Conn::Client(c)) = self.conns.get_mut(key) {
            c.registered = Some(conn::READ);
            c.armed = true;
        }
        key
    }
}

/// The refusal at `nextgres.max_client_conn`: the server's words at
/// max_connections (FATAL 53300), with the setting in the hint.
/// The refusal of a new client while the server shuts down (the
/// postmaster's CAC_SHUTDOWN).
pub fn shutting_down_refusal() -> nextgres_core::proto::ErrorFields {
    fatal_fields("57P03", "the database system is shutting down", None)
}

pub fn max_client_conn_refusal() -> nextgres_core::proto::ErrorFields {
    let hint = format!("nextgres.max_client_conn is {}.", crate::settings::MAX_CLIENT_CONN.get());
    fatal_fields("53300", "sorry, too many clients already", Some(&hint))
}

/// Pooler start: raises the soft RLIMIT_NOFILE to the hard one and LOGs
/// both. The pooler inherits the soft limit the server was started with
/// (often 1024), while each plaintext client takes one descriptor and each
/// TLS client three (its TCP socket and both ends of its relay socketpair)
/// while active, one once parked (idle in the pooler for 1 to 2 s: `park`),
/// and the relay workers two each (`relay`); the hard limit is what the DBA set for the service
/// (systemd `LimitNOFILE`, `ulimit -Hn`). PostgreSQL's own file accounting
/// (fd.c `max_safe_fds`) was sized at postmaster start from the lower soft
/// limit, so it stays within the raised one.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let fmt = |v: u64| if v == nix::sys::resource::RLIM_INFINITY { "unlimited".to_string() } else { v.to_string() };
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            let raised = soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok();
            let now = if raised { hard } else { soft };
            log::info!(
                "pooler open files limit (RLIMIT_NOFILE): {} (hard limit {}{}); a plaintext client takes 1 descriptor, a TLS client 1 while idle (parked) and 3 while active",
                fmt(now),
                fmt(hard),
                if raised { format!(", raised from {}", fmt(soft)) } else { String::new() }
            );
        }
        Err(e) => log::warn!("could not read the open files limit (RLIMIT_NOFILE): {e}"),
    }
}
