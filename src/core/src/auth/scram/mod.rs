//! SCRAM-SHA-256 (RFC 5802 / RFC 7677) the way PostgreSQL uses it: the
//! username in client-first is ignored (the startup packet's user counts).
//! The server side offers `SCRAM-SHA-256-PLUS` with `tls-server-end-point`
//! channel binding when the client is on TLS (auth-scram.c), and
//! `SCRAM-SHA-256`; the client side (pool logins over the Unix socket) never
//! binds.
//!
//! This module holds the shared primitives and the error type; the
//! exchanges live in [`server`] and [`client`], message syntax in `attr`.

mod attr;
pub mod client;
pub mod server;
pub mod zeroize;

#[cfg(test)]
mod robustness;

pub use client::{ClientCredential, ScramClient};
pub use server::ScramServer;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt;
use zeroize::Key32;

/// The SASL mechanism name.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// The SASL mechanism name with channel binding (RFC 7677).
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// The only channel binding type the server supports.
pub const TLS_SERVER_END_POINT: &str = "tls-server-end-point";
/// Salt length the server uses for new secrets.
pub const DEFAULT_SALT_LEN: usize = 16;
/// The server's default `scram_sha_256_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// Why a SCRAM exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScramError {
    /// Syntax or state error; the string is the detail.
    Malformed(String),
    /// The proof did not verify (server side: wrong password; client side:
    /// the server's signature was wrong).
    BadProof,
    /// The nonce in client-final (or server-first) does not extend ours.
    NonceMismatch,
    /// Channel-binding flag or data not acceptable; the string is the message.
    ChannelBinding(String),
    /// A protocol violation the server reports with a message of its own
    /// and no detail (08P01, e.g. `non-printable characters in SCRAM nonce`).
    Protocol(String),
    /// Something the server does not support (0A000, e.g. an authorization
    /// identity); the string is the message.
    Unsupported(String),
    /// Refused with SQLSTATE 28000 (invalid authorization specification),
    /// as the server refuses a downgrade (`SCRAM channel binding
    /// negotiation error`) or wrong binding data (`SCRAM channel binding
    /// check failed`).
    Refused {
        /// The primary message.
        message: String,
        /// The detail line, if any.
        detail: Option<String>,
    },
}

impl ScramError {
    pub(crate) fn malformed(detail: impl Into<String>) -> Self {
        ScramError::Malformed(detail.into())
    }

    /// SQLSTATE the server would report.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ScramError::BadProof => "28P01",
            ScramError::Refused { .. } => "28000",
            ScramError::Unsupported(_) => "0A000",
            _ => "08P01",
        }
    }

    /// Primary message the server would report. For `BadProof` the caller
    /// should say `password authentication failed for user "<name>"`.
    pub fn message(&self) -> String {
        match self {
            ScramError::Malformed(_) => "malformed SCRAM message".to_string(),
            ScramError::BadProof => "password authentication failed".to_string(),
            ScramError::NonceMismatch => "invalid SCRAM response".to_string(),
            ScramError::ChannelBinding(m) | ScramError::Protocol(m) | ScramError::Unsupported(m) => m.clone(),
            ScramError::Refused { message, .. } => message.clone(),
        }
    }

    /// Detail line, where the server gives one.
    pub fn detail(&self) -> Option<String> {
        match self {
            ScramError::Malformed(d) => Some(d.clone()),
            ScramError::NonceMismatch => Some("Nonce does not match.".to_string()),
            ScramError::Refused { detail, .. } => detail.clone(),
            _ => None,
        }
    }
}

