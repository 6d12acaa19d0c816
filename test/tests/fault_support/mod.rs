//! Helpers shared by the fault suites (`faults.rs`, `faults_more.rs`): a
//! cluster runner with a whole-test deadline, what the nextgres views and
//! pg_stat_activity say, rust-postgres helpers with bounded waits, and a raw
//! protocol-3 client for what drivers hide.
#![allow(dead_code)] // each suite uses its own subset

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nextgres_test::procs::process_alive;
use nextgres_test::{wait_until, with_timeout, Builder, Cluster, StopMode};
use postgres::error::SqlState;
use postgres::{Client, SimpleQueryMessage};

/// Pooled clients log in as this role (trust), so their backends are easy to
/// tell from the admin connection (`postgres` over the Unix socket).
pub const APP: &str = "app";
/// A second role: a second pool.
pub const APP2: &str = "app2";
pub const DB: &str = "postgres";
/// Bound on anything that must happen "soon". Generous on purpose (2-core
/// CI): it only decides when a wait counts as a hang, never a speed.
pub const SETTLE: Duration = Duration::from_secs(30);
/// Bound on a whole test body.
pub const TEST_LIMIT: Duration = Duration::from_secs(300);

// ---- running a test ---------------------------------------------------------

/// Starts the cluster, creates the extension, roles and table, and runs
/// `body` under `TEST_LIMIT`. On failure (or timeout) the server log tail is
/// printed, the directory kept, and the server stopped at once so a body
/// thread stuck on a socket comes loose.
pub fn run(builder: Builder, body: impl FnOnce(&Cluster) + Send + 'static) {
    let pg = Arc::new(builder.start());
    setup(&pg);
    let guard = StopOnFailure(pg.clone());
    let pg2 = pg.clone();
    let name = std::thread::current().name().unwrap_or("test").to_string();
    with_timeout(TEST_LIMIT, &name, move || body(&pg2));
    drop(guard);
}

pub struct StopOnFailure(Arc<Cluster>);

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

