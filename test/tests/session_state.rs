//! Session state in transaction pooling: the leak matrix.
//!
//! Two clients A and B take turns on ONE pooled backend (pool_size = 1), each
//! turn a transaction, so every turn switches the backend's session between
//! them. Movable state (settings, search_path, role, custom settings,
//! prepared statements by protocol and by SQL) must follow its owner exactly
//! as on a direct connection and never show to the other client: the same
//! script is played once through the pooler and once over two direct
//! (non-pooled) Unix-socket connections, and both transcripts must be equal.
//!
//! The matrix runs twice: with plaintext pooled clients and with pooled
//! clients on TLS (`sslmode=require`, rustls verifying a test CA, server with
//! `ssl = on`; skipped with the reason printed on 16, whose build has no
//! OpenSSL). Three times during the script the one pooled backend is
//! replaced (`nextgres.reconnect` + `wait_close`): the backend pid must change
//! exactly there, for both transports, and the state must follow its client
//! onto the new backend as well.
//!
//! State that cannot move (temp tables, WITH HOLD cursors, LISTEN,
//! session-level advisory locks) pins its owner to its backend: checked with
//! nextgres.backends.pinned_by and a pool of two, so the other client is
//! served by the second backend meanwhile. Each pinned kind runs with
//! plaintext clients and again with all three on TLS (`*_over_tls`).
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test session_state -- --test-threads=2
//! ```

mod session_support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use nextgres_test::tls::Transport;
use nextgres_test::{wait_until, Cluster, ConnInfo};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Statement};
use session_support::{
    admin_i64, expect_backend, first_value, maybe, one, pid_of, raw, rows_text, run, sqlstate,
    SETTLE,
};

const LIMIT: Duration = Duration::from_secs(300);

/// One pooled backend, so every turn of another client switches it.
fn one_backend() -> nextgres_test::Builder {
    Cluster::builder().conf("nextgres.pool_size = 1").conf("nextgres.query_wait_timeout = 20")
}

/// `steps(a, b, pooled)` played by two clients of role `user`: directly
/// (the server's socket), then through the pooler. (direct, pooled).
fn direct_then_pooled<T>(pg: &Cluster, user: &str, steps: impl Fn(&mut Client, &mut Client, bool) -> T) -> (T, T) {
    let play = |ci: &dyn Fn() -> ConnInfo, pooled: bool| {
        let mut a = ci().connect().expect("client a");
        let mut b = ci().connect().expect("client b");
        steps(&mut a, &mut b, pooled)
    };
    let direct = play(&|| pg.unix(user, "postgres"), false);
    (direct, play(&|| pg.tcp(user, "postgres"), true))
}

const SETUP: &str = "
    CREATE EXTENSION nextgres;
    CREATE ROLE app LOGIN;
    CREATE ROLE reader NOLOGIN;
    GRANT reader TO app;
    CREATE SCHEMA sa AUTHORIZATION app;
    CREATE SCHEMA sb AUTHORIZATION app;
    CREATE TABLE sa.t (v text); INSERT INTO sa.t VALUES ('sa');
    CREATE TABLE sb.t (v text); INSERT INTO sb.t VALUES ('sb');
    CREATE TABLE public.t (v text); INSERT INTO public.t VALUES ('public');
    GRANT USAGE ON SCHEMA sa, sb TO reader;
    GRANT SELECT ON sa.t, sb.t, public.t TO app, reader;
    CREATE TABLE k (id int PRIMARY KEY);
    INSERT INTO k VALUES (1);
    GRANT ALL ON k TO app";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    A,
    B,
}

/// One turn of the script. Every turn outside an explicit BEGIN is its own
/// transaction, so with a pool of one the backend switches between A and B
/// at every change of `Who`.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Simple query; the transcript gets its rows or its SQLSTATE.
    Sql(Who, &'static str),
    /// What the client sees of its session (the LOOK query).
    Look(Who),
    /// Protocol-level Parse of a named statement (rust-postgres prepare),
    /// remembered under a key.
    Prepare(Who, &'static str, &'static str),
    /// Bind/Execute of that statement with one int4 parameter.
    Run(Who, &'static str, i32),
    /// `EXECUTE <server-side name of the OTHER client's statement key>`.
    ExecForeign(Who, &'static str),
    /// Through the pooler: the pool's backend is replaced
    /// (`nextgres.reconnect` as the superuser, then `nextgres.wait_close`
    /// until the old one is gone), so the next turn runs on a new pid.
    /// Nothing for the direct sessions.
    Reconnect,
}

/// Everything a client can see of its own session, one line. Custom settings
/// that were never set read NULL on a direct connection; after DISCARD ALL a
/// placeholder reads '' instead: that difference is checked strictly in
/// `custom_setting_of_another_client_is_never_seen`, so here both read `<unset>`.
const LOOK: &str = "SELECT concat_ws(' | ',
        current_setting('application_name'), current_setting('work_mem'),
        current_setting('TimeZone'), current_setting('DateStyle'),
        current_setting('search_path'), current_user, session_user,
        current_setting('default_transaction_isolation'),
        coalesce(nullif(current_setting('myapp.x', true), ''), '<unset>'),
        coalesce(nullif(current_setting('myapp.y', true), ''), '<unset>'),
        (SELECT v FROM t),
        (SELECT string_agg(x, ', ' ORDER BY x)
           FROM (SELECT CASE WHEN from_sql THEN 'sql:' || name || parameter_types::text
                             ELSE 'proto:' || statement || parameter_types::text END AS x
                   FROM pg_prepared_statements) p))";

/// The script: movable state of every kind, each change followed by a turn
/// of the other client and a look by both.
fn script() -> Vec<Step> {
    use Step::*;
    use Who::*;
    vec![
        // Startup settings only.
        Look(A),
        Look(B),
        // Plain settings, and RESET back to the startup value.
        Sql(A, "SET work_mem = '77MB'"),
        Sql(A, "SET TimeZone = 'Europe/Paris'"),
        Look(B),
        Look(A),
        Sql(B, "SET work_mem = '3MB'"),
        Look(A),
        Look(B),
        Sql(A, "RESET work_mem"),
        Look(B),
        Look(A),
        Sql(A, "RESET TimeZone"),
        Look(B),
        Look(A),
        Sql(A, "SET application_name = 'renamed-a'"),
        Sql(A, "SET DateStyle = 'German, DMY'"),
        Sql(A, "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
        Look(B),
        Look(A),
        Sql(A, "SELECT current_setting('transaction_isolation')"),
        Sql(B, "SELECT current_setting('transaction_isolation')"),
        // search_path decides which t each client reads.
        Sql(A, "SET search_path = sa"),
        Look(B),
        Look(A),
        Sql(B, "SET search_path TO DEFAULT"),
        Look(A),
        Look(B),
        // Role: SET ROLE to a granted role, then back.
        Sql(A, "SET ROLE reader"),
        Look(B),
        Look(A),
        Sql(B, "SELECT current_user"),
        Sql(A, "RESET ROLE"),
        Look(B),
        Look(A),
        Sql(A, "SET ROLE reader"),
        // Custom settings by set_config(..., false) alone, and by SET.
        Sql(A, "SELECT set_config('myapp.x', 'a1', false)"),
        Look(B),
        Look(A),
        Sql(B, "SET myapp.x = 'b1'"),
        Look(A),
        Look(B),
        // Every session value so far onto a new backend.
        Reconnect,
        Look(B),
        Look(A),
        Sql(A, "SELECT set_config('myapp.y', 'only-this-transaction', true)"),
        Look(B),
        Look(A),
        // Transactional behaviour: SET LOCAL, rolled-back SET/set_config,
        // savepoints, an implicit transaction that fails.
        Sql(A, "BEGIN; SET LOCAL work_mem = '99MB'; SELECT current_setting('work_mem'); COMMIT"),
        Look(B),
        Look(A),
        Sql(A, "BEGIN; SET work_mem = '55MB'; SELECT set_config('myapp.x', 'rolled-back', false); ROLLBACK"),
        Look(B),
        Look(A),
        Sql(A, "BEGIN; SET work_mem = '66MB'; COMMIT"),
        Look(B),
        Look(A),
        Sql(A, "BEGIN; SAVEPOINT s; SET work_mem = '44MB'; ROLLBACK TO s; COMMIT"),
        Look(B),
        Look(A),
        Sql(A, "SET work_mem = '12MB'; SELECT 1/0"),
        Look(B),
        Look(A),
        // SQL-level prepared statements under the same name for both.
        Sql(A, "PREPARE q(int) AS SELECT 'A:' || ($1 + 1)::text"),
        Sql(B, "PREPARE q(int) AS SELECT 'B:' || $1::text"),
        Sql(A, "EXECUTE q(1)"),
        Sql(B, "EXECUTE q(1)"),
        Sql(A, "PREPARE qa AS SELECT current_user::text || '/' || current_setting('work_mem')"),
        Sql(B, "EXECUTE qa"),
        Sql(A, "EXECUTE qa"),
        Look(B),
        Look(A),
        // SQL-level statements onto a new backend.
        Reconnect,
        Sql(B, "EXECUTE q(2)"),
        Sql(A, "EXECUTE q(2)"),
        // Redefined within one transaction, then dropped.
        Sql(A, "DEALLOCATE q; PREPARE q(int) AS SELECT 'A2:' || $1::text"),
        Sql(B, "EXECUTE q(5)"),
        Sql(A, "EXECUTE q(5)"),
        Sql(A, "DEALLOCATE qa"),
        Sql(B, "EXECUTE q(6)"),
        Sql(A, "EXECUTE qa"),
        Sql(A, "EXECUTE q(6)"),
        // A statement resolved through search_path, after search_path changes.
        Sql(A, "PREPARE pt AS SELECT v FROM t"),
        Sql(A, "SET search_path = sb"),
        Sql(B, "SELECT 1"),
        Sql(A, "EXECUTE pt"),
        // Protocol-level named statements (Parse/Bind/Execute).
        Prepare(A, "pa", "SELECT ($1::int + 1)::text, current_setting('work_mem')"),
        Run(A, "pa", 1),
        Look(B),
        Run(A, "pa", 2),
        Prepare(B, "pb", "SELECT ($1::int * 10)::text, current_user::text"),
        Run(A, "pa", 3),
        Run(B, "pb", 4),
        // Protocol-level statements onto a new backend.
        Reconnect,
        Run(A, "pa", 4),
        Run(B, "pb", 5),
        ExecForeign(B, "pa"),
        ExecForeign(A, "pb"),
        Run(A, "pa", 5),
        Run(B, "pb", 6),
        Look(A),
        Look(B),
        // DEALLOCATE ALL and DISCARD ALL by the client itself.
        Sql(B, "DEALLOCATE ALL"),
        Run(A, "pa", 7),
        Run(B, "pb", 7),
        Look(B),
        Sql(A, "DISCARD ALL"),
        Look(B),
        Look(A),
        Run(A, "pa", 8),
        Sql(A, "RESET ALL"),
        Look(A),
        Look(B),
    ]
}

struct Player {
    c: Client,
    stmts: HashMap<&'static str, Statement>,
}

/// Plays the script with A and B; returns the transcript and the backend
/// pid after each step (a `SELECT pg_backend_pid()` turn of the step's
/// client; the one before it for `Reconnect`). `reconnect` carries out
/// `Step::Reconnect`.
fn play(a: Client, b: Client, steps: &[Step], reconnect: &dyn Fn()) -> (Vec<String>, Vec<i32>) {
    let mut players = [
        Player { c: a, stmts: HashMap::new() },
        Player { c: b, stmts: HashMap::new() },
    ];
    let idx = |w: Who| if w == Who::A { 0 } else { 1 };
    let mut out = Vec::new();
    let mut pids: Vec<i32> = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        if let Step::Reconnect = step {
            reconnect();
            out.push(format!("#{n} Reconnect"));
            let last = pids.last().copied().unwrap_or_default();
            pids.push(last);
            continue;
        }
        let (who, text) = match *step {
            Step::Sql(w, sql) => {
                let r = players[idx(w)].c.simple_query(sql);
                (w, match r {
                    Ok(m) => rows_text(&m).join(" / "),
                    Err(e) => format!("ERROR {}", sqlstate(&e)),
                })
            }
            Step::Look(w) => (w, first_value(
                &players[idx(w)].c.simple_query(LOOK).unwrap_or_else(|e| panic!("step {n} LOOK: {e:?}")),
            ).unwrap_or_default()),
            Step::Prepare(w, key, sql) => {
                let p = &mut players[idx(w)];
                (w, match p.c.prepare(sql) {
                    Ok(s) => {
                        p.stmts.insert(key, s);
                        "prepared".to_string()
                    }
                    Err(e) => format!("ERROR {}", sqlstate(&e)),
                })
            }
            Step::Run(w, key, v) => {
                let p = &mut players[idx(w)];
                let st = p.stmts.get(key).unwrap_or_else(|| panic!("step {n}: no statement {key}")).clone();
                (w, match p.c.query(&st, &[&v]) {
                    Ok(rows) => rows
                        .iter()
                        .map(|r| {
                            (0..r.len())
                                .map(|i| r.get::<_, Option<String>>(i).unwrap_or_else(|| "<null>".into()))
                                .collect::<Vec<_>>()
                                .join("|")
                        })
                        .collect::<Vec<_>>()
                        .join(" / "),
                    Err(e) => format!("ERROR {}", sqlstate(&e)),
                })
            }
            Step::ExecForeign(w, key) => {
                let other = 1 - idx(w);
                // rust-postgres keeps the name private: the owner reads it.
                let text = sql_of(steps, key);
                let name = players[other]
                    .c
                    .query_one(
                        "SELECT name FROM pg_prepared_statements WHERE statement = $1",
                        &[&text],
                    )
                    .map(|r| r.get::<_, String>(0))
                    .unwrap_or_else(|e| panic!("step {n}: owner's name of {key}: {e:?}"));
                let sql = format!("EXECUTE {name}(1)");
                (w, match players[idx(w)].c.simple_query(&sql) {
                    Ok(m) => format!("rows {:?}", rows_text(&m)),
                    Err(e) => format!("ERROR {}", sqlstate(&e)),
                })
            }
            Step::Reconnect => unreachable!("handled above"),
        };
        out.push(format!("#{n} {who:?} {step:?} => {text}"));
        pids.push(pid_of(&mut players[idx(who)].c));
    }
    (out, pids)
}

/// The SQL of the statement prepared under `key`.
fn sql_of(steps: &[Step], key: &str) -> &'static str {
    steps
        .iter()
        .find_map(|s| match *s {
            Step::Prepare(_, k, sql) if k == key => Some(sql),
            _ => None,
        })
        .expect("a Prepare step for the key")
}

