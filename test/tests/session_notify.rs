//! LISTEN/NOTIFY through the transaction pooler.
//!
//! A LISTEN pins its client to its backend, which then delivers every
//! notification while the client sits idle, as a direct session does. A
//! client that never listened receives nothing, even when it runs on the
//! very backend a listener used before it UNLISTENed or left.
//!
//! Pools are per (database, role) and NOTIFY is per database, so listeners
//! and bystanders use role `app` (a pool of ONE backend: a bystander can only
//! run where the listener was) and senders use role `sender` (their own pool).
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test session_notify -- --test-threads=2
//! ```

mod session_support;

use std::collections::BTreeSet;
use std::time::Duration;

use nextgres_test::Cluster;
use postgres::fallible_iterator::FallibleIterator;
use postgres::Client;
use session_support::{expect_backend, one, pid_of, raw, run, SETTLE};

const SETUP: &str = "
    CREATE EXTENSION nextgres;
    CREATE ROLE app LOGIN;
    CREATE ROLE sender LOGIN";

/// Notifications already received or arriving within `wait` (payloads).
fn drain(c: &mut Client, wait: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let mut notes = c.notifications();
    let mut it = notes.timeout_iter(wait);
    while let Some(n) = it.next().expect("reading notifications") {
        out.push(format!("{}:{}", n.channel(), n.payload()));
    }
    out
}

/// A direct session (not pooled) listening on `chan`: once it has heard a
/// notification, the server has delivered it to every listener, so a check
/// that some client heard nothing is made after the delivery, not after a
/// sleep.
fn witness(pg: &Cluster, chan: &str) -> Client {
    let mut w = pg.admin();
    w.batch_execute(&format!("LISTEN {chan}")).expect("witness LISTEN");
    w
}

/// Waits (bounded) until the witness has heard `last` on `chan`.
#[track_caller]
fn await_delivered(w: &mut Client, chan: &str, last: &str) {
    let want = format!("{chan}:{last}");
    let mut heard = Vec::new();
    assert!(
        nextgres_test::wait_until(SETTLE, || {
            heard.extend(drain(w, Duration::from_millis(20)));
            heard.contains(&want)
        }),
        "the witness never heard {want}: {heard:?}"
    );
}

#[test]
fn notifications_reach_listeners_only() {
    run(
        Cluster::builder()
            .conf("nextgres.pool_size = 1")
            .conf("nextgres.query_wait_timeout = 30"),
        SETUP,
        Duration::from_secs(300),
        |pg| {
            const SENT: usize = 50;
            let mut listener = pg.tcp("app", "postgres").connect().expect("listener");
            listener.batch_execute("LISTEN ch").expect("listen");
            let pl = pid_of(&mut listener);
            expect_backend(pg, pl, "attached", Some("LISTEN"));

            // Three senders share the `sender` pool's one backend; none listens.
            let mut senders: Vec<Client> = (0..3)
                .map(|_| pg.tcp("sender", "postgres").connect().expect("sender"))
                .collect();
            let sender_pid = pid_of(&mut senders[0]);
            std::thread::scope(|s| {
                for (k, snd) in senders.iter_mut().enumerate() {
                    s.spawn(move || {
                        for i in (k..SENT).step_by(3) {
                            snd.batch_execute(&format!("NOTIFY ch, 'p{i:03}'")).expect("notify");
                        }
                    });
                }
                // The listener waits idle: notifications arrive meanwhile.
                let mut got = Vec::new();
                let mut notes = listener.notifications();
                let mut it = notes.timeout_iter(SETTLE);
                while got.len() < SENT {
                    match it.next().expect("reading notifications") {
                        Some(n) => {
                            assert_eq!(n.channel(), "ch");
                            assert_eq!(n.process_id(), sender_pid, "sent by the sender pool's backend");
                            got.push(n.payload().to_string());
                        }
                        None => panic!(
                            "listener got {} of {SENT} notifications, then nothing for {SETTLE:?}: {got:?}",
                            got.len()
                        ),
                    }
                }
                let distinct: BTreeSet<_> = got.iter().cloned().collect();
                let want: BTreeSet<_> = (0..SENT).map(|i| format!("p{i:03}")).collect();
                assert_eq!(got.len(), SENT, "duplicates: {got:?}");
                assert_eq!(distinct, want);
            });
            // The listener is still on its backend; nothing extra arrived.
            assert_eq!(pid_of(&mut listener), pl);
            assert!(drain(&mut listener, Duration::from_millis(300)).is_empty());
            for snd in senders.iter_mut() {
                one(snd, "SELECT 1");
                assert!(drain(snd, Duration::ZERO).is_empty(), "a sender never listened");
            }

            // UNLISTEN: the pin goes, and a bystander now shares the backend
            // with the former listener while more notifications are sent.
            listener.batch_execute("UNLISTEN ch").expect("unlisten");
            expect_backend(pg, pl, "parked", None);
            let mut bystander = pg.tcp("app", "postgres").connect().expect("bystander");
            assert_eq!(pid_of(&mut bystander), pl, "pool of one: the listener's backend");
            let mut w = witness(pg, "ch");
            for i in 0..20 {
                senders[0].batch_execute(&format!("NOTIFY ch, 'late{i}'")).expect("notify");
                assert_eq!(pid_of(&mut bystander), pl);
                assert_eq!(pid_of(&mut listener), pl);
            }
            await_delivered(&mut w, "ch", "late19");
            one(&mut bystander, "SELECT 1");
            one(&mut listener, "SELECT 1");
            assert_eq!(drain(&mut bystander, Duration::from_millis(300)), Vec::<String>::new(), "bystander");
            assert_eq!(drain(&mut listener, Duration::from_millis(300)), Vec::<String>::new(), "after UNLISTEN");
            drop(listener);

            // A listener that disconnects (Terminate) while pinned.
            let mut l2 = pg.tcp("app", "postgres").connect().expect("listener 2");
            l2.batch_execute("LISTEN ch2").expect("listen 2");
            expect_backend(pg, pid_of(&mut l2), "attached", Some("LISTEN"));
            drop(l2);
            bystander_hears_nothing(pg, &mut bystander, &mut senders[1], "ch2");

            // A listener that vanishes without Terminate (killed client).
            let mut l3 = raw(pg, "app", "postgres");
            l3.query("LISTEN ch3").expect("listen 3");
            l3.vanish();
            bystander_hears_nothing(pg, &mut bystander, &mut senders[2], "ch3");
        },
    );
}

