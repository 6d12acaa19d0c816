//! The kernel queue (issue 15; `nextgres.kernel_queue`, on by default,
//! `pooler::kq`): a saturated pool's idle clients wait in an epoll set of
//! the pool's, and backends lent to it take them from it and put them back
//! at each ReadyForQuery(I), without the pooler.
//!
//! Each test runs a pool of 2 backends that more clients keep saturated,
//! asserts that `nextgres.pools.kernel_queue_transactions` grew (the path
//! under test ran) and exact outcomes: every client keeps its own session
//! (settings, prepared statements, temp table) whichever backend serves it;
//! a cancel reaches the query it was meant for; clients that vanish or
//! leave while queued leave nothing behind; pause and kill apply to queued
//! clients too. With the setting off the `kernel_queue_transactions`
//! assertions fail: these tests cannot pass on the handoff path.
//!
//! ```sh
//! NEXTGRES_PG=17 cargo test -p nextgres-test --test kernel_queue -- --test-threads=2
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nextgres_test::{wait_until, Cluster};
use tokio_postgres::types::Type;

mod fault_support;
use fault_support::*;

fn builder() -> nextgres_test::cluster::Builder {
    Cluster::builder()
        .conf("nextgres.kernel_queue = on")
        .conf("nextgres.pool_size = 2")
        .max_connections(20)
}

/// `nextgres.pools.kernel_queue_transactions` of APP's pool.
fn queue_xacts(pg: &Cluster) -> i64 {
    admin_i64(
        pg,
        "SELECT coalesce(sum(kernel_queue_transactions), 0)::int8 FROM nextgres.pools WHERE role = 'app'",
    )
}

#[track_caller]
fn assert_queue_ran(pg: &Cluster, before: i64, what: &str) {
    // The pooler copies the counters to nextgres.pools at its next look
    // (a janitor tick at the latest).
    let ran = wait_until(Duration::from_secs(5), || queue_xacts(pg) > before);
    assert!(
        ran,
        "{what}: nextgres.pools.kernel_queue_transactions stayed {before}: no client was served through the kernel queue\n{}",
        pg.log_tail(30)
    );
}

/// `n` session workers of `xacts` transactions each, on their own runtime,
/// until `stop`.
struct Workers {
    rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<i32, String>>>,
}

impl Workers {
    fn start(pg: &Cluster, n: i32, xacts: i32) -> Workers {
        let rt = runtime();
        let stop = Arc::new(AtomicBool::new(false));
        let port = pg.port();
        let tasks = (0..n).map(|id| rt.spawn(session_worker(port, id, xacts, stop.clone()))).collect();
        Workers { rt, stop, tasks }
    }

    /// Stops them (after their current transaction) and returns how each
    /// ended, in id order.
    fn finish(self) -> Vec<Result<i32, String>> {
        self.stop.store(true, Ordering::SeqCst);
        let ends = self.tasks.into_iter().map(|t| self.rt.block_on(t).expect("worker panicked")).collect();
        drop(self.rt);
        ends
    }

    /// Lets them run all their transactions, then as `finish`.
    fn join(self) -> Vec<Result<i32, String>> {
        let ends = self.tasks.into_iter().map(|t| self.rt.block_on(t).expect("worker panicked")).collect();
        drop(self.rt);
        ends
    }
}

async fn bounded<T>(what: String, f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T, String> {
    match tokio::time::timeout(SETTLE, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e:?}")),
        Err(_) => Err(format!("{what}: no answer within {SETTLE:?}")),
    }
}

async fn simple_value(c: &tokio_postgres::Client, sql: &str) -> Result<String, String> {
    let msgs = bounded(sql.to_string(), c.simple_query(sql)).await?;
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .ok_or_else(|| format!("{sql}: no value"))
}

/// A worker with a session of its own: a setting, a named prepared
/// statement (SQL PREPARE) and a protocol-level one, checked at each of
/// `xacts` transactions, each inserting (id, k) into `work`. Returns the
/// first thing that went wrong.
async fn session_worker(port: u16, id: i32, xacts: i32, stop: Arc<AtomicBool>) -> Result<i32, String> {
    let c = login(port).await?;
    bounded("SET".into(), c.batch_execute(&format!("SET application_name = 'w{id}'; PREPARE p AS SELECT $1::int + {id}"))).await?;
    let st = bounded("Parse".into(), c.prepare_typed("SELECT $1::int >= 0 AND current_setting('application_name') = 'w' || $2::text", &[Type::INT4, Type::TEXT])).await?;
    let mut done = 0;
    for k in 0..xacts {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        match k % 3 {
            0 => {
                let got = simple_value(&c, &format!("EXECUTE p({k})")).await?;
                if got != (k + id).to_string() {
                    return Err(format!("worker {id}: EXECUTE p({k}) gave {got}, another session's statement"));
                }
            }
            1 => {
                let name = simple_value(&c, "SHOW application_name").await?;
                if name != format!("w{id}") {
                    return Err(format!("worker {id}: application_name is {name}: another session's setting"));
                }
            }
            _ => {
                let row = bounded("EXECUTE st".into(), c.query_one(&st, &[&k, &id.to_string()])).await?;
                if !row.get::<_, bool>(0) {
                    return Err(format!("worker {id}: the protocol-level statement saw another session's setting"));
                }
            }
        }
        bounded(
            "INSERT".into(),
            c.batch_execute(&format!("BEGIN; INSERT INTO work VALUES ({id}, {k}); COMMIT")),
        )
        .await?;
        done += 1;
    }
    Ok(done)
}

