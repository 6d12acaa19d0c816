//! Finding and ending server processes.
//!
//! Teardown must work even when pg_ctl cannot (hung server, crashed test
//! process), so the harness can signal a postmaster itself: found through
//! `postmaster.pid`, checked against `/proc` so a reused pid is never hit.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use crate::util::wait_until;

/// Is a process with this pid running? kill(pid, 0), EPERM counting as yes;
/// a zombie counts as gone (a container's pid 1 may never reap an orphaned
/// postmaster).
pub fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && process_state(pid) != Some('Z')
}

/// The process's state letter (`R`, `S`, `T` stopped, `Z` zombie, ...), or
/// None when it is gone.
pub fn process_state(pid: i32) -> Option<char> {
    // /proc/<pid>/stat: "pid (comm) S ..."; comm may hold spaces or parens.
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 1..].trim_start().chars().next()
}

/// Running postmaster's pid from `<data>/postmaster.pid`.
pub fn postmaster_pid(data: &Path) -> Option<i32> {
    let text = fs::read_to_string(data.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    process_alive(pid).then_some(pid)
}

/// Ends a postmaster and its children, if `pid` really is the postmaster of
/// `data` (checked on its command line: pids get reused): SIGQUIT first
/// (immediate shutdown, which releases shared memory), SIGKILL after 5 s.
pub fn kill_postmaster_tree(pid: i32, data: &Path) {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = data.as_os_str().as_encoded_bytes();
    if !cmdline.windows(needle.len()).any(|w| w == needle) {
        return;
    }
    let children = children_of(pid);
    let all_gone = || !process_alive(pid) && children.iter().all(|c| !process_alive(*c));
    // SAFETY: plain kill(2) on the verified postmaster.
    unsafe { libc::kill(pid, libc::SIGQUIT) };
    if wait_until(Duration::from_secs(5), all_gone) {
        return;
    }
    // SAFETY: plain kill(2) on the postmaster and the children it had.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        for c in &children {
            libc::kill(*c, libc::SIGKILL);
        }
    }
    wait_until(Duration::from_secs(5), all_gone);
}

fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .collect()
}
