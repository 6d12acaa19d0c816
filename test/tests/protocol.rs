//! The wire protocol through the pooler: pgbench in simple, extended and
//! pipeline mode, COPY both ways, a million-row result, and the pooled-backend
//! marker (`nextgres.pool_token`) that no direct client may use.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test protocol -- --test-threads=2
//! ```

mod pool_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nextgres_test::{parse_summary, with_timeout, Cluster, CmdOutput};
use pool_support::{exec, raw_startup, Msg, SidePort};

#[track_caller]
fn assert_bench(out: &CmdOutput, expected: u64) {
    out.assert_success();
    let s = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
    assert_eq!(
        (s.processed, s.expected),
        (expected, Some(expected)),
        "{out}"
    );
    assert_eq!(s.failed.unwrap_or(0), 0, "{out}");
    assert!(!out.stderr.contains("aborted"), "{out}");
}

fn count(pg: &Cluster, sql: &str) -> i64 {
    pg.admin()
        .query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .get(0)
}

/// pgbench -i and the TPC-B-like run through the pooler, 16 clients on a
/// pool of 4, simple then extended protocol: no failed transaction, and every
/// transaction's history row is there; bench's backends, sampled while each
/// run goes on, are never more than 4 (and some samples see them).
#[test]
fn pgbench_simple_and_extended() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 4").start();
    exec(
        &pg,
        "CREATE ROLE bench LOGIN; GRANT CREATE ON SCHEMA public TO bench",
    );
    let bench = pg.tcp("bench", "postgres");
    pg.pgbench_init(&bench, 1).assert_success();
    assert_eq!(count(&pg, "SELECT count(*) FROM pgbench_accounts"), 100_000);
    for mode in ["simple", "extended"] {
        // Sample bench's backends while pgbench runs; a sample error fails.
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (out, samples, max) = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let mut admin = pg.admin();
                let (mut samples, mut max) = (0usize, 0i64);
                loop {
                    let n: i64 = admin
                        .query_one(
                            "SELECT count(*) FROM pg_stat_activity
                              WHERE usename = 'bench' AND backend_type = 'client backend'",
                            &[],
                        )
                        .unwrap_or_else(|e| panic!("backend sampler: {e:?}"))
                        .get(0);
                    samples += 1;
                    max = max.max(n);
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return (samples, max);
                    }
                    // pacing between samples, not a synchronisation
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let out = pg.pgbench(
                &bench,
                &["-n", "-M", mode, "-c", "16", "-j", "2", "-t", "50"],
            );
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let (samples, max) = sampler.join().expect("sampler");
            (out, samples, max)
        });
        assert_bench(&out, 800);
        eprintln!("{mode}: {samples} samples, at most {max} bench backends");
        assert!(samples > 1, "{mode}: no sample taken during the run");
        assert!(max > 0, "{mode}: no bench backend seen during the run");
        assert!(max <= 4, "{mode}: {max} bench backends with pool_size = 4");
    }
    assert_eq!(count(&pg, "SELECT count(*) FROM pgbench_history"), 1600);
    // Balances moved by exactly what the history says.
    assert_eq!(
        count(&pg, "SELECT (SELECT sum(abalance) FROM pgbench_accounts) - (SELECT sum(delta) FROM pgbench_history)"),
        0
    );
    assert!(
        pg.backend_count(Some("bench"), Some("postgres")) <= 4,
        "{:?}",
        pg.activity()
    );
}

