//! Transaction pooling as clients see it: a transaction keeps its backend,
//! many clients share a small pool that never grows past its size, and
//! clients never see each other's data or startup settings.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test pooled -- --test-threads=2
//! ```

mod pool_support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nextgres_test::tls::{transport_ready, Transport};
use nextgres_test::{parse_summary, wait_until, with_timeout, Cluster};
use pool_support::{exec, first_value, sched_policy};

fn pid_of(c: &mut postgres::Client) -> i32 {
    first_value(
        &c.simple_query("SELECT pg_backend_pid()")
            .expect("pg_backend_pid"),
    )
    .expect("a pid row")
    .parse()
    .expect("a pid")
}

/// Inside BEGIN..COMMIT every statement (simple and extended protocol) runs
/// on one backend while other clients keep the pool busy; across the whole
/// run no more distinct backends appear than the pool's size.
#[test]
fn transaction_keeps_its_backend() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(
        &pg,
        "CREATE ROLE app LOGIN; CREATE TABLE t (client int, n int); GRANT ALL ON t TO app",
    );

    let all_pids = Mutex::new(BTreeSet::new());
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for client in 0..6i32 {
            let (pg, all_pids) = (&pg, &all_pids);
            handles.push(s.spawn(move || {
                let mut c = pg.tcp("app", "postgres").connect().expect("pooled login");
                for n in 0..30i32 {
                    let mut tx = c.transaction().expect("BEGIN");
                    let pid = |tx: &mut postgres::Transaction<'_>| -> i32 {
                        tx.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0)
                    };
                    let first = pid(&mut tx);
                    tx.execute("INSERT INTO t VALUES ($1, $2)", &[&client, &n]).expect("insert");
                    // A temp table lives exactly as long as the transaction's
                    // backend does: it must still be there at the end.
                    tx.batch_execute(
                        "CREATE TEMP TABLE tmp ON COMMIT DROP AS SELECT 1 AS x; SELECT pg_sleep(0.001)",
                    )
                    .expect("temp table");
                    let simple = first_value(
                        &tx.simple_query("SELECT pg_backend_pid()").expect("simple pid"),
                    )
                    .expect("pid row");
                    let seen: i64 = tx.query_one("SELECT count(*) FROM tmp", &[]).expect("tmp").get(0);
                    assert_eq!(seen, 1);
                    let last = pid(&mut tx);
                    assert_eq!(
                        (first, simple.parse::<i32>().expect("pid"), last),
                        (first, first, first),
                        "client {client} transaction {n} moved between backends"
                    );
                    tx.commit().expect("COMMIT");
                    all_pids.lock().unwrap().insert(first);
                }
            }));
        }
        for h in handles {
            h.join().expect("client thread");
        }
    });
    let pids = all_pids.into_inner().unwrap();
    assert!(
        !pids.is_empty() && pids.len() <= 2,
        "backends used by a pool of 2: {pids:?}"
    );
    let rows: i64 = pg
        .admin()
        .query_one("SELECT count(*) FROM t", &[])
        .expect("count")
        .get(0);
    assert_eq!(rows, 6 * 30);
}

