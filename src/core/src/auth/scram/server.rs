//! Server side of SCRAM-SHA-256, used when a client logs in to the pooler.
//!
//! Besides the proof check it recovers the client's ClientKey
//! (`ClientProof XOR ClientSignature`), which lets the pooler later log in
//! to the real server as that client without ever knowing the password.

use super::attr::{check_whole, is_printable, sanitize_char, Cursor};
use super::zeroize::{wipe, Key32};
use super::{
    b64_decode, b64_encode, hmac, sha256, xor32, ScramError, DEFAULT_ITERATIONS, DEFAULT_SALT_LEN,
};
use crate::auth::ct::ct_eq;
use crate::auth::ScramSecret;
use std::sync::OnceLock;

enum State {
    /// Waiting for client-first-message.
    Start,
    /// server-first sent; waiting for client-final-message.
    SentFirst,
    /// Finished, successfully or not; no more messages accepted.
    Done,
}

/// One SCRAM-SHA-256 exchange with one client.
pub struct ScramServer {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: Key32,
    server_key: Key32,
    /// Mock exchanges look normal but can never succeed.
    doomed: bool,
    server_nonce: String,
    state: State,
    /// GS2 flag the client sent (`n`, `y` or `p`).
    cbind_flag: u8,
    /// `tls-server-end-point` data (the hash of the server certificate)
    /// when the client is on TLS: SCRAM-SHA-256-PLUS is offered.
    cbind_data: Option<Vec<u8>>,
    /// The client selected SCRAM-SHA-256-PLUS.
    cbind_in_use: bool,
    /// On TLS without a certificate hash: PLUS offered, binding always fails.
    cbind_unavailable: bool,
    client_nonce: Vec<u8>,
    client_first_bare: Vec<u8>,
    server_first: Vec<u8>,
}

impl std::fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramServer").finish_non_exhaustive()
    }
}

/// Per-process random key for [`ScramServer::new_mock`].
fn process_mock_key() -> &'static [u8; 32] {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        if getrandom::getrandom(&mut k).is_err() {
            // std's hasher keys come from the OS as well; good enough for salts.
            use std::hash::{BuildHasher, Hasher};
            for (i, chunk) in k.chunks_mut(8).enumerate() {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_usize(i);
                chunk.copy_from_slice(&h.finish().to_le_bytes());
            }
        }
        k
    })
}

impl ScramServer {
    /// Starts an exchange for a role with a SCRAM secret. The server nonce
    /// is the base64 of `server_nonce_raw`, which should be at least 18
    /// random bytes (the server's own choice); the crate draws no randomness.
    pub fn new(secret: ScramSecret, server_nonce_raw: &[u8]) -> Self {
        Self::build(secret, b64_encode(server_nonce_raw), false)
    }

    /// Like [`new`](Self::new) with a literal nonce string (must be SCRAM
    /// `printable`), for test vectors and interop checks.
    pub fn with_nonce_str(secret: ScramSecret, server_nonce: &str) -> Result<Self, ScramError> {
        if server_nonce.is_empty() || !is_printable(server_nonce.as_bytes()) {
            return Err(ScramError::malformed("server nonce is not printable"));
        }
        Ok(Self::build(secret, server_nonce.to_string(), false))
    }

    /// A mock exchange for a role that does not exist or has no SCRAM
    /// secret: it hands out a plausible salt and always ends in `BadProof`,
    /// so clients cannot probe which roles exist. The salt is derived from
    /// the user name and a per-process random key, so it is stable only for
    /// this process's lifetime; see [`new_mock_keyed`](Self::new_mock_keyed).
    pub fn new_mock(user: &str, server_nonce_raw: &[u8]) -> Self {
        Self::new_mock_keyed(
            user,
            process_mock_key(),
            DEFAULT_ITERATIONS,
            server_nonce_raw,
        )
    }

