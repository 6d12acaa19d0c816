//! Child processes with a hard deadline.
//!
//! A hung server must fail a test, never hang CI: every process the harness
//! starts goes through [`run`], which kills the child's whole process group
//! when its time is up and still returns what it printed so far.

use std::fmt;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a child printed and how it ended.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command as run (program and arguments), for messages.
    pub cmdline: String,
    /// Exit status; `None` only if it could not be collected.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    /// True when the deadline passed and the child was killed.
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl CmdOutput {
    /// Exited by itself with status 0.
    pub fn success(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    /// Exit code, if it exited (not killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Panics with everything the child printed unless it succeeded.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed:\n{self}");
        self
    }

    /// Panics unless it ran to completion and failed (e.g. a wrong password).
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(
            !self.timed_out && !self.success(),
            "command was expected to fail:\n{self}"
        );
        self
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match (self.timed_out, self.status) {
            (true, _) => format!("KILLED after timeout ({:?})", self.elapsed),
            (false, Some(s)) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exit code {c} after {:?}", self.elapsed),
                (None, Some(sig)) => format!("killed by signal {sig} after {:?}", self.elapsed),
                _ => format!("{s} after {:?}", self.elapsed),
            },
            (false, None) => "no exit status".to_string(),
        };
        writeln!(f, "$ {}\n{how}", self.cmdline)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// Runs `cmd` with stdin closed and output captured; kills its process group
/// after `timeout`. Errors only when the program cannot be started.
pub fn run(mut cmd: Command, timeout: Duration) -> io::Result<CmdOutput> {
    let cmdline = describe(&cmd);
    // Own process group: a timeout kills grandchildren too (pg_ctl's shell,
    // psql's pager...), and a terminal Ctrl-C is not delivered twice.
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {cmdline}: {e}")))?;
    let stdout = drain(child.stdout.take().expect("stdout was piped"));
    let stderr = drain(child.stderr.take().expect("stderr was piped"));

    let mut timed_out = false;
    let mut nap = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if start.elapsed() >= timeout => {
                timed_out = true;
                // SAFETY: plain kill(2) on the group we created above.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                break child.wait().ok();
            }
            Ok(None) => {
                std::thread::sleep(nap);
                nap = (nap * 2).min(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("waiting for {cmdline}: {e}"),
                ));
            }
        }
    };
    let elapsed = start.elapsed();
    // A daemon left behind (postmaster) might keep a pipe open; don't wait on it for long.
    let grace = Duration::from_secs(2);
    let stdout = stdout.recv_timeout(grace).unwrap_or_default();
    let stderr = stderr.recv_timeout(grace).unwrap_or_default();
    Ok(CmdOutput {
        cmdline,
        status,
        stdout,
        stderr,
        timed_out,
        elapsed,
    })
}

fn drain(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            s.push_str(&format!("'{}'", a.replace('\'', "'\\''")));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Removes every `PG*` variable a developer's shell may carry (PGHOST,
/// PGPORT, PGDATA...) so they cannot redirect a test, and points libpq's
/// (and asyncpg's) password file at a path that does not exist: a
/// `~/.pgpass` of the user running the tests would otherwise supply a
/// password to the logins a test makes without one and expects refused
/// (seen: a `*:*:*:*:pw` line turned a refused replication login into a
/// success on the direct server).
pub fn scrub_pg_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&k);
        }
    }
    cmd.env("PGPASSFILE", "/nonexistent/nextgres-test/pgpass");
}
