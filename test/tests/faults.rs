//! Fault tests of the pooler (issue acceptance point 5): clients that vanish,
//! backends that are terminated, cancels, the pooler's limits, server
//! shutdown and a pooler restart. Every test also checks that the pooler
//! keeps serving afterwards: a new client connects and runs a query, and
//! `nextgres.status()` shows the same pooler (unless the test kills it).
//!
//! Real servers and real clients only (rust-postgres, psql, and a tiny raw
//! protocol client for the cases a driver hides: closing a socket without
//! Terminate, or sending Terminate and watching who closes). No timing
//! assertions: every wait is bounded by `SETTLE` and only fails a test when
//! something never happens. Each test body also runs under `TEST_LIMIT`, so
//! a hung server fails the test instead of hanging CI.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test faults -- --test-threads=2
//! ```

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use nextgres_test::procs::process_alive;
use nextgres_test::{wait_until, with_timeout, Cluster, StopMode};
use postgres::{Client, NoTls};

mod fault_support;
use fault_support::*;

// ---- tests --------------------------------------------------------------------

/// An idle client that closes its socket without Terminate, and one that
/// sends Terminate, are handled by the pooler alone: the pool keeps the same
/// backends (none is handed the dead socket and none exits), the clients
/// leave nextgres.clients, and a Terminate is answered by closing the socket.
#[test]
fn idle_client_disconnect_and_terminate_keep_backends() {
    run(Cluster::builder().conf("nextgres.pool_size = 2"), |pg| {
        let pooler = running_pooler_pid(pg);
        let mut c1 = raw(pg, APP);
        let mut c2 = raw(pg, APP);
        // Two backends: c2's query arrives while c1 holds one in a transaction.
        c1.query("BEGIN").expect("BEGIN");
        c2.value("SELECT 1");
        c1.query("COMMIT").expect("COMMIT");
        let before = wait_parked(pg, 2);
        let mut seen = pg.backend_pids(Some(APP), Some(DB));
        seen.sort();
        assert_eq!(
            seen, before,
            "pg_stat_activity agrees with nextgres.backends"
        );

        // Socket closed without Terminate while idle.
        let port1 = c1.local_port();
        assert!(
            clients(pg).iter().any(|c| c.0 == port1),
            "{:?}",
            clients(pg)
        );
        c1.vanish();
        assert!(
            wait_until(SETTLE, || !clients(pg).iter().any(|c| c.0 == port1)),
            "closed client still listed: {:?}",
            clients(pg)
        );
        assert_eq!(
            wait_parked(pg, 2),
            before,
            "a backend was used or lost for a closed idle client"
        );

        // Terminate while idle; we keep our end open, so it is the pooler
        // that must end the connection.
        let port2 = c2.local_port();
        c2.send_terminate();
        assert!(
            c2.closed_by_peer(SETTLE),
            "pooler did not close the connection after Terminate"
        );
        assert!(
            wait_until(SETTLE, || !clients(pg).iter().any(|c| c.0 == port2)),
            "terminated client still listed: {:?}",
            clients(pg)
        );
        drop(c2);
        assert_eq!(
            wait_parked(pg, 2),
            before,
            "a backend was used or lost for an idle Terminate"
        );

        // A new client is served by one of the same parked backends.
        assert_pooler_serves(pg, pooler);
        assert!(
            wait_until(SETTLE, || clients(pg).is_empty()),
            "{:?}",
            clients(pg)
        );
        assert_eq!(
            wait_parked(pg, 2),
            before,
            "the pool logged in new backends"
        );
        let mut seen = pg.backend_pids(Some(APP), Some(DB));
        seen.sort();
        assert_eq!(seen, before);
    });
}

/// A client that sends its last statement and Terminate in one write (and,
/// hostile, more statements after the Terminate) gets its answer and then
/// the end of the connection, as from the server, which exits at a
/// Terminate: nothing after the Terminate runs, and the connection closes
/// at once. Both ways a transaction ends in the pooler: a kept client
/// taken from the kernel queue, and the pooler's handoff (the first
/// transaction of a pool with no backend yet, and every transaction with
/// the kernel queue off); simple and extended protocol.
#[test]
fn statements_after_terminate_never_run_and_the_connection_closes() {
    for queue in ["on", "off"] {
        run(
            Cluster::builder().conf("nextgres.pool_size = 2").conf(format!("nextgres.kernel_queue = {queue}")),
            move |pg| {
                let q = |sql: &str| {
                    let mut m = vec![b'Q'];
                    m.extend_from_slice(&(sql.len() as u32 + 5).to_be_bytes());
                    m.extend_from_slice(sql.as_bytes());
                    m.push(0);
                    m
                };
                let terminate = [b'X', 0, 0, 0, 4];
                let extended_sync = {
                    // Parse "" / Bind "" / Execute "" / Sync of SELECT 2.
                    let mut m = Vec::new();
                    let sql = b"SELECT 2\0";
                    m.push(b'P');
                    m.extend_from_slice(&(4 + 1 + sql.len() as u32 + 2).to_be_bytes());
                    m.push(0);
                    m.extend_from_slice(sql);
                    m.extend_from_slice(&[0, 0]);
                    m.extend_from_slice(&[b'B', 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0]);
                    m.extend_from_slice(&[b'E', 0, 0, 0, 9, 0, 0, 0, 0, 0]);
                    m.extend_from_slice(&[b'S', 0, 0, 0, 4]);
                    m
                };
                for (round, cold) in [(1, true), (2, false), (3, true), (4, false)] {
                    if cold {
                        // No backend: this transaction goes through the pooler.
                        admin_i64(pg, "SELECT count(pg_terminate_backend(pid)) FROM nextgres.backends");
                        assert!(
                            wait_until(SETTLE, || admin_i64(pg, "SELECT count(*) FROM nextgres.backends") == 0),
                            "the pool's backends did not go"
                        );
                    }
                    let mut c = raw(pg, APP);
                    if !cold {
                        c.value("SELECT 0");
                    }
                    let mut bytes = if round <= 2 { q("SELECT 1") } else { extended_sync.clone() };
                    bytes.extend_from_slice(&terminate);
                    bytes.extend_from_slice(&q(&format!("INSERT INTO t VALUES ({}, 0)", 100 + round)));
                    c.s.write_all(&bytes).expect("write");
                    c.until_ready().unwrap_or_else(|e| panic!("round {round}, queue {queue}: {e:?}"));
                    assert!(
                        c.closed_by_peer(SETTLE),
                        "round {round}, queue {queue}: the connection stayed open after Terminate"
                    );
                    assert_eq!(
                        admin_i64(pg, &format!("SELECT count(*) FROM t WHERE id = {}", 100 + round)),
                        0,
                        "round {round}, queue {queue}: a statement sent after Terminate ran"
                    );
                }
                assert!(wait_until(SETTLE, || clients(pg).is_empty()), "{:?}", clients(pg));
                // The pool still serves.
                assert_eq!(raw(pg, APP).value("SELECT 7"), "7");
            },
        );
    }
}

