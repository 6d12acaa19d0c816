//! Recognising a pool login. The pooler logs backends in through the Unix
//! socket with a startup option carrying a per-boot token; the option is only
//! honoured when the socket's peer is the pooler process itself (SO_PEERCRED),
//! so a direct client cannot turn its session into a pooled one.
use crate::pg::comm::ClientAuthentication_hook;
use crate::pg::glue;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::ffi::{c_int, c_void, CStr};

pub const TOKEN_OPTION: &CStr = c"nextgres.pool_token";
/// With the token: this login is not a pool login but a client whose
/// pg_hba.conf method the pooler does not implement; the server itself
/// authenticates it on its own socket (`server_auth`).
pub const SERVER_AUTH_OPTION: &CStr = c"nextgres.server_auth";

/// This backend is a pool login (asked on every message the backend
/// sends: a plain static, not a thread-local, see comm.rs).
static POOLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Inside the server's second `ClientAuthentication()` (`server_auth`).
    static IN_SERVER_AUTH: Cell<bool> = const { Cell::new(false) };
}

static mut PREV_HOOK: Option<unsafe extern "C" fn(*mut c_void, c_int)> = None;

pub fn is_pooled() -> bool {
    POOLED.load(Relaxed)
}

fn set_pooled(on: bool) {
    POOLED.store(on, Relaxed);
    crate::pg::session::set_pooled_backend(on);
}

/// A replication client's walsender got its client for good: from now on
/// it is an ordinary backend (every nextgres hook dormant again).
pub fn unpool() {
    set_pooled(false);
}

pub fn install() {
    unsafe {
        PREV_HOOK = ClientAuthentication_hook;
        ClientAuthentication_hook = Some(client_authentication);
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn client_authentication_guarded(port: *mut c_void, status: c_int) {
    if let Some(prev) = PREV_HOOK {
        prev(port, status);
    }
    if IN_SERVER_AUTH.with(|g| g.get()) {
        return; // the client's own authentication (`server_auth`): nothing of ours
    }
    // Backends inherit the pooler's listen sockets from the postmaster; they
    // have no use for them.
    crate::postmaster::listen::close_inherited();

    let server_auth = glue::port_take_option(port, SERVER_AUTH_OPTION).is_some();
    let token = glue::port_take_option(port, TOKEN_OPTION);
    if status != 0 {
        return; // authentication already failed; the server reports it
    }
    let Some(token) = token else {
        if server_auth {
            invalid_login();
        }
        return;
    };
    let peer = glue::port_peer_pid(port);
    let ok = crate::shmem::tables().is_some_and(|t| {
        let pid = t.pooler_pid();
        pid != 0 && peer == pid && constant_time_eq(hex(&t.header().token).as_bytes(), token.as_bytes())
    });
    if !ok {
        invalid_login();
    }
    if server_auth {
        return server_auth_client();
    }
    set_pooled(true);
    crate::pg::logger::init();
}

fn invalid_login() {
    pgrx::ereport!(
        pgrx::PgLogLevel::FATAL,
        pgrx::PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
        "nextgres: invalid pooled-backend login",
        "Only the nextgres pooler may use the nextgres.pool_token startup option."
    );
}

fn login_fatal(msg: &str) -> ! {
    pgrx::ereport!(
        pgrx::PgLogLevel::FATAL,
        pgrx::PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
        format!("nextgres: server authentication: {msg}")
    );
    unreachable!()
}

/// The pooler's login for a client whose pg_hba.conf method it does not
/// implement (pooler `dedicated.rs`), verified above as the pooler's own
/// (token + SO_PEERCRED). Asks the pooler for the client's socket on the
/// login socket (the server has read exactly the startup packet from it, so
/// libpq's receive buffer is empty), puts it under `MyProcPort->sock`, and
/// runs the server's `ClientAuthentication()` again for the client
/// (`glue::server_authenticate`): the real address, pg_hba.conf and the
/// method's exchange with the client, as for a direct connection. Failure
/// is the server's own FATAL to the client. On success the server queued
/// AuthenticationOk for the client; the one the outer call queues when this
/// hook returns is dropped (`comm::swallow_auth_ok`). From then on this is an
/// ordinary backend of its client (never pooled); the pooler forgot both.
fn server_auth_client() {
    use nextgres_core::control;
    use std::os::fd::BorrowedFd;
    let sock = glue::port_sock();
    let mut req = Vec::new();
    control::write_socket_request(&mut req, std::process::id() as i32, &glue::my_cancel_key());
    let wait = |flags: nix::poll::PollFlags| {
        pgrx::check_for_interrupts!(); // authentication_timeout ends the wait
        let fd = unsafe { BorrowedFd::borrow_raw(sock) };
        let _ = nix::poll::poll(&mut [nix::poll::PollFd::new(fd, flags)], nix::poll::PollTimeout::from(1000u16));
    };
    let mut sent = 0;
    while sent < req.len() {
        match nix::sys::socket::send(sock, &req[sent..], nix::sys::socket::MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => wait(nix::poll::PollFlags::POLLOUT),
            Err(e) => login_fatal(&format!("could not ask the pooler for the client socket: {e}")),
        }
    }
    let (mut inbuf, mut client_fd) = (Vec::new(), None);
    loop {
        let mut buf = [0u8; 1024];
        let mut fds = [-1; 1];
        match super::park::recv_with_fd(sock, &mut buf, &mut fds, nix::sys::socket::MsgFlags::empty()) {
            Ok((0, _)) => login_fatal("the pooler closed the connection"),
            Ok((n, nfds)) => {
                inbuf.extend_from_slice(&buf[..n]);
                if nfds == 1 {
                    if let Some(old) = client_fd.replace(fds[0]) {
                        let _ = nix::unistd::close(old);
                    }
                }
            }
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => wait(nix::poll::PollFlags::POLLIN),
            Err(e) => login_fatal(&format!("could not receive the client socket: {e}")),
        }
        match nextgres_core::proto::frame::parse_message(&inbuf, 1 << 16) {
            Ok(Some((m, _))) if m.tag == control::ATTACH && client_fd.is_some() => break,
            Ok(Some(_)) | Err(_) => login_fatal("unexpected message from the pooler"),
            Ok(None) => {}
        }
    }
    let fd = client_fd.expect("checked");
    if let Err(e) = nix::unistd::dup2(fd, sock) {
        login_fatal(&format!("could not take the client socket: {e}"));
    }
    let _ = nix::unistd::close(fd);
    glue::febe_attach();
    IN_SERVER_AUTH.with(|g| g.set(true));
    // Returns only when the client authenticated.
    let ok = unsafe { glue::server_authenticate() };
    IN_SERVER_AUTH.with(|g| g.set(false));
    if !ok {
        login_fatal("the client socket has no peer address");
    }
    super::comm::swallow_auth_ok();
}

unsafe extern "C" fn client_authentication(port: *mut c_void, status: c_int) {
    client_authentication_guarded(port, status)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
