//! Pinned clients never starve the pool (issue 13, acceptance 6).
//!
//! A client that pins its session (LISTEN, a session advisory lock, ...)
//! keeps its backend as a dedicated session outside the pool's `pool_size`
//! (up to `nextgres.max_pinned_backends`), so the pool logs in other backends
//! for its other clients. Everything runs through the pooler on the standard
//! port as role `app`, one (postgres, app) pool.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test pinned -- --test-threads=2
//! ```

mod pool_support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use nextgres_test::{parse_summary, wait_until, Cluster};
use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;
use nextgres_test::raw::{Raw, RawFail};
use pool_support::exec;

/// Bound for states the pooler reaches after a client's statement returns
/// (a control message and a loop turn; a janitor tick at worst).
const SETTLE: Duration = Duration::from_secs(10);

/// The pool's size in these tests.
const POOL: usize = 4;

/// Sets the flag when dropped, also when an assertion panics inside a
/// `thread::scope`, so the sampler ends and the scope can unwind.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn pid_of(c: &mut Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[]).expect("pg_backend_pid").get(0)
}

/// Pids of the pool's backends as the server lists them (pg_stat_activity).
fn app_backends(admin: &mut Client) -> Vec<i32> {
    admin
        .query(
            "SELECT pid FROM pg_stat_activity
              WHERE backend_type = 'client backend' AND usename = 'app' AND datname = 'postgres'",
            &[],
        )
        .expect("sampling pg_stat_activity")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn count(admin: &mut Client, sql: &str) -> i64 {
    admin.query_one(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// Notifications already received or arriving within `wait` (payloads).
fn drain(c: &mut Client, wait: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let mut notes = c.notifications();
    let mut it = notes.timeout_iter(wait);
    while let Some(n) = it.next().expect("reading notifications") {
        out.push(n.payload().to_string());
    }
    out
}

fn cluster() -> Cluster {
    let pg = Cluster::builder()
        .conf(format!("nextgres.pool_size = {POOL}"))
        // The old behaviour (a pinned backend counted in pool_size) makes
        // the fifth pinning client wait this long and fail.
        .conf("nextgres.query_wait_timeout = 15")
        .conf("max_connections = 100")
        .start();
    exec(
        &pg,
        "CREATE EXTENSION nextgres;
         CREATE ROLE app LOGIN;
         GRANT CREATE ON SCHEMA public TO app",
    );
    pg
}

/// pool_size 4: twenty clients LISTEN and twenty hold a session advisory
/// lock, all through the one pool. Each of them runs (its pinning statement
/// and later ones), the pool shows forty dedicated backends, and a pgbench
/// run through the same pool meanwhile has no failed transaction while a
/// pg_stat_activity sampler never sees more than 4 backends of the pool
/// that are not a pinned client's (the pinned clients' pids come from
/// pg_backend_pid() in their own sessions, not from nextgres's views).
/// Notifications sent during the run reach every listener. Unpinning
/// (UNLISTEN *, pg_advisory_unlock_all()) gives the backends back: the pool
/// returns to at most 4 backends and every client still runs.
#[test]
fn pinned_clients_leave_pool_size_to_the_others() {
    const LISTENERS: usize = 20;
    const LOCKERS: usize = 20;
    const NOTES: usize = 25;
    let pg = cluster();
    let bench = pg.tcp("app", "postgres");
    pg.pgbench_init(&bench, 1).assert_success();

    let mut listeners: Vec<Client> = Vec::new();
    let mut lockers: Vec<Client> = Vec::new();
    let mut pinned = BTreeSet::new();
    for i in 0..LISTENERS {
        let mut c = bench.connect().unwrap_or_else(|e| panic!("listener {i}: {e}"));
        c.batch_execute("LISTEN jobs").unwrap_or_else(|e| panic!("listener {i}: LISTEN: {e:?}"));
        pinned.insert(pid_of(&mut c));
        listeners.push(c);
    }
    for i in 0..LOCKERS {
        let mut c = bench.connect().unwrap_or_else(|e| panic!("locker {i}: {e}"));
        c.query_one("SELECT pg_advisory_lock($1)", &[&(1000 + i as i64)])
            .unwrap_or_else(|e| panic!("locker {i}: pg_advisory_lock: {e:?}"));
        pinned.insert(pid_of(&mut c));
        lockers.push(c);
    }
    // Forty sessions, forty backends: none shares one.
    assert_eq!(pinned.len(), LISTENERS + LOCKERS, "pinned clients share backends");

    // The views show them as dedicated (point 2 of the step).
    let mut admin = pg.admin();
    let want = (LISTENERS + LOCKERS) as i64;
    let dedicated_q = "SELECT count(*) FROM nextgres.backends WHERE dedicated AND role = 'app'";
    assert!(wait_until(SETTLE, || count(&mut admin, dedicated_q) == want), "nextgres.backends: {} dedicated", count(&mut admin, dedicated_q));
    let pids: BTreeSet<i32> = admin
        .query("SELECT pid FROM nextgres.backends WHERE dedicated", &[])
        .expect("nextgres.backends")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(pids, pinned);
    assert_eq!(count(&mut admin, "SELECT backends_dedicated::bigint FROM nextgres.pools WHERE role = 'app'"), want);
    assert_eq!(count(&mut admin, "SELECT count(*) FROM nextgres.clients WHERE dedicated AND role = 'app'"), want);

    let stop = AtomicBool::new(false);
    let samples = AtomicUsize::new(0);
    let max_shared = AtomicUsize::new(0);
    let violations = Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        let pinned = &pinned;
        s.spawn(|| {
            let mut sampler = pg.admin();
            while !stop.load(Ordering::Relaxed) {
                let all = app_backends(&mut sampler);
                let shared: Vec<i32> = all.iter().copied().filter(|p| !pinned.contains(p)).collect();
                max_shared.fetch_max(shared.len(), Ordering::Relaxed);
                if shared.len() > POOL {
                    violations.lock().unwrap().push(format!("{} shared backends: {shared:?}", shared.len()));
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let _stop = StopOnDrop(&stop);
        let run = s.spawn(|| pg.pgbench(&bench, &["-n", "-S", "-c", "8", "-j", "2", "-T", "8"]));
        // Meanwhile: notifications for the listeners, and every pinned
        // client runs statements on its own backend.
        let mut notifier = pg.admin();
        for n in 0..NOTES {
            notifier.batch_execute(&format!("NOTIFY jobs, 'n{n:02}'")).expect("NOTIFY");
            for c in listeners.iter_mut().chain(lockers.iter_mut()) {
                let pid = pid_of(c);
                assert!(pinned.contains(&pid), "a pinned client moved to backend {pid}");
            }
        }
        let out = run.join().expect("pgbench thread");
        stop.store(true, Ordering::Relaxed);
        out.assert_success();
        let sum = parse_summary(&out.stdout).unwrap_or_else(|| panic!("no pgbench summary:\n{out}"));
        assert_eq!(sum.failed.unwrap_or(0), 0, "{out}");
        assert!(sum.processed > 0, "{out}");
    });
    let v = violations.into_inner().unwrap();
    assert!(v.is_empty(), "more than {POOL} shared backends {} times: {:?}", v.len(), &v[..v.len().min(10)]);
    let n = samples.into_inner();
    eprintln!("{n} samples, at most {} shared backends", max_shared.into_inner());
    assert!(n >= 100, "the sampler barely ran ({n} samples)");

    // Every listener got every notification, in order.
    let expected: Vec<String> = (0..NOTES).map(|n| format!("n{n:02}")).collect();
    for (i, c) in listeners.iter_mut().enumerate() {
        let mut got = Vec::new();
        wait_until(SETTLE, || {
            got.extend(drain(c, Duration::from_millis(50)));
            got.len() >= NOTES
        });
        assert_eq!(got, expected, "listener {i}");
    }
    // Every locker still holds its lock: a direct session cannot take one.
    for i in 0..LOCKERS {
        let taken: bool = admin.query_one("SELECT pg_try_advisory_lock($1)", &[&(1000 + i as i64)]).expect("try lock").get(0);
        assert!(!taken, "locker {i} lost its advisory lock");
    }

    // Unpin: the backends return to the pool, which closes what is over
    // pool_size; every client still runs, now on the pool's shared backends.
    for c in &mut listeners {
        c.batch_execute("UNLISTEN *").expect("UNLISTEN *");
    }
    for c in &mut lockers {
        c.batch_execute("SELECT pg_advisory_unlock_all()").expect("unlock all");
    }
    assert!(wait_until(SETTLE, || count(&mut admin, dedicated_q) == 0), "still dedicated: {}", count(&mut admin, dedicated_q));
    assert!(
        wait_until(SETTLE, || app_backends(&mut admin).len() <= POOL),
        "the pool kept {} backends after unpinning",
        app_backends(&mut admin).len()
    );
    for c in listeners.iter_mut().chain(lockers.iter_mut()) {
        assert_eq!(c.query_one("SELECT 1", &[]).expect("after unpinning").get::<_, i32>(0), 1);
    }
    assert!(app_backends(&mut admin).len() <= POOL);
    assert_eq!(count(&mut admin, "SELECT backends_dedicated::bigint FROM nextgres.pools WHERE role = 'app'"), 0);
}

/// `nextgres.max_pinned_backends`, per pool with ALTER ROLE: at the cap (2)
/// further pinned clients keep a backend counted in pool_size, as before
/// dedicated sessions existed; a plain client still runs on what is left,
/// and with that one busy a second plain client waits (the pool stays at
/// pool_size).
/// When the pinned clients disconnect, their backends return to the pool,
/// which closes what is over pool_size.
#[test]
fn max_pinned_backends_caps_dedicated_backends() {
    let pg = cluster();
    let mut admin = pg.admin();
    let info = pg.tcp("app", "postgres");
    // The pool exists first; the setting then reaches it live (logged).
    let mut plain = info.connect().expect("plain client");
    plain.batch_execute("SELECT 1").expect("plain");
    let mut second = info.connect().expect("second plain client");
    exec(&pg, "ALTER ROLE app SET nextgres.max_pinned_backends = 2");
    assert!(
        wait_until(SETTLE, || pg.log().contains("settings from pg_db_role_setting now max_pinned_backends=2")),
        "the pool never got max_pinned_backends=2\n{}",
        pg.log_tail(20)
    );
    let mut listeners = Vec::new();
    for i in 0..5 {
        let mut c = info.connect().unwrap_or_else(|e| panic!("listener {i}: {e}"));
        c.batch_execute("LISTEN capped").unwrap_or_else(|e| panic!("listener {i}: {e:?}"));
        listeners.push(c);
    }
    let dedicated_q = "SELECT count(*) FROM nextgres.backends WHERE dedicated AND role = 'app'";
    assert!(wait_until(SETTLE, || count(&mut admin, dedicated_q) == 2), "dedicated: {}", count(&mut admin, dedicated_q));
    // Each backend tells the pooler of its pin at the boundary, while its
    // client already has the LISTEN's answer: the view catches up soon after.
    let pinned_q = "SELECT count(*) FROM nextgres.backends WHERE pinned_by = 'LISTEN' AND role = 'app'";
    assert!(wait_until(SETTLE, || count(&mut admin, pinned_q) == 5), "pinned by LISTEN: {}", count(&mut admin, pinned_q));
    // 2 dedicated + 3 pinned in pool_size + 1 shared for the plain client.
    assert_eq!(plain.query_one("SELECT 2", &[]).expect("plain client runs").get::<_, i32>(0), 2);
    // The cap takes effect: with the plain client inside a transaction the
    // pool's pool_size (3 pinned beyond the cap + that one) is used up, so a
    // second plain client waits (were all five dedicated, the pool would log
    // in a backend for it) until the first one commits.
    plain.batch_execute("BEGIN; SELECT 1").expect("plain BEGIN");
    let waiting_q = "SELECT count(*) FROM nextgres.clients WHERE state = 'waiting' AND role = 'app'";
    std::thread::scope(|s| {
        let second = s.spawn(|| second.query_one("SELECT 4", &[]).map(|r| r.get::<_, i32>(0)));
        let waited = wait_until(SETTLE, || count(&mut admin, waiting_q) == 1);
        let seen = format!("{} waiting, backends {:?}", count(&mut admin, waiting_q), app_backends(&mut admin));
        // COMMIT before any assertion: the scope joins the second client,
        // whose query waits for this transaction (a failure must not hang).
        plain.batch_execute("COMMIT").expect("plain COMMIT");
        assert!(waited, "the second plain client never waited beyond the cap: {seen}");
        assert_eq!(second.join().expect("second plain client").expect("second plain client runs"), 4);
    });
    // No backend was logged in for it: besides the 2 dedicated ones (as
    // nextgres.backends lists them), the server has at most pool_size.
    let all = app_backends(&mut admin);
    let dedicated = count(&mut admin, dedicated_q);
    assert_eq!(dedicated, 2);
    assert!(all.len() <= 2 + POOL, "{} backends, {dedicated} of them dedicated: {all:?}", all.len());

    // Pinned clients that leave give their backends back: none stays
    // dedicated and the pool closes what is over pool_size.
    drop(listeners);
    assert!(wait_until(SETTLE, || count(&mut admin, dedicated_q) == 0), "dedicated after leaving: {}", count(&mut admin, dedicated_q));
    assert!(
        wait_until(SETTLE, || app_backends(&mut admin).len() <= POOL),
        "the pool kept {} backends after its pinned clients left",
        app_backends(&mut admin).len()
    );
    assert_eq!(plain.query_one("SELECT 3", &[]).expect("plain client runs").get::<_, i32>(0), 3);
}

/// A pinned client that leaves while other clients wait: its backend goes to
/// the next waiting client at once, and that client is never shown (nor
/// counted) as a dedicated session. Ten plain clients saturate a pool of 4
/// whose role has `max_user_connections` 4 (so a pinned client's backend is
/// one of the 4 and goes on serving when it leaves; each plain transaction
/// holds its backend 10 ms); twenty LISTEN clients with 100 temporary tables
/// each (a long DISCARD ALL), one at a time, connect, pin and leave. A
/// sampler of nextgres.clients (the plain clients are known by their
/// client_port) never sees a plain client dedicated, and nextgres.pools never
/// shows more than 4 shared backends.
#[test]
fn next_client_on_a_left_pinned_backend_is_not_dedicated() {
    const PLAIN: usize = 10;
    const ROUNDS: usize = 20;
    let pg = cluster();
    // The listener's backend is then one of the pool's 4 when it leaves (a
    // pool with 4 shared backends besides would close it as surplus).
    exec(&pg, "ALTER ROLE app SET nextgres.max_user_connections = 4");
    let info = pg.tcp("app", "postgres");
    let mut admin = pg.admin();
    let mut plain: Vec<Client> = (0..PLAIN).map(|i| info.connect().unwrap_or_else(|e| panic!("plain {i}: {e}"))).collect();
    for c in &mut plain {
        c.batch_execute("SELECT 1").expect("plain");
    }
    let ports: Vec<i32> = admin
        .query("SELECT client_port FROM nextgres.clients WHERE role = 'app'", &[])
        .expect("nextgres.clients")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ports.len(), PLAIN, "{ports:?}");

    let stop = AtomicBool::new(false);
    let samples = AtomicUsize::new(0);
    let violations = Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        for (i, c) in plain.iter_mut().enumerate() {
            let stop = &stop;
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    c.batch_execute("SELECT pg_sleep(0.01)").unwrap_or_else(|e| panic!("plain {i}: {e:?}"));
                }
            });
        }
        s.spawn(|| {
            let mut sampler = pg.admin();
            while !stop.load(Ordering::Relaxed) {
                let wrong: Vec<(i32, Option<i32>)> = sampler
                    .query("SELECT client_port, backend_pid FROM nextgres.clients WHERE dedicated AND client_port = ANY($1)", &[&ports])
                    .expect("sampling nextgres.clients")
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                if !wrong.is_empty() {
                    violations.lock().unwrap().push(format!("plain clients shown dedicated (port, backend): {wrong:?}"));
                }
                let shared = count(
                    &mut sampler,
                    "SELECT (backends_attached + backends_parked + backends_starting - backends_dedicated)::bigint
                       FROM nextgres.pools WHERE role = 'app'",
                );
                if shared > POOL as i64 {
                    violations.lock().unwrap().push(format!("{shared} shared backends"));
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let _stop = StopOnDrop(&stop);
        for r in 0..ROUNDS {
            let mut l = info.connect().unwrap_or_else(|e| panic!("listener {r}: {e}"));
            l.batch_execute("LISTEN leaving").unwrap_or_else(|e| panic!("listener {r}: LISTEN: {e:?}"));
            // Temporary tables too: the DISCARD ALL after it leaves takes a
            // while, the window in which its backend already serves the next
            // client but still showed this one's pin.
            l.batch_execute(
                "DO $$BEGIN FOR i IN 1..100 LOOP EXECUTE format('CREATE TEMP TABLE t%s (a int)', i); END LOOP; END$$",
            )
            .unwrap_or_else(|e| panic!("listener {r}: {e:?}"));
            drop(l);
        }
        stop.store(true, Ordering::Relaxed);
    });
    let v = violations.into_inner().unwrap();
    let n = samples.into_inner();
    eprintln!("{n} samples, {} violations", v.len());
    assert!(v.is_empty(), "{} times: {:?}", v.len(), &v[..v.len().min(10)]);
    assert!(n >= 50, "the sampler barely ran ({n} samples)");
}

/// Dedicated backends take connection slots as direct sessions do. With
/// `max_connections` 10 (3 reserved for superusers), pinned clients of one
/// pool take every slot the server gives role `app`; then a plain client of
/// that pool, which has no shared backend left, gets at once what a direct
/// login of `app` gets at that moment (53300 and the server's message,
/// compared with a direct Unix-socket login), instead of waiting
/// `query_wait_timeout` for a backend that cannot come.
#[test]
fn out_of_slots_with_only_dedicated_backends_answers_as_the_server() {
    let pg = Cluster::builder()
        .conf(format!("nextgres.pool_size = {POOL}"))
        .conf("nextgres.query_wait_timeout = 60")
        .conf("max_connections = 10")
        .conf("superuser_reserved_connections = 3")
        .start();
    exec(&pg, "CREATE EXTENSION nextgres; CREATE ROLE app LOGIN");
    let info = pg.tcp("app", "postgres");
    let mut admin = pg.admin();
    // Pin until the pool gets no backend for the next one. A raw client
    // reads the FATAL the pooler sends before it closes (drivers may report
    // only the closed connection).
    let mut listeners = Vec::new();
    let (code, message, took) = loop {
        assert!(listeners.len() < 10, "ten pinned clients on 7 unreserved slots");
        let mut c = Raw::connect(pg.port(), "app", "postgres", Duration::from_secs(90));
        let t0 = std::time::Instant::now();
        match c.query("LISTEN slots") {
            Ok(_) => listeners.push(c),
            Err(RawFail::Db { code, message, .. }) => break (code, message, t0.elapsed()),
            Err(e) => panic!("pinned client {}: {e:?}", listeners.len() + 1),
        }
    };
    eprintln!("{} pinned clients; the next one refused after {took:?}: {code} {message}", listeners.len());
    assert_eq!(code, "53300", "{message}");
    assert!(took < Duration::from_secs(30), "waited {took:?}, as for query_wait_timeout");
    assert_eq!(count(&mut admin, "SELECT count(*) FROM nextgres.backends WHERE dedicated AND role = 'app'"), listeners.len() as i64);
    // The same moment, directly: the server's own answer.
    let Err(direct) = pg.unix("app", "postgres").connect() else { panic!("a direct login found a slot") };
    let ddb = direct.as_db_error().unwrap_or_else(|| panic!("direct: not a server error: {direct:?}"));
    assert_eq!((ddb.code().code(), ddb.message()), (code.as_str(), message.as_str()));
    // A pinned client that leaves frees its slot: the pool serves again.
    drop(listeners.pop());
    assert!(
        wait_until(SETTLE, || info.connect().ok().is_some_and(|mut c| c.query_one("SELECT 1", &[]).is_ok())),
        "the pool never served again after a pinned client left"
    );
}