fn create_work(pg: &Cluster) {
    pg.admin()
        .batch_execute("CREATE TABLE work (client int NOT NULL, k int NOT NULL); GRANT SELECT, INSERT ON work TO app;")
        .expect("work table");
}

/// (rows, distinct k) in `work` for each client.
fn work_rows(pg: &Cluster) -> std::collections::HashMap<i32, (i64, i64)> {
    pg.admin()
        .query("SELECT client, count(*), count(DISTINCT k) FROM work GROUP BY client", &[])
        .expect("reading work")
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

#[track_caller]
fn assert_left_nothing(pg: &Cluster, pooler: i32) {
    let settled = wait_until(SETTLE, || clients(pg).is_empty() && idle_in_transaction(pg).is_empty());
    assert!(
        settled,
        "left behind: clients {:?}, idle in transaction {:?}\n{}",
        clients(pg),
        idle_in_transaction(pg),
        pg.log_tail(30)
    );
    assert_pooler_serves(pg, pooler);
}

/// Six workers keep APP's pool saturated (until stopped), served through
/// the queue: (the pooler's pid, the workers).
fn saturated(pg: &Cluster) -> (i32, Workers) {
    create_work(pg);
    let pooler = running_pooler_pid(pg);
    let before = queue_xacts(pg);
    let workers = Workers::start(pg, 6, 100_000);
    assert_queue_ran(pg, before, "six saturating workers");
    (pooler, workers)
}

const WORKERS: i32 = 12;
const XACTS: i32 = 60;

/// 12 clients over 2 backends, each with its own setting and prepared
/// statements, 60 transactions each: every client sees only its own
/// session whichever backend took it from the queue, every row is there
/// once, and the queue served them.
#[test]
fn queued_clients_keep_their_sessions() {
    run(builder(), |pg| {
        create_work(pg);
        let pooler = running_pooler_pid(pg);
        let before = queue_xacts(pg);
        for (id, r) in Workers::start(pg, WORKERS, XACTS).join().into_iter().enumerate() {
            assert_eq!(r, Ok(XACTS), "worker {id}\n{}", pg.log_tail(30));
        }
        let rows = work_rows(pg);
        for id in 0..WORKERS {
            assert_eq!(rows.get(&id), Some(&(XACTS as i64, XACTS as i64)), "worker {id}'s rows");
        }
        assert_queue_ran(pg, before, "12 clients over 2 backends");
        assert_left_nothing(pg, pooler);
    });
}

/// Background workers keep the pool saturated while one client's
/// `pg_sleep` runs on a backend that took it from the queue: its cancel
/// ends that query (57014) and nothing else; the client goes on.
#[test]
fn a_cancel_reaches_the_queued_clients_query() {
    run(builder(), |pg| {
        let (pooler, workers) = saturated(pg);
        let mut c = connect(pg, APP);
        assert_eq!(one(&mut c, "SELECT 1"), "1");
        let token = c.cancel_token();
        let rx = spawn_query(c, "SELECT pg_sleep(60)");
        let started = wait_until(SETTLE, || {
            admin_i64(pg, "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'") == 1
        });
        assert!(started, "the sleep never ran\n{}", pg.log_tail(30));
        token.cancel_query(postgres::NoTls).expect("cancel request");
        let (mut c, r) = wait_result(&rx, "the cancelled sleep");
        let e = r.expect_err("pg_sleep(60) was not cancelled");
        assert_eq!(sqlstate(&e), Some("57014"), "{e:?}");
        assert_eq!(one(&mut c, "SELECT 2"), "2", "the client goes on after its cancel");
        for (id, r) in workers.finish().into_iter().enumerate() {
            assert!(r.is_ok(), "worker {id}: {r:?} (a cancel reached another client?)");
        }
        drop(c);
        assert_left_nothing(pg, pooler);
    });
}

/// While workers keep the pool saturated, raw clients leave while queued:
/// a query sent then the connection closed (its result unread), or a
/// Terminate right after a transaction. The workers are undisturbed and
/// nothing is left behind.
#[test]
fn clients_leaving_while_queued_leave_nothing() {
    run(builder(), |pg| {
        create_work(pg);
        let pooler = running_pooler_pid(pg);
        let before = queue_xacts(pg);
        let workers = Workers::start(pg, 6, 200);
        for round in 0..20 {
            let mut r = raw(pg, APP);
            r.query("SELECT 1").unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            if round % 2 == 0 {
                r.send_query("SELECT pg_sleep(0.01)");
                r.vanish(); // FIN with a query unanswered
            } else {
                r.send_terminate();
            }
        }
        for (id, r) in workers.join().into_iter().enumerate() {
            assert_eq!(r, Ok(200), "worker {id}\n{}", pg.log_tail(30));
        }
        assert_queue_ran(pg, before, "workers and leaving clients");
        assert_left_nothing(pg, pooler);
    });
}

/// Six workers saturate the pool (`saturated`) and one more client runs
/// five transactions, so it waits in the queue between them, then pins its
/// session with a temp table `mine`: (pooler pid, workers, that client, its
/// address and port as `nextgres.clients` shows them).
fn pinned_queued_client(pg: &Cluster) -> (i32, Workers, postgres::Client, (String, i32)) {
    let (pooler, workers) = saturated(pg);
    // All six listed first (one may still be logging in), so the one new
    // row below is this client's.
    let listed = wait_until(SETTLE, || client_ports(pg, APP).len() == 6);
    assert!(listed, "the six workers in nextgres.clients: {:?}", client_ports(pg, APP));
    let before = client_ports(pg, APP);
    let mut c = connect(pg, APP);
    let new: Vec<_> = client_ports(pg, APP).into_iter().filter(|p| !before.contains(p)).collect();
    assert_eq!(new.len(), 1, "the new client in nextgres.clients: {new:?}");
    for _ in 0..5 {
        assert_eq!(one(&mut c, "SELECT 1"), "1");
    }
    c.batch_execute("CREATE TEMP TABLE mine (x int)").expect("temp table");
    (pooler, workers, c, new[0].clone())
}

/// `n` rows into the client's temp table `mine`, each counted after it went
/// in: the client's statements all reach the backend that holds its table.
#[track_caller]
fn fill_mine(pg: &Cluster, c: &mut postgres::Client, n: i32, what: &str) {
    for i in 1..=n {
        c.batch_execute("INSERT INTO mine VALUES (1)").unwrap_or_else(|e| panic!("{what}: insert {i}: {e:?}\n{}", pg.log_tail(30)));
        assert_eq!(one(c, "SELECT count(*) FROM mine"), i.to_string(), "{what}");
    }
}

/// The workers all finished cleanly, and once `c` left nothing is left.
#[track_caller]
fn finish_clean(pg: &Cluster, pooler: i32, workers: Workers, c: postgres::Client) {
    for (id, r) in workers.finish().into_iter().enumerate() {
        assert!(r.is_ok(), "worker {id}: {r:?}");
    }
    drop(c);
    assert_left_nothing(pg, pooler);
}

/// Builder for the tests of the window in which a backend has given a
/// client back in shared memory but not yet told the pooler: the developer
/// option `nextgres.debug_return_delay` holds it open for a second.
fn return_window_builder() -> nextgres_test::cluster::Builder {
    builder().conf("nextgres.max_pinned_backends = 2").conf("nextgres.debug_return_delay = 1000")
}

/// Fails unless `t` is well inside that second: an operation applied
/// after the backend's message proves nothing.
#[track_caller]
fn assert_in_window(t: std::time::Instant, what: &str) {
    assert!(t.elapsed() < Duration::from_millis(800), "{what} took {:?}: past the window", t.elapsed());
}

/// A client served from the queue creates a temp table: its session is
/// pinned, so the backend keeps it (the pooler's dedicated session for it)
/// and every later transaction sees its table; the other clients go on
/// through the queue.
#[test]
fn a_pinned_session_stays_with_its_backend() {
    run(builder().conf("nextgres.max_pinned_backends = 2"), |pg| {
        let (pooler, workers, mut c, _) = pinned_queued_client(pg);
        fill_mine(pg, &mut c, 20, "pinned");
        finish_clean(pg, pooler, workers, c);
    });
}

/// A backend that keeps its client (a temp table pins the session) first
/// marks it given back in shared memory, then tells the pooler, and goes on
/// serving it. An operation in that window takes every queued client back
/// (here `reset_stats()`, the mildest): it must leave this one to its
/// backend until the message is read. Before, the pooler made it its own
/// at once and read its next statement too, which then ran on another
/// backend without the table (42P01).
#[test]
fn a_client_its_backend_keeps_is_not_taken_back_before_it_says_so() {
    run(return_window_builder(), |pg| {
        let (pooler, workers, mut c, _) = pinned_queued_client(pg);
        let t = std::time::Instant::now();
        pg.admin().batch_execute("SELECT nextgres.reset_stats()").expect("reset_stats");
        assert_in_window(t, "reset_stats");
        fill_mine(pg, &mut c, 5, "after the take-back");
        finish_clean(pg, pooler, workers, c);
    });
}

/// `kill_client()` of a client in that same window (given back, its
/// backend's message unread): the backend keeps the client, so the kill
/// terminates that backend once the message says so, as for any attached
/// client; the client gets 57P01, the workers go on. Before, the kill was
/// lost: it found no backend serving the client, asked the pooler to
/// close it when given back, and the message then said "kept".
#[test]
fn a_kill_in_that_window_reaches_the_kept_client() {
    run(return_window_builder(), |pg| {
        let (pooler, workers, mut c, (addr, port)) = pinned_queued_client(pg);
        let t = std::time::Instant::now();
        let found: bool = pg
            .admin()
            .query_one("SELECT nextgres.kill_client($1, $2)", &[&addr, &port])
            .expect("kill_client")
            .get(0);
        assert!(found, "kill_client did not find the client");
        assert_in_window(t, "kill_client");
        // The backend may answer a query already in the socket before the
        // SIGTERM lands (as after pg_terminate_backend on a direct
        // session); the session must end soon after, not go on.
        let mut end = None;
        let ended = wait_until(SETTLE, || match c.simple_query("SELECT 1") {
            Ok(_) => false,
            Err(e) => {
                end = Some(e);
                true
            }
        });
        assert!(ended, "the killed client went on for {SETTLE:?}\n{}", pg.log_tail(30));
        let e = end.expect("set with ended");
        assert!(
            sqlstate(&e) == Some("57P01") || e.is_closed() || e.to_string().contains("closed"),
            "the killed client: {e:?}"
        );
        finish_clean(pg, pooler, workers, c);
    });
}

/// `nextgres.pause()` while clients are queued: none runs a transaction
/// until `resume()`, then all go on; `kill_clients()` ends every client of
/// the pool, queued or served, with 57P01.
#[test]
fn pause_resume_and_kill_reach_queued_clients() {
    run(builder(), |pg| {
        let (pooler, workers) = saturated(pg);
        pg.admin().batch_execute("SELECT nextgres.pause('postgres')").expect("pause");
        std::thread::sleep(Duration::from_millis(500));
        let count = |pg: &Cluster| admin_i64(pg, "SELECT count(*) FROM work");
        let paused_at = count(pg);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(count(pg), paused_at, "transactions ran while the pool was paused");
        pg.admin().batch_execute("SELECT nextgres.resume('postgres')").expect("resume");
        let resumed = wait_until(SETTLE, || count(pg) > paused_at + 20);
        assert!(resumed, "the workers did not go on after resume\n{}", pg.log_tail(30));
        pg.admin().batch_execute("SELECT nextgres.kill_clients('postgres')").expect("kill");
        for (id, r) in workers.join().into_iter().enumerate() {
            let e = r.expect_err("a worker outlived kill_clients");
            // The FATAL reaches a client between two queries as the end of
            // its connection (tokio-postgres: kind Closed).
            assert!(e.contains("AdminShutdown") || e.contains("57P01") || e.contains("Closed"), "worker {id}: {e}");
        }
        assert_left_nothing(pg, pooler);
    });
}

/// What a DBA sees and what bounds a wait, for queued clients (the pooler
/// is not told when their queries arrive). Pool of 1: a holder served from
/// the queue inside a transaction shows as `active` on its backend, which
/// shows as `attached` to it (not some `lent` state); a second client's
/// query waits in the queue, shows as `waiting` within a tick, and a cancel
/// answers it 57014 without running it (as for a client waiting the
/// pooler's way); a third one's fails with FATAL 53400 once
/// `query_wait_timeout` (2 s) has passed, no sooner. Once its clients have
/// left, the backend shows as `parked` while it waits on the queue.
#[test]
fn queued_clients_are_listed_and_their_waits_bounded() {
    let b = builder().conf("nextgres.pool_size = 1").conf("nextgres.query_wait_timeout = 2");
    run(b, |pg| {
        let pooler = running_pooler_pid(pg);
        pg.admin().batch_execute("CREATE TABLE queued_cancel (v int); GRANT ALL ON queued_cancel TO app").expect("table");
        let before = queue_xacts(pg);
        let mut holder = connect(pg, APP);
        assert_eq!(one(&mut holder, "SELECT 1"), "1");
        holder.batch_execute("BEGIN").expect("BEGIN");
        let backend: i32 = one(&mut holder, "SELECT pg_backend_pid()").parse().expect("pid");
        assert_queue_ran(pg, before, "the holder's transactions");
        let shown = || {
            let listed = clients(pg).into_iter().any(|(_, state, pid)| state == "active" && pid == Some(backend));
            listed && pooled(pg) == vec![(backend, "attached".to_string())]
        };
        assert!(wait_until(SETTLE, shown), "holder not listed as served: clients {:?}, backends {:?}", clients(pg), pooled(pg));

        // A waiting query, cancelled.
        let waiter = connect(pg, APP);
        assert!(wait_until(SETTLE, || clients(pg).iter().all(|(_, s, _)| s != "waiting")), "{:?}", clients(pg));
        let token = waiter.cancel_token();
        let rx = spawn_query(waiter, "INSERT INTO queued_cancel VALUES (1)");
        let waits = || clients(pg).iter().filter(|(_, s, _)| s == "waiting").count() == 1;
        assert!(wait_until(SETTLE, waits), "the queued query never showed as waiting: {:?}", clients(pg));
        token.cancel_query(postgres::NoTls).expect("cancel request");
        let (mut waiter, r) = wait_result(&rx, "the cancelled waiting INSERT");
        let e = r.expect_err("the waiting INSERT was not cancelled");
        assert_eq!(
            (sqlstate(&e), e.as_db_error().map(|d| d.message())),
            (Some("57014"), Some("canceling statement due to user request")),
            "{e:?}"
        );

        // A waiting query past query_wait_timeout.
        let mut late = raw(pg, APP);
        let port = late.local_port();
        let t0 = std::time::Instant::now();
        late.send_query("SELECT 1");
        let (severity, code, _) = late.expect_fatal();
        assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "53400"));
        assert!(t0.elapsed() >= Duration::from_secs(2), "53400 after {:?}, before query_wait_timeout", t0.elapsed());
        // The server log says so, with what the pool's backend was doing
        // (the one backend attached to the holder, whose transaction is open).
        let note = "nextgres: 1 client of role \"app\" for database \"postgres\" waited out nextgres.query_wait_timeout (2s): pool_size 1; backends 0 starting, ";
        assert!(wait_until(SETTLE, || pg.log().contains(note)), "no log line {note:?}\n{}", pg.log_tail(20));
        assert!(wait_until(SETTLE, || clients(pg).iter().all(|c| c.0 != port)), "{:?}", clients(pg));

        holder.batch_execute("COMMIT").expect("COMMIT");
        assert_eq!(one(&mut waiter, "SELECT 'after'"), "after", "the cancelled client goes on");
        assert_eq!(admin_i64(pg, "SELECT count(*) FROM queued_cancel"), 0, "the cancelled INSERT ran");
        // The backend may keep its last client idle (hold_idle_clients):
        // with both gone it waits on the queue alone.
        drop((holder, waiter));
        assert!(
            wait_until(SETTLE, || pooled(pg) == vec![(backend, "parked".to_string())]),
            "the idle lent backend is not listed as parked: {:?}",
            pooled(pg)
        );
        assert_left_nothing(pg, pooler);
    });
}

