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

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nextgres_test::procs::process_alive;
use nextgres_test::{wait_until, with_timeout, Builder, Cluster, StopMode};
use postgres::error::SqlState;
use postgres::{Client, NoTls, SimpleQueryMessage};

/// Pooled clients log in as this role (trust), so their backends are easy to
/// tell from the admin connection (`postgres` over the Unix socket).
const APP: &str = "app";
/// A second role: a second pool.
const APP2: &str = "app2";
const DB: &str = "postgres";
/// Bound on anything that must happen "soon". Generous on purpose (2-core
/// CI): it only decides when a wait counts as a hang, never a speed.
const SETTLE: Duration = Duration::from_secs(30);
/// Bound on a whole test body.
const TEST_LIMIT: Duration = Duration::from_secs(300);

// ---- running a test ---------------------------------------------------------

/// Starts the cluster, creates the extension, roles and table, and runs
/// `body` under `TEST_LIMIT`. On failure (or timeout) the server log tail is
/// printed, the directory kept, and the server stopped at once so a body
/// thread stuck on a socket comes loose.
fn run(builder: Builder, body: impl FnOnce(&Cluster) + Send + 'static) {
    let pg = Arc::new(builder.start());
    setup(&pg);
    let guard = StopOnFailure(pg.clone());
    let pg2 = pg.clone();
    let name = std::thread::current().name().unwrap_or("test").to_string();
    with_timeout(TEST_LIMIT, &name, move || body(&pg2));
    drop(guard);
}

struct StopOnFailure(Arc<Cluster>);

impl Drop for StopOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.keep();
            eprintln!("--- server log (tail) ---\n{}", self.0.log_tail(100));
            self.0
                .stop_timeout(StopMode::Immediate, Duration::from_secs(10));
        }
    }
}

fn setup(pg: &Cluster) {
    pg.admin()
        .batch_execute(
            "CREATE EXTENSION nextgres;
             CREATE ROLE app LOGIN;
             CREATE ROLE app2 LOGIN;
             CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO t VALUES (1, 0);
             GRANT ALL ON t TO app, app2;",
        )
        .unwrap_or_else(|e| panic!("setup: {e:?}\n{}", pg.log_tail(40)));
}

// ---- what the server says ---------------------------------------------------

