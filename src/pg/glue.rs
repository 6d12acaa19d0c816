//! Rust side of `glue.c`. Each C function catches its own errors, so calling it
//! never longjmps through Rust frames.
use std::ffi::{c_char, c_int, c_long, c_void, CStr, CString};

#[repr(C)]
pub struct NgError {
    pub sqlstate: [c_char; 6],
    pub message: [c_char; 512],
    pub detail: [c_char; 512],
    pub hint: [c_char; 512],
}

impl NgError {
    pub fn new() -> Self {
        NgError { sqlstate: [0; 6], message: [0; 512], detail: [0; 512], hint: [0; 512] }
    }
    /// As a FATAL ErrorResponse for the client.
    pub fn to_fatal(&self) -> nextgres_core::proto::ErrorFields {
        let opt = |f: &[c_char]| Some(cstr_field(f)).filter(|s| !s.is_empty());
        nextgres_core::proto::ErrorFields {
            severity: "FATAL".into(),
            sqlstate: cstr_field(&self.sqlstate),
            message: cstr_field(&self.message),
            detail: opt(&self.detail),
            hint: opt(&self.hint),
        }
    }
    pub fn message(&self) -> String {
        cstr_field(&self.message)
    }
}

/// Auth methods as the glue maps them from the server's `UserAuth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HbaMethod {
    ImplicitReject,
    Reject,
    Trust,
    Password,
    Md5,
    Scram,
    Other,
    /// `cert`: the client certificate's name decides (auth.c CheckCertAuth()).
    Cert,
}

#[repr(C)]
pub struct NgLoginInfo {
    pub hba_method: c_int,
    pub hba_line: c_int,
    pub hba_method_name: [c_char; 32],
    pub hba_file: [c_char; 1024],
    pub role_exists: bool,
    pub role_oid: u32,
    pub role_canlogin: bool,
    pub role_super: bool,
    pub role_connlimit: c_int,
    pub has_secret: bool,
    pub secret: [c_char; 1024],
    pub secret_detail: [c_char; 256],
    pub db_exists: bool,
    pub db_oid: u32,
    pub db_allowconn: bool,
    pub db_connlimit: c_int,
    pub db_can_connect: bool,
    /// The matching line's `clientcert`: 0 off, 1 verify-ca, 2 verify-full.
    pub hba_clientcert: c_int,
    /// The line's `clientname=DN` (else the certificate's CN is matched).
    pub hba_clientname_dn: bool,
    /// The line's `map=`, empty without one.
    pub hba_usermap: [c_char; 256],
    /// map= longer than hba_usermap holds: a certificate login is refused
    /// rather than matched under a truncated map name.
    pub hba_usermap_too_long: bool,
    /// auth.c auth_failed()'s DETAIL naming the matched line.
    pub hba_match_detail: [c_char; 1536],
}

impl NgLoginInfo {
    pub fn method(&self) -> HbaMethod {
        match self.hba_method {
            0 => HbaMethod::ImplicitReject,
            1 => HbaMethod::Reject,
            2 => HbaMethod::Trust,
            3 => HbaMethod::Password,
            4 => HbaMethod::Md5,
            5 => HbaMethod::Scram,
            7 => HbaMethod::Cert,
            _ => HbaMethod::Other,
        }
    }
    pub fn method_name(&self) -> String {
        cstr_field(&self.hba_method_name)
    }
    /// The hba file the matching line is in.
    pub fn hba_file(&self) -> String {
        cstr_field(&self.hba_file)
    }
    /// The server log's DETAIL for an authentication failure on the
    /// matched line (auth.c auth_failed(): `Connection matched ...`).
    pub fn hba_match_detail(&self) -> String {
        cstr_field(&self.hba_match_detail)
    }
    /// The stored secret; the buffer is wiped on drop.
    pub fn secret(&self) -> Option<String> {
        self.has_secret.then(|| cstr_field(&self.secret))
    }
    pub fn usermap(&self) -> String {
        cstr_field(&self.hba_usermap)
    }
    pub fn secret_detail(&self) -> String {
        cstr_field(&self.secret_detail)
    }
}

