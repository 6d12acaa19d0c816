//! Authentication: parsing stored role secrets, password checks, md5 and
//! SCRAM-SHA-256 exchanges (as server towards clients, and as client towards
//! the real server).
//!
//! Everything is re-exported here, so `auth::verify_password` and
//! `auth::secret::verify_password` both work.

pub mod ct;
pub mod md5;
pub mod scram;
pub mod secret;

pub use self::md5::{
    md5_client_response_from_hash, md5_client_response_from_password, md5_password_hash,
    verify_md5_response,
};
pub use scram::client::{ClientCredential, ScramClient};
pub use scram::server::ScramServer;
pub use scram::{build_scram_secret, ScramError, SCRAM_SHA_256, SCRAM_SHA_256_PLUS, TLS_SERVER_END_POINT};
pub use secret::{
    check_password, client_key_from_password, parse_stored_secret, password_check_is_slow, verify_password,
    PasswordCheck, ScramSecret, StoredSecret,
};
