//! Commands that need a database to themselves, run while that database has
//! a live pool: DROP DATABASE, ALTER DATABASE ... RENAME, CREATE DATABASE ...
//! TEMPLATE. Parked backends are connected to the database, yet a pool that
//! only keeps them for reuse must not make these commands fail; a client in
//! the middle of a transaction still does, exactly as a direct session.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test database_commands -- --test-threads=2
//! ```

use std::sync::Arc;
use std::time::Duration;

use nextgres_test::raw::Raw;
use nextgres_test::{wait_until, Cluster};
use postgres::error::SqlState;
use postgres::Client;

const APP: &str = "app";
const DB: &str = "appdb";
const SETTLE: Duration = Duration::from_secs(30);
const TEST_LIMIT: Duration = Duration::from_secs(240);

fn run(body: impl FnOnce(&Cluster) + Send + 'static) {
    let pg = Arc::new(Cluster::builder().conf("nextgres.pool_size = 4").start());
    pg.admin()
        .batch_execute("CREATE EXTENSION nextgres; CREATE ROLE app LOGIN CREATEDB;")
        .unwrap();
    pg.create_database(DB, APP);
    pg.run_bounded(TEST_LIMIT, body);
}

#[track_caller]
fn connect(pg: &Cluster, db: &str) -> Client {
    pg.connect_tcp(APP, db, None).unwrap_or_else(|e| {
        panic!(
            "connecting to {db} through the pooler: {e:?}\n{}",
            pg.log_tail(30)
        )
    })
}

/// Pooled backends of `db` (any state), from nextgres.backends joined with
/// pg_stat_activity.
fn pooled_in(pg: &Cluster, db: &str) -> i64 {
    pg.admin()
        .query_one(
            "SELECT count(*) FROM nextgres.backends b JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
            &[&db],
        )
        .unwrap()
        .get(0)
}

/// Three clients each run a transaction at the same time, so the pool has
/// at least three backends.
fn fill_pool(pg: &Cluster, db: &str) -> Vec<Client> {
    let mut clients: Vec<Client> = (0..3).map(|_| connect(pg, db)).collect();
    for c in clients.iter_mut() {
        c.batch_execute("BEGIN; SELECT 1").unwrap();
    }
    for c in clients.iter_mut() {
        c.batch_execute("COMMIT").unwrap();
    }
    assert!(
        wait_until(SETTLE, || pooled_in(pg, db) >= 3),
        "expected 3 or more pooled backends in {db}, have {}",
        pooled_in(pg, db)
    );
    clients
}

#[test]
fn drop_database_with_a_live_pool() {
    run(|pg| {
        let mut idle = fill_pool(pg, DB);
        // A raw client reads the FATAL the driver would hide behind "closed".
        let mut raw = Raw::connect(pg.port(), APP, DB, SETTLE);
        assert_eq!(raw.value("SELECT 7"), "7");
        // A client inside a transaction counts as a session, as directly.
        let mut busy = connect(pg, DB);
        busy.batch_execute("BEGIN; SELECT 1").unwrap();
        let err = pg
            .admin()
            .batch_execute(&format!("DROP DATABASE {DB}"))
            .expect_err("DROP DATABASE while a client is mid-transaction");
        assert_eq!(err.code(), Some(&SqlState::OBJECT_IN_USE), "{err:?}");
        // The failed DROP gave the pool back: the busy client finishes and
        // the idle ones run transactions again.
        busy.batch_execute("COMMIT").unwrap();
        for c in idle.iter_mut() {
            c.batch_execute("SELECT 1").unwrap();
        }

        // Only parked backends and idle clients now: the DROP succeeds.
        pg.admin()
            .batch_execute(&format!("DROP DATABASE {DB}"))
            .unwrap_or_else(|e| {
                panic!(
                    "DROP DATABASE with only parked backends: {e:?}\n{}",
                    pg.log_tail(30)
                )
            });
        assert_eq!(pooled_in(pg, DB), 0);
        // Clients that stayed connected get the server's error on their next
        // transaction (a direct session would have blocked the DROP instead).
        raw.send_query("SELECT 1");
        let (severity, code, _) = raw.expect_fatal();
        assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "3D000"));
        assert!(idle[0].batch_execute("SELECT 1").is_err());

        // A database of the same name gets a working pool again (once the
        // pool's one-second memory of its failed login has passed).
        pg.create_database(DB, APP);
        assert!(
            wait_until(SETTLE, || pg
                .connect_tcp(APP, DB, None)
                .is_ok_and(|mut c| c.batch_execute("SELECT 1").is_ok())),
            "no working pool for the re-created database\n{}",
            pg.log_tail(30)
        );
        drop(idle);
        drop(busy);
    });
}

