//! Shared tables the SQL functions read: pools, clients and backends. Only the
//! pooler writes them (under the nextgres mutex, `pg::shmem::Guard`); the pooler's per-boot
//! identity (pid + token) lives in the header for pooled-backend logins.
//!
//! Nothing secret is stored here except the per-boot token, which SQL never shows.
//! The ticket words that settle who serves a client sent ahead: `ahead`.
use crate::pg::shmem::{self as raw, Guard};
use std::ffi::c_void;
use nextgres_core::attach_slot::AttachSlot;
use nextgres_core::ring::Ring;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

mod ahead;
pub use ahead::*;
mod cancel;
pub use cancel::*;

pub const NAME_LEN: usize = 64;
pub const ADDR_LEN: usize = 48;
pub const TOKEN_LEN: usize = 32;
/// `nextgres.clients.tls` (`TLSv1.2`, `TLSv1.3`).
pub const TLS_VERSION_LEN: usize = 16;
/// `nextgres.clients.tls_cipher`: OpenSSL cipher names are at most 29
/// bytes (`ECDHE-ECDSA-CHACHA20-POLY1305`); the server keeps NAMEDATALEN.
pub const TLS_CIPHER_LEN: usize = 64;
/// `nextgres.clients.client_dn`: the client certificate's subject DN
/// as `pg_stat_ssl.client_dn` prints it, cut at 63 bytes as the server
/// (`pooler::tls` describe(), at a character boundary).
pub const CERT_LEN: usize = 256;

#[repr(C)]
pub struct Header {
    pub pooler_pid: AtomicI32,
    pub token: [u8; TOKEN_LEN],
    pub port: i32,
    pub pools_cap: u32,
    pub clients_cap: u32,
    pub backends_cap: u32,
    /// 1 once a backend could not take a socket with `pidfd_getfd(2)`
    /// (refused by the kernel's ptrace rules or a seccomp filter): the
    /// pooler sends clients ahead on the control socket again
    /// (`attach_slots_usable`).
    pub attach_slots_off: AtomicI32,
    /// `nextgres.kernel_queue` at server start: a kernel queue row per
    /// client row follows the ATTACH slots.
    pub kq_rows: bool,
    /// Where the kernel queue's fixed descriptor numbers start
    /// (`nextgres_core::kq::fd_base`), set by the pooler at its start; 0:
    /// no kernel queue.
    pub kq_fd_base: AtomicI32,
    // Read-mostly above, by every backend at each transaction (`kq_row`
    // checks `kq_rows` and the caps): kept away from `ring_pushes` and
    // `pooler_sleeps`, written at every handoff-path release and every
    // pooler sleep, whose cache line would otherwise travel to each core
    // that reads them (`conf` and `ops` lie between).
    /// Databases a backend is about to drop (or rename, or copy as a
    /// template): the pooler closes their pools' backends. Written by that
    /// backend under the lock, cleared by it when the command ends.
    pub drains: [Drain; DRAIN_SLOTS],
    /// Commits of ALTER ROLE / DATABASE ... SET (and role or database
    /// renames and drops) so far: each bumps this, and the pooler then has
    /// pg_db_role_setting read again (`pooler::poolconf`).
    pub conf_changes: AtomicU64,
    /// Bumped by the settings reader each time it rewrote `conf`.
    pub conf_gen: AtomicU64,
    /// Bytes of `conf` in use: `database\0role\0item\0` per nextgres.*
    /// item of pg_db_role_setting (then per item of a setting a login
    /// reports), empty database or role for "all".
    pub conf_len: u32,
    /// The reader's items did not all fit in `conf` (the last ones are
    /// missing).
    pub conf_truncated: bool,
    pub conf: [u8; CONF_LEN],
    /// Bumped by the operation functions (`nextgres.pause()` ...) after they
    /// changed `ops`; the pooler then reads them.
    pub ops_gen: AtomicU64,
    /// The `ops_gen` the pooler has acted on.
    pub ops_ack: AtomicU64,
    /// Pauses in force and reconnects not yet taken by the pooler.
    pub ops: [OpSlot; OP_SLOTS],
    /// Entries written to any backend's release ring so far (`ring_pushed`):
    /// one load tells the pooler, at each wake-up, whether to look at the rings.
    pub ring_pushes: AtomicU64,
    /// 1 while the pooler sleeps: the first backend that then leaves an
    /// entry in its ring sets it to 0 and wakes the pooler (RING_MARK).
    pub pooler_sleeps: AtomicI32,
}

/// A client row's place in the kernel queue (`nextgres_core::kq`).
#[repr(C, align(128))]
pub struct KqRow {
    /// The owner word (`nextgres_core::kq::Owner`).
    pub owner: AtomicU64,
    /// The backend row that released the client into the queue last (its
    /// session holds the client's image: a backend taking the client
    /// switches sessions unless it is that one), -1 none.
    pub last_backend: AtomicI32,
    /// How many times a backend has taken the client from the queue
    /// (wrapping; added by the backend at each take): the pooler tells a
    /// client that waits from one served between two looks by it.
    pub takes: AtomicU32,
    /// Transactions backends served for the client through the queue, a
    /// kept client's included (added by the backend at each; zeroed by the
    /// pooler when the row goes to a new client): `nextgres.clients` adds
    /// them to the pooler's count, which sees none of them.
    pub xacts: AtomicU64,
    /// The client's ATTACH, as the next backend to take it reads it: written
    /// by the pooler when it queues the client, then by each backend that
    /// releases it (`slot.ticket` is the registration's generation).
    pub slot: AttachSlot,
}

/// What backends did for a pool's queued clients (`nextgres.pools` adds
/// them to the pooler's own counts). Each backend adds to its own row's
/// (`KqBackend::counters`): one writer per cache line, where one shared
/// line written at every transaction travelled between all the pool's
/// cores (BENCHMARKS.md, session 34). The pooler sums a pool's backends'
/// rows and, as a backend goes, moves its counts into the pool's
/// `KqPool::gone`.
#[repr(C, align(64))]
#[derive(Default)]
pub struct KqCounters {
    pub xacts: AtomicU64,
    pub queries: AtomicU64,
    pub query_us: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Microseconds backends were attached to queued clients.
    pub xact_us: AtomicU64,
    /// Queued clients whose query was already waiting when a backend came
    /// to the queue (it took it without waiting itself): the pool's waits.
    pub waits: AtomicU64,
}

