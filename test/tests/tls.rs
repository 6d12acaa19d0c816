//! TLS on the standard port through the pooler (issue 12, first step): the
//! pooler answers SSLRequest with 'S', does the handshake with rustls on a
//! relay thread and hands the backend the plaintext end of a socketpair, so
//! transactions still move between pooled backends. The test makes its own
//! CA and server certificate with the `openssl` CLI.
//!
//! Runs on the OpenSSL builds (15, 17, 18); on 16 (pgserver, no OpenSSL)
//! each test prints why it skips.
//!
//! ```sh
//! NEXTGRES_PG=17 cargo test -p nextgres-test --test tls -- --test-threads=2
//! ```
mod fault_support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use fault_support::{admin_i64, pooler_pid, running_pooler_pid, setup, terminate_agent, terminate_pooler, SETTLE, TEST_LIMIT};
use nextgres_test::raw::{parse_error, parse_row, RawFail};
use nextgres_test::tls::{client_config, install_cert, make_certs, openssl, skip_without_openssl as skip, ssl_on};
use nextgres_test::{wait_until, Cluster, CmdOutput, ConnInfo};

// ---- certificates -----------------------------------------------------------

/// Starts a cluster from `b` (skipped without OpenSSL), turns `ssl` on with a
/// certificate from a test CA (`ssl_on`; the restart waits for the pooler) and
/// runs `body` with the CA file and the pooler's pid, bounded by TEST_LIMIT.
fn with_tls_server(b: nextgres_test::Builder, body: impl FnOnce(&Cluster, PathBuf, i32) + Send + 'static) {
    let pg = Arc::new(b.start());
    if skip(&pg) {
        return;
    }
    setup(&pg);
    pg.run_bounded(TEST_LIMIT, |pg| {
        let ca = ssl_on(pg);
        let pooler = running_pooler_pid(pg);
        body(pg, ca, pooler);
    });
}

/// A client certificate for `cn` signed by the CA `make_certs` made as
/// `ca_name`; returns libpq's `sslcert=... sslkey=...`.
fn client_cert(pg: &Cluster, ca_name: &str, cn: &str) -> String {
    client_cert_subj(pg, ca_name, cn, &format!("/CN={cn}"))
}

/// [`client_cert`] with the subject `subj` (openssl `-subj`, UTF-8 as
/// UTF8String), files named after `base`.
fn client_cert_subj(pg: &Cluster, ca_name: &str, base: &str, subj: &str) -> String {
    client_cert_ext(pg, ca_name, base, subj, "")
}

/// [`client_cert_subj`] with more extension lines `ext` (openssl syntax).
fn client_cert_ext(pg: &Cluster, ca_name: &str, base: &str, subj: &str, ext: &str) -> String {
    client_cert_made(pg, ca_name, base, subj, Some(&format!("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n{ext}")))
}

/// An X.509 v1 client certificate (no extensions: `openssl x509 -req`
/// without `-extfile`, the PostgreSQL documentation's recipe), else as
/// [`client_cert_subj`].
fn client_cert_v1(pg: &Cluster, ca_name: &str, base: &str, subj: &str) -> String {
    let out = client_cert_made(pg, ca_name, base, subj, None);
    let crt = pg.dir().join(format!("client-{ca_name}-{base}.crt"));
    let text = Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(&crt).output().expect("openssl x509");
    assert!(String::from_utf8_lossy(&text.stdout).contains("Version: 1 (0x0)"), "openssl made no v1 certificate");
    out
}

/// A client certificate with exactly the extensions `extfile` (none: v1).
fn client_cert_made(pg: &Cluster, ca_name: &str, base: &str, subj: &str, extfile: Option<&str>) -> String {
    let dir = pg.dir().to_path_buf();
    let base = format!("client-{ca_name}-{base}");
    let (key, csr, crt) = (format!("{base}.key"), format!("{base}.csr"), format!("{base}.crt"));
    openssl(&["req", "-new", "-nodes", "-utf8", "-newkey", "rsa:2048", "-subj", subj, "-keyout", &key, "-out", &csr], &dir);
    let (ca, ca_key) = (format!("{ca_name}-ca.crt"), format!("{ca_name}-ca.key"));
    let mut args = vec!["x509", "-req", "-in", &csr, "-CA", &ca, "-CAkey", &ca_key, "-CAcreateserial", "-days", "2", "-out", &crt];
    let ext_name = format!("{base}-ext.cnf");
    if let Some(ext) = extfile {
        std::fs::write(dir.join(&ext_name), ext).expect("ext");
        args.extend(["-extfile", &ext_name]);
    }
    openssl(&args, &dir);
    std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    format!("sslcert={} sslkey={}", dir.join(crt).display(), dir.join(key).display())
}

/// Revokes `crts` (made by `client_cert` in the test directory) with the CA
/// `ca_name` and writes that CA's CRL into the data directory as `crl`.
fn revoke(pg: &Cluster, ca_name: &str, crts: &[&str], crl: &str) {
    let dir = pg.dir().to_path_buf();
    std::fs::write(dir.join(format!("{ca_name}-index.txt")), "").expect("index");
    std::fs::write(dir.join(format!("{ca_name}-crlnumber")), "1000\n").expect("crlnumber");
    let cnf = format!("{ca_name}-ca.cnf");
    std::fs::write(
        dir.join(&cnf),
        format!("[ca]\ndefault_ca=d\n[d]\ndatabase={ca_name}-index.txt\ncrlnumber={ca_name}-crlnumber\ndefault_md=sha256\ndefault_crl_days=2\n"),
    )
    .expect("ca config");
    let (key, cert) = (format!("{ca_name}-ca.key"), format!("{ca_name}-ca.crt"));
    for crt in crts {
        openssl(&["ca", "-config", &cnf, "-revoke", crt, "-keyfile", &key, "-cert", &cert], &dir);
    }
    let out = format!("{ca_name}.crl");
    openssl(&["ca", "-config", &cnf, "-gencrl", "-keyfile", &key, "-cert", &cert, "-out", &out], &dir);
    std::fs::copy(dir.join(out), pg.data_dir().join(crl)).expect("copy CRL");
}

// ---- clients ----------------------------------------------------------------

/// psql with several `-c` (each its own transaction) and extra libpq keywords.
fn exec_admin(pg: &Cluster, sql: &str) {
    pg.admin().batch_execute(sql).expect(sql);
}

fn psql_cs(pg: &Cluster, conn: &ConnInfo, extra: &str, cs: &[&str]) -> CmdOutput {
    let conninfo = format!("{} {extra}", conn.conninfo());
    let mut args = vec!["-A", "-t", "-d", &conninfo];
    for c in cs {
        args.extend(["-c", c]);
    }
    pg.psql(conn, &args)
}

/// psql `SELECT current_user` with `extra` connection options: "ok ROLE", or
/// "failed " and the FATAL, or libpq's own reason without its "connection to
/// server at ..., port N failed:" prefix (ports differ between the clusters
/// a test compares).
fn login_outcome(pg: &Cluster, conn: &ConnInfo, extra: &str) -> String {
    let out = psql_cs(pg, conn, extra, &["SELECT current_user"]);
    if out.success() {
        return format!("ok {}", out.stdout.trim());
    }
    let err = out.stderr.lines().find_map(|l| {
        l.split_once("FATAL:").or_else(|| l.split_once(" failed: ")).map(|(_, m)| m.trim().to_string())
    });
    format!("failed {}", err.unwrap_or_else(|| out.stderr.clone()))
}

/// `expr` over this client's own row of `nextgres.clients`.
fn of_client(expr: &str) -> String {
    format!("SELECT {expr} FROM nextgres.clients WHERE client_port = inet_client_port()")
}

/// A protocol-3 client over rustls (trust authentication only), for what
/// psql does not show: the cancel key, a handshake cut short, a session
/// that lives across a reload.
struct TlsRaw {
    s: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    key: Option<(i32, Vec<u8>)>,
}

fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(SETTLE)).expect("read timeout");
    s
}

/// Sends an SSLRequest on a new connection and reads everything until the
/// pooler closes it: a refusal is a plaintext ErrorResponse.
fn refused_ssl_request(port: u16) -> (Vec<u8>, String) {
    let mut s = tcp(port);
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).expect("SSLRequest");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got).into_owned();
    (got, text)
}

/// SSLRequest on a fresh socket; returns the server's one-byte answer.
fn ssl_request(s: &mut TcpStream) -> u8 {
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).expect("SSLRequest");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("SSLRequest answer");
    b[0]
}

impl TlsRaw {
    /// SSLRequest, 'S', a handshake verifying the server against `ca` (for
    /// 127.0.0.1), then a trust login.
    fn connect(port: u16, ca: &Path, user: &str, db: &str) -> Result<TlsRaw, String> {
        Self::connect_on(tcp(port), ca, user, db)
    }

    /// [`connect`](Self::connect) as app to postgres, every read bounded by `within`.
    fn connect_within(port: u16, ca: &Path, within: Duration) -> Result<TlsRaw, String> {
        let s = tcp(port);
        s.set_read_timeout(Some(within)).expect("read timeout");
        Self::connect_on(s, ca, "app", "postgres")
    }

    fn connect_on(mut s: TcpStream, ca: &Path, user: &str, db: &str) -> Result<TlsRaw, String> {
        let answer = ssl_request(&mut s);
        if answer != b'S' {
            return Err(format!("SSLRequest answered {:?}", answer as char));
        }
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let conn = rustls::ClientConnection::new(client_config(ca), name).expect("client connection");
        let mut t = TlsRaw { s: rustls::StreamOwned::new(conn, s), key: None };
        while t.s.conn.is_handshaking() {
            t.s.conn.complete_io(&mut t.s.sock).map_err(|e| format!("handshake: {e}"))?;
        }
        let pkt = nextgres_test::raw::startup_packet(user, db);
        t.s.write_all(&pkt).map_err(|e| format!("startup: {e}"))?;
        t.until_ready().map_err(|e| format!("login: {e:?}"))?;
        Ok(t)
    }

    fn read_msg(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        nextgres_test::raw::read_message(&mut self.s)
    }

