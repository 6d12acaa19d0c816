//! pg_hba.conf methods the pooler does not implement, authenticated by the
//! server itself (pooler `dedicated.rs`, backend `login.rs`): a plaintext
//! client whose line says `ident` gets a dedicated backend that runs the
//! server's own `ClientAuthentication()` on the client's socket. Tried both
//! ways on a side-port cluster (same pg_hba.conf, two doors) against a real
//! identd (Debian's `oidentd`, installed by tools/setup, run here as root on
//! 127.0.0.1:113 for the test's lifetime): the mapped role logs in, an
//! unmapped one gets the server's refusal, field by field as directly. Without
//! the DBA's opt-in line the pooler refuses with a hint naming it.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test server_auth -- --test-threads=2
//! ```

mod pool_support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nextgres_test::{wait_until, Cluster};
use pool_support::{exec, psql_outcome, rust_outcome, Outcome, SidePort};

/// `oidentd` in the foreground on 127.0.0.1:113, killed on drop. None when
/// something else already answers there (a system identd serves as well).
/// Tests that need it take turns (one port, one identd at a time).
struct Identd(Option<Child>, #[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

static IDENTD_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Identd {
    fn start() -> Identd {
        let turn = IDENTD_TURN.lock().unwrap_or_else(|p| p.into_inner());
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 113));
        let up = || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok();
        if up() {
            return Identd(None, turn);
        }
        let child = Command::new("oidentd")
            .args(["-i", "-S", "-q", "-a", "127.0.0.1", "-p", "113"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting oidentd (tools/setup installs it; the test runs as root for port 113)");
        let d = Identd(Some(child), turn);
        assert!(wait_until(Duration::from_secs(30), up), "oidentd never listened on 127.0.0.1:113");
        d
    }
}

impl Drop for Identd {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes pg_ident.conf (the server reads it as its own OS user; the file is
/// world-readable) and reloads.
fn set_ident(pg: &Cluster, text: &str) {
    std::fs::write(pg.data_dir().join("pg_ident.conf"), text).expect("writing pg_ident.conf");
}

const ROLES: [&str; 3] = ["alice", "bob", "repl_u"];

/// The opt-in map: the pooler's OS user may log in as any role; every other
/// OS user only as itself (plain peer). PostgreSQL 15 has no `all` in the
/// role column, so the roles are listed there.
fn opt_in_map(os_user: &str) -> String {
    let mut m = String::new();
    if nextgres_test::pg_major() >= 16 {
        m.push_str(&format!("nextgres {os_user} all\n"));
    } else {
        for r in ROLES {
            m.push_str(&format!("nextgres {os_user} {r}\n"));
        }
    }
    m.push_str("nextgres /^(.*)$ \\1\n");
    m
}

fn hba(opt_in: bool) -> String {
    format!(
        "local all postgres trust\n{}\
         host all rejected 127.0.0.1/32 reject\n\
         host all,replication all 127.0.0.1/32 ident map=idmap\n",
        if opt_in { "local all,replication all peer map=nextgres\n" } else { "local all all peer\n" }
    )
}

fn cluster(opt_in: bool) -> SidePort {
    let sp = SidePort::start(Cluster::builder().hba(hba(opt_in)).conf("nextgres.pool_size = 2"));
    exec(&sp.pg, "CREATE EXTENSION nextgres; CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN; CREATE ROLE rejected LOGIN; CREATE ROLE repl_u LOGIN REPLICATION");
    // The test's client runs as root: identd names root, mapped to alice
    // and repl_u only.
    let client_os = nextgres_test::os_user_name(unsafe { libc::getuid() });
    let os_user = sp.pg.server_os_user();
    set_ident(
        &sp.pg,
        &format!("{}idmap {client_os} alice\nidmap {client_os} repl_u\n", opt_in_map(&os_user)),
    );
    sp.pg.reload().expect("reload");
    sp
}

/// Each login both ways with rust-postgres and psql; the direct answer is
/// checked against `expect` ("ok" or a SQLSTATE) so both sides cannot agree
/// on a broken setup.
fn compare(sp: &SidePort, cases: &[(&str, &str, &str)]) -> Vec<String> {
    let mut problems = Vec::new();
    for &(user, db, expect) in cases {
        let (direct, pooled) = (sp.direct(user, db), sp.pooled(user, db));
        let (rd, rp) = (rust_outcome(&direct, None), rust_outcome(&pooled, None));
        let matches = match (&rd, expect) {
            (Outcome::Ok(_), "ok") => true,
            (Outcome::Db(f), code) => f.code == code,
            _ => false,
        };
        if !matches {
            problems.push(format!("{user}@{db}: direct gave {rd:?}, expected {expect}"));
        }
        if rd != rp {
            problems.push(format!("{user}@{db}: rust-postgres\n   direct: {rd:?}\n   pooled: {rp:?}"));
        }
        let (pd, pp) = (psql_outcome(&sp.pg, &direct, None), psql_outcome(&sp.pg, &pooled, None));
        if pd != pp {
            problems.push(format!("{user}@{db}: psql\n   direct: {pd}\n   pooled: {pp}"));
        }
    }
    problems
}

/// `ident` against a real identd, as the server answers it directly:
/// the mapped role logs in (and its session shows the client's real address),
/// an unmapped role and an unknown one get the server's own "Ident
/// authentication failed", a database error after authentication comes from
/// the server too, and a `reject` line is still answered by the pooler the
/// same way. A replication connection through an ident line works.
#[test]
fn ident_answers_as_direct_server() {
    let _identd = Identd::start();
    let sp = cluster(true);
    let mut cases = vec![
        ("alice", "postgres", "ok"),
        ("bob", "postgres", "28000"),
        ("alice", "nosuchdb", "3D000"),
        ("rejected", "postgres", "28000"),
    ];
    // 15's opt-in map lists the roles, so a role not in it (an unknown one
    // here) fails at the pooler's own local login instead (README).
    if nextgres_test::pg_major() >= 16 {
        cases.push(("nosuchrole", "postgres", "28000"));
    }
    let problems = compare(&sp, &cases);
    assert!(problems.is_empty(), "{} mismatches:\n{}\n{}", problems.len(), problems.join("\n"), sp.pg.log_tail(30));

    // The dedicated session is the client's own: real address, the pooler's
    // port as the server side, an ordinary backend outside any pool.
    let mut c = sp.pooled("alice", "postgres").connect().expect("alice through the pooler");
    let row = c
        .query_one(
            "SELECT client_addr::text, inet_server_port(), pg_backend_pid()
               FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .expect("session row");
    let (addr, port, pid): (String, i32, i32) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((addr.as_str(), port), ("127.0.0.1/32", i32::from(sp.pool_port)));
    let mut admin = sp.pg.admin();
    let pools: i64 = admin
        .query_one("SELECT count(*) FROM nextgres.pools WHERE role = 'alice'", &[])
        .expect("nextgres.pools")
        .get(0);
    assert_eq!(pools, 0, "a server-authenticated client joins no pool");
    // Its cancel key reaches it through the pooler's port.
    let token = c.cancel_token();
    let canceller = std::thread::spawn(move || {
        let running = wait_until(Duration::from_secs(30), || {
            admin
                .query_one("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", &[&pid])
                .is_ok_and(|r| r.get::<_, i64>(0) == 1)
        });
        assert!(running, "pg_sleep never started");
        token.cancel_query(postgres::NoTls)
    });
    let r = c.simple_query("SELECT pg_sleep(60)");
    canceller.join().expect("cancel thread").expect("cancel request");
    let code = r.err().and_then(|e| e.code().map(|c| c.code().to_string()));
    assert_eq!(code.as_deref(), Some("57014"), "pg_sleep of backend {pid} was not cancelled");

    // The session has left the pooler: it survives a SIGTERM of the pooler
    // (same backend, same connection), as a direct session would.
    let pooler = |a: &mut postgres::Client| -> Option<i32> {
        a.query_one("SELECT pooler_pid FROM nextgres.status()", &[]).ok().and_then(|r| r.get(0))
    };
    let mut admin = sp.pg.admin();
    let old = pooler(&mut admin).expect("pooler pid");
    assert_eq!(unsafe { libc::kill(old, libc::SIGTERM) }, 0);
    assert!(
        wait_until(Duration::from_secs(60), || pooler(&mut admin).is_some_and(|p| p != old)),
        "no new pooler after SIGTERM"
    );
    let after: i32 = c.query_one("SELECT pg_backend_pid()", &[]).expect("session after the pooler's SIGTERM").get(0);
    assert_eq!(after, pid);
    drop(c);

    // Physical replication through the ident line, both ways.
    let repl = |port: u16| {
        let ci = format!("host=127.0.0.1 port={port} user=repl_u dbname=replication replication=true");
        let mut c = Command::new(sp.pg.install().client_bin("psql"));
        nextgres_test::cmd::scrub_pg_env(&mut c);
        c.args(["-X", "-w", "-A", "-t", "-d", &ci, "-c", "IDENTIFY_SYSTEM"]);
        let out = nextgres_test::cmd::run(c, Duration::from_secs(60)).expect("starting psql");
        (out.success(), out.stdout.split('|').next().unwrap_or_default().to_string(), out.stderr)
    };
    let (d, p) = (repl(sp.pg.port()), repl(sp.pool_port));
    assert!(d.0, "direct IDENTIFY_SYSTEM failed: {}", d.2);
    assert_eq!(d.1, p.1, "pooled IDENTIFY_SYSTEM: {}", p.2);
}

/// A startup packet with `params`, sent raw to `port`: "ready" or the
/// ErrorResponse's SQLSTATE and message.
fn raw_login(port: u16, params: &[(&str, &str)]) -> String {
    use std::io::{Read, Write};
    let pkt = pool_support::startup_packet(params);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    s.write_all(&pkt).expect("startup packet");
    loop {
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).is_err() {
            return "eof".into();
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut m = vec![0u8; len.saturating_sub(4)];
        s.read_exact(&mut m).expect("message body");
        match head[0] {
            b'Z' => return "ready".into(),
            b'E' => {
                let field = |t: u8| {
                    m.split(|&b| b == 0)
                        .find(|f| f.first() == Some(&t))
                        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                        .unwrap_or_default()
                };
                return format!("{} {}", field(b'C'), field(b'M'));
            }
            _ => {}
        }
    }
}

/// A client that sends the pooler's own startup options (the server-auth
/// marker, the pool token, or both) gets the server hook's refusal, through
/// the pooler as directly.
#[test]
fn pooler_options_from_a_client_are_refused() {
    let _identd = Identd::start();
    let sp = cluster(true);
    let base = [("user", "alice"), ("database", "postgres")];
    assert_eq!(raw_login(sp.pg.port(), &base), "ready");
    assert_eq!(raw_login(sp.pool_port, &base), "ready");
    for extra in [
        vec![("nextgres.server_auth", "1")],
        vec![("nextgres.pool_token", "00")],
        vec![("nextgres.server_auth", "1"), ("nextgres.pool_token", "00")],
    ] {
        let params: Vec<(&str, &str)> = base.iter().copied().chain(extra.iter().copied()).collect();
        let direct = raw_login(sp.pg.port(), &params);
        assert_eq!(direct, "28000 nextgres: invalid pooled-backend login", "{extra:?}");
        assert_eq!(raw_login(sp.pool_port, &params), direct, "{extra:?}");
    }
}

/// Without the opt-in Unix-socket line the pooler cannot log the client's
/// backend in: the client gets a clear refusal whose hint names the line.
#[test]
fn without_opt_in_line_refused_with_hint() {
    let sp = cluster(false);
    let Outcome::Db(f) = rust_outcome(&sp.pooled("alice", "postgres"), None) else {
        panic!("expected an error");
    };
    assert_eq!(f.code, "28000", "{f:?}");
    let hint = f.hint.unwrap_or_default();
    assert!(hint.contains("local all,replication all peer map=nextgres"), "hint: {hint}");
    // reject is still the pooler's own answer, as the server's.
    let problems = compare(&sp, &[("rejected", "postgres", "28000")]);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