/// `hold_idle_clients` (on by default) with the queue. Pool of 1: a client
/// alone keeps the backend that took it from the queue between its
/// transactions (the same pid, each transaction counted in
/// `kernel_queue_transactions`, the backend listed `attached` to it while
/// it is idle); a second client's query is taken from the queue by that
/// same backend, which gives the kept one back (counted too, so it was not
/// served by a recall through the pooler); the first client's next query
/// is taken back the same way; `kill_clients` reaches a kept client.
#[test]
fn an_idle_queued_client_keeps_its_backend_until_another_is_ready() {
    let b = builder().conf("nextgres.pool_size = 1").conf("nextgres.hold_idle_clients = on");
    run(b, |pg| {
        let pooler = running_pooler_pid(pg);
        let mut first = connect(pg, APP);
        let pid = one(&mut first, "SELECT pg_backend_pid()");
        first.batch_execute("PREPARE kept AS SELECT 'mine'").expect("PREPARE");
        // The pooler copies the counters once a tick: these two are in.
        std::thread::sleep(Duration::from_millis(1500));
        let before = queue_xacts(pg);
        for _ in 0..20 {
            assert_eq!(one(&mut first, "SELECT pg_backend_pid()"), pid, "the lone client changed backends");
        }
        let counted = |n: i64| wait_until(Duration::from_secs(5), move || queue_xacts(pg) >= before + n);
        assert!(counted(20), "the kept client's transactions were not counted: {} -> {}", before, queue_xacts(pg));
        let backend: i32 = pid.parse().expect("pid");
        let attached = || pooled(pg) == vec![(backend, "attached".to_string())];
        assert!(wait_until(SETTLE, attached), "the backend keeping an idle client is not listed attached: {:?}", pooled(pg));

        let mut second = connect(pg, APP);
        assert_eq!(one(&mut second, "SELECT pg_backend_pid()"), pid, "pool of 1: the second client's backend");
        assert!(counted(21), "the second client was not served from the queue (a recall?): {} -> {}", before, queue_xacts(pg));
        assert_eq!(one(&mut first, "EXECUTE kept"), "mine", "the first client's prepared statement");
        assert_eq!(one(&mut second, "SELECT 'second again'"), "second again");
        assert!(counted(23), "the clients' turns were not served from the queue: {} -> {}", before, queue_xacts(pg));

        pg.admin().batch_execute("SELECT nextgres.kill_clients('postgres')").expect("kill");
        for (name, c) in [("first", &mut first), ("second", &mut second)] {
            let e = c.simple_query("SELECT 1").expect_err(name);
            assert!(
                e.is_closed() || sqlstate(&e) == Some("57P01") || e.to_string().contains("closed"),
                "{name}: {e:?}"
            );
        }
        drop((first, second));
        assert_left_nothing(pg, pooler);
    });
}

