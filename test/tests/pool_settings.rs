//! Per-pool settings the PostgreSQL way: `ALTER ROLE / DATABASE ... SET
//! nextgres.pool_size | pool_mode` (pg_db_role_setting, the server's
//! precedence), applied by the pooler to live pools without a reload, and
//! `RESET` back to postgresql.conf.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test pool_settings -- --test-threads=2
//! ```

mod pool_support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nextgres_test::{parse_summary, wait_until, Cluster};
use pool_support::{err_fields, exec, first_value};

/// The pooler has pg_db_role_setting read when such a change commits; it
/// applies at the pool's next transaction boundaries. Waits for a state are
/// bounded by 3 s (the issue asks for "within a second"; the measured time is
/// printed).
const APPLIED: Duration = Duration::from_secs(3);

/// Sets the flag when dropped, also when an assertion panics inside a
/// `thread::scope`, so the sampler thread ends and the scope can unwind
/// instead of waiting for it forever.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn app_backends(admin: &mut postgres::Client) -> usize {
    let n: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE backend_type = 'client backend' AND usename = 'app' AND datname = 'postgres'",
            &[],
        )
        .expect("sampling pg_stat_activity")
        .get(0);
    n as usize
}

/// Under pgbench load (12 clients, global pool_size 6): ALTER ROLE lowers the
/// pool to 2, ALTER ROLE ... IN DATABASE raises it to 3 (it beats the role's
/// setting), ALTER DATABASE's 1 changes nothing (lower precedence), RESET of
/// the role-in-database value returns to the role's 2 and RESET of the role's
/// to the global 6. pg_stat_activity, sampled all along, never shows more
/// backends than the limit in force; pgbench has no failed transaction.
#[test]
fn alter_role_pool_size_live_under_pgbench() {
    let pg = Cluster::builder()
        .conf("nextgres.pool_size = 6")
        .conf("max_connections = 40")
        .start();
    exec(
        &pg,
        "CREATE EXTENSION nextgres;
         CREATE ROLE app LOGIN;
         GRANT CREATE ON SCHEMA public TO app",
    );
    let bench = pg.tcp("app", "postgres");
    pg.pgbench_init(&bench, 1).assert_success();

    let limit = AtomicUsize::new(6);
    let stop = AtomicBool::new(false);
    let samples = AtomicUsize::new(0);
    let violations = Mutex::new(Vec::<String>::new());
    let mut admin = pg.admin();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut sampler = pg.admin();
            while !stop.load(Ordering::Relaxed) {
                let before = limit.load(Ordering::SeqCst);
                let n = app_backends(&mut sampler);
                let allowed = before.max(limit.load(Ordering::SeqCst));
                if n > allowed {
                    violations.lock().unwrap().push(format!("{n} backends with limit {allowed}"));
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let run = s.spawn(|| pg.pgbench(&bench, &["-n", "-S", "-c", "12", "-j", "2", "-T", "30"]));
        let _stop = StopOnDrop(&stop);

        // The load fills the global pool.
        assert!(wait_until(Duration::from_secs(20), || app_backends(&mut admin) >= 4), "pool never grew under load");

        let mut step = |sql: &str, new_limit: usize, cond: &dyn Fn(usize) -> bool, what: &str| {
            if new_limit > limit.load(Ordering::SeqCst) {
                limit.store(new_limit, Ordering::SeqCst);
            }
            exec(&pg, sql);
            let t0 = Instant::now();
            let ok = wait_until(APPLIED, || cond(app_backends(&mut admin)));
            assert!(ok, "{what}: not applied within {APPLIED:?} ({} backends)", app_backends(&mut admin));
            eprintln!("{what}: applied after {:?}", t0.elapsed());
            limit.store(new_limit, Ordering::SeqCst);
            // Hold it for a while of sampling under load.
            let from = samples.load(Ordering::Relaxed);
            wait_until(Duration::from_secs(10), || samples.load(Ordering::Relaxed) >= from + 100);
        };
        step("ALTER ROLE app SET nextgres.pool_size = 2", 2, &|n| n <= 2, "ALTER ROLE SET 2");
        step("ALTER ROLE app IN DATABASE postgres SET nextgres.pool_size = 3", 3, &|n| n == 3, "ALTER ROLE IN DATABASE SET 3");
        let row = pg
            .admin()
            .query_one("SELECT pool_size FROM nextgres.pools WHERE role = 'app' AND database = 'postgres'", &[])
            .expect("nextgres.pools");
        assert_eq!(row.get::<_, i32>(0), 3);
        exec(&pg, "ALTER DATABASE postgres SET nextgres.pool_size = 1");
        step("ALTER ROLE app IN DATABASE postgres RESET nextgres.pool_size", 2, &|n| n <= 2, "RESET role in database");
        step("ALTER ROLE app RESET nextgres.pool_size", 1, &|n| n <= 1, "RESET role (database's 1 left)");
        step("ALTER DATABASE postgres RESET ALL", 6, &|n| n > 2, "RESET database (global 6)");
        let row = pg
            .admin()
            .query_one("SELECT pool_size FROM nextgres.pools WHERE role = 'app' AND database = 'postgres'", &[])
            .expect("nextgres.pools");
        assert_eq!(row.get::<_, i32>(0), 6);

        let out = run.join().expect("pgbench thread");
        out.assert_success();
        let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
        assert_eq!(sum.failed.unwrap_or(0), 0, "{out}");
        assert!(sum.processed > 0, "{out}");
        stop.store(true, Ordering::Relaxed);
    });
    let v = violations.into_inner().unwrap();
    assert!(v.is_empty(), "limit exceeded {} times: {:?}", v.len(), &v[..v.len().min(10)]);
    assert!(samples.into_inner() > 100, "the sampler barely ran");
    let log = pg.log();
    assert!(log.contains("settings from pg_db_role_setting now pool_size=2"), "no log line for the change");
}

/// pool_mode per database: with ALTER DATABASE ... SET nextgres.pool_mode =
/// session and a pool of 1 (ALTER ROLE ... IN DATABASE), a second client waits
/// until the first disconnects; after RESET (transaction mode) two clients
/// share the one backend between transactions.
#[test]
fn alter_database_pool_mode_and_reset() {
    let pg = Cluster::builder().conf("nextgres.pool_mode = transaction").start();
    exec(
        &pg,
        "CREATE EXTENSION nextgres;
         CREATE ROLE app LOGIN",
    );
    let pid = |c: &mut postgres::Client| first_value(&c.simple_query("SELECT pg_backend_pid()").expect("pid")).expect("row");
    // The pool exists (global settings) before the ALTERs.
    pid(&mut pg.tcp("app", "postgres").connect().expect("first"));
    let conf = || {
        pg.admin()
            .query_one("SELECT pool_size, pool_mode FROM nextgres.pools WHERE role = 'app'", &[])
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
            .expect("pools")
    };
    assert_eq!(conf(), (8, "transaction".to_string()));
    exec(
        &pg,
        "ALTER ROLE app IN DATABASE postgres SET nextgres.pool_size = 1;
         ALTER DATABASE postgres SET nextgres.pool_mode = session",
    );
    assert!(wait_until(APPLIED, || conf() == (1, "session".to_string())), "not applied: {:?}", conf());
    let mut a = pg.tcp("app", "postgres").connect().expect("a");
    let pa = pid(&mut a);
    std::thread::scope(|s| {
        let b = s.spawn(|| {
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            pid(&mut b)
        });
        // b waits for the backend a keeps for its session.
        let waiting = || {
            pg.admin()
                .query_one("SELECT clients_waiting FROM nextgres.pools WHERE role = 'app'", &[])
                .map(|r| r.get::<_, i32>(0))
                .unwrap_or(0)
        };
        assert!(wait_until(Duration::from_secs(10), || waiting() == 1), "b never waited");
        assert_eq!(pid(&mut a), pa, "a lost its session backend");
        assert!(!b.is_finished(), "b was served while a held the session");
        drop(a);
        assert_eq!(b.join().expect("b"), pa);
    });

    exec(&pg, "ALTER DATABASE postgres RESET nextgres.pool_mode");
    let is_txn = || {
        pg.admin()
            .query_one("SELECT pool_mode FROM nextgres.pools WHERE role = 'app'", &[])
            .map(|r| r.get::<_, String>(0) == "transaction")
            .unwrap_or(false)
    };
    assert!(wait_until(APPLIED, is_txn), "RESET pool_mode not applied");
    let mut a = pg.tcp("app", "postgres").connect().expect("a");
    let mut b = pg.tcp("app", "postgres").connect().expect("b");
    for _ in 0..3 {
        let (x, y) = (pid(&mut a), pid(&mut b));
        assert_eq!(x, y, "transaction mode shares the one backend");
    }
}

/// The settings reader (which copies pg_db_role_setting for the pooler)
/// runs as the bootstrap superuser in database `postgres`: a role that may
/// create objects there (here `public` writable by all, the default before
/// 15 that pg_upgrade keeps) must not get its own `unnest(text[])` or
/// `=(oid, integer)` run by it, though each is a closer match than the
/// catalog's for an unqualified call. Before, `ALTER ROLE itself SET`, which
/// any role may run and which wakes the reader, made such a role superuser
/// (hunt5-B 1). The reader still reads: the role's pool_size applies.
#[test]
fn the_settings_reader_runs_no_object_of_another_role() {
    let pg = Cluster::builder().start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE mallory LOGIN; GRANT CREATE ON SCHEMA public TO PUBLIC");
    let mut m = pg.tcp("mallory", "postgres").connect().expect("mallory through the pooler");
    m.batch_execute(
        "CREATE FUNCTION public.unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$
         BEGIN
           IF current_setting('is_superuser') = 'on' THEN EXECUTE 'ALTER ROLE mallory SUPERUSER'; END IF;
           RETURN QUERY SELECT x FROM pg_catalog.unnest($1) AS x;
         END $$;
         CREATE FUNCTION public.oid_int_eq(oid, integer) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN
           IF current_setting('is_superuser') = 'on' THEN EXECUTE 'ALTER ROLE mallory SUPERUSER'; END IF;
           RETURN $1 OPERATOR(pg_catalog.=) $2::oid;
         END $$;
         CREATE OPERATOR public.= (LEFTARG = oid, RIGHTARG = integer, FUNCTION = public.oid_int_eq);
         ALTER ROLE mallory SET work_mem = '5MB';",
    )
    .expect("mallory's objects and setting");
    // A superuser's change wakes the reader too, and shows when it has read.
    exec(&pg, "ALTER ROLE mallory SET nextgres.pool_size = 3");
    let size = || {
        pg.admin()
            .query_opt("SELECT pool_size FROM nextgres.pools WHERE role = 'mallory'", &[])
            .expect("pools")
            .map(|r| r.get::<_, i32>(0))
    };
    assert!(wait_until(APPLIED, || size() == Some(3)), "mallory's pool_size not read: {:?}", size());
    let superuser: bool = pg
        .admin()
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'", &[])
        .expect("rolsuper")
        .get(0);
    assert!(!superuser, "the settings reader ran mallory's function as superuser");
}

/// An ALTER ROLE ... SET in a prepared transaction applies at its COMMIT
/// PREPARED, run by another session, as at a COMMIT; and a reload reads
/// the settings again whatever announced them (a standby's come by WAL
/// replay, which announces nothing).
#[test]
fn settings_committed_by_commit_prepared_apply() {
    let pg = Cluster::builder().conf("max_prepared_transactions = 2").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN");
    pg.tcp("app", "postgres").connect().expect("first").simple_query("SELECT 1").expect("query");
    let size = || {
        pg.admin()
            .query_one("SELECT pool_size FROM nextgres.pools WHERE role = 'app'", &[])
            .map(|r| r.get::<_, i32>(0))
            .expect("pools")
    };
    assert_eq!(size(), 8);
    let mut a = pg.admin();
    a.batch_execute("BEGIN; ALTER ROLE app SET nextgres.pool_size = 3; PREPARE TRANSACTION 'ng'").expect("prepare");
    // Not committed yet: nothing changes.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(size(), 8, "applied before its COMMIT PREPARED");
    pg.admin().batch_execute("COMMIT PREPARED 'ng'").expect("commit prepared");
    assert!(wait_until(APPLIED, || size() == 3), "not applied at COMMIT PREPARED: {}", size());
    // The preparing session's next unrelated commit announces nothing
    // (harmless either way), and a reload re-reads.
    a.batch_execute("SELECT 1").expect("a");
    exec(&pg, "SELECT pg_reload_conf()");
    assert!(wait_until(APPLIED, || size() == 3));
}

