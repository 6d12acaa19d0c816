//! The session switch between clients with identical startup settings skips
//! DISCARD ALL when the previous client left nothing the trackers saw. These
//! are the ways a session can change without SET, PREPARE or a statement
//! mentioning set_config: each must still stay with its client. The tests
//! with rust-postgres clients also run with both clients on TLS
//! (`*_over_tls`, `sslmode=require`; skipped with the reason printed on 16).
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test session_switch -- --test-threads=2
//! ```

use std::sync::Arc;
use std::time::Duration;

use nextgres_test::tls::{transport_ready, Transport};
use nextgres_test::{wait_until, Cluster};
use postgres::{Client, SimpleQueryMessage};

const TEST_LIMIT: Duration = Duration::from_secs(120);

fn run(body: impl FnOnce(&Cluster) + Send + 'static) {
    let pg = Arc::new(Cluster::builder().conf("nextgres.pool_size = 1").start());
    pg.admin()
        .batch_execute(
            "CREATE EXTENSION nextgres;
             CREATE ROLE app LOGIN;
             CREATE SEQUENCE s;
             GRANT USAGE ON SEQUENCE s TO app;
             CREATE FUNCTION plpgsql_sets(v text) RETURNS void LANGUAGE plpgsql AS $$
             DECLARE x text;
             BEGIN
               x := set_config('my.plpgsql', v, false);
             END $$;
             CREATE FUNCTION sql_sets(v text) RETURNS text LANGUAGE sql AS
               $$ SELECT set_config('my.sql', v, false) $$;
             CREATE FUNCTION plpgsql_calls(v text) RETURNS void LANGUAGE plpgsql AS $$
             DECLARE x text;
             BEGIN
               x := sql_sets(v);
             END $$;",
        )
        .unwrap();
    pg.run_bounded(TEST_LIMIT, body);
}

/// [`run`] with the test's two clients coming in over `transport`: for TLS
/// the server gets `ssl = on` first (skipped with the reason printed on 16,
/// which has no OpenSSL), and both clients must show in nextgres.clients
/// with their TLS version.
fn run_over(transport: Transport, body: impl FnOnce(&Cluster, &mut Client, &mut Client) + Send + 'static) {
    run(move |pg| {
        let settle = Duration::from_secs(30);
        let Some(t) = transport_ready(pg, transport, "app", "postgres", settle) else { return };
        let mut a = t.connect(pg.tcp("app", "postgres").config()).expect("client a");
        let mut b = t.connect(pg.tcp("app", "postgres").config()).expect("client b");
        let want = if t.is_tls() { "2/2" } else { "2/0" };
        let count = || -> String {
            pg.admin()
                .query_one("SELECT count(*) || '/' || count(tls) FROM nextgres.clients", &[])
                .expect("nextgres.clients")
                .get(0)
        };
        assert!(wait_until(settle, || count() == want), "clients / on TLS: {} where {want} expected", count());
        body(pg, &mut a, &mut b);
    });
}

fn value(c: &mut Client, sql: &str) -> Option<String> {
    let msgs = c.simple_query(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    msgs.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
        _ => None,
    })?
}

/// A custom setting as a client sees it ('' and NULL both mean unset).
fn setting(c: &mut Client, name: &str) -> String {
    value(c, &format!("SELECT current_setting('{name}', true)")).unwrap_or_default()
}

#[test]
fn state_changed_without_set_stays_with_its_client() {
    run_over(Transport::Plain, state_changed_without_set_stays_with_its_client_body);
}

/// [`state_changed_without_set_stays_with_its_client`] with both clients on TLS.
#[test]
fn state_changed_without_set_stays_with_its_client_over_tls() {
    run_over(Transport::tls(), state_changed_without_set_stays_with_its_client_body);
}

