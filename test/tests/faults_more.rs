//! More fault tests of the pooler (issue 5, "Reliability"): a crash restart
//! of the server, a pg_hba.conf and settings reload under load, clients
//! killed in the middle of COPY and while waiting for a backend, and ALTER
//! ROLE (PASSWORD, NOLOGIN) on a role with a live pool.
//!
//! Same rules as `faults.rs` (whose helpers live in `fault_support`): real
//! servers and real clients (psql, pgbench, rust-postgres, a raw protocol
//! client), every wait bounded by `SETTLE`, every body by `TEST_LIMIT`.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test faults_more -- --test-threads=2
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use nextgres_test::procs::process_alive;
use nextgres_test::{
    parse_summary, wait_until, with_timeout, Cluster, PasswordEncryption, SUPERUSER,
};
use postgres::Client;

mod fault_support;
use fault_support::*;

// ---- helpers ------------------------------------------------------------------

fn kill9(child: &mut Child) {
    child.kill().expect("kill -9 psql");
    let _ = child.wait();
}

/// Most backends of `role` seen at once in one sample, by nextgres.backends
/// and by pg_stat_activity. A failed sample query fails the test.
fn backends_now(admin: &mut Client, role: &str) -> usize {
    let q = "SELECT (SELECT count(*) FROM nextgres.backends WHERE role = $1),
                    (SELECT count(*) FROM pg_stat_activity
                      WHERE usename = $1 AND backend_type = 'client backend')";
    let r = admin
        .query_one(q, &[&role])
        .unwrap_or_else(|e| panic!("backend sampler: {e:?}"));
    r.get::<_, i64>(0).max(r.get::<_, i64>(1)) as usize
}

/// Runs `f` while a sampler thread records the most backends of `role` seen
/// at once (see [`backends_now`]). The first sample is taken before `f`
/// starts and sampling goes on until it returns, so at least one sample
/// falls in the run; a sampler error fails the test; the maximum must be
/// non-zero (the role has a pool while `f` runs).
#[track_caller]
fn max_backends_during<T>(pg: &Cluster, role: &str, f: impl FnOnce() -> T) -> (T, usize) {
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = AtomicBool::new(false);
    let max = AtomicUsize::new(0);
    let samples = AtomicUsize::new(0);
    let out = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut admin = pg.admin();
            loop {
                let n = backends_now(&mut admin, role);
                max.fetch_max(n, Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                // pacing between samples, not a synchronisation
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        assert!(
            wait_until(SETTLE, || samples.load(Ordering::Relaxed) > 0 || sampler.is_finished()),
            "the backend sampler never took a sample"
        );
        let _stop = Stop(&stop);
        f()
    });
    let (samples, max) = (samples.load(Ordering::Relaxed), max.load(Ordering::Relaxed));
    assert!(samples > 0, "no backend sample taken during the run");
    assert!(max > 0, "{samples} samples during the run and none saw a backend of {role}");
    (out, max)
}

/// The most backends of `role` seen at once over `n` samples taken now.
#[track_caller]
fn max_backends_over(pg: &Cluster, role: &str, n: usize) -> usize {
    let mut admin = pg.admin();
    (0..n).map(|_| backends_now(&mut admin, role)).max().unwrap_or(0)
}

/// Reads what the server sends until the connection ends: the last
/// ErrorResponse or NoticeResponse (severity, code, message) if any. Panics if the
/// connection is still open after `SETTLE` (a hang).
#[track_caller]
fn raw_until_closed(raw: &mut Raw, who: &str) -> Option<(String, String, String)> {
    raw.s.set_read_timeout(Some(SETTLE)).expect("read timeout");
    let mut last = None;
    loop {
        match raw.read_msg() {
            Ok((b'E' | b'N', body)) => {
                if let RawFail::Db {
                    severity,
                    code,
                    message,
                } = parse_error(&body)
                {
                    last = Some((severity, code, message));
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{who}: connection neither closed nor errored within {SETTLE:?}")
            }
            Err(_) => return last,
        }
    }
}

/// Superuser connection straight to the server, or None while it cannot
/// take one (crash recovery).
fn try_admin(pg: &Cluster) -> Option<Client> {
    pg.connect_unix(SUPERUSER, "postgres", None).ok()
}

/// (database, role, clients_waiting, backends_attached, transactions) of
/// every pool.
fn pools(pg: &Cluster) -> Vec<(String, String, i64, i64, i64)> {
    pg.admin()
        .query(
            "SELECT database::text, role::text, clients_waiting::int8, backends_attached::int8,
                    transactions::int8
               FROM nextgres.pools ORDER BY 1, 2",
            &[],
        )
        .expect("nextgres.pools")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

/// A login through the pooler with a bounded wait, running one query.
fn login_and_query(
    pg: &Cluster,
    user: &str,
    password: Option<&str>,
) -> Result<String, postgres::Error> {
    let conn = pg.tcp(user, DB).maybe_password(password);
    with_timeout(SETTLE, "login through the pooler", move || {
        let mut c = conn.connect()?;
        let r = c.simple_query("SELECT current_user::text")?;
        Ok(first_value(&r).unwrap_or_default())
    })
}

/// SQLSTATE and message of a failed login.
fn db_error(e: &postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(d) => (d.code().code().to_string(), d.message().to_string()),
        None => (String::new(), format!("{e:?}")),
    }
}

/// Sessions of `role` inside a transaction or running COPY.
fn open_work(pg: &Cluster, role: &str) -> Vec<(i32, String, String)> {
    pg.admin()
        .query(
            "SELECT pid, coalesce(state, ''), coalesce(query, '') FROM pg_stat_activity
              WHERE usename = $1
                AND (state LIKE 'idle in transaction%' OR (state = 'active' AND query ILIKE 'COPY%'))",
            &[&role],
        )
        .expect("pg_stat_activity")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// pg_stat_progress_copy: (pid, command, tuples_processed) of `role`'s COPYs.
/// `command` is NULL (here "") for a COPY whose progress row exists but whose
/// command the server has not reported yet.
fn copies(pg: &Cluster, role: &str) -> Vec<(i32, String, i64)> {
    pg.admin()
        .query(
            "SELECT p.pid, p.command, p.tuples_processed FROM pg_stat_progress_copy p
               JOIN pg_stat_activity a USING (pid) WHERE a.usename = $1",
            &[&role],
        )
        .expect("pg_stat_progress_copy")
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default(), r.get(2)))
        .collect()
}

