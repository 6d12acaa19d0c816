//! Per-cluster scratch directories under `/tmp/nextgres-test`.
//!
//! Each cluster gets `<root>/<test-name>-<pid>-<n>/`, owned by the server's OS
//! user, holding `data/`, the socket dir `s/` and `server.log`. The name says
//! which test made it, so a kept directory is easy to find. The root is short
//! on purpose: Unix socket paths are limited to 107 bytes.
//!
//! A test process killed hard (CI timeout, SIGKILL) cannot run `Drop`, so the
//! first cluster of every process reaps directories whose creating process is
//! gone: it stops their postmaster and removes them (unless marked KEEP).

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use crate::env::OsUser;
use crate::Error;

const OWNER_FILE: &str = "owner.pid";
const KEEP_FILE: &str = "KEEP";

/// The directory all clusters live under (`NEXTGRES_TEST_ROOT`, default
/// `/tmp/nextgres-test`).
pub fn root() -> PathBuf {
    std::env::var_os("NEXTGRES_TEST_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/nextgres-test"))
}

/// True when `NEXTGRES_KEEP` asks to keep every cluster directory.
pub fn keep_requested() -> bool {
    std::env::var("NEXTGRES_KEEP").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// A fresh directory for one cluster.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `<root>/<label>-<pid>-<n>` owned by `owner` (when running as root).
    pub fn create(label: &str, owner: Option<&OsUser>) -> Result<TestDir, Error> {
        let root = root();
        fs::create_dir_all(&root)
            .map_err(|e| Error::new(format!("creating {}: {e}", root.display())))?;
        // Sticky and world-writable like /tmp: root and non-root runs share it,
        // and the server user must be able to traverse it.
        let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o1777));
        static REAP: Once = Once::new();
        REAP.call_once(|| reap_stale(&root));

        static SEQ: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        loop {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            let path = root.join(format!("{label}-{pid}-{n}"));
            match fs::create_dir(&path) {
                Ok(()) => {
                    fs::write(path.join(OWNER_FILE), pid.to_string()).map_err(|e| {
                        Error::new(format!("writing owner file in {}: {e}", path.display()))
                    })?;
                    let dir = TestDir { path };
                    dir.give_to(&dir.path, owner)?;
                    return Ok(dir);
                }
                // A dead run of a process with our pid left it: take the next n.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::new(format!("creating {}: {e}", path.display()))),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes a path of ours belong to the server's OS user.
    pub fn give_to(&self, p: &Path, owner: Option<&OsUser>) -> Result<(), Error> {
        if let Some(u) = owner {
            std::os::unix::fs::chown(p, Some(u.uid), Some(u.gid))
                .map_err(|e| Error::new(format!("chown {} to {}: {e}", p.display(), u.name)))?;
        }
        Ok(())
    }

    /// Marks the directory as kept (the reaper leaves it alone).
    pub fn mark_keep(&self) {
        let _ = fs::write(self.path.join(KEEP_FILE), "kept for debugging\n");
    }

    /// Deletes the directory and everything in it.
    pub fn remove(&self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!(
                "nextgres-test: could not remove {}: {e}",
                self.path.display()
            );
        }
    }
}

/// Removes cluster directories whose creating process has died, stopping any
/// postmaster still running in them.
fn reap_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() || dir.join(KEEP_FILE).exists() {
            continue;
        }
        let Some(owner) = fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            continue; // ports/, or a directory being created right now
        };
        if crate::procs::process_alive(owner) {
            continue;
        }
        let data = dir.join("data");
        if let Some(pm) = crate::procs::postmaster_pid(&data) {
            crate::procs::kill_postmaster_tree(pm, &data);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
