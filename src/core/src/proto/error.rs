//! Protocol errors and ErrorResponse/NoticeResponse field parsing.
//!
//! `ProtoError` carries what the server itself would report (SQLSTATE,
//! message, hint) so the pooler can answer a misbehaving client exactly like
//! PostgreSQL would, without re-deriving codes at every call site.

use std::fmt;

/// SQLSTATE `08P01` protocol_violation.
pub const PROTOCOL_VIOLATION: &str = "08P01";
/// SQLSTATE `0A000` feature_not_supported.
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// SQLSTATE `28000` invalid_authorization_specification.
pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
/// SQLSTATE `28P01` invalid_password.
pub const INVALID_PASSWORD: &str = "28P01";
/// SQLSTATE `42601` syntax_error.
pub const SYNTAX_ERROR: &str = "42601";

/// A protocol-level failure, phrased the way the server would phrase it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    /// Five-character SQLSTATE.
    pub sqlstate: &'static str,
    /// Primary message (errmsg).
    pub message: String,
    /// Optional hint (errhint).
    pub hint: Option<String>,
}

impl ProtoError {
    /// Error with a SQLSTATE and message, no hint.
    pub fn new(sqlstate: &'static str, message: impl Into<String>) -> Self {
        ProtoError {
            sqlstate,
            message: message.into(),
            hint: None,
        }
    }

    /// Shorthand for the most common case, 08P01 protocol_violation.
    pub fn violation(message: impl Into<String>) -> Self {
        Self::new(PROTOCOL_VIOLATION, message)
    }

    /// Adds a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Converts to the fields of an ErrorResponse with the given severity
    /// ("FATAL" during startup, "ERROR" otherwise).
    pub fn to_fields(&self, severity: &str) -> ErrorFields {
        ErrorFields {
            severity: severity.to_string(),
            sqlstate: self.sqlstate.to_string(),
            message: self.message.clone(),
            detail: None,
            hint: self.hint.clone(),
        }
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.sqlstate)?;
        if let Some(h) = &self.hint {
            write!(f, " hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ProtoError {}

/// Fields of an ErrorResponse / NoticeResponse that the pooler cares about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// Non-localized severity ("FATAL", "ERROR", "NOTICE", ...).
    pub severity: String,
    /// SQLSTATE code.
    pub sqlstate: String,
    /// Primary message.
    pub message: String,
    /// Optional detail (field `D`).
    pub detail: Option<String>,
    /// Optional hint (field `H`).
    pub hint: Option<String>,
}

/// Parses the body (after tag and length) of an `E` or `N` message.
///
/// The body is a list of (field code byte, NUL-terminated string) ended by a
/// zero byte. Unknown codes are skipped, as the protocol requires. The
/// non-localized severity `V` wins over `S` when both are present, because
/// `S` may be translated. Text is decoded lossily: the server sends messages
/// in its own or the client's encoding, and a log line is better than an error.
pub fn parse_error_fields(body: &[u8]) -> Result<ErrorFields, ProtoError> {
    let mut f = ErrorFields::default();
    let mut localized_severity = None;
    let mut have_v = false;
    let mut off = 0;
    loop {
        let code = *body
            .get(off)
            .ok_or_else(|| ProtoError::violation("invalid message format: missing terminator"))?;
        off += 1;
        if code == 0 {
            break;
        }
        let rest = body.get(off..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| ProtoError::violation("invalid string in message"))?;
        let text = String::from_utf8_lossy(&rest[..len]).into_owned();
        off += len + 1;
        match code {
            b'S' => localized_severity = Some(text),
            b'V' => {
                f.severity = text;
                have_v = true;
            }
            b'C' => f.sqlstate = text,
            b'M' => f.message = text,
            b'D' => f.detail = Some(text),
            b'H' => f.hint = Some(text),
            _ => {}
        }
    }
    if off != body.len() {
        return Err(ProtoError::violation("invalid message format"));
    }
    if !have_v {
        f.severity = localized_severity.unwrap_or_default();
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_and_skips_unknown() {
        let body =
            b"SERREUR\0VERROR\0C42P01\0Mno such table\0Dsome detail\0P15\0Fparse.c\0Htry again\0\0";
        let f = parse_error_fields(body).unwrap();
        assert_eq!(f.severity, "ERROR");
        assert_eq!(f.sqlstate, "42P01");
        assert_eq!(f.message, "no such table");
        assert_eq!(f.detail.as_deref(), Some("some detail"));
        assert_eq!(f.hint.as_deref(), Some("try again"));
    }

    #[test]
    fn localized_severity_used_without_v() {
        let f = parse_error_fields(b"SFATAL\0C28P01\0Mbad\0\0").unwrap();
        assert_eq!(f.severity, "FATAL");
        assert_eq!(f.detail, None);
    }

    #[test]
    fn empty_body_is_error_and_lone_terminator_ok() {
        assert!(parse_error_fields(b"").is_err());
        assert_eq!(parse_error_fields(b"\0").unwrap(), ErrorFields::default());
    }

    #[test]
    fn malformed_bodies() {
        assert!(parse_error_fields(b"Mabc").is_err()); // unterminated string
        assert!(parse_error_fields(b"Mabc\0").is_err()); // no final zero
        assert!(parse_error_fields(b"Mabc\0\0junk").is_err()); // trailing bytes
        assert!(parse_error_fields(b"M").is_err());
    }

    #[test]
    fn non_utf8_is_lossy_not_error() {
        let f = parse_error_fields(b"M\xff\xfe\0\0").unwrap();
        assert!(f.message.contains('\u{fffd}'));
    }

    #[test]
    fn proto_error_helpers() {
        let e = ProtoError::violation("x").with_hint("h");
        assert_eq!(e.sqlstate, "08P01");
        let f = e.to_fields("FATAL");
        assert_eq!(f.severity, "FATAL");
        assert_eq!(f.hint.as_deref(), Some("h"));
        assert_eq!(e.to_string(), "x (08P01) hint: h");
    }
}
