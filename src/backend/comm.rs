//! Wrappers around the server's FE/BE output methods. `putmessage` notes a
//! ReadyForQuery and its status; `flush` forwards and, after a flushed
//! ReadyForQuery(I) (or a Flush that followed it with nothing answered,
//! session.c's own included), reaches the transaction boundary where the
//! backend may give its client back; CommandComplete and ErrorResponse are counted as the
//! client's statements (`nextgres.pools.queries`), every message's bytes as
//! sent to it (`bytes_sent`), and each request cycle's time as query time
//! (`query_time_ms`: from the start of processing the first message the
//! backend answers, the server's statement timestamp, or now when that is
//! not after the previous ReadyForQuery or the attach (Close, Sync), to the next ReadyForQuery, as
//! PgBouncer counts from the request to ReadyForQuery). The CloseComplete
//! answering the Close of the unnamed statement that session.c puts ahead of
//! a new client's bytes is dropped. Ordinary backends pay one branch per call.
use crate::pg::comm::{PQcommMethods, PqCommMethods};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU16, AtomicU64};
use std::ffi::{c_char, c_int};

static mut ORIGINAL: Option<PQcommMethods> = None;
static mut WRAPPED: Option<PQcommMethods> = None;

// The wrappers' state. Plain statics, not thread-locals: a backend calls
// its output layer from its one thread, and a thread-local costs a
// `__tls_get_addr` call per access in a shared library (several per
// message; 0.3% of a pooled backend's CPU, perf, issue 15). Relaxed loads
// and stores compile to plain moves; no read-modify-write is needed.

/// Drop the next AuthenticationOk (`swallow_auth_ok`).
static SWALLOW_AUTH_OK: AtomicBool = AtomicBool::new(false);
/// The server read the Close of the unnamed statement that session.c
/// put ahead of a new client's bytes: drop its CloseComplete.
static SWALLOW_CLOSE_COMPLETE: AtomicBool = AtomicBool::new(false);
/// A ParseComplete went out since the last `take_parsed`: the backend
/// may hold an unnamed prepared statement.
static PARSED: AtomicBool = AtomicBool::new(false);
/// A ParseComplete went out with no BindComplete after it (`take_unbound`).
static UNBOUND: AtomicBool = AtomicBool::new(false);
/// What the last boundary's `take_unbound` said, since the client's attach:
/// a boundary after ignored input ran nothing and says it again.
static LAST_UNBOUND: AtomicBool = AtomicBool::new(false);
/// Status byte of a ReadyForQuery queued since the last flush (`NO_READY`: none).
static PENDING_READY: AtomicU16 = AtomicU16::new(NO_READY);
const NO_READY: u16 = u16::MAX;
/// What was counted since `take_counters`.
static QUERIES: AtomicU64 = AtomicU64::new(0);
static QUERY_US: AtomicU64 = AtomicU64::new(0);
static BYTES_SENT: AtomicU64 = AtomicU64::new(0);
/// Start of the request cycle under way (TimestampTz, µs; `NO_CYCLE`: none).
static CYCLE_START: AtomicI64 = AtomicI64::new(NO_CYCLE);
const NO_CYCLE: i64 = i64::MIN;
/// The last ReadyForQuery or attach (TimestampTz, µs): no cycle starts before.
static CYCLE_FLOOR: AtomicI64 = AtomicI64::new(0);
/// The process id of the attached client's cancel key (0: none of the
/// pooler's).
static KEY_PID: AtomicI32 = AtomicI32::new(0);
/// session.c gave the server a Flush of its own for an idle client
/// (`ng_rs_injected_flush`): the flush that answers it is the boundary.
static INJECTED_FLUSH: AtomicBool = AtomicBool::new(false);
/// The boundary under way follows input the server read without answering
/// (a Flush, what is left of a failed COPY): nothing ran since the last one
/// (`take_unbound`).
static IGNORED_INPUT: AtomicBool = AtomicBool::new(false);

