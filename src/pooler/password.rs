//! The `password` method's check against a SCRAM secret, off the event loop.
//!
//! A cleartext password is checked against a SCRAM secret by running the
//! secret's PBKDF2 iterations: 4096 by default (milliseconds), but whoever
//! sets a password chooses them (`ALTER ROLE ... PASSWORD
//! 'SCRAM-SHA-256$<n>:...'`, up to 2^31 - 1: hours). On the pooler's loop
//! such a login stalled every client of the server; in the server it costs
//! only that login's own backend. A few threads run the checks instead, and
//! each stops when its client is gone (`authentication_timeout`, hang-up:
//! the session's [`CancelOnDrop`]), as the server's backend is ended then.
//! The threads run only the pure check (`nextgres_core::auth`): no
//! PostgreSQL function, no logging (neither is thread-safe).
use nextgres_core::auth::{self, PasswordCheck, StoredSecret};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// Threads that run checks (started at the first one): more than one, so a
/// login with a huge iteration count does not hold up every other.
const THREADS: usize = 2;

/// A check to run: the secret, and the password the client sent (wiped
/// once checked).
pub struct PasswordJob {
    pub secret: StoredSecret,
    pub user: String,
    pub password: String,
}

impl PasswordJob {
    /// Runs the check; None when cancelled first.
    fn run(mut self, cancelled: &AtomicBool) -> Option<PasswordCheck> {
        let r = auth::check_password(&self.secret, &self.user, &self.password, &|| cancelled.load(Ordering::Relaxed));
        auth::scram::zeroize::wipe_string(std::mem::take(&mut self.password));
        r
    }
}

/// Held by the client's authentication state while its check runs: dropped
/// (the client closed, timed out, or the check's answer arrived), it stops
/// the check.
pub struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A finished check: client key, check id, and the result (None: cancelled).
pub struct Done {
    pub client: usize,
    pub id: u64,
    pub check: Option<PasswordCheck>,
}

struct Queued {
    client: usize,
    id: u64,
    job: PasswordJob,
    cancelled: Arc<AtomicBool>,
}

pub struct Verifier {
    jobs: Option<Sender<Queued>>,
    done_tx: Sender<Done>,
    done: Receiver<Done>,
    next_id: u64,
}

impl Verifier {
    pub fn new() -> Self {
        let (done_tx, done) = channel();
        Verifier { jobs: None, done_tx, done, next_id: 0 }
    }

    /// Queues a check for client `client`. Returns its id (which the
    /// client's state keeps, so an answer for a connection that has since
    /// taken its key is ignored) and the guard that cancels it; or, when no
    /// thread could be started, the check's result, run here.
    pub fn submit(&mut self, client: usize, job: PasswordJob) -> Result<(u64, CancelOnDrop), Option<PasswordCheck>> {
        self.next_id += 1;
        let id = self.next_id;
        let cancelled = Arc::new(AtomicBool::new(false));
        let Some(tx) = self.threads() else { return Err(job.run(&cancelled)) };
        let q = Queued { client, id, job, cancelled: cancelled.clone() };
        match tx.send(q) {
            Ok(()) => Ok((id, CancelOnDrop(cancelled))),
            Err(e) => {
                self.jobs = None;
                Err(e.0.job.run(&cancelled))
            }
        }
    }

    /// Checks finished since last asked.
    pub fn finished(&mut self) -> Vec<Done> {
        self.done.try_iter().collect()
    }

    fn threads(&mut self) -> Option<&Sender<Queued>> {
        if self.jobs.is_none() {
            let (tx, rx) = channel::<Queued>();
            let rx = Arc::new(Mutex::new(rx));
            let mut started = 0;
            for i in 0..THREADS {
                let (rx, done) = (rx.clone(), self.done_tx.clone());
                let t = std::thread::Builder::new().name(format!("ng password {i}")).spawn(move || check_loop(&rx, &done));
                match t {
                    Ok(_) => started += 1,
                    Err(e) => log::warn!("nextgres: could not start a password check thread: {e}; checks run on the pooler's loop"),
                }
            }
            if started == 0 {
                return None;
            }
            self.jobs = Some(tx);
        }
        self.jobs.as_ref()
    }
}

fn check_loop(rx: &Mutex<Receiver<Queued>>, done: &Sender<Done>) {
    loop {
        let next = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok(q) = next else { return };
        let check = if q.cancelled.load(Ordering::Relaxed) { None } else { q.job.run(&q.cancelled) };
        if done.send(Done { client: q.client, id: q.id, check }).is_err() {
            return;
        }
        super::agent::wake();
    }
}
