//! Helpers shared by the pooled-connection tests (auth.rs, pooled.rs,
//! protocol.rs): side-port clusters for differential tests, uniform
//! "what did the client see" outcomes, and a raw startup-packet client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::time::Duration;

use nextgres_test::ports::PortLease;
use nextgres_test::{Builder, Cluster, ConnInfo};

/// A cluster whose pooler listens on a side port (`nextgres.port`), so the
/// server keeps its own TCP listener on `port`: one pg_hba.conf, two doors.
pub struct SidePort {
    // Field order = drop order: the cluster stops before the lease goes.
    pub pg: Cluster,
    pub pool_port: u16,
    _lease: PortLease,
}

impl SidePort {
    #[track_caller]
    pub fn start(b: Builder) -> SidePort {
        let lease = nextgres_test::ports::lease(&nextgres_test::dirs::root(), &[])
            .expect("leasing a side port for the pooler");
        let pool_port = lease.port();
        let pg = b.conf(format!("nextgres.port = {pool_port}")).start();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], pool_port));
        assert!(
            nextgres_test::wait_until(Duration::from_secs(60), || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            }),
            "pooler side port {pool_port} never accepted\n{}",
            pg.log_tail(40)
        );
        SidePort {
            pg,
            pool_port,
            _lease: lease,
        }
    }

    /// Straight to the server's own TCP listener.
    pub fn direct(&self, user: &str, db: &str) -> ConnInfo {
        self.pg.tcp(user, db)
    }

    /// Through the pooler's side port.
    pub fn pooled(&self, user: &str, db: &str) -> ConnInfo {
        ConnInfo::new("127.0.0.1", self.pool_port, user, db)
    }
}

/// Runs `;`-separated statements one by one as the superuser (CREATE
/// DATABASE refuses a multi-statement string), panicking on error.
#[track_caller]
pub fn exec(pg: &Cluster, sql: &str) {
    let mut admin = pg.admin();
    for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        if let Err(e) = admin.batch_execute(stmt) {
            panic!("{stmt}: {e:?}");
        }
    }
}

/// The fields of an error a client can see (no file/line/routine: those
/// legitimately differ between the server and the pooler).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// What a rust-postgres connection attempt ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Connected; value of the probe query.
    Ok(String),
    /// The server (or the pooler) sent an ErrorResponse.
    Db(ErrFields),
    /// Any other failure (I/O, client-side), as text.
    Other(String),
}

pub fn err_fields(e: &postgres::Error) -> Option<ErrFields> {
    e.as_db_error().map(|d| ErrFields {
        severity: d.severity().to_string(),
        code: d.code().code().to_string(),
        message: d.message().to_string(),
        detail: d.detail().map(str::to_string),
        hint: d.hint().map(str::to_string),
    })
}

pub fn outcome_of(r: Result<String, postgres::Error>) -> Outcome {
    match r {
        Ok(v) => Outcome::Ok(v),
        Err(e) => match err_fields(&e) {
            Some(f) => Outcome::Db(f),
            None => Outcome::Other(e.to_string()),
        },
    }
}

/// Connects with rust-postgres (optionally with `options`) and runs
/// `SELECT current_user`; bounded by a timeout so a stuck login fails.
pub fn rust_outcome(ci: &ConnInfo, options: Option<&str>) -> Outcome {
    let mut cfg = ci.config();
    if let Some(o) = options {
        cfg.options(o);
    }
    let what = format!("rust-postgres login {}", ci.conninfo());
    nextgres_test::with_timeout(Duration::from_secs(20), &what, move || {
        outcome_of(cfg.connect(postgres::NoTls).and_then(|mut c| {
            c.simple_query("SELECT current_user")
                .map(|m| first_value(&m).unwrap_or_default())
        }))
    })
}

