//! pg_hba.conf `gss` (Kerberos) against a real MIT KDC, through the pooler
//! as directly: a method the pooler does not implement, which the server
//! runs itself in a dedicated backend (server authentication, see
//! server_auth.rs and README "Other authentication methods").
//!
//! The test makes a throwaway realm `NG.TEST` in a directory of its own
//! (krb5.conf via `KRB5_CONFIG`, kdc.conf via `KRB5_KDC_PROFILE`, the KDC on a
//! leased localhost port; nothing under /etc is used or changed):
//! `kdb5_util create -s`, principals `postgres/localhost` (exported to the
//! server's `krb_server_keyfile`), `alice` and `mallory` with passwords, then
//! `krb5kdc -n`, stopped by a Drop guard on every exit path. Clients are psql
//! (libpq has GSSAPI; rust-postgres has none) with their own credential
//! cache (`KRB5CCNAME`) filled by `kinit`. The client names the server
//! `localhost` (principal `postgres/localhost`) and reaches it at
//! `hostaddr=127.0.0.1`. Tools: Debian's krb5-kdc, krb5-admin-server and
//! krb5-user, installed by tools/setup (PostgreSQL 16's pgserver wheel has
//! no GSSAPI: the test is skipped there with a printed reason; a build
//! without GSSAPI on any other version fails it).
//!
//! ```sh
//! NEXTGRES_PG=17 cargo test -p nextgres-test --test gss -- --test-threads=2
//! ```

mod pool_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nextgres_test::dirs::TestDir;
use nextgres_test::ports::PortLease;
use nextgres_test::{wait_until, Cluster};
use pool_support::{exec, SidePort};

const REALM: &str = "NG.TEST";

/// A running throwaway KDC: its directory, port and `krb5kdc` process.
/// Dropping it kills the KDC, waits for it and removes the directory (also
/// when the test panics: the guard lives on the test's stack).
struct Kdc {
    dir: TestDir,
    child: Option<Child>,
    _lease: PortLease,
}

