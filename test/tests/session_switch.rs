//! The session switch between clients with identical startup settings skips
//! DISCARD ALL when the previous client left nothing the trackers saw. These
//! are the ways a session can change without SET, PREPARE or a statement
//! mentioning set_config: each must still stay with its client.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test session_switch -- --test-threads=2
//! ```

use std::sync::Arc;
use std::time::Duration;

use nextgres_test::{Cluster};
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
    run(|pg| {
        let mut a = pg.connect_tcp("app", "postgres", None).unwrap();
        let mut b = pg.connect_tcp("app", "postgres", None).unwrap();
        let pid = value(&mut a, "SELECT pg_backend_pid()");
        assert_eq!(value(&mut b, "SELECT pg_backend_pid()"), pid, "one backend serves both");

        // currval/lastval: a sequence value of one client is not another's.
        // The client keeps its backend for the transaction after its
        // nextval (where currval answers as directly), then moves on.
        let n = value(&mut a, "SELECT nextval('s')");
        assert_eq!(value(&mut a, "SELECT currval('s')"), n, "currval in the next transaction");
        let err = b.simple_query("SELECT currval('s')").expect_err("currval of another client's nextval");
        assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err:?}");

        // set_config in PL/pgSQL simple expressions, in an SQL function the
        // planner would inline, and in a PL/pgSQL function calling it.
        let cases = [
            ("SELECT plpgsql_sets('from-a')", "my.plpgsql"),
            ("SELECT sql_sets('from-a')", "my.sql"),
        ];
        for (call, name) in cases {
            value(&mut a, call);
            assert_eq!(setting(&mut b, name), "", "{call}: another client sees {name}");
            assert_eq!(setting(&mut a, name), "from-a", "{call}: {name} did not follow its client");
        }
        value(&mut a, "SELECT set_config('my.sql', '', false)");
        value(&mut b, "RESET ALL");
        value(&mut a, "SELECT plpgsql_calls('again-a')");
        assert_eq!(setting(&mut b, "my.sql"), "", "nested call: another client sees my.sql");
        assert_eq!(setting(&mut a, "my.sql"), "again-a");
    });
}

/// Identical prepared statements (same name and text) are kept on the
/// backend across clients, and the switch between such clients is the fast
/// one (no DISCARD ALL): the statement's `prepare_time` in
/// pg_prepared_statements, which a DISCARD ALL and re-PREPARE would renew,
/// stays the same over ten alternations. Any difference still gives each
/// client its own statement.
#[test]
fn prepared_statements_stay_per_client() {
    run(|pg| {
        let mut a = pg.connect_tcp("app", "postgres", None).unwrap();
        let mut b = pg.connect_tcp("app", "postgres", None).unwrap();
        value(&mut a, "PREPARE p AS SELECT 'same'");
        value(&mut b, "PREPARE p AS SELECT 'same'");
        let prepared_at = |c: &mut Client| {
            value(c, "SELECT prepare_time::text FROM pg_prepared_statements WHERE name = 'p'")
        };
        assert_eq!(value(&mut a, "EXECUTE p").as_deref(), Some("same"));
        assert_eq!(value(&mut b, "EXECUTE p").as_deref(), Some("same"));
        let first = prepared_at(&mut a);
        assert!(first.is_some(), "no prepared statement p");
        for i in 0..10 {
            assert_eq!(value(&mut a, "EXECUTE p").as_deref(), Some("same"));
            assert_eq!(value(&mut b, "EXECUTE p").as_deref(), Some("same"));
            assert_eq!(prepared_at(&mut a), first, "round {i}: p was re-created for a (a full switch)");
            assert_eq!(prepared_at(&mut b), first, "round {i}: p was re-created for b (a full switch)");
        }
        value(&mut b, "DEALLOCATE p");
        assert_eq!(value(&mut a, "EXECUTE p").as_deref(), Some("same"));
        let err = b.simple_query("EXECUTE p").expect_err("a deallocated statement");
        assert_eq!(err.code().map(|c| c.code()), Some("26000"), "{err:?}");
        value(&mut b, "PREPARE p AS SELECT 'b'");
        for _ in 0..10 {
            assert_eq!(value(&mut a, "EXECUTE p").as_deref(), Some("same"));
            assert_eq!(value(&mut b, "EXECUTE p").as_deref(), Some("b"));
        }
        assert_eq!(value(&mut a, "SELECT count(*) FROM pg_prepared_statements").as_deref(), Some("1"));
    });
}

/// Two clients with the same startup settings and no SET, sharing one
/// backend, whose statements differ in part: the statement both have alike
/// (`same`) is kept across every switch (same prepare_time: no DISCARD ALL),
/// while each client still has exactly its own others (`p` with its own
/// text, `only_a` / `only_b`) and never the other's (26000), as directly.
#[test]
fn differing_statements_dropped_alike_kept() {
    run(|pg| {
        let mut a = pg.connect_tcp("app", "postgres", None).unwrap();
        let mut b = pg.connect_tcp("app", "postgres", None).unwrap();
        for (c, who) in [(&mut a, "a"), (&mut b, "b")] {
            value(c, "PREPARE same AS SELECT 'same'");
            value(c, &format!("PREPARE p AS SELECT '{who}'"));
            value(c, &format!("PREPARE only_{who} AS SELECT 'only {who}'"));
        }
        let names = "SELECT string_agg(name, ',' ORDER BY name) FROM pg_prepared_statements";
        let prepared_at = |c: &mut Client| value(c, "SELECT prepare_time::text FROM pg_prepared_statements WHERE name = 'same'");
        assert_eq!(value(&mut a, "EXECUTE same").as_deref(), Some("same"));
        let first = prepared_at(&mut a);
        assert!(first.is_some(), "no prepared statement same");
        for i in 0..10 {
            for (c, who, other) in [(&mut a, "a", "b"), (&mut b, "b", "a")] {
                assert_eq!(value(c, "EXECUTE same").as_deref(), Some("same"));
                assert_eq!(value(c, "EXECUTE p"), Some(who.to_string()), "round {i}");
                assert_eq!(value(c, &format!("EXECUTE only_{who}")), Some(format!("only {who}")));
                let err = c.simple_query(&format!("EXECUTE only_{other}")).expect_err("the other client's statement");
                assert_eq!(err.code().map(|c| c.code()), Some("26000"), "round {i}, {who}: {err:?}");
                assert_eq!(value(c, names), Some(format!("only_{who},p,same")), "round {i}, {who}");
                assert_eq!(prepared_at(c), first, "round {i}, {who}: same was re-created (a full switch)");
            }
        }
    });
}