/// Differential: SET nextgres.pool_size in a session fails the same way
/// directly and through nextgres (55P02 for a superuser, 42501 for others),
/// and ALTER ROLE ... SET validates the value as the server does.
#[test]
fn session_set_is_refused_alter_role_validates() {
    let pg = Cluster::builder().start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN; CREATE ROLE boss LOGIN SUPERUSER");
    for (role, code) in [("boss", "55P02"), ("app", "42501")] {
        for via in ["direct", "pooled"] {
            let ci = if via == "direct" { pg.unix(role, "postgres") } else { pg.tcp(role, "postgres") };
            let mut c = ci.connect().expect("connect");
            for sql in ["SET nextgres.pool_size = 3", "SET nextgres.pool_mode = session", "SELECT set_config('nextgres.query_wait_timeout', '5', false)"] {
                let e = c.simple_query(sql).expect_err(sql);
                let f = err_fields(&e).expect("server error");
                assert_eq!(f.code, code, "{role} {via} {sql}: {f:?}");
            }
            assert_eq!(first_value(&c.simple_query("SELECT 1").expect("still usable")).as_deref(), Some("1"));
        }
    }
    let mut admin = pg.admin();
    let e = admin.simple_query("ALTER ROLE app SET nextgres.pool_size = 0").expect_err("0 is out of range");
    assert_eq!(err_fields(&e).expect("error").code, "22023");
    let e = admin.simple_query("ALTER ROLE app SET nextgres.pool_mode = sometimes").expect_err("bad enum");
    assert_eq!(err_fields(&e).expect("error").code, "22023");
    admin.simple_query("ALTER ROLE app SET nextgres.pool_size = 5").expect("valid");
    let e = pg.tcp("app", "postgres").connect().expect("connect").simple_query("ALTER ROLE app SET nextgres.pool_size = 7").expect_err("not superuser");
    assert_eq!(err_fields(&e).expect("error").code, "42501");
}

/// `ALTER ROLE app SET nextgres.backend_lifetime = 1` under pgbench (4
/// clients, pool of 2): backends are replaced at transaction boundaries (more
/// distinct backend pids than the pool's size are seen, each one younger than
/// the run) and no transaction fails.
#[test]
fn backend_lifetime_recycles_at_transaction_boundaries() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(
        &pg,
        "CREATE EXTENSION nextgres;
         CREATE ROLE app LOGIN;
         GRANT CREATE ON SCHEMA public TO app;
         ALTER ROLE app SET nextgres.backend_lifetime = 1",
    );
    let bench = pg.tcp("app", "postgres");
    pg.pgbench_init(&bench, 1).assert_success();
    let stop = AtomicBool::new(false);
    let pids = Mutex::new(std::collections::BTreeSet::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut admin = pg.admin();
            while !stop.load(Ordering::Relaxed) {
                for r in admin
                    .query(
                        "SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'",
                        &[],
                    )
                    .expect("sample")
                {
                    pids.lock().unwrap().insert(r.get::<_, i32>(0));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let _stop = StopOnDrop(&stop);
        // The tpcb-like script: updates in every transaction.
        let out = pg.pgbench(&bench, &["-n", "-c", "4", "-j", "2", "-T", "6"]);
        stop.store(true, Ordering::Relaxed);
        out.assert_success();
        let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
        assert_eq!(sum.failed.unwrap_or(0), 0, "{out}");
        assert!(sum.processed > 0, "{out}");
    });
    let seen = pids.into_inner().unwrap().len();
    assert!(seen > 2 + 2, "only {seen} distinct backends in 6 s with a 1 s lifetime");
    // Every history row the run reported is there: nothing was lost.
    let n: i64 = pg.admin().query_one("SELECT count(*) FROM pgbench_history", &[]).expect("count").get(0);
    assert!(n > 0);
}

/// `min_pool_size` 2 with `idle_backend_timeout` 1 s: the pool logs in a
/// second backend after its first login, grows to 4 under load, comes back to
/// 2 when idle, and keeps those two (same pids) while they stay unused for
/// three times the idle timeout.
#[test]
fn min_pool_size_keeps_backends_warm() {
    let pg = Cluster::builder()
        .conf("nextgres.pool_size = 4")
        .conf("nextgres.idle_backend_timeout = 1")
        .start();
    exec(
        &pg,
        "CREATE EXTENSION nextgres;
         CREATE ROLE app LOGIN;
         GRANT CREATE ON SCHEMA public TO app;
         ALTER ROLE app SET nextgres.min_pool_size = 2",
    );
    let count = || pg.backend_count(Some("app"), Some("postgres"));
    {
        let mut c = pg.tcp("app", "postgres").connect().expect("connect");
        c.simple_query("SELECT 1").expect("select");
        assert!(wait_until(Duration::from_secs(10), || count() == 2), "not warmed to 2: {}", count());
    }
    let bench = pg.tcp("app", "postgres");
    pg.pgbench_init(&bench, 1).assert_success();
    let out = pg.pgbench(&bench, &["-n", "-S", "-c", "4", "-j", "2", "-t", "200"]);
    out.assert_success();
    assert!(wait_until(Duration::from_secs(15), || count() == 2), "idle pool not back to 2: {}", count());
    let pids = pg.backend_pids(Some("app"), Some("postgres"));
    // Unused for 3 x idle_backend_timeout (read from nextgres.backends).
    let unused = || {
        pg.admin()
            .query_one(
                "SELECT count(*) FROM nextgres.backends WHERE role = 'app' AND state = 'parked'
                    AND state_since < now() - interval '3 s'",
                &[],
            )
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
    };
    assert!(wait_until(Duration::from_secs(20), || unused() == 2), "backends not left unused");
    let mut after = pg.backend_pids(Some("app"), Some("postgres"));
    let mut before = pids;
    before.sort();
    after.sort();
    assert_eq!(before, after, "min_pool_size backends were closed");
}

/// Two pgbench runs (4 clients each, select-only) through two pools that
/// share a limit: `max_db_connections` 3 for roles a and b in one database,
/// or `max_user_connections` 2 for role a in two databases. pg_stat_activity,
/// sampled all along, never shows more backends than the limit; both runs
/// finish with zero failed transactions (neither pool starves: an unused or
/// surplus backend of the busier pool gives way).
fn shared_limit_under_two_pgbench(setup: &str, runs: [(&str, &str); 2], count_sql: &str, limit: i64) {
    let pg = Cluster::builder().conf("nextgres.pool_size = 4").conf("max_connections = 40").start();
    // Each role's pgbench tables in its own schema ("$user" in search_path).
    exec(
        &pg,
        &format!(
            "CREATE EXTENSION nextgres; CREATE ROLE a LOGIN; CREATE ROLE b LOGIN;
             CREATE SCHEMA a AUTHORIZATION a; CREATE SCHEMA b AUTHORIZATION b; {setup}"
        ),
    );
    for (role, db) in runs {
        if db != "postgres" {
            pg.create_database(db, role);
        }
        pg.pgbench_init(&pg.tcp(role, db), 1).assert_success();
    }
    let stop = AtomicBool::new(false);
    let max_seen = AtomicUsize::new(0);
    let samples = AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut admin = pg.admin();
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = admin.query_one(count_sql, &[]).expect("sample").get(0);
                max_seen.fetch_max(n as usize, Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let _stop = StopOnDrop(&stop);
        let benches: Vec<_> = runs
            .iter()
            .map(|&(role, db)| {
                let pg = &pg;
                s.spawn(move || pg.pgbench(&pg.tcp(role, db), &["-n", "-S", "-c", "4", "-j", "2", "-T", "8"]))
            })
            .collect();
        for b in benches {
            let out = b.join().expect("pgbench");
            out.assert_success();
            let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
            assert_eq!(sum.failed.unwrap_or(0), 0, "{out}");
            assert!(sum.processed > 0, "{out}");
        }
    });
    let max_seen = max_seen.into_inner();
    assert!(samples.into_inner() > 100, "the sampler barely ran");
    assert!(max_seen as i64 <= limit, "{max_seen} backends sampled with a limit of {limit}");
    assert_eq!(max_seen as i64, limit, "the limit was never reached: the test did not test it");
}

#[test]
fn max_db_connections_shared_by_two_roles() {
    shared_limit_under_two_pgbench(
        "ALTER DATABASE postgres SET nextgres.max_db_connections = 3",
        [("a", "postgres"), ("b", "postgres")],
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = 'postgres' AND usename IN ('a', 'b')",
        3,
    );
}

#[test]
fn max_user_connections_shared_by_two_databases() {
    shared_limit_under_two_pgbench(
        "ALTER ROLE a SET nextgres.max_user_connections = 2",
        [("a", "postgres"), ("a", "db2")],
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = 'a'",
        2,
    );
}

fn history(pg: &Cluster) -> i64 {
    pg.admin().query_one("SELECT count(*) FROM pgbench_history", &[]).expect("history").get(0)
}

/// `nextgres.pause('postgres')` during pgbench (tpcb-like, 8 clients, pool
/// of 4): it returns true once no backend serves a client; then every client
/// is seen waiting, no app backend is inside a transaction and no history
/// row was added while paused (each transaction adds one); after
/// `nextgres.resume('postgres')` rows are added again, and pgbench ends with
/// zero failed transactions. A non-superuser may not pause (42501).
#[test]
fn pause_resume_during_pgbench() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 4").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app");
    let bench = pg.tcp("app", "postgres");
    pg.pgbench_init(&bench, 1).assert_success();
    let e = pg.unix("app", "postgres").connect().expect("app").simple_query("SELECT nextgres.pause('postgres')").expect_err("not allowed");
    assert_eq!(err_fields(&e).expect("error").code, "42501");
    std::thread::scope(|s| {
        let run = s.spawn(|| pg.pgbench(&bench, &["-n", "-c", "8", "-j", "2", "-T", "10"]));
        assert!(wait_until(Duration::from_secs(20), || history(&pg) > 0), "pgbench never committed");
        let mut admin = pg.admin();
        let paused: bool = admin.query_one("SELECT nextgres.pause('postgres')", &[]).expect("pause").get(0);
        assert!(paused, "pause did not see the running transactions finish");
        let h1 = history(&pg);
        let waiting = || {
            pg.admin()
                .query_one("SELECT clients_waiting, backends_attached FROM nextgres.pools WHERE role = 'app'", &[])
                .map(|r| (r.get::<_, i32>(0), r.get::<_, i32>(1)))
                .expect("pools")
        };
        assert!(wait_until(Duration::from_secs(10), || waiting() == (8, 0)), "clients not all waiting: {:?}", waiting());
        let in_xact: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND xact_start IS NOT NULL",
                &[],
            )
            .expect("activity")
            .get(0);
        assert_eq!(in_xact, 0, "a transaction runs while paused");
        assert_eq!(history(&pg), h1, "a transaction committed while paused");
        let n: i32 = admin.query_one("SELECT nextgres.resume('postgres')", &[]).expect("resume").get(0);
        assert_eq!(n, 1);
        assert!(wait_until(Duration::from_secs(20), || history(&pg) > h1), "no transaction after resume");
        let out = run.join().expect("pgbench");
        out.assert_success();
        let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
        assert_eq!(sum.failed.unwrap_or(0), 0, "{out}");
    });
    let log = pg.log();
    assert!(log.contains("paused: running transactions finish"), "pause not logged");
    assert!(log.contains("resumed"), "resume not logged");
}

/// `nextgres.reconnect('postgres', 'app')` during pgbench (4 clients, pool
/// of 2): every backend that existed before is gone soon after (replaced at
/// transaction boundaries), and no transaction fails.
#[test]
fn reconnect_replaces_every_backend() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app");
    let bench = pg.tcp("app", "postgres");
    pg.pgbench_init(&bench, 1).assert_success();
    std::thread::scope(|s| {
        let run = s.spawn(|| pg.pgbench(&bench, &["-n", "-c", "4", "-j", "2", "-T", "6"]));
        assert!(
            wait_until(Duration::from_secs(20), || pg.backend_count(Some("app"), Some("postgres")) == 2),
            "pool never filled"
        );
        let before = pg.backend_pids(Some("app"), Some("postgres"));
        pg.admin().simple_query("SELECT nextgres.reconnect('postgres', 'app')").expect("reconnect");
        let gone = || {
            let now = pg.backend_pids(Some("app"), Some("postgres"));
            before.iter().all(|p| !now.contains(p))
        };
        assert!(wait_until(Duration::from_secs(10), gone), "old backends still there: {before:?}");
        let out = run.join().expect("pgbench");
        out.assert_success();
        let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
        assert_eq!(sum.failed.unwrap_or(0), 0, "{out}");
    });
    assert!(pg.log().contains("reconnect, its"), "reconnect not logged");
}

