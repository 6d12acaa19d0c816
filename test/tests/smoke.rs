//! Smoke tests of the harness itself on plain PostgreSQL (no preload), so it
//! can be trusted before the extension exists. Run:
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test smoke -- --test-threads=2
//! ```

use std::time::{Duration, Instant};

use nextgres_test::{parse_summary, wait_until, Cluster, PasswordEncryption, StopMode};

fn plain() -> nextgres_test::Builder {
    Cluster::builder().preload(false)
}

/// Every client path works: rust-postgres and psql over TCP and Unix, pgbench.
#[test]
fn clients_over_tcp_and_unix() {
    let pg = plain().start();
    let pm = pg.pid().expect("postmaster pid while running");

    let mut tcp = pg
        .connect_tcp("postgres", "postgres", None)
        .expect("rust-postgres over TCP");
    assert_eq!(
        tcp.query_one("SELECT 1", &[])
            .expect("SELECT 1 over TCP")
            .get::<_, i32>(0),
        1
    );
    let addr: Option<String> = tcp
        .query_one("SELECT inet_client_addr()::text", &[])
        .expect("client addr")
        .get(0);
    assert_eq!(addr.as_deref(), Some("127.0.0.1/32"), "TCP really is TCP");

    let mut unix = pg
        .connect_unix("postgres", "postgres", None)
        .expect("rust-postgres over Unix socket");
    let addr: Option<String> = unix
        .query_one("SELECT inet_client_addr()::text", &[])
        .expect("client addr")
        .get(0);
    assert_eq!(addr, None, "Unix socket has no client address");

    assert_eq!(
        pg.psql_query(&pg.tcp("postgres", "postgres"), "SELECT 1"),
        "1"
    );
    assert_eq!(
        pg.psql_query(&pg.unix("postgres", "postgres"), "SELECT 1"),
        "1"
    );

    // The two rust-postgres sessions are visible as client backends.
    assert_eq!(pg.backend_count(Some("postgres"), Some("postgres")), 2);
    drop(tcp);
    drop(unix);
    assert!(
        wait_until(Duration::from_secs(10), || pg.backend_count(None, None)
            == 0),
        "backends did not go away: {:?}",
        pg.activity()
    );

    let bench = pg.tcp("postgres", "postgres");
    pg.pgbench_init(&bench, 1).assert_success();
    let out = pg.pgbench(&bench, &["-c", "4", "-t", "50", "-S", "-n"]);
    out.assert_success();
    let s = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
    assert_eq!((s.processed, s.expected), (200, Some(200)), "{out}");
    assert_eq!(s.failed.unwrap_or(0), 0, "{out}");
    assert!(s.tps.is_some_and(|t| t > 0.0), "{out}");

    assert!(pg.stop(StopMode::Fast), "fast stop");
    assert!(!pg.is_running());
    assert!(
        !nextgres_test::procs::process_alive(pm),
        "postmaster {pm} still alive"
    );
}

/// The server is the version NEXTGRES_PG asks for.
#[test]
fn server_version_matches_env() {
    let pg = plain().start();
    let want = nextgres_test::pg_major();
    assert_eq!(pg.pg_major(), want);
    let num: String = pg
        .admin()
        .query_one("SHOW server_version_num", &[])
        .expect("server_version_num")
        .get(0);
    let num: u32 = num.parse().expect("numeric server_version_num");
    assert_eq!(num / 10000, want, "server_version_num {num}");
    eprintln!("server_version_num = {num}");
}

/// Password roles under both encryptions, over md5 host auth (which accepts
/// SCRAM and md5 hashes), with rust-postgres and psql.
#[test]
fn password_roles() {
    let pg = plain().auth_host("md5").auth_local("scram-sha-256").start();
    pg.create_role("alice", "alice pw", PasswordEncryption::ScramSha256);
    pg.create_role("bob", "b'ob\\pw", PasswordEncryption::Md5);

    let mut admin = pg.admin();
    for (role, enc) in [
        ("alice", PasswordEncryption::ScramSha256),
        ("bob", PasswordEncryption::Md5),
    ] {
        let hash: String = admin
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                &[&role],
            )
            .expect("rolpassword")
            .get(0);
        assert!(hash.starts_with(enc.hash_prefix()), "{role}: {hash}");
    }

    for (role, pw) in [("alice", "alice pw"), ("bob", "b'ob\\pw")] {
        let mut c = pg
            .connect_tcp(role, "postgres", Some(pw))
            .unwrap_or_else(|e| panic!("{role} over TCP: {e:?}"));
        let who: String = c
            .query_one("SELECT current_user::text", &[])
            .expect("current_user")
            .get(0);
        assert_eq!(who, role);
        assert!(
            pg.connect_tcp(role, "postgres", Some("wrong")).is_err(),
            "{role}: wrong password accepted"
        );
        assert!(
            pg.connect_tcp(role, "postgres", None).is_err(),
            "{role}: no password accepted"
        );
        assert_eq!(
            pg.psql_query(
                &pg.tcp(role, "postgres").password(pw),
                "SELECT current_user"
            ),
            role
        );
        pg.psql(
            &pg.tcp(role, "postgres").password("wrong"),
            &["-c", "SELECT 1"],
        )
        .assert_failure();
    }
    // Unix socket uses scram-sha-256 for everyone but postgres: only alice's
    // SCRAM hash can pass it.
    pg.connect_unix("alice", "postgres", Some("alice pw"))
        .expect("alice over Unix with SCRAM");
    assert!(
        pg.connect_unix("bob", "postgres", Some("b'ob\\pw"))
            .is_err(),
        "md5 hash passed scram auth"
    );
}

/// reload, restart and stop modes behave and never hang.
#[test]
fn reload_restart_stop_modes() {
    let pg = plain().start();
    let show = |name: &str| -> String {
        pg.admin()
            .query_one(&format!("SHOW {name}"), &[])
            .expect("SHOW")
            .get(0)
    };
    assert_eq!(show("work_mem"), "4MB");
    pg.append_conf("work_mem = '7MB'").expect("append_conf");
    pg.reload().expect("reload");
    assert!(
        wait_until(Duration::from_secs(10), || show("work_mem") == "7MB"),
        "reload not applied"
    );

    let mark = pg.log_mark();
    pg.append_conf("max_connections = 50").expect("append_conf");
    let port = pg.port();
    let before = pg.pid();
    pg.restart().expect("restart");
    assert_ne!(pg.pid(), before, "a new postmaster");
    assert_eq!(pg.port(), port);
    assert_eq!(show("max_connections"), "50");
    assert!(
        pg.log_since(mark).contains("database system is ready"),
        "{}",
        pg.log_since(mark)
    );

    // A smart stop waits for clients: with one connected it must give up in
    // about its timeout, not hang; a fast stop then ends it.
    let mut client = pg
        .connect_tcp("postgres", "postgres", None)
        .expect("client");
    let t = Instant::now();
    assert!(
        !pg.stop_timeout(StopMode::Smart, Duration::from_secs(2)),
        "smart stop with a client connected"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "smart stop took {:?}",
        t.elapsed()
    );
    assert!(pg.stop(StopMode::Fast), "fast stop");
    assert!(
        client.simple_query("SELECT 1").is_err(),
        "session survived a fast stop"
    );

    pg.start().expect("start again");
    pg.admin();
    // Drop stops it (immediate) and removes the directory.
}