/// A psql killed with SIGKILL inside a transaction that holds a row lock,
/// then a raw client that closes its socket mid-transaction: each time the
/// backend rolls back and exits, the lock is released (a blocked UPDATE goes
/// through), no session stays 'idle in transaction', and the pool replaces
/// the lost backends for new clients.
#[test]
fn client_killed_mid_transaction_releases_locks() {
    run(Cluster::builder().conf("nextgres.pool_size = 2"), |pg| {
        let pooler = running_pooler_pid(pg);

        // psql reads statements from its stdin as they come, so the
        // transaction stays open while the pipe does.
        let mut psql = psql_child(pg, APP, &[], true, false);
        let mut stdin = psql.stdin.take().expect("psql stdin");
        stdin
            .write_all(
                b"BEGIN;\nUPDATE t SET v = v + 1 WHERE id = 1;\nSELECT 'holding the lock';\n",
            )
            .expect("writing to psql");
        stdin.flush().expect("flush psql stdin");
        let mut holder = None;
        let found = wait_until(SETTLE, || {
            holder = pg.activity().into_iter().find(|a| {
                a.usename.as_deref() == Some(APP)
                    && a.state.as_deref() == Some("idle in transaction")
                    && a.query
                        .as_deref()
                        .is_some_and(|q| q.contains("holding the lock"))
            });
            holder.is_some()
        });
        assert!(
            found,
            "psql's transaction never showed up: {:?}",
            pg.activity()
        );
        let holder = holder.expect("found").pid;

        // Another client queues behind psql's row lock.
        let rx = spawn_query(connect(pg, APP), "UPDATE t SET v = v + 10 WHERE id = 1");
        assert!(
            wait_until(SETTLE, || lock_waiters(pg) == 1),
            "the UPDATE never waited for the lock"
        );

        psql.kill().expect("kill -9 psql");
        let _ = psql.wait();
        drop(stdin);

        let (mut waiter, r) = wait_result(&rx, "UPDATE blocked by the killed psql's lock");
        r.unwrap_or_else(|e| panic!("UPDATE after psql died: {e:?}"));
        assert!(
            wait_until(SETTLE, || !session_exists(pg, holder)),
            "the killed client's backend {holder} is still there: {:?}",
            pg.activity()
        );
        assert_eq!(
            row_value(pg),
            10,
            "psql's uncommitted update must be rolled back"
        );
        assert!(idle_in_transaction(pg).is_empty(), "{:?}", pg.activity());
        assert!(!pooled_pids(pg).contains(&holder), "{:?}", pooled(pg));

        // Same with a raw client that just closes its socket mid-transaction.
        let mut raw = raw(pg, APP);
        raw.query("BEGIN").expect("BEGIN");
        raw.query("UPDATE t SET v = v + 100 WHERE id = 1")
            .expect("UPDATE");
        let holder2: i32 = raw.value("SELECT pg_backend_pid()").parse().expect("pid");
        let rx = spawn_query(waiter, "UPDATE t SET v = v + 1000 WHERE id = 1");
        assert!(
            wait_until(SETTLE, || lock_waiters(pg) == 1),
            "the UPDATE never waited for the lock"
        );
        raw.vanish();
        let (w, r) = wait_result(&rx, "UPDATE blocked by the vanished client's lock");
        waiter = w;
        r.unwrap_or_else(|e| panic!("UPDATE after the raw client vanished: {e:?}"));
        assert!(
            wait_until(SETTLE, || !session_exists(pg, holder2)),
            "the vanished client's backend {holder2} is still there: {:?}",
            pg.activity()
        );
        assert_eq!(row_value(pg), 1010);
        assert!(idle_in_transaction(pg).is_empty(), "{:?}", pg.activity());
        assert!(
            wait_until(SETTLE, || clients(pg).len() == 1),
            "dead clients still listed: {:?}",
            clients(pg)
        );

        // The pool is back to full strength: two clients in transactions at
        // once get two (live, new) backends.
        let mut other = connect(pg, APP);
        waiter.batch_execute("BEGIN; SELECT 1").expect("BEGIN 1");
        other.batch_execute("BEGIN; SELECT 1").expect("BEGIN 2");
        let pids = pooled_pids(pg);
        assert_eq!(pids.len(), 2, "{:?}", pooled(pg));
        assert!(
            !pids.contains(&holder) && !pids.contains(&holder2),
            "{pids:?}"
        );
        waiter.batch_execute("COMMIT").expect("COMMIT 1");
        other.batch_execute("COMMIT").expect("COMMIT 2");
        assert_pooler_serves(pg, pooler);
    });
}

/// pg_terminate_backend of a parked backend: it exits and the pool replaces
/// it on demand. Of an attached backend (client inside a transaction): that
/// client gets FATAL 57P01 and its connection closes; other clients carry on.
#[test]
fn terminate_parked_and_attached_backends() {
    run(Cluster::builder().conf("nextgres.pool_size = 2"), |pg| {
        let pooler = running_pooler_pid(pg);
        let mut a = connect(pg, APP);
        let mut b = connect(pg, APP);
        a.batch_execute("BEGIN").expect("BEGIN");
        one(&mut b, "SELECT 1");
        a.batch_execute("COMMIT").expect("COMMIT");
        let parked = wait_parked(pg, 2);

        // A parked backend.
        let victim = parked[0];
        terminate_backend(pg, victim);
        assert!(
            wait_until(SETTLE, || !session_exists(pg, victim)
                && !pooled_pids(pg).contains(&victim)),
            "terminated parked backend {victim} lingers: {:?}",
            pooled(pg)
        );
        assert_eq!(one(&mut a, "SELECT 'a'"), "a");
        assert_eq!(one(&mut b, "SELECT 'b'"), "b");
        // Both in a transaction at once: the pool must log in a replacement.
        a.batch_execute("BEGIN").expect("BEGIN a");
        b.batch_execute("BEGIN").expect("BEGIN b");
        let pids = pooled_pids(pg);
        assert_eq!(pids.len(), 2, "{:?}", pooled(pg));
        assert!(!pids.contains(&victim));
        a.batch_execute("COMMIT").expect("COMMIT a");
        b.batch_execute("COMMIT").expect("COMMIT b");

        // An attached backend: a raw client inside a transaction, so we
        // can read what the server tells it.
        drop(a);
        let mut raw = raw(pg, APP);
        raw.query("BEGIN").expect("BEGIN");
        let attached: i32 = raw.value("SELECT pg_backend_pid()").parse().expect("pid");
        terminate_backend(pg, attached);
        let (severity, code, _) = raw.expect_fatal();
        assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "57P01"));
        assert!(
            wait_until(SETTLE, || !session_exists(pg, attached)),
            "terminated attached backend {attached} lingers"
        );
        assert!(
            wait_until(SETTLE, || clients(pg).len() == 1),
            "the terminated client is still listed: {:?}",
            clients(pg)
        );
        // b is unaffected, inside and outside a transaction.
        assert_eq!(one(&mut b, "SELECT 'still here'"), "still here");
        b.batch_execute("BEGIN; UPDATE t SET v = v + 1 WHERE id = 1; COMMIT")
            .expect("b's transaction");
        assert_eq!(row_value(pg), 1);
        assert!(idle_in_transaction(pg).is_empty(), "{:?}", pg.activity());
        assert_pooler_serves(pg, pooler);
    });
}

