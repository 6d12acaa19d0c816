//! Saturated pools and *attach ahead* (issue 15): once as many clients wait
//! as the pool has busy backends, the pooler sends the oldest waiting
//! client's ATTACH (and socket) to a backend still inside another client's
//! transaction, and that backend takes the client at its ReadyForQuery(I);
//! `nextgres.pools.attaches_ahead` counts those takes. A client sent ahead
//! can still be taken back by the pooler, and is never read by two processes.
//!
//! These are the guard tests the issue asks for, each on a pool of 2-3
//! backends that 16-30 clients running short transactions keep saturated,
//! each asserting that `attaches_ahead` grew (the path ran) and exact
//! outcomes:
//! - clients that vanish (FIN or RST) while queued, some inside a
//!   transaction they opened, among clients doing exact-count work;
//! - pooled backends terminated (`pg_terminate_backend`) while they hold
//!   clients queued ahead;
//! - one long transaction among many short ones: no short client stays
//!   stuck behind it.
//!
//! Same rules as `faults.rs` (helpers in `fault_support`): real servers and
//! real clients (tokio-postgres, a raw protocol client), every wait bounded
//! by `SETTLE`, every body by `TEST_LIMIT`; no assertion on speed.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test saturation -- --test-threads=2
//! ```

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nextgres_test::{wait_until, Cluster};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

mod fault_support;
use fault_support::*;

// ---- helpers ------------------------------------------------------------------

/// This suite guards the handoff path's attach ahead: its servers run
/// without the kernel queue (`nextgres.kernel_queue`, on by default,
/// whose saturated path `kernel_queue.rs` guards), whatever
/// `NEXTGRES_TEST_EXTRA_CONF` says.
fn handoff_builder() -> nextgres_test::cluster::Builder {
    Cluster::builder().conf("nextgres.kernel_queue = off")
}

/// `nextgres.pools.attaches_ahead` of APP's pool (0 while it has no pool).
fn attaches_ahead(pg: &Cluster) -> i64 {
    admin_i64(
        pg,
        "SELECT coalesce(sum(attaches_ahead), 0)::int8 FROM nextgres.pools WHERE role = 'app'",
    )
}

/// The path under test ran: a backend of APP's pool took its next client
/// ahead since `before` was read.
#[track_caller]
fn assert_attached_ahead(pg: &Cluster, before: i64, what: &str) {
    let now = attaches_ahead(pg);
    assert!(
        now > before,
        "{what}: nextgres.pools.attaches_ahead went {before} -> {now}: no backend took a client \
         sent ahead, so the saturated path under test never ran"
    );
}

/// Creates the work tables: `work` (one row per committed transaction of a
/// client: client, k) and `vanished` (rows only vanished clients insert,
/// never committed).
fn create_tables(pg: &Cluster) {
    pg.admin()
        .batch_execute(
            "CREATE TABLE work (client int NOT NULL, k int NOT NULL);
             CREATE TABLE vanished (round int NOT NULL, i int NOT NULL);
             CREATE TABLE long_xact (n int NOT NULL);
             GRANT SELECT, INSERT ON work, vanished, long_xact TO app;",
        )
        .expect("work tables");
}

/// Per client: (rows in `work`, distinct k among them).
fn work_rows(pg: &Cluster) -> std::collections::HashMap<i32, (i64, i64)> {
    pg.admin()
        .query(
            "SELECT client, count(*), count(DISTINCT k) FROM work GROUP BY client",
            &[],
        )
        .expect("reading work")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

/// Sum of `clients_waiting` over all pools.
fn waiting(pg: &Cluster) -> i64 {
    admin_i64(
        pg,
        "SELECT coalesce(sum(clients_waiting), 0)::int8 FROM nextgres.pools",
    )
}

/// After a run: within `SETTLE`, no client of the pool is left (every one
/// of them disconnected or vanished), none waits, and no session of APP is
/// idle in a transaction; then a brand-new client is served by the same
/// pooler.
#[track_caller]
fn assert_recovered(pg: &Cluster, pooler: i32) {
    let settled = wait_until(SETTLE, || {
        clients(pg).is_empty() && waiting(pg) == 0 && idle_in_transaction(pg).is_empty()
    });
    assert!(
        settled,
        "left behind: clients {:?}, clients_waiting {}, idle in transaction {:?}\n{:?}",
        clients(pg),
        waiting(pg),
        idle_in_transaction(pg),
        pg.activity()
    );
    assert_pooler_serves(pg, pooler);
}

/// How a worker's connection may end when its backend is terminated: the
/// backend's FATAL 57P01, or the connection closed / reset.
fn ended_by_termination(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::ADMIN_SHUTDOWN)
        || e.is_closed()
        || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// How a worker ended.
#[derive(Debug)]
struct WorkerEnd {
    id: i32,
    /// Transactions whose COMMIT the client saw succeed.
    committed: i32,
    /// Why it stopped early: (error text, ended by a backend termination).
    failed: Option<(String, bool)>,
}

/// One transaction of a worker, inserting (id, k) into `work`, in one of
/// three shapes: simple-protocol `BEGIN; INSERT; COMMIT` in one round trip,
/// an extended-protocol transaction in three (the backend stays busy
/// between them, so clients queue ahead on it), or an autocommit INSERT.
async fn one_xact(client: &mut tokio_postgres::Client, id: i32, k: i32) -> Result<(), tokio_postgres::Error> {
    match k % 3 {
        0 => {
            client
                .batch_execute(&format!("BEGIN; INSERT INTO work VALUES ({id}, {k}); COMMIT"))
                .await
        }
        1 => {
            let tx = client.transaction().await?;
            tx.query_typed(
                "INSERT INTO work VALUES ($1, $2)",
                &[(&id, Type::INT4), (&k, Type::INT4)],
            )
            .await?;
            tx.commit().await
        }
        _ => client
            .query_typed(
                "INSERT INTO work VALUES ($1, $2)",
                &[(&id, Type::INT4), (&k, Type::INT4)],
            )
            .await
            .map(drop),
    }
}

/// A worker: logs in, then runs `xacts` transactions (k = 0..xacts), each
/// under `SETTLE` (a transaction without an answer that long is a hang).
/// Stops at the first error, or before a transaction once `stop` is set.
/// `progress` counts committed transactions of all workers.
async fn worker(port: u16, id: i32, xacts: i32, progress: Arc<AtomicUsize>, stop: Arc<AtomicBool>) -> WorkerEnd {
    let mut end = WorkerEnd {
        id,
        committed: 0,
        failed: None,
    };
    let mut client = match login(port).await {
        Ok(c) => c,
        Err(e) => {
            end.failed = Some((e, false));
            return end;
        }
    };
    for k in 0..xacts {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match tokio::time::timeout(SETTLE, one_xact(&mut client, id, k)).await {
            Ok(Ok(())) => {
                end.committed += 1;
                progress.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Err(e)) => {
                let by_termination = ended_by_termination(&e);
                end.failed = Some((format!("transaction {k}: {e:?}"), by_termination));
                return end;
            }
            Err(_) => {
                end.failed = Some((format!("transaction {k}: no answer within {SETTLE:?} (hang)"), false));
                return end;
            }
        }
    }
    end
}

/// Closes the raw client's socket with an RST (SO_LINGER 0), as a client
/// whose host dropped the connection.
fn reset(raw: Raw) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on the raw client's own open socket, with a
    // linger struct of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            raw.s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER 0");
    drop(raw);
}

/// One vanishing client (raw protocol), of five kinds by `(round + i) % 5`:
/// 0, 1: sends `BEGIN; INSERT INTO vanished ...; SELECT pg_sleep(0.02)`
///       (no COMMIT) and goes, with FIN (0) or RST (1), while that query
///       waits in the queue, is queued ahead, or runs;
/// 2, 3: opens a transaction and inserts (waiting its turn), then sends a
///       `pg_sleep(0.05)` and goes (FIN / RST) while its backend, which the
///       pooler may have sent the next client ahead, is still in it;
/// 4:    sends `SELECT pg_sleep(0.01)` and goes (FIN).
fn vanish_one(port: u16, round: usize, i: usize) -> Result<(), String> {
    let kind = (round + i) % 5;
    let mut raw = Raw::connect(port, APP, DB, SETTLE);
    match kind {
        0 | 1 => {
            raw.send_query(&format!(
                "BEGIN; INSERT INTO vanished VALUES ({round}, {i}); SELECT pg_sleep(0.02)"
            ));
            // Pacing only, not a synchronisation: a client reaches the head
            // of the queue (and is sent ahead) only after the ~30 clients
            // before it, so the vanishing moments are spread over 0-39 ms.
            std::thread::sleep(Duration::from_millis(((round * 7 + i * 13) % 40) as u64));
        }
        2 | 3 => {
            raw.query("BEGIN").map_err(|e| format!("vanisher BEGIN: {e:?}"))?;
            raw.query(&format!("INSERT INTO vanished VALUES ({round}, {i})"))
                .map_err(|e| format!("vanisher INSERT: {e:?}"))?;
            raw.send_query("SELECT pg_sleep(0.05)");
        }
        _ => raw.send_query("SELECT pg_sleep(0.01)"),
    }
    if kind % 2 == 1 {
        reset(raw);
    } else {
        raw.vanish();
    }
    Ok(())
}

// ---- 1. clients vanishing while queued ahead -------------------------------------

