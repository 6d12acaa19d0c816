//! Every `nextgres.*` setting, in one place. Names follow PgBouncer's where a
//! PgBouncer user would look for them.
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use crate::pg::poolconf;
use std::ffi::CString;

/// TCP port the pooler listens on. 0 (default): the server's own `port`, which
/// the pooler then owns (the server keeps only its Unix socket). Any other
/// value: a side port, and the server keeps its TCP listeners.
pub static PORT: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Addresses the pooler listens on; empty (default): the server's `listen_addresses`.
pub static LISTEN_ADDRESSES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// With the server's `ssl = on` the pooler serves TLS itself with the
/// server's certificate and key. Only when it cannot load them: on = take
/// over the server's port anyway (plaintext only; TLS clients lose TLS or
/// fail); off (default) = leave the port and the server's TLS-capable
/// listeners alone.
pub static SSL_TAKEOVER: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Backends per (database, role) pool.
pub static POOL_SIZE: GucSetting<i32> = GucSetting::<i32>::new(8);
/// Client connections the pooler accepts in all (sizes shared memory).
pub static MAX_CLIENT_CONN: GucSetting<i32> = GucSetting::<i32>::new(10000);
/// TLS clients whose handshake has not finished (each has a relay thread);
/// an SSLRequest beyond it is refused with 53300.
pub static MAX_TLS_HANDSHAKES: GucSetting<i32> = GucSetting::<i32>::new(100);
/// Distinct (database, role) pools (sizes shared memory).
pub static MAX_POOLS: GucSetting<i32> = GucSetting::<i32>::new(256);
pub static POOL_MODE: GucSetting<PoolMode> = GucSetting::<PoolMode>::new(PoolMode::Transaction);
/// Seconds a client may wait for a free backend (0: forever).
pub static QUERY_WAIT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(120);
/// Let a backend keep its idle client between transactions while no other
/// client of its pool waits (no handoff at all when the pool is not saturated).
pub static HOLD_IDLE_CLIENTS: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Pooled backends run under SCHED_BATCH (see `backend::sched`).
pub static BACKEND_BATCH_SCHEDULING: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Milliseconds a backend may go on serving its client while others wait.
pub static CLIENT_TIME_SLICE: GucSetting<i32> = GucSetting::<i32>::new(2);
/// Milliseconds a client whose transaction called nextval() keeps its backend
/// for its next statement while other clients wait (currval()/lastval()).
pub static SEQUENCE_HOLD: GucSetting<i32> = GucSetting::<i32>::new(50);
/// Seconds a parked backend may stay unused before it is closed (0: never).
pub static IDLE_BACKEND_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(600);
/// Backends a pool keeps logged in even when unused (past
/// idle_backend_timeout), once it has logged one in.
pub static MIN_POOL_SIZE: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Seconds after its login a backend is closed at its next transaction
/// boundary and replaced as needed (0: never). PgBouncer's server_lifetime.
pub static BACKEND_LIFETIME: GucSetting<i32> = GucSetting::<i32>::new(3600);
/// Backends a pool may log in beyond pool_size once a client has waited
/// reserve_pool_timeout; they close when its queue is empty again.
pub static RESERVE_POOL_SIZE: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Seconds a client waits before the reserve may be used.
pub static RESERVE_POOL_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(5);
/// Priority of a pool among those sharing max_db_connections or
/// max_user_connections: a higher one gets freed backends first.
pub static POOL_PRIORITY: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Backends of one pool that pinned clients (LISTEN, session advisory lock,
/// temp table, WITH HOLD cursor, ...) may hold as dedicated sessions outside
/// pool_size: -1 no cap of its own (the server's connection slots,
/// max_db_connections and max_user_connections still bound them), 0 none
/// (a pinned client keeps one of the pool_size backends).
pub static MAX_PINNED_BACKENDS: GucSetting<i32> = GucSetting::<i32>::new(-1);
/// Pooled backends of one database, all its pools together (0: no limit).
pub static MAX_DB_CONNECTIONS: GucSetting<i32> = GucSetting::<i32>::new(0);
/// The idle clients of a transaction-mode pool wait in a kernel queue its
/// backends take them from themselves (`nextgres_core::kq`), so the pooler
/// takes no part in each transaction of a saturated pool (BENCHMARKS.md,
/// issue 15). Read at server start (it sizes shared memory).
pub static KERNEL_QUEUE: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Pooled backends of one role, all its pools together (0: no limit).
pub static MAX_USER_CONNECTIONS: GucSetting<i32> = GucSetting::<i32>::new(0);
/// Developer option (in the spirit of PostgreSQL's `post_auth_delay`): ms a
/// backend lent to a kernel queue waits between giving a client back in
/// shared memory and telling the pooler (`KQ_RETURNED`), so that tests can
/// act in that window. 0 (the default) in any real deployment.
pub static DEBUG_RETURN_DELAY: GucSetting<i32> = GucSetting::<i32>::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq, pgrx::PostgresGucEnum)]
pub enum PoolMode {
    #[name = c"transaction"]
    Transaction,
    #[name = c"session"]
    Session,
    #[name = c"dedicated"]
    Dedicated,
}