/// A pipelined batch (\startpipeline .. \endpipeline: Parse/Bind/Execute for
/// several statements, one Sync) gives the same results through the pooler
/// as on the server's own port, and an error inside a pipeline ends the
/// same way on both and leaves the pool usable.
#[test]
fn pgbench_pipeline_like_direct() {
    let sp = SidePort::start(Cluster::builder().conf("nextgres.pool_size = 2"));
    let pg = &sp.pg;
    exec(
        pg,
        "CREATE ROLE bench LOGIN;
         CREATE TABLE pipe (port int, client int, v int);
         CREATE TABLE pipe_counter (port int PRIMARY KEY, n int);
         INSERT INTO pipe_counter VALUES (0, 0), (1, 0);
         GRANT ALL ON pipe, pipe_counter TO bench",
    );
    let script = pg.dir().join("pipeline.sql");
    std::fs::write(
        &script,
        "\\set v random(1, 1000)\n\
         \\startpipeline\n\
         INSERT INTO pipe VALUES (:port, :client_id, :v);\n\
         INSERT INTO pipe VALUES (:port, :client_id, :v + 1);\n\
         UPDATE pipe_counter SET n = n + 1 WHERE port = :port;\n\
         SELECT count(*) FROM pipe WHERE port = :port AND client = :client_id;\n\
         \\endpipeline\n",
    )
    .expect("writing the pipeline script");
    let bad = pg.dir().join("pipeline_error.sql");
    std::fs::write(
        &bad,
        "\\startpipeline\n\
         INSERT INTO pipe VALUES (:port, -1, 1);\n\
         SELECT 1 / 0;\n\
         INSERT INTO pipe VALUES (:port, -1, 2);\n\
         \\endpipeline\n",
    )
    .expect("writing the failing pipeline script");
    let script = script.to_string_lossy().into_owned();
    let bad = bad.to_string_lossy().into_owned();

    let mut error_runs = Vec::new();
    for (port, ci) in [
        (0, sp.direct("bench", "postgres")),
        (1, sp.pooled("bench", "postgres")),
    ] {
        let p = format!("port={port}");
        let out = pg.pgbench(
            &ci,
            &[
                "-n", "-M", "extended", "-c", "8", "-j", "2", "-t", "20", "-D", &p, "-f", &script,
            ],
        );
        assert_bench(&out, 160);
        let out = pg.pgbench(
            &ci,
            &[
                "-n", "-M", "extended", "-c", "1", "-t", "1", "-D", &p, "-f", &bad,
            ],
        );
        error_runs.push(out);
    }
    for port in [0, 1] {
        let rows = count(
            pg,
            &format!("SELECT count(*) FROM pipe WHERE port = {port} AND client >= 0"),
        );
        let n = count(
            pg,
            &format!("SELECT n::int8 FROM pipe_counter WHERE port = {port}"),
        );
        assert_eq!(
            (rows, n),
            (320, 160),
            "port {port} (0 = direct, 1 = pooled)"
        );
        // The failed pipeline was one implicit transaction: nothing of it stayed.
        assert_eq!(
            count(
                pg,
                &format!("SELECT count(*) FROM pipe WHERE port = {port} AND client = -1")
            ),
            0
        );
    }
    let (d, p) = (&error_runs[0], &error_runs[1]);
    assert!(!d.timed_out && !p.timed_out, "{d}\n{p}");
    assert_eq!(
        (d.code(), &d.stderr),
        (p.code(), &p.stderr),
        "direct:\n{d}\npooled:\n{p}"
    );
    assert_eq!(
        d.code(),
        Some(2),
        "the failing pipeline must abort the run:\n{d}"
    );
    // The pool (2 backends) still serves after the failed pipeline.
    for _ in 0..3 {
        let mut c = sp
            .pooled("bench", "postgres")
            .connect()
            .expect("pooled login after the error");
        c.simple_query("SELECT 1").expect("query after the error");
    }
}