pub fn setup(pg: &Cluster) {
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

pub fn admin_i64(pg: &Cluster, sql: &str) -> i64 {
    pg.admin()
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// `nextgres.status().pooler_pid` (None while no pooler runs).
pub fn pooler_pid(pg: &Cluster) -> Option<i32> {
    pg.admin()
        .query_one("SELECT pooler_pid FROM nextgres.status()", &[])
        .expect("nextgres.status()")
        .get(0)
}

/// `nextgres.backends`: (pid, state), by pid.
pub fn pooled(pg: &Cluster) -> Vec<(i32, String)> {
    pg.admin()
        .query("SELECT pid, state FROM nextgres.backends ORDER BY pid", &[])
        .expect("nextgres.backends")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

pub fn pooled_pids(pg: &Cluster) -> Vec<i32> {
    pooled(pg).into_iter().map(|(p, _)| p).collect()
}

/// `nextgres.clients`: (client_port, state, backend_pid).
pub fn clients(pg: &Cluster) -> Vec<(i32, String, Option<i32>)> {
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
pub fn wait_parked(pg: &Cluster, n: usize) -> Vec<i32> {
    let ok = wait_until(SETTLE, || {
        let b = pooled(pg);
        b.len() == n && b.iter().all(|(_, s)| s == "parked")
    });
    assert!(ok, "expected {n} parked backends, have {:?}", pooled(pg));
    pooled_pids(pg)
}

/// Sessions inside a transaction that nobody is running a query in.
pub fn idle_in_transaction(pg: &Cluster) -> Vec<i32> {
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
pub fn session_exists(pg: &Cluster, pid: i32) -> bool {
    process_alive(pid) || pg.activity().iter().any(|a| a.pid == pid)
}

/// Sessions of APP waiting for a lock.
pub fn lock_waiters(pg: &Cluster) -> i64 {
    admin_i64(
        pg,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND wait_event_type = 'Lock'",
    )
}

pub fn row_value(pg: &Cluster) -> i32 {
    pg.admin()
        .query_one("SELECT v FROM t WHERE id = 1", &[])
        .expect("reading t")
        .get(0)
}

// ---- rust-postgres clients ----------------------------------------------------

pub type QueryResult = Result<Vec<SimpleQueryMessage>, postgres::Error>;

#[track_caller]
pub fn connect(pg: &Cluster, user: &str) -> Client {
    pg.connect_tcp(user, DB, None).unwrap_or_else(|e| {
        panic!(
            "{user} connecting through the pooler: {e:?}\n{}",
            pg.log_tail(30)
        )
    })
}

/// First column of the first row.
pub fn first_value(msgs: &[SimpleQueryMessage]) -> Option<String> {
    msgs.iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
            _ => None,
        })
        .flatten()
}

#[track_caller]
pub fn one(c: &mut Client, sql: &str) -> String {
    let msgs = c
        .simple_query(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    first_value(&msgs).unwrap_or_else(|| panic!("{sql}: no value"))
}

/// Runs a query on its own thread (it is expected to block for a while).
pub fn spawn_query(mut c: Client, sql: &'static str) -> mpsc::Receiver<(Client, QueryResult)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = c.simple_query(sql);
        let _ = tx.send((c, r));
    });
    rx
}

#[track_caller]
pub fn wait_result<T>(rx: &mpsc::Receiver<T>, what: &str) -> T {
    rx.recv_timeout(SETTLE)
        .unwrap_or_else(|e| panic!("{what}: no result after {SETTLE:?} ({e})"))
}

/// A query with a bounded wait, on a client that may have lost its server.
pub fn bounded_query(c: Client, sql: &'static str, what: &str) -> (Client, QueryResult) {
    wait_result(&spawn_query(c, sql), what)
}

pub fn sqlstate(e: &postgres::Error) -> Option<&str> {
    e.code().map(SqlState::code)
}

/// The pooler serves: a brand-new client connects and runs a query, and the
/// pooler is still `expected` (the same process as before the fault).
#[track_caller]
pub fn assert_pooler_serves(pg: &Cluster, expected: i32) {
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
pub enum RawFail {
    Db {
        severity: String,
        code: String,
        message: String,
    },
    Io(io::Error),
}

/// Minimal protocol-3 client (trust auth only) for what drivers hide.
pub struct Raw {
    pub s: TcpStream,
}

impl Raw {
    #[track_caller]
    pub fn connect(pg: &Cluster, user: &str) -> Raw {
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

    pub fn local_port(&self) -> i32 {
        self.s.local_addr().expect("local addr").port() as i32
    }

    pub fn read_msg(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head)?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        let mut body = vec![0u8; (len as usize).saturating_sub(4)];
        self.s.read_exact(&mut body)?;
        Ok((head[0], body))
    }

    /// Reads until ReadyForQuery; rows of DataRow messages.
    pub fn until_ready(&mut self) -> Result<Vec<Vec<Option<String>>>, RawFail> {
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

    pub fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, RawFail> {
        self.send_query(sql);
        self.until_ready()
    }

    #[track_caller]
    pub fn value(&mut self, sql: &str) -> String {
        let rows = self.query(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_else(|| panic!("{sql}: no value"))
    }

    /// Sends Terminate and keeps the socket open.
    pub fn send_terminate(&mut self) {
        self.s
            .write_all(&[b'X', 0, 0, 0, 4])
            .expect("send Terminate");
    }

    /// True once the other side has closed the connection (EOF or reset).
    pub fn closed_by_peer(&mut self, within: Duration) -> bool {
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
    pub fn expect_fatal(&mut self) -> (String, String, io::ErrorKind) {
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
    pub fn send_query(&mut self, sql: &str) {
        let mut pkt = vec![b'Q'];
        pkt.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        pkt.extend_from_slice(sql.as_bytes());
        pkt.push(0);
        self.s.write_all(&pkt).expect("sending a query");
    }

    /// Closes the socket without Terminate, as a crashed client's kernel does.
    pub fn vanish(self) {
        let _ = self.s.shutdown(Shutdown::Both);
    }
}

pub fn parse_row(body: &[u8]) -> Vec<Option<String>> {
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

pub fn parse_error(body: &[u8]) -> RawFail {
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