fn state_changed_without_set_stays_with_its_client_body(_pg: &Cluster, a: &mut Client, b: &mut Client) {
    let pid = value(a, "SELECT pg_backend_pid()");
    assert_eq!(value(b, "SELECT pg_backend_pid()"), pid, "one backend serves both");

    // currval/lastval: a sequence value of one client is not another's.
    // The client keeps its backend for the transaction after its
    // nextval (where currval answers as directly), then moves on.
    let n = value(a, "SELECT nextval('s')");
    assert_eq!(value(a, "SELECT currval('s')"), n, "currval in the next transaction");
    let err = b.simple_query("SELECT currval('s')").expect_err("currval of another client's nextval");
    assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err:?}");

    // set_config in PL/pgSQL simple expressions, in an SQL function the
    // planner would inline, and in a PL/pgSQL function calling it.
    let cases = [
        ("SELECT plpgsql_sets('from-a')", "my.plpgsql"),
        ("SELECT sql_sets('from-a')", "my.sql"),
    ];
    for (call, name) in cases {
        value(a, call);
        assert_eq!(setting(b, name), "", "{call}: another client sees {name}");
        assert_eq!(setting(a, name), "from-a", "{call}: {name} did not follow its client");
    }
    value(a, "SELECT set_config('my.sql', '', false)");
    value(b, "RESET ALL");
    value(a, "SELECT plpgsql_calls('again-a')");
    assert_eq!(setting(b, "my.sql"), "", "nested call: another client sees my.sql");
    assert_eq!(setting(a, "my.sql"), "again-a");
}

/// Identical prepared statements (same name and text) are kept on the
/// backend across clients, and the switch between such clients is the fast
/// one (no DISCARD ALL): the statement's `prepare_time` in
/// pg_prepared_statements, which a DISCARD ALL and re-PREPARE would renew,
/// stays the same over ten alternations. Any difference still gives each
/// client its own statement.
#[test]
fn prepared_statements_stay_per_client() {
    run_over(Transport::Plain, prepared_statements_stay_per_client_body);
}

/// [`prepared_statements_stay_per_client`] with both clients on TLS.
#[test]
fn prepared_statements_stay_per_client_over_tls() {
    run_over(Transport::tls(), prepared_statements_stay_per_client_body);
}

fn prepared_statements_stay_per_client_body(_pg: &Cluster, a: &mut Client, b: &mut Client) {
    value(a, "PREPARE p AS SELECT 'same'");
    value(b, "PREPARE p AS SELECT 'same'");
    let prepared_at = |c: &mut Client| {
        value(c, "SELECT prepare_time::text FROM pg_prepared_statements WHERE name = 'p'")
    };
    assert_eq!(value(a, "EXECUTE p").as_deref(), Some("same"));
    assert_eq!(value(b, "EXECUTE p").as_deref(), Some("same"));
    let first = prepared_at(a);
    assert!(first.is_some(), "no prepared statement p");
    for i in 0..10 {
        assert_eq!(value(a, "EXECUTE p").as_deref(), Some("same"));
        assert_eq!(value(b, "EXECUTE p").as_deref(), Some("same"));
        assert_eq!(prepared_at(a), first, "round {i}: p was re-created for a (a full switch)");
        assert_eq!(prepared_at(b), first, "round {i}: p was re-created for b (a full switch)");
    }
    value(b, "DEALLOCATE p");
    assert_eq!(value(a, "EXECUTE p").as_deref(), Some("same"));
    let err = b.simple_query("EXECUTE p").expect_err("a deallocated statement");
    assert_eq!(err.code().map(|c| c.code()), Some("26000"), "{err:?}");
    value(b, "PREPARE p AS SELECT 'b'");
    for _ in 0..10 {
        assert_eq!(value(a, "EXECUTE p").as_deref(), Some("same"));
        assert_eq!(value(b, "EXECUTE p").as_deref(), Some("b"));
    }
    assert_eq!(value(a, "SELECT count(*) FROM pg_prepared_statements").as_deref(), Some("1"));
}