/// A CancelRequest through the pooler stops the client's running query with
/// 57014 and the client stays usable. A cancel sent while its client is idle
/// does nothing: not to a later query of another client on the same backend
/// (pool_size = 1), nor to another client's query running right then on the
/// backend the idle client used last.
#[test]
fn cancel_running_query_and_idle_cancel_is_harmless() {
    run(Cluster::builder().conf("nextgres.pool_size = 1"), |pg| {
        let pooler = running_pooler_pid(pg);
        let a = connect(pg, APP);
        let token = a.cancel_token();
        let rx = spawn_query(a, "SELECT pg_sleep(30)");
        let sleeping = || {
            admin_i64(
                pg,
                "SELECT count(*) FROM pg_stat_activity
                  WHERE usename = 'app' AND state = 'active' AND query LIKE 'SELECT pg_sleep%'",
            ) == 1
        };
        assert!(
            wait_until(SETTLE, sleeping),
            "pg_sleep never started: {:?}",
            pg.activity()
        );
        token.cancel_query(NoTls).expect("sending the cancel");
        let (mut a, r) = wait_result(&rx, "cancelled pg_sleep(30)");
        let e = r.expect_err("pg_sleep(30) was not cancelled");
        assert_eq!(sqlstate(&e), Some("57014"), "{e:?}");
        assert_eq!(one(&mut a, "SELECT 'usable'"), "usable");

        // Cancel while idle, then another client's later query on the same
        // (only) backend.
        token.cancel_query(NoTls).expect("sending an idle cancel");
        let mut b = connect(pg, APP);
        b.simple_query("SELECT pg_sleep(0.2)")
            .expect("b's query was hit by a's idle cancel");
        // Cancel from idle a while b runs on the backend a used last.
        let rx = spawn_query(b, "SELECT pg_sleep(2)");
        assert!(wait_until(SETTLE, sleeping), "b's pg_sleep never started");
        token.cancel_query(NoTls).expect("sending an idle cancel");
        let (mut b, r) = wait_result(&rx, "b's pg_sleep(2)");
        r.expect("b's query was cancelled by a's cancel key");
        assert_eq!(one(&mut a, "SELECT 'a again'"), "a again");
        assert_eq!(one(&mut b, "SELECT 'b again'"), "b again");
        assert_pooler_serves(pg, pooler);
    });
}

/// A cancel reaches the program a query runs, as on a direct connection:
/// `COPY ... FROM PROGRAM 'sleep 600'` fails at once with the same error
/// directly and through the pooler (38000 "program ... failed", terminated
/// by signal 2: the server signals the backend's whole process group; the
/// pooler signalled the backend alone, which stayed blocked reading the
/// pipe until the program ended).
#[test]
fn cancel_reaches_the_program_a_query_runs_as_direct() {
    run(Cluster::builder(), |pg| {
        let pooler = running_pooler_pid(pg);
        pg.admin()
            .batch_execute("CREATE TABLE from_program (v text); GRANT ALL ON from_program TO app; GRANT pg_execute_server_program TO app")
            .expect("setup");
        let mut outcomes = Vec::new();
        for pooled in [false, true] {
            let c = if pooled { connect(pg, APP) } else { pg.unix(APP, DB).connect().expect("direct") };
            let token = c.cancel_token();
            let rx = spawn_query(c, "COPY from_program FROM PROGRAM 'sleep 600'");
            let running = || {
                admin_i64(
                    pg,
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND state = 'active' AND query LIKE 'COPY from_program%'",
                ) == 1
            };
            assert!(wait_until(SETTLE, running), "pooled {pooled}: the COPY never started");
            // The program has started too (the backend waits on its pipe).
            std::thread::sleep(Duration::from_millis(300));
            token.cancel_query(NoTls).expect("sending the cancel");
            let (mut c, r) = wait_result(&rx, &format!("pooled {pooled}: the cancelled COPY"));
            let e = r.expect_err("the COPY was not cancelled");
            let db = e.as_db_error().unwrap_or_else(|| panic!("pooled {pooled}: {e:?}"));
            outcomes.push((db.code().code().to_string(), db.message().to_string(), db.detail().map(str::to_string)));
            assert_eq!(one(&mut c, "SELECT 'usable'"), "usable");
        }
        assert_eq!(outcomes[0], outcomes[1], "direct, then pooled");
        assert_pooler_serves(pg, pooler);
    });
}

/// `waiter` sends a query while every backend of its pool is held: the
/// pooler lists it as `waiting` in nextgres.clients, and it gets FATAL 53400
/// no sooner than nextgres.query_wait_timeout (read from the server) after
/// the query was sent. How the connection ended.
#[track_caller]
fn expect_query_wait_timeout(pg: &Cluster, waiter: &mut Raw) -> io::ErrorKind {
    let limit = Duration::from_secs(admin_i64(
        pg,
        "SELECT setting::int8 FROM pg_settings WHERE name = 'nextgres.query_wait_timeout' AND unit = 's'",
    ) as u64);
    let port = waiter.local_port();
    let t0 = Instant::now();
    waiter.send_query("SELECT 1");
    assert!(
        wait_until(SETTLE, || clients(pg).iter().any(|c| c.0 == port && c.1 == "waiting")),
        "the client on port {port} never showed as waiting: {:?}",
        clients(pg)
    );
    let (severity, code, end) = waiter.expect_fatal();
    let waited = t0.elapsed();
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "53400"));
    assert!(
        waited >= limit,
        "53400 after {waited:?}, before nextgres.query_wait_timeout ({limit:?})"
    );
    end
}