#[test]
fn rename_and_template_copy_with_a_live_pool() {
    run(|pg| {
        let mut clients = fill_pool(pg, DB);
        // CREATE DATABASE ... TEMPLATE needs the template to itself.
        pg.admin()
            .batch_execute(&format!("CREATE DATABASE copydb TEMPLATE {DB}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE TEMPLATE with parked backends: {e:?}"));
        // The pool serves again once the copy is done.
        for c in clients.iter_mut() {
            c.batch_execute("SELECT 1").unwrap();
        }
        let mut copy = connect(pg, "copydb");
        copy.batch_execute("SELECT 1").unwrap();

        fill_pool(pg, "copydb");
        drop(copy);
        pg.admin()
            .batch_execute("ALTER DATABASE copydb RENAME TO renamed")
            .unwrap_or_else(|e| panic!("ALTER DATABASE RENAME with parked backends: {e:?}"));
        let mut renamed = connect(pg, "renamed");
        renamed.batch_execute("SELECT 1").unwrap();
        assert!(
            pg.connect_tcp(APP, "copydb", None).is_err(),
            "old name still accepted"
        );
    });
}

fn pooled_pids_in(pg: &Cluster, db: &str) -> Vec<i32> {
    pg.admin()
        .query("SELECT pid FROM nextgres.backends b JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1 ORDER BY pid", &[&db])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// `CREATE DATABASE` without TEMPLATE copies template1, which a pool may be
/// connected to (a client of template1 through the pooler, gone, its
/// backend parked): the pool's backends leave, as for an explicit TEMPLATE,
/// and the copy succeeds as it does with no pool (before: 55006 "source
/// database "template1" is being accessed by other users" for
/// idle_backend_timeout). A `DROP DATABASE` / `RENAME` / `CREATE DATABASE
/// ... TEMPLATE` that the server refuses (a role that does not own the
/// database, one without CREATEDB) leaves that database's pool alone: the
/// same backend pids before and after (before: any user could close
/// another database's pooled backends with a failing command).
#[test]
fn template1_copies_and_refused_commands_with_a_live_pool() {
    run(|pg| {
        pg.admin().batch_execute("GRANT CONNECT ON DATABASE template1 TO app; CREATE ROLE intruder LOGIN").unwrap();
        {
            let mut t = connect(pg, "template1");
            t.simple_query("SELECT 1").unwrap();
        }
        assert!(wait_until(SETTLE, || pooled_in(pg, "template1") == 1), "no pooled backend in template1");
        pg.admin().batch_execute("CREATE DATABASE copied").expect("CREATE DATABASE from template1 with a pool there");
        pg.admin().batch_execute("CREATE DATABASE copied2 TEMPLATE DEFAULT").expect("TEMPLATE DEFAULT");

        let _clients = fill_pool(pg, DB);
        let before = pooled_pids_in(pg, DB);
        let mut intruder = pg.connect_tcp("intruder", "postgres", None).expect("intruder");
        for sql in [
            format!("DROP DATABASE {DB}"),
            format!("ALTER DATABASE {DB} RENAME TO elsewhere"),
            format!("CREATE DATABASE stolen TEMPLATE {DB}"),
        ] {
            let e = intruder.batch_execute(&sql).expect_err("refused");
            assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{sql}: {e:?}");
        }
        assert_eq!(pooled_pids_in(pg, DB), before, "a refused command closed the pool's backends");
    });
}
