//! Real clients that rely on session state, through a transaction pool
//! smaller than their connection count: pgbench with protocol-level prepared
//! statements, tokio-postgres and psycopg 3 with named prepared statements
//! and session settings. Zero errors allowed; speed is only printed.
//!
//! psycopg runs from a venv under /var/tmp/nextgres-venv, created (with
//! `pip install psycopg[binary]`) on first use. If that cannot be done the
//! test fails and says why; it never skips.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test session_drivers -- --test-threads=2
//! ```

mod session_support;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nextgres_test::{cmd, parse_summary, Cluster};
use session_support::{admin_i64, run};

/// Log lines the extension writes when a client's session could not be
/// restored on a backend: each one is a client that saw an error.
const RESTORE_FAILURES: [&str; 2] = ["could not be re-created", "could not prepare the session"];

#[track_caller]
fn assert_no_restore_failures(pg: &Cluster, mark: usize) {
    let log = pg.log_since(mark);
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| RESTORE_FAILURES.iter().any(|f| l.contains(f)))
        .take(20)
        .collect();
    assert!(bad.is_empty(), "session restore failures in the server log:\n{}", bad.join("\n"));
}

/// pgbench -M prepared: 32 clients over 4 backends; every client Parses
/// P_0.. once and then only Binds them, whichever backend it lands on.
#[test]
fn pgbench_prepared_and_simple_through_pool_of_four() {
    run(
        Cluster::builder().conf("nextgres.pool_size = 4"),
        "CREATE EXTENSION nextgres;
         CREATE ROLE app LOGIN;
         GRANT CREATE ON SCHEMA public TO app",
        Duration::from_secs(400),
        |pg| {
            let ci = pg.tcp("app", "postgres");
            pg.pgbench_init(&ci, 1).assert_success();
            // Both modes run even if the first fails, so both are reported.
            let mut tps = Vec::new();
            let mut problems = Vec::new();
            for mode in ["prepared", "simple"] {
                let mark = pg.log_mark();
                let (out, stuck) = pgbench_watched(
                    pg,
                    &ci,
                    // -j = -c: pgbench 15 and older prepares with a blocking call, which
                    // deadlocks a thread's clients through any transaction pooler.
                    &["-n", "-M", mode, "-c", "32", "-j", "32", "-T", "5"],
                );
                if let Some(snapshot) = stuck {
                    problems.push(format!(
                        "pgbench -M {mode} (-T 5) still running after 30 s; then:\n{snapshot}\n{out}"
                    ));
                    continue;
                }
                let sum = parse_summary(&out.stdout);
                let failed = sum.as_ref().map(|s| s.failed.unwrap_or(0));
                if !out.success()
                    || sum.as_ref().is_none_or(|s| s.processed == 0)
                    || failed != Some(0)
                    || out.stderr.contains("ERROR")
                    || out.stderr.contains("error:")
                {
                    problems.push(format!("pgbench -M {mode}: failed transactions {failed:?}\n{out}"));
                }
                let log = pg.log_since(mark);
                let bad: Vec<&str> = log
                    .lines()
                    .filter(|l| RESTORE_FAILURES.iter().any(|f| l.contains(f)))
                    .take(10)
                    .collect();
                if !bad.is_empty() {
                    problems.push(format!("-M {mode}: restore failures in the log:\n{}", bad.join("\n")));
                }
                if let Some(s) = sum {
                    tps.push(format!("-M {mode}: {:.0} tps ({} transactions)", s.tps.unwrap_or(0.0), s.processed));
                }
            }
            eprintln!("pgbench, 32 clients over a pool of 4: {}", tps.join("; "));
            assert!(problems.is_empty(), "{}", problems.join("\n\n"));
            let backends = admin_i64(pg, "SELECT count(*) FROM nextgres.backends WHERE role = 'app'");
            assert!(backends <= 4, "pool of 4 has {backends} backends");
        },
    );
}

/// Runs pgbench (60 s limit). If it is still running after 30 s, returns
/// what the pool looked like then: who holds the backends, who waits.
fn pgbench_watched(
    pg: &Cluster,
    ci: &nextgres_test::ConnInfo,
    args: &[&str],
) -> (nextgres_test::CmdOutput, Option<String>) {
    std::thread::scope(|s| {
        let h = s.spawn(|| pg.pgbench_timeout(ci, args, Duration::from_secs(60)));
        let done = nextgres_test::wait_until(Duration::from_secs(30), || h.is_finished());
        let snapshot = (!done).then(|| {
            let mut admin = pg.admin();
            let mut lines = Vec::new();
            for r in admin
                .query(
                    "SELECT concat_ws(' ', 'backend', pid, state, wait_event, left(query, 40))
                       FROM pg_stat_activity WHERE usename = 'app' ORDER BY pid",
                    &[],
                )
                .expect("pg_stat_activity")
            {
                lines.push(r.get::<_, String>(0));
            }
            for r in admin
                .query(
                    "SELECT concat_ws(' ', 'clients', state, count(*)) FROM nextgres.clients GROUP BY state",
                    &[],
                )
                .expect("nextgres.clients")
            {
                lines.push(r.get::<_, String>(0));
            }
            lines.join("\n")
        });
        (h.join().expect("pgbench thread"), snapshot)
    })
}