/// nextgres.query_wait_timeout: with the only backend held by an open
/// transaction, another client's query waits (listed as `waiting`) and
/// fails with FATAL 53400, no sooner than the timeout. nextgres.max_client_conn = 5: the 6th client gets 53300 "sorry,
/// too many clients already", and gets in once a slot is free.
#[test]
fn query_wait_timeout_and_max_client_conn() {
    let builder = Cluster::builder()
        .conf("nextgres.pool_size = 1")
        .conf("nextgres.query_wait_timeout = 2")
        .conf("nextgres.max_client_conn = 5");
    run(builder, |pg| {
        let pooler = running_pooler_pid(pg);
        let mut holder = connect(pg, APP);
        holder.batch_execute("BEGIN; SELECT 1").expect("BEGIN");
        // A raw client: it reads the FATAL whether the connection then ends
        // with a FIN or a reset (see pooler_fatal_ends_with_orderly_close).
        let mut waiter = raw(pg, APP);
        expect_query_wait_timeout(pg, &mut waiter);
        assert!(
            wait_until(SETTLE, || clients(pg).len() == 1),
            "the timed-out client is still listed: {:?}",
            clients(pg)
        );
        // The holder was not disturbed.
        assert_eq!(one(&mut holder, "SELECT 'holder'"), "holder");
        holder.batch_execute("COMMIT").expect("COMMIT");
        assert_pooler_serves(pg, pooler);
        drop(holder);
        assert!(
            wait_until(SETTLE, || clients(pg).is_empty()),
            "{:?}",
            clients(pg)
        );

        // max_client_conn.
        let mut five: Vec<Client> = (0..5).map(|_| connect(pg, APP)).collect();
        let e = pg
            .connect_tcp(APP, DB, None)
            .map(|_| ())
            .expect_err("a 6th client was accepted with max_client_conn = 5");
        assert_eq!(sqlstate(&e), Some("53300"), "{e:?}");
        assert!(
            e.as_db_error()
                .is_some_and(|d| d.message() == "sorry, too many clients already"),
            "{e:?}"
        );
        // The five are served.
        for (i, c) in five.iter_mut().enumerate() {
            assert_eq!(one(c, &format!("SELECT {i}")), i.to_string());
        }
        // One leaves: a new client gets its slot (once the pooler saw it go).
        drop(five.pop());
        let mut sixth = None;
        assert!(
            wait_until(SETTLE, || {
                sixth = pg.connect_tcp(APP, DB, None).ok();
                sixth.is_some()
            }),
            "no slot freed after a client left: {:?}",
            clients(pg)
        );
        assert_eq!(one(sixth.as_mut().expect("connected"), "SELECT 6"), "6");
        drop(sixth);
        drop(five);
        assert!(
            wait_until(SETTLE, || clients(pg).is_empty()),
            "{:?}",
            clients(pg)
        );
        assert_pooler_serves(pg, pooler);
    });
}

/// `pg_ctl stop -m fast` with a parked backend (idle client of another
/// pool), a client attached inside a transaction and a client waiting for a
/// backend: the stop finishes, and each client gets an error, not a hang.
/// Then the server starts again and the new pooler serves.
#[test]
fn fast_stop_with_parked_attached_and_waiting_clients() {
    run(Cluster::builder().conf("nextgres.pool_size = 1"), |pg| {
        // Pool (app2): one idle client, its backend parked.
        let mut idle = raw(pg, APP2);
        idle.value("SELECT 1");
        // Pool (app): the only backend attached to an open transaction, and
        // a second client queued for it.
        let mut attached = connect(pg, APP);
        attached.batch_execute("BEGIN; SELECT 1").expect("BEGIN");
        let mut waiting = raw(pg, APP);
        waiting.send_query("SELECT 'waited'");
        assert!(
            wait_until(SETTLE, || clients(pg).iter().any(|c| c.1 == "waiting")),
            "no client waiting: {:?}",
            clients(pg)
        );
        assert!(
            pooled(pg).iter().any(|b| b.1 == "parked")
                && pooled(pg).iter().any(|b| b.1 == "attached"),
            "{:?}",
            pooled(pg)
        );

        assert!(
            pg.stop_timeout(StopMode::Fast, SETTLE),
            "fast stop did not finish within {SETTLE:?}"
        );
        let (severity, code, _) = waiting.expect_fatal();
        assert_eq!(
            (severity.as_str(), code.as_str()),
            ("FATAL", "57P01"),
            "waiting client"
        );
        let (severity, code, _) = idle.expect_fatal();
        assert_eq!(
            (severity.as_str(), code.as_str()),
            ("FATAL", "57P01"),
            "idle client"
        );
        let (_a, r) = bounded_query(
            attached,
            "SELECT 1",
            "the attached client after a fast stop",
        );
        r.expect_err("the attached client's session survived a fast stop");

        pg.start().expect("start after the fast stop");
        let pooler = running_pooler_pid(pg);
        assert_pooler_serves(pg, pooler);
    });
}

/// `pg_ctl stop -m immediate` with the same three kinds of clients: every
/// process gets SIGQUIT, the pooler included, so nobody is told anything
/// orderly; what matters is that the stop finishes, every client's
/// connection ends (none hangs), and the server comes back with a pooler
/// that serves.
#[test]
fn immediate_stop_with_parked_attached_and_waiting_clients() {
    // An immediate stop loses commits not yet flushed: the setup's too,
    // under the harness's synchronous_commit = off.
    let builder = Cluster::builder().conf("nextgres.pool_size = 1").conf("synchronous_commit = on");
    run(builder, |pg| {
        let mut idle = raw(pg, APP2);
        idle.value("SELECT 1");
        let mut attached = connect(pg, APP);
        attached.batch_execute("BEGIN; SELECT 1").expect("BEGIN");
        let mut waiting = raw(pg, APP);
        waiting.send_query("SELECT 'waited'");
        assert!(
            wait_until(SETTLE, || clients(pg).iter().any(|c| c.1 == "waiting")),
            "no client waiting: {:?}",
            clients(pg)
        );
        assert!(
            pg.stop_timeout(StopMode::Immediate, SETTLE),
            "immediate stop did not finish within {SETTLE:?}"
        );
        assert!(waiting.closed_by_peer(SETTLE), "the waiting client's connection stayed open");
        assert!(idle.closed_by_peer(SETTLE), "the idle client's connection stayed open");
        let (_a, r) = bounded_query(attached, "SELECT 1", "the attached client after an immediate stop");
        r.expect_err("the attached client's session survived an immediate stop");

        pg.start().expect("start after the immediate stop");
        let pooler = running_pooler_pid(pg);
        assert_pooler_serves(pg, pooler);
    });
}

/// Smart shutdown waits for the applications (the pooler's clients) to
/// disconnect, and then finishes: parked backends, which no application
/// uses, must not keep the server up forever. Bounded either way. Then the
/// server starts again and the new pooler serves.
#[test]
fn smart_stop_waits_for_clients_not_for_parked_backends() {
    run(Cluster::builder(), |pg| {
        let mut c = connect(pg, APP);
        one(&mut c, "SELECT 1");
        wait_parked(pg, 1);
        // A client is connected: the smart stop must not finish yet. pg_ctl
        // gives up after its window; the request itself stays in force.
        let mark = pg.log_mark();
        assert!(
            !pg.stop_timeout(StopMode::Smart, Duration::from_secs(3)),
            "smart stop finished while a client was connected"
        );
        // The postmaster got the request (its own log line) and still runs.
        assert!(
            wait_until(SETTLE, || pg.log_since(mark).contains("received smart shutdown request")),
            "the postmaster never logged the smart shutdown request:\n{}",
            pg.log_since(mark)
        );
        assert!(pg.is_running(), "the server stopped while a client was connected");
        // The shutdown request stays in force. The connected client still
        // gets its queries served meanwhile, as with a direct connection.
        assert_eq!(one(&mut c, "SELECT 'still served'"), "still served");
        drop(c);
        assert!(
            pg.stop_timeout(StopMode::Smart, SETTLE),
            "smart stop did not finish after the last client left (parked backends: {:?}); \
             parked backends keep a smart shutdown waiting forever",
            pg.activity()
                .iter()
                .filter(|a| a.query.as_deref() == Some("<nextgres: parked>"))
                .map(|a| a.pid)
                .collect::<Vec<_>>()
        );
        // The server starts again and its new pooler serves.
        pg.start().expect("start after the smart stop");
        let pooler = running_pooler_pid(pg);
        assert_pooler_serves(pg, pooler);
    });
}

