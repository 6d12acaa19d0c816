//! Code that runs in the postmaster, from `_PG_init`.
pub mod listen;
