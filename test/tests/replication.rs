//! Replication connections on the pooler's port (issue 13): each walsender
//! client gets a dedicated walsender of its own, on its own socket
//! (`src/pooler/dedicated.rs`). pg_basebackup -X stream, pg_receivewal, a
//! streaming standby whose primary_conninfo names the pooler's port (through
//! a pgbench run, SIGTERM and kill -9 of the pooler), a logical subscription
//! and pg_recvlogical, and the `replication` parameter and pg_hba.conf
//! replication lines decided exactly as a direct server decides them.
//!
//! ```sh
//! NEXTGRES_PG=17 cargo test -p nextgres-test --test replication -- --test-threads=2
//! ```

mod pool_support;

use std::net::TcpStream;
use std::time::Duration;

use nextgres_test::{wait_until, Cluster, ConnInfo, PasswordEncryption};
use pool_support::{exec, raw_startup, sched_policy, SidePort};

/// The libpq string of a replication connection (`replication=...` added).
fn repl_conninfo(ci: &ConnInfo, replication: &str) -> String {
    format!("{} replication={replication}", ci.conninfo())
}

fn scalar(pg: &Cluster, sql: &str) -> String {
    pg.psql_query(&pg.unix("postgres", "postgres"), sql)
}

fn pooler_pid(pg: &Cluster) -> Option<i32> {
    pg.admin()
        .query_one("SELECT pooler_pid FROM nextgres.status()", &[])
        .expect("nextgres.status()")
        .get(0)
}

/// Waits (bounded) until the standby has replayed everything the primary
/// has written now.
#[track_caller]
fn wait_caught_up(primary: &Cluster, standby: &Cluster, what: &str) {
    // The insert position: with synchronous_commit = off (the harness) the last
    // commits may not be written yet; the WAL writer flushes them soon.
    let target = scalar(primary, "SELECT pg_current_wal_insert_lsn()");
    let ok = wait_until(Duration::from_secs(90), || {
        scalar(standby, &format!("SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn")) == "t"
    });
    assert!(
        ok,
        "{what}: the standby never replayed up to {target} (at {})\n--- primary log ---\n{}\n--- standby log ---\n{}",
        scalar(standby, "SELECT pg_last_wal_replay_lsn()"),
        primary.log_tail(30),
        standby.log_tail(30)
    );
}

#[track_caller]
fn same_history(primary: &Cluster, standby: &Cluster, what: &str) -> i64 {
    let sql = "SELECT count(*) FROM pgbench_history";
    let (p, s) = (scalar(primary, sql), scalar(standby, sql));
    assert_eq!(p, s, "{what}: pgbench_history rows on primary vs standby");
    p.parse().expect("count")
}

/// The standby's walsender on the primary: (pid, client_addr, application_name).
fn walsender(primary: &Cluster) -> Option<(i32, String, String)> {
    let rows = primary
        .admin()
        .query(
            "SELECT pid, client_addr::text, application_name FROM pg_stat_replication WHERE state = 'streaming'",
            &[],
        )
        .expect("pg_stat_replication");
    rows.first().map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default(), r.get(2)))
}

