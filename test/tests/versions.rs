//! What differs between PostgreSQL 15, 16, 17 and 18 at the client's door,
//! differentially (side-port mode: the same steps on the server's own TCP
//! listener and through the pooler): NegotiateProtocolVersion for newer
//! minors and unknown `_pq_.` options, BackendKeyData's key length
//! (protocol 3.2 on 18: 32 bytes) and CancelRequest with that key, psql 18
//! with `max_protocol_version=3.2` and `latest` on every version, and on 18
//! the reported `search_path` and the `oauth` hba method.
//!
//! ```sh
//! NEXTGRES_PG=18 cargo test -p nextgres-test --test versions -- --test-threads=2
//! ```

mod pool_support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use nextgres_test::{wait_until, Cluster};
use pool_support::{exec, read_msg, Msg, SidePort};

const MINOR_3_2: u16 = 2;

/// A StartupMessage for protocol 3.`minor` with these parameters.
fn startup(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    pool_support::startup_packet_version((3i32 << 16) | i32::from(minor), params)
}

fn connect(port: u16) -> TcpStream {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    s
}

/// Logs in (trust) with protocol 3.`minor` and `params`; returns every
/// message up to ReadyForQuery or the error, and the open socket.
fn login(port: u16, minor: u16, params: &[(&str, &str)]) -> (Vec<Msg>, TcpStream) {
    let mut s = connect(port);
    s.write_all(&startup(minor, params)).expect("startup");
    let mut msgs = Vec::new();
    while let Some(m) = read_msg(&mut s) {
        let tag = m.tag;
        msgs.push(m);
        if tag == b'Z' || tag == b'E' {
            break;
        }
    }
    (msgs, s)
}

/// What a login shows that the protocol version decides: each message tag,
/// NegotiateProtocolVersion in full, BackendKeyData's key length, errors by
/// SQLSTATE and message. ParameterStatus values are left out (the pooler
/// reports a pool's values; tested elsewhere).
fn shape(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag != b'S')
        .map(|m| match m.tag {
            b'v' => format!("v{:?}", m.body),
            b'K' => format!("K key of {} bytes", m.body.len() - 4),
            b'E' => format!("E {} {}", m.field(b'C').unwrap_or_default(), m.field(b'M').unwrap_or_default()),
            b'R' => format!("R{:?}", &m.body[..4.min(m.body.len())]),
            t => format!("{}", t as char),
        })
        .collect()
}

fn key_data(msgs: &[Msg]) -> (i32, Vec<u8>) {
    let k = msgs.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    (i32::from_be_bytes(k.body[..4].try_into().unwrap()), k.body[4..].to_vec())
}

fn send_query(s: &mut TcpStream, sql: &str) {
    s.write_all(&pool_support::query_msg(sql)).expect("query");
}

/// Reads until ReadyForQuery; the SQLSTATE of an error, if one came.
fn until_ready(s: &mut TcpStream) -> Option<String> {
    let mut code = None;
    loop {
        let m = read_msg(s).expect("a reply before ReadyForQuery");
        match m.tag {
            b'E' => code = m.field(b'C'),
            b'Z' => return code,
            _ => {}
        }
    }
}

fn cancel(port: u16, pid: i32, key: &[u8]) {
    let mut pkt = ((12 + key.len()) as i32).to_be_bytes().to_vec();
    pkt.extend_from_slice(&80877102i32.to_be_bytes());
    pkt.extend_from_slice(&pid.to_be_bytes());
    pkt.extend_from_slice(key);
    let mut s = connect(port);
    s.write_all(&pkt).expect("cancel request");
    // The server answers nothing and closes.
    assert!(read_msg(&mut s).is_none(), "a cancel request gets no reply");
}