/// While a pool's clients do not outnumber its backends, a backend keeping
/// an idle client leaves clients of the queue to the free backends: taking
/// one would send its own client to the queue, to be taken in turn by
/// another backend keeping one, and so on (clients going round the
/// backends, a session switch each time, for as long as the load lasts).
/// Pool of 2, both logged in (`min_pool_size`): a is kept by one backend;
/// b comes, and its queries go to the other backend, while a stays where
/// it is; ten times, b leaving and coming again. Before, both backends were
/// woken for b's first query and either could take it: a moved with a
/// chance of about one in two each time.
#[test]
fn a_kept_client_stays_while_backends_are_enough() {
    let b = builder()
        .conf("nextgres.pool_size = 2")
        .conf("nextgres.min_pool_size = 2")
        .conf("nextgres.hold_idle_clients = on");
    run(b, |pg| {
        let pooler = running_pooler_pid(pg);
        let two = || pooled(pg).len() == 2;
        let mut a = connect(pg, APP);
        assert!(wait_until(SETTLE, two), "the pool did not log in 2 backends: {:?}", pooled(pg));
        let kept = one(&mut a, "SELECT pg_backend_pid()");
        let backend: i32 = kept.parse().expect("pid");
        let a_attached = || pooled(pg).contains(&(backend, "attached".to_string()));
        assert!(wait_until(SETTLE, a_attached), "a is not kept: {:?}", pooled(pg));
        let before = queue_xacts(pg);
        for round in 0..10 {
            let mut b = connect(pg, APP);
            for _ in 0..3 {
                let b_pid = one(&mut b, "SELECT pg_backend_pid()");
                assert_ne!(b_pid, kept, "round {round}: b was served by the backend keeping a");
                assert_eq!(one(&mut a, "SELECT pg_backend_pid()"), kept, "round {round}: a left its backend for b's sake");
            }
            drop(b);
            let alone = || {
                admin_i64(
                    pg,
                    "SELECT coalesce(sum(clients_idle + clients_active + clients_waiting), 0)::int8
                       FROM nextgres.pools WHERE role = 'app'",
                ) == 1
            };
            assert!(wait_until(SETTLE, alone), "round {round}: b is still counted");
        }
        assert_queue_ran(pg, before, "a and b");
        drop(a);
        assert_left_nothing(pg, pooler);
    });
}