/// With `hold_idle_clients = off` every transaction ends with a handoff, so
/// `nextgres.pools.transactions` counts every transaction: after
/// `nextgres.reset_stats()` it is 0, and after pgbench (4 clients x 50
/// transactions of a custom script) it equals pgbench's own count of
/// processed transactions, and `queries` is 4 per transaction (BEGIN,
/// UPDATE, SELECT, END). The wait counters, `queries` and `xact_time_ms`
/// reset too; then a select-only run (`-S`, one statement per transaction)
/// gives `queries` equal to `transactions`: pgbench's processed count plus
/// the queries a built-in script runs first on its own connection (scale and
/// partitioning, each a transaction of one statement).
#[test]
fn stats_agree_with_pgbench_and_reset() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").conf("nextgres.hold_idle_clients = off").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app");
    let bench = pg.tcp("app", "postgres");
    pg.pgbench_init(&bench, 1).assert_success();
    let stats = || {
        pg.admin()
            .query_one("SELECT transactions, waits, max_wait_ms FROM nextgres.pools WHERE role = 'app'", &[])
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, f64>(2)))
            .expect("pools")
    };
    let queries = || {
        pg.admin()
            .query_one("SELECT queries, xact_time_ms FROM nextgres.pools WHERE role = 'app'", &[])
            .map(|r| (r.get::<_, i64>(0), r.get::<_, f64>(1)))
            .expect("pools")
    };
    assert!(stats().0 > 0, "pgbench -i counted nothing");
    assert!(queries().0 > 0, "pgbench -i counted no query");
    pg.admin().simple_query("SELECT nextgres.reset_stats('postgres', 'app')").expect("reset");
    assert_eq!(stats(), (0, 0, 0.0));
    assert_eq!(queries(), (0, 0.0));
    // A custom script: with a built-in one pgbench also runs two queries of
    // its own (scale and partitioning), which are transactions too.
    let script = pg.dir().join("xact.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 100000)\nBEGIN;\nUPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\nEND;\n",
    )
    .expect("script");
    let out = pg.pgbench(&bench, &["-n", "-c", "4", "-j", "2", "-t", "50", "-f", script.to_str().expect("path")]);
    out.assert_success();
    let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
    assert_eq!(sum.failed.unwrap_or(0), 0, "{out}");
    assert_eq!(sum.processed, 200, "{out}");
    let (xacts, waits, _) = stats();
    assert_eq!(xacts, sum.processed as i64, "pool transactions vs pgbench's processed:\n{out}");
    assert!(waits > 0, "4 clients on a pool of 2 never waited");
    let (q, xact_ms) = queries();
    assert_eq!(q, 4 * sum.processed as i64, "queries vs 4 statements per processed transaction:\n{out}");
    assert!(xact_ms > 0.0, "no transaction time");
    assert!(pg.log().contains("statistics reset"), "reset not logged");

    pg.admin().simple_query("SELECT nextgres.reset_stats('postgres', 'app')").expect("reset");
    assert_eq!(queries(), (0, 0.0), "reset left queries or xact_time_ms");
    let out = pg.pgbench(&bench, &["-n", "-S", "-c", "4", "-j", "2", "-t", "50"]);
    out.assert_success();
    let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
    assert_eq!(sum.processed, 200, "{out}");
    let ((xacts, _, _), (q, _)) = (stats(), queries());
    assert_eq!(q, xacts, "-S: one statement per transaction\n{out}");
    let own = q - sum.processed as i64;
    assert!((0..=2).contains(&own), "queries {q} vs pgbench's processed {} (+ at most 2 of its own):\n{out}", sum.processed);
    let kq = pg
        .admin()
        .query_one("SELECT kernel_queue_transactions FROM nextgres.pools WHERE role = 'app'", &[])
        .expect("pools")
        .get::<_, i64>(0);
    assert!(kq > 0, "no transaction went through the kernel queue: the check below would not cover its counts");

    // Backends count their queued clients' transactions in their own rows:
    // a backend that ends leaves its counts to the pool. An idle client
    // keeps the pool while all its backends are terminated.
    let _holder = pg.tcp("app", "postgres").connect().expect("holder");
    let kq_xacts = || {
        pg.admin()
            .query_one("SELECT kernel_queue_transactions FROM nextgres.pools WHERE role = 'app'", &[])
            .expect("pools")
            .get::<_, i64>(0)
    };
    let (before, kq_before) = (stats().0, kq_xacts());
    pg.admin()
        .simple_query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'")
        .expect("terminate");
    let gone = wait_until(Duration::from_secs(10), || {
        pg.admin()
            .query_one("SELECT backends_parked + backends_attached + backends_starting FROM nextgres.pools WHERE role = 'app'", &[])
            .is_ok_and(|r| r.get::<_, i32>(0) == 0)
    });
    assert!(gone, "the pool's backends did not end");
    assert_eq!(stats().0, before, "transactions counted by backends that ended were lost");
    assert_eq!(kq_xacts(), kq_before, "kernel queue transactions of backends that ended were lost");
}

/// `nextgres.kill_client(client_addr, client_port)` (as `nextgres.clients`
/// shows them): a client inside a transaction (its backend is terminated)
/// and an idle one (held by the pooler) each get 57P01, as from
/// pg_terminate_backend on a direct session, and the killed transaction's
/// row is not committed; a third client of the same pool, inside a
/// transaction all along, keeps working and commits. An unknown client
/// gives false; a non-superuser is refused (42501).
#[test]
fn kill_client_kills_one() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 3").conf("nextgres.hold_idle_clients = off").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN; CREATE TABLE t (x int); GRANT ALL ON t TO app");
    let mut admin = pg.admin();
    let ports = |admin: &mut postgres::Client| -> Vec<(String, i32)> {
        admin
            .query("SELECT client_addr, client_port FROM nextgres.clients WHERE role = 'app'", &[])
            .expect("clients")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let connect = |admin: &mut postgres::Client| {
        let before = ports(admin);
        let c = pg.tcp("app", "postgres").connect().expect("connect");
        let new: Vec<_> = ports(admin).into_iter().filter(|p| !before.contains(p)).collect();
        assert_eq!(new.len(), 1, "{new:?}");
        (c, new[0].clone())
    };
    let (mut other, _) = connect(&mut admin);
    other.batch_execute("BEGIN; INSERT INTO t VALUES (2)").expect("other begins");
    let (mut busy, busy_at) = connect(&mut admin);
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (1)").expect("busy begins");
    let (mut idle, idle_at) = connect(&mut admin);
    idle.simple_query("SELECT 1").expect("select");
    // The client has its ReadyForQuery before the pooler has its socket
    // back: wait until the pooler lists it idle, or the kill below would
    // find it still attached.
    let idle_now = |admin: &mut postgres::Client| {
        admin
            .query_opt(
                "SELECT 1 FROM nextgres.clients WHERE client_addr = $1 AND client_port = $2 AND state = 'idle'",
                &[&idle_at.0, &idle_at.1],
            )
            .expect("clients")
            .is_some()
    };
    assert!(wait_until(Duration::from_secs(10), || idle_now(&mut admin)), "the idle client never became idle");
    let kill = |admin: &mut postgres::Client, (addr, port): &(String, i32)| -> bool {
        admin.query_one("SELECT nextgres.kill_client($1, $2)", &[addr, port]).expect("kill_client").get(0)
    };
    assert!(kill(&mut admin, &busy_at), "busy client not found");
    assert!(kill(&mut admin, &idle_at), "idle client not found");
    for (what, c) in [("busy", &mut busy), ("idle", &mut idle)] {
        assert_terminated(what, c);
    }
    other.batch_execute("INSERT INTO t VALUES (3); COMMIT").expect("the other client keeps its transaction");
    assert_eq!(first_value(&other.simple_query("SELECT 1").expect("served")).as_deref(), Some("1"));
    let rows: Vec<i32> =
        admin.query("SELECT x FROM t ORDER BY x", &[]).expect("rows").iter().map(|r| r.get(0)).collect();
    assert_eq!(rows, vec![2, 3], "the killed transaction committed, or the other one did not");
    // The killed client leaves once the pooler has seen its backend exit
    // (the client read its FATAL before that backend was gone).
    assert!(
        wait_until(Duration::from_secs(10), || !ports(&mut admin).contains(&busy_at)),
        "the killed client is still listed"
    );
    assert!(!kill(&mut admin, &busy_at), "a gone client was found");
    assert!(!kill(&mut admin, &("192.0.2.1".to_string(), 1)), "an unknown client was found");
    let mut c = pg.tcp("app", "postgres").connect().expect("new client");
    let e = c.simple_query("SELECT nextgres.kill_client('127.0.0.1', 1)").expect_err("non-superuser");
    assert_eq!(err_fields(&e).map(|f| f.code).as_deref(), Some("42501"), "{e:?}");
    let log = pg.log();
    let line = |at: &(String, i32)| {
        let key = format!("killing client {} port {} ", at.0, at.1);
        log.lines().find(|l| l.contains(&key)).unwrap_or_else(|| panic!("{key} not logged")).to_string()
    };
    assert!(line(&busy_at).contains("terminating its backend"), "{}", line(&busy_at));
    assert!(!line(&idle_at).contains("terminating its backend"), "{}", line(&idle_at));
}

/// `nextgres.kill_clients('postgres', 'app')`: a client inside a transaction
/// and an idle one both lose their connection (57P01, as from
/// pg_terminate_backend on a direct session) and the open transaction's row
/// is not committed; `nextgres.wait_close()` returns true and no backend of
/// the pool is left in pg_stat_activity; a new client is served.
#[test]
fn kill_clients_and_wait_close() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN; CREATE TABLE t (x int); GRANT ALL ON t TO app");
    let mut busy = pg.tcp("app", "postgres").connect().expect("busy");
    busy.batch_execute("BEGIN; INSERT INTO t VALUES (1)").expect("begin");
    let mut idle = pg.tcp("app", "postgres").connect().expect("idle");
    idle.simple_query("SELECT 1").expect("select");
    let mut admin = pg.admin();
    admin.simple_query("SELECT nextgres.kill_clients('postgres', 'app')").expect("kill");
    let closed: bool = admin.query_one("SELECT nextgres.wait_close('postgres', 'app', 10)", &[]).expect("wait_close").get(0);
    assert!(closed, "backends still there");
    for (what, c) in [("busy", &mut busy), ("idle", &mut idle)] {
        assert_terminated(what, c);
    }
    let n: i64 = admin.query_one("SELECT count(*) FROM t", &[]).expect("count").get(0);
    assert_eq!(n, 0, "the killed transaction committed");
    assert!(wait_until(Duration::from_secs(10), || pg.backend_count(Some("app"), Some("postgres")) == 0), "backends left");
    let mut c = pg.tcp("app", "postgres").connect().expect("new client");
    assert_eq!(first_value(&c.simple_query("SELECT 1").expect("served")).as_deref(), Some("1"));
    assert!(pg.log().contains("killing its 2 clients"), "kill not logged");
}

/// `reserve_pool_size` 1 and `reserve_pool_timeout` 1 s (ALTER ROLE) on a
/// pool of 1: while client A holds the only backend in a transaction, client
/// B is served by a second (reserve) backend, but only after waiting at
/// least the timeout (`max_wait_ms` >= 1000); once nobody waits, the pool
/// goes back to one backend.
#[test]
fn reserve_pool_engages_after_its_timeout() {
    // Without a reserve b would fail after query_wait_timeout, not hang.
    let pg = Cluster::builder().conf("nextgres.pool_size = 1").conf("nextgres.query_wait_timeout = 10").start();
    exec(
        &pg,
        "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN;
         ALTER ROLE app SET nextgres.reserve_pool_size = 1;
         ALTER ROLE app SET nextgres.reserve_pool_timeout = 1",
    );
    let mut a = pg.tcp("app", "postgres").connect().expect("a");
    a.batch_execute("BEGIN; SELECT 1").expect("begin");
    let mut b = pg.tcp("app", "postgres").connect().expect("b");
    // b is served while a's transaction is still open: by the reserve.
    b.simple_query("SELECT 1").expect("b served by the reserve");
    let (max_wait, backends): (f64, i32) = {
        let r = pg
            .admin()
            .query_one(
                "SELECT max_wait_ms, backends_parked + backends_attached + backends_starting FROM nextgres.pools WHERE role = 'app'",
                &[],
            )
            .expect("pools");
        (r.get(0), r.get(1))
    };
    assert!(max_wait >= 1000.0, "the reserve engaged before reserve_pool_timeout: b waited {max_wait} ms");
    let rows: Vec<String> = pg
        .admin()
        .query("SELECT pid, state, transactions FROM nextgres.backends WHERE role = 'app'", &[])
        .expect("backends")
        .iter()
        .map(|r| format!("{} {} {}", r.get::<_, i32>(0), r.get::<_, String>(1), r.get::<_, i64>(2)))
        .collect();
    assert_eq!(backends, 2, "{rows:?} {:?}", pg.backend_pids(Some("app"), Some("postgres")));
    a.batch_execute("COMMIT").expect("commit");
    drop(a);
    drop(b);
    assert!(
        wait_until(Duration::from_secs(10), || pg.backend_count(Some("app"), Some("postgres")) == 1),
        "the reserve backend stayed"
    );
    assert!(pg.log().contains("using the reserve pool"), "not logged");
}