/// Acceptance 1 and 5: `pg_basebackup -X stream -R` through the pooler's
/// port makes a standby whose primary_conninfo names that port; it replays
/// `pgbench -i` and a pgbench run and catches up (replay LSN and row count),
/// and pg_stat_replication shows its real address and application_name
/// (which makes it the synchronous standby by synchronous_standby_names).
/// SIGTERM to the pooler: the same walsender (pid) keeps streaming new WAL.
/// kill -9 of the pooler (the pooler process is no postmaster child, so no
/// crash restart): the same walsender keeps streaming, a client of a
/// `pool_mode = dedicated` role keeps its backend (same pid) and commits the
/// transaction it had open, a new pooler (new pid) serves pgbench, and the
/// standby catches up.
#[test]
fn standby_streams_through_pooler_port() {
    let primary = Cluster::builder().conf("nextgres.pool_size = 2").start();
    exec(&primary, "CREATE EXTENSION nextgres");
    let pooled = primary.tcp("postgres", "postgres");
    primary.pgbench_init(&pooled, 1).assert_success();
    let standby = Cluster::builder()
        .preload(false)
        .label("standby")
        .base_backup_from(format!("host=127.0.0.1 port={} user=postgres application_name=standby1", primary.port()))
        .start();
    let auto = std::fs::read_to_string(standby.data_dir().join("postgresql.auto.conf")).expect("postgresql.auto.conf");
    assert!(auto.contains(&format!("port={}", primary.port())), "primary_conninfo names the pooler's port:\n{auto}");
    assert!(
        wait_until(Duration::from_secs(60), || walsender(&primary).is_some()),
        "no streaming walsender\n{}\n{}",
        primary.log_tail(30),
        standby.log_tail(30)
    );
    let (pid, addr, app) = walsender(&primary).expect("walsender");
    assert_eq!((addr.as_str(), app.as_str()), ("127.0.0.1/32", "standby1"), "pg_stat_replication shows the client");
    let sql = format!("SELECT backend_type || ' ' || client_addr::text FROM pg_stat_activity WHERE pid = {pid}");
    assert_eq!(scalar(&primary, &sql), "walsender 127.0.0.1/32");
    // Out of the pool, it runs under the policy a direct walsender has
    // (pooled backends run under SCHED_BATCH, `backend_batch_scheduling`).
    assert_eq!(sched_policy(pid), sched_policy(primary.pid().expect("postmaster pid")), "the walsender's scheduling policy");
    // Its application_name counts for synchronous_standby_names.
    exec(&primary, "ALTER SYSTEM SET synchronous_standby_names = 'standby1'; SELECT pg_reload_conf()");
    let sync = "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'";
    assert!(
        wait_until(Duration::from_secs(30), || scalar(&primary, sync) == "sync"),
        "standby1 never became the synchronous standby: {}",
        scalar(&primary, sync)
    );

    primary.pgbench(&pooled, &["-n", "-c", "4", "-t", "100"]).assert_success();
    wait_caught_up(&primary, &standby, "after pgbench");
    let rows = same_history(&primary, &standby, "after pgbench");
    assert_eq!(rows, 400);

    // SIGTERM: a new pooler takes over; the walsender never noticed.
    let old = pooler_pid(&primary).expect("pooler");
    assert_eq!(unsafe { libc::kill(old, libc::SIGTERM) }, 0);
    assert!(
        wait_until(Duration::from_secs(60), || pooler_pid(&primary).is_some_and(|p| p != old)),
        "no new pooler after SIGTERM\n{}",
        primary.log_tail(30)
    );
    assert_eq!(walsender(&primary).map(|w| w.0), Some(pid), "the walsender survived the pooler's SIGTERM");
    primary.pgbench(&pooled, &["-n", "-c", "2", "-t", "50"]).assert_success();
    wait_caught_up(&primary, &standby, "after SIGTERM of the pooler");
    assert_eq!(same_history(&primary, &standby, "after SIGTERM"), 500);
    assert_eq!(walsender(&primary).map(|w| w.0), Some(pid), "still the same walsender");

    // A dedicated session inside a transaction. The role's pool_mode reaches
    // the pooler through its settings reader: retry until a client of `d`
    // is served as dedicated.
    exec(
        &primary,
        "CREATE ROLE d LOGIN; CREATE TABLE ded(i int); GRANT ALL ON ded TO d; ALTER ROLE d SET nextgres.pool_mode = dedicated",
    );
    let dedicated_now = || -> i32 {
        primary
            .admin()
            .query_opt("SELECT backends_dedicated FROM nextgres.pools WHERE role = 'd'", &[])
            .expect("nextgres.pools")
            .map_or(0, |r| r.get(0))
    };
    let mut ded = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            let mut c = primary.tcp("d", "postgres").connect().expect("client of d");
            c.batch_execute("BEGIN; INSERT INTO ded VALUES (1)").expect("insert");
            if dedicated_now() == 1 {
                ded = Some(c);
                true
            } else {
                c.batch_execute("ROLLBACK").expect("rollback");
                false
            }
        }),
        "role d never served as dedicated\n{}",
        primary.log_tail(30)
    );
    let mut ded = ded.expect("dedicated client");
    let ded_pid: i32 = ded.query_one("SELECT pg_backend_pid()", &[]).expect("pid").get(0);

    // kill -9: no crash restart; walsender and dedicated session live on.
    let old = pooler_pid(&primary).expect("pooler");
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    let mut new = None;
    let ok = wait_until(Duration::from_secs(60), || {
        new = pooler_pid(&primary).filter(|&p| p != old);
        new.is_some()
    });
    assert!(ok, "no new pooler after kill -9\n{}", primary.log_tail(30));
    // Its log lines name it (log_line_prefix %b), not the agent.
    let ready = format!("[{}] nextgres pooler LOG:  nextgres: pooler ready", new.expect("new pooler"));
    assert!(
        wait_until(Duration::from_secs(10), || primary.log().contains(&ready)),
        "no {ready:?} line\n{}",
        primary.log_tail(30)
    );
    assert!(
        primary.log().contains(&format!("pooler process (PID {old}) was terminated by signal 9")),
        "the agent did not log the pooler's end\n{}",
        primary.log_tail(30)
    );
    assert!(!primary.log().contains("terminating any other active server processes"), "crash restart\n{}", primary.log_tail(30));
    assert_eq!(walsender(&primary).map(|w| w.0), Some(pid), "the walsender survived kill -9 of the pooler");
    let ded_state = format!("SELECT state FROM pg_stat_activity WHERE pid = {ded_pid}");
    assert_eq!(scalar(&primary, &ded_state), "idle in transaction", "the dedicated session survived kill -9 of the pooler");
    let same: i32 = ded.query_one("SELECT pg_backend_pid()", &[]).expect("dedicated session after kill -9").get(0);
    assert_eq!(same, ded_pid, "the dedicated session kept its backend");
    // Its backend cannot give the client back to a pooler that is gone, so
    // the connection may end right after the COMMIT; the row tells.
    let _ = ded.batch_execute("COMMIT");
    assert_eq!(scalar(&primary, "SELECT count(*) FROM ded"), "1", "the dedicated session's transaction committed after kill -9");
    primary.pgbench(&pooled, &["-n", "-c", "2", "-t", "50"]).assert_success();
    wait_caught_up(&primary, &standby, "after kill -9 of the pooler");
    assert_eq!(same_history(&primary, &standby, "after kill -9"), 600);
    assert_eq!(walsender(&primary).map(|w| w.0), Some(pid), "still the same walsender after kill -9");
    assert_eq!(scalar(&standby, "SELECT count(*) FROM ded"), "1", "the standby replayed the dedicated session's commit");
}