/// A saturated queue keeps no idle client (`hold_idle_clients`, as the
/// handoff path's `linger`): kept, a client's next query would be served
/// before clients queued earlier. Pool of 1, two clients: b's query waits
/// in the queue behind a's `pg_sleep`, so the backend takes it at a's
/// boundary (b waited for a backend), and after b's statement it keeps
/// neither and waits on the queue (listed parked). Past the 100 ms window a
/// statement of a's, taken by an idle backend (no wait), leaves a kept
/// again.
#[test]
fn a_queue_that_just_saturated_keeps_no_idle_client() {
    let b = builder().conf("nextgres.pool_size = 1").conf("nextgres.hold_idle_clients = on");
    run(b, |pg| {
        let pooler = running_pooler_pid(pg);
        let mut a = connect(pg, APP);
        let backend: i32 = one(&mut a, "SELECT pg_backend_pid()").parse().expect("pid");
        let is = |state: &'static str| move || pooled(pg) == vec![(backend, state.to_string())];
        assert!(wait_until(SETTLE, is("attached")), "a alone is not kept: {:?}", pooled(pg));
        let mut b = connect(pg, APP);
        let clients = || {
            admin_i64(
                pg,
                "SELECT coalesce(sum(clients_idle + clients_active + clients_waiting), 0)::int8
                   FROM nextgres.pools WHERE role = 'app'",
            )
        };
        assert!(wait_until(SETTLE, || clients() == 2), "the pool does not count 2 clients: {}", clients());
        let (a_back, b_pid) = std::thread::scope(|s| {
            let sleeper = s.spawn(move || {
                a.batch_execute("SELECT pg_sleep(0.4)").expect("a's sleep");
                a
            });
            // Sent while a's statement runs: b's query waits in the queue.
            std::thread::sleep(Duration::from_millis(150));
            let b_pid = one(&mut b, "SELECT pg_backend_pid()");
            (sleeper.join().expect("a's thread"), b_pid)
        });
        a = a_back;
        assert_eq!(b_pid, backend.to_string(), "pool of 1: b's backend");
        assert!(
            wait_until(Duration::from_secs(5), is("parked")),
            "b stayed kept right after waiting for the backend: {:?}",
            pooled(pg)
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(one(&mut a, "SELECT 'a again'"), "a again");
        assert!(
            wait_until(Duration::from_secs(5), is("attached")),
            "past the window the idle client is not kept again: {:?}",
            pooled(pg)
        );
        drop((a, b));
        assert_left_nothing(pg, pooler);
    });
}

/// Clients that ran a transaction and stay connected, idle, sit in the
/// queue, where no backend serves them: they ask for none. So the pool's
/// backends close after `idle_backend_timeout` (1 s here) and none logs in
/// again until a client sends a query, which is then served. Before, every
/// idle client counted as demand: each backend closed for idleness was
/// replaced by a new login at once, for as long as the clients stayed (a
/// login per pool per `idle_backend_timeout`, and the pool never shrank).
#[test]
fn idle_queued_clients_let_the_pool_close_its_backends() {
    // No backend keeps an idle client (that one would never be idle).
    let b = builder().conf("nextgres.idle_backend_timeout = 1").conf("nextgres.hold_idle_clients = off");
    run(b, |pg| {
        let before = queue_xacts(pg);
        let mut clients: Vec<_> = (0..4).map(|_| connect(pg, APP)).collect();
        for c in &mut clients {
            assert_eq!(one(c, "SELECT 'first'"), "first");
        }
        assert_queue_ran(pg, before, "the clients' first queries");
        let count = || pg.backend_count(Some(APP), Some(DB));
        assert!(wait_until(SETTLE, || count() == 0), "the idle pool kept {} backends\n{}", count(), pg.log_tail(30));
        // Three idle timeouts with no login: none comes back.
        let until = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < until {
            assert_eq!(count(), 0, "a backend logged in for clients that sent nothing\n{}", pg.log_tail(30));
            std::thread::sleep(Duration::from_millis(100));
        }
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(one(c, &format!("SELECT 'again {i}'")), format!("again {i}"));
        }
        assert!(count() >= 1, "the queries were served by no backend of the pool");
    });
}