impl KqCounters {
    /// (xacts, queries, query_us, bytes_sent, xact_us, waits), in that order.
    pub fn all(&self) -> [&AtomicU64; 6] {
        [&self.xacts, &self.queries, &self.query_us, &self.bytes_sent, &self.xact_us, &self.waits]
    }

    /// Every counter to 0 (a row given to a new backend, `reset_stats`).
    pub fn clear(&self) {
        self.all().iter().for_each(|a| a.store(0, Ordering::Relaxed));
    }
}

/// How long (µs) after a backend last found a queued client waiting
/// (`KqPool::waited_at`) the pooler still counts the pool's queue as busy
/// (`Pool::queue_busy`): every queued client may then want a backend.
pub const KQ_BUSY_WITHIN_US: i64 = 1_000_000;

/// Microseconds of `CLOCK_MONOTONIC`: one clock for every process of the
/// machine that the wall clock's steps do not move (a server TimestampTz
/// does follow them: a mark left in the future by a step back would stop
/// the marks below from being renewed or counting as recent for as long
/// as the step). For the marks processes compare: `KqPool::waited_at`,
/// `PoolRow::waited_at`, `KqBackend::idle_since`. Never 0 (0: no mark).
pub fn mono_now() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime(2) writes the timespec it is given; the
    // monotonic clock exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as i64 * 1_000_000 + ts.tv_nsec as i64 / 1_000).max(1)
}

/// Was a wait mark (`KqPool::waited_at`, `PoolRow::waited_at`; 0: never)
/// within `within_us` of `now` (both [`mono_now`], µs)?
pub fn waited_within(waited_at: i64, now: i64, within_us: i64) -> bool {
    waited_at != 0 && (0..within_us).contains(&(now - waited_at))
}

/// Does a pool's kernel queue count as busy by its wait mark
/// (`KqPool::waited_at` within `KQ_BUSY_WITHIN_US` of `now`)?
pub fn kq_waited_recently(waited_at: i64, now: i64) -> bool {
    waited_within(waited_at, now, KQ_BUSY_WITHIN_US)
}

impl Tables {
    /// Pooler: `kq_waited_recently` for the kernel queue of the pool in
    /// shared row `prow` (false without kernel queue rows).
    pub fn kq_waited_recently(&self, prow: usize, now: i64) -> bool {
        kq_waited_recently(self.kq_pool(prow).map_or(0, |w| w.waited_at.load(Ordering::Relaxed)), now)
    }
}

/// A pool's kernel queue words.
#[repr(C, align(64))]
#[derive(Default)]
pub struct KqPool {
    /// The counts of its backends that are gone (written by the pooler).
    pub gone: KqCounters,
    /// When a backend last took a client whose query waited (`mono_now`,
    /// µs; 0: never), stored at most once a millisecond: backends keep no
    /// idle client (`hold_idle_clients`) while it is recent, as on the
    /// handoff path. Read at every boundary, so on a line of its own that
    /// stays shared.
    pub waited_at: std::sync::atomic::AtomicI64,
}

/// A backend row's kernel queue word.
#[repr(C, align(64))]
pub struct KqBackend {
    /// Cancel hand-shake (`pooler::kq`): 1 while the pooler decides
    /// whether to signal this backend for a queued client's cancel, 2 once
    /// it has (the SIGINT is pending), 0 otherwise. The backend takes no
    /// queued client while it is 1 and clears a 2 before it takes one.
    pub hold: AtomicU32,
    /// 1: the pooler asked this lent backend back (`KQ_RECALL`); it checks
    /// at each boundary (the message only wakes it while it waits).
    pub recall: AtomicU32,
    /// While lent: since when (`mono_now`, µs) this backend has waited on
    /// the queue with no client to serve, 0 while it serves one; written
    /// by the backend. The pooler closes one idle past
    /// `idle_backend_timeout`, as a parked one.
    pub idle_since: std::sync::atomic::AtomicI64,
    /// Transactions of queued clients this backend served (added by it at
    /// each; zeroed by the pooler with its row): `nextgres.backends` adds
    /// them to the pooler's count. Unlike `counters`, never reset or moved.
    pub xacts: AtomicU64,
    /// What this backend did for its pool's queued clients; written by it
    /// alone, read by the pooler (`KqCounters`).
    pub counters: KqCounters,
}

const _: () = assert!(size_of::<KqRow>() % 64 == 0);
const _: () = assert!(size_of::<KqPool>() % 64 == 0 && size_of::<KqBackend>() % 64 == 0);

pub const OP_SLOTS: usize = 64;
/// Does one of `pauses` ((database, role), "" as the role for every role
/// of the database) hold the pool of `database` and `role`? The pooler's
/// rule (`pooler::ops`) and the views' (`nextgres.pools.paused`).
pub fn pause_covers(pauses: &[(String, String)], database: &str, role: &str) -> bool {
    pauses.iter().any(|(d, r)| d == database && (r.is_empty() || r == role))
}

/// Why `Tables::op_add` found no slot: `OP_PAUSES_MAX` pauses are in force,
/// or every slot holds a pause or an operation the pooler has not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpFull {
    Pauses,
    Slots,
}

/// Pauses stay in their slot until resumed: they may hold at most this
/// many, so the one-shot operations (reconnect, kill, reset_stats) keep 16
/// slots, which the pooler empties within a second.
pub const OP_PAUSES_MAX: usize = OP_SLOTS - 16;
pub const OP_FREE: u8 = 0;
pub const OP_PAUSE: u8 = 1;
pub const OP_RECONNECT: u8 = 2;
pub const OP_RESET_STATS: u8 = 3;
pub const OP_KILL: u8 = 4;
/// Kill one client: `database` holds its address as `nextgres.clients`
/// shows it, `port` its port.
pub const OP_KILL_CLIENT: u8 = 5;

/// One operation on the pools of `database` (and of `role` only, unless empty).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OpSlot {
    pub kind: u8,
    pub database: [u8; NAME_LEN],
    pub role: [u8; NAME_LEN],
    /// OP_KILL_CLIENT: the client's port.
    pub port: i32,
}