/// Every protocol version and `_pq_.` option mix gets, through the pooler,
/// exactly the direct server's NegotiateProtocolVersion (full version code:
/// 196608 = 3.0 up to 17, 196610 = 3.2 on 18), the same key length (32
/// bytes for 3.2 on 18) and the same refusal of an unknown major.
#[test]
fn protocol_negotiation_matches_direct_server() {
    let sp = SidePort::start(Cluster::builder().conf("nextgres.pool_size = 2"));
    let base = [("user", "postgres"), ("database", "postgres")];
    let cases: Vec<(u16, Vec<(&str, &str)>)> = vec![
        (0, vec![]),
        (0, vec![("_pq_.x", "1")]),
        (1, vec![]),
        (MINOR_3_2, vec![]),
        (MINOR_3_2, vec![("_pq_.x", "1"), ("_pq_.y", "2")]),
        (3, vec![]),
        (9999, vec![("_pq_.grease", "1")]),
    ];
    let mut problems = Vec::new();
    for (minor, extra) in &cases {
        let params: Vec<(&str, &str)> = base.iter().copied().chain(extra.iter().copied()).collect();
        let (d, _) = login(sp.pg.port(), *minor, &params);
        let (p, mut ps) = login(sp.pool_port, *minor, &params);
        let (ds, pshape) = (shape(&d), shape(&p));
        eprintln!("3.{minor} {extra:?}: {ds:?}");
        if ds != pshape {
            problems.push(format!("3.{minor} {extra:?}\n   direct: {ds:?}\n   pooled: {pshape:?}"));
        }
        // The session works whatever the client asked for.
        send_query(&mut ps, "SELECT 1");
        assert_eq!(until_ready(&mut ps), None, "3.{minor}: query through the pooler");
    }
    // An unknown major: the server's words, with its own newest version.
    let mut refused = Vec::new();
    for port in [sp.pg.port(), sp.pool_port] {
        let mut s = connect(port);
        s.write_all(&pool_support::startup_packet_version(4 << 16, &base)).expect("startup 4.0");
        refused.push(shape(&read_msg(&mut s).into_iter().collect::<Vec<_>>()));
    }
    if refused[0] != refused[1] {
        problems.push(format!("protocol 4.0\n   direct: {:?}\n   pooled: {:?}", refused[0], refused[1]));
    }
    assert!(problems.is_empty(), "differences:\n{}", problems.join("\n"));
}

/// A 3.2 client gets the server's key length (32 bytes on 18, 4 before) and
/// its CancelRequest with that key cancels its running query through the
/// pooler; a key one byte short cancels nothing (the same query then ends
/// normally).
#[test]
fn cancel_with_protocol_3_2_key() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    let port = pg.port();
    let (msgs, mut s) = login(port, MINOR_3_2, &[("user", "postgres"), ("database", "postgres")]);
    let (pid, key) = key_data(&msgs);
    let want = if pg.pg_major() >= 18 { 32 } else { 4 };
    assert_eq!(key.len(), want, "BackendKeyData key length for a 3.2 client");

    // A wrong key (one byte short) must not cancel: pg_sleep(0.5) ends normally.
    send_query(&mut s, "SELECT pg_sleep(0.5)");
    cancel(port, pid, &key[..key.len() - 1]);
    assert_eq!(until_ready(&mut s), None, "a short key cancelled the query");

    send_query(&mut s, "SELECT pg_sleep(60)");
    assert!(
        wait_until(Duration::from_secs(30), || {
            pg.activity().iter().any(|a| a.query.as_deref().is_some_and(|q| q.contains("pg_sleep(60)")) && a.state.as_deref() == Some("active"))
        }),
        "pg_sleep never started: {:?}",
        pg.activity()
    );
    cancel(port, pid, &key);
    assert_eq!(until_ready(&mut s).as_deref(), Some("57014"), "query cancelled with the long key");
    send_query(&mut s, "SELECT 1");
    assert_eq!(until_ready(&mut s), None);
}