/// Acceptance 1: pg_receivewal through the pooler's port streams WAL up to
/// a given LSN (--endpos) and exits 0.
#[test]
fn receivewal_through_pooler_port() {
    let pg = Cluster::builder().start();
    exec(&pg, "CREATE TABLE t(i int); INSERT INTO t SELECT generate_series(1, 1000)");
    let end = scalar(&pg, "SELECT pg_current_wal_flush_lsn()");
    // No segment switch after `end`: pg_receivewal starts at the start of
    // the server's current segment and must not begin past its end point.
    let dir = pg.dir().join("receivewal");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let mut c = std::process::Command::new(pg.install().client_bin("pg_receivewal"));
    nextgres_test::cmd::scrub_pg_env(&mut c);
    let ci = pg.tcp("postgres", "postgres").conninfo();
    c.args(["-D", &dir.to_string_lossy(), "--no-loop", "-E", &end, "-d", &ci]);
    let out = nextgres_test::cmd::run(c, Duration::from_secs(120)).expect("pg_receivewal");
    out.assert_success();
    let files: Vec<_> = std::fs::read_dir(&dir).expect("readdir").flatten().map(|e| e.file_name()).collect();
    assert!(!files.is_empty(), "pg_receivewal wrote nothing\n{out}");
    // The walsender exits with its client, as a direct one does.
    assert!(
        wait_until(Duration::from_secs(30), || scalar(&pg, "SELECT count(*) FROM pg_stat_replication") == "0"),
        "walsender left behind"
    );
}