/// Room for the nextgres.* items of pg_db_role_setting and those of the
/// settings a login reports (about 50-100 bytes each: a few thousand roles
/// with their own TimeZone or search_path).
pub const CONF_LEN: usize = 256 * 1024;

pub const DRAIN_SLOTS: usize = 8;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Drain {
    pub database: [u8; NAME_LEN],
    /// The backend running the command (0: slot free).
    pub pid: i32,
    /// When it started (TimestampTz): a slot is ignored after DRAIN_MAX_US,
    /// so a backend that died mid-command cannot block a pool for long.
    pub since: i64,
}

pub const DRAIN_MAX_US: i64 = 30_000_000;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PoolRow {
    pub in_use: bool,
    pub database: [u8; NAME_LEN],
    pub role: [u8; NAME_LEN],
    pub clients_idle: i32,
    pub clients_active: i32,
    pub clients_waiting: i32,
    pub backends_parked: i32,
    pub backends_attached: i32,
    pub backends_starting: i32,
    /// Of the attached ones, those counted as a pinned client's dedicated
    /// session, outside pool_size.
    pub backends_dedicated: i32,
    pub xacts: i64,
    /// Statements run for the pool's clients (CommandComplete/ErrorResponse).
    pub queries: i64,
    /// Time backends spent attached to the pool's clients (µs).
    pub xact_us: i64,
    pub waits: i64,
    pub wait_us: i64,
    pub max_wait_us: i64,
    /// Query time (µs), see `backend::comm`.
    pub query_us: i64,
    /// Protocol bytes sent to the pool's clients by its backends.
    pub bytes_sent: i64,
    /// Bytes received from the pool's clients since their login (TCP_INFO).
    pub bytes_received: i64,
    /// Clients a backend took at a transaction boundary from an ATTACH sent
    /// ahead, without parking (`pooler::ahead`).
    pub attaches_ahead: i64,
    /// Of `xacts`, those of clients a backend took from the pool's kernel
    /// queue (`pooler::kq`).
    pub kq_xacts: i64,
    /// `Pool::waited_at`: when a client last got a backend after waiting
    /// (`mono_now`, µs).
    pub waited_at: i64,
    /// Effective `pool_size` (its own from pg_db_role_setting, else global).
    pub pool_size: i32,
    /// Effective `pool_mode`: 1 session, 0 transaction.
    pub session_mode: bool,
    /// Effective `pool_mode` is dedicated (no pooling).
    pub dedicated_mode: bool,
    /// The role (pg_authid oid) its clients authenticated as, 0 unknown:
    /// the kill functions' privilege check goes by it, not by the name,
    /// which a rename may have given another role since.
    pub role_oid: u32,
}

#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClientState {
    Login = 0,
    Idle = 1,
    Waiting = 2,
    Active = 3,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClientRow {
    pub in_use: bool,
    pub addr: [u8; ADDR_LEN],
    pub port: i32,
    pub pool: i32,
    pub database: [u8; NAME_LEN],
    pub role: [u8; NAME_LEN],
    pub state: ClientState,
    pub backend_pid: i32,
    pub connected_at: i64,
    pub xacts: i64,
    /// On TLS (terminated by the pooler).
    pub tls: bool,
    /// TLS version as OpenSSL names it ("TLSv1.3"); empty for plaintext.
    pub tls_version: [u8; TLS_VERSION_LEN],
    /// Cipher suite as OpenSSL names it ("TLS_AES_256_GCM_SHA384"); empty
    /// for plaintext.
    pub tls_cipher: [u8; TLS_CIPHER_LEN],
    /// The subject DN of the client certificate verified during the TLS
    /// handshake, in `pg_stat_ssl.client_dn`'s form; empty without one.
    pub client_dn: [u8; CERT_LEN],
    /// A TLS client parked: idle in the pooler without its relay thread
    /// (`pooler::park`).
    pub tls_parked: bool,
}

#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BackendState {
    Starting = 0,
    Parked = 1,
    Attached = 2,
    /// Lent to its pool's kernel queue (`pooler::kq`): serving its clients
    /// or waiting for one.
    Lent = 3,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct BackendRow {
    pub in_use: bool,
    pub pid: i32,
    pub pool: i32,
    pub state: BackendState,
    pub client_row: i32,
    pub xacts: i64,
    pub since: i64,
    /// Why the backend keeps its client (crate::pg::session::Pin); written by the backend.
    pub pin: u8,
    /// 1 while the backend keeps an idle client only because nobody waits
    /// (nextgres.hold_idle_clients); written by the backend. The pooler asks
    /// only such backends for their client: the others check the waiting
    /// count themselves at their next ReadyForQuery.
    pub lingering: u8,
    /// The pooler counts this backend as its pinned client's dedicated
    /// session, outside pool_size (nextgres.max_pinned_backends); written by
    /// the pooler.
    pub dedicated: bool,
    /// Tickets of the ATTACHes the pooler sent this backend *ahead* (while
    /// it serves another client's transaction), one word per queue place
    /// (a ticket names its place, `ahead_place`), 0 when none: whoever
    /// swaps a ticket to 0 first owns that client (`ahead_claim`), the
    /// backend taking it at its ReadyForQuery(I) or the pooler taking it
    /// back. Only ever accessed atomically.
    pub ahead: [u64; AHEAD_DEPTH],
    /// Ticket of an ATTACH sent ahead that the backend had not claimed when
    /// its RELEASED was read: the pooler *handed* it the client (it claims
    /// it once parked, `ahead_claim_handed`) and moved the ticket here, so
    /// `ahead` is free for the next client sent ahead. 0 when none. Only
    /// ever accessed atomically.
    pub handed: u64,
    /// The id of a client whose CancelRequest came while this backend
    /// served or had claimed it, until the backend's first statement for
    /// that client takes it (`shmem::cancel`); 0 when none. Only ever
    /// accessed atomically.
    pub cancel: u64,
}