/// COPY in and out through the pooler, with rust-postgres (inside a
/// transaction: its COPY uses a named prepared statement, which does not yet
/// follow a client across backends) and with psql's \copy (simple protocol,
/// no transaction). Data round-trips exactly.
#[test]
fn copy_in_and_out() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(
        &pg,
        "CREATE ROLE app LOGIN; CREATE TABLE c (id int, t text); GRANT ALL ON c TO app",
    );
    let ci = pg.tcp("app", "postgres");
    let mut client = ci.connect().expect("pooled login");

    const ROWS: i32 = 50_000;
    let mut data = String::new();
    for i in 0..ROWS {
        data.push_str(&format!("{i}\trow {i} \\\\ tab\\there\n"));
    }
    {
        let mut tx = client.transaction().expect("BEGIN");
        let mut w = tx.copy_in("COPY c FROM STDIN").expect("COPY FROM STDIN");
        // Several writes: the stream spans many CopyData messages.
        for chunk in data.as_bytes().chunks(7_919) {
            w.write_all(chunk).expect("copy data");
        }
        assert_eq!(w.finish().expect("COPY done"), ROWS as u64);
        tx.commit().expect("COMMIT");
    }
    let mut out = String::new();
    {
        let mut tx = client.transaction().expect("BEGIN");
        tx.copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT")
            .expect("COPY TO STDOUT")
            .read_to_string(&mut out)
            .expect("copy out data");
        tx.commit().expect("COMMIT");
    }
    assert!(
        out == data,
        "COPY round trip differs ({} vs {} bytes)",
        out.len(),
        data.len()
    );
    // The session is healthy afterwards, in and out of transactions.
    let n: i64 = client
        .query_typed_one("SELECT count(*) FROM c", &[])
        .expect("count")
        .get(0);
    assert_eq!(n, i64::from(ROWS));

    // psql \copy both ways, outside any transaction.
    let file_in = pg.dir().join("in.tsv");
    let file_out = pg.dir().join("out.tsv");
    std::fs::write(&file_in, &data).expect("writing in.tsv");
    let sql_in = format!("\\copy c FROM '{}'", file_in.display());
    pg.psql(&ci, &["-c", &sql_in]).assert_success();
    let sql_out = format!(
        "\\copy (SELECT * FROM c ORDER BY id) TO '{}'",
        file_out.display()
    );
    pg.psql(&ci, &["-c", &sql_out]).assert_success();
    let back = std::fs::read_to_string(&file_out).expect("reading out.tsv");
    // Each row is there twice now (rust-postgres' COPY, then psql's).
    let expected: String = data.lines().map(|l| format!("{l}\n{l}\n")).collect();
    assert!(back == expected, "psql \\copy round trip differs");
    assert_eq!(
        pg.psql_query(&ci, "SELECT count(*) FROM c"),
        (2 * ROWS).to_string()
    );
    // COPY TO STDOUT from psql, then a COPY error mid-stream (bad data).
    let o = pg.psql(
        &ci,
        &[
            "-A",
            "-t",
            "-c",
            "COPY (SELECT id FROM c WHERE id < 3 ORDER BY id) TO STDOUT",
        ],
    );
    o.assert_success();
    assert_eq!(o.stdout, "0\n0\n1\n1\n2\n2\n");
    std::fs::write(&file_in, "1\tok\nnot-a-number\tbad\n").expect("writing bad data");
    let o = pg.psql(&ci, &["-c", &sql_in]);
    o.assert_failure();
    assert!(
        o.stderr.contains("invalid input syntax for type integer"),
        "{o}"
    );
    assert_eq!(
        pg.psql_query(&ci, "SELECT count(*) FROM c"),
        (2 * ROWS).to_string()
    );
}

/// A million-row result, fetched fully through the pooler with the extended
/// protocol (rust-postgres, streamed) and the simple one (psql), arrives
/// complete; afterwards the same connection and the pool go on working.
#[test]
fn million_row_result() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 1").start();
    exec(&pg, "CREATE ROLE app LOGIN");
    let ci = pg.tcp("app", "postgres");
    let (rows, sum) = with_timeout(
        Duration::from_secs(300),
        "1,000,000 rows over rust-postgres",
        {
            let ci = ci.clone();
            move || {
                let mut c = ci.connect().expect("pooled login");
                let mut it = c
                    .query_typed_raw(
                        "SELECT g::int8 FROM generate_series(1, 1000000) g",
                        std::iter::empty::<(i64, postgres::types::Type)>(),
                    )
                    .expect("query");
                let (mut rows, mut sum) = (0i64, 0i64);
                use postgres::fallible_iterator::FallibleIterator;
                while let Some(r) = it.next().expect("row") {
                    rows += 1;
                    sum += r.get::<_, i64>(0);
                }
                drop(it);
                let after: i32 = c.query_typed_one("SELECT 42", &[]).expect("after").get(0);
                assert_eq!(after, 42);
                (rows, sum)
            }
        },
    );
    assert_eq!((rows, sum), (1_000_000, 500_000_500_000));

    let out = pg.psql_timeout(
        &ci,
        &["-A", "-t", "-c", "SELECT generate_series(1, 1000000)"],
        Duration::from_secs(300),
    );
    out.assert_success();
    let (mut n, mut s) = (0i64, 0i64);
    for l in out.stdout.lines() {
        n += 1;
        s += l.trim().parse::<i64>().expect("a number per line");
    }
    assert_eq!((n, s), (1_000_000, 500_000_500_000));
    // The single backend came back: another client gets served.
    assert_eq!(pg.psql_query(&ci, "SELECT 'still here'"), "still here");
}

// ---- the pooled-backend marker --------------------------------------------

fn unix_stream(pg: &Cluster) -> UnixStream {
    let path = pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port()));
    let s =
        UnixStream::connect(&path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    s
}

/// The ParameterStatus messages among `msgs`, by name.
fn parameter_status(msgs: &[Msg]) -> std::collections::BTreeMap<String, String> {
    msgs.iter()
        .filter(|m| m.tag == b'S')
        .map(|m| {
            let mut parts = m.body.split(|&b| b == 0).map(|p| String::from_utf8_lossy(p).into_owned());
            (parts.next().unwrap_or_default(), parts.next().unwrap_or_default())
        })
        .collect()
}