/// Acceptance: 200 concurrent clients through a pool of 4 all succeed, and
/// pg_stat_activity, sampled all along, never shows more than 4 backends of
/// that role and database. First rust-postgres threads, then pgbench -c 200.
#[test]
fn two_hundred_clients_pool_of_four() {
    let pg = Cluster::builder()
        .conf("nextgres.pool_size = 4")
        .conf("max_connections = 40")
        .start();
    exec(
        &pg,
        "CREATE EXTENSION nextgres;
         CREATE ROLE app LOGIN;
         CREATE TABLE hits (client int, n int);
         GRANT ALL ON hits TO app;
         GRANT CREATE ON SCHEMA public TO app",
    );
    let stop = AtomicBool::new(false);
    let samples = AtomicUsize::new(0);
    let max_seen = AtomicUsize::new(0);
    const CLIENTS: usize = 200;
    let connected = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());

    std::thread::scope(|s| {
        // The sampler: a direct superuser session polling pg_stat_activity.
        let sampler = s.spawn(|| {
            let mut admin = pg.admin();
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                          WHERE backend_type = 'client backend'
                            AND usename = 'app' AND datname = 'postgres'",
                        &[],
                    )
                    .expect("sampling pg_stat_activity")
                    .get(0);
                max_seen.fetch_max(n as usize, Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });

        let mut clients = Vec::new();
        for client in 0..CLIENTS as i32 {
            let (pg, connected, failures) = (&pg, &connected, &failures);
            clients.push(s.spawn(move || {
                let mut c = match pg.tcp("app", "postgres").connect() {
                    Ok(c) => c,
                    Err(e) => {
                        connected.fetch_add(1, Ordering::SeqCst);
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("client {client} login: {e:?}"));
                        return;
                    }
                };
                connected.fetch_add(1, Ordering::SeqCst);
                // All 200 connected at once before anyone works (bounded).
                wait_until(Duration::from_secs(60), || {
                    connected.load(Ordering::SeqCst) >= CLIENTS
                });
                let mut run = || -> Result<(), postgres::Error> {
                    for n in 0..5i32 {
                        c.simple_query("SELECT 1")?;
                        let mut tx = c.transaction()?;
                        tx.execute("INSERT INTO hits VALUES ($1, $2)", &[&client, &n])?;
                        tx.commit()?;
                        let row = c.query_typed_one(
                            "SELECT count(*) FROM hits WHERE client = $1",
                            &[(&client, postgres::types::Type::INT4)],
                        )?;
                        assert_eq!(row.get::<_, i64>(0), i64::from(n) + 1);
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("client {client}: {e:?}"));
                }
            }));
        }
        for h in clients {
            h.join().expect("client thread");
        }
        let failures = failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "{} clients failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
        let rows: i64 = pg
            .admin()
            .query_one("SELECT count(*) FROM hits", &[])
            .expect("count")
            .get(0);
        assert_eq!(rows, (CLIENTS * 5) as i64);

        // pgbench: 200 clients, select-only, simple protocol, through the pooler.
        let bench = pg.tcp("app", "postgres");
        pg.pgbench_init(&bench, 1).assert_success();
        let out = pg.pgbench(&bench, &["-n", "-S", "-c", "200", "-j", "2", "-t", "10"]);
        out.assert_success();
        let sum =
            parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
        assert_eq!((sum.processed, sum.expected), (2000, Some(2000)), "{out}");
        assert_eq!(sum.failed.unwrap_or(0), 0, "{out}");

        stop.store(true, Ordering::Relaxed);
        sampler.join().expect("sampler");
    });
    let (max_seen, samples) = (max_seen.into_inner(), samples.into_inner());
    assert!(samples > 10, "the sampler barely ran ({samples} samples)");
    assert!(max_seen >= 1, "the sampler never saw a pooled backend");
    assert!(
        max_seen <= 4,
        "saw {max_seen} backends of app@postgres with pool_size 4"
    );
    // Clients really queued for the 4 backends (the pool was the limit).
    let (waits, backends): (i64, i32) = {
        let r = pg
            .admin()
            .query_one(
                "SELECT waits, backends_parked + backends_attached + backends_starting
                   FROM nextgres.pools WHERE database = 'postgres' AND role = 'app'",
                &[],
            )
            .expect("nextgres.pools");
        (r.get(0), r.get(1))
    };
    assert!(waits > 0, "no client ever waited for a backend");
    assert!(backends <= 4, "pool has {backends} backends");
}

/// Settings a client gives at startup, checked in every transaction.
#[derive(Clone, Debug)]
struct Expect {
    application_name: String,
    search_path: String,
    timezone: String,
    datestyle: String,
    marker: String,
}