fn count(pg: &Cluster, table: &str) -> i64 {
    admin_i64(pg, &format!("SELECT count(*) FROM {table}"))
}

// ---- 1. crash restart -----------------------------------------------------------

/// kill -9 of an ordinary backend makes the postmaster reinitialize
/// (restart_after_crash = on): every server process, the pooler included,
/// is ended. With an idle client, a parked backend (idle client of a second
/// pool), two clients attached inside transactions and a client waiting for a
/// backend: every client's connection ends, never hangs. Attached clients
/// get what a direct session gets from its dying backend (WARNING 57P02
/// "terminating connection because of crash of another server process",
/// then the close); clients held by the pooler just see the close, as the
/// agent is killed by the same SIGQUIT and the pooler process with it
/// (PR_SET_PDEATHSIG) (a direct idle session would also get
/// the 57P02 warning first: a known difference, not asserted). No
/// uncommitted change survives, the postmaster starts a new pooler, logins
/// made once the old pooler has exited (during the restart) are all served
/// by the new pooler, logins made in the moment of the kill end (served or an
/// error, never a hang), new pooled
/// connections work again, and the pools are rebuilt from scratch.
#[test]
fn crash_restart_recovers_pooler_and_pools() {
    // The harness turns synchronous_commit off; a crash would then lose the
    // setup's last commits (WAL still in shared buffers).
    let builder = Cluster::builder()
        .conf("nextgres.pool_size = 2")
        .conf("synchronous_commit = on");
    run(builder, |pg| {
        let postmaster = pg.pid().expect("postmaster");
        let old_pooler = running_pooler_pid(pg);
        // A second pool with an idle client: its backend is parked.
        let mut parked_client = raw(pg, APP2);
        parked_client.value("SELECT 1");
        // Both backends of pool (app) attached to open transactions.
        let mut attached1 = raw(pg, APP);
        attached1
            .query("BEGIN; UPDATE t SET v = v + 1 WHERE id = 1")
            .expect("open transaction 1");
        let mut attached2 = raw(pg, APP);
        attached2.query("BEGIN").expect("open transaction 2");
        attached2.value("SELECT 2");
        // An idle client and a waiting one.
        let mut idle = raw(pg, APP);
        let mut waiting = raw(pg, APP);
        waiting.send_query("SELECT 'waited'");
        assert!(
            wait_until(SETTLE, || clients(pg).iter().any(|c| c.1 == "waiting")),
            "no client waiting: {:?}",
            clients(pg)
        );
        let old_backends = pooled(pg);
        assert_eq!(
            old_backends.iter().filter(|b| b.1 == "attached").count(),
            2,
            "{old_backends:?}"
        );
        assert_eq!(
            old_backends.iter().filter(|b| b.1 == "parked").count(),
            1,
            "{old_backends:?}"
        );

        // A direct session (Unix socket, not pooled) is the victim.
        let mut direct = pg.admin();
        let victim: i32 = direct
            .query_one("SELECT pg_backend_pid()", &[])
            .expect("pid")
            .get(0);
        let mark = pg.log_mark();
        // SAFETY: plain kill(2) on a backend pid the server just told us.
        assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);

        // Logins attempted right away, on their own threads.
        let during: Vec<_> = (0..3)
            .map(|i| {
                let conn = pg.tcp(APP, DB);
                std::thread::spawn(move || -> Result<String, postgres::Error> {
                    let mut c = conn.connect()?;
                    let r = c.simple_query(&format!("SELECT {i}"))?;
                    Ok(first_value(&r).unwrap_or_default())
                })
            })
            .collect();

        // Every client's connection ends, bounded.
        let mut ends = Vec::new();
        for (name, raw) in [
            ("idle client", &mut idle),
            ("client of the parked backend's pool", &mut parked_client),
            ("attached client 1", &mut attached1),
            ("attached client 2", &mut attached2),
            ("waiting client", &mut waiting),
        ] {
            let end = raw_until_closed(raw, name);
            if name.starts_with("attached") {
                // The client's own backend says what a direct backend says.
                let (severity, code, message) = end.clone().unwrap_or_else(|| {
                    panic!("{name}: connection closed without the crash warning")
                });
                assert_eq!(
                    (severity.as_str(), code.as_str(), message.as_str()),
                    (
                        "WARNING",
                        "57P02",
                        "terminating connection because of crash of another server process"
                    ),
                    "{name}"
                );
            } else if let Some((_, code, _)) = &end {
                // Clients held by the pooler: the pooler is killed too, so
                // their connection closes (a 57P02 would be fine as well).
                assert_eq!(code, "57P02", "{name}: {end:?}");
            }
            ends.push((name, end));
        }
        eprintln!("client endings: {ends:?}");

        // Logins made once the old pooler is gone, while the postmaster
        // restarts: they wait in the listen backlog (the postmaster keeps the
        // socket) and the new pooler must serve every one of them.
        assert!(
            wait_until(SETTLE, || !process_alive(old_pooler)),
            "the old pooler {old_pooler} outlived the crash"
        );
        let restarted_before_logins = pg
            .log_since(mark)
            .contains("database system is ready to accept connections");
        let after_pooler: Vec<_> = (0..3)
            .map(|i| {
                let conn = pg.tcp(APP, DB);
                std::thread::spawn(move || -> Result<String, postgres::Error> {
                    let mut c = conn.connect()?;
                    let r = c.simple_query(&format!("SELECT {}", 10 + i))?;
                    Ok(first_value(&r).unwrap_or_default())
                })
            })
            .collect();
        eprintln!(
            "logins after the old pooler exited made {} the server was ready again",
            if restarted_before_logins { "after" } else { "before" }
        );
        let (_d, r) = bounded_query(direct, "SELECT 1", "the killed direct session");
        r.expect_err("the killed session still answers");

        // The postmaster reinitialized (same postmaster, new pooler).
        assert!(
            wait_until(SETTLE, || pg
                .log_since(mark)
                .contains("all server processes terminated; reinitializing")),
            "no crash restart in the log:\n{}",
            pg.log_since(mark)
        );
        assert_eq!(
            pg.pid(),
            Some(postmaster),
            "the postmaster itself restarted"
        );
        let mut new_pooler = None;
        assert!(
            wait_until(SETTLE, || {
                new_pooler = try_admin(pg).and_then(|mut a| {
                    a.query_one("SELECT pooler_pid FROM nextgres.status()", &[])
                        .ok()
                        .and_then(|r| r.get::<_, Option<i32>>(0))
                });
                new_pooler.is_some_and(|p| p != old_pooler)
            }),
            "no new pooler after the crash restart (status: {new_pooler:?})"
        );
        let new_pooler = new_pooler.expect("new pooler");
        assert!(
            !process_alive(old_pooler),
            "old pooler {old_pooler} survived"
        );
        assert!(process_alive(new_pooler));
        // The pooler process is the child of the new agent, the background
        // worker pg_stat_activity lists (the pooler itself has no PGPROC).
        let stat = std::fs::read_to_string(format!("/proc/{new_pooler}/stat")).expect("/proc/PID/stat");
        let ppid: i32 = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .expect("ppid in /proc/PID/stat");
        let listed = admin_i64(
            pg,
            &format!(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE backend_type = 'nextgres agent' AND pid = {ppid}"
            ),
        );
        assert_eq!(listed, 1, "the new pooler's parent {ppid} is not the agent in pg_stat_activity");

        // Logins made after the old pooler exited: every one served by the
        // new pooler.
        for (i, h) in after_pooler.into_iter().enumerate() {
            let r = with_timeout(SETTLE, "login made during the crash restart", move || {
                h.join().expect("login thread")
            });
            let v = r.unwrap_or_else(|e| {
                panic!("login {i} made after the old pooler exited was not served: {e:?}\n{}", pg.log_tail(30))
            });
            assert_eq!(v, (10 + i).to_string());
        }
        // Logins made right after the kill, before the old pooler was gone:
        // served, or (accepted by the old pooler in its last moment) an
        // error like any other client's; never a hang.
        for (i, h) in during.into_iter().enumerate() {
            let r = with_timeout(SETTLE, "login made during the crash restart", move || {
                h.join().expect("login thread")
            });
            match r {
                Ok(v) => assert_eq!(v, i.to_string()),
                // A login accepted by the old pooler in its last moment
                // loses its connection like any other client: an error,
                // not a hang.
                Err(e) => eprintln!("login {i} during the crash restart failed: {e:?}"),
            }
        }
        // New pooled connections work again (poll with a deadline).
        let mut last = None;
        assert!(
            wait_until(SETTLE, || {
                last = Some(login_and_query(pg, APP, None));
                matches!(last, Some(Ok(_)))
            }),
            "no pooled login after the crash restart: {last:?}\n{}",
            pg.log_tail(30)
        );
        assert_eq!(row_value(pg), 0, "an uncommitted update survived the crash");
        assert!(idle_in_transaction(pg).is_empty(), "{:?}", pg.activity());

        // Pools rebuilt from scratch: only what was used since, no old
        // backend, nothing waiting or attached, counters restarted.
        let mut c = connect(pg, APP);
        c.batch_execute("BEGIN; UPDATE t SET v = v + 5 WHERE id = 1; COMMIT")
            .expect("a transaction after the crash restart");
        assert_eq!(row_value(pg), 5);
        assert!(
            wait_until(SETTLE, || pooled(pg).iter().all(|b| b.1 == "parked")),
            "{:?}",
            pooled(pg)
        );
        let now = pooled(pg);
        assert!(!now.is_empty() && now.len() <= 2, "{now:?}");
        for (pid, _) in &now {
            assert!(
                !old_backends.iter().any(|(o, _)| o == pid),
                "backend {pid} survived the crash: {now:?}"
            );
        }
        for (pid, _) in &old_backends {
            assert!(!process_alive(*pid), "old pooled backend {pid} still runs");
        }
        let p = pools(pg);
        assert_eq!(p.len(), 1, "stale pools after the crash restart: {p:?}");
        let (db, role, waiting_n, attached_n, xacts) = p[0].clone();
        assert_eq!((db.as_str(), role.as_str()), (DB, APP));
        assert_eq!((waiting_n, attached_n), (0, 0), "{p:?}");
        assert!(xacts <= 10, "transaction counter not reset: {p:?}");
        assert_eq!(clients(pg).len(), 1, "stale clients: {:?}", clients(pg));
        drop(c);
        assert_pooler_serves(pg, new_pooler);
    });
}