impl BackendRow {
    /// A copy of the row whose ticket words (`ahead`, `handed`, which others
    /// swap without the table lock) and cancel word are read atomically, one by one: a view
    /// may mix moments between them, but never sees a torn or racing plain
    /// read. The other fields are copied as they are.
    fn copy_tickets_atomically(&mut self) -> BackendRow {
        // SAFETY: the words are u64 fields of a row in shared memory that
        // every process reads and writes only through atomic views
        // (`ticket_word`); 8-aligned as there.
        let load = |w: &mut u64| unsafe { AtomicU64::from_ptr(w) }.load(Ordering::Acquire);
        let mut ahead = [0u64; AHEAD_DEPTH];
        for (to, from) in ahead.iter_mut().zip(self.ahead.iter_mut()) {
            *to = load(from);
        }
        let handed = load(&mut self.handed);
        let cancel = load(&mut self.cancel);
        BackendRow { ahead, handed, cancel, ..*self }
    }

    /// Clients sent ahead to this backend that it has neither taken nor
    /// refused, nor the pooler taken back (0 to `AHEAD_DEPTH`), from a copy of the row
    /// (`Tables::snapshot`, which reads these words atomically; a view may
    /// mix moments between them).
    pub fn queued(&self) -> i32 {
        self.ahead.iter().filter(|&&t| t != 0 && t & AHEAD_REFUSED == 0).count() as i32
    }
}

fn caps() -> (usize, usize, usize) {
    let pools = crate::settings::MAX_POOLS.get() as usize;
    // Rows beyond max_client_conn for TLS connections refused there, which
    // are taken through TLS to read a CancelRequest (`pooler::refusing`).
    let clients = crate::settings::MAX_CLIENT_CONN.get() as usize + crate::pooler::refusing::MAX_REFUSING;
    let backends = crate::pg::server::max_connections().max(0) as usize + 16;
    (pools, clients, backends)
}

/// Kernel queue rows are in the segment (`nextgres.kernel_queue` at start).
fn kq_rows() -> bool {
    crate::settings::KERNEL_QUEUE.get()
}

fn align(n: usize) -> usize {
    (n + 15) & !15
}

fn layout() -> (usize, usize, usize, usize) {
    let (p, c, b) = caps();
    let pools_off = align(size_of::<Header>());
    let clients_off = pools_off + align(p * size_of::<PoolRow>());
    let backends_off = clients_off + align(c * size_of::<ClientRow>());
    // The rings come last, at the first address aligned for a Ring (the
    // segment's own start is only MAXALIGNed): room for that too. Then the
    // ATTACH slots, AHEAD_DEPTH per backend row (the rings' size keeps
    // their alignment).
    const _: () = assert!(size_of::<Ring>() % align_of::<AttachSlot>() == 0 && align_of::<Ring>() >= align_of::<AttachSlot>());
    const _: () = assert!(size_of::<AttachSlot>() % align_of::<KqRow>() == 0 && align_of::<AttachSlot>() >= align_of::<KqRow>());
    let total = backends_off
        + b * size_of::<BackendRow>()
        + align_of::<Ring>()
        + b * size_of::<Ring>()
        + b * AHEAD_DEPTH * size_of::<AttachSlot>()
        + if kq_rows() { c * size_of::<KqRow>() + p * size_of::<KqPool>() + b * size_of::<KqBackend>() } else { 0 };
    (pools_off, clients_off, backends_off, total)
}

/// Postmaster: reserve the segment.
pub fn request() {
    raw::request(layout().3, init);
}

fn init(base: *mut c_void, found: bool) {
    if found {
        return;
    }
    let (p, c, b) = caps();
    unsafe {
        std::ptr::write_bytes(base.cast::<u8>(), 0, layout().3);
        let h = &mut *base.cast::<Header>();
        h.pools_cap = p as u32;
        h.clients_cap = c as u32;
        h.backends_cap = b as u32;
        h.kq_rows = kq_rows();
        // A fresh token per shared-memory lifetime (server start, crash restart).
        if !raw::strong_random(&mut h.token) {
            pgrx::error!("nextgres: could not generate a random token");
        }
    }
}

/// The shared tables, or None when nextgres was not in shared_preload_libraries.
pub struct Tables {
    base: *mut u8,
}

pub fn tables() -> Option<Tables> {
    let base = raw::base();
    (!base.is_null()).then(|| Tables { base: base.cast() })
}

impl Tables {
    pub fn header(&self) -> &Header {
        unsafe { &*self.base.cast::<Header>() }
    }
    /// The pooler sets its pid and port once it serves; 0 when no pooler runs.
    pub fn set_pooler(&self, pid: i32, port: i32) {
        let h = unsafe { &mut *self.base.cast::<Header>() };
        h.port = port;
        h.pooler_pid.store(pid, Ordering::SeqCst);
    }
    pub fn pooler_pid(&self) -> i32 {
        self.header().pooler_pid.load(Ordering::SeqCst)
    }