/// Two clients with the same startup settings and no SET, sharing one
/// backend, whose statements differ in part: the statement both have alike
/// (`same`) is kept across every switch (same prepare_time: no DISCARD ALL),
/// while each client still has exactly its own others (`p` with its own
/// text, `only_a` / `only_b`) and never the other's (26000), as directly.
#[test]
fn differing_statements_dropped_alike_kept() {
    run_over(Transport::Plain, differing_statements_dropped_alike_kept_body);
}

/// [`differing_statements_dropped_alike_kept`] with both clients on TLS.
#[test]
fn differing_statements_dropped_alike_kept_over_tls() {
    run_over(Transport::tls(), differing_statements_dropped_alike_kept_body);
}

fn differing_statements_dropped_alike_kept_body(_pg: &Cluster, a: &mut Client, b: &mut Client) {
    for (c, who) in [(&mut *a, "a"), (&mut *b, "b")] {
        value(c, "PREPARE same AS SELECT 'same'");
        value(c, &format!("PREPARE p AS SELECT '{who}'"));
        value(c, &format!("PREPARE only_{who} AS SELECT 'only {who}'"));
    }
    let names = "SELECT string_agg(name, ',' ORDER BY name) FROM pg_prepared_statements";
    let prepared_at = |c: &mut Client| value(c, "SELECT prepare_time::text FROM pg_prepared_statements WHERE name = 'same'");
    assert_eq!(value(a, "EXECUTE same").as_deref(), Some("same"));
    let first = prepared_at(a);
    assert!(first.is_some(), "no prepared statement same");
    for i in 0..10 {
        for (c, who, other) in [(&mut *a, "a", "b"), (&mut *b, "b", "a")] {
            assert_eq!(value(c, "EXECUTE same").as_deref(), Some("same"));
            assert_eq!(value(c, "EXECUTE p"), Some(who.to_string()), "round {i}");
            assert_eq!(value(c, &format!("EXECUTE only_{who}")), Some(format!("only {who}")));
            let err = c.simple_query(&format!("EXECUTE only_{other}")).expect_err("the other client's statement");
            assert_eq!(err.code().map(|c| c.code()), Some("26000"), "round {i}, {who}: {err:?}");
            assert_eq!(value(c, names), Some(format!("only_{who},p,same")), "round {i}, {who}");
            assert_eq!(prepared_at(c), first, "round {i}, {who}: same was re-created (a full switch)");
        }
    }
}

/// A statement or its error code, for comparing with a direct connection.
fn outcome(c: &mut Client, sql: &str) -> String {
    match c.simple_query(sql) {
        Ok(msgs) => msgs
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
                _ => None,
            })
            .unwrap_or_default(),
        Err(e) => format!("ERROR {}", e.code().map(|c| c.code()).unwrap_or("?")),
    }
}

/// A LATIN1 database: statement names and texts are held in the database
/// encoding (here a Latin-1 byte, not UTF-8). Two clients with the same
/// startup settings take turns on one backend; each sees exactly its own
/// statements, as on two direct connections (Unix socket).
#[test]
fn non_utf8_statements_stay_per_client() {
    run(|pg| {
        pg.admin()
            .batch_execute("CREATE DATABASE latin ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
            .unwrap();
        let scenario = |pooled: bool| {
            let connect = || {
                if pooled { pg.connect_tcp("app", "latin", None) } else { pg.connect_unix("app", "latin", None) }.unwrap()
            };
            let (mut a, mut b) = (connect(), connect());
            let names = "SELECT coalesce(string_agg(name, ',' ORDER BY name), '') FROM pg_prepared_statements";
            let mut out = Vec::new();
            out.push(outcome(&mut a, "PREPARE a AS SELECT 1"));
            out.push(outcome(&mut a, "EXECUTE a"));
            out.push(outcome(&mut b, "SELECT 1"));
            out.push(outcome(&mut a, "PREPARE s AS SELECT 'é'"));
            out.push(outcome(&mut a, "PREPARE \"é\" AS SELECT 'é' || 'x'"));
            for _ in 0..5 {
                out.push(outcome(&mut a, "EXECUTE s"));
                out.push(outcome(&mut a, "EXECUTE \"é\""));
                out.push(outcome(&mut b, "EXECUTE s"));
                out.push(outcome(&mut b, "EXECUTE \"é\""));
                out.push(outcome(&mut b, names));
                out.push(outcome(&mut a, names));
            }
            out
        };
        let direct = scenario(false);
        let pooled = scenario(true);
        assert_eq!(pooled, direct, "pooled vs direct");
        assert!(direct.iter().any(|s| s == "é"), "{direct:?}");
    });
}

/// Protocol message helpers for the Describe comparisons below.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn parse_msg(name: &str, text: &str, oids: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in [name, text] {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }
    b.extend_from_slice(&(oids.len() as u16).to_be_bytes());
    for o in oids {
        b.extend_from_slice(&o.to_be_bytes());
    }
    msg(b'P', &b)
}