/// Acceptance 2: a second cluster subscribes through the publisher's
/// pooler port (initial copy, then streamed changes; its walsender survives
/// kill -9 of the pooler), and pg_recvlogical
/// with test_decoding decodes an INSERT through it.
#[test]
fn logical_replication_through_pooler_port() {
    let publisher = Cluster::builder().conf("wal_level = logical").start();
    exec(
        &publisher,
        "CREATE EXTENSION nextgres; CREATE TABLE t(id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'x' || g FROM generate_series(1, 100) g;
         CREATE PUBLICATION p FOR TABLE t",
    );
    let subscriber = Cluster::builder().preload(false).label("subscriber").start();
    exec(&subscriber, "CREATE TABLE t(id int PRIMARY KEY, v text)");
    let ci = format!("host=127.0.0.1 port={} user=postgres dbname=postgres", publisher.port());
    exec(&subscriber, &format!("CREATE SUBSCRIPTION s CONNECTION '{ci}' PUBLICATION p"));
    let count = |n: &str| {
        wait_until(Duration::from_secs(90), || scalar(&subscriber, "SELECT count(*) FROM t") == n)
    };
    assert!(count("100"), "initial copy never arrived\n{}\n{}", publisher.log_tail(30), subscriber.log_tail(30));
    publisher
        .psql(&publisher.tcp("postgres", "postgres"), &["-c", "INSERT INTO t SELECT g, 'y' FROM generate_series(101, 150) g"])
        .assert_success();
    assert!(count("150"), "streamed changes never arrived\n{}", subscriber.log_tail(30));
    let addr = scalar(&publisher, "SELECT client_addr::text FROM pg_stat_replication WHERE application_name = 's'");
    assert_eq!(addr, "127.0.0.1/32");

    // Acceptance 5 for a logical walsender: kill -9 of the pooler (no crash
    // restart: the pooler process is no postmaster child) leaves the
    // subscription's walsender (same pid) streaming.
    let ws = "SELECT pid FROM pg_stat_replication WHERE application_name = 's'";
    let ws_pid = scalar(&publisher, ws);
    let old = pooler_pid(&publisher).expect("pooler");
    // SAFETY: plain kill(2) on the pooler's pid from nextgres.status().
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0);
    assert!(
        wait_until(Duration::from_secs(60), || pooler_pid(&publisher).is_some_and(|p| p != old)),
        "no new pooler after kill -9\n{}",
        publisher.log_tail(30)
    );
    exec(&publisher, "INSERT INTO t SELECT g, 'z' FROM generate_series(151, 200) g");
    assert!(count("200"), "changes after kill -9 of the pooler never arrived\n{}", subscriber.log_tail(30));
    assert_eq!(scalar(&publisher, ws), ws_pid, "the subscription's walsender survived kill -9 of the pooler");
    assert!(
        !publisher.log().contains("terminating any other active server processes"),
        "crash restart\n{}",
        publisher.log_tail(30)
    );
    exec(&subscriber, "DROP SUBSCRIPTION s");

    // pg_recvlogical with test_decoding.
    let lib = publisher.install().pkglibdir().expect("pkglibdir").join("test_decoding.so");
    if !lib.exists() {
        assert_eq!(publisher.pg_major(), 16, "test_decoding missing from {}", lib.display());
        eprintln!("SKIP pg_recvlogical: this PostgreSQL 16 tree has no test_decoding ({})", lib.display());
        return;
    }
    let recvlogical = |args: &[&str]| {
        let mut c = std::process::Command::new(publisher.install().client_bin("pg_recvlogical"));
        nextgres_test::cmd::scrub_pg_env(&mut c);
        c.args(["-d", &ci, "-S", "slot1"]).args(args);
        nextgres_test::cmd::run(c, Duration::from_secs(120)).expect("pg_recvlogical")
    };
    recvlogical(&["--create-slot", "-P", "test_decoding"]).assert_success();
    // Flushed at commit (the harness runs synchronous_commit = off), so the
    // walsender has it before pg_recvlogical looks for the end point.
    exec(&publisher, "SET synchronous_commit = on; INSERT INTO t VALUES (1000, 'decoded'); CHECKPOINT");
    let end = scalar(&publisher, "SELECT pg_current_wal_flush_lsn()");
    let out = recvlogical(&["--start", "--no-loop", "-E", &end, "-f", "-"]);
    out.assert_success();
    assert!(out.stdout.contains("table public.t: INSERT: id[integer]:1000 v[text]:'decoded'"), "{out}");
}

/// What a client sees of a login with this startup packet: the error's
/// SQLSTATE, message, detail and hint, or "ready".
fn raw_outcome(port: u16, params: &[(&str, &str)]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let (msgs, closed) = raw_startup(&mut s, params);
    match msgs.last() {
        Some(m) if m.tag == b'E' => {
            let (c, msg) = (m.field(b'C').unwrap_or_default(), m.field(b'M').unwrap_or_default());
            format!("{c} {msg} detail={:?} hint={:?} closed={closed}", m.field(b'D'), m.field(b'H'))
        }
        Some(m) if m.tag == b'Z' => "ready".into(),
        Some(m) => format!("message {}", m.tag as char),
        None => "eof".into(),
    }
}

/// The `replication` startup parameter is read as the server reads it
/// (booleans, exactly `database`, anything else FATAL 22023 with the
/// server's hint), compared with the server's own listener.
#[test]
fn replication_parameter_matches_direct_server() {
    let sp = SidePort::start(Cluster::builder().conf("wal_level = logical"));
    for v in ["true", "on", "yes", "1", "TRUE", "database", "false", "0", "off", "bogus", "Database", "o", ""] {
        let params = [("user", "postgres"), ("database", "postgres"), ("replication", v)];
        let direct = raw_outcome(sp.pg.port(), &params);
        let pooled = raw_outcome(sp.pool_port, &params);
        eprintln!("replication={v:?}: {direct}");
        assert_eq!(pooled, direct, "replication={v:?}");
    }
    // A client posing as the pooler (its startup token) is refused as the
    // server's login hook refuses it on a direct connection.
    for v in ["true", "database"] {
        let params = [("user", "postgres"), ("database", "postgres"), ("replication", v), ("nextgres.pool_token", "00")];
        let direct = raw_outcome(sp.pg.port(), &params);
        assert!(direct.starts_with("28000 nextgres: invalid pooled-backend login"), "{direct}");
        assert_eq!(raw_outcome(sp.pool_port, &params), direct, "pool token, replication={v}");
    }
}