fn tcp_stream(port: u16) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("tcp connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    s
}

/// The reply to a refused startup: exactly one FATAL ErrorResponse with this
/// SQLSTATE (and message, when given), no session (no ReadyForQuery), and
/// the connection closed.
#[track_caller]
fn assert_refused(what: &str, (msgs, closed): (Vec<Msg>, bool), code: &str, message: Option<&str>) {
    assert_refused_any(what, (msgs, closed), Some(code), message)
}

#[track_caller]
fn assert_refused_any(
    what: &str,
    (msgs, closed): (Vec<Msg>, bool),
    code: Option<&str>,
    message: Option<&str>,
) {
    let tags: String = msgs.iter().map(|m| m.tag as char).collect();
    let err = msgs.iter().find(|m| m.tag == b'E');
    let Some(err) = err else {
        panic!("{what}: not refused; got messages {tags:?}")
    };
    assert!(
        !tags.contains('Z'),
        "{what}: a session was started ({tags:?})"
    );
    assert_eq!(err.field(b'S').as_deref(), Some("FATAL"), "{what}");
    if code.is_some() {
        assert_eq!(
            err.field(b'C').as_deref(),
            code,
            "{what}: {:?}",
            err.field(b'M')
        );
    }
    if let Some(m) = message {
        assert_eq!(err.field(b'M').as_deref(), Some(m), "{what}");
    }
    assert!(closed, "{what}: the connection stayed open after the FATAL");
}