fn describe_msg(name: &str) -> Vec<u8> {
    let mut b = vec![b'S'];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    msg(b'D', &b)
}

/// Sends `msgs` then Sync; what came back up to ReadyForQuery, one string
/// per message (ParameterDescription and RowDescription in full, an error
/// by its SQLSTATE).
fn exchange(raw: &mut nextgres_test::raw::Raw, msgs: &[Vec<u8>]) -> Vec<String> {
    use std::io::Write;
    let mut out: Vec<u8> = msgs.concat();
    out.extend_from_slice(&msg(b'S', &[]));
    raw.s.write_all(&out).unwrap();
    let mut got = Vec::new();
    loop {
        let (tag, body) = raw.read_msg().unwrap();
        match tag {
            b'E' => got.push(format!("E {:?}", nextgres_test::raw::parse_error(&body))),
            b'Z' => return got,
            // Table OIDs differ between servers: compare names, types, sizes.
            b'T' => {
                let mut s = String::from("T");
                let mut p = 2;
                while p < body.len() {
                    let nul = body[p..].iter().position(|&c| c == 0).unwrap();
                    s += &format!(" {}:{:?}", String::from_utf8_lossy(&body[p..p + nul]), &body[p + nul + 1 + 6..p + nul + 1 + 18]);
                    p += nul + 1 + 18;
                }
                got.push(s);
            }
            _ => got.push(format!("{} {:?}", tag as char, body)),
        }
    }
}

/// Light switch between two raw clients with the same startup settings:
/// the same statement name and text, but different parameter types (Parse
/// with OIDs) or a different result (prepared under another search_path,
/// then RESET); each client's Describe answers exactly as on a direct
/// connection of a server without nextgres.
#[test]
fn alike_text_other_types_or_shape_described_as_directly() {
    run(|pg| {
        let setup = "CREATE SCHEMA s1; CREATE SCHEMA s2;
                     CREATE TABLE s1.t (a int); CREATE TABLE s2.t (b text, c bigint);
                     GRANT USAGE ON SCHEMA s1, s2 TO app; GRANT SELECT ON s1.t, s2.t TO app";
        pg.admin().batch_execute(setup).unwrap();
        let direct = Cluster::builder().preload(false).listen_addresses("127.0.0.1").start();
        direct.admin().batch_execute(&format!("CREATE ROLE app LOGIN; {setup}")).unwrap();
        let scenario = |port: u16| {
            let limit = Duration::from_secs(60);
            let mut a = nextgres_test::raw::Raw::connect(port, "app", "postgres", limit);
            let mut b = nextgres_test::raw::Raw::connect(port, "app", "postgres", limit);
            let mut out = Vec::new();
            out.extend(exchange(&mut a, &[parse_msg("p", "SELECT $1", &[23]), describe_msg("p")]));
            out.extend(exchange(&mut b, &[parse_msg("p", "SELECT $1", &[20]), describe_msg("p")]));
            a.query("SET search_path = s1").unwrap();
            out.extend(exchange(&mut a, &[parse_msg("q", "SELECT * FROM t", &[]), describe_msg("q")]));
            a.query("RESET search_path").unwrap();
            b.query("SET search_path = s2").unwrap();
            out.extend(exchange(&mut b, &[parse_msg("q", "SELECT * FROM t", &[]), describe_msg("q")]));
            b.query("RESET search_path").unwrap();
            for _ in 0..4 {
                for c in [&mut a, &mut b] {
                    out.extend(exchange(c, &[describe_msg("p"), describe_msg("q")]));
                    out.push(format!("{:?}", c.query("SELECT name, parameter_types::text FROM pg_prepared_statements ORDER BY 1")));
                }
            }
            out
        };
        let want = scenario(direct.port());
        let got = scenario(pg.port());
        assert_eq!(got, want, "pooled vs direct");
    });
}