fn connect(cfg: postgres::Config, transport: &Transport, what: &str) -> Client {
    transport.connect(cfg).unwrap_or_else(|e| panic!("{what} ({transport:?}): {e:?}"))
}

fn client_a(ci: ConnInfo, transport: &Transport) -> Client {
    let mut cfg = ci.application_name("client-a").config();
    cfg.options("-c work_mem=8MB -c TimeZone=Asia/Tokyo");
    connect(cfg, transport, "client A")
}

fn client_b(ci: ConnInfo, transport: &Transport) -> Client {
    let mut cfg = ci.application_name("client-b").config();
    cfg.options("-c TimeZone=America/Lima -c search_path=sb,public");
    connect(cfg, transport, "client B")
}

/// The matrix for movable state: through one shared backend, each client
/// sees exactly what it would see on its own direct connection.
#[test]
fn movable_state_follows_its_client_like_a_direct_session() {
    run(matrix_cluster(), SETUP, LIMIT, |pg| matrix(pg, Transport::Plain));
}

/// The same matrix with both pooled clients on TLS (`sslmode=require`) to a
/// server with `ssl = on`: the relay must not change what a client sees of
/// its session, nor keep it from moving between backends.
#[test]
fn movable_state_follows_its_client_over_tls() {
    run(matrix_cluster(), SETUP, LIMIT, |pg| {
        if let Some(tls) = transport_ready(pg, Transport::tls()) {
            matrix(pg, tls);
        }
    });
}

/// See `nextgres_test::tls::transport_ready`: `ssl = on` for `Tls`, None
/// (reason printed) on 16.
fn transport_ready(pg: &Cluster, transport: Transport) -> Option<Transport> {
    nextgres_test::tls::transport_ready(pg, transport, "app", "postgres", SETTLE)
}

/// Waits until nextgres.clients lists `n` clients, all on TLS for `Tls` and
/// none for `Plain` (the superuser's session is direct, so not listed; a
/// probe client of `transport_ready` may still be leaving).
fn expect_clients(pg: &Cluster, transport: &Transport, n: usize) {
    let want = format!("{n}/{}", if transport.is_tls() { n } else { 0 });
    let count = || -> String {
        pg.admin()
            .query_one("SELECT count(*) || '/' || count(tls) FROM nextgres.clients", &[])
            .expect("nextgres.clients")
            .get(0)
    };
    let ok = wait_until(SETTLE, || count() == want);
    assert!(ok, "pooled clients / on TLS: {} where {want} expected ({transport:?})", count());
}

/// pool_size 1, so every turn of the other client switches the backend's
/// session; a short wait limit bounds a client stuck behind the other.
fn matrix_cluster() -> nextgres_test::Builder {
    Cluster::builder()
        .conf("nextgres.pool_size = 1")
        .conf("nextgres.query_wait_timeout = 20")
}

fn matrix(pg: &Cluster, transport: Transport) {
    let steps = script();
    // Reference: two direct sessions (Unix socket, not pooled).
    let (direct, direct_pids) = play(
        client_a(pg.unix("app", "postgres"), &Transport::Plain),
        client_b(pg.unix("app", "postgres"), &Transport::Plain),
        &steps,
        &|| {},
    );
    let direct_pids: BTreeSet<i32> = direct_pids.into_iter().collect();
    assert_eq!(direct_pids.len(), 2, "direct sessions are two backends");
    let mark = pg.log_mark();
    let (a, b) = (client_a(pg.tcp("app", "postgres"), &transport), client_b(pg.tcp("app", "postgres"), &transport));
    expect_clients(pg, &transport, 2);
    let replace = || {
        let mut admin = pg.admin();
        admin
            .batch_execute("SELECT nextgres.reconnect('postgres', 'app')")
            .expect("nextgres.reconnect");
        let gone: bool = admin
            .query_one("SELECT nextgres.wait_close('postgres', 'app', $1)", &[&(SETTLE.as_secs() as i32)])
            .expect("nextgres.wait_close")
            .get(0);
        assert!(gone, "the pool's backend was not replaced within {SETTLE:?}");
    };
    let (pooled, pids) = play(a, b, &steps, &replace);
    // A and B shared the single backend between replacements, and the pid
    // changed exactly where the script replaced it.
    let reconnects = steps.iter().filter(|s| matches!(s, Step::Reconnect)).count();
    let distinct: BTreeSet<i32> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), reconnects + 1, "one pooled backend per stretch between replacements: {pids:?}");
    for i in 1..steps.len() {
        if matches!(steps[i], Step::Reconnect) {
            continue; // it repeats the pid before it
        }
        let replaced = matches!(steps[i - 1], Step::Reconnect);
        assert_eq!(
            pids[i - 1] != pids[i],
            replaced,
            "step #{i}: pid {} -> {} ({transport:?}); pids change exactly where the backend is replaced",
            pids[i - 1],
            pids[i]
        );
    }
    let diff: Vec<String> = direct
        .iter()
        .zip(&pooled)
        .filter(|(d, p)| d != p)
        .map(|(d, p)| format!("direct: {d}\npooled: {p}"))
        .collect();
    assert!(
        diff.is_empty(),
        "{} steps differ from a direct session ({transport:?}):\n{}\n\n--- full pooled transcript ---\n{}\n--- server log since ---\n{}",
        diff.len(),
        diff.join("\n\n"),
        pooled.join("\n"),
        pg.log_since(mark)
    );
    // Sanity: the script checks what it means to check.
    let find = |needle: &str| direct.iter().find(|l| l.contains(needle)).cloned().unwrap_or_default();
    assert!(find("#4 B Look").contains("client-b | 4MB | America/Lima"), "{}", find("#4 B Look"));
    assert!(find("#5 A Look").contains("client-a | 77MB | Europe/Paris"), "{}", find("#5 A Look"));
    assert!(direct.iter().any(|l| l.contains("ExecForeign") && l.contains("ERROR 26000")));
}

/// SET ROLE by A never reaches B. DISCARD ALL makes the role inactive but
/// keeps the `role` setting's text and source, so a snapshot of "settings
/// with source session" taken later on that backend for B must not pick it up.
#[test]
fn role_set_by_one_client_never_reaches_another() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            a.batch_execute("SET ROLE reader").expect("set role");
            // B changes any setting on the backend A used: B's session is saved.
            b.batch_execute("SET work_mem = '3MB'").expect("b set");
            assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
            assert_eq!(one(&mut a, "SELECT current_user"), "reader");
            assert_eq!(one(&mut b, "SELECT current_user"), "app", "B runs as A's role");
            // A's own DISCARD ALL ends its role, as on a direct session.
            a.batch_execute("DISCARD ALL").expect("discard");
            pid_of(&mut b);
            assert_eq!(one(&mut a, "SELECT current_user"), "app", "A's role after DISCARD ALL");
        },
    );
}

/// A superuser-only setting, then `SET SESSION AUTHORIZATION` and `SET ROLE`
/// (a superuser's login acting as another user): moved to the backend again
/// after another client used it, the client has all three, as on a direct
/// session (setting the session authorization ends a role, so the order they
/// are set again in matters, and the setting is set again with the login's
/// superuser context although the identity comes first).
#[test]
fn session_authorization_then_role_follow_their_client() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let su = nextgres_test::cluster::SUPERUSER;
            let mut a = pg.tcp(su, "postgres").connect().expect("a");
            let mut b = pg.tcp(su, "postgres").connect().expect("b");
            // A superuser-only setting made before: it stays too.
            a.batch_execute("SET session_replication_role = replica; SET SESSION AUTHORIZATION app; SET ROLE reader")
                .expect("identity");
            b.batch_execute("SET work_mem = '3MB'").expect("b set");
            assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
            assert_eq!(
                one(&mut a, "SELECT current_user || '/' || session_user || '/' || current_setting('session_replication_role')"),
                "reader/app/replica"
            );
            assert_eq!(one(&mut b, "SELECT current_user || '/' || session_user"), format!("{su}/{su}"));

            // A setting only superusers may see, set before a SET ROLE to a
            // role that may not: read at the transaction's end all the same.
            a.batch_execute("RESET SESSION AUTHORIZATION").expect("reset");
            a.batch_execute("SET dynamic_library_path = '$libdir:/nonexistent'; SET ROLE app").expect("hidden setting");
            b.batch_execute("SET work_mem = '4MB'").expect("b set");
            assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
            assert_eq!(one(&mut a, "SELECT current_user"), "app");
            a.batch_execute("RESET ROLE").expect("reset role");
            assert_eq!(one(&mut a, "SELECT current_setting('dynamic_library_path')"), "$libdir:/nonexistent");
            assert_eq!(one(&mut b, "SELECT current_setting('dynamic_library_path')"), "$libdir");
        },
    );
}

/// A role default of a setting only superusers may see (auto_explain's
/// `ALTER ROLE ... SET session_preload_libraries` is the usual one; here
/// `dynamic_library_path`), for a pool role that is no superuser: the backend
/// reads its login's defaults outside any transaction and must not look the
/// role's privileges up there (it crashed, and the server restarted, at every
/// switch). Both clients are served, switch after switch, and the default is
/// in force in their sessions.
#[test]
fn superuser_only_role_default_of_a_plain_pool_role() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            pg.admin()
                .batch_execute("ALTER ROLE app SET dynamic_library_path = '$libdir:/nonexistent'; GRANT pg_read_all_settings TO reader")
                .expect("role default");
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            for i in 0..3 {
                b.batch_execute(&format!("SET work_mem = '{}MB'", 3 + i)).expect("b set");
                assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
            }
            a.batch_execute("SET ROLE reader").expect("a role that may read it");
            assert_eq!(one(&mut a, "SELECT current_setting('dynamic_library_path')"), "$libdir:/nonexistent");
            a.batch_execute("RESET ROLE").expect("reset role");
            assert_eq!(one(&mut b, "SELECT 1"), "1");
        },
    );
}

/// A prepared `SHOW` of a setting only some roles may see (here through
/// `pg_read_all_settings`), used on a backend that never served its client:
/// the statement is made there between two messages, outside any
/// transaction, and working out its result column checks the role's
/// privileges (a catalog read): it must not crash that backend.
#[test]
fn prepared_show_of_a_restricted_setting_moves_to_a_fresh_backend() {
    run(
        Cluster::builder()
            .conf("nextgres.pool_size = 2")
            .conf("nextgres.hold_idle_clients = off")
            .conf("nextgres.query_wait_timeout = 20"),
        SETUP,
        LIMIT,
        |pg| {
            pg.admin().batch_execute("GRANT pg_read_all_settings TO app").expect("grant");
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            let show = a.prepare("SHOW dynamic_library_path").expect("prepare SHOW");
            let pa = pid_of(&mut a);
            b.batch_execute("BEGIN").expect("b begin");
            let pb = pid_of(&mut b);
            let rows = a.query(&show, &[]).expect("the prepared SHOW on the other backend");
            let v: String = rows[0].get(0);
            assert_eq!(v, "$libdir");
            assert!(pid_of(&mut a) != pb, "A ran on B's backend {pb} (A prepared on {pa})");
            b.batch_execute("COMMIT").expect("b commit");
        },
    );
}

/// A role a client set that cannot be set again when it next moves to a
/// backend (revoked from its login, or dropped, since): the client's session
/// ends with a FATAL rather than going on with its login's privileges. (A
/// direct session would keep the role: the documented difference.) Other
/// clients go on.
#[test]
fn role_revoked_or_dropped_ends_the_session_that_set_it() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            pg.admin().batch_execute("CREATE ROLE gone NOLOGIN; GRANT gone TO app").expect("role gone");
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            a.batch_execute("SET ROLE reader").expect("set role");
            pg.admin().batch_execute("REVOKE reader FROM app").expect("revoke");
            b.batch_execute("SET work_mem = '3MB'").expect("b set");
            match a.simple_query("SELECT current_user") {
                Ok(m) => panic!("A ran without its revoked role, as {:?}", session_support::first_value(&m)),
                Err(e) => assert!(
                    e.as_db_error().is_some_and(|d| *d.severity() == *"FATAL") || e.is_closed(),
                    "A's end: {e:?}"
                ),
            }
            assert_eq!(one(&mut b, "SELECT current_user"), "app");

            let mut c = pg.tcp("app", "postgres").connect().expect("c");
            c.batch_execute("SET ROLE gone").expect("set role gone");
            b.batch_execute("SET work_mem = '4MB'").expect("b set");
            pg.admin().batch_execute("DROP ROLE gone").expect("drop role");
            match c.simple_query("SELECT current_user") {
                Ok(m) => panic!("C ran without its dropped role: {:?}", session_support::first_value(&m)),
                Err(e) => assert!(
                    e.as_db_error().is_some_and(|d| *d.severity() == *"FATAL") || e.is_closed(),
                    "C's end: {e:?}"
                ),
            }
            assert_eq!(one(&mut b, "SELECT current_user"), "app", "B after C's session ended");
        },
    );
}

/// Superuser-only settings a plain role's session holds by right: set by a
/// superuser's SECURITY DEFINER function (as a PG 17 login event trigger
/// switches on `log_statement = all` for auditing), or by the client under
/// a role granted `SET ON PARAMETER` before it reset that role. A direct
/// session keeps them for its life; through a pool of one backend that
/// another client uses between A's transactions, A keeps them too, each
/// set again as it was set (before: set again with A's own rights, refused,
/// and lost at the first switch). B never sees them.
#[test]
fn superuser_only_settings_a_session_got_by_right_stay_with_it() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        pg.admin()
            .batch_execute(
                "CREATE FUNCTION public.sd_set(n text, v text) RETURNS text LANGUAGE sql SECURITY DEFINER
                     AS $$ SELECT pg_catalog.set_config(n, v, false) $$;
                 GRANT EXECUTE ON FUNCTION public.sd_set(text, text) TO PUBLIC;
                 CREATE ROLE granted NOLOGIN;
                 GRANT SET ON PARAMETER log_min_duration_statement TO granted;
                 CREATE ROLE plain LOGIN NOINHERIT;
                 GRANT granted TO plain;",
            )
            .expect("setup");
        let probe = "SELECT concat_ws('|', current_setting('session_replication_role'), current_setting('log_statement'), \
                     current_setting('log_min_duration_statement'), current_user)";
        let steps = |a: &mut Client, b: &mut Client, pooled: bool| -> Vec<String> {
            one(a, "SELECT public.sd_set('session_replication_role', 'replica')");
            one(a, "SELECT public.sd_set('log_statement', 'all')");
            a.batch_execute("SET ROLE granted; SET log_min_duration_statement = 12345; RESET ROLE").expect("granted set");
            let mut seen = vec![one(a, probe)];
            for i in 0..3 {
                b.batch_execute(&format!("SET work_mem = '{}MB'", 3 + i)).expect("b set");
                if pooled {
                    assert_eq!(pid_of(a), pid_of(b), "one backend");
                }
                seen.push(one(a, probe));
                seen.push(format!("B: {}", one(b, probe)));
            }
            seen
        };
        let (direct, pooled) = direct_then_pooled(pg, "plain", steps);
        assert_eq!(direct[0], "replica|all|12345ms|plain", "direct: {direct:?}");
        assert_eq!(pooled, direct, "pooled differs from direct");
    });
}

