//! Recognising a pool login. The pooler logs backends in through the Unix
//! socket with a startup option carrying a per-boot token; the option is only
//! honoured when the socket's peer is the pooler process itself (SO_PEERCRED),
//! so a direct client cannot turn its session into a pooled one.
use crate::pg::comm::ClientAuthentication_hook;
use crate::pg::glue;
use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr};

pub const TOKEN_OPTION: &CStr = c"nextgres.pool_token";

thread_local! {
    static POOLED: Cell<bool> = const { Cell::new(false) };
}

static mut PREV_HOOK: Option<unsafe extern "C" fn(*mut c_void, c_int)> = None;

pub fn is_pooled() -> bool {
    POOLED.with(|p| p.get())
}

/// A replication client's walsender got its client for good: from now on
/// it is an ordinary backend (every nextgres hook dormant again).
pub fn unpool() {
    POOLED.with(|p| p.set(false));
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
    // Backends inherit the pooler's listen sockets from the postmaster; they
    // have no use for them.
    crate::postmaster::listen::close_inherited();

    let Some(token) = glue::port_take_option(port, TOKEN_OPTION) else { return };
    if status != 0 {
        return; // authentication already failed; the server reports it
    }
    let peer = glue::port_peer_pid(port);
    let ok = crate::shmem::tables().is_some_and(|t| {
        let pid = t.pooler_pid();
        pid != 0 && peer == pid && constant_time_eq(hex(&t.header().token).as_bytes(), token.as_bytes())
    });
    if !ok {
        pgrx::ereport!(
            pgrx::PgLogLevel::FATAL,
            pgrx::PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
            "nextgres: invalid pooled-backend login",
            "Only the nextgres pooler may use the nextgres.pool_token startup option."
        );
    }
    POOLED.with(|p| p.set(true));
    crate::pg::logger::init();
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
