//! nextgres: a connection pooler inside PostgreSQL.
//!
//! Where code runs:
//! * `_PG_init` in the postmaster (`settings`, `shmem`, `postmaster`): GUCs,
//!   shared memory, the pooler's listen sockets, hooks every backend inherits.
//! * the pooler background worker (`pooler`): accept, authenticate, pool.
//! * pooled backends (`backend`): release the client at ReadyForQuery(I),
//!   park, attach the next client's socket.
//! * `pg`: thin wrappers over PostgreSQL internals (and `glue.c`).
//! * `nextgres_core` (src/core): the pure protocol, auth and pool logic.
use pgrx::prelude::*;

mod backend;
mod kq_fd;
mod pg;
mod pooler;
mod postmaster;
mod settings;
mod shmem;
mod sql;

pgrx::pg_module_magic!();

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if !pg::server::preloading() {
        // Loaded by CREATE EXTENSION or a SQL call without preloading: the SQL
        // functions then report (ERROR 55000 with a hint) that nextgres is
        // not loaded. No settings: defining PGC_POSTMASTER ones after
        // startup is a FATAL ("cannot create PGC_POSTMASTER variables after
        // startup") that would end the session.
        return;
    }
    settings::define();
    shmem::request();
    postmaster::listen::take_port();
    backend::install();
    pg::poolconf::install_hooks();
    pooler::register();
}