/// `pool_priority`: roles h (priority 10) and l (0) share
/// `max_db_connections` 3 under two pgbench runs (4 clients each, l started
/// first and holding all 3): the pools settle at 2 backends for h and 1 for
/// l (each pool with clients keeps one),
/// and both runs have zero failed transactions. The waits of each pool are
/// printed (the comparison of wait times belongs in a benchmark).
#[test]
fn pool_priority_shares_max_db_connections() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 4").start();
    exec(
        &pg,
        "CREATE EXTENSION nextgres; CREATE ROLE h LOGIN; CREATE ROLE l LOGIN;
         CREATE SCHEMA h AUTHORIZATION h; CREATE SCHEMA l AUTHORIZATION l;
         ALTER DATABASE postgres SET nextgres.max_db_connections = 3;
         ALTER ROLE h SET nextgres.pool_priority = 10",
    );
    for role in ["h", "l"] {
        pg.pgbench_init(&pg.tcp(role, "postgres"), 1).assert_success();
    }
    let count = |role: &str| pg.backend_count(Some(role), Some("postgres"));
    std::thread::scope(|s| {
        // l first: it takes all 3; then h, which must win 2 of them (with
        // equal priorities the pools would settle at 2 for l and 1 for h).
        // l runs longer than h's whole window: it must still have clients
        // (and so keep its one backend) while the pools settle, however
        // long it took to reach 3 on a loaded machine.
        let mut runs = Vec::new();
        for role in ["l", "h"] {
            let pg = &pg;
            // h's window outlasts the settling: on a loaded 2-core machine
            // it took 3-7 s (an 8 s window failed now and then).
            let secs = if role == "l" { "28" } else { "16" };
            runs.push(s.spawn(move || pg.pgbench(&pg.tcp(role, "postgres"), &["-n", "-S", "-c", "4", "-j", "2", "-T", secs])));
            if role == "l" {
                assert!(wait_until(Duration::from_secs(8), || count("l") == 3), "l never took the 3 backends");
            }
        }
        let settled = wait_until(Duration::from_secs(14), || count("h") == 2 && count("l") == 1);
        let seen = (count("h"), count("l"));
        for r in runs {
            let out = r.join().expect("pgbench");
            out.assert_success();
            let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
            assert_eq!(sum.failed.unwrap_or(0), 0, "{out}");
            assert!(sum.processed > 0, "{out}");
        }
        assert!(settled, "pools did not settle at h 2, l 1: {seen:?}");
    });
    for r in pg
        .admin()
        .query("SELECT role, transactions, waits, wait_time_ms FROM nextgres.pools ORDER BY role", &[])
        .expect("pools")
    {
        eprintln!(
            "role {}: {} transactions, {} waits, {:.1} ms waited",
            r.get::<_, String>(0),
            r.get::<_, i64>(1),
            r.get::<_, i64>(2),
            r.get::<_, f64>(3)
        );
    }
}

/// The client's next statement finds its session ended by an administrator:
/// FATAL 57P01, or the connection already closed (the FATAL was read with
/// the close).
#[track_caller]
fn assert_terminated(what: &str, c: &mut postgres::Client) {
    let e = c.simple_query("SELECT 1").expect_err(what);
    if let Some(f) = err_fields(&e) {
        assert_eq!(f.code, "57P01", "{what}: {f:?}");
    } else {
        assert!(e.is_closed() || e.to_string().contains("closed"), "{what}: {e:?}");
    }
}

/// `pool_mode = dedicated` (no pooling) for role d with `pool_size` 2 (ALTER
/// ROLE): six clients hold open transactions at once, each on a backend of
/// its own (six distinct pids, all `idle in transaction` in
/// pg_stat_activity, `backends_dedicated` 6) while pgbench through role b's
/// pool runs with zero failed transactions; once the clients leave, their
/// backends are gone from pg_stat_activity. After `ALTER ROLE d RESET
/// pool_mode` new clients are pooled again: three clients' transactions run
/// on at most pool_size 2 backends. (With d pooled, the third open
/// transaction would wait and fail with query_wait_timeout.)
#[test]
fn dedicated_mode_gives_each_client_its_own_backend() {
    let pg = Cluster::builder()
        .conf("nextgres.pool_size = 4")
        .conf("nextgres.query_wait_timeout = 5")
        .conf("max_connections = 40")
        .start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE d LOGIN; CREATE ROLE b LOGIN; GRANT CREATE ON SCHEMA public TO b");
    pg.pgbench_init(&pg.tcp("b", "postgres"), 1).assert_success();
    let pid = |c: &mut postgres::Client| -> i32 {
        first_value(&c.simple_query("SELECT pg_backend_pid()").expect("pid")).expect("row").parse().expect("int")
    };
    let mode = || {
        pg.admin()
            .query_one("SELECT pool_size, pool_mode FROM nextgres.pools WHERE role = 'd'", &[])
            .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
            .expect("pools")
    };
    // The pool exists (global settings) before the ALTERs.
    pid(&mut pg.tcp("d", "postgres").connect().expect("first"));
    exec(&pg, "ALTER ROLE d SET nextgres.pool_mode = dedicated; ALTER ROLE d SET nextgres.pool_size = 2");
    assert!(wait_until(APPLIED, || mode() == (2, "dedicated".to_string())), "not applied: {:?}", mode());
    let in_xact = |pids: &[i32]| -> usize {
        pg.activity().iter().filter(|a| pids.contains(&a.pid) && a.state.as_deref() == Some("idle in transaction")).count()
    };
    std::thread::scope(|s| {
        let run = s.spawn(|| pg.pgbench(&pg.tcp("b", "postgres"), &["-n", "-S", "-c", "4", "-j", "2", "-T", "5"]));
        let mut clients = Vec::new();
        let mut pids = Vec::new();
        for i in 0..6 {
            let mut c = pg.tcp("d", "postgres").connect().unwrap_or_else(|e| panic!("client {i}: {e}"));
            c.batch_execute("BEGIN").expect("begin");
            pids.push(pid(&mut c));
            clients.push(c);
        }
        let mut distinct = pids.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 6, "clients shared backends: {pids:?}");
        assert_eq!(in_xact(&pids), 6, "not all six backends inside a transaction: {pids:?}");
        let dedicated: i32 = pg
            .admin()
            .query_one("SELECT backends_dedicated FROM nextgres.pools WHERE role = 'd'", &[])
            .expect("pools")
            .get(0);
        assert_eq!(dedicated, 6);
        for c in &mut clients {
            c.batch_execute("COMMIT").expect("commit");
        }
        let out = run.join().expect("pgbench");
        out.assert_success();
        let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
        assert_eq!(sum.failed.unwrap_or(0), 0, "{out}");
        assert!(sum.processed > 0, "{out}");
        drop(clients);
        let gone = || {
            let now = pg.backend_pids(Some("d"), Some("postgres"));
            pids.iter().all(|p| !now.contains(p))
        };
        assert!(wait_until(Duration::from_secs(10), gone), "dedicated backends outlived their clients: {pids:?}");
    });

    exec(&pg, "ALTER ROLE d RESET nextgres.pool_mode");
    assert!(wait_until(APPLIED, || mode() == (2, "transaction".to_string())), "RESET not applied: {:?}", mode());
    let mut clients: Vec<_> = (0..3).map(|_| pg.tcp("d", "postgres").connect().expect("client")).collect();
    let mut seen = Vec::new();
    for _ in 0..2 {
        for c in &mut clients {
            seen.push(pid(c));
        }
    }
    seen.sort();
    seen.dedup();
    assert!(seen.len() <= 2, "pooled again, yet on {} backends: {seen:?}", seen.len());
    assert!(pg.backend_count(Some("d"), Some("postgres")) <= 2);
}

/// The statistics beyond counts: after `reset_stats()` `query_time_ms`,
/// `bytes_sent` and `bytes_received` are 0 and the averages NULL; after
/// pgbench `-S` (4 clients x 50, `hold_idle_clients = off`) `queries` equals
/// `transactions` (pgbench's processed plus at most its own 2), query time,
/// transaction time and both byte counts are positive, each average is its
/// total over its count, and the average wait is at most the maximum. A COPY
/// FROM STDIN of 1 MiB raises `bytes_received` by at least 1 MiB, a COPY TO
/// STDOUT of 1 MiB `bytes_sent` by at least that.
#[test]
fn stats_bytes_and_times_move_with_pgbench_and_copy() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").conf("nextgres.hold_idle_clients = off").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app");
    let bench = pg.tcp("app", "postgres");
    pg.pgbench_init(&bench, 1).assert_success();
    #[derive(Debug)]
    struct S {
        xacts: i64,
        queries: i64,
        xact_ms: f64,
        query_ms: f64,
        avg_query: Option<f64>,
        avg_xact: Option<f64>,
        avg_wait: Option<f64>,
        max_wait: f64,
        sent: i64,
        received: i64,
    }
    let stats = || {
        let r = pg
            .admin()
            .query_one(
                "SELECT transactions, queries, xact_time_ms, query_time_ms, avg_query_ms, avg_xact_ms, avg_wait_ms,
                        max_wait_ms, bytes_sent, bytes_received
                   FROM nextgres.pools WHERE role = 'app'",
                &[],
            )
            .expect("pools");
        S {
            xacts: r.get(0),
            queries: r.get(1),
            xact_ms: r.get(2),
            query_ms: r.get(3),
            avg_query: r.get(4),
            avg_xact: r.get(5),
            avg_wait: r.get(6),
            max_wait: r.get(7),
            sent: r.get(8),
            received: r.get(9),
        }
    };
    // bytes_received is counted when a client leaves (or at the pooler's
    // next tick, within a second): pgbench may exit before the pooler has
    // seen its client go.
    wait_until(Duration::from_secs(10), || stats().received > 0);
    let s = stats();
    assert!(s.sent > 0 && s.received > 0 && s.query_ms > 0.0, "pgbench -i counted nothing: {s:?}");
    pg.admin().simple_query("SELECT nextgres.reset_stats('postgres', 'app')").expect("reset");
    let s = stats();
    assert_eq!((s.query_ms, s.sent, s.received), (0.0, 0, 0), "{s:?}");
    assert_eq!((s.avg_query, s.avg_xact, s.avg_wait), (None, None, None), "{s:?}");

    let out = pg.pgbench(&bench, &["-n", "-S", "-c", "4", "-j", "2", "-t", "50"]);
    out.assert_success();
    let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
    assert_eq!(sum.processed, 200, "{out}");
    // The last client's final bytes are added when it disconnects.
    let settled = || {
        let s = stats();
        s.received > 0 && s.xacts >= 200
    };
    assert!(wait_until(Duration::from_secs(10), settled), "{:?}", stats());
    let s = stats();
    eprintln!("after pgbench -S: {s:?}");
    assert_eq!(s.queries, s.xacts, "{s:?}");
    assert!((0..=2).contains(&(s.queries - sum.processed as i64)), "{s:?} vs {out}");
    assert!(s.query_ms > 0.0 && s.xact_ms > 0.0 && s.sent > 0 && s.received > 0, "{s:?}");
    assert!(s.query_ms <= s.xact_ms, "query time beyond attached time: {s:?}");
    let close = |a: Option<f64>, total: f64, n: i64| a.is_some_and(|a| (a * n as f64 - total).abs() <= 1e-6 * total.max(1.0));
    assert!(close(s.avg_query, s.query_ms, s.queries), "avg_query_ms: {s:?}");
    assert!(close(s.avg_xact, s.xact_ms, s.xacts), "avg_xact_ms: {s:?}");
    assert!(s.avg_wait.is_some_and(|w| w <= s.max_wait), "avg_wait_ms: {s:?}");

    const N: usize = 1 << 20;
    exec(&pg, "CREATE TABLE blob (t text); GRANT ALL ON blob TO app");
    let before = stats();
    {
        use std::io::{Read, Write};
        let mut c = pg.tcp("app", "postgres").connect().expect("connect");
        let mut w = c.copy_in("COPY blob FROM STDIN").expect("copy in");
        // 1 MiB in 1 KiB lines (1023 characters and a newline each).
        let line = format!("{}\n", "x".repeat(1023));
        for _ in 0..N / 1024 {
            w.write_all(line.as_bytes()).expect("write");
        }
        assert_eq!(w.finish().expect("finish"), (N / 1024) as u64);
        let mut r = c.copy_out("COPY (SELECT repeat('y', 1048575)) TO STDOUT").expect("copy out");
        let mut got = Vec::new();
        r.read_to_end(&mut got).expect("read");
        assert_eq!(got.len(), N);
        drop(r);
        // Counted while the client stays connected and idle (the pooler
        // reads the socket's received bytes at its next tick and shows
        // them without waiting for the pool's next event).
        let grown = || {
            let s = stats();
            s.received - before.received >= N as i64 && s.sent - before.sent >= N as i64
        };
        assert!(
            wait_until(Duration::from_secs(10), grown),
            "bytes did not grow by the COPYs' {N} with the client still connected: before {before:?}, after {:?}",
            stats()
        );
    }
}

