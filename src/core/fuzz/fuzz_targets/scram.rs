//! SCRAM-SHA-256 both ways, plus stored-secret parsing and password checks.
//!
//! The first input byte picks a mode (see `fuzz_target!` below); the rest
//! is the mode's input. Properties besides "no panic, no hang":
//! * the server never accepts a client-final-message whose proof was not
//!   made from the right ClientKey: on success the recovered key is that key;
//! * an exchange that fails stays failed;
//! * a stored secret that parses as SCRAM or md5 re-encodes to a secret
//!   that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nextgres_core::auth::{
    self, client_key_from_password, parse_stored_secret, verify_password, ClientCredential,
    ScramClient, ScramSecret, ScramServer, StoredSecret,
};
use std::borrow::Cow;
use std::sync::OnceLock;

/// RFC 7677's user: password "pencil", 4096 iterations. Only the client
/// with a password credential runs PBKDF2, and never with this secret.
const SECRET: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
const CLIENT_FIRST: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";

struct Fixed {
    secret: ScramSecret,
    client_key: [u8; 32],
    /// The valid client-final-message for CLIENT_FIRST and SERVER_NONCE.
    client_final: Vec<u8>,
    /// The valid server-final-message for it.
    server_final: Vec<u8>,
    /// A valid server-first-message for a client using CLIENT_NONCE.
    server_first: Vec<u8>,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let StoredSecret::Scram(secret) = parse_stored_secret(SECRET) else {
            unreachable!()
        };
        let client_key = client_key();
        let mut server = server();
        let mut client = client();
        assert_eq!(client.client_first(), CLIENT_FIRST);
        let server_first = server.client_first(CLIENT_FIRST).unwrap();
        let client_final = client.server_first(&server_first).unwrap();
        let (server_final, key) = server.client_final(&client_final).unwrap();
        assert_eq!(key, client_key);
        client.server_final(&server_final).unwrap();
        Fixed { secret, client_key, client_final, server_final, server_first }
    })
}

fn server() -> ScramServer {
    let StoredSecret::Scram(secret) = parse_stored_secret(SECRET) else {
        unreachable!()
    };
    ScramServer::with_nonce_str(secret, SERVER_NONCE).unwrap()
}

/// The ClientKey for SECRET (4096 PBKDF2 rounds: computed once).
fn client_key() -> [u8; 32] {
    static K: OnceLock<[u8; 32]> = OnceLock::new();
    *K.get_or_init(|| {
        let StoredSecret::Scram(secret) = parse_stored_secret(SECRET) else {
            unreachable!()
        };
        client_key_from_password(&secret, "pencil").unwrap()
    })
}

fn client() -> ScramClient {
    let StoredSecret::Scram(secret) = parse_stored_secret(SECRET) else {
        unreachable!()
    };
    let cred = ClientCredential::ClientKey {
        client_key: client_key(),
        server_key: secret.server_key,
    };
    ScramClient::with_nonce_str(cred, CLIENT_NONCE)
        .unwrap()
        .with_username("user")
}

/// Splits at the first NUL, which no SCRAM message may contain anyway.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Runs client-final on a server that accepted CLIENT_FIRST.
fn final_after_valid_first(client_final: &[u8]) {
    let f = fixed();
    let mut s = server();
    s.client_first(CLIENT_FIRST).unwrap();
    if let Ok((fin, key)) = s.client_final(client_final) {
        assert_eq!(key, f.client_key, "accepted a proof not made from the ClientKey");
        assert_eq!(fin, f.server_final);
    }
    assert!(s.client_final(client_final).is_err(), "exchange went on after it ended");
}

/// Applies edits to `base`: each 3-byte chunk is (op, position, byte).
fn mutate(base: &[u8], edits: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for e in edits.chunks_exact(3) {
        let pos = if v.is_empty() { 0 } else { usize::from(e[1]) % (v.len() + 1) };
        match e[0] % 4 {
            0 => v.insert(pos, e[2]),
            1 if pos < v.len() => v[pos] = e[2],
            2 if pos < v.len() => {
                v.remove(pos);
            }
            3 => v.truncate(pos),
            _ => {}
        }
    }
    v
}

