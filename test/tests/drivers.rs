//! The driver matrix: real drivers at their default settings run the same
//! workload against a plain PostgreSQL server (no nextgres, TCP) and through
//! a nextgres transaction pool of a quarter of their connection count, and
//! must see zero errors and identical results.
//!
//! Drivers (installed by drivers_support/install.sh, which tools/test runs;
//! the suite runs it too and fails, never skips, if it cannot): asyncpg
//! (its pool and statement cache) with SQLAlchemy 2's async ORM on top,
//! psycopg 3 (default prepare_threshold, pipeline mode, executemany, COPY,
//! named cursors), pgjdbc (default prepareThreshold and prepareThreshold=1,
//! batches, setFetchSize cursors), node-postgres (named queries) and
//! postgres.js (prepares every query). tokio-postgres runs in
//! session_drivers.rs and session_statements.rs.
//!
//! Each connection has its own schema (`s<N>`, on its search_path) and in
//! every iteration: a temporary table `ON COMMIT DROP` filled by the driver's
//! batch/executemany/COPY, one `ON COMMIT DELETE ROWS` and a kept one (both
//! dropped again), a table created and dropped mid-session behind the
//! driver's cached statements, `ALTER TABLE ... ADD COLUMN` (invalidating
//! cached plans), and search_path changes.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test drivers -- --test-threads=2
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nextgres_test::{cmd, Cluster};

const CONNECTIONS: usize = 8;
const ITERATIONS: usize = 10;
const VENV: &str = "/var/tmp/nextgres-drivers-venv";
const NPM_DIR: &str = "/var/tmp/nextgres-drivers-npm";
const JAR: &str = "/usr/share/java/postgresql.jar";

fn support() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers_support")
}

fn install() {
    let mut c = Command::new("bash");
    c.arg(support().join("install.sh"));
    let out = cmd::run(c, Duration::from_secs(900)).expect("starting drivers_support/install.sh");
    assert!(out.success(), "installing the drivers failed:\n{out}");
}

/// Per-connection schemas with a small table, owned by the client role.
fn setup(pg: &Cluster) {
    let mut admin = pg.admin();
    let mut sql = String::from(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN CREATE ROLE app LOGIN; END IF; END $$;",
    );
    for c in 0..CONNECTIONS {
        sql.push_str(&format!(
            "DROP SCHEMA IF EXISTS s{c} CASCADE; CREATE SCHEMA s{c} AUTHORIZATION app;
             CREATE TABLE s{c}.items(id int PRIMARY KEY, v text);
             INSERT INTO s{c}.items VALUES (1, 'a'), (2, 'b');
             ALTER TABLE s{c}.items OWNER TO app;"
        ));
    }
    admin.batch_execute(&sql).unwrap();
}

/// Runs one workload against a server; its JSON output.
fn workload(driver: &str, pg: &Cluster) -> serde_json::Value {
    setup(pg);
    let port = pg.port().to_string();
    let (n, k) = (CONNECTIONS.to_string(), ITERATIONS.to_string());
    let dir = support();
    let python = format!("{VENV}/bin/python");
    let mut c = match driver {
        "asyncpg" => {
            let mut c = Command::new(&python);
            c.arg(dir.join("asyncpg_wl.py")).args(["127.0.0.1", &port, "app", "postgres", &n, &k]);
            c
        }
        "psycopg" => {
            let mut c = Command::new(&python);
            let conninfo = format!("host=127.0.0.1 port={port} user=app dbname=postgres sslmode=disable");
            c.arg(dir.join("psycopg_wl.py")).args([conninfo.as_str(), &n, &k]);
            c
        }
        "node" => {
            let mut c = Command::new("node");
            c.arg(dir.join("node_wl.mjs")).args([NPM_DIR, "127.0.0.1", &port, "app", "postgres", &n, &k]);
            c
        }
        "pgjdbc" => {
            let mut c = Command::new("java");
            c.args(["-cp", JAR]).arg(dir.join("Jdbc.java")).args(["127.0.0.1", &port, "app", "postgres", &n, &k]);
            c
        }
        other => panic!("unknown driver {other}"),
    };
    cmd::scrub_pg_env(&mut c);
    let out = cmd::run(c, Duration::from_secs(300)).unwrap_or_else(|e| panic!("starting the {driver} workload: {e}"));
    assert!(out.success(), "{driver} workload failed:\n{out}");
    let line = out.stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{driver}: output is not JSON ({e}):\n{out}"))
}

fn matrix(driver: &'static str) {
    install();
    let direct = Cluster::builder().preload(false).listen_addresses("127.0.0.1").start();
    let pooled = Cluster::builder().conf(format!("nextgres.pool_size = {}", CONNECTIONS / 4)).start();
    pooled.admin().batch_execute("CREATE EXTENSION nextgres").unwrap();
    let d = workload(driver, &direct);
    let p = workload(driver, &pooled);
    assert_eq!(d["errors"], serde_json::json!([]), "{driver} directly: {}", d["errors"]);
    assert_eq!(p["errors"], serde_json::json!([]), "{driver} through the pool: {}", p["errors"]);
    let (dr, pr) = (d["results"].as_object().unwrap(), p["results"].as_object().unwrap());
    assert_eq!(dr.keys().collect::<Vec<_>>(), pr.keys().collect::<Vec<_>>(), "{driver}: connections differ");
    for (conn, want) in dr {
        assert_eq!(&pr[conn], want, "{driver} {conn}: pooled results differ from direct ones");
    }
    assert!(dr.values().all(|v| v.as_array().is_some_and(|a| !a.is_empty())), "{driver}: empty results {d}");
    eprintln!("{driver}: {} connections, identical results directly and through a pool of {}", dr.len(), CONNECTIONS / 4);
}

#[test]
fn asyncpg_and_sqlalchemy_orm() {
    matrix("asyncpg");
}

#[test]
fn psycopg3() {
    matrix("psycopg");
}

#[test]
fn node_postgres_and_postgres_js() {
    matrix("node");
}

#[test]
fn pgjdbc() {
    matrix("pgjdbc");
}