/// No direct client can pass for a pooled backend: the marker startup
/// option is refused on the server's Unix socket and TCP port (whatever the
/// token, even for the superuser), `options=-c nextgres.pool_token=` is
/// refused too, and the pooler's TCP port rejects the name with 42602.
#[test]
fn pool_token_is_refused_to_direct_clients() {
    let sp = SidePort::start(Cluster::builder());
    let pg = &sp.pg;
    exec(pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN");
    // Give the pooler a real pool, so a real token is in use right now.
    let mut pooled = sp
        .pooled("app", "postgres")
        .connect()
        .expect("pooled login");
    pooled.simple_query("SELECT 1").expect("pooled query");
    let invalid = Some("nextgres: invalid pooled-backend login");

    for token in ["00".repeat(32), "deadbeef".into(), String::new()] {
        for user in ["app", "postgres"] {
            let params = [
                ("user", user),
                ("database", "postgres"),
                ("nextgres.pool_token", token.as_str()),
            ];
            assert_refused(
                &format!("unix socket, {user}, token {token:?}"),
                raw_startup(&mut unix_stream(pg), &params),
                "28000",
                invalid,
            );
            assert_refused(
                &format!("server TCP port, {user}, token {token:?}"),
                raw_startup(&mut tcp_stream(pg.port()), &params),
                "28000",
                invalid,
            );
        }
    }
    // Through `options`: the reserved prefix makes the server refuse it.
    let opts = [
        ("user", "app"),
        ("database", "postgres"),
        ("options", "-c nextgres.pool_token=00"),
    ];
    let got = raw_startup(&mut unix_stream(pg), &opts);
    assert_refused("unix socket, options", got, "42602", None);
    let got = raw_startup(&mut tcp_stream(sp.pool_port), &opts);
    assert_refused("pooler port, options", got, "42602", None);
    // As a startup parameter to the pooler.
    let params = [
        ("user", "app"),
        ("database", "postgres"),
        ("nextgres.pool_token", "00"),
    ];
    let got = raw_startup(&mut tcp_stream(sp.pool_port), &params);
    assert_refused(
        "pooler port, startup parameter",
        got,
        "42602",
        Some("invalid configuration parameter name \"nextgres.pool_token\""),
    );

    // None of the attempts left a session behind: the only app backend is
    // the pooled one, and the pooler lists exactly one backend.
    let app: Vec<_> = pg
        .activity()
        .into_iter()
        .filter(|a| a.usename.as_deref() == Some("app"))
        .collect();
    assert_eq!(app.len(), 1, "{app:?}");
    let n: i64 = pg
        .admin()
        .query_one("SELECT count(*) FROM nextgres.backends", &[])
        .expect("backends")
        .get(0);
    assert_eq!(n, 1);
    // And the genuine pooled session is unaffected.
    pooled
        .simple_query("SELECT 1")
        .expect("pooled session still works");
    let log = pg.log();
    assert!(
        log.contains("nextgres: invalid pooled-backend login"),
        "refusals not logged"
    );
}

/// The pooler's own settings cannot be set by a client at startup, as on
/// the server (which answers 55P02 "cannot be changed now" for these
/// sighup/postmaster settings): as a startup parameter and in `options`, the
/// pooler's refusal has the server's severity, SQLSTATE and message (a
/// pooler that only refused *unknown* `nextgres.` names would start a
/// session and fail here).
#[test]
fn nextgres_settings_refused_at_pooler_startup() {
    let sp = SidePort::start(Cluster::builder());
    exec(&sp.pg, "CREATE ROLE app LOGIN");
    let opt_params = |opt: &str| {
        vec![
            ("user", "app".to_string()),
            ("database", "postgres".to_string()),
            ("options", opt.to_string()),
        ]
    };
    for (name, value) in [
        ("nextgres.pool_size", "100"),
        ("nextgres.pool_mode", "session"),
        ("nextgres.port", "1"),
    ] {
        let opt = format!("-c {name}={value}");
        let as_param = vec![
            ("user", "app".to_string()),
            ("database", "postgres".to_string()),
            (name, value.to_string()),
        ];
        for (how, params) in [("startup parameter", as_param), ("options", opt_params(&opt))] {
            let params: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let what = format!("{name}={value} as {how}");
            let direct = raw_startup(&mut tcp_stream(sp.pg.port()), &params);
            let want = fatal_fields(&direct)
                .unwrap_or_else(|| panic!("{what}: the server did not refuse it: {:?}", direct.0));
            assert_refused_any(&format!("server port, {what}"), direct, None, None);
            let pooled = raw_startup(&mut tcp_stream(sp.pool_port), &params);
            let got = fatal_fields(&pooled);
            assert_refused(&format!("pooler port, {what}"), pooled, &want.1, Some(&want.2));
            assert_eq!(got.as_ref(), Some(&want), "{what}: pooler vs server");
        }
    }
}

/// (severity, SQLSTATE, message) of the first ErrorResponse of a startup.
fn fatal_fields((msgs, _): &(Vec<Msg>, bool)) -> Option<(String, String, String)> {
    let e = msgs.iter().find(|m| m.tag == b'E')?;
    Some((e.field(b'S')?, e.field(b'C')?, e.field(b'M')?))
}

/// The SO_PEERCRED half of the pool-token check, with the real token: the
/// test (root) moves the server's Unix socket aside and listens in its place,
/// so the pooler's next pool login connects to the test, which reads its
/// StartupMessage (with the per-boot `nextgres.pool_token`) and puts the
/// server's socket back. Those exact parameters, sent by this process (not
/// the pooler) to the server's socket, get FATAL 28000 "nextgres: invalid
/// pooled-backend login"; the pooler, whose peer check passes, then logs in
/// with the same token and serves.
#[test]
fn real_pool_token_from_another_process_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let sp = SidePort::start(Cluster::builder().conf("nextgres.pool_size = 1"));
    let pg = &sp.pg;
    exec(pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN");
    let sock = pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port()));
    let aside = pg.socket_dir().join(format!(".s.PGSQL.{}.aside", pg.port()));

    /// Puts the server's socket back, on every path out.
    struct Restore(std::path::PathBuf, std::path::PathBuf);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            let _ = std::fs::rename(&self.1, &self.0);
        }
    }
    std::fs::rename(&sock, &aside).expect("moving the server socket aside");
    let restore = Restore(sock.clone(), aside);
    let listener = std::os::unix::net::UnixListener::bind(&sock).expect("listening in its place");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    listener.set_nonblocking(true).expect("nonblocking");

    // A pooled client makes the pooler log a backend in (through the test).
    let ci = sp.pooled("app", "postgres");
    std::thread::spawn(move || {
        let _ = ci.connect().map(|mut c| c.simple_query("SELECT 1"));
    });
    let mut stream = None;
    assert!(
        nextgres_test::wait_until(Duration::from_secs(20), || {
            stream = listener.accept().ok().map(|(s, _)| s);
            stream.is_some()
        }),
        "the pooler never made a pool login"
    );
    let mut stream = stream.expect("accepted");
    stream.set_nonblocking(false).expect("blocking");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).expect("startup length");
    let mut body = vec![0u8; i32::from_be_bytes(len) as usize - 4];
    stream.read_exact(&mut body).expect("startup body");
    drop(stream);
    drop(listener);
    drop(restore);

    assert_eq!(&body[..4], &196608i32.to_be_bytes(), "protocol 3.0");
    let fields: Vec<String> = body[4..]
        .split(|&b| b == 0)
        .map(|f| String::from_utf8(f.to_vec()).expect("UTF-8 startup field"))
        .collect();
    let params: Vec<(&str, &str)> = fields
        .chunks(2)
        .filter(|kv| kv.len() == 2 && !kv[0].is_empty())
        .map(|kv| (kv[0].as_str(), kv[1].as_str()))
        .collect();
    let token = params
        .iter()
        .find(|(k, _)| *k == "nextgres.pool_token")
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no token in the pool login: {params:?}"));
    assert!(
        token.len() >= 32 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "not a token: {token:?}"
    );

    // The real token from a process that is not the pooler: refused.
    assert_refused(
        "real token, sent by the test process",
        raw_startup(&mut unix_stream(pg), &params),
        "28000",
        Some("nextgres: invalid pooled-backend login"),
    );
    // The pooler itself, with the same token, logs in and serves.
    let mut served = None;
    assert!(
        nextgres_test::wait_until(Duration::from_secs(30), || {
            served = Some(pool_support::rust_outcome(&sp.pooled("app", "postgres"), None));
            matches!(served, Some(pool_support::Outcome::Ok(_)))
        }),
        "no pooled login after the socket came back: {served:?}\n{}",
        pg.log_tail(30)
    );
    let app: Vec<_> = pg
        .activity()
        .into_iter()
        .filter(|a| a.usename.as_deref() == Some("app"))
        .collect();
    assert_eq!(app.len(), 1, "only the pooled backend runs as app: {app:?}");
}