fn client_exchange(server_first: &[u8], server_final: &[u8]) {
    let f = fixed();
    let mut c = client();
    c.client_first();
    let Ok(cf) = c.server_first(server_first) else {
        assert!(c.server_final(server_final).is_err());
        return;
    };
    assert!(cf.starts_with(b"c=biws,r="));
    if server_first == f.server_first.as_slice() {
        assert_eq!(cf, f.client_final);
    }
    // The ClientKey credential carries the ServerKey: the signature is
    // always checked.
    let ok = c.server_final(server_final).is_ok();
    if ok && server_first == f.server_first.as_slice() {
        assert_eq!(server_final, f.server_final.as_slice());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 8 {
        // Server: arbitrary client-first, then arbitrary client-final; the
        // high bits of the mode byte put the client on TLS (PLUS offered)
        // and pick the mechanism it selects.
        0 => {
            let (first, fin) = split(rest);
            let mut s = server();
            if mode & 0x10 != 0 {
                s = s.with_channel_binding(vec![mode; 32]);
                assert_eq!(s.mechanisms().len(), 2);
            }
            let mech = if mode & 0x20 != 0 { auth::SCRAM_SHA_256_PLUS } else { auth::SCRAM_SHA_256 };
            if s.select_mechanism(mech).is_err() {
                // PLUS without TLS: refused, and the exchange is over.
                assert!(mode & 0x10 == 0 && mode & 0x20 != 0);
                assert!(s.client_first(first).is_err());
                return;
            }
            match s.client_first(first) {
                Ok(sf) => {
                    assert!(sf.starts_with(b"r="));
                    if let Ok((_, key)) = s.client_final(fin) {
                        assert_eq!(key, fixed().client_key);
                    }
                }
                Err(_) => assert!(s.client_final(fin).is_err()),
            }
        }
        // Server: valid client-first, arbitrary client-final.
        1 => final_after_valid_first(rest),
        // Server: valid client-first, the valid client-final with edits.
        2 => final_after_valid_first(&mutate(&fixed().client_final, rest)),
        // Client (ClientKey credential, as the pooler uses it): arbitrary
        // server-first and server-final.
        3 | 4 => {
            let (first, fin) = split(rest);
            client_exchange(first, fin);
        }
        // Client: the valid server messages with edits.
        5 => {
            let f = fixed();
            let (a, b) = split(rest);
            client_exchange(&mutate(&f.server_first, a), &mutate(&f.server_final, b));
        }
        // Stored secret parsing and re-encoding.
        6 => {
            let s = String::from_utf8_lossy(rest);
            match parse_stored_secret(&s) {
                StoredSecret::Scram(sc) => {
                    assert!(sc.iterations >= 1 && !sc.salt.is_empty());
                    assert_eq!(parse_stored_secret(&sc.encode()), StoredSecret::Scram(sc));
                }
                StoredSecret::Md5(h) => {
                    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
                    assert_eq!(s, format!("md5{hex}"));
                }
                StoredSecret::Plain(p) => assert_eq!(p, s),
            }
        }
        // Cleartext and md5 password checks with an untrusted password
        // (SASLprep on arbitrary text), and the mock exchange for a user.
        _ => {
            let (user, password) = split(rest);
            let user = String::from_utf8_lossy(user);
            let password = String::from_utf8_lossy(password);
            let secret = auth::build_scram_secret("pencil", b"0123456789abcdef", 1);
            let ok = verify_password(&parse_stored_secret(&secret), &user, &password);
            // SASLprep as the server applies it: raw text if it cannot be
            // prepared. Never empty, never with a NUL (C strings in the server;
            // HMAC would ignore trailing NULs: seeds/scram/regress-nul-password).
            let prepped = stringprep::saslprep(&password).unwrap_or(Cow::Borrowed(&password));
            let valid = !password.is_empty() && !password.contains('\0');
            assert_eq!(ok, valid && prepped == "pencil", "{password:?}");
            let hash = auth::md5_password_hash("pencil", &user);
            let md5 = StoredSecret::Md5(hash);
            assert_eq!(verify_password(&md5, &user, &password), password == "pencil");
            // A secret in no format the server knows never verifies, not
            // even with the stored string itself as the password.
            let plain = StoredSecret::Plain("pencil".into());
            assert!(!verify_password(&plain, &user, &password), "{password:?}");
            let salt = [user.len() as u8, 1, 2, 3];
            let _ = auth::verify_md5_response(&hash, salt, password.as_bytes());
            let mut m = ScramServer::new_mock(&user, &[7; 18]);
            if m.client_first(password.as_bytes()).is_ok() {
                assert!(m.client_final(CLIENT_FIRST).is_err());
            }
        }
    }
});
