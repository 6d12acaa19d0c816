//! End-to-end test harness for nextgres.
//!
//! Each test starts its own PostgreSQL cluster ([`Cluster`]) in a fresh
//! directory on a fresh port, talks to it with rust-postgres, psql and
//! pgbench, and drops it. Nothing here links PostgreSQL or pgrx: the
//! extension is tested exactly as clients see it.
//!
//! ```no_run
//! use nextgres_test::{Cluster, StopMode};
//! let pg = Cluster::builder().preload(true).conf("nextgres.pool_size = 4").start();
//! let mut c = pg.connect_tcp("postgres", "postgres", None).expect("connect");
//! assert_eq!(c.query_one("SELECT 1", &[]).expect("select").get::<_, i32>(0), 1);
//! assert!(pg.stop(StopMode::Fast));
//! ```
//!
//! Environment:
//! - `NEXTGRES_PG` = 15 | 16 (default 16): version under test;
//!   `NEXTGRES_PG_BINDIR` overrides where its binaries are.
//! - `NEXTGRES_KEEP` = 1: keep every cluster directory (they are always kept
//!   when a test panics); the path is printed on stderr.
//! - `NEXTGRES_OS_USER` (default `nextgres`): who runs the server when the
//!   tests run as root. `NEXTGRES_TEST_ROOT` (default `/tmp/nextgres-test`).
//!
//! Tests of one binary run on parallel threads and the harness keeps them
//! apart (own directory, socket and port each), but the suite is meant to run
//! with `--test-threads=2` on the 2-core test machine: every cluster is a
//! whole PostgreSQL, and more at once only makes timing-sensitive tests flaky.

pub mod cluster;
pub mod cmd;
pub mod conn;
pub mod dirs;
pub mod env;
pub mod pgbench;
pub mod ports;
pub mod procs;
pub mod raw;
pub mod sql;
pub mod tls;
pub mod util;

pub use cluster::{refusal_log, Builder, Cluster, StopMode, StopOnFailure, SUPERUSER};
pub use cmd::CmdOutput;
pub use conn::ConnInfo;
pub use env::{pg_major, PgInstall};
pub use pgbench::{parse_summary, PgbenchSummary};
pub use sql::{quote_ident, quote_literal, Activity, PasswordEncryption};
pub use util::{os_user_name, wait_until, with_timeout};

use std::fmt;

/// A harness failure (environment, initdb, pg_ctl), with the text needed to
/// debug it: command output and the server log tail.
#[derive(Debug, Clone)]
pub struct Error(String);

impl Error {
    pub fn new(msg: impl Into<String>) -> Error {
        Error(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}
