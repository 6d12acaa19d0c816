//! Waiting without hanging.

use std::time::{Duration, Instant};

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns
/// whether it held. For conditions that settle asynchronously (a reload took
/// effect, a backend went away), not for timing assertions.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on its own thread and panics if it takes longer than `timeout`.
///
/// rust-postgres calls have no client-side deadline; wrap a call that a
/// misbehaving server could leave blocked forever. On timeout the thread is
/// abandoned (it ends when the cluster is dropped and its socket dies).
#[track_caller]
pub fn with_timeout<T: Send + 'static>(
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no result after {timeout:?}")
        }
        // The closure panicked: re-raise its panic here.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("sender dropped without sending"),
        },
    }
}

/// The name /etc/passwd gives OS user `uid` (panics when it has none).
pub fn os_user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
        })
        .unwrap_or_else(|| panic!("no user {uid} in /etc/passwd"))
}