/// psql 18 (libpq 18) with `max_protocol_version=3.2`, `latest` and its
/// defaults connects through the pooler on every version and sees the
/// protocol the server would give it; on 18 a running pg_sleep is cancelled
/// (SIGINT to psql: libpq sends the long key).
#[test]
fn psql18_protocol_versions_through_pooler() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    let psql18 = std::path::PathBuf::from(
        std::env::var_os("NEXTGRES_PGROOT").map(std::path::PathBuf::from).unwrap_or_else(|| "/opt/nextgres-pg".into()),
    )
    .join("pg18/bin/psql");
    assert!(psql18.exists(), "{} missing (tools/setup installs PostgreSQL 18)", psql18.display());
    let expect_proto = if pg.pg_major() >= 18 { "3.2" } else { "3.0" };
    for max in [None, Some("3.2"), Some("latest")] {
        let mut conninfo = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", pg.port());
        if let Some(m) = max {
            conninfo.push_str(&format!(" max_protocol_version={m}"));
        }
        let out = std::process::Command::new(&psql18)
            .args(["-X", "-A", "-t", "-d", &conninfo, "-c", "SELECT 41 + 1", "-c", "\\conninfo"])
            .env_remove("PGHOST")
            .env_remove("PGPORT")
            .output()
            .expect("running psql 18");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "psql 18 with {max:?}: {stderr}");
        assert!(stdout.lines().next() == Some("42"), "psql 18 with {max:?}: {stdout}");
        let proto = stdout
            .lines()
            .find(|l| l.starts_with("Protocol Version|"))
            .map(|l| l.trim_start_matches("Protocol Version|").to_string());
        let want = if max.is_none() { "3.0" } else { expect_proto };
        assert_eq!(proto.as_deref(), Some(want), "psql 18 with {max:?}: {stdout}");
    }
    if pg.pg_major() < 18 {
        return;
    }
    // Cancel a running pg_sleep with the long key (psql on SIGINT).
    let conninfo = format!("host=127.0.0.1 port={} user=postgres dbname=postgres max_protocol_version=3.2", pg.port());
    let child = std::process::Command::new(&psql18)
        .args(["-X", "-d", &conninfo, "-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql 18");
    assert!(
        wait_until(Duration::from_secs(30), || {
            pg.activity().iter().any(|a| a.query.as_deref().is_some_and(|q| q.contains("pg_sleep(60)")) && a.state.as_deref() == Some("active"))
        }),
        "pg_sleep never started: {:?}",
        pg.activity()
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = nextgres_test::with_timeout(Duration::from_secs(30), "psql 18 ending after the cancel", move || {
        child.wait_with_output()
    })
    .expect("psql 18 output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "psql 18 after SIGINT: {stderr}"
    );
}

/// search_path values a client sees in ParameterStatus (at login and after
/// its own SET), in order.
fn search_paths(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m.tag == b'S')
        .filter_map(|m| {
            let mut parts = m.body.split(|&b| b == 0);
            let name = parts.next()?;
            let value = parts.next()?;
            (name == b"search_path").then(|| String::from_utf8_lossy(value).into_owned())
        })
        .collect()
}

/// Reads until ReadyForQuery and returns the messages.
fn collect_until_ready(s: &mut TcpStream) -> Vec<Msg> {
    let mut out = Vec::new();
    loop {
        let m = read_msg(s).expect("a reply before ReadyForQuery");
        let done = m.tag == b'Z';
        out.push(m);
        if done {
            return out;
        }
    }
}