/// A client its backend keeps idle between transactions (hold_idle_clients)
/// is told FATAL 57P01 when its pooler goes, as the clients idle in the
/// pooler are: a pooler stopping (SIGTERM) asks for it back and tells it; a
/// pooler killed (SIGKILL) cannot, and the backend tells it, woken by the
/// agent (handoff path) or by the control socket's end (kernel queue).
/// Before, on the handoff path, the backend went on keeping it, served its
/// next query and then closed the connection without a word (hunt4-dba F4),
/// and on the kernel queue a killed pooler's kept client was closed so.
#[test]
fn a_client_kept_idle_by_its_backend_is_told_when_the_pooler_goes() {
    for (kq, signal) in [
        ("off", libc::SIGTERM),
        ("off", libc::SIGKILL),
        ("on", libc::SIGTERM),
        ("on", libc::SIGKILL),
    ] {
        let case = format!("kernel_queue = {kq}, signal {signal}");
        eprintln!("{case}");
        run(
            Cluster::builder()
                .conf("nextgres.pool_size = 2")
                .conf("nextgres.hold_idle_clients = on")
                .conf(format!("nextgres.kernel_queue = {kq}")),
            move |pg| {
                let old = running_pooler_pid(pg);
                let mut kept = raw(pg, APP);
                kept.value("SELECT 1");
                let port = kept.local_port();
                // Kept: still attached to its backend while idle.
                let mut listed = Vec::new();
                assert!(
                    wait_until(SETTLE, || {
                        listed = clients(pg);
                        listed.iter().any(|c| c.0 == port && c.2.is_some())
                    }),
                    "{case}: the idle client is not kept by a backend: {listed:?}"
                );
                // SAFETY: plain kill(2) on the pooler's pid from nextgres.status().
                assert_eq!(unsafe { libc::kill(old, signal) }, 0, "kill {old}");
                let (severity, code, _) = kept.expect_fatal();
                assert_eq!(
                    (severity.as_str(), code.as_str()),
                    ("FATAL", "57P01"),
                    "{case}: the kept client"
                );
                assert_pooler_serves(pg, new_pooler(pg, old, &case));
            },
        );
    }
}

/// A session-mode client inside a transaction when its pooler goes keeps
/// its backend, its session and its connection to its end, as a pinned
/// client does, though no pooler takes it back at its boundaries (with
/// hold_idle_clients off its backend gives it back after each
/// transaction); a transaction-mode client in the same place is told 57P01
/// (above). Before, the session-mode one was closed without a word after
/// its transaction.
#[test]
fn a_session_mode_client_keeps_its_backend_when_the_pooler_goes() {
    run(
        Cluster::builder()
            .conf("nextgres.pool_size = 2")
            .conf("nextgres.pool_mode = session")
            .conf("nextgres.hold_idle_clients = off"),
        |pg| {
            let old = running_pooler_pid(pg);
            let mut c = raw(pg, APP);
            c.query("SET application_name = 'kept'").expect("SET");
            let pid = c.value("SELECT pg_backend_pid()");
            c.query("BEGIN; UPDATE t SET v = v + 1 WHERE id = 1").expect("open transaction");
            // SAFETY: plain kill(2) on the pooler's pid from nextgres.status().
            assert_eq!(unsafe { libc::kill(old, libc::SIGTERM) }, 0, "kill -TERM {old}");
            let new = new_pooler(pg, old, "session mode");
            c.query("COMMIT").expect("COMMIT after the pooler went");
            assert_eq!(row_value(pg), 1);
            for _ in 0..3 {
                assert_eq!(
                    c.value("SELECT pg_backend_pid() || ' ' || current_setting('application_name')"),
                    format!("{pid} kept"),
                    "the session-mode client after its pooler went"
                );
            }
            assert_pooler_serves(pg, new);
        },
    );
}