    /// A mock exchange whose salt is derived from `mock_key` (a secret that
    /// is stable across processes and restarts, e.g. the server's mock
    /// authentication nonce) so repeated probes of the same user always see
    /// the same salt, just as for a real role. With the server's nonce the
    /// salt is the server's own mock salt (auth-scram.c, scram_mock_salt():
    /// SHA-256 of the user name followed by the nonce, first 16 bytes), so a
    /// probe cannot tell the pooler from the server either. `iterations`
    /// should be what the server uses for its mock secret.
    pub fn new_mock_keyed(
        user: &str,
        mock_key: &[u8],
        iterations: u32,
        server_nonce_raw: &[u8],
    ) -> Self {
        let salt = sha256(&[user.as_bytes(), mock_key].concat());
        let stored_key = hmac(mock_key, &[b"nextgres mock key\0", user.as_bytes()]);
        let secret = ScramSecret {
            iterations: iterations.max(1),
            salt: salt[..DEFAULT_SALT_LEN].to_vec(),
            stored_key,
            server_key: stored_key,
        };
        Self::build(secret, b64_encode(server_nonce_raw), true)
    }

    fn build(mut secret: ScramSecret, server_nonce: String, doomed: bool) -> Self {
        let (stored_key, server_key) = (Key32(secret.stored_key), Key32(secret.server_key));
        // The caller's copy was moved in; wipe it so only the Key32s remain.
        wipe(&mut secret.stored_key);
        wipe(&mut secret.server_key);
        ScramServer {
            iterations: secret.iterations.max(1),
            salt: std::mem::take(&mut secret.salt),
            stored_key,
            server_key,
            doomed,
            server_nonce,
            state: State::Start,
            cbind_flag: b'n',
            cbind_data: None,
            cbind_in_use: false,
            cbind_unavailable: false,
            client_nonce: Vec::new(),
            client_first_bare: Vec::new(),
            server_first: Vec::new(),
        }
    }

    /// The client is on TLS and `end_point` is the `tls-server-end-point`
    /// hash of the server certificate it was shown
    /// ([`crate::cert::server_end_point`]): SCRAM-SHA-256-PLUS is offered,
    /// and a client-first with flag `y` is refused as a downgrade.
    pub fn with_channel_binding(mut self, end_point: Vec<u8>) -> Self {
        self.cbind_data = Some(end_point);
        self
    }

    /// The client is on TLS but the server certificate's signature has no
    /// hash for `tls-server-end-point` (Ed25519/Ed448, an algorithm
    /// [`crate::cert::server_end_point`] does not know): as the server,
    /// SCRAM-SHA-256-PLUS is still offered and flag `y` refused as a
    /// downgrade; an exchange that selects PLUS fails at client-final (the
    /// server fails it there too, be_tls_get_certificate_hash()'s
    /// `could not find digest for NID ...`; here 28000 `SCRAM channel
    /// binding check failed`).
    pub fn with_channel_binding_unavailable(mut self) -> Self {
        self.cbind_data = Some(Vec::new());
        self.cbind_unavailable = true;
        self
    }