const HBA: &str = "\
local all postgres trust
local all all trust
local replication all trust
host replication rejected 127.0.0.1/32 reject
host replication repl_pw 127.0.0.1/32 scram-sha-256
host replication repl_md5 127.0.0.1/32 md5
host all rejected 127.0.0.1/32 reject
host all logical_pw 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
";

/// One replication login with psql: `ok` (IDENTIFY_SYSTEM answered) or
/// psql's error text, the port blanked.
fn psql_repl(pg: &Cluster, ci: &ConnInfo, replication: &str, password: Option<&str>) -> String {
    let mut c = std::process::Command::new(pg.install().client_bin("psql"));
    nextgres_test::cmd::scrub_pg_env(&mut c);
    if let Some(p) = password {
        c.env("PGPASSWORD", p);
    }
    c.args(["-X", "-w", "-A", "-t", "-d", &repl_conninfo(ci, replication), "-c", "IDENTIFY_SYSTEM"]);
    let out = nextgres_test::cmd::run(c, Duration::from_secs(60)).expect("psql");
    assert!(!out.timed_out, "psql hung:\n{out}");
    if out.success() {
        "ok".into()
    } else {
        out.stderr.trim().replace(&format!("port {}", ci.port), "port N")
    }
}

/// Acceptance 3: pg_hba.conf `replication` lines, `reject` lines and the
/// password methods decide replication logins through the pooler exactly
/// as the server's own listener does: physical ones match only
/// `replication` lines, logical ones only database lines; right and wrong
/// passwords; a role without REPLICATION (the server's own refusal).
#[test]
fn hba_replication_lines_match_direct_server() {
    let sp = SidePort::start(Cluster::builder().hba(HBA).conf("wal_level = logical"));
    let pg = &sp.pg;
    for r in ["repl_pw", "logical_pw", "rejected"] {
        pg.create_role(r, "pw", PasswordEncryption::ScramSha256);
    }
    pg.create_role("repl_md5", "pw", PasswordEncryption::Md5);
    pg.create_role("norepl", "pw", PasswordEncryption::ScramSha256);
    exec(pg, "ALTER ROLE repl_pw REPLICATION; ALTER ROLE repl_md5 REPLICATION; ALTER ROLE logical_pw REPLICATION; ALTER ROLE rejected REPLICATION");
    let cases: &[(&str, &str, Option<&str>, bool)] = &[
        ("repl_pw", "true", Some("pw"), true),
        ("repl_pw", "true", Some("wrong"), false),
        ("repl_pw", "true", None, false),
        ("repl_md5", "true", Some("pw"), true),
        ("repl_md5", "true", Some("wrong"), false),
        ("repl_pw", "database", None, true), // database line: trust
        ("logical_pw", "true", Some("pw"), false), // no replication line
        ("logical_pw", "database", Some("pw"), true),
        ("logical_pw", "database", Some("wrong"), false),
        ("rejected", "true", Some("pw"), false),
        ("rejected", "database", Some("pw"), false),
        ("norepl", "database", None, false), // no REPLICATION attribute
        ("norepl", "true", None, false),
        ("nosuchrole", "database", None, false),
        ("postgres", "yes", None, false), // no host replication line for postgres
        ("postgres", "database", None, true),
    ];
    let mut results = Vec::new();
    for &(user, repl, pw, ok) in cases {
        let direct = psql_repl(pg, &sp.direct(user, "postgres"), repl, pw);
        let pooled = psql_repl(pg, &sp.pooled(user, "postgres"), repl, pw);
        eprintln!("{user} replication={repl} password={pw:?}: {direct}");
        assert_eq!(direct == "ok", ok, "direct server answer for {user} {repl}: {direct}");
        results.push((user, repl, pw, direct == pooled, direct, pooled));
    }
    let bad: Vec<_> = results.iter().filter(|r| !r.3).collect();
    assert!(bad.is_empty(), "differences:\n{bad:#?}");
}