/// SIGTERM to the pooler worker: it tells idle clients 57P01 and exits; its
/// parked backends exit with it; a client inside a transaction finishes it,
/// then is told 57P01 by its backend.
/// The postmaster starts a new pooler (new pid), and connection attempts made
/// while no pooler runs are not refused: they wait in the listen backlog,
/// which the postmaster keeps, and are served by the new pooler.
///
/// Regression test (fixed in 82ed819, heap-scan catalog lookups): a pooler
/// started while `global/pg_internal.init` exists (every pooler but the
/// first, since the first ordinary backend writes that file) could not
/// authenticate anyone: each login got FATAL XX000 "nextgres: missing
/// support function 1 for attribute 1 of index "pg_database_oid_index""
/// (PG 16) or "function "ambeginscan" is not defined for index ..." (PG 15).
/// The logins are checked last so the other points are exercised anyway;
/// then the same for a restarted agent (which does the catalog lookups).
#[test]
fn pooler_sigterm_restarts_without_refusing_connections() {
    run(Cluster::builder().conf("nextgres.pool_size = 2"), |pg| {
        let old = running_pooler_pid(pg);
        let mut idle = raw(pg, APP);
        let mut in_xact = raw(pg, APP);
        in_xact
            .query("BEGIN; UPDATE t SET v = v + 1 WHERE id = 1")
            .expect("open transaction");
        idle.value("SELECT 1");
        let old_backends = pooled_pids(pg);
        assert_eq!(old_backends.len(), 2, "{:?}", pooled(pg));

        // SAFETY: plain kill(2) on the pooler's pid from nextgres.status().
        assert_eq!(
            unsafe { libc::kill(old, libc::SIGTERM) },
            0,
            "kill -TERM {old}"
        );
        assert!(
            wait_until(SETTLE, || !process_alive(old)),
            "the pooler {old} did not exit on SIGTERM"
        );

        // Right away, while the postmaster waits to restart the worker:
        // plain TCP connects and full logins, all on their own threads.
        let addr = SocketAddr::from(([127, 0, 0, 1], pg.port()));
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10));
        let logins: Vec<_> = (0..3)
            .map(|i| {
                let conn = pg.tcp(APP, DB);
                std::thread::spawn(move || -> Result<String, postgres::Error> {
                    let mut c = conn.connect()?;
                    let r = c.simple_query(&format!("SELECT {i}"))?;
                    Ok(first_value(&r).unwrap_or_default())
                })
            })
            .collect();
        let tcp = tcp.unwrap_or_else(|e| panic!("TCP connect refused while the pooler restarts: {e:?}"));
        // The connect above was made while no pooler ran only if none runs
        // now (the postmaster restarts the worker after 1 s). If a slow
        // machine missed that window, more SIGTERM rounds below retry it.
        let mut window_seen = pooler_pid(pg).is_none();
        if !window_seen {
            eprintln!("note: the new pooler was already up when the connects were made");
        }

        let new = new_pooler(pg, old, "after SIGTERM");
        // The idle client was told.
        let (severity, code, _) = idle.expect_fatal();
        assert_eq!(
            (severity.as_str(), code.as_str()),
            ("FATAL", "57P01"),
            "idle client"
        );
        // The client inside a transaction still has its backend and commits.
        // (Its backend cannot hand it back to a pooler that is gone, so the
        // connection ends after that; a raw client reads the COMMIT result
        // that precedes the close, which a driver may not report.)
        in_xact.query("COMMIT").unwrap_or_else(|e| {
            panic!("COMMIT of a transaction begun under the old pooler: {e:?}")
        });
        assert_eq!(row_value(pg), 1);
        // Then it is told as the idle one was (before, its connection
        // closed without a word: no pooler could take it back).
        let (severity, code, _) = in_xact.expect_fatal();
        assert_eq!(
            (severity.as_str(), code.as_str()),
            ("FATAL", "57P01"),
            "client whose transaction ended after the pooler did"
        );
        // Nothing of the old pooler lingers.
        assert!(
            wait_until(SETTLE, || old_backends
                .iter()
                .all(|&p| !session_exists(pg, p))),
            "backends of the old pooler linger: {:?} of {old_backends:?}",
            pg.activity()
        );
        assert!(idle_in_transaction(pg).is_empty(), "{:?}", pg.activity());
        // Last, as they need the new pooler to authenticate: the logins made
        // while no pooler ran, and a fresh one.
        for (i, h) in logins.into_iter().enumerate() {
            let r = with_timeout(SETTLE, "login made during the pooler restart", move || {
                h.join().expect("login thread")
            });
            assert_eq!(
                r.unwrap_or_else(|e| panic!("login {i} during the pooler restart: {e:?}")),
                i.to_string()
            );
        }

        // The TCP connection made right after the old pooler exited logs in.
        let mut early = Raw::login(tcp, APP, DB, SETTLE);
        assert_eq!(early.value("SELECT 'backlog'"), "backlog");
        drop(early);
        assert_pooler_serves(pg, new);

        // The window with no pooler must have been exercised: a connection
        // made while no pooler ran waits in the backlog and is served.
        let mut current = new;
        for round in 1..=4 {
            if window_seen {
                break;
            }
            // SAFETY: plain kill(2) on the pooler's pid from nextgres.status().
            assert_eq!(unsafe { libc::kill(current, libc::SIGTERM) }, 0);
            assert!(wait_until(SETTLE, || !process_alive(current)), "pooler {current} did not exit");
            let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("TCP connect refused while the pooler restarts: {e:?}"));
            window_seen = pooler_pid(pg).is_none();
            eprintln!("SIGTERM round {round}: no pooler after the connect: {window_seen}");
            let mut c = Raw::login(tcp, APP, DB, SETTLE);
            assert_eq!(c.value("SELECT 'backlog'"), "backlog");
            drop(c);
            current = new_pooler(pg, current, &format!("after SIGTERM round {round}"));
        }
        assert!(window_seen, "no connection was ever made while no pooler ran");

        // The catalog lookups are the agent's (pg_hba.conf, pg_authid): an
        // agent started while pg_internal.init exists must authenticate
        // too. The postmaster restarts a terminated agent, which forks a
        // new pooler; a fresh login goes through the new agent.
        terminate_agent(pg);
        let mut after_agent = None;
        assert!(
            wait_until(SETTLE * 2, || {
                after_agent = pooler_pid(pg).filter(|&p| p != current);
                after_agent.is_some()
            }),
            "no new pooler after the agent was terminated\n{}",
            pg.log_tail(30)
        );
        assert_pooler_serves(pg, after_agent.expect("new pooler"));
    });
}

/// Regression test (fixed in 82ed819, `linger_close`): when the pooler
/// ended a client that had unread input (a waiting client's query, which the
/// pooler leaves in the socket for the backend), it closed the socket with
/// that input unread, so the kernel sent a reset after the FATAL. Clients
/// that read everything still see the FATAL, but drivers that stop at the
/// socket error report "connection reset by peer" instead: rust-postgres did
/// so for the 57P01 of a fast stop. The connection must end with an
/// orderly close (FIN), as the server's own FATALs do.
#[test]
fn pooler_fatal_ends_with_orderly_close() {
    let builder = Cluster::builder()
        .conf("nextgres.pool_size = 1")
        .conf("nextgres.query_wait_timeout = 2");
    run(builder, |pg| {
        let pooler = running_pooler_pid(pg);
        let mut holder = connect(pg, APP);
        holder.batch_execute("BEGIN").expect("BEGIN");
        let mut waiter = raw(pg, APP);
        let end = expect_query_wait_timeout(pg, &mut waiter);
        holder.batch_execute("COMMIT").expect("COMMIT");
        assert_pooler_serves(pg, pooler);
        assert_eq!(
            end,
            io::ErrorKind::UnexpectedEof,
            "the connection ended with {end:?} after the FATAL, not an orderly close"
        );
    });
}

/// A query waiting for a backend (pool of one, held by A's open transaction)
/// is cancelled by its client's CancelRequest as the same query blocked by
/// A's lock is on a direct connection: 57014 "canceling statement due to
/// user request", the client usable afterwards, and the query never runs
/// (no row once A commits). Simple protocol (`simple_query`) and extended
/// (`execute` with a parameter: its Parse waits; and with a 300 kB one).
/// Before, the pooler
/// dropped a cancel for a client without a backend, and the INSERT ran once
/// A committed.
#[test]
fn cancel_of_a_query_waiting_for_a_backend_as_direct() {
    run(Cluster::builder().conf("nextgres.pool_size = 1"), |pg| {
        let pooler = running_pooler_pid(pg);
        pg.admin()
            .batch_execute("CREATE TABLE cancelled (v int); GRANT ALL ON cancelled TO app")
            .expect("table");
        let mut outcomes = Vec::new();
        // Extended with a 300 kB parameter too: more than the pooler's
        // first 64 kB look at the socket (it was dropped then, and ran).
        for (extended, big) in [(false, false), (true, false), (true, true)] {
            for pooled in [false, true] {
                let connect_to = || if pooled { connect(pg, APP) } else { pg.unix(APP, DB).connect().expect("direct") };
                let mut b = connect_to();
                assert_eq!(one(&mut b, "SELECT 'b in'"), "b in");
                let mut a = connect_to();
                a.batch_execute("BEGIN; LOCK TABLE cancelled").expect("A's lock");
                let token = b.cancel_token();
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let r = if big {
                        b.execute("INSERT INTO cancelled SELECT length($1::text)", &[&"x".repeat(300_000)]).map(|_| ())
                    } else if extended {
                        b.execute("INSERT INTO cancelled VALUES ($1)", &[&1i32]).map(|_| ())
                    } else {
                        b.simple_query("INSERT INTO cancelled VALUES (1)").map(|_| ())
                    };
                    let _ = tx.send((b, r));
                });
                let waits = || {
                    if pooled {
                        clients(pg).iter().any(|(_, state, _)| state == "waiting")
                    } else {
                        admin_i64(pg, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND wait_event_type = 'Lock'") == 1
                    }
                };
                assert!(wait_until(SETTLE, waits), "B does not wait (pooled: {pooled}): {:?}", clients(pg));
                token.cancel_query(NoTls).expect("sending the cancel");
                let (mut b, r) = wait_result(&rx, "B's cancelled INSERT");
                let outcome = match &r {
                    Err(e) => format!("{:?} {}", sqlstate(e), e.as_db_error().map(|d| d.message()).unwrap_or("")),
                    Ok(()) => "ran".to_string(),
                };
                a.batch_execute("COMMIT").expect("A's COMMIT");
                assert_eq!(one(&mut b, "SELECT 'b usable'"), "b usable", "pooled: {pooled}, extended: {extended}, big: {big}");
                let rows = admin_i64(pg, "SELECT count(*) FROM cancelled");
                eprintln!("extended {extended} big {big} pooled {pooled}: {outcome}, {rows} rows");
                outcomes.push(((extended, big, pooled), outcome, rows));
            }
        }
        for pair in outcomes.chunks(2) {
            assert_eq!((&pair[0].1, pair[0].2), (&pair[1].1, pair[1].2), "direct {:?} vs pooled {:?}", pair[0].0, pair[1].0);
            assert_eq!(pair[0].2, 0, "the cancelled INSERT ran");
        }
        assert_pooler_serves(pg, pooler);
    });
}