/// 50 clients × 200 transactions through a pool of 4: each writes and reads
/// back its own rows (a shared table keyed by client, and a table resolved
/// through its own search_path) and checks its own startup settings every
/// time. Even clients set application_name, TimeZone and DateStyle; odd ones
/// do not and must see the server defaults, never a neighbour's values.
#[test]
fn fifty_clients_never_mix() {
    const CLIENTS: i32 = 50;
    const XACTS: i32 = 200;
    let pg = Cluster::builder().conf("nextgres.pool_size = 4").start();
    let mut setup = String::from(
        "CREATE ROLE app LOGIN;
         CREATE TABLE marks (client int PRIMARY KEY, n int NOT NULL);
         GRANT ALL ON marks TO app;",
    );
    for i in 0..CLIENTS {
        setup.push_str(&format!(
            "CREATE SCHEMA s{i} AUTHORIZATION app; CREATE TABLE s{i}.own (n int); ALTER TABLE s{i}.own OWNER TO app;
             INSERT INTO marks VALUES ({i}, 0);"
        ));
    }
    exec(&pg, &setup);
    let defaults: (String, String) = {
        let row = pg
            .tcp("app", "postgres")
            .connect()
            .expect("probe")
            .query_typed_one(
                "SELECT current_setting('TimeZone'), current_setting('DateStyle')",
                &[],
            )
            .expect("defaults");
        (row.get(0), row.get(1))
    };

    let pg = &pg;
    let problems = Mutex::new(Vec::<String>::new());
    with_timeout(Duration::from_secs(600), "50 isolated clients", {
        let pg_port = pg.port();
        let defaults = defaults.clone();
        move || {
            std::thread::scope(|s| {
                for i in 0..CLIENTS {
                    let defaults = defaults.clone();
                    let problems = &problems;
                    s.spawn(move || {
                        let zones = ["Etc/GMT+3", "Asia/Tokyo", "America/Lima", "Europe/Paris"];
                        let styles = ["German, DMY", "SQL, DMY", "Postgres, YMD", "ISO, DMY"];
                        let mut ci =
                            nextgres_test::ConnInfo::new("127.0.0.1", pg_port, "app", "postgres");
                        let mut opts = format!("-c search_path=s{i},public -c iso.client=c{i}");
                        let exp = if i % 2 == 0 {
                            let (tz, ds) =
                                (zones[(i / 2) as usize % 4], styles[(i / 2) as usize % 4]);
                            ci = ci.application_name(format!("iso-{i}"));
                            opts.push_str(&format!(
                                " -c TimeZone={tz} -c DateStyle={}",
                                ds.replace(", ", ",")
                            ));
                            Expect {
                                application_name: format!("iso-{i}"),
                                search_path: format!("s{i},public"),
                                timezone: tz.into(),
                                datestyle: ds.into(),
                                marker: format!("c{i}"),
                            }
                        } else {
                            Expect {
                                application_name: String::new(),
                                search_path: format!("s{i},public"),
                                timezone: defaults.0.clone(),
                                datestyle: defaults.1.clone(),
                                marker: format!("c{i}"),
                            }
                        };
                        if let Err(e) = isolated_client(&ci, &opts, i, &exp) {
                            problems.lock().unwrap().push(format!("client {i}: {e}"));
                        }
                    });
                }
            });
            let p = problems.into_inner().unwrap();
            assert!(
                p.is_empty(),
                "{} clients saw trouble:\n{}",
                p.len(),
                p.join("\n")
            );
        }
    });

    // Every client's rows landed where its own settings sent them.
    let mut admin = pg.admin();
    for i in 0..CLIENTS {
        let n: i32 = admin
            .query_one("SELECT n FROM marks WHERE client = $1", &[&i])
            .expect("marks")
            .get(0);
        let own: i64 = admin
            .query_one(&format!("SELECT count(*) FROM s{i}.own"), &[])
            .expect("own")
            .get(0);
        assert_eq!((n, own), (XACTS, i64::from(XACTS)), "client {i}'s rows");
    }
}