/// The walsender's own login through the Unix socket needs a `local
/// replication` line (`all` does not match replication connections): without
/// one the client gets the server's refusal with a hint naming the fix.
#[test]
fn refused_walsender_login_names_the_hba_fix() {
    let pg = Cluster::builder()
        .hba("local all all trust\nhost replication all 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 trust\n")
        .start();
    let mut s = TcpStream::connect(("127.0.0.1", pg.port())).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let (msgs, closed) = raw_startup(&mut s, &[("user", "postgres"), ("database", "postgres"), ("replication", "true")]);
    let e = msgs.last().filter(|m| m.tag == b'E').unwrap_or_else(|| panic!("no error: {msgs:?}"));
    assert_eq!(e.field(b'C').as_deref(), Some("28000"));
    assert_eq!(
        e.field(b'M').as_deref(),
        Some("no pg_hba.conf entry for replication connection from host \"[local]\", user \"postgres\", no encryption")
    );
    assert!(e.field(b'H').is_some_and(|h| h.contains("local replication all")), "hint: {:?}", e.field(b'H'));
    assert!(closed, "the connection must close after the FATAL");
}

/// A CancelRequest sent to the pooler's port with the BackendKeyData a
/// replication client got cancels its walsender's running query (57014, as
/// directly); a wrong key cancels nothing.
#[test]
fn cancel_reaches_walsender() {
    let pg = Cluster::builder().conf("wal_level = logical").start();
    let mut s = TcpStream::connect(("127.0.0.1", pg.port())).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let (msgs, _) = raw_startup(&mut s, &[("user", "postgres"), ("database", "postgres"), ("replication", "database")]);
    assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'), "{msgs:?}");
    let k = msgs.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
    let pid = i32::from_be_bytes([k.body[0], k.body[1], k.body[2], k.body[3]]);
    let backend_type = scalar(&pg, &format!("SELECT backend_type FROM pg_stat_activity WHERE pid = {pid}"));
    assert_eq!(backend_type, "walsender", "the key names the client's walsender");
    let cancel = |key: &[u8]| {
        let mut c = TcpStream::connect(("127.0.0.1", pg.port())).expect("connect");
        let mut pkt = 16i32.to_be_bytes().to_vec();
        pkt.extend_from_slice(&80877102i32.to_be_bytes());
        pkt.extend_from_slice(&pid.to_be_bytes());
        pkt.extend_from_slice(key);
        std::io::Write::write_all(&mut c, &pkt).expect("cancel");
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut c, &mut buf); // the pooler closes it
    };
    std::io::Write::write_all(&mut s, &pool_support::query_msg("SELECT pg_sleep(30)")).expect("query");
    let running = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND query = 'SELECT pg_sleep(30)' AND state = 'active'");
    assert!(wait_until(Duration::from_secs(30), || scalar(&pg, &running) == "1"), "query never ran");
    // The pooler passes the request on to the server's socket, where the
    // postmaster checks pid and key: wait (bounded) until the server has
    // refused the wrong key, then the query must still run.
    let mark = pg.log_mark();
    let mut wrong = k.body[4..].to_vec();
    wrong[0] ^= 1;
    cancel(&wrong);
    let refused = format!("wrong key in cancel request for process {pid}");
    assert!(
        wait_until(Duration::from_secs(30), || pg.log_since(mark).contains(&refused)),
        "the server never saw the wrong key: {}",
        pg.log_since(mark)
    );
    assert_eq!(scalar(&pg, &running), "1", "a wrong key cancelled the query");
    cancel(&k.body[4..]);
    let until_ready = |s: &mut TcpStream| {
        let mut seen = Vec::new();
        while let Some(m) = pool_support::read_msg(s) {
            let done = m.tag == b'Z';
            seen.push(m);
            if done {
                break;
            }
        }
        seen
    };
    let seen = until_ready(&mut s);
    let e = seen.iter().find(|m| m.tag == b'E').unwrap_or_else(|| panic!("no error: {seen:?}"));
    assert_eq!(e.field(b'C').as_deref(), Some("57014"), "{:?}", e.field(b'M'));
    // Once more after the right key's 57014: the wrong one was refused by
    // the server and cancelled nothing (no second error on a new query).
    assert_eq!(pg.log_since(mark).matches(&refused).count(), 1);
    std::io::Write::write_all(&mut s, &pool_support::query_msg("SELECT 1")).expect("query");
    let seen = until_ready(&mut s);
    assert!(seen.iter().all(|m| m.tag != b'E'), "{seen:?}");
    assert!(seen.iter().any(|m| m.tag == b'D'), "{seen:?}");
}