/// Workers in the first two tests, and their transactions each.
const WORKERS: i32 = 30;
const XACTS: i32 = 60;
/// Vanishing clients per round (test 1).
const VANISHING: usize = 6;

/// pool_size 3, client_time_slice 0: 30 workers run 60 exact-count
/// transactions each while rounds of 6 raw clients vanish (FIN or RST) with
/// a query waiting, queued ahead or running, some inside a transaction
/// they opened. Every worker's 60 rows are there exactly once, no vanished
/// client's insert is visible, attaches_ahead grew, and afterwards no
/// client is left, none waits, no session is idle in a transaction, and a
/// fresh client is served by the same pooler.
#[test]
fn clients_vanishing_while_queued_ahead() {
    let builder = handoff_builder()
        .conf("nextgres.pool_size = 3")
        .conf("nextgres.client_time_slice = 0")
        .max_connections(20);
    run(builder, |pg| {
        create_tables(pg);
        let pooler = running_pooler_pid(pg);
        let ahead0 = attaches_ahead(pg);
        let port = pg.port();
        let rt = runtime();
        let progress = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..WORKERS)
            .map(|id| rt.spawn(worker(port, id, XACTS, progress.clone(), Arc::default())))
            .collect();
        let done = Arc::new(AtomicBool::new(false));
        let vanishers = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut round = 0usize;
                let mut errors = Vec::new();
                while !done.load(Ordering::SeqCst) && round < 1_000 {
                    let batch: Vec<_> = (0..VANISHING)
                        .map(|i| std::thread::spawn(move || vanish_one(port, round, i)))
                        .collect();
                    for b in batch {
                        match b.join() {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => errors.push(e),
                            Err(_) => errors.push("a vanishing client panicked".to_string()),
                        }
                    }
                    round += 1;
                }
                (round, errors)
            })
        };
        let ends: Vec<WorkerEnd> = rt.block_on(async {
            let mut ends = Vec::new();
            for t in tasks {
                ends.push(t.await.expect("worker task"));
            }
            ends
        });
        done.store(true, Ordering::SeqCst);
        let (rounds, vanish_errors) = vanishers.join().expect("vanishing clients");
        rt.shutdown_timeout(Duration::from_secs(5));
        eprintln!(
            "{WORKERS} workers x {XACTS} transactions beside {rounds} rounds of {VANISHING} vanishing clients; \
             attaches_ahead {ahead0} -> {}",
            attaches_ahead(pg)
        );

        let failed: Vec<_> = ends.iter().filter(|e| e.failed.is_some()).collect();
        assert!(failed.is_empty(), "workers failed: {failed:#?}");
        assert!(vanish_errors.is_empty(), "vanishing clients: {vanish_errors:?}");
        assert!(rounds > 0, "no vanishing client ran");
        let rows = work_rows(pg);
        let wrong: Vec<_> = (0..WORKERS)
            .filter(|id| rows.get(id) != Some(&(XACTS as i64, XACTS as i64)))
            .map(|id| (id, rows.get(&id)))
            .collect();
        assert!(
            wrong.is_empty() && rows.len() == WORKERS as usize,
            "workers whose (rows, distinct) is not ({XACTS}, {XACTS}): {wrong:?}"
        );
        assert_eq!(
            admin_i64(pg, "SELECT count(*) FROM vanished"),
            0,
            "a vanished client's uncommitted insert is visible"
        );
        assert_attached_ahead(pg, ahead0, "vanishing clients");
        assert_recovered(pg, pooler);
    });
}

// ---- 2. backends terminated while holding queued clients -----------------------------

/// Terminations in test 2.
const TERMINATIONS: usize = 6;

/// pool_size 3: 30 workers run 60 exact-count transactions each while a
/// direct session terminates an attached backend of the pool 6 times (each
/// time after clients were taken ahead again and the pool committed more
/// work). No worker hangs (every transaction is answered within SETTLE); a
/// worker fails only with 57P01 or its connection closed, and at most two
/// per termination (the client in the terminated backend's transaction and
/// one it had already taken ahead); a worker that did not fail has its 60
/// rows exactly once, one that failed has the transactions it saw commit
/// (plus at most the one in flight); attaches_ahead grew; the pool
/// recovers.
#[test]
fn backends_terminated_while_holding_queued_clients() {
    let builder = handoff_builder()
        .conf("nextgres.pool_size = 3")
        .max_connections(20);
    run(builder, |pg| {
        create_tables(pg);
        let pooler = running_pooler_pid(pg);
        let ahead0 = attaches_ahead(pg);
        let port = pg.port();
        let rt = runtime();
        let progress = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..WORKERS)
            .map(|id| rt.spawn(worker(port, id, XACTS, progress.clone(), Arc::default())))
            .collect();
        let all_done = || tasks.iter().all(|t| t.is_finished());

        // The terminations, from a direct Unix-socket session.
        let mut admin = pg.admin();
        let mut terminated = Vec::new();
        let mut last_ahead = ahead0;
        while terminated.len() < TERMINATIONS && !all_done() {
            // Clients were taken ahead again and the pool committed more
            // work since the last termination (it recovered).
            let committed = progress.load(Ordering::SeqCst);
            let ready = wait_until(SETTLE, || {
                all_done()
                    || (attaches_ahead(pg) > last_ahead
                        && progress.load(Ordering::SeqCst) >= committed + WORKERS as usize)
            });
            assert!(
                ready,
                "the pool made no progress after {} terminations: attaches_ahead {last_ahead} -> {}, \
                 committed {committed} -> {}; {:?}",
                terminated.len(),
                attaches_ahead(pg),
                progress.load(Ordering::SeqCst),
                pooled(pg)
            );
            if all_done() {
                break;
            }
            last_ahead = attaches_ahead(pg);
            let victim: Option<i32> = admin
                .query_opt(
                    "SELECT pid FROM nextgres.backends
                      WHERE role = 'app' AND state = 'attached' ORDER BY random() LIMIT 1",
                    &[],
                )
                .expect("an attached backend")
                .map(|r| r.get(0));
            let signalled = |admin: &mut postgres::Client, pid: i32| -> bool {
                admin
                    .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                    .expect("pg_terminate_backend")
                    .get(0)
            };
            if let Some(pid) = victim.filter(|&pid| signalled(&mut admin, pid)) {
                terminated.push(pid);
                assert!(
                    wait_until(SETTLE, || !session_exists(pg, pid)),
                    "terminated backend {pid} still runs"
                );
            }
        }

        // No client hangs: every worker ends (each transaction is bounded by
        // SETTLE, so the whole run by XACTS x SETTLE).
        let ends: Vec<WorkerEnd> = rt.block_on(async {
            let mut ends = Vec::new();
            for t in tasks {
                ends.push(t.await.expect("worker task"));
            }
            ends
        });
        rt.shutdown_timeout(Duration::from_secs(5));
        eprintln!(
            "{WORKERS} workers x {XACTS} transactions, backends terminated: {terminated:?}; \
             attaches_ahead {ahead0} -> {}; failed workers {}",
            attaches_ahead(pg),
            ends.iter().filter(|e| e.failed.is_some()).count()
        );
        assert!(
            terminated.len() >= 2,
            "only {} terminations happened before the workers finished (each one waits for \
             attaches_ahead to grow: {ahead0} -> {})",
            terminated.len(),
            attaches_ahead(pg)
        );

        let unexpected: Vec<_> = ends
            .iter()
            .filter(|e| e.failed.as_ref().is_some_and(|(_, by_termination)| !by_termination))
            .collect();
        assert!(
            unexpected.is_empty(),
            "workers failed otherwise than with 57P01 / connection closed: {unexpected:#?}"
        );
        let failed: Vec<_> = ends.iter().filter(|e| e.failed.is_some()).collect();
        assert!(
            failed.len() <= 2 * terminated.len(),
            "{} workers failed for {} terminations (at most 2 each): {failed:#?}",
            failed.len(),
            terminated.len()
        );
        let rows = work_rows(pg);
        let mut wrong = Vec::new();
        for e in &ends {
            let (n, distinct) = rows.get(&e.id).copied().unwrap_or((0, 0));
            let ok = if e.failed.is_none() {
                (n, distinct) == (XACTS as i64, XACTS as i64)
            } else {
                n == distinct && (e.committed as i64..=e.committed as i64 + 1).contains(&n)
            };
            if !ok {
                wrong.push(format!(
                    "worker {}: {n} rows ({distinct} distinct), saw {} commits, failed {:?}",
                    e.id, e.committed, e.failed
                ));
            }
        }
        assert!(wrong.is_empty(), "rows do not match what the workers saw:\n{}", wrong.join("\n"));
        assert_attached_ahead(pg, ahead0, "backend terminations");
        assert_recovered(pg, pooler);
        let backends = pooled(pg);
        assert!(backends.len() <= 3, "the pool of 3 has {backends:?}");
    });
}

// ---- 3. a long transaction among queued short ones ------------------------------------

/// Short-transaction clients in test 3.
const SHORT: usize = 16;
/// Transactions every short client must commit while the long one is open.
const SHORT_EACH: usize = 10;
/// pg_sleep(0.1) steps the long transaction takes at least, so that the
/// pooler has had many chances to send a client ahead to its backend.
const LONG_STEPS: usize = 5;

