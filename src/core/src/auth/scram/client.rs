//! Client side of SCRAM-SHA-256, used when the pooler logs in to the real
//! server on behalf of a client.
//!
//! With a recovered ClientKey no password is needed: the proof is
//! `ClientKey XOR HMAC(H(ClientKey), AuthMessage)`, and salt and iteration
//! count from the server are only echoed through the AuthMessage.

use super::attr::{check_whole, is_printable, Cursor};
use super::zeroize::{wipe_string, Key32};
use super::{
    b64_decode, b64_encode, client_key, hmac, salted_password, server_key, sha256, xor32,
    ScramError,
};
use crate::auth::ct::ct_eq;
use std::fmt;

/// What the pooler proves knowledge of, and how it checks the server's
/// signature (RFC 5802 section 3: `ServerSignature = HMAC(ServerKey,
/// AuthMessage)`). A ClientKey always comes with its ServerKey, so a
/// ClientKey login can never skip the check of the server-final-message.
#[derive(Clone)]
pub enum ClientCredential {
    /// ClientKey recovered from an earlier SCRAM exchange or a cleartext
    /// password, with the ServerKey of the same stored secret.
    ClientKey {
        /// `ClientKey = HMAC(SaltedPassword, "Client Key")` (32 bytes).
        client_key: [u8; 32],
        /// `ServerKey = HMAC(SaltedPassword, "Server Key")` (32 bytes), as in
        /// the role's `pg_authid` secret.
        server_key: [u8; 32],
    },
    /// Cleartext password (the ServerKey is derived from it).
    Password(String),
}

impl fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientCredential::ClientKey { .. } => f.write_str("ClientKey(..)"),
            ClientCredential::Password(_) => f.write_str("Password(..)"),
        }
    }
}

enum State {
    /// client-first not produced yet.
    Start,
    /// client-first sent; waiting for server-first.
    SentFirst,
    /// client-final sent; waiting for server-final.
    SentFinal,
    /// Finished, successfully or not.
    Done,
}

/// One SCRAM-SHA-256 login as a client.
pub struct ScramClient {
    client_key: Option<Key32>,
    password: Option<String>,
    nonce: String,
    username: String,
    state: State,
    client_first_bare: Vec<u8>,
    auth_message: Vec<u8>,
    /// The ServerKey that verifies the server-final-message: given with a
    /// ClientKey credential, computed after server-first from a password.
    server_key: Option<Key32>,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramClient").finish_non_exhaustive()
    }
}

impl Drop for ScramClient {
    fn drop(&mut self) {
        if let Some(p) = self.password.take() {
            wipe_string(p);
        }
    }
}

