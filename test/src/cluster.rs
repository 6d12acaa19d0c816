//! A throwaway PostgreSQL cluster per test.
//!
//! [`Cluster::builder`] runs initdb into a fresh directory, writes the
//! configuration, claims a TCP port and starts the server with `pg_ctl`, all
//! as the unprivileged OS user (PostgreSQL refuses root). Dropping the
//! cluster stops it immediately and deletes its directory, unless
//! `NEXTGRES_KEEP` is set or the test is panicking: then the directory and its
//! `server.log` stay and their path is printed.
//!
//! Server-side commands run as the OS user by `setuid` in the child (what
//! `runuser -u nextgres --` does, without PAM or an extra process in the way
//! of timeouts and signals). Client tools (psql, pgbench) run as the caller.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use postgres::Client;

use crate::cmd::{self, CmdOutput};
use crate::conn::{ConnInfo, CONNECT_TIMEOUT_SECS};
use crate::dirs::{self, TestDir};
use crate::env::{self, OsUser, PgInstall};
use crate::ports::{self, PortLease};
use crate::procs::{kill_postmaster_tree, postmaster_pid};
use crate::sql::{self, Activity, PasswordEncryption};
use crate::Error;

/// Superuser role that initdb creates (`-U postgres`).
pub const SUPERUSER: &str = "postgres";
/// Name of the preloaded library.
pub const EXTENSION_LIB: &str = "nextgres";
/// Our settings file, included at the end of postgresql.conf.
const CONF_FILE: &str = "nextgres_test.conf";
/// Longest Unix socket path (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How many times start is retried when someone else took our port.
const PORT_ATTEMPTS: usize = 5;

/// How `pg_ctl stop` shuts the server down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Wait for clients to disconnect.
    Smart,
    /// Terminate sessions, then shut down cleanly.
    Fast,
    /// Quit at once; crash recovery on next start.
    Immediate,
}

impl StopMode {
    pub fn as_str(self) -> &'static str {
        match self {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// Settings of a cluster to be started.
#[derive(Clone, Debug)]
pub struct Builder {
    major: u32,
    preload: bool,
    conf: Vec<String>,
    hba: Option<String>,
    auth_local: String,
    auth_host: String,
    max_connections: u32,
    listen_addresses: String,
    log_min_messages: String,
    start_timeout: Duration,
    label: Option<String>,
    base_backup: Option<String>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            major: env::pg_major(),
            preload: true,
            conf: Vec::new(),
            hba: None,
            auth_local: "trust".into(),
            auth_host: "trust".into(),
            max_connections: 300,
            listen_addresses: "127.0.0.1".into(),
            log_min_messages: "warning".into(),
            start_timeout: Duration::from_secs(60),
            label: None,
            base_backup: None,
        }
    }
}

impl Builder {
    /// PostgreSQL major version (default: `NEXTGRES_PG`, else 16).
    pub fn pg_major(mut self, major: u32) -> Self {
        self.major = major;
        self
    }

    /// Whether to set `shared_preload_libraries = 'nextgres'` (default true).
    /// Off runs plain PostgreSQL, e.g. to test the harness or compare.
    pub fn preload(mut self, on: bool) -> Self {
        self.preload = on;
        self
    }

    /// Adds a postgresql.conf line (`nextgres.pool_size = 4`); it comes after
    /// the harness defaults, so it can override them.
    pub fn conf(mut self, line: impl Into<String>) -> Self {
        self.conf.push(line.into());
        self
    }

    /// Replaces pg_hba.conf entirely (then `auth_local`/`auth_host` are unused).
    pub fn hba(mut self, text: impl Into<String>) -> Self {
        self.hba = Some(text.into());
        self
    }

    /// Method for Unix-socket connections of all roles except `postgres`,
    /// which stays `trust` so [`Cluster::admin`] keeps working.
    pub fn auth_local(mut self, method: impl Into<String>) -> Self {
        self.auth_local = method.into();
        self
    }

    /// Method for TCP connections from 127.0.0.1 and ::1, every role.
    pub fn auth_host(mut self, method: impl Into<String>) -> Self {
        self.auth_host = method.into();
        self
    }