/// Startup with a protocol version code: the messages up to ReadyForQuery
/// or an error (trust logins only).
/// The socket stays open (its session alive) while the caller holds it.
fn startup_v(port: u16, code: i32, params: &[(&str, &str)]) -> (Vec<pool_support::Msg>, TcpStream) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    std::io::Write::write_all(&mut s, &pool_support::startup_packet_version(code, params)).expect("startup");
    let mut msgs = Vec::new();
    while let Some(m) = pool_support::read_msg(&mut s) {
        let done = matches!(m.tag, b'Z' | b'E');
        msgs.push(m);
        if done {
            break;
        }
    }
    (msgs, s)
}

/// Review 3: several `replication` parameters are folded as the server
/// folds them (`database` sets both walsender flags, a boolean only the
/// walsender one): `database` then `true` is a logical walsender,
/// connected to its database, through the pooler as directly.
#[test]
fn duplicate_replication_parameters_fold_as_the_server() {
    let sp = SidePort::start(Cluster::builder().conf("wal_level = logical"));
    let pg = &sp.pg;
    let kind = |port: u16, vals: &[&str]| {
        let mut params = vec![("user", "postgres"), ("database", "postgres")];
        params.extend(vals.iter().map(|v| ("replication", *v)));
        let (msgs, _session) = startup_v(port, 196608, &params);
        match msgs.last() {
            Some(m) if m.tag == b'Z' => {
                let k = msgs.iter().find(|m| m.tag == b'K').expect("BackendKeyData");
                let pid = i32::from_be_bytes([k.body[0], k.body[1], k.body[2], k.body[3]]);
                // A pooled ordinary session's key is the pooler's own (no
                // such process): both count as "session".
                let k = scalar(pg, &format!("SELECT backend_type || ':' || coalesce(datname, '-') FROM pg_stat_activity WHERE pid = {pid}"));
                if k.is_empty() || k.starts_with("client backend") { "session".to_string() } else { k }
            }
            Some(m) if m.tag == b'E' => format!("{:?} {:?}", m.field(b'C'), m.field(b'M')),
            m => format!("{m:?}"),
        }
    };
    for vals in [&["database", "true"][..], &["true", "database"], &["database", "false"], &["database", "false", "on"], &["false", "yes"], &["database", "bogus"], &["bogus", "true"]] {
        let direct = kind(pg.port(), vals);
        eprintln!("{vals:?}: {direct}");
        assert_eq!(kind(sp.pool_port, vals), direct, "{vals:?}");
    }
    assert_eq!(kind(sp.pool_port, &["database", "true"]), "walsender:postgres");
}

/// Review 4 and 5: the walsender login speaks the client's protocol
/// version (3.2 on 18: a 32-byte cancel key, as a direct login gets) and
/// its NoticeResponses reach the client in the server's order (here the
/// WARNING of a database setting that names a missing configuration).
#[test]
fn walsender_login_messages_as_direct() {
    let sp = SidePort::start(Cluster::builder().conf("wal_level = logical"));
    let pg = &sp.pg;
    for code in [196608, 196610] {
        for repl in ["true", "database"] {
            let params = [("user", "postgres"), ("database", "postgres"), ("replication", repl)];
            let key_len = |port| {
                let (msgs, _) = startup_v(port, code, &params);
                assert_eq!(msgs.last().map(|m| m.tag), Some(b'Z'), "{msgs:?}");
                msgs.iter().find(|m| m.tag == b'K').map(|k| k.body.len())
            };
            let direct = key_len(pg.port());
            eprintln!("protocol {code:#x} replication={repl}: BackendKeyData {direct:?} bytes");
            assert_eq!(key_len(sp.pool_port), direct, "protocol {code:#x} replication={repl}");
        }
    }
    // A NoticeResponse during the login: the database's own setting names
    // a text search configuration that does not exist (accepted by ALTER
    // DATABASE with a NOTICE, a WARNING at each login to it).
    exec(pg, "CREATE DATABASE ts_db; ALTER DATABASE ts_db SET default_text_search_config = 'public.nosuch'");
    let shape = |port| {
        let (msgs, _) = startup_v(port, 196608, &[("user", "postgres"), ("database", "ts_db"), ("replication", "database")]);
        msgs.iter()
            .filter(|m| m.tag != b'R')
            .map(|m| match m.tag {
                b'N' | b'E' => format!("{}:{:?}", m.tag as char, m.field(b'M')),
                b'S' => format!("S:{}", String::from_utf8_lossy(&m.body[..m.body.iter().position(|&b| b == 0).unwrap_or(0)])),
                t => (t as char).to_string(),
            })
            .collect::<Vec<_>>()
    };
    let direct = shape(pg.port());
    eprintln!("direct login: {direct:?}");
    assert!(direct.iter().any(|m| m.starts_with("N:") && m.contains("default_text_search_config")), "{direct:?}");
    assert_eq!(shape(sp.pool_port), direct);
}

