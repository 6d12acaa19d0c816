//! Rust side of `session.c`: the client's session image and pins.
use super::glue::{cstring, NgError};
use nextgres_core::control::{Statement, StatementList};
use std::ffi::{c_char, c_int, c_void, CStr};

extern "C" {
    fn ng_install_session_hooks();
    fn ng_note_statement_messages();
    fn ng_note_parse_complete();
    fn ng_note_error();
    fn ng_note_ready();
    fn ng_scan_attach();
    fn ng_consume_buffered_flushes() -> bool;
    fn ng_only_flushes_since_attach() -> bool;
    fn ng_note_idle_input();
    fn ng_reading_message() -> bool;
    fn ng_analysis_hit(pairs: *const c_char, count: c_int) -> bool;
    fn ng_analysis_new_client();
    fn ng_pin_reason() -> c_int;
    fn ng_take_session_settings(len: *mut c_int) -> *mut c_char;
    fn ng_take_statements(len: *mut c_int) -> *mut c_char;
    fn ng_free(p: *mut c_char);
    fn ng_switch_begin(discard: bool, err: *mut NgError) -> bool;
    fn ng_switch_setting(name: *const c_char, value: *const c_char, from_startup: bool, refuse: bool) -> bool;
    fn ng_create_statement(
        name: *const c_char,
        text: *const c_char,
        from_sql: bool,
        backslash_escapes: bool,
        nparams: c_int,
        params: *const u32,
        result: *const c_char,
        rlen: c_int,
        analysis: *const c_char,
        nanalysis: c_int,
        invalidated: bool,
        err: *mut NgError,
    ) -> bool;
    fn ng_lazy_statements_init() -> bool;
    fn ng_drop_statement(name: *const c_char, err: *mut NgError) -> bool;
    fn ng_set_statements_pending(pending: bool);
    fn ng_count_session(delta: c_int);
    fn ng_connection_logging() -> c_int;
    fn ng_reload_connection_logging();
    #[allow(clippy::too_many_arguments)]
    fn ng_log_client(
        sqlstate: *const c_char,
        msg: *const c_char,
        detail: *const c_char,
        hint: *const c_char,
        host: *const c_char,
        port: *const c_char,
        laddr: *const u8,
        laddr_len: c_int,
        user: *const c_char,
        db: *const c_char,
        appname: *const c_char,
    );
    fn ng_keep_listen_addresses_on_reload(configured: *const c_char) -> bool;
    fn ng_set_pooled_backend(on: bool);
    fn ng_set_cancel_armed(on: bool);
    fn ng_read_defaults(len: *mut c_int) -> *mut c_char;
    fn ng_applied_defaults(len: *mut c_int) -> *mut c_char;
    fn ng_defaults_clear(name: *const c_char);
    fn ng_defaults_reload();
    fn ng_defaults_apply(level: c_int, name: *const c_char, value: *const c_char);
    fn ng_switch_end(err: *mut NgError) -> bool;
    fn ng_switch_light() -> bool;
    fn ng_switch_reseed();
    fn ng_switch_reported(told: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char) -> bool, arg: *mut c_void) -> bool;
    fn ng_report_owed();
    fn ng_reported_each(each: unsafe extern "C" fn(*mut c_void, *const c_char, *const c_char), arg: *mut c_void);
    fn ng_reload_if_pending();
    fn ng_note_function_call();
    fn ng_close_unnamed_before_client() -> bool;
    fn ng_read_ahead(fd: c_int, bytes: *mut *const u8) -> isize;
    fn ng_read_ahead_clear();
    fn ng_read_ahead_forget(fd: c_int);
}

/// Why a client must stay on its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Pin {
    None = 0,
    TempTable = 1,
    HoldCursor = 2,
    Listen = 3,
    AdvisoryLock = 4,
    /// Its last transaction called nextval(): currval()/lastval() stay
    /// answerable in its next one.
    Sequence = 5,
    /// A temporary object other than a table (function, type, operator...).
    TempObject = 6,
    /// Its last request cycle prepared a statement it did not bind (a
    /// driver that runs Parse/Describe/Sync, then Bind/Execute/Sync of the
    /// unnamed statement: sqlx `persistent(false)`, Go lib/pq, `PQprepare`
    /// with ""): its next cycle runs here, where that statement is.
    Unbound = 7,
}