/// A client's application_name (which every role may read in
/// pg_stat_activity) and address are not shown on the backend it leaves:
/// a direct session's row goes with it. A client that comes back to the
/// backend it left (no switch) is shown with its own again.
#[test]
fn a_parked_backend_shows_no_departed_client() {
    run(
        Cluster::builder()
            .conf("nextgres.pool_size = 1")
            .conf("nextgres.hold_idle_clients = off")
            .conf("nextgres.kernel_queue = off"),
        SETUP,
        LIMIT,
        |pg| {
            let mut a = pg.tcp("app", "postgres").application_name("alice-token").connect().expect("a");
            let mine = "SELECT concat_ws('|', application_name, client_addr) FROM pg_stat_activity WHERE pid = pg_backend_pid()";
            for _ in 0..3 {
                assert_eq!(one(&mut a, mine), "alice-token|127.0.0.1", "the client's own row");
            }
            drop(a);
            let shown = || -> i64 {
                pg.admin()
                    .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'alice-token' OR client_addr IS NOT NULL", &[])
                    .expect("pg_stat_activity")
                    .get(0)
            };
            let gone = nextgres_test::wait_until(Duration::from_secs(10), || shown() == 0);
            assert!(gone, "a departed client still shown: {} rows", shown());
        },
    );
}

/// `SELECT set_config('myapp.user_id', '42', false)` alone (no SET in the
/// same transaction) is a session setting like SET: it follows its client to
/// the next backend.
#[test]
fn set_config_alone_follows_its_client() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            one(&mut a, "SELECT set_config('myapp.user_id', '42', false)");
            one(&mut a, "SELECT set_config('search_path', 'sa', false)");
            assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
            assert_eq!(
                one(&mut a, "SELECT concat_ws('|', current_setting('myapp.user_id', true), current_setting('search_path'))"),
                "42|sa",
                "A's set_config() settings after B used the backend"
            );
        },
    );
}

/// Settings changed by a `set_config()` that no statement text shows: a
/// function in SQL-standard syntax (stored parsed), and views that call it
/// (as a column default or a row security policy could). With a pool of one
/// the backend goes from A to B and back after each. B never sees what A
/// set: not A's search_path, not A's role (its privileges), not A's custom
/// setting; A keeps each of them, as on a direct session.
#[test]
fn settings_set_where_no_statement_shows_them_stay_with_their_client() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            pg.admin()
                .batch_execute(
                    "CREATE FUNCTION public.set_tenant(t text) RETURNS text LANGUAGE sql \
                       BEGIN ATOMIC SELECT set_config('app.tenant', t, false); END; \
                     CREATE VIEW public.go_sb AS SELECT set_config('search_path', 'sb', false) AS p; \
                     CREATE VIEW public.go_reader AS SELECT set_config('role', 'reader', false) AS r; \
                     CREATE VIEW public.go_custom AS SELECT set_config('app.viewed', 'acme', false) AS v; \
                     GRANT SELECT ON public.go_sb, public.go_reader, public.go_custom TO app",
                )
                .expect("functions and views");
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");

            one(&mut a, "SELECT public.set_tenant('acme')");
            let seen = maybe(&mut b, "SELECT current_setting('app.tenant', true)");
            assert!(matches!(seen.as_deref(), None | Some("")), "B reads A's app.tenant: {seen:?}");
            assert_eq!(one(&mut a, "SELECT current_setting('app.tenant')"), "acme", "A's setting from its function");

            one(&mut a, "SELECT p FROM public.go_sb");
            assert_eq!(one(&mut b, "SELECT v FROM t"), "public", "B runs with A's search_path");
            assert_eq!(one(&mut a, "SELECT v FROM t"), "sb", "A's search_path set by a view");
            a.batch_execute("SET search_path TO DEFAULT").expect("reset path");

            one(&mut a, "SELECT r FROM public.go_reader");
            assert_eq!(one(&mut b, "SELECT current_user"), "app", "B runs as the role A set through a view");
            assert_eq!(one(&mut a, "SELECT current_user"), "reader", "A's role set by a view");
            a.batch_execute("RESET ROLE").expect("reset role");

            // With nothing else set, B would get A's session as it is (no
            // DISCARD ALL): this setting must not come with it.
            a.batch_execute("RESET app.tenant").expect("reset app.tenant");
            one(&mut a, "SELECT v FROM public.go_custom");
            let seen = maybe(&mut b, "SELECT current_setting('app.viewed', true)");
            assert!(matches!(seen.as_deref(), None | Some("")), "B reads A's app.viewed: {seen:?}");
            assert_eq!(one(&mut a, "SELECT current_setting('app.viewed')"), "acme", "A's setting set by a view");
        },
    );
}

/// A custom setting another client set on the same backend is never seen
/// with its value. (A direct session reads NULL; after DISCARD ALL the
/// placeholder PostgreSQL created stays and reads '', see the README.)
#[test]
fn custom_setting_of_another_client_is_never_seen() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            one(&mut a, "SELECT set_config('myapp.user_id', '42', false)");
            assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
            let seen = maybe(&mut b, "SELECT current_setting('myapp.user_id', true)");
            // A direct session reads NULL. PostgreSQL cannot drop a custom
            // placeholder once a session created it, so after DISCARD ALL B
            // reads '' (documented in the README); A's value must never show.
            assert!(
                matches!(seen.as_deref(), None | Some("")),
                "client B never set myapp.user_id but reads {seen:?}"
            );
            assert_eq!(one(&mut a, "SELECT current_setting('myapp.user_id', true)"), "42");
        },
    );
}

/// Settings a client sent in its startup packet (`options=-c ...`) leave
/// with it: the next client of the backend, which sent none, never reads
/// a custom one's value (the "tenant id in a custom setting" pattern of
/// row-level security), and a server setting is back at postgresql.conf's
/// value with its source, so a reload still reaches it, before and after
/// the first client left. Before, a custom startup setting stayed with its
/// value for every later client of the backend, and a server one came back
/// with source "client", deaf to reloads (hunt4-session C1, F1).
#[test]
fn startup_settings_of_another_client_are_never_seen() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let mut cfg = pg.tcp("app", "postgres").config();
            cfg.options("-c app.tenant=42 -c lock_timeout=5s");
            let mut a = cfg.connect(postgres::NoTls).expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            let look = |c: &mut Client| {
                let tenant = maybe(c, "SELECT current_setting('app.tenant', true)");
                let lock = one(c, "SELECT setting || ' ' || source FROM pg_settings WHERE name = 'lock_timeout'");
                (tenant, lock)
            };
            let b_sees = |b: &mut Client, want_lock: &str, when: &str| {
                let (tenant, lock) = look(b);
                // A direct session reads NULL; a placeholder a session created
                // reads '' after DISCARD ALL (README); never A's value.
                assert!(matches!(tenant.as_deref(), None | Some("")), "{when}: B reads app.tenant {tenant:?}");
                assert_eq!(lock, want_lock, "{when}: B's lock_timeout and its source");
            };
            for turn in 0..3 {
                assert_eq!(look(&mut a), (Some("42".to_string()), "5000 client".to_string()), "A, turn {turn}");
                assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
                b_sees(&mut b, "0 default", &format!("turn {turn}"));
            }
            drop(a);
            let mut b2 = pg.tcp("app", "postgres").connect().expect("b2");
            b_sees(&mut b2, "0 default", "a new client after A left");
            let mut admin = pg.admin();
            admin.batch_execute("ALTER SYSTEM SET lock_timeout = '7s'").expect("alter system");
            admin.batch_execute("SELECT pg_reload_conf()").expect("reload");
            assert!(
                wait_until(SETTLE, || look(&mut b).1 == "7000 configuration file"),
                "the reload did not reach B: {:?}",
                look(&mut b)
            );
            let mut a = cfg.connect(postgres::NoTls).expect("a again");
            assert_eq!(look(&mut a), (Some("42".to_string()), "5000 client".to_string()), "A after the reload");
            b_sees(&mut b2, "7000 configuration file", "after the reload");
            admin.batch_execute("ALTER SYSTEM RESET lock_timeout").expect("alter system reset");
            admin.batch_execute("SELECT pg_reload_conf()").expect("reload");
        },
    );
}

/// A startup DateStyle that names only a style (`ISO`, as pgjdbc sends it)
/// gets the default day/month order, as at a direct login, whatever order
/// the backend's previous client sent (`SQL, DMY`). Before, it merged with
/// that client's order: told `ISO, MDY`, the session ran `ISO, DMY` and
/// read '03/04/2024' as the 3rd of April (hunt6 F1).
#[test]
fn a_startup_datestyle_never_merges_with_another_clients() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        let login = |ci: ConnInfo, opts: &str| {
            let mut cfg = ci.config();
            cfg.options(opts);
            cfg.connect(postgres::NoTls).expect("login")
        };
        let look = "SELECT current_setting('DateStyle') || ' ' || '03/04/2024'::date::text";
        let direct = {
            let mut b = login(pg.unix("app", "postgres"), "-c DateStyle=ISO");
            one(&mut b, look)
        };
        assert_eq!(direct, "ISO, MDY 2024-03-04");
        for _ in 0..2 {
            let mut a = login(pg.tcp("app", "postgres"), "-c DateStyle=SQL,DMY");
            assert_eq!(one(&mut a, look), "SQL, DMY 03/04/2024");
            let mut b = login(pg.tcp("app", "postgres"), "-c DateStyle=ISO");
            assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
            assert_eq!(one(&mut b, look), direct, "B after A on its backend");
        }
    });
}

/// A role from the login role's default (`ALTER ROLE ... SET role`) or from
/// the startup packet (`options=-c role=...`) is in force for each client
/// as at a direct login, whatever another client of the backend did with
/// SET ROLE in between. On 16, DISCARD ALL left the role setting's text
/// and source behind while the role went inactive: such clients ran as
/// their login, with its privileges (hunt4-session F0).
#[test]
fn role_from_a_default_or_the_startup_packet_is_in_force() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let who = |c: &mut Client| one(c, "SELECT current_user || ' ' || current_setting('role')");
            pg.admin().batch_execute("ALTER ROLE app SET role = 'reader'").expect("role default");
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            assert_eq!(who(&mut a), "reader reader", "a role default, first client");
            assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
            assert_eq!(who(&mut b), "reader reader", "a role default, second client");
            b.batch_execute("SET ROLE NONE").expect("set role none");
            for turn in 0..2 {
                assert_eq!(who(&mut a), "reader reader", "a role default after another client's SET ROLE, turn {turn}");
                assert_eq!(who(&mut b), "app none", "SET ROLE NONE, turn {turn}");
            }
            pg.admin().batch_execute("ALTER ROLE app RESET role").expect("reset role default");
            let mut cfg = pg.tcp("app", "postgres").config();
            cfg.options("-c role=reader");
            let mut c = cfg.connect(postgres::NoTls).expect("c");
            let mut d = pg.tcp("app", "postgres").connect().expect("d");
            for turn in 0..2 {
                assert_eq!(who(&mut c), "reader reader", "a startup role, turn {turn}");
                assert_eq!(who(&mut b), "app none", "SET ROLE NONE again, turn {turn}");
                assert_eq!(who(&mut d), "app none", "no role, turn {turn}");
                assert_eq!(who(&mut a), "reader reader", "the old role default, turn {turn}");
            }
            b.batch_execute("SET ROLE reader").expect("set role");
            assert_eq!(who(&mut d), "app none", "no role after another's SET ROLE");
            assert_eq!(who(&mut c), "reader reader", "a startup role after another's SET ROLE");
            assert_eq!(who(&mut b), "reader reader", "SET ROLE reader");
        },
    );
}

/// A real setting follows its client in full precision: `SHOW` prints 6
/// digits, and the client's session once ran with that rounded value on its
/// next backend, so plans and costs changed (hunt4-session F4).
#[test]
fn real_settings_follow_their_client_in_full_precision() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            a.batch_execute("SET cpu_tuple_cost = 0.01234567").expect("set");
            let plan = |c: &mut Client| one(c, "EXPLAIN SELECT * FROM generate_series(1, 100000000)");
            let before = plan(&mut a);
            assert!(before.contains("..1234567.00 "), "{before}");
            assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
            b.batch_execute("SET cpu_tuple_cost = 0.5").expect("b's own");
            assert_eq!(plan(&mut a), before, "A's plan after a switch");
        },
    );
}

/// A setting whose name merely starts with `transaction_` (17's
/// `transaction_timeout`, a custom `transaction_ctx.user_id`) is session
/// state like any other: when it is the only thing a client SET, it still
/// follows that client and never reaches the next client of the backend
/// (it once was left out of the session image, so the backend counted as
/// clean and the next client inherited it). `SET seed` (whose SHOW value,
/// "unavailable", no SET accepts) must not make later clients of the
/// backend get a WARNING. One backend (pool_size = 1), so every turn
/// switches it between the clients.
#[test]
fn settings_named_transaction_something_and_seed_stay_with_their_client() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let unset = "SELECT coalesce(nullif(current_setting('transaction_ctx.user_id', true), ''), '<unset>')";
            let mut settings = vec![("transaction_ctx.user_id", "'alice'", "alice", unset)];
            if pg.pg_major() >= 17 {
                settings.push(("transaction_timeout", "'300s'", "5min", "SHOW transaction_timeout"));
            }
            for (name, value, shown, look) in settings {
                let mut a = pg.tcp("app", "postgres").connect().expect("a");
                let mut b = pg.tcp("app", "postgres").connect().expect("b");
                let before = one(&mut b, look);
                a.batch_execute(&format!("SET {name} = {value}")).expect("SET");
                assert_eq!(pid_of(&mut a), pid_of(&mut b), "one backend");
                assert_eq!(one(&mut b, look), before, "client B never set {name} but sees A's value");
                let mine = one(&mut a, &format!("SELECT current_setting('{name}')"));
                assert_eq!(mine, shown, "client A's own {name} after B's turn");
                drop(a);
                // A new client after A left: the backend's session is not A's.
                let mut c = pg.tcp("app", "postgres").connect().expect("c");
                assert_eq!(one(&mut c, look), before, "a new client sees the {name} of a client that left");
            }
            let mark = pg.log_mark();
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            a.batch_execute("SET seed = 0.5").expect("SET seed");
            for _ in 0..3 {
                one(&mut b, "SELECT 1");
                one(&mut a, "SELECT 1");
            }
            let log = pg.log_since(mark);
            assert!(
                !log.contains("parameter \"seed\""),
                "a client's SET seed was replayed on a later switch:\n{log}"
            );
        },
    );
}