/// Adds `n` to a counter of this process (load and store: one writer).
fn add(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

/// A counter's value, set back to 0 (load and store, not a locked `xchg`:
/// one writer).
fn take(counter: &AtomicU64) -> u64 {
    let v = counter.load(Relaxed);
    counter.store(0, Relaxed);
    v
}

/// A flag's value, cleared (as `take`).
fn take_flag(flag: &AtomicBool) -> bool {
    let v = flag.load(Relaxed);
    if v {
        flag.store(false, Relaxed);
    }
    v
}

/// What the backend did for its client (`RELEASED`).
#[derive(Clone, Copy, Default)]
pub struct Counters {
    /// Statements answered (CommandComplete or ErrorResponse).
    pub queries: u64,
    /// Query time, µs.
    pub query_us: u64,
    /// Protocol bytes sent (type byte, length word and body of each message).
    pub bytes_sent: u64,
}

/// What was counted since the last call; the counters start again at 0 and
/// no query time is counted from before now (a new client was attached).
pub fn take_counters() -> Counters {
    CYCLE_START.store(NO_CYCLE, Relaxed);
    CYCLE_FLOOR.store(crate::pg::shmem::now(), Relaxed);
    Counters { queries: take(&QUERIES), query_us: take(&QUERY_US), bytes_sent: take(&BYTES_SENT) }
}

fn original() -> &'static PQcommMethods {
    // Set in the postmaster before any backend exists; never changes after.
    unsafe { (*std::ptr::addr_of!(ORIGINAL)).as_ref().expect("comm methods installed") }
}

pub fn install() {
    unsafe {
        let orig = *PqCommMethods;
        ORIGINAL = Some(orig);
        WRAPPED = Some(PQcommMethods { putmessage: Some(putmessage), flush: Some(flush), ..orig });
        PqCommMethods = (*std::ptr::addr_of!(WRAPPED)).as_ref().expect("just set");
    }
}

/// The attached client's cancel-key process id (`Attach::key_pid`).
pub fn set_key_pid(pid: i32) {
    KEY_PID.store(pid, Relaxed);
}

/// A NotificationResponse (protocol 55.7: Int32 process id, channel,
/// payload) of this backend's own NOTIFY carries the client's cancel-key
/// pid rather than the backend's: libpq and the drivers tell a session's
/// own notifications by comparing that field with the BackendKeyData pid
/// (`PQbackendPID`), which for a pooled client is the pooler's (README,
/// cancel key). Other sessions' notifications keep their backend's pid.
fn own_notification(s: *const c_char, len: usize) -> Option<Vec<u8>> {
    let key = KEY_PID.load(Relaxed);
    if key == 0 || len < 4 {
        return None;
    }
    // SAFETY: the server hands `len` readable bytes at `s`.
    let body = unsafe { std::slice::from_raw_parts(s.cast::<u8>(), len) };
    if i32::from_be_bytes([body[0], body[1], body[2], body[3]]) != crate::pg::server::my_pid() {
        return None;
    }
    let mut copy = body.to_vec();
    copy[..4].copy_from_slice(&key.to_be_bytes());
    Some(copy)
}

/// At a transaction boundary: whether the cycle that ended prepared a
/// statement (ParseComplete) and bound none after it, so the client's next
/// cycle may bind a statement only this backend has (the unnamed one, which
/// never moves). Cleared: it keeps the client one transaction at most. A
/// boundary after input the server ignored (a Flush, the rest of a failed
/// COPY) ran nothing: it gets what the last one got, so the Bind may still
/// follow.
pub fn take_unbound() -> bool {
    if IGNORED_INPUT.load(Relaxed) {
        return LAST_UNBOUND.load(Relaxed);
    }
    let unbound = UNBOUND.swap(false, Relaxed);
    LAST_UNBOUND.store(unbound, Relaxed);
    unbound
}

/// A client is attached: no boundary of its own has been seen yet.
pub fn attached() {
    LAST_UNBOUND.store(false, Relaxed);
}

