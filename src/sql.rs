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

/// `total_us / n` in milliseconds; NULL when nothing was counted.
fn avg_ms(total_us: i64, n: i64) -> Option<f64> {
    (n > 0).then(|| total_us as f64 / n as f64 / 1000.0)
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
        name!(backends_dedicated, i32),
        name!(transactions, i64),
        name!(queries, i64),
        name!(xact_time_ms, f64),
        name!(waits, i64),
        name!(wait_time_ms, f64),
        name!(max_wait_ms, f64),
        name!(pool_size, i32),
        name!(pool_mode, &'static str),
        name!(query_time_ms, f64),
        name!(avg_query_ms, Option<f64>),
        name!(avg_xact_ms, Option<f64>),
        name!(avg_wait_ms, Option<f64>),
        name!(bytes_sent, i64),
        name!(bytes_received, i64),
        name!(attaches_ahead, i64),
        name!(kernel_queue_transactions, i64),
        name!(paused, bool),
    ),
> {
    // A backend lent to a pool's kernel queue counts as parked in the
    // pooler's row; one serving a queued client now (read live: the pooler
    // is not told) is attached, and that client active.
    let t = tables();
    let (pools, serving) = t.snapshot_pools_serving();
    let pauses = t.pauses();
    TableIterator::new(pools.into_iter().map(move |(row, p)| {
        let (database, role) = (shmem::name(&p.database), shmem::name(&p.role));
        let paused = shmem::pause_covers(&pauses, &database, &role);
        // The live read only moves backends (and their clients) from parked
        // to attached; it never changes the pooler's totals. A backend the
        // pooler already took back from the queue (counted attached) can
        // still show a queued client taken for a moment: counted twice
        // without this bound (a pool of 4 once read as 5 shared backends), as
        // can a pinned client its lent backend just took.
        let served = serving.get(&row).copied().unwrap_or(0).min(p.backends_parked).min(p.clients_idle).max(0);
        (
            database,
            role,
            p.clients_idle - served,
            p.clients_active + served,
            p.clients_waiting,
            p.backends_parked - served,
            p.backends_attached + served,
            p.backends_starting,
            p.backends_dedicated,
            p.xacts,
            p.queries,
            p.xact_us as f64 / 1000.0,
            p.waits,
            p.wait_us as f64 / 1000.0,
            p.max_wait_us as f64 / 1000.0,
            p.pool_size,
            if p.dedicated_mode {
                "dedicated"
            } else if p.session_mode {
                "session"
            } else {
                "transaction"
            },
            p.query_us as f64 / 1000.0,
            avg_ms(p.query_us, p.queries),
            avg_ms(p.xact_us, p.xacts),
            avg_ms(p.wait_us, p.waits),
            p.bytes_sent,
            p.bytes_received,
            p.attaches_ahead,
            p.kq_xacts,
            paused,
        )
    }))
}

/// One row per pause in force (`pause()` until its `resume()`), whether or
/// not the database has pools yet; role NULL for a whole database's.
#[pg_extern(name = "pauses_fn")]
fn pauses() -> TableIterator<'static, (name!(database, String), name!(role, Option<String>))> {
    let mut rows = tables().pauses();
    rows.sort();
    TableIterator::new(rows.into_iter().map(|(d, r)| (d, (!r.is_empty()).then_some(r))))
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
        // Columns of an existing function keep their position and type
        // (no upgrade scripts: an older catalog row type stays); new ones
        // are appended.
        name!(tls, Option<String>),
        name!(dedicated, bool),
        name!(client_dn, Option<String>),
        name!(tls_cipher, Option<String>),
        name!(tls_relay, Option<String>),
    ),