    fn slice<T>(&self, off: usize, len: usize) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.base.add(off).cast::<T>(), len) }
    }
    fn pools_raw(&self) -> &mut [PoolRow] {
        let h = self.header();
        self.slice(layout().0, h.pools_cap as usize)
    }
    fn clients_raw(&self) -> &mut [ClientRow] {
        let h = self.header();
        self.slice(layout().1, h.clients_cap as usize)
    }
    fn backends_raw(&self) -> &mut [BackendRow] {
        let h = self.header();
        self.slice(layout().2, h.backends_cap as usize)
    }

    /// The release ring of backend row `row` (`nextgres_core::ring`).
    pub fn ring(&self, row: usize) -> Option<&Ring> {
        let h = self.header();
        if row >= h.backends_cap as usize {
            return None;
        }
        let end = self.base as usize + layout().2 + h.backends_cap as usize * size_of::<BackendRow>();
        let off = end.next_multiple_of(align_of::<Ring>()) - self.base as usize + row * size_of::<Ring>();
        // SAFETY: inside the segment (`layout` counts a ring per backend
        // row and the alignment slack), aligned for Ring, zeroed at creation
        // (an empty ring); every field of a Ring is an atomic or padding, so
        // shared references from any process are sound.
        Some(unsafe { &*self.base.add(off).cast::<Ring>() })
    }

    /// The ATTACH slot of queue place `place` of backend row `row`
    /// (`nextgres_core::attach_slot`).
    pub fn attach_slot(&self, row: usize, place: usize) -> Option<&AttachSlot> {
        let cap = self.header().backends_cap as usize;
        if row >= cap || place >= AHEAD_DEPTH {
            return None;
        }
        let rings = self.ring(0)? as *const Ring as usize - self.base as usize;
        let off = rings + cap * size_of::<Ring>() + (row * AHEAD_DEPTH + place) * size_of::<AttachSlot>();
        // SAFETY: inside the segment (`layout` counts AHEAD_DEPTH slots per
        // backend row after the rings), aligned (the rings' end is), zeroed
        // at creation (no ticket); every field of a slot is an atomic, so
        // shared references from any process are sound.
        Some(unsafe { &*self.base.add(off).cast::<AttachSlot>() })
    }

    /// The kernel queue row of client row `row`; None when the segment has
    /// none (`nextgres.kernel_queue` was off at server start).
    pub fn kq_row(&self, row: usize) -> Option<&KqRow> {
        let h = self.header();
        if !h.kq_rows || row >= h.clients_cap as usize {
            return None;
        }
        let cap = h.backends_cap as usize;
        let slots = self.attach_slot(0, 0)? as *const AttachSlot as usize - self.base as usize;
        let off = slots + cap * AHEAD_DEPTH * size_of::<AttachSlot>() + row * size_of::<KqRow>();
        // SAFETY: inside the segment (`layout` counts a KqRow per client row
        // after the ATTACH slots when `kq_rows`), aligned (a slot's size is a
        // multiple of KqRow's alignment), zeroed at creation (the pooler's
        // owner word, no slot ticket); every field is an atomic.
        Some(unsafe { &*self.base.add(off).cast::<KqRow>() })
    }

    /// The kernel queue words of pool row `row`.
    pub fn kq_pool(&self, row: usize) -> Option<&KqPool> {
        let h = self.header();
        if !h.kq_rows || row >= h.pools_cap as usize {
            return None;
        }
        let end = self.kq_row(0)? as *const KqRow as usize + h.clients_cap as usize * size_of::<KqRow>();
        // SAFETY: inside the segment after the KqRows (`layout`), aligned
        // (a KqRow's size is a multiple of 64), zeroed; all atomics.
        Some(unsafe { &*((end + row * size_of::<KqPool>()) as *const KqPool) })
    }

    /// The kernel queue word of backend row `row`.
    pub fn kq_backend(&self, row: usize) -> Option<&KqBackend> {
        let h = self.header();
        if !h.kq_rows || row >= h.backends_cap as usize {
            return None;
        }
        let end = self.kq_pool(0)? as *const KqPool as usize + h.pools_cap as usize * size_of::<KqPool>();
        // SAFETY: inside the segment after the KqPools (`layout`), aligned
        // (a KqPool's size is a multiple of 64), zeroed; all atomics.
        Some(unsafe { &*((end + row * size_of::<KqBackend>()) as *const KqBackend) })
    }

    /// The kernel queue's fixed descriptor base, 0 when there is no queue.
    pub fn kq_fd_base(&self) -> i32 {
        self.header().kq_fd_base.load(Ordering::Acquire)
    }

    /// Pooler, at its start: the fixed descriptor base (0: none).
    pub fn set_kq_fd_base(&self, base: i32) {
        self.header().kq_fd_base.store(base, Ordering::Release);
    }

    /// Pooler, giving backend row `row` to a new backend: its ATTACH slots
    /// name no ticket.
    pub fn attach_slots_clear(&self, row: usize) {
        for place in 0..AHEAD_DEPTH {
            if let Some(slot) = self.attach_slot(row, place) {
                slot.clear();
            }
        }
    }

    /// Pooler: may clients be sent ahead through ATTACH slots? (No once a
    /// backend found `pidfd_getfd` refused, `attach_slots_refused`.)
    pub fn attach_slots_usable(&self) -> bool {
        self.header().attach_slots_off.load(Ordering::Relaxed) == 0
    }

    /// Backend: `pidfd_getfd` is refused here; true the first time (to log
    /// it once).
    pub fn attach_slots_refused(&self) -> bool {
        self.header().attach_slots_off.swap(1, Ordering::Relaxed) == 0
    }

    /// Pooler: entries pushed to any ring so far (`ring_pushed`).
    pub fn ring_pushes(&self) -> u64 {
        self.header().ring_pushes.load(Ordering::Acquire)
    }

    /// Backend: counts an entry it pushed, after publishing it; true when
    /// the pooler sleeps and this backend is the one to wake it. (Pairs with
    /// `pooler_sleeps`: each side writes its word, then reads the other's,
    /// all sequentially consistent, so one of them sees the other.)
    pub fn ring_pushed(&self) -> bool {
        self.header().ring_pushes.fetch_add(1, Ordering::SeqCst);
        self.header().pooler_sleeps.load(Ordering::SeqCst) != 0 && self.header().pooler_sleeps.swap(0, Ordering::SeqCst) != 0
    }

    /// Pooler: about to sleep (`on`), or awake again. Returns the ring
    /// entries pushed so far, read after the store: an entry after those
    /// wakes it.
    pub fn pooler_sleeps(&self, on: bool) -> u64 {
        self.header().pooler_sleeps.store(i32::from(on), Ordering::SeqCst);
        self.header().ring_pushes.load(Ordering::SeqCst)
    }

    pub fn capacities(&self) -> (usize, usize, usize) {
        let h = self.header();
        (h.pools_cap as usize, h.clients_cap as usize, h.backends_cap as usize)
    }

    /// Writer side (pooler only): mutate rows under the exclusive lock.
    pub fn write<R>(&self, f: impl FnOnce(&mut [PoolRow], &mut [ClientRow], &mut [BackendRow]) -> R) -> R {
        let _g = Guard::exclusive();
        f(self.pools_raw(), self.clients_raw(), self.backends_raw())
    }

    /// Reader side: consistent copies of the rows in use.
    pub fn snapshot(&self) -> (Vec<PoolRow>, Vec<ClientRow>, Vec<BackendRow>) {
        let _g = Guard::shared();
        (
            self.pools_raw().iter().filter(|r| r.in_use).copied().collect(),
            self.clients_raw().iter().filter(|r| r.in_use).copied().collect(),
            self.backends_in_use(),
        )
    }

    /// The client rows in use with their row numbers, which of them a
    /// backend serves from a kernel queue now (client row -> that backend's
    /// pid: owner word `Taken`; empty without a kernel queue), and the
    /// backend rows in use. One lock, so no row is another client's by the
    /// time it is joined.
    pub fn snapshot_clients_serving(&self) -> (Vec<(usize, ClientRow)>, std::collections::HashMap<usize, i32>, Vec<BackendRow>) {
        let _g = Guard::shared();
        // `xacts` with the transactions backends served it from a kernel
        // queue, which the pooler does not see.
        let clients: Vec<(usize, ClientRow)> = self
            .clients_raw()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.in_use)
            .map(|(i, r)| {
                let mut c = *r;
                c.xacts += self.kq_row(i).map_or(0, |k| k.xacts.load(Ordering::Relaxed) as i64);
                (i, c)
            })
            .collect();
        // The backends under the same lock: a client row joined with a later
        // copy of the backends could show the dedicated flag of the pinned
        // client its backend served before.
        (clients, self.kq_serving_locked(), self.backends_in_use())
    }

    /// Client row -> pid of the backend serving it from a kernel queue; the
    /// caller holds the lock (a backend row's pid is the pooler's to write).
    fn kq_serving_locked(&self) -> std::collections::HashMap<usize, i32> {
        let backends = self.backends_raw();
        let cap = if self.header().kq_rows { self.header().clients_cap as usize } else { 0 };
        (0..cap)
            .filter_map(|r| match nextgres_core::kq::load(&self.kq_row(r)?.owner) {
                nextgres_core::kq::Owner::Taken { row, .. } => {
                    backends.get(row as usize).filter(|b| b.in_use).map(|b| (r, b.pid))
                }
                _ => None,
            })
            .collect()
    }

    /// The backend rows in use (ticket words read atomically; `xacts` with
    /// the queued clients' transactions each served, `KqBackend::xacts`);
    /// the caller holds the lock.
    fn backends_in_use(&self) -> Vec<BackendRow> {
        self.backends_raw()
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| r.in_use)
            .map(|(i, r)| {
                let mut b = r.copy_tickets_atomically();
                b.xacts += self.kq_backend(i).map_or(0, |h| h.xacts.load(Ordering::Relaxed) as i64);
                b
            })
            .collect()
    }

    /// Every pool row's (database, role), by row; the caller holds the lock.
    fn pool_names_by_row(&self) -> Vec<(String, String)> {
        self.pools_raw().iter().map(|r| (name(&r.database), name(&r.role))).collect()
    }

    /// The role oid of the pools in use named (`database`, `role`), by name
    /// and oid (0 unknown); with `row`, only the pool of that shared row.
    pub fn pool_roles(&self, database: Option<&str>, role: Option<&str>, row: Option<usize>) -> Vec<(String, u32)> {
        let _g = Guard::shared();
        self.pools_raw()
            .iter()
            .enumerate()
            .filter(|&(i, r)| {
                r.in_use
                    && row.is_none_or(|x| x == i)
                    && database.is_none_or(|d| name(&r.database) == d)
                    && role.is_none_or(|n| name(&r.role) == n)
            })
            .map(|(_, r)| (name(&r.role), r.role_oid))
            .collect()
    }

    /// Why a backend keeps its client (written by the backend itself).
    pub fn backend_pin(&self, row: usize) -> u8 {
        self.backends_raw().get(row).map(|r| unsafe { std::ptr::read_volatile(&r.pin) }).unwrap_or(0)
    }

    /// The backends in use and every pool's names by row, under one lock
    /// (a pool row may be given to another pool in between).
    pub fn backends_and_pool_names(&self) -> (Vec<BackendRow>, Vec<(String, String)>) {
        let _g = Guard::shared();
        (self.backends_in_use(), self.pool_names_by_row())
    }
}

