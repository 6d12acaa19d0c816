//! Role secrets as stored in `pg_authid.rolpassword`, and checking a
//! cleartext password against them.
//!
//! Classification follows the server: a well-formed SCRAM secret or
//! "md5" + 32 lowercase hex digits; anything else is a plaintext password.

use super::ct::ct_eq;
use super::md5::md5_password_hash;
use super::scram::{b64_decode, b64_encode, client_key, salted_password_cancellable, server_key, sha256};
use std::fmt;

/// A parsed SCRAM-SHA-256 secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    /// PBKDF2 iteration count (>= 1).
    pub iterations: u32,
    /// Salt bytes.
    pub salt: Vec<u8>,
    /// H(ClientKey).
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

impl ScramSecret {
    /// Formats like pg_authid: `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`.
    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            b64_encode(&self.salt),
            b64_encode(&self.stored_key),
            b64_encode(&self.server_key)
        )
    }
}

// Keys stay out of logs.
impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

/// What a role's rolpassword holds.
#[derive(Clone, PartialEq, Eq)]
pub enum StoredSecret {
    /// SCRAM-SHA-256 verifier.
    Scram(ScramSecret),
    /// md5(password || user), decoded from hex.
    Md5([u8; 16]),
    /// A value in no format the server recognizes (it has stored no
    /// plaintext password since version 10): never verifies, as the server's
    /// plain_crypt_verify() refuses it ("Password of user ... is in
    /// unrecognized format"). Accepting the stored string as the password
    /// would let a hash the parsers disagree on (`SCRAM-SHA-256$+4096:...`)
    /// be used as a password.
    Plain(String),
}

impl fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoredSecret::Scram(s) => f.debug_tuple("Scram").field(s).finish(),
            StoredSecret::Md5(_) => f.write_str("Md5(..)"),
            StoredSecret::Plain(_) => f.write_str("Plain(..)"),
        }
    }
}

fn key32(b64: &str) -> Option<[u8; 32]> {
    b64_decode(b64)?.try_into().ok()
}

/// Parses `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
fn parse_scram(s: &str) -> Option<ScramSecret> {
    let rest = s.strip_prefix("SCRAM-SHA-256$")?;
    let (iter_salt, keys) = rest.split_once('$')?;
    let (iter, salt) = iter_salt.split_once(':')?;
    let (stored, server) = keys.split_once(':')?;
    // As the server's strtol(): leading white space and a sign allowed,
    // nothing after the digits.
    let digits = iter.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let iterations: u32 = digits.parse().ok().filter(|&i| i >= 1)?;
    let salt = b64_decode(salt).filter(|s| !s.is_empty())?;
    Some(ScramSecret {
        iterations,
        salt,
        stored_key: key32(stored)?,
        server_key: key32(server)?,
    })
}