pub fn define() {
    GucRegistry::define_int_guc(
        c"nextgres.port",
        c"TCP port of the pooler.",
        c"0 takes over the server's own port; another value listens on a side port and leaves the server's TCP listeners alone.",
        &PORT,
        0,
        65535,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"nextgres.listen_addresses",
        c"Addresses the pooler listens on.",
        c"Empty means the server's listen_addresses.",
        &LISTEN_ADDRESSES,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"nextgres.ssl_takeover",
        c"Take over the server's port even when ssl = on and the pooler cannot load the server's certificate or key (clients then get plaintext only).",
        c"Off: in that case the pooler does not take the server's port, so no TCP client silently loses TLS. With a certificate and key it can load, the pooler serves TLS itself whatever this says.",
        &SSL_TAKEOVER,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    // SAFETY (the four pool settings below): the check hooks are C functions
    // in poolconf.c that never throw.
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.pool_size",
        c"Backends per (database, role) pool.",
        c"",
        &POOL_SIZE,
        1,
        10000,
        GucContext::Suset,
        GucFlags::default(),
        Some(poolconf::ng_check_pool_size),
        None,
        None,
    ) };
    GucRegistry::define_int_guc(
        c"nextgres.max_client_conn",
        c"Maximum number of client connections the pooler accepts.",
        c"",
        &MAX_CLIENT_CONN,
        1,
        1_000_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"nextgres.max_tls_handshakes",
        c"Maximum number of TLS handshakes in progress on the pooler's port.",
        c"An SSLRequest beyond it gets 53300 sorry, too many clients already.",
        &MAX_TLS_HANDSHAKES,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"nextgres.max_pools",
        c"Maximum number of distinct (database, role) pools.",
        c"",
        &MAX_POOLS,
        1,
        100_000,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    unsafe { GucRegistry::define_enum_guc_with_hooks(
        c"nextgres.pool_mode",
        c"transaction: a backend serves a client for one transaction; session: for the whole connection; dedicated: no pooling, each client gets its own backend, outside pool_size, that exits when it leaves.",
        c"",
        &POOL_MODE,
        GucContext::Suset,
        GucFlags::default(),
        Some(poolconf::ng_check_pool_mode),
        None,
        None,
    ) };
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.query_wait_timeout",
        c"Seconds a client may wait for a free backend; 0 waits forever.",
        c"",
        &QUERY_WAIT_TIMEOUT,
        0,
        i32::MAX / 1000,
        GucContext::Suset,
        GucFlags::UNIT_S,
        Some(poolconf::ng_check_query_wait_timeout),
        None,
        None,
    ) };
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.idle_backend_timeout",
        c"Seconds an unused parked backend is kept; 0 keeps it forever.",
        c"",
        &IDLE_BACKEND_TIMEOUT,
        0,
        i32::MAX / 1000,
        GucContext::Suset,
        GucFlags::UNIT_S,
        Some(poolconf::ng_check_idle_backend_timeout),
        None,
        None,
    ) };
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.min_pool_size",
        c"Backends a pool keeps logged in even when unused.",
        c"They are not closed by idle_backend_timeout, and a pool that has logged in a backend once logs in more up to this many.",
        &MIN_POOL_SIZE,
        0,
        10000,
        GucContext::Suset,
        GucFlags::default(),
        Some(poolconf::ng_check_min_pool_size),
        None,
        None,
    ) };
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.backend_lifetime",
        c"Seconds after its login a pooled backend is replaced, at its next transaction boundary; 0 keeps it.",
        c"Long-lived backends give their memory (caches, plans) back. A backend pinned to a session leaves when its client does.",
        &BACKEND_LIFETIME,
        0,
        i32::MAX / 1000,
        GucContext::Suset,
        GucFlags::UNIT_S,
        Some(poolconf::ng_check_backend_lifetime),
        None,
        None,
    ) };
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.reserve_pool_size",
        c"Backends a pool may log in beyond pool_size once a client has waited reserve_pool_timeout.",
        c"They close when no client of the pool waits any more.",
        &RESERVE_POOL_SIZE,
        0,
        10000,
        GucContext::Suset,
        GucFlags::default(),
        Some(poolconf::ng_check_reserve_pool_size),
        None,
        None,
    ) };
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.reserve_pool_timeout",
        c"Seconds a client waits for a backend before the pool may use its reserve.",
        c"",
        &RESERVE_POOL_TIMEOUT,
        0,
        i32::MAX / 1000,
        GucContext::Suset,
        GucFlags::UNIT_S,
        Some(poolconf::ng_check_reserve_pool_timeout),
        None,
        None,
    ) };
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.pool_priority",
        c"Priority of a pool among the pools that share max_db_connections or max_user_connections.",
        c"When the limit is reached, a pool with waiting clients and a higher priority gets the backends other pools free at their transaction boundaries (each pool with clients keeps one).",
        &POOL_PRIORITY,
        -1000,
        1000,
        GucContext::Suset,
        GucFlags::default(),
        Some(poolconf::ng_check_pool_priority),
        None,
        None,
    ) };
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.max_pinned_backends",
        c"Backends of one pool that pinned clients may hold as dedicated sessions outside pool_size; -1: no cap, 0: none.",
        c"A client that pins its session (LISTEN, session advisory lock, temp table, WITH HOLD cursor) keeps its backend; up to this many such backends per pool count as dedicated sessions (like direct ones: max_connections, CONNECTION LIMIT, max_db_connections, max_user_connections) and the pool logs in others for its other clients. Beyond it a pinned backend counts in pool_size.",
        &MAX_PINNED_BACKENDS,
        -1,
        100_000,
        GucContext::Suset,
        GucFlags::default(),
        Some(poolconf::ng_check_max_pinned_backends),
        None,
        None,
    ) };
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.max_db_connections",
        c"Pooled backends of one database, all its pools together; 0: no limit.",
        c"Per database with ALTER DATABASE ... SET. A pool at the limit waits; an unused backend of another pool of the database is closed for it.",
        &MAX_DB_CONNECTIONS,
        0,
        100_000,
        GucContext::Suset,
        GucFlags::default(),
        Some(poolconf::ng_check_max_db_connections),
        None,
        None,
    ) };
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"nextgres.max_user_connections",
        c"Pooled backends of one role, all its pools together; 0: no limit.",
        c"Per role with ALTER ROLE ... SET. A pool at the limit waits; an unused backend of another pool of the role is closed for it.",
        &MAX_USER_CONNECTIONS,
        0,
        100_000,
        GucContext::Suset,
        GucFlags::default(),
        Some(poolconf::ng_check_max_user_connections),
        None,
        None,
    ) };
    GucRegistry::define_bool_guc(
        c"nextgres.kernel_queue",
        c"Idle clients of transaction-mode pools wait in a kernel queue that the pools' backends take them from.",
        c"Takes the pooler off the path of each transaction: a backend takes the next ready client itself at each transaction boundary. Off: every client goes back to the pooler at each transaction boundary and is handed to the next backend. Sizes shared memory (about 2.2 kB per max_client_conn).",
        &KERNEL_QUEUE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"nextgres.debug_return_delay",
        c"Developer option: delay between a kernel-queue backend giving a client back and telling the pooler.",
        c"For tests of that window only; 0 in any real deployment.",
        &DEBUG_RETURN_DELAY,
        0,
        10_000,
        GucContext::Sighup,
        GucFlags::NO_SHOW_ALL | GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"nextgres.hold_idle_clients",
        c"A backend keeps its idle client between transactions while no other client of its pool waits (nor had to wait in the last 100 ms).",
        c"Saves the handoff when the pool is not saturated; the pooler takes the client back as soon as another client waits.",
        &HOLD_IDLE_CLIENTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"nextgres.backend_batch_scheduling",
        c"Pooled backends run under the Linux SCHED_BATCH scheduling policy.",
        c"A backend woken by the pooler or by its client's query then does not preempt the process that woke it, which saves context switches under saturation; its share of CPU is unchanged. Applied once a backend has read the reload, at its next park or give-back of a client; only backends started under the normal policy are moved.",
        &BACKEND_BATCH_SCHEDULING,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"nextgres.client_time_slice",
        c"How long a backend may keep serving its client's consecutive transactions while other clients of the pool wait.",
        c"With hold_idle_clients, while fewer clients wait than the pool has backends, a client that sends its next transaction at once keeps its backend for up to this long after it was attached, which saves handoffs. With a longer queue every client gets one transaction per turn. 0 hands the client back at the first transaction boundary at which another client waits.",
        &CLIENT_TIME_SLICE,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"nextgres.sequence_hold",
        c"How long a client whose transaction called nextval() keeps its backend for its next statement while other clients of the pool wait.",
        c"Sequence values (currval, lastval) cannot move to another backend. A client that sends its next statement within this time (INSERT, then SELECT lastval()) gets them as on a direct session; after it, a waiting client gets the backend and currval()/lastval() fail with 55000 as in a new session. Nobody waiting: the client keeps the backend.",
        &SEQUENCE_HOLD,
        0,
        10000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    crate::pg::server::reserve_setting_prefix(c"nextgres");
}
