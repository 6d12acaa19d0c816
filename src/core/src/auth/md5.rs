//! PostgreSQL's md5 password method.
//!
//! The stored secret is `md5(password || user)`; on the wire the client
//! sends `"md5" + hex(md5(hex(stored) || salt))`. Since the response only
//! needs the stored hash, the pooler can answer md5 challenges for a role
//! using just its pg_authid entry.

use super::ct::ct_eq;
use ::md5::{Digest, Md5};

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The stored md5 hash of a role: `md5(password || user)`.
/// The password is bytes: the server hashes what the client sent, in
/// whatever encoding (auth.c, crypt.c plain_crypt_verify()).
pub fn md5_password_hash(password: impl AsRef<[u8]>, user: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(password.as_ref());
    h.update(user.as_bytes());
    h.finalize().into()
}

/// What an md5-method client sends, starting from the stored hash.
pub fn md5_client_response_from_hash(hash: &[u8; 16], salt: [u8; 4]) -> String {
    let mut h = Md5::new();
    h.update(hex(hash).as_bytes());
    h.update(salt);
    let out: [u8; 16] = h.finalize().into();
    format!("md5{}", hex(&out))
}

/// What an md5-method client sends, starting from the cleartext password.
pub fn md5_client_response_from_password(password: &str, user: &str, salt: [u8; 4]) -> String {
    md5_client_response_from_hash(&md5_password_hash(password, user), salt)
}

/// Checks a client's md5 response in constant time.
pub fn verify_md5_response(hash: &[u8; 16], salt: [u8; 4], response: &[u8]) -> bool {
    let expected = md5_client_response_from_hash(hash, salt);
    ct_eq(expected.as_bytes(), response)
}

/// Hex encoding shared with the secret parser's tests.
#[cfg(test)]
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    hex(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent computation of the expected value, spelled out step by step.
    fn reference(password: &str, user: &str, salt: [u8; 4]) -> String {
        let inner = Md5::digest(format!("{password}{user}").as_bytes());
        let inner_hex: String = inner.iter().map(|b| format!("{b:02x}")).collect();
        let mut outer_in = inner_hex.into_bytes();
        outer_in.extend_from_slice(&salt);
        let outer = Md5::digest(&outer_in);
        let outer_hex: String = outer.iter().map(|b| format!("{b:02x}")).collect();
        format!("md5{outer_hex}")
    }

    #[test]
    fn known_value() {
        let salt = [1, 2, 3, 4];
        let got = md5_client_response_from_password("secret", "postgres", salt);
        assert_eq!(got, reference("secret", "postgres", salt));
        assert_eq!(got.len(), 35);
        // Fixed values, computed outside this crate (Python hashlib).
        assert_eq!(got, "md5bb41a296aab6baccb36ff243a562abff");
        assert_eq!(
            hex(&md5_password_hash("secret", "postgres")),
            "53f48b7c4b76a86ce72276c5755f217d"
        );
    }

    #[test]
    fn hash_matches_md5_of_concatenation() {
        // md5("foo") is a well-known constant; user "" keeps the input "foo".
        assert_eq!(
            hex(&md5_password_hash("foo", "")),
            "acbd18db4cc2f85cedef654fccc4a4d8"
        );
    }

    #[test]
    fn verify() {
        let hash = md5_password_hash("secret", "postgres");
        let salt = [1, 2, 3, 4];
        let good = md5_client_response_from_hash(&hash, salt);
        assert!(verify_md5_response(&hash, salt, good.as_bytes()));
        assert!(!verify_md5_response(&hash, [4, 3, 2, 1], good.as_bytes()));
        assert!(!verify_md5_response(&hash, salt, good.to_uppercase().as_bytes()));
        assert!(!verify_md5_response(&hash, salt, b""));
        assert!(!verify_md5_response(&hash, salt, &good.as_bytes()[..34]));
        let other = md5_password_hash("secret", "alice");
        assert!(!verify_md5_response(&other, salt, good.as_bytes()));
    }
}