/// The first column of the first row of a simple-query reply.
pub fn first_value(msgs: &[postgres::SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// psql's view of a login: `ok:<stdout>` or `err:<stderr>` with the port
/// number (the only legitimate difference) blanked. PGOPTIONS carries
/// `options` when given.
pub fn psql_outcome(pg: &Cluster, ci: &ConnInfo, options: Option<&str>) -> String {
    let mut conninfo = ci.conninfo();
    if let Some(o) = options {
        // `options` in the conninfo string is what PGOPTIONS would set.
        conninfo.push_str(&format!(
            " options='{}'",
            o.replace('\\', "\\\\").replace('\'', "\\'")
        ));
    }
    let mut c = std::process::Command::new(pg.install().client_bin("psql"));
    nextgres_test::cmd::scrub_pg_env(&mut c);
    if let Some(p) = &ci.password {
        c.env("PGPASSWORD", p);
    }
    // -w: never prompt for a password (a missing one is a result too).
    c.args([
        "-X",
        "-w",
        "-A",
        "-t",
        "-d",
        &conninfo,
        "-c",
        "SELECT current_user",
    ]);
    let out = nextgres_test::cmd::run(c, Duration::from_secs(60)).expect("starting psql");
    assert!(!out.timed_out, "psql hung:\n{out}");
    let port_text = format!("port {}", ci.port);
    let norm = |s: &str| s.trim().replace(&port_text, "port N");
    if out.success() {
        format!("ok:{}|{}", out.stdout.trim(), norm(&out.stderr))
    } else {
        format!("err:{}", norm(&out.stderr))
    }
}

// ---- raw protocol ---------------------------------------------------------

/// One backend message: tag and body.
#[derive(Clone, Debug)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// ErrorResponse/NoticeResponse fields by their one-letter code.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut i = 0;
        while i < self.body.len() && self.body[i] != 0 {
            let c = self.body[i];
            let end = self.body[i + 1..].iter().position(|&b| b == 0)? + i + 1;
            if c == code {
                return Some(String::from_utf8_lossy(&self.body[i + 1..end]).into_owned());
            }
            i = end + 1;
        }
        None
    }
}

/// A protocol-3.0 StartupMessage with exactly these parameters.
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    startup_packet_version(196608, params)
}

/// A StartupMessage carrying this protocol version code (major << 16 | minor).
pub fn startup_packet_version(code: i32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// Sends a StartupMessage and reads replies until ReadyForQuery, an
/// ErrorResponse, an authentication request other than Ok, or EOF. Returns
/// the messages and whether the peer closed the connection afterwards
/// (checked for errors only). The socket must have a read timeout set.
pub fn raw_startup<S: Read + Write>(s: &mut S, params: &[(&str, &str)]) -> (Vec<Msg>, bool) {
    s.write_all(&startup_packet(params))
        .expect("sending startup packet");
    let mut msgs = Vec::new();
    loop {
        let Some(m) = read_msg(s) else {
            return (msgs, true);
        };
        let tag = m.tag;
        let auth_other = tag == b'R' && m.body.get(..4) != Some(&[0, 0, 0, 0]);
        msgs.push(m);
        if tag == b'E' {
            // After a FATAL the peer must hang up: nothing else may follow.
            let closed = read_msg(s).is_none();
            return (msgs, closed);
        }
        if tag == b'Z' || auth_other {
            return (msgs, false);
        }
    }
}

/// Reads one message; None on EOF, error or timeout.
pub fn read_msg<S: Read>(s: &mut S) -> Option<Msg> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).ok()?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if !(4..=(1 << 24)).contains(&len) {
        return None;
    }
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body).ok()?;
    Some(Msg { tag: head[0], body })
}

/// A frontend message: tag, length word, body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A simple Query message.
pub fn query_msg(sql: &str) -> Vec<u8> {
    message(b'Q', &[sql.as_bytes(), b"\0"].concat())
}

/// The Linux scheduling policy of a process (`/proc/<pid>/stat` field 41:
/// 0 SCHED_OTHER, 3 SCHED_BATCH).
pub fn sched_policy(pid: i32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').expect("a command name") + 1..];
    rest.split_whitespace().nth(41 - 3).expect("field 41").parse().expect("a policy")
}