/// A client whose prepared statements take more than 1 MiB (400 statements
/// of about 4 kB each, as a driver's statement cache of long queries)
/// moves between backends with all of them: the control messages that
/// carry them (RELEASED, ATTACH) are not capped at 1 MiB.
#[test]
fn statements_over_a_mebibyte_move_with_their_client() {
    run(|pg| {
        let mut a = pg.connect_tcp("app", "postgres", None).unwrap();
        let mut b = pg.connect_tcp("app", "postgres", None).unwrap();
        let pad = "x".repeat(4000);
        for i in 0..400 {
            value(&mut a, &format!("PREPARE s{i} AS SELECT {i} AS n /* {pad} */"));
        }
        let total = "SELECT sum(length(statement))::text FROM pg_prepared_statements";
        assert!(value(&mut a, total).unwrap().parse::<u64>().unwrap() > 1 << 20);
        for round in 0..3 {
            // b takes the only backend in between: a's statements travel.
            value(&mut b, "PREPARE mine AS SELECT 'b'");
            assert_eq!(value(&mut b, "SELECT count(*)::text FROM pg_prepared_statements").as_deref(), Some("1"));
            for i in [0, 199, 399] {
                assert_eq!(value(&mut a, &format!("EXECUTE s{i}")), Some(i.to_string()), "round {round}");
            }
            assert_eq!(value(&mut a, "SELECT count(*)::text FROM pg_prepared_statements").as_deref(), Some("400"));
            value(&mut b, "DEALLOCATE mine");
        }
    });
}

/// A client whose statements exceed what the control channel carries
/// (64 MiB) is not dropped without a word: at the transaction's end its
/// backend sends it a FATAL 54000 (program_limit_exceeded), which the
/// client reads with its next statement.
#[test]
fn statements_over_the_control_limit_get_a_fatal_error() {
    run(|pg| {
        let mut a = pg.connect_tcp("app", "postgres", None).unwrap();
        let pad = "x".repeat(1 << 20);
        value(&mut a, "BEGIN");
        for i in 0..66 {
            value(&mut a, &format!("PREPARE s{i} AS SELECT {i} /* {pad} */"));
        }
        value(&mut a, "COMMIT");
        let err = a.simple_query("SELECT 1").expect_err("a session too large to move");
        assert_eq!(err.code().map(|c| c.code()), Some("54000"), "{err:?}");
        let msg = err.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
        assert!(msg.contains("exceed what a pooled client can carry"), "{err:?}");
        // The pool serves the next client as usual.
        let mut b = pg.connect_tcp("app", "postgres", None).unwrap();
        assert_eq!(value(&mut b, "SELECT count(*)::text FROM pg_prepared_statements").as_deref(), Some("0"));
    });
}