/// Pinned state, kind by kind, with a pool of two: while A holds state that
/// cannot move, its backend stays attached to it between transactions
/// (nextgres.backends says why), A uses the state as on a direct session, B
/// is served by the other backend and sees none of it; once A removes the
/// state the pin is gone, and whichever client then gets A's former backend
/// sees nothing of A. One test per kind, so each gets its own verdict.
/// `transport`: the clients' way in; for `Tls` the server gets `ssl = on`
/// first (the CA path given is replaced by the one made for the test), and
/// the test is skipped with the reason printed on 16 (no OpenSSL).
fn pinned(
    transport: Transport,
    body: impl FnOnce(&Cluster, &mut Client, &mut Client, &mut Client) + Send + 'static,
) {
    run(
        Cluster::builder()
            .conf("nextgres.pool_size = 2")
            .conf("nextgres.query_wait_timeout = 20"),
        SETUP,
        LIMIT,
        move |pg| {
            let Some(transport) = transport_ready(pg, transport) else { return };
            let ci = pg.tcp("app", "postgres");
            let mut a = connect(ci.config(), &transport, "a");
            let mut b = connect(ci.config(), &transport, "b");
            let mut c = connect(ci.config(), &transport, "c");
            expect_clients(pg, &transport, 3);
            // Both backends exist before the pins start.
            c.batch_execute("BEGIN").expect("c begin");
            pid_of(&mut b);
            c.batch_execute("COMMIT").expect("c commit");
            assert_eq!(
                admin_i64(pg, "SELECT count(*) FROM nextgres.backends WHERE role = 'app'"),
                2,
                "two backends before the test"
            );
            body(pg, &mut a, &mut b, &mut c);
        },
    );
}

#[test]
fn pinned_by_temporary_table() {
    pinned(Transport::Plain, pinned_by_temporary_table_body);
}

#[test]
fn pinned_by_temporary_table_over_tls() {
    pinned(Transport::tls(), pinned_by_temporary_table_body);
}

fn pinned_by_temporary_table_body(pg: &Cluster, a: &mut Client, b: &mut Client, c: &mut Client) {
    a.batch_execute("CREATE TEMP TABLE a_tmp (x int); INSERT INTO a_tmp VALUES (1)")
        .expect("temp table");
    let pa = pid_of(a);
    expect_backend(pg, pa, "attached", Some("temporary table"));
    for i in 2..=4 {
        a.batch_execute(&format!("INSERT INTO a_tmp VALUES ({i})")).expect("insert");
        assert_eq!(pid_of(a), pa, "A moved off the backend holding its temp table");
        let pb = pid_of(b);
        assert_ne!(pb, pa, "B was given A's pinned backend");
        assert_eq!(
            one(b, "SELECT count(*) FROM pg_class WHERE relname = 'a_tmp'"),
            "1",
            "the catalog shows one a_tmp (A's, in A's temp schema)"
        );
        let e = b.simple_query("SELECT * FROM a_tmp").expect_err("B reads A's temp table");
        assert_eq!(sqlstate(&e), "42P01");
    }
    assert_eq!(one(a, "SELECT sum(x) FROM a_tmp"), "10");
    // ON COMMIT DROP and rolled-back temp tables do not pin.
    b.batch_execute("BEGIN; CREATE TEMP TABLE b_tx (x int) ON COMMIT DROP; COMMIT")
        .expect("on commit drop");
    b.batch_execute("BEGIN; CREATE TEMP TABLE b_rb (x int); ROLLBACK").expect("rolled back");
    let pb = pid_of(b);
    expect_backend(pg, pb, "parked", None);
    a.batch_execute("DROP TABLE a_tmp").expect("drop");
    expect_backend(pg, pa, "parked", None);
    no_trace_on(pg, pa, b, c, "SELECT count(*) FROM pg_class WHERE relname = 'a_tmp'", "0");
    // DISCARD TEMP unpins too; so does a temp table made by CREATE TABLE AS.
    a.batch_execute("CREATE TEMP TABLE a_tmp2 AS SELECT 1 AS x").expect("temp table 2");
    let pa = pid_of(a);
    expect_backend(pg, pa, "attached", Some("temporary table"));
    a.batch_execute("DISCARD TEMP").expect("discard temp");
    expect_backend(pg, pa, "parked", None);
}

#[test]
fn pinned_by_with_hold_cursor() {
    pinned(Transport::Plain, pinned_by_with_hold_cursor_body);
}

#[test]
fn pinned_by_with_hold_cursor_over_tls() {
    pinned(Transport::tls(), pinned_by_with_hold_cursor_body);
}

fn pinned_by_with_hold_cursor_body(pg: &Cluster, a: &mut Client, b: &mut Client, c: &mut Client) {
    a.batch_execute("DECLARE a_cur CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 10) g")
        .expect("declare");
    let pa = pid_of(a);
    expect_backend(pg, pa, "attached", Some("WITH HOLD cursor"));
    let mut fetched = Vec::new();
    for _ in 0..3 {
        let m = a.simple_query("FETCH 2 FROM a_cur").expect("fetch");
        fetched.extend(rows_text(&m));
        assert_ne!(pid_of(b), pa, "B was given A's pinned backend");
        let e = b.simple_query("FETCH 1 FROM a_cur").expect_err("B fetches A's cursor");
        assert_eq!(sqlstate(&e), "34000");
        assert_eq!(one(b, "SELECT count(*) FROM pg_cursors"), "0");
    }
    assert_eq!(fetched, ["1", "2", "3", "4", "5", "6"], "A's cursor position");
    // A cursor without HOLD ends with its transaction: no pin.
    b.batch_execute("BEGIN; DECLARE b_cur CURSOR FOR SELECT 1; COMMIT").expect("plain cursor");
    expect_backend(pg, pid_of(b), "parked", None);
    a.batch_execute("CLOSE a_cur").expect("close");
    expect_backend(pg, pa, "parked", None);
    no_trace_on(pg, pa, b, c, "SELECT count(*) FROM pg_cursors", "0");
}

#[test]
fn pinned_by_listen() {
    pinned(Transport::Plain, pinned_by_listen_body);
}

#[test]
fn pinned_by_listen_over_tls() {
    pinned(Transport::tls(), pinned_by_listen_body);
}

/// B notifies `a_chan` with `payload`: A, listening, gets it; B, which never
/// listened, gets nothing.
fn notify_reaches_only_a(a: &mut Client, b: &mut Client, payload: &str) {
    b.batch_execute(&format!("NOTIFY a_chan, '{payload}'")).expect("notify");
    let got = a
        .notifications()
        .timeout_iter(SETTLE)
        .next()
        .expect("notification")
        .expect("A's notification never came");
    assert_eq!((got.channel(), got.payload()), ("a_chan", payload));
    assert_eq!(b.notifications().iter().count().expect("notifications"), 0, "B never listened");
}

fn pinned_by_listen_body(pg: &Cluster, a: &mut Client, b: &mut Client, c: &mut Client) {
    a.batch_execute("LISTEN a_chan").expect("listen");
    let pa = pid_of(a);
    expect_backend(pg, pa, "attached", Some("LISTEN"));
    assert_ne!(pid_of(b), pa);
    assert_eq!(one(b, "SELECT count(*) FROM pg_listening_channels()"), "0");
    notify_reaches_only_a(a, b, "hello from b");
    a.batch_execute("UNLISTEN a_chan").expect("unlisten");
    expect_backend(pg, pa, "parked", None);
    no_trace_on(pg, pa, b, c, "SELECT count(*) FROM pg_listening_channels()", "0");
}

/// An UNLISTEN or DISCARD ALL that does not take effect (rolled back, or
/// refused inside a transaction block) leaves the client listening, as on a
/// direct session: it stays pinned and keeps getting its notifications; B,
/// served by the other backend, never gets them.
#[test]
fn pinned_by_listen_after_an_unlisten_rolled_back() {
    pinned(Transport::Plain, |pg, a, b, c| {
        a.batch_execute("LISTEN a_chan").expect("listen");
        let pa = pid_of(a);
        a.batch_execute("BEGIN; UNLISTEN a_chan; ROLLBACK").expect("unlisten rolled back");
        a.batch_execute("BEGIN; SAVEPOINT s; UNLISTEN *; ROLLBACK TO SAVEPOINT s; COMMIT")
            .expect("unlisten in a savepoint rolled back");
        a.batch_execute("BEGIN").expect("begin");
        assert_eq!(sqlstate(&a.batch_execute("DISCARD ALL").expect_err("DISCARD ALL in a block")), "25001");
        a.batch_execute("ROLLBACK").expect("rollback");
        expect_backend(pg, pa, "attached", Some("LISTEN"));
        assert_eq!(one(a, "SELECT count(*) FROM pg_listening_channels()"), "1");
        assert_ne!(pid_of(b), pa);
        notify_reaches_only_a(a, b, "still there");
        a.batch_execute("BEGIN; UNLISTEN a_chan; COMMIT").expect("unlisten");
        expect_backend(pg, pa, "parked", None);
        no_trace_on(pg, pa, b, c, "SELECT count(*) FROM pg_listening_channels()", "0");
    });
}

/// A temporary object that is not a table (a function, a type) pins its
/// client as a temporary table does: on another backend it would be gone,
/// and the next client on this one would find it first in its search path.
#[test]
fn pinned_by_temporary_function_and_type() {
    pinned(Transport::Plain, |pg, a, b, c| {
        a.batch_execute("CREATE FUNCTION pg_temp.a_fn() RETURNS text LANGUAGE sql AS $$SELECT 'from A'$$")
            .expect("temp function");
        let pa = pid_of(a);
        expect_backend(pg, pa, "attached", Some("temporary object"));
        assert_eq!(one(a, "SELECT pg_temp.a_fn()"), "from A");
        assert_ne!(pid_of(b), pa);
        let e = b.batch_execute("SELECT pg_temp.a_fn()").expect_err("B calls A's temporary function");
        // 3F000 without a temporary schema of its own, as directly.
        assert!(matches!(sqlstate(&e).as_str(), "3F000" | "42883"), "B calls A's temporary function: {e}");
        a.batch_execute("DROP FUNCTION pg_temp.a_fn(); CREATE TYPE pg_temp.a_mood AS ENUM ('a')")
            .expect("temp type");
        expect_backend(pg, pa, "attached", Some("temporary object"));
        assert_eq!(one(a, "SELECT 'a'::pg_temp.a_mood::text"), "a");
        a.batch_execute("DROP TYPE pg_temp.a_mood").expect("drop type");
        expect_backend(pg, pa, "parked", None);
        no_trace_on(
            pg,
            pa,
            b,
            c,
            "SELECT (SELECT count(*) FROM pg_proc WHERE pronamespace = pg_my_temp_schema()) \
               + (SELECT count(*) FROM pg_type WHERE typnamespace = pg_my_temp_schema())",
            "0",
        );
    });
}

#[test]
fn pinned_by_session_advisory_lock() {
    pinned(Transport::Plain, pinned_by_session_advisory_lock_body);
}

#[test]
fn pinned_by_session_advisory_lock_over_tls() {
    pinned(Transport::tls(), pinned_by_session_advisory_lock_body);
}

fn pinned_by_session_advisory_lock_body(pg: &Cluster, a: &mut Client, b: &mut Client, c: &mut Client) {
    a.batch_execute("SELECT pg_advisory_lock(4242)").expect("lock");
    let pa = pid_of(a);
    expect_backend(pg, pa, "attached", Some("session-level lock"));
    for _ in 0..3 {
        assert_ne!(pid_of(b), pa);
        assert_eq!(one(b, "SELECT pg_try_advisory_lock(4242)"), "f", "B got A's lock");
        assert_eq!(pid_of(a), pa);
    }
    let held: i64 = admin_i64(
        pg,
        &format!("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND pid = {pa}"),
    );
    assert_eq!(held, 1, "A's lock belongs to A's backend");
    // A transaction-level lock ends with the transaction: no pin.
    b.batch_execute("SELECT pg_advisory_xact_lock(99)").expect("xact lock");
    expect_backend(pg, pid_of(b), "parked", None);
    assert_eq!(one(a, "SELECT pg_advisory_unlock(4242)"), "t");
    expect_backend(pg, pa, "parked", None);
    assert_eq!(one(b, "SELECT pg_try_advisory_lock(4242)"), "t", "the lock is free");
    assert_eq!(one(b, "SELECT pg_advisory_unlock(4242)"), "t");
    no_trace_on(
        pg,
        pa,
        b,
        c,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        "0",
    );
}

/// A pinned client that leaves: its lock, temp table and LISTEN go with it,
/// and the pool keeps serving with at most two backends.
#[test]
fn pinned_client_leaves_nothing_behind() {
    pinned(Transport::Plain, pinned_client_leaves_nothing_behind_body);
}

#[test]
fn pinned_client_leaves_nothing_behind_over_tls() {
    pinned(Transport::tls(), pinned_client_leaves_nothing_behind_body);
}

fn pinned_client_leaves_nothing_behind_body(pg: &Cluster, a: &mut Client, b: &mut Client, c: &mut Client) {
    a.batch_execute(
        "SELECT pg_advisory_lock(4343); CREATE TEMP TABLE gone (x int); LISTEN gone_chan",
    )
    .expect("pin");
    let pa = pid_of(a);
    expect_backend(pg, pa, "attached", Some("LISTEN"));
    // Replace A by a fresh client: the old one is dropped (Terminate).
    *a = pg.tcp("app", "postgres").connect().expect("a again");
    assert!(
        wait_until(SETTLE, || {
            let got = one(b, "SELECT pg_try_advisory_lock(4343)") == "t";
            if got {
                one(b, "SELECT pg_advisory_unlock(4343)");
            }
            got
        }),
        "A left, but its session-level lock is still held"
    );
    // The cleanup commits just after the lock is released (DISCARD ALL
    // releases advisory locks before it drops temp tables), as a direct
    // session's exit does: wait for it, bounded.
    for cl in [a, b, c] {
        let q = "SELECT concat_ws('|', (SELECT count(*) FROM pg_class WHERE relname = 'gone'),
                        (SELECT count(*) FROM pg_listening_channels()))";
        assert!(wait_until(SETTLE, || one(cl, q) == "0|0"), "A left, but {}", one(cl, q));
    }
    assert!(
        admin_i64(pg, "SELECT count(*) FROM nextgres.backends WHERE role = 'app'") <= 2,
        "pool of two"
    );
}