    /// The mechanisms for AuthenticationSASL, in the server's order
    /// (auth-scram.c scram_get_mechanisms(): PLUS first, only on TLS).
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.cbind_data.is_some() {
            &[super::SCRAM_SHA_256_PLUS, super::SCRAM_SHA_256]
        } else {
            &[super::SCRAM_SHA_256]
        }
    }

    /// The mechanism named in SASLInitialResponse (auth-scram.c
    /// scram_init()): PLUS only when offered; anything else is 08P01
    /// `client selected an invalid SASL authentication mechanism`.
    pub fn select_mechanism(&mut self, mechanism: &str) -> Result<(), ScramError> {
        if mechanism == super::SCRAM_SHA_256_PLUS && self.cbind_data.is_some() {
            self.cbind_in_use = true;
        } else if mechanism == super::SCRAM_SHA_256 {
            self.cbind_in_use = false;
        } else {
            self.state = State::Done;
            return Err(ScramError::ChannelBinding(
                "client selected an invalid SASL authentication mechanism".into(),
            ));
        }
        Ok(())
    }

    /// Handles the client-first-message (SASLInitialResponse data) and
    /// returns the server-first-message.
    pub fn client_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::Start) {
            self.state = State::Done;
            return Err(ScramError::malformed("unexpected client-first-message"));
        }
        self.state = State::Done; // until we succeed
        check_whole(data)?;
        self.read_client_first(data)?;
        let mut out = b"r=".to_vec();
        out.extend_from_slice(&self.client_nonce);
        out.extend_from_slice(self.server_nonce.as_bytes());
        out.extend_from_slice(
            format!(",s={},i={}", b64_encode(&self.salt), self.iterations).as_bytes(),
        );
        self.server_first = out.clone();
        self.state = State::SentFirst;
        Ok(out)
    }

    fn read_client_first(&mut self, data: &[u8]) -> Result<(), ScramError> {
        // gs2-header: cbind-flag "," [authzid] ","; the rules and texts of
        // auth-scram.c read_client_first_message().
        let plus_required = "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include channel binding data.";
        let authzid_at = match data[0] {
            b'n' | b'y' => {
                if self.cbind_in_use {
                    return Err(ScramError::malformed(plus_required));
                }
                if data[0] == b'y' && self.cbind_data.is_some() {
                    // The client could bind but believes the server cannot:
                    // someone in between removed SCRAM-SHA-256-PLUS.
                    return Err(ScramError::Refused {
                        message: "SCRAM channel binding negotiation error".into(),
                        detail: Some(
                            "The client supports SCRAM channel binding but thinks the server does not.  \
                             However, this server does support channel binding."
                                .into(),
                        ),
                    });
                }
                self.cbind_flag = data[0];
                if data.get(1) != Some(&b',') {
                    return Err(ScramError::malformed(format!(
                        "Comma expected, but found character \"{}\".",
                        sanitize_char(data.get(1).copied())
                    )));
                }
                2
            }
            b'p' => {
                if !self.cbind_in_use {
                    return Err(ScramError::malformed(
                        "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM message includes channel binding data.",
                    ));
                }
                let mut c = Cursor::new(data, 0);
                let kind = c.expect(b'p')?;
                if kind != super::TLS_SERVER_END_POINT.as_bytes() {
                    return Err(ScramError::ChannelBinding(format!(
                        "unsupported SCRAM channel-binding type \"{}\"",
                        kind.escape_ascii()
                    )));
                }
                self.cbind_flag = b'p';
                c.pos()
            }
            c => {
                return Err(ScramError::malformed(format!(
                    "Unexpected channel-binding flag \"{}\".",
                    sanitize_char(Some(c))
                )))
            }
        };
        match data.get(authzid_at) {
            Some(b'a') => {
                return Err(ScramError::Unsupported(
                    "client uses authorization identity, but it is not supported".into(),
                ))
            }
            Some(b',') => {}
            c => {
                return Err(ScramError::malformed(format!(
                    "Unexpected attribute \"{}\" in client-first-message.",
                    sanitize_char(c.copied())
                )))
            }
        }
        let bare_start = authzid_at + 1;
        let mut c = Cursor::new(data, bare_start);
        if c.peek() == Some(b'm') {
            return Err(ScramError::Unsupported(
                "client requires an unsupported SCRAM extension".into(),
            ));
        }
        // The user name is ignored: the startup packet's user is the one that counts.
        c.expect(b'n')?;
        // An empty nonce passes, as at the server (is_scram_printable()).
        let nonce = c.expect(b'r')?;
        if !is_printable(nonce) {
            return Err(ScramError::Protocol(
                "non-printable characters in SCRAM nonce".into(),
            ));
        }
        while !c.at_end() {
            c.any()?; // extensions are allowed and ignored
        }
        self.client_nonce = nonce.to_vec();
        self.client_first_bare = data[bare_start..].to_vec();
        Ok(())
    }

    /// Handles the client-final-message. On success returns the
    /// server-final-message (`v=...`) and the client's ClientKey.
    pub fn client_final(&mut self, data: &[u8]) -> Result<(Vec<u8>, [u8; 32]), ScramError> {
        if !matches!(self.state, State::SentFirst) {
            self.state = State::Done;
            return Err(ScramError::malformed("unexpected client-final-message"));
        }
        self.state = State::Done;
        check_whole(data)?;

        let mut c = Cursor::new(data, 0);
        let cbind = c.expect(b'c')?;
        if self.cbind_in_use {
            // base64 of the gs2 header and the hash of the server's
            // certificate (auth-scram.c read_client_final_message()).
            let mut input = format!("p={},,", super::TLS_SERVER_END_POINT).into_bytes();
            input.extend_from_slice(self.cbind_data.as_deref().unwrap_or_default());
            if self.cbind_unavailable || cbind != b64_encode(&input).as_bytes() {
                return Err(ScramError::Refused {
                    message: "SCRAM channel binding check failed".into(),
                    detail: None,
                });
            }
        } else {
            // Without channel binding the data is just the gs2 header echoed back.
            let expected: &[u8] = if self.cbind_flag == b'y' { b"eSws" } else { b"biws" };
            if cbind != expected {
                return Err(ScramError::ChannelBinding(
                    "unexpected SCRAM channel-binding attribute in client-final-message".to_string(),
                ));
            }
        }
        let nonce = c.expect(b'r')?;
        // Skip extensions until the proof; the proof's comma ends the signed part.
        let (proof, without_proof_end) = loop {
            let start = c.pos();
            let (attr, value) = c.any()?;
            if attr == b'p' {
                break (value, start.saturating_sub(1));
            }
        };
        let proof: [u8; 32] = b64_decode(proof)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| ScramError::malformed("Malformed proof in client-final-message."))?;
        if !c.at_end() {
            return Err(ScramError::malformed(
                "Garbage found at the end of client-final-message.",
            ));
        }

        let mut full_nonce = self.client_nonce.clone();
        full_nonce.extend_from_slice(self.server_nonce.as_bytes());
        if nonce != full_nonce.as_slice() {
            return Err(ScramError::NonceMismatch);
        }

        let auth_message = [
            self.client_first_bare.as_slice(),
            b",",
            &self.server_first,
            b",",
            &data[..without_proof_end],
        ];
        let signature = hmac(&self.stored_key.0, &auth_message);
        let client_key = Key32(xor32(&proof, &signature));
        // Mock exchanges do the same work so timing does not give them away.
        let ok = ct_eq(&sha256(&client_key.0), &self.stored_key.0) & !self.doomed;
        if !ok {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.server_key.0, &auth_message);
        let mut out = b"v=".to_vec();
        out.extend_from_slice(b64_encode(&server_signature).as_bytes());
        Ok((out, client_key.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{parse_stored_secret, StoredSecret};

    const RFC_SECRET: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";
    const RFC_CLIENT_FIRST: &[u8] = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &[u8] =
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &[u8] = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &[u8] = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    pub(crate) fn rfc_secret() -> ScramSecret {
        match parse_stored_secret(RFC_SECRET) {
            StoredSecret::Scram(s) => s,
            other => panic!("{other:?}"),
        }
    }

    fn rfc_server() -> ScramServer {
        ScramServer::with_nonce_str(rfc_secret(), "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0").unwrap()
    }

    #[test]
    fn rfc_7677_exchange() {
        let mut s = rfc_server();
        assert_eq!(s.client_first(RFC_CLIENT_FIRST).unwrap(), RFC_SERVER_FIRST);
        let (fin, client_key) = s.client_final(RFC_CLIENT_FINAL).unwrap();
        assert_eq!(fin, RFC_SERVER_FINAL);
        // The recovered key is the one derived from the password.
        assert_eq!(
            Some(client_key),
            crate::auth::client_key_from_password(&rfc_secret(), "pencil")
        );
        // The exchange is over.
        assert!(s.client_final(RFC_CLIENT_FINAL).is_err());
    }

    #[test]
    fn wrong_proof() {
        let mut s = rfc_server();
        s.client_first(RFC_CLIENT_FIRST).unwrap();
        let bad = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=AHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(s.client_final(bad).unwrap_err(), ScramError::BadProof);
    }

    #[test]
    fn wrong_nonce() {
        let mut s = rfc_server();
        s.client_first(RFC_CLIENT_FIRST).unwrap();
        let bad = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIljXH,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(s.client_final(bad).unwrap_err(), ScramError::NonceMismatch);
        let mut s = rfc_server();
        s.client_first(RFC_CLIENT_FIRST).unwrap();
        let short = b"c=biws,r=rOprNGfwEbeRWgbNEkqO,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(
            s.client_final(short).unwrap_err(),
            ScramError::NonceMismatch
        );
    }

    #[test]
    fn username_is_ignored_and_extensions_skipped() {
        let mut s = ScramServer::new(rfc_secret(), &[7; 18]);
        let first = s.client_first(b"n,,n=,r=abc,x=ext").unwrap();
        let expected = format!(
            "r=abc{},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            b64_encode(&[7; 18])
        );
        assert_eq!(first, expected.as_bytes());
    }

    #[test]
    fn y_flag_accepted_p_rejected() {
        let mut s = ScramServer::new(rfc_secret(), &[1; 18]);
        assert!(s.client_first(b"y,,n=,r=abc").is_ok());
        // The final message must then echo "y,,", not "n,,".
        let nonce = format!("abc{}", b64_encode(&[1; 18]));
        let msg = format!("c=biws,r={nonce},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
        assert!(matches!(
            s.client_final(msg.as_bytes()),
            Err(ScramError::ChannelBinding(_))
        ));

        let mut s = ScramServer::new(rfc_secret(), &[1; 18]);
        let e = s
            .client_first(b"p=tls-server-end-point,,n=,r=abc")
            .unwrap_err();
        // As the server: a malformed message when PLUS was not selected.
        assert_eq!(e.message(), "malformed SCRAM message");
    }

    /// Each refusal as auth-scram.c read_client_first_message() words it:
    /// SQLSTATE, message, detail (sanitize_char() quoting).
    #[test]
    fn malformed_client_first() {
        let m = "malformed SCRAM message";
        for (bad, code, message, detail) in [
            (&b""[..], "08P01", m, Some("The message is empty.")),
            (b"n", "08P01", m, Some("Comma expected, but found character \"0x00\".")),
            (b"n;,n=,r=abc", "08P01", m, Some("Comma expected, but found character \"';'\".")),
            (b"n,", "08P01", m, Some("Unexpected attribute \"0x00\" in client-first-message.")),
            (b"n,n=,r=abc", "08P01", m, Some("Unexpected attribute \"'n'\" in client-first-message.")),
            (b"n,x,n=,r=abc", "08P01", m, Some("Unexpected attribute \"'x'\" in client-first-message.")),
            (b"n,,", "08P01", m, Some("Expected attribute \"n\" but found \"0x00\".")),
            (b"n,,r=abc", "08P01", m, Some("Expected attribute \"n\" but found \"'r'\".")),
            (b"x,,n=,r=abc", "08P01", m, Some("Unexpected channel-binding flag \"'x'\".")),
            (b"\x01,,n=,r=abc", "08P01", m, Some("Unexpected channel-binding flag \"0x01\".")),
            (b"n,a=admin,n=,r=abc", "0A000", "client uses authorization identity, but it is not supported", None),
            (b"n,,m=ext,n=,r=abc", "0A000", "client requires an unsupported SCRAM extension", None),
            (b"n,,n=,r=a b", "08P01", "non-printable characters in SCRAM nonce", None),
            (b"n,,n=,r=a\x01", "08P01", "non-printable characters in SCRAM nonce", None),
            (b"n,,n=,r=abc\0", "08P01", m, Some("Message length does not match input length.")),
            (b"n,,n=,r=abc,1=x", "08P01", m, Some("Attribute expected, but found invalid character \"'1'\".")),
            (b"n,,n=,x=abc", "08P01", m, Some("Expected attribute \"r\" but found \"'x'\".")),
        ] {
            let mut s = ScramServer::new(rfc_secret(), &[1; 18]);
            let e = s.client_first(bad).unwrap_err();
            let got = (e.sqlstate(), e.message(), e.detail());
            assert_eq!(got, (code, message.to_string(), detail.map(String::from)), "{}", bad.escape_ascii());
        }
        // An empty client nonce is printable to the server: the exchange goes on.
        let mut s = ScramServer::new(rfc_secret(), &[1; 18]);
        assert!(s.client_first(b"n,,n=,r=").is_ok());
    }

    #[test]
    fn malformed_client_final() {
        let nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        for bad in [
            String::new(),
            format!("r={nonce},p={proof}"),
            format!("c=biws,p={proof}"),
            format!("c=biws,r={nonce}"),
            format!("c=biws,r={nonce},"),
            format!("c=biws,r={nonce},p=short"),
            format!("c=biws,r={nonce},p=!!!!"),
            format!("c=biws,r={nonce},p={proof},x=trailing"),
            format!("c=biws,r={nonce},p={proof}\0"),
            format!("c=bad,r={nonce},p={proof}"),
        ] {
            let mut s = rfc_server();
            s.client_first(RFC_CLIENT_FIRST).unwrap();
            let e = s.client_final(bad.as_bytes()).unwrap_err();
            assert_ne!(e, ScramError::BadProof, "{bad}");
        }
        // An extension before the proof is fine (and signed).
        let mut s = rfc_server();
        s.client_first(RFC_CLIENT_FIRST).unwrap();
        let ext = format!("c=biws,r={nonce},x=1,p={proof}");
        assert_eq!(
            s.client_final(ext.as_bytes()).unwrap_err(),
            ScramError::BadProof
        );
    }

    #[test]
    fn state_machine() {
        let mut s = rfc_server();
        assert!(matches!(
            s.client_final(RFC_CLIENT_FINAL),
            Err(ScramError::Malformed(_))
        ));
        // a failed exchange stays failed
        assert!(s.client_first(RFC_CLIENT_FIRST).is_err());
        let mut s = rfc_server();
        s.client_first(RFC_CLIENT_FIRST).unwrap();
        assert!(s.client_first(RFC_CLIENT_FIRST).is_err());
        assert!(s.client_final(RFC_CLIENT_FINAL).is_err());
    }

    #[test]
    fn mock_is_plausible_and_always_fails() {
        let mut a = ScramServer::new_mock("ghost", &[3; 18]);
        let first = a.client_first(b"n,,n=,r=abc").unwrap();
        let text = String::from_utf8(first.clone()).unwrap();
        assert!(text.starts_with(&format!("r=abc{},s=", b64_encode(&[3; 18]))));
        assert!(text.ends_with(",i=4096"));
        // The salt is 16 bytes, like a real one, and stable for the user.
        let salt = text.split(",s=").nth(1).unwrap().split(',').next().unwrap();
        assert_eq!(b64_decode(salt).unwrap().len(), 16);
        let mut b = ScramServer::new_mock("ghost", &[3; 18]);
        assert_eq!(b.client_first(b"n,,n=,r=abc").unwrap(), first);
        let mut c = ScramServer::new_mock("other", &[3; 18]);
        assert_ne!(c.client_first(b"n,,n=,r=abc").unwrap(), first);

        let nonce = format!("abc{}", b64_encode(&[3; 18]));
        let msg = format!("c=biws,r={nonce},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=");
        assert_eq!(
            a.client_final(msg.as_bytes()).unwrap_err(),
            ScramError::BadProof
        );
    }

    #[test]
    fn mock_keyed_is_deterministic() {
        let one = |key: &[u8]| {
            let mut m = ScramServer::new_mock_keyed("ghost", key, 10000, &[3; 18]);
            m.client_first(b"n,,n=,r=abc").unwrap()
        };
        assert_eq!(one(b"k1"), one(b"k1"));
        assert_ne!(one(b"k1"), one(b"k2"));
        assert!(String::from_utf8(one(b"k1")).unwrap().ends_with(",i=10000"));
        // The server's mock salt: SHA-256(user name || nonce), 16 bytes.
        let want = b64_encode(&sha256(b"ghostk1")[..16]);
        assert!(String::from_utf8(one(b"k1")).unwrap().contains(&format!(",s={want},")));
    }

    #[test]
    fn bad_nonce_str() {
        assert!(ScramServer::with_nonce_str(rfc_secret(), "").is_err());
        assert!(ScramServer::with_nonce_str(rfc_secret(), "a,b").is_err());
    }

    /// A client-final-message for the RFC server and `client_first`
    /// (password "pencil"), with channel binding attribute `c`.
    fn final_with(client_first: &[u8], server_first: &[u8], c: &str) -> Vec<u8> {
        use crate::auth::scram::{client_key, salted_password};
        let secret = rfc_secret();
        let salted = salted_password("pencil", &secret.salt, secret.iterations);
        let ck = client_key(&salted.0);
        // client-first-message-bare: after the gs2 header's second comma.
        let first = client_first.iter().position(|&b| b == b',').unwrap();
        let bare_at = first + 1 + client_first[first + 1..].iter().position(|&b| b == b',').unwrap() + 1;
        let bare = &client_first[bare_at..];
        let nonce = &server_first[2..server_first.iter().position(|&b| b == b',').unwrap()];
        let without_proof = [b"c=".as_slice(), c.as_bytes(), b",r=", nonce].concat();
        let sig = hmac(&sha256(&ck), &[bare, b",", server_first, b",", &without_proof]);
        let proof = xor32(&ck, &sig);
        [without_proof.as_slice(), b",p=", b64_encode(&proof).as_bytes()].concat()
    }

    const HASH: [u8; 32] = [7; 32];

    fn tls_server() -> ScramServer {
        rfc_server().with_channel_binding(HASH.to_vec())
    }

    #[test]
    fn tls_without_a_certificate_hash_offers_plus_and_refuses_y() {
        let s = rfc_server().with_channel_binding_unavailable();
        assert_eq!(s.mechanisms(), &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let mut s = rfc_server().with_channel_binding_unavailable();
        s.select_mechanism("SCRAM-SHA-256").unwrap();
        let e = s.client_first(b"y,,n=,r=abc").unwrap_err();
        assert_eq!(e.message(), "SCRAM channel binding negotiation error");
        // PLUS with binding data of an empty hash still fails.
        let mut s = rfc_server().with_channel_binding_unavailable();
        s.select_mechanism("SCRAM-SHA-256-PLUS").unwrap();
        let cf = b"p=tls-server-end-point,,n=,r=abc";
        let sf = s.client_first(cf).unwrap();
        let c = b64_encode(b"p=tls-server-end-point,,");
        let e = s.client_final(&final_with(cf, &sf, &c)).unwrap_err();
        assert_eq!((e.sqlstate(), e.message().as_str()), ("28000", "SCRAM channel binding check failed"));
    }

    #[test]
    fn plus_offered_only_on_tls() {
        assert_eq!(rfc_server().mechanisms(), &["SCRAM-SHA-256"]);
        assert_eq!(tls_server().mechanisms(), &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
        let e = rfc_server().select_mechanism("SCRAM-SHA-256-PLUS").unwrap_err();
        assert_eq!((e.sqlstate(), e.message().as_str()), ("08P01", "client selected an invalid SASL authentication mechanism"));
        assert!(tls_server().select_mechanism("SCRAM-SHA-1").is_err());
    }

    #[test]
    fn channel_binding_exchange() {
        let mut s = tls_server();
        s.select_mechanism("SCRAM-SHA-256-PLUS").unwrap();
        let cf = b"p=tls-server-end-point,,n=,r=abc";
        let sf = s.client_first(cf).unwrap();
        let mut data = b"p=tls-server-end-point,,".to_vec();
        data.extend_from_slice(&HASH);
        let fin = final_with(cf, &sf, &b64_encode(&data));
        let (_, key) = s.client_final(&fin).unwrap();
        assert_eq!(Some(key), crate::auth::client_key_from_password(&rfc_secret(), "pencil"));

        // Binding data for another certificate: 28000, as the server.
        let mut s = tls_server();
        s.select_mechanism("SCRAM-SHA-256-PLUS").unwrap();
        let sf = s.client_first(cf).unwrap();
        let mut other = b"p=tls-server-end-point,,".to_vec();
        other.extend_from_slice(&[8; 32]);
        let e = s.client_final(&final_with(cf, &sf, &b64_encode(&other))).unwrap_err();
        assert_eq!((e.sqlstate(), e.message().as_str()), ("28000", "SCRAM channel binding check failed"));
    }

    #[test]
    fn gs2_flag_rules() {
        // PLUS selected, no binding data in the header.
        for cf in [&b"n,,n=,r=abc"[..], b"y,,n=,r=abc"] {
            let mut s = tls_server();
            s.select_mechanism("SCRAM-SHA-256-PLUS").unwrap();
            let e = s.client_first(cf).unwrap_err();
            assert_eq!(e.message(), "malformed SCRAM message");
            assert!(e.detail().unwrap().starts_with("The client selected SCRAM-SHA-256-PLUS"));
        }
        // 'y' on TLS: a downgrade.
        let mut s = tls_server();
        s.select_mechanism("SCRAM-SHA-256").unwrap();
        let e = s.client_first(b"y,,n=,r=abc").unwrap_err();
        assert_eq!((e.sqlstate(), e.message().as_str()), ("28000", "SCRAM channel binding negotiation error"));
        // 'y' without TLS is fine, and 'n' on TLS too.
        let mut s = rfc_server();
        s.select_mechanism("SCRAM-SHA-256").unwrap();
        let sf = s.client_first(b"y,,n=,r=abc").unwrap();
        assert!(s.client_final(&final_with(b"y,,n=,r=abc", &sf, "eSws")).is_ok());
        let mut s = tls_server();
        s.select_mechanism("SCRAM-SHA-256").unwrap();
        let sf = s.client_first(b"n,,n=,r=abc").unwrap();
        assert!(s.client_final(&final_with(b"n,,n=,r=abc", &sf, "biws")).is_ok());
        // 'p' without PLUS selected.
        let mut s = tls_server();
        s.select_mechanism("SCRAM-SHA-256").unwrap();
        let e = s.client_first(b"p=tls-server-end-point,,n=,r=abc").unwrap_err();
        assert!(e.detail().unwrap().starts_with("The client selected SCRAM-SHA-256 without channel binding"));
        // Another binding type.
        let mut s = tls_server();
        s.select_mechanism("SCRAM-SHA-256-PLUS").unwrap();
        let e = s.client_first(b"p=tls-unique,,n=,r=abc").unwrap_err();
        assert_eq!((e.sqlstate(), e.message().as_str()), ("08P01", "unsupported SCRAM channel-binding type \"tls-unique\""));
        // PLUS selected but the final message echoes a plain header.
        let mut s = tls_server();
        s.select_mechanism("SCRAM-SHA-256-PLUS").unwrap();
        let cf = b"p=tls-server-end-point,,n=,r=abc";
        let sf = s.client_first(cf).unwrap();
        assert_eq!(s.client_final(&final_with(cf, &sf, "biws")).unwrap_err().sqlstate(), "28000");
    }
}