/// Review 6: a client that authenticated without a password (a trust TCP
/// line) while the local replication line asks for one: the refusal says
/// what such a client needs, not that no client has shown a password.
#[test]
fn trust_client_without_secret_gets_the_fix() {
    let pg = Cluster::builder()
        .hba("local all postgres trust\nlocal all all scram-sha-256\nlocal replication all scram-sha-256\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n")
        .start();
    pg.create_role("bob", "pw", PasswordEncryption::ScramSha256);
    exec(&pg, "ALTER ROLE bob REPLICATION");
    let mut s = TcpStream::connect(("127.0.0.1", pg.port())).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let (msgs, closed) = raw_startup(&mut s, &[("user", "bob"), ("database", "postgres"), ("replication", "true")]);
    let e = msgs.last().filter(|m| m.tag == b'E').unwrap_or_else(|| panic!("no error: {msgs:?}"));
    let (m, h) = (e.field(b'M').unwrap_or_default(), e.field(b'H').unwrap_or_default());
    assert!(!m.contains("since the pooler started"), "{m}");
    assert!(m.contains("authenticated without"), "{m}");
    assert!(h.contains("local replication all trust"), "{h}");
    assert!(closed);
}

/// README's recommended pg_hba.conf (a superuser line that accepts the
/// pooler's own local logins without a secret, as `peer` does for the
/// server's OS user; SCRAM for everyone else, replication included).
const README_HBA: &str = "\
local all postgres trust
local all all scram-sha-256
local replication all scram-sha-256
host replication alice 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 scram-sha-256
";

/// psql's view of a replication login with `options` (libpq's own
/// quoting): `ok:<SHOW session_authorization>` or `err:<stderr>`.
fn psql_repl_options(pg: &Cluster, ci: &ConnInfo, replication: &str, options: Option<&str>, password: &str) -> String {
    let mut conninfo = repl_conninfo(ci, replication);
    if let Some(o) = options {
        conninfo.push_str(&format!(" options='{}'", o.replace('\\', "\\\\").replace('\'', "\\'")));
    }
    let mut c = std::process::Command::new(pg.install().client_bin("psql"));
    nextgres_test::cmd::scrub_pg_env(&mut c);
    c.env("PGPASSWORD", password);
    c.args(["-X", "-w", "-A", "-t", "-d", &conninfo, "-c", "SHOW session_authorization"]);
    let out = nextgres_test::cmd::run(c, Duration::from_secs(60)).expect("psql");
    assert!(!out.timed_out, "psql hung:\n{out}");
    if out.success() {
        format!("ok:{}", out.stdout.trim())
    } else {
        format!("err:{}", out.stderr.trim().replace(&format!("port {}", ci.port), "port N"))
    }
}

/// Acceptance (review 1, 7): a replication client's `options` reach its
/// walsender as settings, never as startup parameters: `-c user=...`,
/// `--user=...`, `-c database=...`, `-c replication=...` get the server's
/// own refusal as on a direct connection, never a session of another role,
/// database or kind; and the README's pg_hba.conf (`local replication all
/// scram-sha-256`, a SCRAM role) works end to end.
#[test]
fn options_cannot_change_walsender_login() {
    let sp = SidePort::start(Cluster::builder().hba(README_HBA).conf("wal_level = logical"));
    let pg = &sp.pg;
    pg.create_role("alice", "pw", PasswordEncryption::ScramSha256);
    exec(pg, "ALTER ROLE alice REPLICATION; CREATE DATABASE other");
    let cases: &[(&str, Option<&str>)] = &[
        ("true", None),
        ("database", None),
        ("database", Some("-c user=postgres")),
        ("true", Some("-c user=postgres")),
        ("database", Some("--user=postgres")),
        ("database", Some("-c database=other")),
        ("true", Some("-c replication=database")),
        ("database", Some("-c application_name=a\\ b -c user=postgres")),
    ];
    let mut bad = Vec::new();
    for &(repl, opts) in cases {
        let direct = psql_repl_options(pg, &sp.direct("alice", "postgres"), repl, opts, "pw");
        let pooled = psql_repl_options(pg, &sp.pooled("alice", "postgres"), repl, opts, "pw");
        eprintln!("replication={repl} options={opts:?}: {direct}");
        assert!(!pooled.starts_with("ok:") || pooled == "ok:alice", "another role: {pooled}");
        assert_eq!(direct.starts_with("ok:"), opts.is_none(), "direct answer for {repl} {opts:?}: {direct}");
        if pooled != direct {
            bad.push((repl, opts, direct, pooled));
        }
    }
    assert!(bad.is_empty(), "differences:\n{bad:#?}");
}