impl Drop for NgLoginInfo {
    fn drop(&mut self) {
        for b in self.secret.iter_mut() {
            // volatile so the wipe is not optimised away
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

fn cstr_field(f: &[c_char]) -> String {
    let bytes: Vec<u8> = f.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

extern "C" {
    fn ng_run_guarded(f: extern "C" fn());
    fn ng_mock_scram_iterations() -> c_int;
    fn ng_server_has_direct_tls() -> bool;
    fn ng_server_protocol(newest_minor: *mut c_int, max_cancel_key: *mut c_int);
    fn ng_port_sock() -> c_int;
    fn ng_backend_identity(pid: c_int, role: *mut u32, db: *mut u32) -> c_int;
    fn ng_recv_buffer_empty() -> bool;
    fn ng_consume_buffered_terminate() -> bool;
    fn ng_febe_attach();
    fn ng_febe_detach();
    fn ng_port_set_sock(fd: c_int);
    fn ng_connection_check_stop();
    fn ng_park_wait_set_create(control_fd: c_int, queue_fd: c_int, hold_fd: c_int) -> *mut c_void;
    fn ng_park_wait(set: *mut c_void, timeout_ms: c_long) -> c_int;
    fn ng_park_watch_queue(set: *mut c_void, on: bool);
    fn ng_park_service_interrupts();
    fn ng_clear_stale_cancel();
    fn ng_linger_wait(timeout_ms: c_long) -> c_int;
    fn ng_linger_service_interrupts();
    fn ng_idle_session_timer_suspend() -> bool;
    fn ng_idle_session_timer_resume();
    fn ng_set_client_addr(
        addr: *const libc::sockaddr_storage,
        len: libc::socklen_t,
        local: *const libc::sockaddr_storage,
        local_len: libc::socklen_t,
    );
    fn ng_report_parked();
    fn ng_set_client_identity(method: c_int, id: *const c_char, len: c_int) -> bool;
    fn ng_fire_login_triggers();
    fn ng_set_ssl_status(
        on: bool,
        bits: c_int,
        version: *const c_char,
        cipher: *const c_char,
        client_dn: *const c_char,
        client_serial: *const c_char,
        issuer_dn: *const c_char,
    );
    fn ng_port_take_option(port: *mut c_void, name: *const c_char, buf: *mut c_char, len: usize) -> bool;
    fn ng_port_peer_pid(port: *mut c_void) -> c_int;
    fn ng_my_cancel_key(buf: *mut u8, len: c_int) -> c_int;
    fn ng_server_authenticate() -> bool;
    fn ng_pooler_guard_stale_hba_contexts();
    fn ng_load_hba(err: *mut NgError) -> bool;
    fn ng_load_ident(err: *mut NgError) -> bool;
    fn ng_install_auth_file_keeper() -> bool;
    fn ng_ident_kept() -> bool;
    fn ng_hba_kept() -> bool;
    fn ng_server_tls_config_loads() -> bool;
    fn ng_check_usermap(usermap: *const c_char, pg_user: *const c_char, system_user: *const c_char, err: *mut NgError) -> c_int;
    fn ng_login_lookup(
        database: *const c_char,
        user: *const c_char,
        addr: *const libc::sockaddr_storage,
        len: libc::socklen_t,
        ssl_in_use: bool,
        replication: c_int,
        out: *mut NgLoginInfo,
        err: *mut NgError,
    ) -> bool;
    fn ng_pooler_check_interrupts();
    fn ng_validate_setting(
        name: *const c_char,
        value: *const c_char,
        superuser: bool,
        role: u32,
        shown: *mut c_char,
        shown_len: c_int,
        err: *mut NgError,
    ) -> bool;
    fn ng_login_params(
        role: u32,
        names: *const c_char,
        n: c_int,
        settings: *const c_char,
        nsettings: c_int,
        out: *mut c_char,
        out_len: c_int,
        used: *mut c_int,
        err: *mut NgError,
    ) -> bool;
    fn ng_pooler_catalog_heap_scans();
    fn ng_agent_acl_init();
    fn ng_pooler_child_init();
    fn ng_postmaster_watch_fd() -> c_int;
}

/// The protocol of the server nextgres was built for (`PG_PROTOCOL_LATEST`
/// and its longest cancel key; see glue.c).
pub fn server_protocol() -> nextgres_core::proto::ServerProtocol {
    let (mut minor, mut key) = (0, 4);
    unsafe { ng_server_protocol(&mut minor, &mut key) };
    nextgres_core::proto::ServerProtocol { newest_minor: minor as u16, max_cancel_key: key as usize, clean_escapes: super::session::CLEAN_ESCAPES }
}

/// The server built for takes direct TLS and answers ALPN `postgresql`
/// (PostgreSQL 17+; see glue.c).
pub fn server_has_direct_tls() -> bool {
    unsafe { ng_server_has_direct_tls() }
}

/// Iterations of the server's mock SCRAM secret for roles without one (see
/// glue.c: `scram_iterations` on the 2026-08 minor releases and later, else
/// 4096).
pub fn mock_scram_iterations() -> u32 {
    (unsafe { ng_mock_scram_iterations() }).max(1) as u32
}

// ---- pooled backends -------------------------------------------------------

/// `MyProcPort->sock`: the fd the server reads and writes the client on.
pub fn port_sock() -> i32 {
    unsafe { ng_port_sock() }
}

/// The role and database (oids) the live backend with this pid logged in
/// as, from its PGPROC (`roleId`, `databaseId`: set during InitPostgres,
/// before its first ReadyForQuery; miscinit.c `InitializeSessionUserId`,
/// postinit.c). `Ok(None)` when no backend has that pid (it ended). Takes
/// ProcArrayLock: the agent only (`pooler::agent::backend_identity`).
/// `Err(NoPgproc)` in a process without a PGPROC (the pooler), always,
/// not only when the lock is contended (a wait there is a PANIC).
pub fn backend_identity(pid: i32) -> Result<Option<(u32, u32)>, NoPgproc> {
    let (mut role, mut db) = (0u32, 0u32);
    // SAFETY: plain out-parameters; the C side takes ProcArrayLock itself.
    match unsafe { ng_backend_identity(pid, &mut role, &mut db) } {
        1 => Ok(Some((role, db))),
        0 => Ok(None),
        _ => Err(NoPgproc),
    }
}

/// A shared-memory lock was asked for in a process with no PGPROC.
#[derive(Debug)]
pub struct NoPgproc;

/// True when libpq's receive buffer holds no unread (pipelined) input.
pub fn recv_buffer_empty() -> bool {
    unsafe { ng_recv_buffer_empty() }
}

/// Consumes a buffered Terminate (client leaving); true if there was one.
pub fn consume_buffered_terminate() -> bool {
    unsafe { ng_consume_buffered_terminate() }
}

/// Must follow every change of the socket under `MyProcPort->sock`
/// (`set_port_sock`, or a dup2() onto it): the FE/BE wait set watches it
/// from then on (epoll tracks open files, not fd numbers). A failure of the
/// wait set's system calls is a FATAL (XX000), never an ERROR.
pub fn febe_attach() {
    unsafe { ng_febe_attach() }
}

/// Must precede every change of the socket under `MyProcPort->sock`. Stops
/// the connection-check timer too (`connection_check_stop`).
pub fn febe_detach() {
    unsafe { ng_febe_detach() }
}

/// Points `MyProcPort->sock` (and the FE/BE wait set's socket entry) at
/// `fd`, between `febe_detach` and `febe_attach`. The fd it held stays open:
/// the caller closes it.
pub fn set_port_sock(fd: i32) {
    unsafe { ng_port_set_sock(fd) }
}

/// Stops `client_connection_check_interval`'s timer until the client's
/// next statement arms it again: between transactions the backend watches
/// its client (or has none) itself (glue.c).
pub fn connection_check_stop() {
    unsafe { ng_connection_check_stop() }
}

pub struct ParkWaitSet(*mut c_void);

pub enum ParkEvent {
    Timeout,
    Control,
    /// The kernel queue (`ParkWaitSet::with_queue`) has a ready client.
    Queue,
    /// The client kept idle (`ParkWaitSet::with_queue`'s `hold_fd`) is readable.
    Hold,
    Latch,
    PostmasterDeath,
}

impl ParkWaitSet {
    pub fn new(control_fd: i32) -> Self {
        ParkWaitSet(unsafe { ng_park_wait_set_create(control_fd, -1, -1) })
    }
    /// Also waits for a ready client in the kernel queue `queue_fd` (an
    /// epoll instance), reported as `ParkEvent::Queue`, and for `hold_fd`
    /// (an epoll instance with the socket of a client kept idle, or
    /// empty; -1: none) to be readable, `ParkEvent::Hold`.
    pub fn with_queue(control_fd: i32, queue_fd: i32, hold_fd: i32) -> Self {
        ParkWaitSet(unsafe { ng_park_wait_set_create(control_fd, queue_fd, hold_fd) })
    }
    /// Whether `wait` reports the kernel queue's ready clients (a set
    /// made `with_queue`; they are reported from the start). No system
    /// call when unchanged.
    pub fn watch_queue(&self, on: bool) {
        unsafe { ng_park_watch_queue(self.0, on) }
    }
    pub fn wait(&self, timeout_ms: i64) -> ParkEvent {
        match unsafe { ng_park_wait(self.0, timeout_ms as c_long) } {
            1 => ParkEvent::Control,
            2 => ParkEvent::Latch,
            3 => ParkEvent::PostmasterDeath,
            4 => ParkEvent::Queue,
            5 => ParkEvent::Hold,
            _ => ParkEvent::Timeout,
        }
    }
}

pub fn park_service_interrupts() {
    unsafe { ng_park_service_interrupts() }
}

pub enum LingerEvent {
    Timeout,
    ClientReadable,
    Latch,
    PostmasterDeath,
}

/// Waits on the attached client's socket and the latch (see glue.c).
pub fn linger_wait(timeout_ms: i64) -> LingerEvent {
    match unsafe { ng_linger_wait(timeout_ms as c_long) } {
        1 => LingerEvent::ClientReadable,
        2 => LingerEvent::Latch,
        3 => LingerEvent::PostmasterDeath,
        _ => LingerEvent::Timeout,
    }
}

/// Interrupts while keeping an idle client: as parked, plus notifications.
pub fn linger_service_interrupts() {
    unsafe { ng_linger_service_interrupts() }
}

pub fn clear_stale_cancel() {
    unsafe { ng_clear_stale_cancel() }
}

/// Holds query cancels while it lives (miscadmin.h HOLD_CANCEL_INTERRUPTS /
/// RESUME_CANCEL_INTERRUPTS): a cancel that lands at a transaction
/// boundary must not turn its catalog reads (pin checks), log lines or the
/// next client's setting changes into an ERROR (the boundary ends the
/// backend with FATAL on one, leaves a setting unapplied, or pins a client
/// for nothing). It stays pending, and the server drops it while it reads
/// the client's next command, as it drops one that comes before a direct
/// session's query.
pub struct CancelHeld(());

impl CancelHeld {
    pub fn new() -> CancelHeld {
        // SAFETY: a process-local counter of this backend's one thread;
        // error recovery resets it (PostgresMain), and a FATAL exits.
        unsafe { pgrx::pg_sys::QueryCancelHoldoffCount += 1 };
        CancelHeld(())
    }
}

impl Drop for CancelHeld {
    fn drop(&mut self) {
        // SAFETY: as in `new`; never below zero (paired with it).
        unsafe { pgrx::pg_sys::QueryCancelHoldoffCount = pgrx::pg_sys::QueryCancelHoldoffCount.saturating_sub(1) };
    }
}

pub fn idle_session_timer_suspend() -> bool {
    unsafe { ng_idle_session_timer_suspend() }
}

pub fn idle_session_timer_resume() {
    unsafe { ng_idle_session_timer_resume() }
}

/// The attached client's address (`inet_client_addr()`, `%h`), raw
/// sockaddr bytes from ATTACH, and the address it connected to (`local`,
/// from ATTACH too); when the pooler did not know that one (empty), it is
/// read from the socket with getsockname().
/// Bytes that do not fit a sockaddr_storage are ignored.
pub fn set_client_addr(addr: &[u8], local: &[u8]) {
    let storage = |b: &[u8]| {
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let n = b.len().min(std::mem::size_of::<libc::sockaddr_storage>());
        // SAFETY: at most size_of::<sockaddr_storage>() bytes into it.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&raw mut ss).cast::<u8>(), n) };
        (ss, n as libc::socklen_t)
    };
    if addr.is_empty() || addr.len() > std::mem::size_of::<libc::sockaddr_storage>() {
        return;
    }
    let (remote, len) = storage(addr);
    let (here, here_len) = if local.len() <= std::mem::size_of::<libc::sockaddr_storage>() { storage(local) } else { storage(&[]) };
    // SAFETY: both point at initialized sockaddr_storage of the given lengths.
    unsafe { ng_set_client_addr(&remote, len, &here, here_len) }
}

/// `SYSTEM_USER` and the identity parallel workers inherit (16+): the
/// attached client's as the pooler authenticated it (glue.c
/// `ng_set_client_identity`); None: no identity (trust), so SYSTEM_USER is
/// NULL. False where it stays the pool login's (15 has no SYSTEM_USER; a
/// server whose code glue.c cannot read).
pub fn set_client_identity(authn: Option<&nextgres_core::control::Authn>) -> bool {
    // An id from a parsed ATTACH has no NUL inside; one too long for a C
    // int is no identity.
    match authn.and_then(|a| Some((a, c_int::try_from(a.id.len()).ok()?))) {
        // SAFETY: `len` bytes at `id`, read (copied) during the call.
        Some((a, len)) => unsafe { ng_set_client_identity(c_int::from(a.method), a.id.as_ptr().cast(), len) },
        None => unsafe { ng_set_client_identity(0, std::ptr::null(), -1) },
    }
}

/// The database's `login` event triggers (17+) for a client whose session
/// starts on this backend, as after a direct login (glue.c
/// `ng_fire_login_triggers`). A trigger's ERROR is the client's FATAL, and
/// this backend exits with it (does not return).
pub fn fire_login_triggers() {
    // SAFETY: between transactions, in the client's session; every ERROR is
    // caught on the C side (it rethrows as FATAL, which exits).
    unsafe { ng_fire_login_triggers() }
}

/// `pg_stat_ssl` for this backend (glue.c `ng_set_ssl_status`): the
/// attached client's TLS session as the pooler terminated it, or None to
/// show no TLS (`ssl = false`).
pub fn set_ssl_status(tls: Option<&nextgres_core::control::TlsStatus>) {
    // The strings come from a parsed ATTACH: never a NUL inside.
    let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
    match tls {
        Some(t) => {
            let (v, ci, dn, serial, issuer) = (c(&t.version), c(&t.cipher), c(&t.client_dn), c(&t.client_serial), c(&t.issuer_dn));
            unsafe { ng_set_ssl_status(true, t.bits, v.as_ptr(), ci.as_ptr(), dn.as_ptr(), serial.as_ptr(), issuer.as_ptr()) }
        }
        None => {
            let e = c"".as_ptr();
            unsafe { ng_set_ssl_status(false, 0, e, e, e, e, e) }
        }
    }
}

pub fn report_parked() {
    unsafe { ng_report_parked() }
}

/// Removes startup option `name` from the Port and returns its value.
///
/// # Safety
/// `port` must be the `Port *` handed to ClientAuthentication_hook.
pub unsafe fn port_take_option(port: *mut c_void, name: &CStr) -> Option<String> {
    let mut buf = [0 as c_char; 128];
    if ng_port_take_option(port, name.as_ptr(), buf.as_mut_ptr(), buf.len()) {
        Some(cstr_field(&buf))
    } else {
        None
    }
}

/// # Safety
/// `port` must be a live `Port *`.
pub unsafe fn port_peer_pid(port: *mut c_void) -> i32 {
    ng_port_peer_pid(port)
}

/// This backend's cancel key as BackendKeyData carries it (empty if the
/// server has not made one yet).
pub fn my_cancel_key() -> Vec<u8> {
    let mut buf = [0u8; 256];
    let n = unsafe { ng_my_cancel_key(buf.as_mut_ptr(), buf.len() as c_int) };
    buf[..n.max(0) as usize].to_vec()
}

/// Runs the server's `ClientAuthentication()` (auth.c) for the client whose
/// socket is now under `MyProcPort->sock`, with its address set from the
/// socket (glue.c `ng_server_authenticate`). Returns only on success (the
/// server queued AuthenticationOk); a failed authentication ends the process
/// with the server's FATAL to the client. False: no peer address.
///
/// # Safety
/// Only inside `ClientAuthentication_hook`, with the recursion guarded.
pub unsafe fn server_authenticate() -> bool {
    ng_server_authenticate()
}

// ---- pooler -----------------------------------------------------------------

/// First thing in the pooler, before it connects (see glue.c).
pub fn pooler_guard_stale_hba_contexts() {
    unsafe { ng_pooler_guard_stale_hba_contexts() }
}

pub fn load_hba() -> Result<(), NgError> {
    let mut err = NgError::new();
    if unsafe { ng_load_hba(&mut err) } {
        Ok(())
    } else {
        Err(err)
    }
}

/// The server's `load_ident()` (hba.c) in the pooler, on SIGHUP: a
/// pg_ident.conf that does not load keeps the previous lines (the server
/// LOGs why), as in the postmaster.
pub fn load_ident() -> Result<(), NgError> {
    let mut err = NgError::new();
    if unsafe { ng_load_ident(&mut err) } {
        Ok(())
    } else {
        Err(err)
    }
}

/// Postmaster only (`_PG_init`): keep the postmaster's parsed pg_hba.conf
/// and pg_ident.conf alive in its children, so the pooler starts with the
/// server's loaded lines (glue.c, ng_keep_parsed_auth_files_in_child).
/// False if the fork handler could not be installed.
pub fn install_auth_file_keeper() -> bool {
    unsafe { ng_install_auth_file_keeper() }
}

/// Pooler: did the fork handler run in this process, so hba.c's
/// pg_ident.conf state is valid here (kept, or empty because the
/// postmaster had none yet)? [`load_ident`] and [`check_usermap`] must not
/// be called otherwise: they would read (on 15: free) freed memory.
pub fn ident_kept() -> bool {
    unsafe { ng_ident_kept() }
}

/// Agent: did the fork handler keep the postmaster's parsed pg_hba.conf in
/// this process (glue.c, ng_hba_is_kept)? Then those are the rules until
/// the next SIGHUP, and the agent must not load the file at start (an edit
/// the server has not reloaded would apply on the pooler port only).
pub fn hba_kept() -> bool {
    unsafe { ng_hba_kept() }
}

/// Agent: would the server's TLS library load the ssl_* settings and files
/// as they are now (its `be_tls_init()` at a reload, quietly)? The
/// postmaster keeps its previous TLS context when not, and so does the
/// pooler. True on a server without SSL support.
pub fn server_tls_config_loads() -> bool {
    // SAFETY: called in the agent, outside any transaction; errors are
    // caught in C.
    unsafe { ng_server_tls_config_loads() }
}

/// The server's `check_usermap()` (hba.c) with the pg_ident.conf the
/// postmaster had loaded when it forked the pooler, or [`load_ident`]
/// loaded since: may `system_user` (a certificate's raw CN bytes or its
/// DN) log in as `pg_user` under `usermap` (empty: only as itself)? The
/// server LOGs why not. `system_user` is handed over unchanged; one with a
/// NUL is refused here (Ok(false)), as the server refuses such a
/// certificate before authentication. Err on an error raised inside (a
/// bad regex, say).
pub fn check_usermap(usermap: &str, pg_user: &str, system_user: &[u8]) -> Result<bool, NgError> {
    let Ok(s) = CString::new(system_user) else { return Ok(false) };
    let mut err = NgError::new();
    let (m, u) = (cstring(usermap), cstring(pg_user));
    match unsafe { ng_check_usermap(m.as_ptr(), u.as_ptr(), s.as_ptr(), &mut err) } {
        1 => Ok(true),
        0 => Ok(false),
        _ => Err(err),
    }
}

pub fn login_lookup(
    database: &str,
    user: &str,
    addr: &libc::sockaddr_storage,
    len: u32,
    ssl_in_use: bool,
    replication: nextgres_core::proto::Replication,
) -> Result<Box<NgLoginInfo>, NgError> {
    use nextgres_core::proto::Replication;
    // glue.c: 0 none, 1 physical (walsender), 2 logical (database walsender).
    let replication = match replication {
        Replication::None => 0,
        Replication::Physical => 1,
        Replication::Logical => 2,
    };
    // Boxed: large, and wiped on drop.
    let mut info: Box<NgLoginInfo> = Box::new(unsafe { std::mem::zeroed() });
    let mut err = NgError::new();
    let (d, u) = (cstring(database), cstring(user));
    let ok = unsafe { ng_login_lookup(d.as_ptr(), u.as_ptr(), addr, len as libc::socklen_t, ssl_in_use, replication, &mut *info, &mut err) };
    if ok {
        Ok(info)
    } else {
        Err(err)
    }
}

/// See glue.c: catalog lookups in a process attached to no database.
pub fn pooler_catalog_heap_scans() {
    unsafe { ng_pooler_catalog_heap_scans() }
}

/// The role-membership cache's invalidation callbacks (acl.c
/// initialize_acl(), which a worker attached to no database skips), so hba
/// group lines follow GRANT and REVOKE. Once, after the connection.
pub fn agent_acl_init() {
    unsafe { ng_agent_acl_init() }
}

/// A startup setting checked as the server checks it at connection start,
/// for a client logged in as role `role` (oid). Ok(Some(value)): the value
/// the server reports for a GUC_REPORT setting (its ParameterStatus), in
/// the server's spelling (`ISO, DMY` for `iso,dmy`).
pub fn validate_setting(name: &str, value: &str, superuser: bool, role: u32) -> Result<Option<String>, NgError> {
    let (n, v) = (cstring(name), cstring(value));
    let mut err = NgError::new();
    let mut shown = vec![0u8; 1024];
    if unsafe { ng_validate_setting(n.as_ptr(), v.as_ptr(), superuser, role, shown.as_mut_ptr().cast(), shown.len() as c_int, &mut err) } {
        let len = shown.iter().position(|&b| b == 0).unwrap_or(0);
        Ok((len > 0).then(|| String::from_utf8_lossy(&shown[..len]).into_owned()))
    } else {
        Err(err)
    }
}

/// The values a fresh login of role `role` (oid) would report now for the
/// setting `names` (its ParameterStatus), one per name, in order: this
/// process's postgresql.conf values under the pg_db_role_setting items
/// `settings` that apply to the login, (name, value) from the lowest level
/// (every database and role) to the highest (that database and role), each
/// applied over the ones before; the role's superuser flag and name
/// (session.c ng_login_params: a transaction, rolled back).
pub fn login_params(role: u32, names: &[&str], settings: &[(&str, &str)]) -> Result<Vec<String>, NgError> {
    let mut list = Vec::new();
    for n in names {
        list.extend_from_slice(n.as_bytes());
        list.push(0);
    }
    let mut items = Vec::new();
    for (name, value) in settings {
        items.extend_from_slice(name.as_bytes());
        items.push(0);
        items.extend_from_slice(value.as_bytes());
        items.push(0);
    }
    let mut out = vec![0u8; 16 * 1024];
    let (mut used, mut err) = (0 as c_int, NgError::new());
    // SAFETY: `list` holds names.len() NUL-terminated names, `items`
    // settings.len() items as ng_login_params reads them; `out` is
    // out.len() writable bytes, of which `used` are filled.
    let ok = unsafe {
        ng_login_params(
            role,
            list.as_ptr().cast(),
            names.len() as c_int,
            items.as_ptr().cast(),
            settings.len() as c_int,
            out.as_mut_ptr().cast(),
            out.len() as c_int,
            &mut used,
            &mut err,
        )
    };
    if !ok {
        return Err(err);
    }
    let mut values: Vec<String> = out[..used as usize].split(|&b| b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
    values.truncate(names.len());
    Ok(values)
}

pub fn pooler_check_interrupts() {
    unsafe { ng_pooler_check_interrupts() }
}

/// The pooler process, first thing after fork() from the agent: see
/// glue.c ng_pooler_child_init (exit callbacks dropped, own pid, local
/// latch, no PGPROC or backend status entry, its process title).
pub fn pooler_child_init() {
    // SAFETY: plain assignments and process-local calls, in a process that
    // runs no other server code yet.
    unsafe { ng_pooler_child_init() }
}

/// The fd that turns readable when the postmaster dies (glue.c).
pub fn postmaster_watch_fd() -> i32 {
    // SAFETY: reads an int the postmaster set before forking.
    unsafe { ng_postmaster_watch_fd() }
}

/// The agent's wait (latch.c WaitLatchOrSocket): its latch, `sock`
/// readable (none when negative), or `timeout_ms` (ms); exits if the postmaster dies
/// (WL_EXIT_ON_PM_DEATH). Returns (latch set, socket readable).
pub fn agent_wait(sock: i32, timeout_ms: i64) -> (bool, bool) {
    use pgrx::pg_sys;
    let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
    if sock >= 0 {
        events |= pg_sys::WL_SOCKET_READABLE;
    }
    // SAFETY: the agent's own latch (a background worker's PGPROC latch).
    let rc = unsafe { pg_sys::WaitLatchOrSocket(pg_sys::MyLatch, events as c_int, sock, timeout_ms as c_long, pg_sys::PG_WAIT_EXTENSION) };
    (rc as u32 & pg_sys::WL_LATCH_SET != 0, rc as u32 & pg_sys::WL_SOCKET_READABLE != 0)
}

/// Interior NULs cannot come from the wire (parsers reject them), but never panic.
pub fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "")).unwrap_or_default()
}

/// Runs `f` under a PG_TRY that turns a server ERROR escaping it into FATAL
/// (glue.c `ng_run_guarded`): for Rust code run from a server hook, where
/// the ERROR's longjmp would otherwise skip Rust frames.
pub fn run_guarded(f: extern "C" fn()) {
    // SAFETY: the glue calls `f` once, inside PG_TRY/PG_CATCH.
    unsafe { ng_run_guarded(f) }
}
