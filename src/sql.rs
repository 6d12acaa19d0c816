//! SQL functions in schema `nextgres` over the shared tables. Views and
//! privileges (pg_monitor) are in sql/nextgres.sql.
use crate::shmem::{self, BackendState, ClientState};
use pgrx::prelude::*;

// The extension script creates (and so owns) schema `nextgres`, so DROP
// EXTENSION removes it. The control file names no schema: a schema named
// there is created before the extension exists and outlives DROP EXTENSION.
#[pg_schema]
mod nextgres {
use super::*;

fn tables() -> shmem::Tables {
    match shmem::tables() {
        Some(t) => t,
        None => {
            // An ERROR (55000) with a HINT, never a FATAL: the session goes on.
            pgrx::pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "nextgres is not loaded: it is not in shared_preload_libraries",
                "nextgres",
            )
            .set_hint("Add nextgres to shared_preload_libraries and restart the server, or DROP EXTENSION nextgres to remove these views.")
            .report(pgrx::PgLogLevel::ERROR);
            unreachable!()
        }
    }
}

fn ts(t: i64) -> Option<TimestampWithTimeZone> {
    (t != 0).then(|| unsafe { TimestampWithTimeZone::from_datum(pgrx::pg_sys::Datum::from(t), false) }).flatten()
}

/// One row per (database, role) pool.
#[pg_extern(name = "pools_fn")]
fn pools() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(role, String),
        name!(clients_idle, i32),
        name!(clients_active, i32),
        name!(clients_waiting, i32),
        name!(backends_parked, i32),
        name!(backends_attached, i32),
        name!(backends_starting, i32),
        name!(transactions, i64),
        name!(waits, i64),
        name!(wait_time_ms, f64),
        name!(max_wait_ms, f64),
        name!(pool_size, i32),
        name!(pool_mode, &'static str),
    ),
> {
    let (pools, _, _) = tables().snapshot();
    TableIterator::new(pools.into_iter().map(|p| {
        (
            shmem::name(&p.database),
            shmem::name(&p.role),
            p.clients_idle,
            p.clients_active,
            p.clients_waiting,
            p.backends_parked,
            p.backends_attached,
            p.backends_starting,
            p.xacts,
            p.waits,
            p.wait_us as f64 / 1000.0,
            p.max_wait_us as f64 / 1000.0,
            p.pool_size,
            if p.session_mode { "session" } else { "transaction" },
        )
    }))
}

fn client_state(s: ClientState) -> &'static str {
    match s {
        ClientState::Login => "login",
        ClientState::Idle => "idle",
        ClientState::Waiting => "waiting",
        ClientState::Active => "active",
    }
}

/// One row per client connection of the pooler.
#[pg_extern(name = "clients_fn")]
fn clients() -> TableIterator<
    'static,
    (
        name!(client_addr, String),
        name!(client_port, i32),
        name!(database, String),
        name!(role, String),
        name!(state, String),
        name!(backend_pid, Option<i32>),
        name!(connected_since, Option<TimestampWithTimeZone>),
        name!(transactions, i64),
    ),
> {
    let (_, clients, _) = tables().snapshot();
    TableIterator::new(clients.into_iter().map(|c| {
        (
            shmem::name(&c.addr),
            c.port,
            shmem::name(&c.database),
            shmem::name(&c.role),
            client_state(c.state).to_string(),
            (c.backend_pid != 0).then_some(c.backend_pid),
            ts(c.connected_at),
            c.xacts,
        )
    }))
}

/// One row per pooled backend.
#[pg_extern(name = "backends_fn")]
fn backends() -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(database, String),
        name!(role, String),
        name!(state, String),
        name!(client_addr, Option<String>),
        name!(client_port, Option<i32>),
        name!(transactions, i64),
        name!(state_since, Option<TimestampWithTimeZone>),
        name!(pinned_by, Option<String>),
    ),
> {
    let t = tables();
    let (_, _, backends) = t.snapshot();
    let names = t.pool_names();
    let clients = t.snapshot_clients_by_row();
    TableIterator::new(backends.into_iter().map(move |b| {
        let (db, role) = names.get(b.pool as usize).cloned().unwrap_or_default();
        let client = (b.client_row >= 0).then(|| clients.get(b.client_row as usize).copied()).flatten().filter(|c| c.in_use);
        (
            b.pid,
            db,
            role,
            match b.state {
                BackendState::Starting => "starting",
                BackendState::Parked => "parked",
                BackendState::Attached => "attached",
            }
            .to_string(),
            client.map(|c| shmem::name(&c.addr)),
            client.map(|c| c.port),
            b.xacts,
            ts(b.since),
            pin_name(b.pin),
        )
    }))
}

/// Why a backend keeps its client between transactions.
fn pin_name(pin: u8) -> Option<String> {
    match pin {
        1 => Some("temporary table".into()),
        2 => Some("WITH HOLD cursor".into()),
        3 => Some("LISTEN".into()),
        4 => Some("session-level lock".into()),
        _ => None,
    }
}

/// Where the pooler listens and whether it runs. `port` is NULL when the
/// pooler listens nowhere; `mode` says why (`takeover`, `side port`, or
/// `off: ssl = on`, see `postmaster::listen::Mode`).
#[pg_extern]
fn status() -> TableIterator<'static, (name!(pooler_pid, Option<i32>), name!(port, Option<i32>), name!(mode, String))> {
    let t = tables();
    let pid = t.pooler_pid();
    let port = t.header().port;
    let mode = crate::postmaster::listen::mode().name().to_string();
    TableIterator::once(((pid != 0).then_some(pid), (port != 0).then_some(port), mode))
}
}

extension_sql_file!("../sql/nextgres.sql", name = "views", finalize);