/// Raw clients speaking the protocol by hand through the pooler get normal
/// sessions (so the refusals above are not an artefact of the helper), and
/// each sees only its own startup settings: two clients with different
/// application_name, TimeZone and client_encoding alternate on a pool of one
/// backend; every ParameterStatus and every result comes in the client's own
/// values and encoding.
#[test]
fn raw_clients_see_only_their_own_parameter_status() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 1").start();
    exec(&pg, "CREATE ROLE app LOGIN");
    // (application_name, TimeZone, client_encoding, chr(233) in that encoding)
    let own: [(&str, &str, &str, &[u8]); 2] = [
        ("raw-one", "Asia/Tokyo", "LATIN1", &[0xE9]),
        ("raw-two", "America/Lima", "UTF8", &[0xC3, 0xA9]),
    ];
    let mut streams = Vec::new();
    for (app, tz, enc, _) in own {
        let mut s = tcp_stream(pg.port());
        let params = [
            ("user", "app"),
            ("database", "postgres"),
            ("application_name", app),
            ("TimeZone", tz),
            ("client_encoding", enc),
        ];
        let (msgs, _) = raw_startup(&mut s, &params);
        let tags: String = msgs.iter().map(|m| m.tag as char).collect();
        assert!(
            tags.starts_with('R') && tags.contains('K') && tags.ends_with('Z'),
            "{tags}"
        );
        check_status(&msgs, app, tz, enc);
        streams.push(s);
    }
    for round in 0..5 {
        for (i, s) in streams.iter_mut().enumerate() {
            let (app, tz, enc, e_acute) = own[i];
            s.write_all(&pool_support::query_msg(
                "SELECT current_setting('application_name') || ' ' || current_setting('TimeZone') || ' ' || chr(233)",
            ))
            .expect("query");
            let mut got = Vec::new();
            while let Some(m) = pool_support::read_msg(s) {
                let tag = m.tag;
                got.push(m);
                if tag == b'Z' {
                    break;
                }
            }
            let tags: String = got
                .iter()
                .map(|m| m.tag as char)
                .filter(|&t| t != 'S')
                .collect();
            assert_eq!(tags, "TDCZ", "client {app} round {round}");
            let row = got.iter().find(|m| m.tag == b'D').expect("data row");
            let mut want = format!("{app} {tz} ").into_bytes();
            want.extend_from_slice(e_acute);
            assert!(
                row.body.ends_with(&want),
                "client {app} round {round}: {:?}",
                String::from_utf8_lossy(&row.body)
            );
            check_status(&got, app, tz, enc);
        }
    }
    for mut s in streams {
        s.write_all(b"X\0\0\0\x04").expect("terminate");
    }
}

/// ParameterStatus messages for application_name, TimeZone and
/// client_encoding, if any, must carry these values.
#[track_caller]
fn check_status(msgs: &[Msg], app: &str, tz: &str, enc: &str) {
    for m in msgs.iter().filter(|m| m.tag == b'S') {
        let mut parts = m
            .body
            .split(|&b| b == 0)
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let (name, value) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let want = match name.as_str() {
            "application_name" => app,
            "TimeZone" => tz,
            "client_encoding" => enc,
            _ => continue,
        };
        assert_eq!(value, want, "client {app} was told {name} = {value}");
    }
}