/// 18 reports `search_path` (GUC_REPORT): two clients sharing one pooled
/// backend each see ParameterStatus for their own value only (never the
/// other client's, which the backend held a moment before), at login exactly
/// what a direct session sees, and after their own SET as a direct session
/// does; up to 17 nobody sees one. A client switched onto the backend may
/// get its own unchanged value again (the switch re-applies its session).
#[test]
fn search_path_status_is_per_client() {
    let sp = SidePort::start(Cluster::builder().conf("nextgres.pool_size = 1"));
    exec(&sp.pg, "CREATE SCHEMA a; CREATE SCHEMA b");
    let default = "\"$user\", public";
    // (client, statement, that client's search_path afterwards); the first
    // two are the logins.
    let steps: [(usize, &str, &str); 7] = [
        (0, "login search_path=a", "a"),
        (1, "login", default),
        (0, "SET search_path = a, public", "a, public"),
        (1, "SELECT current_schemas(false)", default),
        (1, "SET search_path = b", "b"),
        (0, "SELECT 1", "a, public"),
        (1, "RESET search_path", default),
    ];
    let run = |port: u16| -> Vec<Vec<String>> {
        let (la, mut a) = login(port, 0, &[("user", "postgres"), ("database", "postgres"), ("search_path", "a")]);
        let (lb, mut b) = login(port, 0, &[("user", "postgres"), ("database", "postgres")]);
        let mut seen = vec![search_paths(&la), search_paths(&lb)];
        for (who, sql, _) in &steps[2..] {
            let s = if *who == 0 { &mut a } else { &mut b };
            send_query(s, sql);
            seen.push(search_paths(&collect_until_ready(s)));
        }
        seen
    };
    let (direct, pooled) = (run(sp.pg.port()), run(sp.pool_port));
    eprintln!("direct: {direct:?}\npooled: {pooled:?}");
    assert_eq!(pooled[..2], direct[..2], "search_path ParameterStatus at login");
    for (i, (who, sql, own)) in steps.iter().enumerate() {
        for (side, seen) in [("direct", &direct[i]), ("pooled", &pooled[i])] {
            assert!(
                seen.iter().all(|v| v == own),
                "{side}: client {who} after {sql:?} saw search_path {seen:?}, its own is {own:?}"
            );
        }
        assert!(
            direct[i].is_empty() || !pooled[i].is_empty(),
            "client {who} after {sql:?}: direct reports {:?}, the pooler nothing",
            direct[i]
        );
    }
    if sp.pg.pg_major() >= 18 {
        assert_eq!(direct[0], vec!["a".to_string()], "18 reports search_path at login");
    } else {
        assert!(
            direct.iter().chain(&pooled).all(|v| v.is_empty()),
            "search_path is not reported before 18"
        );
    }
}

/// 18's `oauth` hba method: a method the pooler does not implement, so for a
/// plaintext client the server answers itself (server authentication, README
/// "Other authentication methods"; the test clusters' `local all all trust`
/// lets the pooler's login in): the client gets exactly what a direct
/// connection to a server without nextgres gets (the server's OAUTHBEARER
/// SASL request, which rust-postgres does not speak). (Over TLS the pooler
/// refuses such methods with 28000 naming the hba file and line: README.)
#[test]
fn oauth_hba_line_answered_as_the_server() {
    let pg = Cluster::builder().preload(true).start();
    if pg.pg_major() < 18 {
        return;
    }
    let direct = Cluster::builder().preload(false).start();
    let line = "host all oauth_u 127.0.0.1/32 oauth issuer=\"https://issuer.example\" scope=\"openid\" validator=\"ng_none\"";
    for c in [&pg, &direct] {
        exec(c, "CREATE ROLE oauth_u LOGIN");
        let hba_file: String = c.admin().query_one("SHOW hba_file", &[]).expect("hba_file").get(0);
        let text = std::fs::read_to_string(&hba_file).expect("reading pg_hba.conf");
        c.append_conf("oauth_validator_libraries = 'ng_none'").expect("conf");
        c.set_hba(&format!("{line}\n{text}")).expect("hba");
        c.reload().expect("reload");
    }
    let outcome = |c: &Cluster| match c.tcp("oauth_u", "postgres").connect() {
        Ok(_) => "connected".to_string(),
        Err(e) => format!("{e}"),
    };
    let want = outcome(&direct);
    assert_ne!(want, "connected", "the server let an oauth client in without a token");
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(30), || {
        last = outcome(&pg);
        last == want
    });
    assert!(ok, "through the pooler: {last}; directly: {want}\n{}", pg.log_tail(20));
}
