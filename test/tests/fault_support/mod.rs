//! Helpers shared by the fault suites (`faults.rs`, `faults_more.rs`): a
//! cluster runner with a whole-test deadline, what the nextgres views and
//! pg_stat_activity say, rust-postgres helpers with bounded waits, and a raw
//! protocol-3 client for what drivers hide.
#![allow(dead_code)] // each suite uses its own subset

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use nextgres_test::procs::process_alive;
use nextgres_test::{wait_until, with_timeout, Builder, Cluster};
use postgres::error::SqlState;
use postgres::{Client, SimpleQueryMessage};

/// Pooled clients log in as this role (trust), so their backends are easy to
/// tell from the admin connection (`postgres` over the Unix socket).
pub const APP: &str = "app";
/// A second role: a second pool.
pub const APP2: &str = "app2";
pub const DB: &str = "postgres";
/// Bound on anything that must happen "soon". Generous on purpose (2-core
/// CI): it only decides when a wait counts as a hang, never a speed.
pub const SETTLE: Duration = Duration::from_secs(30);
/// Bound on a whole test body.
pub const TEST_LIMIT: Duration = Duration::from_secs(300);

// ---- running a test ---------------------------------------------------------

/// Starts the cluster, creates the extension, roles and table, and runs
/// `body` under `TEST_LIMIT`. On failure (or timeout) the server log tail is
/// printed, the directory kept, and the server stopped at once so a body
/// thread stuck on a socket comes loose.
pub fn run(builder: Builder, body: impl FnOnce(&Cluster) + Send + 'static) {
    let pg = Arc::new(builder.start());
    setup(&pg);
    pg.run_bounded(TEST_LIMIT, body);
}

pub fn setup(pg: &Cluster) {
    pg.admin()
        .batch_execute(
            "CREATE EXTENSION nextgres;
             CREATE ROLE app LOGIN;
             CREATE ROLE app2 LOGIN;
             CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO t VALUES (1, 0);
             GRANT ALL ON t TO app, app2;",
        )
        .unwrap_or_else(|e| panic!("setup: {e:?}\n{}", pg.log_tail(40)));
}

// ---- what the server says ---------------------------------------------------