impl Kdc {
    /// Creates the realm (database, principals, server keytab readable by
    /// the server's OS user) and starts `krb5kdc` in the foreground on
    /// 127.0.0.1:<leased port>, UDP and TCP; returns when it accepts TCP.
    fn start() -> Kdc {
        let lease = nextgres_test::ports::lease(&nextgres_test::dirs::root(), &[]).expect("leasing a KDC port");
        let port = lease.port();
        let dir = TestDir::create("krb5", None).expect("KDC directory");
        let d = dir.path().to_path_buf();
        // The server's OS user reads the keytab: the directory must be
        // traversable.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod KDC dir");
        std::fs::write(
            d.join("krb5.conf"),
            format!(
                "[libdefaults]\n default_realm = {REALM}\n dns_lookup_kdc = false\n dns_lookup_realm = false\n \
                 dns_canonicalize_hostname = false\n rdns = false\n udp_preference_limit = 1\n\
                 [realms]\n {REALM} = {{\n  kdc = 127.0.0.1:{port}\n }}\n"
            ),
        )
        .expect("krb5.conf");
        std::fs::write(
            d.join("kdc.conf"),
            format!(
                "[kdcdefaults]\n kdc_listen = 127.0.0.1:{port}\n kdc_tcp_listen = 127.0.0.1:{port}\n\
                 [realms]\n {REALM} = {{\n  database_name = {db}\n  key_stash_file = {stash}\n  acl_file = {acl}\n }}\n\
                 [logging]\n kdc = FILE:{log}\n",
                db = d.join("principal").display(),
                stash = d.join("stash").display(),
                acl = d.join("kadm5.acl").display(),
                log = d.join("kdc.log").display(),
            ),
        )
        .expect("kdc.conf");
        let mut kdc = Kdc { dir, child: None, _lease: lease };
        kdc.admin("kdb5_util", &["create", "-s", "-r", REALM, "-P", "master-secret"]);
        for q in [
            "addprinc -randkey postgres/localhost".to_string(),
            format!("ktadd -k {} postgres/localhost", kdc.keytab().display()),
            "addprinc -pw alice-secret alice".to_string(),
            "addprinc -pw mallory-secret mallory".to_string(),
        ] {
            kdc.admin("kadmin.local", &["-r", REALM, "-q", &q]);
        }
        if let Some(u) = nextgres_test::env::OsUser::for_server().expect("server OS user") {
            kdc.dir.give_to(&kdc.keytab(), Some(&u)).expect("keytab to the server's OS user");
        }
        let mut c = Command::new("krb5kdc");
        kdc.krb_env(&mut c);
        c.args(["-n", "-P"]).arg(d.join("kdc.pid")).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        kdc.child = Some(c.spawn().expect("starting krb5kdc (tools/setup installs krb5-kdc)"));
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        assert!(
            wait_until(Duration::from_secs(30), || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()),
            "krb5kdc never listened on {addr}: {}",
            std::fs::read_to_string(d.join("kdc.log")).unwrap_or_default()
        );
        kdc
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The server's keytab (`krb_server_keyfile`).
    fn keytab(&self) -> PathBuf {
        self.path("server.keytab")
    }

    /// Points a Kerberos tool at this realm's files only.
    fn krb_env(&self, c: &mut Command) {
        c.env("KRB5_CONFIG", self.path("krb5.conf")).env("KRB5_KDC_PROFILE", self.path("kdc.conf"));
    }

    /// Runs a realm administration tool, panicking on failure.
    fn admin(&self, tool: &str, args: &[&str]) {
        let mut c = Command::new(tool);
        self.krb_env(&mut c);
        c.args(args);
        let out = nextgres_test::cmd::run(c, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("starting {tool} (tools/setup installs krb5-kdc, krb5-admin-server): {e}"));
        assert!(out.success(), "{tool} {args:?}:\n{out}");
    }

    /// `kinit principal` with `password` on stdin into a fresh credential
    /// cache named `cache`: its path, and whether kinit succeeded (stderr
    /// otherwise).
    fn kinit(&self, principal: &str, password: &str, cache: &str) -> (PathBuf, Result<(), String>) {
        use std::io::Write;
        let cc = self.path(cache);
        let _ = std::fs::remove_file(&cc);
        let mut c = Command::new("kinit");
        self.krb_env(&mut c);
        c.env("KRB5CCNAME", format!("FILE:{}", cc.display()))
            .arg(principal)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("starting kinit (tools/setup installs krb5-user)");
        child.stdin.take().expect("stdin").write_all(format!("{password}\n").as_bytes()).expect("password to kinit");
        let out = nextgres_test::with_timeout(Duration::from_secs(60), "kinit", move || child.wait_with_output())
            .expect("kinit");
        let r = if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) };
        (cc, r)
    }

    /// psql with the realm's krb5.conf and credential cache `cc`:
    /// `ok:<stdout>` or `err:<stderr>` with the port blanked (the only
    /// legitimate difference between the two doors).
    fn psql(&self, pg: &Cluster, port: u16, user: &str, extra: &str, cc: &Path, sql: &str) -> String {
        let conninfo = format!("host=localhost hostaddr=127.0.0.1 port={port} user={user} dbname=postgres connect_timeout=10 {extra}");
        let mut c = Command::new(pg.install().client_bin("psql"));
        nextgres_test::cmd::scrub_pg_env(&mut c);
        self.krb_env(&mut c);
        c.env("KRB5CCNAME", format!("FILE:{}", cc.display()));
        c.args(["-X", "-w", "-A", "-t", "-d", &conninfo, "-c", sql]);
        let out = nextgres_test::cmd::run(c, Duration::from_secs(60)).expect("starting psql");
        assert!(!out.timed_out, "psql hung:\n{out}");
        let norm = |s: &str| s.trim().replace(&format!("port {port}"), "port N");
        if out.success() {
            format!("ok:{}", out.stdout.trim())
        } else {
            format!("err:{}", norm(&out.stderr))
        }
    }
}

impl Drop for Kdc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.dir.remove();
    }
}

/// PostgreSQL 16's pgserver wheel is built without GSSAPI.
fn has_gssapi(pg_config: &Path) -> bool {
    let mut c = Command::new(pg_config);
    c.arg("--configure");
    nextgres_test::cmd::run(c, Duration::from_secs(30)).is_ok_and(|o| o.stdout.contains("--with-gssapi"))
}

/// The SQLSTATE and message of the first FATAL the server logged after
/// `mark` (`log_error_verbosity = verbose` puts the SQLSTATE in front of the
/// message), waiting for it within the login's own bound; None when none.
fn logged_fatal(pg: &Cluster, mark: usize) -> Option<String> {
    let find = || {
        pg.log_since(mark)
            .lines()
            .find_map(|l| l.split_once("FATAL:  ").map(|(_, m)| m.trim().to_string()))
    };
    let mut found = None;
    wait_until(Duration::from_secs(10), || {
        found = find();
        found.is_some()
    });
    found
}

