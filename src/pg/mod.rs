//! Everything that touches PostgreSQL internals directly: declarations pgrx does
//! not provide, the C glue (`glue.c`, compiled against the target server's
//! headers) and thin safe-ish wrappers. Other modules call these, never `pg_sys`
//! for the handoff-critical pieces.

pub mod comm;
pub mod glue;
pub mod logger;
pub mod loginmem;
pub mod poolconf;
pub mod session;
pub mod shmem;
pub mod slots;