/// Review finding: "same client again" must mean the backend served this
/// client last AND the client was last on this backend. pool_size 2,
/// hold_idle_clients off: A sets and prepares on X; B finishes on Y, then A
/// on X (X names A as its last client); the pool is paused and A sends; on
/// resume Y (parked first) goes to A, which changes its SET and PREPARE
/// there; B takes Y back (its last backend) and holds it; A's next
/// statement gets X, which must switch to A's newest state (not keep A's
/// old one): A sees its newest SET value and statement, as the same steps
/// on a direct session.
#[test]
fn client_back_on_an_older_backend_gets_its_newest_state() {
    let pg = Arc::new(
        Cluster::builder()
            .conf("nextgres.pool_size = 2")
            .conf("nextgres.hold_idle_clients = off")
            // The scenario steers which backend serves whom: the handoff
            // path's pooler gives a client its last backend when parked; in
            // the kernel queue (the default) whichever backend wakes
            // takes a client (its own checks are in kernel_queue.rs).
            .conf("nextgres.kernel_queue = off")
            .start(),
    );
    pg.admin().batch_execute("CREATE EXTENSION nextgres; CREATE ROLE app LOGIN;").unwrap();
    pg.run_bounded(TEST_LIMIT, |pg| {
        let bound = Duration::from_secs(30);
        let first = ["SET my.x = 'old'", "PREPARE p AS SELECT 'old'"];
        let later = ["SET my.x = 'new'", "DEALLOCATE p", "PREPARE p AS SELECT 'new'", "PREPARE q AS SELECT 'q'"];
        let checks = ["SELECT current_setting('my.x')", "EXECUTE p", "EXECUTE q"];
        let observe = |c: &mut Client| -> Vec<String> { checks.iter().map(|q| outcome(c, q)).collect() };
        let mut direct = pg.unix("app", "postgres").connect().expect("direct");
        for q in first.iter().chain(later.iter()) {
            value(&mut direct, q);
        }
        let want = observe(&mut direct);
        assert_eq!(want, ["new", "new", "q"]);

        let pools = || -> (i32, i32) {
            pg.admin()
                .query_one("SELECT clients_waiting, backends_parked FROM nextgres.pools WHERE role = 'app'", &[])
                .map(|r| (r.get(0), r.get(1)))
                .unwrap_or((-1, -1))
        };
        let mut a = pg.tcp("app", "postgres").connect().expect("a");
        let mut b = pg.tcp("app", "postgres").connect().expect("b");
        for q in first {
            value(&mut a, q);
        }
        let pid = |c: &mut Client| value(c, "SELECT pg_backend_pid()::text").expect("pid");
        value(&mut a, "BEGIN");
        let x = pid(&mut a);
        value(&mut b, "BEGIN");
        let y = pid(&mut b);
        assert_ne!(x, y);
        value(&mut b, "COMMIT");
        assert!(wait_until(bound, || pools().1 == 1), "Y not parked: {:?}", pools());
        value(&mut a, "COMMIT");
        assert!(wait_until(bound, || pools().1 == 2), "X not parked: {:?}", pools());
        let paused: bool = pg.admin().query_one("SELECT nextgres.pause('postgres')", &[]).expect("pause").get(0);
        assert!(paused);
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                value(&mut a, later[0]);
            });
            assert!(wait_until(bound, || pools().0 == 1), "A not waiting: {:?}", pools());
            let n: i32 = pg.admin().query_one("SELECT nextgres.resume('postgres')", &[]).expect("resume").get(0);
            assert_eq!(n, 1);
            t.join().expect("a's SET");
        });
        // Before each next transaction both backends are parked again: a
        // client's statement that arrives while its last backend is still
        // being given back goes to the other one, which is not this scenario.
        let both_parked = || assert!(wait_until(bound, || pools().1 == 2), "not both parked: {:?}", pools());
        for q in &later[1..] {
            both_parked();
            value(&mut a, q);
        }
        both_parked();
        value(&mut a, "BEGIN");
        assert_eq!(pid(&mut a), y, "A was not moved to Y (scenario not reproduced)");
        value(&mut a, "COMMIT");
        both_parked();
        value(&mut b, "BEGIN");
        assert_eq!(pid(&mut b), y, "B did not get Y back");
        value(&mut a, "BEGIN");
        assert_eq!(pid(&mut a), x, "A not back on X");
        value(&mut a, "COMMIT");
        assert_eq!(observe(&mut a), want, "A on X does not see its newest state");
        value(&mut b, "COMMIT");
    });
}
