//! The pooler's listen sockets, opened in the postmaster.
//!
//! `_PG_init` of a preloaded library runs before the postmaster opens its own
//! listen sockets, and the postmaster does not use SO_REUSEPORT, so whoever
//! binds first owns the port. By default nextgres binds the server's
//! `listen_addresses`:`port` and clears `listen_addresses`, so the server keeps
//! only its Unix socket. Because the postmaster holds these sockets and the
//! pooler inherits them, a pooler restart refuses no connection attempt: they
//! wait in the backlog.
use crate::settings;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{IntoRawFd, RawFd};

/// Listen fds, inherited by every child of the postmaster.
static mut LISTENERS: Vec<RawFd> = Vec::new();
/// Where the pooler listens, for logs and SQL (0: nowhere).
static mut PORT: i32 = 0;
/// What `_PG_init` decided about the server's port; backends inherit it
/// (fork) for `nextgres.status()`.
static mut MODE: Mode = Mode::Takeover;

/// How the pooler and the server share TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The pooler owns the server's port; the server keeps only its Unix socket.
    Takeover,
    /// The pooler listens on `nextgres.port`; the server keeps its own TCP listeners.
    SidePort,
    /// `ssl = on`, the pooler cannot load the server's certificate or key
    /// and `nextgres.ssl_takeover` is off: the pooler listens nowhere and the
    /// server keeps its own (TLS-capable) TCP listeners.
    SslKeptByServer,
    /// The server starts in recovery (standby.signal or recovery.signal)
    /// with `hot_standby = off`: no background worker, so no pooler, runs
    /// until it is promoted, and a port the pooler held would take
    /// connections nobody answers. The server keeps its own TCP listeners
    /// (its 57P03 for each client) until a restart after the promotion.
    NoHotStandby,
}

impl Mode {
    /// As `nextgres.status()` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Takeover => "takeover",
            Mode::SidePort => "side port",
            Mode::SslKeptByServer => "off: ssl = on",
            Mode::NoHotStandby => "off: recovery without hot_standby",
        }
    }
}

pub fn mode() -> Mode {
    unsafe { MODE }
}

pub fn listeners() -> Vec<RawFd> {
    unsafe { (*std::ptr::addr_of!(LISTENERS)).clone() }
}

pub fn port() -> i32 {
    unsafe { PORT }
}

/// Backends have no use for the pooler's sockets; closing them also means a
/// dying server does not keep the port open through stray children.
pub fn close_inherited() {
    unsafe {
        for fd in (*std::ptr::addr_of_mut!(LISTENERS)).drain(..) {
            let _ = nix::unistd::close(fd);
        }
    }
}

