//! Helpers shared by the session-state tests (session_*.rs): running a test
//! body under a deadline with the server log on failure, one-value queries,
//! what `nextgres.backends` says about a backend, and a raw protocol client
//! for a client that dies without saying goodbye.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use nextgres_test::{wait_until, with_timeout, Builder, Cluster, StopOnFailure};
use postgres::{Client, SimpleQueryMessage};

/// Bound on anything that must happen "soon" (2-core CI): it only decides
/// when a wait counts as a hang, never a speed.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Starts the cluster, runs `setup` SQL as the superuser (statement by
/// statement) and then `body` under `limit`. On failure the server log tail
/// is printed and the server stopped at once, so a body thread stuck on a
/// socket comes loose instead of hanging the run.
pub fn run(
    builder: Builder,
    setup: &str,
    limit: Duration,
    body: impl FnOnce(&Cluster) + Send + 'static,
) {
    let pg = Arc::new(start_retrying(builder));
    exec(&pg, setup);
    let guard = StopOnFailure(pg.clone());
    let pg2 = pg.clone();
    let name = std::thread::current()
        .name()
        .unwrap_or("test")
        .to_string();
    with_timeout(limit, &name, move || body(&pg2));
    drop(guard);
}

/// The lead may be reinstalling the extension while tests start: one retry
/// after a short pause before calling it a failure.
fn start_retrying(builder: Builder) -> Cluster {
    match builder.clone().try_start() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("session tests: cluster did not start, retrying once: {e}");
            std::thread::sleep(Duration::from_secs(5));
            builder.start()
        }
    }
}


/// Runs `;`-separated statements one by one as the superuser over the Unix
/// socket (straight to PostgreSQL), panicking on error.
#[track_caller]
pub fn exec(pg: &Cluster, sql: &str) {
    let mut admin = pg.admin();
    for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        if let Err(e) = admin.batch_execute(stmt) {
            panic!("{stmt}: {e:?}");
        }
    }
}

/// First column of the first row of a simple-query reply (None for NULL or
/// no row).
pub fn first_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
        _ => None,
    })?
}

/// Every row of a simple-query reply as `a|b|c` (NULL shown as `<null>`).
pub fn rows_text(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("<null>").to_string())
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect()
}

/// One value by simple query; panics (with the query) on error or NULL.
#[track_caller]
pub fn one(c: &mut Client, sql: &str) -> String {
    match c.simple_query(sql) {
        Ok(m) => first_value(&m).unwrap_or_else(|| panic!("{sql}: no value")),
        Err(e) => panic!("{sql}: {e:?}"),
    }
}

/// One value, NULL allowed.
#[track_caller]
pub fn maybe(c: &mut Client, sql: &str) -> Option<String> {
    match c.simple_query(sql) {
        Ok(m) => first_value(&m),
        Err(e) => panic!("{sql}: {e:?}"),
    }
}

pub fn pid_of(c: &mut Client) -> i32 {
    one(c, "SELECT pg_backend_pid()").parse().expect("a pid")
}

/// SQLSTATE of a server error, or "none"/"io" for other failures.
pub fn sqlstate(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => d.code().code().to_string(),
        None => format!("not a server error: {e}"),
    }
}

/// A bigint the superuser reads.
#[track_caller]
pub fn admin_i64(pg: &Cluster, sql: &str) -> i64 {
    pg.admin()
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// (state, pinned_by) of a pooled backend in nextgres.backends.
pub fn backend_row(pg: &Cluster, pid: i32) -> Option<(String, Option<String>)> {
    pg.admin()
        .query_opt(
            "SELECT state, pinned_by FROM nextgres.backends WHERE pid = $1",
            &[&pid],
        )
        .expect("nextgres.backends")
        .map(|r| (r.get(0), r.get(1)))
}

/// Waits until nextgres.backends shows `pid` as (state, pinned_by); panics
/// with the whole view otherwise. The backend writes its row right after
/// ReadyForQuery, so the client may see its reply a moment before.
#[track_caller]
pub fn expect_backend(pg: &Cluster, pid: i32, state: &str, pinned_by: Option<&str>) {
    let want = (state.to_string(), pinned_by.map(str::to_string));
    let ok = wait_until(SETTLE, || backend_row(pg, pid).as_ref() == Some(&want));
    if !ok {
        let all: Vec<String> = pg
            .admin()
            .query(
                "SELECT concat_ws(' ', pid, role, state, coalesce(pinned_by, '<null>'), transactions)
                   FROM nextgres.backends ORDER BY pid",
                &[],
            )
            .expect("nextgres.backends")
            .iter()
            .map(|r| r.get(0))
            .collect();
        panic!("backend {pid}: expected {want:?}, nextgres.backends has:\n{}", all.join("\n"));
    }
}

/// Sets `nextgres.*` settings with ALTER SYSTEM and waits until a pooled
/// client of `role` sees them (the pooler reads them at SIGHUP).
pub fn reload(pg: &Cluster, settings: &[(&str, &str)]) {
    let mut admin = pg.admin();
    for (k, v) in settings {
        admin
            .batch_execute(&format!("ALTER SYSTEM SET {k} = '{v}'"))
            .expect("ALTER SYSTEM");
    }
    admin.batch_execute("SELECT pg_reload_conf()").expect("reload");
    let ok = wait_until(SETTLE, || {
        settings.iter().all(|(k, v)| {
            pg.admin()
                .query_one(&format!("SELECT current_setting('{k}')"), &[])
                .map(|r| r.get::<_, String>(0) == *v)
                .unwrap_or(false)
        })
    });
    assert!(ok, "settings {settings:?} never took effect");
}

// ---- raw protocol client -------------------------------------------------------

/// A raw protocol client (trust) through the pooler, for a client that
/// vanishes without Terminate, as a killed process does.
#[allow(dead_code)] // not every session test binary uses it
#[track_caller]
pub fn raw(pg: &Cluster, user: &str, db: &str) -> nextgres_test::raw::Raw {
    nextgres_test::raw::Raw::connect(pg.port(), user, db, SETTLE)
}