/// Kerberos logins the same way through the pooler as directly, under one
/// pg_hba.conf: `host all bob ... gss map=gssmap` (pg_ident: `alice@NG.TEST`
/// may be `bob`) and `host all all ... gss include_realm=0`.
/// * alice's ticket (kinit with the right password) logs in as alice and as
///   bob, and `pg_stat_gssapi` shows the session GSS-authenticated as
///   `alice@NG.TEST`, unencrypted (`gssencmode=disable` on both doors);
/// * kinit with a wrong password fails, and psql without a ticket gets the
///   same (libpq's) error both ways, the server logging the same FATAL
///   28000 for both, and no backend of alice is left over;
/// * mallory's ticket for role alice (include_realm=0: system user
///   `mallory`) and for bob (not in the map): the server's own FATAL 28000
///   "GSSAPI authentication failed", SQLSTATE and message equal both ways;
/// * a default-settings libpq client (`gssencmode=prefer`) with alice's
///   ticket logs in through the pooler: its GSSENCRequest is answered 'N'
///   and it goes on with plaintext + gss authentication (directly the
///   server gives it GSS encryption instead); `gssencmode=require` gets GSS
///   encryption directly and libpq's refusal through the pooler.
#[test]
fn gss_answers_as_direct_server() {
    let probe = nextgres_test::PgInstall::resolve(nextgres_test::pg_major()).expect("PostgreSQL install");
    if !has_gssapi(&probe.bin("pg_config")) {
        // Only 16's pgserver wheel lacks it; anywhere else a skip would hide
        // a broken install.
        assert_eq!(nextgres_test::pg_major(), 16, "PostgreSQL here is built without --with-gssapi");
        eprintln!("skipped: PostgreSQL 16 (pgserver wheel) is built without --with-gssapi");
        return;
    }
    let kdc = Kdc::start();
    let hba = "local all postgres trust\n\
               local all,replication all peer map=nextgres\n\
               host all bob 127.0.0.1/32 gss map=gssmap\n\
               host all all 127.0.0.1/32 gss include_realm=0\n";
    let sp = SidePort::start(
        Cluster::builder()
            .hba(hba)
            .conf("nextgres.pool_size = 2")
            .conf(format!("krb_server_keyfile = '{}'", kdc.keytab().display()))
            .conf("log_error_verbosity = verbose"),
    );
    exec(&sp.pg, "CREATE EXTENSION nextgres; CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN; CREATE ROLE mallory LOGIN");
    // The opt-in map (README): the server's OS user may be any role (15:
    // one line per role, no `all`), every other OS user only itself.
    let os_user = sp.pg.server_os_user();
    let mut ident = String::new();
    if nextgres_test::pg_major() >= 16 {
        ident.push_str(&format!("nextgres {os_user} all\n"));
    } else {
        for r in ["alice", "bob", "mallory"] {
            ident.push_str(&format!("nextgres {os_user} {r}\n"));
        }
    }
    ident.push_str(&format!("nextgres /^(.*)$ \\1\ngssmap alice@{REALM} bob\n"));
    std::fs::write(sp.pg.data_dir().join("pg_ident.conf"), ident).expect("pg_ident.conf");
    sp.pg.reload().expect("reload");

    let doors = [("direct", sp.pg.port()), ("pooled", sp.pool_port)];
    let gss_row = "SELECT current_user, gss_authenticated, principal, encrypted FROM pg_stat_gssapi WHERE pid = pg_backend_pid()";
    let mut problems = Vec::new();

    // Right password: a ticket, and a GSS-authenticated session both ways.
    let (alice_cc, r) = kdc.kinit("alice", "alice-secret", "cc_alice");
    r.expect("kinit alice with the right password");
    for (role, expect) in [("alice", "ok:alice|t|alice@NG.TEST|f"), ("bob", "ok:bob|t|alice@NG.TEST|f")] {
        for (door, port) in doors {
            let got = kdc.psql(&sp.pg, port, role, "gssencmode=disable", &alice_cc, gss_row);
            if got != expect {
                problems.push(format!("alice's ticket as {role} {door}: {got}, expected {expect}"));
            }
        }
    }

    // Wrong password: no ticket; libpq's own error, the same both ways.
    let (none_cc, r) = kdc.kinit("alice", "not-alice-secret", "cc_wrong");
    let e = r.expect_err("kinit with a wrong password must fail");
    assert!(e.contains("Password incorrect"), "kinit: {e}");
    let mut answers = Vec::new();
    for (door, port) in doors {
        let mark = sp.pg.log_mark();
        let got = kdc.psql(&sp.pg, port, "alice", "gssencmode=disable", &none_cc, "SELECT 1");
        if !got.starts_with("err:") || !got.contains("GSSAPI") {
            problems.push(format!("no ticket {door}: {got}"));
        }
        // The client gave up: the server (or the dedicated backend) ends
        // quietly, and leaves no session of alice behind.
        let gone = wait_until(Duration::from_secs(30), || sp.pg.backend_count(Some("alice"), None) == 0);
        if !gone {
            problems.push(format!("no ticket {door}: a backend of alice is left"));
        }
        // The server ends the login with its own FATAL, which the client
        // that gave up never reads: logged the same way for both doors.
        let fatal = logged_fatal(&sp.pg, mark);
        let expect = "28000: GSSAPI authentication failed for user \"alice\"";
        if fatal.as_deref() != Some(expect) {
            problems.push(format!("no ticket {door}: server logged {fatal:?}, expected {expect}"));
        }
        answers.push((door, got, fatal));
    }
    if answers[0].1 != answers[1].1 || answers[0].2 != answers[1].2 {
        problems.push(format!("no ticket:\n   {:?}\n   {:?}", answers[0], answers[1]));
    }

    // A principal the lines do not allow: the server's FATAL both ways.
    let (mallory_cc, r) = kdc.kinit("mallory", "mallory-secret", "cc_mallory");
    r.expect("kinit mallory");
    for role in ["alice", "bob"] {
        let expect = format!("28000: GSSAPI authentication failed for user \"{role}\"");
        let mut seen = Vec::new();
        for (door, port) in doors {
            let mark = sp.pg.log_mark();
            let got = kdc.psql(&sp.pg, port, role, "gssencmode=disable", &mallory_cc, "SELECT 1");
            let fatal = logged_fatal(&sp.pg, mark);
            if fatal.as_deref() != Some(expect.as_str()) {
                problems.push(format!("mallory as {role} {door}: server logged {fatal:?}, expected {expect}"));
            }
            if !got.contains(&format!("FATAL:  GSSAPI authentication failed for user \"{role}\"")) {
                problems.push(format!("mallory as {role} {door}: psql {got}"));
            }
            seen.push(got);
        }
        if seen[0] != seen[1] {
            problems.push(format!("mallory as {role}: psql\n   direct: {}\n   pooled: {}", seen[0], seen[1]));
        }
    }

    // libpq's defaults (gssencmode=prefer) with a ticket: through the
    // pooler plaintext + gss authentication, directly GSS encryption.
    for (door, port, expect) in [
        ("direct", sp.pg.port(), "ok:alice|t|alice@NG.TEST|t"),
        ("pooled", sp.pool_port, "ok:alice|t|alice@NG.TEST|f"),
    ] {
        let got = kdc.psql(&sp.pg, port, "alice", "", &alice_cc, gss_row);
        if got != expect {
            problems.push(format!("default libpq client {door}: {got}, expected {expect}"));
        }
    }

    // gssencmode=require: GSS encryption directly, none through the pooler
    // (README): libpq gives up after the 'N'.
    let direct = kdc.psql(&sp.pg, sp.pg.port(), "alice", "gssencmode=require", &alice_cc, gss_row);
    if direct != "ok:alice|t|alice@NG.TEST|t" {
        problems.push(format!("gssencmode=require direct: {direct}"));
    }
    let pooled = kdc.psql(&sp.pg, sp.pool_port, "alice", "gssencmode=require", &alice_cc, gss_row);
    if !pooled.starts_with("err:") || !pooled.contains("GSSAPI encryption") {
        problems.push(format!("gssencmode=require pooled: {pooled}"));
    }
    eprintln!("gssencmode=require through the pooler: {pooled}");

    // A server-authenticated session is the client's own: it joins no pool.
    let pools: i64 = sp
        .pg
        .admin()
        .query_one("SELECT count(*) FROM nextgres.pools WHERE role IN ('alice', 'bob')", &[])
        .expect("nextgres.pools")
        .get(0);
    if pools != 0 {
        problems.push(format!("{pools} pools for alice/bob"));
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}\n{}\nKDC log:\n{}",
        problems.len(),
        problems.join("\n"),
        sp.pg.log_tail(30),
        std::fs::read_to_string(kdc.path("kdc.log")).unwrap_or_default()
    );
}