fn admin_i64(pg: &Cluster, sql: &str) -> i64 {
    pg.admin()
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// `nextgres.status().pooler_pid` (None while no pooler runs).
fn pooler_pid(pg: &Cluster) -> Option<i32> {
    pg.admin()
        .query_one("SELECT pooler_pid FROM nextgres.status()", &[])
        .expect("nextgres.status()")
        .get(0)
}

/// `nextgres.backends`: (pid, state), by pid.
fn pooled(pg: &Cluster) -> Vec<(i32, String)> {
    pg.admin()
        .query("SELECT pid, state FROM nextgres.backends ORDER BY pid", &[])
        .expect("nextgres.backends")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn pooled_pids(pg: &Cluster) -> Vec<i32> {
    pooled(pg).into_iter().map(|(p, _)| p).collect()
}

/// `nextgres.clients`: (client_port, state, backend_pid).
fn clients(pg: &Cluster) -> Vec<(i32, String, Option<i32>)> {
    pg.admin()
        .query(
            "SELECT client_port, state, backend_pid FROM nextgres.clients ORDER BY client_port",
            &[],
        )
        .expect("nextgres.clients")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Waits until the pool has exactly `n` backends, all parked; their pids.
#[track_caller]
fn wait_parked(pg: &Cluster, n: usize) -> Vec<i32> {
    let ok = wait_until(SETTLE, || {
        let b = pooled(pg);
        b.len() == n && b.iter().all(|(_, s)| s == "parked")
    });
    assert!(ok, "expected {n} parked backends, have {:?}", pooled(pg));
    pooled_pids(pg)
}

/// Sessions inside a transaction that nobody is running a query in.
fn idle_in_transaction(pg: &Cluster) -> Vec<i32> {
    pg.activity()
        .into_iter()
        .filter(|a| {
            a.state
                .as_deref()
                .is_some_and(|s| s.starts_with("idle in transaction"))
        })
        .map(|a| a.pid)
        .collect()
}

/// Is `pid` still a server process (pg_stat_activity and the OS agree)?
fn session_exists(pg: &Cluster, pid: i32) -> bool {
    process_alive(pid) || pg.activity().iter().any(|a| a.pid == pid)
}

/// Sessions of APP waiting for a lock.
fn lock_waiters(pg: &Cluster) -> i64 {
    admin_i64(
        pg,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND wait_event_type = 'Lock'",
    )
}

fn row_value(pg: &Cluster) -> i32 {
    pg.admin()
        .query_one("SELECT v FROM t WHERE id = 1", &[])
        .expect("reading t")
        .get(0)
}

// ---- rust-postgres clients ----------------------------------------------------

type QueryResult = Result<Vec<SimpleQueryMessage>, postgres::Error>;

#[track_caller]
fn connect(pg: &Cluster, user: &str) -> Client {
    pg.connect_tcp(user, DB, None).unwrap_or_else(|e| {
        panic!(
            "{user} connecting through the pooler: {e:?}\n{}",
            pg.log_tail(30)
        )
    })
}

/// First column of the first row.
fn first_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .flatten()
}

#[track_caller]
fn one(c: &mut Client, sql: &str) -> String {
    let msgs = c
        .simple_query(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    first_value(&msgs).unwrap_or_else(|| panic!("{sql}: no value"))
}

/// Runs a query on its own thread (it is expected to block for a while).
fn spawn_query(mut c: Client, sql: &'static str) -> mpsc::Receiver<(Client, QueryResult)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = c.simple_query(sql);
        let _ = tx.send((c, r));
    });
    rx
}

#[track_caller]
fn wait_result<T>(rx: &mpsc::Receiver<T>, what: &str) -> T {
    rx.recv_timeout(SETTLE)
        .unwrap_or_else(|e| panic!("{what}: no result after {SETTLE:?} ({e})"))
}

/// A query with a bounded wait, on a client that may have lost its server.
fn bounded_query(c: Client, sql: &'static str, what: &str) -> (Client, QueryResult) {
    wait_result(&spawn_query(c, sql), what)
}

fn sqlstate(e: &postgres::Error) -> Option<&str> {
    e.code().map(SqlState::code)
}

/// The pooler serves: a brand-new client connects and runs a query, and the
/// pooler is still `expected` (the same process as before the fault).
#[track_caller]
fn assert_pooler_serves(pg: &Cluster, expected: i32) {
    let pgc = pg.tcp(APP, DB);
    let (c, r) = with_timeout(SETTLE, "new client after the fault", move || {
        let mut c = pgc.connect()?;
        let r = c.simple_query("SELECT 40 + 2")?;
        Ok::<_, postgres::Error>((c, r))
    })
    .unwrap_or_else(|e| panic!("a new client after the fault: {e:?}\n{}", pg.log_tail(30)));
    assert_eq!(first_value(&r).as_deref(), Some("42"));
    drop(c);
    assert_eq!(pooler_pid(pg), Some(expected), "the pooler was replaced");
}

// ---- a raw protocol client ------------------------------------------------------

/// An error the raw client got: server ErrorResponse, or the socket failed.
#[derive(Debug)]
#[allow(dead_code)] // fields are read through Debug, in failure messages
enum RawFail {
    Db {
        severity: String,
        code: String,
        message: String,
    },
    Io(io::Error),
}

/// Minimal protocol-3 client (trust auth only) for what drivers hide.
struct Raw {
    s: TcpStream,
}

impl Raw {
    #[track_caller]
    fn connect(pg: &Cluster, user: &str) -> Raw {
        let addr = SocketAddr::from(([127, 0, 0, 1], pg.port()));
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("raw connect");
        s.set_read_timeout(Some(SETTLE)).expect("read timeout");
        s.set_nodelay(true).expect("nodelay");
        let mut body = Vec::new();
        body.extend_from_slice(&196608i32.to_be_bytes());
        for (k, v) in [("user", user), ("database", DB)] {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        pkt.extend_from_slice(&body);
        let mut raw = Raw { s };
        raw.s.write_all(&pkt).expect("raw startup");
        raw.until_ready()
            .unwrap_or_else(|e| panic!("raw login as {user}: {e:?}"));
        raw
    }

    fn local_port(&self) -> i32 {
        self.s.local_addr().expect("local addr").port() as i32
    }

    fn read_msg(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head)?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        let mut body = vec![0u8; (len as usize).saturating_sub(4)];
        self.s.read_exact(&mut body)?;
        Ok((head[0], body))
    }

    /// Reads until ReadyForQuery; rows of DataRow messages.
    fn until_ready(&mut self) -> Result<Vec<Vec<Option<String>>>, RawFail> {
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let (tag, body) = match self.read_msg() {
                Ok(m) => m,
                // A FATAL is followed by EOF: report the FATAL.
                Err(e) => return Err(err.unwrap_or(RawFail::Io(e))),
            };
            match tag {
                b'R' if body.get(..4) != Some(&[0, 0, 0, 0]) => {
                    panic!("raw client: only trust authentication is supported")
                }
                b'D' => rows.push(parse_row(&body)),
                b'E' => err = Some(parse_error(&body)),
                b'Z' => return err.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, RawFail> {
        self.send_query(sql);
        self.until_ready()
    }

    #[track_caller]
    fn value(&mut self, sql: &str) -> String {
        let rows = self.query(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_else(|| panic!("{sql}: no value"))
    }

    /// Sends Terminate and keeps the socket open.
    fn send_terminate(&mut self) {
        self.s
            .write_all(&[b'X', 0, 0, 0, 4])
            .expect("send Terminate");
    }

    /// True once the other side has closed the connection (EOF or reset).
    fn closed_by_peer(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 256];
        while Instant::now() < deadline {
            let _ = self.s.set_read_timeout(Some(Duration::from_millis(200)));
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    }

    /// Without sending anything, reads what the server says until it closes
    /// the connection: the last ErrorResponse's (severity, code), and how the
    /// connection ended (`UnexpectedEof` for an orderly close,
    /// `ConnectionReset` for a reset). Panics if no error came.
    #[track_caller]
    fn expect_fatal(&mut self) -> (String, String, io::ErrorKind) {
        let mut last = None;
        loop {
            match self.read_msg() {
                Ok((b'E', body)) => last = Some(parse_error(&body)),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the server neither sent an error nor closed within {SETTLE:?}")
                }
                Err(e) => match last {
                    Some(RawFail::Db { severity, code, .. }) => return (severity, code, e.kind()),
                    _ => panic!("connection ended ({e}) without an ErrorResponse"),
                },
            }
        }
    }

    /// Sends a simple query without waiting for its result.
    fn send_query(&mut self, sql: &str) {
        let mut pkt = vec![b'Q'];
        pkt.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        pkt.extend_from_slice(sql.as_bytes());
        pkt.push(0);
        self.s.write_all(&pkt).expect("sending a query");
    }

    /// Closes the socket without Terminate, as a crashed client's kernel does.
    fn vanish(self) {
        let _ = self.s.shutdown(Shutdown::Both);
    }
}

fn parse_row(body: &[u8]) -> Vec<Option<String>> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        at += 4;
        if len < 0 {
            out.push(None);
        } else {
            let l = len as usize;
            out.push(Some(
                String::from_utf8_lossy(&body[at..at + l]).into_owned(),
            ));
            at += l;
        }
    }
    out
}

fn parse_error(body: &[u8]) -> RawFail {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let v = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'V' => severity = v,
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    RawFail::Db {
        severity,
        code,
        message,
    }
}

// ---- tests --------------------------------------------------------------------

/// An idle client that closes its socket without Terminate, and one that
/// sends Terminate, are handled by the pooler alone: the pool keeps the same
/// backends (none is handed the dead socket and none exits), the clients
/// leave nextgres.clients, and a Terminate is answered by closing the socket.
#[test]
fn idle_client_disconnect_and_terminate_keep_backends() {
    run(Cluster::builder().conf("nextgres.pool_size = 2"), |pg| {
        let pooler = pooler_pid(pg).expect("pooler running");
        let mut c1 = Raw::connect(pg, APP);
        let mut c2 = Raw::connect(pg, APP);
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

/// A psql killed with SIGKILL inside a transaction that holds a row lock,
/// then a raw client that closes its socket mid-transaction: each time the
/// backend rolls back and exits, the lock is released (a blocked UPDATE goes
/// through), no session stays 'idle in transaction', and the pool replaces
/// the lost backends for new clients.
#[test]
fn client_killed_mid_transaction_releases_locks() {
    run(Cluster::builder().conf("nextgres.pool_size = 2"), |pg| {
        let pooler = pooler_pid(pg).expect("pooler running");

        // psql reads statements from its stdin as they come, so the
        // transaction stays open while the pipe does.
        let mut cmd = Command::new(pg.install().client_bin("psql"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("PG") {
                cmd.env_remove(&k);
            }
        }
        cmd.args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &pg.tcp(APP, DB).conninfo(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let mut psql = cmd.spawn().expect("starting psql");
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
        let mut raw = Raw::connect(pg, APP);
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
        let pooler = pooler_pid(pg).expect("pooler running");
        let mut a = connect(pg, APP);
        let mut b = connect(pg, APP);
        a.batch_execute("BEGIN").expect("BEGIN");
        one(&mut b, "SELECT 1");
        a.batch_execute("COMMIT").expect("COMMIT");
        let parked = wait_parked(pg, 2);

        // A parked backend.
        let victim = parked[0];
        let mut admin = pg.admin();
        let ok: bool = admin
            .query_one("SELECT pg_terminate_backend($1)", &[&victim])
            .expect("pg_terminate_backend")
            .get(0);
        assert!(ok);
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
        let mut raw = Raw::connect(pg, APP);
        raw.query("BEGIN").expect("BEGIN");
        let attached: i32 = raw.value("SELECT pg_backend_pid()").parse().expect("pid");
        let ok: bool = admin
            .query_one("SELECT pg_terminate_backend($1)", &[&attached])
            .expect("pg_terminate_backend")
            .get(0);
        assert!(ok);
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
        let pooler = pooler_pid(pg).expect("pooler running");
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

/// nextgres.query_wait_timeout: with the only backend held by an open
/// transaction, another client's query fails with FATAL 53400 after the
/// timeout. nextgres.max_client_conn = 5: the 6th client gets 53300 "sorry,
/// too many clients already", and gets in once a slot is free.
#[test]
fn query_wait_timeout_and_max_client_conn() {
    let builder = Cluster::builder()
        .conf("nextgres.pool_size = 1")
        .conf("nextgres.query_wait_timeout = 2")
        .conf("nextgres.max_client_conn = 5");
    run(builder, |pg| {
        let pooler = pooler_pid(pg).expect("pooler running");
        let mut holder = connect(pg, APP);
        holder.batch_execute("BEGIN; SELECT 1").expect("BEGIN");
        // A raw client: it reads the FATAL whether the connection then ends
        // with a FIN or a reset (see pooler_fatal_ends_with_orderly_close).
        let mut waiter = Raw::connect(pg, APP);
        waiter.send_query("SELECT 1");
        let (severity, code, _) = waiter.expect_fatal();
        assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "53400"));
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
        let mut idle = Raw::connect(pg, APP2);
        idle.value("SELECT 1");
        // Pool (app): the only backend attached to an open transaction, and
        // a second client queued for it.
        let mut attached = connect(pg, APP);
        attached.batch_execute("BEGIN; SELECT 1").expect("BEGIN");
        let mut waiting = Raw::connect(pg, APP);
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
        let pooler = pooler_pid(pg).expect("a pooler after restart");
        assert_pooler_serves(pg, pooler);
    });
}

/// Smart shutdown waits for the applications (the pooler's clients) to
/// disconnect, and then finishes: parked backends, which no application
/// uses, must not keep the server up forever. Bounded either way.
#[test]
fn smart_stop_waits_for_clients_not_for_parked_backends() {
    run(Cluster::builder(), |pg| {
        let mut c = connect(pg, APP);
        one(&mut c, "SELECT 1");
        wait_parked(pg, 1);
        // A client is connected: the smart stop must not finish yet.
        assert!(
            !pg.stop_timeout(StopMode::Smart, Duration::from_secs(3)),
            "smart stop finished while a client was connected"
        );
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
    });
}

/// SIGTERM to the pooler worker: it tells idle clients 57P01 and exits; its
/// parked backends exit with it; a client inside a transaction finishes it.
/// The postmaster starts a new pooler (new pid), and connection attempts made
/// while no pooler runs are not refused: they wait in the listen backlog,
/// which the postmaster keeps, and are served by the new pooler.
///
/// EXTENSION BUG (reported, test kept failing on purpose): a pooler started
/// while `global/pg_internal.init` exists (every pooler but the first, since
/// the first ordinary backend writes that file) cannot authenticate anyone:
/// each login gets FATAL XX000 "nextgres: missing support function 1 for
/// attribute 1 of index "pg_database_oid_index"" (PG 16) or "function
/// "ambeginscan" is not defined for index ..." (PG 15). The logins are
/// checked last so the other points of this test are still exercised.
#[test]
fn pooler_sigterm_restarts_without_refusing_connections() {
    run(Cluster::builder().conf("nextgres.pool_size = 2"), |pg| {
        let old = pooler_pid(pg).expect("pooler running");
        let mut idle = Raw::connect(pg, APP);
        let mut in_xact = Raw::connect(pg, APP);
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
        assert!(
            tcp.is_ok(),
            "TCP connect refused while the pooler restarts: {tcp:?}"
        );
        drop(tcp);
        if pooler_pid(pg).is_some() {
            // Not a failure: the machine was slow enough for the new pooler
            // to start first, so this run did not exercise the backlog.
            eprintln!("note: the new pooler was already up when the connects were made");
        }

        let mut new = None;
        assert!(
            wait_until(SETTLE, || {
                new = pooler_pid(pg).filter(|&p| p != old);
                new.is_some()
            }),
            "no new pooler after SIGTERM"
        );
        let new = new.expect("new pooler");
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

        assert_pooler_serves(pg, new);
    });
}

/// EXTENSION BUG (reported, test kept failing on purpose): when the pooler
/// ends a client that has unread input (a waiting client's query, which the
/// pooler leaves in the socket for the backend), it closes the socket with
/// that input unread, so the kernel sends a reset after the FATAL. Clients
/// that read everything still see the FATAL, but drivers that stop at the
/// socket error report "connection reset by peer" instead: rust-postgres did
/// so for the 57P01 of a fast stop. The connection should end with an
/// orderly close (FIN), as the server's own FATALs do.
#[test]
fn pooler_fatal_ends_with_orderly_close() {
    let builder = Cluster::builder()
        .conf("nextgres.pool_size = 1")
        .conf("nextgres.query_wait_timeout = 1");
    run(builder, |pg| {
        let pooler = pooler_pid(pg).expect("pooler running");
        let mut holder = connect(pg, APP);
        holder.batch_execute("BEGIN").expect("BEGIN");
        let mut waiter = Raw::connect(pg, APP);
        waiter.send_query("SELECT 1");
        let (severity, code, end) = waiter.expect_fatal();
        assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "53400"));
        holder.batch_execute("COMMIT").expect("COMMIT");
        assert_pooler_serves(pg, pooler);
        assert_eq!(
            end,
            io::ErrorKind::UnexpectedEof,
            "the connection ended with {end:?} after the FATAL, not an orderly close"
        );
    });
}
