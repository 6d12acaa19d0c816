//! Parsers for the messages the pooler reads while logging in: what a server
//! sends to its client (authentication requests, key data, parameter status,
//! ready-for-query, protocol negotiation) and the client's
//! SASLInitialResponse, which the pooler receives when acting as a server.
//!
//! All parsers are strict about trailing bytes, like the server's
//! `pq_getmsgend`, so a confused peer is caught early.

use super::error::ProtoError;
use super::frame::{be_i32, read_cstr};

/// An `R` (authentication request) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest<'a> {
    /// AuthenticationOk.
    Ok,
    /// AuthenticationCleartextPassword.
    Cleartext,
    /// AuthenticationMD5Password.
    Md5 {
        /// Salt to hash with.
        salt: [u8; 4],
    },
    /// AuthenticationSASL with the offered mechanisms.
    Sasl {
        /// Mechanism names in server order.
        mechanisms: Vec<&'a str>,
    },
    /// AuthenticationSASLContinue data (server-first-message).
    SaslContinue(&'a [u8]),
    /// AuthenticationSASLFinal data (server-final-message).
    SaslFinal(&'a [u8]),
    /// Any other method (GSS, SSPI, ...), which the pooler does not speak.
    Other(i32),
}

fn format_error() -> ProtoError {
    ProtoError::violation("invalid message format")
}

fn expect_end(body: &[u8], off: usize) -> Result<(), ProtoError> {
    if off == body.len() {
        Ok(())
    } else {
        Err(format_error())
    }
}

/// Parses the body of an `R` message.
pub fn parse_auth_request(body: &[u8]) -> Result<AuthRequest<'_>, ProtoError> {
    let code = be_i32(body, 0).ok_or_else(format_error)?;
    let rest = &body[4..];
    Ok(match code {
        0 => {
            expect_end(body, 4)?;
            AuthRequest::Ok
        }
        3 => {
            expect_end(body, 4)?;
            AuthRequest::Cleartext
        }
        5 => match rest {
            [a, b, c, d] => AuthRequest::Md5 {
                salt: [*a, *b, *c, *d],
            },
            _ => return Err(format_error()),
        },
        10 => {
            let mut mechanisms = Vec::new();
            let mut off = 4;
            loop {
                let (m, next) = read_cstr(body, off)?;
                off = next;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            expect_end(body, off)?;
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(rest),
        12 => AuthRequest::SaslFinal(rest),
        other => AuthRequest::Other(other),
    })
}

/// Parses a SASLInitialResponse body: mechanism name, i32 length and that
/// many bytes of client-first-message; None for length -1 (no initial
/// response, RFC 4422: the server answers an empty challenge and reads the
/// client-first-message from the next SASLResponse).
///
/// # Errors
/// As auth-sasl.c CheckSASLAuth() reads it (08P01): `invalid string in
/// message` for an unterminated name, `insufficient data left in message`
/// for a missing length or one below -1 or past the end
/// (pq_getmsgint/pq_getmsgbytes), `invalid message format` for bytes after
/// the data (pq_getmsgend).
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<(&str, Option<&[u8]>), ProtoError> {
    let short = || ProtoError::violation("insufficient data left in message");
    let (mechanism, off) = read_cstr(body, 0)?;
    let len = be_i32(body, off).ok_or_else(short)?;
    let off = off + 4;
    if len == -1 {
        expect_end(body, off)?;
        return Ok((mechanism, None));
    }
    let len = usize::try_from(len).map_err(|_| short())?;
    let data = body.get(off..off.saturating_add(len)).ok_or_else(short)?;
    expect_end(body, off + len)?;
    Ok((mechanism, Some(data)))
}

/// The pid of a BackendKeyData body of protocol 3.0 (a 4-byte key) or 3.2
/// (a key of up to 256 bytes; protocol.sgml, "BackendKeyData"), as a login
/// in the client's protocol version sends it.
///
/// # Errors
/// A body shorter than 8 or longer than 260 bytes.
pub fn backend_key_data_pid(body: &[u8]) -> Result<i32, ProtoError> {
    if !(8..=4 + 256).contains(&body.len()) {
        return Err(format_error());
    }
    be_i32(body, 0).ok_or_else(format_error)
}

/// Parses a protocol 3.0 BackendKeyData body into (pid, key).
pub fn parse_backend_key_data(body: &[u8]) -> Result<(i32, i32), ProtoError> {
    if body.len() != 8 {
        return Err(format_error());
    }
    let pid = be_i32(body, 0).ok_or_else(format_error)?;
    let key = be_i32(body, 4).ok_or_else(format_error)?;
    Ok((pid, key))
}

/// Parses a ParameterStatus body into (name, value).
pub fn parse_parameter_status(body: &[u8]) -> Result<(&str, &str), ProtoError> {
    let (name, off) = read_cstr(body, 0)?;
    let (value, off) = read_cstr(body, off)?;
    expect_end(body, off)?;
    Ok((name, value))
}

/// Parses a ReadyForQuery body into its transaction status byte.
pub fn parse_ready_for_query(body: &[u8]) -> Result<u8, ProtoError> {
    match body {
        [s @ (b'I' | b'T' | b'E')] => Ok(*s),
        _ => Err(format_error()),
    }
}

/// Parses a NegotiateProtocolVersion body into (the full version code the
/// server offers, e.g. 196608 for 3.0; unrecognized options).
pub fn parse_negotiate_protocol_version(body: &[u8]) -> Result<(i32, Vec<&str>), ProtoError> {
    let version = be_i32(body, 0).ok_or_else(format_error)?;
    let count = be_i32(body, 4).ok_or_else(format_error)?;
    let count = usize::try_from(count).map_err(|_| format_error())?;
    let mut off = 8;
    // Each option needs at least one byte, which bounds the allocation.
    if count > body.len() {
        return Err(format_error());
    }
    let mut opts = Vec::with_capacity(count);
    for _ in 0..count {
        let (o, next) = read_cstr(body, off)?;
        opts.push(o);
        off = next;
    }
    expect_end(body, off)?;
    Ok((version, opts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: i32, extra: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn auth_requests() {
        assert_eq!(parse_auth_request(&r(0, b"")).unwrap(), AuthRequest::Ok);
        assert_eq!(
            parse_auth_request(&r(3, b"")).unwrap(),
            AuthRequest::Cleartext
        );
        assert_eq!(
            parse_auth_request(&r(5, &[1, 2, 3, 4])).unwrap(),
            AuthRequest::Md5 { salt: [1, 2, 3, 4] }
        );
        assert_eq!(
            parse_auth_request(&r(10, b"SCRAM-SHA-256\0\0")).unwrap(),
            AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256"]
            }
        );
        assert_eq!(
            parse_auth_request(&r(10, b"\0")).unwrap(),
            AuthRequest::Sasl { mechanisms: vec![] }
        );
        assert_eq!(
            parse_auth_request(&r(11, b"xyz")).unwrap(),
            AuthRequest::SaslContinue(b"xyz")
        );
        assert_eq!(
            parse_auth_request(&r(12, b"")).unwrap(),
            AuthRequest::SaslFinal(b"")
        );
        assert_eq!(
            parse_auth_request(&r(7, b"")).unwrap(),
            AuthRequest::Other(7)
        );
    }

    #[test]
    fn auth_request_errors() {
        assert!(parse_auth_request(b"").is_err());
        assert!(parse_auth_request(&[0, 0, 0]).is_err());
        assert!(parse_auth_request(&r(0, b"x")).is_err());
        assert!(parse_auth_request(&r(3, b"x")).is_err());
        assert!(parse_auth_request(&r(5, &[1, 2, 3])).is_err());
        assert!(parse_auth_request(&r(5, &[1, 2, 3, 4, 5])).is_err());
        assert!(parse_auth_request(&r(10, b"SCRAM-SHA-256\0")).is_err()); // no list end
        assert!(parse_auth_request(&r(10, b"SCRAM")).is_err());
        assert!(parse_auth_request(&r(10, b"\0x")).is_err());
        assert!(parse_auth_request(&r(10, b"\xff\0\0")).is_err());
    }

    #[test]
    fn sasl_initial() {
        let mut b = b"SCRAM-SHA-256\0".to_vec();
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        assert_eq!(
            parse_sasl_initial_response(&b).unwrap(),
            ("SCRAM-SHA-256", Some(&b"abc"[..]))
        );

        let mut none = b"M\0".to_vec();
        none.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(parse_sasl_initial_response(&none).unwrap(), ("M", None));

        let mut extra = b.clone();
        extra.push(b'x');
        assert!(parse_sasl_initial_response(&extra).is_err());
        assert!(parse_sasl_initial_response(&b[..b.len() - 1]).is_err());
        let mut neg = b"M\0".to_vec();
        neg.extend_from_slice(&(-2i32).to_be_bytes());
        assert!(parse_sasl_initial_response(&neg).is_err());
        let mut huge = b"M\0".to_vec();
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(parse_sasl_initial_response(&huge).is_err());
        let text = |b: &[u8]| parse_sasl_initial_response(b).unwrap_err().message;
        assert_eq!(text(&neg), "insufficient data left in message");
        assert_eq!(text(&huge), "insufficient data left in message");
        assert_eq!(text(b"M\0\0\0"), "insufficient data left in message");
        assert_eq!(text(&extra), "invalid message format");
        assert!(parse_sasl_initial_response(b"M\0\0\0").is_err());
        assert!(parse_sasl_initial_response(b"M").is_err());
    }

    #[test]
    fn key_status_ready() {
        assert_eq!(
            parse_backend_key_data(&[0, 0, 0, 1, 255, 255, 255, 255]).unwrap(),
            (1, -1)
        );
        assert!(parse_backend_key_data(&[0; 7]).is_err());
        assert!(parse_backend_key_data(&[0; 9]).is_err());
        // Protocol 3.2: a 32-byte key (PostgreSQL 18's), up to 256.
        let mut b = vec![0, 0, 0x30, 0x39];
        b.extend_from_slice(&[7; 32]);
        assert_eq!(backend_key_data_pid(&b).unwrap(), 12345);
        assert_eq!(backend_key_data_pid(&[0, 0, 0, 1, 9, 9, 9, 9]).unwrap(), 1);
        assert!(backend_key_data_pid(&[0; 7]).is_err());
        assert!(backend_key_data_pid(&[0; 261]).is_err());
        assert!(backend_key_data_pid(&[0; 260]).is_ok());
        assert_eq!(parse_parameter_status(b"a\0b\0").unwrap(), ("a", "b"));
        assert!(parse_parameter_status(b"a\0b").is_err());
        assert!(parse_parameter_status(b"a\0b\0c").is_err());
        assert_eq!(parse_ready_for_query(b"T").unwrap(), b'T');
        assert!(parse_ready_for_query(b"").is_err());
        assert!(parse_ready_for_query(b"X").is_err());
        assert!(parse_ready_for_query(b"II").is_err());
    }

    #[test]
    fn negotiate() {
        let mut b = 2i32.to_be_bytes().to_vec();
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(b"_pq_.x\0");
        assert_eq!(
            parse_negotiate_protocol_version(&b).unwrap(),
            (2, vec!["_pq_.x"])
        );
        let mut bad = 2i32.to_be_bytes().to_vec();
        bad.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(parse_negotiate_protocol_version(&bad).is_err());
        let mut neg = 2i32.to_be_bytes().to_vec();
        neg.extend_from_slice(&(-1i32).to_be_bytes());
        assert!(parse_negotiate_protocol_version(&neg).is_err());
        assert!(parse_negotiate_protocol_version(&[0; 7]).is_err());
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x9e37_79b9_u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let n = (x % 24) as usize;
            let mut b: Vec<u8> = (0..n)
                .map(|i| (x.rotate_right(i as u32 * 3) & 0x1f) as u8)
                .collect();
            if n >= 4 && x & 3 == 0 {
                b[..4].copy_from_slice(&10i32.to_be_bytes());
            }
            let _ = parse_auth_request(&b);
            let _ = parse_sasl_initial_response(&b);
            let _ = parse_backend_key_data(&b);
            let _ = parse_parameter_status(&b);
            let _ = parse_ready_for_query(&b);
            let _ = parse_negotiate_protocol_version(&b);
            let _ = crate::proto::parse_error_fields(&b);
        }
    }
}