/// Escapes a SCRAM `saslname`: `,` and `=` are written as `=2C` and `=3D`.
fn escape_username(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

impl ScramClient {
    /// Starts a login. The client nonce is the base64 of `client_nonce_raw`
    /// (18 or more random bytes, as libpq uses).
    pub fn new(cred: ClientCredential, client_nonce_raw: &[u8]) -> Self {
        Self::build(cred, b64_encode(client_nonce_raw))
    }

    /// Like [`new`](Self::new) with a literal nonce (must be SCRAM
    /// `printable`), for test vectors.
    pub fn with_nonce_str(cred: ClientCredential, nonce: &str) -> Result<Self, ScramError> {
        if nonce.is_empty() || !is_printable(nonce.as_bytes()) {
            return Err(ScramError::malformed("client nonce is not printable"));
        }
        Ok(Self::build(cred, nonce.to_string()))
    }

    /// Sends this user name in client-first instead of the empty one libpq
    /// sends (the server ignores it; useful for test vectors).
    pub fn with_username(mut self, user: &str) -> Self {
        self.username = escape_username(user);
        self
    }

    fn build(cred: ClientCredential, nonce: String) -> Self {
        let (client_key, server_key, password) = match cred {
            ClientCredential::ClientKey { client_key, server_key } => {
                (Some(Key32(client_key)), Some(Key32(server_key)), None)
            }
            ClientCredential::Password(p) => (None, None, Some(p)),
        };
        ScramClient {
            client_key,
            password,
            nonce,
            username: String::new(),
            state: State::Start,
            client_first_bare: Vec::new(),
            auth_message: Vec::new(),
            server_key,
        }
    }

    /// The client-first-message: `n,,n=<user>,r=<nonce>`, no channel binding.
    pub fn client_first(&mut self) -> Vec<u8> {
        self.client_first_bare = format!("n={},r={}", self.username, self.nonce).into_bytes();
        self.state = State::SentFirst;
        let mut out = b"n,,".to_vec();
        out.extend_from_slice(&self.client_first_bare);
        out
    }

    /// Handles the server-first-message and returns the client-final-message.
    pub fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::SentFirst) {
            self.state = State::Done;
            return Err(ScramError::malformed("unexpected server-first-message"));
        }
        self.state = State::Done;
        check_whole(data)?;
        let mut c = Cursor::new(data, 0);
        if c.peek() == Some(b'm') {
            return Err(ScramError::malformed(
                "server requires an unsupported SCRAM extension",
            ));
        }
        let nonce = c.expect(b'r')?;
        // The server's nonce must extend ours with something of its own.
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(self.nonce.as_bytes()) {
            return Err(ScramError::NonceMismatch);
        }
        if !is_printable(nonce) {
            return Err(ScramError::malformed(
                "non-printable characters in SCRAM nonce",
            ));
        }
        let salt = b64_decode(c.expect(b's')?)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ScramError::malformed("invalid salt"))?;
        let iterations = std::str::from_utf8(c.expect(b'i')?)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|&i| i >= 1)
            .ok_or_else(|| ScramError::malformed("invalid iteration count"))?;
        if !c.at_end() {
            return Err(ScramError::malformed(
                "garbage at end of server-first-message",
            ));
        }

        let ck = match (&self.client_key, &self.password) {
            (Some(k), _) => k.clone(),
            (None, Some(p)) => {
                let salted = salted_password(p, &salt, iterations);
                self.server_key = Some(Key32(server_key(&salted.0)));
                Key32(client_key(&salted.0))
            }
            (None, None) => return Err(ScramError::malformed("no credential")),
        };

        let mut without_proof = b"c=biws,r=".to_vec();
        without_proof.extend_from_slice(nonce);
        let mut auth_message = self.client_first_bare.clone();
        auth_message.push(b',');
        auth_message.extend_from_slice(data);
        auth_message.push(b',');
        auth_message.extend_from_slice(&without_proof);

        let signature = hmac(&sha256(&ck.0), &[&auth_message]);
        let proof = xor32(&ck.0, &signature);
        self.auth_message = auth_message;
        self.state = State::SentFinal;
        let mut out = without_proof;
        out.extend_from_slice(b",p=");
        out.extend_from_slice(b64_encode(&proof).as_bytes());
        Ok(out)
    }

    /// Checks the server-final-message: its syntax, and the server's
    /// signature with the credential's ServerKey (always known here: a
    /// ClientKey credential carries it, a password one computed it in
    /// server-first). An `e=...` message is an error.
    pub fn server_final(&mut self, data: &[u8]) -> Result<(), ScramError> {
        if !matches!(self.state, State::SentFinal) {
            self.state = State::Done;
            return Err(ScramError::malformed("unexpected server-final-message"));
        }
        self.state = State::Done;
        check_whole(data)?;
        let mut c = Cursor::new(data, 0);
        if c.peek() == Some(b'e') {
            let e = c.expect(b'e')?;
            return Err(ScramError::malformed(format!(
                "error received from server in SCRAM exchange: {}",
                String::from_utf8_lossy(e)
            )));
        }
        let sig: [u8; 32] = b64_decode(c.expect(b'v')?)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| ScramError::malformed("malformed server signature"))?;
        // The cursor steps over the comma after an attribute, so a trailing
        // comma (an empty extension) would otherwise pass as the end.
        if !c.at_end() || data.last() == Some(&b',') {
            return Err(ScramError::malformed(
                "garbage at end of server-final-message",
            ));
        }
        // Reaching SentFinal means server-first set the key; no key is never
        // taken as "nothing to check".
        match &self.server_key {
            Some(key) if ct_eq(&hmac(&key.0, &[&self.auth_message]), &sig) => Ok(()),
            _ => Err(ScramError::BadProof),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::server::ScramServer;
    use crate::auth::{build_scram_secret, client_key_from_password, parse_stored_secret};
    use crate::auth::{ScramSecret, StoredSecret};

    const RFC_SERVER_FIRST: &[u8] =
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &[u8] = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &[u8] = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn secret(password: &str) -> ScramSecret {
        match parse_stored_secret(&build_scram_secret(password, b"0123456789abcdef", 64)) {
            StoredSecret::Scram(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn rfc_client(cred: ClientCredential) -> ScramClient {
        ScramClient::with_nonce_str(cred, "rOprNGfwEbeRWgbNEkqO")
            .unwrap()
            .with_username("user")
    }

    #[test]
    fn rfc_7677_with_password() {
        let mut c = rfc_client(ClientCredential::Password("pencil".into()));
        assert_eq!(c.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        assert_eq!(c.server_first(RFC_SERVER_FIRST).unwrap(), RFC_CLIENT_FINAL);
        c.server_final(RFC_SERVER_FINAL).unwrap();
    }

    #[test]
    fn rfc_7677_with_client_key() {
        let s = match parse_stored_secret(&build_scram_secret(
            "pencil",
            &b64_decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
            4096,
        )) {
            StoredSecret::Scram(s) => s,
            other => panic!("{other:?}"),
        };
        let ck = client_key_from_password(&s, "pencil").unwrap();
        let mut c = rfc_client(ClientCredential::ClientKey {
            client_key: ck,
            server_key: s.server_key,
        });
        c.client_first();
        assert_eq!(c.server_first(RFC_SERVER_FIRST).unwrap(), RFC_CLIENT_FINAL);
        c.server_final(RFC_SERVER_FINAL).unwrap();
    }

    fn with_key(client_key: [u8; 32], secret: &ScramSecret) -> ClientCredential {
        ClientCredential::ClientKey {
            client_key,
            server_key: secret.server_key,
        }
    }

    fn round_trip(cred: ClientCredential, secret: &ScramSecret) -> Result<[u8; 32], ScramError> {
        let mut server = ScramServer::new(secret.clone(), &[0x5a; 18]);
        let mut client = ScramClient::new(cred, &[0xa5; 18]);
        let first = client.client_first();
        let sf = server.client_first(&first)?;
        let cf = client.server_first(&sf)?;
        let (fin, key) = server.client_final(&cf)?;
        client.server_final(&fin)?;
        Ok(key)
    }

    #[test]
    fn round_trips() {
        let s = secret("correct horse");
        // password login; the server recovers the ClientKey...
        let key = round_trip(ClientCredential::Password("correct horse".into()), &s).unwrap();
        assert_eq!(Some(key), client_key_from_password(&s, "correct horse"));
        // ...which then logs in on its own.
        let again = round_trip(with_key(key, &s), &s).unwrap();
        assert_eq!(again, key);
    }

    #[test]
    fn wrong_credentials() {
        let s = secret("correct horse");
        assert_eq!(
            round_trip(ClientCredential::Password("wrong".into()), &s).unwrap_err(),
            ScramError::BadProof
        );
        assert_eq!(
            round_trip(with_key([9; 32], &s), &s).unwrap_err(),
            ScramError::BadProof
        );
    }

    #[test]
    fn password_is_saslprepped() {
        let s = secret("a b");
        assert!(round_trip(ClientCredential::Password("a\u{a0}b".into()), &s).is_ok());
    }

    #[test]
    fn server_signature_checked() {
        let s = secret("pw");
        let mut server = ScramServer::new(s.clone(), &[1; 18]);
        let mut client = ScramClient::new(ClientCredential::Password("pw".into()), &[2; 18]);
        let sf = server.client_first(&client.client_first()).unwrap();
        let cf = client.server_first(&sf).unwrap();
        let (fin, _) = server.client_final(&cf).unwrap();
        let mut forged = fin.clone();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            client.server_final(&forged).unwrap_err(),
            ScramError::BadProof
        );
    }

    /// A ClientKey login always verifies the server's signature with the
    /// ServerKey it carries: a well-formed signature that is not the
    /// server's (here the RFC 7677 one, for another exchange) is refused, and
    /// the genuine one passes.
    #[test]
    fn client_key_login_checks_the_server_signature() {
        let s = secret("pw");
        let ck = client_key_from_password(&s, "pw").unwrap();
        let mut c = ScramClient::new(with_key(ck, &s), &[2; 18]);
        let mut server = ScramServer::new(s.clone(), &[1; 18]);
        let sf = server.client_first(&c.client_first()).unwrap();
        c.server_first(&sf).unwrap();
        assert_eq!(
            c.server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
                .unwrap_err(),
            ScramError::BadProof
        );
        let mut c = ScramClient::new(with_key(ck, &s), &[2; 18]);
        let mut server = ScramServer::new(s, &[1; 18]);
        let sf = server.client_first(&c.client_first()).unwrap();
        let cf = c.server_first(&sf).unwrap();
        let (fin, _) = server.client_final(&cf).unwrap();
        c.server_final(&fin).unwrap();
    }

    type Case = (&'static [u8], fn(&ScramError) -> bool);

    #[test]
    fn server_first_errors() {
        let cases: &[Case] = &[
            (
                b"r=XXXXNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                |e| *e == ScramError::NonceMismatch,
            ),
            (
                b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                |e| *e == ScramError::NonceMismatch,
            ),
            (b"r=rOpr,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", |e| {
                *e == ScramError::NonceMismatch
            }),
            (b"m=x,r=rOprNGfwEbeRWgbNEkqOab,s=W22Z,i=1", |e| {
                matches!(e, ScramError::Malformed(_))
            }),
            (b"r=rOprNGfwEbeRWgbNEkqOab,s=!!,i=4096", |e| {
                matches!(e, ScramError::Malformed(_))
            }),
            (b"r=rOprNGfwEbeRWgbNEkqOab,s=,i=4096", |e| {
                matches!(e, ScramError::Malformed(_))
            }),
            (
                b"r=rOprNGfwEbeRWgbNEkqOab,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
                |e| matches!(e, ScramError::Malformed(_)),
            ),
            (
                b"r=rOprNGfwEbeRWgbNEkqOab,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1",
                |e| matches!(e, ScramError::Malformed(_)),
            ),
            (
                b"r=rOprNGfwEbeRWgbNEkqOab,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=+4",
                |e| matches!(e, ScramError::Malformed(_)),
            ),
            (
                b"r=rOprNGfwEbeRWgbNEkqOab,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=",
                |e| matches!(e, ScramError::Malformed(_)),
            ),
            (
                b"r=rOprNGfwEbeRWgbNEkqOab,s=W22ZaJ0SNY7soEsUEjb6gQ==",
                |e| matches!(e, ScramError::Malformed(_)),
            ),
            (
                b"r=rOprNGfwEbeRWgbNEkqOab,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1,x=y",
                |e| matches!(e, ScramError::Malformed(_)),
            ),
            (
                b"r=rOprNGfwEbeRWgbNEkqOa b,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1",
                |e| matches!(e, ScramError::Malformed(_)),
            ),
            (b"", |e| matches!(e, ScramError::Malformed(_))),
        ];
        for (msg, check) in cases {
            let mut c = rfc_client(ClientCredential::Password("pencil".into()));
            c.client_first();
            let e = c.server_first(msg).unwrap_err();
            assert!(check(&e), "{}: {e:?}", msg.escape_ascii());
        }
    }

    #[test]
    fn server_final_errors() {
        for (msg, server_error) in [
            (&b"e=invalid-proof"[..], true),
            (b"v=!!", false),
            (b"v=c2hvcnQ=", false),
            (b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=,x=1", false),
            (b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=,", false),
            (b"x=1", false),
            (b"", false),
        ] {
            let mut c = rfc_client(ClientCredential::Password("pencil".into()));
            c.client_first();
            c.server_first(RFC_SERVER_FIRST).unwrap();
            match c.server_final(msg).unwrap_err() {
                ScramError::Malformed(d) => {
                    assert_eq!(d.contains("invalid-proof"), server_error, "{d}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn state_machine() {
        let mut c = rfc_client(ClientCredential::Password("pencil".into()));
        assert!(c.server_first(RFC_SERVER_FIRST).is_err());
        let mut c = rfc_client(ClientCredential::Password("pencil".into()));
        assert!(c.server_final(RFC_SERVER_FINAL).is_err());
        let mut c = rfc_client(ClientCredential::Password("pencil".into()));
        c.client_first();
        c.server_first(RFC_SERVER_FIRST).unwrap();
        assert!(c.server_first(RFC_SERVER_FIRST).is_err());
    }

    #[test]
    fn username_escaping_and_debug() {
        assert_eq!(escape_username("a=b,c"), "a=3Db=2Cc");
        let mut c =
            ScramClient::new(ClientCredential::Password("x".into()), b"n").with_username("a,b");
        assert_eq!(c.client_first(), b"n,,n=a=2Cb,r=bg==");
        assert_eq!(
            format!("{:?}", ClientCredential::Password("x".into())),
            "Password(..)"
        );
        assert!(
            ScramClient::with_nonce_str(ClientCredential::Password("x".into()), "a,b").is_err()
        );
    }
}