    fn until_ready(&mut self) -> Result<Vec<Vec<Option<String>>>, RawFail> {
        let (mut rows, mut err) = (Vec::new(), None);
        loop {
            let (tag, body) = match self.read_msg() {
                Ok(m) => m,
                Err(e) => return Err(err.unwrap_or(RawFail::Io(e))),
            };
            match tag {
                b'R' if body.get(..4) != Some(&[0, 0, 0, 0]) => panic!("TlsRaw: trust authentication only"),
                b'K' => self.key = Some((i32::from_be_bytes(body[..4].try_into().unwrap()), body[4..].to_vec())),
                b'D' => rows.push(parse_row(&body)),
                b'E' => err = Some(parse_error(&body)),
                b'Z' => return err.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    fn send_query(&mut self, sql: &str) {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        self.s.write_all(&m).expect("send query");
    }

    #[track_caller]
    fn value(&mut self, sql: &str) -> String {
        self.send_query(sql);
        let rows = self.until_ready().unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        rows.first().and_then(|r| r.first().cloned().flatten()).unwrap_or_else(|| panic!("{sql}: no value"))
    }
}

/// A CancelRequest sent over TLS (as libpq 17's cancel connections do with
/// sslmode=require); waits for the pooler to close the connection.
fn cancel_over_tls(port: u16, ca: &Path, pid: i32, key: &[u8]) {
    let mut s = tcp(port);
    assert_eq!(ssl_request(&mut s), b'S', "SSLRequest of the cancel connection");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let conn = rustls::ClientConnection::new(client_config(ca), name).expect("client connection");
    let mut t = rustls::StreamOwned::new(conn, s);
    let mut pkt = ((12 + key.len()) as i32).to_be_bytes().to_vec();
    pkt.extend_from_slice(&80877102i32.to_be_bytes());
    pkt.extend_from_slice(&pid.to_be_bytes());
    pkt.extend_from_slice(key);
    t.write_all(&pkt).expect("CancelRequest over TLS");
    let mut rest = Vec::new();
    let _ = t.read_to_end(&mut rest); // EOF (or a reset) once handled
}

/// Closed by the server: EOF or reset within the read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a TLS alert, say
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

// ---- tests ------------------------------------------------------------------

/// A reload to TLS files the server's OpenSSL refuses (here a key file
/// others can read, which be_tls_init() refuses) leaves the server on its
/// previous certificate ("SSL configuration was not reloaded"), and the
/// pooler too: a client that trusts the first CA still verifies the pooler.
/// The pooler used to load the new files (rustls has no such checks), so
/// the two ports served different certificates.
#[test]
fn a_reload_the_server_refuses_keeps_the_pooler_on_the_old_certificate() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 1").start();
    if skip(&pg) {
        return;
    }
    let ca_one = ssl_on(&pg);
    let conn = pg.tcp("postgres", "postgres");
    let verify = format!("sslmode=verify-full sslrootcert={}", ca_one.display());
    let out = psql_cs(&pg, &conn, &verify, &["SELECT 1"]);
    assert!(out.success(), "before the reload:\n{out}");
    let ca_two = make_certs(&pg, "two", "server2.crt");
    let key = pg.data_dir().join("server2.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mark = pg.log_mark();
    exec_admin(&pg, "ALTER SYSTEM SET ssl_cert_file = 'server2.crt'");
    exec_admin(&pg, "ALTER SYSTEM SET ssl_key_file = 'server2.key'");
    exec_admin(&pg, "SELECT pg_reload_conf()");
    let refused = |log: &str| log.matches("SSL configuration was not reloaded").count() >= 2;
    assert!(
        wait_until(Duration::from_secs(20), || refused(&pg.log_since(mark))),
        "the server and the pooler did not both keep their SSL configuration:\n{}",
        pg.log_since(mark)
    );
    let out = psql_cs(&pg, &conn, &verify, &["SELECT 1"]);
    assert!(out.success(), "the pooler left the certificate the server kept:\n{out}");
    let two = format!("sslmode=verify-full sslrootcert={}", ca_two.display());
    assert!(!psql_cs(&pg, &conn, &two, &["SELECT 1"]).success(), "the pooler serves the refused certificate");
}

/// A server certificate issued by an intermediate CA, alone in
/// ssl_cert_file, with the intermediate and the root in ssl_ca_file: the
/// server's OpenSSL sends the issuers it finds there (its automatic
/// chain), so a client that trusts only the root verifies the server; it
/// verifies the pooler the same way (`verify-ca` and `verify-full`).
#[test]
fn a_lone_server_certificate_goes_out_with_its_issuers() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 1").start();
    if skip(&pg) {
        return;
    }
    let dir = pg.dir().to_path_buf();
    let run = |args: &[&str]| openssl(args, &dir);
    run(&["req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2", "-subj", "/CN=chain root", "-keyout", "root.key", "-out", "root.crt"]);
    std::fs::write(dir.join("ca.cnf"), "basicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign,cRLSign\n").expect("ca.cnf");
    run(&["req", "-new", "-nodes", "-newkey", "rsa:2048", "-subj", "/CN=chain intermediate", "-keyout", "int.key", "-out", "int.csr"]);
    run(&["x509", "-req", "-in", "int.csr", "-CA", "root.crt", "-CAkey", "root.key", "-set_serial", "10", "-days", "2", "-extfile", "ca.cnf", "-out", "int.crt"]);
    std::fs::write(dir.join("leaf.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").expect("leaf.cnf");
    run(&["req", "-new", "-nodes", "-newkey", "rsa:2048", "-subj", "/CN=localhost", "-keyout", "leaf.key", "-out", "leaf.csr"]);
    run(&["x509", "-req", "-in", "leaf.csr", "-CA", "int.crt", "-CAkey", "int.key", "-set_serial", "11", "-days", "2", "-extfile", "leaf.cnf", "-out", "leaf.crt"]);
    let both = [std::fs::read(dir.join("int.crt")).expect("int"), std::fs::read(dir.join("root.crt")).expect("root")].concat();
    std::fs::write(dir.join("chain-ca.crt"), both).expect("chain-ca.crt");
    install_cert(&pg, &dir.join("leaf.crt"), &dir.join("leaf.key"), "server.crt");
    install_cert(&pg, &dir.join("chain-ca.crt"), &dir.join("leaf.key"), "ca.crt");
    for line in ["ssl = on", "ssl_cert_file = 'server.crt'", "ssl_key_file = 'server.key'", "ssl_ca_file = 'ca.crt'"] {
        pg.append_conf(line).expect("conf");
    }
    pg.restart().expect("restart with ssl = on");
    exec_admin(&pg, "CREATE EXTENSION IF NOT EXISTS nextgres");
    let conn = pg.tcp("postgres", "postgres");
    let root = format!("sslrootcert={}", dir.join("root.crt").display());
    for mode in ["verify-ca", "verify-full"] {
        let out = psql_cs(&pg, &conn, &format!("sslmode={mode} {root}"), &["SELECT 1"]);
        assert!(out.success(), "sslmode={mode} through the pooler, trusting only the root:\n{out}");
    }
}

/// A TLS client (served on the handoff path) in a pool whose plaintext
/// clients use the kernel queue, with backends to spare: its transactions
/// mostly stay on one backend, as when it is alone, while a plaintext
/// client runs queries beside it. Before, its wait for the recall of an
/// idle lent backend marked the pool saturated (so its backend never kept
/// it idle), lent backends were recalled in list order, and the TLS client
/// moved at every transaction (a session switch each time, and an unnamed
/// statement parsed in one request cycle and bound in the next was lost:
/// hunt5 C6).
#[test]
fn a_tls_client_keeps_its_backend_beside_kernel_queue_clients() {
    with_tls_server(Cluster::builder().conf("nextgres.pool_size = 3"), |pg, ca, _| {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let plain = {
            let (stop, ci) = (stop.clone(), pg.tcp("postgres", "postgres"));
            std::thread::spawn(move || {
                let mut c = ci.connect().expect("plaintext client");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    c.simple_query("SELECT pg_sleep(0.002)").expect("plaintext query");
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let mut cfg = pg.tcp("postgres", "postgres").config();
        cfg.ssl_mode(postgres::config::SslMode::Require);
        let mut t = cfg.connect(nextgres_test::tls::RustlsConnector::new(&ca)).expect("TLS client");
        let mut pids = Vec::new();
        for _ in 0..20 {
            let row = t.query_one("SELECT pg_backend_pid()", &[]).expect("TLS query");
            pids.push(row.get::<_, i32>(0));
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        plain.join().expect("plaintext client thread");
        // Before: a move at every transaction (19 of 19). Now it keeps its
        // backend but when the kernel queue shows a client waiting past the
        // client's time slice: a few times in 20, more on a loaded machine
        // (11 seen under the full suite on 2 cores).
        let moves = pids.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(moves <= 15, "the TLS client moved {moves} times: {pids:?}");
    });
}

/// Acceptance 1 and 3 (in part) and 4: `sslmode=require`, `verify-ca` and
/// `verify-full` connect on the standard port through the pooler; the
/// backend pid changes between a TLS client's transactions and one backend
/// serves TLS and plaintext clients in turn; `disable` and `prefer` still
/// work; `nextgres.clients.tls` names the version; 1 MB rows and COPY in
/// and out cross the relay intact; a cancel over TLS reaches the backend;
/// a replaced certificate reaches new clients after a reload while a
/// connected TLS client carries on; with `ssl_ca_file` a client
/// certificate from another CA fails the handshake, none or a good one
/// is accepted.
#[test]
fn tls_clients_on_the_standard_port_keep_the_handoff() {
    let pg = Arc::new(Cluster::builder().conf("nextgres.pool_size = 1").start());
    if skip(&pg) {
        return;
    }
    setup(&pg);
    pg.run_bounded(TEST_LIMIT, |pg| {
        let mark = pg.log_mark();
        let ca = ssl_on(pg);
        let log = pg.log_since(mark);
        assert!(log.contains("the pooler serves TLS on port"), "no startup line about TLS:\n{log}");
        let row = pg.admin().query_one("SELECT port, mode FROM nextgres.status()", &[]).expect("status");
        let (port, mode): (Option<i32>, String) = (row.get(0), row.get(1));
        assert_eq!((port, mode.as_str()), (Some(i32::from(pg.port())), "takeover"));

        let conn = pg.tcp("postgres", "postgres");
        let root = format!("sslrootcert={}", ca.display());
        for mode in ["require", "verify-ca", "verify-full"] {
            let out = psql_cs(
                pg,
                &conn,
                &format!("sslmode={mode} {root}"),
                &[
                    "SELECT pg_backend_pid()",
                    &of_client("tls"),
                    // Every backend of the pool, this one included, is
                    // replaced at its next transaction boundary.
                    "SELECT nextgres.reconnect(current_database(), current_user)",
                    "SELECT pg_backend_pid()",
                ],
            );
            assert!(out.success(), "sslmode={mode}:\n{out}");
            let lines: Vec<&str> = out.stdout.lines().collect();
            let (first, tls, last) = (lines[0], lines[1], lines[lines.len() - 1]);
            assert!(tls.starts_with("TLSv1."), "nextgres.clients.tls for sslmode={mode}: {tls:?}\n{out}");
            assert_ne!(first, last, "sslmode={mode}: both transactions on backend {first}:\n{out}");
        }
        // One backend (pool_size 1) serves TLS and plaintext clients in turn.
        let pid_plain = pg.psql_query(&conn, "SELECT pg_backend_pid()");
        let out = psql_cs(pg, &conn, &format!("sslmode=verify-full {root}"), &["SELECT pg_backend_pid()"]);
        assert!(out.success(), "{out}");
        assert_eq!(out.stdout.trim(), pid_plain, "a TLS and a plaintext client on the same pooled backend");
        let out = psql_cs(pg, &conn, "sslmode=disable", &[&of_client("tls IS NULL AND tls_cipher IS NULL")]);
        assert_eq!(out.stdout.trim(), "t", "sslmode=disable must stay plaintext:\n{out}");
        let out = psql_cs(pg, &conn, "sslmode=prefer", &[&of_client("tls LIKE 'TLSv1.%'")]);
        assert_eq!(out.stdout.trim(), "t", "sslmode=prefer must get TLS:\n{out}");
        // The address and port the client connected to, as a direct TLS
        // connection shows them (the backend's socket is the relay's
        // socketpair, not the client's TCP socket), in two transactions.
        let here = "SELECT inet_server_addr()::text || ' ' || inet_server_port()";
        let want = format!("127.0.0.1/32 {}", pg.port());
        for mode in ["disable", "require"] {
            let out = psql_cs(pg, &conn, &format!("sslmode={mode}"), &[here, here]);
            assert!(out.success(), "sslmode={mode}:\n{out}");
            let lines: Vec<&str> = out.stdout.lines().collect();
            assert_eq!(lines, [want.as_str(), want.as_str()], "inet_server_addr/port, sslmode={mode}:\n{out}");
        }

        // 1 MB rows out, then COPY out and in, over TLS; compared with what
        // the server computes itself.
        let big = "SELECT i, repeat(md5(i::text), 32768) FROM generate_series(1, 4) i";
        let direct = pg.psql_query(&pg.unix("postgres", "postgres"), big);
        let out = psql_cs(pg, &conn, "sslmode=require", &[big]);
        assert!(out.success(), "{out}");
        assert!(out.stdout.trim() == direct, "1 MB rows differ through TLS ({} bytes vs {})", out.stdout.len(), direct.len());
        pg.admin().batch_execute("CREATE TABLE big (i int, v text)").expect("table");
        let file = pg.dir().join("big.copy");
        let f = file.display();
        let out = psql_cs(
            pg,
            &conn,
            "sslmode=require",
            &[&format!("\\copy ({big}) TO '{f}'"), &format!("\\copy big FROM '{f}'")],
        );
        assert!(out.success(), "COPY over TLS:\n{out}");
        let same = admin_i64(
            pg,
            &format!("SELECT count(*) FROM big JOIN ({big}) s(i, v) USING (i) WHERE big.v = s.v"),
        );
        assert_eq!(same, 4, "COPY out and in through TLS changed rows");

        // Cancel over TLS reaches the backend serving the TLS client.
        let mut victim = TlsRaw::connect(pg.port(), &ca, "postgres", "postgres").expect("TLS raw login");
        let (pid, key) = victim.key.clone().expect("BackendKeyData");
        victim.send_query("SELECT pg_sleep(120)");
        assert!(
            wait_until(SETTLE, || admin_i64(pg, "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(120)' AND state = 'active'") == 1),
            "the sleep never started"
        );
        cancel_over_tls(pg.port(), &ca, pid, &key);
        match victim.until_ready() {
            Err(RawFail::Db { code, .. }) => assert_eq!(code, "57014", "cancel over TLS"),
            other => panic!("cancel over TLS: {other:?}"),
        }
        assert_eq!(victim.value("SELECT 1"), "1");

        // A new certificate from another CA, then a reload: new clients get
        // it; the connected one carries on.
        let ca2 = make_certs(pg, "two", "server2.crt");
        let refused = |r: Result<TlsRaw, String>| match r {
            Ok(_) => "connected".to_string(),
            Err(e) => e,
        };
        let e = refused(TlsRaw::connect(pg.port(), &ca2, "postgres", "postgres"));
        assert!(e.contains("UnknownIssuer"), "CA two trusted before the reload: {e}");
        pg.append_conf("ssl_cert_file = 'server2.crt'").expect("conf");
        pg.append_conf("ssl_key_file = 'server2.key'").expect("conf");
        pg.reload().expect("reload");
        assert!(
            wait_until(SETTLE, || TlsRaw::connect(pg.port(), &ca2, "postgres", "postgres").is_ok()),
            "new clients never got the new certificate"
        );
        let e = refused(TlsRaw::connect(pg.port(), &ca, "postgres", "postgres"));
        assert!(e.contains("UnknownIssuer"), "the old certificate after the reload: {e}");
        assert_eq!(victim.value("SELECT 2"), "2", "the TLS client connected before the reload");

        // ssl_ca_file: client certificates are asked for and checked when
        // sent (one from an unknown CA fails the handshake), optional.
        let (good, unknown) = (client_cert(pg, "one", "postgres"), client_cert(pg, "two", "postgres"));
        let ca2_root = format!("sslmode=verify-full sslrootcert={}", ca2.display());
        let out = psql_cs(pg, &conn, &format!("{ca2_root} {unknown}"), &["SELECT 1"]);
        assert!(out.success(), "a client certificate nobody asked for:\n{out}");
        std::fs::copy(&ca, pg.data_dir().join("root.crt")).expect("copy CA");
        pg.append_conf("ssl_ca_file = 'root.crt'").expect("conf");
        pg.reload().expect("reload");
        assert!(
            wait_until(SETTLE, || {
                let out = psql_cs(pg, &conn, &format!("{ca2_root} {unknown}"), &["SELECT 1"]);
                !out.success() && out.stderr.to_lowercase().contains("unknown ca")
            }),
            "a client certificate from an unknown CA still accepted after ssl_ca_file"
        );
        for extra in [String::new(), good] {
            let out = psql_cs(pg, &conn, &format!("{ca2_root} {extra}"), &["SELECT 1"]);
            assert_eq!(out.stdout.trim(), "1", "ssl_ca_file set, client certificate {extra:?}:\n{out}");
        }
    });
}

/// Acceptance 1: `hostssl` / `hostnossl` decide exactly as the server does:
/// the same pg_hba.conf on a cluster without the preload (TLS by the
/// server) and through the pooler, every role with sslmode=require and
/// disable; success or the FATAL message must match.
#[test]
fn hostssl_and_hostnossl_decide_as_the_server() {
    let pooled = Arc::new(Cluster::builder().label("pooled").start());
    if skip(&pooled) {
        return;
    }
    let direct = Cluster::builder().label("direct").preload(false).start();
    setup(&pooled);
    pooled.run_bounded(TEST_LIMIT, move |pooled| {
        let hba = "local all all trust\n\
                   hostssl all sslonly 127.0.0.1/32 trust\n\
                   hostnossl all plainonly 127.0.0.1/32 trust\n\
                   hostssl all rejssl 127.0.0.1/32 reject\n\
                   hostnossl all rejplain 127.0.0.1/32 reject\n\
                   hostssl all mixed 127.0.0.1/32 reject\n\
                   host all mixed 127.0.0.1/32 trust\n\
                   host all postgres 127.0.0.1/32 trust\n";
        let roles = ["sslonly", "plainonly", "rejssl", "rejplain", "mixed", "nobody"];
        for pg in [pooled, &direct] {
            make_certs(pg, "one", "server.crt");
            for r in roles {
                pg.admin().batch_execute(&format!("CREATE ROLE {r} LOGIN")).expect("role");
            }
            pg.append_conf("ssl = on").expect("conf");
            pg.set_hba(hba).expect("hba");
            pg.restart().expect("restart with ssl = on");
        }
        let outcome = |pg: &Cluster, role: &str, mode: &str| -> String {
            let out = psql_cs(pg, &pg.tcp(role, "postgres"), &format!("sslmode={mode}"), &["SELECT current_user"]);
            if out.success() {
                return format!("ok {}", out.stdout.trim());
            }
            // The FATAL, without libpq's "connection to server at ..." prefix.
            let err = out.stderr.lines().find_map(|l| l.split_once("FATAL:").map(|(_, m)| m.trim().to_string()));
            format!("FATAL {}", err.unwrap_or_else(|| out.stderr.clone()))
        };
        let mut seen = Vec::new();
        for role in roles {
            for mode in ["require", "disable"] {
                let (d, p) = (outcome(&direct, role, mode), outcome(pooled, role, mode));
                assert_eq!(p, d, "role {role}, sslmode={mode}: through the pooler vs the server");
                seen.push(format!("{role}/{mode}: {d}"));
            }
        }
        eprintln!("{}", seen.join("\n"));
        // Both sides of the rules were exercised.
        assert!(seen.iter().any(|s| s.starts_with("sslonly/require: ok")), "{seen:?}");
        assert!(seen.iter().any(|s| s.starts_with("sslonly/disable: FATAL")), "{seen:?}");
        assert!(seen.iter().any(|s| s.contains("SSL encryption")), "{seen:?}");
        assert!(admin_i64(pooled, "SELECT count(*) FROM nextgres.backends") >= 1, "nobody was pooled");
    });
}

/// Hostile TLS input: garbage after 'S', a ClientHello cut short and a
/// handshake that never starts do not hurt the pooler: others are served
/// meanwhile, the silent ones are closed within authentication_timeout,
/// and the pooler process is the same. Plaintext after SSLRequest is still
/// refused. When the pooler is then terminated, an idle TLS client gets its
/// FATAL 57P01.
#[test]
fn hostile_tls_input_leaves_the_pooler_serving() {
    with_tls_server(Cluster::builder().conf("authentication_timeout = '5s'"), |pg, ca, pooler| {
        let port = pg.port();

        // Garbage where the ClientHello belongs: an alert or a close.
        let mut garbage = tcp(port);
        assert_eq!(ssl_request(&mut garbage), b'S');
        garbage.write_all(&[0x16, 0x03, 0x01, 0x00, 0x10]).expect("record header");
        garbage.write_all(&[0xff; 64]).expect("garbage");
        assert!(closed(&mut garbage), "garbage after 'S' left the connection open");

        // A handshake that never starts, and a ClientHello cut in half.
        let mut silent = tcp(port);
        assert_eq!(ssl_request(&mut silent), b'S');
        let mut half = tcp(port);
        assert_eq!(ssl_request(&mut half), b'S');
        {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
            let mut c = rustls::ClientConnection::new(client_config(&ca), name).expect("client");
            let mut hello = Vec::new();
            c.write_tls(&mut hello).expect("ClientHello");
            half.write_all(&hello[..hello.len() / 2]).expect("half a ClientHello");
        }

        // Meanwhile others are served, by psql and the raw TLS client.
        let conn = pg.tcp("app", "postgres");
        for _ in 0..3 {
            let out = psql_cs(pg, &conn, "sslmode=require", &["SELECT 1"]);
            assert_eq!(out.stdout.trim(), "1", "{out}");
        }
        let mut t = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS login while others stall");
        assert_eq!(t.value("SELECT 41 + 1"), "42");

        // The stalled ones end at authentication_timeout (5 s) + SETTLE.
        for s in [&mut silent, &mut half] {
            s.set_read_timeout(Some(Duration::from_secs(5) + SETTLE)).expect("timeout");
            assert!(closed(s), "a handshake that never finished was never closed");
        }

        // Plaintext bytes right behind the SSLRequest: 'N', then a FATAL.
        let mut early = tcp(port);
        early.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f, 0, 0, 0, 8]).expect("SSLRequest and more");
        let mut got = Vec::new();
        let _ = early.read_to_end(&mut got);
        assert_eq!(got.first(), Some(&b'N'), "{got:?}");
        assert!(String::from_utf8_lossy(&got).contains("received unencrypted data after SSL request"), "{got:?}");

        assert_eq!(pooler_pid(pg), Some(pooler), "the pooler restarted");
        assert_eq!(t.value("SELECT 2"), "2");

        // The pooler stopped (SIGTERM): an idle TLS client gets the
        // pooler's FATAL through its relay, as a plaintext one does.
        terminate_pooler(pooler);
        match t.until_ready() {
            Err(RawFail::Db { code, .. }) => assert_eq!(code, "57P01", "idle TLS client at pooler exit"),
            other => panic!("idle TLS client at pooler exit: {other:?}"),
        }
    });
}

/// One KeyUpdate flooder: logs in over TLS 1.3, then writes 10,000
/// KeyUpdate(update_requested) records (`refresh_traffic_keys`) as fast as
/// the socket takes them (write timeout SETTLE), then reads until the
/// connection ends (read timeout SETTLE). Returns how many were written,
/// what stopped the writing, whether a write stalled, and the end: "EOF",
/// "TLS error: ..." (an alert), "reset: ..." or "hang: ..." (a timeout).
fn flood_key_updates(port: u16, ca: &Path) -> (usize, Option<String>, bool, String) {
    let mut flood = TlsRaw::connect(port, ca, "app", "postgres").expect("TLS login of the flooder");
    assert_eq!(flood.s.conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3), "the flooder needs TLS 1.3");
    assert_eq!(flood.value("SELECT 1"), "1");
    let t = &mut flood.s;
    t.sock.set_write_timeout(Some(SETTLE)).expect("write timeout");
    let (mut sent, mut stopped, mut stall) = (0usize, None, false);
    'flood: for _ in 0..10_000 {
        if let Err(e) = t.conn.refresh_traffic_keys() {
            stopped = Some(format!("rustls refused another KeyUpdate: {e}"));
            break;
        }
        while t.conn.wants_write() {
            if let Err(e) = t.conn.write_tls(&mut t.sock) {
                stall |= matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
                stopped = Some(format!("write: {e}"));
                break 'flood;
            }
        }
        sent += 1;
    }
    // The server's KeyUpdates, then an alert, EOF or a reset; a timeout is
    // a relay left hanging.
    let end = loop {
        match t.conn.read_tls(&mut t.sock) {
            Ok(0) => break "EOF".to_string(),
            Ok(_) => match t.conn.process_new_packets() {
                Ok(_) => continue,
                Err(e) => break format!("TLS error: {e}"),
            },
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break format!("hang: {e}"),
            Err(e) => break format!("reset: {e}"),
        }
    };
    (sent, stopped, stall, end)
}

/// Issue 12, hostile TLS input: KeyUpdate floods. Ten clients in turn, each
/// logged in over TLS 1.3, send 10,000 KeyUpdate(update_requested) records
/// back to back with no application data between ([`flood_key_updates`]). The
/// relay's rustls accepts 32 in a row (its `TemperCounters`, after
/// BoringSSL's kMaxKeyUpdates) and fails the next with PeerMisbehaved
/// TooManyKeyUpdateRequests: the relay sends the alert and closes, so the
/// flooder ends with an alert, an EOF or a reset (printed), never a read
/// that waits out its bound. Meanwhile (until the last flooder ends, at
/// least 50 each) a TLS and a plaintext client already logged in run
/// queries, each answered within authentication_timeout (5 s, their read
/// timeout). Then the pooler process is the same, its thread
/// count is back to what it was (no relay left) and a new TLS client works.
/// The server itself (OpenSSL >= 1.1.1b) does not limit KeyUpdates: no
/// differential comparison, by design.
#[test]
fn a_key_update_flood_is_closed_and_others_are_served() {
    with_tls_server(Cluster::builder().conf("authentication_timeout = '5s'"), |pg, ca, pooler| {
        let port = pg.port();
        let bound = Duration::from_secs(5); // authentication_timeout
        let mut warm = nextgres_test::raw::Raw::connect(port, "app", "postgres", TEST_LIMIT / 4);
        assert_eq!(warm.value("SELECT 1"), "1");
        drop(warm);
        warm_tls(pg, &ca, pooler);
        let tasks0 = proc_count(pooler, "task");
        assert!(tasks0 > 0, "no /proc for the pooler {pooler}");

        let mut other = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS login of the other client");
        other.s.sock.set_read_timeout(Some(bound)).expect("timeout");
        let mut plain = nextgres_test::raw::Raw::connect(port, "app", "postgres", bound);

        // FLOODERS clients in turn, each logged in over TLS 1.3 and then
        // flooding; returns how each ended.
        const FLOODERS: usize = 10;
        let ca2 = ca.clone();
        let flooder = std::thread::spawn(move || {
            let mut ends = Vec::new();
            for _ in 0..FLOODERS {
                let end = flood_key_updates(port, &ca2);
                let hung = end.2 || end.3.starts_with("hang");
                ends.push(end);
                if hung {
                    break; // fails below, without waiting out nine more
                }
            }
            ends
        });

        // Meanwhile the others are served within the bound.
        let mut i = 0;
        while i < 50 || !flooder.is_finished() {
            assert_eq!(other.value(&format!("SELECT {i}")), i.to_string(), "TLS client during the flood");
            assert_eq!(plain.value(&format!("SELECT {i}")), i.to_string(), "plaintext client during the flood");
            i += 1;
        }
        let ends = flooder.join().expect("flooder thread");
        eprintln!("KeyUpdate floods ({i} queries each by the others meanwhile):");
        for (sent, stopped, stall, end) in &ends {
            eprintln!("  {sent} sent, stopped by {stopped:?}, ended with {end}");
            assert!(!stall, "the flooder's writes stalled (nobody read them): {stopped:?}");
            assert!(!end.starts_with("hang"), "the flooding client was never closed: {end} after {sent} KeyUpdates");
        }

        assert_eq!(other.value("SELECT 'after'"), "after");
        assert_eq!(plain.value("SELECT 'after'"), "after");
        drop(other);
        assert_eq!(pooler_pid(pg), Some(pooler), "the pooler restarted");
        assert!(
            wait_until(SETTLE, || proc_count(pooler, "task") == tasks0),
            "pooler threads after the flood: {} (were {tasks0})",
            proc_count(pooler, "task")
        );
        let mut fresh = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS login after the flood");
        assert_eq!(fresh.value("SELECT 'fresh'"), "fresh");
    });
}

/// A client the slow-reader test drives over plaintext or TLS.
trait Wire {
    fn send(&mut self, sql: &str);
    fn msg(&mut self) -> std::io::Result<(u8, Vec<u8>)>;
}

impl Wire for TlsRaw {
    fn send(&mut self, sql: &str) {
        self.send_query(sql)
    }
    fn msg(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        self.read_msg()
    }
}

impl Wire for nextgres_test::raw::Raw {
    fn send(&mut self, sql: &str) {
        self.send_query(sql)
    }
    fn msg(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        self.read_msg()
    }
}

/// What a client got: data rows, then the other message tags in order
/// (SQLSTATE after an 'E'), then how the stream ended.
#[derive(Debug, PartialEq)]
struct Got {
    rows: usize,
    rest: Vec<String>,
}

/// Rows of the slow-reader query (about 40 MB: more than the TCP and
/// socketpair buffers hold, so the backend finishes only as the client reads).
const SLOW_ROWS: usize = 40000;

/// BEGIN and a multi-MB SELECT; the client reads it slowly (64 rows between
/// looks at the backend) until the backend has sent everything and is idle
/// in its transaction, then stops reading until the backend has ended at
/// idle_in_transaction_session_timeout, then reads the rest.
fn slow_reader(pg: &Cluster, c: &mut dyn Wire, marker: &str) -> Got {
    let of_backend = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    );
    // Waiting for its next command: "idle in transaction" shows already while
    // the backend still flushes ReadyForQuery (ClientWrite).
    let idle = format!("{of_backend} AND state = 'idle in transaction' AND wait_event = 'ClientRead'");
    c.send(&format!(
        "SET idle_in_transaction_session_timeout = '200ms'; BEGIN; \
         SELECT repeat('x', 1000) AS {marker}, i FROM generate_series(1, {SLOW_ROWS}) i"
    ));
    let mut got = Got { rows: 0, rest: Vec::new() };
    let record = |got: &mut Got, tag: u8, body: &[u8]| match tag {
        b'D' => got.rows += 1,
        b'E' => match parse_error(body) {
            RawFail::Db { code, .. } => got.rest.push(format!("E {code}")),
            other => got.rest.push(format!("E {other:?}")),
        },
        b'Z' => got.rest.push(format!("Z {}", body.first().map(|b| *b as char).unwrap_or('?'))),
        b'C' | b'T' | b'S' => {} // SET, BEGIN, the row description, parameters
        t => got.rest.push((t as char).to_string()),
    };
    // Slowly, until the backend has written all (or the client has it all):
    // near the end, a look every 16 rows, so that when the client stops
    // the socketpair still holds more than rustls' 64 KiB of unsent TLS.
    let look_every = |rows: usize| if rows + 8000 < SLOW_ROWS { 1024 } else { 16 };
    let mut extra = None;
    loop {
        let (tag, body) = c.msg().expect("reading the result");
        record(&mut got, tag, &body);
        if tag == b'Z' {
            break;
        }
        if let Some(n) = extra.as_mut() {
            // A few more rows: room for the backend's last flush (it shows
            // idle in transaction just before it; up to 8 kB, behind up to
            // 16 kB of TLS the relay has not sent yet).
            *n -= 1;
            if *n == 0 {
                break;
            }
        } else if tag == b'D' && got.rows % look_every(got.rows) == 0 && admin_i64(pg, &idle) == 1 {
            extra = Some(24);
        }
    }
    assert!(
        ended_at_idle_timeout(pg, &of_backend, None),
        "the backend never ended at idle_in_transaction_session_timeout"
    );
    loop {
        match c.msg() {
            Ok((tag, body)) => record(&mut got, tag, &body),
            Err(e) => {
                got.rest.push(format!("end {:?}", e.kind()));
                return got;
            }
        }
    }
}

/// Waits (TEST_LIMIT / 4) until the backend counted by `of_backend` has
/// ended at idle_in_transaction_session_timeout, or until `or_else` (a count
/// query) gives 1. The server arms that timer before it flushes
/// ReadyForQuery; when it fires while the flush is blocked (a client, or here
/// the TLS relay, not yet draining), secure_write resets the latch without
/// serving the timeout, and the backend then waits for its next command with
/// the timeout pending but unserved, as on a direct connection. So once a
/// second has passed, the backend's latch is set (pg_log_backend_memory_contexts:
/// a procsignal, nothing else changes), which serves a pending timeout and does
/// nothing when none fired yet.
fn ended_at_idle_timeout(pg: &Cluster, of_backend: &str, or_else: Option<&str>) -> bool {
    let nudge = of_backend.replacen("count(*)", "count(pg_log_backend_memory_contexts(pid))", 1);
    let mut last = std::time::Instant::now();
    wait_until(TEST_LIMIT / 4, || {
        if admin_i64(pg, of_backend) == 0 || or_else.is_some_and(|q| admin_i64(pg, q) == 1) {
            return true;
        }
        if last.elapsed() >= Duration::from_secs(1) {
            last = std::time::Instant::now();
            admin_i64(pg, &nudge);
        }
        false
    })
}

/// A fixed 64 kB receive buffer (no autotuning): the client's side of the
/// connection stops growing, so the server's buffers fill behind it.
fn small_rcvbuf(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let v: libc::c_int = 64 * 1024;
    // SAFETY: setsockopt on a socket this test owns, with an int option.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF");
}

/// A TLS client that reads nothing while a result of `rows` x 1 kB is
/// sent: when it all fits in the buffers between the backend and the
/// client, the backend goes idle and ends at
/// idle_in_transaction_session_timeout with what did not fit in TCP still in
/// the socketpair; only then the client reads. Returns what it got and
/// whether the backend fitted (false: it blocked in ClientWrite and the
/// client read at once).
fn unread_result(pg: &Cluster, t: &mut TlsRaw, rows: usize, marker: &str) -> (Got, bool) {
    let of_backend = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%{marker}%' AND pid <> pg_backend_pid()"
    );
    t.send_query(&format!(
        "SET idle_in_transaction_session_timeout = '200ms'; BEGIN; \
         SELECT repeat('x', 1000) AS {marker}, i FROM generate_series(1, {rows}) i"
    ));
    let mut fitted = false;
    // Fitted means the backend waits for its next command (ClientRead): the
    // server shows "idle in transaction" (and arms the timeout) already
    // before it flushes ReadyForQuery, and a backend blocked in that flush
    // (ClientWrite) does not end at the timeout until the client reads.
    assert!(
        wait_until(SETTLE, || {
            fitted = admin_i64(
                pg,
                &format!("{of_backend} AND state = 'idle in transaction' AND wait_event = 'ClientRead'"),
            ) == 1
                || admin_i64(pg, &of_backend) == 0;
            fitted || admin_i64(pg, &format!("{of_backend} AND wait_event = 'ClientWrite'")) == 1
        }),
        "the backend neither finished nor blocked"
    );
    if fitted {
        // It ends at the timeout, or, when the result left the buffers less
        // room than its FATAL needs, it blocks writing that FATAL (ClientWrite,
        // as it would for a direct client) until the client reads: then it
        // did not fit after all.
        let writing = format!("{of_backend} AND wait_event = 'ClientWrite'");
        assert!(
            ended_at_idle_timeout(pg, &of_backend, Some(&writing)),
            "the backend neither ended at idle_in_transaction_session_timeout nor blocked writing its FATAL"
        );
        fitted = admin_i64(pg, &of_backend) == 0;
    }
    let mut got = Got { rows: 0, rest: Vec::new() };
    loop {
        match t.read_msg() {
            Ok((b'D', _)) => got.rows += 1,
            Ok((b'E', body)) => match parse_error(&body) {
                RawFail::Db { code, .. } => got.rest.push(format!("E {code}")),
                other => got.rest.push(format!("E {other:?}")),
            },
            Ok((b'Z', body)) => got.rest.push(format!("Z {}", body.first().map(|b| *b as char).unwrap_or('?'))),
            Ok(_) => {}
            Err(e) => {
                got.rest.push(format!("end {:?}", e.kind()));
                return (got, fitted);
            }
        }
    }
}

/// Count of entries in /proc/<pid>/<what> (threads, fds).
fn proc_count(pid: i32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/{what}")).map(|d| d.count()).unwrap_or(0)
}

/// The pooler's TLS threads by name: (threads of one client each, its
/// handshake or a relay no worker took; relay workers).
fn relay_threads(pid: i32) -> (usize, usize) {
    let mut n = (0, 0);
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        match std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim_end() {
            "nextgres tls" => n.0 += 1,
            "nextgres relays" => n.1 += 1,
            _ => {}
        }
    }
    n
}