/// `pool_mode = dedicated` under the limits of direct sessions: with role d's
/// `CONNECTION LIMIT 2` and two dedicated clients inside a transaction, a
/// third client's first statement fails as a direct login does at that
/// moment (same SQLSTATE and message: the server refused its own backend's
/// login); with `max_pinned_backends = 2` instead, the third client waits
/// (`clients_waiting` 1) until one of the two leaves, and is then served on a
/// new backend of its own.
#[test]
fn dedicated_mode_under_connection_limit_and_cap() {
    let pg = Cluster::builder().conf("nextgres.query_wait_timeout = 30").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE d LOGIN");
    let pid = |c: &mut postgres::Client| -> i32 {
        first_value(&c.simple_query("SELECT pg_backend_pid()").expect("pid")).expect("row").parse().expect("int")
    };
    pid(&mut pg.tcp("d", "postgres").connect().expect("first"));
    exec(&pg, "ALTER ROLE d SET nextgres.pool_mode = dedicated");
    let mode = || {
        pg.admin()
            .query_one("SELECT pool_mode FROM nextgres.pools WHERE role = 'd'", &[])
            .map(|r| r.get::<_, String>(0))
            .expect("pools")
    };
    assert!(wait_until(APPLIED, || mode() == "dedicated"), "not applied: {}", mode());
    // The first client's pooled backend, parked from before the switch,
    // serves nobody in dedicated mode: it closes by itself.
    assert!(wait_until(Duration::from_secs(10), || pg.backend_count(Some("d"), None) == 0), "stale shared backend left");

    // A pool that is dedicated from its first client: the backend it logs
    // in to learn its session values becomes that client's own (one
    // backend, not two), and goes with it. (d's new pool_size, read with
    // e's setting, says when the pooler has both.)
    exec(&pg, "CREATE ROLE e LOGIN; ALTER ROLE e SET nextgres.pool_mode = dedicated; ALTER ROLE d SET nextgres.pool_size = 3");
    let size = || pg.admin().query_one("SELECT pool_size FROM nextgres.pools WHERE role = 'd'", &[]).map(|r| r.get::<_, i32>(0)).expect("pools");
    assert!(wait_until(APPLIED, || size() == 3), "not applied");
    {
        let mut c = pg.tcp("e", "postgres").connect().expect("e");
        let p = pid(&mut c);
        assert_eq!(pg.backend_pids(Some("e"), None), vec![p]);
    }
    assert!(wait_until(Duration::from_secs(10), || pg.backend_count(Some("e"), None) == 0), "e's backend outlived it");

    exec(&pg, "ALTER ROLE d CONNECTION LIMIT 2");
    let mut a = pg.tcp("d", "postgres").connect().expect("a");
    a.batch_execute("BEGIN").expect("a begins");
    let pa = pid(&mut a);
    let mut b = pg.tcp("d", "postgres").connect().expect("b");
    b.batch_execute("BEGIN").expect("b begins");
    let pb = pid(&mut b);
    let Err(direct) = pg.unix("d", "postgres").connect() else { panic!("direct login over the limit succeeded") };
    let direct = err_fields(&direct).expect("server error");
    let pooled = match pg.tcp("d", "postgres").connect() {
        Ok(mut c) => c.simple_query("SELECT 1").expect_err("pooled session over the limit"),
        Err(e) => e,
    };
    let pooled = err_fields(&pooled).expect("server error");
    assert_eq!((pooled.code.as_str(), pooled.message.as_str()), (direct.code.as_str(), direct.message.as_str()), "{pooled:?} vs {direct:?}");
    assert_eq!(direct.code, "53300");
    exec(&pg, "ALTER ROLE d CONNECTION LIMIT -1; ALTER ROLE d SET nextgres.max_pinned_backends = 2");
    assert!(
        wait_until(APPLIED, || pg.log().contains("pool_mode=dedicated, max_pinned_backends=2")),
        "max_pinned_backends not applied"
    );
    std::thread::scope(|s| {
        let c = s.spawn(|| {
            let mut c = pg.tcp("d", "postgres").connect().expect("c");
            pid(&mut c)
        });
        let waiting = || {
            pg.admin()
                .query_one("SELECT clients_waiting FROM nextgres.pools WHERE role = 'd'", &[])
                .map(|r| r.get::<_, i32>(0))
                .unwrap_or(0)
        };
        assert!(wait_until(Duration::from_secs(10), || waiting() == 1), "c never waited");
        assert!(!c.is_finished(), "c was served beyond max_pinned_backends");
        assert_eq!(pg.backend_count(Some("d"), None), 2);
        a.batch_execute("COMMIT").expect("commit");
        drop(a);
        let pc = c.join().expect("c");
        assert!(pc != pa && pc != pb, "c reused a backend: {pc} of {pa}, {pb}");
    });
    b.batch_execute("COMMIT").expect("b commits");
    drop(b);

    // max_pinned_backends = 0 ("pinned backends stay in pool_size") does not
    // cap dedicated mode, which has no pool_size to stay in: three clients
    // inside a transaction each have their own backend.
    exec(&pg, "ALTER ROLE d SET nextgres.max_pinned_backends = 0");
    assert!(
        wait_until(APPLIED, || pg.log().contains("pool_mode=dedicated, max_pinned_backends=0")),
        "max_pinned_backends = 0 not applied"
    );
    let mut three: Vec<_> = (0..3).map(|i| pg.tcp("d", "postgres").connect().unwrap_or_else(|e| panic!("client {i}: {e}"))).collect();
    let mut pids: Vec<i32> = three
        .iter_mut()
        .map(|c| {
            c.batch_execute("BEGIN").expect("begin under max_pinned_backends = 0");
            pid(c)
        })
        .collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 3, "clients shared backends: {pids:?}");
}

/// A dedicated-mode login is not held to the pooler's rule of leaving one
/// connection slot free for direct logins: with one unreserved slot left,
/// and a shared backend still serving a client that joined before the pool
/// switched to dedicated, a new dedicated client gets that slot, as a direct
/// login would.
#[test]
fn dedicated_login_takes_the_last_slot_as_a_direct_one() {
    let pg = Cluster::builder()
        .conf("nextgres.query_wait_timeout = 20")
        .conf("max_connections = 10")
        .conf("superuser_reserved_connections = 3")
        .start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE d LOGIN; CREATE ROLE f LOGIN");
    let pid = |c: &mut postgres::Client| -> i32 {
        first_value(&c.simple_query("SELECT pg_backend_pid()").expect("pid")).expect("row").parse().expect("int")
    };
    let mut x = pg.tcp("d", "postgres").connect().expect("x");
    x.batch_execute("BEGIN").expect("x begins");
    exec(&pg, "ALTER ROLE d SET nextgres.pool_mode = dedicated");
    let mode = || {
        pg.admin()
            .query_one("SELECT pool_mode FROM nextgres.pools WHERE role = 'd'", &[])
            .map(|r| r.get::<_, String>(0))
            .expect("pools")
    };
    assert!(wait_until(APPLIED, || mode() == "dedicated"), "not applied: {}", mode());
    // Direct sessions take every unreserved slot, then one leaves.
    let mut fill = Vec::new();
    let full = loop {
        assert!(fill.len() < 10, "ten direct sessions on 7 unreserved slots");
        match pg.unix("f", "postgres").connect() {
            Ok(c) => fill.push(c),
            Err(e) => break err_fields(&e).expect("server error"),
        }
    };
    assert_eq!(full.code, "53300", "{full:?}");
    let mut last = fill.pop().expect("a direct session");
    let gone = pid(&mut last);
    drop(last);
    let exited = || !std::path::Path::new(&format!("/proc/{gone}")).exists();
    assert!(wait_until(Duration::from_secs(10), exited), "direct backend {gone} did not exit");
    let mut c = pg.tcp("d", "postgres").connect().expect("dedicated client");
    let own = pid(&mut c);
    assert!(own > 0);
    x.batch_execute("COMMIT").expect("x commits");
}

/// Roles a and b, and `max_db_connections` `limit` on database postgres.
fn roles_a_and_b_under_a_db_limit(pg: &Cluster, limit: i32) {
    exec(
        pg,
        &format!(
            "CREATE EXTENSION nextgres; CREATE ROLE a LOGIN; CREATE ROLE b LOGIN;
             ALTER DATABASE postgres SET nextgres.max_db_connections = {limit}"
        ),
    );
}

/// One client of `role` runs one query through the pooler and leaves.
fn one_query_as(pg: &Cluster, role: &str) {
    let mut c = pg.tcp(role, "postgres").connect().unwrap_or_else(|e| panic!("{role}: {e:?}"));
    c.simple_query("SELECT 1").unwrap_or_else(|e| panic!("{role}'s query: {e:?}"));
}

fn pool_backends(pg: &Cluster, role: &str, state: &str) -> i64 {
    pg.admin()
        .query_one("SELECT count(*) FROM nextgres.backends WHERE role = $1 AND state = $2", &[&role, &state])
        .expect("nextgres.backends")
        .get(0)
}

/// Two clients of role a, each on a backend of its own (a1's transaction
/// open while a2 runs), run until both backends keep their idle clients
/// (`hold_idle_clients`) and b has `b_parked` parked backends: past the
/// 100 ms in which a pool that made a client wait counts as saturated, they
/// are kept, but on a loaded machine a round may fall in such a window, so
/// the clients run again. The clients, and whether that state was reached.
fn two_clients_of_a_kept(pg: &Cluster, b_parked: i64) -> (postgres::Client, postgres::Client, bool) {
    let mut a1 = pg.tcp("a", "postgres").connect().expect("a1");
    let mut a2 = pg.tcp("a", "postgres").connect().expect("a2");
    a1.batch_execute("BEGIN; SELECT 1").expect("a1 BEGIN");
    a2.simple_query("SELECT 1").expect("a2");
    a1.batch_execute("COMMIT").expect("a1 COMMIT");
    let kept = wait_until(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(300));
        a1.simple_query("SELECT 1").expect("a1");
        a2.simple_query("SELECT 1").expect("a2");
        std::thread::sleep(Duration::from_millis(100));
        pool_backends(pg, "a", "attached") == 2 && pool_backends(pg, "b", "parked") == b_parked
    });
    (a1, a2, kept)
}

/// `max_db_connections` 2 shared by roles a and b, `hold_idle_clients` on
/// (the default): a's two clients each keep a backend while idle, and b's
/// pool (logged in before, its backend since closed for a) has none. b's
/// query gets one of a's backends: the pooler asks one that keeps an idle
/// client to give it back and closes it for b. Before, nothing asked (a
/// kept backend is neither parked nor at a boundary the pooler sees, and
/// a's own pool had nobody waiting), so b waited until
/// `query_wait_timeout` (15 s here) and got 53400.
#[test]
fn a_pool_under_a_shared_limit_gets_a_backend_kept_by_another_pools_idle_client() {
    let pg = Cluster::builder()
        .conf("nextgres.pool_size = 4")
        .conf("nextgres.hold_idle_clients = on")
        // Backends that keep idle clients are the handoff path's.
        .conf("nextgres.kernel_queue = off")
        .conf("nextgres.query_wait_timeout = 15")
        .start();
    roles_a_and_b_under_a_db_limit(&pg, 2);
    // b's pool logs in once (its session values are known from then on).
    one_query_as(&pg, "b");
    // The second backend: b's parked one is closed for it (b has no client).
    let (mut a1, mut a2, kept) = two_clients_of_a_kept(&pg, 0);
    assert!(
        kept,
        "a's backends do not both keep their idle client: the test does not test it ({} attached, b: {} parked)",
        pool_backends(&pg, "a", "attached"),
        pool_backends(&pg, "b", "parked")
    );
    let t0 = Instant::now();
    let mut b = pg.tcp("b", "postgres").connect().expect("b logs in (its pool's values are known)");
    let r = b.simple_query("SELECT 1");
    assert!(r.is_ok(), "b after {:?}: {r:?}", t0.elapsed());
    eprintln!("b served after {:?}", t0.elapsed());
    // a's clients go on, on the backend left to them.
    a1.simple_query("SELECT 1").expect("a1 afterwards");
    a2.simple_query("SELECT 1").expect("a2 afterwards");
}