/// A statement dropped and prepared again under the same name in one
/// transaction (`DEALLOCATE q; PREPARE q AS ...`, what an ORM's statement
/// cache does when it replaces an entry) is the new one after the client
/// moves, every time.
#[test]
fn redefined_prepared_statement_follows_its_client() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            a.batch_execute("PREPARE q AS SELECT 0").expect("prepare");
            let mut seen = Vec::new();
            for k in 1..=5 {
                a.batch_execute(&format!("DEALLOCATE q; PREPARE q AS SELECT {k}"))
                    .expect("redefine");
                // B takes the backend: A's session is saved and later restored.
                assert_eq!(pid_of(&mut b), pid_of(&mut a), "one backend");
                pid_of(&mut b);
                seen.push(one(&mut a, "EXECUTE q"));
            }
            assert_eq!(seen, ["1", "2", "3", "4", "5"], "what A's EXECUTE q returned after each redefinition");
        },
    );
}

/// Statements the client closed stay closed after it moves: rust-postgres'
/// `query(&str)` Parses a named statement and Closes it after each call, and
/// a driver that closes a name may Parse the same name again later (which
/// fails with 42P05 if the old one came back).
#[test]
fn closed_statements_stay_closed() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            for i in 0..50i32 {
                let v: i32 = a.query_one("SELECT $1::int", &[&i]).expect("query").get(0);
                assert_eq!(v, i);
                pid_of(&mut b);
            }
            let mut errors = Vec::new();
            let left = maybe(&mut a, "SELECT string_agg(statement, '; ') FROM pg_prepared_statements WHERE NOT from_sql");
            if let Some(left) = left {
                errors.push(format!("statements A closed came back after B used the backend: {left}"));
            }
            for i in 0..20 {
                a.batch_execute(&format!("PREPARE x AS SELECT {i}")).unwrap_or_else(|e| {
                    errors.push(format!("round {i}: PREPARE x: {}", sqlstate(&e)));
                });
                pid_of(&mut b);
                a.batch_execute("DEALLOCATE x").unwrap_or_else(|e| {
                    errors.push(format!("round {i}: DEALLOCATE x: {}", sqlstate(&e)));
                });
                pid_of(&mut b);
            }
            assert!(errors.is_empty(), "{}", errors.join("\n"));
        },
    );
}

/// What a client changes while pinned (settings, prepared statements)
/// travels with it once the pin is gone: with a pool of one, B runs only
/// after A's UNLISTEN, and A then finds its whole session on return.
#[test]
fn state_changed_while_pinned_follows_after_unpin() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            let mut a = pg.tcp("app", "postgres").connect().expect("a");
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            let pa = pid_of(&mut a);
            a.batch_execute("LISTEN a_chan").expect("listen");
            expect_backend(pg, pa, "attached", Some("LISTEN"));
            a.batch_execute("SET work_mem = '33MB'").expect("set");
            a.batch_execute("PREPARE while_pinned AS SELECT 'pinned-prepare'").expect("prepare");
            let st = a.prepare("SELECT 'proto-' || $1::text").expect("protocol prepare");
            a.batch_execute("SET search_path = sa").expect("search_path");
            a.batch_execute("UNLISTEN a_chan").expect("unlisten");
            expect_backend(pg, pa, "parked", None);
            assert_eq!(pid_of(&mut b), pa, "pool of one");
            assert_eq!(one(&mut b, "SELECT current_setting('work_mem')"), "4MB");
            assert_eq!(
                one(&mut a, "SELECT concat_ws('|', current_setting('work_mem'), current_setting('search_path'))"),
                "33MB|sa"
            );
            pid_of(&mut b);
            assert_eq!(one(&mut a, "EXECUTE while_pinned"), "pinned-prepare");
            pid_of(&mut b);
            let v: String = a.query_one(&st, &[&"x"]).expect("protocol statement after unpin").get(0);
            assert_eq!(v, "proto-x");
        },
    );
}

/// After A removed its pinned state: make B and C hold both backends in a
/// transaction, so one of them runs on A's former backend `pa`, and both must
/// see `want` from `probe`.
fn no_trace_on(pg: &Cluster, pa: i32, b: &mut Client, c: &mut Client, probe: &str, want: &str) {
    b.batch_execute("BEGIN").expect("b begin");
    let pb = pid_of(b);
    c.batch_execute("BEGIN").expect("c begin");
    let pc = pid_of(c);
    assert!(
        pb == pa || pc == pa,
        "A's former backend {pa} serves neither B ({pb}) nor C ({pc}); backends: {:?}",
        pg.backend_pids(Some("app"), None)
    );
    assert_eq!(one(b, probe), want, "B on backend {pb}: {probe}");
    assert_eq!(one(c, probe), want, "C on backend {pc}: {probe}");
    b.batch_execute("COMMIT").expect("b commit");
    c.batch_execute("COMMIT").expect("c commit");
}

/// A client killed in the middle of a transaction (socket closed, no
/// Terminate), and one killed while idle with session state: with a pool of
/// one, the next client is served and sees nothing of either: no row, no
/// lock (transaction- or session-level), no setting, no prepared statement.
#[test]
fn killed_clients_leave_nothing_behind() {
    run(
        one_backend(),
        SETUP,
        LIMIT,
        |pg| {
            // Idle, with movable session state.
            let mut raw = raw(pg, "app", "postgres");
            raw.query("SET work_mem = '91MB'").expect("set");
            raw.query("SELECT set_config('myapp.x', 'killed', false)").expect("set_config");
            raw.query("PREPARE killed AS SELECT 1").expect("prepare");
            let idle_pid = Some(raw.value("SELECT pg_backend_pid()"));
            raw.vanish();
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            assert_eq!(
                Some(pid_of(&mut b).to_string()),
                idle_pid,
                "an idle client's disconnect costs no backend"
            );
            assert_eq!(
                one(
                    &mut b,
                    "SELECT concat_ws('|', current_setting('work_mem'),
                            coalesce(nullif(current_setting('myapp.x', true), ''), '<unset>'),
                            (SELECT count(*) FROM pg_prepared_statements))"
                ),
                "4MB|<unset>|0"
            );
            drop(b);

            // In a transaction, holding a row lock, locks and a session SET.
            let mut raw = session_support::raw(pg, "app", "postgres");
            raw.query(
                "BEGIN;
                 INSERT INTO k VALUES (2);
                 SELECT id FROM k WHERE id = 1 FOR UPDATE;
                 SELECT pg_advisory_xact_lock(7);
                 SELECT pg_advisory_lock(8);
                 SET work_mem = '92MB';
                 SELECT set_config('myapp.x', 'killed-in-tx', false);
                 PREPARE killed_tx AS SELECT 2",
            )
            .expect("transaction");
            raw.vanish();
            let mut b = pg.tcp("app", "postgres").connect().expect("b");
            assert_eq!(
                one(
                    &mut b,
                    "SELECT concat_ws('|', (SELECT count(*) FROM k), pg_try_advisory_lock(7),
                            pg_try_advisory_lock(8), current_setting('work_mem'),
                            coalesce(nullif(current_setting('myapp.x', true), ''), '<unset>'),
                            (SELECT count(*) FROM pg_prepared_statements))"
                ),
                "1|t|t|4MB|<unset>|0"
            );
            b.batch_execute("SELECT pg_advisory_unlock_all()").expect("unlock");
            let mut tx = b.transaction().expect("begin");
            tx.batch_execute("SELECT id FROM k WHERE id = 1 FOR UPDATE NOWAIT")
                .expect("the killed client's row lock is gone");
            tx.commit().expect("commit");
        },
    );
}

// ---- raw protocol: named statements, ParameterStatus ------------------------

/// Two raw protocol clients of role app (trust), A and B.
fn raw_pair(pg: &Cluster) -> (nextgres_test::raw::Raw, nextgres_test::raw::Raw) {
    let raw = || nextgres_test::raw::Raw::connect(pg.port(), "app", "postgres", SETTLE);
    (raw(), raw())
}

/// A protocol message as a client sends it: type byte, length, body.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    [&[tag][..], &((body.len() + 4) as i32).to_be_bytes(), body].concat()
}

/// One use of statement `name` over the extended protocol: Parse (when `sql`
/// is given), Bind, Execute, Sync. The first column of each row.
fn raw_named(r: &mut nextgres_test::raw::Raw, name: &str, sql: Option<&str>) -> Vec<String> {
    raw_named_bytes(r, name.as_bytes(), sql)
}

/// [`raw_named`] with a name of bytes in the client's encoding.
fn raw_named_bytes(r: &mut nextgres_test::raw::Raw, name: &[u8], sql: Option<&str>) -> Vec<String> {
    use std::io::Write;
    let mut out = Vec::new();
    if let Some(sql) = sql {
        out.extend(msg(b'P', &[name, b"\0", sql.as_bytes(), b"\0\0\0"].concat()));
    }
    out.extend(msg(b'B', &[b"\0", name, b"\0\0\0\0\0\0\0"].concat()));
    out.extend(msg(b'E', b"\0\0\0\0\0"));
    out.extend(msg(b'S', b""));
    r.s.write_all(&out).expect("extended protocol messages");
    let rows = r.until_ready().unwrap_or_else(|e| panic!("statement {}: {e:?}", String::from_utf8_lossy(name)));
    rows.into_iter().map(|row| row.into_iter().next().flatten().unwrap_or_default()).collect()
}

/// A statement named in bytes that are not ASCII, by a client whose
/// client_encoding (LATIN1) is not the database's (UTF8): the server reads
/// the name in the database encoding, and so does the pooled backend that
/// creates the statement for the client after a switch. Before, the name
/// was looked up as sent, not found, and the client got 26000.
#[test]
fn a_statement_named_in_the_clients_encoding_follows_it() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        let (mut a, mut b) = raw_pair(pg);
        a.query("SET client_encoding = 'LATIN1'").expect("latin1");
        let name = b"caf\xe9";
        assert_eq!(raw_named_bytes(&mut a, name, Some("SELECT 'one'")), vec!["one"]);
        for i in 0..3 {
            b.query(&format!("SET work_mem = '{}MB'", 3 + i)).expect("B uses the backend");
            assert_eq!(raw_named_bytes(&mut a, name, None), vec!["one"], "use {i} after a switch");
        }
        assert_eq!(a.value("SELECT count(*) FROM pg_prepared_statements WHERE octet_length(name) = 5"), "1");
    });
}

/// Runs `sql` (simple protocol); the ParameterStatus messages that came
/// with its answer, as (name, value).
fn raw_reports(r: &mut nextgres_test::raw::Raw, sql: &str) -> Vec<(String, String)> {
    r.send_query(sql);
    let mut got = Vec::new();
    loop {
        let (tag, body) = r.read_msg().unwrap_or_else(|e| panic!("{sql}: {e}"));
        match tag {
            b'S' => {
                let mut it = body.split(|b| *b == 0).map(|f| String::from_utf8_lossy(f).into_owned());
                got.push((it.next().unwrap_or_default(), it.next().unwrap_or_default()));
            }
            b'E' => panic!("{sql}: {:?}", nextgres_test::raw::parse_error(&body)),
            b'Z' => return got,
            _ => {}
        }
    }
}

/// A client is told (ParameterStatus) every reported setting it changes,
/// whatever the backend told the client it served before: B's SET
/// standard_conforming_strings = off, on the backend that had told A off,
/// reaches B as on a direct connection, and so does B's RESET. Before, the
/// backend compared B's new value with what it had told A, sent nothing, and
/// libpq went on escaping B's strings for `on` (a backslash then ends the
/// literal: SQL injection; hunt5-C 2). Also a client's setseed() decides
/// nothing of another client's random() (hunt5-A F8): with one backend, B's
/// values after A's setseed(0.5) are not the ones setseed(0.5) gives.
#[test]
fn parameter_status_and_random_seeds_are_each_clients_own() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        let (mut a, mut b) = raw_pair(pg);
        let scs = |got: &[(String, String)]| {
            got.iter().filter(|(n, _)| n == "standard_conforming_strings").map(|(_, v)| v.clone()).collect::<Vec<_>>()
        };
        assert_eq!(scs(&raw_reports(&mut a, "SET standard_conforming_strings = off")), ["off"], "A's own SET");
        assert_eq!(scs(&raw_reports(&mut b, "SET standard_conforming_strings = off")), ["off"], "B's SET after A's turn");
        assert_eq!(a.value("SELECT pg_backend_pid()"), b.value("SELECT pg_backend_pid()"), "one backend");
        assert_eq!(scs(&raw_reports(&mut a, "RESET standard_conforming_strings")), ["on"], "A's RESET");
        assert_eq!(scs(&raw_reports(&mut b, "RESET standard_conforming_strings")), ["on"], "B's RESET after A's");
        // No report where the client was told the value already (a direct
        // connection sends none either), after another client's turns.
        raw_reports(&mut a, "SET DateStyle = 'SQL, DMY'");
        let quiet = raw_reports(&mut b, "SELECT 1");
        assert!(quiet.iter().all(|(n, _)| n != "DateStyle"), "B was told A's DateStyle: {quiet:?}");

        // setseed(0.5)'s sequence, on a direct connection.
        let mut admin = pg.admin();
        admin.batch_execute("SELECT setseed(0.5)").expect("setseed");
        let seeded: Vec<String> = (0..3)
            .map(|_| admin.query_one("SELECT (random() * 1e9)::int8::text", &[]).expect("random").get::<_, String>(0))
            .collect();
        raw_reports(&mut a, "SELECT setseed(0.5)");
        let of_b: Vec<String> = (0..3).map(|_| b.value("SELECT (random() * 1e9)::int8::text")).collect();
        assert_ne!(of_b, seeded, "B's random() follows A's setseed(0.5)");
    });
}

/// What each client was told (ParameterStatus) of DateStyle, IntervalStyle
/// and TimeZone is what its session runs under, whichever clients the one
/// backend served in between, as on a direct connection, where a changed
/// value is reported at the client's next query: after a reload changed
/// them (every client is told, not only the first the backend served
/// afterwards; hunt11b 2), and after an `ALTER ROLE ... SET` between a
/// client's login and its first query, whose session takes the new default
/// (hunt11b 3). Before, the other clients kept the old values, and psycopg
/// read `04/03/2024` as 3 April under `SQL, DMY`. No report is sent twice.
#[test]
fn every_client_is_told_what_its_session_runs() {
    told_what_it_runs(one_backend());
}

/// [`every_client_is_told_what_its_session_runs`] through the pooler's
/// hand-over alone (the kernel queue keeps the image in its slot instead),
/// each transaction handed over: a client handed back to the backend that
/// served it last gets no image, and keeps what it was told there.
#[test]
fn every_client_is_told_what_its_session_runs_without_the_kernel_queue() {
    told_what_it_runs(one_backend().conf("nextgres.kernel_queue = off").conf("nextgres.hold_idle_clients = off"));
}