impl Pin {
    /// A pin for the client's next transaction only (nextgres.sequence_hold
    /// while others wait), not for its session: no dedicated backend.
    pub fn is_short(pin: u8) -> bool {
        pin == Pin::Sequence as u8 || pin == Pin::Unbound as u8
    }
}

/// Postmaster: utility/object-access/fmgr hooks that note session changes.
pub fn install_hooks() {
    unsafe { ng_install_session_hooks() }
}

pub fn note_statement_messages() {
    unsafe { ng_note_statement_messages() }
}

/// An ErrorResponse went out (session.c `ng_note_error`: the cycle's end
/// may be a later one than the watch on Parse messages expects).
pub fn note_error() {
    unsafe { ng_note_error() }
}

/// A ParseComplete went out: the statement just made notes the settings
/// its analysis ran under (session.c `analysis_gucs`), and unless it is
/// the unnamed one the named statements are read again at the release.
pub fn note_parse_complete() {
    unsafe { ng_note_parse_complete() }
}

/// A ReadyForQuery went out: the cycle's unanswered Parse messages were
/// skipped.
pub fn note_ready() {
    unsafe { ng_note_ready() }
}

/// Another client's statements arrive (its switch here): invalidations
/// matter to them from now on.
pub fn analysis_new_client() {
    unsafe { ng_analysis_new_client() }
}

/// Whether an invalidation this backend saw since the client's switch would
/// have hit a statement with these analysis pairs (`RawStatement::analysis`)
/// where it was analyzed: it then goes on invalidated.
pub fn analysis_hit(pairs: &[u8], count: u32) -> bool {
    unsafe { ng_analysis_hit(pairs.as_ptr().cast(), count as c_int) }
}

/// At ReadyForQuery(I): reads the buffered input when it is only Flush
/// messages sent after the Sync it answers (they ask for output already
/// sent); true when it did.
pub fn consume_buffered_flushes() -> bool {
    unsafe { ng_consume_buffered_flushes() }
}

/// Is the server inside a message read (pqcomm.c `pq_is_reading_msg`)?
pub fn reading_message() -> bool {
    unsafe { ng_reading_message() }
}

/// The boundary leaves the idle client here for input it had already sent:
/// once the server has read it all, answering nothing, the client is let go
/// (session.c idle_input_read).
pub fn note_idle_input() {
    unsafe { ng_note_idle_input() }
}

/// Whether the attached client has sent only whole Flush messages since its
/// attach, outside any transaction: idle still, and unanswered.
pub fn only_flushes_since_attach() -> bool {
    unsafe { ng_only_flushes_since_attach() }
}

/// A client is attached: the bytes watched on its socket start with a
/// message.
pub fn scan_attach() {
    unsafe { ng_scan_attach() }
}

/// A FunctionCallResponse went out: the settings are read again at release.
pub fn note_function_call() {
    unsafe { ng_note_function_call() }
}

pub fn pin_reason() -> Pin {
    match unsafe { ng_pin_reason() } {
        1 => Pin::TempTable,
        2 => Pin::HoldCursor,
        3 => Pin::Listen,
        4 => Pin::AdvisoryLock,
        5 => Pin::Sequence,
        6 => Pin::TempObject,
        _ => Pin::None,
    }
}

fn take(f: unsafe extern "C" fn(*mut c_int) -> *mut c_char) -> Option<Vec<u8>> {
    let mut len: c_int = 0;
    let p = unsafe { f(&mut len) };
    if p.is_null() {
        return None;
    }
    let v = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) }.to_vec();
    unsafe { ng_free(p) };
    Some(v)
}

/// SET/set_config settings, if they may have changed since the last call.
pub fn take_session_settings() -> Option<Vec<(String, String)>> {
    take(ng_take_session_settings).map(level_pairs)
}

/// A C string of bytes in the database encoding (a statement's name or
/// text; they hold no NUL, a stray one is dropped as `cstring` does).
fn cbytes(b: &[u8]) -> std::ffi::CString {
    std::ffi::CString::new(b.iter().copied().filter(|&c| c != 0).collect::<Vec<u8>>()).unwrap_or_default()
}