// ---- 2. SIGHUP with a changed pg_hba.conf under load ------------------------------

/// pgbench (-C: a new login for every transaction) runs through the pooler
/// as `app` while pg_hba.conf is rewritten to reject `app2` and
/// nextgres.pool_size goes from 2 to 3, then `SELECT pg_reload_conf()`. The
/// load finishes with no failed transaction and every committed row is there;
/// new logins of app2 get the server's 28000 "pg_hba.conf rejects
/// connection"; app still logs in; an app2 client connected before the
/// reload keeps working (hba decides logins only, as for direct sessions);
/// the pool grows to 3 backends and never beyond.
#[test]
fn sighup_hba_and_pool_size_under_load() {
    run(Cluster::builder().conf("nextgres.pool_size = 2"), |pg| {
        let pooler = running_pooler_pid(pg);
        pg.admin()
            .batch_execute("CREATE TABLE load_t (x int); GRANT SELECT, INSERT ON load_t TO app")
            .expect("load table");
        let script = pg.dir().join("load.sql");
        std::fs::write(
            &script,
            "\\set x random(1, 1000000)\nBEGIN;\nINSERT INTO load_t VALUES (:x);\nSELECT pg_sleep(0.002);\nCOMMIT;\n",
        )
        .expect("writing the pgbench script");
        let mut app2_before = connect(pg, APP2);
        assert_eq!(one(&mut app2_before, "SELECT 'app2 before'"), "app2 before");

        let script = script.to_string_lossy().into_owned();
        let ((out, max_before, max_after, reloaded_during_load), max_all) = max_backends_during(
            pg,
            APP,
            || {
                std::thread::scope(|s| {
                    let bench = s.spawn(|| {
                        pg.pgbench_timeout(
                            &pg.tcp(APP, DB),
                            &["-n", "-C", "-c", "4", "-j", "2", "-T", "10", "-f", &script],
                            Duration::from_secs(120),
                        )
                    });
                    assert!(
                        wait_until(SETTLE, || count(pg, "load_t") >= 50),
                        "the load never got going"
                    );
                    let max_before = max_backends_over(pg, APP, 50);

                    pg.set_hba(
                        "local all postgres trust\n\
                         local all all trust\n\
                         host all app2 127.0.0.1/32 reject\n\
                         host all all 127.0.0.1/32 trust\n\
                         host all all ::1/128 trust\n",
                    )
                    .expect("rewriting pg_hba.conf");
                    pg.append_conf("nextgres.pool_size = 3").expect("conf");
                    let ok: bool = pg
                        .admin()
                        .query_one("SELECT pg_reload_conf()", &[])
                        .expect("pg_reload_conf")
                        .get(0);
                    assert!(ok);

                    // The new rule applies to new logins of app2, soon.
                    let mut last = None;
                    assert!(
                        wait_until(SETTLE, || {
                            last = Some(login_and_query(pg, APP2, None));
                            matches!(last, Some(Err(_)))
                        }),
                        "app2 still logs in after the reload: {last:?}"
                    );
                    let e = last.expect("tried").expect_err("rejected");
                    assert_eq!(
                        db_error(&e),
                        (
                            "28000".to_string(),
                            "pg_hba.conf rejects connection for host \"127.0.0.1\", user \"app2\", database \"postgres\", no encryption".to_string()
                        ),
                        "{e:?}"
                    );
                    // Other roles still log in.
                    assert_eq!(login_and_query(pg, APP, None).expect("app login"), APP);
                    // The new pool size is used while the load runs.
                    let grew = wait_until(SETTLE, || {
                        bench.is_finished()
                            || admin_i64(
                                pg,
                                "SELECT count(*) FROM nextgres.backends WHERE role = 'app'",
                            ) == 3
                    });
                    let reloaded_during_load = !bench.is_finished();
                    assert!(grew);
                    let max_after = max_backends_over(pg, APP, 25);
                    assert!(
                        wait_until(Duration::from_secs(150), || bench.is_finished()),
                        "pgbench did not finish"
                    );
                    let out = bench.join().expect("pgbench thread");
                    (out, max_before, max_after, reloaded_during_load)
                })
            },
        );
        assert!(out.success(), "pgbench failed:\n{out}");
        assert!(
            !out.stderr.contains("aborted") && !out.stderr.contains("error"),
            "pgbench reported errors:\n{out}"
        );
        let summary = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no summary:\n{out}"));
        assert_eq!(
            summary.failed.unwrap_or(0),
            0,
            "failed transactions:\n{out}"
        );
        assert!(summary.processed > 0);
        assert_eq!(
            count(pg, "load_t") as u64,
            summary.processed,
            "committed rows differ from pgbench's processed transactions"
        );
        assert!(
            reloaded_during_load,
            "the load ended before the reload was checked; lengthen -T"
        );
        assert!(
            max_before <= 2,
            "more than pool_size = 2 backends: {max_before}"
        );
        assert_eq!(max_after, 3, "pool_size = 3 not used under load");
        assert!(max_all <= 3, "more than pool_size = 3 backends: {max_all}");

        // The setting as every session sees it, and the pooler applies it.
        let mut c = connect(pg, APP);
        assert_eq!(one(&mut c, "SHOW nextgres.pool_size"), "3");
        // Existing app2 session: unaffected by the hba change.
        assert_eq!(one(&mut app2_before, "SELECT 'app2 after'"), "app2 after");
        drop(app2_before);
        drop(c);
        assert_pooler_serves(pg, pooler);
    });
}