/// The ParameterStatus of a login is what a login gets now, not what the
/// pool's first backend got at its own login: role and database defaults
/// set after the pool logged in its backends (client_encoding, TimeZone,
/// standard_conforming_strings, DateStyle), a reloaded postgresql.conf
/// (IntervalStyle) and a role that lost SUPERUSER are reported through the
/// pooler as directly, and another client's startup settings do not show.
/// A client told a stale client_encoding sends its text in the wrong
/// encoding.
#[test]
fn login_parameter_status_follows_later_changes() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(&pg, "CREATE ROLE app LOGIN");
    exec(&pg, "CREATE ROLE boss LOGIN SUPERUSER");
    let login = |direct: bool, user: &str| login_report(&pg, direct, user);
    // Both pools have backends, logged in with the defaults of now.
    for user in ["app", "boss"] {
        let mut c = pg.tcp(user, "postgres").connect().expect("pooled client");
        c.simple_query("SELECT 1").expect("first query");
        assert_eq!(login(false, user), login(true, user), "{user} before the changes");
    }
    exec(&pg, "ALTER ROLE app SET client_encoding = 'LATIN1'");
    exec(&pg, "ALTER ROLE app SET TimeZone = 'Asia/Tokyo'");
    exec(&pg, "ALTER ROLE app SET standard_conforming_strings = off");
    exec(&pg, "ALTER DATABASE postgres SET DateStyle = 'SQL, DMY'");
    exec(&pg, "ALTER ROLE boss NOSUPERUSER");
    exec(&pg, "ALTER SYSTEM SET IntervalStyle = 'postgres_verbose'");
    exec(&pg, "SELECT pg_reload_conf()");
    // Another client's startup settings are its own: checking them must
    // leave nothing behind for the next login's report.
    let german = [("user", "boss"), ("database", "postgres"), ("DateStyle", "German"), ("TimeZone", "Europe/Berlin")];
    let (msgs, _) = raw_startup(&mut tcp_stream(pg.port()), &german);
    assert_eq!(parameter_status(&msgs).get("DateStyle").map(String::as_str), Some("German, DMY"));
    let direct = login(true, "app");
    assert_eq!(direct.get("client_encoding").map(String::as_str), Some("LATIN1"), "direct: {direct:?}");
    assert_eq!(login(true, "boss").get("is_superuser").map(String::as_str), Some("off"));
    // The reload reaches the server and the pooler's agent a moment apart.
    let mut last = (Default::default(), Default::default());
    let same = nextgres_test::wait_until(Duration::from_secs(20), || {
        let (d, p) = (login(true, "app"), login(false, "app"));
        let ok = d == p && d.get("IntervalStyle").map(String::as_str) == Some("postgres_verbose");
        last = (d, p);
        ok
    });
    assert!(same, "app after the changes:\n direct {:?}\n pooled {:?}", last.0, last.1);
    assert_eq!(login(false, "boss"), login(true, "boss"), "boss after NOSUPERUSER");
}

/// The ParameterStatus values of a login of `user` to database postgres,
/// directly (the server's socket) or through the pooler.
fn login_report(pg: &Cluster, direct: bool, user: &str) -> std::collections::BTreeMap<String, String> {
    let params = [("user", user), ("database", "postgres")];
    let (msgs, _) = if direct {
        let path = pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port()));
        let mut s = UnixStream::connect(&path).expect("unix connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
        raw_startup(&mut s, &params)
    } else {
        raw_startup(&mut tcp_stream(pg.port()), &params)
    };
    parameter_status(&msgs)
}