/// One client of fifty_clients_never_mix; returns the first surprise.
fn isolated_client(
    ci: &nextgres_test::ConnInfo,
    opts: &str,
    i: i32,
    exp: &Expect,
) -> Result<(), String> {
    let notices = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = notices.clone();
    let mut cfg = ci.config();
    cfg.options(opts);
    cfg.notice_callback(move |n| {
        sink.lock()
            .unwrap()
            .push(format!("{}: {}", n.severity(), n.message()))
    });
    let mut c = cfg
        .connect(postgres::NoTls)
        .map_err(|e| format!("login: {e:?}"))?;
    const SETTINGS: &str = "current_setting('application_name'), current_setting('search_path'), \
         current_setting('TimeZone'), current_setting('DateStyle'), current_setting('iso.client')";
    let check = |got: [String; 5], t: i32, how: &str| -> Result<(), String> {
        let want = [
            exp.application_name.clone(),
            exp.search_path.clone(),
            exp.timezone.clone(),
            exp.datestyle.clone(),
            exp.marker.clone(),
        ];
        if got != want {
            return Err(format!(
                "transaction {t} ({how}): settings {got:?}, expected {want:?}"
            ));
        }
        Ok(())
    };
    for t in 0..200i32 {
        let want_n = t + 1;
        match t % 3 {
            // Simple protocol: a multi-statement transaction, then a check.
            0 => {
                c.batch_execute(&format!(
                    "BEGIN; UPDATE marks SET n = n + 1 WHERE client = {i}; INSERT INTO own VALUES ({t}); COMMIT"
                ))
                .map_err(|e| format!("transaction {t}: {e:?}"))?;
                let msgs = c
                    .simple_query(&format!(
                        "SELECT {SETTINGS}, (SELECT n FROM marks WHERE client = {i})::text, (SELECT count(*) FROM own)::text"
                    ))
                    .map_err(|e| format!("check {t}: {e:?}"))?;
                let row = msgs
                    .iter()
                    .find_map(|m| match m {
                        postgres::SimpleQueryMessage::Row(r) => Some(r),
                        _ => None,
                    })
                    .ok_or("no row")?;
                let v = |k: usize| row.get(k).unwrap_or_default().to_string();
                check([v(0), v(1), v(2), v(3), v(4)], t, "simple")?;
                if (v(5), v(6)) != (want_n.to_string(), want_n.to_string()) {
                    return Err(format!(
                        "transaction {t} (simple): marks={} own={} expected {want_n}",
                        v(5),
                        v(6)
                    ));
                }
            }
            // Extended protocol inside an explicit transaction.
            1 => {
                let mut tx = c.transaction().map_err(|e| format!("BEGIN {t}: {e:?}"))?;
                let n: i32 = tx
                    .query_one(
                        "UPDATE marks SET n = n + 1 WHERE client = $1 RETURNING n",
                        &[&i],
                    )
                    .map_err(|e| format!("update {t}: {e:?}"))?
                    .get(0);
                tx.execute("INSERT INTO own VALUES ($1)", &[&t])
                    .map_err(|e| format!("insert {t}: {e:?}"))?;
                let r = tx
                    .query_one(
                        &format!("SELECT {SETTINGS}, (SELECT count(*) FROM own)"),
                        &[],
                    )
                    .map_err(|e| format!("check {t}: {e:?}"))?;
                check(
                    [r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)],
                    t,
                    "extended in transaction",
                )?;
                let own: i64 = r.get(5);
                if (n, own) != (want_n, i64::from(want_n)) {
                    return Err(format!(
                        "transaction {t} (extended): marks={n} own={own} expected {want_n}"
                    ));
                }
                tx.commit().map_err(|e| format!("COMMIT {t}: {e:?}"))?;
            }
            // One unnamed extended-protocol statement outside a transaction.
            _ => {
                let r = c
                    .query_typed_one(
                        &format!(
                            "WITH u AS (UPDATE marks SET n = n + 1 WHERE client = $1 RETURNING n),
                                  i AS (INSERT INTO own VALUES ($2) RETURNING n)
                             SELECT {SETTINGS}, (SELECT n FROM u), (SELECT count(*) FROM own) + (SELECT count(*) FROM i)"
                        ),
                        &[(&i, postgres::types::Type::INT4), (&t, postgres::types::Type::INT4)],
                    )
                    .map_err(|e| format!("statement {t}: {e:?}"))?;
                check(
                    [r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)],
                    t,
                    "unnamed extended",
                )?;
                let (n, own): (i32, i64) = (r.get(5), r.get(6));
                if (n, own) != (want_n, i64::from(want_n)) {
                    return Err(format!(
                        "transaction {t} (unnamed): marks={n} own={own} expected {want_n}"
                    ));
                }
            }
        }
    }
    let seen = notices.lock().unwrap().clone();
    if !seen.is_empty() {
        return Err(format!("unexpected notices: {seen:?}"));
    }
    Ok(())
}