/// Did a ParseComplete go out since the last call? (Parse "" is the only
/// way to create the unnamed statement; a named Parse counts too.)
pub fn take_parsed() -> bool {
    take_flag(&PARSED)
}

/// session.c handed the server the whole injected Close('S', ""): its
/// reply, the next CloseComplete, is not the client's. Anything else the
/// server sends first (other than a notice, notification or parameter
/// status) means the Close was not answered as expected; then nothing is
/// dropped, so a client's own CloseComplete is never lost.
#[no_mangle]
pub extern "C" fn ng_rs_injected_close_read() {
    SWALLOW_CLOSE_COMPLETE.store(true, Relaxed);
}

/// Has the server answered nothing since the pooled client's last
/// ReadyForQuery went out (or its attach)? Asynchronous messages (a
/// notification, a notice, a parameter status) are no answer.
#[no_mangle]
pub extern "C" fn ng_rs_unanswered() -> bool {
    super::is_pooled() && CYCLE_START.load(Relaxed) == NO_CYCLE && PENDING_READY.load(Relaxed) == NO_READY
}

/// session.c handed the server a Flush of its own in place of a recv()
/// that would wait: the client, idle at its last ReadyForQuery(I), sent only
/// what the server ignores, all read (`idle_input_read`).
#[no_mangle]
pub extern "C" fn ng_rs_injected_flush() {
    INJECTED_FLUSH.store(true, Relaxed);
}

/// A server-authenticated client (`login::server_auth_client`) already has
/// the AuthenticationOk of its own authentication queued; the next one, which
/// the pooler's outer login queues (auth.c ClientAuthentication() after its
/// hook), is dropped.
pub fn swallow_auth_ok() {
    SWALLOW_AUTH_OK.store(true, Relaxed);
}

/// ParameterStatus messages are owed to the attached client at its next
/// ReadyForQuery (`session::switch_to`).
static REPORTS_OWED: AtomicBool = AtomicBool::new(false);

/// The switch found values the client runs under but was not told: they
/// are reported before its next ReadyForQuery (session.c `ng_report_owed`).
pub fn owe_reports() {
    REPORTS_OWED.store(true, Relaxed);
}