/// One TLS client logs in, runs a query and leaves: the relay workers,
/// started at the first TLS session and kept for the pooler's life, are
/// part of a baseline measured after this. Returns how many there are.
fn warm_tls(pg: &Cluster, ca: &Path, pooler: i32) -> usize {
    let mut t = TlsRaw::connect(pg.port(), ca, "app", "postgres").expect("TLS warm-up login");
    assert_eq!(t.value("SELECT 1"), "1");
    drop(t);
    assert!(
        wait_until(SETTLE, || admin_i64(pg, "SELECT count(*) FROM nextgres.clients WHERE tls IS NOT NULL") == 0
            && relay_threads(pooler).0 == 0),
        "the TLS warm-up client did not leave: {:?}",
        relay_threads(pooler)
    );
    let workers = relay_threads(pooler).1;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    assert!((1..=cores.min(8)).contains(&workers), "relay workers: {workers} for {cores} cores");
    workers
}

/// A backend that ends while its TLS client has megabytes still to read
/// (idle_in_transaction_session_timeout after a slow client's SELECT): the
/// TLS client still gets every row, ReadyForQuery and the server's FATAL
/// 25P03, as the same plaintext client does (the relay does not drop what
/// rustls has no room for at the hangup); so does a TLS client that reads
/// nothing until the backend has ended, for results of 3.5 to 5 MB (those
/// that fit leave the socketpair full behind TCP). Then no relay thread or fd
/// is left in the pooler: after TLS clients that vanish inside a
/// transaction and after that backend exit, /proc/<pooler>/task and fd are
/// back to what they were before.
#[test]
fn a_backend_exit_under_a_slow_tls_reader_loses_nothing_and_leaks_nothing() {
    with_tls_server(Cluster::builder(), |pg, ca, pooler| {
        let port = pg.port();
        // Warm: a pooled backend exists, the pooler has its steady fds.
        let mut warm = nextgres_test::raw::Raw::connect(port, "app", "postgres", TEST_LIMIT / 4);
        assert_eq!(warm.value("SELECT 1"), "1");
        drop(warm);
        warm_tls(pg, &ca, pooler);
        let (tasks0, fds0) = (proc_count(pooler, "task"), proc_count(pooler, "fd"));
        assert!(tasks0 > 0 && fds0 > 0, "no /proc for the pooler {pooler}");

        // TLS clients that vanish inside a transaction.
        for _ in 0..3 {
            let mut t = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS login");
            t.send_query("BEGIN; SELECT 1");
            t.until_ready().expect("BEGIN");
            // A logged-in client's relay is on a relay worker: the thread
            // of its handshake has ended (a moment after the hand-over).
            assert!(
                wait_until(SETTLE, || relay_threads(pooler).0 == 0 && proc_count(pooler, "task") == tasks0),
                "threads with one TLS client: {} (were {tasks0}), {:?}",
                proc_count(pooler, "task"),
                relay_threads(pooler)
            );
            drop(t);
        }
        assert!(
            wait_until(SETTLE, || proc_count(pooler, "task") == tasks0 && proc_count(pooler, "fd") <= fds0),
            "pooler threads/fds after TLS clients left mid-transaction: {}/{} (were {tasks0}/{fds0})",
            proc_count(pooler, "task"),
            proc_count(pooler, "fd")
        );

        let mut plain = nextgres_test::raw::Raw::connect(port, "app", "postgres", TEST_LIMIT / 4);
        small_rcvbuf(&plain.s);
        let direct = slow_reader(pg, &mut plain, "slow_plain");
        assert_eq!(direct.rows, SLOW_ROWS, "plaintext: {direct:?}");
        assert!(direct.rest.contains(&"E 25P03".to_string()), "plaintext: {direct:?}");
        let mut t = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS login");
        t.s.sock.set_read_timeout(Some(TEST_LIMIT / 4)).expect("timeout");
        small_rcvbuf(&t.s.sock);
        let tls = slow_reader(pg, &mut t, "slow_tls");
        assert_eq!(tls, direct, "TLS vs plaintext client when the backend ends under a slow reader");

        // Results from 3.5 to 5 MB that the client does not read while the
        // backend runs: those that fit end with TCP full and up to the
        // socketpair's ~150 kB behind it in the relay's hands when the
        // backend exits, more than the 64 kB rustls holds unsent.
        let mut fitted = 0;
        for step in 0..24 {
            let rows = 3500 + step * 64;
            let mut t = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS login");
            t.s.sock.set_read_timeout(Some(TEST_LIMIT / 4)).expect("timeout");
            small_rcvbuf(&t.s.sock);
            let (got, fit) = unread_result(pg, &mut t, rows, &format!("unread_{step}"));
            fitted += fit as usize;
            assert_eq!(
                got,
                Got { rows, rest: vec!["Z T".into(), "E 25P03".into(), direct.rest[2].clone()] },
                "TLS client that read nothing while {rows} rows were sent (backend fitted: {fit})"
            );
        }
        eprintln!("{fitted} of 24 unread results fitted in the buffers");

        assert!(
            wait_until(SETTLE, || proc_count(pooler, "task") == tasks0 && proc_count(pooler, "fd") <= fds0),
            "pooler threads/fds after a backend exit under a TLS client: {}/{} (were {tasks0}/{fds0})",
            proc_count(pooler, "task"),
            proc_count(pooler, "fd")
        );
        assert_eq!(pooler_pid(pg), Some(pooler), "the pooler restarted");
    });
}