/// After a listener on `chan` left, the bystander is served (on the pool's
/// one backend), hears nothing of `chan`, and listens to nothing.
fn bystander_hears_nothing(pg: &Cluster, bystander: &mut Client, sender: &mut Client, chan: &str) {
    let pid = pid_of(bystander);
    let mut w = witness(pg, chan);
    for i in 0..10 {
        sender.batch_execute(&format!("NOTIFY {chan}, 'after-leave{i}'")).expect("notify");
        assert_eq!(pid_of(bystander), pid, "pool of one");
    }
    await_delivered(&mut w, chan, "after-leave9");
    assert_eq!(one(bystander, "SELECT count(*) FROM pg_listening_channels()"), "0");
    assert_eq!(drain(bystander, Duration::from_millis(300)), Vec::<String>::new(), "bystander after {chan}");
    expect_backend(pg, pid, "parked", None);
}

/// A notification's process id (NotificationResponse) is what the client
/// compares with its BackendKeyData pid (`PQbackendPID()`, psycopg's
/// `info.backend_pid`, pgjdbc's `getBackendPID()`) to tell its own NOTIFYs
/// from other sessions': a pooled client's own carry its key's pid (the
/// pooler's), another client's do not.
#[test]
fn own_notifications_carry_the_clients_key_pid() {
    run(Cluster::builder().conf("nextgres.pool_size = 1"), SETUP, Duration::from_secs(300), |pg| {
        let mut me = raw(pg, "app", "postgres");
        let (key_pid, _) = me.key.clone().expect("BackendKeyData");
        let mut other = raw(pg, "sender", "postgres");
        let (other_pid, _) = other.key.clone().expect("BackendKeyData");
        assert_ne!(key_pid, other_pid);
        let notification_pids = |c: &mut nextgres_test::raw::Raw, sql: &str| -> Vec<i32> {
            c.send_query(sql);
            let mut pids = Vec::new();
            loop {
                let (tag, body) = c.read_msg().expect("reading");
                match tag {
                    b'A' => pids.push(i32::from_be_bytes(body[..4].try_into().unwrap())),
                    b'E' => panic!("{sql}: {:?}", nextgres_test::raw::parse_error(&body)),
                    b'Z' => return pids,
                    _ => {}
                }
            }
        };
        assert_eq!(notification_pids(&mut me, "LISTEN ch; NOTIFY ch, 'mine'"), vec![key_pid], "its own NOTIFY");
        assert!(notification_pids(&mut other, "NOTIFY ch, 'theirs'").is_empty());
        // The other client's notification arrives while `me` is idle, or
        // with its next answer.
        let pids = notification_pids(&mut me, "SELECT 1");
        assert_eq!(pids.len(), 1, "{pids:?}");
        assert_ne!(pids[0], key_pid, "another client's NOTIFY with this client's pid");
        assert_ne!(pids[0], 0);
    });
}