/// What `take_statements` found.
pub enum Taken {
    /// No Parse/Close/PREPARE/DEALLOCATE since the last call.
    Unchanged,
    List(StatementList),
    /// The server's list could not be read (an error inside
    /// ng_take_statements, or a list that does not parse): what this backend
    /// holds is unknown and must never be read as unchanged.
    Unknown,
}

/// Named prepared statements, if they may have changed since the last call.
pub fn take_statements() -> Taken {
    let mut len: c_int = 0;
    let p = unsafe { ng_take_statements(&mut len) };
    if p.is_null() {
        // ng_take_statements: len -1 when the list could not be built.
        return if len < 0 { Taken::Unknown } else { Taken::Unchanged };
    }
    let raw = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len as usize) }.to_vec();
    unsafe { ng_free(p) };
    // Same layout as the control channel's statement list; names and texts
    // are bytes in the database encoding, never decoded.
    match nextgres_core::control::parse_statement_list(&raw) {
        Ok(l) => Taken::List(l),
        Err(_) => Taken::Unknown,
    }
}

// The session-switch calls below return their error boxed and are never
// inlined: an NgError is 1.5 KB, and inlined into the transaction boundary
// each one enlarged its stack frame (probed page by page at every
// transaction; perf, session 37).
#[inline(never)]
pub fn switch_begin(discard: bool) -> Result<(), Box<NgError>> {
    let mut err = NgError::new();
    if unsafe { ng_switch_begin(discard, &mut err) } {
        Ok(())
    } else {
        Err(Box::new(err))
    }
}

/// Applies one setting as the startup packet (`from_startup`) or SET would;
/// a bad value warns, as it would for the client, or with `refuse` ends the
/// session with the server's FATAL (a startup setting at the client's first
/// attach, which the server would have refused at its login). False when it
/// was not applied.
pub fn switch_setting(name: &str, value: &str, from_startup: bool, refuse: bool) -> bool {
    let (n, v) = (cstring(name), cstring(value));
    unsafe { ng_switch_setting(n.as_ptr(), v.as_ptr(), from_startup, refuse) }
}

/// Creates one of the client's statements on this backend, unanalyzed: the
/// server revalidates it at its first use, under the settings its last
/// analysis ran under (see ng_create_statement).
#[inline(never)]
pub fn create_statement(st: &Statement) -> Result<(), Box<NgError>> {
    let (n, t) = (cbytes(&st.name), cbytes(&st.text));
    // name\0value\0 pairs, as the image carries them.
    let mut analysis = Vec::new();
    for (name, value) in &st.analysis {
        analysis.extend_from_slice(name);
        analysis.push(0);
        analysis.extend_from_slice(value);
        analysis.push(0);
    }
    let mut err = NgError::new();
    let ok = unsafe {
        ng_create_statement(
            n.as_ptr(),
            t.as_ptr(),
            st.from_sql,
            st.backslash_escapes,
            st.param_types.len() as c_int,
            st.param_types.as_ptr(),
            st.result.as_ptr().cast(),
            st.result.len() as c_int,
            analysis.as_ptr().cast(),
            st.analysis.len() as c_int,
            st.invalidated,
            &mut err,
        )
    };
    if ok {
        Ok(())
    } else {
        Err(Box::new(err))
    }
}

/// Drops this backend's named prepared statement `name` (as DEALLOCATE,
/// or DISCARD ALL for that one statement); none by that name is no error.
#[inline(never)]
pub fn drop_statement(name: &[u8]) -> Result<(), Box<NgError>> {
    let n = cbytes(name);
    let mut err = NgError::new();
    if unsafe { ng_drop_statement(n.as_ptr(), &mut err) } {
        Ok(())
    } else {
        Err(Box::new(err))
    }
}

/// Once per backend: whether statements can be created when first used
/// (false: create them all at each switch).
pub fn lazy_statements_init() -> bool {
    unsafe { ng_lazy_statements_init() }
}

/// Has the server read a Close of the unnamed prepared statement ahead of
/// the client's next bytes (its CloseComplete dropped, comm.rs)? False
/// where recv() cannot be redirected: then nothing is queued.
pub fn close_unnamed_before_client() -> bool {
    unsafe { ng_close_unnamed_before_client() }
}