/// pool_size 2: 16 clients run short transactions in a loop; once each has
/// committed one, another client opens a transaction (an INSERT, then
/// pg_sleep steps, at least 5) and keeps it open until every short client
/// has committed 10 more transactions (waited for with the SETTLE bound),
/// so none stays stuck queued ahead on the long transaction's backend;
/// attaches_ahead grew while the long transaction was open; the long
/// transaction is still the same one and its row invisible to others until
/// it commits; every short client's rows are exactly the transactions it
/// saw commit.
#[test]
fn long_transaction_among_queued_short_ones() {
    let builder = handoff_builder()
        .conf("nextgres.pool_size = 2")
        .max_connections(20);
    run(builder, |pg| {
        create_tables(pg);
        let pooler = running_pooler_pid(pg);
        let port = pg.port();
        let rt = runtime();
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..SHORT).map(|_| AtomicUsize::new(0)).collect());
        let tasks: Vec<_> = (0..SHORT)
            .map(|i| {
                let (stop, counts) = (stop.clone(), counts.clone());
                rt.spawn(async move {
                    let mut client = login(port).await?;
                    let mut k = 0i32;
                    while !stop.load(Ordering::SeqCst) {
                        tokio::time::timeout(SETTLE, one_xact(&mut client, i as i32, k))
                            .await
                            .map_err(|_| format!("short client {i}: transaction {k} unanswered within {SETTLE:?}"))?
                            .map_err(|e| format!("short client {i}: transaction {k}: {e:?}"))?;
                        k += 1;
                        counts[i].fetch_add(1, Ordering::SeqCst);
                    }
                    Ok::<i32, String>(k)
                })
            })
            .collect();
        let snapshot = |counts: &[AtomicUsize]| counts.iter().map(|c| c.load(Ordering::SeqCst)).collect::<Vec<_>>();
        assert!(
            wait_until(SETTLE, || snapshot(&counts).iter().all(|&n| n >= 1)),
            "not every short client committed once: {:?}",
            snapshot(&counts)
        );

        // The long transaction, through the pooler.
        let mut long = connect(pg, APP);
        long.batch_execute("BEGIN; INSERT INTO long_xact VALUES (1)")
            .expect("long transaction: BEGIN; INSERT");
        let xid = one(&mut long, "SELECT txid_current()");
        let long_pid = one(&mut long, "SELECT pg_backend_pid()");
        let ahead0 = attaches_ahead(pg);
        let base = snapshot(&counts);
        let started = Instant::now();
        let caught_up = |now: &[usize]| now.iter().zip(&base).all(|(n, b)| *n >= b + SHORT_EACH);
        let mut steps = 0;
        while (!caught_up(&snapshot(&counts)) || steps < LONG_STEPS) && started.elapsed() < SETTLE {
            long.batch_execute("SELECT pg_sleep(0.1)").expect("long transaction: a step");
            steps += 1;
        }
        let now = snapshot(&counts);
        let stuck: Vec<_> = (0..SHORT).filter(|&i| now[i] < base[i] + SHORT_EACH).collect();
        assert!(
            stuck.is_empty(),
            "short clients {stuck:?} committed fewer than {SHORT_EACH} transactions in {SETTLE:?} while \
             the long transaction (backend {long_pid}) was open: before {base:?}, now {now:?}; clients {:?}",
            clients(pg)
        );
        // Still the same transaction, its row not visible to others.
        assert_eq!(one(&mut long, "SELECT txid_current()"), xid, "the long transaction changed");
        assert_eq!(one(&mut long, "SELECT pg_backend_pid()"), long_pid, "the long client changed backend");
        assert_eq!(admin_i64(pg, "SELECT count(*) FROM long_xact"), 0, "uncommitted row visible");
        assert_attached_ahead(pg, ahead0, "while the long transaction was open");
        eprintln!(
            "{SHORT} short clients went from {base:?} to {now:?} during {steps} steps of the long transaction"
        );
        long.batch_execute("COMMIT").expect("long transaction: COMMIT");
        assert_eq!(admin_i64(pg, "SELECT count(*) FROM long_xact"), 1, "the long transaction committed");

        stop.store(true, Ordering::SeqCst);
        let ends: Vec<Result<i32, String>> = rt.block_on(async {
            let mut ends = Vec::new();
            for t in tasks {
                ends.push(t.await.expect("short client task"));
            }
            ends
        });
        rt.shutdown_timeout(Duration::from_secs(5));
        let rows = work_rows(pg);
        for (i, end) in ends.iter().enumerate() {
            let k = *end.as_ref().unwrap_or_else(|e| panic!("{e}")) as i64;
            assert_eq!(rows.get(&(i as i32)), Some(&(k, k)), "short client {i}: rows (all, distinct)");
        }
        drop(long);
        assert_recovered(pg, pooler);
    });
}

// ---- 4. pause and resume with clients sent ahead ------------------------------------

/// pool_size 3: 30 workers run 60 exact-count transactions each; once
/// clients are being taken ahead, `nextgres.pause('postgres', 'app')`
/// returns true (every client sent ahead was taken back, no backend serves
/// a client); while paused all 30 workers end up waiting and no row is
/// added (a client still sent ahead would have been served by the backend
/// it was sent to); after `resume` every worker completes with its 60 rows
/// exactly once, attaches_ahead grows again, and the pool recovers.
#[test]
fn pause_and_resume_while_clients_are_sent_ahead() {
    let builder = handoff_builder()
        .conf("nextgres.pool_size = 3")
        .max_connections(20);
    run(builder, |pg| {
        create_tables(pg);
        let pooler = running_pooler_pid(pg);
        let ahead0 = attaches_ahead(pg);
        let port = pg.port();
        let rt = runtime();
        let progress = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..WORKERS)
            .map(|id| rt.spawn(worker(port, id, XACTS, progress.clone(), Arc::default())))
            .collect();
        assert!(
            wait_until(SETTLE, || attaches_ahead(pg) > ahead0
                && progress.load(Ordering::SeqCst) >= WORKERS as usize),
            "no client taken ahead: attaches_ahead {ahead0} -> {}, committed {}",
            attaches_ahead(pg),
            progress.load(Ordering::SeqCst)
        );
        let paused: bool = pg
            .admin()
            .query_one("SELECT nextgres.pause('postgres', 'app', 30)", &[])
            .expect("nextgres.pause")
            .get(0);
        assert!(paused, "pause did not return true within 30 s: {:?}", pooled(pg));
        let rows_at_pause = admin_i64(pg, "SELECT count(*) FROM work");
        // Every worker sends its next transaction and waits.
        assert!(
            wait_until(SETTLE, || waiting(pg) == WORKERS as i64),
            "while paused, {} of {WORKERS} workers wait; backends {:?}",
            waiting(pg),
            pooled(pg)
        );
        assert_eq!(
            admin_i64(pg, "SELECT count(*) FROM work"),
            rows_at_pause,
            "a transaction committed while the pool was paused"
        );
        let attached: Vec<_> = pooled(pg).into_iter().filter(|(_, s)| s == "attached").collect();
        assert!(attached.is_empty(), "paused pool with attached backends: {attached:?}");
        let ahead_paused = attaches_ahead(pg);
        let resumed: i32 = pg
            .admin()
            .query_one("SELECT nextgres.resume('postgres', 'app')", &[])
            .expect("nextgres.resume")
            .get(0);
        assert_eq!(resumed, 1, "pauses ended by resume");

        let ends: Vec<WorkerEnd> = rt.block_on(async {
            let mut ends = Vec::new();
            for t in tasks {
                ends.push(t.await.expect("worker task"));
            }
            ends
        });
        rt.shutdown_timeout(Duration::from_secs(5));
        eprintln!(
            "{WORKERS} workers x {XACTS} transactions, paused at {rows_at_pause} rows; attaches_ahead {ahead0} -> \
             {ahead_paused} (paused) -> {}",
            attaches_ahead(pg)
        );
        let failed: Vec<_> = ends.iter().filter(|e| e.failed.is_some()).collect();
        assert!(failed.is_empty(), "workers failed: {failed:#?}");
        let rows = work_rows(pg);
        let wrong: Vec<_> = (0..WORKERS)
            .filter(|id| rows.get(id) != Some(&(XACTS as i64, XACTS as i64)))
            .map(|id| (id, rows.get(&id)))
            .collect();
        assert!(wrong.is_empty(), "workers whose (rows, distinct) is not ({XACTS}, {XACTS}): {wrong:?}");
        assert!(
            (rows_at_pause as usize) < (WORKERS * XACTS) as usize,
            "the workers were done before the pause ({rows_at_pause} rows)"
        );
        assert_attached_ahead(pg, ahead_paused, "after resume");
        assert_recovered(pg, pooler);
    });
}

// ---- 5. kill_clients with clients sent ahead ------------------------------------------