impl fmt::Display for ScramError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())?;
        if let Some(d) = self.detail() {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ScramError {}

pub(crate) fn b64_encode(b: &[u8]) -> String {
    STANDARD.encode(b)
}

pub(crate) fn b64_decode(s: impl AsRef<[u8]>) -> Option<Vec<u8>> {
    STANDARD.decode(s).ok()
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// HMAC-SHA-256 over the concatenation of `parts`.
pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let Ok(mut m) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
        unreachable!("HMAC takes any key length")
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// SASLprep as the server and libpq apply it: if the password cannot be
/// prepared (prohibited or unassigned characters, or bytes that are not
/// UTF-8: pg_saslprep()'s SASLPREP_INVALID_UTF8, a password set or sent in
/// another encoding) the raw bytes are used, so such passwords keep working
/// instead of being locked out.
pub(crate) fn prep_password(password: &[u8]) -> Cow<'_, [u8]> {
    let Ok(text) = std::str::from_utf8(password) else {
        return Cow::Borrowed(password);
    };
    match stringprep::saslprep(text) {
        Ok(Cow::Owned(s)) => Cow::Owned(s.into_bytes()),
        _ => Cow::Borrowed(password),
    }
}

/// SaltedPassword = Hi(SASLprep(password), salt, i).
pub(crate) fn salted_password(password: &str, salt: &[u8], iterations: u32) -> Key32 {
    let prepped = prep_password(password.as_bytes());
    let mut out = Key32::default();
    pbkdf2::pbkdf2_hmac::<Sha256>(&prepped, salt, iterations.max(1), &mut out.0);
    if let Cow::Owned(mut b) = prepped {
        zeroize::wipe(&mut b);
    }
    out
}

/// How often [`salted_password_cancellable`] asks whether to stop, in
/// iterations (about a millisecond of work each time).
pub const CANCEL_CHECK_EVERY: u32 = 1024;

/// [`salted_password`] that asks `cancelled()` every
/// [`CANCEL_CHECK_EVERY`] iterations and gives up (None) when it says so.
///
/// The `password` method runs the stored secret's iteration count, which
/// whoever set the password chose (up to 2^31 - 1 in pg_authid): the pooler
/// runs it on a thread that must stop once its client is gone, as the
/// server's backend is ended at `authentication_timeout`. PBKDF2 with
/// HMAC-SHA-256 (RFC 8018 section 5.2) for one 32-byte block, the only one
/// SCRAM-SHA-256 uses: U1 = HMAC(P, salt || INT(1)), Ui = HMAC(P, Ui-1),
/// the result their XOR; unit-tested against the `pbkdf2` crate.
pub(crate) fn salted_password_cancellable(
    password: &[u8],
    salt: &[u8],
    iterations: u32,
    cancelled: &dyn Fn() -> bool,
) -> Option<Key32> {
    let prepped = prep_password(password);
    let mac = Hmac::<Sha256>::new_from_slice(&prepped).expect("HMAC takes keys of any length");
    if let Cow::Owned(mut b) = prepped {
        zeroize::wipe(&mut b);
    }
    let mut first = mac.clone();
    first.update(salt);
    first.update(&1u32.to_be_bytes());
    let mut u = Key32(first.finalize().into_bytes().into());
    let mut out = u.clone();
    for i in 1..iterations.max(1) {
        if i % CANCEL_CHECK_EVERY == 0 && cancelled() {
            return None;
        }
        let mut next = mac.clone();
        next.update(&u.0);
        u.0 = next.finalize().into_bytes().into();
        for (o, x) in out.0.iter_mut().zip(u.0.iter()) {
            *o ^= x;
        }
    }
    Some(out)
}

pub(crate) fn client_key(salted: &[u8; 32]) -> [u8; 32] {
    hmac(salted, &[b"Client Key"])
}

pub(crate) fn server_key(salted: &[u8; 32]) -> [u8; 32] {
    hmac(salted, &[b"Server Key"])
}

pub(crate) fn xor32(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b)) {
        *o = x ^ y;
    }
    out
}

/// Builds a secret string like the server's:
/// `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`. Iterations below 1 are
/// treated as 1.
pub fn build_scram_secret(password: &str, salt: &[u8], iterations: u32) -> String {
    let iterations = iterations.max(1);
    let salted = salted_password(password, salt, iterations);
    crate::auth::ScramSecret {
        iterations,
        salt: salt.to_vec(),
        stored_key: sha256(&client_key(&salted.0)),
        server_key: server_key(&salted.0),
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reporting() {
        let m = ScramError::malformed("The message is empty.");
        assert_eq!(m.sqlstate(), "08P01");
        assert_eq!(m.message(), "malformed SCRAM message");
        assert_eq!(m.detail().as_deref(), Some("The message is empty."));
        assert_eq!(
            m.to_string(),
            "malformed SCRAM message: The message is empty."
        );
        assert_eq!(ScramError::BadProof.sqlstate(), "28P01");
        assert_eq!(ScramError::NonceMismatch.sqlstate(), "08P01");
        assert_eq!(
            ScramError::NonceMismatch.message(),
            "invalid SCRAM response"
        );
        let cb = ScramError::ChannelBinding("x".into());
        assert_eq!(
            (cb.sqlstate(), cb.message(), cb.detail()),
            ("08P01", "x".into(), None)
        );
    }

    #[test]
    fn primitives_match_rfc_7677() {
        let salt = b64_decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let salted = salted_password("pencil", &salt, 4096);
        assert_eq!(
            b64_encode(&sha256(&client_key(&salted.0))),
            "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY="
        );
        assert_eq!(
            b64_encode(&server_key(&salted.0)),
            "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
    }

    #[test]
    fn hmac_rfc_4231_case_2() {
        let mac = hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn zero_iterations_do_not_panic() {
        let s = build_scram_secret("pw", b"salt", 0);
        assert!(s.starts_with("SCRAM-SHA-256$1:"));
    }

    #[test]
    fn prep() {
        let prep = |p: &str| prep_password(p.as_bytes()).into_owned();
        assert_eq!(prep("abc"), b"abc");
        assert_eq!(prep("a\u{a0}b"), b"a b");
        assert_eq!(prep("a\u{7}b"), "a\u{7}b".as_bytes());
        assert_eq!(prep("\u{ad}x"), b"x"); // soft hyphen maps to nothing
        // Not UTF-8 (a Latin-1 password): the bytes as sent.
        assert_eq!(prep_password(b"caf\xe9").into_owned(), b"caf\xe9");
    }
}