/// A lent backend asked to close (`pool_size` lowered while it serves a
/// transaction) whose client pins its session at that transaction's end
/// keeps the client, and the close is dropped with its lending: once the
/// client unpins, with the pool's size back, it serves the queue as any
/// lent backend. Before, the close mark outlived the lending: lent again,
/// the backend counted as closing for good, so no client was queued for it
/// and none recalled from it, and the pool's next query waited out
/// `query_wait_timeout` (53400; seen in the drivers suite, node-postgres,
/// whose temp tables pin sessions while backends come and go).
///
/// Two clients, one per backend, each create a temp table inside a
/// transaction; `pool_size` goes to 1 and back to 2 (the lowering marks
/// one of the two backends, the first lent); both commit (pinned: kept).
/// Each client in turn then drops its table while the other keeps its pin,
/// so its own backend is the pool's only shared one: its next statements
/// must run there, through the queue, and no third backend logs in.
#[test]
fn a_backend_kept_by_its_client_is_not_left_closing() {
    let b = builder()
        .conf("nextgres.hold_idle_clients = off")
        .conf("nextgres.max_pinned_backends = 0")
        .conf("nextgres.query_wait_timeout = 5");
    run(b, |pg| {
        let pooler = running_pooler_pid(pg);
        let size = |sql: &str, n: i32| {
            pg.admin().batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            let q = "SELECT coalesce(max(pool_size), 0)::int8 FROM nextgres.pools WHERE role = 'app'";
            let shown = wait_until(SETTLE, || admin_i64(pg, q) == n as i64);
            assert!(shown, "{sql}: nextgres.pools shows pool_size {}", admin_i64(pg, q));
        };
        let pid = |c: &mut postgres::Client| one(c, "SELECT pg_backend_pid()").parse::<i32>().expect("a pid");
        let mut a = connect(pg, APP);
        let mut c = connect(pg, APP);
        // Past their first statements both are queued clients.
        for _ in 0..3 {
            one(&mut a, "SELECT 1");
            one(&mut c, "SELECT 1");
        }
        a.batch_execute("BEGIN; CREATE TEMP TABLE ta (x int)").expect("a's transaction");
        c.batch_execute("BEGIN; CREATE TEMP TABLE tc (x int)").expect("c's transaction");
        size("ALTER ROLE app IN DATABASE postgres SET nextgres.pool_size = 1", 1);
        size("ALTER ROLE app IN DATABASE postgres RESET nextgres.pool_size", 2);
        a.batch_execute("COMMIT").expect("a's commit");
        c.batch_execute("COMMIT").expect("c's commit");
        let (pa, pc) = (pid(&mut a), pid(&mut c));
        assert_ne!(pa, pc, "the two pinned clients share a backend");
        // Each unpins in turn, the other one pinned meanwhile.
        let turn = |who: &str, x: &mut postgres::Client, mine: i32, table: &str| {
            let before = queue_xacts(pg);
            x.batch_execute(&format!("DROP TABLE {table}")).expect("drop");
            for i in 0..5 {
                let got = x.simple_query("SELECT pg_backend_pid()").unwrap_or_else(|e| {
                    panic!("{who}'s statement {i} after it unpinned: {e:?} (sqlstate {:?})\n{}", sqlstate(&e), pg.log_tail(30))
                });
                assert_eq!(first_value(&got), Some(mine.to_string()), "{who}'s statement {i} ran on another backend than the pool's only shared one");
            }
            assert_queue_ran(pg, before, &format!("{who}'s statements after it unpinned"));
            let n = pg.backend_count(Some(APP), Some(DB));
            assert!(n <= 2, "{n} backends in a pool of 2\n{}", pg.log_tail(30));
        };
        turn("a", &mut a, pa, "ta");
        a.batch_execute("CREATE TEMP TABLE ta2 (x int)").expect("a pins again");
        assert_eq!(pid(&mut a), pa, "a pinned again on its backend");
        turn("c", &mut c, pc, "tc");
        drop((a, c));
        assert_left_nothing(pg, pooler);
    });
}