fn told_what_it_runs(builder: nextgres_test::Builder) {
    run(builder, SETUP, LIMIT, |pg| {
        use nextgres_test::raw::Raw;
        const NAMES: [&str; 3] = ["DateStyle", "IntervalStyle", "TimeZone"];
        let look = "SELECT current_setting('DateStyle'), current_setting('IntervalStyle'), current_setting('TimeZone')";
        // The values the session runs under, checked against what the
        // client was told by the end of the same query's answer.
        let told_right = |r: &mut Raw, who: &str| -> Vec<Option<String>> {
            let now = r.query(look).unwrap_or_else(|e| panic!("{who}: {e:?}")).remove(0);
            let told: Vec<Option<String>> = NAMES.iter().map(|n| r.params.get(*n).cloned()).collect();
            assert_eq!(told, now, "{who}: told (left) and running (right) differ");
            now
        };
        // Until the one backend has read the reload (its SIGHUP is handled
        // at its next command), through client `r`.
        let until_running = |r: &mut Raw, date_style: &str| {
            let t0 = std::time::Instant::now();
            while r.value("SELECT current_setting('DateStyle')") != date_style {
                assert!(t0.elapsed() < SETTLE, "the reload never reached the backend");
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let (mut a, mut b) = raw_pair(pg);
        told_right(&mut b, "B before");
        told_right(&mut a, "A before");
        // A again on the backend it left (no switch), told of its own SET.
        raw_reports(&mut a, "SET application_name = 'a'");
        told_right(&mut a, "A again");
        let mut admin = pg.admin();
        // Each its own statement: ALTER SYSTEM refuses a transaction block.
        for sql in ["ALTER SYSTEM SET DateStyle = 'SQL, DMY'", "ALTER SYSTEM SET IntervalStyle = 'sql_standard'", "SELECT pg_reload_conf()"] {
            admin.batch_execute(sql).expect(sql);
        }
        until_running(&mut b, "SQL, DMY");
        assert_eq!(told_right(&mut b, "B after the reload")[..2], [Some("SQL, DMY".into()), Some("sql_standard".into())]);
        told_right(&mut a, "A after the reload, B told first");
        assert_eq!(a.value("SELECT pg_backend_pid()"), b.value("SELECT pg_backend_pid()"), "one backend");
        for sql in ["ALTER SYSTEM RESET ALL", "SELECT pg_reload_conf()"] {
            admin.batch_execute(sql).expect(sql);
        }
        until_running(&mut a, "ISO, MDY");
        told_right(&mut a, "A after the second reload");
        told_right(&mut b, "B after the second reload, A told first");

        // A reload while the backend runs nothing, then a client logging in
        // after the pooler read it: told the new DateStyle at its login, and
        // not again at its first query (the backend reads the reload before
        // the switch, not after it; the client before it had the same role
        // defaults, whose switch would have read it anyway).
        for sql in ["ALTER SYSTEM SET DateStyle = 'German'", "SELECT pg_reload_conf()"] {
            admin.batch_execute(sql).expect(sql);
        }
        let t0 = std::time::Instant::now();
        let mut d = loop {
            let d = Raw::connect(pg.port(), "app", "postgres", SETTLE);
            if d.params.get("DateStyle").map(String::as_str) == Some("German, DMY") {
                break d;
            }
            assert!(t0.elapsed() < SETTLE, "logins never told the reloaded DateStyle");
            std::thread::sleep(Duration::from_millis(50));
        };
        let first = raw_reports(&mut d, "SELECT 1");
        assert!(first.is_empty(), "D was told again at its first query: {first:?}");
        told_right(&mut d, "D");
        told_right(&mut a, "A after D");
        told_right(&mut b, "B after D");

        // Logged in, then the role's default changes before any query.
        let mut c = Raw::connect(pg.port(), "app", "postgres", SETTLE);
        admin.batch_execute("ALTER ROLE app SET TimeZone = 'Asia/Tokyo'").expect("ALTER ROLE");
        let now = told_right(&mut c, "C's first query");
        told_right(&mut a, "A after C");
        admin.batch_execute("ALTER ROLE app RESET TimeZone").expect("ALTER ROLE RESET");
        told_right(&mut c, "C again");
        // Told once: nothing is reported again to a client that has it.
        for (r, who) in [(&mut a, "A"), (&mut b, "B"), (&mut c, "C"), (&mut d, "D")] {
            let again = raw_reports(r, "SELECT 1");
            assert!(again.is_empty(), "{who} was told again: {again:?} (C runs {now:?})");
        }
    });
}

/// A client whose client_encoding is not the database's is told a
/// non-ASCII reported value (its role name, `session_authorization`) in its
/// own encoding: by its first query (the pooler's login sends the database
/// encoding's bytes; directly the login converts them), and never again
/// once it has it, whatever encoding it sets later. Before, what it was told
/// was kept as the bytes it received, and a client that then set another
/// client_encoding was told its role name again after each switch (hunt12
/// review 3).
#[test]
fn a_client_of_another_encoding_is_told_its_values_once() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        use nextgres_test::raw::Raw;
        pg.admin().batch_execute("CREATE ROLE \"j\u{fc}rgen\" LOGIN").expect("role");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port()));
        let login = |encoding: &str| {
            let s = std::net::TcpStream::connect_timeout(&addr, SETTLE).expect("connect");
            Raw::login_with(s, &[("user", "j\u{fc}rgen"), ("database", "postgres"), ("client_encoding", encoding)], SETTLE)
        };
        // Both of the role's pool, whose one backend they share.
        let (mut l, mut b) = (login("LATIN1"), login("UTF8"));
        b.query("SELECT 1").expect("B");
        l.query("SELECT 1").expect("L's first query");
        // LATIN1's byte for ü is not UTF-8: read back lossily.
        assert_eq!(l.params.get("session_authorization").map(String::as_str), Some("j\u{fffd}rgen"), "told in LATIN1");
        l.query("SET client_encoding = 'UTF8'").expect("SET");
        for round in 0..2 {
            b.query("SELECT 1").expect("B");
            let again = raw_reports(&mut l, "SELECT 1");
            assert!(again.is_empty(), "round {round}: L was told again: {again:?}");
        }
        assert_eq!(l.value("SELECT pg_backend_pid()"), b.value("SELECT pg_backend_pid()"), "one backend");
        assert_eq!(l.value("SELECT current_user"), "j\u{fc}rgen");
    });
}

/// A backend keeps a statement it has for the next client that has the same
/// one (same name, text, types) only where the statement cannot differ: not
/// one prepared after a setting changed, even one set back since (A's
/// statement, analyzed under A's TimeZone, gave B another instant; hunt5-A
/// F0b), and never an SQL-level PREPARE, whose plan source holds the whole
/// query string the previous client sent with it (B read A's literal
/// through pg_prepared_statements; hunt5-A F0).
#[test]
fn a_statement_kept_for_the_next_client_is_never_another_clients() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        let (mut a, mut b) = raw_pair(pg);
        let q = "SELECT extract(epoch FROM '2024-01-01 00:00'::timestamptz)::text";
        let mine = raw_named(&mut b, "S_1", Some(q));
        a.query("SET TimeZone = 'Asia/Tokyo'").expect("SET");
        let tokyo = raw_named(&mut a, "S_1", Some(q));
        assert_ne!(tokyo, mine, "the literal's instant depends on TimeZone");
        a.query("RESET TimeZone").expect("RESET");
        assert_eq!(a.value("SELECT pg_backend_pid()"), b.value("SELECT pg_backend_pid()"), "one backend");
        for _ in 0..2 {
            assert_eq!(raw_named(&mut b, "S_1", None), mine, "B's statement after A's turn");
            raw_named(&mut a, "S_1", None);
        }

        let look = "SELECT statement FROM pg_prepared_statements WHERE name = 'ins'";
        b.query("PREPARE ins(text) AS SELECT $1; EXECUTE ins('B-data')").expect("B's PREPARE");
        a.query("PREPARE ins(text) AS SELECT $1; EXECUTE ins('A-secret')").expect("A's PREPARE");
        let seen = b.value(look);
        assert!(!seen.contains("A-secret"), "B sees A's query string: {seen}");
        assert_eq!(b.query("EXECUTE ins('again')").expect("B's EXECUTE")[0][0].as_deref(), Some("again"));
    });
}

/// A setting only a connection's start may set (PGC_BACKEND:
/// ignore_system_indexes, post_auth_delay), sent in one client's startup
/// packet, is that client's alone: the next client of its backend runs with
/// the backend's own value (here postgresql.conf's post_auth_delay), which
/// RESET ALL keeps. Before, the backend kept the first client's values for
/// every later client, RESET ALL and DISCARD ALL included: one client could
/// make all of its pool's catalog lookups sequential scans (hunt5-B 4).
#[test]
fn backend_start_settings_of_one_client_are_never_anothers() {
    run(one_backend().conf("post_auth_delay = 0"), SETUP, LIMIT, |pg| {
        use nextgres_test::raw::Raw;
        let look = "SELECT current_setting('ignore_system_indexes') || ' ' || current_setting('post_auth_delay')";
        let connect = |options: Option<&str>| {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port()));
            let s = std::net::TcpStream::connect_timeout(&addr, SETTLE).expect("connect");
            let mut params = vec![("user", "app"), ("database", "postgres")];
            if let Some(o) = options {
                params.push(("options", o));
            }
            Raw::login_with(s, &params, SETTLE)
        };
        let mut x = connect(Some("-c ignore_system_indexes=on -c post_auth_delay=1"));
        let mut y = connect(None);
        assert_eq!(x.value(look), "on 1s", "X's own startup settings");
        for _ in 0..2 {
            assert_eq!(y.value(look), "off 0", "Y after X's turn on the one backend");
            y.query("RESET ALL").expect("RESET ALL");
            assert_eq!(y.value(look), "off 0", "Y after RESET ALL");
            assert_eq!(x.value(look), "on 1s", "X again");
        }
        assert_eq!(x.value("SELECT pg_backend_pid()"), y.value("SELECT pg_backend_pid()"), "one backend");
        drop(x);
        let mut z = connect(None);
        assert_eq!(z.value(look), "off 0", "a client after X left");
    });
}

/// pg_prepared_statements read through a view or an inlined SQL function
/// lists every statement of the client after a switch, as directly. Before,
/// only a query whose own text named pg_prepared_statements made the
/// statements not created on the new backend yet show (hunt5-A F4).
#[test]
fn prepared_statements_read_through_a_view_after_a_switch() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        pg.admin()
            .batch_execute(
                "CREATE VIEW public.my_ps AS SELECT name FROM pg_prepared_statements;
                 CREATE FUNCTION public.my_ps_f() RETURNS SETOF text LANGUAGE sql STABLE
                     AS 'SELECT name::text FROM pg_prepared_statements';
                 GRANT SELECT ON public.my_ps TO PUBLIC;",
            )
            .expect("view and function");
        let steps = |a: &mut Client, b: &mut Client| -> Vec<String> {
            a.batch_execute("PREPARE a1 AS SELECT 1; PREPARE a2 AS SELECT 2").expect("prepare");
            let mut seen = Vec::new();
            for probe in ["SELECT string_agg(name, ',' ORDER BY name) FROM public.my_ps", "SELECT string_agg(n, ',' ORDER BY n) FROM public.my_ps_f() n"] {
                b.batch_execute("SET work_mem = '3MB'").expect("B uses the backend");
                seen.push(one(a, probe));
            }
            a.batch_execute("DEALLOCATE ALL").expect("deallocate");
            seen
        };
        let (direct, pooled) = direct_then_pooled(pg, "app", |a, b, _| steps(a, b));
        assert_eq!(direct, vec!["a1,a2", "a1,a2"], "direct");
        assert_eq!(pooled, direct, "pooled");
    });
}

/// A prepared statement's literals keep the values its PREPARE or Parse gave
/// them, whatever the client sets later, as directly: a statement created
/// again on another backend is analyzed there under the settings its last
/// analysis ran under (DateStyle, TimeZone, transform_null_equals and
/// IntervalStyle here),
/// and the client's own settings are back right after. With a pool of one,
/// every turn of A after B's creates A's statements again, so the second
/// round also moves statements that were created and used on the backend.
/// Before, a moved statement read its literals under the client's settings
/// of its first use there: another instant, another date (hunt5-A F3,
/// hunt5-C 4).
#[test]
fn a_moved_statement_keeps_the_literal_values_of_its_prepare() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        const Q: &str = "SELECT '2020-01-01 00:00'::timestamptz::text || ' ' || '01/02/2020'::date::text || ' ' \
            || coalesce((NULL::int = NULL)::text, 'null') || ' ' || extract(epoch FROM '-1 2:00:00'::interval)::text";
        let steps = |a: &mut Client, b: &mut Client| -> Vec<String> {
            let mut seen = Vec::new();
            // Prepared at the login's settings, used after a SET.
            a.batch_execute(&format!("PREPARE at_login AS {Q}")).expect("PREPARE at_login");
            a.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, DMY'; SET transform_null_equals = on; SET IntervalStyle = sql_standard").expect("SET");
            a.batch_execute(&format!("PREPARE sq AS {Q}")).expect("PREPARE sq");
            // A Parse the server refuses leaves the next one's settings right.
            assert!(a.prepare("SELEC 1").is_err(), "syntax error");
            let st = a.prepare(Q).expect("Parse");
            // A SET in the PREPARE's own query string comes after its analysis.
            a.batch_execute(&format!("PREPARE same_string AS {Q}; SET DateStyle = 'ISO, YMD'")).expect("PREPARE, SET");
            a.batch_execute("SET TimeZone = 'America/New_York'; SET DateStyle = 'ISO, MDY'; RESET transform_null_equals; RESET IntervalStyle").expect("SET again");
            for round in 0..2 {
                b.batch_execute("SELECT 1").expect("B uses the backend");
                for name in ["at_login", "sq", "same_string"] {
                    seen.push(format!("{round} {name}: {}", one(a, &format!("EXECUTE {name}"))));
                }
                let row = a.query_one(&st, &[]).expect("protocol statement");
                seen.push(format!("{round} parsed: {}", row.get::<_, String>(0)));
                seen.push(format!("{round} now: {}", one(a, &format!("SELECT current_setting('TimeZone') || ' ' || current_setting('DateStyle') || ' ' || current_setting('transform_null_equals') || ' ' || ({Q})"))));
            }
            seen
        };
        let (direct, pooled) = direct_then_pooled(pg, "app", |a, b, _| steps(a, b));
        // The server keeps the PREPARE's constants (the test's premise).
        assert!(direct.iter().any(|l| l == "0 sq: 2019-12-31 19:00:00-05 2020-02-01 true -93600.000000"), "direct: {direct:?}");
        assert_eq!(pooled, direct);
    });
}