/// A CancelRequest that lands just as a backend frees up for the client's
/// waiting query (the pooler hands it over, the backend switches to the
/// client's session and reads the query) cancels that query, as it always
/// does directly, on both saturated paths (handoff, kernel queue). The
/// previous clients carry 300 settings, so their boundary takes long and
/// the window is wide. Before, the backend's attach cleared the signal as
/// the previous client's, or the server dropped it while reading the query:
/// 5-15% of these cancels were lost and the query ran to its end. The
/// client's next query is never hit by it, and the other clients' queries
/// never.
#[test]
fn a_cancel_as_the_query_meets_its_backend_is_not_lost() {
    for kq in ["off", "on"] {
        run(Cluster::builder().conf("nextgres.pool_size = 2").conf(&format!("nextgres.kernel_queue = {kq}")), move |pg| {
            let pooler = running_pooler_pid(pg);
            let heavy: String = (0..300).map(|j| format!("SET myapp.s{j} = '{}'; ", "v".repeat(200))).collect();
            let mut blockers: Vec<Client> = (0..2).map(|_| connect(pg, APP)).collect();
            let mut c = connect(pg, APP);
            let token = c.cancel_token();
            let mut lost = Vec::new();
            for i in 0..40u64 {
                let t0 = Instant::now();
                let (tx, rx) = std::sync::mpsc::channel();
                for (j, mut b) in blockers.drain(..).enumerate() {
                    let (tx, sql) = (tx.clone(), format!("{heavy}SELECT pg_sleep(0.2)"));
                    std::thread::spawn(move || {
                        let r = b.batch_execute(&sql);
                        let _ = tx.send((j, b, r));
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
                let (ctx, crx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let r = c.batch_execute("SELECT pg_sleep(2)");
                    let _ = ctx.send((c, r));
                });
                // Around the moment a blocker's backend frees up: -2 to +6 ms.
                let at = Duration::from_millis(198 + i % 9);
                std::thread::sleep(at.saturating_sub(t0.elapsed()));
                token.cancel_query(NoTls).expect("sending the cancel");
                let (back, r) = wait_result(&crx, "C's query");
                c = back;
                match &r {
                    Err(e) if sqlstate(e) == Some("57014") => {}
                    Err(e) => panic!("kernel_queue {kq}, trial {i}: C got {e}"),
                    Ok(()) => lost.push(i),
                }
                for _ in 0..2 {
                    let (j, b, r) = wait_result(&rx, "a blocker");
                    if let Err(e) = r {
                        panic!("kernel_queue {kq}, trial {i}: blocker {j} got {e}");
                    }
                    blockers.push(b);
                }
                assert_eq!(one(&mut c, "SELECT 'next'"), "next", "kernel_queue {kq}, trial {i}: C's next query");
            }
            assert!(lost.is_empty(), "kernel_queue {kq}: cancels lost (the query ran to its end) in trials {lost:?}");
            assert_pooler_serves(pg, pooler);
        });
    }
}

/// A CancelRequest for a client waiting for a backend with a Close in its
/// messages (tokio-postgres closes a dropped Statement with `Close; Sync`,
/// pgjdbc sends `Close; Parse; Bind; Execute; Sync`): the server carries a
/// Close out whatever the cancel, so the cycle is not answered as cancelled
/// at its start; it runs once a backend is free, the statement is closed
/// and its name can be prepared again. Before, the pooler answered 57014
/// and dropped the Close with the rest: the statement stayed, and the
/// client's next Parse of the name failed with 42P05.
#[test]
fn cancel_of_a_waiting_close_keeps_the_close() {
    run(Cluster::builder().conf("nextgres.pool_size = 1"), |pg| {
        use std::io::Write as _;
        let pooler = running_pooler_pid(pg);
        let frame = |tag: u8, body: &[u8]| {
            let mut m = vec![tag];
            m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        let sync = frame(b'S', b"");
        let parse = [frame(b'P', b"s9\0SELECT 9\0\0\0"), sync.clone()].concat();
        let mut c = raw(pg, APP);
        c.s.write_all(&parse).expect("Parse s9");
        c.until_ready().expect("s9 prepared");
        let (key_pid, key) = c.key.clone().expect("BackendKeyData");
        let mut a = connect(pg, APP);
        a.batch_execute("BEGIN; SELECT 1").expect("A holds the only backend");
        c.s.write_all(&[frame(b'C', b"Ss9\0"), sync.clone()].concat()).expect("Close s9");
        let port = c.local_port();
        assert!(
            wait_until(SETTLE, || clients(pg).iter().any(|(p, st, _)| *p == port && st == "waiting")),
            "the Close does not wait: {:?}",
            clients(pg)
        );
        let mut cancel = TcpStream::connect(("127.0.0.1", pg.port())).expect("cancel connection");
        let mut pkt = Vec::new();
        pkt.extend_from_slice(&((12 + key.len()) as i32).to_be_bytes());
        pkt.extend_from_slice(&80877102i32.to_be_bytes());
        pkt.extend_from_slice(&key_pid.to_be_bytes());
        pkt.extend_from_slice(&key);
        cancel.write_all(&pkt).expect("CancelRequest");
        // The pooler has read the cancel once it closed that connection.
        let mut end = [0u8; 1];
        let _ = std::io::Read::read(&mut cancel, &mut end);
        a.batch_execute("COMMIT").expect("A commits");
        let r = c.until_ready();
        assert!(r.is_ok(), "the Close: {r:?}");
        c.s.write_all(&parse).expect("Parse s9 again");
        let r = c.until_ready();
        assert!(r.is_ok(), "s9 prepared again after its Close: {r:?}");
        assert_pooler_serves(pg, pooler);
    });
}

/// A CancelRequest reaches its query also when the pooler takes no more
/// connections: with `max_client_conn` 2 both taken (one running
/// `pg_sleep(20)`), and during a smart shutdown that this very query keeps
/// waiting. The postmaster carries a cancel out before it checks whether
/// it can accept a connection; the pooler now reads a refused connection's
/// first packet before refusing it (failed before: the cancel connection
/// got FATAL 53300 / 57P03 and the query ran its 20 s). A refused login
/// still gets the refusal, also after an SSLRequest (libpq's
/// `sslmode=prefer`), which is answered 'N' first as the server answers it:
/// psql shows the refusal, and `pg_isready` tells "accepting" (53300) and
/// "rejecting" (57P03) as against the server (before: an ErrorResponse to
/// the SSLRequest, "server sent an error response during SSL exchange",
/// and "no response").
#[test]
fn cancel_reaches_its_query_when_connections_are_refused() {
    run(Cluster::builder().conf("nextgres.max_client_conn = 2"), |pg| {
        let pooler = running_pooler_pid(pg);
        let sleeping = || {
            admin_i64(pg, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND state = 'active' AND query = 'SELECT pg_sleep(20)'")
                == 1
        };
        let cancelled = |rx: &std::sync::mpsc::Receiver<(Client, QueryResult)>, what: &str| {
            let (c, r) = wait_result(rx, what);
            let e = r.expect_err(&format!("{what}: not cancelled"));
            assert_eq!(sqlstate(&e), Some("57014"), "{what}: {e:?}");
            c
        };
        // Full: the cancel connection is a third.
        let a = connect(pg, APP);
        let mut b = connect(pg, APP);
        let Err(e) = pg.connect_tcp(APP, DB, None) else { panic!("a third client was served") };
        assert_eq!(sqlstate(&e), Some("53300"), "{e:?}");
        let prefer = |want: &str| {
            let conn = pg.tcp(APP, DB);
            let out = pg.psql(&conn, &["-d", &format!("{} sslmode=prefer", conn.conninfo()), "-c", "SELECT 1"]);
            assert!(!out.success() && out.stderr.contains(want), "sslmode=prefer: {}", out.stderr);
        };
        prefer("FATAL:  sorry, too many clients already");
        assert_eq!(pg.pg_isready(&pg.tcp(APP, DB)), Some(0), "pg_isready at max_client_conn");
        let token = a.cancel_token();
        let rx = spawn_query(a, "SELECT pg_sleep(20)");
        assert!(wait_until(SETTLE, sleeping), "pg_sleep never started");
        token.cancel_query(NoTls).expect("sending the cancel");
        let mut a = cancelled(&rx, "pg_sleep(20) at max_client_conn");
        assert_eq!(one(&mut a, "SELECT 'a usable'"), "a usable");
        assert_eq!(one(&mut b, "SELECT 'b usable'"), "b usable");
        drop(b);
        // A smart shutdown waits for the client whose query runs.
        let rx = spawn_query(a, "SELECT pg_sleep(20)");
        assert!(wait_until(SETTLE, sleeping), "pg_sleep never started");
        let mark = pg.log_mark();
        assert!(!pg.stop_timeout(StopMode::Smart, Duration::from_secs(2)), "smart stop finished while a query ran");
        assert!(
            wait_until(SETTLE, || pg.log_since(mark).contains("received smart shutdown request")),
            "no smart shutdown request logged"
        );
        let Err(e) = pg.connect_tcp(APP, DB, None) else { panic!("a login during the smart shutdown was served") };
        assert_eq!(sqlstate(&e), Some("57P03"), "{e:?}");
        prefer("FATAL:  the database system is shutting down");
        assert_eq!(pg.pg_isready(&pg.tcp(APP, DB)), Some(1), "pg_isready during a smart shutdown");
        token.cancel_query(NoTls).expect("sending the cancel");
        let a = cancelled(&rx, "pg_sleep(20) during a smart shutdown");
        drop(a);
        assert!(pg.stop_timeout(StopMode::Smart, SETTLE), "smart stop did not finish after the client left");
        pg.start().expect("start after the smart stop");
        let new = running_pooler_pid(pg);
        assert_ne!(new, pooler);
        assert_pooler_serves(pg, new);
    });
}

/// The statistics a pooled transaction leaves pending reach the shared
/// statistics while its backend is parked, as a direct session's do while
/// it sits idle: two INSERTs within a second (the server does not flush
/// more often than once a second, keeps the counts pending and flushes them
/// from its idle timer, 10 s: pgstat.c PGSTAT_IDLE_INTERVAL), then
/// `pg_stat_user_tables.n_tup_ins` read from another session shows both
/// (measured: after 10.0 s). Before, a parked backend never flushed them
/// (the server does only while it reads a command): 0 of 2000 after 30 s,
/// until its next client.
#[test]
fn statistics_of_a_parked_backend_are_flushed() {
    run(Cluster::builder().conf("nextgres.pool_size = 1"), |pg| {
        pg.admin().batch_execute("CREATE TABLE counted (v int); GRANT ALL ON counted TO app").expect("table");
        let mut a = connect(pg, APP);
        a.batch_execute("INSERT INTO counted SELECT generate_series(1, 1000)").expect("first INSERT");
        a.batch_execute("INSERT INTO counted SELECT generate_series(1, 1000)").expect("second INSERT");
        let inserted = || admin_i64(pg, "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'counted'");
        let t0 = Instant::now();
        let flushed = wait_until(Duration::from_secs(30), || inserted() == 2000);
        assert!(flushed, "n_tup_ins {} of 2000 while the backend is parked", inserted());
        eprintln!("flushed after {:?}", t0.elapsed());
        drop(a);
    });
}

/// The server's `tcp_keepalives_*` and `tcp_user_timeout` apply to a pooled
/// client's TCP connection as to a direct one (the postmaster sets them on
/// each connection it accepts; the pool's backends log in over the Unix
/// socket, where the server skips them): `SHOW` through the pooler reads
/// the socket's values, the same as a server without nextgres shows over
/// TCP. Before: 7200 / 75 / 9 / 0, the kernel's defaults.
#[test]
fn server_tcp_keepalive_settings_reach_pooled_clients() {
    let conf = |b: nextgres_test::Builder| {
        b.conf("tcp_keepalives_idle = 61").conf("tcp_keepalives_interval = 7").conf("tcp_keepalives_count = 4").conf("tcp_user_timeout = 9000")
    };
    const SHOWN: &str = "SELECT concat_ws(' ', current_setting('tcp_keepalives_idle'), current_setting('tcp_keepalives_interval'),
                current_setting('tcp_keepalives_count'), current_setting('tcp_user_timeout'))";
    // The server alone, over TCP: the specification.
    let plain = conf(Cluster::builder().preload(false)).start();
    plain.admin().batch_execute("CREATE ROLE app LOGIN").expect("role");
    let want = one(&mut plain.connect_tcp(APP, DB, None).expect("direct TCP"), SHOWN);
    drop(plain);
    assert!(want.starts_with("61 7 4 "), "the plain server shows {want}");
    run(conf(Cluster::builder()), move |pg| {
        let mut c = connect(pg, APP);
        assert_eq!(one(&mut c, SHOWN), want, "through the pooler");
    });
}