/// pool_size 3: 30 workers run exact-count transactions until they fail;
/// once clients are being taken ahead, `nextgres.kill_clients('postgres',
/// 'app')` disconnects them all: within SETTLE every worker has ended, each
/// with 57P01 or its connection closed (none still served, as a client
/// sent ahead and left there would be), its rows the commits it saw (+ at
/// most the one in flight); no client is left, none waits, and a fresh
/// client is served by the same pooler.
///
/// Before the fix (a client whose backend's RELEASED was in flight when
/// the kill ran escaped it), 1-3 of the 30 workers kept being served in
/// about a third of the runs, with or without attach ahead.
#[test]
fn kill_clients_while_clients_are_sent_ahead() {
    let builder = handoff_builder()
        .conf("nextgres.pool_size = 3")
        .max_connections(20);
    run(builder, |pg| {
        create_tables(pg);
        let pooler = running_pooler_pid(pg);
        let ahead0 = attaches_ahead(pg);
        let port = pg.port();
        let rt = runtime();
        let progress = Arc::new(AtomicUsize::new(0));
        // Workers that never finish on their own: only the kill ends them.
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..WORKERS)
            .map(|id| rt.spawn(worker(port, id, i32::MAX, progress.clone(), stop.clone())))
            .collect();
        assert!(
            wait_until(SETTLE, || attaches_ahead(pg) > ahead0
                && progress.load(Ordering::SeqCst) >= WORKERS as usize),
            "no client taken ahead: attaches_ahead {ahead0} -> {}, committed {}",
            attaches_ahead(pg),
            progress.load(Ordering::SeqCst)
        );
        pg.admin()
            .batch_execute("SELECT nextgres.kill_clients('postgres', 'app')")
            .expect("nextgres.kill_clients");
        let all_ended = wait_until(SETTLE, || tasks.iter().all(|t| t.is_finished()));
        stop.store(true, Ordering::SeqCst);
        let ends: Vec<WorkerEnd> = rt.block_on(async {
            let mut ends = Vec::new();
            for t in tasks {
                ends.push(t.await.expect("worker task"));
            }
            ends
        });
        rt.shutdown_timeout(Duration::from_secs(5));
        let killed = ends.iter().filter(|e| e.failed.is_some()).count();
        eprintln!(
            "{WORKERS} workers, {killed} killed after {} transactions; attaches_ahead {ahead0} -> {}",
            progress.load(Ordering::SeqCst),
            attaches_ahead(pg)
        );
        let unexpected: Vec<_> = ends
            .iter()
            .filter(|e| e.failed.as_ref().is_some_and(|(_, by_kill)| !by_kill))
            .collect();
        assert!(
            unexpected.is_empty(),
            "workers failed otherwise than with 57P01 / connection closed: {unexpected:#?}"
        );
        let escaped: Vec<_> = ends.iter().filter(|e| e.failed.is_none()).map(|e| e.id).collect();
        assert!(
            all_ended && escaped.is_empty(),
            "workers still served {SETTLE:?} after kill_clients (stopped by the test): {escaped:?}"
        );
        let rows = work_rows(pg);
        let mut wrong = Vec::new();
        for e in &ends {
            let (n, distinct) = rows.get(&e.id).copied().unwrap_or((0, 0));
            let ok = n == distinct && (e.committed as i64..=e.committed as i64 + 1).contains(&n);
            if !ok {
                wrong.push(format!(
                    "worker {}: {n} rows ({distinct} distinct), saw {} commits, failed {:?}",
                    e.id, e.committed, e.failed
                ));
            }
        }
        assert!(wrong.is_empty(), "rows do not match what the workers saw:\n{}", wrong.join("\n"));
        assert_recovered(pg, pooler);
    });
}

// ---- 6. a process stopped at a chosen moment -------------------------------------

/// Stops process `pid` (SIGSTOP) until dropped (SIGCONT), so a test can
/// line events up behind it deterministically.
struct Stopped(i32);