const CLIENTS: i32 = 16;
const XACTS: i32 = 300;

/// Tables for `clients` clients: a shared `marks` row each, and an own
/// table `s<i>.own` found through the client's search_path.
fn per_client_setup(clients: i32) -> String {
    let mut s = String::from(
        "CREATE EXTENSION nextgres;
         CREATE ROLE app LOGIN;
         CREATE TABLE marks (client int PRIMARY KEY, n int NOT NULL);
         GRANT ALL ON marks TO app;",
    );
    for i in 0..clients {
        s.push_str(&format!(
            "CREATE SCHEMA s{i} AUTHORIZATION app;
             CREATE TABLE s{i}.own (n int);
             ALTER TABLE s{i}.own OWNER TO app;
             INSERT INTO marks VALUES ({i}, 0);"
        ));
    }
    s
}

/// Every client's rows landed where its own search_path sent them.
fn assert_rows(pg: &Cluster, clients: i32, xacts: i32) {
    let mut admin = pg.admin();
    for i in 0..clients {
        let n: i32 = admin
            .query_one("SELECT n FROM marks WHERE client = $1", &[&i])
            .expect("marks")
            .get(0);
        let own: i64 = admin
            .query_one(&format!("SELECT count(*) FROM s{i}.own"), &[])
            .expect("own")
            .get(0);
        assert_eq!((n, own), (xacts, i64::from(xacts)), "client {i}'s rows");
    }
}

/// tokio-postgres: 16 connections over a pool of 4, each with prepared
/// statements (protocol and SQL level) and session settings, a few hundred
/// mixed transactions each, checking its own state every time.
#[test]
fn tokio_postgres_prepared_statements_and_settings() {
    run(
        Cluster::builder().conf("nextgres.pool_size = 4"),
        &per_client_setup(CLIENTS),
        Duration::from_secs(400),
        |pg| {
            let mark = pg.log_mark();
            let port = pg.port();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime");
            let errors: Vec<String> = rt.block_on(async move {
                let tasks: Vec<_> = (0..CLIENTS)
                    .map(|i| tokio::spawn(async move { tokio_client(port, i).await.err() }))
                    .collect();
                let mut errors = Vec::new();
                for (i, t) in tasks.into_iter().enumerate() {
                    match tokio::time::timeout(Duration::from_secs(300), t).await {
                        Ok(Ok(None)) => {}
                        Ok(Ok(Some(e))) => errors.push(format!("client {i}: {e}")),
                        Ok(Err(e)) => errors.push(format!("client {i} panicked: {e}")),
                        Err(_) => errors.push(format!("client {i}: no end after 300 s")),
                    }
                }
                errors
            });
            rt.shutdown_timeout(Duration::from_secs(5));
            assert!(errors.is_empty(), "{} clients failed:\n{}", errors.len(), errors.join("\n"));
            assert_rows(pg, CLIENTS, XACTS);
            assert_no_restore_failures(pg, mark);
            let backends = admin_i64(pg, "SELECT count(*) FROM nextgres.backends WHERE role = 'app'");
            assert!(backends <= 4, "pool of 4 has {backends} backends");
        },
    );
}

async fn tokio_client(port: u16, i: i32) -> Result<(), String> {
    let e = |what: &str, t: i32| {
        let what = what.to_string();
        move |err: tokio_postgres::Error| format!("{what} (transaction {t}): {err:?}")
    };
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("app")
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(10));
    let (mut client, conn) = cfg.connect(tokio_postgres::NoTls).await.map_err(e("connect", -1))?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "SET search_path = s{i}, public;
             SET application_name = 'tp{i}';
             SELECT set_config('myapp.client', 'c{i}', false);
             PREPARE mine AS SELECT current_setting('myapp.client') || '/' || current_setting('search_path')"
        ))
        .await
        .map_err(e("session setup", -1))?;
    let ins = client.prepare("INSERT INTO own (n) VALUES ($1)").await.map_err(e("prepare insert", -1))?;
    let upd = client
        .prepare("UPDATE marks SET n = n + 1 WHERE client = $1 RETURNING n")
        .await
        .map_err(e("prepare update", -1))?;
    let look = client
        .prepare(
            "SELECT count(*), current_setting('myapp.client'), current_setting('search_path'),
                    current_setting('application_name')
               FROM own",
        )
        .await
        .map_err(e("prepare look", -1))?;
    let want = (format!("c{i}"), format!("s{i}, public"), format!("tp{i}"));
    for t in 0..XACTS {
        match t % 3 {
            // Prepared statements inside an explicit transaction.
            0 => {
                let tx = client.transaction().await.map_err(e("BEGIN", t))?;
                tx.execute(&ins, &[&t]).await.map_err(e("insert", t))?;
                let n: i32 = tx.query_one(&upd, &[&i]).await.map_err(e("update", t))?.get(0);
                let r = tx.query_one(&look, &[]).await.map_err(e("look", t))?;
                check(t, n, &r, &want)?;
                tx.commit().await.map_err(e("COMMIT", t))?;
            }
            // One prepared statement per transaction (autocommit).
            1 => {
                client.execute(&ins, &[&t]).await.map_err(e("insert", t))?;
                let n: i32 = client.query_one(&upd, &[&i]).await.map_err(e("update", t))?.get(0);
                let r = client.query_one(&look, &[]).await.map_err(e("look", t))?;
                check(t, n, &r, &want)?;
            }
            // The SQL-level statement, by simple query, after a write.
            _ => {
                client.execute(&ins, &[&t]).await.map_err(e("insert", t))?;
                let n: i32 = client.query_one(&upd, &[&i]).await.map_err(e("update", t))?.get(0);
                let msgs = client.simple_query("EXECUTE mine").await.map_err(e("EXECUTE mine", t))?;
                let got = msgs.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                    _ => None,
                });
                let expect = format!("{}/{}", want.0, want.1);
                if got.as_deref() != Some(expect.as_str()) || n != t + 1 {
                    return Err(format!("transaction {t}: EXECUTE mine = {got:?}, marks = {n}; want {expect}, {}", t + 1));
                }
            }
        }
    }
    Ok(())
}

