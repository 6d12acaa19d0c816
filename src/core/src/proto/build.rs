//! Builders that append complete protocol messages to an output buffer.
//!
//! Builders cannot fail: a string with an interior NUL would corrupt the
//! framing, so such strings are cut at the first NUL instead (no legitimate
//! protocol string contains one).

use super::error::ErrorFields;
use super::startup::PROTOCOL_3_0;

/// Starts a tagged message and returns the offset of its length word.
fn begin(out: &mut Vec<u8>, tag: u8) -> usize {
    out.push(tag);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    at
}

/// Patches the length word at `at` to cover everything appended since.
fn finish(out: &mut [u8], at: usize) {
    let len = i32::try_from(out.len() - at).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_i32(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// Appends `s` up to its first NUL, then a NUL.
fn put_cstr(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    out.extend_from_slice(&b[..end]);
    out.push(0);
}

fn auth(out: &mut Vec<u8>, code: i32, extra: &[u8]) {
    let at = begin(out, b'R');
    put_i32(out, code);
    out.extend_from_slice(extra);
    finish(out, at);
}

/// AuthenticationOk.
pub fn auth_ok(out: &mut Vec<u8>) {
    auth(out, 0, &[]);
}

/// AuthenticationCleartextPassword.
pub fn auth_cleartext(out: &mut Vec<u8>) {
    auth(out, 3, &[]);
}

/// AuthenticationMD5Password with its salt.
pub fn auth_md5(out: &mut Vec<u8>, salt: [u8; 4]) {
    auth(out, 5, &salt);
}

/// AuthenticationSASL listing the offered mechanisms.
pub fn auth_sasl(out: &mut Vec<u8>, mechanisms: &[&str]) {
    let at = begin(out, b'R');
    put_i32(out, 10);
    for m in mechanisms {
        put_cstr(out, m);
    }
    out.push(0);
    finish(out, at);
}

/// AuthenticationSASLContinue carrying a server-first-message.
pub fn auth_sasl_continue(out: &mut Vec<u8>, data: &[u8]) {
    auth(out, 11, data);
}

/// AuthenticationSASLFinal carrying a server-final-message.
pub fn auth_sasl_final(out: &mut Vec<u8>, data: &[u8]) {
    auth(out, 12, data);
}

/// ParameterStatus.
pub fn parameter_status(out: &mut Vec<u8>, name: &str, value: &str) {
    let at = begin(out, b'S');
    put_cstr(out, name);
    put_cstr(out, value);
    finish(out, at);
}

/// BackendKeyData (protocol 3.0, 4-byte key).
pub fn backend_key_data(out: &mut Vec<u8>, pid: i32, key: i32) {
    let at = begin(out, b'K');
    put_i32(out, pid);
    put_i32(out, key);
    finish(out, at);
}

/// ReadyForQuery with transaction status `I`, `T` or `E`.
pub fn ready_for_query(out: &mut Vec<u8>, status: u8) {
    let at = begin(out, b'Z');
    out.push(status);
    finish(out, at);
}

/// BackendKeyData with a key of any length (protocol 3.2 carries the
/// server's long key; 4 bytes is the 3.0 message).
pub fn backend_key_data_bytes(out: &mut Vec<u8>, pid: i32, key: &[u8]) {
    let at = begin(out, b'K');
    put_i32(out, pid);
    out.extend_from_slice(key);
    finish(out, at);
}

/// NegotiateProtocolVersion: the full version code the server offers
/// (196608 for 3.0, 196610 for 3.2; see
/// [`ServerProtocol::negotiate_version`](super::ServerProtocol::negotiate_version))
/// and the `_pq_.` options that were not recognized.
pub fn negotiate_protocol_version(out: &mut Vec<u8>, version: i32, unrecognized: &[&str]) {
    let at = begin(out, b'v');
    put_i32(out, version);
    put_i32(out, i32::try_from(unrecognized.len()).unwrap_or(i32::MAX));
    for o in unrecognized {
        put_cstr(out, o);
    }
    finish(out, at);
}

fn error_like(out: &mut Vec<u8>, tag: u8, f: &ErrorFields) {
    let at = begin(out, tag);
    // S is the (possibly localized) severity, V the fixed one; we only have one.
    for (code, text) in [
        (b'S', Some(f.severity.as_str())),
        (b'V', Some(f.severity.as_str())),
        (b'C', Some(f.sqlstate.as_str())),
        (b'M', Some(f.message.as_str())),
        (b'D', f.detail.as_deref()),
        (b'H', f.hint.as_deref()),
    ] {
        if let Some(text) = text {
            out.push(code);
            put_cstr(out, text);
        }
    }
    out.push(0);
    finish(out, at);
}

/// ErrorResponse with fields S, V, C, M and, when set, D and H.
pub fn error_response(out: &mut Vec<u8>, f: &ErrorFields) {
    error_like(out, b'E', f);
}

/// NoticeResponse with the same fields as [`error_response`].
pub fn notice_response(out: &mut Vec<u8>, f: &ErrorFields) {
    error_like(out, b'N', f);
}

/// StartupMessage for protocol 3.0 (no tag byte).
pub fn startup_message(out: &mut Vec<u8>, params: &[(&str, &str)]) {
    startup_message_minor(out, 0, params)
}

/// StartupMessage for protocol 3.`minor` (3.2 from PostgreSQL 18: the
/// server then gives a 32-byte cancel key).
pub fn startup_message_minor(out: &mut Vec<u8>, minor: u16, params: &[(&str, &str)]) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    put_i32(out, PROTOCOL_3_0 | minor as i32);
    for (k, v) in params {
        put_cstr(out, k);
        put_cstr(out, v);
    }
    out.push(0);
    finish(out, at);
}

/// PasswordMessage (cleartext password or md5 response).
pub fn password_message(out: &mut Vec<u8>, password: &str) {
    let at = begin(out, b'p');
    put_cstr(out, password);
    finish(out, at);
}

/// SASLInitialResponse: mechanism name and the client-first-message.
pub fn sasl_initial_response(out: &mut Vec<u8>, mechanism: &str, data: &[u8]) {
    let at = begin(out, b'p');
    put_cstr(out, mechanism);
    put_i32(out, i32::try_from(data.len()).unwrap_or(i32::MAX));
    out.extend_from_slice(data);
    finish(out, at);
}

/// SASLResponse carrying a client-final-message.
pub fn sasl_response(out: &mut Vec<u8>, data: &[u8]) {
    let at = begin(out, b'p');
    out.extend_from_slice(data);
    finish(out, at);
}

/// Terminate.
pub fn terminate(out: &mut Vec<u8>) {
    let at = begin(out, b'X');
    finish(out, at);
}

/// Simple Query.
pub fn query(out: &mut Vec<u8>, sql: &str) {
    let at = begin(out, b'Q');
    put_cstr(out, sql);
    finish(out, at);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{backend::*, error::parse_error_fields, frame::parse_message, startup::*};

    fn one(buf: &[u8]) -> (u8, Vec<u8>) {
        let (m, n) = parse_message(buf, 1 << 20).unwrap().unwrap();
        assert_eq!(n, buf.len(), "exactly one message");
        (m.tag, m.body.to_vec())
    }

    #[test]
    fn auth_messages_exact_bytes() {
        let mut b = Vec::new();
        auth_ok(&mut b);
        assert_eq!(b, [b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
        b.clear();
        auth_cleartext(&mut b);
        assert_eq!(b, [b'R', 0, 0, 0, 8, 0, 0, 0, 3]);
        b.clear();
        auth_md5(&mut b, [9, 8, 7, 6]);
        assert_eq!(b, [b'R', 0, 0, 0, 12, 0, 0, 0, 5, 9, 8, 7, 6]);
        b.clear();
        auth_sasl(&mut b, &["SCRAM-SHA-256"]);
        assert_eq!(&b[..9], [b'R', 0, 0, 0, 23, 0, 0, 0, 10]);
        assert_eq!(&b[9..], b"SCRAM-SHA-256\0\0");
    }

    #[test]
    fn auth_roundtrip_via_parser() {
        let mut b = Vec::new();
        auth_sasl(&mut b, &["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]);
        let (tag, body) = one(&b);
        assert_eq!(tag, b'R');
        assert_eq!(
            parse_auth_request(&body).unwrap(),
            AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]
            }
        );
        for (f, expect) in [
            (auth_sasl_continue as fn(&mut Vec<u8>, &[u8]), 11),
            (auth_sasl_final, 12),
        ] {
            let mut b = Vec::new();
            f(&mut b, b"r=abc");
            let (_, body) = one(&b);
            let parsed = parse_auth_request(&body).unwrap();
            match (expect, parsed) {
                (11, AuthRequest::SaslContinue(d)) | (12, AuthRequest::SaslFinal(d)) => {
                    assert_eq!(d, b"r=abc")
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn status_key_ready() {
        let mut b = Vec::new();
        parameter_status(&mut b, "server_version", "16.4");
        let (tag, body) = one(&b);
        assert_eq!(tag, b'S');
        assert_eq!(
            parse_parameter_status(&body).unwrap(),
            ("server_version", "16.4")
        );

        let mut b = Vec::new();
        backend_key_data(&mut b, 42, -7);
        let (tag, body) = one(&b);
        assert_eq!(tag, b'K');
        assert_eq!(parse_backend_key_data(&body).unwrap(), (42, -7));

        let mut b = Vec::new();
        ready_for_query(&mut b, b'I');
        assert_eq!(b, [b'Z', 0, 0, 0, 5, b'I']);
    }

    #[test]
    fn negotiate() {
        let mut b = Vec::new();
        negotiate_protocol_version(&mut b, 196608, &["_pq_.a", "_pq_.b"]);
        let (tag, body) = one(&b);
        assert_eq!(tag, b'v');
        assert_eq!(&body[..4], &[0, 3, 0, 0], "the full version code, as the server sends");
        assert_eq!(
            parse_negotiate_protocol_version(&body).unwrap(),
            (196608, vec!["_pq_.a", "_pq_.b"])
        );

        let mut b = Vec::new();
        backend_key_data_bytes(&mut b, 42, &[7u8; 32]);
        let (tag, body) = one(&b);
        assert_eq!(tag, b'K');
        assert_eq!(body.len(), 36);
    }

    #[test]
    fn error_roundtrip() {
        let f = ErrorFields {
            severity: "FATAL".into(),
            sqlstate: "28P01".into(),
            message: "password authentication failed for user \"x\"".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        };
        for (builder, tag) in [
            (error_response as fn(&mut Vec<u8>, &ErrorFields), b'E'),
            (notice_response, b'N'),
        ] {
            let mut b = Vec::new();
            builder(&mut b, &f);
            let (t, body) = one(&b);
            assert_eq!(t, tag);
            assert_eq!(parse_error_fields(&body).unwrap(), f);
        }
        let plain = ErrorFields {
            severity: "ERROR".into(),
            message: "m".into(),
            ..Default::default()
        };
        let mut b = Vec::new();
        error_response(&mut b, &plain);
        let (_, body) = one(&b);
        assert_eq!(body, b"SERROR\0VERROR\0C\0Mm\0\0");
        assert_eq!(parse_error_fields(&body).unwrap(), plain);
    }

    #[test]
    fn startup_roundtrip() {
        let mut b = Vec::new();
        startup_message(&mut b, &[("user", "bob"), ("database", "db")]);
        let (req, n) = parse_startup(&b).unwrap().unwrap();
        assert_eq!(n, b.len());
        assert_eq!(req.param("user"), Some("bob"));
        assert_eq!(req.param("database"), Some("db"));
    }

    #[test]
    fn frontend_messages() {
        let mut b = Vec::new();
        password_message(&mut b, "md5abc");
        assert_eq!(one(&b), (b'p', b"md5abc\0".to_vec()));

        let mut b = Vec::new();
        sasl_initial_response(&mut b, "SCRAM-SHA-256", b"n,,n=,r=x");
        let (tag, body) = one(&b);
        assert_eq!(tag, b'p');
        assert_eq!(
            parse_sasl_initial_response(&body).unwrap(),
            ("SCRAM-SHA-256", Some(&b"n,,n=,r=x"[..]))
        );

        let mut b = Vec::new();
        sasl_response(&mut b, b"c=biws");
        assert_eq!(one(&b), (b'p', b"c=biws".to_vec()));

        let mut b = Vec::new();
        terminate(&mut b);
        assert_eq!(b, [b'X', 0, 0, 0, 4]);

        let mut b = Vec::new();
        query(&mut b, "select 1");
        assert_eq!(one(&b), (b'Q', b"select 1\0".to_vec()));
    }

    #[test]
    fn interior_nul_is_cut() {
        let mut b = Vec::new();
        query(&mut b, "select 1\0; drop table x");
        assert_eq!(one(&b), (b'Q', b"select 1\0".to_vec()));
    }

    #[test]
    fn appends_without_clobbering() {
        let mut b = b"prefix".to_vec();
        auth_ok(&mut b);
        ready_for_query(&mut b, b'I');
        assert_eq!(&b[..6], b"prefix");
        let (m, n) = parse_message(&b[6..], 100).unwrap().unwrap();
        assert_eq!((m.tag, n), (b'R', 9));
        let (m, _) = parse_message(&b[6 + n..], 100).unwrap().unwrap();
        assert_eq!(m.tag, b'Z');
    }
}
