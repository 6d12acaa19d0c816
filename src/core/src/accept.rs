//! What the pooler does when `accept(2)` on its listen sockets fails, as the
//! postmaster does (PostgreSQL 17 `pqcomm.c` `AcceptConnection()`): LOG
//! "could not accept new connection: %m" and wait 100 ms before trying
//! again, so that a listen socket that stays readable (the connection
//! stays queued while the process is out of descriptors) does not make the
//! loop spin. The postmaster sleeps; the pooler must keep serving its
//! clients, so it takes its listen sockets out of its epoll set for
//! [`PAUSE`] instead (clients wait in the listen backlog meanwhile).
use std::time::{Duration, Instant};

/// How long the listen sockets stay out of the epoll set after an accept
/// failure for lack of resources: the postmaster's `pg_usleep(100000L)`.
pub const PAUSE: Duration = Duration::from_millis(100);

/// What an accept error means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): the
    /// connection is still queued; stop accepting for [`PAUSE`].
    Pause,
    /// Interrupted, or a connection that died in the queue (EINTR,
    /// ECONNABORTED): try the next one at once.
    Retry,
    /// Anything else: the connection was taken off the queue (or there is
    /// none); log it and wait for the next readiness event.
    Skip,
}

/// Classifies an `accept4(2)` errno (Linux values, from `libc`-free
/// numbers so that this crate stays free of system bindings: EINTR 4,
/// ENOMEM 12, ENFILE 23, EMFILE 24, ENOBUFS 105, ECONNABORTED 103).
pub fn classify(errno: i32) -> Failure {
    match errno {
        12 | 23 | 24 | 105 => Failure::Pause,
        4 | 103 => Failure::Retry,
        _ => Failure::Skip,
    }
}

/// The listen sockets' pause: set by an accept failure, over at a time.
#[derive(Debug, Default, Clone)]
pub struct Pause {
    until: Option<Instant>,
}

impl Pause {
    /// Starts a pause at `now`. Returns false when one is already in
    /// force (nothing to log: one LOG line per pause at most).
    pub fn start(&mut self, now: Instant) -> bool {
        if self.until.is_some() {
            return false;
        }
        self.until = Some(now + PAUSE);
        true
    }

    /// A pause is in force (the listen sockets are out of the epoll set).
    pub fn active(&self) -> bool {
        self.until.is_some()
    }

    /// Ends the pause when it is over at `now`; true exactly once per
    /// pause, when the listen sockets are to go back into the epoll set.
    pub fn end_if_due(&mut self, now: Instant) -> bool {
        match self.until {
            Some(t) if now >= t => {
                self.until = None;
                true
            }
            _ => false,
        }
    }

    /// The loop's wait in milliseconds: `tick_ms`, or less so that it wakes
    /// when the pause is over (at least 1 ms while one is in force).
    pub fn wait_ms(&self, now: Instant, tick_ms: i64) -> i64 {
        match self.until {
            Some(t) => {
                let left = t.saturating_duration_since(now).as_millis() as i64;
                left.clamp(1, tick_ms.max(1))
            }
            None => tick_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_errnos() {
        for e in [12, 23, 24, 105] {
            assert_eq!(classify(e), Failure::Pause, "{e}");
        }
        assert_eq!(classify(4), Failure::Retry);
        assert_eq!(classify(103), Failure::Retry);
        assert_eq!(classify(1), Failure::Skip); // EPERM
        assert_eq!(classify(71), Failure::Skip); // EPROTO
    }

    #[test]
    fn one_start_per_pause() {
        let t0 = Instant::now();
        let mut p = Pause::default();
        assert!(!p.active());
        assert_eq!(p.wait_ms(t0, 1000), 1000);
        assert!(p.start(t0));
        assert!(p.active());
        assert!(!p.start(t0 + Duration::from_millis(10)), "no second LOG line within a pause");
        assert!(!p.end_if_due(t0 + Duration::from_millis(99)));
        assert_eq!(p.wait_ms(t0 + Duration::from_millis(40), 1000), 60);
        assert_eq!(p.wait_ms(t0 + Duration::from_millis(40), 20), 20);
        assert_eq!(p.wait_ms(t0 + Duration::from_millis(200), 1000), 1, "overdue: wake at once, never 0 (no busy loop)");
        assert!(p.end_if_due(t0 + PAUSE));
        assert!(!p.active());
        assert!(!p.end_if_due(t0 + PAUSE), "only once");
        assert!(p.start(t0 + PAUSE), "the next failure starts a new pause");
    }
}