    /// `max_connections` (default 300).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n;
        self
    }

    /// `listen_addresses` (default `127.0.0.1`).
    pub fn listen_addresses(mut self, addrs: impl Into<String>) -> Self {
        self.listen_addresses = addrs.into();
        self
    }

    /// `log_min_messages` (default `warning`, which includes LOG lines).
    pub fn log_min_messages(mut self, level: impl Into<String>) -> Self {
        self.log_min_messages = level.into();
        self
    }

    /// How long `pg_ctl start` may take (default 60 s).
    pub fn start_timeout(mut self, t: Duration) -> Self {
        self.start_timeout = t;
        self
    }

    /// Name of the cluster directory (default: the current test's name).
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// A standby instead of a fresh cluster: its data directory is
    /// `pg_basebackup -X stream -R -d <conninfo>` (run as the server's OS
    /// user; `-R` writes primary_conninfo with this conninfo and
    /// standby.signal), then the usual configuration on top.
    pub fn base_backup_from(mut self, conninfo: impl Into<String>) -> Self {
        self.base_backup = Some(conninfo.into());
        self
    }

    /// Starts the cluster; panics with the server log on failure.
    #[track_caller]
    pub fn start(self) -> Cluster {
        match self.try_start() {
            Ok(c) => c,
            Err(e) => panic!("starting PostgreSQL test cluster failed: {e}"),
        }
    }

    /// Starts the cluster.
    pub fn try_start(self) -> Result<Cluster, Error> {
        let install = PgInstall::resolve(self.major)?;
        if self.preload {
            let lib = install.pkglibdir()?.join(format!("{EXTENSION_LIB}.so"));
            if !lib.exists() {
                return Err(Error::new(format!(
                    "{} is missing: install the extension (cargo pgrx install --pg-config {}) or use .preload(false)",
                    lib.display(),
                    install.bin("pg_config").display()
                )));
            }
        }
        let owner = OsUser::for_server()?;
        let label = self.label.clone().unwrap_or_else(test_label);
        let dir = TestDir::create(&label, owner.as_ref())?;
        let lease = ports::lease(&dirs::root(), &[])?;
        let mut socket_dir = dir.path().join("s");
        let mut separate_socket_dir = false;
        if socket_dir.as_os_str().len() + "/.s.PGSQL.65535".len() > MAX_SOCKET_PATH {
            socket_dir = PathBuf::from(format!("/tmp/ngt-{}-{}", std::process::id(), lease.port()));
            separate_socket_dir = true;
        }
        let mut cluster = Cluster {
            data: dir.path().join("data"),
            logfile: dir.path().join("server.log"),
            conf_lines: Mutex::new(self.conf.clone()),
            keep: AtomicBool::new(false),
            install,
            owner,
            dir,
            socket_dir,
            separate_socket_dir,
            lease,
            settings: self,
        };
        // On error the cluster is dropped here: server stopped, directory removed.
        cluster.init_and_start().map_err(|e| {
            Error::new(format!(
                "{e}\n(cluster directory {})",
                cluster.dir.path().display()
            ))
        })?;
        Ok(cluster)
    }
}

/// A running (or stopped) test cluster. `Sync`: threads may share `&Cluster`.
#[derive(Debug)]
pub struct Cluster {
    install: PgInstall,
    owner: Option<OsUser>,
    dir: TestDir,
    data: PathBuf,
    socket_dir: PathBuf,
    separate_socket_dir: bool,
    logfile: PathBuf,
    lease: PortLease,
    settings: Builder,
    conf_lines: Mutex<Vec<String>>,
    keep: AtomicBool,
}

impl Cluster {
    /// A builder with the defaults described on its methods.
    pub fn builder() -> Builder {
        Builder::default()
    }

    // ---- lifecycle ------------------------------------------------------