/// Resolves a listen_addresses-style list into socket addresses.
fn resolve(list: &str, port: u16) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item == "*" {
            out.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
            out.push(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port));
        } else if let Ok(ip) = item.parse::<IpAddr>() {
            out.push(SocketAddr::new(ip, port));
        } else {
            match (item, port).to_socket_addrs() {
                Ok(addrs) => out.extend(addrs),
                Err(e) => log_warning(&format!("could not resolve listen address \"{item}\": {e}")),
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A WARNING with a HINT line in the server log (SQLSTATE 0A000).
fn warn_with_hint(msg: String, hint: &str) {
    pgrx::pg_sys::panic::ErrorReport::new(pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, msg, "nextgres")
        .set_hint(hint)
        .report(pgrx::PgLogLevel::WARNING);
}

fn log_warning(msg: &str) {
    pgrx::warning!("nextgres: {msg}");
}

fn bind_one(addr: SocketAddr) -> nix::Result<RawFd> {
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(addr))?;
    socket::listen(&fd, socket::Backlog::new(4096).unwrap_or(socket::Backlog::MAXCONN))?;
    Ok(fd.into_raw_fd())
}

/// Postmaster, `_PG_init`: bind the pooler's sockets (taking over the
/// server's TCP port unless `nextgres.port` names another one).
pub fn take_port() {
    let server_port = crate::pg::server::port();
    let server_addrs = crate::pg::server::listen_addresses();
    let own = settings::LISTEN_ADDRESSES.get().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
    let nport = settings::PORT.get();
    let takeover = nport == 0 || nport == server_port;
    let port = if takeover { server_port } else { nport };
    let addrs = if own.trim().is_empty() { server_addrs.clone() } else { own };
    // A server that starts in recovery without hot standby starts no
    // background worker before its promotion: no agent, no pooler. A port
    // held for it would leave clients hanging (the server answers 57P03).
    let in_recovery = ["standby.signal", "recovery.signal"].iter().any(|f| std::path::Path::new(f).exists());
    if in_recovery && !crate::pg::server::hot_standby() {
        warn_with_hint(
            format!("nextgres: the server starts in recovery with hot_standby = off: the pooler does not listen on port {port}; the server keeps its own TCP listeners on \"{server_addrs}\" and no TCP connection is pooled"),
            "The pooler runs once the server accepts connections; after a promotion, restart the server to let the pooler take the port.",
        );
        unsafe {
            LISTENERS = Vec::new();
            PORT = 0;
            MODE = Mode::NoHotStandby;
        }
        return;
    }
    let ssl = crate::pg::server::ssl_enabled();
    // With ssl = on the pooler serves TLS itself (rustls, the server's
    // certificate and key). Loaded here to decide and kept: the pooler
    // loads its own copy at start and on reload, and falls back to this
    // one when its own load fails.
    let tls_problem = if ssl { crate::pooler::tls::load_at_startup().err() } else { None };
    if takeover && !settings::SSL_TAKEOVER.get() && !addrs.trim().is_empty() {
        if let Some(why) = &tls_problem {
            // Taking the port without TLS would silently give every TCP
            // client plaintext (and fail sslmode=require with no word of
            // nextgres). Leave the port and its TLS to the server, loudly.
            warn_with_hint(
                format!("nextgres: ssl = on but the pooler cannot use the server's TLS settings ({why}): the pooler does not take over port {port}; the server keeps its own TCP listeners on \"{addrs}\" (TLS included) and no TCP connection is pooled"),
                "Fix the certificate or key so the pooler can load it (PEM, without a passphrase), set nextgres.ssl_takeover = on to let the pooler own the port with plaintext connections only (clients with sslmode=require then fail), or nextgres.port to a side port."
            );
            unsafe {
                LISTENERS = Vec::new();
                PORT = 0;
                MODE = Mode::SslKeptByServer;
            }
            return;
        }
    }

    let mut fds = Vec::new();
    for a in resolve(&addrs, port as u16) {
        match bind_one(a) {
            Ok(fd) => fds.push(fd),
            Err(e) => {
                // Same stance as the server: a configured address that cannot
                // be bound is logged; no address at all is fatal.
                log_warning(&format!("could not listen on {a}: {e}"));
            }
        }
    }
    if fds.is_empty() && !addrs.trim().is_empty() {
        pgrx::error!("nextgres: could not listen on any of \"{addrs}\" port {port}");
    }
    if takeover {
        crate::pg::server::override_postmaster_setting(c"listen_addresses", c"");
        // Reloads compare the file's value with that ''.
        if let Ok(c) = std::ffi::CString::new(server_addrs.clone()) {
            if !crate::pg::session::keep_listen_addresses_on_reload(&c) {
                log_warning("could not find the setting listen_addresses: each reload will log that it cannot be changed");
            }
        }
        pgrx::log!(
            "nextgres: pooler owns TCP port {port} on \"{addrs}\"; the server keeps only its Unix socket (listen_addresses cleared)"
        );
        match (&tls_problem, ssl) {
            (Some(why), _) => warn_with_hint(
                format!("nextgres: nextgres.ssl_takeover = on: the pooler owns port {port} without TLS although ssl = on (it cannot use the server's TLS settings: {why}); TCP clients get plaintext only and clients with sslmode=require fail"),
                "Turn nextgres.ssl_takeover off to keep the server's TLS listeners on the port, or fix the certificate or key.",
            ),
            (None, true) => pgrx::log!("nextgres: the pooler serves TLS on port {port} with the server's ssl_cert_file and ssl_key_file"),
            (None, false) => {}
        }
    } else {
        pgrx::log!("nextgres: pooler listens on side port {port} on \"{addrs}\"; the server keeps its own TCP listeners");
        if let Some(why) = &tls_problem {
            pgrx::log!("nextgres: the side port {port} is plaintext only (the pooler cannot use the server's TLS settings: {why}); the server's port keeps TLS");
        }
    }
    unsafe {
        LISTENERS = fds;
        PORT = port;
        MODE = if takeover { Mode::Takeover } else { Mode::SidePort };
    }
}