/// `nextgres.max_tls_handshakes`: TLS handshakes in progress (a relay
/// thread each) beyond it are refused with the FATAL 53300 "sorry, too many
/// clients already" a client gets at max_client_conn; plaintext clients are
/// still served, and TLS is again once the stalled handshakes are gone.
#[test]
fn tls_handshakes_beyond_the_cap_are_refused_as_at_max_client_conn() {
    with_tls_server(Cluster::builder().conf("nextgres.max_tls_handshakes = 2"), |pg, ca, _pooler| {
        let port = pg.port();
        // Two handshakes that never start hold both places.
        let mut stalled = Vec::new();
        for _ in 0..2 {
            let mut s = tcp(port);
            assert_eq!(ssl_request(&mut s), b'S');
            stalled.push(s);
        }
        let (got, text) = refused_ssl_request(port);
        assert!(
            got.first() == Some(&b'E') && text.contains("C53300") && text.contains("sorry, too many clients already"),
            "third TLS handshake: {text:?}"
        );
        let conn = pg.tcp("app", "postgres");
        let out = psql_cs(pg, &conn, "sslmode=disable", &["SELECT 1"]);
        assert_eq!(out.stdout.trim(), "1", "plaintext while TLS handshakes are full:\n{out}");
        drop(stalled);
        assert!(
            wait_until(SETTLE, || TlsRaw::connect(port, &ca, "app", "postgres").is_ok()),
            "TLS never served again after the stalled handshakes left"
        );
    });
}

/// At `nextgres.max_client_conn`, a connection that starts with an
/// SSLRequest is taken through TLS, as the server completes TLS before it
/// says it is full: a CancelRequest inside TLS (libpq 17's cancel
/// connections with `sslmode=require`) is carried out, so Ctrl-C works with
/// the pooler full, and a login gets FATAL 53300 "sorry, too many clients
/// already" inside TLS instead of a plaintext error in answer to its
/// SSLRequest. The clients already connected are served throughout.
#[test]
fn at_max_client_conn_a_cancel_over_tls_is_carried_out() {
    with_tls_server(Cluster::builder().conf("nextgres.max_client_conn = 2"), |pg, ca, pooler| {
        let port = pg.port();
        let mut victim = TlsRaw::connect(port, &ca, "postgres", "postgres").expect("TLS raw login");
        let (pid, key) = victim.key.clone().expect("BackendKeyData");
        let mut other = nextgres_test::raw::Raw::connect(port, "app", "postgres", TEST_LIMIT / 4);
        assert_eq!(other.value("SELECT 1"), "1");
        victim.send_query("SELECT pg_sleep(120)");
        assert!(
            wait_until(SETTLE, || admin_i64(pg, "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(120)' AND state = 'active'") == 1),
            "the sleep never started"
        );
        let third = TlsRaw::connect(port, &ca, "app", "postgres").map(|_| ()).expect_err("a third client at max_client_conn = 2");
        assert!(
            third.starts_with("login: ") && third.contains("53300") && third.contains("sorry, too many clients already"),
            "a TLS login at max_client_conn is refused inside TLS: {third}"
        );
        cancel_over_tls(port, &ca, pid, &key);
        match victim.until_ready() {
            Err(RawFail::Db { code, .. }) => assert_eq!(code, "57014", "cancel over TLS at max_client_conn"),
            other => panic!("cancel over TLS at max_client_conn: {other:?}"),
        }
        assert_eq!(victim.value("SELECT 2"), "2");
        assert_eq!(other.value("SELECT 3"), "3");
        assert!(
            wait_until(SETTLE, || admin_i64(pg, "SELECT count(*) FROM nextgres.clients") == 2),
            "the refused TLS connections left clients behind: {}",
            admin_i64(pg, "SELECT count(*) FROM nextgres.clients")
        );
        assert_eq!(pooler_pid(pg), Some(pooler), "the pooler restarted");
    });
}

/// `prlimit --pid PID --nofile=N:N`, run as the server's OS user (root
/// without CAP_SYS_RESOURCE may not change another user's process).
fn set_nofile(pg: &Cluster, pid: i32, n: usize) {
    let user = pg.server_os_user();
    let out = Command::new("runuser").args(["-u", &user, "--", "prlimit"]).arg(format!("--pid={pid}")).arg(format!("--nofile={n}:{n}")).output().expect("prlimit");
    assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
}

/// Server log lines of failed accept(2) for lack of descriptors.
fn accept_failures(log: &str) -> usize {
    log.lines().filter(|l| l.contains("accept") && l.contains("Too many open files")).count()
}

/// The pooler out of descriptors (its RLIMIT_NOFILE lowered with prlimit to
/// what it holds plus two TLS clients and two descriptors): a TLS client
/// whose relay socketpair does not fit gets the plaintext FATAL 53300 in
/// answer to its SSLRequest (as the postmaster answers when it cannot
/// fork); once every descriptor is taken, a plaintext and a TLS client wait
/// in the listen backlog while clients connected before are still answered,
/// and both are served once others leave; new TLS and plaintext clients
/// are served after; the pooler never restarts. It does not spin: the
/// "could not accept new connection" LOG lines over the episode are at most
/// one per 100 ms pause elapsed (`nextgres_core::accept::PAUSE`, the
/// postmaster's) plus 2.
#[test]
fn a_pooler_out_of_descriptors_refuses_or_queues_without_spinning() {
    with_tls_server(Cluster::builder(), |pg, ca, pooler| {
        let port = pg.port();
        assert!(pg.log().contains("pooler open files limit (RLIMIT_NOFILE)"), "no LOG line with the pooler's limits");
        // Clients from before, each with a query behind it (parked backends
        // serve them later without a new descriptor in the pooler).
        let mut before = nextgres_test::raw::Raw::connect(port, "app", "postgres", TEST_LIMIT / 4);
        assert_eq!(before.value("SELECT 1"), "1");
        let mut before_tls = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS login");
        assert_eq!(before_tls.value("SELECT 2"), "2");
        // RLIMIT_NOFILE bounds descriptor numbers: what is free is the
        // numbers below the limit that are not open.
        let open_fds = || -> Vec<usize> {
            let d = std::fs::read_dir(format!("/proc/{pooler}/fd")).expect("/proc/PID/fd");
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
        };
        let open = open_fds();
        let limit = (0..).find(|&l| l - open.iter().filter(|&&f| f < l).count() == 2 * 3 + 2).expect("a limit");
        let free = || limit - open_fds().iter().filter(|&&f| f < limit).count();
        let fds = || limit - free();
        set_nofile(pg, pooler, limit);
        let mark = pg.log_mark();
        let started = std::time::Instant::now();
        // Two TLS clients fit (3 descriptors each: TCP socket, socketpair).
        let mut held_tls = Vec::new();
        while free() >= 3 {
            held_tls.push(TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS client within the limit"));
            assert!(held_tls.len() <= 2, "more TLS clients than descriptors ({} of {limit} open)", fds());
        }
        // One or two left: the TCP socket is accepted, its socketpair fails.
        let (got, text) = refused_ssl_request(port);
        assert!(
            got.first() == Some(&b'E') && text.contains("SFATAL") && text.contains("C53300") && text.contains("sorry, too many clients already"),
            "TLS client without room for its relay ({} of {limit} open): {text:?}",
            fds()
        );
        // The refused client's socket is closed again; plaintext clients
        // take what is left, one each.
        let mut held_plain = Vec::new();
        assert!(wait_until(SETTLE, || fds() < limit), "the refused TLS client's socket stayed open");
        while fds() < limit {
            held_plain.push(nextgres_test::raw::Raw::connect(port, "app", "postgres", TEST_LIMIT / 4));
            assert!(held_plain.len() <= 2, "more plaintext clients than descriptors");
        }
        // None left: these two wait in the listen backlog.
        let waiting_plain = std::thread::spawn(move || {
            let mut c = nextgres_test::raw::Raw::connect(port, "app", "postgres", TEST_LIMIT / 2);
            c.value("SELECT 3")
        });
        let ca2 = ca.clone();
        let waiting_tls = std::thread::spawn(move || {
            TlsRaw::connect_within(port, &ca2, TEST_LIMIT / 2).map(|mut t| t.value("SELECT 4"))
        });
        assert!(
            wait_until(SETTLE, || accept_failures(&pg.log_since(mark)) > 0),
            "no accept failure logged with {} of {limit} descriptors open",
            fds()
        );
        // Meanwhile clients connected before are answered.
        assert_eq!(before.value("SELECT 5"), "5", "plaintext client from before, pooler out of descriptors");
        assert_eq!(before_tls.value("SELECT 6"), "6", "TLS client from before, pooler out of descriptors");
        // Room again: the waiting clients are served.
        drop(held_tls);
        drop(held_plain);
        assert_eq!(waiting_plain.join().expect("waiting plaintext client"), "3");
        assert_eq!(waiting_tls.join().expect("waiting TLS client").expect("waiting TLS client served"), "4");
        let elapsed = started.elapsed();
        let lines = accept_failures(&pg.log_since(mark));
        let bound = (elapsed.as_millis() / 100) as usize + 2;
        assert!(lines <= bound, "{lines} accept failures logged in {elapsed:?} (at most {bound}: one per 100 ms pause + 2)");
        // New clients, still under the lowered limit.
        let mut t = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS client after the others left");
        assert_eq!(t.value("SELECT 7"), "7");
        let mut c = nextgres_test::raw::Raw::connect(port, "app", "postgres", TEST_LIMIT / 4);
        assert_eq!(c.value("SELECT 8"), "8");
        assert_eq!(pooler_pid(pg), Some(pooler), "the pooler restarted");
        eprintln!("{lines} accept failure line(s) in {elapsed:?}");
    });
}

/// Sets the pooler's RLIMIT_NPROC (`soft:hard`, prlimit as the server's OS
/// user, whose process count it limits); with the hard limit it has now.
fn pooler_nproc(pg: &Cluster, pooler: i32) -> (impl Fn(&str), String) {
    let user = pg.server_os_user();
    let nproc = move |v: &str| {
        let out = Command::new("runuser")
            .args(["-u", &user, "--", "prlimit", &format!("--pid={pooler}"), &format!("--nproc={v}")])
            .output()
            .expect("prlimit");
        assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
    };
    let hard = std::fs::read_to_string(format!("/proc/{pooler}/limits"))
        .expect("limits")
        .lines()
        .find(|l| l.starts_with("Max processes"))
        .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        .expect("Max processes hard limit");
    (nproc, hard)
}

/// A TLS client whose relay thread cannot start (the pooler's soft
/// RLIMIT_NPROC lowered to 1 with prlimit: every new thread fails with
/// EAGAIN) gets FATAL 53300 in plaintext in answer to its SSLRequest,
/// naming the thread, instead of an 'S' and a dead connection; a plaintext
/// client is served meanwhile; with the limit back, TLS is served again
/// by the same pooler.
#[test]
fn a_tls_client_without_a_relay_thread_gets_53300_in_plaintext() {
    with_tls_server(Cluster::builder(), |pg, ca, pooler| {
        let port = pg.port();
        let (nproc, hard) = pooler_nproc(pg, pooler);
        nproc(&format!("1:{hard}"));
        let (got, text) = refused_ssl_request(port);
        assert!(
            got.first() == Some(&b'E') && text.contains("SFATAL") && text.contains("C53300") && text.contains("could not start a thread for the TLS relay"),
            "TLS client without a relay thread: {text:?}"
        );
        let mut plain = nextgres_test::raw::Raw::connect(port, "app", "postgres", TEST_LIMIT / 4);
        assert_eq!(plain.value("SELECT 1"), "1", "plaintext client while no thread can start");
        nproc(&format!("{hard}:{hard}"));
        let mut t = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS client with threads again");
        assert_eq!(t.value("SELECT 2"), "2");
        assert_eq!(pooler_pid(pg), Some(pooler), "the pooler restarted");
    });
}

/// The pooler restarted (SIGTERM) while the key on disk no
/// longer loads: it serves TLS with the configuration the postmaster loaded
/// at startup (the port was taken for TLS), not plaintext only.
#[test]
fn a_restarted_pooler_that_cannot_load_the_key_keeps_the_startup_tls() {
    with_tls_server(Cluster::builder(), |pg, ca, first| {
        std::fs::write(pg.data_dir().join("server.key"), "not a key\n").expect("spoil the key");
        terminate_pooler(first);
        assert!(
            wait_until(SETTLE, || pooler_pid(pg).is_some_and(|p| p != first)),
            "the pooler was not restarted"
        );
        let mut t = TlsRaw::connect(pg.port(), &ca, "postgres", "postgres")
            .unwrap_or_else(|e| panic!("TLS after a pooler restart with a key it cannot load: {e}"));
        assert_eq!(t.value("SELECT 1"), "1");
        assert_eq!(t.value(&of_client("tls LIKE 'TLSv1.%'")), "t", "nextgres.clients.tls");
    });
}

/// The startup fallback of a restarted pooler refuses client certificates
/// (its CA file and CRLs may be stale): a client sending one fails the
/// handshake, a client without one is served over TLS.
#[test]
fn the_startup_fallback_refuses_client_certificates() {
    with_tls_server(Cluster::builder(), |pg, _ca, _| {
        std::fs::copy(pg.dir().join("one-ca.crt"), pg.data_dir().join("root.crt")).expect("copy CA");
        pg.append_conf("ssl_ca_file = 'root.crt'").expect("conf");
        pg.set_hba("local all all trust
hostssl all all 127.0.0.1/32 trust
").expect("hba");
        pg.restart().expect("restart with ssl_ca_file");
        let first = running_pooler_pid(pg);
        let cert = client_cert(pg, "one", "postgres");
        let conn = pg.tcp("postgres", "postgres");
        let with_cert = |pg: &Cluster| psql_cs(pg, &conn, &format!("sslmode=require {cert}"), &["SELECT 1"]);
        assert!(with_cert(pg).success(), "a client certificate before the restart");
        std::fs::write(pg.data_dir().join("server.key"), "not a key\n").expect("spoil the key");
        terminate_pooler(first);
        assert!(wait_until(SETTLE, || pooler_pid(pg).is_some_and(|p| p != first)), "the pooler was not restarted");
        let out = with_cert(pg);
        assert!(!out.success() && out.stderr.contains("unknown ca"), "a client certificate under the startup fallback: {out}");
        let out = psql_cs(pg, &conn, "sslmode=require", &["SELECT 1"]);
        assert!(out.success(), "no client certificate under the startup fallback: {out}");
    });
}

/// An ErrorResponse as `code message [detail]`.
fn error_text(body: &[u8]) -> String {
    let (mut code, mut message, mut detail) = (String::new(), String::new(), String::new());
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let v = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = v,
            b'M' => message = v,
            b'D' => detail = format!(" [{v}]"),
            _ => {}
        }
    }
    format!("{code} {message}{detail}")
}