/// What `read_ahead` found on the client's socket.
pub enum ReadAhead {
    /// Nothing yet (EAGAIN, EINTR).
    Nothing,
    /// End of file or a socket error: the client is gone.
    Closed,
    /// `len` bytes read, the first (up to 5) in `head`: the server's next
    /// recv() on the client socket gets them first (session.c).
    Read { len: usize, head: [u8; 5] },
    /// recv() is not redirected in this backend: nothing was read (look
    /// with MSG_PEEK instead).
    Unavailable,
}

/// Reads, without waiting, what the client on `fd` has sent, for the server
/// to read next once `fd` is its client socket (`MyProcPort->sock`): one
/// system call where a MSG_PEEK look and the server's own read were two.
/// Only when nothing read ahead is pending (else `Unavailable`). What is
/// read must be served, or dropped (`read_ahead_forget`) with the client.
pub fn read_ahead(fd: c_int) -> ReadAhead {
    let mut p: *const u8 = std::ptr::null();
    let n = unsafe { ng_read_ahead(fd, &mut p) };
    match n {
        -2 => ReadAhead::Unavailable,
        0 => ReadAhead::Closed,
        n if n > 0 => {
            let mut head = [0u8; 5];
            let k = (n as usize).min(5);
            // SAFETY: session.c's static buffer holds the `n` bytes just read.
            head[..k].copy_from_slice(unsafe { std::slice::from_raw_parts(p, k) });
            ReadAhead::Read { len: n as usize, head }
        }
        _ => match nix::errno::Errno::last() {
            nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR => ReadAhead::Nothing,
            _ => ReadAhead::Closed,
        },
    }
}

/// Drops what was read ahead (the client left).
pub fn read_ahead_clear() {
    unsafe { ng_read_ahead_clear() }
}

/// The client on `fd` leaves this backend: what was read ahead from it,
/// if anything, is dropped (never handed to another client on that number).
pub fn read_ahead_forget(fd: c_int) {
    unsafe { ng_read_ahead_forget(fd) }
}

/// Tells the hooks whether the client has statements not created here yet.
pub fn set_statements_pending(pending: bool) {
    unsafe { ng_set_statements_pending(pending) }
}

/// NUL-separated name/value pairs (ended by an empty name) as the C side
/// writes them.
fn level_pairs(raw: Vec<u8>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut parts = raw.split(|&b| b == 0);
    while let (Some(n), Some(v)) = (parts.next(), parts.next()) {
        if n.is_empty() {
            break;
        }
        out.push((String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()));
    }
    out
}

/// The role and database defaults in force now for this backend's database
/// and role (`SessionImage::defaults` format); None if they cannot be read.
pub fn read_defaults() -> Option<Vec<(String, String)>> {
    take(ng_read_defaults).map(level_pairs)
}

/// The role and database defaults this backend applied at its login.
pub fn applied_defaults() -> Vec<(String, String)> {
    take(ng_applied_defaults).map(level_pairs).unwrap_or_default()
}

/// A setting back to its built-in default, whatever role, database or
/// client value it had (then `defaults_reload` for postgresql.conf's).
pub fn defaults_clear(name: &str) {
    let n = cstring(name);
    unsafe { ng_defaults_clear(n.as_ptr()) }
}

pub fn defaults_reload() {
    unsafe { ng_defaults_reload() }
}

/// One default at its level (0 ALTER ROLE ALL .. 3 role in database).
pub fn defaults_apply(level: i32, name: &str, value: &str) {
    let (n, v) = (cstring(name), cstring(value));
    unsafe { ng_defaults_apply(level, n.as_ptr(), v.as_ptr()) }
}

/// After a reload: log_connections and log_disconnections as the
/// configuration files now set them, as new backends get them (session.c
/// `ng_reload_connection_logging`: a reload changes them in no process
/// under the postmaster, this one included).
pub fn reload_connection_logging() {
    // SAFETY: process-local GUC state; the C side catches every ERROR.
    unsafe { ng_reload_connection_logging() }
}