    fn init_and_start(&mut self) -> Result<(), Error> {
        fs::create_dir_all(&self.socket_dir)
            .map_err(|e| Error::new(format!("creating {}: {e}", self.socket_dir.display())))?;
        self.dir.give_to(&self.socket_dir, self.owner.as_ref())?;

        let data = self.data.to_string_lossy().into_owned();
        if let Some(conninfo) = self.settings.base_backup.clone() {
            let mut bb = self.server_cmd("pg_basebackup");
            bb.env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT_SECS.to_string());
            bb.args(["-D", &data, "-X", "stream", "-R", "--no-sync", "-c", "fast", "-d", &conninfo]);
            let out = cmd::run(bb, Duration::from_secs(180))
                .map_err(|e| Error::new(format!("pg_basebackup: {e}")))?;
            if !out.success() {
                return Err(Error::new(format!("pg_basebackup failed:\n{out}")));
            }
            // -R writes every option its libpq knows, and the client tools'
            // libpq may be newer than the server's (sslnegotiation): give the
            // walreceiver exactly the conninfo asked for.
            let auto = self.data.join("postgresql.auto.conf");
            let text = fs::read_to_string(&auto).unwrap_or_default();
            let mut kept: String = text.lines().filter(|l| !l.starts_with("primary_conninfo")).map(|l| format!("{l}\n")).collect();
            kept.push_str(&format!("primary_conninfo = '{}'\n", conninfo.replace('\\', "\\\\").replace('\'', "''")));
            self.write_file(&auto, &kept)?;
            // The primary's postgresql.conf already includes CONF_FILE.
            self.write_hba()?;
            return self.start_on_free_port();
        }
        let mut initdb = self.server_cmd("initdb");
        initdb.args([
            "-D",
            &data,
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]);
        initdb.args(["-U", SUPERUSER, "--no-sync"]);
        let out = cmd::run(initdb, Duration::from_secs(180))
            .map_err(|e| Error::new(format!("initdb: {e}")))?;
        if !out.success() {
            return Err(Error::new(format!("initdb failed:\n{out}")));
        }