/// A `max_db_connections` set below what the pools hold (ALTER DATABASE
/// ... SET, applied a moment after the commit) brings them down to it, as
/// a lowered pool_size does: role b's parked backend closes at once, and of
/// role a's two backends that keep their idle clients (`hold_idle_clients`)
/// one is asked to give its client back and closes; the other keeps its
/// client (the limit is met). Both clients go on. Before, nothing closed:
/// 3 backends stayed with a limit of 1 (and a pool logged in before the
/// reader applied a new limit kept its surplus for ever: a flaky
/// precondition in the test above).
#[test]
fn a_lowered_max_db_connections_closes_the_surplus() {
    // Backends that keep idle clients are the handoff path's.
    let pg = Cluster::builder().conf("nextgres.pool_size = 4").conf("nextgres.hold_idle_clients = on").conf("nextgres.kernel_queue = off").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE a LOGIN; CREATE ROLE b LOGIN");
    one_query_as(&pg, "b");
    let count = || pg.backend_count(Some("a"), Some("postgres")) + pg.backend_count(Some("b"), Some("postgres"));
    let (mut a1, mut a2, kept) = two_clients_of_a_kept(&pg, 1);
    assert!(kept, "precondition: a's two backends keep their clients, b's is parked ({} backends)", count());
    assert_eq!(count(), 3, "a's two backends and b's");
    exec(&pg, "ALTER DATABASE postgres SET nextgres.max_db_connections = 1");
    // No client runs anything meanwhile.
    let trimmed = wait_until(Duration::from_secs(15), || count() == 1);
    assert!(
        trimmed,
        "not brought down to the lowered limit: {} backends (a: {} attached, b: {} parked)",
        count(),
        pool_backends(&pg, "a", "attached"),
        pool_backends(&pg, "b", "parked")
    );
    assert_eq!(pool_backends(&pg, "b", "parked"), 0, "b's unused backend stayed, one of a's went");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(), 1, "both of a's backends closed, below the limit");
    // Both go on, on the one backend left.
    a1.simple_query("SELECT 1").expect("a1 afterwards");
    a2.simple_query("SELECT 1").expect("a2 afterwards");
    assert_eq!(count(), 1);
}

/// The same under the kernel queue (the default): a's two backends, lent to
/// its queue and serving four busy clients, come down to a lowered
/// `max_db_connections` (one is recalled and closes) while the clients go
/// on. Before, both stayed for as long as the clients did (hunt11c 2).
#[test]
fn a_lowered_max_db_connections_closes_lent_backends() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE a LOGIN");
    let count = || pg.backend_count(Some("a"), Some("postgres"));
    let stop = AtomicBool::new(false);
    let served = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let mut c = pg.tcp("a", "postgres").connect().expect("a");
                let (stop, served) = (&stop, &served);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        c.batch_execute("SELECT pg_sleep(0.005)")?;
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok::<(), postgres::Error>(())
                })
            })
            .collect();
        let queued = || {
            first_value(&pg.admin().simple_query("SELECT kernel_queue_transactions FROM nextgres.pools WHERE role = 'a'").expect("pools"))
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        let grown = wait_until(Duration::from_secs(15), || count() == 2 && queued() > 0);
        let queued = queued();
        let trimmed = grown && queued > 0 && {
            exec(&pg, "ALTER DATABASE postgres SET nextgres.max_db_connections = 1");
            wait_until(Duration::from_secs(15), || count() == 1)
        };
        std::thread::sleep(Duration::from_millis(500));
        let after = count();
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().expect("client thread").expect("a client kept working");
        }
        assert!(grown && queued > 0, "precondition: 2 backends serving the queue ({} backends, {queued} queued transactions)", count());
        assert!(trimmed, "not brought down to the lowered limit: {} backends", count());
        assert_eq!(after, 1, "closed below the limit, or grew past it");
    });
    assert!(served.load(Ordering::Relaxed) > 0);
}

/// `max_db_connections` 1: role a's client has left, its backend stays
/// parked (idle_backend_timeout 600 s). Role b's very first client waits
/// for its pool's first login, which needs that room: a's unused backend is
/// closed for it. Before, a client waiting for its pool's first login did
/// not count as waiting, nothing was closed, and b's login failed with
/// 53400 at `query_wait_timeout` (15 s here).
#[test]
fn a_new_pools_first_login_gets_room_from_an_unused_pool() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 4").conf("nextgres.query_wait_timeout = 15").start();
    roles_a_and_b_under_a_db_limit(&pg, 1);
    one_query_as(&pg, "a");
    assert!(wait_until(APPLIED, || pool_backends(&pg, "a", "parked") == 1), "a's backend is not parked");
    let t0 = Instant::now();
    let b = pg.tcp("b", "postgres").connect();
    let mut b = b.unwrap_or_else(|e| panic!("b's first login after {:?}: {e:?}", t0.elapsed()));
    b.simple_query("SELECT 1").expect("b");
    eprintln!("b logged in and served after {:?}", t0.elapsed());
}

/// `nextgres.pools` shows a reloaded `pool_size` and `pool_mode` at once,
/// also for a pool that runs no transaction (before: the old values until
/// its next transaction).
#[test]
fn pools_view_follows_a_reload_without_traffic() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 8").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE a LOGIN");
    let mut a = pg.tcp("a", "postgres").connect().expect("a");
    a.simple_query("SELECT 1").expect("a");
    let view = || -> (i32, String) {
        let r = pg
            .admin()
            .query_one("SELECT pool_size, pool_mode FROM nextgres.pools WHERE role = 'a'", &[])
            .expect("nextgres.pools");
        (r.get(0), r.get(1))
    };
    assert_eq!(view(), (8, "transaction".to_string()));
    // The janitor's once-a-second refresh of pools that ran transactions
    // has passed.
    std::thread::sleep(Duration::from_millis(2500));
    exec(&pg, "ALTER SYSTEM SET nextgres.pool_size = 3; ALTER SYSTEM SET nextgres.pool_mode = 'session'");
    exec(&pg, "SELECT pg_reload_conf()");
    let shown = wait_until(APPLIED, || view() == (3, "session".to_string()));
    assert!(shown, "nextgres.pools after the reload: {:?}", view());
    drop(a);
}

/// `nextgres.max_pools` 2: with two (database, role) pools in use a third
/// is refused (53300 "nextgres: too many pools"); once a pool has no client
/// left (its backend only parked), a new pair takes its place: the idle
/// pool's backend closes and its row goes to the new pool (before: pools
/// were never freed, so after dropping a role or database, or with
/// changing tenants, every new pair was refused until a restart).
#[test]
fn a_full_pool_table_gives_an_idle_pools_row_to_a_new_pool() {
    let pg = Cluster::builder().conf("nextgres.max_pools = 2").start();
    // a keeps a backend logged in while idle: its pool must not log one in
    // again while it gives its row up.
    exec(
        &pg,
        "CREATE EXTENSION nextgres; CREATE ROLE a LOGIN; CREATE ROLE b LOGIN; CREATE ROLE c LOGIN;
         ALTER ROLE a SET nextgres.min_pool_size = 1",
    );
    let pools = || -> Vec<String> {
        pg.admin()
            .query("SELECT role FROM nextgres.pools ORDER BY role", &[])
            .expect("nextgres.pools")
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let mut a = pg.tcp("a", "postgres").connect().expect("a");
    a.simple_query("SELECT 1").expect("a");
    let mut b = pg.tcp("b", "postgres").connect().expect("b");
    b.simple_query("SELECT 1").expect("b");
    let e = pg.tcp("c", "postgres").connect().err().expect("a third pool while both are in use");
    assert_eq!(err_fields(&e).map(|f| (f.code, f.message)), Some(("53300".into(), "nextgres: too many pools".into())), "{e:?}");
    drop(a);
    assert!(
        wait_until(APPLIED, || pool_backends(&pg, "a", "parked") == 1 && pg.admin().query_one("SELECT clients_idle FROM nextgres.pools WHERE role = 'a'", &[]).map(|r| r.get::<_, i32>(0) == 0).unwrap_or(false)),
        "a's client is still counted"
    );
    let mut c = pg.tcp("c", "postgres").connect().expect("c takes the idle pool's row");
    for _ in 0..3 {
        let who = c.simple_query("SELECT current_user || '@' || current_database()").expect("c");
        assert_eq!(first_value(&who).as_deref(), Some("c@postgres"), "c served by another role's backend");
    }
    assert_eq!(pools(), vec!["b".to_string(), "c".to_string()]);
    // No backend of a comes back (its min_pool_size went with its pool).
    std::thread::sleep(Duration::from_millis(1500));
    let a_backends: i64 = pg
        .admin()
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = 'a' AND backend_type = 'client backend'", &[])
        .expect("activity")
        .get(0);
    assert_eq!(a_backends, 0, "a backend of the freed pool logged in again");
    b.simple_query("SELECT 1").expect("b goes on");
    // a comes back: now b's and c's pools are in use.
    let e = pg.tcp("a", "postgres").connect().err().expect("a while b and c are in use");
    assert_eq!(err_fields(&e).map(|f| f.code), Some("53300".into()), "{e:?}");
}

/// A role renamed and a new role created under the old name: a client of
/// the new role must not be served by the pool's backends, which are logged
/// in as the renamed one (it would have that role's privileges). The pool
/// of that name is retired: the new client gets a backend of its own role,
/// and a client connected before the rename goes on as the renamed role,
/// as a direct session does. Likewise for a role dropped and re-created.
/// Before: the new `alice` ran with `session_user` `alice_old`.
#[test]
fn a_renamed_roles_backends_never_serve_the_new_role_of_that_name() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE alice LOGIN");
    let who = |c: &mut postgres::Client| first_value(&c.simple_query("SELECT session_user::text").expect("session_user")).unwrap_or_default();
    let mut before = pg.tcp("alice", "postgres").connect().expect("alice");
    assert_eq!(who(&mut before), "alice");
    {
        let mut other = pg.tcp("alice", "postgres").connect().expect("alice again");
        assert_eq!(who(&mut other), "alice");
    }
    exec(&pg, "ALTER ROLE alice RENAME TO alice_old; CREATE ROLE alice LOGIN");
    let mut after = pg.tcp("alice", "postgres").connect().expect("the new alice");
    for _ in 0..3 {
        assert_eq!(who(&mut after), "alice", "the new role ran on the renamed role's backend");
        assert_eq!(who(&mut before), "alice_old", "the session from before the rename");
    }
    drop(before);
    drop(after);
    // Dropped and re-created under the same name.
    exec(&pg, "DROP ROLE alice; CREATE ROLE alice LOGIN");
    let mut again = pg.tcp("alice", "postgres").connect().expect("the re-created alice");
    let oid = first_value(&again.simple_query("SELECT (SELECT oid FROM pg_roles WHERE rolname = session_user)::text").expect("oid")).unwrap_or_default();
    let want = first_value(&pg.admin().simple_query("SELECT oid::text FROM pg_roles WHERE rolname = 'alice'").expect("oid")).unwrap_or_default();
    assert_eq!(oid, want, "served by a backend of the dropped role");
}

/// The name the pooler logs when a pool login landed on another role or
/// database of the pool's names.
const LANDED_ELSEWHERE: &str = "found another role or database of those names";

/// `pre_auth_delay` while a login is held, in seconds: room on a loaded
/// machine for the login to start and the rename to commit within it.
const HELD_S: u64 = 6;

fn admin_query(admin: &mut postgres::Client, sql: &str) -> Vec<postgres::SimpleQueryMessage> {
    admin.simple_query(sql).expect(sql)
}