// ---- 3. client killed mid-COPY ----------------------------------------------------

/// A psql inside `BEGIN; COPY ... FROM STDIN` is killed with SIGKILL halfway
/// through its data, and a raw client closes its socket in the middle of a
/// COPY FROM; a psql reading `COPY big TO STDOUT` is killed halfway. Each
/// time: no transaction or COPY is left open, no row of a partial COPY is
/// visible, the dead client leaves nextgres.clients, other clients are
/// served during and after, and the pool never has more than pool_size
/// backends, sampled throughout, also while three more clients want a
/// backend during the stalled COPY TO.
#[test]
fn client_killed_mid_copy() {
    run(Cluster::builder().conf("nextgres.pool_size = 2"), |pg| {
        let pooler = running_pooler_pid(pg);
        pg.admin()
            .batch_execute(
                "CREATE TABLE copy_t (x int, pad text); GRANT SELECT, INSERT ON copy_t TO app;
                 CREATE TABLE big AS SELECT g AS id, repeat('x', 200) AS pad
                   FROM generate_series(1, 100000) g;
                 GRANT SELECT ON big TO app;",
            )
            .expect("copy tables");
        let mut other = connect(pg, APP);

        let ((), max) = max_backends_during(pg, APP, || {
            // (a) psql killed mid COPY FROM STDIN, inside a transaction.
            let mut psql = psql_child(pg, APP, &[], true, false);
            let mut stdin = psql.stdin.take().expect("psql stdin");
            stdin
                .write_all(b"BEGIN;\nCOPY copy_t FROM STDIN;\n")
                .expect("writing to psql");
            let mut rows = String::new();
            for i in 0..20_000 {
                rows.push_str(&format!("{i}\tsome padding for row {i}\n"));
            }
            stdin.write_all(rows.as_bytes()).expect("COPY data");
            stdin.flush().expect("flush");
            let mut copy_pid = None;
            assert!(
                wait_until(SETTLE, || {
                    copy_pid = copies(pg, APP)
                        .into_iter()
                        .find(|c| c.1 == "COPY FROM" && c.2 > 0)
                        .map(|c| c.0);
                    copy_pid.is_some()
                }),
                "the COPY FROM never started: {:?}",
                pg.activity()
            );
            // Other clients are served meanwhile.
            assert_eq!(one(&mut other, "SELECT 'during copy'"), "during copy");
            kill9(&mut psql);
            drop(stdin);
            after_dead_copy(pg, &mut other, "psql killed in COPY FROM");

            // (b) a raw client closes its socket mid COPY FROM.
            let mut raw = raw(pg, APP);
            raw.send_query("COPY copy_t FROM STDIN");
            loop {
                let (tag, _) = raw.read_msg().expect("CopyInResponse");
                if tag == b'G' {
                    break;
                }
                assert_ne!(tag, b'E', "COPY FROM refused");
            }
            for i in 0..1000 {
                let line = format!("{i}\traw row {i}\n");
                let mut msg = vec![b'd'];
                msg.extend_from_slice(&((line.len() + 4) as i32).to_be_bytes());
                msg.extend_from_slice(line.as_bytes());
                raw.s.write_all(&msg).expect("CopyData");
            }
            assert!(
                wait_until(SETTLE, || copies(pg, APP).iter().any(|c| c.2 >= 1000)),
                "the raw COPY FROM never got its rows: {:?}",
                copies(pg, APP)
            );
            raw.vanish();
            after_dead_copy(pg, &mut other, "raw client vanished in COPY FROM");

            // (c) psql killed while reading COPY TO STDOUT of a large table.
            let mut psql = psql_child(pg, APP, &["-c", "COPY big TO STDOUT"], false, true);
            let mut out = psql.stdout.take().expect("psql stdout");
            let mut buf = vec![0u8; 1 << 20];
            out.read_exact(&mut buf).expect("the first MiB of COPY TO");
            // We stop reading: psql blocks on its stdout, the backend on
            // the socket, halfway through the table.
            let mut progress = None;
            assert!(
                wait_until(SETTLE, || {
                    progress = copies(pg, APP).into_iter().find(|c| c.1 == "COPY TO");
                    progress.is_some()
                }),
                "no COPY TO in progress"
            );
            let progress = progress.expect("found");
            assert!(
                progress.2 < 100_000,
                "COPY TO was not stopped halfway: {progress:?}"
            );
            assert_eq!(one(&mut other, "SELECT 'during copy to'"), "during copy to");
            // More demand than the pool has room for while the COPY TO holds
            // one of its two backends: three clients at once, each running
            // short queries, share the other backend (the sampler must never
            // see a third one).
            std::thread::scope(|s| {
                for _ in 0..3 {
                    s.spawn(|| {
                        let mut c = connect(pg, APP);
                        for _ in 0..3 {
                            assert_eq!(one(&mut c, "SELECT 'busy' FROM pg_sleep(0.2)"), "busy");
                        }
                    });
                }
            });
            kill9(&mut psql);
            drop(out);
            after_dead_copy(pg, &mut other, "psql killed in COPY TO");
        });
        assert!(
            max <= 2,
            "more than pool_size = 2 backends of app at once: {max}"
        );
        assert_eq!(count(pg, "copy_t"), 3, "rows of a partial COPY are visible");
        drop(other);
        assert_pooler_serves(pg, pooler);
    });
}