/// A raw SASL exchange over TLS, for what libpq never sends: SSLRequest,
/// handshake, startup for `user`; returns the mechanisms of
/// AuthenticationSASL and the answer to SASLInitialResponse(`mech`,
/// `first`): `continue` or the error's `code message [detail]`.
fn sasl_over_tls(port: u16, ca: &Path, user: &str, mech: &str, first: &[u8]) -> (Vec<String>, String) {
    let mut s = tcp(port);
    assert_eq!(ssl_request(&mut s), b'S');
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let conn = rustls::ClientConnection::new(client_config(ca), name).expect("client connection");
    let mut t = rustls::StreamOwned::new(conn, s);
    t.write_all(&nextgres_test::raw::startup_packet(user, "postgres")).expect("startup");
    let (tag, body) = nextgres_test::raw::read_message(&mut t).expect("authentication request");
    assert_eq!((tag, &body[..4]), (b'R', &[0, 0, 0, 10][..]), "AuthenticationSASL expected: {}", error_text(&body));
    let mechs: Vec<String> =
        body[4..].split(|&b| b == 0).filter(|m| !m.is_empty()).map(|m| String::from_utf8_lossy(m).into_owned()).collect();
    let mut m = vec![b'p'];
    let len = 4 + mech.len() + 1 + 4 + first.len();
    m.extend_from_slice(&(len as i32).to_be_bytes());
    m.extend_from_slice(mech.as_bytes());
    m.push(0);
    m.extend_from_slice(&(first.len() as i32).to_be_bytes());
    m.extend_from_slice(first);
    t.write_all(&m).expect("SASLInitialResponse");
    let answer = match nextgres_test::raw::read_message(&mut t) {
        Ok((b'R', b)) if b.get(..4) == Some(&[0, 0, 0, 11]) => "continue".to_string(),
        Ok((b'E', b)) => error_text(&b),
        other => format!("{other:?}"),
    };
    (mechs, answer)
}