/// What client b sees of other sessions' state, as one string.
const LOOK_AROUND: &str = "SELECT concat_ws('|',
        current_setting('work_mem'), current_setting('search_path'),
        (to_regclass('a_tmp') IS NOT NULL)::int,
        (SELECT count(*) FROM pg_prepared_statements),
        (SELECT count(*) FROM pg_cursors),
        (SELECT count(*) FROM pg_listening_channels()),
        coalesce(current_setting('a.var', true), ''))";
const FRESH: &str = "4MB|\"$user\", public|0|0|0|0|";

/// Session state one client leaves behind outside a transaction (SET,
/// set_config, a prepared statement) never shows in another client's
/// session, even on the same backend; nor does state that cannot move (temp
/// table, WITH HOLD cursor, LISTEN), wherever it lives. A failed
/// transaction keeps its backend until ROLLBACK.
#[test]
fn session_state_never_reaches_another_client() {
    session_state_never_reaches_another_client_over(Transport::Plain);
}

/// The same with both clients on TLS (`sslmode=require`, `ssl = on`);
/// skipped with the reason printed on 16 (no OpenSSL).
#[test]
fn session_state_never_reaches_another_client_over_tls() {
    session_state_never_reaches_another_client_over(Transport::tls());
}

fn session_state_never_reaches_another_client_over(transport: Transport) {
    const SETTLE: Duration = Duration::from_secs(30);
    // A short wait limit bounds the waiting client if an assertion fails
    // while the other one holds the only backend.
    let pg = Cluster::builder()
        .conf("nextgres.pool_size = 1")
        .conf("nextgres.query_wait_timeout = 20")
        .start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN");
    let Some(t) = transport_ready(&pg, transport.clone(), "app", "postgres", SETTLE) else { return };
    let ci = pg.tcp("app", "postgres");
    let mut a = t.connect(ci.config()).expect("client a");
    let mut b = t.connect(ci.config()).expect("client b");
    let on_tls = || {
        pg.admin()
            .query_one("SELECT count(*) FILTER (WHERE tls IS NOT NULL) = count(*) FROM nextgres.clients", &[])
            .expect("nextgres.clients")
            .get::<_, bool>(0)
    };
    if t.is_tls() {
        assert!(on_tls(), "pooled clients not on TLS");
    }
    let pa = pid_of(&mut a);
    a.batch_execute(
        "SET work_mem = '77MB';
         SET search_path = pg_catalog;
         PREPARE a_stmt AS SELECT 1;
         SELECT set_config('a.var', 'secret', false);",
    )
    .expect("client a leaves session state");
    let pb = pid_of(&mut b);
    assert_eq!(pa, pb, "a pool of one: same backend");
    let seen = first_value(&b.simple_query(LOOK_AROUND).expect("client b looks around"));
    assert_eq!(
        seen.as_deref(),
        Some(FRESH),
        "client b sees client a's session state"
    );

    // A failed transaction holds its backend until the client ends it: the
    // other client waits, then gets the backend back.
    a.simple_query("BEGIN").expect("begin");
    let in_tx = pid_of(&mut a);
    assert!(
        a.simple_query("SELECT 1/0").is_err(),
        "division by zero must fail"
    );
    assert!(
        a.simple_query("SELECT 1").is_err(),
        "aborted transaction accepted a query"
    );
    let waiter = std::thread::scope(|s| {
        let h = s.spawn(|| pid_of(&mut b));
        let waiting = wait_until(Duration::from_secs(10), || {
            pg.admin()
                .query_one(
                    "SELECT count(*) FROM nextgres.clients WHERE state = 'waiting'",
                    &[],
                )
                .map(|r| r.get::<_, i64>(0) == 1)
                .unwrap_or(false)
        });
        let clients: Vec<String> = pg
            .admin()
            .query(
                "SELECT concat_ws(' ', client_port, state, backend_pid) FROM nextgres.clients",
                &[],
            )
            .expect("nextgres.clients")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(waiting, "client b is not listed as waiting: {clients:?}");
        assert!(
            !h.is_finished(),
            "client b ran while a's failed transaction held the only backend"
        );
        a.simple_query("ROLLBACK").expect("rollback");
        h.join().expect("client b")
    });
    assert_eq!(waiter, in_tx);
    drop((a, b));
    drop(pg);

    // State that cannot follow a client to another backend: whether the
    // pooler keeps such a client on its backend or discards the state, the
    // other client never sees it. Two backends, so nobody has to wait.
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(&pg, "CREATE ROLE app LOGIN");
    let t = transport_ready(&pg, transport, "app", "postgres", SETTLE).expect("TLS, as on the first cluster");
    let ci = pg.tcp("app", "postgres");
    let mut a = t.connect(ci.config()).expect("client a");
    let mut b = t.connect(ci.config()).expect("client b");
    a.batch_execute(
        "CREATE TEMP TABLE a_tmp (x int);
         DECLARE a_cur CURSOR WITH HOLD FOR SELECT 1;
         LISTEN a_chan;",
    )
    .expect("client a leaves session state");
    for round in 0..6 {
        let seen = first_value(&b.simple_query(LOOK_AROUND).expect("client b looks around"));
        assert_eq!(
            seen.as_deref(),
            Some(FRESH),
            "round {round}: client b sees client a's state"
        );
        a.simple_query("SELECT 1").expect("client a goes on");
    }
}