/// Any role may give itself a setting larger than the pooler's copy of
/// pg_db_role_setting holds (`ALTER ROLE alice SET search_path` of 260 kB).
/// That leaves only alice's logins without values computed from the copy:
/// bob's login still reports his role's standard_conforming_strings = off
/// and DateStyle as directly. Before, every role's login then reported its
/// pool's backend's values, older than bob's ALTER ROLE: told `on` while
/// the session runs with `off`, a client escaping on its side
/// (PQescapeStringConn) lets a backslash end a literal.
#[test]
fn one_roles_outsized_setting_leaves_other_logins_reports_right() {
    let pg = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE bob LOGIN; CREATE ROLE alice LOGIN; CREATE ROLE carol LOGIN");
    let login = |direct: bool, user: &str| login_report(&pg, direct, user);
    // bob's and carol's pools log in their backends with the defaults of now.
    for user in ["bob", "carol"] {
        let mut c = pg.tcp(user, "postgres").connect().expect("pooled client");
        c.simple_query("SELECT 1").expect("first query");
    }
    exec(&pg, "ALTER ROLE bob SET standard_conforming_strings = off; ALTER ROLE bob SET DateStyle = 'SQL, DMY'");
    let path: Vec<String> = (0..40000).map(|i| format!("s{i:06}")).collect();
    let mut alice = pg.tcp("alice", "postgres").connect().expect("alice");
    alice
        .simple_query(&format!("ALTER ROLE alice SET search_path = '{}'", path.join(",")))
        .expect("alice's own setting");
    // Settings readers run one after another: once carol's pool size shows,
    // the copy with alice's setting is the pooler's.
    exec(&pg, "ALTER ROLE carol SET nextgres.pool_size = 3");
    let read = nextgres_test::wait_until(Duration::from_secs(20), || {
        pg.admin()
            .query_opt("SELECT 1 FROM nextgres.pools WHERE role = 'carol' AND pool_size = 3", &[])
            .expect("nextgres.pools")
            .is_some()
    });
    assert!(read, "carol's pool_size never applied");
    let (direct, pooled) = (login(true, "bob"), login(false, "bob"));
    assert_eq!(direct.get("standard_conforming_strings").map(String::as_str), Some("off"), "{direct:?}");
    for name in ["standard_conforming_strings", "DateStyle"] {
        assert_eq!(pooled.get(name), direct.get(name), "bob's {name}: pooled {pooled:?}\ndirect {direct:?}");
    }
    // alice herself still logs in and works.
    let mut again = pg.tcp("alice", "postgres").connect().expect("alice again");
    let n = again.simple_query("SELECT 1").expect("alice's query").len();
    assert!(n > 0);
}

/// A login right after a committed `ALTER ROLE ... SET` is told the new
/// value, as a direct one is: the pooler's copy of pg_db_role_setting is
/// read again after each change (tens of milliseconds), and logins wait
/// for it. Before, a login in that window was told the old value while its
/// session ran with the new one.
#[test]
fn a_login_right_after_alter_role_set_reports_the_new_value() {
    let pg = Cluster::builder().start();
    exec(&pg, "CREATE ROLE bob LOGIN");
    let mut c = pg.tcp("bob", "postgres").connect().expect("pooled client");
    c.simple_query("SELECT 1").expect("first query");
    let mut admin = pg.admin();
    for (i, style) in ["SQL, DMY", "ISO, MDY", "German, DMY", "Postgres, MDY"].iter().cycle().take(12).enumerate() {
        admin.batch_execute(&format!("ALTER ROLE bob SET DateStyle = '{style}'")).expect("alter role");
        let (msgs, _) = raw_startup(&mut tcp_stream(pg.port()), &[("user", "bob"), ("database", "postgres")]);
        let told = parameter_status(&msgs);
        assert_eq!(told.get("DateStyle").map(String::as_str), Some(*style), "login {i}: {told:?}");
    }
}

/// The login's ParameterStatus messages carry the values as the server
/// shows them, not as the client spelled them (`DateStyle=iso,dmy` is
/// reported `ISO, DMY`, `client_encoding=latin1` `LATIN1`): the same
/// startup packet directly (Unix socket, trust) and through the pooler
/// gets the same set of values before its first ReadyForQuery.
#[test]
fn login_parameter_status_as_the_server_spells_it() {
    let pg = Cluster::builder().start();
    exec(&pg, "CREATE ROLE app LOGIN");
    let params = [
        ("user", "app"),
        ("database", "postgres"),
        ("DateStyle", "iso,dmy"),
        ("client_encoding", "latin1"),
        ("IntervalStyle", "SQL_STANDARD"),
        ("TimeZone", "utc"),
    ];
    let path = pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port()));
    let mut direct = std::os::unix::net::UnixStream::connect(&path).expect("unix connect");
    direct.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    let (d, _) = raw_startup(&mut direct, &params);
    let (p, _) = raw_startup(&mut tcp_stream(pg.port()), &params);
    let (d, p) = (parameter_status(&d), parameter_status(&p));
    assert_eq!(d.get("DateStyle").map(String::as_str), Some("ISO, DMY"), "directly: {d:?}");
    for name in ["DateStyle", "client_encoding", "IntervalStyle", "TimeZone"] {
        assert_eq!(p.get(name), d.get(name), "{name}: pooled {p:?}\ndirect {d:?}");
    }
}
