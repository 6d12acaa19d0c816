//! `nextgres.hold_idle_clients = on` (the default): after a transaction a
//! pooled backend keeps its idle client while no other client of the pool
//! waits, so an unsaturated pool makes no handoff; as soon as another client
//! waits, the pooler asks the backend for the client back, and for 100 ms
//! after a client waited no backend keeps an idle client.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test hold_idle -- --test-threads=2
//! ```

use std::sync::Arc;
use std::time::Duration;

use nextgres_test::{wait_until, Cluster};
use postgres::{Client, SimpleQueryMessage};

const APP: &str = "app";
const DB: &str = "postgres";
const TEST_LIMIT: Duration = Duration::from_secs(180);

fn run(pool_size: u32, body: impl FnOnce(&Cluster) + Send + 'static) {
    let pg = Arc::new(
        Cluster::builder()
            .conf(format!("nextgres.pool_size = {pool_size}"))
            .conf("nextgres.hold_idle_clients = on")
            // Holding idle clients is the handoff path's: with the kernel
            // queue (the default) a queued client goes back to the
            // queue at each transaction boundary instead (README).
            .conf("nextgres.kernel_queue = off")
            .start(),
    );
    pg.admin()
        .batch_execute("CREATE EXTENSION nextgres; CREATE ROLE app LOGIN;")
        .unwrap();
    pg.run_bounded(TEST_LIMIT, body);
}

#[track_caller]
fn connect(pg: &Cluster) -> Client {
    pg.connect_tcp(APP, DB, None)
        .unwrap_or_else(|e| panic!("connecting through the pooler: {e:?}\n{}", pg.log_tail(30)))
}

