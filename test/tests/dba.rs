//! What a DBA runs into on an existing server (issue 17): `ssl = on`, a pool
//! larger than the free connection slots, lowering `nextgres.pool_size` by a
//! reload, a pool login refused by pg_hba.conf, the views without the
//! preload, `DROP EXTENSION`, and `inet_server_port()` through the pooler.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test dba -- --test-threads=2
//! ```
mod fault_support;
mod pool_support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use fault_support::{admin_i64, run, APP, APP2, DB, SETTLE};
use nextgres_test::{parse_summary, wait_until, Cluster, ConnInfo, SUPERUSER};
use pool_support::SidePort;

/// Self-signed certificate and key in the data directory, owned by the
/// server's OS user (the server refuses a key others can read). The key is
/// encrypted with the passphrase `nextgres`: the server reads it through
/// `ssl_passphrase_command`, the pooler cannot (so it leaves the port).
fn make_cert(pg: &Cluster) {
    let data = pg.data_dir();
    let out = Command::new("openssl")
        .args(["req", "-new", "-x509", "-days", "2", "-passout", "pass:nextgres", "-subj", "/CN=localhost"])
        .arg("-keyout")
        .arg(data.join("server.key"))
        .arg("-out")
        .arg(data.join("server.crt"))
        .output()
        .expect("running openssl (the openssl CLI must be installed)");
    assert!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
    let owner = nextgres_test::env::OsUser::for_server().expect("server OS user");
    for f in ["server.key", "server.crt"] {
        let p = data.join(f);
        if let Some(u) = &owner {
            std::os::unix::fs::chown(&p, Some(u.uid), Some(u.gid)).expect("chown");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
}

/// psql with extra libpq keywords after the harness's (a later keyword wins).
fn psql_with(pg: &Cluster, conn: &ConnInfo, extra: &str, sql: &str) -> nextgres_test::CmdOutput {
    let conninfo = format!("{} {extra}", conn.conninfo());
    pg.psql(conn, &["-A", "-t", "-d", &conninfo, "-c", sql])
}

const SSL_OF_SESSION: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// `ssl = on` with a key the pooler cannot load (behind
/// `ssl_passphrase_command`; with a loadable one the pooler serves TLS, see
/// tls.rs): the pooler leaves the port (and its TLS) to the server, says so
/// in a startup WARNING and in `nextgres.status()`, and `sslmode=require`
/// keeps working on the port. `nextgres.ssl_takeover = on` makes the pooler
/// take the port, plaintext only, also with a WARNING.
#[test]
fn ssl_on_keeps_the_servers_tls_listener() {
    let pg = std::sync::Arc::new(Cluster::builder().start());
    if !pg.install().has_openssl() {
        eprintln!(
            "SKIPPED: PostgreSQL {} here is built without OpenSSL (ssl = on impossible); the OpenSSL builds (15, 17, 18) run this test",
            pg.pg_major()
        );
        // Only 16's build lacks OpenSSL: a skip anywhere else fails.
        assert_eq!(pg.pg_major(), 16, "PostgreSQL {} here is built without OpenSSL; only 16 may skip", pg.pg_major());
        return;
    }
    pg.run_bounded(Duration::from_secs(300), |pg| {
        pg.admin().batch_execute("CREATE EXTENSION nextgres").expect("extension");
        make_cert(pg);
        pg.append_conf("ssl = on").expect("conf");
        pg.append_conf("ssl_passphrase_command = 'echo nextgres'").expect("conf");
        let mark = pg.log_mark();
        pg.restart().expect("restart with ssl = on");
        let log = pg.log_since(mark);
        assert!(
            log.contains("ssl = on but the pooler cannot use the server's TLS settings (could not load private key file")
                && log.contains("the pooler does not take over port")
                && log.contains("nextgres.ssl_takeover"),
            "no startup WARNING about ssl = on:\n{log}"
        );
        let row = pg.admin().query_one("SELECT port, mode FROM nextgres.status()", &[]).expect("status");
        let (port, mode): (Option<i32>, String) = (row.get(0), row.get(1));
        assert_eq!((port, mode.as_str()), (None, "off: ssl = on"), "status() must say the pooler listens nowhere");

        let direct = pg.tcp("postgres", "postgres");
        let out = psql_with(pg, &direct, "sslmode=require", SSL_OF_SESSION);
        assert!(out.success(), "sslmode=require on the port failed:\n{out}");
        assert_eq!(out.stdout.trim(), "t", "not TLS:\n{out}");
        // Nobody is silently pooled in plaintext.
        let out = psql_with(pg, &direct, "sslmode=prefer", SSL_OF_SESSION);
        assert_eq!(out.stdout.trim(), "t", "sslmode=prefer lost TLS:\n{out}");
        assert_eq!(admin_i64(pg, "SELECT count(*) FROM nextgres.backends"), 0);

        // The override: plaintext only, loudly.
        pg.append_conf("nextgres.ssl_takeover = on").expect("conf");
        let mark = pg.log_mark();
        pg.restart().expect("restart with ssl_takeover");
        let log = pg.log_since(mark);
        assert!(log.contains("nextgres.ssl_takeover = on: the pooler owns port"), "no WARNING about the takeover:\n{log}");
        let row = pg.admin().query_one("SELECT port, mode FROM nextgres.status()", &[]).expect("status");
        let (port, mode): (Option<i32>, String) = (row.get(0), row.get(1));
        assert_eq!((port, mode.as_str()), (Some(i32::from(pg.port())), "takeover"));
        let out = psql_with(pg, &direct, "sslmode=require", "SELECT 1");
        assert!(!out.success(), "sslmode=require succeeded through a pooler without TLS:\n{out}");
        let out = psql_with(pg, &direct, "sslmode=prefer", SSL_OF_SESSION);
        assert!(out.success(), "{out}");
        assert_eq!(out.stdout.trim(), "f", "{out}");
    });
}

/// A pool larger than the free connection slots: the pool stops at one slot
/// short of the unreserved ones, a direct login of another role still
/// succeeds, the server sees at most a few refused logins a second, the
/// pooler logs one WARNING with the arithmetic, and no client fails.
#[test]
fn pool_larger_than_free_slots_backs_off() {
    // 13 slots, 3 for superusers: 10 for everyone else, of which the test's
    // admin session (a superuser) takes one.
    let b = Cluster::builder()
        .max_connections(13)
        .conf("superuser_reserved_connections = 3")
        .conf("nextgres.pool_size = 20")
        .conf("nextgres.hold_idle_clients = off")
        .conf("log_connections = on");
    run(b, |pg| {
        let script = pg.dir().join("sleep.sql");
        std::fs::write(&script, "SELECT pg_sleep(0.02);\n").expect("script");
        let script = script.to_string_lossy().into_owned();
        // One admin session for all samples, logged in before the pool
        // grows: a fresh one per sample would hold a slot while its backend
        // exits, and one still forking while the pool counts free slots
        // (a backend takes its slot at InitProcess) is not counted yet.
        let mut adm = pg.admin();
        let mark = pg.log_mark();
        let started = Instant::now();
        std::thread::scope(|s| {
            let bench = s.spawn(|| {
                pg.pgbench_timeout(
                    &pg.tcp(APP, DB),
                    &["-n", "-c", "20", "-j", "2", "-T", "8", "-f", &script],
                    Duration::from_secs(120),
                )
            });
            // The pool grows until one unreserved slot is left, then stays.
            let mut n = 0;
            let mut stable = 0;
            assert!(
                wait_until(SETTLE, || {
                    let now: i64 = adm
                        .query_one(&format!("SELECT count(*) FROM nextgres.backends WHERE role = '{APP}'"), &[])
                        .expect("nextgres.backends")
                        .get(0);
                    stable = if now == n && now > 0 { stable + 1 } else { 0 };
                    n = now;
                    stable >= 5
                }),
                "the pool never settled (last count {n})"
            );
            eprintln!("the pool settled at {n} backends");
            assert!(n < 9, "the pool took {n} of the 9 unreserved slots left");
            // Another role logs in directly (Unix socket) while the pool is at its limit.
            let mut other = pg.connect_unix(APP2, DB, None).unwrap_or_else(|e| {
                panic!("direct login of another role failed while the pool is at its limit: {e:?}")
            });
            let v: i32 = other.query_one("SELECT 7", &[]).expect("query").get(0);
            assert_eq!(v, 7);
            drop(other);
            let out = bench.join().expect("pgbench thread");
            assert!(out.success(), "pgbench failed:\n{out}");
            let summary = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no summary:\n{out}"));
            assert_eq!(summary.failed.unwrap_or(0), 0, "{out}");
            assert!(summary.processed > 0);
        });
        let window = started.elapsed().as_secs_f64();
        let log = pg.log_since(mark);
        let refused = log.matches("sorry, too many clients already").count()
            + log.matches("remaining connection slots are reserved").count();
        let warnings = log.matches("gets no more for now").count();
        let hints = log.matches("HINT:  Each pool uses up to nextgres.pool_size connection slots").count();
        eprintln!("window {window:.1} s: {refused} refused logins, {warnings} pooler warnings");
        // At most 2 attempts a second per pool (SLOT_BACKOFF), plus one.
        assert!(
            (refused as f64) <= 2.0 * window + 1.0,
            "{refused} refused logins in {window:.1} s:\n{}",
            log.lines().filter(|l| l.contains("too many") || l.contains("reserved")).take(20).collect::<Vec<_>>().join("\n")
        );
        assert!(warnings >= 1, "no pooler WARNING about the slots:\n{log}");
        assert_eq!(warnings, hints, "every WARNING has its HINT");
        assert!(warnings <= 2, "{warnings} warnings for one episode:\n{log}");
    });
}

/// `nextgres.pool_size` lowered by a reload under pgbench load: the pool
/// shrinks to the new size (sampled while the load runs), with zero failed
/// transactions.
#[test]
fn lowering_pool_size_under_load_shrinks_the_pool() {
    let b = Cluster::builder().conf("nextgres.pool_size = 8");
    run(b, |pg| {
        let script = pg.dir().join("tx.sql");
        std::fs::write(&script, "BEGIN;\nUPDATE t SET v = v + 1 WHERE id = 1;\nSELECT pg_sleep(0.002);\nCOMMIT;\n").expect("script");
        let script = script.to_string_lossy().into_owned();
        let count = || admin_i64(pg, &format!("SELECT count(*) FROM nextgres.backends WHERE role = '{APP}'"));
        std::thread::scope(|s| {
            let bench = s.spawn(|| {
                pg.pgbench_timeout(
                    &pg.tcp(APP, DB),
                    &["-n", "-c", "16", "-j", "2", "-T", "20", "-f", &script],
                    Duration::from_secs(120),
                )
            });
            assert!(wait_until(SETTLE, || count() == 8), "the pool never reached 8 backends: {}", count());
            pg.append_conf("nextgres.pool_size = 4").expect("conf");
            pg.reload().expect("reload");
            let mut samples = Vec::new();
            let reached = wait_until(SETTLE, || {
                let n = count();
                samples.push(n);
                n <= 4
            });
            assert!(!samples.is_empty());
            assert!(reached, "the pool stayed above 4: samples {samples:?}");
            assert!(!bench.is_finished(), "the load ended before the pool shrank; lengthen -T");
            // And it stays there while the load goes on.
            let mut after = Vec::new();
            while !bench.is_finished() && after.len() < 20 {
                after.push(count());
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("backends while shrinking: {samples:?}; after: {after:?}");
            assert!(after.iter().all(|&n| n <= 4), "the pool grew back: {after:?}");
            let out = bench.join().expect("pgbench thread");
            assert!(out.success(), "pgbench failed:\n{out}");
            let summary = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no summary:\n{out}"));
            assert_eq!(summary.failed.unwrap_or(0), 0, "{out}");
            assert!(summary.processed > 0);
            assert_eq!(admin_i64(pg, "SELECT v::bigint FROM t WHERE id = 1") as u64, summary.processed, "committed updates");
        });
    });
}

/// A pool login refused by pg_hba.conf: the client and the server log both
/// get the hint that names the fix.
#[test]
fn hba_refused_pool_login_hint_in_server_log() {
    let b = Cluster::builder().hba(
        "local all postgres trust\n\
         local all all reject\n\
         host all all 127.0.0.1/32 trust\n",
    );
    run(b, |pg| {
        let mark = pg.log_mark();
        let Err(e) = pg.connect_tcp(APP, DB, None) else { panic!("the pool login must be refused") };
        let db = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e:?}"));
        assert!(db.hint().is_some_and(|h| h.contains("local all all scram-sha-256")), "client hint: {db:?}");
        let ok = wait_until(SETTLE, || pg.log_since(mark).contains("HINT:  nextgres logs pooled backends in"));
        assert!(ok, "no hint in the server log:\n{}", pg.log_since(mark));
    });
}

/// After nextgres left shared_preload_libraries (CREATE EXTENSION done
/// before), the views give an ERROR with a hint and the session goes on;
/// DROP EXTENSION removes schema nextgres.
#[test]
fn views_without_preload_and_drop_extension() {
    let pg = std::sync::Arc::new(Cluster::builder().start());
    pg.run_bounded(Duration::from_secs(200), |pg| {
        pg.admin().batch_execute("CREATE EXTENSION nextgres").expect("extension");
        pg.append_conf("shared_preload_libraries = ''").expect("conf");
        pg.restart().expect("restart without the preload");
        let mut c = pg.admin();
        for q in ["SELECT * FROM nextgres.pools", "SELECT * FROM nextgres.status()", "SELECT * FROM nextgres.backends"] {
            let e = c.simple_query(q).expect_err("no pooler: must fail");
            let db = e.as_db_error().unwrap_or_else(|| panic!("{q}: not a server error (FATAL?): {e:?}"));
            assert_eq!(db.severity(), "ERROR", "{q}: {db:?}");
            assert_eq!(db.code().code(), "55000", "{q}: {db:?}");
            assert!(db.hint().is_some_and(|h| h.contains("shared_preload_libraries")), "{q}: {db:?}");
        }
        // The session survived.
        let v: i32 = c.query_one("SELECT 1", &[]).expect("session still usable").get(0);
        assert_eq!(v, 1);
        c.batch_execute("DROP EXTENSION nextgres").expect("DROP EXTENSION");
        let n: i64 = c.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'nextgres'", &[]).expect("q").get(0);
        assert_eq!(n, 0, "DROP EXTENSION left schema nextgres behind");
        // And again: a second install gets its own schema and drops it.
        c.batch_execute("CREATE EXTENSION nextgres; DROP EXTENSION nextgres").expect("re-create and drop");
        let n: i64 = c.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'nextgres'", &[]).expect("q").get(0);
        assert_eq!(n, 0);
    });
}

/// `inet_server_addr()` and `inet_server_port()` through the pooler show the
/// address and port the client connected to, as a direct connection does.
#[test]
fn inet_server_port_matches_direct() {
    let sp = SidePort::start(Cluster::builder().conf("nextgres.hold_idle_clients = off"));
    let q = "SELECT inet_server_addr()::text, inet_server_port()";
    let direct = sp.direct("postgres", "postgres");
    let pooled = sp.pooled("postgres", "postgres");
    let mut d = direct.connect().expect("direct");
    let mut p = pooled.connect().expect("pooled");
    let dr = d.query_one(q, &[]).expect("direct query");
    let (daddr, dport): (Option<String>, Option<i32>) = (dr.get(0), dr.get(1));
    assert_eq!((daddr.as_deref(), dport), (Some("127.0.0.1/32"), Some(i32::from(sp.pg.port()))));
    // Twice: the second transaction may run on another backend.
    for _ in 0..2 {
        let pr = p.query_one(q, &[]).expect("pooled query");
        let (paddr, pport): (Option<String>, Option<i32>) = (pr.get(0), pr.get(1));
        assert_eq!((paddr.as_deref(), pport), (Some("127.0.0.1/32"), Some(i32::from(sp.pool_port))), "through the pooler");
    }
}

/// `listen_addresses` while the pooler owns the server's port: the server
/// runs with it cleared (so it opens no TCP socket of its own). A reload of
/// an unchanged postgresql.conf must not say that it "cannot be changed
/// without restarting the server" nor mark it `pending_restart`: it did on
/// every reload, so monitoring showed a restart pending for ever. A changed
/// value still gets the server's own message and `pending_restart` (the
/// pooler binds the new addresses at the next start), and the pooler keeps
/// serving meanwhile.
#[test]
fn reload_leaves_an_unchanged_listen_addresses_alone() {
    let pg = std::sync::Arc::new(Cluster::builder().start());
    pg.run_bounded(Duration::from_secs(120), |pg| {
        let setting = || -> (String, bool) {
            let r = pg
                .admin()
                .query_one("SELECT setting, pending_restart FROM pg_settings WHERE name = 'listen_addresses'", &[])
                .expect("pg_settings");
            (r.get(0), r.get(1))
        };
        const REFUSED: &str = "parameter \"listen_addresses\" cannot be changed without restarting the server";
        // Each reload changes one harmless setting: the postmaster logs that
        // change after it processed listen_addresses (earlier in the file).
        let reload = |work_mem: &str| -> String {
            let mark = pg.log_mark();
            pg.append_conf(format!("work_mem = '{work_mem}'")).expect("conf");
            pg.reload().expect("reload");
            let applied = format!("parameter \"work_mem\" changed to \"{work_mem}\"");
            assert!(
                wait_until(Duration::from_secs(30), || pg.log_since(mark).contains(&applied)),
                "the reload was not applied:\n{}",
                pg.log_since(mark)
            );
            pg.log_since(mark)
        };
        assert_eq!(setting(), (String::new(), false), "cleared at start, nothing pending");

        let log = reload("5MB");
        assert!(!log.contains(REFUSED), "an unchanged listen_addresses was refused on reload:\n{log}");
        assert_eq!(setting(), (String::new(), false), "after a reload of the unchanged file");
        let r = pg
            .admin()
            .query_one("SELECT count(*) FROM pg_file_settings WHERE name = 'listen_addresses' AND error IS NOT NULL", &[])
            .expect("pg_file_settings");
        assert_eq!(r.get::<_, i64>(0), 0, "pg_file_settings reports an error for listen_addresses");

        pg.append_conf("listen_addresses = 'localhost'").expect("conf");
        let log = reload("6MB");
        assert!(log.contains(REFUSED), "a changed listen_addresses must get the server's message:\n{log}");
        assert_eq!(setting(), (String::new(), true), "a changed listen_addresses is pending a restart");
        let mut c = pg.connect_tcp(SUPERUSER, "postgres", None).expect("through the pooler after the reloads");
        assert_eq!(c.query_one("SELECT 1", &[]).expect("query").get::<_, i32>(0), 1);
    });
}

/// A database drained the server's way (`ALTER DATABASE ... ALLOW_CONNECTIONS
/// false`, `REVOKE CONNECT`) while clients are connected: pooled ones go on
/// as direct sessions do, also past `nextgres.reconnect()` (their pool keeps
/// its last backend), and new logins get the server's error on both doors.
/// A pool whose next login the server refuses while its clients share a busy
/// backend does not retry in a loop: one client waits 4 s for the other's
/// transaction while the pool tries a few logins, not hundreds. Before: some
/// 1,400 refused pool logins in 3 s, and `nextgres.reconnect()` ended the
/// pooled clients with the refusal (hunt9a 1, 2).
#[test]
fn a_drained_database_keeps_its_clients_without_a_login_storm() {
    run(Cluster::builder().conf("nextgres.pool_size = 2"), |pg| {
        pg.admin().batch_execute("CREATE DATABASE shop").expect("CREATE DATABASE");
        let refusals = |mark| pg.log_since(mark).matches("pool login for role \"app\" to database \"shop\" failed").count();
        for (drain, undo, code) in [
            ("ALTER DATABASE shop ALLOW_CONNECTIONS false", "ALTER DATABASE shop ALLOW_CONNECTIONS true", "55000"),
            ("REVOKE CONNECT ON DATABASE shop FROM PUBLIC", "GRANT CONNECT ON DATABASE shop TO PUBLIC", "42501"),
        ] {
            // The pool starts with no backend: a's transaction takes its one.
            pg.admin().batch_execute("SELECT nextgres.reconnect('shop', 'app')").expect("reconnect");
            assert!(wait_until(SETTLE, || pg.backend_count(Some(APP), Some("shop")) == 0), "{:?}", pg.activity());
            let mut a = pg.connect_tcp(APP, "shop", None).expect("a");
            a.batch_execute("BEGIN; SELECT 1").expect("a's transaction: the pool's one backend");
            let mut b = pg.connect_tcp(APP, "shop", None).expect("b (no query yet)");
            let mut direct = pg.connect_unix(APP, "shop", None).expect("direct");
            let mark = pg.log_mark();
            pg.admin().batch_execute(drain).expect(drain);
            // b needs a backend: a's is busy, and the pool's login is refused.
            let waiter = std::thread::spawn(move || {
                let r = b.simple_query("SELECT 'b served'").map(|m| pool_support::first_value(&m));
                (b, r)
            });
            std::thread::sleep(Duration::from_secs(4));
            let storm = refusals(mark);
            assert!((1..=8).contains(&storm), "{drain}: {storm} refused pool logins in 4 s\n{}", pg.log_since(mark));
            a.batch_execute("COMMIT").expect("a commits");
            let (mut b, r) = waiter.join().expect("b's thread");
            assert_eq!(r.expect("b after a's commit").as_deref(), Some("b served"), "{drain}");
            // Backends replaced: not the pool's last one, which a login
            // could not replace.
            pg.admin().batch_execute("SELECT nextgres.reconnect('shop', 'app')").expect("reconnect");
            std::thread::sleep(Duration::from_secs(2));
            for (who, c) in [("a", &mut a), ("b", &mut b), ("direct", &mut direct)] {
                c.batch_execute("SELECT 1").unwrap_or_else(|e| panic!("{drain}: {who} after reconnect: {e:?}"));
            }
            for (door, r) in [("pooled", pg.connect_tcp(APP, "shop", None)), ("direct", pg.connect_unix(APP, "shop", None))] {
                let e = r.err().unwrap_or_else(|| panic!("{drain}: a new {door} login succeeded"));
                assert_eq!(e.code().map(|c| c.code()), Some(code), "{drain}: {door}: {e:?}");
            }
            pg.admin().batch_execute(undo).expect(undo);
            drop((a, b, direct));
        }
    });
}