pub fn admin_i64(pg: &Cluster, sql: &str) -> i64 {
    pg.admin()
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// `pg_terminate_backend(pid)` from a direct admin session; asserts that
/// the server signalled it (true).
#[track_caller]
pub fn terminate_backend(pg: &Cluster, pid: i32) {
    let ok: bool = pg
        .admin()
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .expect("pg_terminate_backend")
        .get(0);
    assert!(ok, "pg_terminate_backend({pid})");
}

/// `nextgres.status().pooler_pid` (None while no pooler runs).
pub fn pooler_pid(pg: &Cluster) -> Option<i32> {
    pg.admin()
        .query_one("SELECT pooler_pid FROM nextgres.status()", &[])
        .expect("nextgres.status()")
        .get(0)
}

/// The pooler that replaced `old` (the agent starts one about a second
/// after the old one ended); panics after SETTLE, naming `what`.
#[track_caller]
#[allow(dead_code)] // each test binary uses its own part
pub fn new_pooler(pg: &Cluster, old: i32, what: &str) -> i32 {
    let mut new = None;
    assert!(
        wait_until(SETTLE, || {
            new = pooler_pid(pg).filter(|&p| p != old);
            new.is_some()
        }),
        "{what}: no new pooler"
    );
    new.expect("new pooler")
}

/// The running pooler's pid, waiting for one up to [`SETTLE`]: right after
/// the server starts (or the agent restarts) the agent may not have forked
/// it yet, and the listen socket already accepts meanwhile.
#[track_caller]
pub fn running_pooler_pid(pg: &Cluster) -> i32 {
    let mut pid = None;
    wait_until(SETTLE, || {
        pid = pooler_pid(pg);
        pid.is_some()
    });
    pid.unwrap_or_else(|| panic!("no pooler process within {SETTLE:?}"))
}

/// Stops the pooler process (`nextgres.status().pooler_pid`) with SIGTERM:
/// it tells its idle clients 57P01 and exits, and the agent forks a new one.
/// (pg_terminate_backend does not apply: the pooler process has no PGPROC.)
pub fn terminate_pooler(pid: i32) {
    // SAFETY: plain kill(2) on the pooler's pid from nextgres.status().
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill -TERM {pid}");
}

/// pg_terminate_backend of the agent (the `nextgres agent` background
/// worker): it stops its pooler process and exits, and the postmaster
/// starts a new agent (a fresh postmaster child) that forks a new pooler.
pub fn terminate_agent(pg: &Cluster) {
    let ok: bool = pg
        .admin()
        .query_one(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'nextgres agent'",
            &[],
        )
        .expect("terminate the agent")
        .get(0);
    assert!(ok, "pg_terminate_backend of the agent");
}

/// `nextgres.clients` of role `role`: (client_addr, client_port) each.
pub fn client_ports(pg: &Cluster, role: &str) -> Vec<(String, i32)> {
    pg.admin()
        .query("SELECT client_addr, client_port FROM nextgres.clients WHERE role = $1", &[&role])
        .expect("nextgres.clients")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// `nextgres.backends`: (pid, state), by pid.
pub fn pooled(pg: &Cluster) -> Vec<(i32, String)> {
    pg.admin()
        .query("SELECT pid, state FROM nextgres.backends ORDER BY pid", &[])
        .expect("nextgres.backends")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

pub fn pooled_pids(pg: &Cluster) -> Vec<i32> {
    pooled(pg).into_iter().map(|(p, _)| p).collect()
}

/// `nextgres.clients`: (client_port, state, backend_pid).
pub fn clients(pg: &Cluster) -> Vec<(i32, String, Option<i32>)> {
    pg.admin()
        .query(
            "SELECT client_port, state, backend_pid FROM nextgres.clients ORDER BY client_port",
            &[],
        )
        .expect("nextgres.clients")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Waits until the pool has exactly `n` backends, all parked; their pids.
#[track_caller]
pub fn wait_parked(pg: &Cluster, n: usize) -> Vec<i32> {
    let ok = wait_until(SETTLE, || {
        let b = pooled(pg);
        b.len() == n && b.iter().all(|(_, s)| s == "parked")
    });
    assert!(ok, "expected {n} parked backends, have {:?}", pooled(pg));
    pooled_pids(pg)
}

/// Sessions inside a transaction that nobody is running a query in.
pub fn idle_in_transaction(pg: &Cluster) -> Vec<i32> {
    pg.activity()
        .into_iter()
        .filter(|a| {
            a.state
                .as_deref()
                .is_some_and(|s| s.starts_with("idle in transaction"))
        })
        .map(|a| a.pid)
        .collect()
}

/// Is `pid` still a server process (pg_stat_activity and the OS agree)?
pub fn session_exists(pg: &Cluster, pid: i32) -> bool {
    process_alive(pid) || pg.activity().iter().any(|a| a.pid == pid)
}

/// Sessions of APP waiting for a lock.
pub fn lock_waiters(pg: &Cluster) -> i64 {
    admin_i64(
        pg,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND wait_event_type = 'Lock'",
    )
}

pub fn row_value(pg: &Cluster) -> i32 {
    pg.admin()
        .query_one("SELECT v FROM t WHERE id = 1", &[])
        .expect("reading t")
        .get(0)
}

// ---- rust-postgres clients ----------------------------------------------------

pub type QueryResult = Result<Vec<SimpleQueryMessage>, postgres::Error>;

#[track_caller]
pub fn connect(pg: &Cluster, user: &str) -> Client {
    pg.connect_tcp(user, DB, None).unwrap_or_else(|e| {
        panic!(
            "{user} connecting through the pooler: {e:?}\n{}",
            pg.log_tail(30)
        )
    })
}

/// First column of the first row.
pub fn first_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .flatten()
}

#[track_caller]
pub fn one(c: &mut Client, sql: &str) -> String {
    let msgs = c
        .simple_query(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    first_value(&msgs).unwrap_or_else(|| panic!("{sql}: no value"))
}

/// Runs a query on its own thread (it is expected to block for a while).
pub fn spawn_query(mut c: Client, sql: &'static str) -> mpsc::Receiver<(Client, QueryResult)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = c.simple_query(sql);
        let _ = tx.send((c, r));
    });
    rx
}

#[track_caller]
pub fn wait_result<T>(rx: &mpsc::Receiver<T>, what: &str) -> T {
    rx.recv_timeout(SETTLE)
        .unwrap_or_else(|e| panic!("{what}: no result after {SETTLE:?} ({e})"))
}

/// A query with a bounded wait, on a client that may have lost its server.
pub fn bounded_query(c: Client, sql: &'static str, what: &str) -> (Client, QueryResult) {
    wait_result(&spawn_query(c, sql), what)
}

pub fn sqlstate(e: &postgres::Error) -> Option<&str> {
    e.code().map(SqlState::code)
}

/// The pooler serves: a brand-new client connects and runs a query, and the
/// pooler is still `expected` (the same process as before the fault).
#[track_caller]
pub fn assert_pooler_serves(pg: &Cluster, expected: i32) {
    let pgc = pg.tcp(APP, DB);
    let (c, r) = with_timeout(SETTLE, "new client after the fault", move || {
        let mut c = pgc.connect()?;
        let r = c.simple_query("SELECT 40 + 2")?;
        Ok::<_, postgres::Error>((c, r))
    })
    .unwrap_or_else(|e| panic!("a new client after the fault: {e:?}\n{}", pg.log_tail(30)));
    assert_eq!(first_value(&r).as_deref(), Some("42"));
    drop(c);
    assert_eq!(pooler_pid(pg), Some(expected), "the pooler was replaced");
}

// ---- a raw protocol client ------------------------------------------------------

#[allow(unused_imports)] // each test binary uses its own part
pub use nextgres_test::raw::{parse_error, parse_row, Raw, RawFail};

/// A raw protocol client logged in (trust) to the pooler as `user`.
#[track_caller]
pub fn raw(pg: &Cluster, user: &str) -> Raw {
    Raw::connect(pg.port(), user, DB, SETTLE)
}

// ---- a real client process ------------------------------------------------------

/// A psql child process connected through the pooler (PG* environment
/// scrubbed), for tests that kill a real client with SIGKILL.
pub fn psql_child(pg: &Cluster, user: &str, args: &[&str], stdin: bool, stdout: bool) -> Child {
    let mut cmd = Command::new(pg.install().client_bin("psql"));
    nextgres_test::cmd::scrub_pg_env(&mut cmd);
    cmd.args([
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        &pg.tcp(user, DB).conninfo(),
    ])
    .args(args)
    .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
    .stdout(if stdout {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stderr(Stdio::null());
    cmd.spawn().expect("starting psql")
}

// ---- tokio-postgres workers -------------------------------------------------------

/// A two-thread tokio runtime for concurrent tokio-postgres clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A tokio-postgres client of APP logged in through the pooler on `port`.
pub async fn login(port: u16) -> Result<tokio_postgres::Client, String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(APP)
        .dbname(DB)
        .connect_timeout(SETTLE);
    let (client, conn) = tokio::time::timeout(SETTLE, cfg.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| format!("login: no answer within {SETTLE:?}"))?
        .map_err(|e| format!("login: {e:?}"))?;
    tokio::spawn(conn);
    Ok(client)
}