/// `nextgres.backend_batch_scheduling` (default on): a pooled backend runs
/// under SCHED_BATCH, a direct one under the policy the server started with;
/// after `off` and a reload, the pool's backend is back under SCHED_OTHER
/// once it parked again.
#[test]
fn pooled_backends_run_under_batch_scheduling() {
    let pg = Cluster::builder()
        .conf("nextgres.pool_size = 1")
        .conf("nextgres.hold_idle_clients = off")
        .start();
    exec(&pg, "CREATE ROLE app LOGIN");
    let mut direct = pg.connect_unix("app", "postgres", None).expect("direct");
    let direct_pid = pid_of(&mut direct);
    let server_policy = sched_policy(direct_pid);
    if server_policy != 0 {
        eprintln!("skipped: the server runs under policy {server_policy}, which nextgres leaves alone");
        return;
    }
    // Where a seccomp profile refuses the call, backends stay as they are
    // (by design): probe it on this thread first.
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is this test thread; `param` outlives the calls.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        eprintln!("skipped: sched_setscheduler is refused here: {}", std::io::Error::last_os_error());
        return;
    }
    unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    let mut pooled = pg.connect_tcp("app", "postgres", None).expect("pooled");
    let pid = pid_of(&mut pooled);
    assert_ne!(pid, direct_pid);
    assert_eq!(sched_policy(pid), 3, "the pooled backend {pid} is not under SCHED_BATCH");
    assert_eq!(sched_policy(direct_pid), 0, "the direct backend changed policy");
    exec(&pg, "ALTER SYSTEM SET nextgres.backend_batch_scheduling = off; SELECT pg_reload_conf()");
    // The backend reads the reload before its next statement and applies
    // it when it parks after it.
    let back = wait_until(Duration::from_secs(10), || {
        let p = pid_of(&mut pooled);
        assert_eq!(p, pid, "a pool of 1 changed its backend");
        sched_policy(pid) == 0
    });
    assert!(back, "the pooled backend {pid} stayed under SCHED_BATCH after off and a reload");
    exec(&pg, "ALTER SYSTEM RESET nextgres.backend_batch_scheduling; SELECT pg_reload_conf()");
    let again = wait_until(Duration::from_secs(10), || {
        pid_of(&mut pooled);
        sched_policy(pid) == 3
    });
    assert!(again, "the pooled backend {pid} did not go back to SCHED_BATCH after the reset");
}
