//! The pooler: a process forked by the nextgres background worker (the
//! agent), with one epoll loop over the listen sockets, client connections
//! and pooled backends' control sockets.
//!
//! * `agent`: the background worker, the pooler process it forks, and what
//!   runs in which (catalog requests over a socketpair).
//! * `listener`: accept, client limit.
//! * `refusing`: refused connections, read for a CancelRequest first.
//! * `client`: client connections, their buffers, state and ends; idle clients.
//! * `startup`: startup packet, SSLRequest (TLS through `tls`), GSS refusal.
//! * `cancel`: CancelRequests, routed to the client's backend, answered for
//!   a waiting query, or passed on to the server.
//! * `auth`: the server's hba decision and the password exchanges.
//! * `password`: the `password` method's PBKDF2 runs, on threads.
//! * `backend`: pool logins through the Unix socket, parked/attached backends.
//! * pools themselves (queues, limits) are pure logic in `nextgres_core::pool`.
//! * `dedicated`: replication clients, each on a walsender of its own.
//! * `handoff`: passing a client's socket to a backend.
//! * `drain`: closing a database's backends for DROP DATABASE and friends.
//! * `janitor`: periodic upkeep (timeouts).
//! * `keep`: a pool keeps its last backend while a new pool login would
//!   fail (a password changed since its clients logged in).
//! * `kq`: the kernel queue (on by default): pools' clients in an epoll
//!   set that lent backends take them from, without the pooler.
//! * `limits`: connection slots for pool logins, a lowered pool_size.
//! * `poolconf`: per-pool settings from `ALTER ROLE / DATABASE ... SET`.
//! * `ops`: pause, resume and reconnect requested through SQL.
//! * `park`: idle TLS clients without their relay thread.
//! * `stats`: the shared tables the SQL functions read.
//! * `tls`: the server's TLS settings (rustls) and the per-client relay threads.
mod agent;
mod ahead;
mod auth;
mod auth_delay;
mod backend;
mod cancel;
mod client;
mod startup;
pub(crate) mod conn;
mod dedicated;
mod drain;
mod handoff;
mod janitor;
mod keep;
mod kq;
mod limits;
mod listener;
mod ops;
mod park;
mod password;
mod poolconf;
pub mod refusing;
mod relay;
mod ring;
mod stats;
pub(crate) mod tls;
mod worker;

pub use worker::register;