fn check(t: i32, n: i32, r: &tokio_postgres::Row, want: &(String, String, String)) -> Result<(), String> {
    let got = (r.get::<_, i64>(0), r.get::<_, String>(1), r.get::<_, String>(2), r.get::<_, String>(3));
    let exp = (i64::from(t) + 1, want.0.clone(), want.1.clone(), want.2.clone());
    if got != exp || n != t + 1 {
        return Err(format!("transaction {t}: saw {got:?} and marks {n}, want {exp:?} and {}", t + 1));
    }
    Ok(())
}

// ---- psycopg 3 --------------------------------------------------------------

const VENV: &str = "/var/tmp/nextgres-venv";

/// The venv's python with psycopg importable, creating the venv if needed.
/// Panics with the reason when that is impossible (never skips).
fn psycopg_python() -> PathBuf {
    let venv = Path::new(VENV);
    let python = venv.join("bin/python");
    let importable = |py: &Path| {
        let mut c = Command::new(py);
        c.args(["-c", "import psycopg; print(psycopg.__version__)"]);
        cmd::run(c, Duration::from_secs(60)).map(|o| o.success()).unwrap_or(false)
    };
    // Two test processes (PostgreSQL 15 and 16) may get here at once.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("/var/tmp/nextgres-venv.lock")
        .expect("opening /var/tmp/nextgres-venv.lock");
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock /var/tmp/nextgres-venv.lock");
    if python.exists() && importable(&python) {
        return python;
    }
    let mut c = Command::new("python3");
    c.args(["-m", "venv", VENV]);
    let out = cmd::run(c, Duration::from_secs(180)).expect("starting python3 (is python3 installed?)");
    assert!(
        out.success(),
        "cannot create the psycopg venv {VENV} (tools/setup installs python3-venv):\n{out}"
    );
    let mut c = Command::new(venv.join("bin/pip"));
    c.args(["install", "--disable-pip-version-check", "--quiet", "psycopg[binary]"]);
    let out = cmd::run(c, Duration::from_secs(600)).expect("starting pip");
    assert!(out.success(), "pip install psycopg[binary] into {VENV} failed:\n{out}");
    assert!(importable(&python), "psycopg is still not importable from {}", python.display());
    python
}

/// psycopg 3 with server-side prepared statements (prepare_threshold=0):
/// 12 connections over a pool of 4, 200 transactions each, zero errors.
#[test]
fn psycopg3_prepared_statements_and_settings() {
    const PY_CLIENTS: i32 = 12;
    const PY_XACTS: i32 = 200;
    let python = Arc::new(psycopg_python());
    run(
        Cluster::builder().conf("nextgres.pool_size = 4"),
        &per_client_setup(PY_CLIENTS),
        Duration::from_secs(400),
        move |pg| {
            let mark = pg.log_mark();
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/session_support/psycopg_load.py");
            let conninfo = pg.tcp("app", "postgres").conninfo();
            let mut c = Command::new(python.as_path());
            cmd::scrub_pg_env(&mut c);
            c.arg(&script)
                .arg(&conninfo)
                .arg(PY_CLIENTS.to_string())
                .arg(PY_XACTS.to_string());
            let out = cmd::run(c, Duration::from_secs(300)).expect("starting the psycopg script");
            eprintln!("{}", out.stdout.trim());
            assert!(out.success(), "psycopg clients through the pool:\n{out}");
            assert!(out.stdout.contains("errors=0"), "{out}");
            assert_rows(pg, PY_CLIENTS, PY_XACTS);
            assert_no_restore_failures(pg, mark);
        },
    );
}