/// A statement invalidated since its analysis is analyzed again, directly,
/// under the settings of that moment: after a move too. Here `k` gains a
/// column before the move, or a schema is created after the move and before
/// the statement's first use (the server then resets every cached
/// statement). Before, the statement kept its PREPARE's DateStyle (hunt7 F1).
#[test]
fn a_statement_invalidated_before_its_first_use_after_a_move_follows_the_settings_of_then() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        const Q: &str = "SELECT '01/02/2020'::date::text || ' ' || count(*)::text FROM sa.inv";
        session_support::exec(pg, "CREATE TABLE sa.inv (id int); INSERT INTO sa.inv VALUES (1); ALTER TABLE sa.inv OWNER TO app; GRANT CREATE ON DATABASE postgres TO app");
        let steps = |a: &mut Client, b: &mut Client| -> Vec<String> {
            let mut seen = Vec::new();
            a.batch_execute("SET DateStyle = 'ISO, DMY'").expect("SET");
            a.batch_execute(&format!("PREPARE before_move AS {Q}; PREPARE after_move AS {Q}; PREPARE kept AS {Q}")).expect("PREPARE");
            let st = a.prepare(Q).expect("Parse");
            a.batch_execute("SET DateStyle = 'ISO, MDY'").expect("SET again");
            // Invalidates them all before the move (as the client's own DDL).
            a.batch_execute("ALTER TABLE sa.inv ADD COLUMN note text").expect("ALTER");
            b.batch_execute("SELECT 1").expect("B uses the backend");
            seen.push(format!("before_move: {}", one(a, "EXECUTE before_move")));
            seen.push(format!("parsed: {}", a.query_one(&st, &[]).expect("protocol").get::<_, String>(0)));
            // Analyzed again (under MDY) and moved again: the settings of that analysis.
            b.batch_execute("SELECT 1").expect("B uses the backend");
            seen.push(format!("before_move again: {}", one(a, "EXECUTE before_move")));
            a.batch_execute("SET DateStyle = 'ISO, DMY'").expect("SET back");
            b.batch_execute("SELECT 1").expect("B uses the backend");
            seen.push(format!("before_move under DMY: {}", one(a, "EXECUTE before_move")));
            a.batch_execute("SET DateStyle = 'ISO, YMD'; PREPARE fresh AS SELECT '01/02/03'::date::text; SET DateStyle = 'ISO, MDY'").expect("PREPARE fresh");
            // At the login's settings (it carries none), used after a SET.
            a.batch_execute("PREPARE plain AS SELECT '01/02/03'::date::text").expect("PREPARE plain");
            b.batch_execute("SELECT 1").expect("B uses the backend");
            // After the move, before its first use: every cached statement reset.
            a.batch_execute("CREATE SCHEMA resets_plans").expect("CREATE SCHEMA");
            seen.push(format!("after a schema: {}", one(a, "EXECUTE fresh")));
            a.batch_execute("SET DateStyle = 'ISO, YMD'").expect("YMD");
            seen.push(format!("plain after a schema: {}", one(a, "EXECUTE plain")));
            a.batch_execute("DROP SCHEMA resets_plans; ALTER TABLE sa.inv DROP COLUMN note; DEALLOCATE ALL").expect("undo");
            seen
        };
        let (direct, pooled) = direct_then_pooled(pg, "app", |a, b, _| steps(a, b));
        assert_eq!(direct[0], "before_move: 2020-01-02 1", "direct: {direct:?}");
        assert_eq!(pooled, direct);
    });
}

/// A statement whose search_path changed since its analysis is analyzed
/// again, directly, under the settings of that moment (the plan cache
/// compares the path): after a move too. Before, it kept its PREPARE's
/// DateStyle (hunt8 G2).
#[test]
fn a_statement_whose_search_path_changed_follows_the_settings_of_then() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        const Q: &str = "SELECT '01/02/2020'::date::text || ' ' || (SELECT min(v) FROM t)";
        let steps = |a: &mut Client, b: &mut Client| -> Vec<String> {
            a.batch_execute(&format!("SET DateStyle = 'ISO, DMY'; PREPARE sp AS {Q}")).expect("PREPARE");
            let st = a.prepare(Q).expect("Parse");
            a.batch_execute("SET DateStyle = 'ISO, MDY'; SET search_path = sa, public").expect("SET");
            b.batch_execute("SELECT 1").expect("B uses the backend");
            let sql = one(a, "EXECUTE sp");
            let parsed: String = a.query_one(&st, &[]).expect("protocol").get(0);
            a.batch_execute("DEALLOCATE ALL").expect("DEALLOCATE");
            vec![sql, parsed]
        };
        let (direct, pooled) = direct_then_pooled(pg, "app", |a, b, _| steps(a, b));
        assert_eq!(direct[0], "2020-01-02 sa", "direct: {direct:?}");
        assert_eq!(pooled, direct);
    });
}

/// psycopg 3 can send its pipeline's Flush in a write of its own after the
/// Sync: arriving after the ReadyForQuery let the client go, it wakes the
/// idle client, and nothing answers a Flush. The client is let go again,
/// and the pool's other client is served. Before, it kept the pool's one
/// backend until its next message (53400 for the other; hunt8 G3).
#[test]
fn a_lone_flush_after_the_ready_for_query_keeps_no_backend() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        use std::io::Write;
        let (mut a, mut b) = raw_pair(pg);
        for round in 0..3 {
            assert_eq!(a.value("SELECT 'a'"), "a", "round {round}");
            std::thread::sleep(Duration::from_millis(300));
            a.s.write_all(b"H\0\0\0\x04").expect("Flush");
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(b.value("SELECT 'b served'"), "b served", "round {round}");
        }
        assert_eq!(a.value("SELECT 'a again'"), "a again");
    });
}

/// A COPY FROM STDIN that fails on a bad row: the server ignores the rest of
/// the client's CopyData and its CopyDone or CopyFail (sent with the bad row,
/// or after the ReadyForQuery) and answers nothing, so no ReadyForQuery
/// marks the client's boundary. The client is let go once they are read,
/// the pool's other client is served, and the client goes on. Before, the
/// idle client kept the pool's one backend until its next message (53400
/// for the other; psql's `\copy` of a file with a bad line, psycopg 3,
/// asyncpg; hunt11b 1).
#[test]
fn a_failed_copy_from_stdin_keeps_no_backend() {
    failed_copy_keeps_no_backend(one_backend());
}

/// The same without the kernel queue: the pooler hands the client out.
#[test]
fn a_failed_copy_from_stdin_keeps_no_backend_without_the_kernel_queue() {
    failed_copy_keeps_no_backend(one_backend().conf("nextgres.kernel_queue = off"));
}

fn failed_copy_keeps_no_backend(builder: nextgres_test::Builder) {
    run(builder, SETUP, LIMIT, |pg| {
        use std::io::Write;
        let (mut a, mut b) = raw_pair(pg);
        let mut copy = b"COPY k FROM STDIN".to_vec();
        copy.push(0);
        for round in 0..3 {
            // The rest of the data and its end in the same write as the bad row.
            a.s.write_all(&[msg(b'Q', &copy), msg(b'd', b"2001\n"), msg(b'd', b"bad\n"), msg(b'd', b"2003\n"), msg(b'c', b"")].concat())
                .expect("COPY");
            let e = a.until_ready().expect_err("a bad row");
            assert!(matches!(&e, nextgres_test::raw::RawFail::Db { code, .. } if code == "22P02"), "round {round}: {e:?}");
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(b.value("SELECT 'b served'"), "b served", "round {round}, after the failed COPY");
            // A CopyFail that comes after the ReadyForQuery.
            a.s.write_all(&[msg(b'Q', &copy), msg(b'd', b"bad\n")].concat()).expect("COPY");
            a.until_ready().expect_err("a bad row");
            std::thread::sleep(Duration::from_millis(300));
            a.s.write_all(&msg(b'f', b"given up\0")).expect("CopyFail");
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(b.value("SELECT 'b served again'"), "b served again", "round {round}, after a late CopyFail");
        }
        assert_eq!(a.value("SELECT count(*) FROM k WHERE id > 2000"), "0");
        assert_eq!(a.value("SELECT 'a again'"), "a again");
    });
}

/// A cycle that prepared the unnamed statement and bound none (Parse "",
/// Describe, Sync) keeps the client on its backend for its next
/// transaction, also when a lone Flush follows its ReadyForQuery: the
/// boundary that Flush makes ran nothing, and the pin holds there as it
/// did at the ReadyForQuery (while nobody waits; README). Found by review
/// of the failed-COPY change, whose first form let the client go there
/// (its Bind then failed with 26000 once another client used the backend).
#[test]
fn a_flush_after_an_unbound_parse_keeps_the_client_for_its_bind() {
    unbound_parse_keeps_the_client(one_backend().conf("nextgres.hold_idle_clients = off").conf("nextgres.kernel_queue = off"));
}

/// [`a_flush_after_an_unbound_parse_keeps_the_client_for_its_bind`] through
/// the kernel queue, where a backend keeps such a client outside the queue:
/// with nobody waiting it keeps it past `sequence_hold`. Before, the client
/// went back to the queue after that hold (50 ms) whether anyone waited or
/// not, and its Bind failed with 26000; the other client, which queues
/// while the first is kept, is still served.
#[test]
fn a_flush_after_an_unbound_parse_keeps_the_client_for_its_bind_through_the_kernel_queue() {
    unbound_parse_keeps_the_client(one_backend().conf("nextgres.hold_idle_clients = off"));
}

fn unbound_parse_keeps_the_client(builder: nextgres_test::Builder) {
    run(builder, SETUP, LIMIT, |pg| {
        use std::io::Write;
        let (mut a, mut b) = raw_pair(pg);
        let state = |port: i32| -> String {
            pg.admin().query_one("SELECT state FROM nextgres.clients WHERE client_port = $1", &[&port]).expect("clients").get(0)
        };
        for round in 0..2 {
            a.s.write_all(&[msg(b'P', b"\0SELECT 42\0\0\0"), msg(b'D', b"S\0"), msg(b'S', b"")].concat()).expect("P/D/S");
            a.until_ready().expect("prepared");
            std::thread::sleep(Duration::from_millis(200));
            a.s.write_all(&msg(b'H', b"")).expect("Flush");
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(state(a.local_port()), "active", "round {round}: kept on its backend for the Bind that follows");
            a.s.write_all(&[msg(b'B', b"\0\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat()).expect("B/E/S");
            let rows = a.until_ready().expect("Bind of the unnamed statement");
            assert_eq!(rows.first().and_then(|row| row[0].clone()).as_deref(), Some("42"), "round {round}");
            assert_eq!(b.value("SELECT 'b'"), "b", "round {round}");
        }
        // Kept with its statement unbound, A gives the backend up for B,
        // who waits for it (after `sequence_hold`).
        a.s.write_all(&[msg(b'P', b"\0SELECT 42\0\0\0"), msg(b'D', b"S\0"), msg(b'S', b"")].concat()).expect("P/D/S");
        a.until_ready().expect("prepared");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(state(a.local_port()), "active", "kept on its backend");
        assert_eq!(b.value("SELECT 'b while a was kept'"), "b while a was kept");
        assert_eq!(a.value("SELECT 'a after b'"), "a after b");
    });
}

/// A named statement prepared in a pipeline after a failed one and a
/// Query the server skipped (it reads on to the next Sync after an
/// extended-protocol error, and that Query's unnamed Parse with it) moves
/// with its client. Before, the backend's watch on Parse names stayed a
/// cycle behind, took the named statement's ParseComplete for the skipped
/// unnamed one, and left it out of the client's image: its Bind failed
/// with 26000 once the client moved (hunt12a F1).
#[test]
fn a_statement_after_a_skipped_query_moves_with_its_client() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        use std::io::Write;
        let (mut a, mut b) = raw_pair(pg);
        a.s.write_all(
            &[
                msg(b'P', b"bad\0selec x\0\0\0"),
                msg(b'Q', b"SELECT 1\0"),
                msg(b'P', b"\0SELECT 5\0\0\0"),
                msg(b'S', b""),
                msg(b'P', b"stmt_a\0SELECT 13\0\0\0"),
                msg(b'S', b""),
            ]
            .concat(),
        )
        .expect("pipeline");
        let e = a.until_ready().expect_err("the bad Parse");
        assert!(matches!(&e, nextgres_test::raw::RawFail::Db { code, .. } if code == "42601"), "{e:?}");
        a.until_ready().expect("stmt_a prepared");
        let before = a.value("SELECT pg_backend_pid()");
        assert_eq!(b.value("SELECT 'b'"), "b");
        // A new backend, which has only what the client's image says.
        let mut admin = pg.admin();
        admin.batch_execute("SELECT nextgres.reconnect('postgres', 'app')").expect("nextgres.reconnect");
        let gone: bool = admin
            .query_one("SELECT nextgres.wait_close('postgres', 'app', $1)", &[&(SETTLE.as_secs() as i32)])
            .expect("nextgres.wait_close")
            .get(0);
        assert!(gone, "the pool's backend was not replaced within {SETTLE:?}");
        assert_eq!(raw_named(&mut a, "stmt_a", None), vec!["13"], "stmt_a on a new backend");
        assert_ne!(a.value("SELECT pg_backend_pid()"), before, "a new backend");
    });
}

/// `nextgres.backends.pinned_by` names what keeps a client on its backend
/// only while it does: a client that leaves holding sequence values (or an
/// unbound statement) leaves its backend parked with no reason shown, and
/// the next client it serves is not shown as kept for that reason. Before,
/// the backend went on showing `sequence value` (hunt12a F4).
#[test]
fn a_short_pin_is_not_shown_after_its_client_left() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        let mut admin = pg.admin();
        admin.batch_execute("CREATE SEQUENCE shown_seq; GRANT USAGE ON shown_seq TO app").expect("sequence");
        let shown = |admin: &mut Client| -> Vec<Option<String>> {
            admin
                .query("SELECT pinned_by FROM nextgres.backends WHERE role = 'app'", &[])
                .expect("backends")
                .iter()
                .map(|r| r.get(0))
                .collect()
        };
        let (mut a, _b) = raw_pair(pg);
        a.value("SELECT nextval('shown_seq')::text");
        // Shown from the boundary, which follows the ReadyForQuery's flush.
        let kept = wait_until(SETTLE, || shown(&mut admin) == [Some("sequence value".to_string())]);
        assert!(kept, "not shown as kept for its sequence value: {:?}", shown(&mut admin));
        a.send_terminate();
        let parked = wait_until(SETTLE, || {
            admin
                .query_one("SELECT count(*) FROM nextgres.backends WHERE role = 'app' AND state = 'parked'", &[])
                .expect("backends")
                .get::<_, i64>(0)
                == 1
        });
        assert!(parked, "the backend did not park");
        assert_eq!(shown(&mut admin), [None], "parked, nothing keeps it");
    });
}