/// After a client died in a COPY: nothing stays open, nothing partial is
/// visible, the dead client is gone from nextgres.clients, and a further
/// transaction through the pool succeeds.
#[track_caller]
fn after_dead_copy(pg: &Cluster, other: &mut Client, what: &str) {
    assert!(
        wait_until(SETTLE, || copies(pg, APP).is_empty()
            && open_work(pg, APP).is_empty()),
        "{what}: a COPY or transaction is left open: {:?} {:?}",
        copies(pg, APP),
        open_work(pg, APP)
    );
    // Only the committed marker rows of earlier steps.
    let rows = count(pg, "copy_t");
    assert!(rows <= 2, "{what}: {rows} rows, a partial COPY is visible");
    assert!(
        wait_until(SETTLE, || clients(pg).len() == 1),
        "{what}: the dead client is still listed: {:?}",
        clients(pg)
    );
    other
        .batch_execute("BEGIN; INSERT INTO copy_t VALUES (-1, 'after'); COMMIT")
        .unwrap_or_else(|e| panic!("{what}: a transaction after it: {e:?}"));
    assert_eq!(count(pg, "copy_t"), rows + 1);
    assert!(idle_in_transaction(pg).is_empty(), "{:?}", pg.activity());
}

// ---- 4. client killed while waiting for a backend ----------------------------------

/// pool_size = 1: one client holds the only backend in a transaction; a raw
/// client's query waits and the client closes its socket; then a psql's query
/// waits and psql is killed with SIGKILL. Each dead waiter leaves
/// nextgres.clients and its query never runs. After the holder commits, a
/// third client is served promptly by the same backend (it was not handed to
/// a dead client nor lost), and nothing is left waiting or attached.
#[test]
fn client_killed_while_waiting_for_backend() {
    let builder = Cluster::builder()
        .conf("nextgres.pool_size = 1")
        .conf("nextgres.query_wait_timeout = 120");
    run(builder, |pg| {
        let pooler = running_pooler_pid(pg);
        let mut holder = connect(pg, APP);
        holder
            .batch_execute("BEGIN; UPDATE t SET v = v + 1 WHERE id = 1")
            .expect("BEGIN");
        let backend: i32 = one(&mut holder, "SELECT pg_backend_pid()")
            .parse()
            .expect("pid");
        let waiting = |pg: &Cluster| clients(pg).iter().filter(|c| c.1 == "waiting").count();

        // A raw client waits, then drops its socket.
        let mut raw = raw(pg, APP);
        let raw_port = raw.local_port();
        raw.send_query("UPDATE t SET v = v + 100 WHERE id = 1");
        assert!(
            wait_until(SETTLE, || waiting(pg) == 1),
            "the raw client never waited: {:?}",
            clients(pg)
        );
        raw.vanish();
        assert!(
            wait_until(SETTLE, || !clients(pg).iter().any(|c| c.0 == raw_port)),
            "the vanished waiter is still listed: {:?}",
            clients(pg)
        );

        // A psql waits, then is killed.
        let mut psql = psql_child(
            pg,
            APP,
            &["-c", "UPDATE t SET v = v + 1000 WHERE id = 1"],
            false,
            false,
        );
        assert!(
            wait_until(SETTLE, || waiting(pg) == 1),
            "psql never waited: {:?}",
            clients(pg)
        );
        kill9(&mut psql);
        assert!(
            wait_until(SETTLE, || clients(pg).len() == 1),
            "the killed waiter is still listed: {:?}",
            clients(pg)
        );
        assert_eq!(waiting(pg), 0);

        holder.batch_execute("COMMIT").expect("COMMIT");
        // A third client is served promptly, by the same backend.
        let conn = pg.tcp(APP, DB);
        let (pid, third) = with_timeout(Duration::from_secs(10), "third client", move || {
            let mut c = conn.connect().expect("third client connects");
            let pid: i32 = one(&mut c, "SELECT pg_backend_pid()").parse().expect("pid");
            (pid, c)
        });
        assert_eq!(pid, backend, "the pool's backend was lost to a dead client");
        assert_eq!(row_value(pg), 1, "a dead waiter's query ran");
        drop(third);
        drop(holder);
        assert!(
            wait_until(SETTLE, || clients(pg).is_empty()),
            "{:?}",
            clients(pg)
        );
        assert_eq!(wait_parked(pg, 1), vec![backend]);
        let p = pools(pg);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].2, p[0].3), (0, 0), "waiting/attached left: {p:?}");
        assert_pooler_serves(pg, pooler);
    });
}