/// A role renamed while one of its pool's logins is under way: a pool
/// login is by names, so one that the server authenticates after the rename
/// is a session of the new role of that name. `pre_auth_delay` holds
/// (`HELD_S`) the login that `start` makes the pooler begin (for a client of the old
/// role) before the server looks the name up; once `under_way` (given the
/// admin session and the server log since `start`) says it began, `alice`
/// is renamed to `alice_old` and a new `alice` (LOGIN REPLICATION)
/// created. Returns `start`'s thread and the server log's mark once that
/// login is past its delay, having checked the pooler logged in no more by
/// that name and left no session of the new role behind.
fn rename_alice_while_a_pool_login_waits<T: Send + 'static>(
    pg: &Cluster,
    admin: &mut postgres::Client,
    start: impl FnOnce() -> T + Send + 'static,
    mut under_way: impl FnMut(&mut postgres::Client, &str) -> bool,
) -> (std::thread::JoinHandle<T>, usize) {
    admin.batch_execute(&format!("ALTER SYSTEM SET pre_auth_delay = {HELD_S}")).expect("pre_auth_delay");
    admin.batch_execute("SELECT pg_reload_conf()").expect("reload");
    // The admin session reads the file after the postmaster, whose new
    // children inherit the delay.
    let mut delay = || first_value(&admin_query(admin, "SELECT current_setting('pre_auth_delay')")).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(10), || delay() == format!("{HELD_S}s")), "pre_auth_delay not applied");
    let mark = pg.log_mark();
    let started = Instant::now();
    let client = std::thread::spawn(start);
    // The login is under way, in its delay: it has not looked the name up
    // yet.
    assert!(wait_until(Duration::from_secs(HELD_S - 1), || under_way(admin, &pg.log_since(mark))), "no login started for the client");
    admin.batch_execute("ALTER ROLE alice RENAME TO alice_old; CREATE ROLE alice LOGIN REPLICATION").expect("rename");
    admin.batch_execute("ALTER SYSTEM RESET pre_auth_delay").expect("pre_auth_delay");
    admin.batch_execute("SELECT pg_reload_conf()").expect("reload");
    // Past the delay (the login began before the rename), until the
    // pooler meets it (not at all on a build without the check), and time
    // for a login storm to show.
    std::thread::sleep(Duration::from_secs(HELD_S + 1).saturating_sub(started.elapsed()));
    wait_until(Duration::from_secs(15), || pg.log_since(mark).contains(LANDED_ELSEWHERE));
    std::thread::sleep(Duration::from_millis(1500));
    let landings = pg.log_since(mark).matches(LANDED_ELSEWHERE).count();
    assert!(landings <= 1, "the pool kept logging in by the renamed role's name; log:\n{}", pg.log_since(mark));
    let new_alice = |admin: &mut postgres::Client| {
        first_value(&admin_query(
            admin,
            "SELECT count(*)::text FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid WHERE r.rolname = 'alice' AND a.backend_type IN ('client backend', 'walsender')",
        ))
        .as_deref()
            == Some("0")
    };
    assert!(wait_until(Duration::from_secs(15), || new_alice(admin)), "a session of the new alice outlived its login: {:?}", pg.activity());
    (client, mark)
}

/// `under_way` for a pool login: the pool of `alice` counts one starting.
fn pool_login_started(admin: &mut postgres::Client, _log: &str) -> bool {
    first_value(&admin_query(admin, "SELECT coalesce(sum(backends_starting), 0)::text FROM nextgres.pools WHERE role = 'alice'")).as_deref() == Some("1")
}

/// The pooler met the held login on the new role (checked last, so that a
/// build without the check fails on what its clients saw).
fn assert_landed_elsewhere_once(pg: &Cluster, mark: usize) {
    let landings = pg.log_since(mark).matches(LANDED_ELSEWHERE).count();
    assert_eq!(landings, 1, "the held login did not land on the new role; log:\n{}", pg.log_since(mark));
}

/// The rename above while one of the pool's logins is under way. The
/// login that lands on the new `alice` must serve no client of the pool:
/// the waiting client goes on the pool's first backend once it is free (as
/// the old role, like a direct session from before the rename), and the
/// pool logs in no more backends by the name (before: the login served the
/// waiting client when it landed on it, else the client's connection
/// closed without a word).
#[test]
fn a_pool_login_that_lands_on_the_new_role_of_that_name_serves_no_one() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 4").conf("log_connections = on").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE alice LOGIN");
    let who = |c: &mut postgres::Client| first_value(&c.simple_query("SELECT session_user::text").expect("session_user")).unwrap_or_default();
    // One admin session for the whole test: new server logins are slow
    // while pre_auth_delay is set.
    let mut admin = pg.admin();
    let mut first = pg.tcp("alice", "postgres").connect().expect("alice");
    assert_eq!(who(&mut first), "alice");
    // The first client holds the pool's only backend in a transaction, so
    // the second one's query makes the pool log in another.
    first.batch_execute("BEGIN; SELECT 1").expect("begin");
    let mut second = pg.tcp("alice", "postgres").connect().expect("alice again");
    let (waiting, mark) = rename_alice_while_a_pool_login_waits(&pg, &mut admin, move || {
        let r = second.simple_query("SELECT session_user::text").map(|m| first_value(&m).unwrap_or_default());
        (r, second)
    }, pool_login_started);
    // The first client commits: the waiting one gets the pool's first
    // backend, as the old role.
    first.batch_execute("COMMIT").expect("commit");
    let (r, mut second) = waiting.join().expect("waiting client");
    assert_eq!(r.expect("the waiting client's query"), "alice_old", "served by the new role's session");
    assert_eq!(who(&mut second), "alice_old");
    assert_eq!(who(&mut first), "alice_old");
    // A client of the new role gets a pool of its own.
    let mut new = pg.tcp("alice", "postgres").connect().expect("the new alice");
    assert_eq!(who(&mut new), "alice");
    assert_landed_elsewhere_once(&pg, mark);
}

/// The same in `pool_mode = dedicated`, where each client's backend logs
/// in for it at its first statement: the client whose login landed on the
/// new `alice` is not served by it; it gets the FATAL that the clients of
/// a retired pool with no backend left get (57P01, "renamed or
/// re-created"), then an orderly close. So does a third client, waiting
/// behind `max_pinned_backends` for a login the retired pool will never
/// start (before: it waited for `query_wait_timeout`). Read off the wire:
/// the `postgres` crate reported such a FATAL as a closed connection in 5
/// of 6 runs here.
#[test]
fn a_dedicated_login_that_lands_on_the_new_role_of_that_name_is_refused() {
    let pg = Cluster::builder()
        .conf("nextgres.pool_mode = dedicated")
        .conf("nextgres.max_pinned_backends = 2")
        .conf("nextgres.query_wait_timeout = 60")
        .conf("log_connections = on")
        .start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE alice LOGIN");
    let mut admin = pg.admin();
    let mut first = pg.tcp("alice", "postgres").connect().expect("alice");
    first.batch_execute("SELECT 1").expect("first");
    let raw = || nextgres_test::raw::Raw::connect(pg.port(), "alice", "postgres", Duration::from_secs(30));
    let (mut second, mut third) = (raw(), raw());
    // Opened before pre_auth_delay holds new sessions.
    let mut watch = pg.admin();
    let (clients, mark) = rename_alice_while_a_pool_login_waits(&pg, &mut admin, move || {
        second.send_query("SELECT session_user::text");
        // Behind the second one's login, at the pool's cap of 2.
        assert!(wait_until(Duration::from_secs(HELD_S - 1), || pool_login_started(&mut watch, "")), "no login for the second client");
        third.send_query("SELECT session_user::text");
        (second.expect_fatal(), third.expect_fatal())
    }, pool_login_started);
    let (second, third) = clients.join().expect("a client of the old role was served, or never told");
    for (severity, code, ended) in [second, third] {
        assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "57P01"));
        assert_eq!(ended, std::io::ErrorKind::UnexpectedEof, "not an orderly close");
    }
    let session: String = first_value(&first.simple_query("SELECT session_user::text").expect("first goes on")).unwrap_or_default();
    assert_eq!(session, "alice_old");
    assert_landed_elsewhere_once(&pg, mark);
}

/// The same for a replication client (physical, `replication=true`),
/// whose walsender the pooler logs in by the role's name too: one that
/// lands on the new `alice` (LOGIN REPLICATION) serves the client of the
/// old role no WAL; the client gets FATAL 57P01 and an orderly close
/// (before: it was ready, a walsender of the new role).
#[test]
fn a_walsender_login_that_lands_on_the_new_role_of_that_name_is_refused() {
    let pg = Cluster::builder().conf("log_connections = on").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE alice LOGIN REPLICATION");
    let mut admin = pg.admin();
    let port = pg.port();
    let (client, mark) = rename_alice_while_a_pool_login_waits(
        &pg,
        &mut admin,
        move || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
            pool_support::raw_startup(&mut s, &[("user", "alice"), ("database", "postgres"), ("replication", "true")])
        },
        // The pooler authenticated the client: its walsender login began.
        |_, log| log.contains("connection authorized: user=alice"),
    );
    let (msgs, closed) = client.join().expect("replication client");
    let last = msgs.last().expect("an answer");
    assert_eq!(last.tag, b'E', "the client got a walsender of the new role: {:?}", msgs.iter().map(|m| m.tag as char).collect::<String>());
    assert_eq!((last.field(b'S').as_deref(), last.field(b'C').as_deref()), (Some("FATAL"), Some("57P01")));
    assert!(closed, "not closed after the FATAL");
    assert_landed_elsewhere_once(&pg, mark);
}

/// `nextgres.pause()` called through the pooler on the caller's own
/// database returns true once the other transactions are done: the caller's
/// own backend serves the call itself and is not waited for (before: false
/// after `wait_seconds`, always). An empty database or role name is refused
/// with 22023 (before: `kill_clients('')` acted on every database), a NULL
/// database or wait with 22004; `reset_stats()` resets every pool.
#[test]
fn pause_through_the_pooler_and_empty_names() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 4").start();
    exec(&pg, "CREATE EXTENSION nextgres");
    let mut me = pg.tcp(nextgres_test::SUPERUSER, "postgres").connect().expect("pooled superuser session");
    let paused = first_value(&me.simple_query("SELECT nextgres.pause('postgres', NULL, 10)::text").expect("pause")).unwrap_or_default();
    assert_eq!(paused, "true", "pause waited for the caller's own backend");
    let n: i32 = pg.admin().query_one("SELECT nextgres.resume('postgres')", &[]).expect("resume").get(0);
    assert_eq!(n, 1);
    assert_eq!(first_value(&me.simple_query("SELECT 'served'").expect("after resume")).as_deref(), Some("served"));
    // An empty name: 22023. A NULL database or wait: 22004 (before: XX000
    // from inside the function, "argument is NULL").
    let refused = [
        ("22023", "SELECT nextgres.kill_clients('')"),
        ("22023", "SELECT nextgres.reconnect('')"),
        ("22023", "SELECT nextgres.pause('', NULL, 0)"),
        ("22023", "SELECT nextgres.resume('')"),
        ("22023", "SELECT nextgres.wait_close('', NULL, 0)"),
        ("22023", "SELECT nextgres.kill_clients('postgres', '')"),
        ("22004", "SELECT nextgres.kill_clients(NULL)"),
        ("22004", "SELECT nextgres.reconnect(NULL)"),
        ("22004", "SELECT nextgres.pause(NULL)"),
        ("22004", "SELECT nextgres.pause('postgres', NULL, NULL)"),
        ("22004", "SELECT nextgres.resume(NULL)"),
        ("22004", "SELECT nextgres.wait_close(NULL)"),
        ("22004", "SELECT nextgres.wait_close('postgres', NULL, NULL)"),
    ];
    for (code, sql) in refused {
        let e = pg.admin().simple_query(sql).expect_err(sql);
        assert_eq!(e.code().map(|c| c.code()), Some(code), "{sql}: {e:?}");
    }
    // reset_stats() without names resets every pool, as documented (it was
    // refused as an empty name: 22023); an empty name is refused.
    pg.admin().simple_query("SELECT nextgres.reset_stats()").expect("reset_stats()");
    pg.admin().simple_query("SELECT nextgres.reset_stats(NULL, 'postgres')").expect("reset_stats(NULL, role)");
    let e = pg.admin().simple_query("SELECT nextgres.reset_stats('')").expect_err("reset_stats('')");
    assert_eq!(e.code().map(|c| c.code()), Some("22023"), "reset_stats(''): {e:?}");
    // kill_client is STRICT: NULL in, NULL out.
    let r = first_value(&pg.admin().simple_query("SELECT coalesce(nextgres.kill_client(NULL, 1)::text, 'null')").expect("kill_client(NULL)"));
    assert_eq!(r.as_deref(), Some("null"));
    // The session from before was not killed by any of them.
    assert_eq!(first_value(&me.simple_query("SELECT 'still here'").expect("still here")).as_deref(), Some("still here"));
}