> {
    let (clients, serving, backends) = tables().snapshot_clients_serving();
    TableIterator::new(clients.into_iter().map(move |(row, c)| {
        // Its backend is its dedicated session (pinned, outside pool_size)?
        let dedicated = c.backend_pid != 0 && backends.iter().any(|b| b.pid == c.backend_pid && b.dedicated);
        // Served from its pool's kernel queue now (the pooler is not told).
        let (state, backend_pid) = match serving.get(&row) {
            Some(&pid) => (ClientState::Active, pid),
            None => (c.state, c.backend_pid),
        };
        (
            shmem::name(&c.addr),
            c.port,
            shmem::name(&c.database),
            shmem::name(&c.role),
            client_state(state).to_string(),
            (backend_pid != 0).then_some(backend_pid),
            ts(c.connected_at),
            c.xacts,
            c.tls.then(|| shmem::name(&c.tls_version)),
            dedicated,
            Some(shmem::name(&c.client_dn)).filter(|t| !t.is_empty()),
            c.tls.then(|| shmem::name(&c.tls_cipher)),
            // "thread": a relay thread carries it; "parked": idle, its TLS
            // read inline by the pooler, no thread (pooler::park).
            c.tls.then(|| if c.tls_parked { "parked" } else { "thread" }.to_string()),
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
        name!(dedicated, bool),
        name!(clients_queued, i32),
    ),
> {
    let (backends, names, clients, serving) = tables().snapshot_backends_joined();
    TableIterator::new(backends.into_iter().map(move |b| {
        let (db, role) = names.get(b.pool as usize).cloned().unwrap_or_default();
        // Lent to its pool's kernel queue: attached while it serves a queued
        // client (read live), parked while it waits for one.
        let queued_client = (b.state == BackendState::Lent)
            .then(|| serving.iter().find(|(_, &pid)| pid == b.pid).map(|(&r, _)| r as i32))
            .flatten();
        let client_row = queued_client.unwrap_or(b.client_row);
        let client = (client_row >= 0).then(|| clients.get(client_row as usize).copied()).flatten().filter(|c| c.in_use);
        (
            // 0 while its login has not forked yet (joins with
            // pg_stat_activity on pid leave it out; NULL would break
            // clients that read the column as a plain integer).
            b.pid,
            db,
            role,
            match b.state {
                BackendState::Starting => "starting",
                BackendState::Parked => "parked",
                BackendState::Attached => "attached",
                BackendState::Lent if queued_client.is_some() => "attached",
                BackendState::Lent => "parked",
            }
            .to_string(),
            client.map(|c| shmem::name(&c.addr)),
            client.map(|c| c.port),
            b.xacts,
            ts(b.since),
            pin_name(b.pin),
            b.dedicated,
            b.queued(),
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
        5 => Some("sequence value".into()),
        6 => Some("temporary object".into()),
        7 => Some("statement not bound yet".into()),
        _ => None,
    }
}

/// "database \"db\"" or "role \"r\" in database \"db\"" for log lines.
fn target(database: &str, role: Option<&str>) -> String {
    match role {
        Some(r) => format!("pool of role \"{r}\" for database \"{database}\""),
        None => format!("pools of database \"{database}\""),
    }
}

/// Waits until the pooler has acted on operation generation `gen`
/// (`cond` true) or `wait_seconds` pass (< 0: no limit). Returns whether
/// `cond` held. The pooler's acknowledgement is awaited past the deadline
/// (up to `ACK_WITHIN` more): `cond` says nothing before it, and a
/// `pause(..., 0)` with nothing running answered false before (hunt9c 10).
fn wait_for(t: &shmem::Tables, gen: u64, wait_seconds: i32, mut cond: impl FnMut(&shmem::Tables) -> bool) -> bool {
    const ACK_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_seconds.max(0) as u64);
    loop {
        let acked = t.header().ops_ack.load(std::sync::atomic::Ordering::SeqCst) >= gen;
        if acked && cond(t) {
            return true;
        }
        let now = std::time::Instant::now();
        if wait_seconds >= 0 && now >= deadline && (acked || now >= deadline + ACK_WITHIN) {
            return false;
        }
        if t.pooler_pid() == 0 {
            return false;
        }
        crate::pg::poolconf::wait_ms(10);
    }
}

/// An empty database or role name names nothing (NULL role: every role):
/// refused, as an empty name is by the server (`zero-length delimited
/// identifier`), instead of reaching every pool.
fn check_names(database: Option<&str>, role: Option<&str>) {
    if database == Some("") || role == Some("") {
        pgrx::ereport!(
            ERROR,
            pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "nextgres: an empty database or role name names no pool",
            "Name the database; NULL as the role names every role of it."
        );
    }
}

/// As pg_terminate_backend (signalfuncs.c pg_signal_backend()): a role
/// without SUPERUSER, granted these functions, may not end the sessions of
/// roles with it, and may end another role's only with that role's
/// privileges or those of `pg_signal_backend` (42501, the server's message
/// and detail from 16). `targets`: the roles whose clients would end, by
/// name and by the oid their clients authenticated as where the pooler
/// knows it (a rename may have given the name to another role since);
/// `every_role`: no role named, so every role's, which only a superuser may.
fn check_may_kill(targets: &[(String, u32)], every_role: bool) {
    if crate::pg::caller_is_superuser() {
        return;
    }
    let refuse = |detail: &str| -> ! {
        pgrx::ereport!(ERROR, pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, "permission denied to terminate process", detail);
    };
    const SUPERUSER_DETAIL: &str = "Only roles with the SUPERUSER attribute may terminate processes of roles with the SUPERUSER attribute; without that attribute, name a role of no superuser.";
    if every_role {
        refuse(SUPERUSER_DETAIL);
    }
    for (name, oid) in targets {
        let Some(oid) = Some(*oid).filter(|&o| o != 0).or_else(|| crate::pg::role_oid(name)) else { continue };
        if crate::pg::role_oid_is_superuser(oid) {
            refuse(SUPERUSER_DETAIL);
        }
        if !crate::pg::caller_may_signal_role(oid) {
            refuse("Only roles with privileges of the role whose process is being terminated or with privileges of the \"pg_signal_backend\" role may terminate this process.");
        }
    }
}

/// A NULL database (or wait) is refused (22004, as the server refuses a
/// NULL where it needs a value) instead of failing inside the function
/// (XX000); the functions are not STRICT because NULL as the role means
/// every role.
fn required<T>(value: Option<T>, what: &str, hint: &str) -> T {
    let Some(v) = value else {
        pgrx::ereport!(ERROR, pgrx::PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, format!("nextgres: {what} must not be NULL"), hint);
    };
    v
}

/// `wait_seconds`, which must not be NULL (`required`).
fn wait_seconds(value: Option<i32>) -> i32 {
    required(value, "wait_seconds", "A wait_seconds below 0 waits without limit.")
}

/// The named pools' database and role, checked (`required`, `check_names`).
fn names<'a>(database: Option<&'a str>, role: Option<&'a str>) -> (&'a str, Option<&'a str>) {
    check_names(database, role);
    (required(database, "the database", "Name the database; NULL as the role names every role of it."), role)
}

/// Queues operation `kind` for the pooler (names already checked).
fn op(kind: u8, database: &str, role: Option<&str>) -> u64 {
    let t = tables();
    let gen = t.op_add(kind, database, role.unwrap_or("")).unwrap_or_else(|full| op_slots_full(full));
    t.wake_pooler();
    gen
}

/// No slot for an operation (54000): `OP_PAUSES_MAX` pauses in force, or
/// every slot holds a pause or an operation the pooler has not taken yet.
fn op_slots_full(full: shmem::OpFull) -> ! {
    if full == shmem::OpFull::Pauses {
        pgrx::ereport!(
            ERROR,
            pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("nextgres: too many pauses in force (at most {})", shmem::OP_PAUSES_MAX),
            "nextgres.resume() ends pauses; one pause of a database (role NULL) covers every role of it."
        );
    }
    pgrx::ereport!(
        ERROR,
        pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        format!("nextgres: too many operations pending ({} slots)", shmem::OP_SLOTS),
        "The pooler takes operations within a second, and pauses hold their slot until nextgres.resume(); try again. If the pooler does not run, nextgres.status() says why."
    );
}

/// Pauses the pools of `database` (or one role's): no transaction starts
/// there, clients wait; running transactions finish. Waits up to
/// `wait_seconds` (< 0: no limit) until no backend of those pools serves a
/// client and returns true, or false if some still does (a session-mode
/// client, or a long transaction); the pause stays in force either way until
/// `nextgres.resume()`. PgBouncer's PAUSE.
#[pg_extern]
fn pause(database: Option<&str>, role: default!(Option<&str>, "NULL"), wait_seconds: default!(Option<i32>, 60)) -> bool {
    let (database, role) = names(database, role);
    let wait_seconds = self::wait_seconds(wait_seconds);
    // A pause stays until resumed, whatever it names: a misspelt name
    // would pause nothing now, and a database or role created later by
    // that name (PgBouncer's PAUSE refuses an unknown database too).
    if !crate::pg::database_exists(database) {
        pgrx::ereport!(ERROR, pgrx::PgSqlErrorCode::ERRCODE_INVALID_CATALOG_NAME, format!("database \"{database}\" does not exist"));
    }
    if let Some(r) = role.filter(|r| !crate::pg::role_exists(r)) {
        pgrx::ereport!(ERROR, pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("role \"{r}\" does not exist"));
    }
    let gen = op(shmem::OP_PAUSE, database, role);
    pgrx::log!("nextgres: pause of the {} requested", target(database, role));
    let t = tables();
    // The caller's own backend, when it is a pooled session of a paused
    // pool, serves its caller until this returns: not waited for (it
    // could never finish first).
    let me = crate::pg::my_pid();
    wait_for(&t, gen, wait_seconds, |t| {
        let (backends, names) = t.backends_and_pool_names();
        // A backend lent to a kernel queue may be in a queued client's
        // transaction: waited for until it is recalled (`ops_check`).
        backends.iter().filter(|b| b.pid != me && matches!(b.state, shmem::BackendState::Attached | shmem::BackendState::Lent)).all(|b| {
            !names.get(b.pool as usize).is_some_and(|(d, r)| d == database && role.is_none_or(|x| x == r))
        })
    })
}

/// Ends the pauses of `database` (or of one role's pool only; NULL ends
/// every pause of the database): waiting clients are served again. Returns
/// how many pauses ended. PgBouncer's RESUME.
#[pg_extern]
fn resume(database: Option<&str>, role: default!(Option<&str>, "NULL")) -> i32 {
    let (database, role) = names(database, role);
    let t = tables();
    let (n, gen) = t.ops_resume(database, role);
    t.wake_pooler();
    pgrx::log!("nextgres: resume of the {} requested ({n} pauses ended)", target(database, role));
    wait_for(&t, gen, 10, |_| true);
    n as i32
}

/// Replaces the backends of the pools of `database` (or one role's) at
/// their next transaction boundary (parked ones at once), e.g. after ALTER
/// SYSTEM, an extension upgrade or a role change. Returns once the pooler
/// has taken the request. PgBouncer's RECONNECT.
#[pg_extern]
fn reconnect(database: Option<&str>, role: default!(Option<&str>, "NULL")) {
    let (database, role) = names(database, role);
    let gen = op(shmem::OP_RECONNECT, database, role);
    pgrx::log!("nextgres: reconnect of the {} requested", target(database, role));
    wait_for(&tables(), gen, 10, |_| true);
}

/// Disconnects every client of the pools of `database` (or one role's) with
/// FATAL 57P01, ending their transactions (backends serving them are
/// terminated, as by pg_terminate_backend), and closes the pools' parked
/// backends. Returns once the pooler has acted. PgBouncer's KILL.
#[pg_extern]
fn kill_clients(database: Option<&str>, role: default!(Option<&str>, "NULL")) {
    let (database, role) = names(database, role);
    // The named role, and the roles its pools' clients authenticated as.
    let mut targets = tables().pool_roles(Some(database), role, None);
    targets.extend(role.map(|r| (r.to_string(), 0)));
    check_may_kill(&targets, role.is_none());
    let gen = op(shmem::OP_KILL, database, role);
    pgrx::log!("nextgres: kill of the clients of the {} requested", target(database, role));
    wait_for(&tables(), gen, 10, |_| true);
}

/// Disconnects the one client at `client_addr` and `client_port` (as
/// `nextgres.clients` shows them) with FATAL 57P01, as pg_terminate_backend
/// does to a direct session: a backend serving it is terminated (SIGTERM),
/// which rolls its transaction back. Returns false when no such client is
/// connected, true once the pooler has acted. Logged. PgBouncer's KILL_CLIENT.
#[pg_extern]
fn kill_client(client_addr: &str, client_port: i32) -> bool {
    let t = tables();
    let (_, clients, _) = t.snapshot();
    let Some(c) = clients.iter().find(|c| c.port == client_port && shmem::name(&c.addr) == client_addr) else {
        return false;
    };
    // Its pool's role by oid (none yet while it logs in: by name only).
    let mut targets = usize::try_from(c.pool).map_or_else(|_| Vec::new(), |row| t.pool_roles(None, None, Some(row)));
    targets.push((shmem::name(&c.role), 0));
    check_may_kill(&targets, false);
    let gen = t.op_add_port(shmem::OP_KILL_CLIENT, client_addr, "", client_port).unwrap_or_else(|full| op_slots_full(full));
    t.wake_pooler();
    pgrx::log!("nextgres: kill of client {client_addr} port {client_port} requested");
    wait_for(&t, gen, 10, |_| true)
}

/// Waits until every backend the pools of `database` (or one role's) have
/// now is gone (after `reconnect()` or `kill_clients()`: until the old
/// backends are closed; new ones may have logged in meanwhile). Returns
/// false if some remains after `wait_seconds` (< 0: no limit). PgBouncer's
/// WAIT_CLOSE.
#[pg_extern]
fn wait_close(database: Option<&str>, role: default!(Option<&str>, "NULL"), wait_seconds: default!(Option<i32>, 60)) -> bool {
    let (database, role) = names(database, role);
    let wait_seconds = self::wait_seconds(wait_seconds);
    let t = tables();
    let me = crate::pg::my_pid();
    let mine = |t: &shmem::Tables| -> Vec<i32> {
        let (backends, names) = t.backends_and_pool_names();
        backends
            .iter()
            .filter(|b| {
                names.get(b.pool as usize).is_some_and(|(d, r)| d == database && role.is_none_or(|x| x == r))
            })
            .map(|b| b.pid)
            // The caller's own, if pooled there; and logins not forked yet
            // (pid 0: every one would look like the same survivor).
            .filter(|&p| p != me && p > 0)
            .collect()
    };
    let before = mine(&t);
    let gen = t.header().ops_ack.load(std::sync::atomic::Ordering::SeqCst);
    wait_for(&t, gen, wait_seconds, |t| {
        let now = mine(t);
        before.iter().all(|p| !now.contains(p))
    })
}

/// Sets the counters of `nextgres.pools` (transactions, queries,
/// xact_time_ms, waits, wait_time_ms, max_wait_ms) to 0 for the pools of `database` and `role` (NULL: all).
/// Returns once the pooler has done it. Logged.
#[pg_extern]
fn reset_stats(database: default!(Option<&str>, "NULL"), role: default!(Option<&str>, "NULL")) {
    // NULL: every database ("" to the pooler); an empty name is refused.
    check_names(database, role);
    let gen = op(shmem::OP_RESET_STATS, database.unwrap_or(""), role);
    pgrx::log!(
        "nextgres: statistics reset of the {} requested",
        match (database, role) {
            (Some(d), _) => target(d, role),
            (None, Some(r)) => format!("pools of role \"{r}\" for every database"),
            (None, None) => "pools of every database".to_string(),
        }
    );
    wait_for(&tables(), gen, 10, |_| true);
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
