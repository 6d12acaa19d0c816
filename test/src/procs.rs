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

/// CPU time the process has used, all its threads, in clock ticks
/// (`utime` + `stime` of /proc/<pid>/stat; 100 per second on Linux).
pub fn process_cpu_ticks(pid: i32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    // After the comm: state is field 3 of stat(5), utime 14 and stime 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The state letters of the process's threads whose name (`comm`, at most
/// 15 bytes) starts with `prefix`.
pub fn thread_states(pid: i32, prefix: &str) -> Vec<char> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.flatten()
        .filter(|t| fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix)))
        .filter_map(|t| {
            let s = fs::read_to_string(t.path().join("stat")).ok()?;
            s[s.rfind(')')? + 1..].trim_start().chars().next()
        })
        .collect()
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

/// A running `strace -p` that changes what some system calls of a server
/// process do (`-e inject=...`: a delay, an error) until dropped. It is how
/// a test holds open a window of a few system calls, or makes a socket look
/// full, without a timing guess. tools/setup installs strace.
pub struct Strace(std::process::Child);

impl Strace {
    /// Attaches to `pid` with the given `strace` options (e.g.
    /// `["-e", "inject=sendto:error=EAGAIN"]`); returns once the process is
    /// traced. Root may trace the server's processes (tests run as root).
    #[track_caller]
    pub fn attach(pid: i32, options: &[&str]) -> Strace {
        use std::io::BufRead;
        let mut child = std::process::Command::new("strace")
            .args(["-o", "/dev/null"])
            .args(options)
            .args(["-p", &pid.to_string()])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running strace (tools/setup installs it)");
        // strace says so on stderr once the process is traced.
        let mut err = io::BufReader::new(child.stderr.take().expect("strace's stderr"));
        let mut line = String::new();
        let attached = err.read_line(&mut line).is_ok() && line.contains("attached");
        assert!(attached, "strace -p {pid}: {line:?}");
        // Drained while it runs, so a later message cannot block it.
        std::thread::spawn(move || io::copy(&mut err, &mut io::sink()));
        Strace(child)
    }
}

/// An `strace` of one process written to a temporary file
/// (`Strace::record`).
pub struct Recording {
    strace: Strace,
    path: std::path::PathBuf,
}

impl Strace {
    /// Records the system calls of `pid` that `options` select (e.g.
    /// `["-e", "trace=sendmsg"]`) until `Recording::output`.
    #[track_caller]
    pub fn record(pid: i32, options: &[&str]) -> Recording {
        let path = std::env::temp_dir().join(format!("nextgres-strace-{pid}-{}.trace", std::process::id()));
        let file = path.to_str().expect("a UTF-8 temp path");
        let mut args = vec!["-o", file];
        args.extend_from_slice(options);
        Recording { strace: Strace::attach(pid, &args), path }
    }
}

impl Recording {
    /// Stops the trace; what it recorded, one system call per line.
    #[track_caller]
    pub fn output(self) -> String {
        drop(self.strace);
        let text = std::fs::read_to_string(&self.path).expect("the strace output");
        let _ = std::fs::remove_file(&self.path);
        text
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        // SIGTERM: strace detaches from the tracee before it exits.
        // SAFETY: plain kill(2) of the strace child started above.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}
