//! Wrappers around the server's FE/BE output methods. `putmessage` notes a
//! ReadyForQuery and its status; `flush` forwards and, after a flushed
//! ReadyForQuery(I), reaches the transaction boundary where the backend may
//! give its client back; CommandComplete and ErrorResponse are counted as the
//! client's statements (`nextgres.pools.queries`), every message's bytes as
//! sent to it (`bytes_sent`), and each request cycle's time as query time
//! (`query_time_ms`: from the start of processing the first message the
//! backend answers, the server's statement timestamp, or now when that is
//! not after the previous ReadyForQuery or the attach (Close, Sync), to the next ReadyForQuery, as
//! PgBouncer counts from the request to ReadyForQuery). The CloseComplete
//! answering the Close of the unnamed statement that session.c puts ahead of
//! a new client's bytes is dropped. Ordinary backends pay one branch per call.
use crate::pg::comm::{PQcommMethods, PqCommMethods};
use std::cell::Cell;
use std::ffi::{c_char, c_int};

static mut ORIGINAL: Option<PQcommMethods> = None;
static mut WRAPPED: Option<PQcommMethods> = None;

thread_local! {
    /// Drop the next AuthenticationOk (`swallow_auth_ok`).
    static SWALLOW_AUTH_OK: Cell<bool> = const { Cell::new(false) };
    /// The server read the Close of the unnamed statement that session.c
    /// put ahead of a new client's bytes: drop its CloseComplete.
    static SWALLOW_CLOSE_COMPLETE: Cell<bool> = const { Cell::new(false) };
    /// A ParseComplete went out since the last `take_parsed`: the backend
    /// may hold an unnamed prepared statement.
    static PARSED: Cell<bool> = const { Cell::new(false) };
    /// Status byte of a ReadyForQuery queued since the last flush.
    static PENDING_READY: Cell<Option<u8>> = const { Cell::new(None) };
    /// What was counted since `take_counters`.
    static COUNTERS: Cell<Counters> = const { Cell::new(Counters { queries: 0, query_us: 0, bytes_sent: 0 }) };
    /// Start of the request cycle under way (TimestampTz, µs), if any.
    static CYCLE_START: Cell<Option<i64>> = const { Cell::new(None) };
    /// The last ReadyForQuery or attach (TimestampTz, µs): no cycle starts before.
    static CYCLE_FLOOR: Cell<i64> = const { Cell::new(0) };
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
    CYCLE_START.with(|c| c.set(None));
    CYCLE_FLOOR.with(|f| f.set(crate::pg::shmem::now()));
    COUNTERS.with(|c| c.replace(Counters::default()))
}

fn count(f: impl FnOnce(&mut Counters)) {
    COUNTERS.with(|c| {
        let mut v = c.get();
        f(&mut v);
        c.set(v);
    });
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

/// Did a ParseComplete go out since the last call? (Parse "" is the only
/// way to create the unnamed statement; a named Parse counts too.)
pub fn take_parsed() -> bool {
    PARSED.with(|p| p.replace(false))
}

/// session.c handed the server the whole injected Close('S', ""): its
/// reply, the next CloseComplete, is not the client's. Anything else the
/// server sends first (other than a notice, notification or parameter
/// status) means the Close was not answered as expected; then nothing is
/// dropped, so a client's own CloseComplete is never lost.
#[no_mangle]
pub extern "C" fn ng_rs_injected_close_read() {
    SWALLOW_CLOSE_COMPLETE.with(|f| f.set(true));
}

/// A server-authenticated client (`login::server_auth_client`) already has
/// the AuthenticationOk of its own authentication queued; the next one, which
/// the pooler's outer login queues (auth.c ClientAuthentication() after its
/// hook), is dropped.
pub fn swallow_auth_ok() {
    SWALLOW_AUTH_OK.with(|f| f.set(true));
}

unsafe extern "C" fn putmessage(msgtype: c_char, s: *const c_char, len: usize) -> c_int {
    if msgtype as u8 == b'R' && len == 4 && SWALLOW_AUTH_OK.with(|f| f.get()) && std::slice::from_raw_parts(s.cast::<u8>(), 4) == [0; 4] {
        SWALLOW_AUTH_OK.with(|f| f.set(false));
        return 0;
    }
    if SWALLOW_CLOSE_COMPLETE.with(|f| f.get()) && !matches!(msgtype as u8, b'A' | b'N' | b'S') {
        SWALLOW_CLOSE_COMPLETE.with(|f| f.set(false));
        if msgtype as u8 == b'3' && len == 0 {
            return 0;
        }
    }
    if super::is_pooled() {
        let header = if msgtype == 0 { 4 } else { 5 };
        count(|c| c.bytes_sent = c.bytes_sent.wrapping_add((len + header) as u64));
        // Asynchronous messages (a notification, a parameter or notice
        // while idle) start no request cycle.
        if !matches!(msgtype as u8, b'A' | b'N' | b'S') && CYCLE_START.with(|c| c.get()).is_none() {
            // The server sets the statement timestamp for Query, Parse,
            // Bind, Describe, Execute and FunctionCall, not for Close or
            // Sync (PostgresMain, tcop/postgres.c): one from before the
            // floor belongs to an earlier cycle, so this cycle began with a
            // Close or Sync, answered at once: it starts now.
            let floor = CYCLE_FLOOR.with(|f| f.get());
            let stmt = crate::pg::shmem::statement_start();
            let start = if stmt > floor { stmt } else { crate::pg::shmem::now() };
            CYCLE_START.with(|c| c.set(Some(start)));
        }
        match msgtype as u8 {
            b'Z' if len == 1 => {
                PENDING_READY.with(|p| p.set(Some(*s as u8)));
                let now = crate::pg::shmem::now();
                if let Some(start) = CYCLE_START.with(|c| c.take()) {
                    count(|c| c.query_us = c.query_us.wrapping_add(now.saturating_sub(start).max(0) as u64));
                }
                CYCLE_FLOOR.with(|f| f.set(now));
            }
            // ParseComplete / CloseComplete: named statements may have changed.
            b'1' => {
                PARSED.with(|p| p.set(true));
                crate::pg::session::note_statement_messages()
            }
            b'3' => crate::pg::session::note_statement_messages(),
            // FunctionCallResponse: the function may have been set_config().
            b'V' => crate::pg::session::note_function_call(),
            // One per statement a client ran, failed ones included (as
            // PgBouncer's query count).
            b'C' | b'E' => count(|c| c.queries = c.queries.wrapping_add(1)),
            _ => {}
        }
    }
    (original().putmessage.expect("putmessage"))(msgtype, s, len)
}

unsafe extern "C" fn flush() -> c_int {
    let rc = (original().flush.expect("flush"))();
    if let Some(status) = PENDING_READY.with(|p| p.take()) {
        if rc == 0 && status == b'I' {
            crate::pg::glue::run_guarded(boundary);
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