/// Acceptance 2 (channel binding): on TLS the pooler offers
/// SCRAM-SHA-256-PLUS and SCRAM-SHA-256 as the server does, and binds to
/// the certificate the client was shown (`tls-server-end-point`): libpq's
/// `channel_binding=require`, `prefer` and `disable` with `sslmode=require`
/// and `disable` end as on a cluster whose server does TLS itself; a
/// client that could bind but says the server cannot ('y' flag: a
/// stripped PLUS) is refused with the server's 28000, and the other gs2
/// header rules give the server's errors.
#[test]
fn scram_channel_binding_as_the_server() {
    let pooled = Arc::new(Cluster::builder().label("pooled").start());
    if skip(&pooled) {
        return;
    }
    let direct = Cluster::builder().label("direct").preload(false).start();
    setup(&pooled);
    pooled.run_bounded(TEST_LIMIT, move |pooled| {
        let hba = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n";
        let mut cas = Vec::new();
        for pg in [pooled, &direct] {
            cas.push(make_certs(pg, "one", "server.crt"));
            pg.admin().batch_execute("SET password_encryption = 'scram-sha-256'; CREATE ROLE alice LOGIN PASSWORD 'secret'").expect("role");
            pg.append_conf("ssl = on").expect("conf");
            pg.set_hba(hba).expect("hba");
            pg.restart().expect("restart with ssl = on");
        }
        assert!(wait_until(SETTLE, || pooler_pid(pooled).is_some()), "no pooler after the restart");
        let outcome = |pg: &Cluster, extra: &str| {
            login_outcome(pg, &pg.tcp("alice", "postgres").maybe_password(Some("secret")), extra)
        };
        let mut seen = Vec::new();
        for ssl in ["require", "disable"] {
            for cb in ["require", "prefer", "disable"] {
                let extra = format!("sslmode={ssl} channel_binding={cb}");
                let (d, p) = (outcome(&direct, &extra), outcome(pooled, &extra));
                assert_eq!(p, d, "{extra}: through the pooler vs the server");
                seen.push(format!("{extra}: {d}"));
            }
        }
        eprintln!("{}", seen.join("\n"));
        assert!(seen.contains(&"sslmode=require channel_binding=require: ok alice".to_string()), "{seen:?}");
        assert!(admin_i64(pooled, "SELECT count(*) FROM nextgres.backends") >= 1, "nobody was pooled");

        // The gs2 header rules, raw: same mechanisms, same answers.
        let nonce = "r=abcdefghijklmnopqrstuvwx";
        let probes: Vec<(&str, String)> = vec![
            ("SCRAM-SHA-256", format!("y,,n=,{nonce}")),
            ("SCRAM-SHA-256", format!("n,,n=,{nonce}")),
            ("SCRAM-SHA-256", format!("p=tls-server-end-point,,n=,{nonce}")),
            ("SCRAM-SHA-256-PLUS", format!("n,,n=,{nonce}")),
            ("SCRAM-SHA-256-PLUS", format!("y,,n=,{nonce}")),
            ("SCRAM-SHA-256-PLUS", format!("p=tls-unique,,n=,{nonce}")),
            ("SCRAM-SHA-256-PLUS", format!("p=tls-server-end-point,,n=,{nonce}")),
            ("SCRAM-SHA-1", format!("n,,n=,{nonce}")),
        ];
        for (mech, first) in &probes {
            let d = sasl_over_tls(direct.port(), &cas[1], "alice", mech, first.as_bytes());
            let p = sasl_over_tls(pooled.port(), &cas[0], "alice", mech, first.as_bytes());
            assert_eq!(p, d, "{mech} {first}: through the pooler vs the server");
            eprintln!("{mech} {first}: {d:?}");
        }
        let (mechs, y) = sasl_over_tls(pooled.port(), &cas[0], "alice", "SCRAM-SHA-256", format!("y,,n=,{nonce}").as_bytes());
        assert_eq!(mechs, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        assert!(y.starts_with("28000 SCRAM channel binding negotiation error"), "{y}");
    });
}

/// Acceptance 2 (client certificates): with `ssl_ca_file`, `cert` lines
/// (the CN, `map=` through pg_ident.conf, `clientname=DN`) and
/// `clientcert=verify-ca` / `verify-full` on trust and scram-sha-256 lines
/// decide exactly as on a cluster whose server does TLS itself, for no
/// certificate, the right one, one for another user and one from another
/// CA: the same success or the same FATAL / libpq reason; with
/// `ssl_crl_file` (after a reload) a revoked certificate fails as on the
/// server. `nextgres.clients.client_dn` shows the subject of a pooled client's
/// certificate.
#[test]
fn client_certificates_decide_as_the_server() {
    let pooled = Arc::new(Cluster::builder().label("pooled").start());
    if skip(&pooled) {
        return;
    }
    let direct = Cluster::builder().label("direct").preload(false).start();
    setup(&pooled);
    pooled.run_bounded(TEST_LIMIT, move |pooled| {
        let hba = "local all all trust\n\
                   hostssl all certuser 127.0.0.1/32 cert\n\
                   hostssl all mapuser 127.0.0.1/32 cert map=m\n\
                   hostssl all dnuser 127.0.0.1/32 cert clientname=DN map=dn\n\
                   hostssl all vfull 127.0.0.1/32 trust clientcert=verify-full\n\
                   hostssl all vca 127.0.0.1/32 trust clientcert=verify-ca\n\
                   hostssl all pwfull 127.0.0.1/32 scram-sha-256 clientcert=verify-full\n\
                   host all postgres 127.0.0.1/32 trust\n";
        let ident = "m alice mapuser\ndn \"CN=alice\" dnuser\n";
        let roles = ["certuser", "mapuser", "dnuser", "vfull", "vca", "pwfull"];
        let names = ["certuser", "alice", "vfull", "pwfull"];
        // Per cluster (each has its own CAs): label -> libpq sslcert/sslkey.
        let mut certs: Vec<Vec<(String, String)>> = Vec::new();
        for pg in [pooled, &direct] {
            make_certs(pg, "one", "server.crt");
            make_certs(pg, "two", "unused.crt");
            let mut mine = vec![("none".to_string(), String::new())];
            for n in names {
                mine.push((n.to_string(), client_cert(pg, "one", n)));
            }
            mine.push(("certuser from another CA".to_string(), client_cert(pg, "two", "certuser")));
            certs.push(mine);
            for r in roles {
                pg.admin().batch_execute(&format!("SET password_encryption = 'scram-sha-256'; CREATE ROLE {r} LOGIN PASSWORD 'secret'")).expect("role");
            }
            std::fs::copy(pg.dir().join("one-ca.crt"), pg.data_dir().join("root.crt")).expect("copy CA");
            std::fs::write(pg.data_dir().join("pg_ident.conf"), ident).expect("pg_ident.conf");
            pg.append_conf("ssl = on").expect("conf");
            pg.append_conf("ssl_ca_file = 'root.crt'").expect("conf");
            pg.set_hba(hba).expect("hba");
            pg.restart().expect("restart with ssl = on");
        }
        assert!(wait_until(SETTLE, || pooler_pid(pooled).is_some()), "no pooler after the restart");
        let outcome = |pg: &Cluster, role: &str, extra: &str| {
            login_outcome(pg, &pg.tcp(role, "postgres").maybe_password(Some("secret")), &format!("sslmode=require {extra}"))
        };
        let mut seen = Vec::new();
        for role in roles {
            for (i, (label, _)) in certs[0].iter().enumerate() {
                let d = outcome(&direct, role, &certs[1][i].1);
                let p = outcome(pooled, role, &certs[0][i].1);
                assert_eq!(p, d, "role {role}, client certificate {label}: through the pooler vs the server");
                seen.push(format!("{role} / {label}: {d}"));
            }
        }
        eprintln!("{}", seen.join("\n"));
        for want in [
            "certuser / certuser: ok certuser",
            "certuser / alice: failed certificate authentication failed for user \"certuser\"",
            "certuser / none: failed connection requires a valid client certificate",
            "mapuser / alice: ok mapuser",
            "dnuser / alice: ok dnuser",
            "vfull / vfull: ok vfull",
            "vfull / alice: failed \"trust\" authentication failed for user \"vfull\"",
            "vca / alice: ok vca",
            "pwfull / pwfull: ok pwfull",
        ] {
            assert!(seen.iter().any(|s| s == want), "{want} not seen:\n{}", seen.join("\n"));
        }
        assert!(seen.iter().any(|s| s.starts_with("vca / certuser from another CA: failed") && s.contains("unknown ca")), "{seen:?}");
        // SYSTEM_USER (16+) as the server records the login: cert gives the
        // certificate's DN (also where its CN, or a map, decides), a
        // password method under clientcert=verify-full the role, trust none.
        if pooled.pg_major() >= 16 {
            let who = |pg: &Cluster, role: &str, cert: &str| {
                let conn = pg.tcp(role, "postgres").maybe_password(Some("secret"));
                let out = psql_cs(pg, &conn, &format!("sslmode=require {cert}"), &["SELECT coalesce(system_user, 'none')"]);
                assert!(out.success(), "{role}: {out}");
                out.stdout.trim().to_string()
            };
            let mut ids = Vec::new();
            for (role, i) in [("certuser", 1), ("mapuser", 2), ("dnuser", 2), ("vfull", 3), ("vca", 2), ("pwfull", 4)] {
                let (d, p) = (who(&direct, role, &certs[1][i].1), who(pooled, role, &certs[0][i].1));
                assert_eq!(p, d, "SYSTEM_USER of {role} with certificate {}: through the pooler vs the server", certs[0][i].0);
                ids.push(p);
            }
            assert_eq!(ids, ["cert:CN=certuser", "cert:CN=alice", "cert:CN=alice", "none", "none", "scram-sha-256:pwfull"]);
        }
        // ssl_crl_file + reload: a revoked client certificate fails the
        // handshake, another from the same CA still works, on both.
        for pg in [pooled, &direct] {
            revoke(pg, "one", &["client-one-vfull.crt"], "root.crl");
            pg.append_conf("ssl_crl_file = 'root.crl'").expect("conf");
            pg.reload().expect("reload");
        }
        assert!(
            wait_until(SETTLE, || outcome(pooled, "vca", &certs[0][3].1).starts_with("failed")),
            "a revoked certificate still accepted after ssl_crl_file and a reload"
        );
        assert!(wait_until(SETTLE, || outcome(&direct, "vca", &certs[1][3].1).starts_with("failed")), "server reload");
        for (i, label) in [(2, "alice"), (3, "vfull (revoked)")] {
            let (d, p) = (outcome(&direct, "vca", &certs[1][i].1), outcome(pooled, "vca", &certs[0][i].1));
            eprintln!("with ssl_crl_file, vca / {label}: {d}");
            assert_eq!(p, d, "with ssl_crl_file, role vca, client certificate {label}: through the pooler vs the server");
        }
        assert!(outcome(pooled, "vca", &certs[0][3].1).contains("revoked"), "not refused as revoked");

        // The subject of a pooled client's certificate.
        let conn = pooled.tcp("postgres", "postgres");
        let out = psql_cs(pooled, &conn, &format!("sslmode=require {}", certs[0][2].1), &[&of_client("client_dn")]);
        assert_eq!(out.stdout.trim(), "/CN=alice", "{out}");
        let out = psql_cs(pooled, &conn, "sslmode=require", &[&of_client("client_dn IS NULL")]);
        assert_eq!(out.stdout.trim(), "t", "{out}");
    });
}

/// Issue 12, `map=` on certificate lines: pg_ident.conf decides through the
/// pooler exactly as on a cluster whose server does TLS itself (the server's
/// own load_ident()/check_usermap() in the pooler): plain names, a `/regex`
/// entry with `\1`, a regex that matches but maps to another role and a map
/// without a line for the role (both refused), `cert clientcert=verify-full
/// map=` (a map is valid on no other method a TLS client can use: the server
/// refuses `trust clientcert=verify-full map=` in pg_hba.conf), and on 16+ `+group` and `all` entries. Then pg_ident.conf edited
/// + reload: new clients get the new decision; a pg_ident.conf with a bad
/// regex + reload: both keep the previous lines, the pooler keeps its pid;
/// then the agent restarted (pg_terminate_backend; on 15 a pooler that
/// loaded pg_ident.conf with a regex line crashed at start) decides the same.
#[test]
fn certificate_maps_decide_as_the_server() {
    let pooled = Arc::new(Cluster::builder().label("pooled").start());
    if skip(&pooled) {
        return;
    }
    let direct = Cluster::builder().label("direct").preload(false).start();
    setup(&pooled);
    pooled.run_bounded(TEST_LIMIT, move |pooled| {
        let v16 = pooled.pg_major() >= 16;
        let mut hba = String::from(
            "local all all trust\n\
             hostssl all mapuser 127.0.0.1/32 cert map=m\n\
             hostssl all rxuser,other 127.0.0.1/32 cert map=rx\n\
             hostssl all nomatch 127.0.0.1/32 cert map=m\n\
             hostssl all vfmap 127.0.0.1/32 cert clientcert=verify-full map=m\n",
        );
        let mut ident = String::from("m alice mapuser\nm alice vfmap\nrx /^(.*)-cert$ \\1\n");
        // Enough regex lines that the parsed file outgrows its context's
        // first block (hba.c "ident parser context", ALLOCSET_SMALL_SIZES):
        // the postmaster's lines in the pooler were then freed memory.
        for i in 0..60 {
            ident.push_str(&format!("filler{i} /^nobody{i}-(.*)$ nobody{i}\n"));
        }
        let mut roles = vec!["mapuser", "rxuser", "other", "nomatch", "vfmap"];
        if v16 {
            hba.push_str("hostssl all grpuser 127.0.0.1/32 cert map=g\nhostssl all anyuser 127.0.0.1/32 cert map=any\n");
            ident.push_str("g alice +grp\nany bob all\n");
            roles.extend(["grpuser", "anyuser"]);
        }
        hba.push_str("host all postgres 127.0.0.1/32 trust\n");
        let names = ["alice", "bob", "rxuser-cert"];
        let mut certs: Vec<Vec<(String, String)>> = Vec::new();
        for pg in [pooled, &direct] {
            make_certs(pg, "one", "server.crt");
            let mut mine = vec![("none".to_string(), String::new())];
            for n in names {
                mine.push((n.to_string(), client_cert(pg, "one", n)));
            }
            certs.push(mine);
            for r in roles.iter().chain(["marker"].iter()) {
                pg.admin().batch_execute(&format!("CREATE ROLE {r} LOGIN")).expect("role");
            }
            if v16 {
                pg.admin().batch_execute("CREATE ROLE grp NOLOGIN; GRANT grp TO grpuser").expect("group");
            }
            std::fs::copy(pg.dir().join("one-ca.crt"), pg.data_dir().join("root.crt")).expect("copy CA");
            std::fs::write(pg.data_dir().join("pg_ident.conf"), &ident).expect("pg_ident.conf");
            pg.append_conf("ssl = on").expect("conf");
            pg.append_conf("ssl_ca_file = 'root.crt'").expect("conf");
            pg.set_hba(&hba).expect("hba");
            pg.restart().expect("restart with ssl = on");
        }
        assert!(wait_until(SETTLE, || pooler_pid(pooled).is_some()), "no pooler after the restart");
        let outcome = |pg: &Cluster, role: &str, extra: &str| {
            login_outcome(pg, &pg.tcp(role, "postgres"), &format!("sslmode=require {extra}"))
        };
        let compare = |what: &str| -> Vec<String> {
            let mut seen = Vec::new();
            for &role in &roles {
                for (i, (label, _)) in certs[0].iter().enumerate() {
                    let d = outcome(&direct, role, &certs[1][i].1);
                    let p = outcome(pooled, role, &certs[0][i].1);
                    assert_eq!(p, d, "{what}: role {role}, client certificate {label}: through the pooler vs the server");
                    seen.push(format!("{role} / {label}: {d}"));
                }
            }
            eprintln!("{what}:\n{}", seen.join("\n"));
            seen
        };
        let has = |seen: &[String], want: &[&str]| {
            for w in want {
                assert!(seen.iter().any(|s| s == w), "{w} not seen:\n{}", seen.join("\n"));
            }
        };
        let seen = compare("pg_ident.conf as loaded at start");
        has(&seen, &[
            "mapuser / alice: ok mapuser",
            "mapuser / bob: failed certificate authentication failed for user \"mapuser\"",
            "rxuser / rxuser-cert: ok rxuser",
            "other / rxuser-cert: failed certificate authentication failed for user \"other\"",
            "nomatch / alice: failed certificate authentication failed for user \"nomatch\"",
            "vfmap / alice: ok vfmap",
            "vfmap / bob: failed certificate authentication failed for user \"vfmap\"",
        ]);
        if v16 {
            has(&seen, &["grpuser / alice: ok grpuser", "grpuser / bob: failed certificate authentication failed for user \"grpuser\"", "anyuser / bob: ok anyuser"]);
        }

        // pg_ident.conf edited + reload: new clients get the new decision.
        let edited = ident.replace("m alice mapuser\n", "m bob mapuser\n");
        for pg in [pooled, &direct] {
            std::fs::write(pg.data_dir().join("pg_ident.conf"), &edited).expect("pg_ident.conf");
            pg.reload().expect("reload");
        }
        assert!(wait_until(SETTLE, || outcome(pooled, "mapuser", &certs[0][2].1) == "ok mapuser"), "the edited pg_ident.conf not applied after a reload");
        assert!(wait_until(SETTLE, || outcome(&direct, "mapuser", &certs[1][2].1) == "ok mapuser"), "server reload");
        let after_edit = compare("pg_ident.conf edited + reload");
        has(&after_edit, &["mapuser / bob: ok mapuser", "mapuser / alice: failed certificate authentication failed for user \"mapuser\"", "vfmap / alice: ok vfmap"]);

        // A bad regex + reload (with a pg_hba.conf change to see the reload
        // done): both keep the previous lines, the pooler keeps running.
        // The bad file's good lines are the ORIGINAL ones (`m alice
        // mapuser`), whose decisions differ from the loaded (edited) ones:
        // a pooler applying them would decide as at start, not as after
        // the edit.
        assert_ne!(seen, after_edit, "the original and the edited pg_ident.conf must decide differently");
        let pooler = running_pooler_pid(pooled);
        let bad = format!("{ident}bad /( nobody\n");
        let hba2 = hba.replace("host all postgres", "hostssl all marker 127.0.0.1/32 trust\nhost all postgres");
        for pg in [pooled, &direct] {
            std::fs::write(pg.data_dir().join("pg_ident.conf"), &bad).expect("pg_ident.conf");
            pg.set_hba(&hba2).expect("hba");
            pg.reload().expect("reload");
        }
        assert!(wait_until(SETTLE, || outcome(pooled, "marker", "") == "ok marker"), "pg_hba.conf not reloaded");
        assert!(wait_until(SETTLE, || outcome(&direct, "marker", "") == "ok marker"), "server reload");
        assert_eq!(compare("a bad pg_ident.conf + reload"), after_edit, "a bad pg_ident.conf changed decisions");
        assert_eq!(pooler_pid(pooled), Some(pooler), "the pooler restarted on a bad pg_ident.conf");

        // The agent restarted (it holds the lines the pooler's logins use):
        // a new agent starts with the postmaster's lines, and so does its
        // new pooler.
        terminate_agent(pooled);
        assert!(wait_until(SETTLE, || pooler_pid(pooled).is_some_and(|p| p != pooler)), "no new pooler");
        assert!(wait_until(SETTLE, || outcome(pooled, "marker", "") == "ok marker"), "new pooler does not serve");
        assert_eq!(compare("after a pooler restart"), after_edit, "decisions changed across a pooler restart");
        // Its first reload of a good pg_ident.conf frees the lines it
        // started with (hba.c pg_regfree()s their regexes on 15).
        let now = running_pooler_pid(pooled);
        for pg in [pooled, &direct] {
            std::fs::write(pg.data_dir().join("pg_ident.conf"), &edited).expect("pg_ident.conf");
            pg.set_hba(&hba).expect("hba");
            pg.reload().expect("reload");
        }
        assert!(wait_until(SETTLE, || outcome(pooled, "marker", "").starts_with("failed")), "pg_hba.conf not reloaded");
        assert!(wait_until(SETTLE, || outcome(&direct, "marker", "").starts_with("failed")), "server reload");
        assert_eq!(compare("the restarted pooler's first reload"), after_edit, "decisions changed by the reload");
        assert_eq!(pooler_pid(pooled), Some(now), "the restarted pooler crashed in its first pg_ident.conf reload");
    });
}

/// Review findings on certificate names and CRL directories, each against
/// a server doing TLS itself: a DN with non-ASCII characters and RFC 2253
/// specials matches pg_ident.conf only in the form OpenSSL prints
/// (`\XX` escapes), never in its raw UTF-8 form; a non-ASCII CN is
/// compared byte for byte; `ssl_crl_dir` naming an empty directory refuses
/// every client certificate, and a CRL written there later (no reload)
/// revokes at once while the CA's other certificates pass.
#[test]
fn certificate_names_and_crl_dirs_decide_as_the_server() {
    let pooled = Arc::new(Cluster::builder().label("pooled").start());
    if skip(&pooled) {
        return;
    }
    let direct = Cluster::builder().label("direct").preload(false).start();
    setup(&pooled);
    pooled.run_bounded(TEST_LIMIT, move |pooled| {
        let hba = "local all all trust\n\
                   hostssl all dnuser 127.0.0.1/32 cert clientname=DN map=dn\n\
                   hostssl all rawuser 127.0.0.1/32 cert clientname=DN map=raw\n\
                   hostssl all cnuser 127.0.0.1/32 cert map=cn\n\
                   hostssl all vca 127.0.0.1/32 trust clientcert=verify-ca\n\
                   host all postgres 127.0.0.1/32 trust\n";
        // The escaped form is what the server compares; the raw UTF-8 form
        // must never match (the old lossy formatting matched it).
        let ident = "dn \"CN=Jos\\C3\\A9 \\+1,O=\\C3\\9C\\, Inc\" dnuser\n\
                     raw \"CN=José \\+1,O=Ü\\, Inc\" rawuser\n\
                     cn José cnuser\n";
        let roles = ["dnuser", "rawuser", "cnuser", "vca"];
        let mut certs: Vec<Vec<(String, String)>> = Vec::new();
        for pg in [pooled, &direct] {
            make_certs(pg, "one", "server.crt");
            let mine = vec![
                ("non-ASCII DN".to_string(), client_cert_subj(pg, "one", "dn", "/O=Ü, Inc/CN=José \\+1")),
                ("non-ASCII CN".to_string(), client_cert_subj(pg, "one", "cn", "/CN=José")),
                ("v1".to_string(), client_cert_v1(pg, "one", "v1", "/CN=vca")),
                ("v1 revoked".to_string(), client_cert_v1(pg, "one", "v1revoked", "/CN=vca")),
            ];
            certs.push(mine);
            for r in roles {
                pg.admin().batch_execute(&format!("CREATE ROLE {r} LOGIN")).expect("role");
            }
            std::fs::copy(pg.dir().join("one-ca.crt"), pg.data_dir().join("root.crt")).expect("copy CA");
            std::fs::write(pg.data_dir().join("pg_ident.conf"), ident).expect("pg_ident.conf");
            pg.append_conf("ssl = on").expect("conf");
            pg.append_conf("ssl_ca_file = 'root.crt'").expect("conf");
            pg.set_hba(hba).expect("hba");
            pg.restart().expect("restart with ssl = on");
        }
        assert!(wait_until(SETTLE, || pooler_pid(pooled).is_some()), "no pooler after the restart");
        let outcome = |pg: &Cluster, role: &str, extra: &str| {
            login_outcome(pg, &pg.tcp(role, "postgres"), &format!("sslmode=require {extra}"))
        };
        let compare = |what: &str| -> Vec<String> {
            let mut seen = Vec::new();
            for role in roles {
                for (i, (label, _)) in certs[0].iter().enumerate() {
                    let d = outcome(&direct, role, &certs[1][i].1);
                    let p = outcome(pooled, role, &certs[0][i].1);
                    assert_eq!(p, d, "{what}: role {role}, client certificate {label}: through the pooler vs the server");
                    seen.push(format!("{role} / {label}: {d}"));
                }
            }
            eprintln!("{what}:\n{}", seen.join("\n"));
            seen
        };
        let seen = compare("names");
        for want in ["dnuser / non-ASCII DN: ok dnuser", "cnuser / non-ASCII CN: ok cnuser", "vca / non-ASCII CN: ok vca"] {
            assert!(seen.iter().any(|s| s == want), "{want} not seen");
        }
        assert!(seen.iter().any(|s| s.starts_with("rawuser / non-ASCII DN: failed")), "{seen:?}");

        // ssl_crl_dir naming an empty directory: every certificate refused.
        for pg in [pooled, &direct] {
            let d = pg.data_dir().join("crls");
            std::fs::create_dir(&d).expect("crl dir");
            pg.append_conf("ssl_crl_dir = 'crls'").expect("conf");
            pg.reload().expect("reload");
        }
        assert!(
            wait_until(SETTLE, || outcome(pooled, "vca", &certs[0][1].1).starts_with("failed")),
            "a certificate accepted with an empty ssl_crl_dir"
        );
        assert!(wait_until(SETTLE, || outcome(&direct, "vca", &certs[1][1].1).starts_with("failed")), "server reload");
        let seen = compare("empty ssl_crl_dir");
        assert!(seen.iter().all(|s| s.contains("failed")), "{seen:?}");
        // A CRL revoking the DN certificate written into the directory, no
        // reload: revoked at once, the CN certificate passes again.
        for pg in [pooled, &direct] {
            revoke(pg, "one", &["client-one-dn.crt", "client-one-v1revoked.crt"], "one.crl");
            let out = Command::new("openssl").args(["crl", "-hash", "-noout", "-in"]).arg(pg.data_dir().join("one.crl")).output().expect("openssl crl");
            let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
            std::fs::rename(pg.data_dir().join("one.crl"), pg.data_dir().join("crls").join(format!("{hash}.r0"))).expect("CRL into the dir");
        }
        let seen = compare("a CRL added to ssl_crl_dir");
        assert!(seen.iter().any(|s| s == "vca / non-ASCII CN: ok vca"), "{seen:?}");
        assert!(seen.iter().any(|s| s.starts_with("vca / non-ASCII DN: failed") && s.contains("revoked")), "{seen:?}");
        assert!(seen.iter().any(|s| s == "vca / v1: ok vca"), "{seen:?}");
        assert!(seen.iter().any(|s| s.starts_with("vca / v1 revoked: failed") && s.contains("revoked")), "{seen:?}");
    });
}

/// `ssl_ca_file` anchors and the client certificate's purpose as the
/// server's OpenSSL checks them, against a server doing TLS itself: a
/// client certificate whose keyUsage allows neither digitalSignature nor
/// keyAgreement is refused; a CA file holding only an intermediate CA
/// anchors nothing (OpenSSL needs a self-signed root), while the same
/// intermediate next to its root completes a chain the client sent
/// without it; end certificates with CA:TRUE (issued by a CA, or
/// self-signed and in the CA file) are accepted as the server accepts them.
#[test]
fn trust_anchors_and_key_usage_as_the_server() {
    let pooled = Arc::new(Cluster::builder().label("pooled").start());
    if skip(&pooled) {
        return;
    }
    let direct = Cluster::builder().label("direct").preload(false).start();
    setup(&pooled);
    pooled.run_bounded(TEST_LIMIT, move |pooled| {
        let hba = "local all all trust\n\
                   hostssl all vca 127.0.0.1/32 trust clientcert=verify-ca\n\
                   host all postgres 127.0.0.1/32 trust\n";
        let mut certs: Vec<Vec<(String, String)>> = Vec::new();
        for pg in [pooled, &direct] {
            make_certs(pg, "one", "server.crt");
            make_certs(pg, "two", "unused.crt");
            let dir = pg.dir().to_path_buf();
            // An intermediate CA "mid" signed by "one".
            std::fs::write(dir.join("mid-ext.cnf"), "basicConstraints=critical,CA:TRUE\nkeyUsage=keyCertSign,cRLSign\n").expect("ext");
            openssl(&["req", "-new", "-nodes", "-newkey", "rsa:2048", "-subj", "/CN=nextgres test CA mid", "-keyout", "mid-ca.key", "-out", "mid-ca.csr"], &dir);
            openssl(
                &["x509", "-req", "-in", "mid-ca.csr", "-CA", "one-ca.crt", "-CAkey", "one-ca.key", "-CAcreateserial", "-days", "2", "-extfile", "mid-ext.cnf", "-out", "mid-ca.crt"],
                &dir,
            );
            // "alice": a self-signed client certificate (no CA) the CA
            // file trusts by itself, and certificates her key signed.
            openssl(
                &["req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2", "-subj", "/CN=vca", "-keyout", "alice-ca.key", "-out", "alice-ca.crt",
                  "-addext", "basicConstraints=critical,CA:FALSE", "-addext", "keyUsage=digitalSignature", "-addext", "extendedKeyUsage=clientAuth"],
                &dir,
            );
            std::fs::set_permissions(dir.join("alice-ca.key"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
            // "bob": a self-signed client certificate with CA:TRUE, as
            // `openssl req -x509` makes it with Debian's default config
            // (its own name: verify-ca checks no name, and two anchors of
            // one name are told apart by OpenSSL's key identifiers, which
            // webpki does not read: another alert for the same refusal).
            openssl(
                &["req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2", "-subj", "/CN=bob", "-keyout", "bob-ca.key", "-out", "bob-ca.crt",
                  "-addext", "basicConstraints=critical,CA:TRUE"],
                &dir,
            );
            std::fs::set_permissions(dir.join("bob-ca.key"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
            certs.push(vec![
                ("plain".to_string(), client_cert(pg, "one", "vca")),
                ("keyUsage keyEncipherment".to_string(), client_cert_ext(pg, "one", "ku", "/CN=vca", "keyUsage=critical,keyEncipherment\n")),
                ("issued by mid".to_string(), client_cert_subj(pg, "mid", "viamid", "/CN=vca")),
                ("v1".to_string(), client_cert_v1(pg, "one", "v1", "/CN=vca")),
                ("v1 issued by mid".to_string(), client_cert_v1(pg, "mid", "v1viamid", "/CN=vca")),
                ("v1 from another CA".to_string(), client_cert_v1(pg, "two", "v1two", "/CN=vca")),
                ("v1 over TLS 1.2".to_string(), format!("{} ssl_max_protocol_version=TLSv1.2", client_cert_v1(pg, "one", "v1tls12", "/CN=vca"))),
                ("alice, self-signed".to_string(), format!("sslcert={} sslkey={}", dir.join("alice-ca.crt").display(), dir.join("alice-ca.key").display())),
                ("v3 signed by alice's key".to_string(), client_cert_subj(pg, "alice", "byalice", "/CN=vca")),
                ("v1 signed by alice's key".to_string(), client_cert_v1(pg, "alice", "v1byalice", "/CN=vca")),
                ("CA:TRUE".to_string(), client_cert_made(pg, "one", "catrue", "/CN=vca", Some("basicConstraints=critical,CA:TRUE\n"))),
                ("bob, self-signed CA:TRUE".to_string(), format!("sslcert={} sslkey={}", dir.join("bob-ca.crt").display(), dir.join("bob-ca.key").display())),
                ("v3 signed by bob's key".to_string(), client_cert_subj(pg, "bob", "bybob", "/CN=vca")),
            ]);
            pg.admin().batch_execute("CREATE ROLE vca LOGIN").expect("role");
            std::fs::copy(dir.join("one-ca.crt"), pg.data_dir().join("root.crt")).expect("copy CA");
            std::fs::copy(dir.join("mid-ca.crt"), pg.data_dir().join("mid.crt")).expect("copy CA");
            let both = [std::fs::read(dir.join("one-ca.crt")).unwrap(), std::fs::read(dir.join("mid-ca.crt")).unwrap()].concat();
            std::fs::write(pg.data_dir().join("both.crt"), both).expect("both");
            let alice = [
                std::fs::read(dir.join("one-ca.crt")).unwrap(),
                std::fs::read(dir.join("alice-ca.crt")).unwrap(),
                std::fs::read(dir.join("bob-ca.crt")).unwrap(),
            ]
            .concat();
            std::fs::write(pg.data_dir().join("alice.crt"), alice).expect("alice");
            pg.append_conf("ssl = on").expect("conf");
            pg.append_conf("ssl_ca_file = 'root.crt'").expect("conf");
            pg.set_hba(hba).expect("hba");
            pg.restart().expect("restart with ssl = on");
        }
        assert!(wait_until(SETTLE, || pooler_pid(pooled).is_some()), "no pooler after the restart");
        let outcome = |pg: &Cluster, extra: &str| {
            login_outcome(pg, &pg.tcp("vca", "postgres"), &format!("sslmode=require {extra}"))
        };
        for ca in ["root.crt", "mid.crt", "both.crt", "alice.crt"] {
            if ca != "root.crt" {
                for pg in [pooled, &direct] {
                    pg.append_conf(&format!("ssl_ca_file = '{ca}'")).expect("conf");
                    pg.reload().expect("reload");
                }
                // Both apply the reload before the next connection; wait on
                // the intermediate's client, whose outcome the CA file decides.
                // (alice's own certificate for the last one).
                let (probe, want_ok) = if ca == "alice.crt" { (7, true) } else { (2, ca == "both.crt") };
                assert!(wait_until(SETTLE, || outcome(pooled, &certs[0][probe].1).starts_with("ok") == want_ok), "pooler reload to {ca}");
                assert!(wait_until(SETTLE, || outcome(&direct, &certs[1][probe].1).starts_with("ok") == want_ok), "server reload to {ca}");
            }
            let mut seen = Vec::new();
            for (i, (label, _)) in certs[0].iter().enumerate() {
                let d = outcome(&direct, &certs[1][i].1);
                let p = outcome(pooled, &certs[0][i].1);
                assert_eq!(p, d, "ssl_ca_file {ca}, client certificate {label}: through the pooler vs the server");
                seen.push(format!("{ca} / {label}: {d}"));
            }
            eprintln!("{}", seen.join("\n"));
            let want_ku = format!("{ca} / keyUsage keyEncipherment: failed");
            assert!(seen.iter().any(|s| s.starts_with(&want_ku)), "{seen:?}");
            // v1 end certificates (webpki refuses them; the pooler checks
            // their chains itself).
            if ca != "mid.crt" {
                for want in ["v1: ok vca", "v1 over TLS 1.2: ok vca"] {
                    assert!(seen.contains(&format!("{ca} / {want}")), "{want} {seen:?}");
                }
            }
            assert_eq!(seen.iter().any(|s| s == &format!("{ca} / v1 issued by mid: ok vca")), ca == "both.crt", "{seen:?}");
            assert!(seen.iter().any(|s| s.starts_with(&format!("{ca} / v1 from another CA: failed"))), "{seen:?}");
            // A trusted certificate that is no CA vouches for itself only
            // (webpki alone trusted whatever its key signed).
            assert_eq!(seen.contains(&format!("{ca} / alice, self-signed: ok vca")), ca == "alice.crt", "{seen:?}");
            for forged in ["v3 signed by alice's key", "v1 signed by alice's key"] {
                assert!(seen.iter().any(|s| s.starts_with(&format!("{ca} / {forged}: failed"))), "{seen:?}");
            }
            // CA:TRUE end certificates, which OpenSSL takes as client
            // certificates (webpki refuses them: the pooler checks their
            // chains itself); bob, a self-signed CA, vouches for what his
            // key signed too.
            assert_eq!(seen.contains(&format!("{ca} / CA:TRUE: ok vca")), ca != "mid.crt", "{seen:?}");
            for bobs in ["bob, self-signed CA:TRUE", "v3 signed by bob's key"] {
                assert_eq!(seen.contains(&format!("{ca} / {bobs}: ok vca")), ca == "alice.crt", "{seen:?}");
            }
        }
    });
}

/// A client config like [`client_config`] offering `alpn` (none when empty).
fn client_config_alpn(ca: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut c = (*client_config(ca)).clone();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// What a server does with a TLS client: `direct` starts the handshake
/// with no SSLRequest; `alpn` is what the client offers; after the
/// handshake `then` is sent and the answer described: `closed`, `N`,
/// `S`, the first message's tag, or an error's `code message`. A failed
/// handshake is `handshake failed: <rustls error>`.
fn tls_probe(port: u16, ca: &Path, direct: bool, alpn: &[&[u8]], then: &[&[u8]]) -> String {
    let mut s = tcp(port);
    if !direct {
        assert_eq!(ssl_request(&mut s), b'S');
    }
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let conn = rustls::ClientConnection::new(client_config_alpn(ca, alpn), name).expect("client connection");
    let mut t = rustls::StreamOwned::new(conn, s);
    while t.conn.is_handshaking() {
        if let Err(e) = t.conn.complete_io(&mut t.sock) {
            return format!("handshake failed: {e}");
        }
    }
    let alpn_got = t.conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
    // Each packet of `then` in turn, one answer read after each but the
    // last; after the last every answer up to the close (or the first
    // authentication request).
    let mut got = Vec::new();
    for (i, packet) in then.iter().enumerate() {
        if t.write_all(packet).and_then(|_| t.flush()).is_err() {
            got.push("closed".to_string());
            break;
        }
        if i + 1 == then.len() {
            break;
        }
        let mut b = [0u8; 1];
        match t.read(&mut b) {
            Ok(1) if b[0] == b'N' => got.push("N".into()),
            Ok(1) => got.push(format!("{:?}", b[0] as char)),
            _ => got.push("closed".into()),
        }
    }
    loop {
        let mut first = [0u8; 1];
        match t.read(&mut first) {
            Ok(0) | Err(_) => {
                got.push("closed".to_string());
                break;
            }
            Ok(_) if first[0] == b'E' => {
                let mut len = [0u8; 4];
                if t.read_exact(&mut len).is_err() {
                    got.push("E cut short".into());
                    break;
                }
                let mut body = vec![0u8; (i32::from_be_bytes(len).max(4) - 4) as usize];
                if t.read_exact(&mut body).is_err() {
                    got.push("E cut short".into());
                    break;
                }
                got.push(error_text(&body));
            }
            Ok(_) if first[0] == b'N' => got.push("N".into()),
            Ok(_) => {
                got.push((first[0] as char).to_string());
                break;
            }
        }
    }
    let got = got.join(", ");
    format!("alpn {alpn_got:?}, {got}")
}

/// Direct TLS (`sslnegotiation=direct`, PostgreSQL 17+ clients): psql
/// connects through the pooler with it and lands on a pooled backend (17+;
/// on 15 and 16 a direct handshake is refused as by that server); a
/// direct handshake without ALPN, one offering only another protocol
/// (direct and after SSLRequest), and GSSENCRequest or SSLRequest sent
/// inside direct TLS end as on a cluster whose server does TLS itself.
#[test]
fn direct_tls_as_the_server() {
    let pooled = Arc::new(Cluster::builder().label("pooled").start());
    if skip(&pooled) {
        return;
    }
    let direct = Cluster::builder().label("direct").preload(false).start();
    setup(&pooled);
    pooled.run_bounded(TEST_LIMIT, move |pooled| {
        let mut cas = Vec::new();
        for pg in [pooled, &direct] {
            cas.push(ssl_on(pg));
        }
        assert!(wait_until(SETTLE, || pooler_pid(pooled).is_some()), "no pooler after the restart");
        // Direct TLS came with 17 (server and libpq); before, a first byte
        // 0x16 is an invalid startup length on both (the probes below).
        let has_direct = pooled.pg_major() >= 17;
        if has_direct {
            let conn = pooled.tcp("postgres", "postgres");
            let root = format!("sslrootcert={}", cas[0].display());
            let out = psql_cs(
                pooled,
                &conn,
                &format!("sslmode=verify-full sslnegotiation=direct {root}"),
                &[&of_client("tls IS NOT NULL"), "SELECT count(*) > 0 FROM nextgres.backends WHERE pid = pg_backend_pid()"],
            );
            assert_eq!(out.stdout.trim(), "t\nt", "sslnegotiation=direct through the pooler:\n{out}\n{}", out.stderr);
        }
        let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        let startup = nextgres_test::raw::startup_packet("postgres", "postgres");
        let pg: &[u8] = b"postgresql";
        let (gss_startup, ssl_startup) = ([&gss[..], &startup].concat(), [&ssl[..], &startup].concat());
        let cases: Vec<(&str, bool, Vec<&[u8]>, Vec<&[u8]>)> = vec![
            ("direct, ALPN postgresql, startup", true, vec![pg], vec![&startup]),
            ("direct, no ALPN, startup", true, vec![], vec![&startup]),
            ("direct, ALPN other", true, vec![b"http/1.1"], vec![&startup]),
            ("SSLRequest, ALPN other", false, vec![b"http/1.1"], vec![&startup]),
            ("SSLRequest, no ALPN, startup", false, vec![], vec![&startup]),
            ("direct, GSSENCRequest, startup", true, vec![pg], vec![&gss, &startup]),
            ("direct, SSLRequest, startup", true, vec![pg], vec![&ssl, &startup]),
            ("direct, GSSENCRequest twice", true, vec![pg], vec![&gss, &gss]),
            ("direct, SSLRequest twice", true, vec![pg], vec![&ssl, &ssl]),
            ("direct, SSLRequest, GSSENCRequest, SSLRequest", true, vec![pg], vec![&ssl, &gss, &ssl]),
            ("direct, GSSENCRequest with startup pipelined", true, vec![pg], vec![&gss_startup]),
            ("direct, SSLRequest with startup pipelined", true, vec![pg], vec![&ssl_startup]),
            ("SSLRequest, GSSENCRequest", false, vec![pg], vec![&gss]),
            ("SSLRequest, SSLRequest", false, vec![pg], vec![&ssl]),
        ];
        let mut seen = Vec::new();
        for (label, is_direct, alpn, then) in &cases {
            let d = tls_probe(direct.port(), &cas[1], *is_direct, alpn, then);
            let p = tls_probe(pooled.port(), &cas[0], *is_direct, alpn, then);
            seen.push(format!("{label}: {d}"));
            if p != d {
                seen.push(format!("  MISMATCH, through the pooler: {p}"));
            }
        }
        eprintln!("{}", seen.join("\n"));
        assert!(!seen.iter().any(|s| s.contains("MISMATCH")), "through the pooler vs the server:\n{}", seen.join("\n"));
        assert_eq!(seen[0].ends_with(", R"), has_direct, "{seen:?}");
    });
}

/// Acceptance 3 over TLS, in part: pipelining (pgbench `\startpipeline`,
/// extended protocol, 4 TLS clients over one pooled backend), session
/// state that moves with a TLS client and does not leak (SET and PREPARE
/// of a TLS client, absent for a plaintext client on the same backend,
/// present again for the TLS client on that backend and, after
/// `nextgres.reconnect()`, on a new backend pid), and LISTEN/NOTIFY
/// delivered through the relay.
#[test]
fn pipelining_session_state_and_notify_over_tls() {
    with_tls_server(Cluster::builder().conf("nextgres.pool_size = 1"), |pg, ca, _pooler| {
        pg.admin().batch_execute("CREATE TABLE pipe (client int, v int)").expect("table");
        let script = pg.dir().join("tls_pipeline.sql");
        // The division fails for a client that is not on TLS.
        std::fs::write(
            &script,
            "\\set v random(1, 1000)\n\
             \\startpipeline\n\
             INSERT INTO pipe VALUES (:client_id, :v);\n\
             INSERT INTO pipe VALUES (:client_id, :v + 1);\n\
             SELECT 1 / (SELECT count(*) FROM nextgres.clients WHERE client_port = inet_client_port() AND tls IS NOT NULL)::int;\n\
             \\endpipeline\n",
        )
        .expect("script");
        // pgbench's sslmode is the default (prefer): TLS here.
        let conn = pg.tcp("postgres", "postgres");
        let out = pg.pgbench(&conn, &["-n", "-M", "extended", "-c", "4", "-j", "2", "-t", "25", "-f", &script.to_string_lossy()]);
        assert!(out.success(), "pgbench pipeline over TLS:\n{out}");
        assert_eq!(admin_i64(pg, "SELECT count(*) FROM pipe"), 200, "{out}");
        assert_eq!(admin_i64(pg, "SELECT count(DISTINCT client) FROM pipe"), 4);

        // Session state of a TLS client moves with it, and only with it.
        let mut t = TlsRaw::connect(pg.port(), &ca, "postgres", "postgres").expect("TLS login");
        t.send_query("SET work_mem = '7MB'; PREPARE p AS SELECT 42");
        t.until_ready().expect("SET and PREPARE");
        let pid_tls = t.value("SELECT pg_backend_pid()");
        let plain = psql_cs(
            pg,
            &conn,
            "sslmode=disable",
            &["SELECT pg_backend_pid()", "SHOW work_mem", "SELECT count(*) FROM pg_prepared_statements"],
        );
        assert!(plain.success(), "{plain}");
        let lines: Vec<&str> = plain.stdout.lines().collect();
        assert_eq!(lines[0], pid_tls, "pool_size 1: the plaintext client on the TLS client's backend");
        assert_eq!(&lines[1..], ["4MB", "0"], "the TLS client's SET or PREPARE leaked to a plaintext client");
        assert_eq!(t.value("SHOW work_mem"), "7MB");
        assert_eq!(t.value("EXECUTE p"), "42");
        t.value("SELECT nextgres.reconnect(current_database(), current_user)::text");
        let pid_after = t.value("SELECT pg_backend_pid()");
        assert_ne!(pid_after, pid_tls, "the TLS client's next transaction on the same backend after reconnect");
        assert_eq!(t.value("SHOW work_mem"), "7MB", "SET lost on the new backend");
        assert_eq!(t.value("EXECUTE p"), "42", "PREPARE lost on the new backend");

        // LISTEN/NOTIFY through the relay.
        t.send_query("LISTEN tls_channel");
        t.until_ready().expect("LISTEN");
        pg.admin().batch_execute("NOTIFY tls_channel, 'over tls'").expect("NOTIFY");
        let payload = loop {
            let (tag, body) = t.read_msg().expect("NotificationResponse within the read timeout");
            if tag == b'A' {
                let fields: Vec<String> = body[4..].split(|&b| b == 0).map(|f| String::from_utf8_lossy(f).into_owned()).collect();
                break (fields[0].clone(), fields[1].clone());
            }
        };
        assert_eq!(payload, ("tls_channel".to_string(), "over tls".to_string()));
        assert_eq!(t.value("SELECT 'still served'"), "still served");
    });
}

/// Replication clients on TLS (issue 13): a logical walsender session
/// (IDENTIFY_SYSTEM) and pg_receivewal with sslmode=verify-full through the
/// pooler's relay thread, the walsender showing the client's address. The
/// relay lives in the pooler (documented limit): a TLS pg_receivewal loses
/// its connection when the pooler gets SIGTERM.
#[test]
fn replication_clients_over_tls() {
    with_tls_server(Cluster::builder(), |pg, ca, pooler| {
        let conn = pg.tcp("postgres", "postgres");
        let tls = format!("sslmode=verify-full sslrootcert={}", ca.display());
        let out = psql_cs(pg, &conn, &format!("{tls} replication=database"), &["IDENTIFY_SYSTEM"]);
        assert!(out.success(), "logical walsender session over TLS:\n{out}");

        let end = pg.psql_query(&pg.unix("postgres", "postgres"), "SELECT pg_current_wal_flush_lsn()");
        let dir = pg.dir().join("receivewal");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let receivewal = |extra: &[&str]| {
            let mut c = Command::new(pg.install().client_bin("pg_receivewal"));
            nextgres_test::cmd::scrub_pg_env(&mut c);
            let ci = format!("{} {tls}", conn.conninfo());
            c.args(["-D", &dir.to_string_lossy(), "--no-loop", "-d", &ci]).args(extra);
            c
        };
        let out = nextgres_test::cmd::run(receivewal(&["-E", &end]), Duration::from_secs(60)).expect("pg_receivewal");
        assert!(out.success(), "pg_receivewal over TLS:\n{out}");

        let mut child = receivewal(&[]).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().expect("spawn");
        let streaming = "SELECT client_addr::text FROM pg_stat_replication WHERE state = 'streaming'";
        let ok = wait_until(SETTLE, || pg.psql_query(&pg.unix("postgres", "postgres"), streaming) == "127.0.0.1/32");
        if !ok {
            let _ = child.kill();
            panic!("no streaming walsender for the TLS pg_receivewal\n{}", pg.log_tail(30));
        }
        assert_eq!(unsafe { libc::kill(pooler, libc::SIGTERM) }, 0);
        let ended = wait_until(SETTLE, || child.try_wait().ok().flatten().is_some());
        if !ended {
            let _ = child.kill();
        }
        let _ = child.wait();
        assert!(ended, "a TLS replication client outlived its relay (the pooler's SIGTERM)");
    });
}

/// Issue 12, `pg_stat_ssl` and `nextgres.clients` for pooled TLS clients:
/// the same client certificates (one CA, server certificate and client
/// certificates shared by both clusters, so serials and DNs are equal) on
/// a cluster whose server does TLS itself and through the pooler give the
/// same `pg_stat_ssl` row for the session (ssl, version, cipher, bits,
/// client_dn, client_serial, issuer_dn): without a certificate, with a DN
/// needing RFC 2253 escapes, with non-ASCII characters (raw UTF-8, as the
/// server prints them) and with one longer than the server keeps (cut at
/// 63 bytes on both). `nextgres.clients` shows the same version, cipher and
/// client DN. After the TLS client leaves its backend, that backend shows
/// `ssl = false` while parked and to the next, plaintext, client on it.
#[test]
fn pg_stat_ssl_of_pooled_tls_clients_as_the_server() {
    let pooled = Arc::new(Cluster::builder().label("pooled").conf("nextgres.pool_size = 1").start());
    if skip(&pooled) {
        return;
    }
    let direct = Cluster::builder().label("direct").preload(false).start();
    setup(&pooled);
    pooled.run_bounded(TEST_LIMIT, move |pooled| {
        let ca = make_certs(pooled, "one", "server.crt");
        let dir = pooled.dir().to_path_buf();
        install_cert(&direct, &dir.join("one-server.crt"), &dir.join("one-server.key"), "server.crt");
        let certs = [
            ("no certificate", String::new()),
            ("escaped DN", client_cert_subj(pooled, "one", "alice", "/O=Example, Inc/OU=a\\+b/CN=alice")),
            ("non-ASCII DN", client_cert_subj(pooled, "one", "jose", "/O=Ü/CN=José")),
            (
                "DN over 63 bytes",
                client_cert_subj(pooled, "one", "long", "/O=An organisation with a rather long name indeed/OU=Some unit/CN=longname"),
            ),
        ];
        for pg in [pooled, &direct] {
            std::fs::copy(&ca, pg.data_dir().join("root.crt")).expect("copy CA");
            pg.append_conf("ssl = on").expect("conf");
            pg.append_conf("ssl_ca_file = 'root.crt'").expect("conf");
            pg.restart().expect("restart with ssl = on");
        }
        assert!(wait_until(SETTLE, || pooler_pid(pooled).is_some()), "no pooler after the restart");
        let stat = "SELECT ssl, version, cipher, bits, client_dn, client_serial, issuer_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
        // nextgres.clients keeps 63 bytes of the DN, as pg_stat_ssl.
        let clients_agree = "SELECT (c.tls IS NOT NULL, c.tls, c.tls_cipher, c.client_dn) IS NOT DISTINCT FROM (s.ssl, s.version, s.cipher, s.client_dn) \
                             FROM nextgres.clients c, pg_stat_ssl s WHERE c.client_port = inet_client_port() AND s.pid = pg_backend_pid()";
        let tls = format!("sslmode=verify-full sslrootcert={}", ca.display());
        let mut seen = Vec::new();
        let mut tls_pid = String::new();
        for (label, cert) in &certs {
            let extra = format!("{tls} {cert}");
            let d = psql_cs(&direct, &direct.tcp("postgres", "postgres"), &extra, &[stat]);
            assert!(d.success(), "{label}, direct:\n{d}");
            let p = psql_cs(pooled, &pooled.tcp("postgres", "postgres"), &extra, &[stat, clients_agree, "SELECT pg_backend_pid()"]);
            assert!(p.success(), "{label}, pooled:\n{p}");
            let lines: Vec<&str> = p.stdout.lines().collect();
            assert_eq!(lines[0], d.stdout.trim(), "{label}: pg_stat_ssl through the pooler vs the server");
            assert_eq!(lines[1], "t", "{label}: nextgres.clients vs pg_stat_ssl of the session");
            tls_pid = lines[2].to_string();
            seen.push(format!("{label}: {}", lines[0]));
        }
        eprintln!("{}", seen.join("\n"));
        // What the server printed, so that equality is not trivially empty.
        assert!(seen[0].starts_with("no certificate: t|TLSv1.") && seen[0].ends_with("|||"), "{seen:?}");
        assert!(seen[1].contains("|/O=Example\\, Inc/OU=a\\+b/CN=alice|"), "{seen:?}");
        assert!(seen[2].contains("|/O=Ü/CN=José|"), "{seen:?}");
        assert!(seen.iter().skip(1).all(|s| s.ends_with("|/CN=nextgres test CA one")), "{seen:?}");
        // The server keeps NAMEDATALEN - 1 bytes of a DN.
        let long_dn = seen[3].split('|').nth(4).unwrap_or_default();
        assert_eq!(long_dn.len(), 63, "{seen:?}");

        // The TLS client left: its backend (pool_size 1) shows no TLS, parked
        // and for the next, plaintext, client. Parked, it shows no client
        // address either, so pg_stat_ssl (rows with a client port) has no
        // row for it, as for a direct session that ended.
        let admin_ssl = format!(
            "SELECT a.ssl::text || ' ' || (SELECT count(*) FROM pg_stat_ssl s WHERE s.pid = a.pid) FROM pg_stat_get_activity({tls_pid}) a"
        );
        assert!(
            wait_until(SETTLE, || pooled.psql_query(&pooled.unix("postgres", "postgres"), &admin_ssl) == "false 0"),
            "the parked backend still shows ssl = true or a pg_stat_ssl row: {}",
            pooled.psql_query(&pooled.unix("postgres", "postgres"), &admin_ssl)
        );
        let conn = pooled.tcp("postgres", "postgres");
        let plain = psql_cs(
            pooled,
            &conn,
            "sslmode=disable",
            &["SELECT pg_backend_pid()", stat, &of_client("tls IS NULL AND tls_cipher IS NULL AND client_dn IS NULL")],
        );
        assert!(plain.success(), "{plain}");
        let lines: Vec<&str> = plain.stdout.lines().collect();
        assert_eq!(lines[0], tls_pid, "pool_size 1: the plaintext client on the TLS client's backend");
        let direct_plain = psql_cs(&direct, &direct.tcp("postgres", "postgres"), "sslmode=disable", &[stat]);
        assert_eq!(lines[1], direct_plain.stdout.trim(), "plaintext after TLS on one backend vs the server");
        assert!(lines[1].starts_with("f|"), "{plain}");
        assert_eq!(lines[2], "t", "nextgres.clients of a plaintext client");
    });
}

/// How many TLS clients `nextgres.clients` shows parked.
fn parked_count(pg: &Cluster) -> i64 {
    admin_i64(pg, "SELECT count(*) FROM nextgres.clients WHERE tls_relay = 'parked'")
}

/// After a FATAL, the rest of a TLS client's stream: true when it ends
/// with close_notify (rustls reads Ok(0); an EOF without it is an error).
fn ends_with_close_notify(t: &mut TlsRaw) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match t.s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// A parked TLS client that sends its last query, Terminate and
/// close_notify in one write, then closes: the query runs and commits, as
/// the server runs a query sent just before a client's close (review
/// finding: the pooler dropped the plaintext that came with close_notify).
#[test]
fn a_parked_clients_last_query_before_close_notify_runs() {
    with_tls_server(Cluster::builder(), |pg, ca, _pooler| {
        pg.admin()
            .batch_execute("CREATE TABLE last_words (i int); GRANT INSERT ON last_words TO app")
            .expect("table");
        let mut t = TlsRaw::connect(pg.port(), &ca, "app", "postgres").expect("TLS login");
        assert_eq!(t.value("SELECT 1"), "1");
        assert!(wait_until(SETTLE, || parked_count(pg) == 1), "the TLS client was never parked");
        let sql = b"INSERT INTO last_words VALUES (1)\0";
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((4 + sql.len()) as i32).to_be_bytes());
        msg.extend_from_slice(sql);
        msg.extend_from_slice(&[b'X', 0, 0, 0, 4]);
        t.s.conn.writer().write_all(&msg).expect("query and Terminate");
        t.s.conn.send_close_notify();
        let mut records = Vec::new();
        while t.s.conn.wants_write() {
            t.s.conn.write_tls(&mut records).expect("TLS records");
        }
        t.s.sock.write_all(&records).expect("one write");
        drop(t);
        assert!(
            wait_until(SETTLE, || admin_i64(pg, "SELECT count(*) FROM last_words") == 1),
            "the query sent with close_notify never ran\n{}",
            pg.log_tail(20)
        );
    });
}

/// Acceptance 5 (pooler memory per idle TLS client): a TLS client idle in
/// the pooler for two janitor ticks is parked, its relay thread and
/// socketpair gone. With N parked clients /proc/<pooler>/fd holds at most
/// N more than the idle pooler measured first (plus one per pooled
/// backend opened since), and /proc/<pooler>/task no more threads; each
/// shows `tls_relay = 'parked'` in nextgres.clients. Parked clients then
/// run transactions (a KeyUpdate first on one; results right, the backend
/// pid changes across a reconnect as for any TLS client) and park again; a
/// parked client that sends garbage TLS is closed while the others are
/// served; one killed by `nextgres.kill_client` gets 57P01 and
/// close_notify; one that sends Terminate gets close_notify; at pooler
/// SIGTERM every parked client gets 57P01 and close_notify.
#[test]
fn idle_tls_clients_park_without_a_thread_or_socketpair() {
    with_tls_server(Cluster::builder(), |pg, ca, pooler| {
        let port = pg.port();
        // Warm: both pools have a backend, the pooler its steady fds.
        for user in ["app", "postgres"] {
            let mut warm = nextgres_test::raw::Raw::connect(port, user, "postgres", TEST_LIMIT / 4);
            assert_eq!(warm.value("SELECT 1"), "1");
        }
        warm_tls(pg, &ca, pooler);
        let backends = || admin_i64(pg, "SELECT count(*) FROM nextgres.backends");
        assert!(wait_until(SETTLE, || admin_i64(pg, "SELECT count(*) FROM nextgres.clients") == 0), "warm clients left");
        let (tasks0, fds0, backends0) = (proc_count(pooler, "task"), proc_count(pooler, "fd"), backends());
        assert!(tasks0 > 0 && fds0 > 0, "no /proc for the pooler {pooler}");

        const N: usize = 20;
        let mut clients: Vec<TlsRaw> = (0..N)
            .map(|i| {
                let user = if i == 0 { "postgres" } else { "app" };
                let mut t = TlsRaw::connect(port, &ca, user, "postgres").expect("TLS login");
                assert_eq!(t.value(&format!("SELECT {i}")), i.to_string());
                t
            })
            .collect();
        // Parked within a few janitor ticks (1 s each).
        assert!(
            wait_until(SETTLE, || parked_count(pg) == N as i64),
            "TLS clients parked: {} of {N}",
            parked_count(pg)
        );
        let (tasks, fds, more_backends) = (proc_count(pooler, "task"), proc_count(pooler, "fd"), (backends() - backends0).max(0) as usize);
        eprintln!("{N} parked TLS clients: pooler fds {fds} (idle {fds0}), threads {tasks} (idle {tasks0})");
        assert!(fds <= fds0 + N + more_backends, "pooler fds with {N} parked TLS clients: {fds} (idle pooler {fds0}, backends opened since {more_backends})");
        // A relay closes its pair end (what marks it parked) just before
        // its thread ends: the thread count may lag a moment.
        assert!(
            wait_until(SETTLE, || proc_count(pooler, "task") <= tasks0),
            "pooler threads with {N} parked TLS clients: {} (idle pooler {tasks0}; {tasks} when all were parked)",
            proc_count(pooler, "task")
        );

        // Parked clients are served; one sends a KeyUpdate first.
        clients[1].s.conn.refresh_traffic_keys().expect("KeyUpdate");
        for (i, t) in clients.iter_mut().enumerate() {
            assert_eq!(t.value(&format!("SELECT {i} + 1")), (i + 1).to_string(), "parked client {i}");
        }
        let first = clients[0].value("SELECT pg_backend_pid()");
        clients[0].value("SELECT nextgres.reconnect(current_database(), current_user)::text");
        let second = clients[0].value("SELECT pg_backend_pid()");
        assert_ne!(first, second, "a parked client's transactions stayed on backend {first} across a reconnect");
        assert_eq!(clients[0].value(&of_client("tls_relay")), "thread", "an unparked client's tls_relay");
        assert!(
            wait_until(SETTLE, || parked_count(pg) == N as i64),
            "TLS clients parked again: {} of {N}",
            parked_count(pg)
        );
        assert!(wait_until(SETTLE, || proc_count(pooler, "task") <= tasks0), "threads after parking again");

        // Garbage TLS from a parked client: closed; the others are served.
        let mut bad = clients.pop().expect("client");
        bad.s.sock.write_all(&[0x17, 0x03, 0x03, 0x00, 0x20]).expect("record header");
        bad.s.sock.write_all(&[0xff; 32]).expect("garbage");
        assert!(closed(&mut bad.s.sock), "a parked client that sent garbage TLS was left open");
        assert_eq!(clients[3].value("SELECT 'served'"), "served", "a parked client after another's garbage");

        // kill_client: 57P01 and close_notify to a parked client.
        assert!(wait_until(SETTLE, || parked_count(pg) == (N - 1) as i64), "parked before kill_client: {}", parked_count(pg));
        let mut victim = clients.pop().expect("client");
        let vport = i32::from(victim.s.sock.local_addr().expect("local addr").port());
        let killed: bool = pg
            .admin()
            .query_one("SELECT nextgres.kill_client('127.0.0.1', $1)", &[&vport])
            .expect("kill_client")
            .get(0);
        assert!(killed, "kill_client found no client on port {vport}");
        match victim.until_ready() {
            Err(RawFail::Db { code, .. }) => assert_eq!(code, "57P01", "parked client at kill_client"),
            other => panic!("parked client at kill_client: {other:?}"),
        }
        assert!(ends_with_close_notify(&mut victim), "no close_notify after kill_client's FATAL");

        // Terminate from a parked client: closed with close_notify.
        let mut leaving = clients.pop().expect("client");
        leaving.s.write_all(&[b'X', 0, 0, 0, 4]).expect("Terminate");
        assert!(ends_with_close_notify(&mut leaving), "a parked client's Terminate: no close_notify");

        // Pooler SIGTERM: every parked client gets 57P01 and close_notify.
        assert!(wait_until(SETTLE, || parked_count(pg) == (N - 3) as i64), "parked before SIGTERM: {}", parked_count(pg));
        terminate_pooler(pooler);
        for (i, t) in clients.iter_mut().enumerate() {
            match t.until_ready() {
                Err(RawFail::Db { code, .. }) => assert_eq!(code, "57P01", "parked client {i} at pooler exit"),
                other => panic!("parked client {i} at pooler exit: {other:?}"),
            }
            assert!(ends_with_close_notify(t), "parked client {i}: no close_notify after 57P01");
        }
    });
}

/// A parked TLS client's next message needs no new thread: its session
/// goes back to a relay worker. With the pooler's soft RLIMIT_NPROC at 1
/// (no thread can start) a parked client is served again, while a new TLS
/// client, whose handshake needs a thread, gets FATAL 53300 in plaintext;
/// plaintext clients are served meanwhile, and new TLS clients again once
/// the limit is back.
#[test]
fn a_parked_tls_client_is_served_when_no_thread_can_start() {
    with_tls_server(Cluster::builder(), |pg, ca, pooler| {
        let port = pg.port();
        let (nproc, hard) = pooler_nproc(pg, pooler);
        let mut t = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS login");
        assert_eq!(t.value("SELECT 1"), "1");
        assert!(wait_until(SETTLE, || parked_count(pg) == 1), "the TLS client was never parked");
        assert!(relay_threads(pooler).1 > 0, "no relay worker after a TLS session: {:?}", relay_threads(pooler));
        nproc(&format!("1:{hard}"));
        assert_eq!(t.value("SELECT 2"), "2", "a parked client while no thread can start");
        let (got, text) = refused_ssl_request(port);
        assert!(
            got.first() == Some(&b'E') && text.contains("C53300") && text.contains("could not start a thread for the TLS relay"),
            "a new TLS client while no thread can start: {text:?}"
        );
        let mut plain = nextgres_test::raw::Raw::connect(port, "app", "postgres", TEST_LIMIT / 4);
        assert_eq!(plain.value("SELECT 3"), "3", "plaintext client while no thread can start");
        nproc(&format!("{hard}:{hard}"));
        let mut t2 = TlsRaw::connect(port, &ca, "app", "postgres").expect("TLS client with threads again");
        assert_eq!(t2.value("SELECT 4"), "4");
        assert_eq!(t.value("SELECT 5"), "5");
        assert_eq!(pooler_pid(pg), Some(pooler), "the pooler restarted");
    });
}