impl Stopped {
    #[track_caller]
    fn new(pid: i32) -> Stopped {
        // SAFETY: plain kill(2) on a server process of the test's cluster.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "kill -STOP {pid}");
        let stopped = wait_until(SETTLE, || nextgres_test::procs::process_state(pid) == Some('T'));
        let s = Stopped(pid);
        assert!(stopped, "process {pid} not stopped within {SETTLE:?}");
        s
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The client on local port `port` is active on `backend` (handed to it).
#[track_caller]
fn assert_handed_to(pg: &Cluster, port: i32, backend: i32) {
    let handed = wait_until(SETTLE, || {
        clients(pg).iter().any(|(p, state, b)| *p == port && state == "active" && *b == Some(backend))
    });
    assert!(handed, "the client was not handed to the stopped backend {backend}: {:?}", clients(pg));
}

/// `pg_terminate_backend` of the stopped backend, which is then resumed: a
/// set latch ends its wait before it reads its socket. Returns once it
/// has exited.
#[track_caller]
fn terminate_stopped(pg: &Cluster, stopped: Stopped) {
    let backend = stopped.0;
    terminate_backend(pg, backend);
    drop(stopped);
    assert!(
        wait_until(SETTLE, || !nextgres_test::procs::process_alive(backend)),
        "the terminated backend {backend} still runs"
    );
}

/// A pool of one backend that gives its client back at every transaction
/// boundary (no `hold_idle_clients`).
fn one_backend_releasing_at_once() -> nextgres_test::Builder {
    handoff_builder()
        .conf("nextgres.pool_size = 1")
        .conf("nextgres.hold_idle_clients = off")
        .max_connections(20)
}

/// A client's next query sent before the pooler has read its backend's
/// RELEASED. Here the pooler is stopped while a client (pool of 1,
/// hold_idle_clients off) runs the rest of its transaction and sends its
/// next query: resumed, the pooler finds the client's socket event (if
/// any) while it still counts the client as attached, then RELEASED, and
/// must still see that query, or it waits forever: the client's idle
/// registration is edge-triggered and stays in place while a backend has
/// the socket, so no later edge announces that query, and the pooler has to
/// look at the socket itself once the client is idle again.
#[test]
fn next_query_sent_before_the_pooler_reads_released() {
    run(one_backend_releasing_at_once(), |pg| {
        let pooler = running_pooler_pid(pg);
        let mut c = raw(pg, APP);
        assert_eq!(c.value("SELECT 1"), "1");
        wait_parked(pg, 1);
        c.query("BEGIN").expect("BEGIN");
        let stop = Stopped::new(pooler);
        assert_eq!(c.value("SELECT 2"), "2");
        c.query("COMMIT").expect("COMMIT");
        c.send_query("SELECT 3");
        drop(stop);
        let rows = c.until_ready().expect("SELECT 3 sent while the pooler was stopped");
        assert_eq!(rows, vec![vec![Some("3".to_string())]]);
        for i in 0..20 {
            assert_eq!(c.value(&format!("SELECT {i}")), i.to_string());
        }
        assert_pooler_serves(pg, pooler);
    });
}

/// A DBA's `pg_terminate_backend` of a backend that looks idle (parked)
/// just as the pooler hands it a client: the backend ends before it reads
/// the ATTACH, and the client, whose session no backend holds between
/// transactions, is served by another backend instead of losing its
/// connection. The parked backend is stopped so the ATTACH waits unread in
/// its socket while it is terminated; resumed, it handles the SIGTERM first
/// (a set latch ends its wait before the socket is looked at).
#[test]
fn parked_backend_terminated_before_it_reads_the_attach() {
    run(one_backend_releasing_at_once(), |pg| {
        let pooler = running_pooler_pid(pg);
        let mut c = raw(pg, APP);
        c.query("SET application_name = 'kept'").expect("SET");
        let backend = wait_parked(pg, 1)[0];
        let stop = Stopped::new(backend);
        c.send_query("SELECT current_setting('application_name'), 42");
        let port = c.local_port();
        assert_handed_to(pg, port, backend);
        terminate_stopped(pg, stop);
        let rows = c
            .until_ready()
            .expect("the query handed to a backend terminated before reading it");
        assert_eq!(rows, vec![vec![Some("kept".to_string()), Some("42".to_string())]]);
        let now = pooled_pids(pg);
        assert!(!now.contains(&backend), "backends {now:?}");
        assert_eq!(c.value("SELECT 7"), "7");
        assert_pooler_serves(pg, pooler);
    });
}

/// A client sent ahead to a busy backend and *handed* to it at its RELEASED
/// (the backend had already parked when the ATTACH came, so it claims the
/// client from its socket), and that backend terminated before it reads the
/// ATTACH: the client waits for another backend instead of losing its
/// connection (`backend_gone`, `client_requeue_handed`). Lined up with two
/// stops: the pooler is stopped while the next client sends its query and
/// the busy backend's client commits, so the pooler, resumed, sees that
/// query before the RELEASED and sends the client ahead to a backend it
/// still counts as busy; that backend is stopped, parked, before the pooler
/// resumes, and terminated while stopped. Only an ATTACH sent on the
/// socket is handed: this client's session holds a prepared statement too
/// large for an ATTACH slot.
#[test]
fn backend_terminated_before_it_claims_a_client_handed_to_it() {
    sent_ahead_to_a_backend_that_parks_and_is_terminated(true);
}

/// As `backend_terminated_before_it_claims_a_client_handed_to_it`, with a
/// client whose ATTACH went ahead in a slot (`nextgres_core::attach_slot`):
/// a parked backend does not look at its slots, so the pooler, reading the
/// RELEASED, takes the client back and gives it to that backend, now free,
/// with a plain ATTACH on its socket; terminated before it reads it, the
/// client again waits for another backend and loses nothing.
#[test]
fn backend_terminated_while_a_client_in_its_slot_is_taken_back_for_it() {
    sent_ahead_to_a_backend_that_parks_and_is_terminated(false);
}

fn sent_ahead_to_a_backend_that_parks_and_is_terminated(on_socket: bool) {
    run(one_backend_releasing_at_once(), move |pg| {
        let pooler = running_pooler_pid(pg);
        let mut a = raw(pg, APP);
        let mut c = raw(pg, APP);
        c.query("SET application_name = 'kept'").expect("SET");
        let pad = "x".repeat(if on_socket { 2500 } else { 10 });
        c.query(&format!("PREPARE pad AS SELECT '{pad}'::text")).expect("PREPARE");
        let backend = wait_parked(pg, 1)[0];
        let before = attaches_ahead(pg);
        a.query("BEGIN").expect("BEGIN");
        let pooler_stop = Stopped::new(pooler);
        c.send_query("SELECT current_setting('application_name'), 42");
        a.query("COMMIT").expect("COMMIT on the busy backend");
        // The backend writes RELEASED after the ReadyForQuery just read,
        // then parks (sleeps) on its control socket.
        let parked = wait_until(SETTLE, || nextgres_test::procs::process_state(backend) == Some('S'));
        assert!(parked, "backend {backend} did not park");
        std::thread::sleep(Duration::from_millis(200));
        let backend_stop = Stopped::new(backend);
        // Which way C went ahead: a slot costs the pooler an fstat of its socket.
        let traced = nextgres_test::procs::Strace::record(pooler, &["-e", "trace=newfstatat,fstat"]);
        drop(pooler_stop);
        let port = c.local_port();
        assert_handed_to(pg, port, backend);
        let stats = traced.output();
        assert_eq!(stats.contains("S_IFSOCK"), !on_socket, "C sent ahead in a slot (the pooler's fstat of its socket):\n{stats}");
        if on_socket {
            assert_attached_ahead(pg, before, "the client handed at RELEASED");
        } else {
            assert_eq!(attaches_ahead(pg), before, "a client sent ahead in a slot was handed to a parked backend");
        }
        terminate_stopped(pg, backend_stop);
        let rows = c
            .until_ready()
            .expect("the query of a client handed to a backend terminated before claiming it");
        assert_eq!(rows, vec![vec![Some("kept".to_string()), Some("42".to_string())]]);
        assert_eq!(a.value("SELECT 8"), "8");
        assert_eq!(c.value("SELECT 7"), "7");
        assert_eq!(c.value("EXECUTE pad"), pad, "the session moved to another backend");
        assert_pooler_serves(pg, pooler);
    });
}

/// `nextgres.backends.clients_queued` of `backend`: clients sent ahead to it
/// that it has not taken yet.
fn queued(pg: &Cluster, backend: i32) -> i64 {
    admin_i64(pg, &format!("SELECT coalesce(sum(clients_queued), 0)::int8 FROM nextgres.backends WHERE pid = {backend}"))
}

/// What B and C run once served: their own session's application_name,
/// and when it ran (µs since the epoch).
const NAME_AND_TIME: &str = "SELECT current_setting('application_name'), (extract(epoch FROM clock_timestamp()) * 1e6)::int8";

/// Clients B and C wait, in that order, while client A's transaction holds
/// `backend`, the only one (pool of one): the pooler sends both ahead to
/// that busy backend, one per queue place. Returns once the backend's row
/// shows both queued.
#[track_caller]
fn two_sent_ahead(pg: &Cluster, backend: i32, a: &mut nextgres_test::raw::Raw, b: &mut nextgres_test::raw::Raw, c: &mut nextgres_test::raw::Raw) {
    a.query("BEGIN").expect("BEGIN");
    b.send_query(NAME_AND_TIME);
    c.send_query(NAME_AND_TIME);
    let both = wait_until(SETTLE, || queued(pg, backend) == 2);
    assert!(both, "B and C are not both sent ahead to {backend}: clients_queued {}, {:?}", queued(pg, backend), clients(pg));
}

/// As `two_sent_ahead`, and then D sent ahead too: `backend` has every
/// queue place taken (AHEAD_DEPTH 3).
#[track_caller]
fn three_sent_ahead(pg: &Cluster, backend: i32, [a, b, c, d]: [&mut nextgres_test::raw::Raw; 4]) {
    two_sent_ahead(pg, backend, a, b, c);
    d.send_query(NAME_AND_TIME);
    let three = wait_until(SETTLE, || queued(pg, backend) == 3);
    assert!(three, "B, C and D are not all sent ahead to {backend}: clients_queued {}", queued(pg, backend));
}

/// B's and C's answers to `NAME_AND_TIME`: each its own name, B first.
#[track_caller]
fn assert_served_in_order(b: Vec<Vec<Option<String>>>, c: Vec<Vec<Option<String>>>) {
    let (b, c) = (&b[0], &c[0]);
    assert_eq!((b[0].as_deref(), c[0].as_deref()), (Some("bee"), Some("sea")), "B's and C's sessions");
    let at = |r: &[Option<String>]| r[1].as_deref().and_then(|t| t.parse::<i64>().ok()).expect("a time");
    assert!(at(b) < at(c), "C, queued second, was served before B: {b:?} {c:?}");
}

/// Clients A, B (application_name 'bee') and C ('sea') of a pool of one
/// (`one_backend_releasing_at_once`), its backend parked: (pooler pid,
/// backend pid, A, B, C).
#[track_caller]
fn a_bee_sea(pg: &Cluster) -> (i32, i32, nextgres_test::raw::Raw, nextgres_test::raw::Raw, nextgres_test::raw::Raw) {
    let pooler = running_pooler_pid(pg);
    let (a, mut b, mut c) = (raw(pg, APP), raw(pg, APP), raw(pg, APP));
    b.query("SET application_name = 'bee'").expect("SET");
    c.query("SET application_name = 'sea'").expect("SET");
    let backend = wait_parked(pg, 1)[0];
    (pooler, backend, a, b, c)
}

/// As `a_bee_sea`, with a fourth client D ('dee'): (pooler pid, backend
/// pid, A, B, C, D), the backend parked.
#[track_caller]
fn a_bee_sea_dee(pg: &Cluster) -> (i32, i32, nextgres_test::raw::Raw, nextgres_test::raw::Raw, nextgres_test::raw::Raw, nextgres_test::raw::Raw) {
    let (pooler, _, a, b, c) = a_bee_sea(pg);
    let mut d = raw(pg, APP);
    d.query("SET application_name = 'dee'").expect("SET");
    let backend = wait_parked(pg, 1)[0];
    (pooler, backend, a, b, c, d)
}

/// With the pooler stopped (until the returned guard drops), A commits and
/// B, C and D, sent ahead to A's backend (`three_sent_ahead`), are each
/// served there, in their own sessions.
#[track_caller]
fn served_ahead_with_the_pooler_stopped(pooler: i32, a: &mut nextgres_test::raw::Raw, bcd: [&mut nextgres_test::raw::Raw; 3]) -> Stopped {
    let stop = Stopped::new(pooler);
    a.query("COMMIT").expect("COMMIT on the busy backend");
    for (x, name) in bcd.into_iter().zip(["bee", "sea", "dee"]) {
        let rows = x.until_ready().expect("served while the pooler is stopped");
        assert_eq!(rows[0][0].as_deref(), Some(name));
    }
    stop
}

/// Every queue place of a busy backend (`pooler::ahead`, AHEAD_DEPTH 3):
/// with three clients sent ahead, the backend takes the first at A's commit
/// and each next one at the previous one's ReadyForQuery(I), all while the
/// pooler is stopped, so it has read none of the backend's RELEASEDs: no
/// trip through the pooler between clients. With a single place the second
/// client would wait in the pooler's queue until it ran again.
#[test]
fn busy_backend_takes_every_client_sent_ahead_without_the_pooler() {
    run(one_backend_releasing_at_once(), |pg| {
        let (pooler, backend, mut a, mut b, mut c, mut d) = a_bee_sea_dee(pg);
        let before = attaches_ahead(pg);
        three_sent_ahead(pg, backend, [&mut a, &mut b, &mut c, &mut d]);
        let stop = Stopped::new(pooler);
        a.query("COMMIT").expect("COMMIT on the busy backend");
        let rb = b.until_ready().expect("B, sent ahead first, served while the pooler is stopped");
        let rc = c
            .until_ready()
            .expect("C, sent ahead second, served while the pooler is stopped (its backend's second queue place)");
        let rd = d
            .until_ready()
            .expect("D, sent ahead third, served while the pooler is stopped (its backend's third queue place)");
        assert_eq!(rd[0][0].as_deref(), Some("dee"));
        let at = |r: &Vec<Vec<Option<String>>>| r[0][1].as_deref().and_then(|t| t.parse::<i64>().ok()).expect("a time");
        assert!(at(&rc) < at(&rd), "D, queued third, was served before C: {rc:?} {rd:?}");
        assert_served_in_order(rb, rc);
        drop(stop);
        let all = wait_until(SETTLE, || attaches_ahead(pg) >= before + 3);
        assert!(all, "attaches_ahead went {before} -> {}: not all three taken ahead", attaches_ahead(pg));
        for (x, name) in [(&mut a, "a"), (&mut b, "bee"), (&mut c, "sea"), (&mut d, "dee")] {
            assert_eq!(x.value("SELECT 5"), "5", "{name}");
        }
        assert_eq!(b.value("SELECT current_setting('application_name')"), "bee");
        assert_eq!(c.value("SELECT current_setting('application_name')"), "sea");
        assert_eq!(d.value("SELECT current_setting('application_name')"), "dee");
        assert_eq!(queued(pg, backend), 0);
        assert_pooler_serves(pg, pooler);
    });
}

/// `nextgres.pools.queries` of APP's pool (0 while it has no pool).
fn pool_queries(pg: &Cluster) -> i64 {
    admin_i64(pg, "SELECT coalesce(sum(queries), 0)::int8 FROM nextgres.pools WHERE role = 'app'")
}

/// The bytes of a `write(2)` line of `strace -xx` output (`write(9,
/// "\x7e\x00...", 38) = 38`).
fn hex_bytes(line: &str) -> Vec<u8> {
    let quoted = line.split('"').nth(1).unwrap_or("");
    quoted.split("\\x").filter(|h| !h.is_empty()).filter_map(|h| u8::from_str_radix(h, 16).ok()).collect()
}

/// The tags of the control messages in `bytes` (a tag and a length each).
fn control_tags(bytes: &[u8]) -> Vec<u8> {
    let mut tags = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        tags.push(rest[0]);
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        rest = rest.get(1 + len..).unwrap_or(&[]);
    }
    tags
}

/// A busy backend going from client to client sent ahead leaves each
/// RELEASED in shared memory (its release ring), not on its control socket:
/// no write(2) and no wake-up of the pooler per transaction. Traced while
/// the pooler is stopped and the backend serves A's commit and then B, C
/// and D, sent ahead: of its RELEASEDs only D's, as it parks, may go on the
/// socket (failed before: A's, B's and C's did too; and while the wake-up
/// mark of A's lay unread there, B's and C's did). Resumed, the pooler reads the ring:
/// every client taken ahead and every query is counted, and each client
/// goes on with its own session.
#[test]
fn clients_taken_ahead_are_released_through_shared_memory() {
    run(one_backend_releasing_at_once(), |pg| {
        let (pooler, backend, mut a, mut b, mut c, mut d) = a_bee_sea_dee(pg);
        let (ahead_before, queries_before) = (attaches_ahead(pg), pool_queries(pg));
        three_sent_ahead(pg, backend, [&mut a, &mut b, &mut c, &mut d]);
        let traced = nextgres_test::procs::Strace::record(backend, &["-e", "trace=write", "-xx", "-s", "512"]);
        let stop = served_ahead_with_the_pooler_stopped(pooler, &mut a, [&mut b, &mut c, &mut d]);
        // D's own boundary parks the backend (nothing more was sent ahead):
        // that RELEASED goes on the socket, if traced yet.
        let writes = traced.output();
        // The control messages of each write, by tag: RELEASED is '~'; a
        // RING_MARK ('@') may wake the pooler or come before a RELEASED.
        // (Not the server log on stderr, fd 2.)
        let tags: Vec<u8> = writes
            .lines()
            .filter(|l| l.starts_with("write(") && !l.starts_with("write(2,"))
            .flat_map(|l| control_tags(&hex_bytes(l)))
            .collect();
        let released = tags.iter().filter(|&&t| t == b'~').count();
        assert!(
            released == 0 || (released == 1 && tags.last() == Some(&b'~')),
            "the backend wrote RELEASED on its control socket while it took clients ahead (only the last one, \
             D's as it parked, may go there): tags {:?}\n{writes}",
            String::from_utf8_lossy(&tags)
        );
        drop(stop);
        let counted = wait_until(SETTLE, || attaches_ahead(pg) >= ahead_before + 3);
        assert!(counted, "attaches_ahead went {ahead_before} -> {}: the ring's RELEASEDs were not all read", attaches_ahead(pg));
        // BEGIN and COMMIT of A, one query each of B, C and D.
        let all = wait_until(SETTLE, || pool_queries(pg) == queries_before + 5);
        assert!(all, "queries went {queries_before} -> {}, not +5", pool_queries(pg));
        assert_eq!(a.value("SELECT 5"), "5");
        for (x, name) in [(&mut b, "bee"), (&mut c, "sea"), (&mut d, "dee")] {
            assert_eq!(x.value("SELECT current_setting('application_name')"), name);
        }
        assert_eq!(queued(pg, backend), 0);
        assert_pooler_serves(pg, pooler);
    });
}

/// Clients sent ahead reach their backend through shared memory
/// (`nextgres_core::attach_slot`): the pooler passes no socket on the
/// control socket (`sendmsg` with `SCM_RIGHTS`) for B, C and D, queued
/// behind A's transaction (only A's own attach to the parked backend does),
/// and the backend, with the pooler stopped, takes each one's socket from
/// the pooler with `pidfd_getfd` and receives none with `recvmsg`; each is
/// served in order, with its own session.
#[test]
fn clients_sent_ahead_reach_their_backend_through_shared_memory() {
    run(one_backend_releasing_at_once(), |pg| {
        let (pooler, backend, mut a, mut b, mut c, mut d) = a_bee_sea_dee(pg);
        let ahead_before = attaches_ahead(pg);
        let traced = nextgres_test::procs::Strace::record(pooler, &["-e", "trace=sendmsg"]);
        three_sent_ahead(pg, backend, [&mut a, &mut b, &mut c, &mut d]);
        let sends_text = traced.output();
        let traced = nextgres_test::procs::Strace::record(backend, &["-e", "trace=pidfd_getfd,recvmsg"]);
        let stop = served_ahead_with_the_pooler_stopped(pooler, &mut a, [&mut b, &mut c, &mut d]);
        let takes_text = traced.output();
        let passed = sends_text.lines().filter(|l| l.contains("SCM_RIGHTS")).count();
        assert!(passed <= 1, "the pooler passed {passed} sockets on control sockets for A, B, C and D (at most A's):\n{sends_text}");
        let taken = takes_text.lines().filter(|l| l.starts_with("pidfd_getfd(") && !l.contains("= -1")).count();
        let received = takes_text.lines().filter(|l| l.starts_with("recvmsg(") && l.contains("SCM_RIGHTS")).count();
        assert_eq!((taken, received), (3, 0), "sockets taken with pidfd_getfd and received with recvmsg:\n{takes_text}");
        drop(stop);
        let counted = wait_until(SETTLE, || attaches_ahead(pg) >= ahead_before + 3);
        assert!(counted, "attaches_ahead went {ahead_before} -> {}", attaches_ahead(pg));
        assert_eq!(a.value("SELECT 5"), "5");
        for (x, name) in [(&mut b, "bee"), (&mut c, "sea"), (&mut d, "dee")] {
            assert_eq!(x.value("SELECT current_setting('application_name')"), name);
        }
        assert_eq!(queued(pg, backend), 0);
        assert_pooler_serves(pg, pooler);
    });
}

/// The backend holding two clients sent ahead is terminated inside client
/// A's transaction: A gets the termination's FATAL, as from a direct
/// backend; B and C, never touched there, wait again in the order they came
/// and a new backend serves both, each with its own session.
#[test]
fn backend_terminated_while_holding_two_clients_sent_ahead() {
    run(one_backend_releasing_at_once(), |pg| {
        let (pooler, backend, mut a, mut b, mut c) = a_bee_sea(pg);
        two_sent_ahead(pg, backend, &mut a, &mut b, &mut c);
        terminate_backend(pg, backend);
        let (severity, sqlstate, _) = a.expect_fatal();
        assert_eq!((severity.as_str(), sqlstate.as_str()), ("FATAL", "57P01"), "A's end");
        let rb = b.until_ready().expect("B, sent ahead to the terminated backend");
        let rc = c.until_ready().expect("C, sent ahead second to the terminated backend");
        assert_served_in_order(rb, rc);
        let now = pooled_pids(pg);
        assert!(!now.contains(&backend), "backends {now:?}");
        assert_eq!(b.value("SELECT 6"), "6");
        assert_eq!(c.value("SELECT current_setting('application_name')"), "sea");
        assert_pooler_serves(pg, pooler);
    });
}

/// `pid`'s open files limit (RLIMIT_NOFILE, soft) lowered to its lowest free
/// descriptor number while this lives: the next descriptor it would get
/// (a client socket passed with SCM_RIGHTS) does not fit, and the kernel
/// drops it (MSG_CTRUNC). Restored when dropped. Set with util-linux's
/// `prlimit` run as the server's OS user: root here may lack
/// CAP_SYS_RESOURCE, which another user's process would need.
struct FilesLimited {
    pid: i32,
    owner: (u32, u32),
    was: String,
}

impl FilesLimited {
    #[track_caller]
    fn new(pg: &Cluster, pid: i32) -> FilesLimited {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(format!("/proc/{pid}")).expect("the backend's /proc entry");
        let owner = (meta.uid(), meta.gid());
        let open: std::collections::HashSet<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("the backend's descriptors")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let lowest_free = (0..).find(|n| !open.contains(n)).expect("a free descriptor number");
        let was = run_prlimit(owner, &["--pid", &pid.to_string(), "--nofile", "--raw", "--noheadings", "--output=SOFT"]);
        let was = was.trim().to_string();
        assert!(was.parse::<u64>().is_ok(), "{pid}'s open files limit: {was:?} ({})", pg.data_dir().display());
        run_prlimit(owner, &["--pid", &pid.to_string(), &format!("--nofile={lowest_free}:")]);
        FilesLimited { pid, owner, was }
    }
}

/// `prlimit ARGS` (util-linux) to run as the OS user `owner` (uid, gid).
fn prlimit(owner: (u32, u32), args: &[&str]) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut c = std::process::Command::new("prlimit");
    c.args(args).uid(owner.0).gid(owner.1);
    c
}