// ---- 5. ALTER ROLE with a live pool --------------------------------------------------

/// A psql reading statements from a pipe, connected through the pooler and
/// kept connected between statements; its output is read line by line.
struct PsqlSession {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl PsqlSession {
    fn start(pg: &Cluster, user: &str, password: &str) -> PsqlSession {
        let mut cmd = Command::new(pg.install().client_bin("psql"));
        nextgres_test::cmd::scrub_pg_env(&mut cmd);
        cmd.env("PGPASSWORD", password)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &pg.tcp(user, DB).conninfo(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting psql");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("psql stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        PsqlSession {
            child,
            stdin,
            lines,
        }
    }

    /// Runs one statement that returns one value: Ok(value), or Err(what
    /// psql printed on stderr) once psql has exited (ON_ERROR_STOP).
    fn query(&mut self, sql: &str) -> Result<String, String> {
        let stdin = self.stdin.as_mut().expect("psql still running");
        if stdin
            .write_all(format!("{sql}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .is_err()
        {
            return Err(self.finish());
        }
        match self.lines.recv_timeout(SETTLE) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.finish()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("psql: no answer to {sql} within {SETTLE:?}")
            }
        }
    }

    /// Closes stdin, waits (bounded) for psql to exit; its stderr.
    fn finish(&mut self) -> String {
        drop(self.stdin.take());
        let exited = wait_until(SETTLE, || matches!(self.child.try_wait(), Ok(Some(_))));
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!("psql did not exit within {SETTLE:?}");
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }
}

impl Drop for PsqlSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A SCRAM role `r` with a live pool: clients connected with the old
/// password (rust-postgres `a`, a psql `b`), parked backends, and a direct
/// session (Unix socket) to compare with.
///
/// ALTER ROLE r PASSWORD 'new': the old password is refused for new logins
/// (28P01, the server's message), the new one is accepted. Connected clients
/// are served by the live backends. Pool logins use the key of the last
/// client that authenticated with a password: if the pool must log in again
/// before any client used the new password, the server refuses that login
/// and the client that waited for it loses its connection (a direct session
/// would survive; the pooler has no valid secret to log in with: documented
/// limitation). A client that logs in with the new password right after such
/// a failure is accepted (its fresh key is tried, not the stale failure
/// replayed), and from then on the pool logs in with the new key for old and
/// new clients alike.
///
/// ALTER ROLE r NOLOGIN: new logins get the server's 28000 'role "r" is not
/// permitted to log in', through the pooler exactly as directly. Decision for
/// connected clients: like a direct session, which NOLOGIN does not end, a
/// pooled client stays connected and is served as long as its pool has live
/// backends. A pool login needed afterwards is refused by the server (the
/// role may not log in), and the client waiting for it gets that FATAL 28000,
/// without the pg_hba.conf hint meant for misconfigured local lines.
/// ALTER ROLE r LOGIN: logins work again, and connected clients are served.
#[test]
fn alter_role_password_and_nologin_with_live_pool() {
    let builder = Cluster::builder()
        .auth_host("scram-sha-256")
        .auth_local("scram-sha-256")
        .conf("nextgres.pool_size = 2");
    run(builder, |pg| {
        let pooler = running_pooler_pid(pg);
        pg.create_role("r", "old", PasswordEncryption::ScramSha256);
        pg.admin()
            .batch_execute("GRANT ALL ON t TO r")
            .expect("grant");
        let tcp = |pw: &str| pg.tcp("r", DB).password(pw);
        let mut a = tcp("old")
            .connect()
            .expect("a logs in with the old password");
        let mut b = PsqlSession::start(pg, "r", "old");
        // Two backends: b's query runs while a holds one in a transaction.
        a.batch_execute("BEGIN; SELECT 1").expect("BEGIN a");
        assert_eq!(b.query("SELECT 'b';"), Ok("b".into()));
        a.batch_execute("COMMIT").expect("COMMIT a");
        let first = wait_parked(pg, 2);
        let mut direct = pg
            .connect_unix("r", DB, Some("old"))
            .expect("direct session of r");

        // ---- ALTER ROLE ... PASSWORD
        pg.admin()
            .batch_execute("ALTER ROLE r PASSWORD 'new'")
            .expect("ALTER ROLE PASSWORD");
        let e = login_and_query(pg, "r", Some("old")).expect_err("the old password still works");
        let direct_e = pg
            .connect_unix("r", DB, Some("old"))
            .map(|_| ())
            .expect_err("the old password still works directly");
        assert_eq!(
            db_error(&e),
            (
                "28P01".to_string(),
                "password authentication failed for user \"r\"".to_string()
            ),
            "{e:?}"
        );
        assert_eq!(db_error(&e), db_error(&direct_e));
        // Connected clients are served by the live backends.
        assert_eq!(one(&mut a, "SELECT 'a'"), "a");
        assert_eq!(b.query("SELECT 'b again';"), Ok("b again".into()));
        assert_eq!(wait_parked(pg, 2), first);
        // No backend left and nobody used the new password yet: the pool
        // login with the old key is refused, a loses its connection.
        terminate_pool(pg, "r");
        let mark = pg.log_mark();
        let (_a, r) = bounded_query(a, "SELECT 1", "a after the password change, no backends");
        r.expect_err("a pool login with the old password's key succeeded");
        assert!(
            pg.log_since(mark)
                .contains("pool login for role \"r\" to database \"postgres\" failed: 28P01"),
            "{}",
            pg.log_since(mark)
        );
        // Right away: the new password is accepted and its key used.
        assert_eq!(
            login_and_query(pg, "r", Some("new"))
                .expect("the new password right after a failed pool login"),
            "r"
        );
        let mut c = tcp("new")
            .connect()
            .expect("c logs in with the new password");
        assert_eq!(one(&mut c, "SELECT 'c'"), "c");
        // Fresh pool logins (new key) serve old and new clients.
        terminate_pool(pg, "r");
        c.batch_execute("BEGIN; UPDATE t SET v = v + 1 WHERE id = 1")
            .expect("c after the pool logged in again");
        assert_eq!(
            b.query("SELECT 'b after new logins';"),
            Ok("b after new logins".into())
        );
        c.batch_execute("COMMIT").expect("COMMIT c");
        let second = wait_parked(pg, 2);
        assert!(
            second.iter().all(|p| !first.contains(p)),
            "no fresh pool login: {first:?} -> {second:?}"
        );

        // ---- ALTER ROLE ... NOLOGIN
        pg.admin()
            .batch_execute("ALTER ROLE r NOLOGIN")
            .expect("ALTER ROLE NOLOGIN");
        let e = login_and_query(pg, "r", Some("new")).expect_err("a NOLOGIN role logged in");
        let direct_e = pg
            .connect_unix("r", DB, Some("new"))
            .map(|_| ())
            .expect_err("a NOLOGIN role logged in directly");
        assert_eq!(
            db_error(&e),
            (
                "28000".to_string(),
                "role \"r\" is not permitted to log in".to_string()
            ),
            "{e:?}"
        );
        assert_eq!(db_error(&e), db_error(&direct_e));
        // Connected clients: served while the pool has backends, as the
        // direct session is.
        assert_eq!(
            one(&mut direct, "SELECT 'direct survives'"),
            "direct survives"
        );
        c.batch_execute("BEGIN; UPDATE t SET v = v + 1 WHERE id = 1")
            .expect("c after NOLOGIN");
        assert_eq!(
            b.query("SELECT 'b after nologin';"),
            Ok("b after nologin".into())
        );
        c.batch_execute("COMMIT").expect("COMMIT c");
        assert_eq!(row_value(pg), 2);
        // Without backends the pool cannot log in: the server refuses it,
        // and the client that needed the backend gets the server's reason.
        terminate_pool(pg, "r");
        let err = b
            .query("SELECT 'b without backends';")
            .expect_err("a NOLOGIN pool login worked");
        assert!(
            err.contains("FATAL:  role \"r\" is not permitted to log in"),
            "psql said: {err}"
        );
        assert!(!err.contains("pg_hba.conf"), "misleading hint: {err}");

        // ---- ALTER ROLE ... LOGIN: logins and connected clients work again.
        pg.admin()
            .batch_execute("ALTER ROLE r LOGIN")
            .expect("ALTER ROLE LOGIN");
        let mut last = None;
        assert!(
            wait_until(SETTLE, || {
                last = Some(login_and_query(pg, "r", Some("new")));
                matches!(last, Some(Ok(_)))
            }),
            "r cannot log in again: {last:?}"
        );
        let (_c, r) = bounded_query(c, "SELECT 'c after LOGIN'", "c after LOGIN");
        assert_eq!(
            first_value(&r.expect("c after LOGIN")).as_deref(),
            Some("c after LOGIN")
        );
        drop(direct);
        assert_eq!(pooler_pid(pg), Some(pooler), "the pooler was replaced");
    });
}

/// pg_terminate_backend on every pooled backend of `role`; waits until they
/// are gone from nextgres.backends and the server.
#[track_caller]
fn terminate_pool(pg: &Cluster, role: &str) {
    let pids: Vec<i32> = pg
        .admin()
        .query(
            "SELECT pid FROM nextgres.backends WHERE role = $1",
            &[&role],
        )
        .expect("nextgres.backends")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!pids.is_empty(), "{role} has no pooled backends");
    for &p in &pids {
        terminate_backend(pg, p);
    }
    assert!(
        wait_until(SETTLE, || pids.iter().all(|&p| !session_exists(pg, p))
            && pooled_pids(pg).iter().all(|p| !pids.contains(p))),
        "terminated backends linger: {:?}",
        pooled(pg)
    );
}

/// (soft, hard) "Max open files" of `pid` from /proc/PID/limits.
fn nofile_limits(pid: i32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc/PID/limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files line");
    let mut f = line["Max open files".len()..].split_whitespace();
    (f.next().expect("soft").to_string(), f.next().expect("hard").to_string())
}

/// The pooler runs with the hard RLIMIT_NOFILE, whatever soft limit the
/// server was started with (a TLS client costs it three descriptors), and
/// LOGs both: the postmaster's soft limit lowered with prlimit (run as the
/// server's OS user), the agent restarted (pg_terminate_backend) from it,
/// and its new pooler
/// has soft = hard and says it raised it; clients are served.
#[test]
fn the_pooler_runs_with_the_hard_open_files_limit() {
    run(Cluster::builder(), |pg| {
        let postmaster = pg.pid().expect("postmaster pid");
        let (_, hard) = nofile_limits(postmaster);
        let user = pg.server_os_user();
        let out = Command::new("runuser")
            .args(["-u", &user, "--", "prlimit", &format!("--pid={postmaster}"), &format!("--nofile=512:{hard}")])
            .output()
            .expect("prlimit");
        assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
        let old = running_pooler_pid(pg);
        let mark = pg.log_mark();
        // A new agent is forked by the postmaster (with its lowered soft
        // limit) and forks the new pooler.
        fault_support::terminate_agent(pg);
        assert!(
            wait_until(SETTLE, || pooler_pid(pg).is_some_and(|p| p != old)),
            "no pooler restarted after pg_terminate_backend of the agent"
        );
        let new = running_pooler_pid(pg);
        assert_eq!(nofile_limits(new), (hard.clone(), hard.clone()), "restarted pooler's open files limits");
        let log = pg.log_since(mark);
        assert!(
            log.contains(&format!("pooler open files limit (RLIMIT_NOFILE): {hard} (hard limit {hard}, raised from 512)")),
            "no LOG line with the raised limit:\n{log}"
        );
        assert_pooler_serves(pg, new);
    });
}

/// A pooled backend that cannot take a client's socket: its open files
/// limit lowered (prlimit, as the server's OS user) to its lowest free
/// descriptor number, so the SCM_RIGHTS descriptor of the next ATTACH is
/// dropped by the kernel (MSG_CTRUNC). The client gets that backend's
/// FATAL (not a silent close, not a hang), the backend exits, the pooler
/// stays and logs a new backend in for the next client.
#[test]
fn a_backend_that_cannot_take_the_client_socket_ends_that_client_with_a_fatal() {
    run(Cluster::builder().conf("nextgres.pool_size = 1"), |pg| {
        let pooler = running_pooler_pid(pg);
        let mut c = raw(pg, APP);
        assert_eq!(c.value("SELECT 1"), "1");
        let backend = wait_parked(pg, 1)[0];
        let open: Vec<usize> = std::fs::read_dir(format!("/proc/{backend}/fd"))
            .expect("/proc/PID/fd")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let limit = (0..).find(|l| !open.contains(l)).expect("a free number");
        let user = pg.server_os_user();
        let out = Command::new("runuser")
            .args(["-u", &user, "--", "prlimit", &format!("--pid={backend}"), &format!("--nofile={limit}:{limit}")])
            .output()
            .expect("prlimit");
        assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
        c.send_query("SELECT 2");
        let mut errors = Vec::new();
        let end = loop {
            match c.read_msg() {
                Ok((b'E', body)) => errors.push(parse_error(&body)),
                Ok((b'Z', _)) => break "ReadyForQuery".to_string(),
                Ok(_) => {}
                Err(e) => break format!("{:?}", e.kind()),
            }
        };
        let text = format!("{errors:?}");
        assert!(
            matches!(errors.last(), Some(RawFail::Db { severity, .. }) if severity == "FATAL")
                && text.contains("could not receive the client socket from the pooler"),
            "client of a backend out of descriptors: {text}, then {end}"
        );
        assert!(
            wait_until(SETTLE, || !process_alive(backend)),
            "the backend that could not take the socket is still running"
        );
        assert_pooler_serves(pg, pooler);
    });
}

/// `client_connection_check_interval`, set by a pooled client, makes the
/// server check the client's socket during a long query
/// (pq_check_connection, a wait on the socket). The client vanishes during
/// `pg_sleep(60)`: the server ends that query at the next check with
/// "connection to client lost", as on a direct connection, and not with an
/// epoll error. With `hold_idle_clients` off the sleep starts on a fresh
/// attach, where the client's socket is not in the backend's wait set until
/// the server first waits on it (`glue.c`, `ng_epoll_ctl`): this check is
/// that first wait. The pool then serves the next client.
#[test]
fn connection_check_sees_a_pooled_client_vanish_mid_query() {
    run(
        Cluster::builder().conf("nextgres.pool_size = 1").conf("nextgres.hold_idle_clients = off"),
        |pg| {
            let sleeping = |pg: &Cluster| {
                admin_i64(
                    pg,
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
                )
            };
            let mut raw = nextgres_test::raw::Raw::connect(pg.port(), APP, DB, SETTLE);
            raw.query("SET client_connection_check_interval = '100ms'").expect("SET");
            raw.send_query("SELECT pg_sleep(60)");
            assert!(wait_until(SETTLE, || sleeping(pg) == 1), "the sleep never started\n{}", pg.log_tail(20));
            let mark = pg.log_mark();
            raw.vanish();
            assert!(
                wait_until(Duration::from_secs(20), || sleeping(pg) == 0),
                "the server did not notice the client leave during its query\n{}",
                pg.log_since(mark)
            );
            let log = pg.log_since(mark);
            assert!(log.contains("connection to client lost"), "{log}");
            assert!(!log.contains("epoll_ctl"), "{log}");
            let mut next = pg.connect_tcp(APP, DB, None).expect("the next client");
            next.simple_query("SELECT 1").expect("the next client's query");
        },
    );
}

/// `client_connection_check_interval` in postgresql.conf: each statement
/// arms the check's timer, which would expire while the backend is parked
/// between this client's transactions (`hold_idle_clients` off) and check
/// a socket slot that holds no client then. The timer stops when the
/// backend gives its client back (the next statement arms it again), so the
/// pool's one backend serves every statement, and the log shows no
/// `epoll_ctl` error and no crash.
#[test]
fn connection_check_timer_does_not_fire_while_parked() {
    run(
        Cluster::builder()
            .conf("nextgres.pool_size = 1")
            .conf("nextgres.hold_idle_clients = off")
            .conf("client_connection_check_interval = '100ms'"),
        |pg| {
            let mark = pg.log_mark();
            let mut c = pg.connect_tcp(APP, DB, None).expect("client");
            let mut pid = || -> i32 {
                let rows = c.query("SELECT pg_backend_pid()", &[]).unwrap_or_else(|e| panic!("{e:?}\n{}", pg.log_tail(30)));
                rows[0].get(0)
            };
            let first = pid();
            for round in 0..5 {
                // Parked meanwhile: the timer armed by the statement would
                // expire now.
                std::thread::sleep(Duration::from_millis(300));
                assert_eq!(pid(), first, "round {round}: another backend\n{}", pg.log_since(mark));
            }
            let log = pg.log_since(mark);
            assert!(!log.contains("epoll_ctl") && !log.contains("terminated by signal"), "{log}");
        },
    );
}

/// A backend keeping its idle client (`hold_idle_clients`, nobody waits)
/// treats it as idle, as a direct backend in ReadCommand: the
/// connection-check timer armed by the client's last statement does not
/// run on (it woke the lingering backend at every interval to look at a
/// socket the linger watches anyway). Counted as the backend's voluntary
/// context switches over one second with a 20 ms interval: about 50 while
/// the timer runs, none or a few without it.
#[test]
fn connection_check_timer_does_not_wake_a_lingering_backend() {
    run(
        Cluster::builder()
            .conf("nextgres.pool_size = 1")
            .conf("nextgres.hold_idle_clients = on")
            .conf("client_connection_check_interval = '20ms'"),
        |pg| {
            let mut c = pg.connect_tcp(APP, DB, None).expect("client");
            let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);
            let switches = || -> u64 {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .expect("voluntary_ctxt_switches")
                    .trim()
                    .parse()
                    .expect("a count")
            };
            std::thread::sleep(Duration::from_millis(200));
            let before = switches();
            std::thread::sleep(Duration::from_secs(1));
            let woke = switches() - before;
            assert!(woke < 10, "the lingering backend woke {woke} times in 1 s\n{}", pg.log_tail(20));
            // Its client is still served there, and the check runs again
            // during a statement: a client gone mid-query is still noticed
            // (connection_check_sees_a_pooled_client_vanish_mid_query).
            let again: i32 = c.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);
            assert_eq!(again, pid, "{}", pg.log_tail(20));
        },
    );
}