/// `kill_client()` of a client a lent backend serves inside a transaction,
/// while the next client's query waits in the queue: the SIGTERM must end
/// the killed client's session, never the next one's. The pooler's kill(2)
/// is held back 3 s by strace, and meanwhile the killed client commits, so
/// its backend is past it when the signal comes. It must not have taken
/// the waiting client meanwhile: every operation first asks the lent
/// backends back (`kq_take_back_all`), so at that commit the backend gives
/// its client back and leaves the queue, and the signal ends it between
/// clients. The waiting client's query (a 4 s sleep) then runs on the
/// backend logged in next, and completes. (With that recall removed from
/// `ops_check`, this test fails: the backend took the waiting client and
/// the SIGTERM ended its session, 57P01.)
#[test]
fn a_kill_never_reaches_the_next_client_of_its_backend() {
    // No backend keeps an idle client: both go through the queue.
    run(builder().conf("nextgres.pool_size = 1").conf("nextgres.hold_idle_clients = off"), |pg| {
        let pooler = running_pooler_pid(pg);
        let before = client_ports(pg, APP);
        let mut x = connect(pg, APP);
        let at = client_ports(pg, APP).into_iter().find(|p| !before.contains(p)).expect("x in nextgres.clients");
        let mut y = connect(pg, APP);
        // Past their first statements both are queued clients.
        for _ in 0..3 {
            one(&mut x, "SELECT 1");
            one(&mut y, "SELECT 1");
        }
        let served = queue_xacts(pg);
        x.batch_execute("BEGIN").expect("x begins");
        let next = spawn_query(y, "SELECT pg_sleep(4)::text || 'y'");
        std::thread::sleep(Duration::from_millis(300));
        let held = nextgres_test::procs::Strace::attach(pooler, &["-e", "trace=kill", "-e", "inject=kill:delay_enter=3000000"]);
        let (addr, port) = at;
        let mut admin = pg.admin();
        let kill = std::thread::spawn(move || {
            admin.query_one("SELECT nextgres.kill_client($1, $2)", &[&addr, &port]).map(|r| r.get::<_, bool>(0))
        });
        // Inside the held-back kill(2): the client's transaction ends.
        std::thread::sleep(Duration::from_millis(600));
        x.batch_execute("COMMIT").expect("the killed client's commit, inside the held-back kill");
        let found = kill.join().expect("kill thread").expect("kill_client");
        drop(held);
        assert!(found, "kill_client did not find the client");
        let (_, r) = wait_result(&next, "the next client's query");
        let rows = r.unwrap_or_else(|e| panic!("the next client's query: {e:?} (sqlstate {:?})\n{}", sqlstate(&e), pg.log_tail(30)));
        assert_eq!(first_value(&rows).as_deref(), Some("y"), "the next client's query");
        let e = x.simple_query("SELECT 1").expect_err("the killed client went on");
        assert!(sqlstate(&e) == Some("57P01") || e.is_closed() || e.to_string().contains("closed"), "the killed client: {e:?}");
        assert_queue_ran(pg, served, "the two clients");
        drop(x);
        assert_left_nothing(pg, pooler);
    });
}