/// Does `log_connections` (its `authentication` stage) log a successful
/// login that set no identity (trust) as `connection authenticated:
/// user="..." method=...`? From 17 on (auth.c ClientAuthentication()); 15
/// and 16 log only logins with an identity.
pub const LOGS_LOGIN_WITHOUT_IDENTITY: bool = cfg!(any(feature = "pg17", feature = "pg18"));

/// Does `pg_clean_ascii` write a byte outside printable ASCII as `\xNN`
/// (16 on) rather than `?` (15)?
pub const CLEAN_ESCAPES: bool = !cfg!(feature = "pg15");

/// A client's startup string as the server keeps it for its log lines
/// (`pg_clean_ascii`, see `CLEAN_ESCAPES` and
/// `nextgres_core::proto::clean_ascii`).
pub fn clean_ascii(s: &str) -> String {
    nextgres_core::proto::clean_ascii(s.as_bytes(), CLEAN_ESCAPES)
}

/// Which connection log lines the server writes (log_connections stages,
/// log_disconnections).
#[derive(Clone, Copy)]
pub struct ConnectionLogging(i32);

impl ConnectionLogging {
    pub fn now() -> Self {
        ConnectionLogging(unsafe { ng_connection_logging() })
    }
    pub fn receipt(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn authentication(self) -> bool {
        self.0 & 2 != 0
    }
    pub fn authorization(self) -> bool {
        self.0 & 4 != 0
    }
    pub fn disconnection(self) -> bool {
        self.0 & 8 != 0
    }
}

/// The client a log line is about, as log_line_prefix's client escapes
/// show it (elog.c log_status_format()): `host` and `port` for %h and %r,
/// `local` (a raw sockaddr, empty when not known) for %L (18), `user`,
/// `db` and `appname` for %u %d %a; None prints as the server does for a
/// value not known yet.
pub struct LogClient<'a> {
    pub host: &'a str,
    pub port: &'a str,
    pub local: &'a [u8],
    pub user: Option<&'a str>,
    pub db: Option<&'a str>,
    pub appname: Option<&'a str>,
}

/// `LogClient` as C strings, alive for one call.
struct LogClientC {
    host: std::ffi::CString,
    port: std::ffi::CString,
    user: Option<std::ffi::CString>,
    db: Option<std::ffi::CString>,
    appname: Option<std::ffi::CString>,
}

impl LogClient<'_> {
    fn c(&self) -> LogClientC {
        LogClientC {
            host: cstring(self.host),
            port: cstring(self.port),
            user: self.user.map(cstring),
            db: self.db.map(cstring),
            appname: self.appname.map(cstring),
        }
    }
}

fn opt_ptr(c: &Option<std::ffi::CString>) -> *const c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// A connection log line about a pooled client (session.c
/// `ng_log_client`), with log_line_prefix's client escapes describing it.
pub fn log_client_line(msg: &str, who: &LogClient) {
    log_client(None, msg, None, None, who)
}

/// A login the pooler refused, in the server log as the server logs its
/// own refusals (session.c `ng_log_client`): FATAL, the client's
/// log_line_prefix escapes, `detail` as the log's DETAIL.
pub fn log_client_fatal(sqlstate: &str, msg: &str, detail: Option<&str>, hint: Option<&str>, who: &LogClient) {
    log_client(Some(sqlstate), msg, detail, hint, who)
}

fn log_client(sqlstate: Option<&str>, msg: &str, detail: Option<&str>, hint: Option<&str>, who: &LogClient) {
    let (c, m) = (sqlstate.map(cstring), cstring(msg));
    let (dt, hi) = (detail.map(cstring), hint.map(cstring));
    let w = who.c();
    unsafe {
        ng_log_client(
            opt_ptr(&c),
            m.as_ptr(),
            opt_ptr(&dt),
            opt_ptr(&hi),
            w.host.as_ptr(),
            w.port.as_ptr(),
            who.local.as_ptr(),
            who.local.len() as c_int,
            opt_ptr(&w.user),
            opt_ptr(&w.db),
            opt_ptr(&w.appname),
        )
    }
}