/// Runs `prlimit` (as `prlimit` builds it); its output.
#[track_caller]
fn run_prlimit(owner: (u32, u32), args: &[&str]) -> String {
    let out = prlimit(owner, args).output().expect("running prlimit (util-linux)");
    assert!(out.status.success(), "prlimit {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Drop for FilesLimited {
    fn drop(&mut self) {
        // Fails harmlessly if the process is gone.
        let _ = prlimit(self.owner, &["--pid", &self.pid.to_string(), &format!("--nofile={}:", self.was)]).output();
    }
}

/// A client sent ahead to a backend at its open files limit: the client's
/// socket never reaches the backend (the kernel drops it), so the backend
/// refuses the client in shared memory (`shmem::ahead_refuse`) and gives
/// its own client back as usual; the pooler, reading that RELEASED, puts
/// the refused client back in line instead of handing it over, and the same
/// backend serves it once it parked (giving its client back freed a
/// descriptor number). Nobody loses a connection, no backend ends, and the
/// refused client is not counted as taken ahead.
#[test]
fn client_sent_ahead_to_a_backend_at_its_open_files_limit() {
    run(one_backend_releasing_at_once(), |pg| {
        let pooler = running_pooler_pid(pg);
        let (mut a, mut c) = (raw(pg, APP), raw(pg, APP));
        c.query("SET application_name = 'sea'").expect("SET");
        let backend = wait_parked(pg, 1)[0];
        a.query("BEGIN").expect("BEGIN");
        let limited = FilesLimited::new(pg, backend);
        let before = attaches_ahead(pg);
        c.send_query("SELECT current_setting('application_name')");
        let sent = wait_until(SETTLE, || queued(pg, backend) == 1);
        assert!(sent, "C was not sent ahead: {:?}", clients(pg));
        a.query("COMMIT").expect("COMMIT on the backend at its open files limit");
        let rows = c.until_ready().expect("the client whose socket the backend could not receive");
        assert_eq!(rows, vec![vec![Some("sea".to_string())]]);
        drop(limited);
        assert_eq!(pooled_pids(pg), vec![backend], "the backend that refused the client ended");
        assert_eq!(attaches_ahead(pg), before, "the refused client was counted as taken ahead");
        assert_eq!(a.value("SELECT 5"), "5");
        assert_eq!(c.value("SELECT current_setting('application_name')"), "sea");
        assert_pooler_serves(pg, pooler);
    });
}

/// The first of two clients sent ahead to a busy backend resets its
/// connection while queued there: the pooler takes it back and closes it
/// (its idle registration reports the reset), the second stays queued. The
/// backend closes the first one's socket unread and still takes the second
/// (at its boundary, reading on past the taken-back ATTACH, or else once
/// parked, where its ticket is still offered), with the pooler stopped: no
/// trip through the pooler, no client lost or served twice.
#[test]
fn second_client_sent_ahead_taken_after_the_first_resets() {
    run(one_backend_releasing_at_once(), |pg| {
        let (pooler, backend, mut a, mut b, mut c) = a_bee_sea(pg);
        two_sent_ahead(pg, backend, &mut a, &mut b, &mut c);
        let port = b.local_port();
        reset(b);
        let gone = wait_until(SETTLE, || clients(pg).iter().all(|(p, _, _)| *p != port));
        assert!(gone, "B reset its connection and is still a client: {:?}", clients(pg));
        assert_eq!(queued(pg, backend), 1, "C is no longer queued on {backend}: {:?}", clients(pg));
        let stop = Stopped::new(pooler);
        a.query("COMMIT").expect("COMMIT on the busy backend");
        let rows = c
            .until_ready()
            .expect("C, queued behind a taken-back client, served while the pooler is stopped");
        assert_eq!(rows[0][0].as_deref(), Some("sea"));
        drop(stop);
        assert_eq!(a.value("SELECT 5"), "5");
        assert_eq!(c.value("SELECT current_setting('application_name')"), "sea");
        assert_eq!(pooled_pids(pg), vec![backend]);
        assert_pooler_serves(pg, pooler);
    });
}

/// Two clients sent ahead to a backend at its open files limit: it refuses
/// both at one boundary (the first socket dropped, it reads on and the
/// second is dropped too), the pooler puts them back at the head of its
/// queue in the order they came, and the same backend serves B, then C,
/// once giving A back freed a descriptor number each time.
#[test]
fn two_clients_refused_at_one_boundary_wait_again_in_order() {
    run(one_backend_releasing_at_once(), |pg| {
        let (pooler, backend, mut a, mut b, mut c) = a_bee_sea(pg);
        a.query("BEGIN").expect("BEGIN");
        let limited = FilesLimited::new(pg, backend);
        let before = attaches_ahead(pg);
        b.send_query(NAME_AND_TIME);
        c.send_query(NAME_AND_TIME);
        let both = wait_until(SETTLE, || queued(pg, backend) == 2);
        assert!(both, "B and C are not both sent ahead: clients_queued {}", queued(pg, backend));
        a.query("COMMIT").expect("COMMIT on the backend at its open files limit");
        let rb = b.until_ready().expect("B, refused by the backend at its open files limit");
        let rc = c.until_ready().expect("C, refused after B");
        drop(limited);
        assert_served_in_order(rb, rc);
        assert_eq!(pooled_pids(pg), vec![backend], "the backend that refused the clients ended");
        // B went to the parked backend with a plain ATTACH; C may have been
        // sent ahead again while B was served, and taken that time.
        let ahead = attaches_ahead(pg) - before;
        assert!(ahead <= 1, "refused clients were counted as taken ahead: {ahead}");
        assert_eq!(queued(pg, backend), 0, "a refused ticket is still offered");
        assert_eq!(a.value("SELECT 5"), "5");
        assert_eq!(b.value("SELECT current_setting('application_name')"), "bee");
        assert_pooler_serves(pg, pooler);
    });
}

/// `backend`'s write(2) and ioctl(2) calls each held back 3 s by strace
/// while the result lives: its RELEASED is the first write of a read-only
/// transaction's boundary (query results go out with sendto), or, left in
/// its release ring, comes after the boundary's one ioctl, so the pooler
/// reads it that much later.
fn released_late(backend: i32) -> nextgres_test::procs::Strace {
    // write(2): a RELEASED on the control socket; ioctl(2): the look
    // (TIOCOUTQ) before one left in the release ring.
    nextgres_test::procs::Strace::attach(backend, &["-e", "trace=write,ioctl", "-e", "inject=write,ioctl:delay_enter=3000000"])
}

/// `nextgres.kill_client` of the client on local port `port`, which must
/// find it.
#[track_caller]
fn kill_client_on(pg: &Cluster, port: i32) {
    let killed: bool = pg
        .admin()
        .query_one("SELECT nextgres.kill_client('127.0.0.1', $1)", &[&port])
        .expect("kill_client")
        .get(0);
    assert!(killed, "kill_client found no client on port {port}: {:?}", clients(pg));
}

/// `nextgres.kill_client` of a client its backend has just refused (the
/// backend, at its open files limit, could not receive the socket sent
/// ahead) while the pooler has not read that backend's RELEASED yet: the
/// ticket says refused, so the pooler cannot take the client back, and the
/// backend may already be serving another client, which a SIGTERM would
/// hit. The client is marked killed and told FATAL 57P01 when the RELEASED
/// is settled; the backend survives and serves the pool's other clients.
/// The window between the refusal and the RELEASED (a few system calls) is
/// held open by delaying the backend's write(2) calls with strace; the
/// pooler's log line shows the kill found the client in it.
#[test]
fn client_killed_between_its_refusal_and_the_release() {
    run(one_backend_releasing_at_once(), |pg| {
        let (pooler, backend, mut a, mut b, mut c) = a_bee_sea(pg);
        a.query("BEGIN").expect("BEGIN");
        let limited = FilesLimited::new(pg, backend);
        b.send_query(NAME_AND_TIME);
        let sent = wait_until(SETTLE, || queued(pg, backend) == 1);
        assert!(sent, "B was not sent ahead: {:?}", clients(pg));
        let delayed = released_late(backend);
        let mark = pg.log_mark();
        a.query("COMMIT").expect("COMMIT on the backend at its open files limit");
        let refused = wait_until(SETTLE, || queued(pg, backend) == 0);
        assert!(refused, "B's ticket is still offered: {:?}", clients(pg));
        let port = b.local_port();
        kill_client_on(pg, port);
        let (severity, sqlstate, _) = b.expect_fatal();
        drop(delayed);
        drop(limited);
        assert_eq!((severity.as_str(), sqlstate.as_str()), ("FATAL", "57P01"), "B's end");
        let log = pg.log_since(mark);
        assert!(
            log.contains(&format!("killing client 127.0.0.1 port {port}")) && log.contains("told when its backend gives it back"),
            "the kill did not find B refused and its RELEASED unread (the window was missed):\n{log}"
        );
        assert_eq!(pooled_pids(pg), vec![backend], "the backend that refused the killed client ended");
        assert_eq!(a.value("SELECT 5"), "5");
        assert_eq!(c.value("SELECT current_setting('application_name')"), "sea");
        assert!(wait_until(SETTLE, || clients(pg).iter().all(|(p, _, _)| *p != port)), "B is still a client: {:?}", clients(pg));
        assert_pooler_serves(pg, pooler);
    });
}

/// A client ends with Sync and a Terminate whose length word is wrong (8),
/// in one write, so the Terminate is already buffered when its backend
/// reaches ReadyForQuery: the backend must not hand its half-read input
/// state on. The client's connection ends (the server logs "invalid
/// message length", as directly), and the next client served there runs
/// its query instead of getting FATAL "protocol synchronization was lost".
#[test]
fn bad_terminate_buffered_at_the_boundary_spoils_no_other_client() {
    run(one_backend_releasing_at_once(), |pg| {
        use std::io::Write;
        let pooler = running_pooler_pid(pg);
        let mut a = raw(pg, APP);
        let mut b = raw(pg, APP);
        assert_eq!(a.value("SELECT 1"), "1");
        assert_eq!(b.value("SELECT 2"), "2");
        a.s.write_all(&[b'S', 0, 0, 0, 4, b'X', 0, 0, 0, 8]).expect("Sync and a bad Terminate");
        assert!(a.closed_by_peer(SETTLE), "the client that sent a bad Terminate is still connected");
        for i in 0..5 {
            assert_eq!(b.value(&format!("SELECT {i}")), i.to_string(), "the next client's query");
        }
        let mut c = raw(pg, APP);
        assert_eq!(c.value("SELECT 7"), "7");
        assert_pooler_serves(pg, pooler);
    });
}

/// A CancelRequest for client A that the pooler reads only after A's query
/// ended and A's backend took client B, sent ahead to it, must not cancel
/// B's query (the pooler still counted A as attached: it had not read the
/// backend's RELEASED). Lined up deterministically: pool of one, B sent
/// ahead while A's `pg_sleep` runs, the pooler stopped, A's cancel sent
/// (its connection accepted before), A's query ends and B's starts on the
/// backend without the pooler, then the pooler resumes with the cancel
/// ahead of the RELEASED in its event list. B's query completes (failed
/// before: 57014 "canceling statement due to user request" for B).
#[test]
fn late_cancel_of_a_client_misses_the_next_client_of_its_backend() {
    run(one_backend_releasing_at_once(), |pg| {
        let (pooler, backend, mut a, mut b, _c) = a_bee_sea(pg);
        let (key_pid, key) = a.key.clone().expect("A's BackendKeyData");
        let mut cancel = std::net::TcpStream::connect(("127.0.0.1", pg.port())).expect("cancel connection");
        let sleeping = |sql: &str| {
            admin_i64(
                pg,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {backend} AND state = 'active' AND query = '{sql}'"),
            ) == 1
        };
        a.send_query("SELECT pg_sleep(2)");
        assert!(wait_until(SETTLE, || sleeping("SELECT pg_sleep(2)")), "A's query is not running on {backend}");
        b.send_query("SELECT pg_sleep(3)");
        assert!(wait_until(SETTLE, || queued(pg, backend) == 1), "B was not sent ahead: {:?}", clients(pg));
        {
            let _stopped = Stopped::new(pooler);
            let mut pkt = Vec::new();
            pkt.extend_from_slice(&((12 + key.len()) as i32).to_be_bytes());
            pkt.extend_from_slice(&80877102i32.to_be_bytes());
            pkt.extend_from_slice(&key_pid.to_be_bytes());
            pkt.extend_from_slice(&key);
            std::io::Write::write_all(&mut cancel, &pkt).expect("CancelRequest");
            a.until_ready().expect("A's query completes (the cancel is not read yet)");
            assert!(
                wait_until(SETTLE, || sleeping("SELECT pg_sleep(3)")),
                "B's query does not run on {backend} while the pooler is stopped"
            );
        }
        let r = b.until_ready();
        assert!(r.is_ok(), "B's query: {r:?} (A's late cancel hit it)");
        a.query("SELECT 1").expect("A goes on");
    });
}

/// `nextgres.kill_client` of a client its backend has claimed ahead while
/// the pooler has not read that backend's RELEASED (held back 3 s by
/// strace): the pooler cannot signal the backend then (it may still be at
/// the previous client's boundary), so the client is marked killed. When
/// the RELEASED is read the client is the backend's, and here it opens a
/// transaction and stays in it: the backend is terminated then and the
/// client gets FATAL 57P01 (failed before: the kill waited for the client's
/// next RELEASED, which a transaction left open never sends, and the client
/// went on in its transaction).
#[test]
fn client_killed_after_its_backend_claimed_it_ahead() {
    run(one_backend_releasing_at_once(), |pg| {
        let (pooler, backend, mut a, mut b, mut c) = a_bee_sea(pg);
        a.query("BEGIN").expect("BEGIN");
        b.send_query("BEGIN; SELECT 1");
        let sent = wait_until(SETTLE, || queued(pg, backend) == 1);
        assert!(sent, "B was not sent ahead: {:?}", clients(pg));
        // B's transaction starts after the late RELEASED.
        let delayed = released_late(backend);
        let mark = pg.log_mark();
        a.query("COMMIT").expect("COMMIT");
        let claimed = wait_until(SETTLE, || queued(pg, backend) == 0);
        assert!(claimed, "B's ticket is still offered: {:?}", clients(pg));
        let port = b.local_port();
        kill_client_on(pg, port);
        let log = pg.log_since(mark);
        assert!(
            log.contains("told when its backend gives it back"),
            "the kill did not find B claimed and its RELEASED unread (the window was missed):\n{log}"
        );
        drop(delayed);
        let (severity, sqlstate, _) = b.expect_fatal();
        assert_eq!((severity.as_str(), sqlstate.as_str()), ("FATAL", "57P01"), "B's end");
        assert_eq!(a.value("SELECT 5"), "5");
        assert_eq!(c.value("SELECT current_setting('application_name')"), "sea");
        assert!(wait_until(SETTLE, || clients(pg).iter().all(|(p, _, _)| *p != port)), "B is still a client: {:?}", clients(pg));
        assert_pooler_serves(pg, pooler);
    });
}

/// A client whose ATTACH is too large for a slot (a session image over
/// 2 kB) goes ahead on the control socket, and a backend's queue goes one
/// way at a time. When the backend chosen for it has its queue in slots,
/// another whose queue is on the socket takes it: here, in a pool of two
/// busy backends, S1 goes ahead in a slot to P (attached first), L1 on the
/// socket to Q, then L2, at the head of the queue, is passed over P for Q,
/// and S2 goes to P (the pooler passes sockets on control sockets for L1
/// and L2 only). All four are served while the pooler is stopped. (Were L2
/// kept waiting for P, sending ahead would stop for the whole pool until
/// P's queue emptied: L2 and S2 would wait for the pooler.)
#[test]
fn large_client_passed_over_a_backend_whose_queue_is_in_slots() {
    let builder = handoff_builder().conf("nextgres.pool_size = 2").conf("nextgres.hold_idle_clients = off").max_connections(20);
    run(builder, |pg| {
        let pooler = running_pooler_pid(pg);
        let (mut x, mut y) = (raw(pg, APP), raw(pg, APP));
        let pad = "x".repeat(2500);
        let mut named = Vec::new();
        for name in ["s1", "l1", "l2", "s2"] {
            let mut c = raw(pg, APP);
            c.query(&format!("SET application_name = '{name}'")).expect("SET");
            if name.starts_with('l') {
                c.query(&format!("PREPARE pad AS SELECT '{pad}'::text")).expect("PREPARE");
            }
            named.push(c);
        }
        x.query("BEGIN").expect("BEGIN");
        std::thread::sleep(Duration::from_millis(50));
        y.query("BEGIN").expect("BEGIN");
        let backend_of = |port: i32| clients(pg).iter().find(|(p, _, _)| *p == port).and_then(|(_, _, b)| *b).expect("a backend");
        let (p, q) = (backend_of(x.local_port()), backend_of(y.local_port()));
        assert_ne!(p, q);
        let before = attaches_ahead(pg);
        let [s1, l1, l2, s2] = &mut named[..] else { unreachable!() };
        let traced = nextgres_test::procs::Strace::record(pooler, &["-e", "trace=sendmsg"]);
        s1.send_query(NAME_AND_TIME);
        std::thread::sleep(Duration::from_millis(200));
        l1.send_query(NAME_AND_TIME);
        let first = wait_until(SETTLE, || queued(pg, p) == 1 && queued(pg, q) == 1);
        assert!(first, "S1 and L1 not sent ahead one to each backend: {} / {}", queued(pg, p), queued(pg, q));
        l2.send_query(NAME_AND_TIME);
        std::thread::sleep(Duration::from_millis(200));
        s2.send_query(NAME_AND_TIME);
        let second = wait_until(SETTLE, || queued(pg, p) == 2 && queued(pg, q) == 2);
        assert!(second, "L2 and S2 not sent ahead (queued at P {}, at Q {}): {:?}", queued(pg, p), queued(pg, q), clients(pg));
        let sends = traced.output();
        let passed = sends.lines().filter(|l| l.contains("SCM_RIGHTS")).count();
        assert_eq!(passed, 2, "sockets passed on control sockets (L1 and L2 only; S1 and S2 in slots):\n{sends}");
        let stop = Stopped::new(pooler);
        x.query("COMMIT").expect("COMMIT");
        y.query("COMMIT").expect("COMMIT");
        for (c, name) in named.iter_mut().zip(["s1", "l1", "l2", "s2"]) {
            let rows = c.until_ready().expect("served while the pooler is stopped");
            assert_eq!(rows[0][0].as_deref(), Some(name));
        }
        drop(stop);
        let counted = wait_until(SETTLE, || attaches_ahead(pg) >= before + 4);
        assert!(counted, "attaches_ahead went {before} -> {}", attaches_ahead(pg));
        for c in named.iter_mut().skip(1).take(2) {
            assert_eq!(c.value("EXECUTE pad"), pad, "the large session moved with its client");
        }
        assert_eq!(x.value("SELECT 1"), "1");
        assert_pooler_serves(pg, pooler);
    });
}