#[track_caller]
fn one(c: &mut Client, sql: &str) -> String {
    let msgs = c.simple_query(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no value"))
}

/// (handoffs, attached backends) of the pool, from the nextgres views.
fn pool_counts(pg: &Cluster) -> (i64, i64) {
    let r = pg
        .admin()
        .query_one(
            "SELECT coalesce(sum(transactions), 0)::int8, coalesce(sum(backends_attached), 0)::int8 FROM nextgres.pools",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

/// Clients the pooler lists as waiting for a backend.
fn waiting_clients(pg: &Cluster) -> i64 {
    pg.admin()
        .query_one("SELECT count(*) FROM nextgres.clients WHERE state = 'waiting'", &[])
        .unwrap()
        .get(0)
}

/// Runs `sql` on `c` in a thread; returns it once one client is listed as
/// waiting, or the thread finished (false: it never showed as waiting).
fn query_until_waiting(
    pg: &Cluster,
    mut c: Client,
    sql: &'static str,
) -> (std::thread::JoinHandle<(Client, String)>, bool) {
    let waiter = std::thread::spawn(move || {
        let v = one(&mut c, sql);
        (c, v)
    });
    let waiting = wait_until(Duration::from_secs(30), || waiting_clients(pg) == 1 || waiter.is_finished());
    (waiter, waiting)
}

/// One client alone keeps its backend: every transaction runs on the same
/// backend without going back to the pooler, and the backend shows as
/// attached while the client is idle.
#[test]
fn an_unsaturated_pool_makes_no_handoff() {
    run(2, |pg| {
        let mut a = connect(pg);
        let pid = one(&mut a, "SELECT pg_backend_pid()");
        let (handoffs_before, attached) = pool_counts(pg);
        assert_eq!(attached, 1, "the idle client keeps its backend");
        for _ in 0..200 {
            assert_eq!(one(&mut a, "SELECT pg_backend_pid()"), pid);
        }
        let (handoffs_after, _) = pool_counts(pg);
        assert_eq!(handoffs_after, handoffs_before, "transactions went through the pooler");
    });
}

/// Pool of one backend, two clients taking turns: each turn the waiting
/// client must get the backend, from the idle one holding it (the first
/// turn) or parked (once the pool has just saturated, its backend keeps no
/// idle client), and each keeps its own session (a SET follows its client,
/// never the backend).
#[test]
fn a_waiting_client_gets_the_backend_of_an_idle_one() {
    run(1, |pg| {
        let mut a = connect(pg);
        let mut b = connect(pg);
        a.batch_execute("SET application_name = 'client-a'").unwrap();
        b.batch_execute("SET application_name = 'client-b'").unwrap();
        let pid = one(&mut a, "SELECT pg_backend_pid()");
        for i in 0..100 {
            assert_eq!(one(&mut b, "SHOW application_name"), "client-b", "turn {i}");
            assert_eq!(one(&mut a, "SHOW application_name"), "client-a", "turn {i}");
        }
        assert_eq!(one(&mut b, "SELECT pg_backend_pid()"), pid, "a second backend appeared");
        // Inside a transaction the client keeps the backend; the other waits
        // until COMMIT, then runs.
        a.batch_execute("BEGIN; SELECT 1").unwrap();
        // Until the pooler lists b as waiting (it has sent its query and is
        // queued behind a's transaction), so the check below is made while b
        // really waits, not before it has asked.
        let (waiter, waiting) = query_until_waiting(pg, b, "SHOW application_name");
        assert!(!waiter.is_finished(), "the waiting client ran inside another client's transaction");
        assert!(waiting, "b never showed as waiting in nextgres.clients");
        // a is still inside its transaction: its next statement runs on its
        // backend at once while b keeps waiting. Had b been given the
        // backend, a's statement would queue behind b's and b would no
        // longer be waiting.
        assert_eq!(one(&mut a, "SELECT pg_backend_pid()"), pid, "a lost its backend inside its transaction");
        let still = waiting_clients(pg);
        assert!(
            still == 1 && !waiter.is_finished(),
            "b stopped waiting while a's transaction was open (waiting: {still})"
        );
        a.batch_execute("COMMIT").unwrap();
        let (_b, v) = waiter.join().unwrap();
        assert_eq!(v, "client-b");
    });
}

/// A pool in which a client just had to wait counts as saturated for 100 ms:
/// the backend gives its client back at once instead of keeping it idle
/// (the next client would have to wait for a release request). Pool of one:
/// b waits behind a's open transaction and then gets the backend; after b's
/// statement the backend is parked, not kept by b. Past the window, a
/// statement of b's (no wait) leaves b holding the backend again.
#[test]
fn a_pool_that_just_saturated_keeps_no_idle_client() {
    run(1, |pg| {
        let mut a = connect(pg);
        let mut b = connect(pg);
        one(&mut b, "SELECT 1"); // b holds the backend: a waits for it below
        a.batch_execute("BEGIN; SELECT 1").unwrap();
        let (waiter, waiting) = query_until_waiting(pg, b, "SELECT 2");
        assert!(waiting && !waiter.is_finished(), "b never waited behind a's transaction");
        a.batch_execute("COMMIT").unwrap();
        let (mut b, v) = waiter.join().unwrap();
        assert_eq!(v, "2");
        assert!(
            wait_until(Duration::from_secs(5), || pool_counts(pg).1 == 0),
            "b kept the backend right after waiting for it: {:?}",
            pool_counts(pg)
        );
        std::thread::sleep(Duration::from_millis(300));
        one(&mut b, "SELECT 3");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(pool_counts(pg).1, 1, "past the window the idle client keeps its backend again");
        drop(a);
    });
}

/// An idle client that disconnects while holding its backend gives the
/// backend back to the pool, cleaned: the next client does not see its
/// settings or prepared statements.
#[test]
fn a_leaving_idle_client_gives_back_a_clean_backend() {
    run(1, |pg| {
        let mut a = connect(pg);
        a.batch_execute("SET search_path = pg_catalog; PREPARE leak AS SELECT 1").unwrap();
        let pid = one(&mut a, "SELECT pg_backend_pid()");
        drop(a);
        let mut b = connect(pg);
        assert_eq!(one(&mut b, "SELECT pg_backend_pid()"), pid);
        assert_eq!(one(&mut b, "SHOW search_path"), "\"$user\", public");
        assert_eq!(one(&mut b, "SELECT count(*) FROM pg_prepared_statements"), "0");
    });
}

/// Query time counts request cycles only: a held client (its backend stays
/// attached while it idles) runs `pg_sleep(0.2)`, idles 1 s, then sends a
/// bare Close + Sync (which the server does not give a statement timestamp
/// of its own). The pool's query_time_ms, reported when the client leaves,
/// is the sleep and the Close's instant answer: in [200, 400) ms, not the
/// idle second.
#[test]
fn query_time_excludes_idle_before_close_and_sync() {
    run(2, |pg| {
        let mut raw = nextgres_test::raw::Raw::connect(pg.port(), APP, DB, Duration::from_secs(30));
        raw.query("SELECT pg_sleep(0.2)").expect("sleep");
        // Idle, held (the time under test, not a synchronisation).
        std::thread::sleep(Duration::from_secs(1));
        use std::io::Write;
        // Close (statement, unnamed) then Sync.
        raw.s.write_all(&[b'C', 0, 0, 0, 6, b'S', 0, b'S', 0, 0, 0, 4]).expect("close + sync");
        raw.until_ready().expect("CloseComplete, ReadyForQuery");
        raw.send_terminate();
        assert!(raw.closed_by_peer(Duration::from_secs(10)), "not closed after Terminate");
        let stats = || {
            let r = pg
                .admin()
                .query_one("SELECT transactions, query_time_ms, xact_time_ms FROM nextgres.pools WHERE role = 'app'", &[])
                .unwrap();
            (r.get::<_, i64>(0), r.get::<_, f64>(1), r.get::<_, f64>(2))
        };
        assert!(wait_until(Duration::from_secs(10), || stats().0 >= 1), "no transaction reported: {:?}", stats());
        let (_, query_ms, xact_ms) = stats();
        eprintln!("query_time_ms {query_ms}, xact_time_ms {xact_ms}");
        assert!((200.0..400.0).contains(&query_ms), "query_time_ms {query_ms} (xact_time_ms {xact_ms})");
        assert!(query_ms <= xact_ms, "query_time_ms {query_ms} > xact_time_ms {xact_ms}");
    });
}
