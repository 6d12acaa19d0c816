//! nextgres-core: the parts of the nextgres pooler that need no PostgreSQL
//! symbols, so they can be unit tested (and fuzzed) as plain Rust.
//!
//! * [`proto`]: PostgreSQL frontend/backend protocol v3 parsing and building.
//! * [`auth`]: password secrets, md5 and SCRAM-SHA-256 (server and client).
//! * [`tls`]: the TLS versions the server's settings allow the pooler.
//! * [`cert`], [`client_chain`]: X.509 facts and the client certificate
//!   chains webpki refuses but the server's OpenSSL accepts.
//! * [`accept`]: the pause after `accept(2)` fails for lack of descriptors.
//! * [`ring`]: the release ring a pooled backend leaves RELEASED in.
//! * [`kq`]: who owns a client of a pool's kernel queue.
//! * [`told`]: what a pooled client was told of the reported settings.
//!
//! Every parser takes untrusted bytes and returns `Result`; nothing here
//! panics on input.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod proto;
pub mod control;
pub mod pool;
pub mod poolconf;
pub mod tls;
pub mod cert;
pub mod client_chain;
pub mod accept;
pub mod ring;
pub mod attach_slot;
pub mod kq;
pub mod told;
