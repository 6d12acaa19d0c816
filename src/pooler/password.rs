//! The `password` method's check against a SCRAM secret, off the event loop.
//!
//! A cleartext password is checked against a SCRAM secret by running the
//! secret's PBKDF2 iterations: 4096 by default (milliseconds), but whoever
//! sets a password chooses them (`ALTER ROLE ... PASSWORD
//! 'SCRAM-SHA-256$<n>:...'`, up to 2^31 - 1: hours). On the pooler's loop
//! such a login stalled every client of the server; in the server it costs
//! only that login's own backend. Here each check runs on a thread of its
//! own, as each runs in a process of its own in the server, up to
//! [`MAX_THREADS`] at once and [`MAX_PER_ROLE`] for one role (then they
//! queue: clients that only need a role's name to start checks against its
//! huge secret hold that role's share, not every role's logins), and stops
//! when its client is gone (`authentication_timeout`, hang-up: the
//! session's [`CancelOnDrop`]), as the server's backend is ended then. The threads run only the pure
//! check (`nextgres_core::auth`): no PostgreSQL function, no logging
//! (neither is thread-safe), every signal blocked.
use nextgres_core::auth::{self, PasswordCheck, StoredSecret};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// Checks running at once; more wait for one to finish. Clients that hold
/// one with a huge iteration count hold it until `authentication_timeout`.
pub const MAX_THREADS: usize = 16;

/// Checks of one role running at once; its others wait for one of them.
pub const MAX_PER_ROLE: usize = 2;

/// A check to run: the secret, and the password the client sent (wiped
/// when the job goes, run or not).
pub struct PasswordJob {
    pub secret: StoredSecret,
    pub user: String,
    /// The client's bytes, in whatever encoding it sent them.
    pub password: Vec<u8>,
}

impl PasswordJob {
    /// Runs the check; None when cancelled first.
    fn run(&self, cancelled: &AtomicBool) -> Option<PasswordCheck> {
        auth::check_password(&self.secret, &self.user, &self.password, &|| cancelled.load(Ordering::Relaxed))
    }
}

impl Drop for PasswordJob {
    fn drop(&mut self) {
        auth::scram::zeroize::wipe(&mut self.password);
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

/// Jobs not yet taken, how many threads run, and how many checks of each
/// role run (all under one lock, so a thread that finds nothing to take and
/// ends is never counted as taking a job queued meanwhile).
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Queued>,
    running: usize,
    per_role: std::collections::HashMap<String, usize>,
}

impl Queue {
    /// The oldest job whose role is below its share, counted as running.
    fn take(&mut self) -> Option<Queued> {
        let i = self.jobs.iter().position(|q| self.per_role.get(&q.job.user).copied().unwrap_or(0) < MAX_PER_ROLE)?;
        let q = self.jobs.remove(i)?;
        *self.per_role.entry(q.job.user.clone()).or_default() += 1;
        Some(q)
    }

    /// A check of `user` ended.
    fn done(&mut self, user: &str) {
        if let Some(n) = self.per_role.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.per_role.remove(user);
            }
        }
    }
}

pub struct Verifier {
    queue: Arc<Mutex<Queue>>,
    done_tx: Sender<Done>,
    done: Receiver<Done>,
    next_id: u64,
}

impl Verifier {
    pub fn new() -> Self {
        let (done_tx, done) = channel();
        Verifier { queue: Arc::default(), done_tx, done, next_id: 0 }
    }

    /// Queues a check for client `client`. Returns its id (which the
    /// client's state keeps, so an answer for a connection that has since
    /// taken its key is ignored) and the guard that cancels it; or, when no
    /// thread runs and none could be started, the check's result, run here.
    pub fn submit(&mut self, client: usize, job: PasswordJob) -> Result<(u64, CancelOnDrop), Option<PasswordCheck>> {
        self.next_id += 1;
        let id = self.next_id;
        let cancelled = Arc::new(AtomicBool::new(false));
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        // A role at its share waits for one of its own checks to end (that
        // thread takes the next).
        let within_share = q.per_role.get(&job.user).copied().unwrap_or(0) < MAX_PER_ROLE;
        q.jobs.push_back(Queued { client, id, job, cancelled: cancelled.clone() });
        if q.running < MAX_THREADS && within_share {
            match self.spawn() {
                Ok(()) => q.running += 1,
                Err(e) if q.running == 0 => {
                    log::warn!("could not start a password check thread: {e}; this check runs on the pooler's loop");
                    let mine = q.jobs.pop_back().expect("just queued");
                    drop(q);
                    return Err(mine.job.run(&cancelled));
                }
                // The running ones take it.
                Err(_) => {}
            }
        }
        Ok((id, CancelOnDrop(cancelled)))
    }

    /// Checks finished since last asked.
    pub fn finished(&mut self) -> Vec<Done> {
        self.done.try_iter().collect()
    }

    /// One more thread (the caller holds the queue's lock; the thread takes
    /// it only once started).
    fn spawn(&self) -> std::io::Result<()> {
        use nix::sys::signal::{SigSet, SigmaskHow};
        // The server's signal handlers must run on the pooler's own thread:
        // the new thread inherits a mask that blocks every signal, then the
        // pooler's mask is put back (as for the TLS relays).
        let old = SigSet::all().thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
        let (queue, done) = (self.queue.clone(), self.done_tx.clone());
        let started = std::thread::Builder::new()
            .name("ng password".into())
            .stack_size(256 * 1024)
            .spawn(move || check_loop(&queue, &done));
        let _ = old.thread_set_mask();
        started.map(drop)
    }
}

/// A thread: takes jobs until none it may take is queued, then ends.
fn check_loop(queue: &Mutex<Queue>, done: &Sender<Done>) {
    let mut finished: Option<String> = None;
    loop {
        let q = {
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(user) = finished.take() {
                q.done(&user);
            }
            match q.take() {
                Some(j) => j,
                None => {
                    q.running -= 1;
                    return;
                }
            }
        };
        finished = Some(q.job.user.clone());
        // A panic (none is known) ends this check as a failed one, never
        // the thread with its count.
        let run = || if q.cancelled.load(Ordering::Relaxed) { None } else { q.job.run(&q.cancelled) };
        let check = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or(Some(PasswordCheck::Mismatch));
        drop(q.job);
        if done.send(Done { client: q.client, id: q.id, check }).is_err() {
            return;
        }
        super::agent::wake();
    }
}