unsafe extern "C" fn putmessage(msgtype: c_char, s: *const c_char, len: usize) -> c_int {
    if msgtype as u8 == b'R' && len == 4 && SWALLOW_AUTH_OK.load(Relaxed) && std::slice::from_raw_parts(s.cast::<u8>(), 4) == [0; 4] {
        SWALLOW_AUTH_OK.store(false, Relaxed);
        return 0;
    }
    if SWALLOW_CLOSE_COMPLETE.load(Relaxed) && !matches!(msgtype as u8, b'A' | b'N' | b'S') {
        SWALLOW_CLOSE_COMPLETE.store(false, Relaxed);
        if msgtype as u8 == b'3' && len == 0 {
            return 0;
        }
    }
    if super::is_pooled() {
        let header = if msgtype == 0 { 4 } else { 5 };
        add(&BYTES_SENT, (len + header) as u64);
        // Asynchronous messages (a notification, a parameter or notice
        // while idle) start no request cycle.
        if !matches!(msgtype as u8, b'A' | b'N' | b'S') && CYCLE_START.load(Relaxed) == NO_CYCLE {
            // The server sets the statement timestamp for Query, Parse,
            // Bind, Describe, Execute and FunctionCall, not for Close or
            // Sync (PostgresMain, tcop/postgres.c): one from before the
            // floor belongs to an earlier cycle, so this cycle began with a
            // Close or Sync, answered at once: it starts now.
            let floor = CYCLE_FLOOR.load(Relaxed);
            let stmt = crate::pg::shmem::statement_start();
            let start = if stmt > floor { stmt } else { crate::pg::shmem::now() };
            CYCLE_START.store(start, Relaxed);
        }
        match msgtype as u8 {
            b'Z' if len == 1 => {
                // Where a direct backend reports a changed setting: after
                // guc.c's own reports (ReportChangedGUCOptions), before
                // the ReadyForQuery. Each goes through this hook again.
                if take_flag(&REPORTS_OWED) {
                    crate::pg::session::report_owed();
                }
                PENDING_READY.store(*s as u8 as u16, Relaxed);
                crate::pg::session::note_ready();
                let now = crate::pg::shmem::now();
                let start = CYCLE_START.load(Relaxed);
                CYCLE_START.store(NO_CYCLE, Relaxed);
                if start != NO_CYCLE {
                    add(&QUERY_US, now.saturating_sub(start).max(0) as u64);
                }
                CYCLE_FLOOR.store(now, Relaxed);
            }
            // ParseComplete / CloseComplete: named statements may have
            // changed (a ParseComplete: unless the Parse was of the
            // unnamed one, which session.c knows from the Parse's name).
            b'1' => {
                PARSED.store(true, Relaxed);
                UNBOUND.store(true, Relaxed);
                crate::pg::session::note_parse_complete();
            }
            b'2' => UNBOUND.store(false, Relaxed),
            b'3' => crate::pg::session::note_statement_messages(),
            b'S' => super::session::note_told(),
            // FunctionCallResponse: the function may have been set_config().
            b'V' => crate::pg::session::note_function_call(),
            // One per statement a client ran, failed ones included (as
            // PgBouncer's query count).
            b'C' => add(&QUERIES, 1),
            b'E' => {
                add(&QUERIES, 1);
                crate::pg::session::note_error();
            }
            b'A' => {
                if let Some(m) = own_notification(s, len) {
                    return (original().putmessage.expect("putmessage"))(msgtype, m.as_ptr().cast(), m.len());
                }
            }
            _ => {}
        }
    }
    (original().putmessage.expect("putmessage"))(msgtype, s, len)
}

unsafe extern "C" fn flush() -> c_int {
    let rc = (original().flush.expect("flush"))();
    let status = PENDING_READY.load(Relaxed);
    PENDING_READY.store(NO_READY, Relaxed);
    if status != NO_READY {
        if rc == 0 && status == b'I' as u16 {
            crate::pg::glue::run_guarded(boundary);
        }
    } else if rc == 0 && super::is_pooled() && !crate::pg::session::reading_message() {
        // A Flush that woke an idle client (sent after its ReadyForQuery),
        // or session.c's own once the server read what an idle client sent
        // and ignored (what is left of a failed COPY): no ReadyForQuery
        // follows, so this is its boundary. Not a flush made while the
        // server reads a message (an interrupt's, a FATAL's): the injected
        // Flush is still to come.
        if take_flag(&INJECTED_FLUSH) || crate::pg::session::only_flushes_since_attach() {
            IGNORED_INPUT.store(true, Relaxed);
            crate::pg::glue::run_guarded(boundary);
            IGNORED_INPUT.store(false, Relaxed);
        }
    }
    rc
}

/// The transaction boundary under two guards, so that a failure in it ends
/// this backend (FATAL) rather than abort it, which makes the postmaster
/// restart every backend of the server: a Rust panic (a pgrx call's ERROR
/// becomes one) is caught here, and a server ERROR raised through it by
/// the glue's PG_TRY (`glue::run_guarded`). Either would otherwise cross
/// `flush`, an `extern "C"` function.
extern "C" fn boundary() {
    // Cancels held over the whole boundary (its pin checks read catalogs,
    // the next client's switch sets settings): one landing there, for the
    // client just done or the one being attached, must not make an ERROR
    // of that work (`glue::CancelHeld`).
    let _held = crate::pg::glue::CancelHeld::new();
    if std::panic::catch_unwind(super::park::transaction_boundary).is_err() {
        pgrx::ereport!(
            pgrx::PgLogLevel::FATAL,
            pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "nextgres: a pooled backend failed between transactions (see the log above)"
        );
    }
}
