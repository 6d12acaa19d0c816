//! TCP ports for test clusters.
//!
//! Threads of one test binary and separate test processes (nextest, two
//! `cargo test` at once) must never pick the same port. A port is claimed by
//! an exclusive `flock` on `<root>/ports/<port>.lock`, held for the cluster's
//! whole life: flock conflicts between threads of one process as well as
//! between processes, and the kernel drops it if the process dies, so there is
//! nothing stale to clean. A bind probe on 127.0.0.1 then skips ports some
//! other program uses. Ports come from 20000..32000, below Linux's ephemeral
//! range (32768+), so the client sockets of pgbench & co never land on them.
//! A program outside the harness can still grab the port before the server
//! binds it; `Builder::try_start` retries with another port then.

use std::collections::hash_map::RandomState;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::Error;

const FIRST: u16 = 20000;
const COUNT: u16 = 12000;

/// A claimed port; the claim ends when this is dropped.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    _lock: File,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Claims a free port, skipping those in `avoid` (ports that just failed).
pub fn lease(root: &Path, avoid: &[u16]) -> Result<PortLease, Error> {
    let dir = root.join("ports");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::new(format!("creating {}: {e}", dir.display())))?;
    // Shared by root and non-root runs.
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777));

    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let start = (h.finish() % COUNT as u64) as u16;
    for i in 0..COUNT {
        let port = FIRST + (start + i) % COUNT;
        if avoid.contains(&port) {
            continue;
        }
        let path = dir.join(format!("{port}.lock"));
        // flock needs no write access: fall back to read-only for a lock
        // file another user created.
        let opened = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path);
        let Ok(file) = opened.or_else(|_| File::open(&path)) else {
            continue;
        };
        let _ = file.set_permissions(std::fs::Permissions::from_mode(0o666));
        if file.try_lock().is_err() {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        return Ok(PortLease { port, _lock: file });
    }
    Err(Error::new(format!(
        "no free TCP port in {FIRST}..{}",
        FIRST + COUNT
    )))
}
