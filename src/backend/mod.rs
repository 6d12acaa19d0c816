//! Code that runs inside pooled backends (and, installed from the postmaster,
//! is inherited by every backend but stays dormant in ordinary ones).
//!
//! A pooled backend is an ordinary backend of the client's role and database
//! that the pooler logged in through the Unix socket. After each
//! ReadyForQuery(I) it gives its client back and parks until the pooler hands
//! it the next client's socket (see `park`); lent to its pool's kernel
//! queue, it takes the next client from there itself (`kq`).
mod cancel;
mod comm;
mod drain;
mod kq;
mod login;
mod park;
mod ring;
mod sched;
mod slot;
mod session;

/// Postmaster: install the hooks every backend inherits.
pub fn install() {
    comm::install();
    login::install();
    drain::install();
    crate::pg::session::install_hooks();
}

/// True once this backend proved at login that the pooler started it.
pub(crate) fn is_pooled() -> bool {
    login::is_pooled()
}

/// See `login::unpool`.
pub(crate) fn unpool() {
    login::unpool()
}

/// The token as it travels in the pool login's startup packet.
pub fn token_hex(token: &[u8]) -> String {
    login::hex(token)
}

pub use login::{SERVER_AUTH_OPTION, TOKEN_OPTION};