        self.write_hba()?;
        let mut pgconf = OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .map_err(|e| Error::new(format!("opening postgresql.conf: {e}")))?;
        writeln!(pgconf, "\ninclude '{CONF_FILE}'")
            .map_err(|e| Error::new(format!("appending to postgresql.conf: {e}")))?;
        self.start_on_free_port()
    }

    /// Writes the configuration and starts, on another port if the leased
    /// one was taken meanwhile.
    fn start_on_free_port(&mut self) -> Result<(), Error> {
        let mut tried = Vec::new();
        for attempt in 1..=PORT_ATTEMPTS {
            self.write_conf()?;
            let mark = self.log_mark();
            match self.start() {
                Ok(()) => return Ok(()),
                Err(e) if attempt < PORT_ATTEMPTS && port_conflict(&self.log_since(mark)) => {
                    eprintln!(
                        "nextgres-test: port {} was taken before the server bound it; retrying ({e})",
                        self.port()
                    );
                    tried.push(self.port());
                    self.lease = ports::lease(&dirs::root(), &tried)?;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// `pg_ctl start -w` on the current port and configuration; with
    /// nextgres preloaded, also waits for the pooler to serve.
    pub fn start(&self) -> Result<(), Error> {
        let mark = self.log_mark();
        let secs = self.settings.start_timeout.as_secs().max(1);
        let out = self.pg_ctl(
            &[
                "start",
                "-w",
                "-t",
                &secs.to_string(),
                "-l",
                &self.logfile.to_string_lossy(),
            ],
            Duration::from_secs(secs + 15),
        );
        if !out.success() {
            return Err(Error::new(format!(
                "pg_ctl start failed:\n{out}\n--- server log (tail) ---\n{}",
                self.log_tail(60)
            )));
        }
        // pg_ctl -w waits for the postmaster only. The pooler is a
        // background worker that starts later, and in takeover mode the
        // port accepts before it runs (the postmaster binds it for the
        // pooler in _PG_init and connections wait in the backlog), so an
        // accepting port does not mean that nextgres.status() shows it yet.
        if let Some(e) = self.wait_for_pooler(mark) {
            return Err(e);
        }
        let tcp_expected =
            self.settings.preload || !self.settings.listen_addresses.trim().is_empty();
        if tcp_expected && !self.wait_for_tcp(self.settings.start_timeout) {
            return Err(Error::new(format!(
                "server started but 127.0.0.1:{} accepts no connection\n--- server log (tail) ---\n{}",
                self.port(),
                self.log_tail(60)
            )));
        }
        Ok(())
    }

    /// If this start loaded nextgres, waits for the pooler's "pooler
    /// ready" line, logged once it has published its pid and port in
    /// shared memory. Loaded means a "nextgres: " line before pg_ctl
    /// returned: `_PG_init` always logs where the pooler listens, or why
    /// nowhere (the builder's `preload` is not enough: a test may drop the
    /// library from the configuration). Some error if the pooler is not
    /// ready within the start timeout, so a reworded line fails loudly.
    fn wait_for_pooler(&self, mark: usize) -> Option<Error> {
        const LOADED: &str = "nextgres: ";
        const READY: &str = "nextgres: pooler ready";
        if !self.log_since(mark).contains(LOADED) {
            return None;
        }
        let ready = crate::util::wait_until(self.settings.start_timeout, || self.log_since(mark).contains(READY));
        (!ready).then(|| {
            Error::new(format!(
                "server started but its pooler did not log \"{READY}\"\n--- server log (tail) ---\n{}",
                self.log_tail(60)
            ))
        })
    }

    /// Waits until 127.0.0.1:port accepts a TCP connection (no protocol
    /// exchange); false on timeout.
    pub fn wait_for_tcp(&self, timeout: Duration) -> bool {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port()));
        crate::util::wait_until(timeout, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        })
    }

    /// `pg_ctl stop -m MODE` with a 30 s limit; true if the server is down.
    pub fn stop(&self, mode: StopMode) -> bool {
        self.stop_timeout(mode, Duration::from_secs(30))
    }

    /// `pg_ctl stop -m MODE -t TIMEOUT`: true if the server went down in time
    /// (or was not running), false if it is still up. Never hangs.
    pub fn stop_timeout(&self, mode: StopMode, timeout: Duration) -> bool {
        if self.pid().is_none() {
            return true;
        }
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let out = self.pg_ctl(
            &["stop", "-m", mode.as_str(), "-w", "-t", &secs.to_string()],
            Duration::from_secs(secs + 15),
        );
        out.success() || self.pid().is_none()
    }

    /// Fast stop, then start on the same port.
    pub fn restart(&self) -> Result<(), Error> {
        if !self.stop(StopMode::Fast) {
            return Err(Error::new(format!(
                "restart: fast stop did not finish\n--- server log (tail) ---\n{}",
                self.log_tail(60)
            )));
        }
        self.start()
    }

    /// `pg_ctl reload` (SIGHUP): re-reads postgresql.conf and pg_hba.conf.
    pub fn reload(&self) -> Result<(), Error> {
        let out = self.pg_ctl(&["reload"], Duration::from_secs(30));
        if out.success() {
            Ok(())
        } else {
            Err(Error::new(format!("pg_ctl reload failed:\n{out}")))
        }
    }

    /// Appends a line to the harness's conf file. Takes effect on
    /// [`reload`](Self::reload) or [`restart`](Self::restart), as the GUC allows.
    pub fn append_conf(&self, line: impl Into<String>) -> Result<(), Error> {
        self.conf_lines.lock().expect("conf lock").push(line.into());
        self.write_conf()
    }

    /// Replaces pg_hba.conf; takes effect on [`reload`](Self::reload).
    pub fn set_hba(&self, text: &str) -> Result<(), Error> {
        self.write_file(&self.data.join("pg_hba.conf"), text)
    }

    /// Postmaster pid, if it is running (from `postmaster.pid`).
    pub fn pid(&self) -> Option<i32> {
        postmaster_pid(&self.data)
    }

    /// Is the postmaster running?
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Sends a signal to the postmaster (e.g. `libc::SIGKILL` for crash tests).
    pub fn signal_postmaster(&self, sig: i32) -> bool {
        match self.pid() {
            // SAFETY: plain kill(2).
            Some(pid) => unsafe { libc::kill(pid, sig) == 0 },
            None => false,
        }
    }

    /// Keep the directory after drop even if the test passes.
    pub fn keep(&self) {
        self.keep.store(true, Ordering::Relaxed);
    }

    // ---- where things are -------------------------------------------------

    /// The TCP port (also the number in the Unix socket's name).
    pub fn port(&self) -> u16 {
        self.lease.port()
    }

    /// Directory holding the Unix socket `.s.PGSQL.<port>`.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server's OS user: the owner of the data directory (the user the
    /// harness runs PostgreSQL as; peer/ident maps name it).
    pub fn server_os_user(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        crate::util::os_user_name(std::fs::metadata(self.data_dir()).expect("data dir").uid())
    }

    /// The cluster's scratch directory (data, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log file (`pg_ctl -l`).
    pub fn logfile(&self) -> &Path {
        &self.logfile
    }

    /// The installation under test.
    pub fn install(&self) -> &PgInstall {
        &self.install
    }

    /// Major version under test.
    pub fn pg_major(&self) -> u32 {
        self.install.major
    }

    // ---- server log -------------------------------------------------------

    /// The whole server log so far.
    pub fn log(&self) -> String {
        fs::read(&self.logfile)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Current end of the log, for [`log_since`](Self::log_since).
    pub fn log_mark(&self) -> usize {
        fs::metadata(&self.logfile)
            .map(|m| m.len() as usize)
            .unwrap_or(0)
    }

    /// Log text written after `mark`: assert on what one step logged.
    pub fn log_since(&self, mark: usize) -> String {
        let b = fs::read(&self.logfile).unwrap_or_default();
        String::from_utf8_lossy(b.get(mark..).unwrap_or_default()).into_owned()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    // ---- connections ------------------------------------------------------

    /// TCP connection parameters (127.0.0.1, this port).
    pub fn tcp(&self, user: &str, db: &str) -> ConnInfo {
        ConnInfo::new("127.0.0.1", self.port(), user, db)
    }

    /// Unix-socket connection parameters.
    pub fn unix(&self, user: &str, db: &str) -> ConnInfo {
        ConnInfo::new(self.socket_dir.to_string_lossy(), self.port(), user, db)
    }

    /// libpq string for TCP (password excluded; see [`ConnInfo`]).
    pub fn tcp_conninfo(&self, user: &str, db: &str) -> String {
        self.tcp(user, db).conninfo()
    }

    /// libpq string for the Unix socket.
    pub fn unix_conninfo(&self, user: &str, db: &str) -> String {
        self.unix(user, db).conninfo()
    }

    /// `postgresql://` URL for TCP, with the password if given.
    pub fn tcp_url(&self, user: &str, db: &str, password: Option<&str>) -> String {
        self.tcp(user, db).maybe_password(password).url()
    }

    /// rust-postgres client over TCP.
    pub fn connect_tcp(
        &self,
        user: &str,
        db: &str,
        password: Option<&str>,
    ) -> Result<Client, postgres::Error> {
        self.tcp(user, db).maybe_password(password).connect()
    }

    /// rust-postgres client over the Unix socket.
    pub fn connect_unix(
        &self,
        user: &str,
        db: &str,
        password: Option<&str>,
    ) -> Result<Client, postgres::Error> {
        self.unix(user, db).maybe_password(password).connect()
    }

    /// Superuser client over the Unix socket, straight to PostgreSQL (not
    /// through the pooler's TCP port). Panics with the log tail on failure.
    #[track_caller]
    pub fn admin(&self) -> Client {
        match self
            .unix(SUPERUSER, "postgres")
            .application_name("nextgres-test-admin")
            .connect()
        {
            Ok(c) => c,
            Err(e) => panic!(
                "admin connection to {} failed: {e:?}\n--- server log (tail) ---\n{}",
                self.unix_conninfo(SUPERUSER, "postgres"),
                self.log_tail(40)
            ),
        }
    }

    // ---- client tools -------------------------------------------------------

    /// `psql -X -v ON_ERROR_STOP=1 -d CONNINFO ARGS...`, 60 s limit.
    pub fn psql(&self, conn: &ConnInfo, args: &[&str]) -> CmdOutput {
        self.psql_timeout(conn, args, Duration::from_secs(60))
    }

    /// [`psql`](Self::psql) with its own limit.
    pub fn psql_timeout(&self, conn: &ConnInfo, args: &[&str], timeout: Duration) -> CmdOutput {
        let mut c = self.client_cmd("psql", conn);
        c.args(["-X", "-v", "ON_ERROR_STOP=1", "-d", &conn.conninfo()])
            .args(args);
        cmd::run(c, timeout).expect("starting psql (is postgresql-client installed?)")
    }

    /// Runs one statement with `psql -At -c` and returns its trimmed output;
    /// panics if psql fails.
    #[track_caller]
    pub fn psql_query(&self, conn: &ConnInfo, sql: &str) -> String {
        let out = self.psql(conn, &["-A", "-t", "-c", sql]);
        out.assert_success();
        out.stdout.trim().to_string()
    }

    /// `pg_isready -d CONNINFO`, 30 s limit: its exit code (0 accepting,
    /// 1 rejecting, 2 no response, 3 no attempt; None when killed).
    pub fn pg_isready(&self, conn: &ConnInfo) -> Option<i32> {
        let mut c = self.client_cmd("pg_isready", conn);
        c.args(["-d", &conn.conninfo()]);
        let out = cmd::run(c, Duration::from_secs(30)).expect("starting pg_isready");
        out.status.and_then(|s| s.code())
    }

    /// `pgbench -h -p -U ARGS... DBNAME`, 300 s limit.
    pub fn pgbench(&self, conn: &ConnInfo, args: &[&str]) -> CmdOutput {
        self.pgbench_timeout(conn, args, Duration::from_secs(300))
    }

    /// [`pgbench`](Self::pgbench) with its own limit.
    pub fn pgbench_timeout(&self, conn: &ConnInfo, args: &[&str], timeout: Duration) -> CmdOutput {
        let mut c = self.client_cmd("pgbench", conn);
        let port = conn.port.to_string();
        c.args(["-h", &conn.host, "-p", &port, "-U", &conn.user])
            .args(args)
            .arg(&conn.dbname);
        cmd::run(c, timeout).expect("starting pgbench (is postgresql-contrib/client installed?)")
    }

    /// `pgbench -i -q -s SCALE`: creates the pgbench tables.
    pub fn pgbench_init(&self, conn: &ConnInfo, scale: u32) -> CmdOutput {
        self.pgbench(conn, &["-i", "-q", "-s", &scale.to_string()])
    }

    // ---- roles and activity -------------------------------------------------

    /// Creates a LOGIN role with a password stored as `enc`
    /// (scram-sha-256 or md5). Panics on error.
    #[track_caller]
    pub fn create_role(&self, name: &str, password: &str, enc: PasswordEncryption) {
        if let Err(e) = sql::create_role(&mut self.admin(), name, password, enc) {
            panic!("creating role {name}: {e:?}");
        }
    }

    /// Creates a database owned by `owner`. Panics on error.
    #[track_caller]
    pub fn create_database(&self, name: &str, owner: &str) {
        let q = format!(
            "CREATE DATABASE {} OWNER {}",
            sql::quote_ident(name),
            sql::quote_ident(owner)
        );
        if let Err(e) = self.admin().batch_execute(&q) {
            panic!("{q}: {e:?}");
        }
    }

    /// pg_stat_activity, minus the admin connection used to read it.
    #[track_caller]
    pub fn activity(&self) -> Vec<Activity> {
        sql::activity(&mut self.admin())
            .unwrap_or_else(|e| panic!("reading pg_stat_activity: {e:?}"))
    }

    /// Pids of client backends (`backend_type = 'client backend'`) for this
    /// user and database (`None` = any), excluding the admin connection.
    pub fn backend_pids(&self, user: Option<&str>, db: Option<&str>) -> Vec<i32> {
        self.activity()
            .into_iter()
            .filter(|a| a.backend_type.as_deref() == Some("client backend") && a.matches(user, db))
            .map(|a| a.pid)
            .collect()
    }

    /// How many [`backend_pids`](Self::backend_pids) there are.
    pub fn backend_count(&self, user: Option<&str>, db: Option<&str>) -> usize {
        self.backend_pids(user, db).len()
    }

    // ---- internals ----------------------------------------------------------

    /// A server-side program of this installation, run as the OS user.
    fn server_cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(self.install.bin(prog));
        cmd::scrub_pg_env(&mut c);
        c.env("LC_ALL", "C.UTF-8").current_dir(self.dir.path());
        if let Some(u) = &self.owner {
            c.uid(u.uid)
                .gid(u.gid)
                .env("HOME", self.dir.path())
                .env("USER", &u.name);
        }
        c
    }

    fn pg_ctl(&self, args: &[&str], timeout: Duration) -> CmdOutput {
        let mut c = self.server_cmd("pg_ctl");
        c.args(["-D", &self.data.to_string_lossy()]).args(args);
        cmd::run(c, timeout).expect("starting pg_ctl")
    }

    fn client_cmd(&self, prog: &str, conn: &ConnInfo) -> Command {
        let mut c = Command::new(self.install.client_bin(prog));
        cmd::scrub_pg_env(&mut c);
        c.env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT_SECS.to_string());
        if let Some(p) = &conn.password {
            c.env("PGPASSWORD", p);
        }
        c
    }

    fn write_file(&self, path: &Path, text: &str) -> Result<(), Error> {
        fs::write(path, text)
            .map_err(|e| Error::new(format!("writing {}: {e}", path.display())))?;
        self.dir.give_to(path, self.owner.as_ref())
    }

    fn write_hba(&self) -> Result<(), Error> {
        let s = &self.settings;
        let text = match &s.hba {
            Some(t) => t.clone(),
            None => format!(
                "# Written by nextgres-test.\n\
                 local all {SUPERUSER} trust\n\
                 local all all {local}\n\
                 local replication all {local}\n\
                 host all all 127.0.0.1/32 {host}\n\
                 host all all ::1/128 {host}\n\
                 host replication all 127.0.0.1/32 {host}\n\
                 host replication all ::1/128 {host}\n",
                local = s.auth_local,
                host = s.auth_host
            ),
        };
        self.set_hba(&text)
    }

    fn write_conf(&self) -> Result<(), Error> {
        let s = &self.settings;
        let mut text = format!(
            "# Written by nextgres-test; later lines win.\n\
             port = {port}\n\
             listen_addresses = '{listen}'\n\
             unix_socket_directories = '{sock}'\n\
             unix_socket_permissions = 0777\n\
             max_connections = {maxconn}\n\
             shared_buffers = 16MB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             logging_collector = off\n\
             log_min_messages = {level}\n\
             log_line_prefix = '%m [%p] %b %q%u@%d '\n",
            port = self.port(),
            listen = s.listen_addresses,
            sock = self.socket_dir.display(),
            maxconn = s.max_connections,
            level = s.log_min_messages,
        );
        if s.preload {
            text.push_str(&format!("shared_preload_libraries = '{EXTENSION_LIB}'\n"));
            // Most suites watch backends park after every transaction (the
            // handoff path every saturated pool takes); tests of the default
            // behaviour, which keeps idle clients while nobody waits, add
            // `.conf("nextgres.hold_idle_clients = on")`.
            text.push_str("nextgres.hold_idle_clients = off\n");
            // NEXTGRES_TEST_EXTRA_CONF: lines every suite's servers get
            // (before each test's own), to run a whole suite under a
            // setting, e.g. `nextgres.kernel_queue = on`.
            if let Ok(extra) = std::env::var("NEXTGRES_TEST_EXTRA_CONF") {
                for line in extra.split(';').map(str::trim).filter(|l| !l.is_empty()) {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        for line in self.conf_lines.lock().expect("conf lock").iter() {
            text.push_str(line);
            text.push('\n');
        }
        self.write_file(&self.data.join(CONF_FILE), &text)
    }

    /// Stops the server no matter what: immediate stop, then SIGKILL.
    fn shutdown_hard(&self) {
        if let Some(pid) = self.pid() {
            if !self.stop_timeout(StopMode::Immediate, Duration::from_secs(10)) {
                eprintln!("nextgres-test: immediate stop failed; killing postmaster {pid}");
                kill_postmaster_tree(pid, &self.data);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown_hard();
        let keep =
            self.keep.load(Ordering::Relaxed) || dirs::keep_requested() || std::thread::panicking();
        if keep {
            self.dir.mark_keep();
            eprintln!(
                "nextgres-test: kept cluster directory {} (log: {})",
                self.dir.path().display(),
                self.logfile.display()
            );
        } else {
            self.dir.remove();
            if self.separate_socket_dir {
                let _ = fs::remove_dir_all(&self.socket_dir);
            }
        }
    }
}

/// Did this log excerpt fail because the port was taken?
fn port_conflict(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("could not create any TCP/IP sockets")
}

/// The running test's name, as libtest names its thread, made path-safe.
fn test_label() -> String {
    let name = std::thread::current()
        .name()
        .unwrap_or("cluster")
        .to_string();
    let last = name.rsplit("::").next().unwrap_or(&name);
    let clean: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    if clean.is_empty() || clean == "main" {
        "cluster".into()
    } else {
        clean
    }
}

/// Guard for a test body: if the test panics (an assertion, or a timeout of
/// [`Cluster::run_bounded`]), prints the server log tail, keeps the cluster
/// directory and stops the server at once, so a body thread stuck on a
/// socket comes loose.
pub struct StopOnFailure(pub std::sync::Arc<Cluster>);

impl Drop for StopOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.keep();
            eprintln!("--- server log (tail) ---\n{}", self.0.log_tail(100));
            self.0.stop_timeout(StopMode::Immediate, Duration::from_secs(10));
        }
    }
}

impl Cluster {
    /// Runs `body` on its own thread, failing the test if it takes longer
    /// than `limit`; see [`StopOnFailure`] for what a failure leaves.
    pub fn run_bounded(self: &std::sync::Arc<Self>, limit: Duration, body: impl FnOnce(&Cluster) + Send + 'static) {
        let guard = StopOnFailure(self.clone());
        let pg = self.clone();
        let name = std::thread::current().name().unwrap_or("test").to_string();
        crate::util::with_timeout(limit, &name, move || body(&pg));
        drop(guard);
    }
}

/// The FATAL lines in `log` with their DETAIL and HINT (continuation lines
/// joined), of the log_line_prefix only the client's `%u@%d` (the last
/// field of the test clusters' prefix): what the server logs for a
/// refused login, to compare a direct refusal with a pooled one.
pub fn refusal_log(log: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut in_fatal = false;
    let mut continuing = false;
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix('\t') {
            if continuing {
                if let Some(last) = out.last_mut() {
                    last.push('\n');
                    last.push_str(rest);
                }
            }
            continue;
        }
        continuing = false;
        let Some((sev, prefix, text)) = ["FATAL", "DETAIL", "HINT", "LOG", "WARNING", "ERROR", "STATEMENT", "CONTEXT"]
            .iter()
            .find_map(|sev| line.split_once(&format!(" {sev}:  ")).map(|(p, t)| (*sev, p, t)))
        else {
            continue;
        };
        match sev {
            "FATAL" => in_fatal = true,
            "DETAIL" | "HINT" if in_fatal => {}
            _ => {
                in_fatal = false;
                continue;
            }
        }
        if sev == "FATAL" {
            // The prefix's last field: the test clusters' `%u@%d`.
            let who = prefix.rsplit(' ').next().unwrap_or_default();
            out.push(format!("{sev} ({who}): {text}"));
        } else {
            out.push(format!("{sev}: {text}"));
        }
        continuing = true;
    }
    out
}