/// A client whose ATTACH outgrows its kernel queue slot (its prepared
/// statements) is served the pooler's way, by the backend it left, with
/// no wait. Before, each of its attempts at the queue lent every parked
/// backend to it first: the client then waited for a recall at every
/// transaction, and mostly got another backend, a full switch with its
/// whole image (2 ms per transaction, release build, with 3,000
/// statements, against 0.2 ms without the queue; hunt11a 2).
#[test]
fn a_client_too_large_for_the_queue_does_not_wait_for_its_backend() {
    run(builder().conf("nextgres.hold_idle_clients = off"), |pg| {
        let mut c = connect(pg, "app");
        let pad = "x".repeat(200);
        let stmts: Vec<postgres::Statement> =
            (0..20).map(|i| c.prepare(&format!("SELECT {i} /* {pad} */")).expect("prepare")).collect();
        // A pool lends its backends to the queue for 2 s after a client
        // last used it (this one's first statements fitted its slot); the
        // first transactions after that take them back.
        std::thread::sleep(Duration::from_millis(2500));
        for st in &stmts[..2] {
            c.query(st, &[]).expect("warm-up");
        }
        let waits = || admin_i64(pg, "SELECT coalesce(sum(waits), 0)::int8 FROM nextgres.pools WHERE role = 'app'");
        let before = waits();
        let pid = one(&mut c, "SELECT pg_backend_pid()");
        for round in 0..20 {
            for st in &stmts[..3] {
                c.query(st, &[]).unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            }
            assert_eq!(one(&mut c, "SELECT pg_backend_pid()"), pid, "round {round}: moved to another backend");
        }
        assert_eq!(waits(), before, "the client waited for a backend with one parked for it");
    });
}