/// A role granted the kill functions (as the README suggests for an
/// operator) is held to pg_terminate_backend's rule: it may not end a
/// superuser's clients (42501, the server's message), nor every role's at
/// once, even with `pg_signal_backend`; it may end another role's only with
/// that role's privileges or `pg_signal_backend`'s. Before:
/// `kill_clients('postgres')` by such a role ended the superuser's pooled
/// session too, and it could end any plain role's clients (hunt9a 5).
#[test]
fn granted_kill_functions_follow_pg_terminate_backends_rule() {
    let pg = Cluster::builder().start();
    exec(
        &pg,
        "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN; CREATE ROLE app2 LOGIN; CREATE ROLE ops LOGIN;
         GRANT USAGE ON SCHEMA nextgres TO ops;
         GRANT EXECUTE ON FUNCTION nextgres.kill_clients(text, text), nextgres.kill_client(text, integer) TO ops;
         GRANT pg_monitor TO ops",
    );
    let su = nextgres_test::SUPERUSER;
    let mut boss = pg.tcp(su, "postgres").connect().expect("pooled superuser session");
    boss.simple_query("SELECT 1").expect("boss");
    let mut app = pg.tcp("app", "postgres").connect().expect("app");
    app.simple_query("SELECT 1").expect("app");
    let mut app2 = pg.tcp("app2", "postgres").connect().expect("app2");
    app2.simple_query("SELECT 1").expect("app2");
    let mut ops = pg.unix("ops", "postgres").connect().expect("ops");
    let port_of = |ops: &mut postgres::Client, role: &str| -> i32 {
        ops.query_one("SELECT client_port FROM nextgres.clients WHERE role = $1", &[&role]).expect("client row").get(0)
    };
    let (boss_port, app2_port) = (port_of(&mut ops, su), port_of(&mut ops, "app2"));
    let refused = |ops: &mut postgres::Client, sql: &str, detail: &str| {
        let e = ops.simple_query(sql).expect_err(sql);
        let db = e.as_db_error().expect("a server error");
        assert_eq!((db.code().code(), db.message()), ("42501", "permission denied to terminate process"), "{sql}");
        assert!(db.detail().is_some_and(|d| d.contains(detail)), "{sql}: {db:?}");
    };
    let superuser_only = [
        "SELECT nextgres.kill_clients('postgres')".to_string(),
        format!("SELECT nextgres.kill_clients('postgres', '{su}')"),
        format!("SELECT nextgres.kill_client('127.0.0.1', {boss_port})"),
    ];
    for sql in &superuser_only {
        refused(&mut ops, sql, "SUPERUSER attribute");
    }
    // Neither a member of app / app2 nor of pg_signal_backend.
    refused(&mut ops, "SELECT nextgres.kill_clients('postgres', 'app')", "pg_signal_backend");
    refused(&mut ops, &format!("SELECT nextgres.kill_client('127.0.0.1', {app2_port})"), "pg_signal_backend");
    app.simple_query("SELECT 'app still here'").expect("app survived the refusals");
    // With app's privileges: its clients.
    exec(&pg, "GRANT app TO ops");
    ops.simple_query("SELECT nextgres.kill_clients('postgres', 'app')").expect("a role it has the privileges of");
    assert!(app.simple_query("SELECT 1").is_err(), "app's client was not ended");
    app2.simple_query("SELECT 'app2 still here'").expect("app2 untouched");
    // With pg_signal_backend: any plain role's, never a superuser's.
    exec(&pg, "GRANT pg_signal_backend TO ops");
    for sql in &superuser_only {
        refused(&mut ops, sql, "SUPERUSER attribute");
    }
    let killed = ops.query_one(&format!("SELECT nextgres.kill_client('127.0.0.1', {app2_port})"), &[]).expect("pg_signal_backend");
    assert!(killed.get::<_, bool>(0), "app2's client not found");
    assert!(app2.simple_query("SELECT 1").is_err(), "app2's client was not ended");
    boss.simple_query("SELECT 'still here'").expect("the superuser's session survived");
    // The check goes by the role the clients authenticated as, not by its
    // name: a superuser renamed under its client, its name given to a role
    // ops has the privileges of, is still a superuser's client (hunt10 N1).
    exec(&pg, "CREATE ROLE chief LOGIN SUPERUSER");
    let mut chief = pg.tcp("chief", "postgres").connect().expect("chief");
    chief.simple_query("SELECT 1").expect("chief");
    let chief_port = port_of(&mut ops, "chief");
    exec(&pg, "ALTER ROLE chief RENAME TO chief_old; CREATE ROLE chief; GRANT chief TO ops");
    refused(&mut ops, &format!("SELECT nextgres.kill_client('127.0.0.1', {chief_port})"), "SUPERUSER attribute");
    refused(&mut ops, "SELECT nextgres.kill_clients('postgres', 'chief')", "SUPERUSER attribute");
    chief.simple_query("SELECT 'still here'").expect("the renamed superuser's session survived");
}

/// log_connections: the pooler writes a client's application_name into its
/// "connection authorized" line as the server writes it (bytes outside
/// printable ASCII as `\xNN` from 16 on, `?` in 15), so a newline or a
/// terminal escape sent as application_name cannot forge or hide log lines.
/// Before, the bytes went into the log as sent (hunt5-B 8).
#[test]
fn application_name_is_logged_cleaned_as_by_the_server() {
    let pg = Cluster::builder().conf("log_connections = on").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN");
    let mark = pg.log_mark();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", pg.port())).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let (msgs, _) = pool_support::raw_startup(&mut s, &[("user", "app"), ("database", "postgres"), ("application_name", "x\nFORGED \u{1b}[31m")]);
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'), "login");
    let authorized = "connection authorized: user=app database=postgres application_name=";
    assert!(wait_until(APPLIED, || pg.log_since(mark).contains(authorized)), "no connection authorized line");
    let log = pg.log_since(mark);
    let want = if pg.pg_major() >= 16 { "x\\x0aFORGED \\x1b[31m" } else { "x?FORGED ?[31m" };
    assert!(log.contains(&format!("{authorized}{want}\n")), "{log}");
    assert!(!log.contains("\nFORGED") && !log.contains('\u{1b}'), "{log}");
}

/// What the operation functions and views tell a DBA (hunt9c 2-10): `pause`
/// refuses a database or role that does not exist (a pause of a misspelt
/// name paused nothing and waited for a later one of that name), answers
/// true at once with 0 s when nothing runs (it answered false before the
/// pooler had seen it), and holds at most 48 slots, so `reconnect` still
/// finds one (all 64 went to pauses, then every function failed with
/// XX000); a client that waits out `query_wait_timeout` in a paused pool is
/// told it is paused and counts as a wait (it counted as none); a client's
/// and a backend's `transactions` count those served through the kernel
/// queue (they stayed near 0).
#[test]
fn operations_and_views_tell_what_happened() {
    let pg = Cluster::builder().conf("nextgres.query_wait_timeout = 2").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN");
    let mut admin = pg.admin();
    admin.batch_execute("DO $$ BEGIN FOR i IN 1..49 LOOP EXECUTE format('CREATE ROLE t%s', i); END LOOP; END $$").expect("roles");
    for (sql, code) in [("SELECT nextgres.pause('nosuchdb')", "3D000"), ("SELECT nextgres.pause('postgres', 'nosuchrole')", "42704")] {
        let e = admin.simple_query(sql).expect_err(sql);
        assert_eq!(e.code().map(|c| c.code()), Some(code), "{sql}: {e:?}");
    }
    // Transactions through the kernel queue, counted per client and backend.
    let mut app = pg.tcp("app", "postgres").connect().expect("app");
    for _ in 0..5 {
        app.batch_execute("SELECT 1").expect("app");
    }
    let (client_xacts, backend_xacts): (i64, i64) = {
        let c: i64 = admin.query_one("SELECT sum(transactions)::bigint FROM nextgres.clients WHERE role = 'app'", &[]).expect("clients").get(0);
        let b: i64 = admin.query_one("SELECT sum(transactions)::bigint FROM nextgres.backends WHERE role = 'app'", &[]).expect("backends").get(0);
        (c, b)
    };
    assert!(client_xacts >= 5 && backend_xacts >= 5, "client {client_xacts}, backends {backend_xacts}");
    // Nothing of t1's runs (it has no pool): a 0 s pause answers true.
    for _ in 0..5 {
        let paused: bool = admin.query_one("SELECT nextgres.pause('postgres', 't1', 0)", &[]).expect("pause").get(0);
        assert!(paused, "pause with nothing running");
        admin.batch_execute("SELECT nextgres.resume('postgres', 't1')").expect("resume");
    }
    admin.batch_execute("SELECT nextgres.reset_stats('postgres', 'app')").expect("reset_stats");
    admin.batch_execute("SELECT nextgres.pause('postgres', 'app', 0)").expect("pause");
    let e = app.batch_execute("SELECT 'while paused'").expect_err("a paused pool's client waits out query_wait_timeout");
    let db = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e:?}"));
    assert_eq!(db.code().code(), "53400", "{db:?}");
    assert!(db.hint().is_some_and(|h| h.contains("paused")), "{db:?}");
    let (waits, max_wait): (i64, f64) = {
        let r = admin.query_one("SELECT waits, max_wait_ms::float8 FROM nextgres.pools WHERE role = 'app'", &[]).expect("pools");
        (r.get(0), r.get(1))
    };
    assert!(waits >= 1 && max_wait >= 1500.0, "waits {waits}, max_wait_ms {max_wait}");
    // 48 pauses in force at most; the one-shot operations still run.
    admin.batch_execute("SELECT nextgres.pause('postgres', 't' || i, 0) FROM generate_series(1, 47) i").expect("47 more pauses");
    let e = admin.simple_query("SELECT nextgres.pause('postgres', 't48', 0)").expect_err("the 49th pause");
    assert_eq!(e.code().map(|c| c.code()), Some("54000"), "{e:?}");
    admin.batch_execute("SELECT nextgres.pause('postgres', 't1', 0)").expect("a pause already in force");
    admin.batch_execute("SELECT nextgres.reconnect('postgres'); SELECT nextgres.reset_stats()").expect("one-shot operations");
    let ended: i32 = admin.query_one("SELECT nextgres.resume('postgres')", &[]).expect("resume").get(0);
    assert_eq!(ended, 48);
    let mut again = pg.tcp("app", "postgres").connect().expect("app again");
    again.batch_execute("SELECT 'resumed'").expect("served after resume");
}

/// A DBA sees which pools are paused and which pauses are in force, those
/// of a database without pools yet included (before: nothing listed them,
/// hunt9c 14), and a resume clears both.
#[test]
fn pauses_are_listed_and_their_pools_marked() {
    let pg = Cluster::builder().start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN; CREATE ROLE other LOGIN; CREATE DATABASE quiet");
    let mut admin = pg.admin();
    for role in ["app", "other"] {
        pg.tcp(role, "postgres").connect().expect(role).batch_execute("SELECT 1").expect(role);
    }
    let paused = |admin: &mut postgres::Client| -> Vec<(String, bool)> {
        admin
            .query("SELECT role, paused FROM nextgres.pools WHERE database = 'postgres' ORDER BY role", &[])
            .expect("pools")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let pauses = |admin: &mut postgres::Client| -> Vec<(String, Option<String>)> {
        admin.query("SELECT * FROM nextgres.pauses", &[]).expect("pauses").iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    assert_eq!(paused(&mut admin), [("app".into(), false), ("other".into(), false)]);
    assert_eq!(pauses(&mut admin), []);
    admin.batch_execute("SELECT nextgres.pause('postgres', 'app', 5); SELECT nextgres.pause('quiet', NULL, 5)").expect("pause");
    assert_eq!(paused(&mut admin), [("app".into(), true), ("other".into(), false)]);
    assert_eq!(pauses(&mut admin), [("postgres".into(), Some("app".into())), ("quiet".into(), None)]);
    admin.batch_execute("SELECT nextgres.pause('postgres', NULL, 5)").expect("pause the database");
    assert_eq!(paused(&mut admin), [("app".into(), true), ("other".into(), true)]);
    let ended: i32 = admin.query_one("SELECT nextgres.resume('postgres') + nextgres.resume('quiet')", &[]).expect("resume").get(0);
    assert_eq!(ended, 3);
    assert_eq!(paused(&mut admin), [("app".into(), false), ("other".into(), false)]);
    assert_eq!(pauses(&mut admin), []);
}

/// An application_name that is not UTF-8 (the name of a program in a
/// LATIN1 locale) logs in and reads as the server cleans it, as on a
/// direct connection (`B\xfccher` from 16 on, `B?cher` in 15). Before: FATAL
/// 08P01 "invalid startup packet: parameter is not valid UTF-8" (hunt9b 1).
#[test]
fn a_non_utf8_application_name_logs_in_as_directly() {
    use std::io::Write;
    let pg = Cluster::builder().start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN");
    let mut body = 196608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app\0database\0postgres\0application_name\0B\xfccher\0\0");
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend(body);
    fn app_name<S: std::io::Read + Write>(s: &mut S, packet: &[u8]) -> Result<String, String> {
        s.write_all(packet).expect("startup");
        loop {
            let m = pool_support::read_msg(s).ok_or("connection closed")?;
            match m.tag {
                b'Z' => break,
                b'E' => return Err(String::from_utf8_lossy(&m.body).into_owned()),
                _ => {}
            }
        }
        s.write_all(&pool_support::query_msg("SHOW application_name")).expect("query");
        loop {
            let m = pool_support::read_msg(s).ok_or("connection closed")?;
            if m.tag == b'D' {
                return Ok(String::from_utf8_lossy(&m.body[6..]).into_owned());
            }
        }
    }
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", pg.port())).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let path = pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port()));
    let mut unix = std::os::unix::net::UnixStream::connect(path).expect("connect to the Unix socket");
    unix.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let (direct, pooled) = (app_name(&mut unix, &packet), app_name(&mut tcp, &packet));
    let want = if pg.pg_major() >= 16 { "B\\xfccher" } else { "B?cher" };
    assert_eq!(direct.as_deref(), Ok(want), "direct");
    assert_eq!(pooled, direct, "pooled");
}