/// Copies `s` into a NUL-terminated field, truncated at a character
/// boundary to fit.
pub fn set_name(field: &mut [u8], s: &str) {
    field.fill(0);
    let s = nextgres_core::cert::cut_at_char(s, field.len() - 1);
    field[..s.len()].copy_from_slice(s.as_bytes());
}

pub fn name(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

impl Tables {
    /// SQL functions: records an operation (a pause already in force is not
    /// added twice). Returns the `ops_gen` to wait for (`ops_ack`), or which
    /// limit left no slot.
    pub fn op_add(&self, kind: u8, database: &str, role: &str) -> Result<u64, OpFull> {
        self.op_add_port(kind, database, role, 0)
    }

    /// `op_add` with a port (OP_KILL_CLIENT).
    pub fn op_add_port(&self, kind: u8, database: &str, role: &str, port: i32) -> Result<u64, OpFull> {
        let h = unsafe { &mut *self.base.cast::<Header>() };
        let _g = Guard::exclusive();
        let same = |o: &OpSlot| o.kind == kind && name(&o.database) == database && name(&o.role) == role;
        if !(kind == OP_PAUSE && h.ops.iter().any(same)) {
            if kind == OP_PAUSE && h.ops.iter().filter(|o| o.kind == OP_PAUSE).count() >= OP_PAUSES_MAX {
                return Err(OpFull::Pauses);
            }
            let slot = h.ops.iter_mut().find(|o| o.kind == OP_FREE).ok_or(OpFull::Slots)?;
            slot.kind = kind;
            set_name(&mut slot.database, database);
            set_name(&mut slot.role, role);
            slot.port = port;
        }
        Ok(h.ops_gen.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// SQL functions: ends the pauses of `database` (of `role` only, or all
    /// of them with None). Returns how many ended.
    pub fn ops_resume(&self, database: &str, role: Option<&str>) -> (usize, u64) {
        let h = unsafe { &mut *self.base.cast::<Header>() };
        let _g = Guard::exclusive();
        let mut n = 0;
        for o in h.ops.iter_mut() {
            if o.kind == OP_PAUSE && name(&o.database) == database && role.is_none_or(|r| name(&o.role) == r) {
                o.kind = OP_FREE;
                n += 1;
            }
        }
        (n, h.ops_gen.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Views: the pauses in force, (database, role), "" as the role for a
    /// whole database's; nothing is taken (`pause_covers` matches them).
    pub fn pauses(&self) -> Vec<(String, String)> {
        let h = self.header();
        let _g = Guard::shared();
        h.ops.iter().filter(|o| o.kind == OP_PAUSE).map(|o| (name(&o.database), name(&o.role))).collect()
    }

    /// Pooler: the pauses in force, and the one-shot operations (kind,
    /// database, role, port), taken (removed).
    pub fn ops_take(&self) -> (Vec<(String, String)>, Vec<(u8, String, String, i32)>) {
        let h = unsafe { &mut *self.base.cast::<Header>() };
        let _g = Guard::exclusive();
        let (mut pauses, mut once) = (Vec::new(), Vec::new());
        for o in h.ops.iter_mut() {
            match o.kind {
                OP_FREE => {}
                OP_PAUSE => pauses.push((name(&o.database), name(&o.role))),
                k => {
                    once.push((k, name(&o.database), name(&o.role), o.port));
                    o.kind = OP_FREE;
                }
            }
        }
        (pauses, once)
    }

    /// Wakes the pooler (SIGUSR1: its handler wakes its epoll, `pooler::agent`).
    pub fn wake_pooler(&self) {
        wake_pooler(self)
    }

    /// Settings reader: replaces the pg_db_role_setting copy (truncated to
    /// CONF_LEN at an item boundary; returns false if it was).
    pub fn conf_write(&self, data: &[u8]) -> bool {
        let h = unsafe { &mut *self.base.cast::<Header>() };
        let mut n = data.len().min(CONF_LEN);
        if n < data.len() {
            // Whole items only: back up to the end of the last complete one.
            let mut seen = 0;
            let mut cut = 0;
            for (i, &b) in data[..n].iter().enumerate() {
                if b == 0 {
                    seen += 1;
                    if seen % 3 == 0 {
                        cut = i + 1;
                    }
                }
            }
            n = cut;
        }
        {
            let _g = Guard::exclusive();
            h.conf[..n].copy_from_slice(&data[..n]);
            h.conf_len = n as u32;
            h.conf_truncated = n < data.len();
            h.conf_gen.fetch_add(1, Ordering::SeqCst);
        }
        n == data.len()
    }

    /// Pooler: the copy, its generation, and whether it is whole.
    pub fn conf_read(&self) -> (u64, Vec<u8>, bool) {
        let h = self.header();
        let _g = Guard::shared();
        let gen = h.conf_gen.load(Ordering::SeqCst);
        (gen, h.conf[..(h.conf_len as usize).min(CONF_LEN)].to_vec(), !h.conf_truncated)
    }

    /// All client rows by index (for joining backends to their clients).
    /// The backends in use, every pool's names by row and every client row
    /// by index, copied under one lock: joined across two, a backend's
    /// client row could be another client's by the second copy (rows are
    /// reused at once), and `nextgres.backends` would show that client.
    pub fn snapshot_backends_joined(&self) -> (Vec<BackendRow>, Vec<(String, String)>, Vec<ClientRow>, std::collections::HashMap<usize, i32>) {
        let _g = Guard::shared();
        (self.backends_in_use(), self.pool_names_by_row(), self.clients_raw().to_vec(), self.kq_serving_locked())
    }

    /// The pool rows in use and, per pool row, how many of its clients a
    /// backend serves from its kernel queue now.
    pub fn snapshot_pools_serving(&self) -> (Vec<(i32, PoolRow)>, std::collections::HashMap<i32, i32>) {
        let _g = Guard::shared();
        let pools = self.pools_raw().iter().enumerate().filter(|(_, r)| r.in_use).map(|(i, r)| (i as i32, *r)).collect();
        let clients = self.clients_raw();
        let mut per_pool = std::collections::HashMap::new();
        for (r, _) in self.kq_serving_locked() {
            if let Some(c) = clients.get(r).filter(|c| c.in_use) {
                *per_pool.entry(c.pool).or_insert(0) += 1;
            }
        }
        (pools, per_pool)
    }
}

/// A pooled backend records why it keeps its client (0: it does not). The
/// backend writes only this field of its own row, found by pid.
pub fn report_pin(pin: u8) {
    let Some(t) = tables() else { return };
    let pid = crate::pg::server::my_pid();
    let _g = Guard::exclusive();
    if let Some(r) = t.backends_raw().iter_mut().find(|r| r.in_use && r.pid == pid) {
        r.pin = pin;
    }
}

/// A backend (DROP DATABASE and friends) asks the pooler to close the
/// backends of `database`'s pools; the returned slot is passed to
/// `drain_end`. None when no slot is free or nextgres is not preloaded: the
/// command then runs as it would without nextgres.
pub fn drain_begin(database: &str) -> Option<usize> {
    let t = tables()?;
    let pid = crate::pg::server::my_pid();
    let slot = {
        let _g = Guard::exclusive();
        let h = unsafe { &mut *t.base.cast::<Header>() };
        let now = raw::now();
        let i = h.drains.iter().position(|d| d.pid == 0 || now - d.since > DRAIN_MAX_US)?;
        set_name(&mut h.drains[i].database, database);
        h.drains[i].pid = pid;
        h.drains[i].since = now;
        i
    };
    wake_pooler(&t);
    Some(slot)
}

pub fn drain_end(slot: usize) {
    let Some(t) = tables() else { return };
    {
        let _g = Guard::exclusive();
        let h = unsafe { &mut *t.base.cast::<Header>() };
        h.drains[slot].pid = 0;
    }
    wake_pooler(&t);
}

/// SIGUSR1 wakes the pooler process (its handler writes its eventfd, `pooler::agent`).
fn wake_pooler(t: &Tables) {
    let pid = t.pooler_pid();
    if pid > 0 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGUSR1);
    }
}

impl Tables {
    /// Pooler: the databases being drained now.
    pub fn draining(&self) -> Vec<String> {
        let _g = Guard::shared();
        let now = raw::now();
        self.header()
            .drains
            .iter()
            .filter(|d| d.pid != 0 && now - d.since <= DRAIN_MAX_US)
            .map(|d| name(&d.database))
            .collect()
    }
}

/// A pooled backend's own row in the backends table (the pooler fills in
/// the pid during the login, so early lookups may find nothing).
pub fn own_backend_row() -> Option<usize> {
    let t = tables()?;
    let pid = crate::pg::server::my_pid();
    let _g = Guard::shared();
    t.backends_raw().iter().position(|r| r.in_use && r.pid == pid)
}

/// Pooled backend: announce (or stop announcing) that it keeps an idle
/// client. Store, then a full fence before the backend reads the waiting
/// count, pairs with the pooler's store of that count and fence before it
/// reads this flag: at least one side sees the other, so a waiting client is
/// never left behind a lingering backend.
///
/// Only while the row is still this backend's: one that outlived its pooler
/// (a restart; it keeps serving its client) holds the index of a row the
/// new pooler may have given another backend, whose flag it must not write.
pub fn set_lingering(row: usize, on: bool) {
    let Some(t) = tables() else { return };
    let pid = crate::pg::server::my_pid();
    if let Some(r) = t.backends_raw().get_mut(row) {
        // SAFETY: a field of a shared row that only the pooler writes while
        // it is in use (set before this backend's login completed).
        let mine = unsafe { std::ptr::read_volatile(&r.in_use) && std::ptr::read_volatile(&r.pid) == pid };
        if mine {
            unsafe { std::ptr::write_volatile(&mut r.lingering, on as u8) };
        }
    }
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// Pooled backend: is backend row `row` still its own (`Tables::backend_row_is_mine`)?
/// False without the shared tables.
pub fn backend_row_is_mine(row: usize) -> bool {
    tables().is_some_and(|t| t.backend_row_is_mine(row))
}

impl Tables {
    /// Pooled backend: is backend row `row` (in use) still its own? A
    /// backend that outlived its pooler holds the index of a row the next
    /// pooler may have given another backend.
    pub fn backend_row_is_mine(&self, row: usize) -> bool {
        let pid = crate::pg::server::my_pid();
        // SAFETY: fields of a shared row that only the pooler writes, read
        // as they are (racy by design, as `set_lingering`).
        self.backends_raw().get(row).is_some_and(|r| unsafe { std::ptr::read_volatile(&r.in_use) && std::ptr::read_volatile(&r.pid) == pid })
    }

    /// Agent, once its pooler has ended and `set_pooler(0)` says so: wakes
    /// (SIGUSR1, their latch) the backends keeping an idle client only
    /// because nobody waits (`lingering`). They wait on that client and
    /// their latch, not on the control socket, and once woken see the
    /// pooler gone and end the client's session with 57P01
    /// (`backend::park::pooler_gone`) rather than when it next speaks. One
    /// announcing after this look sees the cleared pid itself (store, fence,
    /// load on each side, as `set_lingering`).
    pub fn wake_lingering(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        for r in self.backends_raw().iter() {
            // SAFETY: fields of a shared row read as they are (racy by
            // design, as `set_lingering`); a stale pid gets a spare SIGUSR1.
            let (in_use, pid, lingering) =
                unsafe { (std::ptr::read_volatile(&r.in_use), std::ptr::read_volatile(&r.pid), std::ptr::read_volatile(&r.lingering)) };
            if in_use && pid > 0 && lingering != 0 {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGUSR1);
            }
        }
    }

    pub fn backend_lingering(&self, row: usize) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.backends_raw().get(row).is_some_and(|r| unsafe { std::ptr::read_volatile(&r.lingering) } != 0)
    }
}

/// When a client of the pool in shared row `row` last got a backend after
/// waiting for one (TimestampTz; 0: never), read by a pooled backend at
/// ReadyForQuery. Racy, as `pool_load`.
pub fn pool_waited_at(row: usize) -> i64 {
    let Some(t) = tables() else { return 0 };
    t.pools_raw().get(row).map(|r| unsafe { std::ptr::read_volatile(&r.waited_at) }).unwrap_or(0)
}

/// A racy copy of the counts in shared pool row `row` that pooled backends
/// read between transactions (`None` without shared memory or past the
/// table). Each field is one volatile read of a value the pooler keeps
/// up to date; no lock, so the sums below may mix moments. Fine for hints:
/// the pooler decides, and asks for releases explicitly.
#[derive(Clone, Copy)]
struct RowCounts {
    clients: i32,
    waiting: i32,
    /// Attached and parked (lent ones count as attached), dedicated included.
    backends: i32,
    dedicated: i32,
    starting: i32,
    pool_size: i32,
}

fn row_counts(row: usize) -> Option<RowCounts> {
    let t = tables()?;
    let pools = t.pools_raw();
    let r = pools.get(row)?;
    // SAFETY: plain i32 fields of a row in shared memory, which lives as
    // long as the process; volatile so each is read once, as it is now.
    unsafe {
        let v = |f: &i32| std::ptr::read_volatile(f);
        Some(RowCounts {
            clients: v(&r.clients_idle) + v(&r.clients_active) + v(&r.clients_waiting),
            waiting: v(&r.clients_waiting),
            backends: v(&r.backends_attached) + v(&r.backends_parked),
            dedicated: v(&r.backends_dedicated),
            starting: v(&r.backends_starting),
            pool_size: v(&r.pool_size),
        })
    }
}

/// Whether the pool in shared row `row` has more clients (idle, active or
/// waiting) than backends (attached or parked, lent ones included): only
/// then can its clients outrun its backends. Racy, as `pool_load`.
pub fn pool_outnumbered(row: usize) -> bool {
    row_counts(row).is_some_and(|c| c.clients > c.backends)
}

/// Whether the pool in shared row `row` has fewer shared backends
/// (attached, parked or lent, starting; dedicated ones left out) than its
/// `pool_size`: only then is a pooler that could grow it worth waking.
/// Racy, as `pool_load`; `pool_maybe_grow` decides (and a dedicated-mode
/// pool's sessions still logging in count here, where they do not there:
/// such a pool has no kernel queue, so never asks).
pub fn pool_has_room(row: usize) -> bool {
    row_counts(row).is_some_and(|c| c.backends + c.starting - c.dedicated < c.pool_size)
}

/// Clients waiting for a backend of the pool in shared row `row`, and the
/// pool's shared backends serving or parked (dedicated ones, which never
/// serve another client, left out), read by a pooled backend at
/// ReadyForQuery to decide whether and how long to keep its client. A racy
/// read is fine: the pooler also asks for releases explicitly.
pub fn pool_load(row: usize) -> (i32, i32) {
    row_counts(row).map_or((0, 0), |c| (c.waiting, c.backends - c.dedicated))
}