/// A client whose `application_name` is longer than a name (63 bytes)
/// runs under the cut value and gets no NOTICE at its statements, whichever
/// clients its backend served in between, as on a direct connection (which
/// says it once, at the login). Before, each switch to it set the whole
/// value again and the server sent NOTICE 42622 ("will be truncated") with
/// nearly every statement (hunt12b 1).
#[test]
fn a_long_application_name_gives_no_notice_at_each_switch() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        use nextgres_test::raw::Raw;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port()));
        let login = |name: &str| {
            let s = std::net::TcpStream::connect_timeout(&addr, SETTLE).expect("connect");
            Raw::login_with(s, &[("user", "app"), ("database", "postgres"), ("application_name", name)], SETTLE)
        };
        let (long_a, long_b) = ("a".repeat(70), "b".repeat(70));
        let (mut a, mut b) = (login(&long_a), login(&long_b));
        let notices = |r: &mut Raw, sql: &str| -> usize {
            r.send_query(sql);
            let mut n = 0;
            loop {
                match r.read_msg().unwrap_or_else(|e| panic!("{sql}: {e}")) {
                    (b'N', _) => n += 1,
                    (b'E', body) => panic!("{sql}: {:?}", nextgres_test::raw::parse_error(&body)),
                    (b'Z', _) => return n,
                    _ => {}
                }
            }
        };
        for round in 0..3 {
            assert_eq!(notices(&mut a, "SELECT 1"), 0, "round {round}: A");
            assert_eq!(notices(&mut b, "SELECT 1"), 0, "round {round}: B");
        }
        assert_eq!(a.value("SELECT current_setting('application_name')"), "a".repeat(63));
        assert_eq!(b.value("SELECT current_setting('application_name')"), "b".repeat(63));
        assert_eq!(a.value("SELECT pg_backend_pid()"), b.value("SELECT pg_backend_pid()"), "one backend");
    });
}

/// A login event trigger (17+) that sets a reported setting adds no second
/// value of it to a pooled login's ParameterStatus: each name comes once,
/// and the trigger's value is reported at the client's first query, where
/// its trigger fires (README). Before, the pool's first backend's login
/// listed the trigger's report too, and every client of the pool was told
/// TimeZone twice, both times the login's value (hunt12b 2).
#[test]
fn a_login_trigger_names_no_setting_twice_at_a_login() {
    if nextgres_test::pg_major() < 17 {
        eprintln!("login event triggers need PostgreSQL 17");
        return;
    }
    run(one_backend(), SETUP, LIMIT, |pg| {
        use std::io::Write;
        let mut admin = pg.admin();
        for sql in [
            "CREATE FUNCTION tz_login() RETURNS event_trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM set_config('TimeZone', 'Asia/Kolkata', false); END $$",
            "CREATE EVENT TRIGGER tz_login ON login EXECUTE FUNCTION tz_login()",
        ] {
            admin.batch_execute(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        }
        // The pool's first backend logs in now, with the trigger.
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port()));
        for who in ["first", "second"] {
            let mut s = std::net::TcpStream::connect_timeout(&addr, SETTLE).expect("connect");
            s.set_read_timeout(Some(SETTLE)).expect("timeout");
            s.write_all(&nextgres_test::raw::startup_packet("app", "postgres")).expect("startup");
            let mut names = Vec::new();
            loop {
                let (tag, body) = nextgres_test::raw::read_message(&mut s).expect("login");
                match tag {
                    b'S' => names.push(String::from_utf8_lossy(body.split(|&b| b == 0).next().unwrap_or_default()).into_owned()),
                    b'E' => panic!("{who}: {:?}", nextgres_test::raw::parse_error(&body)),
                    b'Z' => break,
                    _ => {}
                }
            }
            let mut seen = BTreeSet::new();
            let twice: Vec<&String> = names.iter().filter(|n| !seen.insert(n.as_str())).collect();
            assert!(twice.is_empty(), "{who} login: named twice: {twice:?}");
        }
        let mut c = nextgres_test::raw::Raw::connect(pg.port(), "app", "postgres", SETTLE);
        assert_eq!(c.value("SELECT current_setting('TimeZone')"), "Asia/Kolkata", "the trigger ran");
        assert_eq!(c.params.get("TimeZone").map(String::as_str), Some("Asia/Kolkata"), "told at the first query");
    });
}

/// libpq's COPY FROM STDIN over the extended protocol sends a Sync the
/// server ignores (it reads copy data then) and one more after CopyDone:
/// a Parse after it still keeps its own settings when it moves. Before,
/// the ignored Sync put the watch on Parse messages out of step until the
/// next attach, and the statement took the settings of its release
/// (hunt7 F3).
#[test]
fn a_parse_after_an_extended_protocol_copy_keeps_its_settings() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        use std::io::Write;
        let (mut a, mut b) = raw_pair(pg);
        a.query("SET DateStyle = 'ISO, DMY'").expect("DMY");
        // All in one write, as one client's pipeline: the COPY (libpq's
        // messages, a Sync before the data), then a Parse, then a SET before
        // the backend can let the client go.
        let mut q = b"SET DateStyle = 'ISO, MDY'".to_vec();
        q.push(0);
        a.s.write_all(
            &[
                msg(b'P', b"\0COPY k FROM STDIN\0\0\0"),
                msg(b'B', b"\0\0\0\0\0\0\0\0"),
                msg(b'E', b"\0\0\0\0\0"),
                msg(b'S', b""),
                msg(b'd', b"1001\n"),
                msg(b'c', b""),
                msg(b'S', b""),
                msg(b'P', b"after_copy\0SELECT '01/02/2020'::date::text\0\0\0"),
                msg(b'B', b"\0after_copy\0\0\0\0\0\0\0"),
                msg(b'E', b"\0\0\0\0\0"),
                msg(b'S', b""),
                msg(b'Q', &q),
            ]
            .concat(),
        )
        .expect("COPY, Parse, SET");
        a.until_ready().expect("COPY done");
        assert_eq!(a.until_ready().expect("parsed"), [[Some("2020-02-01".to_string())]]);
        a.until_ready().expect("SET");
        b.value("SELECT 'b uses the backend'");
        // Directly, the statement keeps its Parse's constant.
        assert_eq!(raw_named(&mut a, "after_copy", None), ["2020-02-01"]);
        a.query("DELETE FROM k WHERE id = 1001").expect("clean up");
    });
}

/// psycopg 3's pipeline mode ends with Sync then Flush: the Flush arrives
/// after the ReadyForQuery, buffered on the backend. It asks for nothing
/// left to send, so the idle client leaves its backend as any other, and
/// the pool's other client is served. Before, the buffered Flush kept the
/// idle client on the pool's one backend: the other client waited until
/// `query_wait_timeout` (53400; hunt7 F8).
#[test]
fn a_flush_after_the_sync_keeps_no_idle_client_on_its_backend() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        use std::io::Write;
        let (mut a, mut b) = raw_pair(pg);
        let pipeline = [
            msg(b'P', b"\0SELECT 41 + 1\0\0\0"),
            msg(b'B', b"\0\0\0\0\0\0\0\0"),
            msg(b'E', b"\0\0\0\0\0"),
            msg(b'S', b""),
            msg(b'H', b""),
        ]
        .concat();
        for round in 0..3 {
            a.s.write_all(&pipeline).expect("pipeline");
            assert_eq!(a.until_ready().expect("pipeline answered"), [[Some("42".to_string())]], "round {round}");
            // A idles; B needs the pool's one backend.
            assert_eq!(b.value("SELECT 'b served'"), "b served", "round {round}");
        }
        assert_eq!(a.value("SELECT 'a again'"), "a again");
    });
}

/// Protocol statements `EXECUTE sq(1)` of an SQL-level statement `sq`,
/// all created at once on a new backend (a query naming
/// pg_prepared_statements), keep the result columns the client was told
/// at its Parse, as directly: such a statement is never revalidated.
/// Before, one created ahead of `sq` (the table's hash order) got no result
/// columns (`result_types` NULL, Describe answered NoData), and carried
/// that on (hunt5-A F1).
#[test]
fn statements_created_at_once_keep_their_result_columns() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        let steps = |a: &mut Client, b: &mut Client| -> Vec<String> {
            a.batch_execute("PREPARE sq(int) AS SELECT $1::text AS t, 5 AS five").expect("SQL PREPARE");
            let st: Vec<Statement> = (0..8).map(|_| a.prepare("EXECUTE sq(1)").expect("protocol EXECUTE statement")).collect();
            b.batch_execute("SET work_mem = '3MB'").expect("B uses the backend");
            // result_types is 16's; before, the count makes them all.
            let listing = if one(a, "SELECT current_setting('server_version_num')::int >= 160000") == "t" {
                "SELECT (name = 'sq')::text || ' ' || coalesce(result_types::text, 'NULL') FROM pg_prepared_statements ORDER BY 1"
            } else {
                "SELECT count(*)::text FROM pg_prepared_statements"
            };
            let mut seen: Vec<String> = a.query(listing, &[]).expect("pg_prepared_statements").iter().map(|r| r.get(0)).collect();
            for s in &st {
                let again = a.prepare("EXECUTE sq(2)").expect("described again");
                seen.push(format!("{} columns, again {}", s.columns().len(), again.columns().len()));
                let rows = a.query(s, &[]).expect("execute");
                seen.push(format!("{:?}", rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()));
            }
            seen
        };
        let (direct, pooled) = direct_then_pooled(pg, "app", |a, b, _| steps(a, b));
        assert!(direct.iter().all(|l| !l.contains("NULL")), "direct: {direct:?}");
        assert_eq!(pooled, direct);
    });
}

/// A statement the client still has that its new backend cannot create at
/// its first use (here a prepared SHOW first used inside a failed
/// transaction, whose analysis reads the catalogs) stays the client's: used
/// again after the ROLLBACK it answers, as directly. Before, the failed
/// creation dropped it from the client's session for good: 26000 at every
/// later use (hunt5-A F2).
#[test]
fn a_statement_that_could_not_be_created_yet_is_not_lost() {
    run(one_backend(), SETUP, LIMIT, |pg| {
        let (mut a, mut b) = raw_pair(pg);
        let want: String = pg.admin().query_one("SHOW work_mem", &[]).expect("SHOW").get(0);
        assert_eq!(raw_named(&mut b, "s_show", Some("SHOW work_mem")), [want.clone()]);
        a.value("SELECT 1");
        assert!(b.query("BEGIN; SELECT 1/0").is_err(), "division by zero");
        {
            use std::io::Write;
            // Bind/Execute/Sync of s_show inside the failed transaction: an
            // error either way (25P02 directly).
                let out = [msg(b'B', b"\0s_show\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
            b.s.write_all(&out).expect("bind in a failed transaction");
            assert!(b.until_ready().is_err(), "s_show inside a failed transaction");
        }
        b.query("ROLLBACK").expect("ROLLBACK");
        for _ in 0..2 {
            assert_eq!(raw_named(&mut b, "s_show", None), [want.clone()], "s_show after the ROLLBACK");
            a.value("SELECT 1");
        }
    });
}

/// A client whose transaction called nextval() keeps its backend for its
/// next transaction that runs a statement (lastval() and currval() answer
/// there); a DEALLOCATE in between runs nothing and does not use that up:
/// PHP PDO deallocates a statement object destroyed between its INSERT and
/// lastInsertId(). Before, the DEALLOCATE used it up, the waiting client got
/// the backend, and the lastval() failed with 55000 (hunt5-C 3).
#[test]
fn a_deallocate_between_nextval_and_lastval_keeps_the_sequence_values() {
    run(one_backend().conf("nextgres.sequence_hold = 20000"), SETUP, LIMIT, |pg| {
        pg.admin()
            .batch_execute("CREATE TABLE seq_t (id serial PRIMARY KEY, v text); GRANT ALL ON seq_t, seq_t_id_seq TO app")
            .expect("table");
        let (mut a, mut b) = raw_pair(pg);
        b.query("PREPARE ins AS INSERT INTO seq_t (v) VALUES ('b')").expect("PREPARE");
        b.query("EXECUTE ins").expect("INSERT");
        // A waits for the one backend, which B keeps for its sequence value.
        a.send_query("SELECT 'a'");
        assert!(
            wait_until(SETTLE, || admin_i64(pg, "SELECT count(*) FROM nextgres.clients WHERE state = 'waiting'") == 1),
            "A never waited"
        );
        b.query("DEALLOCATE ins").expect("DEALLOCATE");
        let id: i32 = pg.admin().query_one("SELECT max(id) FROM seq_t", &[]).expect("max").get(0);
        assert_eq!(b.value("SELECT lastval()"), id.to_string(), "lastval() after a DEALLOCATE");
        assert_eq!(a.until_ready().expect("A's query")[0][0].as_deref(), Some("a"));
    });
}

/// A driver that prepares the unnamed statement in one request cycle
/// (Parse, Describe, Sync) and binds it in the next (sqlx `persistent(false)`,
/// Go lib/pq, pgx with no statement cache, `PQprepare(conn, "", ...)`) finds
/// it there although another client waits for the one backend: the client
/// keeps its backend for that next transaction (`nextgres.sequence_hold`
/// while others wait), as for a sequence value. Before, the waiting client
/// got the backend and the Bind failed with 26000 under any load (hunt5-C 1).
#[test]
fn the_unnamed_statement_is_there_for_the_next_request_cycle() {
    run(one_backend().conf("nextgres.sequence_hold = 20000"), SETUP, LIMIT, |pg| {
        use std::io::Write;
        let (mut a, mut b) = raw_pair(pg);
        for round in 0..2 {
            let parse = [
                msg(b'P', b"\0SELECT $1::int + 1\0\0\0"),
                msg(b'D', b"S\0"),
                msg(b'S', b""),
            ]
            .concat();
            b.s.write_all(&parse).expect("Parse, Describe, Sync");
            b.until_ready().expect("prepared");
            // A waits for the one backend meanwhile (shown within a look
            // or two of the pooler's; not waited for past SETTLE: without
            // B's hold, A gets the backend at once, and B's Bind shows it).
            a.send_query("SELECT 'a'");
            wait_until(SETTLE, || admin_i64(pg, "SELECT count(*) FROM nextgres.clients WHERE state = 'waiting'") == 1);
            // Bind "" with one text parameter '41', Execute, Sync.
            let bind = [&b"\0\0\0\0\0\x01\0\0\0\x0241"[..], b"\0\0"].concat();
            let run = [msg(b'B', &bind), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
            b.s.write_all(&run).expect("Bind, Execute, Sync");
            let rows = b.until_ready().unwrap_or_else(|e| panic!("round {round}: the unnamed statement: {e:?}"));
            assert_eq!(rows[0][0].as_deref(), Some("42"), "round {round}");
            assert_eq!(a.until_ready().expect("A's query")[0][0].as_deref(), Some("a"));
        }
    });
}