fn parse_md5(s: &str) -> Option<[u8; 16]> {
    let hex = s.strip_prefix("md5")?.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

/// Classifies and decodes a rolpassword value.
pub fn parse_stored_secret(s: &str) -> StoredSecret {
    if let Some(h) = parse_md5(s) {
        StoredSecret::Md5(h)
    } else if let Some(sc) = parse_scram(s) {
        StoredSecret::Scram(sc)
    } else {
        StoredSecret::Plain(s.to_string())
    }
}

/// Recovers the SCRAM ClientKey from a cleartext password, if the password
/// matches the secret. With it the pooler can later log in to the server via
/// SCRAM on the client's behalf.
///
/// A password containing a NUL never matches: PostgreSQL passwords are C
/// strings, and HMAC pads short keys with zero bytes, so `"pw\0"` would
/// otherwise derive the same keys as `"pw"`.
pub fn client_key_from_password(secret: &ScramSecret, password: &str) -> Option<[u8; 32]> {
    scram_client_key(secret, password.as_bytes(), &|| false).flatten()
}

/// The SCRAM side of both checks: Some(ClientKey) when `password` derives
/// the secret's StoredKey and ServerKey, Some(None) when not; None when
/// `cancelled()` stopped the PBKDF2 first.
fn scram_client_key(
    secret: &ScramSecret,
    password: &[u8],
    cancelled: &dyn Fn() -> bool,
) -> Option<Option<[u8; 32]>> {
    if password.contains(&0) {
        return Some(None);
    }
    let salted = salted_password_cancellable(password, &secret.salt, secret.iterations, cancelled)?;
    let ck = client_key(&salted.0);
    let ok =
        ct_eq(&sha256(&ck), &secret.stored_key) & ct_eq(&server_key(&salted.0), &secret.server_key);
    Some(ok.then_some(ck))
}

/// Checks a cleartext password (the `password` auth method) against a
/// stored secret, in constant time. An empty password never matches: the
/// server refuses empty passwords too. Nor does one containing a NUL (see
/// [`client_key_from_password`]).
pub fn verify_password(secret: &StoredSecret, user: &str, password: &str) -> bool {
    !matches!(check_password(secret, user, password.as_bytes(), &|| false), Some(PasswordCheck::Mismatch) | None)
}

/// What a cleartext password proved against a stored secret.
#[derive(Debug, PartialEq, Eq)]
pub enum PasswordCheck {
    /// Wrong password, or a secret in no format the server recognizes
    /// (never verifies, as `plain_crypt_verify` in crypt.c).
    Mismatch,
    /// It matches an md5 secret.
    Md5,
    /// It matches a SCRAM secret, whose ClientKey it yields (so the pool
    /// can log in with SCRAM on the client's behalf).
    Scram {
        /// ClientKey = HMAC(SaltedPassword, "Client Key").
        client_key: [u8; 32],
    },
}

/// [`verify_password`] that also yields the SCRAM ClientKey (one PBKDF2
/// run, not two) and stops when `cancelled()` says so (None): a SCRAM
/// secret's iteration count is its owner's choice, so the pooler runs this
/// on a thread it can stop (see `salted_password_cancellable`). The
/// password is the client's bytes as sent, in any encoding: the server
/// compares those (SASLprep only where they are UTF-8).
pub fn check_password(
    secret: &StoredSecret,
    user: &str,
    password: &[u8],
    cancelled: &dyn Fn() -> bool,
) -> Option<PasswordCheck> {
    if password.is_empty() || password.contains(&0) {
        return Some(PasswordCheck::Mismatch);
    }
    Some(match secret {
        StoredSecret::Scram(s) => match scram_client_key(s, password, cancelled)? {
            Some(client_key) => PasswordCheck::Scram { client_key },
            None => PasswordCheck::Mismatch,
        },
        StoredSecret::Md5(h) if ct_eq(&md5_password_hash(password, user), h) => PasswordCheck::Md5,
        StoredSecret::Md5(_) | StoredSecret::Plain(_) => PasswordCheck::Mismatch,
    })
}

/// Does checking a cleartext password against this secret take long enough
/// to belong off an event loop (a SCRAM secret's PBKDF2 iterations)?
pub fn password_check_is_slow(secret: &StoredSecret) -> bool {
    matches!(secret, StoredSecret::Scram(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::md5::to_hex;
    use crate::auth::scram::{build_scram_secret, salted_password};

    // RFC 7677's user: password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 iterations.
    const RFC_SECRET: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    /// The hand-rolled, cancellable PBKDF2 equals the `pbkdf2` crate's for
    /// iteration counts around the cancellation stride, and SASLprep.
    #[test]
    fn cancellable_pbkdf2_equals_the_crate() {
        for (pw, iters) in [("pencil", 1), ("pencil", 2), ("pencil", 1023), ("pencil", 1024), ("pencil", 1025), ("pen\u{00A0}cil", 4096), ("", 3)] {
            let a = salted_password(pw, b"salt", iters);
            let b = salted_password_cancellable(pw.as_bytes(), b"salt", iters, &|| false).expect("not cancelled");
            assert_eq!(a, b, "{pw:?} {iters}");
        }
        // 0 iterations are read as 1, as salted_password does.
        assert_eq!(salted_password("x", b"s", 0), salted_password_cancellable(b"x", b"s", 0, &|| false).unwrap());
    }

    /// Cancelled: it stops at the first check, after CANCEL_CHECK_EVERY
    /// iterations, however many the secret asks for.
    #[test]
    fn cancelled_pbkdf2_stops_at_the_first_check() {
        let asked = std::cell::Cell::new(0);
        let r = salted_password_cancellable(b"pw", b"s", u32::MAX, &|| {
            asked.set(asked.get() + 1);
            true
        });
        assert!(r.is_none());
        assert_eq!(asked.get(), 1);
        let mut huge = rfc();
        huge.iterations = i32::MAX as u32;
        assert_eq!(check_password(&StoredSecret::Scram(huge), "user", b"pencil", &|| true), None);
    }

    #[test]
    fn check_password_yields_the_client_key_once() {
        let s = rfc();
        let ck = client_key_from_password(&s, "pencil").expect("RFC password");
        let secret = StoredSecret::Scram(s);
        assert_eq!(check_password(&secret, "user", b"pencil", &|| false), Some(PasswordCheck::Scram { client_key: ck }));
        assert_eq!(check_password(&secret, "user", b"pencil2", &|| false), Some(PasswordCheck::Mismatch));
        assert_eq!(check_password(&secret, "user", b"", &|| false), Some(PasswordCheck::Mismatch));
        let md5 = StoredSecret::Md5(md5_password_hash("pw", "joe"));
        assert_eq!(check_password(&md5, "joe", b"pw", &|| false), Some(PasswordCheck::Md5));
        assert_eq!(check_password(&md5, "ann", b"pw", &|| false), Some(PasswordCheck::Mismatch));
        assert_eq!(check_password(&StoredSecret::Plain("pw".into()), "joe", b"pw", &|| false), Some(PasswordCheck::Mismatch));
        assert!(password_check_is_slow(&secret) && !password_check_is_slow(&md5));
    }

    /// A password that is not UTF-8 (Latin-1 `café`, set from a LATIN1
    /// database, sent by a LATIN1 client) is checked as the bytes it is,
    /// against md5 and SCRAM secrets alike, as crypt.c does.
    #[test]
    fn non_utf8_passwords_are_bytes() {
        let pw = b"caf\xe9";
        let md5 = StoredSecret::Md5(md5_password_hash(pw, "u"));
        assert_eq!(check_password(&md5, "u", pw, &|| false), Some(PasswordCheck::Md5));
        assert_eq!(check_password(&md5, "u", "café".as_bytes(), &|| false), Some(PasswordCheck::Mismatch));
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(pw, b"salt", 4096, &mut salted);
        let scram = StoredSecret::Scram(ScramSecret {
            iterations: 4096,
            salt: b"salt".to_vec(),
            stored_key: sha256(&client_key(&salted)),
            server_key: server_key(&salted),
        });
        assert!(matches!(check_password(&scram, "u", pw, &|| false), Some(PasswordCheck::Scram { .. })));
        assert_eq!(check_password(&scram, "u", "café".as_bytes(), &|| false), Some(PasswordCheck::Mismatch));
    }

    fn rfc() -> ScramSecret {
        match parse_stored_secret(RFC_SECRET) {
            StoredSecret::Scram(s) => s,
            other => panic!("not scram: {other:?}"),
        }
    }

    #[test]
    fn build_matches_known_secret() {
        let salt = b64_decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        assert_eq!(build_scram_secret("pencil", &salt, 4096), RFC_SECRET);
        assert_eq!(rfc().encode(), RFC_SECRET);
        assert_eq!(rfc().iterations, 4096);
    }

    #[test]
    fn scram_password_check() {
        let s = StoredSecret::Scram(rfc());
        assert!(verify_password(&s, "user", "pencil"));
        assert!(verify_password(&s, "anyone", "pencil")); // user is not part of SCRAM
        assert!(!verify_password(&s, "user", "pencil2"));
        assert!(!verify_password(&s, "user", ""));
        assert!(client_key_from_password(&rfc(), "pencil").is_some());
        assert!(client_key_from_password(&rfc(), "Pencil").is_none());
    }

    /// Found by fuzzing (scram target): HMAC zero-pads keys shorter than
    /// its 64-byte block, so a password with trailing NULs derived the same
    /// SaltedPassword and was accepted for the shorter one.
    #[test]
    fn nul_in_password_never_matches() {
        let s = StoredSecret::Scram(rfc());
        assert!(verify_password(&s, "user", "pencil"));
        for pw in ["pencil\0", "pencil\0\0\0\0", "\0pencil", "pen\0cil", "\0"] {
            assert!(!verify_password(&s, "user", pw), "{pw:?}");
            assert_eq!(client_key_from_password(&rfc(), pw), None, "{pw:?}");
        }
        let stored = format!("md5{}", to_hex(&md5_password_hash("pw\0", "u")));
        assert!(!verify_password(&parse_stored_secret(&stored), "u", "pw\0"));
        assert!(!verify_password(&StoredSecret::Plain("pw\0".into()), "u", "pw\0"));
    }

    #[test]
    fn scram_saslprep_applied() {
        // U+00A0 (no-break space) maps to a plain space under SASLprep.
        let secret = build_scram_secret("a b", b"saltsalt", 16);
        let s = parse_stored_secret(&secret);
        assert!(verify_password(&s, "u", "a\u{a0}b"));
        // Prohibited input (a control char) falls back to the raw bytes.
        let raw = build_scram_secret("a\u{7}b", b"saltsalt", 16);
        assert!(verify_password(&parse_stored_secret(&raw), "u", "a\u{7}b"));
        assert!(!verify_password(&parse_stored_secret(&raw), "u", "ab"));
    }

    #[test]
    fn md5_check() {
        let stored = format!("md5{}", to_hex(&md5_password_hash("secret", "postgres")));
        let s = parse_stored_secret(&stored);
        assert!(matches!(s, StoredSecret::Md5(_)));
        assert!(verify_password(&s, "postgres", "secret"));
        assert!(!verify_password(&s, "other", "secret"));
        assert!(!verify_password(&s, "postgres", "Secret"));
    }

    #[test]
    fn plain_check() {
        let s = parse_stored_secret("hunter2");
        assert_eq!(s, StoredSecret::Plain("hunter2".into()));
        // The server refuses a secret in no known format, whatever is sent.
        assert!(!verify_password(&s, "u", "hunter2"));
        assert!(!verify_password(&s, "u", "hunter"));
        assert!(!verify_password(
            &StoredSecret::Plain(String::new()),
            "u",
            ""
        ));
    }

    #[test]
    fn scram_iterations_read_as_the_server_reads_them() {
        let keys = "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
        for iter in ["4096", "+4096", " 4096", "\t+4096"] {
            let s = parse_stored_secret(&format!("SCRAM-SHA-256${iter}:W22ZaJ0SNY7soEsUEjb6gQ==${keys}"));
            assert!(matches!(&s, StoredSecret::Scram(sc) if sc.iterations == 4096), "{iter:?}: {s:?}");
            // RFC 7677's password, and never the stored string itself.
            assert!(verify_password(&s, "u", "pencil"), "{iter:?}");
            let stored = format!("SCRAM-SHA-256${iter}:W22ZaJ0SNY7soEsUEjb6gQ==${keys}");
            assert!(!verify_password(&s, "u", &stored), "{iter:?}");
        }
        for iter in ["", "+", "4096 ", "0x10", "-1", "0"] {
            let stored = format!("SCRAM-SHA-256${iter}:W22ZaJ0SNY7soEsUEjb6gQ==${keys}");
            let s = parse_stored_secret(&stored);
            assert!(matches!(s, StoredSecret::Plain(_)), "{iter:?}");
            assert!(!verify_password(&s, "u", &stored), "{iter:?}: the stored string as the password");
        }
    }

    #[test]
    fn classification_edge_cases() {
        let plain = |s: &str| matches!(parse_stored_secret(s), StoredSecret::Plain(_));
        assert!(plain("md5"));
        assert!(plain("md5ABCDEF0123456789abcdef0123456789")); // uppercase hex
        assert!(plain("md50123456789abcdef0123456789abcde")); // 31 digits
        assert!(plain("md50123456789abcdef0123456789abcdef0")); // 33 digits
        assert!(plain("md50123456789abcdef0123456789abcdeg"));
        assert!(!plain("md50123456789abcdef0123456789abcdef"));
        let keys = "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
        assert!(!plain(&format!("SCRAM-SHA-256$4096:c2FsdA==${keys}")));
        for bad in [
            format!("SCRAM-SHA-256$0:c2FsdA==${keys}"),
            format!("SCRAM-SHA-256$-1:c2FsdA==${keys}"),
            format!("SCRAM-SHA-256$99999999999:c2FsdA==${keys}"),
            format!("SCRAM-SHA-256$x:c2FsdA==${keys}"),
            format!("SCRAM-SHA-256$4096:${keys}"),
            format!("SCRAM-SHA-256$4096:!!!${keys}"),
            format!("SCRAM-SHA-256$4096c2FsdA==${keys}"),
            "SCRAM-SHA-256$4096:c2FsdA==$c2FsdA==:c2FsdA==".to_string(),
            "SCRAM-SHA-256$4096:c2FsdA==".to_string(),
            format!("SCRAM-SHA-1$4096:c2FsdA==${keys}"),
            String::new(),
        ] {
            assert!(plain(&bad), "{bad}");
        }
    }

    #[test]
    fn debug_redacts() {
        let dbg = format!("{:?}", parse_stored_secret(RFC_SECRET));
        assert!(!dbg.contains("WG5d"));
        assert_eq!(
            format!("{:?}", StoredSecret::Plain("pw".into())),
            "Plain(..)"
        );
    }
}