/// Postmaster, `_PG_init`, once `listen_addresses` is cleared: a reload
/// whose file still says `configured` (the addresses the pooler bound)
/// keeps the running '' without the server's "cannot be changed without
/// restarting the server" and `pending_restart` (guc.c; see session.c). False
/// when the setting cannot be found.
pub fn keep_listen_addresses_on_reload(configured: &std::ffi::CStr) -> bool {
    unsafe { ng_keep_listen_addresses_on_reload(configured.as_ptr()) }
}

/// The server's hba_file setting (the path its connection lines show).
pub fn hba_file() -> String {
    super::setting(c"hba_file").unwrap_or_default()
}

/// pg_stat_database.sessions: +1 for a client session, -1 for a pool login.
pub fn count_session(delta: i32) {
    unsafe { ng_count_session(delta) }
}

/// Between two clients whose sessions would look the same: no DISCARD.
/// Switch to a client whose session would be the same as the one left here
/// (session.c `ng_switch_light`): false when a full switch is needed.
pub fn switch_light() -> bool {
    unsafe { ng_switch_light() }
}

/// A switch to another client begins: a fresh seed for random() (session.c
/// `ng_switch_reseed`), so no client's setseed() decides another's values.
pub fn switch_reseed() {
    unsafe { ng_switch_reseed() }
}

/// A switch to another client ends: what guc.c records as reported to the
/// client (`last_reported`) becomes each value in force that `told` says
/// this client was told (session.c `ng_switch_reported`), so its own later
/// SETs are reported as on a direct connection; any other is owed to it.
/// Returns whether a ParameterStatus is owed ([`report_owed`]).
pub fn switch_reported(told: &nextgres_core::told::Told) -> bool {
    unsafe extern "C" fn has(arg: *mut c_void, name: *const c_char, value: *const c_char) -> bool {
        // SAFETY: `arg` is the `told` below, alive for the call; session.c
        // passes a setting's name and its shown value, both NUL-terminated.
        let told = unsafe { &*(arg as *const nextgres_core::told::Told) };
        let (name, value) = unsafe { (CStr::from_ptr(name), CStr::from_ptr(value)) };
        told.has(&name.to_string_lossy(), value.to_bytes())
    }
    unsafe { ng_switch_reported(has, told as *const _ as *mut c_void) }
}

/// What the client was last told of each reported setting (guc.c's
/// `last_reported`, in the server encoding), noted into `told`; one owed
/// and not sent yet keeps what `told` has (session.c `ng_reported_each`).
pub fn reported_into(told: &mut nextgres_core::told::Told) {
    unsafe extern "C" fn each(arg: *mut c_void, name: *const c_char, last: *const c_char) {
        if last.is_null() {
            return;
        }
        // SAFETY: `arg` is the `told` below, borrowed for the call; the
        // name and value are NUL-terminated strings of guc.c's.
        let told = unsafe { &mut *(arg as *mut nextgres_core::told::Told) };
        let (name, last) = unsafe { (CStr::from_ptr(name), CStr::from_ptr(last)) };
        told.note(&name.to_string_lossy(), last.to_bytes());
    }
    unsafe { ng_reported_each(each, told as *mut _ as *mut c_void) }
}

/// Reads postgresql.conf now if a reload was signalled (session.c
/// `ng_reload_if_pending`), before a switch.
pub fn reload_if_pending() {
    unsafe { ng_reload_if_pending() }
}

/// Sends, before the ReadyForQuery being sent, the ParameterStatus of each
/// setting owed since the switch that guc.c has not reported itself
/// (session.c `ng_report_owed`).
pub fn report_owed() {
    unsafe { ng_report_owed() }
}

#[inline(never)]
pub fn switch_end() -> Result<(), Box<NgError>> {
    let mut err = NgError::new();
    if unsafe { ng_switch_end(&mut err) } {
        Ok(())
    } else {
        Err(Box::new(err))
    }
}

/// This backend is a pool login (`backend::login`): session.c's trackers
/// that only a pooled session needs (settings changed through set_config())
/// stay out of every other backend's way.
pub fn set_pooled_backend(on: bool) {
    unsafe { ng_set_pooled_backend(on) }
}

/// The statement hooks look for a cancel due at the client's first
/// statement after its attach (`backend::cancel`) while this is on.
pub fn set_cancel_armed(on: bool) {
    unsafe { ng_set_cancel_armed(on) }
}
